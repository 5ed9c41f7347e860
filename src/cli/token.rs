//! `box-broker token get|downscope|revoke`: a client of a running broker.

use std::process::ExitCode;

use clap::Args;
use tonic::{codegen::InterceptedService, transport::Channel};

use super::{
    connect::{ApiKey, Broker, TlsArgs},
    fail,
};
use crate::pb::{self, get_downscoped_token_request::Target, token_broker_service_client::TokenBrokerServiceClient};

/// The environment variable holding the API key when no file is given.
pub(super) const API_KEY_ENV: &str = "BOX_BROKER_API_KEY";

/// Options every `token` command shares.
#[derive(Debug, Args)]
pub(super) struct Common {
    /// The app's name in the broker's config (needed when it has several).
    #[arg(long, default_value = "")]
    app: String,
    /// The broker's address: host:port, http:// or https://host:port, or a Unix
    /// socket as unix:/abs/path (also unix:///abs/path) or unix:relative/path.
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: String,
    /// A file holding the API key to send (else $BOX_BROKER_API_KEY; else none).
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Whose token.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub(super) struct SubjectArgs {
    /// The app's Service Account.
    #[arg(long)]
    enterprise: bool,
    /// An App User or Managed User, by numeric Box user id.
    #[arg(long, value_name = "ID")]
    user: Option<String>,
    /// An App User by your own id for it (Box's external_app_user_id), e.g. auth0|123.
    #[arg(long, value_name = "EXTERNAL_ID")]
    external_user: Option<String>,
}

/// Creating the App User of `--external-user` on first use.
#[derive(Debug, Args)]
pub(super) struct ProvisionArgs {
    /// Create the App User when Box has none with the external id (the
    /// policy must grant provision = true).
    #[arg(long, requires = "external_user")]
    create_if_missing: bool,
    /// The created App User's display name (default: the external id).
    #[arg(long, value_name = "NAME", requires = "create_if_missing")]
    display_name: Option<String>,
}

impl SubjectArgs {
    fn to_proto(&self, provision: &ProvisionArgs) -> pb::Subject {
        let kind = match (&self.user, &self.external_user) {
            (Some(id), _) => pb::subject::Kind::UserId(id.clone()),
            (None, Some(id)) => pb::subject::Kind::ExternalAppUserId(id.clone()),
            (None, None) => pb::subject::Kind::Enterprise(pb::EnterpriseSubject {}),
        };
        pb::Subject {
            kind: Some(kind),
            create_if_missing: provision.create_if_missing.then(|| pb::CreateAppUser {
                name: provision.display_name.clone().unwrap_or_default(),
            }),
        }
    }
}

/// `token get` options.
#[derive(Debug, Args)]
pub(super) struct GetArgs {
    #[command(flatten)]
    subject: SubjectArgs,
    #[command(flatten)]
    provision: ProvisionArgs,
    #[command(flatten)]
    common: Common,
    /// Least remaining lifetime wanted: seconds, or a duration such as 10m.
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse_secs)]
    min_ttl: Option<u64>,
    /// Mint a new token even if one is cached.
    #[arg(long)]
    force_refresh: bool,
    /// Print JSON (token, expiry, cache hit) instead of the bare token.
    #[arg(long)]
    json: bool,
}

/// The one item a downscoped token is restricted to.
#[derive(Debug, Args)]
#[group(required = false, multiple = false)]
pub(super) struct TargetArgs {
    /// A numeric Box file id.
    #[arg(long, value_name = "ID")]
    file: Option<String>,
    /// A numeric Box folder id.
    #[arg(long, value_name = "ID")]
    folder: Option<String>,
    /// A Box shared link URL.
    #[arg(long, value_name = "URL")]
    shared_link: Option<String>,
}

/// `token downscope` options.
#[derive(Debug, Args)]
pub(super) struct DownscopeArgs {
    #[command(flatten)]
    subject: SubjectArgs,
    #[command(flatten)]
    provision: ProvisionArgs,
    /// A Box downscope scope (repeat for several), e.g. item_preview.
    #[arg(long = "scope", value_name = "SCOPE", required = true)]
    scopes: Vec<String>,
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    common: Common,
    /// Least remaining lifetime wanted: seconds, or a duration such as 10m.
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse_secs)]
    min_ttl: Option<u64>,
    /// Print JSON (token, expiry, scopes, restrictions, cache hit) instead of the bare token.
    #[arg(long)]
    json: bool,
}

