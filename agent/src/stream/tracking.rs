//! Changed-chunk tracking: what the stream switches to when records cannot
//! reach the cache (an overflow, a long outage, a stop, records the cache
//! lost), marking what was not sent and what resync must cover.

use ferry_proto::cache::v1 as pb;
use ferry_proto::cache::v1::record::Op;

use std::collections::BTreeSet;

use super::{State, Stream};

pub(super) fn is_sync_completed(op: &Op) -> bool {
    matches!(op, Op::Marker(m) if m.kind == pb::MarkerKind::SyncCompleted as i32)
}

/// The SYNC_STARTED id of a resync round that covers every chunk of a
/// disk, and of one that covers some.
pub const RESYNC_FULL: &str = "resync:full";
pub const RESYNC_PARTIAL: &str = "resync";

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

    /// The dirty chunks as (disk, offset, length) runs, at most `max` of
    /// them: past that, runs closer than a growing gap are merged (more is
    /// covered, never less).
    pub fn runs(&self, max: usize) -> Vec<(String, u64, u64)> {
        let mut gap = 0u64;
        loop {
            let mut runs: Vec<(String, u64, u64)> = Vec::new();
            for disk in self.disks.keys() {
                for c in self.chunks(disk) {
                    match runs.last_mut() {
                        Some((d, first, n)) if d == disk && *first + *n + gap >= c => {
                            *n = c - *first + 1
                        }
                        _ => runs.push((disk.clone(), c, 1)),
                    }
                }
            }
            if runs.len() <= max.max(1) {
                return runs
                    .into_iter()
                    .map(|(d, first, n)| (d, first * DIRTY_CHUNK, n * DIRTY_CHUNK))
                    .collect();
            }
            gap = (gap * 2).max(1);
        }
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
    pub close: BTreeSet<String>,
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

    /// The disks a round of this set covers, sorted, each with the id its
    /// SYNC_STARTED carries: `resync:full` when the round covers every
    /// chunk of the disk, which closes a gap the processor found in the
    /// stream (cache.proto).
    pub fn opening(&self, sizes: &[(String, u64)]) -> Vec<(String, &'static str)> {
        let mut out = Vec::new();
        for (disk, size) in sizes {
            let data = self.data.chunks(disk);
            let sent: BTreeSet<u64> = data.iter().copied().collect();
            let check = self.verify.chunks(disk);
            let check = check.iter().filter(|c| !sent.contains(c));
            if data.is_empty() && check.clone().next().is_none() && !self.close.contains(disk) {
                continue;
            }
            let all = size.div_ceil(DIRTY_CHUNK);
            let covered = data.iter().chain(check).filter(|c| **c < all).count();
            let id = if covered as u64 >= all {
                RESYNC_FULL
            } else {
                RESYNC_PARTIAL
            };
            out.push((disk.clone(), id));
        }
        out
    }

    fn merge(&mut self, other: &ResyncSet) {
        self.data.merge(&other.data);
        self.verify.merge(&other.verify);
        self.close.extend(other.close.iter().cloned());
    }
}

/// The changed-chunk side of the stream: while `map` is set, writes only
/// mark it; resync takes it in rounds and clears what it sends again.
#[derive(Debug, Default)]
pub(super) struct Tracking {
    /// Set while writes are tracked rather than buffered.
    map: Option<Dirty>,
    /// Why tracking started, for registry and people.
    reason: String,
    /// Chunks to check by checksum at the next resync.
    verify: Dirty,
    /// Disks whose SYNC_COMPLETED was lost to tracking.
    close: BTreeSet<String>,
    /// Chunks taken from tracking for resync and not yet sent again.
    outstanding: ResyncSet,
    /// Set with `map` when records were dropped: numbering restarts after
    /// the cache's durable sequence at the next session.
    renumber: bool,
}

impl Tracking {
    /// Whether writes are being tracked as changed chunks.
    pub(super) fn active(&self) -> bool {
        self.map.is_some()
    }

    /// Whether the numbering waits to be re-established with the cache.
    pub(super) fn renumbering(&self) -> bool {
        self.renumber
    }

