//! The edge: a sidecar that holds no Box credential and no KEK. It serves
//! its pod's app the same `TokenBrokerService` from a local [`TokenCache`]
//! and fills that cache from the central broker ([`central`]), asking as
//! the pod: the central broker's authentication and policy decide.
//!
//! - Keys are the central broker's (app as asked, subject, downscope),
//!   without a caller: every local caller is the same pod upstream.
//! - N concurrent local misses for a key make one call upstream (the
//!   cache's flights); refresh-ahead keeps hot tokens fresh.
//! - A token is served until the central broker's `expires_at` minus the
//!   safety margin and the caller's `min_ttl`, whether or not the central
//!   broker can be reached meanwhile (static stability).
//! - Errors are never cached; the central broker's are relayed unchanged.

pub mod central;

use std::{
    sync::{Arc, LazyLock},
    time::{Duration, SystemTime},
};

use futures_util::future::{BoxFuture, FutureExt as _};
use secrecy::{ExposeSecret as _, SecretString};
use tonic::Status;

use self::central::{Central, Unreachable};
use crate::{
    boxapi::{BoxId, BoxSubject, DiagnosisKind, IssuedToken, Restriction, Target},
    broker::{DownscopeRequest, MAX_MIN_TTL, Subject, TokenRequest},
    cache::{CachePolicy, CachedToken, Lookup, Minter, Need, Relayed, Served, TokenCache, TokenKey, UpstreamError},
    clock::SharedClock,
    error::BrokerError,
    fingerprint::digest,
    pb,
    rpc::{RequestId, Rpc},
};

/// The edge's key for "the app's Service Account": the edge does not know
/// the enterprise id (the central broker's config does), and one app has
/// one Service Account, so a fixed id stands for it.
static SERVICE_ACCOUNT: LazyLock<BoxSubject> =
    LazyLock::new(|| BoxSubject::Enterprise(BoxId::parse("0").unwrap_or_else(|_| unreachable!("0 is a Box id"))));

/// The edge's subject for a user named by external id (the key's
/// `external` says which): only the central broker can resolve it.
static EXTERNAL_USER: LazyLock<BoxSubject> =
    LazyLock::new(|| BoxSubject::User(BoxId::parse("0").unwrap_or_else(|_| unreachable!("0 is a Box id"))));

/// The edge's domain: its cache and the central broker behind it.
#[derive(Debug)]
pub struct Edge {
    cache: TokenCache,
    central: Arc<Central>,
    clock: SharedClock,
}

impl Edge {
    /// An edge caching what `central` answers, as `policy` says (but
    /// never remembering a failure: `negative_ttl` is ignored).
    pub fn new(central: Arc<Central>, clock: SharedClock, policy: CachePolicy) -> Self {
        let policy = CachePolicy {
            negative_ttl: Duration::ZERO,
            ..policy
        };
        let minter = Arc::new(CentralMinter {
            central: central.clone(),
            clock: clock.clone(),
            margin: policy.safety_margin,
            refresh_window: policy.refresh_ahead + policy.refresh_jitter,
        });
        Self {
            cache: TokenCache::new(minter, clock.clone(), policy),
            central,
            clock,
        }
    }

    /// The central broker's client (its counters and circuits).
    pub fn central(&self) -> &Arc<Central> {
        &self.central
    }

    /// The local cache (its size and evictions).
    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    fn key(app: Option<&str>, subject: &Subject, downscope: Option<&Arc<crate::boxapi::Downscope>>) -> TokenKey {
        let (subject, external) = match subject {
            Subject::Enterprise => (SERVICE_ACCOUNT.clone(), None),
            Subject::User(id) => (BoxSubject::User(id.clone()), None),
            Subject::External(user) => (EXTERNAL_USER.clone(), Some(user.clone())),
        };
        TokenKey {
            app: Arc::from(app.unwrap_or_default()),
            subject,
            downscope: downscope.cloned(),
            caller: None,
            external,
        }
    }

