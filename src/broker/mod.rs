//! The broker's domain core: the configured apps, the token cache, and the
//! operations "give me a token", "give me a downscoped token" and "revoke
//! this token": `mod.rs` (requests, policy, revocation), `apps.rs` (one
//! configured Box app: its key ring and how its calls went), `minting.rs`
//! (the `Minter` over the apps: mint, exchange, the restriction guard),
//! `budget.rs` (the cap on calls to Box in progress), `users.rs` (external
//! ids, App Users created on first use, who may be tokenized).
//!
//! Data flows one way: request -> app lookup -> policy -> cache -> (mint or
//! exchange via boxapi) -> cache -> response. Nothing here knows gRPC.

mod apps;
mod budget;
mod minting;
mod users;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use secrecy::SecretString;

use crate::{
    boxapi::{BoxId, BoxSubject, Downscope, ExternalUser, error::diagnose_exchange},
    cache::{CacheError, CachePolicy, FlightPermit, Lookup, Need, Served, TokenCache, TokenKey, UpstreamError},
    clock::SharedClock,
    error::BrokerError,
    policy::{Ask, Policy, PolicySubject, Request as PolicyRequest},
};

use self::minting::Apps;
pub use self::{
    apps::{AfterTrial, App, DEFAULT_REFUSED_ROLES, Outcomes, UpstreamHealth},
    budget::UpstreamBudget,
    users::{DEFAULT_CHECK_TTL, DEFAULT_MAPPING_TTL, Resolved, UsersPolicy},
};

/// The longest `min_ttl` a caller may ask for. Box's tokens live about an
/// hour; asking for more than this can never be met, so it is refused up front.
pub const MAX_MIN_TTL: Duration = Duration::from_secs(50 * 60);

/// Whether a request asked to mint anew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refresh {
    /// A cached token will do.
    Cached,
    /// `force_refresh`.
    Forced,
}

/// Whose token a caller wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// The app's Service Account.
    Enterprise,
    /// An App User or Managed User.
    User(BoxId),
    /// An App User (or Managed User) by its `external_app_user_id`.
    External(Arc<ExternalUser>),
}

impl Subject {
    /// `enterprise`, `user` or `external_user`, for spans and audit records.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Enterprise => "enterprise",
            Self::User(_) => "user",
            Self::External(_) => "external_user",
        }
    }
}

/// A validated `GetToken`.
#[derive(Debug, Clone)]
pub struct TokenRequest<'a> {
    /// The app's name; `None` when the caller left it empty.
    pub app: Option<&'a str>,
    /// Whose token.
    pub subject: Subject,
    /// Remaining life needed beyond the safety margin.
    pub min_ttl: Duration,
    /// Mint anew, ignoring the cache.
    pub force_refresh: bool,
}

/// A validated `GetDownscopedToken`.
#[derive(Debug, Clone)]
pub struct DownscopeRequest<'a> {
    /// The app's name; `None` when the caller left it empty.
    pub app: Option<&'a str>,
    /// Whose token is downscoped.
    pub subject: Subject,
    /// Sorted, de-duplicated Box downscope scopes (see
    /// `boxapi::downscope::normalize_scopes`) and the one item, if any: built
    /// once per request and shared by the cache key and the audit record.
    pub downscope: Arc<Downscope>,
    /// Remaining life needed beyond the safety margin.
    pub min_ttl: Duration,
}

/// A revocation's result.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// The app's configured name.
    pub app: Arc<str>,
    /// Whose token it was.
    pub subject: BoxSubject,
    /// True for a downscoped token.
    pub downscoped: bool,
    /// How many cache entries were dropped (the token and its children).
    pub evicted: usize,
    /// The policy rule that allowed it.
    pub rule: Arc<str>,
}

