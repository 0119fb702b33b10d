//! The real processor-svc binary, with its peers as real processes: reflection and
//! health through grpcurl, and a graceful SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use ferry_testkit::{
    assert_reflection_and_health, bin_path, wait_serving, Insecure, ServiceProcess,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_with_its_peers_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let insecure = Insecure::new();
    let registry = ServiceProcess::start(
        &insecure,
        bin_path("registry-svc"),
        dir.path().join("registry"),
        &[],
    );
    let cache = ServiceProcess::start(
        &insecure,
        bin_path("cache-svc"),
        dir.path().join("cache"),
        &["--registry", &registry.url()],
    );
    let mut me = ServiceProcess::start(
        &insecure,
        env!("CARGO_BIN_EXE_processor-svc"),
        dir.path().join("processor"),
        &["--registry", &registry.url(), "--cache", &cache.url()],
    );
    wait_serving(&me.url()).await;
    assert_reflection_and_health(&me.addr.to_string(), "ferry.processor.v1.Processor");
    let status = me.signal_and_wait("TERM");
    assert!(status.success(), "SIGTERM exit: {status}");
}
