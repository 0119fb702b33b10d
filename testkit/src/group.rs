//! Replication groups: a multi-VM policy and group, members joining it, and
//! the group's multi-VM points.

use std::path::Path;
use std::time::Duration;

use ferry_proto::processor::v1 as proc;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::security::ServiceKind;
use ferry_runtime::time::to_duration;

use crate::At;

/// Creates policy `<group>-policy` (multi-VM consistency on, a bookmark
/// round and a crash-consistent point every `interval`, everything kept a
/// day) and replication group `group` under it.
pub async fn create_group<'a>(registry: impl Into<At<'a>>, group: &str, interval: Duration) {
    let mut r = RegistryClient::new(registry.into().admin());
    let day = Duration::from_secs(86400);
    let policy = format!("{group}-policy");
    r.create_policy(reg::CreatePolicyRequest {
        policy: Some(reg::ReplicationPolicy {
            name: policy.clone(),
            crash_consistent_interval: Some(to_duration(interval)),
            multi_vm_consistency: true,
            multi_vm_interval: Some(to_duration(interval)),
            keep_all_points_for: Some(to_duration(day)),
            thinned_point_spacing: Some(to_duration(day)),
            recovery_point_retention: Some(to_duration(day)),
            ..Default::default()
        }),
    })
    .await
    .expect("create the group's policy");
    r.create_replication_group(reg::CreateReplicationGroupRequest {
        name: group.to_string(),
        policy_name: policy,
    })
    .await
    .expect("create the group");
}

/// Registers `vm` (as [`crate::vm::vm_spec`]) and enables its replication to
/// westus as a member of `group`.
pub async fn join_group<'a>(
    registry: impl Into<At<'a>>,
    vm: &str,
    disks: &[(&str, u64, &Path)],
    group: &str,
) -> reg::ProtectedItem {
    let mut r = RegistryClient::new(registry.into().admin());
    r.register_vm(reg::RegisterVmRequest {
        vm: Some(crate::vm::vm_spec(vm, disks)),
    })
    .await
    .expect("register the VM");
    r.enable_replication(reg::EnableReplicationRequest {
        vm_name: vm.to_string(),
        target_region: "westus".into(),
        replication_group: group.to_string(),
        ..Default::default()
    })
    .await
    .expect("enable replication in the group")
    .into_inner()
}

/// The group's multi-VM points, newest first (none if the group has no
/// protected member yet).
pub async fn group_points<'a>(processor: impl Into<At<'a>>, group: &str) -> Vec<proc::GroupPoint> {
    let mut p = crate::points::client(processor.into());
    match p
        .list_group_points(proc::ListGroupPointsRequest {
            replication_group: group.to_string(),
            limit: 0,
        })
        .await
    {
        Ok(r) => r.into_inner().points,
        Err(s) if s.code() == tonic::Code::NotFound => Vec::new(),
        Err(s) => panic!("list group points: {s}"),
    }
}

/// The group as registry has it.
pub async fn group<'a>(registry: impl Into<At<'a>>, group: &str) -> reg::ReplicationGroup {
    let mut r = RegistryClient::new(registry.into().as_service(ServiceKind::Failover));
    r.get_replication_group(reg::GetReplicationGroupRequest {
        name: group.to_string(),
    })
    .await
    .expect("get the group")
    .into_inner()
}
