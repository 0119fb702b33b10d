//! Jobs as persisted records: every step's outcome is written (and flushed)
//! before the next begins, so a restarted failover-svc resumes each
//! unfinished job at its first unfinished step; steps are idempotent.
//! Idempotency keys map to job ids. Watchers get every change.
//!
//! Records hold domain types, never proto enums: kinds and states are
//! stored by stable tags (`"failover"`, `"running"`...). Records written
//! before the tags hold the proto integers; those are still read, so an
//! old data dir resumes. An unknown or missing value is refused as
//! [`FailoverError::Corrupt`], never read as a default: a damaged failover
//! kind must not run as an unplanned failover, which fences the source.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use ferry_proto::ids::{JobId, UnixNanos, VmName};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::watch;

use crate::engine::steps::Step;
use crate::error::FailoverError;

type Result<T> = std::result::Result<T, FailoverError>;

/// A stored enum value: today's tag, or the proto integer older records
/// hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Stored {
    Tag(String),
    Legacy(i64),
}

impl fmt::Display for Stored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stored::Tag(t) => write!(f, "{t:?}"),
            Stored::Legacy(n) => write!(f, "{n}"),
        }
    }
}

/// An enum stored by tag, read from its tag or its legacy proto number.
macro_rules! stored_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal {
        $($(#[$vdoc:meta])* $variant:ident = $tag:literal / $legacy:literal),+ $(,)?
    }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(try_from = "Stored", into = "&'static str")]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// The stable tag it is stored by.
            pub fn tag(self) -> &'static str {
                match self {
                    $($name::$variant => $tag),+
                }
            }
        }

        impl From<$name> for &'static str {
            fn from(v: $name) -> &'static str {
                v.tag()
            }
        }

        impl TryFrom<Stored> for $name {
            type Error = String;
            fn try_from(stored: Stored) -> std::result::Result<$name, String> {
                let found = match &stored {
                    $(Stored::Tag(t) if t == $tag => Some($name::$variant),)+
                    $(Stored::Legacy($legacy) => Some($name::$variant),)+
                    _ => None,
                };
                found.ok_or_else(|| format!("{stored} is not a known {}", $what))
            }
        }
    };
}

stored_enum!(
    /// What a job does.
    JobKind, "job kind" {
        /// A failover (test, planned or unplanned, or a change of point).
        Failover = "failover" / 1,
        /// A commit of a failover.
        Commit = "commit" / 2,
        /// The cleanup of a test failover.
        CleanupTest = "cleanup-test" / 3,
        /// A re-protect of a committed failover.
        Reprotect = "reprotect" / 4,
        /// A recovery plan's job.
        Plan = "plan" / 5,
    }
);

stored_enum!(
    /// What a plan's job does to every VM of the plan.
    PlanOp, "plan operation" {
        /// A failover of the job's `failover_kind`.
        Failover = "failover" / 1,
        Commit = "commit" / 2,
        CleanupTest = "cleanup-test" / 3,
        Reprotect = "reprotect" / 4,
    }
);

/// What one stage of a plan's job does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    /// The `index`th action before or after the group.
    Action {
        when: crate::plans::When,
        index: usize,
    },
    /// The group's VMs and replication groups, one child job each.
    Vms,
}

/// One stage of a plan's job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    /// Its group, 1-based.
    pub group: usize,
    pub kind: StageKind,
    /// For people: "pre:notify", "vms", "post:check".
    pub label: String,
    pub state: JobState,
    pub message: String,
    /// The child jobs it started.
    #[serde(default)]
    pub children: Vec<String>,
}

stored_enum!(
    /// How a failover goes.
    FailoverKind, "failover kind" {
        /// Into an isolated network; replication goes on.
        Test = "test" / 1,
        /// The source drains first: no data loss.
        Planned = "planned" / 2,
        /// The source is fenced; never waits on it.
        Unplanned = "unplanned" / 3,
    }
);

stored_enum!(
    /// Where a job or a step is.
    JobState, "job state" {
        /// Accepted, not started.
        Queued = "queued" / 1,
        /// Running.
        Running = "running" / 2,
        /// Done.
        Succeeded = "succeeded" / 3,
        /// Stopped with an error.
        Failed = "failed" / 4,
    }
);

impl JobState {
    /// Whether it is final.
    pub fn ended(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
}

/// `failover_kind` of a record: a failover job's kind, absent (null, or 0
/// in legacy records) for the other jobs. Present but unknown is an error.
mod failover_kind_field {
    use super::*;

