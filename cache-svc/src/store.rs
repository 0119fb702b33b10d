//! Every VM's log and the sled index beside them: per VM its epoch, its
//! applied sequence and its sealed segments.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_proto::cache::v1::Record;
use ferry_proto::ids::{Epoch, Incarnation, Sequence};
use ferry_runtime::Refused;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::error::CacheError;
use crate::log::{SegmentMeta, VmLog};

/// What the index keeps of a VM besides its segments.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct VmMeta {
    /// The highest agent epoch seen; streams from lower epochs are fenced.
    pub epoch: Epoch,
    /// The highest sequence the processor reported durably applied.
    pub applied: Sequence,
    /// The protected item's incarnation (registry) the log belongs to; 0
    /// for logs from before incarnations.
    #[serde(default)]
    pub incarnation: Incarnation,
    /// A random id of this log's numbering, new whenever the log starts
    /// again, so a reader can tell a continuation from a gap.
    #[serde(default)]
    pub lineage: u64,
    /// Set while a restart of the log at this sequence is recorded but its
    /// old segments may not all be deleted yet (finished at open).
    #[serde(default)]
    pub restart_at: Option<u64>,
}

/// One VM's log with its live state.
pub struct VmState {
    pub vm: String,
    log: Mutex<VmLog>,
    meta: Mutex<VmMeta>,
    /// The highest durable sequence, for tails that follow.
    durable: watch::Sender<u64>,
    /// Raised whenever the log starts again under its readers and writers
    /// (a new incarnation, numbering moved past a loss, the log deleted):
    /// open ingest and tail streams end, and their peers start over.
    restarts: watch::Sender<u64>,
    /// Traced batches ingested lately, with the context of their ingest
    /// span, for the tails that send their records on (memory only: a
    /// restart ends those traces here).
    traces: Mutex<ferry_runtime::batch_trace::Recent>,
}

/// How many traced batches a VM's log remembers for its tails.
const RECENT_TRACES: usize = 64;

fn poisoned() -> CacheError {
    CacheError::Corrupt("a log lock was poisoned by a panic".into())
}

impl VmState {
    /// The highest durable sequence, and a receiver that sees it rise.
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    pub fn meta(&self) -> Result<VmMeta, CacheError> {
        self.meta.lock().map(|m| *m).map_err(|_| poisoned())
    }

    /// A receiver that sees the log start again (or go).
    pub fn restarts(&self) -> watch::Receiver<u64> {
        self.restarts.subscribe()
    }

    /// Remembers a traced batch for the tails.
    pub fn traced(&self, trace: ferry_proto::cache::v1::BatchTrace) {
        if let Ok(mut traces) = self.traces.lock() {
            traces.push(trace);
        }
    }

    /// The traced batches among records `first..=last`.
    pub fn traces(&self, first: u64, last: u64) -> Vec<ferry_proto::cache::v1::BatchTrace> {
        self.traces
            .lock()
            .map(|t| t.overlapping(first, last))
            .unwrap_or_default()
    }

    /// Runs `f` on the log under its lock.
    pub fn with_log<T>(&self, f: impl FnOnce(&mut VmLog) -> T) -> Result<T, CacheError> {
        let mut log = self.log.lock().map_err(|_| poisoned())?;
        Ok(f(&mut log))
    }
}

/// All logs.
pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    index: sled::Tree,
    segment_limit: u64,
    quotas: Quotas,
    vms: Mutex<HashMap<String, Arc<VmState>>>,
    /// VMs whose logs hold damaged acknowledged records and could not be
    /// set aside: kept as they are, refused (DATA_LOSS); why, and the meta.
    damaged: Mutex<HashMap<String, (String, VmMeta)>>,
    /// VMs whose damaged logs were set aside at open and started again, and
    /// what to tell registry about it.
    repaired: Mutex<Vec<(String, String)>>,
    /// Logs found damaged while serving (set aside and started again), for
    /// registry: a bounded queue the service's reporter drains.
    reports: (
        mpsc::Sender<DamageReport>,
        Mutex<Option<mpsc::Receiver<DamageReport>>>,
    ),
}

