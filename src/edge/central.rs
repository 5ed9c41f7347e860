//! The edge's client of the central broker: its endpoints (every address a
//! name resolves to is one), TLS and the pod's credential, and per call:
//! failover across endpoints, retries with full-jitter backoff inside one
//! deadline, a circuit breaker per endpoint, the request id and the W3C
//! `traceparent` passed on.
//!
//! An answer is the central broker's when it succeeded or carries the
//! broker's `google.rpc.ErrorInfo` (every refusal of its gate and handlers
//! does): that one is final and relayed unchanged. Anything else (a refused
//! connection, a reset stream, a proxy's own 503, no answer within the
//! attempt timeout, the attempt's own deadline passing at the central
//! broker) is a failed hop: retried elsewhere, counted against the address.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rand::Rng as _;
use secrecy::{ExposeSecret as _, SecretString};
use tonic::{
    Code, Status,
    metadata::{AsciiMetadataValue, MetadataMap},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{
    boxapi::client::{CircuitState, UpstreamPolicy},
    clock::SharedClock,
    histogram::LatencyHistogram,
    pb::token_broker_service_client::TokenBrokerServiceClient,
    rpc::{REQUEST_ID_HEADER, RequestId, Rpc},
};

/// gRPC status codes 0 (Ok) to 16 (Unauthenticated).
const CODES: usize = 17;

/// One configured endpoint of the central broker: `https://host:port` (or
/// `http://`, for a loopback or a mesh that encrypts for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CentralEndpoint {
    /// TLS or not.
    pub https: bool,
    /// The DNS name (or address) to resolve; also the TLS server name.
    pub host: String,
    /// The port.
    pub port: u16,
}

impl CentralEndpoint {
    /// Parses `https://host:port` or `http://host:port` (the port is required).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (https, rest) = if let Some(rest) = text.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!("{text:?} must start with https:// (or http://)"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = rest
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty())
            .ok_or_else(|| {
                format!("{text:?} must name a host and a port, as https://box-broker.box-broker.svc:50051")
            })?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{text:?}: the port must be a number from 1 to 65535"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.contains('/') || host.contains('@') {
            return Err(format!("{text:?} must be only a scheme, a host and a port"));
        }
        Ok(Self {
            https,
            host: host.to_owned(),
            port,
        })
    }

    /// Whether the host is a loopback address or `localhost`.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for CentralEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// The TLS the edge speaks to the central broker.
#[derive(Clone)]
pub struct CentralTls {
    /// The CA the central broker's certificate chains to (PEM).
    pub ca_pem: Vec<u8>,
    /// The pod's client certificate and key (PEM), for mTLS.
    pub identity: Option<(Vec<u8>, zeroize::Zeroizing<Vec<u8>>)>,
    /// The name the central broker's certificate must carry, when not the endpoint's host.
    pub server_name: Option<String>,
}

impl fmt::Debug for CentralTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CentralTls")
            .field("client_certificate", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl CentralTls {
    /// Checks the PEM it holds: certificates in the CA, a certificate
    /// chain and a private key in the identity. An error names the setting
    /// (`ca_file`, `cert_file`, `key_file`) and the problem, so a bad file
    /// stops startup instead of failing every handshake.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        let certificates = |pem: &[u8]| -> Result<(), String> {
            let found = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("not PEM certificates: {e}"))?;
            if found.is_empty() {
                return Err("holds no PEM certificate".to_owned());
            }
            Ok(())
        };
        certificates(&self.ca_pem).map_err(|problem| ("ca_file", problem))?;
        if let Some((cert, key)) = &self.identity {
            certificates(cert).map_err(|problem| ("cert_file", problem))?;
            PrivateKeyDer::from_pem_slice(key).map_err(|e| ("key_file", format!("not a PEM private key: {e}")))?;
        }
        Ok(())
    }
}

/// How the edge proves the pod's identity to the central broker (besides,
/// or instead of, a client certificate).
#[derive(Debug)]
pub enum Credential {
    /// Nothing but the connection (a client certificate, or nothing).
    Connection,
    /// A (projected) Kubernetes service-account token, sent as
    /// `authorization: Bearer`; re-read whenever the file changes.
    ServiceAccountToken(SecretFile),
    /// An API key, sent as `x-api-key`; re-read whenever the file changes.
    ApiKey(SecretFile),
}