    /// The next session numbers on after what the cache holds.
    pub(super) fn renumbered(&mut self) {
        self.renumber = false;
    }

    /// Why changed chunks are being tracked.
    pub(super) fn reason(&self) -> &str {
        &self.reason
    }

    pub(super) fn set_reason(&mut self, reason: &str) {
        self.reason = reason.to_string();
    }

    /// Whether nothing is left for resync: nothing tracked, nothing taken
    /// and not yet sent again, nothing to check, and the numbering settled.
    /// Only a completed resync round (or none needed) gets here.
    pub(super) fn settled(&self) -> bool {
        self.map.is_none()
            && !self.renumber
            && self.outstanding.is_empty()
            && self.verify.is_empty()
    }

    /// Starts from a saved set (an agent restart): resync covers it once the
    /// numbering is established with the cache.
    pub(super) fn restore(&mut self, set: ResyncSet, reason: &str) {
        self.map = Some(set.data);
        self.verify = set.verify;
        self.close = set.close;
        self.reason = reason.to_string();
        self.renumber = true;
    }

    /// Switches to tracking with `unsent` records dropped (they will never
    /// reach the cache): what they wrote is marked, and numbering restarts.
    pub(super) fn start<'a>(
        &mut self,
        unsent: impl IntoIterator<Item = &'a pb::Record>,
        reason: &str,
    ) {
        let mut map = self.map.take().unwrap_or_default();
        for r in unsent {
            if let Some(op) = &r.op {
                mark_unsent(&mut map, &mut self.verify, &r.disk_id, op);
                if is_sync_completed(op) {
                    self.close.insert(r.disk_id.clone());
                }
            }
        }
        self.map = Some(map);
        self.reason = reason.to_string();
        self.renumber = true;
    }

    /// A write made while tracking: marks what it changed.
    pub(super) fn mark(&mut self, disk: &str, op: &Op) {
        if let Some(map) = self.map.as_mut() {
            mark_unsent(map, &mut self.verify, disk, op);
        }
        if is_sync_completed(op) {
            self.close.insert(disk.to_string());
        }
    }

    /// Records must be renumbered after the cache's (a stop while already
    /// tracking).
    pub(super) fn renumber(&mut self) {
        self.renumber = true;
    }

    /// Every chunk of `disks` is checked by checksum at the next round.
    pub(super) fn verify_all(&mut self, disks: &[(String, u64)]) {
        self.verify.merge(&Dirty::full(disks));
    }

    /// A resync cache-svc asked for: `data` goes again, `verify` is checked;
    /// writes from now on are tracked (records already pending still go).
    pub(super) fn request(&mut self, data: Dirty, verify: &Dirty, reason: &str) {
        match self.map.as_mut() {
            Some(map) => map.merge(&data),
            None => {
                self.map = Some(data);
                self.reason = reason.to_string();
            }
        }
        self.verify.merge(verify);
    }

    /// Ends tracking for a resync round and returns what it must send; the
    /// set stays outstanding until every chunk of it is sent again. None
    /// while the numbering is not yet re-established, or nothing is tracked.
    ///
    /// Every disk the round covers (`sizes` are the VM's disks) is opened by
    /// it, so each is in `close`: a round that fails after opening a disk
    /// leaves it outstanding until a later round closes it.
    pub(super) fn take_round(&mut self, sizes: &[(String, u64)]) -> Option<ResyncSet> {
        if self.renumber {
            return None;
        }
        let mut set = self.map.take().map(|data| ResyncSet {
            data,
            verify: std::mem::take(&mut self.verify),
            close: std::mem::take(&mut self.close),
        })?;
        for (disk, _) in set.opening(sizes) {
            set.close.insert(disk);
        }
        self.outstanding.merge(&set);
        Some(set)
    }

    /// A round failed part way: what it had yet to send is tracked again.
    pub(super) fn round_failed(&mut self) {
        let outstanding = std::mem::take(&mut self.outstanding);
        match self.map.as_mut() {
            Some(map) => map.merge(&outstanding.data),
            None => self.map = Some(outstanding.data),
        }
        self.verify.merge(&outstanding.verify);
        self.close.extend(outstanding.close);
    }

    /// Resync has sent (or checked) `chunk` of `disk` again.
    pub(super) fn resent(&mut self, disk: &str, chunk: u64) {
        self.outstanding.data.clear(disk, chunk);
        self.outstanding.verify.clear(disk, chunk);
    }

    /// Resync has put a SYNC_COMPLETED of `disk` into the stream again.
    pub(super) fn sync_closed(&mut self, disk: &str) {
        self.outstanding.close.remove(disk);
    }

    /// Everything not yet durable: the map, what resync has yet to send,
    /// and the `pending` records.
    pub(super) fn unsent<'a>(
        &self,
        pending: impl IntoIterator<Item = &'a pb::Record>,
    ) -> ResyncSet {
        let mut set = ResyncSet {
            data: self.map.clone().unwrap_or_default(),
            verify: self.verify.clone(),
            close: self.close.clone(),
        };
        set.merge(&self.outstanding);
        // The state file keeps chunks only: a lost SYNC_COMPLETED travels
        // as a check of its disk's first chunk, and the next start's resync
        // round closes every disk anyway.
        for disk in std::mem::take(&mut set.close) {
            set.verify.mark(&disk, 0, 1);
        }
        for r in pending {
            if let Some(op) = &r.op {
                mark_unsent(&mut set.data, &mut set.verify, &r.disk_id, op);
            }
        }
        set
    }
}

