//! Bad requests get a precise status and a message that says what to fix;
//! the server also answers health checks and reflection.

use crate::common;

use box_token_broker::pb;
use common::{Harness, Options, assert_status, enterprise, user};
use tonic::Code;

#[tokio::test]
async fn a_request_without_a_subject_is_invalid() {
    let h = Harness::start().await;
    let s = h.get(pb::GetTokenRequest::default()).await.unwrap_err();
    assert_status(&s, Code::InvalidArgument, "subject is required");
    let empty_subject = pb::GetTokenRequest {
        subject: Some(pb::Subject {
            kind: None,
            create_if_missing: None,
        }),
        ..Default::default()
    };
    assert_status(
        &h.get(empty_subject).await.unwrap_err(),
        Code::InvalidArgument,
        "subject is required",
    );
    assert_eq!(h.fake.stats().token_requests, 0);
}

#[tokio::test]
async fn an_empty_user_id_is_invalid() {
    let h = Harness::start().await;
    assert_status(
        &h.get(user("")).await.unwrap_err(),
        Code::InvalidArgument,
        "subject.user_id is empty",
    );
}

#[tokio::test]
async fn a_non_numeric_user_id_is_invalid_and_quoted() {
    let h = Harness::start().await;
    let s = h.get(user("alice@example.com")).await.unwrap_err();
    assert_status(
        &s,
        Code::InvalidArgument,
        "\"alice@example.com\" is not a numeric Box user id",
    );
    let s = h.get(user("12\n34")).await.unwrap_err();
    assert!(!s.message().contains('\n'), "control characters are not echoed");
}

#[tokio::test]
async fn an_unknown_app_is_not_found_and_lists_the_apps_the_caller_may_use() {
    let h = Harness::start().await;
    let mut request = enterprise();
    request.app = "nosuchapp".to_owned();
    let s = h.get(request).await.unwrap_err();
    assert_status(&s, Code::NotFound, "no app named \"nosuchapp\"");
    assert!(s.message().contains("(apps you may use: default)"), "{}", s.message());
}

#[tokio::test]
async fn an_empty_app_is_the_only_app_when_there_is_one() {
    let h = Harness::start().await;
    h.get(enterprise()).await.unwrap();
    let mut named = enterprise();
    named.app = "default".to_owned();
    assert!(
        h.get(named).await.unwrap().cache_hit,
        "the same app, the same cache entry"
    );
}

#[tokio::test]
async fn an_empty_app_is_invalid_when_several_are_configured() {
    let h = Harness::with(Options {
        extra_apps: vec!["portal"],
        ..Options::default()
    })
    .await;
    let s = h.get(enterprise()).await.unwrap_err();
    assert_status(&s, Code::InvalidArgument, "app is required");
    assert!(s.message().contains("default, portal"));
    let mut named = enterprise();
    named.app = "portal".to_owned();
    h.get(named).await.unwrap();
}

#[tokio::test]
async fn a_negative_min_ttl_is_invalid() {
    let h = Harness::start().await;
    let mut request = enterprise();
    request.min_ttl = common::secs(-5);
    assert_status(
        &h.get(request).await.unwrap_err(),
        Code::InvalidArgument,
        "min_ttl must not be negative",
    );
}

#[tokio::test]
async fn anonymous_callers_are_unauthenticated_unless_allowed() {
    let h = Harness::with(Options {
        allow_anonymous: false,
        ..Options::default()
    })
    .await;
    let s = h.get(enterprise()).await.unwrap_err();
    assert_status(&s, Code::Unauthenticated, "anonymous callers are not admitted");
    assert_eq!(h.fake.stats().token_requests, 0);
}

#[tokio::test]
async fn health_reports_the_broker_as_serving() {
    let h = Harness::start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(h.channel.clone());
    for service in ["", "boxbroker.v1.TokenBrokerService"] {
        let response = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
}

/// One reflection (v1) request on `channel`, and its answer.
async fn reflect(
    channel: tonic::transport::Channel,
    request: tonic_reflection::pb::v1::server_reflection_request::MessageRequest,
) -> Result<tonic_reflection::pb::v1::server_reflection_response::MessageResponse, tonic::Status> {
    use tonic_reflection::pb::v1;
    let request = v1::ServerReflectionRequest {
        message_request: Some(request),
        ..Default::default()
    };
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel);
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    Ok(stream.message().await?.unwrap().message_response.unwrap())
}

