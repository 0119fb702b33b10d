//! The bounded buffer of records waiting for, or in flight to, the cache:
//! appending, acknowledgements that release them in order, batches within
//! the in-flight window, and the waits for them to be durable.

use std::collections::VecDeque;

use ferry_proto::cache::v1 as pb;
use ferry_proto::cache::v1::record::Op;
use ferry_proto::ids::Sequence;

use super::{State, Stream, StreamLimits};

/// What a record costs in the buffer: its payload and a fixed overhead.
fn op_size(op: &Op) -> usize {
    match op {
        Op::Write(w) => w.data.len() + 64,
        _ => 64,
    }
}

fn payload(record: &pb::Record) -> usize {
    record.op.as_ref().map_or(64, op_size)
}

/// Records numbered and not yet acknowledged, in sequence order.
#[derive(Debug)]
pub(super) struct Queue {
    /// The sequence the next record gets.
    next: Sequence,
    pending: VecDeque<pb::Record>,
    /// What `pending` costs ([`op_size`]).
    bytes: usize,
    /// The highest sequence cache-svc acknowledged durable.
    durable: Sequence,
    /// When the last record was appended (None: none yet).
    last_append: Option<std::time::Instant>,
}

/// Why an acknowledgement was not taken.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum AckRefused {
    /// Below what the cache already acknowledged: a stale answer.
    #[error("acknowledgement of {ack} is below the durable {durable}")]
    Stale { ack: Sequence, durable: Sequence },
    /// Past the last record numbered: the cache cannot hold it.
    #[error("acknowledgement of {ack} is past the last record {last}")]
    Ahead { ack: Sequence, last: Sequence },
}

impl Queue {
    /// An empty queue whose first record gets `next` (at least 1).
    pub(super) fn new(next: Sequence) -> Queue {
        let next = next.max(Sequence(1));
        Queue {
            next,
            pending: VecDeque::new(),
            bytes: 0,
            durable: Sequence(next.get() - 1),
            last_append: None,
        }
    }

    /// The sequence the last appended record got (0 if none).
    pub(super) fn last(&self) -> Sequence {
        Sequence(self.next.get() - 1)
    }

    pub(super) fn durable(&self) -> Sequence {
        self.durable
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// What the pending records cost.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn pending(&self) -> impl Iterator<Item = &pb::Record> {
        self.pending.iter()
    }

    /// Whether `size` more fits in `budget`. An empty queue takes any one
    /// record, so a record larger than the budget still goes.
    pub(super) fn fits(&self, size: usize, budget: usize) -> bool {
        self.bytes == 0 || self.bytes + size <= budget
    }

    /// Numbers and seals a record and appends it; its sequence.
    pub(super) fn append(&mut self, disk_id: &str, op: Op) -> Sequence {
        self.bytes += op_size(&op);
        let mut record = pb::Record {
            sequence: self.next.get(),
            disk_id: disk_id.to_string(),
            op: Some(op),
            crc32c: 0,
            captured_at_unix_nanos: ferry_runtime::time::unix_nanos_now(),
        };
        ferry_proto::checksum::seal(&mut record);
        self.pending.push_back(record);
        self.last_append = Some(std::time::Instant::now());
        let appended = self.next;
        self.next = appended.next();
        appended
    }

    /// The cache holds everything up to `ack` durably: those records leave
    /// the buffer, oldest first. An acknowledgement below the last one, or
    /// of records never numbered, changes nothing.
    pub(super) fn acknowledge(&mut self, ack: Sequence) -> Result<(), AckRefused> {
        if ack < self.durable {
            return Err(AckRefused::Stale {
                ack,
                durable: self.durable,
            });
        }
        if ack > self.last() {
            return Err(AckRefused::Ahead {
                ack,
                last: self.last(),
            });
        }
        while self
            .pending
            .front()
            .is_some_and(|r| r.sequence <= ack.get())
        {
            if let Some(r) = self.pending.pop_front() {
                self.bytes -= payload(&r);
            }
        }
        self.durable = ack;
        Ok(())
    }

    /// Takes every pending record out (they will not be sent as records).
    pub(super) fn take_pending(&mut self) -> VecDeque<pb::Record> {
        self.bytes = 0;
        std::mem::take(&mut self.pending)
    }

    /// Numbering goes on after `held`, what the cache holds (nothing is
    /// pending: it went into the changed-chunk map).
    pub(super) fn renumber_after(&mut self, held: Sequence) {
        self.next = held.next();
        self.durable = held;
    }

