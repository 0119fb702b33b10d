//! The processor's stream: retained records from a sequence on, then new ones
//! as they become durable.

use std::sync::Arc;

use ferry_proto::cache::v1 as pb;
use ferry_runtime::Refused;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::error::CacheError;
use crate::log::{read, Cursor};
use crate::store::VmState;

/// Payload bytes per response unless the request asks for less.
pub const DEFAULT_BATCH_BYTES: usize = 1024 * 1024;

type Tx = mpsc::Sender<Result<pb::TailResponse, Status>>;

/// Feeds one tail until it is caught up (without `follow`), the client goes,
/// or shutdown comes.
/// Every response carries `lineage`, the log's when the tail began; if the
/// log starts again meanwhile (`restarts`, subscribed before `lineage` was
/// read) the tail ends with ABORTED and the reader tails again.
pub struct Tail {
    /// Where a damaged log is set aside.
    pub store: Arc<crate::store::Store>,
    pub state: Arc<VmState>,
    pub from: u64,
    pub follow: bool,
    pub max_bytes: usize,
    pub lineage: u64,
    pub restarts: tokio::sync::watch::Receiver<u64>,
}

pub async fn run(tail: Tail, tx: Tx, shutdown: CancellationToken) {
    if let Err(err) = feed(tail, &tx, &shutdown).await {
        let _ = tx.send(Err(Status::from(err))).await;
    }
}

fn restarted(vm: &str) -> CacheError {
    Refused::aborted(format!(
        "VM {vm:?}'s log started again (renumbered or replaced); tail it again"
    ))
    .into()
}

async fn feed(tail: Tail, tx: &Tx, shutdown: &CancellationToken) -> Result<(), CacheError> {
    let Tail {
        store,
        state,
        from,
        follow,
        max_bytes,
        lineage,
        mut restarts,
    } = tail;
    let mut durable_rx = state.durable();
    let mut cursor = Cursor {
        next_seq: from,
        at: None,
    };
    loop {
        if restarts.has_changed().unwrap_or(true) {
            return Err(restarted(&state.vm));
        }
        let (dir, segments, first) = state.with_log(|log| {
            (
                log.dir().to_path_buf(),
                log.segments().to_vec(),
                log.first_seq(),
            )
        })?;
        if cursor.next_seq < first {
            return Err(Refused::out_of_range(format!(
                "sequence {} of VM {:?} was trimmed; the log starts at {first}",
                cursor.next_seq, state.vm
            ))
            .into());
        }
        let durable = segments.last().map(|s| s.last_seq).unwrap_or(0);
        if cursor.next_seq <= durable {
            let mut c = cursor.clone();
            let batch = tokio::task::spawn_blocking(move || {
                read(&dir, &segments, &mut c, max_bytes).map(|b| (b, c))
            })
            .await
            .map_err(|_| CacheError::ShuttingDown)?;
            if restarts.has_changed().unwrap_or(true) {
                // What was read may be from the files of the old numbering.
                return Err(restarted(&state.vm));
            }
            let (records, next) = match batch {
                Ok(b) => b,
                // Acknowledged records damaged on disk (a sealed segment is
                // not scanned at open): never served, never cut; the log is
                // set aside and started again, and the VM resynced.
                Err(CacheError::Corrupt(why)) => {
                    store.set_aside_live(&state, &why).await?;
                    return Err(restarted(&state.vm));
                }
                Err(e) => return Err(e),
            };
            cursor = next;
            let traces = match (records.first(), records.last()) {
                (Some(first), Some(last)) => state.traces(first.sequence, last.sequence),
                _ => Vec::new(),
            };
            let response = pb::TailResponse {
                batch: Some(pb::RecordBatch { records, traces }),
                durable_sequence: durable,
                lineage,
            };
            tokio::select! {
                sent = tx.send(Ok(response)) => if sent.is_err() { return Ok(()) },
                _ = shutdown.cancelled() => return Err(CacheError::ShuttingDown),
            }
            continue;
        }
        if !follow {
            return Ok(());
        }
        // Caught up: wait for more, for the client to go, or for shutdown.
        tokio::select! {
            changed = durable_rx.changed() => if changed.is_err() { return Ok(()) },
            _ = restarts.changed() => return Err(restarted(&state.vm)),
            _ = tx.closed() => return Ok(()),
            _ = shutdown.cancelled() => return Err(CacheError::ShuttingDown),
        }
    }
}
