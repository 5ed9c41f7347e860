//! The fake Box is strict: it rejects what real Box rejects
//! (box-contract.md §10, §13), with Box's codes and messages.

use crate::common;

use std::sync::Arc;

use box_token_broker::{
    boxapi::{
        BoxId, BoxSubject, JwtAlgorithm, SigningKey,
        assertion::{self, Claims},
    },
    clock::{ManualClock, unix_seconds},
    fakebox::{
        FakeAuth, FakeBox, FakeBoxServer, Fault, MANAGE_APP_USERS, MANAGE_MANAGED_USERS, UserKind,
        seed::{self, SeededApp},
    },
};
use common::fixture_key;
use secrecy::ExposeSecret as _;
use serde_json::Value;

struct Fake {
    fake: FakeBox,
    server: FakeBoxServer,
    app: SeededApp,
    key: SigningKey,
    http: reqwest::Client,
}

async fn fake(auth: FakeAuth) -> Fake {
    let fake = FakeBox::new(ManualClock::new());
    let rsa = fixture_key();
    let app = seed::seed(&fake, auth, (auth == FakeAuth::Jwt).then_some(&rsa));
    let server = fake.clone().start().await.unwrap();
    let key = SigningKey::new(app.kid.clone(), &rsa).unwrap();
    Fake {
        fake,
        server,
        app,
        key,
        http: reqwest::Client::new(),
    }
}

impl Fake {
    fn claims(&self) -> Claims {
        Claims::new(
            &self.app.client_id,
            &BoxSubject::Enterprise(BoxId::parse(seed::ENTERPRISE_ID).unwrap()),
            box_token_broker::clock::system_now(),
        )
    }

    fn sign(&self, claims: &Claims) -> String {
        assertion::sign(claims, &self.key, JwtAlgorithm::RS256)
            .unwrap()
            .0
            .expose_secret()
            .to_owned()
    }

    /// Revokes `token` at the fake, as the app would.
    async fn revoke(&self, token: &str) {
        let secret = self.app.client_secret.expose_secret().to_owned();
        let form = [
            ("client_id", self.app.client_id.as_str()),
            ("client_secret", secret.as_str()),
            ("token", token),
        ];
        let (status, _, _) = self.post("/oauth2/revoke", &form).await;
        assert_eq!(status, 200);
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> (u16, Value, reqwest::header::HeaderMap) {
        let response = self
            .http
            .post(format!("{}{path}", self.server.base_url()))
            .form(form)
            .send()
            .await
            .unwrap();
        answer(response).await
    }

    async fn jwt(&self, assertion: &str) -> (u16, Value) {
        let secret = self.app.client_secret.expose_secret().to_owned();
        let (status, body, _) = self
            .post(
                "/oauth2/token",
                &[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    ("assertion", assertion),
                    ("client_id", &self.app.client_id),
                    ("client_secret", &secret),
                ],
            )
            .await;
        (status, body)
    }

    async fn claims_rejected(&self, claims: &Claims, error: &str, fragment: &str) {
        let (status, body) = self.jwt(&self.sign(claims)).await;
        assert_rejected(status, &body, error, fragment);
    }
}

fn assert_rejected(status: u16, body: &Value, error: &str, fragment: &str) {
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], error, "{body}");
    assert!(body["error_description"].as_str().unwrap().contains(fragment), "{body}");
}

