//! Replication groups fail over as a whole, to one multi-VM point: a group
//! job checks every member, starts one member job per VM (each to its own
//! point at the group's bookmark, so the VMs come up consistent with one
//! another), and ends when all of them have. A planned group failover drains
//! every member instead: each ends at its own final point, which holds every
//! write it acknowledged, so none of the group's writes is lost. Commit and test cleanup of a
//! group go the same way. A member job is an ordinary VM job (resumed,
//! idempotent); its idempotency key is `<group job id>/<vm>`, so a resumed
//! group job never starts a member twice.

use std::sync::Arc;

use ferry_proto::ids::{JobId, UnixNanos, VmName};
use ferry_runtime::Refused;

use crate::engine::peers::{Group, GroupPoint, ReplicationState};
use crate::engine::{steps, Engine};
use crate::error::FailoverError;
use crate::jobs::{Choice, FailoverKind, JobKind, JobRecord, MemberJob, Used};

type Result<T> = std::result::Result<T, FailoverError>;

impl Engine {
    /// A replication group as registry has it.
    pub(crate) async fn group(&self, name: &str) -> Result<Group> {
        if name.is_empty() {
            return Err(Refused::invalid_argument("replication_group is empty").into());
        }
        self.peers
            .group(name)
            .await
            .map_err(|e| match e.peer_code() {
                Some(tonic::Code::NotFound) => {
                    Refused::not_found(format!("replication group {name:?} does not exist")).into()
                }
                _ => e,
            })
    }

    /// The group point `choice` names: the newest, or the one of a bookmark.
    async fn group_point(&self, group: &str, choice: &Choice) -> Result<GroupPoint> {
        let points = self
            .peers
            .group_points(group)
            .await
            .map_err(|e| match e.peer_code() {
                Some(tonic::Code::NotFound) => Refused::not_found(e.peer_message()).into(),
                _ => e,
            })?;
        match choice {
            Choice::Point(id) => points
                .into_iter()
                .find(|p| &p.bookmark_id == id)
                .ok_or_else(|| {
                    Refused::not_found(format!(
                    "replication group {group:?} has no multi-VM point {id:?} (unknown, expired, \
                     or not every member has it); see ferry points --group {group}"
                ))
                    .into()
                }),
            _ => points.into_iter().next().ok_or_else(|| {
                Refused::not_found(format!(
                    "replication group {group:?} has no multi-VM point yet (one needs a bookmark \
                     round with every member's agent up)"
                ))
                .into()
            }),
        }
    }

    /// A group's members, or FAILED_PRECONDITION if it has none.
    async fn members(&self, group: &str) -> Result<Vec<VmName>> {
        let g = self.group(group).await?;
        if g.members.is_empty() {
            return Err(Refused::failed_precondition(format!(
                "replication group {group:?} has no members"
            ))
            .into());
        }
        g.members
            .into_iter()
            .map(|m| {
                VmName::parse(m).map_err(|e| {
                    Refused::unavailable(format!("registry's group {group:?}: {e}")).into()
                })
            })
            .collect()
    }

