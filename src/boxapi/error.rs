//! What went wrong talking to Box, and what the operator should do about it.
//!
//! [`BoxApiError`] records what Box (or the network) said. [`diagnose`] turns
//! it into a [`Diagnosis`]: a kind the gRPC layer maps to a status code, and a
//! message that tells the operator what to fix (box-contract.md §2.5, §4).

use std::time::{Duration, SystemTime};

use super::BoxSubject;

/// Box's error body, in either shape it uses (box-contract.md §2.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    /// HTTP status.
    pub status: u16,
    /// `error` (OAuth shape) or `code` (Box's generic shape).
    pub code: String,
    /// `error_description` or `message`, shortened, control characters removed.
    pub description: String,
    /// Box's request id, when it sent one.
    pub request_id: Option<String>,
    /// Box's `Date` header, for clock-skew diagnosis.
    pub server_date: Option<SystemTime>,
}

/// A failed call to Box.
#[derive(Debug, thiserror::Error)]
pub enum BoxApiError {
    /// Box answered with an error.
    #[error("Box answered HTTP {} {}: {}", .0.status, .0.code, .0.description)]
    Rejected(OAuthError),
    /// HTTP 429.
    #[error("Box is rate limiting (HTTP 429, retry after {retry_after:?})")]
    RateLimited {
        /// From `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// HTTP 5xx.
    #[error("Box answered HTTP {status}")]
    ServerError {
        /// The status.
        status: u16,
    },
    /// Box could not be reached, or did not answer in time.
    #[error("Box could not be reached: {detail}")]
    Transport {
        /// True when the request timed out.
        timeout: bool,
        /// The transport error (no secrets: reqwest prints only the URL).
        detail: String,
    },
    /// Box answered 200 with a body the broker cannot use. The body is never
    /// quoted: it may hold a token.
    #[error("Box's response could not be used: {0}")]
    Malformed(&'static str),
    /// The assertion could not be signed.
    #[error(transparent)]
    Signing(#[from] super::assertion::SigningError),
    /// Box has been failing or throttling; the broker is not asking it for now.
    #[error("the circuit to Box is open for {} more s", .retry_after.as_secs())]
    CircuitOpen {
        /// How long until the broker asks Box again.
        retry_after: Duration,
    },
}

impl BoxApiError {
    /// True for failures where asking again may help: throttling, server
    /// errors, and connection failures or timeouts.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. } | Self::ServerError { .. } | Self::Transport { .. }
        )
    }

    /// Box's `Date` when it refused the assertion's `exp` or `jti`: its clock
    /// and ours disagree (box-contract.md §2.7).
    pub fn clock_skew_date(&self) -> Option<SystemTime> {
        match self {
            Self::Rejected(e)
                if e.code == "invalid_grant"
                    && (e.description.contains("'exp'") || e.description.contains("'jti'")) =>
            {
                e.server_date
            }
            _ => None,
        }
    }
}

/// What kind of failure, for the gRPC status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiagnosisKind {
    /// The app's setup (in Box or in the broker's config) must be fixed by an operator.
    Misconfigured,
    /// Box does not know the subject or target, or will not tokenize it.
    NotFound,
    /// Box is unavailable, throttling, or answered nonsense; retrying may help.
    Unavailable,
}

/// A failure with a message that says what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    /// The class of failure.
    pub kind: DiagnosisKind,
    /// One sentence for the caller and the operator; no secrets, no internals.
    pub message: String,
    /// When Box asked to wait before retrying.
    pub retry_after: Option<Duration>,
}

impl Diagnosis {
    pub(crate) fn new(kind: DiagnosisKind, message: String) -> Self {
        Self {
            kind,
            message,
            retry_after: None,
        }
    }
}

/// How the request Box refused authenticated, for its diagnosis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant<'a> {
    /// A JWT assertion signed with the key Box knows as `kid`.
    Jwt {
        /// The key's id.
        kid: &'a str,
    },
    /// The Client Credentials Grant.
    Ccg,
    /// No grant of the app's own: a token exchange or a revocation.
    Other,
}

