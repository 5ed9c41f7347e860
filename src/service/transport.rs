//! The connections under the gRPC services: accepting, TLS, HTTP/2, and
//! every bound on what a peer can hold before it has proved who it is.
//!
//! tonic's own server loop is not used: it advertises no
//! `SETTINGS_MAX_CONCURRENT_STREAMS` (unlimited streams per connection),
//! lifts hyper's cap on streams reset for protocol errors, retries a failing
//! `accept` (EMFILE) in a busy loop, keeps a connection that never speaks
//! HTTP/2 open forever (and through a shutdown), and has no idle timeout.
//! Here each listener has:
//!
//! - a cap on open connections ([`ConnectionLimits::max_connections`]):
//!   one more is accepted and closed at once, so the broker keeps file
//!   descriptors for Box and its own files;
//! - a backoff (5 ms doubling to 1 s) when `accept` fails for lack of
//!   descriptors or memory, instead of a busy loop;
//! - a handshake deadline: from `accept`, TLS (if any) must finish and the
//!   24-byte HTTP/2 preface arrive within `handshake_timeout`. The TLS
//!   handshake runs in the connection's own task, so a slow one never
//!   holds up the accept loop;
//! - HTTP/2 with every limit set: streams per connection, header list
//!   size, flow-control windows ([`STREAM_WINDOW`], [`CONNECTION_WINDOW`]),
//!   locally reset streams before GOAWAY, keepalive PINGs for half-open
//!   peers;
//! - an idle timeout (no request in progress; a shorter one for a
//!   connection that has not carried an authenticated request) and a
//!   maximum age, both ending the connection with GOAWAY so in-flight
//!   requests finish;
//! - a cap on connections from one TCP peer address, so one peer cannot
//!   take every slot;
//! - on shutdown: a connection that has not finished its handshake is
//!   dropped at once; the others get GOAWAY (an idle one closes at once).
//!
//! On a Unix socket, the bytes pass through `authority::Fixed` first: the
//! socket path grpc-core clients send as `:authority` is replaced before
//! the HTTP/2 server sees it (it would refuse every such request).
//!
//! Memory before authentication is therefore bounded per connection by the
//! connection window plus the streams' header blocks (the request body is
//! not read until the caller is authenticated, see `gate`), and in total by
//! that times `max_connections` per listener.

use std::{
    fmt, io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::{body::Incoming, server::conn::http2};

pub use crate::auth::Peer;
pub use crate::metrics::TransportCounters;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::CertificateDer;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
    task::JoinSet,
};
use tonic::codegen::http;

#[cfg(unix)]
use super::authority::Fixed;

/// Each stream's HTTP/2 receive window: room for a request of the largest
/// size the broker accepts (64 KiB by default) twice over.
pub const STREAM_WINDOW: u32 = 128 * 1024;
/// Each connection's HTTP/2 receive window: what a peer may have sent and
/// the broker not yet read, over all its streams.
pub const CONNECTION_WINDOW: u32 = 512 * 1024;
/// Streams a peer may open and reset before the broker answers them before
/// GOAWAY (h2's default; the "rapid reset" guard).
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// The HTTP/2 client preface: `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_LEN: usize = 24;
/// After GOAWAY for age or idleness, how long in-flight requests get
/// before the connection is cut.
const GOAWAY_GRACE: Duration = Duration::from_secs(60);
/// The accept backoff's first and largest wait.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one warning per this interval for refused connections and accept errors.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The bounds on one listener's connections (see the module documentation).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Connections open at once; one more is accepted and closed at once.
    pub max_connections: usize,
    /// Connections open at once from one TCP peer address; 0 for no limit.
    /// One peer cannot take every slot.
    pub max_connections_per_peer: usize,
    /// Requests in progress on one connection (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_concurrent_streams: u32,
    /// The largest header block a request may send (`SETTINGS_MAX_HEADER_LIST_SIZE`).
    pub max_header_list_bytes: u32,
    /// From `accept` until TLS is done and the HTTP/2 preface has arrived.
    pub handshake_timeout: Duration,
    /// A connection with no request in progress for this long gets GOAWAY.
    pub idle_timeout: Duration,
    /// The same for a connection that has not yet carried an authenticated
    /// request (at most `idle_timeout`): a peer that only opens connections
    /// holds each this long. Long enough for a client that connects eagerly
    /// and sends its first request a little later.
    pub unauthenticated_idle_timeout: Duration,
    /// Every connection gets GOAWAY after this long (`None`: never).
    pub max_connection_age: Option<Duration>,
    /// How often an HTTP/2 PING checks that the peer is still there (`None`: never).
    pub keepalive_interval: Option<Duration>,
    /// How long a PING may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Streams the broker may reset for a peer's protocol errors before GOAWAY.
    pub max_local_reset_streams: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_peer: 64,
            max_concurrent_streams: 100,
            max_header_list_bytes: 8 * 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            unauthenticated_idle_timeout: Duration::from_secs(30),
            max_connection_age: Some(Duration::from_secs(30 * 60)),
            keepalive_interval: Some(Duration::from_secs(60)),
            keepalive_timeout: Duration::from_secs(20),
            max_local_reset_streams: 256,
        }
    }
}