/// A served token and the policy rule that allowed it.
#[derive(Debug, Clone)]
pub struct Granted {
    /// The app's configured name.
    pub app: Arc<str>,
    /// The token.
    pub lookup: Lookup,
    /// The name of the rule that allowed it.
    pub rule: Arc<str>,
    /// The expiry the caller is told: the token's own, or sooner when the
    /// rule sets `max_lifetime_secs`.
    pub expires_at: SystemTime,
    /// For a request by external id: the Box user it named.
    pub resolved: Option<Resolved>,
}

/// A policy's permission: the rule, and the longest the token may be held.
struct Permit {
    rule: Arc<str>,
    max_lifetime: Option<Duration>,
}

impl Permit {
    fn grant(self, app: &App, lookup: Lookup, now: SystemTime) -> Granted {
        let expires_at = match self.max_lifetime.and_then(|max| now.checked_add(max)) {
            Some(latest) => lookup.token.expires_at.min(latest),
            None => lookup.token.expires_at,
        };
        Granted {
            app: app.name.clone(),
            lookup,
            rule: self.rule,
            expires_at,
            resolved: None,
        }
    }
}

/// The broker: apps, cache and policy.
#[derive(Debug)]
pub struct Broker {
    apps: Arc<Apps>,
    cache: TokenCache,
    clock: SharedClock,
    /// Swapped whole on reload; read without a lock per request.
    policy: ArcSwap<Policy>,
    /// Calls to Box in progress.
    budget: Arc<UpstreamBudget>,
    /// A `force_refresh` is served a token minted this recently.
    force_refresh_interval: Duration,
    /// External ids and user checks.
    users: users::Directory,
    /// The Redis a fleet of brokers shares, if configured.
    fleet: Option<crate::l2::Redis>,
}

impl Broker {
    /// A broker over `apps` (at least one), caching with `policy`.
    pub fn new(apps: Vec<App>, clock: SharedClock, cache_policy: CachePolicy, policy: Policy) -> Self {
        let apps = Arc::new(Apps {
            by_name: apps.into_iter().map(|a| (a.name.clone(), Arc::new(a))).collect(),
        });
        let cache = TokenCache::new(apps.clone(), clock.clone(), cache_policy);
        Self {
            apps,
            cache,
            clock,
            policy: ArcSwap::from_pointee(policy),
            budget: Arc::new(UpstreamBudget::default()),
            force_refresh_interval: cache_policy.force_refresh_interval,
            users: users::Directory::new(UsersPolicy {
                negative_ttl: cache_policy.negative_ttl,
                ..UsersPolicy::default()
            }),
            fleet: None,
        }
    }

    /// The same broker sharing tokens, invalidations and key sets with the
    /// other brokers of a fleet through `redis`.
    #[must_use]
    pub fn with_fleet(mut self, redis: crate::l2::Redis) -> Self {
        self.cache.share_with(Arc::new(redis.clone()));
        self.fleet = Some(redis);
        self
    }

    /// The fleet's Redis, if configured.
    pub fn fleet(&self) -> Option<&crate::l2::Redis> {
        self.fleet.as_ref()
    }

    /// The same broker with `policy` for external ids and user checks.
    #[must_use]
    pub fn with_users(mut self, policy: UsersPolicy) -> Self {
        self.users = users::Directory::new(policy);
        self
    }

