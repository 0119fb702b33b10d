//! The real registry-svc binary: reflection and health through grpcurl,
//! graceful SIGTERM, persistence across SIGKILL, and the configuration scheme.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::process::{Child, Command, Stdio};

use ferry_proto::registry::v1 as pb;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::peers::Credentials;
use ferry_runtime::security::ServiceKind;
use ferry_testkit::{
    assert_reflection_and_health, channel, free_addr, grpcurl_run, wait_serving, Insecure,
    ServiceProcess,
};

const BIN: &str = env!("CARGO_BIN_EXE_registry-svc");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_sees_the_api_and_sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let insecure = Insecure::new();
    let mut p = ServiceProcess::start(&insecure, BIN, dir.path().join("registry"), &[]);
    wait_serving(&p.url()).await;
    let addr = p.addr.to_string();
    assert_reflection_and_health(&addr, "ferry.registry.v1.Registry");
    // An RPC needs credentials: grpcurl sends the admin's bearer token.
    let regions = "ferry.registry.v1.Registry/ListRegions";
    let out = ferry_testkit::grpcurl()
        .args(["-plaintext", &addr, regions])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    let header = Insecure::header(&insecure.admin());
    let listed = grpcurl_run(&["-H", &header, &addr, regions]);
    assert!(listed.contains("westus"), "{listed}");
    let status = p.signal_and_wait("TERM");
    assert!(status.success(), "SIGTERM exit: {status}");
}

fn client(url: &str, credentials: &Credentials) -> RegistryClient<ferry_runtime::PeerChannel> {
    RegistryClient::new(channel(url, credentials))
}

