//! registry-svc's metrics: one series per protected VM of what registry
//! knows about it (its state, health, RPO and the policy's interval, the
//! cache backlog, initial replication progress, the newest point), read
//! from the store at each scrape, so a disabled VM's series go with it.

use std::sync::{Arc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_runtime::metrics::encode_gauges;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::registry::Unit;

use crate::model::Health;
use crate::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Vm {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmState {
    vm: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmHealth {
    vm: String,
    health: String,
}

/// The per-VM collector; holds registry weakly.
#[derive(Debug)]
pub struct ItemMetrics {
    registry: Weak<Registry>,
}

impl ItemMetrics {
    pub fn new(registry: &Arc<Registry>) -> ItemMetrics {
        ItemMetrics {
            registry: Arc::downgrade(registry),
        }
    }
}

fn health_name(health: Health) -> &'static str {
    match health {
        Health::Unknown => "UNKNOWN",
        Health::Normal => "NORMAL",
        Health::Warning => "WARNING",
        Health::Critical => "CRITICAL",
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl prometheus_client::collector::Collector for ItemMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(registry) = self.registry.upgrade() else {
            return Ok(());
        };
        // A store that cannot be read now gives no per-VM series this
        // scrape (Prometheus marks them stale) rather than a failed scrape.
        let items = match registry.list_items() {
            Ok(items) => items,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot list protected items");
                return Ok(());
            }
        };
        let now = SystemTime::now();
        let vm = |i: &crate::model::ProtectedItem| Vm {
            vm: i.vm_name.clone(),
        };
        let state: Vec<_> = items
            .iter()
            .map(|i| {
                let labels = VmState {
                    vm: i.vm_name.clone(),
                    state: i.state.name().to_string(),
                };
                (labels, 1.0)
            })
            .collect();
        encode_gauges(
            &mut encoder,
            "ferry_vm_replication_state",
            "1 for the protected VM's current replication state (REPLICATION_STATE_* without \
             the prefix)",
            None,
            &state,
        )?;
        let health: Vec<_> = items
            .iter()
            .map(|i| {
                let labels = VmHealth {
                    vm: i.vm_name.clone(),
                    health: health_name(i.health()).to_string(),
                };
                (labels, 1.0)
            })
            .collect();
        encode_gauges(
            &mut encoder,
            "ferry_vm_health",
            "1 for the protected VM's health: the worst its components reported",
            None,
            &health,
        )?;
        let rpo: Vec<_> = items
            .iter()
            .filter_map(|i| i.rpo_at(now).map(|r| (vm(i), r.as_secs_f64())))
            .collect();
        encode_gauges(
            &mut encoder,
            "ferry_vm_rpo",
            "Recovery point objective: age of the newest recovery point's time (the source \
             is in it up to then), as the processor last reported it plus the time since that \
             report",
            Some(&Unit::Seconds),
            &rpo,
        )?;
        // The policy's point interval, for RPO alerts relative to it.
        let interval: Vec<_> = items
            .iter()
            .filter_map(|i| {
                let policy = registry.get_policy(&i.policy).ok()?;
                Some((vm(i), policy.crash_consistent_interval.as_secs_f64()))
            })
            .collect();
        encode_gauges(
            &mut encoder,
            "ferry_vm_point_interval",
            "The protected VM's policy: seconds between crash-consistent points",
            Some(&Unit::Seconds),
            &interval,
        )?;
        let newest: Vec<_> = items
            .iter()
            .filter_map(|i| i.last_recovery_point.map(|t| (vm(i), unix_seconds(t))))
            .collect();
        encode_gauges(
            &mut encoder,
            "ferry_vm_last_recovery_point_timestamp",
            "Unix time of the newest recovery point",
            Some(&Unit::Seconds),
            &newest,
        )?;
        let backlog_bytes: Vec<_> = items
            .iter()
            .map(|i| (vm(i), i.backlog_bytes as f64))
            .collect();
        encode_gauges(
            &mut encoder,
            "ferry_vm_cache_backlog",
            "Bytes waiting in the cache to be applied, as last reported",
            Some(&Unit::Bytes),
            &backlog_bytes,
        )?;
        let backlog_records: Vec<_> = items
            .iter()
            .map(|i| (vm(i), i.backlog_records as f64))
            .collect();
        encode_gauges(
            &mut encoder,
            "ferry_vm_cache_backlog_records",
            "Records waiting in the cache to be applied, as last reported",
            None,
            &backlog_records,
        )?;
        let percent: Vec<_> = items
            .iter()
            .map(|i| (vm(i), f64::from(i.percent)))
            .collect();
        encode_gauges(
            &mut encoder,
            "ferry_vm_initial_replication_percent",
            "Initial replication or resync progress, 0 to 100",
            None,
            &percent,
        )?;
        Ok(())
    }
}
