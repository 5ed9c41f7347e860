//! The integration-test harness: a fake Box and a real broker on ephemeral
//! ports, sharing one manual clock, with a gRPC client connected.

pub mod node;
pub mod pki;
pub mod python;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use box_token_broker::{
    admin::{AdminRules, KeyAdmin},
    audit::AuditSink,
    auth::{Anonymous, Authenticator},
    boxapi::{
        AppCredentials, AuthMethod, BoxClient, BoxId, JwtAlgorithm, SigningKey, client::UpstreamPolicy,
        private_key::decode_private_key,
    },
    broker::{App, Broker},
    cache::CachePolicy,
    clock::{ManualClock, SharedClock},
    fakebox::{FakeAuth, FakeBox, FakeBoxServer, seed},
    keys::store::{Kek, KeyStore},
    pb::{
        self, broker_admin_service_client::BrokerAdminServiceClient,
        token_broker_service_client::TokenBrokerServiceClient,
    },
    policy::Policy,
    runtime::Runtime,
    service, telemetry,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    trace::v1::Span,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use rsa::RsaPrivateKey;
use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest as _, Sha256};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;
use tracing_subscriber::prelude::*;

/// Runs `command` to completion off the runtime: (success, stdout, stderr).
pub async fn output(mut command: std::process::Command) -> (bool, String, String) {
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The fixture directory.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

/// The fixture passphrase.
pub fn fixture_passphrase() -> SecretString {
    SecretString::from(std::fs::read_to_string(fixture("passphrase")).unwrap())
}

/// The base fixture key (tests/fixtures/keys/pkcs1.pem).
pub fn fixture_key() -> RsaPrivateKey {
    decode_private_key(&std::fs::read_to_string(fixture("pkcs1.pem")).unwrap(), None).unwrap()
}

/// How to set up a harness.
#[derive(Debug)]
pub struct Options {
    pub auth: FakeAuth,
    pub algorithm: JwtAlgorithm,
    pub cache: CachePolicy,
    pub allow_anonymous: bool,
    /// Extra app names configured with the same credentials.
    pub extra_apps: Vec<&'static str>,
    /// Overrides the client secret the broker is configured with.
    pub client_secret: Option<&'static str>,
    /// Overrides the enterprise id the broker is configured with.
    pub enterprise_id: Option<&'static str>,
    /// Overrides the api_base_url the broker is configured with.
    pub api_base_url: Option<String>,
    /// The policy; default: everything for the anonymous caller.
    pub policy: Option<Policy>,
    /// API keys as (identity, key).
    pub api_keys: Vec<(&'static str, &'static str)>,
    /// Accept Kubernetes service-account tokens verified this way.
    pub kubernetes: Option<box_token_broker::auth::kubernetes::KubernetesConfig>,
    /// Serve the admin RPC on a second listener, with a key store in a temp dir.
    pub admin: bool,
    /// Retries, deadline and circuit breaker; the default is `test_upstream()`.
    pub upstream: UpstreamPolicy,
    /// Drain, limits.
    pub serve: service::ServeOptions,
    /// Calls to Box in progress (the broker's default when `None`).
    pub budget: Option<box_token_broker::broker::UpstreamBudget>,
    /// The admin listener's rules (default: everything for `apikey:ops`).
    pub admin_rules: Option<AdminRules>,
    /// Serve `/metrics`, `/healthz` and `/readyz` on a free port too.
    pub metrics: bool,
    /// `[apps.*] refused_roles` (the default refuses admin and coadmin).
    pub refused_roles: Option<Vec<String>>,
}

/// The tests' upstream policy: the production shape with millisecond
/// backoff, so retries do not slow the suite.
pub fn test_upstream() -> UpstreamPolicy {
    UpstreamPolicy {
        backoff_base: Duration::from_millis(2),
        backoff_cap: Duration::from_millis(10),
        attempt_timeout: Duration::from_secs(2),
        deadline: Duration::from_secs(5),
        ..UpstreamPolicy::default()
    }
}

/// The admin API key the harness's admin listener accepts (identity `ops`).
pub const ADMIN_KEY: &str = "admin-key-0001";

/// The harness's admin side.
pub struct AdminSide {
    pub client: BrokerAdminServiceClient<Channel>,
    pub addr: std::net::SocketAddr,
    pub key_admin: Arc<KeyAdmin>,
    /// Holds the key store's directory for the harness's lifetime.
    pub _store_dir: tempfile::TempDir,
    pub store_path: PathBuf,
    pub kek: SecretString,
}

/// `message` with the admin API key attached.
pub fn admin_request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-api-key", ADMIN_KEY.parse().unwrap());
    request
}

