//! What happened upstream, counted as it happens and read at scrape time.

use std::{
    sync::{Mutex, atomic::AtomicU64},
    time::Duration,
};

use crate::boxapi::error::BoxApiError;

/// Counts of what happened upstream, for metrics.
#[derive(Debug)]
pub struct UpstreamCounters {
    /// HTTP attempts sent to `/oauth2/token`.
    pub attempts: AtomicU64,
    /// Attempts that were retries.
    pub retries: AtomicU64,
    /// 429 answers.
    pub rate_limited: AtomicU64,
    /// Assertions rebuilt with Box's clock.
    pub skew_corrections: AtomicU64,
    /// Requests refused at once because the circuit was open.
    pub short_circuited: AtomicU64,
    /// Times the circuit opened.
    pub circuit_opened: AtomicU64,
    /// Attempts by outcome: the HTTP status, or `timeout`, `connection`, `malformed`.
    pub responses: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Seconds per attempt.
    pub latency: prometheus_client::metrics::histogram::Histogram,
}

impl Default for UpstreamCounters {
    fn default() -> Self {
        Self {
            attempts: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            skew_corrections: AtomicU64::new(0),
            short_circuited: AtomicU64::new(0),
            circuit_opened: AtomicU64::new(0),
            responses: Mutex::new(std::collections::BTreeMap::new()),
            latency: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 12),
            ),
        }
    }
}

impl UpstreamCounters {
    /// Counts one attempt; returns its outcome label.
    pub(super) fn record<T>(&self, result: &Result<T, BoxApiError>, took: Duration) -> String {
        self.latency.observe(took.as_secs_f64());
        let outcome = match result {
            Ok(_) => "200".to_owned(),
            Err(BoxApiError::Rejected(e)) => e.status.to_string(),
            Err(BoxApiError::RateLimited { .. }) => "429".to_owned(),
            Err(BoxApiError::ServerError { status }) => status.to_string(),
            Err(BoxApiError::Transport { timeout: true, .. }) => "timeout".to_owned(),
            Err(BoxApiError::Transport { .. }) => "connection".to_owned(),
            Err(BoxApiError::Malformed(_)) => "malformed".to_owned(),
            Err(BoxApiError::Signing(_)) => "signing".to_owned(),
            Err(BoxApiError::CircuitOpen { .. }) => "circuit_open".to_owned(),
        };
        let mut responses = self.responses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *responses.entry(outcome.clone()).or_default() += 1;
        outcome
    }
}
