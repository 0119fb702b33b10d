//! cache-svc's metrics: per VM log, the bytes it holds (what counts toward
//! the quotas) and the records the processor has not yet applied, beside
//! the quotas themselves, for alerts on a cache filling up. Read at each
//! scrape.

use std::sync::{Arc, Weak};

use ferry_runtime::metrics::{encode_gauge, encode_gauges};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::registry::Unit;

use crate::store::Store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Vm {
    vm: String,
}

/// The per-VM collector; holds the store weakly.
#[derive(Debug)]
pub struct LogMetrics {
    store: Weak<Store>,
}

impl LogMetrics {
    pub fn new(store: &Arc<Store>) -> LogMetrics {
        LogMetrics {
            store: Arc::downgrade(store),
        }
    }
}

impl prometheus_client::collector::Collector for LogMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(store) = self.store.upgrade() else {
            return Ok(());
        };
        let backlogs = store.backlogs();
        let vm = |name: &str| Vm {
            vm: name.to_string(),
        };
        let bytes: Vec<_> = backlogs
            .iter()
            .map(|(name, bytes, _)| (vm(name), *bytes as f64))
            .collect();
        encode_gauges(
            &mut encoder,
            "ferry_cache_log",
            "Bytes of the VM's log retained (acknowledged to the agent, not yet applied and \
             released); counts toward the quotas",
            Some(&Unit::Bytes),
            &bytes,
        )?;
        let records: Vec<_> = backlogs
            .iter()
            .map(|(name, _, records)| (vm(name), *records as f64))
            .collect();
        encode_gauges(
            &mut encoder,
            "ferry_cache_unapplied_records",
            "Records in the VM's log the processor has not yet reported applied",
            None,
            &records,
        )?;
        let quotas = store.quotas();
        encode_gauge(
            &mut encoder,
            "ferry_cache_vm_quota",
            "Most bytes one VM's log may retain; past it the agent's batches are refused \
             (RESOURCE_EXHAUSTED) and it backs off",
            Some(&Unit::Bytes),
            quotas.per_vm_bytes as f64,
        )?;
        encode_gauge(
            &mut encoder,
            "ferry_cache_total_quota",
            "Most bytes all logs together may retain",
            Some(&Unit::Bytes),
            quotas.total_bytes as f64,
        )?;
        Ok(())
    }
}