/// `token revoke` options. The token is read from standard input, so it
/// never appears in a process listing or shell history.
#[derive(Debug, Args)]
pub(super) struct RevokeArgs {
    #[command(flatten)]
    common: Common,
}

type Client = TokenBrokerServiceClient<InterceptedService<Channel, ApiKey>>;

async fn connect(common: &Common) -> Result<Client, ExitCode> {
    let (channel, key) = Broker {
        addr: &common.addr,
        what: "the broker",
        tls: &common.tls,
        api_key_file: common.api_key_file.as_ref(),
        api_key_env: API_KEY_ENV,
    }
    .connect()
    .await?;
    Ok(TokenBrokerServiceClient::with_interceptor(channel, key))
}

fn status_failure(status: &tonic::Status) -> ExitCode {
    fail(
        1,
        &format!("{}: {}", crate::rpc::code_name(status.code()), status.message()),
    )
}

fn ttl(seconds: Option<u64>) -> Option<prost_types::Duration> {
    seconds.map(|s| prost_types::Duration {
        seconds: i64::try_from(s).unwrap_or(i64::MAX),
        nanos: 0,
    })
}

fn print(token: &pb::AccessToken, cache_hit: bool, json: bool) {
    if !json {
        out!("{}", token.access_token);
        return;
    }
    let mut out = serde_json::json!({
        "access_token": token.access_token,
        "expires_at": super::rfc3339(token.expires_at.as_ref()),
        "token_type": token.token_type,
        "cache_hit": cache_hit,
    });
    if !token.scopes.is_empty() {
        out["scopes"] = serde_json::json!(token.scopes);
        out["restricted_to"] = token
            .restricted_to
            .iter()
            .map(|r| serde_json::json!({"scope": r.scope, "object_type": r.object_type, "object_id": r.object_id}))
            .collect();
    }
    out!("{out}");
}

/// Prints a served token; a response without one is a failure.
fn answer(token: Option<pb::AccessToken>, cache_hit: bool, json: bool) -> ExitCode {
    match token {
        Some(token) => {
            print(&token, cache_hit, json);
            ExitCode::SUCCESS
        }
        None => fail(1, "the broker returned no token"),
    }
}

/// Runs `token get`.
pub(super) async fn get(args: GetArgs) -> ExitCode {
    let mut client = match connect(&args.common).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let request = pb::GetTokenRequest {
        app: args.common.app.clone(),
        subject: Some(args.subject.to_proto(&args.provision)),
        min_ttl: ttl(args.min_ttl),
        force_refresh: args.force_refresh,
    };
    match client.get_token(request).await {
        Ok(response) => {
            let response = response.into_inner();
            answer(response.token, response.cache_hit, args.json)
        }
        Err(status) => status_failure(&status),
    }
}

/// Runs `token downscope`.
pub(super) async fn downscope(args: DownscopeArgs) -> ExitCode {
    let mut client = match connect(&args.common).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let t = &args.target;
    let target = t
        .file
        .clone()
        .map(Target::FileId)
        .or_else(|| t.folder.clone().map(Target::FolderId))
        .or_else(|| t.shared_link.clone().map(Target::SharedLink));
    let request = pb::GetDownscopedTokenRequest {
        app: args.common.app.clone(),
        subject: Some(args.subject.to_proto(&args.provision)),
        scopes: args.scopes.clone(),
        target,
        min_ttl: ttl(args.min_ttl),
    };
    match client.get_downscoped_token(request).await {
        Ok(response) => {
            let response = response.into_inner();
            answer(response.token, response.cache_hit, args.json)
        }
        Err(status) => status_failure(&status),
    }
}

/// Runs `token revoke`, reading the token from standard input.
pub(super) async fn revoke(args: RevokeArgs) -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        return fail(1, &format!("cannot read the token from standard input: {e}"));
    }
    let access_token = line.trim().to_owned();
    if access_token.is_empty() {
        return fail(
            super::EXIT_CONFIG,
            "give the token to revoke on standard input, e.g. echo \"$TOKEN\" | box-broker token revoke",
        );
    }
    let mut client = match connect(&args.common).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client
        .revoke_token(pb::RevokeTokenRequest {
            app: args.common.app.clone(),
            access_token,
        })
        .await
    {
        Ok(_) => {
            out!("revoked");
            ExitCode::SUCCESS
        }
        Err(status) => status_failure(&status),
    }
}
