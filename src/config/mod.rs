//! One typed [`Config`], loaded from a TOML file plus `BOX_BROKER_*`
//! environment overrides, validated before any port is bound: the schema
//! (`schema.rs`), loading (`load.rs`) and validation (`validate.rs`). A
//! `Config` cannot exist unvalidated; what is built from it (the broker,
//! listeners, authenticators) is `crate::runtime`'s.
//!
//! Secrets are never inline: the TOML names files (Kubernetes Secret mounts).
//! Relative paths are resolved against the config file's directory. Every
//! error is one line naming the file (or variable) and the problem.

mod edge;
mod load;
mod schema;
mod validate;

pub use self::{
    edge::{CentralConfig, EdgeConfig, EdgeSettings},
    load::{ConfigError, ENV_PREFIX},
    schema::{
        AdminConfig, ApiKeyConfig, AppConfig, AuditConfig, AuthConfig, CacheConfig, KeystoreConfig, LogConfig,
        LogFormat, Mechanism, PolicyConfig, RedisConfig, ServerConfig, Settings, TlsConfig, UnixSocketConfig,
        UpstreamConfig,
    },
};

/// A validated config: made only by [`Config::load`] or [`Config::parse`],
/// which validate it. Its settings are read through `Deref`.
///
/// Nothing else can make one, not even from settings that deserialized:
///
/// ```compile_fail
/// use box_token_broker::config::{Config, Settings};
/// let settings: Settings = toml::from_str("").unwrap();
/// let config = Config { settings, other_env: Vec::new() };
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    settings: Settings,
    /// `BOX_BROKER_*` variables that are not overrides (no `__`), for a
    /// warning when one looks like a mistyped override.
    other_env: Vec<String>,
}

impl std::ops::Deref for Config {
    type Target = Settings;

