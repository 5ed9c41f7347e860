//! Kubernetes projected service-account tokens: `authorization: Bearer <jwt>`,
//! verified against the cluster's JWKS with a pinned issuer and audience and
//! an unexpired `exp`. The caller's identity is the token's `sub`,
//! `system:serviceaccount:<namespace>:<name>`.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Mutex, RwLock},
    time::{Duration, Instant},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::JwkSet};
use serde::Deserialize;

use super::AuthError;

/// The JWKS file is re-read for an unknown `kid` (key rotation) at most this often.
const JWKS_RELOAD_INTERVAL: Duration = Duration::from_secs(30);
/// Clock difference tolerated between the API server and the broker.
const LEEWAY_SECS: u64 = 5;
/// The signature algorithms Kubernetes service-account issuers use.
const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::PS256,
];

/// `[auth.kubernetes]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The cluster's JWKS (`kubectl get --raw /openid/v1/jwks`), as a file.
    pub jwks_file: PathBuf,
    /// The service-account issuer (`--service-account-issuer`), pinned.
    pub issuer: String,
    /// The audience the projected token was requested for, pinned.
    pub audience: String,
}

/// Verifies Kubernetes service-account tokens.
pub struct KubernetesAuth {
    config: KubernetesConfig,
    keys: RwLock<JwkSet>,
    last_reload: Mutex<Instant>,
}

impl fmt::Debug for KubernetesAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesAuth")
            .field("issuer", &self.config.issuer)
            .field("audience", &self.config.audience)
            .finish_non_exhaustive()
    }
}

fn read_jwks(path: &Path) -> Result<JwkSet, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not a JWKS (JSON Web Key Set): {e}", path.display()))
}

impl KubernetesAuth {
    /// Loads the JWKS; the error names the file and the problem.
    pub fn new(config: KubernetesConfig) -> Result<Self, String> {
        if config.issuer.is_empty() || config.audience.is_empty() {
            return Err("auth.kubernetes: issuer and audience must both be set".to_owned());
        }
        let keys = read_jwks(&config.jwks_file)?;
        if keys.keys.is_empty() {
            return Err(format!("{}: the JWKS holds no keys", config.jwks_file.display()));
        }
        Ok(Self {
            config,
            keys: RwLock::new(keys),
            last_reload: Mutex::new(Instant::now()),
        })
    }

    /// The caller identity a valid token proves.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        let invalid = |why: &str| AuthError(format!("the Kubernetes service-account token is not accepted: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("it is not a JWT"))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(invalid("its signature algorithm is not allowed"));
        }
        let kid = header.kid.ok_or_else(|| invalid("its header names no key (kid)"))?;
        let key = self
            .key(&kid)
            .ok_or_else(|| invalid("it is signed by a key the cluster's JWKS does not hold"))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        #[derive(Deserialize)]
        struct Claims {
            sub: String,
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| {
                invalid(match e.kind() {
                    ErrorKind::ExpiredSignature => "it has expired",
                    ErrorKind::ImmatureSignature => "it is not valid yet",
                    ErrorKind::InvalidIssuer => "its issuer is not the configured one",
                    ErrorKind::InvalidAudience => "its audience is not the configured one",
                    ErrorKind::MissingRequiredClaim(_) => "it lacks a required claim (exp, iss, aud, sub)",
                    _ => "its signature does not verify",
                })
            })?
            .claims;
        let rest = claims
            .sub
            .strip_prefix("system:serviceaccount:")
            .ok_or_else(|| invalid("it is not a service-account token"))?;
        match rest.split_once(':') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains(':') => {
                Ok(claims.sub)
            }
            _ => Err(invalid("its subject is not system:serviceaccount:<namespace>:<name>")),
        }
    }

    /// The key for `kid`, re-reading the JWKS file (rate-limited) when it is unknown.
    fn key(&self, kid: &str) -> Option<DecodingKey> {
        let find = |keys: &JwkSet| keys.find(kid).and_then(|jwk| DecodingKey::from_jwk(jwk).ok());
        if let Some(key) = self.keys.read().ok().and_then(|keys| find(&keys)) {
            return Some(key);
        }
        {
            let mut last = self
                .last_reload
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.elapsed() < JWKS_RELOAD_INTERVAL {
                return None;
            }
            *last = Instant::now();
        }
        match read_jwks(&self.config.jwks_file) {
            Ok(fresh) => {
                let key = find(&fresh);
                if let Ok(mut keys) = self.keys.write() {
                    *keys = fresh;
                }
                key
            }
            Err(problem) => {
                tracing::error!("re-reading the Kubernetes JWKS failed: {problem}");
                None
            }
        }
    }
}
