//! Building and running a broker: the one place that assembles its parts
//! (the broker, the admin side, audit, listeners, metrics, the policy
//! watcher) and serves them until a shutdown signal.
//!
//! `serve` builds a [`Runtime`] from a validated [`Config`]
//! ([`Prepared::from_config`], where everything bad config can break fails,
//! then [`Prepared::bind`]); `dev`, the integration tests and
//! `broker-bench` build theirs from parts made in code ([`Runtime::new`],
//! [`Runtime::listen`]). All of them then [`Runtime::run`] it. The edge
//! mode will be another assembly of the same parts.

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpListener, signal::unix::Signal};

use crate::{
    admin::{AdminRules, KeyAdmin},
    audit::AuditSink,
    auth::{Anonymous, Authenticator, kubernetes::KubernetesAuth},
    boxapi::BoxClient,
    broker::{App, Broker, UpstreamBudget},
    clock::SharedClock,
    config::{
        ApiKeyConfig, AuditConfig, AuthConfig, Config, ConfigError, EdgeConfig, KeystoreConfig, Mechanism, RedisConfig,
        ServerConfig, TlsConfig, UnixSocketConfig,
    },
    edge::{
        Edge,
        central::{Central, CentralSettings, CentralTls, Credential, SecretFile},
    },
    keys::store::{Kek, KeyStore},
    metrics::{RpcMetrics, Served},
    policy::Policy,
    reload::{POLL_INTERVAL, PolicyWatcher},
    service::{self, ClientCertificates, ConnectionLimits, Listener, Role, ServeError, ServeOptions, ServerTls},
};

/// A broker and what serves it, ready to run.
#[derive(Debug)]
pub struct Runtime {
    backend: Served,
    audit: Arc<AuditSink>,
    options: ServeOptions,
    endpoints: Vec<(Listener, Role)>,
    metrics: Option<TcpListener>,
    policy_file: Option<PathBuf>,
    hangups: Option<Signal>,
    /// Socket files to remove once stopped, with the (device, inode) bound:
    /// a file another process has since bound at the path is left alone.
    unix_sockets: Vec<(PathBuf, Option<(u64, u64)>)>,
    /// An edge's task that resolves the central broker's names again; stopped with the runtime.
    resolver: Option<tokio::task::JoinHandle<()>>,
}

impl Runtime {
    /// `broker`, auditing to `audit`, with default serve options and no
    /// listener yet.
    pub fn new(broker: Arc<Broker>, audit: Arc<AuditSink>) -> Self {
        Self::serving(Served::Broker(broker), audit)
    }

    /// An edge, auditing to `audit`, with default serve options and no listener yet.
    pub fn edge(edge: Arc<Edge>, audit: Arc<AuditSink>) -> Self {
        Self::serving(Served::Edge(edge), audit)
    }

    fn serving(backend: Served, audit: Arc<AuditSink>) -> Self {
        Self {
            backend,
            audit,
            options: ServeOptions::default(),
            endpoints: Vec::new(),
            metrics: None,
            policy_file: None,
            hangups: None,
            unix_sockets: Vec::new(),
            resolver: None,
        }
    }

    /// Serves with `options` (limits, drain and grace periods, counters).
    #[must_use]
    pub fn with_options(mut self, options: ServeOptions) -> Self {
        self.options = options;
        self
    }

    /// Serves `role` on an already-bound `listener`.
    #[must_use]
    pub fn listen(mut self, listener: Listener, role: Role) -> Self {
        self.endpoints.push((listener, role));
        self
    }

    /// Serves `GET /metrics` on `listener`.
    #[must_use]
    pub fn with_metrics(mut self, listener: TcpListener) -> Self {
        self.metrics = Some(listener);
        self
    }

    /// Reloads the policy from `file` when it changes or on SIGHUP (`hangups`).
    #[must_use]
    pub fn watch_policy(mut self, file: Option<PathBuf>, hangups: Option<Signal>) -> Self {
        self.policy_file = file;
        self.hangups = hangups;
        self
    }

