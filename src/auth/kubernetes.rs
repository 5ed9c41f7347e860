//! Kubernetes projected service-account tokens: `authorization: Bearer <jwt>`,
//! verified against the cluster's JWKS with a pinned issuer and audience and
//! an unexpired `exp`. The caller's identity is the token's `sub`,
//! `system:serviceaccount:<namespace>:<name>`.
//!
//! A caller presents the same token on every request (the kubelet rotates it
//! hourly), so a verified token is remembered — by its SHA-256, for at most
//! [`VERIFIED_TTL`] and never past its `exp` — instead of parsing it and
//! checking its RSA/ECDSA signature on every request.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::JwkSet};
use serde::Deserialize;

use super::AuthError;

/// The JWKS is fetched again for an unknown `kid` (key rotation) at most this often.
const JWKS_RELOAD_INTERVAL: Duration = Duration::from_secs(30);
/// Keys older than this are refreshed (in the request that notices), so a key
/// the cluster stopped publishing stops being trusted. Failing refreshes keep
/// the keys already held.
const JWKS_MAX_AGE: Duration = Duration::from_secs(300);
/// How long one fetch from the API server may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Clock difference tolerated between the API server and the broker.
const LEEWAY_SECS: u64 = 5;
/// How long a verified token is remembered (never past its `exp`). A key the
/// cluster stops publishing stops vouching for its tokens after at most
/// the JWKS refresh age (5 minutes) plus this.
pub const VERIFIED_TTL: Duration = Duration::from_secs(60);
/// The most verified tokens remembered (one per calling pod, typically).
const VERIFIED_MAX: u64 = 10_000;
/// The signature algorithms Kubernetes service-account issuers use.
const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::PS256,
];

/// `[auth.kubernetes]`: where the cluster's keys come from (exactly one of
/// `jwks_file`, `jwks_url`, `discovery_url`) and what the tokens must say.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The cluster's JWKS (`kubectl get --raw /openid/v1/jwks`), as a file.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// The cluster's JWKS over HTTPS, e.g. `https://kubernetes.default.svc/openid/v1/jwks`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// The issuer's OpenID discovery document, e.g.
    /// `https://kubernetes.default.svc/.well-known/openid-configuration`; its
    /// `issuer` must equal `issuer`, and its `jwks_uri` is fetched.
    #[serde(default)]
    pub discovery_url: Option<String>,
    /// PEM CA bundle that the URL's server certificate must chain to, e.g.
    /// `/var/run/secrets/kubernetes.io/serviceaccount/ca.crt`. Without it,
    /// the public web roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A bearer token file sent with each fetch (the API server serves its
    /// keys to service accounts), e.g. `/var/run/secrets/kubernetes.io/serviceaccount/token`.
    /// Re-read on every fetch, since projected tokens rotate.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The service-account issuer (`--service-account-issuer`), pinned.
    pub issuer: String,
    /// The audience the projected token was requested for, pinned.
    pub audience: String,
}

impl KubernetesConfig {
    /// Resolves relative file paths against `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        for path in [&mut self.jwks_file, &mut self.ca_file, &mut self.token_file]
            .into_iter()
            .flatten()
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }
}

/// Where the keys come from.
enum Source {
    File(PathBuf),
    Url {
        client: reqwest::Client,
        /// The JWKS itself, or the discovery document that names it.
        url: String,
        discovery: bool,
        token_file: Option<PathBuf>,
    },
}

/// Verifies Kubernetes service-account tokens.
pub struct KubernetesAuth {
    config: KubernetesConfig,
    source: Source,
    keys: RwLock<(JwkSet, Instant)>,
    /// The last reload attempt (none yet after the initial load); held while
    /// one runs, so there is one at a time.
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
    /// SHA-256 of a verified token -> (identity, `exp`).
    verified: moka::future::Cache<[u8; 32], (Arc<str>, u64)>,
    /// Signature verifications performed (the rest were remembered).
    signature_checks: AtomicU64,
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

impl Source {
    fn new(config: &KubernetesConfig) -> Result<Self, String> {
        let url = match (&config.jwks_file, &config.jwks_url, &config.discovery_url) {
            (Some(file), None, None) => return Ok(Self::File(file.clone())),
            (None, Some(url), None) => (url.clone(), false),
            (None, None, Some(url)) => (url.clone(), true),
            _ => {
                return Err("auth.kubernetes: set exactly one of jwks_file, jwks_url and discovery_url".to_owned());
            }
        };
        check_key_url(&url.0).map_err(|problem| format!("auth.kubernetes: {problem}"))?;
        let mut builder = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca).map_err(|e| format!("{}: cannot read: {e}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| format!("{}: not a PEM certificate bundle", ca.display()))?;
            builder = builder.tls_certs_only(certs);
        }
        let client = builder
            .build()
            .map_err(|e| format!("auth.kubernetes: cannot build the HTTP client: {e}"))?;
        Ok(Self::Url {
            client,
            url: url.0,
            discovery: url.1,
            token_file: config.token_file.clone(),
        })
    }

