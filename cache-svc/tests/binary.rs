//! The real cache-svc binary: NOT_SERVING until its registry serves, then
//! reflection and health through grpcurl, and a graceful SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use ferry_testkit::{
    assert_reflection_and_health, bin_path, free_addr, grpcurl_run, is_serving, wait_for,
    wait_serving, Insecure, ServiceProcess,
};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_once_its_registry_does() {
    let dir = tempfile::tempdir().unwrap();
    let insecure = Insecure::new();
    let registry_addr = free_addr();
    let registry_url = format!("http://{registry_addr}");
    let mut cache = ServiceProcess::start(
        &insecure,
        env!("CARGO_BIN_EXE_cache-svc"),
        dir.path().join("cache"),
        &["--registry", &registry_url],
    );
    // Up, answering health, but NOT_SERVING: its registry is not there.
    let addr = cache.addr.to_string();
    let health = wait_for(
        "cache-svc to answer health",
        Duration::from_secs(30),
        || {
            let addr = addr.clone();
            async move {
                let out = ferry_testkit::grpcurl()
                    .args(["-plaintext", &addr, "grpc.health.v1.Health/Check"])
                    .output()
                    .ok()?;
                out.status
                    .success()
                    .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            }
        },
    )
    .await;
    assert!(health.contains("NOT_SERVING"), "{health}");
    assert!(!is_serving(&cache.url(), "ferry.cache.v1.Cache").await);

    let _registry = ServiceProcess::start_at(
        &insecure,
        registry_addr,
        bin_path("registry-svc"),
        dir.path().join("registry"),
        &[],
    );
    wait_serving(&cache.url()).await;
    assert_reflection_and_health(&addr, "ferry.cache.v1.Cache");
    // The API is described from proto/ through reflection.
    let described = grpcurl_run(&[&addr, "describe", "ferry.cache.v1.Cache.Ingest"]);
    assert!(described.contains("stream"), "{described}");

    let status = cache.signal_and_wait("TERM");
    assert!(status.success(), "SIGTERM exit: {status}");
}
