//! Retries with full jitter or `Retry-After` inside one deadline, clock-skew
//! correction, and the per-app circuit breaker.

use std::{
    sync::atomic::Ordering,
    time::{Duration, SystemTime},
};

use tracing::Instrument as _;

use super::{BoxClient, MAX_SKEW};
use crate::{boxapi::error::BoxApiError, clock::shift};

/// How the client retries, gives up, and stops asking a failing Box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamPolicy {
    /// Attempts per token request, the first included (429, 5xx and
    /// connection failures are retried; other refusals never are).
    pub max_attempts: u32,
    /// The first backoff ceiling; it doubles per retry (full jitter: a random
    /// wait up to the ceiling). `Retry-After` replaces it when Box sends one.
    pub backoff_base: Duration,
    /// The largest backoff ceiling.
    pub backoff_cap: Duration,
    /// One attempt's time limit.
    pub attempt_timeout: Duration,
    /// The whole request's time limit, retries and waits included.
    pub deadline: Duration,
    /// Consecutive failed requests (after their retries) that open the circuit.
    pub breaker_threshold: u32,
    /// How long an open circuit refuses at once (or `Retry-After`, if longer).
    pub breaker_cooldown: Duration,
}

impl Default for UpstreamPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(10),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(30),
        }
    }
}

/// The circuit to Box: closed (asking), open (refusing at once until a
/// time), half-open (one probe in flight after the open time passed).
#[derive(Debug, Default)]
pub(super) struct Breaker {
    consecutive_failures: u32,
    open_until: Option<SystemTime>,
    probing: bool,
}

/// The circuit's state, for metrics and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Asking Box.
    Closed,
    /// Refusing at once.
    Open,
    /// One probe allowed.
    HalfOpen,
}

impl BoxClient {
    /// The circuit's state now.
    pub fn circuit_state(&self) -> CircuitState {
        let breaker = self.breaker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match breaker.open_until {
            None => CircuitState::Closed,
            Some(_) if breaker.probing => CircuitState::HalfOpen,
            Some(until) if until > self.clock.now() => CircuitState::Open,
            Some(_) => CircuitState::HalfOpen,
        }
    }

    /// Lets a request through, or says how long the circuit stays open.
    fn admit(&self) -> Result<(), BoxApiError> {
        let now = self.clock.now();
        let mut breaker = self.breaker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let refuse = |wait: Duration| {
            self.counters.short_circuited.fetch_add(1, Ordering::Relaxed);
            Err(BoxApiError::CircuitOpen {
                retry_after: wait.max(Duration::from_secs(1)),
            })
        };
        match breaker.open_until {
            None => Ok(()),
            Some(until) if until > now => refuse(until.duration_since(now).unwrap_or_default()),
            // Half-open: one probe at a time decides.
            Some(_) if breaker.probing => refuse(Duration::from_secs(1)),
            Some(_) => {
                breaker.probing = true;
                Ok(())
            }
        }
    }

