//! One typed [`Config`], loaded from a TOML file plus `BOX_BROKER_*`
//! environment overrides, validated before any port is bound.
//!
//! Secrets are never inline: the TOML names files (Kubernetes Secret mounts).
//! Relative paths are resolved against the config file's directory. Every
//! error is one line naming the file (or variable) and the problem.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Deserializer};

use crate::{
    audit::AuditSink,
    auth::{
        Authenticator,
        kubernetes::{KubernetesAuth, KubernetesConfig},
    },
    boxapi::{
        BoxClient, CredentialSources, JwtAlgorithm,
        client::{DEFAULT_API_BASE_URL, UpstreamPolicy},
    },
    broker::{App, Broker, UpstreamBudget},
    cache::{CachePolicy, DEFAULT_MAX_ENTRIES, DEFAULT_REFRESH_AHEAD, DEFAULT_SAFETY_MARGIN, MIN_SAFETY_MARGIN},
    clock::SharedClock,
    duration::{de_millis, de_secs},
    policy::Policy,
    service::{ClientCertificates, ConnectionLimits, ServerTls},
};

/// The prefix of environment overrides: `BOX_BROKER_SERVER__LISTEN` sets
/// `[server] listen`; `BOX_BROKER_APPS__DEFAULT__API_BASE_URL` sets
/// `[apps.default] api_base_url`. Sections are separated by `__`.
pub const ENV_PREFIX: &str = "BOX_BROKER_";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners.
    #[serde(default)]
    pub server: ServerConfig,
    /// Token cache tuning.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The Box apps, by name.
    #[serde(default)]
    pub apps: BTreeMap<String, AppConfig>,
    /// Who may get what.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// How callers prove who they are.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Where audit records go.
    #[serde(default)]
    pub audit: AuditConfig,
    /// The admin RPC's callers and rules.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The durable, encrypted store of keys and secrets added through the admin RPC.
    #[serde(default)]
    pub keystore: Option<KeystoreConfig>,
    /// Retries, deadlines and the circuit breaker for calls to Box.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// `BOX_BROKER_*` variables that are not overrides (no `__`), for a
    /// warning when one looks like a mistyped override.
    #[serde(skip)]
    pub other_env: Vec<String>,
}

/// The config's sections, as override names spell them.
const SECTIONS: &[&str] = &[
    "SERVER", "CACHE", "LOG", "APPS", "POLICY", "AUTH", "AUDIT", "ADMIN", "KEYSTORE", "UPSTREAM",
];

/// `BOX_BROKER_*` variables the broker's commands read that are not
/// config overrides.
const NOT_OVERRIDES: &[&str] = &[
    "BOX_BROKER_ADMIN_KEY",
    "BOX_BROKER_API_KEY",
    "BOX_BROKER_GIT_COMMIT",
    // The `kek_env` the README suggests.
    "BOX_BROKER_KEK",
];

/// `[upstream]`: how token requests to Box are retried and cut off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Attempts per token request, the first included (429, 5xx and
    /// connection failures are retried; other refusals never).
    pub max_attempts: u32,
    /// First backoff ceiling in ms; doubles per retry, with full jitter.
    #[serde(deserialize_with = "de_millis")]
    pub backoff_base_ms: u64,
    /// Largest backoff ceiling in ms.
    #[serde(deserialize_with = "de_millis")]
    pub backoff_cap_ms: u64,
    /// One attempt's time limit in ms.
    #[serde(deserialize_with = "de_millis")]
    pub attempt_timeout_ms: u64,
    /// The whole request's time limit in ms, retries included.
    #[serde(deserialize_with = "de_millis")]
    pub deadline_ms: u64,
    /// Failed requests in a row that open the circuit.
    pub breaker_threshold: u32,
    /// Seconds an open circuit refuses at once (or Box's Retry-After, if longer).
    #[serde(deserialize_with = "de_secs")]
    pub breaker_cooldown_secs: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        let p = UpstreamPolicy::default();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            max_attempts: p.max_attempts,
            backoff_base_ms: ms(p.backoff_base),
            backoff_cap_ms: ms(p.backoff_cap),
            attempt_timeout_ms: ms(p.attempt_timeout),
            deadline_ms: ms(p.deadline),
            breaker_threshold: p.breaker_threshold,
            breaker_cooldown_secs: p.breaker_cooldown.as_secs(),
        }
    }
}

impl UpstreamConfig {
    /// The policy these settings describe.
    pub fn policy(&self) -> UpstreamPolicy {
        UpstreamPolicy {
            max_attempts: self.max_attempts,
            backoff_base: Duration::from_millis(self.backoff_base_ms),
            backoff_cap: Duration::from_millis(self.backoff_cap_ms),
            attempt_timeout: Duration::from_millis(self.attempt_timeout_ms),
            deadline: Duration::from_millis(self.deadline_ms),
            breaker_threshold: self.breaker_threshold,
            breaker_cooldown: Duration::from_secs(self.breaker_cooldown_secs),
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 || self.breaker_threshold == 0 {
            return Err("upstream.max_attempts and upstream.breaker_threshold must be at least 1".to_owned());
        }
        if self.attempt_timeout_ms == 0 || self.deadline_ms < self.attempt_timeout_ms {
            return Err(
                "upstream.deadline_ms must be at least upstream.attempt_timeout_ms, which must be above 0".to_owned(),
            );
        }
        if self.backoff_cap_ms < self.backoff_base_ms {
            return Err("upstream.backoff_cap_ms must be at least upstream.backoff_base_ms".to_owned());
        }
        let hour_ms = 3_600_000;
        for (name, value) in [
            ("attempt_timeout_ms", self.attempt_timeout_ms),
            ("deadline_ms", self.deadline_ms),
            ("backoff_base_ms", self.backoff_base_ms),
            ("backoff_cap_ms", self.backoff_cap_ms),
        ] {
            if value > hour_ms {
                return Err(format!("upstream.{name} must be at most {hour_ms} (an hour)"));
            }
        }
        if self.max_attempts > 20 || self.breaker_cooldown_secs > 86_400 {
            return Err(
                "upstream.max_attempts must be at most 20 and upstream.breaker_cooldown_secs at most 86400".to_owned(),
            );
        }
        Ok(())
    }
}

/// `[admin]`: who may call the admin RPC (on `[server] admin_listen` or
/// `[server.admin_unix_socket]`), and what.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin API keys (`x-api-key`), by SHA-256 only.
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    /// TLS on `admin_listen`; with `client_ca_file`, client certificates are admin identities.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Which admin identity may call which RPC. Deny by default.
    #[serde(default)]
    pub rules: Vec<crate::admin::AdminRule>,
}

