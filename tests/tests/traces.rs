//! Traces over OTLP, as a collector receives them: a write batch is one
//! trace from the agent's send through cache-svc's ingest to processor-svc's
//! apply, and the point that holds it links to it (many batches fan into one
//! point); a failover job is one trace with a span per step, within the
//! trace of the request that started it.

mod common;

use std::time::Duration;

use ferry_proto::failover::v1 as fo;
use ferry_testkit::otlp::{Collector, ExportedSpan};
use ferry_testkit::{wait_for, Cluster};

/// In `spans`, a batch traced end to end: the agent's send, the cache's
/// ingest and the processor's apply as parent and children in one trace,
/// and a point span linked to the apply.
fn batch_chain(spans: &[ExportedSpan]) -> Option<[ExportedSpan; 4]> {
    let named = |name: &'static str| spans.iter().filter(move |s| s.name() == name);
    for send in named("ferry.agent.send_batch") {
        let child_of = |name: &'static str, parent: &ExportedSpan| {
            named(name)
                .find(|s| {
                    s.trace_id() == parent.trace_id() && s.parent_span_id() == parent.span_id()
                })
                .cloned()
        };
        let Some(ingest) = child_of("ferry.cache.ingest", send) else {
            continue;
        };
        let Some(apply) = child_of("ferry.processor.apply", &ingest) else {
            continue;
        };
        let link = (apply.trace_id(), apply.span_id());
        if let Some(point) = named("ferry.processor.point").find(|p| p.links().contains(&link)) {
            return Some([send.clone(), ingest, apply, point.clone()]);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_traced_to_its_point_and_a_failover_job_is_one_trace() {
    let collector = Collector::start().await;
    // The whole stack runs in this process: its spans go to the collector.
    let _telemetry =
        ferry_runtime::telemetry::init("ferry-tests", "warn", Some(&collector.endpoint)).unwrap();
    let cluster = Cluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let agent =
        common::fast_protected_vm(&cluster.registry.url, dir.path(), Default::default()).await;

    // Writes for three seconds: the agent traces a batch a second.
    let mut every = tokio::time::interval(Duration::from_millis(100));
    for i in 0..30u64 {
        every.tick().await;
        agent
            .capture
            .write("os", i * 65536, vec![i as u8 + 1; 65536])
            .await
            .unwrap();
    }
    let [send, ingest, apply, point] = wait_for(
        "a batch traced from the agent to its point",
        Duration::from_secs(60),
        || {
            let spans = collector.spans();
            async move { batch_chain(&spans) }
        },
    )
    .await;
    let range = |s: &ExportedSpan| {
        (
            s.attribute("first").unwrap().parse::<u64>().unwrap(),
            s.attribute("last").unwrap().parse::<u64>().unwrap(),
        )
    };
    // Each hop speaks of the same records, and the point holds them.
    assert_eq!(range(&ingest), range(&send));
    assert_eq!(range(&apply), range(&send));
    let cut: u64 = point.attribute("sequence_cut").unwrap().parse().unwrap();
    assert!(cut >= range(&send).0, "{point:?} holds none of {send:?}");
    assert_eq!(send.attribute("vm").as_deref(), Some("vm"));
    assert_eq!(point.attribute("vm").as_deref(), Some("vm"));

    // A test failover: one trace, the job's span and a child span per step.
    let url = cluster.failover.url.clone();
    common::isolated_network(&url).await;
    let job =
        common::test_failover(&url, "vm", fo::point_choice::Choice::LatestProcessed(true)).await;
    let steps: Vec<String> = job.steps.iter().map(|s| s.name.clone()).collect();
    let (run, traced) = wait_for(
        "the failover job's trace, a span per step",
        Duration::from_secs(60),
        || {
            let spans = collector.spans();
            let (id, steps) = (job.id.clone(), steps.clone());
            async move {
                let run = spans.iter().find(|s| {
                    s.name() == "ferry.failover.job" && s.attribute("job").as_deref() == Some(&id)
                })?;
                let traced: Vec<String> = spans
                    .iter()
                    .filter(|s| {
                        s.name() == "ferry.failover.step"
                            && s.trace_id() == run.trace_id()
                            && s.parent_span_id() == run.span_id()
                    })
                    .filter_map(|s| s.attribute("step"))
                    .collect();
                (traced.len() == steps.len()).then(|| (run.clone(), traced))
            }
        },
    )
    .await;
    let mut sorted = traced.clone();
    sorted.sort();
    let mut expected = steps.clone();
    expected.sort();
    assert_eq!(sorted, expected, "{traced:?}");
    assert_eq!(run.attribute("outcome").as_deref(), Some("succeeded"));
    assert_eq!(run.attribute("failover").as_deref(), Some("test"));
    assert_eq!(run.attribute("resumed").as_deref(), Some("false"));
    // The job is part of the trace of the request that started it.
    let spans = collector.spans();
    let request = spans
        .iter()
        .find(|s| s.span_id() == run.parent_span_id())
        .expect("the job's parent span was exported");
    assert_eq!(request.trace_id(), run.trace_id());
    assert_eq!(
        request.attribute("rpc").as_deref(),
        Some("/ferry.failover.v1.Failover/StartFailover")
    );
    agent.stop(Duration::from_secs(5)).await.unwrap();
    cluster.stop().await;
}
