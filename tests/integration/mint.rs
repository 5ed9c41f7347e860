//! Minting exactly as Box requires: the fake verifies every assertion, and
//! these tests check what it saw.

use crate::common;

use std::time::{Duration, SystemTime};

use box_token_broker::{
    boxapi::{JwtAlgorithm, assertion::BOX_TOKEN_AUDIENCE},
    fakebox::{FakeAuth, seed},
};
use common::{Harness, Options, enterprise, token_of, user};
use jsonwebtoken::Algorithm;

#[tokio::test]
async fn enterprise_token_is_minted_with_a_verified_assertion() {
    let h = Harness::start().await;
    let response = h.get(enterprise()).await.unwrap();
    let token = token_of(&response);
    assert!(!response.cache_hit);
    assert_eq!(response.token.as_ref().unwrap().token_type, "bearer");
    // The fake verified the signature and issued a token for the Service Account.
    assert_eq!(h.fake.stats().jwt_issued, 1);
    assert_eq!(h.fake.token_user_id(&token).as_deref(), Some(seed::SERVICE_ACCOUNT_ID));

    let seen = h.fake.accepted_assertions();
    let a = seen.last().unwrap();
    assert_eq!(a.alg, Algorithm::RS256);
    assert_eq!(a.kid.as_deref(), Some(h.app.kid.as_str()));
    assert_eq!(a.claims["iss"], h.app.client_id.as_str());
    assert_eq!(a.claims["sub"], seed::ENTERPRISE_ID);
    assert_eq!(a.claims["box_sub_type"], "enterprise");
    assert_eq!(a.claims["aud"], BOX_TOKEN_AUDIENCE);
    let jti = a.claims["jti"].as_str().unwrap();
    assert!((16..=128).contains(&jti.len()));
    let exp = a.claims["exp"].as_i64().unwrap();
    let iat = a.claims["iat"].as_i64().unwrap();
    assert!(exp > iat && exp - iat <= 60, "exp must be at most 60 s ahead");
    assert_eq!(a.form_fields, ["grant_type", "assertion", "client_id", "client_secret"]);
}

#[tokio::test]
async fn the_issued_token_works_against_the_box_api() {
    let h = Harness::start().await;
    let token = token_of(&h.get(user(seed::APP_USER_IDS[1])).await.unwrap());
    let me: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/2.0/users/me", h.fake_server.base_url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["id"], seed::APP_USER_IDS[1]);
}

#[tokio::test]
async fn app_user_and_managed_user_tokens_are_minted_for_those_users() {
    let h = Harness::start().await;
    let app_user = token_of(&h.get(user(seed::APP_USER_IDS[0])).await.unwrap());
    let managed = token_of(&h.get(user(seed::MANAGED_USER_ID)).await.unwrap());
    assert_eq!(h.fake.token_user_id(&app_user).as_deref(), Some(seed::APP_USER_IDS[0]));
    assert_eq!(h.fake.token_user_id(&managed).as_deref(), Some(seed::MANAGED_USER_ID));
    let seen = h.fake.accepted_assertions();
    let subjects: Vec<&str> = seen.iter().filter_map(|a| a.claims["sub"].as_str()).collect();
    assert_eq!(
        subjects,
        [seed::ENTERPRISE_ID, seed::APP_USER_IDS[0], seed::MANAGED_USER_ID],
        "the Service Account's token (to check the users), then one per user"
    );
    assert_eq!(h.fake.stats().user_reads, 2, "each user checked before its first token");
}

#[tokio::test]
async fn rs512_is_used_when_configured() {
    let h = Harness::with(Options {
        algorithm: JwtAlgorithm::RS512,
        ..Options::default()
    })
    .await;
    h.get(enterprise()).await.unwrap();
    assert_eq!(h.fake.accepted_assertions().last().unwrap().alg, Algorithm::RS512);
}

#[tokio::test]
async fn rs384_is_used_when_configured() {
    let h = Harness::with(Options {
        algorithm: JwtAlgorithm::RS384,
        ..Options::default()
    })
    .await;
    h.get(enterprise()).await.unwrap();
    assert_eq!(h.fake.accepted_assertions().last().unwrap().alg, Algorithm::RS384);
}

#[tokio::test]
async fn every_mint_uses_a_fresh_jti() {
    let h = Harness::start().await;
    for _ in 0..3 {
        let mut request = enterprise();
        request.force_refresh = true;
        h.get(request).await.unwrap();
        // Past the forced-refresh interval, so the next forced request mints.
        h.clock.advance(Duration::from_secs(6));
    }
    let jtis: std::collections::HashSet<String> = h
        .fake
        .accepted_assertions()
        .iter()
        .map(|a| a.claims["jti"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(jtis.len(), 3);
}

#[tokio::test]
async fn expires_at_follows_box_expires_in() {
    let h = Harness::start().await;
    h.fake.set_token_lifetime(Some(Duration::from_secs(4000)));
    let before = h.clock_now();
    let response = h.get(enterprise()).await.unwrap();
    let expires_at = response.token.unwrap().expires_at.unwrap().seconds;
    let lifetime = expires_at - before;
    assert!((3999..=4001).contains(&lifetime), "lifetime {lifetime}");
}

#[tokio::test]
async fn ccg_enterprise_and_user_tokens_are_minted() {
    let h = Harness::with(Options {
        auth: FakeAuth::Ccg,
        ..Options::default()
    })
    .await;
    let sa = token_of(&h.get(enterprise()).await.unwrap());
    let app_user = token_of(&h.get(user(seed::APP_USER_IDS[2])).await.unwrap());
    assert_eq!(h.fake.token_user_id(&sa).as_deref(), Some(seed::SERVICE_ACCOUNT_ID));
    assert_eq!(h.fake.token_user_id(&app_user).as_deref(), Some(seed::APP_USER_IDS[2]));
    let stats = h.fake.stats();
    assert_eq!((stats.ccg_issued, stats.jwt_requests), (2, 0));
}

trait ClockNow {
    fn clock_now(&self) -> i64;
}

impl ClockNow for Harness {
    fn clock_now(&self) -> i64 {
        use box_token_broker::clock::Clock as _;
        self.clock
            .now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }
}
