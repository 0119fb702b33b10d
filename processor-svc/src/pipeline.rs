//! One pipeline per replicating VM: tail cache-svc from the durable applied
//! sequence, apply records to the replica, cut points, report back.
//!
//! Restart-safe and idempotent by sequence: the replica's durable meta says
//! which record comes next; whatever was applied in memory but not
//! checkpointed is applied again after a restart. The cache hears only of
//! what is durable, so it never trims a record the replica might still need.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::cache::v1 as cache;
use ferry_proto::cache::v1::cache_client::CacheClient;
use ferry_proto::cache::v1::MarkerKind;
use ferry_proto::ids::{Incarnation, Sequence};
use ferry_proto::registry::v1 as registry;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::follow::{follow_registry, Follower};
use ferry_runtime::time::{to_duration, to_timestamp, unix_nanos_now};
use ferry_runtime::{Backoff, PeerChannel, Refusal, Refused, RetryParams};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::ProcessorError;
use crate::replica::{Applied, Point, PointKind, Replicas, VmReplica};
use crate::retention::{self, Retention};

/// How long a health report waits for the cache's log figures before it
/// goes without them.
const CACHE_INFO_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks a pipeline for something.
pub enum Command {
    /// Cut a point once everything up to `min_sequence` is applied (or
    /// return the newest point if nothing changed since).
    Cut {
        min_sequence: u64,
        reply: oneshot::Sender<Result<Point, ProcessorError>>,
    },
}

/// What a pipeline reports about itself.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// Applied (in memory or durably).
    pub applied: u64,
    /// The cache's durable sequence, as last heard.
    pub cache_durable: u64,
    /// Bytes the cache retains for the VM, as last heard.
    pub backlog_bytes: u64,
    /// Why it is not working, if it is not.
    pub error: Option<String>,
}

/// How a pipeline works.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Changed-chunk bytes held in memory before a checkpoint.
    pub flush_bytes: usize,
    /// Bytes moved per compaction step.
    pub compact_bytes: u64,
    /// Blob bytes checked per scrub step; 0: no scrub.
    pub scrub_bytes: u64,
    /// Free space replica data must leave on the data directory.
    pub room: Room,
}

/// Room on the data directory's filesystem. Replica data stops short of a
/// reserve kept for the sled index: sled fails for good (until a restart)
/// once a write of its own hits ENOSPC, and the index must still record
/// what frees space (pruned points). Claimed before every write of replica
/// data, so a full disk pauses the pipeline before anything is written.
#[derive(Debug, Clone)]
pub struct Room(pub ferry_runtime::space::Room);

impl Room {
    /// Claims room for `bytes` of replica data, held until they are written.
    pub fn claim(&self, bytes: u64) -> Result<ferry_runtime::space::Claim, ProcessorError> {
        use ferry_runtime::space::NoRoom;
        self.0.claim(bytes).map_err(|e| match e {
            NoRoom::Io { path, source } => ProcessorError::io(&path, source),
            full @ NoRoom::Full { .. } => ProcessorError::DiskFull(full.to_string()),
        })
    }
}

struct Handle {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

/// Every running pipeline.
pub struct Pipelines {
    replicas: Arc<Replicas>,
    cache: CacheClient<PeerChannel>,
    registry: RegistryClient<PeerChannel>,
    tuning: Tuning,
    running: Mutex<HashMap<String, Handle>>,
    /// Each protected VM's replication group (VMs in none are absent), as
    /// registry says.
    groups: Mutex<BTreeMap<String, String>>,
    /// The URL registry places items on this processor by; None: it takes
    /// the items placed on no processor.
    endpoint: Option<String>,
    /// A client of the cache-svc at a URL (an item's source region's).
    connect: Connect,
    /// Each followed VM's cache, where it has its own (else `cache`).
    caches: Mutex<HashMap<String, CacheClient<PeerChannel>>>,
    /// VMs whose replica is being seeded (re-protect): no pipeline runs.
    seeding: Mutex<std::collections::HashSet<String>>,
    shutdown: CancellationToken,
}

/// A VM's pipeline held stopped while its replica is seeded; the next
/// registry event starts it again once this is dropped.
pub struct SeedHold {
    pipelines: Arc<Pipelines>,
    vm: String,
}

impl Drop for SeedHold {
    fn drop(&mut self) {
        if let Ok(mut seeding) = self.pipelines.seeding.lock() {
            seeding.remove(&self.vm);
        }
    }
}

/// Makes a cache client for a URL.
pub type Connect = Box<dyn Fn(&str) -> Result<CacheClient<PeerChannel>, String> + Send + Sync>;

impl Pipelines {
    pub fn new(
        replicas: Arc<Replicas>,
        cache: CacheClient<PeerChannel>,
        registry: RegistryClient<PeerChannel>,
        tuning: Tuning,
        endpoint: Option<String>,
        connect: Connect,
        shutdown: CancellationToken,
    ) -> Arc<Pipelines> {
        Arc::new(Pipelines {
            replicas,
            cache,
            registry,
            tuning,
            running: Mutex::new(HashMap::new()),
            groups: Mutex::new(BTreeMap::new()),
            endpoint,
            connect,
            caches: Mutex::new(HashMap::new()),
            seeding: Mutex::new(std::collections::HashSet::new()),
            shutdown,
        })
    }