/// `[keystore]`: where keys added through the admin RPC are kept, encrypted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeystoreConfig {
    /// The store file (created on the first change; its directory must exist).
    pub path: PathBuf,
    /// A file holding the key-encryption key: 32 random bytes as base64
    /// (`head -c 32 /dev/urandom | base64`).
    #[serde(default)]
    pub kek_file: Option<PathBuf>,
    /// Or the name of an environment variable holding it.
    #[serde(default)]
    pub kek_env: Option<String>,
}

impl KeystoreConfig {
    /// Reads the KEK and opens the store (without loading it). `env` looks up
    /// `kek_env`. Errors name the file or variable, never the key.
    pub fn open(&self, env: impl Fn(&str) -> Option<String>) -> Result<crate::keys::store::KeyStore, ConfigError> {
        use crate::keys::store::{Kek, KeyStore};
        let text = match (&self.kek_file, &self.kek_env) {
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
            let source = self
                .kek_file
                .as_ref()
                .map_or_else(|| self.kek_env.clone().unwrap_or_default(), |f| f.display().to_string());
            ConfigError::new("keystore", format!("{source}: {problem}"))
        })?;
        Ok(KeyStore::new(self.path.clone(), kek))
    }
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

/// `[audit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// `stdout`, `stderr`, or a file path to append JSON lines to.
    #[serde(default = "default_audit_sink")]
    pub sink: String,
    /// Seconds identical refusals are counted instead of written one by one (0: write each).
    #[serde(default = "default_repeat_window")]
    #[serde(deserialize_with = "de_secs")]
    pub repeat_window_secs: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            sink: default_audit_sink(),
            repeat_window_secs: default_repeat_window(),
        }
    }
}

fn default_repeat_window() -> u64 {
    crate::audit::DEFAULT_REPEAT_WINDOW.as_secs()
}

fn default_audit_sink() -> String {
    "stdout".to_owned()
}

impl AuditConfig {
    /// Opens the sink (a file is created if missing; its directory must exist).
    pub fn open(&self) -> Result<AuditSink, ConfigError> {
        if self.repeat_window_secs > 3600 {
            return Err(ConfigError::new(
                "audit.repeat_window_secs",
                "must be at most 3600 (seconds)",
            ));
        }
        let window = Some(Duration::from_secs(self.repeat_window_secs));
        let sink =
            match self.sink.as_str() {
                "stdout" => AuditSink::stdout()
                    .map_err(|e| ConfigError::new("audit.sink", format!("stdout: cannot be used: {e}"))),
                "stderr" => AuditSink::stderr()
                    .map_err(|e| ConfigError::new("audit.sink", format!("stderr: cannot be used: {e}"))),
                path => AuditSink::file(Path::new(path))
                    .map_err(|e| ConfigError::new("audit.sink", format!("{path}: cannot open: {e}"))),
            }?;
        Ok(sink.with_repeat_window(window))
    }
}

/// `[policy]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The policy file (TOML, see examples/policies/). Without one every
    /// request is denied.
    pub file: Option<PathBuf>,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Static API keys, sent as the `x-api-key` header. Only their SHA-256 is configured.
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    /// Kubernetes projected service-account tokens.
    pub kubernetes: Option<KubernetesConfig>,
}

/// `[[auth.api_keys]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The caller identity the key proves (what policy rules name).
    pub identity: String,
    /// Lowercase hex SHA-256 of the key: `printf %s "$KEY" | sha256sum`.
    pub sha256: String,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The gRPC listen address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Admit callers that present no credentials. For development only.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// A Unix socket listener for sidecar mode, with its own caller identity.
    #[serde(default)]
    pub unix_socket: Option<UnixSocketConfig>,
    /// Serve TLS on `listen`; with `client_ca_file`, client certificates are identities (mTLS).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// How callers on `listen` may prove who they are. Default: a client
    /// certificate alone when `[server.tls] client_ca_file` is set, otherwise
    /// every mechanism configured under `[auth]`. (The Unix socket listener
    /// has its own: the peer.)
    #[serde(default)]
    pub accept: Option<Vec<Mechanism>>,
    /// The admin RPC's TCP listen address (never the same listener as `listen`).
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// The admin RPC on a Unix socket: every peer is its `identity`, if its uid is allowed.
    #[serde(default)]
    pub admin_unix_socket: Option<UnixSocketConfig>,
    /// After SIGTERM/SIGINT, seconds requests are still served while health
    /// already says NOT_SERVING (give load balancers time to notice; 5 suits Kubernetes).
    #[serde(default)]
    #[serde(deserialize_with = "de_secs")]
    pub drain_delay_secs: u64,
    /// Then seconds in-flight requests get to finish.
    #[serde(default = "default_grace")]
    #[serde(deserialize_with = "de_secs")]
    pub grace_period_secs: u64,
    /// The largest request message accepted, in bytes.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Requests waiting on Box at once, over all callers (cache hits never count).
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_requests: usize,
    /// Requests waiting on Box at once, per caller identity.
    #[serde(default = "default_max_concurrent_per_caller")]
    pub max_concurrent_requests_per_caller: usize,
    /// The longest a request may take, in seconds (a caller's deadline may be shorter).
    #[serde(default = "default_request_timeout")]
    #[serde(deserialize_with = "de_secs")]
    pub request_timeout_secs: u64,
    /// Connections open at once on each listener; more are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections open at once on a listener from one TCP peer address (0: no limit).
    #[serde(default = "default_max_connections_per_peer")]
    pub max_connections_per_peer: usize,
    /// Requests in progress on one HTTP/2 connection.
    #[serde(default = "default_max_streams")]
    pub max_concurrent_streams: u32,
    /// The largest request header block, in bytes.
    #[serde(default = "default_max_header_list")]
    pub max_header_list_bytes: u32,
    /// Seconds from accept until TLS and the HTTP/2 preface are done.
    #[serde(default = "default_handshake_timeout")]
    #[serde(deserialize_with = "de_secs")]
    pub handshake_timeout_secs: u64,
    /// Seconds a connection may stay without a request in progress before GOAWAY.
    #[serde(default = "default_idle_timeout")]
    #[serde(deserialize_with = "de_secs")]
    pub idle_timeout_secs: u64,
    /// The same, for a connection that has not carried an authenticated request yet.
    #[serde(default = "default_unauthenticated_idle_timeout")]
    #[serde(deserialize_with = "de_secs")]
    pub unauthenticated_idle_timeout_secs: u64,
    /// Seconds after which any connection gets GOAWAY (0: never).
    #[serde(default = "default_max_connection_age")]
    #[serde(deserialize_with = "de_secs")]
    pub max_connection_age_secs: u64,
    /// Seconds between HTTP/2 PINGs that find half-open connections (0: none).
    #[serde(default = "default_keepalive_interval")]
    #[serde(deserialize_with = "de_secs")]
    pub keepalive_interval_secs: u64,
    /// Seconds a PING may go unanswered before the connection is closed.
    #[serde(default = "default_keepalive_timeout")]
    #[serde(deserialize_with = "de_secs")]
    pub keepalive_timeout_secs: u64,
    /// Streams reset for a peer's protocol errors before the connection gets GOAWAY.
    #[serde(default = "default_max_local_reset_streams")]
    pub max_local_reset_streams: usize,
    /// Failed authentications per second a peer may have before its requests
    /// are refused without checking credentials.
    #[serde(default = "default_failed_auth_rate")]
    pub failed_auth_per_second: f64,
    /// The burst above that rate.
    #[serde(default = "default_failed_auth_burst")]
    pub failed_auth_burst: u32,
    /// Each caller's sustained request rate (0: no limit).
    #[serde(default)]
    pub rate_limit_per_second: f64,
    /// Each caller's burst above the rate (default: one second's worth, at least 1).
    #[serde(default)]
    pub rate_limit_burst: Option<u32>,
    /// The Prometheus metrics address (`GET /metrics`); none when unset.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
}

