//! Downscoped tokens for front ends: exactly the narrow token asked for, or a
//! clear refusal — never a broader one.

use crate::common;

use std::time::Duration;

use box_token_broker::{fakebox::seed, pb};
use common::{Harness, assert_status, downscope, enterprise, file, folder, token_of, user};
use tonic::Code;

fn token(response: &pb::GetDownscopedTokenResponse) -> &pb::AccessToken {
    response.token.as_ref().unwrap()
}

#[tokio::test]
async fn an_app_users_token_is_downscoped_to_one_folder() {
    let h = Harness::start().await;
    let response = h
        .downscoped(downscope(
            user(seed::APP_USER_IDS[0]),
            &["item_upload", "item_preview"],
            folder(seed::APP_USER_FOLDER_ID),
        ))
        .await
        .unwrap();
    let t = token(&response);
    assert_eq!(t.scopes, ["item_preview", "item_upload"], "sorted scopes are reported");
    assert_eq!(t.restricted_to.len(), 2);
    assert!(
        t.restricted_to
            .iter()
            .all(|r| r.object_type == "folder" && r.object_id == seed::APP_USER_FOLDER_ID)
    );
    // It acts as the App User, and it is not the full token.
    assert_eq!(
        h.fake.token_user_id(&t.access_token).as_deref(),
        Some(seed::APP_USER_IDS[0])
    );
    let full = token_of(&h.get(user(seed::APP_USER_IDS[0])).await.unwrap());
    assert_ne!(full, t.access_token);
    let stats = h.fake.stats();
    assert_eq!(
        (stats.jwt_issued, stats.exchange_issued, stats.user_reads),
        (2, 1, 1),
        "one mint (and the Service Account's, which read the user once), one exchange"
    );
}

#[tokio::test]
async fn a_service_account_token_is_downscoped_to_a_file_or_a_shared_link() {
    let h = Harness::start().await;
    let by_id = h
        .downscoped(downscope(
            enterprise(),
            &["item_preview"],
            file(seed::SERVICE_ACCOUNT_FILE_ID),
        ))
        .await
        .unwrap();
    assert_eq!(token(&by_id).restricted_to[0].object_id, seed::SERVICE_ACCOUNT_FILE_ID);
    let link = Some(pb::get_downscoped_token_request::Target::SharedLink(
        seed::SHARED_LINK.to_owned(),
    ));
    let by_link = h
        .downscoped(downscope(enterprise(), &["item_preview"], link))
        .await
        .unwrap();
    assert_eq!(token(&by_link).restricted_to[0].object_type, "file");
    assert_eq!(h.fake.stats().exchange_issued, 2);
}

#[tokio::test]
async fn identical_requests_are_served_from_cache_whatever_the_scope_order() {
    let h = Harness::start().await;
    let first = h
        .downscoped(downscope(
            enterprise(),
            &["item_preview", "item_download"],
            folder(seed::SERVICE_ACCOUNT_FOLDER_ID),
        ))
        .await
        .unwrap();
    let again = h
        .downscoped(downscope(
            enterprise(),
            &["item_download", "item_preview", "item_preview"],
            folder(seed::SERVICE_ACCOUNT_FOLDER_ID),
        ))
        .await
        .unwrap();
    assert!(!first.cache_hit);
    assert!(again.cache_hit);
    assert_eq!(token(&first).access_token, token(&again).access_token);
    assert_eq!(h.fake.stats().exchange_issued, 1);
    // Another target is another token.
    h.downscoped(downscope(
        enterprise(),
        &["item_preview", "item_download"],
        file(seed::SERVICE_ACCOUNT_FILE_ID),
    ))
    .await
    .unwrap();
    assert_eq!(h.fake.stats().exchange_issued, 2);
}

#[tokio::test]
async fn concurrent_identical_requests_cause_one_mint_and_one_exchange() {
    let h = Harness::start().await;
    h.fake.set_latency(Duration::from_millis(200));
    let mut calls = Vec::new();
    for _ in 0..50 {
        let mut client = h.client.clone();
        let request = downscope(
            user(seed::APP_USER_IDS[0]),
            &["item_preview"],
            file(seed::APP_USER_FILE_ID),
        );
        calls.push(tokio::spawn(async move { client.get_downscoped_token(request).await }));
    }
    let mut tokens = std::collections::HashSet::new();
    for call in calls {
        tokens.insert(call.await.unwrap().unwrap().into_inner().token.unwrap().access_token);
    }
    assert_eq!(tokens.len(), 1);
    let stats = h.fake.stats();
    // The user's mint and the Service Account's (which read the user, once for all 50).
    assert_eq!((stats.jwt_issued, stats.exchange_issued, stats.user_reads), (2, 1, 1));
}

