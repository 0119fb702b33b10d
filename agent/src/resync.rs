//! Resync: after the stream overflowed (or the cache was away too long) and
//! writes were tracked as changed chunks, the current contents of those
//! chunks go through the stream again. Registry sees RESYNC_REQUIRED, then
//! RESYNCING, then PROTECTED once everything is durable.

use std::time::Duration;

use ferry_proto::cache::v1::MarkerKind;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::retry::{Backoff, RetryParams};
use ferry_runtime::PeerChannel;
use tokio_util::sync::CancellationToken;

use crate::capture::{Capture, CaptureError};
use crate::stream::DIRTY_CHUNK;

/// Why resync stopped.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("registry: {0}")]
    Registry(#[from] tonic::Status),
}

/// How a failed round (registry away, a source read failing) is tried
/// again: within a second, as it always was; the jitter spreads the agents
/// of a registry that comes back.
const ROUND_RETRY: RetryParams = RetryParams {
    base: Duration::from_secs(1),
    max: Duration::from_secs(1),
    max_attempts: None,
};

/// Moves the VM to `to`; already being there (an agent restarted mid-resync)
/// is fine.
async fn transition(
    registry: &mut RegistryClient<PeerChannel>,
    vm: &str,
    to: reg::ReplicationState,
    reason: &str,
) -> Result<(), tonic::Status> {
    let moved = registry
        .transition_state(reg::TransitionStateRequest {
            vm_name: vm.to_string(),
            to: to as i32,
            reason: reason.to_string(),
            ..Default::default()
        })
        .await;
    match moved {
        Ok(_) => Ok(()),
        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
            let item = registry
                .get_protected_item(reg::GetProtectedItemRequest {
                    vm_name: vm.to_string(),
                })
                .await?
                .into_inner();
            if item.state() == to {
                Ok(())
            } else {
                Err(status)
            }
        }
        Err(status) => Err(status),
    }
}

/// Watches the stream; whenever it has overflowed, reports RESYNC_REQUIRED,
/// and once the stream is numbering again with the cache, resyncs the
/// changed chunks. Runs until `shutdown`. A failed round (registry away, a
/// source read failing) puts its chunks back and is tried again; while
/// replication is stopped for good (fenced, drained) nothing is sent.
pub async fn run(
    capture: &Capture,
    registry: &mut RegistryClient<PeerChannel>,
    vm: &str,
    shutdown: &CancellationToken,
) -> Result<(), ResyncError> {
    let mut reported = false;
    let mut backoff = Backoff::new(ROUND_RETRY);
    loop {
        let changed = capture.stream().notify().notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (tracking, renumbered) = capture.stream().tracking().await;
        let detached = capture.stream().detached().await.is_some();
        let mut failed = false;
        // Chunks a re-protect's digest comparison asks for are part of its
        // initial replication: no RESYNC_REQUIRED for them.
        let comparing = capture.comparing();
        if tracking && !reported && !detached && !comparing {
            let reason = capture.stream().tracking_reason().await;
            match transition(registry, vm, reg::ReplicationState::ResyncRequired, &reason).await {
                Ok(()) => reported = true,
                Err(status) => {
                    tracing::warn!(vm, %status, "cannot report RESYNC_REQUIRED; trying again");
                    failed = true;
                }
            }
        }
        if tracking && renumbered && !detached && !failed {
            if let Some(set) = capture.end_tracking().await {
                match resync(capture, registry, vm, set, !comparing).await {
                    Ok(_) => {
                        reported = false;
                        backoff.reset();
                        continue;
                    }
                    Err(ResyncError::Capture(CaptureError::Closed)) => return Ok(()),
                    Err(e) => {
                        tracing::warn!(vm, error = %e, "resync round failed; its chunks go again");
                        capture.stream().retry_outstanding().await;
                        failed = true;
                    }
                }
            }
        }
        if failed {
            if !backoff.wait(shutdown).await {
                return Ok(());
            }
            continue;
        }
        backoff.reset();
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = changed => {}
        }
    }
}

/// Chunks per ChunkDigests record (1 MiB of disk).
const DIGESTS_PER_RECORD: u64 = 16;

/// Sends the current contents of every changed chunk and the checksums of
/// every chunk to check, then reports PROTECTED once it is durable.
pub async fn resync(
    capture: &Capture,
    registry: &mut RegistryClient<PeerChannel>,
    vm: &str,
    set: crate::stream::ResyncSet,
    report: bool,
) -> Result<u64, ResyncError> {
    if report {
        transition(
            registry,
            vm,
            reg::ReplicationState::Resyncing,
            "sending changed chunks",
        )
        .await?;
    }
    let total = set.count().max(1);
    let mut done = 0u64;
    // Every disk of the round was opened (SYNC_STARTED) as tracking ended.
    let opened = set.opening(&capture.stream().disks());
    for (disk, _) in opened {
        let chunks = set.data.chunks(&disk);
        let sent: std::collections::BTreeSet<u64> = chunks.iter().copied().collect();
        let check: Vec<u64> = set
            .verify
            .chunks(&disk)
            .into_iter()
            .filter(|c| !sent.contains(c))
            .collect();
        let size = capture.disk(&disk)?.size;
        for chunk in chunks {
            let offset = chunk * DIRTY_CHUNK;
            if offset >= size {
                continue;
            }
            capture
                .resync_chunk(&disk, offset, DIRTY_CHUNK.min(size - offset))
                .await?;
            capture.stream().resent(&disk, chunk).await;
            done += 1;
            if report && done.is_multiple_of(256) {
                let _ = registry
                    .report_replication_progress(reg::ReportReplicationProgressRequest {
                        vm_name: vm.to_string(),
                        percent: (done * 100 / total).min(99) as u32,
                    })
                    .await;
            }
        }
        // Runs of consecutive chunks to check, a record per run.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in check {
            match runs.last_mut() {
                Some((first, n)) if *first + *n == c && *n < DIGESTS_PER_RECORD => *n += 1,
                _ => runs.push((c, 1)),
            }
        }
        for (first, n) in runs {
            let offset = first * DIRTY_CHUNK;
            if offset >= size {
                continue;
            }
            let length = (n * DIRTY_CHUNK).min(size - offset);
            capture
                .digest_chunks(&disk, offset, length, DIRTY_CHUNK)
                .await?;
            for c in first..first + n {
                capture.stream().resent(&disk, c).await;
            }
            done += n;
            if report && done % 4096 < n {
                let _ = registry
                    .report_replication_progress(reg::ReportReplicationProgressRequest {
                        vm_name: vm.to_string(),
                        percent: (done * 100 / total).min(99) as u32,
                    })
                    .await;
            }
        }
        // An active mirror completes the round: not before it is ready.
        capture.sync_gate().await;
        capture
            .marker(&disk, MarkerKind::SyncCompleted, "resync")
            .await;
        capture.stream().sync_closed(&disk).await;
    }
    capture.stream().flushed().await;
    if capture.stream().tracking().await.0 {
        // The stream overflowed or stopped during the round: what it
        // dropped is tracked again, and the next round sends it.
        tracing::warn!(vm, "resync round overtaken by tracking; another follows");
        return Ok(done);
    }
    if !report {
        tracing::info!(
            vm,
            chunks = done,
            "sent the chunks the digest comparison asked for"
        );
        return Ok(done);
    }
    transition(
        registry,
        vm,
        reg::ReplicationState::Protected,
        "resync complete",
    )
    .await?;
    tracing::info!(vm, chunks = done, "resync complete");
    Ok(done)
}
