//! Traces reach an in-process OTLP collector (the RPC span and its upstream
//! child), and a canary scenario with known secret values leaves none of them
//! in any log line, span attribute, metric or error message.
//! The subscriber and collector are the binary's one global pair (common).

use crate::common;

use box_token_broker::{fakebox::Fault, fakebox::seed};
use common::{Harness, Options, enterprise, token_of, user};
use opentelemetry_proto::tonic::trace::v1::Span;
use secrecy::ExposeSecret as _;

pub(crate) fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        kv.value.as_ref().and_then(|v| match &v.value {
            Some(Value::StringValue(s)) => Some(s.clone()),
            Some(Value::IntValue(i)) => Some(i.to_string()),
            Some(Value::BoolValue(b)) => Some(b.to_string()),
            _ => None,
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rpc_span_and_its_upstream_child_reach_the_collector() {
    let o = common::observed();
    let h = Harness::start().await;
    let mut request = tonic::Request::new(user(seed::APP_USER_IDS[2]));
    request
        .metadata_mut()
        .insert("x-request-id", "trace-test-1".parse().unwrap());
    h.client.clone().get_token(request).await.unwrap();

    let spans = common::spans(o);
    let rpc = spans
        .iter()
        .find(|s| s.name == "GetToken" && attribute(s, "request_id").as_deref() == Some("trace-test-1"))
        .expect("the RPC span");
    assert_eq!(attribute(rpc, "caller").as_deref(), Some("anonymous"));
    assert_eq!(attribute(rpc, "subject_type").as_deref(), Some("user"));
    assert_eq!(attribute(rpc, "cache_hit").as_deref(), Some("false"));
    let upstream = spans
        .iter()
        .find(|s| s.name == "box.token_request" && s.parent_span_id == rpc.span_id)
        .expect("the upstream span is the RPC span's child");
    assert_eq!(upstream.trace_id, rpc.trace_id);
    assert_eq!(attribute(upstream, "grant").as_deref(), Some("jwt-bearer"));
    assert_eq!(attribute(upstream, "outcome").as_deref(), Some("200"));
    assert_eq!(attribute(upstream, "attempt").as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_scenario_leaves_no_secret_in_logs_spans_metrics_or_errors() {
    let o = common::observed();
    let h = Harness::with(Options {
        admin: true,
        api_keys: vec![("portal", "canary-api-key-0001")],
        policy: Some(box_token_broker::policy::Policy::allow_everything("*")),
        ..Options::default()
    })
    .await;
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics.local_addr().unwrap();
    tokio::spawn(box_token_broker::metrics::serve(
        metrics,
        box_token_broker::metrics::registry(
            box_token_broker::metrics::Served::Broker(h.broker.clone()),
            h.rpc_metrics.clone(),
            std::sync::Arc::default(),
        ),
        std::sync::Arc::default(),
        std::future::pending(),
    ));

    let mut secrets = common::key_material();
    secrets.push(h.app.client_secret.expose_secret().to_owned());
    secrets.push("canary-api-key-0001".to_owned());
    secrets.push(common::ADMIN_KEY.to_owned());
    let mut errors = Vec::new();

    // Tokens: full, downscoped, forced, through retries and a failure.
    let mut with_key = tonic::Request::new(enterprise());
    with_key
        .metadata_mut()
        .insert("x-api-key", "canary-api-key-0001".parse().unwrap());
    secrets.push(token_of(
        &h.client.clone().get_token(with_key).await.unwrap().into_inner(),
    ));
    h.fake.fail_next(2, Fault::ServerError { status: 503 });
    secrets.push(token_of(&h.get(user(seed::APP_USER_IDS[0])).await.unwrap()));
    let child = h
        .downscoped(common::downscope(
            user(seed::APP_USER_IDS[0]),
            &["item_preview"],
            common::folder(seed::APP_USER_FOLDER_ID),
        ))
        .await
        .unwrap()
        .token
        .unwrap()
        .access_token;
    secrets.push(child.clone());
    h.revoke(&child).await.unwrap();
    errors.push(h.revoke(&child).await.unwrap_err().message().to_owned());
    h.fake.fail_next(1, Fault::RateLimited { retry_after_secs: 30 });
    errors.push(
        h.get(user(seed::APP_USER_IDS[1]))
            .await
            .unwrap_err()
            .message()
            .to_owned(),
    );
    // The 429 held the circuit open for 30 s.
    h.clock.advance(std::time::Duration::from_secs(31));
    let mut wrong = tonic::Request::new(enterprise());
    wrong
        .metadata_mut()
        .insert("x-api-key", "canary-wrong-key-0002".parse().unwrap());
    secrets.push("canary-wrong-key-0002".to_owned());
    errors.push(
        h.client
            .clone()
            .get_token(wrong)
            .await
            .unwrap_err()
            .message()
            .to_owned(),
    );
    // A client-secret rotation through the admin RPC, with a canary secret.
    secrets.push("canary-rotated-secret-0003".to_owned());
    h.fake.set_client_secret(&h.app.client_id, "canary-rotated-secret-0003");
    h.admin
        .as_ref()
        .unwrap()
        .client
        .clone()
        .rotate_client_secret(common::admin_request(box_token_broker::pb::RotateClientSecretRequest {
            app: String::new(),
            new_secret: "canary-rotated-secret-0003".to_owned(),
        }))
        .await
        .unwrap();
    let mut forced = enterprise();
    forced.force_refresh = true;
    secrets.push(token_of(&h.get(forced).await.unwrap()));

    let scraped = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let spans = format!("{:?}", common::spans(o));
    let logs = o.logs.text();
    let audit = String::from_utf8(h.audit.lock().unwrap().clone()).unwrap();
    assert!(spans.contains("GetToken") && scraped.contains("boxbroker_rpc_requests_total"));
    for (what, text) in [
        ("logs", &logs),
        ("spans", &spans),
        ("metrics", &scraped),
        ("audit", &audit),
        ("errors", &errors.join("\n")),
    ] {
        common::assert_free_of(text, &secrets, what);
    }
}
