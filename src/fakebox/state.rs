//! The fake Box's world — apps, users, issued tokens, seen `jti`s, fault
//! knobs and call counts — and the rules of `/oauth2/token`, checked in the
//! order box-contract.md §10 gives, with Box's own error codes and messages,
//! and of the users API (`/2.0/users*`, box-contract.md §13), with Box's
//! `ClientError` shapes. Where Box's behaviour is not documented the
//! conservative reading is taken and marked INF.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    time::{Duration, SystemTime},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use rand::{Rng as _, distributions::Alphanumeric};
use rsa::{RsaPublicKey, traits::PublicKeyParts as _};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

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
    /// Its users-API scopes: [`MANAGE_APP_USERS`] and/or
    /// [`MANAGE_MANAGED_USERS`] (the console's "Manage users" and "Manage
    /// enterprise users").
    pub user_scopes: BTreeSet<String>,
}

/// The app scope to list, read and create App Users (the console's "Manage users").
pub const MANAGE_APP_USERS: &str = "manage_app_users";
/// The app scope to read and create Managed Users (the console's "Manage enterprise users").
pub const MANAGE_MANAGED_USERS: &str = "manage_managed_users";
/// A user's possible `role`s.
pub const USER_ROLES: [&str; 3] = ["user", "admin", "coadmin"];
/// A user's possible `status`es.
pub const USER_STATUSES: [&str; 4] = ["active", "inactive", "cannot_delete_edit", "cannot_delete_edit_upload"];

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
    /// `user`, `admin` or `coadmin` (see [`USER_ROLES`]).
    pub role: String,
    /// `active`, `inactive`, `cannot_delete_edit` or
    /// `cannot_delete_edit_upload` (see [`USER_STATUSES`]).
    pub status: String,
    /// The id the app that created the user knows it by (App Users; SSO
    /// Managed Users may carry one too).
    pub external_app_user_id: Option<String>,
}

impl FakeUser {
    /// An active user with role `user` and no external id.
    pub fn new(id: &str, name: &str, login: &str, enterprise_id: &str, kind: UserKind) -> Self {
        Self {
            id: id.to_owned(),
            name: name.to_owned(),
            login: login.to_owned(),
            enterprise_id: enterprise_id.to_owned(),
            kind,
            role: "user".to_owned(),
            status: "active".to_owned(),
            external_app_user_id: None,
        }
    }

    /// The same user with `role`.
    #[must_use]
    pub fn with_role(mut self, role: &str) -> Self {
        role.clone_into(&mut self.role);
        self
    }

    /// The same user with `status`.
    #[must_use]
    pub fn with_status(mut self, status: &str) -> Self {
        status.clone_into(&mut self.status);
        self
    }

