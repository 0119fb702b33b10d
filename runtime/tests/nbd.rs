//! The NBD server against a real client (qemu-io): a request that hangs
//! (a hung disk under the export) closes its connection after the request
//! timeout, so the client fails it instead of waiting forever; a read-only
//! export refuses writes and its secret names are not listed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::sync::Arc;
use std::time::Duration;

use ferry_runtime::nbd::{serve_with, Export, Exports, NbdError, NbdLimits};
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 1 << 20;

/// "disk": reads are zeros; writes hang unless `read_only`.
struct Hanging {
    read_only: bool,
}

impl Exports for Hanging {
    fn list(&self) -> Vec<String> {
        Vec::new()
    }

    fn export(&self, name: &str) -> Option<Export> {
        (name == "disk").then_some(Export {
            size: SIZE,
            read_only: self.read_only,
        })
    }

    async fn read(&self, _: &str, _: u64, length: u32) -> Result<Vec<u8>, NbdError> {
        Ok(vec![0; length as usize])
    }

    async fn write(&self, _: &str, _: u64, _: Vec<u8>) -> Result<(), NbdError> {
        std::future::pending().await
    }

    async fn zero(&self, _: &str, _: u64, _: u64, _: bool) -> Result<(), NbdError> {
        std::future::pending().await
    }

    async fn flush(&self, _: &str) -> Result<(), NbdError> {
        Ok(())
    }
}

/// Serves `exports`; its NBD URL base.
async fn server(exports: Hanging, limits: NbdLimits, stop: &CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("nbd://{}", listener.local_addr().unwrap());
    tokio::spawn(serve_with(
        listener,
        Arc::new(exports),
        limits,
        stop.clone(),
    ));
    url
}

/// `qemu-io` with `args`, given a minute at most; (status, stdout+stderr).
async fn qemu_io(args: &[&str]) -> (std::process::ExitStatus, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("qemu-io")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("qemu-io ends within a minute: the hung request was not cut")
    .expect("qemu-io runs (scripts/test.sh installs qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

#[tokio::test]
async fn a_hung_request_closes_its_connection_so_the_client_fails_it() {
    let stop = CancellationToken::new();
    let limits = NbdLimits {
        request_timeout: Some(Duration::from_millis(500)),
        ..NbdLimits::default()
    };
    let url = server(Hanging { read_only: false }, limits, &stop).await;
    let disk = format!("{url}/disk");
    let started = std::time::Instant::now();
    let (_, said) = qemu_io(&["-f", "raw", "-c", "write 0 4096", &disk]).await;
    assert!(
        said.contains("write failed"),
        "the hung write is failed to the client: {said}"
    );
    eprintln!(
        "the hung write failed after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Reads on a new connection are served as before.
    let (status, said) = qemu_io(&["-f", "raw", "-r", "-c", "read -P 0 0 4096", &disk]).await;
    assert!(status.success() && !said.contains("failed"), "{said}");
    stop.cancel();
}

#[tokio::test]
async fn a_read_only_export_refuses_writes_and_keeps_its_name_secret() {
    let stop = CancellationToken::new();
    let url = server(Hanging { read_only: true }, NbdLimits::default(), &stop).await;
    let disk = format!("{url}/disk");
    let (status, said) = qemu_io(&["-f", "raw", "-c", "write 0 4096", &disk]).await;
    assert!(
        !status.success() || said.contains("failed"),
        "a write into a read-only export: {said}"
    );
    let (status, said) = qemu_io(&["-f", "raw", "-r", "-c", "read -P 0 0 4096", &disk]).await;
    assert!(status.success() && !said.contains("failed"), "{said}");
    let listed = tokio::process::Command::new("nbdinfo")
        .args(["--list", &url])
        .output()
        .await
        .expect("nbdinfo runs (scripts/test.sh installs libnbd-bin)");
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains("disk"),
        "{listed:?}"
    );
    stop.cancel();
}