fn default_grace() -> u64 {
    20
}
fn default_max_message() -> usize {
    64 * 1024
}
fn default_max_concurrent() -> usize {
    1024
}
fn default_max_concurrent_per_caller() -> usize {
    64
}
fn default_request_timeout() -> u64 {
    30
}
fn default_max_connections() -> usize {
    ConnectionLimits::default().max_connections
}
fn default_max_connections_per_peer() -> usize {
    ConnectionLimits::default().max_connections_per_peer
}
fn default_max_streams() -> u32 {
    ConnectionLimits::default().max_concurrent_streams
}
fn default_max_header_list() -> u32 {
    ConnectionLimits::default().max_header_list_bytes
}
fn default_handshake_timeout() -> u64 {
    ConnectionLimits::default().handshake_timeout.as_secs()
}
fn default_idle_timeout() -> u64 {
    ConnectionLimits::default().idle_timeout.as_secs()
}
fn default_unauthenticated_idle_timeout() -> u64 {
    ConnectionLimits::default().unauthenticated_idle_timeout.as_secs()
}
fn default_max_connection_age() -> u64 {
    ConnectionLimits::default()
        .max_connection_age
        .map_or(0, |d| d.as_secs())
}
fn default_keepalive_interval() -> u64 {
    ConnectionLimits::default()
        .keepalive_interval
        .map_or(0, |d| d.as_secs())
}
fn default_keepalive_timeout() -> u64 {
    ConnectionLimits::default().keepalive_timeout.as_secs()
}
fn default_max_local_reset_streams() -> usize {
    ConnectionLimits::default().max_local_reset_streams
}
fn default_failed_auth_rate() -> f64 {
    10.0
}
fn default_failed_auth_burst() -> u32 {
    20
}

impl ServerConfig {
    /// How the server starts, stops and limits callers and connections.
    pub fn serve_options(&self) -> crate::service::ServeOptions {
        let secs = Duration::from_secs;
        crate::service::ServeOptions {
            drain_delay: secs(self.drain_delay_secs),
            grace_period: secs(self.grace_period_secs),
            max_message_bytes: self.max_message_bytes,
            rate_limit: (self.rate_limit_per_second > 0.0).then(|| {
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a validated, finite, positive rate"
                )]
                let default_burst = (self.rate_limit_per_second.ceil() as u32).max(1);
                let burst = self.rate_limit_burst.unwrap_or(default_burst);
                (self.rate_limit_per_second, burst.max(1))
            }),
            failed_auth: (self.failed_auth_per_second, self.failed_auth_burst.max(1)),
            request_timeout: secs(self.request_timeout_secs),
            connections: ConnectionLimits {
                max_connections: self.max_connections,
                max_connections_per_peer: self.max_connections_per_peer,
                max_concurrent_streams: self.max_concurrent_streams,
                max_header_list_bytes: self.max_header_list_bytes,
                handshake_timeout: secs(self.handshake_timeout_secs),
                idle_timeout: secs(self.idle_timeout_secs),
                unauthenticated_idle_timeout: secs(self.unauthenticated_idle_timeout_secs),
                max_connection_age: (self.max_connection_age_secs > 0).then(|| secs(self.max_connection_age_secs)),
                keepalive_interval: (self.keepalive_interval_secs > 0).then(|| secs(self.keepalive_interval_secs)),
                keepalive_timeout: secs(self.keepalive_timeout_secs),
                max_local_reset_streams: self.max_local_reset_streams,
            },
            counters: Arc::default(),
            rpc_metrics: crate::metrics::RpcMetrics::default(),
        }
    }

    /// The broker's budget for requests that wait on Box.
    pub fn upstream_budget(&self) -> UpstreamBudget {
        UpstreamBudget::new(self.max_concurrent_requests, self.max_concurrent_requests_per_caller)
    }

    fn validate(&self) -> Result<(), String> {
        if self.max_concurrent_requests == 0 || self.max_concurrent_requests_per_caller == 0 {
            return Err(
                "server.max_concurrent_requests and server.max_concurrent_requests_per_caller must be at least 1"
                    .to_owned(),
            );
        }
        if self.max_message_bytes < 1024 || self.max_message_bytes > 16 * 1024 * 1024 {
            return Err("server.max_message_bytes must be 1024 to 16777216".to_owned());
        }
        if !self.rate_limit_per_second.is_finite() || self.rate_limit_per_second < 0.0 {
            return Err("server.rate_limit_per_second must be 0 (no limit) or a positive number".to_owned());
        }
        if !self.failed_auth_per_second.is_finite() || self.failed_auth_per_second <= 0.0 {
            return Err("server.failed_auth_per_second must be a positive number".to_owned());
        }
        let day = 86_400;
        for (name, value, least) in [
            ("request_timeout_secs", self.request_timeout_secs, 1),
            ("handshake_timeout_secs", self.handshake_timeout_secs, 1),
            ("idle_timeout_secs", self.idle_timeout_secs, 1),
            (
                "unauthenticated_idle_timeout_secs",
                self.unauthenticated_idle_timeout_secs,
                1,
            ),
            ("keepalive_timeout_secs", self.keepalive_timeout_secs, 1),
            ("max_connection_age_secs", self.max_connection_age_secs, 0),
            ("keepalive_interval_secs", self.keepalive_interval_secs, 0),
            ("drain_delay_secs", self.drain_delay_secs, 0),
            ("grace_period_secs", self.grace_period_secs, 0),
        ] {
            if value < least || value > day {
                return Err(format!("server.{name} must be {least} to {day} (seconds)"));
            }
        }
        if self.max_connections == 0 || self.max_concurrent_streams == 0 || self.max_local_reset_streams == 0 {
            return Err(
                "server.max_connections, server.max_concurrent_streams and server.max_local_reset_streams must be at least 1"
                    .to_owned(),
            );
        }
        if !(1024..=1024 * 1024).contains(&self.max_header_list_bytes) {
            return Err("server.max_header_list_bytes must be 1024 to 1048576".to_owned());
        }
        Ok(())
    }
}

