//! The agent's stream: validate every record, append each batch durably, ack.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::cache::v1 as pb;
use ferry_proto::cache::v1::record::Op;
use ferry_proto::ids::{Epoch, Incarnation};
use ferry_proto::registry::v1 as registry;
use ferry_runtime::security::Caller;
use ferry_runtime::{Refusal, Refused};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::control::Control;
use crate::error::CacheError;
use crate::model::Open;
use crate::service::CacheService;
use crate::store::VmState;

/// Disk sizes by id: what records are checked against.
pub type Disks = HashMap<String, u64>;

/// Checks one record against the VM's disks and its own checksum.
pub fn validate(record: &pb::Record, disks: &Disks) -> Result<(), CacheError> {
    let seq = record.sequence;
    let bad = |why: String| Refused::invalid_argument(format!("record {seq}: {why}")).into();
    let range = |offset: u64, length: u64| -> Result<(), CacheError> {
        let size = *disks.get(&record.disk_id).ok_or_else(|| {
            Refused::invalid_argument(format!(
                "record {seq}: unknown disk {:?}; the VM has {}",
                record.disk_id,
                {
                    let mut ids: Vec<&str> = disks.keys().map(String::as_str).collect();
                    ids.sort_unstable();
                    ids.join(", ")
                }
            ))
        })?;
        if length == 0 {
            return Err(bad("zero length".into()));
        }
        if !offset.is_multiple_of(512) || !length.is_multiple_of(512) {
            return Err(bad(format!(
                "offset {offset} and length {length} must be multiples of 512"
            )));
        }
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(bad(format!(
                "range {offset}+{length} is past the end of disk {:?} ({size} bytes)",
                record.disk_id
            ))),
        }
    };
    match &record.op {
        Some(Op::Write(w)) => range(w.offset, w.data.len() as u64)?,
        Some(Op::Trim(z)) | Some(Op::WriteZeroes(z)) => range(z.offset, z.length)?,
        Some(Op::Digests(d)) => {
            range(d.offset, d.length)?;
            if d.chunk_bytes == 0
                || !d.chunk_bytes.is_multiple_of(512)
                || d.chunk_bytes > ferry_proto::MAX_DIGEST_CHUNK_BYTES
            {
                return Err(bad(format!(
                    "chunk_bytes {} must be a non-zero multiple of 512, at most {}",
                    d.chunk_bytes,
                    ferry_proto::MAX_DIGEST_CHUNK_BYTES
                )));
            }
            let expected = d.length.div_ceil(d.chunk_bytes);
            if d.crc32c.len() as u64 != expected {
                return Err(bad(format!(
                    "{} checksums for {} chunks",
                    d.crc32c.len(),
                    expected
                )));
            }
        }
        Some(Op::Marker(m)) => {
            if pb::MarkerKind::try_from(m.kind).unwrap_or(pb::MarkerKind::Unspecified)
                == pb::MarkerKind::Unspecified
            {
                return Err(bad("marker without a kind".into()));
            }
            if !record.disk_id.is_empty() && !disks.contains_key(&record.disk_id) {
                return Err(bad(format!(
                    "marker names unknown disk {:?}",
                    record.disk_id
                )));
            }
        }
        None => return Err(bad("no operation".into())),
    }
    let crc = ferry_proto::checksum::record_crc32c(record);
    if crc != record.crc32c {
        return Err(Refused::data_loss(format!(
            "record {seq}: checksum {:#010x} does not match its contents ({crc:#010x}); \
             nothing of this batch was stored",
            record.crc32c
        ))
        .into());
    }
    Ok(())
}

/// Room on the data directory's filesystem. Batches stop short of a
/// reserve kept for the sled index: sled fails for good (until a restart)
/// once a write of its own hits ENOSPC, and the index must still record
/// the processor's applied sequence and the trims that free space again.
pub struct Room {
    space: ferry_runtime::space::Room,
    /// VMs registry was told are refused for a full disk, until one of
    /// their batches fits again.
    refused: Mutex<HashSet<String>>,
}

