//! Where the fleet's Redis commands go: one Redis (`url`), or the master the
//! Sentinels name (`sentinels` + `master_name`). The master is asked for
//! again when a Sentinel announces a new master (`+switch-master`), after a
//! failed call, and every [`RECHECK`], so a failover is followed without a
//! restart; the old master's connection is dropped on a switch.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;

use super::millis;
use redis::{
    Cmd, Pipeline, RedisFuture, RedisResult, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    sentinel::SentinelClient,
};

/// How long a master the Sentinels named is used before they are asked again
/// (a demoted master that still answers reads is left within this).
const RECHECK: Duration = Duration::from_secs(30);
/// The least time between two lookups after failed calls (a dead master
/// fails every call; an announcement asks at once).
const ASK_GAP: Duration = Duration::from_millis(500);
/// How long one lookup may take (the crate bounds each Sentinel's and the
/// master's connection and answer; this bounds them all).
const LOOKUP_LIMIT: Duration = Duration::from_secs(5);

/// The connection every command goes through (cloning is cheap).
#[derive(Clone)]
pub(super) enum Route {
    /// One Redis, reconnected by the manager.
    Direct(ConnectionManager),
    /// The master the Sentinels name.
    Sentinel(Arc<Follow>),
}

/// The master the Sentinels name, and how to reach it.
pub(super) struct Follow {
    sentinels: tokio::sync::Mutex<SentinelClient>,
    /// The Sentinels, to listen to for announcements.
    watched: Arc<Vec<redis::Client>>,
    master: ArcSwapOption<Master>,
    config: ConnectionManagerConfig,
    /// A call failed (or a Sentinel announced a new master) since the
    /// master was last asked for.
    doubt: AtomicBool,
    /// The master a Sentinel announced (`host:port`) and when: asked for
    /// until a lookup names it (a Sentinel asked may lag behind), for up to
    /// [`RECHECK`].
    expected: std::sync::Mutex<Option<(String, Instant)>>,
    /// When the Sentinels were last asked (ms since `born`).
    asked_ms: AtomicU64,
    born: Instant,
    /// Times the master changed (the first one found is not a change).
    switches: AtomicU64,
    /// Times a master was put in use (the first one too).
    generation: AtomicU64,
    /// The Sentinels could not be asked at the last try (logged once).
    unreachable: AtomicBool,
    /// A lookup is under way.
    asking: AtomicBool,
    /// Asked for while a lookup was under way: another follows it.
    again: AtomicBool,
    /// Told when a lookup ends.
    done: tokio::sync::Notify,
}

struct Master {
    /// `host:port`, as the Sentinels name it.
    addr: String,
    conn: ConnectionManager,
}

