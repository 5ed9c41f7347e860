//! broker-bench: the broker's cost against a baseline, in one run.
//!
//! It starts the broker (anonymous caller, allow-everything policy, audit to
//! /dev/null) against the in-process fake Box, and a baseline gRPC server on
//! the same tonic stack that answers `TokenBrokerService` with constant
//! responses of the same size — no auth, policy, cache or audit. The same
//! client drives both with the same concurrency and duration, in slices that
//! alternate between them, and the broker/baseline ratios (throughput, p99,
//! CPU per request) are printed. Then: an edge sidecar in front of the
//! broker (its cached path against the same baseline, and the cost of an
//! edge miss: one hop to the broker's cache), cold mints, a stampede on one
//! key, three brokers sharing a Redis (a local hit's cost with Redis
//! configured, a stampede spread over them, an L2 hit's latency), and
//! memory per cached token. See BENCHMARKS.md.
//!
//! `cargo run --release --bin broker-bench` (about 3 minutes), or `-- --quick`
//! (under 60 s; a smoke test, not a measurement).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a benchmark tool: a setup failure is a bug to see at once, so it panics; its figures are floating-point by nature"
)]

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use box_token_broker::{
    audit::AuditSink,
    auth::{Anonymous, Authenticator},
    boxapi::{AppCredentials, AuthMethod, BoxClient, BoxId, BoxSubject, IssuedToken, JwtAlgorithm, SigningKey},
    broker::{App, Broker, UpstreamBudget},
    cache::{CachePolicy, CachedToken, Minter, Need, TokenCache, TokenKey, UpstreamError},
    clock::{SharedClock, SystemClock},
    edge::{
        Edge,
        central::{Central, CentralSettings},
    },
    fakebox::{FakeAuth, FakeBox, FakeBoxServer, FakeUser, UserKind, seed},
    keys::store::Kek,
    l2::Redis,
    pb::{
        self,
        token_broker_service_client::TokenBrokerServiceClient,
        token_broker_service_server::{TokenBrokerService, TokenBrokerServiceServer},
    },
    policy::Policy,
    runtime::Runtime,
    service::{Listener, Role},
};
use clap::Parser;
use futures_util::{FutureExt as _, future::BoxFuture};
use secrecy::SecretString;
use tonic::transport::Channel;

/// Measures the broker against a baseline gRPC server.
#[derive(Debug, Parser)]
#[command(name = "broker-bench")]
struct Args {
    /// A short smoke run (under 60 s): small sizes, 2 s per load scenario.
    #[arg(long)]
    quick: bool,
    /// Seconds per load scenario.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the client spreads them over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Only the cached single-key `GetToken` against the baseline (for profiling).
    #[arg(long)]
    cached_only: bool,
    /// Each load scenario runs in this many slices, alternating broker and
    /// baseline, so both see the same machine (drift and noise) over the run.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Only the memory-per-token measurement.
    #[arg(long)]
    memory_only: bool,
    /// Only the cached `GetDownscopedToken` against its baseline (for profiling).
    #[arg(long)]
    downscoped_only: bool,
    /// Only an edge sidecar's cached single-key `GetToken` against the baseline (for profiling).
    #[arg(long)]
    edge_only: bool,
    /// Only the cached `GetToken` of 1,000 users (each checked with Box once,
    /// then served from the cache) against the baseline (for profiling).
    #[arg(long)]
    users_only: bool,
    /// Only the fleet scenarios: three brokers sharing a Redis (needs
    /// `redis-server` on PATH; the benchmark starts its own).
    #[arg(long)]
    fleet_only: bool,
    /// Only a broker with Redis configured: its cached single-key
    /// `GetToken` against the baseline (for profiling: compare with
    /// `--cached-only`; a local hit must not touch Redis).
    #[arg(long)]
    fleet_cached_only: bool,
}

/// One load run's results.
struct Run {
    requests: usize,
    errors: usize,
    seconds: f64,
    /// CPU time the whole process (client and servers) used during the run.
    cpu_seconds: Option<f64>,
    /// Sorted, nanoseconds.
    latencies: Vec<u64>,
}

impl Run {
    fn empty() -> Self {
        Self {
            requests: 0,
            errors: 0,
            seconds: 0.0,
            cpu_seconds: Some(0.0),
            latencies: Vec::new(),
        }
    }

    /// Adds another slice of the same scenario.
    fn merge(&mut self, slice: Self) {
        self.requests += slice.requests;
        self.errors += slice.errors;
        self.seconds += slice.seconds;
        self.cpu_seconds = self.cpu_seconds.zip(slice.cpu_seconds).map(|(a, b)| a + b);
        self.latencies.extend(slice.latencies);
        self.latencies.sort_unstable();
    }