    /// Binds a Unix socket as `unix` says (a stale socket file there is
    /// replaced) and serves `role` on it; the file is removed once stopped.
    fn listen_unix(mut self, unix: &UnixSocketConfig, role: Role) -> Result<Self, String> {
        let what = match role {
            Role::Client => "gRPC",
            Role::Admin(..) => "the admin RPC",
        };
        let listener = bind_unix(&unix.path, unix.mode)
            .map_err(|e| format!("cannot listen on {} ({what}): {e}", unix.path.display()))?;
        tracing::info!(path = %unix.path.display(), identity = %unix.identity, "serving {what} on a Unix socket");
        let auth = Authenticator::unix_socket(&unix.identity, unix.allowed_uids.clone());
        self.unix_sockets.push((unix.path.clone(), file_identity(&unix.path)));
        Ok(self.listen(Listener::Unix(listener, auth), role))
    }

    /// Binds `addr` and serves `GET /metrics` there.
    async fn serve_metrics_at(self, addr: std::net::SocketAddr) -> Result<Self, String> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} (metrics): {e}"))?;
        tracing::info!(listen = %listener.local_addr().unwrap_or(addr), "serving Prometheus metrics at /metrics");
        Ok(self.with_metrics(listener))
    }

    /// The broker it serves (none for an edge).
    pub fn broker(&self) -> Option<&Arc<Broker>> {
        match &self.backend {
            Served::Broker(broker) => Some(broker),
            Served::Edge(_) => None,
        }
    }

    /// Where the client API's RPCs are counted (what `/metrics` reads).
    pub fn rpc_metrics(&self) -> RpcMetrics {
        self.options.rpc_metrics.clone()
    }

    /// Serves until `shutdown` resolves (or a listener fails), then drains
    /// (see [`service::serve_with`]) and cleans up: the metrics server and
    /// the policy watcher stop, and the Unix socket files [`Prepared::bind`]
    /// bound are removed (a caller that binds its own removes its own).
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        let metrics = self.metrics.take().map(|listener| {
            let registry = crate::metrics::registry(
                self.backend.clone(),
                self.options.rpc_metrics.clone(),
                self.options.counters.clone(),
            );
            tokio::spawn(crate::metrics::serve(
                listener,
                registry,
                self.options.readiness.clone(),
                std::future::pending(),
            ))
        });
        let watcher = match (self.policy_file.take(), &self.backend) {
            (Some(file), Served::Broker(broker)) => {
                tokio::spawn(PolicyWatcher::new(file, broker.clone()).run(POLL_INTERVAL, self.hangups.take()))
            }
            _ => tokio::spawn(crate::reload::log_hangups(self.hangups.take())),
        };
        let served = service::serve_with(self.options, self.backend, self.endpoints, self.audit, shutdown).await;
        if let Some(metrics) = metrics {
            metrics.abort();
        }
        watcher.abort();
        if let Some(resolver) = self.resolver.take() {
            resolver.abort();
        }
        for (path, bound) in &self.unix_sockets {
            // (A restart that overlapped this one has bound its own socket
            // there: removing it would cut the new process off.)
            if bound.is_some() && file_identity(path) == *bound {
                let _ = std::fs::remove_file(path);
            }
        }
        served
    }
}

/// Everything `serve` builds from a config before it binds a port: what
/// bad config can break (credentials, policy, TLS files, the cluster's
/// keys, the key store, the audit sink) fails here.
#[derive(Debug)]
pub struct Prepared {
    /// The broker.
    pub broker: Arc<Broker>,
    /// Its admin side (keys, secrets, the key store).
    pub admin: Arc<KeyAdmin>,
    auth: Authenticator,
    tls: Option<ServerTls>,
    admin_auth: Authenticator,
    admin_tls: Option<ServerTls>,
    audit: Arc<AuditSink>,
}

impl Prepared {
    /// Builds the parts `config` names; `env` looks up `[keystore] kek_env`.
    pub async fn from_config(
        config: &Config,
        clock: SharedClock,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut broker = build_broker(config, clock)?;
        let store = config.keystore.as_ref().map(|k| open_key_store(k, env)).transpose()?;
        if let (Some(redis), Some(store)) = (&config.redis, &store) {
            broker = broker.with_fleet(open_redis(redis, config, store)?);
        }
        let broker = Arc::new(broker);
        let auth = authenticator(config).await?;
        // A client certificate is optional when the listener also accepts other credentials.
        let tls = client_tls(config)?;
        let admin_tls = config
            .admin
            .tls
            .as_ref()
            .map(|tls| server_tls(tls, "admin.tls", !config.admin.api_keys.is_empty()))
            .transpose()?;
        let admin_auth = admin_authenticator(config)?;
        let audit = Arc::new(open_audit(&config.audit)?);
        let admin = KeyAdmin::open(broker.clone(), store)
            .map(Arc::new)
            .map_err(|e| ConfigError::new(format!("key store {}", e.path), e.problem))?;
        Ok(Self {
            broker,
            admin,
            auth,
            tls,
            admin_auth,
            admin_tls,
            audit,
        })
    }

