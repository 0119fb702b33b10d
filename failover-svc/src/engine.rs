//! Failover, commit and test cleanup as jobs of idempotent steps.
//!
//! - Test failover: validate, pin-point, network, materialize-disks,
//!   create-vm. Replication goes on; the VM is created as `<vm>-test` in the
//!   network the user names.
//! - Unplanned failover: validate, fence (FAILOVER_IN_PROGRESS, epoch
//!   raised, so cache-svc stops and refuses the old agent), pin-point,
//!   network, materialize-disks, create-vm, update-registry (FAILED_OVER).
//!   Failing over again before commit changes the recovery point.
//! - Commit: validate, commit-registry (COMMITTED), release-points.
//! - Cleanup of a test failover: validate, delete-vm, release-points.
//!
//! Persistence: a step runs only after the job's record says it is running,
//! and the next one only after this one's outcome is on disk. A save that
//! fails stops the job at once, before any further step: it is then stored
//! as failed (its error says what could not be persisted) if storage takes
//! that write, else it stays as last stored and resumes at its first
//! unfinished step after a restart (steps are idempotent). Either way the
//! error is logged and watchers see the job stopped with it. A failed
//! progress save inside a step fails that step.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::cache::v1 as cache;
use ferry_proto::cache::v1::cache_client::CacheClient;
use ferry_proto::processor::v1 as proc;
use ferry_proto::processor::v1::processor_client::ProcessorClient;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::time::unix_nanos_now;
use ferry_runtime::PeerChannel;
use tokio_util::sync::CancellationToken;

use crate::error::FailoverError;
use crate::inventory::{self, Backend, TargetVm};
use crate::jobs::{Choice, FailoverKind, JobKind, JobRecord, JobState, Jobs, Step, Used, Verified};
use crate::requests::{FailoverRequest, Target};
use crate::verify;
use ferry_proto::ids::{JobId, UnixNanos, VmName};

type Result<T> = std::result::Result<T, FailoverError>;

/// How long "latest" may wait for the source region's cache before an
/// unplanned failover falls back to the latest processed point.
const LATEST_BOUND: Duration = Duration::from_secs(10);
/// Progress is persisted every this many bytes (and published always).
const SAVE_EVERY: u64 = 64 << 20;

/// How long a planned failover waits for the source to drain.
const DRAIN_BOUND: Duration = Duration::from_secs(120);

/// Runs jobs.
pub struct Engine {
    pub(crate) registry: RegistryClient<PeerChannel>,
    /// The source region's cache, for planned failovers (optional).
    pub(crate) cache: Option<CacheClient<PeerChannel>>,
    pub(crate) processor: ProcessorClient<PeerChannel>,
    backend: Arc<dyn Backend>,
    pub(crate) jobs: Arc<Jobs>,
    /// VMs with a job running.
    pub(crate) busy: Mutex<HashSet<String>>,
    /// Bytes per second materialization may write, if capped.
    write_rate: Option<u64>,
    pub(crate) shutdown: CancellationToken,
}

/// The key a job holds in `busy`: its VM, or its group.
fn busy_key(job: &JobRecord) -> String {
    if job.group.is_empty() {
        job.target().to_string()
    } else {
        format!("group:{}", job.group)
    }
}

pub(crate) fn steps(names: &[&str]) -> Vec<Step> {
    names
        .iter()
        .map(|n| Step {
            name: n.to_string(),
            state: JobState::Queued,
            message: String::new(),
        })
        .collect()
}

fn state_name(s: i32) -> String {
    reg::ReplicationState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("REPLICATION_STATE_")
                .to_string()
        })
        .unwrap_or_else(|_| s.to_string())
}

impl Engine {
    pub fn new(
        registry: RegistryClient<PeerChannel>,
        cache: Option<CacheClient<PeerChannel>>,
        processor: ProcessorClient<PeerChannel>,
        backend: Arc<dyn Backend>,
        jobs: Arc<Jobs>,
        write_rate: Option<u64>,
        shutdown: CancellationToken,
    ) -> Arc<Engine> {
        Arc::new(Engine {
            registry,
            cache,
            processor,
            backend,
            jobs,
            busy: Mutex::new(HashSet::new()),
            write_rate,
            shutdown,
        })
    }

    pub fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub(crate) async fn item(&self, vm: &VmName) -> Result<reg::ProtectedItem> {
        let mut registry = self.registry.clone();
        registry
            .get_protected_item(reg::GetProtectedItemRequest {
                vm_name: vm.to_string(),
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => FailoverError::NotFound(format!(
                    "VM \"{vm}\" is not protected (unknown, or its replication is not enabled)"
                )),
                _ => FailoverError::peer("registry", s),
            })
    }

    pub(crate) fn test_vms(&self, vm: &VmName) -> Result<Vec<TargetVm>> {
        Ok(self
            .backend
            .vms()?
            .into_iter()
            .filter(|t| t.source_vm == vm.as_str() && t.test)
            .collect())
    }

