//! Box users as portals know them: an external id resolved to the Box user
//! (and the App User created on first use, where the policy allows), and
//! the check that a user may be tokenized at all — admins, co-admins,
//! inactive users and other enterprises' users never are. Each answer is
//! cached (a short time for "none") and concurrent requests share one call
//! to Box. Every call uses the app's Service Account token, from the token
//! cache like any other token.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures_util::future::{BoxFuture, FutureExt as _, Shared};
use moka::ops::compute::Op;
use secrecy::SecretString;

use super::{App, Broker, budget::Place, minting};
use crate::{
    boxapi::{
        BoxApiError, BoxId, BoxSubject, BoxUser, Diagnosis, DiagnosisKind, ExternalUser,
        users::{Refusal, UsersCall, diagnose_users},
    },
    cache::{Need, TokenKey, UpstreamError},
    error::BrokerError,
};

/// How long a found external id → user mapping is used before Box is asked again.
pub const DEFAULT_MAPPING_TTL: Duration = Duration::from_secs(3600);
/// How long a user's role and status are trusted before they are read again.
pub const DEFAULT_CHECK_TTL: Duration = Duration::from_secs(600);
/// How many mappings and checks are held (each).
const MAX_ENTRIES: u64 = 100_000;

/// The users cache's tuning, from the config (`[users]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsersPolicy {
    /// See [`DEFAULT_MAPPING_TTL`].
    pub mapping_ttl: Duration,
    /// See [`DEFAULT_CHECK_TTL`].
    pub check_ttl: Duration,
    /// How long "no such user" is remembered (the cache's `negative_ttl`).
    pub negative_ttl: Duration,
}

impl Default for UsersPolicy {
    fn default() -> Self {
        Self {
            mapping_ttl: DEFAULT_MAPPING_TTL,
            check_ttl: DEFAULT_CHECK_TTL,
            negative_ttl: crate::cache::DEFAULT_NEGATIVE_TTL,
        }
    }
}

type ExternalKey = (Arc<str>, Arc<str>);
type UserKey = (Arc<str>, BoxId);

/// What Box said an external id names, until when it is believed.
#[derive(Debug, Clone)]
struct Mapping {
    user: Option<BoxId>,
    /// The user is an App User (`is_platform_access_only`): external ids
    /// reach App Users only, never Managed Users who carry one (SSO).
    app_user: bool,
    until: SystemTime,
}

/// An App User's creation, shared by every request for its external id,
/// run in a task of its own (a caller going away abandons nothing).
type Creation = Shared<BoxFuture<'static, Result<Created, CreateFailure>>>;

/// What a creation found or made.
#[derive(Debug, Clone)]
struct Created {
    user: BoxUser,
    /// Box answered 201 (rather than the user turning up on a lookup).
    created: bool,
}

/// Why a creation failed.
#[derive(Debug, Clone)]
enum CreateFailure {
    Find(Arc<BoxApiError>),
    Create(Arc<BoxApiError>),
    /// Box keeps answering 409 yet lists no such user.
    Conflict,
    /// Two users have the external id.
    Ambiguous(BoxId, BoxId),
    Panicked,
}

/// Numbers creations, so a failed one removes its own entry and no other.
static NEXT_CREATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times a creation looks up and POSTs before it gives up.
const CREATE_ATTEMPTS: u32 = 3;

/// Whether a user may be tokenized, until when it is believed.
#[derive(Debug, Clone)]
struct Check {
    refused: Option<BrokerError>,
    until: SystemTime,
}

/// The users caches of a broker.
#[derive(Debug)]
pub(super) struct Directory {
    policy: UsersPolicy,
    mappings: moka::future::Cache<ExternalKey, Mapping>,
    /// Creations under way (or just done, kept briefly), each with its id:
    /// the one creation every concurrent request for the external id shares.
    creations: moka::future::Cache<ExternalKey, (u64, Creation)>,
    checks: moka::future::Cache<UserKey, Check>,
    /// The external id each resolved user was asked for by (for revocation's policy check).
    externals: moka::future::Cache<UserKey, Arc<str>>,
}

