//! A protected VM in one call: what most data-path tests start from.

use std::path::Path;

use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::security::ServiceKind;

use crate::At;

/// Registers `vm` in eastus (as an admin, with `registry`'s credentials) with `disks` (id, size, source image; the first
/// is the OS disk) and enables its replication to westus. Returns the
/// protected item.
pub async fn protect_vm<'a>(
    registry: impl Into<At<'a>>,
    vm: &str,
    disks: &[(&str, u64, &Path)],
) -> reg::ProtectedItem {
    protect_vm_with(registry, vm, disks, "").await
}

/// As [`protect_vm`], under replication policy `policy` ("" for the
/// default).
pub async fn protect_vm_with<'a>(
    registry: impl Into<At<'a>>,
    vm: &str,
    disks: &[(&str, u64, &Path)],
    policy: &str,
) -> reg::ProtectedItem {
    protect_spec(registry, vm_spec(vm, disks), policy).await
}

/// Registers `spec` (as an admin) and enables its replication to westus
/// under `policy` ("" for the default). Returns the protected item.
pub async fn protect_spec<'a>(
    registry: impl Into<At<'a>>,
    spec: reg::Vm,
    policy: &str,
) -> reg::ProtectedItem {
    let mut r = RegistryClient::new(registry.into().admin());
    let vm = spec.name.clone();
    r.register_vm(reg::RegisterVmRequest { vm: Some(spec) })
        .await
        .expect("register the VM");
    r.enable_replication(reg::EnableReplicationRequest {
        vm_name: vm.to_string(),
        target_region: "westus".into(),
        policy_name: policy.to_string(),
        ..Default::default()
    })
    .await
    .expect("enable replication")
    .into_inner()
}

/// The VM's protected item now, if it exists.
pub async fn protected_item<'a>(
    registry: impl Into<At<'a>>,
    vm: &str,
) -> Option<reg::ProtectedItem> {
    let mut r = RegistryClient::new(registry.into().as_service(ServiceKind::Failover));
    r.get_protected_item(reg::GetProtectedItemRequest {
        vm_name: vm.to_string(),
    })
    .await
    .ok()
    .map(|i| i.into_inner())
}

/// Creates a policy whose crash-consistent points come every `interval`,
/// all kept for `keep_all_for`, then one per `spacing`, up to `retention`.
pub async fn create_policy<'a>(
    registry: impl Into<At<'a>>,
    name: &str,
    interval: std::time::Duration,
    keep_all_for: std::time::Duration,
    spacing: std::time::Duration,
    retention: std::time::Duration,
) {
    use ferry_runtime::time::to_duration;
    let mut r = RegistryClient::new(registry.into().admin());
    r.create_policy(reg::CreatePolicyRequest {
        policy: Some(reg::ReplicationPolicy {
            name: name.to_string(),
            crash_consistent_interval: Some(to_duration(interval)),
            keep_all_points_for: Some(to_duration(keep_all_for)),
            thinned_point_spacing: Some(to_duration(spacing)),
            recovery_point_retention: Some(to_duration(retention)),
            ..Default::default()
        }),
    })
    .await
    .expect("create the policy");
}

/// A VM in eastus (rg, net, sub; NIC nic0 at 10.0.0.4) with `disks` (id,
/// size, source image; the first is the OS disk).
pub fn vm_spec(vm: &str, disks: &[(&str, u64, &Path)]) -> reg::Vm {
    reg::Vm {
        name: vm.to_string(),
        source_region: "eastus".into(),
        resource_group: "rg".into(),
        virtual_network: "net".into(),
        subnet: "sub".into(),
        nics: vec![reg::Nic {
            name: "nic0".into(),
            private_ip: "10.0.0.4".into(),
            mac_address: String::new(),
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
    }
}