    /// The same broker with `budget` for calls to Box.
    #[must_use]
    pub fn with_budget(mut self, budget: UpstreamBudget) -> Self {
        self.budget = Arc::new(budget);
        self
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Puts `policy` in force for every request that starts from now on.
    pub fn replace_policy(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
    }

    /// Asks the policy; a denial becomes `PermissionDenied`.
    fn authorize(
        &self,
        caller: &str,
        app: &App,
        subject: PolicySubject<'_>,
        ask: Ask<'_>,
        min_ttl: Duration,
        refresh: Refresh,
    ) -> Result<Permit, BrokerError> {
        let force_refresh = refresh == Refresh::Forced;
        let policy = self.policy.load();
        match policy.granting_rule(&PolicyRequest {
            caller,
            app: &app.name,
            subject,
            ask,
            min_ttl,
            force_refresh,
        }) {
            Ok(rule) => Ok(Permit {
                rule: rule.name.clone(),
                max_lifetime: rule.max_lifetime(),
            }),
            Err(reason) => Err(BrokerError::PermissionDenied(format!("denied by policy: {reason}"))),
        }
    }

    /// The configured app names, sorted.
    pub fn app_names(&self) -> Vec<String> {
        self.apps.by_name.keys().map(|k| k.to_string()).collect()
    }

    /// The configured apps.
    pub fn apps(&self) -> impl Iterator<Item = &Arc<App>> {
        self.apps.by_name.values()
    }

    /// The token cache.
    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// Resolves a requested app name; `None` means "the only one". Errors
    /// name no app (see [`Self::resolve_app_for`]).
    pub fn resolve_app(&self, name: Option<&str>) -> Result<&Arc<App>, BrokerError> {
        self.resolve(name, |_| Vec::new())
    }

    /// [`Self::resolve_app`] for `caller`: an error names the apps its
    /// policy lets it use, and no others.
    pub fn resolve_app_for(&self, caller: &str, name: Option<&str>) -> Result<&Arc<App>, BrokerError> {
        self.resolve(name, |broker| {
            broker
                .policy
                .load()
                .apps_for(caller, broker.apps.by_name.keys().map(|k| &**k))
        })
    }

    fn resolve(&self, name: Option<&str>, usable: impl Fn(&Self) -> Vec<String>) -> Result<&Arc<App>, BrokerError> {
        match name {
            Some(name) => self.apps.by_name.get(name).ok_or_else(|| BrokerError::UnknownApp {
                name: name.chars().filter(|c| !c.is_control()).take(64).collect(),
                usable: usable(self),
            }),
            None if self.apps.by_name.len() == 1 => self
                .apps
                .by_name
                .values()
                .next()
                .ok_or_else(|| BrokerError::AppRequired { usable: Vec::new() }),
            None => Err(BrokerError::AppRequired { usable: usable(self) }),
        }
    }

    /// The policy's view of `subject`.
    fn policy_subject(subject: &Subject) -> PolicySubject<'_> {
        match subject {
            Subject::Enterprise => PolicySubject::Enterprise,
            Subject::User(id) => PolicySubject::User(id.as_str()),
            Subject::External(user) => PolicySubject::ExternalUser {
                id: &user.id,
                provision: user.create.is_some(),
            },
        }
    }

    /// Refuses a `min_ttl` no Box token can meet.
    fn check_min_ttl(min_ttl: Duration) -> Result<(), BrokerError> {
        if min_ttl > MAX_MIN_TTL {
            return Err(BrokerError::InvalidArgument(format!(
                "min_ttl of {} s exceeds the maximum of {} s: Box tokens live about an hour",
                min_ttl.as_secs(),
                MAX_MIN_TTL.as_secs()
            )));
        }
        Ok(())
    }

    /// The full token's key for `subject`, once the policy allowed it: an
    /// external id resolved to its Box user (created if asked). A user's key
    /// is served only through [`Self::checked`]. No Box call happens before
    /// the policy's decision.
    async fn key(
        &self,
        caller: &Arc<str>,
        app: &Arc<App>,
        subject: &Subject,
    ) -> Result<(TokenKey, Option<Resolved>), BrokerError> {
        let (subject, resolved) = match subject {
            Subject::Enterprise => return Ok((self.enterprise_key(app), None)),
            Subject::User(id) => (BoxSubject::User(id.clone()), None),
            Subject::External(external) => {
                let resolved = self.resolve_external(caller, app, external).await?;
                (BoxSubject::User(resolved.user.clone()), Some(resolved))
            }
        };
        let key = TokenKey {
            app: app.name.clone(),
            subject,
            downscope: None,
            caller: None,
            external: None,
        };
        Ok((key, resolved))
    }

