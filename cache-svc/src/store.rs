//! Every VM's log and the sled index beside them: per VM its epoch, its
//! applied sequence and its sealed segments.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_proto::cache::v1::Record;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::CacheError;
use crate::log::{SegmentMeta, VmLog};

/// What the index keeps of a VM besides its segments.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct VmMeta {
    /// The highest agent epoch seen; streams from lower epochs are fenced.
    pub epoch: u64,
    /// The highest sequence the processor reported durably applied.
    pub applied: u64,
}

/// One VM's log with its live state.
pub struct VmState {
    pub vm: String,
    log: Mutex<VmLog>,
    meta: Mutex<VmMeta>,
    /// The highest durable sequence, for tails that follow.
    durable: watch::Sender<u64>,
}

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
    /// VMs whose logs hold damaged acknowledged records: kept on disk as
    /// they are, refused (DATA_LOSS) until an operator repairs them; why.
    damaged: Mutex<HashMap<String, String>>,
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
                Err(e @ CacheError::Damaged { .. }) => {
                    tracing::error!(vm, error = %e, "a VM's log is damaged: kept as it is, refused");
                    store
                        .damaged
                        .lock()
                        .map_err(|_| poisoned())?
                        .insert(vm, e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        *store.vms.lock().map_err(|_| poisoned())? = vms;
        Ok(store)
    }

    fn log_dir(&self, vm: &str) -> PathBuf {
        self.dir.join("logs").join(ferry_runtime::path_name(vm))
    }

    fn load(&self, vm: &str, meta: VmMeta) -> Result<Arc<VmState>, CacheError> {
        let mut sealed = Vec::new();
        for entry in self.index.scan_prefix(format!("seg/{vm}/")) {
            let (key, bytes) = entry?;
            sealed.push(decode::<SegmentMeta>(&key, &bytes)?);
        }
        let log = VmLog::open(&self.log_dir(vm), sealed, 1, self.segment_limit)?;
        tracing::info!(
            vm,
            first = log.first_seq(),
            last = log.last_seq(),
            "log opened"
        );
        let (durable, _) = watch::channel(log.last_seq());
        Ok(Arc::new(VmState {
            vm: vm.to_string(),
            log: Mutex::new(log),
            meta: Mutex::new(meta),
            durable,
        }))
    }

    /// A VM's log, if the cache has one; DATA_LOSS if it is damaged.
    pub fn get(&self, vm: &str) -> Result<Option<Arc<VmState>>, CacheError> {
        if let Some(why) = self.damaged.lock().map_err(|_| poisoned())?.get(vm) {
            return Err(CacheError::DataLoss(format!("VM {vm:?}'s log: {why}")));
        }
        Ok(self.vms.lock().map_err(|_| poisoned())?.get(vm).cloned())
    }

    /// The VMs whose logs are damaged, and why.
    pub fn damaged(&self) -> Vec<(String, String)> {
        self.damaged
            .lock()
            .map(|d| d.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// A VM's log, created empty if missing.
    pub async fn get_or_create(&self, vm: &str) -> Result<Arc<VmState>, CacheError> {
        if let Some(state) = self.get(vm)? {
            return Ok(state);
        }
        self.index.insert(vm_key(vm), encode(&VmMeta::default())?)?;
        self.db.flush_async().await?;
        let mut vms = self.vms.lock().map_err(|_| poisoned())?;
        if let Some(state) = vms.get(vm) {
            return Ok(state.clone());
        }
        let state = self.load(vm, VmMeta::default())?;
        vms.insert(vm.to_string(), state.clone());
        Ok(state)
    }

    async fn save_meta(&self, state: &VmState, meta: VmMeta) -> Result<(), CacheError> {
        self.index.insert(vm_key(&state.vm), encode(&meta)?)?;
        self.db.flush_async().await?;
        *state.meta.lock().map_err(|_| poisoned())? = meta;
        Ok(())
    }

    /// Raises the VM's epoch to `epoch`; refuses a lower one (a fenced agent).
    pub async fn admit_epoch(&self, state: &VmState, epoch: u64) -> Result<(), CacheError> {
        let meta = state.meta()?;
        if epoch < meta.epoch {
            return Err(CacheError::FailedPrecondition(format!(
                "agent epoch {epoch} of VM {:?} is older than {}: this agent was fenced; \
                 register it again",
                state.vm, meta.epoch
            )));
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
            return Err(CacheError::ResourceExhausted(format!(
                "VM {:?} has {mine} bytes waiting in the cache (quota {}); back off until the \
                 processor catches up",
                state.vm, self.quotas.per_vm_bytes
            )));
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
            return Err(CacheError::ResourceExhausted(format!(
                "the cache holds its total quota of {} bytes; back off until the processor \
                 catches up",
                self.quotas.total_bytes
            )));
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
    pub async fn applied(&self, state: &Arc<VmState>, applied: u64) -> Result<u64, CacheError> {
        let last = state.with_log(|log| log.last_seq())?;
        if applied > last {
            return Err(CacheError::OutOfRange(format!(
                "applied sequence {applied} of VM {:?} is beyond the last durable one, {last}",
                state.vm
            )));
        }
        let meta = state.meta()?;
        if applied > meta.applied {
            // Persist the applied point before deleting anything below it.
            self.save_meta(state, VmMeta { applied, ..meta }).await?;
        }
        let applied = applied.max(meta.applied);
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
