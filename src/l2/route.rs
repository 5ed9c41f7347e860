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
    master: ArcSwapOption<Master>,
    config: ConnectionManagerConfig,
    /// A call failed (or a Sentinel announced a new master) since the
    /// master was last asked for.
    doubt: AtomicBool,
    /// A Sentinel announced a new master since it was last asked for.
    announced: AtomicBool,
    /// When the Sentinels were last asked (ms since `born`).
    asked_ms: AtomicU64,
    born: Instant,
    /// Times the master changed (the first one found is not a change).
    switches: AtomicU64,
    /// The Sentinels could not be asked at the last try (logged once).
    unreachable: AtomicBool,
}

struct Master {
    /// `host:port`, as the Sentinels name it.
    addr: String,
    conn: ConnectionManager,
}

impl Follow {
    pub(super) fn new(sentinels: SentinelClient, config: ConnectionManagerConfig) -> Self {
        Self {
            sentinels: tokio::sync::Mutex::new(sentinels),
            master: ArcSwapOption::empty(),
            config,
            doubt: AtomicBool::new(false),
            announced: AtomicBool::new(false),
            asked_ms: AtomicU64::new(0),
            born: Instant::now(),
            switches: AtomicU64::new(0),
            unreachable: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The master in use, unless a call failed or it is time to ask again.
    fn settled(&self) -> Option<ConnectionManager> {
        let stale = self.now_ms().saturating_sub(self.asked_ms.load(Ordering::Relaxed)) >= millis(RECHECK);
        if self.doubt.load(Ordering::Acquire) || stale {
            return None;
        }
        self.master.load().as_ref().map(|m| m.conn.clone())
    }

    /// The master's connection: the one in use, or (after a failure, every
    /// [`RECHECK`], or at first) the one the Sentinels name now. While no
    /// Sentinel answers, the master in use goes on being used.
    async fn connection(&self) -> RedisResult<ConnectionManager> {
        if let Some(conn) = self.settled() {
            return Ok(conn);
        }
        let mut sentinels = self.sentinels.lock().await;
        // Another call may have asked while this one waited.
        if let Some(conn) = self.settled() {
            return Ok(conn);
        }
        let found = sentinels.async_get_client().await;
        self.asked_ms.store(self.now_ms(), Ordering::Relaxed);
        self.doubt.store(false, Ordering::Release);
        let announced = self.announced.swap(false, Ordering::AcqRel);
        let current = self.master.load_full();
        let client = match found {
            Ok(client) => {
                if self.unreachable.swap(false, Ordering::Relaxed) {
                    tracing::info!("the Redis Sentinels answer again");
                }
                client
            }
            Err(e) => {
                if !self.unreachable.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "no Redis Sentinel names the master; going on with the one in use");
                }
                return match current {
                    Some(master) => Ok(master.conn.clone()),
                    None => Err(e),
                };
            }
        };
        let addr = client.get_connection_info().addr().to_string();
        if let Some(master) = current.as_ref().filter(|m| m.addr == addr) {
            return Ok(master.conn.clone());
        }
        let conn = ConnectionManager::new_lazy_with_config(client, self.config.clone())?;
        match &current {
            Some(old) => {
                self.switches.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    master = %addr,
                    previous = %old.addr,
                    cause = if announced { "a Sentinel announced it" } else { "asked after a failed call or the periodic check" },
                    "the Redis Sentinels name a new master; following it"
                );
            }
            None => tracing::info!(master = %addr, "the Redis Sentinels name the master"),
        }
        self.master.store(Some(Arc::new(Master {
            addr,
            conn: conn.clone(),
        })));
        Ok(conn)
    }
}

impl Follow {
    /// Listens for the Sentinels' `+switch-master` announcements of
    /// `master_name` (on one Sentinel at a time, another when it goes away)
    /// and asks for the master again on each, until the route is dropped.
    /// A graceful failover leaves the old master answering writes until the
    /// Sentinels reconfigure it (seconds); this leaves it at once.
    fn watch(self: &Arc<Self>, master_name: String) {
        let follow = Arc::downgrade(self);
        tokio::spawn(async move {
            use futures_util::StreamExt as _;
            let mut quiet = false;
            loop {
                let Some(this) = follow.upgrade() else {
                    return;
                };
                let sentinel = this.sentinels.lock().await.async_get_sentinel_client().await;
                drop(this);
                let subscribed = match sentinel {
                    Ok(client) => match client.get_async_pubsub().await {
                        Ok(mut pubsub) => pubsub.subscribe("+switch-master").await.map(|()| pubsub),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                };
                match subscribed {
                    Ok(pubsub) => {
                        quiet = false;
                        let mut messages = pubsub.into_on_message();
                        while let Some(message) = messages.next().await {
                            // "<name> <old ip> <old port> <new ip> <new port>"
                            let text: String = message.get_payload().unwrap_or_default();
                            if text.split(' ').next() == Some(master_name.as_str()) {
                                let Some(this) = follow.upgrade() else {
                                    return;
                                };
                                this.announced.store(true, Ordering::Release);
                                this.doubt.store(true, Ordering::Release);
                            }
                        }
                    }
                    Err(e) if !quiet => {
                        quiet = true;
                        tracing::warn!(error = %e, "cannot listen to the Redis Sentinels for failovers (failed calls still make the broker ask them)");
                    }
                    Err(_) => {}
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
    /// asked again before the next one (a failover may have moved the master).
    pub(super) fn doubt(&self) {
        if let Self::Sentinel(follow) = self {
            follow.doubt.store(true, Ordering::Release);
        }
    }

    /// Times the Sentinels named a new master (0 for one Redis).
    pub(super) fn switches(&self) -> u64 {
        match self {
            Self::Direct(_) => 0,
            Self::Sentinel(follow) => follow.switches.load(Ordering::Relaxed),
        }
    }

    /// The master in use (`host:port`), when the Sentinels named one.
    pub(super) fn master(&self) -> Option<String> {
        match self {
            Self::Direct(_) => None,
            Self::Sentinel(follow) => follow.master.load().as_ref().map(|m| m.addr.clone()),
        }
    }

    /// Whether this route follows Sentinels.
    pub(super) fn follows_sentinels(&self) -> bool {
        matches!(self, Self::Sentinel(_))
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
