//! The Redis a fleet of central brokers shares (`[redis]`): a second-level
//! token cache, one mint per key across replicas (a lease), invalidation
//! notices, and the key set. Redis is an optimisation, never a dependency:
//! every call has a deadline, failures open a circuit breaker, and a
//! replica that cannot reach Redis serves its own cache and mints for
//! itself.
//!
//! What Redis holds, all under `{namespace}:`:
//!
//! - `t:{h}` — a hash per shared token: `v` the token, sealed with
//!   AES-256-GCM under a key derived from the KEK, the entry's name as
//!   associated data (a value copied under another name does not open);
//!   `i` when it was asked for (ms), which orders writes; `d` a keyed hash of the
//!   token's SHA-256 and, once served, `o` a keyed hash of its first caller
//!   and `s` when others were served too (what revocation asks). `{h}` is a
//!   keyed hash (HMAC-SHA256 under another derived key) of the app and the
//!   subject: no name reveals a user id, scope or target.
//! - `l:{h}` — the lease (`SET NX PX`, a random value, released by
//!   compare-and-delete); `g:{h}` — the key's invalidation count: a write
//!   under a lease taken before an invalidation is refused (fencing).
//! - `events` — a stream of sealed notices (revocations, invalidations, key
//!   sets), read by every replica.
//! - `k:{a}` — each app's key set, sealed, with its version: replaced only
//!   by a newer one.
//!
//! Never in Redis: private keys, secrets or tokens in plaintext, the KEK,
//! assertions, caller identities (only keyed hashes of them).

mod breaker;
mod crypto;
mod route;
mod scripts;

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures_util::{FutureExt as _, future::BoxFuture};
use redis::{AsyncCommands as _, aio::ConnectionManager};

use self::route::Route;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};

use self::{breaker::Breaker, crypto::Crypto};
use crate::{
    boxapi::{BoxSubject, IssuedToken},
    cache::{CachedToken, Lease, LeaseOutcome, Served, SharedStore, TokenKey},
    keys::store::{Kek, StoredApp},
};

/// Notices kept in the stream (older ones are trimmed).
const STREAM_LENGTH: usize = 10_000;
/// How long an invalidation count outlives its last change (far longer
/// than any lease).
const FENCE_TTL: Duration = Duration::from_secs(24 * 3600);
/// How many lives a lease is extended for at most while its holder mints.
const LEASE_EXTENSIONS: u32 = 4;
/// How long an admin change holds the app's key-set lock at least (see `Redis::keys_lock_ttl`).
const KEYS_LOCK_TTL: Duration = Duration::from_secs(60);

/// What `[redis]` says, with its files read.
pub struct Settings {
    /// Which Redis.
    pub server: Server,
    /// PEM CA certificates that sign the server's (and the Sentinels')
    /// certificate (`rediss://`).
    pub ca_pem: Option<Vec<u8>>,
    /// The ACL user.
    pub username: Option<String>,
    /// Its password (from a file).
    pub password: Option<SecretString>,
    /// Prefix of every key name.
    pub namespace: String,
    /// Connecting's time limit.
    pub connect_timeout: Duration,
    /// One command's time limit.
    pub command_timeout: Duration,
    /// How long a lease lasts: the mint deadline and a second.
    pub lease_ttl: Duration,
    /// How often notices are read and a lease holder's token looked for.
    pub poll_interval: Duration,
    /// Whether Service Account tokens are shared too.
    pub share_enterprise_tokens: bool,
    /// Failed calls in a row that open the circuit.
    pub breaker_threshold: u32,
    /// How long an open circuit skips Redis.
    pub breaker_cooldown: Duration,
    /// The cache's safety margin: a token is kept in Redis until its expiry minus this.
    pub safety_margin: Duration,
}

impl Settings {
    /// `[redis]`'s defaults for `url` (no TLS CA, no ACL user): what the
    /// benchmark and tests start from.
    pub fn with_defaults(url: String) -> Self {
        Self {
            server: Server::Url(url),
            ca_pem: None,
            username: None,
            password: None,
            namespace: "box-broker".to_owned(),
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_millis(250),
            // The default mint deadline (10 s) and a second.
            lease_ttl: Duration::from_secs(11),
            poll_interval: Duration::from_millis(200),
            share_enterprise_tokens: true,
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_secs(5),
            safety_margin: crate::cache::DEFAULT_SAFETY_MARGIN,
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("server", &self.server)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "****"))
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// Which Redis the fleet shares.
pub enum Server {
    /// One Redis: `redis://host:port/db`, `rediss://...` (TLS) or `unix:///path`.
    Url(String),
    /// The master that Redis Sentinels name (followed through failovers).
    Sentinel(SentinelSettings),
}

/// Redis Sentinels and the master they watch.
pub struct SentinelSettings {
    /// `redis://host:26379` or `rediss://host:26379` each (with TLS the
    /// master is reached over TLS too).
    pub addresses: Vec<String>,
    /// The name the Sentinels monitor the master under.
    pub master_name: String,
    /// The Sentinels' ACL user.
    pub username: Option<String>,
    /// The Sentinels' password (from a file).
    pub password: Option<SecretString>,
}

impl Server {
    /// For logs: the url without a password, or the Sentinels and the master's name.
    pub fn describe(&self) -> String {
        match self {
            Self::Url(url) => redact_url(url),
            Self::Sentinel(s) => format!(
                "master {:?} of the Sentinels {}",
                s.master_name,
                s.shown_addresses().join(", ")
            ),
        }
    }
}

impl SentinelSettings {
    /// The addresses without any password in them.
    fn shown_addresses(&self) -> Vec<String> {
        self.addresses.iter().map(|a| redact_url(a)).collect()
    }
}

impl fmt::Debug for SentinelSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelSettings")
            .field("addresses", &self.shown_addresses())
            .field("master_name", &self.master_name)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "****"))
            .finish()
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// `url` without any password in it.
pub fn redact_url(url: &str) -> String {
    // A query may hold one too (`unix:///redis.sock?pass=...`).
    let (url, query) = url.split_once('?').map_or((url, ""), |(url, _)| (url, "?****"));
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://****@{}{query}", &url[..scheme], &url[at + 1..]),
        _ => format!("{url}{query}"),
    }
}

