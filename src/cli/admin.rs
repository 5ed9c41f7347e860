//! `box-broker admin ...`: a client of a running broker's admin listener.
//! The admin API key comes from `--api-key-file` or `BOX_BROKER_ADMIN_KEY`;
//! secrets are read from files or standard input, never from arguments.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand};
use tonic::{metadata::MetadataValue, transport::Channel};

use super::{EXIT_CONFIG, fail};
use crate::pb::{self, broker_admin_service_client::BrokerAdminServiceClient};

/// The environment variable holding the admin API key.
pub const ADMIN_KEY_ENV: &str = "BOX_BROKER_ADMIN_KEY";

/// `admin` options.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The broker's admin address.
    #[arg(long, global = true, default_value = "http://127.0.0.1:50052")]
    addr: String,
    /// A file holding the admin API key (else $BOX_BROKER_ADMIN_KEY; else none, for an mTLS or Unix-socket admin).
    #[arg(long, global = true, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// The app's name in the broker's config (needed when it has several).
    #[arg(long, global = true, default_value = "")]
    app: String,
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
        #[arg(long, conflicts_with = "user")]
        enterprise: bool,
        /// Only this user's tokens.
        #[arg(long, value_name = "ID")]
        user: Option<String>,
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
        /// The private key PEM file.
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
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
pub async fn run(args: AdminArgs) -> ExitCode {
    match run_inner(args).await {
        Ok(code) | Err(code) => code,
    }
}

async fn run_inner(args: AdminArgs) -> Result<ExitCode, ExitCode> {
    let key = match &args.api_key_file {
        Some(file) => Some(read_file(file)?.trim().to_owned()),
        None => std::env::var(ADMIN_KEY_ENV).ok().filter(|k| !k.is_empty()),
    };
    let addr = if args.addr.contains("://") {
        args.addr.clone()
    } else {
        format!("http://{}", args.addr)
    };
    let channel = Channel::from_shared(addr.clone())
        .map_err(|e| fail(EXIT_CONFIG, &format!("{addr} is not an address: {e}")))?
        .connect()
        .await
        .map_err(|e| fail(1, &format!("cannot connect to the admin listener at {addr}: {e}")))?;
    let key = match key {
        Some(k) => Some(
            MetadataValue::try_from(k.as_str())
                .map_err(|_| fail(EXIT_CONFIG, "the admin API key holds characters a header cannot"))?,
        ),
        None => None,
    };
    let mut client = BrokerAdminServiceClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
        if let Some(key) = &key {
            request.metadata_mut().insert(crate::auth::API_KEY_HEADER, key.clone());
        }
        Ok(request)
    });
    let app = args.app.clone();
    let failed = |status: tonic::Status| fail(1, &format!("{:?}: {}", status.code(), status.message()));
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
            let fingerprint = generated.key.map(|k| k.fingerprint).unwrap_or_default();
            out!("fingerprint {fingerprint}");
            out!("{}", generated.public_key_pem.trim_end());
            eprintln!(
                "Upload this public key in the Box developer console (Configuration > Add and Manage Public Keys), then:\n  box-broker admin keys activate --kid <the key id Box shows> --fingerprint {fingerprint}"
            );
        }
        AdminCommand::Keys(KeysCommand::Import {
            kid,
            key_file,
            passphrase_file,
        }) => {
            let private_key_pem = read_file(&key_file)?;
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
            print_keys(key.as_slice());
        }
        AdminCommand::Keys(KeysCommand::Activate { kid, fingerprint }) => {
            let activated = client
                .activate_key(pb::ActivateKeyRequest { app, kid, fingerprint })
                .await
                .map_err(failed)?
                .into_inner();
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
        AdminCommand::Keys(KeysCommand::Retire { kid_or_fingerprint }) => {
            let retired = client
                .retire_key(pb::RetireKeyRequest {
                    app,
                    kid_or_fingerprint,
                })
                .await
                .map_err(failed)?
                .into_inner();
            print_keys(retired.key.as_slice());
        }
        AdminCommand::Keys(KeysCommand::List) => {
            let keys = client
                .list_keys(pb::ListKeysRequest { app })
                .await
                .map_err(failed)?
                .into_inner()
                .keys;
            print_keys(&keys);
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
            out!(
                "rotated; {} previous secret(s) kept as fallback until `admin secret retire-previous`",
                rotated.fallback_secrets
            );
        }
        AdminCommand::Secret(SecretCommand::RetirePrevious) => {
            let retired = client
                .retire_client_secrets(pb::RetireClientSecretsRequest { app })
                .await
                .map_err(failed)?
                .into_inner();
            out!("retired {} previous secret(s)", retired.retired);
        }
        AdminCommand::Status => {
            let status = client
                .get_status(pb::GetStatusRequest {})
                .await
                .map_err(failed)?
                .into_inner();
            out!(
                "cached tokens: {}; key store: {}",
                status.cached_tokens,
                if status.key_store {
                    "configured"
                } else {
                    "NOT configured"
                }
            );
            for a in status.apps {
                let key = a.active_key.map_or_else(
                    || "-".to_owned(),
                    |k| format!("{} ({} bits, sha256 {})", k.kid, k.bits, k.fingerprint),
                );
                let when = |t: Option<prost_types::Timestamp>| {
                    t.map_or_else(|| "never".to_owned(), |t| crate::audit::rfc3339(timestamp(&t)))
                };
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
        AdminCommand::Invalidate { enterprise, user } => {
            let subject = match (enterprise, user) {
                (true, _) => Some(pb::Subject {
                    kind: Some(pb::subject::Kind::Enterprise(pb::EnterpriseSubject {})),
                }),
                (false, Some(id)) => Some(pb::Subject {
                    kind: Some(pb::subject::Kind::UserId(id)),
                }),
                (false, None) => None,
            };
            let dropped = client
                .invalidate_tokens(pb::InvalidateTokensRequest { app, subject })
                .await
                .map_err(failed)?
                .into_inner();
            out!("invalidated {} cached token(s)", dropped.invalidated);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_keys(keys: &[pb::KeyInfo]) {
    for k in keys {
        let state = pb::KeyState::try_from(k.state).map_or("unknown", |s| match s {
            pb::KeyState::Pending => "pending",
            pb::KeyState::Active => "active",
            pb::KeyState::Standby => "standby",
            pb::KeyState::Retired => "retired",
            pb::KeyState::Unspecified => "unspecified",
        });
        out!(
            "{state:<8} kid {:<12} {} {} bits  sha256 {}  {}  last used {}",
            if k.kid.is_empty() { "(none yet)" } else { &k.kid },
            k.algorithm,
            k.bits,
            k.fingerprint,
            k.origin,
            k.last_used_at
                .as_ref()
                .map_or_else(|| "never".to_owned(), |t| crate::audit::rfc3339(timestamp(t))),
        );
    }
}

fn timestamp(t: &prost_types::Timestamp) -> std::time::SystemTime {
    std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.seconds.max(0).unsigned_abs())
}
