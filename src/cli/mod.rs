//! The `box-broker` command line (clap): `serve`, `edge`, `dev`, `fake-box`,
//! `token get|downscope|revoke`, `admin ...`, `keygen`, `check-config`.

/// `println!` for the CLI's output: when stdout is closed (`box-broker
/// admin keys generate | head -1`) the process ends quietly, as SIGPIPE ends
/// other Unix tools — exit status 141 (128 + SIGPIPE), no message — instead
/// of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}

mod admin;
mod connect;
mod dev;
mod keygen;
mod token;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use clap::{Args, Parser, Subcommand};

use crate::{
    clock::SystemClock,
    config::{Config, EdgeConfig, LogFormat},
    runtime::{Prepared, PreparedEdge, Runtime},
    telemetry,
};

/// Exit code for a bad config or bad usage (sysexits' EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// box-broker: holds a Box app's server-auth credentials and hands other
/// services only the access tokens they need, over gRPC.
#[derive(Debug, Parser)]
#[command(name = "box-broker", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker with a config file.
    Serve {
        /// The TOML config file (BOX_BROKER_* environment variables override it).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run an edge sidecar: serves its pod's app from a local cache and gets
    /// tokens from the central broker; holds no Box credential.
    Edge {
        /// The edge's TOML config file ([central], [server.unix_socket], ...).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the broker against an embedded fake Box: no Box account needed.
    #[command(
        after_long_help = "The embedded fake Box serves the endpoints `box-broker fake-box --help` lists \
        (its URL and the app's client id are in the banner): the console's public keys and client secret reset, \
        faults, latency, clock skew and call counts."
    )]
    Dev(DevArgs),
    /// Run only the fake Box, and write a Box config JSON and broker config for it.
    #[command(after_long_help = crate::fakebox::http::endpoints_help())]
    FakeBox(FakeBoxArgs),
    /// Ask a running broker for tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Generate an RSA key pair for a Box JWT app.
    Keygen(keygen::KeygenArgs),
    /// Rotate keys and secrets, inspect status, drop cached tokens (the admin RPC).
    Admin(admin::AdminArgs),
    /// Print a shell completion script, e.g.
    /// `box-broker completions bash > /etc/bash_completion.d/box-broker`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Load and validate a config file (a central broker's, with its
    /// credentials, or an edge's: one with [central]), then exit.
    CheckConfig {
        /// The TOML config file.
        file: PathBuf,
        /// Also ask Box for each app's Service Account token (revoked at
        /// once), so a wrong key id, secret or unauthorized app shows now,
        /// not at the first request. Exit 64 if Box refuses, 69 if it cannot
        /// be reached.
        #[arg(long)]
        online: bool,
    },
}

/// `dev` options.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// The broker's gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// The admin RPC's listen address.
    #[arg(long, default_value = "127.0.0.1:50052")]
    admin_listen: SocketAddr,
    /// The embedded fake Box's listen address (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    fake_box_listen: SocketAddr,
    /// Also run an edge sidecar in front of the broker, on this address
    /// (127.0.0.1:50053 when given without one): app -> edge -> broker -> fake Box.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:50053")]
    edge: Option<SocketAddr>,
}

/// `fake-box` options.
#[derive(Debug, Args)]
pub struct FakeBoxArgs {
    /// The fake Box's listen address.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Write box_config.json and broker.toml for this fake into DIR.
    #[arg(long, value_name = "DIR")]
    write_config: PathBuf,
    /// Register a Client Credentials Grant app instead of a JWT app.
    #[arg(long)]
    ccg: bool,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Get a full access token for the Service Account or a user.
    Get(token::GetArgs),
    /// Get a downscoped token: a few scopes, optionally one file, folder or shared item.
    Downscope(token::DownscopeArgs),
    /// Revoke a token the broker issued; the token is read from standard input.
    Revoke(token::RevokeArgs),
}

