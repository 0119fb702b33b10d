//! One connection to cache-svc's Ingest stream: open it, learn where the
//! cache stands (and whether it lost or gained records behind this agent's
//! back), send batches, and take acknowledgements and control messages.

use std::sync::Arc;

use ferry_proto::cache::v1 as pb;
use ferry_proto::cache::v1::cache_client::CacheClient;
use ferry_proto::cache::v1::record::Op;
use ferry_proto::ids::{Epoch, Sequence};
use ferry_runtime::peers::Credentials;
use ferry_runtime::retry::{retry, RetryError, RetryParams};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::{State, Stream};

/// The sequence a new stream for `vm` must start at: one past what the cache
/// holds durably. Retries with backoff until the cache answers, refuses for
/// good (fenced, VM unknown, credential refused), or `shutdown`.
pub async fn resume_point(
    cache_url: &str,
    credentials: &Credentials,
    vm: &str,
    epoch: Epoch,
    credential: &str,
    shutdown: &CancellationToken,
) -> Result<u64, tonic::Status> {
    let what = format!("asking the cache where VM {vm:?}'s stream resumes");
    let held = retry(RetryParams::RECONNECT, shutdown, &what, fatal, || {
        held_by_cache(cache_url, credentials, vm, epoch, credential)
    })
    .await;
    match held {
        Ok(held) => Ok(held.next().get()),
        Err(RetryError::Permanent(status) | RetryError::Exhausted(status)) => Err(status),
        Err(RetryError::Cancelled) => Err(tonic::Status::cancelled("shutting down")),
    }
}

/// Opens an Ingest stream only to learn the cache's durable sequence.
async fn held_by_cache(
    cache_url: &str,
    credentials: &Credentials,
    vm: &str,
    epoch: Epoch,
    credential: &str,
) -> Result<Sequence, tonic::Status> {
    // A URL that does not fit the credentials (http:// with TLS) will not
    // fit on a retry either.
    let channel = ferry_runtime::connect(cache_url, credentials)
        .map_err(|e| tonic::Status::failed_precondition(format!("cache endpoint: {e}")))?;
    let mut client = CacheClient::new(channel);
    let (tx, rx) = mpsc::channel(1);
    tx.send(open_request(vm, epoch, credential))
        .await
        .map_err(|_| tonic::Status::unavailable("request stream closed"))?;
    let mut responses = client.ingest(ReceiverStream::new(rx)).await?.into_inner();
    match responses.message().await? {
        Some(pb::IngestResponse {
            msg: Some(pb::ingest_response::Msg::Opened(o)),
        }) => Ok(Sequence(o.durable_sequence)),
        _ => Err(tonic::Status::unavailable(
            "the cache did not answer `open`",
        )),
    }
}

/// The first message of every Ingest stream.
fn open_request(vm: &str, epoch: Epoch, credential: &str) -> pb::IngestRequest {
    pb::IngestRequest {
        msg: Some(pb::ingest_request::Msg::Open(pb::IngestOpen {
            vm_name: vm.to_string(),
            credential: credential.to_string(),
            epoch: epoch.get(),
        })),
    }
}

