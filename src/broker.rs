//! The broker's domain core: the configured apps, the token cache, and the
//! operations "give me a token", "give me a downscoped token" and "revoke
//! this token".
//!
//! Data flows one way: request -> app lookup -> cache -> (mint or exchange
//! via boxapi) -> cache -> response. Nothing here knows gRPC.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use futures_util::future::{BoxFuture, FutureExt as _};
use secrecy::SecretString;

use crate::{
    boxapi::{
        AppCredentials, AuthMethod, BoxClient, BoxId, BoxSubject, Diagnosis, DiagnosisKind, Downscope, IssuedToken,
        error::{Grant, diagnose, diagnose_exchange},
    },
    cache::{
        CacheError, CachePolicy, CachedToken, FlightPermit, Lookup, Minter, Need, Served, TokenCache, TokenKey,
        UpstreamError,
    },
    clock::{SharedClock, unix_seconds},
    error::BrokerError,
    keys::{self, Attempt, KeyState, Ring},
    policy::{Ask, Policy, PolicySubject, Request as PolicyRequest},
};

/// The longest `min_ttl` a caller may ask for. Box's tokens live about an
/// hour; asking for more than this can never be met, so it is refused up front.
pub const MAX_MIN_TTL: Duration = Duration::from_secs(50 * 60);

/// One configured Box app.
#[derive(Debug)]
pub struct App {
    /// Its name in the config (`[apps.NAME]`).
    pub name: Arc<str>,
    /// The client of its Box API base URL.
    pub client: BoxClient,
    /// Its keys and secrets; replaced whole by the admin RPC. Read without a
    /// lock by every request (the enterprise id is in it).
    ring: ArcSwap<Ring>,
    /// How its last token requests went.
    health: Mutex<UpstreamHealth>,
    /// Mints that succeeded only with the standby key.
    standby_fallbacks: AtomicU64,
    /// Mints and exchanges by outcome.
    pub outcomes: Outcomes,
}

/// Token requests by kind and outcome, for metrics.
#[derive(Debug, Default)]
pub struct Outcomes {
    /// Mints Box answered with a token.
    pub mints_ok: AtomicU64,
    /// Mints that failed.
    pub mints_failed: AtomicU64,
    /// Exchanges that produced a served downscoped token.
    pub exchanges_ok: AtomicU64,
    /// Exchanges that failed or were refused by the restriction guard.
    pub exchanges_failed: AtomicU64,
}

/// The outcome of an app's recent token requests, for `GetStatus`.
#[derive(Debug, Clone, Default)]
pub struct UpstreamHealth {
    /// The last success.
    pub last_success: Option<SystemTime>,
    /// The last failure.
    pub last_failure: Option<SystemTime>,
    /// What it said.
    pub last_failure_message: String,
}

impl App {
    /// An app minting with `credentials` (from its config).
    pub fn new(name: impl Into<Arc<str>>, credentials: &AppCredentials, client: BoxClient) -> Self {
        Self {
            name: name.into(),
            ring: ArcSwap::from_pointee(Ring::from_config(credentials, client.now())),
            client,
            health: Mutex::new(UpstreamHealth::default()),
            standby_fallbacks: AtomicU64::new(0),
            outcomes: Outcomes::default(),
        }
    }

    /// Its keys and secrets now.
    pub fn ring(&self) -> Arc<Ring> {
        self.ring.load_full()
    }

    /// Switches to `ring` for every mint that starts from now on.
    pub fn replace_ring(&self, ring: Ring) {
        self.ring.store(Arc::new(ring));
    }

    /// The credentials mints use first (active key, current secret).
    pub fn credentials(&self) -> Option<Arc<AppCredentials>> {
        self.ring().primary().map(|a| a.credentials)
    }

    /// The client id (not a secret).
    pub fn client_id(&self) -> String {
        self.ring.load().identity.client_id.clone()
    }

    /// The enterprise the app is authorized in.
    pub fn enterprise_id(&self) -> BoxId {
        self.ring.load().identity.enterprise_id.clone()
    }

