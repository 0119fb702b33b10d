//! create-vm: the VM is recorded in the target region (and, with a
//! hypervisor backend, defined on a host, not started): in the network's
//! subnet, each source NIC at its own address if free (else the next free
//! one) and with its own MAC (else one derived from the names, stepped past
//! any other VM's), with the materialized disks in the source VM's disk
//! order and the registered shape. An instant failover's disks are the
//! overlays serve-disks made, backed by the served point. The same VM again replaces itself, so a
//! resumed step is harmless.

use std::sync::Arc;

use ferry_proto::ids::{MacAddr, UnixNanos};
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
    let others: Vec<TargetVm> = backend
        .vms()?
        .into_iter()
        .filter(|v| {
            !(v.name == name
                && v.region == target.region
                && v.resource_group == target.resource_group)
        })
        .collect();
    // Addresses other VMs hold in this subnet.
    let mut taken: Vec<String> = others
        .iter()
        .flat_map(|v| v.nics.iter())
        .filter(|n| n.subnet == subnet.name)
        .map(|n| n.private_ip.clone())
        .collect();
    // MACs other VMs of the region hold, by holder and network. A MAC
    // must be unique on its network (its L2 segment): a registered one
    // another VM there holds is refused; a derived one steps past every
    // MAC of the region.
    let mut macs: Vec<(MacAddr, String, String)> = others
        .iter()
        .filter(|v| v.region == target.region)
        .flat_map(|v| {
            v.nics.iter().filter_map(|n| {
                n.mac_address
                    .map(|m| (m, v.name.clone(), v.virtual_network.clone()))
            })
        })
        .collect();
    let mut nics = Vec::new();
    for nic in &item.source_nics {
        let ip = inventory::assign_ip(&subnet.address_prefix, &nic.private_ip, &taken).ok_or_else(
            || Refused::failed_precondition(format!("subnet {} has no free address", subnet.name)),
        )?;
        taken.push(ip.clone());
        let mac = match nic.mac_address {
            Some(mac) => {
                if let Some((_, holder, _)) = macs
                    .iter()
                    .find(|(m, _, network)| *m == mac && *network == net.name)
                {
                    return Err(Refused::failed_precondition(format!(
                        "NIC {} of {vm} has MAC {mac}, which VM {holder} on network {} in {} \
                         holds; delete that VM (or clean up its test failover) first",
                        nic.name, net.name, target.region
                    ))
                    .into());
                }
                mac
            }
            None => (0u32..)
                .map(|n| MacAddr::derived(&[vm.as_str(), &nic.name, &name, &n.to_string()]))
                .find(|m| !macs.iter().any(|(t, _, _)| t == m))
                .unwrap_or(MacAddr::derived(&[vm.as_str(), &nic.name])),
        };
        macs.push((mac, name.clone(), net.name.clone()));
        nics.push(inventory::Nic {
            name: nic.name.clone(),
            subnet: subnet.name.clone(),
            private_ip: ip,
            mac_address: Some(mac),
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
    let mut disks = Vec::new();
    for d in &point_disks {
        let disk_name = disk_names
            .iter()
            .find(|(id, _)| *id == d.disk_id)
            .map(|(_, n)| n.clone())
            .unwrap_or_default();
        let served = job.served.iter().find(|s| s.disk_id == d.disk_id);
        let (path, format, backing) = match served {
            Some(s) => (
                s.overlay.clone(),
                inventory::DiskFormat::Qcow2,
                Some(engine.instant()?.url(&s.export)),
            ),
            None if job.instant => {
                return Err(Refused::failed_precondition(format!(
                    "disk {} of {vm} is not served; serve-disks has not run",
                    d.disk_id
                ))
                .into())
            }
            None => (
                match super::original_disk(job, &item, &d.disk_id)? {
                    Some(original) => original,
                    None => backend.disk_path(&target.region, &target.resource_group, &disk_name),
                },
                inventory::DiskFormat::Raw,
                None,
            ),
        };
        disks.push(inventory::Disk {
            disk_id: d.disk_id.clone(),
            name: disk_name,
            size_bytes: d.size_bytes,
            path,
            os: item.os_disk.as_deref() == Some(d.disk_id.as_str()),
            format,
            backing,
        });
    }
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
        shape: item.shape.clone(),
        host: String::new(),
        domain: String::new(),
        console_path: String::new(),
    };
    let ips: Vec<String> = created.nics.iter().map(|n| n.private_ip.clone()).collect();
    let created = engine.on_backend(move |b| b.put_vm(created)).await?;
    let on = if created.host.is_empty() {
        String::new()
    } else {
        format!(", domain {} on {}", created.domain, created.host)
    };
    Ok(format!(
        "VM {name} in {}/{} at {}{on}",
        target.region,
        target.resource_group,
        ips.join(", ")
    ))
}
