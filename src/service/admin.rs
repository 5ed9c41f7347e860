//! The `BrokerAdminService` adapter: check the admin rules for the caller
//! the gate authenticated, run the operation, audit it. Served only on
//! admin listeners.
//!
//! Rules are checked against the app a request *resolves to*: an empty
//! `app` means the only configured app (or is refused when there are
//! several), so a rule scoped to app `b` never lets an empty name reach app
//! `a`. An RPC that touches every app (`InvalidateTokens` with no app and
//! no subject) needs a grant for every app; `GetStatus` shows only the apps
//! the caller is granted.

use std::{future::Future, sync::Arc};

use secrecy::SecretString;
use tonic::{Code, Request, Response, Status};

use super::status::detailed;
use crate::{
    admin::{AdminRules, KeyAdmin},
    audit::{AuditEvent, AuditSink},
    keys::{KeyEntry, KeyState},
    pb::{self, broker_admin_service_server::BrokerAdminService},
    rpc::{Rpc, code_name},
    service::broker::{parse_subject, timestamp},
};

/// The gRPC adapter over [`KeyAdmin`].
#[derive(Debug, Clone)]
pub struct BrokerAdminApi {
    admin: Arc<KeyAdmin>,
    rules: Arc<AdminRules>,
    audit: Arc<AuditSink>,
}

