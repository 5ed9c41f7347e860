//! The gRPC server: the token broker service on client listeners, the admin
//! service on admin listeners (never both on one), `grpc.health.v1`, and
//! reflection (v1 and v1alpha, so grpcurl 1.8 works) on each.

pub mod admin;
pub mod broker;
pub mod status;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::{
    admin::{AdminRules, KeyAdmin},
    audit::AuditSink,
    auth::Authenticator,
    broker::Broker,
    pb,
};
pub use admin::BrokerAdminApi;
pub use broker::{Limits, TokenBrokerApi};

/// The server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reflection could not be built (a bug in the embedded descriptors).
    #[error("building gRPC reflection failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// An already-bound listener and how its callers are authenticated.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener, Authenticator),
    /// TCP with TLS that requires client certificates (mTLS).
    Tls(TcpListener, Authenticator, tonic::transport::ServerTlsConfig),
    /// A Unix domain socket (sidecar mode).
    #[cfg(unix)]
    Unix(tokio::net::UnixListener, Authenticator),
}

/// Serves the broker on one already-bound TCP `listener` until `shutdown`
/// resolves, then stops accepting and lets in-flight calls finish.
pub async fn serve(
    broker: Arc<Broker>,
    auth: Authenticator,
    audit: Arc<AuditSink>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_listeners(broker, vec![Listener::Tcp(listener, auth)], audit, shutdown).await
}

/// What a listener serves.
#[derive(Debug, Clone)]
pub enum Role {
    /// `TokenBrokerService`, for callers.
    Client,
    /// `BrokerAdminService` only, for operators.
    Admin(Arc<KeyAdmin>, AdminRules),
}

/// Serves the broker on every listener until `shutdown` resolves (or one
/// fails), then stops accepting everywhere and lets in-flight calls finish.
pub async fn serve_listeners(
    broker: Arc<Broker>,
    listeners: Vec<Listener>,
    audit: Arc<AuditSink>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let endpoints = listeners.into_iter().map(|l| (l, Role::Client)).collect();
    serve_endpoints(broker, endpoints, audit, shutdown).await
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
    /// Client requests in progress at once, over all callers.
    pub max_concurrent_requests: usize,
    /// Per-caller rate limit (requests per second, burst); `None` for none.
    pub rate_limit: Option<(f64, u32)>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            drain_delay: Duration::ZERO,
            grace_period: Duration::from_secs(20),
            max_message_bytes: 64 * 1024,
            max_concurrent_requests: 1024,
            rate_limit: None,
        }
    }
}

/// Serves each listener in its role (client or admin) until `shutdown`
/// resolves (or one fails), then stops accepting everywhere and lets
/// in-flight calls finish.
pub async fn serve_endpoints(
    broker: Arc<Broker>,
    endpoints: Vec<(Listener, Role)>,
    audit: Arc<AuditSink>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_with(ServeOptions::default(), broker, endpoints, audit, shutdown).await
}