    /// How its recent token requests went.
    pub fn health(&self) -> UpstreamHealth {
        self.health
            .lock()
            .map_or_else(|p| p.into_inner().clone(), |h| h.clone())
    }

    /// How many mints succeeded only with the standby key.
    pub fn standby_fallbacks(&self) -> u64 {
        self.standby_fallbacks.load(Ordering::Relaxed)
    }

    fn record(&self, outcome: Result<SystemTime, (SystemTime, &str)>) {
        let mut health = self.health.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match outcome {
            Ok(at) => health.last_success = Some(at),
            Err((at, message)) => {
                health.last_failure = Some(at);
                message.clone_into(&mut health.last_failure_message);
            }
        }
    }

    /// Asks Box for the Service Account's token with `credentials` (the
    /// app's own, or a candidate key or secret), as the first request would,
    /// then revokes it (when `revoke`): Box's refusal, explained. A success
    /// is the app's last Box success in status.
    pub async fn trial_mint(&self, credentials: &AppCredentials, after: AfterTrial) -> Result<(), Diagnosis> {
        let revoke = after == AfterTrial::Revoke;
        let subject = BoxSubject::Enterprise(credentials.enterprise_id.clone());
        match self.client.request_token(credentials, &subject).await {
            Ok(token) => {
                self.record(Ok(self.client.now()));
                if revoke && let Err(e) = self.client.revoke(credentials, &token.access_token).await {
                    tracing::debug!(app = %self.name, error = %e, "revoking the trial token failed");
                }
                Ok(())
            }
            Err(error) => Err(diagnose(
                &error,
                &subject,
                &credentials.client_id,
                grant_of(credentials),
            )),
        }
    }

    /// How the app authenticates, for status and logs.
    pub fn auth_summary(&self) -> String {
        let ring = self.ring();
        match (ring.identity.algorithm, ring.key_in(KeyState::Active)) {
            (Some(algorithm), Some(key)) => format!(
                "JWT {algorithm:?}, key {} ({} bits, sha256 {}…)",
                key.kid.as_deref().unwrap_or(""),
                key.bits,
                &key.fingerprint[..16]
            ),
            (Some(_), None) => "JWT, no active key".to_owned(),
            (None, _) => "Client Credentials Grant".to_owned(),
        }
    }
}

/// What [`App::trial_mint`] does with the token Box issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterTrial {
    /// Revokes it at Box (`check-config --online`: nothing is left behind).
    Revoke,
    /// Lets it expire (activating a key: a revocation would be one more
    /// call to Box that proves nothing).
    Expire,
}

/// Whether a request asked to mint anew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refresh {
    /// A cached token will do.
    Cached,
    /// `force_refresh`.
    Forced,
}

fn grant_of(credentials: &AppCredentials) -> Grant<'_> {
    match &credentials.auth {
        AuthMethod::Jwt { key, .. } => Grant::Jwt { kid: key.kid() },
        AuthMethod::Ccg => Grant::Ccg,
    }
}

/// Whose token a caller wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// The app's Service Account.
    Enterprise,
    /// An App User or Managed User.
    User(BoxId),
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

/// The apps by name; mints and exchanges tokens for the cache.
#[derive(Debug)]
struct Apps {
    by_name: BTreeMap<Arc<str>, Arc<App>>,
}

fn upstream(key: &TokenKey, kind: DiagnosisKind, message: String) -> UpstreamError {
    UpstreamError {
        app: key.app.clone(),
        subject: key.subject.clone(),
        diagnosis: Diagnosis {
            kind,
            message,
            retry_after: None,
        },
    }
}

impl Apps {
    /// The app `key` names. Keys are built from resolved apps, so a miss is
    /// a bug, reported as the app's misconfiguration rather than a panic.
    fn of(&self, key: &TokenKey) -> Result<Arc<App>, UpstreamError> {
        self.by_name.get(&key.app).cloned().ok_or_else(|| {
            upstream(
                key,
                DiagnosisKind::Misconfigured,
                format!("app {} is not configured", key.app),
            )
        })
    }
}