/// Which apps an admin request touches.
#[derive(Debug, Clone, Copy)]
enum Apps<'a> {
    /// The named app, or the only one when the name is empty.
    One(&'a str),
    /// Every configured app.
    All,
    /// Whichever apps the caller is granted (a read-only overview).
    Granted,
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
    /// An adapter admitting admin callers per `rules`, auditing to `audit`.
    pub fn new(admin: Arc<KeyAdmin>, rules: AdminRules, audit: Arc<AuditSink>) -> Self {
        Self {
            admin,
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

    /// The configured names of the apps `apps` touches, if `caller` may
    /// call `rpc` for every one of them.
    fn authorize(&self, caller: &str, rpc: &str, apps: Apps<'_>) -> Result<Vec<String>, Status> {
        let broker = self.admin.broker();
        let denied = |reason: String| {
            detailed(
                Code::PermissionDenied,
                format!("denied: {reason}"),
                "ADMIN_DENIED",
                &[],
                None,
            )
        };
        if !self.rules.allows_some(caller, rpc) {
            return Err(denied(format!(
                "admin identity {caller:?} may not call {rpc} (no [[admin.rules]] grants it)"
            )));
        }
        match apps {
            Apps::One(name) => {
                let app = match broker.resolve_app((!name.is_empty()).then_some(name)) {
                    Ok(app) => app.name.to_string(),
                    // Name only the apps this caller may ask about.
                    Err(_) if name.is_empty() => {
                        return Err(detailed(
                            Code::InvalidArgument,
                            format!(
                                "app is required because several apps are configured; name one you may use: {}",
                                self.granted(caller, rpc).join(", ")
                            ),
                            "APP_REQUIRED",
                            &[],
                            None,
                        ));
                    }
                    Err(e) => {
                        self.rules.allows(caller, rpc, name).map_err(denied)?;
                        return Err(Status::from(e));
                    }
                };
                self.rules.allows(caller, rpc, &app).map_err(denied)?;
                Ok(vec![app])
            }
            Apps::All => {
                let all = broker.app_names();
                for app in &all {
                    self.rules
                        .allows(caller, rpc, app)
                        .map_err(|reason| denied(format!("{reason}; without an app, {rpc} touches every app")))?;
                }
                Ok(all)
            }
            Apps::Granted => Ok(self.granted(caller, rpc)),
        }
    }

    /// The configured apps `caller` may call `rpc` for.
    fn granted(&self, caller: &str, rpc: &str) -> Vec<String> {
        self.admin
            .broker()
            .app_names()
            .into_iter()
            .filter(|app| self.rules.allows(caller, rpc, app).is_ok())
            .collect()
    }

    /// Checks the rules for the gate's caller and the apps the request
    /// touches, runs `handle` with their names, and audits the outcome.
    async fn call<T, R, F>(
        &self,
        rpc: Rpc,
        apps: impl FnOnce(&T) -> Apps<'_>,
        request: Request<T>,
        handle: impl FnOnce(T, Vec<String>) -> F,
    ) -> Result<Response<R>, Status>
    where
        F: Future<Output = Result<R, Status>>,
    {
        let context = super::broker::context(&request)?;
        let caller = &context.caller;
        let mut event = AuditEvent {
            rpc,
            caller: caller.shared_name(),
            request_id: Some(context.request_id),
            ..AuditEvent::default()
        };
        let message = request.into_inner();
        let result = match self.authorize(caller.name(), rpc.name(), apps(&message)) {
            Err(status) => Err(status),
            Ok(names) => {
                if let [one] = names.as_slice() {
                    event.app = one.as_str().into();
                }
                handle(message, names).await
            }
        };
        if result.is_err() {
            event.peer = Some(context.peer.to_string().into());
        }
        super::record_outcome(&mut event, result.as_ref().map(|_| ()));
        if self.audit.record(&event)
            && let Err(status) = &result
        {
            tracing::info!(
                rpc = rpc.name(),
                code = code_name(status.code()),
                reason = status.message(),
                "admin call refused"
            );
        }
        result.map(Response::new)
    }
}

/// The one app a request was authorized for.
fn one(names: &[String]) -> &str {
    names.first().map_or("", String::as_str)
}

#[tonic::async_trait]
impl BrokerAdminService for BrokerAdminApi {
    async fn generate_key(
        &self,
        request: Request<pb::GenerateKeyRequest>,
    ) -> Result<Response<pb::GenerateKeyResponse>, Status> {
        self.call(
            Rpc::GenerateKey,
            |m| Apps::One(&m.app),
            request,
            |m, names| async move {
                let bits = usize::try_from(m.bits).unwrap_or(usize::MAX);
                let generated = self.admin.generate(one(&names), bits).await?;
                Ok(pb::GenerateKeyResponse {
                    key: Some(key_info(&generated.key, self.algorithm(one(&names)))),
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
            Rpc::ImportKey,
            |m| Apps::One(&m.app),
            request,
            |m, names| async move {
                let pem = SecretString::from(m.private_key_pem);
                let passphrase = (!m.passphrase.is_empty()).then(|| SecretString::from(m.passphrase));
                let key = self
                    .admin
                    .import(one(&names), &pem, passphrase.as_ref(), &m.kid)
                    .await?;
                Ok(pb::ImportKeyResponse {
                    key: Some(key_info(&key, self.algorithm(one(&names)))),
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
            Rpc::ActivateKey,
            |m| Apps::One(&m.app),
            request,
            |m, names| async move {
                let (active, standby) = self.admin.activate(one(&names), &m.kid, &m.fingerprint).await?;
                let algorithm = self.algorithm(one(&names));
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
            Rpc::RetireKey,
            |m| Apps::One(&m.app),
            request,
            |m, names| async move {
                let key = self.admin.retire(one(&names), &m.kid_or_fingerprint).await?;
                Ok(pb::RetireKeyResponse {
                    key: Some(key_info(&key, self.algorithm(one(&names)))),
                })
            },
        )
        .await
    }

    async fn list_keys(&self, request: Request<pb::ListKeysRequest>) -> Result<Response<pb::ListKeysResponse>, Status> {
        self.call(
            Rpc::ListKeys,
            |m| Apps::One(&m.app),
            request,
            |_, names| async move {
                let algorithm = self.algorithm(one(&names));
                let keys = self.admin.list(one(&names))?;
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
            Rpc::RotateClientSecret,
            |m| Apps::One(&m.app),
            request,
            |m, names| async move {
                let fallbacks = self
                    .admin
                    .rotate_secret(one(&names), SecretString::from(m.new_secret))
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
            Rpc::RetireClientSecrets,
            |m| Apps::One(&m.app),
            request,
            |_, names| async move {
                let retired = self.admin.retire_secrets(one(&names)).await?;
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
            Rpc::InvalidateTokens,
            |m| {
                if m.app.is_empty() && m.subject.is_none() {
                    Apps::All
                } else {
                    Apps::One(&m.app)
                }
            },
            request,
            |m, names| async move {
                let subject = match &m.subject {
                    Some(s) => Some(parse_subject(Some(s)).map_err(Status::from)?),
                    None => None,
                };
                let app = if m.app.is_empty() && subject.is_none() {
                    ""
                } else {
                    one(&names)
                };
                let dropped = self.admin.invalidate(app, subject.as_ref()).await?;
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
            Rpc::GetStatus,
            |_| Apps::Granted,
            request,
            |_, names| async move {
                let broker = self.admin.broker();
                let all = names.len() == broker.app_names().len();
                let apps = broker
                    .apps()
                    .filter(|app| names.iter().any(|n| **n == *app.name))
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
                    cached_tokens: if all {
                        broker.cache().count().await
                    } else {
                        broker.cache().count_where(|key| names.iter().any(|n| **n == *key.app)) as u64
                    },
                    key_store: self.admin.has_store(),
                    redis: broker.fleet().map(|fleet| {
                        let c = fleet.counters();
                        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                        pb::RedisStatus {
                            state: fleet.state().to_owned(),
                            namespace: fleet.namespace().to_owned(),
                            last_error: fleet.last_error().unwrap_or_default(),
                            hits: load(&c.hits),
                            misses: load(&c.misses),
                            notices_sent: load(&c.notices_sent),
                            notices_received: load(&c.notices_received),
                            server: fleet.server(),
                            master_switches: fleet.master_switches(),
                        }
                    }),
                })
            },
        )
        .await
    }
}