    /// The same user with an `external_app_user_id`.
    #[must_use]
    pub fn with_external_app_user_id(mut self, external_id: &str) -> Self {
        self.external_app_user_id = Some(external_id.to_owned());
        self
    }
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
    /// Requests answered by an injected fault (token and users endpoints).
    pub faults_served: u64,
    /// `/oauth2/revoke` calls.
    pub revoke_requests: u64,
    /// Token-exchange requests (including rejected ones).
    pub exchange_requests: u64,
    /// Downscoped tokens issued.
    pub exchange_issued: u64,
    /// Every request that arrived at a `/2.0/users*` endpoint, faults included.
    pub users_requests: u64,
    /// `GET /2.0/users` requests that reached the users logic (not faults).
    pub user_lists: u64,
    /// `GET /2.0/users/{id}` requests that reached the users logic.
    pub user_reads: u64,
    /// Users created (`POST /2.0/users` answered 201).
    pub users_created: u64,
    /// `POST /2.0/users` requests that reached the users logic.
    pub user_create_requests: u64,
    /// `GET /2.0/users/me` requests that reached the users logic.
    pub users_me: u64,
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

/// Box's messages (box-contract.md §2, §4, §10, §13).
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
    /// A users-API call the app's scopes do not cover (`insufficient_scope`),
    /// or made with a downscoped token.
    pub const INSUFFICIENT_SCOPE: &str = "The request requires higher privileges than provided by the access token.";
    /// A users-API call only the Service Account may make (`forbidden`; INF).
    pub const FORBIDDEN: &str = "Access denied - insufficient permission";
    /// An unknown or invisible user (`not_found`; exact text INF).
    pub const NOT_FOUND: &str = "Not Found";
    /// A second user with the same `external_app_user_id` (`conflict`; INF).
    pub const DUPLICATE_EXTERNAL_ID: &str = "A user with this external_app_user_id already exists";
    /// A second user with the same login (`user_login_already_used`; exact text INF).
    pub const LOGIN_USED: &str = "User with the specified login already exists";
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
    pub claims: Value,
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
    /// Faults for the `/2.0/users*` endpoints.
    pub(crate) users_faults: VecDeque<Fault>,
    /// The next id `POST /2.0/users` may give (0: not started).
    next_user_id: u64,
    pub(crate) latency: Duration,
    /// What every `/2.0/users*` request waits first.
    pub(crate) users_latency: Duration,
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
        let claims = jsonwebtoken::decode::<Value>(assertion, &decoding, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => {
                    reject("invalid_grant", msg::BAD_SIGNATURE)
                }
                _ => reject("invalid_grant", "The assertion is malformed."),
            })?
            .claims;
        let text = |name: &str| claims.get(name).and_then(Value::as_str);
        if text("iss") != Some(app.client_id.as_str()) {
            return Err(reject("invalid_grant", msg::BAD_ISS));
        }
        if text("aud") != Some(BOX_TOKEN_AUDIENCE) {
            return Err(reject("invalid_grant", msg::BAD_AUD));
        }
        let now_secs = unix_seconds(now);
        let exp = claims
            .get("exp")
            .and_then(Value::as_i64)
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

/// A Box API error (`ClientError`), as the users endpoints answer it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientError {
    /// HTTP status.
    pub status: u16,
    /// `code`: `not_found`, `forbidden`, `insufficient_scope`, `bad_request`,
    /// `conflict` or `user_login_already_used`.
    pub code: &'static str,
    /// `message`.
    pub message: String,
    /// `context_info`: `{}`, or for a bad parameter
    /// `{"errors": [{"reason", "name", "message"}]}` (INF, Box's usual shape).
    pub context_info: Value,
}

/// Why a users-API request fails.
#[derive(Debug, Clone, PartialEq)]
pub enum UsersReject {
    /// The token is unknown, expired or revoked: 401 with `WWW-Authenticate`
    /// and an empty body.
    InvalidToken,
    /// Any other failure, as a `ClientError` body.
    Client(ClientError),
}

fn client_error(status: u16, code: &'static str, message: &str) -> UsersReject {
    UsersReject::Client(ClientError {
        status,
        code,
        message: message.to_owned(),
        context_info: json!({}),
    })
}

fn not_found() -> UsersReject {
    client_error(404, "not_found", msg::NOT_FOUND)
}

fn insufficient_scope() -> UsersReject {
    client_error(403, "insufficient_scope", msg::INSUFFICIENT_SCOPE)
}

/// A 400 `bad_request` naming the parameter at fault.
fn bad_parameter(name: &str, reason: &str, message: &str) -> UsersReject {
    UsersReject::Client(ClientError {
        status: 400,
        code: "bad_request",
        message: message.to_owned(),
        context_info: json!({"errors": [{"reason": reason, "name": name, "message": message}]}),
    })
}

/// The `created_at` of every user (INF: any RFC 3339 time will do).
const CREATED_AT: &str = "2024-01-02T03:04:05-08:00";
/// The enterprise name every user's `enterprise` carries.
const ENTERPRISE_NAME: &str = "Fake Enterprise";
/// The id `POST /2.0/users` gives its first user.
const FIRST_CREATED_USER_ID: u64 = 7_900_001;
/// The longest `name` `POST /2.0/users` takes (INF).
const MAX_NAME_CHARS: usize = 50;
/// The fields beyond the mini representation (`type`, `id`, `name`,
/// `login`) the fake knows; the full representation has them all.
const USER_FIELDS: [&str; 6] = [
    "role",
    "status",
    "enterprise",
    "is_platform_access_only",
    "external_app_user_id",
    "created_at",
];

