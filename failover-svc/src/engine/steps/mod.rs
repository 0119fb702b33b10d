//! A job's steps: [`Step`] names each (persisted by a stable tag, the name
//! records have always stored, so an old record resumes), [`plan`] lists
//! each kind of job's steps in order, as data (the flow the engine's
//! module doc describes), and each step's work is in
//! the file named for it. Every step is idempotent: a job resumed after a
//! crash runs its first unfinished step again.

mod commit_registry;
mod create_vm;
mod delete_vm;
mod drain;
mod fence;
mod hydrate;
mod materialize;
mod member_jobs;
mod members_done;
mod network;
mod pin_point;
mod release_points;
mod reverse_registry;
mod run_plan;
mod seed_replica;
mod serve_disks;
mod start_vm;
mod update_registry;
mod validate;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::peers::Item;
use super::Engine;
use crate::error::FailoverError;
use crate::jobs::{FailoverKind, JobRecord};

type Result<T> = std::result::Result<T, FailoverError>;

pub(crate) use network::network;
pub(crate) use serve_disks::serve_again;

/// One step of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Step {
    /// The VM (or group) is still there to act on.
    #[serde(rename = "validate")]
    Validate,
    /// Planned: the source stops taking writes and sends them all.
    #[serde(rename = "drain")]
    Drain,
    /// FAILOVER_IN_PROGRESS, epoch raised: the old agent is refused.
    #[serde(rename = "fence")]
    Fence,
    /// The point is chosen and pinned so retention keeps it.
    #[serde(rename = "pin-point")]
    PinPoint,
    /// The target network and subnet exist.
    #[serde(rename = "network")]
    Network,
    /// The point's disks written to the target and checked end to end.
    #[serde(rename = "materialize-disks")]
    MaterializeDisks,
    /// Instant: the point's disks served over NBD, an overlay on each.
    #[serde(rename = "serve-disks")]
    ServeDisks,
    /// The VM recorded in the target region (and defined on its host).
    #[serde(rename = "create-vm")]
    CreateVm,
    /// The VM started and ready (the local inventory starts nothing).
    #[serde(rename = "start-vm")]
    StartVm,
    /// FAILED_OVER; earlier failovers' points released.
    #[serde(rename = "update-registry")]
    UpdateRegistry,
    /// Instant: every overlay holds all its data; the VM runs from local
    /// images only and the point is no longer served.
    #[serde(rename = "hydrate")]
    Hydrate,
    /// COMMITTED.
    #[serde(rename = "commit-registry")]
    CommitRegistry,
    /// The points earlier failover jobs pinned are released.
    #[serde(rename = "release-points")]
    ReleasePoints,
    /// The test VMs deleted.
    #[serde(rename = "delete-vm")]
    DeleteVm,
    /// Group: one job started per member.
    #[serde(rename = "member-jobs")]
    MemberJobs,
    /// Group: every member job has ended.
    #[serde(rename = "members-done")]
    MembersDone,
    /// Re-protect: registry turned the item around (a new incarnation
    /// replicating from the failed-over VM back to the original region).
    #[serde(rename = "reverse-registry")]
    ReverseRegistry,
    /// Re-protect: the reverse replica holds the original disks.
    #[serde(rename = "seed-replica")]
    SeedReplica,
    /// Plan: every stage in order (see `run_plan`).
    #[serde(rename = "run-plan")]
    RunPlan,
}

use Step::*;

/// Test failover: replication goes on; the VM comes up as `<vm>-test` in
/// the network the user names.
pub const TEST_FAILOVER: &[Step] = &[
    Validate,
    PinPoint,
    Network,
    MaterializeDisks,
    CreateVm,
    StartVm,
];
/// Planned failover: drained first, so nothing is lost; then as unplanned.
pub const PLANNED_FAILOVER: &[Step] = &[
    Validate,
    Drain,
    Fence,
    PinPoint,
    Network,
    MaterializeDisks,
    CreateVm,
    StartVm,
    UpdateRegistry,
];
/// Unplanned failover (or a change of point before commit).
pub const UNPLANNED_FAILOVER: &[Step] = &[
    Validate,
    Fence,
    PinPoint,
    Network,
    MaterializeDisks,
    CreateVm,
    StartVm,
    UpdateRegistry,
];
/// Commit of a failover.
pub const COMMIT: &[Step] = &[Validate, CommitRegistry, ReleasePoints];
/// Cleanup of a test failover.
pub const CLEANUP_TEST: &[Step] = &[Validate, DeleteVm, ReleasePoints];
/// Any job of a replication group: its members' jobs do the work.
pub const GROUP: &[Step] = &[Validate, MemberJobs, MembersDone];
/// Re-protect of a committed failover.
pub const REPROTECT: &[Step] = &[Validate, ReverseRegistry, SeedReplica];
/// A recovery plan's job: its stages do the work.
pub const PLAN: &[Step] = &[Validate, RunPlan];

/// Instant test failover: the VM starts on overlays of the served point,
/// then hydrates.
pub const INSTANT_TEST_FAILOVER: &[Step] = &[
    Validate, PinPoint, Network, ServeDisks, CreateVm, StartVm, Hydrate,
];
/// Instant planned failover.
pub const INSTANT_PLANNED_FAILOVER: &[Step] = &[
    Validate,
    Drain,
    Fence,
    PinPoint,
    Network,
    ServeDisks,
    CreateVm,
    StartVm,
    UpdateRegistry,
    Hydrate,
];
/// Instant unplanned failover.
pub const INSTANT_UNPLANNED_FAILOVER: &[Step] = &[
    Validate,
    Fence,
    PinPoint,
    Network,
    ServeDisks,
    CreateVm,
    StartVm,
    UpdateRegistry,
    Hydrate,
];

