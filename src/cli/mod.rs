//! The `box-broker` command line (clap): `serve`, `dev`, `fake-box`,
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
    admin::{AdminRules, KeyAdmin},
    auth::Authenticator,
    clock::SystemClock,
    config::{Config, LogFormat},
    reload::{POLL_INTERVAL, PolicyWatcher},
    service, telemetry,
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
    /// Load and validate a config file, including its credentials, then exit.
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

/// Everything `serve` builds from its config before binding a port — the
/// same for `check-config`, so what one accepts the other does: keys
/// decrypted, policy parsed, Kubernetes keys fetched, TLS files parsed and
/// matched, the audit sink opened, the key store read.
struct Prepared {
    broker: Arc<crate::broker::Broker>,
    auth: Authenticator,
    tls: Option<service::ServerTls>,
    admin_tls: Option<service::ServerTls>,
    audit: Arc<crate::audit::AuditSink>,
    admin: Arc<KeyAdmin>,
}

async fn prepare(config: &Config) -> Result<Prepared, String> {
    let broker = config
        .build_broker(Arc::new(SystemClock))
        .map_err(|e| e.to_string())?
        .with_budget(config.server.upstream_budget());
    let broker = Arc::new(broker);
    let auth = config.authenticator().await.map_err(|e| e.to_string())?;
    // A client certificate is optional when the listener also accepts other credentials.
    let certificate_optional = config.accepted().len() > 1;
    let tls = config
        .server
        .tls
        .as_ref()
        .map(|tls| tls.load("server.tls", certificate_optional))
        .transpose()
        .map_err(|e| e.to_string())?;
    let admin_tls = config
        .admin
        .tls
        .as_ref()
        .map(|tls| tls.load("admin.tls", !config.admin.api_keys.is_empty()))
        .transpose()
        .map_err(|e| e.to_string())?;
    let audit = Arc::new(config.audit.open().map_err(|e| e.to_string())?);
    let admin = open_key_admin(config, &broker)?;
    Ok(Prepared {
        broker,
        auth,
        tls,
        admin_tls,
        audit,
        admin,
    })
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
    let _telemetry = match telemetry::init(config.log.format, &config.log.level) {
        Ok(telemetry) => telemetry,
        Err(e) => return fail(EXIT_CONFIG, &e),
    };
    for warning in config.stray_env_warnings() {
        tracing::warn!("{warning}");
    }
    let Prepared {
        broker,
        auth,
        tls,
        admin_tls,
        audit,
        admin,
    } = tokio::select! {
        prepared = prepare(&config) => match prepared {
            Ok(prepared) => prepared,
            Err(e) => return fail(EXIT_CONFIG, &e),
        },
        // Startup can take a while (key derivation, the cluster's keys): a
        // SIGTERM then stops it at once, with nothing to drain.
        () = &mut shutdown => {
            tracing::info!("stopped during startup");
            return ExitCode::SUCCESS;
        }
    };
    let listener = match tokio::net::TcpListener::bind(config.server.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            return fail(1, &format!("cannot listen on {}: {e}", config.server.listen));
        }
    };
    let bound = listener
        .local_addr()
        .map_or_else(|_| config.server.listen.to_string(), |a| a.to_string());
    let mut listeners = vec![match tls {
        Some(tls) => service::Listener::Tls(listener, auth, tls),
        None => service::Listener::Tcp(listener, auth),
    }];
    if let Some(unix) = &config.server.unix_socket {
        match bind_unix(&unix.path) {
            Ok(l) => {
                tracing::info!(path = %unix.path.display(), identity = %unix.identity, "serving gRPC on a Unix socket");
                let auth = Authenticator::unix_socket(&unix.identity, unix.allowed_uids.clone());
                listeners.push(service::Listener::Unix(l, auth));
            }
            Err(e) => return fail(1, &format!("cannot listen on {}: {e}", unix.path.display())),
        }
    }
    match admin.write_pending_purge() {
        Ok(true) => tracing::info!("dropped retired keys' private material from the key store"),
        Ok(false) => {}
        // Memory holds none already; the next change rewrites the store.
        Err(e) => tracing::warn!(error = %e, "could not drop retired keys' private material from the key store"),
    }
    let admin_role = service::Role::Admin(admin, AdminRules(config.admin.rules.clone()));
    let mut endpoints: Vec<(service::Listener, service::Role)> =
        listeners.into_iter().map(|l| (l, service::Role::Client)).collect();
    match admin_listeners(&config, admin_tls).await {
        Ok(admin) => endpoints.extend(admin.into_iter().map(|l| (l, admin_role.clone()))),
        Err(e) => return fail(1, &e),
    }
    for app in broker.apps() {
        tracing::info!(app = %app.name, auth = %app.auth_summary(), "app loaded");
    }
    if config.server.allow_anonymous {
        tracing::warn!(
            "anonymous callers are allowed ([server] allow_anonymous = true): any process that reaches the listener gets tokens"
        );
    }
    let accepted: Vec<&str> = config
        .accepted()
        .into_iter()
        .map(crate::config::Mechanism::name)
        .collect();
    tracing::info!(
        listen = %bound,
        tls = config.server.tls.is_some(),
        // A plain string (a JSON log line holds no JSON inside a string).
        accept = accepted.join(","),
        "serving gRPC"
    );
    let watcher = match &config.policy.file {
        Some(file) => tokio::spawn(PolicyWatcher::new(file.clone(), broker.clone()).run(POLL_INTERVAL, hangups)),
        None => {
            tracing::warn!("no [policy] file is configured: every request will be denied");
            tokio::spawn(crate::reload::log_hangups(hangups))
        }
    };
    let mut options = config.server.serve_options();
    fit_to_open_files(&mut options.connections, endpoints.len());
    let metrics = match config.server.metrics_listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                let bound = listener
                    .local_addr()
                    .map_or_else(|_| addr.to_string(), |a| a.to_string());
                tracing::info!(listen = %bound, "serving Prometheus metrics at /metrics");
                let registry =
                    crate::metrics::registry(broker.clone(), options.rpc_metrics.clone(), options.counters.clone());
                Some(tokio::spawn(crate::metrics::serve(
                    listener,
                    registry,
                    std::future::pending(),
                )))
            }
            Err(e) => return fail(1, &format!("cannot listen on {addr} (metrics): {e}")),
        },
        None => None,
    };
    let served = service::serve_with(options, broker, endpoints, audit, shutdown).await;
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    watcher.abort();
    for unix in [&config.server.unix_socket, &config.server.admin_unix_socket]
        .into_iter()
        .flatten()
    {
        let _ = std::fs::remove_file(&unix.path);
    }
    match served {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, &e.to_string()),
    }
}

