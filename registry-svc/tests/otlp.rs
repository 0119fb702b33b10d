//! OpenTelemetry export: the real registry-svc binary, given an OTLP endpoint,
//! exports the span of a request to a collector, parented on the caller's
//! W3C trace context, with its service name, even at log level `warn`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::registry::v1 as pb;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_testkit::{wait_for, wait_serving, Insecure, ServiceProcess};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// A collector that keeps what it receives.
#[derive(Clone, Default)]
struct Collector {
    received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.received.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

// Multi-threaded: the collector must keep serving while the test blocks on
// the child's exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_are_exported_with_the_callers_trace_id() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().unwrap();
    let insecure = Insecure::new();
    let mut registry = ServiceProcess::start(
        &insecure,
        env!("CARGO_BIN_EXE_registry-svc"),
        dir.path().join("registry"),
        &["--otlp-endpoint", &endpoint],
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

    let spans = wait_for(
        "the collector to receive spans",
        Duration::from_secs(20),
        || {
            let received = collector.received.lock().unwrap().clone();
            async move { (!received.is_empty()).then_some(received) }
        },
    )
    .await;
    let mut found = false;
    for export in &spans {
        for resource_spans in &export.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| v.value.clone());
            for scope in &resource_spans.scope_spans {
                for span in &scope.spans {
                    if hex(&span.trace_id) == TRACE_ID {
                        assert_eq!(service, Some(Value::StringValue("registry-svc".into())));
                        assert_eq!(hex(&span.parent_span_id), "00f067aa0ba902b7");
                        found = true;
                    }
                }
            }
        }
    }
    assert!(
        found,
        "no exported span carries the caller's trace id: {spans:?}"
    );
    server.abort();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