impl Directory {
    pub(super) fn new(policy: UsersPolicy) -> Self {
        Self {
            mappings: bounded(policy.mapping_ttl.max(policy.negative_ttl)),
            creations: bounded(policy.negative_ttl.max(Duration::from_secs(1))),
            checks: bounded(policy.check_ttl.max(policy.negative_ttl)),
            // As long as a token served by external id may live (2 h at most).
            externals: bounded(policy.mapping_ttl.max(crate::boxapi::client::MAX_EXPIRES_IN)),
            policy,
        }
    }
}

/// A bounded cache whose entries leave memory `ttl` after they were written
/// (freshness itself is decided by the broker's clock).
fn bounded<K, V>(ttl: Duration) -> moka::future::Cache<K, V>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    moka::future::Cache::builder()
        .max_capacity(MAX_ENTRIES)
        .time_to_live(ttl.max(Duration::from_secs(1)))
        .build()
}

/// The user an external id named.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The Box user id.
    pub user: BoxId,
    /// True when this request created the App User.
    pub provisioned: bool,
}

impl Broker {
    /// `cache`'s entry for `key`, made by `init` once for every concurrent
    /// request (moka's `try_get_with`; errors are not kept). A request that
    /// waited on another caller's call and got that caller's budget refusal
    /// tries again under its own budget: a refusal names its own caller.
    async fn shared<K, V, F>(
        &self,
        caller: &Arc<str>,
        cache: &moka::future::Cache<K, V>,
        key: &K,
        init: impl Fn() -> F,
    ) -> Result<V, BrokerError>
    where
        K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
        F: Future<Output = Result<V, BrokerError>>,
    {
        for _ in 0..3 {
            match cache.try_get_with(key.clone(), init()).await {
                Ok(value) => return Ok(value),
                // Over its own budget, this caller is told so in its own words.
                Err(e) if matches!(*e, BrokerError::Cache(crate::cache::CacheError::Busy(_))) => {
                    drop(self.budget.enter(caller)?);
                }
                Err(e) => return Err(Arc::unwrap_or_clone(e)),
            }
        }
        // Other callers' calls for the same user kept failing for their budgets.
        Err(BrokerError::Retry(
            "the broker's calls to Box for this user are at their limit; retry with backoff".to_owned(),
        ))
    }

    /// The Box user `external` names: from the cache, or looked up (one
    /// lookup for every concurrent request), or — when the request asks and
    /// the policy granted it — created, exactly once.
    pub(super) async fn resolve_external(
        &self,
        caller: &Arc<str>,
        app: &Arc<App>,
        external: &ExternalUser,
    ) -> Result<Resolved, BrokerError> {
        let key: ExternalKey = (app.name.clone(), external.id.clone());
        let directory = &self.users;
        let now = self.clock.now();
        let cached = match directory.mappings.get(&key).await {
            Some(mapping) if mapping.until > now => Some(mapping),
            Some(_) => {
                directory.mappings.invalidate(&key).await;
                None
            }
            None => None,
        };
        let mapping = match cached {
            Some(mapping) => mapping,
            None => {
                self.shared(caller, &directory.mappings, &key, || {
                    self.find_external(caller, app, &external.id)
                })
                .await?
            }
        };
        if let Some(user) = mapping.user {
            if !mapping.app_user {
                return Err(managed_by_external_id(&user, &external.id));
            }
            return Ok(Resolved {
                user,
                provisioned: false,
            });
        }
        let Some(name) = &external.create else {
            return Err(not_found(app, &external.id));
        };
        let token = self.service_token(caller, app).await?;
        // Taken before joining: a caller over its budget is told so in its own
        // words, never another caller's. Given back unused when it joins.
        let place = self.budget.enter(caller)?;
        let started_here = AtomicBool::new(false);
        let creations = directory.creations.clone();
        let (_, creation) = directory
            .creations
            .get_with(key.clone(), async {
                started_here.store(true, Ordering::Relaxed);
                let id = NEXT_CREATION.fetch_add(1, Ordering::Relaxed);
                let task = Creator {
                    app: app.clone(),
                    fleet: self.fleet.clone(),
                    token,
                    external_id: external.id.clone(),
                    name: name.clone(),
                    place,
                    creations,
                    key: key.clone(),
                    id,
                };
                (id, task.start())
            })
            .await;
        let created = creation
            .await
            .map_err(|failure| self.creation_error(app, &external.id, &failure))?;
        let provisioned = created.created && started_here.load(Ordering::Relaxed);
        self.remember(app, &created.user, &external.id).await;
        let app_user = created.user.is_platform_access_only == Some(true);
        let user = created.user.id;
        let until = self.clock.now() + directory.policy.mapping_ttl;
        directory
            .mappings
            .insert(
                key,
                Mapping {
                    user: Some(user.clone()),
                    app_user,
                    until,
                },
            )
            .await;
        if !app_user {
            // Found, not created: an SSO Managed User with the id.
            return Err(managed_by_external_id(&user, &external.id));
        }
        Ok(Resolved { user, provisioned })
    }

