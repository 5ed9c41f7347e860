//! The edge sidecar: app -> edge -> central broker -> fake Box, all real
//! servers on loopback. The edge holds no Box credential; what reaches the
//! central broker and Box is counted at each.

use crate::common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use box_token_broker::{
    audit::AuditSink,
    auth::{Anonymous, Authenticator},
    boxapi::client::UpstreamPolicy,
    cache::{CachePolicy, DEFAULT_SAFETY_MARGIN},
    clock::SharedClock,
    edge::{
        Edge,
        central::{Central, CentralSettings, Credential, SecretFile},
    },
    fakebox::seed::{APP_USER_EXTERNAL_IDS, APP_USER_FOLDER_ID, APP_USER_IDS},
    metrics::{RpcMetrics, Served},
    pb::{self, token_broker_service_client::TokenBrokerServiceClient},
    policy::Policy,
    runtime::Runtime,
    service::{self, ServeOptions},
};
use common::{Harness, Options, assert_free_of, downscope, enterprise, external, folder, provisioning, token_of, user};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Code, transport::Channel};

/// Fast retries, so failover and giving up take milliseconds.
fn hop_policy() -> UpstreamPolicy {
    UpstreamPolicy {
        max_attempts: 4,
        backoff_base: Duration::from_millis(5),
        backoff_cap: Duration::from_millis(20),
        attempt_timeout: Duration::from_secs(2),
        deadline: Duration::from_secs(4),
        breaker_threshold: 3,
        breaker_cooldown: Duration::from_secs(30),
    }
}

/// A running edge in front of `centrals`.
struct EdgeSide {
    edge: Arc<Edge>,
    client: TokenBrokerServiceClient<Channel>,
    audit: Arc<Mutex<Vec<u8>>>,
    rpc_metrics: RpcMetrics,
    stop: Option<oneshot::Sender<()>>,
    _server: JoinHandle<()>,
}

