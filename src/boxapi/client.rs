//! The `/oauth2/token` client: JWT and CCG grants, as the official SDKs send
//! them (box-contract.md §2.1, §4).

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use reqwest::{StatusCode, header};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

use super::{
    AppCredentials, AuthMethod, BoxSubject, Restriction, Target,
    assertion::{self, Claims},
    error::{BoxApiError, OAuthError},
};
use crate::clock::SharedClock;

/// The documented Box API host.
pub const DEFAULT_API_BASE_URL: &str = "https://api.box.com";

/// How long one token request may take before it is abandoned.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long connecting to Box may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest error description kept from Box.
const MAX_DESCRIPTION: usize = 300;

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
    clock: SharedClock,
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
        })
    }

    /// Mints a token for `subject` with the app's JWT key or client credentials.
    pub async fn request_token(&self, app: &AppCredentials, subject: &BoxSubject) -> Result<IssuedToken, BoxApiError> {
        let issued_at = self.clock.now();
        let secret = app.client_secret.expose_secret();
        let response = match &app.auth {
            AuthMethod::Jwt { key, algorithm } => {
                let claims = Claims::new(&app.client_id, subject, issued_at);
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
    /// Every parameter goes in the POST body.
    pub async fn exchange(
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
        let response = self.post_form(&self.revoke_url, &form).await?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        Err(failure(response).await)
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
                n.as_u64()
                    .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            })
            .filter(|s| *s > 0)
            .ok_or(BoxApiError::Malformed("no usable expires_in"))?;
        return Ok(IssuedToken {
            access_token: SecretString::from(access_token),
            expires_at: issued_at + Duration::from_secs(expires_in),
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
    Err(failure(response).await)
}

/// The error a non-success response stands for: throttling, a server
/// failure, or Box's error body in either shape.
async fn failure(response: reqwest::Response) -> BoxApiError {
    let status = response.status();
    if status == StatusCode::TOO_MANY_REQUESTS {
        let retry_after = header_str(&response, "retry-after").and_then(|v| parse_retry_after(&v));
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

/// `Retry-After` as seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    httpdate::parse_http_date(value)
        .ok()
        .map(|t| t.duration_since(SystemTime::now()).unwrap_or_default())
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
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn base_urls_are_checked() {
        let clock: SharedClock = std::sync::Arc::new(crate::clock::SystemClock);
        assert!(BoxClient::new("https://api.box.com/", clock.clone()).is_ok());
        assert!(BoxClient::new("api.box.com", clock.clone()).is_err());
        assert!(BoxClient::new("https://", clock).is_err());
    }
}
