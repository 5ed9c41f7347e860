//! Reading Box's answers: a token (bounded `expires_in`, `restricted_to`),
//! an error body in either of Box's shapes, `Retry-After`.

use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use secrecy::SecretString;
use serde::Deserialize;

use super::{IssuedToken, MAX_DESCRIPTION, MAX_EXPIRES_IN, MAX_RETRY_AFTER, transport_error};
use crate::{
    boxapi::{
        Restriction,
        error::{BoxApiError, OAuthError},
    },
    clock::SharedClock,
};

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

pub(super) async fn read_token_response(
    response: reqwest::Response,
    issued_at: SystemTime,
    clock: &SharedClock,
) -> Result<IssuedToken, BoxApiError> {
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
    Err(failure(response, clock).await)
}

/// The error a non-success response stands for: throttling, a server
/// failure, or Box's error body in either shape. A `Retry-After` date
/// counts from `clock`'s time as the answer is read.
pub(super) async fn failure(response: reqwest::Response, clock: &SharedClock) -> BoxApiError {
    let status = response.status();
    let now = clock.now();
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
}
