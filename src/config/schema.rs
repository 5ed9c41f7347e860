//! The config's schema: every section as serde reads it, its defaults, and
//! the conversions to the domain's own settings types. No I/O, no checks
//! beyond what the types say (see `validate.rs`).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer};

use crate::{
    auth::kubernetes::KubernetesConfig,
    boxapi::{
        CredentialSources, JwtAlgorithm,
        client::{DEFAULT_API_BASE_URL, UpstreamPolicy},
    },
    cache::{CachePolicy, DEFAULT_MAX_ENTRIES, DEFAULT_REFRESH_AHEAD, DEFAULT_SAFETY_MARGIN},
    duration::{de_millis, de_secs},
    service::ConnectionLimits,
};

/// The whole configuration as the file (and its overrides) spell it. A
/// [`super::Config`] is one of these that passed validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Listeners.
    #[serde(default)]
    pub server: ServerConfig,
    /// Token cache tuning.
    #[serde(default)]
    pub cache: CacheConfig,
    /// `[users]`: external ids and who may be tokenized.
    #[serde(default)]
    pub users: UsersConfig,
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
    /// `[redis]`: the Redis a fleet of central brokers shares (optional).
    #[serde(default)]
    pub redis: Option<RedisConfig>,
}

/// `[redis]`: the Redis several central brokers share for a second-level
/// token cache, one mint per key, invalidations and the key set. Without
/// it every replica keeps to itself. One Redis (`url`), or the master that
/// Redis Sentinels name (`sentinels` + `master_name`, followed through a
/// failover); Redis Cluster is not supported.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// One Redis: `redis://host:6379/0`, `rediss://host:6380/0` (TLS) or
    /// `unix:///path/redis.sock`; no password in it (use `password_file`).
    #[serde(default)]
    pub url: Option<String>,
    /// Or Redis Sentinels (instead of `url`): `redis://host:26379` or, all
    /// of them, `rediss://host:26379` (the master is then reached over TLS
    /// too). A list, or one string of them separated by commas (what an
    /// environment variable can give).
    #[serde(default, deserialize_with = "de_list_or_commas")]
    pub sentinels: Vec<String>,
    /// The name the Sentinels monitor the master under (with `sentinels`).
    #[serde(default)]
    pub master_name: Option<String>,
    /// The Sentinels' ACL user, when they require one.
    #[serde(default)]
    pub sentinel_username: Option<String>,
    /// A file holding the Sentinels' password (first line), when they require one.
    #[serde(default)]
    pub sentinel_password_file: Option<PathBuf>,
    /// PEM CA certificate(s) for `rediss://` servers (the system's roots when left out).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The ACL user on Redis (the master) (`default` when left out).
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding its password (first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Prefix of every key name: brokers of one fleet share it, two fleets
    /// on one Redis do not.
    #[serde(default = "default_redis_namespace")]
    pub namespace: String,
    /// Connecting's time limit in ms.
    #[serde(default = "default_redis_connect_ms", deserialize_with = "de_millis")]
    pub connect_timeout_ms: u64,
    /// One command's time limit in ms: a slow Redis costs a request at most this per call.
    #[serde(default = "default_redis_command_ms", deserialize_with = "de_millis")]
    pub command_timeout_ms: u64,
    /// How often each replica reads the fleet's notices (invalidations, key
    /// sets), in ms: how long another replica may serve a revoked token's copy.
    #[serde(default = "default_redis_poll_ms", deserialize_with = "de_millis")]
    pub poll_interval_ms: u64,
    /// Whether Service Account tokens are shared too (user tokens always are).
    #[serde(default = "default_true")]
    pub share_enterprise_tokens: bool,
    /// Failed Redis calls in a row after which Redis is skipped for `breaker_cooldown_secs`.
    #[serde(default = "default_redis_breaker_threshold")]
    pub breaker_threshold: u32,
    /// Seconds Redis is skipped after `breaker_threshold` failures.
    #[serde(default = "default_redis_breaker_cooldown", deserialize_with = "de_secs")]
    pub breaker_cooldown_secs: u64,
}

/// A list of strings, or one string of them separated by commas.
fn de_list_or_commas<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct ListOrCommas;
    impl<'de> serde::de::Visitor<'de> for ListOrCommas {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of URLs, or one string of them separated by commas")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            Ok(text
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect())
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut list = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                list.push(item);
            }
            Ok(list)
        }
    }
    d.deserialize_any(ListOrCommas)
}