    fn throughput(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    /// CPU microseconds per request (client and server together).
    fn cpu_per_request(&self) -> Option<f64> {
        self.cpu_seconds.map(|cpu| cpu * 1e6 / self.requests.max(1) as f64)
    }

    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        Duration::from_nanos(self.latencies[rank.clamp(1, self.latencies.len()) - 1])
    }
}

fn micros(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn print_header() {
    println!(
        "{:<44} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>10}",
        "scenario", "req/s", "p50 µs", "p90 µs", "p99 µs", "p99.9", "errors", "CPU µs/req"
    );
}

fn print_run(name: &str, run: &Run) {
    println!(
        "{:<44} {:>10.0} {:>8} {:>8} {:>8} {:>8} {:>7} {:>10}",
        name,
        run.throughput(),
        micros(run.percentile(50.0)),
        micros(run.percentile(90.0)),
        micros(run.percentile(99.0)),
        micros(run.percentile(99.9)),
        run.errors,
        run.cpu_per_request()
            .map_or_else(|| "-".to_owned(), |c| format!("{c:.1}"))
    );
}

fn print_ratio(name: &str, broker: &Run, baseline: &Run) {
    let p99 = broker.percentile(99.0).as_secs_f64() / baseline.percentile(99.0).as_secs_f64().max(1e-9);
    let cpu = broker
        .cpu_per_request()
        .zip(baseline.cpu_per_request())
        .map_or_else(String::new, |(b, base)| {
            format!(", CPU per request {:.2}x", b / base.max(1e-9))
        });
    println!(
        "{:<44} throughput {:.2}x baseline (target >= 0.90), p99 {:.2}x baseline (target <= 1.25){cpu}",
        name,
        broker.throughput() / baseline.throughput().max(1e-9),
        p99
    );
}

/// Drives `concurrency` loops of `call` for `duration` over `channels`.
/// The two servers' channels and how to load them.
struct Servers<'a> {
    baseline: &'a [Channel],
    broker: &'a [Channel],
    /// What `broker` is: "broker", or "edge" for the sidecar in front of it.
    label: &'static str,
    concurrency: usize,
    slice: Duration,
    rounds: u32,
}

impl Servers<'_> {
    /// One scenario alone on both servers, in alternating slices; prints both
    /// runs and the ratios. `names`: the baseline's and the broker's scenario.
    async fn versus<F, Fut>(&self, names: [&str; 2], call: F)
    where
        F: Fn(TokenBrokerServiceClient<Channel>, usize) -> Fut + Send + Sync + 'static + Clone,
        Fut: Future<Output = bool> + Send,
    {
        print_header();
        let (mut base, mut broker) = (Run::empty(), Run::empty());
        for _ in 0..self.rounds {
            base.merge(drive(self.baseline, self.concurrency, self.slice, call.clone()).await);
            broker.merge(drive(self.broker, self.concurrency, self.slice, call.clone()).await);
        }
        print_run(&format!("baseline {}", names[0]), &base);
        print_run(&format!("{} {}", self.label, names[1]), &broker);
        print_ratio(
            &format!(
                "{} cached {}:",
                self.label,
                names[1].split(',').next().unwrap_or_default()
            ),
            &broker,
            &base,
        );
    }
}

async fn drive<F, Fut>(channels: &[Channel], concurrency: usize, duration: Duration, call: F) -> Run
where
    F: Fn(TokenBrokerServiceClient<Channel>, usize) -> Fut + Send + Sync + 'static + Clone,
    Fut: Future<Output = bool> + Send,
{
    let started = Instant::now();
    let cpu_before = cpu_seconds();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let client = TokenBrokerServiceClient::new(channels[worker % channels.len()].clone());
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(100_000);
            let mut errors = 0;
            let mut i = worker;
            while Instant::now() < deadline {
                let sent = Instant::now();
                if !call(client.clone(), i).await {
                    errors += 1;
                }
                latencies.push(u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX));
                i += concurrency;
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        if let Ok((l, e)) = task.await {
            latencies.extend(l);
            errors += e;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = cpu_before.zip(cpu_seconds()).map(|(before, after)| after - before);
    latencies.sort_unstable();
    Run {
        requests: latencies.len(),
        errors,
        seconds,
        cpu_seconds,
        latencies,
    }
}

fn enterprise() -> Option<pb::Subject> {
    Some(pb::Subject {
        kind: Some(pb::subject::Kind::Enterprise(pb::EnterpriseSubject {})),
        create_if_missing: None,
    })
}

fn user(id: &str) -> Option<pb::Subject> {
    Some(pb::Subject {
        kind: Some(pb::subject::Kind::UserId(id.to_owned())),
        create_if_missing: None,
    })
}

fn bench_user(i: usize) -> String {
    format!("73{i:08}")
}

fn downscope_request() -> pb::GetDownscopedTokenRequest {
    pb::GetDownscopedTokenRequest {
        app: String::new(),
        subject: enterprise(),
        scopes: vec!["item_preview".to_owned()],
        target: Some(pb::get_downscoped_token_request::Target::FolderId(
            seed::SERVICE_ACCOUNT_FOLDER_ID.to_owned(),
        )),
        min_ttl: None,
    }
}

/// The baseline: the same service on the same stack, answering constants.
#[derive(Debug, Clone)]
struct Baseline {
    token: pb::GetTokenResponse,
    downscoped: pb::GetDownscopedTokenResponse,
}

#[tonic::async_trait]
impl TokenBrokerService for Baseline {
    async fn get_token(
        &self,
        _: tonic::Request<pb::GetTokenRequest>,
    ) -> Result<tonic::Response<pb::GetTokenResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.token.clone()))
    }

    async fn get_downscoped_token(
        &self,
        _: tonic::Request<pb::GetDownscopedTokenRequest>,
    ) -> Result<tonic::Response<pb::GetDownscopedTokenResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.downscoped.clone()))
    }

    async fn revoke_token(
        &self,
        _: tonic::Request<pb::RevokeTokenRequest>,
    ) -> Result<tonic::Response<pb::RevokeTokenResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::RevokeTokenResponse {}))
    }
}