/// A way for callers on the TCP listener to prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    /// An mTLS client certificate (`[server.tls] client_ca_file`).
    ClientCertificate,
    /// An `x-api-key` header (`[[auth.api_keys]]`).
    ApiKey,
    /// A Kubernetes service-account token (`[auth.kubernetes]`).
    Kubernetes,
}

/// `[server.tls]`: the broker's certificate and the CA its callers' certificates must chain to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server certificate chain (PEM).
    pub cert_file: PathBuf,
    /// The server's private key (PEM).
    pub key_file: PathBuf,
    /// The CA that signs callers' client certificates (PEM). Without it the
    /// listener serves TLS but takes no client certificates.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

impl TlsConfig {
    /// Reads and checks the files (certificates and key parsed, the key
    /// matched to the certificate, the CA usable); errors name `section`
    /// and the file. `certificate_optional` lets callers without a client
    /// certificate through the handshake (to authenticate another way).
    pub fn load(&self, section: &str, certificate_optional: bool) -> Result<ServerTls, ConfigError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| ConfigError::new(section, format!("{}: cannot read: {e}", path.display())))
        };
        let cert = read(&self.cert_file)?;
        let key = zeroize::Zeroizing::new(read(&self.key_file)?);
        let ca = self.client_ca_file.as_deref().map(read).transpose()?;
        let requirement = if certificate_optional {
            ClientCertificates::Optional
        } else {
            ClientCertificates::Required
        };
        ServerTls::from_pem(&cert, &key, ca.as_deref().map(|ca| (ca, requirement))).map_err(|e| {
            let file = match e.part {
                "the certificate chain" => &self.cert_file,
                "the client CA" => self.client_ca_file.as_ref().unwrap_or(&self.cert_file),
                _ => &self.key_file,
            };
            ConfigError::new(section, format!("{}: {}: {}", file.display(), e.part, e.problem))
        })
    }
}

/// `[server.unix_socket]`: every peer is `identity`, if its uid is allowed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnixSocketConfig {
    /// The socket's path. A stale socket file there is replaced.
    pub path: PathBuf,
    /// The caller identity of every peer (what policy rules name).
    pub identity: String,
    /// Peer uids allowed to connect; empty means any (rely on file permissions).
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            allow_anonymous: false,
            unix_socket: None,
            tls: None,
            accept: None,
            admin_listen: None,
            admin_unix_socket: None,
            drain_delay_secs: 0,
            grace_period_secs: default_grace(),
            max_message_bytes: default_max_message(),
            max_concurrent_requests: default_max_concurrent(),
            max_concurrent_requests_per_caller: default_max_concurrent_per_caller(),
            request_timeout_secs: default_request_timeout(),
            max_connections: default_max_connections(),
            max_connections_per_peer: default_max_connections_per_peer(),
            max_concurrent_streams: default_max_streams(),
            max_header_list_bytes: default_max_header_list(),
            handshake_timeout_secs: default_handshake_timeout(),
            idle_timeout_secs: default_idle_timeout(),
            unauthenticated_idle_timeout_secs: default_unauthenticated_idle_timeout(),
            max_connection_age_secs: default_max_connection_age(),
            keepalive_interval_secs: default_keepalive_interval(),
            keepalive_timeout_secs: default_keepalive_timeout(),
            max_local_reset_streams: default_max_local_reset_streams(),
            failed_auth_per_second: default_failed_auth_rate(),
            failed_auth_burst: default_failed_auth_burst(),
            rate_limit_per_second: 0.0,
            rate_limit_burst: None,
            metrics_listen: None,
        }
    }
}

impl Config {
    /// The mechanisms the TCP listener accepts (`[server] accept`, or its default).
    pub fn accepted(&self) -> Vec<Mechanism> {
        if let Some(accept) = &self.server.accept {
            let mut accept = accept.clone();
            accept.sort();
            accept.dedup();
            return accept;
        }
        if self.server.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()) {
            return vec![Mechanism::ClientCertificate];
        }
        let mut accept = Vec::new();
        if !self.auth.api_keys.is_empty() {
            accept.push(Mechanism::ApiKey);
        }
        if self.auth.kubernetes.is_some() {
            accept.push(Mechanism::Kubernetes);
        }
        accept
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 50051))
}

impl Mechanism {
    /// The name used in the config.
    pub fn name(self) -> &'static str {
        match self {
            Self::ClientCertificate => "client_certificate",
            Self::ApiKey => "api_key",
            Self::Kubernetes => "kubernetes",
        }
    }
}

