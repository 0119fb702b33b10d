//! SeedReplica: a re-protected item's replica filled with the original
//! disks before its agent streams (see `replica::seed`). Only an item
//! registry says is re-protected, placed here and not yet seeded, with a
//! replica nothing was streamed into, takes a seed; its pipeline stays
//! stopped meanwhile, and a seed sent again replaces the last.

use std::sync::Arc;

use ferry_proto::ids::Incarnation;
use ferry_proto::processor::v1 as pb;
use ferry_proto::registry::v1 as registry;
use ferry_runtime::Refused;
use tokio_util::sync::CancellationToken;

use crate::error::ProcessorError;
use crate::pipeline::{blocking, Pipelines, SeedHold};
use crate::replica::VmReplica;

/// The largest data message.
const MAX_DATA: usize = 4 << 20;

/// Checks the seed may go in and opens the replica for it.
async fn open(
    pipelines: &Arc<Pipelines>,
    open: &pb::SeedOpen,
) -> Result<(SeedHold, Arc<VmReplica>), ProcessorError> {
    let vm = ferry_proto::ids::VmName::parse(open.vm_name.clone())
        .map_err(|e| Refused::invalid_argument(e.to_string()))?;
    let item = pipelines
        .registry()
        .get_protected_item(registry::GetProtectedItemRequest {
            vm_name: vm.to_string(),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::NotFound => Refused::failed_precondition(format!(
                "registry protects no VM {vm:?}: nothing to seed"
            )),
            _ => Refused::unavailable(format!("registry: {}", s.message())),
        })?
        .into_inner();
    let why_not = match &item.reprotection {
        _ if item.incarnation != open.incarnation => Some(format!(
            "VM {vm:?} is at incarnation {}, not {}",
            item.incarnation, open.incarnation
        )),
        None => Some(format!("VM {vm:?} was not re-protected")),
        Some(r) if r.seed_complete => Some(format!(
            "VM {vm:?}'s reverse replica was seeded already (its agent may be streaming)"
        )),
        Some(_) if !pipelines.serves(&item.processor_endpoint) => Some(format!(
            "VM {vm:?} is placed on processor {:?}, not this one",
            item.processor_endpoint
        )),
        Some(_) => None,
    };
    if let Some(why) = why_not {
        return Err(Refused::failed_precondition(format!("cannot seed: {why}")).into());
    }
    let disks = crate::pipeline::item_disks(&item);
    let hold = pipelines.hold_for_seed(vm.as_str()).await?;
    let replicas = pipelines.replicas().clone();
    let incarnation = Incarnation(open.incarnation);
    let distrusted: Vec<(String, u64, u64)> = open
        .distrusted
        .iter()
        .map(|r| (r.disk_id.clone(), r.offset, r.length))
        .collect();
    let name = vm.to_string();
    let replica = blocking(move || {
        let mut replica = replicas.open_vm_with(&name, &disks, incarnation)?;
        if !replica.is_blank()? {
            let meta = replica.meta()?;
            if !meta.seeded || meta.applied.get() > 0 || meta.lineage != 0 {
                return Err(Refused::failed_precondition(format!(
                    "VM {name:?}'s replica already holds streamed data; it is not seeded over"
                ))
                .into());
            }
            // An earlier seed, cut short: replaced whole.
            replicas.remove(&name)?;
            replica = replicas.open_vm_with(&name, &disks, incarnation)?;
        }
        replica.begin_seed(&distrusted)?;
        Ok(replica)
    })
    .await?;
    Ok((hold, replica))
}

/// Takes a whole seed from `messages`; the data bytes stored.
pub async fn seed(
    pipelines: &Arc<Pipelines>,
    mut messages: tonic::Streaming<pb::SeedReplicaRequest>,
    shutdown: &CancellationToken,
) -> Result<u64, ProcessorError> {
    use pb::seed_replica_request::Msg;
    let first = messages
        .message()
        .await
        .map_err(|s| Refused::unavailable(format!("seed stream: {}", s.message())))?;
    let Some(pb::SeedReplicaRequest {
        msg: Some(Msg::Open(opening)),
    }) = first
    else {
        return Err(Refused::invalid_argument("a seed's first message must be `open`").into());
    };
    let (hold, replica) = open(pipelines, &opening).await?;
    let flush = pipelines.tuning().flush_bytes;
    let room = pipelines.tuning().room.clone();
    let mut bytes = 0u64;
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Err(ProcessorError::ShuttingDown),
            m = messages.message() => m.map_err(|s| Refused::unavailable(format!("seed stream: {}", s.message())))?,
        };
        let data = match message {
            None => break,
            Some(pb::SeedReplicaRequest {
                msg: Some(Msg::Data(d)),
            }) => d,
            Some(_) => {
                return Err(
                    Refused::invalid_argument("after `open`, a seed carries `data` only").into(),
                )
            }
        };
        if data.data.len() > MAX_DATA {
            return Err(Refused::invalid_argument(format!(
                "seed data of {} bytes; at most {MAX_DATA} per message",
                data.data.len()
            ))
            .into());
        }
        if crc32c::crc32c(&data.data) != data.crc32c {
            return Err(ProcessorError::DataLoss(format!(
                "seed data at {} of disk {:?} fails its CRC-32C: damaged on the way; seed again",
                data.offset, data.disk_id
            )));
        }
        bytes += data.data.len() as u64;
        let r = replica.clone();
        let room = room.clone();
        blocking(move || {
            r.seed(&data.disk_id, data.offset, &data.data)?;
            if r.dirty_bytes()? >= flush {
                let _claim = room.claim(r.dirty_bytes()? as u64)?;
                r.checkpoint()?;
            }
            Ok(())
        })
        .await?;
    }
    let r = replica.clone();
    blocking(move || {
        let _claim = room.claim(r.dirty_bytes()? as u64)?;
        r.checkpoint()
    })
    .await?;
    tracing::info!(vm = %opening.vm_name, incarnation = opening.incarnation, bytes, "replica seeded");
    drop(hold);
    Ok(bytes)
}
