//! A cached token and its state: mint order, the weak link to its parent,
//! the superseded / being-revoked / touched bits, who it was served to,
//! when its refresh is due.

use std::{
    fmt,
    sync::{
        Arc, Weak,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use rand::Rng as _;
use secrecy::SecretString;

use super::{CachePolicy, REFRESH_RETRY_INTERVAL};
use crate::{
    boxapi::{IssuedToken, Restriction},
    clock::unix_seconds,
};

/// A freshly minted token, and for a downscoped one the parent it came from.
#[derive(Debug)]
pub struct Minted {
    /// What Box issued.
    pub issued: IssuedToken,
    /// The full token it was exchanged from.
    pub parent: Option<Arc<CachedToken>>,
}

/// Numbers cached tokens in mint order, so "this parent or a newer one" is a comparison.
static NEXT_TOKEN_ID: AtomicU64 = AtomicU64::new(1);

/// A cached token.
pub struct CachedToken {
    /// Unique, increasing in mint order.
    pub id: u64,
    /// For a downscoped token, the full token it was exchanged from, so a hit
    /// can tell whether that parent is still the cached one without looking
    /// it up. Weak: a replaced parent's secret is dropped (and zeroized) with
    /// its last strong reference, not kept alive by its children.
    pub(super) parent: Weak<CachedToken>,
    /// For a downscoped token, what Box says it is restricted to.
    pub restricted_to: Box<[Restriction]>,
    /// The bearer token.
    pub access_token: SecretString,
    /// Box's `token_type` when it is not `bearer` (kept small: a million
    /// cached tokens each holding "bearer" would be a million allocations).
    token_type: Option<Box<str>>,
    /// When Box stops accepting it.
    pub expires_at: SystemTime,
    /// When the request that minted it was sent.
    pub minted_at: SystemTime,
    /// Box's request id for the mint, when it sent one.
    pub request_id: Option<Box<str>>,
    /// SHA-256 of the access token, for audit records (computed once, at mint).
    pub sha256: [u8; 32],
    /// From this time (Unix ms) a hit starts a background refresh.
    pub(super) refresh_at_ms: AtomicI64,
    /// Until when (Unix ms, by the broker's clock) its user's check holds:
    /// a user token is served from the cache without asking the check
    /// cache until then (0: never checked; full tokens of users only).
    checked_until_ms: AtomicI64,
    /// The top bit ([`SUPERSEDED`]) is set once this token left the cache
    /// (replaced, invalidated, evicted or expired): its downscoped children
    /// are no longer served. The next ([`REVOKING`]) is set while a
    /// revocation of it is under way: it is not served. The other bits: when
    /// (Unix ms) a child's hit last touched this token in moka (see
    /// [`TokenCache::cached_child`]).
    state: AtomicU64,
    /// The first caller it was served to.
    owner: std::sync::OnceLock<Arc<str>>,
    /// Set once it (or a downscoped token made from it) was served to
    /// another caller than `owner`.
    shared: std::sync::atomic::AtomicBool,
}

/// Who a token was served to, as revocation asks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// To this caller and nobody else.
    OnlyTo,
    /// To this caller first, and to others too.
    AlsoToOthers,
    /// Never to this caller first (perhaps never at all).
    NotTo,
}

/// See [`CachedToken::state`].
const SUPERSEDED: u64 = 1 << 63;
/// See [`CachedToken::state`].
const REVOKING: u64 = 1 << 62;
/// The time bits of [`CachedToken::state`].
const TOUCHED_MS: u64 = !(SUPERSEDED | REVOKING);

/// How often a child's hits touch its parent in moka, so the parent stays
/// recent in the eviction policy though hits no longer look it up.
const PARENT_TOUCH_INTERVAL_MS: u64 = 1000;

impl CachedToken {
    pub(crate) fn new(minted: Minted, policy: &CachePolicy) -> Self {
        let Minted { mut issued, parent } = minted;
        // A downscoped token never outlives its parent.
        if let Some(parent) = &parent {
            issued.expires_at = issued.expires_at.min(parent.expires_at);
        }
        let usable = issued
            .expires_at
            .checked_sub(policy.safety_margin)
            .and_then(|t| t.duration_since(issued.issued_at).ok())
            .unwrap_or_default();
        let jitter = rand::thread_rng().gen_range(Duration::ZERO..=policy.refresh_jitter);
        // Never refresh in the first half of the usable life, even for short tokens.
        let ahead = (policy.refresh_ahead + jitter).min(usable / 2);
        let refresh_at = issued
            .expires_at
            .checked_sub(policy.safety_margin + ahead)
            .unwrap_or(issued.issued_at);
        Self {
            id: NEXT_TOKEN_ID.fetch_add(1, Ordering::Relaxed),
            parent: parent.as_ref().map_or_else(Weak::new, Arc::downgrade),
            restricted_to: issued.restricted_to.into_boxed_slice(),
            sha256: {
                use secrecy::ExposeSecret as _;
                crate::fingerprint::digest(issued.access_token.expose_secret())
            },
            access_token: issued.access_token,
            token_type: (issued.token_type != "bearer").then(|| issued.token_type.into_boxed_str()),
            expires_at: issued.expires_at,
            minted_at: issued.issued_at,
            request_id: issued.request_id.map(String::into_boxed_str),
            refresh_at_ms: AtomicI64::new(unix_millis(refresh_at)),
            checked_until_ms: AtomicI64::new(0),
            state: AtomicU64::new(0),
            owner: std::sync::OnceLock::new(),
            shared: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A full token as Box issued it (for a second cache level, and tests).
    pub fn from_issued(issued: IssuedToken, policy: &CachePolicy) -> Self {
        Self::new(Minted { issued, parent: None }, policy)
    }

    /// Its user was checked, and the check holds until `until`.
    pub fn mark_checked(&self, until: SystemTime) {
        self.checked_until_ms.fetch_max(unix_millis(until), Ordering::Relaxed);
    }

    /// Takes the stamp back: its user is checked again before it is served.
    pub fn unmark_checked(&self) {
        self.checked_until_ms.store(0, Ordering::Relaxed);
    }

    /// Whether its user's check still holds at `now` (one atomic load).
    pub fn checked_at(&self, now: SystemTime) -> bool {
        self.checked_until_ms.load(Ordering::Relaxed) > unix_millis(now)
    }

    /// Records that `caller` was served this token (a comparison, and a
    /// store only the first time another caller shows up).
    ///
    /// What changed, if anything: `OnlyTo` when `caller` became its first
    /// caller, `AlsoToOthers` when it was first served to a second one.
    pub fn note_served(&self, caller: &Arc<str>) -> Option<Served> {
        let mut first = false;
        let owner = self.owner.get_or_init(|| {
            first = true;
            caller.clone()
        });
        if first {
            return Some(Served::OnlyTo);
        }
        if !Arc::ptr_eq(owner, caller)
            && **owner != **caller
            && !self.shared.load(Ordering::SeqCst)
            && !self.shared.swap(true, Ordering::SeqCst)
        {
            return Some(Served::AlsoToOthers);
        }
        None
    }

    /// The first caller it was served to, if any.
    pub fn owner(&self) -> Option<&Arc<str>> {
        self.owner.get()
    }

    /// Takes over what `held` (another copy of the same token, which this
    /// one replaces in the cache) knows: who it was served to, and a
    /// revocation under way. An edge is handed the token it holds again.
    pub(super) fn inherit(&self, held: &Self) {
        if let Some(owner) = held.owner.get() {
            let _ = self.note_served(owner);
        }
        if held.shared.load(Ordering::SeqCst) {
            self.shared.store(true, Ordering::SeqCst);
        }
        if held.is_revoking() {
            self.state.fetch_or(REVOKING, Ordering::SeqCst);
        }
    }

    /// Whether `caller` alone was served this token.
    pub fn served_to(&self, caller: &str) -> Served {
        match self.owner.get() {
            Some(owner) if **owner == *caller => {
                if self.shared.load(Ordering::SeqCst) {
                    Served::AlsoToOthers
                } else {
                    Served::OnlyTo
                }
            }
            _ => Served::NotTo,
        }
    }

    /// For a downscoped token, the full token it was made from, while it is held.
    pub fn parent(&self) -> Option<Arc<Self>> {
        self.parent.upgrade()
    }

    /// For a downscoped token, the id of the parent it was exchanged from,
    /// while that parent is held anywhere (a dropped parent is not current).
    pub fn parent_id(&self) -> Option<u64> {
        self.parent.upgrade().map(|p| p.id)
    }

    /// Marks this token as no longer the cached one.
    pub(super) fn supersede(&self) {
        self.state.fetch_or(SUPERSEDED, Ordering::Release);
    }

    /// True once this token left the cache.
    pub(super) fn is_superseded(&self) -> bool {
        self.state.load(Ordering::Acquire) & SUPERSEDED != 0
    }

    /// Claims the right to touch this (parent) token in moka at `now_ms`:
    /// one caller per [`PARENT_TOUCH_INTERVAL_MS`], none once superseded.
    pub(super) fn claim_touch(&self, now_ms: u64) -> bool {
        let state = self.state.load(Ordering::Relaxed);
        state & SUPERSEDED == 0
            && now_ms.saturating_sub(state & TOUCHED_MS) >= PARENT_TOUCH_INTERVAL_MS
            && self
                .state
                .compare_exchange(
                    state,
                    (state & REVOKING) | (now_ms & TOUCHED_MS),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Marks a revocation of this token as under way: from now on it is not
    /// served. With [`Self::note_served`] it makes a two-sided handshake
    /// (both sequentially consistent): a caller served it concurrently either
    /// sees this mark and is given another token, or is seen by the
    /// revocation's second look at [`Self::served_to`], which then refuses.
    ///
    /// The mark is exclusive: false when another revocation already set it
    /// (only the one that set it may clear it).
    #[must_use]
    pub fn begin_revoking(&self) -> bool {
        self.state.fetch_or(REVOKING, Ordering::SeqCst) & REVOKING == 0
    }

    /// The revocation that set the mark did not happen (Box refused it):
    /// serve it again.
    pub fn end_revoking(&self) {
        self.state.fetch_and(!REVOKING, Ordering::SeqCst);
    }

    /// True while a revocation of this token is under way.
    pub fn is_revoking(&self) -> bool {
        self.state.load(Ordering::SeqCst) & REVOKING != 0
    }

    /// Box's `token_type` (`bearer`).
    pub fn token_type(&self) -> &str {
        self.token_type.as_deref().unwrap_or("bearer")
    }

    /// Time left at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expires_at.duration_since(now).unwrap_or_default()
    }

    /// Claims the right to start a background refresh at `now`, pushing the
    /// next refresh point back. Only one caller wins per interval.
    pub(super) fn claim_refresh(&self, now: SystemTime) -> bool {
        let now_ms = unix_millis(now);
        let due = self.refresh_at_ms.load(Ordering::Acquire);
        now_ms >= due
            && self
                .refresh_at_ms
                .compare_exchange(
                    due,
                    now_ms + millis(REFRESH_RETRY_INTERVAL),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }
}

impl fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedToken")
            .field("access_token", &"****")
            .field("expires_at", &unix_seconds(self.expires_at))
            .field("minted_at", &unix_seconds(self.minted_at))
            .finish_non_exhaustive()
    }
}

pub(super) fn unix_millis(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(millis).unwrap_or(0)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
