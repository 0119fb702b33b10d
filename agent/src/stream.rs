//! The VM's ordered write stream to cache-svc.
//!
//! Every completed write gets the next dense sequence number (completion
//! order, so every prefix is crash-consistent) and waits in a bounded buffer
//! until cache-svc acknowledges it durable. One gRPC Ingest stream per VM
//! carries many records per message with a bounded number of bytes in
//! flight; after any failure the agent reconnects with backoff, learns the
//! durable sequence and resends everything above it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::cache::v1 as pb;
use ferry_proto::cache::v1::cache_client::CacheClient;
use ferry_proto::cache::v1::record::Op;
use tokio::sync::{mpsc, Mutex, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// Limits of the stream.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Payload bytes buffered before writers wait (backpressure).
    pub buffer_bytes: usize,
    /// Payload bytes sent but not yet acknowledged.
    pub in_flight_bytes: usize,
    /// Payload bytes per Ingest message.
    pub batch_bytes: usize,
    /// After the cache has been unreachable this long, pending records are
    /// dropped for changed-chunk tracking (resync follows when it is back).
    pub max_outage: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            buffer_bytes: 256 * 1024 * 1024,
            in_flight_bytes: 32 * 1024 * 1024,
            batch_bytes: 1024 * 1024,
            max_outage: Duration::from_secs(60),
        }
    }
}

fn is_sync_completed(op: &Op) -> bool {
    matches!(op, Op::Marker(m) if m.kind == pb::MarkerKind::SyncCompleted as i32)
}

fn op_size(op: &Op) -> usize {
    match op {
        Op::Write(w) => w.data.len() + 64,
        _ => 64,
    }
}

fn payload(record: &pb::Record) -> usize {
    match &record.op {
        Some(Op::Write(w)) => w.data.len() + 64,
        _ => 64,
    }
}

#[derive(Default)]
struct Queue {
    /// The sequence the next record gets.
    next_seq: u64,
    /// Records not yet acknowledged, in sequence order.
    pending: VecDeque<pb::Record>,
    pending_bytes: usize,
    /// The highest sequence cache-svc acknowledged durable.
    durable: u64,
    /// Set when the buffer overflowed: writes only mark chunks dirty.
    tracking: Option<Dirty>,
    /// Why tracking started, for registry and people.
    tracking_reason: String,
    /// Chunks to check by checksum at the next resync.
    verify: Dirty,
    /// Disks whose SYNC_COMPLETED was lost to tracking.
    close: std::collections::BTreeSet<String>,
    /// Chunks taken from tracking for resync and not yet sent again.
    outstanding: ResyncSet,
    /// Set with `tracking`: numbering restarts after the cache's durable
    /// sequence at the next session (pending records were dropped).
    renumber: bool,
    /// Raised on every overflow, so an open session ends and reconnects.
    generation: u64,
    /// Set when replication stopped for good (fenced, stopped, disabled, a
    /// planned failover's drain done): writes go on locally and are tracked;
    /// why, for health. Cleared when a session opens again.
    detached: Option<String>,
}

/// Bytes per bit of the changed-chunk map.
pub const DIRTY_CHUNK: u64 = 64 * 1024;

/// Changed chunks per disk, as bit sets of `DIRTY_CHUNK`-sized chunks.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Dirty {
    pub disks: std::collections::BTreeMap<String, Vec<u64>>,
}

impl Dirty {
    /// Marks the chunks of `offset..offset + length` of `disk`.
    pub fn mark(&mut self, disk: &str, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let bits = self.disks.entry(disk.to_string()).or_default();
        let (first, last) = (offset / DIRTY_CHUNK, (offset + length - 1) / DIRTY_CHUNK);
        for chunk in first..=last {
            let word = (chunk / 64) as usize;
            if bits.len() <= word {
                bits.resize(word + 1, 0);
            }
            bits[word] |= 1 << (chunk % 64);
        }
    }

    /// Marks what a record would have changed. A checksum record changes
    /// nothing: see [`mark_unsent`] for where its chunks go.
    pub fn mark_op(&mut self, disk: &str, op: &Op) {
        match op {
            Op::Write(w) => self.mark(disk, w.offset, w.data.len() as u64),
            Op::Trim(z) | Op::WriteZeroes(z) => self.mark(disk, z.offset, z.length),
            Op::Marker(_) | Op::Digests(_) => {}
        }
    }

