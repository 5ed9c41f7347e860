//! Prometheus metrics (prometheus-client), served as `GET /metrics` on
//! `[server] metrics_listen`.
//!
//! RPC counts and latencies, cache lookups and policy denials are recorded as
//! they happen ([`RpcMetrics`], owned by the service layer). Everything the broker
//! already counts — upstream attempts by status and their latency, retries,
//! 429s, circuit state, mints and exchanges by outcome, the active key, the
//! cache's size and evictions — is read at scrape time by [`BrokerCollector`].
//! Labels are app names, RPC names, status codes and key ids: never tokens,
//! secrets or caller-supplied strings.

use std::{
    fmt,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{
    boxapi::client::CircuitState,
    broker::Broker,
    edge::Edge,
    histogram::LatencyHistogram,
    keys::KeyState,
    rpc::{Rpc, code_name},
};

type Labels = Vec<(&'static str, String)>;

/// gRPC status codes 0 (Ok) to 16 (Unauthenticated).
const CODES: usize = 17;
/// One method's counters.
#[derive(Debug, Default)]
struct MethodMetrics {
    by_code: [AtomicU64; CODES],
    duration: LatencyHistogram,
    denials: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

/// What the RPC adapters record as requests happen: atomic counters in a
/// fixed table (method × code), so recording takes no lock, hashes nothing
/// and allocates nothing. Read at scrape time by [`registry`]'s collector;
/// a series appears once it has counted something.
#[derive(Debug, Clone, Default)]
pub struct RpcMetrics(Arc<[MethodMetrics; Rpc::CLIENT.len()]>);

impl RpcMetrics {
    fn method(&self, method: Rpc) -> Option<&MethodMetrics> {
        let found = method.client_index().map(|i| &self.0[i]);
        debug_assert!(found.is_some(), "RpcMetrics counts only the client API, not {method}");
        found
    }

    /// One finished RPC: its method, gRPC code and duration.
    pub fn rpc(&self, method: Rpc, code: tonic::Code, took: Duration) {
        let Some(m) = self.method(method) else { return };
        let index = usize::try_from(i32::from(code)).unwrap_or(2).min(CODES - 1);
        m.by_code[index].fetch_add(1, Ordering::Relaxed);
        m.duration.observe(took);
        if code == tonic::Code::PermissionDenied {
            m.denials.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A served token: from the cache or not.
    pub fn cache_lookup(&self, method: Rpc, hit: bool) {
        let Some(m) = self.method(method) else { return };
        if hit { &m.cache_hits } else { &m.cache_misses }.fetch_add(1, Ordering::Relaxed);
    }
}

/// What happened to connections, for metrics and tests.
#[derive(Debug, Default)]
pub struct TransportCounters {
    /// Connections open now, over all listeners.
    pub open: AtomicUsize,
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections closed at once because the listener (or the peer) was at its limit.
    pub refused: AtomicU64,
    /// `accept` failures (other than the peer giving up), each followed by a backoff.
    pub accept_errors: AtomicU64,
    /// Connections closed for not finishing TLS and the HTTP/2 preface in time.
    pub handshake_timeouts: AtomicU64,
    /// Connections sent GOAWAY for idleness.
    pub idle_closed: AtomicU64,
}

/// Encodes [`RpcMetrics`] at scrape time.
struct RpcCollector(RpcMetrics);

impl fmt::Debug for RpcCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RpcCollector")
    }
}

impl Collector for RpcCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let methods = || Rpc::CLIENT.iter().map(|rpc| rpc.name()).zip(self.0.0.iter());
        let mut requests = Vec::new();
        let mut lookups = Vec::new();
        let mut denials = Vec::new();
        for (name, m) in methods() {
            for (code, count) in m.by_code.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    let code = tonic::Code::from(i32::try_from(code).unwrap_or(2));
                    requests.push((
                        vec![("method", name.to_owned()), ("code", code_name(code).to_owned())],
                        count,
                    ));
                }
            }
            for (result, count) in [("hit", &m.cache_hits), ("miss", &m.cache_misses)] {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    lookups.push((vec![("method", name.to_owned()), ("result", result.to_owned())], count));
                }
            }
            let denied = m.denials.load(Ordering::Relaxed);
            if denied > 0 {
                denials.push((vec![("method", name.to_owned())], denied));
            }
        }
        counter(
            &mut encoder,
            "boxbroker_rpc_requests",
            "gRPC requests, by method and status code.",
            &requests,
        )?;
        {
            let mut metric = encoder.encode_descriptor(
                "boxbroker_rpc_duration_seconds",
                "gRPC request latency, by method.",
                None,
                prometheus_client::metrics::MetricType::Histogram,
            )?;
            for (name, m) in methods() {
                let (sum, count, buckets) = m.duration.snapshot();
                if count > 0 {
                    metric
                        .encode_family(&vec![("method", name.to_owned())])?
                        .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
                }
            }
        }
        counter(
            &mut encoder,
            "boxbroker_cache_lookups",
            "Served tokens by method, from the cache (hit) or not (miss).",
            &lookups,
        )?;
        counter(
            &mut encoder,
            "boxbroker_policy_denials",
            "Requests the policy denied, by method.",
            &denials,
        )
    }
}

