//! The gate in front of the broker's own services (`boxbroker.v1.*`) on
//! every listener, between the HTTP/2 connection and tonic:
//!
//! 1. **Authenticates before the request body is read.** Credentials are
//!    headers and connection facts (client certificate, Unix peer), so an
//!    unauthenticated caller is answered without tonic ever buffering or
//!    decoding its message: what it can make the broker hold is bounded by
//!    the transport's limits alone.
//! 2. **Throttles failed authentication per peer** (address, or uid on a Unix
//!    socket): past `failed_auth_per_second`, a peer's Kubernetes tokens are
//!    not verified unless they were recently (no RSA verification on
//!    demand). API keys and certificates, cheap to check, are still checked,
//!    so a good caller behind the same address is not locked out.
//! 3. **Rate-limits each caller** (`rate_limit_per_second`, when set).
//! 4. **Bounds each request's time** (`request_timeout_secs`, or the
//!    caller's `grpc-timeout` if sooner): past it, DEADLINE_EXCEEDED.
//! 5. **Audits what tonic refuses before a handler runs**, with the code the
//!    README promises: a message over `max_message_bytes` is
//!    RESOURCE_EXHAUSTED naming the limit (tonic says OUT_OF_RANGE), one
//!    that does not decode is INVALID_ARGUMENT (tonic says INTERNAL, which
//!    the README keeps for broker bugs).
//!
//! Every response carries the request id (`x-request-id`). The handlers get
//! the caller, the request id and the peer as a [`CallContext`] in the
//! request's extensions. Health and reflection pass straight through.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    hash::Hash,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::body::Incoming;
use tonic::{
    Code, Status,
    body::Body,
    codegen::{Service, http},
    metadata::{Ascii, MetadataKey},
};

use super::{
    status::detailed,
    transport::{ConnectionInfo, Peer},
};
use crate::{
    audit::{AuditEvent, AuditSink},
    auth::{Authenticator, CallerIdentity},
    metrics::RpcMetrics,
    rpc::RequestId,
    rpc::{Rpc, code_name},
};

pub use crate::rpc::REQUEST_ID_HEADER;

/// [`REQUEST_ID_HEADER`], parsed once: it is read and written on every request.
pub(crate) static REQUEST_ID_KEY: LazyLock<MetadataKey<Ascii>> =
    LazyLock::new(|| MetadataKey::from_static(REQUEST_ID_HEADER));

/// What the gate learned about a request, for its handler: in the
/// request's extensions as `Arc<CallContext>`.
#[derive(Debug)]
pub struct CallContext {
    /// The authenticated caller.
    pub caller: CallerIdentity,
    /// The request's id (the caller's `x-request-id`, or a new one).
    pub request_id: RequestId,
    /// The connection's other end.
    pub peer: Arc<Peer>,
    /// Set by the handler: from then on it audits the request itself.
    reached: AtomicBool,
}

impl CallContext {
    /// Marks the request as taken over by its handler.
    pub fn reach(&self) {
        self.reached.store(true, Ordering::Release);
    }

    fn reached(&self) -> bool {
        self.reached.load(Ordering::Acquire)
    }
}

/// The path prefix of the client API's methods.
pub(crate) const CLIENT_SERVICE: &str = "/boxbroker.v1.TokenBrokerService/";
/// The path prefix of the admin API's methods.
pub(crate) const ADMIN_SERVICE: &str = "/boxbroker.v1.BrokerAdminService/";

/// The RPC name of `path` when it is a method of `service` (a path prefix
/// such as [`CLIENT_SERVICE`]): `unknown` for a method the broker does not
/// have. `None` for any other service (health, reflection, or the broker
/// service this listener does not serve, which tonic answers UNIMPLEMENTED).
fn rpc_of(path: &str, service: &str) -> Option<Rpc> {
    let method = path.strip_prefix(service)?;
    let rpc = if service == CLIENT_SERVICE {
        Rpc::client(method)
    } else {
        Rpc::admin(method)
    };
    Some(rpc.unwrap_or(Rpc::Unknown))
}

