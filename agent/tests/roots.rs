//! Disk roots: the agent opens a registered source image only when its real
//! path lies under one of its `--disk-root`s. A disk elsewhere (a plain
//! path, or a symlink inside a root leading out) is neither opened nor
//! exported, and the agent's health in registry says why, while the disks
//! inside keep serving.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_agent::run::{Agent, AgentOptions, GroupPort};
use ferry_agent::stream::StreamLimits;
use ferry_proto::registry::v1 as reg;
use ferry_testkit::{
    bin_path, free_addr, protect_vm, protected_item, run_tool, start_registry, wait_for,
    wait_serving, Insecure, Running, ServiceProcess,
};

const SIZE: u64 = 4 << 20;

struct Cluster {
    registry: Running,
    _cache: ServiceProcess,
    /// The cache checks its callers: the agent presents its token.
    insecure: Insecure,
}

async fn cluster(dir: &Path) -> Cluster {
    let cache_addr = free_addr();
    let cache_url = format!("http://{cache_addr}");
    let registry = start_registry(dir.join("registry"), Some(cache_url.clone())).await;
    wait_serving(&registry.url).await;
    let insecure = Insecure::new();
    let cache = ServiceProcess::start_at(
        &insecure,
        cache_addr,
        bin_path("cache-svc"),
        dir.join("cache"),
        &["--registry", &registry.url],
    );
    wait_serving(&cache_url).await;
    Cluster {
        registry,
        _cache: cache,
        insecure,
    }
}

fn image(path: &Path) -> PathBuf {
    std::fs::File::create(path).unwrap().set_len(SIZE).unwrap();
    path.to_path_buf()
}

async fn start(cluster: &Cluster, dir: &Path, roots: Vec<PathBuf>) -> (Agent, String) {
    let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = nbd.local_addr().unwrap().to_string();
    let agent = Agent::start(AgentOptions {
        registry: cluster.registry.url.clone(),
        vm: "vm".into(),
        nbd: nbd.into(),
        group: GroupPort::Off,
        group_tls: None,
        group_insecure: false,
        enrollment_token: None,
        group_address: String::new(),
        state_dir: dir.join("agent"),
        disk_roots: roots,
        limits: StreamLimits::default(),
        nbd_limits: Default::default(),
        attached: false,
        heartbeat: Duration::from_secs(1),
        scripts: None,
        credentials: cluster.insecure.agent("vm"),
    })
    .await
    .unwrap();
    (agent, addr)
}

/// qemu-io writes 64 KiB to the export `disk` and reads it back; its output,
/// or Err with what it said.
async fn write_through(addr: &str, disk: &str) -> Result<String, String> {
    let url = format!("nbd://{addr}/{disk}");
    tokio::task::spawn_blocking(move || {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 0 64k"])
            .args(["-c", "read -P 0x5a 0 64k", &url])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(text)
        }
    })
    .await
    .unwrap()
}

