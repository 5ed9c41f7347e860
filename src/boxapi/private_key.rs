//! Decoding every RSA private-key form a Box user may hold (box-contract.md §3).
//!
//! | PEM label | what | how |
//! |---|---|---|
//! | `ENCRYPTED PRIVATE KEY` | PKCS#8 + PBES2 — the Box console's PBKDF2-HMAC-SHA1 / DES-EDE3-CBC, OpenSSL's PBKDF2-HMAC-SHA256 / AES-CBC, scrypt | `pkcs8` |
//! | `RSA PRIVATE KEY` with `Proc-Type: 4,ENCRYPTED` | traditional OpenSSL PEM (`openssl genrsa -des3`) | EVP_BytesToKey (MD5) + CBC, here |
//! | `PRIVATE KEY` | unencrypted PKCS#8 | `pkcs8` |
//! | `RSA PRIVATE KEY` | unencrypted PKCS#1 | `pkcs1` |
//!
//! Errors name the problem and never include key material or the passphrase.

use aes::cipher::{BlockDecryptMut, KeyIvInit, block_padding::Pkcs7};
use base64::Engine as _;
use md5::{Digest as _, Md5};
use pkcs1::DecodeRsaPrivateKey as _;
use pkcs8::{DecodePrivateKey as _, EncryptedPrivateKeyInfo};
use rsa::{RsaPrivateKey, traits::PublicKeyParts as _};
use secrecy::{ExposeSecret as _, SecretString};
use zeroize::Zeroizing;

/// Smallest RSA modulus Box accepts for a JWT app key, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus the broker accepts, in bits (Box's console makes 2048;
/// 4096 is the largest anyone uploads in practice).
pub const MAX_RSA_BITS: usize = 4096;

/// Why a private key could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// No PEM block at all.
    #[error("no PEM private key found (expected a -----BEGIN ENCRYPTED PRIVATE KEY----- block)")]
    NotPem,
    /// The key is encrypted and no passphrase was given.
    #[error("the private key is encrypted but no passphrase was given")]
    PassphraseRequired,
    /// Decryption failed: almost always a wrong passphrase.
    #[error("wrong passphrase for the encrypted private key (or the key is corrupt)")]
    WrongPassphrase,
    /// A form or cipher this broker does not read.
    #[error("unsupported private key format: {0}")]
    Unsupported(String),
    /// Not an RSA key.
    #[error("the private key is not an RSA key; Box JWT apps use RSA")]
    NotRsa,
    /// RSA, but too small or too large.
    #[error("the RSA key is {0} bits; Box JWT keys must be {MIN_RSA_BITS} to {MAX_RSA_BITS} bits")]
    Size(usize),
    /// The PEM or DER is damaged.
    #[error("the private key is malformed: {0}")]
    Malformed(String),
}

/// Decodes a PEM private key, decrypting it with `passphrase` when it is encrypted.
pub fn decode_private_key(pem: &str, passphrase: Option<&SecretString>) -> Result<RsaPrivateKey, KeyError> {
    let block = PemBlock::find(pem)?;
    let key = match block.label {
        "ENCRYPTED PRIVATE KEY" => {
            let passphrase = passphrase.ok_or(KeyError::PassphraseRequired)?;
            decode_encrypted_pkcs8(&block.der()?, passphrase)?
        }
        "PRIVATE KEY" => RsaPrivateKey::from_pkcs8_der(&block.der()?).map_err(pkcs8_error)?,
        "RSA PRIVATE KEY" => match block.header("Proc-Type") {
            Some(proc_type) if proc_type.contains("ENCRYPTED") => {
                let passphrase = passphrase.ok_or(KeyError::PassphraseRequired)?;
                let der = decrypt_traditional(&block, passphrase)?;
                // A wrong passphrase occasionally yields valid padding; the
                // DER then fails to parse.
                RsaPrivateKey::from_pkcs1_der(&der).map_err(|_| KeyError::WrongPassphrase)?
            }
            _ => {
                RsaPrivateKey::from_pkcs1_der(&block.der()?).map_err(|e| KeyError::Malformed(format!("PKCS#1: {e}")))?
            }
        },
        "EC PRIVATE KEY" | "OPENSSH PRIVATE KEY" | "DSA PRIVATE KEY" => {
            return Err(KeyError::NotRsa);
        }
        other => {
            return Err(KeyError::Unsupported(format!("PEM label \"{}\"", truncate(other, 40))));
        }
    };
    let bits = key.size() * 8;
    if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
        return Err(KeyError::Size(bits));
    }
    key.validate()
        .map_err(|e| KeyError::Malformed(format!("RSA key is inconsistent: {e}")))?;
    Ok(key)
}

