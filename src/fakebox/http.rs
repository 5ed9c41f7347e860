//! The fake Box's HTTP surface (axum): `/oauth2/token`, `/oauth2/revoke`,
//! `/2.0/users/me`, and `/_fake/*` control endpoints for standalone use
//! (faults, latency, skew, and the developer console's public keys and
//! client secret).
//! Every response carries a `Date` header from the fake's (skewable) clock.

use std::time::Duration;

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::json;

use super::{
    FakeBox,
    state::{Fault, Form, OAuthReject, msg},
};

/// One endpoint, for `box-broker fake-box --help` and the README.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    /// The HTTP method.
    pub method: &'static str,
    /// The path (`{client_id}` and `{kid}` are placeholders).
    pub path: &'static str,
    /// What it does, and its body.
    pub what: &'static str,
}

/// Every endpoint the fake serves, for its help and the README (a test
/// requests each one from the router below).
pub const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        method: "POST",
        path: "/oauth2/token",
        what: "Box's token endpoint: JWT grant (enterprise or user), Client Credentials Grant, token exchange (downscoping); it refuses what Box refuses, with Box's error codes and messages",
    },
    Endpoint {
        method: "POST",
        path: "/oauth2/revoke",
        what: "Box's revocation endpoint (client_id, client_secret, token)",
    },
    Endpoint {
        method: "GET",
        path: "/2.0/users/me",
        what: "who a bearer token belongs to",
    },
    Endpoint {
        method: "GET",
        path: "/_fake/stats",
        what: "counts: token requests, mints per grant, exchanges, revocations, rejections (JSON)",
    },
    Endpoint {
        method: "POST",
        path: "/_fake/faults",
        what: "fail the next token requests: {\"kind\": \"rate_limited\"|\"server_error\"|\"reply\"|\"hang\"|\"reset\", \"count\": 3, \"retry_after_secs\": 1, \"status\": 503, \"body\": \"...\"}",
    },
    Endpoint {
        method: "POST",
        path: "/_fake/latency",
        what: "answer every token request this late: {\"millis\": 100}",
    },
    Endpoint {
        method: "POST",
        path: "/_fake/skew",
        what: "run the fake's clock ahead (or behind): {\"seconds\": 120}",
    },
    Endpoint {
        method: "POST",
        path: "/_fake/apps/{client_id}/keys",
        what: "the console's Add a Public Key: the PEM (curl --data-binary @public.pem) or {\"public_key_pem\": \"...\"}; answers {\"kid\": \"...\"}",
    },
    Endpoint {
        method: "DELETE",
        path: "/_fake/apps/{client_id}/keys/{kid}",
        what: "the console's Remove for a public key",
    },
    Endpoint {
        method: "PUT",
        path: "/_fake/apps/{client_id}/client_secret",
        what: "the console's client secret Reset: {\"client_secret\": \"...\"}; the old secret stops working at once",
    },
];

/// The endpoint reference as text (for `--help`).
pub fn endpoints_help() -> String {
    let mut text = String::from("Endpoints of the fake Box (http://LISTEN):\n");
    for e in ENDPOINTS {
        text.push_str(&format!("  {:<6} {}\n         {}\n", e.method, e.path, e.what));
    }
    text
}

/// The router over `fake`.
pub fn router(fake: FakeBox) -> Router {
    Router::new()
        .route("/oauth2/token", post(token))
        .route("/oauth2/revoke", post(revoke))
        .route("/2.0/users/me", get(users_me))
        .route("/_fake/stats", get(stats))
        .route("/_fake/faults", post(add_faults))
        .route("/_fake/latency", post(set_latency))
        .route("/_fake/skew", post(set_skew))
        .route("/_fake/apps/{client_id}/keys", post(add_key))
        .route("/_fake/apps/{client_id}/keys/{kid}", axum::routing::delete(remove_key))
        .route("/_fake/apps/{client_id}/client_secret", axum::routing::put(set_secret))
        .layer(middleware::from_fn_with_state(fake.clone(), date_header))
        .with_state(fake)
}

