//! Starting, stopping and limits: health flips to NOT_SERVING first, in-flight
//! requests drain, and callers over a limit get ResourceExhausted naming it.

use crate::common;

use std::time::Duration;

use box_token_broker::{broker::UpstreamBudget, fakebox::seed, pb, service::ServeOptions};
use common::{Harness, Options, assert_status, enterprise, user};
use tonic::{Code, metadata::MetadataValue};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

async fn harness(serve: ServeOptions) -> Harness {
    Harness::with(Options {
        serve,
        ..Options::default()
    })
    .await
}

async fn health(h: &Harness, service: &str) -> Result<ServingStatus, tonic::Status> {
    HealthClient::new(h.channel.clone())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map(|r| r.into_inner().status())
}

/// Whether health says NOT_SERVING within a hundred looks.
async fn flips_to_not_serving(h: &Harness) -> bool {
    for _ in 0..100 {
        if health(h, "").await.unwrap() == ServingStatus::NotServing {
            return true;
        }
        tokio::task::yield_now().await;
    }
    false
}

fn forced(id: &str) -> pb::GetTokenRequest {
    let mut request = user(id);
    request.force_refresh = true;
    request
}

#[tokio::test]
async fn health_is_serving_once_up_and_flips_before_requests_are_refused() {
    let mut h = harness(ServeOptions {
        drain_delay: Duration::from_millis(500),
        ..ServeOptions::default()
    })
    .await;
    assert_eq!(health(&h, "").await.unwrap(), ServingStatus::Serving);
    assert_eq!(
        health(&h, "boxbroker.v1.TokenBrokerService").await.unwrap(),
        ServingStatus::Serving
    );
    let stopped = h.begin_stop();
    // Health says NOT_SERVING at once; requests are still served during the drain delay.
    assert!(flips_to_not_serving(&h).await, "health flipped");
    h.get(enterprise()).await.unwrap();
    stopped.await.unwrap();
}

