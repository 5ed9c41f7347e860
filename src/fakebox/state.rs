//! The fake Box's world — apps, users, issued tokens, seen `jti`s, fault
//! knobs and call counts — and the rules of `/oauth2/token`, checked in the
//! order box-contract.md §10 gives, with Box's own error codes and messages.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    time::{Duration, SystemTime},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use rand::{Rng as _, distributions::Alphanumeric};
use rsa::{RsaPublicKey, traits::PublicKeyParts as _};
use serde::Serialize;

use crate::{boxapi::assertion::BOX_TOKEN_AUDIENCE, clock::unix_seconds};

/// How an app authenticates, as set in the developer console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeAuth {
    /// Server authentication with a key pair (JWT).
    Jwt,
    /// Client Credentials Grant.
    Ccg,
}

/// A Box app, as the developer console and Admin Console configure it.
#[derive(Debug, Clone)]
pub struct FakeApp {
    /// Client id.
    pub client_id: String,
    /// Client secret.
    pub client_secret: String,
    /// The enterprise it is installed in.
    pub enterprise_id: String,
    /// JWT or CCG.
    pub auth: FakeAuth,
    /// Registered public keys by `kid` (JWT apps).
    pub keys: BTreeMap<String, RsaPublicKey>,
    /// Authorized by an admin in the Admin Console.
    pub authorized: bool,
    /// "Generate user access tokens".
    pub user_tokens: bool,
    /// "App + Enterprise Access" (needed for Managed User tokens).
    pub enterprise_access: bool,
    /// The app's Service Account user id.
    pub service_account_id: String,
    /// The application scopes its tokens hold (the subset rule's upper bound).
    pub scopes: BTreeSet<String>,
}

/// A file or folder, with who can reach it.
#[derive(Debug, Clone)]
pub struct FakeItem {
    /// `file` or `folder`.
    pub kind: &'static str,
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The owning user.
    pub owner: String,
    /// Other users with access.
    pub collaborators: Vec<String>,
    /// A shared link URL, if it has one.
    pub shared_link: Option<String>,
}

/// What kind of Box user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserKind {
    /// An App User, which belongs to one app (by client id).
    AppUser {
        /// The owning app.
        client_id: String,
    },
    /// A Managed User of the enterprise.
    Managed,
    /// An external user (collaborator from another enterprise): never tokenizable.
    External,
}

/// A Box user.
#[derive(Debug, Clone)]
pub struct FakeUser {
    /// User id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Login (email).
    pub login: String,
    /// The enterprise the user belongs to.
    pub enterprise_id: String,
    /// Kind.
    pub kind: UserKind,
}

/// A failure the fake injects on the next `/oauth2/token` calls.
#[derive(Debug, Clone)]
pub enum Fault {
    /// 429 with `Retry-After` (seconds) and Box's `rate_limit_exceeded` body.
    RateLimited {
        /// Seconds.
        retry_after_secs: u64,
    },
    /// A 5xx with a Box error body.
    ServerError {
        /// 500, 502, 503 ...
        status: u16,
    },
    /// Any status and body, e.g. Box's generic `{type, code, message}` error
    /// shape, malformed JSON, or a 200 without `expires_in`.
    Reply {
        /// HTTP status.
        status: u16,
        /// Body (sent as JSON).
        body: String,
    },
    /// No answer at all: the request hangs until the client gives up.
    Hang,
    /// The connection is dropped without an answer.
    Reset,
}

/// Call counts, by outcome and grant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Every POST to `/oauth2/token` that arrived, faults included: the
    /// number of upstream attempts.
    pub token_arrivals: u64,
    /// Every POST to `/oauth2/token` that reached the token logic (not faults).
    pub token_requests: u64,
    /// `jwt-bearer` requests (including rejected ones).
    pub jwt_requests: u64,
    /// `client_credentials` requests (including rejected ones).
    pub ccg_requests: u64,
    /// Tokens issued by `jwt-bearer`.
    pub jwt_issued: u64,
    /// Tokens issued by `client_credentials`.
    pub ccg_issued: u64,
    /// Requests answered with an OAuth error.
    pub rejected: u64,
    /// Requests answered by an injected fault.
    pub faults_served: u64,
    /// `/oauth2/revoke` calls.
    pub revoke_requests: u64,
    /// Token-exchange requests (including rejected ones).
    pub exchange_requests: u64,
    /// Downscoped tokens issued.
    pub exchange_issued: u64,
}

