//! `boxbroker.v1.TokenBrokerService`: validate the request, call the domain,
//! convert the answer. Nothing else happens here.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use secrecy::{ExposeSecret as _, SecretString};
use tonic::{Code, Request, Response, Status};
use tracing::Instrument as _;

use super::gate::CallContext;
use crate::{
    audit::{AuditEvent, AuditSink},
    auth::CallerIdentity,
    boxapi::{BoxId, BoxSubject, Downscope, Target, credentials::BoxIdError, downscope::normalize_scopes},
    broker::{Broker, DownscopeRequest, Granted, Subject, TokenRequest},
    cache::CachedToken,
    error::BrokerError,
    fingerprint::digest,
    metrics::RpcMetrics,
    pb::{self, get_downscoped_token_request, subject::Kind, token_broker_service_server::TokenBrokerService},
    rpc::{RequestId, Rpc, code_name},
};

/// The longest access token `RevokeToken` accepts; Box's are 32 characters.
pub(super) const MAX_TOKEN_LEN: usize = 4096;

/// The gRPC adapter over [`Broker`]. The gate in front of it has
/// authenticated the caller and applied the per-caller limits; the
/// request's [`CallContext`] says who it is.
#[derive(Debug, Clone)]
pub struct TokenBrokerApi {
    broker: Arc<Broker>,
    audit: Arc<AuditSink>,
    /// Where each finished RPC is counted.
    metrics: RpcMetrics,
    /// The one app's name when exactly one is configured (what an empty
    /// `app` means), else empty: audit records name it even on a refusal.
    only_app: Arc<str>,
}

/// The gate's context of `request`, marked as taken over by its handler.
pub(crate) fn context<T>(request: &Request<T>) -> Result<Arc<CallContext>, Status> {
    let context = request.extensions().get::<Arc<CallContext>>().cloned().ok_or_else(|| {
        super::status::detailed(
            Code::Internal,
            "the request did not pass the broker's gate (a bug)",
            "INTERNAL",
            &[],
            None,
        )
    })?;
    context.reach();
    Ok(context)
}

impl TokenBrokerApi {
    /// An adapter auditing to `audit` and counting in `metrics`.
    pub fn new(broker: Arc<Broker>, audit: Arc<AuditSink>, metrics: RpcMetrics) -> Self {
        let only_app = {
            let mut apps = broker.apps();
            match (apps.next(), apps.next()) {
                (Some(app), None) => app.name.clone(),
                _ => Arc::default(),
            }
        };
        Self {
            broker,
            audit,
            metrics,
            only_app,
        }
    }

    /// The app a caller asked for, for an audit record: the one app if it
    /// left `app` empty and there is one, else the name it gave.
    fn asked_app(&self, app: &str) -> Arc<str> {
        if app.is_empty() {
            self.only_app.clone()
        } else {
            Arc::from(app)
        }
    }

    /// Runs `handle` for the gate's caller (see [`answer`]).
    async fn call<T, R, F>(
        &self,
        rpc: Rpc,
        request: Request<T>,
        handle: impl FnOnce(CallerIdentity, T) -> F,
    ) -> Result<Response<R>, Status>
    where
        F: Future<Output = (AuditEvent, Result<R, Status>)>,
    {
        answer(&self.audit, &self.metrics, rpc, request, |caller, _, message| {
            handle(caller, message)
        })
        .await
    }
}

