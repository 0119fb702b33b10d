//! The real ferry-agent binary: registers, copies its VM's disk (initial
//! replication) while qemu-io writes through its NBD export, reaches
//! PROTECTED, and everything lands in a real cache-svc process.

use std::collections::HashMap;
use std::fs::File;
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_proto::cache::v1 as pb;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_testkit::replay::{apply, tail_all};
use ferry_testkit::{bin_path, free_addr, start_registry, wait_for, wait_serving, ServiceProcess};

const SIZE: u64 = 8 << 20;

/// The agent process, killed however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_replicates_its_vm() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("os.raw");
    let s = source.to_str().unwrap();
    run("qemu-img", &["create", "-f", "raw", s, &SIZE.to_string()]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x42 1M 3M", s]);

    let cache_addr = free_addr();
    let cache_url = format!("http://{cache_addr}");
    let registry = start_registry(dir.path().join("registry"), Some(cache_url.clone())).await;
    wait_serving(&registry.url).await;
    let _cache = ServiceProcess::start_at(
        cache_addr,
        bin_path("cache-svc"),
        dir.path().join("cache"),
        &["--registry", &registry.url],
    );
    wait_serving(&cache_url).await;
    let mut r = RegistryClient::connect(registry.url.clone()).await.unwrap();
    r.register_vm(reg::RegisterVmRequest {
        vm: Some(reg::Vm {
            name: "vm".into(),
            source_region: "eastus".into(),
            resource_group: "rg".into(),
            virtual_network: "net".into(),
            subnet: "sub".into(),
            nics: vec![reg::Nic {
                name: "nic0".into(),
                private_ip: "10.0.0.4".into(),
            }],
            disks: vec![reg::Disk {
                id: "os".into(),
                size_bytes: SIZE,
                role: reg::DiskRole::Os as i32,
                storage: reg::DiskStorage::Managed as i32,
                source_path: s.to_string(),
            }],
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    r.enable_replication(reg::EnableReplicationRequest {
        vm_name: "vm".into(),
        target_region: "westus".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    let nbd = free_addr();
    let _agent = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
            .args(["--registry", &registry.url, "--vm", "vm"])
            .args([
                "--nbd-listen",
                &nbd.to_string(),
                "--group-listen",
                "127.0.0.1:0",
            ])
            .env("FERRY_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let state = |r: &RegistryClient<tonic::transport::Channel>| {
        let mut r = r.clone();
        async move {
            r.get_protected_item(reg::GetProtectedItemRequest {
                vm_name: "vm".into(),
            })
            .await
            .ok()
            .map(|i| i.into_inner())
        }
    };
    wait_for(
        "the agent to reach PROTECTED",
        Duration::from_secs(60),
        || {
            let s = state(&r);
            async move {
                s.await
                    .filter(|i| i.state() == reg::ReplicationState::Protected)
            }
        },
    )
    .await;

    let url = format!("nbd://{nbd}/os");
    let written = tokio::task::spawn_blocking(move || {
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x99 2M 256k",
                "-c",
                "write -z 3M 64k",
                &url,
            ],
        )
    });
    written.await.unwrap();

    // The cache's log, replayed onto an empty disk, becomes the source.
    let expected = std::fs::read(&source).unwrap();
    let replica = dir.path().join("replica.raw");
    wait_for(
        "the log to rebuild the source",
        Duration::from_secs(60),
        || {
            let (cache_url, replica, expected) = (cache_url.clone(), replica.clone(), &expected);
            async move {
                let records: Vec<pb::Record> = tail_all(&cache_url, "vm", 1).await;
                let f = File::create(&replica).unwrap();
                f.set_len(SIZE).unwrap();
                apply(&records, &HashMap::from([("os".to_string(), f)]));
                (std::fs::read(&replica).unwrap() == *expected).then_some(())
            }
        },
    )
    .await;

    registry.stop().await;
}
