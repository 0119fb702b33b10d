//! run-plan: a recovery plan's stages in order, each persisted as it ends,
//! so a resumed job (a restart, or `ResumePlan` after a failure) goes on at
//! the first stage that did not succeed. A group's `vms` stage starts one
//! child job per VM and replication group (idempotency key `<job>/<stage>/
//! <name>`, so a resumed stage never starts one twice) and ends when every
//! child has; a script action runs bounded; a manual action waits until the
//! plan is resumed.

use std::sync::Arc;
use std::time::Duration;

use ferry_runtime::Refused;

use super::Result;
use crate::engine::{Engine, VmFailover};
use crate::error::FailoverError;
use crate::jobs::{FailoverKind, JobRecord, JobState, PlanOp, StageKind};
use crate::plans::{ActionKind, When};

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    for i in 0..job.stages.len() {
        if job.stages[i].state == JobState::Succeeded {
            continue;
        }
        job.stages[i].state = JobState::Running;
        engine.jobs.save(job)?;
        let outcome = match job.stages[i].kind.clone() {
            StageKind::Vms => vms(engine, job, i).await,
            StageKind::Action { when, index } => action(engine, job, i, when, index).await,
        };
        job.waiting_for.clear();
        let stage = &mut job.stages[i];
        match outcome {
            Ok(message) => {
                stage.state = JobState::Succeeded;
                stage.message = message;
                engine.jobs.save(job)?;
            }
            Err(e) => {
                let what = format!("group {} {}", stage.group, stage.label);
                if !engine.shutdown.is_cancelled() {
                    stage.state = JobState::Failed;
                    stage.message = e.to_string();
                }
                return Err(Refused::failed_precondition(format!(
                    "{what}: {e}; fix it, then ferry plan resume {}",
                    job.plan
                ))
                .into());
            }
        }
    }
    Ok(format!(
        "{} stage(s) of {} group(s) done",
        job.stages.len(),
        job.plan_groups.len()
    ))
}

/// What the plan does, for scripts: FERRY_DIRECTION.
pub(crate) fn direction(job: &JobRecord) -> &'static str {
    match (job.plan_op, job.failover_kind) {
        (Some(PlanOp::Failover), Some(FailoverKind::Test)) => "test-failover",
        (Some(PlanOp::Failover), Some(FailoverKind::Planned)) => "planned-failover",
        (Some(PlanOp::Failover), _) => "unplanned-failover",
        (Some(PlanOp::Commit), _) => "commit",
        (Some(PlanOp::CleanupTest), _) => "cleanup-test",
        (Some(PlanOp::Reprotect), _) | (None, _) => "reprotect",
    }
}

async fn action(
    engine: &Arc<Engine>,
    job: &mut JobRecord,
    stage: usize,
    when: When,
    index: usize,
) -> Result<String> {
    let g = job.stages[stage].group;
    let group = job
        .plan_groups
        .get(g - 1)
        .ok_or_else(|| FailoverError::Corrupt(format!("plan job {} has no group {g}", job.id)))?;
    let action = match when {
        When::Pre => group.pre.get(index),
        When::Post => group.post.get(index),
    }
    .cloned()
    .ok_or_else(|| FailoverError::Corrupt(format!("plan job {}: no action {index}", job.id)))?;
    match &action.kind {
        ActionKind::Script { script, .. } => {
            let path = engine.plans.script_path(script)?;
            let mut vms: Vec<String> = group.vms.iter().map(|v| v.to_string()).collect();
            for r in &group.replication_groups {
                vms.extend(engine.group(r).await?.members);
            }
            let env = [
                ("FERRY_PLAN", job.plan.clone()),
                ("FERRY_PLAN_GROUP", g.to_string()),
                ("FERRY_VMS", vms.join(",")),
                ("FERRY_DIRECTION", direction(job).to_string()),
                ("FERRY_ACTION", action.name.clone()),
                ("FERRY_WHEN", when.tag().to_string()),
            ];
            let what = format!("{} action {}: script", when.tag(), action.name);
            ferry_runtime::script::run(&path, &env, action.timeout(), &what)
                .await
                .map_err(|e| FailoverError::from(Refused::failed_precondition(e)))?;
            Ok(format!("script {script} succeeded"))
        }
        ActionKind::Manual { text } => {
            // Said in the job while it waits; the permit ResumePlan leaves
            // lets it go on (kept if it comes first).
            job.waiting_for = format!("{}: {text}", action.name);
            engine.jobs.save(job)?;
            let resume = engine.resume_signal(job.id.as_str());
            tokio::select! {
                _ = engine.shutdown.cancelled() => {
                    Err(Refused::unavailable("failover-svc is stopping").into())
                }
                _ = resume.notified() => {
                    // Used: the next manual step waits for a permit of its own.
                    engine.forget_resume(job.id.as_str());
                    Ok(format!("{} confirmed (ferry plan resume)", action.name))
                }
            }
        }
    }
}

