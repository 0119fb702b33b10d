//! The commands that talk to processor-svc and failover-svc: recovery
//! points, failover, commit, test cleanup, jobs, target networks and VMs.

use std::io::Write;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use ferry_proto::failover::v1 as fo;
use ferry_proto::failover::v1::failover_client::FailoverClient;
use ferry_proto::processor::v1 as pb;
use ferry_proto::processor::v1::processor_client::ProcessorClient;
use ferry_runtime::PeerChannel;
use serde_json::{json, Value};

use crate::args::{FailoverAction, FailoverArgs, JobsArgs, NetworkCommand, Output, PointsArgs};
use crate::output::{self, table};

/// A failed call, said so that a person can act on it.
pub(crate) fn status<'a>(
    service: &'static str,
    url: &'a str,
) -> impl Fn(tonic::Status) -> anyhow::Error + 'a {
    move |s| {
        if s.code() == tonic::Code::Unavailable {
            anyhow!(
                "{service} at {url} is unreachable ({}); start Ferry (`ferry serve`) or pass --{} URL",
                s.message(),
                service.trim_end_matches("-svc")
            )
        } else {
            anyhow!("{:?}: {}", s.code(), s.message())
        }
    }
}

pub fn failover_client(url: &str) -> Result<FailoverClient<PeerChannel>> {
    let channel = ferry_runtime::connect(url, &crate::credentials::get())
        .with_context(|| format!("failover URL {url:?}"))?;
    Ok(FailoverClient::new(channel))
}

pub fn processor_client(url: &str) -> Result<ProcessorClient<PeerChannel>> {
    let channel = ferry_runtime::connect(url, &crate::credentials::get())
        .with_context(|| format!("processor URL {url:?}"))?;
    Ok(ProcessorClient::new(channel))
}

fn kind_name(k: i32) -> &'static str {
    match pb::PointKind::try_from(k) {
        Ok(pb::PointKind::CrashConsistent) => "crash",
        Ok(pb::PointKind::AppConsistent) => "app",
        Ok(pb::PointKind::MultiVm) => "multi-vm",
        _ => "-",
    }
}

fn point_json(p: &pb::RecoveryPoint) -> Value {
    json!({
        "id": p.id,
        "vm": p.vm_name,
        "kind": kind_name(p.kind),
        // Up to when it holds the source, beside when it was cut.
        "time": output::time_json(&p.time),
        "created_at": output::time_json(&p.created_at),
        "sequence_cut": p.sequence_cut,
        "disks": p.disks.iter().map(|d| json!({"disk": d.disk_id, "size_bytes": d.size_bytes})).collect::<Vec<_>>(),
        "pinned_by": p.pinned_by,
    })
}

fn job_state(s: i32) -> &'static str {
    match fo::JobState::try_from(s) {
        Ok(fo::JobState::Queued) => "queued",
        Ok(fo::JobState::Running) => "running",
        Ok(fo::JobState::Succeeded) => "succeeded",
        Ok(fo::JobState::Failed) => "failed",
        _ => "-",
    }
}

fn job_kind(j: &fo::Job) -> String {
    match fo::JobKind::try_from(j.kind) {
        Ok(fo::JobKind::Failover) => match fo::FailoverKind::try_from(j.failover_kind) {
            Ok(fo::FailoverKind::Test) => "test failover".into(),
            Ok(fo::FailoverKind::Planned) => "planned failover".into(),
            _ => "unplanned failover".into(),
        },
        Ok(fo::JobKind::Commit) => "commit".into(),
        Ok(fo::JobKind::CleanupTest) => "cleanup test".into(),
        Ok(fo::JobKind::Reprotect) => "re-protect".into(),
        Ok(fo::JobKind::Plan) => {
            let what = match fo::PlanOperation::try_from(j.plan_operation) {
                Ok(fo::PlanOperation::Failover) => {
                    match fo::FailoverKind::try_from(j.failover_kind) {
                        Ok(fo::FailoverKind::Test) => "test failover",
                        Ok(fo::FailoverKind::Planned) => "planned failover",
                        _ => "unplanned failover",
                    }
                }
                Ok(fo::PlanOperation::Commit) => "commit",
                Ok(fo::PlanOperation::CleanupTest) => "cleanup test",
                _ => "re-protect",
            };
            format!("plan {} {what}", j.plan)
        }
        _ => "-".into(),
    }
}

