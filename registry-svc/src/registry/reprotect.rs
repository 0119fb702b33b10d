//! Re-protect: a committed item turned around. The failed-over VM becomes
//! the source (its disks where failover put them, in what was the target
//! region) and the original region the target, as a new incarnation, so no
//! log or replica of the old direction is ever taken for the new one. The
//! original disks are remembered: failover-svc seeds the reverse replica
//! from them, and failback writes into them.

use std::time::SystemTime;

use super::{Change, Registry, INCARNATION};
use crate::derive::derive_targets;
use crate::error::RegistryError;
use crate::lifecycle::State;
use crate::model::{
    ChangedRange, DiskAt, Overrides, ProtectedItem, RegionServices, Reprotection, Vm,
};

/// The most ranges a fenced agent may report.
pub const MAX_FENCED_RANGES: usize = 4096;
use crate::store::{Kind, Writes};

/// A re-protect request, validated.
#[derive(Debug, Clone)]
pub struct ReprotectRequest {
    pub vm_name: String,
    /// The committed incarnation.
    pub incarnation: u64,
    /// The failed-over VM's disks.
    pub disks: Vec<DiskAt>,
    pub job_id: String,
}

impl Registry {
    /// Turns the COMMITTED item of `req.vm_name` around (see the module
    /// doc). The same request again (a resumed job) returns the new item.
    pub async fn reprotect(&self, req: ReprotectRequest) -> Result<ProtectedItem, RegistryError> {
        let _guard = self.write.lock().await;
        let vm = req.vm_name.as_str();
        let item = self.get_item(vm)?;
        if let Some(r) = &item.reprotection {
            if r.from_incarnation == req.incarnation && r.job_id == req.job_id {
                return Ok(item);
            }
        }
        if item.state != State::Committed {
            return Err(RegistryError::precondition(format!(
                "VM {vm:?} is {}; re-protect turns around a committed failover only (fail it \
                 over, then commit)",
                item.state.name()
            )));
        }
        if item.incarnation != req.incarnation {
            return Err(RegistryError::precondition(format!(
                "VM {vm:?} is at incarnation {}, not {}: it changed since the re-protect was \
                 asked for",
                item.incarnation, req.incarnation
            )));
        }
        if let Some(group) = &item.group {
            return Err(RegistryError::precondition(format!(
                "VM {vm:?} is in replication group {group:?}; re-protect of group members is not \
                 supported: disable its replication and enable it again in the other direction"
            )));
        }
        let mut disks = Vec::new();
        for d in &item.source.disks {
            let mut given = req.disks.iter().filter(|g| g.disk_id == d.id);
            let (Some(at), None) = (given.next(), given.next()) else {
                return Err(RegistryError::invalid(format!(
                    "disks must name disk {:?} of VM {vm:?} exactly once",
                    d.id
                )));
            };
            let mut disk = d.clone();
            disk.source_path = at.path.clone();
            disks.push(disk);
        }
        if let Some(extra) = req
            .disks
            .iter()
            .find(|g| !item.source.disks.iter().any(|d| d.id == g.disk_id))
        {
            return Err(RegistryError::invalid(format!(
                "disks names disk {:?}, which VM {vm:?} does not have",
                extra.disk_id
            )));
        }
        let original = &item.source;
        let t = &item.target;
        // The failed-over VM, where failover put it.
        let source = Vm {
            name: original.name.clone(),
            source_region: t.region.clone(),
            resource_group: t.resource_group.clone(),
            virtual_network: t.virtual_network.clone(),
            subnet: t.subnet.clone(),
            availability_set: t.availability_set.clone(),
            nics: original.nics.clone(),
            disks,
            registered_at: original.registered_at,
            shape: original.shape.clone(),
        };
        // Back into the original placement.
        let overrides = Overrides {
            resource_group: Some(original.resource_group.clone()),
            virtual_network: Some(original.virtual_network.clone()),
            subnet: Some(original.subnet.clone()),
            availability_set: original.availability_set.clone(),
            ..Overrides::default()
        };
        let derivation = derive_targets(&source, &original.source_region, &overrides, |id| {
            self.store.get(Kind::Mapping, id)
        })?;
        self.check_disk_names(vm, &derivation.targets)?;
        let incarnation = self.last_incarnation()? + 1;
        let services = |region: &str| -> Result<Option<RegionServices>, RegistryError> {
            self.store.get::<RegionServices>(Kind::Region, region)
        };
        let now = SystemTime::now();
        let turned = ProtectedItem {
            vm_name: item.vm_name.clone(),
            cache_endpoint: services(&source.source_region)?.and_then(|s| s.cache),
            processor_endpoint: services(&original.source_region)?.and_then(|s| s.processor),
            source: source.clone(),
            policy: item.policy.clone(),
            group: None,
            target: derivation.targets,
            state: State::Enabling,
            state_reason: format!(
                "re-protected: replicating back from {} to {}",
                t.region, original.source_region
            ),
            percent: 0,
            health_reports: Default::default(),
            rpo: None,
            rpo_reported_at: None,
            last_recovery_point: None,
            // Above every agent of the old direction: none may stream again.
            epoch: item.epoch + 1,
            backlog_bytes: 0,
            backlog_records: 0,
            revision: item.revision + 1,
            created_at: now,
            updated_at: now,
            failed_over: false,
            incarnation,
            reprotection: Some(Reprotection {
                from_incarnation: item.incarnation,
                original_region: original.source_region.clone(),
                original_disks: original
                    .disks
                    .iter()
                    .map(|d| DiskAt {
                        disk_id: d.id.clone(),
                        path: d.source_path.clone(),
                    })
                    .collect(),
                seed_complete: false,
                seed_summary: String::new(),
                job_id: req.job_id.clone(),
                distrusted: item.fenced_writes.clone(),
            }),
            fenced_writes: Vec::new(),
        };
        let mut writes = Writes::new();
        writes.put(Kind::Item, vm, &turned)?;
        writes.put(Kind::Vm, vm, &source)?;
        writes.put(Kind::Counter, INCARNATION, &incarnation)?;
        for mapping in &derivation.new_mappings {
            writes.put(Kind::Mapping, &mapping.id(), mapping)?;
        }
        // The old direction's agent and any token for it: the new agent
        // runs beside the failed-over VM's disks.
        writes.remove(Kind::Agent, vm);
        writes.remove(Kind::Enrollment, vm);
        self.store.commit(writes).await?;
        tracing::info!(vm, from = %t.region, to = %original.source_region, incarnation, "re-protected");
        self.publish(Change::Upserted(turned.clone()));
        Ok(turned)
    }

