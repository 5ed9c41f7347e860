//! Validation: what the types cannot say. A [`super::Config`] exists only
//! once this passed (`load.rs` calls it), so nothing downstream re-checks.

use super::{ApiKeyConfig, AuthConfig, CacheConfig, Mechanism, ServerConfig, Settings, UpstreamConfig};
use crate::cache::MIN_SAFETY_MARGIN;

impl Settings {
    /// Checks what types cannot.
    pub(super) fn validate(&self) -> Result<(), String> {
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
            if let Some(bad) = app
                .refused_roles
                .iter()
                .flatten()
                .find(|r| !["admin", "coadmin", "user"].contains(&r.as_str()))
            {
                return Err(format!(
                    "apps.{name}.refused_roles: {bad:?} is not a Box role (admin, coadmin or user)"
                ));
            }
            if app
                .refused_roles
                .as_ref()
                .is_some_and(|r| !r.iter().any(|r| r == "admin"))
            {
                return Err(format!(
                    "apps.{name}.refused_roles must include \"admin\": the broker never tokenizes the enterprise's admin"
                ));
            }
        }
        for (name, value) in [
            ("mapping_ttl_secs", self.users.mapping_ttl_secs),
            ("check_ttl_secs", self.users.check_ttl_secs),
        ] {
            if !(1..=86_400).contains(&value) {
                return Err(format!("users.{name} must be 1 to 86400 (seconds)"));
            }
        }
        self.server.validate_accept(&self.auth)?;
        self.validate_admin()?;
        if self.audit.repeat_window_secs > 3600 {
            return Err("audit.repeat_window_secs must be at most 3600 (seconds)".to_owned());
        }
        self.upstream.validate()?;
        if let Some(redis) = &self.redis {
            redis.validate(self.keystore.is_some())?;
        }
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
}

impl ServerConfig {
    /// Every mechanism the TCP listener accepts is configured in `auth`.
    pub(super) fn validate_accept(&self, auth: &AuthConfig) -> Result<(), String> {
        let accepted = self.accepted(auth);
        let client_ca = self.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
        for mechanism in &accepted {
            let missing = match mechanism {
                Mechanism::ClientCertificate if !client_ca => Some("[server.tls] with client_ca_file"),
                Mechanism::ApiKey if auth.api_keys.is_empty() => Some("[[auth.api_keys]]"),
                Mechanism::Kubernetes if auth.kubernetes.is_none() => Some("[auth.kubernetes]"),
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
}

impl UpstreamConfig {
    pub(super) fn validate(&self) -> Result<(), String> {
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

impl ServerConfig {
    pub(super) fn validate(&self) -> Result<(), String> {
        for (section, unix) in [
            ("server.unix_socket", &self.unix_socket),
            ("server.admin_unix_socket", &self.admin_unix_socket),
        ] {
            if let Some(mode) = unix.as_ref().and_then(|u| u.mode)
                && mode > 0o777
            {
                return Err(format!(
                    "{section}.mode {mode:#o} is not a file mode: write it in octal, at most 0o777 (e.g. 0o660)"
                ));
            }
        }
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

impl CacheConfig {
    pub(super) fn validate(&self) -> Result<(), String> {
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

pub(super) fn validate_api_keys(section: &str, keys: &[ApiKeyConfig]) -> Result<(), String> {
    let mut identities = std::collections::BTreeSet::new();
    for key in keys {
        if key.identity.is_empty() || !identities.insert(key.identity.as_str()) {
            return Err(format!(
                "{section}: identity {:?} must be non-empty and unique",
                key.identity
            ));
        }
        match (&key.sha256, &key.sha256_file) {
            (Some(hex), None) if ApiKeyConfig::parse_sha256(hex).is_none() => {
                return Err(format!(
                    "{section} {:?}: sha256 must be 64 hex characters (printf %s \"$KEY\" | sha256sum)",
                    key.identity
                ));
            }
            // A sha256_file is read, and its hash checked, at startup.
            (Some(_), None) | (None, Some(_)) => {}
            _ => {
                return Err(format!(
                    "{section} {:?}: set exactly one of sha256 and sha256_file",
                    key.identity
                ));
            }
        }
    }
    Ok(())
}