    /// Forgets what the broker knows of `subject` (a user, by id or
    /// external id): its check, so its role and status are read again, and
    /// an external id's mapping. Returns the user id, when known.
    pub async fn forget_user(&self, app: &App, subject: &super::Subject) -> Option<BoxId> {
        let user = match subject {
            super::Subject::Enterprise => return None,
            super::Subject::User(id) => id.clone(),
            super::Subject::External(external) => {
                let key: ExternalKey = (app.name.clone(), external.id.clone());
                let mapping = self.users.mappings.remove(&key).await;
                self.users.creations.invalidate(&key).await;
                mapping.and_then(|m| m.user)?
            }
        };
        self.users.checks.invalidate(&(app.name.clone(), user.clone())).await;
        Some(user)
    }

    /// The external id of `user`, for revoking a token served by it: the one
    /// it was resolved from, else Box's answer (revocations are rare). A
    /// failure to ask is an error, not "none".
    pub(super) async fn external_id_of(
        &self,
        caller: &Arc<str>,
        app: &App,
        user: &BoxId,
    ) -> Result<Option<Arc<str>>, BrokerError> {
        let key: UserKey = (app.name.clone(), user.clone());
        if let Some(known) = self.users.externals.get(&key).await {
            return Ok(Some(known));
        }
        let token = self.service_token(caller, app).await?;
        let _place = self.budget.enter(caller)?;
        let answer = match app.client.get_user(&token, user).await {
            Ok(answer) => answer,
            Err(BoxApiError::Rejected(e)) if e.status == 404 => return Ok(None),
            Err(e) => return Err(self.users_error(app, &e, UsersCall::Read(user))),
        };
        let Some(external) = answer.external_app_user_id.map(Arc::<str>::from) else {
            return Ok(None);
        };
        self.users.externals.insert(key, external.clone()).await;
        Ok(Some(external))
    }

    /// Asks Box which user has `external_id`; a found user's role and status
    /// are remembered as its check.
    async fn find_external(
        &self,
        caller: &Arc<str>,
        app: &Arc<App>,
        external_id: &str,
    ) -> Result<Mapping, BrokerError> {
        let token = self.service_token(caller, app).await?;
        let _place = self.budget.enter(caller)?;
        let found = app
            .client
            .find_users_by_external_id(&token, external_id)
            .await
            .map_err(|e| self.users_error(app, &e, UsersCall::Find(external_id)))?;
        let mut matching = found
            .into_iter()
            .filter(|u| u.external_app_user_id.as_deref() == Some(external_id));
        let now = self.clock.now();
        match (matching.next(), matching.next()) {
            (None, _) => Ok(Mapping {
                user: None,
                app_user: false,
                until: now + self.users.policy.negative_ttl,
            }),
            (Some(user), None) => {
                self.remember(app, &user, external_id).await;
                Ok(Mapping {
                    app_user: user.is_platform_access_only == Some(true),
                    user: Some(user.id),
                    until: now + self.users.policy.mapping_ttl,
                })
            }
            (Some(a), Some(b)) => Err(ambiguous(app, external_id, &a.id, &b.id)),
        }
    }