/// An OAuth error as Box sends it: status, `error`, `error_description`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthReject {
    /// HTTP status.
    pub status: u16,
    /// `error`.
    pub error: &'static str,
    /// `error_description`.
    pub description: String,
}

fn reject(error: &'static str, description: &str) -> OAuthReject {
    OAuthReject {
        status: 400,
        error,
        description: description.to_owned(),
    }
}

/// Box's messages (box-contract.md §2, §4, §10).
pub mod msg {
    /// Missing or unknown grant type.
    pub const BAD_GRANT_TYPE: &str = "Invalid grant_type parameter or parameter missing";
    /// Wrong client id or secret.
    pub const BAD_CLIENT: &str = "The client credentials are invalid";
    /// App not authorized.
    pub const NOT_AUTHORIZED: &str = "This app is not authorized by the enterprise admin";
    /// Grant type not enabled for the app.
    pub const GRANT_NOT_ALLOWED: &str = "The grant type is unauthorized for this client_id.";
    /// Unknown `kid`.
    pub const BAD_KID: &str = "\"kid\" invalid, unable to lookup correct key";
    /// Bad signature or algorithm.
    pub const BAD_SIGNATURE: &str = "Signature verification error. The public key identified by \"kid\" must correspond to the private key used for signing.";
    /// Wrong `iss`.
    pub const BAD_ISS: &str = "Please check the 'iss' claim.";
    /// Wrong `aud` (exact text unknown: box-contract.md §12.10).
    pub const BAD_AUD: &str = "Please check the 'aud' claim.";
    /// `exp` in the past.
    pub const EXPIRED: &str = "Current date/time MUST be before the expiration date/time listed in the 'exp' claim";
    /// `exp` too far ahead.
    pub const EXP_TOO_FAR: &str =
        "Please check the 'exp' claim. The 'exp' value exceeds the maximum value of 60 seconds beyond the issue time.";
    /// Missing or non-integer `exp`.
    pub const BAD_EXP: &str = "Please check the 'exp' claim.";
    /// Bad or reused `jti`.
    pub const BAD_JTI: &str = "Please check the 'jti' claim. A unique 'jti' value is required.";
    /// Bad `sub` / `box_sub_type`.
    pub const BAD_SUB: &str = "Please check the 'sub' claim. The 'sub' specified is invalid.";
    /// User tokens not enabled.
    pub const NO_USER_TOKENS: &str = "Cannot obtain user token based on the enterprise configuration for your app";
    /// Any CCG grant failure.
    pub const BAD_CCG: &str = "Grant credentials are invalid";
}

/// A token the fake issued.
#[derive(Debug, Clone)]
pub struct IssuedFakeToken {
    /// The app it was issued to.
    pub client_id: String,
    /// The user it acts as (the Service Account's id for enterprise tokens).
    pub user_id: String,
    /// When it stops working (fake clock).
    pub expires_at: SystemTime,
    /// Revoked through `/oauth2/revoke`.
    pub revoked: bool,
    /// For a downscoped token, its scopes; `None` means the app's scopes.
    pub scopes: Option<BTreeSet<String>>,
}

/// The claims and header of an accepted assertion, kept for tests to inspect.
#[derive(Debug, Clone)]
pub struct SeenAssertion {
    /// Header `alg`.
    pub alg: Algorithm,
    /// Header `kid`.
    pub kid: Option<String>,
    /// All claims.
    pub claims: serde_json::Value,
    /// The form field names sent with it, in order.
    pub form_fields: Vec<String>,
}

