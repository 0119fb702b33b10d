//! The gRPC face of cache-svc.

use std::sync::Arc;

use ferry_proto::cache::v1 as pb;
use ferry_proto::cache::v1::cache_server::Cache;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::PeerChannel;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::control::{Control, Sessions};
use crate::error::CacheError;
use crate::store::Store;
use crate::tail;

/// Responses buffered per stream before the sender waits.
const STREAM_BUFFER: usize = 16;

/// The tonic service.
#[derive(Clone)]
pub struct CacheService {
    pub(crate) store: Arc<Store>,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) registry: RegistryClient<PeerChannel>,
    pub(crate) room: Arc<crate::ingest::Room>,
    shutdown: CancellationToken,
    /// Tail batches stay well under the largest message the server sends.
    max_batch_bytes: usize,
}

impl CacheService {
    pub fn new(
        store: Arc<Store>,
        sessions: Arc<Sessions>,
        registry: RegistryClient<PeerChannel>,
        room: crate::ingest::Room,
        shutdown: CancellationToken,
        max_message_bytes: usize,
    ) -> Self {
        CacheService {
            store,
            sessions,
            registry,
            room: Arc::new(room),
            shutdown,
            max_batch_bytes: (max_message_bytes / 2).max(4096),
        }
    }
}

fn vm_name(vm: &str) -> Result<(), Status> {
    if vm.is_empty() {
        return Err(Status::invalid_argument("vm_name is empty"));
    }
    ferry_runtime::trace_context::record_vm(vm);
    Ok(())
}

#[tonic::async_trait]
impl Cache for CacheService {
    type IngestStream = ReceiverStream<Result<pb::IngestResponse, Status>>;

    async fn ingest(
        &self,
        request: Request<Streaming<pb::IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let service = self.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(service.ingest(request.into_inner(), tx, shutdown));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type TailStream = ReceiverStream<Result<pb::TailResponse, Status>>;

    async fn tail(
        &self,
        request: Request<pb::TailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let req = request.into_inner();
        vm_name(&req.vm_name)?;
        let state = self.store.get(&req.vm_name)?.ok_or_else(|| {
            CacheError::NotFound(format!("the cache has no log for VM {:?}", req.vm_name))
        })?;
        let meta = state.meta()?;
        if req.incarnation != 0 && meta.incarnation < req.incarnation {
            return Err(CacheError::NotFound(format!(
                "the cache has no log of VM {:?}'s incarnation {} yet (only of {}): its agent \
                 has not streamed since replication was enabled again",
                req.vm_name, req.incarnation, meta.incarnation
            ))
            .into());
        }
        if req.incarnation != 0 && meta.incarnation > req.incarnation {
            return Err(CacheError::FailedPrecondition(format!(
                "VM {:?}'s log belongs to incarnation {}, newer than the {} asked for",
                req.vm_name, meta.incarnation, req.incarnation
            ))
            .into());
        }
        let from = req.from_sequence.max(1);
        let (first, last) = state.with_log(|log| (log.first_seq(), log.last_seq()))?;
        let other_lineage = req.lineage != 0 && req.lineage != meta.lineage;
        if (other_lineage && from > first) || from > last + 1 {
            // The reader applied up to `from - 1`, from another lineage of
            // this log or from records this log lost: the numbers this log
            // holds or will give overlap what it applied, and would be
            // skipped as applied. Renumber past them first.
            self.store.renumber_past(&state, from - 1).await?;
        }
        // Subscribed before the lineage is read: a restart after is seen.
        let restarts = state.restarts();
        let meta = state.meta()?;
        let first = state.with_log(|log| log.first_seq())?;
        if from < first {
            return Err(CacheError::OutOfRange(format!(
                "sequence {from} of VM {:?} was trimmed; the log starts at {first}",
                req.vm_name
            ))
            .into());
        }
        let max_bytes = match req.max_batch_bytes {
            0 => tail::DEFAULT_BATCH_BYTES,
            n => n as usize,
        }
        .min(self.max_batch_bytes);
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let tail = tail::Tail {
            store: self.store.clone(),
            state,
            from,
            follow: req.follow,
            max_bytes,
            lineage: meta.lineage,
            restarts,
        };
        tokio::spawn(tail::run(tail, tx, self.shutdown.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report_applied(
        &self,
        request: Request<pb::ReportAppliedRequest>,
    ) -> Result<Response<pb::ReportAppliedResponse>, Status> {
        let req = request.into_inner();
        vm_name(&req.vm_name)?;
        let state = self.store.get(&req.vm_name)?.ok_or_else(|| {
            CacheError::NotFound(format!("the cache has no log for VM {:?}", req.vm_name))
        })?;
        let trim_point = self
            .store
            .applied(&state, req.applied_sequence, req.lineage)
            .await?;
        Ok(Response::new(pb::ReportAppliedResponse { trim_point }))
    }

    async fn get_log_info(
        &self,
        request: Request<pb::GetLogInfoRequest>,
    ) -> Result<Response<pb::LogInfo>, Status> {
        let req = request.into_inner();
        vm_name(&req.vm_name)?;
        let state = self.store.get(&req.vm_name)?.ok_or_else(|| {
            CacheError::NotFound(format!("the cache has no log for VM {:?}", req.vm_name))
        })?;
        let meta = state.meta()?;
        let info = state.with_log(|log| pb::LogInfo {
            vm_name: req.vm_name.clone(),
            first_sequence: log.first_seq(),
            last_sequence: log.last_seq(),
            applied_sequence: meta.applied,
            size_bytes: log.size(),
            segments: log.segments().len() as u32,
            epoch: meta.epoch,
            lineage: meta.lineage,
            incarnation: meta.incarnation,
        })?;
        Ok(Response::new(info))
    }

    async fn send_control(
        &self,
        request: Request<pb::SendControlRequest>,
    ) -> Result<Response<pb::SendControlResponse>, Status> {
        let req = request.into_inner();
        vm_name(&req.vm_name)?;
        let control = match req.control {
            Some(pb::send_control_request::Control::Resync(r)) => Control::Resync(r),
            Some(pb::send_control_request::Control::Bookmark(b)) => {
                if b.id.is_empty() {
                    return Err(Status::invalid_argument("a bookmark needs an id"));
                }
                Control::Bookmark(b)
            }
            Some(pb::send_control_request::Control::Stop(s)) => Control::Stop(s),
            None => {
                return Err(Status::invalid_argument(
                    "control is empty: set resync, bookmark or stop",
                ))
            }
        };
        let agent_epoch = self.sessions.send(&req.vm_name, control)?;
        Ok(Response::new(pb::SendControlResponse { agent_epoch }))
    }
}