/// Whether requests are in progress on a connection, and since when not:
/// the gate marks each request, the connection's task reads it for the
/// idle timeout.
#[derive(Debug, Clone)]
pub struct Activity(Arc<ConnState>);

/// One request in progress; its end is recorded when dropped.
#[derive(Debug)]
pub struct InProgress(Arc<ConnState>);

impl Activity {
    /// Marks a request as started.
    pub fn begin(&self) -> InProgress {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        InProgress(self.0.clone())
    }

    /// Marks the connection as having carried an authenticated request:
    /// from then on it may idle for `idle_timeout`, not
    /// `unauthenticated_idle_timeout`.
    pub fn authenticated(&self) {
        if !self.0.authenticated.load(Ordering::Relaxed) {
            self.0.authenticated.store(true, Ordering::Release);
        }
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
struct ConnState {
    started: Instant,
    /// The HTTP/2 preface has arrived.
    spoke: AtomicBool,
    /// A request on it was authenticated.
    authenticated: AtomicBool,
    /// Requests in progress.
    in_flight: AtomicUsize,
    /// When the last request ended, in ms since `started`.
    last_active_ms: AtomicU64,
}

impl ConnState {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            spoke: AtomicBool::new(false),
            authenticated: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active_ms.store(ms, Ordering::Release);
    }

    fn spoke(&self) -> bool {
        self.spoke.load(Ordering::Acquire)
    }

    /// `None` when the connection has been idle too long (`idle` once it
    /// carried an authenticated request, `unauthenticated` until then); else
    /// when to look again.
    fn idle_check(&self, idle: Duration, unauthenticated: Duration) -> Option<tokio::time::Instant> {
        let timeout = if self.authenticated.load(Ordering::Acquire) {
            idle
        } else {
            unauthenticated.min(idle)
        };
        let now = tokio::time::Instant::now();
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Some(now + timeout);
        }
        let last = self.started + Duration::from_millis(self.last_active_ms.load(Ordering::Acquire));
        let idle_since = last.elapsed();
        (idle_since < timeout).then(|| now + (timeout - idle_since))
    }
}

/// What the gate gets for each new connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// Who is at the other end.
    pub peer: Arc<Peer>,
    /// Where requests are marked, for the idle timeout.
    pub activity: Activity,
}

/// Why TLS settings could not be built; `part` says which input.
#[derive(Debug, thiserror::Error)]
#[error("{part}: {problem}")]
pub struct TlsError {
    /// `the certificate chain`, `the private key` or `the client CA`.
    pub part: &'static str,
    /// What is wrong.
    pub problem: String,
}

/// The certificates of a PEM file, at least one; `part` names it in errors.
fn pem_certificates(pem: &[u8], part: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject as _;
    let certificates: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError {
            part,
            problem: format!("not PEM certificates: {e}"),
        })?;
    if certificates.is_empty() {
        return Err(TlsError {
            part,
            problem: "holds no PEM certificate".to_owned(),
        });
    }
    Ok(certificates)
}

/// A listener's TLS: its certificate and key, and optionally the CA its
/// callers' client certificates must chain to. Parsed and checked when
/// built, so a garbage file stops startup (and `check-config`).
#[derive(Clone)]
pub struct ServerTls(Arc<rustls::ServerConfig>);

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerTls")
    }
}

