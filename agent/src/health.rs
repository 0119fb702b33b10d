//! The agent's view of its VM's health, sent to registry as a heartbeat:
//! registry notices an agent that has gone silent (CRITICAL after a few
//! intervals), and people see why replication is degraded (tracking changed
//! chunks, stopped, a quiesce script failing) while the VM runs on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::ids::Epoch;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::PeerChannel;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::stream::Stream;

/// Default interval between heartbeats.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// Conditions other parts of the agent report (by a name of theirs), merged
/// with the stream's own state into one report.
#[derive(Default)]
pub struct Conditions {
    map: std::sync::Mutex<BTreeMap<&'static str, (reg::ReplicationHealth, String)>>,
    changed: Notify,
}

impl Conditions {
    pub fn new() -> Arc<Conditions> {
        Arc::new(Conditions::default())
    }

    /// Sets (or with None clears) the condition `name`.
    pub fn set(&self, name: &'static str, condition: Option<(reg::ReplicationHealth, String)>) {
        if let Ok(mut map) = self.map.lock() {
            match condition {
                Some(c) => map.insert(name, c),
                None => map.remove(name),
            };
        }
        self.changed.notify_waiters();
    }

    fn all(&self) -> Vec<(reg::ReplicationHealth, String)> {
        self.map
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// The agent's health now: the worst of the stream's state and the
/// conditions, with every reason that is not normal.
pub async fn assess(stream: &Stream, conditions: &Conditions) -> (reg::ReplicationHealth, String) {
    let mut worst = reg::ReplicationHealth::Normal;
    let mut why = Vec::new();
    if let Some(reason) = stream.detached().await {
        worst = reg::ReplicationHealth::Critical;
        let chunks = stream.unsent().await.count();
        why.push(format!(
            "{reason}; the VM's disks stay online and its writes are tracked locally \
             ({chunks} changed chunks)"
        ));
    } else if stream.tracking().await.0 {
        worst = reg::ReplicationHealth::Warning;
        why.push(format!(
            "tracking changed chunks until resync: {}",
            stream.tracking_reason().await
        ));
    }
    for (health, message) in conditions.all() {
        if health as i32 > worst as i32 {
            worst = health;
        }
        if health != reg::ReplicationHealth::Normal {
            why.push(message);
        }
    }
    (worst, why.join("; "))
}

/// Reports the agent's health every `interval` and whenever a condition
/// changes, until `stop`. A report is skipped while another agent holds
/// the VM (a newer epoch on an item that still replicates): that agent
/// speaks for it.
pub async fn run(
    stream: Arc<Stream>,
    conditions: Arc<Conditions>,
    mut registry: RegistryClient<PeerChannel>,
    vm: String,
    epoch: Epoch,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        let changed = conditions.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (health, message) = assess(&stream, &conditions).await;
        if stream.detached().await.is_none() || !superseded(&mut registry, &vm, epoch).await {
            let report = reg::ReportHealthRequest {
                vm_name: vm.clone(),
                component: "agent".into(),
                health: health as i32,
                message,
                ..Default::default()
            };
            if let Err(status) = registry.report_health(report).await {
                tracing::debug!(vm, %status, "health report not taken");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = &mut changed => {}
        }
    }
}

/// Whether a newer agent replicates the VM now.
pub async fn superseded(
    registry: &mut RegistryClient<PeerChannel>,
    vm: &str,
    epoch: Epoch,
) -> bool {
    let item = registry
        .get_protected_item(reg::GetProtectedItemRequest {
            vm_name: vm.to_string(),
        })
        .await;
    match item {
        Ok(item) => {
            let item = item.into_inner();
            Epoch(item.epoch) > epoch && source_active(item.state())
        }
        Err(_) => false,
    }
}

/// Whether the item's source side may replicate (as registry's lifecycle).
pub fn source_active(state: reg::ReplicationState) -> bool {
    use reg::ReplicationState as S;
    matches!(
        state,
        S::Enabling | S::InitialReplication | S::Protected | S::ResyncRequired | S::Resyncing
    )
}
