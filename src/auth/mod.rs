//! Who is calling. Mechanisms so far: static API keys (the `x-api-key`
//! header; only SHA-256 hashes are configured, compared in constant time),
//! Kubernetes projected service-account tokens (`authorization: Bearer`, see
//! [`kubernetes`]), and the anonymous caller, refused unless the config
//! explicitly allows it (dev mode does, and says so). mTLS and Unix-socket
//! peers are still to come.

pub mod kubernetes;

use std::{fmt, sync::Arc};

use kubernetes::KubernetesAuth;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// The header an API key is sent in.
pub const API_KEY_HEADER: &str = "x-api-key";

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerIdentity {
    /// No credentials; allowed only by `[server] allow_anonymous = true`.
    Anonymous,
    /// A configured API key's identity.
    ApiKey(String),
    /// A Kubernetes service account: `system:serviceaccount:<namespace>:<name>`.
    ServiceAccount(String),
    /// Whoever connects to a Unix socket listener: the name configured for it.
    UnixSocket(String),
    /// An mTLS client certificate's URI SAN (SPIFFE ID) or, failing that, DNS SAN.
    Certificate(String),
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
}

impl fmt::Display for CallerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Decides who a request comes from.
#[derive(Clone)]
pub struct Authenticator {
    allow_anonymous: bool,
    /// (identity, SHA-256 of the key).
    api_keys: Vec<(String, [u8; 32])>,
    kubernetes: Option<Arc<KubernetesAuth>>,
    /// On a Unix socket listener: the identity of every peer, and the uids allowed.
    unix_socket: Option<(String, Vec<u32>)>,
    /// On an mTLS listener: the client certificate is the identity.
    mtls: bool,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("allow_anonymous", &self.allow_anonymous)
            .field("api_keys", &self.api_keys.iter().map(|(id, _)| id).collect::<Vec<_>>())
            .field("kubernetes", &self.kubernetes)
            .finish()
    }
}

/// The caller could not be authenticated. The message never echoes a credential.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

impl Authenticator {
    /// An authenticator; `allow_anonymous` admits callers without credentials.
    pub fn new(allow_anonymous: bool) -> Self {
        Self {
            allow_anonymous,
            api_keys: Vec::new(),
            kubernetes: None,
            unix_socket: None,
            mtls: false,
        }
    }

    /// Takes the caller's identity from its client certificate (the listener
    /// serves TLS and requires certificates from the configured CA).
    #[must_use]
    pub fn with_mtls(mut self) -> Self {
        self.mtls = true;
        self
    }

    /// The authenticator of a Unix socket listener: every peer is `identity`,
    /// provided its uid is in `allowed_uids` (any uid when empty). Nothing
    /// else is accepted there: the socket's file permissions and the uid
    /// check are the trust boundary of a sidecar.
    pub fn unix_socket(identity: String, allowed_uids: Vec<u32>) -> Self {
        Self {
            allow_anonymous: false,
            api_keys: Vec::new(),
            kubernetes: None,
            unix_socket: Some((identity, allowed_uids)),
            mtls: false,
        }
    }

    /// Accepts Kubernetes service-account tokens verified by `kubernetes`.
    #[must_use]
    pub fn with_kubernetes(mut self, kubernetes: KubernetesAuth) -> Self {
        self.kubernetes = Some(Arc::new(kubernetes));
        self
    }

    /// Adds API keys, as (identity, SHA-256 of the key).
    #[must_use]
    pub fn with_api_keys(mut self, keys: Vec<(String, [u8; 32])>) -> Self {
        self.api_keys = keys;
        self
    }

    /// True when callers without credentials are admitted.
    pub fn allows_anonymous(&self) -> bool {
        self.allow_anonymous
    }

