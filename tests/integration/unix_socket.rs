//! The Unix-socket listener (sidecar mode): every peer is the socket's
//! configured identity, if its uid is allowed.

use crate::common;

use std::{path::PathBuf, sync::Arc};

use box_token_broker::{
    audit::AuditSink,
    auth::Authenticator,
    fakebox::seed,
    pb::token_broker_service_client::TokenBrokerServiceClient,
    policy::Policy,
    service::{self, Listener},
};
use common::{Harness, Options, assert_status, enterprise, token_of};
use tonic::{Code, transport::Endpoint};

const SIDECAR_POLICY: &str =
    "[[rules]]\nname = \"my sidecar\"\ncallers = [\"uds:orders-app\"]\nenterprise = true\nfull_tokens = true\n";

/// Serves the harness's broker on a Unix socket with `auth`; returns a client of it.
async fn over_socket(
    h: &Harness,
    dir: &tempfile::TempDir,
    auth: Authenticator,
) -> (
    TokenBrokerServiceClient<tonic::transport::Channel>,
    Arc<std::sync::Mutex<Vec<u8>>>,
) {
    let path = dir.path().join("broker.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (sink, audit) = AuditSink::memory();
    let broker = h.broker.clone();
    tokio::spawn(
        box_token_broker::runtime::Runtime::new(broker, Arc::new(sink))
            .listen(Listener::Unix(listener, auth), service::Role::Client)
            .run(std::future::pending()),
    );
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path: PathBuf = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    (TokenBrokerServiceClient::new(channel), audit)
}

fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    // A file this process just created is owned by its uid.
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().metadata().unwrap().uid()
}

#[tokio::test]
async fn a_socket_peer_is_the_sockets_identity() {
    let h = Harness::with(Options {
        policy: Some(Policy::parse(SIDECAR_POLICY, "p").unwrap()),
        ..Options::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (mut client, audit) = over_socket(&h, &dir, Authenticator::unix_socket("orders-app", vec![my_uid()])).await;
    let response = client.get_token(enterprise()).await.unwrap().into_inner();
    assert_eq!(token_of(&response).len(), 32);
    let audit = String::from_utf8(audit.lock().unwrap().clone()).unwrap();
    assert!(audit.contains("\"caller\":\"uds:orders-app\""), "{audit}");
    // The same broker on TCP does not treat anonymous callers as the sidecar.
    assert_eq!(h.get(enterprise()).await.unwrap_err().code(), Code::PermissionDenied);
}

#[tokio::test]
async fn a_peer_whose_uid_is_not_allowed_is_unauthenticated() {
    let h = Harness::with(Options {
        policy: Some(Policy::parse(SIDECAR_POLICY, "p").unwrap()),
        ..Options::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let other = my_uid().wrapping_add(1);
    let (mut client, _) = over_socket(&h, &dir, Authenticator::unix_socket("orders-app", vec![other])).await;
    let status = client.get_token(enterprise()).await.unwrap_err();
    assert_status(
        &status,
        Code::Unauthenticated,
        &format!("uid {} is not allowed", my_uid()),
    );
    assert_eq!(h.fake.stats().token_requests, 0);
}

/// The sidecar's caller may have the Service Account's token, and one
/// downscoped to a file.
const SIDECAR_DOWNSCOPE_POLICY: &str = "[[rules]]\nname = \"my sidecar\"\ncallers = [\"uds:orders-app\"]\n\
     enterprise = true\nfull_tokens = true\nscopes = [\"item_preview\"]\nfiles = [\"*\"]\n";

#[tokio::test]
async fn grpc_core_clients_are_served_whatever_authority_they_send() {
    // grpcio (gRPC's C core) sends `tmp%2F...%2Fbroker.sock` for an absolute
    // path and `broker.sock` for a relative one; grpcurl 1.8 sends the path.
    // The HTTP/2 server refused the first and the last with
    // RST_STREAM(PROTOCOL_ERROR).
    let h = Harness::with(Options {
        policy: Some(Policy::parse(SIDECAR_DOWNSCOPE_POLICY, "p").unwrap()),
        ..Options::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (_, audit) = over_socket(&h, &dir, Authenticator::unix_socket("orders-app", vec![my_uid()])).await;
    let socket = dir.path().join("broker.sock");
    let python = common::python::python();
    let stubs = tempfile::tempdir().unwrap();
    python.stubs(stubs.path());
    for address in [
        format!("unix:{}", socket.display()),
        format!("unix://{}", socket.display()),
        "unix:broker.sock".to_owned(),
    ] {
        let mut command = python.client(stubs.path(), &[&address]);
        command.current_dir(dir.path());
        let (ok, stdout, stderr) = common::output(command).await;
        assert!(ok, "{address}: {stderr}");
        let got: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(got["enterprise"]["token_length"], 32, "{address}: {got}");
        assert_eq!(
            got["downscoped"]["restricted_to"][0]["object_id"],
            seed::SERVICE_ACCOUNT_FILE_ID,
            "{address}: {got}"
        );
    }
    // grpcurl 1.8, without `-authority`, through reflection.
    let mut command = std::process::Command::new(python.bin.join("grpcurl"));
    command
        .args(["-plaintext", "-unix", "-d", r#"{"subject":{"enterprise":{}}}"#])
        .arg(&socket)
        .arg("boxbroker.v1.TokenBrokerService/GetToken");
    let (ok, stdout, stderr) = common::output(command).await;
    assert!(ok, "grpcurl: {stderr}");
    assert!(stdout.contains("\"accessToken\""), "{stdout}");
    // Every call was the sidecar's caller, and allowed.
    let audit = String::from_utf8(audit.lock().unwrap().clone()).unwrap();
    let allowed = audit
        .lines()
        .filter(|l| l.contains("\"caller\":\"uds:orders-app\"") && l.contains("\"decision\":\"allow\""))
        .count();
    assert_eq!(allowed, 7, "{audit}");
}
