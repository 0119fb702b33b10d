//! `ferry-loadgen processor-bench`: how fast processor-svc applies records
//! (beside the same run's fsynced sequential writes), what cutting a point
//! costs on a 1 TiB sparse disk with 1 MiB changed (beside a 1 GiB disk), and
//! the RPO lag (write acknowledged at the agent → included in a point) at a
//! steady churn with 1 s points through the whole stack.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferry_agent::run::{Agent, AgentOptions};
use ferry_proto::cache::v1::record::Op;
use ferry_proto::cache::v1::{Marker, MarkerKind, Record, WriteOp};
use ferry_proto::ids::Incarnation;
use ferry_proto::processor::v1 as pb;
use ferry_proto::processor::v1::processor_client::ProcessorClient;
use ferry_proto::registry::v1 as reg;
use processor_svc::replica::{PointKind, Replicas, VmReplica};

use crate::{fsync_baseline, Rng};

const CHUNK: u64 = 64 * 1024;

struct Feed(u64);

impl Feed {
    fn next(&mut self, disk: &str, op: Op) -> Record {
        self.0 += 1;
        let mut record = Record {
            sequence: self.0,
            disk_id: disk.into(),
            op: Some(op),
            crc32c: 0,
            captured_at_unix_nanos: ferry_runtime::time::unix_nanos_now(),
        };
        ferry_proto::checksum::seal(&mut record);
        record
    }

    fn synced(&mut self, replica: &VmReplica, disk: &str) -> Result<()> {
        for kind in [MarkerKind::SyncStarted, MarkerKind::SyncCompleted] {
            let marker = Op::Marker(Marker {
                kind: kind as i32,
                id: String::new(),
                time_unix_nanos: 0,
            });
            replica.apply(&self.next(disk, marker))?;
        }
        Ok(())
    }
}

fn write(offset: u64, len: usize, byte: u8) -> Op {
    Op::Write(WriteOp {
        offset,
        data: vec![byte; len].into(),
    })
}

/// What one apply run measured.
struct Applied {
    mibs: f64,
    records_per_sec: f64,
    /// The replica's bytes on disk after the run.
    disk_bytes: u64,
    /// After each point: (bytes written, replica bytes on disk).
    space: Vec<(u64, u64)>,
}

/// MiB/s and records/s of applying `records` writes of `len` bytes, a point
/// cut every `per_point` records (each cut fsyncs), and the replica's bytes
/// on disk after each point (not timed).
fn apply_rate(
    dir: &Path,
    name: &str,
    disk_size: u64,
    records: u64,
    len: usize,
    per_point: u64,
    offset: impl Fn(u64) -> u64,
) -> Result<Applied> {
    let replicas = Replicas::open(&dir.join(name), CHUNK, 64 << 20)?;
    let replica = replicas.open_vm_with(
        "vm",
        &BTreeMap::from([("os".into(), disk_size)]),
        Incarnation(0),
    )?;
    let mut feed = Feed(0);
    feed.synced(&replica, "os")?;
    let mut space = Vec::new();
    let mut untimed = Duration::ZERO;
    let t = Instant::now();
    for i in 0..records {
        replica.apply(&feed.next("os", write(offset(i), len, (i % 251) as u8 + 1)))?;
        if (i + 1).is_multiple_of(per_point) {
            replica.cut(PointKind::CrashConsistent, "", 0)?;
            let measuring = Instant::now();
            space.push(((i + 1) * len as u64, replica.disk_bytes()?));
            untimed += measuring.elapsed();
        }
    }
    replica.cut(PointKind::CrashConsistent, "", 0)?;
    let secs = (t.elapsed() - untimed).as_secs_f64();
    let disk_bytes = replica.disk_bytes()?;
    if !records.is_multiple_of(per_point) {
        space.push((records * len as u64, disk_bytes));
    }
    Ok(Applied {
        mibs: (records * len as u64) as f64 / (1 << 20) as f64 / secs,
        records_per_sec: records as f64 / secs,
        disk_bytes,
        space,
    })
}

