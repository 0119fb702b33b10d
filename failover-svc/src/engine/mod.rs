//! Failover, commit and test cleanup as jobs of idempotent steps, after
//! ASR's flow (each job's step list is in [`steps`], as data):
//!
//! - Test failover: validate, pin-point, network, materialize-disks,
//!   create-vm, start-vm. Replication goes on; the VM is created as `<vm>-test` in the
//!   network the user names.
//! - Unplanned failover: validate, fence (FAILOVER_IN_PROGRESS, epoch
//!   raised, so cache-svc stops and refuses the old agent), pin-point,
//!   network, materialize-disks, create-vm, start-vm, update-registry
//!   (FAILED_OVER).
//!   Failing over again before commit changes the recovery point.
//! - Planned failover: validate, drain (the source agent sends every write
//!   and a FINAL marker; the point cut there loses nothing), then as
//!   unplanned from fence on.
//! - Instant failover (of any kind, one VM onto a libvirt region): as above
//!   with serve-disks (the point served over NBD, a qcow2 overlay on each
//!   disk) in place of materialize-disks, and hydrate last (the overlays
//!   filled while the VM runs; the job ends when it runs from local images
//!   only).
//! - Commit: validate, commit-registry (COMMITTED), release-points.
//! - Cleanup of a test failover: validate, delete-vm, release-points.
//! - A replication group's job: validate, member-jobs, members-done
//!   (see `group.rs`).
//!
//! This module admits jobs (one per VM or group at a time: the busy set),
//! runs their steps in order and resumes unfinished ones after a restart.
//! What it asks of other services goes through [`peers::Peers`].
//!
//! Persistence: a step runs only after the job's record says it is running,
//! and the next one only after this one's outcome is on disk. A save that
//! fails stops the job at once, before any further step: it is then stored
//! as failed (its error says what could not be persisted) if storage takes
//! that write, else it stays as last stored and resumes at its first
//! unfinished step after a restart (steps are idempotent). Either way the
//! error is logged and watchers see the job stopped with it. A failed
//! progress save inside a step fails that step.

pub mod peers;
pub mod steps;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::ids::{UnixNanos, VmName};
use ferry_runtime::Refused;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::error::FailoverError;
use crate::inventory::{Backend, TargetVm};
use crate::jobs::{Choice, FailoverKind, JobKind, JobRecord, JobState, Jobs};
use crate::requests::{FailoverRequest, Target};
use peers::{Item, Peers, Point, PointKind, ReplicationState};
use steps::Step;

type Result<T> = std::result::Result<T, FailoverError>;

/// Runs jobs.
pub struct Engine {
    pub(crate) peers: Arc<dyn Peers>,
    backend: Arc<dyn Backend>,
    pub(crate) jobs: Arc<Jobs>,
    /// VMs (and groups) with a job running.
    busy: Mutex<HashSet<String>>,
    /// Bytes per second materialization may write, if capped.
    pub(crate) write_rate: Option<u64>,
    /// How long start-vm waits for a started VM to be ready.
    pub(crate) start_timeout: Duration,
    /// Serving points to instantly failed-over VMs; None: instant failover
    /// is off.
    pub(crate) instant: Option<crate::point_exports::InstantFailover>,
    /// The jobs' tasks and the backend calls they made: waited for at
    /// shutdown, so nothing of the engine outlives the service.
    tasks: tokio_util::task::TaskTracker,
    pub(crate) shutdown: CancellationToken,
    /// Recovery plans.
    pub(crate) plans: Arc<crate::plans::Plans>,
    /// Plan jobs told to go on past a manual action, by job id (a permit
    /// is kept if the job is not waiting yet).
    pub(crate) resumes: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Notify>>>,
}

/// One VM's failover as the engine starts it: asked for, or a group
/// member's (`in_group`).
pub(crate) struct VmFailover {
    pub vm: VmName,
    pub kind: FailoverKind,
    pub choice: Choice,
    pub test_network: String,
    pub request_id: String,
    pub in_group: bool,
    /// On overlays of the served point, then hydrated.
    pub instant: bool,
    /// Failback of a re-protected VM as a new VM, not into the original
    /// disks.
    pub alternate_location: bool,
}

