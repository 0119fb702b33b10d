//! The real `ferry` binary against a registry on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::process::Output;

use ferry_testkit::{start_registry, wait_serving};

async fn ferry(registry: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.arg("--registry").arg(registry).args(args);
    cmd.output().await.unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "ferry failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn register_enable_list_show_disable() {
    let dir = tempfile::tempdir().unwrap();
    let registry = start_registry(dir.path().join("registry"), None).await;
    wait_serving(&registry.url).await;
    let url = registry.url.clone();

    let disk = "id=os,size=1G,role=os,path=/images/app-os.raw";
    let data = "id=data,size=512M,storage=unmanaged,path=/images/app-data.raw";
    let register = [
        "register",
        "app1",
        "--region",
        "eastus",
        "--resource-group",
        "shop-rg",
        "--vnet",
        "shop-vnet",
        "--subnet",
        "web",
        "--nic",
        "nic0=10.4.0.4",
        "--disk",
        disk,
        "--disk",
        data,
    ];
    ok(&ferry(&url, &register).await);

    // A bad size is refused with the registry's status and registers nothing.
    let mut bad = register;
    bad[1] = "app2";
    bad[13] = "id=os,size=1000,role=os,path=/x";
    let out = ferry(&url, &bad).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("InvalidArgument") && stderr.contains("512"),
        "{stderr}"
    );
    let vms: serde_json::Value =
        serde_json::from_str(&ok(&ferry(&url, &["vms", "--output", "json"]).await)).unwrap();
    assert_eq!(vms.as_array().unwrap().len(), 1);

    let shown = ok(&ferry(
        &url,
        &[
            "enable",
            "app1",
            "--target-region",
            "westus",
            "--replica-disk-name",
            "data=app1-d",
        ],
    )
    .await);
    assert!(shown.contains("shop-rg-ferry"), "{shown}");
    // The agent's one-time enrollment token, on its own line.
    let printed = shown
        .lines()
        .find(|l| l.starts_with("fye1."))
        .unwrap_or_else(|| panic!("no enrollment token: {shown}"));
    assert!(
        shown.contains("Enrollment token for the agent of VM \"app1\""),
        "{shown}"
    );
    // `ferry agent enroll` issues another (replacing it), once.
    let enrolled: serde_json::Value = serde_json::from_str(&ok(&ferry(
        &url,
        &[
            "agent",
            "enroll",
            "app1",
            "--valid-for",
            "1h",
            "--output",
            "json",
        ],
    )
    .await))
    .unwrap();
    assert_eq!(enrolled["vm"], "app1");
    let token = enrolled["token"].as_str().unwrap();
    assert!(token.starts_with("fye1.") && token != printed, "{enrolled}");
    for (args, says) in [
        (vec!["agent", "enroll", "nosuch"], "NotFound"),
        (
            vec!["agent", "enroll", "app1", "--valid-for", "8days"],
            "InvalidArgument",
        ),
    ] {
        let out = ferry(&url, &args).await;
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }

    let list: serde_json::Value =
        serde_json::from_str(&ok(&ferry(&url, &["list", "--output", "json"]).await)).unwrap();
    let item = &list[0];
    assert_eq!(item["state"], "ENABLING");
    assert_eq!(item["target"]["resource_group"], "shop-rg-ferry");
    assert_eq!(item["target"]["virtual_network"], "shop-vnet-ferry");
    assert_eq!(
        item["target"]["target_storage_account"],
        "shop-rg-storage-ferry"
    );
    assert_eq!(item["target"]["replica_disks"][0]["name"], "app1-os-ferry");
    assert_eq!(item["target"]["replica_disks"][1]["name"], "app1-d");

    let table = ok(&ferry(&url, &["list"]).await);
    assert!(table.starts_with("VM"), "{table}");
    assert!(
        table.contains("eastus->westus") && table.contains("ENABLING"),
        "{table}"
    );
    let show = ok(&ferry(&url, &["show", "app1"]).await);
    assert!(show.contains("westus/shop-vnet-ferry->eastus"), "{show}");

    let mappings = ok(&ferry(&url, &["mapping", "list"]).await);
    assert!(mappings.contains("eastus/shop-vnet->westus"), "{mappings}");
    ok(&ferry(
        &url,
        &[
            "policy",
            "create",
            "fast",
            "--crash-interval",
            "2s",
            "--retention",
            "1h",
        ],
    )
    .await);
    let policy: serde_json::Value = serde_json::from_str(&ok(&ferry(
        &url,
        &["policy", "show", "fast", "--output", "json"],
    )
    .await))
    .unwrap();
    assert_eq!(policy["crash_consistent_interval"], 2.0);
    assert_eq!(policy["recovery_point_retention"], 3600.0);

    ok(&ferry(&url, &["disable", "app1"]).await);
    let out = ferry(&url, &["show", "app1"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"));

    // `ferry audit`: app1's changes, oldest first, reads left out;
    // processor and failover do not run here and are skipped with a word.
    let nowhere = format!("http://{}", ferry_testkit::free_addr());
    let out = ferry(
        &url,
        &[
            "audit",
            "--vm",
            "app1",
            "--output",
            "json",
            "--processor",
            &nowhere,
            "--failover",
            &nowhere,
        ],
    )
    .await;
    let trail: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    let trail = trail.as_array().unwrap();
    let calls: Vec<(&str, &str)> = trail
        .iter()
        .map(|r| (r["method"].as_str().unwrap(), r["code"].as_str().unwrap()))
        .collect();
    let enroll = "ferry.registry.v1.Registry/CreateEnrollmentToken";
    assert_eq!(
        calls,
        [
            ("ferry.registry.v1.Registry/RegisterVm", "OK"),
            ("ferry.registry.v1.Registry/EnableReplication", "OK"),
            // `ferry enable`'s token, `ferry agent enroll`, the 8 days refused.
            (enroll, "OK"),
            (enroll, "OK"),
            (enroll, "INVALID_ARGUMENT"),
            ("ferry.registry.v1.Registry/DisableReplication", "OK"),
        ],
        "{trail:#?}"
    );
    assert!(
        trail
            .iter()
            .all(|r| r["service"] == "registry" && r["target"] == "vm/app1"),
        "{trail:#?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("skipped processor") && stderr.contains("skipped failover"),
        "{stderr}"
    );
    registry.stop().await;
}

#[tokio::test]
async fn an_unreachable_registry_is_named() {
    let addr = ferry_testkit::free_addr();
    let out = ferry(&format!("http://{addr}"), &["list"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&addr.to_string()) && stderr.contains("unreachable"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_demo_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("demo")
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    let stdout = ok(&out);
    // It says how its services run: plaintext on loopback, unchecked.
    assert!(
        stdout.contains("plaintext on loopback (127.0.0.1) with nothing checked"),
        "{stdout}"
    );
    assert!(stdout.contains("demo-rg-ferry"), "{stdout}");
    // Initial replication, points, a test failover verified and cleaned up,
    // a failover to the earlier point verified byte for byte, commit.
    assert!(stdout.contains("PROTECTED"), "{stdout}");
    assert!(
        stdout.contains("is byte-for-byte the source at round B"),
        "{stdout}"
    );
    assert!(
        stdout.contains("target VMs left: 0; test disks removed: true"),
        "{stdout}"
    );
    assert_eq!(
        stdout
            .matches("is byte-for-byte identical to the source at point rp-1")
            .count(),
        2,
        "{stdout}"
    );
    assert!(
        stdout.contains("the old agent was fenced: true"),
        "{stdout}"
    );
    assert!(stdout.contains("COMMITTED"), "{stdout}");
    assert!(
        stdout.contains("whole demo") && stdout.contains("Figures"),
        "{stdout}"
    );
    // Each service kept its own data directory.
    for service in ["registry", "cache", "processor", "failover"] {
        assert!(dir.path().join(service).is_dir(), "{service}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_test_failover_cleanup_failover_commit_and_jobs_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, agent) = protected_cluster(dir.path()).await;
    let registry = cluster.registry.url.clone();
    agent.stream.flushed().await;
    let run = |args: Vec<&str>| {
        let mut full = vec![
            "--processor",
            cluster.processor.url.as_str(),
            "--failover",
            cluster.failover.url.as_str(),
        ];
        full.extend(args);
        let registry = registry.clone();
        let full: Vec<String> = full.iter().map(|s| s.to_string()).collect();
        async move {
            let args: Vec<&str> = full.iter().map(String::as_str).collect();
            ferry(&registry, &args).await
        }
    };
    let json = |out: &Output| -> serde_json::Value {
        serde_json::from_str(&ok(out)).unwrap_or_else(|e| panic!("not JSON ({e}): {}", ok(out)))
    };
    ok(&run(vec![
        "network",
        "create",
        "drill",
        "--region",
        "westus",
        "--resource-group",
        "drill",
        "--subnet",
        "default=10.9.0.0/24",
    ])
    .await);
    // "latest" processes what the cache holds, then cuts the point used.
    let job = json(
        &run(vec![
            "--output",
            "json",
            "failover",
            "vm",
            "--test",
            "--network",
            "drill",
            "--point",
            "latest",
        ])
        .await,
    );
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["kind"], "test failover");
    // For scripts: times in RFC 3339 with milliseconds, durations in
    // seconds as numbers.
    let rfc3339_millis = |v: &serde_json::Value| {
        let t = v.as_str().unwrap_or_default();
        t.len() == "2026-01-01T00:00:00.000Z".len() && t.ends_with('Z') && t.as_bytes()[19] == b'.'
    };
    assert!(rfc3339_millis(&job["created_at"]), "{job}");
    assert!(rfc3339_millis(&job["points"][0]["time"]), "{job}");
    assert!(job["points"][0]["data_loss_window"].is_number(), "{job}");
    let vms = json(&run(vec!["--output", "json", "target-vms"]).await);
    assert_eq!(vms.as_array().unwrap().len(), 1);
    assert_eq!(vms[0]["test"], true);
    assert_eq!(vms[0]["nics"][0]["private_ip"], "10.9.0.4");
    let points = json(&run(vec!["--output", "json", "points", "vm"]).await);
    let pinned = points
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !p["pinned_by"].as_array().unwrap().is_empty())
        .count();
    assert_eq!(pinned, 1, "{points}");
    // Each point: the newest write it holds, beside when it was cut.
    for p in points.as_array().unwrap() {
        assert!(
            rfc3339_millis(&p["time"]) && rfc3339_millis(&p["created_at"]),
            "{p}"
        );
        assert!(p["created_at"].as_str() >= p["time"].as_str(), "{p}");
    }
    let text = ok(&run(vec!["failover", "cleanup-test", "vm"]).await);
    assert!(text.contains("succeeded"), "{text}");
    let text = ok(&run(vec!["failover", "vm", "--point", "latest-processed"]).await);
    assert!(
        text.contains("update-registry") && text.contains("succeeded"),
        "{text}"
    );
    assert!(text.contains("data-loss window"), "{text}");
    ok(&run(vec!["failover", "commit", "vm"]).await);
    let jobs = json(&run(vec!["--output", "json", "jobs", "--vm", "vm"]).await);
    let kinds: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "commit",
            "unplanned failover",
            "cleanup test",
            "test failover"
        ]
    );
    // Mistakes are said plainly.
    let out = run(vec!["failover", "vm", "--test"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--network"));
    let out = run(vec!["failover", "nope"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NotFound") && stderr.contains("nope"),
        "{stderr}"
    );
    let _ = agent.stop(std::time::Duration::from_secs(1)).await;
    cluster.stop().await;
}

#[tokio::test]
async fn tokens_are_created_once_listed_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let registry = start_registry(dir.path().join("registry"), None).await;
    wait_serving(&registry.url).await;
    let url = registry.url.clone();

    // The token alone on stdout (scripts capture it), the warning on stderr.
    let out = ferry(&url, &["token", "create", "alice", "--role", "operator"]).await;
    let token = ok(&out).trim().to_string();
    assert!(
        token.starts_with("fy1.alice.") && !token.contains('\n'),
        "{token}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not shown again"), "{stderr}");

    let created: serde_json::Value = serde_json::from_str(&ok(&ferry(
        &url,
        &[
            "token", "create", "bob", "--role", "admin", "--output", "json",
        ],
    )
    .await))
    .unwrap();
    assert_eq!(created["name"], "bob");
    assert_eq!(created["role"], "ADMIN");
    let bob = created["token"].as_str().unwrap().to_string();
    assert!(bob.starts_with("fy1.bob."), "{created}");
    assert!(created["note"]
        .as_str()
        .unwrap()
        .contains("not shown again"));

    let dup = ferry(&url, &["token", "create", "bob", "--role", "reader"]).await;
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("AlreadyExists"));
    let bad_role = ferry(&url, &["token", "create", "carol", "--role", "root"]).await;
    assert!(!bad_role.status.success());

    let listed = ok(&ferry(&url, &["token", "list"]).await);
    assert!(
        listed.contains("alice") && listed.contains("operator"),
        "{listed}"
    );
    assert!(
        listed.contains("bob") && listed.contains("admin"),
        "{listed}"
    );
    let json_list = ok(&ferry(&url, &["token", "list", "--output", "json"]).await);
    let list: serde_json::Value = serde_json::from_str(&json_list).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    for secret in [&token, &bob] {
        let secret = secret.rsplit('.').next().unwrap();
        assert!(!listed.contains(secret) && !json_list.contains(secret));
    }

    ok(&ferry(&url, &["token", "revoke", "alice"]).await);
    let listed = ok(&ferry(&url, &["token", "list"]).await);
    assert!(!listed.contains("alice"), "{listed}");
    let missing = ferry(&url, &["token", "revoke", "alice"]).await;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NotFound"));
    registry.stop().await;
}

/// Reads `ferry serve`'s start-up lines until "Stop with".
async fn serve_banner(child: &mut tokio::process::Child) -> Vec<String> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = Vec::new();
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.starts_with("Stop with");
            banner.push(line);
            if done {
                break;
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), read)
        .await
        .expect("ferry serve's banner within 60 s");
    banner
}

