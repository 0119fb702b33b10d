//! The audit trail (docs/security.md, "Audit trail"): every mutating call a
//! server handles, allowed or refused, as one record (time, caller, method,
//! target, gRPC code, refusal message), appended to
//! `<data_dir>/audit/audit-<unix day>.jsonl`, logged at info with stable
//! fields, kept [`crate::config::Limits::audit_retention_days`] days and
//! listed by `ferry.audit.v1.Audit/ListAuditRecords`.
//!
//! The authorization layer ([`super::layer`]) writes the records: it knows
//! the caller, the method and the outcome, but not the body; the handler
//! names what the call acts on with [`target`].

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_proto::audit::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Request, Response, Status};

/// Records waiting for the writer; more are dropped (and counted), never
/// waited for.
pub const QUEUE: usize = 4096;
/// Records a listing returns when the request asks for none in particular.
pub const DEFAULT_LIMIT: usize = 1000;
/// The most records one listing returns.
pub const MAX_LIMIT: usize = 10_000;
const SECS_PER_DAY: u64 = 86_400;

/// Why the audit trail could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the audit writer: {0}")]
    Writer(std::io::Error),
}

/// What a call acted on: kinds and names, as "vm/web-1,job/j-7".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target(Vec<(&'static str, String)>);

impl Target {
    fn one(kind: &'static str, name: impl Into<String>) -> Target {
        Target(vec![(kind, name.into())])
    }
    /// A VM.
    pub fn vm(name: impl Into<String>) -> Target {
        Target::one("vm", name)
    }
    /// A replication group.
    pub fn group(name: impl Into<String>) -> Target {
        Target::one("group", name)
    }
    /// A replication policy.
    pub fn policy(name: impl Into<String>) -> Target {
        Target::one("policy", name)
    }
    /// A network mapping.
    pub fn mapping(name: impl Into<String>) -> Target {
        Target::one("mapping", name)
    }
    /// An operator token (by name).
    pub fn token(name: impl Into<String>) -> Target {
        Target::one("token", name)
    }
    /// A failover job.
    pub fn job(id: impl Into<String>) -> Target {
        Target::one("job", id)
    }
    /// A recovery point.
    pub fn point(id: impl Into<String>) -> Target {
        Target::one("point", id)
    }
    /// A target-region network.
    pub fn network(name: impl Into<String>) -> Target {
        Target::one("network", name)
    }
    /// This target and `other`'s parts.
    pub fn and(mut self, other: Target) -> Target {
        self.0.extend(other.0);
        self
    }
    /// Whether a record's target text names VM `vm`.
    pub fn text_names_vm(text: &str, vm: &str) -> bool {
        text.split(',')
            .any(|part| part.strip_prefix("vm/") == Some(vm))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("-");
        }
        let parts: Vec<String> = self
            .0
            .iter()
            .filter(|(_, name)| !name.is_empty())
            .map(|(kind, name)| format!("{kind}/{name}"))
            .collect();
        if parts.is_empty() {
            return f.write_str("-");
        }
        f.write_str(&parts.join(","))
    }
}

/// Where a handler puts its call's target; the layer puts one in the
/// request's extensions when the call is recorded and reads it back when
/// the call ends.
#[derive(Debug, Clone, Default)]
pub struct Slot(Arc<Mutex<Target>>);

impl Slot {
    /// Sets the target (replacing any before).
    pub fn set(&self, target: Target) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *slot = target;
    }
    /// Adds to the target (a job id learnt once the call ran).
    pub fn add(&self, target: Target) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        slot.0.extend(target.0);
    }
    pub(crate) fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).to_string()
    }
}

/// Names what `request` acts on in its audit record (nothing when the call
/// is not recorded). Call before `into_inner`.
pub fn target<T>(request: &Request<T>, target: Target) {
    if let Some(slot) = request.extensions().get::<Slot>() {
        slot.set(target);
    }
}

/// The request's slot, to add to later (after `into_inner`); a detached one
/// when the call is not recorded.
pub fn slot<T>(request: &Request<T>) -> Slot {
    request
        .extensions()
        .get::<Slot>()
        .cloned()
        .unwrap_or_default()
}