/// The key a job holds in `busy`: its VM, or its group.
fn busy_key(job: &JobRecord) -> String {
    match &job.vm_name {
        Some(vm) => vm.to_string(),
        None if !job.plan.is_empty() => format!("plan:{}", job.plan),
        None => format!("group:{}", job.group),
    }
}

/// A registry state as messages show it (`PROTECTED`).
pub(crate) fn state_name(s: ReplicationState) -> &'static str {
    s.as_str_name().trim_start_matches("REPLICATION_STATE_")
}

/// How the engine's steps behave: the materialize cap, start-vm's wait,
/// instant failover's means.
pub struct Tuning {
    /// Bytes per second materialization may write, if capped.
    pub write_rate: Option<u64>,
    /// How long start-vm waits for a started VM to be ready.
    pub start_timeout: Duration,
    /// Serving points to instantly failed-over VMs; None: off.
    pub instant: Option<crate::point_exports::InstantFailover>,
}

impl Engine {
    pub fn new(
        peers: Arc<dyn Peers>,
        backend: Arc<dyn Backend>,
        jobs: Arc<Jobs>,
        plans: Arc<crate::plans::Plans>,
        tuning: Tuning,
        shutdown: CancellationToken,
    ) -> Arc<Engine> {
        let Tuning {
            write_rate,
            start_timeout,
            instant,
        } = tuning;
        Arc::new(Engine {
            peers,
            backend,
            jobs,
            busy: Mutex::new(HashSet::new()),
            write_rate,
            start_timeout,
            instant,
            tasks: tokio_util::task::TaskTracker::new(),
            shutdown,
            plans,
            resumes: Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// After shutdown: waits (at most `within`) for the jobs' tasks and
    /// their backend calls to end, so that the engine's records are closed
    /// when failover-svc returns (a restart in the same process opens them
    /// again). A call still running then is logged and left.
    pub async fn stopped(&self, within: Duration) {
        self.tasks.close();
        if tokio::time::timeout(within, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.tasks.len(),
                ?within,
                "failover-svc stopped with backend calls still running"
            );
        }
    }

    /// Instant failover's means; FAILED_PRECONDITION when it is off.
    pub(crate) fn instant(&self) -> Result<&crate::point_exports::InstantFailover> {
        self.instant.as_ref().ok_or_else(|| {
            Refused::failed_precondition(
                "instant failover is off: it needs the libvirt backend with \
                 [failover.libvirt] nbd_listen set",
            )
            .into()
        })
    }

    pub fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Runs `f` on the backend off the async threads: a hypervisor backend
    /// blocks on its host.
    pub(crate) async fn on_backend<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Backend) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let backend = self.backend.clone();
        self.tasks
            .spawn_blocking(move || f(backend.as_ref()))
            .await
            .map_err(|e| Refused::unavailable(format!("backend call ended abnormally: {e}")))?
    }

    /// A protected VM; NOT_FOUND names what to do.
    pub(crate) async fn item(&self, vm: &VmName) -> Result<Item> {
        self.peers.item(vm).await.map_err(|e| match e.peer_code() {
            Some(tonic::Code::NotFound) => Refused::not_found(format!(
                "VM \"{vm}\" is not protected (unknown, or its replication is not enabled)"
            ))
            .into(),
            _ => e,
        })
    }

    /// A VM's point; NOT_FOUND names what to do.
    pub(crate) async fn point(&self, vm: &VmName, id: &str) -> Result<Point> {
        self.peers.point(vm, id).await.map_err(|e| match e.peer_code() {
            Some(tonic::Code::NotFound) => Refused::not_found(format!(
                "VM \"{vm}\" has no recovery point {id:?} (unknown or expired); see ferry points {vm}"
            )).into(),
            _ => e,
        })
    }

