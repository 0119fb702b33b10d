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
use std::time::Duration;

use ferry_proto::ids::{UnixNanos, VmName};
use ferry_proto::processor::v1 as proc;
use ferry_proto::registry::v1 as reg;

use crate::engine::{steps, Engine};
use crate::error::FailoverError;
use crate::jobs::{Choice, FailoverKind, JobKind, JobRecord, JobState, MemberJob, Used};

type Result<T> = std::result::Result<T, FailoverError>;

const GROUP_STEPS: &[&str] = &["validate", "member-jobs", "members-done"];

impl Engine {
    /// A replication group as registry has it.
    pub(crate) async fn group(&self, name: &str) -> Result<reg::ReplicationGroup> {
        if name.is_empty() {
            return Err(FailoverError::InvalidArgument(
                "replication_group is empty".into(),
            ));
        }
        let mut registry = self.registry.clone();
        registry
            .get_replication_group(reg::GetReplicationGroupRequest {
                name: name.to_string(),
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => {
                    FailoverError::NotFound(format!("replication group {name:?} does not exist"))
                }
                _ => FailoverError::peer("registry", s),
            })
    }

    /// The group point `choice` names: the newest, or the one of a bookmark.
    async fn group_point(&self, group: &str, choice: &Choice) -> Result<proc::GroupPoint> {
        let mut p = self.processor.clone();
        let points = p
            .list_group_points(proc::ListGroupPointsRequest {
                replication_group: group.to_string(),
                limit: 0,
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => FailoverError::NotFound(s.message().to_string()),
                _ => FailoverError::peer("processor", s),
            })?
            .into_inner()
            .points;
        match choice {
            Choice::Point(id) => points
                .into_iter()
                .find(|p| &p.bookmark_id == id)
                .ok_or_else(|| {
                    FailoverError::NotFound(format!(
                    "replication group {group:?} has no multi-VM point {id:?} (unknown, expired, \
                     or not every member has it); see ferry points --group {group}"
                ))
                }),
            _ => points.into_iter().next().ok_or_else(|| {
                FailoverError::NotFound(format!(
                    "replication group {group:?} has no multi-VM point yet (one needs a bookmark \
                     round with every member's agent up)"
                ))
            }),
        }
    }

