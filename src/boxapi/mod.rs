//! Everything that speaks Box's HTTP API: credentials, the JWT assertion, the
//! `/oauth2/token` client and the diagnosis of its errors.
//!
//! This module knows nothing of gRPC, caching or policy.

pub mod assertion;
pub mod client;
pub mod credentials;
pub mod downscope;
pub mod error;
pub mod private_key;
pub mod users;

pub use client::{BoxClient, IssuedToken};
pub use credentials::{
    AppCredentials, AuthMethod, BoxId, CredentialError, CredentialSources, JwtAlgorithm, SigningKey,
};
pub use downscope::{Downscope, Restriction, Target};
pub use error::{BoxApiError, Diagnosis, DiagnosisKind};
pub use users::{BoxUser, ExternalUser};

/// Whose token to ask Box for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BoxSubject {
    /// The app's Service Account in this enterprise.
    Enterprise(BoxId),
    /// An App User or Managed User.
    User(BoxId),
}

impl BoxSubject {
    /// The assertion's `box_sub_type` / CCG `box_subject_type`.
    pub fn sub_type(&self) -> &'static str {
        match self {
            Self::Enterprise(_) => "enterprise",
            Self::User(_) => "user",
        }
    }

    /// The assertion's `sub` / CCG `box_subject_id`.
    pub fn id(&self) -> &BoxId {
        match self {
            Self::Enterprise(id) | Self::User(id) => id,
        }
    }
}

impl std::fmt::Display for BoxSubject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Enterprise(id) => write!(f, "the Service Account of enterprise {id}"),
            Self::User(id) => write!(f, "user {id}"),
        }
    }
}
