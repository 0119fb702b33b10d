//! fence: the VM goes FAILOVER_IN_PROGRESS with its epoch raised, so
//! cache-svc stops and refuses the old agent's writes. Raising it again on
//! a resume is harmless: the old agent is refused either way.

use std::sync::Arc;

use super::Result;
use crate::engine::peers::ReplicationState;
use crate::engine::Engine;
use crate::jobs::JobRecord;

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    engine
        .peers
        .transition(
            job.vm()?,
            ReplicationState::FailoverInProgress,
            true,
            "failover",
        )
        .await?;
    Ok("source fenced: epoch raised; cache-svc refuses the old agent".into())
}