/// Reads the broker's own counters at scrape time.
pub struct BrokerCollector(Arc<Broker>);

impl fmt::Debug for BrokerCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BrokerCollector")
    }
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, values: &[(Labels, u64)]) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (labels, value) in values {
        if labels.is_empty() {
            return ConstCounter::new(*value).encode(metric);
        }
        ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, values: &[(Labels, i64)]) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    for (labels, value) in values {
        if labels.is_empty() {
            return ConstGauge::new(*value).encode(metric);
        }
        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

/// The cache's size and evictions (a central broker's or an edge's).
fn cache_series(encoder: &mut DescriptorEncoder, cache: &crate::cache::TokenCache) -> fmt::Result {
    gauge(
        encoder,
        "boxbroker_cache_entries",
        "Tokens in the cache.",
        &[(vec![], i64::try_from(cache.live_entries()).unwrap_or(i64::MAX))],
    )?;
    counter(
        encoder,
        "boxbroker_cache_evictions",
        "Tokens dropped from the cache for size or expiry.",
        &[(vec![], cache.evictions())],
    )
}

/// The fleet's Redis: the second-level cache, leases, notices, key sets, its state.
fn fleet_series(encoder: &mut DescriptorEncoder, broker: &Broker, fleet: &crate::l2::Redis) -> fmt::Result {
    let c = fleet.counters();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    counter(
        encoder,
        "boxbroker_l2_lookups",
        "Looks in Redis for a token this replica did not hold, by result (a value that does not decrypt is a miss and also counted in boxbroker_l2_errors).",
        &[
            (vec![("result", "hit".to_owned())], load(&c.hits)),
            (vec![("result", "miss".to_owned())], load(&c.misses)),
        ],
    )?;
    counter(
        encoder,
        "boxbroker_l2_errors",
        "Redis calls that failed or were skipped, by kind: timeout, error, undecryptable (another KEK or tampered), skipped (circuit open).",
        &[
            (vec![("kind", "timeout".to_owned())], load(&c.timeouts)),
            (vec![("kind", "error".to_owned())], load(&c.errors)),
            (vec![("kind", "undecryptable".to_owned())], load(&c.undecryptable)),
            (vec![("kind", "skipped".to_owned())], load(&c.skipped)),
        ],
    )?;
    counter(
        encoder,
        "boxbroker_l2_lease_waits",
        "Flights that waited for another replica's mint (its lease) instead of minting.",
        &[(vec![], load(&c.lease_waits))],
    )?;
    counter(
        encoder,
        "boxbroker_l2_lease_takeovers",
        "Leases taken after waiting: the holder ended without a token, or died.",
        &[(vec![], load(&c.lease_takeovers))],
    )?;
    counter(
        encoder,
        "boxbroker_l2_writes",
        "Tokens written to Redis, by outcome (refused: lease lost, invalidated since the lease was taken, or a newer token held).",
        &[
            (vec![("outcome", "written".to_owned())], load(&c.writes)),
            (vec![("outcome", "refused".to_owned())], load(&c.writes_refused)),
        ],
    )?;
    counter(
        encoder,
        "boxbroker_l2_notices",
        "Invalidation and key-set notices, by direction (sent by this replica, received from others).",
        &[
            (vec![("direction", "sent".to_owned())], load(&c.notices_sent)),
            (vec![("direction", "received".to_owned())], load(&c.notices_received)),
        ],
    )?;
    counter(
        encoder,
        "boxbroker_l2_master_switches",
        "Times the Redis Sentinels named a new master and this replica followed it (0 with one Redis).",
        &[(vec![], fleet.master_switches())],
    )?;
    gauge(
        encoder,
        "boxbroker_l2_degraded",
        "1 while Redis is skipped after failures (the replica serves its own cache and mints for itself), else 0.",
        &[(vec![], i64::from(fleet.state() == "degraded"))],
    )?;
    let versions: Vec<(Labels, i64)> = broker
        .apps()
        .map(|a| {
            (
                vec![("app", a.name.to_string())],
                i64::try_from(a.ring().version).unwrap_or(i64::MAX),
            )
        })
        .collect();
    gauge(
        encoder,
        "boxbroker_key_set_version",
        "This replica's key-set version, by app (raised by each key change; every replica of a fleet should show the same).",
        &versions,
    )
}

impl Collector for BrokerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let broker = &self.0;
        let cache = broker.cache();
        cache_series(&mut encoder, cache)?;
        if let Some(fleet) = broker.fleet() {
            fleet_series(&mut encoder, broker, fleet)?;
        }
        let apps: Vec<_> = broker.apps().cloned().collect();
        let per_app = |f: &dyn Fn(&crate::broker::App) -> u64| -> Vec<(Labels, u64)> {
            apps.iter().map(|a| (vec![("app", a.name.to_string())], f(a))).collect()
        };
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut outcomes = Vec::new();
        let mut exchanges = Vec::new();
        for a in &apps {
            let o = &a.outcomes;
            outcomes.push((
                vec![("app", a.name.to_string()), ("outcome", "ok".to_owned())],
                load(&o.mints_ok),
            ));
            outcomes.push((
                vec![("app", a.name.to_string()), ("outcome", "failed".to_owned())],
                load(&o.mints_failed),
            ));
            exchanges.push((
                vec![("app", a.name.to_string()), ("outcome", "ok".to_owned())],
                load(&o.exchanges_ok),
            ));
            exchanges.push((
                vec![("app", a.name.to_string()), ("outcome", "failed".to_owned())],
                load(&o.exchanges_failed),
            ));
        }
        counter(
            &mut encoder,
            "boxbroker_mints",
            "Token mints (JWT or CCG grants), by outcome.",
            &outcomes,
        )?;
        counter(
            &mut encoder,
            "boxbroker_exchanges",
            "Token exchanges (downscoping), by outcome.",
            &exchanges,
        )?;
        counter(
            &mut encoder,
            "boxbroker_upstream_attempts",
            "HTTP requests sent to Box (its token endpoint and users API).",
            &per_app(&|a| load(&a.client.counters().attempts)),
        )?;
        counter(
            &mut encoder,
            "boxbroker_app_users_created",
            "App Users created for an external id on first use (create_if_missing).",
            &per_app(&|a| load(&a.outcomes.users_created)),
        )?;
        counter(
            &mut encoder,
            "boxbroker_users_refused",
            "Users Box showed the broker never tokenizes (admins, co-admins, inactive, other enterprises), each time Box said so.",
            &per_app(&|a| load(&a.outcomes.users_refused)),
        )?;
        counter(
            &mut encoder,
            "boxbroker_upstream_retries",
            "Requests to Box retried after a 429, 5xx or connection failure.",
            &per_app(&|a| load(&a.client.counters().retries)),
        )?;
        counter(
            &mut encoder,
            "boxbroker_upstream_rate_limited",
            "429 answers from Box.",
            &per_app(&|a| load(&a.client.counters().rate_limited)),
        )?;
        counter(
            &mut encoder,
            "boxbroker_upstream_skew_corrections",
            "Assertions rebuilt with Box's clock after a clock-skew refusal.",
            &per_app(&|a| load(&a.client.counters().skew_corrections)),
        )?;
        counter(
            &mut encoder,
            "boxbroker_upstream_short_circuited",
            "Requests to Box refused at once because the circuit was open.",
            &per_app(&|a| load(&a.client.counters().short_circuited)),
        )?;
        counter(
            &mut encoder,
            "boxbroker_standby_key_fallbacks",
            "Mints that succeeded only with the standby key (an alert).",
            &per_app(&crate::broker::App::standby_fallbacks),
        )?;
        counter(
            &mut encoder,
            "boxbroker_keystore_write_failures",
            "Key or secret changes not made because the key store could not be written (an alert).",
            &per_app(&crate::broker::App::keystore_write_failures),
        )?;
        let mut responses = Vec::new();
        for a in &apps {
            let counts = a
                .client
                .counters()
                .responses
                .lock()
                .map(|r| r.clone())
                .unwrap_or_default();
            for (status, count) in counts {
                responses.push((vec![("app", a.name.to_string()), ("status", status)], count));
            }
        }
        counter(
            &mut encoder,
            "boxbroker_upstream_responses",
            "Attempts by outcome: Box's HTTP status, or timeout, connection, malformed.",
            &responses,
        )?;
        {
            let mut metric = encoder.encode_descriptor(
                "boxbroker_upstream_duration_seconds",
                "Seconds per attempt to Box (token endpoint and users API).",
                None,
                prometheus_client::metrics::MetricType::Histogram,
            )?;
            for a in &apps {
                a.client
                    .counters()
                    .latency
                    .encode(metric.encode_family(&vec![("app", a.name.to_string())])?)?;
            }
        }
        let circuit: Vec<(Labels, i64)> = apps
            .iter()
            .map(|a| {
                let state = match a.client.circuit_state() {
                    CircuitState::Closed => 0,
                    CircuitState::Open => 1,
                    CircuitState::HalfOpen => 2,
                };
                (vec![("app", a.name.to_string())], state)
            })
            .collect();
        gauge(
            &mut encoder,
            "boxbroker_circuit_state",
            "The circuit to Box per app: 0 closed, 1 open, 2 half-open.",
            &circuit,
        )?;
        let keys: Vec<(Labels, i64)> = apps
            .iter()
            .filter_map(|a| {
                let ring = a.ring();
                let key = ring.key_in(KeyState::Active)?;
                Some((
                    vec![
                        ("app", a.name.to_string()),
                        ("kid", key.kid.clone().unwrap_or_default()),
                    ],
                    1,
                ))
            })
            .collect();
        gauge(
            &mut encoder,
            "boxbroker_active_key_info",
            "The active signing key per app (the kid is a label; the value is 1).",
            &keys,
        )?;
        Ok(())
    }
}