impl Credential {
    /// The header and value to send, read from the file if it changed.
    fn header(&self) -> Result<Option<(&'static str, AsciiMetadataValue)>, String> {
        let (name, file) = match self {
            Self::Connection => return Ok(None),
            Self::ServiceAccountToken(file) => ("authorization", file),
            Self::ApiKey(file) => ("x-api-key", file),
        };
        let secret = file.current()?;
        let text = if name == "authorization" {
            format!("Bearer {}", secret.expose_secret())
        } else {
            secret.expose_secret().to_owned()
        };
        let mut value = AsciiMetadataValue::try_from(text)
            .map_err(|_| format!("{}: holds characters a header cannot carry", file.path.display()))?;
        value.set_sensitive(true);
        Ok(Some((name, value)))
    }
}

/// A file holding one secret (a token, a key), re-read when it changes:
/// the kubelet replaces a projected token by swapping a symlink, so its
/// inode, size or modification time change.
pub struct SecretFile {
    path: PathBuf,
    held: Mutex<Option<(FileStamp, SecretString)>>,
}

impl fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl SecretFile {
    /// The file at `path`, read now (so a missing or empty file stops startup).
    pub fn open(path: &Path) -> Result<Self, String> {
        let file = Self {
            path: path.to_owned(),
            held: Mutex::new(None),
        };
        file.current()?;
        Ok(file)
    }

    /// The secret the file holds now (trimmed); read again only if it changed.
    pub fn current(&self) -> Result<SecretString, String> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(&self.path).map_err(|e| format!("{}: cannot read: {e}", self.path.display()))?;
        let stamp = FileStamp {
            inode: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
        };
        let mut held = self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((seen, secret)) = held.as_ref()
            && *seen == stamp
        {
            return Ok(secret.clone());
        }
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(&self.path).map_err(|e| format!("{}: cannot read: {e}", self.path.display()))?,
        );
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(format!("{}: is empty", self.path.display()));
        }
        let secret = SecretString::from(trimmed.to_owned());
        *held = Some((stamp, secret.clone()));
        Ok(secret)
    }
}

/// Where the central broker is and how the edge reaches it.
#[derive(Debug)]
pub struct CentralSettings {
    /// The endpoints, tried in turn.
    pub endpoints: Vec<CentralEndpoint>,
    /// TLS for `https://` endpoints.
    pub tls: Option<CentralTls>,
    /// The pod's credential.
    pub credential: Credential,
    /// Attempts, backoff, timeouts and the circuit breaker.
    pub policy: UpstreamPolicy,
    /// How often the endpoints' names are resolved again.
    pub resolve_interval: Duration,
}

impl CentralSettings {
    /// Plain-text endpoints at `addresses` (loopback: `dev --edge`, the
    /// benchmark, tests), with the edge's default policy and no credential
    /// but the connection.
    pub fn plaintext(addresses: &[SocketAddr]) -> Self {
        Self {
            endpoints: addresses
                .iter()
                .map(|a| CentralEndpoint {
                    https: false,
                    host: a.ip().to_string(),
                    port: a.port(),
                })
                .collect(),
            tls: None,
            credential: Credential::Connection,
            policy: default_policy(),
            resolve_interval: Duration::from_secs(30),
        }
    }
}

/// One address of one endpoint, with its connection and circuit.
struct Target {
    endpoint: Arc<CentralEndpoint>,
    address: SocketAddr,
    label: Arc<str>,
    channel: Channel,
    circuit: Mutex<Circuit>,
}

/// How an attempt at an address went, for its circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    /// The central broker answered (a success or its own refusal).
    Answered,
    /// No answer in time (the attempt's timeout, or the central broker's
    /// own deadline): tried elsewhere, but not counted against the address
    /// (a slow Box behind it is not a dead central broker).
    Slow,
    /// Refused, reset, unreachable, or a proxy's failure.
    Failed,
}

/// An endpoint's circuit: closed (asked), open (skipped until a time),
/// half-open (one probe after that time).
#[derive(Debug, Default)]
struct Circuit {
    consecutive_failures: u32,
    open_until: Option<SystemTime>,
    probing: bool,
}

impl Circuit {
    /// Lets an attempt through: `Some(true)` for the one probe of a
    /// half-open circuit, `Some(false)` while closed, `None` while open.
    fn admit(&mut self, now: SystemTime) -> Option<bool> {
        match self.open_until {
            None => Some(false),
            Some(until) if until > now => None,
            Some(_) if self.probing => None,
            Some(_) => {
                self.probing = true;
                Some(true)
            }
        }
    }

