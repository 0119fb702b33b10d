//! pin-point: the point is chosen (as asked; for a planned failover, the
//! drain's final point) and pinned for the job, so retention keeps it until
//! commit or cleanup. A resumed job pins the point it chose before.

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::ids::UnixNanos;
use ferry_runtime::Refused;

use super::{drain, Result};
use crate::engine::peers::PointKind;
use crate::engine::Engine;
use crate::jobs::{Choice, FailoverKind, JobRecord, Used};

/// How long "latest" may wait for the source region's cache before an
/// unplanned failover falls back to the latest processed point.
const LATEST_BOUND: Duration = Duration::from_secs(10);

pub(super) async fn run(engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
    let vm = job.vm()?.clone();
    let mut note = String::new();
    let planned = job.failover_kind == Some(FailoverKind::Planned);
    let point = match job.points.first() {
        // Resumed: the same point again.
        Some(used) => engine.point(&vm, &used.point_id).await?,
        None if planned => drain::final_point(engine, job).await?.ok_or_else(|| {
            Refused::failed_precondition("the final point of the drain is missing")
        })?,
        None => match &job.choice {
            Choice::Point(id) => engine.point(&vm, id).await?,
            Choice::LatestProcessed => engine.newest(&vm, PointKind::Any).await?,
            Choice::LatestAppConsistent => engine.newest(&vm, PointKind::AppConsistent).await?,
            Choice::LatestMultiVm => engine.newest(&vm, PointKind::MultiVm).await?,
            Choice::Latest => {
                match tokio::time::timeout(LATEST_BOUND, engine.peers.cut_point(&vm)).await {
                    Ok(Ok(point)) => point,
                    Ok(Err(e)) if job.is_test() => return Err(e),
                    outcome => {
                        note = format!(
                            " (latest unavailable: {}; used the latest processed point)",
                            match outcome {
                                Ok(Err(e)) => e.peer_message(),
                                _ => format!("no answer within {LATEST_BOUND:?}"),
                            }
                        );
                        engine.newest(&vm, PointKind::Any).await?
                    }
                }
            }
        },
    };
    engine.peers.pin(&vm, &point.id, &job.id).await?;
    if job.points.is_empty() {
        job.points.push(Used {
            vm_name: vm.clone(),
            point_id: point.id.clone(),
            time_nanos: point.time,
            // Planned: the source took no write after the final point.
            data_loss_nanos: if planned {
                0
            } else {
                UnixNanos::now().get().saturating_sub(point.time.get())
            },
        });
        job.bytes_total = point.disks.iter().map(|d| d.size_bytes).sum();
    }
    Ok(format!(
        "point {} (sequence {}){note}",
        point.id, point.sequence_cut
    ))
}
