//! The fake Box is strict: it rejects what real Box rejects
//! (box-contract.md §10), with Box's codes and messages.

use crate::common;

use std::sync::Arc;

use box_token_broker::{
    boxapi::{
        BoxId, BoxSubject, JwtAlgorithm, SigningKey,
        assertion::{self, Claims},
    },
    clock::{ManualClock, unix_seconds},
    fakebox::{
        FakeAuth, FakeBox, FakeBoxServer, Fault,
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

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> (u16, Value, reqwest::header::HeaderMap) {
        let response = self
            .http
            .post(format!("{}{path}", self.server.base_url()))
            .form(form)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body, headers)
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
    let secret = f.app.client_secret.expose_secret().to_owned();
    f.post(
        "/oauth2/revoke",
        &[
            ("client_id", &f.app.client_id),
            ("client_secret", &secret),
            ("token", &parent),
        ],
    )
    .await;
    let (status, body) = f.exchange(&parent, "item_preview", &[]).await;
    assert_rejected(status, &body, "invalid_grant", "subject token");
}
