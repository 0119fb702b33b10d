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
    protected(registry, vm, "initial replication complete").await?;
    tracing::info!(vm, chunks = sent, "initial replication complete");
    Ok(sent)
}

/// Initial replication is over: 100%, then PROTECTED.
async fn protected(
    registry: &mut RegistryClient<PeerChannel>,
    vm: &str,
    reason: &str,
) -> Result<(), tonic::Status> {
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
            reason: reason.to_string(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// Bytes of disk per digest record while comparing (16 chunks of the
/// changed-chunk size: 1 MiB).
const COMPARE_SPAN: u64 = 16 * crate::stream::DIRTY_CHUNK;

/// How often registry is asked whether the reverse replica has its first
/// point.
const FIRST_POINT_POLL: Duration = Duration::from_millis(500);

/// The SYNC_STARTED / SYNC_COMPLETED id of a comparison round.
pub const COMPARE_ID: &str = "reprotect";

/// Initial replication of a re-protected VM, whose reverse replica was
/// seeded from the original disks: each disk's chunk digests go through
/// the stream (SYNC_STARTED .. SYNC_COMPLETED); the processor compares
/// them with the seed and asks for the chunks that differ, which the
/// resync rounds send as data. Registry sees INITIAL_REPLICATION with a
/// percentage, then PROTECTED once the reverse replica has its first
/// point: every disk compared and every differing chunk applied. Returns
/// the number of chunks compared.
pub async fn replicate_by_checksum(
    capture: &Capture,
    registry: &mut RegistryClient<PeerChannel>,
    vm: &str,
) -> Result<u64, InitialError> {
    capture.set_comparing(true);
    let started = Instant::now();
    let moved = registry
        .transition_state(reg::TransitionStateRequest {
            vm_name: vm.to_string(),
            to: reg::ReplicationState::InitialReplication as i32,
            reason: "agent compares the disks with the reverse replica's seed".into(),
            ..Default::default()
        })
        .await;
    if let Err(status) = moved {
        capture.set_comparing(false);
        return Err(status.into());
    }
    let ids = capture.disk_ids();
    let mut total = 0u64;
    for id in &ids {
        total += capture.disk(id)?.size;
    }
    let mut done = 0u64;
    let mut compared = 0u64;
    let mut last_report = Instant::now();
    for id in &ids {
        let size = capture.disk(id)?.size;
        capture
            .marker(id, MarkerKind::SyncStarted, COMPARE_ID)
            .await;
        let mut at = 0;
        while at < size {
            let len = COMPARE_SPAN.min(size - at);
            capture
                .digest_chunks(id, at, len, crate::stream::DIRTY_CHUNK)
                .await?;
            compared += len.div_ceil(crate::stream::DIRTY_CHUNK);
            at += len;
            if last_report.elapsed() >= Duration::from_secs(1) {
                last_report = Instant::now();
                let _ = registry
                    .report_replication_progress(reg::ReportReplicationProgressRequest {
                        vm_name: vm.to_string(),
                        percent: ((done + at) * 90 / total.max(1)) as u32,
                    })
                    .await;
            }
        }
        capture.sync_gate().await;
        capture
            .marker(id, MarkerKind::SyncCompleted, COMPARE_ID)
            .await;
        done += size;
    }
    capture.stream().flushed().await;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    tracing::info!(
        vm,
        chunks = compared,
        mib_per_sec = total as f64 / (1 << 20) as f64 / secs,
        "every chunk's digest sent; waiting for the reverse replica's first point"
    );
    let _ = registry
        .report_replication_progress(reg::ReportReplicationProgressRequest {
            vm_name: vm.to_string(),
            percent: 90,
        })
        .await;
    // The differing chunks go through resync rounds meanwhile.
    loop {
        tokio::time::sleep(FIRST_POINT_POLL).await;
        let item = match registry
            .get_protected_item(reg::GetProtectedItemRequest {
                vm_name: vm.to_string(),
            })
            .await
        {
            Ok(item) => item.into_inner(),
            Err(status) => {
                tracing::debug!(vm, %status, "registry away; asking again");
                continue;
            }
        };
        if item.state() != reg::ReplicationState::InitialReplication {
            // Failed over, disabled, re-protected again: not ours to finish.
            capture.set_comparing(false);
            return Ok(compared);
        }
        if item.last_recovery_point_time.is_some() && !capture.stream().tracking().await.0 {
            break;
        }
    }
    capture.set_comparing(false);
    protected(
        registry,
        vm,
        "initial replication complete: the reverse replica matches",
    )
    .await?;
    tracing::info!(
        vm,
        chunks = compared,
        secs = started.elapsed().as_secs_f64(),
        "initial replication by digest comparison complete"
    );
    Ok(compared)
}