    /// A full token for `caller` (a local caller): cached, or asked of the
    /// central broker once for every concurrent request for it.
    pub async fn get_token(
        &self,
        caller: &Arc<str>,
        request: &TokenRequest<'_>,
        request_id: RequestId,
    ) -> Result<Lookup, BrokerError> {
        let key = Self::key(request.app, &request.subject, None);
        // A forced request asks the central broker (concurrent ones share
        // one call): the central broker decides whether a new token is due
        // (one forced mint per key per interval, fleet-wide).
        let need = Need {
            min_ttl: request.min_ttl,
            minted_since: request.force_refresh.then(|| self.clock.now()),
            forced: request.force_refresh,
            request_id: Some(request_id),
            ..Need::default()
        };
        Ok(self.cache.serve(caller, &key, need, None).await?)
    }

    /// A downscoped token for `caller`, as [`Self::get_token`].
    pub async fn get_downscoped(
        &self,
        caller: &Arc<str>,
        request: &DownscopeRequest<'_>,
        request_id: RequestId,
    ) -> Result<Lookup, BrokerError> {
        let key = Self::key(request.app, &request.subject, Some(&request.downscope));
        let need = Need {
            min_ttl: request.min_ttl,
            request_id: Some(request_id),
            ..Need::default()
        };
        Ok(self.cache.serve(caller, &key, need, None).await?)
    }

    /// Forwards `caller`'s revocation. The copies of the token this edge
    /// holds (under any key) are first checked as a central broker checks
    /// its token: served only to other local callers, it is not this
    /// caller's (NOT_FOUND); served to others too, it is not revoked
    /// (FAILED_PRECONDITION). Then they are not served while the revocation
    /// is under way, and once the central broker has revoked it every copy
    /// is dropped and, for a full token, every downscoped token of its
    /// subject (the edge does not know which came from it: they are asked
    /// for again). A token this edge does not hold is forwarded for the
    /// central broker to decide. The call runs in a task of its own, so a
    /// caller that goes away cannot leave a token marked. The central
    /// broker's refusal is relayed.
    pub async fn revoke(
        &self,
        caller: &Arc<str>,
        app: &str,
        access_token: SecretString,
        request_id: RequestId,
    ) -> Result<(), BrokerError> {
        let digest = digest(access_token.expose_secret());
        let copies = self.cache.copies(&digest);
        let shared = || {
            BrokerError::FailedPrecondition(
                "this token was also served to other callers of this edge, and revoking it at Box would cut them off too; it stays valid until it expires".to_owned(),
            )
        };
        if !copies.is_empty() {
            match served_to(&copies, caller) {
                Served::NotTo => {
                    return Err(BrokerError::NotIssued(
                        "this edge holds no token with that value that was served to you".to_owned(),
                    ));
                }
                Served::AlsoToOthers => return Err(shared()),
                Served::OnlyTo => {}
            }
            let marked: Vec<&Arc<CachedToken>> = copies.iter().map(|(_, t)| t).filter(|t| t.begin_revoking()).collect();
            if marked.len() < copies.len() {
                marked.iter().for_each(|t| t.end_revoking());
                return Err(BrokerError::Retry(
                    "a revocation of this token is already under way; retry to see its outcome".to_owned(),
                ));
            }
            // A local caller served it meanwhile is seen by this second look.
            if served_to(&copies, caller) != Served::OnlyTo {
                marked.iter().for_each(|t| t.end_revoking());
                return Err(shared());
            }
        }
        let request = pb::RevokeTokenRequest {
            app: app.to_owned(),
            access_token: access_token.expose_secret().to_owned(),
        };
        let (central, cache) = (self.central.clone(), self.cache.clone());
        let failure_key = TokenKey {
            app: Arc::from(app),
            subject: copies
                .first()
                .map_or_else(|| SERVICE_ACCOUNT.clone(), |(key, _)| key.subject.clone()),
            downscope: None,
            caller: None,
            external: copies.first().and_then(|(key, _)| key.external.clone()),
        };
        tokio::spawn(async move {
            let answer = central
                .call(
                    Rpc::RevokeToken,
                    request,
                    Some(request_id),
                    |mut client, request| async move { client.revoke_token(request).await },
                )
                .await;
            let result = match answer {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(status)) => Err(relayed(&failure_key, &status)),
                Err(Unreachable(problem)) => Err(failure(&failure_key, DiagnosisKind::Unavailable, problem, None)),
            };
            // Every copy now held: one fetched again meanwhile inherited the mark.
            let held = cache.copies(&digest);
            if result.is_ok() {
                for (key, token) in &held {
                    cache.invalidate_token(key, token).await;
                }
                let families: Vec<TokenKey> = copies
                    .iter()
                    .chain(&held)
                    .filter(|(key, _)| key.downscope.is_none())
                    .map(|(key, _)| key.clone())
                    .collect();
                if !families.is_empty() {
                    cache
                        .invalidate_where(move |k| k.downscope.is_some() && families.contains(&k.parent()))
                        .await;
                }
            } else {
                copies.iter().chain(&held).for_each(|(_, token)| token.end_revoking());
            }
            result.map_err(|e| BrokerError::Upstream(Arc::new(e)))
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "the revocation task failed");
            BrokerError::Internal("internal error while revoking the token")
        })?
    }
}