impl Follow {
    /// Follows the master `sentinels` name; `watched` are clients for the
    /// same Sentinels, listened to for announcements.
    pub(super) fn new(sentinels: SentinelClient, watched: Vec<redis::Client>, config: ConnectionManagerConfig) -> Self {
        Self {
            sentinels: tokio::sync::Mutex::new(sentinels),
            watched: Arc::new(watched),
            master: ArcSwapOption::empty(),
            config,
            doubt: AtomicBool::new(false),
            expected: std::sync::Mutex::new(None),
            asked_ms: AtomicU64::new(0),
            born: Instant::now(),
            switches: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            unreachable: AtomicBool::new(false),
            asking: AtomicBool::new(false),
            again: AtomicBool::new(false),
            done: tokio::sync::Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the Sentinels should be asked again: a call failed since
    /// (and [`ASK_GAP`] passed since the last lookup), or [`RECHECK`] passed.
    fn due(&self) -> bool {
        let since = self.now_ms().saturating_sub(self.asked_ms.load(Ordering::Relaxed));
        (self.doubt.load(Ordering::Acquire) && since >= millis(ASK_GAP)) || since >= millis(RECHECK)
    }

    /// The master's connection. The Sentinels are asked in a task of its
    /// own when due (one lookup at a time, under [`LOOKUP_LIMIT`]), so a
    /// call never waits for them while a master is known: it goes on with
    /// the one in use until the lookup names another. Only before the first
    /// master is known does a call wait (under its own deadline).
    async fn connection(self: &Arc<Self>) -> RedisResult<ConnectionManager> {
        if !self.due()
            && let Some(master) = self.master.load().as_ref()
        {
            return Ok(master.conn.clone());
        }
        let done = self.done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        self.ask();
        if let Some(master) = self.master.load().as_ref() {
            return Ok(master.conn.clone());
        }
        done.await;
        match self.master.load().as_ref() {
            Some(master) => Ok(master.conn.clone()),
            None => Err(redis::RedisError::from((
                redis::ErrorKind::MasterNameNotFoundBySentinel,
                "no Redis Sentinel named the master",
            ))),
        }
    }

    /// Asks the Sentinels for the master in a task; if one is asking,
    /// another follows it.
    fn ask(self: &Arc<Self>) {
        if self.asking.swap(true, Ordering::AcqRel) {
            self.again.store(true, Ordering::Release);
            return;
        }
        // Failures from here on ask again after this lookup.
        self.doubt.store(false, Ordering::Release);
        let asking = Asking(Arc::clone(self));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let this = &asking.0;
            let found = tokio::time::timeout(LOOKUP_LIMIT, async {
                this.sentinels.lock().await.async_get_client().await
            })
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "the Redis Sentinels did not answer in time",
                )))
            });
            this.asked_ms.store(this.now_ms(), Ordering::Relaxed);
            if let Err(e) = this.adopt(found) {
                // Asked again after the gap.
                this.doubt.store(true, Ordering::Release);
                if !this.unreachable.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "no Redis Sentinel names the master; going on with the one in use");
                }
            }
        });
    }

    /// Uses the master the Sentinels named (`found`), if it is another.
    fn adopt(&self, found: RedisResult<redis::Client>) -> RedisResult<()> {
        let client = found?;
        if self.unreachable.swap(false, Ordering::Relaxed) {
            tracing::info!("the Redis Sentinels answer again");
        }
        let addr = client.get_connection_info().addr().to_string();
        let announced = match self.expected.lock() {
            Ok(mut expected) => match expected.as_ref() {
                Some((want, _)) if *want == addr => {
                    *expected = None;
                    true
                }
                Some((_, since)) if since.elapsed() < RECHECK => {
                    // The Sentinel asked has not caught up with the announcement yet.
                    self.doubt.store(true, Ordering::Release);
                    false
                }
                _ => {
                    *expected = None;
                    false
                }
            },
            Err(_) => false,
        };
        let current = self.master.load_full();
        if current.as_ref().is_some_and(|m| m.addr == addr) {
            return Ok(());
        }
        let conn = ConnectionManager::new_lazy_with_config(client, self.config.clone())?;
        self.master.store(Some(Arc::new(Master {
            addr: addr.clone(),
            conn,
        })));
        self.generation.fetch_add(1, Ordering::Release);
        match &current {
            Some(old) => {
                // Counted once the new master is in use (what the count starts looks at it).
                self.switches.fetch_add(1, Ordering::Release);
                tracing::warn!(
                    master = %addr,
                    previous = %old.addr,
                    cause = if announced { "a Sentinel announced it" } else { "asked after a failed call or the periodic check" },
                    "the Redis Sentinels name a new master; following it"
                );
            }
            None => tracing::info!(master = %addr, "the Redis Sentinels name the master"),
        }
        Ok(())
    }
}

/// A lookup under way: when it ends (or its task is dropped), the next may
/// start, waiting calls are woken, and one asked for meanwhile starts.
struct Asking(Arc<Follow>);

impl Drop for Asking {
    fn drop(&mut self) {
        self.0.asking.store(false, Ordering::Release);
        self.0.done.notify_waiters();
        if self.0.again.swap(false, Ordering::AcqRel) {
            self.0.ask();
        }
    }
}

