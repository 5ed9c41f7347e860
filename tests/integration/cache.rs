//! The token cache as callers observe it: upstream call counts and tokens.

use crate::common;

use std::time::Duration;

use box_token_broker::{
    cache::{CachePolicy, DEFAULT_SAFETY_MARGIN},
    fakebox::seed,
};
use common::{Harness, Options, enterprise, secs, token_of, user};
use tonic::Code;

const LIFETIME: Duration = Duration::from_secs(3600);

/// A harness whose cache has no refresh-ahead, so only the safety `margin` decides.
async fn margin_only(margin: Duration) -> Harness {
    let cache = CachePolicy {
        safety_margin: margin,
        refresh_ahead: Duration::ZERO,
        refresh_jitter: Duration::ZERO,
        ..CachePolicy::default()
    };
    let h = Harness::with(Options {
        cache,
        ..Options::default()
    })
    .await;
    h.fake.set_token_lifetime(Some(LIFETIME));
    h
}

async fn harness() -> Harness {
    let h = Harness::start().await;
    h.fake.set_token_lifetime(Some(LIFETIME));
    h
}

#[tokio::test]
async fn second_request_is_served_from_cache() {
    let h = harness().await;
    let first = h.get(enterprise()).await.unwrap();
    let second = h.get(enterprise()).await.unwrap();
    assert!(!first.cache_hit);
    assert!(second.cache_hit);
    assert_eq!(token_of(&first), token_of(&second));
    assert_eq!(h.fake.stats().token_requests, 1);
}

#[tokio::test]
async fn subjects_are_cached_separately() {
    let h = harness().await;
    let sa = token_of(&h.get(enterprise()).await.unwrap());
    let u1 = token_of(&h.get(user(seed::APP_USER_IDS[0])).await.unwrap());
    let u2 = token_of(&h.get(user(seed::APP_USER_IDS[1])).await.unwrap());
    assert!(sa != u1 && u1 != u2);
    assert!(h.get(user(seed::APP_USER_IDS[0])).await.unwrap().cache_hit);
    assert_eq!(h.fake.stats().jwt_issued, 3);
}

#[tokio::test]
async fn a_token_inside_the_safety_margin_is_reminted() {
    let h = margin_only(DEFAULT_SAFETY_MARGIN).await;
    let first = token_of(&h.get(enterprise()).await.unwrap());
    // One second before the default 120 s margin begins: still served.
    h.clock.advance(LIFETIME - Duration::from_secs(122));
    let still = h.get(enterprise()).await.unwrap();
    assert_eq!(token_of(&still), first);
    // Now inside the margin: a new token is minted and returned.
    h.clock.advance(Duration::from_secs(2));
    let next = h.get(enterprise()).await.unwrap();
    assert!(!next.cache_hit);
    assert_ne!(token_of(&next), first);
    assert_eq!(h.fake.stats().jwt_issued, 2);
}

#[tokio::test]
async fn a_token_in_the_refresh_window_is_served_and_refreshed_in_the_background() {
    let h = harness().await;
    let first = token_of(&h.get(enterprise()).await.unwrap());
    // 400 s before expiry: past the (jittered) refresh point, before the margin.
    h.clock.advance(LIFETIME - Duration::from_secs(400));
    let during = h.get(enterprise()).await.unwrap();
    assert!(during.cache_hit, "the caller does not wait for the refresh");
    assert_eq!(token_of(&during), first);
    assert!(
        h.wait_for(|s| s.jwt_issued == 2).await,
        "a background refresh mints once"
    );
    let after = h.get(enterprise()).await.unwrap();
    assert!(after.cache_hit);
    assert_ne!(token_of(&after), first, "the refreshed token replaces the old one");
    assert_eq!(h.fake.stats().jwt_issued, 2);
}