/// Who, of this edge's local callers, was served the copies of one token:
/// [`Served::OnlyTo`] `caller` if some copy was served to it and none to
/// anyone else.
fn served_to(copies: &[(TokenKey, Arc<CachedToken>)], caller: &str) -> Served {
    let mine = copies.iter().any(|(_, t)| t.served_to(caller) != Served::NotTo);
    let others = copies.iter().any(|(_, t)| match t.served_to(caller) {
        Served::AlsoToOthers => true,
        // Served first to another local caller (or to nobody yet).
        Served::NotTo => t.owner().is_some(),
        Served::OnlyTo => false,
    });
    match (mine, others) {
        (true, false) => Served::OnlyTo,
        (true, true) => Served::AlsoToOthers,
        (false, _) => Served::NotTo,
    }
}

/// The central broker's refusal of a call for `key`, kept to be relayed
/// as it was (code, message, details, retry pushback).
fn relayed(key: &TokenKey, status: &Status) -> UpstreamError {
    let kind = match status.code() {
        tonic::Code::NotFound => DiagnosisKind::NotFound,
        tonic::Code::Unavailable | tonic::Code::ResourceExhausted | tonic::Code::DeadlineExceeded => {
            DiagnosisKind::Unavailable
        }
        _ => DiagnosisKind::Misconfigured,
    };
    let mut upstream = failure(
        key,
        kind,
        status.message().to_owned(),
        Some(Relayed {
            code: i32::from(status.code()),
            details: Arc::from(status.details()),
        }),
    );
    upstream.diagnosis.retry_after = status
        .metadata()
        .get(RETRY_PUSHBACK)
        .and_then(|v| v.to_str().ok())
        .and_then(|ms| ms.parse::<u64>().ok())
        .map(Duration::from_millis);
    upstream
}

/// gRPC's retry pushback header, relayed with a refusal that has one.
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// Fills the edge's cache from the central broker.
struct CentralMinter {
    central: Arc<Central>,
    clock: SharedClock,
    /// The edge's safety margin: asked for on top of the caller's
    /// `min_ttl`, so what comes back is servable here.
    margin: Duration,
    /// How long before the margin a refresh ahead may start: asked for on
    /// top, so a refreshed token is not due for refresh again at once.
    refresh_window: Duration,
}

