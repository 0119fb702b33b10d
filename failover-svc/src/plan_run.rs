//! Recovery plans' operations: their edits checked against registry (a VM
//! of a plan is protected and outside replication groups, a replication
//! group exists), and their jobs started and resumed. A plan's job is one
//! job (kind `plan`, steps validate and run-plan) whose stages are, for
//! each group in order, its pre actions, its VMs' child jobs and its post
//! actions; actions run for failovers only (test, planned, unplanned),
//! commit, cleanup-test and re-protect go group by group without them.

use std::sync::Arc;

use ferry_proto::ids::VmName;
use ferry_runtime::Refused;

use crate::engine::{steps, Engine};
use crate::error::FailoverError;
use crate::jobs::{Choice, FailoverKind, JobKind, JobRecord, JobState, PlanOp, Stage, StageKind};
use crate::plans::{Action, Plan, PlanGroup, When};

type Result<T> = std::result::Result<T, FailoverError>;

/// A plan's job asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRequest {
    pub plan: String,
    pub op: PlanOp,
    /// For a failover.
    pub kind: Option<FailoverKind>,
    pub choice: Option<Choice>,
    pub test_network: String,
    pub request_id: String,
}

/// The stages of `plan`'s job for `op`.
fn stages(plan: &Plan, op: PlanOp) -> Vec<Stage> {
    let stage = |group: usize, kind: StageKind, label: String| Stage {
        group,
        kind,
        label,
        state: JobState::Queued,
        message: String::new(),
        children: Vec::new(),
    };
    let actions = op == PlanOp::Failover;
    let mut out = Vec::new();
    for (i, g) in plan.groups.iter().enumerate() {
        let n = i + 1;
        let add = |when: When, list: &[Action], out: &mut Vec<Stage>| {
            if actions {
                for (index, a) in list.iter().enumerate() {
                    out.push(stage(
                        n,
                        StageKind::Action { when, index },
                        format!("{}:{}", when.tag(), a.name),
                    ));
                }
            }
        };
        add(When::Pre, &g.pre, &mut out);
        out.push(stage(n, StageKind::Vms, "vms".into()));
        add(When::Post, &g.post, &mut out);
    }
    out
}

impl Engine {
    pub async fn create_plan(&self, name: &str) -> Result<Plan> {
        self.plans.create(name)
    }

    pub fn plan(&self, name: &str) -> Result<Plan> {
        self.plans.get(name)
    }

    pub fn list_plans(&self) -> Result<Vec<Plan>> {
        self.plans.list()
    }

    /// The running job of plan `name`, if any.
    fn running_plan_job(&self, name: &str) -> Result<Option<JobRecord>> {
        let (unfinished, _) = self.jobs.unfinished()?;
        Ok(unfinished
            .into_iter()
            .find(|j| j.kind == JobKind::Plan && j.plan == name))
    }

    pub fn delete_plan(&self, name: &str) -> Result<()> {
        self.plans.get(name)?;
        if let Some(job) = self.running_plan_job(name)? {
            return Err(Refused::failed_precondition(format!(
                "plan {name:?} has a job running ({}); let it end first",
                job.id
            ))
            .into());
        }
        self.plans.delete(name)
    }

    /// Appends a group of protected VMs (outside replication groups) and
    /// existing replication groups.
    pub async fn add_plan_group(
        &self,
        name: &str,
        vms: Vec<VmName>,
        groups: Vec<String>,
    ) -> Result<Plan> {
        let plan = self.plans.get(name)?;
        for vm in &vms {
            let item = self.item(vm).await?;
            if !item.replication_group.is_empty() {
                return Err(Refused::invalid_argument(format!(
                    "VM \"{vm}\" is in replication group {:?}: add the group instead",
                    item.replication_group
                ))
                .into());
            }
        }
        for g in &groups {
            let group = self.group(g).await?;
            // A member the plan holds by name already would be in two groups.
            for m in &group.members {
                if let Some(at) = plan.group_of(m) {
                    return Err(Refused::invalid_argument(format!(
                        "VM {m:?} of replication group {g:?} is already in group {at} of plan \
                         {name:?}"
                    ))
                    .into());
                }
            }
        }
        self.plans.add_group(
            name,
            PlanGroup {
                vms,
                replication_groups: groups,
                pre: Vec::new(),
                post: Vec::new(),
            },
        )
    }

    pub fn add_plan_action(
        &self,
        name: &str,
        group: usize,
        when: When,
        action: Action,
    ) -> Result<Plan> {
        self.plans.add_action(name, group, when, action)
    }

