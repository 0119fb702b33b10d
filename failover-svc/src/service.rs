//! The gRPC face of failover-svc.

use std::sync::Arc;

use ferry_proto::failover::v1 as pb;
use ferry_proto::failover::v1::failover_server::Failover;
use ferry_runtime::security::audit;
use ferry_runtime::Refused;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use ferry_proto::ids::{UnixNanos, VmName};

use crate::engine::Engine;
use crate::error::FailoverError;
use crate::inventory;
use crate::jobs::{Choice, FailoverKind, JobKind, JobRecord, JobState, PlanOp};
use crate::plans::{Action, ActionKind, Plan, When};
use crate::requests::{FailoverRequest, JobRequest, Target};

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
    Refused::invalid_argument("set vm_name or replication_group").into()
}

fn vm_target(vm: String) -> Result<Target, FailoverError> {
    VmName::parse(vm)
        .map(Target::Vm)
        .map_err(|e| Refused::invalid_argument(e.to_string()).into())
}

fn group_target(group: String) -> Result<Target, FailoverError> {
    if group.is_empty() {
        return Err(Refused::invalid_argument("replication_group is empty").into());
    }
    Ok(Target::Group(group))
}

impl TryFrom<pb::StartFailoverRequest> for FailoverRequest {
    type Error = FailoverError;

    fn try_from(req: pb::StartFailoverRequest) -> Result<Self, FailoverError> {
        let kind = match pb::FailoverKind::try_from(req.kind) {
            Ok(pb::FailoverKind::Test) => FailoverKind::Test,
            Ok(pb::FailoverKind::Planned) => FailoverKind::Planned,
            Ok(pb::FailoverKind::Unplanned) => FailoverKind::Unplanned,
            Ok(pb::FailoverKind::Unspecified) | Err(_) => {
                return Err(
                    Refused::invalid_argument("kind is unset: TEST, PLANNED or UNPLANNED").into(),
                )
            }
        };
        use pb::point_choice::Choice as C;
        let choice = match req.point.and_then(|p| p.choice) {
            None => None,
            Some(C::Latest(_)) => Some(Choice::Latest),
            Some(C::LatestProcessed(_)) => Some(Choice::LatestProcessed),
            Some(C::LatestAppConsistent(_)) => Some(Choice::LatestAppConsistent),
            Some(C::LatestMultiVm(_)) => Some(Choice::LatestMultiVm),
            Some(C::PointId(id)) if id.is_empty() => {
                return Err(Refused::invalid_argument("point_id is empty").into())
            }
            Some(C::PointId(id)) => Some(Choice::Point(id)),
        };
        let target = match req.target {
            Some(pb::start_failover_request::Target::VmName(vm)) => vm_target(vm)?,
            Some(pb::start_failover_request::Target::ReplicationGroup(g)) => group_target(g)?,
            None => return Err(no_target()),
        };
        Ok(FailoverRequest {
            target,
            kind,
            choice,
            test_network: req.test_network,
            request_id: req.request_id,
            instant: req.instant,
            alternate_location: req.alternate_location,
        })
    }
}

impl TryFrom<pb::CommitFailoverRequest> for JobRequest {
    type Error = FailoverError;

    fn try_from(req: pb::CommitFailoverRequest) -> Result<Self, FailoverError> {
        use pb::commit_failover_request::Target as T;
        let target = match req.target {
            Some(T::VmName(vm)) => vm_target(vm)?,
            Some(T::ReplicationGroup(g)) => group_target(g)?,
            None => return Err(no_target()),
        };
        Ok(JobRequest {
            target,
            request_id: req.request_id,
        })
    }
}

impl TryFrom<pb::CleanupTestFailoverRequest> for JobRequest {
    type Error = FailoverError;