/// What answers the client API: a central broker (it holds the Box
/// credentials and mints) or an edge (it asks a central broker); what a
/// metrics endpoint describes besides RPCs and connections.
#[derive(Debug, Clone)]
pub enum Served {
    /// A central broker: its apps, mints, circuits to Box and keys.
    Broker(Arc<Broker>),
    /// An edge: its cache and its calls to the central broker.
    Edge(Arc<Edge>),
}

/// Reads an edge's cache and its calls to the central broker at scrape time.
pub struct EdgeCollector(Arc<Edge>);

impl fmt::Debug for EdgeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EdgeCollector")
    }
}

impl Collector for EdgeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let cache = self.0.cache();
        let central = self.0.central();
        let counters = &central.counters;
        cache_series(&mut encoder, cache)?;
        let answers: Vec<(Labels, u64)> = counters
            .answers()
            .into_iter()
            .map(|(rpc, code, n)| {
                (
                    vec![("method", rpc.name().to_owned()), ("code", code_name(code).to_owned())],
                    n,
                )
            })
            .collect();
        counter(
            &mut encoder,
            "boxbroker_edge_upstream_answers",
            "The central broker's answers to this edge, by method and gRPC code.",
            &answers,
        )?;
        let failures = counters.failures();
        counter(
            &mut encoder,
            "boxbroker_edge_upstream_unreachable",
            "Attempts to call the central broker that got no answer (refused, reset, timed out), by method.",
            &failures
                .iter()
                .map(|(rpc, n, _)| (vec![("method", rpc.name().to_owned())], *n))
                .collect::<Vec<_>>(),
        )?;
        counter(
            &mut encoder,
            "boxbroker_edge_upstream_gave_up",
            "Calls to the central broker that failed for good (attempts, deadline or circuits exhausted), by method.",
            &failures
                .iter()
                .map(|(rpc, _, n)| (vec![("method", rpc.name().to_owned())], *n))
                .collect::<Vec<_>>(),
        )?;
        let load = |c: &AtomicU64| vec![(Labels::new(), c.load(Ordering::Relaxed))];
        counter(
            &mut encoder,
            "boxbroker_edge_upstream_retries",
            "Attempts after the first of a call to the central broker (failovers and retries).",
            &load(&counters.retries),
        )?;
        counter(
            &mut encoder,
            "boxbroker_edge_circuit_opened",
            "Times a central broker endpoint's circuit opened.",
            &load(&counters.circuit_opened),
        )?;
        counter(
            &mut encoder,
            "boxbroker_edge_resolve_failures",
            "Resolutions of the central broker's endpoint names that found no address.",
            &load(&counters.resolve_failures),
        )?;
        {
            let (sum, count, buckets) = counters.duration.snapshot();
            let mut metric = encoder.encode_descriptor(
                "boxbroker_edge_upstream_duration_seconds",
                "Latency of the central broker's answers to this edge.",
                None,
                prometheus_client::metrics::MetricType::Histogram,
            )?;
            metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
        }
        let circuits: Vec<(Labels, i64)> = central
            .circuits()
            .into_iter()
            .map(|(address, state)| {
                let state = match state {
                    CircuitState::Closed => 0,
                    CircuitState::Open => 1,
                    CircuitState::HalfOpen => 2,
                };
                (vec![("endpoint", address.to_string())], state)
            })
            .collect();
        gauge(
            &mut encoder,
            "boxbroker_edge_circuit_state",
            "The circuit to each central broker address: 0 closed, 1 open, 2 half-open.",
            &circuits,
        )
    }
}

