//! The real `ferry` binary against a registry on loopback.

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
