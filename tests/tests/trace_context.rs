//! W3C trace context across a gRPC call to the real registry-svc binary: the
//! server's span joins the caller's trace and says so in `traceresponse`.

use ferry_proto::registry::v1 as pb;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_testkit::{bin_path, wait_serving, Insecure, ServiceProcess};

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

/// The trace id and span id of the response's `traceresponse`.
fn traceresponse_of(response: &tonic::Response<pb::ListRegionsResponse>) -> (String, String) {
    let value = response
        .metadata()
        .get("traceresponse")
        .expect("a traceresponse header")
        .to_str()
        .unwrap()
        .to_string();
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00", "{value}");
    assert_eq!(parts[1].len(), 32, "{value}");
    assert_eq!(parts[2].len(), 16, "{value}");
    assert_ne!(parts[2], "0".repeat(16), "{value}");
    (parts[1].to_string(), parts[2].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_joins_the_callers_trace() {
    let dir = tempfile::tempdir().unwrap();
    let insecure = Insecure::new();
    let registry = ServiceProcess::start(
        &insecure,
        bin_path("registry-svc"),
        dir.path().join("r"),
        &[],
    );
    wait_serving(&registry.url()).await;
    // The bearer token only: the trace context is the test's.
    let url = registry.url();
    let mut client = RegistryClient::new(insecure.at(&url).admin());

    let mut request = tonic::Request::new(pb::ListRegionsRequest {});
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    let joined = client.list_regions(request).await.unwrap();
    let (trace, span) = traceresponse_of(&joined);
    // Same trace, and a span of the server's own (a child of the caller's).
    assert_eq!(trace, TRACE_ID);
    assert_ne!(span, CALLER_SPAN);

    // Without a caller's context the server starts a trace of its own.
    let fresh = client
        .list_regions(pb::ListRegionsRequest {})
        .await
        .unwrap();
    let (own, _) = traceresponse_of(&fresh);
    assert_ne!(own, TRACE_ID);
    assert_ne!(own, "0".repeat(32));
}
