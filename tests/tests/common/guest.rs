//! The tiny guest of scripts/guest.sh: built once under the target
//! directory, booted under QEMU's software emulation, its console read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ferry_proto::registry::v1 as reg;
use ferry_testkit::{bin_path, run_tool, Cluster};

/// The guest's data disk.
pub const SIZE: u64 = 64 << 20;

/// The guest's kernel and initramfs, built once under the target directory.
pub fn guest() -> PathBuf {
    let target = bin_path("ferry")
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("guest");
    if let Err(e) = ferry_testkit::libvirt::build_guest(&target) {
        panic!("{e}");
    }
    target
}

/// QEMU booting the guest with `disk` (`-drive` or `-blockdev` arguments)
/// and `args` on its command line, its console on stdout.
pub fn qemu(guest: &Path, disk: &[String], args: &str) -> tokio::process::Command {
    let mut qemu = tokio::process::Command::new("qemu-system-x86_64");
    qemu.args([
        "-machine", "pc", "-accel", "tcg", "-cpu", "max", "-m", "256",
    ])
    .args([
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
    ])
    .arg("-kernel")
    .arg(guest.join("vmlinuz"))
    .arg("-initrd")
    .arg(guest.join("initrd.gz"))
    .arg("-append")
    .arg(format!("console=ttyS0 panic=-1 quiet {args}"))
    .args(disk)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .kill_on_drop(true);
    qemu
}

/// `-drive` arguments for `drive` (a file or an nbd:// URL).
pub fn drive(drive: &str) -> Vec<String> {
    vec![
        "-drive".into(),
        format!("file={drive},format=raw,if=virtio,cache=none"),
    ]
}

/// Each file the console shows with its checksum. Panics unless the guest
/// finished (FERRY-DONE) without a FERRY-ERROR.
pub fn files(console: &str) -> BTreeMap<String, String> {
    assert!(
        console.contains("FERRY-DONE") && !console.contains("FERRY-ERROR"),
        "{console}"
    );
    console
        .lines()
        .filter_map(|l| {
            // Anywhere in the line: a kernel message may share it.
            let at = l.find("FERRY-FILE ")?;
            let mut words = l[at + "FERRY-FILE ".len()..].split_whitespace();
            Some((words.next()?.to_string(), words.next()?.to_string()))
        })
        .collect()
}

/// Boots the guest on `disk` with `args` and returns the files its console
/// showed once it powered off; within 5 minutes.
pub async fn boot(guest: &Path, disk: &[String], args: &str) -> BTreeMap<String, String> {
    let out = tokio::time::timeout(Duration::from_secs(300), qemu(guest, disk, args).output())
        .await
        .expect("the guest powers off within 5 minutes")
        .expect("qemu-system-x86_64 runs (scripts/test.sh installs qemu-system-x86)");
    assert!(out.status.success(), "qemu: {}", out.status);
    files(&String::from_utf8_lossy(&out.stdout))
}

/// Protects "vm" in `cluster`: one disk (in a new tempdir, which the
/// agent's state directory goes beside) holding an empty ext4 filesystem,
/// points every second; `spec` may change its registration (a shape, a
/// NIC). The tempdir and the disk's path.
pub async fn ext4_vm(
    cluster: &Cluster,
    spec: impl FnOnce(reg::Vm) -> reg::Vm,
) -> (tempfile::TempDir, PathBuf) {
    let registry = cluster.registry.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("vm-os.raw");
    let path = source.to_str().unwrap();
    run_tool(
        "qemu-img",
        &["create", "-f", "raw", path, &SIZE.to_string()],
    );
    run_tool("mkfs.ext4", &["-q", "-F", path]);
    super::policy(&registry, "fast", Duration::from_secs(1)).await;
    let vm = spec(ferry_testkit::vm_spec("vm", &[("os", SIZE, &source)]));
    ferry_testkit::protect_spec(&registry, vm, "fast").await;
    (dir, source)
}

/// A cluster protecting "vm" as [`ext4_vm`] does.
pub async fn protected_ext4_vm() -> (Cluster, tempfile::TempDir, PathBuf) {
    let cluster = Cluster::start().await;
    let (dir, source) = ext4_vm(&cluster, |s| s).await;
    (cluster, dir, source)
}

/// The address the guest's console says DHCP gave it (`FERRY-IP`).
pub fn leased_ip(console: &str) -> Option<String> {
    console.lines().find_map(|l| {
        let at = l.find("FERRY-IP ")?;
        l[at + "FERRY-IP ".len()..]
            .split_whitespace()
            .next()
            .map(str::to_string)
    })
}

/// The console of a guest started with [`qemu`], read as it comes: the
/// text so far, and the task reading it (ends when QEMU does).
pub fn console(
    vm: &mut tokio::process::Child,
) -> (
    std::sync::Arc<std::sync::Mutex<String>>,
    tokio::task::JoinHandle<()>,
) {
    let console = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stdout = vm.stdout.take().unwrap();
    let text = console.clone();
    let reader = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf).await {
            if n == 0 {
                break;
            }
            text.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (console, reader)
}

/// Waits (2 minutes at most) until a point of "vm" cut at `processor`
/// reads back as `image` (the truth: the source, or a guest's own disk)
/// byte for byte; that point.
pub async fn point_equal_to(
    processor: &str,
    image: &Path,
) -> ferry_proto::processor::v1::RecoveryPoint {
    use ferry_testkit::points::{cut_latest, read_disk};
    let want = std::fs::read(image).unwrap();
    ferry_testkit::wait_for(
        "a point equal to the VM's disk",
        Duration::from_secs(120),
        || {
            let (processor, want) = (processor.to_string(), want.clone());
            async move {
                let point = cut_latest(&processor, "vm").await.ok()?;
                (read_disk(&processor, "vm", &point, "os").await == want).then_some(point)
            }
        },
    )
    .await
}