/// One recorded call: the stable field set of the JSON lines, the logs and
/// the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// RFC 3339, milliseconds, UTC.
    pub time: String,
    /// Identity URI, "anonymous" or "unchecked".
    pub caller: String,
    /// "package.Service/Method".
    pub method: String,
    /// [`Target`] as text; "-" when unknown.
    pub target: String,
    /// gRPC code name ("OK", "PERMISSION_DENIED").
    pub code: String,
    /// Why it was refused or failed; empty when OK.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl AuditRecord {
    /// A record of a call ending now.
    pub fn now(caller: &str, method: &str, target: &str, code: Code, message: &str) -> Self {
        AuditRecord {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            caller: caller.to_string(),
            method: method.to_string(),
            target: target.to_string(),
            code: code_name(code).to_string(),
            message: if code == Code::Ok {
                String::new()
            } else {
                message.to_string()
            },
        }
    }

    /// The record's time; None if unreadable.
    pub fn when(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339_weak(&self.time).ok()
    }

    fn to_proto(&self) -> pb::AuditRecord {
        pb::AuditRecord {
            time: self.when().map(crate::time::to_timestamp),
            caller: self.caller.clone(),
            method: self.method.clone(),
            target: self.target.clone(),
            code: self.code.clone(),
            message: self.message.clone(),
        }
    }
}

/// The gRPC name of a code, as grpc-go and grpcurl print it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Which records a listing returns.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only those whose target names this VM.
    pub vm: Option<String>,
    /// Only those at or after this time.
    pub since: Option<SystemTime>,
    /// The newest this many (0: [`DEFAULT_LIMIT`]; at most [`MAX_LIMIT`]).
    pub limit: usize,
}

enum Message {
    Record(AuditRecord),
    Flush(oneshot::Sender<()>),
}

struct Inner {
    dir: PathBuf,
    queue: mpsc::Sender<Message>,
    dropped: AtomicU64,
    /// The queue's other end when no writer reads it (tests).
    _unread: Option<mpsc::Receiver<Message>>,
}

/// A server's audit trail: [`AuditLog::record`] never waits; a writer
/// thread appends and fsyncs in batches and deletes day files past
/// retention.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

fn unix_day(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / SECS_PER_DAY
}

fn day_file(dir: &Path, day: u64) -> PathBuf {
    dir.join(format!("audit-{day}.jsonl"))
}

/// The day files in `dir`, by day.
fn day_files(dir: &Path) -> std::io::Result<BTreeMap<u64, PathBuf>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let day = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("audit-"))
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(day) = day {
            files.insert(day, path);
        }
    }
    Ok(files)
}

/// Deletes the day files older than `retention_days` (today counts as one).
fn prune(dir: &Path, retention_days: u64, today: u64) {
    let keep_from = today.saturating_sub(retention_days.max(1) - 1);
    let files = match day_files(dir) {
        Ok(files) => files,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot list the audit trail for retention");
            return;
        }
    };
    for (_, path) in files.range(..keep_from) {
        match std::fs::remove_file(path) {
            Ok(()) => {
                tracing::info!(file = %path.display(), "audit day file past retention deleted")
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot delete an audit day file past retention")
            }
        }
    }
}

fn append(dir: &Path, batch: &[AuditRecord]) -> std::io::Result<()> {
    let mut by_day: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for record in batch {
        let day = record.when().map(unix_day).unwrap_or_default();
        let buf = by_day.entry(day).or_default();
        serde_json::to_writer(&mut *buf, record).map_err(std::io::Error::other)?;
        buf.push(b'\n');
    }
    for (day, bytes) in by_day {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(day_file(dir, day))?;
        file.write_all(&bytes)?;
        file.sync_data()?;
    }
    Ok(())
}

fn writer(dir: PathBuf, retention_days: u64, mut queue: mpsc::Receiver<Message>) {
    let mut pruned_on = unix_day(SystemTime::now());
    let mut batch = Vec::new();
    let mut flushes = Vec::new();
    while let Some(first) = queue.blocking_recv() {
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Record(r) => batch.push(r),
                Message::Flush(done) => flushes.push(done),
            }
            if batch.len() < 512 {
                next = queue.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            if let Err(e) = append(&dir, &batch) {
                tracing::warn!(dir = %dir.display(), error = %e, lost = batch.len(), "cannot append to the audit trail");
            }
            batch.clear();
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
        let today = unix_day(SystemTime::now());
        if today != pruned_on {
            prune(&dir, retention_days, today);
            pruned_on = today;
        }
    }
}