    /// Up to a batch of pending records above `after`, without exceeding the
    /// in-flight window measured from `durable`.
    pub(super) fn batch(&self, after: Sequence, limits: &StreamLimits) -> Vec<pb::Record> {
        let after = after.get();
        let mut in_flight: usize = self
            .pending
            .iter()
            .take_while(|r| r.sequence <= after)
            .map(payload)
            .sum();
        let mut batch = Vec::new();
        let mut bytes = 0;
        for r in self.pending.iter().filter(|r| r.sequence > after) {
            let size = payload(r);
            if !batch.is_empty()
                && (bytes + size > limits.batch_bytes || in_flight + size > limits.in_flight_bytes)
            {
                break;
            }
            if batch.is_empty() && in_flight > 0 && in_flight + size > limits.in_flight_bytes {
                break;
            }
            bytes += size;
            in_flight += size;
            batch.push(r.clone());
        }
        batch
    }
}

/// What became of a pushed record.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Pushed {
    /// Buffered with this sequence.
    Queued(Sequence),
    /// Tracking was on: the record's chunks were marked.
    Tracked,
    /// It did not fit: the buffer went into the changed-chunk map, and so
    /// did the record.
    Overflowed,
}

impl State {
    /// Buffers a record within `budget` bytes, or tracks it.
    pub(super) fn push(&mut self, disk_id: &str, op: Op, budget: usize) -> Pushed {
        if self.tracking.active() {
            self.tracking.mark(disk_id, &op);
            return Pushed::Tracked;
        }
        if !self.queue.fits(op_size(&op), budget) {
            tracing::warn!(
                buffered = self.queue.bytes(),
                "replication buffer full: tracking changed chunks until resync"
            );
            self.overflow("replication buffer overflowed");
            self.tracking.mark(disk_id, &op);
            return Pushed::Overflowed;
        }
        Pushed::Queued(self.queue.append(disk_id, op))
    }
}

impl Stream {
    /// Appends a record (its sequence and checksum filled in here) and
    /// returns its sequence. Never waits for the cache: when the buffer
    /// would overflow, the stream drops its pending records and switches to
    /// tracking changed chunks (then this returns 0), and resync sends their
    /// current contents later.
    pub async fn push(&self, disk_id: &str, op: Op) -> u64 {
        let size = op.encoded_len() as u64;
        let pushed = self
            .state
            .lock()
            .await
            .push(disk_id, op, self.limits.buffer_bytes);
        match pushed {
            Pushed::Queued(seq) => {
                self.count_streamed(size);
                self.changed.notify_waiters();
                seq.get()
            }
            Pushed::Overflowed => {
                self.changed.notify_waiters();
                0
            }
            Pushed::Tracked => 0,
        }
    }

    /// Appends the records of one write, one after another with nothing
    /// between them; returns the last one's sequence (0 as [`Stream::push`]
    /// when they went to tracking).
    pub async fn push_all(&self, disk_id: &str, ops: Vec<Op>) -> u64 {
        let mut last = 0;
        let mut changed = false;
        {
            let mut state = self.state.lock().await;
            for op in ops {
                let size = op.encoded_len() as u64;
                last = match state.push(disk_id, op, self.limits.buffer_bytes) {
                    Pushed::Queued(seq) => {
                        self.count_streamed(size);
                        changed = true;
                        seq.get()
                    }
                    Pushed::Overflowed => {
                        changed = true;
                        0
                    }
                    Pushed::Tracked => 0,
                };
            }
        }
        if changed {
            self.changed.notify_waiters();
        }
        last
    }

    fn count_streamed(&self, bytes: u64) {
        self.streamed
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes of the records put into the stream since the start (their
    /// encoded size): what crossed, or is crossing, to the cache.
    pub fn streamed_bytes(&self) -> u64 {
        self.streamed.load(std::sync::atomic::Ordering::Relaxed)
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
                let state = self.state.lock().await;
                if state.tracking.active() || state.queue.fits(size, self.limits.buffer_bytes / 2) {
                    return;
                }
            }
            notified.await;
        }
    }

    /// An idle stream's tick: when nothing was appended for `idle` (and
    /// something was before), appends a TICK marker, which says the stream
    /// holds every write completed before its capture time, so points, and
    /// the RPO, stay current while the VM writes nothing. Not while changes
    /// are tracked (the stream is not whole then), nor once a planned
    /// failover asked for the FINAL marker (nothing may follow it). Needs no
    /// ordering lock: every write with a lower sequence has completed.
    /// Whether it appended one.
    pub async fn tick_if_idle(&self, idle: std::time::Duration) -> bool {
        let mut state = self.state.lock().await;
        let quiet = state
            .queue
            .last_append
            .is_some_and(|at| at.elapsed() >= idle);
        if !quiet
            || state.tracking.active()
            || state.detached.is_some()
            || self.final_request.borrow().is_some()
        {
            return false;
        }
        let tick = Op::Marker(pb::Marker {
            kind: pb::MarkerKind::Tick as i32,
            id: String::new(),
            time_unix_nanos: 0,
        });
        state.queue.append("", tick);
        drop(state);
        self.changed.notify_waiters();
        true
    }