impl Room {
    pub fn new(dir: PathBuf, reserve: u64) -> Room {
        Room {
            space: ferry_runtime::space::Room::new(dir, reserve),
            refused: Mutex::new(HashSet::new()),
        }
    }

    /// Claims room for a batch of `bytes`, held until it is written.
    fn claim(&self, bytes: u64) -> Result<ferry_runtime::space::Claim, CacheError> {
        use ferry_runtime::space::NoRoom;
        self.space.claim(bytes).map_err(|e| match e {
            NoRoom::Io { path, source } => CacheError::io(&path, source),
            full @ NoRoom::Full { .. } => CacheError::DiskFull(format!(
                "{full}; back off until the log is trimmed or space is freed"
            )),
        })
    }

    /// Whether `vm`'s refusal is news (true once, until it fits again).
    fn refused(&self, vm: &str) -> bool {
        self.refused
            .lock()
            .is_ok_and(|mut r| r.insert(vm.to_string()))
    }

    /// Whether `vm` fits again after a refusal registry heard of.
    fn fits(&self, vm: &str) -> bool {
        self.refused.lock().is_ok_and(|mut r| r.remove(vm))
    }
}

type Tx = mpsc::Sender<Result<pb::IngestResponse, Status>>;

/// How the cache's health report about a full disk begins.
const DISK_FULL: &str = "disk full";

fn reply(msg: pb::ingest_response::Msg) -> Result<pb::IngestResponse, Status> {
    Ok(pb::IngestResponse { msg: Some(msg) })
}