/// `[cache]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Bound on cached tokens.
    #[serde(default = "default_max_entries")]
    pub max_entries: u64,
    /// Seconds of life a served token keeps beyond the caller's `min_ttl` (at least 60).
    #[serde(default = "default_margin")]
    #[serde(deserialize_with = "de_secs")]
    pub safety_margin_secs: u64,
    /// Seconds before the margin begins that hits start a background refresh.
    #[serde(default = "default_refresh_ahead")]
    #[serde(deserialize_with = "de_secs")]
    pub refresh_ahead_secs: u64,
    /// Seconds a "no such user" (or unreachable target) answer from Box is
    /// remembered, so repeating the request does not ask Box again.
    #[serde(default = "default_unknown_subject_ttl")]
    #[serde(deserialize_with = "de_secs")]
    pub unknown_subject_ttl_secs: u64,
    /// A `force_refresh` is served a token minted this few seconds ago
    /// instead of another mint: at most one forced mint per key per interval.
    #[serde(default = "default_force_refresh_interval")]
    #[serde(deserialize_with = "de_secs")]
    pub force_refresh_interval_secs: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_entries: default_max_entries(),
            safety_margin_secs: default_margin(),
            refresh_ahead_secs: default_refresh_ahead(),
            unknown_subject_ttl_secs: default_unknown_subject_ttl(),
            force_refresh_interval_secs: default_force_refresh_interval(),
        }
    }
}

fn default_unknown_subject_ttl() -> u64 {
    crate::cache::DEFAULT_NEGATIVE_TTL.as_secs()
}
fn default_force_refresh_interval() -> u64 {
    crate::cache::DEFAULT_FORCE_REFRESH_INTERVAL.as_secs()
}

fn default_max_entries() -> u64 {
    DEFAULT_MAX_ENTRIES
}
fn default_margin() -> u64 {
    DEFAULT_SAFETY_MARGIN.as_secs()
}
fn default_refresh_ahead() -> u64 {
    DEFAULT_REFRESH_AHEAD.as_secs()
}

impl CacheConfig {
    /// The cache policy these settings describe.
    pub fn policy(&self) -> CachePolicy {
        CachePolicy {
            safety_margin: Duration::from_secs(self.safety_margin_secs),
            refresh_ahead: Duration::from_secs(self.refresh_ahead_secs),
            refresh_jitter: crate::cache::REFRESH_JITTER,
            max_entries: self.max_entries,
            negative_ttl: Duration::from_secs(self.unknown_subject_ttl_secs),
            force_refresh_interval: Duration::from_secs(self.force_refresh_interval_secs),
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.safety_margin_secs < MIN_SAFETY_MARGIN.as_secs() {
            return Err(format!(
                "cache.safety_margin_secs must be at least {}",
                MIN_SAFETY_MARGIN.as_secs()
            ));
        }
        if self.max_entries == 0 {
            return Err("cache.max_entries must be at least 1".to_owned());
        }
        for (name, value) in [
            ("safety_margin_secs", self.safety_margin_secs),
            ("refresh_ahead_secs", self.refresh_ahead_secs),
            ("unknown_subject_ttl_secs", self.unknown_subject_ttl_secs),
            ("force_refresh_interval_secs", self.force_refresh_interval_secs),
        ] {
            if value > 3600 {
                return Err(format!("cache.{name} must be at most 3600 (seconds)"));
            }
        }
        Ok(())
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `human` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `box_token_broker=debug`. `RUST_LOG` wins when set.
    #[serde(default = "default_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: default_level(),
        }
    }
}

fn default_level() -> String {
    "info".to_owned()
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people.
    #[default]
    Human,
    /// One JSON object per line, for collectors.
    Json,
}

/// `[apps.NAME]`: where one Box app's credentials come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// The JSON file the Box developer console downloads.
    pub box_config_file: Option<PathBuf>,
    /// Client id (overrides the JSON's).
    #[serde(default, deserialize_with = "string_or_number")]
    pub client_id: Option<String>,
    /// File holding the client secret (overrides the JSON's).
    pub client_secret_file: Option<PathBuf>,
    /// Enterprise id (overrides the JSON's).
    #[serde(default, deserialize_with = "string_or_number")]
    pub enterprise_id: Option<String>,
    /// The public key id Box assigned (overrides the JSON's).
    #[serde(default, deserialize_with = "string_or_number")]
    pub public_key_id: Option<String>,
    /// PEM private key file (overrides the JSON's).
    pub private_key_file: Option<PathBuf>,
    /// File holding the private key's passphrase (overrides the JSON's).
    pub private_key_passphrase_file: Option<PathBuf>,
    /// Where token requests go; `aud` stays `https://api.box.com/oauth2/token`.
    #[serde(default = "default_api_base_url")]
    pub api_base_url: String,
    /// `RS256` (default), `RS384` or `RS512`.
    #[serde(default)]
    pub jwt_algorithm: JwtAlgorithm,
}

fn default_api_base_url() -> String {
    DEFAULT_API_BASE_URL.to_owned()
}

/// Ids are strings, but a number (from TOML or an env override) is accepted.
fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        S(String),
        N(i64),
    }
    Ok(Option::<Id>::deserialize(d)?.map(|id| match id {
        Id::S(s) => s,
        Id::N(n) => n.to_string(),
    }))
}

/// A config problem: one line, naming where.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {problem}")]
pub struct ConfigError {
    /// The file, or the file plus the environment.
    pub source_name: String,
    /// What is wrong and how to fix it.
    pub problem: String,
}

impl ConfigError {
    fn new(source_name: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            source_name: source_name.into(),
            problem: problem.into(),
        }
    }
}

impl Config {
    /// Warnings for `BOX_BROKER_*` variables that are set but are neither
    /// overrides nor read by a command: most likely a mistyped override
    /// (`BOX_BROKER_SERVER_LISTEN` for `BOX_BROKER_SERVER__LISTEN`).
    pub fn stray_env_warnings(&self) -> Vec<String> {
        let kek_env = self.keystore.as_ref().and_then(|k| k.kek_env.as_deref());
        self.other_env
            .iter()
            .filter(|name| !NOT_OVERRIDES.contains(&name.as_str()) && Some(name.as_str()) != kek_env)
            .filter(|name| !name.starts_with("BOX_BROKER_TEST_"))
            .map(|name| {
                let rest = &name[ENV_PREFIX.len()..];
                let hint = SECTIONS
                    .iter()
                    .find_map(|section| {
                        let key = rest.strip_prefix(section)?.strip_prefix('_')?;
                        (!key.is_empty()).then(|| format!(": did you mean {ENV_PREFIX}{section}__{key}?"))
                    })
                    .unwrap_or_default();
                format!(
                    "{name} is set but is not a config override (those are {ENV_PREFIX}<SECTION>__<KEY>, \
                     with a double underscore), so it is ignored{hint}"
                )
            })
            .collect()
    }

