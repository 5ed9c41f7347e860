//! Box users as portals know them: App Users by external id (cached, with a
//! negative cache), the policy's external-id globs checked before Box,
//! App Users created on first use exactly once, and no token for admins,
//! co-admins, inactive users or other enterprises' users.

use crate::common;

use std::time::Duration;

use box_token_broker::{
    boxapi::{BoxId, BoxSubject},
    fakebox::{FakeUser, Fault, UserKind, seed},
    pb,
    policy::Policy,
};
use common::{Harness, Options, assert_status, downscope, enterprise, external, folder, provisioning, token_of, user};
use tonic::{Code, metadata::MetadataValue};

const PORTAL_KEY: &str = "portal-key-0001";

/// A harness whose one caller (`apikey:portal`) gets full tokens of the
/// external ids `globs`, creating App Users when `provision`.
async fn portal(globs: &[&str], provision: bool) -> Harness {
    let globs = globs.iter().map(|g| format!("{g:?}")).collect::<Vec<_>>().join(", ");
    let policy = Policy::parse(
        &format!(
            r#"
[[rules]]
name = "portal"
callers = ["apikey:portal"]
external_users = [{globs}]
provision = {provision}
full_tokens = true
revoke = true
scopes = ["item_preview"]
folders = ["*"]
"#
        ),
        "test policy",
    )
    .unwrap();
    Harness::with(Options {
        allow_anonymous: false,
        api_keys: vec![("portal", PORTAL_KEY)],
        policy: Some(policy),
        ..Options::default()
    })
    .await
}

fn keyed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-api-key", MetadataValue::from_static(PORTAL_KEY));
    request
}

async fn get_as_portal(h: &Harness, request: pb::GetTokenRequest) -> Result<pb::GetTokenResponse, tonic::Status> {
    h.client
        .clone()
        .get_token(keyed(request))
        .await
        .map(tonic::Response::into_inner)
}

/// The ids of the users Box minted tokens for (the Service Account's is the enterprise's).
fn minted_subjects(h: &Harness) -> Vec<String> {
    h.fake
        .accepted_assertions()
        .iter()
        .filter_map(|a| a.claims["sub"].as_str().map(str::to_owned))
        .collect()
}

/// How many tokens the broker holds for `id`.
fn held_for(h: &Harness, id: &str) -> usize {
    let subject = BoxSubject::User(BoxId::parse(id).unwrap());
    h.broker.cache().count_where(|k| k.subject == subject)
}

#[tokio::test]
async fn an_external_id_gets_its_users_token_and_the_second_request_calls_box_not_at_all() {
    let h = Harness::start().await;
    let first = h.get(external(seed::APP_USER_EXTERNAL_IDS[0])).await.unwrap();
    assert!(!first.cache_hit);
    assert_eq!(
        h.fake.token_user_id(&token_of(&first)).as_deref(),
        Some(seed::APP_USER_IDS[0]),
        "the token acts as the App User with that external id"
    );
    let stats = h.fake.stats();
    assert_eq!(stats.user_lists, 1, "one lookup");
    assert_eq!(
        stats.user_reads, 0,
        "the lookup's answer also said the user may be tokenized"
    );
    let second = h.get(external(seed::APP_USER_EXTERNAL_IDS[0])).await.unwrap();
    assert!(second.cache_hit);
    assert_eq!(token_of(&second), token_of(&first));
    let after = h.fake.stats();
    assert_eq!(
        (after.users_requests, after.token_arrivals),
        (stats.users_requests, stats.token_arrivals),
        "neither the users API nor the token endpoint was called again"
    );
    // Cached by the numeric id: the same token by user_id, without a call.
    let by_id = h.get(user(seed::APP_USER_IDS[0])).await.unwrap();
    assert_eq!((token_of(&by_id), by_id.cache_hit), (token_of(&first), true));
    // The audit record carries both ids.
    let records = h.audit_events();
    let record = records
        .iter()
        .find(|r| r["external_user_id"] == seed::APP_USER_EXTERNAL_IDS[0])
        .unwrap();
    assert_eq!(record["subject_id"], seed::APP_USER_IDS[0]);
    assert_eq!(record["subject_type"], "user");
    assert!(record.get("provisioned").is_none(), "{record}");
}