    /// How replica work is tuned.
    pub fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    /// Registry, for the checks a seed makes.
    pub fn registry(&self) -> RegistryClient<PeerChannel> {
        self.registry.clone()
    }

    /// Whether an item placed on `endpoint` is this processor's.
    pub fn serves(&self, endpoint: &str) -> bool {
        ferry_runtime::peers::serves(self.endpoint.as_deref(), endpoint)
    }

    /// Stops `vm`'s pipeline and keeps it stopped until the hold is
    /// dropped. FAILED_PRECONDITION while another seed of it runs.
    pub async fn hold_for_seed(self: &Arc<Self>, vm: &str) -> Result<SeedHold, ProcessorError> {
        {
            let mut seeding = self
                .seeding
                .lock()
                .map_err(|_| ProcessorError::Corrupt("the seeding lock was poisoned".into()))?;
            if !seeding.insert(vm.to_string()) {
                return Err(Refused::failed_precondition(format!(
                    "a seed of VM {vm:?}'s replica is already running"
                ))
                .into());
            }
        }
        let hold = SeedHold {
            pipelines: self.clone(),
            vm: vm.to_string(),
        };
        self.stop(vm).await;
        Ok(hold)
    }

    pub fn replicas(&self) -> &Arc<Replicas> {
        &self.replicas
    }

    /// The client of `vm`'s cache (its source region's, else the
    /// default), for RPCs that ask it directly.
    pub fn cache_for(&self, vm: &str) -> CacheClient<PeerChannel> {
        self.caches
            .lock()
            .ok()
            .and_then(|c| c.get(vm).cloned())
            .unwrap_or_else(|| self.cache.clone())
    }

    /// Records where `item`'s log is: its placed cache, else the default.
    /// A cache that cannot be reached by its URL is said loudly; the item
    /// is then not followed (never tailed from another cache).
    fn place(&self, item: &registry::ProtectedItem) -> bool {
        let Ok(mut caches) = self.caches.lock() else {
            return false;
        };
        if item.cache_endpoint.is_empty() {
            caches.remove(&item.vm_name);
            return true;
        }
        match (self.connect)(&item.cache_endpoint) {
            Ok(client) => {
                caches.insert(item.vm_name.clone(), client);
                true
            }
            Err(e) => {
                tracing::error!(vm = %item.vm_name, cache = %item.cache_endpoint, error = %e,
                    "cannot reach the item's cache; not followed");
                false
            }
        }
    }

    /// A command channel and status of the VM's pipeline, if it runs.
    pub fn get(&self, vm: &str) -> Option<(mpsc::Sender<Command>, Status)> {
        let running = self.running.lock().ok()?;
        running
            .get(vm)
            .map(|h| (h.commands.clone(), h.status.borrow().clone()))
    }

