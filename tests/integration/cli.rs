//! The `box-broker` binary end to end: `dev`, `fake-box` + `serve` +
//! `token get`, SIGTERM, and `keygen`.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

const WAIT: Duration = Duration::from_secs(60);

pub(crate) fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_box-broker"))
}

/// A child process killed on drop, with its output lines delivered on channels.
pub(crate) struct Proc {
    child: Child,
    pub(crate) stdout: mpsc::Receiver<String>,
    pub(crate) stderr: mpsc::Receiver<String>,
}

impl Proc {
    pub(crate) fn spawn(command: &mut Command) -> Self {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        Self { child, stdout, stderr }
    }

    /// The first line on `stream` containing `needle`.
    pub(crate) fn wait_line(stream: &mpsc::Receiver<String>, needle: &str) -> String {
        let mut seen = Vec::new();
        loop {
            let line = stream
                .recv_timeout(WAIT)
                .unwrap_or_else(|e| panic!("no line with {needle:?} ({e}) in:\n{}", seen.join("\n")));
            if line.contains(needle) {
                return line;
            }
            seen.push(line);
        }
    }

    /// The `listen` field of the first JSON log line holding `needle`
    /// (`serving gRPC`, `serving Prometheus metrics`, ...).
    pub(crate) fn wait_listen(stream: &mpsc::Receiver<String>, needle: &str) -> String {
        loop {
            let line = Self::wait_line(stream, needle);
            let log: serde_json::Value = serde_json::from_str(&line).expect("JSON log lines");
            // (`serving gRPC on a Unix socket` has a path instead.)
            if let Some(listen) = log["fields"]["listen"].as_str() {
                return listen.to_owned();
            }
        }
    }

