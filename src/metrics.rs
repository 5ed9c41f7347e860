//! Prometheus metrics (prometheus-client), served as `GET /metrics` on
//! `[server] metrics_listen`.
//!
//! RPC counts and latencies, cache lookups and policy denials are recorded as
//! they happen ([`RpcMetrics`], owned by the broker). Everything the broker
//! already counts — upstream attempts by status and their latency, retries,
//! 429s, circuit state, mints and exchanges by outcome, the active key, the
//! cache's size and evictions — is read at scrape time by [`BrokerCollector`].
//! Labels are app names, RPC names, status codes and key ids: never tokens,
//! secrets or caller-supplied strings.

use std::{fmt, future::Future, sync::Arc, sync::atomic::Ordering, time::Duration};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{boxapi::client::CircuitState, broker::Broker, keys::KeyState};

type Labels = Vec<(&'static str, String)>;

fn rpc_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// `method` (and `code` or `result`): static strings, so recording allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RpcLabels {
    method: &'static str,
    /// A gRPC code name, or a cache result.
    second: Option<(&'static str, &'static str)>,
}

impl prometheus_client::encoding::EncodeLabelSet for RpcLabels {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelSetEncoder) -> fmt::Result {
        use prometheus_client::encoding::EncodeLabel;
        EncodeLabel::encode(&("method", self.method), encoder.encode_label())?;
        if let Some(second) = self.second {
            EncodeLabel::encode(&second, encoder.encode_label())?;
        }
        Ok(())
    }
}

/// A gRPC code's name, as in metrics labels and audit records.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::{
        Aborted, AlreadyExists, Cancelled, DataLoss, DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument,
        NotFound, Ok, OutOfRange, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable, Unimplemented,
        Unknown,
    };
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// What the RPC adapters record as requests happen.
#[derive(Debug, Clone)]
pub struct RpcMetrics {
    requests: Family<RpcLabels, Counter>,
    duration: Family<RpcLabels, Histogram, fn() -> Histogram>,
    cache: Family<RpcLabels, Counter>,
    denials: Family<RpcLabels, Counter>,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(rpc_histogram),
            cache: Family::default(),
            denials: Family::default(),
        }
    }
}

impl RpcMetrics {
    /// One finished RPC: its method, gRPC code and duration.
    pub fn rpc(&self, method: &'static str, code: tonic::Code, took: Duration) {
        self.requests
            .get_or_create(&RpcLabels {
                method,
                second: Some(("code", code_name(code))),
            })
            .inc();
        let method_only = RpcLabels { method, second: None };
        self.duration.get_or_create(&method_only).observe(took.as_secs_f64());
        if code == tonic::Code::PermissionDenied {
            self.denials.get_or_create(&method_only).inc();
        }
    }

    /// A served token: from the cache or not.
    pub fn cache_lookup(&self, method: &'static str, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.cache
            .get_or_create(&RpcLabels {
                method,
                second: Some(("result", result)),
            })
            .inc();
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

impl Collector for BrokerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let broker = &self.0;
        let cache = broker.cache();
        gauge(
            &mut encoder,
            "boxbroker_cache_entries",
            "Tokens in the cache.",
            &[(vec![], i64::try_from(cache.live_entries()).unwrap_or(i64::MAX))],
        )?;
        counter(
            &mut encoder,
            "boxbroker_cache_evictions",
            "Tokens dropped from the cache for size or expiry.",
            &[(vec![], cache.evictions())],
        )?;
        let apps: Vec<_> = broker.apps().cloned().collect();
        let per_app = |f: &dyn Fn(&crate::broker::App) -> u64| -> Vec<(Labels, u64)> {
            apps.iter().map(|a| (vec![("app", a.name.to_string())], f(a))).collect()
        };
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
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
            "HTTP requests sent to Box's token endpoint.",
            &per_app(&|a| load(&a.client.counters().attempts)),
        )?;
        counter(
            &mut encoder,
            "boxbroker_upstream_retries",
            "Token requests retried after a 429, 5xx or connection failure.",
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
            "Token requests refused at once because the circuit was open.",
            &per_app(&|a| load(&a.client.counters().short_circuited)),
        )?;
        counter(
            &mut encoder,
            "boxbroker_standby_key_fallbacks",
            "Mints that succeeded only with the standby key (an alert).",
            &per_app(&crate::broker::App::standby_fallbacks),
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
                "Seconds per attempt to Box's token endpoint.",
                None,
                rpc_histogram().metric_type(),
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

/// The registry for `broker`: its RPC metrics and its scrape-time collector.
pub fn registry(broker: Arc<Broker>) -> Registry {
    let mut registry = Registry::default();
    let rpc = broker.metrics().clone();
    registry.register(
        "boxbroker_rpc_requests",
        "gRPC requests, by method and status code.",
        rpc.requests,
    );
    registry.register(
        "boxbroker_rpc_duration_seconds",
        "gRPC request latency, by method.",
        rpc.duration,
    );
    registry.register(
        "boxbroker_cache_lookups",
        "Served tokens by method, from the cache (hit) or not (miss).",
        rpc.cache,
    );
    registry.register(
        "boxbroker_policy_denials",
        "Requests the policy denied, by method.",
        rpc.denials,
    );
    registry.register_collector(Box::new(BrokerCollector(broker)));
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

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::{http::header, response::IntoResponse, routing::get};
    let registry = Arc::new(registry);
    let app = axum::Router::new().route(
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
