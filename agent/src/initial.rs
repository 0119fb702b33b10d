//! Initial replication: every disk's current contents go through the same
//! ordered stream as live writes, which go on meanwhile. Holes and all-zero
//! chunks are skipped (the replica starts zeroed). The disk is bracketed by
//! SYNC_STARTED and SYNC_COMPLETED markers, so the processor makes no recovery
//! point while it is inconsistent; registry sees INITIAL_REPLICATION with a
//! percentage, then PROTECTED once everything is durable in the cache.

use std::time::{Duration, Instant};

use ferry_proto::cache::v1::MarkerKind;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::PeerChannel;

use crate::capture::{Capture, CaptureError};

/// Bytes copied per record.
pub const CHUNK: u64 = 1024 * 1024;

/// Why initial replication stopped.
#[derive(Debug, thiserror::Error)]
pub enum InitialError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("registry: {0}")]
    Registry(#[from] tonic::Status),
}

/// Copies every disk into the stream, calling `progress` with the percentage
/// of bytes scanned now and then. Returns the number of chunks sent.
pub async fn copy_disks(
    capture: &Capture,
    mut progress: impl FnMut(u32),
) -> Result<u64, CaptureError> {
    let ids = capture.disk_ids();
    let mut total = 0u64;
    let mut plan = Vec::new();
    for id in &ids {
        let disk = capture.disk(id)?;
        total += disk.size;
        plan.push((id.clone(), disk.size, disk.data_ranges()));
    }
    let mut done = 0u64;
    let mut sent = 0u64;
    let mut last_report = Instant::now();
    for (id, size, ranges) in plan {
        capture
            .marker(&id, MarkerKind::SyncStarted, "initial")
            .await;
        for (start, end) in ranges {
            // Chunks aligned to CHUNK, clipped to the range (ranges are
            // filesystem-block aligned, so sector aligned).
            let mut at = start / 512 * 512;
            while at < end {
                let len = (CHUNK - at % CHUNK)
                    .min(end.div_ceil(512) * 512 - at)
                    .min(size - at);
                if capture.copy_chunk(&id, at, len).await? {
                    sent += 1;
                }
                at += len;
                if last_report.elapsed() >= Duration::from_secs(1) {
                    last_report = Instant::now();
                    progress(((done + at) * 100 / total.max(1)).min(99) as u32);
                }
            }
        }
        // An active mirror completes the copy: not before it is ready.
        capture.sync_gate().await;
        capture
            .marker(&id, MarkerKind::SyncCompleted, "initial")
            .await;
        done += size;
        progress((done * 100 / total.max(1)).min(99) as u32);
    }
    Ok(sent)
}

/// Runs initial replication of the VM and reports it to registry:
/// INITIAL_REPLICATION with progress, then PROTECTED once every record is
/// durable in the cache.
pub async fn replicate(
    capture: &Capture,
    registry: &mut RegistryClient<PeerChannel>,
    vm: &str,
) -> Result<u64, InitialError> {
    registry
        .transition_state(reg::TransitionStateRequest {
            vm_name: vm.to_string(),
            to: reg::ReplicationState::InitialReplication as i32,
            reason: "agent started initial replication".into(),
            ..Default::default()
        })
        .await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(4);
    let mut reporter = registry.clone();
    let vm_name = vm.to_string();
    let reporting = tokio::spawn(async move {
        while let Some(percent) = rx.recv().await {
            let report = reg::ReportReplicationProgressRequest {
                vm_name: vm_name.clone(),
                percent,
            };
            if let Err(status) = reporter.report_replication_progress(report).await {
                tracing::warn!(vm = %vm_name, %status, "progress report refused");
            }
        }
    });
    let sent = copy_disks(capture, |p| {
        // Progress is advisory: drop a report rather than wait for registry.
        let _ = tx.try_send(p);
    })
    .await?;
    drop(tx);
    let _ = reporting.await;
    capture.stream().flushed().await;
    if capture.stream().tracking().await.0 {
        // The stream overflowed during the copy: what it dropped and what
        // changed since is tracked, and resync finishes the job.
        tracing::warn!(
            vm,
            "stream overflowed during initial replication; resync follows"
        );
        return Ok(sent);
    }
    registry
        .report_replication_progress(reg::ReportReplicationProgressRequest {
            vm_name: vm.to_string(),
            percent: 100,
        })
        .await?;
    registry
        .transition_state(reg::TransitionStateRequest {
            vm_name: vm.to_string(),
            to: reg::ReplicationState::Protected as i32,
            reason: "initial replication complete".into(),
            ..Default::default()
        })
        .await?;
    tracing::info!(vm, chunks = sent, "initial replication complete");
    Ok(sent)
}