    /// The dirty chunk indexes of a disk, ascending.
    pub fn chunks(&self, disk: &str) -> Vec<u64> {
        let Some(bits) = self.disks.get(disk) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (w, word) in bits.iter().enumerate() {
            for b in 0..64 {
                if word & (1 << b) != 0 {
                    out.push(w as u64 * 64 + b);
                }
            }
        }
        out
    }

    /// Every chunk of every disk: what a full resync sends.
    pub fn full(disks: &[(String, u64)]) -> Dirty {
        let mut dirty = Dirty::default();
        for (id, size) in disks {
            dirty.mark(id, 0, *size);
        }
        dirty
    }

    /// Adds every chunk `other` marks.
    pub fn merge(&mut self, other: &Dirty) {
        for (disk, words) in &other.disks {
            let bits = self.disks.entry(disk.clone()).or_default();
            if bits.len() < words.len() {
                bits.resize(words.len(), 0);
            }
            for (mine, theirs) in bits.iter_mut().zip(words) {
                *mine |= theirs;
            }
        }
    }

    /// Clears one chunk (it has been sent again).
    pub fn clear(&mut self, disk: &str, chunk: u64) {
        if let Some(word) = self
            .disks
            .get_mut(disk)
            .and_then(|bits| bits.get_mut((chunk / 64) as usize))
        {
            *word &= !(1 << (chunk % 64));
        }
    }

    /// Whether no chunk is dirty.
    pub fn is_empty(&self) -> bool {
        self.disks.values().flatten().all(|w| *w == 0)
    }

    /// How many chunks are dirty.
    pub fn count(&self) -> u64 {
        self.disks
            .values()
            .flat_map(|b| b.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }
}

/// A record that will never reach the cache (dropped at an overflow,
/// pushed while tracking, unsent at a stop): what it wrote goes into `data`
/// to be sent again, and the chunks a checksum record would have had checked
/// go into `verify`, so that they are still checked. Dropping those silently
/// would let a replica chunk that differs from the source pass for checked.
pub fn mark_unsent(data: &mut Dirty, verify: &mut Dirty, disk: &str, op: &Op) {
    match op {
        Op::Digests(d) => verify.mark(disk, d.offset, d.length),
        other => data.mark_op(disk, other),
    }
}

/// What a resync sends: chunks whose contents go again as data, and chunks
/// checked by checksum (the processor asks for those that differ).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ResyncSet {
    pub data: Dirty,
    pub verify: Dirty,
    /// Disks whose SYNC_COMPLETED marker was lost to tracking (dropped at an
    /// overflow or pushed while tracking): their copy was complete, but the
    /// processor still holds them syncing, so resync brackets them again
    /// even when none of their chunks changed.
    pub close: std::collections::BTreeSet<String>,
}

impl ResyncSet {
    /// Nothing to send.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty() && self.verify.is_empty() && self.close.is_empty()
    }

    /// Chunks to send or check.
    pub fn count(&self) -> u64 {
        self.data.count() + self.verify.count()
    }

    fn merge(&mut self, other: &ResyncSet) {
        self.data.merge(&other.data);
        self.verify.merge(&other.verify);
        self.close.extend(other.close.iter().cloned());
    }
}

/// What the stream's users share with its sender task.
pub struct Stream {
    queue: Mutex<Queue>,
    /// The VM's disks and sizes (set by the capture), for full resyncs.
    disks: std::sync::Mutex<Vec<(String, u64)>>,
    /// A planned failover's FINAL marker id, once the cache asked for it.
    final_request: tokio::sync::watch::Sender<Option<String>>,
    /// Rung when records are added or acknowledged.
    changed: Notify,
    limits: StreamLimits,
}

impl Stream {
    /// A stream whose first record gets `next_seq`.
    pub fn new(next_seq: u64, limits: StreamLimits) -> Arc<Stream> {
        Arc::new(Stream {
            queue: Mutex::new(Queue {
                next_seq: next_seq.max(1),
                durable: next_seq.max(1) - 1,
                ..Queue::default()
            }),
            disks: std::sync::Mutex::new(Vec::new()),
            final_request: tokio::sync::watch::channel(None).0,
            changed: Notify::new(),
            limits,
        })
    }

    /// A stream that starts by tracking `set` (restored after an agent
    /// restart, or every chunk to check by checksum when that map was lost):
    /// resync sends or checks those chunks once the numbering is established
    /// with the cache.
    pub fn with_tracking(
        next_seq: u64,
        limits: StreamLimits,
        set: ResyncSet,
        reason: &str,
    ) -> Arc<Stream> {
        let stream = Stream::new(next_seq, limits);
        if let Ok(mut q) = stream.queue.try_lock() {
            q.tracking = Some(set.data);
            q.verify = set.verify;
            q.close = set.close;
            q.tracking_reason = reason.to_string();
            q.renumber = true;
        }
        stream
    }

