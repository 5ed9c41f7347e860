//! The circuit breaker in front of Redis: after `threshold` failed calls
//! in a row, calls are skipped for `cooldown` (a dead Redis costs nothing
//! per request); then calls are tried again, and the first success closes
//! it. Each change is logged once.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

pub(super) struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: AtomicU32,
    open: AtomicBool,
    /// Until when calls are skipped, and the failure that opened it.
    until: Mutex<(Option<Instant>, Option<String>)>,
}

impl Breaker {
    pub(super) fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
            until: Mutex::new((None, None)),
        }
    }

    /// Whether a call may go to Redis now.
    pub(super) fn allows(&self) -> bool {
        if !self.open.load(Ordering::Relaxed) {
            return true;
        }
        let until = self.until.lock().map(|u| u.0).unwrap_or(None);
        until.is_none_or(|t| Instant::now() >= t)
    }

    /// Open (calls skipped or being tried again after the cooldown).
    pub(super) fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    pub(super) fn last_error(&self) -> Option<String> {
        if !self.is_open() {
            return None;
        }
        self.until.lock().ok().and_then(|u| u.1.clone())
    }

    /// Lets calls through at once (the Sentinels named a new master): the
    /// first one's outcome closes the circuit or opens it again.
    pub(super) fn try_now(&self) {
        if let Ok(mut until) = self.until.lock() {
            until.0 = Some(Instant::now());
        }
    }

    pub(super) fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.open.swap(false, Ordering::Relaxed) {
            tracing::info!("Redis answers again: sharing tokens with the other replicas");
        }
    }

    pub(super) fn failed(&self, what: String) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.threshold {
            tracing::debug!(failure = %what, "a call to Redis failed");
            return;
        }
        if let Ok(mut until) = self.until.lock() {
            *until = (Some(Instant::now() + self.cooldown), Some(what.clone()));
        }
        if !self.open.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                failure = %what,
                cooldown = ?self.cooldown,
                "Redis is unreachable or failing: serving from this replica's cache and minting for itself until it answers again"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_and_closes_on_the_first_success() {
        let b = Breaker::new(2, Duration::from_secs(3600));
        b.failed("x".to_owned());
        assert!(b.allows() && !b.is_open());
        b.failed("y".to_owned());
        assert!(b.is_open() && !b.allows(), "skipped during the cooldown");
        assert_eq!(b.last_error().as_deref(), Some("y"));
        b.succeeded();
        assert!(b.allows() && !b.is_open() && b.last_error().is_none());
        let quick = Breaker::new(1, Duration::ZERO);
        quick.failed("z".to_owned());
        assert!(quick.is_open() && quick.allows(), "tried again once the cooldown ends");
    }

    #[test]
    fn a_new_master_is_tried_before_the_cooldown_ends() {
        let b = Breaker::new(1, Duration::from_secs(3600));
        b.failed("the old master".to_owned());
        assert!(!b.allows());
        b.try_now();
        assert!(b.allows() && b.is_open(), "tried, still open until a call succeeds");
        b.failed("the new one too".to_owned());
        assert!(!b.allows(), "a failure opens it for a cooldown again");
    }
}
