//! `ferry-loadgen ingest-bench`: how fast writes become durable in cache-svc,
//! through the agent's library API and through its NBD export (fio), beside
//! the same run's fsynced sequential write bandwidth of the same filesystem.
//! `ferry-loadgen processor-bench`: apply rate, point cut cost and RPO lag
//! (see `processor_bench`). `ferry-loadgen failover-bench`: a failover of a
//! 1 GiB disk half written beside `cp --sparse=always` (see
//! `failover_bench`). `ferry-loadgen instant-bench`: seconds until a
//! failed-over VM runs on libvirt, instant against materialize-first (see
//! `instant_bench`). `ferry-loadgen reprotect-bench`: re-protect's seed,
//! digest comparison rate and bytes crossed, failback's bytes written (see
//! `reprotect_bench`). `ferry-loadgen group-bench`: bookmark rounds of a
//! 20-VM group and the write latency they add (see `group_bench`). All print
//! figures and ratios and assert nothing (machines are noisy).
//! `ferry-loadgen compare`: fio against qemu-nbd, QEMU's own replication
//! (qemu-storage-daemon with a write-blocking mirror) and Ferry's full stack
//! as processes, with ratios (see `compare_bench`).
//! `ferry-loadgen control-bench`: registry GetVm against health Check at a
//! concurrency of 16 (see `control_bench`).
//! `ferry-loadgen report`: runs compare, processor-bench, control-bench and
//! failover-bench and writes `docs/performance.md` with its plots (see
//! `report`, `plots`).
//! `ferry-loadgen chaos --minutes N`: the chaos test of `tests/tests/chaos.rs`
//! for N minutes (`ferry_testkit::chaos`); it fails loudly when a check
//! fails and prints kills and cuts survived, writes and the failover.

mod compare_bench;
mod control_bench;
mod failover_bench;
mod group_bench;
mod instant_bench;
mod plots;
mod processor_bench;
mod report;
mod reprotect_bench;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ferry_agent::capture::Capture;
use ferry_agent::run::{Agent, AgentOptions};
use ferry_agent::stream::{Stream, StreamLimits};
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::{CancellationToken, ServiceConfig};

#[derive(Parser)]
#[command(name = "ferry-loadgen")]
enum Cli {
    /// Ingest throughput: library API and NBD, 1 MiB sequential and 4 KiB random.
    #[command(name = "ingest-bench")]
    Ingest {
        /// Where the services keep their data (the filesystem measured).
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// MiB written by each sequential run.
        #[arg(long, default_value_t = 512)]
        seq_mib: u64,
        /// 4 KiB writes in each random run.
        #[arg(long, default_value_t = 40_000)]
        random_writes: u64,
    },
    /// The same fio jobs against qemu-nbd (no replication), QEMU's own
    /// replication (qemu-storage-daemon with a write-blocking mirror) and
    /// Ferry's full stack as processes: MiB/s, IOPS, p99, ratios, and
    /// whether Ferry's replication kept up.
    #[command(name = "compare")]
    Compare {
        /// Where the images and the services' data go (the filesystem
        /// measured).
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// MiB written by the sequential job.
        #[arg(long, default_value_t = 1024)]
        seq_mib: u64,
        /// Seconds of the 4 KiB random job.
        #[arg(long, default_value_t = 20)]
        random_secs: u64,
        /// Runs of every job against every export (min/median/max).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Also write the figures as JSON here (what `report` plots).
        #[arg(long)]
        figures: Option<PathBuf>,
    },
    /// Runs compare, processor-bench and failover-bench and writes their
    /// figures into one Markdown page.
    #[command(name = "report")]
    Report {
        /// Where the benches' data goes (the filesystem measured).
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// The page written.
        #[arg(long, default_value = "docs/performance.md")]
        out: PathBuf,
        /// Runs of each compare job (min/median/max).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds of compare's 4 KiB random job.
        #[arg(long, default_value_t = 20)]
        random_secs: u64,
    },
    /// registry-svc: GetVm calls per second against the same server's
    /// health Check, 16 concurrent callers.
    #[command(name = "control-bench")]
    Control {
        /// Where registry-svc keeps its data.
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// Seconds per round.
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
    },
    /// failover-svc: a failover of a 1 GiB disk half written, beside cp.
    #[command(name = "failover-bench")]
    Failover {
        /// Where the data goes (the filesystem measured).
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
    },
    /// Instant failover against materialize-first on libvirt: seconds from
    /// the request until the VM runs, for disks half written.
    #[command(name = "instant-bench")]
    Instant {
        /// Where the data goes.
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// Disk sizes in GiB, a run each.
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        gib: Vec<u64>,
    },
    /// Re-protect and failback: the seed, the digest comparison's rate,
    /// the bytes that crossed and were written, for disks half written.
    #[command(name = "reprotect-bench")]
    Reprotect {
        /// Where the data goes.
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// Disk sizes in GiB, a run each.
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        gib: Vec<u64>,
    },
    /// Replication groups: bookmark rounds per second over 20 VMs, and the
    /// write latency they add.
    #[command(name = "group-bench")]
    Group {
        /// Where the data goes.
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// VMs in the group.
        #[arg(long, default_value_t = 20)]
        vms: usize,
        /// Seconds per phase.
        #[arg(long, default_value_t = 10)]
        secs: u64,
    },
    /// Chaos soak: the services and the agent as processes, SIGKILLed and
    /// partitioned at random while qemu-io writes, then a planned failover
    /// checked byte for byte (the CI test `tests/tests/chaos.rs`, longer).
    #[command(name = "chaos")]
    Chaos {
        /// Minutes of chaos (the checks and the failover come after).
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// The seed, in hex (0x optional); a new one when unset. The same
        /// seed repeats the schedule of kills, faults and writes.
        #[arg(long)]
        seed: Option<String>,
        /// Where the run's directory goes; kept with every process's log
        /// when the run fails.
        #[arg(long, default_value = "target/chaos")]
        dir: PathBuf,
    },
    /// processor-svc: apply MiB/s, cost of a point on a 1 TiB disk, RPO lag.
    #[command(name = "processor-bench")]
    Processor {
        /// Where the data goes (the filesystem measured).
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// MiB applied by the sequential run.
        #[arg(long, default_value_t = 512)]
        apply_mib: u64,
        /// Steady churn for the RPO lag run, in MB/s.
        #[arg(long, default_value_t = 50.0)]
        churn_mb: f64,
        /// Length of the RPO lag run, in seconds.
        #[arg(long, default_value_t = 20)]
        churn_secs: u64,
        /// Also write the figures as JSON here (what `report` plots).
        #[arg(long)]
        figures: Option<PathBuf>,
    },
}