async fn vms(engine: &Arc<Engine>, job: &mut JobRecord, stage: usize) -> Result<String> {
    let g = job.stages[stage].group;
    let group =
        job.plan_groups.get(g - 1).cloned().ok_or_else(|| {
            FailoverError::Corrupt(format!("plan job {} has no group {g}", job.id))
        })?;
    let op = job
        .plan_op
        .ok_or_else(|| FailoverError::Corrupt(format!("plan job {} has no operation", job.id)))?;
    let mut children = Vec::new();
    for vm in &group.vms {
        let key = format!("{}/{stage}/{vm}", job.id);
        let started = match op {
            PlanOp::Failover => {
                let kind = failover_kind(job)?;
                engine
                    .start_vm_failover(VmFailover {
                        vm: vm.clone(),
                        kind,
                        choice: job.choice.clone(),
                        test_network: job.test_network.clone(),
                        request_id: key,
                        in_group: false,
                        instant: false,
                        alternate_location: false,
                    })
                    .await
            }
            PlanOp::Commit => engine.commit(vm.clone(), key).await,
            // Nothing to clean up for a VM whose test failover never came.
            PlanOp::CleanupTest if engine.test_vms(vm)?.is_empty() => continue,
            PlanOp::CleanupTest => engine.cleanup_test(vm.clone(), key).await,
            PlanOp::Reprotect => engine.reprotect(vm.clone(), key).await,
        }
        .map_err(|e| child_refused(&format!("VM \"{vm}\""), e))?;
        children.push((format!("VM \"{vm}\""), started.id.to_string()));
    }
    for r in &group.replication_groups {
        let key = format!("{}/{stage}/group:{r}", job.id);
        let started = match op {
            PlanOp::Failover => {
                let kind = failover_kind(job)?;
                engine
                    .start_group_failover(r.clone(), kind, None, job.test_network.clone(), key)
                    .await
            }
            PlanOp::Commit => engine.commit_group(r.clone(), key).await,
            PlanOp::CleanupTest => {
                let members = engine.group(r).await?.members;
                let mut any = false;
                for m in members {
                    if let Ok(vm) = ferry_proto::ids::VmName::parse(m) {
                        any |= !engine.test_vms(&vm)?.is_empty();
                    }
                }
                if !any {
                    continue;
                }
                engine.cleanup_group(r.clone(), key).await
            }
            PlanOp::Reprotect => Err(Refused::failed_precondition(format!(
                "replication group {r:?}: groups are not re-protected"
            ))
            .into()),
        }
        .map_err(|e| child_refused(&format!("replication group {r:?}"), e))?;
        children.push((format!("replication group {r:?}"), started.id.to_string()));
    }
    job.stages[stage].children = children.iter().map(|(_, id)| id.clone()).collect();
    engine.jobs.save(job)?;
    // Every child job to its end.
    loop {
        let mut ended = 0;
        for (what, id) in &children {
            let child = engine
                .jobs
                .get(id)?
                .ok_or_else(|| FailoverError::Corrupt(format!("child job {id} is missing")))?;
            if child.state == JobState::Failed {
                return Err(Refused::failed_precondition(format!(
                    "{what} (job {id}): {}",
                    child.error
                ))
                .into());
            }
            if child.ended() {
                ended += 1;
            }
        }
        if ended == children.len() {
            return Ok(format!("{ended} child job(s) done"));
        }
        tokio::select! {
            _ = engine.shutdown.cancelled() => {
                return Err(Refused::unavailable("failover-svc is stopping").into())
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

fn failover_kind(job: &JobRecord) -> Result<FailoverKind> {
    job.failover_kind
        .ok_or_else(|| FailoverError::Corrupt(format!("plan job {} has no failover kind", job.id)))
}

/// A child job refused at its start, said as the plan's.
fn child_refused(what: &str, e: FailoverError) -> FailoverError {
    let status = tonic::Status::from(e);
    Refused::failed_precondition(format!("{what}: {}", status.message())).into()
}
