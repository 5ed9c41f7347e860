//! `box-broker admin ...`: a client of a running broker's admin listener.
//! The admin API key comes from `--api-key-file` or `BOX_BROKER_ADMIN_KEY`;
//! secrets are read from files or standard input, never from arguments.

use std::{path::PathBuf, process::ExitCode};

use super::{
    EXIT_CONFIG,
    connect::{Broker, TlsArgs},
    fail, rfc3339,
};
use crate::pb::{self, broker_admin_service_client::BrokerAdminServiceClient};
use clap::{Args, Subcommand};

/// The environment variable holding the admin API key.
pub(super) const ADMIN_KEY_ENV: &str = "BOX_BROKER_ADMIN_KEY";

/// `admin` options.
#[derive(Debug, Args)]
pub(super) struct AdminArgs {
    /// The broker's admin address: host:port, http:// or https://host:port, or a
    /// Unix socket as unix:/abs/path (also unix:///abs/path) or unix:relative/path.
    #[arg(long, global = true, default_value = "127.0.0.1:50052")]
    addr: String,
    /// A file holding the admin API key (else $BOX_BROKER_ADMIN_KEY; else none, for an mTLS or Unix-socket admin).
    #[arg(long, global = true, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// The app's name in the broker's config (needed when it has several).
    #[arg(long, global = true, default_value = "")]
    app: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// Print one JSON object (times in RFC 3339) instead of text, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Client secrets.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Apps, active keys, cache size, Box's recent answers.
    Status,
    /// Drop cached tokens: all, an app's (--app), or one subject's.
    Invalidate {
        /// Only the Service Account's tokens (needs --app when there are several apps).
        #[arg(long, conflicts_with_all = ["user", "external_user"])]
        enterprise: bool,
        /// Only this user's tokens (its role and status are read again before its next token).
        #[arg(long, value_name = "ID", conflicts_with = "external_user")]
        user: Option<String>,
        /// Only the tokens of the user with this external_app_user_id (whose
        /// mapping and role are looked up again before its next token).
        #[arg(long, value_name = "EXTERNAL_ID")]
        external_user: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Generate a key pair inside the broker (pending); prints the public key to upload to Box.
    Generate {
        /// 2048, 3072 or 4096.
        #[arg(long, default_value_t = 2048)]
        bits: u32,
        /// Also write the public key PEM to this file.
        #[arg(long, value_name = "FILE")]
        public_key_out: Option<PathBuf>,
    },
    /// Import a private key made elsewhere (pending), under the kid Box assigned.
    Import {
        /// The kid (public key id) Box assigned.
        #[arg(long)]
        kid: String,
        /// The private key PEM file (the key to import; `--key-file` is the
        /// client certificate's key for mTLS).
        #[arg(long, value_name = "FILE")]
        private_key_file: PathBuf,
        /// A file holding the key's passphrase.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Switch to a key after a trial mint Box accepts.
    Activate {
        /// The kid Box assigned.
        #[arg(long)]
        kid: String,
        /// For a generated key: its fingerprint (as `keys generate` printed it, or its first 8+ hex digits).
        #[arg(long, default_value = "")]
        fingerprint: String,
    },
    /// Retire a key (never the active one).
    Retire {
        /// Its kid, or its fingerprint (or the fingerprint's first 8+ hex digits).
        kid_or_fingerprint: String,
    },
    /// List the keys.
    List,
}

#[derive(Debug, Subcommand)]
enum SecretCommand {
    /// Switch to a new client secret (read from standard input) after a trial mint.
    Rotate,
    /// Drop the previous client secrets kept as fallbacks.
    RetirePrevious,
}

fn read_file(path: &PathBuf) -> Result<String, ExitCode> {
    std::fs::read_to_string(path).map_err(|e| fail(EXIT_CONFIG, &format!("{}: cannot read: {e}", path.display())))
}

/// Runs `admin`.
pub(super) async fn run(args: AdminArgs) -> ExitCode {
    match run_inner(args).await {
        Ok(code) | Err(code) => code,
    }
}

async fn run_inner(args: AdminArgs) -> Result<ExitCode, ExitCode> {
    let (channel, key) = Broker {
        addr: &args.addr,
        what: "the admin listener",
        tls: &args.tls,
        api_key_file: args.api_key_file.as_ref(),
        api_key_env: ADMIN_KEY_ENV,
    }
    .connect()
    .await?;
    let mut client = BrokerAdminServiceClient::with_interceptor(channel, key);
    let app = args.app.clone();
    let json = args.json;
    let failed = |status: tonic::Status| {
        fail(
            1,
            &format!("{}: {}", crate::rpc::code_name(status.code()), status.message()),
        )
    };
    match args.command {
        AdminCommand::Keys(KeysCommand::Generate { bits, public_key_out }) => {
            let generated = client
                .generate_key(pb::GenerateKeyRequest { app, bits })
                .await
                .map_err(failed)?
                .into_inner();
            if let Some(out) = public_key_out {
                std::fs::write(&out, &generated.public_key_pem)
                    .map_err(|e| fail(1, &format!("{}: cannot write: {e}", out.display())))?;
            }
            if json {
                out!(
                    "{}",
                    serde_json::json!({
                        "key": generated.key.as_ref().map(key_json),
                        "public_key_pem": generated.public_key_pem,
                    })
                );
                return Ok(ExitCode::SUCCESS);
            }
            let fingerprint = generated.key.map(|k| k.fingerprint).unwrap_or_default();
            out!("fingerprint {fingerprint}");
            out!("{}", generated.public_key_pem.trim_end());
            eprintln!(
                "Upload this public key in the Box developer console (Configuration > Add and Manage Public Keys), then:\n  box-broker admin keys activate --kid <the key id Box shows> --fingerprint {fingerprint}"
            );
        }
        AdminCommand::Keys(KeysCommand::Import {
            kid,
            private_key_file,
            passphrase_file,
        }) => {
            let private_key_pem = read_file(&private_key_file)?;
            let passphrase = match &passphrase_file {
                Some(f) => read_file(f)?.trim_end_matches(['\r', '\n']).to_owned(),
                None => String::new(),
            };
            let key = client
                .import_key(pb::ImportKeyRequest {
                    app,
                    private_key_pem,
                    passphrase,
                    kid,
                })
                .await
                .map_err(failed)?
                .into_inner()
                .key;
            if json {
                out!("{}", serde_json::json!({ "key": key.as_ref().map(key_json) }));
            } else {
                print_keys(key.as_slice());
            }
        }
        AdminCommand::Keys(KeysCommand::Activate { kid, fingerprint }) => {
            let activated = client
                .activate_key(pb::ActivateKeyRequest { app, kid, fingerprint })
                .await
                .map_err(failed)?
                .into_inner();
            if json {
                out!(
                    "{}",
                    serde_json::json!({
                        "active": activated.active.as_ref().map(key_json),
                        "standby": activated.standby.as_ref().map(key_json),
                    })
                );
            } else {
                print_keys(
                    activated
                        .active
                        .iter()
                        .chain(activated.standby.iter())
                        .cloned()
                        .collect::<Vec<_>>()
                        .as_slice(),
                );
            }
        }
        AdminCommand::Keys(KeysCommand::Retire { kid_or_fingerprint }) => {
            let retired = client
                .retire_key(pb::RetireKeyRequest {
                    app,
                    kid_or_fingerprint,
                })
                .await
                .map_err(failed)?
                .into_inner();
            if json {
                out!("{}", serde_json::json!({ "key": retired.key.as_ref().map(key_json) }));
            } else {
                print_keys(retired.key.as_slice());
            }
        }
        AdminCommand::Keys(KeysCommand::List) => {
            let keys = client
                .list_keys(pb::ListKeysRequest { app })
                .await
                .map_err(failed)?
                .into_inner()
                .keys;
            if json {
                out!(
                    "{}",
                    serde_json::json!({ "keys": keys.iter().map(key_json).collect::<Vec<_>>() })
                );
            } else {
                print_keys(&keys);
            }
        }
        AdminCommand::Secret(SecretCommand::Rotate) => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| fail(1, &format!("cannot read the new secret from standard input: {e}")))?;
            let new_secret = line.trim().to_owned();
            if new_secret.is_empty() {
                return Err(fail(
                    EXIT_CONFIG,
                    "give the new client secret on standard input, e.g. box-broker admin secret rotate < secret.txt",
                ));
            }
            let rotated = client
                .rotate_client_secret(pb::RotateClientSecretRequest { app, new_secret })
                .await
                .map_err(failed)?
                .into_inner();
            if json {
                out!(
                    "{}",
                    serde_json::json!({ "fallback_secrets": rotated.fallback_secrets })
                );
            } else {
                out!(
                    "rotated; {} previous secret(s) kept as fallback until `admin secret retire-previous`",
                    rotated.fallback_secrets
                );
            }
        }
        AdminCommand::Secret(SecretCommand::RetirePrevious) => {
            let retired = client
                .retire_client_secrets(pb::RetireClientSecretsRequest { app })
                .await
                .map_err(failed)?
                .into_inner();
            if json {
                out!("{}", serde_json::json!({ "retired": retired.retired }));
            } else {
                out!("retired {} previous secret(s)", retired.retired);
            }
        }
        AdminCommand::Status => {
            let status = client
                .get_status(pb::GetStatusRequest {})
                .await
                .map_err(failed)?
                .into_inner();
            if json {
                out!("{}", status_json(&status));
                return Ok(ExitCode::SUCCESS);
            }
            out!(
                "cached tokens: {}; key store: {}",
                status.cached_tokens,
                if status.key_store {
                    "configured"
                } else {
                    "NOT configured"
                }
            );
            if let Some(redis) = &status.redis {
                out!(
                    "redis: {} at {} (namespace {}; {} hits, {} misses; notices {} sent, {} received{}){}",
                    redis.state,
                    redis.server,
                    redis.namespace,
                    redis.hits,
                    redis.misses,
                    redis.notices_sent,
                    redis.notices_received,
                    if redis.master_switches == 0 {
                        String::new()
                    } else {
                        format!("; master switched {} times", redis.master_switches)
                    },
                    if redis.last_error.is_empty() {
                        String::new()
                    } else {
                        format!("; last error: {}", redis.last_error)
                    }
                );
            }
            for a in status.apps {
                let key = a.active_key.map_or_else(
                    || "-".to_owned(),
                    |k| format!("{} ({} bits, sha256 {})", k.kid, k.bits, k.fingerprint),
                );
                let when =
                    |t: Option<prost_types::Timestamp>| rfc3339(t.as_ref()).unwrap_or_else(|| "never".to_owned());
                out!(
                    "app {}: {}; active key {key}; {} key(s); {} fallback secret(s); standby fallbacks {}; last Box success {}; last failure {}{}",
                    a.name,
                    a.auth,
                    a.keys,
                    a.fallback_secrets,
                    a.standby_fallbacks,
                    when(a.last_upstream_success_at),
                    when(a.last_upstream_failure_at),
                    if a.last_upstream_failure.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", a.last_upstream_failure)
                    }
                );
            }
        }
        AdminCommand::Invalidate {
            enterprise,
            user,
            external_user,
        } => {
            let kind = match (enterprise, user, external_user) {
                (true, _, _) => Some(pb::subject::Kind::Enterprise(pb::EnterpriseSubject {})),
                (false, Some(id), _) => Some(pb::subject::Kind::UserId(id)),
                (false, None, Some(id)) => Some(pb::subject::Kind::ExternalAppUserId(id)),
                (false, None, None) => None,
            };
            let subject = kind.map(|kind| pb::Subject {
                kind: Some(kind),
                create_if_missing: None,
            });
            let dropped = client
                .invalidate_tokens(pb::InvalidateTokensRequest { app, subject })
                .await
                .map_err(failed)?
                .into_inner();
            if json {
                out!("{}", serde_json::json!({ "invalidated": dropped.invalidated }));
            } else {
                out!("invalidated {} cached token(s)", dropped.invalidated);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A key state's name.
fn state_name(state: i32) -> &'static str {
    pb::KeyState::try_from(state).map_or("unknown", |s| match s {
        pb::KeyState::Pending => "pending",
        pb::KeyState::Active => "active",
        pb::KeyState::Standby => "standby",
        pb::KeyState::Retired => "retired",
        pb::KeyState::Unspecified => "unspecified",
    })
}

fn key_json(k: &pb::KeyInfo) -> serde_json::Value {
    serde_json::json!({
        "kid": k.kid,
        "fingerprint": k.fingerprint,
        "state": state_name(k.state),
        "algorithm": k.algorithm,
        "bits": k.bits,
        "origin": k.origin,
        "created_at": rfc3339(k.created_at.as_ref()),
        "last_used_at": rfc3339(k.last_used_at.as_ref()),
    })
}

fn status_json(status: &pb::GetStatusResponse) -> serde_json::Value {
    let apps: Vec<_> = status
        .apps
        .iter()
        .map(|a| {
            serde_json::json!({
                "name": a.name,
                "auth": a.auth,
                "active_key": a.active_key.as_ref().map(key_json),
                "keys": a.keys,
                "fallback_secrets": a.fallback_secrets,
                "standby_fallbacks": a.standby_fallbacks,
                "last_upstream_success_at": rfc3339(a.last_upstream_success_at.as_ref()),
                "last_upstream_failure_at": rfc3339(a.last_upstream_failure_at.as_ref()),
                "last_upstream_failure": a.last_upstream_failure,
            })
        })
        .collect();
    serde_json::json!({
        "cached_tokens": status.cached_tokens,
        "key_store": status.key_store,
        "redis": status.redis.as_ref().map(|r| serde_json::json!({
            "state": r.state,
            "namespace": r.namespace,
            "last_error": r.last_error,
            "hits": r.hits,
            "misses": r.misses,
            "notices_sent": r.notices_sent,
            "notices_received": r.notices_received,
        })),
        "apps": apps,
    })
}

fn print_keys(keys: &[pb::KeyInfo]) {
    for k in keys {
        let state = state_name(k.state);
        out!(
            "{state:<8} kid {:<12} {} {} bits  sha256 {}  {}  last used {}",
            if k.kid.is_empty() { "(none yet)" } else { &k.kid },
            k.algorithm,
            k.bits,
            k.fingerprint,
            k.origin,
            rfc3339(k.last_used_at.as_ref()).unwrap_or_else(|| "never".to_owned()),
        );
    }
}
