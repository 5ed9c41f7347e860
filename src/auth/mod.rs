//! Who is calling. Each listener has its own [`Authenticator`], accepting
//! some of: mTLS client certificates (the URI SAN, else the DNS SAN), static
//! API keys (the `x-api-key` header; only SHA-256 hashes are configured,
//! compared in constant time), Kubernetes projected service-account tokens
//! (`authorization: Bearer`, see [`kubernetes`]), the peer of a Unix socket
//! (a configured identity, optionally uid-checked), and the anonymous caller,
//! refused unless the config explicitly allows it (dev mode does, and says so).
//!
//! A caller identity names its mechanism, so two mechanisms can never yield
//! the same identity (a certificate with DNS SAN `portal` is not the API
//! key `portal`):
//!
//! | mechanism | identity |
//! |---|---|
//! | API key | `apikey:<configured identity>` |
//! | client certificate, SPIFFE URI SAN | `spiffe://…` (as written) |
//! | client certificate, other URI SAN | `uri:<uri>` |
//! | client certificate, DNS SAN | `dns:<name>` |
//! | Kubernetes service account | `system:serviceaccount:<namespace>:<name>` (Kubernetes' own form) |
//! | Unix socket | `uds:<configured identity>` |
//! | none (when allowed) | `anonymous` |
//!
//! Authentication reads only headers and what the transport knows of the
//! connection ([`Peer`]): it runs before a request's body is read.

pub mod kubernetes;
pub mod peer;

use std::{
    fmt,
    sync::{Arc, LazyLock},
};

use kubernetes::KubernetesAuth;
pub use peer::{Peer, peer_ip_key};
use tonic::codegen::http::{HeaderMap, HeaderName};

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// The header an API key is sent in.
pub const API_KEY_HEADER: &str = "x-api-key";

/// The request headers looked up on every request, as static names (a
/// `&str` name is parsed on each lookup).
static API_KEY_NAME: HeaderName = HeaderName::from_static(API_KEY_HEADER);
static AUTHORIZATION_NAME: HeaderName = HeaderName::from_static("authorization");

/// The identity prefixes of the mechanisms that name their callers by configuration.
pub const API_KEY_PREFIX: &str = "apikey:";
/// See [`API_KEY_PREFIX`].
pub const UNIX_SOCKET_PREFIX: &str = "uds:";

/// An authenticated caller. Each variant holds the whole identity, its
/// mechanism's prefix included (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerIdentity {
    /// No credentials; allowed only by `[server] allow_anonymous = true`.
    Anonymous,
    /// `apikey:<identity>`: a configured API key.
    ApiKey(Arc<str>),
    /// `system:serviceaccount:<namespace>:<name>`: a Kubernetes service account.
    ServiceAccount(Arc<str>),
    /// `uds:<identity>`: whoever connects to a Unix socket listener.
    UnixSocket(Arc<str>),
    /// `spiffe://…`, `uri:…` or `dns:…`: an mTLS client certificate's URI
    /// SAN or, failing that, DNS SAN.
    Certificate(Arc<str>),
}

impl CallerIdentity {
    /// The identity policy rules match against.
    pub fn name(&self) -> &str {
        match self {
            Self::Anonymous => "anonymous",
            Self::ApiKey(identity)
            | Self::ServiceAccount(identity)
            | Self::UnixSocket(identity)
            | Self::Certificate(identity) => identity,
        }
    }

    /// The same, shared (for audit records: no copy per request).
    pub fn shared_name(&self) -> Arc<str> {
        static ANONYMOUS: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("anonymous"));
        match self {
            Self::Anonymous => ANONYMOUS.clone(),
            Self::ApiKey(identity)
            | Self::ServiceAccount(identity)
            | Self::UnixSocket(identity)
            | Self::Certificate(identity) => identity.clone(),
        }
    }
}

impl fmt::Display for CallerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A configured API key: (identity, SHA-256 of the key).
type ApiKey = (Arc<str>, [u8; 32]);