    /// Binds every listener `config` names (client, Unix socket, admin,
    /// metrics) and returns the runtime that serves them; `hangups` reload
    /// the policy. An error names the address that could not be bound.
    pub async fn bind(self, config: &Config, hangups: Option<Signal>) -> Result<Runtime, String> {
        let (admin, admin_auth, admin_tls) = (self.admin, self.admin_auth, self.admin_tls);
        let mut runtime = Runtime::new(self.broker, self.audit)
            .with_options(serve_options(&config.server))
            .watch_policy(config.policy.file.clone(), hangups);
        let listener = TcpListener::bind(config.server.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
        let bound = listener
            .local_addr()
            .map_or_else(|_| config.server.listen.to_string(), |a| a.to_string());
        runtime = runtime.listen(
            match self.tls {
                Some(tls) => Listener::Tls(listener, self.auth, tls),
                None => Listener::Tcp(listener, self.auth),
            },
            Role::Client,
        );
        if let Some(unix) = &config.server.unix_socket {
            runtime = runtime.listen_unix(unix, Role::Client)?;
        }
        match admin.write_pending_purge() {
            Ok(true) => tracing::info!("dropped retired keys' private material from the key store"),
            Ok(false) => {}
            // Memory holds none already; the next change rewrites the store.
            Err(e) => tracing::warn!(error = %e, "could not drop retired keys' private material from the key store"),
        }
        if let Some(fleet) = admin.broker().fleet() {
            // The fleet's newest key set before the first request; then its notices.
            admin.catch_up_all().await;
            let mut notices = fleet.notices();
            let listener = admin.clone();
            tokio::spawn(async move {
                while let Some(notice) = notices.recv().await {
                    listener.on_notice(notice).await;
                }
            });
            tracing::info!(
                redis = %fleet.server(),
                namespace = fleet.namespace(),
                state = fleet.state(),
                "sharing tokens, invalidations and key sets with the fleet through Redis"
            );
        }
        let admin_role = Role::Admin(admin, AdminRules(config.admin.rules.clone()));
        if let Some(addr) = config.server.admin_listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (admin): {e}"))?;
            // The bound address (port 0 picks one).
            let bound = listener.local_addr().unwrap_or(addr);
            tracing::info!(listen = %bound, tls = admin_tls.is_some(), "serving the admin RPC");
            let listener = match admin_tls {
                Some(tls) => Listener::Tls(listener, admin_auth, tls),
                None => Listener::Tcp(listener, admin_auth),
            };
            runtime = runtime.listen(listener, admin_role.clone());
        }
        if let Some(unix) = &config.server.admin_unix_socket {
            runtime = runtime.listen_unix(unix, admin_role)?;
        }
        for app in runtime.broker().into_iter().flat_map(|b| b.apps()) {
            tracing::info!(app = %app.name, auth = %app.auth_summary(), "app loaded");
        }
        if config.server.allow_anonymous {
            tracing::warn!(
                "anonymous callers are allowed ([server] allow_anonymous = true): any process that reaches the listener gets tokens"
            );
        }
        let accepted: Vec<&str> = config.accepted().into_iter().map(Mechanism::name).collect();
        tracing::info!(
            listen = %bound,
            tls = config.server.tls.is_some(),
            // A plain string (a JSON log line holds no JSON inside a string).
            accept = accepted.join(","),
            "serving gRPC"
        );
        if config.policy.file.is_none() {
            tracing::warn!("no [policy] file is configured: every request will be denied");
        }
        // The configured caps must fit the process's open-files limit
        // (`dev`, the tests and the benchmark keep the defaults as they are).
        let listeners = runtime.endpoints.len();
        fit_to_open_files(&mut runtime.options.connections, listeners);
        if let Some(addr) = config.server.metrics_listen {
            runtime = runtime.serve_metrics_at(addr).await?;
        }
        Ok(runtime)
    }
}