    pub fn serialize<S: Serializer>(
        v: &Option<FailoverKind>,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        match v {
            Some(k) => s.serialize_str(k.tag()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<Option<FailoverKind>, D::Error> {
        match Option::<Stored>::deserialize(d)? {
            None | Some(Stored::Legacy(0)) => Ok(None),
            Some(s) => FailoverKind::try_from(s)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// `vm_name` of a record: a VM job's VM; empty for a group job.
mod vm_name_field {
    use super::*;

    pub fn serialize<S: Serializer>(
        v: &Option<VmName>,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(v.as_ref().map_or("", VmName::as_str))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<Option<VmName>, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Ok(None);
        }
        VmName::parse(s).map(Some).map_err(serde::de::Error::custom)
    }
}

/// Which point to use, as asked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum Choice {
    Latest,
    #[default]
    LatestProcessed,
    LatestAppConsistent,
    LatestMultiVm,
    /// A point id (or, for a group, a bookmark id) as the user gave it: an
    /// unknown or malformed one is NOT_FOUND when looked up.
    Point(String),
}

/// One step of a job and where it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    #[serde(rename = "name")]
    pub step: Step,
    pub state: JobState,
    pub message: String,
}

impl StepRecord {
    /// Steps not started yet.
    pub fn queued(steps: &[Step]) -> Vec<StepRecord> {
        steps
            .iter()
            .map(|&step| StepRecord {
                step,
                state: JobState::Queued,
                message: String::new(),
            })
            .collect()
    }
}

/// The point a failover used. Point ids are kept as the processor wrote
/// them (`rp-<n>`), the form records have always stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Used {
    pub vm_name: VmName,
    pub point_id: String,
    pub time_nanos: UnixNanos,
    pub data_loss_nanos: u64,
}

/// A disk a failover wrote and checked end to end against its point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verified {
    pub vm_name: VmName,
    pub disk_id: String,
    pub point_id: String,
    pub path: String,
    pub size_bytes: u64,
    pub algorithm: String,
    pub sha256: String,
}

/// A disk an instant failover serves: the point's disk as an NBD export
/// (its name holds the job's secret) and the overlay the VM writes to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Served {
    pub disk_id: String,
    pub export: String,
    pub size_bytes: u64,
    pub overlay: std::path::PathBuf,
}

/// A member of a group job: the VM, the point it fails over to (its point
/// at the group's bookmark; empty for commit and cleanup) and its job
/// (empty until started).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberJob {
    pub vm_name: VmName,
    pub point_id: String,
    pub job_id: String,
}

impl MemberJob {
    /// A member not started yet.
    pub fn new(vm_name: VmName, point_id: String) -> MemberJob {
        MemberJob {
            vm_name,
            point_id,
            job_id: String::new(),
        }
    }
}

/// A stored job record that cannot be read: its key and why.
pub type Damaged = (String, FailoverError);

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    pub kind: JobKind,
    /// A failover job's kind; None for commit and cleanup.
    #[serde(with = "failover_kind_field")]
    pub failover_kind: Option<FailoverKind>,
    /// A VM job's VM; None for a group job.
    #[serde(with = "vm_name_field")]
    pub vm_name: Option<VmName>,
    pub choice: Choice,
    pub test_network: String,
    pub state: JobState,
    pub steps: Vec<StepRecord>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub points: Vec<Used>,
    pub error: String,
    pub request_id: String,
    pub created_nanos: UnixNanos,
    /// 0 until it ends.
    pub finished_nanos: UnixNanos,
    /// The registry state the VM was in when the job was accepted (a
    /// registry `ReplicationState` number, kept for the record; never read
    /// back into a decision).
    pub from_state: i32,
    /// For a group job: the group and one job per member.
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub members: Vec<MemberJob>,
    /// The disks materialize-disks wrote, each checked against its point.
    #[serde(default)]
    pub verified: Vec<Verified>,
    /// The W3C trace context the job's runs continue: the request that
    /// asked for it (a group job's step, for a member job), else its first
    /// run. Each run, a resumed one too, is a span of that trace, each step
    /// a span under its run.
    #[serde(default)]
    pub traceparent: String,
    /// An instant failover: the VM starts on overlays of the served point.
    #[serde(default)]
    pub instant: bool,
    /// What an instant failover serves, until hydrate is done with it.
    #[serde(default)]
    pub served: Vec<Served>,
    /// Failback into the original disks (original-location recovery).
    #[serde(default)]
    pub original_location: bool,
    /// Bytes written into disks (materialized, or only what differed in
    /// the original disks); a re-protect's bytes seeded.
    #[serde(default)]
    pub bytes_written: u64,
    /// A re-protect: the committed incarnation it turns around.
    #[serde(default)]
    pub incarnation: u64,
    /// A plan's job: the plan, what it does, the plan's groups as they
    /// were when it started, and its stages.
    #[serde(default)]
    pub plan: String,
    #[serde(default)]
    pub plan_op: Option<PlanOp>,
    #[serde(default)]
    pub plan_groups: Vec<crate::plans::PlanGroup>,
    #[serde(default)]
    pub stages: Vec<Stage>,
    /// While the plan's job waits at a manual action: its text.
    #[serde(default)]
    pub waiting_for: String,
}