    /// Records an attempt's outcome (`probe`: it was the half-open probe);
    /// true when this opened the circuit.
    fn settle(&mut self, outcome: Hop, probe: bool, now: SystemTime, policy: &UpstreamPolicy) -> bool {
        if probe {
            self.probing = false;
        }
        match outcome {
            Hop::Answered => {
                *self = Self::default();
                false
            }
            // Slow is not down: another address is tried, nothing counted.
            Hop::Slow => false,
            Hop::Failed => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                if probe || self.consecutive_failures >= policy.breaker_threshold {
                    // Failures of attempts already in flight while open change nothing.
                    let was_open = self.open_until.is_some_and(|until| until > now);
                    self.open_until = Some(now.checked_add(policy.breaker_cooldown).unwrap_or(now));
                    return !was_open;
                }
                false
            }
        }
    }

    fn state(&self, now: SystemTime) -> CircuitState {
        match self.open_until {
            None => CircuitState::Closed,
            Some(_) if self.probing => CircuitState::HalfOpen,
            Some(until) if until > now => CircuitState::Open,
            Some(_) => CircuitState::HalfOpen,
        }
    }
}

/// An attempt admitted by its address's circuit. Settled with the
/// attempt's outcome; dropped unsettled (the call was cancelled: its
/// caller's deadline passed, or it went away), it releases a half-open
/// probe so the next call may probe instead, without counting an outcome.
struct Admitted<'a> {
    target: &'a Target,
    /// The half-open circuit's one probe.
    probe: bool,
    settled: bool,
}

impl<'a> Admitted<'a> {
    fn claim(target: &'a Target, now: SystemTime) -> Option<Self> {
        let probe = target
            .circuit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .admit(now)?;
        Some(Self {
            target,
            probe,
            settled: false,
        })
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if self.probe && !self.settled {
            self.target
                .circuit
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .probing = false;
        }
    }
}

/// The longest a connection to an address may take to open: an address
/// that drops packets is failed over from this soon, whatever the attempt
/// timeout (which must outlast a slow Box behind the central broker).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The edge's defaults for its calls to the central broker: as toward Box,
/// except that an attempt outlasts the central broker's own deadline toward
/// Box (10 s by default; a slow Box is not a dead central broker) and the
/// call's deadline leaves room for a failover after one such attempt, under
/// the 30 s request timeout.
pub fn default_policy() -> UpstreamPolicy {
    UpstreamPolicy {
        attempt_timeout: Duration::from_secs(11),
        deadline: Duration::from_secs(25),
        ..UpstreamPolicy::default()
    }
}

/// The least time left for an attempt to be worth starting.
const MIN_ATTEMPT: Duration = Duration::from_millis(50);

/// Whether `status` is a broker's own answer: it carries the broker's
/// `google.rpc.ErrorInfo` (a proxy's or the transport's failure does not,
/// even if it echoes the request id).
fn answered(status: &Status) -> bool {
    use tonic_types::StatusExt as _;
    status
        .get_error_details()
        .error_info()
        .is_some_and(|info| info.domain == crate::rpc::ERROR_DOMAIN)
}

/// What the edge counts of its calls to the central broker (read by the metrics).
#[derive(Debug, Default)]
pub struct CentralCounters {
    /// Answers by method and gRPC code (the central broker's own codes).
    answers: [[AtomicU64; CODES]; Rpc::CLIENT.len()],
    /// Attempts that got no answer from a central broker (by method).
    unreachable: [AtomicU64; Rpc::CLIENT.len()],
    /// Calls that failed for good without an answer (by method).
    gave_up: [AtomicU64; Rpc::CLIENT.len()],
    /// Attempts after the first in a call.
    pub retries: AtomicU64,
    /// Times an endpoint's circuit opened.
    pub circuit_opened: AtomicU64,
    /// Failed resolutions of the endpoints' names.
    pub resolve_failures: AtomicU64,
    /// Latency of answered attempts.
    pub duration: LatencyHistogram,
}