    /// Every running pipeline's VM and status, by VM.
    pub fn statuses(&self) -> Vec<(String, Status)> {
        let mut all: Vec<(String, Status)> = self
            .running
            .lock()
            .map(|running| {
                running
                    .iter()
                    .map(|(vm, h)| (vm.clone(), h.status.borrow().clone()))
                    .collect()
            })
            .unwrap_or_default();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The members of a replication group, sorted.
    pub fn members(&self, group: &str) -> Vec<String> {
        self.groups
            .lock()
            .map(|g| {
                g.iter()
                    .filter(|(_, of)| *of == group)
                    .map(|(vm, _)| vm.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Starts the VM's pipeline unless it runs.
    fn start(self: &Arc<Self>, item: &registry::ProtectedItem, retention: Retention) {
        if self
            .seeding
            .lock()
            .map_or(true, |s| s.contains(&item.vm_name))
        {
            return;
        }
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        if running
            .get(&item.vm_name)
            .is_some_and(|h| !h.done.is_finished())
        {
            return;
        }
        let disks = item_disks(item);
        let replica =
            match self
                .replicas
                .open_vm_with(&item.vm_name, &disks, Incarnation(item.incarnation))
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(vm = %item.vm_name, error = %e, "cannot open the replica");
                    return;
                }
            };
        let (commands, rx) = mpsc::channel(16);
        let (status_tx, status) = watch::channel(Status::default());
        let stop = self.shutdown.child_token();
        let pipeline = Pipeline {
            vm: item.vm_name.clone(),
            incarnation: Incarnation(item.incarnation),
            group: item.replication_group.clone(),
            replica,
            cache: self.cache_for(&item.vm_name),
            registry: self.registry.clone(),
            tuning: self.tuning.clone(),
            retention,
            status: status_tx,
            pending: Vec::new(),
            disk_full: None,
            reported: 0,
            last_request: None,
            last_gap_request: None,
            traces: ferry_runtime::batch_trace::Recent::new(PENDING_TRACES),
        };
        let span = tracing::info_span!("pipeline", vm = %item.vm_name);
        let done = tokio::spawn(pipeline.run(rx, stop.clone()).instrument(span));
        tracing::info!(vm = %item.vm_name, "pipeline started");
        running.insert(
            item.vm_name.clone(),
            Handle {
                commands,
                status,
                stop,
                done,
            },
        );
    }

    /// Stops the VM's pipeline and waits for it.
    async fn stop(&self, vm: &str) {
        let handle = self.running.lock().ok().and_then(|mut r| r.remove(vm));
        if let Some(h) = handle {
            h.stop.cancel();
            let _ = h.done.await;
            tracing::info!(vm, "pipeline stopped");
        }
    }

    /// Follows registry until shutdown: a pipeline for every VM whose
    /// replication is on; stopped when it is failed over; stopped and its
    /// replica deleted when replication is disabled.
    pub async fn follow_registry(self: Arc<Self>) {
        let client = self.registry.clone();
        let shutdown = self.shutdown.clone();
        follow_registry(client, &mut Following(self.clone()), &shutdown).await;
        let names: Vec<String> = self
            .running
            .lock()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default();
        for vm in names {
            self.stop(&vm).await;
        }
    }

    /// After registry's snapshot: replicas of VMs registry no longer
    /// protects, at an incarnation it has issued, belong to items disabled
    /// while this processor was away, and are deleted. A replica newer than
    /// anything registry issued (registry restored from an old backup?), or
    /// from before incarnations, is kept and reported.
    async fn reconcile(&self, items: &BTreeMap<String, u64>, last_incarnation: u64) {
        for vm in self.replicas.names() {
            if items.contains_key(&vm) {
                continue;
            }
            let incarnation = match self.replicas.get(&vm) {
                Ok(Some(r)) => r.meta().map(|m| m.incarnation.get()).unwrap_or(0),
                _ => continue,
            };
            if incarnation == 0 || incarnation > last_incarnation {
                tracing::warn!(
                    vm,
                    incarnation,
                    last_incarnation,
                    "registry does not protect this VM, but its replica is not of an \
                     incarnation registry issued: kept"
                );
                continue;
            }
            self.stop(&vm).await;
            let replicas = self.replicas.clone();
            let name = vm.clone();
            match tokio::task::spawn_blocking(move || replicas.remove(&name)).await {
                Ok(Ok(())) => tracing::info!(vm, incarnation, "replica of a disabled item deleted"),
                Ok(Err(e)) => tracing::error!(vm, error = %e, "cannot delete the replica"),
                Err(e) => tracing::error!(vm, error = %e, "replica deletion panicked"),
            }
        }
    }

    async fn on_event(self: &Arc<Self>, event: registry::ProtectedItemEvent) {
        use registry::ReplicationState as S;
        let removed = event.kind() == registry::EventKind::Removed;
        let Some(item) = event.item else { return };
        if !ferry_runtime::peers::serves(self.endpoint.as_deref(), &item.processor_endpoint) {
            // Another processor's: its replica, if one is here from
            // before, is kept, never deleted on another's word.
            tracing::debug!(vm = %item.vm_name, placed = %item.processor_endpoint,
                "placed on another processor; not followed");
            return;
        }
        if let Ok(mut groups) = self.groups.lock() {
            if removed || item.replication_group.is_empty() {
                groups.remove(&item.vm_name);
            } else {
                groups.insert(item.vm_name.clone(), item.replication_group.clone());
            }
        }
        if removed {
            self.stop(&item.vm_name).await;
            let replicas = self.replicas.clone();
            let vm = item.vm_name.clone();
            match tokio::task::spawn_blocking(move || replicas.remove(&vm)).await {
                Ok(Ok(())) => {
                    tracing::info!(vm = %item.vm_name, "replica deleted: replication disabled")
                }
                Ok(Err(e)) => {
                    tracing::error!(vm = %item.vm_name, error = %e, "cannot delete the replica")
                }
                Err(e) => {
                    tracing::error!(vm = %item.vm_name, error = %e, "replica deletion panicked")
                }
            }
            return;
        }
        match item.state() {
            S::Enabling
            | S::InitialReplication
            | S::Protected
            | S::ResyncRequired
            | S::Resyncing
            | S::FailoverInProgress => {
                if !self.place(&item) {
                    return;
                }
                let retention = self.retention_of(&item.policy_name).await;
                self.start(&item, retention);
            }
            S::FailedOver | S::Committed | S::Disabling | S::Unspecified => {
                self.stop(&item.vm_name).await
            }
        }
    }

    async fn retention_of(&self, policy: &str) -> Retention {
        let mut client = self.registry.clone();
        match client
            .get_policy(registry::GetPolicyRequest {
                name: policy.to_string(),
            })
            .await
        {
            Ok(p) => Retention::from_policy(&p.into_inner()),
            Err(status) => {
                tracing::warn!(policy, %status, "policy unavailable; using the defaults");
                Retention::default()
            }
        }
    }
}

struct Pipeline {
    vm: String,
    /// The protected item's incarnation (registry).
    incarnation: Incarnation,
    /// The VM's replication group; empty if none.
    group: String,
    replica: Arc<VmReplica>,
    cache: CacheClient<PeerChannel>,
    registry: RegistryClient<PeerChannel>,
    tuning: Tuning,
    retention: Retention,
    status: watch::Sender<Status>,
    /// Cut requests waiting for their sequence.
    pending: Vec<(u64, oneshot::Sender<Result<Point, ProcessorError>>)>,
    /// Why the pipeline is paused for a full disk, while it is.
    disk_full: Option<String>,
    /// The applied sequence last reported to the cache.
    reported: u64,
    /// When the agent was last asked for mismatched ranges.
    last_request: Option<std::time::Instant>,
    /// When the agent was last asked to check whole disks after a gap.
    last_gap_request: Option<std::time::Instant>,
    /// Traced batches applied and not yet in a point, with the context of
    /// their apply span: the point that holds them links to each.
    traces: ferry_runtime::batch_trace::Recent,
}

/// How many applied traced batches wait for their point, at most.
const PENDING_TRACES: usize = 256;

/// Ranges per resync request (each is a few dozen bytes).
const RANGES_PER_REQUEST: usize = 4096;
/// How long before mismatched ranges are asked for again.
const REQUEST_AGAIN: Duration = Duration::from_secs(10);

/// An item's disks and their sizes, as its replica keeps them.
pub(crate) fn item_disks(item: &registry::ProtectedItem) -> BTreeMap<String, u64> {
    item.source
        .as_ref()
        .map(|v| {
            v.disks
                .iter()
                .map(|d| (d.id.clone(), d.size_bytes))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs blocking replica work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ProcessorError> + Send + 'static,
) -> Result<T, ProcessorError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ProcessorError::Corrupt(format!("replica task failed: {e}")))?
}

impl Pipeline {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, stop: CancellationToken) {
        let mut backoff = Backoff::new(RetryParams::RECONNECT);
        let mut tick = tokio::time::interval(self.retention.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let ended = self.session(&mut commands, &mut tick, &stop).await;
            match ended {
                Ok(true) => break,
                // No log in the cache yet: `idle` waited; ask again.
                Ok(false) => continue,
                Err(ProcessorError::DiskFull(why)) => {
                    if self.pause(&why, &mut commands, &stop).await {
                        break;
                    }
                    backoff.reset();
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt = backoff.attempts(), "pipeline interrupted; resuming from the durable sequence");
                    self.status.send_modify(|s| s.error = Some(e.to_string()));
                    let replica = self.replica.clone();
                    if let Err(e) = blocking(move || replica.reset()).await {
                        tracing::error!(error = %e, "cannot reset the replica");
                    }
                }
            }
            if !backoff.wait(&stop).await {
                break;
            }
        }
        // What is applied in memory is written, so a restart resumes close.
        let replica = self.replica.clone();
        let room = self.tuning.room.clone();
        let last = blocking(move || {
            let _claim = room.claim(replica.dirty_bytes()? as u64)?;
            replica.checkpoint()
        });
        if let Err(e) = last.await {
            tracing::warn!(error = %e, "final checkpoint failed");
        }
        for (_, reply) in self.pending.drain(..) {
            let _ = reply.send(Err(ProcessorError::ShuttingDown));
        }
    }

    /// The disk is full: what is not durable is dropped (nothing of it was
    /// written, nor reported applied, so the cache keeps it), registry hears
    /// CRITICAL, cut requests are refused, and the pipeline waits until
    /// what did not fit would fit, then tails from the durable sequence
    /// again. True if stopped meanwhile.
    async fn pause(
        &mut self,
        why: &str,
        commands: &mut mpsc::Receiver<Command>,
        stop: &CancellationToken,
    ) -> bool {
        let replica = self.replica.clone();
        // What did not fit must fit before applying it again is worthwhile.
        let need = blocking(move || {
            let need = replica.dirty_bytes()? as u64;
            replica.reset()?;
            Ok(need)
        })
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot reset the replica");
            0
        });
        let message = format!(
            "{}; the pipeline is paused until space returns: no points, nothing more applied",
            ProcessorError::DiskFull(why.to_string())
        );
        tracing::error!(%message, "replica disk full");
        self.status.send_modify(|s| s.error = Some(message.clone()));
        self.disk_full = Some(message);
        let refuse = |reply: oneshot::Sender<Result<Point, ProcessorError>>| {
            let _ = reply.send(Err(ProcessorError::DiskFull(why.to_string())));
        };
        for (_, reply) in self.pending.drain(..) {
            refuse(reply);
        }
        self.report_health().await;
        let mut check = tokio::time::interval(Duration::from_secs(1));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return true,
                Some(Command::Cut { reply, .. }) = commands.recv() => refuse(reply),
                _ = check.tick() => {
                    let room = self.tuning.room.clone();
                    if blocking(move || room.claim(need).map(drop)).await.is_ok() {
                        break;
                    }
                    if reported.elapsed() >= self.retention.interval {
                        self.report_health().await;
                        reported = std::time::Instant::now();
                    }
                }
            }
        }
        tracing::info!("space returned on the replica disk: resuming");
        self.disk_full = None;
        self.status.send_modify(|s| s.error = None);
        false
    }

    /// One tail of the cache, until stopped (Ok(true)) or something fails;
    /// Ok(false) when the cache has no log for the VM yet.
    async fn session(
        &mut self,
        commands: &mut mpsc::Receiver<Command>,
        tick: &mut tokio::time::Interval,
        stop: &CancellationToken,
    ) -> Result<bool, ProcessorError> {
        let meta = self.replica.meta()?;
        let request = cache::TailRequest {
            vm_name: self.vm.clone(),
            from_sequence: meta.applied.next().get(),
            follow: true,
            max_batch_bytes: 0,
            incarnation: self.incarnation.get(),
            lineage: meta.lineage,
        };
        let mut client = self.cache.clone();
        let mut tail = match client.tail(request).await {
            Ok(t) => t.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => {
                // No agent has streamed yet: nothing to apply.
                return self.idle(commands, tick, stop).await;
            }
            Err(s) if s.code() == tonic::Code::OutOfRange => {
                self.trimmed_past(meta.applied.get(), s.message()).await?;
                return Ok(false);
            }
            Err(s) => return Err(Refused::unavailable(format!("cache tail: {s}")).into()),
        };
        self.status.send_modify(|s| s.error = None);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(true),
                Some(command) = commands.recv() => self.command(command).await,
                _ = tick.tick() => self.on_tick().await?,
                message = tail.message() => match message {
                    Ok(Some(response)) => {
                        self.check_lineage(response.lineage).await?;
                        let batch = response.batch.unwrap_or_default();
                        self.status.send_modify(|s| s.cache_durable = response.durable_sequence);
                        self.apply(batch.records, batch.traces).await?;
                    }
                    Ok(None) => return Err(Refused::unavailable("the cache ended the tail").into()),
                    Err(s) => return Err(Refused::unavailable(format!("cache tail: {s}")).into()),
                },
            }
        }
    }

    /// The cache no longer has the records after what this replica
    /// applied (its log was trimmed past them: a bad report, or this
    /// replica lost its newest data): they are gone, so the stream numbers
    /// on from the log's first record and every disk is checked against the
    /// source before the next point.
    async fn trimmed_past(&mut self, applied: u64, why: &str) -> Result<(), ProcessorError> {
        let mut client = self.cache.clone();
        let info = client
            .get_log_info(cache::GetLogInfoRequest {
                vm_name: self.vm.clone(),
            })
            .await
            .map_err(|s| Refused::unavailable(format!("cache log info: {s}")))?
            .into_inner();
        if Incarnation(info.incarnation) != self.incarnation || info.first_sequence <= applied + 1 {
            return Err(Refused::unavailable(format!("cache tail: {why}")).into());
        }
        let reason = format!(
            "the cache's log starts at {} but this replica has applied only up to {applied}",
            info.first_sequence
        );
        let replica = self.replica.clone();
        let (lineage, first) = (info.lineage, info.first_sequence);
        let gap_reason = reason.clone();
        blocking(move || replica.gap(Sequence(first - 1), lineage, &gap_reason)).await?;
        self.last_gap_request = None;
        self.request_full_check().await;
        Ok(())
    }

    /// A tail's lineage other than the one applied from: the cache lost its
    /// log and started it again, so what comes does not follow what was
    /// applied: a gap.
    async fn check_lineage(&mut self, lineage: u64) -> Result<(), ProcessorError> {
        if lineage == 0 {
            return Ok(());
        }
        let replica = self.replica.clone();
        let follows = blocking(move || replica.adopt_lineage(lineage)).await?;
        if follows {
            return Ok(());
        }
        let replica = self.replica.clone();
        let applied = replica.applied()?;
        blocking(move || {
            replica.gap(
                applied,
                lineage,
                "the cache's log was lost and started again; records may be missing",
            )
        })
        .await?;
        self.last_gap_request = None;
        self.request_full_check().await;
        Ok(())
    }

    /// Asks the agent, through the cache, to check every disk in a gap
    /// whole by checksum; again on later ticks until such a round starts.
    async fn request_full_check(&mut self) {
        let Ok(meta) = self.replica.meta() else {
            return;
        };
        if meta.gap.is_empty()
            || self
                .last_gap_request
                .is_some_and(|t| t.elapsed() < REQUEST_AGAIN)
        {
            return;
        }
        self.last_gap_request = Some(std::time::Instant::now());
        let request = cache::SendControlRequest {
            vm_name: self.vm.clone(),
            control: Some(cache::send_control_request::Control::Resync(
                cache::ResyncRequest {
                    disk_ids: meta.gap.iter().cloned().collect(),
                    reason: meta.gap_reason.clone(),
                    ranges: Vec::new(),
                },
            )),
        };
        let mut client = self.cache.clone();
        match client.send_control(request).await {
            Ok(_) => tracing::warn!(disks = ?meta.gap, "asked the agent to check every chunk"),
            Err(s) => tracing::warn!(%s, "cannot ask the agent for a full check yet"),
        }
    }

    /// Waits a moment for the cache to have a log, answering commands
    /// meanwhile; Ok(true) if stopped.
    async fn idle(
        &mut self,
        commands: &mut mpsc::Receiver<Command>,
        tick: &mut tokio::time::Interval,
        stop: &CancellationToken,
    ) -> Result<bool, ProcessorError> {
        let deadline = tokio::time::sleep(Duration::from_millis(200));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(true),
                Some(command) = commands.recv() => self.command(command).await,
                _ = tick.tick() => self.on_tick().await?,
                _ = &mut deadline => return Ok(false),
            }
        }
    }

    async fn apply(
        &mut self,
        records: Vec<cache::Record>,
        traces: Vec<cache::BatchTrace>,
    ) -> Result<(), ProcessorError> {
        // A traced batch's trace goes on in a span of its apply.
        let spans: Vec<_> = traces
            .iter()
            .map(|t| {
                let span = tracing::info_span!(
                    "ferry.processor.apply",
                    vm = %self.vm,
                    first = t.first_sequence,
                    last = t.last_sequence
                );
                ferry_runtime::batch_trace::continue_trace(&span, &t.traceparent);
                (span, t.first_sequence, t.last_sequence)
            })
            .collect();
        let replica = self.replica.clone();
        let flush_bytes = self.tuning.flush_bytes;
        let room = self.tuning.room.clone();
        let group = self.group.clone();
        let (applied, cuts, mismatched) = blocking(move || {
            // Replica data is written only if it leaves the reserve free.
            let room_for = |replica: &VmReplica| room.claim(replica.dirty_bytes()? as u64);
            let mut cuts = Vec::new();
            let mut mismatched = false;
            let mut applied = replica.applied()?.get();
            for record in &records {
                if record.sequence <= applied {
                    continue;
                }
                applied = record.sequence;
                let cut = match replica.apply(record)? {
                    Applied::Marker(MarkerKind::AppConsistent, _, _) => {
                        let _claim = room_for(&replica)?;
                        Some(cut_at_marker(&replica, PointKind::AppConsistent))
                    }
                    // A bookmark of the VM's group (one of another group, say
                    // from before it joined, is no multi-VM point).
                    Applied::Marker(MarkerKind::Bookmark, id, time)
                        if !group.is_empty() && time > 0 =>
                    {
                        let _claim = room_for(&replica)?;
                        Some(replica.cut_bookmark(&id, &group, time, unix_nanos_now()))
                    }
                    Applied::Marker(MarkerKind::Final, id, _) => {
                        let _claim = room_for(&replica)?;
                        Some(replica.cut(PointKind::CrashConsistent, &id, unix_nanos_now()))
                    }
                    Applied::Mismatched(disk, ranges) if !ranges.is_empty() => {
                        tracing::info!(
                            disk,
                            ranges = ranges.len(),
                            "chunks differ from the source"
                        );
                        mismatched = true;
                        None
                    }
                    _ => None,
                };
                match cut {
                    // The disk filled under the cut: nothing of the interval
                    // is durable; the pipeline pauses and applies it again.
                    Some(Err(e @ ProcessorError::DiskFull(_))) => return Err(e),
                    Some(cut) => cuts.push(cut),
                    None => {}
                }
                if replica.dirty_bytes()? >= flush_bytes {
                    let _claim = room_for(&replica)?;
                    replica.checkpoint()?;
                }
            }
            Ok((applied, cuts, mismatched))
        })
        .await?;
        for (span, first, last) in spans {
            if let Some(trace) = ferry_runtime::batch_trace::trace_of(&span, first, last) {
                self.traces.push(trace);
            }
        }
        if mismatched {
            self.request_mismatched().await;
        }
        for cut in cuts {
            match cut {
                Ok(p) => {
                    self.trace_point(&p);
                    tracing::info!(point = %p.id(), seq = p.sequence_cut.get(), kind = ?p.kind, "point at marker")
                }
                Err(e) => tracing::warn!(error = %e, "no point at the marker"),
            }
        }
        self.status.send_modify(|s| s.applied = applied);
        self.serve_cuts(applied).await;
        Ok(())
    }

    /// The span of a point that holds traced batches: a trace of its own,
    /// linked to each batch it holds (many batches fan into one point).
    fn trace_point(&mut self, point: &Point) {
        let held = self.traces.take_through(point.sequence_cut.get());
        if held.is_empty() {
            return;
        }
        let span = tracing::info_span!(
            parent: None,
            "ferry.processor.point",
            vm = %self.vm,
            point = %point.id(),
            sequence_cut = point.sequence_cut.get(),
            kind = ?point.kind,
            batches = held.len()
        );
        ferry_runtime::batch_trace::link_all(&span, &held);
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Cut {
                min_sequence,
                reply,
            } => {
                self.pending.push((min_sequence, reply));
                let applied = self.replica.meta().map(|m| m.applied.get()).unwrap_or(0);
                self.serve_cuts(applied).await;
            }
        }
    }

    /// Answers the cut requests whose sequence is applied.
    async fn serve_cuts(&mut self, applied: u64) {
        if self.pending.iter().all(|(min, _)| *min > applied) {
            return;
        }
        let replica = self.replica.clone();
        let room = self.tuning.room.clone();
        let cut = blocking(move || {
            let meta = replica.meta()?;
            if meta.applied == meta.last_point_sequence && meta.applied.get() > 0 {
                if let Some(p) = replica.points()?.pop() {
                    return Ok(p);
                }
            }
            let _claim = room.claim(replica.dirty_bytes()? as u64)?;
            replica.cut(PointKind::CrashConsistent, "", unix_nanos_now())
        })
        .await;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            self.pending.drain(..).partition(|(min, _)| *min <= applied);
        self.pending = waiting;
        for (_, reply) in ready {
            let _ = reply.send(match &cut {
                Ok(p) => Ok(p.clone()),
                Err(e) => Err(match e {
                    ProcessorError::Refused(
                        refused @ Refused {
                            kind: Refusal::FailedPrecondition,
                            ..
                        },
                    ) => ProcessorError::Refused(refused.clone()),
                    ProcessorError::DiskFull(m) => ProcessorError::DiskFull(m.clone()),
                    other => Refused::unavailable(other.to_string()).into(),
                }),
            });
        }
        if let Ok(p) = &cut {
            self.trace_point(p);
            self.report_applied().await;
        }
    }

    /// Every interval: a crash-consistent point if anything changed (else a
    /// checkpoint while a disk syncs), the applied sequence to the cache,
    /// retention, a compaction step, and health to registry.
    async fn on_tick(&mut self) -> Result<(), ProcessorError> {
        let replica = self.replica.clone();
        let retention = self.retention.clone();
        let compact_bytes = self.tuning.compact_bytes;
        let scrub_bytes = self.tuning.scrub_bytes;
        let room = self.tuning.room.clone();
        let cut = blocking(move || {
            let meta = replica.meta()?;
            let mut cut = None;
            // Checked first, but pruning below runs on a full disk too: it
            // only frees space (its index writes are what the reserve is for).
            let fits = room.claim(replica.dirty_bytes()? as u64);
            if fits.is_ok() && meta.applied > meta.last_point_sequence {
                if replica.not_cuttable()?.is_none() {
                    cut = Some(replica.cut(PointKind::CrashConsistent, "", unix_nanos_now())?);
                } else {
                    replica.checkpoint()?;
                }
            }
            let points = replica.points()?;
            let expired = retention::expired(&points, unix_nanos_now(), &retention);
            if !expired.is_empty() {
                let pruned = replica.prune(&expired)?;
                if !pruned.is_empty() {
                    tracing::debug!(points = pruned.len(), "recovery points expired");
                }
            }
            // Compaction copies live blobs before it frees their segment.
            if fits.is_ok() {
                if let Ok(_claim) = room.claim(compact_bytes) {
                    replica.compact_step(compact_bytes)?;
                }
            }
            // The scrub only reads; what it finds is a small index write.
            if scrub_bytes > 0 {
                let scrubbed = replica.scrub_step(scrub_bytes)?;
                if scrubbed.damaged > 0 {
                    tracing::error!(found = scrubbed.damaged, "the scrub found damaged blobs");
                }
            }
            fits?;
            Ok(cut)
        })
        .await?;
        if let Some(p) = cut {
            self.trace_point(&p);
            tracing::debug!(point = %p.id(), seq = p.sequence_cut.get(), "crash-consistent point");
        }
        if self
            .last_request
            .is_none_or(|t| t.elapsed() >= REQUEST_AGAIN)
        {
            self.request_mismatched().await;
        }
        self.request_full_check().await;
        self.report_applied().await;
        self.report_health().await;
        Ok(())
    }

    /// Asks the agent, through the cache, for the ranges whose checksums
    /// differed; asked again on later ticks until they have arrived.
    async fn request_mismatched(&mut self) {
        let Ok(meta) = self.replica.meta() else {
            return;
        };
        if !meta.syncing.is_empty() {
            // A round is still comparing: asked for once it has ended, so
            // that the agent's answer never cuts into the round (its
            // digests would go to the changed-chunk map and round again).
            return;
        }
        let ranges: Vec<cache::DiskRange> = meta
            .mismatched
            .iter()
            .flat_map(|(disk, ranges)| {
                ranges.iter().map(|(offset, length)| cache::DiskRange {
                    disk_id: disk.clone(),
                    offset: *offset,
                    length: *length,
                })
            })
            .collect();
        if ranges.is_empty() {
            return;
        }
        self.last_request = Some(std::time::Instant::now());
        let mut client = self.cache.clone();
        for part in ranges.chunks(RANGES_PER_REQUEST) {
            let request = cache::SendControlRequest {
                vm_name: self.vm.clone(),
                control: Some(cache::send_control_request::Control::Resync(
                    cache::ResyncRequest {
                        disk_ids: Vec::new(),
                        reason: format!("{} chunk(s) differ from the replica", ranges.len()),
                        ranges: part.to_vec(),
                    },
                )),
            };
            if let Err(s) = client.send_control(request).await {
                tracing::warn!(%s, "cannot ask the agent for the differing chunks yet");
                return;
            }
        }
        tracing::info!(
            ranges = ranges.len(),
            "asked the agent for the differing chunks"
        );
    }

    /// Tells the cache what is durably applied, so it may trim below it.
    async fn report_applied(&mut self) {
        let Ok((durable, lineage)) = self.replica.durable_position() else {
            return;
        };
        let durable = durable.get();
        if durable <= self.reported {
            return;
        }
        let mut client = self.cache.clone();
        match client
            .report_applied(cache::ReportAppliedRequest {
                vm_name: self.vm.clone(),
                applied_sequence: durable,
                lineage,
            })
            .await
        {
            Ok(_) => self.reported = durable,
            Err(s) => tracing::debug!(%s, "cannot report the applied sequence"),
        }
    }

    async fn report_health(&mut self) {
        let mut client = self.cache.clone();
        // Bounded: an unreachable cache (a cut WAN drops packets, nothing
        // answers) must not hold back the report, whose RPO shows the cut.
        let info = tokio::time::timeout(
            CACHE_INFO_TIMEOUT,
            client.get_log_info(cache::GetLogInfoRequest {
                vm_name: self.vm.clone(),
            }),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .map(|i| i.into_inner());
        let meta = match self.replica.meta() {
            Ok(m) => m,
            Err(_) => return,
        };
        let latest = self.replica.points().ok().and_then(|mut p| p.pop());
        let status = self.status.borrow().clone();
        let (durable, size) = info
            .map(|i| (i.last_sequence, i.size_bytes))
            .unwrap_or((status.cache_durable, status.backlog_bytes));
        self.status.send_modify(|s| {
            s.cache_durable = durable;
            s.backlog_bytes = size;
        });
        let now = unix_nanos_now();
        let rpo = latest
            .as_ref()
            .map(|p| Duration::from_nanos(now.saturating_sub(p.time_nanos.get())));
        let damage = self.replica.damage().unwrap_or_default();
        let (health, message) = match (&status.error, meta.syncing.is_empty()) {
            // Nothing more is applied until space returns: no points.
            _ if self.disk_full.is_some() => (
                registry::ReplicationHealth::Critical,
                self.disk_full.clone().unwrap_or_default(),
            ),
            // The head reads damaged data until the agent has resent it.
            _ if damage.iter().any(|d| d.head) => (
                registry::ReplicationHealth::Critical,
                format!(
                    "{} replica chunk version(s) failed their checksum (first: chunk {} of disk \
                     {} in segment {} at {}, found by {}); points reading them are refused and \
                     no point is cut until the agent has sent those chunks again",
                    damage.len(),
                    damage[0].chunk,
                    damage[0].disk,
                    damage[0].segment,
                    damage[0].offset,
                    damage[0].found_by
                ),
            ),
            _ if !damage.is_empty() => (
                registry::ReplicationHealth::Warning,
                format!(
                    "{} older chunk version(s) failed their checksum; the points reading them \
                     are refused (see ferry points) until retention removes them",
                    damage.len()
                ),
            ),
            (Some(e), _) => (registry::ReplicationHealth::Warning, e.clone()),
            (None, _) if !meta.gap.is_empty() => (
                registry::ReplicationHealth::Warning,
                format!(
                    "{}: every disk is being checked against the source; no points meanwhile",
                    meta.gap_reason
                ),
            ),
            (None, false) => (
                registry::ReplicationHealth::Normal,
                "initial replication or resync in progress; no points meanwhile".to_string(),
            ),
            (None, true) => (registry::ReplicationHealth::Normal, String::new()),
        };
        let request = registry::ReportHealthRequest {
            vm_name: self.vm.clone(),
            component: "processor".into(),
            health: health as i32,
            message,
            rpo: rpo.map(to_duration),
            last_recovery_point_time: latest.as_ref().map(|p| {
                to_timestamp(std::time::UNIX_EPOCH + Duration::from_nanos(p.time_nanos.get()))
            }),
            backlog_bytes: Some(size),
            backlog_records: Some(durable.saturating_sub(meta.applied.get())),
        };
        let mut registry = self.registry.clone();
        if let Err(s) = registry.report_health(request).await {
            tracing::debug!(%s, "cannot report health");
        }
    }
}

/// A point at an app-consistent or final marker, if the disks allow one.
fn cut_at_marker(replica: &VmReplica, kind: PointKind) -> Result<Point, ProcessorError> {
    replica.cut(kind, "", unix_nanos_now())
}

/// Pipelines following registry ([`follow_registry`]).
struct Following(Arc<Pipelines>);

impl Follower for Following {
    async fn event(&mut self, event: registry::ProtectedItemEvent) {
        self.0.on_event(event).await
    }

    async fn synced(&mut self, protected: &BTreeMap<String, u64>, last_incarnation: u64) {
        self.0.reconcile(protected, last_incarnation).await
    }
}
