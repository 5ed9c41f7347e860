//! Box users as the users API describes them (box-contract.md §13): who a
//! user is, whether the broker may tokenize them, and what went wrong asking.

use std::sync::Arc;

use serde::Deserialize;

use super::{BoxApiError, BoxId, Diagnosis, DiagnosisKind, credentials::BoxIdError};

/// The fields the broker asks for on every user it reads.
pub const USER_FIELDS: &str = "id,type,name,role,status,enterprise,is_platform_access_only,external_app_user_id";

/// The longest `external_app_user_id` accepted (Box documents no limit; a
/// bound keeps keys, logs and audit records small).
pub const MAX_EXTERNAL_ID_LEN: usize = 256;

/// The longest display name for a created App User (Box's limit for a user's name; INF).
pub const MAX_NAME_LEN: usize = 50;

/// An App User (or Managed User) named by the id the customer's identity
/// system gives it, as a request asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExternalUser {
    /// Box's `external_app_user_id`.
    pub id: Arc<str>,
    /// Create the App User with this name when Box has none (`create_if_missing`).
    pub create: Option<Arc<str>>,
}

/// A Box user, with the fields in [`USER_FIELDS`] (each may be absent when
/// Box did not send it).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BoxUser {
    /// The numeric user id.
    #[serde(deserialize_with = "box_id")]
    pub id: BoxId,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// `admin`, `coadmin` or `user`.
    #[serde(default)]
    pub role: Option<String>,
    /// `active`, `inactive`, `cannot_delete_edit` or `cannot_delete_edit_upload`.
    #[serde(default)]
    pub status: Option<String>,
    /// The user's enterprise (`null` for a user of none).
    #[serde(default)]
    pub enterprise: Option<Enterprise>,
    /// True for an App User.
    #[serde(default)]
    pub is_platform_access_only: Option<bool>,
    /// The customer's own id for the user.
    #[serde(default)]
    pub external_app_user_id: Option<String>,
}

/// A user's enterprise.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Enterprise {
    /// Its id.
    #[serde(deserialize_with = "box_id")]
    pub id: BoxId,
}

fn box_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BoxId, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        S(String),
        N(u64),
    }
    let text = match Id::deserialize(d)? {
        Id::S(s) => s,
        Id::N(n) => n.to_string(),
    };
    BoxId::parse(&text).map_err(|e: BoxIdError| serde::de::Error::custom(format!("{e:?}")))
}

/// `GET /2.0/users`'s answer.
#[derive(Debug, Deserialize)]
pub(crate) struct UserList {
    #[serde(default)]
    pub(crate) entries: Vec<BoxUser>,
}

/// Why a user may not be tokenized, if they may not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Their role is refused for the app (admins and co-admins by default).
    Role(String),
    /// They are not active (deactivated or locked).
    Inactive(String),
    /// They belong to another enterprise, or to none.
    OtherEnterprise(Option<BoxId>),
    /// Box did not say what is needed to decide.
    Unknown(&'static str),
}

impl BoxUser {
    /// Whether the app of enterprise `enterprise` may tokenize this user,
    /// refusing the roles in `refused_roles`.
    /// The enterprise's admin is refused whatever `refused_roles` says.
    pub fn refusal(&self, enterprise: &BoxId, refused_roles: &[String]) -> Option<Refusal> {
        let Some(role) = &self.role else {
            return Some(Refusal::Unknown("role"));
        };
        if role == "admin" || refused_roles.iter().any(|r| r == role) {
            return Some(Refusal::Role(role.clone()));
        }
        let Some(status) = &self.status else {
            return Some(Refusal::Unknown("status"));
        };
        if status != "active" {
            return Some(Refusal::Inactive(status.clone()));
        }
        match &self.enterprise {
            Some(e) if e.id == *enterprise => None,
            other => Some(Refusal::OtherEnterprise(other.as_ref().map(|e| e.id.clone()))),
        }
    }
}

