//! The bounded buffer of records waiting for, or in flight to, the cache:
//! appending, acknowledgements that release them, batches within the
//! in-flight window, and the waits for them to be durable.

use ferry_proto::cache::v1 as pb;
use ferry_proto::cache::v1::record::Op;

use super::tracking::{is_sync_completed, mark_unsent};
use super::{Queue, Stream};

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
impl Stream {
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

    /// Payload bytes waiting for the cache's acknowledgement.
    pub async fn pending_bytes(&self) -> usize {
        self.queue.lock().await.pending_bytes
    }

    pub(super) async fn acknowledge(&self, durable: u64) {
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
    pub(super) async fn next_batch(&self, after: u64) -> Vec<pb::Record> {
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
