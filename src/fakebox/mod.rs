//! A faithful fake of Box's OAuth endpoints and users API, for dev mode and tests.
//!
//! It is strict on purpose (box-contract.md §10, §13): it verifies the
//! assertion's signature against registered public keys and rejects what
//! real Box rejects, with Box's error codes and messages; its users API
//! (`/2.0/users*`) checks the bearer token, the Service Account and the
//! app's user scopes, and answers with Box's `ClientError` shapes. A test
//! that passes against it means something. It runs in-process
//! ([`FakeBox::start`]) or standalone (`box-broker fake-box`).

pub mod http;
pub mod seed;
pub mod state;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::sync::{oneshot, watch};

pub use state::{
    FakeApp, FakeAuth, FakeItem, FakeUser, Fault, MANAGE_APP_USERS, MANAGE_MANAGED_USERS, SeenAssertion, Stats,
    USER_ROLES, USER_STATUSES, UserKind,
};

use crate::clock::{SharedClock, shift};

/// The fake Box. Cloning shares it.
#[derive(Debug, Clone)]
pub struct FakeBox {
    world: Arc<Mutex<state::World>>,
    clock: SharedClock,
    changed: Arc<watch::Sender<u64>>,
}

impl FakeBox {
    /// An empty fake whose time is `clock` (plus any skew set later).
    pub fn new(clock: SharedClock) -> Self {
        Self {
            world: Arc::default(),
            clock,
            changed: Arc::new(watch::channel(0).0),
        }
    }

