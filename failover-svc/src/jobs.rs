//! Jobs as persisted records: every step's outcome is written (and flushed)
//! before the next begins, so a restarted failover-svc resumes each
//! unfinished job at its first unfinished step; steps are idempotent.
//! Idempotency keys map to job ids. Watchers get every change.

use std::collections::HashMap;
use std::sync::Mutex;

use ferry_proto::failover::v1 as pb;
use ferry_runtime::time::to_timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::FailoverError;

type Result<T> = std::result::Result<T, FailoverError>;

/// Which point to use, as asked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum Choice {
    Latest,
    #[default]
    LatestProcessed,
    LatestAppConsistent,
    LatestMultiVm,
    Point(String),
}

/// One step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    /// `pb::JobState`.
    pub state: i32,
    pub message: String,
}

/// The point a failover used.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Used {
    pub vm_name: String,
    pub point_id: String,
    pub time_nanos: u64,
    pub data_loss_nanos: u64,
}

/// A disk a failover wrote and checked end to end against its point.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verified {
    pub vm_name: String,
    pub disk_id: String,
    pub point_id: String,
    pub path: String,
    pub size_bytes: u64,
    pub algorithm: String,
    pub sha256: String,
}

/// A member of a group job: the VM, the point it fails over to (its point
/// at the group's bookmark; empty for commit and cleanup) and its job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberJob {
    pub vm_name: String,
    pub point_id: String,
    pub job_id: String,
}

/// A job as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    /// `pb::JobKind`.
    pub kind: i32,
    /// `pb::FailoverKind`.
    pub failover_kind: i32,
    pub vm_name: String,
    pub choice: Choice,
    pub test_network: String,
    /// `pb::JobState`.
    pub state: i32,
    pub steps: Vec<Step>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub points: Vec<Used>,
    pub error: String,
    pub request_id: String,
    pub created_nanos: u64,
    pub finished_nanos: u64,
    /// The registry state the VM was in when the job was accepted.
    pub from_state: i32,
    /// For a group job: the group (then `vm_name` is empty) and one job per
    /// member.
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub members: Vec<MemberJob>,
    /// The disks materialize-disks wrote, each checked against its point.
    #[serde(default)]
    pub verified: Vec<Verified>,
}

fn time(nanos: u64) -> prost_types::Timestamp {
    to_timestamp(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(nanos))
}

impl JobRecord {
    /// Whether it has ended.
    pub fn ended(&self) -> bool {
        self.state == pb::JobState::Succeeded as i32 || self.state == pb::JobState::Failed as i32
    }

    /// As the API shows it.
    pub fn to_proto(&self) -> pb::Job {
        pb::Job {
            id: self.id.clone(),
            kind: self.kind,
            failover_kind: self.failover_kind,
            vm_names: if self.group.is_empty() {
                vec![self.vm_name.clone()]
            } else {
                self.members.iter().map(|m| m.vm_name.clone()).collect()
            },
            replication_group: self.group.clone(),
            state: self.state,
            steps: self
                .steps
                .iter()
                .map(|s| pb::JobStep {
                    name: s.name.clone(),
                    state: s.state,
                    message: s.message.clone(),
                })
                .collect(),
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total,
            points: self
                .points
                .iter()
                .map(|u| pb::UsedPoint {
                    vm_name: u.vm_name.clone(),
                    point_id: u.point_id.clone(),
                    time: Some(time(u.time_nanos)),
                    data_loss_window: Some(ferry_runtime::time::to_duration(
                        std::time::Duration::from_nanos(u.data_loss_nanos),
                    )),
                })
                .collect(),
            error: self.error.clone(),
            request_id: self.request_id.clone(),
            created_at: Some(time(self.created_nanos)),
            finished_at: (self.finished_nanos > 0).then(|| time(self.finished_nanos)),
            verified_disks: self
                .verified
                .iter()
                .map(|v| pb::VerifiedDisk {
                    vm_name: v.vm_name.clone(),
                    disk_id: v.disk_id.clone(),
                    point_id: v.point_id.clone(),
                    path: v.path.clone(),
                    size_bytes: v.size_bytes,
                    algorithm: v.algorithm.clone(),
                    sha256: v.sha256.clone(),
                })
                .collect(),
        }
    }
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| FailoverError::Corrupt(e.to_string()))
}