/// Descriptors kept free of connections, for Box, files and the metrics listener.
const RESERVED_FILES: u64 = 256;

/// Lowers each listener's connection cap so that all of them together fit
/// under the open-files limit (less [`RESERVED_FILES`]), saying so: a cap
/// the process cannot reach would leave `accept` failing instead.
fn fit_to_open_files(limits: &mut service::ConnectionLimits, listeners: usize) {
    let Some(files) = crate::process::open_files_limit() else {
        return;
    };
    let listeners = u64::try_from(listeners.max(1)).unwrap_or(1);
    let room = files.saturating_sub(RESERVED_FILES).max(16 * listeners) / listeners;
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    if limits.max_connections > room {
        tracing::warn!(
            open_files = files,
            max_connections = limits.max_connections,
            lowered_to = room,
            "[server] max_connections does not fit the open-files limit (ulimit -n) for every listener; lowered"
        );
        limits.max_connections = room;
    }
}

/// Opens the key store (if configured) and lays it over the apps' config
/// credentials. The error is one line naming the file.
fn open_key_admin(config: &Config, broker: &Arc<crate::broker::Broker>) -> Result<Arc<KeyAdmin>, String> {
    let store = match &config.keystore {
        Some(k) => Some(k.open(|var| std::env::var(var).ok()).map_err(|e| e.to_string())?),
        None => None,
    };
    KeyAdmin::open(broker.clone(), store)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// Binds the admin listeners `[server] admin_listen` and `[server.admin_unix_socket]` name.
async fn admin_listeners(config: &Config, tls: Option<service::ServerTls>) -> Result<Vec<service::Listener>, String> {
    let mut listeners = Vec::new();
    let tls_on = tls.is_some();
    if let Some(addr) = config.server.admin_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} (admin): {e}"))?;
        let auth = config.admin_authenticator();
        // The bound address (port 0 picks one).
        let bound = listener.local_addr().unwrap_or(addr);
        listeners.push(match tls {
            Some(tls) => service::Listener::Tls(listener, auth, tls),
            None => service::Listener::Tcp(listener, auth),
        });
        tracing::info!(listen = %bound, tls = tls_on, "serving the admin RPC");
    }
    if let Some(unix) = &config.server.admin_unix_socket {
        let listener =
            bind_unix(&unix.path).map_err(|e| format!("cannot listen on {} (admin): {e}", unix.path.display()))?;
        let auth = Authenticator::unix_socket(&unix.identity, unix.allowed_uids.clone());
        listeners.push(service::Listener::Unix(listener, auth));
        tracing::info!(path = %unix.path.display(), identity = %unix.identity, "serving the admin RPC on a Unix socket");
    }
    Ok(listeners)
}

/// Binds a Unix socket at `path`, replacing a stale socket file (never any other file).
fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt as _;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        std::fs::remove_file(path)?;
    }
    tokio::net::UnixListener::bind(path)
}

/// Exit status when Box cannot be reached (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

async fn check_config(path: PathBuf, online: bool) -> ExitCode {
    let config = match Config::load(&path, std::env::vars()) {
        Ok(config) => config,
        Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
    };
    for warning in config.stray_env_warnings() {
        eprintln!("box-broker: warning: {warning}");
    }
    let prepared = match prepare(&config).await {
        Ok(prepared) => prepared,
        Err(e) => return fail(EXIT_CONFIG, &e),
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
        match app.trial_mint(&credentials, true).await {
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