#[tokio::test]
async fn concurrent_cold_requests_cause_exactly_one_mint() {
    let h = harness().await;
    // Latency makes every request arrive while the one mint is in flight.
    h.fake.set_latency(Duration::from_millis(300));
    let mut calls = Vec::new();
    for _ in 0..200 {
        let mut client = h.client.clone();
        calls.push(tokio::spawn(async move {
            client.get_token(enterprise()).await.map(|r| r.into_inner())
        }));
    }
    let mut tokens = std::collections::HashSet::new();
    for call in calls {
        tokens.insert(token_of(&call.await.unwrap().unwrap()));
    }
    assert_eq!(tokens.len(), 1, "every caller gets the same token");
    assert_eq!(h.fake.stats().token_requests, 1, "exactly one upstream mint");
}

#[tokio::test]
async fn min_ttl_beyond_the_cached_tokens_life_mints_anew() {
    let h = harness().await;
    let first = token_of(&h.get(enterprise()).await.unwrap());
    h.clock.advance(Duration::from_secs(1800));
    // 1800 s left; 1600 s + 120 s margin fits.
    let mut fits = enterprise();
    fits.min_ttl = secs(1600);
    assert_eq!(token_of(&h.get(fits).await.unwrap()), first);
    // 1700 s + 120 s margin does not.
    let mut too_long = enterprise();
    too_long.min_ttl = secs(1700);
    let response = h.get(too_long).await.unwrap();
    assert!(!response.cache_hit);
    assert_ne!(token_of(&response), first);
    assert_eq!(h.fake.stats().jwt_issued, 2);
}

#[tokio::test]
async fn force_refresh_mints_anew_and_replaces_the_cached_token() {
    let h = harness().await;
    let first = token_of(&h.get(enterprise()).await.unwrap());
    let mut force = enterprise();
    force.force_refresh = true;
    // Within the interval, a forced request gets the token just minted.
    let soon = h.get(force.clone()).await.unwrap();
    assert!(soon.cache_hit);
    assert_eq!(token_of(&soon), first);
    assert_eq!(h.fake.stats().jwt_issued, 1);
    h.clock.advance(Duration::from_secs(6));
    let forced = h.get(force).await.unwrap();
    assert!(!forced.cache_hit);
    assert_ne!(token_of(&forced), first);
    let after = h.get(enterprise()).await.unwrap();
    assert_eq!(token_of(&after), token_of(&forced));
    assert_eq!(h.fake.stats().jwt_issued, 2);
}

#[tokio::test]
async fn a_min_ttl_box_cannot_meet_is_unavailable_after_one_mint() {
    let h = Harness::start().await;
    h.fake.set_token_lifetime(Some(Duration::from_secs(600)));
    let mut request = enterprise();
    request.min_ttl = secs(1000);
    let status = h.get(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("min_ttl cannot be met"),
        "{}",
        status.message()
    );
    assert_eq!(h.fake.stats().jwt_issued, 1);
}

#[tokio::test]
async fn a_min_ttl_longer_than_any_box_token_is_invalid() {
    let h = harness().await;
    let mut request = enterprise();
    request.min_ttl = secs(4 * 3600);
    let status = h.get(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("min_ttl"), "{}", status.message());
    assert_eq!(h.fake.stats().token_requests, 0);
}

#[tokio::test]
async fn a_configured_larger_margin_is_honoured() {
    let h = margin_only(Duration::from_secs(900)).await;
    let first = token_of(&h.get(enterprise()).await.unwrap());
    h.clock.advance(LIFETIME - Duration::from_secs(899));
    assert_ne!(token_of(&h.get(enterprise()).await.unwrap()), first);
}

#[tokio::test]
async fn a_failed_mint_is_not_cached_and_the_next_request_retries() {
    let h = harness().await;
    // Every attempt of the first request fails (4 attempts: 1 + 3 retries).
    h.fake
        .fail_next(4, box_token_broker::fakebox::Fault::ServerError { status: 503 });
    assert_eq!(h.get(enterprise()).await.unwrap_err().code(), Code::Unavailable);
    assert_eq!(h.fake.stats().token_arrivals, 4);
    assert!(!h.get(enterprise()).await.unwrap().cache_hit);
    assert_eq!(h.fake.stats().token_arrivals, 5);
}
