//! `boxbroker.v1.TokenBrokerService` on an edge: the same requests,
//! validated the same way, answered from the edge's cache or the central
//! broker; the central broker's refusals are relayed as it sent them.

use std::sync::Arc;

use secrecy::SecretString;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument as _;

use super::broker::{
    MAX_TOKEN_LEN, access_token, answer, downscope_request, facts, record_subject, rpc_span, token_request,
};
use crate::{
    audit::{AuditEvent, AuditSink},
    cache::{CacheError, Lookup, UpstreamError},
    edge::{Edge, RETRY_PUSHBACK},
    error::BrokerError,
    fingerprint::digest,
    metrics::RpcMetrics,
    pb::{self, token_broker_service_server::TokenBrokerService},
    rpc::Rpc,
};

/// The gRPC adapter over an [`Edge`], behind the same gate as a central
/// broker's (local callers authenticated, limits applied).
#[derive(Debug, Clone)]
pub struct EdgeApi {
    edge: Arc<Edge>,
    audit: Arc<AuditSink>,
    metrics: RpcMetrics,
}

/// The status a local caller gets for `error`: the central broker's own
/// (code, message, details, retry pushback) when it answered — also when
/// it refused a request the edge could only partly serve (`min_ttl`);
/// UNAVAILABLE `CENTRAL_UNREACHABLE` naming the hop when it could not be
/// reached; the edge's own checks otherwise.
fn status(error: BrokerError) -> Status {
    let upstream = match &error {
        BrokerError::Cache(CacheError::Upstream(upstream)) | BrokerError::Upstream(upstream) => Some(upstream),
        BrokerError::Cache(CacheError::MinTtlUnmetUpstreamDown { upstream, .. })
            if upstream
                .relayed
                .as_ref()
                .is_some_and(|r| Code::from(r.code) != Code::Unavailable) =>
        {
            Some(upstream)
        }
        _ => None,
    };
    match upstream {
        Some(upstream) => relay(upstream),
        None => Status::from(error),
    }
}

/// The central broker's answer as it sent it, or the hop's failure.
fn relay(upstream: &UpstreamError) -> Status {
    let mut status = match &upstream.relayed {
        Some(relayed) => Status::with_details(
            Code::from(relayed.code),
            upstream.diagnosis.message.clone(),
            tonic::codegen::Bytes::copy_from_slice(&relayed.details),
        ),
        None => {
            return super::status::detailed(
                Code::Unavailable,
                format!(
                    "{}; tokens this edge holds are still served",
                    upstream.diagnosis.message
                ),
                "CENTRAL_UNREACHABLE",
                &[],
                None,
            );
        }
    };
    if let Some(wait) = upstream.diagnosis.retry_after
        && let Ok(value) = wait.as_millis().to_string().parse()
    {
        status.metadata_mut().insert(RETRY_PUSHBACK, value);
    }
    status
}

impl EdgeApi {
    /// An adapter auditing to `audit` and counting in `metrics`.
    pub fn new(edge: Arc<Edge>, audit: Arc<AuditSink>, metrics: RpcMetrics) -> Self {
        Self { edge, audit, metrics }
    }

    /// Fills `event` with a served token and counts the lookup.
    fn served(&self, rpc: Rpc, event: &mut AuditEvent, lookup: &Lookup) {
        self.metrics.cache_lookup(rpc, lookup.cache_hit);
        event.cache_hit = Some(lookup.cache_hit);
        event.issued = Some(lookup.token.clone());
        tracing::Span::current().record("cache_hit", lookup.cache_hit);
    }
}

/// Each RPC in its span, a child of the caller's trace context if it sent one.
#[tonic::async_trait]
impl TokenBrokerService for EdgeApi {
    async fn get_token(&self, request: Request<pb::GetTokenRequest>) -> Result<Response<pb::GetTokenResponse>, Status> {
        let span = rpc_span(Rpc::GetToken, request.metadata());
        answer(
            &self.audit,
            &self.metrics,
            Rpc::GetToken,
            request,
            |caller, id, request| async move {
                let domain = match token_request(&request) {
                    Ok(domain) => domain,
                    Err(e) => return (facts(&caller, Arc::from(request.app.as_str()), None), Err(e.into())),
                };
                record_subject("", domain.app, &domain.subject);
                let mut event = facts(&caller, Arc::from(request.app.as_str()), Some(&domain.subject));
                let result = match self.edge.get_token(&caller.shared_name(), &domain, id).await {
                    Ok(lookup) => {
                        self.served(Rpc::GetToken, &mut event, &lookup);
                        Ok(pb::GetTokenResponse {
                            token: Some(access_token(&lookup.token, lookup.token.expires_at, &[])),
                            cache_hit: lookup.cache_hit,
                        })
                    }
                    Err(e) => Err(status(e)),
                };
                (event, result)
            },
        )
        .instrument(span)
        .await
    }

    async fn get_downscoped_token(
        &self,
        request: Request<pb::GetDownscopedTokenRequest>,
    ) -> Result<Response<pb::GetDownscopedTokenResponse>, Status> {
        let span = rpc_span(Rpc::GetDownscopedToken, request.metadata());
        answer(
            &self.audit,
            &self.metrics,
            Rpc::GetDownscopedToken,
            request,
            |caller, id, request| async move {
                let domain = match downscope_request(&request) {
                    Ok(domain) => domain,
                    Err(e) => return (facts(&caller, Arc::from(request.app.as_str()), None), Err(e.into())),
                };
                record_subject("", domain.app, &domain.subject);
                let mut event = facts(&caller, Arc::from(request.app.as_str()), Some(&domain.subject));
                event.downscope = Some(domain.downscope.clone());
                let result = match self.edge.get_downscoped(&caller.shared_name(), &domain, id).await {
                    Ok(lookup) => {
                        self.served(Rpc::GetDownscopedToken, &mut event, &lookup);
                        Ok(pb::GetDownscopedTokenResponse {
                            token: Some(access_token(
                                &lookup.token,
                                lookup.token.expires_at,
                                &domain.downscope.scopes,
                            )),
                            cache_hit: lookup.cache_hit,
                        })
                    }
                    Err(e) => Err(status(e)),
                };
                (event, result)
            },
        )
        .instrument(span)
        .await
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let span = rpc_span(Rpc::RevokeToken, request.metadata());
        answer(&self.audit, &self.metrics, Rpc::RevokeToken, request, |caller, id, request| async move {
            let pb::RevokeTokenRequest { app, access_token } = request;
            tracing::Span::current().record("app", if app.is_empty() { "(default)" } else { app.as_str() });
            let mut event = facts(&caller, Arc::from(app.as_str()), None);
            if access_token.is_empty() || access_token.len() > MAX_TOKEN_LEN {
                let e = BrokerError::InvalidArgument(format!(
                    "access_token must be 1 to {MAX_TOKEN_LEN} characters: the token to revoke, as the broker issued it"
                ));
                return (event, Err(e.into()));
            }
            event.token_sha256 = Some(digest(&access_token));
            let result = self
                .edge
                .revoke(&caller.shared_name(), &app, SecretString::from(access_token), id)
                .await
                .map(|()| pb::RevokeTokenResponse {})
                .map_err(status);
            (event, result)
        })
        .instrument(span)
        .await
    }
}