/// Runs `handle` for the gate's caller and request id, logs a refusal once
/// (with its audit record), audits the outcome and counts it: what every
/// client RPC does around its own work, a central broker's or an edge's.
pub(super) async fn answer<T, R, F>(
    audit: &AuditSink,
    metrics: &RpcMetrics,
    rpc: Rpc,
    request: Request<T>,
    handle: impl FnOnce(CallerIdentity, RequestId, T) -> F,
) -> Result<Response<R>, Status>
where
    F: Future<Output = (AuditEvent, Result<R, Status>)>,
{
    let started = std::time::Instant::now();
    let context = context(&request)?;
    let span = tracing::Span::current();
    span.record("request_id", context.request_id.as_str());
    span.record("caller", tracing::field::display(&context.caller));
    let (mut event, result) = handle(context.caller.clone(), context.request_id, request.into_inner()).await;
    event.rpc = rpc;
    event.request_id = Some(context.request_id);
    if let Err(status) = &result {
        span.record("code", code_name(status.code()));
        event.peer = Some(context.peer.to_string().into());
    }
    super::record_outcome(&mut event, result.as_ref().map(|_| ()));
    if audit.record(&event)
        && let Err(status) = &result
    {
        tracing::info!(code = code_name(status.code()), reason = status.message(), "refused");
    }
    let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
    metrics.rpc(rpc, code, started.elapsed());
    result.map(Response::new)
}

/// The span of one client RPC, a child of the caller's W3C trace context
/// when it sent one (an edge does). Made by hand, not by
/// `#[tracing::instrument]`: the parent must be set before the span is
/// first entered.
pub(super) fn rpc_span(rpc: Rpc, metadata: &tonic::metadata::MetadataMap) -> tracing::Span {
    use tracing::field::Empty;
    let span = match rpc {
        Rpc::GetDownscopedToken => tracing::info_span!(
            "GetDownscopedToken",
            request_id = Empty,
            caller = Empty,
            app = Empty,
            subject_type = Empty,
            cache_hit = Empty,
            code = Empty
        ),
        Rpc::RevokeToken => tracing::info_span!(
            "RevokeToken",
            request_id = Empty,
            caller = Empty,
            app = Empty,
            code = Empty
        ),
        _ => tracing::info_span!(
            "GetToken",
            request_id = Empty,
            caller = Empty,
            app = Empty,
            subject_type = Empty,
            cache_hit = Empty,
            code = Empty
        ),
    };
    adopt_trace_context(&span, metadata);
    span
}

/// Makes `span` a child of the caller's W3C trace context (`traceparent`),
/// when there is one and OpenTelemetry is on.
fn adopt_trace_context(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    use opentelemetry::{propagation::TextMapPropagator as _, trace::TraceContextExt as _};
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    struct Carrier<'a>(&'a tonic::metadata::MetadataMap);
    impl opentelemetry::propagation::Extractor for Carrier<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            Vec::new()
        }
    }
    if !crate::rpc::traces_exported() || span.is_disabled() || !metadata.contains_key("traceparent") {
        return;
    }
    let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&Carrier(metadata));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Audit facts known before the broker answers. `app` is the app asked for
/// (`TokenBrokerApi::asked_app`), recorded when no app answers; once one
/// does, [`served`] records its configured name instead.
pub(super) fn facts(caller: &CallerIdentity, app: Arc<str>, subject: Option<&Subject>) -> AuditEvent {
    AuditEvent {
        caller: caller.shared_name(),
        app,
        subject_type: subject.map(|s| match s {
            Subject::Enterprise => "enterprise",
            Subject::User(_) | Subject::External(_) => "user",
        }),
        subject_id: subject.and_then(|s| match s {
            Subject::User(id) => Some(id.clone()),
            Subject::Enterprise | Subject::External(_) => None,
        }),
        external_user_id: subject.and_then(|s| match s {
            Subject::External(user) => Some(user.id.clone()),
            Subject::Enterprise | Subject::User(_) => None,
        }),
        ..AuditEvent::default()
    }
}

/// Adds what the broker answered to `event`.
fn served(event: &mut AuditEvent, granted: Granted) {
    event.app = granted.app;
    event.rule = Some(granted.rule);
    event.cache_hit = Some(granted.lookup.cache_hit);
    event.issued = Some(granted.lookup.token);
    if let Some(resolved) = granted.resolved {
        event.subject_id = Some(resolved.user);
        event.provisioned = resolved.provisioned.then_some(true);
    }
    tracing::Span::current().record("cache_hit", granted.lookup.cache_hit);
}

