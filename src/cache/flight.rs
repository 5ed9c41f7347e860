//! Flights: one spawned task per key that needs a token, joined by every
//! concurrent request for that key, which re-checks the cache, mints (or
//! resolves the parent and exchanges it) and stores. With a second cache
//! level shared with other brokers ([`SharedStore`]), a flight for a full
//! token looks there between the re-check and the call to the minter, and
//! mints only under the fleet's lease (see `shared.rs`).

use std::{
    fmt,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use futures_util::future::{BoxFuture, FutureExt as _, Shared};

use super::{
    CacheError, CachedToken, Inner, Lease, LeaseOutcome, Minted, Need, PARENT_BEING_REVOKED, SharedStore, TokenCache,
    TokenKey, short,
};
use crate::boxapi::DiagnosisKind;

/// A place among the calls to Box in progress, held by a flight until it
/// lands (see [`TokenCache::get_admitted`]).
pub struct FlightPermit(pub Box<dyn Send + Sync>);

impl fmt::Debug for FlightPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FlightPermit")
    }
}

/// Asked once for each flight a request would start (never for one it joins).
pub type Admission<'a> = &'a (dyn Fn() -> Result<FlightPermit, CacheError> + Sync);

type FlightResult = Result<Arc<CachedToken>, CacheError>;

pub(super) struct Flight {
    pub(super) id: u64,
    pub(super) started_at: SystemTime,
    /// Started by a `force_refresh` (for a fetching minter, a forced request joins only such a flight).
    pub(super) forced: bool,
    pub(super) result: Shared<BoxFuture<'static, FlightResult>>,
}

impl TokenCache {
    /// Caches a full token minted outside a flight (to check its user with
    /// it) under `key`, unless a flight is under way for the key: that
    /// flight's token will be the cached one.
    pub async fn offer(&self, key: &TokenKey, issued: crate::boxapi::IssuedToken) {
        let flying = self.inner.flights.lock().map(|f| f.contains_key(key)).unwrap_or(true);
        if !flying && key.downscope.is_none() {
            let token = Arc::new(CachedToken::new(Minted { issued, parent: None }, &self.inner.policy));
            self.inner.store(key, &token).await;
        }
    }

    pub(super) fn start_refresh(&self, key: &TokenKey, stale: &CachedToken) {
        let need = Need {
            minted_since: Some(stale.minted_at + Duration::from_millis(1)),
            ..Need::default()
        };
        let already_running = self.inner.flights.lock().map(|f| f.contains_key(key)).unwrap_or(true);
        if !already_running {
            tracing::debug!(app = %key.app, subject = %key.subject, "refreshing a token ahead of expiry");
            // The spawned flight runs to completion whether or not anyone awaits it.
            drop(self.join_or_start(key, need, None));
        }
    }

    /// Joins the running flight for `key` if it can meet `need`, or starts
    /// one if `admit` (when given) lets it: when it started, its result, and
    /// whether this call started it.
    pub(super) fn join_or_start(
        &self,
        key: &TokenKey,
        need: Need,
        admit: Option<Admission<'_>>,
    ) -> Result<(SystemTime, Shared<BoxFuture<'static, FlightResult>>, bool), CacheError> {
        // Poisoning only follows a panic while holding the lock, which the
        // code below cannot do; recover the map rather than fail every request.
        let mut flights = self
            .inner
            .flights
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // For a fetching minter, a forced request joins a forced call under
        // way whenever it started (it brings back what the upstream decides
        // a forced request gets), and never an unforced one.
        let fetches = self.inner.minter.fetches();
        if let Some(flight) = flights.get(key)
            && (need.minted_since.is_none_or(|t| flight.started_at >= t) || (need.forced && flight.forced && fetches))
            && (!need.forced || flight.forced || !fetches)
        {
            return Ok((flight.started_at, flight.result.clone(), false));
        }
        let permit = admit.map(|admit| admit()).transpose()?;
        let id = self.inner.next_flight.fetch_add(1, Ordering::Relaxed);
        let started_at = self.inner.clock.now();
        let inner = Arc::clone(&self.inner);
        let task_key = key.clone();
        // Spawned while the lock is held, so the task cannot finish and
        // deregister before the flight is registered below.
        // The flight's spans are children of the request that started it.
        let handle = tokio::spawn(tracing::Instrument::in_current_span(async move {
            let _permit = permit;
            inner.fly(task_key, id, need).await
        }));
        let result = async move {
            handle.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "token mint task failed");
                Err(CacheError::TaskFailed)
            })
        }
        .boxed()
        .shared();
        flights.insert(
            key.clone(),
            Flight {
                id,
                started_at,
                forced: need.forced,
                result: result.clone(),
            },
        );
        Ok((started_at, result, true))
    }
}

