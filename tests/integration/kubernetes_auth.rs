//! Kubernetes projected service-account tokens as caller identity.

use crate::common;

use std::{sync::Arc, time::UNIX_EPOCH};

use base64::Engine as _;
use box_token_broker::{
    auth::kubernetes::{KubernetesAuth, KubernetesConfig},
    pb,
    policy::Policy,
};
use common::{Harness, Options, assert_status, enterprise, fixture, fixture_key, fixture_passphrase};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::{RsaPrivateKey, pkcs1::EncodeRsaPrivateKey as _, traits::PublicKeyParts as _};
use tonic::{Code, metadata::MetadataValue};

pub(crate) const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub(crate) const AUDIENCE: &str = "box-token-broker";
pub(crate) const KID: &str = "k8s-key-1";
const PORTAL: &str = "system:serviceaccount:portal:web";

pub(crate) fn now() -> i64 {
    box_token_broker::clock::system_now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub(crate) fn jwks(key: &RsaPrivateKey) -> String {
    jwks_of(&[(key, KID)])
}

fn jwks_of(keys: &[(&RsaPrivateKey, &str)]) -> String {
    let b64 = |bytes: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let keys: Vec<_> = keys
        .iter()
        .map(|(key, kid)| {
            serde_json::json!({
                "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                "n": b64(key.n().to_bytes_be()), "e": b64(key.e().to_bytes_be()),
            })
        })
        .collect();
    serde_json::json!({ "keys": keys }).to_string()
}

pub(crate) fn service_account_token(key: &RsaPrivateKey, kid: &str, claims: serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    let der = key.to_pkcs1_der().unwrap();
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_der(der.as_bytes())).unwrap()
}

pub(crate) fn claims(sub: &str) -> serde_json::Value {
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
            jwks_file: Some(jwks_file),
            issuer: ISSUER.to_owned(),
            audience: AUDIENCE.to_owned(),
            ..KubernetesConfig::default()
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
        "bearer tokens are not accepted on this listener",
    );
}

/// A stand-in for the API server's issuer discovery: the discovery document
/// and the JWKS, both only for a caller presenting `READER_TOKEN`.
struct Cluster {
    addr: std::net::SocketAddr,
    jwks: std::sync::Mutex<String>,
    issuer: String,
    jwks_fetches: std::sync::atomic::AtomicUsize,
}

const READER_TOKEN: &str = "broker-reader-token";

async fn cluster(jwks: String, issuer: &str) -> Arc<Cluster> {
    use axum::{extract::State, http::HeaderMap, http::StatusCode, routing::get};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cluster = Arc::new(Cluster {
        addr: listener.local_addr().unwrap(),
        jwks: std::sync::Mutex::new(jwks),
        issuer: issuer.to_owned(),
        jwks_fetches: std::sync::atomic::AtomicUsize::new(0),
    });
    let authorized = |headers: &HeaderMap| {
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {READER_TOKEN}"))
    };
    let app = axum::Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(move |State(c): State<Arc<Cluster>>, headers: HeaderMap| async move {
                if !authorized(&headers) {
                    return Err(StatusCode::UNAUTHORIZED);
                }
                Ok(serde_json::json!({
                    "issuer": c.issuer,
                    "jwks_uri": format!("http://{}/openid/v1/jwks", c.addr),
                    "response_types_supported": ["id_token"],
                })
                .to_string())
            }),
        )
        .route(
            "/openid/v1/jwks",
            get(move |State(c): State<Arc<Cluster>>, headers: HeaderMap| async move {
                if !authorized(&headers) {
                    return Err(StatusCode::UNAUTHORIZED);
                }
                c.jwks_fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(c.jwks.lock().unwrap().clone())
            }),
        )
        .with_state(cluster.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    cluster
}

fn discovery_config(cluster: &Cluster, dir: &tempfile::TempDir) -> KubernetesConfig {
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{READER_TOKEN}\n")).unwrap();
    KubernetesConfig {
        discovery_url: Some(format!("http://{}/.well-known/openid-configuration", cluster.addr)),
        token_file: Some(token_file),
        issuer: ISSUER.to_owned(),
        audience: AUDIENCE.to_owned(),
        ..KubernetesConfig::default()
    }
}

fn fetches(cluster: &Cluster) -> usize {
    cluster.jwks_fetches.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test]