/// Milliseconds to cut a point after 1 MiB of scattered 64 KiB writes, on a
/// disk of `size`, over `rounds` rounds: (median, p99).
fn cut_cost(dir: &Path, name: &str, size: u64, rounds: usize) -> Result<(f64, f64)> {
    let replicas = Replicas::open(&dir.join(name), CHUNK, 64 << 20)?;
    let replica =
        replicas.open_vm_with("vm", &BTreeMap::from([("os".into(), size)]), Incarnation(0))?;
    let mut feed = Feed(0);
    feed.synced(&replica, "os")?;
    let mut rng = Rng(0x51ed270b27a3cd91);
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        for _ in 0..16 {
            let offset = (rng.next() % (size / CHUNK)) * CHUNK;
            replica.apply(&feed.next("os", write(offset, CHUNK as usize, 7)))?;
        }
        let t = Instant::now();
        replica.cut(PointKind::CrashConsistent, "", 0)?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((percentile(&mut times, 50.0), percentile(&mut times, 99.0)))
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

/// RPO lag through agent → cache → processor at `mb_per_sec` for `secs`,
/// 256 KiB writes, 1 s points: (p50, p99, max) in milliseconds, and the
/// churn achieved.
async fn rpo_lag(dir: &Path, mb_per_sec: f64, secs: u64) -> Result<(f64, f64, f64, f64)> {
    let cluster = ferry_testkit::Cluster::start().await;
    let registry = cluster.registry.url.clone();
    let size: u64 = 4 << 30;
    let source = dir.join("rpo-source.raw");
    std::fs::File::create(&source)?.set_len(size)?;
    let day = Duration::from_secs(86400);
    ferry_testkit::create_policy(&registry, "rpo", Duration::from_secs(1), day, day, day).await;
    ferry_testkit::protect_vm_with(&registry, "vm", &[("os", size, &source)], "rpo").await;
    let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let agent = Agent::start(AgentOptions::new(
        registry.clone(),
        "vm",
        nbd.into(),
        dir.join("rpo-agent"),
        vec![dir.to_path_buf()],
    ))
    .await?;
    ferry_testkit::wait_for("PROTECTED", Duration::from_secs(60), || async {
        ferry_testkit::protected_item(&registry, "vm")
            .await
            .filter(|i| i.state() == reg::ReplicationState::Protected)
    })
    .await;

    // Paced writes; each one's sequence and the moment it completed.
    let write_len: u64 = 256 * 1024;
    let per_sec = mb_per_sec * 1e6 / write_len as f64;
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < Duration::from_secs(secs) {
        let due = started + Duration::from_secs_f64(i as f64 / per_sec);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let offset = (i * write_len) % size;
        let seq = agent
            .capture
            .write("os", offset, vec![(i % 251) as u8 + 1; write_len as usize])
            .await?;
        acked.push((seq, ferry_runtime::time::unix_nanos_now()));
        i += 1;
    }
    let churn = (i * write_len) as f64 / 1e6 / started.elapsed().as_secs_f64();
    let last = acked.last().map(|a| a.0).unwrap_or(0);
    // Every write is in some point once the newest point covers the last.
    let client = ProcessorClient::connect(cluster.processor.url.clone()).await?;
    let points = ferry_testkit::wait_for(
        "a point past the last write",
        Duration::from_secs(60),
        || {
            let mut client = client.clone();
            async move {
                let points = client
                    .list_recovery_points(pb::ListRecoveryPointsRequest {
                        vm_name: "vm".into(),
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .points;
                points
                    .first()
                    .is_some_and(|p| p.sequence_cut >= last)
                    .then_some(points)
            }
        },
    )
    .await;
    // Oldest first: (sequence cut, when it was cut).
    let mut cuts: Vec<(u64, u64)> = points
        .iter()
        .map(|p| {
            let t = p.created_at.unwrap_or_default();
            (
                p.sequence_cut,
                t.seconds as u64 * 1_000_000_000 + t.nanos as u64,
            )
        })
        .collect();
    cuts.sort();
    let mut lags = Vec::with_capacity(acked.len());
    for (seq, at) in &acked {
        let first = cuts.partition_point(|(cut, _)| cut < seq);
        if let Some((_, cut_at)) = cuts.get(first) {
            lags.push(cut_at.saturating_sub(*at) as f64 / 1e6);
        }
    }
    let max = lags.iter().copied().fold(0.0, f64::max);
    let figures = (
        percentile(&mut lags, 50.0),
        percentile(&mut lags, 99.0),
        max,
        churn,
    );
    agent.stop(Duration::from_secs(10)).await?;
    cluster.stop().await;
    Ok(figures)
}

/// Runs the processor benchmarks and prints the figures.
pub async fn run(
    dir: &Path,
    apply_mib: u64,
    churn_mb: f64,
    churn_secs: u64,
    figures_to: Option<&Path>,
) -> Result<()> {
    let baseline = fsync_baseline(dir, 256)?;
    println!(
        "filesystem of {}: fsynced 1 MiB sequential writes {baseline:.1} MiB/s (baseline)",
        dir.display()
    );
    let seq = apply_rate(dir, "apply-seq", 8 << 30, apply_mib, 1 << 20, 64, |i| {
        (i << 20) % (8 << 30)
    })
    .context("sequential apply")?
    .mibs;
    let mut rng = Rng(0x2545f4914f6cdd1d);
    let offsets: Vec<u64> = (0..40_000)
        .map(|_| (rng.next() % ((4u64 << 30) / 4096)) * 4096)
        .collect();
    let random = apply_rate(dir, "apply-rand", 4 << 30, 40_000, 4096, 5_000, |i| {
        offsets[i as usize]
    })
    .context("random apply")?;
    let (rand_mib, rand_ops, rand_disk) = (random.mibs, random.records_per_sec, random.disk_bytes);
    if let Some(path) = figures_to {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        let space = random
            .space
            .iter()
            .map(|(w, d)| (mib(*w), mib(*d)))
            .collect();
        crate::plots::save(path, &crate::plots::SpaceFigures { space })?;
    }
    println!(
        "{:<44} {:>10} {:>10} {:>12}",
        "apply (record -> durable in replica)", "MiB/s", "IOPS", "vs baseline"
    );
    println!(
        "{:<44} {:>10.1} {:>10} {:>11.2}x",
        "1 MiB sequential, a point per 64 MiB",
        seq,
        "",
        seq / baseline
    );
    println!(
        "{:<44} {:>10.1} {:>10.0} {:>11.2}x",
        "4 KiB random, a point per 5000 records",
        rand_mib,
        rand_ops,
        rand_mib / baseline
    );

    let written = 40_000u64 * 4096;
    println!(
        "  replica data on disk after the random run: {:.1} MiB for {:.1} MiB written ({:.2}x)",
        rand_disk as f64 / f64::from(1 << 20),
        written as f64 / f64::from(1 << 20),
        rand_disk as f64 / written as f64
    );

    let (tib50, tib99) = cut_cost(dir, "cut-1tib", 1 << 40, 50)?;
    let (gib50, gib99) = cut_cost(dir, "cut-1gib", 1 << 30, 50)?;
    println!("cut a point with 1 MiB changed (16 chunks), 50 rounds:");
    println!("  1 TiB sparse disk: median {tib50:.2} ms, p99 {tib99:.2} ms");
    println!("  1 GiB disk:        median {gib50:.2} ms, p99 {gib99:.2} ms (same cost: O(changed chunks))");

    let (p50, p99, max, churn) = rpo_lag(dir, churn_mb, churn_secs).await?;
    println!(
        "RPO lag (write acknowledged at the agent -> in a point), 1 s points, {churn:.1} MB/s churn for {churn_secs} s:"
    );
    println!("  p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms");
    Ok(())
}