async fn date_header(State(fake): State<FakeBox>, request: axum::extract::Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&httpdate::fmt_http_date(fake.now())) {
        response.headers_mut().insert(header::DATE, value);
    }
    response
}

fn oauth_error(reject: &OAuthReject) -> Response {
    let status = StatusCode::from_u16(reject.status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        Json(json!({ "error": reject.error, "error_description": reject.description })),
    )
        .into_response()
}

/// Parses a form body; anything that is not one reads as "no grant_type", as at Box.
fn parse_form(headers: &HeaderMap, body: &Bytes) -> Result<Form, OAuthReject> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
    let bad = || OAuthReject {
        status: 400,
        error: "invalid_request",
        description: msg::BAD_GRANT_TYPE.to_owned(),
    };
    if !is_form {
        return Err(bad());
    }
    serde_urlencoded::from_bytes::<Form>(body).map_err(|_| bad())
}

fn request_id() -> HeaderValue {
    HeaderValue::from_str(&super::state::random_token()[..16]).unwrap_or(HeaderValue::from_static("0"))
}

async fn token(State(fake): State<FakeBox>, headers: HeaderMap, body: Bytes) -> Response {
    fake.with_world(|w| w.stats.token_arrivals += 1);
    fake.notify();
    let latency = fake.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(fault) = fake.take_fault() {
        return fault_response(&fault).await;
    }
    let now = fake.now();
    let result = match parse_form(&headers, &body) {
        Ok(form) => fake.with_world(|w| w.token(&form, now)),
        Err(e) => fake.with_world(|w| {
            w.stats.token_requests += 1;
            Err(e)
        }),
    };
    let mut response = match result {
        Ok(granted) => match granted.restricted_to {
            None => Json(json!({
                "access_token": granted.access_token,
                "expires_in": granted.expires_in,
                "restricted_to": [],
                "token_type": "bearer",
            })),
            Some(restrictions) => Json(json!({
                "access_token": granted.access_token,
                "expires_in": granted.expires_in,
                "token_type": "bearer",
                "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                "restricted_to": restrictions.iter().map(|(scope, item)| json!({
                    "scope": scope,
                    "object": {"type": item.kind, "id": item.id, "sequence_id": "0", "etag": "0", "name": item.name},
                })).collect::<Vec<_>>(),
            })),
        }
        .into_response(),
        Err(reject) => {
            fake.with_world(|w| w.stats.rejected += 1);
            oauth_error(&reject)
        }
    };
    response.headers_mut().insert("box-request-id", request_id());
    fake.notify();
    response
}

async fn fault_response(fault: &Fault) -> Response {
    match fault {
        Fault::RateLimited { retry_after_secs } => {
            let mut response = (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({
                    "type": "error", "status": 429, "code": "rate_limit_exceeded",
                    "help_url": "http://developers.box.com/docs/#errors",
                    "message": "Request rate limit exceeded, please try again later",
                    "request_id": "fake-429",
                })),
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
            response
        }
        Fault::ServerError { status } => (
            StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Json(json!({"type": "error", "status": status, "code": "internal_server_error", "message": "Internal Server Error"})),
        )
            .into_response(),
        Fault::Reply { status, body } => (
            StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST),
            [(header::CONTENT_TYPE, "application/json")],
            body.clone(),
        )
            .into_response(),
        Fault::Hang => {
            // Longer than any client deadline; the client gives up first.
            tokio::time::sleep(Duration::from_secs(60)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        // Unwinding out of the handler makes hyper drop the connection
        // without an answer; resume_unwind skips the panic hook, so nothing is printed.
        Fault::Reset => std::panic::resume_unwind(Box::new("fake Box: connection reset")),
    }
}

async fn revoke(State(fake): State<FakeBox>, headers: HeaderMap, body: Bytes) -> Response {
    // The configured latency applies here as on the token endpoint.
    let latency = fake.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let result = parse_form(&headers, &body).and_then(|form| fake.with_world(|w| w.revoke(&form)));
    fake.notify();
    match result {
        Ok(()) => StatusCode::OK.into_response(),
        Err(reject) => oauth_error(&reject),
    }
}

async fn users_me(State(fake): State<FakeBox>, headers: HeaderMap) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let now = fake.now();
    let user = fake.with_world(|w| {
        w.token_user(&token, now).map(|(issued, user)| match user {
            Some(u) => json!({"type": "user", "id": u.id, "name": u.name, "login": u.login, "enterprise": {"type": "enterprise", "id": u.enterprise_id}}),
            None => json!({"type": "user", "id": issued.user_id, "name": "Service Account", "login": format!("AutomationUser_{}@boxdevedition.com", issued.user_id)}),
        })
    });
    match user {
        Some(body) => Json(body).into_response(),
        None => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"Service\", error=\"invalid_token\", error_description=\"The access token provided is invalid.\"")],
        )
            .into_response(),
    }
}