    /// Fetches the key set; the error names where from and what went wrong.
    async fn load(&self, issuer: &str) -> Result<JwkSet, String> {
        let (client, url, discovery, token_file) = match self {
            Self::File(path) => return read_jwks(path),
            Self::Url {
                client,
                url,
                discovery,
                token_file,
            } => (client, url, *discovery, token_file),
        };
        let token = match token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map(|t| t.trim().to_owned())
                    .map_err(|e| format!("{}: cannot read: {e}", path.display()))?,
            ),
            None => None,
        };
        let jwks_url = if discovery {
            #[derive(Deserialize)]
            struct Discovery {
                issuer: String,
                jwks_uri: String,
            }
            let document: Discovery = fetch_json(client, url, token.as_deref(), "an OpenID discovery document").await?;
            if document.issuer != issuer {
                return Err(format!(
                    "{url}: the discovery document's issuer {:?} is not the configured issuer {issuer:?}",
                    document.issuer
                ));
            }
            check_key_url(&document.jwks_uri)
                .map_err(|problem| format!("{url}: the discovery document's jwks_uri: {problem}"))?;
            document.jwks_uri
        } else {
            url.clone()
        };
        fetch_json(client, &jwks_url, token.as_deref(), "a JWKS (JSON Web Key Set)").await
    }
}

/// The cluster's keys decide who every caller is: they are fetched over
/// https, or plain http only from this host (`kubectl proxy`).
fn check_key_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|_| format!("{url:?} is not a URL"))?;
    let host = parsed.host_str().unwrap_or_default();
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(format!(
            "{url:?} is plain http: the cluster's keys must come over https (plain http only from this host, e.g. kubectl proxy)"
        )),
        _ => Err(format!("{url:?} is not an https URL")),
    }
}

async fn fetch_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    what: &str,
) -> Result<T, String> {
    let mut request = client.get(url).header("accept", "application/json");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|e| format!("{url}: cannot fetch: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("{url}: answered HTTP {status}"));
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("{url}: cannot read the body: {e}"))?;
    serde_json::from_slice(&body).map_err(|e| format!("{url}: not {what}: {e}"))
}

impl KubernetesAuth {
    /// Loads the keys (reading the file or fetching the URL); the error names
    /// the file or URL and the problem.
    pub async fn new(config: KubernetesConfig) -> Result<Self, String> {
        if config.issuer.is_empty() || config.audience.is_empty() {
            return Err("auth.kubernetes: issuer and audience must both be set".to_owned());
        }
        let source = Source::new(&config)?;
        let keys = source.load(&config.issuer).await?;
        if keys.keys.is_empty() {
            return Err("auth.kubernetes: the cluster's JWKS holds no keys".to_owned());
        }
        Ok(Self {
            config,
            source,
            keys: RwLock::new((keys, Instant::now())),
            last_attempt: tokio::sync::Mutex::new(None),
            verified: moka::future::Cache::builder()
                .max_capacity(VERIFIED_MAX)
                .time_to_live(VERIFIED_TTL)
                .build(),
            signature_checks: AtomicU64::new(0),
        })
    }

    /// How many token signatures were checked (a remembered token is not
    /// checked again).
    pub fn signature_checks(&self) -> u64 {
        self.signature_checks.load(Ordering::Relaxed)
    }

    /// True when `token` verified recently and is remembered (checking it
    /// again costs no signature verification).
    pub async fn is_remembered(&self, token: &str) -> bool {
        // The OS clock, as jsonwebtoken's exp check in `verify_signature`
        // reads it (not the injected clock, which jsonwebtoken cannot use).
        let now = unix_now();
        self.verified
            .get(&crate::fingerprint::digest(token))
            .await
            .is_some_and(|(_, exp)| now < exp.saturating_add(LEEWAY_SECS))
    }

    /// The caller identity a valid token proves.
    pub async fn verify(&self, token: &str) -> Result<Arc<str>, AuthError> {
        let digest = crate::fingerprint::digest(token);
        // The OS clock, as jsonwebtoken's exp check in `verify_signature`
        // reads it (not the injected clock, which jsonwebtoken cannot use).
        let now = unix_now();
        if let Some((identity, exp)) = self.verified.get(&digest).await
            && now < exp.saturating_add(LEEWAY_SECS)
        {
            return Ok(identity);
        }
        let (identity, exp) = self.verify_signature(token).await?;
        let identity: Arc<str> = identity.into();
        self.verified.insert(digest, (identity.clone(), exp)).await;
        Ok(identity)
    }