/// For a call of the broker service this listener does not serve: its
/// method and the status saying which listener serves it.
fn elsewhere(path: &str, served: &str) -> Option<(Rpc, Status)> {
    let (other, message) = if served == CLIENT_SERVICE {
        (
            ADMIN_SERVICE,
            "boxbroker.v1.BrokerAdminService is not served on this listener: call it on the admin listener \
             ([server] admin_listen or [server.admin_unix_socket]; `box-broker dev` prints its address)",
        )
    } else {
        (
            CLIENT_SERVICE,
            "boxbroker.v1.TokenBrokerService is not served on the admin listener: call it on the client listener \
             ([server] listen or [server.unix_socket])",
        )
    };
    let rpc = rpc_of(path, other)?;
    Some((rpc, detailed(Code::Unimplemented, message, "WRONG_LISTENER", &[], None)))
}

/// How tonic's refusals of a malformed request message begin (its
/// INTERNAL otherwise means something else, e.g. a transport error).
const FRAMING_ERRORS: &[&str] = &[
    "failed to decode Protobuf message",
    "Missing request message",
    "Unexpected EOF decoding stream",
    "protocol error: received message with",
    "Error decompressing",
];

/// How [`Buckets::check`] uses a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Takes a token (a request, a failed authentication).
    Take,
    /// Only looks whether one is left (takes no lock while nobody is held).
    Look,
}

/// Token buckets by key, in shards so callers do not queue on one lock;
/// each shard forgets its idle (refilled) keys once it grows past
/// [`MAX_KEYS_PER_SHARD`], so the table stays bounded.
#[derive(Debug)]
struct Buckets<K> {
    per_second: f64,
    burst: u32,
    shards: Box<[Mutex<Shard<K>>]>,
    /// Keys held in each shard, readable without its lock: looking at a
    /// key in an empty shard (the failed-authentication check of every
    /// request, when nobody is failing) takes no lock.
    held: Box<[std::sync::atomic::AtomicUsize]>,
}

/// Key -> (tokens, last refill).
type Shard<K> = HashMap<K, (f64, Instant)>;

const SHARDS: usize = 16;
const MAX_KEYS_PER_SHARD: usize = 4096;

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(per_second: f64, burst: u32) -> Self {
        Self {
            per_second,
            burst: burst.max(1),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            held: (0..SHARDS).map(|_| std::sync::atomic::AtomicUsize::new(0)).collect(),
        }
    }

    fn shard_of(key: &K) -> usize {
        use std::hash::BuildHasher as _;
        static SEED: LazyLock<foldhash::fast::RandomState> = LazyLock::new(foldhash::fast::RandomState::default);
        usize::try_from(SEED.hash_one(key) % SHARDS as u64).unwrap_or(0)
    }

    /// Forgets the keys whose buckets have refilled (they behave as new ones).
    fn forget_full(&self) {
        let burst = f64::from(self.burst);
        for (shard, held) in self.shards.iter().zip(self.held.iter()) {
            if held.load(Ordering::Acquire) == 0 {
                continue;
            }
            let mut shard = shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let per_second = self.per_second;
            shard.retain(|_, (tokens, last)| *tokens + last.elapsed().as_secs_f64() * per_second < burst);
            held.store(shard.len(), Ordering::Release);
        }
    }

    /// Takes a token from `key`'s bucket ([`Use::Take`]) or only looks
    /// ([`Use::Look`]); either way, the milliseconds to wait for one when
    /// the bucket is empty.
    fn check(&self, key: &K, how: Use) -> Result<(), u64> {
        let take = how == Use::Take;
        let index = Self::shard_of(key);
        if !take && self.held[index].load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let burst = f64::from(self.burst);
        let mut shard = self.shards[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !shard.contains_key(key) {
            if shard.len() >= MAX_KEYS_PER_SHARD {
                let per_second = self.per_second;
                shard.retain(|_, (tokens, last)| *tokens + last.elapsed().as_secs_f64() * per_second < burst);
                self.held[index].store(shard.len(), Ordering::Release);
            }
            if !take {
                return Ok(());
            }
            shard.insert(key.clone(), (burst, now));
            self.held[index].store(shard.len(), Ordering::Release);
        }
        let Some((tokens, last)) = shard.get_mut(key) else {
            return Ok(());
        };
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.per_second).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            if take {
                *tokens -= 1.0;
            }
            return Ok(());
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a positive wait of at most 1/per_second seconds, in ms"
        )]
        let wait = ((1.0 - *tokens) / self.per_second * 1000.0).ceil() as u64;
        Err(wait)
    }
}

