//! `box-broker dev` (broker + embedded fake Box + generated key, no Box
//! account) and `box-broker fake-box` (the fake alone, for a real `serve`).

use std::{net::SocketAddr, path::Path, process::ExitCode, sync::Arc};

use futures_util::FutureExt as _;

use rand::RngCore as _;
use rsa::RsaPrivateKey;
use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest as _, Sha256};

use super::{DevArgs, EXIT_CONFIG, FakeBoxArgs, fail, init_dev_logging, shutdown_signal};
use crate::{
    admin::{AdminRules, KeyAdmin},
    audit::AuditSink,
    auth::{Anonymous, Authenticator},
    boxapi::{BoxClient, CredentialSources},
    broker::{App, Broker},
    cache::CachePolicy,
    clock::{SharedClock, SystemClock},
    edge::{
        Edge,
        central::{Central, CentralSettings},
    },
    fakebox::{
        FakeAuth, FakeBox,
        seed::{
            self, ADMIN_USER_ID, APP_USER_EXTERNAL_IDS, APP_USER_FILE_ID, APP_USER_FOLDER_ID, APP_USER_IDS,
            COADMIN_USER_ID, ENTERPRISE_ID, EXTERNAL_USER_ID, INACTIVE_USER_ID, MANAGED_USER_ID,
            SERVICE_ACCOUNT_FILE_ID, SERVICE_ACCOUNT_FOLDER_ID, SERVICE_ACCOUNT_ID, SHARED_LINK, SeededApp,
        },
    },
    keys::store::{Kek, KeyStore},
    policy::Policy,
    runtime::Runtime,
    service,
};

/// Dev mode's key size: the size the Box console generates.
const DEV_KEY_BITS: usize = 2048;

fn new_passphrase() -> SecretString {
    let mut raw = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    SecretString::from(hex::encode(raw))
}

