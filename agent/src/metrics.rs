//! The agent's metrics (served when `--metrics-listen` is set; off by
//! default): writes and bytes captured, the replication buffer's fill
//! against its size, and whether replication is tracking changed chunks or
//! has stopped (detached). The buffer and the mode sit under the stream's
//! async lock, so a task samples them every second; a scrape reads the
//! samples and the capture's counters, never waiting on a write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Unit;
use tokio_util::sync::CancellationToken;

use crate::capture::Capture;
use crate::stream::Stream;

/// The stream's figures as last sampled.
#[derive(Debug, Default)]
struct Sampled {
    buffered_bytes: AtomicU64,
    tracking: AtomicU64,
    detached: AtomicU64,
}

/// The agent's collector.
#[derive(Debug)]
pub struct AgentMetrics {
    vm: String,
    capture: Weak<Capture>,
    buffer_bytes: u64,
    sampled: Arc<Sampled>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Capture")
    }
}

impl AgentMetrics {
    /// The collector for `vm`'s capture and stream; samples the stream
    /// every second until `stop`.
    pub fn start(
        vm: &str,
        capture: &Arc<Capture>,
        stream: Arc<Stream>,
        stop: CancellationToken,
    ) -> AgentMetrics {
        let sampled = Arc::new(Sampled::default());
        let buffer_bytes = stream.limits().buffer_bytes as u64;
        let into = sampled.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let buffered = stream.pending_bytes().await as u64;
                let tracking = stream.tracking().await.0;
                let detached = stream.detached().await.is_some();
                into.buffered_bytes.store(buffered, Ordering::Relaxed);
                into.tracking.store(u64::from(tracking), Ordering::Relaxed);
                into.detached.store(u64::from(detached), Ordering::Relaxed);
            }
        });
        AgentMetrics {
            vm: vm.to_string(),
            capture: Arc::downgrade(capture),
            buffer_bytes,
            sampled,
        }
    }
}

impl prometheus_client::collector::Collector for AgentMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(capture) = self.capture.upgrade() else {
            return Ok(());
        };
        let labels = [("vm", self.vm.as_str())];
        let streamed = capture.stream().streamed_bytes();
        let (writes, bytes) = capture.written();
        let (unchanged, unchanged_bytes) = capture.unchanged();
        for (name, help, unit, value) in [
            (
                "ferry_agent_writes",
                "Writes the VM made to its disks through the agent, each written to the source \
                 and recorded",
                None,
                writes,
            ),
            (
                "ferry_agent_written",
                "Bytes of those writes",
                Some(&Unit::Bytes),
                bytes,
            ),
            (
                "ferry_agent_unchanged_writes",
                "Writes (and zeroings) dropped because the agent's copy held their data \
                 already: an active mirror's sync over what the agent has",
                None,
                unchanged,
            ),
            (
                "ferry_agent_unchanged",
                "Bytes of those writes",
                Some(&Unit::Bytes),
                unchanged_bytes,
            ),
            (
                "ferry_agent_streamed",
                "Bytes of the records put into the replication stream (encoded): writes, \
                 copies, resent chunks, digests and markers; what crosses to the cache",
                Some(&Unit::Bytes),
                streamed,
            ),
        ] {
            let counter = ConstCounter::new(value);
            let mut family = encoder.encode_descriptor(name, help, unit, counter.metric_type())?;
            counter.encode(family.encode_family(&labels)?)?;
        }
        let r = Ordering::Relaxed;
        let gauges = [
            (
                "ferry_agent_buffered",
                "Bytes of records in the replication buffer (not yet acknowledged durable by \
                 the cache)",
                Some(&Unit::Bytes),
                self.sampled.buffered_bytes.load(r) as f64,
            ),
            (
                "ferry_agent_buffer_capacity",
                "The replication buffer's size; when it fills, the agent tracks changed chunks \
                 instead and resyncs them later",
                Some(&Unit::Bytes),
                self.buffer_bytes as f64,
            ),
            (
                "ferry_agent_tracking",
                "1 while replication tracks changed chunks (the buffer overflowed or the cache \
                 was out of reach too long) until a resync sends them",
                None,
                self.sampled.tracking.load(r) as f64,
            ),
            (
                "ferry_agent_detached",
                "1 while replication has stopped for good (fenced by a failover, disabled, a \
                 planned failover drained); writes go on locally and are tracked",
                None,
                self.sampled.detached.load(r) as f64,
            ),
        ];
        for (name, help, unit, value) in gauges {
            let gauge = prometheus_client::metrics::gauge::ConstGauge::new(value);
            let mut family = encoder.encode_descriptor(name, help, unit, gauge.metric_type())?;
            gauge.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