#[tokio::test]
async fn a_replaced_parent_means_a_new_exchange() {
    let h = Harness::start().await;
    let request = || downscope(enterprise(), &["item_preview"], folder(seed::SERVICE_ACCOUNT_FOLDER_ID));
    let first = h.downscoped(request()).await.unwrap();
    // Past the forced-refresh interval, so the forced request mints.
    h.clock.advance(Duration::from_secs(6));
    let mut force = enterprise();
    force.force_refresh = true;
    let new_parent = token_of(&h.get(force).await.unwrap());
    let second = h.downscoped(request()).await.unwrap();
    assert!(!second.cache_hit, "the child of the old parent is not served");
    assert_ne!(token(&first).access_token, token(&second).access_token);
    assert_eq!(h.fake.stats().exchange_issued, 2);
    // The new child is served from cache while its parent stays current.
    assert!(h.downscoped(request()).await.unwrap().cache_hit);
    assert!(h.get(enterprise()).await.unwrap().cache_hit);
    assert_eq!(token_of(&h.get(enterprise()).await.unwrap()), new_parent);
}

#[tokio::test]
async fn downscoped_requests_alone_keep_the_parent_refreshed_ahead_of_expiry() {
    let h = Harness::start().await;
    h.fake.set_token_lifetime(Some(Duration::from_secs(3600)));
    let request = || downscope(enterprise(), &["item_preview"], folder(seed::SERVICE_ACCOUNT_FOLDER_ID));
    let first = h.downscoped(request()).await.unwrap();
    assert!(h.downscoped(request()).await.unwrap().cache_hit);
    assert_eq!(h.fake.stats().jwt_issued, 1);
    // 400 s before expiry: past the (jittered) refresh point, before the margin.
    h.clock.advance(Duration::from_secs(3600 - 400));
    let during = h.downscoped(request()).await.unwrap();
    assert!(during.cache_hit, "the caller does not wait for the refresh");
    assert_eq!(token(&during).access_token, token(&first).access_token);
    assert!(
        h.wait_for(|s| s.jwt_issued == 2).await,
        "the parent is refreshed in the background, though only downscoped tokens were asked for"
    );
    // Once the new parent is cached, the token served is exchanged from it:
    // it outlives the old parent, which no child of the old one can.
    let old_parent_expiry = token(&first).expires_at.unwrap().seconds;
    let mut after = None;
    for _ in 0..500 {
        let response = h.downscoped(request()).await.unwrap();
        if token(&response).expires_at.unwrap().seconds > old_parent_expiry {
            after = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = after.expect("a token exchanged from the refreshed parent");
    assert_ne!(token(&after).access_token, token(&first).access_token);
    let again = h.downscoped(request()).await.unwrap();
    assert!(again.cache_hit);
    assert_eq!(token(&again).access_token, token(&after).access_token);
    assert_eq!(h.fake.stats().jwt_issued, 2, "one refresh of the parent, nothing more");
}

#[tokio::test]
async fn a_downscoped_token_never_outlives_its_parent() {
    let h = Harness::start().await;
    h.fake.set_token_lifetime(Some(Duration::from_secs(3600)));
    let parent = h.get(enterprise()).await.unwrap().token.unwrap();
    h.clock.advance(Duration::from_secs(1000));
    let child = h
        .downscoped(downscope(enterprise(), &["item_preview"], None))
        .await
        .unwrap();
    let child_expiry = token(&child).expires_at.unwrap().seconds;
    assert!(child_expiry <= parent.expires_at.unwrap().seconds);
}

#[tokio::test]
async fn a_token_box_did_not_restrict_is_refused_and_revoked() {
    let h = Harness::start().await;
    h.fake.set_omit_restrictions(true);
    let status = h
        .downscoped(downscope(
            user(seed::APP_USER_IDS[0]),
            &["item_preview"],
            folder(seed::APP_USER_FOLDER_ID),
        ))
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::FailedPrecondition,
        &format!("not restricted to folder {}", seed::APP_USER_FOLDER_ID),
    );
    assert!(
        h.wait_for(|s| s.revoke_requests == 1).await,
        "the unrestricted token is revoked at Box"
    );
    // Nothing was cached: once Box behaves, a proper token is issued.
    h.fake.set_omit_restrictions(false);
    let ok = h
        .downscoped(downscope(
            user(seed::APP_USER_IDS[0]),
            &["item_preview"],
            folder(seed::APP_USER_FOLDER_ID),
        ))
        .await
        .unwrap();
    assert!(!ok.cache_hit);
    assert_eq!(token(&ok).restricted_to[0].object_id, seed::APP_USER_FOLDER_ID);
}

#[tokio::test]
async fn bad_scopes_and_targets_are_invalid_arguments() {
    let h = Harness::start().await;
    let cases = [
        (downscope(enterprise(), &[], None), "scopes is empty"),
        (
            downscope(enterprise(), &["item_preview", "god_mode"], None),
            "\"god_mode\" is not a Box downscope scope",
        ),
        (
            downscope(enterprise(), &["item_preview"], folder("abc")),
            "target.folder_id \"abc\" is not a numeric Box id",
        ),
        (downscope(enterprise(), &["item_preview"], file("")), "target.file_id"),
        (
            downscope(
                enterprise(),
                &["item_preview"],
                Some(pb::get_downscoped_token_request::Target::SharedLink(
                    "https://evil.example/s/x".to_owned(),
                )),
            ),
            "shared_link must be an https:// Box shared link",
        ),
        (
            downscope(pb::GetTokenRequest::default(), &["item_preview"], None),
            "subject is required",
        ),
    ];
    for (request, fragment) in cases {
        assert_status(
            &h.downscoped(request).await.unwrap_err(),
            Code::InvalidArgument,
            fragment,
        );
    }
    assert_eq!(h.fake.stats().token_requests, 0, "nothing reached Box");
}

#[tokio::test]
async fn a_target_the_subject_cannot_reach_is_not_found() {
    let h = Harness::start().await;
    // The second App User asks for the first one's folder.
    let status = h
        .downscoped(downscope(
            user(seed::APP_USER_IDS[1]),
            &["item_preview"],
            folder(seed::APP_USER_FOLDER_ID),
        ))
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::NotFound,
        &format!(
            "folder {} does not exist or is not accessible",
            seed::APP_USER_FOLDER_ID
        ),
    );
}