impl CacheService {
    /// Opens a session: registry must recognise the agent's credential for
    /// a protected VM and its epoch as current; the cache must not have seen a
    /// newer one.
    pub(crate) async fn open_session(
        &self,
        open: &Open,
    ) -> Result<(Arc<VmState>, Disks), CacheError> {
        let vm = open.vm.as_str();
        let mut client = self.registry.clone();
        let item = client
            .verify_agent(registry::VerifyAgentRequest {
                vm_name: vm.to_string(),
                credential: open.credential.clone(),
                epoch: open.epoch.get(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => Refused::not_found(format!(
                    "VM {vm:?} is not protected: enable its replication first"
                ))
                .into(),
                tonic::Code::InvalidArgument => Refused::invalid_argument(s.message()).into(),
                tonic::Code::PermissionDenied => Refused::permission_denied(s.message()).into(),
                tonic::Code::FailedPrecondition => Refused::failed_precondition(s.message()).into(),
                _ => CacheError::Registry(s.message().into()),
            })?
            .into_inner();
        // Only the cache registry placed the item on keeps its log: one
        // VM's records never split over two caches.
        if !ferry_runtime::peers::serves(self.endpoint.as_deref(), &item.cache_endpoint) {
            let placed = if item.cache_endpoint.is_empty() {
                "registry's default cache".to_string()
            } else {
                format!("cache {}", item.cache_endpoint)
            };
            return Err(Refused::failed_precondition(format!(
                "VM {vm:?} streams to {placed} (its source region's), not to this cache \
                 ({}); restart its agent so that it asks registry again",
                self.endpoint.as_deref().unwrap_or("the default")
            ))
            .into());
        }
        // Registry still says this VM's records are refused for a full disk
        // (the cache restarted since, say): the next batch that fits clears it.
        if item.health_reports.iter().any(|r| {
            r.component == "cache"
                && r.health != registry::ReplicationHealth::Normal as i32
                && r.message.starts_with(DISK_FULL)
        }) {
            self.room.refused(vm);
        }
        let disks = item
            .source
            .map(|v| v.disks.into_iter().map(|d| (d.id, d.size_bytes)).collect())
            .unwrap_or_default();
        let state = self
            .store
            .get_or_create(vm, Incarnation(item.incarnation))
            .await?;
        self.store.admit_epoch(&state, open.epoch).await?;
        Ok((state, disks))
    }

    /// Runs one agent stream until it ends, fails or shutdown comes.
    pub(crate) async fn ingest(
        self,
        caller: Caller,
        mut inbound: Streaming<pb::IngestRequest>,
        tx: Tx,
        shutdown: CancellationToken,
    ) {
        let result = self
            .ingest_inner(&caller, &mut inbound, &tx, &shutdown)
            .await;
        if let Err(err) = result {
            tracing::warn!(%err, "ingest stream ended with an error");
            // A quota or a full disk: the agent backs off and resends.
            if matches!(
                err,
                CacheError::Refused(Refused {
                    kind: Refusal::ResourceExhausted,
                    ..
                }) | CacheError::DiskFull(_)
            ) {
                let throttle = pb::Throttle {
                    max_bytes_per_second: 0,
                    reason: err.to_string(),
                };
                let _ = tx
                    .send(reply(pb::ingest_response::Msg::Throttle(throttle)))
                    .await;
            }
            let _ = tx.send(Err(Status::from(err))).await;
        }
    }

    async fn ingest_inner(
        &self,
        caller: &Caller,
        inbound: &mut Streaming<pb::IngestRequest>,
        tx: &Tx,
        shutdown: &CancellationToken,
    ) -> Result<(), CacheError> {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Err(CacheError::ShuttingDown),
            m = inbound.message() => m,
        };
        let open = match first {
            Ok(Some(pb::IngestRequest {
                msg: Some(pb::ingest_request::Msg::Open(open)),
            })) => Open::try_from(open)?,
            Ok(Some(_)) => {
                return Err(Refused::invalid_argument(
                    "the first message of an ingest stream must be `open`",
                )
                .into())
            }
            Ok(None) => return Ok(()),
            Err(status) => return Err(Refused::invalid_argument(status.message()).into()),
        };
        // An agent streams its own VM's writes only; nothing is opened for
        // another's.
        caller.check_vm(open.vm.as_str())?;
        let (state, disks) = self.open_session(&open).await?;
        let (vm, epoch) = (open.vm.to_string(), open.epoch.get());
        // Registered before `opened`, so a control message sent once the
        // agent is streaming finds it.
        let (session, mut control) = self.sessions.open(&vm, epoch)?;
        let mut restarts = state.restarts();
        let mut durable = state.with_log(|log| log.last_seq())?;
        tracing::info!(vm = %vm, epoch, durable, "agent stream open");
        if tx
            .send(reply(pb::ingest_response::Msg::Opened(pb::IngestOpened {
                durable_sequence: durable,
            })))
            .await
            .is_err()
        {
            return Ok(());
        }

        loop {
            let message = tokio::select! {
                // A stop queued before the log went (replication disabled)
                // is said before the stream ends for the restart.
                biased;
                _ = shutdown.cancelled() => return Err(CacheError::ShuttingDown),
                Some(c) = control.recv() => {
                    let (msg, stop) = match c {
                        Control::Resync(r) => (pb::ingest_response::Msg::Resync(r), None),
                        Control::Bookmark(b) => (pb::ingest_response::Msg::Bookmark(b), None),
                        // A planned failover's stop: the agent sends what it
                        // holds and a FINAL marker, then closes the stream.
                        Control::Stop(s) if !s.final_marker_id.is_empty() => {
                            (pb::ingest_response::Msg::Stop(s), None)
                        }
                        Control::Stop(s) => {
                            let reason = s.reason.clone();
                            (pb::ingest_response::Msg::Stop(s), Some(reason))
                        }
                    };
                    if tx.send(reply(msg)).await.is_err() {
                        return Ok(());
                    }
                    match stop {
                        Some(reason) => return Err(Refused::failed_precondition(reason).into()),
                        None => continue,
                    }
                }
                _ = restarts.changed() => {
                    return Err(Refused::aborted(format!(
                        "VM {vm:?}'s log started again; reconnect and number on from its \
                         durable sequence"
                    )).into())
                }
                m = inbound.message() => m,
            };
            let batch = match message {
                Ok(Some(pb::IngestRequest {
                    msg: Some(pb::ingest_request::Msg::Batch(batch)),
                })) => batch,
                Ok(Some(_)) => {
                    return Err(
                        Refused::invalid_argument("only record batches may follow `open`").into(),
                    )
                }
                Ok(None) => return Ok(()),
                // tonic reports a message over the size limit as OUT_OF_RANGE;
                // gRPC's code for it is RESOURCE_EXHAUSTED.
                Err(status) if status.code() == tonic::Code::OutOfRange => {
                    let _ = tx
                        .send(Err(Status::resource_exhausted(format!(
                            "{}: the message is over this cache's max_message_bytes. A batch \
                             of several records over it must be sent as smaller batches; a \
                             single record over it can never be taken, so the cache's \
                             max_message_bytes must be raised above the agent's largest \
                             record (1 MiB of data and its header)",
                            status.message()
                        ))))
                        .await;
                    return Ok(());
                }
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return Ok(());
                }
            };
            // A resend of what is already durable is dropped; the rest must
            // continue the log without a gap.
            let records: Vec<pb::Record> = batch
                .records
                .into_iter()
                .filter(|r| r.sequence > durable)
                .collect();
            if !records.is_empty() {
                let writer = session.still_current();
                // A traced batch: its trace goes on in a span of its ingest
                // (checks, append, fsync), handed on to the tails once durable.
                let spans: Vec<_> = batch
                    .traces
                    .iter()
                    .map(|t| {
                        let span = tracing::info_span!(
                            "ferry.cache.ingest",
                            vm = %vm,
                            first = t.first_sequence,
                            last = t.last_sequence
                        );
                        ferry_runtime::batch_trace::continue_trace(&span, &t.traceparent);
                        (span, t.first_sequence, t.last_sequence)
                    })
                    .collect();
                let appended = self
                    .check_and_append(&state, &disks, epoch, &mut durable, records, writer)
                    .await;
                for (span, first, last) in spans {
                    if appended.is_ok() {
                        if let Some(trace) =
                            ferry_runtime::batch_trace::trace_of(&span, first, last)
                        {
                            state.traced(trace);
                        }
                    }
                }
                match &appended {
                    Err(CacheError::DiskFull(why)) if self.room.refused(&vm) => {
                        let message = format!(
                            "{DISK_FULL}: cache-svc refuses this VM's records ({why}); the \
                             agent tracks changed chunks until space returns"
                        );
                        self.report(&vm, registry::ReplicationHealth::Critical, message)
                            .await;
                    }
                    Ok(()) if self.room.fits(&vm) => {
                        self.report(&vm, registry::ReplicationHealth::Normal, String::new())
                            .await;
                    }
                    _ => {}
                }
                appended?;
            }
            if tx
                .send(reply(pb::ingest_response::Msg::Ack(pb::Ack {
                    durable_sequence: durable,
                })))
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    }

