//! A latency histogram of atomic counters, for the RPC and upstream-call
//! metrics: recording takes no lock (prometheus-client's `Histogram` takes a
//! mutex per observation) and allocates nothing.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Upper bounds of the latency buckets, in seconds: 0.5 ms doubling to ~16 s.
const BUCKETS: usize = 16;

fn bucket_bound(i: usize) -> f64 {
    0.0005 * f64::from(1u32 << i)
}

/// Latency observations in buckets from 0.5 ms, doubling, to ~16 s.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; BUCKETS + 1],
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    /// Counts one observation.
    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = (0..BUCKETS).find(|&i| seconds <= bucket_bound(i)).unwrap_or(BUCKETS);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts with their upper bounds).
    #[allow(clippy::cast_precision_loss, reason = "a sum of nanoseconds as f64 seconds")]
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = (0..=BUCKETS)
            .map(|i| {
                let bound = if i == BUCKETS { f64::INFINITY } else { bucket_bound(i) };
                (bound, self.buckets[i].load(Ordering::Relaxed))
            })
            .collect();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        // The count is the buckets' total, so `_count` and `le="+Inf"` agree.
        let count = buckets.iter().map(|(_, n)| n).sum();
        (sum, count, buckets)
    }
}
