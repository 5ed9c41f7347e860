//! The fake Box's HTTP surface (axum): `/oauth2/token`, `/oauth2/revoke`,
//! the users API (`GET /2.0/users`, `GET /2.0/users/{id}`,
//! `GET /2.0/users/me`, `POST /2.0/users`), and `/_fake/*` control
//! endpoints for standalone use (faults, latency, skew, and the developer
//! console's public keys and client secret).
//! Every response carries a `Date` header from the fake's (skewable) clock.

use std::time::{Duration, SystemTime};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    FakeBox,
    state::{Fault, Form, OAuthReject, UsersReject, World, msg},
};

/// One endpoint, for `box-broker fake-box --help` and the README.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    /// The HTTP method.
    pub method: &'static str,
    /// The path (`{client_id}`, `{kid}` and `{user_id}` are placeholders).
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
        path: "/2.0/users",
        what: "Box's user list, for the app's Service Account token with manage_app_users (Managed Users too with manage_managed_users): ?external_app_user_id=, filter_term=, fields=role,status,..., limit= (1-1000, default 100), offset= (at most 10000); {\"entries\", \"total_count\", \"offset\", \"limit\"}",
    },
    Endpoint {
        method: "GET",
        path: "/2.0/users/{user_id}",
        what: "one user (?fields=role,status,enterprise,is_platform_access_only,external_app_user_id): the token's own, or for the Service Account one of its app's App Users, a Managed User or an external user; 404 not_found otherwise",
    },
    Endpoint {
        method: "POST",
        path: "/2.0/users",
        what: "create a user with the Service Account token: {\"name\", \"is_platform_access_only\": true, \"external_app_user_id\"} for an App User, {\"name\", \"login\", \"role\", \"status\"} for a Managed User; 201 with the user, 409 for a used login or external id",
    },
    Endpoint {
        method: "GET",
        path: "/2.0/users/me",
        what: "who a bearer token belongs to (the Service Account for an enterprise token), with role, status, enterprise, is_platform_access_only and external_app_user_id; ?fields= selects",
    },
    Endpoint {
        method: "GET",
        path: "/_fake/stats",
        what: "counts: token requests, mints per grant, exchanges, revocations, rejections, faults served, users API requests per endpoint and users created (JSON)",
    },
    Endpoint {
        method: "POST",
        path: "/_fake/faults",
        what: "fail the next token (or users API) requests: {\"kind\": \"rate_limited\"|\"server_error\"|\"reply\"|\"hang\"|\"reset\", \"count\": 3, \"retry_after_secs\": 1, \"status\": 503, \"body\": \"...\", \"endpoint\": \"token\"|\"users\" (default token)}",
    },
    Endpoint {
        method: "POST",
        path: "/_fake/latency",
        what: "answer every token request this late: {\"millis\": 100} (users API requests: {\"millis\": 100, \"endpoint\": \"users\"})",
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
        .route("/2.0/users", get(list_users).post(create_user))
        // A static segment wins over a parameter: `me` is never a user id.
        .route("/2.0/users/me", get(users_me))
        .route("/2.0/users/{user_id}", get(read_user))
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

/// Whether the request's `Content-Type` is `media_type` (parameters aside).
fn content_type_is(headers: &HeaderMap, media_type: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with(media_type))
}

/// Parses a form body; anything that is not one reads as "no grant_type", as at Box.
fn parse_form(headers: &HeaderMap, body: &Bytes) -> Result<Form, OAuthReject> {
    let is_form = content_type_is(headers, "application/x-www-form-urlencoded");
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

/// A fresh 16-character request id.
fn new_request_id() -> String {
    super::state::random_token()[..16].to_owned()
}

fn request_id() -> HeaderValue {
    HeaderValue::from_str(&new_request_id()).unwrap_or(HeaderValue::from_static("0"))
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

/// The bearer token of a request (empty if none).
fn bearer(headers: &HeaderMap) -> String {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned()
}

/// Where Box's `ClientError` bodies point.
const HELP_URL: &str = "https://developer.box.com/guides/api-calls/permissions-and-errors/common-errors/";

/// A users-API failure as Box sends it: a dead token is 401 with
/// `WWW-Authenticate` and no body; anything else a `ClientError` body.
fn users_error(reject: &UsersReject, request_id: &str) -> Response {
    match reject {
        UsersReject::InvalidToken => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"Service\", error=\"invalid_token\", error_description=\"The access token provided is invalid.\"")],
        )
            .into_response(),
        UsersReject::Client(e) => (
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
            Json(json!({
                "type": "error",
                "status": e.status,
                "code": e.code,
                "message": e.message,
                "context_info": e.context_info,
                "help_url": HELP_URL,
                "request_id": request_id,
            })),
        )
            .into_response(),
    }
}