async fn stats(State(fake): State<FakeBox>) -> Response {
    Json(fake.stats()).into_response()
}

#[derive(Deserialize)]
struct FaultRequest {
    /// `rate_limited`, `server_error`, `reply`, `hang` or `reset`.
    kind: String,
    #[serde(default = "one")]
    count: usize,
    #[serde(default)]
    retry_after_secs: u64,
    #[serde(default)]
    status: u16,
    #[serde(default)]
    body: String,
}

fn one() -> usize {
    1
}

async fn add_faults(State(fake): State<FakeBox>, Json(request): Json<FaultRequest>) -> Response {
    let fault = match request.kind.as_str() {
        "rate_limited" => Fault::RateLimited {
            retry_after_secs: request.retry_after_secs,
        },
        "server_error" => Fault::ServerError {
            status: if request.status == 0 { 500 } else { request.status },
        },
        "reply" => Fault::Reply {
            status: request.status,
            body: request.body,
        },
        "hang" => Fault::Hang,
        "reset" => Fault::Reset,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                "kind must be rate_limited, server_error, reply, hang or reset",
            )
                .into_response();
        }
    };
    fake.fail_next(request.count, fault);
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct LatencyRequest {
    millis: u64,
}

async fn set_latency(State(fake): State<FakeBox>, Json(request): Json<LatencyRequest>) -> Response {
    fake.set_latency(Duration::from_millis(request.millis));
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct SkewRequest {
    seconds: i64,
}

async fn set_skew(State(fake): State<FakeBox>, Json(request): Json<SkewRequest>) -> Response {
    fake.set_skew_secs(request.seconds);
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct AddKeyRequest {
    public_key_pem: String,
}

/// What the developer console's "Add a Public Key" does: returns the kid.
/// The body is `{"public_key_pem": "..."}`, or the PEM itself
/// (`curl --data-binary @public.pem`).
async fn add_key(
    State(fake): State<FakeBox>,
    axum::extract::Path(client_id): axum::extract::Path<String>,
    body: Bytes,
) -> Response {
    let text = String::from_utf8_lossy(&body);
    let pem = if text.trim_start().starts_with('{') {
        match serde_json::from_str::<AddKeyRequest>(&text) {
            Ok(request) => request.public_key_pem,
            Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({ "error": e.to_string() }))).into_response(),
        }
    } else {
        text.into_owned()
    };
    match fake.add_public_key(&client_id, &pem) {
        Ok(kid) => (StatusCode::CREATED, Json(json!({ "kid": kid }))).into_response(),
        Err(problem) => (StatusCode::BAD_REQUEST, Json(json!({ "error": problem }))).into_response(),
    }
}

async fn remove_key(
    State(fake): State<FakeBox>,
    axum::extract::Path((client_id, kid)): axum::extract::Path<(String, String)>,
) -> Response {
    if fake.remove_public_key(&client_id, &kid) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

#[derive(Deserialize)]
struct SecretRequest {
    client_secret: String,
}

async fn set_secret(
    State(fake): State<FakeBox>,
    axum::extract::Path(client_id): axum::extract::Path<String>,
    Json(request): Json<SecretRequest>,
) -> Response {
    if request.client_secret.is_empty() {
        return (StatusCode::BAD_REQUEST, "client_secret is empty").into_response();
    }
    if fake.set_client_secret(&client_id, &request.client_secret) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}