/// Everything the registry holds, as comparable text.
async fn state(url: &str, insecure: &Insecure) -> Vec<String> {
    let mut c = client(url, &insecure.admin());
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
    let insecure = Insecure::new();
    let mut p = ServiceProcess::start(
        &insecure,
        BIN,
        dir.path().join("registry"),
        &["--cache", "http://127.0.0.1:7102"],
    );
    wait_serving(&p.url()).await;
    let mut c = client(&p.url(), &insecure.admin());
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
                mac_address: String::new(),
            }],
            disks: vec![
                pb::Disk {
                    id: "os".into(),
                    size_bytes: 1 << 30,
                    role: pb::DiskRole::Os as i32,
                    storage: pb::DiskStorage::Managed as i32,
                    source_path: "/images/db-os.raw".into(),
                },
                pb::Disk {
                    id: "data".into(),
                    size_bytes: 4 << 30,
                    role: pb::DiskRole::Data as i32,
                    storage: pb::DiskStorage::Managed as i32,
                    source_path: "/images/db-data.raw".into(),
                },
            ],
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
    // A state only services and the VM's agent move, and the agent's own
    // registration.
    client(&p.url(), &insecure.service(ServiceKind::Cache))
        .transition_state(pb::TransitionStateRequest {
            vm_name: "db".into(),
            to: pb::ReplicationState::InitialReplication as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let enrollment = insecure.enroll(&p.url(), "db").await;
    client(&p.url(), &insecure.agent("db"))
        .register_agent(pb::RegisterAgentRequest {
            vm_name: "db".into(),
            enrollment_token: enrollment,
            ..Default::default()
        })
        .await
        .unwrap();
    let before = state(&p.url(), &insecure).await;
    let vm_before = c
        .get_vm(pb::GetVmRequest { name: "db".into() })
        .await
        .unwrap()
        .into_inner();
    let item_before = c
        .get_protected_item(pb::GetProtectedItemRequest {
            vm_name: "db".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let policy_before = c
        .get_policy(pb::GetPolicyRequest {
            name: "multi".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let group_before = c
        .get_replication_group(pb::GetReplicationGroupRequest { name: "erp".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(group_before.members, ["db"]);
    assert_eq!(
        item_before.state(),
        pb::ReplicationState::InitialReplication
    );
    drop(c);

    let status = p.signal_and_wait("KILL");
    assert!(!status.success());
    p.restart();
    wait_serving(&p.url()).await;
    let after = state(&p.url(), &insecure).await;
    assert_eq!(before, after);

    let mut c = client(&p.url(), &insecure.admin());
    let vm = c
        .get_vm(pb::GetVmRequest { name: "db".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm, vm_before);
    assert_eq!(vm.disks.len(), 2);
    let item = c
        .get_protected_item(pb::GetProtectedItemRequest {
            vm_name: "db".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(item, item_before);
    assert_eq!(item.state(), pb::ReplicationState::InitialReplication);
    assert_eq!(item.epoch, 1);
    assert_eq!(item.replication_group, "erp");
    assert_eq!(item.policy_name, "multi");
    let target = item.target.as_ref().unwrap();
    assert_eq!(target.region, "westus");
    assert_eq!(target.resource_group, "erp-rg-ferry");
    assert_eq!(target.virtual_network, "corp-dr");
    let replicas: Vec<&str> = target
        .replica_disks
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(replicas, ["db-os-ferry", "db-data-ferry"]);
    let policy = c
        .get_policy(pb::GetPolicyRequest {
            name: "multi".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(policy, policy_before);
    assert!(policy.multi_vm_consistency);
    let group = c
        .get_replication_group(pb::GetReplicationGroupRequest { name: "erp".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(group, group_before);
    let mappings = c
        .list_network_mappings(pb::ListNetworkMappingsRequest {})
        .await
        .unwrap()
        .into_inner()
        .mappings;
    let has = |from: &str, net: &str, to: &str, to_net: &str| {
        mappings.iter().any(|m| {
            m.source_region == from
                && m.source_network == net
                && m.target_region == to
                && m.target_network == to_net
        })
    };
    assert!(has("eastus", "corp", "westus", "corp-dr"), "{mappings:?}");
    assert!(has("westus", "corp-dr", "eastus", "corp"), "{mappings:?}");
}

/// A child process killed when the test ends, passing or not.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_sets_regions_and_flags_beat_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let insecure = Insecure::new();
    let config = dir.path().join("ferry.toml");
    // Plaintext from the file too: `insecure` and the cluster secret.
    std::fs::write(
        &config,
        format!(
            "log = \"warn\"\ninsecure = true\ncluster_secret_file = {:?}\n[limits]\n\
             concurrency_limit = 64\n[registry]\nregions = [\"mars\", \"venus\"]\n",
            insecure.secret_file()
        ),
    )
    .unwrap();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let child = KillOnDrop(
        Command::new(BIN)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--config")
            .arg(&config)
            .arg("--bootstrap-token-file")
            .arg(insecure.admin_token_file())
            // The environment names a bogus address (the binary would refuse
            // it) and a data dir; the flag wins for the address, the environment
            // gives the data dir.
            .env("FERRY_LISTEN", "bogus-address")
            .env("FERRY_DATA_DIR", dir.path().join("from-env"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_serving(&url).await;
    let regions = client(&url, &insecure.admin())
        .list_regions(pb::ListRegionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .regions;
    assert_eq!(regions, ["mars", "venus"]);
    assert!(dir.path().join("from-env").join("registry.sled").exists());
    drop(child);

    // Without the flag the environment's address is used, and refused.
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path().join("bogus"))
        .arg("--insecure")
        .arg("--cluster-secret-file")
        .arg(insecure.secret_file())
        .env("FERRY_LISTEN", "bogus-address")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bogus-address"), "{stderr}");

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

#[test]
fn refuses_plaintext_unless_asked_and_names_the_ways_out() {
    let dir = tempfile::tempdir().unwrap();
    let insecure = Insecure::new();
    let start = |args: &[&std::ffi::OsStr]| {
        let mut command = Command::new(BIN);
        for (key, _) in std::env::vars() {
            if key.starts_with("FERRY_") {
                command.env_remove(key);
            }
        }
        let out = command
            .arg("--listen")
            .arg(free_addr().to_string())
            .arg("--data-dir")
            .arg(dir.path().join("registry"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "started with {args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let secret = insecure.secret_file();
    for (args, why) in [
        (vec![], "without TLS"),
        (
            vec!["--cluster-secret-file".as_ref(), secret.as_os_str()],
            "does not turn plaintext on",
        ),
        (
            vec!["--insecure".as_ref()],
            "--insecure needs --cluster-secret-file",
        ),
    ] {
        let stderr = start(&args);
        assert!(stderr.contains(why), "{args:?}: {stderr}");
        for way in [
            "--tls-cert",
            "ferry certs init",
            "--insecure --cluster-secret-file",
        ] {
            assert!(stderr.contains(way), "{args:?}: {way} missing: {stderr}");
        }
    }
    assert!(!dir.path().join("registry").exists(), "nothing written");
}
