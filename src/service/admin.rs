//! The `BrokerAdminService` adapter: authenticate the admin caller, check the
//! admin rules, run the operation, audit it. Served only on admin listeners.

use std::{future::Future, sync::Arc};

use secrecy::SecretString;
use tonic::{Request, Response, Status};

use crate::{
    admin::{AdminError, AdminRules, KeyAdmin},
    audit::{AuditEvent, AuditSink},
    auth::Authenticator,
    keys::{KeyEntry, KeyState},
    pb::{self, broker_admin_service_server::BrokerAdminService},
    service::broker::{parse_subject, timestamp},
};

/// The gRPC adapter over [`KeyAdmin`].
#[derive(Debug, Clone)]
pub struct BrokerAdminApi {
    admin: Arc<KeyAdmin>,
    auth: Authenticator,
    rules: Arc<AdminRules>,
    audit: Arc<AuditSink>,
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Self {
        match &e {
            AdminError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
            AdminError::NotFound(_) => Status::not_found(e.to_string()),
            AdminError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
            AdminError::Store(_) => Status::internal(e.to_string()),
        }
    }
}

/// The protobuf description of a key: never private material.
fn key_info(key: &KeyEntry, algorithm: Option<crate::boxapi::JwtAlgorithm>) -> pb::KeyInfo {
    pb::KeyInfo {
        kid: key.kid.clone().unwrap_or_default(),
        fingerprint: key.fingerprint.clone(),
        algorithm: algorithm.map(|a| format!("{a:?}")).unwrap_or_default(),
        bits: u32::try_from(key.bits).unwrap_or(u32::MAX),
        created_at: Some(timestamp(key.created)),
        state: match key.state {
            KeyState::Pending => pb::KeyState::Pending,
            KeyState::Active => pb::KeyState::Active,
            KeyState::Standby => pb::KeyState::Standby,
            KeyState::Retired => pb::KeyState::Retired,
        }
        .into(),
        last_used_at: key.last_used_at().map(timestamp),
        origin: key.origin.name().to_owned(),
    }
}

impl BrokerAdminApi {
    /// An adapter admitting admin callers per `auth` and `rules`, auditing to `audit`.
    pub fn new(admin: Arc<KeyAdmin>, auth: Authenticator, rules: AdminRules, audit: Arc<AuditSink>) -> Self {
        Self {
            admin,
            auth,
            rules: Arc::new(rules),
            audit,
        }
    }

    fn algorithm(&self, app: &str) -> Option<crate::boxapi::JwtAlgorithm> {
        self.admin
            .broker()
            .resolve_app((!app.is_empty()).then_some(app))
            .ok()
            .and_then(|a| a.ring().identity.algorithm)
    }

    /// Authenticates, checks the rules, runs `handle`, and audits the outcome.
    async fn call<T, R, F>(
        &self,
        rpc: &'static str,
        app: impl FnOnce(&T) -> String,
        request: Request<T>,
        handle: impl FnOnce(T) -> F,
    ) -> Result<Response<R>, Status>
    where
        F: Future<Output = Result<R, Status>>,
    {
        let mut event = AuditEvent {
            rpc,
            caller: "unauthenticated".into(),
            ..AuditEvent::default()
        };
        let result = match self.auth.authenticate(&request).await {
            Err(e) => Err(Status::from(e)),
            Ok(caller) => {
                event.caller = caller.shared_name();
                let message = request.into_inner();
                let app = app(&message);
                event.app = app.as_str().into();
                match self.rules.allows(caller.name(), rpc, &app) {
                    Err(reason) => Err(Status::permission_denied(format!("denied: {reason}"))),
                    Ok(()) => handle(message).await,
                }
            }
        };
        if let Err(status) = &result {
            tracing::info!(rpc, code = ?status.code(), reason = status.message(), "admin call refused");
        }
        super::record_outcome(&mut event, result.as_ref().map(|_| ()));
        self.audit.record(&event);
        result.map(Response::new)
    }
}

#[tonic::async_trait]
impl BrokerAdminService for BrokerAdminApi {
    async fn generate_key(
        &self,
        request: Request<pb::GenerateKeyRequest>,
    ) -> Result<Response<pb::GenerateKeyResponse>, Status> {
        self.call(
            "GenerateKey",
            |m| m.app.clone(),
            request,
            |m| async move {
                let bits = usize::try_from(m.bits).unwrap_or(usize::MAX);
                let generated = self.admin.generate(&m.app, bits).await?;
                Ok(pb::GenerateKeyResponse {
                    key: Some(key_info(&generated.key, self.algorithm(&m.app))),
                    public_key_pem: generated.public_key_pem,
                })
            },
        )
        .await
    }

    async fn import_key(
        &self,
        request: Request<pb::ImportKeyRequest>,
    ) -> Result<Response<pb::ImportKeyResponse>, Status> {
        self.call(
            "ImportKey",
            |m| m.app.clone(),
            request,
            |m| async move {
                let pem = SecretString::from(m.private_key_pem);
                let passphrase = (!m.passphrase.is_empty()).then(|| SecretString::from(m.passphrase));
                let key = self.admin.import(&m.app, &pem, passphrase.as_ref(), &m.kid).await?;
                Ok(pb::ImportKeyResponse {
                    key: Some(key_info(&key, self.algorithm(&m.app))),
                })
            },
        )
        .await
    }

