//! What the cross-service tests share: a fast policy and a protected VM
//! with its agent running in-process.

// Each test file uses a part of it.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use ferry_agent::run::{Agent, AgentOptions};
use ferry_agent::stream::StreamLimits;
use ferry_proto::registry::v1 as reg;
use ferry_testkit::{create_policy, protected_item, wait_for};

/// A policy `name` with a point every `interval`, everything kept a day.
pub async fn policy(registry: &str, name: &str, interval: Duration) {
    let day = Duration::from_secs(86400);
    create_policy(registry, name, interval, day, day, day).await;
}

/// Starts `vm`'s agent in-process with its NBD export on loopback and waits
/// until the VM is PROTECTED; the agent and `nbd://host:port`.
pub async fn protected_agent(registry: &str, vm: &str, state_dir: &Path) -> (Agent, String) {
    let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = nbd.local_addr().unwrap();
    // Used only if the VM is in a replication group.
    let group = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = Agent::start(AgentOptions {
        registry: registry.to_string(),
        vm: vm.to_string(),
        nbd,
        group: ferry_agent::run::GroupPort::Bound(group),
        group_address: String::new(),
        state_dir: state_dir.to_path_buf(),
        limits: StreamLimits::default(),
        scripts: None,
    })
    .await
    .unwrap();
    wait_for("PROTECTED", Duration::from_secs(60), || async {
        protected_item(registry, vm)
            .await
            .filter(|i| i.state() == reg::ReplicationState::Protected)
    })
    .await;
    (agent, format!("nbd://{addr}"))
}
