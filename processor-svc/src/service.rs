//! The gRPC face of processor-svc.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use ferry_proto::cache::v1 as cache;
use ferry_proto::ids::{PointId, VmName};
use ferry_proto::processor::v1 as pb;
use ferry_proto::processor::v1::processor_server::Processor;
use ferry_runtime::security::audit::{self, Target};
use ferry_runtime::time::{from_timestamp, to_timestamp};
use ferry_runtime::Refused;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::error::ProcessorError;
use crate::pipeline::{blocking, Command, Pipelines};
use crate::replica::{missing_point, Point, PointKind, VmReplica};

/// Extents buffered per ReadDisk stream before the reader waits.
const STREAM_BUFFER: usize = 8;

/// The tonic service.
#[derive(Clone)]
pub struct ProcessorService {
    pipelines: Arc<Pipelines>,
    shutdown: CancellationToken,
    /// Data bytes per ReadDisk message, well under the message size limit.
    extent_bytes: u64,
    /// How long CutRecoveryPoint waits for the pipeline.
    cut_timeout: Duration,
}

impl ProcessorService {
    pub fn new(
        pipelines: Arc<Pipelines>,
        shutdown: CancellationToken,
        max_message_bytes: usize,
        cut_timeout: Duration,
    ) -> Self {
        ProcessorService {
            pipelines,
            shutdown,
            extent_bytes: (max_message_bytes as u64 / 2).clamp(4096, 4 << 20),
            cut_timeout,
        }
    }

    fn replica(&self, vm: &str) -> Result<Arc<VmReplica>, ProcessorError> {
        // Checked as registry names VMs: a name it cannot hold is a bad
        // request, not an unknown VM.
        let vm = VmName::parse(vm).map_err(|e| Refused::invalid_argument(e.to_string()))?;
        let vm = vm.as_str();
        ferry_runtime::trace_context::record_vm(vm);
        self.pipelines.replicas().get(vm)?.ok_or_else(|| {
            Refused::not_found(format!(
                "processor-svc has no replica of VM {vm:?}: is its replication enabled?"
            ))
            .into()
        })
    }
}

/// A point id as received. One that is not an id at all is a point `vm`
/// does not have (NOT_FOUND, as for an expired one): ids are only ever
/// taken from a listing.
fn point_id(vm: &str, id: &str) -> Result<PointId, ProcessorError> {
    id.parse().map_err(|_| missing_point(vm, id))
}

/// A point-kind filter as received: None for any kind.
fn kind_filter(kind: i32) -> Result<Option<PointKind>, Status> {
    let kind = pb::PointKind::try_from(kind)
        .map_err(|_| Status::invalid_argument(format!("kind {kind} is not a point kind")))?;
    Ok(PointKind::try_from(kind).ok())
}

fn time(nanos: u64) -> prost_types::Timestamp {
    to_timestamp(UNIX_EPOCH + Duration::from_nanos(nanos))
}

fn nanos(t: &prost_types::Timestamp) -> Option<u64> {
    from_timestamp(t)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
}

/// A stored point as the API shows it.
pub fn to_proto(vm: &str, p: &Point) -> pb::RecoveryPoint {
    pb::RecoveryPoint {
        id: p.id().to_string(),
        vm_name: vm.to_string(),
        kind: pb::PointKind::from(p.kind) as i32,
        time: Some(time(p.time_nanos.get())),
        sequence_cut: p.sequence_cut.get(),
        disks: p
            .disks
            .iter()
            .map(|(id, size)| pb::DiskSize {
                disk_id: id.clone(),
                size_bytes: *size,
            })
            .collect(),
        replication_group: p.group.clone(),
        bookmark_id: p.bookmark_id.clone(),
        pinned_by: p.pinned_by.clone(),
        created_at: Some(time(p.created_nanos.get())),
        damaged: p.damaged.clone().unwrap_or_default(),
    }
}

/// A damaged point is never served.
fn servable(vm: &str, p: &Point) -> Result<(), ProcessorError> {
    match &p.damaged {
        Some(why) => Err(ProcessorError::DataLoss(format!(
            "recovery point {} of VM {vm:?}: {why}",
            p.id()
        ))),
        None => Ok(()),
    }
}