impl CentralMinter {
    fn ask(&self, key: &TokenKey, need: &Need) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>> {
        let central = self.central.clone();
        let asked_at = self.clock.now();
        let key = key.clone();
        let subject = Some(match (&key.subject, &key.external) {
            (_, Some(user)) => pb::Subject {
                kind: Some(pb::subject::Kind::ExternalAppUserId(user.id.to_string())),
                create_if_missing: user
                    .create
                    .as_ref()
                    .map(|name| pb::CreateAppUser { name: name.to_string() }),
            },
            (BoxSubject::Enterprise(_), None) => pb::Subject {
                kind: Some(pb::subject::Kind::Enterprise(pb::EnterpriseSubject {})),
                create_if_missing: None,
            },
            (BoxSubject::User(id), None) => pb::Subject {
                kind: Some(pb::subject::Kind::UserId(id.to_string())),
                create_if_missing: None,
            },
        });
        // What the caller needs, plus this edge's margin (and, for a
        // refresh ahead, its refresh window), within what a central broker
        // accepts; a caller's own min_ttl beyond that goes as it is, for
        // the central broker to refuse in its words.
        let refresh = need.minted_since.is_some() && !need.forced;
        let padded = need.min_ttl + self.margin + if refresh { self.refresh_window } else { Duration::ZERO };
        let wanted = padded.min(MAX_MIN_TTL.max(need.min_ttl));
        let min_ttl = Some(prost_types::Duration {
            seconds: i64::try_from(wanted.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(wanted.subsec_nanos()).unwrap_or(0),
        });
        let (forced, request_id) = (need.forced, need.request_id);
        async move {
            let answer = match &key.downscope {
                None => {
                    let request = pb::GetTokenRequest {
                        app: key.app.to_string(),
                        subject,
                        min_ttl,
                        force_refresh: forced,
                    };
                    central
                        .call(Rpc::GetToken, request, request_id, |mut client, request| async move {
                            client.get_token(request).await
                        })
                        .await
                        .map(|r| r.map(|response| response.token))
                }
                Some(downscope) => {
                    use pb::get_downscoped_token_request::Target as T;
                    let request = pb::GetDownscopedTokenRequest {
                        app: key.app.to_string(),
                        subject,
                        scopes: downscope.scopes.clone(),
                        target: downscope.target.as_ref().map(|target| match target {
                            Target::File(id) => T::FileId(id.to_string()),
                            Target::Folder(id) => T::FolderId(id.to_string()),
                            Target::SharedLink(link) => T::SharedLink(link.clone()),
                        }),
                        min_ttl,
                    };
                    central
                        .call(
                            Rpc::GetDownscopedToken,
                            request,
                            request_id,
                            |mut client, request| async move { client.get_downscoped_token(request).await },
                        )
                        .await
                        .map(|r| r.map(|response| response.token))
                }
            };
            match answer {
                Ok(Ok(Some(token))) => issued(token, asked_at).ok_or_else(|| {
                    failure(
                        &key,
                        DiagnosisKind::Unavailable,
                        "the central broker answered a token without a valid expires_at".to_owned(),
                        None,
                    )
                }),
                Ok(Ok(None)) => Err(failure(
                    &key,
                    DiagnosisKind::Unavailable,
                    "the central broker answered without a token".to_owned(),
                    None,
                )),
                Ok(Err(status)) => Err(relayed(&key, &status)),
                Err(Unreachable(problem)) => Err(failure(&key, DiagnosisKind::Unavailable, problem, None)),
            }
        }
        .boxed()
    }
}

fn failure(key: &TokenKey, kind: DiagnosisKind, message: String, relayed: Option<Relayed>) -> UpstreamError {
    UpstreamError {
        relayed,
        ..UpstreamError::new(key, kind, message)
    }
}

/// The central broker's token as the cache holds it; `None` without a
/// usable `expires_at`.
fn issued(token: pb::AccessToken, asked_at: SystemTime) -> Option<IssuedToken> {
    let expires = token.expires_at?;
    let expires_at = SystemTime::UNIX_EPOCH.checked_add(Duration::new(
        u64::try_from(expires.seconds).ok()?,
        u32::try_from(expires.nanos).ok()?,
    ))?;
    Some(IssuedToken {
        access_token: SecretString::from(token.access_token),
        expires_at,
        issued_at: asked_at,
        token_type: token.token_type,
        request_id: None,
        restricted_to: token
            .restricted_to
            .into_iter()
            .map(|r| Restriction {
                scope: r.scope,
                object_type: r.object_type,
                object_id: r.object_id,
            })
            .collect(),
    })
}

/// Every key is fetched ([`Minter::fetches`]); `mint` and `exchange` ask
/// the same way, with no particular need.
impl Minter for CentralMinter {
    fn mint(&self, key: &TokenKey) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>> {
        self.ask(key, &Need::default())
    }

    fn exchange(&self, key: &TokenKey, _: Arc<CachedToken>) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>> {
        self.ask(key, &Need::default())
    }

    fn fetches(&self) -> bool {
        true
    }

    fn fetch(&self, key: &TokenKey, need: &Need) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>> {
        self.ask(key, need)
    }
}