impl JobRecord {
    /// A queued job of `steps`.
    pub fn new(
        id: JobId,
        kind: JobKind,
        failover_kind: Option<FailoverKind>,
        steps: &[Step],
        request_id: String,
    ) -> JobRecord {
        JobRecord {
            id,
            kind,
            failover_kind,
            vm_name: None,
            choice: Choice::LatestProcessed,
            test_network: String::new(),
            state: JobState::Queued,
            steps: StepRecord::queued(steps),
            bytes_done: 0,
            bytes_total: 0,
            points: Vec::new(),
            error: String::new(),
            request_id,
            created_nanos: UnixNanos::now(),
            finished_nanos: UnixNanos(0),
            from_state: 0,
            group: String::new(),
            members: Vec::new(),
            verified: Vec::new(),
            traceparent: String::new(),
            instant: false,
            served: Vec::new(),
            original_location: false,
            bytes_written: 0,
            incarnation: 0,
            plan: String::new(),
            plan_op: None,
            plan_groups: Vec::new(),
            stages: Vec::new(),
            waiting_for: String::new(),
        }
    }

    /// Whether it has ended.
    pub fn ended(&self) -> bool {
        self.state.ended()
    }

    /// Whether it is a test failover.
    pub fn is_test(&self) -> bool {
        self.failover_kind == Some(FailoverKind::Test)
    }

    /// The VM of a VM job; a VM job without one is a damaged record.
    pub fn vm(&self) -> Result<&VmName> {
        self.vm_name
            .as_ref()
            .ok_or_else(|| FailoverError::Corrupt(format!("job {} names no VM", self.id)))
    }

    /// The VM, or the group, for logs and messages.
    pub fn target(&self) -> &str {
        match &self.vm_name {
            Some(vm) => vm.as_str(),
            None if !self.plan.is_empty() => &self.plan,
            None => &self.group,
        }
    }

    /// Whether the fields agree: a failover job has a failover kind, the
    /// others none; a job is of a VM or of a group.
    fn check(&self) -> Result<()> {
        let damaged =
            |what: String| Err(FailoverError::Corrupt(format!("job {}: {what}", self.id)));
        match (self.kind, self.failover_kind) {
            (JobKind::Failover, None) => return damaged("a failover job without its kind".into()),
            (JobKind::Plan, Some(_)) if self.plan_op != Some(PlanOp::Failover) => {
                return damaged("a plan job with a failover kind but no failover".into())
            }
            (JobKind::Commit | JobKind::CleanupTest | JobKind::Reprotect, Some(k)) => {
                return damaged(format!(
                    "a {} job with failover kind {}",
                    self.kind.tag(),
                    k.tag()
                ))
            }
            _ => {}
        }
        if self.kind == JobKind::Plan {
            if self.plan.is_empty() || self.vm_name.is_some() || !self.group.is_empty() {
                return damaged("a plan job names no plan, or a VM or group".into());
            }
        } else if self.vm_name.is_none() == self.group.is_empty() {
            return damaged("names neither one VM nor one group".into());
        }
        Ok(())
    }
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| FailoverError::Corrupt(e.to_string()))
}

/// A stored job, checked: a damaged one is Corrupt.
fn decode(b: &[u8]) -> Result<JobRecord> {
    let job: JobRecord =
        serde_json::from_slice(b).map_err(|e| FailoverError::Corrupt(format!("job: {e}")))?;
    job.check()?;
    Ok(job)
}

/// Every job, persisted, with live watchers.
pub struct Jobs {
    db: sled::Db,
    jobs: sled::Tree,
    requests: sled::Tree,
    watchers: Mutex<HashMap<JobId, watch::Sender<JobRecord>>>,
    /// Makes every save fail, to test how jobs stop when storage does.
    #[cfg(test)]
    pub(crate) fail_saves: std::sync::atomic::AtomicBool,
}

