//! members-done (group): follows the member jobs until all have ended;
//! progress is their sum. A failed member fails the group job and releases
//! the group job's own pins.

use std::sync::Arc;
use std::time::Duration;

use ferry_runtime::Refused;

use super::Result;
use crate::engine::Engine;
use crate::error::FailoverError;
use crate::jobs::{JobRecord, JobState};

/// Follows the member jobs until all have ended; progress is their sum.
pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    loop {
        let (mut done, mut total, mut ended) = (0u64, 0u64, 0usize);
        let mut points = Vec::new();
        for m in &job.members {
            let member = engine.jobs.get(&m.job_id)?.ok_or_else(|| {
                FailoverError::Corrupt(format!("member job {} is missing", m.job_id))
            })?;
            if member.state == JobState::Failed {
                engine.unpin_all(job).await;
                return Err(Refused::failed_precondition(format!(
                    "VM {:?} (job {}): {}",
                    m.vm_name.as_str(),
                    member.id,
                    member.error
                ))
                .into());
            }
            let live = engine.jobs.live(&member);
            done += live.bytes_done;
            total += live.bytes_total;
            if member.ended() {
                ended += 1;
                points.extend(member.points.clone());
            }
        }
        if ended == job.members.len() {
            job.points = points;
            job.bytes_done = done;
            job.bytes_total = total;
            return Ok(format!("{ended} VM(s) done"));
        }
        if (done, total) != (job.bytes_done, job.bytes_total) {
            job.bytes_done = done;
            job.bytes_total = total;
            engine.jobs.publish(job);
        }
        tokio::select! {
            _ = engine.shutdown.cancelled() => {
                return Err(Refused::unavailable("failover-svc is stopping").into())
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}