/// The services reflection lists on `channel`, sorted.
async fn listed(channel: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let MessageResponse::ListServicesResponse(list) = reflect(channel, MessageRequest::ListServices(String::new()))
        .await
        .unwrap()
    else {
        panic!("a service list")
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}

#[tokio::test]
async fn each_listeners_reflection_lists_only_what_it_serves() {
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    let h = Harness::with(Options {
        admin: true,
        ..Options::default()
    })
    .await;
    let common = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let client_listener = listed(h.channel.clone()).await;
    let mut expected: Vec<&str> = common.to_vec();
    expected.insert(0, "boxbroker.v1.TokenBrokerService");
    assert_eq!(client_listener, expected);
    let admin_channel = tonic::transport::Channel::from_shared(format!("http://{}", h.admin.as_ref().unwrap().addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let admin_listener = listed(admin_channel).await;
    expected[0] = "boxbroker.v1.BrokerAdminService";
    assert_eq!(admin_listener, expected);
    // The client listener does not describe the admin API either.
    let described = reflect(
        h.channel.clone(),
        MessageRequest::FileContainingSymbol("boxbroker.v1.BrokerAdminService".to_owned()),
    )
    .await
    .unwrap_err();
    assert_eq!(described.code(), Code::NotFound, "{described:?}");
}

#[tokio::test]
async fn reflection_is_served_in_both_versions() {
    use tonic_reflection::pb::v1alpha;
    let h = Harness::start().await;
    let names = listed(h.channel.clone()).await;
    assert!(
        names.contains(&"boxbroker.v1.TokenBrokerService".to_owned()),
        "{names:?}"
    );
    assert!(names.contains(&"grpc.health.v1.Health".to_owned()), "{names:?}");

    // grpcurl 1.8 speaks only v1alpha.
    let list_alpha = v1alpha::ServerReflectionRequest {
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
        ..Default::default()
    };
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(h.channel.clone());
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([list_alpha]))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().unwrap().message_response.is_some());
}

/// The `google.rpc.ErrorInfo` of `status`: (reason, domain, metadata).
fn error_info(status: &tonic::Status) -> (String, String, std::collections::HashMap<String, String>) {
    use tonic_types::StatusExt as _;
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    (info.reason, info.domain, info.metadata)
}

#[tokio::test]
async fn every_refusal_carries_a_machine_readable_reason() {
    use box_token_broker::fakebox::{Fault, seed};
    use tonic_types::StatusExt as _;
    let h = Harness::with(Options {
        allow_anonymous: false,
        ..Options::default()
    })
    .await;
    // No credentials.
    let unauthenticated = h.get(enterprise()).await.unwrap_err();
    assert_eq!(error_info(&unauthenticated).0, "UNAUTHENTICATED");
    let h = Harness::start().await;
    // A malformed request.
    let invalid = h.get(user("not-a-number")).await.unwrap_err();
    let (reason, domain, _) = error_info(&invalid);
    assert_eq!(
        (reason.as_str(), domain.as_str()),
        ("INVALID_REQUEST", "box-token-broker")
    );
    // Box does not know the user: the app is named, as metadata.
    let unknown = h.get(user("7999999")).await.unwrap_err();
    let (reason, _, metadata) = error_info(&unknown);
    assert_eq!(reason, "BOX_SUBJECT_NOT_FOUND");
    assert_eq!(metadata.get("app").map(String::as_str), Some("default"));
    // Users the broker never tokenizes.
    let admin = h.get(user(seed::ADMIN_USER_ID)).await.unwrap_err();
    assert_eq!(error_info(&admin).0, "BOX_USER_NOT_TOKENIZABLE");
    let inactive = h.get(user(seed::INACTIVE_USER_ID)).await.unwrap_err();
    assert_eq!(error_info(&inactive).0, "BOX_USER_INACTIVE");
    // Box throttling: a RetryInfo besides the pushback header.
    h.fake.fail_next(10, Fault::RateLimited { retry_after_secs: 7 });
    let throttled = h.get(user(seed::APP_USER_IDS[0])).await.unwrap_err();
    assert_eq!(error_info(&throttled).0, "BOX_UNAVAILABLE");
    let retry = throttled.get_details_retry_info().expect("a RetryInfo");
    assert_eq!(retry.retry_delay, Some(std::time::Duration::from_secs(7)));
    // An unknown app.
    let mut request = enterprise();
    request.app = "nope".to_owned();
    assert_eq!(error_info(&h.get(request).await.unwrap_err()).0, "UNKNOWN_APP");
    // The policy.
    let h = Harness::with(Options {
        policy: Some(
            box_token_broker::policy::Policy::parse(
                "[[rules]]\nname = \"others\"\ncallers = [\"apikey:someone-else\"]\nenterprise = true\n",
                "p",
            )
            .unwrap(),
        ),
        ..Options::default()
    })
    .await;
    assert_eq!(error_info(&h.get(enterprise()).await.unwrap_err()).0, "POLICY_DENIED");
}
