//! seed-replica: the original disks (what the VM ran from before the
//! failover, in what is now the target region) go into the reverse replica
//! on that region's processor, so that the agent's digest comparison finds
//! only the chunks that differ. Only their data ranges are read and
//! all-zero blocks skipped: the replica starts zeroed. Original disks that
//! are gone (or smaller than the disk) seed nothing: every non-zero chunk
//! then differs and crosses. Then registry lets the agent register. Run
//! again (resumed), it seeds again whole.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Result;
use crate::engine::peers::{Item, SeedChunk};
use crate::engine::Engine;
use crate::error::FailoverError;
use crate::jobs::JobRecord;

/// Bytes read (and sent) at a time.
const PIECE: u64 = 1 << 20;
/// All-zero blocks of this size are not sent.
const BLOCK: usize = 64 * 1024;

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    let vm = job.vm()?.clone();
    let item = engine.item(&vm).await?;
    let Some(r) = item
        .reprotection
        .as_ref()
        .filter(|r| r.job_id == job.id.as_str())
    else {
        return Err(ferry_runtime::Refused::failed_precondition(format!(
            "VM \"{vm}\" is no longer the item this job re-protected"
        ))
        .into());
    };
    let start_agent = format!(
        "start ferry-agent --vm {vm} beside its disks ({})",
        item.disks
            .iter()
            .map(|d| d.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if r.seed_complete {
        return Ok(format!("seeded already; {start_agent}"));
    }
    let summary = match crate::reprotect::originals(&item) {
        Err(why) => {
            tracing::warn!(%vm, why, "re-protect without a seed");
            format!(
                "not seeded: {why}; every non-zero chunk of the disks crosses to {}",
                item.target.region
            )
        }
        Ok(disks) => seed(engine, job, &item, disks).await?,
    };
    engine
        .peers
        .complete_seed(&vm, item.incarnation, &summary)
        .await?;
    Ok(format!("{summary}; {start_agent}"))
}

/// Streams the data of `disks` into the reverse replica; what it did.
async fn seed(
    engine: &Arc<Engine>,
    job: &mut JobRecord,
    item: &Item,
    disks: Vec<(String, PathBuf, u64)>,
) -> Result<String> {
    let vm = job.vm()?.clone();
    let started = Instant::now();
    job.bytes_total = disks.iter().map(|(_, _, size)| size).sum();
    job.bytes_done = 0;
    job.bytes_written = 0;
    let scanned = Arc::new(AtomicU64::new(0));
    let (tx, rx) = tokio::sync::mpsc::channel::<SeedChunk>(4);
    let reader = {
        let scanned = scanned.clone();
        let disks = disks.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            for (id, path, size) in disks {
                read_disk(&id, &path, size, &tx, &scanned)?;
            }
            Ok(())
        })
    };
    let distrusted = item
        .reprotection
        .as_ref()
        .map(|r| r.distrusted.clone())
        .unwrap_or_default();
    let sending = engine
        .peers
        .seed_replica(&vm, item.incarnation, distrusted, rx);
    tokio::pin!(sending);
    let mut every = tokio::time::interval(Duration::from_millis(500));
    let seeded = loop {
        tokio::select! {
            done = &mut sending => break done,
            _ = every.tick() => {
                job.bytes_done = scanned.load(Ordering::Relaxed);
                engine.jobs.publish(job);
            }
        }
    };
    // The reader's error says more than the processor's (it ended the
    // stream early).
    let read = reader
        .await
        .map_err(|e| FailoverError::Corrupt(format!("seed reader: {e}")))?;
    read?;
    let seeded = seeded?;
    job.bytes_done = job.bytes_total;
    job.bytes_written = seeded;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    Ok(format!(
        "seeded {} MiB of data from the original disks ({} MiB read in {secs:.2} s, {:.0} MiB/s)",
        seeded >> 20,
        job.bytes_total >> 20,
        job.bytes_total as f64 / (1 << 20) as f64 / secs
    ))
}

/// Sends the non-zero blocks of one disk's data ranges.
fn read_disk(
    id: &str,
    path: &Path,
    size: u64,
    tx: &tokio::sync::mpsc::Sender<SeedChunk>,
    scanned: &AtomicU64,
) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| FailoverError::io(path, e))?;
    let mut buf = vec![0u8; PIECE as usize];
    // Progress counts over every disk: this one's starts where it stands.
    let base = scanned.load(Ordering::Relaxed);
    for (start, end) in ferry_runtime::sparse::data_ranges(&file, size) {
        // Whole blocks, so that a zero test is per block.
        let mut at = start / BLOCK as u64 * BLOCK as u64;
        let end = end.min(size);
        while at < end {
            let len = PIECE.min(size - at).min(end.div_ceil(512) * 512 - at) as usize;
            let piece = &mut buf[..len];
            file.read_exact_at(piece, at)
                .map_err(|e| FailoverError::io(path, e))?;
            let mut off = 0usize;
            while off < len {
                // A run of non-zero blocks goes as one message.
                let zero = |o: usize| piece[o..(o + BLOCK).min(len)].iter().all(|b| *b == 0);
                if zero(off) {
                    off += BLOCK;
                    continue;
                }
                let first = off;
                while off < len && !zero(off) {
                    off += BLOCK;
                }
                let last = off.min(len);
                let chunk = SeedChunk {
                    disk_id: id.to_string(),
                    offset: at + first as u64,
                    data: bytes::Bytes::copy_from_slice(&piece[first..last]),
                };
                if tx.blocking_send(chunk).is_err() {
                    // The processor ended the stream: its status says why.
                    return Ok(());
                }
            }
            at += len as u64;
            scanned.store(base + at.min(size), Ordering::Relaxed);
        }
    }
    scanned.store(base + size, Ordering::Relaxed);
    Ok(())
}