async fn keys_come_from_the_issuers_discovery_document_and_follow_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let key = fixture_key();
    let cluster = cluster(jwks(&key), ISSUER).await;
    let auth = KubernetesAuth::new(discovery_config(&cluster, &dir)).await.unwrap();
    assert_eq!(fetches(&cluster), 1, "the keys are fetched once at startup");
    let token = service_account_token(&key, KID, claims(PORTAL));
    assert_eq!(&*auth.verify(&token).await.unwrap(), PORTAL);
    assert_eq!(fetches(&cluster), 1, "known keys are not fetched again");

    // The cluster rotates to a second key: a token naming it makes one fetch.
    let rotated = other_key();
    *cluster.jwks.lock().unwrap() = jwks_of(&[(&key, KID), (&rotated, "k8s-key-2")]);
    let new_token = service_account_token(&rotated, "k8s-key-2", claims(PORTAL));
    assert_eq!(&*auth.verify(&new_token).await.unwrap(), PORTAL);
    assert_eq!(fetches(&cluster), 2);

    // Unknown kids cannot make the broker hammer the API server: the reload
    // just made counts, so none of these fetches again.
    for _ in 0..5 {
        let unknown = service_account_token(&rotated, "never-published", claims(PORTAL));
        let err = auth.verify(&unknown).await.unwrap_err();
        assert!(err.0.contains("a key the cluster's JWKS does not hold"), "{err}");
    }
    assert_eq!(fetches(&cluster), 2, "reloads are rate-limited");
}

#[tokio::test]
async fn a_verified_token_is_remembered_and_a_refused_one_is_checked_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let key = fixture_key();
    let cluster = cluster(jwks(&key), ISSUER).await;
    let auth = KubernetesAuth::new(discovery_config(&cluster, &dir)).await.unwrap();
    let token = service_account_token(&key, KID, claims(PORTAL));
    for _ in 0..50 {
        assert_eq!(&*auth.verify(&token).await.unwrap(), PORTAL);
    }
    assert_eq!(auth.signature_checks(), 1, "the same token is verified once");

    let mut other_claims = claims(PORTAL);
    other_claims["exp"] = serde_json::json!(now() + 1800);
    let other = service_account_token(&key, KID, other_claims);
    assert_eq!(&*auth.verify(&other).await.unwrap(), PORTAL);
    assert_eq!(auth.signature_checks(), 2, "another token is verified on its own");

    let mut expired = claims(PORTAL);
    expired["exp"] = serde_json::json!(now() - 3600);
    let expired = service_account_token(&key, KID, expired);
    for _ in 0..3 {
        let err = auth.verify(&expired).await.unwrap_err();
        assert!(err.0.contains("it has expired"), "{err}");
    }
    assert_eq!(auth.signature_checks(), 5, "a refused token is never remembered");
}

#[tokio::test]
async fn a_discovery_document_for_another_issuer_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster(jwks(&fixture_key()), "https://evil.example").await;
    let err = KubernetesAuth::new(discovery_config(&cluster, &dir)).await.unwrap_err();
    assert!(
        err.contains("the discovery document's issuer \"https://evil.example\" is not the configured issuer"),
        "{err}"
    );
    assert_eq!(fetches(&cluster), 0);
}

#[tokio::test]
async fn an_unreachable_or_unauthorized_key_source_stops_startup_naming_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster(jwks(&fixture_key()), ISSUER).await;
    let mut config = discovery_config(&cluster, &dir);
    std::fs::write(config.token_file.as_ref().unwrap(), "someone-else").unwrap();
    let err = KubernetesAuth::new(config.clone()).await.unwrap_err();
    assert!(
        err.ends_with("openid-configuration: answered HTTP 401 Unauthorized"),
        "{err}"
    );
    assert!(!err.contains("someone-else"), "{err}");

    config.discovery_url = None;
    config.jwks_url = Some("http://127.0.0.1:1/openid/v1/jwks".to_owned());
    let err = KubernetesAuth::new(config.clone()).await.unwrap_err();
    assert!(
        err.starts_with("http://127.0.0.1:1/openid/v1/jwks: cannot fetch"),
        "{err}"
    );

    config.jwks_file = Some(dir.path().join("jwks.json"));
    let err = KubernetesAuth::new(config).await.unwrap_err();
    assert_eq!(
        err,
        "auth.kubernetes: set exactly one of jwks_file, jwks_url and discovery_url"
    );
}

#[tokio::test]
async fn a_ca_file_that_is_not_pem_stops_startup_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, "not a certificate").unwrap();
    let config = KubernetesConfig {
        jwks_url: Some("https://kubernetes.default.svc/openid/v1/jwks".to_owned()),
        ca_file: Some(ca_file.clone()),
        issuer: ISSUER.to_owned(),
        audience: AUDIENCE.to_owned(),
        ..KubernetesConfig::default()
    };
    let err = KubernetesAuth::new(config).await.unwrap_err();
    assert_eq!(err, format!("{}: not a PEM certificate bundle", ca_file.display()));
}

fn other_key() -> RsaPrivateKey {
    box_token_broker::boxapi::private_key::decode_private_key(
        &std::fs::read_to_string(fixture("rsa3072_aes128.pem")).unwrap(),
        Some(&fixture_passphrase()),
    )
    .unwrap()
}

