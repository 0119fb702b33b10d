//! validate: the VM (or group) is still there, as the job was accepted for.

use std::sync::Arc;

use super::Result;
use crate::engine::{state_name, Engine};
use crate::jobs::JobRecord;

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    if !job.plan.is_empty() {
        return Ok(format!(
            "plan {} of {} group(s), {} stage(s)",
            job.plan,
            job.plan_groups.len(),
            job.stages.len()
        ));
    }
    let Some(vm) = &job.vm_name else {
        let g = engine.group(&job.group).await?;
        return Ok(format!("group {} of {} VMs", g.name, g.members.len()));
    };
    let item = engine.item(vm).await?;
    Ok(format!("VM {vm} is {}", state_name(item.state)))
}
