//! Every Box token-endpoint error (box-contract.md §2.5, §2.6, §4, §8) maps
//! to its documented gRPC code, with a message that says what to fix.

use crate::common;

use std::collections::BTreeMap;

use box_token_broker::fakebox::{FakeAuth, Fault, seed};
use common::{Harness, Options, assert_status, enterprise, fixture, user};
use tonic::Code;

#[tokio::test]
async fn unauthorized_app_is_failed_precondition() {
    let h = Harness::start().await;
    h.fake.update_app(&h.app.client_id, |a| a.authorized = false);
    let status = h.get(enterprise()).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "not authorized in the Admin Console");
    assert!(status.message().contains(&h.app.client_id));
}

#[tokio::test]
async fn wrong_client_secret_is_failed_precondition() {
    let h = Harness::with(Options {
        client_secret: Some("not-the-secret"),
        ..Options::default()
    })
    .await;
    let status = h.get(enterprise()).await.unwrap_err();
    assert_status(
        &status,
        Code::FailedPrecondition,
        "rejected the app's client credentials",
    );
    assert!(!status.message().contains("not-the-secret"));
}

#[tokio::test]
async fn disabled_user_tokens_are_failed_precondition() {
    let h = Harness::start().await;
    h.fake.update_app(&h.app.client_id, |a| a.user_tokens = false);
    let status = h.get(user(seed::APP_USER_IDS[0])).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "Generate user access tokens");
    // The Service Account still works.
    h.get(enterprise()).await.unwrap();
}

#[tokio::test]
async fn managed_users_without_enterprise_access_are_failed_precondition() {
    let h = Harness::start().await;
    h.fake.update_app(&h.app.client_id, |a| a.enterprise_access = false);
    let status = h.get(user(seed::MANAGED_USER_ID)).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "App + Enterprise Access");
    h.get(user(seed::APP_USER_IDS[0])).await.unwrap();
}

#[tokio::test]
async fn unknown_kid_is_failed_precondition_naming_the_kid() {
    let h = Harness::start().await;
    let key = common::fixture_key().to_public_key();
    h.fake.update_app(&h.app.client_id, |a| {
        a.keys = BTreeMap::from([("otherkid".to_owned(), key)])
    });
    let status = h.get(enterprise()).await.unwrap_err();
    assert_status(
        &status,
        Code::FailedPrecondition,
        &format!("public key id {}", h.app.kid),
    );
}

#[tokio::test]
async fn a_key_that_does_not_match_is_failed_precondition() {
    let h = Harness::start().await;
    // The registered public key is the 3072-bit fixture's; the broker signs with another key.
    let other = box_token_broker::boxapi::private_key::decode_private_key(
        &std::fs::read_to_string(fixture("rsa3072_aes128.pem")).unwrap(),
        Some(&common::fixture_passphrase()),
    )
    .unwrap();
    let kid = h.app.kid.clone();
    h.fake.update_app(&h.app.client_id, |a| {
        a.keys = BTreeMap::from([(kid, other.to_public_key())])
    });
    let status = h.get(enterprise()).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "signature");
}

#[tokio::test]
async fn unknown_users_are_not_found_naming_the_user() {
    let h = Harness::start().await;
    let status = h.get(user("123456789")).await.unwrap_err();
    assert_status(&status, Code::NotFound, "user 123456789");
}

#[tokio::test]
async fn external_users_are_refused_as_another_enterprises() {
    let h = Harness::start().await;
    let status = h.get(user(seed::EXTERNAL_USER_ID)).await.unwrap_err();
    assert_status(&status, Code::PermissionDenied, seed::EXTERNAL_USER_ID);
    assert!(status.message().contains("enterprise 8000001"), "{status:?}");
    assert_eq!(
        h.fake.stats().jwt_requests,
        1,
        "only the Service Account's token: no user token was asked for"
    );
}

#[tokio::test]
async fn another_apps_app_user_is_not_found() {
    let h = Harness::start().await;
    let status = h.get(user(seed::OTHER_APP_USER_ID)).await.unwrap_err();
    assert_status(&status, Code::NotFound, seed::OTHER_APP_USER_ID);
}

#[tokio::test]
async fn a_wrong_enterprise_id_is_failed_precondition() {
    let h = Harness::with(Options {
        enterprise_id: Some("999"),
        ..Options::default()
    })
    .await;
    let status = h.get(enterprise()).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "enterprise 999");
}

#[tokio::test]
async fn an_app_set_up_for_another_grant_is_failed_precondition() {
    let h = Harness::start().await;
    h.fake.update_app(&h.app.client_id, |a| a.auth = FakeAuth::Ccg);
    let status = h.get(enterprise()).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "not set up for JWT");
}

#[tokio::test]
async fn rate_limiting_is_unavailable_with_a_retry_hint() {
    let h = Harness::start().await;
    // Waiting 7 s would pass the 5 s deadline: no retry, the hint goes to the caller.
    h.fake.fail_next(1, Fault::RateLimited { retry_after_secs: 7 });
    let status = h.get(enterprise()).await.unwrap_err();
    assert_status(&status, Code::Unavailable, "retry after 7 s");
    assert_eq!(status.metadata().get("grpc-retry-pushback-ms").unwrap(), "7000");
    assert_eq!(h.fake.stats().token_arrivals, 1);
}