/// [`serve_endpoints`] with `options`. Health (`grpc.health.v1`, shared by
/// every listener) says NOT_SERVING until every listener is serving, and
/// again from the moment `shutdown` resolves: then, after the drain delay,
/// no new request is accepted and in-flight ones get the grace period.
pub async fn serve_with(
    options: ServeOptions,
    broker: Arc<Broker>,
    endpoints: Vec<(Listener, Role)>,
    audit: Arc<AuditSink>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let health_state = Health(health_reporter);
    health_state.set(false).await;
    let limits = Arc::new(Limits::new(&options));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    for (listener, role) in endpoints {
        let broker = broker.clone();
        let audit = audit.clone();
        let health = health.clone();
        let limits = limits.clone();
        let max_message_bytes = options.max_message_bytes;
        let mut stopped = stopped.clone();
        let until = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        servers.spawn(async move {
            let (auth, tls) = match &listener {
                Listener::Tcp(_, auth) => (auth.clone(), None),
                Listener::Tls(_, auth, tls) => (auth.clone(), Some(tls.clone())),
                #[cfg(unix)]
                Listener::Unix(_, auth) => (auth.clone(), None),
            };
            let routes = routes(broker, auth, audit, role, health, limits, max_message_bytes)?;
            match listener {
                Listener::Tcp(l, _) | Listener::Tls(l, _, _) => {
                    serve_one(routes, TcpListenerStream::new(l), tls, until).await
                }
                #[cfg(unix)]
                Listener::Unix(l, _) => {
                    serve_one(routes, tokio_stream::wrappers::UnixListenerStream::new(l), None, until).await
                }
            }
        });
    }
    health_state.set(true).await;
    let mut result = Ok(());
    tokio::select! {
        () = shutdown => {}
        Some(finished) = servers.join_next() => {
            // A listener stopped on its own: report it and stop the rest.
            result = finished.unwrap_or(Ok(()));
        }
    }
    health_state.set(false).await;
    if result.is_ok() && !options.drain_delay.is_zero() {
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
        while let Some(finished) = servers.join_next().await {
            if let (Ok(()), Ok(Err(e))) = (&result, finished) {
                result = Err(e);
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("the grace period passed with requests still in flight; they are cut off");
        servers.abort_all();
    }
    result
}

/// Fills in an audit record's decision, code and reason from an RPC's result:
/// `deny` for refusals of the caller (authentication, policy, limits),
/// `error` for every other failure.
pub(crate) fn record_outcome(event: &mut crate::audit::AuditEvent, result: Result<(), &tonic::Status>) {
    use tonic::Code;
    match result {
        Ok(()) => {
            event.decision = "allow";
            event.code = "Ok";
        }
        Err(status) => {
            let denied = matches!(
                status.code(),
                Code::PermissionDenied | Code::Unauthenticated | Code::ResourceExhausted
            );
            event.decision = if denied { "deny" } else { "error" };
            event.code = crate::metrics::code_name(status.code());
            event.reason = Some(status.message().to_owned());
        }
    }
}

/// The shared health status.
struct Health(tonic_health::server::HealthReporter);

impl Health {
    async fn set(&self, serving: bool) {
        use tonic_health::ServingStatus::{NotServing, Serving};
        let status = if serving { Serving } else { NotServing };
        for service in ["", "boxbroker.v1.TokenBrokerService", "boxbroker.v1.BrokerAdminService"] {
            self.0.set_service_status(service, status).await;
        }
    }
}

/// Health, reflection, and the role's service.
fn routes(
    broker: Arc<Broker>,
    auth: Authenticator,
    audit: Arc<AuditSink>,
    role: Role,
    health: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    limits: Arc<Limits>,
    max_message_bytes: usize,
) -> Result<tonic::service::Routes, ServeError> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let routes = tonic::service::Routes::new(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok(match role {
        Role::Client => routes.add_service(
            pb::token_broker_service_server::TokenBrokerServiceServer::new(
                TokenBrokerApi::new(broker, auth, audit).with_limits(limits),
            )
            // Up to 4x the limit is decoded so the answer can be
            // ResourceExhausted naming the limit; beyond that tonic refuses
            // (OutOfRange) before decoding, so memory stays bounded.
            .max_decoding_message_size(max_message_bytes.saturating_mul(4)),
        ),
        Role::Admin(admin, rules) => routes.add_service(
            pb::broker_admin_service_server::BrokerAdminServiceServer::new(BrokerAdminApi::new(
                admin, auth, rules, audit,
            ))
            .max_decoding_message_size(max_message_bytes),
        ),
    })
}

async fn serve_one<S, IO>(
    routes: tonic::service::Routes,
    incoming: S,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError>
where
    S: tokio_stream::Stream<Item = std::io::Result<IO>> + Send + 'static,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + tonic::transport::server::Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
{
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