/// How [`encrypt_private_key`] protects a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyEncryption {
    /// Exactly what the Box developer console produces: PBES2 with
    /// PBKDF2-HMAC-SHA1 (2048 iterations) and DES-EDE3-CBC (box-contract.md §3).
    BoxConsole,
    /// PBES2 with PBKDF2-HMAC-SHA256 (600,000 iterations) and AES-256-CBC:
    /// for keys this broker generates.
    Modern,
}

/// Encrypts `key` as an `ENCRYPTED PRIVATE KEY` PEM under `passphrase`.
pub fn encrypt_private_key(
    key: &RsaPrivateKey,
    passphrase: &SecretString,
    scheme: KeyEncryption,
) -> Result<SecretString, KeyError> {
    use pkcs8::{EncodePrivateKey as _, LineEnding, PrivateKeyInfo, pkcs5::pbes2};
    use rand::RngCore as _;

    let der = key
        .to_pkcs8_der()
        .map_err(|e| KeyError::Malformed(format!("cannot encode the key: {e}")))?;
    let info = PrivateKeyInfo::try_from(der.as_bytes()).map_err(|e| KeyError::Malformed(format!("PKCS#8: {e}")))?;
    let mut salt = [0u8; 16];
    let mut iv = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    rand::rngs::OsRng.fill_bytes(&mut iv);
    let mut iv8 = [0u8; 8];
    iv8.copy_from_slice(&iv[..8]);
    let params = match scheme {
        KeyEncryption::BoxConsole => pbes2::Parameters {
            kdf: pbes2::Pbkdf2Params {
                salt: &salt[..8],
                iteration_count: 2048,
                key_length: None,
                prf: pbes2::Pbkdf2Prf::HmacWithSha1,
            }
            .into(),
            encryption: pbes2::EncryptionScheme::DesEde3Cbc { iv: &iv8 },
        },
        KeyEncryption::Modern => pbes2::Parameters::pbkdf2_sha256_aes256cbc(600_000, &salt, &iv)
            .map_err(|e| KeyError::Malformed(format!("encryption parameters: {e}")))?,
    };
    let encrypted = info
        .encrypt_with_params(params, passphrase.expose_secret().as_bytes())
        .map_err(|e| KeyError::Malformed(format!("encryption failed: {e}")))?;
    encrypted
        .to_pem("ENCRYPTED PRIVATE KEY", LineEnding::LF)
        .map(|pem| SecretString::from(pem.to_string()))
        .map_err(|e| KeyError::Malformed(format!("PEM encoding failed: {e}")))
}

/// The most PBKDF2 iterations decrypted: OWASP's 2023 advice is 600,000
/// (HMAC-SHA256) to 1,300,000 (HMAC-SHA1); OpenSSL and the Box console use
/// 2,048. A larger count is a denial of service, not a key.
pub const MAX_PBKDF2_ITERATIONS: u32 = 2_000_000;
/// The most scrypt work decrypted, as N·r·p: 32 times OpenSSL's default
/// (N = 2^14, r = 8, p = 1).
pub const MAX_SCRYPT_WORK: u64 = 1 << 22;
/// The most scrypt memory decrypted, 128·r·N bytes: 128 MiB (OpenSSL's
/// default takes 16 MiB).
pub const MAX_SCRYPT_MEMORY: u64 = 128 << 20;

/// Refuses key-derivation parameters beyond what real tools produce, before
/// spending the time and memory they ask for.
fn check_kdf_cost(scheme: &pkcs8::pkcs5::EncryptionScheme<'_>) -> Result<(), KeyError> {
    use pkcs8::pkcs5::{EncryptionScheme, pbes2::Kdf};
    let EncryptionScheme::Pbes2(params) = scheme else {
        return Ok(());
    };
    match &params.kdf {
        Kdf::Pbkdf2(p) if p.iteration_count > MAX_PBKDF2_ITERATIONS => Err(KeyError::Unsupported(format!(
            "PBKDF2 with {} iterations, more than the {MAX_PBKDF2_ITERATIONS} the broker decrypts (re-encrypt the key: openssl pkcs8 -topk8 -v2 aes-256-cbc -iter 600000)",
            p.iteration_count
        ))),
        Kdf::Scrypt(p) => {
            let (n, r, parallel) = (p.cost_parameter, u64::from(p.block_size), u64::from(p.parallelization));
            let work = n.saturating_mul(r).saturating_mul(parallel);
            let memory = n.saturating_mul(r).saturating_mul(128);
            if work > MAX_SCRYPT_WORK || memory > MAX_SCRYPT_MEMORY {
                return Err(KeyError::Unsupported(format!(
                    "scrypt with N={n}, r={r}, p={parallel}, more than the broker decrypts (N·r·p at most {MAX_SCRYPT_WORK}, 128·r·N at most 128 MiB; openssl's defaults are N=16384, r=8, p=1)"
                )));
            }
            Ok(())
        }
        // PBKDF2 within the cap; any other KDF fails to decrypt with "unsupported".
        _ => Ok(()),
    }
}

