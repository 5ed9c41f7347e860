//! Several central brokers sharing one Redis: a real `redis-server` the
//! tests start, real `box-broker serve` processes, the fake Box as a
//! process. One mint per key across replicas, revocation and key rotation
//! reaching every replica, Redis faults costing no request, and nothing in
//! Redis a secret in plaintext.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use box_token_broker::pb::{
    self, broker_admin_service_client::BrokerAdminServiceClient, token_broker_service_client::TokenBrokerServiceClient,
};
use sha2::Digest as _;
use tonic::transport::Channel;

use crate::{
    cli::{Proc, bin, fake_box},
    common::{ADMIN_KEY, admin_request, enterprise, token_of, user},
};

/// A `redis-server` on a free port, killed on drop.
pub(crate) struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// A config file, given first.
    conf: Option<PathBuf>,
    args: Vec<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    pub(crate) fn start() -> Self {
        Self::with_args(&[])
    }

    /// A server started with `args` added to its command line.
    pub(crate) fn with_args(args: &[&str]) -> Self {
        Self::with_port_args(|_| args.iter().map(|a| (*a).to_owned()).collect())
    }

    /// A server started with the arguments `args` makes of its port.
    pub(crate) fn with_port_args(args: impl FnOnce(u16) -> Vec<String>) -> Self {
        Self::with_conf_and(None, args)
    }

    /// A server run with the config file `conf` (its settings, then `args`).
    pub(crate) fn with_conf(conf: &Path, args: &[&str]) -> Self {
        Self::with_conf_and(Some(conf), |_| args.iter().map(|a| (*a).to_owned()).collect())
    }

    /// A server run with the config file `conf` if any, then the arguments
    /// `args` makes of its port.
    fn with_conf_and(conf: Option<&Path>, args: impl FnOnce(u16) -> Vec<String>) -> Self {
        let port = free_port();
        let mut server = Self {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
            conf: conf.map(Path::to_path_buf),
            args: args(port),
        };
        server.restart();
        server
    }

    /// Starts (again) on the same port, empty (no persistence).
    pub(crate) fn restart(&mut self) {
        let mut command = Command::new("redis-server");
        match &self.conf {
            // Its own persistence and directory.
            Some(conf) => command.arg(conf),
            None => command
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(self.dir.path()),
        };
        let child = command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success());
    }

    /// Kills it (its data is gone).
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A connection for the test to look inside.
    pub(crate) async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A frozen server must be thawed to die promptly.
            let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
        }
        self.stop();
    }
}

/// The fake Box (a process) and a Redis, and the files every replica shares.
pub(crate) struct Fleet {
    pub(crate) dir: tempfile::TempDir,
    _fake: Proc,
    pub(crate) fake_url: String,
    pub(crate) redis: RedisServer,
    /// Extra config every replica gets.
    pub(crate) extra: String,
    /// `[redis]` lines naming the server instead of `redis`'s url.
    server: Option<String>,
    /// More Redis processes (a Sentinel fleet's replica and Sentinels).
    others: Vec<RedisServer>,
}

/// One `box-broker serve` of the fleet.
pub(crate) struct Member {
    proc: Proc,
    pub(crate) addr: String,
    pub(crate) admin: String,
    pub(crate) metrics: String,
}

impl Fleet {
    pub(crate) fn new(extra: &str) -> Self {
        Self::with_redis(extra, RedisServer::start())
    }