    /// A failed creation as the caller sees it.
    fn creation_error(&self, app: &App, external_id: &str, failure: &CreateFailure) -> BrokerError {
        match failure {
            CreateFailure::Find(e) => self.users_error(app, e, UsersCall::Find(external_id)),
            CreateFailure::Create(e) => self.users_error(app, e, UsersCall::Create(external_id)),
            CreateFailure::Conflict => BrokerError::FailedPrecondition(format!(
                "Box refused to create an App User with external_app_user_id {external_id:?} in app {} as a conflict, yet lists none: a user outside the app's reach may hold that id",
                app.name
            )),
            CreateFailure::Ambiguous(a, b) => ambiguous(app, external_id, a, b),
            CreateFailure::Panicked => BrokerError::Internal("internal error while creating the App User"),
        }
    }

    /// Records what Box said of `user`: its check, and the external id it was found by.
    async fn remember(&self, app: &App, user: &BoxUser, external_id: &str) {
        let key: UserKey = (app.name.clone(), user.id.clone());
        self.users.externals.insert(key.clone(), Arc::from(external_id)).await;
        let refused = refusal(app, user);
        if refused.is_none() && (user.role.is_none() || user.status.is_none()) {
            return;
        }
        let until = self.clock.now() + self.users.policy.check_ttl;
        // The refusal is stored before the user's tokens are dropped: a
        // request serving one meanwhile sees it and takes its stamp back.
        let check = Check {
            refused: refused.clone(),
            until,
        };
        self.users.checks.insert(key, check).await;
        self.refused_now(app, &user.id, refused.as_ref()).await;
    }

    /// Whether the check cache holds an allowing check of `user` now.
    pub(super) async fn check_holds(&self, app: &App, user: &BoxId) -> bool {
        let now = self.clock.now();
        self.users
            .checks
            .get(&(app.name.clone(), user.clone()))
            .await
            .is_some_and(|c| c.refused.is_none() && c.until > now)
    }

    /// Ok when `user` may be tokenized: the cached check, or Box's answer
    /// (one read for every concurrent request). Never Ok without an answer.
    pub(super) async fn check_user(
        &self,
        caller: &Arc<str>,
        app: &Arc<App>,
        user: &BoxId,
    ) -> Result<SystemTime, BrokerError> {
        let key: UserKey = (app.name.clone(), user.clone());
        let now = self.clock.now();
        let check = match self.users.checks.get(&key).await {
            Some(check) if check.until > now => check,
            stale => {
                if stale.is_some() {
                    self.users.checks.invalidate(&key).await;
                }
                self.shared(caller, &self.users.checks, &key, || self.read_user(caller, app, user))
                    .await?
            }
        };
        check.refused.map_or(Ok(check.until), Err)
    }

    /// Reads `user` with the Service Account's token and decides; where the
    /// app may not read users, asks Box who a freshly minted token of the
    /// user is instead, and revokes it if the user is refused.
    async fn read_user(&self, caller: &Arc<str>, app: &Arc<App>, user: &BoxId) -> Result<Check, BrokerError> {
        let token = self.service_token(caller, app).await?;
        let _place = self.budget.enter(caller)?;
        let read = app.client.get_user(&token, user).await;
        let now = self.clock.now();
        let answer = match read {
            Ok(answer) => answer,
            Err(BoxApiError::Rejected(e)) if e.status == 404 => {
                return Ok(Check {
                    refused: Some(upstream(
                        app,
                        BoxSubject::User(user.clone()),
                        Diagnosis::new(
                            DiagnosisKind::NotFound,
                            format!(
                                "Box has no user {user} that app {} can reach: no such App User or Managed User in its enterprise",
                                app.name
                            ),
                        ),
                    )),
                    until: now + self.users.policy.negative_ttl,
                });
            }
            Err(BoxApiError::Rejected(e)) if e.status == 403 => return self.self_check(app, user).await,
            Err(e) => return Err(self.users_error(app, &e, UsersCall::Read(user))),
        };
        if answer.id != *user {
            return Err(BrokerError::Internal("Box answered for another user than the one read"));
        }
        let key: UserKey = (app.name.clone(), user.clone());
        if let Some(known) = self.users.externals.get(&key).await
            && answer.external_app_user_id.as_deref() != Some(&*known)
        {
            // Box no longer gives the user the external id it was found by:
            // the next request by that id looks it up again.
            self.users.mappings.invalidate(&(app.name.clone(), known)).await;
            self.users.externals.invalidate(&key).await;
        }
        let refused = refusal(app, &answer);
        if refused.is_none() && (answer.role.is_none() || answer.status.is_none()) {
            return Err(BrokerError::Internal("Box's user has no role or status"));
        }
        self.refused_now(app, user, refused.as_ref()).await;
        Ok(Check {
            refused,
            until: now + self.users.policy.check_ttl,
        })
    }