impl CentralCounters {
    /// (method, code, count) for every answer counted.
    pub fn answers(&self) -> Vec<(Rpc, Code, u64)> {
        let mut out = Vec::new();
        for (rpc, codes) in Rpc::CLIENT.iter().zip(&self.answers) {
            for (code, count) in codes.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    out.push((*rpc, Code::from(i32::try_from(code).unwrap_or(2)), count));
                }
            }
        }
        out
    }

    /// (method, attempts without an answer, calls given up).
    pub fn failures(&self) -> Vec<(Rpc, u64, u64)> {
        Rpc::CLIENT
            .iter()
            .zip(self.unreachable.iter().zip(&self.gave_up))
            .map(|(rpc, (unreachable, gave_up))| {
                (
                    *rpc,
                    unreachable.load(Ordering::Relaxed),
                    gave_up.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    fn answered(&self, rpc: Rpc, code: Code, took: Duration) {
        if let Some(i) = rpc.client_index() {
            let code = usize::try_from(i32::from(code)).unwrap_or(2).min(CODES - 1);
            self.answers[i][code].fetch_add(1, Ordering::Relaxed);
        }
        self.duration.observe(took);
    }
}

/// Why a call got no answer of the central broker's.
#[derive(Debug, Clone)]
pub struct Unreachable(pub String);

/// The central broker, as the edge calls it.
pub struct Central {
    settings: CentralSettings,
    targets: ArcSwap<Vec<Arc<Target>>>,
    /// The address calls start at: the one that answered last.
    current: AtomicUsize,
    clock: SharedClock,
    /// What the calls did.
    pub counters: CentralCounters,
}

impl fmt::Debug for Central {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Central")
            .field("endpoints", &self.settings.endpoints)
            .field("targets", &self.targets.load().len())
            .finish_non_exhaustive()
    }
}

/// A short description of a failed attempt (tonic's message and its causes:
/// no request content, no credential).
fn hop_problem(status: &Status) -> String {
    let mut text = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = e.source();
    }
    text.chars().filter(|c| !c.is_control()).take(300).collect()
}

impl Central {
    /// A client of the central broker; resolves the endpoints' names now
    /// (a name that does not resolve yet is tried again on the next call).
    pub async fn new(settings: CentralSettings, clock: SharedClock) -> Result<Arc<Self>, String> {
        let central = Arc::new(Self {
            settings,
            targets: ArcSwap::from_pointee(Vec::new()),
            // Edges spread over the replicas from the start.
            current: AtomicUsize::new(rand::random::<u16>().into()),
            clock,
            counters: CentralCounters::default(),
        });
        // Bad TLS material fails here, before any name resolves.
        if let Some(endpoint) = central.settings.endpoints.first() {
            central.channel(endpoint, SocketAddr::from(([127, 0, 0, 1], endpoint.port)))?;
        }
        if let Err(problem) = central.resolve().await {
            tracing::warn!(problem = %problem, "the central broker's endpoints do not resolve yet; trying again on each call");
        }
        Ok(central)
    }

    /// Resolves the endpoints again every `resolve_interval`, until dropped
    /// (the task holds only a weak reference).
    pub fn spawn_resolver(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let every = self.settings.resolve_interval;
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(central) = weak.upgrade() else { return };
                if let Err(problem) = central.resolve().await {
                    tracing::warn!(problem = %problem, "resolving the central broker's endpoints failed; keeping the known addresses");
                }
            }
        })
    }

    /// Resolves the endpoints now (`check-config`): an error names those
    /// that did not resolve when none did.
    pub async fn resolve_now(&self) -> Result<(), String> {
        self.resolve().await
    }

    /// Each endpoint's addresses and circuit state (for metrics).
    pub fn circuits(&self) -> Vec<(Arc<str>, CircuitState)> {
        let now = self.clock.now();
        self.targets
            .load()
            .iter()
            .map(|t| {
                let state = t
                    .circuit
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .state(now);
                (t.label.clone(), state)
            })
            .collect()
    }

    fn channel(&self, endpoint: &CentralEndpoint, address: SocketAddr) -> Result<Channel, String> {
        let scheme = if endpoint.https { "https" } else { "http" };
        let policy = &self.settings.policy;
        let mut built = Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|e| format!("{endpoint}: {e}"))?
            .connect_timeout(policy.attempt_timeout.min(CONNECT_TIMEOUT))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if endpoint.https {
            let tls = self
                .settings
                .tls
                .as_ref()
                .ok_or_else(|| format!("{endpoint}: an https endpoint needs [central] ca_file"))?;
            let mut config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&tls.ca_pem))
                .domain_name(tls.server_name.clone().unwrap_or_else(|| endpoint.host.clone()));
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(Identity::from_pem(cert, key.as_slice()));
            }
            built = built.tls_config(config).map_err(|e| format!("{endpoint}: TLS: {e}"))?;
        }
        Ok(built.connect_lazy())
    }

    /// Resolves every endpoint; keeps the connections of addresses still
    /// found. Errors (and keeps the known addresses) when nothing resolves.
    async fn resolve(&self) -> Result<(), String> {
        let old = self.targets.load_full();
        let mut fresh: Vec<Arc<Target>> = Vec::new();
        let mut problems = Vec::new();
        for endpoint in &self.settings.endpoints {
            let found = match tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port)).await {
                Ok(found) => found,
                Err(e) => {
                    problems.push(format!("{endpoint}: {e}"));
                    continue;
                }
            };
            let endpoint = Arc::new(endpoint.clone());
            for address in found {
                if fresh.iter().any(|t| t.address == address && *t.endpoint == *endpoint) {
                    continue;
                }
                if let Some(known) = old.iter().find(|t| t.address == address && *t.endpoint == *endpoint) {
                    fresh.push(known.clone());
                    continue;
                }
                let channel = self.channel(&endpoint, address)?;
                fresh.push(Arc::new(Target {
                    label: Arc::from(format!("{}:{} ({address})", endpoint.host, endpoint.port)),
                    endpoint: endpoint.clone(),
                    address,
                    channel,
                    circuit: Mutex::new(Circuit::default()),
                }));
            }
        }
        if fresh.is_empty() {
            self.counters.resolve_failures.fetch_add(1, Ordering::Relaxed);
            return Err(if problems.is_empty() {
                "no endpoint resolved to an address".to_owned()
            } else {
                problems.join("; ")
            });
        }
        if fresh.len() != old.len() || fresh.iter().zip(old.iter()).any(|(a, b)| !Arc::ptr_eq(a, b)) {
            tracing::info!(
                addresses = fresh.iter().map(|t| t.label.to_string()).collect::<Vec<_>>().join(", "),
                "the central broker's addresses"
            );
        }
        self.targets.store(Arc::new(fresh));
        Ok(())
    }

    /// The request's metadata: the pod's credential, the request id, the trace context.
    fn metadata(&self, request_id: Option<RequestId>) -> Result<MetadataMap, String> {
        let mut metadata = MetadataMap::new();
        if let Some((name, value)) = self.settings.credential.header()? {
            metadata.insert(name, value);
        }
        if let Some(id) = request_id
            && let Ok(value) = AsciiMetadataValue::try_from(id.as_str())
        {
            metadata.insert(REQUEST_ID_HEADER, value);
        }
        for (name, value) in trace_context() {
            if let (Ok(key), Ok(value)) = (
                tonic::metadata::AsciiMetadataKey::from_bytes(name.as_bytes()),
                AsciiMetadataValue::try_from(value),
            ) {
                metadata.insert(key, value);
            }
        }
        Ok(metadata)
    }

    /// Calls `rpc` (`send` makes one attempt on a client) until the central
    /// broker answers: `Ok` with its response or its refusal, or
    /// [`Unreachable`] once attempts, the deadline or every circuit ran out.
    pub async fn call<M, R, F, Fut>(
        &self,
        rpc: Rpc,
        message: M,
        request_id: Option<RequestId>,
        send: F,
    ) -> Result<Result<R, Status>, Unreachable>
    where
        M: Clone,
        F: Fn(TokenBrokerServiceClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        use tracing::Instrument as _;
        let index = rpc.client_index().unwrap_or(0);
        // The central broker's span is this one's child (`traceparent`).
        let span = tracing::info_span!("central.call", rpc = rpc.name(), outcome = tracing::field::Empty);
        let result = self
            .attempts(rpc, message, request_id, send)
            .instrument(span.clone())
            .await;
        match &result {
            Ok(Ok(_)) => span.record("outcome", "OK"),
            Ok(Err(status)) => span.record("outcome", crate::rpc::code_name(status.code())),
            Err(_) => {
                self.counters.gave_up[index].fetch_add(1, Ordering::Relaxed);
                span.record("outcome", "unreachable")
            }
        };
        result
    }

    async fn attempts<M, R, F, Fut>(
        &self,
        rpc: Rpc,
        message: M,
        request_id: Option<RequestId>,
        send: F,
    ) -> Result<Result<R, Status>, Unreachable>
    where
        M: Clone,
        F: Fn(TokenBrokerServiceClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let policy = self.settings.policy;
        let index = rpc.client_index().unwrap_or(0);
        let started = tokio::time::Instant::now();
        let deadline = started + policy.deadline;
        let metadata = self.metadata(request_id).map_err(|problem| {
            Unreachable(format!(
                "the edge cannot present the pod's credential to the central broker: {problem}"
            ))
        })?;
        if self.targets.load().is_empty() {
            let resolved = tokio::time::timeout(policy.deadline, self.resolve())
                .await
                .unwrap_or_else(|_| Err("resolving took longer than the deadline".to_owned()));
            if let Err(problem) = resolved {
                return Err(Unreachable(format!(
                    "the central broker cannot be reached: its endpoints do not resolve ({problem})"
                )));
            }
        }
        let mut attempts = 0u32;
        let mut last = String::new();
        let mut round = 0u32;
        loop {
            let targets = self.targets.load_full();
            // The address that answered last first: central replicas keep
            // their own caches (until they share one), so one edge asking
            // one replica mints once per key and revokes where it was served.
            let first = self.current.load(Ordering::Relaxed);
            let mut admitted_any = false;
            for i in 0..targets.len() {
                let target = &targets[(first + i) % targets.len()];
                // The budget first: an address admitted (a half-open probe
                // claimed) is always settled or released.
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                if remaining < MIN_ATTEMPT || attempts >= policy.max_attempts {
                    return Err(self.gave_up(attempts, &targets, &last, started));
                }
                let Some(mut probe) = Admitted::claim(target, self.clock.now()) else {
                    continue;
                };
                admitted_any = true;
                if attempts > 0 {
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                }
                attempts += 1;
                let limit = policy.attempt_timeout.min(remaining);
                let mut request = tonic::Request::new(message.clone());
                *request.metadata_mut() = metadata.clone();
                request.set_timeout(limit);
                let client = TokenBrokerServiceClient::new(target.channel.clone());
                let sent = std::time::Instant::now();
                let outcome = tokio::time::timeout(limit, send(client, request)).await;
                let took = sent.elapsed();
                let (hop, failed) = match outcome {
                    Ok(Ok(response)) => {
                        self.settle(&mut probe, Hop::Answered);
                        self.counters.answered(rpc, Code::Ok, took);
                        self.stay(first + i, targets.len());
                        return Ok(Ok(response.into_inner()));
                    }
                    // Its own deadline (the one this attempt set) is the hop's: slow.
                    Ok(Err(status)) if status.code() == Code::DeadlineExceeded && answered(&status) => {
                        (Hop::Slow, status.message().to_owned())
                    }
                    Ok(Err(status)) if answered(&status) => {
                        self.settle(&mut probe, Hop::Answered);
                        self.counters.answered(rpc, status.code(), took);
                        self.stay(first + i, targets.len());
                        return Ok(Err(status));
                    }
                    Ok(Err(status)) => (Hop::Failed, hop_problem(&status)),
                    Err(_) => (Hop::Slow, format!("no answer within {} ms", limit.as_millis())),
                };
                self.counters.unreachable[index].fetch_add(1, Ordering::Relaxed);
                tracing::debug!(target_address = %target.label, problem = %failed, "a central broker endpoint failed; trying the next");
                last = format!("{}: {failed}", target.label);
                self.settle(&mut probe, hop);
            }
            if !admitted_any {
                let wait = self.soonest_close(&targets);
                return Err(Unreachable(format!(
                    "the central broker cannot be reached: every endpoint failed recently and is not tried again for {} s{}",
                    wait.as_secs().max(1),
                    if last.is_empty() {
                        String::new()
                    } else {
                        format!(" (last: {last})")
                    }
                )));
            }
            if attempts >= policy.max_attempts {
                return Err(self.gave_up(attempts, &targets, &last, started));
            }
            // Every address was tried this round: back off (full jitter).
            let ceiling = policy
                .backoff_base
                .saturating_mul(1u32 << round.min(16))
                .min(policy.backoff_cap);
            let wait = rand::thread_rng().gen_range(Duration::ZERO..=ceiling);
            if tokio::time::Instant::now() + wait + MIN_ATTEMPT >= deadline {
                return Err(self.gave_up(attempts, &targets, &last, started));
            }
            tokio::time::sleep(wait).await;
            round += 1;
        }
    }

    fn settle(&self, probe: &mut Admitted<'_>, outcome: Hop) {
        let now = self.clock.now();
        probe.settled = true;
        let target = probe.target;
        let opened = target
            .circuit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .settle(outcome, probe.probe, now, &self.settings.policy);
        if opened {
            self.counters.circuit_opened.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                target_address = %target.label,
                seconds = self.settings.policy.breaker_cooldown.as_secs(),
                "a central broker endpoint keeps failing: its circuit is open, other endpoints are asked"
            );
        }
    }

    /// Calls start at address `index` (modulo `len`) from now on.
    fn stay(&self, index: usize, len: usize) {
        self.current.store(index % len.max(1), Ordering::Relaxed);
    }

    fn soonest_close(&self, targets: &[Arc<Target>]) -> Duration {
        let now = self.clock.now();
        targets
            .iter()
            .filter_map(|t| t.circuit.lock().ok().and_then(|c| c.open_until))
            .filter_map(|until| until.duration_since(now).ok())
            .min()
            .unwrap_or_default()
    }

    fn gave_up(
        &self,
        attempts: u32,
        targets: &[Arc<Target>],
        last: &str,
        started: tokio::time::Instant,
    ) -> Unreachable {
        Unreachable(format!(
            "the central broker cannot be reached: {attempts} attempt{} over {} address{} in {} ms failed (last: {last})",
            if attempts == 1 { "" } else { "s" },
            targets.len(),
            if targets.len() == 1 { "" } else { "es" },
            started.elapsed().as_millis()
        ))
    }
}

