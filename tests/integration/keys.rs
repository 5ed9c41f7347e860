//! Every private-key form a Box user may hold loads; bad keys, passphrases and
//! config files stop startup with one line naming the file and the problem.

use crate::common;

use std::path::PathBuf;

use box_token_broker::boxapi::{
    AuthMethod, CredentialSources,
    private_key::{KeyError, decode_private_key},
};
use common::{fixture, fixture_key, fixture_passphrase};
use rsa::traits::PublicKeyParts as _;
use secrecy::SecretString;

fn decode(name: &str, passphrase: Option<&SecretString>) -> Result<rsa::RsaPrivateKey, KeyError> {
    decode_private_key(&std::fs::read_to_string(fixture(name)).unwrap(), passphrase)
}

#[test]
fn every_form_of_the_same_key_decodes_to_that_key() {
    let expected = fixture_key();
    let pass = fixture_passphrase();
    for (name, passphrase) in [
        ("pkcs1.pem", None),
        ("pkcs8.pem", None),
        ("box_console.pem", Some(&pass)),
        ("pbes2_aes256_sha256.pem", Some(&pass)),
        ("scrypt.pem", Some(&pass)),
        ("traditional_des3.pem", Some(&pass)),
        ("traditional_aes256.pem", Some(&pass)),
    ] {
        let key = decode(name, passphrase).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(key.n(), expected.n(), "{name}");
    }
}

#[test]
fn keys_of_3072_and_4096_bits_decode() {
    let pass = fixture_passphrase();
    assert_eq!(decode("rsa3072_aes128.pem", Some(&pass)).unwrap().size() * 8, 3072);
    assert_eq!(
        decode("rsa4096_traditional_aes128.pem", Some(&pass)).unwrap().size() * 8,
        4096
    );
}

#[test]
fn a_wrong_passphrase_is_reported_for_every_encrypted_form() {
    let wrong = SecretString::from("not-the-passphrase".to_owned());
    for name in [
        "box_console.pem",
        "pbes2_aes256_sha256.pem",
        "scrypt.pem",
        "traditional_des3.pem",
        "traditional_aes256.pem",
        "rsa3072_aes128.pem",
    ] {
        assert_eq!(
            decode(name, Some(&wrong)).err(),
            Some(KeyError::WrongPassphrase),
            "{name}"
        );
    }
}

#[test]
fn an_encrypted_key_without_a_passphrase_says_so() {
    assert_eq!(
        decode("box_console.pem", None).err(),
        Some(KeyError::PassphraseRequired)
    );
    assert_eq!(
        decode("traditional_des3.pem", None).err(),
        Some(KeyError::PassphraseRequired)
    );
}

#[test]
fn small_and_non_rsa_keys_are_refused() {
    assert_eq!(decode("rsa1024.pem", None).err(), Some(KeyError::Size(1024)));
    assert_eq!(decode("ec_p256.pem", None).err(), Some(KeyError::NotRsa));
}

#[test]
fn the_box_console_download_loads() {
    let sources = CredentialSources {
        box_config_file: Some(fixture("box_config.json")),
        ..Default::default()
    };
    let creds = sources.load("default").unwrap();
    assert_eq!(creds.client_id, "abcdefghijklmnopqrstuvwxyz012345");
    assert_eq!(creds.enterprise_id.as_str(), "7000001");
    let AuthMethod::Jwt { key, .. } = &creds.auth else {
        panic!("a JWT app")
    };
    assert_eq!((key.kid(), key.bits()), ("fx1k2d3a", 2048));
}

/// The pieces as separate files, as Kubernetes Secret mounts provide them.
fn mounted(dir: &tempfile::TempDir, passphrase: &str) -> CredentialSources {
    let write = |name: &str, content: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    };
    CredentialSources {
        client_id: Some("clientid".to_owned()),
        client_secret_file: Some(write("client-secret", "s3cret-value\n")),
        enterprise_id: Some("7000001".to_owned()),
        public_key_id: Some("kid12345".to_owned()),
        private_key_file: Some(fixture("box_console.pem")),
        private_key_passphrase_file: Some(write("passphrase", &format!("{passphrase}\n"))),
        ..Default::default()
    }
}

#[test]
fn separate_secret_files_load_and_trailing_newlines_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let creds = mounted(&dir, "fixture-passphrase").load("default").unwrap();
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(&creds.client_secret),
        "s3cret-value"
    );
    assert!(matches!(creds.auth, AuthMethod::Jwt { .. }));
}

