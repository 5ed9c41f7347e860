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
    println!("cargo:rustc-env=BOX_BROKER_PROTOC={}", protoc.display());
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("boxbroker_descriptor.bin"))
        .skip_debug(SECRET_MESSAGES.iter().copied())
        .compile_with_config(
            config,
            &["proto/boxbroker/v1/broker.proto", "proto/boxbroker/v1/admin.proto"],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