#[tonic::async_trait]
impl TokenBrokerService for TokenBrokerApi {
    async fn get_token(&self, request: Request<pb::GetTokenRequest>) -> Result<Response<pb::GetTokenResponse>, Status> {
        let span = rpc_span(Rpc::GetToken, request.metadata());
        self.call(Rpc::GetToken, request, |caller, request| async move {
            let domain = match token_request(&request) {
                Ok(domain) => domain,
                Err(e) => return (facts(&caller, self.asked_app(&request.app), None), Err(e.into())),
            };
            record_subject(&self.only_app, domain.app, &domain.subject);
            // The app served is recorded on success (`served`); the name
            // asked for only on failure, so a success copies no string.
            let mut event = facts(&caller, Arc::default(), Some(&domain.subject));
            let result = self
                .broker
                .get_token(&caller.shared_name(), &domain)
                .await
                .map(|granted| {
                    self.metrics.cache_lookup(Rpc::GetToken, granted.lookup.cache_hit);
                    let response = pb::GetTokenResponse {
                        token: Some(to_proto(&granted, &[])),
                        cache_hit: granted.lookup.cache_hit,
                    };
                    served(&mut event, granted);
                    response
                });
            if result.is_err() {
                event.app = self.asked_app(&request.app);
            }
            (event, result.map_err(Status::from))
        })
        .instrument(span)
        .await
    }

    async fn get_downscoped_token(
        &self,
        request: Request<pb::GetDownscopedTokenRequest>,
    ) -> Result<Response<pb::GetDownscopedTokenResponse>, Status> {
        let span = rpc_span(Rpc::GetDownscopedToken, request.metadata());
        self.call(Rpc::GetDownscopedToken, request, |caller, request| async move {
            let domain = match downscope_request(&request) {
                Ok(domain) => domain,
                Err(e) => return (facts(&caller, self.asked_app(&request.app), None), Err(e.into())),
            };
            record_subject(&self.only_app, domain.app, &domain.subject);
            let mut event = facts(&caller, Arc::default(), Some(&domain.subject));
            event.downscope = Some(domain.downscope.clone());
            let result = self
                .broker
                .get_downscoped(&caller.shared_name(), &domain)
                .await
                .map(|granted| {
                    self.metrics
                        .cache_lookup(Rpc::GetDownscopedToken, granted.lookup.cache_hit);
                    let response = pb::GetDownscopedTokenResponse {
                        token: Some(to_proto(&granted, &domain.downscope.scopes)),
                        cache_hit: granted.lookup.cache_hit,
                    };
                    served(&mut event, granted);
                    response
                });
            if result.is_err() {
                event.app = self.asked_app(&request.app);
            }
            (event, result.map_err(Status::from))
        })
        .instrument(span)
        .await
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let span = rpc_span(Rpc::RevokeToken, request.metadata());
        self.call(Rpc::RevokeToken, request, |caller, request| async move {
            let pb::RevokeTokenRequest { app, access_token } = request;
            let mut event = facts(&caller, self.asked_app(&app), None);
            if access_token.is_empty() || access_token.len() > MAX_TOKEN_LEN {
                let e = BrokerError::InvalidArgument(format!(
                    "access_token must be 1 to {MAX_TOKEN_LEN} characters: the token to revoke, as the broker issued it"
                ));
                return (event, Err(e.into()));
            }
            let sha256 = digest(&access_token);
            let app = (!app.is_empty()).then_some(app);
            tracing::Span::current().record(
                "app",
                app.as_deref().unwrap_or(if self.only_app.is_empty() {
                    "(default)"
                } else {
                    &self.only_app
                }),
            );
            let result = self
                .broker
                .revoke(caller.name(), app.as_deref(), SecretString::from(access_token))
                .await;
            // A caller denied revocation outright never had the token looked
            // at: its records are alike whatever it sent (and so counted, not
            // written one by one).
            if !matches!(result, Err(BrokerError::PermissionDenied(_))) {
                event.token_sha256 = Some(sha256);
            }
            let result = result.map(|revoked| {
                event.app = revoked.app;
                event.rule = Some(revoked.rule);
                let subject = &revoked.subject;
                event.subject_type = Some(subject.sub_type());
                if let BoxSubject::User(id) = subject {
                    event.subject_id = Some(id.clone());
                }
                pb::RevokeTokenResponse {}
            });
            (event, result.map_err(Status::from))
        })
        .instrument(span)
        .await
    }
}