impl Minter for Apps {
    fn mint(&self, key: &TokenKey) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>> {
        let app = self.of(key);
        let key = key.clone();
        async move { mint_full(&*app?, &key).await }.boxed()
    }

    fn exchange(
        &self,
        key: &TokenKey,
        parent: Arc<CachedToken>,
    ) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>> {
        let app = self.of(key);
        let key = key.clone();
        async move {
            let app = app?;
            let Some(downscope) = &key.downscope else {
                return Err(upstream(
                    &key,
                    DiagnosisKind::Misconfigured,
                    "a full token cannot be exchanged for itself (a bug)".to_owned(),
                ));
            };
            exchange(&app, &parent, &key, downscope).await
        }
        .boxed()
    }
}

async fn mint_full(app: &App, key: &TokenKey) -> Result<IssuedToken, UpstreamError> {
    let ring = app.ring();
    let Some(first) = ring.primary() else {
        return Err(upstream(
            key,
            DiagnosisKind::Misconfigured,
            format!(
                "app {} has no active signing key: activate one with the admin RPC",
                app.name
            ),
        ));
    };
    let mut used = first;
    let mut result = app.client.request_token(&used.credentials, &key.subject).await;
    if let Err(error) = &result {
        // One more try when Box refused the key or the secret: the key that is
        // active now (if a rotation raced this mint), else the standby; or the
        // previous secrets, in order.
        let (fallbacks, kind): (Vec<Attempt>, Fallback) = if keys::is_key_rejection(error) {
            let current = app.ring();
            if Arc::ptr_eq(&current, &ring) {
                (ring.standby().into_iter().collect(), Fallback::StandbyKey)
            } else {
                (current.primary().into_iter().collect(), Fallback::Rotated)
            }
        } else if keys::is_secret_rejection(error) {
            (ring.secret_fallbacks(), Fallback::PreviousSecret)
        } else {
            (Vec::new(), Fallback::Rotated)
        };
        let first_error = result.as_ref().err().map(ToString::to_string).unwrap_or_default();
        for attempt in fallbacks {
            let retried = app.client.request_token(&attempt.credentials, &key.subject).await;
            let again = retried.as_ref().is_err_and(keys::is_secret_rejection);
            used = attempt;
            result = retried;
            if result.is_ok() {
                alert_fallback(app, &ring, &used, kind, &first_error);
            }
            if !again {
                break;
            }
        }
    }
    let now = app.client.now();
    match result {
        Ok(token) => {
            if let Some(k) = &used.key {
                k.mark_used(now);
            }
            app.record(Ok(now));
            app.outcomes.mints_ok.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                app = %app.name,
                subject_type = key.subject.sub_type(),
                subject_id = %key.subject.id(),
                expires_at = unix_seconds(token.expires_at),
                box_request_id = token.request_id.as_deref().unwrap_or(""),
                "minted a Box token"
            );
            Ok(token)
        }
        Err(error) => {
            let grant = grant_of(&used.credentials);
            let diagnosis = diagnose(&error, &key.subject, &used.credentials.client_id, grant);
            // A user Box does not know (or will not tokenize) is the caller's
            // mistake, not the app failing: status shows only the latter. A
            // Client Credentials Grant's refusal of a user is ambiguous (the
            // app's access level or disabled user tokens read the same), so
            // it counts.
            if diagnosis.kind != DiagnosisKind::NotFound || grant == Grant::Ccg {
                app.record(Err((now, &diagnosis.message)));
            }
            app.outcomes.mints_failed.fetch_add(1, Ordering::Relaxed);
            // The one place an upstream failure is logged in full.
            tracing::warn!(
                app = %app.name,
                subject_type = key.subject.sub_type(),
                subject_id = %key.subject.id(),
                error = %error,
                "minting a Box token failed: {}",
                diagnosis.message
            );
            Err(UpstreamError {
                app: app.name.clone(),
                subject: key.subject.clone(),
                diagnosis,
            })
        }
    }
}