/// Everything `edge` builds from its config before it binds a port: the
/// central broker's client (TLS files read, the pod's credential read, the
/// endpoints resolved), the local callers' authenticator, the audit sink.
#[derive(Debug)]
pub struct PreparedEdge {
    /// The edge.
    pub edge: Arc<Edge>,
    auth: Authenticator,
    tls: Option<ServerTls>,
    audit: Arc<AuditSink>,
}

impl PreparedEdge {
    /// Builds the parts `config` names. Errors name the setting and the file.
    pub async fn from_config(config: &EdgeConfig, clock: SharedClock) -> Result<Self, ConfigError> {
        let central = Central::new(central_settings(config)?, clock.clone())
            .await
            .map_err(|problem| ConfigError::new("central", problem))?;
        let edge = Arc::new(Edge::new(central, clock, config.cache.policy()));
        let auth = tcp_authenticator(&config.server, &config.auth).await?;
        let tls = listener_tls(&config.server, &config.auth)?;
        let audit = Arc::new(open_audit(&config.audit)?);
        Ok(Self { edge, auth, tls, audit })
    }

    /// Binds the local listeners (loopback TCP when `[server] listen` is
    /// given, the Unix socket, metrics) and returns the runtime that serves
    /// them. An error names the address that could not be bound.
    pub async fn bind(self, config: &EdgeConfig, hangups: Option<Signal>) -> Result<Runtime, String> {
        let mut runtime = Runtime::edge(self.edge.clone(), self.audit)
            .with_options(serve_options(&config.server))
            .watch_policy(None, hangups);
        if config.listens_on_tcp() {
            let addr = config.server.listen;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let bound = listener.local_addr().unwrap_or(addr);
            tracing::info!(listen = %bound, tls = self.tls.is_some(), "edge: serving gRPC on loopback");
            runtime = runtime.listen(
                match self.tls {
                    Some(tls) => Listener::Tls(listener, self.auth, tls),
                    None => Listener::Tcp(listener, self.auth),
                },
                Role::Client,
            );
        }
        if let Some(unix) = &config.server.unix_socket {
            runtime = runtime.listen_unix(unix, Role::Client)?;
        }
        let listeners = runtime.endpoints.len();
        fit_to_open_files(&mut runtime.options.connections, listeners);
        if let Some(addr) = config.server.metrics_listen {
            runtime = runtime.serve_metrics_at(addr).await?;
        }
        runtime.resolver = Some(self.edge.central().spawn_resolver());
        tracing::info!(
            central = config.central.endpoints.join(","),
            credential = central_credential_name(config),
            "edge: tokens come from the central broker; no Box credential is held here"
        );
        Ok(runtime)
    }
}

/// What the edge presents upstream, for the startup log.
fn central_credential_name(config: &EdgeConfig) -> &'static str {
    let central = &config.central;
    match (&central.token_file, &central.api_key_file, &central.cert_file) {
        (Some(_), _, Some(_)) => "service-account token + client certificate",
        (Some(_), _, None) => "service-account token",
        (_, Some(_), Some(_)) => "API key + client certificate",
        (_, Some(_), None) => "API key",
        (None, None, Some(_)) => "client certificate",
        (None, None, None) => "none (the central broker must admit anonymous callers)",
    }
}

