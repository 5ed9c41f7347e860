//! The attacks of the hardening review, each reproduced: from the network
//! without credentials, as a caller with a narrow policy, as an admin
//! scoped to one app, and through a misbehaving Box. Each test names the
//! defence it checks and failed before that defence existed.

use crate::common;

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::Poll,
    time::{Duration, Instant},
};

use box_token_broker::{
    admin::AdminRules,
    broker::UpstreamBudget,
    fakebox::{FakeUser, Fault, UserKind, seed},
    pb::{self, broker_admin_service_client::BrokerAdminServiceClient},
    policy::Policy,
    service::{ConnectionLimits, ServeOptions, TransportCounters},
};
use common::{
    Harness, Options, admin_request, assert_status, downscope, enterprise, file, pushback_ms, token_of, user,
};
use tokio::{io::AsyncReadExt as _, net::TcpStream};
use tonic::{
    Code,
    codegen::{Bytes, http},
    metadata::MetadataValue,
};

// ---------------------------------------------------------------------------
// A raw HTTP/2 client: what an attacker has, with no gRPC library to behave.

type Conn = h2::client::Connection<TcpStream, Bytes>;

async fn raw(addr: SocketAddr) -> (h2::client::SendRequest<Bytes>, Conn) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    h2::client::handshake(tcp).await.unwrap()
}

/// The server's `SETTINGS_MAX_CONCURRENT_STREAMS`, once its SETTINGS arrived
/// (`usize::MAX`: it never set one).
async fn advertised_streams(conn: &mut Conn) -> usize {
    for _ in 0..100 {
        std::future::poll_fn(|cx| {
            let _ = Pin::new(&mut *conn).poll(cx);
            Poll::Ready(())
        })
        .await;
        let n = conn.max_concurrent_send_streams();
        if n != usize::MAX {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    usize::MAX
}

/// A gRPC request for `method` of the client API with `body` as the
/// message (the 5-byte frame header added), plus `headers`.
fn grpc(method: &str, headers: &[(&str, String)]) -> http::Request<()> {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://broker/boxbroker.v1.TokenBrokerService/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, value.as_str());
    }
    request.body(()).unwrap()
}

fn framed(message: &[u8]) -> Bytes {
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    body.extend_from_slice(message);
    Bytes::from(body)
}

/// Sends one request on a fresh raw connection; the gRPC status it got
/// (from the headers of a trailers-only answer, or the trailers).
async fn raw_call(addr: SocketAddr, method: &str, headers: &[(&str, String)], body: Bytes) -> tonic::Status {
    let mut request = grpc(method, headers);
    *request.uri_mut() = format!("http://broker/boxbroker.v1.TokenBrokerService/{method}")
        .parse()
        .unwrap();
    raw_request(addr, request, body).await
}

/// [`raw_call`] of any `request`.
async fn raw_request(addr: SocketAddr, request: http::Request<()>, body: Bytes) -> tonic::Status {
    let (send, conn) = raw(addr).await;
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let (response, mut stream) = send.send_request(request, false).unwrap();
    // Send the body from its own task: past the flow-control window it
    // waits for a server that may never read it.
    tokio::spawn(async move {
        stream.reserve_capacity(body.len());
        let _ = stream.send_data(body, true);
        // Keep the stream open until the answer came.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(stream);
    });
    let response = response.await.unwrap();
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let _ = chunk.unwrap();
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    tonic::Status::from_header_map(&trailers).unwrap_or_else(|| tonic::Status::ok(""))
}

/// A protobuf `GetTokenRequest` for the Service Account.
fn enterprise_message() -> Vec<u8> {
    prost::Message::encode_to_vec(&enterprise())
}

/// Waits for `addr`'s side of `stream` to close; false if it stays open 10 s.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

fn serve(connections: ConnectionLimits) -> ServeOptions {
    ServeOptions {
        connections,
        ..ServeOptions::default()
    }
}

/// A broker with `connections`, and the counters of its transport.
async fn counted(connections: ConnectionLimits) -> (Harness, Arc<TransportCounters>) {
    let counters = Arc::new(TransportCounters::default());
    let h = Harness::with(Options {
        serve: ServeOptions {
            counters: counters.clone(),
            ..serve(connections)
        },
        ..Options::default()
    })
    .await;
    (h, counters)
}

/// One anonymous `GetToken` on `send`'s connection, answered 200.
async fn get_token_on(send: h2::client::SendRequest<Bytes>) {
    let mut send = send.ready().await.unwrap();
    let (response, mut stream) = send.send_request(grpc("GetToken", &[]), false).unwrap();
    stream.send_data(framed(&enterprise_message()), true).unwrap();
    assert_eq!(response.await.unwrap().status(), http::StatusCode::OK);
}

// ---------------------------------------------------------------------------
// 1, 4. What a peer can hold before it has authenticated.

#[tokio::test]
async fn the_server_advertises_its_limit_of_streams_per_connection() {
    let h = Harness::with(Options {
        serve: serve(ConnectionLimits {
            max_concurrent_streams: 7,
            ..ConnectionLimits::default()
        }),
        ..Options::default()
    })
    .await;
    let (_send, mut conn) = raw(h.addr).await;
    assert_eq!(
        advertised_streams(&mut conn).await,
        7,
        "SETTINGS_MAX_CONCURRENT_STREAMS"
    );
}

#[tokio::test]
async fn an_unauthenticated_request_is_refused_before_its_body_is_read() {
    let h = Harness::with(Options {
        allow_anonymous: false,
        api_keys: vec![("portal", "portal-key-1")],
        ..Options::default()
    })
    .await;
    // Garbage that would not decode, and a body far past the message limit
    // (past the stream window, so the server would have to read it): both
    // are refused for what they lack, credentials, without being read.
    for body in [framed(&[0xff; 1000]), framed(&vec![0x0a; 300 * 1024])] {
        let status = raw_call(h.addr, "GetToken", &[], body).await;
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("no credentials"), "{status:?}");
    }
    // The same oversized body with credentials is refused for its size.
    let key = [("x-api-key", "portal-key-1".to_owned())];
    let status = raw_call(h.addr, "GetToken", &key, framed(&vec![0x0a; 300 * 1024])).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(h.fake.stats().token_arrivals, 0);
}