fn decode_encrypted_pkcs8(der: &[u8], passphrase: &SecretString) -> Result<RsaPrivateKey, KeyError> {
    let info =
        EncryptedPrivateKeyInfo::try_from(der).map_err(|e| KeyError::Malformed(format!("encrypted PKCS#8: {e}")))?;
    check_kdf_cost(&info.encryption_algorithm)?;
    let document = info
        .decrypt(passphrase.expose_secret().as_bytes())
        .map_err(|e| match e {
            pkcs8::Error::EncryptedPrivateKey(pkcs8::pkcs5::Error::DecryptFailed) => KeyError::WrongPassphrase,
            pkcs8::Error::EncryptedPrivateKey(
                pkcs8::pkcs5::Error::UnsupportedAlgorithm { oid }
                | pkcs8::pkcs5::Error::AlgorithmParametersInvalid { oid },
            ) => KeyError::Unsupported(format!("encryption algorithm {oid}")),
            pkcs8::Error::EncryptedPrivateKey(pkcs8::pkcs5::Error::NoPbes1CryptSupport) => {
                KeyError::Unsupported("PBES1 encryption (re-encrypt the key with PBES2)".to_owned())
            }
            // A wrong passphrase can decrypt to garbage with valid padding.
            _ => KeyError::WrongPassphrase,
        })?;
    RsaPrivateKey::from_pkcs8_der(document.as_bytes()).map_err(|e| match e {
        pkcs8::Error::KeyMalformed | pkcs8::Error::Asn1(_) => KeyError::WrongPassphrase,
        other => pkcs8_error(other),
    })
}

fn pkcs8_error(e: pkcs8::Error) -> KeyError {
    match e {
        // The algorithm identifier is not rsaEncryption: EC, Ed25519, ...
        pkcs8::Error::PublicKey(_) => KeyError::NotRsa,
        pkcs8::Error::KeyMalformed => KeyError::Malformed("PKCS#8 key data".to_owned()),
        other => KeyError::Malformed(format!("PKCS#8: {other}")),
    }
}

/// The CBC ciphers OpenSSL's traditional PEM encryption uses (`DEK-Info`).
#[derive(Debug, Clone, Copy)]
#[allow(
    clippy::enum_variant_names,
    reason = "the names are OpenSSL's: DES-EDE3-CBC, AES-128-CBC, ..."
)]
enum LegacyCipher {
    DesEde3Cbc,
    Aes128Cbc,
    Aes192Cbc,
    Aes256Cbc,
}

impl LegacyCipher {
    fn parse(name: &str) -> Result<Self, KeyError> {
        match name.trim().to_ascii_uppercase().as_str() {
            "DES-EDE3-CBC" => Ok(Self::DesEde3Cbc),
            "AES-128-CBC" => Ok(Self::Aes128Cbc),
            "AES-192-CBC" => Ok(Self::Aes192Cbc),
            "AES-256-CBC" => Ok(Self::Aes256Cbc),
            other => Err(KeyError::Unsupported(format!(
                "traditional PEM cipher {} (re-encrypt with `openssl pkcs8 -topk8 -v2 aes-256-cbc`)",
                truncate(other, 32)
            ))),
        }
    }

    fn key_len(self) -> usize {
        match self {
            Self::Aes128Cbc => 16,
            Self::DesEde3Cbc | Self::Aes192Cbc => 24,
            Self::Aes256Cbc => 32,
        }
    }

    fn iv_len(self) -> usize {
        match self {
            Self::DesEde3Cbc => 8,
            _ => 16,
        }
    }
}

