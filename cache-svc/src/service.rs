//! The gRPC face of cache-svc.

use std::sync::Arc;

use ferry_proto::cache::v1 as pb;
use ferry_proto::cache::v1::cache_server::Cache;
use ferry_proto::ids::VmName;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::security::audit;
use ferry_runtime::security::Caller;
use ferry_runtime::{PeerChannel, Refused};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::control::Sessions;
use crate::error::CacheError;
use crate::model::{AppliedReport, ControlFor, LogOf, TailFrom};
use crate::store::{Store, VmState};
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
    /// The URL registry places items on this cache by; None: it takes the
    /// items placed on no cache.
    pub(crate) endpoint: Option<String>,
}

impl CacheService {
    pub fn new(
        store: Arc<Store>,
        sessions: Arc<Sessions>,
        registry: RegistryClient<PeerChannel>,
        room: crate::ingest::Room,
        shutdown: CancellationToken,
        max_message_bytes: usize,
        endpoint: Option<String>,
    ) -> Self {
        CacheService {
            store,
            sessions,
            registry,
            room: Arc::new(room),
            shutdown,
            max_batch_bytes: (max_message_bytes / 2).max(4096),
            endpoint,
        }
    }
}

/// The VM's log, or NOT_FOUND.
fn log_of(store: &Store, vm: &VmName) -> Result<Arc<VmState>, CacheError> {
    store
        .get(vm.as_str())?
        .ok_or_else(|| Refused::not_found(format!("the cache has no log for VM {vm:?}")).into())
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
        let caller = Caller::of(&request);
        tokio::spawn(service.ingest(caller, request.into_inner(), tx, shutdown));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type TailStream = ReceiverStream<Result<pb::TailResponse, Status>>;

    async fn tail(
        &self,
        request: Request<pb::TailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let req = TailFrom::try_from(request.into_inner())?;
        let vm = &req.vm;
        let state = log_of(&self.store, vm)?;
        let meta = state.meta()?;
        if let Some(incarnation) = req.incarnation {
            if meta.incarnation < incarnation {
                return Err(Refused::not_found(format!(
                    "the cache has no log of VM {vm:?}'s incarnation {incarnation} yet (only of \
                     {}): its agent has not streamed since replication was enabled again",
                    meta.incarnation
                ))
                .into());
            }
            if meta.incarnation > incarnation {
                return Err(Refused::failed_precondition(format!(
                    "VM {vm:?}'s log belongs to incarnation {}, newer than the {incarnation} \
                     asked for",
                    meta.incarnation
                ))
                .into());
            }
        }
        let from = req.from.get();
        let (first, last) = state.with_log(|log| (log.first_seq(), log.last_seq()))?;
        let other_lineage = req.lineage.is_some_and(|l| l != meta.lineage);
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
            return Err(Refused::out_of_range(format!(
                "sequence {from} of VM {vm:?} was trimmed; the log starts at {first}"
            ))
            .into());
        }
        let max_bytes = req
            .max_batch_bytes
            .unwrap_or(tail::DEFAULT_BATCH_BYTES)
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
        let req = AppliedReport::try_from(request.into_inner())?;
        let state = log_of(&self.store, &req.vm)?;
        let trim_point = self.store.applied(&state, req.applied, req.lineage).await?;
        Ok(Response::new(pb::ReportAppliedResponse { trim_point }))
    }

    async fn get_log_info(
        &self,
        request: Request<pb::GetLogInfoRequest>,
    ) -> Result<Response<pb::LogInfo>, Status> {
        let LogOf(vm) = LogOf::try_from(request.into_inner())?;
        let state = log_of(&self.store, &vm)?;
        let meta = state.meta()?;
        let info = state.with_log(|log| pb::LogInfo {
            vm_name: vm.to_string(),
            first_sequence: log.first_seq(),
            last_sequence: log.last_seq(),
            applied_sequence: meta.applied.get(),
            size_bytes: log.size(),
            segments: log.segments().len() as u32,
            epoch: meta.epoch.get(),
            lineage: meta.lineage,
            incarnation: meta.incarnation.get(),
        })?;
        Ok(Response::new(info))
    }

    async fn send_control(
        &self,
        request: Request<pb::SendControlRequest>,
    ) -> Result<Response<pb::SendControlResponse>, Status> {
        audit::target(&request, audit::Target::vm(&request.get_ref().vm_name));
        let req = ControlFor::try_from(request.into_inner())?;
        let agent_epoch = self.sessions.send(req.vm.as_str(), req.control)?;
        Ok(Response::new(pb::SendControlResponse { agent_epoch }))
    }
}
