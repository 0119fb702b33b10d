//! The agent registers for its VM and gets what it needs, credential hidden.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use ferry_proto::registry::v1 as pb;
use ferry_proto::registry::v1::registry_client::RegistryClient;

#[tokio::test]
async fn registers_and_redacts_its_credential() {
    let dir = tempfile::tempdir().unwrap();
    let registry = ferry_testkit::start_registry(
        dir.path().join("registry"),
        Some("http://127.0.0.1:7102".into()),
    )
    .await;
    ferry_testkit::wait_serving(&registry.url).await;

    // Not protected yet: refused with the registry's status.
    let err = ferry_agent::register(
        &registry.url,
        &ferry_runtime::peers::Credentials::none(),
        "vm1",
        "h",
        "127.0.0.1:20004",
        Default::default(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");

    let mut c = RegistryClient::connect(registry.url.clone()).await.unwrap();
    c.register_vm(pb::RegisterVmRequest {
        vm: Some(pb::Vm {
            name: "vm1".into(),
            source_region: "eastus".into(),
            resource_group: "rg".into(),
            virtual_network: "vnet".into(),
            subnet: "sub".into(),
            nics: vec![pb::Nic {
                name: "nic0".into(),
                private_ip: "10.0.0.4".into(),
                mac_address: String::new(),
            }],
            disks: vec![pb::Disk {
                id: "os".into(),
                size_bytes: 1 << 20,
                role: pb::DiskRole::Os as i32,
                storage: pb::DiskStorage::Managed as i32,
                source_path: "/images/os.raw".into(),
            }],
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    c.enable_replication(pb::EnableReplicationRequest {
        vm_name: "vm1".into(),
        target_region: "westus".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    let a = ferry_agent::register(
        &registry.url,
        &ferry_runtime::peers::Credentials::none(),
        "vm1",
        "h",
        "127.0.0.1:20004",
        Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(a.cache_endpoint, "http://127.0.0.1:7102");
    assert_eq!(a.epoch, ferry_proto::ids::Epoch(1));
    assert_eq!(a.disks[0].id, "os");
    assert_eq!(a.credential().len(), 64);
    let shown = format!("{a:?}");
    assert!(shown.contains("<redacted>") && !shown.contains(a.credential()));
    registry.stop().await;
}
