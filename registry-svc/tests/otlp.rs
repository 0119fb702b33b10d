//! OpenTelemetry export: the real registry-svc binary, given an OTLP endpoint,
//! exports the span of a request to a collector, parented on the caller's
//! W3C trace context, with its service name, even at log level `warn`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::time::Duration;

use ferry_proto::registry::v1 as pb;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_testkit::otlp::Collector;
use ferry_testkit::{wait_for, wait_serving, Insecure, ServiceProcess};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

// Multi-threaded: the collector must keep serving while the test blocks on
// the child's exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_are_exported_with_the_callers_trace_id() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let insecure = Insecure::new();
    let mut registry = ServiceProcess::start(
        &insecure,
        env!("CARGO_BIN_EXE_registry-svc"),
        dir.path().join("registry"),
        &["--otlp-endpoint", &collector.endpoint],
    );
    wait_serving(&registry.url()).await;

    // Bearer only: the trace context is the one set below.
    let url = registry.url();
    let mut client = RegistryClient::new(insecure.at(&url).admin());
    let mut request = tonic::Request::new(pb::ListRegionsRequest {});
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    client.list_regions(request).await.unwrap();

    // SIGTERM flushes the exporter on the way out.
    let status = registry.signal_and_wait("TERM");
    assert!(status.success(), "{status}");

    let span = wait_for(
        "the collector to receive the request's span",
        Duration::from_secs(20),
        || {
            let spans = collector.spans();
            async move { spans.into_iter().find(|s| s.trace_id() == TRACE_ID) }
        },
    )
    .await;
    assert_eq!(span.service, "registry-svc");
    assert_eq!(span.parent_span_id(), "00f067aa0ba902b7");
}