/// A notice one replica sends the others (sealed in the stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Notice {
    /// A token was revoked at Box: drop every copy.
    Revoked {
        /// The app.
        app: String,
        /// The token's SHA-256, hex.
        digest: String,
    },
    /// `InvalidateTokens`: drop the app's (or every app's) tokens, or a subject's.
    Invalidated {
        /// The app; every app when absent.
        app: Option<String>,
        /// The subject; every subject when absent.
        subject: Option<NoticeSubject>,
    },
    /// An app's key set changed.
    KeySet {
        /// The app.
        app: String,
        /// The new version.
        version: u64,
    },
    /// Not sent: this replica could not read notices for a while (or just
    /// started) and may have missed some: drop the cached tokens, look at
    /// the key sets again.
    #[serde(skip)]
    Resync,
    /// Not sent: look at the key sets again (every [`CATCH_UP_INTERVAL`]:
    /// a set another replica could not publish at once is found so).
    #[serde(skip)]
    CatchUp,
}

/// How often each replica compares its key sets with the fleet's.
pub const CATCH_UP_INTERVAL: Duration = Duration::from_secs(30);

/// A subject in an [`Notice::Invalidated`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeSubject {
    /// The Service Account.
    Enterprise,
    /// A user by Box id.
    User(String),
    /// An App User by external id.
    External(String),
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Shared tokens found.
    pub hits: AtomicU64,
    /// Looked for and not found.
    pub misses: AtomicU64,
    /// Calls that timed out.
    pub timeouts: AtomicU64,
    /// Calls Redis answered with an error (or the connection failed).
    pub errors: AtomicU64,
    /// Values that did not decrypt or parse (treated as misses).
    pub undecryptable: AtomicU64,
    /// Calls skipped because the circuit was open.
    pub skipped: AtomicU64,
    /// Flights that waited for another replica's lease.
    pub lease_waits: AtomicU64,
    /// Leases taken after waiting (the holder finished without a token, or died).
    pub lease_takeovers: AtomicU64,
    /// Tokens written.
    pub writes: AtomicU64,
    /// Writes refused: the lease was lost, the key was invalidated since
    /// it was taken, or a newer token is held.
    pub writes_refused: AtomicU64,
    /// Notices sent.
    pub notices_sent: AtomicU64,
    /// Notices received from other replicas.
    pub notices_received: AtomicU64,
}

/// The shared Redis. Cloning shares it.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Route,
    ns: String,
    crypto: Crypto,
    settings: Settings,
    breaker: Breaker,
    /// The masters the breaker has seen named (see [`Redis::run`]).
    breaker_generation: AtomicU64,
    counters: Counters,
    /// Random per process: a replica skips its own notices.
    origin: String,
    /// What could not be sent while Redis was unavailable, sent again when
    /// it answers (bounded: the oldest drops go first, then the oldest notices).
    outbox: std::sync::Mutex<std::collections::VecDeque<Pending>>,
    /// A flush of the outbox is under way.
    flushing: std::sync::atomic::AtomicBool,
    /// The outbox overflowed (logged once).
    outbox_full_logged: std::sync::atomic::AtomicBool,
    /// What this replica sent in the last [`REPLAY_WINDOW`] (kept only when
    /// following Sentinels): sent again to a new master, which may not have
    /// had it from the old one (replication is asynchronous).
    recent: std::sync::Mutex<std::collections::VecDeque<(std::time::Instant, Pending)>>,
    /// A resend to a new master stopped (Redis failing again): the rest of
    /// `recent` is sent again at the next read of notices.
    replay_left: std::sync::atomic::AtomicBool,
    /// The leases this replica extends while it mints, by value: the flag
    /// stops the extension.
    kept: std::sync::Mutex<std::collections::HashMap<String, Arc<std::sync::atomic::AtomicBool>>>,
}

/// Something to send again once Redis answers.
#[derive(Debug, Clone)]
enum Pending {
    /// A notice to the other replicas.
    Notice(Notice),
    /// A token to drop and its count to raise: (token name, fence name).
    Drop(String, String),
    /// Every token of this app.
    DropApp(String),
    /// A holder record: (record name, caller tag, served to others too).
    Served(String, String, bool),
}

/// How many undelivered notices and drops a replica keeps.
const OUTBOX_LENGTH: usize = 1000;
/// How long what a replica sent is kept to send again to a new master
/// (longer than Sentinel takes to fail over with its usual settings, and
/// than the old master may lag behind it in replication).
const REPLAY_WINDOW: Duration = Duration::from_secs(60);

/// Why an app's key-set lock was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockError {
    /// Another replica holds it.
    Held,
    /// Redis cannot be asked.
    Unavailable,
}

impl fmt::Debug for Redis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redis")
            .field("settings", &self.inner.settings)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// A problem with `[redis]` found before any connection.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SetupError(pub String);

