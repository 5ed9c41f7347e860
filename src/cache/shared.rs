//! A second cache level shared by several brokers (Redis, in `crate::l2`):
//! what the cache asks of it, and where a flight asks. moka stays the
//! first level: a hit in it never reaches the shared store.
//!
//! On a miss, a flight for a full token looks in the shared store; if the
//! token is not there it takes a lease (one replica mints per key), and
//! the others look again until the token appears or the lease runs out.
//! A store that cannot be reached answers "unavailable" and the replica
//! mints for itself: the shared store is an optimisation, never a
//! dependency.

use std::{sync::Arc, time::Duration};

use futures_util::future::BoxFuture;

use super::{CachedToken, Served, TokenKey};
use crate::boxapi::IssuedToken;

/// The right to mint a key's token for the fleet, held until the token is
/// written (or the lease runs out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The holder's random value (released only by the one holding it).
    pub value: String,
    /// The key's invalidation count when the lease was taken: a write is
    /// refused once the key was invalidated since (fencing).
    pub fence: String,
}

/// What asking for a lease got.
#[derive(Debug)]
pub enum LeaseOutcome {
    /// This replica mints — unless `found` (the token the previous holder
    /// wrote just before the lease became free, read in the same step)
    /// will do: then it releases the lease and uses that.
    Acquired {
        /// The lease.
        lease: Lease,
        /// The shared token held when the lease was taken, if any.
        found: Option<IssuedToken>,
    },
    /// Another replica is minting: look again shortly.
    HeldElsewhere,
    /// The shared store cannot be asked: mint locally, share nothing.
    Unavailable,
}

/// A second cache level shared by several brokers.
pub trait SharedStore: Send + Sync + 'static {
    /// Whether tokens of `key` are shared at all (full tokens; the
    /// Service Account's only if configured so).
    fn shares(&self, key: &TokenKey) -> bool;

    /// The shared token of `key`, if one is held and decrypts; `again`
    /// when the flight looked before (while waiting for another replica).
    fn get(&self, key: &TokenKey, again: bool) -> BoxFuture<'static, Option<IssuedToken>>;

    /// Asks to mint `key` for the fleet; `waited` says this flight already
    /// saw the lease held by another (so an acquisition is a takeover).
    fn lease(&self, key: &TokenKey, waited: bool) -> BoxFuture<'static, LeaseOutcome>;

    /// Writes `token` under `lease` (refused if the lease was lost or the
    /// key invalidated since), then releases the lease.
    fn put(&self, key: &TokenKey, token: &CachedToken, lease: Lease) -> BoxFuture<'static, ()>;

    /// Releases `lease` without writing (the mint failed).
    fn release(&self, key: &TokenKey, lease: Lease) -> BoxFuture<'static, ()>;

    /// How often a flight looks again while another replica holds the
    /// lease, and how long it waits at most before minting itself.
    fn wait(&self) -> (Duration, Duration);

    /// The shared token whose SHA-256 is `digest` was served to `caller`,
    /// and `news` is what changed in this replica's record (its first
    /// caller, or a second one): for the fleet's record of who holds it
    /// (which revocation asks).
    fn served(&self, digest: &[u8; 32], caller: &Arc<str>, news: Served);
}