/// Reads the transport's connection counters at scrape time.
struct TransportCollector(Arc<TransportCounters>);

impl fmt::Debug for TransportCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TransportCollector")
    }
}

impl Collector for TransportCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let c = &self.0;
        let load = |n: &AtomicU64| vec![(Labels::new(), n.load(Ordering::Relaxed))];
        gauge(
            &mut encoder,
            "boxbroker_connections_open",
            "Connections open now, over all listeners.",
            &[(
                vec![],
                i64::try_from(c.open.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
            )],
        )?;
        counter(
            &mut encoder,
            "boxbroker_connections_accepted",
            "Connections accepted.",
            &load(&c.accepted),
        )?;
        counter(
            &mut encoder,
            "boxbroker_connections_refused",
            "Connections closed at once because a listener was at [server] max_connections.",
            &load(&c.refused),
        )?;
        counter(
            &mut encoder,
            "boxbroker_accept_errors",
            "Failed accepts (out of descriptors or memory), each followed by a backoff.",
            &load(&c.accept_errors),
        )?;
        counter(
            &mut encoder,
            "boxbroker_handshake_timeouts",
            "Connections closed for not finishing TLS and the HTTP/2 preface within [server] handshake_timeout_secs.",
            &load(&c.handshake_timeouts),
        )?;
        counter(
            &mut encoder,
            "boxbroker_connections_idle_closed",
            "Connections sent GOAWAY after [server] idle_timeout_secs without a request.",
            &load(&c.idle_closed),
        )
    }
}