pub fn job_json(j: &fo::Job) -> Value {
    json!({
        "id": j.id,
        "kind": job_kind(j),
        "vms": j.vm_names,
        "state": job_state(j.state),
        "steps": j.steps.iter().map(|s| json!({"name": s.name, "state": job_state(s.state), "message": s.message})).collect::<Vec<_>>(),
        "bytes_done": j.bytes_done,
        "bytes_total": j.bytes_total,
        "bytes_written": j.bytes_written,
        "original_location": j.original_location,
        "points": j.points.iter().map(|p| json!({
            "vm": p.vm_name, "point": p.point_id, "time": output::time_json(&p.time),
            "data_loss_window": output::duration_json(&p.data_loss_window),
        })).collect::<Vec<_>>(),
        "error": j.error,
        "plan": j.plan,
        "child_jobs": j.child_jobs,
        "waiting_for": j.waiting_for,
        "created_at": output::time_json(&j.created_at),
        "finished_at": output::time_json(&j.finished_at),
    })
}

fn job_row(j: &fo::Job) -> Vec<String> {
    vec![
        j.id.clone(),
        job_kind(j),
        j.vm_names.join(","),
        if j.waiting_for.is_empty() {
            job_state(j.state).into()
        } else {
            format!("waiting: {}", j.waiting_for)
        },
        format!(
            "{} / {}",
            output::bytes(j.bytes_done),
            output::bytes(j.bytes_total)
        ),
        j.points
            .first()
            .map(|p| p.point_id.clone())
            .unwrap_or_else(|| "-".into()),
        output::time(&j.created_at),
    ]
}

const JOB_HEADERS: [&str; 7] = ["JOB", "KIND", "VM", "STATE", "PROGRESS", "POINT", "CREATED"];

/// A job's summary for people.
pub fn job_text(j: &fo::Job) -> String {
    let mut out = format!(
        "{} {} of {}: {}\n",
        j.id,
        job_kind(j),
        j.vm_names.join(","),
        job_state(j.state)
    );
    for s in &j.steps {
        out.push_str(&format!(
            "  {:<18} {:<10} {}\n",
            s.name,
            job_state(s.state),
            s.message
        ));
    }
    for p in &j.points {
        out.push_str(&format!(
            "  point {} of {} ({}), data-loss window {}\n",
            p.point_id,
            p.vm_name,
            output::time(&p.time),
            output::duration(&p.data_loss_window)
        ));
    }
    if !j.waiting_for.is_empty() {
        out.push_str(&format!(
            "  waiting for: {} (go on: ferry plan resume {})\n",
            j.waiting_for, j.plan
        ));
    }
    if !j.error.is_empty() {
        out.push_str(&format!("  error: {}\n", j.error));
    }
    out
}

/// Follows a job to its end, drawing a progress bar on stderr when `bar`.
pub async fn follow_job(
    client: &mut FailoverClient<PeerChannel>,
    id: &str,
    bar: bool,
) -> Result<fo::Job> {
    let mut stream = client
        .watch_job(fo::WatchJobRequest { id: id.to_string() })
        .await
        .map_err(|s| anyhow!("watch job {id}: {}", s.message()))?
        .into_inner();
    let mut last = None;
    let mut shown = false;
    while let Some(job) = stream
        .message()
        .await
        .map_err(|s| anyhow!("watch job {id}: {}", s.message()))?
    {
        if bar && job.bytes_total > 0 && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let done = job.bytes_done.min(job.bytes_total);
            let width = 30;
            let filled = (done * width / job.bytes_total) as usize;
            let step = job
                .steps
                .iter()
                .find(|s| s.state == fo::JobState::Running as i32)
                .map(|s| s.name.as_str())
                .unwrap_or("");
            eprint!(
                "\r  [{}{}] {:>3}% {} of {} {:<20}",
                "#".repeat(filled),
                ".".repeat(width as usize - filled),
                done * 100 / job.bytes_total,
                output::bytes(done),
                output::bytes(job.bytes_total),
                step
            );
            let _ = std::io::stderr().flush();
            shown = true;
        }
        last = Some(job);
    }
    if shown {
        eprintln!();
    }
    last.ok_or_else(|| anyhow!("job {id} sent nothing"))
}