async fn channels(addr: std::net::SocketAddr, n: usize) -> Vec<Channel> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("a valid address")
            .connect()
            .await
            .expect("the server is up");
        channels.push(channel);
    }
    channels
}

/// CPU time this process has used so far, user and system, all threads
/// (Linux: /proc/self/stat, in USER_HZ = 100 ticks per second).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces: count from the last ')'.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    // Field 3 (the state) comes first; utime and stime are fields 14 and 15.
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Resident set size of this process, in bytes (Linux).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Mints instantly, for filling a cache without Box.
struct InstantMinter;

impl Minter for InstantMinter {
    fn mint(&self, _: &TokenKey) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>> {
        async {
            let now = box_token_broker::clock::system_now();
            Ok(IssuedToken {
                access_token: SecretString::from(box_token_broker::boxapi::assertion::new_jti()[..32].to_owned()),
                expires_at: now + Duration::from_secs(3600),
                issued_at: now,
                token_type: "bearer".to_owned(),
                request_id: None,
                restricted_to: Vec::new(),
            })
        }
        .boxed()
    }

    fn exchange(&self, key: &TokenKey, _: Arc<CachedToken>) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>> {
        self.mint(key)
    }
}

/// RSS growth per cached user token, filling a cache of `n` tokens.
async fn memory_per_token(n: usize) -> Option<f64> {
    let cache = TokenCache::new(
        Arc::new(InstantMinter),
        Arc::new(SystemClock),
        CachePolicy {
            max_entries: u64::try_from(n).unwrap_or(u64::MAX) + 1,
            ..CachePolicy::default()
        },
    );
    let app: Arc<str> = Arc::from("default");
    let before = rss_bytes()?;
    for i in 0..n {
        let key = TokenKey {
            app: app.clone(),
            subject: BoxSubject::User(BoxId::parse(&bench_user(i)).ok()?),
            downscope: None,
            caller: None,
            external: None,
        };
        cache.get(&key, Need::default()).await.ok()?;
    }
    cache.count().await;
    let after = rss_bytes()?;
    let per = (after.saturating_sub(before)) as f64 / n as f64;
    drop(cache);
    Some(per)
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(run(args));
}

/// The servers every load scenario drives, and the fake Box behind the broker.
struct Bench {
    fake: FakeBox,
    fake_server: FakeBoxServer,
    /// The dev app's client id, and its signing key.
    client_id: String,
    key: rsa::RsaPrivateKey,
    /// The app's credentials (for more brokers against the same fake Box).
    credentials: AppCredentials,
    broker: Vec<Channel>,
    baseline: Vec<Channel>,
    /// An edge sidecar in front of the broker.
    edge: Vec<Channel>,
    /// The edge's counters of its calls to the broker.
    edge_state: Arc<Edge>,
    concurrency: usize,
    /// How many distinct users the many-users scenario asks for.
    users: usize,
}

impl Bench {
    /// Both servers, side by side, in alternating slices.
    fn servers(&self, slice: Duration, rounds: u32) -> Servers<'_> {
        Servers {
            baseline: &self.baseline,
            broker: &self.broker,
            label: "broker",
            concurrency: self.concurrency,
            slice,
            rounds,
        }
    }

    /// The edge and the baseline, side by side, in alternating slices.
    fn edge_servers(&self, slice: Duration, rounds: u32) -> Servers<'_> {
        Servers {
            broker: &self.edge,
            label: "edge",
            ..self.servers(slice, rounds)
        }
    }
}

