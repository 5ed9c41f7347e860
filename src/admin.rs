//! Key and secret rotation, cache invalidation and status: what the admin
//! RPC does, without the gRPC. One change runs at a time; each is written to
//! the durable key store *before* the app switches to it, so a crash never
//! loses a key the broker started using.

use std::{collections::BTreeMap, sync::Arc};

use rsa::RsaPrivateKey;
use secrecy::SecretString;

use crate::{
    boxapi::{BoxId, BoxSubject, DiagnosisKind, ExternalUser, private_key::decode_private_key},
    broker::{AfterTrial, App, Broker, Subject},
    cache::TokenKey,
    keys::{
        KeyEntry, KeyOrigin, KeyState, Ring, RingError, SecretEntry, SecretOrigin,
        store::{KeyStore, StoreError, StoredApp, StoredState},
    },
    rpc::Rpc,
};

/// How long an admin change waits for another replica's change of the same app.
const FLEET_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the fleet's key set was not caught up with.
#[derive(Debug)]
enum CatchUp {
    /// Redis cannot be asked.
    Unavailable,
    /// It is newer, and could not be adopted (why).
    NotAdopted(String),
}

/// A change in progress (see [`KeyAdmin::begin`]).
struct Change<'a> {
    _local: tokio::sync::MutexGuard<'a, ()>,
    /// The app's key-set lock in the fleet's Redis, if there is one.
    fleet: Option<crate::l2::KeysLock>,
}

/// Key sizes `GenerateKey` makes.
pub const KEY_SIZES: &[usize] = &[2048, 3072, 4096];

/// Why an admin operation did not happen. Nothing changed in any case.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such app or key.
    #[error("{0}")]
    NotFound(String),
    /// Not allowed in the current state (or Box refused the trial mint).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The key store could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<RingError> for AdminError {
    fn from(e: RingError) -> Self {
        match e {
            RingError::NotFound(m) => Self::NotFound(m),
            RingError::Refused(m) => Self::FailedPrecondition(m),
        }
    }
}

/// A newly generated key and the public half to upload.
#[derive(Debug)]
pub struct GeneratedKey {
    /// The key, pending.
    pub key: KeyEntry,
    /// SubjectPublicKeyInfo PEM.
    pub public_key_pem: String,
}

/// The admin side of a broker.
#[derive(Debug)]
pub struct KeyAdmin {
    broker: Arc<Broker>,
    store: Option<KeyStore>,
    /// Apps in the store that the config no longer names: kept, never dropped.
    orphans: BTreeMap<String, StoredApp>,
    /// The store holds retired keys' private material (see
    /// [`KeyAdmin::write_pending_purge`]).
    purge_pending: bool,
    /// One change at a time.
    changing: tokio::sync::Mutex<()>,
    /// A catch-up with the fleet's key sets is running / was asked for meanwhile.
    catching_up: std::sync::atomic::AtomicBool,
    catch_up_again: std::sync::atomic::AtomicBool,
}

