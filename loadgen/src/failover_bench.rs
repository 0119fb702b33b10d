//! `ferry-loadgen failover-bench`: an unplanned failover of a VM with a
//! 1 GiB disk half written (every other MiB): seconds until the job is done,
//! and materialization MB/s beside `cp --sparse=always` of the same source
//! image in the same run.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_agent::run::{Agent, AgentOptions};
use ferry_proto::failover::v1 as fo;
use ferry_proto::failover::v1::failover_client::FailoverClient;
use ferry_proto::registry::v1 as reg;

const DISK: u64 = 1 << 30;

/// A sparse image of `size` bytes at `path` with every other MiB written.
pub(crate) fn half_written(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut block = vec![0u8; 1 << 20];
    for mib in (0..size >> 20).step_by(2) {
        // Each MiB its own bytes: nothing dedups or compresses it away.
        for (i, b) in block.iter_mut().enumerate() {
            *b = (mib as usize).wrapping_mul(31).wrapping_add(i / 4096) as u8 | 1;
        }
        f.write_all_at(&block, mib << 20)?;
    }
    f.sync_all()?;
    Ok(())
}

/// The agent of "vm", its disks under `dir`, exporting them on loopback.
pub(crate) async fn agent(registry: &str, dir: &Path) -> Result<Agent> {
    let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(Agent::start(AgentOptions::new(
        registry,
        "vm",
        nbd.into(),
        dir.join("agent"),
        vec![dir.to_path_buf()],
    ))
    .await?)
}

pub async fn run(dir: &Path) -> Result<()> {
    let source = dir.join("source.raw");
    half_written(&source, DISK)?;
    // The baseline: copying the same sparse image.
    let copy = dir.join("copy.raw");
    let t = Instant::now();
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(&source)
        .arg(&copy)
        .status()
        .context("run cp")?;
    if !status.success() {
        bail!("cp failed");
    }
    std::fs::File::open(&copy)?.sync_all()?;
    let cp_secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(&copy)?;

    let cluster = ferry_testkit::Cluster::start().await;
    let registry = cluster.registry.url.clone();
    let day = Duration::from_secs(86400);
    ferry_testkit::create_policy(&registry, "bench", Duration::from_secs(1), day, day, day).await;
    ferry_testkit::protect_vm_with(&registry, "vm", &[("os", DISK, &source)], "bench").await;
    let agent = agent(&registry, dir).await?;
    let t = Instant::now();
    ferry_testkit::wait_for("PROTECTED", Duration::from_secs(600), || async {
        ferry_testkit::protected_item(&registry, "vm")
            .await
            .filter(|i| i.state() == reg::ReplicationState::Protected)
    })
    .await;
    let initial_secs = t.elapsed().as_secs_f64();
    agent.stream.flushed().await;
    let point = ferry_testkit::points::cut_latest(&cluster.processor.url, "vm")
        .await
        .map_err(|s| anyhow::anyhow!("cut: {s}"))?;

    let mut f = FailoverClient::connect(cluster.failover.url.clone()).await?;
    let t = Instant::now();
    let job = f
        .start_failover(fo::StartFailoverRequest {
            target: Some(fo::start_failover_request::Target::VmName("vm".into())),
            kind: fo::FailoverKind::Unplanned as i32,
            point: Some(fo::PointChoice {
                choice: Some(fo::point_choice::Choice::PointId(point.id.clone())),
            }),
            test_network: String::new(),
            request_id: String::new(),
            instant: false,
            alternate_location: false,
        })
        .await?
        .into_inner();
    let mut stream = f
        .watch_job(fo::WatchJobRequest { id: job.id.clone() })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(j) = stream.message().await? {
        last = Some(j);
    }
    let secs = t.elapsed().as_secs_f64();
    let job = last.context("the job sent nothing")?;
    if job.state != fo::JobState::Succeeded as i32 {
        bail!("failover failed: {}", job.error);
    }
    let materialize = job
        .steps
        .iter()
        .find(|s| s.name == "materialize-disks")
        .map(|s| s.message.clone())
        .unwrap_or_default();
    let mb = DISK as f64 / 1e6;
    println!("source: 1 GiB disk, 512 MiB written (every other MiB); initial replication {initial_secs:.1} s");
    println!(
        "baseline: cp --sparse=always of the image {cp_secs:.2} s, {:.0} MB/s",
        mb / cp_secs
    );
    println!(
        "unplanned failover to {}: job done in {secs:.2} s, {:.0} MB/s ({:.2}x cp)",
        point.id,
        mb / secs,
        cp_secs / secs
    );
    println!("  materialize-disks: {materialize}");
    // Where the time goes: reading the point alone, extents discarded.
    let mut p =
        ferry_proto::processor::v1::processor_client::ProcessorClient::new(ferry_runtime::connect(
            &cluster.processor.url,
            &ferry_runtime::peers::Credentials::none(),
        )?)
        .max_decoding_message_size(64 << 20);
    let t = Instant::now();
    let mut extents = p
        .read_disk(ferry_proto::processor::v1::ReadDiskRequest {
            vm_name: "vm".into(),
            point_id: point.id.clone(),
            disk_id: "os".into(),
            offset: 0,
            length: 0,
        })
        .await?
        .into_inner();
    let mut n = 0u64;
    while let Some(e) = extents.message().await? {
        n += e.length;
    }
    let read_secs = t.elapsed().as_secs_f64();
    println!(
        "  ReadDisk alone: {} MiB in {read_secs:.2} s ({:.0} MB/s)",
        n >> 20,
        n as f64 / 1e6 / read_secs
    );
    let _ = agent.stop(Duration::from_secs(1)).await;
    cluster.stop().await;
    Ok(())
}
