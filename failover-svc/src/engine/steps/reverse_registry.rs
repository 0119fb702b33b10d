//! reverse-registry: registry turns the committed item around, a new
//! incarnation replicating from the failed-over VM's disks back to the
//! original region. Run again (resumed), it finds the item turned by this
//! job and goes on.

use std::sync::Arc;

use super::Result;
use crate::engine::Engine;
use crate::error::FailoverError;
use crate::jobs::JobRecord;

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    let vm = job.vm()?.clone();
    let item = engine.item(&vm).await?;
    if let Some(r) = &item.reprotection {
        if r.job_id == job.id.as_str() && r.from_incarnation == job.incarnation {
            return Ok(format!(
                "already turned around by this job: incarnation {}",
                item.incarnation
            ));
        }
    }
    if item.incarnation != job.incarnation {
        return Err(FailoverError::from(
            ferry_runtime::Refused::failed_precondition(format!(
                "VM \"{vm}\" is at incarnation {}, not the committed {} this job was asked for",
                item.incarnation, job.incarnation
            )),
        ));
    }
    let disks = engine.failed_over_disks(&vm, &item)?;
    let turned = engine
        .peers
        .reprotect(&vm, job.incarnation, &disks, &job.id)
        .await?;
    Ok(format!(
        "VM {vm} replicates from {} back to {} as incarnation {}",
        item.target.region, turned.target.region, turned.incarnation
    ))
}