    /// Records a request's final outcome in the circuit.
    fn settle(&self, outcome: Result<(), &BoxApiError>) {
        let now = self.clock.now();
        let mut breaker = self.breaker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let was_probe = std::mem::take(&mut breaker.probing);
        match outcome {
            Err(error) if error.is_retryable() => {
                breaker.consecutive_failures = breaker.consecutive_failures.saturating_add(1);
                let throttled = match error {
                    BoxApiError::RateLimited { retry_after } => *retry_after,
                    _ => None,
                };
                // A 429 with Retry-After holds every request to this app until
                // then; otherwise enough failures in a row (or a failed probe) open it.
                if throttled.is_some() || was_probe || breaker.consecutive_failures >= self.policy.breaker_threshold {
                    let wait = throttled.unwrap_or(self.policy.breaker_cooldown);
                    if breaker.open_until.is_none_or(|u| u <= now) {
                        self.counters.circuit_opened.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            url = %self.token_url,
                            seconds = wait.as_secs(),
                            "Box keeps failing: the circuit is open, token requests fail at once until it closes"
                        );
                    }
                    breaker.open_until = Some(now.checked_add(wait).unwrap_or(now));
                }
            }
            // Box answered (a success, or a refusal that proves it is up).
            _ => {
                if breaker.open_until.is_some() {
                    tracing::info!(url = %self.token_url, "Box answers again: the circuit is closed");
                }
                *breaker = Breaker::default();
            }
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or the deadline
    /// passes: retries 429, 5xx and connection failures with capped
    /// exponential backoff and full jitter (or `Retry-After`), and rebuilds
    /// the assertion once with Box's clock after a skew refusal. `attempt`
    /// gets the time to put in the assertion.
    pub(super) async fn with_retries<T, F, Fut>(&self, grant: &'static str, attempt: F) -> Result<T, BoxApiError>
    where
        F: FnMut(SystemTime) -> Fut,
        Fut: Future<Output = Result<T, BoxApiError>>,
    {
        self.with_attempts(grant, self.policy.max_attempts, attempt).await
    }

    /// [`Self::with_retries`] with at most `max_attempts` attempts (one: a
    /// request that must not be sent twice, still deadlined and circuit-broken).
    pub(super) async fn with_attempts<T, F, Fut>(
        &self,
        grant: &'static str,
        max_attempts: u32,
        mut attempt: F,
    ) -> Result<T, BoxApiError>
    where
        F: FnMut(SystemTime) -> Fut,
        Fut: Future<Output = Result<T, BoxApiError>>,
    {
        self.admit()?;
        let policy = self.policy;
        let started = std::time::Instant::now();
        let mut skew_corrected = false;
        let mut n = 0;
        let result = loop {
            n += 1;
            let remaining = policy.deadline.saturating_sub(started.elapsed());
            let limit = remaining.min(policy.attempt_timeout);
            self.counters.attempts.fetch_add(1, Ordering::Relaxed);
            let assertion_time = shift(self.clock.now(), self.skew_millis.load(Ordering::Relaxed));
            let sent = std::time::Instant::now();
            let span = if grant.starts_with("users") {
                tracing::info_span!(
                    "box.users_request",
                    otel.kind = "client",
                    call = grant,
                    attempt = n,
                    outcome = tracing::field::Empty,
                )
            } else {
                tracing::info_span!(
                    "box.token_request",
                    otel.kind = "client",
                    grant,
                    attempt = n,
                    outcome = tracing::field::Empty,
                )
            };
            let result = match tokio::time::timeout(limit, attempt(assertion_time))
                .instrument(span.clone())
                .await
            {
                Ok(result) => result,
                Err(_) => Err(BoxApiError::Transport {
                    timeout: true,
                    detail: format!("no answer within {} ms", limit.as_millis()),
                }),
            };
            span.record("outcome", self.counters.record(&result, sent.elapsed()).as_str());
            let error = match result {
                Ok(token) => break Ok(token),
                Err(error) => error,
            };
            if matches!(error, BoxApiError::RateLimited { .. }) {
                self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(box_date) = error.clock_skew_date()
                && !skew_corrected
            {
                // Box judged the assertion's exp/jti by its own clock: learn it, and try once more.
                skew_corrected = true;
                let ours = self.clock.now();
                let (ahead, magnitude) = match box_date.duration_since(ours) {
                    Ok(ahead) => (true, ahead),
                    Err(behind) => (false, behind.duration()),
                };
                if magnitude > MAX_SKEW {
                    tracing::warn!(
                        skew_secs = magnitude.as_secs(),
                        "Box's Date header is more than a day off this clock; not correcting for it"
                    );
                    break Err(error);
                }
                let millis = i64::try_from(magnitude.as_millis()).unwrap_or(i64::MAX);
                let skew = if ahead { millis } else { -millis };
                self.skew_millis.store(skew, Ordering::Relaxed);
                self.counters.skew_corrections.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    skew_ms = skew,
                    "Box refused the assertion's time: retrying with Box's clock"
                );
                continue;
            }
            if !error.is_retryable() || n >= max_attempts {
                break Err(error);
            }
            let wait = match &error {
                BoxApiError::RateLimited {
                    retry_after: Some(wait),
                } => *wait,
                _ => full_jitter(policy, n),
            };
            if started.elapsed() + wait >= policy.deadline {
                // Waiting would pass the deadline: give up now, with the hint.
                break Err(error);
            }
            tracing::debug!(attempt = n, wait_ms = wait.as_millis() as u64, error = %error, "retrying a Box token request");
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
        };
        self.settle(result.as_ref().map(|_| ()));
        result
    }
}

/// A random wait up to the `n`th backoff ceiling (full jitter).
fn full_jitter(policy: UpstreamPolicy, n: u32) -> Duration {
    use rand::Rng as _;
    let ceiling = policy
        .backoff_base
        .saturating_mul(1u32 << n.saturating_sub(1).min(20))
        .min(policy.backoff_cap);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::thread_rng().gen_range(0..=millis))
}