impl KeyAdmin {
    /// Loads the store (if any) and lays it over the apps' config
    /// credentials. A store that cannot be read stops startup.
    pub fn open(broker: Arc<Broker>, store: Option<KeyStore>) -> Result<Self, StoreError> {
        let mut orphans = BTreeMap::new();
        let mut purge_pending = false;
        if let Some(store) = &store {
            let state = store.load()?;
            let mut stored = state.apps;
            // Retired keys keep no private material, in stores written
            // before that was so and for apps the config no longer names.
            let mut purged = false;
            for app in stored.values_mut() {
                purged |= app.purge_retired();
            }
            for app in broker.apps() {
                if let Some(saved) = stored.remove(&*app.name) {
                    let ring = saved.merge_into((*app.ring()).clone()).map_err(|problem| StoreError {
                        path: store.path().display().to_string(),
                        problem: format!("app {}: {problem}", app.name),
                    })?;
                    app.replace_ring(ring);
                }
            }
            for name in stored.keys() {
                tracing::warn!(app = %name, "the key store holds an app the config does not name; its keys are kept");
            }
            orphans = stored;
            purge_pending = purged;
        }
        Ok(Self {
            broker,
            store,
            orphans,
            purge_pending,
            changing: tokio::sync::Mutex::new(()),
            catching_up: std::sync::atomic::AtomicBool::new(false),
            catch_up_again: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Rewrites the key store without the private material of retired keys
    /// that an older broker left in it (memory holds none already). Called
    /// by `serve`, never by `check-config`, which writes nothing. True when
    /// the store was rewritten.
    pub fn write_pending_purge(&self) -> Result<bool, StoreError> {
        let Some(store) = self.store.as_ref().filter(|_| self.purge_pending) else {
            return Ok(false);
        };
        store.save(&snapshot(&self.broker, &self.orphans, None)?)?;
        Ok(true)
    }

    /// The broker.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// True when changes are persisted.
    pub fn has_store(&self) -> bool {
        self.store.is_some()
    }

    fn app(&self, name: &str) -> Result<&Arc<App>, AdminError> {
        self.broker
            .resolve_app((!name.is_empty()).then_some(name))
            .map_err(|e| AdminError::NotFound(e.to_string()))
    }

    /// Starts a change of `app`'s keys: one at a time in this broker and,
    /// with a fleet's Redis, in the fleet (the app's key-set lock), on top
    /// of the fleet's newest key set. With a fleet, a change waits for
    /// Redis: made on one replica alone, it would not reach the others and
    /// could be overwritten by theirs (requests never wait for Redis; key
    /// changes are rare and can).
    async fn begin(&self, app: &Arc<App>) -> Result<Change<'_>, AdminError> {
        let local = self.changing.lock().await;
        let Some(fleet) = self.broker.fleet() else {
            return Ok(Change {
                _local: local,
                fleet: None,
            });
        };
        let unavailable = || {
            AdminError::FailedPrecondition(format!(
                "Redis cannot be reached, so a change of app {}'s keys would not reach the other replicas; nothing changed: retry when it answers (admin status shows its state)",
                app.name
            ))
        };
        let lock = fleet.lock_keys(&app.name, FLEET_LOCK_WAIT).await.map_err(|e| match e {
            crate::l2::LockError::Held => AdminError::FailedPrecondition(format!(
                "another broker of the fleet is changing app {}'s keys right now; nothing changed: retry in a few seconds",
                app.name
            )),
            crate::l2::LockError::Unavailable => unavailable(),
        })?;
        match self.catch_up(app, Some(&lock)).await {
            Ok(()) => Ok(Change {
                _local: local,
                fleet: Some(lock),
            }),
            Err(CatchUp::Unavailable) => Err(unavailable()),
            Err(CatchUp::NotAdopted(problem)) => Err(AdminError::FailedPrecondition(format!(
                "the fleet's newest key set of app {} cannot be adopted here ({problem}), and a change must start from it; nothing changed",
                app.name
            ))),
        }
    }

    /// Persists every app's ring, with `changed` (as the next version) in
    /// place of its app's, publishes it to the fleet (under `change`'s
    /// lock), then switches the app to it. Nothing changes when the write
    /// or the publication fails (the store is put back).
    async fn commit(&self, change: &Change<'_>, app: &App, mut changed: Ring) -> Result<(), AdminError> {
        let store = self.store.as_ref().ok_or_else(|| {
            AdminError::FailedPrecondition(
                "no [keystore] is configured, so a new key or secret would be lost at restart: configure [keystore] path and kek_file (or kek_env)".to_owned(),
            )
        })?;
        changed.version = app.ring().version + 1;
        changed.change = rand::random();
        let state = snapshot(&self.broker, &self.orphans, Some((app, &changed)))
            .map_err(|e| AdminError::FailedPrecondition(e.problem))?;
        let previous =
            snapshot(&self.broker, &self.orphans, None).map_err(|e| AdminError::FailedPrecondition(e.problem))?;
        store
            .save(&state)
            .inspect_err(|_| app.record_keystore_write_failure())?;
        if let (Some(fleet), Some(lock), Some(set)) = (self.broker.fleet(), &change.fleet, state.apps.get(&*app.name))
            && !fleet.publish_key_set(&app.name, set.version, set, lock).await
        {
            if let Err(e) = store.save(&previous) {
                // The store keeps a set the fleet never saw; this replica
                // takes the fleet's over it at its next catch-up.
                tracing::error!(app = %app.name, error = %e, "could not put the key store back after a failed publication");
            }
            return Err(AdminError::FailedPrecondition(format!(
                "Redis did not take app {}'s new key set (unreachable, or the fleet's lock was lost), so the other replicas would not have it; nothing changed: retry",
                app.name
            )));
        }
        app.replace_ring(changed);
        Ok(())
    }

    /// Adopts the fleet's key set of `app` if it is newer than this
    /// broker's, or of the same version from another change (persisted
    /// first); holding `lock`, publishes this broker's if it is newer than
    /// the fleet's. Without a fleet, nothing. Call with the `changing` lock held.
    async fn catch_up(&self, app: &App, lock: Option<&crate::l2::KeysLock>) -> Result<(), CatchUp> {
        let Some(fleet) = self.broker.fleet() else {
            return Ok(());
        };
        let ring = app.ring();
        let local = ring.version;
        match fleet.key_set(&app.name).await.map_err(|_| CatchUp::Unavailable)? {
            Some((version, set)) if version > local || (version == local && set.change != ring.change) => {
                self.adopt(app, version, &set).map_err(|problem| {
                    tracing::warn!(app = %app.name, version, %problem, "did not adopt the fleet's key set");
                    CatchUp::NotAdopted(problem)
                })
            }
            Some((version, _)) if version >= local => Ok(()),
            // Redis holds an older set, or none: ours (if it was ever
            // changed) is the fleet's (a store written while Redis was away).
            _ if local > 0 => {
                if let (Some(lock), Ok(set)) = (lock, StoredApp::from_ring(&ring))
                    && !fleet.publish_key_set(&app.name, set.version, &set, lock).await
                {
                    tracing::warn!(app = %app.name, version = local, "could not publish the key set to Redis; tried again at the next catch-up");
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// [`Self::catch_up`] for every app, one change at a time, each under
    /// its key-set lock when it can be had at once. Calls while one runs
    /// are folded into one more run.
    pub async fn catch_up_all(&self) {
        if self.catching_up.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.catch_up_again.store(true, std::sync::atomic::Ordering::Release);
            return;
        }
        loop {
            self.catch_up_again.store(false, std::sync::atomic::Ordering::Release);
            for app in self.broker.apps() {
                let _one = self.changing.lock().await;
                let lock = match self.broker.fleet() {
                    Some(fleet) => fleet.lock_keys(&app.name, std::time::Duration::ZERO).await.ok(),
                    None => None,
                };
                let _ = self.catch_up(app, lock.as_ref()).await;
            }
            if !self.catch_up_again.load(std::sync::atomic::Ordering::Acquire) {
                break;
            }
        }
        self.catching_up.store(false, std::sync::atomic::Ordering::Release);
    }

    /// Switches `app` to the fleet's key set `set` (`version`): laid over
    /// the config as at startup, persisted to this broker's store first.
    /// Never an empty set, never an older one.
    fn adopt(&self, app: &App, version: u64, set: &StoredApp) -> Result<(), String> {
        let ring = app.ring();
        if version < ring.version || (version == ring.version && set.change == ring.change) {
            return Ok(());
        }
        if set.keys.is_empty() && set.secrets.is_empty() {
            return Err("it is empty".to_owned());
        }
        let mut ring = set.merge_into(app.config_ring())?;
        ring.version = version;
        ring.change = set.change;
        if let Some(store) = &self.store {
            let state = snapshot(&self.broker, &self.orphans, Some((app, &ring))).map_err(|e| e.problem)?;
            store.save(&state).map_err(|e| {
                app.record_keystore_write_failure();
                e.to_string()
            })?;
        }
        let active = ring.key_in(KeyState::Active).and_then(|k| k.kid.clone());
        app.replace_ring(ring);
        tracing::info!(app = %app.name, version, active_kid = active.as_deref().unwrap_or(""), "adopted the fleet's key set");
        Ok(())
    }

    /// Acts on another replica's notice: drops revoked or invalidated
    /// tokens (the shared copy of a subject it knows too); looks at the
    /// key sets (in a task of its own: a key change under way must not hold
    /// up the revocations behind it); after notices may have been missed,
    /// drops every cached token first.
    pub async fn on_notice(self: &Arc<Self>, notice: crate::l2::Notice) {
        use crate::l2::{Notice, NoticeSubject};
        let cache = self.broker.cache();
        match notice {
            Notice::Revoked { app, digest } => {
                let Some(digest) = hex::decode(&digest).ok().and_then(|d| <[u8; 32]>::try_from(d).ok()) else {
                    return;
                };
                let dropped = cache.drop_revoked(&digest).await;
                tracing::info!(app, dropped, "dropped a token another replica revoked");
            }
            Notice::Invalidated { app, subject } => {
                let subject = match subject {
                    None => None,
                    Some(NoticeSubject::Enterprise) => Some(Subject::Enterprise),
                    Some(NoticeSubject::User(id)) => match BoxId::parse(&id) {
                        Ok(id) => Some(Subject::User(id)),
                        Err(_) => return,
                    },
                    Some(NoticeSubject::External(id)) => Some(Subject::External(Arc::new(ExternalUser {
                        id: id.into(),
                        create: None,
                    }))),
                };
                let by_external = matches!(subject, Some(Subject::External(_)));
                match self
                    .invalidate_here(app.as_deref().unwrap_or(""), subject.as_ref())
                    .await
                {
                    Ok((dropped, apps, resolved)) => {
                        // The sender did not know whose token it was (an
                        // external id it never resolved): this replica does.
                        // It drops the shared copy, its own again (one taken
                        // back from Redis meanwhile), and tells the others
                        // by Box id.
                        if let (true, Some(fleet), Some(app), Some(resolved)) =
                            (by_external, self.broker.fleet(), apps, resolved)
                        {
                            fleet
                                .invalidate(&TokenKey::full(app.name.clone(), resolved.clone()))
                                .await;
                            self.drop_local(Some(&app), Some(&Some(resolved.clone()))).await;
                            fleet
                                .announce(&Notice::Invalidated {
                                    app: Some(app.name.to_string()),
                                    subject: Some(match resolved {
                                        BoxSubject::Enterprise(_) => NoticeSubject::Enterprise,
                                        BoxSubject::User(id) => NoticeSubject::User(id.as_str().to_owned()),
                                    }),
                                })
                                .await;
                        }
                        tracing::info!(app, dropped, "dropped tokens another replica invalidated");
                    }
                    Err(e) => {
                        tracing::debug!(app, error = %e, "an invalidation from another replica names nothing here")
                    }
                }
            }
            Notice::KeySet { .. } | Notice::CatchUp => {
                let this = Arc::clone(self);
                tokio::spawn(async move { this.catch_up_all().await });
            }
            Notice::Resync => {
                let dropped = cache.invalidate_where(|_| true).await;
                if dropped > 0 {
                    tracing::info!(
                        dropped,
                        "dropped every cached token: notices from the other replicas may have been missed"
                    );
                }
                let this = Arc::clone(self);
                tokio::spawn(async move { this.catch_up_all().await });
            }
        }
    }

    fn jwt_only(app: &App, ring: &Ring) -> Result<(), AdminError> {
        if ring.identity.algorithm.is_none() {
            return Err(AdminError::FailedPrecondition(format!(
                "app {} uses the Client Credentials Grant, which has no keys; rotate its client secret instead",
                app.name
            )));
        }
        Ok(())
    }

    /// Creates an RSA key pair of `bits` (2048 when 0), stored as pending.
    pub async fn generate(&self, app: &str, bits: usize) -> Result<GeneratedKey, AdminError> {
        let bits = if bits == 0 { 2048 } else { bits };
        if !KEY_SIZES.contains(&bits) {
            return Err(AdminError::InvalidArgument(format!(
                "bits must be 2048, 3072 or 4096, not {bits}"
            )));
        }
        let app = self.app(app)?;
        Self::jwt_only(app, &app.ring())?;
        let private = tokio::task::spawn_blocking(move || RsaPrivateKey::new(&mut rand::rngs::OsRng, bits))
            .await
            .map_err(|_| AdminError::FailedPrecondition("key generation was interrupted".to_owned()))?
            .map_err(|e| AdminError::FailedPrecondition(format!("key generation failed: {e}")))?;
        let public_key_pem = {
            use rsa::pkcs8::{EncodePublicKey as _, LineEnding};
            private
                .to_public_key()
                .to_public_key_pem(LineEnding::LF)
                .map_err(|e| AdminError::FailedPrecondition(format!("cannot encode the public key: {e}")))?
        };
        let key = KeyEntry::from_private(private, None, KeyOrigin::Generated, KeyState::Pending, app.client.now())
            .map_err(AdminError::FailedPrecondition)?;
        let one = self.begin(app).await?;
        let ring = app.ring().with_pending(key.clone())?;
        self.commit(&one, app, ring).await?;
        tracing::info!(app = %app.name, fingerprint = %key.fingerprint, bits, "generated a key (pending)");
        Ok(GeneratedKey { key, public_key_pem })
    }

    /// Stores a private key made elsewhere as pending, under `kid`.
    pub async fn import(
        &self,
        app: &str,
        pem: &SecretString,
        passphrase: Option<&SecretString>,
        kid: &str,
    ) -> Result<KeyEntry, AdminError> {
        use secrecy::ExposeSecret as _;
        if kid.is_empty() {
            return Err(AdminError::InvalidArgument(
                "kid is required: the public key id Box assigned to the key's public half".to_owned(),
            ));
        }
        let app = self.app(app)?;
        Self::jwt_only(app, &app.ring())?;
        // Decrypting can take a while (key derivation): on a blocking
        // thread, so requests on the runtime are not held up.
        let (pem, passphrase) = (pem.clone(), passphrase.cloned());
        let private = tokio::task::spawn_blocking(move || decode_private_key(pem.expose_secret(), passphrase.as_ref()))
            .await
            .map_err(|_| AdminError::FailedPrecondition("decoding the key was interrupted".to_owned()))?
            .map_err(|e| AdminError::InvalidArgument(format!("private_key_pem: {e}")))?;
        let key = KeyEntry::from_private(
            private,
            Some(kid.to_owned()),
            KeyOrigin::Imported,
            KeyState::Pending,
            app.client.now(),
        )
        .map_err(AdminError::InvalidArgument)?;
        let one = self.begin(app).await?;
        let ring = app.ring().with_pending(key.clone())?;
        self.commit(&one, app, ring).await?;
        tracing::info!(app = %app.name, kid, fingerprint = %key.fingerprint, "imported a key (pending)");
        Ok(key)
    }

    /// Switches signing to the key `kid` (or the generated key `fingerprint`,
    /// which gets `kid`) if a trial mint with it succeeds. Returns the new
    /// active key and the new standby.
    pub async fn activate(
        &self,
        app: &str,
        kid: &str,
        fingerprint: &str,
    ) -> Result<(KeyEntry, Option<KeyEntry>), AdminError> {
        let app = self.app(app)?;
        let one = self.begin(app).await?;
        let ring = app.ring();
        Self::jwt_only(app, &ring)?;
        let candidate = ring.candidate(kid, fingerprint)?;
        let trial = ring
            .trial(&candidate)
            .ok_or_else(|| AdminError::FailedPrecondition("the key cannot sign yet".to_owned()))?;
        self.trial_mint(app, &trial.credentials, &format!("key {kid}")).await?;
        candidate.mark_used(app.client.now());
        let activated = ring.activated(&candidate);
        let standby = activated.key_in(KeyState::Standby).cloned();
        let active = activated.key_in(KeyState::Active).cloned().unwrap_or(candidate);
        self.commit(&one, app, activated).await?;
        tracing::info!(
            app = %app.name,
            kid,
            standby_kid = standby.as_ref().and_then(|k| k.kid.as_deref()).unwrap_or(""),
            "activated a key after a successful trial mint"
        );
        Ok((active, standby))
    }

    /// Mints an enterprise token with `credentials`; Box's refusal becomes
    /// FailedPrecondition with the diagnosis.
    async fn trial_mint(
        &self,
        app: &App,
        credentials: &crate::boxapi::AppCredentials,
        what: &str,
    ) -> Result<(), AdminError> {
        app.trial_mint(credentials, AfterTrial::Expire).await.map_err(|diagnosis| {
            tracing::warn!(app = %app.name, error = %diagnosis.message, "the trial mint with {what} failed; nothing changed");
            let prefix = match diagnosis.kind {
                DiagnosisKind::Unavailable => "Box could not be asked",
                DiagnosisKind::Misconfigured | DiagnosisKind::NotFound => "Box refused",
            };
            AdminError::FailedPrecondition(format!(
                "the trial mint with {what} failed, so nothing changed. {prefix}: {}",
                diagnosis.message
            ))
        })
    }

    /// Retires the key whose kid or fingerprint is `id`.
    pub async fn retire(&self, app: &str, id: &str) -> Result<KeyEntry, AdminError> {
        let app = self.app(app)?;
        let one = self.begin(app).await?;
        let (ring, retired) = app.ring().retired(id)?;
        self.commit(&one, app, ring).await?;
        tracing::info!(app = %app.name, fingerprint = %retired.fingerprint, "retired a key");
        Ok(retired)
    }

    /// The app's keys, newest first.
    pub fn list(&self, app: &str) -> Result<Vec<KeyEntry>, AdminError> {
        let mut keys = self.app(app)?.ring().keys.clone();
        keys.sort_by_key(|k| std::cmp::Reverse(k.created));
        Ok(keys)
    }

    /// Switches to `secret` after a trial mint; the previous secrets become
    /// fallbacks. Returns how many fallbacks there are.
    pub async fn rotate_secret(&self, app: &str, secret: SecretString) -> Result<usize, AdminError> {
        use secrecy::ExposeSecret as _;
        if secret.expose_secret().trim().is_empty() {
            return Err(AdminError::InvalidArgument("new_secret is empty".to_owned()));
        }
        let app = self.app(app)?;
        let one = self.begin(app).await?;
        let ring = app.ring();
        let entry = SecretEntry::new(secret, SecretOrigin::Rotated, app.client.now());
        let rotated = ring.with_secret(entry.clone())?;
        let trial = ring
            .trial_secret(&entry)
            .ok_or_else(|| AdminError::FailedPrecondition("the app has no active key to try it with".to_owned()))?;
        self.trial_mint(app, &trial.credentials, "the new client secret")
            .await?;
        let fallbacks = rotated.secrets.len() - 1;
        self.commit(&one, app, rotated).await?;
        tracing::info!(app = %app.name, fallbacks, "rotated the client secret after a successful trial mint");
        Ok(fallbacks)
    }

    /// Drops the app's fallback secrets; returns how many.
    pub async fn retire_secrets(&self, app: &str) -> Result<usize, AdminError> {
        let app = self.app(app)?;
        let one = self.begin(app).await?;
        let (ring, dropped) = app.ring().without_fallback_secrets();
        if dropped > 0 {
            self.commit(&one, app, ring).await?;
        }
        tracing::info!(app = %app.name, dropped, "retired fallback client secrets");
        Ok(dropped)
    }

    /// Drops cached tokens: of `app` (every app when empty and no subject is
    /// given), of `subject` only when given.
    ///
    /// With a fleet's Redis, the shared copies go too and every other
    /// replica is told to do the same.
    pub async fn invalidate(&self, app: &str, subject: Option<&Subject>) -> Result<usize, AdminError> {
        let (dropped, apps, resolved) = self.invalidate_here(app, subject).await?;
        if let Some(fleet) = self.broker.fleet() {
            let names: Vec<&str> = match &apps {
                Some(a) => vec![&*a.name],
                None => self.broker.apps().map(|a| &*a.name).collect(),
            };
            let shared = match (&apps, subject, &resolved) {
                (Some(a), Some(_), Some(subject)) => {
                    fleet.invalidate(&TokenKey::full(a.name.clone(), subject.clone())).await
                }
                // An external id nobody resolved here: another replica may have
                // (its notice below). A subject always comes with its app.
                (_, Some(_), _) => true,
                (_, None, _) => fleet.invalidate_apps(&names).await,
            };
            // Again here: a request between the first drop and Redis's may
            // have taken the token back from Redis.
            let subject_filter = subject.map(|_| resolved.clone());
            self.drop_local(apps.as_ref(), subject_filter.as_ref()).await;
            // By Box id when it is known here; else by external id, for a
            // replica that knows it.
            let told = fleet
                .announce(&crate::l2::Notice::Invalidated {
                    app: apps.as_ref().map(|a| a.name.to_string()),
                    subject: subject.map(|s| match (s, &resolved) {
                        (Subject::Enterprise, _) => crate::l2::NoticeSubject::Enterprise,
                        (_, Some(BoxSubject::User(id))) | (Subject::User(id), _) => {
                            crate::l2::NoticeSubject::User(id.as_str().to_owned())
                        }
                        (Subject::External(user), _) => crate::l2::NoticeSubject::External(user.id.to_string()),
                    }),
                })
                .await;
            if !(shared && told) {
                tracing::warn!(
                    app,
                    "Redis is unavailable: this replica tells the others (and drops the shared copies) when it answers again"
                );
            }
        }
        Ok(dropped)
    }

    /// [`Self::invalidate`] in this broker only (what another replica's notice asks).
    /// Returns how many tokens it dropped, the app (if one was named) and
    /// the subject as Box knows it (if one was named and is known).
    async fn invalidate_here(
        &self,
        app: &str,
        subject: Option<&Subject>,
    ) -> Result<(usize, Option<Arc<App>>, Option<BoxSubject>), AdminError> {
        // A subject belongs to an app: the named one, or the only one.
        let app_name = if app.is_empty() && subject.is_none() {
            None
        } else {
            Some(self.app(app)?.clone())
        };
        // `Some(None)`: a user by an external id the broker has not resolved (no token to drop).
        let subject = match (subject, &app_name) {
            (Some(Subject::Enterprise), Some(a)) => Some(Some(BoxSubject::Enterprise(a.enterprise_id()))),
            // The user's role and status are read again before its next token.
            (Some(user), Some(a)) => Some(self.broker.forget_user(a, user).await.map(BoxSubject::User)),
            _ => None,
        };
        let dropped = self.drop_local(app_name.as_ref(), subject.as_ref()).await;
        tracing::info!(app, dropped, "invalidated cached tokens");
        Ok((dropped, app_name, subject.flatten()))
    }

    /// Drops this broker's cached tokens of `app` (every app when `None`)
    /// and of `subject` (every subject when `None`; none when `Some(None)`:
    /// a user not known here).
    async fn drop_local(&self, app: Option<&Arc<App>>, subject: Option<&Option<BoxSubject>>) -> usize {
        self.broker
            .cache()
            .invalidate_where(|key| {
                app.is_none_or(|a| key.app == a.name) && subject.is_none_or(|s| s.as_ref() == Some(&key.subject))
            })
            .await
    }
}

/// What the key store holds: every app's ring (with `changed` in place of
/// its app's) and the apps the config no longer names.
fn snapshot(
    broker: &Broker,
    orphans: &BTreeMap<String, StoredApp>,
    changed: Option<(&App, &Ring)>,
) -> Result<StoredState, StoreError> {
    let mut state = StoredState { apps: orphans.clone() };
    for app in broker.apps() {
        let ring = match changed {
            Some((changed_app, ring)) if changed_app.name == app.name => StoredApp::from_ring(ring),
            _ => StoredApp::from_ring(&app.ring()),
        };
        let stored = ring.map_err(|problem| StoreError {
            path: String::new(),
            problem,
        })?;
        state.apps.insert(app.name.to_string(), stored);
    }
    Ok(state)
}

/// `[[admin.rules]]`: which admin identities may call which admin RPCs, for
/// which apps. Deny by default.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminRule {
    /// Admin identities (API key identities, certificate SANs, the Unix
    /// socket's identity), exact or `*`-globs.
    pub callers: Vec<crate::policy::Glob>,
    /// RPC names (`ListKeys`, `ActivateKey`, ...) or globs; `*` for all.
    pub rpcs: Vec<crate::policy::Glob>,
    /// Apps, by config name or glob; all when left out.
    #[serde(default = "every_app")]
    pub apps: Vec<crate::policy::Glob>,
}

fn every_app() -> Vec<crate::policy::Glob> {
    vec![crate::policy::Glob::new("*")]
}

/// The admin rules.
#[derive(Debug, Clone, Default)]
pub struct AdminRules(pub Vec<AdminRule>);

impl AdminRules {
    /// Rules granting everything to callers matching `caller` (for `dev` mode and tests).
    pub fn allow_everything(caller: &str) -> Self {
        Self(vec![AdminRule {
            callers: vec![crate::policy::Glob::new(caller)],
            rpcs: vec![crate::policy::Glob::new("*")],
            apps: every_app(),
        }])
    }

    /// Checks that every rule names callers and known RPCs.
    pub fn validate(&self) -> Result<(), String> {
        for (i, rule) in self.0.iter().enumerate() {
            if rule.callers.is_empty() || rule.rpcs.is_empty() {
                return Err(format!("admin.rules[{i}]: callers and rpcs must both be non-empty"));
            }
            if let Some(bad) = rule.callers.iter().find_map(|c| c.check_caller().err()) {
                return Err(format!("admin.rules[{i}]: {bad}"));
            }
            if let Some(bad) = rule
                .rpcs
                .iter()
                .find(|g| !Rpc::ADMIN.iter().any(|r| g.matches(r.name())))
            {
                return Err(format!(
                    "admin.rules[{i}]: {bad} matches no admin RPC (they are {})",
                    Rpc::ADMIN.map(Rpc::name).join(", ")
                ));
            }
        }
        Ok(())
    }

    /// May `caller` call `rpc` for some app?
    pub fn allows_some(&self, caller: &str, rpc: &str) -> bool {
        self.0
            .iter()
            .any(|r| r.callers.iter().any(|c| c.matches(caller)) && r.rpcs.iter().any(|g| g.matches(rpc)))
    }

    /// May `caller` call `rpc` for `app` (a configured app's name)?
    pub fn allows(&self, caller: &str, rpc: &str, app: &str) -> Result<(), String> {
        let granted = self.0.iter().any(|r| {
            r.callers.iter().any(|c| c.matches(caller))
                && r.rpcs.iter().any(|g| g.matches(rpc))
                && r.apps.iter().any(|a| a.matches(app))
        });
        if granted {
            Ok(())
        } else {
            Err(format!(
                "admin identity {caller:?} may not call {rpc} for app {app:?} (no [[admin.rules]] grants it)"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> AdminRules {
        #[derive(serde::Deserialize)]
        struct File {
            rules: Vec<AdminRule>,
        }
        AdminRules(toml::from_str::<File>(text).map(|f| f.rules).unwrap_or_default())
    }

    #[test]
    fn admin_rules_deny_by_default_and_grant_only_what_they_name() {
        let r = rules(
            "[[rules]]\ncallers = [\"apikey:oncall-*\"]\nrpcs = [\"ListKeys\", \"GetStatus\"]\n\
             [[rules]]\ncallers = [\"apikey:rotator\"]\nrpcs = [\"*\"]\napps = [\"billing\"]\n",
        );
        assert!(r.validate().is_ok());
        assert!(r.allows("apikey:oncall-alice", "ListKeys", "default").is_ok());
        assert!(r.allows_some("apikey:oncall-alice", "GetStatus"));
        let denied = r
            .allows("apikey:oncall-alice", "ActivateKey", "default")
            .err()
            .unwrap_or_default();
        assert_eq!(
            denied,
            "admin identity \"apikey:oncall-alice\" may not call ActivateKey for app \"default\" (no [[admin.rules]] grants it)"
        );
        assert!(r.allows("apikey:rotator", "ActivateKey", "billing").is_ok());
        assert!(r.allows("apikey:rotator", "ActivateKey", "default").is_err());
        assert!(!AdminRules::default().allows_some("anyone", "GetStatus"));
        assert!(
            r.allows("apikey:rotator", "ActivateKey", "").is_err(),
            "an empty name is not a wildcard"
        );
    }

    #[test]
    fn a_rule_naming_no_admin_rpc_is_invalid() {
        let r = rules("[[rules]]\ncallers = [\"apikey:x\"]\nrpcs = [\"GetToken\"]\n");
        let e = r.validate().err().unwrap_or_default();
        assert!(
            e.starts_with("admin.rules[0]: \"GetToken\" matches no admin RPC"),
            "{e}"
        );
    }
}