#[tonic::async_trait]
impl Processor for ProcessorService {
    async fn list_group_points(
        &self,
        request: Request<pb::ListGroupPointsRequest>,
    ) -> Result<Response<pb::ListGroupPointsResponse>, Status> {
        let req = request.into_inner();
        if req.replication_group.is_empty() {
            return Err(Status::invalid_argument("replication_group is empty"));
        }
        let members = self.pipelines.members(&req.replication_group);
        if members.is_empty() {
            return Err(Status::not_found(format!(
                "no protected VM is in replication group {:?}",
                req.replication_group
            )));
        }
        // Each member's multi-VM points of this group, by bookmark id.
        let mut by_member = Vec::new();
        for vm in &members {
            let points = match self.pipelines.replicas().get(vm)? {
                Some(r) => blocking(move || r.points()).await?,
                None => Vec::new(),
            };
            let points: std::collections::HashMap<String, Point> = points
                .into_iter()
                .filter(|p| p.kind == PointKind::MultiVm && p.group == req.replication_group)
                .map(|p| (p.bookmark_id.clone(), p))
                .collect();
            by_member.push(points);
        }
        let Some((first, rest)) = by_member.split_first() else {
            return Err(Status::not_found("the group has no members"));
        };
        let mut points: Vec<pb::GroupPoint> = first
            .iter()
            .filter(|(id, _)| rest.iter().all(|m| m.contains_key(*id)))
            .map(|(id, p)| pb::GroupPoint {
                bookmark_id: id.clone(),
                time: Some(time(p.time_nanos.get())),
                points: members
                    .iter()
                    .zip(&by_member)
                    .filter_map(|(vm, m)| m.get(id).map(|p| to_proto(vm, p)))
                    .collect(),
            })
            .collect();
        points.sort_by_key(|g| {
            std::cmp::Reverse(g.time.as_ref().and_then(nanos).unwrap_or_default())
        });
        if req.limit > 0 {
            points.truncate(req.limit as usize);
        }
        Ok(Response::new(pb::ListGroupPointsResponse {
            points,
            members,
        }))
    }

    async fn list_recovery_points(
        &self,
        request: Request<pb::ListRecoveryPointsRequest>,
    ) -> Result<Response<pb::ListRecoveryPointsResponse>, Status> {
        let req = request.into_inner();
        let replica = self.replica(&req.vm_name)?;
        let kind = kind_filter(req.kind)?;
        let not_before = req.not_before.as_ref().and_then(nanos);
        let not_after = req.not_after.as_ref().and_then(nanos);
        let r = replica.clone();
        let mut points = blocking(move || r.points()).await?;
        points.reverse();
        let points = points
            .iter()
            .filter(|p| kind.is_none_or(|k| p.kind == k))
            .filter(|p| not_before.is_none_or(|t| p.time_nanos.get() >= t))
            .filter(|p| not_after.is_none_or(|t| p.time_nanos.get() <= t))
            .take(if req.limit == 0 {
                usize::MAX
            } else {
                req.limit as usize
            })
            .map(|p| to_proto(&req.vm_name, p))
            .collect();
        Ok(Response::new(pb::ListRecoveryPointsResponse { points }))
    }

    async fn get_recovery_point(
        &self,
        request: Request<pb::GetRecoveryPointRequest>,
    ) -> Result<Response<pb::RecoveryPoint>, Status> {
        let req = request.into_inner();
        let replica = self.replica(&req.vm_name)?;
        let point = replica.point(point_id(&req.vm_name, &req.point_id)?)?;
        Ok(Response::new(to_proto(&req.vm_name, &point)))
    }

