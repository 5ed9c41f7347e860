//! The private-key decoder: every PEM/DER form a Box user may hold
//! (box-contract.md §3), encrypted ones tried with the fixtures' passphrase
//! so the seeds reach the decryption and ASN.1 paths.
#![no_main]

use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;

const PASSPHRASE: &str = include_str!("../../tests/fixtures/keys/passphrase");

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let passphrase = SecretString::from(PASSPHRASE.trim().to_owned());
        let _ = box_token_broker::boxapi::private_key::decode_private_key(text, Some(&passphrase));
        let _ = box_token_broker::boxapi::private_key::decode_private_key(text, None);
    }
});