#[tokio::test]
async fn a_message_that_does_not_decode_is_invalid_argument_and_audited() {
    let h = Harness::start().await;
    // Field 1 (app) as a string of 255 bytes, cut short.
    let status = raw_call(h.addr, "GetToken", &[], framed(&[0x0a, 0xff, 0x01, b'x'])).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("the request is not a valid GetToken request message"),
        "{status:?}"
    );
    let events = h.audit_events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (
            events[0]["rpc"].as_str(),
            events[0]["code"].as_str(),
            events[0]["decision"].as_str()
        ),
        (Some("GetToken"), Some("INVALID_ARGUMENT"), Some("error"))
    );
    assert_eq!(events[0]["peer"], "127.0.0.1");
}

#[tokio::test]
async fn a_request_without_a_message_is_invalid_argument() {
    let h = Harness::start().await;
    let status = raw_call(h.addr, "GetToken", &[], Bytes::new()).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // A frame cut short: the header says 100 bytes, 3 follow.
    let mut cut = framed(&[0u8; 100]).to_vec();
    cut.truncate(8);
    let status = raw_call(h.addr, "GetToken", &[], Bytes::from(cut)).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

#[tokio::test]
async fn health_and_reflection_answer_anyone_but_only_small_messages() {
    let h = Harness::with(Options {
        allow_anonymous: false,
        ..Options::default()
    })
    .await;
    // A health check that announces 1 MiB (and sends a little of it): tonic
    // would otherwise wait for and buffer up to 4 MiB per stream, for anyone.
    let mut request = grpc("unused", &[]);
    *request.uri_mut() = "http://broker/grpc.health.v1.Health/Check".parse().unwrap();
    let mut body = vec![0u8];
    body.extend_from_slice(&(1024u32 * 1024).to_be_bytes());
    body.extend_from_slice(&[0x0a; 100]);
    let status = tokio::time::timeout(Duration::from_secs(10), raw_request(h.addr, request, Bytes::from(body)))
        .await
        .expect("answered at once, not after the body");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // A real health check needs no credentials.
    let mut request = grpc("unused", &[]);
    *request.uri_mut() = "http://broker/grpc.health.v1.Health/Check".parse().unwrap();
    assert_eq!(raw_request(h.addr, request, framed(&[])).await.code(), Code::Ok);
}

#[tokio::test]
async fn one_peer_address_cannot_take_every_connection() {
    let (h, counters) = counted(ConnectionLimits {
        max_connections_per_peer: 2,
        ..ConnectionLimits::default()
    })
    .await;
    // The harness's client is one connection from 127.0.0.1; take the other.
    h.get(enterprise()).await.unwrap();
    let (second, conn) = raw(h.addr).await;
    tokio::spawn(conn);
    let _second = second.ready().await.unwrap();
    let mut third = TcpStream::connect(h.addr).await.unwrap();
    assert!(
        closed_by_server(&mut third).await,
        "a third from the same address is closed"
    );
    assert_eq!(counters.refused.load(std::sync::atomic::Ordering::Relaxed), 1);
    // Another address is served.
    let elsewhere = tonic::transport::Endpoint::from_shared(format!("http://{}", h.addr))
        .unwrap()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .connect()
        .await
        .unwrap();
    pb::token_broker_service_client::TokenBrokerServiceClient::new(elsewhere)
        .get_token(enterprise())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_connection_that_never_authenticates_idles_out_sooner() {
    let (h, _) = counted(ConnectionLimits {
        idle_timeout: Duration::from_secs(60),
        unauthenticated_idle_timeout: Duration::from_millis(300),
        ..ConnectionLimits::default()
    })
    .await;
    // One connection carries an authenticated request, one only a health check.
    let (authenticated, conn) = raw(h.addr).await;
    let authenticated_conn = tokio::spawn(conn);
    get_token_on(authenticated.clone()).await;
    let (probe, conn) = raw(h.addr).await;
    let probe_conn = tokio::spawn(conn);
    let mut probe = probe.ready().await.unwrap();
    let mut health = grpc("unused", &[]);
    *health.uri_mut() = "http://broker/grpc.health.v1.Health/Check".parse().unwrap();
    let (response, mut stream) = probe.send_request(health, false).unwrap();
    stream.send_data(framed(&[]), true).unwrap();
    assert_eq!(response.await.unwrap().status(), http::StatusCode::OK);
    let ended = tokio::time::timeout(Duration::from_secs(10), probe_conn).await;
    assert!(ended.is_ok(), "the never-authenticated connection was closed");
    assert!(!authenticated_conn.is_finished(), "the authenticated one was not");
    get_token_on(authenticated).await;
}

/// A downscoped `item_preview` token on the Service Account's file.
async fn preview_token(h: &Harness) -> String {
    h.downscoped(downscope(
        enterprise(),
        &["item_preview"],
        file(seed::SERVICE_ACCOUNT_FILE_ID),
    ))
    .await
    .unwrap()
    .token
    .unwrap()
    .access_token
}

#[tokio::test]
async fn a_revocation_the_caller_gives_up_on_still_completes() {
    let h = Harness::start().await;
    let child = preview_token(&h).await;
    h.fake.set_latency(Duration::from_millis(600));
    let mut request = tonic::Request::new(pb::RevokeTokenRequest {
        app: String::new(),
        access_token: child.clone(),
    });
    request.set_timeout(Duration::from_millis(100));
    let gone = h.client.clone().revoke_token(request).await.unwrap_err();
    assert!(
        matches!(gone.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{gone:?}"
    );
    // The revocation went on without the caller: revoked at Box, and never
    // served again.
    let mut revoked = false;
    for _ in 0..100 {
        if h.fake.is_revoked(&child) {
            revoked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(revoked, "revoked at Box");
    h.fake.set_latency(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_ne!(preview_token(&h).await, child, "a new token, not the revoked one");
}

#[tokio::test]
async fn one_revocation_of_a_token_at_a_time() {
    let h = Harness::start().await;
    let child = preview_token(&h).await;
    h.fake.set_latency(Duration::from_millis(500));
    let first = tokio::spawn({
        let client = h.client.clone();
        let child = child.clone();
        async move {
            client
                .clone()
                .revoke_token(pb::RevokeTokenRequest {
                    app: String::new(),
                    access_token: child,
                })
                .await
        }
    });
    // The first is at Box (which takes 500 ms) when the second comes.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = h.revoke(&child).await.unwrap_err();
    assert_status(
        &second,
        Code::Unavailable,
        "a revocation of this token is already under way",
    );
    first.await.unwrap().unwrap();
    assert!(h.fake.is_revoked(&child));
}

#[tokio::test]
async fn a_header_block_over_the_limit_is_refused_and_the_server_keeps_serving() {
    let h = Harness::start().await;
    let (send, conn) = raw(h.addr).await;
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    // 12 KiB of headers: over the 8 KiB default, under hyper's own 16 KiB.
    let big = [("x-padding", "p".repeat(12 * 1024))];
    let (response, _stream) = send.send_request(grpc("GetToken", &big), true).unwrap();
    match response.await {
        Err(e) => assert!(e.is_reset() || e.is_go_away() || e.is_io(), "{e:?}"),
        Ok(response) => assert_ne!(response.status(), http::StatusCode::OK, "{response:?}"),
    }
    h.get(enterprise()).await.unwrap();
}

#[tokio::test]
async fn a_connection_that_never_speaks_http2_is_closed_after_the_handshake_timeout() {
    let (h, counters) = counted(ConnectionLimits {
        handshake_timeout: Duration::from_millis(200),
        ..ConnectionLimits::default()
    })
    .await;
    let mut silent = TcpStream::connect(h.addr).await.unwrap();
    assert!(closed_by_server(&mut silent).await, "the silent connection was closed");
    assert_eq!(
        counters.handshake_timeouts.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // A real client is not affected.
    h.get(enterprise()).await.unwrap();
}

#[tokio::test]
async fn a_silent_connection_does_not_hold_up_shutdown() {
    let mut h = Harness::with(Options {
        serve: ServeOptions {
            grace_period: Duration::from_secs(60),
            ..ServeOptions::default()
        },
        ..Options::default()
    })
    .await;
    let _silent = TcpStream::connect(h.addr).await.unwrap();
    // Let the listener accept it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped = h.begin_stop();
    let within = tokio::time::timeout(Duration::from_secs(10), stopped).await;
    assert!(
        within.is_ok(),
        "the broker stopped without waiting out the grace period"
    );
}

#[tokio::test]
async fn an_idle_connection_gets_goaway() {
    let (h, counters) = counted(ConnectionLimits {
        idle_timeout: Duration::from_millis(300),
        ..ConnectionLimits::default()
    })
    .await;
    let (send, conn) = raw(h.addr).await;
    let connection = tokio::spawn(conn);
    get_token_on(send.clone()).await;
    // Then nothing (`send` is still held, so the client keeps it open): the
    // server ends the connection.
    let ended = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(ended.is_ok(), "the idle connection was closed");
    // This one, and the harness's own idle client connection.
    assert!(counters.idle_closed.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}

#[tokio::test]
async fn a_connection_is_closed_at_its_maximum_age() {
    let h = Harness::with(Options {
        serve: serve(ConnectionLimits {
            max_connection_age: Some(Duration::from_millis(300)),
            ..ConnectionLimits::default()
        }),
        ..Options::default()
    })
    .await;
    let (send, conn) = raw(h.addr).await;
    let connection = tokio::spawn(conn);
    let _send = send.ready().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(ended.is_ok(), "the connection was closed at its age");
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_at_once() {
    let (h, counters) = counted(ConnectionLimits {
        max_connections: 2,
        ..ConnectionLimits::default()
    })
    .await;
    // The harness's own client holds one connection; take the other.
    h.get(enterprise()).await.unwrap();
    let (second, conn) = raw(h.addr).await;
    let second_conn = tokio::spawn(conn);
    let _second = second.ready().await.unwrap();
    let mut third = TcpStream::connect(h.addr).await.unwrap();
    assert!(closed_by_server(&mut third).await, "the third connection was closed");
    assert_eq!(counters.refused.load(std::sync::atomic::Ordering::Relaxed), 1);
    // One connection goes; a new one is accepted.
    second_conn.abort();
    drop(_second);
    let mut accepted = false;
    for _ in 0..100 {
        if counters.open.load(std::sync::atomic::Ordering::Relaxed) < 2 {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(accepted, "the dropped connection's place was given back");
    let status = raw_call(h.addr, "GetToken", &[], framed(&enterprise_message())).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
}

#[tokio::test]
async fn a_request_past_the_request_timeout_is_deadline_exceeded_and_audited() {
    let h = Harness::with(Options {
        serve: ServeOptions {
            request_timeout: Duration::from_millis(300),
            ..ServeOptions::default()
        },
        ..Options::default()
    })
    .await;
    h.fake.set_latency(Duration::from_secs(3));
    let status = h.get(enterprise()).await.unwrap_err();
    assert_status(&status, Code::DeadlineExceeded, "did not finish within 300 ms");
    let events = h.audit_events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["code"], "DEADLINE_EXCEEDED");
    assert_eq!(events[0]["caller"], "anonymous");
}

// ---------------------------------------------------------------------------
// 2. An admin scoped to one app.

async fn scoped_admin(extra_apps: Vec<&'static str>, rules: &str) -> Harness {
    #[derive(serde::Deserialize)]
    struct File {
        rules: Vec<box_token_broker::admin::AdminRule>,
    }
    let rules = AdminRules(toml::from_str::<File>(rules).unwrap().rules);
    rules.validate().unwrap();
    Harness::with(Options {
        admin: true,
        admin_rules: Some(rules),
        extra_apps,
        ..Options::default()
    })
    .await
}

fn admin(h: &Harness) -> BrokerAdminServiceClient<tonic::transport::Channel> {
    h.admin.as_ref().unwrap().client.clone()
}

#[tokio::test]
async fn an_empty_app_name_does_not_let_a_scoped_admin_reach_the_only_app() {
    // The only app is "default"; this admin is granted "billing" alone.
    let h = scoped_admin(
        vec![],
        "[[rules]]\ncallers = [\"apikey:ops\"]\nrpcs = [\"*\"]\napps = [\"billing\"]\n",
    )
    .await;
    h.get(enterprise()).await.unwrap();
    let mut a = admin(&h);
    let denied = "admin identity \"apikey:ops\" may not call";
    let list = a
        .list_keys(admin_request(pb::ListKeysRequest { app: String::new() }))
        .await;
    assert_status(&list.unwrap_err(), Code::PermissionDenied, denied);
    let generate = a
        .generate_key(admin_request(pb::GenerateKeyRequest {
            app: String::new(),
            bits: 2048,
        }))
        .await;
    assert_status(&generate.unwrap_err(), Code::PermissionDenied, denied);
    let invalidate = a
        .invalidate_tokens(admin_request(pb::InvalidateTokensRequest {
            app: String::new(),
            subject: None,
        }))
        .await;
    assert_status(&invalidate.unwrap_err(), Code::PermissionDenied, denied);
    assert!(h.get(enterprise()).await.unwrap().cache_hit, "nothing was invalidated");
    let ring = h.broker.resolve_app(None).unwrap().ring();
    assert_eq!(ring.keys.len(), 1, "no key was generated");
    let status = a
        .get_status(admin_request(pb::GetStatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(status.apps.is_empty(), "it sees no app it was not granted");
    assert_eq!(status.cached_tokens, 0, "nor their tokens");
}

#[tokio::test]
async fn invalidating_every_app_needs_a_grant_for_every_app() {
    let h = scoped_admin(
        vec!["billing"],
        "[[rules]]\ncallers = [\"apikey:ops\"]\nrpcs = [\"*\"]\napps = [\"billing\"]\n",
    )
    .await;
    let mut default = enterprise();
    default.app = "default".to_owned();
    h.get(default.clone()).await.unwrap();
    let mut billing = enterprise();
    billing.app = "billing".to_owned();
    h.get(billing.clone()).await.unwrap();
    let mut a = admin(&h);
    let everything = a
        .invalidate_tokens(admin_request(pb::InvalidateTokensRequest {
            app: String::new(),
            subject: None,
        }))
        .await
        .unwrap_err();
    assert_status(
        &everything,
        Code::PermissionDenied,
        "without an app, InvalidateTokens touches every app",
    );
    assert!(
        h.get(default.clone()).await.unwrap().cache_hit,
        "the other app's token stays"
    );
    let own = a
        .invalidate_tokens(admin_request(pb::InvalidateTokensRequest {
            app: "billing".to_owned(),
            subject: None,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.invalidated, 1);
    assert!(h.get(default).await.unwrap().cache_hit);
    assert!(!h.get(billing).await.unwrap().cache_hit);
    // An empty name with two apps names only the granted one.
    let list = a
        .list_keys(admin_request(pb::ListKeysRequest { app: String::new() }))
        .await
        .unwrap_err();
    assert_status(&list, Code::InvalidArgument, "name one you may use: billing");
    assert!(!list.message().contains("default"), "{}", list.message());
    let status = a
        .get_status(admin_request(pb::GetStatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = status.apps.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["billing"]);
}

// ---------------------------------------------------------------------------
// 3, 6. One caller's actions reaching others through the shared cache.

const PORTAL: &str = "portal-key-0001";
const KIOSK: &str = "kiosk-key-0002";
const PLAIN: &str = "plain-key-0003";

async fn two_portals() -> Harness {
    let policy = "[[rules]]\nname = \"portals\"\ncallers = [\"apikey:portal\", \"apikey:kiosk\"]\n\
                  enterprise = true\nusers = [\"*\"]\nfull_tokens = true\nscopes = [\"item_preview\"]\n\
                  files = [\"*\"]\nfolders = [\"*\"]\nrevoke = true\n\
                  [[rules]]\nname = \"no revoking\"\ncallers = [\"apikey:plain\"]\nenterprise = true\n\
                  users = [\"*\"]\nfull_tokens = true\nscopes = [\"item_preview\"]\nfolders = [\"*\"]\n";
    Harness::with(Options {
        allow_anonymous: false,
        api_keys: vec![("portal", PORTAL), ("kiosk", KIOSK), ("plain", PLAIN)],
        policy: Some(Policy::parse(policy, "p").unwrap()),
        ..Options::default()
    })
    .await
}

fn keyed<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-api-key", MetadataValue::try_from(key).unwrap());
    request
}

async fn get_as(h: &Harness, key: &str, request: pb::GetTokenRequest) -> Result<String, tonic::Status> {
    h.client
        .clone()
        .get_token(keyed(request, key))
        .await
        .map(|r| token_of(&r.into_inner()))
}

async fn downscoped_as(h: &Harness, key: &str) -> String {
    let request = downscope(
        user(seed::APP_USER_IDS[0]),
        &["item_preview"],
        file(seed::APP_USER_FILE_ID),
    );
    h.client
        .clone()
        .get_downscoped_token(keyed(request, key))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap()
        .access_token
}

async fn revoke_as(h: &Harness, key: &str, token: &str) -> Result<(), tonic::Status> {
    let request = pb::RevokeTokenRequest {
        app: String::new(),
        access_token: token.to_owned(),
    };
    h.client.clone().revoke_token(keyed(request, key)).await.map(drop)
}

#[tokio::test]
async fn revoking_is_a_grant_of_its_own_and_asked_before_any_lookup() {
    let h = two_portals().await;
    let own = get_as(&h, PLAIN, enterprise()).await.unwrap();
    for token in [own.as_str(), "not-a-token-anyone-has"] {
        assert_status(
            &revoke_as(&h, PLAIN, token).await.unwrap_err(),
            Code::PermissionDenied,
            "no rule grants revoke = true to caller \"apikey:plain\"",
        );
    }
    assert!(!h.fake.is_revoked(&own));
}

#[tokio::test]
async fn a_token_served_to_another_caller_is_not_found_like_one_that_never_existed() {
    let h = two_portals().await;
    let portals = downscoped_as(&h, PORTAL).await;
    let unknown = revoke_as(&h, KIOSK, "not-a-token-anyone-has").await.unwrap_err();
    let theirs = revoke_as(&h, KIOSK, &portals).await.unwrap_err();
    assert_status(
        &theirs,
        Code::NotFound,
        "holds no token with that value that was issued to you",
    );
    assert_eq!(
        (theirs.code(), theirs.message()),
        (unknown.code(), unknown.message()),
        "the answers are the same"
    );
    assert!(!h.fake.is_revoked(&portals));
    revoke_as(&h, PORTAL, &portals).await.unwrap();
    assert!(h.fake.is_revoked(&portals));
}

#[tokio::test]
async fn each_caller_gets_its_own_downscoped_token_and_revokes_only_that() {
    let h = two_portals().await;
    let portals = downscoped_as(&h, PORTAL).await;
    let kiosks = downscoped_as(&h, KIOSK).await;
    assert_ne!(portals, kiosks, "downscoped tokens are per caller");
    assert_eq!(h.fake.stats().exchange_issued, 2);
    revoke_as(&h, PORTAL, &portals).await.unwrap();
    assert!(h.fake.is_revoked(&portals));
    assert!(!h.fake.is_revoked(&kiosks));
    assert_eq!(downscoped_as(&h, KIOSK).await, kiosks, "the kiosk's is still served");
}

#[tokio::test]
async fn a_full_token_served_to_two_callers_is_revoked_by_neither() {
    let h = two_portals().await;
    let portals = get_as(&h, PORTAL, enterprise()).await.unwrap();
    let kiosks = get_as(&h, KIOSK, enterprise()).await.unwrap();
    assert_eq!(portals, kiosks, "full tokens are shared: one mint per subject");
    let refused = revoke_as(&h, PORTAL, &portals).await.unwrap_err();
    assert_status(&refused, Code::FailedPrecondition, "also served to other callers");
    assert!(!h.fake.is_revoked(&portals));
    assert_eq!(get_as(&h, KIOSK, enterprise()).await.unwrap(), kiosks);
}

#[tokio::test]
async fn force_refresh_is_a_grant_and_mints_once_per_key_per_interval() {
    let h = two_portals().await;
    let mut forced = enterprise();
    forced.force_refresh = true;
    assert_status(
        &get_as(&h, PORTAL, forced.clone()).await.unwrap_err(),
        Code::PermissionDenied,
        "force_refresh is not allowed",
    );
    let h = Harness::start().await;
    h.get(enterprise()).await.unwrap();
    h.clock.advance(Duration::from_secs(6));
    let mut calls = Vec::new();
    for _ in 0..200 {
        let mut client = h.client.clone();
        let forced = forced.clone();
        calls.push(tokio::spawn(async move { client.get_token(forced).await }));
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(h.fake.stats().jwt_issued, 2, "the first mint and one forced mint");
}

#[tokio::test]
async fn an_unknown_user_is_asked_of_box_once_within_the_negative_ttl() {
    let h = Harness::start().await;
    for _ in 0..5 {
        assert_eq!(h.get(user("7999999")).await.unwrap_err().code(), Code::NotFound);
    }
    // The users API said so (with the Service Account's token): no user token was asked for.
    let stats = h.fake.stats();
    assert_eq!(
        (stats.user_reads, stats.token_requests),
        (1, 1),
        "remembered after the first answer"
    );
    h.clock.advance(Duration::from_secs(31));
    assert_eq!(h.get(user("7999999")).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(h.fake.stats().user_reads, 2, "asked again once it expired");
}

#[tokio::test]
async fn one_callers_slow_mints_cannot_crowd_out_another_callers_requests() {
    let h = Harness::with(Options {
        allow_anonymous: false,
        api_keys: vec![("greedy", "greedy-key"), ("calm", "calm-key")],
        policy: Some(Policy::allow_everything("apikey:*")),
        budget: Some(UpstreamBudget::new(4, 2)),
        ..Options::default()
    })
    .await;
    for i in 0..12 {
        h.fake.add_user(FakeUser {
            id: format!("73500{i:02}"),
            name: format!("Many {i}"),
            login: format!("many{i}@example.com"),
            enterprise_id: seed::ENTERPRISE_ID.to_owned(),
            kind: UserKind::Managed,
            role: "user".to_owned(),
            status: "active".to_owned(),
            external_app_user_id: None,
        });
    }
    get_as(&h, "calm-key", enterprise()).await.unwrap();
    h.fake.set_latency(Duration::from_millis(800));
    let mut greedy = Vec::new();
    for i in 0..10 {
        let h_client = h.client.clone();
        greedy.push(tokio::spawn(async move {
            h_client
                .clone()
                .get_token(keyed(user(&format!("73500{i:02}")), "greedy-key"))
                .await
        }));
    }
    assert!(h.wait_for(|s| s.token_arrivals >= 2).await);
    // The greedy caller holds its two places; the calm one is not refused,
    // neither its cache hit nor a mint of its own.
    get_as(&h, "calm-key", enterprise()).await.unwrap();
    get_as(&h, "calm-key", user("7350011")).await.unwrap();
    let mut refused = 0;
    for call in greedy {
        if let Err(status) = call.await.unwrap() {
            assert_status(
                &status,
                Code::ResourceExhausted,
                "caller \"apikey:greedy\" already has 2 calls to Box in progress",
            );
            refused += 1;
        }
    }
    assert!(refused >= 6, "{refused} of the greedy caller's 10 were refused");
}

// ---------------------------------------------------------------------------
// 5. Flooding the audit trail and the logs without credentials.

#[tokio::test]
async fn a_flood_of_bad_credentials_costs_a_few_audit_records_and_log_lines() {
    common::observed();
    let mut h = Harness::with(Options {
        allow_anonymous: false,
        api_keys: vec![("portal", PORTAL)],
        ..Options::default()
    })
    .await;
    for i in 0..300 {
        let mut request = keyed(enterprise(), "guessed-wrong");
        request
            .metadata_mut()
            .insert("x-request-id", format!("flood-{i}").parse().unwrap());
        h.client.clone().get_token(request).await.unwrap_err();
    }
    let written = h.audit_events().len();
    assert!(written <= 2, "{written} records for 300 refusals");
    h.begin_stop().await.unwrap();
    let events = h.audit_events();
    // A summary stands for its repeats; any other record for itself.
    let counted: u64 = events.iter().map(|e| e["repeated"].as_u64().unwrap_or(1)).sum();
    assert_eq!(counted, 300, "every refusal is counted: {events:?}");
    assert!(events.len() <= 4, "{events:?}");
    let logged = common::log_text().lines().filter(|l| l.contains("flood-")).count();
    assert!(logged <= 2, "{logged} log lines for 300 refusals");
}

#[tokio::test]
async fn a_peer_that_keeps_failing_does_not_lock_out_a_good_key_from_the_same_address() {
    let h = Harness::with(Options {
        allow_anonymous: false,
        api_keys: vec![("portal", PORTAL)],
        policy: Some(Policy::allow_everything("apikey:*")),
        ..Options::default()
    })
    .await;
    for _ in 0..50 {
        let status = h
            .client
            .clone()
            .get_token(keyed(enterprise(), "guessed-wrong"))
            .await
            .unwrap_err();
        assert_status(&status, Code::Unauthenticated, "does not hold a valid API key");
    }
    // Past the burst, a key (cheap to check) is still checked: the good
    // caller behind the same address gets its token.
    h.client.clone().get_token(keyed(enterprise(), PORTAL)).await.unwrap();
}

// ---------------------------------------------------------------------------
// 8. Values from Box that broke time arithmetic.

#[tokio::test]
async fn a_retry_after_beyond_any_clock_is_capped_not_a_panic() {
    let h = Harness::start().await;
    h.fake.fail_next(
        1,
        Fault::RateLimited {
            retry_after_secs: u64::MAX,
        },
    );
    let status = h.get(enterprise()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let pushback = pushback_ms(&status);
    assert!(pushback <= 600_000, "{pushback}");
}

#[tokio::test]
async fn an_absurd_expires_in_is_believed_only_up_to_two_hours() {
    for absurd in ["1e300", "1000000000000", "18446744073709551615"] {
        let h = Harness::start().await;
        let body = format!(
            "{{\"access_token\":\"{}\",\"expires_in\":{absurd},\"token_type\":\"bearer\",\"restricted_to\":[]}}",
            "t".repeat(32)
        );
        h.fake.fail_next(1, Fault::Reply { status: 200, body });
        let token = h.get(enterprise()).await.unwrap().token.unwrap();
        let expires = token.expires_at.unwrap().seconds;
        let now = box_token_broker::clock::unix_seconds(box_token_broker::clock::Clock::now(&*h.clock));
        assert!(expires <= now + 7200, "{absurd}: expires {} s from now", expires - now);
        // Past two hours (less the margin), it is no longer served.
        h.clock.advance(Duration::from_secs(7200));
        assert_ne!(token_of(&h.get(enterprise()).await.unwrap()), token.access_token);
    }
}

// ---------------------------------------------------------------------------
// 11. Decoding an imported key: bounded, and off the request path.

/// An `ENCRYPTED PRIVATE KEY` PEM that says PBKDF2-SHA256 at `iterations`
/// (its ciphertext is filler: made without doing the derivation).
fn claims_iterations(iterations: u32) -> String {
    use base64::Engine as _;
    use pkcs8::{
        EncryptedPrivateKeyInfo,
        der::Encode as _,
        pkcs5::{EncryptionScheme, pbes2},
    };
    let params = pbes2::Parameters::pbkdf2_sha256_aes256cbc(iterations, &[7u8; 16], &[9u8; 16]).unwrap();
    let filler = [0u8; 1216];
    let info = EncryptedPrivateKeyInfo {
        encryption_algorithm: EncryptionScheme::Pbes2(params),
        encrypted_data: &filler,
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(info.to_der().unwrap());
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\n{}\n-----END ENCRYPTED PRIVATE KEY-----\n",
        lines.join("\n")
    )
}

/// A new key as an `ENCRYPTED PRIVATE KEY` PEM with scrypt at the most
/// work the broker decrypts (N = 2^14, r = 8, p = 32: about a second).
fn slow_to_decrypt() -> String {
    use rsa::pkcs8::{EncodePrivateKey as _, LineEnding, PrivateKeyInfo, pkcs5::pbes2};
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let der = key.to_pkcs8_der().unwrap();
    let info = PrivateKeyInfo::try_from(der.as_bytes()).unwrap();
    let scrypt = pkcs8::pkcs5::scrypt::Params::new(14, 8, 32, 32).unwrap();
    let params = pbes2::Parameters::scrypt_aes256cbc(scrypt, &[7u8; 16], &[9u8; 16]).unwrap();
    info.encrypt_with_params(params, b"pass")
        .unwrap()
        .to_pem("ENCRYPTED PRIVATE KEY", LineEnding::LF)
        .unwrap()
        .to_string()
}

fn import(pem: String) -> tonic::Request<pb::ImportKeyRequest> {
    admin_request(pb::ImportKeyRequest {
        app: String::new(),
        private_key_pem: pem,
        passphrase: "pass".to_owned(),
        kid: "kid-imported".to_owned(),
    })
}

#[tokio::test]
async fn a_key_with_an_absurd_derivation_cost_is_refused_before_any_work() {
    let h = Harness::with(Options {
        admin: true,
        ..Options::default()
    })
    .await;
    // 100 million iterations: most of a minute of CPU if it were tried.
    let pem = claims_iterations(100_000_000);
    let refused = admin(&h).import_key(import(pem)).await.unwrap_err();
    assert_status(
        &refused,
        Code::InvalidArgument,
        "PBKDF2 with 100000000 iterations, more than the 2000000",
    );
}

#[tokio::test(flavor = "current_thread")]
async fn decoding_an_imported_key_does_not_hold_up_other_requests() {
    let h = Harness::with(Options {
        admin: true,
        ..Options::default()
    })
    .await;
    h.get(enterprise()).await.unwrap();
    let pem = slow_to_decrypt();
    let mut a = admin(&h);
    let importing = tokio::spawn(async move {
        a.import_key(import(pem)).await.unwrap();
        Instant::now()
    });
    // On this one-thread runtime, decoding on it would stop everything,
    // this timer included, until it finished.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(h.get(enterprise()).await.unwrap().cache_hit);
    let served = Instant::now();
    let imported = importing.await.unwrap();
    assert!(served < imported, "the cache hit was served while the key was decoded");
}

// ---------------------------------------------------------------------------
// 14. Smaller.

#[tokio::test]
async fn an_unknown_app_names_only_the_apps_the_caller_may_use() {
    let policy = "[[rules]]\nname = \"default only\"\ncallers = [\"anonymous\"]\napps = [\"default\"]\n\
                  enterprise = true\nfull_tokens = true\n";
    let h = Harness::with(Options {
        extra_apps: vec!["payroll"],
        policy: Some(Policy::parse(policy, "p").unwrap()),
        ..Options::default()
    })
    .await;
    let mut request = enterprise();
    request.app = "nosuchapp".to_owned();
    let status = h.get(request).await.unwrap_err();
    assert_status(&status, Code::NotFound, "(apps you may use: default)");
    assert!(!status.message().contains("payroll"), "{}", status.message());
    let status = h.get(enterprise()).await.unwrap_err();
    assert_status(
        &status,
        Code::InvalidArgument,
        "several apps are configured (apps you may use: default)",
    );
}

#[tokio::test]
async fn a_shared_link_whose_host_only_looks_like_box_is_invalid() {
    let h = Harness::start().await;
    let evil = pb::get_downscoped_token_request::Target::SharedLink("https://evil.example?.box.com/s/x".to_owned());
    let status = h
        .downscoped(downscope(enterprise(), &["item_preview"], Some(evil)))
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::InvalidArgument,
        "shared_link must be an https:// Box shared link",
    );
    assert_eq!(h.fake.stats().token_arrivals, 0);
    // A real one still works.
    let link = pb::get_downscoped_token_request::Target::SharedLink(seed::SHARED_LINK.to_owned());
    h.downscoped(downscope(enterprise(), &["item_preview"], Some(link)))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_peer_whose_streams_keep_failing_gets_goaway() {
    let h = Harness::with(Options {
        serve: serve(ConnectionLimits {
            max_local_reset_streams: 10,
            ..ConnectionLimits::default()
        }),
        ..Options::default()
    })
    .await;
    let (send, conn) = raw(h.addr).await;
    let connection = tokio::spawn(conn);
    // A body longer than its content-length: a stream-level protocol
    // error the server answers by resetting the stream.
    let lying = [("content-length", "1".to_owned())];
    let mut sent = 0;
    for _ in 0..100 {
        let Ok(mut ready) = send.clone().ready().await else {
            break;
        };
        let Ok((response, mut stream)) = ready.send_request(grpc("GetToken", &lying), false) else {
            break;
        };
        let _ = stream.send_data(Bytes::from_static(&[0u8; 100]), true);
        sent += 1;
        if response.await.is_err_and(|e| e.is_go_away() || e.is_io()) {
            break;
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(ended.is_ok(), "the connection was ended after {sent} failed streams");
    assert!(sent < 100, "{sent}");
}
