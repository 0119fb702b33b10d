//! libvirt for the tests (ferry_testkit::libvirt) and what the libvirt
//! tests share: a cluster failing `westus` over onto it, the guest's shape,
//! the failed-over guest's console.

use std::path::Path;
use std::time::Duration;

pub use ferry_testkit::libvirt::*;

/// The console of `vm` once its guest printed FERRY-DONE (or an error).
pub async fn console_when_done(vm: &ferry_proto::failover::v1::TargetVm) -> String {
    let path = vm.console_path.clone();
    ferry_testkit::wait_for(
        "the failed-over guest to finish on its console",
        Duration::from_secs(300),
        || {
            let path = path.clone();
            async move {
                let text = std::fs::read_to_string(&path).ok()?;
                (text.contains("FERRY-DONE") || text.contains("FERRY-ERROR")).then_some(text)
            }
        },
    )
    .await
}

/// The target VM named `name`.
pub async fn target(url: &str, name: &str) -> ferry_proto::failover::v1::TargetVm {
    super::target_vms(url)
        .await
        .into_iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no target VM {name}"))
}

/// A cluster whose failover-svc runs `westus` on this machine's libvirtd
/// (software emulation) with `settings` otherwise; its data directory (in
/// the tempdir returned) where libvirt's QEMU user, not root, can reach
/// the images and consoles.
pub async fn cluster(
    settings: failover_svc::libvirt::Settings,
) -> (ferry_testkit::Cluster, tempfile::TempDir) {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cluster = ferry_testkit::Cluster::start_options(ferry_testkit::ClusterOptions {
        failover: failover_settings(settings),
        failover_dir: Some(root.path().join("failover")),
        ..Default::default()
    })
    .await;
    (cluster, root)
}

/// failover-svc's settings with `westus` on this machine's libvirtd
/// (software emulation) and `settings` otherwise.
pub fn failover_settings(settings: failover_svc::libvirt::Settings) -> failover_svc::Settings {
    failover_svc::Settings {
        libvirt: Some(failover_svc::libvirt::Settings {
            regions: [("westus".to_string(), vec![URI.to_string()])].into(),
            domain_type: "qemu".into(),
            ..settings
        }),
        ..Default::default()
    }
}

/// The shape that boots the guest of scripts/guest.sh (in `guest`) with
/// `args` on its kernel command line, ready at FERRY-READY.
pub fn guest_shape(guest: &Path, args: &str) -> ferry_proto::registry::v1::VmShape {
    let guest = std::fs::canonicalize(guest).unwrap();
    ferry_proto::registry::v1::VmShape {
        vcpus: 1,
        memory_mib: 256,
        kernel: guest.join("vmlinuz").display().to_string(),
        initrd: guest.join("initrd.gz").display().to_string(),
        cmdline: format!("console=ttyS0 panic=-1 quiet {args}"),
        ready_marker: "FERRY-READY".into(),
        ..Default::default()
    }
}
