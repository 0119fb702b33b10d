//! delete-vm: a test failover's VMs, and their disks, are deleted (an
//! instant one's overlays too, and its point is no longer served).

use std::sync::Arc;

use super::Result;
use crate::engine::Engine;
use crate::jobs::JobRecord;

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    let mut deleted = Vec::new();
    for t in engine.test_vms(job.vm()?)? {
        engine
            .backend()
            .delete_vm(&t.region, &t.resource_group, &t.name)?;
        // An instant test failover's point is no longer served.
        if let Some(instant) = &engine.instant {
            instant.exports.forget_job(&t.job_id);
        }
        deleted.push(t.name);
    }
    Ok(format!("deleted {}", deleted.join(", ")))
}
