//! The broker's domain errors. `service::status` is the one place that turns
//! them into gRPC statuses.

use std::sync::Arc;

use crate::{
    boxapi::{BoxSubject, Diagnosis},
    cache::CacheError,
};

/// Minting failed upstream; the diagnosis says what to fix.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", diagnosis.message)]
pub struct UpstreamError {
    /// The app's configured name.
    pub app: Arc<str>,
    /// Whose token was asked for.
    pub subject: BoxSubject,
    /// What went wrong and what to do.
    pub diagnosis: Diagnosis,
}

/// Why a request could not be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The request is malformed; the message says which field and why.
    #[error("{0}")]
    InvalidArgument(String),
    /// No app has that name.
    #[error("no app named \"{name}\" is configured (configured: {})", configured.join(", "))]
    UnknownApp {
        /// The name asked for (already sanitised).
        name: String,
        /// The configured names.
        configured: Vec<String>,
    },
    /// The request named no app and several are configured.
    #[error("app is required because several apps are configured ({})", configured.join(", "))]
    AppRequired {
        /// The configured names.
        configured: Vec<String>,
    },
    /// The token to revoke is not one this broker holds.
    #[error("{0}")]
    NotIssued(String),
    /// The policy does not allow the request; the reason names the first offending item.
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller did not prove who it is.
    #[error("{0}")]
    Unauthenticated(String),
    /// The cache could not serve a token.
    #[error(transparent)]
    Cache(#[from] CacheError),
}
