//! `deploy/`: the Grafana dashboard and the Prometheus rules query only
//! metrics a live central broker and edge export; the kustomize overlays
//! render (with the real `kubectl kustomize`) into what the README promises,
//! the shipped broker, policy and edge configs load, and the edge sidecar
//! carries no Box secret and no KEK.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize as _;
use serde_json::Value;

use crate::cli::{Proc, bin, edge_config, fake_box, scrape, serve_with_metrics, token_get};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

/// Every document of a YAML stream, as JSON values.
fn yaml_documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|document| Value::deserialize(document).expect("valid YAML"))
        .filter(|document| !document.is_null())
        .collect()
}

/// `kubectl kustomize deploy/kubernetes/overlays/<overlay>`, parsed.
pub(crate) fn render(overlay: &str) -> Vec<Value> {
    let dir = deploy("kubernetes/overlays").join(overlay);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("kubectl (for `kubectl kustomize`) is needed by the deploy tests: {e}"));
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let documents = yaml_documents(&String::from_utf8(out.stdout).unwrap());
    // `kubectl apply -k` would put a resource without a namespace into
    // whatever namespace the context names.
    for d in &documents {
        let cluster_wide = ["Namespace", "ClusterRole", "ClusterRoleBinding"].contains(&d["kind"].as_str().unwrap());
        assert_eq!(
            d["metadata"]["namespace"].is_string(),
            !cluster_wide,
            "{overlay}: {} {}",
            d["kind"],
            d["metadata"]["name"]
        );
    }
    documents
}

pub(crate) fn find<'a>(documents: &'a [Value], kind: &str, name_prefix: &str) -> &'a Value {
    documents
        .iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name_prefix))
        })
        .unwrap_or_else(|| panic!("no {kind} {name_prefix}* rendered"))
}

/// The shipped broker.toml (the ConfigMap), loaded with `container`'s
/// environment as the pod would (`whose` names that environment in a failure).
fn shipped_config(documents: &[Value], container: &Value, whose: &str) -> box_token_broker::config::Config {
    let env: Vec<(String, String)> = array(&container["env"])
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let config = find(documents, "ConfigMap", "box-broker-config");
    box_token_broker::config::Config::parse(
        config["data"]["broker.toml"].as_str().unwrap(),
        Path::new("/etc/box-broker/config/broker.toml"),
        env,
    )
    .unwrap_or_else(|e| panic!("broker.toml with {whose} environment: {e}"))
}

pub(crate) fn array(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

/// The metric names in a PromQL expression (`boxbroker_*`, `process_*`).
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("boxbroker_").into_iter().chain(rest.find("process_")).min() {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Every `expr` anywhere in `value`.
fn exprs(value: &Value, into: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(expr)) => into.push(expr.clone()),
                    _ => exprs(v, into),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs(v, into)),
        _ => {}
    }
}