    /// Serves a token of `key`'s subject with `serve` — for a user, only one
    /// whose user is checked as one the broker may tokenize: a cached token
    /// stamped by a check that still holds (`cached`, one atomic load), else
    /// after the check (the check cache, or Box), stamping what is served.
    /// Never a token for an unchecked user.
    async fn checked<C, S>(
        &self,
        caller: &Arc<str>,
        app: &Arc<App>,
        (key, subject): (&TokenKey, &Subject),
        cached: impl FnOnce(SystemTime) -> C,
        serve: impl FnOnce() -> S,
    ) -> Result<Lookup, BrokerError>
    where
        C: Future<Output = Option<Lookup>>,
        S: Future<Output = Result<Lookup, CacheError>>,
    {
        let BoxSubject::User(user) = &key.subject else {
            // The Service Account is not checked: its token is served as it is.
            return Ok(serve().await?);
        };
        // Only a token whose stamp holds now is taken (and recorded as served).
        if let Some(hit) = cached(self.clock.now()).await {
            return Ok(hit);
        }
        let until = match self.check_user(caller, app, user).await {
            Ok(until) => until,
            Err(error) => {
                // A mapping to a user Box no longer has is dropped: the next request looks again.
                if let (Subject::External(_), BrokerError::Upstream(e)) = (subject, &error)
                    && e.diagnosis.kind == crate::boxapi::DiagnosisKind::NotFound
                {
                    self.forget_user(app, subject).await;
                }
                return Err(error);
            }
        };
        let lookup = serve().await?;
        lookup.token.mark_checked(until);
        // A refusal or an invalidation that landed while this request was
        // served (a mint may take a while) takes the stamp back: the next
        // request is checked again.
        if !self.check_holds(app, user).await {
            lookup.token.unmark_checked();
        }
        Ok(lookup)
    }

    /// The key of the app's Service Account token.
    fn enterprise_key(&self, app: &App) -> TokenKey {
        TokenKey {
            app: app.name.clone(),
            subject: BoxSubject::Enterprise(app.enterprise_id()),
            downscope: None,
            caller: None,
            external: None,
        }
    }

    /// A place in `caller`'s budget for a call to Box its request starts.
    /// Borrowed, not cloned: a hit never asks, so it should cost nothing.
    fn admission<'a>(&'a self, caller: &'a Arc<str>) -> impl Fn() -> Result<FlightPermit, CacheError> + Sync + 'a {
        move || self.budget.enter(caller).map(|place| FlightPermit(Box::new(place)))
    }

    /// What a `force_refresh` needs: a token minted within the interval.
    fn forced(&self) -> SystemTime {
        let now = self.clock.now();
        now.checked_sub(self.force_refresh_interval).unwrap_or(now)
    }

    /// A token for the request's subject, from the cache or minted, if the
    /// policy lets `caller` have it.
    pub async fn get_token(&self, caller: &Arc<str>, request: &TokenRequest<'_>) -> Result<Granted, BrokerError> {
        let app = self.resolve_app_for(caller, request.app)?;
        Self::check_min_ttl(request.min_ttl)?;
        let permit = self.authorize(
            caller,
            app,
            Self::policy_subject(&request.subject),
            Ask::Full,
            request.min_ttl,
            if request.force_refresh {
                Refresh::Forced
            } else {
                Refresh::Cached
            },
        )?;
        let need = Need {
            min_ttl: request.min_ttl,
            minted_since: request.force_refresh.then(|| self.forced()),
            forced: request.force_refresh,
            ..Need::default()
        };
        if let Subject::Enterprise = request.subject {
            // The common case, without the users' steps (no check, no resolution).
            let key = self.enterprise_key(app);
            let lookup = self
                .cache
                .serve(caller, &key, need, Some(&self.admission(caller)))
                .await?;
            return Ok(permit.grant(app, lookup, self.clock.now()));
        }
        let (key, resolved) = self.key(caller, app, &request.subject).await?;
        let admission = self.admission(caller);
        let lookup = self
            .checked(
                caller,
                app,
                (&key, &request.subject),
                |now| self.cache.serve_cached(caller, &key, need, move |t| t.checked_at(now)),
                || self.cache.serve(caller, &key, need, Some(&admission)),
            )
            .await?;
        Ok(Granted {
            resolved,
            ..permit.grant(app, lookup, self.clock.now())
        })
    }