    /// Loads `path`, applies `BOX_BROKER_*` overrides from `env`, and validates.
    /// Tests pass their own `env`; nothing reads the process environment here.
    pub fn load(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(&name, format!("cannot read: {e}")))?;
        Self::parse(&text, path, env)
    }

    /// [`Self::load`] of `text`, as if read from `path` (which names it in
    /// errors, and whose directory relative paths are resolved against).
    /// Reads no file.
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let text = text.to_owned();
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| ConfigError::new(&name, toml_problem(&e, &text)))?;
        let (overridden, other_env) = apply_env(&mut table, env)?;
        let source_name = if overridden.is_empty() {
            name
        } else {
            format!("{name} (with {})", overridden.join(", "))
        };
        let mut config: Self = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::new(&source_name, e.message().trim().replace('\n', " ")))?;
        config.other_env = other_env;
        let base = path.parent().unwrap_or(Path::new("."));
        for app in config.apps.values_mut() {
            app.resolve_paths(base);
        }
        if let Some(file) = &mut config.policy.file
            && file.is_relative()
        {
            *file = base.join(&*file);
        }
        for tls in [&mut config.server.tls, &mut config.admin.tls].into_iter().flatten() {
            for path in [&mut tls.cert_file, &mut tls.key_file]
                .into_iter()
                .chain(tls.client_ca_file.as_mut())
            {
                if path.is_relative() {
                    *path = base.join(&*path);
                }
            }
        }
        if let Some(k8s) = &mut config.auth.kubernetes {
            k8s.resolve_paths(base);
        }
        if let Some(store) = &mut config.keystore {
            for path in std::iter::once(&mut store.path).chain(store.kek_file.as_mut()) {
                if path.is_relative() {
                    *path = base.join(&*path);
                }
            }
        }
        config
            .validate()
            .map_err(|problem| ConfigError::new(&source_name, problem))?;
        Ok(config)
    }

    /// Checks what types cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.apps.is_empty() {
            return Err("no apps configured: add an [apps.default] section with box_config_file".to_owned());
        }
        for (name, app) in &self.apps {
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(format!("app name {name:?} must be 1 to 64 of a-z, 0-9, - and _"));
            }
            if app.box_config_file.is_none()
                && (app.client_id.is_none() || app.client_secret_file.is_none() || app.enterprise_id.is_none())
            {
                return Err(format!(
                    "apps.{name}: give box_config_file, or client_id, client_secret_file and enterprise_id (plus private_key_file and public_key_id for JWT)"
                ));
            }
        }
        self.validate_accept()?;
        self.validate_admin()?;
        self.upstream.validate()?;
        self.server.validate()?;
        self.cache.validate()?;
        validate_api_keys("auth.api_keys", &self.auth.api_keys)?;
        Ok(())
    }

    fn validate_admin(&self) -> Result<(), String> {
        validate_api_keys("admin.api_keys", &self.admin.api_keys)?;
        crate::admin::AdminRules(self.admin.rules.clone()).validate()?;
        let listening = self.server.admin_listen.is_some() || self.server.admin_unix_socket.is_some();
        if self.server.admin_listen.is_some() && self.server.admin_listen == Some(self.server.listen) {
            return Err(
                "server.admin_listen must differ from server.listen: the admin RPC never shares the client listener"
                    .to_owned(),
            );
        }
        if self.server.admin_listen.is_some()
            && self.admin.api_keys.is_empty()
            && self.admin.tls.as_ref().is_none_or(|t| t.client_ca_file.is_none())
        {
            return Err(
                "server.admin_listen needs admin credentials: [[admin.api_keys]], or [admin.tls] with client_ca_file"
                    .to_owned(),
            );
        }
        if listening && self.admin.rules.is_empty() {
            return Err("the admin listener is configured but [[admin.rules]] grants nothing: add a rule".to_owned());
        }
        Ok(())
    }

    /// The admin listener's authenticator (API keys and/or client certificates).
    pub fn admin_authenticator(&self) -> Authenticator {
        let mut auth = Authenticator::new(false);
        if self.admin.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()) {
            auth = auth.with_mtls();
        }
        if !self.admin.api_keys.is_empty() {
            auth = auth.with_api_keys(hashed(&self.admin.api_keys));
        }
        auth
    }
}

fn hashed(keys: &[ApiKeyConfig]) -> Vec<(String, [u8; 32])> {
    keys.iter()
        .filter_map(|k| {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(&k.sha256, &mut hash)
                .ok()
                .map(|()| (k.identity.clone(), hash))
        })
        .collect()
}

fn validate_api_keys(section: &str, keys: &[ApiKeyConfig]) -> Result<(), String> {
    let mut identities = std::collections::BTreeSet::new();
    for key in keys {
        if key.identity.is_empty() || !identities.insert(key.identity.as_str()) {
            return Err(format!(
                "{section}: identity {:?} must be non-empty and unique",
                key.identity
            ));
        }
        if key.sha256.len() != 64 || !key.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{section} {:?}: sha256 must be 64 hex characters (printf %s \"$KEY\" | sha256sum)",
                key.identity
            ));
        }
    }
    Ok(())
}

impl Config {
    fn validate_accept(&self) -> Result<(), String> {
        let accepted = self.accepted();
        let client_ca = self.server.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
        for mechanism in &accepted {
            let missing = match mechanism {
                Mechanism::ClientCertificate if !client_ca => Some("[server.tls] with client_ca_file"),
                Mechanism::ApiKey if self.auth.api_keys.is_empty() => Some("[[auth.api_keys]]"),
                Mechanism::Kubernetes if self.auth.kubernetes.is_none() => Some("[auth.kubernetes]"),
                _ => None,
            };
            if let Some(missing) = missing {
                return Err(format!(
                    "server.accept names {} but no {missing} is configured",
                    mechanism.name()
                ));
            }
        }
        if client_ca && !accepted.contains(&Mechanism::ClientCertificate) {
            return Err(
                "server.tls.client_ca_file is set but server.accept leaves out client_certificate: add it, or remove client_ca_file"
                    .to_owned(),
            );
        }
        Ok(())
    }

    /// Loads every app's credentials (reading and decrypting key files) and
    /// builds the broker. Errors name the file and the problem.
    pub fn build_broker(&self, clock: SharedClock) -> Result<Broker, ConfigError> {
        let mut apps = Vec::with_capacity(self.apps.len());
        for (name, app) in &self.apps {
            let credentials = app
                .sources()
                .load(name)
                .map_err(|e| ConfigError::new(format!("apps.{name}"), e.to_string()))?;
            let client = BoxClient::new(&app.api_base_url, clock.clone())
                .map_err(|e| ConfigError::new(format!("apps.{name}"), e.to_string()))?
                .with_policy(self.upstream.policy());
            apps.push(App::new(name.as_str(), &credentials, client));
        }
        let policy = match &self.policy.file {
            Some(file) => Policy::load(file).map_err(|e| ConfigError::new("policy.file", e.to_string()))?,
            None => Policy::default(),
        };
        Ok(Broker::new(apps, clock, self.cache.policy(), policy))
    }