/// `GetToken` for the Service Account (one cache key).
async fn get_enterprise(mut c: TokenBrokerServiceClient<Channel>, _: usize) -> bool {
    c.get_token(pb::GetTokenRequest {
        subject: enterprise(),
        ..Default::default()
    })
    .await
    .is_ok()
}

/// `GetToken` for bench user `i` (one cache key per user).
async fn get_user(mut c: TokenBrokerServiceClient<Channel>, i: usize) -> bool {
    c.get_token(pb::GetTokenRequest {
        subject: user(&bench_user(i)),
        ..Default::default()
    })
    .await
    .is_ok()
}

/// `GetDownscopedToken` of the Service Account's token (one cache key).
async fn get_downscoped(mut c: TokenBrokerServiceClient<Channel>, _: usize) -> bool {
    c.get_downscoped_token(downscope_request()).await.is_ok()
}

/// `GetToken` with `force_refresh`: a mint per request.
async fn get_forced(mut c: TokenBrokerServiceClient<Channel>, _: usize) -> bool {
    c.get_token(pb::GetTokenRequest {
        subject: enterprise(),
        force_refresh: true,
        ..Default::default()
    })
    .await
    .is_ok()
}

/// The fake Box with `users` (+1 for the stampede) bench users, the broker
/// (the production server) against it and the constant-answer baseline,
/// both warmed up.
async fn setup(connections: usize, concurrency: usize, users: usize) -> Bench {
    let clock: SharedClock = Arc::new(SystemClock);
    let fake = FakeBox::new(clock.clone());
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("a key");
    let seeded = seed::seed(&fake, FakeAuth::Jwt, Some(&key));
    // (One more for the fleet's stampede.)
    for i in 0..=users + 1 {
        fake.add_user(FakeUser {
            id: bench_user(i),
            name: format!("Bench User {i}"),
            login: format!("bench{i}@example.com"),
            enterprise_id: seed::ENTERPRISE_ID.to_owned(),
            kind: UserKind::Managed,
            role: "user".to_owned(),
            status: "active".to_owned(),
            external_app_user_id: None,
        });
    }
    let fake_server = fake.clone().start().await.expect("the fake Box starts");
    let credentials = AppCredentials {
        client_id: seeded.client_id.clone(),
        client_secret: seeded.client_secret.clone(),
        enterprise_id: BoxId::parse(seed::ENTERPRISE_ID).expect("an id"),
        auth: AuthMethod::Jwt {
            key: SigningKey::new(seeded.kid.clone(), &key).expect("a signing key"),
            algorithm: JwtAlgorithm::RS256,
        },
    };
    let broker_addr = serve_broker(bench_broker(&fake_server, &credentials)).await;
    let broker_channels = channels(broker_addr, connections).await;
    let baseline_channels = baseline(&broker_channels, connections).await;
    let (edge_state, edge_addr) = edge(broker_addr).await;
    let edge_channels = channels(edge_addr, connections).await;
    // Warm up the servers and their connections.
    for channels in [&baseline_channels, &broker_channels, &edge_channels] {
        drive(channels, concurrency, Duration::from_millis(500), get_enterprise).await;
    }
    Bench {
        fake,
        fake_server,
        client_id: seeded.client_id,
        key,
        credentials,
        broker: broker_channels,
        baseline: baseline_channels,
        edge: edge_channels,
        edge_state,
        concurrency,
        users,
    }
}

/// A broker of the bench's app against `fake`: allow-everything policy, a
/// large cache, no force-refresh interval (the cold-mint scenario forces a
/// mint on every request), an unbounded budget.
fn bench_broker(fake: &FakeBoxServer, credentials: &AppCredentials) -> Broker {
    let clock: SharedClock = Arc::new(SystemClock);
    let client = BoxClient::new(&fake.base_url(), clock.clone()).expect("a client");
    Broker::new(
        vec![App::new("default", credentials, client)],
        clock,
        CachePolicy {
            max_entries: 2_000_000,
            force_refresh_interval: Duration::ZERO,
            ..CachePolicy::default()
        },
        Policy::allow_everything("anonymous"),
    )
    .with_budget(UpstreamBudget::new(1_000_000, 1_000_000))
}

