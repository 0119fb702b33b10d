//! Service binaries as child processes.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::Insecure;

/// A loopback address with a port free right now, for a service that must
/// be told its address before it starts. Ports come from 20000..32000, below
/// Linux's ephemeral range, so that an in-process service binding port 0 in
/// the meantime cannot be handed the same one; no port is handed out twice
/// by one test process.
pub fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Spread test processes over the range by their pid.
    let start = std::process::id() % 12000;
    for _ in 0..12000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20000 + ((start + n * 7919) % 12000) as u16;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            if let Ok(addr) = listener.local_addr() {
                return addr;
            }
        }
    }
    panic!("no free port in 20000..32000");
}

/// The path of a workspace binary, beside the running test executable
/// (`target/<profile>/deps/<test>`) or the running binary
/// (`target/<profile>/ferry-loadgen`).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let beside = exe.parent().expect("an executable lives in a directory");
    let dir = match beside.file_name() {
        Some(d) if d == "deps" => beside.parent().unwrap_or(beside),
        _ => beside,
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo test --workspace builds them)",
        path.display()
    );
    path
}

/// A service binary running as a child process on a loopback port, in
/// plaintext with `--insecure` and the test's cluster secret (a binary
/// refuses plaintext otherwise): every call to it needs credentials from
/// the same [`Insecure`].
pub struct ServiceProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    binary: PathBuf,
    args: Vec<String>,
    /// Kept so that the secret's files outlive the process (restarts read
    /// them again); None for TLS ([`ServiceProcess::start_tls`]).
    _insecure: Option<Insecure>,
}

impl ServiceProcess {
    /// Starts `binary --listen <free port> --data-dir <data_dir>
    /// <insecure's args> <args...>`.
    pub fn start(
        insecure: &Insecure,
        binary: impl AsRef<Path>,
        data_dir: impl AsRef<Path>,
        args: &[&str],
    ) -> Self {
        Self::start_at(insecure, free_addr(), binary, data_dir, args)
    }

    /// Starts `binary` listening on `addr`.
    pub fn start_at(
        insecure: &Insecure,
        addr: SocketAddr,
        binary: impl AsRef<Path>,
        data_dir: impl AsRef<Path>,
        args: &[&str],
    ) -> Self {
        let mut all = insecure.args(binary.as_ref());
        all.extend(args.iter().map(|a| a.to_string()));
        Self::spawned(
            addr,
            binary.as_ref(),
            data_dir.as_ref(),
            all,
            Some(insecure.clone()),
        )
    }

    /// Starts `binary --listen <free port> --data-dir <data_dir> <args...>`
    /// where `args` give its TLS flags (`--tls-cert`, `--tls-key`,
    /// `--tls-ca`): no `--insecure`. Its URL is then `https://`.
    pub fn start_tls(binary: impl AsRef<Path>, data_dir: impl AsRef<Path>, args: &[&str]) -> Self {
        let args = args.iter().map(|a| a.to_string()).collect();
        Self::spawned(free_addr(), binary.as_ref(), data_dir.as_ref(), args, None)
    }

    fn spawned(
        addr: SocketAddr,
        binary: &Path,
        data_dir: &Path,
        args: Vec<String>,
        insecure: Option<Insecure>,
    ) -> Self {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut process = ServiceProcess {
            child: spawn(binary, addr, data_dir, &refs),
            addr,
            data_dir: data_dir.to_path_buf(),
            binary: binary.to_path_buf(),
            args,
            _insecure: insecure,
        };
        process.check_alive();
        process
    }

    /// `http://<addr>`, or `https://<addr>` when started with TLS.
    pub fn url(&self) -> String {
        let scheme = if self._insecure.is_some() {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Panics if the process has exited already.
    pub fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early: {status}", self.binary.display());
        }
    }

    /// Sends a signal (e.g. "TERM", "KILL") and waits for the exit.
    pub fn signal_and_wait(&mut self, signal: &str) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
        self.child.wait().expect("wait for child")
    }

    /// Starts the same binary again on the same address and data directory.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.child = spawn(&self.binary, self.addr, &self.data_dir, &args);
    }
}

fn spawn(binary: &Path, addr: SocketAddr, data_dir: &Path, args: &[&str]) -> Child {
    Command::new(binary)
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("FERRY_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()))
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