    /// Identifies the caller of `request`.
    pub fn authenticate<T>(&self, request: &tonic::Request<T>) -> Result<CallerIdentity, AuthError> {
        if let Some((identity, allowed_uids)) = &self.unix_socket {
            return unix_peer(request, identity, allowed_uids);
        }
        if self.mtls {
            let certs = request.peer_certs().filter(|c| !c.is_empty()).ok_or_else(|| {
                AuthError("this listener requires a client certificate from the configured CA".to_owned())
            })?;
            return certificate_identity(&certs[0]).map(CallerIdentity::Certificate);
        }
        if let Some(presented) = request.metadata().get(API_KEY_HEADER) {
            return self.api_key(presented.as_bytes());
        }
        if let Some(authorization) = request.metadata().get("authorization") {
            let token = authorization
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .ok_or_else(|| AuthError("the authorization header must be `Bearer <token>`".to_owned()))?;
            let kubernetes = self.kubernetes.as_ref().ok_or_else(|| {
                AuthError("bearer tokens are not accepted here: no [auth.kubernetes] is configured".to_owned())
            })?;
            return kubernetes.verify(token.trim()).map(CallerIdentity::ServiceAccount);
        }
        if self.allow_anonymous {
            return Ok(CallerIdentity::Anonymous);
        }
        Err(AuthError(format!(
            "no credentials: send an API key in the {API_KEY_HEADER} header or a Kubernetes service-account token as `authorization: Bearer` (anonymous callers are not admitted)"
        )))
    }

    fn api_key(&self, presented: &[u8]) -> Result<CallerIdentity, AuthError> {
        let hash: [u8; 32] = Sha256::digest(presented).into();
        // Compare against every key, without stopping early, in constant time.
        let mut found = None;
        for (identity, expected) in &self.api_keys {
            if bool::from(hash.ct_eq(expected)) {
                found = Some(identity);
            }
        }
        found
            .map(|identity| CallerIdentity::ApiKey(identity.clone()))
            .ok_or_else(|| AuthError(format!("the {API_KEY_HEADER} header does not hold a valid API key")))
    }
}

/// The identity in a client certificate: its first URI SAN (a SPIFFE ID), or
/// else its first DNS SAN. The TLS layer has already verified the chain.
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
        GeneralName::URI(uri) => Some((*uri).to_owned()),
        _ => None,
    });
    let dns = || {
        names.iter().find_map(|n| match n {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
    };
    uri.or_else(dns)
        .ok_or_else(|| bad("it has no URI (SPIFFE) or DNS subject alternative name"))
}

/// The identity of a Unix-socket peer, after the uid check.
#[cfg(unix)]
fn unix_peer<T>(
    request: &tonic::Request<T>,
    identity: &str,
    allowed_uids: &[u32],
) -> Result<CallerIdentity, AuthError> {
    let uid = request
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|cred| cred.uid())
        .ok_or_else(|| AuthError("the Unix socket peer's credentials are not available".to_owned()))?;
    if !allowed_uids.is_empty() && !allowed_uids.contains(&uid) {
        return Err(AuthError(format!("uid {uid} is not allowed on this Unix socket")));
    }
    Ok(CallerIdentity::UnixSocket(identity.to_owned()))
}

#[cfg(not(unix))]
fn unix_peer<T>(_: &tonic::Request<T>, _: &str, _: &[u32]) -> Result<CallerIdentity, AuthError> {
    Err(AuthError("Unix sockets are not supported on this platform".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_with_key(key: &str) -> tonic::Request<()> {
        let mut request = tonic::Request::new(());
        if let Ok(value) = key.parse() {
            request.metadata_mut().insert(API_KEY_HEADER, value);
        }
        request
    }

    fn auth() -> Authenticator {
        Authenticator::new(false).with_api_keys(vec![("billing".to_owned(), Sha256::digest(b"k-123").into())])
    }

    #[test]
    fn a_valid_api_key_names_its_identity() {
        assert_eq!(
            auth().authenticate(&request_with_key("k-123")).ok(),
            Some(CallerIdentity::ApiKey("billing".to_owned()))
        );
    }

    #[test]
    fn a_wrong_api_key_is_refused_without_echoing_it() {
        let err = auth()
            .authenticate(&request_with_key("guess-987"))
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert!(err.contains("not hold a valid API key"), "{err}");
        assert!(!err.contains("guess-987"));
    }

    #[test]
    fn no_credentials_are_refused_unless_anonymous_is_allowed() {
        assert!(auth().authenticate(&tonic::Request::new(())).is_err());
        assert_eq!(
            Authenticator::new(true).authenticate(&tonic::Request::new(())).ok(),
            Some(CallerIdentity::Anonymous)
        );
    }
}
