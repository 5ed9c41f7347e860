//! `box-broker keygen`: an RSA key pair for a Box JWT app, the private key
//! encrypted with a fresh passphrase, the public key printed for upload.

use std::{
    fs::OpenOptions,
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Args;
use rand::RngCore as _;
use rsa::{
    RsaPrivateKey,
    pkcs8::{EncodePublicKey as _, LineEnding},
};
use secrecy::{ExposeSecret as _, SecretString};

use super::{EXIT_CONFIG, fail};
use crate::boxapi::{
    SigningKey,
    private_key::{KeyEncryption, encrypt_private_key},
};

/// `keygen` options.
#[derive(Debug, Args)]
pub(super) struct KeygenArgs {
    /// Directory to write private_key.pem, passphrase and public_key.pem into.
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
    /// RSA modulus size.
    #[arg(long, default_value_t = 2048, value_parser = parse_bits)]
    bits: usize,
}

fn parse_bits(s: &str) -> Result<usize, String> {
    match s {
        "2048" => Ok(2048),
        "3072" => Ok(3072),
        "4096" => Ok(4096),
        _ => Err("must be 2048, 3072 or 4096".to_owned()),
    }
}

/// Runs `keygen`.
pub(super) fn run(args: &KeygenArgs) -> ExitCode {
    match generate(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => fail(code, &message),
    }
}

fn generate(args: &KeygenArgs) -> Result<(), (u8, String)> {
    let dir = &args.out_dir;
    std::fs::create_dir_all(dir).map_err(|e| (1, format!("{}: cannot create: {e}", dir.display())))?;
    let paths = ["private_key.pem", "passphrase", "public_key.pem"].map(|n| dir.join(n));
    if let Some(existing) = paths.iter().find(|p| p.exists()) {
        return Err((
            EXIT_CONFIG,
            format!("{}: already exists; refusing to overwrite a key", existing.display()),
        ));
    }
    let key = RsaPrivateKey::new(&mut rand::rngs::OsRng, args.bits)
        .map_err(|e| (1, format!("key generation failed: {e}")))?;
    let mut raw = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    // 32 hex characters, like the passphrases the Box console generates.
    let passphrase = SecretString::from(hex::encode(raw));
    let pem = encrypt_private_key(&key, &passphrase, KeyEncryption::Modern).map_err(|e| (1, e.to_string()))?;
    let public = key
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| (1, format!("public key encoding failed: {e}")))?;
    let fingerprint = SigningKey::new("unassigned", &key)
        .map_err(|e| (1, e.to_string()))?
        .fingerprint()
        .to_owned();
    write_new(&paths[0], pem.expose_secret(), Readers::Owner)?;
    write_new(&paths[1], passphrase.expose_secret(), Readers::Owner)?;
    write_new(&paths[2], &public, Readers::Anyone)?;
    out!(
        "Wrote {} (encrypted), {} and {}.",
        paths[0].display(),
        paths[1].display(),
        paths[2].display()
    );
    out!("Public key (SHA-256 {fingerprint}):\n\n{public}");
    out!("Next: in the Box developer console, open the app's Configuration > Add and Manage Public Keys,");
    out!("add this public key, and put the ID Box shows into the broker config as public_key_id,");
    out!("with private_key_file and private_key_passphrase_file pointing at the files above.");
    Ok(())
}

/// Who may read a file `keygen` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readers {
    /// Its owner only (mode 0600): a private key or a passphrase.
    Owner,
    /// Whoever the umask allows: a public key.
    Anyone,
}

/// Creates `path` (never overwriting), owner-only for `Readers::Owner`.
fn write_new(path: &Path, content: &str, readers: Readers) -> Result<(), (u8, String)> {
    let secret = readers == Readers::Owner;
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options
        .open(path)
        .map_err(|e| (1, format!("{}: cannot create: {e}", path.display())))?;
    file.write_all(content.as_bytes())
        .map_err(|e| (1, format!("{}: cannot write: {e}", path.display())))?;
    file.sync_all()
        .map_err(|e| (1, format!("{}: cannot sync: {e}", path.display())))
}