/// The whole mutable world, behind one mutex.
#[derive(Debug, Default)]
pub struct World {
    pub(crate) apps: HashMap<String, FakeApp>,
    pub(crate) users: HashMap<String, FakeUser>,
    pub(crate) tokens: HashMap<String, IssuedFakeToken>,
    /// `jti` -> its `exp`, pruned once expired.
    seen_jti: HashMap<String, i64>,
    pub(crate) faults: VecDeque<Fault>,
    pub(crate) latency: Duration,
    pub(crate) skew_secs: i64,
    /// Fixed token lifetime; `None` draws 4000–4200 s like real Box.
    pub(crate) token_lifetime: Option<Duration>,
    pub(crate) stats: Stats,
    pub(crate) assertions: VecDeque<SeenAssertion>,
    /// Files and folders by (kind, id).
    pub(crate) items: HashMap<(&'static str, String), FakeItem>,
    /// Answer token exchanges with an empty `restricted_to`, as if Box had
    /// silently not scoped the token (to test the broker's guard).
    pub(crate) omit_restrictions: bool,
}

/// How many accepted assertions are kept for inspection.
const KEEP_ASSERTIONS: usize = 64;

/// A form, as ordered pairs (duplicates keep the first).
pub type Form = Vec<(String, String)>;

fn field<'a>(form: &'a Form, name: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// A successful grant: the token and its lifetime.
#[derive(Debug)]
pub struct Granted {
    /// The access token.
    pub access_token: String,
    /// Seconds.
    pub expires_in: u64,
    /// For a token exchange: `restricted_to` entries (scope, item).
    pub restricted_to: Option<Vec<(String, FakeItem)>>,
}

impl World {
    /// Handles one `/oauth2/token` form at fake time `now`.
    pub fn token(&mut self, form: &Form, now: SystemTime) -> Result<Granted, OAuthReject> {
        self.stats.token_requests += 1;
        match field(form, "grant_type") {
            Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => {
                self.stats.jwt_requests += 1;
                let granted = self.jwt_bearer(form, now)?;
                self.stats.jwt_issued += 1;
                Ok(granted)
            }
            Some("client_credentials") => {
                self.stats.ccg_requests += 1;
                let granted = self.client_credentials(form, now)?;
                self.stats.ccg_issued += 1;
                Ok(granted)
            }
            Some("urn:ietf:params:oauth:grant-type:token-exchange") => {
                self.stats.exchange_requests += 1;
                let granted = self.token_exchange(form, now)?;
                self.stats.exchange_issued += 1;
                Ok(granted)
            }
            _ => Err(reject("invalid_request", msg::BAD_GRANT_TYPE)),
        }
    }

    fn app_for(&self, form: &Form, grant: FakeAuth) -> Result<&FakeApp, OAuthReject> {
        let app = field(form, "client_id")
            .and_then(|id| self.apps.get(id))
            .filter(|app| field(form, "client_secret") == Some(app.client_secret.as_str()))
            .ok_or_else(|| reject("invalid_client", msg::BAD_CLIENT))?;
        if app.auth != grant {
            return Err(reject("invalid_request", msg::GRANT_NOT_ALLOWED));
        }
        if !app.authorized {
            return Err(reject("unauthorized_client", msg::NOT_AUTHORIZED));
        }
        Ok(app)
    }