    /// The highest sequence cache-svc acknowledged durable.
    pub async fn durable(&self) -> u64 {
        self.state.lock().await.queue.durable().get()
    }

    /// The sequence the last pushed record got (0 if none).
    pub async fn last(&self) -> u64 {
        self.state.lock().await.queue.last().get()
    }

    /// Waits until every record pushed so far is durable in the cache, or
    /// until the buffer overflows (what was pending is then tracked as
    /// changed chunks, and resync sends it). Returns the durable sequence.
    pub async fn flushed(&self) -> u64 {
        let (target, generation) = {
            let state = self.state.lock().await;
            (state.queue.last(), state.generation)
        };
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so no wake-up falls in between.
            notified.as_mut().enable();
            {
                let state = self.state.lock().await;
                if state.flushed(target, generation) {
                    return state.queue.durable().get();
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
        let mut settling = Settling::new(self.state.lock().await.generation);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.state.lock().await;
                if settling.done(&state) {
                    return state.queue.durable().get();
                }
            }
            notified.await;
        }
    }

    /// The records waiting for the cache, in order (tests).
    #[cfg(test)]
    pub(crate) async fn pending_records(&self) -> Vec<pb::Record> {
        self.state.lock().await.queue.pending().cloned().collect()
    }

    /// Payload bytes waiting for the cache's acknowledgement.
    pub async fn pending_bytes(&self) -> usize {
        self.state.lock().await.queue.bytes()
    }

    /// The cache acknowledged everything up to `durable`.
    pub(super) async fn acknowledge(&self, durable: Sequence) {
        let taken = self.state.lock().await.queue.acknowledge(durable);
        match taken {
            Ok(()) => {}
            Err(refused @ AckRefused::Stale { .. }) => {
                tracing::debug!(%refused, "acknowledgement ignored")
            }
            Err(refused @ AckRefused::Ahead { .. }) => {
                tracing::warn!(%refused, "acknowledgement ignored")
            }
        }
        self.changed.notify_waiters();
    }

    /// Up to a batch of pending records above `after`, without exceeding the
    /// in-flight window measured from `durable`.
    pub(super) async fn next_batch(&self, after: Sequence) -> Vec<pb::Record> {
        self.state.lock().await.queue.batch(after, &self.limits)
    }
}

impl State {
    /// Whether a flush that started at `target` in `generation` is over:
    /// everything up to `target` durable, or the buffer gone into the
    /// changed-chunk map since.
    fn flushed(&self, target: Sequence, generation: u64) -> bool {
        // Renumbering pending: nothing is pending (it went into the map),
        // and `target` may be of the old numbering, which the new one would
        // not reach without further records.
        self.queue.durable() >= target
            || self.generation != generation
            || self.tracking.renumbering()
    }
}

/// The progress of a [`Stream::settled`] wait.
struct Settling {
    /// The last record that must be durable, fixed once nothing is tracked.
    target: Option<Sequence>,
    generation: u64,
}

impl Settling {
    fn new(generation: u64) -> Settling {
        Settling {
            target: None,
            generation,
        }
    }