    /// The fallback where the app may not read users: the user's own token
    /// (the cached one, else one minted for this) asks `/2.0/users/me`.
    async fn self_check(&self, app: &Arc<App>, user: &BoxId) -> Result<Check, BrokerError> {
        let key = TokenKey {
            app: app.name.clone(),
            subject: BoxSubject::User(user.clone()),
            downscope: None,
            caller: None,
            external: None,
        };
        let mut cached = self.cache.cached(&key, Need::default()).await;
        let (token, minted, me) = loop {
            let (token, minted) = match cached.take() {
                Some(hit) => (hit.token.access_token.clone(), None),
                None => {
                    let issued = minting::mint_full(app, &key)
                        .await
                        .map_err(|e| BrokerError::Upstream(Arc::new(e)))?;
                    (issued.access_token.clone(), Some(issued))
                }
            };
            let me = app.client.me(&token).await;
            if minted.is_none() && matches!(&me, Err(BoxApiError::Rejected(e)) if e.status == 401) {
                // The cached token is dead at Box: dropped, and the check asks with a new one.
                let subject = key.subject.clone();
                let name = app.name.clone();
                self.cache
                    .invalidate_where(move |k| k.app == name && k.subject == subject)
                    .await;
                continue;
            }
            break (token, minted, me);
        };
        let refused = match &me {
            Ok(me) if me.id != *user => Some(BrokerError::Internal(
                "Box said the user's token belongs to another user",
            )),
            Ok(me) if me.role.is_none() || me.status.is_none() => {
                Some(BrokerError::Internal("Box's user has no role or status"))
            }
            Ok(me) => refusal(app, me),
            Err(_) => None,
        };
        // Never left behind: a token minted for the check of a refused or
        // unchecked user, or a cached one of a refused user, is revoked.
        if refused.is_some() || (me.is_err() && minted.is_some()) {
            minting::revoke_quietly(app, token);
        }
        if let Some(BrokerError::Internal(problem)) = refused {
            return Err(BrokerError::Internal(problem));
        }
        self.refused_now(app, user, refused.as_ref()).await;
        me.map_err(|e| self.users_error(app, &e, UsersCall::Me(user)))?;
        if let (None, Some(issued)) = (&refused, minted) {
            self.cache.offer(&key, issued).await;
        }
        Ok(Check {
            refused,
            until: self.clock.now() + self.users.policy.check_ttl,
        })
    }

    /// A user just found refused has no token left in the cache.
    async fn refused_now(&self, app: &App, user: &BoxId, refused: Option<&BrokerError>) {
        if refused.is_none() {
            return;
        }
        app.outcomes.users_refused.fetch_add(1, Ordering::Relaxed);
        let subject = BoxSubject::User(user.clone());
        let name = app.name.clone();
        let dropped = self
            .cache
            .invalidate_where(move |k| k.app == name && k.subject == subject)
            .await;
        if dropped > 0 {
            tracing::warn!(app = %app.name, user_id = %user, dropped, "dropped the cached tokens of a user Box no longer lets the broker tokenize");
        }
    }