    fn jwt_bearer(&mut self, form: &Form, now: SystemTime) -> Result<Granted, OAuthReject> {
        let app = self.app_for(form, FakeAuth::Jwt)?.clone();
        let assertion = field(form, "assertion").ok_or_else(|| reject("invalid_grant", msg::BAD_SIGNATURE))?;
        let header = jsonwebtoken::decode_header(assertion).map_err(|_| reject("invalid_grant", msg::BAD_SIGNATURE))?;
        let key = match &header.kid {
            Some(kid) => app.keys.get(kid),
            // Allowed with exactly one key: the TS/Node SDKs send no kid.
            None if app.keys.len() == 1 => app.keys.values().next(),
            None => None,
        }
        .ok_or_else(|| reject("invalid_grant", msg::BAD_KID))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512) {
            return Err(reject("invalid_grant", msg::BAD_SIGNATURE));
        }
        let decoding = DecodingKey::from_rsa_raw_components(&key.n().to_bytes_be(), &key.e().to_bytes_be());
        let mut validation = Validation::new(header.alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let claims = jsonwebtoken::decode::<serde_json::Value>(assertion, &decoding, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => {
                    reject("invalid_grant", msg::BAD_SIGNATURE)
                }
                _ => reject("invalid_grant", "The assertion is malformed."),
            })?
            .claims;
        let text = |name: &str| claims.get(name).and_then(serde_json::Value::as_str);
        if text("iss") != Some(app.client_id.as_str()) {
            return Err(reject("invalid_grant", msg::BAD_ISS));
        }
        if text("aud") != Some(BOX_TOKEN_AUDIENCE) {
            return Err(reject("invalid_grant", msg::BAD_AUD));
        }
        let now_secs = unix_seconds(now);
        let exp = claims
            .get("exp")
            .and_then(serde_json::Value::as_i64)
            .ok_or_else(|| reject("invalid_grant", msg::BAD_EXP))?;
        if exp <= now_secs {
            return Err(reject("invalid_grant", msg::EXPIRED));
        }
        if exp > now_secs + 60 {
            return Err(reject("invalid_grant", msg::EXP_TOO_FAR));
        }
        self.seen_jti.retain(|_, e| *e >= now_secs);
        match text("jti") {
            Some(jti) if (16..=128).contains(&jti.chars().count()) && !self.seen_jti.contains_key(jti) => {
                self.seen_jti.insert(jti.to_owned(), exp);
            }
            _ => return Err(reject("invalid_grant", msg::BAD_JTI)),
        }
        let sub = text("sub").ok_or_else(|| reject("invalid_grant", msg::BAD_SUB))?;
        let user_id = match text("box_sub_type") {
            Some("enterprise") if sub == app.enterprise_id => app.service_account_id.clone(),
            Some("user") => {
                let user = self
                    .tokenizable_user(&app, sub)
                    .ok_or_else(|| reject("invalid_grant", msg::BAD_SUB))?;
                if !app.user_tokens || (user.kind == UserKind::Managed && !app.enterprise_access) {
                    return Err(reject("invalid_request", msg::NO_USER_TOKENS));
                }
                user.id.clone()
            }
            _ => return Err(reject("invalid_grant", msg::BAD_SUB)),
        };
        self.assertions.push_back(SeenAssertion {
            alg: header.alg,
            kid: header.kid,
            claims: claims.clone(),
            form_fields: form.iter().map(|(k, _)| k.clone()).collect(),
        });
        if self.assertions.len() > KEEP_ASSERTIONS {
            self.assertions.pop_front();
        }
        Ok(self.issue(&app.client_id, user_id, now))
    }

    fn client_credentials(&mut self, form: &Form, now: SystemTime) -> Result<Granted, OAuthReject> {
        let app = self.app_for(form, FakeAuth::Ccg)?.clone();
        let id = field(form, "box_subject_id").unwrap_or_default();
        let user_id = match field(form, "box_subject_type") {
            Some("enterprise") if id == app.enterprise_id => app.service_account_id.clone(),
            Some("user") => match self.tokenizable_user(&app, id) {
                Some(user) if app.user_tokens && (user.kind != UserKind::Managed || app.enterprise_access) => {
                    user.id.clone()
                }
                _ => return Err(reject("invalid_grant", msg::BAD_CCG)),
            },
            _ => return Err(reject("invalid_grant", msg::BAD_CCG)),
        };
        Ok(self.issue(&app.client_id, user_id, now))
    }

    /// A user the app may get a token for: in its enterprise, not external,
    /// and (for App Users) created by this app.
    fn tokenizable_user(&self, app: &FakeApp, id: &str) -> Option<&FakeUser> {
        self.users.get(id).filter(|u| {
            u.enterprise_id == app.enterprise_id
                && match &u.kind {
                    UserKind::AppUser { client_id } => *client_id == app.client_id,
                    UserKind::Managed => true,
                    UserKind::External => false,
                }
        })
    }

    fn issue(&mut self, client_id: &str, user_id: String, now: SystemTime) -> Granted {
        let lifetime = self.lifetime();
        let access_token = random_token();
        self.tokens.insert(
            access_token.clone(),
            IssuedFakeToken {
                client_id: client_id.to_owned(),
                user_id,
                expires_at: now + lifetime,
                revoked: false,
                scopes: None,
            },
        );
        Granted {
            access_token,
            expires_in: lifetime.as_secs(),
            restricted_to: None,
        }
    }

    fn lifetime(&self) -> Duration {
        self.token_lifetime
            .unwrap_or_else(|| Duration::from_secs(rand::thread_rng().gen_range(4000..=4200)))
    }