/// Serves `broker` (the production server, anonymous callers, audit to
/// /dev/null) on a free port: its address.
async fn serve_broker(broker: Broker) -> std::net::SocketAddr {
    let audit = Arc::new(AuditSink::file(std::path::Path::new("/dev/null")).expect("/dev/null"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(
        Runtime::new(Arc::new(broker), audit)
            .listen(
                Listener::Tcp(listener, Authenticator::new(Anonymous::Admitted)),
                Role::Client,
            )
            .run(std::future::pending()),
    );
    addr
}

/// A `redis-server` on a free port (no persistence), killed on drop.
struct RedisProcess {
    child: std::process::Child,
    url: String,
}

impl RedisProcess {
    /// `None` when `redis-server` is not on PATH.
    fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Self {
            child,
            url: format!("redis://127.0.0.1:{port}/0"),
        })
    }

    /// A shared store on it, sealing with `kek` (the defaults of `[redis]`).
    fn store(&self, kek: &Kek) -> Redis {
        Redis::new(
            box_token_broker::l2::Settings {
                namespace: "bench".to_owned(),
                ..box_token_broker::l2::Settings::with_defaults(self.url.clone())
            },
            kek,
        )
        .expect("a Redis client")
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three brokers sharing one Redis (`[redis]`), against the same fake Box:
/// what a local hit costs with Redis configured (against the plain broker,
/// in alternating slices), Box calls for a cold stampede spread over the
/// three, and an L2 hit's latency against an L1 hit's (in the cache).
async fn fleet_scenarios(bench: &Bench, slice: Duration, rounds: u32, herd: usize) {
    let Some(redis) = RedisProcess::start() else {
        println!("fleet: skipped (no redis-server on PATH)");
        return;
    };
    let (kek, _) = Kek::generate().expect("a KEK");
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(fleet_replica(bench, &redis, &kek).await);
    }
    println!();
    Servers {
        baseline: &bench.broker,
        broker: &replicas[0],
        label: "fleet",
        concurrency: bench.concurrency,
        slice,
        rounds,
    }
    .versus(
        [
            "broker GetToken, cached, 1 key (no Redis)",
            "GetToken, cached, 1 key (Redis configured)",
        ],
        get_enterprise,
    )
    .await;
    println!("(the \"baseline\" above is the broker without Redis: a local hit must not touch Redis, target 1.00x)");

    // A cold stampede on one user, spread over the three replicas (their
    // Service Account tokens are warm: only the user's token is cold).
    let before = bench.fake.stats();
    let servers: Vec<&[Channel]> = replicas.iter().map(Vec::as_slice).collect();
    let served = herd_on(&servers, &bench_user(bench.users + 1), herd).await;
    let after = bench.fake.stats();
    println!(
        "fleet stampede: {herd} concurrent cold requests for one key over 3 replicas -> {} call(s) to /oauth2/token, {served} served (target: exactly 1); {} user check(s) (one per replica)",
        after.token_arrivals - before.token_arrivals,
        after.user_reads - before.user_reads,
    );
    l2_latency(&redis, &kek, if herd >= 1_000 { 2_000 } else { 500 }).await;
}

/// A broker of the fleet (`[redis]` on `redis`, sealing with `kek`),
/// served and warmed up: its channels.
async fn fleet_replica(bench: &Bench, redis: &RedisProcess, kek: &Kek) -> Vec<Channel> {
    let broker = bench_broker(&bench.fake_server, &bench.credentials).with_fleet(redis.store(kek));
    let replica = channels(serve_broker(broker).await, bench.broker.len()).await;
    drive(&replica, bench.concurrency, Duration::from_millis(500), get_enterprise).await;
    replica
}

/// In the cache: `n` tokens minted through cache A (and written to Redis);
/// then each asked of cache B once (an L2 hit: a Redis read and an
/// AES-GCM open) and again (an L1 hit).
async fn l2_latency(redis: &RedisProcess, kek: &Kek, n: usize) {
    let cache = |store: Redis| {
        let cache = TokenCache::new(Arc::new(InstantMinter), Arc::new(SystemClock), CachePolicy::default());
        cache.share_with(Arc::new(store));
        cache
    };
    let (writer, reader) = (redis.store(kek), redis.store(kek));
    let (a, b) = (cache(writer.clone()), cache(reader.clone()));
    let app: Arc<str> = Arc::from("l2-latency");
    let keys: Vec<TokenKey> = (0..n)
        .map(|i| {
            TokenKey::full(
                app.clone(),
                BoxSubject::User(BoxId::parse(&bench_user(i)).expect("an id")),
            )
        })
        .collect();
    for key in &keys {
        a.get(key, Need::default()).await.expect("minted");
    }
    let started = Instant::now();
    while writer.counters().writes.load(std::sync::atomic::Ordering::Relaxed) < n as u64
        && started.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let timed = || async {
        let mut run = Run::empty();
        for key in &keys {
            let sent = Instant::now();
            let lookup = b.get(key, Need::default()).await;
            run.latencies
                .push(u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX));
            run.requests += 1;
            run.errors += usize::from(lookup.is_err());
        }
        run.latencies.sort_unstable();
        run
    };
    let l2_hits = || reader.counters().hits.load(std::sync::atomic::Ordering::Relaxed);
    let l2 = timed().await;
    let from_redis = l2_hits();
    let l1 = timed().await;
    let p = |run: &Run, q: f64| micros(run.percentile(q));
    println!(
        "L2 hit (TokenCache::get, one key at a time, {n} keys): p50 {} µs, p99 {} µs ({from_redis} of {n} from Redis); L1 hit: p50 {} µs, p99 {} µs ({} more Redis reads: expected 0)",
        p(&l2, 50.0),
        p(&l2, 99.0),
        p(&l1, 50.0),
        p(&l1, 99.0),
        l2_hits() - from_redis
    );
}

