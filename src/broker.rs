//! The broker's domain core: the configured apps, the token cache, and the
//! one operation of this slice, "give me a token for this subject".
//!
//! Data flows one way: request -> app lookup -> cache -> (mint via boxapi) ->
//! cache -> response. Nothing here knows gRPC.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures_util::future::{BoxFuture, FutureExt as _};

use crate::{
    boxapi::{
        AppCredentials, AuthMethod, BoxClient, BoxId, BoxSubject, IssuedToken, error::diagnose,
    },
    cache::{CachePolicy, Lookup, Minter, Need, TokenCache, TokenKey},
    clock::{SharedClock, unix_seconds},
    error::{BrokerError, UpstreamError},
};

/// The longest `min_ttl` a caller may ask for. Box's tokens live about an
/// hour; asking for more than this can never be met, so it is refused up front.
pub const MAX_MIN_TTL: Duration = Duration::from_secs(50 * 60);

/// One configured Box app.
#[derive(Debug)]
pub struct App {
    /// Its name in the config (`[apps.NAME]`).
    pub name: Arc<str>,
    /// Its credentials.
    pub credentials: AppCredentials,
    /// The client of its Box API base URL.
    pub client: BoxClient,
}

impl App {
    /// How the app authenticates, for status and logs.
    pub fn auth_summary(&self) -> String {
        match &self.credentials.auth {
            AuthMethod::Jwt { key, algorithm } => {
                format!(
                    "JWT {algorithm:?}, key {} ({} bits, sha256 {}…)",
                    key.kid(),
                    key.bits(),
                    &key.fingerprint()[..16]
                )
            }
            AuthMethod::Ccg => "Client Credentials Grant".to_owned(),
        }
    }
}

/// Whose token a caller wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// The app's Service Account.
    Enterprise,
    /// An App User or Managed User.
    User(BoxId),
}

/// A validated `GetToken`.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// The app's name; `None` when the caller left it empty.
    pub app: Option<String>,
    /// Whose token.
    pub subject: Subject,
    /// Remaining life needed beyond the safety margin.
    pub min_ttl: Duration,
    /// Mint anew, ignoring the cache.
    pub force_refresh: bool,
}

/// The apps by name; mints tokens for the cache.
#[derive(Debug)]
struct Apps(BTreeMap<Arc<str>, Arc<App>>);

impl Minter for Apps {
    fn mint(&self, key: &TokenKey) -> BoxFuture<'static, Result<IssuedToken, UpstreamError>> {
        let app = self.0.get(&key.app).cloned();
        let key = key.clone();
        async move {
            let Some(app) = app else {
                // Keys are built from resolved apps, so this cannot happen.
                return Err(UpstreamError {
                    app: key.app.clone(),
                    subject: key.subject.clone(),
                    diagnosis: crate::boxapi::Diagnosis {
                        kind: crate::boxapi::DiagnosisKind::Misconfigured,
                        message: format!("app {} is not configured", key.app),
                        retry_after: None,
                    },
                });
            };
            let result = app
                .client
                .request_token(&app.credentials, &key.subject)
                .await;
            match result {
                Ok(token) => {
                    tracing::info!(
                        app = %app.name,
                        subject_type = key.subject.sub_type(),
                        subject_id = %key.subject.id(),
                        expires_at = unix_seconds(token.expires_at),
                        box_request_id = token.request_id.as_deref().unwrap_or(""),
                        "minted a Box token"
                    );
                    Ok(token)
                }
                Err(error) => {
                    let (kid, ccg) = match &app.credentials.auth {
                        AuthMethod::Jwt { key, .. } => (Some(key.kid()), false),
                        AuthMethod::Ccg => (None, true),
                    };
                    let diagnosis =
                        diagnose(&error, &key.subject, &app.credentials.client_id, kid, ccg);
                    // The one place an upstream failure is logged in full.
                    tracing::warn!(
                        app = %app.name,
                        subject_type = key.subject.sub_type(),
                        subject_id = %key.subject.id(),
                        error = %error,
                        "minting a Box token failed: {}",
                        diagnosis.message
                    );
                    Err(UpstreamError {
                        app: app.name.clone(),
                        subject: key.subject,
                        diagnosis,
                    })
                }
            }
        }
        .boxed()
    }
}

/// The broker: apps plus cache.
#[derive(Debug)]
pub struct Broker {
    apps: Arc<Apps>,
    cache: TokenCache,
    clock: SharedClock,
}

impl Broker {
    /// A broker over `apps` (at least one), caching with `policy`.
    pub fn new(apps: Vec<App>, clock: SharedClock, policy: CachePolicy) -> Self {
        let apps = Arc::new(Apps(
            apps.into_iter()
                .map(|a| (a.name.clone(), Arc::new(a)))
                .collect(),
        ));
        let cache = TokenCache::new(apps.clone(), clock.clone(), policy);
        Self { apps, cache, clock }
    }

    /// The configured app names, sorted.
    pub fn app_names(&self) -> Vec<String> {
        self.apps.0.keys().map(|k| k.to_string()).collect()
    }

    /// The configured apps.
    pub fn apps(&self) -> impl Iterator<Item = &Arc<App>> {
        self.apps.0.values()
    }

    /// The token cache.
    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// Resolves a requested app name; `None` means "the only one".
    pub fn resolve_app(&self, name: Option<&str>) -> Result<&Arc<App>, BrokerError> {
        match name {
            Some(name) => self
                .apps
                .0
                .get(name)
                .ok_or_else(|| BrokerError::UnknownApp {
                    name: name.chars().filter(|c| !c.is_control()).take(64).collect(),
                    configured: self.app_names(),
                }),
            None if self.apps.0.len() == 1 => self
                .apps
                .0
                .values()
                .next()
                .ok_or_else(|| BrokerError::AppRequired { configured: vec![] }),
            None => Err(BrokerError::AppRequired {
                configured: self.app_names(),
            }),
        }
    }

    /// A token for the request's subject, from the cache or minted.
    pub async fn get_token(&self, request: &TokenRequest) -> Result<Lookup, BrokerError> {
        if request.min_ttl > MAX_MIN_TTL {
            return Err(BrokerError::InvalidArgument(format!(
                "min_ttl of {} s exceeds the maximum of {} s: Box tokens live about an hour",
                request.min_ttl.as_secs(),
                MAX_MIN_TTL.as_secs()
            )));
        }
        let app = self.resolve_app(request.app.as_deref())?;
        let subject = match &request.subject {
            Subject::Enterprise => BoxSubject::Enterprise(app.credentials.enterprise_id.clone()),
            Subject::User(id) => BoxSubject::User(id.clone()),
        };
        let key = TokenKey {
            app: app.name.clone(),
            subject,
        };
        let need = Need {
            min_ttl: request.min_ttl,
            minted_since: request.force_refresh.then(|| self.clock.now()),
        };
        Ok(self.cache.get(&key, need).await?)
    }
}
