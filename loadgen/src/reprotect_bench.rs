//! `ferry-loadgen reprotect-bench`: the DR cycle's figures for a disk of
//! each size given, half written (every other MiB). After an unplanned
//! failover and commit, the fenced source writes 16 MiB (scattered 64 KiB
//! blocks); then re-protect (the seed: the original disk read into the
//! reverse replica), the agent's digest comparison until PROTECTED (disk
//! MB/s, beside ASR's published 45 MB/s and beside `cat` reading the same
//! image in the same run), the bytes that crossed against the disk size and
//! the bytes changed, 8 MiB written in the target region, and failback
//! (bytes written into the original disk against what changed).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_agent::run::{Agent, AgentOptions};
use ferry_proto::failover::v1 as fo;
use ferry_proto::failover::v1::failover_client::FailoverClient;
use ferry_proto::registry::v1 as reg;

use crate::failover_bench::half_written;

/// What the fenced source writes after the failover: 256 blocks of 64 KiB.
const AFTER_FENCE: u64 = 256;
/// What the re-protected VM writes before failback.
const IN_TARGET: u64 = 8 << 20;

async fn wait_state(registry: &str, state: reg::ReplicationState) {
    ferry_testkit::wait_for(&format!("{state:?}"), Duration::from_secs(1800), || async {
        ferry_testkit::protected_item(registry, "vm")
            .await
            .filter(|i| i.state() == state)
    })
    .await;
}

async fn agent(registry: &str, state: &Path, root: &Path) -> Result<(Agent, String)> {
    let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = nbd.local_addr()?;
    let agent = Agent::start(AgentOptions::new(
        registry,
        "vm",
        nbd.into(),
        state.to_path_buf(),
        vec![root.to_path_buf()],
    ))
    .await?;
    Ok((agent, format!("nbd://{addr}/os")))
}

fn qemu_io(target: &str, command: &str) -> Result<()> {
    let status = Command::new("qemu-io")
        .args(["-f", "raw", "-c", command, target])
        .stdout(std::process::Stdio::null())
        .status()
        .context("run qemu-io")?;
    if !status.success() {
        bail!("qemu-io {command} failed");
    }
    Ok(())
}

async fn job(f: &mut FailoverClient<tonic::transport::Channel>, job: fo::Job) -> Result<fo::Job> {
    let mut stream = f
        .watch_job(fo::WatchJobRequest { id: job.id.clone() })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(j) = stream.message().await? {
        last = Some(j);
    }
    let job = last.context("the job sent nothing")?;
    if job.state != fo::JobState::Succeeded as i32 {
        bail!("job {} failed: {}", job.id, job.error);
    }
    Ok(job)
}

fn failover(kind: fo::FailoverKind) -> fo::StartFailoverRequest {
    fo::StartFailoverRequest {
        target: Some(fo::start_failover_request::Target::VmName("vm".into())),
        kind: kind as i32,
        point: Some(fo::PointChoice {
            choice: Some(fo::point_choice::Choice::Latest(true)),
        }),
        test_network: String::new(),
        request_id: String::new(),
        instant: false,
        alternate_location: false,
    }
}