/// The central broker's client settings: files read and checked here.
fn central_settings(config: &EdgeConfig) -> Result<CentralSettings, ConfigError> {
    let central = &config.central;
    let read = |setting: &str, path: &Path| {
        std::fs::read(path).map_err(|e| {
            ConfigError::new(
                format!("central.{setting}"),
                format!("{}: cannot read: {e}", path.display()),
            )
        })
    };
    let tls = match &central.ca_file {
        Some(ca) => Some(CentralTls {
            ca_pem: read("ca_file", ca)?,
            identity: match (&central.cert_file, &central.key_file) {
                (Some(cert), Some(key)) => Some((
                    read("cert_file", cert)?,
                    zeroize::Zeroizing::new(read("key_file", key)?),
                )),
                _ => None,
            },
            server_name: central.server_name.clone(),
        }),
        None => None,
    };
    if let Some(tls) = &tls {
        tls.check().map_err(|(setting, problem)| {
            let file = match setting {
                "cert_file" => central.cert_file.as_ref(),
                "key_file" => central.key_file.as_ref(),
                _ => central.ca_file.as_ref(),
            };
            let file = file.map_or_else(String::new, |f| format!("{}: ", f.display()));
            ConfigError::new(format!("central.{setting}"), format!("{file}{problem}"))
        })?;
    }
    let credential = match (&central.token_file, &central.api_key_file) {
        (Some(file), _) => Credential::ServiceAccountToken(
            SecretFile::open(file).map_err(|p| ConfigError::new("central.token_file", p))?,
        ),
        (None, Some(file)) => {
            refuse_world_readable("central.api_key_file", file)?;
            Credential::ApiKey(SecretFile::open(file).map_err(|p| ConfigError::new("central.api_key_file", p))?)
        }
        (None, None) => Credential::Connection,
    };
    if central.endpoints().iter().any(|e| !e.https && !e.is_loopback()) {
        tracing::warn!(
            "a [central] endpoint is http://: the pod's credential and its tokens cross the network unencrypted unless a mesh encrypts them"
        );
    }
    Ok(CentralSettings {
        endpoints: central.endpoints(),
        tls,
        credential,
        policy: config.upstream.policy(),
        resolve_interval: central.resolve_interval(),
    })
}

/// The client listener's TLS, when `[server.tls]` is configured: the files
/// read and checked; a client certificate optional when the listener also
/// accepts other credentials.
pub fn client_tls(config: &Config) -> Result<Option<ServerTls>, ConfigError> {
    listener_tls(&config.server, &config.auth)
}

fn listener_tls(server: &ServerConfig, auth: &AuthConfig) -> Result<Option<ServerTls>, ConfigError> {
    let certificate_optional = server.accepted(auth).len() > 1;
    server
        .tls
        .as_ref()
        .map(|tls| server_tls(tls, "server.tls", certificate_optional))
        .transpose()
}

/// The (device, inode) of the file at `path`, not following a symlink.
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Binds a Unix socket at `path`, replacing a stale socket file (never any
/// other file), and gives it `mode` when one is set.
fn bind_unix(path: &Path, mode: Option<u32>) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    // Until this chmod the socket has the umask's mode: with the usual 022,
    // stricter than any mode that lets another user connect.
    if let Some(mode) = mode
        && let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(listener)
}

/// Descriptors kept free of connections, for Box, files and the metrics listener.
const RESERVED_FILES: u64 = 256;

/// Lowers each listener's connection cap so that all of them together fit
/// under the open-files limit (less [`RESERVED_FILES`]), saying so: a cap
/// the process cannot reach would leave `accept` failing instead.
fn fit_to_open_files(limits: &mut ConnectionLimits, listeners: usize) {
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

/// Loads every app's credentials (reading and decrypting key files) and
/// builds the broker, with the budget `[server]` sets. Errors name the
/// file and the problem.
pub fn build_broker(config: &Config, clock: SharedClock) -> Result<Broker, ConfigError> {
    let mut apps = Vec::with_capacity(config.apps.len());
    for (name, app) in &config.apps {
        let credentials = app
            .sources()
            .load(name)
            .map_err(|e| ConfigError::new(format!("apps.{name}"), e.to_string()))?;
        let client = BoxClient::new(&app.api_base_url, clock.clone())
            .map_err(|e| ConfigError::new(format!("apps.{name}"), e.to_string()))?
            .with_policy(config.upstream.policy());
        let mut built = App::new(name.as_str(), &credentials, client);
        if let Some(roles) = &app.refused_roles {
            built = built.with_refused_roles(roles.clone());
        }
        apps.push(built);
    }
    let policy = match &config.policy.file {
        Some(file) => Policy::load(file).map_err(|e| ConfigError::new("policy.file", e.to_string()))?,
        None => Policy::default(),
    };
    Ok(Broker::new(apps, clock, config.cache.policy(), policy)
        .with_budget(upstream_budget(&config.server))
        .with_users(config.users.policy(&config.cache)))
}

/// The TCP listener's caller authenticator: the mechanisms of
/// [`crate::config::Settings::accepted`]. This loads the Kubernetes JWKS (reading the file
/// or fetching the URL) when that mechanism is accepted.
pub async fn authenticator(config: &Config) -> Result<Authenticator, ConfigError> {
    tcp_authenticator(&config.server, &config.auth).await
}

async fn tcp_authenticator(server: &ServerConfig, auth: &AuthConfig) -> Result<Authenticator, ConfigError> {
    let accepted = server.accepted(auth);
    let mut authenticator = Authenticator::new(Anonymous::admitted_if(server.allow_anonymous));
    if accepted.contains(&Mechanism::ClientCertificate) {
        authenticator = authenticator.with_mtls();
    }
    if accepted.contains(&Mechanism::ApiKey) {
        authenticator = authenticator.with_api_keys(hashed("auth.api_keys", &auth.api_keys)?);
    }
    if let Some(k8s) = auth
        .kubernetes
        .as_ref()
        .filter(|_| accepted.contains(&Mechanism::Kubernetes))
    {
        let kubernetes = KubernetesAuth::new(k8s.clone())
            .await
            .map_err(|problem| ConfigError::new("auth.kubernetes", problem))?;
        authenticator = authenticator.with_kubernetes(Arc::new(kubernetes));
    }
    Ok(authenticator)
}

/// The admin listener's authenticator (API keys and/or client certificates).
pub fn admin_authenticator(config: &Config) -> Result<Authenticator, ConfigError> {
    let mut auth = Authenticator::new(Anonymous::Refused);
    if config.admin.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()) {
        auth = auth.with_mtls();
    }
    if !config.admin.api_keys.is_empty() {
        auth = auth.with_api_keys(hashed("admin.api_keys", &config.admin.api_keys)?);
    }
    Ok(auth)
}

