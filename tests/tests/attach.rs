//! Protecting a VM that runs already (capture by active mirror): a guest
//! (scripts/guest.sh) boots on its own ext4 disk with a QMP socket and
//! writes files; only then does `ferry-agent --attach-qmp` start, mirror
//! the drive into its export and replicate it. The agent is SIGKILLed
//! while the guest writes on (the guest never notices), and a new agent
//! returns: its mirror's sync sends only what changed meanwhile. Every
//! point cut during the run is a clean ext4 once its journal is replayed,
//! the last equals the guest's own disk byte for byte, SIGTERM detaches
//! the agent cleanly and `ferry-agent detach` finds nothing left.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::guest::{boot, drive, files, guest, qemu, SIZE};
use ferry_agent::qmp::Qmp;
use ferry_testkit::points::{list_points, read_disk};
use ferry_testkit::scrape::sample;
use ferry_testkit::{run_tool, wait_for, Cluster};
use serde_json::json;

const FILES: usize = 150;

/// The agent as a process, attached through `qmp` to drive "os".
fn agent(
    registry: &str,
    insecure: &ferry_testkit::Insecure,
    dir: &Path,
    metrics: &str,
) -> common::Killed {
    common::Killed(
        ferry_testkit::agent_command(registry, "vm", ferry_testkit::AgentAuth::Token(insecure))
            .args(["--nbd-listen", "off", "--group-listen", "127.0.0.1:0"])
            .arg("--nbd-socket")
            .arg(dir.join("nbd.sock"))
            .arg("--attach-qmp")
            .arg(dir.join("qmp.sock"))
            .args(["--attach-drive", "os=os", "--metrics-listen", metrics])
            .arg("--state-dir")
            .arg(dir.join("agent"))
            .arg("--disk-root")
            .arg(dir)
            .spawn()
            .unwrap(),
    )
}

/// The guest's block jobs, as QEMU lists them.
async fn jobs(qmp: &Path) -> Vec<serde_json::Value> {
    let mut q = Qmp::connect(qmp).await.unwrap();
    let jobs = q.execute("query-block-jobs", json!({})).await.unwrap();
    jobs.as_array().cloned().unwrap_or_default()
}

/// The guest's run state ("running").
async fn status(qmp: &Path) -> String {
    let mut q = Qmp::connect(qmp).await.unwrap();
    let status = q.execute("query-status", json!({})).await.unwrap();
    status["status"].as_str().unwrap_or_default().to_string()
}

/// Waits until the agent's mirror of "os" is ready.
async fn mirrored(qmp: &Path) {
    wait_for(
        "the agent's mirror to be ready",
        Duration::from_secs(120),
        || async {
            jobs(qmp)
                .await
                .iter()
                .any(|j| j["device"] == "ferry-os" && j["ready"] == true)
                .then_some(())
        },
    )
    .await;
}