impl Follow {
    /// Listens for the Sentinels' `+switch-master` announcements of
    /// `master_name` on one Sentinel at a time (the next when it goes away or
    /// stops answering a PING every [`RECHECK`]) and asks for the master at
    /// once on each, until the route is dropped. A graceful failover leaves
    /// the old master answering writes until the Sentinels reconfigure it
    /// (seconds); this leaves it as soon as the new one is named.
    fn watch(self: &Arc<Self>, master_name: String) {
        let follow = Arc::downgrade(self);
        let sentinels = self.watched.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt as _;
            let mut quiet = false;
            for sentinel in sentinels.iter().cycle() {
                let subscribed = tokio::time::timeout(LOOKUP_LIMIT, async {
                    let mut pubsub = sentinel.get_async_pubsub().await?;
                    pubsub.subscribe("+switch-master").await?;
                    Ok::<_, redis::RedisError>(pubsub)
                })
                .await
                .unwrap_or_else(|_| Err((redis::ErrorKind::Io, "no answer in time").into()));
                match subscribed {
                    Ok(pubsub) => {
                        quiet = false;
                        let (mut sink, mut messages) = pubsub.split();
                        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + RECHECK, RECHECK);
                        loop {
                            tokio::select! {
                                message = messages.next() => {
                                    let Some(message) = message else { break };
                                    // "<name> <old ip> <old port> <new ip> <new port>"
                                    let text: String = message.get_payload().unwrap_or_default();
                                    let words: Vec<&str> = text.split(' ').collect();
                                    if let [name, _, _, ip, port] = words[..] && name == master_name {
                                        let Some(this) = follow.upgrade() else { return };
                                        if let Ok(mut expected) = this.expected.lock() {
                                            *expected = Some((format!("{ip}:{port}"), Instant::now()));
                                        }
                                        this.doubt.store(true, Ordering::Release);
                                        this.ask();
                                    }
                                }
                                _ = ping.tick() => {
                                    if follow.strong_count() == 0 {
                                        return;
                                    }
                                    let answered = tokio::time::timeout(LOOKUP_LIMIT, sink.ping::<Value>()).await;
                                    if !matches!(answered, Ok(Ok(_))) {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    Err(e) if !quiet => {
                        quiet = true;
                        tracing::warn!(error = %e, "cannot listen to a Redis Sentinel for failovers (failed calls still make the broker ask them)");
                    }
                    Err(_) => {}
                }
                if follow.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}

impl Route {
    /// Starts following the Sentinels' announcements (see [`Follow::watch`]).
    pub(super) fn watch(&self, master_name: &str) {
        if let Self::Sentinel(follow) = self {
            follow.watch(master_name.to_owned());
        }
    }

    /// A call through this route failed or timed out: the Sentinels are
    /// asked again (a failover may have moved the master).
    pub(super) fn doubt(&self) {
        if let Self::Sentinel(follow) = self {
            follow.doubt.store(true, Ordering::Release);
        }
    }

    /// A call was skipped (the circuit is open): the Sentinels are still
    /// asked when due, so a new master is found while nothing reaches the old.
    pub(super) fn skipped(&self) {
        if let Self::Sentinel(follow) = self
            && follow.due()
        {
            follow.ask();
        }
    }

    /// Times the Sentinels named a new master (0 for one Redis).
    pub(super) fn switches(&self) -> u64 {
        match self {
            Self::Direct(_) => 0,
            Self::Sentinel(follow) => follow.switches.load(Ordering::Acquire),
        }
    }

    /// Times a master was put in use, the first included (0 for one Redis):
    /// failures before it say nothing of it.
    pub(super) fn generation(&self) -> u64 {
        match self {
            Self::Direct(_) => 0,
            Self::Sentinel(follow) => follow.generation.load(Ordering::Acquire),
        }
    }

    /// The master in use (`host:port`), when the Sentinels named one.
    pub(super) fn master(&self) -> Option<String> {
        match self {
            Self::Direct(_) => None,
            Self::Sentinel(follow) => follow.master.load().as_ref().map(|m| m.addr.clone()),
        }
    }
}

impl ConnectionLike for Route {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Direct(conn) => conn.req_packed_command(cmd),
            Self::Sentinel(follow) => Box::pin(async move {
                let mut conn = follow.connection().await?;
                conn.req_packed_command(cmd).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Direct(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(follow) => Box::pin(async move {
                let mut conn = follow.connection().await?;
                conn.req_packed_commands(pipeline, offset, count).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Direct(conn) => conn.get_db(),
            Self::Sentinel(_) => 0,
        }
    }
}