/// An edge sidecar (the production assembly: `Runtime::edge`) whose
/// central broker is at `central`, audit to /dev/null: it and its address.
async fn edge(central: std::net::SocketAddr) -> (Arc<Edge>, std::net::SocketAddr) {
    let clock: SharedClock = Arc::new(SystemClock);
    let settings = CentralSettings::plaintext(&[central]);
    let central = Central::new(settings, clock.clone()).await.expect("the edge's client");
    let edge = Arc::new(Edge::new(
        central,
        clock,
        CachePolicy {
            max_entries: 2_000_000,
            ..CachePolicy::default()
        },
    ));
    let audit = Arc::new(AuditSink::file(std::path::Path::new("/dev/null")).expect("/dev/null"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(
        Runtime::edge(edge.clone(), audit)
            .listen(
                Listener::Tcp(listener, Authenticator::new(Anonymous::Admitted)),
                Role::Client,
            )
            .run(std::future::pending()),
    );
    (edge, addr)
}

/// One request for each of `users` bench users through `channels`,
/// `concurrency` at a time (each user once: through a cold edge, every one
/// is a local miss).
async fn each_user_once(channels: &[Channel], concurrency: usize, users: usize) -> Run {
    let started = Instant::now();
    let cpu_before = cpu_seconds();
    let mut tasks = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let client = TokenBrokerServiceClient::new(channels[worker % channels.len()].clone());
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0);
            for i in (worker..users).step_by(concurrency) {
                let sent = Instant::now();
                if !get_user(client.clone(), i).await {
                    errors += 1;
                }
                latencies.push(u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX));
            }
            (latencies, errors)
        }));
    }
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for task in tasks {
        if let Ok((l, e)) = task.await {
            latencies.extend(l);
            errors += e;
        }
    }
    latencies.sort_unstable();
    Run {
        requests: latencies.len(),
        errors,
        seconds: started.elapsed().as_secs_f64(),
        cpu_seconds: cpu_before.zip(cpu_seconds()).map(|(before, after)| after - before),
        latencies,
    }
}

/// The edge's cached path against the baseline, and the cost of an edge
/// miss (one hop to a central broker's cache hit) beside the central
/// broker's own hit for the same users. Run after `warm_users`.
async fn edge_scenarios(bench: &Bench, slice: Duration, rounds: u32) {
    let upstream_before = bench.fake.stats();
    bench
        .edge_servers(slice, rounds)
        .versus(["GetToken (constant)", "GetToken, cached, 1 key"], get_enterprise)
        .await;
    let answers = |edge: &Edge| -> u64 { edge.central().counters.answers().iter().map(|(_, _, n)| n).sum() };
    let asked = answers(&bench.edge_state);
    let misses = each_user_once(&bench.edge, bench.concurrency, bench.users).await;
    let direct = each_user_once(&bench.broker, bench.concurrency, bench.users).await;
    println!();
    print_header();
    print_run(&format!("edge GetToken, {} users, each a miss", bench.users), &misses);
    print_run(
        &format!("broker GetToken, the same {} users, cached", bench.users),
        &direct,
    );
    println!(
        "edge miss (one hop to a central hit): p50 {} µs, p99 {} µs; the central's own hit: p50 {} µs, p99 {} µs; {} calls to the central broker, {} to Box (expected {} and 0)",
        micros(misses.percentile(50.0)),
        micros(misses.percentile(99.0)),
        micros(direct.percentile(50.0)),
        micros(direct.percentile(99.0)),
        answers(&bench.edge_state) - asked,
        bench.fake.stats().token_arrivals - upstream_before.token_arrivals,
        bench.users,
    );
}