    pub(crate) fn with_redis(extra: &str, redis: RedisServer) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (fake, fake_url) = fake_box(dir.path());
        let kek = dir.path().join("kek");
        std::fs::write(&kek, "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY=").unwrap();
        set_mode(&kek, 0o400);
        Self {
            dir,
            _fake: fake,
            fake_url,
            redis,
            extra: extra.to_owned(),
            server: None,
            others: Vec::new(),
        }
    }

    /// The config of replica `name` (its own key store; `kek` overrides the shared KEK file).
    pub(crate) fn config(&self, name: &str, kek: Option<&Path>) -> PathBuf {
        let base = std::fs::read_to_string(self.dir.path().join("broker.toml")).unwrap();
        let hash = hex::encode(sha2::Sha256::digest(ADMIN_KEY.as_bytes()));
        let kek = kek.map_or_else(|| self.dir.path().join("kek"), Path::to_path_buf);
        let text = format!(
            "{base}\n[keystore]\npath = {:?}\nkek_file = {kek:?}\n\n[redis]\n{}\nbreaker_cooldown_secs = 1\n{}\n\n[[admin.api_keys]]\nidentity = \"ops\"\nsha256 = \"{hash}\"\n[[admin.rules]]\ncallers = [\"apikey:ops\"]\nrpcs = [\"*\"]\n",
            self.dir.path().join(format!("{name}-keys.json")),
            self.server
                .clone()
                .unwrap_or_else(|| format!("url = {:?}", self.redis.url())),
            self.extra,
        );
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts replica `name` and waits until it serves.
    pub(crate) fn spawn(&self, name: &str) -> Member {
        self.spawn_with(&self.config(name, None))
    }

    pub(crate) fn spawn_with(&self, config: &Path) -> Member {
        let proc = Proc::spawn(
            Command::new(bin())
                .args(["serve", "--config"])
                .arg(config)
                .current_dir(self.dir.path())
                .env("BOX_BROKER_SERVER__LISTEN", "127.0.0.1:0")
                .env("BOX_BROKER_SERVER__ADMIN_LISTEN", "127.0.0.2:0")
                .env("BOX_BROKER_SERVER__METRICS_LISTEN", "127.0.0.1:0")
                .env("BOX_BROKER_LOG__FORMAT", "json")
                .env_remove("RUST_LOG"),
        );
        let admin = Proc::wait_listen(&proc.stderr, "serving the admin RPC");
        let addr = Proc::wait_listen(&proc.stderr, "serving gRPC");
        let metrics = Proc::wait_listen(&proc.stderr, "serving Prometheus metrics");
        Member {
            proc,
            addr,
            admin,
            metrics,
        }
    }

    pub(crate) async fn stats(&self) -> serde_json::Value {
        reqwest::get(format!("{}/_fake/stats", self.fake_url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub(crate) async fn stat(&self, name: &str) -> u64 {
        self.stats().await[name].as_u64().unwrap()
    }

    /// The fake's next `count` token requests hang.
    async fn hang_next(&self, count: usize) {
        let reply = reqwest::Client::new()
            .post(format!("{}/_fake/faults", self.fake_url))
            .json(&serde_json::json!({"kind": "hang", "count": count}))
            .send()
            .await
            .unwrap();
        assert!(reply.status().is_success());
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Member {
    pub(crate) async fn client(&self) -> TokenBrokerServiceClient<Channel> {
        TokenBrokerServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    async fn admin_client(&self) -> BrokerAdminServiceClient<Channel> {
        BrokerAdminServiceClient::connect(format!("http://{}", self.admin))
            .await
            .unwrap()
    }

    pub(crate) async fn get(&self, request: pb::GetTokenRequest) -> Result<String, tonic::Status> {
        self.client()
            .await
            .get_token(request)
            .await
            .map(|r| token_of(&r.into_inner()))
    }

    /// The sum of every series of `metric` on its /metrics.
    pub(crate) async fn metric(&self, metric: &str, labels: &str) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with(metric) && l.contains(labels) && !l.starts_with('#'))
            .filter(|l| l[metric.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn revoke(&self, token: &str) -> Result<tonic::Response<pb::RevokeTokenResponse>, tonic::Status> {
        self.client()
            .await
            .revoke_token(pb::RevokeTokenRequest {
                app: String::new(),
                access_token: token.to_owned(),
            })
            .await
    }

    async fn generate_key(&self) -> Result<tonic::Response<pb::GenerateKeyResponse>, tonic::Status> {
        self.admin_client()
            .await
            .generate_key(admin_request(pb::GenerateKeyRequest {
                app: String::new(),
                bits: 2048,
            }))
            .await
    }

    async fn status(&self) -> pb::GetStatusResponse {
        self.admin_client()
            .await
            .get_status(admin_request(pb::GetStatusRequest {}))
            .await
            .unwrap()
            .into_inner()
    }

    async fn active_kid(&self) -> String {
        let status = self.status().await;
        status.apps[0].active_key.as_ref().unwrap().kid.clone()
    }

    /// The first line holding `needle` on its stderr (lines read are gone),
    /// if one is there or comes within `within`.
    fn logged(&self, needle: &str, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        tokio::task::block_in_place(|| {
            while let Ok(line) = self
                .proc
                .stderr
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
    }

    fn kill(&mut self) {
        self.proc.signal("-KILL");
    }
}

fn force(mut request: pb::GetTokenRequest) -> pb::GetTokenRequest {
    request.force_refresh = true;
    request
}

/// Polls `check` every 50 ms for up to `within`.
async fn eventually<F: Future<Output = bool>>(within: Duration, mut check: impl FnMut() -> F) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_mint_once_for_a_thousand_cold_requests() {
    // Redis calls under a generous deadline: 1,000 requests on two cores
    // must not turn a slow answer into a fallback mint.
    let fleet = Fleet::new("command_timeout_ms = 2000\n");
    let members = [fleet.spawn("a"), fleet.spawn("b"), fleet.spawn("c")];
    let clients = [
        members[0].client().await,
        members[1].client().await,
        members[2].client().await,
    ];
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let mut client = clients[i % 3].clone();
        calls.spawn(async move { client.get_token(enterprise()).await.map(|r| token_of(&r.into_inner())) });
    }
    let mut tokens = std::collections::HashSet::new();
    while let Some(done) = calls.join_next().await {
        tokens.insert(done.unwrap().expect("every request is served"));
    }
    if tokens.len() != 1 {
        for m in &members {
            let text = reqwest::get(format!("http://{}/metrics", m.metrics))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            eprintln!(
                "{}",
                text.lines()
                    .filter(|l| l.contains("l2") && !l.starts_with('#'))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        eprintln!("{}", fleet.stats().await);
    }
    assert_eq!(tokens.len(), 1, "one token for the fleet");
    assert_eq!(fleet.stat("jwt_issued").await, 1, "exactly one mint at Box");
    assert_eq!(fleet.stat("token_arrivals").await, 1);
    let mut from_redis = 0.0;
    for m in &members {
        from_redis += m.metric("boxbroker_l2_lookups_total", "result=\"hit\"").await;
    }
    assert_eq!(from_redis, 2.0, "the two other replicas found it in Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_minted_on_one_replica_is_a_hit_on_another_and_its_revocation_reaches_it() {
    let fleet = Fleet::new("");
    let (a, b) = (fleet.spawn("a"), fleet.spawn("b"));
    let minted = a.get(enterprise()).await.unwrap();
    let arrivals = fleet.stat("token_arrivals").await;
    assert_eq!(b.get(enterprise()).await.unwrap(), minted, "B serves A's token");
    assert_eq!(fleet.stat("token_arrivals").await, arrivals, "without calling Box");

    a.revoke(&minted).await.unwrap();
    assert_eq!(fleet.stat("revoke_requests").await, 1);
    let started = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.get(enterprise()).await.unwrap() != minted
        })
        .await,
        "B stops serving the revoked token"
    );
    // The notice is read every poll_interval_ms (200 ms by default).
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    let fresh = b.get(enterprise()).await.unwrap();
    assert_ne!(a.get(enterprise()).await.unwrap(), minted, "nor does A");
    assert_eq!(
        a.get(enterprise()).await.unwrap(),
        fresh,
        "and the fleet shares the new one"
    );
    assert_eq!(
        b.metric("boxbroker_l2_notices_total", "direction=\"received\"").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_lease_holder_is_replaced_once_its_lease_expires() {
    // The lease lasts the mint deadline and a second: 2.5 s here.
    let fleet = Fleet::new("\n[upstream]\ndeadline_ms = 1500\nattempt_timeout_ms = 1500\n");
    let (mut a, b) = (fleet.spawn("a"), fleet.spawn("b"));
    fleet.hang_next(1).await;
    let mut holder = a.client().await;
    let stuck = tokio::spawn(async move { holder.get_token(user("7200001")).await });
    // A holds the lease and waits for Box (its Service Account mint for the user check hangs).
    assert!(
        eventually(Duration::from_secs(5), || async {
            fleet.stat("faults_served").await == 1
        })
        .await
    );
    a.kill();
    assert!(stuck.await.unwrap().is_err(), "A's own caller loses its connection");
    let started = Instant::now();
    let token = b.get(user("7200001")).await.expect("B's request is served");
    assert!(!token.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "B waited for the dead holder's lease: {:?}",
        started.elapsed()
    );
    assert_eq!(b.metric("boxbroker_l2_lease_takeovers_total", "").await, 1.0);
    assert_eq!(
        fleet.stat("jwt_issued").await,
        2,
        "B minted the Service Account token and the user's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_or_foreign_kek_value_in_redis_is_a_miss_never_served() {
    use redis::AsyncCommands as _;
    let fleet = Fleet::new("");
    let a = fleet.spawn("a");
    let minted = a.get(enterprise()).await.unwrap();
    let mut redis = fleet.redis.connection().await;
    // (The write follows the answer.)
    let mut names_before: Vec<String> = Vec::new();
    for _ in 0..100 {
        names_before = redis.keys("box-broker:t:*").await.unwrap();
        if !names_before.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(names_before.len(), 1, "{names_before:?}");
    let mut sealed: Vec<u8> = redis.hget(&names_before[0], "v").await.unwrap();
    let last = sealed.len() - 1;
    sealed[last] ^= 1;
    let _: () = redis.hset(&names_before[0], "v", sealed).await.unwrap();

    let b = fleet.spawn("b");
    let served = b.get(enterprise()).await.unwrap();
    assert_ne!(served, minted, "the tampered value is not served");
    assert_eq!(fleet.stat("jwt_issued").await, 2, "B minted instead");
    assert_eq!(
        b.metric("boxbroker_l2_errors_total", "kind=\"undecryptable\"").await,
        1.0
    );
    assert_eq!(
        b.metric("boxbroker_l2_writes_total", "outcome=\"written\"").await,
        1.0,
        "and replaced the garbage"
    );

    // A value sealed under another KEK, put where the fleet looks: a
    // replica with another KEK writes under names of its own, so the test
    // copies its value over the fleet's.
    let other = fleet.dir.path().join("other-kek");
    std::fs::write(&other, "enl6eXh4eHd3dnZ1dXR0c3NycnFxcHBvb25ubW1sbGs=").unwrap();
    set_mode(&other, 0o400);
    let c = fleet.spawn_with(&fleet.config("c", Some(&other)));
    let foreign = c.get(enterprise()).await.unwrap();
    assert_eq!(
        fleet.stat("jwt_issued").await,
        3,
        "C cannot read the fleet's names either"
    );
    let mut names: Vec<String> = Vec::new();
    for _ in 0..100 {
        names = redis.keys("box-broker:t:*").await.unwrap();
        if names.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(names.len(), 2, "{names:?}");
    let theirs = names.iter().find(|n| **n != names_before[0]).unwrap();
    let sealed: Vec<u8> = redis.hget(theirs, "v").await.unwrap();
    let _: () = redis.hset(&names_before[0], "v", sealed).await.unwrap();
    let d = fleet.spawn("d");
    let fresh = d.get(enterprise()).await.unwrap();
    assert!(fresh != foreign && fresh != served && fresh != minted, "never served");
    assert_eq!(fleet.stat("jwt_issued").await, 4);
    assert_eq!(
        d.metric("boxbroker_l2_errors_total", "kind=\"undecryptable\"").await,
        1.0
    );
}

/// Eight workers asking two replicas for a Service Account token, a
/// user's and (forced) another user's, every 5 ms, until stopped.
struct Load {
    served: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    workers: tokio::task::JoinSet<()>,
}

impl Load {
    async fn start(members: &[&Member]) -> Self {
        let mut clients = Vec::new();
        for member in members {
            clients.push(member.client().await);
        }
        let mut load = Self {
            served: Arc::default(),
            failed: Arc::default(),
            stop: Arc::default(),
            workers: tokio::task::JoinSet::new(),
        };
        for worker in 0..8 {
            let (mut client, failed, served, stop) = (
                clients[worker % clients.len()].clone(),
                load.failed.clone(),
                load.served.clone(),
                load.stop.clone(),
            );
            load.workers.spawn(async move {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let request = match (worker + i) % 3 {
                        0 => enterprise(),
                        1 => user("7200001"),
                        _ => force(user("7200002")),
                    };
                    match client.get_token(request).await {
                        Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                        Err(status) => {
                            eprintln!("failed: {status:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        }
        load
    }

    /// Stops the workers: (requests served, requests failed).
    async fn stop(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        while self.workers.join_next().await.is_some() {}
        (self.served.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_or_frozen_mid_load_fails_no_request_and_sharing_resumes() {
    let mut fleet = Fleet::new("");
    let (a, b) = (fleet.spawn("a"), fleet.spawn("b"));
    let load = Load::start(&[&a, &b]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.redis.signal("-STOP");
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.redis.signal("-CONT");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fleet.redis.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = a.status().await.redis.expect("GetStatus shows the Redis state");
    assert_eq!(status.state, "degraded");
    assert!(!status.last_error.is_empty());
    assert_eq!(a.metric("boxbroker_l2_degraded", "").await, 1.0);
    fleet.redis.restart();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (served, failed) = load.stop().await;
    assert_eq!(failed, 0, "no request failed because of Redis");
    assert!(served > 100);
    for m in [&a, &b] {
        let failed_calls = m.metric("boxbroker_l2_errors_total", "kind=\"timeout\"").await
            + m.metric("boxbroker_l2_errors_total", "kind=\"error\"").await;
        assert!(failed_calls >= 3.0, "{failed_calls}");
        assert!(m.metric("boxbroker_l2_errors_total", "kind=\"skipped\"").await >= 1.0);
    }

    // Back: the replicas share again (a subject the load never asked for).
    assert!(
        eventually(Duration::from_secs(5), || async {
            a.metric("boxbroker_l2_degraded", "").await == 0.0 && {
                let _ = b.get(user("7200003")).await;
                b.metric("boxbroker_l2_degraded", "").await == 0.0
            }
        })
        .await
    );
    let issued = fleet.stat("jwt_issued").await;
    let token = a.get(user("7300001")).await.unwrap();
    let after_a = fleet.stat("jwt_issued").await;
    assert!(after_a > issued, "A minted for the new subject");
    assert_eq!(b.get(user("7300001")).await.unwrap(), token, "B shares it");
    assert_eq!(fleet.stat("jwt_issued").await, after_a, "without a mint of its own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_activated_on_one_replica_is_used_by_the_others_and_after_a_restart() {
    let fleet = Fleet::new("");
    let (a, mut b) = (fleet.spawn("a"), fleet.spawn("b"));
    let old_kid = a.active_kid().await;
    let generated = a.generate_key().await.unwrap().into_inner();
    let box_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fleet.dir.path().join("box_config.json")).unwrap()).unwrap();
    let client_id = box_config["boxAppSettings"]["clientID"].as_str().unwrap().to_owned();
    let reply: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/_fake/apps/{client_id}/keys", fleet.fake_url))
        .body(generated.public_key_pem.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kid = reply["kid"].as_str().unwrap().to_owned();
    a.admin_client()
        .await
        .activate_key(admin_request(pb::ActivateKeyRequest {
            app: String::new(),
            kid: kid.clone(),
            fingerprint: generated.key.unwrap().fingerprint,
        }))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async { b.active_kid().await == kid }).await,
        "B switched to the key activated on A"
    );
    // The old key is gone at Box: B's mints work only with the new one.
    let removed = reqwest::Client::new()
        .delete(format!("{}/_fake/apps/{client_id}/keys/{old_kid}", fleet.fake_url))
        .send()
        .await
        .unwrap();
    assert!(removed.status().is_success());
    b.get(force(enterprise())).await.expect("B mints with the new key");
    assert_eq!(b.metric("boxbroker_standby_key_used_total", "").await, 0.0);

    // B restarted keeps it (its own store); a replica that never saw the
    // change loads the newest set from Redis.
    b.kill();
    let b = fleet.spawn("b");
    assert_eq!(b.active_kid().await, kid);
    b.get(force(enterprise())).await.unwrap();
    let d = fleet.spawn("d");
    assert_eq!(d.active_kid().await, kid);
    d.get(force(user("7200001")))
        .await
        .expect("a new replica mints with the new key");
    assert_eq!(
        b.metric("boxbroker_key_set_version", "").await,
        2.0,
        "generate, then activate"
    );
    assert_eq!(d.metric("boxbroker_key_set_version", "").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_in_redis_is_a_token_key_secret_or_user_id_in_plaintext() {
    use redis::AsyncCommands as _;
    let fleet = Fleet::new("");
    let (a, b) = (fleet.spawn("a"), fleet.spawn("b"));
    let mut tokens = vec![
        a.get(enterprise()).await.unwrap(),
        a.get(user("7200001")).await.unwrap(),
        b.get(user("7200002")).await.unwrap(),
        b.get(user("7300001")).await.unwrap(),
    ];
    // A key set with a generated private key, and a revocation notice.
    a.generate_key().await.unwrap();
    let revoked = b.get(force(user("7200003"))).await.unwrap();
    b.revoke(&revoked).await.unwrap();
    tokens.push(revoked);
    let a_keys = std::fs::read_to_string(fleet.dir.path().join("a-keys.json")).unwrap();
    assert!(a_keys.contains("ciphertext"));

    let mut redis = fleet.redis.connection().await;
    let names: Vec<String> = redis.keys("*").await.unwrap();
    assert!(names.iter().any(|n| n.starts_with("box-broker:t:")));
    assert!(names.iter().any(|n| n.starts_with("box-broker:k:")));
    let mut dump = names.join("\n");
    for name in &names {
        let kind: String = redis::cmd("TYPE").arg(name).query_async(&mut redis).await.unwrap();
        let value: redis::Value = match kind.as_str() {
            "hash" => redis::cmd("HGETALL").arg(name).query_async(&mut redis).await.unwrap(),
            "stream" => redis::cmd("XRANGE")
                .arg(name)
                .arg("-")
                .arg("+")
                .query_async(&mut redis)
                .await
                .unwrap(),
            _ => redis::cmd("GET").arg(name).query_async(&mut redis).await.unwrap(),
        };
        dump.push_str(&format!("\n{value:?}"));
        dump.push_str(&String::from_utf8_lossy(&redis_bytes(&value)));
    }
    let box_config = std::fs::read_to_string(fleet.dir.path().join("box_config.json")).unwrap();
    let box_config: serde_json::Value = serde_json::from_str(&box_config).unwrap();
    let mut secrets = tokens;
    secrets.push(
        box_config["boxAppSettings"]["clientSecret"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    secrets.push("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY=".to_owned());
    secrets.push("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef".to_owned());
    secrets.extend(
        [
            "7200001",
            "7200002",
            "7200003",
            "7000001",
            "7300001",
            "anonymous",
            // A 2048-bit PKCS#8 key's base64 begins so (five bytes: random
            // ciphertext matches by chance about once in 10^8 runs).
            "MIIEv",
            "PRIVATE",
        ]
        .map(str::to_owned),
    );
    for secret in &secrets {
        assert!(!dump.contains(secret.as_str()), "Redis holds {secret:?} in plaintext");
    }
}

/// Every byte string inside `value`, concatenated.
fn redis_bytes(value: &redis::Value) -> Vec<u8> {
    match value {
        redis::Value::BulkString(b) => b.clone(),
        redis::Value::SimpleString(s) => s.clone().into_bytes(),
        redis::Value::Array(items) | redis::Value::Set(items) => items.iter().flat_map(redis_bytes).collect(),
        redis::Value::Map(pairs) => pairs
            .iter()
            .flat_map(|(k, v)| [redis_bytes(k), redis_bytes(v)].concat())
            .collect(),
        _ => Vec::new(),
    }
}

/// The shared store itself, against the real server: a write under a
/// lease taken before an invalidation is refused (fencing), one under a
/// current lease lands, and a second holder cannot take a held lease.
#[tokio::test]
async fn a_stale_write_after_an_invalidation_is_refused() {
    use box_token_broker::{
        boxapi::{BoxId, BoxSubject, IssuedToken},
        cache::{CachePolicy, CachedToken, LeaseOutcome, SharedStore as _, TokenKey},
        keys::store::Kek,
        l2::{Redis, Settings},
    };
    let server = RedisServer::start();
    let (kek, _) = Kek::generate().unwrap();
    let store = Redis::new(
        Settings {
            namespace: "t".to_owned(),
            command_timeout: Duration::from_secs(1),
            poll_interval: Duration::from_millis(50),
            ..Settings::with_defaults(server.url())
        },
        &kek,
    )
    .unwrap();
    let key = TokenKey::full("default".into(), BoxSubject::User(BoxId::parse("7200001").unwrap()));
    // A key set is taken only under its own sealed version: raising the
    // plain copy Redis compares (anyone with write access could) gets nothing.
    let set = box_token_broker::keys::store::StoredApp {
        version: 3,
        ..Default::default()
    };
    let lock = store.lock_keys("default", Duration::ZERO).await.unwrap();
    assert!(store.publish_key_set("default", 3, &set, &lock).await);
    assert!(
        !store.publish_key_set("default", 2, &set, &lock).await,
        "never an older version"
    );
    assert_eq!(store.key_set("default").await.unwrap().map(|(v, _)| v), Some(3));
    // A lock that ran out (here: deleted) publishes nothing.
    let mut raw = server.connection().await;
    let locks: Vec<String> = redis::AsyncCommands::keys(&mut raw, "t:kl:*").await.unwrap();
    let _: () = redis::AsyncCommands::del(&mut raw, &locks).await.unwrap();
    let newer = box_token_broker::keys::store::StoredApp {
        version: 4,
        ..Default::default()
    };
    assert!(
        !store.publish_key_set("default", 4, &newer, &lock).await,
        "a lost lock publishes nothing"
    );
    drop(lock);
    let names: Vec<String> = redis::AsyncCommands::keys(&mut raw, "t:k:*").await.unwrap();
    assert_eq!(names.len(), 1);
    let _: () = redis::AsyncCommands::hset(&mut raw, &names[0], "ver", 9).await.unwrap();
    assert!(
        store.key_set("default").await.unwrap().is_none(),
        "a forged version is ignored"
    );
    assert_eq!(store.counters().undecryptable.load(Ordering::Relaxed), 1);
    let token = |text: &str| {
        let now = box_token_broker::clock::system_now();
        CachedToken::from_issued(
            IssuedToken {
                access_token: text.to_owned().into(),
                expires_at: now + Duration::from_secs(3600),
                issued_at: now,
                token_type: "bearer".to_owned(),
                request_id: None,
                restricted_to: Vec::new(),
            },
            &CachePolicy::default(),
        )
    };
    let LeaseOutcome::Acquired {
        lease: stale,
        found: None,
    } = store.lease(&key, false).await
    else {
        panic!("the first lease is taken")
    };
    assert!(matches!(store.lease(&key, false).await, LeaseOutcome::HeldElsewhere));
    store.invalidate(&key).await;
    store.put(&key, &token("stale-token-0000"), stale).await;
    assert!(store.get(&key, false).await.is_none(), "the stale write was refused");
    assert_eq!(store.counters().writes_refused.load(Ordering::Relaxed), 1);

    let LeaseOutcome::Acquired {
        lease: current,
        found: None,
    } = store.lease(&key, false).await
    else {
        panic!("the refused write released the lease")
    };
    store.put(&key, &token("fresh-token-1111"), current).await;
    let got = store.get(&key, false).await.expect("a current write lands");
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(&got.access_token),
        "fresh-token-1111"
    );
    assert_eq!(store.counters().writes.load(Ordering::Relaxed), 1);
    // The next holder is handed the token written just before it took the lease.
    let LeaseOutcome::Acquired { found: Some(found), .. } = store.lease(&key, false).await else {
        panic!("the lease is free again, and the token is held")
    };
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(&found.access_token),
        "fresh-token-1111"
    );
}

/// The ACL README.md "Running several replicas" documents: a user that may
/// touch only the namespace's keys and run only the commands the broker
/// sends, with its password in a file. Nothing the broker does is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_with_only_the_documented_commands_and_a_password_file_is_enough() {
    let acl = ACL_RULES.replace("PASSWORD", "redis-pw-4242");
    // One argument per word: redis-server joins an option's arguments.
    let mut args = vec!["--user", "default", "off", "--user"];
    args.extend(acl.split_whitespace());
    let server = RedisServer::with_args(&args);
    let password = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(password.path(), "redis-pw-4242\n").unwrap();
    set_mode(password.path(), 0o400);
    let fleet = Fleet::with_redis(
        &format!("username = \"box-broker\"\npassword_file = {:?}\n", password.path()),
        server,
    );
    let (a, b) = (fleet.spawn("a"), fleet.spawn("b"));
    let minted = a.get(enterprise()).await.unwrap();
    assert_eq!(
        b.get(enterprise()).await.unwrap(),
        minted,
        "shared through the ACL user"
    );
    a.generate_key().await.unwrap();
    a.revoke(&minted).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.get(enterprise()).await.unwrap() != minted
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.metric("boxbroker_key_set_version", "").await == 1.0
        })
        .await,
        "the key set reached B"
    );
    for m in [&a, &b] {
        assert_eq!(
            m.metric("boxbroker_l2_errors_total", "").await,
            0.0,
            "no call was refused"
        );
    }
    // The default user is off: without the ACL user's password nothing gets in.
    let refused = redis::Client::open(fleet.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await;
    let mut conn = match refused {
        Ok(conn) => conn,
        Err(_) => return,
    };
    let denied: redis::RedisResult<Vec<String>> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await;
    assert!(denied.is_err());
}

/// README.md's ACL for the broker's Redis user (PASSWORD replaced).
const ACL_RULES: &str = "box-broker on >PASSWORD resetkeys ~box-broker:* resetchannels -@all +@connection +get +set +del +hget +hmget +hset +pexpire +incr +eval +evalsha +script|load +xadd +xread +xrange +xrevrange +scan";

/// A `[redis]` password file that is missing, empty or readable by others
/// stops `check-config` (and `serve`) with exit 64 and one line naming the
/// setting and the file — never the password.
#[test]
fn a_bad_redis_password_file_stops_startup_with_one_line() {
    let mut fleet = Fleet::new("");
    let password = fleet.dir.path().join("redis-password");
    let sentinels = "sentinels = [\"redis://127.0.0.1:26379\"]\nmaster_name = \"box\"";
    for (setting, server, content, mode, problem) in [
        ("password_file", None, None, 0o400, "cannot read"),
        ("password_file", None, Some("\n"), 0o400, "is empty"),
        (
            "password_file",
            None,
            Some("hunter2-redis\n"),
            0o644,
            "other users may read",
        ),
        ("sentinel_password_file", Some(sentinels), None, 0o400, "cannot read"),
        (
            "sentinel_password_file",
            Some(sentinels),
            Some("hunter2-redis\n"),
            0o604,
            "other users may read",
        ),
    ] {
        fleet.server = server.map(str::to_owned);
        let _ = std::fs::remove_file(&password);
        if let Some(content) = content {
            std::fs::write(&password, content).unwrap();
            set_mode(&password, mode);
        }
        let config = fleet.config("a", None);
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("[redis]\n", &format!("[redis]\n{setting} = {password:?}\n"));
        std::fs::write(&config, text).unwrap();
        for command in [&["check-config"][..], &["serve", "--config"][..]] {
            let out = Command::new(bin())
                .args(command)
                .arg(&config)
                .env("BOX_BROKER_SERVER__LISTEN", "127.0.0.1:0")
                .env_remove("RUST_LOG")
                .output()
                .unwrap();
            let stderr = String::from_utf8(out.stderr).unwrap();
            assert_eq!(out.status.code(), Some(64), "{command:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(
                stderr.contains(&format!("redis.{setting}")) && stderr.contains("redis-password"),
                "{stderr}"
            );
            assert!(stderr.contains(problem), "{stderr}");
            assert!(!stderr.contains("hunter2-redis"), "{stderr}");
        }
    }
}

/// The Redis `deploy/kubernetes/components/redis` ships, as configured
/// there (its redis.conf, rendered by kustomize) with the ACL file README.md
/// says to make: two brokers share through it, and the default user gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_redis_config_and_the_readmes_acl_file_serve_a_fleet() {
    let documents = crate::deploy::render("fleet");
    let conf_text = crate::deploy::find(&documents, "ConfigMap", "box-broker-redis")["data"]["redis.conf"]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let acl_file = dir.path().join("users.acl");
    // The pod's paths (its volumes) become the test's; nothing else changes.
    assert!(conf_text.contains("dir /data\n") && conf_text.contains("aclfile /etc/redis/acl/users.acl\n"));
    let conf_text = conf_text
        .replace("dir /data\n", &format!("dir {}\n", data.display()))
        .replace(
            "aclfile /etc/redis/acl/users.acl\n",
            &format!("aclfile {}\n", acl_file.display()),
        );
    let conf = dir.path().join("redis.conf");
    std::fs::write(&conf, conf_text).unwrap();
    // README: users.acl from the password, the ACL rules with its SHA-256.
    let password = "redis-pw-from-readme";
    let digest = hex::encode(sha2::Sha256::digest(password.as_bytes()));
    std::fs::write(
        &acl_file,
        format!(
            "user default off\nuser {}\n",
            ACL_RULES.replace(">PASSWORD", &format!("#{digest}"))
        ),
    )
    .unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, password).unwrap();
    set_mode(&password_file, 0o400);
    let server = RedisServer::with_conf(&conf, &[]);
    let fleet = Fleet::with_redis(
        &format!("username = \"box-broker\"\npassword_file = {password_file:?}\n"),
        server,
    );
    let (a, b) = (fleet.spawn("a"), fleet.spawn("b"));
    let minted = a.get(enterprise()).await.unwrap();
    assert_eq!(b.get(enterprise()).await.unwrap(), minted);
    assert_eq!(fleet.stat("jwt_issued").await, 1);
    for m in [&a, &b] {
        assert_eq!(m.metric("boxbroker_l2_errors_total", "").await, 0.0);
    }
    let mut anonymous = redis::Client::open(fleet.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let denied: redis::RedisResult<Option<String>> = redis::cmd("GET")
        .arg("box-broker:anything")
        .query_async(&mut anonymous)
        .await;
    assert!(denied.is_err(), "the default user is off");
}

/// The fake's policy, plus App Users by external id for the anonymous caller.
fn allow_external_ids(fleet: &Fleet) {
    let policy = fleet.dir.path().join("policy.toml");
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str(
        "\n[[rules]]\nname = \"external ids\"\ncallers = [\"anonymous\"]\nexternal_users = [\"*\"]\nprovision = true\nfull_tokens = true\nrevoke = true\n",
    );
    std::fs::write(&policy, text).unwrap();
}

async fn invalidate(member: &Member, subject: Option<pb::Subject>) -> u64 {
    member
        .admin_client()
        .await
        .invalidate_tokens(admin_request(pb::InvalidateTokensRequest {
            app: "default".to_owned(),
            subject,
        }))
        .await
        .unwrap()
        .into_inner()
        .invalidated
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_tokens_on_one_replica_drops_the_token_everywhere() {
    let fleet = Fleet::new("");
    let (a, b) = (fleet.spawn("a"), fleet.spawn("b"));
    let shared = a.get(user("7200001")).await.unwrap();
    assert_eq!(b.get(user("7200001")).await.unwrap(), shared);
    // A's copies: the user's and the Service Account's (it checked the user).
    assert_eq!(invalidate(&a, None).await, 2);
    let fresh = a.get(user("7200001")).await.unwrap();
    assert_ne!(fresh, shared, "A does not take it back from Redis");
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.get(user("7200001")).await.unwrap() == fresh
        })
        .await,
        "B drops its copy and shares A's new token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_by_external_id_reaches_a_replica_that_resolved_it() {
    let fleet = Fleet::new("");
    allow_external_ids(&fleet);
    let (a, b) = (fleet.spawn("a"), fleet.spawn("b"));
    let shared = a.get(crate::common::external("auth0|ada")).await.unwrap();
    // B never resolved auth0|ada: it drops nothing itself, and tells A.
    let subject = crate::common::external("auth0|ada").subject;
    assert_eq!(invalidate(&b, subject).await, 0);
    assert!(
        eventually(Duration::from_secs(5), || async {
            a.get(crate::common::external("auth0|ada")).await.unwrap() != shared
        })
        .await,
        "A dropped its copy and the one in Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_while_redis_is_frozen_adopts_the_newest_key_set_once_it_answers() {
    let fleet = Fleet::new("");
    let a = fleet.spawn("a");
    a.generate_key().await.unwrap();
    fleet.redis.signal("-STOP");
    let d = fleet.spawn("d");
    assert_eq!(d.metric("boxbroker_key_set_version", "").await, 0.0);
    d.get(enterprise()).await.expect("served without Redis");
    fleet.redis.signal("-CONT");
    assert!(
        eventually(Duration::from_secs(10), || async {
            d.metric("boxbroker_key_set_version", "").await == 1.0
        })
        .await,
        "D caught up once Redis answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_while_redis_is_down_reaches_the_others_when_it_is_back() {
    let mut fleet = Fleet::new("");
    let (a, b) = (fleet.spawn("a"), fleet.spawn("b"));
    let shared = a.get(enterprise()).await.unwrap();
    assert_eq!(b.get(enterprise()).await.unwrap(), shared);
    fleet.redis.stop();
    // Revoking a shared token needs the fleet's record of who holds it.
    let refused = a.revoke(&shared).await.expect_err("refused without Redis");
    crate::common::assert_status(&refused, tonic::Code::Unavailable, "cannot be asked");
    assert_eq!(fleet.stat("revoke_requests").await, 0, "the token stays valid");
    // An invalidation is made here at once, and told to the others later.
    assert_eq!(invalidate(&a, enterprise().subject).await, 1);
    fleet.redis.restart();
    assert!(
        eventually(Duration::from_secs(10), || async {
            b.metric("boxbroker_l2_notices_total", "direction=\"received\"").await >= 1.0
        })
        .await,
        "A sent the notice it held once Redis answered"
    );
    assert_ne!(b.get(enterprise()).await.unwrap(), shared, "B dropped its copy");
}

/// `rediss://` with `ca_file`: the fleet shares through a Redis that speaks
/// only TLS, its certificate checked against the configured CA (and a
/// broker given another CA refuses it: it then works alone).
/// A certificate for localhost and 127.0.0.1, its key and its CA, in files.
struct RedisTls {
    dir: tempfile::TempDir,
    cert: String,
    key: String,
    ca: String,
}

impl RedisTls {
    fn new() -> Self {
        use crate::common::pki::{Pki, dns, ip};
        let pki = Pki::new();
        let (cert, key) = pki.issue(vec![dns("localhost"), ip("127.0.0.1")]);
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_owned()
        };
        let (cert, key, ca) = (
            file("redis.crt", &cert),
            file("redis.key", &key),
            file("ca.crt", &pki.ca.pem()),
        );
        Self { dir, cert, key, ca }
    }

    /// A server's arguments for TLS only, on `port` (the port it is waited
    /// on), reaching its master (or a Sentinel its masters) over TLS too.
    fn args(&self, port: u16) -> Vec<String> {
        [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &self.cert,
            "--tls-key-file",
            &self.key,
            "--tls-ca-cert-file",
            &self.ca,
            "--tls-auth-clients",
            "no",
            "--tls-replication",
            "yes",
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_is_reached_with_the_configured_ca_and_only_with_it() {
    let tls = RedisTls::new();
    let ca = tls.ca.clone();
    let server = RedisServer::with_port_args(|port| tls.args(port));
    let tls_url = server.url().replace("redis://127.0.0.1", "rediss://localhost");
    let fleet = Fleet::with_redis(&format!("ca_file = {ca:?}\n"), server);
    let config = |name: &str, ca_file: &str| {
        let path = fleet.config(name, None);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace(&fleet.redis.url(), &tls_url)
            .replace(&format!("ca_file = {ca:?}"), &format!("ca_file = {ca_file:?}"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let a = fleet.spawn_with(&config("a", &ca));
    let b = fleet.spawn_with(&config("b", &ca));
    let minted = a.get(enterprise()).await.unwrap();
    assert_eq!(b.get(enterprise()).await.unwrap(), minted, "shared over TLS");
    assert_eq!(fleet.stat("jwt_issued").await, 1);
    // Another CA: the handshake fails, Redis is degraded for it, and its
    // requests are still served (minted on its own).
    let other = tls.dir.path().join("other-ca.crt");
    std::fs::write(&other, crate::common::pki::Pki::new().ca.pem()).unwrap();
    let other = other.to_str().unwrap().to_owned();
    let c = fleet.spawn_with(&config("c", &other));
    assert!(c.get(enterprise()).await.unwrap() != minted);
    assert!(
        c.metric("boxbroker_l2_errors_total", "kind=\"error\"").await
            + c.metric("boxbroker_l2_errors_total", "kind=\"timeout\"").await
            >= 1.0
    );
}

/// TLS to the Sentinels and the master (`rediss://` Sentinels, one CA
/// file): two brokers share through the master the Sentinel names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_sentinel_and_its_master_are_reached_with_the_configured_ca() {
    let tls = RedisTls::new();
    let ca = tls.ca.clone();
    let master = RedisServer::with_port_args(|port| tls.args(port));
    let conf = tls.dir.path().join("sentinel.conf");
    std::fs::write(&conf, format!("sentinel monitor box 127.0.0.1 {} 1\n", master.port)).unwrap();
    let sentinel = RedisServer::with_conf_and(Some(&conf), |port| {
        let mut args = tls.args(port);
        args.push("--sentinel".to_owned());
        args
    });
    let mut fleet = Fleet::with_redis("", master);
    fleet.server = Some(format!(
        "sentinels = [\"rediss://127.0.0.1:{}\"]\nmaster_name = \"box\"\nca_file = {ca:?}",
        sentinel.port
    ));
    fleet.others.push(sentinel);
    let (a, b) = (fleet.spawn("a"), fleet.spawn("b"));
    let minted = a.get(enterprise()).await.unwrap();
    assert_eq!(b.get(enterprise()).await.unwrap(), minted, "shared over TLS");
    assert_eq!(fleet.stat("jwt_issued").await, 1);
    assert_eq!(redis_in_use(&b).await, (format!("127.0.0.1:{}", fleet.redis.port), 0));
}

/// A replica whose notice reads failed for a moment (Redis frozen) reads on
/// from where it stopped: nothing was lost, so it keeps its cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_redis_stall_costs_no_replica_its_cache() {
    let fleet = Fleet::new("");
    let b = fleet.spawn("b");
    let token = b.get(user("7200001")).await.unwrap();
    let looked = b.metric("boxbroker_l2_lookups_total", "").await;
    fleet.redis.signal("-STOP");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fleet.redis.signal("-CONT");
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.metric("boxbroker_l2_degraded", "").await == 0.0
        })
        .await
    );
    assert!(
        b.metric("boxbroker_l2_errors_total", "kind=\"timeout\"").await
            + b.metric("boxbroker_l2_errors_total", "kind=\"error\"").await
            >= 1.0,
        "the reads did fail"
    );
    assert_eq!(b.get(user("7200001")).await.unwrap(), token);
    assert_eq!(
        b.metric("boxbroker_l2_lookups_total", "").await,
        looked,
        "served from its own cache, not taken back from Redis"
    );
}

/// Two replicas asked at once to create the same App User on first use:
/// one POST to Box in all (each replica alone would POST once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_app_user_is_created_once_for_the_fleet() {
    let fleet = Fleet::new("");
    allow_external_ids(&fleet);
    let (a, b) = (fleet.spawn("a"), fleet.spawn("b"));
    // Both hold the Service Account's token, and Box's users API is slow:
    // each replica's look would miss the other's POST under way.
    assert_eq!(a.get(enterprise()).await.unwrap(), b.get(enterprise()).await.unwrap());
    let slow = reqwest::Client::new()
        .post(format!("{}/_fake/latency", fleet.fake_url))
        .json(&serde_json::json!({"millis": 300, "endpoint": "users"}))
        .send()
        .await
        .unwrap();
    assert!(slow.status().is_success());
    let clients = [a.client().await, b.client().await];
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..40 {
        let mut client = clients[i % 2].clone();
        calls.spawn(async move {
            client
                .get_token(crate::common::provisioning("auth0|new-portal-user", "New Portal User"))
                .await
                .map(|r| token_of(&r.into_inner()))
        });
    }
    let mut tokens = std::collections::HashSet::new();
    while let Some(done) = calls.join_next().await {
        tokens.insert(done.unwrap().expect("every request is served"));
    }
    assert_eq!(fleet.stat("users_created").await, 1);
    assert_eq!(fleet.stat("user_create_requests").await, 1, "one POST for the fleet");
    assert_eq!(tokens.len(), 1, "and one token, shared");
}

/// The passwords in [`Fleet::with_sentinels`]: the data nodes' and the
/// Sentinels' default users (replication, the Sentinels, the test), and the
/// brokers' ACL users on each.
const DATA_PASSWORD: &str = "data-pw-4d1c";
const SENTINEL_PASSWORD: &str = "sentinel-pw-90be";
const BROKER_DATA_PASSWORD: &str = "broker-pw-5e21";
const BROKER_SENTINEL_PASSWORD: &str = "broker-sentinel-pw-77a0";

/// README.md's ACL for the broker's user on the Sentinels (PASSWORD replaced).
const SENTINEL_ACL_RULES: &str =
    "box-broker on >PASSWORD resetchannels -@all +@connection +sentinel|masters +role +subscribe &+switch-master";

impl Fleet {
    /// A fleet whose Redis is a master (`redis`), a replica of it
    /// (`others[0]`) and two Sentinels watching them (`others[1..]`; quorum
    /// 1, a master down after 1 s for the first), each with a password; the
    /// brokers find the master through the Sentinels, as ACL users with only
    /// the commands README.md lists on either.
    async fn with_sentinels(extra: &str) -> Self {
        let acl = format!("{ACL_RULES} +role").replace("PASSWORD", BROKER_DATA_PASSWORD);
        // One argument per word: redis-server joins an option's arguments.
        let mut auth = vec![
            "--masterauth",
            DATA_PASSWORD,
            "--user",
            "default",
            "on",
            &format!(">{DATA_PASSWORD}"),
            "~*",
            "&*",
            "+@all",
            "--user",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        auth.extend(acl.split_whitespace().map(str::to_owned));
        let master = RedisServer::with_port_args(|_| auth.clone());
        let master_port = master.port;
        let replica = RedisServer::with_port_args(|_| {
            let mut args = auth.clone();
            args.extend([
                "--replicaof".to_owned(),
                "127.0.0.1".to_owned(),
                master_port.to_string(),
            ]);
            args
        });
        let mut fleet = Self::with_redis(extra, master);
        fleet.others.push(replica);
        for i in 0..2 {
            let conf = fleet.dir.path().join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "requirepass {SENTINEL_PASSWORD}\nuser {}\nsentinel monitor box 127.0.0.1 {master_port} 1\nsentinel auth-pass box {DATA_PASSWORD}\nsentinel down-after-milliseconds box {}\nsentinel failover-timeout box 3000\n",
                    SENTINEL_ACL_RULES.replace("PASSWORD", BROKER_SENTINEL_PASSWORD),
                    // The first sees a dead master first and asks the other's
                    // vote (two candidates at once would split the votes).
                    1000 * (1 + 4 * i)
                ),
            )
            .unwrap();
            fleet.others.push(RedisServer::with_conf(&conf, &["--sentinel"]));
        }
        for (file, password) in [
            ("redis-pw", BROKER_DATA_PASSWORD),
            ("sentinel-pw", BROKER_SENTINEL_PASSWORD),
        ] {
            let path = fleet.dir.path().join(file);
            std::fs::write(&path, format!("{password}\n")).unwrap();
            set_mode(&path, 0o400);
        }
        let sentinels: Vec<String> = fleet.others[1..]
            .iter()
            .map(|s| format!("\"redis://127.0.0.1:{}\"", s.port))
            .collect();
        fleet.server = Some(format!(
            "sentinels = [{}]\nmaster_name = \"box\"\nusername = \"box-broker\"\npassword_file = \"redis-pw\"\nsentinel_username = \"box-broker\"\nsentinel_password_file = \"sentinel-pw\"",
            sentinels.join(", ")
        ));
        // Ready for a failover: every Sentinel knows the other and a replica in sync.
        assert!(
            eventually(Duration::from_secs(20), || async {
                let mut ready = true;
                for i in 0..2 {
                    let others = fleet.sentinel(i, "SENTINELS").await.len();
                    let replicas = fleet.sentinel(i, "REPLICAS").await;
                    ready &= others == 1 && replicas.iter().any(in_sync);
                }
                ready
            })
            .await,
            "the Sentinels did not find each other and the replica"
        );
        fleet
    }

    /// Sentinel `i`'s `SENTINEL <what> box` (SENTINELS, REPLICAS): one map per instance.
    async fn sentinel(&self, i: usize, what: &str) -> Vec<std::collections::HashMap<String, String>> {
        let url = format!("redis://:{SENTINEL_PASSWORD}@127.0.0.1:{}", self.others[1 + i].port);
        let mut conn = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        redis::cmd("SENTINEL")
            .arg(what)
            .arg("box")
            .query_async(&mut conn)
            .await
            .unwrap_or_default()
    }
}

/// A replica the Sentinels could promote: up, and in sync with its master.
fn in_sync(replica: &std::collections::HashMap<String, String>) -> bool {
    let flags = replica.get("flags").map_or("", String::as_str);
    flags.contains("slave")
        && !flags.contains("down")
        && !flags.contains("disconnected")
        && replica.get("master-link-status").is_some_and(|s| s == "ok")
}

/// The Redis a replica uses and how often its master changed (GetStatus).
async fn redis_in_use(member: &Member) -> (String, u64) {
    let status = member.status().await.redis.expect("GetStatus shows the Redis state");
    (status.server, status.master_switches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fleet_follows_sentinel_failovers_under_load_and_loses_no_invalidation() {
    let mut fleet = Fleet::with_sentinels("").await;
    let (a, b) = (fleet.spawn("a"), fleet.spawn("b"));
    let master = format!("127.0.0.1:{}", fleet.redis.port);
    let replica = format!("127.0.0.1:{}", fleet.others[0].port);
    // The replicas share through the master the Sentinels name.
    let shared = a.get(user("7200003")).await.unwrap();
    let minted = fleet.stat("jwt_issued").await;
    assert_eq!(b.get(user("7200003")).await.unwrap(), shared);
    assert_eq!(fleet.stat("jwt_issued").await, minted, "B minted nothing");
    assert_eq!(redis_in_use(&a).await, (master.clone(), 0));
    let load = Load::start(&[&a, &b]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // An invalidation the old master takes but never passes on (its replica
    // is frozen and cut off), then the master dies.
    fleet.others[0].signal("-STOP");
    let mut old_master = redis::Client::open(format!("redis://:{DATA_PASSWORD}@127.0.0.1:{}", fleet.redis.port))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let cut: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .query_async(&mut old_master)
        .await
        .unwrap();
    assert_eq!(cut, 1);
    assert!(invalidate(&a, None).await >= 1);
    fleet.redis.stop();
    fleet.others[0].signal("-CONT");

    // The Sentinels promote the replica, and both brokers follow it.
    for member in [&a, &b] {
        assert!(
            eventually(Duration::from_secs(30), || async {
                redis_in_use(member).await == (replica.clone(), 1)
            })
            .await,
            "{:?}",
            redis_in_use(member).await
        );
    }
    // A sends its invalidation again: B drops its copy, and a broker started
    // now finds no copy in the new master.
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.get(user("7200003")).await.unwrap() != shared
        })
        .await,
        "B still serves the invalidated token"
    );
    let c = fleet.spawn("c");
    assert_ne!(
        c.get(user("7200003")).await.unwrap(),
        shared,
        "the new master still held it"
    );
    assert_eq!(a.metric("boxbroker_l2_master_switches_total", "").await, 1.0);

    // The old master returns as a replica of the new one, then a forced
    // failover makes it the master again: the fleet follows. (A's log so
    // far is set aside: what follows is the second failover's.)
    while a.proc.stderr.try_recv().is_ok() {}
    fleet.redis.args.extend([
        "--replicaof".to_owned(),
        "127.0.0.1".to_owned(),
        fleet.others[0].port.to_string(),
    ]);
    fleet.redis.restart();
    let url = format!("redis://:{SENTINEL_PASSWORD}@127.0.0.1:{}", fleet.others[1].port);
    let sentinel = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Refused (no good replica) until the Sentinel sees it in sync.
    assert!(
        eventually(Duration::from_secs(30), || {
            let mut sentinel = sentinel.clone();
            async move {
                let failover: redis::RedisResult<()> = redis::cmd("SENTINEL")
                    .arg("FAILOVER")
                    .arg("box")
                    .query_async(&mut sentinel)
                    .await;
                failover.is_ok()
            }
        })
        .await,
        "the Sentinel never took the old master for a replica in sync"
    );
    for member in [&a, &b, &c] {
        assert!(
            eventually(Duration::from_secs(30), || async {
                redis_in_use(member).await.0 == master
            })
            .await,
            "{:?}",
            redis_in_use(member).await
        );
    }
    // A Sentinel's announcement moved them, not a failed write: the old
    // master took writes until the Sentinels reconfigured it.
    let switched = a.logged("the Redis Sentinels name a new master", Duration::from_secs(5));
    assert!(
        switched.as_ref().is_some_and(|l| l.contains("a Sentinel announced it")),
        "{switched:?}"
    );
    let (served, failed) = load.stop().await;
    assert_eq!(failed, 0, "no request failed during the failovers");
    assert!(served > 100);

    // Sharing goes on through the new master, once A has sent its
    // invalidation again (an app's: it drops what is shared meanwhile).
    // (A resend that Redis cut short is finished by a later one.)
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut resent = None;
    while let Some(line) = a.logged(
        "sent this replica's invalidations",
        deadline.saturating_duration_since(Instant::now()),
    ) {
        if line.contains("\"left\":0") {
            resent = Some(line);
            break;
        }
    }
    assert!(
        resent.as_ref().is_some_and(|l| l.contains("\"failed\":0")),
        "{resent:?}"
    );
    // (The token itself, not Box's count: a replica may still mint a
    // Service Account token the resent invalidation dropped.)
    let token = a.get(user("7300001")).await.unwrap();
    assert_eq!(b.get(user("7300001")).await.unwrap(), token, "B serves A's token");
    assert_eq!(c.get(user("7300001")).await.unwrap(), token, "C serves A's token");
}

/// The first Sentinel listed is frozen (it accepts connections and never
/// answers): the brokers find the master through the second and share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_sentinel_does_not_keep_the_fleet_from_its_master() {
    let fleet = Fleet::with_sentinels("").await;
    fleet.others[1].signal("-STOP");
    let (a, b) = (fleet.spawn("a"), fleet.spawn("b"));
    let master = format!("127.0.0.1:{}", fleet.redis.port);
    assert!(
        eventually(Duration::from_secs(15), || async {
            redis_in_use(&a).await.0 == master
                && redis_in_use(&b).await.0 == master
                && a.metric("boxbroker_l2_degraded", "").await == 0.0
                && b.metric("boxbroker_l2_degraded", "").await == 0.0
        })
        .await,
        "{:?}",
        redis_in_use(&a).await
    );
    let token = a.get(user("7200001")).await.unwrap();
    assert_eq!(
        b.get(user("7200001")).await.unwrap(),
        token,
        "shared through the master the second Sentinel named"
    );
    assert_eq!(a.metric("boxbroker_l2_degraded", "").await, 0.0);
    fleet.others[1].signal("-CONT");
}
