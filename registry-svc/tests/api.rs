//! registry-svc over real gRPC on loopback, in-process: derivation of target
//! resources, every bad input, the lifecycle, the watch stream, concurrent
//! updates and agent credentials.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::time::Duration;

use ferry_proto::registry::v1 as pb;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_testkit::{start_registry, Running};
use tonic::transport::Channel;
use tonic::Code;

type Client = RegistryClient<Channel>;

struct Fixture {
    registry: Running,
    client: Client,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let registry = start_registry(
        dir.path().join("registry"),
        Some("http://127.0.0.1:7102".into()),
    )
    .await;
    ferry_testkit::wait_serving(&registry.url).await;
    let client = RegistryClient::connect(registry.url.clone()).await.unwrap();
    Fixture {
        registry,
        client,
        _dir: dir,
    }
}

fn disk(id: &str, size: u64, role: pb::DiskRole, storage: pb::DiskStorage) -> pb::Disk {
    pb::Disk {
        id: id.into(),
        size_bytes: size,
        role: role as i32,
        storage: storage as i32,
        source_path: format!("/images/{id}.raw"),
    }
}

fn vm(name: &str) -> pb::Vm {
    pb::Vm {
        name: name.into(),
        source_region: "eastus".into(),
        resource_group: "prod-rg".into(),
        virtual_network: "prod-vnet".into(),
        subnet: "app".into(),
        availability_set: "app-avset".into(),
        nics: vec![pb::Nic {
            name: "nic0".into(),
            private_ip: "10.1.0.4".into(),
            mac_address: String::new(),
        }],
        disks: vec![
            disk("os", 1 << 30, pb::DiskRole::Os, pb::DiskStorage::Managed),
            disk(
                "data",
                1 << 29,
                pb::DiskRole::Data,
                pb::DiskStorage::Unmanaged,
            ),
        ],
        registered_at: None,
        shape: None,
    }
}

async fn register(c: &mut Client, v: pb::Vm) -> Result<pb::Vm, tonic::Status> {
    c.register_vm(pb::RegisterVmRequest { vm: Some(v) })
        .await
        .map(|r| r.into_inner())
}

async fn enable(
    c: &mut Client,
    req: pb::EnableReplicationRequest,
) -> Result<pb::ProtectedItem, tonic::Status> {
    c.enable_replication(req).await.map(|r| r.into_inner())
}

fn enable_req(vm: &str, target: &str) -> pb::EnableReplicationRequest {
    pb::EnableReplicationRequest {
        vm_name: vm.into(),
        target_region: target.into(),
        ..Default::default()
    }
}