/// What a mint fell back to after Box refused its first credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fallback {
    /// The key activated while the mint was under way.
    Rotated,
    /// The standby key: Box no longer accepts the active one.
    StandbyKey,
    /// A previous client secret: Box no longer accepts the current one.
    PreviousSecret,
}

/// A mint succeeded only with a fallback: the operator must hear about it.
fn alert_fallback(app: &App, ring: &Ring, used: &Attempt, kind: Fallback, first_error: &str) {
    match kind {
        Fallback::Rotated => {}
        Fallback::StandbyKey => {
            app.standby_fallbacks.fetch_add(1, Ordering::Relaxed);
            let kid = |k: Option<&keys::KeyEntry>| k.and_then(|k| k.kid.clone()).unwrap_or_default();
            tracing::error!(
                alert = "standby_key_used",
                app = %app.name,
                active_kid = %kid(ring.key_in(KeyState::Active)),
                standby_kid = %kid(used.key.as_ref()),
                box_error = first_error,
                "ALERT: Box rejected the active signing key; the standby key minted this token. Check the app's public keys in the Box developer console, then activate a key Box accepts"
            );
        }
        Fallback::PreviousSecret => tracing::error!(
            alert = "previous_client_secret_used",
            app = %app.name,
            box_error = first_error,
            "ALERT: Box rejected the current client secret; a previous one minted this token. Check the secret in the Box developer console"
        ),
    }
}

/// Exchanges `parent` (the subject's cached full token) for a downscoped
/// one, and refuses Box's answer unless it is restricted as asked.
async fn exchange(
    app: &App,
    parent: &CachedToken,
    key: &TokenKey,
    downscope: &Downscope,
) -> Result<IssuedToken, UpstreamError> {
    let issued = match app
        .client
        .exchange(&parent.access_token, &downscope.scopes, downscope.target.as_ref())
        .await
    {
        Ok(issued) => issued,
        Err(error) => {
            let diagnosis = diagnose_exchange(&error, &key.subject, downscope.target.as_ref());
            tracing::warn!(
                app = %app.name,
                subject_type = key.subject.sub_type(),
                subject_id = %key.subject.id(),
                error = %error,
                "downscoping a Box token failed: {}",
                diagnosis.message
            );
            app.outcomes.exchanges_failed.fetch_add(1, Ordering::Relaxed);
            return Err(UpstreamError {
                app: app.name.clone(),
                subject: key.subject.clone(),
                diagnosis,
            });
        }
    };
    if let Some(problem) = restriction_problem(&issued.restricted_to, downscope) {
        // Never hand out a token broader than asked for; kill it at Box too.
        tracing::error!(app = %app.name, subject_id = %key.subject.id(), "refusing a downscoped token: {problem}");
        revoke_quietly(app, issued.access_token);
        app.outcomes.exchanges_failed.fetch_add(1, Ordering::Relaxed);
        return Err(upstream(
            key,
            DiagnosisKind::Misconfigured,
            format!("refusing the downscoped token: {problem}"),
        ));
    }
    tracing::info!(
        app = %app.name,
        subject_type = key.subject.sub_type(),
        subject_id = %key.subject.id(),
        scopes = %downscope.scopes.join(" "),
        target = %downscope.target.as_ref().map_or_else(|| "(none)".to_owned(), ToString::to_string),
        expires_at = unix_seconds(issued.expires_at.min(parent.expires_at)),
        box_request_id = issued.request_id.as_deref().unwrap_or(""),
        "downscoped a Box token"
    );
    app.outcomes.exchanges_ok.fetch_add(1, Ordering::Relaxed);
    Ok(issued)
}

