//! The token cache: moka for bounded storage, plus per-key single-flight and
//! refresh-ahead.
//!
//! - A token is served only while more than [`DEFAULT_SAFETY_MARGIN`] (or the
//!   configured margin) plus the caller's `min_ttl` remains.
//! - Concurrent misses for one key join one *flight*: a spawned task that
//!   mints once and stores the result. The task is spawned, so a caller that
//!   goes away does not cancel the mint others are waiting for.
//! - A hit inside the refresh window (a jittered few minutes before the margin
//!   begins) starts a background flight and returns the cached token at once.
//! - No lock is held across I/O: the flight map's `std::sync::Mutex` is taken
//!   only to look up or insert a flight, never across an `.await`.
//! - Box's "no such user" (and "target not reachable") answers are
//!   remembered for [`DEFAULT_NEGATIVE_TTL`], so repeating the request does
//!   not ask Box again.
//! - Each token remembers which caller it was first served to and whether
//!   any other caller got it too, and is found by its SHA-256 in O(1): what
//!   revocation needs to refuse touching a token someone else holds.

mod flight;
mod shared;
mod token;

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures_util::future::BoxFuture;

use self::{flight::Flight, token::unix_millis};
pub use self::{
    flight::{Admission, FlightPermit},
    shared::{Lease, LeaseOutcome, SharedStore},
    token::{CachedToken, Minted, Served},
};
use crate::{
    boxapi::{BoxSubject, Diagnosis, DiagnosisKind, Downscope, ExternalUser, IssuedToken},
    clock::SharedClock,
};

/// The least remaining lifetime a served token has, beyond the caller's
/// `min_ttl`. A caller uses the token for requests that may queue, retry or
/// upload for a while, and the broker's clock may differ from Box's; two
/// minutes covers both without wasting much of a ~65 minute token.
pub const DEFAULT_SAFETY_MARGIN: Duration = Duration::from_secs(120);
/// The smallest safety margin the config accepts.
pub const MIN_SAFETY_MARGIN: Duration = Duration::from_secs(60);
/// How long before the safety margin begins a hit starts a background
/// refresh, so callers on the hot path never wait for Box.
pub const DEFAULT_REFRESH_AHEAD: Duration = Duration::from_secs(300);
/// The refresh point is moved earlier by a random amount up to this, so
/// tokens minted together (at startup, say) are not all refreshed together.
pub const REFRESH_JITTER: Duration = Duration::from_secs(60);
/// After a background refresh starts, the next one for the same token waits
/// this long: a failing Box is not hit on every request.
pub const REFRESH_RETRY_INTERVAL: Duration = Duration::from_secs(10);
/// Default bound on cached tokens.
pub const DEFAULT_MAX_ENTRIES: u64 = 100_000;
/// How long Box's "no such user" (or "target not reachable") is remembered.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// A `force_refresh` within this long of the cached token's mint is served
/// that token: one forced mint per key per interval, however many callers ask.
pub const DEFAULT_FORCE_REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// How many flights one request may join before giving up (a joiner whose
/// `min_ttl` the shared result does not meet tries again).
const MAX_FLIGHTS_PER_REQUEST: usize = 3;
/// How many tokens a request passes over because each was being revoked
/// before it gives up ([`CacheError::BeingRevoked`]): a revocation replaces
/// at most one.
const REVOCATION_RETRIES: usize = 3;
/// What [`CacheError::BeingRevoked`] says.
const BEING_REVOKED: &str = "the token for this request is being revoked; retry in a moment";
/// What [`CacheError::BeingRevoked`] says when it was the parent.
const PARENT_BEING_REVOKED: &str = "the token this one is exchanged from is being revoked; retry in a moment";

/// Cache tuning, from the config.
#[derive(Debug, Clone, Copy)]
pub struct CachePolicy {
    /// See [`DEFAULT_SAFETY_MARGIN`].
    pub safety_margin: Duration,
    /// See [`DEFAULT_REFRESH_AHEAD`].
    pub refresh_ahead: Duration,
    /// See [`REFRESH_JITTER`].
    pub refresh_jitter: Duration,
    /// Bound on cached tokens.
    pub max_entries: u64,
    /// See [`DEFAULT_NEGATIVE_TTL`] (zero: not remembered).
    pub negative_ttl: Duration,
    /// See [`DEFAULT_FORCE_REFRESH_INTERVAL`].
    pub force_refresh_interval: Duration,
}

impl Default for CachePolicy {
    fn default() -> Self {
        Self {
            safety_margin: DEFAULT_SAFETY_MARGIN,
            refresh_ahead: DEFAULT_REFRESH_AHEAD,
            refresh_jitter: REFRESH_JITTER,
            max_entries: DEFAULT_MAX_ENTRIES,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            force_refresh_interval: DEFAULT_FORCE_REFRESH_INTERVAL,
        }
    }
}

/// What a token is cached under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    /// The app's configured name.
    pub app: Arc<str>,
    /// Whose token.
    pub subject: BoxSubject,
    /// For a downscoped token: its scopes and target. `None` for a full token.
    pub downscope: Option<Arc<Downscope>>,
    /// For a downscoped token: the caller it is made for. Downscoped tokens
    /// are what reaches browsers and gets revoked at logout, so each caller
    /// has its own: one caller's revocation never cuts off another's.
    pub caller: Option<Arc<str>>,
    /// For an edge: the App User as the request named it, by external id
    /// (the edge cannot resolve it; `subject` is then a placeholder). A
    /// central broker resolves it and keys by the numeric id, with `None`.
    pub external: Option<Arc<ExternalUser>>,
}

impl TokenKey {
    /// The key of `subject`'s full token in `app`.
    pub fn full(app: Arc<str>, subject: BoxSubject) -> Self {
        Self {
            app,
            subject,
            downscope: None,
            caller: None,
            external: None,
        }
    }

    /// The key of the full token a downscoped one is exchanged from.
    pub fn parent(&self) -> Self {
        Self {
            app: self.app.clone(),
            subject: self.subject.clone(),
            downscope: None,
            caller: None,
            external: self.external.clone(),
        }
    }
}

