//! serve-disks (instant failover): each disk of the pinned point is served
//! over NBD, read-only, under a name that holds a secret of the job's, and
//! a fresh qcow2 overlay backed by it is made where the disk's image goes
//! (`<name>.qcow2`). The VM create-vm defines writes to the overlays and
//! reads what they do not hold from the point. Run again (resumed), it
//! keeps the names and makes the overlays anew: the VM has not started.

use std::sync::Arc;

use ferry_proto::ids::VmName;
use ferry_runtime::Refused;

use super::{target_names, unowned, Result};
use crate::engine::Engine;
use crate::error::FailoverError;
use crate::jobs::{JobRecord, JobState, Served};
use crate::point_exports::{InstantFailover, ServedDisk};

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    let instant = engine.instant()?;
    let vm = job.vm()?.clone();
    let item = engine.item(&vm).await?;
    let target = &item.target;
    let point_id = job
        .points
        .first()
        .map(|u| u.point_id.clone())
        .ok_or_else(|| FailoverError::Corrupt("no point pinned".into()))?;
    let point = engine.point(&vm, &point_id).await?;
    let (_, names) = target_names(job, &item);
    let backend = engine.backend();
    let secret = match job.served.first() {
        Some(s) => s.export.rsplit('.').next().unwrap_or_default().to_string(),
        None => secret()?,
    };
    let mut served = Vec::new();
    for (i, disk) in point.disks.iter().enumerate() {
        let name = names
            .iter()
            .find(|(id, _)| *id == disk.disk_id)
            .map(|(_, n)| n.clone())
            .unwrap_or_else(|| format!("{vm}-{}", disk.disk_id));
        let overlay = backend
            .disk_path(&target.region, &target.resource_group, &name)
            .with_extension("qcow2");
        unowned(backend.as_ref(), &vm, target, &name, &overlay)?;
        let export = format!("{}.{i}.{secret}", job.id);
        instant.exports.serve(
            &export,
            ServedDisk {
                vm: vm.clone(),
                point_id: point.id.clone(),
                disk_id: disk.disk_id.clone(),
                size_bytes: disk.size_bytes,
                job: job.id.to_string(),
            },
        );
        let (qemu_img, url, path, size) = (
            instant.qemu_img.clone(),
            instant.url(&export),
            overlay.clone(),
            disk.size_bytes,
        );
        tokio::task::spawn_blocking(move || qemu_img.create(&path, size, &url))
            .await
            .map_err(|e| FailoverError::Corrupt(e.to_string()))??;
        served.push(Served {
            disk_id: disk.disk_id.clone(),
            export,
            size_bytes: disk.size_bytes,
            overlay,
        });
    }
    job.served = served;
    engine.jobs.save(job)?;
    Ok(format!(
        "{} disk(s) of point {} served at nbd://{}; the VM writes to overlays",
        job.served.len(),
        point.id,
        instant.address
    ))
}

/// 128 random bits, hex.
fn secret() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| Refused::unavailable(format!("no randomness for an export name: {e}")))?;
    Ok(hex::encode(bytes))
}

/// Serves a resumed job's exports again, unless its hydrate step is done
/// with them.
pub(crate) fn serve_again(instant: &InstantFailover, vm: &VmName, job: &JobRecord) {
    let hydrated = job
        .steps
        .iter()
        .any(|s| s.step == super::Step::Hydrate && s.state == JobState::Succeeded);
    if !job.instant || hydrated {
        return;
    }
    let Some(point) = job.points.first() else {
        return;
    };
    for s in &job.served {
        instant.exports.serve(
            &s.export,
            ServedDisk {
                vm: vm.clone(),
                point_id: point.point_id.clone(),
                disk_id: s.disk_id.clone(),
                size_bytes: s.size_bytes,
                job: job.id.to_string(),
            },
        );
    }
}
