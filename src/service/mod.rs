//! The gRPC server: the token broker service, `grpc.health.v1`, and
//! reflection (v1 and v1alpha, so grpcurl 1.8 works).

pub mod broker;
pub mod status;

use std::{future::Future, sync::Arc};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::{audit::AuditSink, auth::Authenticator, broker::Broker, pb};
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

/// Serves the broker on every listener until `shutdown` resolves (or one
/// fails), then stops accepting everywhere and lets in-flight calls finish.
pub async fn serve_listeners(
    broker: Arc<Broker>,
    listeners: Vec<Listener>,
    audit: Arc<AuditSink>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    for listener in listeners {
        let broker = broker.clone();
        let audit = audit.clone();
        let mut stopped = stopped.clone();
        let until = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        servers.spawn(async move {
            match listener {
                Listener::Tcp(l, auth) => serve_one(broker, auth, audit, TcpListenerStream::new(l), None, until).await,
                Listener::Tls(l, auth, tls) => {
                    serve_one(broker, auth, audit, TcpListenerStream::new(l), Some(tls), until).await
                }
                #[cfg(unix)]
                Listener::Unix(l, auth) => {
                    let incoming = tokio_stream::wrappers::UnixListenerStream::new(l);
                    serve_one(broker, auth, audit, incoming, None, until).await
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

async fn serve_one<S, IO>(
    broker: Arc<Broker>,
    auth: Authenticator,
    audit: Arc<AuditSink>,
    incoming: S,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError>
where
    S: tokio_stream::Stream<Item = std::io::Result<IO>> + Send + 'static,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + tonic::transport::server::Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
{
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let api = pb::token_broker_service_server::TokenBrokerServiceServer::new(TokenBrokerApi::new(broker, auth, audit));
    health_reporter
        .set_serving::<pb::token_broker_service_server::TokenBrokerServiceServer<TokenBrokerApi>>()
        .await;
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(api)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
