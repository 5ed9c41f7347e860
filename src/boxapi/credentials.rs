//! A Box app's server-auth credentials: client id and secret, enterprise id,
//! and for JWT apps the signing key and its `kid`.
//!
//! They load from the JSON file the Box developer console downloads
//! (box-contract.md §3), from separate files as Kubernetes Secret mounts
//! provide them, or from both (a separate file overrides the JSON's value).
//! Every secret is a `secrecy` type; every type here prints `****` in `Debug`.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use jsonwebtoken::{Algorithm, EncodingKey};
use rsa::{RsaPrivateKey, pkcs1::EncodeRsaPrivateKey as _, pkcs8::EncodePublicKey as _, traits::PublicKeyParts as _};
use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest as _, Sha256};

use super::private_key::{KeyError, decode_private_key};

/// A numeric Box id (enterprise or user), validated on construction. Held
/// inline (no allocation): a million cached user tokens are keyed by these,
/// and every request parses one. The ASCII digits are padded with NUL
/// bytes, which sort before any digit, so the derived ordering is the
/// string's.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BoxId {
    digits: [u8; Self::MAX_DIGITS],
    len: u8,
}

impl BoxId {
    /// Longest id accepted; Box ids are 64-bit integers (at most 20 digits).
    pub const MAX_DIGITS: usize = 20;

    /// Parses a numeric id: 1 to 20 ASCII digits.
    pub fn parse(s: &str) -> Result<Self, BoxIdError> {
        if s.is_empty() {
            return Err(BoxIdError::Empty);
        }
        if s.len() > Self::MAX_DIGITS || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BoxIdError::NotNumeric);
        }
        let mut digits = [0u8; Self::MAX_DIGITS];
        digits[..s.len()].copy_from_slice(s.as_bytes());
        Ok(Self {
            digits,
            // At most 20, checked above.
            len: u8::try_from(s.len()).unwrap_or(0),
        })
    }

    /// The id as Box spells it.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits are ever stored, so this never falls back.
        std::str::from_utf8(&self.digits[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl fmt::Debug for BoxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for BoxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a Box id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BoxIdError {
    /// Empty string.
    #[error("is empty")]
    Empty,
    /// Not 1 to 20 ASCII digits.
    #[error("is not a numeric Box id")]
    NotNumeric,
}

/// The JWS algorithms Box accepts for the assertion (box-contract.md §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
pub enum JwtAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256: what every official SDK sends.
    #[default]
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512: what Box's own doc samples send.
    RS512,
}

impl From<JwtAlgorithm> for Algorithm {
    fn from(a: JwtAlgorithm) -> Self {
        match a {
            JwtAlgorithm::RS256 => Self::RS256,
            JwtAlgorithm::RS384 => Self::RS384,
            JwtAlgorithm::RS512 => Self::RS512,
        }
    }
}

/// A private signing key with the `kid` Box assigned to its public half.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    bits: usize,
    fingerprint: String,
}

impl SigningKey {
    /// Wraps a decoded RSA key.
    pub fn new(kid: impl Into<String>, key: &RsaPrivateKey) -> Result<Self, KeyError> {
        let der = key
            .to_pkcs1_der()
            .map_err(|e| KeyError::Malformed(format!("cannot re-encode the key: {e}")))?;
        let encoding = EncodingKey::from_rsa_der(der.as_bytes());
        let spki = key
            .to_public_key()
            .to_public_key_der()
            .map_err(|e| KeyError::Malformed(format!("cannot encode the public key: {e}")))?;
        Ok(Self {
            kid: kid.into(),
            encoding,
            bits: key.size() * 8,
            fingerprint: hex::encode(Sha256::digest(spki.as_bytes())),
        })
    }

    /// The public key id (`kid`) Box assigned.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The modulus size in bits.
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// Lowercase hex SHA-256 of the public key's SubjectPublicKeyInfo DER.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub(crate) fn encoding_key(&self) -> &EncodingKey {
        &self.encoding
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("bits", &self.bits)
            .field("fingerprint", &self.fingerprint)
            .field("private_key", &"****")
            .finish()
    }
}

/// How the app proves itself to Box.
#[derive(Clone)]
pub enum AuthMethod {
    /// JWT assertion grant, signed with the app's key.
    Jwt {
        /// The signing key.
        key: SigningKey,
        /// The assertion's signature algorithm.
        algorithm: JwtAlgorithm,
    },
    /// Client Credentials Grant: client id and secret only.
    Ccg,
}

impl fmt::Debug for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Jwt { key, algorithm } => f
                .debug_struct("Jwt")
                .field("key", key)
                .field("algorithm", algorithm)
                .finish(),
            Self::Ccg => f.write_str("Ccg"),
        }
    }
}

/// Everything needed to mint tokens for one Box app.
#[derive(Clone)]
pub struct AppCredentials {
    /// The app's client id (also the assertion's `iss`). Not a secret.
    pub client_id: String,
    /// The app's client secret.
    pub client_secret: SecretString,
    /// The enterprise the app is authorized in.
    pub enterprise_id: BoxId,
    /// JWT or CCG.
    pub auth: AuthMethod,
}

