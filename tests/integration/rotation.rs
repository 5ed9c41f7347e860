//! Key and client-secret rotation through the admin RPC: under load with no
//! failed call, trial mints that change nothing when Box refuses, the
//! standby fallback and its alert, the admin listener's own authentication,
//! and no secret in any response, log line, audit record or `Debug`.

use crate::common;

use std::sync::Arc;

use box_token_broker::pb::{self, KeyState, broker_admin_service_client::BrokerAdminServiceClient};
use common::{ADMIN_KEY, Harness, Options, admin_request, assert_status, enterprise, fixture, log_text, user};
use secrecy::ExposeSecret as _;
use tonic::{Code, transport::Channel};

async fn harness() -> Harness {
    common::observed();
    Harness::with(Options {
        admin: true,
        // Every forced request mints: these tests watch which key each mint uses.
        cache: box_token_broker::cache::CachePolicy {
            force_refresh_interval: std::time::Duration::ZERO,
            ..Default::default()
        },
        ..Options::default()
    })
    .await
}

fn admin(h: &Harness) -> BrokerAdminServiceClient<Channel> {
    h.admin.as_ref().unwrap().client.clone()
}

/// GenerateKey; returns (fingerprint, public key PEM).
async fn generate(h: &Harness) -> (String, String) {
    let generated = common::generate_key(h).await;
    (generated.key.unwrap().fingerprint, generated.public_key_pem)
}

async fn activate(h: &Harness, kid: &str, fingerprint: &str) -> Result<pb::ActivateKeyResponse, tonic::Status> {
    admin(h)
        .activate_key(admin_request(pb::ActivateKeyRequest {
            app: String::new(),
            kid: kid.to_owned(),
            fingerprint: fingerprint.to_owned(),
        }))
        .await
        .map(tonic::Response::into_inner)
}

async fn list(h: &Harness) -> Vec<pb::KeyInfo> {
    admin(h)
        .list_keys(admin_request(pb::ListKeysRequest { app: String::new() }))
        .await
        .unwrap()
        .into_inner()
        .keys
}

/// The whole procedure once: generate, upload to Box, activate, and remove
/// old keys from Box — the retired one, or with `aggressive` (Box's
/// documented "add the new key, remove the old one") the previous active key
/// too, at once. Returns the new kid.
async fn rotate(h: &Harness, aggressive: bool) -> String {
    let (fingerprint, pem) = generate(h).await;
    let kid = h.fake.add_public_key(&h.app.client_id, &pem).unwrap();
    let activated = activate(h, &kid, &fingerprint).await.unwrap();
    assert_eq!(activated.active.as_ref().unwrap().kid, kid);
    for key in list(h).await {
        let old = key.state() == KeyState::Retired || (aggressive && key.state() == KeyState::Standby);
        if old && !key.kid.is_empty() {
            h.fake.remove_public_key(&h.app.client_id, &key.kid);
        }
    }
    kid
}

async fn forced(h: &Harness) -> Result<pb::GetTokenResponse, tonic::Status> {
    let mut request = enterprise();
    request.force_refresh = true;
    h.get(request).await
}

