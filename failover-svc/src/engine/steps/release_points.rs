//! release-points: the points this VM's failover jobs pinned (the test
//! ones for a cleanup, the others for a commit) are unpinned, so retention
//! may take them. A point already gone counts as released.

use std::sync::Arc;

use ferry_proto::ids::{JobId, VmName};

use super::Result;
use crate::engine::Engine;
use crate::jobs::{JobKind, JobRecord};

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    let test = job.kind == JobKind::CleanupTest;
    let n = release(engine, job.vm()?, test, None).await?;
    Ok(format!("{n} point(s) released"))
}

/// Unpins the points this VM's failover jobs pinned (test ones, or the
/// others), except `keep`'s; how many.
pub(super) async fn release(
    engine: &Engine,
    vm: &VmName,
    test: bool,
    keep: Option<&JobId>,
) -> Result<usize> {
    let mut n = 0;
    for job in engine.jobs.list(Some(vm.as_str()), usize::MAX)? {
        if job.kind != JobKind::Failover || job.is_test() != test || Some(&job.id) == keep {
            continue;
        }
        // A group job's points are its members'; only this VM's here.
        for used in job.points.iter().filter(|u| u.vm_name == *vm) {
            match engine.peers.unpin(vm, &used.point_id, &job.id).await {
                Ok(()) => n += 1,
                Err(e) if e.peer_code() == Some(tonic::Code::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(n)
}