impl Default for Options {
    fn default() -> Self {
        Self {
            auth: FakeAuth::Jwt,
            algorithm: JwtAlgorithm::RS256,
            cache: CachePolicy::default(),
            allow_anonymous: true,
            extra_apps: Vec::new(),
            client_secret: None,
            enterprise_id: None,
            api_base_url: None,
            policy: None,
            api_keys: Vec::new(),
            kubernetes: None,
            admin: false,
            upstream: test_upstream(),
            serve: service::ServeOptions::default(),
            budget: None,
            admin_rules: None,
            metrics: false,
            refused_roles: None,
        }
    }
}

/// A running fake Box + broker.
pub struct Harness {
    pub fake: FakeBox,
    pub fake_server: FakeBoxServer,
    pub app: seed::SeededApp,
    pub broker: Arc<Broker>,
    pub clock: Arc<ManualClock>,
    pub client: TokenBrokerServiceClient<Channel>,
    pub channel: Channel,
    /// The client listener's address.
    pub addr: std::net::SocketAddr,
    /// The audit records written so far (JSON lines).
    pub audit: Arc<Mutex<Vec<u8>>>,
    /// The admin listener, when `Options::admin`.
    pub admin: Option<AdminSide>,
    /// Where the server counts the client API's RPCs (for a metrics registry).
    pub rpc_metrics: box_token_broker::metrics::RpcMetrics,
    /// The metrics and probes listener, when `Options::metrics`.
    pub metrics: Option<std::net::SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl Harness {
    pub async fn start() -> Self {
        Self::with(Options::default()).await
    }

    pub async fn with(options: Options) -> Self {
        let clock = ManualClock::new();
        let shared: SharedClock = clock.clone();
        let fake = FakeBox::new(shared.clone());
        let key = fixture_key();
        let jwt = options.auth == FakeAuth::Jwt;
        let app = seed::seed(&fake, options.auth, jwt.then_some(&key));
        let fake_server = fake.clone().start().await.unwrap();
        let auth = if jwt {
            AuthMethod::Jwt {
                key: SigningKey::new(app.kid.clone(), &key).unwrap(),
                algorithm: options.algorithm,
            }
        } else {
            AuthMethod::Ccg
        };
        let credentials = AppCredentials {
            client_id: app.client_id.clone(),
            client_secret: SecretString::from(
                options
                    .client_secret
                    .map_or_else(|| app.client_secret.expose_secret().to_owned(), str::to_owned),
            ),
            enterprise_id: BoxId::parse(options.enterprise_id.unwrap_or(seed::ENTERPRISE_ID)).unwrap(),
            auth,
        };
        let base_url = options.api_base_url.clone().unwrap_or_else(|| fake_server.base_url());
        let mut apps = Vec::new();
        for name in std::iter::once("default").chain(options.extra_apps.iter().copied()) {
            let client = BoxClient::new(&base_url, shared.clone())
                .unwrap()
                .with_policy(options.upstream);
            let mut app = App::new(name, &credentials, client);
            if let Some(roles) = &options.refused_roles {
                app = app.with_refused_roles(roles.clone());
            }
            apps.push(app);
        }
        let policy = options
            .policy
            .clone()
            .unwrap_or_else(|| Policy::allow_everything("anonymous"));
        let mut broker = Broker::new(apps, shared, options.cache, policy);
        if let Some(budget) = options.budget {
            broker = broker.with_budget(budget);
        }
        let broker = Arc::new(broker);
        let (audit_sink, audit) = AuditSink::memory();
        let audit_sink = Arc::new(audit_sink);
        let keys = options
            .api_keys
            .iter()
            .map(|(identity, key)| ((*identity).to_owned(), <[u8; 32]>::from(Sha256::digest(key.as_bytes()))))
            .collect();
        let kubernetes = match options.kubernetes.clone() {
            Some(k8s) => Some(Arc::new(
                box_token_broker::auth::kubernetes::KubernetesAuth::new(k8s)
                    .await
                    .unwrap(),
            )),
            None => None,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut auth = Authenticator::new(Anonymous::admitted_if(options.allow_anonymous)).with_api_keys(keys);
        if let Some(k8s) = kubernetes {
            auth = auth.with_kubernetes(k8s);
        }
        let mut endpoints = vec![(service::Listener::Tcp(listener, auth), service::Role::Client)];
        let mut admin_side = None;
        if options.admin {
            let store_dir = tempfile::tempdir().unwrap();
            let store_path = store_dir.path().join("keys.json");
            let (kek, kek_text) = Kek::generate().unwrap();
            let key_admin =
                Arc::new(KeyAdmin::open(broker.clone(), Some(KeyStore::new(store_path.clone(), kek))).unwrap());
            let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let admin_addr = admin_listener.local_addr().unwrap();
            let admin_auth = Authenticator::new(Anonymous::Refused)
                .with_api_keys(vec![("ops".to_owned(), Sha256::digest(ADMIN_KEY.as_bytes()).into())]);
            endpoints.push((
                service::Listener::Tcp(admin_listener, admin_auth),
                service::Role::Admin(
                    key_admin.clone(),
                    options
                        .admin_rules
                        .clone()
                        .unwrap_or_else(|| AdminRules::allow_everything("apikey:ops")),
                ),
            ));
            admin_side = Some((admin_addr, key_admin, store_dir, store_path, kek_text));
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let metrics_listener = if options.metrics {
            Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
        } else {
            None
        };
        let metrics = metrics_listener.as_ref().map(|l| l.local_addr().unwrap());
        let server = tokio::spawn({
            let mut runtime = Runtime::new(broker.clone(), audit_sink).with_options(options.serve.clone());
            if let Some(listener) = metrics_listener {
                runtime = runtime.with_metrics(listener);
            }
            for (listener, role) in endpoints {
                runtime = runtime.listen(listener, role);
            }
            async move {
                runtime
                    .run(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            }
        });
        let admin = match admin_side {
            Some((addr, key_admin, store_dir, store_path, kek)) => Some(AdminSide {
                client: BrokerAdminServiceClient::new(
                    Channel::from_shared(format!("http://{addr}"))
                        .unwrap()
                        .connect()
                        .await
                        .unwrap(),
                ),
                addr,
                key_admin,
                _store_dir: store_dir,
                store_path,
                kek,
            }),
            None => None,
        };
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let client = TokenBrokerServiceClient::new(channel.clone());
        Self {
            fake,
            fake_server,
            app,
            broker,
            clock,
            client,
            channel,
            addr,
            audit,
            admin,
            rpc_metrics: options.serve.rpc_metrics.clone(),
            metrics,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Signals the broker to stop; the handle resolves once it has.
    pub fn begin_stop(&mut self) -> JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.server.take().unwrap()
    }

    /// Stops the broker at once, as a killed process stops: its listeners
    /// and connections close without a drain.
    pub fn kill(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }

    /// The audit records so far, parsed.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        audit_records(&self.audit)
    }

    pub async fn get(&self, request: pb::GetTokenRequest) -> Result<pb::GetTokenResponse, tonic::Status> {
        get_token(&self.client, request).await
    }

    /// Waits (without sleeping blindly) until the fake's stats satisfy `condition`.
    pub async fn wait_for(&self, condition: impl Fn(&box_token_broker::fakebox::Stats) -> bool) -> bool {
        self.fake.wait_for(Duration::from_secs(10), condition).await
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A request for the app's Service Account token.
pub fn enterprise() -> pb::GetTokenRequest {
    pb::GetTokenRequest {
        subject: Some(pb::Subject {
            kind: Some(pb::subject::Kind::Enterprise(pb::EnterpriseSubject {})),
            create_if_missing: None,
        }),
        ..Default::default()
    }
}

/// A request for the token of the user with external id `id`.
pub fn external(id: &str) -> pb::GetTokenRequest {
    pb::GetTokenRequest {
        subject: Some(pb::Subject {
            kind: Some(pb::subject::Kind::ExternalAppUserId(id.to_owned())),
            create_if_missing: None,
        }),
        ..Default::default()
    }
}

/// [`external`], creating the App User named `name` if Box has none.
pub fn provisioning(id: &str, name: &str) -> pb::GetTokenRequest {
    pb::GetTokenRequest {
        subject: Some(pb::Subject {
            kind: Some(pb::subject::Kind::ExternalAppUserId(id.to_owned())),
            create_if_missing: Some(pb::CreateAppUser { name: name.to_owned() }),
        }),
        ..Default::default()
    }
}

/// A request for a user's token.
pub fn user(id: &str) -> pb::GetTokenRequest {
    pb::GetTokenRequest {
        subject: Some(pb::Subject {
            kind: Some(pb::subject::Kind::UserId(id.to_owned())),
            create_if_missing: None,
        }),
        ..Default::default()
    }
}

/// The access token in a response.
pub fn token_of(response: &pb::GetTokenResponse) -> String {
    response.token.as_ref().unwrap().access_token.clone()
}

/// A protobuf duration of `secs` seconds.
pub fn secs(secs: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: secs,
        nanos: 0,
    })
}

/// Asserts a status's code and that its message contains `fragment`.
pub fn assert_status(status: &tonic::Status, code: tonic::Code, fragment: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(fragment),
        "{:?} should contain {fragment:?}",
        status.message()
    );
}

/// The `grpc-retry-pushback-ms` a status carries, in milliseconds.
pub fn pushback_ms(status: &tonic::Status) -> u64 {
    status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("a grpc-retry-pushback-ms")
        .to_str()
        .unwrap()
        .parse()
        .expect("milliseconds")
}

/// A `GetDownscopedTokenRequest` for `subject` with `scopes` and `target`.
pub fn downscope(
    subject: pb::GetTokenRequest,
    scopes: &[&str],
    target: Option<pb::get_downscoped_token_request::Target>,
) -> pb::GetDownscopedTokenRequest {
    pb::GetDownscopedTokenRequest {
        subject: subject.subject,
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        target,
        ..Default::default()
    }
}

/// A folder target.
pub fn folder(id: &str) -> Option<pb::get_downscoped_token_request::Target> {
    Some(pb::get_downscoped_token_request::Target::FolderId(id.to_owned()))
}

/// The audit records written to an in-memory sink, parsed.
pub fn audit_records(buffer: &Mutex<Vec<u8>>) -> Vec<serde_json::Value> {
    let text = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `GetToken` through `client` (a broker's or an edge's).
pub async fn get_token(
    client: &TokenBrokerServiceClient<Channel>,
    request: pb::GetTokenRequest,
) -> Result<pb::GetTokenResponse, tonic::Status> {
    client.clone().get_token(request).await.map(tonic::Response::into_inner)
}

/// `GetDownscopedToken` through `client`.
pub async fn get_downscoped(
    client: &TokenBrokerServiceClient<Channel>,
    request: pb::GetDownscopedTokenRequest,
) -> Result<pb::GetDownscopedTokenResponse, tonic::Status> {
    client
        .clone()
        .get_downscoped_token(request)
        .await
        .map(tonic::Response::into_inner)
}

/// A file target.
pub fn file(id: &str) -> Option<pb::get_downscoped_token_request::Target> {
    Some(pb::get_downscoped_token_request::Target::FileId(id.to_owned()))
}

impl Harness {
    pub async fn downscoped(
        &self,
        request: pb::GetDownscopedTokenRequest,
    ) -> Result<pb::GetDownscopedTokenResponse, tonic::Status> {
        get_downscoped(&self.client, request).await
    }

    pub async fn revoke(&self, token: &str) -> Result<pb::RevokeTokenResponse, tonic::Status> {
        let request = pb::RevokeTokenRequest {
            app: String::new(),
            access_token: token.to_owned(),
        };
        self.client
            .clone()
            .revoke_token(request)
            .await
            .map(tonic::Response::into_inner)
    }
}

/// A log writer that keeps everything written to it, for tests that scan logs.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// GenerateKey (2048 bits, the default app) on the harness's admin listener.
pub async fn try_generate_key(h: &Harness) -> Result<pb::GenerateKeyResponse, tonic::Status> {
    h.admin
        .as_ref()
        .unwrap()
        .client
        .clone()
        .generate_key(admin_request(pb::GenerateKeyRequest {
            app: String::new(),
            bits: 2048,
        }))
        .await
        .map(tonic::Response::into_inner)
}

/// [`try_generate_key`], which must succeed with a pending key (no kid yet).
pub async fn generate_key(h: &Harness) -> pb::GenerateKeyResponse {
    let generated = try_generate_key(h).await.unwrap();
    let key = generated.key.as_ref().unwrap();
    assert_eq!(key.state(), pb::KeyState::Pending);
    assert!(key.kid.is_empty(), "Box has not assigned a kid yet");
    generated
}

/// The base64 lines of the fixture private key's PEM, and its passphrase.
pub fn key_material() -> Vec<String> {
    let mut secrets: Vec<String> = std::fs::read_to_string(fixture("pkcs1.pem"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::to_owned)
        .collect();
    secrets.push(std::fs::read_to_string(fixture("passphrase")).unwrap());
    secrets
}

/// Fails if `text` holds any of `secrets`, or a signed assertion (a JWT:
/// base64 of `{"typ":...` or `{"alg":...`). `what` names the text.
pub fn assert_free_of(text: &str, secrets: &[String], what: &str) {
    for secret in secrets {
        assert!(!secret.is_empty());
        assert!(
            !text.contains(secret.as_str()),
            "{what} contains a secret ({} chars)",
            secret.len()
        );
    }
    assert!(
        !text.contains("eyJ0eXAi") && !text.contains("eyJhbGci"),
        "{what} contains a JWT"
    );
}

#[derive(Clone, Default)]
pub struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

pub struct Observed {
    pub logs: Captured,
    pub collector: Collector,
    pub provider: SdkTracerProvider,
}

/// The binary's one global subscriber: every log line (this crate at TRACE,
/// dependencies at INFO) into a buffer, and every span to an in-process OTLP
/// collector. Tests that scan logs or spans call this first; the collector
/// runs on its own runtime (a thread), so it outlives each test's runtime.
pub fn observed() -> &'static Observed {
    static OBSERVED: OnceLock<Observed> = OnceLock::new();
    OBSERVED.get_or_init(|| {
        let collector = Collector::default();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let serving = collector.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(serving))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                    .await
                    .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        let (provider, logs) = std::thread::spawn(move || {
            // The exporter's channel is built inside a runtime that stays up.
            let runtime = Box::leak(Box::new(tokio::runtime::Runtime::new().unwrap()));
            let provider =
                runtime.block_on(async { telemetry::otlp_provider(Some(&format!("http://{addr}"))).unwrap() });
            let logs = Captured::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::registry()
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(move || writer.clone())
                        .with_ansi(false)
                        .with_filter(tracing_subscriber::EnvFilter::new("box_token_broker=trace,info")),
                )
                .with(telemetry::otel_layer(&provider));
            tracing::subscriber::set_global_default(subscriber).unwrap();
            (provider, logs)
        })
        .join()
        .unwrap();
        Observed {
            logs,
            collector,
            provider,
        }
    })
}

/// Every span the collector has received (flushing the exporter first).
pub fn spans(o: &Observed) -> Vec<Span> {
    o.provider.force_flush().unwrap();
    o.collector
        .0
        .lock()
        .unwrap()
        .iter()
        .flat_map(|r| r.resource_spans.iter())
        .flat_map(|r| r.scope_spans.iter())
        .flat_map(|s| s.spans.iter().cloned())
        .collect()
}

/// Every log line of this test binary so far (see `observed`).
pub fn log_text() -> String {
    observed().logs.text()
}