/// Minting (or exchanging) failed upstream: the [`Minter`]'s error; the diagnosis says what to fix.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", diagnosis.message)]
pub struct UpstreamError {
    /// The app's configured name.
    pub app: Arc<str>,
    /// Whose token was asked for.
    pub subject: BoxSubject,
    /// What went wrong and what to do.
    pub diagnosis: Diagnosis,
    /// For an edge: the central broker's own answer, relayed unchanged
    /// (its code and `grpc-status-details-bin`); the diagnosis then holds
    /// its message.
    pub relayed: Option<Relayed>,
}

impl UpstreamError {
    /// A failure of the call for `key`: what kind, and the one sentence that says what to fix.
    pub fn new(key: &TokenKey, kind: DiagnosisKind, message: String) -> Self {
        Self {
            app: key.app.clone(),
            subject: key.subject.clone(),
            diagnosis: Diagnosis {
                kind,
                message,
                retry_after: None,
            },
            relayed: None,
        }
    }
}

/// A gRPC status another broker answered, kept to be relayed as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    /// The gRPC status code.
    pub code: i32,
    /// The encoded `google.rpc.Status` details (ErrorInfo, RetryInfo), if any.
    pub details: Arc<[u8]>,
}

/// Where the cache gets tokens it does not hold; the broker implements it
/// over its Box clients. The cache decides which call a key needs and, for
/// a downscoped key, resolves the parent itself (the current full token,
/// from this cache): the minter never reaches back into the cache.
pub trait Minter: Send + Sync + 'static {
    /// Asks Box for a new full token for `key` (`key.downscope` is `None`).
    fn mint(&self, key: &TokenKey) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>>;

    /// Exchanges `parent` (the cached full token of `key.parent()`) for a
    /// token restricted as `key.downscope` says.
    fn exchange(
        &self,
        key: &TokenKey,
        parent: Arc<CachedToken>,
    ) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>>;

    /// True for a minter whose upstream serves every key itself,
    /// downscoped ones included, and honours `min_ttl` and `force_refresh`
    /// (an edge asking its central broker): the cache then calls
    /// [`Self::fetch`] for every key and keeps no parent of its own, a
    /// forced request joins only a forced flight, and a request the shared
    /// result does not satisfy asks again itself.
    fn fetches(&self) -> bool {
        false
    }

    /// Asks the upstream for `key`, as `need` says (when [`Self::fetches`]).
    fn fetch(&self, key: &TokenKey, need: &Need) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>> {
        let _ = need;
        self.mint(key)
    }
}

/// What the caller needs of a token.
#[derive(Debug, Clone, Copy, Default)]
pub struct Need {
    /// Remaining life required beyond the safety margin.
    pub min_ttl: Duration,
    /// Only a token minted at or after this time will do (`force_refresh`).
    pub minted_since: Option<SystemTime>,
    /// Only a downscoped token exchanged from this parent (or a newer one) will do.
    pub parent_at_least: Option<u64>,
    /// The caller asked for a new token (`force_refresh`), as opposed to a
    /// refresh ahead of expiry; passed to [`Minter::fetch`].
    pub forced: bool,
    /// The request that starts a flight, for [`Minter::fetch`] to pass on.
    pub request_id: Option<crate::rpc::RequestId>,
}

/// A token and whether it came from the cache without waiting for Box.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The token.
    pub token: Arc<CachedToken>,
    /// True when served without waiting for a mint.
    pub cache_hit: bool,
}

/// Why no token could be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// Box refused or failed.
    #[error(transparent)]
    Upstream(Arc<UpstreamError>),
    /// Even a freshly minted token does not live long enough.
    #[error("min_ttl cannot be met: the newest token has {available:?} left beyond the safety margin")]
    MinTtlUnmet {
        /// What the freshest token offered beyond the margin.
        available: Duration,
    },
    /// The cached token lives, but not `min_ttl` longer, and Box could not
    /// issue a new one.
    #[error("min_ttl cannot be met: the cached token has {available:?} left beyond the safety margin, and {upstream}")]
    MinTtlUnmetUpstreamDown {
        /// What the cached token offers beyond the margin.
        available: Duration,
        /// Why no new token came.
        upstream: Arc<UpstreamError>,
    },
    /// The mint task panicked (a bug; logged).
    #[error("the token mint failed unexpectedly")]
    TaskFailed,
    /// Every token the request was offered was being revoked (a revocation
    /// replaces at most one, so this is rare): retrying soon works.
    #[error("{0}")]
    BeingRevoked(&'static str),
    /// No new call to Box may start now (the broker's budget); the message
    /// names the limit.
    #[error("{0}")]
    Busy(String),
}

struct Inner {
    entries: moka::future::Cache<TokenKey, Arc<CachedToken>, foldhash::fast::SeedableRandomState>,
    /// SHA-256 of each cached token -> its key: revocation finds a token in
    /// O(1). Filled before a token enters `entries`, emptied by the
    /// eviction listener when it leaves.
    by_digest: Arc<DigestIndex>,
    /// Box's "no such user" answers, with when they stop counting (by the
    /// injected clock; moka's TTL only bounds memory).
    negative: Option<moka::future::Cache<TokenKey, (Arc<UpstreamError>, SystemTime)>>,
    /// Entries moka dropped for size or expiry (not invalidations or replacements).
    evictions: Arc<AtomicU64>,
    flights: Mutex<HashMap<TokenKey, Flight>>,
    next_flight: AtomicU64,
    minter: Arc<dyn Minter>,
    /// SHA-256 of tokens revoked at Box (here or by another broker of the
    /// fleet): never cached again, whatever brings them back (a flight
    /// that read the shared store just before the revocation).
    revoked: moka::future::Cache<[u8; 32], ()>,
    /// The second level shared with other brokers, if any (set once, at startup).
    shared: std::sync::OnceLock<Arc<dyn SharedStore>>,
    clock: SharedClock,
    policy: CachePolicy,
}

