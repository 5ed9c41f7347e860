//! Wall-clock time, injectable so tests can move it instead of sleeping.
//!
//! Token expiry is wall-clock time: Box says "expires in N seconds" and the
//! JWT assertion's `exp` is Unix seconds. Everything that reasons about expiry
//! (the cache, the assertion, the fake Box) asks a [`Clock`]. Production uses
//! [`SystemClock`]; tests hand the broker and the fake Box one shared
//! [`ManualClock`] and advance it by an hour without waiting an hour.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime},
};

/// A source of the current wall-clock time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// A shareable clock.
pub type SharedClock = Arc<dyn Clock>;

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        system_now()
    }
}

/// The operating system's wall clock, for the few readings that must not
/// follow an injected clock: when an audit record was written, and when
/// moka may drop an entry from storage. Anything that decides whether a
/// token is fresh asks a [`Clock`] instead. The one place (with
/// [`SystemClock`]) that reads it: `clippy.toml` disallows
/// `SystemTime::now` everywhere else.
#[allow(
    clippy::disallowed_methods,
    reason = "the clock module is where the wall clock is read"
)]
pub fn system_now() -> SystemTime {
    SystemTime::now()
}

/// The system clock shifted by an adjustable offset.
///
/// It still advances in real time, so timeouts and ordering behave normally;
/// [`ManualClock::advance`] jumps it forward.
#[derive(Debug, Default)]
pub struct ManualClock {
    /// Offset from the system clock, in milliseconds (may be negative).
    offset_ms: AtomicI64,
}

impl ManualClock {
    /// A clock that starts at the system time.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        shift(system_now(), self.offset_ms.load(Ordering::SeqCst))
    }
}

/// `t` moved by `offset_ms` milliseconds, saturating at the epoch.
pub fn shift(t: SystemTime, offset_ms: i64) -> SystemTime {
    let magnitude = Duration::from_millis(offset_ms.unsigned_abs());
    if offset_ms >= 0 {
        t.checked_add(magnitude).unwrap_or(t)
    } else {
        t.checked_sub(magnitude)
            .filter(|r| *r >= SystemTime::UNIX_EPOCH)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// Seconds since the Unix epoch (0 for times before it).
pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_advances_by_the_given_amount() {
        let clock = ManualClock::new();
        let before = clock.now();
        clock.advance(Duration::from_secs(3600));
        let moved = clock.now().duration_since(before).unwrap_or_default();
        assert!(moved >= Duration::from_secs(3600));
        assert!(moved < Duration::from_secs(3660));
    }

    #[test]
    fn shift_saturates_at_the_epoch() {
        assert_eq!(shift(SystemTime::UNIX_EPOCH, -5_000), SystemTime::UNIX_EPOCH);
    }
}
