//! An app's credentials as they rotate: its signing keys (pending, active,
//! standby, retired) and its client secrets (the current one first, then the
//! previous ones as ordered fallbacks).
//!
//! A [`Ring`] is immutable; a change makes a new ring, which the admin layer
//! persists (see [`store`]) before the app starts using it. Minting reads the
//! ring once per attempt, so a switch never tears a request.

pub mod store;

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::SystemTime,
};

use rsa::RsaPrivateKey;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{
    boxapi::{AppCredentials, AuthMethod, BoxId, JwtAlgorithm, SigningKey},
    clock::unix_seconds,
};

/// Where a key is in its rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Stored, not yet used: waiting for Box to know its public half.
    Pending,
    /// Signs every assertion.
    Active,
    /// The previous active key, tried once when Box rejects the active one.
    Standby,
    /// Never used again.
    Retired,
}

/// Where a key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyOrigin {
    /// The app's config (the Box console JSON or a key file). Its private
    /// part is never written to the key store.
    Config,
    /// `GenerateKey`.
    Generated,
    /// `ImportKey`.
    Imported,
}

impl KeyOrigin {
    /// The name shown in `ListKeys`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Generated => "generated",
            Self::Imported => "imported",
        }
    }
}

/// One signing key of an app.
#[derive(Clone)]
pub struct KeyEntry {
    /// Lowercase hex SHA-256 of the public key (SubjectPublicKeyInfo DER).
    pub fingerprint: String,
    /// The public key id Box assigned; `None` for a generated key not yet activated.
    pub kid: Option<String>,
    /// Modulus size in bits.
    pub bits: usize,
    /// When the broker first saw it.
    pub created: SystemTime,
    /// Where it is in its rotation.
    pub state: KeyState,
    /// Where it came from.
    pub origin: KeyOrigin,
    /// Unix seconds of the last mint Box accepted with it (0: never); shared by
    /// every ring the entry is copied into.
    pub last_used: Arc<AtomicI64>,
    /// The private key, for keys the broker stores (generated and imported).
    pub(crate) private: Option<Arc<RsaPrivateKey>>,
    /// The signing key, once the kid is known.
    pub(crate) signing: Option<SigningKey>,
}

impl fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyEntry")
            .field("fingerprint", &self.fingerprint)
            .field("kid", &self.kid)
            .field("bits", &self.bits)
            .field("state", &self.state)
            .field("origin", &self.origin)
            .field("private_key", &"****")
            .finish_non_exhaustive()
    }
}

impl KeyEntry {
    /// A key held as a private key (generated or imported).
    pub fn from_private(
        key: RsaPrivateKey,
        kid: Option<String>,
        origin: KeyOrigin,
        state: KeyState,
        created: SystemTime,
    ) -> Result<Self, String> {
        let fingerprint = public_fingerprint(&key)?;
        let signing = match &kid {
            Some(kid) => Some(SigningKey::new(kid.clone(), &key).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(Self {
            fingerprint,
            kid,
            bits: rsa::traits::PublicKeyParts::size(&key) * 8,
            created,
            state,
            origin,
            last_used: Arc::new(AtomicI64::new(0)),
            private: Some(Arc::new(key)),
            signing,
        })
    }

    /// The config's key.
    pub fn from_config(signing: SigningKey, created: SystemTime) -> Self {
        Self {
            fingerprint: signing.fingerprint().to_owned(),
            kid: Some(signing.kid().to_owned()),
            bits: signing.bits(),
            created,
            state: KeyState::Active,
            origin: KeyOrigin::Config,
            last_used: Arc::new(AtomicI64::new(0)),
            private: None,
            signing: Some(signing),
        }
    }

    /// A retired key as remembered: its metadata, no private material.
    pub(crate) fn retired_metadata(
        fingerprint: String,
        kid: Option<String>,
        bits: usize,
        origin: KeyOrigin,
        created: SystemTime,
    ) -> Self {
        Self {
            fingerprint,
            kid,
            bits,
            created,
            state: KeyState::Retired,
            origin,
            last_used: Arc::new(AtomicI64::new(0)),
            private: None,
            signing: None,
        }
    }

    /// Retires this key: its private material is dropped (and, being
    /// `zeroize`d on drop by `rsa`, wiped) once no mint holds it; the
    /// metadata stays for `ListKeys` and the audit trail.
    fn retire(&mut self) {
        self.state = KeyState::Retired;
        self.private = None;
        self.signing = None;
    }

    /// True while the broker holds this key's private material (false once
    /// it is retired).
    pub fn has_private_material(&self) -> bool {
        self.private.is_some() || self.signing.is_some()
    }

    /// The same key under `kid` (for a generated key being activated).
    pub fn with_kid(&self, kid: &str) -> Result<Self, String> {
        let private = self
            .private
            .as_ref()
            .ok_or_else(|| "the config's key keeps the kid the config gives it".to_owned())?;
        Ok(Self {
            kid: Some(kid.to_owned()),
            signing: Some(SigningKey::new(kid, private).map_err(|e| e.to_string())?),
            ..self.clone()
        })
    }

    /// The last time Box accepted it.
    pub fn last_used_at(&self) -> Option<SystemTime> {
        match self.last_used.load(Ordering::Relaxed) {
            0 => None,
            secs => Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs.unsigned_abs())),
        }
    }

