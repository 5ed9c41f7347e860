//! One configured Box app: its client, its key ring (replaced whole by the
//! admin RPC), how its calls to Box went, and the trial mint.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use arc_swap::ArcSwap;

use crate::{
    boxapi::{
        AppCredentials, AuthMethod, BoxClient, BoxId, BoxSubject, Diagnosis,
        error::{Grant, diagnose},
    },
    keys::{KeyState, Ring},
};

/// One configured Box app.
#[derive(Debug)]
pub struct App {
    /// Its name in the config (`[apps.NAME]`).
    pub name: Arc<str>,
    /// The client of its Box API base URL.
    pub client: BoxClient,
    /// Its keys and secrets; replaced whole by the admin RPC. Read without a
    /// lock by every request (the enterprise id is in it).
    ring: ArcSwap<Ring>,
    /// The ring from the config alone.
    config_ring: Arc<Ring>,
    /// How its last token requests went.
    health: Mutex<UpstreamHealth>,
    /// Mints that succeeded only with the standby key.
    pub(super) standby_fallbacks: AtomicU64,
    /// Key-store writes for changes to its ring that failed (the change was not made).
    keystore_write_failures: AtomicU64,
    /// Mints and exchanges by outcome.
    pub outcomes: Outcomes,
    /// The Box roles whose users it never tokenizes.
    refused_roles: Vec<String>,
}

/// The roles refused unless an app's config says otherwise.
pub const DEFAULT_REFUSED_ROLES: [&str; 2] = ["admin", "coadmin"];

/// Token requests by kind and outcome, for metrics.
#[derive(Debug, Default)]
pub struct Outcomes {
    /// Mints Box answered with a token.
    pub mints_ok: AtomicU64,
    /// Mints that failed.
    pub mints_failed: AtomicU64,
    /// Exchanges that produced a served downscoped token.
    pub exchanges_ok: AtomicU64,
    /// Exchanges that failed or were refused by the restriction guard.
    pub exchanges_failed: AtomicU64,
    /// App Users created for an external id (`create_if_missing`).
    pub users_created: AtomicU64,
    /// Users Box showed the broker must not tokenize (admins, inactive, other enterprises).
    pub users_refused: AtomicU64,
}

/// The outcome of an app's recent token requests, for `GetStatus`.
#[derive(Debug, Clone, Default)]
pub struct UpstreamHealth {
    /// The last success.
    pub last_success: Option<SystemTime>,
    /// The last failure.
    pub last_failure: Option<SystemTime>,
    /// What it said.
    pub last_failure_message: String,
}

impl App {
    /// An app minting with `credentials` (from its config).
    pub fn new(name: impl Into<Arc<str>>, credentials: &AppCredentials, client: BoxClient) -> Self {
        let ring = Ring::from_config(credentials, client.now());
        Self {
            name: name.into(),
            config_ring: Arc::new(ring.clone()),
            ring: ArcSwap::from_pointee(ring),
            client,
            health: Mutex::new(UpstreamHealth::default()),
            standby_fallbacks: AtomicU64::new(0),
            keystore_write_failures: AtomicU64::new(0),
            outcomes: Outcomes::default(),
            refused_roles: DEFAULT_REFUSED_ROLES.iter().map(|r| (*r).to_owned()).collect(),
        }
    }

    /// The same app refusing users of `roles` (`admin`, `coadmin`, `user`)
    /// instead of [`DEFAULT_REFUSED_ROLES`].
    #[must_use]
    pub fn with_refused_roles(mut self, roles: Vec<String>) -> Self {
        self.refused_roles = roles;
        self
    }

    /// The Box roles whose users it never tokenizes.
    pub fn refused_roles(&self) -> &[String] {
        &self.refused_roles
    }

    /// Its keys and secrets now.
    pub fn ring(&self) -> Arc<Ring> {
        self.ring.load_full()
    }

