//! hydrate (instant failover): each overlay is filled from the served point
//! while the VM runs on it (libvirt's blockpull, QEMU's block-stream, at
//! most `hydrate_mib_per_sec`), or offline with qemu-img when the VM is not
//! running. A disk is hydrated when its overlay's header names no backing
//! any more: it then holds the point plus every write the VM made. Once all
//! are, the record drops their backing and the point is no longer served:
//! the VM runs from local images only. Idempotent: a hydrated disk is
//! skipped, a pull that runs is waited on, one that ended early is started
//! again (a few times, then the step fails naming the disk).

use std::sync::Arc;
use std::time::Duration;

use ferry_runtime::Refused;

use super::{target_names, Result};
use crate::engine::Engine;
use crate::error::FailoverError;
use crate::inventory::{DiskFormat, Run, TargetVm};
use crate::jobs::JobRecord;
use crate::overlay::QemuImg;

/// How often a pull is looked at.
const POLL: Duration = Duration::from_millis(500);
/// Pulls started on one disk before the step gives up on it.
const PULLS: u32 = 3;

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    let instant = engine.instant()?;
    let item = engine.item(job.vm()?).await?;
    let (name, _) = target_names(job, &item);
    let (region, group) = (&item.target.region, &item.target.resource_group);
    let mut vm = engine
        .backend()
        .vms()?
        .into_iter()
        .find(|v| &v.region == region && &v.resource_group == group && v.name == name)
        .ok_or_else(|| {
            Refused::failed_precondition(format!(
                "VM {name} is not in {region}/{group}; create-vm has not recorded it"
            ))
        })?;
    let started = std::time::Instant::now();
    let overlays: Vec<usize> = (0..vm.disks.len())
        .filter(|i| vm.disks[*i].format == DiskFormat::Qcow2)
        .collect();
    job.bytes_total = overlays.iter().map(|i| vm.disks[*i].size_bytes).sum();
    job.bytes_done = 0;
    for &index in &overlays {
        hydrate(
            engine,
            job,
            &instant.qemu_img,
            &vm,
            index,
            instant.hydrate_mib_per_sec,
        )
        .await?;
        job.bytes_done = overlays
            .iter()
            .take_while(|i| **i != index)
            .chain(std::iter::once(&index))
            .map(|i| vm.disks[*i].size_bytes)
            .sum();
        engine.jobs.save(job)?;
    }
    for d in &mut vm.disks {
        d.backing = None;
    }
    engine.on_backend(move |b| b.record_vm(vm)).await?;
    let forgotten = instant.exports.forget_job(job.id.as_str());
    tracing::info!(job = %job.id, exports = forgotten, "hydrated: the point is no longer served");
    Ok(format!(
        "{} disk(s) hydrated in {:.1} s; VM {name} runs from local images only",
        overlays.len(),
        started.elapsed().as_secs_f64()
    ))
}

/// Fills disk `index`'s overlay; returns once its header names no backing.
async fn hydrate(
    engine: &Arc<Engine>,
    job: &mut JobRecord,
    qemu_img: &QemuImg,
    vm: &TargetVm,
    index: usize,
    bandwidth_mib: u64,
) -> Result<()> {
    let disk = &vm.disks[index];
    let before: u64 = job.bytes_done;
    let mut pulls = 0;
    loop {
        if backing(qemu_img, &disk.path).await?.is_none() {
            return Ok(());
        }
        let state = {
            let vm = vm.clone();
            engine.on_backend(move |b| b.run_state(&vm)).await?
        };
        if state != Run::Running {
            // Nothing reads the overlay: fill it in one go.
            let (q, path) = (qemu_img.clone(), disk.path.clone());
            tokio::task::spawn_blocking(move || q.flatten(&path))
                .await
                .map_err(|e| FailoverError::Corrupt(e.to_string()))??;
            continue;
        }
        let progress = {
            let vm = vm.clone();
            engine
                .on_backend(move |b| b.pull_progress(&vm, index))
                .await?
        };
        match progress {
            Some((done, _)) => {
                job.bytes_done = before + done.min(disk.size_bytes);
                engine.jobs.publish(job);
            }
            None => {
                if pulls == PULLS {
                    return Err(Refused::unavailable(format!(
                        "disk {} of VM {} ({}) is still not hydrated after {PULLS} pulls; \
                         see libvirt's log of the domain {}",
                        disk.disk_id,
                        vm.name,
                        disk.path.display(),
                        vm.domain
                    ))
                    .into());
                }
                pulls += 1;
                let vm2 = vm.clone();
                let pulled = engine
                    .on_backend(move |b| b.start_pull(&vm2, index, bandwidth_mib))
                    .await;
                if let Err(e) = pulled {
                    // A pull that just finished leaves nothing to pull.
                    if backing(qemu_img, &disk.path).await?.is_none() {
                        return Ok(());
                    }
                    return Err(e);
                }
                tracing::info!(vm = %vm.name, disk = %disk.disk_id, "hydrating");
            }
        }
        tokio::select! {
            _ = engine.shutdown.cancelled() => {
                return Err(Refused::unavailable("failover-svc is shutting down").into());
            }
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

async fn backing(qemu_img: &QemuImg, path: &std::path::Path) -> Result<Option<String>> {
    let (q, path) = (qemu_img.clone(), path.to_path_buf());
    tokio::task::spawn_blocking(move || q.backing(&path))
        .await
        .map_err(|e| FailoverError::Corrupt(e.to_string()))?
}
