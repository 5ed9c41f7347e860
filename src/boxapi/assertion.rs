//! The JWT assertion Box's `jwt-bearer` grant takes (box-contract.md §2.2–2.3).

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use jsonwebtoken::Header;
use rand::RngCore as _;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::{
    BoxSubject,
    credentials::{JwtAlgorithm, SigningKey},
};
use crate::clock::unix_seconds;

/// The assertion's `aud`: always this constant, whatever host the token
/// request is sent to (a proxy or the fake Box).
pub const BOX_TOKEN_AUDIENCE: &str = "https://api.box.com/oauth2/token";

/// How far ahead of "now" the assertion expires. Box rejects more than 60 s;
/// every official SDK uses 30 s, which leaves room for modest clock drift.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(30);

/// Random bytes in a `jti`; base64url gives 43 characters, inside Box's 16–128.
const JTI_BYTES: usize = 32;

/// The claims of a Box JWT assertion.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The app's client id.
    pub iss: String,
    /// Enterprise id or user id.
    pub sub: String,
    /// `enterprise` or `user`.
    pub box_sub_type: String,
    /// [`BOX_TOKEN_AUDIENCE`].
    pub aud: String,
    /// A fresh random id, unique per assertion.
    pub jti: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issue time, Unix seconds (optional for Box; sent as the TS SDK does).
    pub iat: i64,
}

impl Claims {
    /// Claims for `subject`, issued at `now`, with a fresh `jti`.
    pub fn new(client_id: &str, subject: &BoxSubject, now: SystemTime) -> Self {
        let iat = unix_seconds(now);
        Self {
            iss: client_id.to_owned(),
            sub: subject.id().as_str().to_owned(),
            box_sub_type: subject.sub_type().to_owned(),
            aud: BOX_TOKEN_AUDIENCE.to_owned(),
            jti: new_jti(),
            exp: iat + i64::try_from(ASSERTION_LIFETIME.as_secs()).unwrap_or(30),
            iat,
        }
    }
}

/// A signed assertion. It can be exchanged for a token until it expires, so
/// it is a secret.
pub struct SignedAssertion(pub SecretString);

impl fmt::Debug for SignedAssertion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SignedAssertion(****)")
    }
}

/// Signing failed (a broken key; never expected with a validated key).
#[derive(Debug, thiserror::Error)]
#[error("signing the JWT assertion failed: {0}")]
pub struct SigningError(String);

/// Signs `claims` with `key`, putting the key's `kid` in the header.
pub fn sign(claims: &Claims, key: &SigningKey, algorithm: JwtAlgorithm) -> Result<SignedAssertion, SigningError> {
    let mut header = Header::new(algorithm.into());
    header.kid = Some(key.kid().to_owned());
    header.typ = Some("JWT".to_owned());
    jsonwebtoken::encode(&header, claims, key.encoding_key())
        .map(|jwt| SignedAssertion(SecretString::from(jwt)))
        .map_err(|e| SigningError(e.to_string()))
}

/// A fresh random `jti`: 32 bytes from the OS RNG, base64url (43 characters).
pub fn new_jti() -> String {
    let mut bytes = [0u8; JTI_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxapi::BoxId;

    #[test]
    fn jti_is_fresh_and_within_box_limits() {
        let a = new_jti();
        let b = new_jti();
        assert_ne!(a, b);
        assert!((16..=128).contains(&a.len()), "{}", a.len());
    }

    #[test]
    fn claims_follow_the_box_contract() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let subject = BoxSubject::User(BoxId::parse("42").unwrap_or_else(|_| unreachable!()));
        let c = Claims::new("client", &subject, now);
        assert_eq!(c.aud, "https://api.box.com/oauth2/token");
        assert_eq!(c.sub, "42");
        assert_eq!(c.box_sub_type, "user");
        assert_eq!(c.exp - c.iat, 30);
        assert_eq!(c.iat, 1_700_000_000);
    }
}