    /// The TCP listener's caller authenticator: the mechanisms of
    /// [`Config::accepted`]. This loads the Kubernetes JWKS (reading the file
    /// or fetching the URL) when that mechanism is accepted.
    pub async fn authenticator(&self) -> Result<Authenticator, ConfigError> {
        let accepted = self.accepted();
        let mut authenticator = Authenticator::new(self.server.allow_anonymous);
        if accepted.contains(&Mechanism::ClientCertificate) {
            authenticator = authenticator.with_mtls();
        }
        if accepted.contains(&Mechanism::ApiKey) {
            authenticator = authenticator.with_api_keys(hashed(&self.auth.api_keys));
        }
        if let Some(k8s) = self
            .auth
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
}

impl AppConfig {
    /// The credential sources this section names.
    pub fn sources(&self) -> CredentialSources {
        CredentialSources {
            box_config_file: self.box_config_file.clone(),
            client_id: self.client_id.clone(),
            client_secret_file: self.client_secret_file.clone(),
            enterprise_id: self.enterprise_id.clone(),
            public_key_id: self.public_key_id.clone(),
            private_key_file: self.private_key_file.clone(),
            private_key_passphrase_file: self.private_key_passphrase_file.clone(),
            algorithm: self.jwt_algorithm,
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        for path in [
            &mut self.box_config_file,
            &mut self.client_secret_file,
            &mut self.private_key_file,
            &mut self.private_key_passphrase_file,
        ]
        .into_iter()
        .flatten()
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }
}

/// One line for a TOML syntax error: the position and toml's message, but
/// never the quoted source line (which could hold a mistakenly inlined secret).
fn toml_problem(e: &toml::de::Error, text: &str) -> String {
    let position = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("line {line}, column {column}: ")
    });
    format!(
        "{}{}",
        position.unwrap_or_default(),
        e.message().trim().replace('\n', " ")
    )
}

