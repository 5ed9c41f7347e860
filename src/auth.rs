//! Who is calling. This slice knows one mechanism: the anonymous caller, which
//! is refused unless the config explicitly allows it (dev mode does, and says
//! so). mTLS, Kubernetes service-account tokens, API keys and Unix-socket
//! peers arrive with the policy work.

use std::fmt;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerIdentity {
    /// No credentials; allowed only by `[server] allow_anonymous = true`.
    Anonymous,
}

impl fmt::Display for CallerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Anonymous => f.write_str("anonymous"),
        }
    }
}

/// Decides who a request comes from.
#[derive(Debug, Clone, Copy)]
pub struct Authenticator {
    allow_anonymous: bool,
}

/// The caller could not be authenticated. The message never echoes a credential.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

impl Authenticator {
    /// An authenticator; `allow_anonymous` admits callers without credentials.
    pub fn new(allow_anonymous: bool) -> Self {
        Self { allow_anonymous }
    }

    /// True when callers without credentials are admitted.
    pub fn allows_anonymous(&self) -> bool {
        self.allow_anonymous
    }

    /// Identifies the caller of `request`.
    pub fn authenticate<T>(
        &self,
        _request: &tonic::Request<T>,
    ) -> Result<CallerIdentity, AuthError> {
        if self.allow_anonymous {
            Ok(CallerIdentity::Anonymous)
        } else {
            Err(AuthError(
                "this broker admits no anonymous callers and no other caller authentication is configured; \
                 set [server] allow_anonymous = true only for development"
                    .to_owned(),
            ))
        }
    }
}
