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

use common::succeed;
use ferry_proto::failover::v1 as fo;
use ferry_testkit::points::{cut_latest, list_points, read_disk};
use ferry_testkit::{bin_path, protect_vm_with, run_tool, Cluster};

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

/// Boots the guest on `drive` (a file or an nbd:// URL) with `args` on its
/// command line and returns its console once it has powered off: each file
/// it printed with its checksum. Panics on a FERRY-ERROR line or when it
/// does not finish within 5 minutes.
async fn boot(guest: &Path, drive: &str, args: &str) -> BTreeMap<String, String> {
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
    .arg("-drive")
    .arg(format!("file={drive},format=raw,if=virtio,cache=none"))
    .stdin(Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), qemu.output())
        .await
        .expect("the guest powers off within 5 minutes")
        .expect("qemu-system-x86_64 runs (scripts/test.sh installs qemu-system-x86)");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && console.contains("FERRY-DONE") && !console.contains("FERRY-ERROR"),
        "{}: {console}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guests_files_survive_protection_and_failover_byte_for_byte() {
    let guest = guest();
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
    let (agent, nbd) = common::protected_agent(&registry, "vm", &dir.path().join("agent")).await;

    let booted = std::time::SystemTime::now();
    let written = boot(
        &guest,
        &format!("{nbd}/os"),
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
    let (job, _) = succeed(
        &url,
        common::failover_request(
            "vm",
            fo::FailoverKind::Test,
            fo::point_choice::Choice::PointId(point.id.clone()),
            "isolated",
        ),
    )
    .await;
    assert_eq!(job.points[0].point_id, point.id);
    let vms = common::target_vms(&url).await;
    let disk = &vms.iter().find(|v| v.test).unwrap().disks[0].path;
    run_tool("e2fsck", &["-fn", disk]);
    let read = boot(&guest, disk, "ferry.mode=verify").await;
    assert_eq!(read, written);
    agent.stop(Duration::from_secs(5)).await.unwrap();
    cluster.stop().await;
}