    fn try_from(req: pb::CleanupTestFailoverRequest) -> Result<Self, FailoverError> {
        use pb::cleanup_test_failover_request::Target as T;
        let target = match req.target {
            Some(T::VmName(vm)) => vm_target(vm)?,
            Some(T::ReplicationGroup(g)) => group_target(g)?,
            None => return Err(no_target()),
        };
        Ok(JobRequest {
            target,
            request_id: req.request_id,
        })
    }
}

impl From<JobKind> for pb::JobKind {
    fn from(k: JobKind) -> pb::JobKind {
        match k {
            JobKind::Failover => pb::JobKind::Failover,
            JobKind::Commit => pb::JobKind::Commit,
            JobKind::CleanupTest => pb::JobKind::CleanupTest,
            JobKind::Reprotect => pb::JobKind::Reprotect,
            JobKind::Plan => pb::JobKind::Plan,
        }
    }
}

impl From<PlanOp> for pb::PlanOperation {
    fn from(o: PlanOp) -> pb::PlanOperation {
        match o {
            PlanOp::Failover => pb::PlanOperation::Failover,
            PlanOp::Commit => pb::PlanOperation::Commit,
            PlanOp::CleanupTest => pb::PlanOperation::CleanupTest,
            PlanOp::Reprotect => pb::PlanOperation::Reprotect,
        }
    }
}

impl From<FailoverKind> for pb::FailoverKind {
    fn from(k: FailoverKind) -> pb::FailoverKind {
        match k {
            FailoverKind::Test => pb::FailoverKind::Test,
            FailoverKind::Planned => pb::FailoverKind::Planned,
            FailoverKind::Unplanned => pb::FailoverKind::Unplanned,
        }
    }
}

impl From<JobState> for pb::JobState {
    fn from(s: JobState) -> pb::JobState {
        match s {
            JobState::Queued => pb::JobState::Queued,
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
        }
    }
}

impl From<&JobRecord> for pb::Job {
    fn from(job: &JobRecord) -> pb::Job {
        let state = |s: JobState| pb::JobState::from(s) as i32;
        pb::Job {
            id: job.id.to_string(),
            kind: pb::JobKind::from(job.kind) as i32,
            failover_kind: job
                .failover_kind
                .map_or(pb::FailoverKind::Unspecified, pb::FailoverKind::from)
                as i32,
            vm_names: match &job.vm_name {
                Some(vm) => vec![vm.to_string()],
                None => job.members.iter().map(|m| m.vm_name.to_string()).collect(),
            },
            replication_group: job.group.clone(),
            state: state(job.state),
            // A plan's job shows its stages after its steps.
            steps: job
                .steps
                .iter()
                .map(|s| pb::JobStep {
                    name: s.step.name().to_string(),
                    state: state(s.state),
                    message: s.message.clone(),
                })
                .chain(job.stages.iter().map(|s| pb::JobStep {
                    name: format!("group {} {}", s.group, s.label),
                    state: state(s.state),
                    message: s.message.clone(),
                }))
                .collect(),
            bytes_done: job.bytes_done,
            bytes_total: job.bytes_total,
            points: job
                .points
                .iter()
                .map(|u| pb::UsedPoint {
                    vm_name: u.vm_name.to_string(),
                    point_id: u.point_id.clone(),
                    time: Some(u.time_nanos.to_timestamp()),
                    data_loss_window: Some(ferry_runtime::time::to_duration(
                        std::time::Duration::from_nanos(u.data_loss_nanos),
                    )),
                })
                .collect(),
            error: job.error.clone(),
            request_id: job.request_id.clone(),
            created_at: Some(job.created_nanos.to_timestamp()),
            finished_at: (job.finished_nanos > UnixNanos(0))
                .then(|| job.finished_nanos.to_timestamp()),
            verified_disks: job
                .verified
                .iter()
                .map(|v| pb::VerifiedDisk {
                    vm_name: v.vm_name.to_string(),
                    disk_id: v.disk_id.clone(),
                    point_id: v.point_id.clone(),
                    path: v.path.clone(),
                    size_bytes: v.size_bytes,
                    algorithm: v.algorithm.clone(),
                    sha256: v.sha256.clone(),
                })
                .collect(),
            instant: job.instant,
            original_location: job.original_location,
            bytes_written: job.bytes_written,
            plan: job.plan.clone(),
            plan_operation: job
                .plan_op
                .map_or(pb::PlanOperation::Unspecified, pb::PlanOperation::from)
                as i32,
            child_jobs: job
                .stages
                .iter()
                .flat_map(|s| s.children.iter().cloned())
                .collect(),
            waiting_for: job.waiting_for.clone(),
        }
    }
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
                mac_address: n.mac_address.map(|m| m.to_string()).unwrap_or_default(),
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
        host: v.host.clone(),
        domain: v.domain.clone(),
        console_path: v.console_path.clone(),
    }
}

