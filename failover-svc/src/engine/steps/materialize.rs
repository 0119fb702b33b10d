//! materialize-disks: each disk of the point is read from the processor
//! and written to a fresh sparse image in the target region, then checked
//! end to end: the extents must tile the disk, each must match its CRC, and
//! the image as written must have the digest the processor computes for
//! the point. Run again (resumed), it rewrites every disk whole. Progress
//! is published as it goes and persisted every [`SAVE_EVERY`] bytes.
//! Original-location recovery (a failback into the original disks) writes
//! into those images instead, only the blocks that differ from the point
//! (`differ`), and checks them end to end the same way.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use ferry_runtime::Refused;
use tokio_stream::StreamExt;

use super::{target_names, unowned, Result};
use crate::engine::peers::PointDisk;
use crate::engine::Engine;
use crate::error::FailoverError;
use crate::inventory;
use crate::jobs::{JobRecord, Verified};
use crate::verify;

/// Progress is persisted every this many bytes (and published always).
const SAVE_EVERY: u64 = 64 << 20;

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    let vm = job.vm()?.clone();
    let item = engine.item(&vm).await?;
    let target = &item.target;
    let used = job
        .points
        .first()
        .cloned()
        .ok_or_else(|| FailoverError::Corrupt("no point pinned".into()))?;
    let point = engine.point(&vm, &used.point_id).await?;
    let (_, names) = target_names(job, &item);
    let backend = engine.backend();
    job.bytes_done = 0;
    job.bytes_total = point.disks.iter().map(|d| d.size_bytes).sum();
    let started = std::time::Instant::now();
    let mut saved = 0u64;
    let mut written = 0u64;
    // Rewritten whole when the step runs again.
    job.verified.clear();
    job.bytes_written = 0;
    let original = job.original_location;
    for disk in &point.disks {
        let name = names
            .iter()
            .find(|(id, _)| *id == disk.disk_id)
            .map(|(_, n)| n.clone())
            .unwrap_or_else(|| format!("{vm}-{}", disk.disk_id));
        let (path, file) = match super::original_disk(job, &item, &disk.disk_id)? {
            Some(path) => {
                unowned(backend.as_ref(), &vm, target, &name, &path)?;
                // Held to itself until this disk is written and checked.
                let file = crate::reprotect::take_original(&disk.disk_id, &path)?;
                (path, file)
            }
            None => {
                let place = backend.disk_path(&target.region, &target.resource_group, &name);
                unowned(backend.as_ref(), &vm, target, &name, &place)?;
                let path = backend.prepare_disk(
                    &target.region,
                    &target.resource_group,
                    &name,
                    disk.size_bytes,
                )?;
                let file = inventory::open_disk(&path)?;
                (path, file)
            }
        };
        let file = Arc::new(file);
        let mut extents = engine
            .peers
            .read_disk(&vm, &point.id, &disk.disk_id, 0, 0)
            .await?;
        // Writes go to a blocking writer through a short queue, so that
        // receiving the next extent overlaps writing this one. A fresh
        // image takes the data as it is; an original disk only what
        // differs (holes included: zeros there).
        let (queue, mut pending) =
            tokio::sync::mpsc::channel::<(u64, u64, Option<bytes::Bytes>)>(4);
        let writer = {
            let (f, p2) = (file.clone(), path.clone());
            tokio::task::spawn_blocking(move || -> Result<u64> {
                let mut wrote = 0u64;
                while let Some((at, length, data)) = pending.blocking_recv() {
                    wrote += match (original, data) {
                        (false, Some(data)) => {
                            f.write_all_at(&data, at).map(|()| data.len() as u64)
                        }
                        (false, None) => Ok(0),
                        (true, Some(data)) => {
                            crate::differ::write_differing(&f, at, length, Some(&data))
                        }
                        (true, None) => crate::differ::zero_differing(&f, at, length),
                    }
                    .map_err(|e| FailoverError::io(&p2, e))?;
                }
                f.sync_all().map_err(|e| FailoverError::io(&p2, e))?;
                Ok(wrote)
            })
        };
        let mut coverage = verify::Coverage::new(&disk.disk_id, disk.size_bytes);
        while let Some(extent) = extents.next().await.transpose()? {
            let data_len = extent.data.as_ref().map(|d| d.len() as u64);
            coverage.extent(extent.offset, extent.length, data_len)?;
            if let Some(data) = extent.data {
                if crc32c::crc32c(&data) != extent.crc32c {
                    return Err(Refused::unavailable(format!(
                        "extent at {} of disk {} arrived damaged; retry the job",
                        extent.offset, disk.disk_id
                    ))
                    .into());
                }
                let n = data.len() as u64;
                if queue.send((extent.offset, n, Some(data))).await.is_err() {
                    // The writer stopped: its error says why.
                    break;
                }
                written += n;
                if let Some(rate) = engine.write_rate {
                    // Paced: never ahead of the cap.
                    let due = Duration::from_secs_f64(written as f64 / rate as f64);
                    if let Some(ahead) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(ahead).await;
                    }
                }
            } else if original
                && queue
                    .send((extent.offset, extent.length, None))
                    .await
                    .is_err()
            {
                break;
            }
            job.bytes_done += extent.length;
            engine.jobs.publish(job);
            if job.bytes_done - saved >= SAVE_EVERY {
                saved = job.bytes_done;
                engine.jobs.save(job)?;
            }
        }
        drop(queue);
        job.bytes_written += writer
            .await
            .map_err(|e| FailoverError::Corrupt(e.to_string()))??;
        coverage.finish()?;
        job.verified
            .push(check_digest(engine, job, &point.id, disk, &path).await?);
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let into = if original {
        format!(
            " into the original disks, {} KiB of them written (the blocks that differed)",
            job.bytes_written >> 10
        )
    } else {
        String::new()
    };
    Ok(format!(
        "{} disk(s), {} MiB in {secs:.2} s ({:.0} MiB/s){into}",
        point.disks.len(),
        job.bytes_total >> 20,
        job.bytes_total as f64 / (1 << 20) as f64 / secs
    ))
}