fn unjson<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| FailoverError::Corrupt(e.to_string()))
}

/// Every job, persisted, with live watchers.
pub struct Jobs {
    db: sled::Db,
    jobs: sled::Tree,
    requests: sled::Tree,
    watchers: Mutex<HashMap<String, watch::Sender<pb::Job>>>,
}

impl Jobs {
    pub fn open(db: &sled::Db) -> Result<Jobs> {
        Ok(Jobs {
            db: db.clone(),
            jobs: db.open_tree("jobs")?,
            requests: db.open_tree("requests")?,
            watchers: Mutex::new(HashMap::new()),
        })
    }

    /// A new job id: time-ordered, so listing newest first is a reverse scan.
    pub fn new_id(&self) -> Result<String> {
        let n = self.db.generate_id()?;
        Ok(format!(
            "job-{:016x}-{n}",
            ferry_runtime::time::unix_nanos_now()
        ))
    }

    /// The job an idempotency key started, if any.
    pub fn by_request(&self, request_id: &str) -> Result<Option<JobRecord>> {
        if request_id.is_empty() {
            return Ok(None);
        }
        match self.requests.get(request_id.as_bytes())? {
            Some(id) => self.get(&String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    /// Stores a new job (and its idempotency key) durably.
    pub fn insert(&self, job: &JobRecord) -> Result<()> {
        self.jobs.insert(job.id.as_bytes(), json(job)?)?;
        if !job.request_id.is_empty() {
            self.requests
                .insert(job.request_id.as_bytes(), job.id.as_bytes())?;
        }
        self.db.flush()?;
        self.publish(job);
        Ok(())
    }

    /// Stores a job's new state durably and tells its watchers.
    pub fn save(&self, job: &JobRecord) -> Result<()> {
        self.jobs.insert(job.id.as_bytes(), json(job)?)?;
        self.db.flush()?;
        self.publish(job);
        Ok(())
    }

    /// Tells watchers without writing (progress between saves).
    pub fn publish(&self, job: &JobRecord) {
        if let Ok(mut w) = self.watchers.lock() {
            let proto = job.to_proto();
            match w.get(&job.id) {
                Some(tx) => {
                    tx.send_replace(proto);
                }
                None => {
                    w.insert(job.id.clone(), watch::channel(proto).0);
                }
            }
        }
    }

    /// A job by id.
    pub fn get(&self, id: &str) -> Result<Option<JobRecord>> {
        self.jobs
            .get(id.as_bytes())?
            .map(|b| unjson(&b))
            .transpose()
    }

    /// Jobs newest first, optionally of one VM.
    pub fn list(&self, vm: Option<&str>, limit: usize) -> Result<Vec<JobRecord>> {
        let mut out = Vec::new();
        for kv in self.jobs.iter().rev() {
            let job: JobRecord = unjson(&kv?.1)?;
            if vm.is_none_or(|v| v == job.vm_name || job.members.iter().any(|m| m.vm_name == v)) {
                out.push(job);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Jobs that have not ended (to resume after a restart).
    pub fn unfinished(&self) -> Result<Vec<JobRecord>> {
        let mut out = Vec::new();
        for kv in self.jobs.iter() {
            let job: JobRecord = unjson(&kv?.1)?;
            if !job.ended() {
                out.push(job);
            }
        }
        Ok(out)
    }

    /// The job as the API shows it, with progress not yet persisted.
    pub fn live(&self, job: &JobRecord) -> pb::Job {
        self.watchers
            .lock()
            .ok()
            .and_then(|w| w.get(&job.id).map(|tx| tx.borrow().clone()))
            .unwrap_or_else(|| job.to_proto())
    }

    /// A receiver of the job's changes.
    pub fn watch(&self, job: &JobRecord) -> Option<watch::Receiver<pb::Job>> {
        let mut w = self.watchers.lock().ok()?;
        Some(
            w.entry(job.id.clone())
                .or_insert_with(|| watch::channel(job.to_proto()).0)
                .subscribe(),
        )
    }
}