/// What a job request acts on, for the audit trail.
fn audited(target: &Target) -> audit::Target {
    match target {
        Target::Vm(vm) => audit::Target::vm(vm.as_str()),
        Target::Group(group) => audit::Target::group(group),
    }
}

fn plan_proto(p: &Plan) -> pb::RecoveryPlan {
    let action = |a: &Action| pb::PlanAction {
        name: a.name.clone(),
        kind: Some(match &a.kind {
            ActionKind::Script {
                script,
                timeout_secs,
            } => pb::plan_action::Kind::Script(pb::ScriptAction {
                script: script.clone(),
                timeout_seconds: *timeout_secs,
            }),
            ActionKind::Manual { text } => {
                pb::plan_action::Kind::Manual(pb::ManualAction { text: text.clone() })
            }
        }),
    };
    pb::RecoveryPlan {
        name: p.name.clone(),
        groups: p
            .groups
            .iter()
            .map(|g| pb::PlanGroup {
                vm_names: g.vms.iter().map(|v| v.to_string()).collect(),
                replication_groups: g.replication_groups.clone(),
                pre: g.pre.iter().map(action).collect(),
                post: g.post.iter().map(action).collect(),
            })
            .collect(),
        created_at: Some(p.created_nanos.to_timestamp()),
    }
}

impl TryFrom<pb::PlanAction> for Action {
    type Error = FailoverError;

    fn try_from(a: pb::PlanAction) -> Result<Self, FailoverError> {
        let kind = match a.kind {
            Some(pb::plan_action::Kind::Script(s)) => ActionKind::Script {
                script: s.script,
                timeout_secs: s.timeout_seconds,
            },
            Some(pb::plan_action::Kind::Manual(m)) => ActionKind::Manual { text: m.text },
            None => {
                return Err(
                    Refused::invalid_argument("an action is a script or a manual action").into(),
                )
            }
        };
        Ok(Action { name: a.name, kind })
    }
}

impl TryFrom<pb::StartPlanRequest> for crate::plan_run::PlanRequest {
    type Error = FailoverError;

    fn try_from(req: pb::StartPlanRequest) -> Result<Self, FailoverError> {
        let op = match pb::PlanOperation::try_from(req.operation) {
            Ok(pb::PlanOperation::Failover) => PlanOp::Failover,
            Ok(pb::PlanOperation::Commit) => PlanOp::Commit,
            Ok(pb::PlanOperation::CleanupTest) => PlanOp::CleanupTest,
            Ok(pb::PlanOperation::Reprotect) => PlanOp::Reprotect,
            _ => {
                return Err(Refused::invalid_argument(
                    "operation is unset: FAILOVER, COMMIT, CLEANUP_TEST or REPROTECT",
                )
                .into())
            }
        };
        let (kind, choice) = if op == PlanOp::Failover {
            // The failover's fields, checked as StartFailover's.
            let f = FailoverRequest::try_from(pb::StartFailoverRequest {
                target: Some(pb::start_failover_request::Target::ReplicationGroup(
                    "plan".into(),
                )),
                kind: req.kind,
                point: req.point,
                test_network: req.test_network.clone(),
                ..Default::default()
            })?;
            if f.kind == FailoverKind::Test && req.test_network.is_empty() {
                return Err(Refused::invalid_argument(
                    "a test failover needs test_network: an isolated network of the target region",
                )
                .into());
            }
            (Some(f.kind), f.choice)
        } else {
            (None, None)
        };
        if req.plan.is_empty() {
            return Err(Refused::invalid_argument("plan is empty").into());
        }
        Ok(crate::plan_run::PlanRequest {
            plan: req.plan,
            op,
            kind,
            choice,
            test_network: req.test_network,
            request_id: req.request_id,
        })
    }
}