/// Decides who a request comes from, on one listener.
#[derive(Clone)]
pub struct Authenticator {
    allow_anonymous: bool,
    /// (identity, SHA-256 of the key); `None` when this listener takes no API keys.
    api_keys: Option<Arc<[ApiKey]>>,
    kubernetes: Option<Arc<KubernetesAuth>>,
    /// On a Unix socket listener: the identity of every peer, and the uids allowed.
    unix_socket: Option<(Arc<str>, Vec<u32>)>,
    /// A client certificate (verified by the TLS layer) is an identity here.
    certificates: bool,
    /// SHA-256 of a client certificate (DER) -> the identity in it: a
    /// connection presents the same certificate on every request, so it is
    /// parsed once, not per request.
    certificate_identities: moka::future::Cache<[u8; 32], Arc<str>>,
}

/// The most client certificates whose identities are remembered.
const CERTIFICATE_IDENTITIES_MAX: u64 = 10_000;

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("allow_anonymous", &self.allow_anonymous)
            .field(
                "api_keys",
                &self
                    .api_keys
                    .as_ref()
                    .map(|k| k.iter().map(|(id, _)| id).collect::<Vec<_>>()),
            )
            .field("kubernetes", &self.kubernetes)
            .field("unix_socket", &self.unix_socket)
            .field("certificates", &self.certificates)
            .finish()
    }
}

/// The caller could not be authenticated. The message never echoes a credential.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

/// Whether a listener admits callers that present no credentials (as the
/// identity `anonymous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anonymous {
    /// Callers without credentials are refused (UNAUTHENTICATED).
    Refused,
    /// Callers without credentials are `anonymous`.
    Admitted,
}

impl Anonymous {
    /// [`Self::Admitted`] when `allowed` (a config's `allow_anonymous`).
    pub fn admitted_if(allowed: bool) -> Self {
        if allowed { Self::Admitted } else { Self::Refused }
    }
}

impl Authenticator {
    /// An authenticator accepting nothing yet but, when `anonymous` says
    /// so, callers without credentials.
    pub fn new(anonymous: Anonymous) -> Self {
        Self {
            allow_anonymous: anonymous == Anonymous::Admitted,
            api_keys: None,
            kubernetes: None,
            unix_socket: None,
            certificates: false,
            certificate_identities: moka::future::Cache::new(CERTIFICATE_IDENTITIES_MAX),
        }
    }

    /// Takes the caller's identity from its client certificate (the listener
    /// serves TLS and verifies certificates against the configured CA). With
    /// no other mechanism, a certificate is required; with others, a caller
    /// without one may use those.
    #[must_use]
    pub fn with_mtls(mut self) -> Self {
        self.certificates = true;
        self
    }

    /// The authenticator of a Unix socket listener: every peer is `identity`,
    /// provided its uid is in `allowed_uids` (any uid when empty). Nothing
    /// else is accepted there: the socket's file permissions and the uid
    /// check are the trust boundary of a sidecar.
    pub fn unix_socket(identity: &str, allowed_uids: Vec<u32>) -> Self {
        Self {
            unix_socket: Some((format!("{UNIX_SOCKET_PREFIX}{identity}").into(), allowed_uids)),
            ..Self::new(Anonymous::Refused)
        }
    }

    /// Accepts Kubernetes service-account tokens verified by `kubernetes`.
    #[must_use]
    pub fn with_kubernetes(mut self, kubernetes: Arc<KubernetesAuth>) -> Self {
        self.kubernetes = Some(kubernetes);
        self
    }

    /// Accepts API keys, given as (configured identity, SHA-256 of the
    /// key); a key's caller is `apikey:<identity>`.
    #[must_use]
    pub fn with_api_keys(mut self, keys: Vec<(String, [u8; 32])>) -> Self {
        self.api_keys = Some(
            keys.into_iter()
                .map(|(identity, hash)| (format!("{API_KEY_PREFIX}{identity}").into(), hash))
                .collect(),
        );
        self
    }

    /// True when callers without credentials are admitted.
    pub fn allows_anonymous(&self) -> bool {
        self.allow_anonymous
    }