/// Records the app (the one app, for an empty name, if there is one) and the
/// subject's type on the RPC's span.
pub(super) fn record_subject(only_app: &str, app: Option<&str>, subject: &Subject) {
    let span = tracing::Span::current();
    let only_app = if only_app.is_empty() { "(default)" } else { only_app };
    span.record("app", app.unwrap_or(only_app));
    span.record("subject_type", subject.kind());
}

/// Validates a `GetTokenRequest` into the domain's request.
pub fn token_request(request: &pb::GetTokenRequest) -> Result<TokenRequest<'_>, BrokerError> {
    Ok(TokenRequest {
        app: (!request.app.is_empty()).then_some(request.app.as_str()),
        subject: parse_subject(request.subject.as_ref())?,
        min_ttl: min_ttl(request.min_ttl.as_ref())?,
        force_refresh: request.force_refresh,
    })
}

/// Validates a `GetDownscopedTokenRequest` into the domain's request.
pub fn downscope_request(request: &pb::GetDownscopedTokenRequest) -> Result<DownscopeRequest<'_>, BrokerError> {
    use get_downscoped_token_request::Target as T;
    let scopes = normalize_scopes(&request.scopes).map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
    let id = |field: &str, value: &str| {
        BoxId::parse(value).map_err(|_| {
            BrokerError::InvalidArgument(format!("{field} {:?} is not a numeric Box id", printable(value, 32)))
        })
    };
    let target = match &request.target {
        None => None,
        Some(T::FileId(file)) => Some(Target::File(id("target.file_id", file)?)),
        Some(T::FolderId(folder)) => Some(Target::Folder(id("target.folder_id", folder)?)),
        Some(T::SharedLink(link)) => {
            Some(Target::shared_link(link).map_err(|e| BrokerError::InvalidArgument(e.to_string()))?)
        }
    };
    Ok(DownscopeRequest {
        app: (!request.app.is_empty()).then_some(request.app.as_str()),
        subject: parse_subject(request.subject.as_ref())?,
        downscope: Arc::new(Downscope { scopes, target }),
        min_ttl: min_ttl(request.min_ttl.as_ref())?,
    })
}

/// Validates a `Subject` message.
pub fn parse_subject(subject: Option<&pb::Subject>) -> Result<Subject, BrokerError> {
    match subject.and_then(|s| s.kind.as_ref()) {
        None => Err(BrokerError::InvalidArgument(
            "subject is required: set subject.enterprise for the app's Service Account, subject.user_id for an App User or Managed User, or subject.external_app_user_id for a user by your own id for it"
                .to_owned(),
        )),
        Some(_) if subject.is_some_and(|s| s.create_if_missing.is_some()) && !matches!(subject.and_then(|s| s.kind.as_ref()), Some(Kind::ExternalAppUserId(_))) => {
            Err(BrokerError::InvalidArgument(
                "subject.create_if_missing needs subject.external_app_user_id: App Users are created for an external id".to_owned(),
            ))
        }
        Some(Kind::ExternalAppUserId(id)) => external_user(id, subject.and_then(|s| s.create_if_missing.as_ref())),
        Some(Kind::Enterprise(_)) => Ok(Subject::Enterprise),
        Some(Kind::UserId(id)) => BoxId::parse(id).map(Subject::User).map_err(|e| match e {
            BoxIdError::Empty => BrokerError::InvalidArgument(
                "subject.user_id is empty: give the numeric Box user id of an App User or Managed User".to_owned(),
            ),
            BoxIdError::NotNumeric => BrokerError::InvalidArgument(format!(
                "subject.user_id {:?} is not a numeric Box user id (1 to 20 digits)",
                printable(id, 32)
            )),
        }),
    }
}

