//! Node with the example client's packages (`examples/clients/node`:
//! @grpc/grpc-js and @grpc/proto-loader), for the interoperability tests.
//!
//! `npm ci` from the example's lock file into a directory under
//! `CARGO_TARGET_TMPDIR` (a few seconds the first time), reused while the
//! lock file is unchanged. `BOX_BROKER_TEST_NODE_MODULES` names an
//! installed `node_modules` instead (a machine without the npm registry).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

/// The example client's directory.
pub fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/clients/node")
}

/// A `node_modules` directory holding the example's packages.
pub fn node_modules() -> &'static Path {
    static MODULES: OnceLock<PathBuf> = OnceLock::new();
    MODULES.get_or_init(|| {
        if let Some(dir) = std::env::var_os("BOX_BROKER_TEST_NODE_MODULES") {
            return PathBuf::from(dir);
        }
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("node-interop");
        let lock = std::fs::read_to_string(example_dir().join("package-lock.json")).unwrap();
        let installed = dir.join("package-lock.json");
        if std::fs::read_to_string(&installed).ok().as_deref() != Some(&lock) || !dir.join("node_modules").is_dir() {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(example_dir().join("package.json"), dir.join("package.json")).unwrap();
            std::fs::write(&installed, &lock).unwrap();
            let out = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
                .current_dir(&dir)
                .output()
                .unwrap_or_else(|e| panic!("npm (Node.js 18 or later is needed for these tests): {e}"));
            assert!(
                out.status.success(),
                "npm ci failed (or set BOX_BROKER_TEST_NODE_MODULES): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        dir.join("node_modules")
    })
}

/// A command running the example client with its packages.
pub fn client(args: &[&str]) -> Command {
    let mut command = Command::new("node");
    command
        .arg(example_dir().join("broker_client.js"))
        .args(args)
        .env("NODE_PATH", node_modules());
    command
}
