//! drain (planned failover): the source agent stops taking writes, sends
//! everything and a FINAL marker named after the job; the processor cuts a
//! point at it, which holds every write the source acknowledged. A resumed
//! drain finds that point and does not ask again.

use std::sync::Arc;
use std::time::Duration;

use ferry_runtime::Refused;

use super::Result;
use crate::engine::peers::{Point, PointKind};
use crate::engine::Engine;
use crate::jobs::JobRecord;

/// How long a planned failover waits for the source to drain.
const DRAIN_BOUND: Duration = Duration::from_secs(120);
/// How often the final point is looked for meanwhile.
const POLL: Duration = Duration::from_millis(200);

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    let drained = |p: Point| {
        format!(
            "source drained; final point {} at sequence {}",
            p.id, p.sequence_cut
        )
    };
    if let Some(p) = final_point(engine, job).await? {
        return Ok(drained(p));
    }
    let vm = job.vm()?;
    let reason = format!("planned failover (job {})", job.id);
    engine
        .peers
        .drain(vm, &reason, &job.id)
        .await
        .map_err(|e| match e.peer_code() {
            Some(tonic::Code::FailedPrecondition) => Refused::failed_precondition(format!(
                "the source agent of \"{vm}\" is not streaming, so it cannot drain ({}); use an \
                 unplanned failover",
                e.peer_message()
            ))
            .into(),
            _ => e,
        })?;
    let deadline = tokio::time::Instant::now() + DRAIN_BOUND;
    loop {
        if let Some(p) = final_point(engine, job).await? {
            return Ok(drained(p));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Refused::unavailable(format!(
                "the source did not drain within {DRAIN_BOUND:?}; use an unplanned failover"
            ))
            .into());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The point cut at this job's FINAL marker, if it exists.
pub(super) async fn final_point(engine: &Engine, job: &JobRecord) -> Result<Option<Point>> {
    let points = engine.peers.points(job.vm()?, PointKind::Any, 0).await?;
    Ok(points
        .into_iter()
        .find(|p| p.bookmark_id == job.id.as_str()))
}
