//! A real guest: a Linux VM (scripts/guest.sh: Debian's kernel, busybox)
//! booted under QEMU's software emulation with its disk on the agent's NBD
//! export writes files to ext4 and prints each one's checksum once it is
//! synced. Every point cut while it ran is a clean ext4 once its journal is
//! replayed (`e2fsck -fn`). The point cut after it shut down is failed over;
//! the failed-over disk is clean, and a second guest booted from it prints
//! every file with the checksum the first one printed.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ferry_proto::failover::v1 as fo;
use ferry_testkit::points::{cut_latest, list_points, read_disk};
use ferry_testkit::{bin_path, protect_vm_with, run_tool, wait_for, Cluster};

const SIZE: u64 = 64 << 20;
const FILES: usize = 60;

/// The guest's kernel and initramfs, built once under the target directory.
fn guest() -> PathBuf {
    let target = bin_path("ferry")
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("guest");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/guest.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/guest.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    target
}

/// QEMU booting the guest with `disk` (`-drive` or `-blockdev` arguments)
/// and `args` on its command line, its console on stdout.
fn qemu(guest: &Path, disk: &[String], args: &str) -> tokio::process::Command {
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
fn drive(drive: &str) -> Vec<String> {
    vec![
        "-drive".into(),
        format!("file={drive},format=raw,if=virtio,cache=none"),
    ]
}

/// Each file the console shows with its checksum. Panics unless the guest
/// finished (FERRY-DONE) without a FERRY-ERROR.
fn files(console: &str) -> BTreeMap<String, String> {
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
async fn boot(guest: &Path, disk: &[String], args: &str) -> BTreeMap<String, String> {
    let out = tokio::time::timeout(Duration::from_secs(300), qemu(guest, disk, args).output())
        .await
        .expect("the guest powers off within 5 minutes")
        .expect("qemu-system-x86_64 runs (scripts/test.sh installs qemu-system-x86)");
    assert!(out.status.success(), "qemu: {}", out.status);
    files(&String::from_utf8_lossy(&out.stdout))
}

/// A cluster protecting "vm", whose one disk (in the tempdir, which the
/// agent's state directory goes beside) is an empty ext4 filesystem;
/// points every second.
async fn protected_ext4_vm() -> (Cluster, tempfile::TempDir, PathBuf) {
    let cluster = Cluster::start().await;
    let registry = cluster.registry.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("vm-os.raw");
    let path = source.to_str().unwrap();
    run_tool(
        "qemu-img",
        &["create", "-f", "raw", path, &SIZE.to_string()],
    );
    run_tool("mkfs.ext4", &["-q", "-F", path]);
    common::policy(&registry, "fast", Duration::from_secs(1)).await;
    protect_vm_with(&registry, "vm", &[("os", SIZE, &source)], "fast").await;
    (cluster, dir, source)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guests_files_survive_protection_and_failover_byte_for_byte() {
    let guest = guest();
    let (cluster, dir, _) = protected_ext4_vm().await;
    let registry = cluster.registry.url.clone();
    let (agent, nbd) = common::protected_agent(&registry, "vm", &dir.path().join("agent")).await;

    let booted = std::time::SystemTime::now();
    let written = boot(
        &guest,
        &drive(&format!("{nbd}/os")),
        &format!("ferry.mode=write ferry.files={FILES}"),
    )
    .await;
    assert_eq!(written.len(), FILES, "{written:?}");
    let powered_off = std::time::SystemTime::now();
    agent.stream.flushed().await;
    let point = cut_latest(&cluster.processor.url, "vm").await.unwrap();

    // Every point cut while the guest ran is a crash-consistent ext4: clean
    // once its journal is replayed.
    let during: Vec<_> = list_points(&cluster.processor.url, "vm")
        .await
        .into_iter()
        .filter(|p| {
            p.created_at.is_some_and(|t| {
                let t = std::time::SystemTime::try_from(t).unwrap();
                t > booted && t < powered_off
            })
        })
        .collect();
    assert!(!during.is_empty(), "no point was cut while the guest ran");
    eprintln!("{} points cut while the guest ran", during.len());
    for p in &during {
        let image = dir.path().join(format!("{}.raw", p.id));
        std::fs::write(
            &image,
            read_disk(&cluster.processor.url, "vm", p, "os").await,
        )
        .unwrap();
        let image = image.to_str().unwrap();
        let replay = std::process::Command::new("e2fsck")
            .args(["-E", "journal_only", "-y", image])
            .output()
            .unwrap();
        // 0: nothing to do; 1: the journal was replayed.
        assert!(
            matches!(replay.status.code(), Some(0 | 1)),
            "{}: {}{}",
            p.id,
            String::from_utf8_lossy(&replay.stdout),
            String::from_utf8_lossy(&replay.stderr)
        );
        run_tool("e2fsck", &["-fn", image]);
    }

    let url = cluster.failover.url.clone();
    common::isolated_network(&url).await;
    let job = common::test_failover(
        &url,
        "vm",
        fo::point_choice::Choice::PointId(point.id.clone()),
    )
    .await;
    assert_eq!(job.points[0].point_id, point.id);
    let vms = common::target_vms(&url).await;
    let disk = &vms.iter().find(|v| v.test).unwrap().disks[0].path;
    run_tool("e2fsck", &["-fn", disk]);
    let read = boot(&guest, &drive(disk), "ferry.mode=verify").await;
    assert_eq!(read, written);
    agent.stop(Duration::from_secs(5)).await.unwrap();
    cluster.stop().await;
}

/// The agent as a process (SIGKILL is the fault) for `registry`'s "vm",
/// its NBD export at `nbd`.
fn agent_process(
    registry: &str,
    insecure: &ferry_testkit::Insecure,
    nbd: std::net::SocketAddr,
    dir: &Path,
) -> std::process::Child {
    ferry_testkit::agent_command(registry, "vm", ferry_testkit::AgentAuth::Token(insecure))
        .args([
            "--nbd-listen",
            &nbd.to_string(),
            "--group-listen",
            "127.0.0.1:0",
        ])
        .arg("--state-dir")
        .arg(dir.join("agent"))
        .arg("--disk-root")
        .arg(dir)
        .spawn()
        .unwrap()
}

/// The agent SIGKILLed while the guest writes, and started again: the
/// guest never notices beyond a pause (QEMU's NBD client reconnects), every
/// write it made completes, and after the agent's checksum resync a point
/// equals the source disk byte for byte, is clean ext4, and boots into a
/// guest that shows every file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_runs_on_through_a_sigkill_of_its_agent() {
    let guest = guest();
    let (cluster, dir, source) = protected_ext4_vm().await;
    let registry = cluster.registry.url.clone();
    let insecure = ferry_testkit::Insecure::new();
    let nbd = ferry_testkit::free_addr();
    let mut agent = agent_process(&registry, &insecure, nbd, dir.path());
    common::wait_protected(&registry, "vm").await;

    // The guest's disk on the export, reconnecting for up to a minute.
    let disk = vec![
        "-blockdev".to_string(),
        format!(
            "driver=nbd,node-name=os,server.type=inet,server.host={},server.port={},export=os,reconnect-delay=60",
            nbd.ip(),
            nbd.port()
        ),
        "-device".to_string(),
        "virtio-blk-pci,drive=os".to_string(),
    ];
    let mut vm = qemu(
        &guest,
        &disk,
        &format!("ferry.mode=write ferry.files={FILES}"),
    )
    .spawn()
    .unwrap();
    let console = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let console = console.clone();
        let mut stdout = vm.stdout.take().unwrap();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                console
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let written_so_far = |n: usize| {
        let console = console.clone();
        move || {
            let done = console.lock().unwrap().matches("FERRY-FILE ").count() >= n;
            async move { done.then_some(()) }
        }
    };
    wait_for(
        "the guest to write 10 files",
        Duration::from_secs(120),
        written_so_far(10),
    )
    .await;
    agent.kill().unwrap();
    agent.wait().unwrap();
    let mut agent = agent_process(&registry, &insecure, nbd, dir.path());
    let status = tokio::time::timeout(Duration::from_secs(300), vm.wait())
        .await
        .expect("the guest finishes within 5 minutes")
        .unwrap();
    reader.await.unwrap();
    assert!(status.success(), "qemu: {status}");
    let written = files(&console.lock().unwrap());
    assert_eq!(written.len(), FILES, "{written:?}");

    // The source is the truth now: a point must come to equal it.
    let want = std::fs::read(&source).unwrap();
    let processor = cluster.processor.url.clone();
    let point = wait_for(
        "a point equal to the source after the resync",
        Duration::from_secs(120),
        || {
            let (processor, want) = (processor.clone(), want.clone());
            async move {
                let point = cut_latest(&processor, "vm").await.ok()?;
                (read_disk(&processor, "vm", &point, "os").await == want).then_some(point)
            }
        },
    )
    .await;
    let image = dir.path().join("point.raw");
    std::fs::write(&image, read_disk(&processor, "vm", &point, "os").await).unwrap();
    run_tool("e2fsck", &["-fn", image.to_str().unwrap()]);
    let read = boot(&guest, &drive(image.to_str().unwrap()), "ferry.mode=verify").await;
    assert_eq!(read, written);
    agent.kill().unwrap();
    agent.wait().unwrap();
    cluster.stop().await;
}