impl Jobs {
    pub fn open(db: &sled::Db) -> Result<Jobs> {
        Ok(Jobs {
            db: db.clone(),
            jobs: db.open_tree("jobs")?,
            requests: db.open_tree("requests")?,
            watchers: Mutex::new(HashMap::new()),
            #[cfg(test)]
            fail_saves: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A new job id: time-ordered, so listing newest first is a reverse scan.
    pub fn new_id(&self) -> Result<JobId> {
        let n = self.db.generate_id()?;
        JobId::parse(format!("job-{:016x}-{n}", UnixNanos::now().get()))
            .map_err(|e| FailoverError::Corrupt(e.to_string()))
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
        self.jobs.insert(job.id.as_str().as_bytes(), json(job)?)?;
        if !job.request_id.is_empty() {
            self.requests
                .insert(job.request_id.as_bytes(), job.id.as_str().as_bytes())?;
        }
        self.db.flush()?;
        self.publish(job);
        Ok(())
    }

    /// Stores a job's new state durably and tells its watchers.
    pub fn save(&self, job: &JobRecord) -> Result<()> {
        #[cfg(test)]
        if self.fail_saves.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(FailoverError::Io {
                path: "jobs".into(),
                source: std::io::Error::other("saves fail (test)"),
            });
        }
        self.jobs.insert(job.id.as_str().as_bytes(), json(job)?)?;
        self.db.flush()?;
        self.publish(job);
        Ok(())
    }

    /// Tells watchers without writing (progress between saves).
    pub fn publish(&self, job: &JobRecord) {
        if let Ok(mut w) = self.watchers.lock() {
            match w.get(&job.id) {
                Some(tx) => {
                    tx.send_replace(job.clone());
                }
                None => {
                    w.insert(job.id.clone(), watch::channel(job.clone()).0);
                }
            }
        }
    }

    /// A job by id.
    pub fn get(&self, id: &str) -> Result<Option<JobRecord>> {
        self.jobs
            .get(id.as_bytes())?
            .map(|b| decode(&b))
            .transpose()
    }

    /// Jobs newest first, optionally of one VM.
    pub fn list(&self, vm: Option<&str>, limit: usize) -> Result<Vec<JobRecord>> {
        let mut out = Vec::new();
        for kv in self.jobs.iter().rev() {
            let job = decode(&kv?.1)?;
            let of_vm = |v: &str| {
                job.vm_name.as_ref().is_some_and(|n| n.as_str() == v)
                    || job.members.iter().any(|m| m.vm_name.as_str() == v)
            };
            if vm.is_none_or(of_vm) {
                out.push(job);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Jobs that have not ended (to resume after a restart), and the
    /// stored records that cannot be read, by key, with why.
    pub fn unfinished(&self) -> Result<(Vec<JobRecord>, Vec<Damaged>)> {
        let (mut out, mut damaged) = (Vec::new(), Vec::new());
        for kv in self.jobs.iter() {
            let (key, value) = kv?;
            match decode(&value) {
                Ok(job) if !job.ended() => out.push(job),
                Ok(_) => {}
                Err(e) => damaged.push((String::from_utf8_lossy(&key).into_owned(), e)),
            }
        }
        Ok((out, damaged))
    }

    /// The job with progress not yet persisted.
    pub fn live(&self, job: &JobRecord) -> JobRecord {
        self.watchers
            .lock()
            .ok()
            .and_then(|w| w.get(&job.id).map(|tx| tx.borrow().clone()))
            .unwrap_or_else(|| job.clone())
    }

    /// A receiver of the job's changes.
    pub fn watch(&self, job: &JobRecord) -> Option<watch::Receiver<JobRecord>> {
        let mut w = self.watchers.lock().ok()?;
        Some(
            w.entry(job.id.clone())
                .or_insert_with(|| watch::channel(job.clone()).0)
                .subscribe(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as failover-svc wrote it before tags: proto integers.
    fn legacy(kind: &str, failover_kind: &str, state: &str) -> String {
        format!(
            r#"{{"id":"job-1","kind":{kind},"failover_kind":{failover_kind},"vm_name":"vm",
            "choice":"LatestProcessed","test_network":"","state":{state},
            "steps":[{{"name":"validate","state":3,"message":"VM vm is PROTECTED"}},
                     {{"name":"fence","state":1,"message":""}}],
            "bytes_done":0,"bytes_total":0,
            "points":[{{"vm_name":"vm","point_id":"rp-3","time_nanos":5,"data_loss_nanos":7}}],
            "error":"","request_id":"","created_nanos":1,"finished_nanos":0,"from_state":2}}"#
        )
    }

    fn jobs() -> (tempfile::TempDir, Jobs) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        (dir, Jobs::open(&db).unwrap())
    }

    fn store(jobs: &Jobs, id: &str, record: &str) {
        jobs.jobs.insert(id.as_bytes(), record.as_bytes()).unwrap();
    }

    #[test]
    fn a_legacy_record_of_proto_integers_still_resumes() {
        let (_dir, jobs) = jobs();
        store(&jobs, "job-1", &legacy("1", "2", "2"));
        let job = jobs.get("job-1").unwrap().unwrap();
        assert_eq!(job.kind, JobKind::Failover);
        assert_eq!(job.failover_kind, Some(FailoverKind::Planned));
        assert_eq!(job.state, JobState::Running);
        assert_eq!(job.steps[0].state, JobState::Succeeded);
        assert_eq!(job.steps[1].state, JobState::Queued);
        assert_eq!(job.steps[1].step, Step::Fence);
        assert_eq!(job.points[0].time_nanos, UnixNanos(5));
        let (resumable, damaged) = jobs.unfinished().unwrap();
        assert_eq!(resumable, vec![job.clone()]);
        assert!(damaged.is_empty(), "{damaged:?}");
        // A commit stored its unset failover kind as 0.
        store(
            &jobs,
            "job-2",
            &legacy("2", "0", "1").replace("job-1", "job-2"),
        );
        let commit = jobs.get("job-2").unwrap().unwrap();
        assert_eq!((commit.kind, commit.failover_kind), (JobKind::Commit, None));
    }

    #[test]
    fn a_record_with_a_damaged_failover_kind_is_refused_not_run_as_unplanned() {
        let (_dir, jobs) = jobs();
        for (i, damaged) in ["9", "0", "null", "\"sideways\"", "-1", "3.5"]
            .iter()
            .enumerate()
        {
            let id = format!("job-{i}");
            store(&jobs, &id, &legacy("1", damaged, "2").replace("job-1", &id));
            let got = jobs.get(&id);
            assert!(
                matches!(got, Err(FailoverError::Corrupt(_))),
                "failover_kind {damaged}: {got:?}"
            );
        }
        // Nothing is resumed from damaged records, least of all a fence:
        // each is set apart, named, with why.
        let (resumable, damaged) = jobs.unfinished().unwrap();
        assert!(resumable.is_empty(), "{resumable:?}");
        assert_eq!(damaged.len(), 6, "{damaged:?}");
        assert!(damaged
            .iter()
            .all(|(_, e)| matches!(e, FailoverError::Corrupt(_))));
    }

    #[test]
    fn a_record_with_a_missing_or_unknown_kind_or_state_is_refused() {
        let (_dir, jobs) = jobs();
        let cases = [
            legacy("1", "3", "2").replace(r#""kind":1,"#, ""),
            legacy("1", "3", "2").replace(r#""failover_kind":3,"#, ""),
            legacy("7", "3", "2"),
            legacy("0", "3", "2"),
            legacy("1", "3", "0"),
            legacy("1", "3", "\"paused\""),
            legacy("1", "3", "2").replace(r#""state":3"#, r#""state":5"#),
            // A commit that claims a failover kind is damaged too.
            legacy("2", "3", "2"),
            // A step no version of failover-svc had.
            legacy("1", "3", "2").replace(r#""fence""#, r#""reboot""#),
        ];
        for (i, record) in cases.iter().enumerate() {
            store(&jobs, "job-x", record);
            let got = jobs.get("job-x");
            assert!(
                matches!(got, Err(FailoverError::Corrupt(_))),
                "case {i}: {got:?}"
            );
        }
    }

    #[test]
    fn records_are_written_by_stable_tags_and_read_back() {
        let (_dir, jobs) = jobs();
        let mut job = JobRecord::new(
            jobs.new_id().unwrap(),
            JobKind::Failover,
            Some(FailoverKind::Unplanned),
            &[Step::Fence],
            "key".into(),
        );
        job.vm_name = Some(VmName::parse("vm").unwrap());
        job.steps[0].state = JobState::Running;
        jobs.insert(&job).unwrap();
        let stored = jobs.jobs.get(job.id.as_str()).unwrap().unwrap();
        let text = String::from_utf8_lossy(&stored).to_string();
        for tag in [
            r#""kind":"failover""#,
            r#""failover_kind":"unplanned""#,
            r#""state":"queued""#,
            r#""state":"running""#,
        ] {
            assert!(text.contains(tag), "{tag} in {text}");
        }
        assert_eq!(jobs.get(job.id.as_str()).unwrap(), Some(job.clone()));
        assert_eq!(jobs.by_request("key").unwrap(), Some(job));
    }
}
