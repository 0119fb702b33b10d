//! Re-protect and failback. A committed VM is re-protected by a job of
//! three steps: validate; reverse-registry (registry turns the item around:
//! a new incarnation replicating from the failed-over VM's disks back to
//! the original region); seed-replica (the original disks, where they
//! still exist, are streamed into the reverse replica on the original
//! region's processor, so the agent's digest comparison sends only what
//! differs). The job ends once the agent beside the failed-over VM may
//! start. Failback is a planned failover of the re-protected item: by
//! default into the original disks (original-location recovery: only the
//! chunks that differ from the point are written), see materialize-disks.

use std::path::PathBuf;
use std::sync::Arc;

use ferry_proto::ids::VmName;
use ferry_runtime::Refused;

use crate::engine::peers::{Item, PointKind, ReplicationState};
use crate::engine::{state_name, steps, Engine};
use crate::error::FailoverError;
use crate::inventory::{DiskFormat, TargetVm};
use crate::jobs::{JobKind, JobRecord};

type Result<T> = std::result::Result<T, FailoverError>;

impl Engine {
    /// Validates a re-protect and starts its job.
    pub async fn reprotect(self: &Arc<Self>, vm: VmName, request_id: String) -> Result<JobRecord> {
        if let Some(job) = self.jobs.by_request(&request_id)? {
            return Ok(job);
        }
        let item = self.item(&vm).await?;
        if item.state != ReplicationState::Committed {
            return Err(Refused::failed_precondition(format!(
                "VM \"{vm}\" is {}: re-protect turns around a committed failover only (ferry \
                 failover {vm}, then ferry commit {vm})",
                state_name(item.state)
            ))
            .into());
        }
        if !item.replication_group.is_empty() {
            return Err(Refused::failed_precondition(format!(
                "VM \"{vm}\" is in replication group {:?}: re-protect of group members is not \
                 supported",
                item.replication_group
            ))
            .into());
        }
        self.failed_over_disks(&vm, &item)?;
        let mut job = JobRecord::new(
            self.jobs.new_id()?,
            JobKind::Reprotect,
            None,
            steps::REPROTECT,
            request_id,
        );
        job.vm_name = Some(vm);
        job.from_state = item.state as i32;
        job.incarnation = item.incarnation;
        self.admit(job).await
    }

    /// The VM `item`'s committed failover created in its target region.
    pub(crate) fn failed_over_vm(&self, vm: &VmName, item: &Item) -> Result<TargetVm> {
        self.backend()
            .vms()?
            .into_iter()
            .find(|t| t.source_vm == vm.as_str() && t.region == item.target.region && !t.test)
            .ok_or_else(|| {
                Refused::failed_precondition(format!(
                    "VM \"{vm}\" has no failed-over VM in {} that failover-svc made: nothing to \
                     replicate back from",
                    item.target.region
                ))
                .into()
            })
    }

    /// The failed-over VM's disks by source disk id: the re-protected
    /// item's source. Each must be a raw image of its own (no overlay
    /// still reading a served point).
    pub(crate) fn failed_over_disks(
        &self,
        vm: &VmName,
        item: &Item,
    ) -> Result<Vec<(String, PathBuf)>> {
        let target = self.failed_over_vm(vm, item)?;
        let mut disks = Vec::new();
        for id in &item.source_disks {
            let disk = target
                .disks
                .iter()
                .find(|d| &d.disk_id == id)
                .ok_or_else(|| {
                    Refused::failed_precondition(format!(
                        "failed-over VM {} has no disk for source disk {id:?}",
                        target.name
                    ))
                })?;
            if disk.backing.is_some() {
                return Err(Refused::failed_precondition(format!(
                    "disk {id:?} of failed-over VM {} still reads a served point (instant \
                     failover hydrating); re-protect once its job has ended",
                    target.name
                ))
                .into());
            }
            if disk.format != DiskFormat::Raw {
                return Err(Refused::failed_precondition(format!(
                    "disk {id:?} of failed-over VM {} is {} at {}; the agent replicates raw \
                     images: convert it (qemu-img convert -O raw) and re-protect",
                    target.name,
                    disk.format.name(),
                    disk.path.display()
                ))
                .into());
            }
            disks.push((id.clone(), disk.path.clone()));
        }
        Ok(disks)
    }

    /// The processor of `item`'s target region answers: a failover that
    /// fences or drains its source must be able to read its point after.
    /// UNAVAILABLE (nothing changed) when it cannot be reached.
    pub(crate) async fn reachable_processor(&self, vm: &VmName, item: &Item) -> Result<()> {
        let Err(e) = self.peers.points(vm, PointKind::Any, 1).await else {
            return Ok(());
        };
        let status = tonic::Status::from(e);
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
                Err(Refused::unavailable(format!(
                    "the processor of {} (where VM \"{vm}\"'s points are) cannot be reached: {}; \
                     nothing was fenced or drained, try again once it is back",
                    item.target.region,
                    status.message()
                ))
                .into())
            }
            // Its other answers (no point yet, say) are for the job's steps.
            _ => Ok(()),
        }
    }
}

/// Whether every original disk of a re-protected item is there, whole:
/// failback then writes into them (original-location recovery).
pub(crate) fn originals_exist(item: &Item) -> bool {
    originals(item).is_ok()
}

/// The original disks by id (path, size), if every one is there whole.
pub(crate) fn originals(item: &Item) -> std::result::Result<Vec<(String, PathBuf, u64)>, String> {
    let Some(r) = &item.reprotection else {
        return Err("the item names no original disks".into());
    };
    let mut disks = Vec::new();
    for d in &item.disks {
        let Some((_, path)) = r.original_disks.iter().find(|(id, _)| *id == d.id) else {
            return Err(format!("disk {:?} has no original disk", d.id));
        };
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() && m.len() >= d.size_bytes => {
                disks.push((d.id.clone(), path.clone(), d.size_bytes))
            }
            Ok(m) if m.is_file() => {
                return Err(format!(
                    "original disk {} holds {} bytes, less than disk {:?}'s {}",
                    path.display(),
                    m.len(),
                    d.id,
                    d.size_bytes
                ))
            }
            Ok(_) => return Err(format!("original disk {} is not a file", path.display())),
            Err(e) => return Err(format!("original disk {}: {e}", path.display())),
        }
    }
    Ok(disks)
}

/// Opens an original disk for a failback, taken for this writer alone;
/// FAILED_PRECONDITION while an agent or a QEMU holds it.
pub(crate) fn take_original(disk: &str, path: &std::path::Path) -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| FailoverError::io(path, e))?;
    match ferry_runtime::disk_lock::take_alone(&file) {
        Ok(true) => Ok(file),
        Ok(false) => Err(Refused::failed_precondition(format!(
            "original disk {disk:?} at {} is in use (an agent serves it, or a VM runs on it): \
             stop the original VM and its agent before failing back into it, or fail back to \
             an alternate location",
            path.display()
        ))
        .into()),
        Err(e) => {
            tracing::warn!(disk, path = %path.display(), error = %e,
                "the original disk cannot be locked: whether something uses it is unknown");
            Ok(file)
        }
    }
}

/// Every original disk of `item` can be taken alone now (taken and let go
/// at once): a failback into them is refused before anything is drained.
pub(crate) fn originals_free(item: &Item) -> Result<()> {
    if let Some(r) = &item.reprotection {
        for (disk, path) in &r.original_disks {
            drop(take_original(disk, path)?);
        }
    }
    Ok(())
}
