//! update-registry: the VM is FAILED_OVER; the points earlier failovers of
//! it pinned (a change of point) are released, this job's kept.

use std::sync::Arc;

use super::{release_points, Result};
use crate::engine::peers::ReplicationState;
use crate::engine::Engine;
use crate::jobs::JobRecord;

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    let vm = job.vm()?;
    engine
        .peers
        .transition(vm, ReplicationState::FailedOver, false, "failed over")
        .await?;
    release_points::release(engine, vm, false, Some(&job.id)).await?;
    Ok("FAILED_OVER".into())
}
