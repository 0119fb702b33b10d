//! The gRPC face of failover-svc.

use std::sync::Arc;

use ferry_proto::failover::v1 as pb;
use ferry_proto::failover::v1::failover_server::Failover;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::engine::Engine;
use crate::error::FailoverError;
use crate::inventory;

/// The tonic service.
#[derive(Clone)]
pub struct FailoverService {
    engine: Arc<Engine>,
    shutdown: CancellationToken,
}

impl FailoverService {
    pub fn new(engine: Arc<Engine>, shutdown: CancellationToken) -> Self {
        FailoverService { engine, shutdown }
    }
}

fn no_target() -> FailoverError {
    FailoverError::InvalidArgument("set vm_name or replication_group".into())
}

fn network_proto(n: &inventory::Network) -> pb::Network {
    pb::Network {
        region: n.region.clone(),
        resource_group: n.resource_group.clone(),
        name: n.name.clone(),
        subnets: n
            .subnets
            .iter()
            .map(|s| pb::Subnet {
                name: s.name.clone(),
                address_prefix: s.address_prefix.clone(),
            })
            .collect(),
    }
}

fn vm_proto(v: &inventory::TargetVm) -> pb::TargetVm {
    pb::TargetVm {
        region: v.region.clone(),
        resource_group: v.resource_group.clone(),
        name: v.name.clone(),
        source_vm: v.source_vm.clone(),
        virtual_network: v.virtual_network.clone(),
        availability_set: v.availability_set.clone(),
        nics: v
            .nics
            .iter()
            .map(|n| pb::TargetNic {
                name: n.name.clone(),
                subnet: n.subnet.clone(),
                private_ip: n.private_ip.clone(),
            })
            .collect(),
        disks: v
            .disks
            .iter()
            .map(|d| pb::TargetDisk {
                disk_id: d.disk_id.clone(),
                name: d.name.clone(),
                size_bytes: d.size_bytes,
                path: d.path.display().to_string(),
            })
            .collect(),
        point_id: v.point_id.clone(),
        test: v.test,
        job_id: v.job_id.clone(),
        created_at: Some(ferry_runtime::time::to_timestamp(
            std::time::UNIX_EPOCH + std::time::Duration::from_nanos(v.created_nanos),
        )),
    }
}

#[tonic::async_trait]
impl Failover for FailoverService {
    async fn start_failover(
        &self,
        request: Request<pb::StartFailoverRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let job = self.engine.start_failover(request.into_inner()).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn commit_failover(
        &self,
        request: Request<pb::CommitFailoverRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let req = request.into_inner();
        let job = match req.target {
            Some(pb::commit_failover_request::Target::VmName(vm)) => {
                self.engine.commit(vm, req.request_id).await?
            }
            Some(pb::commit_failover_request::Target::ReplicationGroup(g)) => {
                self.engine.commit_group(g, req.request_id).await?
            }
            None => return Err(no_target().into()),
        };
        Ok(Response::new(job.to_proto()))
    }

    async fn cleanup_test_failover(
        &self,
        request: Request<pb::CleanupTestFailoverRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let req = request.into_inner();
        let job = match req.target {
            Some(pb::cleanup_test_failover_request::Target::VmName(vm)) => {
                self.engine.cleanup_test(vm, req.request_id).await?
            }
            Some(pb::cleanup_test_failover_request::Target::ReplicationGroup(g)) => {
                self.engine.cleanup_group(g, req.request_id).await?
            }
            None => return Err(no_target().into()),
        };
        Ok(Response::new(job.to_proto()))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let id = request.into_inner().id;
        let job = self
            .engine
            .jobs()
            .get(&id)?
            .ok_or_else(|| FailoverError::NotFound(format!("no job {id:?}")))?;
        Ok(Response::new(self.engine.jobs().live(&job)))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let req = request.into_inner();
        let vm = (!req.vm_name.is_empty()).then_some(req.vm_name.as_str());
        let limit = if req.limit == 0 {
            usize::MAX
        } else {
            req.limit as usize
        };
        let jobs = self.engine.jobs().list(vm, limit)?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(|j| self.engine.jobs().live(j)).collect(),
        }))
    }

    type WatchJobStream = ReceiverStream<Result<pb::Job, Status>>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = request.into_inner().id;
        let job = self
            .engine
            .jobs()
            .get(&id)?
            .ok_or_else(|| FailoverError::NotFound(format!("no job {id:?}")))?;
        let (tx, rx) = mpsc::channel(16);
        let shutdown = self.shutdown.clone();
        let Some(mut changes) = self.engine.jobs().watch(&job) else {
            return Err(Status::internal("job watchers unavailable"));
        };
        tokio::spawn(async move {
            // The job as it is now, then each change until it ends.
            let mut current = changes.borrow_and_update().clone();
            loop {
                let ended = current.state == pb::JobState::Succeeded as i32
                    || current.state == pb::JobState::Failed as i32;
                if tx.send(Ok(current.clone())).await.is_err() || ended {
                    return;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("failover-svc is shutting down; watch again"))).await;
                        return;
                    }
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        current = changes.borrow_and_update().clone();
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn create_network(
        &self,
        request: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::Network>, Status> {
        let n = request
            .into_inner()
            .network
            .ok_or_else(|| Status::invalid_argument("network is unset"))?;
        for (field, value) in [
            ("region", &n.region),
            ("resource_group", &n.resource_group),
            ("name", &n.name),
        ] {
            if value.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "network {field} is empty"
                )));
            }
        }
        if n.subnets.is_empty() {
            return Err(Status::invalid_argument(
                "a network needs at least one subnet",
            ));
        }
        for s in &n.subnets {
            if s.name.is_empty() || inventory::parse_cidr(&s.address_prefix).is_none() {
                return Err(Status::invalid_argument(format!(
                    "subnet {:?}: a name and an IPv4 prefix like 10.1.0.0/24 (at most /30) are needed, got {:?}",
                    s.name, s.address_prefix
                )));
            }
        }
        let network = inventory::Network {
            region: n.region,
            resource_group: n.resource_group,
            name: n.name,
            subnets: n
                .subnets
                .into_iter()
                .map(|s| inventory::Subnet {
                    name: s.name,
                    address_prefix: s.address_prefix,
                })
                .collect(),
        };
        let backend = self.engine.backend().clone();
        let created = tokio::task::spawn_blocking(move || backend.create_network(network))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(network_proto(&created)))
    }

    async fn list_networks(
        &self,
        request: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::ListNetworksResponse>, Status> {
        let region = request.into_inner().region;
        let networks = self
            .engine
            .backend()
            .networks((!region.is_empty()).then_some(region.as_str()))?;
        Ok(Response::new(pb::ListNetworksResponse {
            networks: networks.iter().map(network_proto).collect(),
        }))
    }

    async fn list_target_vms(
        &self,
        request: Request<pb::ListTargetVmsRequest>,
    ) -> Result<Response<pb::ListTargetVmsResponse>, Status> {
        let source = request.into_inner().source_vm;
        let vms = self.engine.backend().vms()?;
        Ok(Response::new(pb::ListTargetVmsResponse {
            vms: vms
                .iter()
                .filter(|v| source.is_empty() || v.source_vm == source)
                .map(vm_proto)
                .collect(),
        }))
    }
}