impl fmt::Debug for AppCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppCredentials")
            .field("client_id", &self.client_id)
            .field("client_secret", &"****")
            .field("enterprise_id", &self.enterprise_id)
            .field("auth", &self.auth)
            .finish()
    }
}

/// Where each piece of an app's credentials comes from. Any piece given as a
/// separate file (or inline, for the non-secret ids) overrides the JSON's.
#[derive(Debug, Clone, Default)]
pub struct CredentialSources {
    /// The Box developer console's JSON download.
    pub box_config_file: Option<PathBuf>,
    /// Client id (not secret).
    pub client_id: Option<String>,
    /// File holding the client secret.
    pub client_secret_file: Option<PathBuf>,
    /// Enterprise id (not secret).
    pub enterprise_id: Option<String>,
    /// The `kid` Box assigned to the public key (not secret).
    pub public_key_id: Option<String>,
    /// PEM private key file.
    pub private_key_file: Option<PathBuf>,
    /// File holding the private key's passphrase.
    pub private_key_passphrase_file: Option<PathBuf>,
    /// Assertion algorithm.
    pub algorithm: JwtAlgorithm,
}

/// Why credentials could not be loaded. Every message names the file (or
/// config key) and the problem, on one line, and holds no secret.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// A file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The JSON is not JSON (the message holds only the position).
    #[error("{}: not valid JSON: {problem}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The syntax problem and its line and column.
        problem: String,
    },
    /// A required piece is missing or has the wrong type.
    #[error("{where_}: {problem}")]
    Invalid {
        /// The file or config key.
        where_: String,
        /// What is wrong.
        problem: String,
    },
    /// The private key could not be read.
    #[error("{where_}: {source}")]
    Key {
        /// The file holding the key.
        where_: String,
        /// Why.
        source: KeyError,
    },
}

/// The fields of the Box developer console's config JSON that the broker reads.
#[derive(Default)]
struct BoxConfigJson {
    client_id: Option<String>,
    client_secret: Option<SecretString>,
    public_key_id: Option<String>,
    private_key: Option<SecretString>,
    passphrase: Option<SecretString>,
    enterprise_id: Option<String>,
}

impl BoxConfigJson {
    /// Parses the console download. Values are taken out by hand rather than
    /// by serde's derive so that no error message can quote a secret value.
    fn parse(text: &str, path: &Path) -> Result<Self, CredentialError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| CredentialError::Json {
            path: path.to_owned(),
            problem: format!("{:?} error at line {} column {}", e.classify(), e.line(), e.column()),
        })?;
        let invalid = |problem: String| CredentialError::Invalid {
            where_: path.display().to_string(),
            problem,
        };
        let settings = value.get("boxAppSettings").ok_or_else(|| {
            invalid("missing \"boxAppSettings\" (is this the JSON the Box developer console downloads?)".into())
        })?;
        let string = |v: Option<&serde_json::Value>, name: &str| -> Result<Option<String>, CredentialError> {
            match v {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) if s.is_empty() => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                // Box writes enterpriseID as a string; accept a number too.
                Some(serde_json::Value::Number(n)) if name == "enterpriseID" => Ok(Some(n.to_string())),
                Some(_) => Err(invalid(format!("\"{name}\" must be a string"))),
            }
        };
        let app_auth = settings.get("appAuth");
        Ok(Self {
            client_id: string(settings.get("clientID"), "boxAppSettings.clientID")?,
            client_secret: string(settings.get("clientSecret"), "boxAppSettings.clientSecret")?.map(SecretString::from),
            public_key_id: string(
                app_auth.and_then(|a| a.get("publicKeyID")),
                "boxAppSettings.appAuth.publicKeyID",
            )?,
            private_key: string(
                app_auth.and_then(|a| a.get("privateKey")),
                "boxAppSettings.appAuth.privateKey",
            )?
            .map(SecretString::from),
            passphrase: string(
                app_auth.and_then(|a| a.get("passphrase")),
                "boxAppSettings.appAuth.passphrase",
            )?
            .map(SecretString::from),
            enterprise_id: string(value.get("enterpriseID"), "enterpriseID")?,
        })
    }
}

impl CredentialSources {
    /// Reads every file, decrypts the key and checks that the result is
    /// complete. `name` is the app's name in the config, for messages.
    pub fn load(&self, name: &str) -> Result<AppCredentials, CredentialError> {
        let json = match &self.box_config_file {
            Some(path) => BoxConfigJson::parse(read_secret_file(path)?.expose_secret(), path)?,
            None => BoxConfigJson::default(),
        };
        self.assemble(name, json)
    }

    /// Like [`CredentialSources::load`], with the console JSON given as text
    /// (`label` names it in messages) instead of read from `box_config_file`.
    pub fn load_json_text(
        &self,
        name: &str,
        json: &SecretString,
        label: &Path,
    ) -> Result<AppCredentials, CredentialError> {
        let json = BoxConfigJson::parse(json.expose_secret(), label)?;
        let mut sources = self.clone();
        sources.box_config_file = Some(label.to_owned());
        sources.assemble(name, json)
    }