/// Decrypts a `Proc-Type: 4,ENCRYPTED` PEM body to PKCS#1 DER.
fn decrypt_traditional(block: &PemBlock<'_>, passphrase: &SecretString) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let dek = block
        .header("DEK-Info")
        .ok_or_else(|| KeyError::Malformed("encrypted PEM without a DEK-Info header".to_owned()))?;
    let (cipher, iv_hex) = dek
        .split_once(',')
        .ok_or_else(|| KeyError::Malformed("DEK-Info is not `CIPHER,IV`".to_owned()))?;
    let cipher = LegacyCipher::parse(cipher)?;
    let iv = hex::decode(iv_hex.trim()).map_err(|_| KeyError::Malformed("DEK-Info IV is not hex".to_owned()))?;
    if iv.len() != cipher.iv_len() {
        return Err(KeyError::Malformed("DEK-Info IV has the wrong length".to_owned()));
    }
    let key = evp_bytes_to_key(passphrase.expose_secret().as_bytes(), &iv[..8], cipher.key_len());
    let body = block.der()?;
    let decrypted = match cipher {
        LegacyCipher::DesEde3Cbc => cbc_decrypt::<des::TdesEde3>(&key, &iv, &body),
        LegacyCipher::Aes128Cbc => cbc_decrypt::<aes::Aes128>(&key, &iv, &body),
        LegacyCipher::Aes192Cbc => cbc_decrypt::<aes::Aes192>(&key, &iv, &body),
        LegacyCipher::Aes256Cbc => cbc_decrypt::<aes::Aes256>(&key, &iv, &body),
    };
    decrypted.map(Zeroizing::new)
}

/// CBC-decrypts `body` with PKCS#7 padding; a padding error means a wrong passphrase.
fn cbc_decrypt<C>(key: &[u8], iv: &[u8], body: &[u8]) -> Result<Vec<u8>, KeyError>
where
    C: aes::cipher::BlockCipher + aes::cipher::BlockDecrypt + aes::cipher::KeyInit,
{
    cbc::Decryptor::<C>::new_from_slices(key, iv)
        .map_err(|_| KeyError::Malformed("bad key or IV length".to_owned()))?
        .decrypt_padded_vec_mut::<Pkcs7>(body)
        .map_err(|_| KeyError::WrongPassphrase)
}

/// OpenSSL's `EVP_BytesToKey` with MD5 and one iteration, as traditional PEM uses it.
fn evp_bytes_to_key(passphrase: &[u8], salt: &[u8], len: usize) -> Zeroizing<Vec<u8>> {
    let mut key = Zeroizing::new(Vec::with_capacity(len + 16));
    let mut previous: Option<[u8; 16]> = None;
    while key.len() < len {
        let mut md5 = Md5::new();
        if let Some(previous) = previous {
            md5.update(previous);
        }
        md5.update(passphrase);
        md5.update(salt);
        let digest: [u8; 16] = md5.finalize().into();
        key.extend_from_slice(&digest);
        previous = Some(digest);
    }
    key.truncate(len);
    key
}

/// One PEM block, with RFC 1421 headers (which RFC 7468 parsers reject).
struct PemBlock<'a> {
    label: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    body: String,
}

impl<'a> PemBlock<'a> {
    fn find(text: &'a str) -> Result<Self, KeyError> {
        let mut lines = text.lines().map(str::trim);
        let label = lines
            .by_ref()
            .find_map(|l| l.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")))
            .ok_or(KeyError::NotPem)?;
        let end = format!("-----END {label}-----");
        let mut headers = Vec::new();
        let mut body = String::new();
        let mut ended = false;
        for line in lines {
            if line == end {
                ended = true;
                break;
            }
            match line.split_once(':') {
                Some((name, value)) if body.is_empty() => headers.push((name.trim(), value.trim())),
                _ => body.push_str(line),
            }
        }
        if !ended {
            return Err(KeyError::Malformed(format!("no -----END {label}----- line")));
        }
        Ok(Self { label, headers, body })
    }

    fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    fn der(&self) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        base64::engine::general_purpose::STANDARD
            .decode(self.body.as_bytes())
            .map(Zeroizing::new)
            .map_err(|_| KeyError::Malformed("the PEM body is not valid base64".to_owned()))
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evp_bytes_to_key_matches_openssl() {
        // Known answer from `openssl enc -aes-256-cbc -pass pass:password
        // -S 0102030405060708 -md md5 -P` (key, then the IV continues the stream).
        let key = evp_bytes_to_key(b"password", &[1, 2, 3, 4, 5, 6, 7, 8], 32);
        assert_eq!(
            hex::encode_upper(&*key),
            "E7B0971E52CA5CC8D0539FB3412F6316F7BA2E6EE293D9F3457B99436B51CE02"
        );
    }

    #[test]
    fn text_without_pem_is_rejected_clearly() {
        assert_eq!(decode_private_key("hello", None).err(), Some(KeyError::NotPem));
    }

    #[test]
    fn unterminated_pem_is_malformed() {
        let err = decode_private_key("-----BEGIN PRIVATE KEY-----\nAAAA\n", None).err();
        assert!(matches!(err, Some(KeyError::Malformed(_))));
    }
}