#[tokio::test]
async fn server_errors_are_unavailable() {
    let h = Harness::start().await;
    for (i, status) in [500, 502, 503].into_iter().enumerate() {
        // Four attempts, all failing.
        h.fake.fail_next(4, Fault::ServerError { status });
        let s = h.get(enterprise()).await.unwrap_err();
        assert_status(&s, Code::Unavailable, &format!("HTTP {status}"));
        assert_eq!(h.fake.stats().token_arrivals, 4 * (i as u64 + 1));
    }
}

#[tokio::test]
async fn box_generic_error_shape_is_understood() {
    let h = Harness::start().await;
    // The user is checked with the Service Account's token: minted first, so the fault reaches the user's mint.
    h.get(enterprise()).await.unwrap();
    let body = r#"{"type":"error","status":400,"code":"invalid_grant","message":"Please check the 'sub' claim. The 'sub' specified is invalid.","request_id":"r1"}"#;
    h.fake.fail_next(
        1,
        Fault::Reply {
            status: 400,
            body: body.to_owned(),
        },
    );
    let status = h.get(user(seed::APP_USER_IDS[0])).await.unwrap_err();
    assert_status(&status, Code::NotFound, seed::APP_USER_IDS[0]);
}

#[tokio::test]
async fn a_jti_refused_twice_is_unavailable_so_callers_retry() {
    let h = Harness::start().await;
    let body = r#"{"error":"invalid_grant","error_description":"Please check the 'jti' claim. A unique 'jti' value is required."}"#;
    // The first refusal is retried at once with a fresh jti; a second is final.
    h.fake.fail_next(
        2,
        Fault::Reply {
            status: 400,
            body: body.to_owned(),
        },
    );
    assert_status(&h.get(enterprise()).await.unwrap_err(), Code::Unavailable, "jti");
    assert_eq!(h.fake.stats().token_arrivals, 2);
}

#[tokio::test]
async fn a_wrong_token_host_is_failed_precondition_about_the_base_url() {
    let h = Harness::start().await;
    let body = r#"{"error":"invalid_request","error_description":"Invalid grant_type parameter or parameter missing"}"#;
    h.fake.fail_next(
        1,
        Fault::Reply {
            status: 400,
            body: body.to_owned(),
        },
    );
    assert_status(
        &h.get(enterprise()).await.unwrap_err(),
        Code::FailedPrecondition,
        "api_base_url",
    );
}

#[tokio::test]
async fn a_success_without_a_token_is_unavailable_and_not_cached() {
    let h = Harness::start().await;
    h.fake.fail_next(
        1,
        Fault::Reply {
            status: 200,
            body: r#"{"expires_in": 3600}"#.to_owned(),
        },
    );
    assert_status(&h.get(enterprise()).await.unwrap_err(), Code::Unavailable, "cannot use");
    h.get(enterprise()).await.unwrap();
}

#[tokio::test]
async fn an_unreachable_box_is_unavailable() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let h = Harness::with(Options {
        api_base_url: Some(format!("http://127.0.0.1:{port}")),
        ..Options::default()
    })
    .await;
    assert_status(
        &h.get(enterprise()).await.unwrap_err(),
        Code::Unavailable,
        "could not be reached",
    );
}

#[tokio::test]
async fn ccg_subject_rejections_are_not_found_for_users() {
    let h = Harness::with(Options {
        auth: FakeAuth::Ccg,
        ..Options::default()
    })
    .await;
    // A Managed User the users API shows, whose token Box's CCG refuses
    // (the app lacks App + Enterprise Access).
    h.fake.update_app(&h.app.client_id, |a| a.enterprise_access = false);
    assert_status(
        &h.get(user(seed::MANAGED_USER_ID)).await.unwrap_err(),
        Code::NotFound,
        seed::MANAGED_USER_ID,
    );
}

#[tokio::test]
async fn ccg_with_a_wrong_enterprise_is_failed_precondition() {
    let h = Harness::with(Options {
        auth: FakeAuth::Ccg,
        enterprise_id: Some("999"),
        ..Options::default()
    })
    .await;
    assert_status(
        &h.get(enterprise()).await.unwrap_err(),
        Code::FailedPrecondition,
        "enterprise 999",
    );
}

#[tokio::test]
async fn ccg_unauthorized_app_is_failed_precondition() {
    let h = Harness::with(Options {
        auth: FakeAuth::Ccg,
        ..Options::default()
    })
    .await;
    h.fake.update_app(&h.app.client_id, |a| a.authorized = false);
    assert_status(
        &h.get(enterprise()).await.unwrap_err(),
        Code::FailedPrecondition,
        "not authorized",
    );
}

#[tokio::test]
async fn ccg_wrong_secret_is_failed_precondition() {
    let h = Harness::with(Options {
        auth: FakeAuth::Ccg,
        client_secret: Some("wrong"),
        ..Options::default()
    })
    .await;
    assert_status(
        &h.get(enterprise()).await.unwrap_err(),
        Code::FailedPrecondition,
        "client credentials",
    );
}
