//! The `/oauth2/token` client: JWT and CCG grants, as the official SDKs send
//! them (box-contract.md §2.1, §4), token exchange and revocation
//! (`mod.rs`); retries, deadlines and the circuit breaker (`retry.rs`); what
//! happened upstream (`counters.rs`); reading Box's answers (`response.rs`).

mod counters;
mod response;
mod retry;
mod users;

pub use self::{
    counters::UpstreamCounters,
    retry::{CircuitState, UpstreamPolicy},
};
use self::{
    response::{failure, read_token_response},
    retry::Breaker,
};

use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime},
};

use reqwest::header;
use secrecy::{ExposeSecret as _, SecretString};

use super::{
    AppCredentials, AuthMethod, BoxSubject, Restriction, Target,
    assertion::{self, Claims},
    error::BoxApiError,
};
use crate::clock::SharedClock;

/// The documented Box API host.
pub const DEFAULT_API_BASE_URL: &str = "https://api.box.com";

/// How long one token request may take before it is abandoned.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long connecting to Box may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest error description kept from Box.
pub(super) const MAX_DESCRIPTION: usize = 300;
/// The longest `expires_in` believed: twice the longest lifetime Box
/// documents or has been seen to give (about 4,200 s). A larger one is a
/// fault, and believing it would serve a dead token for years.
pub const MAX_EXPIRES_IN: Duration = Duration::from_secs(2 * 3600);
/// The longest `Retry-After` honoured: Box's documented example is 100 s;
/// the circuit to Box stays open at most this long on one answer.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// The largest clock difference with Box that is corrected; a `Date` header
/// further off than this is a fault, not a clock.
pub(super) const MAX_SKEW: Duration = Duration::from_secs(24 * 3600);

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

/// A client of one Box API base URL.
#[derive(Debug, Clone)]
pub struct BoxClient {
    http: reqwest::Client,
    token_url: String,
    revoke_url: String,
    /// `{base}/2.0/users`.
    users_url: String,
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
            users_url: format!("{base}/2.0/users"),
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
        read_token_response(response, issued_at, &self.clock).await
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
        read_token_response(response, issued_at, &self.clock).await
    }

    /// Revokes `token` at Box (`/oauth2/revoke`, box-contract.md §6).
    pub async fn revoke(&self, app: &AppCredentials, token: &SecretString) -> Result<(), BoxApiError> {
        let form = [
            ("client_id", app.client_id.as_str()),
            ("client_secret", app.client_secret.expose_secret()),
            ("token", token.expose_secret()),
        ];
        let response = self.post_form(&self.revoke_url, &form).await?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        Err(failure(response, &self.clock).await)
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

pub(super) fn transport_error(e: reqwest::Error) -> BoxApiError {
    BoxApiError::Transport {
        timeout: e.is_timeout(),
        detail: e.without_url().to_string(),
    }
}

/// The `subject_token_type` of a token exchange.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_checked() {
        let clock: SharedClock = Arc::new(crate::clock::SystemClock);
        assert!(BoxClient::new("https://api.box.com/", clock.clone()).is_ok());
        assert!(BoxClient::new("api.box.com", clock.clone()).is_err());
        assert!(BoxClient::new("https://", clock).is_err());
    }
}
