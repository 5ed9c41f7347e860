//! `/metrics` is scraped and parsed, and the counters move as the scenario says.

use crate::common;

use std::collections::BTreeMap;

use box_token_broker::{fakebox::Fault, fakebox::seed, policy::Policy};
use common::{Harness, Options, enterprise, user};

/// `name{labels}` -> value, from the text exposition.
fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}

pub(crate) async fn scrape(addr: std::net::SocketAddr) -> BTreeMap<String, f64> {
    let response = reqwest::get(format!("http://{addr}/metrics")).await.unwrap();
    assert!(response.status().is_success());
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    parse(&response.text().await.unwrap())
}

/// `/metrics` for `h`'s broker on a free port.
pub(crate) async fn serve_metrics(h: &Harness) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(box_token_broker::metrics::serve(
        listener,
        box_token_broker::metrics::registry(
            box_token_broker::metrics::Served::Broker(h.broker.clone()),
            h.rpc_metrics.clone(),
            std::sync::Arc::default(),
        ),
        std::sync::Arc::default(),
        std::future::pending(),
    ));
    addr
}

#[tokio::test]
async fn the_counters_move_as_the_scenario_says() {
    let policy = Policy::parse(
        "[[rules]]\nname = \"sa only\"\ncallers = [\"anonymous\"]\nenterprise = true\nfull_tokens = true\nforce_refresh = true\nscopes = [\"item_preview\"]\nfolders = [\"*\"]\n",
        "test",
    )
    .unwrap();
    let h = Harness::with(Options {
        policy: Some(policy),
        ..Options::default()
    })
    .await;
    let addr = serve_metrics(&h).await;
    let before = scrape(addr).await;
    assert_eq!(
        before.get("boxbroker_rpc_requests_total{method=\"GetToken\",code=\"OK\"}"),
        None
    );
    assert_eq!(before["boxbroker_circuit_state{app=\"default\"}"], 0.0);

    // A 503 first: the mint succeeds on the retry. Then a cache hit.
    h.fake.fail_next(1, Fault::ServerError { status: 503 });
    h.get(enterprise()).await.unwrap();
    h.get(enterprise()).await.unwrap();
    // A denial, and a downscoped token.
    h.get(user(seed::APP_USER_IDS[0])).await.unwrap_err();
    h.downscoped(common::downscope(
        enterprise(),
        &["item_preview"],
        common::folder(seed::SERVICE_ACCOUNT_FOLDER_ID),
    ))
    .await
    .unwrap();

    let m = scrape(addr).await;
    let get = |k: &str| m.get(k).copied().unwrap_or_else(|| panic!("no series {k}: {m:#?}"));
    assert_eq!(
        get("boxbroker_rpc_requests_total{method=\"GetToken\",code=\"OK\"}"),
        2.0
    );
    assert_eq!(
        get("boxbroker_rpc_requests_total{method=\"GetToken\",code=\"PERMISSION_DENIED\"}"),
        1.0
    );
    assert_eq!(
        get("boxbroker_rpc_requests_total{method=\"GetDownscopedToken\",code=\"OK\"}"),
        1.0
    );
    assert_eq!(get("boxbroker_rpc_duration_seconds_count{method=\"GetToken\"}"), 3.0);
    assert_eq!(get("boxbroker_policy_denials_total{method=\"GetToken\"}"), 1.0);
    assert_eq!(
        get("boxbroker_cache_lookups_total{method=\"GetToken\",result=\"miss\"}"),
        1.0
    );
    assert_eq!(
        get("boxbroker_cache_lookups_total{method=\"GetToken\",result=\"hit\"}"),
        1.0
    );
    assert_eq!(
        get("boxbroker_upstream_responses_total{app=\"default\",status=\"503\"}"),
        1.0
    );
    // The mint (after its retry) and the exchange.
    assert_eq!(
        get("boxbroker_upstream_responses_total{app=\"default\",status=\"200\"}"),
        2.0
    );
    assert_eq!(get("boxbroker_upstream_attempts_total{app=\"default\"}"), 3.0);
    assert_eq!(get("boxbroker_upstream_retries_total{app=\"default\"}"), 1.0);
    assert_eq!(get("boxbroker_upstream_duration_seconds_count{app=\"default\"}"), 3.0);
    assert_eq!(get("boxbroker_mints_total{app=\"default\",outcome=\"ok\"}"), 1.0);
    assert_eq!(get("boxbroker_exchanges_total{app=\"default\",outcome=\"ok\"}"), 1.0);
    assert_eq!(
        get(&format!(
            "boxbroker_active_key_info{{app=\"default\",kid=\"{}\"}}",
            h.app.kid
        )),
        1.0
    );
    assert_eq!(get("boxbroker_cache_entries"), 2.0);

    // A 429 storm opens the circuit, and the gauge says so.
    h.fake.fail_next(1, Fault::RateLimited { retry_after_secs: 100 });
    h.clock.advance(std::time::Duration::from_secs(6));
    let mut forced = enterprise();
    forced.force_refresh = true;
    h.get(forced).await.unwrap_err();
    let m = scrape(addr).await;
    assert_eq!(m["boxbroker_upstream_rate_limited_total{app=\"default\"}"], 1.0);
    assert_eq!(m["boxbroker_circuit_state{app=\"default\"}"], 1.0);
    assert_eq!(
        m["boxbroker_rpc_requests_total{method=\"GetToken\",code=\"UNAVAILABLE\"}"],
        1.0
    );
}

#[tokio::test]
async fn the_build_and_the_process_are_exported() {
    let h = Harness::start().await;
    let addr = serve_metrics(&h).await;
    let m = scrape(addr).await;
    let build = m
        .iter()
        .find(|(series, _)| series.starts_with("boxbroker_build_info{"))
        .unwrap_or_else(|| panic!("no boxbroker_build_info in {m:?}"));
    assert_eq!(*build.1, 1.0);
    assert!(
        build.0.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{}",
        build.0
    );
    // This test process's own figures, within reason.
    assert!(m["process_resident_memory_bytes"] > 1e6, "{m:?}");
    assert!(m["process_virtual_memory_bytes"] >= m["process_resident_memory_bytes"]);
    assert!(m["process_open_fds"] >= 3.0 && m["process_open_fds"] <= m["process_max_fds"]);
    assert!(m["process_cpu_seconds_total"] > 0.0);
    let now = box_token_broker::clock::system_now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = m["process_start_time_seconds"];
    assert!(started <= now + 1.0 && started > now - 3600.0, "{started} vs {now}");
}