/// What a peer is counted as for failed authentication: its IP address
/// (an IPv6 address by its /64, which one host usually holds whole), or
/// its uid on a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PeerKey {
    Ip(IpAddr),
    Uid(u32),
    Unknown,
}

impl PeerKey {
    fn of(peer: &Peer) -> Self {
        match (peer.addr, peer.uid) {
            (Some(addr), _) => Self::Ip(crate::auth::peer_ip_key(addr.ip())),
            (None, Some(uid)) => Self::Uid(uid),
            (None, None) => Self::Unknown,
        }
    }
}

/// The per-caller and per-peer budgets, shared by every listener.
#[derive(Debug)]
pub struct CallerLimits {
    /// Requests per caller identity: (per second, burst); `None` for no limit.
    rate: Option<Buckets<Arc<str>>>,
    rate_setting: Option<(f64, u32)>,
    /// Failed authentications per peer.
    failed_auth: Buckets<PeerKey>,
}

impl CallerLimits {
    /// `rate` per caller (or none), `failed_auth` (per second, burst) per peer.
    pub fn new(rate: Option<(f64, u32)>, failed_auth: (f64, u32)) -> Self {
        Self {
            rate: rate.map(|(per_second, burst)| Buckets::new(per_second, burst)),
            rate_setting: rate,
            failed_auth: Buckets::new(failed_auth.0, failed_auth.1),
        }
    }

    /// A token from `caller`'s bucket, or RESOURCE_EXHAUSTED naming the limit.
    fn charge(&self, caller: &CallerIdentity) -> Result<(), Status> {
        let (Some(buckets), Some((per_second, burst))) = (&self.rate, self.rate_setting) else {
            return Ok(());
        };
        buckets.check(&caller.shared_name(), Use::Take).map_err(|wait_ms| {
            detailed(
                Code::ResourceExhausted,
                format!(
                    "caller {:?} is over its rate limit of {per_second} requests per second (burst {burst}, [server] rate_limit_per_second); retry later",
                    caller.name()
                ),
                "RATE_LIMITED",
                &[],
                Some(Duration::from_millis(wait_ms)),
            )
        })
    }

    /// UNAUTHENTICATED when `peer` has failed authentication too often to be
    /// heard now.
    fn admit_peer(&self, peer: &Peer) -> Result<(), Status> {
        self.failed_auth.check(&PeerKey::of(peer), Use::Look).map_err(|wait_ms| {
            detailed(
                Code::Unauthenticated,
                format!(
                    "too many failed authentications from {peer}: tokens that need a signature check are not verified for now ([server] failed_auth_per_second); retry after the pushback"
                ),
                "AUTHENTICATION_THROTTLED",
                &[],
                Some(Duration::from_millis(wait_ms)),
            )
        })
    }

    fn failed(&self, peer: &Peer) {
        let _ = self.failed_auth.check(&PeerKey::of(peer), Use::Take);
    }

    /// Forgets callers and peers whose budgets have refilled, so the tables
    /// hold only the ones being limited (and the hot path's lookups stay
    /// lock-free while nobody is).
    pub fn forget_idle(&self) {
        self.failed_auth.forget_full();
        if let Some(rate) = &self.rate {
            rate.forget_full();
        }
    }
}