/// Why Box's `restricted_to` does not match the request, if it does not: a
/// requested target must be named, and no scope beyond those asked for may appear.
fn restriction_problem(restricted_to: &[crate::boxapi::Restriction], downscope: &Downscope) -> Option<String> {
    if let Some(extra) = restricted_to.iter().find(|r| !downscope.scopes.contains(&r.scope)) {
        return Some(format!("Box granted scope {:?}, which was not asked for", extra.scope));
    }
    let target = downscope.target.as_ref()?;
    let named = restricted_to.iter().any(|r| target.is_named_by(r));
    (!named).then(|| format!("Box's answer is not restricted to {target}"))
}

/// Revokes a token the broker will not hand out, in the background.
fn revoke_quietly(app: &App, token: SecretString) {
    let client = app.client.clone();
    let credentials = app.credentials();
    let name = app.name.clone();
    tokio::spawn(async move {
        let Some(credentials) = credentials else {
            return;
        };
        if let Err(e) = client.revoke(&credentials, &token).await {
            tracing::warn!(app = %name, error = %e, "revoking a refused token failed");
        }
    });
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
        }
    }
}

/// A cap on calls to Box in progress that requests started (mints and
/// exchanges): over all callers, and per caller, so one caller's slow or
/// numerous misses cannot take every place. A cache hit takes no place, nor
/// does a request that joins a call already in progress for the same token:
/// the cap exists to protect Box, and neither reaches it.
#[derive(Debug)]
pub struct UpstreamBudget {
    max: usize,
    per_caller_max: usize,
    in_progress: AtomicUsize,
    /// Caller -> its calls in progress (entries leave at zero).
    by_caller: Mutex<HashMap<Arc<str>, usize>>,
}

/// One call's place in the [`UpstreamBudget`], given back when dropped.
#[derive(Debug)]
struct Place {
    budget: Arc<UpstreamBudget>,
    caller: Arc<str>,
}

impl UpstreamBudget {
    /// At most `max` calls to Box in progress, `per_caller_max` of them for one caller.
    pub fn new(max: usize, per_caller_max: usize) -> Self {
        Self {
            max,
            per_caller_max,
            in_progress: AtomicUsize::new(0),
            by_caller: Mutex::new(HashMap::new()),
        }
    }

    /// A place for a call `caller`'s request starts, or Busy naming the limit.
    fn enter(self: &Arc<Self>, caller: &Arc<str>) -> Result<Place, CacheError> {
        let mut by_caller = self.by_caller.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = by_caller.entry(caller.clone()).or_insert(0);
        if *mine >= self.per_caller_max {
            return Err(CacheError::Busy(format!(
                "caller {caller:?} already has {} calls to Box in progress ([server] max_concurrent_requests_per_caller); retry with backoff",
                self.per_caller_max
            )));
        }
        if self.in_progress.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.in_progress.fetch_sub(1, Ordering::AcqRel);
            if *mine == 0 {
                by_caller.remove(caller);
            }
            return Err(CacheError::Busy(format!(
                "the broker is at its limit of {} concurrent requests calling Box ([server] max_concurrent_requests); retry with backoff",
                self.max
            )));
        }
        *mine += 1;
        Ok(Place {
            budget: self.clone(),
            caller: caller.clone(),
        })
    }
}