    /// A group's members, or FAILED_PRECONDITION if it has none.
    async fn members(&self, group: &str) -> Result<Vec<VmName>> {
        let g = self.group(group).await?;
        if g.members.is_empty() {
            return Err(FailoverError::FailedPrecondition(format!(
                "replication group {group:?} has no members"
            )));
        }
        g.members
            .into_iter()
            .map(|m| {
                VmName::parse(m).map_err(|e| {
                    FailoverError::Unavailable(format!("registry's group {group:?}: {e}"))
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
        let planned = kind == FailoverKind::Planned;
        if planned && self.cache.is_none() {
            return Err(FailoverError::FailedPrecondition(
                "failover-svc was started without --cache: a planned failover needs the source \
                 region's cache; use an unplanned failover"
                    .into(),
            ));
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
                return Err(FailoverError::InvalidArgument(
                    "a replication group fails over to a multi-VM point: latest_multi_vm or a \
                     group point id (a bookmark id)"
                        .into(),
                ))
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
                        FailoverError::NotFound(format!(
                            "VM \"{vm}\" has no point at bookmark {:?}",
                            point.bookmark_id
                        ))
                    })?;
                jobs.push(MemberJob::new(vm.clone(), p.id.clone()));
                let time_nanos = p
                    .time
                    .as_ref()
                    .and_then(UnixNanos::from_timestamp)
                    .unwrap_or_default();
                used.push(Used {
                    vm_name: vm.clone(),
                    point_id: p.id.clone(),
                    time_nanos,
                    data_loss_nanos: UnixNanos::now().get().saturating_sub(time_nanos.get()),
                });
            }
            bookmark = Choice::Point(point.bookmark_id.clone());
        }
        let mut job = JobRecord::new(
            self.jobs.new_id()?,
            JobKind::Failover,
            Some(kind),
            steps(GROUP_STEPS),
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
            if let Err(e) = self.pin(&u.vm_name, &u.point_id, job.id.as_str()).await {
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

    async fn pin(&self, vm: &VmName, point: &str, holder: &str) -> Result<()> {
        let mut p = self.processor.clone();
        p.pin_recovery_point(proc::PinRecoveryPointRequest {
            vm_name: vm.to_string(),
            point_id: point.to_string(),
            holder: holder.to_string(),
        })
        .await
        .map(|_| ())
        .map_err(|s| match s.code() {
            tonic::Code::NotFound => FailoverError::NotFound(format!(
                "VM \"{vm}\" no longer has point {point:?} (expired); try again"
            )),
            _ => FailoverError::peer("processor (pin)", s),
        })
    }

    /// Best effort: the group job's own pins.
    async fn unpin_all(&self, job: &JobRecord) {
        for used in &job.points {
            let mut p = self.processor.clone();
            let _ = p
                .unpin_recovery_point(proc::UnpinRecoveryPointRequest {
                    vm_name: used.vm_name.to_string(),
                    point_id: used.point_id.clone(),
                    holder: job.id.to_string(),
                })
                .await;
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
            if item.state() != reg::ReplicationState::FailedOver {
                return Err(FailoverError::FailedPrecondition(format!(
                    "VM \"{vm}\" of replication group {group:?} is not failed over: only a \
                     failed-over group can be committed"
                )));
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
            return Err(FailoverError::FailedPrecondition(format!(
                "replication group {group:?} has no test failover to clean up"
            )));
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
        let mut job = JobRecord::new(
            self.jobs.new_id()?,
            kind,
            None,
            steps(GROUP_STEPS),
            request_id,
        );
        job.group = group;
        job.members = members
            .into_iter()
            .map(|vm| MemberJob::new(vm, String::new()))
            .collect();
        self.admit(job).await
    }

    /// Starts each member's job (again after a restart: the same job).
    pub(crate) async fn member_jobs(self: &Arc<Self>, job: &mut JobRecord) -> Result<String> {
        for i in 0..job.members.len() {
            if !job.members[i].job_id.is_empty() {
                continue;
            }
            let m = job.members[i].clone();
            let key = format!("{}/{}", job.id, m.vm_name);
            let started = match (job.kind, job.failover_kind) {
                (JobKind::Commit, _) => self.commit(m.vm_name.clone(), key).await,
                (JobKind::CleanupTest, _) => self.cleanup_test(m.vm_name.clone(), key).await,
                (JobKind::Failover, None) => {
                    return Err(FailoverError::Corrupt(format!(
                        "group job {} has no failover kind",
                        job.id
                    )))
                }
                (JobKind::Failover, Some(kind)) => {
                    // A planned member job drains its VM and takes its final
                    // point; the others go to their point at the bookmark.
                    let choice = if m.point_id.is_empty() {
                        Choice::Latest
                    } else {
                        Choice::Point(m.point_id.clone())
                    };
                    self.start_vm_failover(
                        m.vm_name.clone(),
                        kind,
                        choice,
                        job.test_network.clone(),
                        key,
                        true,
                    )
                    .await
                }
            };
            let member = started.map_err(|e| {
                FailoverError::FailedPrecondition(format!("VM {:?}: {e}", m.vm_name.as_str()))
            })?;
            job.members[i].job_id = member.id.to_string();
            self.jobs.save(job)?;
        }
        Ok(format!("{} member job(s)", job.members.len()))
    }

    /// Follows the member jobs until all have ended; progress is their sum.
    pub(crate) async fn members_done(&self, job: &mut JobRecord) -> Result<String> {
        loop {
            let (mut done, mut total, mut ended) = (0u64, 0u64, 0usize);
            let mut points = Vec::new();
            for m in &job.members {
                let member = self.jobs.get(&m.job_id)?.ok_or_else(|| {
                    FailoverError::Corrupt(format!("member job {} is missing", m.job_id))
                })?;
                if member.state == JobState::Failed {
                    self.unpin_all(job).await;
                    return Err(FailoverError::FailedPrecondition(format!(
                        "VM {:?} (job {}): {}",
                        m.vm_name.as_str(),
                        member.id,
                        member.error
                    )));
                }
                let live = self.jobs.live(&member);
                done += live.bytes_done;
                total += live.bytes_total;
                if member.ended() {
                    ended += 1;
                    points.extend(member.points.clone());
                }
            }
            if ended == job.members.len() {
                job.points = points;
                job.bytes_done = done;
                job.bytes_total = total;
                return Ok(format!("{ended} VM(s) done"));
            }
            if (done, total) != (job.bytes_done, job.bytes_total) {
                job.bytes_done = done;
                job.bytes_total = total;
                self.jobs.publish(job);
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    return Err(FailoverError::Unavailable("failover-svc is stopping".into()))
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }
}
