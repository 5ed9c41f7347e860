//! The one mapping from domain errors to `tonic::Status`.
//!
//! Caller mistakes get a precise code and a message that says what to fix.
//! Upstream failures get the diagnosis message (what the operator must fix),
//! never Box's raw response; internal failures get a generic message (the
//! detail was logged where it happened).

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetail, ErrorInfo, RetryInfo, StatusExt as _};

use crate::{admin::AdminError, auth::AuthError, boxapi::DiagnosisKind, cache::CacheError, error::BrokerError};

/// gRPC's retry pushback header: how long a client should wait before retrying.
const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

pub use crate::rpc::ERROR_DOMAIN;

/// A status with a `google.rpc.ErrorInfo` (`reason`, a constant clients may
/// branch on, and `metadata`, never a secret) besides its message, and, with
/// `retry_after`, a `google.rpc.RetryInfo` and gRPC's retry pushback.
pub fn detailed(
    code: Code,
    message: impl Into<String>,
    reason: &'static str,
    metadata: &[(&str, &str)],
    retry_after: Option<Duration>,
) -> Status {
    let info = ErrorInfo::new(
        reason,
        ERROR_DOMAIN,
        metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<std::collections::HashMap<_, _>>(),
    );
    let mut details = vec![ErrorDetail::from(info)];
    if let Some(wait) = retry_after {
        details.push(RetryInfo::new(Some(wait)).into());
    }
    let mut status = Status::with_error_details_vec(code, message, details);
    if let Some(wait) = retry_after
        && let Ok(value) = wait.as_millis().to_string().parse()
    {
        status.metadata_mut().insert(RETRY_PUSHBACK, value);
    }
    status
}

/// The `ErrorInfo` reason of an upstream failure of `kind`.
fn upstream_reason(kind: DiagnosisKind) -> (Code, &'static str) {
    match kind {
        DiagnosisKind::Misconfigured => (Code::FailedPrecondition, "BOX_APP_MISCONFIGURED"),
        DiagnosisKind::NotFound => (Code::NotFound, "BOX_SUBJECT_NOT_FOUND"),
        DiagnosisKind::Unavailable => (Code::Unavailable, "BOX_UNAVAILABLE"),
    }
}

impl From<&BrokerError> for Status {
    fn from(error: &BrokerError) -> Self {
        let message = error.to_string();
        match error {
            BrokerError::InvalidArgument(_) => detailed(Code::InvalidArgument, message, "INVALID_REQUEST", &[], None),
            BrokerError::AppRequired { .. } => detailed(Code::InvalidArgument, message, "APP_REQUIRED", &[], None),
            BrokerError::UnknownApp { .. } => detailed(Code::NotFound, message, "UNKNOWN_APP", &[], None),
            BrokerError::NotIssued(_) => detailed(Code::NotFound, message, "TOKEN_NOT_FOUND", &[], None),
            BrokerError::FailedPrecondition(_) => {
                detailed(Code::FailedPrecondition, message, "FAILED_PRECONDITION", &[], None)
            }
            BrokerError::UserRefused { inactive: true, .. } => {
                detailed(Code::FailedPrecondition, message, "BOX_USER_INACTIVE", &[], None)
            }
            BrokerError::UserRefused { inactive: false, .. } => {
                detailed(Code::PermissionDenied, message, "BOX_USER_NOT_TOKENIZABLE", &[], None)
            }
            BrokerError::Retry(_) => detailed(Code::Unavailable, message, "RETRY", &[], None),
            BrokerError::PermissionDenied(_) => detailed(Code::PermissionDenied, message, "POLICY_DENIED", &[], None),
            BrokerError::Cache(CacheError::Upstream(upstream)) | BrokerError::Upstream(upstream) => {
                let (code, reason) = upstream_reason(upstream.diagnosis.kind);
                detailed(
                    code,
                    upstream.diagnosis.message.clone(),
                    reason,
                    &[("app", &upstream.app)],
                    upstream.diagnosis.retry_after,
                )
            }
            BrokerError::Internal(what) => detailed(Code::Internal, *what, "INTERNAL", &[], None),
            BrokerError::Cache(CacheError::MinTtlUnmet { available }) => detailed(
                Code::Unavailable,
                format!(
                    "min_ttl cannot be met: the freshest token Box issued has only {} s left beyond the broker's safety margin; ask for a smaller min_ttl",
                    available.as_secs()
                ),
                "MIN_TTL_UNMET",
                &[("available_secs", &available.as_secs().to_string())],
                None,
            ),
            BrokerError::Cache(CacheError::MinTtlUnmetUpstreamDown { available, upstream }) => detailed(
                Code::Unavailable,
                format!(
                    "min_ttl cannot be met: the cached token has {} s left beyond the broker's safety margin, and no newer one could be had: {}; ask for a smaller min_ttl, or retry later",
                    available.as_secs(),
                    upstream.diagnosis.message
                ),
                "MIN_TTL_UNMET",
                &[
                    ("available_secs", &available.as_secs().to_string()),
                    ("app", &upstream.app),
                ],
                upstream.diagnosis.retry_after,
            ),
            BrokerError::Cache(CacheError::TaskFailed) => detailed(
                Code::Internal,
                "internal error while minting the token",
                "INTERNAL",
                &[],
                None,
            ),
            BrokerError::Cache(CacheError::BeingRevoked(message)) => {
                detailed(Code::Unavailable, *message, "RETRY", &[], None)
            }
            BrokerError::Cache(CacheError::Busy(message)) => {
                detailed(Code::ResourceExhausted, message.clone(), "CALLER_BUSY", &[], None)
            }
        }
    }
}

impl From<BrokerError> for Status {
    fn from(error: BrokerError) -> Self {
        Self::from(&error)
    }
}

impl From<AdminError> for Status {
    fn from(error: AdminError) -> Self {
        match error {
            AdminError::InvalidArgument(message) => {
                detailed(Code::InvalidArgument, message, "INVALID_REQUEST", &[], None)
            }
            AdminError::NotFound(message) => detailed(Code::NotFound, message, "NOT_FOUND", &[], None),
            AdminError::FailedPrecondition(message) => {
                detailed(Code::FailedPrecondition, message, "FAILED_PRECONDITION", &[], None)
            }
            // The path and the OS's words are the operator's, in the log;
            // the caller learns that nothing changed.
            AdminError::Store(e) => {
                tracing::error!(error = %e, "writing the key store failed; the change was not made");
                detailed(
                    Code::Internal,
                    "the key store could not be written, so the change was not made; the broker's log says why",
                    "KEY_STORE_FAILED",
                    &[],
                    None,
                )
            }
        }
    }
}

impl From<AuthError> for Status {
    fn from(error: AuthError) -> Self {
        detailed(Code::Unauthenticated, error.0, "UNAUTHENTICATED", &[], None)
    }
}
