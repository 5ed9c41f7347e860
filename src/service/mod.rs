//! The gRPC server: the token broker service on client listeners, the admin
//! service on admin listeners (never both on one), `grpc.health.v1`, and
//! reflection (v1 and v1alpha, so grpcurl 1.8 works) on each.

/// `AsyncWrite` for a read-side wrapper: every write goes straight to its
/// `inner` stream. `write_through!(impl[generics] Type)`.
macro_rules! write_through {
    (impl[$($generics:tt)*] $ty:ty) => {
        impl<$($generics)*> tokio::io::AsyncWrite for $ty {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
            }
        }
    };
}

pub mod admin;
pub mod authority;
pub mod broker;
pub mod edge;
pub mod gate;
pub mod status;
pub mod transport;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::{
    admin::{AdminRules, KeyAdmin},
    audit::{AuditSink, Flush},
    auth::Authenticator,
    metrics::{Readiness, RpcMetrics, Served},
    pb,
    rpc::{Decision, code_name},
};
pub use admin::BrokerAdminApi;
pub use broker::TokenBrokerApi;
pub use edge::EdgeApi;
pub use gate::{CallContext, CallerLimits};
pub use transport::{ClientCertificates, ConnectionLimits, ServerTls, TransportCounters};

/// The server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reflection could not be built (a bug in the embedded descriptors).
    #[error("building gRPC reflection failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The embedded descriptors do not decode (a bug).
    #[error("the embedded protobuf descriptors do not decode: {0}")]
    Descriptors(String),
}

/// An already-bound listener and how its callers are authenticated.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener, Authenticator),
    /// TCP with TLS (and client certificates, when the TLS settings ask for them).
    Tls(TcpListener, Authenticator, ServerTls),
    /// A Unix domain socket (sidecar mode).
    #[cfg(unix)]
    Unix(tokio::net::UnixListener, Authenticator),
}

/// What a listener serves.
#[derive(Debug, Clone)]
pub enum Role {
    /// `TokenBrokerService`, for callers.
    Client,
    /// `BrokerAdminService` only, for operators.
    Admin(Arc<KeyAdmin>, AdminRules),
}

/// How the server starts, stops and limits its callers.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// After the shutdown signal, how long requests are still accepted while
    /// health already says NOT_SERVING (so load balancers stop routing here).
    pub drain_delay: Duration,
    /// Then how long in-flight requests get to finish before they are cut.
    pub grace_period: Duration,
    /// The largest request message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Per-caller rate limit (requests per second, burst); `None` for none.
    pub rate_limit: Option<(f64, u32)>,
    /// Failed authentications a peer may have (per second, burst) before its
    /// requests are refused without checking their credentials.
    pub failed_auth: (f64, u32),
    /// The longest a request may take (the caller's `grpc-timeout` may be shorter).
    pub request_timeout: Duration,
    /// Each listener's connection bounds.
    pub connections: ConnectionLimits,
    /// Where the transport counts connections (shared with the metrics).
    pub counters: Arc<TransportCounters>,
    /// Where the client API's RPCs are counted (shared with the metrics).
    pub rpc_metrics: RpcMetrics,
    /// What health reports, for `/readyz` (shared with the metrics server).
    pub readiness: Arc<Readiness>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            drain_delay: Duration::ZERO,
            grace_period: Duration::from_secs(20),
            max_message_bytes: 64 * 1024,
            rate_limit: None,
            failed_auth: (10.0, 20),
            request_timeout: Duration::from_secs(30),
            connections: ConnectionLimits::default(),
            counters: Arc::default(),
            rpc_metrics: RpcMetrics::default(),
            readiness: Arc::default(),
        }
    }
}

/// Serves each listener in its role (client or admin) with `options`
/// until `shutdown` resolves (or one fails), then stops accepting
/// everywhere and lets in-flight calls finish. Health (`grpc.health.v1`, shared by
/// every listener) says NOT_SERVING until every listener is accepting, and
/// again from the moment `shutdown` resolves: then, after the drain delay,
/// no new request is accepted and in-flight ones get the grace period.
pub async fn serve_with(
    options: ServeOptions,
    backend: Served,
    endpoints: Vec<(Listener, Role)>,
    audit: Arc<AuditSink>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let health_state = Health(health_reporter, options.readiness.clone());
    health_state.set(ServingStatus::NotServing).await;
    let limits = Arc::new(CallerLimits::new(options.rate_limit, options.failed_auth));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    let mut ready = Vec::new();
    for (listener, role) in endpoints {
        let (bound, auth) = match listener {
            Listener::Tcp(l, auth) => (transport::Bound::Tcp(l, None), auth),
            Listener::Tls(l, auth, tls) => (transport::Bound::Tcp(l, Some(tls)), auth),
            #[cfg(unix)]
            Listener::Unix(l, auth) => (transport::Bound::Unix(l), auth),
        };
        let service = match role {
            Role::Client => gate::CLIENT_SERVICE,
            Role::Admin(..) => gate::ADMIN_SERVICE,
        };
        let shared = Arc::new(gate::GateShared {
            routes: routes(
                &backend,
                audit.clone(),
                &options.rpc_metrics,
                role,
                health.clone(),
                options.max_message_bytes,
            )?,
            service,
            auth,
            audit: audit.clone(),
            metrics: options.rpc_metrics.clone(),
            limits: limits.clone(),
            request_timeout: options.request_timeout,
            max_message_bytes: options.max_message_bytes,
        });
        let (accepting, accepted) = tokio::sync::oneshot::channel();
        ready.push(accepted);
        servers.spawn(transport::serve(
            bound,
            options.connections.clone(),
            options.counters.clone(),
            stopped.clone(),
            move |connection| gate::Gate::new(shared.clone(), connection),
            accepting,
        ));
    }
    for accepted in ready {
        let _ = accepted.await;
    }
    health_state.set(ServingStatus::Serving).await;
    // Repeated refusals are counted, not written one by one; the counts are
    // written as each window closes.
    // Each second: write the counts of closed repeat windows, and forget
    // callers and peers whose budgets refilled.
    let flusher = tokio::spawn({
        let (audit, limits) = (audit.clone(), limits.clone());
        async move {
            let mut ticks = tokio::time::interval(Duration::from_secs(1));
            loop {
                ticks.tick().await;
                audit.flush_repeats(Flush::Closed);
                limits.forget_idle();
            }
        }
    });
    tokio::select! {
        () = shutdown => {}
        Some(_) = servers.join_next() => {
            tracing::error!("a listener stopped on its own; stopping the others");
        }
    }
    health_state.set(ServingStatus::NotServing).await;
    if !options.drain_delay.is_zero() {
        tracing::info!(
            delay_ms = u64::try_from(options.drain_delay.as_millis()).unwrap_or(u64::MAX),
            "health is NOT_SERVING; still accepting requests during the drain delay"
        );
        tokio::time::sleep(options.drain_delay).await;
    }
    tracing::info!(
        grace_ms = u64::try_from(options.grace_period.as_millis()).unwrap_or(u64::MAX),
        "draining: no new requests; in-flight ones finish"
    );
    let _ = stop.send(true);
    let drained = tokio::time::timeout(options.grace_period, async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("the grace period passed with requests still in flight; they are cut off");
        servers.abort_all();
    }
    flusher.abort();
    audit.flush_repeats(Flush::All);
    Ok(())
}

