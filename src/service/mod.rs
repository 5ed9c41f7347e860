//! The gRPC server: the token broker service on client listeners, the admin
//! service on admin listeners (never both on one), `grpc.health.v1`, and
//! reflection (v1 and v1alpha, so grpcurl 1.8 works) on each.

pub mod admin;
pub mod broker;
pub mod status;

use std::{future::Future, sync::Arc};

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
pub use broker::TokenBrokerApi;

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

/// Serves each listener in its role (client or admin) until `shutdown`
/// resolves (or one fails), then stops accepting everywhere and lets
/// in-flight calls finish.
pub async fn serve_endpoints(
    broker: Arc<Broker>,
    endpoints: Vec<(Listener, Role)>,
    audit: Arc<AuditSink>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    for (listener, role) in endpoints {
        let broker = broker.clone();
        let audit = audit.clone();
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
            let routes = routes(broker, auth, audit, role).await?;
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
    let mut result = Ok(());
    tokio::select! {
        () = shutdown => {}
        Some(finished) = servers.join_next() => {
            // A listener stopped on its own: report it and stop the rest.
            result = finished.unwrap_or(Ok(()));
        }
    }
    let _ = stop.send(true);
    while let Some(finished) = servers.join_next().await {
        if let (Ok(()), Ok(Err(e))) = (&result, finished) {
            result = Err(e);
        }
    }
    result
}

/// Health, reflection, and the role's service.
async fn routes(
    broker: Arc<Broker>,
    auth: Authenticator,
    audit: Arc<AuditSink>,
    role: Role,
) -> Result<tonic::service::Routes, ServeError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok(match role {
        Role::Client => {
            health_reporter
                .set_serving::<pb::token_broker_service_server::TokenBrokerServiceServer<TokenBrokerApi>>()
                .await;
            routes.add_service(pb::token_broker_service_server::TokenBrokerServiceServer::new(
                TokenBrokerApi::new(broker, auth, audit),
            ))
        }
        Role::Admin(admin, rules) => {
            health_reporter
                .set_serving::<pb::broker_admin_service_server::BrokerAdminServiceServer<BrokerAdminApi>>()
                .await;
            routes.add_service(pb::broker_admin_service_server::BrokerAdminServiceServer::new(
                BrokerAdminApi::new(admin, auth, rules, audit),
            ))
        }
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
