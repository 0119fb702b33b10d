//! A protected VM in one call: what most data-path tests start from.

use std::path::Path;

use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;

/// Registers `vm` in eastus with `disks` (id, size, source image; the first
/// is the OS disk) and enables its replication to westus. Returns the
/// protected item.
pub async fn protect_vm(
    registry_url: &str,
    vm: &str,
    disks: &[(&str, u64, &Path)],
) -> reg::ProtectedItem {
    let mut r = RegistryClient::connect(registry_url.to_string())
        .await
        .expect("connect to registry");
    r.register_vm(reg::RegisterVmRequest {
        vm: Some(reg::Vm {
            name: vm.to_string(),
            source_region: "eastus".into(),
            resource_group: "rg".into(),
            virtual_network: "net".into(),
            subnet: "sub".into(),
            nics: vec![reg::Nic {
                name: "nic0".into(),
                private_ip: "10.0.0.4".into(),
            }],
            disks: disks
                .iter()
                .enumerate()
                .map(|(i, (id, size, path))| reg::Disk {
                    id: id.to_string(),
                    size_bytes: *size,
                    role: if i == 0 {
                        reg::DiskRole::Os
                    } else {
                        reg::DiskRole::Data
                    } as i32,
                    storage: reg::DiskStorage::Managed as i32,
                    source_path: path.display().to_string(),
                })
                .collect(),
            ..Default::default()
        }),
    })
    .await
    .expect("register the VM");
    r.enable_replication(reg::EnableReplicationRequest {
        vm_name: vm.to_string(),
        target_region: "westus".into(),
        ..Default::default()
    })
    .await
    .expect("enable replication")
    .into_inner()
}

/// The VM's protected item now, if it exists.
pub async fn protected_item(registry_url: &str, vm: &str) -> Option<reg::ProtectedItem> {
    let mut r = RegistryClient::connect(registry_url.to_string())
        .await
        .ok()?;
    r.get_protected_item(reg::GetProtectedItemRequest {
        vm_name: vm.to_string(),
    })
    .await
    .ok()
    .map(|i| i.into_inner())
}