/// The query of the users endpoints. Every value is text so that a bad one
/// is a Box `bad_request`, not a framework error; unknown parameters are
/// ignored, as at Box.
#[derive(Debug, Default, Deserialize)]
struct UsersQuery {
    /// Exact-match filter (`GET /2.0/users`).
    external_app_user_id: Option<String>,
    /// Name or login prefix, case-insensitive (`GET /2.0/users`).
    filter_term: Option<String>,
    /// Comma-separated extra fields: the mini representation plus these.
    fields: Option<String>,
    /// Page size, 1..=1000, default 100.
    limit: Option<String>,
    /// Entries to skip, 0..=10000, default 0.
    offset: Option<String>,
}

/// The body of `POST /2.0/users`; values stay JSON so a wrong type is a
/// `bad_request` naming the field.
#[derive(Debug, Default, Deserialize)]
struct NewUserBody {
    name: Option<Value>,
    login: Option<Value>,
    is_platform_access_only: Option<Value>,
    external_app_user_id: Option<Value>,
    role: Option<Value>,
    status: Option<Value>,
}

/// Who calls the users API: a live, not downscoped token's app and user.
#[derive(Debug)]
struct Caller {
    client_id: String,
    enterprise_id: String,
    service_account_id: String,
    user_scopes: BTreeSet<String>,
    user_id: String,
}

impl Caller {
    fn is_service_account(&self) -> bool {
        self.user_id == self.service_account_id
    }

    fn has(&self, scope: &str) -> bool {
        self.user_scopes.contains(scope)
    }

    /// Listing, creating and reading others is the Service Account's (INF: 403 `forbidden`).
    fn require_service_account(&self) -> Result<(), UsersReject> {
        if self.is_service_account() {
            Ok(())
        } else {
            Err(client_error(403, "forbidden", msg::FORBIDDEN))
        }
    }

    fn require_scope(&self, scope: &str) -> Result<(), UsersReject> {
        if self.has(scope) {
            Ok(())
        } else {
            Err(insufficient_scope())
        }
    }

    /// The Service Account's reach (INF, conservative): this app's App Users
    /// and the enterprise's Managed Users. External users and other apps'
    /// App Users are out of it.
    fn reaches(&self, user: &FakeUser) -> bool {
        user.enterprise_id == self.enterprise_id
            && match &user.kind {
                UserKind::AppUser { client_id } => *client_id == self.client_id,
                UserKind::Managed => true,
                UserKind::External => false,
            }
    }

    /// Whether the app holds either users scope.
    fn has_any_users_scope(&self) -> bool {
        self.has(MANAGE_APP_USERS) || self.has(MANAGE_MANAGED_USERS)
    }

    /// Whether the app's user scopes cover reading `user`: App Users need
    /// `manage_app_users`, Managed Users `manage_managed_users`, an External
    /// user either.
    fn may_read(&self, user: &FakeUser) -> bool {
        match user.kind {
            UserKind::AppUser { .. } => self.has(MANAGE_APP_USERS),
            UserKind::Managed => self.has(MANAGE_MANAGED_USERS),
            UserKind::External => self.has(MANAGE_APP_USERS) || self.has(MANAGE_MANAGED_USERS),
        }
    }
}

fn parse_query(query: &str) -> Result<UsersQuery, UsersReject> {
    serde_urlencoded::from_str(query)
        .map_err(|e| bad_parameter("query", "invalid_parameter", &format!("Invalid query: {e}")))
}

/// The requested extra fields; `None` (no or empty `fields`) is the full representation.
fn parse_fields(fields: Option<&str>) -> Option<BTreeSet<String>> {
    let set: BTreeSet<String> = fields?
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(str::to_owned)
        .collect();
    (!set.is_empty()).then_some(set)
}