/// Runs the command line; `main` is only this.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(1, &format!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve { config } => serve(config).await,
            Command::Edge { config } => edge(config).await,
            Command::Dev(args) => dev::run_dev(args).await,
            Command::FakeBox(args) => dev::run_fake_box(args).await,
            Command::Token(TokenCommand::Get(args)) => token::get(args).await,
            Command::Token(TokenCommand::Downscope(args)) => token::downscope(args).await,
            Command::Token(TokenCommand::Revoke(args)) => token::revoke(args).await,
            Command::Keygen(args) => keygen::run(&args),
            Command::Admin(args) => admin::run(args).await,
            Command::CheckConfig { file, online } => check_config(file, online).await,
            Command::Completions { shell } => {
                let mut script = Vec::new();
                clap_complete::generate(
                    shell,
                    &mut <Cli as clap::CommandFactory>::command(),
                    "box-broker",
                    &mut script,
                );
                let mut script = String::from_utf8_lossy(&script).into_owned();
                if shell == clap_complete::Shell::Bash {
                    // clap_complete 4.6 spells the hyphenated name two ways in
                    // bash, so nothing after a subcommand completes
                    // (clap-rs/clap#6421, open): one spelling.
                    script = script.replace("box__subcmd__broker", "box__broker");
                }
                out!("{}", script.trim_end());
                ExitCode::SUCCESS
            }
        }
    })
}

/// The exit status of a process ended by SIGPIPE, as the shell reports it.
const EXIT_CLOSED_STDOUT: i32 = 128 + 13;

/// Writes one line to stdout (see [`out!`]); another write error (a full
/// disk) is reported on stderr and ends the process with 74 (EX_IOERR).
pub(crate) fn write_out(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(EXIT_CLOSED_STDOUT),
        Err(e) => {
            eprintln!("box-broker: error: cannot write to stdout: {e}");
            std::process::exit(74);
        }
    }
}

/// A timestamp in RFC 3339 (UTC, milliseconds), as the gRPC JSON mapping
/// writes it; `None` for none, or for a time RFC 3339 cannot write (before
/// 1970 or after 9999 here).
pub(crate) fn rfc3339(t: Option<&prost_types::Timestamp>) -> Option<String> {
    /// 9999-12-31T23:59:59Z.
    const LAST: i64 = 253_402_300_799;
    let t = t.filter(|t| (0..=LAST).contains(&t.seconds))?;
    let nanos = u32::try_from(t.nanos).unwrap_or(0).min(999_999_999);
    let at = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::new(t.seconds.unsigned_abs(), nanos);
    Some(crate::audit::rfc3339(at))
}

/// Prints one error line and returns `code`.
fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("box-broker: error: {message}");
    ExitCode::from(code)
}

/// SIGHUP, listened for from startup on (its default action kills the process).
fn hangups() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

async fn serve(path: PathBuf) -> ExitCode {
    let hangups = hangups();
    let mut shutdown = Box::pin(shutdown_signal());
    let config = match Config::load(&path, std::env::vars()) {
        Ok(config) => config,
        Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
    };
    // Held until the broker stops, so the last traces are flushed.
    let _telemetry = match start_logging(&config.log, config.stray_env_warnings()) {
        Ok(telemetry) => telemetry,
        Err(code) => return code,
    };
    let prepared = tokio::select! {
        prepared = Prepared::from_config(&config, Arc::new(SystemClock), |var| std::env::var(var).ok()) => match prepared {
            Ok(prepared) => prepared,
            Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
        },
        // Startup can take a while (key derivation, the cluster's keys): a
        // SIGTERM then stops it at once, with nothing to drain.
        () = &mut shutdown => {
            tracing::info!("stopped during startup");
            return ExitCode::SUCCESS;
        }
    };
    run_until(prepared.bind(&config, hangups).await, shutdown).await
}

/// Starts logging as `log` says, then logs `warnings`; the guard flushes
/// the last traces when dropped. A bad `[log]` is the config's error.
fn start_logging(log: &crate::config::LogConfig, warnings: Vec<String>) -> Result<telemetry::Telemetry, ExitCode> {
    let telemetry = telemetry::init(log.format, &log.level).map_err(|e| fail(EXIT_CONFIG, &e))?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    Ok(telemetry)
}

/// Serves a bound runtime until `shutdown` (or says why it could not bind).
async fn run_until(bound: Result<Runtime, String>, shutdown: impl Future<Output = ()> + Send) -> ExitCode {
    let runtime = match bound {
        Ok(runtime) => runtime,
        Err(e) => return fail(1, &e),
    };
    match runtime.run(shutdown).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, &e.to_string()),
    }
}

/// Exit status when Box cannot be reached (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