pub(crate) fn choice(point: &str) -> fo::point_choice::Choice {
    use fo::point_choice::Choice;
    match point {
        "latest" => Choice::Latest(true),
        "latest-processed" => Choice::LatestProcessed(true),
        "latest-app" => Choice::LatestAppConsistent(true),
        "latest-multi-vm" => Choice::LatestMultiVm(true),
        id => Choice::PointId(id.to_string()),
    }
}

/// A replication group's multi-VM points.
async fn group_points(url: &str, out: Output, group: String, limit: u32) -> Result<()> {
    let points = processor_client(url)?
        .list_group_points(pb::ListGroupPointsRequest {
            replication_group: group,
            limit,
        })
        .await
        .map_err(status("processor-svc", url))?
        .into_inner()
        .points;
    match out {
        Output::Json => println!(
            "{:#}",
            Value::Array(
                points
                    .iter()
                    .map(|g| serde_json::json!({
                        "bookmark_id": g.bookmark_id,
                        "time": output::time_json(&g.time),
                        "points": g.points.iter().map(point_json).collect::<Vec<_>>(),
                    }))
                    .collect()
            )
        ),
        Output::Table => {
            let rows: Vec<Vec<String>> = points
                .iter()
                .map(|g| {
                    vec![
                        g.bookmark_id.clone(),
                        output::time(&g.time),
                        g.points.len().to_string(),
                    ]
                })
                .collect();
            println!("{}", table(&["GROUP POINT", "TIME", "VMS"], &rows))
        }
    }
    Ok(())
}

pub async fn points(url: &str, out: Output, a: PointsArgs) -> Result<()> {
    let vm = match (a.vm, a.group) {
        (_, Some(group)) => return group_points(url, out, group, a.limit).await,
        (Some(vm), None) => vm,
        (None, None) => bail!("name a VM or --group GROUP"),
    };
    let kind = match a.kind.as_deref() {
        None => pb::PointKind::Unspecified,
        Some("crash") => pb::PointKind::CrashConsistent,
        Some("app") => pb::PointKind::AppConsistent,
        Some("multi-vm") => pb::PointKind::MultiVm,
        Some(other) => bail!("--kind {other:?}: use crash, app or multi-vm"),
    };
    let points = processor_client(url)?
        .list_recovery_points(pb::ListRecoveryPointsRequest {
            vm_name: vm,
            kind: kind as i32,
            limit: a.limit,
            ..Default::default()
        })
        .await
        .map_err(status("processor-svc", url))?
        .into_inner()
        .points;
    let rows: Vec<Vec<String>> = points
        .iter()
        .map(|p| {
            vec![
                p.id.clone(),
                kind_name(p.kind).into(),
                output::time(&p.time),
                p.sequence_cut.to_string(),
                if p.pinned_by.is_empty() {
                    "-".into()
                } else {
                    p.pinned_by.join(",")
                },
            ]
        })
        .collect();
    match out {
        Output::Json => println!(
            "{:#}",
            Value::Array(points.iter().map(point_json).collect())
        ),
        Output::Table => println!(
            "{}",
            table(&["POINT", "KIND", "TIME", "SEQUENCE", "PINNED BY"], &rows)
        ),
    }
    Ok(())
}