/// A token signed by `key` whose header also says `"crit": ["x-ext"]`.
fn token_with_critical_extension(key: &RsaPrivateKey) -> String {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = serde_json::json!({"alg": "RS256", "kid": KID, "typ": "JWT", "crit": ["x-ext"], "x-ext": 1});
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims(PORTAL).to_string().as_bytes())
    );
    let der = key.to_pkcs1_der().unwrap();
    let signature = jsonwebtoken::crypto::sign(
        signing_input.as_bytes(),
        &EncodingKey::from_rsa_der(der.as_bytes()),
        Algorithm::RS256,
    )
    .unwrap();
    format!("{signing_input}.{signature}")
}

#[tokio::test]
async fn tokens_the_api_server_would_refuse_are_refused_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let h = harness(&dir).await;
    let key = fixture_key();
    let mut not_yet = claims(PORTAL);
    not_yet["nbf"] = serde_json::json!(now() + 3600);
    let mut no_exp = claims(PORTAL);
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut no_sub = claims(PORTAL);
    no_sub.as_object_mut().unwrap().remove("sub");
    let cases = [
        (
            service_account_token(&key, KID, not_yet),
            "it is not valid yet (its nbf is in the future)",
        ),
        (service_account_token(&key, KID, no_exp), "it has no exp claim"),
        (service_account_token(&key, KID, no_sub), "it has no sub claim"),
        (
            token_with_critical_extension(&key),
            "its header marks extensions as critical (crit)",
        ),
    ];
    for (token, fragment) in cases {
        assert_status(
            &get_with_bearer(&h, &token).await.unwrap_err(),
            Code::Unauthenticated,
            fragment,
        );
    }
    assert_eq!(h.fake.stats().token_requests, 0);
    // The same token without those faults is accepted.
    get_with_bearer(&h, &service_account_token(&key, KID, claims(PORTAL)))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_clusters_keys_are_fetched_over_https_or_from_this_host_only() {
    let config = |jwks_url: Option<&str>, discovery_url: Option<&str>| KubernetesConfig {
        jwks_url: jwks_url.map(str::to_owned),
        discovery_url: discovery_url.map(str::to_owned),
        issuer: ISSUER.to_owned(),
        audience: AUDIENCE.to_owned(),
        ..KubernetesConfig::default()
    };
    for (jwks, discovery) in [
        (Some("http://10.96.0.1/openid/v1/jwks"), None),
        (
            None,
            Some("http://kubernetes.default.svc/.well-known/openid-configuration"),
        ),
    ] {
        let err = KubernetesAuth::new(config(jwks, discovery)).await.unwrap_err();
        assert!(
            err.contains("is plain http: the cluster's keys must come over https"),
            "{err}"
        );
    }
    let err = KubernetesAuth::new(config(Some("ftp://example/jwks"), None))
        .await
        .unwrap_err();
    assert!(err.contains("is not an https URL"), "{err}");
    // Plain http to this host (kubectl proxy) is allowed: this fails only at the fetch.
    let err = KubernetesAuth::new(config(Some("http://127.0.0.1:1/openid/v1/jwks"), None))
        .await
        .unwrap_err();
    assert!(err.contains("cannot fetch"), "{err}");
}

#[tokio::test]
async fn a_peer_that_keeps_failing_gets_no_signature_checks_for_a_while() {
    let dir = tempfile::tempdir().unwrap();
    let h = harness(&dir).await;
    let key = fixture_key();
    // A token verified before the failures starts: remembered, so it goes on working.
    let known = service_account_token(&key, KID, claims(PORTAL));
    get_with_bearer(&h, &known).await.unwrap();
    let forged = service_account_token(&other_key(), KID, claims(PORTAL));
    for _ in 0..20 {
        let status = get_with_bearer(&h, &forged).await.unwrap_err();
        assert_status(&status, Code::Unauthenticated, "its signature does not verify");
    }
    // Past the burst, a token that would need a signature check is not checked...
    let mut other = claims(PORTAL);
    other["exp"] = serde_json::json!(now() + 900);
    let fresh = service_account_token(&key, KID, other);
    let throttled = get_with_bearer(&h, &fresh).await.unwrap_err();
    assert_status(
        &throttled,
        Code::Unauthenticated,
        "too many failed authentications from 127.0.0.1: tokens that need a signature check are not verified for now",
    );
    assert!(throttled.metadata().get("grpc-retry-pushback-ms").is_some());
    // ...a remembered one still works...
    get_with_bearer(&h, &known).await.unwrap();
    // ...and another address is not affected.
    let elsewhere = tonic::transport::Endpoint::from_shared(format!("http://{}", h.addr))
        .unwrap()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .connect()
        .await
        .unwrap();
    let mut request = tonic::Request::new(enterprise());
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {fresh}")).unwrap(),
    );
    pb::token_broker_service_client::TokenBrokerServiceClient::new(elsewhere)
        .get_token(request)
        .await
        .unwrap();
}