/// A numeric query parameter within `range`, or `default` when absent.
fn number_param(
    name: &str,
    value: Option<&str>,
    default: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Result<usize, UsersReject> {
    let Some(text) = value else { return Ok(default) };
    text.parse::<usize>().ok().filter(|n| range.contains(n)).ok_or_else(|| {
        bad_parameter(
            name,
            "invalid_parameter",
            &format!(
                "Invalid value '{text}' for query parameter '{name}': it must be an integer from {} to {}",
                range.start(),
                range.end()
            ),
        )
    })
}

/// A user as Box shows it: the mini representation plus `fields`, or the
/// full one (every field the fake knows) when `fields` is `None`.
fn user_json(user: &FakeUser, fields: Option<&BTreeSet<String>>) -> Value {
    let mut body = json!({"type": "user", "id": user.id, "name": user.name, "login": user.login});
    for field in USER_FIELDS {
        if fields.is_none_or(|f| f.contains(field)) {
            body[field] = user_field(user, field);
        }
    }
    body
}

fn user_field(user: &FakeUser, field: &str) -> Value {
    match field {
        "role" => json!(user.role),
        "status" => json!(user.status),
        "enterprise" if user.enterprise_id.is_empty() => Value::Null,
        "enterprise" => json!({"type": "enterprise", "id": user.enterprise_id, "name": ENTERPRISE_NAME}),
        "is_platform_access_only" => json!(matches!(user.kind, UserKind::AppUser { .. })),
        "external_app_user_id" => json!(user.external_app_user_id),
        "created_at" => json!(CREATED_AT),
        _ => Value::Null,
    }
}

/// Box user ids are numbers.
fn is_user_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())
}

/// Ids in numeric order (all are digits, so shorter is smaller).
fn by_id(a: &&FakeUser, b: &&FakeUser) -> std::cmp::Ordering {
    (a.id.len(), &a.id).cmp(&(b.id.len(), &b.id))
}

/// An optional string field of a JSON body.
fn optional_text<'a>(name: &str, value: Option<&'a Value>) -> Result<Option<&'a str>, UsersReject> {
    match value {
        None => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(bad_parameter(
            name,
            "invalid_parameter",
            &format!("'{name}' must be a string"),
        )),
    }
}

/// A required, non-empty string field of a JSON body.
fn required_text<'a>(name: &str, value: Option<&'a Value>) -> Result<&'a str, UsersReject> {
    match optional_text(name, value)? {
        Some(text) if !text.trim().is_empty() => Ok(text),
        Some(_) => Err(bad_parameter(
            name,
            "invalid_parameter",
            &format!("'{name}' must not be empty"),
        )),
        None => Err(bad_parameter(
            name,
            "missing_parameter",
            &format!("'{name}' is required"),
        )),
    }
}

/// An optional string field that must be one of `allowed`.
fn one_of(name: &str, value: Option<&Value>, allowed: &[&str], default: &str) -> Result<String, UsersReject> {
    match optional_text(name, value)? {
        None => Ok(default.to_owned()),
        Some(text) if allowed.contains(&text) => Ok(text.to_owned()),
        Some(text) => Err(bad_parameter(
            name,
            "invalid_parameter",
            &format!(
                "Invalid value '{text}' for '{name}': it must be one of {}",
                allowed.join(", ")
            ),
        )),
    }
}

/// A validated `POST /2.0/users` request.
#[derive(Debug)]
struct NewUser {
    name: String,
    /// `None` for an App User: Box assigns the login.
    login: Option<String>,
    external_app_user_id: Option<String>,
    role: String,
    status: String,
}

impl World {
    /// The caller behind a bearer token: 401 if the token is unknown,
    /// expired or revoked (or its app is gone), 403 `insufficient_scope`
    /// if it is downscoped (INF).
    fn caller(&self, token: &str, now: SystemTime) -> Result<Caller, UsersReject> {
        let (issued, _) = self.token_user(token, now).ok_or(UsersReject::InvalidToken)?;
        let app = self.apps.get(&issued.client_id).ok_or(UsersReject::InvalidToken)?;
        if issued.scopes.is_some() {
            return Err(insufficient_scope());
        }
        Ok(Caller {
            client_id: app.client_id.clone(),
            enterprise_id: app.enterprise_id.clone(),
            service_account_id: app.service_account_id.clone(),
            user_scopes: app.user_scopes.clone(),
            user_id: issued.user_id.clone(),
        })
    }

    /// The caller's own user; the Service Account is not in the directory,
    /// so it is made up (INF: role `user`).
    fn own_user(&self, caller: &Caller) -> FakeUser {
        self.users.get(&caller.user_id).cloned().unwrap_or_else(|| {
            FakeUser::new(
                &caller.user_id,
                "Service Account",
                &format!("AutomationUser_{}@boxdevedition.com", caller.user_id),
                &caller.enterprise_id,
                UserKind::Managed,
            )
        })
    }

