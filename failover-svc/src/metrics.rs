//! failover-svc's metrics: jobs by kind and outcome, the jobs under way, and
//! how long ended jobs took, from the job records at each scrape. Records
//! are kept for good, so the ended counts only rise.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use ferry_runtime::metrics::{encode_counters, encode_gauges};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Unit;

use crate::jobs::{JobKind, JobRecord, JobState, Jobs};

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct KindOutcome {
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct Kind {
    kind: String,
}

/// The job collector; holds the records weakly.
pub struct JobMetrics {
    jobs: Weak<Jobs>,
}

impl std::fmt::Debug for JobMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobMetrics")
    }
}

impl JobMetrics {
    pub fn new(jobs: &Arc<Jobs>) -> JobMetrics {
        JobMetrics {
            jobs: Arc::downgrade(jobs),
        }
    }
}

/// A job's kind as a label: `failover-test`, `failover-planned`,
/// `failover-unplanned`, `commit` or `cleanup-test`.
fn kind_of(job: &JobRecord) -> String {
    match (job.kind, job.failover_kind) {
        (JobKind::Failover, Some(how)) => format!("failover-{}", how.tag()),
        (kind, _) => kind.tag().to_string(),
    }
}

impl prometheus_client::collector::Collector for JobMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(jobs) = self.jobs.upgrade() else {
            return Ok(());
        };
        let all = match jobs.list(None, usize::MAX) {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot list jobs");
                return Ok(());
            }
        };
        let mut ended: BTreeMap<KindOutcome, u64> = BTreeMap::new();
        let mut under_way: BTreeMap<Kind, f64> = BTreeMap::new();
        let mut took: BTreeMap<Kind, Histogram> = BTreeMap::new();
        for job in &all {
            let kind = kind_of(job);
            if job.state.ended() {
                let outcome = match job.state {
                    JobState::Failed => "failed",
                    _ => "succeeded",
                };
                *ended
                    .entry(KindOutcome {
                        kind: kind.clone(),
                        outcome: outcome.into(),
                    })
                    .or_default() += 1;
                let secs = job
                    .finished_nanos
                    .get()
                    .saturating_sub(job.created_nanos.get()) as f64
                    / 1e9;
                took.entry(Kind { kind })
                    .or_insert_with(|| Histogram::new(exponential_buckets(0.25, 2.0, 16)))
                    .observe(secs);
            } else {
                *under_way.entry(Kind { kind }).or_default() += 1.0;
            }
        }
        let ended: Vec<_> = ended.into_iter().collect();
        encode_counters(
            &mut encoder,
            "ferry_failover_jobs_ended",
            "Jobs that ended, by kind and outcome",
            None,
            &ended,
        )?;
        let under_way: Vec<_> = under_way.into_iter().collect();
        encode_gauges(
            &mut encoder,
            "ferry_failover_jobs_running",
            "Jobs queued or running, by kind",
            None,
            &under_way,
        )?;
        let kind = Histogram::new(std::iter::empty());
        let mut family = encoder.encode_descriptor(
            "ferry_failover_job_duration",
            "From a job's acceptance to its end, by kind (ended jobs)",
            Some(&Unit::Seconds),
            kind.metric_type(),
        )?;
        for (labels, histogram) in &took {
            histogram.encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}