#[tokio::test]
async fn scopes_beyond_the_apps_are_failed_precondition() {
    let h = Harness::start().await;
    h.fake
        .update_app(&h.app.client_id, |a| a.scopes = ["item_preview".to_owned()].into());
    let status = h
        .downscoped(downscope(enterprise(), &["item_preview", "item_delete"], None))
        .await
        .unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "refused the requested scopes");
    h.downscoped(downscope(enterprise(), &["item_preview"], None))
        .await
        .unwrap();
}

#[tokio::test]
async fn revoking_a_downscoped_token_revokes_it_at_box_and_evicts_only_it() {
    let h = Harness::start().await;
    let request = || downscope(enterprise(), &["item_preview"], folder(seed::SERVICE_ACCOUNT_FOLDER_ID));
    let child = token(&h.downscoped(request()).await.unwrap()).access_token.clone();
    h.revoke(&child).await.unwrap();
    assert!(h.fake.is_revoked(&child));
    let next = h.downscoped(request()).await.unwrap();
    assert!(!next.cache_hit);
    assert_ne!(token(&next).access_token, child);
    assert!(h.get(enterprise()).await.unwrap().cache_hit, "the parent stays cached");
}

#[tokio::test]
async fn revoking_a_full_token_evicts_it_and_its_downscoped_children() {
    let h = Harness::start().await;
    let request = || downscope(enterprise(), &["item_preview"], folder(seed::SERVICE_ACCOUNT_FOLDER_ID));
    let parent = token_of(&h.get(enterprise()).await.unwrap());
    h.downscoped(request()).await.unwrap();
    h.revoke(&parent).await.unwrap();
    assert!(h.fake.is_revoked(&parent));
    let fresh = h.get(enterprise()).await.unwrap();
    assert!(!fresh.cache_hit);
    assert_ne!(token_of(&fresh), parent);
    assert!(
        !h.downscoped(request()).await.unwrap().cache_hit,
        "the child went with its parent"
    );
    assert_eq!(h.fake.stats().exchange_issued, 2);
}

#[tokio::test]
async fn revoking_a_token_the_broker_did_not_issue_is_not_found() {
    let h = Harness::start().await;
    assert_status(
        &h.revoke("not-one-of-ours").await.unwrap_err(),
        Code::NotFound,
        "holds no token with that value",
    );
    assert_status(
        &h.revoke("").await.unwrap_err(),
        Code::InvalidArgument,
        "access_token must be",
    );
    assert_eq!(h.fake.stats().revoke_requests, 0);
}