/// Validates `subject.external_app_user_id` and `subject.create_if_missing`.
fn external_user(id: &str, create: Option<&pb::CreateAppUser>) -> Result<Subject, BrokerError> {
    use crate::boxapi::users::{MAX_EXTERNAL_ID_LEN, MAX_NAME_LEN};
    if id.is_empty() || id.len() > MAX_EXTERNAL_ID_LEN || id.chars().any(char::is_control) {
        return Err(BrokerError::InvalidArgument(format!(
            "subject.external_app_user_id {:?} must be 1 to {MAX_EXTERNAL_ID_LEN} bytes without control characters: your own id for the user, as Box keeps it in external_app_user_id",
            printable(id, 64)
        )));
    }
    let create = match create {
        None => None,
        // The external id stands in for an empty name, cut to Box's limit.
        Some(pb::CreateAppUser { name }) if name.is_empty() => {
            Some(Arc::from(id.chars().take(MAX_NAME_LEN).collect::<String>()))
        }
        Some(pb::CreateAppUser { name }) => {
            if name.chars().count() > MAX_NAME_LEN || name.chars().any(char::is_control) || name.trim().is_empty() {
                return Err(BrokerError::InvalidArgument(format!(
                    "subject.create_if_missing.name {:?} must be 1 to {MAX_NAME_LEN} characters without control characters (or empty, to use the external id)",
                    printable(name, 64)
                )));
            }
            Some(Arc::from(name.as_str()))
        }
    };
    Ok(Subject::External(Arc::new(crate::boxapi::ExternalUser {
        id: Arc::from(id),
        create,
    })))
}

fn min_ttl(value: Option<&prost_types::Duration>) -> Result<Duration, BrokerError> {
    let Some(d) = value else {
        return Ok(Duration::ZERO);
    };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(BrokerError::InvalidArgument("min_ttl must not be negative".to_owned()));
    }
    if d.nanos >= 1_000_000_000 {
        return Err(BrokerError::InvalidArgument(
            "min_ttl.nanos must be below 1,000,000,000".to_owned(),
        ));
    }
    // Both are non-negative and nanos < 1e9 here, so neither conversion fails.
    let seconds = u64::try_from(d.seconds).unwrap_or(0);
    let nanos = u32::try_from(d.nanos).unwrap_or(0);
    Ok(Duration::new(seconds, nanos))
}

/// The protobuf form of a served token; `scopes` for a downscoped one.
pub fn to_proto(granted: &Granted, scopes: &[String]) -> pb::AccessToken {
    access_token(&granted.lookup.token, granted.expires_at, scopes)
}

/// The protobuf form of `token`, said to expire at `expires_at`.
pub(crate) fn access_token(token: &CachedToken, expires_at: SystemTime, scopes: &[String]) -> pb::AccessToken {
    pb::AccessToken {
        access_token: token.access_token.expose_secret().to_owned(),
        expires_at: Some(timestamp(expires_at)),
        token_type: token.token_type().to_owned(),
        scopes: scopes.to_vec(),
        restricted_to: token
            .restricted_to
            .iter()
            .map(|r| pb::Restriction {
                scope: r.scope.clone(),
                object_type: r.object_type.clone(),
                object_id: r.object_id.clone(),
            })
            .collect(),
    }
}

/// A time as a protobuf `Timestamp`.
pub(crate) fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// At most `max` characters of `s`, without control characters, for echoing
/// a caller's own input back in an error message.
fn printable(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect()
}