/// Fills in an audit record's decision, code and reason from an RPC's result
/// (see [`Decision::of`]).
pub(crate) fn record_outcome(event: &mut crate::audit::AuditEvent, result: Result<(), &tonic::Status>) {
    let code = result.map_or_else(tonic::Status::code, |()| tonic::Code::Ok);
    event.decision = Decision::of(code);
    event.code = code_name(code);
    if let Err(status) = result {
        event.reason = Some(status.message().to_owned());
    }
}

/// The shared health status.
struct Health(tonic_health::server::HealthReporter, Arc<Readiness>);

impl Health {
    async fn set(&self, status: ServingStatus) {
        for service in ["", "boxbroker.v1.TokenBrokerService", "boxbroker.v1.BrokerAdminService"] {
            self.0.set_service_status(service, status).await;
        }
        self.1.set(status == ServingStatus::Serving);
    }
}

/// The broker's descriptors without the admin API's file (for the client
/// listener's reflection).
fn client_descriptors() -> Result<Vec<u8>, ServeError> {
    use prost::Message as _;
    let mut set = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET)
        .map_err(|e| ServeError::Descriptors(e.to_string()))?;
    set.file.retain(|file| file.name() != "boxbroker/v1/admin.proto");
    Ok(set.encode_to_vec())
}

/// The largest message health and reflection accept (from anyone).
const OPEN_MESSAGE_BYTES: usize = 4 * 1024;

/// Health, reflection, and the role's service.
fn routes(
    backend: &Served,
    audit: Arc<AuditSink>,
    rpc_metrics: &RpcMetrics,
    role: Role,
    health: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    max_message_bytes: usize,
) -> Result<tonic::service::Routes, ServeError> {
    // Health and reflection answer anyone, so their messages (a service
    // name, a symbol) are held to a few KiB: tonic's default would let an
    // unauthenticated caller announce and send 4 MiB per stream.
    // Reflection lists what this listener serves, nothing else: the client
    // listener does not even describe the admin API.
    let (served, files) = match &role {
        Role::Client => ("boxbroker.v1.TokenBrokerService", client_descriptors()?),
        Role::Admin(..) => ("boxbroker.v1.BrokerAdminService", pb::FILE_DESCRIPTOR_SET.to_vec()),
    };
    let reflection = || {
        [
            served,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
        .into_iter()
        .fold(tonic_reflection::server::Builder::configure(), |builder, name| {
            builder.with_service_name(name)
        })
        .register_encoded_file_descriptor_set(&files)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?.max_decoding_message_size(OPEN_MESSAGE_BYTES);
    let reflection_v1alpha = reflection()
        .build_v1alpha()?
        .max_decoding_message_size(OPEN_MESSAGE_BYTES);
    let health = health.max_decoding_message_size(OPEN_MESSAGE_BYTES);
    let routes = tonic::service::Routes::new(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    // tonic refuses a larger message from its length prefix, before reading
    // it; the gate turns that into RESOURCE_EXHAUSTED naming the limit.
    Ok(match role {
        Role::Client => match backend {
            Served::Broker(broker) => routes.add_service(
                pb::token_broker_service_server::TokenBrokerServiceServer::new(TokenBrokerApi::new(
                    broker.clone(),
                    audit,
                    rpc_metrics.clone(),
                ))
                .max_decoding_message_size(max_message_bytes),
            ),
            Served::Edge(edge) => routes.add_service(
                pb::token_broker_service_server::TokenBrokerServiceServer::new(EdgeApi::new(
                    edge.clone(),
                    audit,
                    rpc_metrics.clone(),
                ))
                .max_decoding_message_size(max_message_bytes),
            ),
        },
        Role::Admin(admin, rules) => routes.add_service(
            pb::broker_admin_service_server::BrokerAdminServiceServer::new(BrokerAdminApi::new(admin, rules, audit))
                .max_decoding_message_size(max_message_bytes),
        ),
    })
}
