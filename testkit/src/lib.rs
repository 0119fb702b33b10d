//! Helpers for Ferry's tests. Services run in-process on `127.0.0.1:0` with a
//! tempdir each, or as real child processes of their binaries; waits are on
//! conditions with deadlines, never bare sleeps.
//!
//! Binaries: a package's own integration tests use `CARGO_BIN_EXE_<name>`;
//! tests of other packages find them beside the test executable
//! (`target/<profile>/`), where `cargo test --workspace` puts them because
//! every service package has integration tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod chaos;
pub mod cluster;
pub mod group;
pub mod insecure;
pub mod libvirt;
pub mod nbd;
pub mod otlp;
pub mod pki;
pub mod points;
pub mod process;
pub mod props;
pub mod proxy;
pub mod replay;
pub mod scrape;
pub mod tools;
pub mod vm;

use std::future::Future;
use std::time::{Duration, Instant};

pub use cluster::{
    start_registry, start_registry_with, Cluster, Options as ClusterOptions, Running,
};
pub use insecure::{agent_command, channel, AgentAuth, At, Insecure};
pub use pki::TestPki;
pub use process::{bin_path, free_addr, ServiceProcess};
pub use proxy::FaultProxy;
pub use tools::{
    assert_reflection_and_health, grpcurl, grpcurl_run, identical_images, python, run_tool, Rng,
    SmallFs,
};
pub use vm::{create_policy, protect_spec, protect_vm, protect_vm_with, protected_item, vm_spec};

/// Polls `check` until it returns `Some`, or panics with `what` after
/// `timeout`. The poll interval starts at 5 ms and grows to 100 ms.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Whether the server at `url` reports `service` ("" for the whole server)
/// SERVING right now.
pub async fn is_serving(url: &str, service: &str) -> bool {
    use tonic_health::pb::health_client::HealthClient;
    let Ok(channel) = tonic::transport::Endpoint::from_shared(url.to_string()) else {
        return false;
    };
    let Ok(channel) = channel.connect().await else {
        return false;
    };
    let request = tonic_health::pb::HealthCheckRequest {
        service: service.to_string(),
    };
    matches!(
        HealthClient::new(channel).check(request).await,
        Ok(r) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    )
}

/// Waits until `url` reports SERVING, up to 30 s.
pub async fn wait_serving(url: &str) {
    wait_for(
        &format!("{url} to be SERVING"),
        Duration::from_secs(30),
        || async { is_serving(url, "").await.then_some(()) },
    )
    .await
}