    /// Starts a failover job (of a VM, or of a group).
    pub async fn start_failover(self: &Arc<Self>, req: FailoverRequest) -> Result<JobRecord> {
        if let Some(job) = self.jobs.by_request(&req.request_id)? {
            return Ok(job);
        }
        match req.target {
            Target::Vm(vm) => {
                let choice = req.choice.unwrap_or(Choice::LatestProcessed);
                self.start_vm_failover(
                    vm,
                    req.kind,
                    choice,
                    req.test_network,
                    req.request_id,
                    false,
                )
                .await
            }
            Target::Group(g) => {
                self.start_group_failover(g, req.kind, req.choice, req.test_network, req.request_id)
                    .await
            }
        }
    }

    /// Validates one VM's failover and starts its job; `in_group` when a
    /// group job starts it for a member.
    pub(crate) async fn start_vm_failover(
        self: &Arc<Self>,
        vm: VmName,
        kind: FailoverKind,
        choice: Choice,
        test_network: String,
        request_id: String,
        in_group: bool,
    ) -> Result<JobRecord> {
        if let Some(job) = self.jobs.by_request(&request_id)? {
            return Ok(job);
        }
        if kind == FailoverKind::Planned && self.cache.is_none() {
            return Err(FailoverError::FailedPrecondition(
                "failover-svc was started without --cache: a planned failover needs the source \
                 region's cache; use an unplanned failover"
                    .into(),
            ));
        }
        let item = self.item(&vm).await?;
        if !item.replication_group.is_empty() && !in_group {
            return Err(FailoverError::FailedPrecondition(format!(
                "VM \"{vm}\" belongs to replication group {:?}: fail the group over as a whole",
                item.replication_group
            )));
        }
        self.check_failover(&vm, &item, kind, &test_network)?;
        let state = item.state();
        let test = kind == FailoverKind::Test;
        let planned = kind == FailoverKind::Planned;
        if let Choice::Point(id) = &choice {
            self.point(&vm, id).await?;
        }
        let names: &[&str] = if test {
            &[
                "validate",
                "pin-point",
                "network",
                "materialize-disks",
                "create-vm",
            ]
        } else if planned {
            &[
                "validate",
                "drain",
                "fence",
                "pin-point",
                "network",
                "materialize-disks",
                "create-vm",
                "update-registry",
            ]
        } else {
            &[
                "validate",
                "fence",
                "pin-point",
                "network",
                "materialize-disks",
                "create-vm",
                "update-registry",
            ]
        };
        let mut job = JobRecord::new(
            self.jobs.new_id()?,
            JobKind::Failover,
            Some(kind),
            steps(names),
            request_id,
        );
        job.vm_name = Some(vm);
        job.choice = choice;
        job.test_network = test_network;
        job.from_state = state as i32;
        self.admit(job).await
    }

    /// Whether `vm` (its protected item) may be failed over so.
    pub(crate) fn check_failover(
        &self,
        vm: &VmName,
        item: &reg::ProtectedItem,
        kind: FailoverKind,
        test_network: &str,
    ) -> Result<()> {
        use reg::ReplicationState as S;
        let state = item.state();
        let test = kind == FailoverKind::Test;
        let planned = kind == FailoverKind::Planned;
        let allowed = if test {
            matches!(state, S::Protected | S::ResyncRequired | S::Resyncing)
        } else if planned {
            // Every write must reach the replica: nothing may await a resync.
            state == S::Protected
        } else {
            matches!(
                state,
                S::Protected
                    | S::ResyncRequired
                    | S::Resyncing
                    | S::FailoverInProgress
                    | S::FailedOver
            )
        };
        if !allowed {
            return Err(FailoverError::FailedPrecondition(format!(
                "VM \"{vm}\" is {}: {} needs it protected{}",
                state_name(state as i32),
                if test {
                    "a test failover"
                } else {
                    "a failover"
                },
                if test {
                    ""
                } else {
                    " (or failed over, to change the point)"
                }
            )));
        }
        if test {
            if test_network.is_empty() {
                return Err(FailoverError::InvalidArgument(
                    "a test failover needs test_network: an isolated network of the target region"
                        .into(),
                ));
            }
            let region = item
                .target
                .as_ref()
                .map(|t| t.region.clone())
                .unwrap_or_default();
            if self.backend.network(&region, test_network)?.is_none() {
                return Err(FailoverError::NotFound(format!(
                    "test network {test_network:?} does not exist in {region}; create it first"
                )));
            }
            if !self.test_vms(vm)?.is_empty() {
                return Err(FailoverError::FailedPrecondition(format!(
                    "VM \"{vm}\" has a test failover already; clean it up first"
                )));
            }
        }
        Ok(())
    }