async fn transition(
    c: &mut Client,
    vm: &str,
    to: pb::ReplicationState,
) -> Result<pb::ProtectedItem, tonic::Status> {
    c.transition_state(pb::TransitionStateRequest {
        vm_name: vm.into(),
        to: to as i32,
        reason: "test".into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

/// Everything the registry holds, to check that refused requests change nothing.
async fn everything(c: &mut Client) -> String {
    let vms = c
        .list_vms(pb::ListVmsRequest {})
        .await
        .unwrap()
        .into_inner();
    let items = c
        .list_protected_items(pb::ListProtectedItemsRequest {})
        .await
        .unwrap()
        .into_inner();
    let policies = c
        .list_policies(pb::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    let mappings = c
        .list_network_mappings(pb::ListNetworkMappingsRequest {})
        .await
        .unwrap()
        .into_inner();
    let groups = c
        .list_replication_groups(pb::ListReplicationGroupsRequest {})
        .await
        .unwrap()
        .into_inner();
    format!("{vms:?}\n{items:?}\n{policies:?}\n{mappings:?}\n{groups:?}")
}

#[tokio::test]
async fn enable_derives_every_target_resource() {
    let mut f = fixture().await;
    let c = &mut f.client;
    register(c, vm("web1")).await.unwrap();
    let item = enable(c, enable_req("web1", "westus")).await.unwrap();
    assert_eq!(item.state(), pb::ReplicationState::Enabling);
    assert_eq!(item.policy_name, "default");
    let t = item.target.unwrap();
    assert_eq!(t.region, "westus");
    assert_eq!(t.resource_group, "prod-rg-ferry");
    assert_eq!(t.virtual_network, "prod-vnet-ferry");
    assert_eq!(t.subnet, "app");
    assert_eq!(t.availability_set, "app-avset-ferry");
    assert_eq!(t.cache_storage, "eastus-cache-ferry");
    assert_eq!(t.target_storage_account, "prod-rg-storage-ferry");
    assert_eq!(t.replica_disks.len(), 2);
    assert_eq!(t.replica_disks[0].name, "web1-os-ferry");
    assert_eq!(t.replica_disks[0].storage(), pb::DiskStorage::Managed);
    assert_eq!(t.replica_disks[0].storage_account, "");
    assert_eq!(t.replica_disks[1].name, "web1-data-ferry");
    assert_eq!(t.replica_disks[1].storage_account, "prod-rg-storage-ferry");
    assert_eq!(t.replica_disks[1].size_bytes, 1 << 29);
    assert_eq!(t.network_mapping, "eastus/prod-vnet->westus");
    assert_eq!(t.reverse_network_mapping, "westus/prod-vnet-ferry->eastus");

    // Both directions of the mapping exist.
    let mappings = c
        .list_network_mappings(pb::ListNetworkMappingsRequest {})
        .await
        .unwrap()
        .into_inner()
        .mappings;
    let ids: Vec<_> = mappings.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(
        ids,
        ["eastus/prod-vnet->westus", "westus/prod-vnet-ferry->eastus"]
    );

    // A second VM of the same network reuses the mapping; nothing new appears.
    let mut second = vm("web2");
    second.nics[0].private_ip = "10.1.0.5".into();
    second.availability_set.clear();
    second.disks.truncate(1);
    register(c, second).await.unwrap();
    let item2 = enable(c, enable_req("web2", "westus")).await.unwrap();
    let t2 = item2.target.unwrap();
    assert_eq!(t2.virtual_network, "prod-vnet-ferry");
    assert_eq!(t2.availability_set, "");
    assert_eq!(t2.target_storage_account, "");
    let after = c
        .list_network_mappings(pb::ListNetworkMappingsRequest {})
        .await
        .unwrap()
        .into_inner()
        .mappings;
    assert_eq!(after.len(), 2);
    f.registry.stop().await;
}

#[tokio::test]
async fn a_vms_shape_and_macs_are_kept_and_unset_fields_get_the_defaults() {
    let mut f = fixture().await;
    let c = &mut f.client;
    // Unset: one vCPU, 512 MiB, BIOS, boot from the disk, no marker.
    let plain = register(c, vm("plain")).await.unwrap();
    let shape = plain.shape.unwrap();
    assert_eq!((shape.vcpus, shape.memory_mib), (1, 512));
    assert_eq!(shape.firmware(), pb::Firmware::Bios);
    assert!(shape.kernel.is_empty() && shape.ready_marker.is_empty());
    assert_eq!(plain.nics[0].mac_address, "");
    let mut v = vm("shaped");
    v.nics[0].mac_address = "52:54:00:AB:CD:EF".into();
    v.shape = Some(pb::VmShape {
        vcpus: 4,
        memory_mib: 2048,
        firmware: pb::Firmware::Uefi as i32,
        kernel: "/srv/boot/vmlinuz".into(),
        initrd: "/srv/boot/initrd.gz".into(),
        cmdline: "console=ttyS0 root=/dev/vda".into(),
        ready_marker: "login:".into(),
    });
    let back = register(c, v.clone()).await.unwrap();
    assert_eq!(back.nics[0].mac_address, "52:54:00:ab:cd:ef");
    assert_eq!(back.shape, v.shape);
    let got = c
        .get_vm(pb::GetVmRequest {
            name: "shaped".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.shape, v.shape);
}

#[tokio::test]
async fn overrides_win_and_existing_mappings_are_reused() {
    let mut f = fixture().await;
    let c = &mut f.client;
    // A mapping made beforehand decides the target network.
    let created = c
        .create_network_mapping(pb::CreateNetworkMappingRequest {
            source_region: "eastus".into(),
            source_network: "prod-vnet".into(),
            target_region: "northeurope".into(),
            target_network: "dr-vnet".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.reverse.unwrap().id, "northeurope/dr-vnet->eastus");
    register(c, vm("db1")).await.unwrap();
    let mut req = enable_req("db1", "northeurope");
    req.overrides = Some(pb::TargetOverrides {
        resource_group: "dr-rg".into(),
        subnet: "dr-subnet".into(),
        availability_set: "dr-avset".into(),
        cache_storage: "mycache".into(),
        target_storage_account: "drstorage".into(),
        replica_disk_names: [("os".to_string(), "db1-boot".to_string())].into(),
        ..Default::default()
    });
    let t = enable(c, req).await.unwrap().target.unwrap();
    assert_eq!(t.resource_group, "dr-rg");
    assert_eq!(t.virtual_network, "dr-vnet");
    assert_eq!(t.subnet, "dr-subnet");
    assert_eq!(t.availability_set, "dr-avset");
    assert_eq!(t.cache_storage, "mycache");
    assert_eq!(t.target_storage_account, "drstorage");
    assert_eq!(t.replica_disks[0].name, "db1-boot");
    assert_eq!(t.replica_disks[1].name, "db1-data-ferry");
    assert_eq!(t.replica_disks[1].storage_account, "drstorage");

    // An override that contradicts the mapping is refused.
    let mut other = vm("db2");
    other.nics[0].private_ip = "10.1.0.9".into();
    register(c, other).await.unwrap();
    let mut req = enable_req("db2", "northeurope");
    req.overrides = Some(pb::TargetOverrides {
        virtual_network: "elsewhere".into(),
        ..Default::default()
    });
    let err = enable(c, req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("already mapped"),
        "{}",
        err.message()
    );

    // A mapping in use cannot be deleted.
    let err = c
        .delete_network_mapping(pb::DeleteNetworkMappingRequest {
            id: "eastus/prod-vnet->northeurope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    f.registry.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_precise_status_and_changes_nothing() {
    let mut f = fixture().await;
    let c = &mut f.client;
    register(c, vm("web1")).await.unwrap();
    enable(c, enable_req("web1", "westus")).await.unwrap();
    register(c, {
        let mut v = vm("idle");
        v.nics[0].private_ip = "10.1.0.7".into();
        v
    })
    .await
    .unwrap();
    c.create_policy(pb::CreatePolicyRequest {
        policy: Some(pb::ReplicationPolicy {
            name: "single".into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let before = everything(c).await;

    let with = |f: &dyn Fn(&mut pb::Vm)| {
        let mut v = vm("new1");
        f(&mut v);
        v
    };
    let bad_vms: Vec<(&str, pb::Vm, Code)> = vec![
        (
            "empty name",
            with(&|v| v.name.clear()),
            Code::InvalidArgument,
        ),
        (
            "invalid name",
            with(&|v| v.name = "bad name/x".into()),
            Code::InvalidArgument,
        ),
        (
            "unknown region",
            with(&|v| v.source_region = "mars".into()),
            Code::InvalidArgument,
        ),
        ("duplicate VM", vm("web1"), Code::AlreadyExists),
        (
            "disk size zero",
            with(&|v| v.disks[0].size_bytes = 0),
            Code::InvalidArgument,
        ),
        (
            "disk size not 512-aligned",
            with(&|v| v.disks[0].size_bytes = 1000),
            Code::InvalidArgument,
        ),
        (
            "no disk role",
            with(&|v| v.disks[0].role = 0),
            Code::InvalidArgument,
        ),
        (
            "no storage kind",
            with(&|v| v.disks[0].storage = 0),
            Code::InvalidArgument,
        ),
        (
            "duplicate disk id",
            with(&|v| v.disks[1].id = "os".into()),
            Code::InvalidArgument,
        ),
        (
            "two OS disks",
            with(&|v| v.disks[1].role = pb::DiskRole::Os as i32),
            Code::InvalidArgument,
        ),
        (
            "no source path",
            with(&|v| v.disks[0].source_path.clear()),
            Code::InvalidArgument,
        ),
        ("no disk", with(&|v| v.disks.clear()), Code::InvalidArgument),
        ("no NIC", with(&|v| v.nics.clear()), Code::InvalidArgument),
        (
            "bad IP",
            with(&|v| v.nics[0].private_ip = "10.1.0.300".into()),
            Code::InvalidArgument,
        ),
        (
            "empty subnet",
            with(&|v| v.subnet.clear()),
            Code::InvalidArgument,
        ),
        (
            "bad MAC",
            with(&|v| v.nics[0].mac_address = "52:54:00:zz:00:01".into()),
            Code::InvalidArgument,
        ),
        (
            "multicast MAC",
            with(&|v| v.nics[0].mac_address = "01:00:5e:00:00:01".into()),
            Code::InvalidArgument,
        ),
        (
            "two NICs with one MAC",
            with(&|v| {
                v.nics[0].mac_address = "52:54:00:00:00:01".into();
                v.nics.push(pb::Nic {
                    name: "nic1".into(),
                    private_ip: "10.1.0.5".into(),
                    mac_address: "52:54:00:00:00:01".into(),
                });
            }),
            Code::InvalidArgument,
        ),
        (
            "too many vCPUs",
            with(&|v| {
                v.shape = Some(pb::VmShape {
                    vcpus: 257,
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
        ),
        (
            "too little memory",
            with(&|v| {
                v.shape = Some(pb::VmShape {
                    memory_mib: 8,
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
        ),
        (
            "unknown firmware",
            with(&|v| {
                v.shape = Some(pb::VmShape {
                    firmware: 9,
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
        ),
        (
            "a relative kernel path",
            with(&|v| {
                v.shape = Some(pb::VmShape {
                    kernel: "boot/vmlinuz".into(),
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
        ),
        (
            "a cmdline without a kernel",
            with(&|v| {
                v.shape = Some(pb::VmShape {
                    cmdline: "console=ttyS0".into(),
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
        ),
        (
            "a ready marker of two lines",
            with(&|v| {
                v.shape = Some(pb::VmShape {
                    ready_marker: "login:\nroot".into(),
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
        ),
    ];
    for (what, v, code) in bad_vms {
        let err = register(c, v).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(!err.message().is_empty(), "{what}");
    }
    let err = c
        .register_vm(pb::RegisterVmRequest { vm: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let bad_enables: Vec<(&str, pb::EnableReplicationRequest, Code)> = vec![
        ("unknown VM", enable_req("ghost", "westus"), Code::NotFound),
        (
            "target equals source",
            enable_req("idle", "eastus"),
            Code::InvalidArgument,
        ),
        (
            "unknown target region",
            enable_req("idle", "pluto"),
            Code::InvalidArgument,
        ),
        (
            "empty target region",
            enable_req("idle", ""),
            Code::InvalidArgument,
        ),
        (
            "unknown policy",
            pb::EnableReplicationRequest {
                policy_name: "nope".into(),
                ..enable_req("idle", "westus")
            },
            Code::NotFound,
        ),
        (
            "unknown group",
            pb::EnableReplicationRequest {
                replication_group: "nope".into(),
                ..enable_req("idle", "westus")
            },
            Code::NotFound,
        ),
        (
            "bad override name",
            pb::EnableReplicationRequest {
                overrides: Some(pb::TargetOverrides {
                    resource_group: "has space".into(),
                    ..Default::default()
                }),
                ..enable_req("idle", "westus")
            },
            Code::InvalidArgument,
        ),
        (
            "override for a disk it lacks",
            pb::EnableReplicationRequest {
                overrides: Some(pb::TargetOverrides {
                    replica_disk_names: [("zzz".to_string(), "x".to_string())].into(),
                    ..Default::default()
                }),
                ..enable_req("idle", "westus")
            },
            Code::InvalidArgument,
        ),
        (
            "already protected",
            enable_req("web1", "westus"),
            Code::AlreadyExists,
        ),
    ];
    for (what, req, code) in bad_enables {
        let err = enable(c, req).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
    }

    // Transitions the lifecycle does not allow.
    let err = transition(c, "web1", pb::ReplicationState::Protected)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("ENABLING") && err.message().contains("PROTECTED"),
        "{}",
        err.message()
    );
    let err = transition(c, "web1", pb::ReplicationState::FailedOver)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = transition(c, "web1", pb::ReplicationState::Unspecified)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = transition(c, "ghost", pb::ReplicationState::Protected)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .transition_state(pb::TransitionStateRequest {
            vm_name: "web1".into(),
            to: pb::ReplicationState::InitialReplication as i32,
            expected_state: pb::ReplicationState::Protected as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = c
        .report_replication_progress(pb::ReportReplicationProgressRequest {
            vm_name: "web1".into(),
            percent: 10,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = c
        .report_health(pb::ReportHealthRequest {
            vm_name: "web1".into(),
            component: "toaster".into(),
            health: pb::ReplicationHealth::Normal as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Policies, groups, mappings.
    let err = c
        .create_replication_group(pb::CreateReplicationGroupRequest {
            name: "g".into(),
            policy_name: "single".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = c
        .create_replication_group(pb::CreateReplicationGroupRequest {
            name: "g".into(),
            policy_name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .delete_policy(pb::DeletePolicyRequest {
            name: "default".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = c
        .create_policy(pb::CreatePolicyRequest {
            policy: Some(pb::ReplicationPolicy {
                name: "single".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = c
        .create_network_mapping(pb::CreateNetworkMappingRequest {
            source_region: "eastus".into(),
            source_network: "prod-vnet".into(),
            target_region: "westus".into(),
            target_network: "other".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = c
        .unregister_vm(pb::UnregisterVmRequest {
            name: "web1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = c
        .register_agent(pb::RegisterAgentRequest {
            vm_name: "idle".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    assert_eq!(
        everything(c).await,
        before,
        "a refused request changed something"
    );
    f.registry.stop().await;
}

#[tokio::test]
async fn the_lifecycle_end_to_end() {
    use pb::ReplicationState as S;
    let mut f = fixture().await;
    let c = &mut f.client;
    register(c, vm("app")).await.unwrap();
    enable(c, enable_req("app", "westus")).await.unwrap();

    let grant = c
        .register_agent(pb::RegisterAgentRequest {
            vm_name: "app".into(),
            hostname: "host-a".into(),
            group_address: "10.1.0.4:20004".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grant.epoch, 1);
    assert_eq!(grant.cache_endpoint, "http://127.0.0.1:7102");
    assert_eq!(grant.disks.len(), 2);

    let item = transition(c, "app", S::InitialReplication).await.unwrap();
    assert_eq!(item.initial_replication_percent, 0);
    let item = c
        .report_replication_progress(pb::ReportReplicationProgressRequest {
            vm_name: "app".into(),
            percent: 42,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(item.initial_replication_percent, 42);
    let err = c
        .report_replication_progress(pb::ReportReplicationProgressRequest {
            vm_name: "app".into(),
            percent: 101,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let item = transition(c, "app", S::Protected).await.unwrap();
    assert_eq!(item.initial_replication_percent, 100);
    for s in [S::ResyncRequired, S::Resyncing, S::Protected] {
        assert_eq!(transition(c, "app", s).await.unwrap().state(), s);
    }

    let item = c
        .report_health(pb::ReportHealthRequest {
            vm_name: "app".into(),
            component: "processor".into(),
            health: pb::ReplicationHealth::Warning as i32,
            message: "RPO over target".into(),
            rpo: Some(prost_types::Duration {
                seconds: 7,
                nanos: 0,
            }),
            last_recovery_point_time: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 0,
            }),
            backlog_bytes: Some(4096),
            backlog_records: Some(3),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(item.health(), pb::ReplicationHealth::Warning);
    assert_eq!(item.rpo.unwrap().seconds, 7);
    assert_eq!(item.backlog_bytes, 4096);
    assert_eq!(
        item.last_recovery_point_time.unwrap().seconds,
        1_800_000_000
    );

    // Failover fences the source: the epoch rises and agents are refused.
    let item = c
        .transition_state(pb::TransitionStateRequest {
            vm_name: "app".into(),
            to: S::FailoverInProgress as i32,
            expected_state: S::Protected as i32,
            reason: "unplanned failover".into(),
            bump_epoch: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(item.epoch, 2);
    assert_eq!(item.state_reason, "unplanned failover");
    let err = c
        .register_agent(pb::RegisterAgentRequest {
            vm_name: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = c
        .disable_replication(pb::DisableReplicationRequest {
            vm_name: "app".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    transition(c, "app", S::FailedOver).await.unwrap();
    transition(c, "app", S::FailoverInProgress).await.unwrap();
    // A change of point is not a way back: the fenced source stays fenced.
    for back in [S::Protected, S::ResyncRequired] {
        let err = transition(c, "app", back).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{back:?}");
        assert!(err.message().contains("has been failed over"), "{err}");
    }
    transition(c, "app", S::FailedOver).await.unwrap();
    transition(c, "app", S::Committed).await.unwrap();
    let err = transition(c, "app", S::Protected).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = transition(c, "app", S::Disabling).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let removed = c
        .disable_replication(pb::DisableReplicationRequest {
            vm_name: "app".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.state(), S::Disabling);
    let err = c
        .get_protected_item(pb::GetProtectedItemRequest {
            vm_name: "app".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The VM stays registered and can be protected again.
    c.get_vm(pb::GetVmRequest { name: "app".into() })
        .await
        .unwrap();
    let again = enable(c, enable_req("app", "westus2")).await.unwrap();
    assert_eq!(again.state(), S::Enabling);
    f.registry.stop().await;
}

#[tokio::test]
async fn groups_track_members_and_coordinator() {
    let mut f = fixture().await;
    let c = &mut f.client;
    c.create_policy(pb::CreatePolicyRequest {
        policy: Some(pb::ReplicationPolicy {
            name: "multi".into(),
            multi_vm_consistency: true,
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
    for (i, name) in ["erp-db", "erp-app"].iter().enumerate() {
        let mut v = vm(name);
        v.nics[0].private_ip = format!("10.1.0.{}", 20 + i);
        register(c, v).await.unwrap();
        let item = enable(
            c,
            pb::EnableReplicationRequest {
                replication_group: "erp".into(),
                ..enable_req(name, "westus")
            },
        )
        .await
        .unwrap();
        assert_eq!(item.policy_name, "multi");
        assert_eq!(item.replication_group, "erp");
    }
    let group = c
        .get_replication_group(pb::GetReplicationGroupRequest { name: "erp".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(group.members, ["erp-app", "erp-db"]);
    assert_eq!(group.coordinator, "erp-db");
    assert_eq!(group.target_region, "westus");

    // A member's agent heartbeats with its credential; registry hands back
    // the group with addresses and liveness.
    let grant = c
        .register_agent(pb::RegisterAgentRequest {
            vm_name: "erp-app".into(),
            hostname: "h".into(),
            group_address: "10.1.0.20:20004".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let beat = |credential: &str, epoch: u64, vm: &str| pb::GroupHeartbeatRequest {
        vm_name: vm.into(),
        credential: credential.into(),
        epoch,
        group_address: "127.0.0.1:20004".into(),
    };
    let view = c
        .group_heartbeat(beat(&grant.credential, grant.epoch, "erp-app"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(view.group.unwrap().coordinator, "erp-db");
    let app = view
        .members
        .iter()
        .find(|m| m.vm_name == "erp-app")
        .unwrap();
    assert_eq!(app.group_address, "127.0.0.1:20004");
    assert!(app.alive);
    assert!(view.multi_vm_interval.is_some() && view.coordinator_lease.is_some());
    // The group's secret goes to its members' agents, the same to each
    // heartbeat, and nowhere else.
    assert_eq!(view.group_secret.len(), 32);
    let again = c
        .group_heartbeat(beat(&grant.credential, grant.epoch, "erp-app"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.group_secret, view.group_secret);
    let debug = format!(
        "{:?}",
        c.list_replication_groups(pb::ListReplicationGroupsRequest {})
            .await
            .unwrap()
    );
    assert!(!debug.contains(&hex::encode(&view.group_secret)), "{debug}");
    let err = c
        .group_heartbeat(beat("not-the-credential", grant.epoch, "erp-app"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = c
        .group_heartbeat(beat(&grant.credential, grant.epoch - 1, "erp-app"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = c
        .group_heartbeat(beat(&grant.credential, grant.epoch, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Members share a target region and the group's policy.
    let mut v = vm("erp-web");
    v.nics[0].private_ip = "10.1.0.30".into();
    register(c, v).await.unwrap();
    let err = enable(
        c,
        pb::EnableReplicationRequest {
            replication_group: "erp".into(),
            ..enable_req("erp-web", "westus2")
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = enable(
        c,
        pb::EnableReplicationRequest {
            replication_group: "erp".into(),
            policy_name: "default".into(),
            ..enable_req("erp-web", "westus")
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // The coordinator leaving hands the role on; an occupied group stays.
    c.disable_replication(pb::DisableReplicationRequest {
        vm_name: "erp-db".into(),
    })
    .await
    .unwrap();
    let group = c
        .get_replication_group(pb::GetReplicationGroupRequest { name: "erp".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(group.members, ["erp-app"]);
    assert_eq!(group.coordinator, "erp-app");
    // A member left with the secret: the rest get a new one.
    let after = c
        .group_heartbeat(beat(&grant.credential, grant.epoch, "erp-app"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.group_secret.len(), 32);
    assert_ne!(after.group_secret, view.group_secret);
    let err = c
        .delete_replication_group(pb::DeleteReplicationGroupRequest { name: "erp".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = c
        .delete_policy(pb::DeletePolicyRequest {
            name: "multi".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    f.registry.stop().await;
}

async fn next(stream: &mut tonic::Streaming<pb::ProtectedItemEvent>) -> pb::ProtectedItemEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event within 10 s")
        .expect("stream ok")
        .expect("stream open")
}

#[tokio::test]
async fn the_watch_stream_sees_every_change_in_order() {
    use pb::EventKind as K;
    let mut f = fixture().await;
    let c = &mut f.client;
    register(c, vm("early")).await.unwrap();
    enable(c, enable_req("early", "westus")).await.unwrap();

    let mut all = c
        .watch_protected_items(pb::WatchProtectedItemsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ev = next(&mut all).await;
    assert_eq!(
        (ev.kind(), ev.item.unwrap().vm_name.as_str()),
        (K::Snapshot, "early")
    );
    assert_eq!(next(&mut all).await.kind(), K::Synced);

    let mut only_late = c
        .watch_protected_items(pb::WatchProtectedItemsRequest {
            vm_name: "late".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut only_late).await.kind(), K::Synced);

    let mut late = vm("late");
    late.nics[0].private_ip = "10.1.0.8".into();
    register(c, late).await.unwrap();
    enable(c, enable_req("late", "westus")).await.unwrap();
    transition(c, "early", pb::ReplicationState::InitialReplication)
        .await
        .unwrap();
    transition(c, "late", pb::ReplicationState::InitialReplication)
        .await
        .unwrap();
    c.disable_replication(pb::DisableReplicationRequest {
        vm_name: "late".into(),
    })
    .await
    .unwrap();

    let mut seen = Vec::new();
    for _ in 0..5 {
        let ev = next(&mut all).await;
        let item = ev.item.clone().unwrap();
        let state = item.state();
        seen.push((ev.kind(), item.vm_name, state));
    }
    use pb::ReplicationState as S;
    assert_eq!(
        seen,
        [
            (K::Upserted, "late".to_string(), S::Enabling),
            (K::Upserted, "early".to_string(), S::InitialReplication),
            (K::Upserted, "late".to_string(), S::InitialReplication),
            (K::Upserted, "late".to_string(), S::Disabling),
            (K::Removed, "late".to_string(), S::Disabling),
        ]
    );
    let mut filtered = Vec::new();
    for _ in 0..4 {
        let ev = next(&mut only_late).await;
        filtered.push((ev.kind(), ev.item.unwrap().state()));
    }
    assert_eq!(
        filtered,
        [
            (K::Upserted, S::Enabling),
            (K::Upserted, S::InitialReplication),
            (K::Upserted, S::Disabling),
            (K::Removed, S::Disabling),
        ]
    );

    // Shutdown ends open watches with UNAVAILABLE so that clients reconnect.
    f.registry.shutdown.cancel();
    let end = tokio::time::timeout(Duration::from_secs(10), all.message())
        .await
        .expect("the watch ends on shutdown");
    match end {
        Err(status) => assert_eq!(status.code(), Code::Unavailable),
        Ok(None) => {}
        Ok(Some(ev)) => panic!("unexpected event {ev:?}"),
    }
    let _ = f.registry.task.await;
}

#[tokio::test]
async fn concurrent_updates_of_one_vm_lose_nothing() {
    let mut f = fixture().await;
    register(&mut f.client, vm("busy")).await.unwrap();
    let start = enable(&mut f.client, enable_req("busy", "westus"))
        .await
        .unwrap();
    transition(
        &mut f.client,
        "busy",
        pb::ReplicationState::InitialReplication,
    )
    .await
    .unwrap();

    const PER_COMPONENT: u64 = 10;
    let components = ["agent", "cache", "processor", "failover"];
    let mut tasks = Vec::new();
    for component in components {
        let mut c = f.client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_COMPONENT {
                c.report_health(pb::ReportHealthRequest {
                    vm_name: "busy".into(),
                    component: component.into(),
                    health: pb::ReplicationHealth::Normal as i32,
                    message: format!("{component} {i}"),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let item = f
        .client
        .get_protected_item(pb::GetProtectedItemRequest {
            vm_name: "busy".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // One revision per accepted update: none overwrote another.
    assert_eq!(item.revision, start.revision + 1 + 4 * PER_COMPONENT);
    let mut last: Vec<_> = item
        .health_reports
        .iter()
        .map(|r| r.message.clone())
        .collect();
    last.sort();
    assert_eq!(last, ["agent 9", "cache 9", "failover 9", "processor 9"]);
    f.registry.stop().await;
}

#[tokio::test]
async fn agent_credentials_are_fresh_and_never_stored_in_clear() {
    let mut f = fixture().await;
    let c = &mut f.client;
    register(c, vm("secret")).await.unwrap();
    enable(c, enable_req("secret", "westus")).await.unwrap();
    let mut credentials = Vec::new();
    for epoch in 1..=2 {
        let grant = c
            .register_agent(pb::RegisterAgentRequest {
                vm_name: "secret".into(),
                hostname: "h".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(grant.epoch, epoch);
        assert_eq!(grant.credential.len(), 64);
        assert!(grant.credential.chars().all(|ch| ch.is_ascii_hexdigit()));
        credentials.push(grant.credential);
    }
    assert_ne!(credentials[0], credentials[1]);
    let data_dir = f.registry.data_dir.clone();
    f.registry.stop().await;

    // Nothing under the data directory holds a credential in clear.
    let mut files = Vec::new();
    let mut stack = vec![data_dir];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    assert!(!files.is_empty());
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        for credential in &credentials {
            assert!(
                !bytes
                    .windows(credential.len())
                    .any(|w| w == credential.as_bytes()),
                "{} holds a credential in clear",
                file.display()
            );
        }
    }
}

#[tokio::test]
async fn a_silent_agent_turns_its_vm_critical_and_back_when_it_speaks() {
    let dir = tempfile::tempdir().unwrap();
    let registry = ferry_testkit::start_registry_with(
        dir.path().join("registry"),
        Some("http://127.0.0.1:7102".into()),
        registry_svc::Settings {
            agent_timeout_secs: 1,
            ..Default::default()
        },
    )
    .await;
    ferry_testkit::wait_serving(&registry.url).await;
    let c = &mut RegistryClient::connect(registry.url.clone()).await.unwrap();
    for name in ["web1", "idle"] {
        register(c, vm(name)).await.unwrap();
        enable(c, enable_req(name, "westus")).await.unwrap();
    }
    c.register_agent(pb::RegisterAgentRequest {
        vm_name: "web1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let report = |health: pb::ReplicationHealth| pb::ReportHealthRequest {
        vm_name: "web1".into(),
        component: "agent".into(),
        health: health as i32,
        ..Default::default()
    };
    let item = c
        .report_health(report(pb::ReplicationHealth::Normal))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(item.health(), pb::ReplicationHealth::Normal);

    // Silent past the timeout: CRITICAL, saying why.
    let url = registry.url.clone();
    let item = ferry_testkit::wait_for("web1 to turn CRITICAL", Duration::from_secs(20), || {
        let url = url.clone();
        async move {
            ferry_testkit::protected_item(&url, "web1")
                .await
                .filter(|i| i.health() == pb::ReplicationHealth::Critical)
        }
    })
    .await;
    let agent = item
        .health_reports
        .iter()
        .find(|r| r.component == "agent")
        .unwrap();
    assert!(
        agent.message.starts_with("agent not heard from for"),
        "{}",
        agent.message
    );
    // A VM whose agent never registered has nobody to miss.
    let idle = ferry_testkit::protected_item(&registry.url, "idle")
        .await
        .unwrap();
    assert_eq!(idle.health(), pb::ReplicationHealth::Unspecified);

    // The agent speaks again: its own report replaces the alarm.
    let item = c
        .report_health(report(pb::ReplicationHealth::Normal))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(item.health(), pb::ReplicationHealth::Normal);
    registry.stop().await;
}

#[tokio::test]
async fn two_vms_whose_target_disks_would_share_a_name_are_refused() {
    let mut f = fixture().await;
    let c = &mut f.client;
    // "a-b" + "c" and "a" + "b-c" both derive "a-b-c-ferry".
    let with_disk = |name: &str, id: &str| pb::Vm {
        disks: vec![disk(
            id,
            1 << 30,
            pb::DiskRole::Os,
            pb::DiskStorage::Managed,
        )],
        ..vm(name)
    };
    register(c, with_disk("a-b", "c")).await.unwrap();
    register(c, with_disk("a", "b-c")).await.unwrap();
    enable(c, enable_req("a-b", "westus")).await.unwrap();
    let before = everything(c).await;
    let err = enable(c, enable_req("a", "westus")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    assert!(err.message().contains("a-b-c-ferry"), "{err}");
    assert!(err.message().contains("replica_disk_names"), "{err}");
    assert_eq!(everything(c).await, before, "nothing changed");
    // An override settles it.
    let mut req = enable_req("a", "westus");
    req.overrides = Some(pb::TargetOverrides {
        replica_disk_names: [("b-c".to_string(), "a-bc-ferry".to_string())].into(),
        ..Default::default()
    });
    let item = enable(c, req).await.unwrap();
    assert_eq!(item.target.unwrap().replica_disks[0].name, "a-bc-ferry");
    f.registry.stop().await;
}

/// The RPO grows between the processor's reports: while none comes (the
/// processor down, or cut off), it is the last reported figure plus the time
/// since, never a frozen good one; once the VM has failed over it stops.
#[tokio::test]
async fn the_rpo_grows_while_no_report_comes() {
    let Fixture {
        registry,
        mut client,
        _dir,
    } = fixture().await;
    let c = &mut client;
    register(c, vm("web1")).await.unwrap();
    enable(c, enable_req("web1", "westus")).await.unwrap();
    transition(c, "web1", pb::ReplicationState::InitialReplication)
        .await
        .unwrap();
    transition(c, "web1", pb::ReplicationState::Protected)
        .await
        .unwrap();
    let reported = c
        .report_health(pb::ReportHealthRequest {
            vm_name: "web1".into(),
            component: "processor".into(),
            health: pb::ReplicationHealth::Normal as i32,
            rpo: Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let seconds = |i: &pb::ProtectedItem| {
        let d = i.rpo.unwrap();
        d.seconds as f64 + d.nanos as f64 / 1e9
    };
    assert!((2.0..2.5).contains(&seconds(&reported)), "{reported:?}");
    let url = registry.url.clone();
    ferry_testkit::wait_for(
        "the RPO to grow past 3 s without a report",
        Duration::from_secs(20),
        || {
            let url = url.clone();
            async move {
                ferry_testkit::protected_item(&url, "web1")
                    .await
                    .filter(|i| seconds(i) >= 3.0)
            }
        },
    )
    .await;
    // Failed over: replication has ended, the figure stays as it was.
    transition(c, "web1", pb::ReplicationState::FailoverInProgress)
        .await
        .unwrap();
    let moved = transition(c, "web1", pb::ReplicationState::FailedOver)
        .await
        .unwrap();
    assert!((2.0..2.5).contains(&seconds(&moved)), "{moved:?}");
    registry.stop().await;
}

fn services(region: &str, cache: &str, processor: &str) -> pb::SetRegionServicesRequest {
    pb::SetRegionServicesRequest {
        services: Some(pb::RegionServices {
            region: region.into(),
            cache_endpoint: cache.into(),
            processor_endpoint: processor.into(),
        }),
    }
}

async fn agent_cache(c: &mut Client, vm: &str) -> String {
    c.register_agent(pb::RegisterAgentRequest {
        vm_name: vm.into(),
        hostname: "host".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .cache_endpoint
}

#[tokio::test]
async fn items_are_placed_on_their_regions_services_and_keep_their_place() {
    let mut f = fixture().await;
    let c = &mut f.client;
    // Enabled before any region has services: the defaults.
    register(c, vm("early")).await.unwrap();
    let early = enable(c, enable_req("early", "westus")).await.unwrap();
    assert_eq!(
        (
            early.cache_endpoint.as_str(),
            early.processor_endpoint.as_str()
        ),
        ("", "")
    );

    // Bad input: a precise status, nothing changed.
    let before = format!(
        "{}\n{:?}",
        everything(c).await,
        c.list_regions(pb::ListRegionsRequest {})
            .await
            .unwrap()
            .into_inner()
    );
    for (req, code, says) in [
        (
            services("atlantis", "http://c:1", ""),
            Code::InvalidArgument,
            "unknown region",
        ),
        (
            services("eastus", "ftp://c:1", ""),
            Code::InvalidArgument,
            "cache_endpoint",
        ),
        (
            services("eastus", "", "not a url"),
            Code::InvalidArgument,
            "processor_endpoint",
        ),
        (
            pb::SetRegionServicesRequest { services: None },
            Code::InvalidArgument,
            "services is missing",
        ),
    ] {
        let err = c.set_region_services(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(says), "{err:?}");
    }
    let after = format!(
        "{}\n{:?}",
        everything(c).await,
        c.list_regions(pb::ListRegionsRequest {})
            .await
            .unwrap()
            .into_inner()
    );
    assert_eq!(before, after);

    // eastus's VMs stream to its cache; westus's processor applies what
    // replicates into westus.
    c.set_region_services(services("eastus", "http://cache-east:7102", ""))
        .await
        .unwrap();
    let west = c
        .set_region_services(services("westus", "", "https://proc-west:7103/"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(west.processor_endpoint, "https://proc-west:7103");
    register(c, vm("placed")).await.unwrap();
    let placed = enable(c, enable_req("placed", "westus")).await.unwrap();
    assert_eq!(placed.cache_endpoint, "http://cache-east:7102");
    assert_eq!(placed.processor_endpoint, "https://proc-west:7103");
    assert_eq!(agent_cache(c, "placed").await, "http://cache-east:7102");
    // An item keeps the place it was enabled with.
    assert_eq!(agent_cache(c, "early").await, "http://127.0.0.1:7102");

    // Kept across a restart; both empty: the region has none of its own.
    f.registry.stop().await;
    let registry = start_registry(
        f._dir.path().join("registry"),
        Some("http://127.0.0.1:7102".into()),
    )
    .await;
    ferry_testkit::wait_serving(&registry.url).await;
    let mut c = RegistryClient::connect(registry.url.clone()).await.unwrap();
    let regions = c
        .list_regions(pb::ListRegionsRequest {})
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<(&str, &str, &str)> = regions
        .services
        .iter()
        .map(|s| {
            (
                s.region.as_str(),
                s.cache_endpoint.as_str(),
                s.processor_endpoint.as_str(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("eastus", "http://cache-east:7102", ""),
            ("westus", "", "https://proc-west:7103")
        ]
    );
    c.set_region_services(services("eastus", "", ""))
        .await
        .unwrap();
    let regions = c
        .list_regions(pb::ListRegionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(regions.services.len(), 1);
    assert_eq!(
        ferry_testkit::protected_item(&registry.url, "placed")
            .await
            .unwrap()
            .cache_endpoint,
        "http://cache-east:7102"
    );
    registry.stop().await;
}

fn reprotect_req(vm: &str, incarnation: u64, disks: &[(&str, &str)]) -> pb::ReprotectItemRequest {
    pb::ReprotectItemRequest {
        vm_name: vm.into(),
        incarnation,
        disks: disks
            .iter()
            .map(|(id, path)| pb::DiskAt {
                disk_id: id.to_string(),
                path: path.to_string(),
            })
            .collect(),
        job_id: "job-1".into(),
    }
}

#[tokio::test]
async fn reprotect_turns_a_committed_item_around_once() {
    use pb::ReplicationState as S;
    let mut f = fixture().await;
    let c = &mut f.client;
    register(c, vm("web")).await.unwrap();
    let item = enable(c, enable_req("web", "westus")).await.unwrap();
    let failed_over = [("os", "/west/web-os.img"), ("data", "/west/web-data.img")];

    // Not committed: refused, nothing changed.
    let before = everything(c).await;
    let err = c
        .reprotect_item(reprotect_req("web", item.incarnation, &failed_over))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("ENABLING"), "{err:?}");
    assert_eq!(before, everything(c).await);

    agent_cache(c, "web").await;
    for to in [S::InitialReplication, S::Protected] {
        transition(c, "web", to).await.unwrap();
    }
    // The failover fences the agent.
    c.transition_state(pb::TransitionStateRequest {
        vm_name: "web".into(),
        to: S::FailoverInProgress as i32,
        reason: "failover".into(),
        bump_epoch: true,
        ..Default::default()
    })
    .await
    .unwrap();
    for to in [S::FailedOver, S::Committed] {
        transition(c, "web", to).await.unwrap();
    }
    // Bad input: a precise status, nothing changed.
    let before = everything(c).await;
    for (req, code, says) in [
        (
            reprotect_req("web", item.incarnation, &failed_over[..1]),
            Code::InvalidArgument,
            "exactly once",
        ),
        (
            reprotect_req(
                "web",
                item.incarnation,
                &[("os", "/a"), ("data", "/b"), ("swap", "/c")],
            ),
            Code::InvalidArgument,
            "does not have",
        ),
        (
            reprotect_req(
                "web",
                item.incarnation,
                &[("os", "relative"), ("data", "/b")],
            ),
            Code::InvalidArgument,
            "absolute path",
        ),
        (
            reprotect_req("web", item.incarnation + 7, &failed_over),
            Code::FailedPrecondition,
            "incarnation",
        ),
        (
            reprotect_req("nobody", 1, &failed_over),
            Code::NotFound,
            "nobody",
        ),
    ] {
        let err = c.reprotect_item(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(says), "{err:?}");
    }
    assert_eq!(before, everything(c).await);

    // The fenced agent's writes since the fence.
    let fenced = |epoch: u64, ranges: Vec<(&str, u64, u64)>| pb::ReportFencedWritesRequest {
        vm_name: "web".into(),
        epoch,
        ranges: ranges
            .into_iter()
            .map(|(d, offset, length)| pb::ChangedRange {
                disk_id: d.into(),
                offset,
                length,
            })
            .collect(),
    };
    let committed = c
        .get_protected_item(pb::GetProtectedItemRequest {
            vm_name: "web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let before = everything(c).await;
    let many: Vec<(&str, u64, u64)> = (0..4097).map(|i| ("os", i * 131072, 65536)).collect();
    for (req, code, says) in [
        (
            fenced(committed.epoch, vec![("os", 0, 65536)]),
            Code::FailedPrecondition,
            "not fenced",
        ),
        (
            fenced(committed.epoch - 1, vec![("swap", 0, 65536)]),
            Code::InvalidArgument,
            "swap",
        ),
        (
            fenced(committed.epoch - 1, vec![("os", 1 << 40, 65536)]),
            Code::InvalidArgument,
            "past the end",
        ),
        (
            fenced(committed.epoch - 1, many),
            Code::InvalidArgument,
            "at most 4096",
        ),
    ] {
        let err = c.report_fenced_writes(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(says), "{err:?}");
    }
    assert_eq!(before, everything(c).await);
    let reported = c
        .report_fenced_writes(fenced(committed.epoch - 1, vec![("os", 65536, 65536)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reported.fenced_writes.len(), 1);

    // Turned around: a new incarnation from westus back to eastus, its
    // target the original placement, the original disks remembered.
    let turned = c
        .reprotect_item(reprotect_req("web", item.incarnation, &failed_over))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(turned.state(), S::Enabling);
    assert!(turned.incarnation > item.incarnation);
    assert!(turned.epoch > item.epoch);
    let source = turned.source.clone().unwrap();
    let original = item.source.clone().unwrap();
    let target = turned.target.clone().unwrap();
    let old_target = item.target.clone().unwrap();
    assert_eq!(source.source_region, "westus");
    assert_eq!(source.resource_group, old_target.resource_group);
    assert_eq!(source.virtual_network, old_target.virtual_network);
    assert_eq!(
        source
            .disks
            .iter()
            .map(|d| (d.id.as_str(), d.source_path.as_str()))
            .collect::<Vec<_>>(),
        vec![("os", "/west/web-os.img"), ("data", "/west/web-data.img")]
    );
    assert_eq!(target.region, "eastus");
    assert_eq!(target.resource_group, original.resource_group);
    assert_eq!(target.virtual_network, original.virtual_network);
    assert_eq!(target.subnet, original.subnet);
    let r = turned.reprotection.clone().unwrap();
    assert_eq!(r.from_incarnation, item.incarnation);
    assert_eq!(r.original_region, "eastus");
    assert_eq!(
        r.original_disks
            .iter()
            .map(|d| (d.disk_id.as_str(), d.path.as_str()))
            .collect::<Vec<_>>(),
        vec![("os", "/images/os.raw"), ("data", "/images/data.raw")]
    );
    assert!(!r.seed_complete);
    assert_eq!(r.distrusted, reported.fenced_writes);
    assert!(turned.fenced_writes.is_empty());
    // The registered VM moved with it.
    let moved = c
        .get_vm(pb::GetVmRequest { name: "web".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.source_region, "westus");
    // The same request again (a resumed job): the same item.
    let again = c
        .reprotect_item(reprotect_req("web", item.incarnation, &failed_over))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.incarnation, turned.incarnation);
    assert_eq!(again.revision, turned.revision);

    // No agent until the reverse replica is seeded.
    let err = c
        .register_agent(pb::RegisterAgentRequest {
            vm_name: "web".into(),
            hostname: "west-host".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("seeded"), "{err:?}");
    let err = c
        .complete_reprotect_seed(pb::CompleteReprotectSeedRequest {
            vm_name: "web".into(),
            incarnation: item.incarnation,
            summary: "stale".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let seeded = c
        .complete_reprotect_seed(pb::CompleteReprotectSeedRequest {
            vm_name: "web".into(),
            incarnation: turned.incarnation,
            summary: "seeded 5 MiB".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let r = seeded.reprotection.unwrap();
    assert!(r.seed_complete);
    assert_eq!(r.seed_summary, "seeded 5 MiB");
    let agent = c
        .register_agent(pb::RegisterAgentRequest {
            vm_name: "web".into(),
            hostname: "west-host".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(agent.disks[0].source_path, "/west/web-os.img");
    assert!(agent.item.unwrap().reprotection.is_some());

    // Persisted: a restarted registry holds the turned item.
    let dir = f.registry.data_dir.clone();
    f.registry.stop().await;
    let registry = start_registry(dir, Some("http://127.0.0.1:7102".into())).await;
    ferry_testkit::wait_serving(&registry.url).await;
    let mut c = RegistryClient::connect(registry.url.clone()).await.unwrap();
    let kept = c
        .get_protected_item(pb::GetProtectedItemRequest {
            vm_name: "web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.incarnation, turned.incarnation);
    assert!(kept.reprotection.unwrap().seed_complete);
    registry.stop().await;
}