impl Default for UpstreamBudget {
    fn default() -> Self {
        Self::new(1024, 64)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut by_caller = self
            .budget
            .by_caller
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(mine) = by_caller.get_mut(&self.caller) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                by_caller.remove(&self.caller);
            }
        }
        self.budget.in_progress.fetch_sub(1, Ordering::AcqRel);
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
        }
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
        subject: &BoxSubject,
        ask: Ask<'_>,
        min_ttl: Duration,
        refresh: Refresh,
    ) -> Result<Permit, BrokerError> {
        let force_refresh = refresh == Refresh::Forced;
        let subject = match subject {
            BoxSubject::Enterprise(_) => PolicySubject::Enterprise,
            BoxSubject::User(id) => PolicySubject::User(id.as_str()),
        };
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

    fn key(&self, app: &App, subject: &Subject, min_ttl: Duration) -> Result<TokenKey, BrokerError> {
        if min_ttl > MAX_MIN_TTL {
            return Err(BrokerError::InvalidArgument(format!(
                "min_ttl of {} s exceeds the maximum of {} s: Box tokens live about an hour",
                min_ttl.as_secs(),
                MAX_MIN_TTL.as_secs()
            )));
        }
        let subject = match subject {
            Subject::Enterprise => BoxSubject::Enterprise(app.enterprise_id()),
            Subject::User(id) => BoxSubject::User(id.clone()),
        };
        Ok(TokenKey {
            app: app.name.clone(),
            subject,
            downscope: None,
            caller: None,
        })
    }

    /// A place in `caller`'s budget for a call to Box its request starts.
    fn admission(&self, caller: &Arc<str>) -> impl Fn() -> Result<FlightPermit, CacheError> + Sync {
        let (budget, caller) = (self.budget.clone(), caller.clone());
        move || budget.enter(&caller).map(|place| FlightPermit(Box::new(place)))
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
        let key = self.key(app, &request.subject, request.min_ttl)?;
        let permit = self.authorize(
            caller,
            app,
            &key.subject,
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
            parent_at_least: None,
        };
        let lookup = self
            .cache
            .serve(caller, &key, need, Some(&self.admission(caller)))
            .await?;
        Ok(permit.grant(app, lookup, self.clock.now()))
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
        let parent_key = self.key(app, &request.subject, request.min_ttl)?;
        let ask = Ask::Downscoped {
            scopes: &request.downscope.scopes,
            target: request.downscope.target.as_ref(),
        };
        let permit = self.authorize(caller, app, &parent_key.subject, ask, request.min_ttl, Refresh::Cached)?;
        let key = TokenKey {
            downscope: Some(request.downscope.clone()),
            caller: Some(caller.clone()),
            ..parent_key.clone()
        };
        let lookup = self
            .cache
            .serve_child(&key, request.min_ttl, Some(&self.admission(caller)))
            .await?;
        Ok(permit.grant(app, lookup, self.clock.now()))
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
        let rule = self
            .authorize(caller, app, &key.subject, Ask::Revoke, Duration::ZERO, Refresh::Cached)?
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
        let revoked = tokio::spawn(async move {
            match client.revoke(&credentials, &token).await {
                Ok(()) => {
                    let dropped = cache.invalidate_token(&family, &cached).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxapi::{Restriction, Target};

    fn downscope(scopes: &[&str], target: Option<Target>) -> Downscope {
        Downscope {
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            target,
        }
    }

    fn restriction(scope: &str, kind: &str, id: &str) -> Restriction {
        Restriction {
            scope: scope.to_owned(),
            object_type: kind.to_owned(),
            object_id: id.to_owned(),
        }
    }

    fn folder(id: &str) -> Option<Target> {
        BoxId::parse(id).ok().map(Target::Folder)
    }

    #[test]
    fn a_matching_restriction_is_accepted() {
        let d = downscope(&["item_preview"], folder("5"));
        assert_eq!(
            restriction_problem(&[restriction("item_preview", "folder", "5")], &d),
            None
        );
    }

    #[test]
    fn a_missing_target_restriction_is_refused() {
        let d = downscope(&["item_preview"], folder("5"));
        assert!(restriction_problem(&[], &d).is_some());
        assert!(restriction_problem(&[restriction("item_preview", "folder", "6")], &d).is_some());
        assert!(restriction_problem(&[restriction("item_preview", "file", "5")], &d).is_some());
    }

    #[test]
    fn an_unrequested_scope_is_refused() {
        let d = downscope(&["item_preview"], folder("5"));
        let r = [
            restriction("item_preview", "folder", "5"),
            restriction("item_delete", "folder", "5"),
        ];
        assert!(restriction_problem(&r, &d).is_some_and(|p| p.contains("item_delete")));
    }

    #[test]
    fn without_a_target_an_empty_restriction_is_fine() {
        assert_eq!(restriction_problem(&[], &downscope(&["root_readonly"], None)), None);
    }
}