    /// Validates a plan's job and starts it.
    pub async fn start_plan(self: &Arc<Self>, req: PlanRequest) -> Result<JobRecord> {
        if let Some(job) = self.jobs.by_request(&req.request_id)? {
            return Ok(job);
        }
        let plan = self.plans.get(&req.plan)?;
        if plan.groups.is_empty() {
            return Err(Refused::failed_precondition(format!(
                "plan {:?} has no groups (ferry plan add-group)",
                plan.name
            ))
            .into());
        }
        // A VM in two running plans would be failed over twice.
        let (unfinished, _) = self.jobs.unfinished()?;
        for other in unfinished.iter().filter(|j| j.kind == JobKind::Plan) {
            if other.plan == plan.name {
                return Err(Refused::failed_precondition(format!(
                    "plan {:?} has a job running ({}); wait for it, or ferry plan resume {}",
                    plan.name, other.id, plan.name
                ))
                .into());
            }
            for g in &other.plan_groups {
                for vm in &g.vms {
                    if plan.group_of(vm.as_str()).is_some() {
                        return Err(Refused::failed_precondition(format!(
                            "VM \"{vm}\" is also in plan {:?}, whose job {} is running",
                            other.plan, other.id
                        ))
                        .into());
                    }
                }
                for r in &g.replication_groups {
                    if plan.group_of_replication_group(r).is_some() {
                        return Err(Refused::failed_precondition(format!(
                            "replication group {r:?} is also in plan {:?}, whose job {} is \
                             running",
                            other.plan, other.id
                        ))
                        .into());
                    }
                }
            }
        }
        match req.op {
            PlanOp::Failover => {
                let kind = req
                    .kind
                    .ok_or_else(|| Refused::invalid_argument("a plan failover needs its kind"))?;
                for g in &plan.groups {
                    for vm in &g.vms {
                        let item = self.item(vm).await?;
                        self.check_failover(vm, &item, kind, &req.test_network)?;
                        if kind != FailoverKind::Test {
                            self.reachable_processor(vm, &item).await?;
                        }
                    }
                }
                if let Some(Choice::Point(_)) = req.choice {
                    return Err(Refused::invalid_argument(
                        "a plan fails every VM over to the same kind of point: latest, \
                         latest-processed, latest-app or latest-multi-vm",
                    )
                    .into());
                }
            }
            PlanOp::Reprotect => {
                if let Some(g) = plan
                    .groups
                    .iter()
                    .find(|g| !g.replication_groups.is_empty())
                {
                    return Err(Refused::failed_precondition(format!(
                        "plan {:?} holds replication group {:?}: groups are not re-protected",
                        plan.name, g.replication_groups[0]
                    ))
                    .into());
                }
            }
            PlanOp::Commit | PlanOp::CleanupTest => {}
        }
        let mut job = JobRecord::new(
            self.jobs.new_id()?,
            JobKind::Plan,
            req.kind.filter(|_| req.op == PlanOp::Failover),
            steps::PLAN,
            req.request_id,
        );
        job.plan = plan.name.clone();
        job.plan_op = Some(req.op);
        job.stages = stages(&plan, req.op);
        job.plan_groups = plan.groups;
        job.choice = match req.choice {
            // Standalone VMs: the newest processed point stands for a
            // multi-VM one.
            Some(Choice::LatestMultiVm) | None => Choice::LatestProcessed,
            Some(c) => c,
        };
        job.test_network = req.test_network;
        self.admit(job).await
    }

    /// The permit a plan job's manual action waits for.
    pub(crate) fn resume_signal(&self, job: &str) -> Arc<tokio::sync::Notify> {
        match self.resumes.lock() {
            Ok(mut r) => r.entry(job.to_string()).or_default().clone(),
            Err(_) => Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Drops a plan job's resume permit once its manual step went on.
    pub(crate) fn forget_resume(&self, job: &str) {
        if let Ok(mut r) = self.resumes.lock() {
            r.remove(job);
        }
    }

    /// Goes on with plan `name`'s job: past the manual action it waits at,
    /// or, when it failed, from the stage that failed.
    pub async fn resume_plan(self: &Arc<Self>, name: &str) -> Result<JobRecord> {
        self.plans.get(name)?;
        if let Some(job) = self.running_plan_job(name)? {
            let live = self.jobs.live(&job);
            if live.waiting_for.is_empty() {
                return Err(Refused::failed_precondition(format!(
                    "plan {name:?}'s job {} is running and waits for no manual action",
                    live.id
                ))
                .into());
            }
            self.resume_signal(live.id.as_str()).notify_one();
            tracing::info!(plan = name, job = %live.id, "plan resumed past a manual action");
            return Ok(live);
        }
        let last = self
            .jobs
            .list(None, usize::MAX)?
            .into_iter()
            .find(|j| j.kind == JobKind::Plan && j.plan == name);
        match last {
            Some(mut job) if job.state == JobState::Failed => {
                for s in &mut job.stages {
                    if s.state != JobState::Succeeded {
                        s.state = JobState::Queued;
                        s.message.clear();
                    }
                }
                tracing::info!(plan = name, job = %job.id, "plan resumed after a failure");
                self.rerun(job)
            }
            _ => Err(Refused::failed_precondition(format!(
                "plan {name:?} has no job waiting at a manual action or failed"
            ))
            .into()),
        }
    }
}