    /// A downscoped token: the subject's full token (cached or minted) is
    /// exchanged; the result is cached under subject + scopes + target and
    /// the caller, never outlives its parent, and is exchanged anew once the
    /// parent is replaced.
    pub async fn get_downscoped(
        &self,
        caller: &Arc<str>,
        request: &DownscopeRequest<'_>,
    ) -> Result<Granted, BrokerError> {
        let app = self.resolve_app_for(caller, request.app)?;
        Self::check_min_ttl(request.min_ttl)?;
        let ask = Ask::Downscoped {
            scopes: &request.downscope.scopes,
            target: request.downscope.target.as_ref(),
        };
        let subject = Self::policy_subject(&request.subject);
        let permit = self.authorize(caller, app, subject, ask, request.min_ttl, Refresh::Cached)?;
        let (parent_key, resolved) = self.key(caller, app, &request.subject).await?;
        let key = TokenKey {
            downscope: Some(request.downscope.clone()),
            caller: Some(caller.clone()),
            ..parent_key
        };
        let admission = self.admission(caller);
        if let Subject::Enterprise = request.subject {
            let lookup = self
                .cache
                .serve_child(caller, &key, request.min_ttl, Some(&admission))
                .await?;
            return Ok(permit.grant(app, lookup, self.clock.now()));
        }
        let lookup = self
            .checked(
                caller,
                app,
                (&key, &request.subject),
                |now| {
                    self.cache
                        .serve_cached_child(caller, &key, request.min_ttl, move |t| t.checked_at(now))
                },
                || self.cache.serve_child(caller, &key, request.min_ttl, Some(&admission)),
            )
            .await?;
        Ok(Granted {
            resolved,
            ..permit.grant(app, lookup, self.clock.now())
        })
    }