pub async fn failover(url: &str, out: Output, a: FailoverArgs) -> Result<()> {
    let mut client = failover_client(url)?;
    let err = status("failover-svc", url);
    let started = Instant::now();
    let job = match a.action {
        Some(FailoverAction::Commit { vm, group }) => client
            .commit_failover(fo::CommitFailoverRequest {
                target: Some(match group {
                    Some(g) => fo::commit_failover_request::Target::ReplicationGroup(g),
                    None => fo::commit_failover_request::Target::VmName(vm.unwrap_or_default()),
                }),
                request_id: String::new(),
            })
            .await
            .map_err(&err)?
            .into_inner(),
        Some(FailoverAction::CleanupTest { vm, group }) => client
            .cleanup_test_failover(fo::CleanupTestFailoverRequest {
                target: Some(match group {
                    Some(g) => fo::cleanup_test_failover_request::Target::ReplicationGroup(g),
                    None => {
                        fo::cleanup_test_failover_request::Target::VmName(vm.unwrap_or_default())
                    }
                }),
                request_id: String::new(),
            })
            .await
            .map_err(&err)?
            .into_inner(),
        None => {
            let (target, default_point) = match (a.vm, a.group) {
                (_, Some(g)) => (
                    fo::start_failover_request::Target::ReplicationGroup(g),
                    "latest-multi-vm",
                ),
                (Some(vm), None) => (
                    fo::start_failover_request::Target::VmName(vm),
                    "latest-processed",
                ),
                (None, None) => bail!(
                    "name the VM (ferry failover VM --point latest) or the group (--group GROUP)"
                ),
            };
            if a.test && a.network.is_none() {
                bail!("a test failover needs --network NAME (an isolated network: ferry network create)");
            }
            let kind = if a.test {
                fo::FailoverKind::Test
            } else if a.planned {
                fo::FailoverKind::Planned
            } else {
                fo::FailoverKind::Unplanned
            };
            client
                .start_failover(fo::StartFailoverRequest {
                    target: Some(target),
                    kind: kind as i32,
                    point: Some(fo::PointChoice {
                        choice: Some(choice(a.point.as_deref().unwrap_or(default_point))),
                    }),
                    test_network: a.network.unwrap_or_default(),
                    request_id: String::new(),
                    instant: a.instant,
                    alternate_location: a.alternate_location,
                })
                .await
                .map_err(&err)?
                .into_inner()
        }
    };
    finish_job(&mut client, out, job, a.no_wait, started).await
}

/// Re-protects a committed VM and follows the job.
pub async fn reprotect(url: &str, out: Output, vm: String, no_wait: bool) -> Result<()> {
    let mut client = failover_client(url)?;
    let started = Instant::now();
    let job = client
        .reprotect(fo::ReprotectRequest {
            vm_name: vm,
            request_id: String::new(),
        })
        .await
        .map_err(status("failover-svc", url))?
        .into_inner();
    finish_job(&mut client, out, job, no_wait, started).await
}

/// Shows an accepted job, or follows it to its end; an error if it failed.
async fn finish_job(
    client: &mut FailoverClient<PeerChannel>,
    out: Output,
    job: fo::Job,
    no_wait: bool,
    started: Instant,
) -> Result<()> {
    if no_wait {
        match out {
            Output::Json => println!("{:#}", job_json(&job)),
            Output::Table => println!(
                "job {} accepted; follow it with: ferry jobs --watch",
                job.id
            ),
        }
        return Ok(());
    }
    let job = follow_job(client, &job.id, out == Output::Table).await?;
    match out {
        Output::Json => println!("{:#}", job_json(&job)),
        Output::Table => {
            print!("{}", job_text(&job));
            println!("  took {:.1} s", started.elapsed().as_secs_f64());
        }
    }
    if job.state != fo::JobState::Succeeded as i32 {
        bail!("job {} failed: {}", job.id, job.error);
    }
    Ok(())
}

pub async fn jobs(url: &str, out: Output, a: JobsArgs) -> Result<()> {
    let mut client = failover_client(url)?;
    let jobs = client
        .list_jobs(fo::ListJobsRequest {
            vm_name: a.vm.unwrap_or_default(),
            limit: a.limit,
        })
        .await
        .map_err(status("failover-svc", url))?
        .into_inner()
        .jobs;
    match out {
        Output::Json => println!("{:#}", Value::Array(jobs.iter().map(job_json).collect())),
        Output::Table => println!(
            "{}",
            table(&JOB_HEADERS, &jobs.iter().map(job_row).collect::<Vec<_>>())
        ),
    }
    if a.watch {
        for job in jobs.iter().filter(|j| {
            j.state == fo::JobState::Queued as i32 || j.state == fo::JobState::Running as i32
        }) {
            eprintln!("following {} ({})", job.id, job_kind(job));
            let done = follow_job(&mut client, &job.id, out == Output::Table).await?;
            match out {
                Output::Json => println!("{:#}", job_json(&done)),
                Output::Table => print!("{}", job_text(&done)),
            }
        }
    }
    Ok(())
}

