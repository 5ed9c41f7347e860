//! The broker's domain errors. `service::status` is the one place that turns
//! them into gRPC statuses.

use std::sync::Arc;

use crate::cache::{CacheError, UpstreamError};

/// ` (apps you may use: a, b)`, or nothing when there are none.
fn usable_apps(usable: &[String]) -> String {
    if usable.is_empty() {
        String::new()
    } else {
        format!(" (apps you may use: {})", usable.join(", "))
    }
}

/// Why a request could not be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The request is malformed; the message says which field and why.
    #[error("{0}")]
    InvalidArgument(String),
    /// No app has that name. Only the apps the caller may use are named.
    #[error("no app named \"{name}\" is configured{}", usable_apps(usable))]
    UnknownApp {
        /// The name asked for (already sanitised).
        name: String,
        /// The configured apps the caller's policy lets it use.
        usable: Vec<String>,
    },
    /// The request named no app and several are configured.
    #[error("app is required because several apps are configured{}", usable_apps(usable))]
    AppRequired {
        /// The configured apps the caller's policy lets it use.
        usable: Vec<String>,
    },
    /// The token to revoke is not one this broker holds.
    #[error("{0}")]
    NotIssued(String),
    /// The policy does not allow the request; the reason names the first offending item.
    #[error("{0}")]
    PermissionDenied(String),
    /// The request cannot be served in the current state; the message says why.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Box says the user may not be tokenized: an admin or co-admin (or
    /// another refused role), a user of another enterprise, or (`inactive`)
    /// a deactivated or locked user.
    #[error("{message}")]
    UserRefused {
        /// The user is not active (FAILED_PRECONDITION rather than PERMISSION_DENIED).
        inactive: bool,
        /// Who and why, and what would change it.
        message: String,
    },
    /// A passing state prevents it (a token being revoked); retrying soon works.
    #[error("{0}")]
    Retry(String),
    /// Box refused or failed a call the broker made itself (a revocation).
    #[error(transparent)]
    Upstream(Arc<UpstreamError>),
    /// A bug (logged where it happened); the message says only which operation.
    #[error("{0}")]
    Internal(&'static str),
    /// The cache could not serve a token.
    #[error(transparent)]
    Cache(#[from] CacheError),
}