/// What every gate of a server shares.
#[derive(Debug)]
pub(crate) struct GateShared {
    pub routes: tonic::service::Routes,
    /// The path prefix of the broker service this listener serves.
    pub service: &'static str,
    pub auth: Authenticator,
    pub audit: Arc<AuditSink>,
    pub metrics: RpcMetrics,
    pub limits: Arc<CallerLimits>,
    pub request_timeout: Duration,
    pub max_message_bytes: usize,
}

/// One connection's gate: a hyper service.
#[derive(Debug)]
pub(crate) struct Gate {
    shared: Arc<GateShared>,
    connection: ConnectionInfo,
}

impl Gate {
    pub(crate) fn new(shared: Arc<GateShared>, connection: ConnectionInfo) -> Self {
        Self { shared, connection }
    }
}

type GateFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl hyper::service::Service<http::Request<Incoming>> for Gate {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = GateFuture;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        let shared = self.shared.clone();
        let connection = self.connection.clone();
        let in_progress = self.connection.activity.begin();
        Box::pin(async move {
            let response = shared.handle(request.map(Body::new), connection).await;
            drop(in_progress);
            Ok(response)
        })
    }
}

/// The caller's request id, if it is short and printable; else a new one.
fn request_id(headers: &http::HeaderMap) -> RequestId {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(RequestId::parse)
        .unwrap_or_else(RequestId::generate)
}