/// The current span's W3C trace context (`traceparent`, `tracestate`), when
/// OpenTelemetry is on.
fn trace_context() -> HashMap<String, String> {
    use opentelemetry::propagation::TextMapPropagator as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let mut carrier = HashMap::new();
    let context = tracing::Span::current().context();
    opentelemetry_sdk::propagation::TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use super::*;

    #[test]
    fn endpoints_need_a_scheme_a_host_and_a_port() {
        let e = CentralEndpoint::parse("https://box-broker.box-broker.svc:50051").unwrap();
        assert_eq!(
            (e.https, e.host.as_str(), e.port),
            (true, "box-broker.box-broker.svc", 50051)
        );
        assert!(!e.is_loopback());
        let e = CentralEndpoint::parse("http://[::1]:8080/").unwrap();
        assert_eq!((e.https, e.host.as_str(), e.port), (false, "::1", 8080));
        assert!(e.is_loopback());
        assert_eq!(e.to_string(), "http://[::1]:8080");
        for bad in [
            "box-broker:50051",
            "https://box-broker",
            "https://:50051",
            "https://h:0",
            "https://h:x",
            "https://u@h:1",
        ] {
            assert!(CentralEndpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_circuit_opens_after_the_threshold_and_lets_one_probe_through_after_the_cooldown() {
        let policy = UpstreamPolicy {
            breaker_threshold: 2,
            breaker_cooldown: Duration::from_secs(30),
            ..UpstreamPolicy::default()
        };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut c = Circuit::default();
        assert_eq!(c.admit(t0), Some(false));
        assert!(!c.settle(Hop::Failed, false, t0, &policy));
        // Slow answers are tried elsewhere but do not count.
        assert!(!c.settle(Hop::Slow, false, t0, &policy));
        assert_eq!(c.state(t0), CircuitState::Closed);
        assert_eq!(c.admit(t0), Some(false));
        assert!(c.settle(Hop::Failed, false, t0, &policy), "the second failure opens it");
        assert_eq!(c.state(t0), CircuitState::Open);
        assert_eq!(c.admit(t0 + Duration::from_secs(29)), None);
        let later = t0 + Duration::from_secs(31);
        assert_eq!(c.admit(later), Some(true), "one probe");
        assert_eq!(c.admit(later), None, "only one");
        // An answer from the address closes it, whichever attempt it came from.
        assert!(!c.settle(Hop::Answered, false, later, &policy));
        assert_eq!(c.state(later), CircuitState::Closed);
        let mut c = Circuit::default();
        c.settle(Hop::Failed, false, t0, &policy);
        c.settle(Hop::Failed, false, t0, &policy);
        assert_eq!(c.admit(later), Some(true));
        assert!(
            c.settle(Hop::Failed, true, later, &policy),
            "a failed probe opens it again"
        );
        assert_eq!(c.admit(later), None);
    }

    #[test]
    fn a_secret_file_is_read_again_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let file = SecretFile::open(&path).unwrap();
        assert_eq!(file.current().unwrap().expose_secret(), "first");
        // Rewritten in place with the same size and modification time: not
        // read again (what is held is served).
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, "other\n").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(modified)
            .unwrap();
        assert_eq!(file.current().unwrap().expose_secret(), "first");
        // Replaced the way the kubelet does: a new file renamed over the old.
        let next = dir.path().join("token.new");
        std::fs::write(&next, "second-token").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert_eq!(file.current().unwrap().expose_secret(), "second-token");
        assert!(!format!("{file:?}").contains("second"));
        std::fs::write(&path, "  \n").unwrap();
        assert!(file.current().unwrap_err().ends_with("is empty"));
    }

    /// A client of `n` loopback addresses (nothing listens: `send` fakes the answers).
    async fn central(n: u16, policy: UpstreamPolicy, clock: SharedClock) -> Arc<Central> {
        let addresses: Vec<SocketAddr> = (1..=n).map(|port| SocketAddr::from(([127, 0, 0, 1], port))).collect();
        let settings = CentralSettings {
            policy,
            ..CentralSettings::plaintext(&addresses)
        };
        Central::new(settings, clock).await.unwrap()
    }

    fn fast(threshold: u32, max_attempts: u32) -> UpstreamPolicy {
        UpstreamPolicy {
            max_attempts,
            backoff_base: Duration::from_millis(1),
            backoff_cap: Duration::from_millis(2),
            attempt_timeout: Duration::from_secs(1),
            deadline: Duration::from_secs(2),
            breaker_threshold: threshold,
            breaker_cooldown: Duration::from_secs(30),
        }
    }

    /// A broker's own refusal (its ErrorInfo), as a central gate sends it.
    fn refusal() -> Status {
        use tonic_types::{ErrorDetails, StatusExt as _};
        Status::with_error_details(
            Code::PermissionDenied,
            "denied by policy",
            ErrorDetails::with_error_info("POLICY_DENIED", crate::rpc::ERROR_DOMAIN, HashMap::new()),
        )
    }

    type Outcomes = Arc<Mutex<Vec<Result<(), Status>>>>;

    /// Calls `central` once; each attempt takes the next outcome (`Ok`: a
    /// success) or, when none are left, never answers.
    async fn call(
        central: &Central,
        outcomes: &Outcomes,
        attempts: &Arc<AtomicUsize>,
    ) -> Result<Result<(), Status>, Unreachable> {
        let (outcomes, attempts) = (outcomes.clone(), attempts.clone());
        central
            .call(Rpc::GetToken, (), None, move |_, _: tonic::Request<()>| {
                attempts.fetch_add(1, Ordering::SeqCst);
                let next = {
                    let mut all = outcomes.lock().unwrap();
                    (!all.is_empty()).then(|| all.remove(0))
                };
                async move {
                    match next {
                        Some(Ok(())) => Ok(tonic::Response::new(())),
                        Some(Err(status)) => Err(status),
                        None => std::future::pending().await,
                    }
                }
            })
            .await
    }

    #[tokio::test]
    async fn a_failed_hop_fails_over_and_the_brokers_own_refusal_is_final() {
        let clock = crate::clock::ManualClock::new();
        let c = central(2, fast(5, 4), clock).await;
        let outcomes: Outcomes = Arc::new(Mutex::new(vec![
            Err(Status::unavailable("connection refused")),
            // A proxy's 503 that echoes the request id is still a failed hop.
            Err({
                let mut s = Status::unavailable("upstream connect error");
                s.metadata_mut().insert("x-request-id", "r-1".parse().unwrap());
                s
            }),
            Err(refusal()),
            Ok(()),
        ]));
        let attempts = Arc::new(AtomicUsize::new(0));
        let answer = call(&c, &outcomes, &attempts).await.unwrap();
        assert_eq!(
            answer.unwrap_err().code(),
            Code::PermissionDenied,
            "relayed, not retried"
        );
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
        assert_eq!(c.counters.failures()[0].1, 2, "two failed hops counted");
    }

    #[tokio::test]
    async fn an_open_circuit_fails_fast_and_a_cancelled_probe_does_not_hold_it_half_open() {
        let clock = crate::clock::ManualClock::new();
        let c = central(1, fast(1, 4), clock.clone()).await;
        let attempts = Arc::new(AtomicUsize::new(0));
        let outcomes: Outcomes = Arc::new(Mutex::new(vec![Err(Status::unavailable("refused"))]));
        let e = call(&c, &outcomes, &attempts).await.unwrap_err();
        assert!(e.0.contains("cannot be reached"), "{}", e.0);
        assert_eq!(c.circuits()[0].1, CircuitState::Open);
        // Open: refused at once, nothing sent.
        let e = call(&c, &outcomes, &attempts).await.unwrap_err();
        assert!(e.0.contains("every endpoint failed recently"), "{}", e.0);
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        // After the cooldown one probe goes; its caller gives up mid-way.
        clock.advance(Duration::from_secs(31));
        assert!(
            tokio::time::timeout(Duration::from_millis(20), call(&c, &outcomes, &attempts))
                .await
                .is_err()
        );
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        // The next call may probe again, and its success closes the circuit.
        outcomes.lock().unwrap().push(Ok(()));
        assert!(call(&c, &outcomes, &attempts).await.unwrap().is_ok());
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
        assert_eq!(c.circuits()[0].1, CircuitState::Closed);
    }

    #[tokio::test]
    async fn running_out_of_attempts_leaves_no_address_half_open_for_good() {
        let clock = crate::clock::ManualClock::new();
        let c = central(2, fast(1, 1), clock.clone()).await;
        let attempts = Arc::new(AtomicUsize::new(0));
        let outcomes: Outcomes = Arc::new(Mutex::new(vec![
            Err(Status::unavailable("refused")),
            Err(Status::unavailable("refused")),
        ]));
        // Both addresses fail once (one attempt per call) and open.
        call(&c, &outcomes, &attempts).await.unwrap_err();
        call(&c, &outcomes, &attempts).await.unwrap_err();
        assert!(c.circuits().iter().all(|(_, s)| *s == CircuitState::Open));
        clock.advance(Duration::from_secs(31));
        // One attempt allowed: the first half-open address is probed and
        // fails; the second must not be left claimed by that call.
        outcomes.lock().unwrap().push(Err(Status::unavailable("refused")));
        call(&c, &outcomes, &attempts).await.unwrap_err();
        outcomes.lock().unwrap().push(Ok(()));
        assert!(
            call(&c, &outcomes, &attempts).await.unwrap().is_ok(),
            "the other address was probed"
        );
        assert_eq!(attempts.load(Ordering::SeqCst), 4);
    }
}
