//! Sealing what goes to Redis: AES-256-GCM under a key derived from the
//! KEK, the entry's name as associated data; names are keyed hashes
//! (HMAC-SHA256 under another derived key).

use aws_lc_rs::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    hmac,
};

use crate::keys::store::Kek;

/// The two keys derived from the KEK.
pub(super) struct Crypto {
    seal: LessSafeKey,
    names: hmac::Key,
}

impl Crypto {
    pub(super) fn new(kek: &Kek) -> Self {
        let seal = kek.derive("box-token-broker redis values v1");
        let names = kek.derive("box-token-broker redis names v1");
        Self {
            // A 32-byte key is what AES-256-GCM takes: this cannot fail.
            seal: LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, seal.as_ref()).unwrap_or_else(|_| unreachable!("a 32-byte AES key")),
            ),
            names: hmac::Key::new(hmac::HMAC_SHA256, names.as_ref()),
        }
    }

    /// A keyed hash of `data` for `purpose` (128 bits, hex).
    pub(super) fn name(&self, purpose: &str, data: &[u8]) -> String {
        let mut context = hmac::Context::with_key(&self.names);
        context.update(purpose.as_bytes());
        context.update(&[0]);
        context.update(data);
        hex::encode(&context.sign().as_ref()[..16])
    }

    /// `nonce || ciphertext || tag` of `plain`, bound to `name`.
    pub(super) fn seal(&self, name: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        let _ = aws_lc_rs::rand::fill(&mut nonce);
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let mut body = out.split_off(NONCE_LEN);
        if self
            .seal
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut body,
            )
            .is_err()
        {
            return Vec::new();
        }
        out.extend_from_slice(&body);
        zeroize::Zeroize::zeroize(&mut body);
        out
    }

    /// The plaintext of a value sealed under `name`, if it opens.
    pub(super) fn open(&self, name: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + 16 {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .seal
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut body)
            .ok()?
            .to_vec();
        zeroize::Zeroize::zeroize(&mut body);
        Some(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crypto() -> Crypto {
        Crypto::new(&Kek::generate().unwrap_or_else(|e| panic!("{e}")).0)
    }

    #[test]
    fn a_value_opens_only_under_its_own_name_and_key() {
        let c = crypto();
        let sealed = c.seal("ns:t:aa", b"the token");
        assert_eq!(c.open("ns:t:aa", &sealed).as_deref(), Some(&b"the token"[..]));
        assert_eq!(c.open("ns:t:bb", &sealed), None, "replayed under another name");
        assert_eq!(crypto().open("ns:t:aa", &sealed), None, "another KEK");
        let mut flipped = sealed.clone();
        flipped[NONCE_LEN + 1] ^= 1;
        assert_eq!(c.open("ns:t:aa", &flipped), None, "tampered");
        assert!(!sealed.windows(9).any(|w| w == b"the token"), "never in plaintext");
    }

    #[test]
    fn names_are_keyed_hashes() {
        let (a, b) = (crypto(), crypto());
        assert_eq!(
            a.name("token", b"default\nuser\n7000123"),
            a.name("token", b"default\nuser\n7000123")
        );
        assert_ne!(
            a.name("token", b"default\nuser\n7000123"),
            b.name("token", b"default\nuser\n7000123")
        );
        assert_ne!(a.name("token", b"x"), a.name("caller", b"x"));
        assert!(!a.name("token", b"default\nuser\n7000123").contains("7000123"));
    }
}