#[tokio::test]
async fn an_unknown_external_id_is_not_found_and_not_asked_again_within_the_negative_ttl() {
    let h = Harness::start().await;
    let status = h.get(external("auth0|nobody")).await.unwrap_err();
    assert_status(&status, Code::NotFound, "external_app_user_id \"auth0|nobody\"");
    let asked = h.fake.stats();
    assert_eq!(asked.user_lists, 1);
    for _ in 0..5 {
        assert_eq!(
            h.get(external("auth0|nobody")).await.unwrap_err().code(),
            Code::NotFound
        );
    }
    let after = h.fake.stats();
    assert_eq!(
        (after.users_requests, after.token_arrivals),
        (asked.users_requests, asked.token_arrivals),
        "remembered: no call to Box at all"
    );
    h.clock.advance(Duration::from_secs(31));
    assert_eq!(
        h.get(external("auth0|nobody")).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(h.fake.stats().user_lists, 2, "asked again once the negative TTL passed");
}

#[tokio::test]
async fn the_policy_grants_external_ids_by_glob_and_denied_ones_never_reach_box() {
    let h = portal(&["auth0|*"], false).await;
    for (request, fragment) in [
        (
            external("tenant-b/ada"),
            "external user \"tenant-b/ada\" is not allowed",
        ),
        (user(seed::APP_USER_IDS[0]), "user 7200001 is not allowed"),
        (enterprise(), "the Service Account (enterprise) is not allowed"),
    ] {
        let status = get_as_portal(&h, request).await.unwrap_err();
        assert_status(&status, Code::PermissionDenied, fragment);
    }
    let stats = h.fake.stats();
    assert_eq!(
        (stats.users_requests, stats.token_arrivals),
        (0, 0),
        "denied before any call to Box"
    );
    let denied = h.audit_events();
    assert_eq!(denied[0]["external_user_id"], "tenant-b/ada", "{}", denied[0]);
    assert_eq!(denied[0]["decision"], "deny");
    let allowed = get_as_portal(&h, external(seed::APP_USER_EXTERNAL_IDS[1]))
        .await
        .unwrap();
    assert_eq!(
        h.fake.token_user_id(&token_of(&allowed)).as_deref(),
        Some(seed::APP_USER_IDS[1])
    );
    // The caller may revoke what it got by external id.
    h.client
        .clone()
        .revoke_token(keyed(pb::RevokeTokenRequest {
            app: String::new(),
            access_token: token_of(&allowed),
        }))
        .await
        .unwrap();
    assert!(h.fake.is_revoked(&token_of(&allowed)));
}

#[tokio::test]
async fn a_hundred_concurrent_first_requests_create_exactly_one_app_user() {
    let h = portal(&["auth0|*"], true).await;
    let mut calls = Vec::new();
    for _ in 0..100 {
        let mut client = h.client.clone();
        let request = keyed(provisioning("auth0|nora", "Nora New"));
        calls.push(tokio::spawn(async move { client.get_token(request).await }));
    }
    let mut tokens = std::collections::BTreeSet::new();
    for call in calls {
        tokens.insert(token_of(&call.await.unwrap().unwrap().into_inner()));
    }
    assert_eq!(tokens.len(), 1, "all 100 got the one token");
    let stats = h.fake.stats();
    assert_eq!(
        (stats.user_create_requests, stats.users_created),
        (1, 1),
        "one POST /2.0/users"
    );
    let created = h.fake.users_with_external_id("auth0|nora");
    assert_eq!(created.len(), 1);
    let nora = &created[0];
    assert_eq!(nora.name, "Nora New");
    assert_eq!(
        nora.kind,
        UserKind::AppUser {
            client_id: h.app.client_id.clone()
        },
        "an App User (is_platform_access_only) of this app"
    );
    let token = tokens.into_iter().next().unwrap();
    assert_eq!(h.fake.token_user_id(&token).as_deref(), Some(nora.id.as_str()));
    let records = h.audit_events();
    let provisioned: Vec<_> = records.iter().filter(|r| r["provisioned"] == true).collect();
    assert_eq!(provisioned.len(), 1, "the creation is audited once");
    assert_eq!(provisioned[0]["subject_id"], nora.id.as_str());
    assert_eq!(provisioned[0]["external_user_id"], "auth0|nora");
    // Later requests find the user: no second creation.
    get_as_portal(&h, provisioning("auth0|nora", "Nora New")).await.unwrap();
    assert_eq!(h.fake.stats().user_create_requests, 1);
    let metrics = crate::metrics::scrape(crate::metrics::serve_metrics(&h).await).await;
    assert_eq!(metrics["boxbroker_app_users_created_total{app=\"default\"}"], 1.0);
}

#[tokio::test]
async fn creating_an_app_user_without_a_provision_grant_is_denied_and_creates_nothing() {
    let h = portal(&["auth0|*"], false).await;
    let status = get_as_portal(&h, provisioning("auth0|nora", "Nora New"))
        .await
        .unwrap_err();
    assert_status(&status, Code::PermissionDenied, "provision = true");
    let stats = h.fake.stats();
    assert_eq!((stats.users_requests, stats.user_create_requests), (0, 0));
    assert!(h.fake.users_with_external_id("auth0|nora").is_empty());
    // Without create_if_missing the same caller learns the user does not exist.
    let status = get_as_portal(&h, external("auth0|nora")).await.unwrap_err();
    assert_status(&status, Code::NotFound, "auth0|nora");
    assert_eq!(h.fake.stats().user_create_requests, 0);
}

#[tokio::test]
async fn a_user_created_meanwhile_elsewhere_is_found_not_created_twice() {
    let h = Harness::start().await;
    // Box had no such user when asked; another broker creates it before this one does.
    assert_eq!(h.get(external("auth0|late")).await.unwrap_err().code(), Code::NotFound);
    h.fake.add_user(
        FakeUser::new(
            "7900500",
            "Late",
            "AppUser_late@boxdevedition.com",
            seed::ENTERPRISE_ID,
            UserKind::AppUser {
                client_id: h.app.client_id.clone(),
            },
        )
        .with_external_app_user_id("auth0|late"),
    );
    let got = h.get(provisioning("auth0|late", "")).await.unwrap();
    assert_eq!(h.fake.token_user_id(&token_of(&got)).as_deref(), Some("7900500"));
    assert_eq!(
        h.fake.stats().user_create_requests,
        0,
        "looked up again before creating"
    );
    assert!(
        h.audit_events().iter().all(|r| r.get("provisioned").is_none()),
        "found, not created: not audited as provisioned"
    );
}

#[tokio::test]
async fn an_external_id_that_names_a_managed_user_is_refused() {
    let h = Harness::start().await;
    // An SSO-provisioned Managed User may carry an external id too.
    assert!(h.fake.update_user(seed::MANAGED_USER_ID, |u| u.external_app_user_id =
        Some("sso|mia".to_owned())));
    let status = h.get(external("sso|mia")).await.unwrap_err();
    assert_status(&status, Code::PermissionDenied, "not an App User");
    assert!(!minted_subjects(&h).iter().any(|s| s == seed::MANAGED_USER_ID));
}

#[tokio::test]
async fn a_service_account_token_box_no_longer_accepts_is_replaced_for_the_users_api() {
    let h = Harness::start().await;
    let dead = token_of(&h.get(enterprise()).await.unwrap());
    // Revoked at Box behind the broker's back.
    let revoked = reqwest::Client::new()
        .post(format!("{}/oauth2/revoke", h.fake_server.base_url()))
        .form(&[
            ("client_id", h.app.client_id.as_str()),
            (
                "client_secret",
                secrecy::ExposeSecret::expose_secret(&h.app.client_secret),
            ),
            ("token", dead.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert!(revoked.status().is_success());
    let status = h.get(user(seed::APP_USER_IDS[0])).await.unwrap_err();
    assert_status(&status, Code::Unavailable, "no longer accepts");
    let service_account = BoxSubject::Enterprise(BoxId::parse(seed::ENTERPRISE_ID).unwrap());
    let held = || h.broker.cache().count_where(|k| k.subject == service_account);
    for _ in 0..200 {
        if held() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(held(), 0, "the dead token is dropped");
    h.get(user(seed::APP_USER_IDS[0])).await.unwrap();
    assert_ne!(
        token_of(&h.get(enterprise()).await.unwrap()),
        dead,
        "a new Service Account token"
    );
}

#[tokio::test]
async fn a_long_external_id_without_a_name_creates_a_user_named_by_its_first_50_characters() {
    let h = Harness::start().await;
    let id = format!("tenant-a/{}", "x".repeat(100));
    h.get(provisioning(&id, "")).await.unwrap();
    let created = h.fake.users_with_external_id(&id);
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].name, id.chars().take(50).collect::<String>());
}

#[tokio::test]
async fn admins_co_admins_inactive_and_foreign_users_are_refused_and_never_tokenized() {
    let h = Harness::start().await;
    let cases = [
        (
            seed::ADMIN_USER_ID,
            Code::PermissionDenied,
            "never tokenizes Box admins or co-admins",
        ),
        (seed::COADMIN_USER_ID, Code::PermissionDenied, "co-admin"),
        (
            seed::INACTIVE_USER_ID,
            Code::FailedPrecondition,
            "inactive or restricted in Box (status inactive",
        ),
        (seed::EXTERNAL_USER_ID, Code::PermissionDenied, "enterprise 8000001"),
    ];
    for (id, code, fragment) in cases {
        let status = h.get(user(id)).await.unwrap_err();
        assert_status(&status, code, fragment);
        assert!(status.message().contains(id), "{status:?}");
        // Downscoped too.
        let status = h
            .downscoped(downscope(user(id), &["item_preview"], folder(seed::APP_USER_FOLDER_ID)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), code);
        assert_eq!(held_for(&h, id), 0, "no token for {id} is cached");
    }
    assert_eq!(
        minted_subjects(&h),
        [seed::ENTERPRISE_ID],
        "only the Service Account's token (to read the users): none for them"
    );
    let reads = h.fake.stats().user_reads;
    assert_eq!(reads, 4, "each read once");
    assert_eq!(
        h.get(user(seed::ADMIN_USER_ID)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(h.fake.stats().user_reads, reads, "the refusal is remembered");
    let metrics = crate::metrics::scrape(crate::metrics::serve_metrics(&h).await).await;
    assert_eq!(
        metrics["boxbroker_users_refused_total{app=\"default\"}"], 4.0,
        "each refusal Box showed, once"
    );
}

#[tokio::test]
async fn a_user_deactivated_later_is_refused_after_the_check_ttl_and_their_tokens_are_dropped() {
    let h = Harness::start().await;
    h.get(user(seed::MANAGED_USER_ID)).await.unwrap();
    assert_eq!(held_for(&h, seed::MANAGED_USER_ID), 1);
    assert!(h.fake.set_user_status(seed::MANAGED_USER_ID, "inactive"));
    // Within the check's TTL the cached token is still served.
    assert!(h.get(user(seed::MANAGED_USER_ID)).await.unwrap().cache_hit);
    h.clock.advance(Duration::from_secs(601));
    let status = h.get(user(seed::MANAGED_USER_ID)).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "not active");
    assert_eq!(held_for(&h, seed::MANAGED_USER_ID), 0, "its cached token is dropped");
}

#[tokio::test]
async fn refused_roles_are_configurable_per_app_and_admins_stay_refused() {
    let h = Harness::with(Options {
        refused_roles: Some(vec!["admin".to_owned()]),
        ..Options::default()
    })
    .await;
    let coadmin = h.get(user(seed::COADMIN_USER_ID)).await.unwrap();
    assert_eq!(
        h.fake.token_user_id(&token_of(&coadmin)).as_deref(),
        Some(seed::COADMIN_USER_ID)
    );
    assert_eq!(
        h.get(user(seed::ADMIN_USER_ID)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let h = Harness::with(Options {
        refused_roles: Some(vec!["admin".to_owned(), "coadmin".to_owned(), "user".to_owned()]),
        ..Options::default()
    })
    .await;
    let status = h.get(user(seed::MANAGED_USER_ID)).await.unwrap_err();
    assert_status(&status, Code::PermissionDenied, "role user, which app default refuses");
}

#[tokio::test]
async fn where_the_app_may_not_read_users_the_users_own_token_decides_and_a_refused_ones_is_revoked() {
    let h = Harness::start().await;
    assert!(h.fake.set_user_scopes(&h.app.client_id, &[]));
    let status = h.get(user(seed::ADMIN_USER_ID)).await.unwrap_err();
    assert_status(&status, Code::PermissionDenied, "never tokenizes Box admins");
    assert!(
        h.wait_for(|s| s.revoke_requests == 1).await,
        "the token minted to ask /2.0/users/me is revoked"
    );
    let stats = h.fake.stats();
    assert_eq!((stats.user_reads, stats.users_me), (1, 1));
    assert_eq!(held_for(&h, seed::ADMIN_USER_ID), 0);
    // An allowed user: the token minted for the check is the one served.
    let mints = h.fake.stats().jwt_issued;
    let allowed = h.get(user(seed::APP_USER_IDS[2])).await.unwrap();
    assert_eq!(
        h.fake.stats().jwt_issued,
        mints + 1,
        "one mint, for the check and the caller"
    );
    assert!(!h.fake.is_revoked(&token_of(&allowed)));
    assert!(h.get(user(seed::APP_USER_IDS[2])).await.unwrap().cache_hit);
}

#[tokio::test]
async fn without_the_users_scope_an_external_id_is_failed_precondition_naming_it() {
    let h = Harness::start().await;
    assert!(h.fake.set_user_scopes(&h.app.client_id, &[]));
    let status = h.get(external(seed::APP_USER_EXTERNAL_IDS[0])).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "manage_app_users");
}

#[tokio::test]
async fn an_external_id_two_users_share_is_ambiguous() {
    let h = Harness::start().await;
    for id in ["7900601", "7900602"] {
        h.fake.add_user(
            FakeUser::new(
                id,
                "Twin",
                &format!("twin{id}@example.com"),
                seed::ENTERPRISE_ID,
                UserKind::Managed,
            )
            .with_external_app_user_id("crm-17"),
        );
    }
    let status = h.get(external("crm-17")).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "ambiguous");
    assert_eq!(minted_subjects(&h), [seed::ENTERPRISE_ID], "no user token");
}

#[tokio::test]
async fn a_failing_users_api_is_retried_and_never_yields_a_token_for_an_unchecked_user() {
    let h = Harness::start().await;
    h.get(enterprise()).await.unwrap();
    // Two 503s, then Box answers: retried like a token request.
    h.fake.fail_next_users(2, Fault::ServerError { status: 503 });
    h.get(user(seed::APP_USER_IDS[0])).await.unwrap();
    assert_eq!(h.fake.stats().users_requests, 3, "two failures and the answer");
    // Box keeps failing: Unavailable, and no token for the unchecked user.
    h.fake.fail_next_users(50, Fault::ServerError { status: 500 });
    let status = h.get(user(seed::APP_USER_IDS[1])).await.unwrap_err();
    assert_status(&status, Code::Unavailable, "users API");
    assert!(!minted_subjects(&h).iter().any(|s| s == seed::APP_USER_IDS[1]));
    assert_eq!(held_for(&h, seed::APP_USER_IDS[1]), 0);
    let status = h.get(external(seed::APP_USER_EXTERNAL_IDS[2])).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(!minted_subjects(&h).iter().any(|s| s == seed::APP_USER_IDS[2]));
}

#[tokio::test]
async fn an_admin_invalidation_of_a_user_rereads_its_role() {
    let h = Harness::with(Options {
        admin: true,
        ..Options::default()
    })
    .await;
    h.get(external(seed::APP_USER_EXTERNAL_IDS[0])).await.unwrap();
    // Made a co-admin in Box: the operator drops what the broker knows at once.
    assert!(h.fake.set_user_role(seed::APP_USER_IDS[0], "coadmin"));
    let mut admin = h.admin.as_ref().unwrap().client.clone();
    let dropped = admin
        .invalidate_tokens(common::admin_request(pb::InvalidateTokensRequest {
            app: String::new(),
            subject: external(seed::APP_USER_EXTERNAL_IDS[0]).subject,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dropped.invalidated, 1);
    assert_eq!(
        h.get(external(seed::APP_USER_EXTERNAL_IDS[0]))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
}

#[tokio::test]
async fn bad_external_ids_and_create_requests_are_invalid_arguments() {
    let h = Harness::start().await;
    let long = "x".repeat(257);
    for (request, fragment) in [
        (external(""), "external_app_user_id"),
        (external(&long), "1 to 256 bytes"),
        (external("a\nb"), "control characters"),
        (provisioning("ok", &"n".repeat(51)), "1 to 50 characters"),
    ] {
        assert_status(&h.get(request).await.unwrap_err(), Code::InvalidArgument, fragment);
    }
    let mut by_id = user(seed::APP_USER_IDS[0]);
    if let Some(subject) = by_id.subject.as_mut() {
        subject.create_if_missing = Some(pb::CreateAppUser { name: "x".to_owned() });
    }
    assert_status(
        &h.get(by_id).await.unwrap_err(),
        Code::InvalidArgument,
        "create_if_missing needs",
    );
    assert_eq!(h.fake.stats().users_requests, 0);
}

#[tokio::test]
async fn a_user_invalidated_while_its_token_is_minted_is_checked_again_before_that_token_is_served() {
    let h = Harness::with(Options {
        admin: true,
        ..Options::default()
    })
    .await;
    let managed = seed::MANAGED_USER_ID;
    h.get(user(managed)).await.unwrap();
    // The token goes, the user's check stays: the next request mints, slowly.
    let subject = BoxSubject::User(BoxId::parse(managed).unwrap());
    h.broker.cache().invalidate_where(|k| k.subject == subject).await;
    h.fake.set_latency(Duration::from_millis(400));
    let arrivals = h.fake.stats().token_arrivals;
    let mut client = h.client.clone();
    let minting = tokio::spawn(async move { client.get_token(user(managed)).await });
    assert!(h.wait_for(|s| s.token_arrivals > arrivals).await);
    // Meanwhile the user is made a co-admin, and the operator acts at once.
    assert!(h.fake.set_user_role(managed, "coadmin"));
    let mut admin = h.admin.as_ref().unwrap().client.clone();
    admin
        .invalidate_tokens(common::admin_request(pb::InvalidateTokensRequest {
            app: String::new(),
            subject: user(managed).subject,
        }))
        .await
        .unwrap();
    minting.await.unwrap().unwrap();
    h.fake.set_latency(Duration::ZERO);
    // The token minted across the invalidation is not served unchecked.
    let status = h.get(user(managed)).await.unwrap_err();
    assert_status(&status, Code::PermissionDenied, "co-admin");
    assert_eq!(held_for(&h, managed), 0);
}

#[tokio::test]
async fn creating_an_app_user_for_an_id_a_managed_user_took_meanwhile_is_refused() {
    let h = portal(&["*"], true).await;
    assert_eq!(
        get_as_portal(&h, external("sso|zed")).await.unwrap_err().code(),
        Code::NotFound
    );
    // Box has none, and remembers so; then SSO gives a Managed User the id.
    assert!(h.fake.update_user(seed::MANAGED_USER_ID, |u| u.external_app_user_id =
        Some("sso|zed".to_owned())));
    let status = get_as_portal(&h, provisioning("sso|zed", "Zed")).await.unwrap_err();
    assert_status(&status, Code::PermissionDenied, "not an App User");
    assert_eq!(h.fake.stats().user_create_requests, 0, "looked up, not created");
    assert!(!minted_subjects(&h).iter().any(|s| s == seed::MANAGED_USER_ID));
}