    /// `GET /2.0/users/me` (`query`: the raw query string): the token's own
    /// user, for any live token that is not downscoped.
    pub fn users_me(&mut self, token: &str, query: &str, now: SystemTime) -> Result<Value, UsersReject> {
        self.stats.users_me += 1;
        let caller = self.caller(token, now)?;
        let query = parse_query(query)?;
        Ok(user_json(
            &self.own_user(&caller),
            parse_fields(query.fields.as_deref()).as_ref(),
        ))
    }

    /// `GET /2.0/users/{id}`: the token's own user, or (for the Service
    /// Account) a user in its reach or an External user; 404 otherwise.
    pub fn read_user(&mut self, token: &str, id: &str, query: &str, now: SystemTime) -> Result<Value, UsersReject> {
        self.stats.user_reads += 1;
        let caller = self.caller(token, now)?;
        let query = parse_query(query)?;
        let fields = parse_fields(query.fields.as_deref());
        if id == caller.user_id {
            return Ok(user_json(&self.own_user(&caller), fields.as_ref()));
        }
        caller.require_service_account()?;
        // An app with no users scope at all is refused before anything is looked up.
        if !caller.has_any_users_scope() {
            return Err(insufficient_scope());
        }
        // INF: an External user is shown, with its own enterprise, so a
        // client can see what it is and refuse it.
        let user = Some(id)
            .filter(|id| is_user_id(id))
            .and_then(|id| self.users.get(id))
            .filter(|u| caller.reaches(u) || u.kind == UserKind::External)
            .ok_or_else(not_found)?;
        if !caller.may_read(user) {
            return Err(insufficient_scope());
        }
        Ok(user_json(user, fields.as_ref()))
    }

    /// `GET /2.0/users` (`query`: the raw query string): the Service
    /// Account's list of the users in its reach that its scopes cover,
    /// sorted by id. Needs `manage_app_users`; Managed Users are listed only
    /// with `manage_managed_users` too (INF).
    pub fn list_users(&mut self, token: &str, query: &str, now: SystemTime) -> Result<Value, UsersReject> {
        self.stats.user_lists += 1;
        let caller = self.caller(token, now)?;
        caller.require_service_account()?;
        caller.require_scope(MANAGE_APP_USERS)?;
        let query = parse_query(query)?;
        let limit = number_param("limit", query.limit.as_deref(), 100, 1..=1000)?;
        let offset = number_param("offset", query.offset.as_deref(), 0, 0..=10_000)?;
        let fields = parse_fields(query.fields.as_deref());
        let term = query.filter_term.as_deref().unwrap_or_default().to_lowercase();
        let mut found: Vec<&FakeUser> = self
            .users
            .values()
            .filter(|u| caller.reaches(u) && caller.may_read(u))
            .filter(|u| {
                query
                    .external_app_user_id
                    .as_ref()
                    .is_none_or(|ext| u.external_app_user_id.as_ref() == Some(ext))
            })
            .filter(|u| u.name.to_lowercase().starts_with(&term) || u.login.to_lowercase().starts_with(&term))
            .collect();
        found.sort_by(by_id);
        let entries: Vec<Value> = found
            .iter()
            .skip(offset)
            .take(limit)
            .map(|u| user_json(u, fields.as_ref()))
            .collect();
        Ok(json!({"entries": entries, "total_count": found.len(), "offset": offset, "limit": limit}))
    }

