//! The `/oauth2/token` client: JWT and CCG grants, as the official SDKs send
//! them (box-contract.md §2.1, §4).

use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use reqwest::{StatusCode, header};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use tracing::Instrument as _;

use super::{
    AppCredentials, AuthMethod, BoxSubject, Restriction, Target,
    assertion::{self, Claims},
    error::{BoxApiError, OAuthError},
};
use crate::clock::{SharedClock, shift};

/// The documented Box API host.
pub const DEFAULT_API_BASE_URL: &str = "https://api.box.com";

/// How long one token request may take before it is abandoned.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long connecting to Box may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest error description kept from Box.
const MAX_DESCRIPTION: usize = 300;
/// The longest `expires_in` believed: twice the longest lifetime Box
/// documents or has been seen to give (about 4,200 s). A larger one is a
/// fault, and believing it would serve a dead token for years.
pub const MAX_EXPIRES_IN: Duration = Duration::from_secs(2 * 3600);
/// The longest `Retry-After` honoured: Box's documented example is 100 s;
/// the circuit to Box stays open at most this long on one answer.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// The largest clock difference with Box that is corrected; a `Date` header
/// further off than this is a fault, not a clock.
const MAX_SKEW: Duration = Duration::from_secs(24 * 3600);

/// A token Box issued.
pub struct IssuedToken {
    /// The bearer token.
    pub access_token: SecretString,
    /// When it expires: `expires_in` counted from *before* the request was
    /// sent, so the broker never believes a token lives longer than it does.
    pub expires_at: SystemTime,
    /// When the request was sent.
    pub issued_at: SystemTime,
    /// `bearer`.
    pub token_type: String,
    /// Box's request id, when it sent one.
    pub request_id: Option<String>,
    /// What a downscoped token is restricted to (empty for full tokens).
    pub restricted_to: Vec<Restriction>,
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("access_token", &"****")
            .field("expires_at", &self.expires_at)
            .field("token_type", &self.token_type)
            .field("restricted_to", &self.restricted_to)
            .finish_non_exhaustive()
    }
}

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
    fn record(&self, result: &Result<IssuedToken, BoxApiError>, took: Duration) -> String {
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

/// The circuit to Box: closed (asking), open (refusing at once until a
/// time), half-open (one probe in flight after the open time passed).
#[derive(Debug, Default)]
struct Breaker {
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

/// A client of one Box API base URL.
#[derive(Debug, Clone)]
pub struct BoxClient {
    http: reqwest::Client,
    token_url: String,
    revoke_url: String,
    clock: SharedClock,
    policy: UpstreamPolicy,
    breaker: Arc<Mutex<Breaker>>,
    /// Box's clock minus ours, in milliseconds, learned from a skew refusal.
    skew_millis: Arc<AtomicI64>,
    counters: Arc<UpstreamCounters>,
}

/// The base URL is not usable.
#[derive(Debug, thiserror::Error)]
#[error("api_base_url {url:?} {problem}")]
pub struct BaseUrlError {
    url: String,
    problem: &'static str,
}

impl BoxClient {
    /// A client that sends token requests to `{base_url}/oauth2/token`.
    pub fn new(base_url: &str, clock: SharedClock) -> Result<Self, BaseUrlError> {
        let base = base_url.trim_end_matches('/');
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(BaseUrlError {
                url: base_url.to_owned(),
                problem: "must start with https:// (or http:// for a local proxy)",
            });
        }
        if base.len() <= "https://".len() || base.contains(['?', '#', ' ']) {
            return Err(BaseUrlError {
                url: base_url.to_owned(),
                problem: "is not a base URL like https://api.box.com",
            });
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("box-token-broker/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            // Token responses must not be followed anywhere else.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|_| BaseUrlError {
                url: base_url.to_owned(),
                problem: "could not build an HTTP client",
            })?;
        Ok(Self {
            http,
            token_url: format!("{base}/oauth2/token"),
            revoke_url: format!("{base}/oauth2/revoke"),
            clock,
            policy: UpstreamPolicy::default(),
            breaker: Arc::new(Mutex::new(Breaker::default())),
            skew_millis: Arc::new(AtomicI64::new(0)),
            counters: Arc::new(UpstreamCounters::default()),
        })
    }

    /// The same client with `policy`.
    #[must_use]
    pub fn with_policy(mut self, policy: UpstreamPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// What happened upstream so far.
    pub fn counters(&self) -> &UpstreamCounters {
        &self.counters
    }

    /// The time now, by the clock this client was given.
    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Box's clock minus ours, as learned from Box's `Date` header (zero until a skew refusal).
    pub fn clock_skew_millis(&self) -> i64 {
        self.skew_millis.load(Ordering::Relaxed)
    }

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
    async fn with_retries<F, Fut>(&self, grant: &'static str, mut attempt: F) -> Result<IssuedToken, BoxApiError>
    where
        F: FnMut(SystemTime) -> Fut,
        Fut: Future<Output = Result<IssuedToken, BoxApiError>>,
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
            let span = tracing::info_span!(
                "box.token_request",
                otel.kind = "client",
                grant,
                attempt = n,
                outcome = tracing::field::Empty,
            );
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
            if !error.is_retryable() || n >= policy.max_attempts {
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

    /// Mints a token for `subject` with the app's JWT key or client
    /// credentials, retrying as [`UpstreamPolicy`] says (a fresh `jti` each time).
    pub async fn request_token(&self, app: &AppCredentials, subject: &BoxSubject) -> Result<IssuedToken, BoxApiError> {
        let grant = match app.auth {
            AuthMethod::Jwt { .. } => "jwt-bearer",
            AuthMethod::Ccg => "client_credentials",
        };
        self.with_retries(grant, |assertion_time| {
            self.request_token_once(app, subject, assertion_time)
        })
        .await
    }

    async fn request_token_once(
        &self,
        app: &AppCredentials,
        subject: &BoxSubject,
        assertion_time: SystemTime,
    ) -> Result<IssuedToken, BoxApiError> {
        let issued_at = self.clock.now();
        let secret = app.client_secret.expose_secret();
        let response = match &app.auth {
            AuthMethod::Jwt { key, algorithm } => {
                let claims = Claims::new(&app.client_id, subject, assertion_time);
                let signed = assertion::sign(&claims, key, *algorithm)?;
                let form = [
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    ("assertion", signed.0.expose_secret()),
                    ("client_id", app.client_id.as_str()),
                    ("client_secret", secret),
                ];
                self.post_form(&self.token_url, &form).await?
            }
            AuthMethod::Ccg => {
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", app.client_id.as_str()),
                    ("client_secret", secret),
                    ("box_subject_type", subject.sub_type()),
                    ("box_subject_id", subject.id().as_str()),
                ];
                self.post_form(&self.token_url, &form).await?
            }
        };
        read_token_response(response, issued_at).await
    }

    /// Exchanges `subject_token` for one restricted to `scopes` (space-joined,
    /// in the order given) and, optionally, `target` (box-contract.md §5.1).
    /// Every parameter goes in the POST body. Retried like a mint.
    pub async fn exchange(
        &self,
        subject_token: &SecretString,
        scopes: &[String],
        target: Option<&Target>,
    ) -> Result<IssuedToken, BoxApiError> {
        self.with_retries("token-exchange", |_| self.exchange_once(subject_token, scopes, target))
            .await
    }

    async fn exchange_once(
        &self,
        subject_token: &SecretString,
        scopes: &[String],
        target: Option<&Target>,
    ) -> Result<IssuedToken, BoxApiError> {
        let issued_at = self.clock.now();
        let scope = scopes.join(" ");
        let target = target.map(Target::form_field);
        let mut form = vec![
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("subject_token", subject_token.expose_secret()),
            ("subject_token_type", ACCESS_TOKEN_TYPE),
            ("scope", scope.as_str()),
        ];
        if let Some((name, value)) = &target {
            form.push((name, value.as_str()));
        }
        let response = self.post_form(&self.token_url, &form).await?;
        read_token_response(response, issued_at).await
    }

    /// Revokes `token` at Box (`/oauth2/revoke`, box-contract.md §6).
    pub async fn revoke(&self, app: &AppCredentials, token: &SecretString) -> Result<(), BoxApiError> {
        let form = [
            ("client_id", app.client_id.as_str()),
            ("client_secret", app.client_secret.expose_secret()),
            ("token", token.expose_secret()),
        ];
        let sent_at = self.clock.now();
        let response = self.post_form(&self.revoke_url, &form).await?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        Err(failure(response, sent_at).await)
    }

    async fn post_form(&self, url: &str, form: &[(&str, &str)]) -> Result<reqwest::Response, BoxApiError> {
        let body = serde_urlencoded::to_string(form).map_err(|_| BoxApiError::Malformed("form encoding failed"))?;
        self.http
            .post(url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(transport_error)
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

fn transport_error(e: reqwest::Error) -> BoxApiError {
    BoxApiError::Transport {
        timeout: e.is_timeout(),
        detail: e.without_url().to_string(),
    }
}

/// The `subject_token_type` of a token exchange.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

#[derive(Deserialize)]
struct TokenBody {
    access_token: Option<String>,
    expires_in: Option<serde_json::Number>,
    token_type: Option<String>,
    #[serde(default)]
    restricted_to: Vec<RestrictionBody>,
}

#[derive(Deserialize)]
struct RestrictionBody {
    scope: String,
    object: RestrictedObject,
}

#[derive(Deserialize)]
struct RestrictedObject {
    #[serde(rename = "type")]
    kind: String,
    id: String,
}

async fn read_token_response(response: reqwest::Response, issued_at: SystemTime) -> Result<IssuedToken, BoxApiError> {
    let status = response.status();
    let request_id = header_str(&response, "box-request-id");
    if status == StatusCode::OK {
        let bytes = response.bytes().await.map_err(transport_error)?;
        let body: TokenBody =
            serde_json::from_slice(&bytes).map_err(|_| BoxApiError::Malformed("the token response is not JSON"))?;
        let access_token = body
            .access_token
            .filter(|t| !t.is_empty())
            .ok_or(BoxApiError::Malformed("no access_token"))?;
        let expires_in = body
            .expires_in
            .and_then(|n| {
                n.as_u64().or_else(|| {
                    // A float too large for a Duration is as absurd as a
                    // huge integer: both are capped below.
                    n.as_f64()
                        .filter(|f| f.is_finite() && *f >= 0.0)
                        .map(|f| Duration::try_from_secs_f64(f).map_or(u64::MAX, |d| d.as_secs()))
                })
            })
            .filter(|s| *s > 0)
            .ok_or(BoxApiError::Malformed("no usable expires_in"))?;
        let lifetime = Duration::from_secs(expires_in);
        if lifetime > MAX_EXPIRES_IN {
            tracing::warn!(
                expires_in,
                max = MAX_EXPIRES_IN.as_secs(),
                "Box's expires_in is beyond any lifetime Box gives; believing the maximum instead"
            );
        }
        let expires_at = issued_at
            .checked_add(lifetime.min(MAX_EXPIRES_IN))
            .ok_or(BoxApiError::Malformed("no usable expires_in"))?;
        return Ok(IssuedToken {
            access_token: SecretString::from(access_token),
            expires_at,
            issued_at,
            token_type: body.token_type.unwrap_or_else(|| "bearer".to_owned()),
            request_id,
            restricted_to: body
                .restricted_to
                .into_iter()
                .map(|r| Restriction {
                    scope: r.scope,
                    object_type: r.object.kind,
                    object_id: r.object.id,
                })
                .collect(),
        });
    }
    Err(failure(response, issued_at).await)
}

/// The error a non-success response stands for: throttling, a server
/// failure, or Box's error body in either shape. `now` is (the injected
/// clock's) time the request was sent, for a `Retry-After` date.
async fn failure(response: reqwest::Response, now: SystemTime) -> BoxApiError {
    let status = response.status();
    if status == StatusCode::TOO_MANY_REQUESTS {
        let retry_after = header_str(&response, "retry-after").and_then(|v| parse_retry_after(&v, now));
        return BoxApiError::RateLimited { retry_after };
    }
    if status.is_server_error() {
        return BoxApiError::ServerError {
            status: status.as_u16(),
        };
    }
    let request_id = header_str(&response, "box-request-id");
    let server_date = header_str(&response, "date").and_then(|d| httpdate::parse_http_date(&d).ok());
    let bytes = response.bytes().await.unwrap_or_default();
    BoxApiError::Rejected(parse_error_body(status.as_u16(), &bytes, request_id, server_date))
}

fn header_str(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `Retry-After` as seconds or an HTTP date, at most [`MAX_RETRY_AFTER`].
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else if let Ok(secs) = value.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return None;
        }
        Duration::try_from_secs_f64(secs).unwrap_or(MAX_RETRY_AFTER)
    } else {
        let date = httpdate::parse_http_date(value).ok()?;
        date.duration_since(now).unwrap_or_default()
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// Parses `{error, error_description}` or `{code, message, request_id}`.
pub(crate) fn parse_error_body(
    status: u16,
    body: &[u8],
    request_id: Option<String>,
    server_date: Option<SystemTime>,
) -> OAuthError {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let field = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| value.get(*n).and_then(serde_json::Value::as_str))
            .map(str::to_owned)
    };
    OAuthError {
        status,
        code: clean(&field(&["error", "code"]).unwrap_or_default(), 64),
        description: clean(
            &field(&["error_description", "message"]).unwrap_or_default(),
            MAX_DESCRIPTION,
        ),
        request_id: field(&["request_id"]).or(request_id).map(|r| clean(&r, 64)),
        server_date,
    }
}

/// Keeps at most `max` characters and no control characters (log injection).
fn clean(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oauth_error_shape_is_parsed() {
        let e = parse_error_body(
            400,
            br#"{"error":"invalid_grant","error_description":"Please check the 'sub' claim."}"#,
            None,
            None,
        );
        assert_eq!(e.code, "invalid_grant");
        assert_eq!(e.description, "Please check the 'sub' claim.");
    }

    #[test]
    fn box_generic_error_shape_is_parsed() {
        let body = br#"{"type":"error","status":400,"code":"invalid_grant","message":"Current date/time MUST be before the expiration","request_id":"abc123"}"#;
        let e = parse_error_body(400, body, None, None);
        assert_eq!(e.code, "invalid_grant");
        assert!(e.description.starts_with("Current date/time"));
        assert_eq!(e.request_id.as_deref(), Some("abc123"));
    }

    #[test]
    fn unparseable_error_bodies_give_empty_fields() {
        let e = parse_error_body(400, b"<html>oops</html>", None, None);
        assert_eq!((e.code.as_str(), e.description.as_str()), ("", ""));
    }

    #[test]
    fn control_characters_are_removed_from_descriptions() {
        let e = parse_error_body(
            400,
            b"{\"error\":\"x\",\"error_description\":\"a\\nb\\u001b[31m\"}",
            None,
            None,
        );
        assert_eq!(e.description, "ab[31m");
    }

    #[test]
    fn retry_after_reads_seconds() {
        assert_eq!(
            parse_retry_after("7", crate::clock::system_now()),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after("1.5", crate::clock::system_now()),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_retry_after("soon", crate::clock::system_now()), None);
    }

    #[test]
    fn retry_after_is_capped_whatever_box_sends() {
        for huge in [
            "18446744073709551615",
            "1e300",
            "99999999999",
            "Fri, 31 Dec 9999 23:59:59 GMT",
        ] {
            assert_eq!(
                parse_retry_after(huge, crate::clock::system_now()),
                Some(MAX_RETRY_AFTER),
                "{huge}"
            );
        }
        assert_eq!(parse_retry_after("-5", crate::clock::system_now()), None);
        assert_eq!(parse_retry_after("NaN", crate::clock::system_now()), None);
    }

    #[test]
    fn base_urls_are_checked() {
        let clock: SharedClock = Arc::new(crate::clock::SystemClock);
        assert!(BoxClient::new("https://api.box.com/", clock.clone()).is_ok());
        assert!(BoxClient::new("api.box.com", clock.clone()).is_err());
        assert!(BoxClient::new("https://", clock).is_err());
    }
}