/// Runs `dev`.
pub(super) async fn run_dev(args: DevArgs) -> ExitCode {
    // Both installed first: a SIGHUP or SIGTERM during startup is handled.
    let hangups = super::hangups();
    let shutdown = shutdown_signal();
    let _telemetry = init_dev_logging();
    // The banner owns stdout; audit records go to stderr with the logs.
    let audit = match AuditSink::stderr() {
        Ok(sink) => Arc::new(sink),
        Err(e) => return fail(1, &format!("cannot write audit records to stderr: {e}")),
    };
    let clock: SharedClock = Arc::new(SystemClock);
    let key = match RsaPrivateKey::new(&mut rand::rngs::OsRng, DEV_KEY_BITS) {
        Ok(key) => key,
        Err(e) => return fail(1, &format!("key generation failed: {e}")),
    };
    let fake = FakeBox::new(clock.clone());
    let app = seed::seed(&fake, FakeAuth::Jwt, Some(&key));
    let fake_listener = match tokio::net::TcpListener::bind(args.fake_box_listen).await {
        Ok(l) => l,
        Err(e) => {
            return fail(
                1,
                &format!("cannot listen on {} for the fake Box: {e}", args.fake_box_listen),
            );
        }
    };
    let fake_server = match fake.spawn(fake_listener) {
        Ok(server) => server,
        Err(e) => return fail(1, &format!("cannot start the fake Box: {e}")),
    };
    // Load the app exactly as `serve` loads a console download: same JSON
    // shape, same Box-console key encryption, same decryption path.
    let json = match seed::box_config_json(&app, &key, &new_passphrase()) {
        Ok(json) => json,
        Err(e) => return fail(1, &e.to_string()),
    };
    let credentials =
        match CredentialSources::default().load_json_text("default", &json, Path::new("(dev box_config.json)")) {
            Ok(c) => c,
            Err(e) => return fail(1, &e.to_string()),
        };
    let client = match BoxClient::new(&fake_server.base_url(), clock.clone()) {
        Ok(c) => c,
        Err(e) => return fail(1, &e.to_string()),
    };
    let broker = Arc::new(Broker::new(
        vec![App::new("default", &credentials, client)],
        clock,
        CachePolicy::default(),
        // Dev mode admits anonymous callers and lets them have everything.
        Policy::allow_everything("anonymous"),
    ));
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => return fail(1, &format!("cannot listen on {}: {e}", args.listen)),
    };
    let addr = match listener.local_addr() {
        Ok(addr) => addr,
        Err(e) => return fail(1, &format!("cannot read the listen address: {e}")),
    };
    // The admin RPC: a random admin key, and a key store (with a random KEK)
    // in a temporary directory that lives as long as this process.
    let admin_key = new_passphrase();
    let store_dir = std::env::temp_dir().join(format!("box-broker-dev-{}", new_passphrase().expose_secret()));
    let store = match std::fs::create_dir(&store_dir)
        .map_err(|e| e.to_string())
        .and_then(|()| Kek::generate())
    {
        Ok((kek, _)) => KeyStore::new(store_dir.join("keys.json"), kek),
        Err(e) => return fail(1, &format!("cannot set up the dev key store: {e}")),
    };
    let key_admin = match KeyAdmin::open(broker.clone(), Some(store)) {
        Ok(admin) => Arc::new(admin),
        Err(e) => return fail(1, &e.to_string()),
    };
    let admin_listener = match tokio::net::TcpListener::bind(args.admin_listen).await {
        Ok(l) => l,
        Err(e) => return fail(1, &format!("cannot listen on {} (admin): {e}", args.admin_listen)),
    };
    let admin_addr = admin_listener
        .local_addr()
        .map_or_else(|_| args.admin_listen.to_string(), |a| a.to_string());
    let admin_auth = Authenticator::new(Anonymous::Refused).with_api_keys(vec![(
        DEV_ADMIN.to_owned(),
        Sha256::digest(admin_key.expose_secret().as_bytes()).into(),
    )]);
    let edge = match args.edge {
        Some(edge_addr) => match dev_edge(edge_addr, addr).await {
            Ok(edge) => Some(edge),
            Err(e) => return fail(1, &e),
        },
        None => None,
    };
    print_banner(
        &addr.to_string(),
        &admin_addr,
        admin_key.expose_secret(),
        &fake_server.base_url(),
        &app,
    );
    let shutdown = shutdown.shared();
    let edge = edge.map(|(edge_addr, runtime)| {
        out!(
            "\nEdge sidecar: {edge_addr} (plaintext, anonymous local callers) -> broker {addr}: no Box credential in it.\n  \
             {exe} token get --addr {edge_addr} --user {first}    # asks the broker once; again: a local hit\n",
            exe = std::env::current_exe().map_or_else(|_| "box-broker".to_owned(), |p| p.display().to_string()),
            first = APP_USER_IDS[0],
        );
        tokio::spawn(runtime.run(shutdown.clone()))
    });
    let result = Runtime::new(broker, audit)
        .listen(
            service::Listener::Tcp(listener, Authenticator::new(Anonymous::Admitted)),
            service::Role::Client,
        )
        .listen(
            service::Listener::Tcp(admin_listener, admin_auth),
            service::Role::Admin(
                key_admin,
                AdminRules::allow_everything(&format!("{}{DEV_ADMIN}", crate::auth::API_KEY_PREFIX)),
            ),
        )
        .watch_policy(None, hangups)
        .run(shutdown)
        .await;
    if let Some(edge) = edge {
        let _ = edge.await;
    }
    fake_server.stop().await;
    let _ = std::fs::remove_dir_all(&store_dir);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, &e.to_string()),
    }
}