    /// Records that Box accepted an assertion signed with it at `now`.
    pub fn mark_used(&self, now: SystemTime) {
        self.last_used.store(unix_seconds(now), Ordering::Relaxed);
    }

    /// True when `id` is its kid or its fingerprint.
    pub fn is(&self, id: &str) -> bool {
        self.kid.as_deref() == Some(id) || self.fingerprint == id
    }
}

/// The fewest hex digits of a fingerprint that name a key (32 bits: two
/// keys of one app share them by chance about once in four billion).
pub const MIN_FINGERPRINT_PREFIX: usize = 8;

/// Lowercase hex SHA-256 of the key's public half (SubjectPublicKeyInfo DER).
pub fn public_fingerprint(key: &RsaPrivateKey) -> Result<String, String> {
    use rsa::pkcs8::EncodePublicKey as _;
    let spki = key
        .to_public_key()
        .to_public_key_der()
        .map_err(|e| format!("cannot encode the public key: {e}"))?;
    Ok(hex::encode(Sha256::digest(spki.as_bytes())))
}

/// Where a client secret came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretOrigin {
    /// The app's config; never written to the key store.
    Config,
    /// `RotateClientSecret`.
    Rotated,
}

/// One client secret.
#[derive(Clone)]
pub struct SecretEntry {
    /// The secret.
    pub secret: SecretString,
    /// Lowercase hex SHA-256 of the secret: how the store recognizes it.
    pub fingerprint: String,
    /// When the broker first saw it.
    pub created: SystemTime,
    /// Where it came from.
    pub origin: SecretOrigin,
}

impl fmt::Debug for SecretEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretEntry")
            .field("secret", &"****")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl SecretEntry {
    /// A secret entry.
    pub fn new(secret: SecretString, origin: SecretOrigin, created: SystemTime) -> Self {
        Self {
            fingerprint: secret_fingerprint(&secret),
            secret,
            created,
            origin,
        }
    }
}

/// Lowercase hex SHA-256 of a client secret.
pub fn secret_fingerprint(secret: &SecretString) -> String {
    hex::encode(Sha256::digest(secret.expose_secret().as_bytes()))
}

/// The fixed part of an app's identity at Box.
#[derive(Debug, Clone)]
pub struct AppIdentity {
    /// The client id (the assertion's `iss`).
    pub client_id: String,
    /// The enterprise the app is authorized in.
    pub enterprise_id: BoxId,
    /// The assertion's algorithm (JWT apps); `None` for a CCG app.
    pub algorithm: Option<JwtAlgorithm>,
}

/// An app's keys and secrets at one moment.
#[derive(Debug, Clone)]
pub struct Ring {
    /// Who the app is.
    pub identity: Arc<AppIdentity>,
    /// Every key, in the order added.
    pub keys: Vec<KeyEntry>,
    /// The current secret first, then fallbacks, newest first.
    pub secrets: Vec<SecretEntry>,
    /// Fingerprints of retired secrets (so the config's is not revived at restart).
    pub retired_secrets: Vec<String>,
    /// The key set's version: raised by every change through the admin
    /// RPC, so replicas sharing a Redis adopt only a newer set (0: never changed).
    pub version: u64,
    /// Random, drawn by each change: two sets of one version from different
    /// changes (one never published) tell apart by it.
    pub change: u64,
}