impl State {
    /// Drops every pending record into the changed-chunk map: they will
    /// never reach the cache as records. The open session ends (a new
    /// generation) so that numbering restarts after what the cache holds.
    pub(super) fn overflow(&mut self, reason: &str) {
        let unsent = self.queue.take_pending();
        self.tracking.start(&unsent, reason);
        self.generation += 1;
    }

    /// Replication stopped for good: see [`Stream::detach`].
    pub(super) fn detach(&mut self, reason: &str) {
        if self.tracking.active() {
            self.tracking.renumber();
            self.generation += 1;
        } else {
            self.overflow(reason);
        }
        self.tracking.set_reason(reason);
        self.detached = Some(reason.to_string());
    }
}

impl Stream {
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
        self.state
            .lock()
            .await
            .tracking
            .request(data, &verify, reason);
        self.changed.notify_waiters();
    }

    /// Everything not yet durable in the cache, as changed chunks: the
    /// tracked map, chunks resync has yet to send, and pending records.
    /// Saved at a clean shutdown so that the next start resyncs just these.
    pub async fn unsent(&self) -> ResyncSet {
        let state = self.state.lock().await;
        state.tracking.unsent(state.queue.pending())
    }

    /// A resync round failed part way: the chunks it had yet to send go back
    /// into the map, to be taken by the next round.
    pub async fn retry_outstanding(&self) {
        self.state.lock().await.tracking.round_failed();
        self.changed.notify_waiters();
    }

    /// Resync has put a SYNC_COMPLETED of `disk` into the stream again.
    pub async fn sync_closed(&self, disk: &str) {
        self.state.lock().await.tracking.sync_closed(disk);
        self.changed.notify_waiters();
    }

    /// Resync has sent (or checked) `chunk` of `disk` again.
    pub async fn resent(&self, disk: &str, chunk: u64) {
        self.state.lock().await.tracking.resent(disk, chunk);
        self.changed.notify_waiters();
    }

    /// Replication stopped for good (`reason`): what is pending goes into
    /// the changed-chunk map, later writes only mark it, and the open
    /// session ends. The VM's writes go on; a new session (the same agent
    /// allowed again) renumbers after the cache and resyncs the map.
    pub async fn detach(&self, reason: &str) {
        self.state.lock().await.detach(reason);
        self.changed.notify_waiters();
    }

    /// Why replication stopped for good, if it did.
    pub async fn detached(&self) -> Option<String> {
        self.state.lock().await.detached.clone()
    }

    /// Switches to tracking changed chunks now (the cache was away too long).
    pub async fn enter_tracking(&self) {
        let mut state = self.state.lock().await;
        if !state.tracking.active() {
            state.overflow("the cache was unreachable too long");
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Whether writes are being tracked as changed chunks, and whether the
    /// numbering has been re-established with the cache since.
    pub async fn tracking(&self) -> (bool, bool) {
        let state = self.state.lock().await;
        (state.tracking.active(), !state.tracking.renumbering())
    }

    /// Why changed chunks are being tracked.
    pub async fn tracking_reason(&self) -> String {
        self.state.lock().await.tracking.reason().to_string()
    }

    /// Ends tracking and returns the changed chunks. The caller holds the
    /// capture's ordering lock, so no write falls between the map and the
    /// records that follow.
    pub async fn take_tracking(&self) -> Option<ResyncSet> {
        let sizes = self.disks();
        let set = self.state.lock().await.tracking.take_round(&sizes);
        self.changed.notify_waiters();
        set
    }

    /// How often the buffer has overflowed into changed-chunk tracking.
    pub async fn overflows(&self) -> u64 {
        self.state.lock().await.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{State, StreamLimits};

    #[test]
    fn runs_coalesce_and_stay_within_the_bound() {
        let mut d = Dirty::default();
        d.mark("os", 0, 2 * DIRTY_CHUNK);
        d.mark("os", 5 * DIRTY_CHUNK, 1);
        d.mark("data", 3 * DIRTY_CHUNK, DIRTY_CHUNK);
        assert_eq!(
            d.runs(10),
            vec![
                ("data".to_string(), 3 * DIRTY_CHUNK, DIRTY_CHUNK),
                ("os".to_string(), 0, 2 * DIRTY_CHUNK),
                ("os".to_string(), 5 * DIRTY_CHUNK, DIRTY_CHUNK),
            ]
        );
        // Two at most: the runs of "os" merge, covering the gap.
        assert_eq!(
            d.runs(2),
            vec![
                ("data".to_string(), 3 * DIRTY_CHUNK, DIRTY_CHUNK),
                ("os".to_string(), 0, 6 * DIRTY_CHUNK),
            ]
        );
        assert!(Dirty::default().runs(4).is_empty());
    }

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

    fn marker(kind: pb::MarkerKind) -> Op {
        Op::Marker(pb::Marker {
            kind: kind as i32,
            id: String::new(),
            time_unix_nanos: 0,
        })
    }

    #[test]
    fn tracking_is_cleared_only_by_a_resync_round_that_sent_everything_again() {
        let mut state = State::new(1);
        let os = [("os".to_string(), 64 * DIRTY_CHUNK)];
        let budget = 2 * (40_000 + 64);
        state.push("os", write(0, 40_000), budget);
        state.push("os", marker(pb::MarkerKind::SyncCompleted), budget);
        state.push("os", write(3 * DIRTY_CHUNK, 40_000), budget);
        state.push("os", write(5 * DIRTY_CHUNK, 40_000), budget);
        assert!(state.tracking.active());
        assert!(!state.tracking.settled());
        assert_eq!(
            state.tracking.take_round(&os),
            None,
            "not before renumbering"
        );
        state.tracking.renumbered();
        let round = state.tracking.take_round(&os).unwrap();
        assert_eq!(round.data.chunks("os"), vec![0, 3, 5]);
        assert!(round.close.contains("os"), "the lost SYNC_COMPLETED");
        // Writes are buffered again, but the round is not done.
        assert!(!state.tracking.active());
        assert!(!state.tracking.settled());
        state.tracking.resent("os", 0);
        state.tracking.resent("os", 3);
        // The round fails: what it had yet to send is tracked again.
        state.tracking.round_failed();
        assert!(state.tracking.active());
        let again = state.tracking.take_round(&os).unwrap();
        assert_eq!(again.data.chunks("os"), vec![5]);
        assert!(again.close.contains("os"));
        state.tracking.resent("os", 5);
        assert!(!state.tracking.settled(), "the disk's sync is still open");
        state.tracking.sync_closed("os");
        assert!(state.tracking.settled());
        assert_eq!(state.tracking.take_round(&os), None);
    }
}