/// The series names in a text exposition (`name{...} value` or `name value`).
fn series_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// A central broker (against the fake Box) and an edge in front of it, as
/// processes, each with its metrics listener, after some tokens went
/// through both (cache hits and misses, a downscope) and the edge has seen
/// an unreachable address. The union of the series names both export.
fn live_series() -> BTreeSet<String> {
    let dir = tempfile::tempdir().unwrap();
    let (_fake, _) = fake_box(dir.path());
    // One App User only, so that asking for another is a denial.
    std::fs::write(
        dir.path().join("policy.toml"),
        "[[rules]]\nname = \"one user\"\ncallers = [\"anonymous\"]\nenterprise = true\nusers = [\"7200001\"]\n\
         full_tokens = true\nscopes = [\"item_preview\"]\nfolders = [\"*\"]\n",
    )
    .unwrap();
    // A fleet's broker: its Redis series too.
    let redis = crate::fleet::RedisServer::start();
    let kek = dir.path().join("kek");
    std::fs::write(&kek, "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY=").unwrap();
    std::fs::set_permissions(&kek, std::os::unix::fs::PermissionsExt::from_mode(0o400)).unwrap();
    let config = dir.path().join("broker.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[keystore]\npath = \"keys.json\"\nkek_file = \"kek\"\n[redis]\nurl = {:?}\n",
        redis.url()
    ));
    std::fs::write(&config, text).unwrap();
    let (_serve, central, central_metrics) = serve_with_metrics(&config);
    let edge_dir = tempfile::tempdir().unwrap();
    // A second endpoint where nothing listens: the edge's circuit and
    // failover series appear.
    let config = edge_config(edge_dir.path(), &format!("{central}\", \"http://127.0.0.1:1"), "");
    let edge = Proc::spawn(
        Command::new(bin())
            .args(["edge", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG"),
    );
    let edge_metrics = Proc::wait_listen(&edge.stderr, "serving Prometheus metrics");
    let socket = format!("unix:{}", edge_dir.path().join("edge.sock").display());
    for addr in [central.as_str(), socket.as_str()] {
        for args in [&["--enterprise"][..], &["--enterprise"], &["--user", "7200001"]] {
            let (code, _, stderr) = token_get(&[&["--addr", addr][..], args].concat());
            assert_eq!(code, 0, "{stderr}");
        }
        let out = Command::new(bin())
            .args([
                "token",
                "downscope",
                "--addr",
                addr,
                "--user",
                "7200001",
                "--scope",
                "item_preview",
                "--folder",
                "7500002",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let (code, _, stderr) = token_get(&["--addr", addr, "--user", "7200002"]);
        assert_ne!(code, 0, "denied: {stderr}");
    }
    let mut names = series_names(&scrape(&central_metrics));
    names.extend(series_names(&scrape(&edge_metrics)));
    names
}

#[test]
fn the_dashboard_and_the_alert_rules_query_only_metrics_a_live_broker_and_edge_export() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/box-token-broker.json")).unwrap())
            .expect("the dashboard is JSON");
    let mut dashboard_exprs = Vec::new();
    exprs(&dashboard["panels"], &mut dashboard_exprs);
    // The template variables' queries too (`label_values(METRIC, job)`).
    for variable in array(&dashboard["templating"]["list"]) {
        if let Some(definition) = variable["definition"].as_str() {
            dashboard_exprs.push(definition.to_owned());
        }
    }
    assert!(dashboard_exprs.len() >= 20, "{} queries", dashboard_exprs.len());

    let rules_text = std::fs::read_to_string(deploy("prometheus/box-token-broker.rules.yaml")).unwrap();
    let rules = yaml_documents(&rules_text);
    let alerts: Vec<&Value> = rules
        .iter()
        .flat_map(|r| array(&r["groups"]))
        .flat_map(|g| array(&g["rules"]))
        .collect();
    let names: BTreeSet<&str> = alerts.iter().filter_map(|a| a["alert"].as_str()).collect();
    for wanted in [
        "BoxBrokerStandbyKeyUsed",
        "BoxBrokerCircuitOpen",
        "BoxBrokerBoxErrorRate",
        "BoxBrokerKeyStoreWriteFailed",
        "BoxBrokerCacheHitRatioCollapsed",
        "BoxBrokerRedisDegraded",
    ] {
        assert!(names.contains(wanted), "alert {wanted} in {names:?}");
    }
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    for alert in &alerts {
        let name = alert["alert"].as_str().unwrap();
        let anchor = format!("<a id=\"alert-{}\"></a>", name.to_lowercase());
        assert!(readme.contains(&anchor), "README has the runbook of {name} ({anchor})");
        assert_eq!(
            alert["annotations"]["runbook"].as_str(),
            Some(format!("README.md#alert-{}", name.to_lowercase()).as_str())
        );
    }
    let mut rule_exprs = Vec::new();
    exprs(&Value::Array(rules), &mut rule_exprs);

    let live = live_series();
    let mut missing = Vec::new();
    for (source, exprs) in [("dashboard", &dashboard_exprs), ("rules", &rule_exprs)] {
        for expr in exprs {
            let queried = metrics_in(expr);
            assert!(!queried.is_empty(), "{source}: {expr} queries no broker metric");
            missing.extend(
                queried
                    .into_iter()
                    .filter(|m| !live.contains(m))
                    .map(|m| format!("{source}: {m} (in {expr})")),
            );
        }
    }
    assert!(
        missing.is_empty(),
        "not in a live scrape:\n{}\nscraped: {live:?}",
        missing.join("\n")
    );
}

#[test]
fn metric_names_are_found_in_expressions() {
    assert_eq!(
        metrics_in("sum(rate(boxbroker_rpc_requests_total{job=~\"$job\"}[5m])) / max(process_open_fds)"),
        BTreeSet::from(["boxbroker_rpc_requests_total".to_owned(), "process_open_fds".to_owned()])
    );
}

#[test]
fn the_sidecar_example_gives_the_edge_no_box_secret_and_no_kek() {
    let documents = render("example-with-sidecars");
    let app = find(&documents, "Deployment", "example-portal");
    let pod = &app["spec"]["template"]["spec"];
    let edge = array(&pod["initContainers"])
        .iter()
        .find(|c| c["name"] == "box-broker-edge")
        .expect("the component added the edge");
    assert_eq!(edge["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(edge["args"][0], "edge");
    // Nothing in the pod is a Secret: not the edge's volumes, not the app's.
    for volume in array(&pod["volumes"]) {
        assert!(
            volume.get("secret").is_none(),
            "a Secret volume in the app's pod: {volume}"
        );
        for source in array(&volume["projected"]["sources"]) {
            assert!(
                source.get("secret").is_none(),
                "a projected Secret in the app's pod: {volume}"
            );
        }
        assert!(
            !volume["configMap"]["name"]
                .as_str()
                .unwrap_or_default()
                .starts_with("box-broker-config"),
            "the central broker's config in the app's pod"
        );
    }
    let token = array(&pod["volumes"])
        .iter()
        .find(|v| v["name"] == "box-broker-token")
        .expect("the projected token");
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "box-token-broker"
    );
    // No KEK, key or secret reaches the edge through its environment.
    for container in array(&pod["initContainers"]).iter().chain(array(&pod["containers"])) {
        for env in array(&container["env"]).iter().chain(array(&container["envFrom"])) {
            let text = env.to_string().to_lowercase();
            for word in ["kek", "secret", "private_key", "passphrase", "box_config"] {
                assert!(!text.contains(word), "{}: {env}", container["name"]);
            }
        }
    }
    // The edge's config is an edge config: one that held a Box credential
    // or a KEK would be refused.
    let config = find(&documents, "ConfigMap", "box-broker-edge");
    let text = config["data"]["edge.toml"].as_str().unwrap();
    let edge_config = box_token_broker::config::EdgeConfig::parse(text, Path::new("edge.toml"), [])
        .unwrap_or_else(|e| panic!("the shipped edge.toml: {e}"));
    assert_eq!(
        edge_config.central.token_file.as_deref(),
        Some(Path::new("/var/run/secrets/box-broker/token"))
    );
    let mounted: Vec<&str> = array(&edge["volumeMounts"])
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert!(mounted.contains(&"/var/run/secrets/box-broker"), "{mounted:?}");
    assert!(mounted.contains(&"/run/box-broker"), "{mounted:?}");
    // Its probes ask the metrics listener its config opens.
    let port = edge_config.server.metrics_listen.expect("metrics_listen").port();
    let edge_port = array(&edge["ports"])
        .iter()
        .find(|p| p["name"] == "edge-metrics")
        .unwrap();
    assert_eq!(edge_port["containerPort"].as_u64(), Some(u64::from(port)));
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(edge[probe]["httpGet"]["port"], "edge-metrics", "{probe}");
    }
    // The central policy the overlay merged in loads, and names the app.
    let central = find(&documents, "ConfigMap", "box-broker-config");
    let policy = central["data"]["policy.toml"].as_str().unwrap();
    box_token_broker::policy::Policy::parse(policy, "policy.toml")
        .unwrap_or_else(|e| panic!("the example's policy.toml: {e}"));
    let rules: toml::Table = toml::from_str(policy).unwrap();
    let service_account = format!(
        "system:serviceaccount:{}:{}",
        app["metadata"]["namespace"].as_str().unwrap(),
        pod["serviceAccountName"].as_str().unwrap()
    );
    assert!(
        rules["rules"].as_array().unwrap().iter().any(|r| r["callers"]
            .as_array()
            .unwrap()
            .contains(&toml::Value::String(service_account.clone()))),
        "a rule names {service_account}"
    );
    // The app mounts the socket's volume where the edge listens.
    let app_mounts = array(&pod["containers"][0]["volumeMounts"]);
    assert!(
        app_mounts
            .iter()
            .any(|m| m["name"] == "box-broker-socket" && m["mountPath"] == "/run/box-broker")
    );
}

#[test]
fn the_central_broker_renders_with_its_secrets_owner_only_and_its_configs_loading() {
    let documents = render("standalone");
    let deployment = find(&documents, "Deployment", "box-broker");
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(container["resources"]["limits"]["memory"].is_string());
    for mount in array(&container["volumeMounts"]) {
        assert_eq!(
            mount["readOnly"], true,
            "no writable volume without a key store: {mount}"
        );
    }
    let secrets: Vec<&Value> = array(&pod["volumes"])
        .iter()
        .filter(|v| v.get("secret").is_some())
        .collect();
    assert_eq!(secrets.len(), 3, "the Box app, the admin key hash, the TLS key");
    for volume in secrets {
        assert_eq!(volume["secret"]["defaultMode"], 0o400, "{volume}");
    }
    // The probes ask the plaintext metrics listener the config opens.
    let config = find(&documents, "ConfigMap", "box-broker-config");
    let broker_toml = config["data"]["broker.toml"].as_str().unwrap();
    let settings =
        box_token_broker::config::Config::parse(broker_toml, Path::new("/etc/box-broker/config/broker.toml"), [])
            .unwrap_or_else(|e| panic!("the shipped broker.toml: {e}"));
    let metrics_port = settings.server.metrics_listen.expect("metrics_listen").port();
    let ports = array(&container["ports"]);
    let metrics = ports.iter().find(|p| p["name"] == "metrics").unwrap();
    assert_eq!(metrics["containerPort"].as_u64(), Some(u64::from(metrics_port)));
    for (probe, path) in [
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    let grpc = ports.iter().find(|p| p["name"] == "grpc").unwrap();
    assert_eq!(
        grpc["containerPort"].as_u64(),
        Some(u64::from(settings.server.listen.port()))
    );
    box_token_broker::policy::Policy::parse(config["data"]["policy.toml"].as_str().unwrap(), "policy.toml")
        .unwrap_or_else(|e| panic!("the shipped policy.toml: {e}"));
    // Edges find every replica through the headless Service.
    let headless = find(&documents, "Service", "box-broker-headless");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    find(&documents, "PodDisruptionBudget", "box-broker");
    find(&documents, "NetworkPolicy", "box-broker");
}

#[test]
fn the_keystore_overlay_runs_one_replica_with_the_store_on_the_only_writable_volume() {
    let documents = render("standalone-keystore");
    let deployment = find(&documents, "Deployment", "box-broker");
    assert_eq!(deployment["spec"]["replicas"], 1, "one store, one replica");
    assert_eq!(deployment["spec"]["strategy"], serde_json::json!({"type": "Recreate"}));
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let volumes = array(&pod["volumes"]);
    let kek = volumes
        .iter()
        .find(|v| v["secret"]["secretName"] == "box-broker-kek")
        .expect("the KEK Secret");
    assert_eq!(kek["secret"]["defaultMode"], 0o400);
    let claim = find(&documents, "PersistentVolumeClaim", "box-broker-keys");
    assert_eq!(claim["metadata"]["namespace"], deployment["metadata"]["namespace"]);
    let writable: Vec<&Value> = array(&container["volumeMounts"])
        .iter()
        .filter(|m| m["readOnly"] != true)
        .collect();
    assert_eq!(writable.len(), 1, "{writable:?}");
    let store_volume = volumes.iter().find(|v| v["name"] == writable[0]["name"]).unwrap();
    assert_eq!(
        store_volume["persistentVolumeClaim"]["claimName"],
        claim["metadata"]["name"]
    );
    // The config with the container's environment names a store on that
    // volume and a KEK in the Secret's mount.
    let settings = shipped_config(&documents, container, "the keystore's");
    let store = settings.keystore.as_ref().expect("[keystore] from the environment");
    let mount_of = |name: &Value| {
        array(&container["volumeMounts"])
            .iter()
            .find(|m| &m["name"] == name)
            .and_then(|m| m["mountPath"].as_str())
            .map(PathBuf::from)
            .unwrap()
    };
    assert_eq!(store.path.parent(), Some(mount_of(&writable[0]["name"]).as_path()));
    let kek_file = store.kek_file.as_ref().expect("kek_file");
    assert_eq!(kek_file.parent(), Some(mount_of(&kek["name"]).as_path()));
}

#[test]
fn the_fleet_overlay_runs_three_replicas_sharing_a_redis_only_they_reach() {
    let documents = render("fleet");
    let deployment = find(&documents, "Deployment", "box-broker");
    assert_eq!(deployment["metadata"]["name"], "box-broker");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let volumes = array(&pod["volumes"]);
    for secret in ["box-broker-kek", "box-broker-redis"] {
        let volume = volumes
            .iter()
            .find(|v| v["secret"]["secretName"] == secret)
            .unwrap_or_else(|| panic!("{secret}"));
        assert_eq!(volume["secret"]["defaultMode"], 0o400, "{secret}");
    }
    // The only writable mount is the replica's copy of the key set, in memory.
    let writable: Vec<&Value> = array(&container["volumeMounts"])
        .iter()
        .filter(|m| m["readOnly"] != true)
        .collect();
    assert_eq!(writable.len(), 1, "{writable:?}");
    let keys = volumes.iter().find(|v| v["name"] == writable[0]["name"]).unwrap();
    assert!(keys["emptyDir"].is_object(), "{keys}");
    // broker.toml with the container's environment: [redis] and [keystore]
    // with their files in those mounts, and the Service's name.
    let settings = shipped_config(&documents, container, "the fleet's");
    let redis = settings.redis.as_ref().expect("[redis] from the environment");
    let service = find(&documents, "Service", "box-broker-redis");
    let port = service["spec"]["ports"][0]["port"].as_u64().unwrap();
    assert_eq!(redis.url, Some(format!("redis://box-broker-redis:{port}/0")));
    assert!(
        redis
            .password_file
            .as_ref()
            .unwrap()
            .starts_with("/etc/box-broker/redis")
    );
    assert!(
        settings
            .keystore
            .as_ref()
            .unwrap()
            .path
            .starts_with("/var/lib/box-broker")
    );
    // Egress to Redis's pods on its port; Redis admits only the brokers and reaches nothing.
    let policy = find(&documents, "NetworkPolicy", "box-broker");
    let redis_labels = &find(&documents, "Deployment", "box-broker-redis")["spec"]["template"]["metadata"]["labels"];
    assert!(
        array(&policy["spec"]["egress"]).iter().any(|rule| {
            rule["to"][0]["podSelector"]["matchLabels"] == *redis_labels
                && rule["ports"][0]["port"].as_u64() == Some(port)
        }),
        "{policy}"
    );
    let redis_policy = find(&documents, "NetworkPolicy", "box-broker-redis");
    assert_eq!(redis_policy["spec"]["egress"], serde_json::json!([]));
    assert_eq!(
        redis_policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    let redis_pod = &find(&documents, "Deployment", "box-broker-redis")["spec"]["template"]["spec"];
    assert_eq!(redis_pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        redis_pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"],
        true
    );
    let conf = find(&documents, "ConfigMap", "box-broker-redis")["data"]["redis.conf"]
        .as_str()
        .unwrap();
    assert!(conf.contains("aclfile ") && conf.contains("appendonly yes"), "{conf}");
}