/// Whether a TLS listener asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertificates {
    /// Every caller must present one (mTLS only).
    Required,
    /// A caller may present one, or authenticate another way.
    Optional,
}

impl ServerTls {
    /// TLS from PEM: the server's certificate chain and private key, and
    /// (for mTLS) the client CA bundle with whether a certificate is required.
    pub fn from_pem(
        cert_chain: &[u8],
        key: &[u8],
        client_ca: Option<(&[u8], ClientCertificates)>,
    ) -> Result<Self, TlsError> {
        use rustls::pki_types::{PrivateKeyDer, pem::PemObject as _};
        let chain = pem_certificates(cert_chain, "the certificate chain")?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError {
            part: "the private key",
            problem: format!("not a PEM private key: {e}"),
        })?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError {
                part: "the TLS settings",
                problem: e.to_string(),
            })?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some((ca, requirement)) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in pem_certificates(ca, "the client CA")? {
                    roots.add(cert).map_err(|e| TlsError {
                        part: "the client CA",
                        problem: format!("not a usable CA certificate: {e}"),
                    })?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = match requirement {
                    ClientCertificates::Required => verifier,
                    ClientCertificates::Optional => verifier.allow_unauthenticated(),
                }
                .build()
                .map_err(|e| TlsError {
                    part: "the client CA",
                    problem: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| TlsError {
            part: "the private key",
            problem: format!("does not go with the certificate, or is unusable: {e}"),
        })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self(Arc::new(config)))
    }
}

/// What answers one connection's requests (the gate, in the broker): a
/// hyper service from HTTP/2 requests to gRPC responses.
pub(crate) trait Responder:
    hyper::service::Service<
        http::Request<Incoming>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Send
    + 'static
{
}

impl<S> Responder for S where
    S: hyper::service::Service<
            http::Request<Incoming>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + Send
        + 'static
{
}

/// A bound listener.
#[derive(Debug)]
pub(crate) enum Bound {
    /// TCP, with TLS when given.
    Tcp(TcpListener, Option<ServerTls>),
    /// A Unix domain socket.
    #[cfg(unix)]
    Unix(tokio::net::UnixListener),
}

enum Accepted {
    Tcp(TcpStream, SocketAddr),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
}

impl Bound {
    async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Self::Tcp(listener, _) => listener.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
            #[cfg(unix)]
            Self::Unix(listener) => listener.accept().await.map(|(s, _)| Accepted::Unix(s)),
        }
    }
}

