//! The example clients in other languages (`examples/clients/`): Python
//! (grpcio, generated stubs) and Node (@grpc/grpc-js, protos loaded at run
//! time) each get a Service Account token and a downscoped one, and read the
//! broker's machine-readable reason when refused. The protos' packaging
//! options put generated Java and C# where they say.

use crate::common;

use std::process::Command;

use box_token_broker::{fakebox::seed, policy::Policy};
use common::{Harness, Options};

/// Both clients' JSON summary against `h` at `address`.
async fn both(address: &str) -> Vec<serde_json::Value> {
    let python = common::python::python();
    let stubs = tempfile::tempdir().unwrap();
    python.stubs(stubs.path());
    let mut results = Vec::new();
    for (name, command) in [
        ("python", python.client(stubs.path(), &[address])),
        ("node", common::node::client(&[address])),
    ] {
        let (ok, stdout, stderr) = common::output(command).await;
        assert!(ok, "{name}: {stderr}");
        results.push(serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{name}: {e}: {stdout}")));
    }
    results
}

#[tokio::test]
async fn python_and_node_clients_get_a_service_account_token_and_a_downscoped_one() {
    let h = Harness::start().await;
    for got in both(&h.addr.to_string()).await {
        assert_eq!(got["enterprise"]["token_length"], 32, "{got}");
        let expires = got["enterprise"]["expires_at"].as_str().unwrap();
        assert!(expires.ends_with('Z') && expires.contains('T'), "{got}");
        assert_eq!(
            got["downscoped"]["scopes"],
            serde_json::json!(["item_preview"]),
            "{got}"
        );
        assert_eq!(
            got["downscoped"]["restricted_to"][0]["object_id"],
            seed::SERVICE_ACCOUNT_FILE_ID,
            "{got}"
        );
    }
    // One mint and one exchange at Box, the rest from the cache.
    let stats = h.fake.stats();
    assert_eq!((stats.jwt_issued, stats.exchange_issued), (1, 1), "{stats:?}");
}

#[tokio::test]
async fn both_clients_show_the_reason_of_a_refusal() {
    // Full tokens yes, downscoping no.
    let h = Harness::with(Options {
        policy: Some(
            Policy::parse(
                "[[rules]]\nname = \"full only\"\ncallers = [\"anonymous\"]\nenterprise = true\nfull_tokens = true\n",
                "p",
            )
            .unwrap(),
        ),
        ..Options::default()
    })
    .await;
    let python = common::python::python();
    let stubs = tempfile::tempdir().unwrap();
    python.stubs(stubs.path());
    let address = h.addr.to_string();
    for (name, command) in [
        ("python", python.client(stubs.path(), &[&address])),
        ("node", common::node::client(&[&address])),
    ] {
        let (ok, _, stderr) = common::output(command).await;
        assert!(!ok, "{name}");
        assert!(
            stderr.starts_with("PERMISSION_DENIED: denied by policy"),
            "{name}: {stderr}"
        );
        assert!(stderr.contains("(reason POLICY_DENIED)"), "{name}: {stderr}");
    }
}

#[tokio::test]
async fn the_node_client_works_on_the_unix_socket_too() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let broker = h.broker.clone();
    tokio::spawn(
        box_token_broker::runtime::Runtime::new(
            broker,
            std::sync::Arc::new(box_token_broker::audit::AuditSink::memory().0),
        )
        .listen(
            box_token_broker::service::Listener::Unix(
                listener,
                box_token_broker::auth::Authenticator::new(box_token_broker::auth::Anonymous::Admitted),
            ),
            box_token_broker::service::Role::Client,
        )
        .run(std::future::pending()),
    );
    let (ok, stdout, stderr) = common::output(common::node::client(&[&format!("unix:{}", path.display())])).await;
    assert!(ok, "{stderr}");
    let got: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(got["enterprise"]["token_length"], 32, "{got}");
}

#[tokio::test]
async fn generated_java_and_csharp_land_where_the_protos_say() {
    // The protoc the build used (it has every built-in generator).
    let out = tempfile::tempdir().unwrap();
    let (java, csharp) = (out.path().join("java"), out.path().join("csharp"));
    std::fs::create_dir_all(&java).unwrap();
    std::fs::create_dir_all(&csharp).unwrap();
    let mut command = Command::new(env!("BROKER_BUILD_PROTOC"));
    command
        .arg("-I")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto"))
        .arg(format!("--java_out={}", java.display()))
        .arg(format!("--csharp_out={}", csharp.display()))
        .args(["boxbroker/v1/broker.proto", "boxbroker/v1/admin.proto"]);
    let (ok, _, stderr) = common::output(command).await;
    assert!(ok, "{stderr}");
    // java_package and java_multiple_files: one class per message.
    let package = java.join("com/boxtokenbroker/boxbroker/v1");
    for class in [
        "GetTokenRequest.java",
        "BrokerProto.java",
        "AdminProto.java",
        "KeyInfo.java",
    ] {
        assert!(package.join(class).is_file(), "{class} in {}", package.display());
    }
    // csharp_namespace.
    let broker = std::fs::read_to_string(csharp.join("Broker.cs")).unwrap();
    assert!(
        broker.contains("namespace Boxbroker.V1 {"),
        "{}",
        &broker[..400.min(broker.len())]
    );
}