/// `value` (setting `setting`) is a URL of one of `schemes`, with no user or password in it.
fn check_redis_url(setting: &str, value: &str, schemes: &[&str]) -> Result<(), String> {
    let (scheme, rest) = value.split_once("://").unwrap_or_default();
    if !schemes.contains(&scheme) {
        let mut names: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
        let last = names.pop().unwrap_or_default();
        let names = if names.is_empty() {
            last
        } else {
            format!("{} or {last}", names.join(", "))
        };
        return Err(format!(
            "{setting} must start with {names} (it is {:?})",
            crate::l2::redact_url(value)
        ));
    }
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    // (A unix:// URL may carry them in its query.)
    let query = rest.split_once('?').map_or("", |(_, query)| query);
    let credential_in_query = query
        .split('&')
        .any(|pair| ["pass", "password", "user"].contains(&pair.split('=').next().unwrap_or_default()));
    if authority.contains('@') || credential_in_query {
        return Err(format!(
            "{setting} must not hold a user or password: set redis.username and redis.password_file{}",
            if setting == "redis.sentinels" {
                " (the master's) or redis.sentinel_username and redis.sentinel_password_file (the Sentinels')"
            } else {
                ""
            }
        ));
    }
    if scheme != "unix" && authority.is_empty() {
        return Err(format!("{setting} must name a host ({:?})", value));
    }
    Ok(())
}

fn default_redis_namespace() -> String {
    "box-broker".to_owned()
}
fn default_redis_connect_ms() -> u64 {
    1000
}
fn default_redis_command_ms() -> u64 {
    250
}
fn default_redis_poll_ms() -> u64 {
    200
}
fn default_true() -> bool {
    true
}
fn default_redis_breaker_threshold() -> u32 {
    3
}
fn default_redis_breaker_cooldown() -> u64 {
    5
}

impl RedisConfig {
    /// Checks what can be checked without reading files or connecting.
    pub fn validate(&self, keystore: bool) -> Result<(), String> {
        let tls = match (&self.url, self.sentinels.is_empty()) {
            (Some(url), true) => {
                check_redis_url("redis.url", url, &["redis", "rediss", "unix"])?;
                if self.master_name.is_some()
                    || self.sentinel_username.is_some()
                    || self.sentinel_password_file.is_some()
                {
                    return Err(
                        "redis.master_name, sentinel_username and sentinel_password_file go with redis.sentinels, not redis.url"
                            .to_owned(),
                    );
                }
                url.starts_with("rediss://")
            }
            (None, false) => {
                for sentinel in &self.sentinels {
                    check_redis_url("redis.sentinels", sentinel, &["redis", "rediss"])?;
                    let rest = sentinel.split_once("://").map_or("", |(_, rest)| rest);
                    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
                    let shown = crate::l2::redact_url(sentinel);
                    if !path.is_empty() {
                        return Err(format!(
                            "redis.sentinels: {shown:?} has a path: a Sentinel is scheme://host:port only (the master's database is 0)"
                        ));
                    }
                    if authority
                        .rsplit_once(':')
                        .is_none_or(|(_, port)| port.parse::<u16>().is_err())
                    {
                        return Err(format!(
                            "redis.sentinels: {shown:?} needs its port (Sentinels usually listen on 26379)"
                        ));
                    }
                }
                let tls = self.sentinels.iter().filter(|s| s.starts_with("rediss://")).count();
                if tls != 0 && tls != self.sentinels.len() {
                    return Err("redis.sentinels must be all redis:// or all rediss://".to_owned());
                }
                if self.master_name.as_deref().is_none_or(|m| m.trim().is_empty()) {
                    return Err(
                        "redis.sentinels is set: redis.master_name must name the master they monitor".to_owned(),
                    );
                }
                tls != 0
            }
            (Some(_), false) => {
                return Err("set redis.url (one Redis) or redis.sentinels (Redis Sentinel), not both".to_owned());
            }
            (None, true) => {
                return Err(
                    "[redis] needs redis.url (one Redis) or redis.sentinels + redis.master_name (Redis Sentinel)"
                        .to_owned(),
                );
            }
        };
        if self.ca_file.is_some() && !tls {
            return Err("redis.ca_file is set, but the Redis it is for is not rediss://".to_owned());
        }
        if self.namespace.is_empty()
            || !self
                .namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            return Err("redis.namespace must be letters, digits, '-', '_', '.' or ':' (and not empty)".to_owned());
        }
        for (name, value, max) in [
            ("connect_timeout_ms", self.connect_timeout_ms, 60_000),
            ("command_timeout_ms", self.command_timeout_ms, 10_000),
            ("poll_interval_ms", self.poll_interval_ms, 60_000),
            ("breaker_cooldown_secs", self.breaker_cooldown_secs, 3600),
        ] {
            if !(1..=max).contains(&value) {
                return Err(format!("redis.{name} must be 1 to {max}"));
            }
        }
        if self.breaker_threshold == 0 {
            return Err("redis.breaker_threshold must be at least 1".to_owned());
        }
        if !keystore {
            return Err(
                "[redis] needs [keystore]: what the brokers share is sealed with the key store's KEK (the same on every replica), and each replica keeps the fleet's key set in its own store"
                    .to_owned(),
            );
        }
        Ok(())
    }
}

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
    /// Hex SHA-256 of the key: `printf %s "$KEY" | sha256sum`. Exactly one
    /// of this and `sha256_file`.
    #[serde(default)]
    pub sha256: Option<String>,
    /// A file holding the hex SHA-256 (a Kubernetes Secret mount, so that
    /// who may edit the ConfigMap cannot add a key), read at startup; what
    /// `sha256sum` prints is accepted.
    pub sha256_file: Option<PathBuf>,
}