fn last_kid(h: &Harness) -> String {
    h.fake.accepted_assertions().last().unwrap().kid.clone().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_rotations_under_load_fail_no_call() {
    let h = Arc::new(harness().await);
    // Box takes a moment to answer, so mints are in flight when keys change.
    h.fake.set_latency(std::time::Duration::from_millis(20));
    // Each worker makes at least 1000 calls and keeps going until the last
    // rotation is done, so every rotation happens under load.
    let rotating = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut workers = Vec::new();
    for worker in 0..8 {
        let h = h.clone();
        let rotating = rotating.clone();
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut i = 0;
            while i < 1000 || rotating.load(std::sync::atomic::Ordering::SeqCst) {
                i += 1;
                let mut request = if i % 2 == 0 {
                    enterprise()
                } else {
                    user(box_token_broker::fakebox::seed::APP_USER_IDS[worker % 3])
                };
                // A share of the calls mint for real, so rotations race real mints.
                request.force_refresh = i % 10 == worker % 10;
                if let Err(status) = h.get(request).await {
                    failures.push(status);
                }
            }
            (failures, i)
        }));
    }
    let mut kids = Vec::new();
    for _ in 0..10 {
        // Mints under way with the previous key fail at Box and are retried
        // with the key active now.
        kids.push(rotate(&h, true).await);
    }
    rotating.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut failures = Vec::new();
    for worker in workers {
        let (failed, calls) = worker.await.unwrap();
        assert!(calls >= 1000);
        failures.extend(failed);
    }
    assert!(
        failures.is_empty(),
        "{} calls failed, e.g. {:?}",
        failures.len(),
        failures.first()
    );

    let keys = list(&h).await;
    assert_eq!(keys.len(), 11, "the config's key and ten generated keys");
    let state = |s| keys.iter().filter(|k| k.state() == s).count();
    assert_eq!(
        (
            state(KeyState::Active),
            state(KeyState::Standby),
            state(KeyState::Retired)
        ),
        (1, 1, 9)
    );
    assert_eq!(
        keys.iter().find(|k| k.state() == KeyState::Active).unwrap().kid,
        kids[9]
    );
    // Mints after the last rotation sign with the newest key.
    h.fake.set_latency(std::time::Duration::ZERO);
    forced(&h).await.unwrap();
    assert_eq!(last_kid(&h), kids[9]);
    assert!(
        keys.iter()
            .filter(|k| k.origin == "generated")
            .all(|k| k.last_used_at.is_some()),
        "Box accepted every key, at least in its trial mint"
    );
    assert!(h.fake.stats().token_requests > 100, "calls really minted");
}