    /// Parses `token` and checks its signature and claims: (identity, `exp`).
    async fn verify_signature(&self, token: &str) -> Result<(String, u64), AuthError> {
        let invalid = |why: &str| AuthError(format!("the Kubernetes service-account token is not accepted: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("it is not a JWT"))?;
        if critical_extensions(token) {
            return Err(invalid(
                "its header marks extensions as critical (crit), and the broker implements none",
            ));
        }
        if !ALGORITHMS.contains(&header.alg) {
            return Err(invalid("its signature algorithm is not allowed"));
        }
        let kid = header.kid.ok_or_else(|| invalid("its header names no key (kid)"))?;
        let key = self
            .key(&kid)
            .await
            .ok_or_else(|| invalid("it is signed by a key the cluster's JWKS does not hold"))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        /// What the broker reads of the claims; every claim is optional
        /// here, so a missing one is reported by name, not as a parse error.
        #[derive(Deserialize)]
        struct Claims {
            sub: Option<String>,
            exp: Option<u64>,
        }
        self.signature_checks.fetch_add(1, Ordering::Relaxed);
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| {
                AuthError(format!(
                    "the Kubernetes service-account token is not accepted: {}",
                    match e.kind() {
                        ErrorKind::ExpiredSignature => "it has expired".to_owned(),
                        ErrorKind::ImmatureSignature => "it is not valid yet (its nbf is in the future)".to_owned(),
                        ErrorKind::InvalidIssuer => "its issuer is not the configured one".to_owned(),
                        ErrorKind::InvalidAudience => "its audience is not the configured one".to_owned(),
                        ErrorKind::MissingRequiredClaim(claim) => format!("it has no {claim} claim"),
                        ErrorKind::InvalidSignature => "its signature does not verify".to_owned(),
                        ErrorKind::Json(_) | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
                            "its claims are malformed (exp, iat and nbf must be numbers, sub a string)".to_owned()
                        }
                        _ => "it is not a valid signed JWT".to_owned(),
                    }
                ))
            })?
            .claims;
        let (Some(sub), Some(exp)) = (claims.sub, claims.exp) else {
            return Err(invalid("it has no sub or exp claim"));
        };
        let rest = sub
            .strip_prefix("system:serviceaccount:")
            .ok_or_else(|| invalid("it is not a service-account token"))?;
        match rest.split_once(':') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains(':') => {
                Ok((sub, exp))
            }
            _ => Err(invalid("its subject is not system:serviceaccount:<namespace>:<name>")),
        }
    }

    /// The key for `kid`. An unknown `kid` reloads the keys (at most once per
    /// [`JWKS_RELOAD_INTERVAL`]); keys older than [`JWKS_MAX_AGE`] are
    /// refreshed by whichever request notices first, while the others go on
    /// with the keys held.
    async fn key(&self, kid: &str) -> Option<DecodingKey> {
        let (found, stale) = {
            let held = self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            (find(&held.0, kid), held.1.elapsed() > JWKS_MAX_AGE)
        };
        let mut last_attempt = match (&found, stale) {
            (Some(_), false) => return found,
            // Stale but usable: refresh unless someone already is.
            (Some(_), true) => match self.last_attempt.try_lock() {
                Ok(guard) => guard,
                Err(_) => return found,
            },
            (None, _) => self.last_attempt.lock().await,
        };
        if last_attempt.is_some_and(|at| at.elapsed() < JWKS_RELOAD_INTERVAL) {
            // Someone reloaded just now (perhaps while this request waited).
            let held = self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            return find(&held.0, kid).or(found);
        }
        *last_attempt = Some(Instant::now());
        match self.source.load(&self.config.issuer).await {
            Ok(fresh) if !fresh.keys.is_empty() => {
                let key = find(&fresh, kid);
                let mut held = self.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                *held = (fresh, Instant::now());
                key
            }
            Ok(_) => {
                tracing::error!("the Kubernetes JWKS now holds no keys; keeping the keys held");
                found
            }
            Err(problem) => {
                tracing::error!("reloading the Kubernetes JWKS failed, keeping the keys held: {problem}");
                found
            }
        }
    }
}

/// True when the token's header has a `crit` member (RFC 7515 §4.1.11: a
/// verifier must refuse a token naming extensions it does not implement).
fn critical_extensions(token: &str) -> bool {
    use base64::Engine as _;
    let Some(header) = token.split('.').next() else {
        return false;
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .is_some_and(|header| header.get("crit").is_some())
}

fn find(keys: &JwkSet, kid: &str) -> Option<DecodingKey> {
    keys.find(kid).and_then(|jwk| DecodingKey::from_jwk(jwk).ok())
}

/// Unix seconds on the OS clock: the clock jsonwebtoken validates `exp` and
/// `nbf` against, so a remembered token expires when a fresh check would
/// fail.
fn unix_now() -> u64 {
    crate::clock::system_now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