/// Explains `error`, which happened while minting a token for `subject` of
/// the app whose client id is `client_id`, authenticating with `grant`.
pub fn diagnose(error: &BoxApiError, subject: &BoxSubject, client_id: &str, grant: Grant<'_>) -> Diagnosis {
    let ccg = grant == Grant::Ccg;
    use DiagnosisKind::{Misconfigured, NotFound, Unavailable};
    let e = match error {
        BoxApiError::Rejected(e) => e,
        BoxApiError::RateLimited { retry_after } => {
            let hint = retry_after.map_or_else(String::new, |d| format!("; Box asks to retry after {} s", d.as_secs()));
            return Diagnosis {
                kind: Unavailable,
                message: format!("Box is rate limiting token requests (HTTP 429){hint}"),
                retry_after: *retry_after,
            };
        }
        BoxApiError::CircuitOpen { retry_after } => return circuit_open(*retry_after),
        BoxApiError::ServerError { status } => {
            return Diagnosis::new(
                Unavailable,
                format!("Box's token endpoint failed (HTTP {status}); retry later"),
            );
        }
        BoxApiError::Transport { timeout: true, .. } => {
            return Diagnosis::new(
                Unavailable,
                "Box's token endpoint did not answer in time; retry later".to_owned(),
            );
        }
        BoxApiError::Transport { .. } => {
            return Diagnosis::new(
                Unavailable,
                "Box's token endpoint could not be reached; retry later".to_owned(),
            );
        }
        BoxApiError::Malformed(_) => {
            return Diagnosis::new(
                Unavailable,
                "Box's token endpoint returned a response the broker cannot use".to_owned(),
            );
        }
        BoxApiError::Signing(_) => {
            return Diagnosis::new(
                Misconfigured,
                "the broker could not sign the JWT assertion with the app's key".to_owned(),
            );
        }
    };
    let d = e.description.to_ascii_lowercase();
    let kid = match grant {
        Grant::Jwt { kid } => kid,
        Grant::Ccg | Grant::Other => "(none)",
    };
    let (kind, message) = match e.code.as_str() {
        "unauthorized_client" => (
            Misconfigured,
            format!(
                "the Box app is not authorized in the Admin Console: a Box admin must authorize client id {client_id} \
                 (Admin Console > Integrations > Platform Apps Manager)"
            ),
        ),
        "invalid_client" => (
            Misconfigured,
            format!("Box rejected the app's client credentials: check the client secret configured for client id {client_id}"),
        ),
        "invalid_request" if d.contains("user token") => (
            Misconfigured,
            format!(
                "Box will not issue user tokens for this app: enable \"Generate user access tokens\" (and \"App + Enterprise Access\" \
                 for Managed Users) in the developer console, then reauthorize the app (asked for {subject})"
            ),
        ),
        "invalid_request" if d.contains("grant type is unauthorized") => (
            Misconfigured,
            format!(
                "the Box app is not set up for {}: change its authentication method in the developer console or the broker's config",
                if ccg { "Client Credentials Grant" } else { "JWT (server authentication with a key pair)" }
            ),
        ),
        "invalid_request" if d.contains("grant_type") => (
            Misconfigured,
            "the token endpoint did not recognise the grant: check that api_base_url points at https://api.box.com".to_owned(),
        ),
        // Box's signature message also mentions `kid`, so it is matched first.
        "invalid_grant" if d.contains("signature") => (
            Misconfigured,
            format!("Box could not verify the assertion's signature: the private key does not match the public key registered as {kid}"),
        ),
        "invalid_grant" if d.contains("kid") => (
            Misconfigured,
            format!("Box does not know public key id {kid}: upload the public key in the developer console or fix publicKeyID"),
        ),
        "invalid_grant" if d.contains("'sub'") || d.contains("`sub`") || d.contains("sub claim") => match subject {
            BoxSubject::User(id) => (
                NotFound,
                format!("Box rejected user {id}: no such App User or Managed User in this app's enterprise (external users cannot be tokenized)"),
            ),
            BoxSubject::Enterprise(id) => (
                Misconfigured,
                format!("Box rejected enterprise {id}: check enterpriseID and that the app is authorized in that enterprise"),
            ),
        },
        "invalid_grant" if d.contains("exp") => (
            Misconfigured,
            "Box rejected the assertion's expiry time: the broker's clock differs from Box's; check NTP on the broker's host".to_owned(),
        ),
        "invalid_grant" if d.contains("jti") => {
            (Unavailable, "Box rejected the assertion's jti as reused; retry (a new jti is generated on every attempt)".to_owned())
        }
        "invalid_grant" if d.contains("grant credentials") || ccg => match subject {
            BoxSubject::User(id) => (
                NotFound,
                format!(
                    "Box rejected the client credentials grant for user {id}: the user may not exist in this enterprise, \
                     the app's access level may not permit it, or user tokens may be disabled"
                ),
            ),
            BoxSubject::Enterprise(id) => (
                Misconfigured,
                format!(
                    "Box rejected the client credentials grant for enterprise {id}: check the client id and secret, \
                     the enterprise id, and that the app is authorized (reauthorize after changing app settings)"
                ),
            ),
        },
        "invalid_grant" => (Misconfigured, format!("Box rejected the JWT assertion ({}): check the app's configuration", e.description)),
        _ if e.status == 401 || e.status == 403 => (
            Misconfigured,
            format!("Box refused the token request (HTTP {}{}): check the app's configuration", e.status, code_suffix(e)),
        ),
        _ => (Unavailable, format!("Box's token endpoint answered HTTP {}{}", e.status, code_suffix(e))),
    };
    Diagnosis::new(kind, message)
}