/// A counter of the agent's metrics at `metrics`.
async fn counter(metrics: &str, name: &str) -> f64 {
    let body = ferry_testkit::scrape::metrics(metrics).await.unwrap();
    sample(&body, &format!(r#"{name}{{vm="vm"}}"#)).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_guest_is_protected_without_a_restart_and_survives_its_agent() {
    let guest = guest();
    let cluster = Cluster::start().await;
    let registry = cluster.registry.url.clone();
    let processor = cluster.processor.url.clone();
    let dir = tempfile::tempdir().unwrap();
    // The guest's own disk; the agent's copy (the registered path) starts
    // empty.
    let own = dir.path().join("own.raw");
    let copy = dir.path().join("vm-os.raw");
    for image in [&own, &copy] {
        run_tool(
            "qemu-img",
            &[
                "create",
                "-f",
                "raw",
                image.to_str().unwrap(),
                &SIZE.to_string(),
            ],
        );
    }
    run_tool("mkfs.ext4", &["-q", "-F", own.to_str().unwrap()]);
    common::policy(&registry, "fast", Duration::from_secs(1)).await;
    ferry_testkit::protect_spec(
        &registry,
        ferry_testkit::vm_spec("vm", &[("os", SIZE, &copy)]),
        "fast",
    )
    .await;

    // The guest runs before any agent exists.
    let qmp = dir.path().join("qmp.sock");
    let disk = vec![
        "-blockdev".to_string(),
        format!("driver=file,filename={},node-name=os-file", own.display()),
        "-blockdev".into(),
        "driver=raw,file=os-file,node-name=os".into(),
        "-device".into(),
        "virtio-blk-pci,drive=os".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ];
    let mut vm = qemu(
        &guest,
        &disk,
        &format!("ferry.mode=write ferry.files={FILES} ferry.delay=0.1 ferry.stay=1"),
    )
    .spawn()
    .unwrap();
    let (console, _reader) = common::guest::console(&mut vm);
    let written =
        |console: &Arc<Mutex<String>>| console.lock().unwrap().matches("FERRY-FILE ").count();
    let at_least = |n: usize| {
        let console = console.clone();
        move || {
            let done = written(&console) >= n;
            async move { done.then_some(()) }
        }
    };
    wait_for("the guest to write", Duration::from_secs(120), at_least(3)).await;

    // Attached while it writes.
    let insecure = ferry_testkit::Insecure::new();
    let started = SystemTime::now();
    let metrics = ferry_testkit::free_addr().to_string();
    let mut first = agent(&registry, &insecure, dir.path(), &metrics);
    common::wait_protected(&registry, "vm").await;
    mirrored(&qmp).await;
    let copied = counter(&metrics, "ferry_agent_written_bytes_total").await;
    eprintln!("{copied} bytes came through the first mirror's sync and the writes");
    let n = written(&console);
    wait_for(
        "writes through the mirror",
        Duration::from_secs(120),
        at_least(n + 10),
    )
    .await;

    // The agent dies; the guest writes on, on its own disk.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let n = written(&console);
    wait_for(
        "the guest to write on without its agent",
        Duration::from_secs(120),
        at_least(n + 10),
    )
    .await;
    assert_eq!(status(&qmp).await, "running");

    // A new agent returns on the same copy: its mirror's sync goes over
    // the whole disk and sends only what changed meanwhile.
    let metrics = ferry_testkit::free_addr().to_string();
    let mut second = agent(&registry, &insecure, dir.path(), &metrics);
    mirrored(&qmp).await;
    let resent = counter(&metrics, "ferry_agent_written_bytes_total").await;
    let unchanged = counter(&metrics, "ferry_agent_unchanged_bytes_total").await;
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        (std::fs::metadata(&own).unwrap().blocks() * 512) as f64
    };
    eprintln!(
        "back: the agent sent {resent} bytes up to its mirror's readiness and dropped \
         {unchanged} it held already; the guest's disk holds {allocated} bytes"
    );
    assert!(
        unchanged >= (SIZE / 2) as f64,
        "the sync dropped only {unchanged} bytes"
    );
    assert!(
        resent < allocated / 2.0,
        "the returning agent sent {resent} bytes of a disk holding {allocated}: a full copy"
    );
    wait_for(
        "the guest to finish writing",
        Duration::from_secs(300),
        || {
            let done = console.lock().unwrap().contains("FERRY-DONE");
            async move { done.then_some(()) }
        },
    )
    .await;
    let console_text = console.lock().unwrap().clone();
    let written_files = files(&console_text);
    assert_eq!(written_files.len(), FILES);

    // The truth is the guest's own disk: a point comes to equal it.
    let point = common::guest::point_equal_to(&processor, &own).await;
    // SIGTERM: the agent ends its mirror; the guest runs on, and detach
    // finds nothing left.
    let term = std::process::Command::new("kill")
        .args(["-TERM", &second.0.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let exit = second.0.wait().unwrap();
    assert!(exit.success(), "agent: {exit}");
    assert!(jobs(&qmp).await.is_empty());
    assert_eq!(status(&qmp).await, "running");
    let out = std::process::Command::new(ferry_testkit::bin_path("ferry-agent"))
        .arg("detach")
        .arg("--qmp")
        .arg(&qmp)
        .args(["--disk", "os"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    vm.kill().await.unwrap();

    // Every point cut while the guest ran is crash-consistent ext4.
    let during: Vec<_> = list_points(&processor, "vm")
        .await
        .into_iter()
        .filter(|p| {
            p.created_at
                .is_some_and(|t| SystemTime::try_from(t).unwrap() > started)
        })
        .collect();
    assert!(during.len() >= 3, "{} points", during.len());
    eprintln!("{} points cut while the guest ran", during.len());
    for p in &during {
        let image = dir.path().join(format!("{}.raw", p.id));
        std::fs::write(&image, read_disk(&processor, "vm", p, "os").await).unwrap();
        let image = image.to_str().unwrap();
        let replay = std::process::Command::new("e2fsck")
            .args(["-E", "journal_only", "-y", image])
            .output()
            .unwrap();
        assert!(
            matches!(replay.status.code(), Some(0 | 1)),
            "{}: {}",
            p.id,
            String::from_utf8_lossy(&replay.stdout)
        );
        run_tool("e2fsck", &["-fn", image]);
        std::fs::remove_file(image).unwrap();
    }
    let image = dir.path().join("point.raw");
    std::fs::write(&image, read_disk(&processor, "vm", &point, "os").await).unwrap();
    let read = boot(&guest, &drive(image.to_str().unwrap()), "ferry.mode=verify").await;
    assert_eq!(read, written_files);
    cluster.stop().await;
}