    /// `POST /2.0/users` (`body`: `None` when it is not
    /// `application/json`): the Service Account creates an App User
    /// (`is_platform_access_only: true`, owned by its app, login assigned by
    /// Box) or a Managed User (`login` given), atomically.
    pub fn create_user(&mut self, token: &str, body: Option<&[u8]>, now: SystemTime) -> Result<Value, UsersReject> {
        self.stats.user_create_requests += 1;
        let caller = self.caller(token, now)?;
        caller.require_service_account()?;
        let body = body.ok_or_else(|| {
            client_error(
                400,
                "bad_request",
                "The request body must be JSON (Content-Type: application/json)",
            )
        })?;
        let body: NewUserBody = serde_json::from_slice(body).map_err(|e| {
            client_error(
                400,
                "bad_request",
                &format!("The request body is not a JSON object: {e}"),
            )
        })?;
        let app_user = match &body.is_platform_access_only {
            None | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(_) => {
                return Err(bad_parameter(
                    "is_platform_access_only",
                    "invalid_parameter",
                    "'is_platform_access_only' must be a boolean",
                ));
            }
        };
        caller.require_scope(if app_user {
            MANAGE_APP_USERS
        } else {
            MANAGE_MANAGED_USERS
        })?;
        let new = new_user(&body, app_user)?;
        self.check_unique(&caller, &new)?;
        let id = self.new_user_id();
        let (kind, login) = match new.login {
            // INF: a login sent for an App User is ignored; Box assigns one.
            None => (
                UserKind::AppUser {
                    client_id: caller.client_id.clone(),
                },
                format!(
                    "AppUser_{}_{}@boxdevedition.com",
                    caller.service_account_id,
                    random_lower(10)
                ),
            ),
            Some(login) => (UserKind::Managed, login),
        };
        let user = FakeUser {
            id: id.clone(),
            name: new.name,
            login,
            enterprise_id: caller.enterprise_id.clone(),
            kind,
            role: new.role,
            status: new.status,
            external_app_user_id: new.external_app_user_id,
        };
        let body = user_json(&user, None);
        self.users.insert(id, user);
        self.stats.users_created += 1;
        Ok(body)
    }

    /// 409 for an `external_app_user_id` already used in the enterprise
    /// (INF: `conflict`) or a login already used anywhere
    /// (`user_login_already_used`).
    fn check_unique(&self, caller: &Caller, new: &NewUser) -> Result<(), UsersReject> {
        if let Some(ext) = &new.external_app_user_id
            && self
                .users
                .values()
                .any(|u| u.enterprise_id == caller.enterprise_id && u.external_app_user_id.as_ref() == Some(ext))
        {
            return Err(client_error(409, "conflict", msg::DUPLICATE_EXTERNAL_ID));
        }
        if let Some(login) = &new.login
            && self.users.values().any(|u| u.login.eq_ignore_ascii_case(login))
        {
            return Err(client_error(409, "user_login_already_used", msg::LOGIN_USED));
        }
        Ok(())
    }

    /// The next free numeric id for a created user.
    fn new_user_id(&mut self) -> String {
        self.next_user_id = self.next_user_id.max(FIRST_CREATED_USER_ID);
        loop {
            let id = self.next_user_id.to_string();
            self.next_user_id += 1;
            if !self.users.contains_key(&id) {
                return id;
            }
        }
    }
}

/// Checks a `POST /2.0/users` body's fields: `name` (1–50 characters),
/// `login` (Managed Users; an email), `role` (`user` or `coadmin`),
/// `status` and `external_app_user_id` (a non-empty string; INF).
fn new_user(body: &NewUserBody, app_user: bool) -> Result<NewUser, UsersReject> {
    let name = required_text("name", body.name.as_ref())?;
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(bad_parameter(
            "name",
            "invalid_parameter",
            &format!("'name' must be at most {MAX_NAME_CHARS} characters"),
        ));
    }
    let login = if app_user {
        None
    } else {
        let login = required_text("login", body.login.as_ref())?;
        if !login.contains('@') {
            return Err(bad_parameter(
                "login",
                "invalid_parameter",
                "'login' must be an email address",
            ));
        }
        Some(login.to_owned())
    };
    let external_app_user_id = match optional_text("external_app_user_id", body.external_app_user_id.as_ref())? {
        Some("") => {
            return Err(bad_parameter(
                "external_app_user_id",
                "invalid_parameter",
                "'external_app_user_id' must not be empty",
            ));
        }
        ext => ext.map(str::to_owned),
    };
    Ok(NewUser {
        name: name.to_owned(),
        login,
        external_app_user_id,
        role: one_of("role", body.role.as_ref(), &["user", "coadmin"], "user")?,
        status: one_of("status", body.status.as_ref(), &USER_STATUSES, "active")?,
    })
}

/// `len` random lowercase letters and digits (ids and secrets Box-like in shape).
pub(crate) fn random_lower(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(|b| char::from(b).to_ascii_lowercase())
        .collect()
}

/// A random 32-character alphanumeric token, the shape of real Box tokens.
pub fn random_token() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}