async fn commit(f: &mut FailoverClient<tonic::transport::Channel>) -> Result<()> {
    let j = f
        .commit_failover(fo::CommitFailoverRequest {
            target: Some(fo::commit_failover_request::Target::VmName("vm".into())),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    job(f, j).await.map(|_| ())
}

/// One size's figures.
struct Figures {
    gib: u64,
    seed_secs: f64,
    seeded: u64,
    compare_secs: f64,
    cat_secs: f64,
    crossed: u64,
    changed: u64,
    failback_written: u64,
    failback_changed: u64,
}

async fn one(dir: &Path, gib: u64) -> Result<Figures> {
    let size = gib << 30;
    let east = dir.join("east");
    std::fs::create_dir_all(&east)?;
    let source = east.join("os.raw");
    half_written(&source, size)?;
    let failover_dir = dir.join("failover");
    let cluster = ferry_testkit::Cluster::start_options(ferry_testkit::ClusterOptions {
        failover_dir: Some(failover_dir.clone()),
        ..Default::default()
    })
    .await;
    let registry = cluster.registry.url.clone();
    let day = Duration::from_secs(86400);
    ferry_testkit::create_policy(&registry, "bench", Duration::from_secs(1), day, day, day).await;
    ferry_testkit::protect_vm_with(&registry, "vm", &[("os", size, &source)], "bench").await;
    let (a, nbd) = agent(&registry, &east.join("agent"), &east).await?;
    wait_state(&registry, reg::ReplicationState::Protected).await;
    a.stream.flushed().await;
    let mut f = FailoverClient::connect(cluster.failover.url.clone()).await?;
    let j = f
        .start_failover(failover(fo::FailoverKind::Unplanned))
        .await?
        .into_inner();
    job(&mut f, j).await?;
    commit(&mut f).await?;
    // The fenced source writes on: scattered blocks, each in its own
    // 64 KiB chunk.
    let step = size / AFTER_FENCE;
    for i in 0..AFTER_FENCE {
        qemu_io(&nbd, &format!("write -P 0x5e {} 64k", i * step))?;
    }
    let changed = AFTER_FENCE * (64 << 10);
    a.stop(Duration::from_secs(5)).await?;

    let t = Instant::now();
    let j = f
        .reprotect(fo::ReprotectRequest {
            vm_name: "vm".into(),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    let j = job(&mut f, j).await?;
    let seed_secs = t.elapsed().as_secs_f64();
    let failed_over = f
        .list_target_vms(fo::ListTargetVmsRequest {
            source_vm: "vm".into(),
        })
        .await?
        .into_inner()
        .vms
        .into_iter()
        .find(|v| v.region == "westus")
        .context("no failed-over VM")?;
    let image = failed_over.disks[0].path.clone();
    // The peer: reading the same image whole.
    let t = Instant::now();
    let status = Command::new("cat")
        .arg(&image)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        bail!("cat {image} failed");
    }
    let cat_secs = t.elapsed().as_secs_f64();

    let root = Path::new(&image)
        .parent()
        .context("the image has no directory")?;
    let t = Instant::now();
    let (b, west_nbd) = agent(&registry, &dir.join("west-agent"), root).await?;
    wait_state(&registry, reg::ReplicationState::Protected).await;
    let compare_secs = t.elapsed().as_secs_f64();
    let crossed = b.streamed_bytes();

    qemu_io(&west_nbd, &format!("write -P 0x7e 0 {IN_TARGET}"))?;
    b.stream.flushed().await;
    let j2 = f
        .start_failover(failover(fo::FailoverKind::Planned))
        .await?
        .into_inner();
    let back = job(&mut f, j2).await?;
    commit(&mut f).await?;
    let _ = b.stop(Duration::from_secs(5)).await;
    cluster.stop().await;
    Ok(Figures {
        gib,
        seed_secs,
        seeded: j.bytes_written,
        compare_secs,
        cat_secs,
        crossed,
        changed,
        failback_written: back.bytes_written,
        // The target's writes, and the fenced source's blocks undone
        // (those inside the target's 8 MiB counted once).
        failback_changed: IN_TARGET + changed
            - IN_TARGET.div_ceil(step).min(AFTER_FENCE) * (64 << 10),
    })
}

pub async fn run(dir: &Path, gibs: &[u64]) -> Result<()> {
    let mut all = Vec::new();
    for &gib in gibs {
        let work = tempfile::tempdir_in(dir)?;
        all.push(one(work.path(), gib).await?);
    }
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "| disk | re-protect job (seed) | digest comparison until PROTECTED | vs ASR's 45 MB/s | vs cat of the image | crossed regions | changed | failback wrote | changed since the point |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for x in &all {
        let size = x.gib << 30;
        let compare = mb(size) / x.compare_secs;
        let cat = mb(size) / x.cat_secs;
        println!(
            "| {} GiB | {:.1} s, {:.0} MB/s of data | {:.1} s, {compare:.0} MB/s | {:.1}x | {:.2}x | {:.2} MB ({:.3}% of the disk) | {:.2} MB | {:.2} MB | {:.2} MB |",
            x.gib,
            x.seed_secs,
            mb(x.seeded) / x.seed_secs,
            x.compare_secs,
            compare / 45.0,
            compare / cat,
            mb(x.crossed),
            x.crossed as f64 * 100.0 / size as f64,
            mb(x.changed),
            mb(x.failback_written),
            mb(x.failback_changed),
        );
    }
    Ok(())
}