/// The registry URL `ferry serve`'s banner lists.
fn registry_url(banner: &[String]) -> String {
    banner
        .iter()
        .find_map(|l| l.trim().strip_prefix("registry"))
        .map(|u| u.trim().to_string())
        .expect("the registry URL")
}

async fn serve(dir: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--base-port", "0", "--data-dir"])
        .arg(dir)
        .env("FERRY_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn ferry_serve_checks_every_call_and_prints_the_admin_token_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = serve(&data).await;
    let banner = serve_banner(&mut child).await;
    let registry = registry_url(&banner);
    assert!(
        banner.iter().any(|l| l
            == "Plaintext on loopback (127.0.0.1): every call is checked, nothing is encrypted."),
        "{banner:?}"
    );
    let token_line = banner
        .iter()
        .position(|l| l.starts_with("Admin token (shown this once"))
        .expect("the token on first start");
    let token = banner[token_line + 1].trim().to_string();
    let file = std::fs::read_to_string(data.join("admin-token")).unwrap();
    assert_eq!(file.trim(), token);
    use std::os::unix::fs::PermissionsExt;
    for name in ["admin-token", "cluster-secret"] {
        let mode = std::fs::metadata(data.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }

    // Without the token: refused, and the message says what is needed.
    let out = ferry(&registry, &["vms"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Unauthenticated") && stderr.contains("FERRY_TOKEN"),
        "{stderr}"
    );
    // With it: allowed.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["--registry", &registry, "vms"])
        .env("FERRY_TOKEN", &token)
        .output()
        .await
        .unwrap();
    ok(&out);

    // A restart keeps the token and does not print it again.
    child.kill().await.unwrap();
    let mut child = serve(&data).await;
    let banner = serve_banner(&mut child).await;
    assert!(
        banner.iter().all(|l| !l.contains(&token)),
        "printed again: {banner:?}"
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["--registry", &registry_url(&banner), "vms"])
        .env("FERRY_TOKEN", &token)
        .output()
        .await
        .unwrap();
    ok(&out);
    child.kill().await.unwrap();
}

/// The README's way to run an agent against `ferry serve`: `ferry enable`
/// prints the enrollment token, `ferry agent token` makes the agent's token
/// from the cluster secret, and the ferry-agent binary registers with both
/// and replicates; without the enrollment token it is refused.
#[tokio::test]
async fn an_agent_binary_enrolls_with_ferry_serve_as_the_readme_says() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = serve(&data).await;
    let banner = serve_banner(&mut child).await;
    let registry = registry_url(&banner);
    let admin = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let as_admin = |args: Vec<String>| {
        let registry = registry.clone();
        let admin = admin.trim().to_string();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
                .arg("--registry")
                .arg(&registry)
                .args(&args)
                .env("FERRY_TOKEN", admin)
                .output()
                .await
                .unwrap()
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let os = images.join("web1-os.raw");
    std::fs::File::create(&os)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let disk = format!("id=os,size=8M,role=os,path={}", os.display());
    ok(&as_admin(args(&[
        "register",
        "web1",
        "--region",
        "eastus",
        "--resource-group",
        "rg",
        "--vnet",
        "v",
        "--subnet",
        "s",
        "--nic",
        "nic0=10.0.0.4",
        "--disk",
        &disk,
    ]))
    .await);
    let enabled = ok(&as_admin(args(&["enable", "web1", "--target-region", "westus"])).await);
    let enrollment = enabled
        .lines()
        .find(|l| l.starts_with("fye1."))
        .unwrap_or_else(|| panic!("no enrollment token: {enabled}"));
    let agent_token = ok(&as_admin(vec![
        "agent".into(),
        "token".into(),
        "web1".into(),
        "--cluster-secret-file".into(),
        data.join("cluster-secret").display().to_string(),
    ])
    .await);
    assert!(agent_token.starts_with("fyagent.web1."), "{agent_token}");
    let token_file = dir.path().join("web1.token");
    std::fs::write(&token_file, &agent_token).unwrap();
    let enroll_file = dir.path().join("web1.enroll");

    let agent = |enroll: bool| {
        let mut command = std::process::Command::new(ferry_testkit::bin_path("ferry-agent"));
        command
            .args(["--registry", &registry, "--vm", "web1"])
            .args(["--nbd-listen", "127.0.0.1:0", "--group-listen", "off"])
            .arg("--disk-root")
            .arg(&images)
            .arg("--state-dir")
            .arg(dir.path().join("agent"))
            .arg("--token-file")
            .arg(&token_file)
            .env("FERRY_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if enroll {
            command.arg("--enrollment-token-file").arg(&enroll_file);
        }
        command.spawn().unwrap()
    };
    // Without the enrollment token: refused at start, and told how to enroll.
    let refused = agent(false).wait_with_output().unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("PermissionDenied") && stderr.contains("ferry agent enroll web1"),
        "{stderr}"
    );
    // With it: registered, replicating until PROTECTED.
    std::fs::write(&enroll_file, enrollment).unwrap();
    let mut running = agent(true);
    let show = args(&["show", "web1", "--output", "json"]);
    ferry_testkit::wait_for(
        "web1 PROTECTED through the agent binary",
        std::time::Duration::from_secs(60),
        || async {
            let out = as_admin(show.clone()).await;
            let item: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (item["state"] == "PROTECTED").then_some(())
        },
    )
    .await;
    assert!(running.try_wait().unwrap().is_none(), "the agent exited");
    running.kill().unwrap();
    running.wait().unwrap();
    child.kill().await.unwrap();
}

/// The cluster's services, a protected VM "vm" whose agent wrote once.
async fn protected_cluster(
    dir: &std::path::Path,
) -> (ferry_testkit::Cluster, ferry_agent::run::Agent) {
    use ferry_proto::registry::v1 as reg;
    use std::time::Duration;
    let cluster = ferry_testkit::Cluster::start().await;
    let source = dir.join("os.raw");
    std::fs::File::create(&source)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let day = Duration::from_secs(86400);
    ferry_testkit::create_policy(
        &cluster.registry.url,
        "fast",
        Duration::from_secs(1),
        day,
        day,
        day,
    )
    .await;
    ferry_testkit::protect_vm_with(
        &cluster.registry.url,
        "vm",
        &[("os", 8 << 20, &source)],
        "fast",
    )
    .await;
    let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = ferry_agent::run::Agent::start(ferry_agent::run::AgentOptions::new(
        cluster.registry.url.clone(),
        "vm",
        nbd.into(),
        dir.join("agent"),
        vec![dir.to_path_buf()],
    ))
    .await
    .unwrap();
    let registry = cluster.registry.url.clone();
    ferry_testkit::wait_for("PROTECTED", Duration::from_secs(60), || async {
        ferry_testkit::protected_item(&registry, "vm")
            .await
            .filter(|i| i.state() == reg::ReplicationState::Protected)
    })
    .await;
    agent.capture.write("os", 0, vec![7; 65536]).await.unwrap();
    (cluster, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_services_and_each_item_as_json() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let (cluster, agent) = protected_cluster(dir.path()).await;
    let args = |cluster: &ferry_testkit::Cluster| {
        vec![
            "--processor".to_string(),
            cluster.processor.url.clone(),
            "--failover".into(),
            cluster.failover.url.clone(),
            "--output".into(),
            "json".into(),
            "status".into(),
            "--cache".into(),
            cluster.cache.url.clone(),
        ]
    };
    let full = args(&cluster);
    let registry = cluster.registry.url.clone();
    let status = ferry_testkit::wait_for("a point in the status", Duration::from_secs(60), || {
        let (full, registry) = (full.clone(), registry.clone());
        async move {
            let args: Vec<&str> = full.iter().map(String::as_str).collect();
            let status: serde_json::Value =
                serde_json::from_str(&ok(&ferry(&registry, &args).await)).unwrap();
            status["items"][0]["last_point_time"]
                .is_string()
                .then_some(status)
        }
    })
    .await;
    let services = status["services"].as_array().unwrap();
    let names: Vec<&str> = services
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["registry", "cache", "processor", "failover"],
        "{status}"
    );
    for s in services {
        assert_eq!(s["reachable"], true, "{s}");
        assert_eq!(s["health"], "SERVING", "{s}");
        assert_eq!(s["version"], env!("CARGO_PKG_VERSION"), "{s}");
    }
    let item = &status["items"][0];
    assert_eq!(item["vm"], "vm");
    assert_eq!(item["state"], "PROTECTED");
    assert_eq!(item["point_interval_seconds"], 1.0);
    assert!(
        item["last_point_age_seconds"].as_f64().unwrap() < 600.0,
        "{item}"
    );
    assert_eq!(item["jobs"], serde_json::json!([]), "{item}");

    // An unreachable service is said so, the rest still shown.
    let mut unreachable = args(&cluster);
    unreachable[3] = "http://127.0.0.1:1".into();
    let args: Vec<&str> = unreachable.iter().map(String::as_str).collect();
    let status: serde_json::Value =
        serde_json::from_str(&ok(&ferry(&registry, &args).await)).unwrap();
    let failover = &status["services"][3];
    assert_eq!(failover["reachable"], false, "{status}");
    assert!(
        failover["error"].as_str().unwrap().contains("Unavailable"),
        "{status}"
    );
    assert!(status["items"][0]["jobs"].is_null(), "{status}");
    agent.stop(Duration::from_secs(5)).await.unwrap();
    cluster.stop().await;
}

/// The visible text of tmux pane `session`.
fn capture(session: &str) -> String {
    let out = std::process::Command::new("tmux")
        .args(["capture-pane", "-p", "-t", session])
        .output()
        .expect("tmux (Debian package tmux; scripts/test.sh installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kills the tmux session however the test ends.
struct Tmux(String);

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_redraws_in_place_in_a_terminal() {
    use ferry_proto::registry::v1 as reg;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let (cluster, agent) = protected_cluster(dir.path()).await;
    let session = format!("ferry-status-{}", std::process::id());
    let command = format!(
        "{} --registry {} --processor {} --failover {} status --watch --interval 300ms",
        env!("CARGO_BIN_EXE_ferry"),
        cluster.registry.url,
        cluster.processor.url,
        cluster.failover.url
    );
    let started = std::process::Command::new("tmux")
        .args([
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "200",
            "-y",
            "40",
            &command,
        ])
        .status()
        .expect("tmux (Debian package tmux; scripts/test.sh installs it)");
    assert!(started.success());
    let _tmux = Tmux(session.clone());
    let protected = ferry_testkit::wait_for("the item on screen", Duration::from_secs(60), || {
        let screen = capture(&session);
        async move {
            screen
                .lines()
                .any(|l| l.starts_with("vm ") && l.contains("PROTECTED"))
                .then_some(screen)
        }
    })
    .await;
    assert!(
        protected.contains("SERVICE") && protected.contains("SERVING"),
        "{protected}"
    );

    // A change shows on the next refresh, drawn over the last one.
    let mut registry = reg::registry_client::RegistryClient::connect(cluster.registry.url.clone())
        .await
        .unwrap();
    registry
        .disable_replication(reg::DisableReplicationRequest {
            vm_name: "vm".into(),
        })
        .await
        .unwrap();
    let redrawn = ferry_testkit::wait_for("the change on screen", Duration::from_secs(60), || {
        let screen = capture(&session);
        async move { (!screen.lines().any(|l| l.contains("PROTECTED"))).then_some(screen) }
    })
    .await;
    assert_eq!(
        redrawn.matches("SERVICE").count(),
        1,
        "drawn in place:\n{redrawn}"
    );
    assert!(redrawn.contains("Ctrl-C"), "{redrawn}");
    agent.stop(Duration::from_secs(5)).await.unwrap();
    cluster.stop().await;
}