/// The steps of one VM's failover of this kind, in order.
pub fn failover(kind: FailoverKind, instant: bool) -> &'static [Step] {
    match (kind, instant) {
        (FailoverKind::Test, false) => TEST_FAILOVER,
        (FailoverKind::Planned, false) => PLANNED_FAILOVER,
        (FailoverKind::Unplanned, false) => UNPLANNED_FAILOVER,
        (FailoverKind::Test, true) => INSTANT_TEST_FAILOVER,
        (FailoverKind::Planned, true) => INSTANT_PLANNED_FAILOVER,
        (FailoverKind::Unplanned, true) => INSTANT_UNPLANNED_FAILOVER,
    }
}

impl Step {
    /// The stable name: what records store and the API shows.
    pub fn name(self) -> &'static str {
        match self {
            Validate => "validate",
            Drain => "drain",
            Fence => "fence",
            PinPoint => "pin-point",
            Network => "network",
            MaterializeDisks => "materialize-disks",
            ServeDisks => "serve-disks",
            CreateVm => "create-vm",
            StartVm => "start-vm",
            UpdateRegistry => "update-registry",
            Hydrate => "hydrate",
            CommitRegistry => "commit-registry",
            ReleasePoints => "release-points",
            DeleteVm => "delete-vm",
            MemberJobs => "member-jobs",
            MembersDone => "members-done",
            ReverseRegistry => "reverse-registry",
            SeedReplica => "seed-replica",
            RunPlan => "run-plan",
        }
    }

    /// Does this step's work for `job`; what it did, for the record.
    pub(crate) async fn run(self, engine: &Arc<Engine>, job: &mut JobRecord) -> Result<String> {
        match self {
            Validate => validate::run(engine, job).await,
            Drain => drain::run(engine, job).await,
            Fence => fence::run(engine, job).await,
            PinPoint => pin_point::run(engine, job).await,
            Network => network::run(engine, job).await,
            MaterializeDisks => materialize::run(engine, job).await,
            ServeDisks => serve_disks::run(engine, job).await,
            CreateVm => create_vm::run(engine, job).await,
            StartVm => start_vm::run(engine, job).await,
            UpdateRegistry => update_registry::run(engine, job).await,
            Hydrate => hydrate::run(engine, job).await,
            CommitRegistry => commit_registry::run(engine, job).await,
            ReleasePoints => release_points::run(engine, job).await,
            DeleteVm => delete_vm::run(engine, job).await,
            MemberJobs => member_jobs::run(engine, job).await,
            MembersDone => members_done::run(engine, job).await,
            ReverseRegistry => reverse_registry::run(engine, job).await,
            SeedReplica => seed_replica::run(engine, job).await,
            RunPlan => run_plan::run(engine, job).await,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The target VM's name and each source disk's target disk name (by disk
/// id): the replica disks' names, `-test` added for a test failover.
fn target_names(job: &JobRecord, item: &Item) -> (String, Vec<(String, String)>) {
    let suffix = if job.is_test() { "-test" } else { "" };
    let disks = item
        .source_disks
        .iter()
        .map(|id| {
            let name = item
                .target
                .replica_disks
                .iter()
                .find(|(disk, _)| disk == id)
                .map(|(_, name)| name.clone())
                .unwrap_or_else(|| format!("{}-{id}", item.vm_name));
            (id.clone(), format!("{name}{suffix}"))
        })
        .collect();
    (format!("{}{suffix}", item.vm_name), disks)
}

/// With original-location recovery (a failback), the original disk of
/// `disk`: where the point is written and the VM runs from; else None.
fn original_disk(job: &JobRecord, item: &Item, disk: &str) -> Result<Option<std::path::PathBuf>> {
    if !job.original_location {
        return Ok(None);
    }
    item.reprotection
        .as_ref()
        .and_then(|r| r.original_disks.iter().find(|(id, _)| id == disk))
        .map(|(_, path)| Some(path.clone()))
        .ok_or_else(|| {
            ferry_runtime::Refused::failed_precondition(format!(
                "failback into the original disks, but registry names no original disk for \
                 disk {disk:?}"
            ))
            .into()
        })
}

/// A target disk at `path` (named `name`) that no other VM's failover
/// made: never replaced, ALREADY_EXISTS naming its owner.
fn unowned(
    backend: &dyn crate::inventory::Backend,
    vm: &ferry_proto::ids::VmName,
    target: &super::peers::TargetResources,
    name: &str,
    path: &std::path::Path,
) -> Result<()> {
    if let Some(owner) = backend
        .vms()?
        .into_iter()
        .find(|v| v.source_vm != vm.as_str() && v.disks.iter().any(|d| d.path == path))
    {
        return Err(ferry_runtime::Refused::already_exists(format!(
            "target disk {name:?} in {}/{} belongs to VM {:?} (failed over from {:?}); \
             VM \"{vm}\" cannot use it",
            target.region, target.resource_group, owner.name, owner.source_vm
        ))
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_is_stored_by_the_name_records_have_always_held() {
        let all = [
            Validate,
            Drain,
            Fence,
            PinPoint,
            Network,
            MaterializeDisks,
            ServeDisks,
            CreateVm,
            StartVm,
            UpdateRegistry,
            Hydrate,
            CommitRegistry,
            ReleasePoints,
            DeleteVm,
            MemberJobs,
            MembersDone,
            ReverseRegistry,
            SeedReplica,
            RunPlan,
        ];
        for step in all {
            let stored = serde_json::to_string(&step).unwrap();
            assert_eq!(stored, format!("\"{}\"", step.name()));
            assert_eq!(serde_json::from_str::<Step>(&stored).unwrap(), step);
        }
        assert!(serde_json::from_str::<Step>("\"reboot\"").is_err());
    }
}