impl Drop for EdgeSide {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn edge_of(centrals: &[SocketAddr], clock: SharedClock, credential: Credential) -> EdgeSide {
    edge_with(centrals, clock, credential, Authenticator::new(Anonymous::Admitted)).await
}

/// An edge whose local callers `local` authenticates.
async fn edge_with(
    centrals: &[SocketAddr],
    clock: SharedClock,
    credential: Credential,
    local: Authenticator,
) -> EdgeSide {
    let settings = CentralSettings {
        credential,
        policy: hop_policy(),
        ..CentralSettings::plaintext(centrals)
    };
    edge_from(settings, clock, local).await
}

/// An edge of the central broker `settings` name.
async fn edge_from(settings: CentralSettings, clock: SharedClock, local: Authenticator) -> EdgeSide {
    let central = Central::new(settings, clock.clone()).await.unwrap();
    let edge = Arc::new(Edge::new(central, clock, CachePolicy::default()));
    let (sink, audit) = AuditSink::memory();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let options = ServeOptions::default();
    let rpc_metrics = options.rpc_metrics.clone();
    let runtime = Runtime::edge(edge.clone(), Arc::new(sink))
        .with_options(options)
        .listen(service::Listener::Tcp(listener, local), service::Role::Client);
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        runtime
            .run(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    EdgeSide {
        edge,
        client: TokenBrokerServiceClient::new(channel),
        audit,
        rpc_metrics,
        stop: Some(stop),
        _server: server,
    }
}

impl EdgeSide {
    async fn get(&self, request: pb::GetTokenRequest) -> Result<pb::GetTokenResponse, tonic::Status> {
        common::get_token(&self.client, request).await
    }

    async fn downscoped(
        &self,
        request: pb::GetDownscopedTokenRequest,
    ) -> Result<pb::GetDownscopedTokenResponse, tonic::Status> {
        common::get_downscoped(&self.client, request).await
    }

    fn audit_events(&self) -> Vec<serde_json::Value> {
        common::audit_records(&self.audit)
    }

    /// The central broker's answers to this edge, over every method and code.
    fn upstream_answers(&self) -> u64 {
        self.edge.central().counters.answers().iter().map(|(_, _, n)| n).sum()
    }
}

/// Requests of `rpc` the central broker audited.
fn central_calls(h: &Harness, rpc: &str) -> usize {
    h.audit_events().iter().filter(|e| e["rpc"] == rpc).count()
}

async fn central_and_edge(options: Options) -> (Harness, EdgeSide) {
    let h = Harness::with(options).await;
    let edge = edge_of(&[h.addr], h.clock.clone(), Credential::Connection).await;
    (h, edge)
}

#[tokio::test]
async fn enterprise_user_and_downscoped_tokens_come_through_and_the_second_request_is_a_local_hit() {
    let (h, e) = central_and_edge(Options::default()).await;
    let app_user = APP_USER_IDS[0];
    let first_enterprise = e.get(enterprise()).await.unwrap();
    let first_user = e.get(user(app_user)).await.unwrap();
    let first_downscoped = e
        .downscoped(downscope(user(app_user), &["item_preview"], folder(APP_USER_FOLDER_ID)))
        .await
        .unwrap();
    assert!(!first_enterprise.cache_hit && !first_user.cache_hit && !first_downscoped.cache_hit);
    let token = first_downscoped.token.as_ref().unwrap();
    assert_eq!(token.scopes, ["item_preview"]);
    assert_eq!(token.restricted_to[0].object_id, APP_USER_FOLDER_ID);
    // What the central broker served is what the app got.
    let audited: Vec<String> = h
        .audit_events()
        .iter()
        .filter_map(|e| e["token_sha256"].as_str().map(str::to_owned))
        .collect();
    for served in [
        token_of(&first_enterprise),
        token_of(&first_user),
        token.access_token.clone(),
    ] {
        assert!(audited.contains(&hex::encode(box_token_broker::fingerprint::digest(&served))));
    }

    let stats = h.fake.stats();
    let (gets, downscopes) = (central_calls(&h, "GetToken"), central_calls(&h, "GetDownscopedToken"));
    let again_enterprise = e.get(enterprise()).await.unwrap();
    let again_user = e.get(user(app_user)).await.unwrap();
    let again_downscoped = e
        .downscoped(downscope(user(app_user), &["item_preview"], folder(APP_USER_FOLDER_ID)))
        .await
        .unwrap();
    assert!(again_enterprise.cache_hit && again_user.cache_hit && again_downscoped.cache_hit);
    assert_eq!(token_of(&again_enterprise), token_of(&first_enterprise));
    assert_eq!(token_of(&again_user), token_of(&first_user));
    assert_eq!(again_downscoped.token.unwrap().access_token, token.access_token);
    assert_eq!(
        central_calls(&h, "GetToken"),
        gets,
        "no GetToken reached the central broker"
    );
    assert_eq!(central_calls(&h, "GetDownscopedToken"), downscopes);
    assert_eq!(h.fake.stats(), stats, "nothing reached Box");
    assert_eq!(e.upstream_answers(), 3);
    // The edge audits its own decisions: three misses, then three hits.
    let hits: Vec<bool> = e
        .audit_events()
        .iter()
        .map(|r| r["cache_hit"].as_bool().unwrap())
        .collect();
    assert_eq!(hits, [false, false, false, true, true, true]);
}

#[tokio::test]
async fn a_user_by_external_id_is_resolved_by_the_central_broker_and_cached_at_the_edge() {
    let h = Harness::start().await;
    let e = edge_of(&[h.addr], h.clock.clone(), Credential::Connection).await;
    let first = e.get(external(APP_USER_EXTERNAL_IDS[1])).await.unwrap();
    assert_eq!(
        h.fake.token_user_id(&token_of(&first)).as_deref(),
        Some(APP_USER_IDS[1])
    );
    // Another external id is another user, not the same placeholder key.
    let other = e.get(external(APP_USER_EXTERNAL_IDS[2])).await.unwrap();
    assert_eq!(
        h.fake.token_user_id(&token_of(&other)).as_deref(),
        Some(APP_USER_IDS[2])
    );
    let again = e.get(external(APP_USER_EXTERNAL_IDS[1])).await.unwrap();
    assert!(again.cache_hit);
    assert_eq!(token_of(&again), token_of(&first));
    assert_eq!(e.upstream_answers(), 2, "the repeat never left the edge");
    // Creation on first use passes through; the central broker's policy decides.
    let created = e.get(provisioning("auth0|edge-new", "Edgar")).await.unwrap();
    let users = h.fake.users_with_external_id("auth0|edge-new");
    assert_eq!(users.len(), 1);
    assert_eq!(
        h.fake.token_user_id(&token_of(&created)).as_deref(),
        Some(users[0].id.as_str())
    );
    // A refusal is relayed as the central broker said it.
    let refused = e
        .get(user(box_token_broker::fakebox::seed::ADMIN_USER_ID))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
}

#[tokio::test]
async fn a_thousand_cold_requests_over_two_edges_make_one_mint() {
    let h = Harness::start().await;
    let a = Arc::new(edge_of(&[h.addr], h.clock.clone(), Credential::Connection).await);
    let b = Arc::new(edge_of(&[h.addr], h.clock.clone(), Credential::Connection).await);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let edge = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.spawn(async move { token_of(&edge.get(user(APP_USER_IDS[1])).await.unwrap()) });
    }
    let mut tokens = std::collections::BTreeSet::new();
    while let Some(token) = tasks.join_next().await {
        tokens.insert(token.unwrap());
    }
    assert_eq!(tokens.len(), 1, "all 1,000 got the one token");
    let stats = h.fake.stats();
    assert_eq!(
        (stats.jwt_issued, stats.user_reads),
        (2, 1),
        "one mint at Box (and the Service Account's, which read the user once)"
    );
    assert_eq!(
        (a.upstream_answers(), b.upstream_answers()),
        (1, 1),
        "one call per edge"
    );
    assert_eq!(central_calls(&h, "GetToken"), 2, "one call from each edge");
}

#[tokio::test]
async fn with_the_central_broker_gone_cached_tokens_are_served_until_the_margin_and_never_after() {
    let (mut h, e) = central_and_edge(Options::default()).await;
    let first = e.get(enterprise()).await.unwrap();
    let expires_at = first.token.as_ref().unwrap().expires_at.unwrap().seconds;
    h.begin_stop().await.unwrap();

    let now = || box_token_broker::clock::Clock::now(&*h.clock);
    let unix = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    // Up to the margin: still served, the same token, from the cache.
    let to_margin = expires_at - DEFAULT_SAFETY_MARGIN.as_secs() as i64 - unix(now());
    h.clock.advance(Duration::from_secs((to_margin - 5) as u64));
    let cached = e.get(enterprise()).await.unwrap();
    assert!(cached.cache_hit);
    assert_eq!(token_of(&cached), token_of(&first));
    // Past it: never the old token, a clear UNAVAILABLE instead.
    h.clock.advance(Duration::from_secs(10));
    let status = e.get(enterprise()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("the central broker cannot be reached"),
        "{}",
        status.message()
    );
    assert!(!status.message().contains(&token_of(&first)));

    // An uncached request fails fast, within the edge's deadline: a
    // client deadline just past it would otherwise expire first.
    let mut request = tonic::Request::new(user(APP_USER_IDS[2]));
    request.set_timeout(hop_policy().deadline + Duration::from_secs(1));
    let status = e.client.clone().get_token(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("cannot be reached"), "{}", status.message());
    let info = tonic_types::StatusExt::get_error_details(&status);
    assert_eq!(info.error_info().unwrap().reason, "CENTRAL_UNREACHABLE");

    // A revocation cannot be made without the central broker: said the same way.
    let status = e
        .client
        .clone()
        .revoke_token(pb::RevokeTokenRequest {
            app: String::new(),
            access_token: token_of(&first),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let info = tonic_types::StatusExt::get_error_details(&status);
    assert_eq!(info.error_info().unwrap().reason, "CENTRAL_UNREACHABLE");
}

#[tokio::test]
async fn with_two_central_brokers_the_one_in_use_killed_mid_load_no_request_fails() {
    let mut centrals = [Harness::start().await, Harness::start().await];
    let e = Arc::new(
        edge_of(
            &[centrals[0].addr, centrals[1].addr],
            centrals[0].clock.clone(),
            Credential::Connection,
        )
        .await,
    );
    let load = |rounds: usize| {
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..8 {
            let e = e.clone();
            tasks.spawn(async move {
                let mut failed = 0;
                for round in 0..rounds {
                    // Emptied each time, so every request goes upstream.
                    e.edge.cache().invalidate_where(|_| true).await;
                    if e.get(user(APP_USER_IDS[(worker + round) % APP_USER_IDS.len()]))
                        .await
                        .is_err()
                    {
                        failed += 1;
                    }
                }
                failed
            });
        }
        tasks
    };
    // The edge keeps to the replica that answers (its cache is that replica's).
    e.get(enterprise()).await.unwrap();
    let in_use = usize::from(centrals[1].fake.stats().jwt_issued > 0);
    let other = 1 - in_use;
    assert_eq!(centrals[other].fake.stats().jwt_issued, 0, "one replica at a time");
    let mut first_wave = load(40);
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The replica in use is killed while the first wave runs; the second starts after.
    centrals[in_use].kill();
    let mut second_wave = load(40);
    let mut failed = 0;
    while let Some(n) = first_wave.join_next().await {
        failed += n.unwrap();
    }
    while let Some(n) = second_wave.join_next().await {
        failed += n.unwrap();
    }
    assert_eq!(failed, 0, "no request failed");
    assert!(centrals[other].fake.stats().jwt_issued > 0, "the other took over");
    // The kill was seen as a failed hop, and the request was retried.
    let unreachable: u64 = e.edge.central().counters.failures().iter().map(|(_, n, _)| n).sum();
    assert!(unreachable > 0);
}

#[tokio::test]
async fn the_central_brokers_refusal_reaches_the_app_unchanged_and_is_not_cached() {
    let only_enterprise = Policy::parse(
        "[[rules]]\nname = \"service account only\"\ncallers = [\"anonymous\"]\nenterprise = true\nfull_tokens = true\n",
        "test policy",
    )
    .unwrap();
    let (h, e) = central_and_edge(Options {
        policy: Some(only_enterprise),
        ..Options::default()
    })
    .await;
    let direct = h.get(user(APP_USER_IDS[0])).await.unwrap_err();
    let through = e.get(user(APP_USER_IDS[0])).await.unwrap_err();
    assert_eq!(direct.code(), Code::PermissionDenied);
    assert_eq!(through.code(), direct.code());
    assert_eq!(through.message(), direct.message());
    assert_eq!(through.details(), direct.details(), "the ErrorInfo too");
    let refused = e.audit_events();
    assert_eq!(refused.last().unwrap()["code"], "PERMISSION_DENIED");

    h.broker.replace_policy(Policy::allow_everything("anonymous"));
    let allowed = e.get(user(APP_USER_IDS[0])).await.unwrap();
    assert!(!allowed.cache_hit, "asked again, not a remembered refusal");
}

#[tokio::test]
async fn a_replaced_projected_token_is_what_the_next_upstream_call_presents() {
    use crate::kubernetes_auth::{AUDIENCE, ISSUER, KID, claims, jwks, service_account_token};
    let dir = tempfile::tempdir().unwrap();
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&common::fixture_key())).unwrap();
    let policy = Policy::parse(
        "[[rules]]\nname = \"portal pods\"\ncallers = [\"system:serviceaccount:portal:*\"]\nenterprise = true\nfull_tokens = true\nusers = [\"*\"]\n",
        "test policy",
    )
    .unwrap();
    let h = Harness::with(Options {
        policy: Some(policy),
        allow_anonymous: false,
        kubernetes: Some(box_token_broker::auth::kubernetes::KubernetesConfig {
            jwks_file: Some(jwks_file),
            issuer: ISSUER.to_owned(),
            audience: AUDIENCE.to_owned(),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let token_file = dir.path().join("token");
    let write_token = |name: &str| {
        let mut claims = claims(&format!("system:serviceaccount:portal:{name}"));
        claims["kubernetes.io"]["serviceaccount"]["name"] = serde_json::json!(name);
        let staged = dir.path().join("token.staged");
        std::fs::write(&staged, service_account_token(&common::fixture_key(), KID, claims)).unwrap();
        // The kubelet's way: a complete new file, swapped in.
        std::fs::rename(&staged, &token_file).unwrap();
    };
    write_token("web");
    let credential = Credential::ServiceAccountToken(SecretFile::open(&token_file).unwrap());
    let e = edge_of(&[h.addr], h.clock.clone(), credential).await;
    e.get(enterprise()).await.unwrap();
    assert_eq!(
        h.audit_events().last().unwrap()["caller"],
        "system:serviceaccount:portal:web"
    );

    write_token("api");
    e.get(user(APP_USER_IDS[0])).await.unwrap();
    assert_eq!(
        h.audit_events().last().unwrap()["caller"],
        "system:serviceaccount:portal:api"
    );
}

#[tokio::test]
async fn revoking_through_the_edge_revokes_at_the_central_broker_and_drops_the_local_copy() {
    let (h, e) = central_and_edge(Options::default()).await;
    let request = downscope(user(APP_USER_IDS[0]), &["item_preview"], folder(APP_USER_FOLDER_ID));
    let first = e.downscoped(request.clone()).await.unwrap().token.unwrap().access_token;
    e.client
        .clone()
        .revoke_token(pb::RevokeTokenRequest {
            app: String::new(),
            access_token: first.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        h.fake.stats().revoke_requests,
        1,
        "revoked at Box by the central broker"
    );
    let next = e.downscoped(request).await.unwrap();
    assert!(!next.cache_hit);
    assert_ne!(next.token.unwrap().access_token, first, "never the revoked token again");
}

#[tokio::test]
async fn no_token_reaches_the_edges_logs_spans_metrics_or_errors() {
    let observed = common::observed();
    let (mut h, e) = central_and_edge(Options::default()).await;
    let tokens = vec![
        token_of(&e.get(enterprise()).await.unwrap()),
        token_of(&e.get(user(APP_USER_IDS[0])).await.unwrap()),
        e.downscoped(downscope(
            user(APP_USER_IDS[0]),
            &["item_preview"],
            folder(APP_USER_FOLDER_ID),
        ))
        .await
        .unwrap()
        .token
        .unwrap()
        .access_token,
    ];
    e.client
        .clone()
        .revoke_token(pb::RevokeTokenRequest {
            app: String::new(),
            access_token: tokens[2].clone(),
        })
        .await
        .unwrap();
    let mut errors = Vec::new();
    h.kill();
    for request in [user(APP_USER_IDS[1]), user("not-a-number")] {
        errors.push(format!("{:?}", e.get(request).await.unwrap_err()));
    }
    let unknown = e
        .client
        .clone()
        .revoke_token(pb::RevokeTokenRequest {
            app: String::new(),
            access_token: tokens[0].clone(),
        })
        .await
        .unwrap_err();
    errors.push(format!("{unknown:?}"));
    let registry =
        box_token_broker::metrics::registry(Served::Edge(e.edge.clone()), e.rpc_metrics.clone(), Arc::default());
    let metrics = box_token_broker::metrics::render(&registry);
    assert!(
        metrics.contains("boxbroker_edge_upstream_answers_total{method=\"GetToken\",code=\"OK\"} 2"),
        "{metrics}"
    );
    let spans = format!("{:?}", common::spans(observed));
    let audit = String::from_utf8(e.audit.lock().unwrap().clone()).unwrap();
    assert!(tokens.iter().all(|t| t.len() == 32));
    for (what, text) in [
        ("logs", common::log_text()),
        ("spans", spans),
        ("metrics", metrics),
        ("errors", errors.join("\n")),
        ("audit", audit),
        ("the edge's Debug", format!("{:?}", e.edge)),
    ] {
        assert_free_of(&text, &tokens, what);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_central_brokers_span_continues_the_edges_trace_and_the_request_id_is_passed_on() {
    use crate::observability::attribute;
    let observed = common::observed();
    let (h, e) = central_and_edge(Options::default()).await;
    let mut request = tonic::Request::new(user(APP_USER_IDS[2]));
    request
        .metadata_mut()
        .insert("x-request-id", "edge-trace-1".parse().unwrap());
    e.client.clone().get_token(request).await.unwrap();
    // The central broker audited the app's request id.
    assert_eq!(h.audit_events().last().unwrap()["request_id"], "edge-trace-1");

    let spans = common::spans(observed);
    let named = |name: &str| {
        spans
            .iter()
            .filter(|s| s.name == name && attribute(s, "request_id").as_deref() == Some("edge-trace-1"))
            .collect::<Vec<_>>()
    };
    let rpcs = named("GetToken");
    assert_eq!(rpcs.len(), 2, "the edge's RPC span and the central broker's");
    let edge_rpc = rpcs
        .iter()
        .find(|s| s.parent_span_id.is_empty())
        .expect("the edge's is the root");
    let hop = spans
        .iter()
        .find(|s| s.name == "central.call" && s.parent_span_id == edge_rpc.span_id)
        .expect("the edge's call to the central broker");
    assert_eq!(attribute(hop, "outcome").as_deref(), Some("OK"));
    let central_rpc = rpcs
        .iter()
        .find(|s| s.parent_span_id == hop.span_id)
        .expect("the central broker's span is the hop's child");
    assert_eq!(central_rpc.trace_id, edge_rpc.trace_id, "one trace");
}

fn revoke_request(token: &str) -> pb::RevokeTokenRequest {
    pb::RevokeTokenRequest {
        app: String::new(),
        access_token: token.to_owned(),
    }
}

#[tokio::test]
async fn a_token_fetched_again_unchanged_is_still_dropped_when_revoked() {
    let (h, e) = central_and_edge(Options::default()).await;
    let first = token_of(&e.get(enterprise()).await.unwrap());
    // A forced request within the central broker's forced-refresh interval
    // is answered with the same token: the edge caches it anew.
    let forced = e
        .get(pb::GetTokenRequest {
            force_refresh: true,
            ..enterprise()
        })
        .await
        .unwrap();
    assert_eq!(token_of(&forced), first, "the central broker's token, again");
    e.client.clone().revoke_token(revoke_request(&first)).await.unwrap();
    assert_eq!(h.fake.stats().revoke_requests, 1);
    let next = e.get(enterprise()).await.unwrap();
    assert!(!next.cache_hit);
    assert_ne!(token_of(&next), first, "never the revoked token again");
}

#[tokio::test]
async fn revoking_a_full_token_through_the_edge_drops_its_subjects_downscoped_tokens() {
    let (_h, e) = central_and_edge(Options::default()).await;
    let request = downscope(user(APP_USER_IDS[0]), &["item_preview"], folder(APP_USER_FOLDER_ID));
    let child = e.downscoped(request.clone()).await.unwrap().token.unwrap().access_token;
    let parent = token_of(&e.get(user(APP_USER_IDS[0])).await.unwrap());
    assert!(e.downscoped(request.clone()).await.unwrap().cache_hit);
    e.client.clone().revoke_token(revoke_request(&parent)).await.unwrap();
    let again = e.downscoped(request).await.unwrap();
    assert!(!again.cache_hit, "asked for again");
    assert_ne!(
        again.token.unwrap().access_token,
        child,
        "the central broker exchanged a new one"
    );
}

#[tokio::test]
async fn revoking_a_token_the_edge_does_not_hold_is_the_central_brokers_call() {
    let (h, e) = central_and_edge(Options::default()).await;
    let unknown = "0123456789abcdef0123456789abcdef";
    let direct = h.revoke(unknown).await.unwrap_err();
    let through = e
        .client
        .clone()
        .revoke_token(revoke_request(unknown))
        .await
        .unwrap_err();
    assert_eq!(through.code(), Code::NotFound);
    assert_eq!((through.code(), through.message()), (direct.code(), direct.message()));
    assert_eq!(through.details(), direct.details());
}

#[tokio::test]
async fn one_local_caller_cannot_revoke_a_token_served_to_another() {
    use sha2::Digest as _;
    let h = Harness::start().await;
    let keys = ["portal-a", "portal-b"]
        .iter()
        .map(|k| {
            (
                (*k).to_owned(),
                <[u8; 32]>::from(sha2::Sha256::digest(format!("key-{k}").as_bytes())),
            )
        })
        .collect();
    let local = Authenticator::new(Anonymous::Refused).with_api_keys(keys);
    let e = edge_with(&[h.addr], h.clock.clone(), Credential::Connection, local).await;
    fn with_key<T>(key: &str, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("x-api-key", format!("key-{key}").parse().unwrap());
        request
    }
    let mut client = e.client.clone();
    let a = token_of(
        &client
            .get_token(with_key("portal-a", user(APP_USER_IDS[0])))
            .await
            .unwrap()
            .into_inner(),
    );
    let refused = client
        .revoke_token(with_key("portal-b", revoke_request(&a)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    assert_eq!(
        h.fake.stats().revoke_requests,
        0,
        "nothing reached the central broker or Box"
    );
    // Served to both: neither may revoke it.
    client
        .get_token(with_key("portal-b", user(APP_USER_IDS[0])))
        .await
        .unwrap();
    let shared = client
        .revoke_token(with_key("portal-a", revoke_request(&a)))
        .await
        .unwrap_err();
    assert_eq!(shared.code(), Code::FailedPrecondition, "{shared:?}");
    let served = client
        .get_token(with_key("portal-a", user(APP_USER_IDS[0])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(token_of(&served), a, "still served");
    // Handed the same token again (a forced request within the central
    // broker's interval), the edge still knows whom it served it to.
    let c = token_of(
        &client
            .get_token(with_key("portal-a", user(APP_USER_IDS[1])))
            .await
            .unwrap()
            .into_inner(),
    );
    let forced = pb::GetTokenRequest {
        force_refresh: true,
        ..user(APP_USER_IDS[1])
    };
    let again = client
        .get_token(with_key("portal-b", forced))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(token_of(&again), c, "the same token, cached anew");
    // Not B's: it was served to A first (as a central broker says it).
    let refused = client
        .revoke_token(with_key("portal-b", revoke_request(&c)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    assert_eq!(h.fake.stats().revoke_requests, 0, "nothing revoked");
}

#[tokio::test]
async fn force_refresh_and_min_ttl_are_the_central_brokers_to_honour() {
    let (h, e) = central_and_edge(Options::default()).await;
    let first = token_of(&e.get(enterprise()).await.unwrap());
    let forced_request = || pb::GetTokenRequest {
        force_refresh: true,
        ..enterprise()
    };
    // A forced request always reaches the central broker, however fresh
    // the edge's copy: the central broker decides (here, within its
    // forced-refresh interval, the same token).
    let asked = central_calls(&h, "GetToken");
    assert_eq!(token_of(&e.get(forced_request()).await.unwrap()), first);
    assert_eq!(central_calls(&h, "GetToken"), asked + 1);
    // Past the central broker's forced-refresh interval, a forced request
    // through the edge mints anew at Box.
    h.clock.advance(Duration::from_secs(10));
    let issued = h.fake.stats().jwt_issued;
    let forced = e.get(forced_request()).await.unwrap();
    assert_ne!(token_of(&forced), first);
    assert_eq!(h.fake.stats().jwt_issued, issued + 1);
    // A min_ttl the held token cannot meet is asked of the central broker,
    // which mints one that does.
    h.clock.advance(Duration::from_secs(1500));
    let long = e
        .get(pb::GetTokenRequest {
            min_ttl: common::secs(2900),
            ..enterprise()
        })
        .await
        .unwrap();
    assert!(!long.cache_hit);
    assert_ne!(token_of(&long), token_of(&forced));
    assert_eq!(h.fake.stats().jwt_issued, issued + 2);
    let expires = long.token.unwrap().expires_at.unwrap().seconds;
    let now = box_token_broker::clock::Clock::now(&*h.clock)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(expires - now > 2900 + DEFAULT_SAFETY_MARGIN.as_secs() as i64);
}

#[tokio::test]
async fn a_token_held_under_two_app_names_is_dropped_under_both_when_revoked() {
    let (h, e) = central_and_edge(Options::default()).await;
    let named = pb::GetTokenRequest {
        app: "default".to_owned(),
        ..enterprise()
    };
    let token = token_of(&e.get(enterprise()).await.unwrap());
    assert_eq!(
        token_of(&e.get(named.clone()).await.unwrap()),
        token,
        "the central broker's one token"
    );
    e.client.clone().revoke_token(revoke_request(&token)).await.unwrap();
    assert_eq!(h.fake.stats().revoke_requests, 1);
    for request in [enterprise(), named] {
        let next = e.get(request).await.unwrap();
        assert_ne!(token_of(&next), token, "never the revoked token, under either name");
    }
}

#[tokio::test]
async fn concurrent_forced_requests_share_one_call_to_the_central_broker() {
    let (h, e) = central_and_edge(Options::default()).await;
    let e = Arc::new(e);
    e.get(enterprise()).await.unwrap();
    // Past the central broker's forced-refresh interval, with a slow Box:
    // every forced request arrives while the first one's call is under way.
    h.clock.advance(Duration::from_secs(10));
    h.fake.set_latency(Duration::from_millis(300));
    let asked = central_calls(&h, "GetToken");
    let issued = h.fake.stats().jwt_issued;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let e = e.clone();
        tasks.spawn(async move {
            let forced = pb::GetTokenRequest {
                force_refresh: true,
                ..enterprise()
            };
            token_of(&e.get(forced).await.unwrap())
        });
    }
    let mut tokens = std::collections::BTreeSet::new();
    while let Some(token) = tasks.join_next().await {
        tokens.insert(token.unwrap());
    }
    assert_eq!(tokens.len(), 1, "all got the new token");
    assert_eq!(central_calls(&h, "GetToken"), asked + 1, "one call upstream");
    assert_eq!(h.fake.stats().jwt_issued, issued + 1, "one mint");
}

#[tokio::test]
async fn over_https_the_edge_checks_the_central_brokers_name_and_presents_the_pods_certificate() {
    use crate::mtls::{SPIFFE, audited_callers, harness, serve_mtls};
    use box_token_broker::edge::central::{CentralEndpoint, CentralTls};
    use common::pki::{Pki, uri};
    let h = harness().await;
    let pki = Pki::new();
    let (addr, audit) = serve_mtls(&h, &pki).await;
    let tls = |identity: Option<(String, String)>, server_name: Option<&str>| CentralSettings {
        // The certificate names localhost; the edge connects to the
        // address the name resolves to and checks the name.
        endpoints: vec![CentralEndpoint {
            https: true,
            host: "localhost".to_owned(),
            port: addr.port(),
        }],
        tls: Some(CentralTls {
            ca_pem: pki.ca.pem().into_bytes(),
            identity: identity.map(|(cert, key)| (cert.into_bytes(), zeroize::Zeroizing::new(key.into_bytes()))),
            server_name: server_name.map(str::to_owned),
        }),
        policy: hop_policy(),
        ..CentralSettings::plaintext(&[])
    };
    let pod = pki.issue(vec![uri(SPIFFE)]);
    let e = edge_from(
        tls(Some(pod.clone()), None),
        h.clock.clone(),
        Authenticator::new(Anonymous::Admitted),
    )
    .await;
    assert_eq!(token_of(&e.get(enterprise()).await.unwrap()).len(), 32);
    assert_eq!(
        audited_callers(&audit),
        [SPIFFE],
        "the pod's certificate is its identity"
    );

    // A certificate for another name is refused: the hop fails, nothing is served.
    let wrong = edge_from(
        tls(Some(pod), Some("central.example")),
        h.clock.clone(),
        Authenticator::new(Anonymous::Admitted),
    )
    .await;
    let status = wrong.get(enterprise()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("cannot be reached"), "{}", status.message());
    assert_eq!(
        audited_callers(&audit).len(),
        1,
        "it never reached the central broker's handler"
    );
}
