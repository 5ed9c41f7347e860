//! Compiles `proto/` with tonic-prost-build and writes the file descriptor set
//! that gRPC reflection serves.

use std::{env, error::Error, path::PathBuf};

/// Messages that carry a credential. prost would derive a `Debug` that prints
/// every field; for these we write `Debug` by hand in `src/pb.rs` instead.
const SECRET_MESSAGES: &[&str] = &[
    "boxbroker.v1.AccessToken",
    "boxbroker.v1.RevokeTokenRequest",
    "boxbroker.v1.ImportKeyRequest",
    "boxbroker.v1.RotateClientSecretRequest",
];

fn main() -> Result<(), Box<dyn Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    // A vendored protoc keeps the build free of system packages; an explicit
    // PROTOC from the environment still wins.
    let protoc = match env::var_os("PROTOC") {
        Some(protoc) => PathBuf::from(protoc),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    config.protoc_executable(&protoc);
    // The same protoc for the tests that check the protos' packaging options
    // with its Java and C# generators.
    println!("cargo:rustc-env=BROKER_BUILD_PROTOC={}", protoc.display());
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("boxbroker_descriptor.bin"))
        .skip_debug(SECRET_MESSAGES.iter().copied())
        .compile_with_config(
            config,
            &["proto/boxbroker/v1/broker.proto", "proto/boxbroker/v1/admin.proto"],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    // boxbroker_build_info's labels: the commit, when the build is told it
    // (BOX_BROKER_GIT_COMMIT=$(git rev-parse --short HEAD) cargo build ...;
    // reading .git here would go stale or rebuild on every commit), and the
    // compiler.
    println!("cargo:rerun-if-env-changed=BOX_BROKER_GIT_COMMIT");
    let commit = env::var("BOX_BROKER_GIT_COMMIT").unwrap_or_else(|_| "unknown".to_owned());
    println!("cargo:rustc-env=BROKER_BUILD_COMMIT={commit}");
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let version = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=BROKER_BUILD_RUSTC={version}");
    Ok(())
}
