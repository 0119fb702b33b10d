//! commit-registry: the failover is final: the VM is COMMITTED.

use std::sync::Arc;

use super::Result;
use crate::engine::peers::ReplicationState;
use crate::engine::Engine;
use crate::jobs::JobRecord;

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    engine
        .peers
        .transition(job.vm()?, ReplicationState::Committed, false, "committed")
        .await?;
    Ok("COMMITTED".into())
}