impl ApiKeyConfig {
    /// The first word of `text` as a hex SHA-256 (so what `sha256sum`
    /// prints works in a `sha256_file`).
    pub fn parse_sha256(text: &str) -> Option<[u8; 32]> {
        let mut hash = [0u8; 32];
        let word = text.split_whitespace().next()?;
        hex::decode_to_slice(word, &mut hash).ok().map(|()| hash)
    }

    /// Makes a relative `sha256_file` relative to `base`.
    pub(super) fn resolve_paths(&mut self, base: &Path) {
        if let Some(file) = &mut self.sha256_file {
            super::load::resolve(file, base);
        }
    }
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
    /// The socket file's mode (TOML octal, `0o660`); default: what the
    /// umask leaves. Connecting needs write permission, so `0o660` lets the
    /// socket's group in: in a pod, the `fsGroup` (an `emptyDir` with an
    /// fsGroup gives new files its group).
    pub mode: Option<u32>,
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

impl Settings {
    /// The mechanisms the TCP listener accepts (`[server] accept`, or its default).
    pub fn accepted(&self) -> Vec<Mechanism> {
        self.server.accepted(&self.auth)
    }
}

impl ServerConfig {
    /// The mechanisms the TCP listener accepts (`accept`, or its default:
    /// a client certificate when `tls.client_ca_file` is set, otherwise
    /// every mechanism `auth` configures).
    pub fn accepted(&self, auth: &AuthConfig) -> Vec<Mechanism> {
        if let Some(accept) = &self.accept {
            let mut accept = accept.clone();
            accept.sort();
            accept.dedup();
            return accept;
        }
        if self.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()) {
            return vec![Mechanism::ClientCertificate];
        }
        let mut accept = Vec::new();
        if !auth.api_keys.is_empty() {
            accept.push(Mechanism::ApiKey);
        }
        if auth.kubernetes.is_some() {
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
}

/// `[users]`: how long what Box says of users is trusted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsersConfig {
    /// Seconds a found external id → Box user mapping is used before Box
    /// is asked again ("none" is remembered `cache.unknown_subject_ttl_secs`).
    #[serde(deserialize_with = "de_secs")]
    pub mapping_ttl_secs: u64,
    /// Seconds a user's role, status and enterprise are trusted before they
    /// are read again (a user made admin or deactivated meanwhile keeps the
    /// tokens already served until they expire; `admin invalidate --user`
    /// drops them and the check at once).
    #[serde(deserialize_with = "de_secs")]
    pub check_ttl_secs: u64,
}

impl Default for UsersConfig {
    fn default() -> Self {
        Self {
            mapping_ttl_secs: crate::broker::DEFAULT_MAPPING_TTL.as_secs(),
            check_ttl_secs: crate::broker::DEFAULT_CHECK_TTL.as_secs(),
        }
    }
}

impl UsersConfig {
    /// The users policy these settings (and the cache's) describe.
    pub fn policy(&self, cache: &CacheConfig) -> crate::broker::UsersPolicy {
        crate::broker::UsersPolicy {
            mapping_ttl: Duration::from_secs(self.mapping_ttl_secs),
            check_ttl: Duration::from_secs(self.check_ttl_secs),
            negative_ttl: Duration::from_secs(cache.unknown_subject_ttl_secs),
        }
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
    /// Box roles whose users the broker never tokenizes for this app
    /// (`admin`, `coadmin`, `user`); default `["admin", "coadmin"]`.
    #[serde(default)]
    pub refused_roles: Option<Vec<String>>,
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
}