impl Inner {
    /// Records that `caller` was served `token` (cached under `key()`), and
    /// tells the shared store when that changed who holds a shared token.
    fn note_served(&self, token: &CachedToken, caller: &Arc<str>, key: impl FnOnce() -> TokenKey) {
        if let Some(news) = token.note_served(caller)
            && let Some(shared) = self.shared.get()
        {
            let key = key();
            if shared.shares(&key) {
                shared.served(&token.sha256, caller, news);
            }
        }
    }
}

/// SHA-256 of a cached token -> its key and the cached token's id, in
/// shards. Keyed by the digest's first eight bytes (a third of the memory
/// of the whole digest); `find` compares the whole digest with the token it
/// finds. The id tells an entry's own removal from that of an earlier entry
/// with the same token (an edge is handed the token it holds again).
#[derive(Default)]
struct DigestIndex {
    shards: [Mutex<HashMap<u64, (TokenKey, u64)>>; 16],
}

/// The index's key for `digest`.
fn short(digest: &[u8; 32]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_ne_bytes(first)
}

impl DigestIndex {
    fn shard(&self, digest: &[u8; 32]) -> std::sync::MutexGuard<'_, HashMap<u64, (TokenKey, u64)>> {
        // A digest is uniformly random: a byte past the index key picks the shard.
        self.shards[usize::from(digest[8] % 16)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The token cache. Cloning shares it.
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("entries", &self.inner.entries.entry_count())
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

/// Evicts an entry from moka's storage when Box's expiry passes (by the
/// system clock). Freshness is decided by the injected clock, not by this.
struct ExpireAtTokenExpiry;

impl moka::Expiry<TokenKey, Arc<CachedToken>> for ExpireAtTokenExpiry {
    fn expire_after_create(&self, _: &TokenKey, value: &Arc<CachedToken>, _: std::time::Instant) -> Option<Duration> {
        Some(
            value
                .expires_at
                .duration_since(crate::clock::system_now())
                .unwrap_or_default(),
        )
    }

    fn expire_after_update(
        &self,
        key: &TokenKey,
        value: &Arc<CachedToken>,
        created_at: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, created_at)
    }
}

/// The cache keys' hasher: foldhash, seeded from the OS's random generator
/// (foldhash's own default seed mixes addresses and the time).
fn key_hasher() -> foldhash::fast::SeedableRandomState {
    static SHARED: std::sync::OnceLock<foldhash::SharedSeed> = std::sync::OnceLock::new();
    let shared = SHARED.get_or_init(|| foldhash::SharedSeed::from_u64(rand::random()));
    foldhash::fast::SeedableRandomState::with_seed(rand::random(), shared)
}

impl TokenCache {
    /// An empty cache that mints through `minter`.
    pub fn new(minter: Arc<dyn Minter>, clock: SharedClock, policy: CachePolicy) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let counted = evictions.clone();
        let by_digest = Arc::new(DigestIndex::default());
        let index = by_digest.clone();
        let entries = moka::future::Cache::builder()
            .name("box-tokens")
            .max_capacity(policy.max_entries)
            .expire_after(ExpireAtTokenExpiry)
            .eviction_listener(move |key: Arc<TokenKey>, token: Arc<CachedToken>, cause| {
                // Whatever the cause, the token is no longer the cached one:
                // its children must be exchanged anew (`cached_child`). For a
                // replacement or an invalidation moka calls this inside
                // `insert`/`invalidate`, before they return. For a size
                // eviction or an expiry it calls it from its housekeeping, a
                // little after the entry stopped being returned; meanwhile a
                // child may still be served, which is harmless: an evicted
                // parent is still a valid token nothing newer has replaced,
                // and a child expires no later than its parent.
                token.supersede();
                let mut shard = index.shard(&token.sha256);
                // Only this token's entry (a colliding newer one stays, and
                // so does the same token cached again under the same key).
                if shard
                    .get(&short(&token.sha256))
                    .is_some_and(|(indexed, id)| *indexed == *key && *id == token.id)
                {
                    shard.remove(&short(&token.sha256));
                }
                if cause.was_evicted() {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build_with_hasher(key_hasher());
        let negative = (!policy.negative_ttl.is_zero()).then(|| {
            moka::future::Cache::builder()
                .max_capacity((policy.max_entries / 10).max(1000))
                .time_to_live(policy.negative_ttl)
                .build()
        });
        Self {
            inner: Arc::new(Inner {
                evictions,
                entries,
                by_digest,
                negative,
                flights: Mutex::new(HashMap::new()),
                next_flight: AtomicU64::new(0),
                minter,
                shared: std::sync::OnceLock::new(),
                // A Box token lives about an hour; two cover it.
                revoked: moka::future::Cache::builder()
                    .max_capacity(policy.max_entries)
                    .time_to_live(Duration::from_secs(2 * 3600))
                    .build(),
                clock,
                policy,
            }),
        }
    }

    /// Adds a second level shared with other brokers: a flight for a full
    /// token looks there before it mints, and writes what it minted there.
    /// Once only (at startup); false if one was set already.
    pub fn share_with(&self, shared: Arc<dyn SharedStore>) -> bool {
        self.inner.shared.set(shared).is_ok()
    }

    /// Whether tokens of `key` go through a shared second level.
    pub fn is_shared(&self, key: &TokenKey) -> bool {
        self.inner.shared.get().is_some_and(|s| s.shares(key))
    }

    /// The cached token for `key`, if it meets `need` (including, for a
    /// downscoped token, being exchanged from the current parent): served
    /// without touching the flight map, starting a background refresh when
    /// one is due.
    pub async fn cached(&self, key: &TokenKey, need: Need) -> Option<Lookup> {
        self.cached_if(key, need, |_| true).await
    }

    /// [`Self::cached`] for a token `accept` takes (asked before anything
    /// else is done with it: a refused one starts no refresh).
    async fn cached_if(&self, key: &TokenKey, need: Need, accept: impl Fn(&CachedToken) -> bool) -> Option<Lookup> {
        let token = self.inner.entries.get(key).await?;
        let now = self.inner.clock.now();
        if !self.inner.satisfies(&token, &need, now) || !accept(&token) {
            return None;
        }
        if token.claim_refresh(now) {
            self.start_refresh(key, &token);
        }
        Some(Lookup { token, cache_hit: true })
    }

    /// Box's remembered "no such user" for `key`, while it counts.
    async fn known_missing(&self, key: &TokenKey) -> Option<Arc<UpstreamError>> {
        let (error, until) = self.inner.negative.as_ref()?.get(key).await?;
        (self.inner.clock.now() < until).then_some(error)
    }

    /// A token for `key` that meets `need`: from the cache, or from a mint
    /// shared with every concurrent request for the same key.
    pub async fn get(&self, key: &TokenKey, need: Need) -> Result<Lookup, CacheError> {
        self.get_admitted(key, need, None).await
    }

    /// [`Self::get`], where a request that would start a call to Box (not
    /// one that joins a call in progress, nor a hit) must first be admitted:
    /// the permit is held until the call ends.
    pub async fn get_admitted(
        &self,
        key: &TokenKey,
        need: Need,
        admit: Option<Admission<'_>>,
    ) -> Result<Lookup, CacheError> {
        if let Some(hit) = self.cached(key, need).await {
            return Ok(hit);
        }
        if let Some(missing) = self.known_missing(key).await {
            return Err(CacheError::Upstream(missing));
        }
        let mut available = Duration::ZERO;
        for _ in 0..MAX_FLIGHTS_PER_REQUEST {
            let (started_at, flight, own) = self.join_or_start(key, need, admit)?;
            let token = match flight.await {
                Ok(token) => token,
                Err(CacheError::Upstream(upstream)) if !need.min_ttl.is_zero() && need.minted_since.is_none() => {
                    // A live token is held, just not long enough for this caller: say so.
                    let spare = self.inner.entries.get(key).await.map_or(Duration::ZERO, |held| {
                        held.remaining(self.inner.clock.now())
                            .saturating_sub(self.inner.policy.safety_margin)
                    });
                    if spare.is_zero() {
                        return Err(CacheError::Upstream(upstream));
                    }
                    return Err(CacheError::MinTtlUnmetUpstreamDown {
                        available: spare,
                        upstream,
                    });
                }
                Err(e) => return Err(e),
            };
            let now = self.inner.clock.now();
            // A forced request that joined a forced call under way (to a
            // fetching minter) takes what that call brings back.
            let met = if !own && need.forced && self.inner.minter.fetches() {
                Need {
                    minted_since: Some(started_at),
                    ..need
                }
            } else {
                need
            };
            if self.inner.satisfies(&token, &met, now) {
                return Ok(Lookup {
                    cache_hit: token.minted_at < started_at,
                    token,
                });
            }
            available = token.remaining(now).saturating_sub(self.inner.policy.safety_margin);
            if token.minted_at >= started_at && (own || !self.inner.minter.fetches()) {
                // Freshly minted and still not enough: Box's tokens are
                // shorter than asked for. (A fetching minter was asked for
                // another request's need: this one asks for its own.)
                break;
            }
        }
        Err(CacheError::MinTtlUnmet { available })
    }

    /// A token for `caller` (see [`Self::get_admitted`]): records that
    /// `caller` was served it and, only then, checks that no revocation of
    /// it began meanwhile (the handshake with [`CachedToken::begin_revoking`]):
    /// a token being revoked is never returned; a newer one is fetched.
    pub async fn serve(
        &self,
        caller: &Arc<str>,
        key: &TokenKey,
        need: Need,
        admit: Option<Admission<'_>>,
    ) -> Result<Lookup, CacheError> {
        self.not_being_revoked(Some(caller), key, need, admit, BEING_REVOKED)
            .await
    }

    /// The cached token for `key` if it meets `need` and `accept` takes it,
    /// recorded as served to `caller` and not being revoked — never a call
    /// to Box: `None` sends the caller the way of [`Self::serve`]. A token
    /// `accept` refuses is neither recorded as served nor refreshed.
    pub async fn serve_cached(
        &self,
        caller: &Arc<str>,
        key: &TokenKey,
        need: Need,
        accept: impl Fn(&CachedToken) -> bool,
    ) -> Option<Lookup> {
        let hit = self.cached_if(key, need, accept).await?;
        self.inner.note_served(&hit.token, caller, || key.clone());
        (!hit.token.is_revoking()).then_some(hit)
    }

    /// [`Self::get_admitted`], passing over a token being revoked for a
    /// newer one (at most [`REVOCATION_RETRIES`] times, then `gave_up`);
    /// the serve is recorded for `caller` before the check.
    pub(super) async fn not_being_revoked(
        &self,
        caller: Option<&Arc<str>>,
        key: &TokenKey,
        mut need: Need,
        admit: Option<Admission<'_>>,
        gave_up: &'static str,
    ) -> Result<Lookup, CacheError> {
        for _ in 0..REVOCATION_RETRIES {
            let lookup = self.get_admitted(key, need, admit).await?;
            if let Some(caller) = caller {
                self.inner.note_served(&lookup.token, caller, || key.clone());
            }
            if !lookup.token.is_revoking() {
                return Ok(lookup);
            }
            need.minted_since = Some(lookup.token.minted_at + Duration::from_millis(1));
        }
        Err(CacheError::BeingRevoked(gave_up))
    }

    /// A downscoped token for `key` (made for `caller`) with at least
    /// `min_ttl` left, exchanged from the subject's current full token: the
    /// cached one while its parent is still the cached full token (one
    /// lookup, [`Self::cached_child`]); else the current parent, then a
    /// child exchanged from it (or from a newer one). Neither is being
    /// revoked, and both are recorded as served to the caller.
    pub async fn serve_child(
        &self,
        caller: &Arc<str>,
        key: &TokenKey,
        min_ttl: Duration,
        admit: Option<Admission<'_>>,
    ) -> Result<Lookup, CacheError> {
        if let Some(hit) = self.serve_cached_child(caller, key, min_ttl, |_| true).await {
            return Ok(hit);
        }
        let parent_key = key.parent();
        for _ in 0..REVOCATION_RETRIES {
            let parent_need = Need {
                min_ttl,
                ..Need::default()
            };
            let parent = self.serve(caller, &parent_key, parent_need, admit).await?;
            let need = Need {
                min_ttl,
                parent_at_least: Some(parent.token.id),
                ..Need::default()
            };
            let child = self.serve(caller, key, need, admit).await?;
            // The child may come from a newer parent than the one looked up.
            match child.token.parent() {
                Some(parent) => {
                    self.inner.note_served(&parent, caller, || parent_key.clone());
                    if !parent.is_revoking() {
                        return Ok(child);
                    }
                }
                None => return Ok(child),
            }
        }
        Err(CacheError::BeingRevoked(BEING_REVOKED))
    }

    /// The common case of [`Self::serve_child`]: the token is cached and its
    /// parent still is, and neither is being revoked (checked after
    /// recording the serve) — never a call to Box. As in
    /// [`Self::serve_cached`], a token `accept` refuses is neither recorded
    /// as served nor refreshed.
    pub async fn serve_cached_child(
        &self,
        caller: &Arc<str>,
        key: &TokenKey,
        min_ttl: Duration,
        accept: impl Fn(&CachedToken) -> bool,
    ) -> Option<Lookup> {
        self.cached_child_if(key, min_ttl, accept).await.filter(|hit| {
            let _ = hit.token.note_served(caller);
            let parent = hit.token.parent();
            if let Some(parent) = &parent {
                self.inner.note_served(parent, caller, || key.parent());
            }
            !hit.token.is_revoking() && parent.is_none_or(|p| !p.is_revoking())
        })
    }

    /// The cached downscoped token for `key` with at least `min_ttl` left,
    /// if the parent it was exchanged from is still the cached full token —
    /// found without looking the parent up. This is what [`Self::get`] with
    /// `parent_at_least` set to the current parent's id would serve from
    /// the cache; `None` sends the caller that way.
    ///
    /// What the skipped parent lookup did, a hit still does: it touches the
    /// parent in moka (once a second), so a parent whose children are busy
    /// stays recent in the eviction policy; and it starts the parent's
    /// background refresh when due. The child's own refresh starts only if
    /// it expires before its parent: one that expires with its parent gains
    /// nothing from another exchange with it, and its successor comes from
    /// the parent's successor.
    pub async fn cached_child(&self, key: &TokenKey, min_ttl: Duration) -> Option<Lookup> {
        self.cached_child_if(key, min_ttl, |_| true).await
    }

    /// [`Self::cached_child`] for a token `accept` takes (asked first).
    async fn cached_child_if(
        &self,
        key: &TokenKey,
        min_ttl: Duration,
        accept: impl Fn(&CachedToken) -> bool,
    ) -> Option<Lookup> {
        let token = self.inner.entries.get(key).await?;
        let parent = token.parent.upgrade()?;
        let now = self.inner.clock.now();
        let need = Need {
            min_ttl,
            ..Need::default()
        };
        if parent.is_superseded()
            || parent.is_revoking()
            || !self.inner.satisfies(&token, &need, now)
            || !accept(&token)
        {
            return None;
        }
        if parent.claim_touch(u64::try_from(unix_millis(now)).unwrap_or(0)) {
            let _ = self.inner.entries.get(&key.parent()).await;
        }
        if parent.claim_refresh(now) {
            self.start_refresh(&key.parent(), &parent);
        }
        if token.expires_at < parent.expires_at && token.claim_refresh(now) {
            self.start_refresh(key, &token);
        }
        Some(Lookup { token, cache_hit: true })
    }

    /// The cached token of `app` whose SHA-256 is `digest`, and its key:
    /// two hash lookups, whatever the cache holds.
    pub async fn find(&self, app: &str, digest: &[u8; 32]) -> Option<(TokenKey, Arc<CachedToken>)> {
        self.find_any(digest).await.filter(|(key, _)| &*key.app == app)
    }

    /// The cached token whose SHA-256 is `digest`, whatever its app, and its key.
    pub async fn find_any(&self, digest: &[u8; 32]) -> Option<(TokenKey, Arc<CachedToken>)> {
        let key = self
            .inner
            .by_digest
            .shard(digest)
            .get(&short(digest))
            .map(|(key, _)| key.clone())?;
        let token = self.inner.entries.get(&key).await?;
        (token.sha256 == *digest).then_some((key, token))
    }

    /// Every cached copy of the token whose SHA-256 is `digest`, under any
    /// key (an edge may hold one token under two app names, and replaces a
    /// copy when it is handed the same token again). A scan of the cache:
    /// for revocation, not for a request's path.
    pub fn copies(&self, digest: &[u8; 32]) -> Vec<(TokenKey, Arc<CachedToken>)> {
        self.inner
            .entries
            .iter()
            .filter(|(_, token)| token.sha256 == *digest)
            .map(|(key, token)| ((*key).clone(), token))
            .collect()
    }

    /// Drops `token` (cached under `key`) and, for a full token, the
    /// downscoped tokens exchanged from it — and nothing else: a newer token
    /// that replaced it meanwhile stays. Returns how many entries were dropped.
    pub async fn invalidate_token(&self, key: &TokenKey, token: &CachedToken) -> usize {
        let mut doomed = vec![(key.clone(), token.id)];
        if key.downscope.is_none() {
            doomed.extend(
                self.inner
                    .entries
                    .iter()
                    .filter(|(k, v)| k.app == key.app && k.subject == key.subject && v.parent_id() == Some(token.id))
                    .map(|(k, v)| ((*k).clone(), v.id)),
            );
        }
        let mut dropped = 0;
        for (k, id) in doomed {
            let removed = self
                .inner
                .entries
                .entry(k)
                .and_compute_with(|held| {
                    let op = match held {
                        Some(entry) if entry.value().id == id => moka::ops::compute::Op::Remove,
                        _ => moka::ops::compute::Op::Nop,
                    };
                    std::future::ready(op)
                })
                .await;
            if matches!(removed, moka::ops::compute::CompResult::Removed(_)) {
                dropped += 1;
            }
        }
        dropped
    }

    /// Remembers that the token whose SHA-256 is `digest` was revoked at
    /// Box: it is never cached (or taken from the shared store) again.
    pub async fn mark_revoked(&self, digest: &[u8; 32]) {
        self.inner.revoked.insert(*digest, ()).await;
    }

    /// Drops every copy of the token whose SHA-256 is `digest`, revoked at
    /// Box by another broker of the fleet, with its downscoped children;
    /// it is never cached again. Returns how many entries were dropped.
    pub async fn drop_revoked(&self, digest: &[u8; 32]) -> usize {
        self.mark_revoked(digest).await;
        let mut dropped = 0;
        for (key, token) in self.copies(digest) {
            dropped += self.invalidate_token(&key, &token).await;
        }
        dropped
    }

    /// Drops every cached token whose key satisfies `doomed` (with a full
    /// token go its downscoped children, as they share its app and subject).
    /// Returns how many entries were dropped.
    pub async fn invalidate_where(&self, doomed: impl Fn(&TokenKey) -> bool) -> usize {
        let keys: Vec<TokenKey> = self
            .inner
            .entries
            .iter()
            .filter(|(k, _)| doomed(k))
            .map(|(k, _)| (*k).clone())
            .collect();
        for k in &keys {
            self.inner.entries.invalidate(k).await;
        }
        if let Some(negative) = &self.inner.negative {
            let missing: Vec<TokenKey> = negative
                .iter()
                .filter(|(k, _)| doomed(k))
                .map(|(k, _)| (*k).clone())
                .collect();
            for k in &missing {
                negative.invalidate(k).await;
            }
        }
        keys.len()
    }

    /// How many cached tokens' keys satisfy `counted` (a scan).
    pub fn count_where(&self, counted: impl Fn(&TokenKey) -> bool) -> usize {
        self.inner.entries.iter().filter(|(k, _)| counted(k)).count()
    }

    /// Drops the cached token for `key`, if any.
    #[cfg(test)]
    async fn invalidate(&self, key: &TokenKey) {
        self.inner.entries.invalidate(key).await;
    }

    /// How many tokens are cached, after moka's pending bookkeeping has run.
    pub async fn count(&self) -> u64 {
        self.inner.entries.run_pending_tasks().await;
        self.inner.entries.entry_count()
    }

    /// How many tokens are cached, counted (a scan; for metrics scrapes).
    pub fn live_entries(&self) -> usize {
        self.inner.entries.iter().count()
    }

    /// Entries dropped for size or expiry so far.
    pub fn evictions(&self) -> u64 {
        self.inner.evictions.load(Ordering::Relaxed)
    }
}

impl Inner {
    fn satisfies(&self, token: &CachedToken, need: &Need, now: SystemTime) -> bool {
        !token.is_revoking()
            && token.remaining(now) > self.policy.safety_margin + need.min_ttl
            && need.minted_since.is_none_or(|t| token.minted_at >= t)
            && need
                .parent_at_least
                .is_none_or(|p| token.parent_id().is_some_and(|id| id >= p))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use std::sync::atomic::AtomicUsize;

    use futures_util::future::FutureExt as _;
    use secrecy::{ExposeSecret as _, SecretString};

    use super::*;
    use crate::{boxapi::BoxId, clock::SystemClock};

    /// Mints `token-N` after `delay`, counting calls.
    #[derive(Default)]
    struct CountingMinter {
        calls: AtomicUsize,
        delay: Duration,
    }

    impl Minter for CountingMinter {
        fn mint(&self, _: &TokenKey) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let delay = self.delay;
            async move {
                tokio::time::sleep(delay).await;
                Ok(issued_now(n))
            }
            .boxed()
        }

        fn exchange(
            &self,
            key: &TokenKey,
            _: Arc<CachedToken>,
        ) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>> {
            self.mint(key)
        }
    }

    /// `token-N`, issued now for an hour.
    fn issued_now(n: usize) -> IssuedToken {
        let now = crate::clock::system_now();
        IssuedToken {
            access_token: SecretString::from(format!("token-{n}")),
            expires_at: now + Duration::from_secs(3600),
            issued_at: now,
            token_type: "bearer".to_owned(),
            request_id: None,
            restricted_to: Vec::new(),
        }
    }

    fn key(user: u32) -> TokenKey {
        TokenKey {
            app: Arc::from("a"),
            subject: BoxSubject::User(BoxId::parse(&user.to_string()).unwrap()),
            downscope: None,
            caller: None,
            external: None,
        }
    }

    fn cache(minter: Arc<CountingMinter>, max_entries: u64) -> TokenCache {
        TokenCache::new(
            minter,
            Arc::new(SystemClock),
            CachePolicy {
                max_entries,
                ..CachePolicy::default()
            },
        )
    }

    #[test]
    fn a_downscoped_token_is_capped_at_its_parents_expiry() {
        let now = crate::clock::system_now();
        let issued = |secs| IssuedToken {
            access_token: SecretString::from("t".to_owned()),
            expires_at: now + Duration::from_secs(secs),
            issued_at: now,
            token_type: "bearer".to_owned(),
            request_id: None,
            restricted_to: Vec::new(),
        };
        let policy = CachePolicy::default();
        let parent = Arc::new(CachedToken::new(
            Minted {
                issued: issued(600),
                parent: None,
            },
            &policy,
        ));
        let child = CachedToken::new(
            Minted {
                issued: issued(4000),
                parent: Some(parent.clone()),
            },
            &policy,
        );
        assert_eq!(child.expires_at, parent.expires_at);
        assert_eq!(child.parent_id(), Some(parent.id));
        assert!(child.id > parent.id);
        // The child does not keep its parent (and the parent's secret) alive.
        drop(parent);
        assert_eq!(child.parent_id(), None);
    }

    #[tokio::test]
    async fn capacity_is_bounded() {
        let minter = Arc::new(CountingMinter::default());
        let cache = cache(minter.clone(), 10);
        for user in 1..=100 {
            cache.get(&key(user), Need::default()).await.unwrap();
        }
        cache.inner.entries.run_pending_tasks().await;
        assert!(cache.count().await <= 10, "{} entries", cache.count().await);
        assert_eq!(minter.calls.load(Ordering::SeqCst), 100);
    }

    fn indexed(cache: &TokenCache) -> usize {
        cache
            .inner
            .by_digest
            .shards
            .iter()
            .map(|s| s.lock().map(|s| s.len()).unwrap_or(0))
            .sum()
    }

    #[tokio::test]
    async fn revocation_finds_exactly_the_cached_tokens_by_digest() {
        let minter = Arc::new(CountingMinter::default());
        let cache = cache(minter.clone(), 10);
        let mut tokens = Vec::new();
        for user in 1..=30 {
            tokens.push((user, cache.get(&key(user), Need::default()).await.unwrap().token));
        }
        cache.inner.entries.run_pending_tasks().await;
        assert_eq!(
            indexed(&cache) as u64,
            cache.count().await,
            "evictions leave the index too"
        );
        let mut found = 0;
        for (user, token) in &tokens {
            if let Some((k, t)) = cache.find("a", &token.sha256).await {
                assert_eq!((&k, t.id), (&key(*user), token.id));
                found += 1;
            }
        }
        assert_eq!(found as u64, cache.count().await);
        assert!(
            cache.find("other-app", &tokens[29].1.sha256).await.is_none(),
            "another app's"
        );

        // A replaced token and an invalidated one are no longer found.
        let (user, last) = tokens[29].clone();
        let forced = Need {
            minted_since: Some(crate::clock::system_now() + Duration::from_millis(1)),
            ..Need::default()
        };
        tokio::time::sleep(Duration::from_millis(2)).await;
        let newer = cache.get(&key(user), forced).await.unwrap().token;
        assert!(cache.find("a", &last.sha256).await.is_none(), "replaced");
        assert!(cache.find("a", &newer.sha256).await.is_some());
        cache.invalidate(&key(user)).await;
        assert!(cache.find("a", &newer.sha256).await.is_none(), "invalidated");
        cache.inner.entries.run_pending_tasks().await;
        assert_eq!(indexed(&cache) as u64, cache.count().await);
    }

    #[test]
    fn a_revocation_and_a_concurrent_serve_never_both_go_ahead() {
        let token = CachedToken::new(
            Minted {
                issued: issued_now(0),
                parent: None,
            },
            &CachePolicy::default(),
        );
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("apikey:a"), Arc::from("apikey:b"));
        token.note_served(&a);
        assert_eq!(token.served_to("apikey:a"), Served::OnlyTo);
        assert_eq!(token.served_to("apikey:b"), Served::NotTo);
        // A begins revoking; B, served meanwhile, records the serve first.
        assert!(token.begin_revoking());
        assert!(!token.begin_revoking(), "one revocation at a time");
        token.note_served(&b);
        assert!(token.is_revoking(), "B sees the mark and takes another token");
        assert_eq!(
            token.served_to("apikey:a"),
            Served::AlsoToOthers,
            "A's second look sees B and refuses"
        );
        token.end_revoking();
        assert!(!token.is_revoking());
        // The mark does not disturb the touch bits, nor they the mark.
        assert!(token.begin_revoking());
        assert!(token.claim_touch(1_795_000_000_000));
        assert!(token.is_revoking());
    }

    #[tokio::test]
    async fn invalidating_a_token_leaves_the_newer_one_that_replaced_it() {
        let minter = Arc::new(CountingMinter::default());
        let cache = cache(minter.clone(), 10);
        let old = cache.get(&key(1), Need::default()).await.unwrap().token;
        tokio::time::sleep(Duration::from_millis(2)).await;
        let forced = Need {
            minted_since: Some(crate::clock::system_now()),
            ..Need::default()
        };
        let newer = cache.get(&key(1), forced).await.unwrap().token;
        assert_eq!(
            cache.invalidate_token(&key(1), &old).await,
            0,
            "the old one was already gone"
        );
        let held = cache.cached(&key(1), Need::default()).await.unwrap().token;
        assert_eq!(held.id, newer.id, "the newer one stays");
        assert_eq!(cache.invalidate_token(&key(1), &newer).await, 1);
        assert!(cache.cached(&key(1), Need::default()).await.is_none());
    }

    #[tokio::test]
    async fn a_token_being_revoked_is_not_served_from_the_cache() {
        let minter = Arc::new(CountingMinter::default());
        let cache = cache(minter.clone(), 10);
        let first = cache.get(&key(1), Need::default()).await.unwrap().token;
        assert!(first.begin_revoking());
        assert!(cache.cached(&key(1), Need::default()).await.is_none());
        let next = cache.get(&key(1), Need::default()).await.unwrap().token;
        assert_ne!(next.id, first.id, "minted anew");
        assert_eq!(minter.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_cancelled_caller_does_not_cancel_the_shared_mint() {
        let minter = Arc::new(CountingMinter {
            delay: Duration::from_millis(200),
            ..CountingMinter::default()
        });
        let cache = cache(minter.clone(), 10);
        let first = tokio::spawn({
            let cache = cache.clone();
            async move { cache.get(&key(1), Need::default()).await }
        });
        // Let the first caller start the flight, then abandon it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        first.abort();
        let second = cache.get(&key(1), Need::default()).await.unwrap();
        assert_eq!(second.token.access_token.expose_secret(), "token-0");
        assert_eq!(
            minter.calls.load(Ordering::SeqCst),
            1,
            "the abandoned flight still served the second caller"
        );
    }

    #[tokio::test]
    async fn a_forced_request_does_not_join_an_older_flight() {
        let minter = Arc::new(CountingMinter {
            delay: Duration::from_millis(100),
            ..CountingMinter::default()
        });
        let cache = cache(minter.clone(), 10);
        let plain = tokio::spawn({
            let cache = cache.clone();
            async move { cache.get(&key(1), Need::default()).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let forced = cache
            .get(
                &key(1),
                Need {
                    minted_since: Some(crate::clock::system_now()),
                    ..Need::default()
                },
            )
            .await
            .unwrap();
        let plain = plain.await.unwrap().unwrap();
        assert_ne!(
            forced.token.access_token.expose_secret(),
            plain.token.access_token.expose_secret()
        );
        assert_eq!(minter.calls.load(Ordering::SeqCst), 2);
    }

    /// Mints full tokens; a downscoped one is "exchanged" from the parent
    /// the cache hands it.
    #[derive(Default)]
    struct FamilyMinter {
        calls: AtomicUsize,
        /// Children live half an hour (else an hour, capped at the parent's).
        short_children: std::sync::atomic::AtomicBool,
    }

    impl Minter for FamilyMinter {
        fn mint(&self, _: &TokenKey) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            async move { Ok(issued_now(n)) }.boxed()
        }

        fn exchange(
            &self,
            _: &TokenKey,
            _: Arc<CachedToken>,
        ) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let short = self.short_children.load(Ordering::SeqCst);
            async move {
                let mut issued = issued_now(n);
                if short {
                    issued.expires_at = issued.issued_at + Duration::from_secs(1800);
                }
                Ok(issued)
            }
            .boxed()
        }
    }

    #[test]
    fn a_parent_is_touched_at_most_once_a_second_and_never_once_superseded() {
        let token = CachedToken::new(
            Minted {
                issued: issued_now(0),
                parent: None,
            },
            &CachePolicy::default(),
        );
        let t = 1_795_000_000_000;
        assert!(token.claim_touch(t));
        assert!(!token.claim_touch(t + 999), "within the interval");
        assert!(token.claim_touch(t + 1000));
        assert!(!token.is_superseded());
        token.supersede();
        assert!(token.is_superseded());
        assert!(!token.claim_touch(t + 10_000), "a superseded token is not touched");
        assert!(token.is_superseded(), "and stays superseded");
    }

    #[tokio::test]
    async fn a_cached_child_is_served_only_while_its_parent_is_the_cached_one() {
        let minter = Arc::new(FamilyMinter::default());
        let cache = TokenCache::new(minter.clone(), Arc::new(SystemClock), CachePolicy::default());
        let parent_key = key(1);
        let child_key = TokenKey {
            downscope: Some(Arc::new(Downscope {
                scopes: vec!["item_preview".to_owned()],
                target: None,
            })),
            ..parent_key.clone()
        };
        let current_child = async |cache: &TokenCache| {
            let parent = cache.get(&parent_key, Need::default()).await.unwrap().token;
            let need = Need {
                parent_at_least: Some(parent.id),
                ..Need::default()
            };
            cache.get(&child_key, need).await.unwrap().token
        };
        let served = async |cache: &TokenCache| {
            cache
                .cached_child(&child_key, Duration::ZERO)
                .await
                .map(|hit| hit.token.access_token.expose_secret().to_owned())
        };
        let secret = |t: &CachedToken| t.access_token.expose_secret().to_owned();

        let child = current_child(&cache).await;
        assert_eq!(served(&cache).await, Some(secret(&child)));
        assert!(
            cache.cached_child(&parent_key, Duration::ZERO).await.is_none(),
            "not a child"
        );
        assert!(
            cache
                .cached_child(&child_key, Duration::from_secs(3500))
                .await
                .is_none(),
            "min_ttl still applies"
        );

        // The parent is replaced (a forced refresh): its child is not served.
        let forced = Need {
            minted_since: Some(crate::clock::system_now() + Duration::from_millis(1)),
            ..Need::default()
        };
        tokio::time::sleep(Duration::from_millis(2)).await;
        cache.get(&parent_key, forced).await.unwrap();
        assert_eq!(served(&cache).await, None);
        let second = current_child(&cache).await;
        assert_ne!(secret(&second), secret(&child), "exchanged anew");
        assert_eq!(served(&cache).await, Some(secret(&second)));

        // The parent is dropped: its child is not served either.
        cache.invalidate(&parent_key).await;
        assert_eq!(served(&cache).await, None);
        let third = current_child(&cache).await;
        assert_eq!(served(&cache).await, Some(secret(&third)));
        assert_eq!(minter.calls.load(Ordering::SeqCst), 6, "3 parents, 3 children");

        // A child's hit starts its parent's refresh when that is due, though
        // the parent itself is not looked up (and not the child's own: it
        // expires with its parent, so only the parent's successor helps).
        let parent = cache.get(&parent_key, Need::default()).await.unwrap().token;
        parent.refresh_at_ms.store(0, Ordering::Release);
        third.refresh_at_ms.store(0, Ordering::Release);
        assert_eq!(served(&cache).await, Some(secret(&third)));
        let mut refreshed = parent.clone();
        for _ in 0..400 {
            refreshed = cache.get(&parent_key, Need::default()).await.unwrap().token;
            if refreshed.id != parent.id {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(refreshed.id > parent.id, "the parent was refreshed");
        assert_eq!(minter.calls.load(Ordering::SeqCst), 7, "the parent only, not the child");
        assert_eq!(
            served(&cache).await,
            None,
            "the refreshed parent's old child is not served"
        );

        // A child that expires before its parent is refreshed from it when due.
        minter.short_children.store(true, Ordering::SeqCst);
        let short = current_child(&cache).await;
        assert!(short.expires_at < refreshed.expires_at);
        let before = minter.calls.load(Ordering::SeqCst);
        short.refresh_at_ms.store(0, Ordering::Release);
        assert_eq!(served(&cache).await, Some(secret(&short)));
        let mut now_served = None;
        for _ in 0..400 {
            now_served = served(&cache).await;
            if now_served != Some(secret(&short)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            now_served.is_some_and(|t| t != secret(&short)),
            "the child was refreshed"
        );
        assert_eq!(minter.calls.load(Ordering::SeqCst), before + 1, "the child only");
    }
}
