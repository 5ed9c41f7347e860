//! Fingerprints of secrets: SHA-256, enough to correlate (audit records,
//! the revocation index, the Kubernetes token cache) and useless to replay.
//!
//! A leaf: it depends on nothing in the crate, so every layer may use it.

use sha2::{Digest as _, Sha256};

/// SHA-256 of a token (or any other secret string).
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Lowercase hex SHA-256 of a token, as audit records' `token_sha256` shows it.
pub fn fingerprint(token: &str) -> String {
    hex::encode(digest(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_is_the_hex_sha256_of_the_token() {
        // echo -n abc | sha256sum
        assert_eq!(
            fingerprint("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hex::encode(digest("abc")), fingerprint("abc"));
    }
}
