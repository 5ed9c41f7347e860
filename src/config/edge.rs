//! The edge's config (`box-broker edge --config edge.toml`): where the
//! central broker is and how the pod proves itself to it, the local
//! listeners and their callers, the cache, audit and logging — and never a
//! Box credential, a KEK, a key store, a policy or an admin listener: an
//! edge config naming any of them is refused, saying which.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::{
    AuditConfig, AuthConfig, CacheConfig, ConfigError, LogConfig, ServerConfig, UpstreamConfig,
    load::{deserialize, read_file, read_table, resolve, stray_env_warnings},
    validate::validate_api_keys,
};
use crate::{duration::de_secs, edge::central::CentralEndpoint};

/// The edge's whole configuration as the file (and its overrides) spell it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeSettings {
    /// The local listeners (a Unix socket and/or loopback TCP) and their limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// The central broker.
    pub central: CentralConfig,
    /// Retries, deadlines and the circuit breaker for calls to the central broker.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// The local cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// How local callers on loopback TCP prove who they are.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Where audit records of local decisions go.
    #[serde(default)]
    pub audit: AuditConfig,
}

/// `[central]`: the central broker and the pod's credential for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CentralConfig {
    /// `https://host:port` endpoints (a name resolving to several addresses
    /// counts as several); tried in turn, failing over.
    pub endpoints: Vec<String>,
    /// The CA the central broker's certificate chains to (required for https).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The name the central broker's certificate carries, when not the endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// The pod's client certificate (mTLS), with `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's key.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// A projected Kubernetes service-account token, sent as `authorization:
    /// Bearer`; re-read whenever the kubelet replaces it.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// An API key file, sent as `x-api-key`; re-read whenever it changes.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Seconds between resolutions of the endpoints' names.
    #[serde(default = "default_resolve_interval")]
    #[serde(deserialize_with = "de_secs")]
    pub resolve_interval_secs: u64,
}

fn default_resolve_interval() -> u64 {
    30
}

impl CentralConfig {
    /// The parsed endpoints (validated at load).
    pub fn endpoints(&self) -> Vec<CentralEndpoint> {
        self.endpoints
            .iter()
            .filter_map(|e| CentralEndpoint::parse(e).ok())
            .collect()
    }

    /// How often names are resolved again.
    pub fn resolve_interval(&self) -> Duration {
        Duration::from_secs(self.resolve_interval_secs)
    }
}

/// A validated edge config: made only by [`EdgeConfig::load`] or
/// [`EdgeConfig::parse`]. Its settings are read through `Deref`.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    settings: EdgeSettings,
    /// Whether `[server] listen` was given (an edge listens on TCP only then).
    tcp: bool,
    /// `BOX_BROKER_*` variables that are not overrides.
    other_env: Vec<String>,
}

impl std::ops::Deref for EdgeConfig {
    type Target = EdgeSettings;

    fn deref(&self) -> &EdgeSettings {
        &self.settings
    }
}

/// Sections an edge config may not have, and why.
const CENTRAL_ONLY: &[(&str, &str)] = &[
    ("apps", "the Box apps and their credentials"),
    ("keystore", "the key store and its KEK"),
    ("policy", "the policy (the central broker decides who gets what)"),
    ("admin", "the admin RPC"),
];

/// Settings that hold or point at a Box credential or a KEK, wherever they appear.
const SECRET_SETTINGS: &[&str] = &[
    "box_config_file",
    "client_secret_file",
    "client_secret",
    "private_key_file",
    "private_key",
    "private_key_passphrase_file",
    "passphrase",
    "kek_file",
    "kek_env",
    "kek",
];

/// The first setting under `table` (its dotted path) named in [`SECRET_SETTINGS`].
fn secret_setting(table: &toml::Table, prefix: &str) -> Option<String> {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if SECRET_SETTINGS.contains(&key.as_str()) {
            return Some(path);
        }
        let nested = match value {
            toml::Value::Table(t) => secret_setting(t, &path),
            toml::Value::Array(items) => items
                .iter()
                .find_map(|item| item.as_table().and_then(|t| secret_setting(t, &path))),
            _ => None,
        };
        if nested.is_some() {
            return nested;
        }
    }
    None
}

