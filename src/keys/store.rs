//! The durable key store: the keys and secrets added through the admin RPC,
//! encrypted at rest with AES-256-GCM under a key-encryption key (KEK) that
//! is read from a file or an environment variable.
//!
//! Writes are atomic: a temporary file in the same directory is written and
//! fsynced, renamed over the store, and the directory is fsynced. A crash at
//! any instant leaves the old or the new store, never a torn one. A store that
//! cannot be read, decrypted or parsed is an error, never silently replaced.
//!
//! The file is JSON: `{"format", "version", "nonce", "ciphertext"}`; the
//! plaintext is JSON too ([`StoredState`]). The config's own key and secret
//! are recorded by fingerprint only: their private parts stay in the config.

use std::{
    collections::BTreeMap,
    fmt,
    io::Write as _,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, SystemTime},
};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine as _;
use rsa::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{KeyEntry, KeyOrigin, KeyState, Ring, SecretEntry, SecretOrigin};
use crate::clock::unix_seconds;

const FORMAT: &str = "box-broker key store";
const VERSION: u32 = 1;
const AAD: &[u8] = b"box-broker key store v1";

/// The key-encryption key: 32 bytes. It encrypts the store itself, and
/// keys for other purposes are derived from it (HKDF-SHA256, one `info`
/// string per purpose): what the brokers of a fleet share in Redis.
pub struct Kek(LessSafeKey, aws_lc_rs::hkdf::Prk);

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(****)")
    }
}

impl Kek {
    /// Parses a KEK written as base64 (or 64 hex digits) of 32 bytes. The
    /// error never quotes the input.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bytes = Zeroizing::new(if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).map_err(|_| "not hex".to_owned())?
        } else {
            base64::engine::general_purpose::STANDARD.decode(text).map_err(|_| {
                "the key-encryption key must be 32 bytes written as base64 (head -c 32 /dev/urandom | base64)"
                    .to_owned()
            })?
        });
        if bytes.len() != 32 {
            return Err(format!(
                "the key-encryption key must be 32 bytes (it is {}): head -c 32 /dev/urandom | base64",
                bytes.len()
            ));
        }
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| "the key-encryption key is unusable".to_owned())?;
        let prk = aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, b"box-token-broker kek").extract(&bytes);
        Ok(Self(LessSafeKey::new(key), prk))
    }

    /// A 32-byte key for `purpose`, derived from the KEK: different
    /// purposes get unrelated keys, and none reveals the KEK.
    pub fn derive(&self, purpose: &str) -> Zeroizing<[u8; 32]> {
        struct Len32;
        impl aws_lc_rs::hkdf::KeyType for Len32 {
            fn len(&self) -> usize {
                32
            }
        }
        let mut out = Zeroizing::new([0u8; 32]);
        let info = [purpose.as_bytes()];
        // Expanding to 32 bytes (far below HKDF-SHA256's 8,160) cannot fail.
        if let Ok(okm) = self.1.expand(&info, Len32) {
            let _ = okm.fill(out.as_mut());
        }
        out
    }

    /// A fresh random KEK (for `dev` mode), with its base64 form.
    pub fn generate() -> Result<(Self, SecretString), String> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        aws_lc_rs::rand::fill(bytes.as_mut()).map_err(|_| "no randomness available".to_owned())?;
        let text = SecretString::from(base64::engine::general_purpose::STANDARD.encode(bytes.as_ref()));
        Ok((Self::parse(text.expose_secret())?, text))
    }
}

/// A key store problem; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("key store {path}: {problem}")]
pub struct StoreError {
    /// The store file.
    pub path: String,
    /// What is wrong.
    pub problem: String,
}

/// Everything the store holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredState {
    /// By app name.
    pub apps: BTreeMap<String, StoredApp>,
}

/// One app's keys and secrets.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredApp {
    /// Its keys.
    pub keys: Vec<StoredKey>,
    /// Its secrets, current first.
    pub secrets: Vec<StoredSecret>,
    /// Fingerprints of retired secrets.
    #[serde(default)]
    pub retired_secrets: Vec<String>,
    /// Raised by every change through the admin RPC: a fleet sharing a
    /// Redis adopts a key set only if it is newer than its own (0: a store
    /// written before versions, or never changed).
    #[serde(default)]
    pub version: u64,
    /// See [`Ring::change`].
    #[serde(default)]
    pub change: u64,
}