/// How the server starts, stops and limits callers and connections.
pub(crate) fn serve_options(server: &ServerConfig) -> ServeOptions {
    let secs = Duration::from_secs;
    ServeOptions {
        drain_delay: secs(server.drain_delay_secs),
        grace_period: secs(server.grace_period_secs),
        max_message_bytes: server.max_message_bytes,
        rate_limit: (server.rate_limit_per_second > 0.0).then(|| {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a validated, finite, positive rate"
            )]
            let default_burst = (server.rate_limit_per_second.ceil() as u32).max(1);
            let burst = server.rate_limit_burst.unwrap_or(default_burst);
            (server.rate_limit_per_second, burst.max(1))
        }),
        failed_auth: (server.failed_auth_per_second, server.failed_auth_burst.max(1)),
        request_timeout: secs(server.request_timeout_secs),
        connections: ConnectionLimits {
            max_connections: server.max_connections,
            max_connections_per_peer: server.max_connections_per_peer,
            max_concurrent_streams: server.max_concurrent_streams,
            max_header_list_bytes: server.max_header_list_bytes,
            handshake_timeout: secs(server.handshake_timeout_secs),
            idle_timeout: secs(server.idle_timeout_secs),
            unauthenticated_idle_timeout: secs(server.unauthenticated_idle_timeout_secs),
            max_connection_age: (server.max_connection_age_secs > 0).then(|| secs(server.max_connection_age_secs)),
            keepalive_interval: (server.keepalive_interval_secs > 0).then(|| secs(server.keepalive_interval_secs)),
            keepalive_timeout: secs(server.keepalive_timeout_secs),
            max_local_reset_streams: server.max_local_reset_streams,
        },
        counters: Arc::default(),
        rpc_metrics: RpcMetrics::default(),
        readiness: Arc::default(),
    }
}

/// The broker's budget for requests that wait on Box.
pub(crate) fn upstream_budget(server: &ServerConfig) -> UpstreamBudget {
    UpstreamBudget::new(
        server.max_concurrent_requests,
        server.max_concurrent_requests_per_caller,
    )
}

/// Reads and checks the files (certificates and key parsed, the key
/// matched to the certificate, the CA usable); errors name `section`
/// and the file. `certificate_optional` lets callers without a client
/// certificate through the handshake (to authenticate another way).
pub(crate) fn server_tls(tls: &TlsConfig, section: &str, certificate_optional: bool) -> Result<ServerTls, ConfigError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| ConfigError::new(section, format!("{}: cannot read: {e}", path.display())))
    };
    let cert = read(&tls.cert_file)?;
    let key = zeroize::Zeroizing::new(read(&tls.key_file)?);
    let ca = tls.client_ca_file.as_deref().map(read).transpose()?;
    let requirement = if certificate_optional {
        ClientCertificates::Optional
    } else {
        ClientCertificates::Required
    };
    ServerTls::from_pem(&cert, &key, ca.as_deref().map(|ca| (ca, requirement))).map_err(|e| {
        let file = match e.part {
            "the certificate chain" => &tls.cert_file,
            "the client CA" => tls.client_ca_file.as_ref().unwrap_or(&tls.cert_file),
            _ => &tls.key_file,
        };
        ConfigError::new(section, format!("{}: {}: {}", file.display(), e.part, e.problem))
    })
}