/// The baseline server, answering constant responses the size of the
/// broker's (captured from it through `broker`).
async fn baseline(broker: &[Channel], connections: usize) -> Vec<Channel> {
    let mut probe = TokenBrokerServiceClient::new(broker[0].clone());
    let token = probe
        .get_token(pb::GetTokenRequest {
            subject: enterprise(),
            ..Default::default()
        })
        .await
        .expect("the broker serves")
        .into_inner();
    let downscoped = probe
        .get_downscoped_token(downscope_request())
        .await
        .expect("the broker downscopes")
        .into_inner();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TokenBrokerServiceServer::new(Baseline { token, downscoped }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    channels(addr, connections).await
}

/// Mints every bench user's token once, so the many-users scenario is
/// served from the cache; how long that took.
async fn warm_users(bench: &Bench) -> f64 {
    let started = Instant::now();
    let mut warm = Vec::new();
    let users: Vec<usize> = (0..bench.users).collect();
    for chunk in users.chunks(bench.users.div_ceil(bench.concurrency)) {
        let channel = bench.broker[warm.len() % bench.broker.len()].clone();
        let chunk = chunk.to_vec();
        warm.push(tokio::spawn(async move {
            for i in chunk {
                get_user(TokenBrokerServiceClient::new(channel.clone()), i).await;
            }
        }));
    }
    for w in warm {
        let _ = w.await;
    }
    started.elapsed().as_secs_f64()
}

/// The three cached scenarios against their baselines, in alternating
/// slices; also checks that none of them reached Box.
async fn cached_scenarios(bench: &Bench, slice: Duration, rounds: u32) {
    let users = bench.users;
    let get_many = move |c, i: usize| get_user(c, i % users);
    let (baseline, broker, concurrency) = (&bench.baseline, &bench.broker, bench.concurrency);
    let upstream_before = bench.fake.stats();
    let (mut base, mut one) = (Run::empty(), Run::empty());
    let (mut base_many, mut many) = (Run::empty(), Run::empty());
    let (mut base_down, mut down) = (Run::empty(), Run::empty());
    for _ in 0..rounds {
        base.merge(drive(baseline, concurrency, slice, get_enterprise).await);
        one.merge(drive(broker, concurrency, slice, get_enterprise).await);
        // The same user requests to the baseline: the client's cost of
        // naming a user is in both runs.
        base_many.merge(drive(baseline, concurrency, slice, get_many).await);
        many.merge(drive(broker, concurrency, slice, get_many).await);
        base_down.merge(drive(baseline, concurrency, slice, get_downscoped).await);
        down.merge(drive(broker, concurrency, slice, get_downscoped).await);
    }
    print_run("baseline GetToken (constant)", &base);
    print_run("broker GetToken, cached, 1 key", &one);
    print_run(&format!("baseline GetToken, {users} user requests"), &base_many);
    print_run(&format!("broker GetToken, cached, {users} users"), &many);
    print_run("baseline GetDownscopedToken (constant)", &base_down);
    print_run("broker GetDownscopedToken, cached", &down);
    let upstream_after = bench.fake.stats();
    println!();
    print_ratio("cached GetToken, 1 key:", &one, &base);
    print_ratio(&format!("cached GetToken, {users} users:"), &many, &base_many);
    print_ratio("cached GetDownscopedToken:", &down, &base_down);
    println!(
        "calls to Box during the cached scenarios: {} to /oauth2/token, {} of them token exchanges (all served from the cache: expected 0)",
        upstream_after.token_arrivals - upstream_before.token_arrivals,
        upstream_after.exchange_requests - upstream_before.exchange_requests,
    );
}

/// `force_refresh` on every request for `duration`: each one mints.
async fn cold_mints(bench: &Bench, duration: Duration, warm_secs: f64) {
    let arrivals = bench.fake.stats().token_arrivals;
    let cold = drive(&bench.broker, bench.concurrency, duration, get_forced).await;
    print_run("broker GetToken, force_refresh (cold mint)", &cold);
    let mints = bench.fake.stats().token_arrivals - arrivals;
    println!(
        "cold mints: {:.0} mints/s reached the fake Box ({mints} in {:.1} s; RSA-2048 signing + the fake's verification); warming {} users took {warm_secs:.1} s",
        mints as f64 / cold.seconds,
        cold.seconds,
        bench.users
    );
}

/// `herd` concurrent requests for `subject`'s token, spread over the
/// servers of `servers` (and their connections): how many were served.
async fn herd_on(servers: &[&[Channel]], subject: &str, herd: usize) -> usize {
    let mut calls = Vec::with_capacity(herd);
    for i in 0..herd {
        let channels = servers[i % servers.len()];
        let mut client = TokenBrokerServiceClient::new(channels[i % channels.len()].clone());
        let subject = subject.to_owned();
        calls.push(tokio::spawn(async move {
            client
                .get_token(pb::GetTokenRequest {
                    subject: user(&subject),
                    ..Default::default()
                })
                .await
                .is_ok()
        }));
    }
    let mut served = 0;
    for call in calls {
        if call.await.unwrap_or(false) {
            served += 1;
        }
    }
    served
}

/// `herd` concurrent cold requests for one key: how many reached Box.
async fn stampede(bench: &Bench, herd: usize) {
    let arrivals = bench.fake.stats().token_arrivals;
    let served = herd_on(&[&bench.broker], &bench_user(bench.users), herd).await;
    println!(
        "stampede: {herd} concurrent cold requests for one key -> {} upstream call(s), {served} served (target: exactly 1 call)",
        bench.fake.stats().token_arrivals - arrivals
    );
}

/// Signing `n` assertions in a loop, alone (criterion has the careful
/// figure: `cargo bench --bench signing`).
fn signing(bench: &Bench, n: u32) {
    let signing = SigningKey::new("bench", &bench.key).expect("a signing key");
    let claims = box_token_broker::boxapi::assertion::Claims::new(
        &bench.client_id,
        &BoxSubject::Enterprise(BoxId::parse(seed::ENTERPRISE_ID).expect("an id")),
        box_token_broker::clock::system_now(),
    );
    let started = Instant::now();
    for _ in 0..n {
        let _ = box_token_broker::boxapi::assertion::sign(&claims, &signing, JwtAlgorithm::RS256);
    }
    println!(
        "assertion signing (RS256, 2048-bit): {:.0} µs each ({n} in a loop, one core)",
        started.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    );
}

/// The scenarios `args` asks for, in order.
async fn run(args: Args) {
    let duration = Duration::from_secs(if args.quick { 2 } else { args.duration_secs });
    let one_scenario = args.cached_only
        || args.downscoped_only
        || args.edge_only
        || args.users_only
        || args.fleet_only
        || args.fleet_cached_only;
    let users = if args.quick || one_scenario { 1_000 } else { 10_000 };
    let memory_tokens = if args.quick { 100_000 } else { 1_000_000 };
    let rounds = if args.quick { 2 } else { args.rounds.max(1) };
    let slice = duration / rounds;
    if args.memory_only {
        report_memory(memory_tokens).await;
        return;
    }
    println!(
        "broker-bench: {} s per load scenario in {rounds} slices alternating with the others, concurrency {} over {} connections{}",
        duration.as_secs(),
        args.concurrency,
        args.connections,
        if args.quick {
            " (--quick: a smoke run, not a measurement)"
        } else {
            ""
        }
    );
    println!(
        "machine: {} CPUs, {}",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        std::env::consts::ARCH
    );
    let bench = setup(args.connections, args.concurrency, users).await;
    if args.edge_only {
        bench
            .edge_servers(slice, rounds)
            .versus(["GetToken (constant)", "GetToken, cached, 1 key"], get_enterprise)
            .await;
        return;
    }
    if args.cached_only {
        bench
            .servers(slice, rounds)
            .versus(["GetToken (constant)", "GetToken, cached, 1 key"], get_enterprise)
            .await;
        return;
    }
    if args.fleet_only {
        fleet_scenarios(&bench, slice, rounds, 1_000).await;
        return;
    }
    if args.fleet_cached_only {
        let Some(redis) = RedisProcess::start() else {
            println!("fleet: skipped (no redis-server on PATH)");
            return;
        };
        let (kek, _) = Kek::generate().expect("a KEK");
        let replica = fleet_replica(&bench, &redis, &kek).await;
        Servers {
            broker: &replica,
            label: "fleet",
            ..bench.servers(slice, rounds)
        }
        .versus(
            ["GetToken (constant)", "GetToken, cached, 1 key (Redis configured)"],
            get_enterprise,
        )
        .await;
        return;
    }
    if args.users_only {
        warm_users(&bench).await;
        let users = bench.users;
        bench
            .servers(slice, rounds)
            .versus(
                ["GetToken (constant)", &format!("GetToken, cached, {users} users")],
                move |c, i| get_user(c, i % users),
            )
            .await;
        return;
    }
    if args.downscoped_only {
        drive(
            &bench.broker,
            bench.concurrency,
            Duration::from_millis(500),
            get_downscoped,
        )
        .await;
        bench
            .servers(slice, rounds)
            .versus(
                ["GetDownscopedToken (constant)", "GetDownscopedToken, cached"],
                get_downscoped,
            )
            .await;
        return;
    }
    let warm_secs = warm_users(&bench).await;
    println!();
    print_header();
    cached_scenarios(&bench, slice, rounds).await;
    edge_scenarios(&bench, slice, rounds).await;
    cold_mints(&bench, duration, warm_secs).await;
    stampede(&bench, 1_000).await;
    fleet_scenarios(&bench, slice, rounds, 1_000).await;
    signing(&bench, if args.quick { 200 } else { 2_000 });
    report_memory(memory_tokens).await;
    bench.fake_server.stop().await;
}

async fn report_memory(tokens: usize) {
    match memory_per_token(tokens).await {
        Some(per) => println!("memory: {per:.0} bytes of RSS per cached user token ({tokens} tokens; target <= 400)"),
        None => println!("memory: RSS is not readable here (/proc/self/statm)"),
    }
}