/// One stored key.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    fingerprint: String,
    kid: Option<String>,
    bits: usize,
    created: i64,
    state: KeyState,
    origin: KeyOrigin,
    last_used: i64,
    /// Base64 PKCS#8 DER; absent for the config's key.
    private_pkcs8: Option<Zeroizing<String>>,
}

impl fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredKey")
            .field("fingerprint", &self.fingerprint)
            .field("kid", &self.kid)
            .field("state", &self.state)
            .field("private_pkcs8", &"****")
            .finish_non_exhaustive()
    }
}

/// One stored client secret.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredSecret {
    fingerprint: String,
    created: i64,
    origin: SecretOrigin,
    /// Absent for the config's secret.
    secret: Option<Zeroizing<String>>,
}

impl fmt::Debug for StoredSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredSecret")
            .field("fingerprint", &self.fingerprint)
            .field("origin", &self.origin)
            .field("secret", &"****")
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    format: String,
    version: u32,
    nonce: String,
    ciphertext: String,
}

fn time(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0).unsigned_abs())
}

impl StoredApp {
    /// The stored form of `ring`.
    pub fn from_ring(ring: &Ring) -> Result<Self, String> {
        let mut keys = Vec::with_capacity(ring.keys.len());
        for key in &ring.keys {
            let private_pkcs8 = match (&key.private, key.origin) {
                (_, KeyOrigin::Config) | (None, _) => None,
                (Some(private), _) => {
                    let der = private
                        .to_pkcs8_der()
                        .map_err(|e| format!("cannot encode key {}: {e}", key.fingerprint))?;
                    Some(Zeroizing::new(
                        base64::engine::general_purpose::STANDARD.encode(der.as_bytes()),
                    ))
                }
            };
            keys.push(StoredKey {
                fingerprint: key.fingerprint.clone(),
                kid: key.kid.clone(),
                bits: key.bits,
                created: unix_seconds(key.created),
                state: key.state,
                origin: key.origin,
                last_used: key.last_used.load(Ordering::Relaxed),
                private_pkcs8,
            });
        }
        let secrets = ring
            .secrets
            .iter()
            .map(|s| StoredSecret {
                fingerprint: s.fingerprint.clone(),
                created: unix_seconds(s.created),
                origin: s.origin,
                secret: (s.origin == SecretOrigin::Rotated)
                    .then(|| Zeroizing::new(s.secret.expose_secret().to_owned())),
            })
            .collect();
        Ok(Self {
            keys,
            secrets,
            retired_secrets: ring.retired_secrets.clone(),
            version: ring.version,
            change: ring.change,
        })
    }

    /// Drops the private material of retired keys (stores written before
    /// retiring purged it still hold some). True when anything was dropped.
    pub fn purge_retired(&mut self) -> bool {
        let mut purged = false;
        for key in &mut self.keys {
            if key.state == KeyState::Retired && key.private_pkcs8.is_some() {
                key.private_pkcs8 = None;
                purged = true;
            }
        }
        purged
    }