    fn deref(&self) -> &Settings {
        &self.settings
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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
    fn redis_settings_are_checked_before_any_connection() {
        let store = "[keystore]\npath = \"keys.json\"\nkek_file = \"kek\"\n";
        let with = |redis: &str, keystore: &str| load(&format!("{MINIMAL}{keystore}[redis]\n{redis}"), &[]);
        let c =
            with("url = \"redis://redis:6379/0\"\npassword_file = \"pw\"\n", store).unwrap_or_else(|e| panic!("{e}"));
        let redis = c.redis.as_ref().unwrap_or_else(|| unreachable!());
        assert_eq!(redis.namespace, "box-broker");
        assert_eq!((redis.command_timeout_ms, redis.poll_interval_ms), (250, 200));
        assert!(redis.share_enterprise_tokens);
        assert!(redis.password_file.as_ref().is_some_and(|p| p.is_absolute()));
        let c = with(
            "sentinels = [\"rediss://s1:26379\", \"rediss://s2:26379\"]\nmaster_name = \"box\"\nsentinel_password_file = \"spw\"\nca_file = \"ca.pem\"\n",
            store,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let redis = c.redis.as_ref().unwrap_or_else(|| unreachable!());
        assert_eq!((redis.sentinels.len(), redis.master_name.as_deref()), (2, Some("box")));
        assert!(redis.sentinel_password_file.as_ref().is_some_and(|p| p.is_absolute()));
        // From the environment: one string, separated by commas.
        let c = load(
            &format!("{MINIMAL}{store}[redis]\nmaster_name = \"box\"\n"),
            &[("BOX_BROKER_REDIS__SENTINELS", "redis://s1:26379, redis://s2:26379")],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let redis = c.redis.as_ref().unwrap_or_else(|| unreachable!());
        assert_eq!(redis.sentinels, ["redis://s1:26379", "redis://s2:26379"]);
        for (redis, keystore, problem) in [
            ("url = \"redis://redis:6379\"\n", "", "[redis] needs [keystore]"),
            (
                "url = \"http://redis:6379\"\n",
                store,
                "must start with redis://, rediss:// or unix://",
            ),
            (
                "url = \"redis://u:hunter2@redis:6379\"\n",
                store,
                "must not hold a user or password",
            ),
            (
                "url = \"redis://redis\"\nca_file = \"ca.pem\"\n",
                store,
                "not rediss://",
            ),
            (
                "url = \"redis://redis\"\nnamespace = \"a b\"\n",
                store,
                "redis.namespace",
            ),
            (
                "url = \"redis://redis\"\ncommand_timeout_ms = 0\n",
                store,
                "redis.command_timeout_ms must be 1 to 10000",
            ),
            ("", store, "needs redis.url (one Redis) or redis.sentinels"),
            (
                "url = \"redis://redis\"\nsentinels = [\"redis://s1:26379\"]\nmaster_name = \"m\"\n",
                store,
                "not both",
            ),
            (
                "sentinels = [\"redis://s1:26379\"]\n",
                store,
                "redis.master_name must name the master",
            ),
            (
                "sentinels = [\"redis://s1:26379\", \"rediss://s2:26379\"]\nmaster_name = \"m\"\n",
                store,
                "all redis:// or all rediss://",
            ),
            (
                "sentinels = [\"unix:///s.sock\"]\nmaster_name = \"m\"\n",
                store,
                "redis.sentinels must start with redis:// or rediss://",
            ),
            (
                "sentinels = [\"redis://:hunter2@s1:26379\"]\nmaster_name = \"m\"\n",
                store,
                "redis.sentinel_password_file",
            ),
            (
                "sentinels = [\"redis://s1:26379\"]\nmaster_name = \"m\"\nca_file = \"ca.pem\"\n",
                store,
                "not rediss://",
            ),
            (
                "url = \"redis://redis\"\nmaster_name = \"m\"\n",
                store,
                "go with redis.sentinels",
            ),
            (
                "url = \"unix:///run/redis.sock?db=0&pass=hunter2\"\n",
                store,
                "must not hold a user or password",
            ),
            (
                "sentinels = [\"redis://s1\"]\nmaster_name = \"m\"\n",
                store,
                "needs its port",
            ),
            (
                "sentinels = [\"redis://s1:26379/2\"]\nmaster_name = \"m\"\n",
                store,
                "has a path",
            ),
        ] {
            let err = with(redis, keystore).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(problem), "{redis}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

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
    fn refused_roles_and_user_ttls_are_checked() {
        let error = |extra: &str| {
            load(&format!("{MINIMAL}{extra}"), &[])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(error("refused_roles = [\"owner\"]\n").contains("\"owner\" is not a Box role"));
        assert!(error("refused_roles = [\"coadmin\"]\n").contains("must include \"admin\""));
        assert_eq!(error("refused_roles = [\"admin\", \"user\"]\n"), "");
        assert!(error("[users]\ncheck_ttl_secs = 0\n").contains("users.check_ttl_secs must be 1 to 86400"));
        let c = load(&format!("{MINIMAL}[users]\nmapping_ttl_secs = \"2h\"\n"), &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.users.mapping_ttl_secs, 7200);
        assert_eq!(c.users.check_ttl_secs, 600, "the default");
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
    fn a_unix_socket_mode_is_a_file_mode() {
        let socket = |mode: &str| {
            format!("{MINIMAL}[server.unix_socket]\npath = \"b.sock\"\nidentity = \"app\"\nmode = {mode}\n")
        };
        let c = load(&socket("0o660"), &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.server.unix_socket.as_ref().and_then(|u| u.mode), Some(0o660));
        let e = load(&socket("660"), &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.ends_with(
                "server.unix_socket.mode 0o1224 is not a file mode: write it in octal, at most 0o777 (e.g. 0o660)"
            ),
            "{e}"
        );
    }

    #[test]
    fn an_api_key_names_its_hash_exactly_once() {
        let error = |key: &str| {
            load(&format!("{MINIMAL}[[auth.api_keys]]\nidentity = \"a\"\n{key}"), &[])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let hash = format!("sha256 = \"{}\"\n", "0".repeat(64));
        let both = error(&format!("{hash}sha256_file = \"a.sha256\"\n"));
        assert!(
            both.ends_with("auth.api_keys \"a\": set exactly one of sha256 and sha256_file"),
            "{both}"
        );
        let neither = error("");
        assert!(
            neither.ends_with("set exactly one of sha256 and sha256_file"),
            "{neither}"
        );
        let short = error("sha256 = \"abc\"\n");
        assert!(
            short.ends_with("sha256 must be 64 hex characters (printf %s \"$KEY\" | sha256sum)"),
            "{short}"
        );
        assert_eq!(
            error("sha256_file = \"a.sha256\"\n"),
            "",
            "the file is read at startup, not by the parser"
        );
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
}