impl Inner {
    /// One flight: re-check the cache (a flight that just finished may have
    /// filled it), otherwise mint and store.
    async fn fly(self: Arc<Self>, key: TokenKey, id: u64, need: Need) -> FlightResult {
        if let Some(token) = self.entries.get(&key).await
            && self.satisfies(&token, &need, self.clock.now())
        {
            self.land(&key, id);
            return Ok(token);
        }
        // A second level shared with other brokers: its token, or the
        // lease to mint for all of them (or neither: mint, share nothing).
        let mut lease = None;
        if let Some(shared) = self
            .shared
            .get()
            .cloned()
            .filter(|s| !self.minter.fetches() && s.shares(&key))
        {
            match self.shared_or_lease(&*shared, &key, &need).await {
                Ok(token) => {
                    self.store(&key, &token).await;
                    self.land(&key, id);
                    return Ok(token);
                }
                Err(held) => lease = held.map(|lease| (shared, lease)),
            }
        }
        let minted = match &key.downscope {
            _ if self.minter.fetches() => self
                .minter
                .fetch(&key, &need)
                .await
                .map(|issued| Minted { issued, parent: None }),
            None => self
                .minter
                .mint(&key)
                .await
                .map(|issued| Minted { issued, parent: None }),
            Some(_) => match self.current_parent(&key).await {
                Ok(parent) => self.minter.exchange(&key, parent.clone()).await.map(|issued| Minted {
                    issued,
                    parent: Some(parent),
                }),
                Err(e) => {
                    self.land(&key, id);
                    return Err(e);
                }
            },
        };
        let result = match minted {
            Ok(minted) => {
                let token = Arc::new(CachedToken::new(minted, &self.policy));
                if self.minter.fetches()
                    && let Some(held) = self.entries.get(&key).await
                    && held.sha256 == token.sha256
                {
                    token.inherit(&held);
                }
                self.store(&key, &token).await;
                if let Some((shared, lease)) = lease {
                    // Written in a task of its own: the callers have their token now.
                    tokio::spawn(shared.put(&key, &token, lease));
                }
                Ok(token)
            }
            Err(e) => {
                if let Some((shared, lease)) = lease {
                    tokio::spawn(shared.release(&key, lease));
                }
                let e = Arc::new(e);
                if e.diagnosis.kind == DiagnosisKind::NotFound
                    && let Some(negative) = &self.negative
                {
                    let until = self.clock.now() + self.policy.negative_ttl;
                    negative.insert(key.clone(), (e.clone(), until)).await;
                }
                Err(CacheError::Upstream(e))
            }
        };
        self.land(&key, id);
        result
    }

    /// The shared token of `key` if it meets `need`; else the lease to
    /// mint it for the fleet (`Err(Some)`), or `Err(None)`: mint without
    /// sharing (the store is unavailable, or the holder of the lease took
    /// longer than the longest wait).
    async fn shared_or_lease(
        &self,
        shared: &dyn SharedStore,
        key: &TokenKey,
        need: &Need,
    ) -> Result<Arc<CachedToken>, Option<Lease>> {
        let (poll, longest) = shared.wait();
        let since = std::time::Instant::now();
        let mut waited = false;
        let usable = |issued| {
            let token = Arc::new(CachedToken::new(Minted { issued, parent: None }, &self.policy));
            (self.satisfies(&token, need, self.clock.now()) && !self.revoked.contains_key(&token.sha256))
                .then_some(token)
        };
        loop {
            if let Some(token) = shared.get(key, waited).await.and_then(usable) {
                return Ok(token);
            }
            match shared.lease(key, waited).await {
                // Written by the holder between the look and the lease.
                LeaseOutcome::Acquired { lease, found } => match found.and_then(usable) {
                    Some(token) => {
                        tokio::spawn(shared.release(key, lease));
                        return Ok(token);
                    }
                    None => return Err(Some(lease)),
                },
                LeaseOutcome::Unavailable => return Err(None),
                LeaseOutcome::HeldElsewhere if since.elapsed() >= longest => return Err(None),
                LeaseOutcome::HeldElsewhere => {
                    waited = true;
                    tokio::time::sleep(poll).await;
                }
            }
        }
    }

    /// The token a downscoped `key` is exchanged from: the cached full
    /// token (minted if need be; without a budget place of its own: the
    /// child's flight holds one), recorded as served to the child's caller,
    /// never one being revoked.
    async fn current_parent(self: &Arc<Self>, key: &TokenKey) -> Result<Arc<CachedToken>, CacheError> {
        let cache = TokenCache {
            inner: Arc::clone(self),
        };
        let parent_key = key.parent();
        let found = cache.not_being_revoked(
            key.caller.as_ref(),
            &parent_key,
            Need::default(),
            None,
            PARENT_BEING_REVOKED,
        );
        Ok(Box::pin(found).await?.token)
    }

    /// Caches `token` under `key`, if it lives past the safety margin.
    pub(super) async fn store(&self, key: &TokenKey, token: &Arc<CachedToken>) {
        if token.remaining(self.clock.now()) > self.policy.safety_margin && !self.revoked.contains_key(&token.sha256) {
            // Indexed first: the eviction listener removes it again
            // whenever the entry leaves, even at once.
            self.by_digest
                .shard(&token.sha256)
                .insert(short(&token.sha256), (key.clone(), token.id));
            self.entries.insert(key.clone(), Arc::clone(token)).await;
        }
    }

    /// Deregisters flight `id` (unless a newer flight replaced it).
    fn land(&self, key: &TokenKey, id: u64) {
        let mut flights = self.flights.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if flights.get(key).is_some_and(|f| f.id == id) {
            flights.remove(key);
        }
    }
}