/// True for `accept` errors that only mean a peer gave up before it was accepted.
fn peer_gave_up(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Logs at most once per [`WARN_INTERVAL`].
#[derive(Debug)]
struct Occasional(std::sync::Mutex<Option<Instant>>);

impl Occasional {
    fn new() -> Self {
        Self(std::sync::Mutex::new(None))
    }

    fn due(&self) -> bool {
        let mut last = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|t| t.elapsed() < WARN_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

/// Serves `bound` until `stop` turns true: accepts within the limits, runs
/// each connection in its own task with `service(connection)` answering
/// its requests, then waits for the connections to finish. `ready` fires
/// once accepting.
pub(crate) async fn serve<F, S>(
    bound: Bound,
    limits: ConnectionLimits,
    counters: Arc<TransportCounters>,
    mut stop: watch::Receiver<bool>,
    service: F,
    ready: oneshot::Sender<()>,
) where
    F: Fn(ConnectionInfo) -> S + Send + Sync + 'static,
    S: Responder,
{
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_bytes)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(limits.max_local_reset_streams)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout);
    let shared = Arc::new(Shared {
        builder,
        limits,
        counters,
        service,
        open: AtomicUsize::new(0),
        by_peer: std::sync::Mutex::new(std::collections::HashMap::new()),
        refused_warning: Occasional::new(),
    });
    let tls = match &bound {
        Bound::Tcp(_, tls) => tls.as_ref().map(|t| tokio_rustls::TlsAcceptor::from(t.0.clone())),
        #[cfg(unix)]
        Bound::Unix(_) => None,
    };
    let mut connections = JoinSet::new();
    let accept_warning = Occasional::new();
    let mut backoff = Duration::ZERO;
    let _ = ready.send(());
    loop {
        let accepted = tokio::select! {
            accepted = bound.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        // Reap finished connections so the set holds only live ones.
        while connections.try_join_next().is_some() {}
        let accepted = match accepted {
            Ok(accepted) => {
                backoff = Duration::ZERO;
                accepted
            }
            Err(e) if peer_gave_up(&e) => continue,
            Err(e) => {
                // Out of descriptors or memory: wait instead of spinning.
                shared.counters.accept_errors.fetch_add(1, Ordering::Relaxed);
                backoff = (backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                if accept_warning.due() {
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accepting a connection failed; backing off (check the open-files limit and [server] max_connections)");
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => continue,
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        };
        // By the exact address (a Kubernetes node's pods can share one IPv6 /64).
        let peer_ip = match &accepted {
            Accepted::Tcp(_, addr) => Some(match addr.ip() {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                v4 => v4,
            }),
            #[cfg(unix)]
            Accepted::Unix(_) => None,
        };
        let Some(slot) = Slot::take(&shared, peer_ip) else {
            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            if shared.refused_warning.due() {
                tracing::warn!(
                    max_connections = shared.limits.max_connections,
                    max_connections_per_peer = shared.limits.max_connections_per_peer,
                    "a connection was closed at once: the listener, or its peer, is at its limit ([server] max_connections, max_connections_per_peer)"
                );
            }
            drop(accepted);
            continue;
        };
        let tls = tls.clone();
        let stop = stop.clone();
        let shared = shared.clone();
        connections.spawn(async move { connection(accepted, tls, &shared, stop, slot).await });
    }
    drop(bound);
    // Connections finish (or are cut off when the caller's grace period ends
    // and this task, with its JoinSet, is aborted).
    while connections.join_next().await.is_some() {}
}

struct Shared<F> {
    builder: http2::Builder<TokioExecutor>,
    limits: ConnectionLimits,
    counters: Arc<TransportCounters>,
    service: F,
    /// Connections open on this listener.
    open: AtomicUsize,
    /// Connections open on this listener by TCP peer address; entries
    /// leave at zero.
    by_peer: std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>,
    refused_warning: Occasional,
}

/// A place among a listener's open connections (and its peer's), given
/// back when dropped.
struct Slot<F>(Arc<Shared<F>>, Option<IpAddr>);

impl<F> Slot<F> {
    /// A place, unless the listener or the peer is at its limit.
    fn take(shared: &Arc<Shared<F>>, peer: Option<IpAddr>) -> Option<Self> {
        if shared.open.load(Ordering::Acquire) >= shared.limits.max_connections {
            return None;
        }
        if let Some(ip) = peer {
            let mut by_peer = shared.by_peer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let open = by_peer.entry(ip).or_insert(0);
            let per_peer = shared.limits.max_connections_per_peer;
            if per_peer > 0 && *open >= per_peer {
                return None;
            }
            *open += 1;
        }
        shared.open.fetch_add(1, Ordering::AcqRel);
        shared.counters.open.fetch_add(1, Ordering::AcqRel);
        shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
        Some(Self(shared.clone(), peer))
    }
}

impl<F> Drop for Slot<F> {
    fn drop(&mut self) {
        if let Some(ip) = self.1 {
            let mut by_peer = self.0.by_peer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(open) = by_peer.get_mut(&ip) {
                *open = open.saturating_sub(1);
                if *open == 0 {
                    by_peer.remove(&ip);
                }
            }
        }
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.counters.open.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn connection<F, S>(
    accepted: Accepted,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: &Shared<F>,
    mut stop: watch::Receiver<bool>,
    _slot: Slot<F>,
) where
    F: Fn(ConnectionInfo) -> S + Send + Sync + 'static,
    S: Responder,
{
    let limits = &shared.limits;
    let state = Arc::new(ConnState::new());
    let handshake = tokio::time::sleep(limits.handshake_timeout);
    tokio::pin!(handshake);
    let (stream, peer) = match accepted {
        Accepted::Tcp(tcp, addr) => {
            // gRPC is request/response: send each frame at once.
            let _ = tcp.set_nodelay(true);
            let mut peer = Peer {
                addr: Some(addr),
                uid: None,
                certificates: None,
            };
            match tls {
                None => (Stream::Tcp(tcp), peer),
                Some(acceptor) => {
                    let tls = tokio::select! {
                        result = acceptor.accept(tcp) => match result {
                            Ok(tls) => tls,
                            Err(e) => {
                                tracing::debug!(peer = %addr.ip(), error = %e, "TLS handshake failed");
                                return;
                            }
                        },
                        () = &mut handshake => {
                            shared.counters.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(peer = %addr.ip(), "closing a connection that did not finish TLS in time");
                            return;
                        }
                        _ = stop.wait_for(|s| *s) => return,
                    };
                    peer.certificates = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .filter(|c| !c.is_empty())
                        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
                    (Stream::Tls(Box::new(tls)), peer)
                }
            }
        }
        #[cfg(unix)]
        Accepted::Unix(unix) => {
            let uid = unix.peer_cred().ok().map(|c| c.uid());
            let max_list = usize::try_from(limits.max_header_list_bytes).unwrap_or(usize::MAX);
            (
                // grpc-core's :authority on a Unix socket, made acceptable.
                Stream::Unix(Box::new(Fixed::new(unix, max_list))),
                Peer {
                    addr: None,
                    uid,
                    certificates: None,
                },
            )
        }
    };
    let io = Guarded {
        inner: stream,
        state: state.clone(),
        preface_left: PREFACE_LEN,
    };
    let service = (shared.service)(ConnectionInfo {
        peer: Arc::new(peer),
        activity: Activity(state.clone()),
    });
    let conn = shared.builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let idle = tokio::time::sleep(limits.unauthenticated_idle_timeout.min(limits.idle_timeout));
    tokio::pin!(idle);
    let far = Duration::from_secs(100 * 365 * 24 * 3600);
    let age = tokio::time::sleep(limits.max_connection_age.unwrap_or(far));
    tokio::pin!(age);
    // Set once GOAWAY has been sent: the connection is cut when it passes.
    let cutoff = tokio::time::sleep(far);
    tokio::pin!(cutoff);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            // (A precondition is checked when the select starts, not while it
            // waits: the preface may have arrived since, so check again.)
            () = &mut handshake, if !state.spoke() => {
                if !state.spoke() {
                    shared.counters.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("closing a connection that did not start HTTP/2 in time");
                    break;
                }
            }
            () = &mut idle, if !closing => match state.idle_check(limits.idle_timeout, limits.unauthenticated_idle_timeout) {
                Some(later) => idle.as_mut().reset(later),
                None => {
                    shared.counters.idle_closed.fetch_add(1, Ordering::Relaxed);
                    conn.as_mut().graceful_shutdown();
                    cutoff.as_mut().reset(tokio::time::Instant::now() + GOAWAY_GRACE);
                    closing = true;
                }
            },
            () = &mut age, if !closing => {
                conn.as_mut().graceful_shutdown();
                cutoff.as_mut().reset(tokio::time::Instant::now() + GOAWAY_GRACE);
                closing = true;
            }
            _ = stop.wait_for(|s| *s), if !closing => {
                if !state.spoke() {
                    break;
                }
                // The server's grace period (not GOAWAY_GRACE) bounds the rest.
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = &mut cutoff, if closing => break,
        }
    }
}

/// A connection's byte stream.
enum Stream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    #[cfg(unix)]
    Unix(Box<Fixed<tokio::net::UnixStream>>),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            #[cfg(unix)]
            Stream::Unix($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
            #[cfg(unix)]
            Self::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// A stream that notes when the HTTP/2 preface has arrived (the end of the
/// handshake the deadline covers).
struct Guarded {
    inner: Stream,
    state: Arc<ConnState>,
    /// Preface bytes still to come.
    preface_left: usize,
}

impl AsyncRead for Guarded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.preface_left > 0 && matches!(polled, Poll::Ready(Ok(()))) {
            this.preface_left = this.preface_left.saturating_sub(buf.filled().len() - before);
            if this.preface_left == 0 {
                this.state.spoke.store(true, Ordering::Release);
            }
        }
        polled
    }
}

write_through!(impl[] Guarded);