    /// The reverse replica of `vm`'s re-protected item (at `incarnation`)
    /// holds its seed: its agent may register. Done again: a no-op.
    pub async fn complete_reprotect_seed(
        &self,
        vm: &str,
        incarnation: u64,
        summary: String,
    ) -> Result<ProtectedItem, RegistryError> {
        self.update_item(vm, |item| {
            if item.incarnation != incarnation {
                return Err(RegistryError::precondition(format!(
                    "VM {vm:?} is at incarnation {}, not {incarnation}",
                    item.incarnation
                )));
            }
            let Some(r) = item.reprotection.as_mut() else {
                return Err(RegistryError::precondition(format!(
                    "VM {vm:?} was not re-protected; it has no seed"
                )));
            };
            if r.seed_complete {
                return Ok(false);
            }
            r.seed_complete = true;
            r.seed_summary = summary;
            Ok(true)
        })
        .await
    }

    /// A fenced agent (at `epoch`) reports every range its VM wrote since
    /// the fence; they replace its last report. Re-protect distrusts them.
    pub async fn report_fenced_writes(
        &self,
        vm: &str,
        epoch: u64,
        ranges: Vec<ChangedRange>,
    ) -> Result<ProtectedItem, RegistryError> {
        if ranges.len() > MAX_FENCED_RANGES {
            return Err(RegistryError::invalid(format!(
                "{} ranges; at most {MAX_FENCED_RANGES} (coalesce them)",
                ranges.len()
            )));
        }
        self.update_item(vm, |item| {
            if !matches!(
                item.state,
                State::FailoverInProgress | State::FailedOver | State::Committed
            ) {
                return Err(RegistryError::precondition(format!(
                    "VM {vm:?} is {}: its source is not fenced by a failover",
                    item.state.name()
                )));
            }
            if epoch >= item.epoch {
                return Err(RegistryError::precondition(format!(
                    "epoch {epoch} is not below VM {vm:?}'s {}: this agent is not fenced",
                    item.epoch
                )));
            }
            let mut clipped = Vec::with_capacity(ranges.len());
            for r in &ranges {
                let disk = item
                    .source
                    .disks
                    .iter()
                    .find(|d| d.id == r.disk_id)
                    .ok_or_else(|| {
                        RegistryError::invalid(format!(
                            "range names disk {:?}, which VM {vm:?} does not have",
                            r.disk_id
                        ))
                    })?;
                if r.offset >= disk.size_bytes {
                    return Err(RegistryError::invalid(format!(
                        "range at {} is past the end of disk {:?} ({} bytes)",
                        r.offset, r.disk_id, disk.size_bytes
                    )));
                }
                clipped.push(ChangedRange {
                    disk_id: r.disk_id.clone(),
                    offset: r.offset,
                    length: r.length.min(disk.size_bytes - r.offset),
                });
            }
            if item.fenced_writes == clipped {
                return Ok(false);
            }
            item.fenced_writes = clipped;
            Ok(true)
        })
        .await
    }
}