    /// The app's Service Account token, for the users API.
    async fn service_token(&self, caller: &Arc<str>, app: &App) -> Result<SecretString, BrokerError> {
        let key = self.enterprise_key(app);
        let lookup = self
            .cache
            .get_admitted(&key, Need::default(), Some(&self.admission(caller)))
            .await?;
        Ok(lookup.token.access_token.clone())
    }

    /// A users-API failure as the caller sees it; logged in full here.
    fn users_error(&self, app: &App, error: &BoxApiError, call: UsersCall<'_>) -> BrokerError {
        let diagnosis = diagnose_users(error, call, &app.client_id());
        tracing::warn!(app = %app.name, error = %error, "a Box users API call failed: {}", diagnosis.message);
        if call.as_service_account() && matches!(error, BoxApiError::Rejected(e) if e.status == 401) {
            // Box no longer takes the cached Service Account token: the next request mints another.
            let (cache, name) = (self.cache.clone(), app.name.clone());
            tokio::spawn(async move {
                cache
                    .invalidate_where(move |k| k.app == name && matches!(k.subject, BoxSubject::Enterprise(_)))
                    .await
            });
        }
        // A creation Box refused as a bad request is the caller's (its name), not the app failing.
        let callers = matches!((call, error), (UsersCall::Create(_), BoxApiError::Rejected(e)) if e.status == 400);
        if diagnosis.kind == DiagnosisKind::Misconfigured && !callers {
            app.record(Err((self.clock.now(), &diagnosis.message)));
        }
        let subject = match call {
            UsersCall::Read(id) | UsersCall::Me(id) => BoxSubject::User(id.clone()),
            UsersCall::Find(_) | UsersCall::Create(_) => BoxSubject::Enterprise(app.enterprise_id()),
        };
        upstream(app, subject, diagnosis)
    }
}

/// One App User's creation, run in a task of its own.
struct Creator {
    app: Arc<App>,
    /// The fleet's Redis: one creation at a time across the replicas.
    fleet: Option<crate::l2::Redis>,
    token: SecretString,
    external_id: Arc<str>,
    name: Arc<str>,
    /// The starting caller's place among the calls to Box, held to the end.
    place: Place,
    creations: moka::future::Cache<ExternalKey, (u64, Creation)>,
    key: ExternalKey,
    id: u64,
}

impl Creator {
    /// Starts the task: each attempt looks the id up first (the "none" a
    /// request saw may be stale, and a POST whose answer was lost may have
    /// created it), then POSTs once; a 409 (another broker created it) or a
    /// 429/5xx looks again. The task counts and logs what it created, and a
    /// failure removes its own entry (not a newer creation's), so the next
    /// request tries again even if every requester went away.
    fn start(self) -> Creation {
        let task = tokio::spawn(async move {
            let result = self.run().await;
            if let Ok(Created { user, created: true }) = &result {
                self.app.outcomes.users_created.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    app = %self.app.name,
                    user_id = %user.id,
                    external_app_user_id = &*self.external_id,
                    "created an App User"
                );
            }
            if result.is_err() {
                let id = self.id;
                self.creations
                    .entry(self.key.clone())
                    .and_compute_with(|entry| {
                        let own = entry.is_some_and(|e| e.value().0 == id);
                        std::future::ready(if own { Op::Remove } else { Op::Nop })
                    })
                    .await;
            }
            drop(self.place);
            result
        });
        async move { task.await.unwrap_or(Err(CreateFailure::Panicked)) }
            .boxed()
            .shared()
    }

    async fn run(&self) -> Result<Created, CreateFailure> {
        let client = &self.app.client;
        let mut conflict = false;
        for attempt in 0..CREATE_ATTEMPTS {
            // In a fleet, the look and the POST under the id's lock: a
            // replica that waited for another's creation finds its user.
            // (Redis unavailable: this replica goes on alone, and Box's 409
            // or the next look settles a race.)
            let _fleet_lock = match &self.fleet {
                Some(fleet) => fleet.lock_creation(&self.app.name, &self.external_id).await,
                None => None,
            };
            let found = client
                .find_users_by_external_id(&self.token, &self.external_id)
                .await
                .map_err(|e| CreateFailure::Find(Arc::new(e)))?;
            let mut matching = found
                .into_iter()
                .filter(|u| u.external_app_user_id.as_deref() == Some(&*self.external_id));
            match (matching.next(), matching.next()) {
                (Some(a), Some(b)) => return Err(CreateFailure::Ambiguous(a.id, b.id)),
                (Some(user), None) => return Ok(Created { user, created: false }),
                (None, _) => {}
            }
            match client.create_app_user(&self.token, &self.name, &self.external_id).await {
                Ok(user) => return Ok(Created { user, created: true }),
                Err(BoxApiError::Rejected(e)) if e.status == 409 => conflict = true,
                Err(e) if e.is_retryable() && attempt + 1 < CREATE_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                Err(e) => return Err(CreateFailure::Create(Arc::new(e))),
            }
        }
        Err(if conflict {
            CreateFailure::Conflict
        } else {
            CreateFailure::Panicked
        })
    }
}