/// The caller's `grpc-timeout` (`<digits><unit>`, units H M S m u n).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl GateShared {
    async fn route(&self, request: http::Request<Body>) -> http::Response<Body> {
        let mut routes = self.routes.clone();
        if let Err(e) = std::future::poll_fn(|cx| Service::<http::Request<Body>>::poll_ready(&mut routes, cx)).await {
            match e {}
        }
        match Service::<http::Request<Body>>::call(&mut routes, request).await {
            Ok(response) => response,
            Err(e) => match e {},
        }
    }

    async fn handle(&self, mut request: http::Request<Body>, connection: ConnectionInfo) -> http::Response<Body> {
        let peer = connection.peer;
        if let Some((rpc, status)) = elsewhere(request.uri().path(), self.service) {
            // Before authentication: the credentials are for the other
            // listener, and what is served where is no secret.
            let id = request_id(request.headers());
            return self.refuse(rpc, None, &peer, id, status, Instant::now());
        }
        let Some(rpc) = rpc_of(request.uri().path(), self.service) else {
            // Health, reflection, a service not served here: no caller
            // authentication, but the same time bound (their messages are
            // held to a few KiB where they are registered).
            return match tokio::time::timeout(self.request_timeout, self.route(request)).await {
                Ok(response) => response,
                Err(_) => detailed(
                    Code::DeadlineExceeded,
                    format!(
                        "the request did not finish within {} ms ([server] request_timeout_secs)",
                        self.request_timeout.as_millis()
                    ),
                    "REQUEST_TIMEOUT",
                    &[],
                    None,
                )
                .into_http(),
            };
        };
        let started = Instant::now();
        let id = request_id(request.headers());
        let refuse =
            |caller: Option<&CallerIdentity>, status: Status| self.refuse(rpc, caller, &peer, id, status, started);
        // A peer that keeps failing is not given signature checks; a key, a
        // certificate or a recently verified token still works from it.
        if let Err(status) = self.limits.admit_peer(&peer)
            && self.auth.needs_signature_check(request.headers(), &peer).await
        {
            self.limits.failed(&peer);
            return refuse(None, status);
        }
        let caller = match self.auth.authenticate(request.headers(), &peer).await {
            Ok(caller) => caller,
            Err(e) => {
                self.limits.failed(&peer);
                return refuse(None, Status::from(e));
            }
        };
        connection.activity.authenticated();
        if let Err(status) = self.limits.charge(&caller) {
            return refuse(Some(&caller), status);
        }
        let timeout = grpc_timeout(request.headers()).map_or(self.request_timeout, |t| t.min(self.request_timeout));
        let context = Arc::new(CallContext {
            caller,
            request_id: id,
            peer: peer.clone(),
            reached: AtomicBool::new(false),
        });
        request.extensions_mut().insert(context.clone());
        let mut response = match tokio::time::timeout(timeout, self.route(request)).await {
            Ok(response) => response,
            Err(_) => {
                let status = detailed(
                    Code::DeadlineExceeded,
                    format!(
                        "the request did not finish within {} ms ([server] request_timeout_secs, or the caller's own deadline)",
                        timeout.as_millis()
                    ),
                    "REQUEST_TIMEOUT",
                    &[],
                    None,
                );
                return self.refuse(rpc, Some(&context.caller), &peer, id, status, started);
            }
        };
        if !context.reached()
            && let Some(status) = Status::from_header_map(response.headers())
            && status.code() != Code::Ok
        {
            // tonic answered before the handler ran: a message too large,
            // one that does not decode, or a method not served here.
            let status = self.explain(rpc, &status);
            return self.refuse(rpc, Some(&context.caller), &peer, id, status, started);
        }
        response.headers_mut().insert(REQUEST_ID_HEADER, request_id_value(id));
        response
    }

    /// tonic's own refusal, in the broker's words.
    fn explain(&self, rpc: Rpc, status: &Status) -> Status {
        match status.code() {
            Code::OutOfRange if status.message().contains("message length too large") => {
                let found = status
                    .message()
                    .split("found ")
                    .nth(1)
                    .and_then(|rest| rest.split(' ').next())
                    .map_or_else(String::new, |n| format!("{n} bytes, "));
                detailed(
                    Code::ResourceExhausted,
                    format!(
                        "the request is {found}over the limit of {} bytes ([server] max_message_bytes)",
                        self.max_message_bytes
                    ),
                    "REQUEST_TOO_LARGE",
                    &[],
                    None,
                )
            }
            // tonic's INTERNAL about the request's framing: not protobuf,
            // truncated, no message, a compression flag without an encoding.
            Code::Internal if FRAMING_ERRORS.iter().any(|m| status.message().contains(m)) => {
                let detail: String = status.message().chars().filter(|c| !c.is_control()).take(200).collect();
                detailed(
                    Code::InvalidArgument,
                    format!("the request is not a valid {rpc} request message ({detail})"),
                    "INVALID_REQUEST",
                    &[],
                    None,
                )
            }
            Code::Unimplemented if status.message().is_empty() => detailed(
                Code::Unimplemented,
                format!(
                    "{} has no method of that name (its methods: grpcurl -plaintext ADDRESS describe {})",
                    self.service.trim_matches('/'),
                    self.service.trim_matches('/')
                ),
                "UNKNOWN_METHOD",
                &[],
                None,
            ),
            _ => detailed(
                status.code(),
                status.message().to_owned(),
                code_name(status.code()),
                &[],
                None,
            ),
        }
    }

    /// Answers with `status`: audited (repeats aggregated), logged when
    /// audited, counted.
    fn refuse(
        &self,
        rpc: Rpc,
        caller: Option<&CallerIdentity>,
        peer: &Peer,
        id: RequestId,
        mut status: Status,
        started: Instant,
    ) -> http::Response<Body> {
        let mut event = AuditEvent {
            rpc,
            caller: caller.map_or_else(|| "unauthenticated".into(), CallerIdentity::shared_name),
            peer: Some(peer.to_string().into()),
            request_id: Some(id),
            ..AuditEvent::default()
        };
        super::record_outcome(&mut event, Err(&status));
        if self.audit.record(&event) {
            tracing::info!(
                rpc = rpc.name(),
                request_id = id.as_str(),
                code = code_name(status.code()),
                reason = status.message(),
                peer = %peer,
                "refused"
            );
        }
        // (A client RPC refused on the admin listener is not the client
        // API's traffic.)
        if rpc.client_index().is_some() && self.service == CLIENT_SERVICE {
            self.metrics.rpc(rpc, status.code(), started.elapsed());
        }
        status
            .metadata_mut()
            .insert(REQUEST_ID_KEY.clone(), request_id_metadata(id));
        status.into_http()
    }
}