const DISK: u64 = 4 << 30;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The baseline: MiB/s of 1 MiB writes each followed by fdatasync.
fn fsync_baseline(dir: &Path, mib: u64) -> Result<f64> {
    let path = dir.join("baseline.bin");
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)?;
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    for _ in 0..mib {
        f.write_all(&buf)?;
        f.sync_data()?;
    }
    let secs = t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(mib as f64 / secs)
}

struct Rig {
    capture: Arc<Capture>,
    stream: Arc<Stream>,
    nbd_port: u16,
    shutdown: CancellationToken,
    agent: Agent,
    _registry: ferry_testkit::Running,
}

/// registry-svc and cache-svc in-process, and a whole agent (stream, NBD
/// export, resync loop) for one VM with a 4 GiB disk, protected.
async fn rig(dir: &Path, vm: &str) -> Result<Rig> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let cache_url = format!("http://{}", listener.local_addr()?);
    let registry =
        ferry_testkit::start_registry(dir.join(format!("{vm}-registry")), Some(cache_url.clone()))
            .await;
    ferry_testkit::wait_serving(&registry.url).await;
    let mut config = ServiceConfig::in_process(dir.join(format!("{vm}-cache")));
    config.registry = Some(registry.url.clone());
    config.limits.max_message_bytes = 64 << 20;
    let shutdown = CancellationToken::new();
    tokio::spawn(cache_svc::run(
        config,
        Default::default(),
        listener,
        shutdown.clone(),
    ));
    ferry_testkit::wait_serving(&cache_url).await;

    let source = dir.join(format!("{vm}-source.raw"));
    std::fs::File::create(&source)?.set_len(DISK)?;
    let mut r = RegistryClient::connect(registry.url.clone()).await?;
    r.register_vm(reg::RegisterVmRequest {
        vm: Some(reg::Vm {
            name: vm.into(),
            source_region: "eastus".into(),
            resource_group: "bench".into(),
            virtual_network: "net".into(),
            subnet: "sub".into(),
            nics: vec![reg::Nic {
                name: "nic0".into(),
                private_ip: "10.0.0.4".into(),
                mac_address: String::new(),
            }],
            disks: vec![reg::Disk {
                id: "os".into(),
                size_bytes: DISK,
                role: reg::DiskRole::Os as i32,
                storage: reg::DiskStorage::Managed as i32,
                source_path: source.display().to_string(),
            }],
            ..Default::default()
        }),
    })
    .await?;
    r.enable_replication(reg::EnableReplicationRequest {
        vm_name: vm.into(),
        target_region: "westus".into(),
        ..Default::default()
    })
    .await?;
    let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let nbd_port = nbd.local_addr()?.port();
    let agent = Agent::start(AgentOptions::new(
        registry.url.clone(),
        vm,
        nbd.into(),
        dir.join(format!("{vm}-agent")),
        vec![dir.to_path_buf()],
    ))
    .await?;
    let url = registry.url.clone();
    ferry_testkit::wait_for("PROTECTED", Duration::from_secs(120), || async {
        ferry_testkit::protected_item(&url, vm)
            .await
            .filter(|i| i.state() == reg::ReplicationState::Protected)
    })
    .await;
    Ok(Rig {
        capture: agent.capture.clone(),
        stream: agent.stream.clone(),
        nbd_port,
        shutdown,
        agent,
        _registry: registry,
    })
}