    pub(crate) fn with_world<R>(&self, f: impl FnOnce(&mut state::World) -> R) -> R {
        // A panic while holding the lock would be a fake bug; keep serving.
        let mut world = self.world.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut world)
    }

    /// The fake's current time: its clock plus the skew knob.
    pub fn now(&self) -> SystemTime {
        let skew = self.with_world(|w| w.skew_secs);
        shift(self.clock.now(), skew.saturating_mul(1000))
    }

    /// Registers an app.
    pub fn add_app(&self, app: FakeApp) {
        self.with_world(|w| w.apps.insert(app.client_id.clone(), app));
    }

    /// Changes a registered app (authorize it, add a key, ...). Returns false if unknown.
    pub fn update_app(&self, client_id: &str, f: impl FnOnce(&mut FakeApp)) -> bool {
        self.with_world(|w| w.apps.get_mut(client_id).map(f).is_some())
    }

    /// Registers a public key (SubjectPublicKeyInfo or PKCS#1 PEM) for an app,
    /// as the developer console's "Add a Public Key" does, and returns the
    /// `kid` Box assigns. Errors say why (unknown app, not a key, duplicate).
    pub fn add_public_key(&self, client_id: &str, pem: &str) -> Result<String, String> {
        use rsa::{pkcs1::DecodeRsaPublicKey as _, pkcs8::DecodePublicKey as _};
        let key = rsa::RsaPublicKey::from_public_key_pem(pem.trim())
            .or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(pem.trim()))
            .map_err(|_| "not a PEM RSA public key".to_owned())?;
        let kid = {
            use rand::Rng as _;
            const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
            let mut rng = rand::thread_rng();
            (0..8)
                .map(|_| char::from(CHARS[rng.gen_range(0..CHARS.len())]))
                .collect::<String>()
        };
        self.with_world(|w| {
            let app = w
                .apps
                .get_mut(client_id)
                .ok_or_else(|| format!("no app has client id {client_id}"))?;
            if app.keys.values().any(|k| *k == key) {
                return Err("this public key is already registered".to_owned());
            }
            app.keys.insert(kid.clone(), key);
            Ok(kid)
        })
    }

    /// Removes an app's public key. Returns false if there was none.
    pub fn remove_public_key(&self, client_id: &str, kid: &str) -> bool {
        self.with_world(|w| {
            w.apps
                .get_mut(client_id)
                .is_some_and(|app| app.keys.remove(kid).is_some())
        })
    }

    /// Replaces an app's client secret (the console's "Reset" of the secret).
    pub fn set_client_secret(&self, client_id: &str, secret: &str) -> bool {
        self.update_app(client_id, |app| secret.clone_into(&mut app.client_secret))
    }

    /// Adds a user to the directory (replacing one with the same id).
    pub fn add_user(&self, user: FakeUser) {
        self.with_world(|w| w.users.insert(user.id.clone(), user));
    }

    /// The user with `id`, as the directory holds it now (created users included).
    pub fn user(&self, id: &str) -> Option<FakeUser> {
        self.with_world(|w| w.users.get(id).cloned())
    }

    /// Every user (any enterprise, any app) whose `external_app_user_id` is
    /// `external_id`, sorted by id.
    pub fn users_with_external_id(&self, external_id: &str) -> Vec<FakeUser> {
        let mut users: Vec<FakeUser> = self.with_world(|w| {
            w.users
                .values()
                .filter(|u| u.external_app_user_id.as_deref() == Some(external_id))
                .cloned()
                .collect()
        });
        users.sort_by(|a, b| (a.id.len(), &a.id).cmp(&(b.id.len(), &b.id)));
        users
    }

    /// Changes a user (role, status, external id, ...). Returns false if unknown.
    pub fn update_user(&self, id: &str, f: impl FnOnce(&mut FakeUser)) -> bool {
        self.with_world(|w| w.users.get_mut(id).map(f).is_some())
    }

    /// Sets a user's `status` (an admin deactivating a user, say). Not
    /// checked against [`USER_STATUSES`], so a test can send Box a surprise.
    /// Returns false if unknown.
    pub fn set_user_status(&self, id: &str, status: &str) -> bool {
        self.update_user(id, |u| status.clone_into(&mut u.status))
    }

    /// Sets a user's `role` (not checked against [`USER_ROLES`]). Returns false if unknown.
    pub fn set_user_role(&self, id: &str, role: &str) -> bool {
        self.update_user(id, |u| role.clone_into(&mut u.role))
    }

    /// Replaces an app's users-API scopes ([`MANAGE_APP_USERS`],
    /// [`MANAGE_MANAGED_USERS`]). Returns false if the app is unknown.
    pub fn set_user_scopes(&self, client_id: &str, scopes: &[&str]) -> bool {
        self.update_app(client_id, |app| {
            app.user_scopes = scopes.iter().map(|s| (*s).to_owned()).collect();
        })
    }

    /// Adds a file or folder.
    pub fn add_item(&self, item: FakeItem) {
        self.with_world(|w| w.items.insert((item.kind, item.id.clone()), item));
    }

    /// Makes token exchanges answer with an empty `restricted_to`.
    pub fn set_omit_restrictions(&self, omit: bool) {
        self.with_world(|w| w.omit_restrictions = omit);
    }

    /// True when `token` was issued and has been revoked.
    pub fn is_revoked(&self, token: &str) -> bool {
        self.with_world(|w| w.tokens.get(token).is_some_and(|t| t.revoked))
    }

    /// The next `count` token requests get `fault`.
    pub fn fail_next(&self, count: usize, fault: Fault) {
        self.with_world(|w| w.faults.extend(std::iter::repeat_n(fault, count)));
    }

    pub(crate) fn take_fault(&self) -> Option<Fault> {
        self.with_world(|w| {
            let fault = w.faults.pop_front();
            if fault.is_some() {
                w.stats.token_requests += 1;
                w.stats.faults_served += 1;
            }
            fault
        })
    }

    /// The next `count` requests to any `/2.0/users*` endpoint get `fault`
    /// (before the token is even looked at).
    pub fn fail_next_users(&self, count: usize, fault: Fault) {
        self.with_world(|w| w.users_faults.extend(std::iter::repeat_n(fault, count)));
    }

    pub(crate) fn take_users_fault(&self) -> Option<Fault> {
        self.with_world(|w| {
            let fault = w.users_faults.pop_front();
            if fault.is_some() {
                w.stats.faults_served += 1;
            }
            fault
        })
    }

    /// Every token request waits this long first.
    pub fn set_latency(&self, latency: Duration) {
        self.with_world(|w| w.latency = latency);
    }

    pub(crate) fn latency(&self) -> Duration {
        self.with_world(|w| w.latency)
    }

    /// Every `/2.0/users*` request waits this long first.
    pub fn set_users_latency(&self, latency: Duration) {
        self.with_world(|w| w.users_latency = latency);
    }

    /// Shifts the fake's clock by `seconds` relative to its clock source.
    pub fn set_skew_secs(&self, seconds: i64) {
        self.with_world(|w| w.skew_secs = seconds);
    }

    /// Issue tokens with exactly this lifetime (default: 4000–4200 s, random).
    pub fn set_token_lifetime(&self, lifetime: Option<Duration>) {
        self.with_world(|w| w.token_lifetime = lifetime);
    }

    /// Call counts so far.
    pub fn stats(&self) -> Stats {
        self.with_world(|w| w.stats.clone())
    }

    /// The assertions accepted so far (the newest last; at most 64).
    pub fn accepted_assertions(&self) -> Vec<SeenAssertion> {
        self.with_world(|w| w.assertions.iter().cloned().collect())
    }

    /// The id of the user a live token acts as (`None` if unknown, expired or revoked).
    pub fn token_user_id(&self, token: &str) -> Option<String> {
        let now = self.now();
        self.with_world(|w| w.token_user(token, now).map(|(t, _)| t.user_id.clone()))
    }

    pub(crate) fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Waits until `condition` holds for the stats, or `timeout` passes.
    /// Returns whether it held. Tests use it instead of sleeping.
    pub async fn wait_for(&self, timeout: Duration, condition: impl Fn(&Stats) -> bool) -> bool {
        let mut changed = self.changed.subscribe();
        let wait = async {
            loop {
                if condition(&self.stats()) {
                    return;
                }
                if changed.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok() && condition(&self.stats())
    }

    /// Serves the fake on `listener` in a background task.
    pub fn spawn(self, listener: tokio::net::TcpListener) -> std::io::Result<FakeBoxServer> {
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let router = http::router(self);
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the fake Box stopped");
            }
        });
        Ok(FakeBoxServer {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// Binds `127.0.0.1:0` and serves there.
    pub async fn start(self) -> std::io::Result<FakeBoxServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        self.spawn(listener)
    }
}

/// A running fake Box; stops when dropped.
#[derive(Debug)]
pub struct FakeBoxServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeBoxServer {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to configure as `api_base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and waits for the server task.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for FakeBoxServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
