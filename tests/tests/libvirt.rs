//! Failover onto libvirt: failover-svc's libvirt backend brings a protected
//! guest up as a real domain on this machine's libvirtd (`qemu:///system`,
//! software emulation). The guest (scripts/guest.sh) wrote files through
//! the agent's NBD export; the failed-over domain boots from the replica,
//! asks DHCP for its address on the target network and prints every file
//! with its checksum on its serial console. A test failover and its cleanup
//! (and the deletion of the test network) leave no domain, network, image
//! or console behind; a real failover keeps the source's private IP, and
//! its commit keeps the VM running.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::guest::{boot, drive, ext4_vm, files, guest, leased_ip};
use common::libvirt::{
    cluster, console_when_done, daemons, forget, guest_shape, names, target, virsh, URI,
};
use ferry_proto::failover::v1 as fo;
use ferry_testkit::points::cut_latest;
use ferry_testkit::{wait_for, Cluster};

const FILES: usize = 20;
/// Every libvirt name failover-svc gives in the target region.
const PREFIX: &str = "ferry.westus.";

/// Checks the domain of `vm` runs on its network, and that its guest
/// leased the VM's address and shows exactly `written`.
async fn booted_with(vm: &fo::TargetVm, network: &str, written: &BTreeMap<String, String>) {
    assert_eq!(vm.host, URI);
    assert!(vm.domain.starts_with(PREFIX), "{}", vm.domain);
    assert_eq!(virsh(&["domstate", &vm.domain]).trim(), "running");
    let nics = virsh(&["domiflist", &vm.domain]);
    assert!(
        nics.contains(network) && nics.contains(&vm.nics[0].mac_address),
        "{} is not on {network} with MAC {}: {nics}",
        vm.domain,
        vm.nics[0].mac_address
    );
    let console = console_when_done(vm).await;
    assert_eq!(&files(&console), written, "{console}");
    assert_eq!(
        leased_ip(&console).as_deref(),
        Some(vm.nics[0].private_ip.as_str()),
        "{console}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_fails_over_onto_libvirt_and_boots_with_every_file() {
    let began = std::time::Instant::now();
    let phase = |what: &str| eprintln!("{:>6.1}s {what}", began.elapsed().as_secs_f64());
    daemons();
    forget(PREFIX);
    let guest = guest();
    let (cluster, _root) = cluster(Default::default()).await;
    let registry = cluster.registry.url.clone();
    let url = cluster.failover.url.clone();
    // Registered with its shape: the failed-over guest boots the same
    // kernel, reads back its files, asks DHCP for its address and stays up.
    let (dir, _) = ext4_vm(&cluster, |mut vm| {
        vm.nics[0].private_ip = "10.213.7.4".into();
        vm.shape = Some(guest_shape(
            &guest,
            "ferry.mode=verify ferry.net=dhcp ferry.stay=1",
        ));
        vm
    })
    .await;
    phase("protected");
    let (agent, nbd) = common::protected_agent(&registry, "vm", &dir.path().join("agent")).await;
    let written = boot(
        &guest,
        &drive(&format!("{nbd}/os")),
        &format!("ferry.mode=write ferry.files={FILES}"),
    )
    .await;
    assert_eq!(written.len(), FILES);
    phase("the source guest wrote its files");
    agent.stream.flushed().await;
    let point = cut_latest(&cluster.processor.url, "vm").await.unwrap();

    // A test failover into its own isolated network.
    common::failover(&url)
        .await
        .create_network(fo::CreateNetworkRequest {
            network: Some(fo::Network {
                region: "westus".into(),
                resource_group: "drill".into(),
                name: "drill".into(),
                subnets: vec![fo::Subnet {
                    name: "default".into(),
                    address_prefix: "10.213.9.0/24".into(),
                }],
            }),
        })
        .await
        .unwrap();
    let drill_net = "ferry.westus.drill.default";
    assert!(names(&["net-list", "--name"]).contains(&drill_net.to_string()));
    let (job, _) = common::succeed(
        &url,
        common::failover_request(
            "vm",
            fo::FailoverKind::Test,
            fo::point_choice::Choice::PointId(point.id.clone()),
            "drill",
        ),
    )
    .await;
    phase("test failover done");
    let start = job.steps.iter().find(|s| s.name == "start-vm").unwrap();
    assert!(start.message.contains("FERRY-READY"), "{start:?}");
    let test_vm = target(&url, "vm-test").await;
    // Not the source's address: 10.213.7.4 is not in the drill subnet.
    assert_eq!(test_vm.nics[0].private_ip, "10.213.9.4");
    booted_with(&test_vm, drill_net, &written).await;
    phase("the test VM showed every file");

    // Cleanup leaves nothing of the test VM; deleting the network nothing
    // of it.
    common::cleanup_test(&url, "vm").await;
    assert!(!names(&["list", "--all", "--name"]).contains(&test_vm.domain));
    for gone in test_vm
        .disks
        .iter()
        .map(|d| d.path.as_str())
        .chain([test_vm.console_path.as_str()])
    {
        assert!(!Path::new(gone).exists(), "{gone} is left behind");
    }
    common::failover(&url)
        .await
        .delete_network(fo::DeleteNetworkRequest {
            region: "westus".into(),
            name: "drill".into(),
        })
        .await
        .unwrap();
    let left: Vec<String> = names(&["list", "--all", "--name"])
        .into_iter()
        .chain(names(&["net-list", "--all", "--name"]))
        .filter(|n| n.starts_with(PREFIX))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    phase("cleaned up");

    // The real thing: the source's address kept on the target network
    // failover creates, and the VM runs on after commit.
    let (job, _) = common::succeed(
        &url,
        common::failover_request(
            "vm",
            fo::FailoverKind::Unplanned,
            fo::point_choice::Choice::PointId(point.id.clone()),
            "",
        ),
    )
    .await;
    assert_eq!(job.points[0].point_id, point.id);
    phase("failover done");
    let vm = target(&url, "vm").await;
    assert_eq!(vm.nics[0].private_ip, "10.213.7.4");
    booted_with(&vm, "ferry.westus.net-ferry.sub", &written).await;
    phase("the failed-over VM showed every file");
    let commit = common::failover(&url)
        .await
        .commit_failover(fo::CommitFailoverRequest {
            target: Some(fo::commit_failover_request::Target::VmName("vm".into())),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let (commit, _) = common::finish(&url, &commit).await;
    assert_eq!(commit.state, fo::JobState::Succeeded as i32, "{commit:?}");
    assert_eq!(virsh(&["domstate", &vm.domain]).trim(), "running");

    agent.stop(Duration::from_secs(5)).await.unwrap();
    cluster.stop().await;
    forget(PREFIX);
}

/// A libvirt domain that runs already is protected without a restart: the
/// agent drives its QEMU through `virsh qemu-monitor-command` and QEMU
/// mirrors the drive into the agent's TCP export. The guest writes on; a
/// point comes to equal its own disk byte for byte; SIGTERM ends the
/// mirror with the domain still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_libvirt_domain_is_protected_without_a_restart() {
    const DOMAIN: &str = "ferry-attach-test";
    daemons();
    forget(DOMAIN);
    let guest = std::fs::canonicalize(guest()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cluster = Cluster::start().await;
    let registry = cluster.registry.url.clone();
    let processor = cluster.processor.url.clone();
    let own = dir.path().join("own.raw");
    let copy = dir.path().join("vm-os.raw");
    for image in [&own, &copy] {
        ferry_testkit::run_tool(
            "qemu-img",
            &[
                "create",
                "-f",
                "raw",
                image.to_str().unwrap(),
                &common::guest::SIZE.to_string(),
            ],
        );
    }
    ferry_testkit::run_tool("mkfs.ext4", &["-q", "-F", own.to_str().unwrap()]);
    common::policy(&registry, "fast", Duration::from_secs(1)).await;
    ferry_testkit::protect_spec(
        &registry,
        ferry_testkit::vm_spec("vm", &[("os", common::guest::SIZE, &copy)]),
        "fast",
    )
    .await;
    // The domain: the guest on its own disk, writing for a while.
    let console = dir.path().join("console.log");
    let xml = format!(
        "<domain type='qemu'><name>{DOMAIN}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>\
         <os><type>hvm</type><kernel>{}</kernel><initrd>{}</initrd>\
         <cmdline>console=ttyS0 panic=-1 quiet ferry.mode=write ferry.files=80 ferry.delay=0.1 ferry.stay=1</cmdline></os>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <serial type='file'><source path='{}'/><target port='0'/></serial></devices></domain>",
        guest.join("vmlinuz").display(),
        guest.join("initrd.gz").display(),
        own.display(),
        console.display()
    );
    let xml_path = dir.path().join("domain.xml");
    std::fs::write(&xml_path, xml).unwrap();
    virsh(&["create", xml_path.to_str().unwrap()]);
    let lines = |what: &'static str| {
        let console = console.clone();
        move || {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            async move { text.contains(what).then_some(text) }
        }
    };
    wait_for(
        "the guest to write",
        Duration::from_secs(120),
        lines("FERRY-FILE f3 "),
    )
    .await;

    let insecure = ferry_testkit::Insecure::new();
    let nbd = ferry_testkit::free_addr().to_string();
    let mut agent = common::Killed(
        ferry_testkit::agent_command(&registry, "vm", ferry_testkit::AgentAuth::Token(&insecure))
            .args(["--nbd-listen", &nbd, "--group-listen", "127.0.0.1:0"])
            .args([
                "--attach-domain",
                DOMAIN,
                "--attach-drive",
                "virtio-disk0=os",
            ])
            .arg("--state-dir")
            .arg(dir.path().join("agent"))
            .arg("--disk-root")
            .arg(dir.path())
            .spawn()
            .unwrap(),
    );
    let jobs = || {
        let out = virsh(&[
            "qemu-monitor-command",
            DOMAIN,
            r#"{"execute":"query-block-jobs"}"#,
        ]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["return"].clone()
    };
    wait_for("the mirror to be ready", Duration::from_secs(120), || {
        let ready = jobs().as_array().is_some_and(|j| {
            j.iter()
                .any(|j| j["device"] == "ferry-os" && j["ready"] == true)
        });
        async move { ready.then_some(()) }
    })
    .await;
    let text = wait_for(
        "the guest to finish",
        Duration::from_secs(300),
        lines("FERRY-DONE"),
    )
    .await;
    assert_eq!(files(&text).len(), 80, "{text}");
    common::guest::point_equal_to(&processor, &own).await;
    // SIGTERM: the mirror ends, the domain runs on.
    let term = std::process::Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(agent.0.wait().unwrap().success());
    assert_eq!(jobs().as_array().map(Vec::len), Some(0));
    assert_eq!(virsh(&["domstate", DOMAIN]).trim(), "running");
    virsh(&["destroy", DOMAIN]);
    cluster.stop().await;
}