impl AuditLog {
    /// Opens (creating) the trail in `dir`, deletes day files past
    /// `retention_days` and starts the writer.
    pub fn open(dir: &Path, retention_days: u64) -> Result<AuditLog, AuditError> {
        AuditLog::with_queue(dir, retention_days, QUEUE, true)
    }

    /// [`AuditLog::open`] with a queue of `capacity`; without a writer when
    /// `write` is false (tests of a full queue).
    pub fn with_queue(
        dir: &Path,
        retention_days: u64,
        capacity: usize,
        write: bool,
    ) -> Result<AuditLog, AuditError> {
        std::fs::create_dir_all(dir).map_err(|source| AuditError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        prune(dir, retention_days, unix_day(SystemTime::now()));
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let unread = if write {
            let writer_dir = dir.to_path_buf();
            std::thread::Builder::new()
                .name("ferry-audit".into())
                .spawn(move || writer(writer_dir, retention_days, rx))
                .map_err(AuditError::Writer)?;
            None
        } else {
            Some(rx)
        };
        Ok(AuditLog {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                queue: tx,
                dropped: AtomicU64::new(0),
                _unread: unread,
            }),
        })
    }

    /// Logs `record` and queues it for the file, without waiting: when the
    /// queue is full the record is counted in [`AuditLog::dropped`] and a
    /// warning logged.
    pub fn record(&self, record: AuditRecord) {
        tracing::info!(
            audit.time = %record.time,
            audit.caller = %record.caller,
            audit.method = %record.method,
            audit.target = %record.target,
            audit.code = %record.code,
            audit.message = %record.message,
            "audit"
        );
        if self.inner.queue.try_send(Message::Record(record)).is_err() {
            let dropped = self.inner.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                dropped,
                "audit record not persisted: the audit writer is behind (its log line above remains)"
            );
        }
    }

    /// Records dropped because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Waits (up to `deadline`) until every record queued before is on disk.
    pub async fn flush(&self, deadline: Duration) -> bool {
        let (done, written) = oneshot::channel();
        let queued = tokio::time::timeout(deadline, async {
            self.inner.queue.send(Message::Flush(done)).await.is_ok() && written.await.is_ok()
        })
        .await;
        matches!(queued, Ok(true))
    }

    /// The records `filter` selects, oldest first (blocking file reads).
    pub fn list(&self, filter: &Filter) -> Result<Vec<AuditRecord>, AuditError> {
        let io = |source| AuditError::Io {
            path: self.inner.dir.clone(),
            source,
        };
        let limit = match filter.limit {
            0 => DEFAULT_LIMIT,
            n => n.min(MAX_LIMIT),
        };
        let first_day = filter.since.map(unix_day).unwrap_or(0);
        let mut out = std::collections::VecDeque::new();
        for (_, path) in day_files(&self.inner.dir).map_err(io)?.range(first_day..) {
            let file = match File::open(path) {
                Ok(f) => f,
                // Deleted by retention meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(e)),
            };
            for line in BufReader::new(file).lines() {
                let line = line.map_err(io)?;
                // A line torn by a crash is skipped.
                let Ok(record) = serde_json::from_str::<AuditRecord>(&line) else {
                    continue;
                };
                if let Some(since) = filter.since {
                    if record.when().is_none_or(|t| t < since) {
                        continue;
                    }
                }
                if let Some(vm) = &filter.vm {
                    if !Target::text_names_vm(&record.target, vm) {
                        continue;
                    }
                }
                out.push_back(record);
                if out.len() > limit {
                    out.pop_front();
                }
            }
        }
        Ok(out.into())
    }
}

/// `ferry.audit.v1.Audit`, answering from this server's trail.
#[derive(Clone, Debug)]
pub struct AuditService {
    log: Option<AuditLog>,
}

impl AuditService {
    /// The service for `log` (None: a server that keeps no trail).
    pub fn new(log: Option<AuditLog>) -> Self {
        AuditService { log }
    }
}

