//! `box-broker token get`: a client of a running broker.

use std::process::ExitCode;

use clap::Args;

use super::fail;
use crate::pb::{self, token_broker_service_client::TokenBrokerServiceClient};

/// `token get` options.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("subject").required(true).args(["enterprise", "user"])))]
pub struct GetArgs {
    /// The app's Service Account.
    #[arg(long)]
    enterprise: bool,
    /// An App User or Managed User, by numeric Box user id.
    #[arg(long, value_name = "ID")]
    user: Option<String>,
    /// The app's name in the broker's config (needed when it has several).
    #[arg(long, default_value = "")]
    app: String,
    /// The broker's address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Least remaining lifetime wanted, in seconds.
    #[arg(long, value_name = "SECONDS")]
    min_ttl: Option<u32>,
    /// Mint a new token even if one is cached.
    #[arg(long)]
    force_refresh: bool,
    /// Print JSON (token, expiry, cache hit) instead of the bare token.
    #[arg(long)]
    json: bool,
}

/// Runs `token get`.
pub async fn get(args: GetArgs) -> ExitCode {
    let addr = if args.addr.contains("://") {
        args.addr.clone()
    } else {
        format!("http://{}", args.addr)
    };
    let mut client = match TokenBrokerServiceClient::connect(addr.clone()).await {
        Ok(client) => client,
        Err(e) => return fail(1, &format!("cannot connect to the broker at {addr}: {e}")),
    };
    let kind = match (&args.user, args.enterprise) {
        (Some(id), _) => pb::subject::Kind::UserId(id.clone()),
        (None, _) => pb::subject::Kind::Enterprise(pb::EnterpriseSubject {}),
    };
    let request = pb::GetTokenRequest {
        app: args.app.clone(),
        subject: Some(pb::Subject { kind: Some(kind) }),
        min_ttl: args.min_ttl.map(|s| prost_types::Duration {
            seconds: i64::from(s),
            nanos: 0,
        }),
        force_refresh: args.force_refresh,
    };
    let response = match client.get_token(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return fail(1, &format!("{:?}: {}", status.code(), status.message())),
    };
    let Some(token) = response.token else {
        return fail(1, "the broker returned no token");
    };
    if args.json {
        let expires_at = token.expires_at.map_or(0, |t| t.seconds);
        let json = serde_json::json!({
            "access_token": token.access_token,
            "expires_at": expires_at,
            "token_type": token.token_type,
            "cache_hit": response.cache_hit,
        });
        println!("{json}");
    } else {
        println!("{}", token.access_token);
    }
    ExitCode::SUCCESS
}