/// Fills `[upstream]` settings the file leaves out with the edge's own
/// defaults ([`crate::edge::central::default_policy`]) where they differ
/// from a central broker's toward Box.
fn edge_upstream_defaults(table: &mut toml::Table) {
    let policy = crate::edge::central::default_policy();
    let millis = |d: Duration| toml::Value::Integer(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    if let Some(upstream) = table
        .entry("upstream")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
    {
        // An attempt never outlasts a deadline the file sets shorter.
        let attempt = match upstream.get("deadline_ms").and_then(toml::Value::as_integer) {
            Some(deadline) => toml::Value::Integer(
                deadline.min(i64::try_from(policy.attempt_timeout.as_millis()).unwrap_or(i64::MAX)),
            ),
            None => millis(policy.attempt_timeout),
        };
        upstream.entry("attempt_timeout_ms").or_insert(attempt);
        upstream.entry("deadline_ms").or_insert_with(|| millis(policy.deadline));
    }
}

/// Refuses what only a central broker may hold.
fn refuse_central_settings(table: &toml::Table) -> Result<(), String> {
    const WHY: &str = "an edge holds no Box credential, KEK or policy: they belong in the central broker's config only";
    if let Some((section, what)) = CENTRAL_ONLY.iter().find(|(s, _)| table.contains_key(*s)) {
        return Err(format!("[{section}] ({what}) is not allowed in an edge config: {WHY}"));
    }
    if let Some(path) = secret_setting(table, "") {
        return Err(format!("{path} is not allowed in an edge config: {WHY}"));
    }
    if let Some(server) = table.get("server").and_then(toml::Value::as_table) {
        for key in ["admin_listen", "admin_unix_socket"] {
            if server.contains_key(key) {
                return Err(format!(
                    "server.{key} is not allowed in an edge config: an edge serves no admin RPC (rotate keys on the central broker)"
                ));
            }
        }
    }
    Ok(())
}

impl EdgeConfig {
    /// Loads `path`, applies `BOX_BROKER_*` overrides from `env`, refuses
    /// central-only settings and validates.
    pub fn load(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        Self::parse(&read_file(path)?, path, env)
    }

    /// [`Self::load`] of `text`, as if read from `path`.
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (table, source_name, other_env) = read_table(text, path, env)?;
        refuse_central_settings(&table).map_err(|problem| ConfigError::new(&source_name, problem))?;
        if !table.contains_key("central") {
            return Err(ConfigError::new(
                &source_name,
                "an edge config needs [central] endpoints = [\"https://box-broker.box-broker.svc:50051\"] (the central broker)",
            ));
        }
        let mut table = table;
        edge_upstream_defaults(&mut table);
        let tcp = table
            .get("server")
            .and_then(toml::Value::as_table)
            .is_some_and(|s| s.contains_key("listen"));
        let mut settings: EdgeSettings = deserialize(table, &source_name)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let central = &mut settings.central;
        for path in [
            &mut central.ca_file,
            &mut central.cert_file,
            &mut central.key_file,
            &mut central.token_file,
            &mut central.api_key_file,
        ]
        .into_iter()
        .flatten()
        {
            resolve(path, base);
        }
        if let Some(tls) = &mut settings.server.tls {
            for path in [&mut tls.cert_file, &mut tls.key_file]
                .into_iter()
                .chain(tls.client_ca_file.as_mut())
            {
                resolve(path, base);
            }
        }
        if let Some(k8s) = &mut settings.auth.kubernetes {
            k8s.resolve_paths(base);
        }
        for key in &mut settings.auth.api_keys {
            key.resolve_paths(base);
        }
        let config = Self {
            settings,
            tcp,
            other_env,
        };
        config
            .validate()
            .map_err(|problem| ConfigError::new(&source_name, problem))?;
        Ok(config)
    }

    /// Warnings for `BOX_BROKER_*` variables that are set but are not
    /// overrides (most likely a mistyped one).
    pub fn stray_env_warnings(&self) -> Vec<String> {
        stray_env_warnings(&self.other_env, None)
    }

    /// Whether the edge listens on loopback TCP (`[server] listen` given).
    pub fn listens_on_tcp(&self) -> bool {
        self.tcp
    }

    fn validate(&self) -> Result<(), String> {
        let central = &self.central;
        if central.endpoints.is_empty() {
            return Err(
                "central.endpoints is empty: name the central broker, as [\"https://box-broker.box-broker.svc:50051\"]"
                    .to_owned(),
            );
        }
        let mut seen = BTreeSet::new();
        for text in &central.endpoints {
            let endpoint = CentralEndpoint::parse(text).map_err(|e| format!("central.endpoints: {e}"))?;
            if !seen.insert(endpoint.to_string()) {
                return Err(format!("central.endpoints: {text:?} is listed twice"));
            }
            if endpoint.https && central.ca_file.is_none() {
                return Err(format!(
                    "central.endpoints: {text:?} is https, so central.ca_file must name the CA its certificate chains to"
                ));
            }
            if !endpoint.https && (central.ca_file.is_some() || central.cert_file.is_some()) {
                return Err(format!(
                    "central.endpoints: {text:?} is http, but central.ca_file or cert_file is set: use https://"
                ));
            }
        }
        if central.cert_file.is_some() != central.key_file.is_some() {
            return Err(
                "central.cert_file and central.key_file go together (the pod's client certificate and its key)"
                    .to_owned(),
            );
        }
        if central.token_file.is_some() && central.api_key_file.is_some() {
            return Err("set at most one of central.token_file and central.api_key_file".to_owned());
        }
        if !(1..=3600).contains(&central.resolve_interval_secs) {
            return Err("central.resolve_interval_secs must be 1 to 3600 (seconds)".to_owned());
        }
        if !self.tcp && self.server.unix_socket.is_none() {
            return Err(
                "an edge needs a listener for its app: [server.unix_socket] path and identity, and/or [server] listen = \"127.0.0.1:PORT\""
                    .to_owned(),
            );
        }
        if self.tcp && !self.server.listen.ip().is_loopback() {
            return Err(format!(
                "server.listen {} is not a loopback address: an edge serves only its own pod (127.0.0.1 or [::1])",
                self.server.listen
            ));
        }
        if self.server.metrics_listen.is_some() && self.server.metrics_listen == Some(self.server.listen) && self.tcp {
            return Err("server.metrics_listen must differ from server.listen".to_owned());
        }
        if self.tcp && self.server.accepted(&self.auth).is_empty() && !self.server.allow_anonymous {
            return Err(
                "server.listen needs a way for local callers to prove who they are: [[auth.api_keys]], [auth.kubernetes], [server.tls] client_ca_file, or allow_anonymous = true (any process in the pod)"
                    .to_owned(),
            );
        }
        if self.audit.repeat_window_secs > 3600 {
            return Err("audit.repeat_window_secs must be at most 3600 (seconds)".to_owned());
        }
        self.server.validate_accept(&self.auth)?;
        self.upstream.validate()?;
        self.server.validate()?;
        self.cache.validate()?;
        validate_api_keys("auth.api_keys", &self.auth.api_keys)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<EdgeConfig, String> {
        EdgeConfig::parse(text, Path::new("/etc/box-broker/edge.toml"), std::iter::empty()).map_err(|e| e.to_string())
    }

    const MINIMAL: &str = "[central]\nendpoints = [\"http://127.0.0.1:50051\"]\n[server.unix_socket]\npath = \"/run/box-broker/edge.sock\"\nidentity = \"app\"\n";

    #[test]
    fn a_minimal_edge_config_loads_with_the_edges_own_upstream_defaults() {
        let c = parse(MINIMAL).unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.listens_on_tcp());
        assert_eq!(c.central.endpoints().len(), 1);
        assert_eq!(c.upstream.policy(), crate::edge::central::default_policy());
        let set = parse(&format!("{MINIMAL}[upstream]\ndeadline_ms = 20000\n")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set.upstream.policy().deadline, Duration::from_secs(20));
        assert_eq!(set.upstream.policy().attempt_timeout, Duration::from_secs(11));
        let short = parse(&format!("{MINIMAL}[upstream]\ndeadline_ms = 8000\n")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            short.upstream.policy().attempt_timeout,
            Duration::from_secs(8),
            "within the deadline set"
        );
    }

    #[test]
    fn the_annotated_example_edge_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/edge.toml");
        let c = EdgeConfig::load(&path, std::iter::empty()).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.central.token_file.is_some() && c.server.unix_socket.is_some());
        assert!(!c.listens_on_tcp());
    }

    #[test]
    fn central_only_settings_are_refused_by_name() {
        for (extra, named) in [
            ("[apps.default]\nbox_config_file = \"box.json\"\n", "[apps]"),
            ("[keystore]\npath = \"k.json\"\nkek_env = \"K\"\n", "[keystore]"),
            ("[policy]\nfile = \"p.toml\"\n", "[policy]"),
            ("[admin]\n", "[admin]"),
            ("[cache]\nkek_file = \"kek\"\n", "cache.kek_file"),
            ("[auth]\nprivate_key_file = \"k.pem\"\n", "auth.private_key_file"),
        ] {
            let e = parse(&format!("{MINIMAL}{extra}")).err().unwrap_or_default();
            assert!(e.starts_with("/etc/box-broker/edge.toml: "), "{e}");
            assert!(e.contains(named) && e.contains("not allowed in an edge config"), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        let e = parse(&MINIMAL.replace(
            "[server.unix_socket]",
            "[server]\nadmin_listen = \"127.0.0.1:9\"\n[server.unix_socket]",
        ))
        .err()
        .unwrap_or_default();
        assert!(e.contains("server.admin_listen is not allowed"), "{e}");
    }

    #[test]
    fn credentials_set_through_the_environment_are_refused_too() {
        let env = [(
            "BOX_BROKER_APPS__DEFAULT__CLIENT_SECRET_FILE".to_owned(),
            "/s".to_owned(),
        )];
        let e = EdgeConfig::parse(MINIMAL, Path::new("edge.toml"), env)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("[apps]") && e.contains("BOX_BROKER_APPS__DEFAULT__CLIENT_SECRET_FILE"),
            "{e}"
        );
    }

    #[test]
    fn listeners_must_exist_and_tcp_must_be_loopback_with_a_caller_mechanism() {
        let none = "[central]\nendpoints = [\"http://127.0.0.1:50051\"]\n";
        assert!(parse(none).err().unwrap_or_default().contains("needs a listener"));
        let open = format!("{none}[server]\nlisten = \"0.0.0.0:7000\"\nallow_anonymous = true\n");
        assert!(
            parse(&open)
                .err()
                .unwrap_or_default()
                .contains("is not a loopback address")
        );
        let bare = format!("{none}[server]\nlisten = \"127.0.0.1:7000\"\n");
        assert!(
            parse(&bare)
                .err()
                .unwrap_or_default()
                .contains("needs a way for local callers")
        );
        let ok = format!("{none}[server]\nlisten = \"127.0.0.1:7000\"\nallow_anonymous = true\n");
        assert!(parse(&ok).is_ok_and(|c| c.listens_on_tcp()));
    }

    #[test]
    fn https_needs_a_ca_and_endpoints_must_parse() {
        let https = MINIMAL.replace("http://127.0.0.1:50051", "https://box-broker.box-broker.svc:50051");
        assert!(
            parse(&https)
                .err()
                .unwrap_or_default()
                .contains("central.ca_file must name the CA")
        );
        let bad = MINIMAL.replace("http://127.0.0.1:50051", "box-broker:50051");
        assert!(
            parse(&bad)
                .err()
                .unwrap_or_default()
                .contains("must start with https://")
        );
        let both = MINIMAL.replace(
            "[server.unix_socket]",
            "token_file = \"t\"\napi_key_file = \"k\"\n[server.unix_socket]",
        );
        assert!(parse(&both).err().unwrap_or_default().contains("at most one of"));
    }

    #[test]
    fn a_central_brokers_config_is_not_an_edge_config_and_the_other_way_round() {
        let e = super::super::Config::parse(MINIMAL, Path::new("edge.toml"), std::iter::empty())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("box-broker edge"), "{e}");
        let e = parse("[apps.default]\nbox_config_file = \"b.json\"\n")
            .err()
            .unwrap_or_default();
        assert!(e.contains("[apps]"), "{e}");
    }
}