#[tonic::async_trait]
impl pb::audit_server::Audit for AuditService {
    async fn list_audit_records(
        &self,
        request: Request<pb::ListAuditRecordsRequest>,
    ) -> Result<Response<pb::ListAuditRecordsResponse>, Status> {
        let Some(log) = self.log.clone() else {
            return Err(Status::failed_precondition(
                "this server keeps no audit trail",
            ));
        };
        let request = request.into_inner();
        let since = match &request.since {
            Some(t) => Some(crate::time::from_timestamp(t).ok_or_else(|| {
                Status::invalid_argument("since is not a valid time (before 1970 or malformed)")
            })?),
            None => None,
        };
        let filter = Filter {
            vm: Some(request.vm).filter(|vm| !vm.is_empty()),
            since,
            limit: usize::try_from(request.limit).unwrap_or(MAX_LIMIT),
        };
        // What was recorded before this call is listed.
        log.flush(Duration::from_secs(2)).await;
        let records = tokio::task::spawn_blocking(move || log.list(&filter))
            .await
            .map_err(|e| Status::internal(format!("audit listing failed: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ListAuditRecordsResponse {
            records: records.iter().map(AuditRecord::to_proto).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(vm: &str, code: Code) -> AuditRecord {
        AuditRecord::now(
            "spiffe://ferry/operator/admin/alice",
            "ferry.registry.v1.Registry/RegisterVm",
            &Target::vm(vm).to_string(),
            code,
            "no",
        )
    }

    #[tokio::test]
    async fn records_are_appended_and_listed_by_vm_time_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 30).unwrap();
        log.record(record("web-1", Code::Ok));
        log.record(record("db-1", Code::PermissionDenied));
        log.record(record("web-1", Code::NotFound));
        assert!(log.flush(Duration::from_secs(5)).await);

        let all = log.list(&Filter::default()).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].code, "OK");
        assert_eq!(all[0].message, "", "no message on OK");
        assert_eq!(all[1].message, "no");
        let web = log
            .list(&Filter {
                vm: Some("web-1".into()),
                ..Filter::default()
            })
            .unwrap();
        assert_eq!(web.len(), 2);
        assert!(web.iter().all(|r| r.target == "vm/web-1"));
        let newest = log
            .list(&Filter {
                limit: 1,
                ..Filter::default()
            })
            .unwrap();
        assert_eq!(newest, vec![all[2].clone()]);
        let future = log
            .list(&Filter {
                since: Some(SystemTime::now() + Duration::from_secs(60)),
                ..Filter::default()
            })
            .unwrap();
        assert!(future.is_empty());

        // The file is JSON lines with the stable field set.
        let today = unix_day(SystemTime::now());
        let text = std::fs::read_to_string(day_file(dir.path(), today)).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        let mut keys: Vec<&str> = first
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["caller", "code", "method", "target", "time"]);
    }

    #[test]
    fn day_files_past_retention_are_deleted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let today = unix_day(SystemTime::now());
        for age in [0, 29, 30, 45] {
            std::fs::write(day_file(dir.path(), today - age), "").unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), "").unwrap();
        let _log = AuditLog::with_queue(dir.path(), 30, 1, false).unwrap();
        let mut left: Vec<u64> = day_files(dir.path()).unwrap().into_keys().collect();
        left.sort_unstable();
        assert_eq!(left, vec![today - 29, today]);
        assert!(
            dir.path().join("notes.txt").exists(),
            "other files are left"
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        // No writer: the queue holds 2 and never drains.
        let log = AuditLog::with_queue(dir.path(), 30, 2, false).unwrap();
        for _ in 0..10 {
            log.record(record("web-1", Code::Ok));
        }
        assert_eq!(log.dropped(), 8);
    }

    #[test]
    fn targets_read_as_kind_and_name() {
        let t = Target::vm("web-1").and(Target::job("j-1"));
        assert_eq!(t.to_string(), "vm/web-1,job/j-1");
        assert!(Target::text_names_vm(&t.to_string(), "web-1"));
        assert!(!Target::text_names_vm(&t.to_string(), "web"));
        assert!(!Target::text_names_vm("group/web-1", "web-1"));
        assert_eq!(Target::default().to_string(), "-");
        assert_eq!(Target::vm("").to_string(), "-");
    }
}
