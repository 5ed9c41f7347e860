//! The cap on calls to Box in progress that requests started, over all
//! callers and per caller.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::cache::CacheError;

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
pub(super) struct Place {
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
    pub(super) fn enter(self: &Arc<Self>, caller: &Arc<str>) -> Result<Place, CacheError> {
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