/// `boxbroker_build_info`: which build is running.
#[derive(Debug)]
struct BuildInfoCollector;

impl Collector for BuildInfoCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        gauge(
            &mut encoder,
            "boxbroker_build_info",
            "The running build: always 1, with its version, git commit and compiler as labels.",
            &[(
                vec![
                    ("version", env!("CARGO_PKG_VERSION").to_owned()),
                    ("commit", env!("BROKER_BUILD_COMMIT").to_owned()),
                    ("rustc", env!("BROKER_BUILD_RUSTC").to_owned()),
                ],
                1,
            )],
        )
    }
}

/// The process metrics every Prometheus client library exports
/// (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...),
/// read from `/proc/self` at scrape time; nothing where there is no `/proc`.
#[derive(Debug)]
struct ProcessCollector;

/// /proc's clock tick (USER_HZ, 100 on every Linux ABI).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// What `/proc/self` says about this process.
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    start_time_seconds: f64,
    resident_bytes: i64,
    virtual_bytes: i64,
}

/// Parses `/proc/self/stat` (`stat`), `/proc/self/status` (`status`) and
/// `/proc/stat`'s boot time (`boot_time`, seconds since the epoch).
fn process_stats(stat: &str, status: &str, boot_time: u64) -> Option<ProcessStats> {
    // Fields after the command name, which may hold spaces and parentheses.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    // (3) state is fields[0]; utime (14) and stime (15); starttime (22).
    let ticks = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<i64>().ok())
            .map(|n| n.saturating_mul(1024))
    };
    #[allow(
        clippy::cast_precision_loss,
        reason = "CPU ticks as f64 seconds: exact far past any uptime"
    )]
    Some(ProcessStats {
        cpu_seconds: (ticks(14)? + ticks(15)?) as f64 / CLOCK_TICKS_PER_SECOND,
        start_time_seconds: boot_time as f64 + ticks(22)? as f64 / CLOCK_TICKS_PER_SECOND,
        resident_bytes: kib("VmRSS:")?,
        virtual_bytes: kib("VmSize:")?,
    })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let boot_time = read("/proc/stat").and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|t| t.trim().parse::<u64>().ok())
        });
        let Some(stats) = read("/proc/self/stat")
            .zip(read("/proc/self/status"))
            .zip(boot_time)
            .and_then(|((stat, status), boot)| process_stats(&stat, &status, boot))
        else {
            return Ok(());
        };
        let cpu = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            ConstCounter::new(0f64).metric_type(),
        )?;
        ConstCounter::new(stats.cpu_seconds).encode(cpu)?;
        let start = encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            None,
            ConstGauge::new(0f64).metric_type(),
        )?;
        ConstGauge::new(stats.start_time_seconds).encode(start)?;
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            &[(Vec::new(), stats.resident_bytes)],
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            &[(Vec::new(), stats.virtual_bytes)],
        )?;
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors.",
                &[(Vec::new(), i64::try_from(fds.count()).unwrap_or(i64::MAX))],
            )?;
        }
        if let Some(max) = crate::process::open_files_limit() {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                &[(Vec::new(), i64::try_from(max).unwrap_or(i64::MAX))],
            )?;
        }
        Ok(())
    }
}