/// One way to authenticate a mint: credentials plus which key they use.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// What to send.
    pub credentials: Arc<AppCredentials>,
    /// The key's entry (JWT apps).
    pub key: Option<KeyEntry>,
}

/// A ring change that is not allowed; the message says why and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// No key or secret by that name.
    #[error("{0}")]
    NotFound(String),
    /// The change is not allowed in the current state.
    #[error("{0}")]
    Refused(String),
}

impl Ring {
    /// A ring holding only the config's credentials.
    pub fn from_config(credentials: &AppCredentials, now: SystemTime) -> Self {
        let (keys, algorithm) = match &credentials.auth {
            AuthMethod::Jwt { key, algorithm } => (vec![KeyEntry::from_config(key.clone(), now)], Some(*algorithm)),
            AuthMethod::Ccg => (Vec::new(), None),
        };
        Self {
            identity: Arc::new(AppIdentity {
                client_id: credentials.client_id.clone(),
                enterprise_id: credentials.enterprise_id.clone(),
                algorithm,
            }),
            keys,
            secrets: vec![SecretEntry::new(
                credentials.client_secret.clone(),
                SecretOrigin::Config,
                now,
            )],
            retired_secrets: Vec::new(),
            version: 0,
            change: 0,
        }
    }

    /// The key in `state` (there is at most one active and one standby).
    pub fn key_in(&self, state: KeyState) -> Option<&KeyEntry> {
        self.keys.iter().find(|k| k.state == state)
    }

    /// The key whose kid or fingerprint is `id`.
    pub fn key(&self, id: &str) -> Option<&KeyEntry> {
        self.keys.iter().find(|k| k.is(id))
    }

