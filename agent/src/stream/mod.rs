//! The VM's ordered write stream to cache-svc.
//!
//! Every completed write gets the next dense sequence number (completion
//! order, so every prefix is crash-consistent) and waits in a bounded buffer
//! until cache-svc acknowledges it durable. One gRPC Ingest stream per VM
//! carries many records per message with a bounded number of bytes in
//! flight; after any failure the agent reconnects with backoff, learns the
//! durable sequence and resends everything above it.

mod queue;
mod session;
mod tracking;

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::ids::{Epoch, Sequence};
use ferry_runtime::retry::{Backoff, RetryParams};
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

pub use session::resume_point;
pub use tracking::{mark_unsent, Dirty, ResyncSet, DIRTY_CHUNK};

use queue::Queue;
use session::{session, SessionEnd};
use tracking::Tracking;

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

/// Everything the stream's users and its sender task change together,
/// under one lock: the buffer, the tracking that replaces it, and the mode.
struct State {
    queue: Queue,
    tracking: Tracking,
    /// Raised on every switch to tracking, so an open session ends and
    /// reconnects (to renumber after what the cache holds).
    generation: u64,
    /// Set when replication stopped for good (fenced, stopped, disabled, a
    /// planned failover's drain done): writes go on locally and are tracked;
    /// why, for health. Cleared when a session opens again.
    detached: Option<String>,
}

impl State {
    /// A stream whose first record gets `next_seq`.
    fn new(next_seq: u64) -> State {
        State {
            queue: Queue::new(Sequence(next_seq)),
            tracking: Tracking::default(),
            generation: 0,
            detached: None,
        }
    }
}

/// What the stream's users share with its sender task.
pub struct Stream {
    state: Mutex<State>,
    /// The VM's disks and sizes (set by the capture), for full resyncs.
    disks: std::sync::Mutex<Vec<(String, u64)>>,
    /// A planned failover's FINAL marker id, once the cache asked for it.
    final_request: tokio::sync::watch::Sender<Option<String>>,
    /// Rung when records are added or acknowledged.
    changed: Notify,
    limits: StreamLimits,
    /// Bytes of the records put into the stream (their encoded size),
    /// since the start: what crosses to the cache.
    streamed: std::sync::atomic::AtomicU64,
}

impl Stream {
    /// A stream whose first record gets `next_seq`.
    pub fn new(next_seq: u64, limits: StreamLimits) -> Arc<Stream> {
        Arc::new(Stream {
            state: Mutex::new(State::new(next_seq)),
            disks: std::sync::Mutex::new(Vec::new()),
            final_request: tokio::sync::watch::channel(None).0,
            changed: Notify::new(),
            limits,
            streamed: std::sync::atomic::AtomicU64::new(0),
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
        if let Ok(mut state) = stream.state.try_lock() {
            state.tracking.restore(set, reason);
        }
        stream
    }

    /// The limits it was made with.
    pub fn limits(&self) -> StreamLimits {
        self.limits
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

    /// Rung when records are added or acknowledged or the mode changes.
    pub fn notify(&self) -> &Notify {
        &self.changed
    }
}

/// Streams `stream` to the cache at `cache_url` (presenting `credentials`)
/// until `shutdown`, reconnecting
/// with backoff ([`RetryParams::RECONNECT`], started over once the cache
/// makes progress). Returns the status that ended it for
/// good, if any (e.g. this agent was fenced); the stream is then detached:
/// writes go on and are tracked, and a later `run` resumes it.
pub async fn run(
    stream: Arc<Stream>,
    cache_url: String,
    credentials: ferry_runtime::peers::Credentials,
    vm: String,
    epoch: Epoch,
    credential: String,
    shutdown: CancellationToken,
) -> Result<(), tonic::Status> {
    let mut backoff = Backoff::new(RetryParams::RECONNECT);
    let mut outage_since: Option<std::time::Instant> = None;
    let mut last_durable = stream.durable().await;
    loop {
        let end = tokio::select! {
            end = session(&stream, &cache_url, &credentials, &vm, epoch, &credential, &shutdown) => end,
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
            // The cache made progress: any outage, and the backoff, start
            // over.
            outage_since = None;
            backoff.reset();
            last_durable = durable;
        }
        let waiting = !stream.state.lock().await.queue.is_empty();
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
                tracing::warn!(
                    vm,
                    why,
                    attempt = backoff.attempts() + 1,
                    "cache stream lost; reconnecting"
                );
                if !backoff.wait(&shutdown).await {
                    return Ok(());
                }
            }
        }
    }
}

/// Returns once records have waited `max_outage` without the cache
/// acknowledging anything.
async fn stalled(stream: &Stream) {
    let max = stream.limits.max_outage;
    let tick = (max / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut seen = stream.state.lock().await.queue.durable();
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let state = stream.state.lock().await;
        if state.queue.durable() != seen || state.queue.is_empty() {
            seen = state.queue.durable();
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= max {
            return;
        }
    }
}