/// The registry for `broker`: the RPCs the service recorded (`rpcs`), the
/// broker's own counters (read at scrape time), the transport's connection
/// counters, the build and the process.
pub fn registry(served: Served, rpcs: RpcMetrics, transport: Arc<TransportCounters>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(RpcCollector(rpcs)));
    match served {
        Served::Broker(broker) => registry.register_collector(Box::new(BrokerCollector(broker))),
        Served::Edge(edge) => registry.register_collector(Box::new(EdgeCollector(edge))),
    }
    registry.register_collector(Box::new(TransportCollector(transport)));
    registry.register_collector(Box::new(BuildInfoCollector));
    registry.register_collector(Box::new(ProcessCollector));
    registry
}

/// The text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        tracing::error!("encoding the metrics failed");
    }
    text
}

/// Whether the server reports SERVING on `grpc.health.v1` (all its
/// listeners accept, and shutdown has not begun): what `/readyz` says to
/// probes that cannot speak gRPC with credentials or TLS (the kubelet's).
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    /// Records what health reports now.
    pub fn set(&self, serving: bool) {
        self.0.store(serving, Ordering::SeqCst);
    }

    /// True while health reports SERVING.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Serves, on `listener` until `shutdown` resolves: `GET /metrics`; `GET
/// /readyz`, 200 `SERVING` or 503 `NOT_SERVING` exactly as
/// `grpc.health.v1` reports it (`readiness`); and `GET /healthz`, 200
/// while the process answers at all (liveness: a draining broker is alive).
/// No credentials, no TLS: for the kubelet's probes and the scraper.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    readiness: Arc<Readiness>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::{
        http::{StatusCode, header},
        response::IntoResponse,
        routing::get,
    };
    let registry = Arc::new(registry);
    const TEXT: [(header::HeaderName, &str); 1] = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    let probes = axum::Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, TEXT, "ok\n") }))
        .route(
            "/readyz",
            get(move || async move {
                if readiness.is_ready() {
                    (StatusCode::OK, TEXT, "SERVING\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, TEXT, "NOT_SERVING\n")
                }
            }),
        );
    let app = probes.route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(&registry),
                )
                    .into_response()
            }
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(metrics: &RpcMetrics) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(RpcCollector(metrics.clone())));
        render(&registry)
    }

    #[test]
    fn rpc_latency_lands_in_the_first_bucket_that_holds_it_and_buckets_are_cumulative() {
        let metrics = RpcMetrics::default();
        metrics.rpc(Rpc::GetToken, tonic::Code::Ok, Duration::from_micros(300));
        metrics.rpc(Rpc::GetToken, tonic::Code::Ok, Duration::from_micros(900));
        metrics.rpc(Rpc::GetToken, tonic::Code::PermissionDenied, Duration::from_secs(60));
        let text = rendered(&metrics);
        for line in [
            "boxbroker_rpc_duration_seconds_count{method=\"GetToken\"} 3",
            "boxbroker_rpc_duration_seconds_bucket{le=\"0.0005\",method=\"GetToken\"} 1",
            "boxbroker_rpc_duration_seconds_bucket{le=\"0.001\",method=\"GetToken\"} 2",
            "boxbroker_rpc_duration_seconds_bucket{le=\"16.384\",method=\"GetToken\"} 2",
            "boxbroker_rpc_duration_seconds_bucket{le=\"+Inf\",method=\"GetToken\"} 3",
            "boxbroker_rpc_duration_seconds_sum{method=\"GetToken\"} 60.0012",
            "boxbroker_rpc_requests_total{method=\"GetToken\",code=\"OK\"} 2",
            "boxbroker_rpc_requests_total{method=\"GetToken\",code=\"PERMISSION_DENIED\"} 1",
            "boxbroker_policy_denials_total{method=\"GetToken\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(
            !text.contains("GetDownscopedToken"),
            "no series before a count:\n{text}"
        );
    }

    #[test]
    fn counts_from_many_threads_are_all_kept() {
        let metrics = RpcMetrics::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..1000 {
                        metrics.cache_lookup(Rpc::GetDownscopedToken, i % 4 != 0);
                    }
                });
            }
        });
        let text = rendered(&metrics);
        assert!(
            text.contains("boxbroker_cache_lookups_total{method=\"GetDownscopedToken\",result=\"hit\"} 3000"),
            "{text}"
        );
        assert!(
            text.contains("boxbroker_cache_lookups_total{method=\"GetDownscopedToken\",result=\"miss\"} 1000"),
            "{text}"
        );
    }

    #[test]
    fn proc_self_stat_and_status_are_read_as_documented() {
        // A command name with a space and a parenthesis, as /proc allows.
        let stat = "4242 (box (broker) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 9 0 12345 \
                    123456789 2000 18446744073709551615";
        let status = "Name:\tbox-broker\nVmSize:\t  120560 kB\nVmRSS:\t   20480 kB\n";
        assert_eq!(
            process_stats(stat, status, 1_800_000_000),
            Some(ProcessStats {
                cpu_seconds: 3.0,
                start_time_seconds: 1_800_000_123.45,
                resident_bytes: 20_480 * 1024,
                virtual_bytes: 120_560 * 1024,
            })
        );
        assert_eq!(process_stats("garbage", status, 0), None);
    }
}