/// One users-API request: counts its arrival, serves a queued users fault
/// before anything else, then runs `call` with the bearer token under the
/// world lock and answers `ok` with its body, or Box's error. Every answer
/// but a fault carries a `box-request-id`.
async fn users_call(
    fake: &FakeBox,
    headers: &HeaderMap,
    ok: StatusCode,
    call: impl FnOnce(&mut World, &str, SystemTime) -> Result<Value, UsersReject>,
) -> Response {
    fake.with_world(|w| w.stats.users_requests += 1);
    fake.notify();
    let latency = fake.with_world(|w| w.users_latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(fault) = fake.take_users_fault() {
        fake.notify();
        return fault_response(&fault).await;
    }
    let token = bearer(headers);
    let now = fake.now();
    let result = fake.with_world(|w| call(w, &token, now));
    let request_id = new_request_id();
    let mut response = match result {
        Ok(body) => (ok, Json(body)).into_response(),
        Err(reject) => users_error(&reject, &request_id),
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("box-request-id", value);
    }
    fake.notify();
    response
}

async fn users_me(State(fake): State<FakeBox>, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    let query = query.unwrap_or_default();
    users_call(&fake, &headers, StatusCode::OK, |w, token, now| {
        w.users_me(token, &query, now)
    })
    .await
}

async fn read_user(
    State(fake): State<FakeBox>,
    Path(user_id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let query = query.unwrap_or_default();
    users_call(&fake, &headers, StatusCode::OK, |w, token, now| {
        w.read_user(token, &user_id, &query, now)
    })
    .await
}

async fn list_users(State(fake): State<FakeBox>, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    let query = query.unwrap_or_default();
    users_call(&fake, &headers, StatusCode::OK, |w, token, now| {
        w.list_users(token, &query, now)
    })
    .await
}

async fn create_user(State(fake): State<FakeBox>, headers: HeaderMap, body: Bytes) -> Response {
    let json = content_type_is(&headers, "application/json").then_some(&body[..]);
    users_call(&fake, &headers, StatusCode::CREATED, |w, token, now| {
        w.create_user(token, json, now)
    })
    .await
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
    /// `token` (the default) or `users`.
    endpoint: Option<String>,
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
    match request.endpoint.as_deref() {
        None | Some("token") => fake.fail_next(request.count, fault),
        Some("users") => fake.fail_next_users(request.count, fault),
        Some(_) => return (StatusCode::BAD_REQUEST, "endpoint must be token or users").into_response(),
    }
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct LatencyRequest {
    millis: u64,
    /// `token` (the default) or `users`.
    endpoint: Option<String>,
}

async fn set_latency(State(fake): State<FakeBox>, Json(request): Json<LatencyRequest>) -> Response {
    let latency = Duration::from_millis(request.millis);
    match request.endpoint.as_deref() {
        None | Some("token") => fake.set_latency(latency),
        Some("users") => fake.set_users_latency(latency),
        Some(_) => return (StatusCode::BAD_REQUEST, "endpoint must be token or users").into_response(),
    }
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
async fn add_key(State(fake): State<FakeBox>, Path(client_id): Path<String>, body: Bytes) -> Response {
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

async fn remove_key(State(fake): State<FakeBox>, Path((client_id, kid)): Path<(String, String)>) -> Response {
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
    Path(client_id): Path<String>,
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