    /// The key whose fingerprint is `given`, or begins with it: a prefix of
    /// at least [`MIN_FINGERPRINT_PREFIX`] hex digits that no other key shares
    /// (what a person copies from `ListKeys`; a trailing `…` is ignored).
    pub fn by_fingerprint(&self, given: &str) -> Result<&KeyEntry, RingError> {
        let prefix = given.trim().trim_end_matches('…').to_ascii_lowercase();
        if let Some(key) = self.keys.iter().find(|k| k.fingerprint == prefix) {
            return Ok(key);
        }
        if prefix.len() < MIN_FINGERPRINT_PREFIX || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RingError::NotFound(format!(
                "no key has fingerprint {given}: give the fingerprint ListKeys shows, or at least its first \
                 {MIN_FINGERPRINT_PREFIX} hex digits"
            )));
        }
        let mut matching = self.keys.iter().filter(|k| k.fingerprint.starts_with(&prefix));
        match (matching.next(), matching.next()) {
            (Some(key), None) => Ok(key),
            (None, _) => Err(RingError::NotFound(format!(
                "no key has a fingerprint beginning {prefix}"
            ))),
            (Some(_), Some(_)) => Err(RingError::Refused(format!(
                "more than one key has a fingerprint beginning {prefix}: give more of it"
            ))),
        }
    }

    fn credentials(&self, key: Option<&KeyEntry>, secret: &SecretEntry) -> Option<Attempt> {
        let auth = match (self.identity.algorithm, key) {
            (None, _) => AuthMethod::Ccg,
            (Some(algorithm), Some(key)) => AuthMethod::Jwt {
                key: key.signing.clone()?,
                algorithm,
            },
            (Some(_), None) => return None,
        };
        Some(Attempt {
            credentials: Arc::new(AppCredentials {
                client_id: self.identity.client_id.clone(),
                client_secret: secret.secret.clone(),
                enterprise_id: self.identity.enterprise_id.clone(),
                auth,
            }),
            key: key.cloned(),
        })
    }

    /// The credentials every mint tries first: the active key and current secret.
    pub fn primary(&self) -> Option<Attempt> {
        let key = self.key_in(KeyState::Active);
        self.credentials(key, self.secrets.first()?)
    }

    /// The standby key with the current secret.
    pub fn standby(&self) -> Option<Attempt> {
        let key = self.key_in(KeyState::Standby)?;
        self.credentials(Some(key), self.secrets.first()?)
    }

    /// The active key with each fallback secret, in order.
    pub fn secret_fallbacks(&self) -> Vec<Attempt> {
        let key = self.key_in(KeyState::Active);
        self.secrets
            .iter()
            .skip(1)
            .filter_map(|s| self.credentials(key, s))
            .collect()
    }

    /// The credentials a trial mint with `candidate` sends (JWT apps).
    pub fn trial(&self, candidate: &KeyEntry) -> Option<Attempt> {
        self.credentials(Some(candidate), self.secrets.first()?)
    }

    /// The credentials a trial mint with a new secret sends.
    pub fn trial_secret(&self, secret: &SecretEntry) -> Option<Attempt> {
        self.credentials(self.key_in(KeyState::Active), secret)
    }

    /// The ring with `key` added, pending.
    pub fn with_pending(&self, key: KeyEntry) -> Result<Self, RingError> {
        if let Some(existing) = self.keys.iter().find(|k| k.fingerprint == key.fingerprint) {
            return Err(RingError::Refused(format!(
                "this key is already held (kid {}, {:?})",
                existing.kid.as_deref().unwrap_or("(none yet)"),
                existing.state
            )));
        }
        if let Some(kid) = &key.kid
            && self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
        {
            return Err(RingError::Refused(format!("another key already has kid {kid}")));
        }
        let mut ring = self.clone();
        ring.keys.push(key);
        Ok(ring)
    }

    /// The key `ActivateKey` would switch to: found by fingerprint (and given
    /// `kid`) or by kid. Not yet in the ring's active place.
    pub fn candidate(&self, kid: &str, fingerprint: &str) -> Result<KeyEntry, RingError> {
        if kid.is_empty() {
            return Err(RingError::Refused(
                "kid is required: the public key id Box assigned when the public key was uploaded".to_owned(),
            ));
        }
        let key = if fingerprint.is_empty() {
            self.keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or_else(|| {
                    RingError::NotFound(format!(
                        "no key has kid {kid}: for a generated key, give its fingerprint too"
                    ))
                })?
        } else {
            self.by_fingerprint(fingerprint)?
        };
        if let Some(other) = self
            .keys
            .iter()
            .find(|k| k.kid.as_deref() == Some(kid) && k.fingerprint != key.fingerprint)
        {
            return Err(RingError::Refused(format!(
                "kid {kid} already belongs to the key with fingerprint {}",
                other.fingerprint
            )));
        }
        match key.state {
            KeyState::Active => Err(RingError::Refused(format!("the key with kid {kid} is already active"))),
            KeyState::Retired => Err(RingError::Refused(
                "a retired key cannot be activated again; import or generate a new one".to_owned(),
            )),
            KeyState::Pending | KeyState::Standby => match &key.kid {
                Some(existing) if existing != kid => {
                    Err(RingError::Refused(format!("that key has kid {existing}, not {kid}")))
                }
                Some(_) => Ok(key.clone()),
                None => key.with_kid(kid).map_err(RingError::Refused),
            },
        }
    }

    /// The ring after `candidate` (from [`Ring::candidate`]) becomes active:
    /// the previous active key is the standby, and a previous standby retires.
    pub fn activated(&self, candidate: &KeyEntry) -> Self {
        let mut ring = self.clone();
        for key in &mut ring.keys {
            if key.fingerprint == candidate.fingerprint {
                *key = KeyEntry {
                    state: KeyState::Active,
                    ..candidate.clone()
                };
            } else {
                match key.state {
                    KeyState::Active => key.state = KeyState::Standby,
                    KeyState::Standby => key.retire(),
                    _ => {}
                }
            }
        }
        ring
    }

    /// The ring with the key `id` (kid or fingerprint) retired.
    pub fn retired(&self, id: &str) -> Result<(Self, KeyEntry), RingError> {
        let key = match self.key(id) {
            Some(key) => key,
            None => self.by_fingerprint(id).map_err(|e| match e {
                RingError::NotFound(_) => RingError::NotFound(format!(
                    "no key has kid or fingerprint {id} (a fingerprint may be shortened to its first \
                     {MIN_FINGERPRINT_PREFIX} hex digits)"
                )),
                refused => refused,
            })?,
        };
        match key.state {
            KeyState::Active => Err(RingError::Refused(
                "the active key cannot be retired: activate another key first".to_owned(),
            )),
            KeyState::Retired => Err(RingError::Refused("that key is already retired".to_owned())),
            KeyState::Pending | KeyState::Standby => {
                let mut ring = self.clone();
                let mut retired = key.clone();
                retired.retire();
                for k in &mut ring.keys {
                    if k.fingerprint == retired.fingerprint {
                        k.retire();
                    }
                }
                Ok((ring, retired))
            }
        }
    }

    /// The ring with `secret` current and the previous ones as fallbacks.
    pub fn with_secret(&self, secret: SecretEntry) -> Result<Self, RingError> {
        if self
            .secrets
            .first()
            .is_some_and(|s| s.fingerprint == secret.fingerprint)
        {
            return Err(RingError::Refused(
                "that is already the current client secret".to_owned(),
            ));
        }
        let mut ring = self.clone();
        ring.secrets.retain(|s| s.fingerprint != secret.fingerprint);
        ring.retired_secrets.retain(|f| *f != secret.fingerprint);
        ring.secrets.insert(0, secret);
        Ok(ring)
    }

    /// The ring without fallback secrets, and how many were dropped.
    pub fn without_fallback_secrets(&self) -> (Self, usize) {
        let mut ring = self.clone();
        let dropped: Vec<SecretEntry> = ring.secrets.drain(1..).collect();
        ring.retired_secrets
            .extend(dropped.iter().map(|s| s.fingerprint.clone()));
        (ring, dropped.len())
    }
}