    /// Validates a group failover and starts its job.
    pub(crate) async fn start_group_failover(
        self: &Arc<Self>,
        group: String,
        kind: FailoverKind,
        choice: Option<Choice>,
        test_network: String,
        request_id: String,
    ) -> Result<JobRecord> {
        if let Some(job) = self.jobs.by_request(&request_id)? {
            return Ok(job);
        }
        let planned = kind == FailoverKind::Planned;
        if planned && !self.peers.has_cache() {
            return Err(Refused::failed_precondition(
                "failover-svc was started without --cache: a planned failover needs the source \
                 region's cache; use an unplanned failover",
            )
            .into());
        }
        let choice = match choice {
            // Planned: every member drains and ends with its own final
            // point, which holds every write it acknowledged; no write
            // acknowledged anywhere is missing, so together they are
            // consistent.
            _ if planned => Choice::Latest,
            None | Some(Choice::LatestMultiVm) => Choice::LatestMultiVm,
            Some(Choice::Point(id)) => Choice::Point(id),
            Some(_) => {
                return Err(Refused::invalid_argument(
                    "a replication group fails over to a multi-VM point: latest_multi_vm or a \
                     group point id (a bookmark id)",
                )
                .into())
            }
        };
        let members = self.members(&group).await?;
        for vm in &members {
            let item = self.item(vm).await?;
            self.check_failover(vm, &item, kind, &test_network)?;
        }
        let mut jobs = Vec::new();
        let mut used = Vec::new();
        let mut bookmark = Choice::Latest;
        if planned {
            jobs = members
                .iter()
                .map(|vm| MemberJob::new(vm.clone(), String::new()))
                .collect();
        } else {
            let point = self.group_point(&group, &choice).await?;
            for vm in &members {
                let p = point
                    .points
                    .iter()
                    .find(|p| p.vm_name == vm.as_str())
                    .ok_or_else(|| {
                        Refused::not_found(format!(
                            "VM \"{vm}\" has no point at bookmark {:?}",
                            point.bookmark_id
                        ))
                    })?;
                jobs.push(MemberJob::new(vm.clone(), p.id.clone()));
                used.push(Used {
                    vm_name: vm.clone(),
                    point_id: p.id.clone(),
                    time_nanos: p.time,
                    data_loss_nanos: UnixNanos::now().get().saturating_sub(p.time.get()),
                });
            }
            bookmark = Choice::Point(point.bookmark_id.clone());
        }
        let mut job = JobRecord::new(
            self.jobs.new_id()?,
            JobKind::Failover,
            Some(kind),
            steps::GROUP,
            request_id,
        );
        job.choice = bookmark;
        job.test_network = test_network;
        job.group = group;
        job.members = jobs;
        // The group job pins every member's point before any member job
        // starts, so retention cannot take one away half way through; the
        // pins go when the group is committed or failed over again (as the
        // member jobs' own).
        for u in used {
            if let Err(e) = self.pin(&u.vm_name, &u.point_id, &job.id).await {
                self.unpin_all(&job).await;
                return Err(e);
            }
            job.points.push(u);
        }
        match self.admit(job.clone()).await {
            Ok(job) => Ok(job),
            Err(e) => {
                self.unpin_all(&job).await;
                Err(e)
            }
        }
    }

    async fn pin(&self, vm: &VmName, point: &str, holder: &JobId) -> Result<()> {
        self.peers
            .pin(vm, point, holder)
            .await
            .map_err(|e| match e.peer_code() {
                Some(tonic::Code::NotFound) => Refused::not_found(format!(
                    "VM \"{vm}\" no longer has point {point:?} (expired); try again"
                ))
                .into(),
                _ => e,
            })
    }

    /// Best effort: the group job's own pins (retention takes a point
    /// left pinned only when a later commit or failover releases it).
    pub(crate) async fn unpin_all(&self, job: &JobRecord) {
        for used in &job.points {
            if let Err(e) = self
                .peers
                .unpin(&used.vm_name, &used.point_id, &job.id)
                .await
            {
                tracing::warn!(job = %job.id, vm = %used.vm_name, point = %used.point_id,
                    error = %e, "cannot unpin the group job's point");
            }
        }
    }

    /// Validates a group commit (every member failed over) and starts its job.
    pub(crate) async fn commit_group(
        self: &Arc<Self>,
        group: String,
        request_id: String,
    ) -> Result<JobRecord> {
        if let Some(job) = self.jobs.by_request(&request_id)? {
            return Ok(job);
        }
        let members = self.members(&group).await?;
        for vm in &members {
            let item = self.item(vm).await?;
            if item.state != ReplicationState::FailedOver {
                return Err(Refused::failed_precondition(format!(
                    "VM \"{vm}\" of replication group {group:?} is not failed over: only a \
                     failed-over group can be committed"
                ))
                .into());
            }
        }
        self.group_job(JobKind::Commit, group, members, request_id)
            .await
    }

    /// Validates a group test cleanup and starts its job.
    pub(crate) async fn cleanup_group(
        self: &Arc<Self>,
        group: String,
        request_id: String,
    ) -> Result<JobRecord> {
        if let Some(job) = self.jobs.by_request(&request_id)? {
            return Ok(job);
        }
        let members = self.members(&group).await?;
        let mut with_tests = Vec::new();
        for vm in members {
            if !self.test_vms(&vm)?.is_empty() {
                with_tests.push(vm);
            }
        }
        if with_tests.is_empty() {
            return Err(Refused::failed_precondition(format!(
                "replication group {group:?} has no test failover to clean up"
            ))
            .into());
        }
        self.group_job(JobKind::CleanupTest, group, with_tests, request_id)
            .await
    }

    async fn group_job(
        self: &Arc<Self>,
        kind: JobKind,
        group: String,
        members: Vec<VmName>,
        request_id: String,
    ) -> Result<JobRecord> {
        let mut job = JobRecord::new(self.jobs.new_id()?, kind, None, steps::GROUP, request_id);
        job.group = group;
        job.members = members
            .into_iter()
            .map(|vm| MemberJob::new(vm, String::new()))
            .collect();
        self.admit(job).await
    }
}
