//! The real registry-svc binary: reflection and health through grpcurl,
//! graceful SIGTERM, persistence across SIGKILL, and the configuration scheme.

use std::process::Command;

use ferry_proto::registry::v1 as pb;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_testkit::{assert_reflection_and_health, free_addr, wait_serving, ServiceProcess};

const BIN: &str = env!("CARGO_BIN_EXE_registry-svc");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_sees_the_api_and_sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = ServiceProcess::start(BIN, dir.path().join("registry"), &[]);
    wait_serving(&p.url()).await;
    assert_reflection_and_health(&p.addr.to_string(), "ferry.registry.v1.Registry");
    let status = p.signal_and_wait("TERM");
    assert!(status.success(), "SIGTERM exit: {status}");
}

async fn client(url: &str) -> RegistryClient<tonic::transport::Channel> {
    RegistryClient::connect(url.to_string()).await.unwrap()
}

/// Everything the registry holds, as comparable text.
async fn state(url: &str) -> Vec<String> {
    let mut c = client(url).await;
    vec![
        format!(
            "{:?}",
            c.list_vms(pb::ListVmsRequest {})
                .await
                .unwrap()
                .into_inner()
        ),
        format!(
            "{:?}",
            c.list_protected_items(pb::ListProtectedItemsRequest {})
                .await
                .unwrap()
                .into_inner()
        ),
        format!(
            "{:?}",
            c.list_policies(pb::ListPoliciesRequest {})
                .await
                .unwrap()
                .into_inner()
        ),
        format!(
            "{:?}",
            c.list_network_mappings(pb::ListNetworkMappingsRequest {})
                .await
                .unwrap()
                .into_inner()
        ),
        format!(
            "{:?}",
            c.list_replication_groups(pb::ListReplicationGroupsRequest {})
                .await
                .unwrap()
                .into_inner()
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = ServiceProcess::start(
        BIN,
        dir.path().join("registry"),
        &["--cache", "http://127.0.0.1:7102"],
    );
    wait_serving(&p.url()).await;
    let mut c = client(&p.url()).await;
    c.create_policy(pb::CreatePolicyRequest {
        policy: Some(pb::ReplicationPolicy {
            name: "multi".into(),
            multi_vm_consistency: true,
            crash_consistent_interval: Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            }),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    c.create_replication_group(pb::CreateReplicationGroupRequest {
        name: "erp".into(),
        policy_name: "multi".into(),
    })
    .await
    .unwrap();
    c.create_network_mapping(pb::CreateNetworkMappingRequest {
        source_region: "eastus".into(),
        source_network: "corp".into(),
        target_region: "westus".into(),
        target_network: "corp-dr".into(),
    })
    .await
    .unwrap();
    c.register_vm(pb::RegisterVmRequest {
        vm: Some(pb::Vm {
            name: "db".into(),
            source_region: "eastus".into(),
            resource_group: "erp-rg".into(),
            virtual_network: "corp".into(),
            subnet: "data".into(),
            nics: vec![pb::Nic {
                name: "nic0".into(),
                private_ip: "10.2.0.4".into(),
            }],
            disks: vec![pb::Disk {
                id: "os".into(),
                size_bytes: 1 << 30,
                role: pb::DiskRole::Os as i32,
                storage: pb::DiskStorage::Managed as i32,
                source_path: "/images/db-os.raw".into(),
            }],
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let item = c
        .enable_replication(pb::EnableReplicationRequest {
            vm_name: "db".into(),
            target_region: "westus".into(),
            replication_group: "erp".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(item.target.as_ref().unwrap().virtual_network, "corp-dr");
    c.transition_state(pb::TransitionStateRequest {
        vm_name: "db".into(),
        to: pb::ReplicationState::InitialReplication as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    c.register_agent(pb::RegisterAgentRequest {
        vm_name: "db".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let before = state(&p.url()).await;
    drop(c);

    let status = p.signal_and_wait("KILL");
    assert!(!status.success());
    p.restart();
    wait_serving(&p.url()).await;
    let after = state(&p.url()).await;
    assert_eq!(before, after);
    let item = client(&p.url())
        .await
        .get_protected_item(pb::GetProtectedItemRequest {
            vm_name: "db".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(item.state(), pb::ReplicationState::InitialReplication);
    assert_eq!(item.epoch, 1);
    assert_eq!(item.replication_group, "erp");
    assert!(after[3].contains("westus/corp-dr->eastus"), "{}", after[3]);
    assert!(after[4].contains("\"db\""), "{}", after[4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_sets_regions_and_flags_beat_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        "log = \"warn\"\n[limits]\nconcurrency_limit = 64\n[registry]\nregions = [\"mars\", \"venus\"]\n",
    )
    .unwrap();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let mut child = Command::new(BIN)
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--config")
        .arg(&config)
        // The environment names another address and data dir; the flag wins
        // for the address, the environment for the data dir.
        .env("FERRY_LISTEN", "127.0.0.1:1")
        .env("FERRY_DATA_DIR", dir.path().join("from-env"))
        .spawn()
        .unwrap();
    wait_serving(&url).await;
    let regions = client(&url)
        .await
        .list_regions(pb::ListRegionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .regions;
    assert_eq!(regions, ["mars", "venus"]);
    assert!(dir.path().join("from-env").join("registry.sled").exists());
    child.kill().unwrap();
    child.wait().unwrap();

    // A typo in the file is refused with its name, and the binary exits.
    std::fs::write(&config, "[registry]\nregion = [\"mars\"]\n").unwrap();
    let out = Command::new(BIN)
        .arg("--listen")
        .arg(free_addr().to_string())
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("typo"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("region"), "{stderr}");
}
