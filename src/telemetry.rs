//! Logging: tracing with a human or JSON format, to stderr.
//!
//! Spans and events carry only allow-listed fields (app, subject type and
//! id, codes, Box request ids) — never tokens, keys, secrets or request
//! metadata. OpenTelemetry export and metrics arrive with the observability work.

use std::io::IsTerminal as _;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level`.
pub fn init_logging(format: LogFormat, level: &str) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(from_env) if !from_env.is_empty() => EnvFilter::try_new(from_env).map_err(|e| format!("RUST_LOG: {e}"))?,
        _ => EnvFilter::try_new(level).map_err(|e| format!("log.level {level:?}: {e}"))?,
    };
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Human => registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_current_span(true).with_writer(std::io::stderr))
            .try_init(),
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))
}