    async fn activate_key(
        &self,
        request: Request<pb::ActivateKeyRequest>,
    ) -> Result<Response<pb::ActivateKeyResponse>, Status> {
        self.call(
            "ActivateKey",
            |m| m.app.clone(),
            request,
            |m| async move {
                let (active, standby) = self.admin.activate(&m.app, &m.kid, &m.fingerprint).await?;
                let algorithm = self.algorithm(&m.app);
                Ok(pb::ActivateKeyResponse {
                    active: Some(key_info(&active, algorithm)),
                    standby: standby.as_ref().map(|k| key_info(k, algorithm)),
                })
            },
        )
        .await
    }

    async fn retire_key(
        &self,
        request: Request<pb::RetireKeyRequest>,
    ) -> Result<Response<pb::RetireKeyResponse>, Status> {
        self.call(
            "RetireKey",
            |m| m.app.clone(),
            request,
            |m| async move {
                let key = self.admin.retire(&m.app, &m.kid_or_fingerprint).await?;
                Ok(pb::RetireKeyResponse {
                    key: Some(key_info(&key, self.algorithm(&m.app))),
                })
            },
        )
        .await
    }

    async fn list_keys(&self, request: Request<pb::ListKeysRequest>) -> Result<Response<pb::ListKeysResponse>, Status> {
        self.call(
            "ListKeys",
            |m| m.app.clone(),
            request,
            |m| async move {
                let algorithm = self.algorithm(&m.app);
                let keys = self.admin.list(&m.app)?;
                Ok(pb::ListKeysResponse {
                    keys: keys.iter().map(|k| key_info(k, algorithm)).collect(),
                })
            },
        )
        .await
    }

    async fn rotate_client_secret(
        &self,
        request: Request<pb::RotateClientSecretRequest>,
    ) -> Result<Response<pb::RotateClientSecretResponse>, Status> {
        self.call(
            "RotateClientSecret",
            |m| m.app.clone(),
            request,
            |m| async move {
                let fallbacks = self
                    .admin
                    .rotate_secret(&m.app, SecretString::from(m.new_secret))
                    .await?;
                Ok(pb::RotateClientSecretResponse {
                    fallback_secrets: u32::try_from(fallbacks).unwrap_or(u32::MAX),
                })
            },
        )
        .await
    }

    async fn retire_client_secrets(
        &self,
        request: Request<pb::RetireClientSecretsRequest>,
    ) -> Result<Response<pb::RetireClientSecretsResponse>, Status> {
        self.call(
            "RetireClientSecrets",
            |m| m.app.clone(),
            request,
            |m| async move {
                let retired = self.admin.retire_secrets(&m.app).await?;
                Ok(pb::RetireClientSecretsResponse {
                    retired: u32::try_from(retired).unwrap_or(u32::MAX),
                })
            },
        )
        .await
    }

    async fn invalidate_tokens(
        &self,
        request: Request<pb::InvalidateTokensRequest>,
    ) -> Result<Response<pb::InvalidateTokensResponse>, Status> {
        self.call(
            "InvalidateTokens",
            |m| m.app.clone(),
            request,
            |m| async move {
                let subject = match &m.subject {
                    Some(s) => Some(parse_subject(Some(s)).map_err(Status::from)?),
                    None => None,
                };
                let dropped = self.admin.invalidate(&m.app, subject.as_ref()).await?;
                Ok(pb::InvalidateTokensResponse {
                    invalidated: dropped as u64,
                })
            },
        )
        .await
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        self.call(
            "GetStatus",
            |_| String::new(),
            request,
            |_| async move {
                let broker = self.admin.broker();
                let apps = broker
                    .apps()
                    .map(|app| {
                        let ring = app.ring();
                        let health = app.health();
                        pb::AppStatus {
                            name: app.name.to_string(),
                            auth: if ring.identity.algorithm.is_some() {
                                "jwt"
                            } else {
                                "ccg"
                            }
                            .to_owned(),
                            active_key: ring
                                .key_in(KeyState::Active)
                                .map(|k| key_info(k, ring.identity.algorithm)),
                            keys: u32::try_from(ring.keys.len()).unwrap_or(u32::MAX),
                            fallback_secrets: u32::try_from(ring.secrets.len().saturating_sub(1)).unwrap_or(u32::MAX),
                            last_upstream_success_at: health.last_success.map(timestamp),
                            last_upstream_failure_at: health.last_failure.map(timestamp),
                            last_upstream_failure: health.last_failure_message,
                            standby_fallbacks: app.standby_fallbacks(),
                        }
                    })
                    .collect();
                Ok(pb::GetStatusResponse {
                    apps,
                    cached_tokens: broker.cache().count().await,
                    key_store: self.admin.has_store(),
                })
            },
        )
        .await
    }
}