/// What the broker was doing with the users API, for a diagnosis.
#[derive(Debug, Clone, Copy)]
pub enum UsersCall<'a> {
    /// Looking an external id up.
    Find(&'a str),
    /// Reading user `id` to check whether it may be tokenized.
    Read(&'a BoxId),
    /// Creating the App User for an external id.
    Create(&'a str),
    /// Asking `/2.0/users/me` with user `id`'s own token (the app may not read users).
    Me(&'a BoxId),
}

impl UsersCall<'_> {
    /// True for the calls made with the Service Account's token.
    pub fn as_service_account(&self) -> bool {
        !matches!(self, Self::Me(_))
    }
}

/// Explains a failed users-API call of the app whose client id is `client_id`.
pub fn diagnose_users(error: &BoxApiError, call: UsersCall<'_>, client_id: &str) -> Diagnosis {
    use DiagnosisKind::{Misconfigured, NotFound, Unavailable};
    let doing = match call {
        UsersCall::Find(ext) => format!("looking up the Box user with external_app_user_id {ext:?}"),
        UsersCall::Read(id) => format!("reading user {id} to check whether it may be tokenized"),
        UsersCall::Create(ext) => format!("creating the App User with external_app_user_id {ext:?}"),
        UsersCall::Me(id) => format!("asking Box who user {id}'s own token belongs to"),
    };
    let (kind, message) = match error {
        BoxApiError::Rejected(e) if e.status == 403 && matches!(call, UsersCall::Me(_)) => (
            Misconfigured,
            format!(
                "Box refused {doing} (HTTP 403 {}): check that the app may generate user access tokens",
                e.code
            ),
        ),
        BoxApiError::Rejected(e) if e.status == 403 => (
            Misconfigured,
            format!(
                "Box refused {doing}: the app (client id {client_id}) may not manage users; enable \"Manage users\" \
                 (scope manage_app_users; \"Manage enterprise users\", manage_managed_users, for Managed Users) in the \
                 Box developer console, then reauthorize the app"
            ),
        ),
        BoxApiError::Rejected(e) if e.status == 404 => {
            (NotFound, format!("Box has no such user ({doing}): {}", e.description))
        }
        BoxApiError::Rejected(e) if e.status == 409 => (
            Unavailable,
            format!("Box reported a conflict {doing} ({}); retry", e.code),
        ),
        BoxApiError::Rejected(e) if e.status == 400 => (
            Misconfigured,
            format!("Box refused {doing} as a bad request: {}", e.description),
        ),
        BoxApiError::Rejected(e) if e.status == 401 => (
            Unavailable,
            format!("Box no longer accepts the token used for {doing}; retry (the broker mints a new one)"),
        ),
        BoxApiError::RateLimited { retry_after } => {
            return Diagnosis {
                kind: Unavailable,
                message: format!("Box is rate limiting the users API (HTTP 429) while {doing}; retry later"),
                retry_after: *retry_after,
            };
        }
        BoxApiError::CircuitOpen { retry_after } => return super::error::circuit_open(*retry_after),
        BoxApiError::ServerError { status } => (
            Unavailable,
            format!("Box's users API failed (HTTP {status}) while {doing}; retry later"),
        ),
        BoxApiError::Transport { .. } => (
            Unavailable,
            format!("Box's users API could not be reached while {doing}; retry later"),
        ),
        other => (Unavailable, format!("Box's users API failed while {doing}: {other}")),
    };
    Diagnosis::new(kind, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(role: &str, status: &str, enterprise: &str) -> BoxUser {
        serde_json::from_value(serde_json::json!({
            "type": "user", "id": "42", "role": role, "status": status,
            "enterprise": {"type": "enterprise", "id": enterprise},
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn ours() -> BoxId {
        BoxId::parse("7").unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn admins_and_coadmins_are_refused_by_default_roles() {
        let refused = ["admin".to_owned(), "coadmin".to_owned()];
        assert_eq!(
            user("admin", "active", "7").refusal(&ours(), &refused),
            Some(Refusal::Role("admin".into()))
        );
        assert_eq!(
            user("coadmin", "active", "7").refusal(&ours(), &refused),
            Some(Refusal::Role("coadmin".into()))
        );
        assert_eq!(user("user", "active", "7").refusal(&ours(), &refused), None);
        assert_eq!(
            user("coadmin", "active", "7").refusal(&ours(), &["admin".to_owned()]),
            None
        );
        assert_eq!(
            user("admin", "active", "7").refusal(&ours(), &[]),
            Some(Refusal::Role("admin".into())),
            "the admin always"
        );
    }

    #[test]
    fn inactive_locked_and_foreign_users_are_refused() {
        let none: [String; 0] = [];
        assert!(matches!(
            user("user", "inactive", "7").refusal(&ours(), &none),
            Some(Refusal::Inactive(_))
        ));
        assert!(matches!(
            user("user", "cannot_delete_edit", "7").refusal(&ours(), &none),
            Some(Refusal::Inactive(_))
        ));
        assert!(matches!(
            user("user", "active", "8").refusal(&ours(), &none),
            Some(Refusal::OtherEnterprise(Some(_)))
        ));
        let bare: BoxUser = serde_json::from_value(serde_json::json!({"id": 42})).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bare.refusal(&ours(), &none), Some(Refusal::Unknown("role")));
    }
}