pub async fn network(url: &str, out: Output, cmd: NetworkCommand) -> Result<()> {
    let mut client = failover_client(url)?;
    let err = status("failover-svc", url);
    let networks = match cmd {
        NetworkCommand::Create {
            name,
            region,
            resource_group,
            subnets,
        } => {
            let mut parsed = Vec::new();
            for s in subnets {
                let (n, prefix) = s.split_once('=').ok_or_else(|| {
                    anyhow!("--subnet {s:?}: use NAME=CIDR, e.g. default=10.9.0.0/24")
                })?;
                parsed.push(fo::Subnet {
                    name: n.to_string(),
                    address_prefix: prefix.to_string(),
                });
            }
            vec![client
                .create_network(fo::CreateNetworkRequest {
                    network: Some(fo::Network {
                        region,
                        resource_group,
                        name,
                        subnets: parsed,
                    }),
                })
                .await
                .map_err(&err)?
                .into_inner()]
        }
        NetworkCommand::List { region } => {
            client
                .list_networks(fo::ListNetworksRequest {
                    region: region.unwrap_or_default(),
                })
                .await
                .map_err(&err)?
                .into_inner()
                .networks
        }
        NetworkCommand::Delete { name, region } => {
            let deleted = client
                .delete_network(fo::DeleteNetworkRequest { region, name })
                .await
                .map_err(&err)?
                .into_inner();
            if out == Output::Table {
                println!("network {} deleted from {}", deleted.name, deleted.region);
                return Ok(());
            }
            vec![deleted]
        }
    };
    let rows: Vec<Vec<String>> = networks
        .iter()
        .map(|n| {
            vec![
                n.region.clone(),
                n.resource_group.clone(),
                n.name.clone(),
                n.subnets
                    .iter()
                    .map(|s| format!("{}={}", s.name, s.address_prefix))
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        })
        .collect();
    match out {
        Output::Json => println!(
            "{:#}",
            Value::Array(
                networks
                    .iter()
                    .map(|n| json!({"region": n.region, "resource_group": n.resource_group, "name": n.name,
                        "subnets": n.subnets.iter().map(|s| json!({"name": s.name, "address_prefix": s.address_prefix})).collect::<Vec<_>>()}))
                    .collect()
            )
        ),
        Output::Table => println!("{}", table(&["REGION", "RESOURCE GROUP", "NETWORK", "SUBNETS"], &rows)),
    }
    Ok(())
}

pub async fn target_vms(url: &str, out: Output, vm: Option<String>) -> Result<()> {
    let vms = failover_client(url)?
        .list_target_vms(fo::ListTargetVmsRequest {
            source_vm: vm.unwrap_or_default(),
        })
        .await
        .map_err(status("failover-svc", url))?
        .into_inner()
        .vms;
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                format!("{}/{}", v.region, v.resource_group),
                v.source_vm.clone(),
                if v.test {
                    "test".into()
                } else {
                    "failover".into()
                },
                v.nics
                    .iter()
                    .map(|n| format!("{} {}", n.subnet, n.private_ip))
                    .collect::<Vec<_>>()
                    .join(", "),
                v.point_id.clone(),
                v.disks.len().to_string(),
                if v.domain.is_empty() {
                    "-".into()
                } else {
                    format!("{} on {}", v.domain, v.host)
                },
            ]
        })
        .collect();
    match out {
        Output::Json => println!(
            "{:#}",
            Value::Array(
                vms.iter()
                    .map(|v| json!({"name": v.name, "region": v.region, "resource_group": v.resource_group,
                        "source_vm": v.source_vm, "test": v.test, "network": v.virtual_network, "point": v.point_id,
                        "host": v.host, "domain": v.domain, "console": v.console_path,
                        "nics": v.nics.iter().map(|n| json!({"name": n.name, "subnet": n.subnet, "private_ip": n.private_ip, "mac_address": n.mac_address})).collect::<Vec<_>>(),
                        "disks": v.disks.iter().map(|d| json!({"disk": d.disk_id, "name": d.name, "size_bytes": d.size_bytes, "path": d.path})).collect::<Vec<_>>()}))
                    .collect()
            )
        ),
        Output::Table => println!(
            "{}",
            table(
                &["VM", "WHERE", "SOURCE", "KIND", "NICS", "POINT", "DISKS", "DOMAIN"],
                &rows
            )
        ),
    }
    Ok(())
}
