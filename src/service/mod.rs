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

/// Serves the broker on an already-bound `listener` until `shutdown` resolves,
/// then stops accepting and lets in-flight calls finish.
pub async fn serve(
    broker: Arc<Broker>,
    auth: Authenticator,
    audit: Arc<AuditSink>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let api = pb::token_broker_service_server::TokenBrokerServiceServer::new(TokenBrokerApi::new(
        broker, auth, audit,
    ));
    health_reporter
        .set_serving::<pb::token_broker_service_server::TokenBrokerServiceServer<TokenBrokerApi>>()
        .await;
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(api)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