/// A request id as a header value, sent never-indexed: it is new on every
/// response, so entering it in HPACK's dynamic table only evicts useful
/// entries (and h2 compares each new one with every id already there).
fn request_id_value(id: RequestId) -> http::HeaderValue {
    let mut value = http::HeaderValue::from_str(id.as_str()).unwrap_or_else(|_| http::HeaderValue::from_static(""));
    value.set_sensitive(true);
    value
}

fn request_id_metadata(id: RequestId) -> tonic::metadata::MetadataValue<Ascii> {
    let mut value = tonic::metadata::MetadataValue::try_from(id.as_str())
        .unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static(""));
    value.set_sensitive(true);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_in_every_unit() {
        let with = |v: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-timeout", http::HeaderValue::from_static(v));
            grpc_timeout(&headers)
        };
        assert_eq!(with("3S"), Some(Duration::from_secs(3)));
        assert_eq!(with("250m"), Some(Duration::from_millis(250)));
        assert_eq!(with("2M"), Some(Duration::from_secs(120)));
        assert_eq!(with("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
        assert_eq!(with("123456789S"), None, "at most 8 digits");
        assert_eq!(with("S"), None);
        assert_eq!(with("5x"), None);
    }

    #[test]
    fn paths_name_the_served_rpcs_and_nothing_else() {
        assert_eq!(
            rpc_of("/boxbroker.v1.TokenBrokerService/GetToken", CLIENT_SERVICE),
            Some(Rpc::GetToken)
        );
        assert_eq!(
            rpc_of("/boxbroker.v1.BrokerAdminService/GetStatus", ADMIN_SERVICE),
            Some(Rpc::GetStatus)
        );
        assert_eq!(
            rpc_of("/boxbroker.v1.BrokerAdminService/GetStatus", CLIENT_SERVICE),
            None
        );
        assert_eq!(
            rpc_of("/boxbroker.v1.TokenBrokerService/Nope", CLIENT_SERVICE),
            Some(Rpc::Unknown)
        );
        assert_eq!(rpc_of("/grpc.health.v1.Health/Check", CLIENT_SERVICE), None);
    }

    #[test]
    fn a_bucket_refuses_past_its_burst_and_names_the_wait() {
        let buckets: Buckets<u32> = Buckets::new(1.0, 2);
        assert!(buckets.check(&7, Use::Take).is_ok());
        assert!(buckets.check(&7, Use::Take).is_ok());
        let wait = buckets.check(&7, Use::Take).err().unwrap_or_default();
        assert!((1..=1000).contains(&wait), "{wait}");
        assert!(buckets.check(&8, Use::Look).is_ok(), "another key is not affected");
        assert!(buckets.check(&7, Use::Look).is_err(), "looking does not refill it");
    }

    #[test]
    fn refilled_buckets_are_forgotten_and_empty_shards_take_no_lock() {
        let buckets: Buckets<u32> = Buckets::new(1000.0, 1);
        assert!(buckets.check(&7, Use::Take).is_ok());
        let shard = Buckets::<u32>::shard_of(&7);
        assert_eq!(buckets.held[shard].load(Ordering::Relaxed), 1);
        std::thread::sleep(Duration::from_millis(5));
        buckets.forget_full();
        assert_eq!(buckets.held[shard].load(Ordering::Relaxed), 0);
        assert!(buckets.held.iter().all(|h| h.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn ipv6_peers_are_counted_by_their_64_bit_prefix() {
        let peer = |addr: &str| Peer {
            addr: Some(addr.parse().unwrap_or_else(|_| unreachable!())),
            uid: None,
            certificates: None,
        };
        assert_eq!(
            PeerKey::of(&peer("[2001:db8::1]:5000")),
            PeerKey::of(&peer("[2001:db8::ffff:2]:6000"))
        );
        assert_ne!(
            PeerKey::of(&peer("[2001:db8:0:1::1]:5000")),
            PeerKey::of(&peer("[2001:db8::1]:5000"))
        );
        assert_eq!(
            PeerKey::of(&peer("10.0.0.1:1")),
            PeerKey::of(&peer("[::ffff:10.0.0.1]:2"))
        );
    }
}