/// The agent's report in the VM's protected item, once it matches `accept`.
async fn agent_report(
    registry: &str,
    accept: impl Fn(&reg::HealthReport) -> bool,
) -> reg::HealthReport {
    wait_for("the agent's health report", Duration::from_secs(30), || {
        let accept = &accept;
        async move {
            protected_item(registry, "vm")
                .await?
                .health_reports
                .into_iter()
                .find(|r| r.component == "agent" && accept(r))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_outside_the_roots_are_refused_and_reported_critical_while_the_others_serve() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let os = image(&root.join("os.raw"));
    let outside = image(&elsewhere.join("data.raw"));
    // A symlink inside the root to an image outside it.
    let secret = image(&elsewhere.join("secret.raw"));
    std::fs::write(&secret, b"not the agent's to export").unwrap();
    let link = root.join("link.raw");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    // `..` out of the root to a file that does not exist yet: not created.
    let dotdot = root.join("..").join("elsewhere").join("new.raw");

    let cluster = cluster(dir.path()).await;
    let registry = cluster.registry.url.clone();
    protect_vm(
        &registry,
        "vm",
        &[
            ("os", SIZE, &os),
            ("data", SIZE, &outside),
            ("link", SIZE, &link),
            ("new", SIZE, &dotdot),
        ],
    )
    .await;
    let (agent, addr) = start(&cluster, dir.path(), vec![root.clone()]).await;

    let report = agent_report(&registry, |r| {
        r.health == reg::ReplicationHealth::Critical as i32
    })
    .await;
    let real_root = root.canonicalize().unwrap();
    for (disk, path) in [("data", &outside), ("link", &link), ("new", &dotdot)] {
        let expected = format!(
            "disk {disk}: source_path {} is outside the agent's disk roots ({}); \
             start the agent with --disk-root covering it",
            path.display(),
            real_root.display()
        );
        assert!(
            report.message.contains(&expected),
            "{expected:?} in {:?}",
            report.message
        );
    }
    assert!(!report.message.contains("disk os"), "{:?}", report.message);

    // The disk inside serves; the others are not exported at all.
    write_through(&addr, "os").await.unwrap();
    for disk in ["data", "link", "new"] {
        let refused = write_through(&addr, disk).await.unwrap_err();
        assert!(
            refused.contains("no export") || refused.contains("export"),
            "{disk}: {refused}"
        );
    }
    assert_eq!(
        std::fs::read(&secret).unwrap(),
        b"not the agent's to export",
        "the symlink's target is untouched (not sized, not written)"
    );
    assert!(
        !elsewhere.join("new.raw").exists(),
        "nothing created outside"
    );
    assert_eq!(agent.capture.disk_ids(), vec!["os".to_string()]);
    // Initial replication does not claim the VM PROTECTED with disks unread.
    let item = protected_item(&registry, "vm").await.unwrap();
    assert_ne!(item.state(), reg::ReplicationState::Protected);
    agent.stop(Duration::from_secs(1)).await.unwrap();
    cluster.registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roots_covering_every_disk_open_and_export_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let os = image(&a.join("os.raw"));
    let data = image(&b.join("data.raw"));
    // A symlink inside one root to an image inside another is fine.
    let link = a.join("data-link.raw");
    std::os::unix::fs::symlink(&data, &link).unwrap();
    run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 64k",
            os.to_str().unwrap(),
        ],
    );

    let cluster = cluster(dir.path()).await;
    let registry = cluster.registry.url.clone();
    protect_vm(&registry, "vm", &[("os", SIZE, &os), ("data", SIZE, &link)]).await;
    let (agent, addr) = start(&cluster, dir.path(), vec![a, b]).await;
    wait_for("PROTECTED", Duration::from_secs(60), || async {
        protected_item(&registry, "vm")
            .await
            .filter(|i| i.state() == reg::ReplicationState::Protected)
    })
    .await;
    write_through(&addr, "os").await.unwrap();
    write_through(&addr, "data").await.unwrap();
    let report = agent_report(&registry, |_| true).await;
    assert_ne!(
        report.health,
        reg::ReplicationHealth::Critical as i32,
        "{}",
        report.message
    );
    assert_eq!(&std::fs::read(&data).unwrap()[..65536], &[0x5a; 65536][..]);
    agent.stop(Duration::from_secs(1)).await.unwrap();
    cluster.registry.stop().await;
}

#[tokio::test]
async fn an_agent_without_a_root_or_with_a_missing_root_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    for (roots, expected) in [
        (vec![], "--disk-root"),
        (vec![dir.path().join("missing")], "missing"),
    ] {
        let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let started = Agent::start(AgentOptions {
            registry: "http://127.0.0.1:1".into(),
            vm: "vm".into(),
            nbd: nbd.into(),
            group: GroupPort::Off,
            group_tls: None,
            group_insecure: false,
            enrollment_token: None,
            group_address: String::new(),
            state_dir: dir.path().join("agent"),
            disk_roots: roots,
            limits: StreamLimits::default(),
            nbd_limits: Default::default(),
            attached: false,
            heartbeat: Duration::from_secs(1),
            scripts: None,
            credentials: Default::default(),
        })
        .await;
        let Err(e) = started else {
            panic!("the agent started");
        };
        assert!(e.to_string().contains(expected), "{e}");
    }
}