impl Redis {
    /// A client for `settings` (no connection yet: a Redis that is down
    /// does not hold up startup), sealing with keys derived from `kek`.
    pub fn new(settings: Settings, kek: &Kek) -> Result<Self, SetupError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.command_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = match &settings.server {
            Server::Url(url) => {
                let client = client_for(
                    url,
                    settings.username.as_deref(),
                    settings.password.as_ref(),
                    settings.ca_pem.as_deref(),
                )
                .map_err(|e| SetupError(format!("url {}", e.0)))?;
                Route::Direct(
                    ConnectionManager::new_lazy_with_config(client, config)
                        .map_err(|e| SetupError(format!("url {}: {e}", redact_url(url))))?,
                )
            }
            Server::Sentinel(sentinels) => {
                let (client, watched) = sentinel_client(sentinels, &settings)?;
                Route::Sentinel(Arc::new(route::Follow::new(client, watched, config)))
            }
        };
        let mut origin = [0u8; 8];
        let _ = aws_lc_rs::rand::fill(&mut origin);
        Ok(Self {
            inner: Arc::new(Inner {
                conn,
                ns: settings.namespace.clone(),
                crypto: Crypto::new(kek),
                breaker: Breaker::new(settings.breaker_threshold, settings.breaker_cooldown),
                breaker_generation: AtomicU64::new(0),
                settings,
                counters: Counters::default(),
                origin: hex::encode(origin),
                outbox: std::sync::Mutex::new(std::collections::VecDeque::new()),
                flushing: std::sync::atomic::AtomicBool::new(false),
                outbox_full_logged: std::sync::atomic::AtomicBool::new(false),
                recent: std::sync::Mutex::new(std::collections::VecDeque::new()),
                replay_left: std::sync::atomic::AtomicBool::new(false),
                kept: std::sync::Mutex::new(std::collections::HashMap::new()),
            }),
        })
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// `up` while calls succeed, `degraded` while the circuit is open.
    pub fn state(&self) -> &'static str {
        if self.inner.breaker.is_open() { "degraded" } else { "up" }
    }

    /// The last failure, if the circuit is open.
    pub fn last_error(&self) -> Option<String> {
        self.inner.breaker.last_error()
    }

    /// The Redis in use: the url, or the master the Sentinels named (`host:port`).
    pub fn server(&self) -> String {
        match (&self.inner.settings.server, self.inner.conn.master()) {
            (Server::Sentinel(_), Some(master)) => master,
            (server, _) => server.describe(),
        }
    }

    /// Times the Sentinels named a new master (0 for one Redis).
    pub fn master_switches(&self) -> u64 {
        self.inner.conn.switches()
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.ns
    }

    /// Runs one call under the deadline and the circuit breaker: `None`
    /// when skipped, late or failed (counted and remembered).
    async fn run<T>(&self, what: &str, call: impl Future<Output = redis::RedisResult<T>>) -> Option<T> {
        let inner = &self.inner;
        let generation = inner.conn.generation();
        if inner.breaker_generation.fetch_max(generation, Ordering::Relaxed) < generation {
            // A master named (the first, or a new one): no need to wait out
            // a cooldown earned before it was known.
            inner.breaker.try_now();
        }
        if !inner.breaker.allows() {
            inner.counters.skipped.fetch_add(1, Ordering::Relaxed);
            inner.conn.skipped();
            return None;
        }
        self.run_always(what, call).await
    }

    /// [`Self::run`] even while the circuit is open: for the calls that undo
    /// what an earlier call may have done (a lease or lock released).
    async fn run_always<T>(&self, what: &str, call: impl Future<Output = redis::RedisResult<T>>) -> Option<T> {
        let inner = &self.inner;
        let generation = inner.conn.generation();
        let result = tokio::time::timeout(inner.settings.command_timeout, call).await;
        // A call that failed before a master was named (or on the old one
        // after the switch to a new one) says nothing of it.
        let stale = inner.conn.generation() != generation;
        match result {
            Ok(Ok(value)) => {
                inner.breaker.succeeded();
                Some(value)
            }
            Ok(Err(_)) | Err(_) if stale => {
                inner.counters.errors.fetch_add(1, Ordering::Relaxed);
                None
            }
            Ok(Err(e)) => {
                // Failures a failover explains: the master gone, or demoted.
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || matches!(
                        e.kind(),
                        redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown)
                    )
                {
                    inner.conn.doubt();
                }
                inner.counters.errors.fetch_add(1, Ordering::Relaxed);
                inner.breaker.failed(format!("{what}: {e}"));
                None
            }
            Err(_) => {
                inner.conn.doubt();
                inner.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                inner
                    .breaker
                    .failed(format!("{what}: no answer within {:?}", inner.settings.command_timeout));
                None
            }
        }
    }

    fn conn(&self) -> Route {
        self.inner.conn.clone()
    }

    /// Runs a Lua script with the keys and arguments `with` gives it (see [`Self::run`]).
    async fn eval<T: redis::FromRedisValue>(
        &self,
        what: &str,
        script: &'static redis::Script,
        with: impl FnOnce(&mut redis::ScriptInvocation<'static>),
    ) -> Option<T> {
        let mut call = script.prepare_invoke();
        with(&mut call);
        let mut conn = self.conn();
        self.run(what, async move { call.invoke_async(&mut conn).await }).await
    }

    /// The keyed-hash part of a token's names: the app's, then the subject's
    /// (so an app's tokens can be found by pattern, and no name says whose).
    fn token_hash(&self, key: &TokenKey) -> String {
        let subject = format!("{}\n{}\n{}", key.app, key.subject.sub_type(), key.subject.id().as_str());
        format!(
            "{}:{}",
            self.app_hash(&key.app),
            self.inner.crypto.name("token", subject.as_bytes())
        )
    }

    fn app_hash(&self, app: &str) -> String {
        self.inner.crypto.name("app", app.as_bytes())
    }

    /// The app's invalidation count (raised when all its tokens are dropped).
    fn app_fence(&self, app: &str) -> String {
        self.name("ga", &self.app_hash(app))
    }

    /// Keeps `pending` to send again when Redis answers.
    fn postpone(&self, pending: Pending) {
        if let Ok(mut outbox) = self.inner.outbox.lock() {
            if outbox.len() >= OUTBOX_LENGTH {
                // Notices (what the other replicas act on) are kept longest.
                let oldest = outbox
                    .iter()
                    .position(|p| !matches!(p, Pending::Notice(_)))
                    .unwrap_or(0);
                outbox.remove(oldest);
                if !self.inner.outbox_full_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "{OUTBOX_LENGTH} notices and drops wait for Redis: the oldest are dropped (the tokens they were about expire within the hour)"
                    );
                }
            }
            outbox.push_back(pending);
        }
    }

    /// Keeps `pending`, just sent, to send again to a new master (Sentinel only).
    fn sent(&self, pending: Pending) {
        if !matches!(self.inner.settings.server, Server::Sentinel(_)) {
            return;
        }
        if let Ok(mut recent) = self.inner.recent.lock() {
            let now = std::time::Instant::now();
            while recent
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > REPLAY_WINDOW)
                || recent.len() >= OUTBOX_LENGTH
            {
                recent.pop_front();
            }
            recent.push_back((now, pending));
        }
    }

    /// The Sentinels named a new master: what this replica sent in the last
    /// [`REPLAY_WINDOW`] (up to [`OUTBOX_LENGTH`] of it) is sent again (the
    /// old master may not have passed it on before it failed), and kept
    /// again, for a master that fails soon after this one. What fails waits
    /// in the outbox; once the circuit opens, the rest waits here and is
    /// sent at the next read of notices. Holder records are not sent again.
    async fn replay_recent(&self) {
        let now = std::time::Instant::now();
        let mut again: std::collections::VecDeque<(std::time::Instant, Pending)> = self
            .inner
            .recent
            .lock()
            .map(|mut recent| {
                recent
                    .drain(..)
                    .filter(|(at, _)| now.duration_since(*at) <= REPLAY_WINDOW)
                    .collect()
            })
            .unwrap_or_default();
        let count = again.len();
        let mut failed = 0usize;
        while let Some((at, pending)) = again.pop_front() {
            if !self.inner.breaker.allows() {
                // Redis fails again: the rest waits (not in the outbox, where
                // it would push out what never reached any master) and is
                // sent once notices can be read again.
                again.push_front((at, pending));
                break;
            }
            failed += usize::from(!self.deliver(pending).await);
        }
        let left = again.len();
        if left > 0 {
            if let Ok(mut recent) = self.inner.recent.lock() {
                for item in again.into_iter().rev() {
                    recent.push_front(item);
                }
            }
            self.inner.replay_left.store(true, Ordering::Release);
        }
        tracing::warn!(
            master = %self.server(),
            again = count,
            failed,
            left,
            "Redis has a new master: sent this replica's invalidations of the last minute again (what failed waits for Redis)"
        );
    }

    /// Sends `pending` (kept to send again if it fails). False if it failed.
    async fn deliver(&self, pending: Pending) -> bool {
        match pending {
            Pending::Notice(notice) => self.announce(&notice).await,
            Pending::Drop(token, fence) => self.invalidate_names(token, fence).await,
            Pending::DropApp(app) => self.invalidate_apps(&[app.as_str()]).await,
            Pending::Served(name, caller, others) => self.record_holder(name, caller, others).await,
        }
    }

    /// Sends what waited for Redis in a task of its own (one at a time;
    /// notices are not held up behind it); what fails again waits again.
    fn flush_outbox(&self) {
        let empty = self.inner.outbox.lock().map(|o| o.is_empty()).unwrap_or(true);
        if empty || self.inner.flushing.swap(true, Ordering::Relaxed) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            this.send_outbox().await;
            this.inner.flushing.store(false, Ordering::Relaxed);
        });
    }

    async fn send_outbox(&self) {
        self.inner.outbox_full_logged.store(false, Ordering::Relaxed);
        let waiting: Vec<Pending> = self
            .inner
            .outbox
            .lock()
            .map(|mut o| o.drain(..).collect())
            .unwrap_or_default();
        if waiting.is_empty() {
            return;
        }
        tracing::info!(count = waiting.len(), "sending what waited for Redis");
        for pending in waiting {
            self.deliver(pending).await;
        }
    }

    /// Drops every shared token of `apps` (as [`Self::invalidate`] does
    /// one's). False if Redis could not be asked.
    pub async fn invalidate_apps(&self, apps: &[&str]) -> bool {
        let mut all = true;
        for app in apps {
            // First the app's count: a mint under way cannot write after this.
            let raised: Option<i64> = self
                .eval("invalidate an app's tokens", &scripts::RAISE, |s| {
                    s.key(self.app_fence(app)).arg(millis(FENCE_TTL));
                })
                .await;
            if raised.is_none() {
                all = false;
                self.postpone(Pending::DropApp((*app).to_owned()));
                continue;
            }
            let pattern = self.name("t", &format!("{}:*", self.app_hash(app)));
            let mut cursor = 0u64;
            loop {
                let (p, mut conn) = (pattern.clone(), self.conn());
                let page: Option<(u64, Vec<String>)> = self
                    .run("find an app's tokens", async move {
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(&p)
                            .arg("COUNT")
                            .arg(1000)
                            .query_async(&mut conn)
                            .await
                    })
                    .await;
                let Some((next, names)) = page else {
                    all = false;
                    self.postpone(Pending::DropApp((*app).to_owned()));
                    break;
                };
                // (One drop of the whole app waits if any fails, not each token's.)
                let mut dropped = true;
                for name in names {
                    let fence = name.replacen(&format!("{}:t:", self.inner.ns), &format!("{}:g:", self.inner.ns), 1);
                    dropped &= self.drop_names(name, fence).await;
                }
                if !dropped {
                    all = false;
                    self.postpone(Pending::DropApp((*app).to_owned()));
                    break;
                }
                if next == 0 {
                    self.sent(Pending::DropApp((*app).to_owned()));
                    break;
                }
                cursor = next;
            }
        }
        all
    }

    fn name(&self, kind: &str, hash: &str) -> String {
        format!("{}:{kind}:{hash}", self.inner.ns)
    }

    fn stream(&self) -> String {
        format!("{}:events", self.inner.ns)
    }

    /// The keyed hash a caller is recorded under (never the identity).
    fn caller_tag(&self, caller: &str) -> String {
        self.inner.crypto.name("caller", caller.as_bytes())
    }

    /// Whether the fleet's record says the token whose SHA-256 is `digest`
    /// was served to `caller` only: `Ok(None)` when Redis holds no record of
    /// it (the replica's own record decides), `Err` when Redis cannot be asked.
    pub async fn served_only_to(&self, digest: &[u8; 32], caller: &str) -> Result<Option<bool>, LockError> {
        let name = self.holders(digest);
        let mut conn = self.conn();
        let (owner, shared): (Option<String>, Option<String>) = self
            .run("read a token's holders", async move {
                redis::cmd("HMGET")
                    .arg(&name)
                    .arg("o")
                    .arg("s")
                    .query_async(&mut conn)
                    .await
            })
            .await
            .ok_or(LockError::Unavailable)?;
        Ok(owner.map(|owner| shared.is_none() && owner == self.caller_tag(caller)))
    }

    /// Records that the caller tagged `caller` was served the token whose
    /// record is `name` (and `others` too); kept to send again if Redis
    /// cannot be asked (revocation reads it).
    async fn record_holder(&self, name: String, caller: String, others: bool) -> bool {
        // As long as the token can live.
        let ttl = millis(Duration::from_secs(2 * 3600));
        let done: Option<i64> = self
            .eval("record a token's holder", &scripts::SERVED, |s| {
                s.key(&name).arg(&caller).arg(u8::from(others)).arg(ttl);
            })
            .await;
        if done.is_none() {
            self.postpone(Pending::Served(name, caller, others));
        }
        done.is_some()
    }

    /// The name of the record of who was served the token whose SHA-256 is `digest`.
    fn holders(&self, digest: &[u8; 32]) -> String {
        self.name("o", &self.inner.crypto.name("digest", digest))
    }

    /// Drops the shared token of `key` and raises its invalidation count,
    /// so a write under a lease taken before now is refused.
    /// False if Redis could not be asked (it is done when it answers again).
    pub async fn invalidate(&self, key: &TokenKey) -> bool {
        let hash = self.token_hash(key);
        self.invalidate_names(self.name("t", &hash), self.name("g", &hash))
            .await
    }

    async fn invalidate_names(&self, token: String, fence: String) -> bool {
        let pending = Pending::Drop(token.clone(), fence.clone());
        let done = self.drop_names(token, fence).await;
        if done {
            self.sent(pending);
        } else {
            self.postpone(pending);
        }
        done
    }

    /// Drops a token and raises its count; false if Redis could not be asked.
    async fn drop_names(&self, token: String, fence: String) -> bool {
        let done: Option<i64> = self
            .eval("invalidate a token", &scripts::INVALIDATE, |s| {
                s.key(token).key(fence).arg(millis(FENCE_TTL));
            })
            .await;
        done.is_some()
    }

    /// Sends `notice` to the other replicas. False if Redis could not take it.
    pub async fn announce(&self, notice: &Notice) -> bool {
        let stream = self.stream();
        let Ok(plain) = serde_json::to_vec(notice) else {
            return false;
        };
        let sealed = self.inner.crypto.seal(&stream, &plain);
        let origin = self.inner.origin.clone();
        let mut conn = self.conn();
        let sent: Option<String> = self
            .run("send a notice", async move {
                redis::cmd("XADD")
                    .arg(&stream)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(STREAM_LENGTH)
                    .arg("*")
                    .arg("o")
                    .arg(origin)
                    .arg("n")
                    .arg(sealed)
                    .query_async(&mut conn)
                    .await
            })
            .await;
        if sent.is_some() {
            self.inner.counters.notices_sent.fetch_add(1, Ordering::Relaxed);
            self.sent(Pending::Notice(notice.clone()));
        } else {
            self.postpone(Pending::Notice(notice.clone()));
        }
        sent.is_some()
    }

    /// Reads the other replicas' notices until the receiver is dropped:
    /// every `poll_interval`, from where the last read stopped, and sends
    /// what waited for Redis. [`Notice::Resync`] comes on the first read
    /// and after a time Redis could not be read; [`Notice::CatchUp`] every
    /// [`CATCH_UP_INTERVAL`].
    pub fn notices(&self) -> tokio::sync::mpsc::Receiver<Notice> {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        if let Server::Sentinel(sentinels) = &self.inner.settings.server {
            self.inner.conn.watch(&sentinels.master_name);
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut last: Option<String> = None;
            // The first read may follow a startup that could not read the key sets.
            let mut missed = true;
            let mut interval = tokio::time::interval(this.inner.settings.poll_interval);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut caught_up = std::time::Instant::now();
            let mut switches = this.master_switches();
            loop {
                interval.tick().await;
                if tx.is_closed() {
                    return;
                }
                let now = this.master_switches();
                if now != switches {
                    switches = now;
                    let replay = this.clone();
                    tokio::spawn(async move { replay.replay_recent().await });
                    // The new master may lack what was read from the old one,
                    // and what the others send again may be stamped below it
                    // (another host's clock): read the window again (notices
                    // are idempotent).
                    if let Some(read) = &last {
                        let (ms, _) = stream_id(read);
                        last = Some(format!("{}-0", ms.saturating_sub(millis(REPLAY_WINDOW))));
                    }
                    // A key set published to the old master only is published again.
                    if tx.send(Notice::CatchUp).await.is_err() {
                        return;
                    }
                }
                if caught_up.elapsed() >= CATCH_UP_INTERVAL {
                    caught_up = std::time::Instant::now();
                    if tx.send(Notice::CatchUp).await.is_err() {
                        return;
                    }
                }
                let read = match &last {
                    None => this.latest_notice_id().await.map(|id| (id, Vec::new())),
                    Some(from) => this.read_notices(from).await,
                };
                let Some((id, notices)) = read else {
                    missed = true;
                    continue;
                };
                if missed {
                    missed = false;
                    // Reading on from `last` replays what was missed, unless
                    // it is gone (trimmed, or Redis restarted empty); at
                    // startup, what came before the first read is unknown.
                    let gap = match &last {
                        None => true,
                        Some(last) => this.gone_after(last).await,
                    };
                    if gap {
                        if last.is_some() {
                            tracing::warn!(
                                "notices from the other replicas were lost (Redis restarted or trimmed them): dropping the cached tokens, reading the key sets"
                            );
                        }
                        if tx.send(Notice::Resync).await.is_err() {
                            return;
                        }
                    }
                }
                last = Some(id);
                this.flush_outbox();
                if this.inner.replay_left.swap(false, Ordering::AcqRel) {
                    let replay = this.clone();
                    tokio::spawn(async move { replay.replay_recent().await });
                }
                for notice in notices {
                    this.inner.counters.notices_received.fetch_add(1, Ordering::Relaxed);
                    if tx.send(notice).await.is_err() {
                        return;
                    }
                }
            }
        });
        rx
    }

    /// Whether notices after `last` may be gone: the oldest one kept is
    /// newer than `last` (those between were trimmed, or Redis restarted
    /// and the stream began again), or there is none though `last` was read
    /// (Redis lost it). True when Redis cannot say.
    async fn gone_after(&self, last: &str) -> bool {
        let stream = self.stream();
        let mut conn = self.conn();
        let oldest: Option<redis::streams::StreamRangeReply> = self
            .run("read notices", async move {
                redis::cmd("XRANGE")
                    .arg(&stream)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn)
                    .await
            })
            .await;
        match oldest.map(|r| r.ids.first().map(|e| e.id.clone())) {
            None => true,
            Some(None) => last != "0-0",
            Some(Some(oldest)) => stream_id(&oldest) > stream_id(last),
        }
    }

    /// The newest notice's id ("0-0" for none yet).
    async fn latest_notice_id(&self) -> Option<String> {
        let stream = self.stream();
        let mut conn = self.conn();
        let newest: redis::streams::StreamRangeReply = self
            .run("read notices", async move {
                redis::cmd("XREVRANGE")
                    .arg(&stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Some(newest.ids.first().map_or_else(|| "0-0".to_owned(), |e| e.id.clone()))
    }

    /// Notices after `from` (other replicas' only) and the id to read from next.
    async fn read_notices(&self, from: &str) -> Option<(String, Vec<Notice>)> {
        let stream = self.stream();
        let mut conn = self.conn();
        let from_owned = from.to_owned();
        let key = stream.clone();
        let reply: Option<redis::streams::StreamReadReply> = self
            .run("read notices", async move {
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(512)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(&from_owned)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let mut next = from.to_owned();
        let mut notices = Vec::new();
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            next = entry.id.clone();
            let bytes = |field: &str| match entry.map.get(field) {
                Some(redis::Value::BulkString(b)) => Some(b.clone()),
                _ => None,
            };
            if bytes("o").as_deref() == Some(self.inner.origin.as_bytes()) {
                continue;
            }
            let notice = bytes("n")
                .and_then(|sealed| self.inner.crypto.open(&stream, &sealed))
                .and_then(|plain| serde_json::from_slice::<Notice>(&plain).ok());
            match notice {
                Some(notice) => notices.push(notice),
                None => {
                    self.inner.counters.undecryptable.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("a notice in Redis does not decrypt (another KEK, or tampered with); ignored");
                }
            }
        }
        Some((next, notices))
    }

    /// Publishes `app`'s key set as `version`, unless Redis holds a newer
    /// (or the same) version. True when written.
    pub async fn publish_key_set(&self, app: &str, version: u64, set: &StoredApp, lock: &KeysLock) -> bool {
        let name = self.name("k", &self.app_hash(app));
        let Ok(plain) = serde_json::to_vec(set).map(zeroize::Zeroizing::new) else {
            return false;
        };
        let sealed = self.inner.crypto.seal(&name, &plain);
        let written: Option<i64> = self
            .eval("publish a key set", &scripts::PUT_KEY_SET, |s| {
                s.key(&name).key(&lock.name).arg(version).arg(sealed).arg(&lock.value);
            })
            .await;
        if written == Some(1) {
            self.announce(&Notice::KeySet {
                app: app.to_owned(),
                version,
            })
            .await;
        }
        written == Some(1)
    }

    /// `app`'s key set in Redis and its version: `Ok(None)` when Redis
    /// holds none (or one that does not open, or whose sealed version is
    /// not the one it is filed under: counted and logged), `Err` when Redis
    /// cannot be asked.
    pub async fn key_set(&self, app: &str) -> Result<Option<(u64, StoredApp)>, LockError> {
        let name = self.name("k", &self.app_hash(app));
        let mut conn = self.conn();
        let key = name.clone();
        let (version, sealed): (Option<u64>, Option<Vec<u8>>) = self
            .run("read a key set", async move {
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg("ver")
                    .arg("v")
                    .query_async(&mut conn)
                    .await
            })
            .await
            .ok_or(LockError::Unavailable)?;
        let (Some(version), Some(sealed)) = (version, sealed) else {
            return Ok(None);
        };
        // The version that counts is the sealed one: `ver` (which the
        // script compares) is only a copy, which anyone who can write to
        // Redis could raise over an older sealed set.
        let set = self
            .inner
            .crypto
            .open(&name, &sealed)
            .map(zeroize::Zeroizing::new)
            .and_then(|plain| serde_json::from_slice::<StoredApp>(&plain).ok())
            .filter(|set| set.version == version);
        let Some(set) = set else {
            self.inner.counters.undecryptable.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                app,
                "the key set in Redis does not decrypt or is not filed under its own version (another KEK, or tampered with); ignored"
            );
            return Ok(None);
        };
        Ok(Some((version, set)))
    }

    /// The lock on creating the App User of `external_id` in `app`, waited
    /// for up to a lease's life (a creation is one call to Box): `None`
    /// when Redis cannot be asked, or the holder outlasted the wait (the
    /// caller then goes on alone; Box's answer to a second POST, or the
    /// next look, settles it). The name is a keyed hash.
    pub async fn lock_creation(&self, app: &str, external_id: &str) -> Option<KeysLock> {
        let name = self.name(
            "cl",
            &self
                .inner
                .crypto
                .name("creation", format!("{app}\n{external_id}").as_bytes()),
        );
        self.lock(name, self.inner.settings.lease_ttl, self.inner.settings.lease_ttl)
            .await
            .ok()
    }

    /// How long an admin change holds the key-set lock at most: long
    /// enough for a trial mint (the mint deadline, with fallbacks).
    fn keys_lock_ttl(&self) -> Duration {
        KEYS_LOCK_TTL.max(self.inner.settings.lease_ttl * 3)
    }

    /// Takes `app`'s key-set lock for an admin change, waiting up to `wait`.
    pub async fn lock_keys(&self, app: &str, wait: Duration) -> Result<KeysLock, LockError> {
        self.lock(self.name("kl", &self.app_hash(app)), self.keys_lock_ttl(), wait)
            .await
    }

    /// Takes the lock `name` for at most `ttl`, waiting up to `wait` for its holder.
    async fn lock(&self, name: String, ttl: Duration, wait: Duration) -> Result<KeysLock, LockError> {
        let value = random_value();
        let since = std::time::Instant::now();
        loop {
            let mut conn = self.conn();
            let (n, v) = (name.clone(), value.clone());
            let taken: Option<Option<String>> = self
                .run("lock a key set", async move {
                    redis::cmd("SET")
                        .arg(&n)
                        .arg(&v)
                        .arg("NX")
                        .arg("PX")
                        .arg(millis(ttl))
                        .query_async(&mut conn)
                        .await
                })
                .await;
            match taken {
                None => {
                    // It may have been taken after all: not left behind.
                    self.release_name(name, value).await;
                    return Err(LockError::Unavailable);
                }
                Some(Some(_)) => {
                    return Ok(KeysLock {
                        redis: self.clone(),
                        name,
                        value,
                    });
                }
                Some(None) if since.elapsed() >= wait => return Err(LockError::Held),
                Some(None) => {
                    let left = wait.saturating_sub(since.elapsed());
                    tokio::time::sleep(self.inner.settings.poll_interval.min(left)).await;
                }
            }
        }
    }

    /// Compare-and-delete: releases `name` if it still holds `value`.
    async fn release_name(&self, name: String, value: String) {
        self.stop_keeping(&value);
        let mut conn = self.conn();
        let mut release = scripts::RELEASE.prepare_invoke();
        release.key(name).arg(value);
        let _: Option<i64> = self
            .run_always("release a lease", async move { release.invoke_async(&mut conn).await })
            .await;
    }

    /// The token sealed under `name`, if there is one and it opens (a
    /// value that does not is counted, dropped and a miss).
    async fn open_token(&self, name: String, sealed: Option<Vec<u8>>) -> Option<IssuedToken> {
        let counters = &self.inner.counters;
        let Some(sealed) = sealed else {
            counters.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let opened = self
            .inner
            .crypto
            .open(&name, &sealed)
            .map(zeroize::Zeroizing::new)
            .and_then(|plain| serde_json::from_slice::<Sealed>(&plain).ok());
        let Some(token) = opened else {
            counters.undecryptable.fetch_add(1, Ordering::Relaxed);
            counters.misses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "a token in Redis does not decrypt (another KEK, or tampered with): dropped, and minted instead"
            );
            let _: Option<i64> = self
                .eval("drop a value that does not decrypt", &scripts::DROP_GARBAGE, |s| {
                    s.key(name).arg(sealed);
                })
                .await;
            return None;
        };
        counters.hits.fetch_add(1, Ordering::Relaxed);
        Some(IssuedToken {
            access_token: SecretString::from(token.a.as_str()),
            expires_at: from_unix_ms(token.e),
            issued_at: from_unix_ms(token.i),
            token_type: token.y.clone().unwrap_or_else(|| "bearer".to_owned()),
            request_id: token.r.clone(),
            restricted_to: Vec::new(),
        })
    }

    /// Extends the lease `name` (holding `value`) every third of its life
    /// while its holder mints — past the first life when Box is slow, a
    /// standby key or an older secret is tried — until the holder writes
    /// or releases it (or [`LEASE_EXTENSIONS`] lives, whichever comes first).
    /// A holder that dies stops extending it: the others take over when
    /// it runs out.
    fn keep_alive(&self, name: String, value: String) {
        let this = self.clone();
        let ttl = self.inner.settings.lease_ttl;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Ok(mut kept) = self.inner.kept.lock() {
            kept.insert(value.clone(), stop.clone());
        }
        tokio::spawn(async move {
            for _ in 0..LEASE_EXTENSIONS * 3 {
                tokio::time::sleep(ttl / 3).await;
                // The holder wrote or released it, whatever Redis answered.
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let held: Option<i64> = this
                    .eval("extend a lease", &scripts::EXTEND, |s| {
                        s.key(&name).arg(&value).arg(millis(ttl));
                    })
                    .await;
                if held == Some(0) {
                    break;
                }
            }
            this.stop_keeping(&value);
        });
    }

    /// Stops extending the lease holding `value`.
    fn stop_keeping(&self, value: &str) {
        if let Some(stop) = self.inner.kept.lock().ok().and_then(|mut kept| kept.remove(value)) {
            stop.store(true, Ordering::Relaxed);
        }
    }

    /// The shared token's lifetime in Redis: until the cache would stop serving it.
    fn ttl_of(&self, token: &CachedToken) -> Option<Duration> {
        token
            .expires_at
            .checked_sub(self.inner.settings.safety_margin)?
            .duration_since(crate::clock::system_now())
            .ok()
            .filter(|d| !d.is_zero())
    }
}

/// An app's key-set lock, released when dropped.
#[derive(Debug)]
pub struct KeysLock {
    redis: Redis,
    name: String,
    value: String,
}

impl Drop for KeysLock {
    fn drop(&mut self) {
        let (redis, name, value) = (
            self.redis.clone(),
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.value),
        );
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { redis.release_name(name, value).await });
        }
    }
}