/// Two users carry the external id.
fn ambiguous(app: &App, external_id: &str, a: &BoxId, b: &BoxId) -> BrokerError {
    BrokerError::FailedPrecondition(format!(
        "external_app_user_id {external_id:?} is ambiguous in app {}: Box has several users with it ({a} and {b}); give each user a unique external id in Box, or ask by user_id",
        app.name
    ))
}

/// An external id that names a Managed User (SSO users may carry one).
fn managed_by_external_id(user: &BoxId, external_id: &str) -> BrokerError {
    BrokerError::UserRefused {
        inactive: false,
        message: format!(
            "external_app_user_id {external_id:?} names user {user}, who is not an App User: external ids reach App Users only; ask for a Managed User by user_id under a rule that grants it"
        ),
    }
}

/// A failure Box caused (or reported) for `subject` of `app`.
fn upstream(app: &App, subject: BoxSubject, diagnosis: Diagnosis) -> BrokerError {
    BrokerError::Upstream(Arc::new(UpstreamError {
        app: app.name.clone(),
        subject,
        diagnosis,
        relayed: None,
    }))
}

fn not_found(app: &App, external_id: &str) -> BrokerError {
    upstream(
        app,
        BoxSubject::Enterprise(app.enterprise_id()),
        Diagnosis::new(
            DiagnosisKind::NotFound,
            format!(
                "Box has no user with external_app_user_id {external_id:?} that app {} can reach; create it first, or ask with create_if_missing where the policy grants provision",
                app.name
            ),
        ),
    )
}

/// Why `user` may not be tokenized by `app`, as the caller is told.
fn refusal(app: &App, user: &BoxUser) -> Option<BrokerError> {
    let id = &user.id;
    let refusal = user.refusal(&app.enterprise_id(), app.refused_roles())?;
    Some(match refusal {
        Refusal::Role(role) if role == "admin" || role == "coadmin" => BrokerError::UserRefused {
            inactive: false,
            message: format!(
                "user {id} is a Box {} (role {role}): the broker never tokenizes Box admins or co-admins",
                if role == "admin" { "admin" } else { "co-admin" }
            ),
        },
        Refusal::Role(role) => BrokerError::UserRefused {
            inactive: false,
            message: format!(
                "user {id} has role {role}, which app {} refuses to tokenize (refused_roles)",
                app.name
            ),
        },
        Refusal::Inactive(status) => BrokerError::UserRefused {
            inactive: true,
            message: format!(
                "user {id} is inactive or restricted in Box (status {status}, not active): a Box admin must reactivate or unlock the user before the broker tokenizes them"
            ),
        },
        Refusal::OtherEnterprise(other) => BrokerError::UserRefused {
            inactive: false,
            message: format!(
                "user {id} belongs to {}, not to app {}'s enterprise {}: the broker tokenizes only its own enterprise's users",
                other.map_or_else(|| "no enterprise".to_owned(), |e| format!("enterprise {e}")),
                app.name,
                app.enterprise_id()
            ),
        },
        Refusal::Unknown(_) => return None,
    })
}