#[tonic::async_trait]
impl Failover for FailoverService {
    async fn create_plan(
        &self,
        request: Request<pb::CreatePlanRequest>,
    ) -> Result<Response<pb::RecoveryPlan>, Status> {
        let name = request.into_inner().name;
        let plan = self.engine.create_plan(&name).await?;
        Ok(Response::new(plan_proto(&plan)))
    }

    async fn get_plan(
        &self,
        request: Request<pb::GetPlanRequest>,
    ) -> Result<Response<pb::RecoveryPlan>, Status> {
        let plan = self.engine.plan(&request.into_inner().name)?;
        Ok(Response::new(plan_proto(&plan)))
    }

    async fn list_plans(
        &self,
        _request: Request<pb::ListPlansRequest>,
    ) -> Result<Response<pb::ListPlansResponse>, Status> {
        let plans = self.engine.list_plans()?;
        Ok(Response::new(pb::ListPlansResponse {
            plans: plans.iter().map(plan_proto).collect(),
        }))
    }

    async fn delete_plan(
        &self,
        request: Request<pb::DeletePlanRequest>,
    ) -> Result<Response<pb::DeletePlanResponse>, Status> {
        self.engine.delete_plan(&request.into_inner().name)?;
        Ok(Response::new(pb::DeletePlanResponse {}))
    }

    async fn add_plan_group(
        &self,
        request: Request<pb::AddPlanGroupRequest>,
    ) -> Result<Response<pb::RecoveryPlan>, Status> {
        let req = request.into_inner();
        let vms = req
            .vm_names
            .into_iter()
            .map(|v| VmName::parse(v).map_err(|e| Refused::invalid_argument(e.to_string())))
            .collect::<Result<Vec<_>, _>>()
            .map_err(FailoverError::from)?;
        let plan = self
            .engine
            .add_plan_group(&req.plan, vms, req.replication_groups)
            .await?;
        Ok(Response::new(plan_proto(&plan)))
    }

    async fn add_plan_action(
        &self,
        request: Request<pb::AddPlanActionRequest>,
    ) -> Result<Response<pb::RecoveryPlan>, Status> {
        let req = request.into_inner();
        let when = match pb::ActionWhen::try_from(req.when) {
            Ok(pb::ActionWhen::Pre) => When::Pre,
            Ok(pb::ActionWhen::Post) => When::Post,
            _ => return Err(Status::invalid_argument("when is unset: PRE or POST")),
        };
        let action = Action::try_from(
            req.action
                .ok_or_else(|| Status::invalid_argument("action is missing"))?,
        )?;
        let plan = self
            .engine
            .add_plan_action(&req.plan, req.group as usize, when, action)?;
        Ok(Response::new(plan_proto(&plan)))
    }

    async fn start_plan(
        &self,
        request: Request<pb::StartPlanRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let audit = audit::slot(&request);
        let req = crate::plan_run::PlanRequest::try_from(request.into_inner())?;
        let job = self.engine.start_plan(req).await?;
        audit.add(audit::Target::job(job.id.as_str()));
        Ok(Response::new(pb::Job::from(&job)))
    }

    async fn resume_plan(
        &self,
        request: Request<pb::ResumePlanRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let job = self.engine.resume_plan(&request.into_inner().plan).await?;
        Ok(Response::new(pb::Job::from(&job)))
    }