    /// Lays this stored state over the ring built from the config. The
    /// store's states win; the config's key joins as standby (or pending)
    /// when the store already has another active key, and the config's
    /// secret becomes a fallback unless it was retired.
    pub fn merge_into(&self, config: Ring) -> Result<Ring, String> {
        let config_key = config.keys.iter().find(|k| k.origin == KeyOrigin::Config).cloned();
        let mut keys = Vec::with_capacity(self.keys.len() + 1);
        let mut config_key_placed = false;
        for stored in &self.keys {
            let entry = match (&stored.private_pkcs8, stored.origin) {
                _ if stored.state == KeyState::Retired => {
                    if config_key.as_ref().is_some_and(|k| k.fingerprint == stored.fingerprint) {
                        config_key_placed = true;
                    }
                    KeyEntry::retired_metadata(
                        stored.fingerprint.clone(),
                        stored.kid.clone(),
                        stored.bits,
                        stored.origin,
                        time(stored.created),
                    )
                }
                (None, KeyOrigin::Config) => match &config_key {
                    Some(k) if k.fingerprint == stored.fingerprint => {
                        config_key_placed = true;
                        KeyEntry {
                            state: stored.state,
                            created: time(stored.created),
                            ..k.clone()
                        }
                    }
                    // The config now names a different key: the old one is gone.
                    _ => continue,
                },
                (Some(b64), _) => {
                    let der = Zeroizing::new(
                        base64::engine::general_purpose::STANDARD
                            .decode(b64.as_bytes())
                            .map_err(|_| format!("key {}: its private key is not base64", stored.fingerprint))?,
                    );
                    let private = rsa::RsaPrivateKey::from_pkcs8_der(&der)
                        .map_err(|_| format!("key {}: its private key cannot be decoded", stored.fingerprint))?;
                    let entry = KeyEntry::from_private(
                        private,
                        stored.kid.clone(),
                        stored.origin,
                        stored.state,
                        time(stored.created),
                    )?;
                    if entry.fingerprint != stored.fingerprint {
                        return Err(format!("key {}: the private key does not match", stored.fingerprint));
                    }
                    entry
                }
                (None, _) => return Err(format!("key {}: its private key is missing", stored.fingerprint)),
            };
            entry.last_used.store(stored.last_used, Ordering::Relaxed);
            keys.push(entry);
        }
        if let Some(config_key) = config_key.filter(|_| !config_key_placed) {
            let state = if !keys.iter().any(|k| k.state == KeyState::Active) {
                KeyState::Active
            } else if !keys.iter().any(|k| k.state == KeyState::Standby) {
                KeyState::Standby
            } else {
                KeyState::Pending
            };
            if state != KeyState::Active {
                tracing::warn!(
                    kid = config_key.kid.as_deref().unwrap_or(""),
                    ?state,
                    "the config's key is not the key store's active key; the store's stays active (switch with ActivateKey)"
                );
            }
            keys.push(KeyEntry { state, ..config_key });
        }
        if keys.iter().filter(|k| k.state == KeyState::Active).count() > 1 {
            return Err("more than one key is active".to_owned());
        }
        let config_secret = config.secrets.first().cloned();
        let mut secrets = Vec::with_capacity(self.secrets.len() + 1);
        for stored in &self.secrets {
            match (&stored.secret, &config_secret) {
                (Some(secret), _) => secrets.push(SecretEntry {
                    secret: SecretString::from(secret.as_str()),
                    fingerprint: stored.fingerprint.clone(),
                    created: time(stored.created),
                    origin: stored.origin,
                }),
                (None, Some(c)) if c.fingerprint == stored.fingerprint => secrets.push(SecretEntry {
                    created: time(stored.created),
                    ..c.clone()
                }),
                // The config's secret changed since: the recorded one is gone.
                (None, _) => {}
            }
        }
        if let Some(c) = config_secret
            && !secrets.iter().any(|s| s.fingerprint == c.fingerprint)
            && !self.retired_secrets.contains(&c.fingerprint)
        {
            secrets.push(c);
        }
        if secrets.is_empty() {
            return Err("no usable client secret remains (the config's was retired)".to_owned());
        }
        Ok(Ring {
            identity: config.identity,
            keys,
            secrets,
            retired_secrets: self.retired_secrets.clone(),
            version: self.version,
            change: self.change,
        })
    }
}

/// The store file and its KEK.
#[derive(Debug)]
pub struct KeyStore {
    path: PathBuf,
    kek: Kek,
}

impl KeyStore {
    /// The store at `path`, encrypted under `kek`.
    pub fn new(path: PathBuf, kek: Kek) -> Self {
        Self { path, kek }
    }

    /// Its KEK (what a fleet's Redis seals with is derived from it).
    pub fn kek(&self) -> &Kek {
        &self.kek
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, problem: impl Into<String>) -> StoreError {
        StoreError {
            path: self.path.display().to_string(),
            problem: problem.into(),
        }
    }