    /// Sends `signal` (`-HUP`, `-TERM`, ...) to the process.
    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn terminate(&mut self) -> i32 {
        self.signal("-TERM");
        let (done, wait) = mpsc::channel();
        let mut child = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap());
        std::thread::spawn(move || done.send(child.wait().unwrap()));
        let status = wait.recv_timeout(WAIT).unwrap();
        status.code().unwrap_or_else(|| {
            use std::os::unix::process::ExitStatusExt as _;
            -status.signal().unwrap_or(0)
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `GET http://{metrics}/metrics`.
pub(crate) fn scrape(metrics: &str) -> String {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        reqwest::get(format!("http://{metrics}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    })
}

/// `fake-box` writing its configs into `dir`, once it serves: the process
/// and its URL.
pub(crate) fn fake_box(dir: &std::path::Path) -> (Proc, String) {
    let fake = Proc::spawn(
        Command::new(bin())
            .args(["fake-box", "--listen", "127.0.0.1:0", "--write-config"])
            .arg(dir),
    );
    let url = Proc::wait_line(&fake.stdout, "fake Box at")
        .split_whitespace()
        .nth(3)
        .unwrap()
        .to_owned();
    (fake, url)
}

/// Runs the binary to completion: (exit code, stdout, stderr).
fn run(command: &mut Command) -> (i32, String, String) {
    let out = command.output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

pub(crate) fn token_get(args: &[&str]) -> (i32, String, String) {
    run(Command::new(bin()).arg("token").arg("get").args(args))
}

#[test]
fn dev_mode_serves_tokens_with_no_box_account() {
    let dev =
        Proc::spawn(Command::new(bin()).args(["dev", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]));
    let line = Proc::wait_line(&dev.stdout, "broker gRPC:");
    let addr = line.split_whitespace().nth(2).unwrap().to_owned();
    let banner = Proc::wait_line(&dev.stdout, "callers:");
    assert!(
        banner.contains("ANONYMOUS"),
        "the banner says anonymous callers are allowed: {banner}"
    );
    let example = Proc::wait_line(&dev.stdout, "token get");
    assert!(example.contains(&addr), "examples are copy-pasteable: {example}");

    let (code, stdout, stderr) = token_get(&["--addr", &addr, "--enterprise"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim().len(), 32, "the bare token: {stdout}");

    let (code, stdout, stderr) = token_get(&["--addr", &addr, "--user", "7200001", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["token_type"], "bearer");
    assert_eq!(json["cache_hit"], false);
    let (_, again, _) = token_get(&["--addr", &addr, "--user", "7200001", "--json"]);
    let again: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(again["cache_hit"], true);
    assert_eq!(again["access_token"], json["access_token"]);

    // The seeded enterprise admin: never tokenized.
    let (code, _, stderr) = token_get(&["--addr", &addr, "--user", "7300002"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("PERMISSION_DENIED") && stderr.contains("7300002") && stderr.contains("admin"),
        "{stderr}"
    );
    // An App User by the portal's own id: the same token as by its Box id.
    let (code, by_external, stderr) = token_get(&["--addr", &addr, "--external-user", "auth0|ada", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let by_external: serde_json::Value = serde_json::from_str(&by_external).unwrap();
    assert_eq!(by_external["access_token"], json["access_token"]);

    // A browser's token: downscoped to one folder, then revoked.
    let out = Command::new(bin())
        .args([
            "token",
            "downscope",
            "--addr",
            &addr,
            "--user",
            "7200001",
            "--scope",
            "item_preview",
            "--scope",
            "item_download",
        ])
        .args(["--folder", "7500002", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let downscoped: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        downscoped["scopes"],
        serde_json::json!(["item_download", "item_preview"])
    );
    assert_eq!(downscoped["restricted_to"][0]["object_id"], "7500002");
    let token = downscoped["access_token"].as_str().unwrap();
    assert_eq!(revoke(&addr, token).0, 0);
    let (code, stderr) = revoke(&addr, token);
    assert_eq!(code, 1, "a revoked token is no longer the broker's");
    assert!(stderr.contains("NOT_FOUND"), "{stderr}");
}

/// `token revoke`, with the token on standard input.
fn revoke(addr: &str, token: &str) -> (i32, String) {
    use std::io::Write as _;
    let mut child = Command::new(bin())
        .args(["token", "revoke", "--addr", addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{token}").unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap(), String::from_utf8(out.stderr).unwrap())
}

/// `serve --config config` on free ports with its metrics listener, once it
/// serves: the process, its gRPC address and its metrics address.
pub(crate) fn serve_with_metrics(config: &std::path::Path) -> (Proc, String, String) {
    let serve = Proc::spawn(
        Command::new(bin())
            .args(["serve", "--config"])
            .arg(config)
            .env("BOX_BROKER_SERVER__LISTEN", "127.0.0.1:0")
            .env("BOX_BROKER_SERVER__METRICS_LISTEN", "127.0.0.1:0")
            .env("BOX_BROKER_LOG__FORMAT", "json")
            .env_remove("RUST_LOG"),
    );
    let addr = Proc::wait_listen(&serve.stderr, "serving gRPC");
    let metrics = Proc::wait_listen(&serve.stderr, "serving Prometheus metrics");
    (serve, addr, metrics)
}

#[test]
fn serve_runs_from_a_config_file_against_the_standalone_fake_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (_fake, _) = fake_box(dir.path());
    let config = dir.path().join("broker.toml");
    assert!(config.exists() && dir.path().join("box_config.json").exists());

    let (mut serve, addr, metrics) = serve_with_metrics(&config);

    let (code, stdout, stderr) = token_get(&["--addr", &addr, "--enterprise"]);
    assert_eq!(code, 0, "{stderr}");
    let token = stdout.trim().to_owned();
    assert_eq!(token.len(), 32);
    let scraped = scrape(&metrics);
    assert!(
        scraped.contains("boxbroker_rpc_requests_total{method=\"GetToken\",code=\"OK\"} 1"),
        "{scraped}"
    );
    assert!(!scraped.contains(&token));

    assert_eq!(serve.terminate(), 0, "SIGTERM stops the broker cleanly");
    // Nothing the broker logged contains the token.
    let logged: Vec<String> = serve.stderr.try_iter().collect();
    assert!(logged.iter().all(|l| !l.contains(&token)));
}

#[test]
fn serve_with_a_bad_config_exits_64_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"nonsense\"\n[apps.default]\nbox_config_file = \"x.json\"\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("broker.toml") && stderr.contains("socket address"),
        "{stderr}"
    );
}

#[test]
fn keygen_writes_an_encrypted_key_that_loads_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["keygen", "--out-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("-----BEGIN PUBLIC KEY-----"), "{stdout}");

    let pem = std::fs::read_to_string(dir.path().join("private_key.pem")).unwrap();
    assert!(pem.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
    let passphrase = std::fs::read_to_string(dir.path().join("passphrase")).unwrap();
    assert!(!stdout.contains(&passphrase), "the passphrase is not printed");
    let key =
        box_token_broker::boxapi::private_key::decode_private_key(&pem, Some(&secrecy::SecretString::from(passphrase)))
            .unwrap();
    assert_eq!(rsa::traits::PublicKeyParts::size(&key) * 8, 2048);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("private_key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the private key is owner-only");
    }

    let again = Command::new(bin())
        .args(["keygen", "--out-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(64));
    assert!(
        String::from_utf8(again.stderr)
            .unwrap()
            .contains("refusing to overwrite")
    );
}

/// `box-broker dev` on free ports, and what its banner says.
struct Dev {
    #[allow(
        dead_code,
        reason = "held so the process lives as long as the handle (killed on drop)"
    )]
    proc: Proc,
    broker: String,
    admin: String,
    fake_url: String,
    client_id: String,
    /// The fake Box's registered public key id for the app.
    kid: String,
    key: String,
}

impl Dev {
    fn start() -> Self {
        let proc =
            Proc::spawn(Command::new(bin()).args(["dev", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]));
        let field = |line: String| line.split_whitespace().nth(2).unwrap().to_owned();
        let broker = field(Proc::wait_line(&proc.stdout, "broker gRPC:"));
        let admin = field(Proc::wait_line(&proc.stdout, "admin gRPC:"));
        let fake = Proc::wait_line(&proc.stdout, "fake Box:");
        let client_id = fake
            .split("client id ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .to_owned();
        let kid = fake.split("key id ").nth(1).unwrap().trim_end_matches(')').to_owned();
        let fake_url = field(fake);
        let key = Proc::wait_line(&proc.stdout, "BOX_BROKER_ADMIN_KEY=")
            .split('=')
            .nth(1)
            .unwrap()
            .trim()
            .to_owned();
        Self {
            proc,
            broker,
            admin,
            fake_url,
            client_id,
            kid,
            key,
        }
    }
}

fn admin_cli(admin: &str, key: &str, args: &[&str]) -> (i32, String, String) {
    run(Command::new(bin())
        .args(["admin", "--addr", admin])
        .args(args)
        .env("BOX_BROKER_ADMIN_KEY", key))
}

#[test]
fn dev_mode_plays_the_whole_key_rotation_with_the_admin_cli() {
    let dev = Dev::start();
    let Dev {
        broker,
        admin,
        fake_url,
        client_id,
        key,
        ..
    } = &dev;

    // Without the admin key: refused.
    let (code, _, stderr) = admin_cli(admin, "", &["status"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("new.pem");
    let (code, stdout, stderr) = admin_cli(
        admin,
        key,
        &["keys", "generate", "--public-key-out", public.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{stderr}");
    let fingerprint = stdout
        .lines()
        .next()
        .unwrap()
        .strip_prefix("fingerprint ")
        .unwrap()
        .to_owned();
    assert!(stdout.contains("-----BEGIN PUBLIC KEY-----") && !stdout.contains("PRIVATE"));

    // The Box console's "Add a Public Key", on the fake.
    let pem = std::fs::read_to_string(&public).unwrap();
    let kid = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let reply: serde_json::Value = reqwest::Client::new()
            .post(format!("{fake_url}/_fake/apps/{client_id}/keys"))
            .body(pem)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        reply["kid"].as_str().unwrap().to_owned()
    });
    let (code, stdout, stderr) = admin_cli(
        admin,
        key,
        &["keys", "activate", "--kid", &kid, "--fingerprint", &fingerprint],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with(&format!("active   kid {kid}")), "{stdout}");
    assert!(stdout.lines().nth(1).unwrap().starts_with("standby"), "{stdout}");

    let (code, _, stderr) = token_get(&["--addr", broker, "--enterprise", "--force-refresh"]);
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, _) = admin_cli(admin, key, &["status"]);
    assert_eq!(code, 0);
    assert!(stdout.contains(&format!("active key {kid}")), "{stdout}");
    assert!(stdout.contains("key store: configured"), "{stdout}");
}

#[test]
fn sigterm_under_load_flips_health_first_fails_no_request_and_exits_0() {
    use box_token_broker::pb::{self, token_broker_service_client::TokenBrokerServiceClient};
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    };
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

    let dir = tempfile::tempdir().unwrap();
    let (_fake, fake_url) = fake_box(dir.path());
    let mut serve = Proc::spawn(
        Command::new(bin())
            .args(["serve", "--config"])
            .arg(dir.path().join("broker.toml"))
            .env("BOX_BROKER_SERVER__LISTEN", "127.0.0.1:0")
            .env("BOX_BROKER_SERVER__DRAIN_DELAY_SECS", "1")
            .env("BOX_BROKER_LOG__FORMAT", "json")
            .env_remove("RUST_LOG"),
    );
    let addr = format!("http://{}", Proc::wait_listen(&serve.stderr, "serving gRPC"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let flipped = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    runtime.block_on(async {
        // Box answers slowly, so requests are in flight at the signal.
        reqwest::Client::new()
            .post(format!("{fake_url}/_fake/latency"))
            .json(&serde_json::json!({"millis": 100}))
            .send()
            .await
            .unwrap();
        let channel = tonic::transport::Channel::from_shared(addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut workers = Vec::new();
        for _ in 0..8 {
            let mut client = TokenBrokerServiceClient::new(channel.clone());
            let (flipped, ok, failed) = (flipped.clone(), ok.clone(), failed.clone());
            workers.push(tokio::spawn(async move {
                // A well-behaved client stops sending once health says NOT_SERVING.
                while !flipped.load(Ordering::SeqCst) {
                    let request = pb::GetTokenRequest {
                        subject: Some(pb::Subject {
                            kind: Some(pb::subject::Kind::Enterprise(pb::EnterpriseSubject {})),
                            create_if_missing: None,
                        }),
                        force_refresh: true,
                        ..Default::default()
                    };
                    match client.get_token(request).await {
                        Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(_) => failed.fetch_add(1, Ordering::SeqCst),
                    };
                }
            }));
        }
        let mut health = HealthClient::new(channel.clone());
        while ok.load(Ordering::SeqCst) < 16 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            Command::new("kill")
                .arg("-TERM")
                .arg(serve.child.id().to_string())
                .status()
                .unwrap()
                .success()
        );
        loop {
            let status = health
                .check(HealthCheckRequest { service: String::new() })
                .await
                .unwrap();
            if status.into_inner().status() == ServingStatus::NotServing {
                flipped.store(true, Ordering::SeqCst);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for worker in workers {
            worker.await.unwrap();
        }
    });
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "no request failed ({} succeeded)",
        ok.load(Ordering::SeqCst)
    );
    let (done, wait) = mpsc::channel();
    let mut child = std::mem::replace(&mut serve.child, Command::new("true").spawn().unwrap());
    std::thread::spawn(move || done.send(child.wait().unwrap()));
    assert_eq!(wait.recv_timeout(WAIT).unwrap().code(), Some(0), "exit code 0");
    let logged: Vec<String> = serve.stderr.try_iter().collect();
    let flip = logged
        .iter()
        .position(|l| l.contains("health is NOT_SERVING"))
        .expect("flip logged");
    let drain = logged
        .iter()
        .position(|l| l.contains("draining: no new requests"))
        .expect("drain logged");
    assert!(flip < drain, "health flips before requests are refused");
}

/// A config for `serve`/`check-config` against the key fixture, with `extra`.
fn fixture_config(dir: &tempfile::TempDir, extra: &str) -> PathBuf {
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{extra}\n[apps.default]\nbox_config_file = {:?}\n",
            crate::common::fixture("box_config.json")
        ),
    )
    .unwrap();
    config
}

/// `serve` and `check-config` both stop with exit 64 and one line containing every `needle`.
fn both_refuse(config: &std::path::Path, needles: &[&str]) {
    refused_by("serve", config, None, needles);
}

/// `check-config` and `server` (`serve` or `edge`), with `env` set, both
/// stop with exit 64 and one line containing every `needle`.
fn refused_by(server: &str, config: &std::path::Path, env: Option<(&str, &str)>, needles: &[&str]) {
    for command in ["check-config", server] {
        let mut cmd = Command::new(bin());
        if command == server {
            cmd.args([server, "--config"]);
        } else {
            cmd.arg("check-config");
        }
        if let Some((name, value)) = env {
            cmd.env(name, value);
        }
        let (code, _, stderr) = run(cmd.arg(config).env_remove("RUST_LOG"));
        assert_eq!(code, 64, "{command}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{command}: {stderr}");
        for needle in needles {
            assert!(stderr.contains(needle), "{command}: {stderr} should name {needle}");
        }
    }
}

#[test]
fn check_config_and_serve_refuse_garbage_tls_files_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), "not a certificate").unwrap();
    std::fs::write(dir.path().join("tls.key"), "not a key").unwrap();
    let config = fixture_config(&dir, "[server.tls]\ncert_file = \"tls.crt\"\nkey_file = \"tls.key\"\n");
    both_refuse(&config, &["server.tls", "tls.crt", "the certificate chain"]);
}

#[test]
fn check_config_and_serve_refuse_an_api_key_hash_file_that_is_missing_or_not_a_hash() {
    let dir = tempfile::tempdir().unwrap();
    let key = |section: &str| format!("[[{section}]]\nidentity = \"ops\"\nsha256_file = \"ops.sha256\"\n");
    let missing = fixture_config(&dir, &key("auth.api_keys"));
    both_refuse(&missing, &["auth.api_keys", "\"ops\"", "ops.sha256", "cannot read"]);

    std::fs::write(dir.path().join("ops.sha256"), "the key itself, not its hash\n").unwrap();
    let admin = format!(
        "admin_listen = \"127.0.0.2:0\"\n{}[[admin.rules]]\ncallers = [\"apikey:ops\"]\nrpcs = [\"*\"]\n",
        key("admin.api_keys")
    );
    let garbage = fixture_config(&dir, &admin);
    both_refuse(
        &garbage,
        &["admin.api_keys", "sha256_file", "must be 64 hex characters"],
    );
    let stderr = run(Command::new(bin()).arg("check-config").arg(&garbage)).2;
    assert!(
        !stderr.contains("the key itself"),
        "what the file holds is never repeated: {stderr}"
    );
}

#[test]
fn check_config_and_serve_refuse_an_audit_path_in_a_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("missing").join("audit.log");
    let config = fixture_config(&dir, &format!("[audit]\nsink = {:?}\n", sink.display().to_string()));
    both_refuse(&config, &["audit.sink", "missing/audit.log", "cannot open"]);
}

/// A `fake-box` and its written config, with the `[policy]` section taken out.
fn fake_box_without_policy(dir: &tempfile::TempDir) -> (Proc, PathBuf) {
    let (fake, _) = fake_box(dir.path());
    let config = dir.path().join("broker.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[policy]\nfile = \"policy.toml\"\n", "");
    std::fs::write(&config, text).unwrap();
    (fake, config)
}

#[test]
fn sighup_does_not_stop_serve_without_a_policy_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_fake, config) = fake_box_without_policy(&dir);
    let mut serve = Proc::spawn(
        Command::new(bin())
            .args(["serve", "--config"])
            .arg(&config)
            .env("BOX_BROKER_SERVER__LISTEN", "127.0.0.1:0")
            .env_remove("RUST_LOG"),
    );
    Proc::wait_line(&serve.stderr, "serving gRPC");
    for _ in 0..2 {
        serve.signal("-HUP");
        Proc::wait_line(&serve.stderr, "SIGHUP: nothing to reload");
    }
    assert!(serve.child.try_wait().unwrap().is_none(), "still running");
    assert_eq!(serve.terminate(), 0);
}

#[test]
fn sighup_does_not_stop_dev_and_it_still_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dev = Proc::spawn(
        Command::new(bin())
            .args(["dev", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env("TMPDIR", tmp.path())
            .env_remove("RUST_LOG"),
    );
    Proc::wait_line(&dev.stdout, "grpcurl");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "dev's key store directory"
    );
    dev.signal("-HUP");
    Proc::wait_line(&dev.stderr, "SIGHUP: nothing to reload");
    assert!(dev.child.try_wait().unwrap().is_none(), "still running");
    assert_eq!(dev.terminate(), 0);
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "its temporary directory is gone"
    );
}

#[test]
fn out_of_file_descriptors_the_accept_loop_backs_off_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (_fake, _) = fake_box(dir.path());
    // Few descriptors: the broker's own, plus a handful of connections.
    let mut serve = Proc::spawn(
        Command::new("sh")
            .arg("-c")
            .arg("ulimit -n 28 && exec \"$0\" serve --config \"$1\"")
            .arg(bin())
            .arg(dir.path().join("broker.toml"))
            .env("BOX_BROKER_SERVER__LISTEN", "127.0.0.1:0")
            .env("BOX_BROKER_SERVER__METRICS_LISTEN", "127.0.0.1:0")
            .env("BOX_BROKER_SERVER__HANDSHAKE_TIMEOUT_SECS", "2")
            .env("BOX_BROKER_LOG__FORMAT", "json")
            .env_remove("RUST_LOG"),
    );
    let addr = Proc::wait_listen(&serve.stderr, "serving gRPC");
    let metrics = Proc::wait_listen(&serve.stderr, "serving Prometheus metrics");
    // More connections than it has descriptors for, held open for a second.
    let held: Vec<std::net::TcpStream> = (0..40)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    assert!(held.len() > 20, "{} connections", held.len());
    Proc::wait_line(&serve.stderr, "accepting a connection failed; backing off");
    std::thread::sleep(Duration::from_secs(1));
    drop(held);
    // The silent connections are closed (handshake timeout); it serves again.
    std::thread::sleep(Duration::from_secs(3));
    let (code, stdout, stderr) = token_get(&["--addr", &addr, "--enterprise"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim().len(), 32);
    let scraped = scrape(&metrics);
    let errors: f64 = scraped
        .lines()
        .find_map(|l| l.strip_prefix("boxbroker_accept_errors_total "))
        .unwrap_or_else(|| panic!("{scraped}"))
        .parse()
        .unwrap();
    // A busy loop makes millions of failed accepts in that time; the
    // backoff (5 ms doubling to 1 s) a few dozen at most.
    assert!((1.0..1000.0).contains(&errors), "{errors} failed accepts");
    assert_eq!(serve.terminate(), 0);
}

#[test]
fn the_admin_key_and_a_kek_variable_in_the_shell_do_not_stop_check_config_or_serve() {
    // The README exports BOX_BROKER_ADMIN_KEY for the admin CLI and names
    // BOX_BROKER_KEK as a `kek_env`; both were read as config overrides
    // (exit 64: unknown field `admin_key`).
    let dir = tempfile::tempdir().unwrap();
    let (_fake, _) = fake_box(dir.path());
    let config = dir.path().join("broker.toml");
    let shell = [("BOX_BROKER_ADMIN_KEY", "an-admin-key"), ("BOX_BROKER_KEK", "a-kek")];
    let (code, stdout, stderr) = run(Command::new(bin()).arg("check-config").arg(&config).envs(shell));
    assert_eq!(code, 0, "{stdout}{stderr}");
    let mut serve = Proc::spawn(
        Command::new(bin())
            .args(["serve", "--config"])
            .arg(&config)
            .envs(shell)
            .env("BOX_BROKER_SERVER__LISTEN", "127.0.0.1:0")
            .env_remove("RUST_LOG"),
    );
    Proc::wait_line(&serve.stderr, "serving gRPC");
    assert_eq!(serve.terminate(), 0);
}

#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    // `box-broker admin keys generate | head -1` panicked: "failed printing
    // to stdout: Broken pipe".
    let dev = Dev::start();
    let Dev { broker, admin, key, .. } = &dev;
    for args in [
        vec!["admin", "--addr", &admin, "keys", "generate"],
        vec!["admin", "--addr", &admin, "status"],
        vec!["token", "get", "--addr", &broker, "--enterprise"],
    ] {
        // The reading end is closed before the command writes anything.
        let mut child = Command::new(bin())
            .args(&args)
            .env("BOX_BROKER_ADMIN_KEY", key)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// A broker whose client listener takes TLS with an optional client
/// certificate or an API key, beside a Unix socket; its admin listener takes
/// TLS client certificates. Returns it, its client and admin addresses, and
/// the directory holding `ca.crt`, `cli.crt`/`cli.key` (caller
/// `dns:cli.internal`), `ops.crt`/`ops.key` (admin `dns:ops.internal`),
/// `portal.key` (the API key of `apikey:portal`) and `broker.sock` (`uds:sidecar`).
fn authenticated_broker(dir: &std::path::Path) -> (Proc, Proc, String, String) {
    use crate::common::pki::{Pki, dns, ip};
    use sha2::{Digest as _, Sha256};
    let (fake, _) = fake_box(dir);
    let pki = Pki::new();
    std::fs::write(dir.join("ca.crt"), pki.ca.pem()).unwrap();
    for (name, sans) in [
        // The client listener on 127.0.0.1, the admin one on 127.0.0.2.
        ("server", vec![ip("127.0.0.1"), ip("127.0.0.2")]),
        ("cli", vec![dns("cli.internal")]),
        ("ops", vec![dns("ops.internal")]),
    ] {
        let (cert, key) = pki.issue(sans);
        std::fs::write(dir.join(format!("{name}.crt")), cert).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
    }
    std::fs::write(dir.join("portal.key"), "portal-key-0123456789\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(dir.join("kek"), "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n").unwrap();
        std::fs::set_permissions(dir.join("kek"), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // The key's hash from a file, as `sha256sum` prints it (a Secret mount).
    let digest = hex::encode(Sha256::digest(b"portal-key-0123456789"));
    std::fs::write(dir.join("portal.sha256"), format!("{digest}  -\n")).unwrap();
    let config = dir.join("broker.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "allow_anonymous = true\n",
        &format!(
            "allow_anonymous = false\naccept = [\"client_certificate\", \"api_key\"]\nadmin_listen = \"127.0.0.2:0\"\n\n\
             [server.tls]\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\nclient_ca_file = \"ca.crt\"\n\n\
             [server.unix_socket]\npath = \"{}\"\nidentity = \"sidecar\"\nmode = 0o660\n\n\
             [[auth.api_keys]]\nidentity = \"portal\"\nsha256_file = \"portal.sha256\"\n\n\
             [admin.tls]\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\nclient_ca_file = \"ca.crt\"\n\n\
             [[admin.rules]]\ncallers = [\"dns:ops.internal\"]\nrpcs = [\"GetStatus\", \"ImportKey\"]\napps = [\"*\"]\n\n\
             [keystore]\npath = \"keys.json\"\nkek_file = \"kek\"\n",
            dir.join("broker.sock").display()
        ),
    );
    std::fs::write(&config, text).unwrap();
    std::fs::write(
        dir.join("policy.toml"),
        "[[rules]]\nname = \"cli callers\"\ncallers = [\"apikey:portal\", \"dns:cli.internal\", \"uds:sidecar\"]\n\
         enterprise = true\nfull_tokens = true\n",
    )
    .unwrap();
    let serve = Proc::spawn(
        Command::new(bin())
            .args(["serve", "--config"])
            .arg(&config)
            .env("BOX_BROKER_SERVER__LISTEN", "127.0.0.1:0")
            .env("BOX_BROKER_LOG__FORMAT", "json")
            .env_remove("RUST_LOG"),
    );
    // (The admin listener is bound first.)
    let admin = Proc::wait_listen(&serve.stderr, "serving the admin RPC");
    let addr = Proc::wait_listen(&serve.stderr, "serving gRPC");
    (fake, serve, addr, admin)
}

#[test]
fn the_token_and_admin_clis_authenticate_with_a_key_a_certificate_or_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_fake, mut serve, addr, admin) = authenticated_broker(d);
    let file = |name: &str| d.join(name).display().to_string();
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(d.join("broker.sock")).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o660,
            "[server.unix_socket] mode: its group may connect, others not"
        );
    }
    let token = |extra: &[&str]| {
        let mut args = vec!["--enterprise"];
        args.extend_from_slice(extra);
        run(Command::new(bin()).args(["token", "get"]).args(&args).current_dir(d))
    };
    // An API key over TLS.
    let (code, stdout, stderr) = token(&[
        "--addr",
        &addr,
        "--ca-file",
        &file("ca.crt"),
        "--api-key-file",
        &file("portal.key"),
    ]);
    assert_eq!((code, stdout.trim().len()), (0, 32), "{stderr}");
    Proc::wait_line(&serve.stdout, "\"caller\":\"apikey:portal\"");
    // The same key from the environment.
    let (code, _, stderr) = run(Command::new(bin())
        .args([
            "token",
            "get",
            "--enterprise",
            "--addr",
            &addr,
            "--ca-file",
            &file("ca.crt"),
        ])
        .env("BOX_BROKER_API_KEY", "portal-key-0123456789"));
    assert_eq!(code, 0, "{stderr}");
    // A client certificate (mTLS).
    let (code, stdout, stderr) = token(&[
        "--addr",
        &addr,
        "--ca-file",
        &file("ca.crt"),
        "--cert-file",
        &file("cli.crt"),
        "--key-file",
        &file("cli.key"),
    ]);
    assert_eq!((code, stdout.trim().len()), (0, 32), "{stderr}");
    Proc::wait_line(&serve.stdout, "\"caller\":\"dns:cli.internal\"");
    // The Unix socket, by absolute and by relative path.
    for socket in [format!("unix:{}", file("broker.sock")), "unix:broker.sock".to_owned()] {
        let (code, stdout, stderr) = token(&["--addr", &socket]);
        assert_eq!((code, stdout.trim().len()), (0, 32), "{socket}: {stderr}");
    }
    Proc::wait_line(&serve.stdout, "\"caller\":\"uds:sidecar\"");
    // Nothing presented: refused, and the message says so.
    let (code, _, stderr) = token(&["--addr", &addr, "--ca-file", &file("ca.crt")]);
    assert_eq!(code, 1);
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
    // A CA file that is not PEM: exit 64 naming it, before connecting.
    let (code, _, stderr) = token(&["--addr", &addr, "--ca-file", &file("portal.key")]);
    assert_eq!(code, 64);
    assert!(
        stderr.contains("portal.key: the CA certificate holds no PEM certificate"),
        "{stderr}"
    );
    // TLS options for a plaintext address are a contradiction, not ignored.
    let (code, _, stderr) = token(&["--addr", &format!("http://{addr}"), "--ca-file", &file("ca.crt")]);
    assert_eq!(code, 64);
    assert!(
        stderr.contains("plaintext (http://) but TLS options were given"),
        "{stderr}"
    );
    // The admin CLI with a client certificate on its TLS listener.
    let (code, stdout, stderr) = run(Command::new(bin())
        .args(["admin", "--addr", &admin, "--ca-file", &file("ca.crt")])
        .args([
            "--cert-file",
            &file("ops.crt"),
            "--key-file",
            &file("ops.key"),
            "status",
        ])
        .env_remove("BOX_BROKER_ADMIN_KEY"));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("app default"), "{stdout}");
    // `--key-file` is the client certificate's key; the key to import is
    // `--private-key-file` (one flag once meant both).
    let import = crate::common::fixture("pkcs1.pem");
    let (code, stdout, stderr) = run(Command::new(bin())
        .args(["admin", "--addr", &admin, "--ca-file", &file("ca.crt")])
        .args(["--cert-file", &file("ops.crt"), "--key-file", &file("ops.key")])
        .args(["keys", "import", "--kid", "imported1", "--private-key-file"])
        .arg(&import)
        .env_remove("BOX_BROKER_ADMIN_KEY"));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("pending  kid imported1"), "{stdout}");
    assert_eq!(serve.terminate(), 0);
}

#[test]
fn check_config_online_asks_box_and_reports_what_the_first_request_would() {
    let dir = tempfile::tempdir().unwrap();
    let (_fake, _) = fake_box(dir.path());
    let config = dir.path().join("broker.toml");
    let check = || run(Command::new(bin()).args(["check-config", "--online"]).arg(&config));
    let (code, stdout, stderr) = check();
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("app default: Box issued a Service Account token (revoked again)"),
        "{stdout}"
    );
    // A public key id Box does not know: what a first GetToken would say, exit 64.
    let json_path = dir.path().join("box_config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    json["boxAppSettings"]["appAuth"]["publicKeyID"] = "nosuchkid".into();
    std::fs::write(&json_path, json.to_string()).unwrap();
    let (code, _, stderr) = check();
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("app default: Box does not know public key id nosuchkid"),
        "{stderr}"
    );
    // Box unreachable: 69, retry later.
    let (code, _, stderr) = run(Command::new(bin())
        .args(["check-config", "--online"])
        .arg(&config)
        .env("BOX_BROKER_APPS__DEFAULT__API_BASE_URL", "http://127.0.0.1:9")
        .env("BOX_BROKER_UPSTREAM__MAX_ATTEMPTS", "1"));
    assert_eq!(code, 69, "{stderr}");
    assert!(stderr.contains("could not be reached"), "{stderr}");
    // Without --online nothing is asked of Box.
    let (code, _, _) = run(Command::new(bin()).arg("check-config").arg(&config));
    assert_eq!(code, 0);
}

#[test]
fn json_output_is_one_object_with_rfc3339_times_and_durations_take_units() {
    let dev = Dev::start();
    let Dev { broker, admin, key, .. } = &dev;
    let rfc3339 = |v: &serde_json::Value| {
        let s = v.as_str().unwrap_or_else(|| panic!("a string time: {v}"));
        assert!(
            s.len() == 24 && s.as_bytes()[10] == b'T' && s.ends_with('Z'),
            "not RFC 3339: {s}"
        );
    };
    // A token for at least ten minutes, as JSON.
    let (code, stdout, stderr) = token_get(&["--addr", broker, "--enterprise", "--min-ttl", "10m", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let token: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    rfc3339(&token["expires_at"]);
    let (code, _, stderr) = token_get(&["--addr", broker, "--enterprise", "--min-ttl", "soon"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("\"soon\" is not a duration"), "{stderr}");
    // The admin CLI's status and key list.
    let (code, stdout, stderr) = admin_cli(admin, key, &["--json", "status"]);
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["apps"][0]["name"], "default", "{status}");
    assert_eq!(status["apps"][0]["active_key"]["state"], "active", "{status}");
    rfc3339(&status["apps"][0]["last_upstream_success_at"]);
    assert!(status["apps"][0]["last_upstream_failure_at"].is_null(), "{status}");
    let (code, stdout, stderr) = admin_cli(admin, key, &["keys", "generate", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let generated: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(generated["key"]["state"], "pending", "{generated}");
    assert!(
        generated["public_key_pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PUBLIC KEY-----")
    );
    let (code, stdout, stderr) = admin_cli(admin, key, &["keys", "list", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{listed}");
    rfc3339(&keys[0]["created_at"]);
}

#[test]
fn json_logs_hold_no_json_inside_strings_and_spell_codes_the_grpc_way() {
    let dir = tempfile::tempdir().unwrap();
    let (_fake, _) = fake_box(dir.path());
    // An API key too, so the listener's `accept` list is not empty.
    let config = dir.path().join("broker.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[policy]",
        &format!(
            "[[auth.api_keys]]\nidentity = \"portal\"\nsha256 = \"{}\"\n\n[policy]",
            "ab".repeat(32)
        ),
    );
    std::fs::write(&config, text).unwrap();
    let mut serve = Proc::spawn(
        Command::new(bin())
            .args(["serve", "--config"])
            .arg(dir.path().join("broker.toml"))
            .env("BOX_BROKER_SERVER__LISTEN", "127.0.0.1:0")
            .env("BOX_BROKER_LOG__FORMAT", "json")
            .env_remove("RUST_LOG"),
    );
    // Every line, kept: up to the listener's, and then up to the refusal's.
    let mut lines: Vec<String> = Vec::new();
    let mut until = |needle: &str| loop {
        let line = serve.stderr.recv_timeout(WAIT).unwrap();
        lines.push(line.clone());
        if line.contains(needle) {
            return line;
        }
    };
    let serving: serde_json::Value = serde_json::from_str(&until("\"serving gRPC\"")).unwrap();
    let addr = serving["fields"]["listen"].as_str().unwrap().to_owned();
    assert_eq!(serving["fields"]["accept"], "api_key", "{serving}");
    // A refusal: a user Box does not have.
    let (code, _, stderr) = token_get(&["--addr", &addr, "--user", "7999999"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("NOT_FOUND: "), "{stderr}");
    let refused: serde_json::Value = serde_json::from_str(&until("\"refused\"")).unwrap();
    assert_eq!(serve.terminate(), 0);
    lines.extend(serve.stderr.try_iter());
    assert_eq!(refused["fields"]["code"], "NOT_FOUND", "{refused}");
    assert_eq!(refused["span"]["code"], "NOT_FOUND", "{refused}");
    assert_eq!(refused["span"]["app"], "default", "{refused}");
    // No field of any line is JSON written into a string.
    for line in &lines {
        let log: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for section in ["fields", "span"] {
            for (name, value) in log[section].as_object().into_iter().flatten() {
                if let Some(text) = value.as_str() {
                    let nested = serde_json::from_str::<serde_json::Value>(text);
                    assert!(
                        !nested.is_ok_and(|v| v.is_array() || v.is_object()),
                        "{section}.{name} is JSON in a string: {line}"
                    );
                }
            }
        }
    }
}

#[test]
fn the_fake_box_serves_every_endpoint_its_help_lists() {
    use box_token_broker::fakebox::http::ENDPOINTS;
    let (code, help, _) = run(Command::new(bin()).args(["fake-box", "--help"]));
    assert_eq!(code, 0);
    let dev = Dev::start();
    let Dev {
        fake_url: url,
        client_id,
        kid,
        ..
    } = &dev;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    for endpoint in ENDPOINTS {
        assert!(help.contains(endpoint.path), "{} is not in --help", endpoint.path);
        let path = endpoint.path.replace("{client_id}", client_id).replace("{kid}", kid);
        let method = reqwest::Method::from_bytes(endpoint.method.as_bytes()).unwrap();
        let status = runtime.block_on(async {
            http.request(method, format!("{url}{path}"))
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap()
                .status()
        });
        // Served: an empty body may be refused, but the route exists (and
        // the app's own key, removed last, is found).
        assert!(
            ![reqwest::StatusCode::METHOD_NOT_ALLOWED, reqwest::StatusCode::NOT_FOUND].contains(&status),
            "{} {path}: {status}",
            endpoint.method
        );
    }
}

#[test]
fn the_readmes_client_secret_rotation_runs_against_dev_as_written() {
    let dev = Dev::start();
    let Dev {
        broker,
        admin,
        fake_url: url,
        client_id,
        key,
        ..
    } = &dev;
    // The console's Reset, at the fake: the old secret stops working.
    let new = "NewSecret0123456789abcdefghijklm";
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let status = runtime.block_on(async {
        reqwest::Client::new()
            .put(format!("{url}/_fake/apps/{client_id}/client_secret"))
            .json(&serde_json::json!({ "client_secret": new }))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, reqwest::StatusCode::NO_CONTENT);
    // echo "$NEW" | box-broker admin secret rotate
    let mut rotate = Command::new(bin())
        .args(["admin", "--addr", admin, "secret", "rotate"])
        .env("BOX_BROKER_ADMIN_KEY", key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        writeln!(rotate.stdin.take().unwrap(), "{new}").unwrap();
    }
    let out = rotate.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("rotated; 1 previous secret(s) kept"), "{stdout}");
    let (code, stdout, stderr) = admin_cli(admin, key, &["secret", "retire-previous"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("retired 1 previous secret(s)"), "{stdout}");
    // New mints use the new secret.
    let (code, _, stderr) = token_get(&["--addr", broker, "--enterprise", "--force-refresh"]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn bash_completion_completes_commands_and_flags() {
    let (code, script, stderr) = run(Command::new(bin()).args(["completions", "bash"]));
    assert_eq!(code, 0, "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("box-broker.bash");
    std::fs::write(&file, script).unwrap();
    // What bash offers for `box-broker che<TAB>` and `box-broker token get --ca<TAB>`.
    let complete = |words: &str| {
        let (code, stdout, stderr) = run(Command::new("bash").arg("-c").arg(format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             _box__broker box-broker \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\"; echo \"${{COMPREPLY[@]}}\"",
            file.display()
        )));
        assert_eq!(code, 0, "{stderr}");
        stdout.trim().to_owned()
    };
    assert_eq!(complete("box-broker che"), "check-config");
    assert_eq!(complete("box-broker token get --ca"), "--ca-file");
}

/// An edge config for a central broker at `central`, serving a Unix socket
/// in `dir`, plus `extra`.
pub(crate) fn edge_config(dir: &std::path::Path, central: &str, extra: &str) -> PathBuf {
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[central]\nendpoints = [\"http://{central}\"]\n\n[server]\nmetrics_listen = \"127.0.0.1:0\"\n\n\
             [server.unix_socket]\npath = \"{}\"\nidentity = \"app\"\n\n[log]\nformat = \"json\"\n{extra}",
            dir.join("edge.sock").display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn edge_and_check_config_refuse_an_edge_config_holding_a_box_credential_or_a_kek() {
    let dir = tempfile::tempdir().unwrap();
    for (extra, env, named) in [
        ("[apps.default]\nprivate_key_file = \"key.pem\"\n", None, "[apps]"),
        (
            "[keystore]\npath = \"keys.json\"\nkek_file = \"kek\"\n",
            None,
            "[keystore]",
        ),
        ("[audit]\nkek_env = \"KEK\"\n", None, "audit.kek_env"),
        (
            "",
            Some(("BOX_BROKER_APPS__DEFAULT__CLIENT_SECRET_FILE", "/run/secret")),
            "[apps]",
        ),
    ] {
        let config = edge_config(dir.path(), "127.0.0.1:1", extra);
        refused_by(
            "edge",
            &config,
            env,
            &["edge.toml", named, "not allowed in an edge config"],
        );
    }
    // TLS files that are not what they should be stop startup, naming them.
    std::fs::write(dir.path().join("ca.crt"), "not a certificate").unwrap();
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        "[central]\nendpoints = [\"https://box-broker.example:50051\"]\nca_file = \"ca.crt\"\n\
         [server.unix_socket]\npath = \"edge.sock\"\nidentity = \"app\"\n",
    )
    .unwrap();
    refused_by(
        "edge",
        &config,
        None,
        &["central.ca_file", "ca.crt", "no PEM certificate"],
    );
    // A central broker's `serve` does not take an edge config either.
    let config = edge_config(dir.path(), "127.0.0.1:1", "");
    let (code, _, stderr) = run(Command::new(bin()).args(["serve", "--config"]).arg(&config));
    assert_eq!(code, 64);
    assert!(stderr.contains("box-broker edge"), "{stderr}");
    let (code, stdout, stderr) = run(Command::new(bin()).arg("check-config").arg(&config));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok, an edge of http://127.0.0.1:1"), "{stdout}");
}

/// `dev` on free ports, once it serves: the process and its broker's gRPC address.
fn dev_central() -> (Proc, String) {
    let dev =
        Proc::spawn(Command::new(bin()).args(["dev", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]));
    let central = Proc::wait_line(&dev.stdout, "broker gRPC:")
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_owned();
    (dev, central)
}

/// `edge --config config` (its log as JSON, as the config says).
fn spawn_edge(config: &std::path::Path) -> Proc {
    Proc::spawn(
        Command::new(bin())
            .args(["edge", "--config"])
            .arg(config)
            .env_remove("RUST_LOG"),
    )
}

#[test]
fn edge_serves_its_pod_over_a_unix_socket_from_the_central_broker_and_stops_on_sigterm() {
    let (_dev, central) = dev_central();
    let dir = tempfile::tempdir().unwrap();
    let config = edge_config(dir.path(), &central, "");
    let mut edge = spawn_edge(&config);
    let metrics = Proc::wait_listen(&edge.stderr, "serving Prometheus metrics");
    Proc::wait_line(&edge.stderr, "no Box credential is held here");
    let socket = format!("unix:{}", dir.path().join("edge.sock").display());
    let get = || {
        let (code, stdout, stderr) = token_get(&["--addr", &socket, "--user", "7200001", "--json"]);
        assert_eq!(code, 0, "{stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()
    };
    let first = get();
    let again = get();
    assert_eq!(
        (first["cache_hit"].as_bool(), again["cache_hit"].as_bool()),
        (Some(false), Some(true))
    );
    assert_eq!(first["access_token"], again["access_token"]);
    // The central broker holds the same token: the edge asked it once.
    let (code, stdout, _) = token_get(&["--addr", &central, "--user", "7200001", "--json"]);
    assert_eq!(code, 0);
    let direct: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(direct["access_token"], first["access_token"]);
    assert_eq!(direct["cache_hit"], true);
    let scraped = scrape(&metrics);
    for line in [
        "boxbroker_edge_upstream_answers_total{method=\"GetToken\",code=\"OK\"} 1",
        "boxbroker_cache_lookups_total{method=\"GetToken\",result=\"hit\"} 1",
        "boxbroker_edge_circuit_state{endpoint=",
    ] {
        assert!(scraped.contains(line), "{line} in {scraped}");
    }
    assert!(!scraped.contains(first["access_token"].as_str().unwrap()));
    // The kubelet's probes, plain HTTP beside the metrics.
    let ready = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let response = reqwest::get(format!("http://{metrics}/readyz")).await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    });
    assert_eq!(ready, (200, "SERVING\n".to_owned()));
    assert_eq!(edge.terminate(), 0, "SIGTERM stops the edge cleanly");
    assert!(!dir.path().join("edge.sock").exists(), "the socket file is removed");
}

#[test]
fn an_edge_stopping_after_a_newer_one_bound_its_socket_path_leaves_the_newer_ones_socket() {
    let (_dev, central) = dev_central();
    let dir = tempfile::tempdir().unwrap();
    let config = edge_config(dir.path(), &central, "");
    let start = || {
        let edge = spawn_edge(&config);
        Proc::wait_line(&edge.stderr, "no Box credential is held here");
        edge
    };
    // An overlapping restart: the new edge binds the path while the old one still runs.
    let mut old = start();
    let _new = start();
    assert_eq!(old.terminate(), 0);
    let socket = dir.path().join("edge.sock");
    assert!(socket.exists(), "the old edge left the new edge's socket in place");
    let (code, stdout, stderr) = token_get(&["--addr", &format!("unix:{}", socket.display()), "--enterprise"]);
    assert_eq!(
        (code, stdout.trim().len()),
        (0, 32),
        "the new edge serves on it: {stderr}"
    );
}

#[test]
fn dev_with_edge_chains_app_edge_central_and_fake_box_in_one_command() {
    let dev = Proc::spawn(Command::new(bin()).args([
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--edge",
        "127.0.0.1:0",
    ]));
    let central = Proc::wait_line(&dev.stdout, "broker gRPC:")
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_owned();
    let edge = Proc::wait_line(&dev.stdout, "Edge sidecar:")
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_owned();
    let example = Proc::wait_line(&dev.stdout, "token get");
    assert!(example.contains(&edge), "{example}");
    let (code, stdout, stderr) = token_get(&["--addr", &edge, "--enterprise", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let through: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let (_, stdout, _) = token_get(&["--addr", &central, "--enterprise", "--json"]);
    let direct: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(through["access_token"], direct["access_token"]);
    assert_eq!(direct["cache_hit"], true, "the edge's request filled the central cache");
}