    /// Whether every write made before is durable, looking at `state` now.
    fn done(&mut self, state: &State) -> bool {
        if state.generation != self.generation {
            self.generation = state.generation;
            self.target = None;
        }
        if !state.tracking.settled() {
            // Writes from before are tracked: wait until resync has pushed
            // them, then for those records.
            self.target = None;
            return false;
        }
        let target = *self.target.get_or_insert(state.queue.last());
        state.queue.durable() >= target
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::DIRTY_CHUNK;
    use std::sync::Arc;

    /// What one 1000-byte write costs in the buffer.
    const COST: usize = 1000 + 64;

    fn write(chunk: u64) -> Op {
        Op::Write(pb::WriteOp {
            offset: chunk * DIRTY_CHUNK,
            data: vec![7; 1000].into(),
        })
    }

    fn stream(buffer_records: usize) -> Arc<Stream> {
        let limits = StreamLimits {
            buffer_bytes: buffer_records * COST,
            ..StreamLimits::default()
        };
        let s = Stream::new(1, limits);
        s.set_disks(vec![("os".into(), 64 * DIRTY_CHUNK)]);
        s
    }

    #[test]
    fn the_buffer_never_exceeds_its_budget_and_overflows_into_tracking_once() {
        let budget = 5 * COST;
        let mut state = State::new(1);
        let mut outcomes = Vec::new();
        for chunk in 0..12 {
            outcomes.push(state.push("os", write(chunk), budget));
            assert!(
                state.queue.bytes() <= budget,
                "{} bytes",
                state.queue.bytes()
            );
            if chunk == 2 {
                // The cache took the first two: they are not unsent.
                state.queue.acknowledge(Sequence(2)).unwrap();
            }
        }
        let overflowed: Vec<usize> = (0..outcomes.len())
            .filter(|i| outcomes[*i] == Pushed::Overflowed)
            .collect();
        assert_eq!(overflowed, vec![7], "{outcomes:?}");
        assert!(outcomes[..7].iter().all(|o| matches!(o, Pushed::Queued(_))));
        assert!(outcomes[8..].iter().all(|o| *o == Pushed::Tracked));
        assert_eq!(state.generation, 1, "one switch, one session ended");
        assert!(state.queue.is_empty());
        assert_eq!(state.queue.bytes(), 0);
        // Everything but the two acknowledged writes is marked, the
        // overflowing write and the ones after it included.
        let unsent = state.tracking.unsent(state.queue.pending());
        assert_eq!(unsent.data.chunks("os"), (2..12).collect::<Vec<u64>>());
        assert!(unsent.verify.is_empty());
    }

    #[test]
    fn acknowledgements_release_records_oldest_first_and_a_stale_or_unknown_one_is_refused() {
        let mut q = Queue::new(Sequence(1));
        for chunk in 0..5 {
            q.append("os", write(chunk));
        }
        assert_eq!((q.last(), q.bytes()), (Sequence(5), 5 * COST));
        q.acknowledge(Sequence(2)).unwrap();
        assert_eq!(q.durable(), Sequence(2));
        assert_eq!(q.bytes(), 3 * COST);
        let left: Vec<u64> = q.pending().map(|r| r.sequence).collect();
        assert_eq!(left, vec![3, 4, 5]);
        assert_eq!(
            q.acknowledge(Sequence(1)),
            Err(AckRefused::Stale {
                ack: Sequence(1),
                durable: Sequence(2)
            })
        );
        assert_eq!(
            q.acknowledge(Sequence(9)),
            Err(AckRefused::Ahead {
                ack: Sequence(9),
                last: Sequence(5)
            })
        );
        assert_eq!((q.durable(), q.bytes()), (Sequence(2), 3 * COST));
        q.acknowledge(Sequence(2)).unwrap();
        q.acknowledge(Sequence(5)).unwrap();
        assert!(q.is_empty());
        assert_eq!((q.durable(), q.bytes()), (Sequence(5), 0));
    }

    #[tokio::test]
    async fn an_idle_stream_ticks_but_not_before_its_first_record_while_tracking_or_after_final() {
        let idle = std::time::Duration::ZERO;
        let s = stream(3);
        assert!(!s.tick_if_idle(idle).await, "nothing appended yet");
        s.push("os", write(0)).await;
        // Quiet for less than an hour: no tick.
        assert!(!s.tick_if_idle(std::time::Duration::from_secs(3600)).await);
        assert!(s.tick_if_idle(idle).await);
        let tick = s.pending_records().await.pop().unwrap();
        assert_eq!(tick.sequence, 2);
        assert_eq!(tick.disk_id, "");
        assert!(matches!(
            tick.op,
            Some(Op::Marker(pb::Marker { kind, .. })) if kind == pb::MarkerKind::Tick as i32
        ));
        assert_eq!(ferry_proto::checksum::record_crc32c(&tick), tick.crc32c);
        // A planned failover asked for FINAL: nothing may follow it.
        s.request_final("rp");
        assert!(!s.tick_if_idle(idle).await);
        // Tracking changed chunks: the stream is not whole, no tick.
        let t = stream(3);
        t.push("os", write(0)).await;
        t.enter_tracking().await;
        assert!(!t.tick_if_idle(idle).await);
    }

    #[tokio::test]
    async fn flushed_returns_at_an_overflow_and_while_renumbering() {
        let s = stream(3);
        for chunk in 0..3 {
            assert_ne!(s.push("os", write(chunk)).await, 0);
        }
        let mut flushed = Box::pin(s.flushed());
        assert!(futures::poll!(flushed.as_mut()).is_pending());
        // Not looked at again until a new session has renumbered.
        let mut late = Box::pin(s.flushed());
        assert!(futures::poll!(late.as_mut()).is_pending());
        s.acknowledge(Sequence(1)).await;
        assert!(futures::poll!(flushed.as_mut()).is_pending());
        assert_eq!(s.push("os", write(3)).await, 4, "room again after the ack");
        assert!(futures::poll!(flushed.as_mut()).is_pending());
        assert_eq!(s.push("os", write(4)).await, 0, "the buffer overflows");
        assert_eq!(
            futures::poll!(flushed.as_mut()),
            std::task::Poll::Ready(1),
            "records dropped at an overflow will never be acknowledged"
        );
        // Called after the overflow, before the next session renumbers:
        // nothing is pending, and sequence 3 may never come again.
        assert_eq!(
            futures::poll!(Box::pin(s.flushed())),
            std::task::Poll::Ready(1)
        );
        let disks = s.disks();
        s.state.lock().await.open("vm", Sequence(1), &disks);
        assert_eq!(futures::poll!(late.as_mut()), std::task::Poll::Ready(1));
    }

    #[tokio::test]
    async fn settled_started_before_an_overflow_waits_for_the_records_of_the_new_numbering() {
        let s = stream(3);
        for chunk in 0..3 {
            s.push("os", write(chunk)).await;
        }
        let mut settled = Box::pin(s.settled());
        assert!(futures::poll!(settled.as_mut()).is_pending(), "waits for 3");
        // Not looked at again until a whole round has gone by.
        assert_eq!(s.push("os", write(3)).await, 0);
        let disks = s.disks();
        s.state.lock().await.open("vm", Sequence(0), &disks);
        let round = s.take_tracking().await.unwrap();
        for chunk in round.data.chunks("os") {
            assert_ne!(s.push("os", write(chunk)).await, 0);
            s.resent("os", chunk).await;
            if chunk == 2 {
                s.acknowledge(Sequence(3)).await;
            }
        }
        // The round opened the disk: it closes it too.
        s.sync_closed("os").await;
        assert!(
            futures::poll!(settled.as_mut()).is_pending(),
            "3 of the old numbering is not the round's last record"
        );
        s.acknowledge(Sequence(4)).await;
        assert_eq!(futures::poll!(settled.as_mut()), std::task::Poll::Ready(4));
    }

    #[tokio::test]
    async fn settled_waits_through_a_resync_round_and_its_records() {
        let s = stream(3);
        for chunk in 0..3 {
            s.push("os", write(chunk)).await;
        }
        let mut settled = Box::pin(s.settled());
        assert!(futures::poll!(settled.as_mut()).is_pending());
        assert_eq!(s.push("os", write(3)).await, 0, "the buffer overflows");
        assert!(futures::poll!(settled.as_mut()).is_pending());
        // A session opens: the cache holds nothing of these.
        let disks = s.disks();
        s.state.lock().await.open("vm", Sequence(0), &disks);
        assert!(futures::poll!(settled.as_mut()).is_pending());
        let round = s.take_tracking().await.unwrap();
        assert!(futures::poll!(settled.as_mut()).is_pending());
        assert_eq!(round.data.chunks("os"), vec![0, 1, 2, 3]);
        for chunk in round.data.chunks("os") {
            assert_ne!(s.push("os", write(chunk)).await, 0);
            s.resent("os", chunk).await;
            if chunk == 2 {
                // The cache keeps up with the round.
                s.acknowledge(Sequence(3)).await;
            }
            assert!(futures::poll!(settled.as_mut()).is_pending());
        }
        // Every chunk went again, as records 1..=4; the last is not durable.
        s.sync_closed("os").await;
        assert!(futures::poll!(settled.as_mut()).is_pending());
        s.acknowledge(Sequence(4)).await;
        assert_eq!(futures::poll!(settled.as_mut()), std::task::Poll::Ready(4));
    }

    #[test]
    fn a_batch_stays_within_the_in_flight_window() {
        let limits = StreamLimits {
            in_flight_bytes: 3 * COST,
            batch_bytes: 2 * COST,
            ..StreamLimits::default()
        };
        let mut q = Queue::new(Sequence(1));
        for chunk in 0..6 {
            q.append("os", write(chunk));
        }
        let seqs = |b: Vec<pb::Record>| b.iter().map(|r| r.sequence).collect::<Vec<_>>();
        assert_eq!(seqs(q.batch(Sequence(0), &limits)), vec![1, 2]);
        assert_eq!(seqs(q.batch(Sequence(2), &limits)), vec![3]);
        assert!(q.batch(Sequence(3), &limits).is_empty(), "3 in flight");
        q.acknowledge(Sequence(2)).unwrap();
        assert_eq!(seqs(q.batch(Sequence(3), &limits)), vec![4, 5]);
    }
}