/// `GET http://{addr}{path}`: the status code and the body.
async fn probe(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn the_kubelets_plain_http_probes_say_what_grpc_health_says() {
    let mut h = Harness::with(Options {
        metrics: true,
        serve: ServeOptions {
            drain_delay: Duration::from_millis(1500),
            ..ServeOptions::default()
        },
        ..Options::default()
    })
    .await;
    let addr = h.metrics.unwrap();
    assert_eq!(health(&h, "").await.unwrap(), ServingStatus::Serving);
    assert_eq!(probe(addr, "/readyz").await, (200, "SERVING\n".to_owned()));
    assert_eq!(probe(addr, "/healthz").await, (200, "ok\n".to_owned()));
    let stopped = h.begin_stop();
    // Draining: not ready (as health says), still alive (no restart mid-drain).
    assert!(flips_to_not_serving(&h).await, "health flipped");
    assert_eq!(probe(addr, "/readyz").await, (503, "NOT_SERVING\n".to_owned()));
    assert_eq!(probe(addr, "/healthz").await.0, 200);
    stopped.await.unwrap();
}

#[tokio::test]
async fn in_flight_requests_finish_when_the_broker_stops() {
    let mut h = harness(ServeOptions::default()).await;
    // Box is slow, so these are in flight when the stop comes.
    h.fake.set_latency(Duration::from_millis(300));
    let mut calls = Vec::new();
    for i in 0..12 {
        let mut client = h.client.clone();
        let id = seed::APP_USER_IDS[i % 3];
        calls.push(tokio::spawn(async move { client.get_token(forced(id)).await }));
    }
    assert!(h.fake.wait_for(Duration::from_secs(5), |s| s.token_arrivals >= 3).await);
    let stopped = h.begin_stop();
    for call in calls {
        call.await.unwrap().expect("an in-flight request fails");
    }
    stopped.await.unwrap();
    assert!(h.get(enterprise()).await.is_err(), "nothing is accepted after the stop");
}

#[tokio::test]
async fn over_the_concurrency_limit_is_resource_exhausted_naming_it() {
    let h = Harness::with(Options {
        budget: Some(UpstreamBudget::new(1, 64)),
        ..Options::default()
    })
    .await;
    // The Service Account's token and the user's check are in hand.
    h.get(user(seed::APP_USER_IDS[0])).await.unwrap();
    // Past the force-refresh interval: the forced request mints.
    h.clock.advance(Duration::from_secs(6));
    let arrivals = h.fake.stats().token_arrivals;
    h.fake.set_latency(Duration::from_millis(500));
    let mut slow = h.client.clone();
    let first = tokio::spawn(async move { slow.get_token(forced(seed::APP_USER_IDS[0])).await });
    assert!(
        h.fake
            .wait_for(Duration::from_secs(5), |s| s.token_arrivals > arrivals)
            .await
    );
    // Another user's check would be one more call to Box.
    let refused = h.get(user(seed::APP_USER_IDS[1])).await.unwrap_err();
    assert_status(
        &refused,
        Code::ResourceExhausted,
        "at its limit of 1 concurrent requests calling Box ([server] max_concurrent_requests)",
    );
    first.await.unwrap().unwrap();
    h.fake.set_latency(Duration::ZERO);
    h.get(enterprise()).await.unwrap();
    let events = h.audit_events();
    assert!(events.iter().any(|e| e["code"] == "RESOURCE_EXHAUSTED"));
}

#[tokio::test]
async fn a_caller_over_its_rate_limit_is_resource_exhausted_and_others_are_not() {
    let h = Harness::with(Options {
        serve: ServeOptions {
            rate_limit: Some((0.001, 2)),
            ..ServeOptions::default()
        },
        api_keys: vec![("portal", "portal-key-1"), ("billing", "billing-key-1")],
        policy: Some(box_token_broker::policy::Policy::allow_everything("*")),
        ..Options::default()
    })
    .await;
    let with_key = |key: &str| {
        let mut request = tonic::Request::new(enterprise());
        request
            .metadata_mut()
            .insert("x-api-key", MetadataValue::try_from(key).unwrap());
        request
    };
    let mut client = h.client.clone();
    client.get_token(with_key("portal-key-1")).await.unwrap();
    client.get_token(with_key("portal-key-1")).await.unwrap();
    let limited = client.get_token(with_key("portal-key-1")).await.unwrap_err();
    assert_status(
        &limited,
        Code::ResourceExhausted,
        "caller \"apikey:portal\" is over its rate limit of 0.001 requests per second (burst 2",
    );
    assert!(limited.metadata().get("grpc-retry-pushback-ms").is_some());
    client.get_token(with_key("billing-key-1")).await.unwrap();
}

#[tokio::test]
async fn an_oversized_request_is_refused_naming_the_limit() {
    let h = harness(ServeOptions {
        max_message_bytes: 1024,
        ..ServeOptions::default()
    })
    .await;
    let scopes: Vec<&str> = std::iter::repeat_n("item_preview", 200).collect();
    let big = common::downscope(enterprise(), &scopes, common::folder(seed::SERVICE_ACCOUNT_FOLDER_ID));
    let refused = h.downscoped(big).await.unwrap_err();
    assert_status(
        &refused,
        Code::ResourceExhausted,
        "over the limit of 1024 bytes ([server] max_message_bytes)",
    );
    // Far beyond the limit too: refused from the length prefix, never read.
    let scopes: Vec<&str> = std::iter::repeat_n("item_preview", 2000).collect();
    let huge = common::downscope(enterprise(), &scopes, common::folder(seed::SERVICE_ACCOUNT_FOLDER_ID));
    let refused = h.downscoped(huge).await.unwrap_err();
    assert_status(
        &refused,
        Code::ResourceExhausted,
        "over the limit of 1024 bytes ([server] max_message_bytes)",
    );
    h.get(enterprise()).await.unwrap();
    // Audited, though no handler ran.
    let events = h.audit_events();
    let oversized: Vec<_> = events
        .iter()
        .filter(|e| e["rpc"] == "GetDownscopedToken" && e["code"] == "RESOURCE_EXHAUSTED")
        .collect();
    assert_eq!(oversized.len(), 2, "{events:?}");
    assert_eq!(oversized[0]["decision"], "deny");
    assert_eq!(oversized[0]["caller"], "anonymous");
    assert!(
        oversized[1]["reason"]
            .as_str()
            .unwrap()
            .starts_with("the request is 28013 bytes")
    );
    assert!(oversized[0]["request_id"].is_string());
}

#[tokio::test]
async fn every_response_carries_a_request_id_that_is_also_audited() {
    let h = Harness::start().await;
    let mut request = tonic::Request::new(enterprise());
    request
        .metadata_mut()
        .insert("x-request-id", "caller-chosen-42".parse().unwrap());
    let response = h.client.clone().get_token(request).await.unwrap();
    assert_eq!(response.metadata().get("x-request-id").unwrap(), "caller-chosen-42");
    let refused = h.get(user("not-a-number")).await.unwrap_err();
    let made = refused
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(made.len(), 16);
    let events = h.audit_events();
    assert_eq!(events[0]["request_id"], "caller-chosen-42");
    assert_eq!(events[1]["request_id"], made.as_str());
}