    /// The cache asked to end with a FINAL marker of this id (a planned
    /// failover).
    pub fn request_final(&self, id: &str) {
        self.final_request.send_replace(Some(id.to_string()));
    }

    /// Waits until a planned failover asks for the FINAL marker; its id.
    pub async fn final_requested(&self) -> String {
        let mut rx = self.final_request.subscribe();
        loop {
            if let Some(id) = rx.borrow_and_update().clone() {
                return id;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Tells the stream the VM's disks and their sizes.
    pub fn set_disks(&self, disks: Vec<(String, u64)>) {
        if let Ok(mut d) = self.disks.lock() {
            *d = disks;
        }
    }

    /// The VM's disks and their sizes.
    pub fn disks(&self) -> Vec<(String, u64)> {
        self.disks.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// A resync as cache-svc requests it: with `ranges` (disk, offset,
    /// length), their contents go again as data; without, every chunk of
    /// `disk_ids` (all disks when empty) is checked by checksum. Pending
    /// records still go out; writes from now on are tracked until resync
    /// takes the map.
    pub async fn request_resync(
        &self,
        disk_ids: &[String],
        ranges: &[(String, u64, u64)],
        reason: &str,
    ) {
        let sizes = self.disks();
        let mut data = Dirty::default();
        for (disk, offset, length) in ranges {
            if let Some((_, size)) = sizes.iter().find(|(id, _)| id == disk) {
                let end = offset.saturating_add(*length).min(*size);
                data.mark(disk, (*offset).min(end), end - (*offset).min(end));
            }
        }
        let verify = if ranges.is_empty() {
            let disks: Vec<(String, u64)> = sizes
                .into_iter()
                .filter(|(id, _)| disk_ids.is_empty() || disk_ids.contains(id))
                .collect();
            Dirty::full(&disks)
        } else {
            Dirty::default()
        };
        let mut q = self.queue.lock().await;
        match q.tracking.as_mut() {
            Some(dirty) => dirty.merge(&data),
            None => {
                q.tracking = Some(data);
                q.tracking_reason = reason.to_string();
            }
        }
        q.verify.merge(&verify);
        drop(q);
        self.changed.notify_waiters();
    }

    /// Everything not yet durable in the cache, as changed chunks: the
    /// tracked map, chunks resync has yet to send, and pending records.
    /// Saved at a clean shutdown so that the next start resyncs just these.
    pub async fn unsent(&self) -> ResyncSet {
        let q = self.queue.lock().await;
        let mut set = ResyncSet {
            data: q.tracking.clone().unwrap_or_default(),
            verify: q.verify.clone(),
            close: q.close.clone(),
        };
        set.merge(&q.outstanding);
        // The state file keeps chunks only: a lost SYNC_COMPLETED travels
        // as a check of its disk's first chunk, and the next start's resync
        // round closes every disk anyway.
        for disk in std::mem::take(&mut set.close) {
            set.verify.mark(&disk, 0, 1);
        }
        for r in &q.pending {
            if let Some(op) = &r.op {
                mark_unsent(&mut set.data, &mut set.verify, &r.disk_id, op);
            }
        }
        set
    }

    /// A resync round failed part way: the chunks it had yet to send go back
    /// into the map, to be taken by the next round.
    pub async fn retry_outstanding(&self) {
        let mut q = self.queue.lock().await;
        let outstanding = std::mem::take(&mut q.outstanding);
        match q.tracking.as_mut() {
            Some(dirty) => dirty.merge(&outstanding.data),
            None => q.tracking = Some(outstanding.data),
        }
        q.verify.merge(&outstanding.verify);
        q.close.extend(outstanding.close);
        drop(q);
        self.changed.notify_waiters();
    }

    /// Resync has put a SYNC_COMPLETED of `disk` into the stream again.
    pub async fn sync_closed(&self, disk: &str) {
        let mut q = self.queue.lock().await;
        q.outstanding.close.remove(disk);
        drop(q);
        self.changed.notify_waiters();
    }

    /// Resync has sent (or checked) `chunk` of `disk` again.
    pub async fn resent(&self, disk: &str, chunk: u64) {
        let mut q = self.queue.lock().await;
        q.outstanding.data.clear(disk, chunk);
        q.outstanding.verify.clear(disk, chunk);
        drop(q);
        self.changed.notify_waiters();
    }

    /// Appends a record (its sequence and checksum filled in here) and
    /// returns its sequence. Never waits for the cache: when the buffer
    /// would overflow, the stream drops its pending records and switches to
    /// tracking changed chunks (then this returns 0), and resync sends their
    /// current contents later.
    pub async fn push(&self, disk_id: &str, op: Op) -> u64 {
        let q = self.queue.lock().await;
        self.push_locked(q, disk_id, op)
    }

    /// Waits until a copy's record of `size` payload bytes (initial
    /// replication, resync) fits in half the buffer, so that copying never
    /// overflows the stream by itself. Called before the capture's ordering
    /// lock is taken: a VM's writes never wait for the cache behind a copy.
    pub async fn copy_room(&self, size: usize) {
        let size = size + 64;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let q = self.queue.lock().await;
                if q.tracking.is_some()
                    || q.pending_bytes == 0
                    || q.pending_bytes + size <= self.limits.buffer_bytes / 2
                {
                    return;
                }
            }
            notified.await;
        }
    }

    fn push_locked(&self, mut q: tokio::sync::MutexGuard<'_, Queue>, disk_id: &str, op: Op) -> u64 {
        let size = op_size(&op);
        if q.tracking.is_some() {
            let queue = &mut *q;
            if let Some(dirty) = queue.tracking.as_mut() {
                mark_unsent(dirty, &mut queue.verify, disk_id, &op);
            }
            if is_sync_completed(&op) {
                queue.close.insert(disk_id.to_string());
            }
            return 0;
        }
        if q.pending_bytes > 0 && q.pending_bytes + size > self.limits.buffer_bytes {
            tracing::warn!(
                buffered = q.pending_bytes,
                "replication buffer full: tracking changed chunks until resync"
            );
            Self::overflow(&mut q);
            let queue = &mut *q;
            if let Some(dirty) = queue.tracking.as_mut() {
                mark_unsent(dirty, &mut queue.verify, disk_id, &op);
            }
            if is_sync_completed(&op) {
                q.close.insert(disk_id.to_string());
            }
            drop(q);
            self.changed.notify_waiters();
            return 0;
        }
        let mut record = pb::Record {
            sequence: q.next_seq,
            disk_id: disk_id.to_string(),
            op: Some(op),
            crc32c: 0,
            captured_at_unix_nanos: ferry_runtime::time::unix_nanos_now(),
        };
        ferry_proto::checksum::seal(&mut record);
        q.next_seq += 1;
        q.pending_bytes += size;
        q.pending.push_back(record);
        let seq = q.next_seq - 1;
        drop(q);
        self.changed.notify_waiters();
        seq
    }

    /// Drops every pending record into the changed-chunk map.
    fn overflow(q: &mut Queue) {
        let mut dirty = q.tracking.take().unwrap_or_default();
        let mut lost = Vec::new();
        for r in q.pending.drain(..) {
            if let Some(op) = &r.op {
                mark_unsent(&mut dirty, &mut q.verify, &r.disk_id, op);
                if is_sync_completed(op) {
                    lost.push(r.disk_id.clone());
                }
            }
        }
        q.close.extend(lost);
        q.pending_bytes = 0;
        q.tracking = Some(dirty);
        q.tracking_reason = "replication buffer overflowed".to_string();
        q.renumber = true;
        q.generation += 1;
    }

    /// Replication stopped for good (`reason`): what is pending goes into
    /// the changed-chunk map, later writes only mark it, and the open
    /// session ends. The VM's writes go on; a new session (the same agent
    /// allowed again) renumbers after the cache and resyncs the map.
    pub async fn detach(&self, reason: &str) {
        let mut q = self.queue.lock().await;
        if q.tracking.is_none() {
            Self::overflow(&mut q);
        } else {
            q.renumber = true;
            q.generation += 1;
        }
        q.tracking_reason = reason.to_string();
        q.detached = Some(reason.to_string());
        drop(q);
        self.changed.notify_waiters();
    }

    /// Why replication stopped for good, if it did.
    pub async fn detached(&self) -> Option<String> {
        self.queue.lock().await.detached.clone()
    }

    /// Switches to tracking changed chunks now (the cache was away too long).
    pub async fn enter_tracking(&self) {
        let mut q = self.queue.lock().await;
        if q.tracking.is_none() {
            Self::overflow(&mut q);
            q.tracking_reason = "the cache was unreachable too long".to_string();
        }
        drop(q);
        self.changed.notify_waiters();
    }

    /// Whether writes are being tracked as changed chunks, and whether the
    /// numbering has been re-established with the cache since.
    pub async fn tracking(&self) -> (bool, bool) {
        let q = self.queue.lock().await;
        (q.tracking.is_some(), !q.renumber)
    }

    /// Why changed chunks are being tracked.
    pub async fn tracking_reason(&self) -> String {
        self.queue.lock().await.tracking_reason.clone()
    }

    /// Ends tracking and returns the changed chunks. The caller holds the
    /// capture's ordering lock, so no write falls between the map and the
    /// records that follow.
    pub async fn take_tracking(&self) -> Option<ResyncSet> {
        let mut q = self.queue.lock().await;
        if q.renumber {
            return None;
        }
        let set = q.tracking.take().map(|data| ResyncSet {
            data,
            verify: std::mem::take(&mut q.verify),
            close: std::mem::take(&mut q.close),
        });
        if let Some(set) = &set {
            q.outstanding.merge(set);
        }
        drop(q);
        self.changed.notify_waiters();
        set
    }

    /// Rung when records are added or acknowledged or the mode changes.
    pub fn notify(&self) -> &Notify {
        &self.changed
    }

    /// The highest sequence cache-svc acknowledged durable.
    pub async fn durable(&self) -> u64 {
        self.queue.lock().await.durable
    }

    /// The sequence the last pushed record got (0 if none).
    pub async fn last(&self) -> u64 {
        self.queue.lock().await.next_seq - 1
    }

    /// Waits until every record pushed so far is durable in the cache, or
    /// until the buffer overflows (what was pending is then tracked as
    /// changed chunks, and resync sends it). Returns the durable sequence.
    pub async fn flushed(&self) -> u64 {
        let (target, generation) = {
            let q = self.queue.lock().await;
            (q.next_seq - 1, q.generation)
        };
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so no wake-up falls in between.
            notified.as_mut().enable();
            {
                let q = self.queue.lock().await;
                // Renumbering pending: nothing is pending (it went into the
                // map), and `target` may be of the old numbering, which the
                // new one would not reach without further records.
                if q.durable >= target || q.generation != generation || q.renumber {
                    return q.durable;
                }
            }
            notified.await;
        }
    }

    /// Waits until every write made so far is durable in the cache, through
    /// a resync if the buffer overflowed meanwhile: nothing tracked, nothing
    /// left for resync to send, and every record pushed before that durable.
    /// Needs the resync loop running. Returns the durable sequence.
    pub async fn settled(&self) -> u64 {
        let mut target = None;
        let mut generation = self.queue.lock().await.generation;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let q = self.queue.lock().await;
                if q.generation != generation {
                    generation = q.generation;
                    target = None;
                }
                if q.tracking.is_some()
                    || q.renumber
                    || !q.outstanding.is_empty()
                    || !q.verify.is_empty()
                {
                    // Writes from before are tracked: wait until resync has
                    // pushed them, then for those records.
                    target = None;
                } else {
                    let t = *target.get_or_insert(q.next_seq - 1);
                    if q.durable >= t {
                        return q.durable;
                    }
                }
            }
            notified.await;
        }
    }

    /// How often the buffer has overflowed into changed-chunk tracking.
    pub async fn overflows(&self) -> u64 {
        self.queue.lock().await.generation
    }

    /// Payload bytes waiting for the cache's acknowledgement.
    pub async fn pending_bytes(&self) -> usize {
        self.queue.lock().await.pending_bytes
    }

    async fn acknowledge(&self, durable: u64) {
        let mut q = self.queue.lock().await;
        while q.pending.front().is_some_and(|r| r.sequence <= durable) {
            if let Some(r) = q.pending.pop_front() {
                q.pending_bytes -= payload(&r);
            }
        }
        q.durable = q.durable.max(durable);
        drop(q);
        self.changed.notify_waiters();
    }

    /// Up to a batch of pending records above `after`, without exceeding the
    /// in-flight window measured from `durable`.
    async fn next_batch(&self, after: u64) -> Vec<pb::Record> {
        let q = self.queue.lock().await;
        let mut in_flight: usize = q
            .pending
            .iter()
            .take_while(|r| r.sequence <= after)
            .map(payload)
            .sum();
        let mut batch = Vec::new();
        let mut bytes = 0;
        for r in q.pending.iter().filter(|r| r.sequence > after) {
            let size = payload(r);
            if !batch.is_empty()
                && (bytes + size > self.limits.batch_bytes
                    || in_flight + size > self.limits.in_flight_bytes)
            {
                break;
            }
            if batch.is_empty() && in_flight > 0 && in_flight + size > self.limits.in_flight_bytes {
                break;
            }
            bytes += size;
            in_flight += size;
            batch.push(r.clone());
        }
        batch
    }
}

