//! member-jobs (group): one ordinary VM job is started per member, each
//! with the idempotency key `<group job id>/<vm>`, and recorded as it
//! starts; a resumed group job finds each started member's job by its key
//! and never starts one twice.

use std::sync::Arc;

use ferry_runtime::Refused;

use super::Result;
use crate::engine::{Engine, VmFailover};
use crate::error::FailoverError;
use crate::jobs::{Choice, JobKind, JobRecord};

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    for i in 0..job.members.len() {
        if !job.members[i].job_id.is_empty() {
            continue;
        }
        let m = job.members[i].clone();
        let key = format!("{}/{}", job.id, m.vm_name);
        let started = match (job.kind, job.failover_kind) {
            (JobKind::Commit, _) => engine.commit(m.vm_name.clone(), key).await,
            (JobKind::CleanupTest, _) => engine.cleanup_test(m.vm_name.clone(), key).await,
            (JobKind::Reprotect | JobKind::Plan, _) => {
                return Err(FailoverError::Corrupt(format!(
                    "group job {} is a re-protect or a plan: not a group's",
                    job.id
                )))
            }
            (JobKind::Failover, None) => {
                return Err(FailoverError::Corrupt(format!(
                    "group job {} has no failover kind",
                    job.id
                )))
            }
            (JobKind::Failover, Some(kind)) => {
                // A planned member job drains its VM and takes its final
                // point; the others go to their point at the bookmark.
                let choice = if m.point_id.is_empty() {
                    Choice::Latest
                } else {
                    Choice::Point(m.point_id.clone())
                };
                engine
                    .start_vm_failover(VmFailover {
                        vm: m.vm_name.clone(),
                        kind,
                        choice,
                        test_network: job.test_network.clone(),
                        request_id: key,
                        in_group: true,
                        instant: false,
                        alternate_location: false,
                    })
                    .await
            }
        };
        let member = started.map_err(|e| {
            Refused::failed_precondition(format!("VM {:?}: {e}", m.vm_name.as_str()))
        })?;
        job.members[i].job_id = member.id.to_string();
        engine.jobs.save(job)?;
    }
    Ok(format!("{} member job(s)", job.members.len()))
}