/// A VM and what registry should hear about its damaged log.
pub type DamageReport = (String, String);

/// A fresh random lineage (never 0, which means "none").
fn new_lineage() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // No entropy source: the time still differs between restarts.
        let nanos = ferry_runtime::time::unix_nanos_now();
        bytes = nanos.to_le_bytes();
    }
    u64::from_le_bytes(bytes).max(1)
}

/// Bytes of log the cache keeps at most, per VM and in all. They bound what is
/// retained (acknowledged but not yet applied); past them new batches are
/// refused with RESOURCE_EXHAUSTED and nothing acknowledged is dropped.
#[derive(Debug, Clone, Copy)]
pub struct Quotas {
    pub per_vm_bytes: u64,
    pub total_bytes: u64,
}

fn vm_key(vm: &str) -> String {
    format!("vm/{vm}")
}

fn seg_key(vm: &str, first_seq: u64) -> String {
    format!("seg/{vm}/{first_seq:020}")
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], bytes: &[u8]) -> Result<T, CacheError> {
    serde_json::from_slice(bytes).map_err(|e| {
        CacheError::Corrupt(format!("index entry {}: {e}", String::from_utf8_lossy(key)))
    })
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CacheError> {
    serde_json::to_vec(value).map_err(|e| CacheError::Corrupt(e.to_string()))
}

impl Store {
    /// Opens every VM's log under `dir`: torn tails are cut, so each log
    /// holds exactly what was acknowledged.
    pub fn open(dir: &Path, segment_limit: u64, quotas: Quotas) -> Result<Store, CacheError> {
        let db = sled::Config::new().path(dir.join("index.sled")).open()?;
        let index = db.open_tree("cache")?;
        let store = Store {
            dir: dir.to_path_buf(),
            db,
            index,
            segment_limit,
            quotas,
            vms: Mutex::new(HashMap::new()),
            damaged: Mutex::new(HashMap::new()),
            repaired: Mutex::new(Vec::new()),
            reports: {
                let (tx, rx) = mpsc::channel(256);
                (tx, Mutex::new(Some(rx)))
            },
        };
        let mut vms = HashMap::new();
        for entry in store.index.scan_prefix("vm/") {
            let (key, bytes) = entry?;
            let meta: VmMeta = decode(&key, &bytes)?;
            let vm = String::from_utf8_lossy(&key["vm/".len()..]).into_owned();
            match store.load(&vm, meta) {
                Ok(state) => {
                    vms.insert(vm, state);
                }
                Err(e @ CacheError::Damaged { .. }) => match store.set_aside(&vm, meta) {
                    Ok((state, aside)) => {
                        let first = state.with_log(|log| log.first_seq())?;
                        let why = format!(
                            "{e}; the damaged log is kept in {} and a new one starts at \
                             sequence {first}; the VM is checked against its source by checksum",
                            aside.display()
                        );
                        tracing::error!(vm, why, "a VM's log is damaged: set aside, started again");
                        store
                            .repaired
                            .lock()
                            .map_err(|_| poisoned())?
                            .push((vm.clone(), why));
                        vms.insert(vm, state);
                    }
                    Err(set_aside) => {
                        tracing::error!(vm, error = %e, %set_aside, "a VM's log is damaged and cannot be set aside: kept as it is, refused");
                        store
                            .damaged
                            .lock()
                            .map_err(|_| poisoned())?
                            .insert(vm, (format!("{e} (not set aside: {set_aside})"), meta));
                    }
                },
                Err(e) => return Err(e),
            }
        }
        *store.vms.lock().map_err(|_| poisoned())? = vms;
        Ok(store)
    }

    fn log_dir(&self, vm: &str) -> PathBuf {
        self.dir.join("logs").join(ferry_runtime::path_name(vm))
    }

    fn load(&self, vm: &str, mut meta: VmMeta) -> Result<Arc<VmState>, CacheError> {
        let dir = self.log_dir(vm);
        let mut sealed = Vec::new();
        if meta.restart_at.is_some() {
            // A restart a crash interrupted: its old segments go now.
            crate::log::remove_segments(&dir)?;
            let mut batch = sled::Batch::default();
            for entry in self.index.scan_prefix(format!("seg/{vm}/")) {
                batch.remove(entry?.0);
            }
            self.index.apply_batch(batch)?;
        } else {
            for entry in self.index.scan_prefix(format!("seg/{vm}/")) {
                let (key, bytes) = entry?;
                sealed.push(decode::<SegmentMeta>(&key, &bytes)?);
            }
        }
        let start = meta.restart_at.unwrap_or(1);
        let log = VmLog::open(&dir, sealed, start, self.segment_limit)?;
        if meta.restart_at.is_some() || meta.lineage == 0 {
            meta.restart_at = None;
            if meta.lineage == 0 {
                meta.lineage = new_lineage();
            }
            self.index.insert(vm_key(vm), encode(&meta)?)?;
            self.db.flush()?;
        }
        tracing::info!(
            vm,
            first = log.first_seq(),
            last = log.last_seq(),
            incarnation = %meta.incarnation,
            lineage = meta.lineage,
            "log opened"
        );
        let (durable, _) = watch::channel(log.last_seq());
        let (restarts, _) = watch::channel(0);
        Ok(Arc::new(VmState {
            vm: vm.to_string(),
            log: Mutex::new(log),
            meta: Mutex::new(meta),
            durable,
            restarts,
            traces: Mutex::new(ferry_runtime::batch_trace::Recent::new(RECENT_TRACES)),
        }))
    }

    /// A VM's log, if the cache has one; DATA_LOSS if it is damaged.
    pub fn get(&self, vm: &str) -> Result<Option<Arc<VmState>>, CacheError> {
        if let Some((why, _)) = self.damaged.lock().map_err(|_| poisoned())?.get(vm) {
            return Err(Refused::data_loss(format!("VM {vm:?}'s log: {why}")).into());
        }
        Ok(self.vms.lock().map_err(|_| poisoned())?.get(vm).cloned())
    }

    /// The VMs whose logs are damaged, and why: those refused, then those
    /// set aside and started again.
    pub fn damaged(&self) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = self
            .damaged
            .lock()
            .map(|d| {
                d.iter()
                    .map(|(k, (why, _))| (k.clone(), why.clone()))
                    .collect()
            })
            .unwrap_or_default();
        if let Ok(r) = self.repaired.lock() {
            all.extend(r.iter().cloned());
        }
        all
    }

    /// A batch that records `meta` as the VM's and forgets its sealed
    /// segments (the log starts again, or goes).
    fn meta_without_segments(&self, vm: &str, meta: &VmMeta) -> Result<sled::Batch, CacheError> {
        let mut batch = sled::Batch::default();
        batch.insert(vm_key(vm).as_bytes(), encode(meta)?);
        for entry in self.index.scan_prefix(format!("seg/{vm}/")) {
            batch.remove(entry?.0);
        }
        Ok(batch)
    }

    /// The damage found while serving, for registry (taken once).
    pub fn take_reports(&self) -> Option<mpsc::Receiver<DamageReport>> {
        self.reports.1.lock().ok().and_then(|mut r| r.take())
    }

    /// A tail found acknowledged records of `state`'s log damaged (`why`):
    /// the log's directory is moved aside whole (kept for inspection, never
    /// read again) and the log starts again, empty, past everything it
    /// held, with a new lineage; every stream of it ends. The processor,
    /// seeing the new lineage, has the VM checked against its source by
    /// checksum; registry hears CRITICAL from "cache".
    pub async fn set_aside_live(&self, state: &Arc<VmState>, why: &str) -> Result<(), CacheError> {
        let meta = state.meta()?;
        let nanos = ferry_runtime::time::unix_nanos_now();
        let damaged = self.dir.join("damaged");
        let aside = damaged.join(format!("{}-{nanos}", ferry_runtime::path_name(&state.vm)));
        let dir = self.log_dir(&state.vm);
        let worker = state.clone();
        let (from, to) = (dir.clone(), aside.clone());
        let first_seq = tokio::task::spawn_blocking(move || {
            worker.with_log(|log| -> Result<u64, CacheError> {
                let first_seq = log.last_seq() + 1;
                // Before the files move, under the log's lock: readers of
                // the old files know.
                worker.restarts.send_modify(|n| *n += 1);
                ferry_runtime::durable::create_dir_all(&damaged)
                    .map_err(|e| CacheError::io(&damaged, e))?;
                std::fs::rename(&from, &to).map_err(|e| CacheError::io(&from, e))?;
                for parent in [&damaged, &from.parent().unwrap_or(&from).to_path_buf()] {
                    ferry_runtime::durable::sync_dir(parent)
                        .map_err(|e| CacheError::io(parent, e))?;
                }
                ferry_runtime::durable::create_dir_all(&from)
                    .map_err(|e| CacheError::io(&from, e))?;
                log.restart(first_seq)?;
                Ok(first_seq)
            })
        })
        .await
        .map_err(|_| CacheError::ShuttingDown)???;
        let next = VmMeta {
            lineage: new_lineage(),
            restart_at: None,
            applied: Sequence(first_seq - 1),
            ..meta
        };
        let batch = self.meta_without_segments(&state.vm, &next)?;
        self.index.apply_batch(batch)?;
        self.db.flush_async().await?;
        *state.meta.lock().map_err(|_| poisoned())? = next;
        state.durable.send_replace(first_seq - 1);
        let report = format!(
            "{why}; the damaged log is kept in {} and a new one starts at sequence {first_seq}; \
             the VM is checked against its source by checksum",
            aside.display()
        );
        tracing::error!(vm = %state.vm, report, "a VM's log is damaged: set aside, started again");
        if self.reports.0.try_send((state.vm.clone(), report)).is_err() {
            tracing::warn!(vm = %state.vm, "damage reports are backed up; registry hears later");
        }
        Ok(())
    }

    /// Moves a damaged log's directory aside (kept for inspection, never
    /// read again) and starts the VM's log again, empty, past what the
    /// processor reported applied, with a new lineage: the processor and
    /// the agent see the gap and the VM is checked against its source by
    /// checksum (a processor that applied more has the log renumbered past
    /// that when it tails). Returns the new log and where the old one went.
    fn set_aside(&self, vm: &str, meta: VmMeta) -> Result<(Arc<VmState>, PathBuf), CacheError> {
        let dir = self.log_dir(vm);
        let nanos = ferry_runtime::time::unix_nanos_now();
        let damaged = self.dir.join("damaged");
        ferry_runtime::durable::create_dir_all(&damaged)
            .map_err(|e| CacheError::io(&damaged, e))?;
        let aside = damaged.join(format!("{}-{nanos}", ferry_runtime::path_name(vm)));
        std::fs::rename(&dir, &aside).map_err(|e| CacheError::io(&dir, e))?;
        for parent in [&damaged, &self.dir.join("logs")] {
            ferry_runtime::durable::sync_dir(parent).map_err(|e| CacheError::io(parent, e))?;
        }
        let next = VmMeta {
            lineage: new_lineage(),
            restart_at: Some(meta.applied.get() + 1),
            ..meta
        };
        let batch = self.meta_without_segments(vm, &next)?;
        self.index.apply_batch(batch)?;
        self.db.flush()?;
        let state = self.load(vm, next)?;
        Ok((state, aside))
    }

    /// The quotas it enforces.
    pub fn quotas(&self) -> Quotas {
        self.quotas
    }

    /// Every open VM log's bytes (what counts toward the quotas) and
    /// records not yet applied, by VM.
    pub fn backlogs(&self) -> Vec<(String, u64, u64)> {
        let vms: Vec<Arc<VmState>> = self
            .vms
            .lock()
            .map(|vms| vms.values().cloned().collect())
            .unwrap_or_default();
        let mut all: Vec<(String, u64, u64)> = vms
            .iter()
            .filter_map(|s| {
                let applied = s.meta().ok()?.applied.get();
                let (bytes, last) = s.with_log(|log| (log.size(), log.last_seq())).ok()?;
                Some((s.vm.clone(), bytes, last.saturating_sub(applied)))
            })
            .collect();
        all.sort();
        all
    }

    /// Every VM with a log (damaged ones too) and the incarnation it
    /// belongs to.
    pub fn incarnations(&self) -> Vec<(String, Incarnation)> {
        let mut all: Vec<(String, Incarnation)> = self
            .vms
            .lock()
            .map(|vms| {
                vms.values()
                    .filter_map(|s| s.meta().ok().map(|m| (s.vm.clone(), m.incarnation)))
                    .collect()
            })
            .unwrap_or_default();
        if let Ok(damaged) = self.damaged.lock() {
            all.extend(
                damaged
                    .iter()
                    .map(|(vm, (_, m))| (vm.clone(), m.incarnation)),
            );
        }
        all
    }

    /// The log of `vm`'s protected item at `incarnation`, created empty if
    /// missing. A log of an older incarnation (replication was disabled and
    /// enabled again) is deleted and started again: nothing of the old item
    /// reaches the new one, and its epoch no longer fences the new agent. A
    /// log of a newer incarnation than registry's is refused and kept.
    pub async fn get_or_create(
        &self,
        vm: &str,
        incarnation: Incarnation,
    ) -> Result<Arc<VmState>, CacheError> {
        let damaged = self
            .damaged
            .lock()
            .map_err(|_| poisoned())?
            .get(vm)
            .map(|(_, m)| m.incarnation);
        if damaged.is_some_and(|old| old < incarnation) {
            // The damaged log belongs to a disabled item: it goes.
            self.remove(vm, Incarnation(incarnation.get().saturating_sub(1)))
                .await?;
        }
        if let Some(state) = self.get(vm)? {
            let meta = state.meta()?;
            if meta.incarnation > incarnation {
                return Err(Refused::failed_precondition(format!(
                    "the cache holds VM {vm:?}'s log of incarnation {}, newer than registry's                      {incarnation}: is registry restored from an older backup? The log is kept",
                    meta.incarnation
                )).into());
            }
            if meta.incarnation < incarnation {
                tracing::warn!(
                    vm,
                    old = %meta.incarnation,
                    new = %incarnation,
                    "replication was enabled again: the old log is deleted"
                );
                let fresh = VmMeta {
                    incarnation,
                    ..VmMeta::default()
                };
                self.restart(&state, fresh, 1).await?;
            }
            return Ok(state);
        }
        let meta = VmMeta {
            incarnation,
            lineage: new_lineage(),
            ..VmMeta::default()
        };
        self.index.insert(vm_key(vm), encode(&meta)?)?;
        self.db.flush_async().await?;
        let mut vms = self.vms.lock().map_err(|_| poisoned())?;
        if let Some(state) = vms.get(vm) {
            return Ok(state.clone());
        }
        let state = self.load(vm, meta)?;
        vms.insert(vm.to_string(), state.clone());
        Ok(state)
    }

    /// Starts the VM's log again, empty, at `first_seq`, with `next` as its
    /// meta and a new lineage. The restart is recorded durably before any
    /// segment goes, so a crash part way is finished at the next open;
    /// every open stream of the log ends.
    pub async fn restart(
        &self,
        state: &Arc<VmState>,
        next: VmMeta,
        first_seq: u64,
    ) -> Result<VmMeta, CacheError> {
        let first_seq = first_seq.max(1);
        let mut meta = VmMeta {
            lineage: new_lineage(),
            restart_at: Some(first_seq),
            ..next
        };
        let batch = self.meta_without_segments(&state.vm, &meta)?;
        self.index.apply_batch(batch)?;
        self.db.flush_async().await?;
        *state.meta.lock().map_err(|_| poisoned())? = meta;
        let worker = state.clone();
        tokio::task::spawn_blocking(move || {
            worker.with_log(|log| {
                // Before any file goes, under the log's lock: a tail that
                // read the old files and checks afterwards knows.
                worker.restarts.send_modify(|n| *n += 1);
                log.restart(first_seq)
            })
        })
        .await
        .map_err(|_| CacheError::ShuttingDown)???;
        meta.restart_at = None;
        self.save_meta(state, meta).await?;
        state.durable.send_replace(first_seq - 1);
        tracing::warn!(
            vm = %state.vm,
            first_seq,
            incarnation = %meta.incarnation,
            lineage = meta.lineage,
            "log started again"
        );
        Ok(meta)
    }

    /// Renumbers the VM's log past `applied`, which a reader applied from
    /// another lineage of it (this log was lost or set aside and started
    /// again, and its numbers overlap what the reader has): the log starts
    /// again after both, so no sequence number ever names two records. What
    /// it held is gone from the cache; the agent, finding the cache's
    /// numbering moved, checks every chunk by checksum.
    pub async fn renumber_past(
        &self,
        state: &Arc<VmState>,
        applied: u64,
    ) -> Result<VmMeta, CacheError> {
        let meta = state.meta()?;
        let last = state.with_log(|log| log.last_seq())?;
        let first_seq = applied.max(last) + 1;
        tracing::error!(
            vm = %state.vm,
            reader_applied = applied,
            log_last = last,
            first_seq,
            "the log's numbering overlaps what the processor applied from a lost log: \
             renumbering past both; the agent resyncs by checksum"
        );
        self.restart(
            state,
            VmMeta {
                applied: Sequence(first_seq - 1),
                ..meta
            },
            first_seq,
        )
        .await
    }

    /// Deletes the VM's log if it belongs to `incarnation` or an older one
    /// (its replication was disabled); open streams of it end.
    pub async fn remove(&self, vm: &str, incarnation: Incarnation) -> Result<bool, CacheError> {
        let damaged = self
            .damaged
            .lock()
            .map_err(|_| poisoned())?
            .get(vm)
            .map(|(_, m)| m.incarnation);
        let live = self.vms.lock().map_err(|_| poisoned())?.get(vm).cloned();
        let of = match (&live, damaged) {
            (Some(state), _) => state.meta()?.incarnation,
            (None, Some(of)) => of,
            (None, None) => return Ok(false),
        };
        if of > incarnation {
            return Ok(false);
        }
        let mut batch = sled::Batch::default();
        batch.remove(vm_key(vm).as_bytes());
        for entry in self.index.scan_prefix(format!("seg/{vm}/")) {
            batch.remove(entry?.0);
        }
        self.index.apply_batch(batch)?;
        self.db.flush_async().await?;
        self.vms.lock().map_err(|_| poisoned())?.remove(vm);
        self.damaged.lock().map_err(|_| poisoned())?.remove(vm);
        if let Some(state) = &live {
            state.with_log(|_| state.restarts.send_modify(|n| *n += 1))?;
        }
        let dir = self.log_dir(vm);
        let removed = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CacheError::io(&dir, e)),
        })
        .await
        .map_err(|_| CacheError::ShuttingDown)?;
        removed?;
        tracing::info!(vm, incarnation = %of, "log deleted: replication disabled");
        Ok(true)
    }

    async fn save_meta(&self, state: &VmState, meta: VmMeta) -> Result<(), CacheError> {
        self.index.insert(vm_key(&state.vm), encode(&meta)?)?;
        self.db.flush_async().await?;
        *state.meta.lock().map_err(|_| poisoned())? = meta;
        Ok(())
    }

    /// Raises the VM's epoch to `epoch`; refuses a lower one (a fenced agent).
    pub async fn admit_epoch(&self, state: &VmState, epoch: Epoch) -> Result<(), CacheError> {
        let meta = state.meta()?;
        if epoch < meta.epoch {
            return Err(Refused::failed_precondition(format!(
                "agent epoch {epoch} of VM {:?} is older than {}: this agent was fenced; \
                 register it again",
                state.vm, meta.epoch
            ))
            .into());
        }
        if epoch > meta.epoch {
            self.save_meta(state, VmMeta { epoch, ..meta }).await?;
        }
        Ok(())
    }

    /// Refuses a batch of `bytes` that would take the VM's log or all logs
    /// past their quota.
    fn check_quota(&self, state: &VmState, bytes: u64) -> Result<(), CacheError> {
        let mine = state.with_log(|log| log.size())?;
        if mine + bytes > self.quotas.per_vm_bytes {
            return Err(Refused::resource_exhausted(format!(
                "VM {:?} has {mine} bytes waiting in the cache (quota {}); back off until the \
                 processor catches up",
                state.vm, self.quotas.per_vm_bytes
            ))
            .into());
        }
        let vms: Vec<Arc<VmState>> = self
            .vms
            .lock()
            .map_err(|_| poisoned())?
            .values()
            .cloned()
            .collect();
        let mut total = bytes;
        for vm in vms {
            total += vm.with_log(|log| log.size())?;
        }
        if total > self.quotas.total_bytes {
            return Err(Refused::resource_exhausted(format!(
                "the cache holds its total quota of {} bytes; back off until the processor \
                 catches up",
                self.quotas.total_bytes
            ))
            .into());
        }
        Ok(())
    }

    /// Appends records durably (fsynced) and publishes the new durable
    /// sequence; refuses them (storing nothing) past a quota.
    pub async fn append(
        &self,
        state: &Arc<VmState>,
        records: Vec<Record>,
    ) -> Result<u64, CacheError> {
        self.append_while(state, records, || Ok(())).await
    }

    /// As [`Store::append`], if `writer` allows it when checked under the
    /// log's lock, so that no other writer can take over in between.
    pub async fn append_while(
        &self,
        state: &Arc<VmState>,
        records: Vec<Record>,
        writer: impl FnOnce() -> Result<(), CacheError> + Send + 'static,
    ) -> Result<u64, CacheError> {
        let bytes: u64 = records
            .iter()
            .map(|r| prost::Message::encoded_len(r) as u64 + crate::frame::HEADER as u64)
            .sum();
        self.check_quota(state, bytes)?;
        let worker = state.clone();
        let (appended, last) = tokio::task::spawn_blocking(move || {
            worker.with_log(|log| {
                writer()?;
                log.append(&records).map(|a| (a, log.last_seq()))
            })
        })
        .await
        .map_err(|_| CacheError::ShuttingDown)???;
        if let Some(sealed) = appended.sealed {
            self.index
                .insert(seg_key(&state.vm, sealed.first_seq), encode(&sealed)?)?;
            self.db.flush_async().await?;
        }
        state.durable.send_replace(last);
        Ok(last)
    }

    /// Records the processor's applied sequence and deletes the segments
    /// entirely below it. Returns the trim point (lowest retained sequence).
    /// A report about another lineage (0: any) trims nothing.
    pub async fn applied(
        &self,
        state: &Arc<VmState>,
        applied: Sequence,
        lineage: u64,
    ) -> Result<u64, CacheError> {
        let applied = applied.get();
        let ours = state.meta()?.lineage;
        if lineage != 0 && lineage != ours {
            return Err(Refused::failed_precondition(format!(
                "applied sequence {applied} of VM {:?} is about lineage {lineage:#x} of its log; \
                 the log is lineage {ours:#x} now: tail it again",
                state.vm
            ))
            .into());
        }
        let last = state.with_log(|log| log.last_seq())?;
        if applied > last {
            return Err(Refused::out_of_range(format!(
                "applied sequence {applied} of VM {:?} is beyond the last durable one, {last}",
                state.vm
            ))
            .into());
        }
        let meta = state.meta()?;
        if applied > meta.applied.get() {
            // Persist the applied point before deleting anything below it.
            let applied = Sequence(applied);
            self.save_meta(state, VmMeta { applied, ..meta }).await?;
        }
        let applied = applied.max(meta.applied.get());
        let worker = state.clone();
        let removed = tokio::task::spawn_blocking(move || worker.with_log(|log| log.trim(applied)))
            .await
            .map_err(|_| CacheError::ShuttingDown)???;
        for seg in &removed {
            self.index.remove(seg_key(&state.vm, seg.first_seq))?;
        }
        if !removed.is_empty() {
            self.db.flush_async().await?;
            tracing::info!(vm = %state.vm, segments = removed.len(), applied, "trimmed");
        }
        state.with_log(|log| log.first_seq())
    }
}
