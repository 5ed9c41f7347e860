//! Logging (tracing, human or JSON, to stderr) and OpenTelemetry traces.
//!
//! Traces are exported over OTLP/gRPC when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set; the exporter reads the other standard `OTEL_*` variables itself, and
//! `OTEL_SERVICE_NAME` defaults to `box-token-broker`. One span per RPC and
//! one per upstream attempt, parent and child.
//!
//! Only spans go to OpenTelemetry, never log events, so a span's attributes
//! are exactly the fields its declaration lists — all allow-listed (RPC,
//! request id, caller identity, app, subject type, cache hit, codes, attempt
//! and HTTP status): never tokens, keys, secrets or request metadata.

use std::io::IsTerminal as _;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::{EnvFilter, Layer, filter::filter_fn, fmt, prelude::*, registry::LookupSpan};

use crate::config::LogFormat;

/// The default `service.name`.
pub const SERVICE_NAME: &str = "box-token-broker";

/// Keeps the trace exporter running; flushes it when dropped.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("box-broker: warning: flushing traces failed: {e}");
        }
    }
}

/// An OTLP/gRPC trace pipeline: to `endpoint`, or where the standard
/// `OTEL_EXPORTER_OTLP_*` variables say. Call inside a tokio runtime.
pub fn otlp_provider(endpoint: Option<&str>) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig as _;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(endpoint) = endpoint {
        exporter = exporter.with_endpoint(endpoint);
    }
    let exporter = exporter
        .build()
        .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the OTLP exporter: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(SERVICE_NAME);
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// The layer that turns this crate's spans (not events) into OpenTelemetry spans.
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + use<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    crate::rpc::set_traces_exported();
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(SERVICE_NAME))
        .with_location(false)
        .with_threads(false)
        .with_level(false)
        .with_filter(filter_fn(|meta| {
            meta.is_span() && meta.target().starts_with("box_token_broker")
        }))
}

fn otlp_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Installs the global subscriber (and the OTLP exporter when configured).
/// `RUST_LOG`, when set, overrides `level` for logs. Keep the result alive.
pub fn init(format: LogFormat, level: &str) -> Result<Telemetry, String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(from_env) if !from_env.is_empty() => EnvFilter::try_new(from_env).map_err(|e| format!("RUST_LOG: {e}"))?,
        _ => EnvFilter::try_new(level).map_err(|e| format!("log.level {level:?}: {e}"))?,
    };
    let provider = if otlp_configured() {
        Some(otlp_provider(None)?)
    } else {
        None
    };
    let logs = match format {
        LogFormat::Human => fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(provider.as_ref().map(otel_layer))
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))?;
    if provider.is_some() {
        tracing::info!("exporting traces over OTLP");
    }
    Ok(Telemetry { provider })
}