struct Figure {
    name: &'static str,
    bytes: u64,
    ops: u64,
    secs: f64,
    /// Times the stream's buffer overflowed (the time includes the resync).
    overflows: u64,
}

/// A phase started at `t` with `before` overflows: waits until every write
/// is durable in the cache (through resync if the buffer overflowed).
async fn settle(
    rig: &Rig,
    name: &'static str,
    bytes: u64,
    ops: u64,
    t: Instant,
    before: u64,
) -> Figure {
    rig.stream.settled().await;
    Figure {
        name,
        bytes,
        ops,
        secs: t.elapsed().as_secs_f64(),
        overflows: rig.stream.overflows().await - before,
    }
}

/// A library caller writing faster than the cache takes would overflow the
/// buffer (the stream then tracks changed chunks and resyncs); past half
/// the buffer the bench waits for acknowledgements, so that it measures
/// ingest.
async fn keep_under_half(rig: &Rig) {
    let half = StreamLimits::default().buffer_bytes / 2;
    if rig.stream.pending_bytes().await > half {
        rig.stream.flushed().await;
    }
}

async fn library_seq(rig: &Rig, mib: u64) -> Result<Figure> {
    let data = vec![0xa5u8; 1 << 20];
    let before = rig.stream.overflows().await;
    let t = Instant::now();
    for i in 0..mib {
        rig.capture
            .write("os", (i << 20) % DISK, data.clone())
            .await?;
        keep_under_half(rig).await;
    }
    Ok(settle(
        rig,
        "library API, 1 MiB sequential",
        mib << 20,
        mib,
        t,
        before,
    )
    .await)
}

async fn library_random(rig: &Rig, n: u64) -> Result<Figure> {
    let mut rng = Rng(0x2545f4914f6cdd1d);
    let data = vec![0x3cu8; 4096];
    let before = rig.stream.overflows().await;
    let t = Instant::now();
    for _ in 0..n {
        let offset = (rng.next() % (DISK / 4096)) * 4096;
        rig.capture.write("os", offset, data.clone()).await?;
        keep_under_half(rig).await;
    }
    Ok(settle(rig, "library API, 4 KiB random", n * 4096, n, t, before).await)
}

async fn fio(
    rig: &Rig,
    name: &'static str,
    args: Vec<String>,
    bytes: u64,
    ops: u64,
) -> Result<Figure> {
    let uri = format!("--uri=nbd://127.0.0.1:{}/os", rig.nbd_port);
    let before = rig.stream.overflows().await;
    let t = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("fio")
            .arg("--name=bench")
            .arg("--ioengine=nbd")
            .arg(uri)
            .args(args)
            .output()
    })
    .await?
    .context("run fio (Debian package fio)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(settle(rig, name, bytes, ops, t, before).await)
}

