//! The one mapping from domain errors to `tonic::Status`.
//!
//! Caller mistakes get a precise code and a message that says what to fix.
//! Upstream failures get the diagnosis message (what the operator must fix),
//! never Box's raw response; internal failures get a generic message (the
//! detail was logged where it happened).

use tonic::{Code, Status};

use crate::{auth::AuthError, boxapi::DiagnosisKind, cache::CacheError, error::BrokerError};

/// gRPC's retry pushback header: how long a client should wait before retrying.
const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

impl From<&BrokerError> for Status {
    fn from(error: &BrokerError) -> Self {
        match error {
            BrokerError::InvalidArgument(_) | BrokerError::AppRequired { .. } => {
                Status::invalid_argument(error.to_string())
            }
            BrokerError::UnknownApp { .. } | BrokerError::NotIssued(_) => Status::not_found(error.to_string()),
            BrokerError::FailedPrecondition(_) => Status::failed_precondition(error.to_string()),
            BrokerError::Retry(_) => Status::unavailable(error.to_string()),
            BrokerError::PermissionDenied(_) => Status::permission_denied(error.to_string()),
            BrokerError::Cache(CacheError::Upstream(upstream)) => {
                let code = match upstream.diagnosis.kind {
                    DiagnosisKind::Misconfigured => Code::FailedPrecondition,
                    DiagnosisKind::NotFound => Code::NotFound,
                    DiagnosisKind::Unavailable => Code::Unavailable,
                };
                let mut status = Status::new(code, upstream.diagnosis.message.clone());
                if let Some(wait) = upstream.diagnosis.retry_after
                    && let Ok(value) = wait.as_millis().to_string().parse()
                {
                    status.metadata_mut().insert(RETRY_PUSHBACK, value);
                }
                status
            }
            BrokerError::Cache(CacheError::MinTtlUnmet { available }) => Status::unavailable(format!(
                "min_ttl cannot be met: the freshest token Box issued has only {} s left beyond the broker's safety margin; ask for a smaller min_ttl",
                available.as_secs()
            )),
            BrokerError::Cache(CacheError::MinTtlUnmetUpstreamDown { available, upstream }) => {
                let mut status = Status::unavailable(format!(
                    "min_ttl cannot be met: the cached token has {} s left beyond the broker's safety margin, and no newer one could be had: {}; ask for a smaller min_ttl, or retry later",
                    available.as_secs(),
                    upstream.diagnosis.message
                ));
                if let Some(wait) = upstream.diagnosis.retry_after
                    && let Ok(value) = wait.as_millis().to_string().parse()
                {
                    status.metadata_mut().insert(RETRY_PUSHBACK, value);
                }
                status
            }
            BrokerError::Cache(CacheError::TaskFailed) => Status::internal("internal error while minting the token"),
            BrokerError::Cache(CacheError::Busy(message)) => Status::resource_exhausted(message.clone()),
        }
    }
}

impl From<BrokerError> for Status {
    fn from(error: BrokerError) -> Self {
        Self::from(&error)
    }
}

impl From<AuthError> for Status {
    fn from(error: AuthError) -> Self {
        Status::unauthenticated(error.0)
    }
}
