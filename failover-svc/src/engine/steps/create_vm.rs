//! create-vm: the VM is recorded in the target region: in the network's
//! subnet, each source NIC at its own address if free (else the next free
//! one), with the materialized disks in the source VM's disk order. The
//! same VM again replaces itself, so a resumed step is harmless.

use std::sync::Arc;

use ferry_proto::ids::UnixNanos;
use ferry_runtime::Refused;

use super::{network, target_names, Result};
use crate::engine::Engine;
use crate::inventory::{self, TargetVm};
use crate::jobs::JobRecord;

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    let vm = job.vm()?;
    let item = engine.item(vm).await?;
    let target = &item.target;
    let backend = engine.backend();
    let (net, subnet) = network(engine, job).await?;
    let (name, disk_names) = target_names(job, &item);
    let point_id = job
        .points
        .first()
        .map(|u| u.point_id.clone())
        .unwrap_or_default();
    let point = engine.point(vm, &point_id).await?;
    // Addresses other VMs hold in this subnet.
    let mut taken: Vec<String> = backend
        .vms()?
        .into_iter()
        .filter(|v| {
            !(v.name == name
                && v.region == target.region
                && v.resource_group == target.resource_group)
        })
        .flat_map(|v| {
            v.nics
                .into_iter()
                .filter(|n| n.subnet == subnet.name)
                .map(|n| n.private_ip)
        })
        .collect();
    let mut nics = Vec::new();
    for nic in &item.source_nics {
        let ip = inventory::assign_ip(&subnet.address_prefix, &nic.private_ip, &taken).ok_or_else(
            || Refused::failed_precondition(format!("subnet {} has no free address", subnet.name)),
        )?;
        taken.push(ip.clone());
        nics.push(inventory::Nic {
            name: nic.name.clone(),
            subnet: subnet.name.clone(),
            private_ip: ip,
        });
    }
    // In the source VM's disk order.
    let mut point_disks = point.disks.clone();
    point_disks.sort_by_key(|d| {
        item.source_disks
            .iter()
            .position(|id| *id == d.disk_id)
            .unwrap_or(usize::MAX)
    });
    let disks = point_disks
        .iter()
        .map(|d| {
            let disk_name = disk_names
                .iter()
                .find(|(id, _)| *id == d.disk_id)
                .map(|(_, n)| n.clone())
                .unwrap_or_default();
            let path = backend.disk_path(&target.region, &target.resource_group, &disk_name);
            inventory::Disk {
                disk_id: d.disk_id.clone(),
                name: disk_name,
                size_bytes: d.size_bytes,
                path,
            }
        })
        .collect();
    let created = TargetVm {
        region: target.region.clone(),
        resource_group: target.resource_group.clone(),
        name: name.clone(),
        source_vm: vm.to_string(),
        virtual_network: net.name.clone(),
        availability_set: target.availability_set.clone(),
        nics,
        disks,
        point_id: point.id.clone(),
        test: job.is_test(),
        job_id: job.id.to_string(),
        created_nanos: UnixNanos::now().get(),
    };
    let ips: Vec<String> = created.nics.iter().map(|n| n.private_ip.clone()).collect();
    backend.put_vm(created)?;
    Ok(format!(
        "VM {name} in {}/{} at {}",
        target.region,
        target.resource_group,
        ips.join(", ")
    ))
}