    async fn cut_recovery_point(
        &self,
        request: Request<pb::CutRecoveryPointRequest>,
    ) -> Result<Response<pb::RecoveryPoint>, Status> {
        audit::target(&request, Target::vm(&request.get_ref().vm_name));
        let req = request.into_inner();
        self.replica(&req.vm_name)?;
        let (commands, _) = self.pipelines.get(&req.vm_name).ok_or_else(|| {
            Refused::failed_precondition(format!(
                "VM {:?} is not replicating now (failed over or disabled); no new points",
                req.vm_name
            ))
        })?;
        // Everything the cache holds now is processed first.
        let mut cache_client = self.pipelines.cache_for(&req.vm_name);
        let durable = cache_client
            .get_log_info(cache::GetLogInfoRequest {
                vm_name: req.vm_name.clone(),
            })
            .await
            .map(|i| i.into_inner().last_sequence)
            .or_else(|s| match s.code() {
                tonic::Code::NotFound => Ok(0),
                _ => Err(Refused::unavailable(format!(
                    "cannot ask cache-svc what is pending ({}); use the latest processed point",
                    s.message()
                ))),
            })?;
        let (reply, answer) = oneshot::channel();
        commands
            .send(Command::Cut {
                min_sequence: durable,
                reply,
            })
            .await
            .map_err(|_| Refused::unavailable("the VM's pipeline stopped"))?;
        let point = tokio::time::timeout(self.cut_timeout, answer)
            .await
            .map_err(|_| {
                Refused::deadline_exceeded(format!(
                    "VM {:?}: sequence {durable} not processed within {:?}",
                    req.vm_name, self.cut_timeout
                ))
            })?
            .map_err(|_| Refused::unavailable("the VM's pipeline stopped"))??;
        Ok(Response::new(to_proto(&req.vm_name, &point)))
    }

    async fn get_disk_digest(
        &self,
        request: Request<pb::GetDiskDigestRequest>,
    ) -> Result<Response<pb::DiskDigest>, Status> {
        let req = request.into_inner();
        let replica = self.replica(&req.vm_name)?;
        let point = replica.point(point_id(&req.vm_name, &req.point_id)?)?;
        servable(&req.vm_name, &point)?;
        // Leased like a read: the point cannot be pruned meanwhile.
        let lease = replica.lease(&point)?;
        let (r, p, disk) = (replica.clone(), point.clone(), req.disk_id.clone());
        let (chunk_bytes, sha) = blocking(move || {
            let _lease = lease;
            r.digest(&p, &disk)
        })
        .await?;
        let size_bytes = point
            .disks
            .iter()
            .find(|(d, _)| *d == req.disk_id)
            .map(|(_, s)| *s)
            .unwrap_or_default();
        Ok(Response::new(pb::DiskDigest {
            vm_name: req.vm_name,
            point_id: req.point_id,
            disk_id: req.disk_id,
            size_bytes,
            chunk_bytes,
            algorithm: ferry_proto::digest::ALGORITHM.to_string(),
            sha256: sha.to_vec(),
        }))
    }

    type ReadDiskStream = ReceiverStream<Result<pb::DiskExtent, Status>>;