/// Applies `BOX_BROKER_A__B__C=value` as `a.b.c = value`. Values that parse as
/// a TOML boolean or integer become one; everything else is a string.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(Vec<String>, Vec<String>), ConfigError> {
    let (mut applied, mut other) = (Vec::new(), Vec::new());
    for (name, raw) in env {
        // Only `BOX_BROKER_<SECTION>__<KEY>`: every setting is in a section,
        // so an override always has a `__`, and a name without one is some
        // other use of the prefix (the admin CLI's BOX_BROKER_ADMIN_KEY, a
        // `kek_env` such as BOX_BROKER_KEK), never a setting.
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if !rest.contains("__") {
            other.push(name);
            continue;
        }
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::new(
                &name,
                "malformed override name: use BOX_BROKER_SECTION__KEY",
            ));
        }
        let value = match raw.parse::<i64>() {
            Ok(n) => toml::Value::Integer(n),
            Err(_) => match raw.as_str() {
                "true" => toml::Value::Boolean(true),
                "false" => toml::Value::Boolean(false),
                _ => toml::Value::String(raw.clone()),
            },
        };
        let (last, parents) = path
            .split_last()
            .ok_or_else(|| ConfigError::new(&name, "empty override name"))?;
        let mut cursor = &mut *table;
        for key in parents {
            let entry = cursor
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = entry
                .as_table_mut()
                .ok_or_else(|| ConfigError::new(&name, format!("`{key}` is a value, not a section")))?;
        }
        cursor.insert(last.clone(), value);
        applied.push(name);
    }
    applied.sort();
    other.sort();
    Ok((applied, other))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().map_err(|e| ConfigError::new("tempdir", e.to_string()))?;
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, text).map_err(|e| ConfigError::new("write", e.to_string()))?;
        Config::load(&path, env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())))
    }

    const MINIMAL: &str =
        "[server]\nlisten = \"0.0.0.0:50051\"\n[apps.default]\nbox_config_file = \"box_config.json\"\n";

    #[test]
    fn the_pinned_minimal_config_loads_with_defaults() {
        let c = load(MINIMAL, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.server.listen.port(), 50051);
        assert!(!c.server.allow_anonymous);
        let app = &c.apps["default"];
        assert_eq!(app.api_base_url, "https://api.box.com");
        // Relative paths resolve against the config file's directory.
        assert!(
            app.box_config_file
                .as_ref()
                .is_some_and(|p| p.is_absolute() && p.ends_with("box_config.json"))
        );
    }

    #[test]
    fn environment_overrides_apply_with_the_prefix() {
        let c = load(
            MINIMAL,
            &[
                ("BOX_BROKER_SERVER__LISTEN", "127.0.0.1:6000"),
                ("BOX_BROKER_APPS__DEFAULT__API_BASE_URL", "http://127.0.0.1:9"),
                ("BOX_BROKER_APPS__DEFAULT__ENTERPRISE_ID", "12345"),
                ("BOX_BROKER_CACHE__MAX_ENTRIES", "10"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.server.listen,
            "127.0.0.1:6000".parse().unwrap_or_else(|_| unreachable!())
        );
        assert_eq!(c.apps["default"].api_base_url, "http://127.0.0.1:9");
        assert_eq!(c.apps["default"].enterprise_id.as_deref(), Some("12345"));
        assert_eq!(c.cache.max_entries, 10);
    }

    #[test]
    fn the_prefix_without_a_section_is_not_an_override() {
        // The admin CLI's key and the README's `kek_env`, exported in the
        // shell that runs `serve`, once stopped it: unknown field `admin_key`.
        let c = load(
            MINIMAL,
            &[
                ("BOX_BROKER_ADMIN_KEY", "an-admin-key"),
                ("BOX_BROKER_KEK", "a-kek"),
                ("BOX_BROKER_SERVER__LISTEN", "127.0.0.1:6000"),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.server.listen.port(), 6000);
        assert!(c.stray_env_warnings().is_empty(), "{:?}", c.stray_env_warnings());
        // A mistyped override is not read, and said so, with the fix.
        let c = load(MINIMAL, &[("BOX_BROKER_SERVER_LISTEN", "127.0.0.1:6000")]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.server.listen.port(), 50051);
        assert_eq!(
            c.stray_env_warnings(),
            [
                "BOX_BROKER_SERVER_LISTEN is set but is not a config override (those are BOX_BROKER_<SECTION>__<KEY>, \
                 with a double underscore), so it is ignored: did you mean BOX_BROKER_SERVER__LISTEN?"
            ]
        );
    }

    #[test]
    fn durations_are_seconds_or_numbers_with_units() {
        let text = MINIMAL.replace(
            "[apps.default]",
            "request_timeout_secs = \"2m\"\nidle_timeout_secs = 90\n\
             [upstream]\nattempt_timeout_ms = \"2s\"\ndeadline_ms = 5000\n[apps.default]",
        );
        let c = load(&text, &[("BOX_BROKER_CACHE__SAFETY_MARGIN_SECS", "1m30s")]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.server.request_timeout_secs, 120);
        assert_eq!(c.server.idle_timeout_secs, 90);
        assert_eq!(c.upstream.attempt_timeout_ms, 2000);
        assert_eq!(c.upstream.deadline_ms, 5000);
        assert_eq!(c.cache.safety_margin_secs, 90);
        for (bad, says) in [
            ("\"1.5s\"", "\"1.5s\" is not a whole number of seconds"),
            ("\"1500ms\"", "not a whole number of seconds"),
            ("\"soon\"", "give seconds, e.g. 600, \"600s\", \"10m\""),
            ("-5", "-5 is negative"),
        ] {
            let text = MINIMAL.replace(
                "[apps.default]",
                &format!("request_timeout_secs = {bad}\n[apps.default]"),
            );
            let e = load(&text, &[]).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn inline_secrets_are_rejected_without_echoing_them() {
        let text = format!("{MINIMAL}client_secret = \"hunter2-secret\"\n");
        let err = load(&text, &[]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("unknown field `client_secret`"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn syntax_errors_name_the_file_and_position_on_one_line() {
        let err = load("[server\nlisten = 1", &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("broker.toml: line 1"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn the_annotated_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/broker.toml");
        let c = Config::load(&path, std::iter::empty()).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            c.policy
                .file
                .as_ref()
                .is_some_and(|f| f.ends_with("policies/app-user-portal.toml") && f.exists())
        );
        assert_eq!(c.audit.sink, "stdout");
    }

    #[test]
    fn a_config_without_apps_is_refused() {
        let err = load("[server]\nlisten = \"0.0.0.0:1\"\n", &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("no apps configured"), "{err}");
    }

    #[test]
    fn a_margin_below_sixty_seconds_is_refused() {
        let err = load(&format!("{MINIMAL}[cache]\nsafety_margin_secs = 5\n"), &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("safety_margin_secs must be at least 60"), "{err}");
    }

    #[test]
    fn accept_defaults_to_what_is_configured_and_names_what_is_missing() {
        let key = format!("[[auth.api_keys]]\nidentity = \"a\"\nsha256 = \"{}\"\n", "0".repeat(64));
        let c = load(&format!("{MINIMAL}{key}"), &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.accepted(), [Mechanism::ApiKey]);
        let tls = "[server.tls]\ncert_file = \"t.crt\"\nkey_file = \"t.key\"\nclient_ca_file = \"ca.crt\"\n";
        let c = load(&format!("{MINIMAL}{tls}{key}"), &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.accepted(), [Mechanism::ClientCertificate], "mTLS alone by default");

        let error = |text: String| load(&text, &[]).err().map(|e| e.to_string()).unwrap_or_default();
        let e = error(MINIMAL.replace("[server]\n", "[server]\naccept = [\"kubernetes\"]\n"));
        assert!(
            e.ends_with("server.accept names kubernetes but no [auth.kubernetes] is configured"),
            "{e}"
        );
        let e = error(MINIMAL.replace("[server]\n", "[server]\naccept = [\"api_key\"]\n") + tls + &key);
        assert!(
            e.contains("client_ca_file is set but server.accept leaves out client_certificate"),
            "{e}"
        );
        let e = error(MINIMAL.replace("[server]\n", "[server]\naccept = [\"password\"]\n"));
        assert!(e.contains("unknown variant `password`"), "{e}");
    }

    #[test]
    fn the_admin_listener_needs_its_own_address_credentials_and_rules() {
        let error = |extra: &str| {
            load(&format!("{MINIMAL}{extra}"), &[])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let listen = |addr: &str| MINIMAL.replace("[server]\n", &format!("[server]\nadmin_listen = \"{addr}\"\n"));
        let key = format!(
            "[[admin.api_keys]]\nidentity = \"ops\"\nsha256 = \"{}\"\n",
            "1".repeat(64)
        );
        let rule = "[[admin.rules]]\ncallers = [\"apikey:ops\"]\nrpcs = [\"*\"]\n";
        let e = load(&listen("0.0.0.0:50051"), &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("admin_listen must differ from server.listen"), "{e}");
        let e = load(&listen("127.0.0.1:50052"), &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("server.admin_listen needs admin credentials"), "{e}");
        let e = load(&format!("{}{key}", listen("127.0.0.1:50052")), &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("[[admin.rules]] grants nothing"), "{e}");
        assert!(load(&format!("{}{key}{rule}", listen("127.0.0.1:50052")), &[]).is_ok());
        let e = error("[[admin.rules]]\ncallers = [\"apikey:ops\"]\nrpcs = [\"Rotate\"]\n");
        assert!(e.contains("\"Rotate\" matches no admin RPC"), "{e}");
    }

    #[test]
    fn the_keystore_needs_exactly_one_kek_source_and_never_echoes_it() {
        let c = load(
            &format!("{MINIMAL}[keystore]\npath = \"keys.json\"\nkek_env = \"MY_KEK\"\n"),
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let store = c.keystore.as_ref().unwrap_or_else(|| unreachable!());
        let e = store.open(|_| None).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(e, "keystore.kek_env: the environment variable MY_KEK is not set");
        let e = store
            .open(|_| Some("short-secret-value".to_owned()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.starts_with("keystore: MY_KEK: the key-encryption key must be 32 bytes"),
            "{e}"
        );
        assert!(!e.contains("short-secret-value"), "{e}");
        assert!(store.open(|_| Some("ab".repeat(32))).is_ok());
        let both = KeystoreConfig {
            kek_file: Some(PathBuf::from("kek")),
            ..store.clone()
        };
        assert!(both.open(|_| None).is_err());
    }
}