    /// What this listener accepts, for error messages.
    fn accepted(&self) -> String {
        let mut ways = Vec::new();
        if self.certificates {
            ways.push("a client certificate from the configured CA".to_owned());
        }
        if self.api_keys.is_some() {
            ways.push(format!("an API key in the {API_KEY_HEADER} header"));
        }
        if self.kubernetes.is_some() {
            ways.push("a Kubernetes service-account token as `authorization: Bearer`".to_owned());
        }
        match ways.len() {
            0 => "this listener accepts no credentials (see [server] accept)".to_owned(),
            _ => format!("this listener accepts {}", ways.join(", or ")),
        }
    }

    /// True when authenticating this request would verify a signature (a
    /// Kubernetes token not verified recently): the work a peer that keeps
    /// failing authentication is not given.
    pub async fn needs_signature_check(&self, headers: &HeaderMap, peer: &Peer) -> bool {
        if self.unix_socket.is_some()
            || (self.certificates && peer.certificates.as_ref().is_some_and(|c| !c.is_empty()))
            || headers.contains_key(&API_KEY_NAME)
        {
            return false;
        }
        let (Some(kubernetes), Some(authorization)) = (&self.kubernetes, headers.get(&AUTHORIZATION_NAME)) else {
            return false;
        };
        match authorization
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        {
            Some(token) => !kubernetes.is_remembered(token.trim()).await,
            None => false,
        }
    }

    /// Identifies the caller from its request headers and the connection's `peer`.
    pub async fn authenticate(&self, headers: &HeaderMap, peer: &Peer) -> Result<CallerIdentity, AuthError> {
        if let Some((identity, allowed_uids)) = &self.unix_socket {
            return unix_peer(peer, identity, allowed_uids);
        }
        if self.certificates
            && let Some(certs) = peer.certificates.as_ref().filter(|c| !c.is_empty())
        {
            let der: &[u8] = certs[0].as_ref();
            let fingerprint: [u8; 32] = Sha256::digest(der).into();
            if let Some(identity) = self.certificate_identities.get(&fingerprint).await {
                return Ok(CallerIdentity::Certificate(identity));
            }
            let identity: Arc<str> = certificate_identity(der)?.into();
            self.certificate_identities.insert(fingerprint, identity.clone()).await;
            return Ok(CallerIdentity::Certificate(identity));
        }
        if let Some(presented) = headers.get(&API_KEY_NAME) {
            let keys = self.api_keys.as_ref().ok_or_else(|| {
                AuthError(format!(
                    "API keys are not accepted on this listener: {}",
                    self.accepted()
                ))
            })?;
            return api_key(keys, presented.as_bytes());
        }
        if let Some(authorization) = headers.get(&AUTHORIZATION_NAME) {
            let token = authorization
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .ok_or_else(|| AuthError("the authorization header must be `Bearer <token>`".to_owned()))?;
            let kubernetes = self.kubernetes.as_ref().ok_or_else(|| {
                AuthError(format!(
                    "bearer tokens are not accepted on this listener: {}",
                    self.accepted()
                ))
            })?;
            return kubernetes
                .verify(token.trim())
                .await
                .map(CallerIdentity::ServiceAccount);
        }
        if self.allow_anonymous {
            return Ok(CallerIdentity::Anonymous);
        }
        Err(AuthError(format!(
            "no credentials (anonymous callers are not admitted): {}",
            self.accepted()
        )))
    }
}

fn api_key(keys: &[ApiKey], presented: &[u8]) -> Result<CallerIdentity, AuthError> {
    let hash: [u8; 32] = Sha256::digest(presented).into();
    // Compare against every key, without stopping early, in constant time.
    let mut found = None;
    for (identity, expected) in keys {
        if bool::from(hash.ct_eq(expected)) {
            found = Some(identity);
        }
    }
    found
        .map(|identity| CallerIdentity::ApiKey(identity.clone()))
        .ok_or_else(|| AuthError(format!("the {API_KEY_HEADER} header does not hold a valid API key")))
}