    /// Revokes `token` at Box and drops it from the cache — with, for a full
    /// token, every downscoped token made from it — if `caller` may revoke
    /// and was the only caller it was served to.
    ///
    /// Whether `caller` may revoke at all is asked before the token is
    /// looked up; the lookup is by SHA-256 (no scan); and the answer for a
    /// token served to someone else is the answer for one that does not
    /// exist, so revoking reveals nothing about other callers' tokens.
    pub async fn revoke(&self, caller: &str, app: Option<&str>, token: SecretString) -> Result<Revoked, BrokerError> {
        use secrecy::ExposeSecret as _;
        let app = self.resolve_app_for(caller, app)?;
        if !self.policy.load().may_revoke(caller, &app.name) {
            return Err(BrokerError::PermissionDenied(format!(
                "denied by policy: no rule grants revoke = true to caller {caller:?} for app {:?}",
                app.name
            )));
        }
        let not_issued = || {
            BrokerError::NotIssued(format!(
                "app {} holds no token with that value that was issued to you: it was not issued here, or the broker no longer holds it (replaced by a newer one, revoked, or expired)",
                app.name
            ))
        };
        let digest = crate::fingerprint::digest(token.expose_secret());
        let (key, cached) = self.cache.find(&app.name, &digest).await.ok_or_else(not_issued)?;
        let shared = || {
            BrokerError::FailedPrecondition(
                "this token was also served to other callers, and revoking it at Box would cut them off too; it stays valid until it expires (an operator can drop it from the cache with the admin InvalidateTokens)".to_owned(),
            )
        };
        match cached.served_to(caller) {
            Served::NotTo => return Err(not_issued()),
            Served::AlsoToOthers => return Err(shared()),
            Served::OnlyTo => {}
        }
        // A token shared through the fleet's Redis may have been served by
        // other replicas: their record counts too. Without it, no
        // revocation: it could cut off a caller another replica served.
        if let Some(fleet) = self.fleet.as_ref().filter(|_| self.cache.is_shared(&key)) {
            match fleet.served_only_to(&digest, caller).await {
                Ok(Some(false)) => return Err(shared()),
                Ok(_) => {}
                Err(_) => {
                    return Err(BrokerError::Retry(
                        "the fleet's Redis cannot be asked whether other replicas served this token to other callers; retry when it answers (the token stays valid meanwhile)".to_owned(),
                    ));
                }
            }
        }
        let rule = match &key.subject {
            BoxSubject::Enterprise(_) => self.authorize(
                caller,
                app,
                PolicySubject::Enterprise,
                Ask::Revoke,
                Duration::ZERO,
                Refresh::Cached,
            ),
            BoxSubject::User(id) => {
                let by_id = self.authorize(
                    caller,
                    app,
                    PolicySubject::User(id.as_str()),
                    Ask::Revoke,
                    Duration::ZERO,
                    Refresh::Cached,
                );
                // A token served by external id is the caller's to revoke under that grant too.
                let external = match &by_id {
                    Ok(_) => None,
                    Err(_) => self.external_id_of(&Arc::from(caller), app, id).await?,
                };
                match (by_id, external) {
                    (Err(_), Some(external)) => self.authorize(
                        caller,
                        app,
                        PolicySubject::ExternalUser {
                            id: &external,
                            provision: false,
                        },
                        Ask::Revoke,
                        Duration::ZERO,
                        Refresh::Cached,
                    ),
                    (by_id, _) => by_id,
                }
            }
        }?
        .rule;
        let credentials = app.credentials().ok_or_else(|| {
            BrokerError::FailedPrecondition(format!("app {} has no usable credentials to revoke with", app.name))
        })?;
        // From here the token is not served; a caller served it meanwhile
        // (recorded before it checks this mark) is seen by this second look.
        if !cached.begin_revoking() {
            return Err(BrokerError::Retry(
                "a revocation of this token is already under way; retry to see its outcome".to_owned(),
            ));
        }
        if cached.served_to(caller) != Served::OnlyTo {
            cached.end_revoking();
            return Err(shared());
        }
        // Revoked at Box and dropped from the cache in a task of its own: a
        // caller that goes away (or times out) mid-way cannot leave a
        // revoked token cached for others. The outcome is logged there.
        let (client, cache, family, name) = (app.client.clone(), self.cache.clone(), key.clone(), app.name.clone());
        let fleet = self.fleet.clone();
        let revoked = tokio::spawn(async move {
            match client.revoke(&credentials, &token).await {
                Ok(()) => {
                    cache.mark_revoked(&digest).await;
                    let dropped = cache.invalidate_token(&family, &cached).await;
                    // The other replicas drop their copies; Redis drops the shared one.
                    if let Some(fleet) = fleet {
                        if cache.is_shared(&family) {
                            fleet.invalidate(&family).await;
                        }
                        fleet
                            .announce(&crate::l2::Notice::Revoked {
                                app: name.to_string(),
                                digest: hex::encode(digest),
                            })
                            .await;
                    }
                    tracing::info!(
                        app = %name,
                        subject_type = family.subject.sub_type(),
                        subject_id = %family.subject.id(),
                        downscoped = family.downscope.is_some(),
                        evicted = dropped,
                        "revoked a Box token"
                    );
                    Ok(dropped)
                }
                Err(error) => {
                    cached.end_revoking();
                    tracing::warn!(app = %name, error = %error, "revoking a Box token failed");
                    Err(error)
                }
            }
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "the revocation task failed");
            BrokerError::Internal("internal error while revoking the token")
        })?;
        let dropped = match revoked {
            Ok(dropped) => dropped,
            Err(error) => {
                let diagnosis = diagnose_exchange(&error, &key.subject, None);
                return Err(BrokerError::Upstream(Arc::new(UpstreamError {
                    app: app.name.clone(),
                    subject: key.subject,
                    diagnosis,
                    relayed: None,
                })));
            }
        };
        Ok(Revoked {
            app: key.app,
            subject: key.subject,
            downscoped: key.downscope.is_some(),
            evicted: dropped,
            rule,
        })
    }
}