    /// Reads and decrypts the store. No file yet is an empty store; anything
    /// unreadable is an error (never an empty store).
    pub fn load(&self) -> Result<StoredState, StoreError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StoredState::default()),
            Err(e) => return Err(self.error(format!("cannot read: {e}"))),
        };
        let corrupt = |why: &str| {
            self.error(format!(
                "{why}: the file is corrupt or truncated; restore it from backup (the broker never discards a store)"
            ))
        };
        let envelope: Envelope = serde_json::from_slice(&bytes).map_err(|_| corrupt("not a key store"))?;
        if envelope.format != FORMAT {
            return Err(corrupt("not a key store"));
        }
        if envelope.version != VERSION {
            return Err(self.error(format!(
                "version {} is not supported (this broker reads version {VERSION})",
                envelope.version
            )));
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let nonce: [u8; NONCE_LEN] = b64
            .decode(&envelope.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| corrupt("its nonce is malformed"))?;
        let mut data = Zeroizing::new(
            b64.decode(&envelope.ciphertext)
                .map_err(|_| corrupt("its ciphertext is malformed"))?,
        );
        let plaintext = self
            .kek
            .0
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(AAD), &mut data)
            .map_err(|_| {
                self.error(
                    "cannot decrypt: the key-encryption key is not the one it was written with, or the file is corrupt",
                )
            })?;
        serde_json::from_slice(plaintext).map_err(|e| self.error(format!("its decrypted contents are not valid: {e}")))
    }

    /// Encrypts and writes `state` atomically (temp file, fsync, rename, directory fsync).
    pub fn save(&self, state: &StoredState) -> Result<(), StoreError> {
        let mut data =
            Zeroizing::new(serde_json::to_vec(state).map_err(|e| self.error(format!("cannot encode: {e}")))?);
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| self.error("no randomness available"))?;
        self.kek
            .0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(AAD), &mut *data)
            .map_err(|_| self.error("cannot encrypt"))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let envelope = serde_json::to_vec_pretty(&Envelope {
            format: FORMAT.to_owned(),
            version: VERSION,
            nonce: b64.encode(nonce),
            ciphertext: b64.encode(&*data),
        })
        .map_err(|e| self.error(format!("cannot encode: {e}")))?;
        self.write_atomically(&envelope)
    }

    fn write_atomically(&self, bytes: &[u8]) -> Result<(), StoreError> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut suffix = [0u8; 8];
        aws_lc_rs::rand::fill(&mut suffix).map_err(|_| self.error("no randomness available"))?;
        let temp = dir.join(format!(".{name}.tmp-{}", hex::encode(suffix)));
        let written = (|| -> std::io::Result<()> {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&temp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&temp, &self.path)?;
            std::fs::File::open(&dir)?.sync_all()
        })();
        written.map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            self.error(format!("cannot write: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kek_must_be_32_bytes_and_is_never_echoed() {
        let err = Kek::parse("c2hvcnQta2V5").err().unwrap_or_default();
        assert!(err.contains("must be 32 bytes (it is 9)"), "{err}");
        let err = Kek::parse("not base64 at all!").err().unwrap_or_default();
        assert!(!err.contains("not base64 at all"), "{err}");
        assert!(Kek::parse(&"ab".repeat(32)).is_ok());
        assert_eq!(format!("{:?}", Kek::generate().map(|k| k.0).ok()), "Some(Kek(****))");
    }

    #[test]
    fn state_round_trips_and_a_wrong_kek_or_a_flipped_byte_is_an_error() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("keys.json");
        let (kek, text) = Kek::generate().unwrap_or_else(|e| panic!("{e}"));
        let store = KeyStore::new(path.clone(), kek);
        assert!(
            store.load().is_ok_and(|s| s.apps.is_empty()),
            "no file yet is an empty store"
        );
        let mut state = StoredState::default();
        state.apps.insert("default".to_owned(), StoredApp::default());
        store.save(&state).unwrap_or_else(|e| panic!("{e}"));
        assert!(store.load().is_ok_and(|s| s.apps.contains_key("default")));
        let again = KeyStore::new(
            path.clone(),
            Kek::parse(text.expose_secret()).unwrap_or_else(|e| panic!("{e}")),
        );
        assert!(again.load().is_ok());

        let (other, _) = Kek::generate().unwrap_or_else(|e| panic!("{e}"));
        let err = KeyStore::new(path.clone(), other)
            .load()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("cannot decrypt: the key-encryption key is not the one"),
            "{err}"
        );

        let mut bytes = std::fs::read(&path).unwrap_or_default();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("{e}"));
        assert!(store.load().is_err(), "a flipped byte is never accepted");
    }
}