    /// The ring its config alone describes (what a stored key set is laid over).
    pub fn config_ring(&self) -> Ring {
        (*self.config_ring).clone()
    }

    /// Switches to `ring` for every mint that starts from now on.
    pub fn replace_ring(&self, ring: Ring) {
        self.ring.store(Arc::new(ring));
    }

    /// The credentials mints use first (active key, current secret).
    pub fn credentials(&self) -> Option<Arc<AppCredentials>> {
        self.ring().primary().map(|a| a.credentials)
    }

    /// The client id (not a secret).
    pub fn client_id(&self) -> String {
        self.ring.load().identity.client_id.clone()
    }

    /// The enterprise the app is authorized in.
    pub fn enterprise_id(&self) -> BoxId {
        self.ring.load().identity.enterprise_id.clone()
    }

    /// How its recent token requests went.
    pub fn health(&self) -> UpstreamHealth {
        self.health
            .lock()
            .map_or_else(|p| p.into_inner().clone(), |h| h.clone())
    }

    /// How many mints succeeded only with the standby key.
    pub fn standby_fallbacks(&self) -> u64 {
        self.standby_fallbacks.load(Ordering::Relaxed)
    }

    /// A change to its keys or secret was not made: the key store could not be written.
    pub fn record_keystore_write_failure(&self) {
        self.keystore_write_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// How many key-store writes for it failed.
    pub fn keystore_write_failures(&self) -> u64 {
        self.keystore_write_failures.load(Ordering::Relaxed)
    }

    pub(super) fn record(&self, outcome: Result<SystemTime, (SystemTime, &str)>) {
        let mut health = self.health.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match outcome {
            Ok(at) => health.last_success = Some(at),
            Err((at, message)) => {
                health.last_failure = Some(at);
                message.clone_into(&mut health.last_failure_message);
            }
        }
    }

    /// Asks Box for the Service Account's token with `credentials` (the
    /// app's own, or a candidate key or secret), as the first request would,
    /// then revokes it (when `revoke`): Box's refusal, explained. A success
    /// is the app's last Box success in status.
    pub async fn trial_mint(&self, credentials: &AppCredentials, after: AfterTrial) -> Result<(), Diagnosis> {
        let revoke = after == AfterTrial::Revoke;
        let subject = BoxSubject::Enterprise(credentials.enterprise_id.clone());
        match self.client.request_token(credentials, &subject).await {
            Ok(token) => {
                self.record(Ok(self.client.now()));
                if revoke && let Err(e) = self.client.revoke(credentials, &token.access_token).await {
                    tracing::debug!(app = %self.name, error = %e, "revoking the trial token failed");
                }
                Ok(())
            }
            Err(error) => Err(diagnose(
                &error,
                &subject,
                &credentials.client_id,
                grant_of(credentials),
            )),
        }
    }

    /// How the app authenticates, for status and logs.
    pub fn auth_summary(&self) -> String {
        let ring = self.ring();
        match (ring.identity.algorithm, ring.key_in(KeyState::Active)) {
            (Some(algorithm), Some(key)) => format!(
                "JWT {algorithm:?}, key {} ({} bits, sha256 {}…)",
                key.kid.as_deref().unwrap_or(""),
                key.bits,
                &key.fingerprint[..16]
            ),
            (Some(_), None) => "JWT, no active key".to_owned(),
            (None, _) => "Client Credentials Grant".to_owned(),
        }
    }
}

/// What [`App::trial_mint`] does with the token Box issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterTrial {
    /// Revokes it at Box (`check-config --online`: nothing is left behind).
    Revoke,
    /// Lets it expire (activating a key: a revocation would be one more
    /// call to Box that proves nothing).
    Expire,
}

pub(super) fn grant_of(credentials: &AppCredentials) -> Grant<'_> {
    match &credentials.auth {
        AuthMethod::Jwt { key, .. } => Grant::Jwt { kid: key.kid() },
        AuthMethod::Ccg => Grant::Ccg,
    }
}