/// `ferry-loadgen chaos`: the seed printed first, the figures at the end;
/// a failure panics with the seed and the kept run directory.
async fn chaos(minutes: u64, seed: Option<String>, dir: PathBuf) -> Result<()> {
    let seed = match seed {
        Some(s) => u64::from_str_radix(s.trim_start_matches("0x"), 16)
            .with_context(|| format!("--seed {s:?} is not hex"))?,
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos() as u64;
            nanos ^ u64::from(std::process::id()) << 32
        }
    };
    println!("seed {seed:#x} (--seed {seed:x} repeats it)");
    let mut options = ferry_testkit::chaos::ChaosOptions::soak(seed, minutes);
    options.dir = Some(dir);
    let report = ferry_testkit::chaos::run(options).await;
    println!("{report}");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let (dir, seq_mib, random_writes) = match Cli::parse() {
        Cli::Ingest {
            dir,
            seq_mib,
            random_writes,
        } => (dir, seq_mib, random_writes),
        Cli::Group { dir, vms, secs } => {
            std::fs::create_dir_all(&dir)?;
            let work = tempfile::tempdir_in(&dir)?;
            return group_bench::run(work.path(), vms, secs).await;
        }
        Cli::Chaos { minutes, seed, dir } => return chaos(minutes, seed, dir).await,
        Cli::Control { dir, secs } => {
            std::fs::create_dir_all(&dir)?;
            let work = tempfile::tempdir_in(&dir)?;
            return control_bench::run(work.path(), secs).await;
        }
        Cli::Report {
            dir,
            out,
            runs,
            random_secs,
        } => {
            std::fs::create_dir_all(&dir)?;
            return report::run(&dir, &out, runs, random_secs);
        }
        Cli::Compare {
            dir,
            seq_mib,
            random_secs,
            runs,
            figures,
        } => {
            std::fs::create_dir_all(&dir)?;
            let work = tempfile::tempdir_in(&dir)?;
            return compare_bench::run(work.path(), seq_mib, random_secs, runs, figures.as_deref())
                .await;
        }
        Cli::Failover { dir } => {
            std::fs::create_dir_all(&dir)?;
            let work = tempfile::tempdir_in(&dir)?;
            return failover_bench::run(work.path()).await;
        }
        Cli::Reprotect { dir, gib } => {
            std::fs::create_dir_all(&dir)?;
            return reprotect_bench::run(&dir, &gib).await;
        }
        Cli::Instant { dir, gib } => {
            std::fs::create_dir_all(&dir)?;
            let work = tempfile::tempdir_in(&dir)?;
            return instant_bench::run(work.path(), &gib).await;
        }
        Cli::Processor {
            dir,
            apply_mib,
            churn_mb,
            churn_secs,
            figures,
        } => {
            std::fs::create_dir_all(&dir)?;
            let work = tempfile::tempdir_in(&dir)?;
            return processor_bench::run(
                work.path(),
                apply_mib,
                churn_mb,
                churn_secs,
                figures.as_deref(),
            )
            .await;
        }
    };
    std::fs::create_dir_all(&dir)?;
    let work = tempfile::tempdir_in(&dir)?;
    let baseline = fsync_baseline(work.path(), 256)?;
    println!(
        "filesystem of {}: fsynced 1 MiB sequential writes {baseline:.1} MiB/s (baseline)",
        dir.display()
    );

    let rig = rig(work.path(), "bench").await?;
    let mut figures = Vec::new();
    figures.push(library_seq(&rig, seq_mib).await?);
    figures.push(library_random(&rig, random_writes).await?);
    figures.push(
        fio(
            &rig,
            "NBD (fio), 1 MiB sequential",
            vec![
                "--rw=write".into(),
                "--bs=1M".into(),
                format!("--size={seq_mib}M"),
                "--iodepth=8".into(),
            ],
            seq_mib << 20,
            seq_mib,
        )
        .await?,
    );
    figures.push(
        fio(
            &rig,
            "NBD (fio), 4 KiB random",
            vec![
                "--rw=randwrite".into(),
                "--bs=4k".into(),
                "--size=4G".into(),
                format!("--io_size={}", random_writes * 4096),
                "--iodepth=32".into(),
                "--randrepeat=1".into(),
            ],
            random_writes * 4096,
            random_writes,
        )
        .await?,
    );
    println!(
        "{:<32} {:>10} {:>10} {:>12}",
        "ingest (write -> durable in cache)", "MiB/s", "IOPS", "vs baseline"
    );
    for f in &figures {
        let mibs = f.bytes as f64 / (1 << 20) as f64 / f.secs;
        println!(
            "{:<32} {:>10.1} {:>10.0} {:>11.2}x",
            f.name,
            mibs,
            f.ops as f64 / f.secs,
            mibs / baseline
        );
        if f.overflows > 0 {
            println!(
                "  (the buffer overflowed {} time(s): includes tracking and resync)",
                f.overflows
            );
        }
    }
    rig.agent.stop(Duration::from_secs(10)).await?;
    rig.shutdown.cancel();
    Ok(())
}
