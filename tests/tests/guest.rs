//! A real guest: a Linux VM (scripts/guest.sh: Debian's kernel, busybox)
//! booted under QEMU's software emulation with its disk on the agent's NBD
//! export writes files to ext4 and prints each one's checksum once it is
//! synced. Every point cut while it ran is a clean ext4 once its journal is
//! replayed (`e2fsck -fn`). The point cut after it shut down is failed over;
//! the failed-over disk is clean, and a second guest booted from it prints
//! every file with the checksum the first one printed.

mod common;

use std::path::Path;
use std::time::Duration;

use common::guest::{boot, drive, files, guest, protected_ext4_vm, qemu};
use ferry_proto::failover::v1 as fo;
use ferry_testkit::points::{cut_latest, list_points, read_disk};
use ferry_testkit::{run_tool, wait_for};

const FILES: usize = 60;

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
    let (console, reader) = common::guest::console(&mut vm);
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
    let processor = cluster.processor.url.clone();
    let point = common::guest::point_equal_to(&processor, &source).await;
    let image = dir.path().join("point.raw");
    std::fs::write(&image, read_disk(&processor, "vm", &point, "os").await).unwrap();
    run_tool("e2fsck", &["-fn", image.to_str().unwrap()]);
    let read = boot(&guest, &drive(image.to_str().unwrap()), "ferry.mode=verify").await;
    assert_eq!(read, written);
    agent.kill().unwrap();
    agent.wait().unwrap();
    cluster.stop().await;
}