    async fn read_disk(
        &self,
        request: Request<pb::ReadDiskRequest>,
    ) -> Result<Response<Self::ReadDiskStream>, Status> {
        let req = request.into_inner();
        let replica = self.replica(&req.vm_name)?;
        let point = replica.point(point_id(&req.vm_name, &req.point_id)?)?;
        servable(&req.vm_name, &point)?;
        let size = point
            .disks
            .iter()
            .find(|(id, _)| *id == req.disk_id)
            .map(|(_, s)| *s)
            .ok_or_else(|| {
                let ids: Vec<&str> = point.disks.iter().map(|(d, _)| d.as_str()).collect();
                Refused::not_found(format!(
                    "point {} of VM {:?} has no disk {:?}; it has {}",
                    req.point_id,
                    req.vm_name,
                    req.disk_id,
                    ids.join(", ")
                ))
            })?;
        if !req.offset.is_multiple_of(512) {
            return Err(Status::invalid_argument(format!(
                "offset {} is not a multiple of 512",
                req.offset
            )));
        }
        let end = match req.length {
            0 => size,
            n => req.offset.saturating_add(n),
        };
        if req.offset > size || end > size {
            return Err(Refused::out_of_range(format!(
                "range {}+{} is past the end of disk {:?} ({size} bytes)",
                req.offset, req.length, req.disk_id
            ))
            .into());
        }
        let lease = replica.lease(&point)?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let (shutdown, max) = (self.shutdown.clone(), self.extent_bytes);
        let disk = req.disk_id.clone();
        let mut at = req.offset;
        tokio::spawn(async move {
            let _lease = lease;
            while at < end {
                let (r, p, d) = (replica.clone(), point.clone(), disk.clone());
                let extents = match blocking(move || r.read(&p, &d, at, end, max)).await {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                for e in extents {
                    at = e.offset + e.length;
                    let extent = match e.data {
                        Some(data) => pb::DiskExtent {
                            offset: e.offset,
                            length: e.length,
                            crc32c: crc32c::crc32c(&data),
                            content: Some(pb::disk_extent::Content::Data(data.into())),
                        },
                        None => pb::DiskExtent {
                            offset: e.offset,
                            length: e.length,
                            crc32c: 0,
                            content: Some(pb::disk_extent::Content::Hole(true)),
                        },
                    };
                    let offset = extent.offset;
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            // Said, not just ended: a reader must never take
                            // a stream cut short for the whole disk.
                            let stop = Status::unavailable(format!(
                                "processor-svc is shutting down; disk {disk:?} was read up to \
                                 byte {offset}: read it again"
                            ));
                            let _ = tokio::time::timeout(
                                std::time::Duration::from_secs(1),
                                tx.send(Err(stop)),
                            )
                            .await;
                            return;
                        }
                        sent = tx.send(Ok(extent)) => if sent.is_err() { return },
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn pin_recovery_point(
        &self,
        request: Request<pb::PinRecoveryPointRequest>,
    ) -> Result<Response<pb::PinRecoveryPointResponse>, Status> {
        audit::target(
            &request,
            Target::vm(&request.get_ref().vm_name).and(Target::point(&request.get_ref().point_id)),
        );
        let req = request.into_inner();
        if req.holder.is_empty() {
            return Err(Status::invalid_argument(
                "holder is empty: name who pins (a failover job id)",
            ));
        }
        let replica = self.replica(&req.vm_name)?;
        // A failover pins the point it uses: never a damaged one.
        let id = point_id(&req.vm_name, &req.point_id)?;
        servable(&req.vm_name, &replica.point(id)?)?;
        let holder = req.holder.clone();
        let point = blocking(move || replica.pin(id, &holder)).await?;
        Ok(Response::new(pb::PinRecoveryPointResponse {
            point: Some(to_proto(&req.vm_name, &point)),
        }))
    }

    async fn unpin_recovery_point(
        &self,
        request: Request<pb::UnpinRecoveryPointRequest>,
    ) -> Result<Response<pb::UnpinRecoveryPointResponse>, Status> {
        audit::target(
            &request,
            Target::vm(&request.get_ref().vm_name).and(Target::point(&request.get_ref().point_id)),
        );
        let req = request.into_inner();
        if req.holder.is_empty() {
            return Err(Status::invalid_argument("holder is empty"));
        }
        let replica = self.replica(&req.vm_name)?;
        let id = point_id(&req.vm_name, &req.point_id)?;
        let holder = req.holder.clone();
        blocking(move || replica.unpin(id, &holder)).await?;
        Ok(Response::new(pb::UnpinRecoveryPointResponse {}))
    }

    async fn seed_replica(
        &self,
        request: Request<tonic::Streaming<pb::SeedReplicaRequest>>,
    ) -> Result<Response<pb::SeedReplicaResponse>, Status> {
        let bytes_seeded =
            crate::seeding::seed(&self.pipelines, request.into_inner(), &self.shutdown).await?;
        Ok(Response::new(pb::SeedReplicaResponse { bytes_seeded }))
    }

    async fn get_pipeline_status(
        &self,
        request: Request<pb::GetPipelineStatusRequest>,
    ) -> Result<Response<pb::PipelineStatus>, Status> {
        let req = request.into_inner();
        let replica = self.replica(&req.vm_name)?;
        let meta = replica.meta()?;
        let status = self
            .pipelines
            .get(&req.vm_name)
            .map(|(_, s)| s)
            .unwrap_or_default();
        let latest = replica.points()?.pop();
        let applied = meta.applied.get();
        let durable = status.cache_durable.max(applied);
        Ok(Response::new(pb::PipelineStatus {
            vm_name: req.vm_name.clone(),
            applied_sequence: applied,
            cache_durable_sequence: durable,
            backlog_bytes: status.backlog_bytes,
            backlog_records: durable - applied,
            syncing_disks: meta.syncing.iter().cloned().collect(),
            latest_point: latest.map(|p| to_proto(&req.vm_name, &p)),
        }))
    }
}