/// Opens the sink (a file is created if missing; its directory must exist).
pub(crate) fn open_audit(audit: &AuditConfig) -> Result<AuditSink, ConfigError> {
    let window = Some(Duration::from_secs(audit.repeat_window_secs));
    let sink = match audit.sink.as_str() {
        "stdout" => {
            AuditSink::stdout().map_err(|e| ConfigError::new("audit.sink", format!("stdout: cannot be used: {e}")))
        }
        "stderr" => {
            AuditSink::stderr().map_err(|e| ConfigError::new("audit.sink", format!("stderr: cannot be used: {e}")))
        }
        path => AuditSink::file(Path::new(path))
            .map_err(|e| ConfigError::new("audit.sink", format!("{path}: cannot open: {e}"))),
    }?;
    Ok(sink.with_repeat_window(window))
}

/// The first line of the password file `file` (setting `setting`), which
/// nobody but the broker's user and group may read.
fn read_password(setting: &str, file: Option<&Path>) -> Result<Option<secrecy::SecretString>, ConfigError> {
    let Some(file) = file else {
        return Ok(None);
    };
    refuse_world_readable(setting, file)?;
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(file)
            .map_err(|e| ConfigError::new(setting, format!("{}: cannot read: {e}", file.display())))?,
    );
    let first = text.lines().next().unwrap_or_default().trim();
    if first.is_empty() {
        return Err(ConfigError::new(
            setting,
            format!("{}: is empty (the password is its first line)", file.display()),
        ));
    }
    Ok(Some(secrecy::SecretString::from(first)))
}

/// The fleet's Redis as `[redis]` says (files read; no connection yet),
/// sealing with keys derived from `store`'s KEK. Errors name the setting
/// and the file, never a password.
pub(crate) fn open_redis(
    redis: &RedisConfig,
    config: &Config,
    store: &KeyStore,
) -> Result<crate::l2::Redis, ConfigError> {
    let password = read_password("redis.password_file", redis.password_file.as_deref())?;
    let ca_pem = redis
        .ca_file
        .as_ref()
        .map(|file| {
            std::fs::read(file)
                .map_err(|e| ConfigError::new("redis.ca_file", format!("{}: cannot read: {e}", file.display())))
        })
        .transpose()?;
    let deadline = Duration::from_millis(config.upstream.deadline_ms);
    let server = match (&redis.url, &redis.master_name) {
        (Some(url), _) => crate::l2::Server::Url(url.clone()),
        (None, Some(master_name)) => crate::l2::Server::Sentinel(crate::l2::SentinelSettings {
            addresses: redis.sentinels.clone(),
            master_name: master_name.clone(),
            username: redis.sentinel_username.clone(),
            password: read_password("redis.sentinel_password_file", redis.sentinel_password_file.as_deref())?,
        }),
        (None, None) => return Err(ConfigError::new("redis", "needs url or sentinels + master_name")),
    };
    let settings = crate::l2::Settings {
        server,
        ca_pem,
        username: redis.username.clone(),
        password,
        namespace: redis.namespace.clone(),
        connect_timeout: Duration::from_millis(redis.connect_timeout_ms),
        command_timeout: Duration::from_millis(redis.command_timeout_ms),
        // Bounded by the mint deadline: a holder that died is replaced soon after.
        lease_ttl: deadline + Duration::from_secs(1),
        poll_interval: Duration::from_millis(redis.poll_interval_ms),
        share_enterprise_tokens: redis.share_enterprise_tokens,
        breaker_threshold: redis.breaker_threshold,
        breaker_cooldown: Duration::from_secs(redis.breaker_cooldown_secs),
        safety_margin: config.cache.policy().safety_margin,
    };
    crate::l2::Redis::new(settings, store.kek()).map_err(|e| ConfigError::new("redis", e.0))
}

