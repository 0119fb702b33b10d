//! processor-svc's metrics: per VM whose pipeline runs, how far applying
//! is behind the cache, its points by kind and the age of the newest write
//! they hold, and the replica's bytes on disk. Read at each scrape.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use ferry_proto::processor::v1 as pb;
use ferry_runtime::metrics::encode_gauges;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::registry::Unit;

use crate::pipeline::Pipelines;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Vm {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmKind {
    vm: String,
    kind: String,
}

/// The per-VM collector; holds the pipelines weakly.
#[derive(Debug)]
pub struct PipelineMetrics {
    pipelines: Weak<Pipelines>,
}

impl PipelineMetrics {
    pub fn new(pipelines: &Arc<Pipelines>) -> PipelineMetrics {
        PipelineMetrics {
            pipelines: Arc::downgrade(pipelines),
        }
    }
}

impl std::fmt::Debug for Pipelines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pipelines")
    }
}

impl prometheus_client::collector::Collector for PipelineMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(pipelines) = self.pipelines.upgrade() else {
            return Ok(());
        };
        let statuses = pipelines.statuses();
        let vm = |name: &str| Vm {
            vm: name.to_string(),
        };
        let lag: Vec<_> = statuses
            .iter()
            .map(|(name, s)| (vm(name), s.cache_durable.saturating_sub(s.applied) as f64))
            .collect();
        encode_gauges(
            &mut encoder,
            "ferry_processor_apply_lag_records",
            "Records durable in the cache and not yet applied to the replica",
            None,
            &lag,
        )?;
        let backlog: Vec<_> = statuses
            .iter()
            .map(|(name, s)| (vm(name), s.backlog_bytes as f64))
            .collect();
        encode_gauges(
            &mut encoder,
            "ferry_processor_cache_backlog",
            "Bytes the cache retains for the VM, as the processor last heard",
            Some(&Unit::Bytes),
            &backlog,
        )?;
        let failing: Vec<_> = statuses
            .iter()
            .map(|(name, s)| (vm(name), if s.error.is_some() { 1.0 } else { 0.0 }))
            .collect();
        encode_gauges(
            &mut encoder,
            "ferry_processor_pipeline_failing",
            "1 while the VM's pipeline cannot apply (its health report says why)",
            None,
            &failing,
        )?;
        let now = ferry_runtime::time::unix_nanos_now();
        let (mut points, mut newest_age, mut retained) = (Vec::new(), Vec::new(), Vec::new());
        for (name, _) in &statuses {
            let Ok(Some(replica)) = pipelines.replicas().get(name) else {
                continue;
            };
            if let Ok(all) = replica.points() {
                let mut by_kind: BTreeMap<String, f64> = BTreeMap::new();
                for p in &all {
                    let kind = pb::PointKind::from(p.kind)
                        .as_str_name()
                        .trim_start_matches("POINT_KIND_")
                        .to_string();
                    *by_kind.entry(kind).or_default() += 1.0;
                }
                points.extend(by_kind.into_iter().map(|(kind, n)| {
                    let labels = VmKind {
                        vm: name.clone(),
                        kind,
                    };
                    (labels, n)
                }));
                if let Some(newest) = all.iter().map(|p| p.time_nanos.get()).max() {
                    newest_age.push((vm(name), now.saturating_sub(newest) as f64 / 1e9));
                }
            }
            if let Ok(bytes) = replica.disk_bytes() {
                retained.push((vm(name), bytes as f64));
            }
        }
        encode_gauges(
            &mut encoder,
            "ferry_processor_points",
            "Recovery points kept, by kind",
            None,
            &points,
        )?;
        encode_gauges(
            &mut encoder,
            "ferry_processor_newest_point_age",
            "Now minus the time of the newest write held by the newest point (the RPO as \
             the processor sees it)",
            Some(&Unit::Seconds),
            &newest_age,
        )?;
        encode_gauges(
            &mut encoder,
            "ferry_processor_retained",
            "Replica data on disk: every kept point's chunk versions",
            Some(&Unit::Bytes),
            &retained,
        )?;
        Ok(())
    }
}