/// The circuit to Box is open for `retry_after` more: said the same way for every call.
pub(crate) fn circuit_open(retry_after: Duration) -> Diagnosis {
    Diagnosis {
        kind: DiagnosisKind::Unavailable,
        message: format!(
            "Box has been failing or throttling, so the broker is not asking it for {} s; retry then",
            retry_after.as_secs_f64().ceil().max(1.0)
        ),
        retry_after: Some(retry_after),
    }
}

fn code_suffix(e: &OAuthError) -> String {
    if e.code.is_empty() {
        String::new()
    } else {
        format!(" {}", e.code)
    }
}

/// Explains a failed token exchange of `subject`'s token for `target`.
pub fn diagnose_exchange(error: &BoxApiError, subject: &BoxSubject, target: Option<&super::Target>) -> Diagnosis {
    use DiagnosisKind::{Misconfigured, NotFound, Unavailable};
    let BoxApiError::Rejected(e) = error else {
        // Transport, throttling and server errors read the same as for a mint.
        return diagnose(error, subject, "", Grant::Other);
    };
    let what = target.map_or_else(|| "the item".to_owned(), ToString::to_string);
    match e.code.as_str() {
        "invalid_resource" => Diagnosis::new(
            NotFound,
            format!("{what} does not exist or is not accessible to {subject}"),
        ),
        _ if e.status == 401 || e.code == "invalid_scope" => Diagnosis::new(
            Misconfigured,
            format!(
                "Box refused the requested scopes for {subject}: the app's token does not hold them; \
                 check the app's application scopes in the developer console"
            ),
        ),
        "invalid_grant" => Diagnosis::new(
            Unavailable,
            format!("Box no longer accepts {subject}'s token for the exchange (revoked or expired); retry"),
        ),
        "invalid_request" => Diagnosis::new(
            Misconfigured,
            format!("Box refused the token exchange for {what}: {}", e.description),
        ),
        _ => diagnose(error, subject, "", Grant::Other),
    }
}