    /// A VM's newest point of a kind.
    pub(crate) async fn newest(&self, vm: &VmName, kind: PointKind) -> Result<Point> {
        self.peers
            .points(vm, kind, 1)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                Refused::not_found(format!(
                    "VM \"{vm}\" has no {} recovery point",
                    match kind {
                        PointKind::AppConsistent => "app-consistent",
                        PointKind::MultiVm => "multi-VM",
                        PointKind::Any => "processed",
                    }
                ))
                .into()
            })
    }

    /// The test VMs a test failover of `vm` made.
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
                self.start_vm_failover(VmFailover {
                    vm,
                    kind: req.kind,
                    choice,
                    test_network: req.test_network,
                    request_id: req.request_id,
                    in_group: false,
                    instant: req.instant,
                    alternate_location: req.alternate_location,
                })
                .await
            }
            Target::Group(_) if req.instant => Err(Refused::failed_precondition(
                "instant failover is of one VM: fail a replication group over without instant",
            )
            .into()),
            Target::Group(g) => {
                self.start_group_failover(g, req.kind, req.choice, req.test_network, req.request_id)
                    .await
            }
        }
    }

    /// Validates one VM's failover and starts its job.
    pub(crate) async fn start_vm_failover(self: &Arc<Self>, req: VmFailover) -> Result<JobRecord> {
        let VmFailover {
            vm,
            kind,
            choice,
            test_network,
            request_id,
            in_group,
            instant,
            alternate_location,
        } = req;
        if let Some(job) = self.jobs.by_request(&request_id)? {
            return Ok(job);
        }
        if kind == FailoverKind::Planned && !self.peers.has_cache() {
            return Err(Refused::failed_precondition(
                "failover-svc was started without --cache: a planned failover needs the source \
                 region's cache; use an unplanned failover",
            )
            .into());
        }
        let item = self.item(&vm).await?;
        if !item.replication_group.is_empty() && !in_group {
            return Err(Refused::failed_precondition(format!(
                "VM \"{vm}\" belongs to replication group {:?}: fail the group over as a whole",
                item.replication_group
            ))
            .into());
        }
        self.check_failover(&vm, &item, kind, &test_network)?;
        if instant {
            self.instant()?;
            if !self.backend.starts_vms(&item.target.region) {
                return Err(Refused::failed_precondition(format!(
                    "VM \"{vm}\" fails over to {}, which is not a libvirt region: instant \
                     failover needs a hypervisor to hydrate its disks; fail over without instant",
                    item.target.region
                ))
                .into());
            }
        }
        if alternate_location && item.reprotection.is_none() {
            return Err(Refused::failed_precondition(format!(
                "VM \"{vm}\" was not re-protected: alternate location is a choice of failback only"
            ))
            .into());
        }
        let original_location = kind != FailoverKind::Test
            && !instant
            && !alternate_location
            && crate::reprotect::originals_exist(&item);
        if original_location {
            crate::reprotect::originals_free(&item)?;
        }
        if kind != FailoverKind::Test {
            // Nothing is fenced or drained while the target's processor
            // cannot be asked for the point.
            self.reachable_processor(&vm, &item).await?;
        }
        if let Choice::Point(id) = &choice {
            self.point(&vm, id).await?;
        }
        let mut job = JobRecord::new(
            self.jobs.new_id()?,
            JobKind::Failover,
            Some(kind),
            steps::failover(kind, instant),
            request_id,
        );
        job.instant = instant;
        job.original_location = original_location;
        job.vm_name = Some(vm);
        job.choice = choice;
        job.test_network = test_network;
        job.from_state = item.state as i32;
        self.admit(job).await
    }

    /// Whether `vm` (its protected item) may be failed over so.
    pub(crate) fn check_failover(
        &self,
        vm: &VmName,
        item: &Item,
        kind: FailoverKind,
        test_network: &str,
    ) -> Result<()> {
        use ReplicationState as S;
        let state = item.state;
        let test = kind == FailoverKind::Test;
        let allowed = match kind {
            FailoverKind::Test => matches!(state, S::Protected | S::ResyncRequired | S::Resyncing),
            // Every write must reach the replica: nothing may await a resync.
            FailoverKind::Planned => state == S::Protected,
            FailoverKind::Unplanned => matches!(
                state,
                S::Protected
                    | S::ResyncRequired
                    | S::Resyncing
                    | S::FailoverInProgress
                    | S::FailedOver
            ),
        };
        if !allowed {
            return Err(Refused::failed_precondition(format!(
                "VM \"{vm}\" is {}: {} needs it protected{}",
                state_name(state),
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
            ))
            .into());
        }
        if test {
            if test_network.is_empty() {
                return Err(Refused::invalid_argument(
                    "a test failover needs test_network: an isolated network of the target region",
                )
                .into());
            }
            let region = &item.target.region;
            if self.backend.network(region, test_network)?.is_none() {
                return Err(Refused::not_found(format!(
                    "test network {test_network:?} does not exist in {region}; create it first"
                ))
                .into());
            }
            if !self.test_vms(vm)?.is_empty() {
                return Err(Refused::failed_precondition(format!(
                    "VM \"{vm}\" has a test failover already; clean it up first"
                ))
                .into());
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
        if item.state != ReplicationState::FailedOver {
            return Err(Refused::failed_precondition(format!(
                "VM \"{vm}\" is {}: only a failed-over VM can be committed",
                state_name(item.state)
            ))
            .into());
        }
        let job = self.vm_job(JobKind::Commit, vm, request_id, steps::COMMIT, &item)?;
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
            return Err(Refused::failed_precondition(format!(
                "VM \"{vm}\" has no test failover to clean up"
            ))
            .into());
        }
        let job = self.vm_job(
            JobKind::CleanupTest,
            vm,
            request_id,
            steps::CLEANUP_TEST,
            &item,
        )?;
        self.admit(job).await
    }

    fn vm_job(
        &self,
        kind: JobKind,
        vm: VmName,
        request_id: String,
        steps: &[Step],
        item: &Item,
    ) -> Result<JobRecord> {
        let mut job = JobRecord::new(self.jobs.new_id()?, kind, None, steps, request_id);
        job.vm_name = Some(vm);
        job.from_state = item.state as i32;
        Ok(job)
    }

    /// One job per VM (and per group) at a time; the job is stored before
    /// it runs.
    pub(crate) async fn admit(self: &Arc<Self>, mut job: JobRecord) -> Result<JobRecord> {
        // The job continues the trace it was asked for in: the request's
        // (an operator's `ferry failover`), or the group job's step for a
        // member job.
        if job.traceparent.is_empty() {
            job.traceparent =
                ferry_runtime::trace_context::traceparent_of(&tracing::Span::current())
                    .unwrap_or_default();
        }
        {
            let mut busy = self
                .busy
                .lock()
                .map_err(|_| FailoverError::Corrupt("busy lock".into()))?;
            if !busy.insert(busy_key(&job)) {
                return Err(Refused::failed_precondition(match &job.vm_name {
                    Some(vm) => format!(
                        "a job is running for VM \"{vm}\"; wait for it (ferry jobs --watch)"
                    ),
                    None => format!(
                        "a job is running for replication group {:?}; wait for it (ferry jobs --watch)",
                        job.group
                    ),
                }).into());
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

    /// Runs an ended job again from its first step that did not succeed
    /// (a plan resumed after a failure), as one job per key at a time.
    pub(crate) fn rerun(self: &Arc<Self>, mut job: JobRecord) -> Result<JobRecord> {
        {
            let mut busy = self
                .busy
                .lock()
                .map_err(|_| FailoverError::Corrupt("busy lock".into()))?;
            if !busy.insert(busy_key(&job)) {
                return Err(Refused::failed_precondition(format!(
                    "a job is running for {}; wait for it (ferry jobs --watch)",
                    job.target()
                ))
                .into());
            }
        }
        for s in &mut job.steps {
            if s.state != JobState::Succeeded {
                s.state = JobState::Queued;
            }
        }
        job.state = JobState::Queued;
        job.error.clear();
        job.finished_nanos = UnixNanos(0);
        if let Err(e) = self.jobs.save(&job) {
            self.release(&busy_key(&job));
            return Err(e);
        }
        let again = job.clone();
        self.spawn_run(job);
        Ok(again)
    }

    /// Runs a job in its own task. Not async: a group job's member jobs are
    /// admitted from inside a running job, and spawning here keeps that
    /// recursion out of the futures' types.
    fn spawn_run(self: &Arc<Self>, job: JobRecord) {
        let engine = self.clone();
        self.tasks.spawn(async move { engine.run(job).await });
    }

    fn release(&self, key: &str) {
        if let Ok(mut busy) = self.busy.lock() {
            busy.remove(key);
        }
    }

    /// Resumes every unfinished job (after a restart).
    pub fn resume(self: &Arc<Self>) -> Result<usize> {
        let (unfinished, damaged) = self.jobs.unfinished()?;
        // A damaged record is never guessed at (its kind could fence a
        // source); it is kept for inspection, said loudly, and the other
        // jobs resume.
        for (key, e) in damaged {
            tracing::error!(job = %key, error = %e, "stored job is damaged: not resumed, kept as it is");
        }
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
        let key = busy_key(&job);
        self.run_steps(&mut job).await;
        self.release(&key);
    }

    /// Runs the job's unfinished steps in order; returns when it has ended,
    /// failed, is stopping, or cannot be persisted.
    async fn run_steps(self: &Arc<Self>, job: &mut JobRecord) {
        // One trace per job: each run (the first, a resumed one) is a span
        // of the trace the job was asked for in, or of its own.
        let resumed = job.steps.iter().any(|s| s.state != JobState::Queued);
        let run = tracing::info_span!(
            parent: None,
            "ferry.failover.job",
            job = %job.id,
            kind = job.kind.tag(),
            failover = job.failover_kind.map_or("", |k| k.tag()),
            target = %job.target(),
            resumed,
            outcome = tracing::field::Empty,
        );
        if job.traceparent.is_empty() {
            job.traceparent =
                ferry_runtime::trace_context::traceparent_of(&run).unwrap_or_default();
        } else {
            ferry_runtime::batch_trace::continue_trace(&run, &job.traceparent);
        }
        self.run_traced(job, &run).await;
        // "running" when it stopped for a shutdown, to resume after it.
        run.record("outcome", job.state.tag());
    }

    async fn run_traced(self: &Arc<Self>, job: &mut JobRecord, run: &tracing::Span) {
        // A resumed instant failover serves its point again: its VM may
        // be running on it.
        if let (Some(instant), Some(vm)) = (&self.instant, &job.vm_name) {
            steps::serve_again(instant, vm, job);
        }
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
            let step = job.steps[i].step;
            if let Err(e) = self.jobs.save(job) {
                return self.unpersisted(job, Some(i), &format!("start of {step}"), e);
            }
            let span = tracing::info_span!(
                parent: run,
                "ferry.failover.step",
                job = %job.id,
                step = %step,
                outcome = tracing::field::Empty,
            );
            let outcome = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                outcome = step.run(self, job).instrument(span.clone()) => outcome,
            };
            span.record(
                "outcome",
                if outcome.is_ok() {
                    "succeeded"
                } else {
                    "failed"
                },
            );
            match outcome {
                Ok(message) => {
                    job.steps[i].state = JobState::Succeeded;
                    job.steps[i].message = message;
                    // The next step runs only once this one's outcome is on disk.
                    if let Err(e) = self.jobs.save(job) {
                        return self.unpersisted(job, Some(i), &format!("outcome of {step}"), e);
                    }
                }
                Err(e) if self.shutdown.is_cancelled() => {
                    // A step that ends because failover-svc is stopping
                    // (start-vm's and hydrate's waits) has not failed: the
                    // job resumes at it after the restart.
                    tracing::info!(job = %job.id, %step, error = %e, "step stopped by shutdown; it resumes");
                    return;
                }
                Err(e) => {
                    tracing::warn!(job = %job.id, %step, error = %e, "job failed");
                    job.steps[i].state = JobState::Failed;
                    job.steps[i].message = e.to_string();
                    job.state = JobState::Failed;
                    job.error = format!("{step}: {e}");
                    job.finished_nanos = UnixNanos::now();
                    if let Err(e) = self.jobs.save(job) {
                        // Stored as it was: a restart runs the step again.
                        tracing::error!(job = %job.id, %step, error = %e,
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
}
