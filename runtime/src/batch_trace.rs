//! Traces of write batches through the pipeline: the agent traces a sample
//! of the batches it sends (one a second, when it exports traces) and puts
//! the span's W3C trace context beside the records (`RecordBatch.traces`);
//! cache-svc continues the trace in a span of its ingest and hands its own
//! context on with the records it tails; processor-svc continues it in a span
//! of the apply; and the point that holds a traced batch gets a span with a
//! link to each batch it holds (many batches fan into one point).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ferry_proto::cache::v1::BatchTrace;
use opentelemetry::trace::{SpanContext, TraceContextExt};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// How often the agent traces a batch.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Traces at most one batch per [`SAMPLE_EVERY`], and none unless this
/// process exports traces.
#[derive(Debug, Default)]
pub struct Sampler {
    last: Option<Instant>,
}

impl Sampler {
    /// Whether to trace the batch about to go.
    pub fn sample(&mut self) -> bool {
        if !crate::telemetry::exporting() {
            return false;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|at| now.duration_since(at) < SAMPLE_EVERY)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// The remote context a `traceparent` names (invalid when it names none).
fn extract(traceparent: &str) -> opentelemetry::Context {
    use opentelemetry::propagation::TextMapPropagator as _;
    let mut carrier = std::collections::HashMap::new();
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier)
}

/// Makes `span` (not yet entered) a child of the span `traceparent` names.
/// A malformed one leaves `span` a root: a trace is never worth refusing
/// records over.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    let cx = extract(traceparent);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The span context `traceparent` names, for a link; None if malformed.
pub fn span_context(traceparent: &str) -> Option<SpanContext> {
    let cx = extract(traceparent);
    let span_context = cx.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

/// Links `span` to the span of each of `traces` (a point to the batches it
/// holds).
pub fn link_all(span: &tracing::Span, traces: &[BatchTrace]) {
    for trace in traces {
        if let Some(context) = span_context(&trace.traceparent) {
            span.add_link(context);
        }
    }
}

/// What the next hop needs to continue `span`'s trace for records
/// `first..=last`; None when `span` is in no sampled trace.
pub fn trace_of(span: &tracing::Span, first: u64, last: u64) -> Option<BatchTrace> {
    crate::trace_context::traceparent_of(span).map(|traceparent| BatchTrace {
        traceparent,
        first_sequence: first,
        last_sequence: last,
    })
}

/// The traced batches a hop has handled and not yet handed on, bounded:
/// past `capacity` the oldest is forgotten (its trace then ends here).
#[derive(Debug)]
pub struct Recent {
    capacity: usize,
    traces: VecDeque<BatchTrace>,
}

impl Recent {
    pub fn new(capacity: usize) -> Recent {
        Recent {
            capacity,
            traces: VecDeque::new(),
        }
    }

    pub fn push(&mut self, trace: BatchTrace) {
        if self.traces.len() == self.capacity {
            self.traces.pop_front();
        }
        self.traces.push_back(trace);
    }

    /// Those that cover any of `first..=last`.
    pub fn overlapping(&self, first: u64, last: u64) -> Vec<BatchTrace> {
        self.traces
            .iter()
            .filter(|t| t.first_sequence <= last && t.last_sequence >= first)
            .cloned()
            .collect()
    }

    /// Those with any record at or below `sequence`, in order; the ones
    /// wholly at or below it are forgotten (a later point holds none of
    /// their records).
    pub fn take_through(&mut self, sequence: u64) -> Vec<BatchTrace> {
        let held: Vec<BatchTrace> = self
            .traces
            .iter()
            .filter(|t| t.first_sequence <= sequence)
            .cloned()
            .collect();
        self.traces.retain(|t| t.last_sequence > sequence);
        held
    }

    /// Forgets everything (the stream was renumbered).
    pub fn clear(&mut self) {
        self.traces.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(first: u64, last: u64) -> BatchTrace {
        BatchTrace {
            traceparent: format!("00-{:032x}-{:016x}-01", first, last),
            first_sequence: first,
            last_sequence: last,
        }
    }

    #[test]
    fn recent_traces_are_bounded_and_handed_on_by_range() {
        let mut recent = Recent::new(3);
        for (first, last) in [(1, 10), (11, 20), (21, 30), (31, 40)] {
            recent.push(trace(first, last));
        }
        // The oldest went at the bound.
        assert!(recent.overlapping(1, 10).is_empty());
        let ranges = |v: Vec<BatchTrace>| -> Vec<(u64, u64)> {
            v.iter()
                .map(|t| (t.first_sequence, t.last_sequence))
                .collect()
        };
        assert_eq!(ranges(recent.overlapping(15, 25)), vec![(11, 20), (21, 30)]);
        // A point through 25 holds part of 21..=30: linked, and kept for the
        // next point, which holds the rest.
        assert_eq!(ranges(recent.take_through(25)), vec![(11, 20), (21, 30)]);
        assert_eq!(ranges(recent.take_through(40)), vec![(21, 30), (31, 40)]);
        assert!(recent.take_through(50).is_empty());
    }

    #[test]
    fn a_traceparent_names_its_span_and_a_malformed_one_none() {
        let named =
            span_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(
            named.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(named.span_id().to_string(), "00f067aa0ba902b7");
        assert!(span_context("00-nonsense").is_none());
        assert!(span_context("").is_none());
    }
}