async fn edge(path: PathBuf) -> ExitCode {
    let hangups = hangups();
    let mut shutdown = Box::pin(shutdown_signal());
    let config = match EdgeConfig::load(&path, std::env::vars()) {
        Ok(config) => config,
        Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
    };
    let _telemetry = match start_logging(&config.log, config.stray_env_warnings()) {
        Ok(telemetry) => telemetry,
        Err(code) => return code,
    };
    let prepared = tokio::select! {
        prepared = PreparedEdge::from_config(&config, Arc::new(SystemClock)) => match prepared {
            Ok(prepared) => prepared,
            Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
        },
        // Resolving the central broker's names can take a while.
        () = &mut shutdown => {
            tracing::info!("stopped during startup");
            return ExitCode::SUCCESS;
        }
    };
    run_until(prepared.bind(&config, hangups).await, shutdown).await
}

/// Whether the file at `path` is an edge's config (it has `[central]`);
/// false when it cannot be read or parsed (loading it says why).
fn is_edge_config(path: &std::path::Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .is_some_and(|table| table.contains_key("central"))
}

/// `check-config` of an edge's config: the files it names are read, the
/// central broker's names resolved.
async fn check_edge_config(path: PathBuf, online: bool) -> ExitCode {
    if online {
        return fail(
            EXIT_CONFIG,
            &format!(
                "{}: --online tries Box credentials, and an edge config holds none: check the central broker's config with it",
                path.display()
            ),
        );
    }
    let config = match EdgeConfig::load(&path, std::env::vars()) {
        Ok(config) => config,
        Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
    };
    for warning in config.stray_env_warnings() {
        eprintln!("box-broker: warning: {warning}");
    }
    let prepared = match PreparedEdge::from_config(&config, Arc::new(SystemClock)).await {
        Ok(prepared) => prepared,
        Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
    };
    // Names of in-cluster Services resolve only in the cluster: a warning.
    if let Err(problem) = prepared.edge.central().resolve_now().await {
        eprintln!(
            "box-broker: warning: {}: central.endpoints do not resolve here ({problem}); the edge keeps trying",
            path.display()
        );
    }
    out!(
        "{}: ok, an edge of {}",
        path.display(),
        config.central.endpoints.join(", ")
    );
    ExitCode::SUCCESS
}

async fn check_config(path: PathBuf, online: bool) -> ExitCode {
    if is_edge_config(&path) {
        return check_edge_config(path, online).await;
    }
    let config = match Config::load(&path, std::env::vars()) {
        Ok(config) => config,
        Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
    };
    for warning in config.stray_env_warnings() {
        eprintln!("box-broker: warning: {warning}");
    }
    let prepared = match Prepared::from_config(&config, Arc::new(SystemClock), |var| std::env::var(var).ok()).await {
        Ok(prepared) => prepared,
        Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
    };
    out!("{}: ok, listen {}", path.display(), config.server.listen);
    for app in prepared.broker.apps() {
        out!(
            "  app {}: {}; client id {}, enterprise {}",
            app.name,
            app.auth_summary(),
            app.client_id(),
            app.enterprise_id()
        );
    }
    if !online {
        return ExitCode::SUCCESS;
    }
    let mut worst = ExitCode::SUCCESS;
    for app in prepared.broker.apps() {
        let Some(credentials) = app.credentials() else {
            out!("  app {}: no credentials to try (no active key)", app.name);
            worst = ExitCode::from(EXIT_CONFIG);
            continue;
        };
        match app.trial_mint(&credentials, crate::broker::AfterTrial::Revoke).await {
            Ok(()) => out!("  app {}: Box issued a Service Account token (revoked again)", app.name),
            Err(diagnosis) => {
                let unavailable = diagnosis.kind == crate::boxapi::DiagnosisKind::Unavailable;
                eprintln!(
                    "box-broker: error: {}: app {}: {}",
                    path.display(),
                    app.name,
                    diagnosis.message
                );
                if worst == ExitCode::SUCCESS || !unavailable {
                    worst = ExitCode::from(if unavailable { EXIT_UNAVAILABLE } else { EXIT_CONFIG });
                }
            }
        }
    }
    worst
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT). The handlers are installed when
/// this is called, not when the future is first polled: call it at startup,
/// or a SIGTERM in between kills the process without a drain.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let (term, interrupt) = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |signal: Option<tokio::signal::unix::Signal>| async move {
                match signal {
                    Some(mut signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = wait(term) => {},
                () = wait(interrupt) => {},
            }
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        tracing::info!("shutdown requested");
    }
}

/// Logs to stderr at info (the dev banner is on stdout); keep the result alive.
fn init_dev_logging() -> telemetry::Telemetry {
    telemetry::init(LogFormat::Human, "info").unwrap_or_else(|e| {
        eprintln!("box-broker: warning: {e}");
        telemetry::Telemetry::default()
    })
}