/// A client for `url` as `username` with `password`, trusting `ca_pem`'s
/// certificates (`rediss://` only).
fn client_for(
    url: &str,
    username: Option<&str>,
    password: Option<&SecretString>,
    ca_pem: Option<&[u8]>,
) -> Result<redis::Client, SetupError> {
    use redis::IntoConnectionInfo as _;
    let bad = |e: redis::RedisError| SetupError(format!("{}: {e}", redact_url(url)));
    let info = url.into_connection_info().map_err(bad)?;
    let mut redis_settings = info.redis_settings().clone();
    if let Some(user) = username {
        redis_settings = redis_settings.set_username(user);
    }
    if let Some(password) = password {
        redis_settings = redis_settings.set_password(password.expose_secret());
    }
    let info = info.set_redis_settings(redis_settings);
    let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
    match (ca_pem, tls) {
        (Some(pem), true) => redis::Client::build_with_tls(info, ca_certificates(pem)),
        (Some(_), false) => {
            return Err(SetupError(format!(
                "ca_file is set, but {} is not rediss://",
                redact_url(url)
            )));
        }
        (None, _) => redis::Client::open(info),
    }
    .map_err(bad)
}

/// A client that asks `sentinels` for their master (TLS to both when the
/// Sentinels are `rediss://`; the master gets `settings`' ACL user and
/// password), and one client per Sentinel to listen to.
fn sentinel_client(
    sentinels: &SentinelSettings,
    settings: &Settings,
) -> Result<(redis::sentinel::SentinelClient, Vec<redis::Client>), SetupError> {
    let watched = sentinels
        .addresses
        .iter()
        .map(|address| {
            client_for(
                address,
                sentinels.username.as_deref(),
                sentinels.password.as_ref(),
                settings.ca_pem.as_deref(),
            )
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SetupError(format!("sentinel {}", e.0)))?;
    let addresses: Vec<redis::ConnectionAddr> =
        watched.iter().map(|c| c.get_connection_info().addr().clone()).collect();
    let tls = addresses
        .iter()
        .any(|a| matches!(a, redis::ConnectionAddr::TcpTls { .. }));
    let bad = |e: redis::RedisError| SetupError(format!("sentinels: {e}"));
    let mut builder = redis::sentinel::SentinelClientBuilder::new(
        addresses,
        &sentinels.master_name,
        redis::sentinel::SentinelServerType::Master,
    )
    .map_err(bad)?;
    if let Some(user) = &settings.username {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = &settings.password {
        builder = builder.set_client_to_redis_password(password.expose_secret());
    }
    if let Some(user) = &sentinels.username {
        builder = builder.set_client_to_sentinel_username(user);
    }
    if let Some(password) = &sentinels.password {
        builder = builder.set_client_to_sentinel_password(password.expose_secret());
    }
    // (client_for refused a CA file without rediss://.)
    if tls {
        builder = builder
            .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
        if let Some(pem) = &settings.ca_pem {
            builder = builder
                .set_client_to_redis_certificates(ca_certificates(pem))
                .set_client_to_sentinel_certificates(ca_certificates(pem));
        }
    }
    Ok((builder.build().map_err(bad)?, watched))
}

/// Trust `pem`'s CA certificates (no client certificate).
fn ca_certificates(pem: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.to_vec()),
    }
}