#[test]
fn a_separate_passphrase_file_overrides_the_jsons() {
    let dir = tempfile::tempdir().unwrap();
    let json = std::fs::read_to_string(fixture("box_config.json"))
        .unwrap()
        .replace("fixture-passphrase", "stale");
    let json_path = dir.path().join("box_config.json");
    std::fs::write(&json_path, json).unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "fixture-passphrase").unwrap();
    let mut sources = CredentialSources {
        box_config_file: Some(json_path),
        ..Default::default()
    };
    assert!(sources.load("default").is_err(), "the JSON's passphrase is stale");
    sources.private_key_passphrase_file = Some(pass);
    assert!(sources.load("default").is_ok());
}

#[test]
fn a_ccg_config_has_no_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ccg.json");
    std::fs::write(
        &path,
        r#"{"boxAppSettings":{"clientID":"c","clientSecret":"s"},"enterpriseID":"7000001"}"#,
    )
    .unwrap();
    let creds = CredentialSources {
        box_config_file: Some(path),
        ..Default::default()
    }
    .load("default")
    .unwrap();
    assert!(matches!(creds.auth, AuthMethod::Ccg));
}

#[test]
fn a_wrong_passphrase_error_names_the_file_and_not_the_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let err = mounted(&dir, "guess-0123456789")
        .load("default")
        .unwrap_err()
        .to_string();
    assert!(err.contains("box_console.pem"), "{err}");
    assert!(err.contains("wrong passphrase"), "{err}");
    assert!(!err.contains("guess-0123456789"), "{err}");
    assert!(!err.contains('\n'), "{err}");
}

// The binary itself: bad config stops it with exit code 64 and one line.

fn broker_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_box-broker"))
}

fn write_config(dir: &tempfile::TempDir, app_section: &str) -> PathBuf {
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        format!("[server]\nlisten = \"127.0.0.1:0\"\n[apps.default]\n{app_section}"),
    )
    .unwrap();
    path
}

fn check_config(path: &std::path::Path) -> (i32, String, String) {
    let out = std::process::Command::new(broker_bin())
        .arg("check-config")
        .arg(path)
        .env_remove("BOX_BROKER_SERVER__LISTEN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn check_config_accepts_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &format!("box_config_file = {:?}\n", fixture("box_config.json")));
    let (code, stdout, _) = check_config(&path);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("app default: JWT RS256, key fx1k2d3a (2048 bits"),
        "{stdout}"
    );
}

#[test]
fn check_config_rejects_a_wrong_passphrase_with_exit_64_and_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let json = std::fs::read_to_string(fixture("box_config.json"))
        .unwrap()
        .replace("fixture-passphrase", "wrong-pass-4242");
    std::fs::write(dir.path().join("box_config.json"), json).unwrap();
    let path = write_config(&dir, "box_config_file = \"box_config.json\"\n");
    let (code, _, stderr) = check_config(&path);
    assert_eq!(code, 64);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("box_config.json") && stderr.contains("wrong passphrase"),
        "{stderr}"
    );
    assert!(!stderr.contains("wrong-pass-4242"), "{stderr}");
}

#[test]
fn check_config_rejects_malformed_json_with_exit_64_and_one_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("box_config.json"),
        "{\"boxAppSettings\": {\"clientSecret\": \"abc123secret\",}",
    )
    .unwrap();
    let path = write_config(&dir, "box_config_file = \"box_config.json\"\n");
    let (code, _, stderr) = check_config(&path);
    assert_eq!(code, 64);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("box_config.json: not valid JSON"), "{stderr}");
    assert!(!stderr.contains("abc123secret"), "{stderr}");
}

#[test]
fn check_config_rejects_an_unsupported_key_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s").unwrap();
    let path = write_config(
        &dir,
        &format!(
            "client_id = \"c\"\nenterprise_id = \"1\"\npublic_key_id = \"k\"\nclient_secret_file = {secret:?}\nprivate_key_file = {:?}\n",
            fixture("ec_p256.pem")
        ),
    );
    let (code, _, stderr) = check_config(&path);
    assert_eq!(code, 64);
    assert!(
        stderr.contains("ec_p256.pem") && stderr.contains("not an RSA key"),
        "{stderr}"
    );
}

#[test]
fn check_config_names_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, "box_config_file = \"nope.json\"\n");
    let (code, _, stderr) = check_config(&path);
    assert_eq!(code, 64);
    assert!(stderr.contains("nope.json: cannot read"), "{stderr}");
}

#[test]
fn check_config_validates_the_policy_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policy.toml"),
        "[[rules]]\nname = \"r\"\ncallers = [\"apikey:x\"]\nfull_tokens = true\n",
    )
    .unwrap();
    let path = write_config(
        &dir,
        &format!(
            "box_config_file = {:?}\n[policy]\nfile = \"policy.toml\"\n",
            fixture("box_config.json")
        ),
    );
    let (code, _, stderr) = check_config(&path);
    assert_eq!(code, 64);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("policy.toml: rule \"r\": grants no subject"),
        "{stderr}"
    );
}