/// The sequence a new stream for `vm` must start at: one past what the cache
/// holds durably. Retries with backoff until the cache answers or `shutdown`.
pub async fn resume_point(
    cache_url: &str,
    vm: &str,
    epoch: u64,
    credential: &str,
    shutdown: &CancellationToken,
) -> Result<u64, tonic::Status> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async {
            let channel = ferry_runtime::connect(cache_url)
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let mut client = CacheClient::new(channel);
            let (tx, rx) = mpsc::channel(1);
            let open = pb::IngestRequest {
                msg: Some(pb::ingest_request::Msg::Open(pb::IngestOpen {
                    vm_name: vm.to_string(),
                    credential: credential.to_string(),
                    epoch,
                })),
            };
            tx.send(open)
                .await
                .map_err(|_| tonic::Status::unavailable("request stream closed"))?;
            let mut responses = client.ingest(ReceiverStream::new(rx)).await?.into_inner();
            match responses.message().await? {
                Some(pb::IngestResponse {
                    msg: Some(pb::ingest_response::Msg::Opened(o)),
                }) => Ok(o.durable_sequence + 1),
                _ => Err(tonic::Status::unavailable(
                    "the cache did not answer `open`",
                )),
            }
        };
        match attempt.await {
            Ok(next) => return Ok(next),
            Err(s) if fatal(&s) => return Err(s),
            Err(s) => tracing::warn!(vm, %s, "cache unreachable; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(tonic::Status::cancelled("shutting down")),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Why a session with cache-svc ended.
#[derive(Debug)]
enum SessionEnd {
    Shutdown,
    /// Retry after backoff.
    Retry(String),
    /// The cache refused for good (fenced, VM unknown).
    Fatal(tonic::Status),
}

/// Streams `stream` to the cache at `cache_url` until `shutdown`, reconnecting
/// with backoff (100 ms doubling to 5 s). Returns the status that ended it for
/// good, if any (e.g. this agent was fenced); the stream is then detached:
/// writes go on and are tracked, and a later `run` resumes it.
pub async fn run(
    stream: Arc<Stream>,
    cache_url: String,
    vm: String,
    epoch: u64,
    credential: String,
    shutdown: CancellationToken,
) -> Result<(), tonic::Status> {
    let mut backoff = Duration::from_millis(100);
    let mut outage_since: Option<std::time::Instant> = None;
    let mut last_durable = stream.durable().await;
    loop {
        let end = tokio::select! {
            end = session(&stream, &cache_url, &vm, epoch, &credential, &shutdown) => end,
            () = stalled(&stream) => {
                // A link that stalls rather than fails (packets dropped, a
                // hung peer) ends no call: without this the outage would
                // last until the buffer overflowed, whatever max_outage says.
                tracing::warn!(vm, "no acknowledgement from the cache within max_outage: tracking changed chunks");
                stream.enter_tracking().await;
                SessionEnd::Retry("the cache acknowledged nothing within max_outage".into())
            }
        };
        let durable = stream.durable().await;
        if durable > last_durable {
            // The cache made progress: any outage starts over.
            outage_since = None;
            last_durable = durable;
        }
        let waiting = !stream.queue.lock().await.pending.is_empty();
        match end {
            SessionEnd::Shutdown => return Ok(()),
            SessionEnd::Fatal(status) => {
                tracing::error!(vm, %status, "cache refused this agent: replication stopped; the disks stay online and writes are tracked");
                stream
                    .detach(&format!("replication stopped: {}", status.message()))
                    .await;
                return Err(status);
            }
            SessionEnd::Retry(_) if stream.detached().await.is_some() => {
                let why = stream.detached().await.unwrap_or_default();
                return Err(tonic::Status::failed_precondition(why));
            }
            SessionEnd::Retry(why) => {
                let since = *outage_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= stream.limits.max_outage && waiting {
                    tracing::warn!(vm, "cache away too long: tracking changed chunks");
                    stream.enter_tracking().await;
                    outage_since = None;
                }
                tracing::warn!(vm, why, ?backoff, "cache stream lost; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Returns once records have waited `max_outage` without the cache
/// acknowledging anything.
async fn stalled(stream: &Stream) {
    let max = stream.limits.max_outage;
    let tick = (max / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut seen = stream.durable().await;
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let q = stream.queue.lock().await;
        if q.durable != seen || q.pending.is_empty() {
            seen = q.durable;
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= max {
            return;
        }
    }
}

fn fatal(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::FailedPrecondition
            | tonic::Code::NotFound
            | tonic::Code::InvalidArgument
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
    )
}

async fn session(
    stream: &Arc<Stream>,
    cache_url: &str,
    vm: &str,
    epoch: u64,
    credential: &str,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let channel = match ferry_runtime::connect(cache_url) {
        Ok(c) => c,
        Err(e) => return SessionEnd::Retry(e.to_string()),
    };
    let mut client = CacheClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(4);
    let open = pb::IngestRequest {
        msg: Some(pb::ingest_request::Msg::Open(pb::IngestOpen {
            vm_name: vm.to_string(),
            credential: credential.to_string(),
            epoch,
        })),
    };
    if tx.send(open).await.is_err() {
        return SessionEnd::Retry("request stream closed".into());
    }
    // Setting up waits on the cache; a stop must not.
    let opened = tokio::select! {
        _ = shutdown.cancelled() => return SessionEnd::Shutdown,
        r = client.ingest(ReceiverStream::new(rx)) => r,
    };
    let mut responses = match opened {
        Ok(r) => r.into_inner(),
        Err(s) if fatal(&s) => return SessionEnd::Fatal(s),
        Err(s) => return SessionEnd::Retry(s.to_string()),
    };
    let first = tokio::select! {
        _ = shutdown.cancelled() => return SessionEnd::Shutdown,
        m = responses.message() => m,
    };
    let mut sent = match first {
        Ok(Some(pb::IngestResponse {
            msg: Some(pb::ingest_response::Msg::Opened(o)),
        })) => o.durable_sequence,
        Ok(_) => return SessionEnd::Retry("the cache did not answer `open`".into()),
        Err(s) if fatal(&s) => return SessionEnd::Fatal(s),
        Err(s) => return SessionEnd::Retry(s.to_string()),
    };
    let generation = {
        let mut q = stream.queue.lock().await;
        if !q.renumber && sent >= q.next_seq {
            // The cache holds records this stream never produced (another
            // agent's last batch landed after this one learned where to
            // start): numbering would collide, and what those records wrote
            // is unknown. Number on after them, and check every chunk by
            // checksum; pending records go again as data.
            tracing::warn!(
                vm,
                cache = sent,
                ours = q.next_seq - 1,
                "the cache is ahead of this agent: renumbering, checksum resync of every chunk"
            );
            Stream::overflow(&mut q);
            q.verify.merge(&Dirty::full(&stream.disks()));
            q.tracking_reason = format!(
                "the cache holds records up to {sent}, beyond this agent's {}: checksum resync",
                q.next_seq - 1
            );
        }
        if !q.renumber && sent < q.durable {
            // The cache acknowledged records up to our durable sequence and
            // no longer has them (its log was lost, damaged or started
            // again): what they wrote is gone from the stream. Number on
            // after what it holds and check every chunk by checksum.
            tracing::error!(
                vm,
                cache = sent,
                acknowledged = q.durable,
                "the cache lost records it had acknowledged: renumbering, checksum resync of \
                 every chunk"
            );
            Stream::overflow(&mut q);
            q.verify.merge(&Dirty::full(&stream.disks()));
            q.tracking_reason = format!(
                "the cache lost acknowledged records {}..={}: checksum resync",
                sent + 1,
                q.durable
            );
        }
        if q.renumber {
            // Pending records were dropped at an overflow: number on from
            // what the cache holds.
            q.next_seq = sent + 1;
            q.durable = sent;
            q.renumber = false;
        }
        q.detached = None;
        q.generation
    };
    stream.changed.notify_waiters();
    stream.acknowledge(sent).await;
    sent = sent.max(stream.durable().await);
    loop {
        let notified = stream.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if stream.queue.lock().await.generation != generation {
            return SessionEnd::Retry("the buffer overflowed; reconnecting to renumber".into());
        }
        let batch = stream.next_batch(sent).await;
        if let Some(last) = batch.last().map(|r| r.sequence) {
            let request = pb::IngestRequest {
                msg: Some(pb::ingest_request::Msg::Batch(pb::RecordBatch {
                    records: batch,
                })),
            };
            // Responses are taken while waiting for room to send: the
            // acknowledgements keep the buffer draining, and a cache that
            // waits for its answers to be read cannot stall the stream.
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                    permit = tx.reserve() => match permit {
                        Ok(permit) => {
                            permit.send(request);
                            break;
                        }
                        Err(_) => return SessionEnd::Retry("request stream closed".into()),
                    },
                    response = responses.message() => {
                        if let Some(end) = on_response(stream, vm, response).await {
                            return end;
                        }
                    }
                }
            }
            sent = last;
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            _ = notified => {}
            response = responses.message() => {
                if let Some(end) = on_response(stream, vm, response).await {
                    return end;
                }
            }
        }
    }
}

/// Handles one response of the cache; what ends the session, if it does.
async fn on_response(
    stream: &Stream,
    vm: &str,
    response: Result<Option<pb::IngestResponse>, tonic::Status>,
) -> Option<SessionEnd> {
    match response {
        Ok(Some(pb::IngestResponse { msg: Some(msg) })) => match msg {
            pb::ingest_response::Msg::Ack(a) => stream.acknowledge(a.durable_sequence).await,
            pb::ingest_response::Msg::Stop(s) if !s.final_marker_id.is_empty() => {
                tracing::warn!(vm, reason = %s.reason, "planned failover: draining, then a FINAL marker");
                stream.request_final(&s.final_marker_id);
            }
            pb::ingest_response::Msg::Stop(s) => {
                return Some(SessionEnd::Fatal(tonic::Status::failed_precondition(
                    s.reason,
                )))
            }
            pb::ingest_response::Msg::Throttle(t) => {
                // The cache refuses the next batch; the retry backs off.
                tracing::warn!(vm, reason = %t.reason, "cache throttles this VM");
            }
            pb::ingest_response::Msg::Resync(r) => {
                tracing::warn!(vm, disks = ?r.disk_ids, ranges = r.ranges.len(), reason = %r.reason, "cache asks for a resync");
                let reason = format!("resync requested: {}", r.reason);
                let ranges: Vec<(String, u64, u64)> = r
                    .ranges
                    .iter()
                    .map(|x| (x.disk_id.clone(), x.offset, x.length))
                    .collect();
                stream.request_resync(&r.disk_ids, &ranges, &reason).await;
            }
            pb::ingest_response::Msg::Bookmark(b) => {
                let marker = Op::Marker(pb::Marker {
                    kind: pb::MarkerKind::Bookmark as i32,
                    id: b.id.clone(),
                    time_unix_nanos: 0,
                });
                // Markers need no ordering lock: every write with a
                // lower sequence has completed, none after has.
                match stream.push("", marker).await {
                    0 => {
                        tracing::warn!(vm, id = %b.id, "no bookmark while tracking changed chunks")
                    }
                    seq => tracing::debug!(vm, id = %b.id, seq, "bookmark"),
                }
            }
            pb::ingest_response::Msg::Opened(_) => {
                return Some(SessionEnd::Retry("the cache answered `open` twice".into()))
            }
        },
        Ok(_) => return Some(SessionEnd::Retry("the cache ended the stream".into())),
        Err(s) if fatal(&s) => return Some(SessionEnd::Fatal(s)),
        Err(s) => return Some(SessionEnd::Retry(s.to_string())),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digests(offset: u64, chunks: u64) -> Op {
        Op::Digests(pb::ChunkDigests {
            offset,
            chunk_bytes: DIRTY_CHUNK,
            length: chunks * DIRTY_CHUNK,
            crc32c: vec![0; chunks as usize],
        })
    }

    fn write(offset: u64, len: usize) -> Op {
        Op::Write(pb::WriteOp {
            offset,
            data: vec![1; len].into(),
        })
    }

    #[tokio::test]
    async fn a_checksum_record_that_never_reaches_the_cache_is_checked_by_the_next_round() {
        let limits = StreamLimits {
            buffer_bytes: 64 * 1024,
            ..Default::default()
        };
        let stream = Stream::new(1, limits);
        stream.set_disks(vec![("os".into(), 64 * DIRTY_CHUNK)]);
        // Pending, then dropped at an overflow.
        assert_ne!(stream.push("os", digests(0, 4)).await, 0);
        assert_ne!(stream.push("os", write(40 * DIRTY_CHUNK, 40_000)).await, 0);
        assert_eq!(stream.push("os", write(50 * DIRTY_CHUNK, 40_000)).await, 0);
        // Pushed while tracking.
        assert_eq!(stream.push("os", digests(8 * DIRTY_CHUNK, 2)).await, 0);
        let set = stream.unsent().await;
        assert_eq!(set.verify.chunks("os"), vec![0, 1, 2, 3, 8, 9]);
        assert_eq!(set.data.chunks("os"), vec![40, 50]);
    }
}