/// Why a session with cache-svc ended.
#[derive(Debug)]
pub(super) enum SessionEnd {
    Shutdown,
    /// Reconnect after a backoff.
    Retry(String),
    /// The cache refused for good (fenced, VM unknown).
    Fatal(tonic::Status),
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

pub(super) async fn session(
    stream: &Arc<Stream>,
    cache_url: &str,
    credentials: &Credentials,
    vm: &str,
    epoch: Epoch,
    credential: &str,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let channel = match ferry_runtime::connect(cache_url, credentials) {
        Ok(c) => c,
        Err(e) => return SessionEnd::Retry(e.to_string()),
    };
    let mut client = CacheClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(4);
    if tx.send(open_request(vm, epoch, credential)).await.is_err() {
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
    let held = match first {
        Ok(Some(pb::IngestResponse {
            msg: Some(pb::ingest_response::Msg::Opened(o)),
        })) => Sequence(o.durable_sequence),
        Ok(_) => return SessionEnd::Retry("the cache did not answer `open`".into()),
        Err(s) if fatal(&s) => return SessionEnd::Fatal(s),
        Err(s) => return SessionEnd::Retry(s.to_string()),
    };
    let disks = stream.disks();
    let (generation, mut sent) = stream.state.lock().await.open(vm, held, &disks);
    stream.changed.notify_waiters();
    let mut sampler = ferry_runtime::batch_trace::Sampler::default();
    loop {
        let notified = stream.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if stream.state.lock().await.generation != generation {
            return SessionEnd::Retry("the buffer overflowed; reconnecting to renumber".into());
        }
        let batch = stream.next_batch(sent).await;
        if let Some(last) = batch.last().map(|r| r.sequence) {
            let first = batch.first().map_or(last, |r| r.sequence);
            // A sampled batch is traced from here to its point; the span
            // lasts until the batch is handed to the stream.
            let span = sampler.sample().then(|| {
                tracing::info_span!(
                    parent: None,
                    "ferry.agent.send_batch",
                    vm,
                    first,
                    last,
                    records = batch.len()
                )
            });
            let traces = span
                .as_ref()
                .and_then(|s| ferry_runtime::batch_trace::trace_of(s, first, last))
                .into_iter()
                .collect();
            let request = pb::IngestRequest {
                msg: Some(pb::ingest_request::Msg::Batch(pb::RecordBatch {
                    records: batch,
                    traces,
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
            drop(span);
            sent = Sequence(last);
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
            pb::ingest_response::Msg::Ack(a) => {
                stream.acknowledge(Sequence(a.durable_sequence)).await
            }
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

impl State {
    /// A session opened and the cache holds everything up to `held`: checks
    /// that against what this stream numbered and was told durable, and
    /// sets the numbering from it. The cache may be ahead (another agent's
    /// last batch landed late) or behind what it acknowledged (its log was
    /// lost): either way what it holds is not what this stream sent, so
    /// numbering goes on after it and every chunk of `disks` is checked by
    /// checksum. Returns the generation the session belongs to and the
    /// sequence to send after.
    pub(super) fn open(
        &mut self,
        vm: &str,
        held: Sequence,
        disks: &[(String, u64)],
    ) -> (u64, Sequence) {
        if !self.tracking.renumbering() && held > self.queue.last() {
            // The cache holds records this stream never produced (another
            // agent's last batch landed after this one learned where to
            // start): numbering would collide, and what those records wrote
            // is unknown. Number on after them, and check every chunk by
            // checksum; pending records go again as data.
            let ours = self.queue.last();
            tracing::warn!(
                vm,
                cache = held.get(),
                ours = ours.get(),
                "the cache is ahead of this agent: renumbering, checksum resync of every chunk"
            );
            self.overflow(&format!(
                "the cache holds records up to {held}, beyond this agent's {ours}: checksum resync"
            ));
            self.tracking.verify_all(disks);
        }
        if !self.tracking.renumbering() && held < self.queue.durable() {
            // The cache acknowledged records up to our durable sequence and
            // no longer has them (its log was lost, damaged or started
            // again): what they wrote is gone from the stream. Number on
            // after what it holds and check every chunk by checksum.
            let acknowledged = self.queue.durable();
            tracing::error!(
                vm,
                cache = held.get(),
                acknowledged = acknowledged.get(),
                "the cache lost records it had acknowledged: renumbering, checksum resync of \
                 every chunk"
            );
            self.overflow(&format!(
                "the cache lost acknowledged records {}..={acknowledged}: checksum resync",
                held.next()
            ));
            self.tracking.verify_all(disks);
        }
        if self.tracking.renumbering() {
            // Pending records were dropped into the map: number on from
            // what the cache holds.
            self.queue.renumber_after(held);
            self.tracking.renumbered();
        }
        self.detached = None;
        if let Err(refused) = self.queue.acknowledge(held) {
            tracing::debug!(vm, %refused, "acknowledgement at open ignored");
        }
        (self.generation, held.max(self.queue.durable()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::DIRTY_CHUNK;

    fn disks() -> Vec<(String, u64)> {
        vec![
            ("os".into(), 4 * DIRTY_CHUNK),
            ("data".into(), 2 * DIRTY_CHUNK),
        ]
    }

    /// A state with records 1..=`n` pending, of which `acked` are durable.
    fn state(n: u64, acked: u64) -> State {
        let mut state = State::new(1);
        for i in 0..n {
            let op = Op::Write(pb::WriteOp {
                offset: i * DIRTY_CHUNK,
                data: vec![1; 512].into(),
            });
            state.push("os", op, usize::MAX);
        }
        state.queue.acknowledge(Sequence(acked)).unwrap();
        state
    }

    fn checks_every_chunk(state: &State) -> bool {
        let set = state.tracking.unsent(state.queue.pending());
        set.verify.chunks("os") == vec![0, 1, 2, 3] && set.verify.chunks("data") == vec![0, 1]
    }

    #[test]
    fn a_cache_in_step_resumes_above_what_it_holds() {
        let mut state = state(5, 1);
        let (generation, sent) = state.open("vm", Sequence(3), &disks());
        assert_eq!((generation, sent), (0, Sequence(3)));
        assert!(!state.tracking.active());
        assert_eq!(state.queue.durable(), Sequence(3));
        let left: Vec<u64> = state.queue.pending().map(|r| r.sequence).collect();
        assert_eq!(left, vec![4, 5]);
    }

    #[test]
    fn a_cache_ahead_of_the_agent_is_numbered_after_and_every_chunk_checked() {
        let mut state = state(2, 0);
        let (generation, sent) = state.open("vm", Sequence(10), &disks());
        assert_eq!((generation, sent), (1, Sequence(10)));
        assert_eq!(state.queue.last(), Sequence(10), "the next record is 11");
        assert!(state.tracking.active());
        assert!(checks_every_chunk(&state));
        // Its own pending records go again as data.
        let set = state.tracking.unsent(state.queue.pending());
        assert_eq!(set.data.chunks("os"), vec![0, 1]);
    }

    #[test]
    fn a_cache_that_lost_acknowledged_records_is_numbered_after_and_every_chunk_checked() {
        let mut state = state(5, 5);
        let (generation, sent) = state.open("vm", Sequence(2), &disks());
        assert_eq!((generation, sent), (1, Sequence(2)));
        assert_eq!(
            (state.queue.last(), state.queue.durable()),
            (Sequence(2), Sequence(2))
        );
        assert!(state.tracking.active());
        assert!(state
            .tracking
            .reason()
            .contains("lost acknowledged records 3..=5"));
        assert!(checks_every_chunk(&state));
    }

    #[test]
    fn a_stream_that_overflowed_is_numbered_after_the_cache_and_no_longer_detached() {
        let mut state = state(3, 0);
        state.detach("fenced");
        let (generation, sent) = state.open("vm", Sequence(7), &disks());
        assert_eq!((generation, sent), (1, Sequence(7)));
        assert_eq!(state.queue.last(), Sequence(7));
        assert!(!state.tracking.renumbering());
        assert_eq!(state.detached, None);
        // The map is resynced, not checked whole: the cache was not ahead of
        // numbering this stream had given up.
        assert!(state
            .tracking
            .unsent(state.queue.pending())
            .verify
            .is_empty());
    }
}
