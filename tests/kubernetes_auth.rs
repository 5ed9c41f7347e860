//! Kubernetes projected service-account tokens as caller identity.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use box_token_broker::{auth::kubernetes::KubernetesConfig, pb, policy::Policy};
use common::{Harness, Options, assert_status, enterprise, fixture, fixture_key, fixture_passphrase};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::{RsaPrivateKey, pkcs1::EncodeRsaPrivateKey as _, traits::PublicKeyParts as _};
use tonic::{Code, metadata::MetadataValue};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "box-token-broker";
const KID: &str = "k8s-key-1";
const PORTAL: &str = "system:serviceaccount:portal:web";

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn jwks(key: &RsaPrivateKey) -> String {
    let b64 = |bytes: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    serde_json::json!({"keys": [{
        "kty": "RSA", "use": "sig", "alg": "RS256", "kid": KID,
        "n": b64(key.n().to_bytes_be()), "e": b64(key.e().to_bytes_be()),
    }]})
    .to_string()
}

fn service_account_token(key: &RsaPrivateKey, kid: &str, claims: serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    let der = key.to_pkcs1_der().unwrap();
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_der(der.as_bytes())).unwrap()
}

fn claims(sub: &str) -> serde_json::Value {
    serde_json::json!({
        "iss": ISSUER, "aud": [AUDIENCE], "sub": sub,
        "exp": now() + 600, "iat": now(), "nbf": now(),
        "kubernetes.io": {"namespace": "portal", "serviceaccount": {"name": "web", "uid": "0"}},
    })
}

async fn harness(dir: &tempfile::TempDir) -> Harness {
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&fixture_key())).unwrap();
    let policy = Policy::parse(
        "[[rules]]\nname = \"portal pods\"\ncallers = [\"system:serviceaccount:portal:*\"]\nenterprise = true\nfull_tokens = true\n",
        "test policy",
    )
    .unwrap();
    Harness::with(Options {
        policy: Some(policy),
        allow_anonymous: false,
        kubernetes: Some(KubernetesConfig {
            jwks_file,
            issuer: ISSUER.to_owned(),
            audience: AUDIENCE.to_owned(),
        }),
        ..Options::default()
    })
    .await
}

async fn get_with_bearer(h: &Harness, bearer: &str) -> Result<pb::GetTokenResponse, tonic::Status> {
    let mut request = tonic::Request::new(enterprise());
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {bearer}")).unwrap(),
    );
    h.client
        .clone()
        .get_token(request)
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_valid_service_account_token_is_the_callers_identity() {
    let dir = tempfile::tempdir().unwrap();
    let h = harness(&dir).await;
    get_with_bearer(&h, &service_account_token(&fixture_key(), KID, claims(PORTAL)))
        .await
        .unwrap();
    let events = h.audit_events();
    assert_eq!(events[0]["caller"], PORTAL);
    assert_eq!(events[0]["rule"], "portal pods");
}

#[tokio::test]
async fn a_service_account_outside_the_policy_is_denied() {
    let dir = tempfile::tempdir().unwrap();
    let h = harness(&dir).await;
    let token = service_account_token(&fixture_key(), KID, claims("system:serviceaccount:billing:job"));
    assert_status(
        &get_with_bearer(&h, &token).await.unwrap_err(),
        Code::PermissionDenied,
        "system:serviceaccount:billing:job",
    );
}

#[tokio::test]
async fn bad_service_account_tokens_are_unauthenticated_and_not_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let h = harness(&dir).await;
    let other = box_token_broker::boxapi::private_key::decode_private_key(
        &std::fs::read_to_string(fixture("rsa3072_aes128.pem")).unwrap(),
        Some(&fixture_passphrase()),
    )
    .unwrap();
    let key = fixture_key();
    let mut expired = claims(PORTAL);
    expired["exp"] = serde_json::json!(now() - 3600);
    let mut wrong_audience = claims(PORTAL);
    wrong_audience["aud"] = serde_json::json!(["kubernetes"]);
    let mut wrong_issuer = claims(PORTAL);
    wrong_issuer["iss"] = serde_json::json!("https://evil.example");
    let cases = [
        (
            service_account_token(&other, KID, claims(PORTAL)),
            "its signature does not verify",
        ),
        (service_account_token(&key, KID, expired), "it has expired"),
        (
            service_account_token(&key, KID, wrong_audience),
            "its audience is not the configured one",
        ),
        (
            service_account_token(&key, KID, wrong_issuer),
            "its issuer is not the configured one",
        ),
        (
            service_account_token(&key, "rotated-away", claims(PORTAL)),
            "a key the cluster's JWKS does not hold",
        ),
        (
            service_account_token(&key, KID, claims("alice")),
            "not a service-account token",
        ),
        ("not.a.jwt".to_owned(), "not a JWT"),
    ];
    for (token, fragment) in cases {
        let status = get_with_bearer(&h, &token).await.unwrap_err();
        assert_status(&status, Code::Unauthenticated, fragment);
        assert!(!status.message().contains(&token));
    }
    assert_eq!(h.fake.stats().token_requests, 0);
}

#[tokio::test]
async fn bearer_tokens_are_refused_where_kubernetes_auth_is_not_configured() {
    let h = Harness::with(Options {
        allow_anonymous: false,
        ..Options::default()
    })
    .await;
    let token = service_account_token(&fixture_key(), KID, claims(PORTAL));
    assert_status(
        &get_with_bearer(&h, &token).await.unwrap_err(),
        Code::Unauthenticated,
        "no [auth.kubernetes] is configured",
    );
}