    /// The token exchange (box-contract.md §5, §10.5). Where Box's exact
    /// status or message is unknown (§12.4–5) the conservative reading is taken
    /// and marked INF.
    fn token_exchange(&mut self, form: &Form, now: SystemTime) -> Result<Granted, OAuthReject> {
        if field(form, "subject_token_type") != Some("urn:ietf:params:oauth:token-type:access_token") {
            return Err(reject("invalid_request", "Invalid subject_token_type"));
        }
        // INF: a dead subject token's exact error is undocumented.
        let parent = field(form, "subject_token")
            .and_then(|t| self.tokens.get(t))
            .filter(|t| !t.revoked && t.expires_at > now)
            .cloned()
            .ok_or_else(|| reject("invalid_grant", "The subject token is invalid or expired"))?;
        let requested: BTreeSet<String> = field(form, "scope")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if requested.is_empty() {
            return Err(reject("invalid_request", "The scope parameter is required"));
        }
        let held = match &parent.scopes {
            Some(scopes) => scopes.clone(),
            None => self
                .apps
                .get(&parent.client_id)
                .map(|a| a.scopes.clone())
                .unwrap_or_default(),
        };
        if !requested.is_subset(&held) {
            // The OpenAPI says 401; the body is INF.
            return Err(OAuthReject {
                status: 401,
                error: "invalid_scope",
                description: "The requested scope exceeds the scope granted to the subject token".to_owned(),
            });
        }
        let item = match (field(form, "resource"), field(form, "box_shared_link")) {
            (Some(_), Some(_)) => {
                return Err(reject(
                    "invalid_request",
                    "resource and box_shared_link are mutually exclusive",
                ));
            }
            (Some(resource), None) => Some(self.resource(resource, &parent.user_id)?),
            (None, Some(link)) => Some(
                self.items
                    .values()
                    .find(|i| i.shared_link.as_deref() == Some(link))
                    .cloned()
                    .ok_or_else(|| reject("invalid_resource", "The target resource is invalid."))?,
            ),
            (None, None) => None,
        };
        // INF: a downscoped token is taken never to outlive its parent.
        let remaining = parent.expires_at.duration_since(now).unwrap_or_default();
        let lifetime = self.lifetime().min(remaining);
        let access_token = random_token();
        self.tokens.insert(
            access_token.clone(),
            IssuedFakeToken {
                client_id: parent.client_id.clone(),
                user_id: parent.user_id.clone(),
                expires_at: now + lifetime,
                revoked: false,
                scopes: Some(requested.clone()),
            },
        );
        let restricted_to = match (&item, self.omit_restrictions) {
            (Some(item), false) => requested.iter().map(|s| (s.clone(), item.clone())).collect(),
            _ => Vec::new(),
        };
        Ok(Granted {
            access_token,
            expires_in: lifetime.as_secs(),
            restricted_to: Some(restricted_to),
        })
    }

    /// The item a `resource` URL names, if `user` can reach it.
    fn resource(&self, url: &str, user: &str) -> Result<FakeItem, OAuthReject> {
        let bad = || reject("invalid_resource", "The target resource is invalid.");
        let path = url.split_once("/2.0/").map(|(_, p)| p).ok_or_else(bad)?;
        let (kind, id) = match path.split_once('/') {
            Some(("files", id)) => ("file", id),
            Some(("folders", id)) => ("folder", id),
            _ => return Err(bad()),
        };
        self.items
            .get(&(kind, id.to_owned()))
            .filter(|i| i.owner == user || i.collaborators.iter().any(|c| c == user))
            .cloned()
            .ok_or_else(bad)
    }

    /// Handles one `/oauth2/revoke` form.
    pub fn revoke(&mut self, form: &Form) -> Result<(), OAuthReject> {
        self.stats.revoke_requests += 1;
        let client_ok = field(form, "client_id")
            .and_then(|id| self.apps.get(id))
            .is_some_and(|app| field(form, "client_secret") == Some(app.client_secret.as_str()));
        if !client_ok {
            return Err(reject("invalid_client", msg::BAD_CLIENT));
        }
        // Revoking an unknown or already revoked token succeeds (RFC 7009 §2.2).
        if let Some(token) = field(form, "token").and_then(|t| self.tokens.get_mut(t)) {
            token.revoked = true;
        }
        Ok(())
    }

    /// The user a live token acts as.
    pub fn token_user(&self, token: &str, now: SystemTime) -> Option<(&IssuedFakeToken, Option<&FakeUser>)> {
        let issued = self.tokens.get(token).filter(|t| !t.revoked && t.expires_at > now)?;
        Some((issued, self.users.get(&issued.user_id)))
    }
}

/// A random 32-character alphanumeric token, the shape of real Box tokens.
pub fn random_token() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}