#[tokio::test]
async fn a_failed_trial_mint_leaves_the_old_key_active_and_in_use() {
    let h = harness().await;
    let (fingerprint, _pem) = generate(&h).await;
    // Not uploaded to Box: Box does not know the kid.
    let refused = activate(&h, "notuploaded1", &fingerprint).await.unwrap_err();
    assert_status(
        &refused,
        Code::FailedPrecondition,
        "the trial mint with key notuploaded1 failed, so nothing changed",
    );
    assert!(
        refused.message().ends_with("Box refused: Box does not know public key id notuploaded1: upload the public key in the developer console or fix publicKeyID"),
        "Box's reason is carried: {}",
        refused.message()
    );

    let keys = list(&h).await;
    let active = keys.iter().find(|k| k.state() == KeyState::Active).unwrap();
    assert_eq!(active.kid, h.app.kid);
    let pending = keys.iter().find(|k| k.fingerprint == fingerprint).unwrap();
    assert_eq!((pending.state(), pending.kid.as_str()), (KeyState::Pending, ""));
    forced(&h).await.unwrap();
    assert_eq!(last_kid(&h), h.app.kid, "the old key still signs");

    // Uploaded under one kid but activated under another: refused too.
    let (fingerprint, pem) = generate(&h).await;
    let kid = h.fake.add_public_key(&h.app.client_id, &pem).unwrap();
    let wrong = format!("{kid}x");
    assert_eq!(
        activate(&h, &wrong, &fingerprint).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(activate(&h, &kid, &fingerprint).await.unwrap().active.unwrap().kid, kid);
}

#[tokio::test]
async fn when_box_stops_accepting_the_active_key_the_standby_mints_and_an_alert_is_raised() {
    let h = harness().await;
    let old_kid = h.app.kid.clone();
    let new_kid = rotate(&h, false).await;
    forced(&h).await.unwrap();
    assert_eq!(last_kid(&h), new_kid);

    // Someone removes the new key in the Box console.
    assert!(h.fake.remove_public_key(&h.app.client_id, &new_kid));
    let served = forced(&h).await.unwrap();
    assert!(!common::token_of(&served).is_empty());
    assert_eq!(last_kid(&h), old_kid, "the standby minted");

    let status = admin(&h)
        .get_status(admin_request(pb::GetStatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.apps[0].standby_fallbacks, 1, "the metric counts the fallback");
    assert_eq!(
        status.apps[0].active_key.as_ref().unwrap().kid,
        new_kid,
        "nothing switched by itself"
    );
    let logs = log_text();
    assert!(
        logs.lines()
            .any(|l| l.contains("ALERT: Box rejected the active signing key")
                && l.contains("standby_key_used")
                && l.contains(&new_kid)
                && l.contains(&old_kid)),
        "the alert names both keys"
    );
}

#[tokio::test]
async fn rotating_the_client_secret_checks_it_and_keeps_the_previous_one_as_fallback() {
    let h = harness().await;
    let rotate_secret = |secret: &str| {
        let mut client = admin(&h);
        let request = admin_request(pb::RotateClientSecretRequest {
            app: String::new(),
            new_secret: secret.to_owned(),
        });
        async move {
            client
                .rotate_client_secret(request)
                .await
                .map(tonic::Response::into_inner)
        }
    };
    // Not yet changed at Box: the trial mint fails and nothing changes.
    let refused = rotate_secret("new-secret-not-at-box-yet").await.unwrap_err();
    assert_status(
        &refused,
        Code::FailedPrecondition,
        "the trial mint with the new client secret failed",
    );
    assert!(!refused.message().contains("new-secret-not-at-box-yet"));
    forced(&h).await.unwrap();

    h.fake.set_client_secret(&h.app.client_id, "second-client-secret-0002");
    assert_eq!(
        rotate_secret("second-client-secret-0002")
            .await
            .unwrap()
            .fallback_secrets,
        1
    );
    forced(&h).await.unwrap();

    // Box goes back to the old secret: the fallback still mints, loudly.
    let old = h.app.client_secret.expose_secret().to_owned();
    h.fake.set_client_secret(&h.app.client_id, &old);
    forced(&h).await.unwrap();
    assert!(log_text().contains("previous_client_secret_used"));

    // Retired, the fallback is gone.
    let retired = admin(&h)
        .retire_client_secrets(admin_request(pb::RetireClientSecretsRequest { app: String::new() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retired.retired, 1);
    assert_eq!(forced(&h).await.unwrap_err().code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn the_admin_service_is_not_on_the_client_listener_and_needs_admin_credentials() {
    let h = harness().await;
    // The client listener does not serve it at all, and says where it is.
    let on_client = BrokerAdminServiceClient::new(h.channel.clone())
        .get_status(admin_request(pb::GetStatusRequest {}))
        .await
        .unwrap_err();
    assert_status(
        &on_client,
        Code::Unimplemented,
        "call it on the admin listener ([server] admin_listen",
    );
    // The admin listener wants an admin key.
    let none = admin(&h)
        .get_status(tonic::Request::new(pb::GetStatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(pb::GetStatusRequest {});
    wrong
        .metadata_mut()
        .insert("x-api-key", "admin-key-guess".parse().unwrap());
    let wrong = admin(&h).get_status(wrong).await.unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert!(!wrong.message().contains("admin-key-guess"));
    // Nor does it serve the client API.
    let mut client = pb::token_broker_service_client::TokenBrokerServiceClient::new(
        Channel::from_shared(format!("http://{}", h.admin.as_ref().unwrap().addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    assert_status(
        &client.get_token(enterprise()).await.unwrap_err(),
        Code::Unimplemented,
        "call it on the client listener ([server] listen",
    );
    // Every admin decision is audited, the call on the wrong listener too.
    let events = h.audit_events();
    let admin_events: Vec<_> = events.iter().filter(|e| e["rpc"] == "GetStatus").collect();
    assert_eq!(admin_events.len(), 3);
    assert!(admin_events.iter().all(|e| e["caller"] == "unauthenticated"));
    assert_eq!(admin_events.iter().filter(|e| e["decision"] == "deny").count(), 2);
}

#[tokio::test]
async fn retiring_the_active_key_is_refused_and_keys_are_listed_without_private_material() {
    let h = harness().await;
    let refused = admin(&h)
        .retire_key(admin_request(pb::RetireKeyRequest {
            app: String::new(),
            kid_or_fingerprint: h.app.kid.clone(),
        }))
        .await
        .unwrap_err();
    assert_status(&refused, Code::FailedPrecondition, "the active key cannot be retired");
    let (fingerprint, _) = generate(&h).await;
    let retired = admin(&h)
        .retire_key(admin_request(pb::RetireKeyRequest {
            app: String::new(),
            kid_or_fingerprint: fingerprint.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retired.key.unwrap().state(), KeyState::Retired);
    let keys = list(&h).await;
    assert_eq!(keys.len(), 2);
    let config_key = keys.iter().find(|k| k.kid == h.app.kid).unwrap();
    assert_eq!(
        (
            config_key.origin.as_str(),
            config_key.bits,
            config_key.algorithm.as_str()
        ),
        ("config", 2048, "RS256")
    );
    assert!(format!("{keys:?}").len() < 2000, "no key material in the listing");
}

#[tokio::test]
async fn imported_keys_and_new_secrets_never_appear_in_responses_logs_audit_debug_or_the_store_file() {
    let h = harness().await;
    let pem = std::fs::read_to_string(fixture("rsa3072_aes128.pem")).unwrap();
    let passphrase = common::fixture_passphrase().expose_secret().to_owned();
    let key =
        box_token_broker::boxapi::private_key::decode_private_key(&pem, Some(&common::fixture_passphrase())).unwrap();
    let public = {
        use rsa::pkcs8::{EncodePublicKey as _, LineEnding};
        key.to_public_key().to_public_key_pem(LineEnding::LF).unwrap()
    };
    let kid = h.fake.add_public_key(&h.app.client_id, &public).unwrap();
    let request = pb::ImportKeyRequest {
        app: String::new(),
        private_key_pem: pem.clone(),
        passphrase: passphrase.clone(),
        kid: kid.clone(),
    };
    let debug_of_request = format!("{request:?}");
    let imported = admin(&h).import_key(admin_request(request)).await.unwrap().into_inner();
    let activated = activate(&h, &kid, "").await.unwrap();
    let secret_request = pb::RotateClientSecretRequest {
        app: String::new(),
        new_secret: "imported-test-secret-0003".to_owned(),
    };
    let debug_of_secret = format!("{secret_request:?}");
    h.fake.set_client_secret(&h.app.client_id, "imported-test-secret-0003");
    admin(&h)
        .rotate_client_secret(admin_request(secret_request))
        .await
        .unwrap();
    let wrong = admin(&h)
        .import_key(admin_request(pb::ImportKeyRequest {
            app: String::new(),
            private_key_pem: pem.clone(),
            passphrase: "wrong-passphrase-4".to_owned(),
            kid: "other".to_owned(),
        }))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument);

    let mut secrets: Vec<String> = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::to_owned)
        .collect();
    secrets.extend([
        passphrase,
        "imported-test-secret-0003".to_owned(),
        "wrong-passphrase-4".to_owned(),
        ADMIN_KEY.to_owned(),
    ]);
    secrets.push(h.app.client_secret.expose_secret().to_owned());
    let side = h.admin.as_ref().unwrap();
    let store_file = std::fs::read_to_string(&side.store_path).unwrap();
    let everything = format!(
        "{imported:?}\n{activated:?}\n{}\n{debug_of_request}\n{debug_of_secret}\n{:?}\n{:?}\n{}\n{store_file}\n{}",
        wrong.message(),
        h.broker.apps().next().unwrap().ring(),
        side.key_admin,
        String::from_utf8(h.audit.lock().unwrap().clone()).unwrap(),
        log_text(),
    );
    for secret in &secrets {
        assert!(
            !everything.contains(secret.as_str()),
            "a secret ({} chars) leaked",
            secret.len()
        );
    }
    assert!(store_file.contains("\"ciphertext\""), "the store is encrypted at rest");
}

#[tokio::test]
async fn invalidate_tokens_drops_a_subjects_an_apps_or_all_cached_tokens() {
    let h = harness().await;
    let app_user = box_token_broker::fakebox::seed::APP_USER_IDS[0];
    h.get(enterprise()).await.unwrap();
    h.get(user(app_user)).await.unwrap();
    let invalidate = |app: &str, subject: Option<pb::Subject>| {
        let mut client = admin(&h);
        let request = admin_request(pb::InvalidateTokensRequest {
            app: app.to_owned(),
            subject,
        });
        async move {
            client
                .invalidate_tokens(request)
                .await
                .unwrap()
                .into_inner()
                .invalidated
        }
    };
    let subject = pb::Subject {
        kind: Some(pb::subject::Kind::UserId(app_user.to_owned())),
        create_if_missing: None,
    };
    assert_eq!(invalidate("", Some(subject)).await, 1, "one subject, in the only app");
    assert!(!h.get(user(app_user)).await.unwrap().cache_hit, "minted again");
    assert!(h.get(enterprise()).await.unwrap().cache_hit, "others stay cached");
    assert_eq!(invalidate("default", None).await, 2, "the app's tokens");
    h.get(enterprise()).await.unwrap();
    assert_eq!(invalidate("", None).await, 1, "everything");
    assert!(!h.get(enterprise()).await.unwrap().cache_hit);
    let unknown = admin(&h)
        .invalidate_tokens(admin_request(pb::InvalidateTokensRequest {
            app: "nope".to_owned(),
            subject: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

async fn status(h: &Harness) -> pb::AppStatus {
    admin(h)
        .get_status(admin_request(pb::GetStatusRequest {}))
        .await
        .unwrap()
        .into_inner()
        .apps
        .remove(0)
}

#[tokio::test]
async fn status_counts_a_trial_mint_as_success_and_a_callers_unknown_user_as_no_failure() {
    let h = harness().await;
    assert!(status(&h).await.last_upstream_success_at.is_none());
    // A rotation's trial mint is the only call to Box: it succeeded.
    rotate(&h, false).await;
    let after_rotation = status(&h).await;
    assert!(after_rotation.last_upstream_success_at.is_some(), "{after_rotation:?}");
    // A caller asking for a user Box does not have is the caller's mistake,
    // not Box failing the app.
    let refused = h.get(user("7999999")).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    let after_mistake = status(&h).await;
    assert!(after_mistake.last_upstream_failure_at.is_none(), "{after_mistake:?}");
    assert_eq!(after_mistake.last_upstream_failure, "");
    // Box failing is a failure.
    h.fake
        .fail_next(10, box_token_broker::fakebox::Fault::ServerError { status: 503 });
    assert!(forced(&h).await.is_err());
    let after_outage = status(&h).await;
    assert!(after_outage.last_upstream_failure_at.is_some(), "{after_outage:?}");
    assert!(after_outage.last_upstream_failure.contains("503"), "{after_outage:?}");
}

#[tokio::test]
async fn a_key_is_activated_and_retired_by_the_first_eight_digits_of_its_fingerprint() {
    let h = harness().await;
    let old_kid = h.app.kid.clone();
    let (fingerprint, pem) = generate(&h).await;
    let kid = h.fake.add_public_key(&h.app.client_id, &pem).unwrap();
    let short = activate(&h, &kid, &fingerprint[..4]).await.unwrap_err();
    assert_status(&short, Code::NotFound, "at least its first 8 hex digits");
    let activated = activate(&h, &kid, &fingerprint[..8]).await.unwrap();
    assert_eq!(activated.active.unwrap().fingerprint, fingerprint);
    // The previous key, now standby, retired by its fingerprint's first digits.
    let old = list(&h).await.into_iter().find(|k| k.kid == old_kid).unwrap();
    let retired = admin(&h)
        .retire_key(admin_request(pb::RetireKeyRequest {
            app: String::new(),
            kid_or_fingerprint: old.fingerprint[..10].to_owned(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retired.key.unwrap().kid, old_kid);
}
