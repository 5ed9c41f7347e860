//! Box faults, as the caller sees them: success after retries, a fast
//! Unavailable, or the cached token still served — with the exact number of
//! upstream attempts (the fake's `token_arrivals`).

use crate::common;

use std::time::Duration;

use box_token_broker::{boxapi::client::UpstreamPolicy, fakebox::Fault, fakebox::seed};
use common::{Harness, Options, assert_status, enterprise, pushback_ms, test_upstream, token_of, user};
use tonic::Code;

async fn harness_with(upstream: UpstreamPolicy) -> Harness {
    Harness::with(Options {
        upstream,
        ..Options::default()
    })
    .await
}

fn arrivals(h: &Harness) -> u64 {
    h.fake.stats().token_arrivals
}

fn reply(status: u16, body: &str) -> Fault {
    Fault::Reply {
        status,
        body: body.to_owned(),
    }
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_and_retried() {
    let h = Harness::start().await;
    h.fake.fail_next(1, Fault::RateLimited { retry_after_secs: 1 });
    let started = std::time::Instant::now();
    h.get(enterprise()).await.unwrap();
    assert_eq!(arrivals(&h), 2);
    assert!(started.elapsed() >= Duration::from_secs(1), "Retry-After was honoured");
}

#[tokio::test]
async fn a_run_of_500s_is_retried_with_backoff_until_it_passes() {
    let h = Harness::start().await;
    h.fake.fail_next(3, Fault::ServerError { status: 500 });
    h.get(enterprise()).await.unwrap();
    assert_eq!(arrivals(&h), 4, "three failures and the success");
    assert_eq!(h.fake.stats().jwt_issued, 1);
}

#[tokio::test]
async fn a_hang_past_the_attempt_timeout_is_abandoned_and_retried() {
    let h = harness_with(UpstreamPolicy {
        attempt_timeout: Duration::from_millis(300),
        ..test_upstream()
    })
    .await;
    h.fake.fail_next(1, Fault::Hang);
    h.get(enterprise()).await.unwrap();
    assert_eq!(arrivals(&h), 2);
}

#[tokio::test]
async fn a_request_that_hangs_past_the_deadline_fails_fast_as_unavailable() {
    let h = harness_with(UpstreamPolicy {
        attempt_timeout: Duration::from_millis(500),
        deadline: Duration::from_millis(800),
        ..test_upstream()
    })
    .await;
    h.fake.fail_next(10, Fault::Hang);
    let status = h.get(enterprise()).await.unwrap_err();
    assert_status(&status, Code::Unavailable, "did not answer in time");
    // 500 ms, then the 300 ms the deadline leaves; no third attempt.
    assert_eq!(arrivals(&h), 2);
}

#[tokio::test]
async fn a_connection_reset_is_retried() {
    let h = Harness::start().await;
    h.fake.fail_next(1, Fault::Reset);
    h.get(enterprise()).await.unwrap();
    assert_eq!(arrivals(&h), 2);
}

#[tokio::test]
async fn malformed_json_or_a_missing_expires_in_is_unavailable_and_not_retried() {
    let h = Harness::start().await;
    h.fake.fail_next(1, reply(200, "{\"access_token\": \"abc\", "));
    assert_status(
        &h.get(enterprise()).await.unwrap_err(),
        Code::Unavailable,
        "a response the broker cannot use",
    );
    assert_eq!(arrivals(&h), 1);
    h.fake.fail_next(
        1,
        reply(200, "{\"access_token\": \"abcdef\", \"token_type\": \"bearer\"}"),
    );
    assert_status(
        &h.get(enterprise()).await.unwrap_err(),
        Code::Unavailable,
        "a response the broker cannot use",
    );
    assert_eq!(arrivals(&h), 2);
}

#[tokio::test]
async fn other_refusals_are_never_retried() {
    let h = Harness::start().await;
    h.fake.update_app(&h.app.client_id, |a| a.authorized = false);
    assert_eq!(h.get(enterprise()).await.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(arrivals(&h), 1);
}

#[tokio::test]
async fn ten_minutes_of_clock_skew_either_way_is_recovered_and_remembered() {
    for skew in [600, -600] {
        let h = Harness::start().await;
        h.fake.set_skew_secs(skew);
        h.get(enterprise()).await.unwrap();
        assert_eq!(
            arrivals(&h),
            2,
            "skew {skew}: refused once, then rebuilt with Box's Date"
        );
        // The next mint uses the learned offset at once.
        h.get(user(seed::APP_USER_IDS[0])).await.unwrap();
        assert_eq!(arrivals(&h), 3, "skew {skew}: no second refusal");
        let skew_ms = h.broker.apps().next().unwrap().client.clock_skew_millis();
        assert!(
            (skew_ms - skew * 1000).abs() < 2000,
            "learned {skew_ms} ms for {skew} s"
        );
    }
}

#[tokio::test]
async fn an_open_circuit_fails_fast_with_a_retry_hint_and_a_probe_closes_it() {
    let h = harness_with(UpstreamPolicy {
        max_attempts: 1,
        breaker_threshold: 2,
        breaker_cooldown: Duration::from_secs(30),
        ..test_upstream()
    })
    .await;
    h.fake.fail_next(2, Fault::ServerError { status: 503 });
    for _ in 0..2 {
        assert_eq!(h.get(enterprise()).await.unwrap_err().code(), Code::Unavailable);
    }
    assert_eq!(arrivals(&h), 2);
    // Open: refused at once, Box is not asked.
    let fast = h.get(user(seed::APP_USER_IDS[0])).await.unwrap_err();
    assert_status(&fast, Code::Unavailable, "not asking it for 30 s");
    let pushback = pushback_ms(&fast);
    assert!((29_000..=30_000).contains(&pushback), "{pushback}");
    assert_eq!(arrivals(&h), 2);
    // After the cooldown one probe goes through; it succeeds and closes the circuit.
    h.clock.advance(Duration::from_secs(31));
    h.get(enterprise()).await.unwrap();
    h.get(user(seed::APP_USER_IDS[0])).await.unwrap();
    assert_eq!(arrivals(&h), 4);
}

#[tokio::test]
async fn a_429_storm_holds_every_request_until_retry_after() {
    let h = Harness::start().await;
    h.fake.fail_next(1, Fault::RateLimited { retry_after_secs: 100 });
    let first = h.get(enterprise()).await.unwrap_err();
    assert_eq!(
        first.metadata().get("grpc-retry-pushback-ms").unwrap(),
        "100000",
        "Box's Retry-After"
    );
    for id in seed::APP_USER_IDS {
        let held = h.get(user(id)).await.unwrap_err();
        assert_eq!(held.code(), Code::Unavailable);
    }
    assert_eq!(arrivals(&h), 1, "the broker did not amplify the storm");
    h.clock.advance(Duration::from_secs(101));
    h.get(enterprise()).await.unwrap();
    assert_eq!(arrivals(&h), 2);
}

#[tokio::test]
async fn a_total_outage_longer_than_the_margins_serves_cached_tokens_until_the_margin_and_never_an_expired_one() {
    let h = harness_with(UpstreamPolicy {
        max_attempts: 2,
        breaker_threshold: 3,
        ..test_upstream()
    })
    .await;
    let lifetime = Duration::from_secs(3600);
    h.fake.set_token_lifetime(Some(lifetime));
    let token = token_of(&h.get(enterprise()).await.unwrap());
    // Box goes down for good.
    h.fake.fail_next(100_000, Fault::ServerError { status: 503 });
    let margin = box_token_broker::cache::DEFAULT_SAFETY_MARGIN;
    // Through the refresh-ahead window to just before the margin: the cached token keeps flowing.
    let mut served_until = Duration::ZERO;
    for step in 1..=20u32 {
        let at = (lifetime - margin - Duration::from_secs(1)) * step / 20;
        h.clock.advance(at - served_until);
        served_until = at;
        let response = h.get(enterprise()).await.unwrap();
        assert_eq!(
            token_of(&response),
            token,
            "the cached token is served while the refresh fails"
        );
        let expires = response.token.unwrap().expires_at.unwrap().seconds;
        let now = box_token_broker::clock::unix_seconds(box_token_broker::clock::Clock::now(&*h.clock));
        assert!(
            expires > now + margin.as_secs() as i64 - 1,
            "never a token inside the margin"
        );
    }
    // Past the margin: no token rather than an (almost) expired one.
    h.clock.advance(Duration::from_secs(2));
    assert_eq!(h.get(enterprise()).await.unwrap_err().code(), Code::Unavailable);
    // Within three failed requests the circuit opens: then new subjects fail
    // at once, without asking Box.
    let mut fast = None;
    for id in seed::APP_USER_IDS.into_iter().chain([seed::MANAGED_USER_ID]) {
        let before = arrivals(&h);
        let status = h.get(user(id)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        if arrivals(&h) == before {
            fast = Some(status);
            break;
        }
    }
    assert_status(&fast.expect("the circuit opened"), Code::Unavailable, "not asking it");
}

#[tokio::test]
async fn a_min_ttl_the_cached_token_cannot_meet_while_box_is_down_is_unavailable_saying_so() {
    let h = Harness::start().await;
    h.fake.set_token_lifetime(Some(Duration::from_secs(3600)));
    h.get(enterprise()).await.unwrap();
    h.clock.advance(Duration::from_secs(3600 - 120 - 600));
    h.fake.fail_next(100, Fault::ServerError { status: 503 });
    // 600 s are left beyond the margin: enough for min_ttl 300, not for 900.
    let mut modest = enterprise();
    modest.min_ttl = common::secs(300);
    h.get(modest).await.unwrap();
    let mut demanding = enterprise();
    demanding.min_ttl = common::secs(900);
    let status = h.get(demanding).await.unwrap_err();
    assert_status(
        &status,
        Code::Unavailable,
        "min_ttl cannot be met: the cached token has 59",
    );
    assert!(status.message().contains("HTTP 503") && status.message().contains("ask for a smaller min_ttl"));
}