/// The identity in a client certificate: its first URI SAN (`spiffe://…` as
/// written, any other URI as `uri:<uri>`), or else its first DNS SAN as
/// `dns:<name>`. The TLS layer has already verified the chain.
fn certificate_identity(der: &[u8]) -> Result<String, AuthError> {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let bad = |why: &str| AuthError(format!("the client certificate is not usable: {why}"));
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| bad("it cannot be parsed"))?;
    let names = cert
        .subject_alternative_name()
        .map_err(|_| bad("its subject alternative names cannot be parsed"))?
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    let uri = names.iter().find_map(|n| match n {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some((*uri).to_owned()),
        GeneralName::URI(uri) => Some(format!("uri:{uri}")),
        _ => None,
    });
    let dns = || {
        names.iter().find_map(|n| match n {
            GeneralName::DNSName(dns) => Some(format!("dns:{dns}")),
            _ => None,
        })
    };
    uri.or_else(dns)
        .ok_or_else(|| bad("it has no URI (SPIFFE) or DNS subject alternative name"))
}

/// The identity of a Unix-socket peer, after the uid check.
fn unix_peer(peer: &Peer, identity: &Arc<str>, allowed_uids: &[u32]) -> Result<CallerIdentity, AuthError> {
    let uid = peer
        .uid
        .ok_or_else(|| AuthError("the Unix socket peer's credentials are not available".to_owned()))?;
    if !allowed_uids.is_empty() && !allowed_uids.contains(&uid) {
        return Err(AuthError(format!("uid {uid} is not allowed on this Unix socket")));
    }
    Ok(CallerIdentity::UnixSocket(identity.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_with_key(key: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Ok(value) = key.parse() {
            headers.insert(API_KEY_HEADER, value);
        }
        headers
    }

    fn tcp_peer() -> Peer {
        Peer {
            addr: "127.0.0.1:1".parse().ok(),
            uid: None,
            certificates: None,
        }
    }

    fn auth() -> Authenticator {
        Authenticator::new(Anonymous::Refused)
            .with_api_keys(vec![("billing".to_owned(), Sha256::digest(b"k-123").into())])
    }

    #[tokio::test]
    async fn a_valid_api_key_names_its_identity() {
        assert_eq!(
            auth().authenticate(&request_with_key("k-123"), &tcp_peer()).await.ok(),
            Some(CallerIdentity::ApiKey("apikey:billing".into()))
        );
    }

    #[tokio::test]
    async fn a_wrong_api_key_is_refused_without_echoing_it() {
        let err = auth()
            .authenticate(&request_with_key("guess-987"), &tcp_peer())
            .await
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert!(err.contains("not hold a valid API key"), "{err}");
        assert!(!err.contains("guess-987"));
    }

    #[tokio::test]
    async fn a_mechanism_this_listener_does_not_accept_is_refused_by_name() {
        let certificates_only = Authenticator::new(Anonymous::Refused).with_mtls();
        let err = certificates_only
            .authenticate(&request_with_key("k-123"), &tcp_peer())
            .await
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert_eq!(
            err,
            "API keys are not accepted on this listener: this listener accepts a client certificate from the configured CA"
        );
        let mut bearer = HeaderMap::new();
        if let Ok(value) = "Bearer abc.def.ghi".parse() {
            bearer.insert("authorization", value);
        }
        let err = auth()
            .authenticate(&bearer, &tcp_peer())
            .await
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert!(
            err.starts_with("bearer tokens are not accepted on this listener"),
            "{err}"
        );
        assert!(!err.contains("abc.def.ghi"), "{err}");
    }

    #[tokio::test]
    async fn no_credentials_are_refused_unless_anonymous_is_allowed() {
        assert!(auth().authenticate(&HeaderMap::new(), &tcp_peer()).await.is_err());
        assert_eq!(
            Authenticator::new(Anonymous::Admitted)
                .authenticate(&HeaderMap::new(), &tcp_peer())
                .await
                .ok(),
            Some(CallerIdentity::Anonymous)
        );
    }
}