    fn assemble(&self, name: &str, json: BoxConfigJson) -> Result<AppCredentials, CredentialError> {
        let json_name = self
            .box_config_file
            .as_ref()
            .map_or_else(|| format!("apps.{name}"), |p| p.display().to_string());
        let missing = |what: &str, file_key: &str| CredentialError::Invalid {
            where_: json_name.clone(),
            problem: format!("no {what}: set it in the Box config JSON or give apps.{name}.{file_key}"),
        };

        let client_id = self
            .client_id
            .clone()
            .or(json.client_id)
            .ok_or_else(|| missing("client id (boxAppSettings.clientID)", "client_id"))?;
        let client_secret = match &self.client_secret_file {
            Some(path) => non_empty_secret(path)?,
            None => json
                .client_secret
                .ok_or_else(|| missing("client secret (boxAppSettings.clientSecret)", "client_secret_file"))?,
        };
        let enterprise_id_text = self
            .enterprise_id
            .clone()
            .or(json.enterprise_id)
            .ok_or_else(|| missing("enterprise id (enterpriseID)", "enterprise_id"))?;
        let enterprise_id = BoxId::parse(&enterprise_id_text).map_err(|e| CredentialError::Invalid {
            where_: json_name.clone(),
            problem: format!("enterprise id {e}"),
        })?;

        let (key_pem, key_where) = match &self.private_key_file {
            Some(path) => (Some(read_secret_file(path)?), path.display().to_string()),
            None => (
                json.private_key,
                format!("{json_name} (boxAppSettings.appAuth.privateKey)"),
            ),
        };
        let auth = match key_pem {
            None => AuthMethod::Ccg,
            Some(pem) => {
                let passphrase = match &self.private_key_passphrase_file {
                    Some(path) => Some(read_secret_file(path).map(trim_secret)?),
                    None => json.passphrase,
                };
                let key = decode_private_key(pem.expose_secret(), passphrase.as_ref()).map_err(|source| {
                    CredentialError::Key {
                        where_: key_where.clone(),
                        source,
                    }
                })?;
                let kid =
                    self.public_key_id.clone().or(json.public_key_id).ok_or_else(|| {
                        missing("public key id (boxAppSettings.appAuth.publicKeyID)", "public_key_id")
                    })?;
                let key = SigningKey::new(kid, &key).map_err(|source| CredentialError::Key {
                    where_: key_where,
                    source,
                })?;
                AuthMethod::Jwt {
                    key,
                    algorithm: self.algorithm,
                }
            }
        };
        Ok(AppCredentials {
            client_id,
            client_secret,
            enterprise_id,
            auth,
        })
    }
}

/// Reads a whole file as a secret. Kubernetes Secret mounts are files.
pub fn read_secret_file(path: &Path) -> Result<SecretString, CredentialError> {
    let bytes = std::fs::read(path).map_err(|source| CredentialError::Read {
        path: path.to_owned(),
        source,
    })?;
    String::from_utf8(bytes)
        .map(SecretString::from)
        .map_err(|_| CredentialError::Invalid {
            where_: path.display().to_string(),
            problem: "not UTF-8 text".to_owned(),
        })
}

/// Reads a one-value secret file (client secret), trimming the trailing
/// newline editors and `echo` add.
fn non_empty_secret(path: &Path) -> Result<SecretString, CredentialError> {
    let secret = trim_secret(read_secret_file(path)?);
    if secret.expose_secret().is_empty() {
        return Err(CredentialError::Invalid {
            where_: path.display().to_string(),
            problem: "the file is empty".to_owned(),
        });
    }
    Ok(secret)
}

fn trim_secret(s: SecretString) -> SecretString {
    let trimmed = s.expose_secret().trim_end_matches(['\r', '\n']);
    if trimmed.len() == s.expose_secret().len() {
        s
    } else {
        SecretString::from(trimmed.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_ids_must_be_numeric() {
        assert!(BoxId::parse("1234").is_ok());
        assert_eq!(BoxId::parse("").err(), Some(BoxIdError::Empty));
        assert_eq!(BoxId::parse("12a").err(), Some(BoxIdError::NotNumeric));
        assert_eq!(BoxId::parse("-1").err(), Some(BoxIdError::NotNumeric));
        assert_eq!(BoxId::parse(&"1".repeat(21)).err(), Some(BoxIdError::NotNumeric));
    }

    #[test]
    fn json_syntax_errors_quote_no_content() {
        let text = r#"{"boxAppSettings": {"clientSecret": "s3cr3t-value" oops}}"#;
        let err = BoxConfigJson::parse(text, Path::new("/x/config.json"))
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.starts_with("/x/config.json: not valid JSON"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
    }

    #[test]
    fn wrong_type_errors_quote_no_content() {
        let text = r#"{"boxAppSettings": {"clientSecret": ["s3cr3t-value"]}, "enterpriseID": "1"}"#;
        let err = BoxConfigJson::parse(text, Path::new("c.json"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("clientSecret\" must be a string"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
    }
}
