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

/// Liveness apart from readiness: with its peers away the processor is not
/// ready ("" NOT_SERVING) yet alive ("liveness" SERVING), so a Kubernetes
/// liveness probe does not restart it for what a restart cannot fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alive_but_not_ready_while_its_peers_are_away() {
    let dir = tempfile::tempdir().unwrap();
    let insecure = Insecure::new();
    let nobody = format!("http://{}", ferry_testkit::free_addr());
    let health = ferry_testkit::free_addr();
    let _me = ServiceProcess::start(
        &insecure,
        env!("CARGO_BIN_EXE_processor-svc"),
        dir.path().join("processor"),
        &[
            "--registry",
            &nobody,
            "--cache",
            &nobody,
            "--health-listen",
            &health.to_string(),
        ],
    );
    let plain = format!("http://{health}");
    ferry_testkit::wait_for(
        "the liveness service to report SERVING",
        std::time::Duration::from_secs(30),
        || {
            let plain = plain.clone();
            async move {
                ferry_testkit::is_serving(&plain, ferry_runtime::LIVENESS_SERVICE)
                    .await
                    .then_some(())
            }
        },
    )
    .await;
    assert!(!ferry_testkit::is_serving(&plain, "").await);
    assert!(!ferry_testkit::is_serving(&plain, "ferry.processor.v1.Processor").await);
}