    async fn start_failover(
        &self,
        request: Request<pb::StartFailoverRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let audit = audit::slot(&request);
        let req = FailoverRequest::try_from(request.into_inner())?;
        audit.set(audited(&req.target));
        let job = self.engine.start_failover(req).await?;
        audit.add(audit::Target::job(job.id.as_str()));
        Ok(Response::new(pb::Job::from(&job)))
    }

    async fn commit_failover(
        &self,
        request: Request<pb::CommitFailoverRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let audit = audit::slot(&request);
        let req = JobRequest::try_from(request.into_inner())?;
        audit.set(audited(&req.target));
        let job = match req.target {
            Target::Vm(vm) => self.engine.commit(vm, req.request_id).await?,
            Target::Group(g) => self.engine.commit_group(g, req.request_id).await?,
        };
        audit.add(audit::Target::job(job.id.as_str()));
        Ok(Response::new(pb::Job::from(&job)))
    }

    async fn cleanup_test_failover(
        &self,
        request: Request<pb::CleanupTestFailoverRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let audit = audit::slot(&request);
        let req = JobRequest::try_from(request.into_inner())?;
        audit.set(audited(&req.target));
        let job = match req.target {
            Target::Vm(vm) => self.engine.cleanup_test(vm, req.request_id).await?,
            Target::Group(g) => self.engine.cleanup_group(g, req.request_id).await?,
        };
        audit.add(audit::Target::job(job.id.as_str()));
        Ok(Response::new(pb::Job::from(&job)))
    }

    async fn reprotect(
        &self,
        request: Request<pb::ReprotectRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let audit = audit::slot(&request);
        let req = request.into_inner();
        let target = vm_target(req.vm_name)?;
        audit.set(audited(&target));
        let Target::Vm(vm) = target else {
            return Err(no_target().into());
        };
        let job = self.engine.reprotect(vm, req.request_id).await?;
        audit.add(audit::Target::job(job.id.as_str()));
        Ok(Response::new(pb::Job::from(&job)))
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
            .ok_or_else(|| Refused::not_found(format!("no job {id:?}")))?;
        Ok(Response::new(pb::Job::from(&self.engine.jobs().live(&job))))
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
            jobs: jobs
                .iter()
                .map(|j| pb::Job::from(&self.engine.jobs().live(j)))
                .collect(),
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
            .ok_or_else(|| Refused::not_found(format!("no job {id:?}")))?;
        let (tx, rx) = mpsc::channel(16);
        let shutdown = self.shutdown.clone();
        let Some(mut changes) = self.engine.jobs().watch(&job) else {
            return Err(Status::internal("job watchers unavailable"));
        };
        tokio::spawn(async move {
            // The job as it is now, then each change until it ends.
            let mut current = changes.borrow_and_update().clone();
            loop {
                if tx.send(Ok(pb::Job::from(&current))).await.is_err() || current.ended() {
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
        audit::target(
            &request,
            audit::Target::network(
                request
                    .get_ref()
                    .network
                    .as_ref()
                    .map(|n| format!("{}/{}", n.region, n.name))
                    .unwrap_or_default(),
            ),
        );
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

    async fn delete_network(
        &self,
        request: Request<pb::DeleteNetworkRequest>,
    ) -> Result<Response<pb::Network>, Status> {
        audit::target(
            &request,
            audit::Target::network(format!(
                "{}/{}",
                request.get_ref().region,
                request.get_ref().name
            )),
        );
        let pb::DeleteNetworkRequest { region, name } = request.into_inner();
        for (field, value) in [("region", &region), ("name", &name)] {
            if value.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "network {field} is empty"
                )));
            }
        }
        let deleted = self
            .engine
            .on_backend({
                let (region, name) = (region.clone(), name.clone());
                move |b| b.delete_network(&region, &name)
            })
            .await?
            .ok_or_else(|| {
                Status::not_found(format!("network {name:?} does not exist in {region}"))
            })?;
        Ok(Response::new(network_proto(&deleted)))
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
