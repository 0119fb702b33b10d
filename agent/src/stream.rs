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
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            buffer_bytes: 256 * 1024 * 1024,
            in_flight_bytes: 32 * 1024 * 1024,
            batch_bytes: 1024 * 1024,
        }
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
}

/// What the stream's users share with its sender task.
pub struct Stream {
    queue: Mutex<Queue>,
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
            changed: Notify::new(),
            limits,
        })
    }

    /// Appends a record (its sequence and checksum filled in here) and
    /// returns its sequence. Waits while the buffer is full.
    pub async fn push(&self, disk_id: &str, op: Op) -> u64 {
        let mut record = pb::Record {
            sequence: 0,
            disk_id: disk_id.to_string(),
            op: Some(op),
            crc32c: 0,
            captured_at_unix_nanos: ferry_runtime::time::unix_nanos_now(),
        };
        let size = payload(&record);
        loop {
            let notified = self.changed.notified();
            {
                let mut q = self.queue.lock().await;
                if q.pending_bytes == 0 || q.pending_bytes + size <= self.limits.buffer_bytes {
                    record.sequence = q.next_seq;
                    ferry_proto::checksum::seal(&mut record);
                    q.next_seq += 1;
                    q.pending_bytes += size;
                    q.pending.push_back(record);
                    let seq = q.next_seq - 1;
                    drop(q);
                    self.changed.notify_waiters();
                    return seq;
                }
            }
            notified.await;
        }
    }

    /// The highest sequence cache-svc acknowledged durable.
    pub async fn durable(&self) -> u64 {
        self.queue.lock().await.durable
    }

    /// The sequence the last pushed record got (0 if none).
    pub async fn last(&self) -> u64 {
        self.queue.lock().await.next_seq - 1
    }

    /// Waits until everything pushed so far is durable in the cache.
    pub async fn flushed(&self) -> u64 {
        let target = self.last().await;
        loop {
            let notified = self.changed.notified();
            if self.durable().await >= target {
                return target;
            }
            notified.await;
        }
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
/// good, if any (e.g. this agent was fenced).
pub async fn run(
    stream: Arc<Stream>,
    cache_url: String,
    vm: String,
    epoch: u64,
    credential: String,
    shutdown: CancellationToken,
) -> Result<(), tonic::Status> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(&stream, &cache_url, &vm, epoch, &credential, &shutdown).await {
            SessionEnd::Shutdown => return Ok(()),
            SessionEnd::Fatal(status) => {
                tracing::error!(vm, %status, "cache refused this agent; stopping the stream");
                return Err(status);
            }
            SessionEnd::Retry(why) => {
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
    let mut responses = match client.ingest(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) if fatal(&s) => return SessionEnd::Fatal(s),
        Err(s) => return SessionEnd::Retry(s.to_string()),
    };
    let mut sent = match responses.message().await {
        Ok(Some(pb::IngestResponse {
            msg: Some(pb::ingest_response::Msg::Opened(o)),
        })) => o.durable_sequence,
        Ok(_) => return SessionEnd::Retry("the cache did not answer `open`".into()),
        Err(s) if fatal(&s) => return SessionEnd::Fatal(s),
        Err(s) => return SessionEnd::Retry(s.to_string()),
    };
    let last = stream.last().await;
    if sent > last {
        // The cache holds records this stream never produced: numbering
        // would collide. The agent must start from `resume_point`.
        return SessionEnd::Fatal(tonic::Status::failed_precondition(format!(
            "the cache holds VM {vm:?} up to sequence {sent}, beyond this agent's {last}; \
             restart the agent so that it resumes after the cache"
        )));
    }
    stream.acknowledge(sent).await;
    sent = sent.max(stream.durable().await);
    loop {
        let notified = stream.changed.notified();
        let batch = stream.next_batch(sent).await;
        if let Some(last) = batch.last() {
            sent = last.sequence;
            let request = pb::IngestRequest {
                msg: Some(pb::ingest_request::Msg::Batch(pb::RecordBatch {
                    records: batch,
                })),
            };
            if tx.send(request).await.is_err() {
                return SessionEnd::Retry("request stream closed".into());
            }
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            _ = notified => {}
            response = responses.message() => match response {
                Ok(Some(pb::IngestResponse { msg: Some(msg) })) => match msg {
                    pb::ingest_response::Msg::Ack(a) => stream.acknowledge(a.durable_sequence).await,
                    pb::ingest_response::Msg::Stop(s) => {
                        return SessionEnd::Fatal(tonic::Status::failed_precondition(s.reason))
                    }
                    pb::ingest_response::Msg::Throttle(t) => {
                        // The cache refuses the next batch; the retry backs off.
                        tracing::warn!(vm, reason = %t.reason, "cache throttles this VM");
                    }
                    other => tracing::debug!(?other, "control message not handled yet"),
                },
                Ok(_) => return SessionEnd::Retry("the cache ended the stream".into()),
                Err(s) if fatal(&s) => return SessionEnd::Fatal(s),
                Err(s) => return SessionEnd::Retry(s.to_string()),
            },
        }
    }
}