/// `dev --edge`: an edge on `edge_addr` (anonymous local callers) whose
/// central broker is dev mode's own, at `central`.
async fn dev_edge(edge_addr: SocketAddr, central: SocketAddr) -> Result<(SocketAddr, Runtime), String> {
    let clock: SharedClock = Arc::new(SystemClock);
    let settings = CentralSettings::plaintext(&[central]);
    let central = Central::new(settings, clock.clone()).await?;
    let edge = Arc::new(Edge::new(central, clock, CachePolicy::default()));
    let listener = tokio::net::TcpListener::bind(edge_addr)
        .await
        .map_err(|e| format!("cannot listen on {edge_addr} (edge): {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("cannot read the edge's address: {e}"))?;
    let audit = AuditSink::stderr().map_err(|e| format!("cannot write audit records to stderr: {e}"))?;
    let runtime = Runtime::edge(edge, Arc::new(audit)).listen(
        service::Listener::Tcp(listener, Authenticator::new(Anonymous::Admitted)),
        service::Role::Client,
    );
    Ok((bound, runtime))
}

/// The admin identity of dev mode's admin key.
const DEV_ADMIN: &str = "dev-admin";

fn print_banner(addr: &str, admin_addr: &str, admin_key: &str, fake_url: &str, app: &SeededApp) {
    let exe = std::env::current_exe().map_or_else(|_| "box-broker".to_owned(), |p| p.display().to_string());
    let users = APP_USER_IDS
        .iter()
        .zip(APP_USER_EXTERNAL_IDS)
        .map(|(id, external)| format!("{id} ({external})"))
        .collect::<Vec<_>>()
        .join(", ");
    let first = APP_USER_IDS[0];
    let first_external = APP_USER_EXTERNAL_IDS[0];
    out!(
        "\
box-broker dev mode (NOT for production)
  broker gRPC:    {addr} (plaintext)
  callers:        ANONYMOUS callers are allowed, and the dev policy gives them every token
  admin gRPC:     {admin_addr} (plaintext; admin API key below; key store in a temp dir, gone at exit)
  fake Box:       {fake_url} (app client id {client}, key id {kid})
  enterprise:     {ENTERPRISE_ID} (Service Account user {SERVICE_ACCOUNT_ID})
  App Users:      {users} (Box user id (external_app_user_id))
  Managed User:   {MANAGED_USER_ID}
  never tokenized: admin {ADMIN_USER_ID}, co-admin {COADMIN_USER_ID}, inactive {INACTIVE_USER_ID},
                  external user {EXTERNAL_USER_ID} (another enterprise)
  content:        folder {APP_USER_FOLDER_ID} and file {APP_USER_FILE_ID} (owned by App User {first});
                  folder {SERVICE_ACCOUNT_FOLDER_ID} and file {SERVICE_ACCOUNT_FILE_ID} (owned by the Service Account),
                  shared link {SHARED_LINK}

Try:
  {exe} token get --addr {addr} --enterprise
  {exe} token get --addr {addr} --user {first} --json
  {exe} token get --addr {addr} --external-user '{first_external}' --json    # the same App User, by your own id
  {exe} token get --addr {addr} --external-user 'auth0|new' --create-if-missing --display-name 'New Customer'
  {exe} token downscope --addr {addr} --user {first} --scope item_preview --folder {APP_USER_FOLDER_ID} --json
  TOKEN=$({exe} token downscope --addr {addr} --user {first} --scope item_preview --file {APP_USER_FILE_ID})
  echo \"$TOKEN\" | {exe} token revoke --addr {addr}
  grpcurl -plaintext -d '{{\"subject\":{{\"enterprise\":{{}}}}}}' {addr} boxbroker.v1.TokenBrokerService/GetToken
  grpcurl -plaintext -d '{{\"subject\":{{\"userId\":\"{first}\"}}}}' {addr} boxbroker.v1.TokenBrokerService/GetToken
  grpcurl -plaintext -d '{{\"subject\":{{\"userId\":\"{first}\"}},\"scopes\":[\"item_preview\"],\"folderId\":\"{APP_USER_FOLDER_ID}\"}}' {addr} boxbroker.v1.TokenBrokerService/GetDownscopedToken
  grpcurl -plaintext {addr} grpc.health.v1.Health/Check

Rotate the signing key (see README, \"Rotating keys\"):
  export BOX_BROKER_ADMIN_KEY={admin_key}
  {exe} admin --addr {admin_addr} keys generate --public-key-out new.pem
  curl -s --data-binary @new.pem {fake_url}/_fake/apps/{client}/keys    # the Box console's \"Add a Public Key\"
  {exe} admin --addr {admin_addr} keys activate --kid <kid> --fingerprint <fingerprint>
  {exe} admin --addr {admin_addr} keys list

Press Ctrl-C to stop.",
        client = app.client_id,
        kid = app.kid,
    );
}

/// Runs `fake-box`: writes `box_config.json` and `broker.toml`, then serves.
pub(super) async fn run_fake_box(args: FakeBoxArgs) -> ExitCode {
    // Both installed first: a SIGHUP (logged, not fatal) or SIGTERM during
    // startup is handled.
    let hangups = super::hangups();
    let shutdown = shutdown_signal();
    let _telemetry = init_dev_logging();
    let hangup_logger = tokio::spawn(crate::reload::log_hangups(hangups));
    let clock: SharedClock = Arc::new(SystemClock);
    let fake = FakeBox::new(clock);
    let (app, json) = if args.ccg {
        let app = seed::seed(&fake, FakeAuth::Ccg, None);
        let json = serde_json::json!({
            "boxAppSettings": {"clientID": app.client_id, "clientSecret": app.client_secret.expose_secret()},
            "enterpriseID": ENTERPRISE_ID,
        });
        (app, SecretString::from(json.to_string()))
    } else {
        let key = match RsaPrivateKey::new(&mut rand::rngs::OsRng, DEV_KEY_BITS) {
            Ok(key) => key,
            Err(e) => return fail(1, &format!("key generation failed: {e}")),
        };
        let app = seed::seed(&fake, FakeAuth::Jwt, Some(&key));
        match seed::box_config_json(&app, &key, &new_passphrase()) {
            Ok(json) => (app, json),
            Err(e) => return fail(1, &e.to_string()),
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => return fail(1, &format!("cannot listen on {}: {e}", args.listen)),
    };
    let base_url = match listener.local_addr() {
        Ok(addr) => format!("http://{addr}"),
        Err(e) => return fail(1, &format!("cannot read the listen address: {e}")),
    };
    if let Err(e) = write_configs(&args.write_config, &json, &base_url) {
        return fail(EXIT_CONFIG, &e);
    }
    let server = match fake.spawn(listener) {
        Ok(server) => server,
        Err(e) => return fail(1, &format!("cannot start the fake Box: {e}")),
    };
    let dir = args.write_config.display();
    out!(
        "fake Box at {base_url} (app client id {client})\n  wrote {dir}/box_config.json and {dir}/broker.toml\n  \
         enterprise {ENTERPRISE_ID}; App Users {users} (external ids {externals}); Managed User {MANAGED_USER_ID}\n  \
         run the broker against it: box-broker serve --config {dir}/broker.toml\n  \
         control: GET {base_url}/_fake/stats; POST {base_url}/_fake/faults {{\"kind\":\"rate_limited\",\"count\":3,\"retry_after_secs\":1}}",
        client = app.client_id,
        users = APP_USER_IDS.join(", "),
        externals = APP_USER_EXTERNAL_IDS.join(", "),
    );
    shutdown.await;
    server.stop().await;
    hangup_logger.abort();
    ExitCode::SUCCESS
}

fn write_configs(dir: &Path, json: &SecretString, base_url: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
    let json_path = dir.join("box_config.json");
    write_private(&json_path, json.expose_secret())?;
    let toml = format!(
        "# Written by `box-broker fake-box`: a broker config for the fake Box at {base_url}.\n\
         [server]\nlisten = \"127.0.0.1:50051\"\n# The fake has no caller authentication to offer; development only.\nallow_anonymous = true\n\n\
         [policy]\nfile = \"policy.toml\"\n\n\
         [apps.default]\nbox_config_file = \"box_config.json\"\napi_base_url = \"{base_url}\"\n"
    );
    let scopes: Vec<String> = crate::boxapi::downscope::DOWNSCOPE_SCOPES
        .iter()
        .map(|s| format!("{s:?}"))
        .collect();
    let policy = format!(
        "# Written by `box-broker fake-box`: the anonymous caller may have everything. Development only.\n\
         [[rules]]\nname = \"development: anonymous gets everything\"\ncallers = [\"anonymous\"]\n\
         enterprise = true\nusers = [\"*\"]\nfull_tokens = true\nscopes = [{}]\n\
         files = [\"*\"]\nfolders = [\"*\"]\nshared_links = true\nuntargeted = true\nrevoke = true\nforce_refresh = true\n",
        scopes.join(", ")
    );
    std::fs::write(dir.join("policy.toml"), policy)
        .map_err(|e| format!("{}: cannot write: {e}", dir.join("policy.toml").display()))?;
    std::fs::write(dir.join("broker.toml"), toml)
        .map_err(|e| format!("{}: cannot write: {e}", dir.join("broker.toml").display()))
}

fn write_private(path: &Path, content: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| format!("{}: cannot create: {e}", path.display()))?;
    file.write_all(content.as_bytes())
        .map_err(|e| format!("{}: cannot write: {e}", path.display()))
}