    /// Tells registry how the cache fares with `vm` (component "cache").
    /// Best effort: the refusal itself reaches the agent regardless.
    async fn report(&self, vm: &str, health: registry::ReplicationHealth, message: String) {
        tracing::warn!(vm, ?health, message, "reporting the cache's health");
        let mut client = self.registry.clone();
        let report = registry::ReportHealthRequest {
            vm_name: vm.to_string(),
            component: "cache".into(),
            health: health as i32,
            message,
            ..Default::default()
        };
        match tokio::time::timeout(Duration::from_secs(5), client.report_health(report)).await {
            Ok(Ok(_)) => {}
            Ok(Err(s)) => tracing::warn!(vm, %s, "cannot report the cache's health"),
            Err(_) => tracing::warn!(vm, "registry did not take the cache's health report in 5 s"),
        }
    }

    /// Validates a batch whole, then appends it while `writer` allows (this
    /// is still the VM's stream); nothing of it is stored if any record is
    /// refused.
    async fn check_and_append(
        &self,
        state: &Arc<VmState>,
        disks: &Disks,
        epoch: u64,
        durable: &mut u64,
        records: Vec<pb::Record>,
        writer: impl FnOnce() -> Result<(), CacheError> + Send + 'static,
    ) -> Result<(), CacheError> {
        for (expected, record) in (*durable + 1..).zip(&records) {
            if record.sequence != expected {
                return Err(Refused::aborted(format!(
                    "sequence gap: got record {} where {expected} comes next; resend from \
                     {expected}",
                    record.sequence
                ))
                .into());
            }
            validate(record, disks)?;
        }
        let bytes: u64 = records
            .iter()
            .map(|r| prost::Message::encoded_len(r) as u64 + crate::frame::HEADER as u64)
            .sum();
        // Its commit frame is one more header.
        let _claim = self.room.claim(bytes + crate::frame::HEADER as u64)?;
        // The fencing check again: a newer agent may have registered.
        if state.meta()?.epoch > Epoch(epoch) {
            return Err(Refused::failed_precondition(format!(
                "agent epoch {epoch} of VM {:?} was fenced by a newer agent",
                state.vm
            ))
            .into());
        }
        *durable = self.store.append_while(state, records, writer).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::cache::v1::{Marker, WriteOp, ZeroOp};

    fn disks() -> Disks {
        [("os".to_string(), 1 << 20)].into()
    }

    fn sealed(mut r: pb::Record) -> pb::Record {
        ferry_proto::checksum::seal(&mut r);
        r
    }

    fn write(offset: u64, len: usize) -> pb::Record {
        sealed(pb::Record {
            sequence: 1,
            disk_id: "os".into(),
            op: Some(Op::Write(WriteOp {
                offset,
                data: vec![7; len].into(),
            })),
            ..Default::default()
        })
    }

    #[test]
    fn records_are_checked() {
        assert!(validate(&write(0, 4096), &disks()).is_ok());
        assert!(validate(&write((1 << 20) - 512, 512), &disks()).is_ok());
        for (what, r) in [
            ("past the end", write(1 << 20, 512)),
            ("straddles the end", write((1 << 20) - 512, 1024)),
            ("unaligned offset", write(100, 512)),
            ("unaligned length", write(0, 100)),
            ("zero length", write(0, 0)),
        ] {
            assert!(
                matches!(
                    validate(&r, &disks()),
                    Err(CacheError::Refused(Refused {
                        kind: Refusal::InvalidArgument,
                        ..
                    }))
                ),
                "{what}"
            );
        }
        let mut unknown = write(0, 512);
        unknown.disk_id = "nope".into();
        let unknown = sealed(unknown);
        assert!(matches!(
            validate(&unknown, &disks()),
            Err(CacheError::Refused(Refused {
                kind: Refusal::InvalidArgument,
                ..
            }))
        ));
        let mut corrupt = write(0, 512);
        corrupt.crc32c ^= 1;
        assert!(matches!(
            validate(&corrupt, &disks()),
            Err(CacheError::Refused(Refused {
                kind: Refusal::DataLoss,
                ..
            }))
        ));
        let huge = sealed(pb::Record {
            sequence: 1,
            disk_id: "os".into(),
            op: Some(Op::Trim(ZeroOp {
                offset: u64::MAX - 511,
                length: 1024,
            })),
            ..Default::default()
        });
        assert!(validate(&huge, &disks()).is_err());
        // Checksums of chunks as large as the disk: the processor would read
        // a whole chunk to compare it.
        let digests = |chunk_bytes: u64| {
            sealed(pb::Record {
                sequence: 1,
                disk_id: "os".into(),
                op: Some(Op::Digests(pb::ChunkDigests {
                    offset: 0,
                    chunk_bytes,
                    length: 1 << 20,
                    crc32c: vec![0; (1u64 << 20).div_ceil(chunk_bytes) as usize],
                })),
                ..Default::default()
            })
        };
        assert!(validate(&digests(64 << 10), &disks()).is_ok());
        let big: Disks = [("os".to_string(), 64u64 << 20)].into();
        assert!(matches!(
            validate(&digests(8 << 20), &big),
            Err(CacheError::Refused(Refused {
                kind: Refusal::InvalidArgument,
                ..
            }))
        ));
        let marker = sealed(pb::Record {
            sequence: 1,
            op: Some(Op::Marker(Marker {
                kind: pb::MarkerKind::AppConsistent as i32,
                id: "m1".into(),
                time_unix_nanos: 0,
            })),
            ..Default::default()
        });
        assert!(validate(&marker, &disks()).is_ok());
        let no_kind = sealed(pb::Record {
            sequence: 1,
            op: Some(Op::Marker(Marker::default())),
            ..Default::default()
        });
        assert!(validate(&no_kind, &disks()).is_err());
    }
}