#[tokio::test]
async fn a_valid_assertion_gets_a_token_in_boxs_shape() {
    let f = fake(FakeAuth::Jwt).await;
    let (status, body, headers) = f
        .post(
            "/oauth2/token",
            &[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", &f.sign(&f.claims())),
                ("client_id", &f.app.client_id),
                ("client_secret", f.app.client_secret.expose_secret()),
                ("box_device_id", "0"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["access_token"].as_str().unwrap().len(), 32);
    assert!(body["expires_in"].as_u64().unwrap() >= 4000);
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["restricted_to"], serde_json::json!([]));
    assert!(httpdate::parse_http_date(headers["date"].to_str().unwrap()).is_ok());
}

#[tokio::test]
async fn every_response_has_a_date_header() {
    let f = fake(FakeAuth::Jwt).await;
    let (_, _, headers) = f.post("/oauth2/token", &[("grant_type", "bogus")]).await;
    assert!(headers.contains_key("date"));
    let me = f
        .http
        .get(format!("{}/2.0/users/me", f.server.base_url()))
        .send()
        .await
        .unwrap();
    assert!(me.headers().contains_key("date"));
}

#[tokio::test]
async fn a_missing_or_unknown_grant_type_is_invalid_request() {
    let f = fake(FakeAuth::Jwt).await;
    let (status, body, _) = f.post("/oauth2/token", &[("client_id", "x")]).await;
    assert_rejected(status, &body, "invalid_request", "grant_type");
    let (status, body, _) = f.post("/oauth2/token", &[("grant_type", "password")]).await;
    assert_rejected(status, &body, "invalid_request", "grant_type");
}

#[tokio::test]
async fn a_json_body_is_not_a_form() {
    let f = fake(FakeAuth::Jwt).await;
    let response = f
        .http
        .post(format!("{}/oauth2/token", f.server.base_url()))
        .json(&serde_json::json!({"grant_type": "client_credentials"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
}

#[tokio::test]
async fn only_post_is_accepted() {
    let f = fake(FakeAuth::Jwt).await;
    let response = f
        .http
        .get(format!("{}/oauth2/token", f.server.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 405);
}

#[tokio::test]
async fn wrong_client_credentials_are_invalid_client() {
    let f = fake(FakeAuth::Jwt).await;
    let assertion = f.sign(&f.claims());
    let (status, body, _) = f
        .post(
            "/oauth2/token",
            &[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", &assertion),
                ("client_id", &f.app.client_id),
                ("client_secret", "wrong"),
            ],
        )
        .await;
    assert_rejected(status, &body, "invalid_client", "client credentials are invalid");
}

#[tokio::test]
async fn an_unauthorized_app_is_unauthorized_client() {
    let f = fake(FakeAuth::Jwt).await;
    f.fake.update_app(&f.app.client_id, |a| a.authorized = false);
    let (status, body) = f.jwt(&f.sign(&f.claims())).await;
    assert_rejected(
        status,
        &body,
        "unauthorized_client",
        "not authorized by the enterprise admin",
    );
}

#[tokio::test]
async fn an_unknown_kid_is_rejected() {
    let f = fake(FakeAuth::Jwt).await;
    let other = SigningKey::new("nosuchid", &fixture_key()).unwrap();
    let assertion = assertion::sign(&f.claims(), &other, JwtAlgorithm::RS256).unwrap();
    let (status, body) = f.jwt(assertion.0.expose_secret()).await;
    assert_rejected(status, &body, "invalid_grant", "\"kid\" invalid");
}

#[tokio::test]
async fn a_missing_kid_is_allowed_only_with_exactly_one_key() {
    let f = fake(FakeAuth::Jwt).await;
    let no_kid = |claims: &Claims| {
        let der = {
            use rsa::pkcs1::EncodeRsaPrivateKey as _;
            fixture_key().to_pkcs1_der().unwrap()
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            claims,
            &jsonwebtoken::EncodingKey::from_rsa_der(der.as_bytes()),
        )
        .unwrap()
    };
    assert_eq!(f.jwt(&no_kid(&f.claims())).await.0, 200);
    f.fake.update_app(&f.app.client_id, |a| {
        a.keys.insert("second".to_owned(), fixture_key().to_public_key());
    });
    let (status, body) = f.jwt(&no_kid(&f.claims())).await;
    assert_rejected(status, &body, "invalid_grant", "\"kid\" invalid");
}

#[tokio::test]
async fn a_signature_by_another_key_is_rejected() {
    let f = fake(FakeAuth::Jwt).await;
    let other = box_token_broker::boxapi::private_key::decode_private_key(
        &std::fs::read_to_string(common::fixture("rsa3072_aes128.pem")).unwrap(),
        Some(&common::fixture_passphrase()),
    )
    .unwrap();
    let forged = SigningKey::new(f.app.kid.clone(), &other).unwrap();
    let assertion = assertion::sign(&f.claims(), &forged, JwtAlgorithm::RS256).unwrap();
    let (status, body) = f.jwt(assertion.0.expose_secret()).await;
    assert_rejected(status, &body, "invalid_grant", "Signature verification error");
}

#[tokio::test]
async fn an_hmac_assertion_keyed_with_the_public_key_is_rejected() {
    let f = fake(FakeAuth::Jwt).await;
    let public_pem = std::fs::read(common::fixture("public.pem")).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(f.app.kid.clone());
    let forged = jsonwebtoken::encode(
        &header,
        &f.claims(),
        &jsonwebtoken::EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    let (status, body) = f.jwt(&forged).await;
    assert_rejected(status, &body, "invalid_grant", "Signature verification error");
}

#[tokio::test]
async fn a_tampered_payload_is_rejected() {
    let f = fake(FakeAuth::Jwt).await;
    let signed = f.sign(&f.claims());
    let mut parts: Vec<&str> = signed.split('.').collect();
    let mut other = f.claims();
    other.sub = seed::MANAGED_USER_ID.to_owned();
    other.box_sub_type = "user".to_owned();
    let payload = {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&other).unwrap())
    };
    parts[1] = &payload;
    let (status, body) = f.jwt(&parts.join(".")).await;
    assert_rejected(status, &body, "invalid_grant", "Signature verification error");
}

#[tokio::test]
async fn a_wrong_iss_is_rejected() {
    let f = fake(FakeAuth::Jwt).await;
    let mut c = f.claims();
    c.iss = "someone-else".to_owned();
    f.claims_rejected(&c, "invalid_grant", "'iss'").await;
}

#[tokio::test]
async fn a_wrong_aud_is_rejected() {
    let f = fake(FakeAuth::Jwt).await;
    let mut c = f.claims();
    c.aud = "https://api.box.com/2.0/oauth2/token".to_owned();
    f.claims_rejected(&c, "invalid_grant", "'aud'").await;
}

#[tokio::test]
async fn an_expired_assertion_is_rejected() {
    let f = fake(FakeAuth::Jwt).await;
    let mut c = f.claims();
    c.exp = unix_seconds(f.fake.now()) - 1;
    f.claims_rejected(&c, "invalid_grant", "MUST be before the expiration")
        .await;
}

#[tokio::test]
async fn an_exp_more_than_sixty_seconds_ahead_is_rejected() {
    let f = fake(FakeAuth::Jwt).await;
    let mut c = f.claims();
    c.exp = unix_seconds(f.fake.now()) + 61;
    f.claims_rejected(&c, "invalid_grant", "exceeds the maximum value of 60 seconds")
        .await;
}

#[tokio::test]
async fn jti_length_is_enforced() {
    let f = fake(FakeAuth::Jwt).await;
    for jti in ["a".repeat(15), "b".repeat(129)] {
        let mut c = f.claims();
        c.jti = jti;
        f.claims_rejected(&c, "invalid_grant", "'jti'").await;
    }
    for jti in ["c".repeat(16), "d".repeat(128)] {
        let mut c = f.claims();
        c.jti = jti;
        assert_eq!(f.jwt(&f.sign(&c)).await.0, 200);
    }
}

#[tokio::test]
async fn a_reused_jti_is_rejected() {
    let f = fake(FakeAuth::Jwt).await;
    let c = f.claims();
    assert_eq!(f.jwt(&f.sign(&c)).await.0, 200);
    f.claims_rejected(&c, "invalid_grant", "A unique 'jti' value is required")
        .await;
}

#[tokio::test]
async fn sub_must_match_box_sub_type() {
    let f = fake(FakeAuth::Jwt).await;
    let mut c = f.claims();
    c.sub = seed::APP_USER_IDS[0].to_owned(); // a user id with box_sub_type=enterprise
    f.claims_rejected(&c, "invalid_grant", "'sub'").await;
    let mut c = f.claims();
    c.box_sub_type = "external".to_owned();
    f.claims_rejected(&c, "invalid_grant", "'sub'").await;
    let mut c = f.claims();
    c.box_sub_type = "user".to_owned();
    c.sub = seed::EXTERNAL_USER_ID.to_owned();
    f.claims_rejected(&c, "invalid_grant", "'sub'").await;
}

#[tokio::test]
async fn a_numeric_sub_is_rejected() {
    let f = fake(FakeAuth::Jwt).await;
    let mut claims = serde_json::to_value(f.claims()).unwrap();
    claims["sub"] = serde_json::json!(7_000_001);
    let assertion = {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(f.app.kid.clone());
        use rsa::pkcs1::EncodeRsaPrivateKey as _;
        let der = fixture_key().to_pkcs1_der().unwrap();
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_rsa_der(der.as_bytes()),
        )
        .unwrap()
    };
    let (status, body) = f.jwt(&assertion).await;
    assert_rejected(status, &body, "invalid_grant", "'sub'");
}

#[tokio::test]
async fn user_tokens_need_the_app_setting() {
    let f = fake(FakeAuth::Jwt).await;
    f.fake.update_app(&f.app.client_id, |a| a.user_tokens = false);
    let mut c = f.claims();
    c.box_sub_type = "user".to_owned();
    c.sub = seed::APP_USER_IDS[0].to_owned();
    f.claims_rejected(&c, "invalid_request", "Cannot obtain user token")
        .await;
}

#[tokio::test]
async fn ccg_grants_follow_the_subject_rules() {
    let f = fake(FakeAuth::Ccg).await;
    let secret = f.app.client_secret.expose_secret().to_owned();
    let ccg = |kind: &'static str, id: &'static str| {
        [
            ("grant_type", "client_credentials"),
            ("client_id", f.app.client_id.as_str()),
            ("client_secret", secret.as_str()),
            ("box_subject_type", kind),
            ("box_subject_id", id),
        ]
    };
    assert_eq!(
        f.post("/oauth2/token", &ccg("enterprise", seed::ENTERPRISE_ID)).await.0,
        200
    );
    assert_eq!(
        f.post("/oauth2/token", &ccg("user", seed::APP_USER_IDS[0])).await.0,
        200
    );
    for (kind, id) in [
        ("enterprise", "1"),
        ("user", seed::EXTERNAL_USER_ID),
        ("user", "42"),
        ("group", "1"),
    ] {
        let (status, body, _) = f.post("/oauth2/token", &ccg(kind, id)).await;
        assert_rejected(status, &body, "invalid_grant", "Grant credentials are invalid");
    }
    // A CCG app cannot use the JWT grant.
    let (status, body) = f.jwt("a.b.c").await;
    assert_rejected(status, &body, "invalid_request", "grant type is unauthorized");
    assert_eq!(f.fake.stats().ccg_issued, 2);
}

#[tokio::test]
async fn revoked_tokens_stop_working() {
    let f = fake(FakeAuth::Jwt).await;
    let (_, body) = f.jwt(&f.sign(&f.claims())).await;
    let token = body["access_token"].as_str().unwrap().to_owned();
    let me = |t: String| {
        let http = f.http.clone();
        let url = format!("{}/2.0/users/me", f.server.base_url());
        async move { http.get(url).bearer_auth(t).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(me(token.clone()).await, 200);
    let secret = f.app.client_secret.expose_secret().to_owned();
    let (status, _, _) = f
        .post(
            "/oauth2/revoke",
            &[
                ("client_id", &f.app.client_id),
                ("client_secret", &secret),
                ("token", &token),
            ],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(me(token).await, 401);
    assert_eq!(me("not-a-token".to_owned()).await, 401);
}

#[tokio::test]
async fn revoke_needs_client_credentials() {
    let f = fake(FakeAuth::Jwt).await;
    let (status, body, _) = f
        .post("/oauth2/revoke", &[("client_id", &f.app.client_id), ("token", "x")])
        .await;
    assert_rejected(status, &body, "invalid_client", "client credentials");
}

#[tokio::test]
async fn rate_limit_fault_sends_429_with_retry_after() {
    let f = fake(FakeAuth::Jwt).await;
    f.fake.fail_next(2, Fault::RateLimited { retry_after_secs: 3 });
    for _ in 0..2 {
        let (status, body, headers) = f.post("/oauth2/token", &[("grant_type", "client_credentials")]).await;
        assert_eq!(status, 429);
        assert_eq!(headers["retry-after"], "3");
        assert_eq!(body["code"], "rate_limit_exceeded");
    }
    assert_eq!(
        f.post("/oauth2/token", &[("grant_type", "client_credentials")]).await.0,
        400
    );
    let stats = f.fake.stats();
    assert_eq!((stats.token_requests, stats.faults_served), (3, 2));
}

#[tokio::test]
async fn control_endpoints_drive_the_knobs() {
    let f = fake(FakeAuth::Jwt).await;
    let base = f.server.base_url();
    let r = f
        .http
        .post(format!("{base}/_fake/faults"))
        .json(&serde_json::json!({"kind": "server_error", "status": 503}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(f.post("/oauth2/token", &[]).await.0, 503);
    let stats: Value = f
        .http
        .get(format!("{base}/_fake/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["faults_served"], 1);
    let _ = Arc::new(());
}

impl Fake {
    async fn enterprise_token(&self) -> String {
        let (_, body) = self.jwt(&self.sign(&self.claims())).await;
        body["access_token"].as_str().unwrap().to_owned()
    }

    async fn exchange(&self, subject_token: &str, scope: &str, extra: &[(&str, &str)]) -> (u16, Value) {
        let mut form = vec![
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("subject_token", subject_token),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:access_token"),
            ("scope", scope),
        ];
        form.extend_from_slice(extra);
        let (status, body, _) = self.post("/oauth2/token", &form).await;
        (status, body)
    }
}

#[tokio::test]
async fn a_token_exchange_returns_restricted_to_and_the_issued_token_type() {
    let f = fake(FakeAuth::Jwt).await;
    let parent = f.enterprise_token().await;
    let resource = format!("https://api.box.com/2.0/folders/{}", seed::SERVICE_ACCOUNT_FOLDER_ID);
    let (status, body) = f
        .exchange(&parent, "item_preview base_explorer", &[("resource", &resource)])
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(body["restricted_to"].as_array().unwrap().len(), 2);
    assert_eq!(
        body["restricted_to"][0]["object"]["id"],
        seed::SERVICE_ACCOUNT_FOLDER_ID
    );
    assert!(body.get("refresh_token").is_none());
    // A downscoped token can be downscoped further, only within its own scopes.
    let child = body["access_token"].as_str().unwrap();
    assert_eq!(f.exchange(child, "item_preview", &[]).await.0, 200);
    assert_eq!(f.exchange(child, "item_delete", &[]).await.0, 401);
}

#[tokio::test]
async fn token_exchange_rejects_what_box_rejects() {
    let f = fake(FakeAuth::Jwt).await;
    let parent = f.enterprise_token().await;
    let folder = format!("https://api.box.com/2.0/folders/{}", seed::SERVICE_ACCOUNT_FOLDER_ID);
    let (status, body) = f
        .exchange(
            &parent,
            "item_preview",
            &[("resource", &folder), ("box_shared_link", seed::SHARED_LINK)],
        )
        .await;
    assert_rejected(status, &body, "invalid_request", "mutually exclusive");
    // Another user's folder is not reachable by the Service Account.
    let theirs = format!("https://api.box.com/2.0/folders/{}", seed::APP_USER_FOLDER_ID);
    let (status, body) = f.exchange(&parent, "item_preview", &[("resource", &theirs)]).await;
    assert_rejected(status, &body, "invalid_resource", "The target resource is invalid.");
    f.fake
        .update_app(&f.app.client_id, |a| a.scopes = ["item_preview".to_owned()].into());
    assert_eq!(
        f.exchange(&parent, "item_preview item_download", &[]).await.0,
        401,
        "the subset rule"
    );
    let (status, body) = f.exchange("not-a-token", "item_preview", &[]).await;
    assert_rejected(status, &body, "invalid_grant", "subject token");
}

#[tokio::test]
async fn a_revoked_token_cannot_be_exchanged() {
    let f = fake(FakeAuth::Jwt).await;
    let parent = f.enterprise_token().await;
    f.revoke(&parent).await;
    let (status, body) = f.exchange(&parent, "item_preview", &[]).await;
    assert_rejected(status, &body, "invalid_grant", "subject token");
}

// The users API (box-contract.md §13).

impl Fake {
    /// A user token for `user_id` by the JWT grant.
    async fn user_token(&self, user_id: &str) -> String {
        let mut claims = self.claims();
        claims.box_sub_type = "user".to_owned();
        user_id.clone_into(&mut claims.sub);
        let (status, body) = self.jwt(&self.sign(&claims)).await;
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// A GET of the users API; `query` pairs are URL-encoded.
    async fn users_get(
        &self,
        path: &str,
        token: &str,
        query: &[(&str, &str)],
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let query = serde_urlencoded::to_string(query).unwrap();
        let response = self
            .http
            .get(format!("{}{path}?{query}", self.server.base_url()))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        answer(response).await
    }

    async fn list_users(&self, token: &str, query: &[(&str, &str)]) -> (u16, Value) {
        let (status, body, _) = self.users_get("/2.0/users", token, query).await;
        (status, body)
    }

    async fn create_user(&self, token: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}/2.0/users", self.server.base_url()))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

/// A Box `ClientError` with `status` and `code`, in Box's full shape.
fn assert_client_error(status: u16, body: &Value, expected: u16, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["status"], expected, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(!body["message"].as_str().unwrap().is_empty(), "{body}");
    assert!(body["context_info"].is_object(), "{body}");
    assert!(
        body["help_url"]
            .as_str()
            .unwrap()
            .starts_with("https://developer.box.com/"),
        "{body}"
    );
    assert_eq!(body["request_id"].as_str().unwrap().len(), 16, "{body}");
}

fn keys(user: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = user.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

#[tokio::test]
async fn app_users_are_listed_by_external_app_user_id() {
    let f = fake(FakeAuth::Jwt).await;
    let sa = f.enterprise_token().await;
    let (status, body) = f.list_users(&sa, &[("external_app_user_id", "auth0|bob")]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["total_count"], 1);
    assert_eq!((&body["offset"], &body["limit"]), (&Value::from(0), &Value::from(100)));
    let bob = &body["entries"][0];
    assert_eq!(bob["id"], seed::APP_USER_IDS[1]);
    assert_eq!(bob["type"], "user");
    assert_eq!(bob["external_app_user_id"], "auth0|bob");
    assert_eq!(bob["is_platform_access_only"], true);
    assert_eq!(
        (bob["role"].as_str(), bob["status"].as_str()),
        (Some("user"), Some("active"))
    );
    assert_eq!(bob["enterprise"]["id"], seed::ENTERPRISE_ID);
    // No match is not an error.
    let (status, body) = f.list_users(&sa, &[("external_app_user_id", "auth0|nobody")]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entries"], serde_json::json!([]));
    assert_eq!(body["total_count"], 0);
    // Out-of-range paging is a bad request.
    for (name, value) in [("limit", "1001"), ("limit", "0"), ("limit", "ten"), ("offset", "10001")] {
        let (status, body) = f.list_users(&sa, &[(name, value)]).await;
        assert_client_error(status, &body, 400, "bad_request");
        assert!(body["message"].as_str().unwrap().contains(name), "{body}");
    }
    // The whole list: this app's App Users and the enterprise's Managed
    // Users, by id; never the other app's App User or the external user.
    let (status, body) = f.list_users(&sa, &[("limit", "1000"), ("unknown", "ignored")]).await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<&str> = body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    let mut expected = seed::APP_USER_IDS.to_vec();
    expected.extend([
        seed::MANAGED_USER_ID,
        seed::ADMIN_USER_ID,
        seed::COADMIN_USER_ID,
        seed::INACTIVE_USER_ID,
    ]);
    assert_eq!(ids, expected);
    assert_eq!(body["total_count"], expected.len());
    let (_, page) = f.list_users(&sa, &[("limit", "2"), ("offset", "3")]).await;
    assert_eq!(page["entries"][0]["id"], seed::MANAGED_USER_ID);
    assert_eq!(page["entries"].as_array().unwrap().len(), 2);
    assert_eq!(page["total_count"], expected.len());
    let (_, found) = f.list_users(&sa, &[("filter_term", "cora")]).await;
    assert_eq!(found["entries"][0]["id"], seed::COADMIN_USER_ID);
    assert_eq!(found["total_count"], 1);
}

#[tokio::test]
async fn fields_give_the_mini_representation_plus_those_fields() {
    let f = fake(FakeAuth::Jwt).await;
    let sa = f.enterprise_token().await;
    let (_, body) = f
        .list_users(&sa, &[("external_app_user_id", "auth0|ada"), ("fields", "role,status")])
        .await;
    let ada = &body["entries"][0];
    assert_eq!(keys(ada), ["id", "login", "name", "role", "status", "type"]);
    assert_eq!(ada["role"], "user");
    let (_, body) = f
        .list_users(&sa, &[("external_app_user_id", "auth0|ada"), ("fields", "id")])
        .await;
    assert_eq!(keys(&body["entries"][0]), ["id", "login", "name", "type"]);
    let (status, admin, _) = f
        .users_get(
            &format!("/2.0/users/{}", seed::ADMIN_USER_ID),
            &sa,
            &[("fields", "role,enterprise")],
        )
        .await;
    assert_eq!(status, 200, "{admin}");
    assert_eq!(keys(&admin), ["enterprise", "id", "login", "name", "role", "type"]);
    assert_eq!(admin["role"], "admin");
}

#[tokio::test]
async fn one_user_is_read_in_full_or_not_found() {
    let f = fake(FakeAuth::Jwt).await;
    let sa = f.enterprise_token().await;
    let get = |id: &str| {
        let path = format!("/2.0/users/{id}");
        let sa = sa.clone();
        let f = &f;
        async move { f.users_get(&path, &sa, &[]).await }
    };
    let (status, inactive, headers) = get(seed::INACTIVE_USER_ID).await;
    assert_eq!(status, 200, "{inactive}");
    assert_eq!(inactive["name"], "Ivan Inactive");
    assert_eq!(inactive["status"], "inactive");
    assert_eq!(inactive["role"], "user");
    assert_eq!(inactive["is_platform_access_only"], false);
    assert_eq!(inactive["external_app_user_id"], Value::Null);
    assert_eq!(inactive["enterprise"]["type"], "enterprise");
    assert!(inactive["created_at"].is_string());
    assert!(headers.contains_key("box-request-id"));
    let (_, coadmin, _) = get(seed::COADMIN_USER_ID).await;
    assert_eq!(coadmin["role"], "coadmin");
    // Unknown, not a number, or another app's App User: not found.
    for id in ["7999999", "abc", seed::OTHER_APP_USER_ID] {
        let (status, body, headers) = get(id).await;
        assert_client_error(status, &body, 404, "not_found");
        assert!(headers.contains_key("box-request-id"));
    }
    // An external user is shown, with its own enterprise.
    let (status, eve, _) = get(seed::EXTERNAL_USER_ID).await;
    assert_eq!(status, 200, "{eve}");
    assert_ne!(eve["enterprise"]["id"], seed::ENTERPRISE_ID);
    assert_eq!(eve["is_platform_access_only"], false);
    // ... but never listed.
    let (_, all) = f.list_users(&sa, &[]).await;
    assert!(!all.to_string().contains(seed::EXTERNAL_USER_ID));
}

#[tokio::test]
async fn users_me_is_the_tokens_own_user_and_other_users_are_the_service_accounts() {
    let f = fake(FakeAuth::Jwt).await;
    let ada = f.user_token(seed::APP_USER_IDS[0]).await;
    let (status, me, _) = f.users_get("/2.0/users/me", &ada, &[]).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["id"], seed::APP_USER_IDS[0]);
    assert_eq!(me["external_app_user_id"], seed::APP_USER_EXTERNAL_IDS[0]);
    assert_eq!(me["is_platform_access_only"], true);
    assert_eq!(
        (me["role"].as_str(), me["status"].as_str()),
        (Some("user"), Some("active"))
    );
    let (_, me, _) = f.users_get("/2.0/users/me", &ada, &[("fields", "status")]).await;
    assert_eq!(keys(&me), ["id", "login", "name", "status", "type"]);
    // Its own id is readable; another user's, listing and creating are not.
    let (status, own, _) = f
        .users_get(&format!("/2.0/users/{}", seed::APP_USER_IDS[0]), &ada, &[])
        .await;
    assert_eq!((status, own["id"].as_str()), (200, Some(seed::APP_USER_IDS[0])));
    let (status, body, _) = f
        .users_get(&format!("/2.0/users/{}", seed::APP_USER_IDS[1]), &ada, &[])
        .await;
    assert_client_error(status, &body, 403, "forbidden");
    let (status, body) = f.list_users(&ada, &[("external_app_user_id", "auth0|bob")]).await;
    assert_client_error(status, &body, 403, "forbidden");
    let (status, body) = f
        .create_user(&ada, serde_json::json!({"name": "X", "is_platform_access_only": true}))
        .await;
    assert_client_error(status, &body, 403, "forbidden");
    // The enterprise token is the Service Account's.
    let sa = f.enterprise_token().await;
    let (_, me, _) = f.users_get("/2.0/users/me", &sa, &[]).await;
    assert_eq!(me["id"], seed::SERVICE_ACCOUNT_ID);
    assert_eq!(me["enterprise"]["id"], seed::ENTERPRISE_ID);
}

#[tokio::test]
async fn the_users_api_needs_the_apps_user_scopes() {
    let f = fake(FakeAuth::Jwt).await;
    let sa = f.enterprise_token().await;
    let managed = format!("/2.0/users/{}", seed::MANAGED_USER_ID);
    let app_user = format!("/2.0/users/{}", seed::APP_USER_IDS[0]);
    assert!(f.fake.set_user_scopes(&f.app.client_id, &[MANAGE_MANAGED_USERS]));
    let (status, body) = f.list_users(&sa, &[("external_app_user_id", "auth0|ada")]).await;
    assert_client_error(status, &body, 403, "insufficient_scope");
    assert_eq!(
        body["message"],
        "The request requires higher privileges than provided by the access token."
    );
    assert_eq!(body["context_info"], serde_json::json!({}));
    let (status, body, _) = f.users_get(&app_user, &sa, &[]).await;
    assert_client_error(status, &body, 403, "insufficient_scope");
    assert_eq!(f.users_get(&managed, &sa, &[]).await.0, 200);
    let (status, body) = f
        .create_user(&sa, serde_json::json!({"name": "Dee", "is_platform_access_only": true}))
        .await;
    assert_client_error(status, &body, 403, "insufficient_scope");
    // App Users only: Managed Users can be neither read nor listed.
    f.fake.set_user_scopes(&f.app.client_id, &[MANAGE_APP_USERS]);
    let (status, body, _) = f.users_get(&managed, &sa, &[]).await;
    assert_client_error(status, &body, 403, "insufficient_scope");
    let (_, body) = f.list_users(&sa, &[]).await;
    assert_eq!(body["total_count"], 3, "{body}");
    let (status, body) = f
        .create_user(&sa, serde_json::json!({"name": "Max", "login": "max@example.com"}))
        .await;
    assert_client_error(status, &body, 403, "insufficient_scope");
    assert_eq!(f.fake.stats().users_created, 0);
}

#[tokio::test]
async fn a_dead_or_downscoped_token_is_refused() {
    let f = fake(FakeAuth::Jwt).await;
    let sa = f.enterprise_token().await;
    let downscoped = {
        let (status, body) = f.exchange(&sa, "item_preview", &[]).await;
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    };
    for path in ["/2.0/users", "/2.0/users/me", "/2.0/users/7200001"] {
        let (status, body, _) = f.users_get(path, &downscoped, &[]).await;
        assert_client_error(status, &body, 403, "insufficient_scope");
    }
    f.revoke(&sa).await;
    for token in [sa.as_str(), "not-a-token"] {
        let (status, body, headers) = f.users_get("/2.0/users", token, &[]).await;
        assert_eq!(status, 401);
        assert_eq!(body, Value::Null, "an empty body");
        assert!(
            headers["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("error=\"invalid_token\""),
            "{headers:?}"
        );
    }
    let (status, _) = f.create_user(&sa, serde_json::json!({"name": "Dee"})).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_created_app_user_is_found_by_its_external_id_and_can_get_tokens() {
    let f = fake(FakeAuth::Jwt).await;
    let sa = f.enterprise_token().await;
    let (status, dee) = f
        .create_user(
            &sa,
            serde_json::json!({"name": "Dee App", "is_platform_access_only": true, "external_app_user_id": "auth0|dee"}),
        )
        .await;
    assert_eq!(status, 201, "{dee}");
    let id = dee["id"].as_str().unwrap().to_owned();
    assert!(id.parse::<u64>().is_ok(), "{dee}");
    assert_eq!(dee["is_platform_access_only"], true);
    assert_eq!(dee["external_app_user_id"], "auth0|dee");
    assert_eq!(
        (dee["role"].as_str(), dee["status"].as_str()),
        (Some("user"), Some("active"))
    );
    assert_eq!(dee["enterprise"]["id"], seed::ENTERPRISE_ID);
    let login = dee["login"].as_str().unwrap();
    let random = login
        .strip_prefix(&format!("AppUser_{}_", seed::SERVICE_ACCOUNT_ID))
        .and_then(|rest| rest.strip_suffix("@boxdevedition.com"))
        .unwrap_or_else(|| panic!("{login}"));
    assert_eq!(random.len(), 10);
    let (_, found) = f.list_users(&sa, &[("external_app_user_id", "auth0|dee")]).await;
    assert_eq!(found["entries"][0]["id"], id.as_str());
    assert_eq!(found["total_count"], 1);
    assert_eq!(f.fake.users_with_external_id("auth0|dee").len(), 1);
    assert_eq!(
        f.fake.user(&id).unwrap().kind,
        UserKind::AppUser {
            client_id: f.app.client_id.clone()
        }
    );
    // It is this app's App User, so the app can get a token for it.
    let token = f.user_token(&id).await;
    let (_, me, _) = f.users_get("/2.0/users/me", &token, &[]).await;
    assert_eq!(me["id"], id.as_str());
    // A Managed User, created with a login and a role.
    let (status, max) = f
        .create_user(
            &sa,
            serde_json::json!({"name": "Max Managed", "login": "max@example.com", "role": "coadmin", "status": "inactive"}),
        )
        .await;
    assert_eq!(status, 201, "{max}");
    assert_ne!(max["id"], dee["id"]);
    assert_eq!(max["is_platform_access_only"], false);
    assert_eq!(
        (max["role"].as_str(), max["status"].as_str()),
        (Some("coadmin"), Some("inactive"))
    );
    assert_eq!(max["login"], "max@example.com");
    let stats = f.fake.stats();
    assert_eq!((stats.user_create_requests, stats.users_created), (2, 2));
}

#[tokio::test]
async fn user_creation_refuses_what_box_refuses() {
    let f = fake(FakeAuth::Jwt).await;
    let sa = f.enterprise_token().await;
    let refused = |body: Value, status: u16, code: &'static str, fragment: &'static str| {
        let f = &f;
        let sa = sa.clone();
        async move {
            let (got, answer) = f.create_user(&sa, body.clone()).await;
            assert_client_error(got, &answer, status, code);
            assert!(
                answer["message"].as_str().unwrap().contains(fragment),
                "{body} -> {answer}"
            );
        }
    };
    refused(
        serde_json::json!({"is_platform_access_only": true}),
        400,
        "bad_request",
        "name",
    )
    .await;
    refused(
        serde_json::json!({"name": "", "is_platform_access_only": true}),
        400,
        "bad_request",
        "name",
    )
    .await;
    refused(
        serde_json::json!({"name": 7, "is_platform_access_only": true}),
        400,
        "bad_request",
        "name",
    )
    .await;
    refused(
        serde_json::json!({"name": "x".repeat(51), "is_platform_access_only": true}),
        400,
        "bad_request",
        "name",
    )
    .await;
    refused(serde_json::json!({"name": "Max Managed"}), 400, "bad_request", "login").await;
    refused(
        serde_json::json!({"name": "Max", "login": "max@example.com", "role": "admin"}),
        400,
        "bad_request",
        "role",
    )
    .await;
    refused(
        serde_json::json!({"name": "Max", "login": "max@example.com", "status": "asleep"}),
        400,
        "bad_request",
        "status",
    )
    .await;
    refused(
        serde_json::json!({"name": "Ada Again", "is_platform_access_only": true, "external_app_user_id": "auth0|ada"}),
        409,
        "conflict",
        "external_app_user_id",
    )
    .await;
    refused(
        serde_json::json!({"name": "Mia Again", "login": "Mia.Managed@example.com"}),
        409,
        "user_login_already_used",
        "login",
    )
    .await;
    // Not JSON.
    let response = f
        .http
        .post(format!("{}/2.0/users", f.server.base_url()))
        .bearer_auth(&sa)
        .form(&[("name", "Dee"), ("is_platform_access_only", "true")])
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_client_error(status, &body, 400, "bad_request");
    let stats = f.fake.stats();
    assert_eq!((stats.user_create_requests, stats.users_created), (10, 0));
    assert_eq!(f.fake.users_with_external_id("auth0|ada").len(), 1);
}

#[tokio::test]
async fn users_faults_are_served_first_then_the_api_recovers() {
    let f = fake(FakeAuth::Jwt).await;
    let sa = f.enterprise_token().await;
    f.fake.fail_next_users(2, Fault::ServerError { status: 503 });
    for path in ["/2.0/users", "/2.0/users/me"] {
        let (status, body, _) = f.users_get(path, "not-even-a-token", &[]).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["code"], "internal_server_error");
    }
    // The token endpoint has its own queue: unaffected.
    let other = f.enterprise_token().await;
    let (status, body) = f.list_users(&other, &[("external_app_user_id", "auth0|cy")]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entries"][0]["id"], seed::APP_USER_IDS[2]);
    // A standalone fake queues users faults through its control endpoint.
    let r = f
        .http
        .post(format!("{}/_fake/faults", f.server.base_url()))
        .json(&serde_json::json!({"kind": "rate_limited", "retry_after_secs": 2, "endpoint": "users"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let (status, _, headers) = f
        .users_get(&format!("/2.0/users/{}", seed::MANAGED_USER_ID), &sa, &[])
        .await;
    assert_eq!((status, headers["retry-after"].to_str().unwrap()), (429, "2"));
    let r = f
        .http
        .post(format!("{}/_fake/faults", f.server.base_url()))
        .json(&serde_json::json!({"kind": "hang", "endpoint": "files"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        f.users_get(&format!("/2.0/users/{}", seed::MANAGED_USER_ID), &sa, &[])
            .await
            .0,
        200
    );
    assert!(
        f.fake
            .wait_for(std::time::Duration::from_secs(5), |s| s.user_reads == 1)
            .await
    );
    let stats = f.fake.stats();
    assert_eq!(stats.users_requests, 5, "faults included");
    assert_eq!(stats.faults_served, 3);
    assert_eq!((stats.user_lists, stats.users_me, stats.user_reads), (1, 0, 1));
}

#[tokio::test]
async fn users_stats_count_each_endpoint() {
    let f = fake(FakeAuth::Jwt).await;
    let sa = f.enterprise_token().await;
    f.list_users(&sa, &[]).await;
    f.list_users(&sa, &[("limit", "5000")]).await;
    f.users_get("/2.0/users/me", &sa, &[]).await;
    f.users_get("/2.0/users/7999999", &sa, &[]).await;
    f.create_user(&sa, serde_json::json!({"name": "Dee", "is_platform_access_only": true}))
        .await;
    f.create_user(&sa, serde_json::json!({"name": "No Login"})).await;
    let stats = f.fake.stats();
    assert_eq!(stats.users_requests, 6);
    assert_eq!(stats.user_lists, 2);
    assert_eq!(stats.users_me, 1);
    assert_eq!(stats.user_reads, 1);
    assert_eq!((stats.user_create_requests, stats.users_created), (2, 1));
    let served: Value = f
        .http
        .get(format!("{}/_fake/stats", f.server.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(served["users_created"], 1);
    assert_eq!(served["users_requests"], 6);
}

/// An answer's status, JSON body (`null` when it has none) and headers.
async fn answer(response: reqwest::Response) -> (u16, Value, reqwest::header::HeaderMap) {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body, headers)
}
