//! `boxbroker.v1.TokenBrokerService`: validate the request, call the domain,
//! convert the answer. Nothing else happens here.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use secrecy::ExposeSecret as _;
use tonic::{Request, Response, Status};

use crate::{
    auth::Authenticator,
    boxapi::{BoxId, credentials::BoxIdError},
    broker::{Broker, Subject, TokenRequest},
    cache::Lookup,
    error::BrokerError,
    pb::{self, subject::Kind, token_broker_service_server::TokenBrokerService},
};

/// The gRPC adapter over [`Broker`].
#[derive(Debug, Clone)]
pub struct TokenBrokerApi {
    broker: Arc<Broker>,
    auth: Authenticator,
}

impl TokenBrokerApi {
    /// An adapter admitting callers per `auth`.
    pub fn new(broker: Arc<Broker>, auth: Authenticator) -> Self {
        Self { broker, auth }
    }
}

#[tonic::async_trait]
impl TokenBrokerService for TokenBrokerApi {
    #[tracing::instrument(
        name = "GetToken",
        skip_all,
        fields(caller, app, subject_type, cache_hit, code)
    )]
    async fn get_token(
        &self,
        request: Request<pb::GetTokenRequest>,
    ) -> Result<Response<pb::GetTokenResponse>, Status> {
        let span = tracing::Span::current();
        let result: Result<Response<pb::GetTokenResponse>, Status> = async {
            let caller = self.auth.authenticate(&request)?;
            span.record("caller", tracing::field::display(&caller));
            let domain = token_request(request.get_ref())?;
            span.record("app", domain.app.as_deref().unwrap_or("(default)"));
            span.record(
                "subject_type",
                match domain.subject {
                    Subject::Enterprise => "enterprise",
                    Subject::User(_) => "user",
                },
            );
            let lookup = self.broker.get_token(&domain).await.map_err(Status::from)?;
            span.record("cache_hit", lookup.cache_hit);
            Ok(Response::new(to_proto(&lookup)))
        }
        .await;
        match &result {
            Ok(_) => tracing::debug!("served"),
            Err(status) => {
                span.record("code", tracing::field::debug(status.code()));
                tracing::info!(code = ?status.code(), reason = status.message(), "refused");
            }
        }
        result
    }
}

/// Validates a `GetTokenRequest` into the domain's request.
pub fn token_request(request: &pb::GetTokenRequest) -> Result<TokenRequest, BrokerError> {
    let app = (!request.app.is_empty()).then(|| request.app.clone());
    let subject = match request.subject.as_ref().and_then(|s| s.kind.as_ref()) {
        None => {
            return Err(BrokerError::InvalidArgument(
                "subject is required: set subject.enterprise for the app's Service Account, or subject.user_id for an App User or Managed User"
                    .to_owned(),
            ));
        }
        Some(Kind::Enterprise(_)) => Subject::Enterprise,
        Some(Kind::UserId(id)) => Subject::User(BoxId::parse(id).map_err(|e| match e {
            BoxIdError::Empty => BrokerError::InvalidArgument(
                "subject.user_id is empty: give the numeric Box user id of an App User or Managed User".to_owned(),
            ),
            BoxIdError::NotNumeric => BrokerError::InvalidArgument(format!(
                "subject.user_id {:?} is not a numeric Box user id (1 to 20 digits)",
                printable(id, 32)
            )),
        })?),
    };
    Ok(TokenRequest {
        app,
        subject,
        min_ttl: min_ttl(request.min_ttl.as_ref())?,
        force_refresh: request.force_refresh,
    })
}

fn min_ttl(value: Option<&prost_types::Duration>) -> Result<Duration, BrokerError> {
    let Some(d) = value else {
        return Ok(Duration::ZERO);
    };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(BrokerError::InvalidArgument(
            "min_ttl must not be negative".to_owned(),
        ));
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

/// The response for a served token.
pub fn to_proto(lookup: &Lookup) -> pb::GetTokenResponse {
    let token = &lookup.token;
    pb::GetTokenResponse {
        token: Some(pb::AccessToken {
            access_token: token.access_token.expose_secret().to_owned(),
            expires_at: Some(timestamp(token.expires_at)),
            token_type: token.token_type.clone(),
        }),
        cache_hit: lookup.cache_hit,
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
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
