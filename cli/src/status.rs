//! `ferry status`: the services (reachable, health, version), then one line
//! per protected item: state, health, RPO against its policy's interval,
//! cache backlog, the newest point and its age, initial replication or
//! resync progress, and the jobs under way. `--watch` redraws it in place
//! every interval; `--output json` prints one object (per refresh).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use ferry_proto::failover::v1 as fo;
use ferry_proto::registry::v1 as pb;
use ferry_runtime::trace_context::VERSION_HEADER;
use serde_json::{json, Value};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::args::{Output, StatusArgs};
use crate::output::{self, table};

/// How long a service may take to answer before it counts as unreachable.
const PROBE: Duration = Duration::from_secs(3);

/// One service as probed.
struct Service {
    name: &'static str,
    url: String,
    /// SERVING, NOT_SERVING, ... or why it could not be asked.
    health: std::result::Result<String, String>,
    version: Option<String>,
}

async fn probe(name: &'static str, url: &str) -> Service {
    let asked = async {
        let channel =
            ferry_runtime::connect(url, &crate::credentials::get()).map_err(|e| e.to_string())?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        let version = response
            .metadata()
            .get(VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let status = response.into_inner().status();
        let health = status
            .as_str_name()
            .trim_start_matches("SERVING_STATUS_")
            .to_string();
        Ok::<_, String>((health, version))
    };
    let (health, version) = match tokio::time::timeout(PROBE, asked).await {
        Ok(Ok((health, version))) => (Ok(health), version),
        Ok(Err(why)) => (Err(why), None),
        Err(_) => (Err(format!("no answer in {}s", PROBE.as_secs())), None),
    };
    Service {
        name,
        url: url.to_string(),
        health,
        version,
    }
}

/// Everything one refresh shows.
struct Status {
    services: Vec<Service>,
    items: Vec<pb::ProtectedItem>,
    /// Policy name → crash-consistent point interval.
    intervals: HashMap<String, Duration>,
    /// VM → its jobs under way; None when failover-svc could not be asked.
    jobs: Option<HashMap<String, Vec<fo::Job>>>,
    /// Why the items could not be read, if they could not.
    items_error: Option<String>,
}

async fn gather(registry: &str, processor: &str, failover: &str, cache: Option<&str>) -> Status {
    let mut probes = vec![
        probe("registry", registry).await,
        probe("processor", processor).await,
        probe("failover", failover).await,
    ];
    if let Some(cache) = cache {
        probes.insert(1, probe("cache", cache).await);
    }
    let mut status = Status {
        services: probes,
        items: Vec::new(),
        intervals: HashMap::new(),
        jobs: None,
        items_error: None,
    };
    match crate::commands::client(registry) {
        Ok(mut client) => {
            match client
                .list_protected_items(pb::ListProtectedItemsRequest {})
                .await
            {
                Ok(r) => status.items = r.into_inner().items,
                Err(s) => status.items_error = Some(format!("{:?}: {}", s.code(), s.message())),
            }
            if let Ok(r) = client.list_policies(pb::ListPoliciesRequest {}).await {
                for p in r.into_inner().policies {
                    if let Some(d) = p
                        .crash_consistent_interval
                        .as_ref()
                        .and_then(ferry_runtime::time::from_duration)
                    {
                        status.intervals.insert(p.name, d);
                    }
                }
            }
        }
        Err(e) => status.items_error = Some(e.to_string()),
    }
    if let Ok(mut client) = crate::recovery::failover_client(failover) {
        let listed = tokio::time::timeout(
            PROBE,
            client.list_jobs(fo::ListJobsRequest {
                vm_name: String::new(),
                limit: 200,
            }),
        )
        .await;
        if let Ok(Ok(r)) = listed {
            let mut by_vm: HashMap<String, Vec<fo::Job>> = HashMap::new();
            for job in r.into_inner().jobs {
                let under_way = job.state == fo::JobState::Queued as i32
                    || job.state == fo::JobState::Running as i32;
                if under_way {
                    for vm in &job.vm_names {
                        by_vm.entry(vm.clone()).or_default().push(job.clone());
                    }
                }
            }
            status.jobs = Some(by_vm);
        }
    }
    status
}

fn seconds(d: &Option<prost_types::Duration>) -> Option<f64> {
    d.as_ref()
        .and_then(ferry_runtime::time::from_duration)
        .map(|d| d.as_secs_f64())
}

/// Age of a point time, now.
fn age(t: &Option<prost_types::Timestamp>) -> Option<f64> {
    let t = t.as_ref().and_then(ferry_runtime::time::from_timestamp)?;
    Some(
        SystemTime::now()
            .duration_since(t)
            .unwrap_or_default()
            .as_secs_f64(),
    )
}

fn short_secs(s: f64) -> String {
    if s < 100.0 {
        format!("{s:.1}s")
    } else {
        output::duration(&Some(prost_types::Duration {
            seconds: s as i64,
            nanos: 0,
        }))
    }
}

fn job_word(j: &fo::Job) -> String {
    let kind = match fo::JobKind::try_from(j.kind) {
        Ok(fo::JobKind::Failover) => match fo::FailoverKind::try_from(j.failover_kind) {
            Ok(fo::FailoverKind::Test) => "test-failover",
            Ok(fo::FailoverKind::Planned) => "planned-failover",
            _ => "failover",
        },
        Ok(fo::JobKind::Commit) => "commit",
        Ok(fo::JobKind::CleanupTest) => "cleanup-test",
        _ => "job",
    };
    let total = j.bytes_total.max(1);
    format!("{kind} {}%", j.bytes_done * 100 / total)
}

fn text(s: &Status) -> String {
    let services: Vec<Vec<String>> = s
        .services
        .iter()
        .map(|svc| {
            let (reachable, health) = match &svc.health {
                Ok(h) => ("yes".to_string(), h.clone()),
                Err(why) => ("no".to_string(), why.clone()),
            };
            vec![
                svc.name.to_string(),
                svc.url.clone(),
                reachable,
                health,
                svc.version.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut out = table(
        &["SERVICE", "URL", "REACHABLE", "HEALTH", "VERSION"],
        &services,
    );
    out.push('\n');
    if let Some(why) = &s.items_error {
        out.push_str(&format!("protected items: cannot be read: {why}\n"));
        return out;
    }
    let rows: Vec<Vec<String>> = s
        .items
        .iter()
        .map(|i| {
            let rpo = seconds(&i.rpo).map_or("-".to_string(), short_secs);
            let target = s
                .intervals
                .get(&i.policy_name)
                .map_or("-".to_string(), |d| short_secs(d.as_secs_f64()));
            let last = match (
                &i.last_recovery_point_time,
                age(&i.last_recovery_point_time),
            ) {
                (Some(_), Some(a)) => format!(
                    "{} ({} ago)",
                    output::time(&i.last_recovery_point_time),
                    short_secs(a)
                ),
                _ => "-".into(),
            };
            let syncing = matches!(
                pb::ReplicationState::try_from(i.state),
                Ok(pb::ReplicationState::InitialReplication | pb::ReplicationState::Resyncing)
            );
            let jobs = match &s.jobs {
                None => "?".to_string(),
                Some(by_vm) => by_vm.get(&i.vm_name).map_or("-".into(), |jobs| {
                    jobs.iter().map(job_word).collect::<Vec<_>>().join(", ")
                }),
            };
            vec![
                i.vm_name.clone(),
                output::state(i.state),
                output::health(i.health),
                format!("{rpo} / {target}"),
                format!(
                    "{} ({} rec)",
                    output::bytes(i.backlog_bytes),
                    i.backlog_records
                ),
                last,
                if syncing {
                    format!("{}%", i.initial_replication_percent)
                } else {
                    "-".into()
                },
                jobs,
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "VM",
            "STATE",
            "HEALTH",
            "RPO / INTERVAL",
            "BACKLOG",
            "LAST POINT",
            "SYNC",
            "JOBS",
        ],
        &rows,
    ));
    if s.items.is_empty() {
        out.push_str("(no protected items)\n");
    }
    out
}

fn to_json(s: &Status) -> Value {
    json!({
        "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "services": s.services.iter().map(|svc| json!({
            "name": svc.name,
            "url": svc.url,
            "reachable": svc.health.is_ok(),
            "health": svc.health.as_ref().ok(),
            "error": svc.health.as_ref().err(),
            "version": svc.version,
        })).collect::<Vec<_>>(),
        "items_error": s.items_error,
        "items": s.items.iter().map(|i| json!({
            "vm": i.vm_name,
            "state": output::state(i.state),
            "health": output::health(i.health),
            "rpo_seconds": seconds(&i.rpo),
            "point_interval_seconds": s.intervals.get(&i.policy_name).map(Duration::as_secs_f64),
            "backlog_bytes": i.backlog_bytes,
            "backlog_records": i.backlog_records,
            "last_point_time": output::time_json(&i.last_recovery_point_time),
            "last_point_age_seconds": age(&i.last_recovery_point_time),
            "sync_percent": i.initial_replication_percent,
            "jobs": s.jobs.as_ref().map(|by_vm| by_vm.get(&i.vm_name).map_or(Vec::new(), |jobs| {
                jobs.iter().map(|j| json!({"id": j.id, "job": job_word(j)})).collect::<Vec<_>>()
            })),
        })).collect::<Vec<_>>(),
    })
}

/// Prints the status once, or redraws it every interval with `--watch`
/// until interrupted.
pub async fn run(
    registry: &str,
    processor: &str,
    failover: &str,
    out: Output,
    a: StatusArgs,
) -> Result<()> {
    let shutdown = ferry_runtime::shutdown_token();
    loop {
        let s = gather(registry, processor, failover, a.cache.as_deref()).await;
        match out {
            Output::Json if a.watch => println!("{}", to_json(&s)),
            Output::Json => println!("{:#}", to_json(&s)),
            // Home, clear the screen, draw: the table stays in place.
            Output::Table if a.watch => print!(
                "\x1b[H\x1b[2J{}\nevery {} (Ctrl-C to stop)\n",
                text(&s),
                humantime::format_duration(a.interval)
            ),
            Output::Table => print!("{}", text(&s)),
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        if !a.watch {
            return Ok(());
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(a.interval.max(Duration::from_millis(200))) => {}
        }
    }
}