/// A stream entry's id (`ms-seq`) as numbers, to compare.
fn stream_id(text: &str) -> (u64, u64) {
    let (ms, seq) = text.split_once('-').unwrap_or((text, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

fn random_value() -> String {
    let mut bytes = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    hex::encode(bytes)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn from_unix_ms(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0).unsigned_abs())
}

/// A shared token, as sealed in Redis.
#[derive(Serialize, Deserialize)]
struct Sealed {
    /// The access token.
    a: zeroize::Zeroizing<String>,
    /// Its type, when not bearer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    /// Expiry (Unix ms).
    e: i64,
    /// When it was asked for (Unix ms).
    i: i64,
    /// Box's request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    r: Option<String>,
}

impl SharedStore for Redis {
    fn shares(&self, key: &TokenKey) -> bool {
        key.downscope.is_none()
            && key.caller.is_none()
            && key.external.is_none()
            && (self.inner.settings.share_enterprise_tokens || matches!(key.subject, BoxSubject::User(_)))
    }

    fn get(&self, key: &TokenKey, again: bool) -> BoxFuture<'static, Option<IssuedToken>> {
        let this = self.clone();
        let name = self.name("t", &self.token_hash(key));
        async move {
            let mut conn = this.conn();
            let key = name.clone();
            let sealed: Option<Vec<u8>> = this
                .run("read a token", async move { conn.hget(&key, "v").await })
                .await?;
            // A flight waiting for another replica's token looks again and
            // again: only its first look counts as a miss.
            if sealed.is_none() && again {
                return None;
            }
            this.open_token(name, sealed).await
        }
        .boxed()
    }

    fn lease(&self, key: &TokenKey, waited: bool) -> BoxFuture<'static, LeaseOutcome> {
        let this = self.clone();
        let hash = self.token_hash(key);
        let app_fence = self.app_fence(&key.app);
        async move {
            let (lease, fence, token) = (this.name("l", &hash), this.name("g", &hash), this.name("t", &hash));
            let value = random_value();
            let (lease_name, token_name) = (lease.clone(), token.clone());
            let taken: Option<Option<(String, Vec<u8>)>> = this
                .eval("take a lease", &scripts::LEASE, |s| {
                    s.key(lease)
                        .key(fence)
                        .key(token)
                        .key(app_fence)
                        .arg(&value)
                        .arg(millis(this.inner.settings.lease_ttl));
                })
                .await;
            let counters = &this.inner.counters;
            match taken {
                None => {
                    // The call may have reached Redis after all (it was
                    // slow, or frozen and thawed): no lease is left behind.
                    tokio::spawn(async move { this.release_name(lease_name, value).await });
                    LeaseOutcome::Unavailable
                }
                Some(Some((fence, sealed))) => {
                    let found = if sealed.is_empty() {
                        None
                    } else {
                        this.open_token(token_name, Some(sealed)).await
                    };
                    if waited && found.is_none() {
                        counters.lease_takeovers.fetch_add(1, Ordering::Relaxed);
                    }
                    if found.is_none() {
                        this.keep_alive(lease_name, value.clone());
                    }
                    LeaseOutcome::Acquired {
                        lease: Lease { value, fence },
                        found,
                    }
                }
                Some(None) => {
                    if !waited {
                        counters.lease_waits.fetch_add(1, Ordering::Relaxed);
                    }
                    LeaseOutcome::HeldElsewhere
                }
            }
        }
        .boxed()
    }

    fn put(&self, key: &TokenKey, token: &CachedToken, lease: Lease) -> BoxFuture<'static, ()> {
        let this = self.clone();
        let hash = self.token_hash(key);
        let name = self.name("t", &hash);
        let app_fence = self.app_fence(&key.app);
        let ttl = self.ttl_of(token);
        let sealed = Sealed {
            a: zeroize::Zeroizing::new(token.access_token.expose_secret().to_owned()),
            y: (token.token_type() != "bearer").then(|| token.token_type().to_owned()),
            e: unix_ms(token.expires_at),
            i: unix_ms(token.minted_at),
            r: token.request_id.as_deref().map(str::to_owned),
        };
        let plain = serde_json::to_vec(&sealed).map(zeroize::Zeroizing::new);
        async move {
            let (lease_name, fence_name) = (this.name("l", &hash), this.name("g", &hash));
            let (Some(ttl), Ok(plain)) = (ttl, plain) else {
                this.release_name(lease_name, lease.value).await;
                return;
            };
            let value = this.inner.crypto.seal(&name, &plain);
            let written: Option<i64> = this
                .eval("write a token", &scripts::PUT, |s| {
                    s.key(&name)
                        .key(&lease_name)
                        .key(fence_name)
                        .key(app_fence)
                        .arg(&lease.value)
                        .arg(lease.fence)
                        .arg(sealed.i)
                        .arg(value)
                        .arg(millis(ttl));
                })
                .await;
            let counters = &this.inner.counters;
            match written {
                Some(1) => {
                    counters.writes.fetch_add(1, Ordering::Relaxed);
                }
                Some(outcome) => {
                    tracing::debug!(
                        outcome,
                        "a token was not written to Redis (lease lost, invalidated since, or older)"
                    );
                    counters.writes_refused.fetch_add(1, Ordering::Relaxed);
                }
                // The lease is not left to run out: the others would wait for it.
                None => this.release_name(lease_name, lease.value).await,
            }
        }
        .boxed()
    }

    fn release(&self, key: &TokenKey, lease: Lease) -> BoxFuture<'static, ()> {
        let this = self.clone();
        let name = self.name("l", &self.token_hash(key));
        async move { this.release_name(name, lease.value).await }.boxed()
    }

    fn wait(&self) -> (Duration, Duration) {
        let s = &self.inner.settings;
        (
            s.poll_interval.min(Duration::from_millis(50)),
            s.lease_ttl + s.poll_interval,
        )
    }

    fn served(&self, digest: &[u8; 32], caller: &Arc<str>, news: Served) {
        let this = self.clone();
        let (name, caller) = (self.holders(digest), self.caller_tag(caller));
        let others = news == Served::AlsoToOthers;
        tokio::spawn(async move { this.record_holder(name, caller, others).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_debug_shows_no_password() {
        let settings = Settings {
            username: Some("box-broker".to_owned()),
            password: Some(SecretString::from("hunter2-redis")),
            ..Settings::with_defaults("redis://redis:6379/0".to_owned())
        };
        let shown = format!("{settings:?}");
        assert!(shown.contains("box-broker") && shown.contains("****"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn sentinel_settings_show_no_password() {
        let sentinels = SentinelSettings {
            addresses: vec!["redis://s1:26379".to_owned(), "rediss://s2:26379".to_owned()],
            master_name: "box".to_owned(),
            username: Some("watcher".to_owned()),
            password: Some(SecretString::from("hunter2-sentinel")),
        };
        let shown = format!("{sentinels:?}");
        assert!(
            shown.contains("watcher") && shown.contains("****") && shown.contains("s2:26379"),
            "{shown}"
        );
        assert!(!shown.contains("hunter2"), "{shown}");
        let server = Server::Sentinel(sentinels);
        assert_eq!(
            server.describe(),
            "master \"box\" of the Sentinels redis://s1:26379, rediss://s2:26379"
        );
        let settings = Settings {
            server,
            ..Settings::with_defaults(String::new())
        };
        assert!(!format!("{settings:?}").contains("hunter2"));
    }

    #[test]
    fn a_url_is_shown_without_its_password() {
        assert_eq!(
            redact_url("unix:///run/redis.sock?db=1&pass=hunter2"),
            "unix:///run/redis.sock?****"
        );
        assert_eq!(
            redact_url("redis://broker:hunter2@redis:6379/0"),
            "redis://****@redis:6379/0"
        );
        assert_eq!(redact_url("rediss://redis:6380"), "rediss://redis:6380");
        assert_eq!(redact_url("unix:///run/redis.sock"), "unix:///run/redis.sock");
    }

    #[test]
    fn notices_round_trip_and_resync_is_never_sent() {
        let notice = Notice::Invalidated {
            app: Some("default".to_owned()),
            subject: Some(NoticeSubject::User("7000123".to_owned())),
        };
        let text = serde_json::to_string(&notice).unwrap_or_default();
        assert_eq!(serde_json::from_str::<Notice>(&text).ok(), Some(notice));
        assert!(serde_json::to_string(&Notice::Resync).is_err());
    }
}