    /// Validates a commit and starts its job.
    pub async fn commit(self: &Arc<Self>, vm: VmName, request_id: String) -> Result<JobRecord> {
        if let Some(job) = self.jobs.by_request(&request_id)? {
            return Ok(job);
        }
        let item = self.item(&vm).await?;
        if item.state() != reg::ReplicationState::FailedOver {
            return Err(FailoverError::FailedPrecondition(format!(
                "VM \"{vm}\" is {}: only a failed-over VM can be committed",
                state_name(item.state)
            )));
        }
        let job = self.simple(
            JobKind::Commit,
            vm,
            request_id,
            &["validate", "commit-registry", "release-points"],
            item.state,
        )?;
        self.admit(job).await
    }

    /// Validates a test cleanup and starts its job.
    pub async fn cleanup_test(
        self: &Arc<Self>,
        vm: VmName,
        request_id: String,
    ) -> Result<JobRecord> {
        if let Some(job) = self.jobs.by_request(&request_id)? {
            return Ok(job);
        }
        let item = self.item(&vm).await?;
        if self.test_vms(&vm)?.is_empty() {
            return Err(FailoverError::FailedPrecondition(format!(
                "VM \"{vm}\" has no test failover to clean up"
            )));
        }
        let job = self.simple(
            JobKind::CleanupTest,
            vm,
            request_id,
            &["validate", "delete-vm", "release-points"],
            item.state,
        )?;
        self.admit(job).await
    }

    fn simple(
        &self,
        kind: JobKind,
        vm: VmName,
        request_id: String,
        names: &[&str],
        state: i32,
    ) -> Result<JobRecord> {
        let mut job = JobRecord::new(self.jobs.new_id()?, kind, None, steps(names), request_id);
        job.vm_name = Some(vm);
        job.from_state = state;
        Ok(job)
    }

    /// One job per VM (and per group) at a time; the job is stored before
    /// it runs.
    pub(crate) async fn admit(self: &Arc<Self>, job: JobRecord) -> Result<JobRecord> {
        {
            let mut busy = self
                .busy
                .lock()
                .map_err(|_| FailoverError::Corrupt("busy lock".into()))?;
            if !busy.insert(busy_key(&job)) {
                return Err(FailoverError::FailedPrecondition(if job.group.is_empty() {
                    format!(
                        "a job is running for VM {:?}; wait for it (ferry jobs --watch)",
                        job.target()
                    )
                } else {
                    format!(
                        "a job is running for replication group {:?}; wait for it (ferry jobs --watch)",
                        job.group
                    )
                }));
            }
        }
        if let Err(e) = self.jobs.insert(&job) {
            self.release(&busy_key(&job));
            return Err(e);
        }
        tracing::info!(job = %job.id, target = %job.target(), kind = job.kind.tag(), "job accepted");
        let accepted = job.clone();
        self.spawn_run(job);
        Ok(accepted)
    }

    /// Runs a job in its own task. Not async: a group job's member jobs are
    /// admitted from inside a running job, and spawning here keeps that
    /// recursion out of the futures' types.
    fn spawn_run(self: &Arc<Self>, job: JobRecord) {
        let engine = self.clone();
        tokio::spawn(async move { engine.run(job).await });
    }

    fn release(&self, vm: &str) {
        if let Ok(mut busy) = self.busy.lock() {
            busy.remove(vm);
        }
    }

    /// Resumes every unfinished job (after a restart).
    pub fn resume(self: &Arc<Self>) -> Result<usize> {
        let unfinished = self.jobs.unfinished()?;
        let n = unfinished.len();
        for job in unfinished {
            if let Ok(mut busy) = self.busy.lock() {
                busy.insert(busy_key(&job));
            }
            tracing::info!(job = %job.id, target = %job.target(), "resuming job");
            self.spawn_run(job);
        }
        Ok(n)
    }

    async fn run(self: Arc<Self>, mut job: JobRecord) {
        // What `busy` holds for this job.
        let key = busy_key(&job);
        self.run_steps(&mut job).await;
        self.release(&key);
    }