/// The image written at `path` must have the point's digest: computed
/// by the processor from its index, here over the file as it is on disk.
async fn check_digest(
    engine: &Engine,
    job: &JobRecord,
    point_id: &str,
    disk: &PointDisk,
    path: &std::path::Path,
) -> Result<Verified> {
    let vm = job.vm()?;
    let want = engine
        .peers
        .disk_digest(vm, point_id, &disk.disk_id)
        .await?;
    if want.algorithm != ferry_proto::digest::ALGORITHM || want.size_bytes != disk.size_bytes {
        return Err(Refused::failed_precondition(format!(
            "disk {}: the processor's digest is {} of {} bytes; this failover-svc checks {} \
             of {} bytes",
            disk.disk_id,
            want.algorithm,
            want.size_bytes,
            ferry_proto::digest::ALGORITHM,
            disk.size_bytes
        ))
        .into());
    }
    let (file, size, chunk) = (path.to_path_buf(), disk.size_bytes, want.chunk_bytes);
    let got = tokio::task::spawn_blocking(move || verify::image_digest(&file, size, chunk))
        .await
        .map_err(|e| FailoverError::Corrupt(e.to_string()))??;
    let (want_hex, got_hex) = (
        ferry_proto::digest::hex(&want.sha256),
        ferry_proto::digest::hex(&got),
    );
    if want.sha256.as_slice() != got.as_slice() {
        return Err(Refused::data_loss(format!(
            "disk {} as written at {} has digest {got_hex}, but point {point_id} has \
             {want_hex}: the image is not the point's disk; it is not used",
            disk.disk_id,
            path.display()
        ))
        .into());
    }
    tracing::info!(%vm, disk = %disk.disk_id, point = point_id, sha256 = %got_hex, "disk verified end to end");
    Ok(Verified {
        vm_name: vm.clone(),
        disk_id: disk.disk_id.clone(),
        point_id: point_id.to_string(),
        path: path.display().to_string(),
        size_bytes: disk.size_bytes,
        algorithm: want.algorithm,
        sha256: got_hex,
    })
}