/// True when Box refused the assertion's key: an unknown `kid`, or a
/// signature that does not verify (box-contract.md §2.5).
pub fn is_key_rejection(error: &crate::boxapi::BoxApiError) -> bool {
    match error {
        crate::boxapi::BoxApiError::Rejected(e) => {
            e.code == "invalid_grant"
                && (e.description.contains("\"kid\" invalid") || e.description.contains("Signature verification"))
        }
        _ => false,
    }
}

/// True when Box refused the client id and secret.
pub fn is_secret_rejection(error: &crate::boxapi::BoxApiError) -> bool {
    matches!(error, crate::boxapi::BoxApiError::Rejected(e) if e.code == "invalid_client")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use super::*;

    fn ring(fingerprints: &[&str]) -> Ring {
        Ring {
            identity: Arc::new(AppIdentity {
                client_id: "client".to_owned(),
                enterprise_id: BoxId::parse("7000001").unwrap(),
                algorithm: None,
            }),
            keys: fingerprints
                .iter()
                .map(|f| {
                    KeyEntry::retired_metadata(
                        (*f).to_owned(),
                        None,
                        2048,
                        KeyOrigin::Generated,
                        SystemTime::UNIX_EPOCH,
                    )
                })
                .collect(),
            secrets: Vec::new(),
            retired_secrets: Vec::new(),
            version: 0,
            change: 0,
        }
    }

    fn found(ring: &Ring, given: &str) -> Result<String, String> {
        ring.by_fingerprint(given)
            .map(|k| k.fingerprint.clone())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_fingerprint_may_be_shortened_to_eight_hex_digits_that_name_one_key() {
        let a = "5b0c17a2".to_owned() + &"1".repeat(56);
        let b = "5b0c17a3".to_owned() + &"2".repeat(56);
        let c = "5b0c17a3".to_owned() + &"3".repeat(56);
        let ring = ring(&[&a, &b, &c]);
        assert_eq!(found(&ring, &a), Ok(a.clone()));
        assert_eq!(found(&ring, "5b0c17a2"), Ok(a.clone()));
        // As ListKeys or the README shows it: upper case, a trailing ellipsis.
        assert_eq!(found(&ring, "5B0C17A2…"), Ok(a.clone()));
        assert_eq!(found(&ring, "5b0c17a32"), Ok(b));
        let shared = found(&ring, "5b0c17a3").unwrap_err();
        assert!(shared.contains("more than one key"), "{shared}");
        let short = found(&ring, "5b0c").unwrap_err();
        assert!(short.contains("at least its first 8 hex digits"), "{short}");
        let none = found(&ring, "ffffffff").unwrap_err();
        assert!(none.contains("no key has a fingerprint beginning ffffffff"), "{none}");
    }
}