    /// Runs the job's unfinished steps in order; returns when it has ended,
    /// failed, is stopping, or cannot be persisted.
    async fn run_steps(self: &Arc<Self>, job: &mut JobRecord) {
        job.state = JobState::Running;
        if let Err(e) = self.jobs.save(job) {
            return self.unpersisted(job, None, "start", e);
        }
        for i in 0..job.steps.len() {
            if job.steps[i].state == JobState::Succeeded {
                continue;
            }
            if self.shutdown.is_cancelled() {
                // Resumed at this step after the restart.
                return;
            }
            job.steps[i].state = JobState::Running;
            let name = job.steps[i].name.clone();
            if let Err(e) = self.jobs.save(job) {
                return self.unpersisted(job, Some(i), &format!("start of {name}"), e);
            }
            let outcome = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                outcome = self.step(&name, job) => outcome,
            };
            match outcome {
                Ok(message) => {
                    job.steps[i].state = JobState::Succeeded;
                    job.steps[i].message = message;
                    // The next step runs only once this one's outcome is on disk.
                    if let Err(e) = self.jobs.save(job) {
                        return self.unpersisted(job, Some(i), &format!("outcome of {name}"), e);
                    }
                }
                Err(e) => {
                    tracing::warn!(job = %job.id, step = %name, error = %e, "job failed");
                    job.steps[i].state = JobState::Failed;
                    job.steps[i].message = e.to_string();
                    job.state = JobState::Failed;
                    job.error = format!("{name}: {e}");
                    job.finished_nanos = UnixNanos::now();
                    if let Err(e) = self.jobs.save(job) {
                        // Stored as it was: a restart runs the step again.
                        tracing::error!(job = %job.id, step = %name, error = %e,
                            "cannot persist the job's failure; it resumes at this step after a restart");
                        self.jobs.publish(job);
                    }
                    return;
                }
            }
        }
        job.state = JobState::Succeeded;
        job.finished_nanos = UnixNanos::now();
        if let Err(e) = self.jobs.save(job) {
            // Every step's outcome is stored: a restart only marks it ended.
            tracing::error!(job = %job.id, error = %e,
                "cannot persist the job's success; a restart ends it");
            self.jobs.publish(job);
        }
        tracing::info!(job = %job.id, target = %job.target(), "job succeeded");
    }

    /// A save failed (`what` it was to persist): the job stops here, before
    /// any further step. It is recorded as failed if storage lets us; else
    /// it stays as last stored, to resume at its first unfinished step after
    /// a restart. Either way watchers see it stopped, with the error.
    fn unpersisted(&self, job: &mut JobRecord, step: Option<usize>, what: &str, e: FailoverError) {
        tracing::error!(job = %job.id, error = %e, "cannot persist the {what}; the job stops");
        if let Some(step) = step.and_then(|i| job.steps.get_mut(i)) {
            step.state = JobState::Failed;
            step.message = format!("not persisted: {e}");
        }
        job.state = JobState::Failed;
        job.error = format!("cannot persist the {what}: {e}");
        job.finished_nanos = UnixNanos::now();
        if let Err(again) = self.jobs.save(job) {
            tracing::error!(job = %job.id, error = %again,
                "cannot persist the job as failed either; it resumes after a restart");
            self.jobs.publish(job);
        }
    }

    async fn step(self: &Arc<Self>, name: &str, job: &mut JobRecord) -> Result<String> {
        match name {
            "validate" if !job.group.is_empty() => {
                let g = self.group(&job.group).await?;
                Ok(format!("group {} of {} VMs", g.name, g.members.len()))
            }
            "member-jobs" => self.member_jobs(job).await,
            "members-done" => self.members_done(job).await,
            "validate" => {
                let item = self.item(job.vm()?).await?;
                Ok(format!("VM {} is {}", job.target(), state_name(item.state)))
            }
            "drain" => self.drain(job).await,
            "fence" => {
                self.transition(
                    job.vm()?,
                    reg::ReplicationState::FailoverInProgress,
                    true,
                    "failover",
                )
                .await?;
                Ok("source fenced: epoch raised; cache-svc refuses the old agent".into())
            }
            "pin-point" => self.pin_point(job).await,
            "network" => {
                let (net, subnet) = self.network(job).await?;
                Ok(format!("network {} subnet {}", net.name, subnet.name))
            }
            "materialize-disks" => self.materialize(job).await,
            "create-vm" => self.create_vm(job).await,
            "update-registry" => {
                self.transition(
                    job.vm()?,
                    reg::ReplicationState::FailedOver,
                    false,
                    "failed over",
                )
                .await?;
                self.release_points(job.vm()?, false, Some(&job.id)).await?;
                Ok("FAILED_OVER".into())
            }
            "commit-registry" => {
                self.transition(
                    job.vm()?,
                    reg::ReplicationState::Committed,
                    false,
                    "committed",
                )
                .await?;
                Ok("COMMITTED".into())
            }
            "release-points" => {
                let test = job.kind == JobKind::CleanupTest;
                let n = self.release_points(job.vm()?, test, None).await?;
                Ok(format!("{n} point(s) released"))
            }
            "delete-vm" => {
                let mut deleted = Vec::new();
                for t in self.test_vms(job.vm()?)? {
                    self.backend
                        .delete_vm(&t.region, &t.resource_group, &t.name)?;
                    deleted.push(t.name);
                }
                Ok(format!("deleted {}", deleted.join(", ")))
            }
            other => Err(FailoverError::Corrupt(format!("unknown step {other:?}"))),
        }
    }

    async fn transition(
        &self,
        vm: &VmName,
        to: reg::ReplicationState,
        bump: bool,
        reason: &str,
    ) -> Result<()> {
        let mut registry = self.registry.clone();
        registry
            .transition_state(reg::TransitionStateRequest {
                vm_name: vm.to_string(),
                to: to as i32,
                bump_epoch: bump,
                reason: reason.to_string(),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|s| FailoverError::peer("registry", s))
    }

    async fn point(&self, vm: &VmName, id: &str) -> Result<proc::RecoveryPoint> {
        let mut p = self.processor.clone();
        p.get_recovery_point(proc::GetRecoveryPointRequest {
            vm_name: vm.to_string(),
            point_id: id.to_string(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| match s.code() {
            tonic::Code::NotFound => FailoverError::NotFound(format!(
                "VM \"{vm}\" has no recovery point {id:?} (unknown or expired); see ferry points {vm}"
            )),
            _ => FailoverError::peer("processor", s),
        })
    }

    async fn newest(&self, vm: &VmName, kind: proc::PointKind) -> Result<proc::RecoveryPoint> {
        let mut p = self.processor.clone();
        p.list_recovery_points(proc::ListRecoveryPointsRequest {
            vm_name: vm.to_string(),
            kind: kind as i32,
            limit: 1,
            ..Default::default()
        })
        .await
        .map_err(|s| FailoverError::peer("processor", s))?
        .into_inner()
        .points
        .into_iter()
        .next()
        .ok_or_else(|| {
            FailoverError::NotFound(format!(
                "VM \"{vm}\" has no {} recovery point",
                match kind {
                    proc::PointKind::AppConsistent => "app-consistent",
                    proc::PointKind::MultiVm => "multi-VM",
                    _ => "processed",
                }
            ))
        })
    }

    /// The point cut at this job's FINAL marker, if it exists.
    async fn final_point(&self, job: &JobRecord) -> Result<Option<proc::RecoveryPoint>> {
        let mut p = self.processor.clone();
        let points = p
            .list_recovery_points(proc::ListRecoveryPointsRequest {
                vm_name: job.vm()?.to_string(),
                ..Default::default()
            })
            .await
            .map_err(|s| FailoverError::peer("processor", s))?
            .into_inner()
            .points;
        Ok(points
            .into_iter()
            .find(|p| p.bookmark_id == job.id.as_str()))
    }

    /// A planned failover: the agent stops taking writes, sends everything
    /// and a FINAL marker; the processor cuts a point at it.
    async fn drain(&self, job: &JobRecord) -> Result<String> {
        let drained = |p: proc::RecoveryPoint| {
            format!(
                "source drained; final point {} at sequence {}",
                p.id, p.sequence_cut
            )
        };
        if let Some(p) = self.final_point(job).await? {
            return Ok(drained(p));
        }
        let mut cache = self.cache.clone().ok_or_else(|| {
            FailoverError::FailedPrecondition("failover-svc has no --cache".into())
        })?;
        cache
            .send_control(cache::SendControlRequest {
                vm_name: job.vm()?.to_string(),
                control: Some(cache::send_control_request::Control::Stop(cache::Stop {
                    reason: format!("planned failover (job {})", job.id),
                    final_marker_id: job.id.to_string(),
                })),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::FailedPrecondition => FailoverError::FailedPrecondition(format!(
                    "the source agent of {:?} is not streaming, so it cannot drain ({}); use an \
                     unplanned failover",
                    job.target(),
                    s.message()
                )),
                _ => FailoverError::peer("cache (drain)", s),
            })?;
        let deadline = tokio::time::Instant::now() + DRAIN_BOUND;
        loop {
            if let Some(p) = self.final_point(job).await? {
                return Ok(drained(p));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(FailoverError::Unavailable(format!(
                    "the source did not drain within {DRAIN_BOUND:?}; use an unplanned failover"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn pin_point(&self, job: &mut JobRecord) -> Result<String> {
        let vm = job.vm()?.clone();
        let mut note = String::new();
        let planned = job.failover_kind == Some(FailoverKind::Planned);
        let point = match job.points.first() {
            // Resumed: the same point again.
            Some(used) => self.point(&vm, &used.point_id).await?,
            None if planned => self.final_point(job).await?.ok_or_else(|| {
                FailoverError::FailedPrecondition("the final point of the drain is missing".into())
            })?,
            None => match &job.choice {
                Choice::Point(id) => self.point(&vm, id).await?,
                Choice::LatestProcessed => self.newest(&vm, proc::PointKind::Unspecified).await?,
                Choice::LatestAppConsistent => {
                    self.newest(&vm, proc::PointKind::AppConsistent).await?
                }
                Choice::LatestMultiVm => self.newest(&vm, proc::PointKind::MultiVm).await?,
                Choice::Latest => {
                    let mut p = self.processor.clone();
                    let cut = tokio::time::timeout(
                        LATEST_BOUND,
                        p.cut_recovery_point(proc::CutRecoveryPointRequest {
                            vm_name: vm.to_string(),
                        }),
                    )
                    .await;
                    match cut {
                        Ok(Ok(point)) => point.into_inner(),
                        Ok(Err(s)) if job.is_test() => {
                            return Err(FailoverError::peer("processor (latest)", s))
                        }
                        outcome => {
                            note = format!(
                                " (latest unavailable: {}; used the latest processed point)",
                                match outcome {
                                    Ok(Err(s)) => s.message().to_string(),
                                    _ => format!("no answer within {LATEST_BOUND:?}"),
                                }
                            );
                            self.newest(&vm, proc::PointKind::Unspecified).await?
                        }
                    }
                }
            },
        };
        let mut p = self.processor.clone();
        p.pin_recovery_point(proc::PinRecoveryPointRequest {
            vm_name: vm.to_string(),
            point_id: point.id.clone(),
            holder: job.id.to_string(),
        })
        .await
        .map_err(|s| FailoverError::peer("processor (pin)", s))?;
        let time_nanos = point
            .time
            .as_ref()
            .and_then(UnixNanos::from_timestamp)
            .unwrap_or_default();
        if job.points.is_empty() {
            job.points.push(Used {
                vm_name: vm.clone(),
                point_id: point.id.clone(),
                time_nanos,
                // Planned: the source took no write after the final point.
                data_loss_nanos: if planned {
                    0
                } else {
                    UnixNanos::now().get().saturating_sub(time_nanos.get())
                },
            });
            job.bytes_total = point.disks.iter().map(|d| d.size_bytes).sum();
        }
        Ok(format!(
            "point {} (sequence {}){note}",
            point.id, point.sequence_cut
        ))
    }

    /// The network and subnet the VM joins: the named test network, or the
    /// item's target network (created with a /24 around the source's first
    /// NIC if missing).
    async fn network(&self, job: &JobRecord) -> Result<(inventory::Network, inventory::Subnet)> {
        let item = self.item(job.vm()?).await?;
        let target = item.target.clone().unwrap_or_default();
        let net = if job.is_test() {
            self.backend
                .network(&target.region, &job.test_network)?
                .ok_or_else(|| {
                    FailoverError::NotFound(format!(
                        "test network {:?} does not exist in {}",
                        job.test_network, target.region
                    ))
                })?
        } else {
            match self
                .backend
                .network(&target.region, &target.virtual_network)?
            {
                Some(n) => n,
                None => {
                    let ip = item
                        .source
                        .as_ref()
                        .and_then(|v| v.nics.first())
                        .map(|n| n.private_ip.clone())
                        .unwrap_or_default();
                    self.backend.create_network(inventory::Network {
                        region: target.region.clone(),
                        resource_group: target.resource_group.clone(),
                        name: target.virtual_network.clone(),
                        subnets: vec![inventory::Subnet {
                            name: target.subnet.clone(),
                            address_prefix: inventory::subnet_around(&ip),
                        }],
                    })?
                }
            }
        };
        let subnet = if job.is_test() {
            net.subnets.first().cloned()
        } else {
            net.subnets
                .iter()
                .find(|s| s.name == target.subnet)
                .cloned()
        }
        .ok_or_else(|| {
            FailoverError::FailedPrecondition(format!(
                "network {} has no subnet {:?}",
                net.name, target.subnet
            ))
        })?;
        Ok((net, subnet))
    }

    fn target_names(
        &self,
        job: &JobRecord,
        item: &reg::ProtectedItem,
    ) -> (String, Vec<(String, String)>) {
        let test = job.is_test();
        let suffix = if test { "-test" } else { "" };
        let target = item.target.clone().unwrap_or_default();
        let disks = item
            .source
            .as_ref()
            .map(|v| v.disks.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|d| {
                let name = target
                    .replica_disks
                    .iter()
                    .find(|r| r.disk_id == d.id)
                    .map(|r| r.name.clone())
                    .unwrap_or_else(|| format!("{}-{}", item.vm_name, d.id));
                (d.id, format!("{name}{suffix}"))
            })
            .collect();
        (format!("{}{suffix}", item.vm_name), disks)
    }

    async fn materialize(&self, job: &mut JobRecord) -> Result<String> {
        let item = self.item(job.vm()?).await?;
        let target = item.target.clone().unwrap_or_default();
        let used = job
            .points
            .first()
            .cloned()
            .ok_or_else(|| FailoverError::Corrupt("no point pinned".into()))?;
        let point = self.point(job.vm()?, &used.point_id).await?;
        let (_, names) = self.target_names(job, &item);
        job.bytes_done = 0;
        job.bytes_total = point.disks.iter().map(|d| d.size_bytes).sum();
        let started = std::time::Instant::now();
        let mut saved = 0u64;
        let mut written = 0u64;
        // Rewritten whole when the step runs again.
        job.verified.clear();
        for disk in &point.disks {
            let name = names
                .iter()
                .find(|(id, _)| *id == disk.disk_id)
                .map(|(_, n)| n.clone())
                .unwrap_or_else(|| format!("{}-{}", job.target(), disk.disk_id));
            // Never replace a disk another VM's failover made.
            let place = self
                .backend
                .disk_path(&target.region, &target.resource_group, &name);
            if let Some(owner) =
                self.backend.vms()?.into_iter().find(|v| {
                    v.source_vm != job.target() && v.disks.iter().any(|d| d.path == place)
                })
            {
                return Err(FailoverError::AlreadyExists(format!(
                    "target disk {name:?} in {}/{} belongs to VM {:?} (failed over from {:?}); \
                     VM {:?} cannot use it",
                    target.region,
                    target.resource_group,
                    owner.name,
                    owner.source_vm,
                    job.target()
                )));
            }
            let path = self.backend.prepare_disk(
                &target.region,
                &target.resource_group,
                &name,
                disk.size_bytes,
            )?;
            let file = Arc::new(inventory::open_disk(&path)?);
            let mut p = self.processor.clone();
            let mut extents = p
                .read_disk(proc::ReadDiskRequest {
                    vm_name: job.vm()?.to_string(),
                    point_id: point.id.clone(),
                    disk_id: disk.disk_id.clone(),
                    offset: 0,
                    length: 0,
                })
                .await
                .map_err(|s| FailoverError::peer("processor (read disk)", s))?
                .into_inner();
            // Writes go to a blocking writer through a short queue, so that
            // receiving the next extent overlaps writing this one.
            let (queue, mut pending) = tokio::sync::mpsc::channel(4);
            let writer = {
                let (f, p2) = (file.clone(), path.clone());
                tokio::task::spawn_blocking(move || -> Result<()> {
                    while let Some((at, data)) = pending.blocking_recv() {
                        let data: Vec<u8> = data;
                        f.write_all_at(&data, at)
                            .map_err(|e| FailoverError::io(&p2, e))?;
                    }
                    f.sync_all().map_err(|e| FailoverError::io(&p2, e))
                })
            };
            let mut coverage = verify::Coverage::new(&disk.disk_id, disk.size_bytes);
            while let Some(extent) = extents
                .message()
                .await
                .map_err(|s| FailoverError::peer("processor (read disk)", s))?
            {
                let data_len = match &extent.content {
                    Some(proc::disk_extent::Content::Data(d)) => Some(d.len() as u64),
                    _ => None,
                };
                coverage.extent(extent.offset, extent.length, data_len)?;
                if let Some(proc::disk_extent::Content::Data(data)) = extent.content {
                    if crc32c::crc32c(&data) != extent.crc32c {
                        return Err(FailoverError::Unavailable(format!(
                            "extent at {} of disk {} arrived damaged; retry the job",
                            extent.offset, disk.disk_id
                        )));
                    }
                    let n = data.len() as u64;
                    if queue.send((extent.offset, data.to_vec())).await.is_err() {
                        // The writer stopped: its error says why.
                        break;
                    }
                    written += n;
                    if let Some(rate) = self.write_rate {
                        // Paced: never ahead of the cap.
                        let due = Duration::from_secs_f64(written as f64 / rate as f64);
                        if let Some(ahead) = due.checked_sub(started.elapsed()) {
                            tokio::time::sleep(ahead).await;
                        }
                    }
                }
                job.bytes_done += extent.length;
                self.jobs.publish(job);
                if job.bytes_done - saved >= SAVE_EVERY {
                    saved = job.bytes_done;
                    self.jobs.save(job)?;
                }
            }
            drop(queue);
            writer
                .await
                .map_err(|e| FailoverError::Corrupt(e.to_string()))??;
            coverage.finish()?;
            job.verified
                .push(self.check_digest(job, &point.id, disk, &path).await?);
        }
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        Ok(format!(
            "{} disk(s), {} MiB in {secs:.2} s ({:.0} MiB/s)",
            point.disks.len(),
            job.bytes_total >> 20,
            job.bytes_total as f64 / (1 << 20) as f64 / secs
        ))
    }

    /// The image written at `path` must have the point's digest: computed
    /// by the processor from its index, here over the file as it is on disk.
    async fn check_digest(
        &self,
        job: &JobRecord,
        point_id: &str,
        disk: &proc::DiskSize,
        path: &std::path::Path,
    ) -> Result<Verified> {
        let mut p = self.processor.clone();
        let want = p
            .get_disk_digest(proc::GetDiskDigestRequest {
                vm_name: job.vm()?.to_string(),
                point_id: point_id.to_string(),
                disk_id: disk.disk_id.clone(),
            })
            .await
            .map_err(|s| FailoverError::peer("processor (disk digest)", s))?
            .into_inner();
        if want.algorithm != ferry_proto::digest::ALGORITHM || want.size_bytes != disk.size_bytes {
            return Err(FailoverError::FailedPrecondition(format!(
                "disk {}: the processor's digest is {} of {} bytes; this failover-svc checks {} \
                 of {} bytes",
                disk.disk_id,
                want.algorithm,
                want.size_bytes,
                ferry_proto::digest::ALGORITHM,
                disk.size_bytes
            )));
        }
        let (file, size, chunk) = (path.to_path_buf(), disk.size_bytes, want.chunk_bytes);
        let got = tokio::task::spawn_blocking(move || verify::image_digest(&file, size, chunk))
            .await
            .map_err(|e| FailoverError::Corrupt(e.to_string()))??;
        let (want_hex, got_hex) = (
            ferry_proto::digest::hex(&want.sha256),
            ferry_proto::digest::hex(&got),
        );
        if want.sha256.as_ref() as &[u8] != got.as_slice() {
            return Err(FailoverError::DataLoss(format!(
                "disk {} as written at {} has digest {got_hex}, but point {point_id} has \
                 {want_hex}: the image is not the point's disk; it is not used",
                disk.disk_id,
                path.display()
            )));
        }
        tracing::info!(vm = %job.target(), disk = %disk.disk_id, point = point_id, sha256 = %got_hex, "disk verified end to end");
        Ok(Verified {
            vm_name: job.vm()?.clone(),
            disk_id: disk.disk_id.clone(),
            point_id: point_id.to_string(),
            path: path.display().to_string(),
            size_bytes: disk.size_bytes,
            algorithm: want.algorithm,
            sha256: got_hex,
        })
    }

    async fn create_vm(&self, job: &mut JobRecord) -> Result<String> {
        let item = self.item(job.vm()?).await?;
        let target = item.target.clone().unwrap_or_default();
        let (net, subnet) = self.network(job).await?;
        let (name, disk_names) = self.target_names(job, &item);
        let used = job.points.first().cloned().unwrap_or(Used {
            vm_name: job.vm()?.clone(),
            point_id: String::new(),
            time_nanos: UnixNanos(0),
            data_loss_nanos: 0,
        });
        let point = self.point(job.vm()?, &used.point_id).await?;
        // Addresses other VMs hold in this subnet.
        let mut taken: Vec<String> = self
            .backend
            .vms()?
            .into_iter()
            .filter(|v| {
                !(v.name == name
                    && v.region == target.region
                    && v.resource_group == target.resource_group)
            })
            .flat_map(|v| {
                v.nics
                    .into_iter()
                    .filter(|n| n.subnet == subnet.name)
                    .map(|n| n.private_ip)
            })
            .collect();
        let mut nics = Vec::new();
        for nic in item
            .source
            .as_ref()
            .map(|v| v.nics.clone())
            .unwrap_or_default()
        {
            let ip = inventory::assign_ip(&subnet.address_prefix, &nic.private_ip, &taken)
                .ok_or_else(|| {
                    FailoverError::FailedPrecondition(format!(
                        "subnet {} has no free address",
                        subnet.name
                    ))
                })?;
            taken.push(ip.clone());
            nics.push(inventory::Nic {
                name: nic.name,
                subnet: subnet.name.clone(),
                private_ip: ip,
            });
        }
        // In the source VM's disk order.
        let order: Vec<String> = item
            .source
            .as_ref()
            .map(|v| v.disks.iter().map(|d| d.id.clone()).collect())
            .unwrap_or_default();
        let mut point_disks = point.disks.clone();
        point_disks.sort_by_key(|d| {
            order
                .iter()
                .position(|id| *id == d.disk_id)
                .unwrap_or(usize::MAX)
        });
        let disks = point_disks
            .iter()
            .map(|d| {
                let disk_name = disk_names
                    .iter()
                    .find(|(id, _)| *id == d.disk_id)
                    .map(|(_, n)| n.clone())
                    .unwrap_or_default();
                let path =
                    self.backend
                        .disk_path(&target.region, &target.resource_group, &disk_name);
                inventory::Disk {
                    disk_id: d.disk_id.clone(),
                    name: disk_name,
                    size_bytes: d.size_bytes,
                    path,
                }
            })
            .collect();
        let vm = TargetVm {
            region: target.region.clone(),
            resource_group: target.resource_group.clone(),
            name: name.clone(),
            source_vm: job.target().to_string(),
            virtual_network: net.name.clone(),
            availability_set: target.availability_set.clone(),
            nics,
            disks,
            point_id: point.id.clone(),
            test: job.is_test(),
            job_id: job.id.to_string(),
            created_nanos: unix_nanos_now(),
        };
        let ips: Vec<String> = vm.nics.iter().map(|n| n.private_ip.clone()).collect();
        self.backend.put_vm(vm)?;
        Ok(format!(
            "VM {name} in {}/{} at {}",
            target.region,
            target.resource_group,
            ips.join(", ")
        ))
    }

    /// Unpins the points this VM's earlier failover jobs pinned (test ones,
    /// or the others), except `keep`'s; how many.
    async fn release_points(&self, vm: &VmName, test: bool, keep: Option<&JobId>) -> Result<usize> {
        let mut n = 0;
        for job in self.jobs.list(Some(vm.as_str()), usize::MAX)? {
            let is_test = job.is_test();
            if job.kind != JobKind::Failover || is_test != test || Some(&job.id) == keep {
                continue;
            }
            // A group job's points are its members'; only this VM's here.
            for used in job.points.iter().filter(|u| u.vm_name == *vm) {
                let mut p = self.processor.clone();
                match p
                    .unpin_recovery_point(proc::UnpinRecoveryPointRequest {
                        vm_name: vm.to_string(),
                        point_id: used.point_id.clone(),
                        holder: job.id.to_string(),
                    })
                    .await
                {
                    Ok(_) => n += 1,
                    Err(s) if s.code() == tonic::Code::NotFound => {}
                    Err(s) => return Err(FailoverError::peer("processor (unpin)", s)),
                }
            }
        }
        Ok(n)
    }
}