/// Reads the KEK and opens the store (without loading it). `env` looks up
/// `kek_env`. Errors name the file or variable, never the key.
pub(crate) fn open_key_store(
    store: &KeystoreConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<KeyStore, ConfigError> {
    let text =
        match (&store.kek_file, &store.kek_env) {
            (Some(file), None) => {
                refuse_world_readable("keystore.kek_file", file)?;
                zeroize::Zeroizing::new(std::fs::read_to_string(file).map_err(|e| {
                    ConfigError::new("keystore.kek_file", format!("{}: cannot read: {e}", file.display()))
                })?)
            }
            (None, Some(var)) => zeroize::Zeroizing::new(env(var).ok_or_else(|| {
                ConfigError::new("keystore.kek_env", format!("the environment variable {var} is not set"))
            })?),
            _ => {
                return Err(ConfigError::new(
                    "keystore",
                    "set exactly one of kek_file and kek_env (the key-encryption key)",
                ));
            }
        };
    let kek = Kek::parse(&text).map_err(|problem| {
        let source = store.kek_file.as_ref().map_or_else(
            || store.kek_env.clone().unwrap_or_default(),
            |f| f.display().to_string(),
        );
        ConfigError::new("keystore", format!("{source}: {problem}"))
    })?;
    Ok(KeyStore::new(store.path.clone(), kek))
}

/// Refuses a secret file that users other than its owner and group may
/// read or write (a Kubernetes Secret volume's default mode, 0644, is one:
/// set `defaultMode: 0400`, or 0440 with an `fsGroup`).
fn refuse_world_readable(section: &str, file: &Path) -> Result<(), ConfigError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(file)
            .map_err(|e| ConfigError::new(section, format!("{}: cannot read: {e}", file.display())))?
            .permissions()
            .mode();
        if mode & 0o007 != 0 {
            return Err(ConfigError::new(
                section,
                format!(
                    "{}: other users may read or write it (mode {:04o}); make it owner-only: chmod 0400 (or 0440 for a group)",
                    file.display(),
                    mode & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

/// Each key's identity and SHA-256, a `sha256_file` read now. An error
/// names the identity and the file, never what the file holds.
fn hashed(section: &str, keys: &[ApiKeyConfig]) -> Result<Vec<(String, [u8; 32])>, ConfigError> {
    keys.iter()
        .map(|k| {
            let hash = match (&k.sha256, &k.sha256_file) {
                (Some(hex), _) => ApiKeyConfig::parse_sha256(hex),
                (None, Some(file)) => {
                    let text = std::fs::read_to_string(file).map_err(|e| {
                        ConfigError::new(
                            section,
                            format!("{:?}: {}: cannot read: {e}", k.identity, file.display()),
                        )
                    })?;
                    ApiKeyConfig::parse_sha256(&text)
                }
                (None, None) => None,
            };
            let hash = hash.ok_or_else(|| {
                let source = k
                    .sha256_file
                    .as_ref()
                    .map_or_else(|| "sha256".to_owned(), |f| format!("sha256_file {}", f.display()));
                ConfigError::new(
                    section,
                    format!(
                        "{:?}: {source} must be 64 hex characters (printf %s \"$KEY\" | sha256sum)",
                        k.identity
                    ),
                )
            })?;
            Ok((k.identity.clone(), hash))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    #[test]
    fn the_keystore_needs_exactly_one_kek_source_and_never_echoes_it() {
        let text = "[apps.default]\nbox_config_file = \"box_config.json\"\n[keystore]\npath = \"keys.json\"\nkek_env = \"MY_KEK\"\n";
        let c = Config::parse(text, Path::new("broker.toml"), std::iter::empty()).unwrap_or_else(|e| panic!("{e}"));
        let store = c.keystore.as_ref().unwrap_or_else(|| unreachable!());
        let e = open_key_store(store, |_| None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(e, "keystore.kek_env: the environment variable MY_KEK is not set");
        let e = open_key_store(store, |_| Some("short-secret-value".to_owned()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.starts_with("keystore: MY_KEK: the key-encryption key must be 32 bytes"),
            "{e}"
        );
        assert!(!e.contains("short-secret-value"), "{e}");
        assert!(open_key_store(store, |_| Some("ab".repeat(32))).is_ok());
        let both = KeystoreConfig {
            kek_file: Some(PathBuf::from("kek")),
            ..store.clone()
        };
        assert!(open_key_store(&both, |_| None).is_err());
    }
}
