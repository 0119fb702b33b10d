//! `ferry-loadgen compare`: the same fio jobs (nbd engine) against three
//! exports of a raw image on the same filesystem, in one run:
//!
//! - `qemu-nbd --cache=writeback`: no replication, the ceiling of the
//!   capture path;
//! - QEMU's own replication: `qemu-storage-daemon` exporting the image over
//!   NBD with an active `blockdev-mirror` (`copy-mode=write-blocking`) to a
//!   second qemu-nbd, the peer with the same promise of every write sent;
//! - Ferry: registry-svc, cache-svc and processor-svc as processes, and
//!   ferry-agent as a process exporting the disk, points every second.
//!
//! For Ferry it also reports whether replication kept up: overflows of the
//! agent's buffer (tracking and resync follow one), and the time from the
//! writer stopping to a recovery point that holds a write made just after
//! its last one (read back through ReadDisk); and the peak RSS of the agent
//! and processor-svc. Every figure is min / median / max of `runs`, with
//! ratios of medians against qemu-nbd. Nothing is asserted.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::plots::{Bar, CompareFigures, Spread};
use anyhow::{bail, Context, Result};
use ferry_proto::processor::v1 as proc;
use ferry_proto::processor::v1::processor_client::ProcessorClient;
use ferry_proto::registry::v1 as reg;
use ferry_testkit::{
    agent_command, bin_path, free_addr, wait_for, AgentAuth, Insecure, ServiceProcess,
};

const DISK: u64 = 4 << 30;

const QEMU_NBD: &str = "qemu-nbd writeback (no replication)";
const MIRROR: &str = "qemu-storage-daemon + blockdev-mirror write-blocking";
const FERRY: &str = "Ferry (agent → cache → processor)";

/// One fio job.
#[derive(Clone)]
pub struct Job {
    pub name: &'static str,
    pub args: Vec<String>,
}

/// The two jobs: 1 MiB sequential writes (`seq_mib` MiB, depth 8) and
/// 4 KiB random writes for `random_secs` (depth 32).
pub fn jobs(seq_mib: u64, random_secs: u64) -> Vec<Job> {
    vec![
        Job {
            name: "1 MiB sequential writes, depth 8",
            args: vec![
                "--rw=write".into(),
                "--bs=1M".into(),
                format!("--size={seq_mib}M"),
                "--iodepth=8".into(),
            ],
        },
        Job {
            name: "4 KiB random writes, depth 32",
            args: vec![
                "--rw=randwrite".into(),
                "--bs=4k".into(),
                "--size=4G".into(),
                "--time_based".into(),
                format!("--runtime={random_secs}"),
                "--iodepth=32".into(),
                "--randrepeat=1".into(),
            ],
        },
    ]
}

/// What fio measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fio {
    pub mibs: f64,
    pub iops: f64,
    pub p99_ms: f64,
}

/// Runs `job` against `nbd://addr/export`; its figures from fio's JSON.
fn fio(addr: &str, export: &str, job: &Job) -> Result<Fio> {
    let out = Command::new("fio")
        .arg("--name=compare")
        .arg("--ioengine=nbd")
        .arg(format!("--uri=nbd://{addr}/{export}"))
        .arg("--output-format=json")
        .args(&job.args)
        .output()
        .context("run fio (Debian package fio)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // fio may print notes before its JSON.
    let start = out.stdout.iter().position(|b| *b == b'{').unwrap_or(0);
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout[start..]).context("fio's JSON output")?;
    let write = &json["jobs"][0]["write"];
    let p99 = write["clat_ns"]["percentile"]["99.000000"]
        .as_f64()
        .unwrap_or(0.0);
    Ok(Fio {
        mibs: write["bw_bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20),
        iops: write["iops"].as_f64().unwrap_or(0.0),
        p99_ms: p99 / 1e6,
    })
}

/// Waits until something accepts connections on `addr`.
async fn listening(addr: &str) {
    let addr = addr.to_string();
    wait_for("the export to listen", Duration::from_secs(30), || {
        let addr = addr.clone();
        async move { tokio::net::TcpStream::connect(&addr).await.ok().map(|_| ()) }
    })
    .await;
}

/// A child killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sparse_image(path: &Path, size: u64) -> Result<()> {
    std::fs::File::create(path)?.set_len(size)?;
    Ok(())
}

fn qemu_nbd(image: &Path, addr: &str, export: &str) -> Result<Killed> {
    let (host, port) = addr.split_once(':').context("host:port")?;
    let child = Command::new("qemu-nbd")
        .args([
            "--persistent",
            "--shared=8",
            "--format=raw",
            "--cache=writeback",
        ])
        .args([
            "--aio=threads",
            "--bind",
            host,
            "--port",
            port,
            "--export-name",
            export,
        ])
        .arg(image)
        .stdin(Stdio::null())
        .spawn()
        .context("run qemu-nbd (Debian package qemu-utils)")?;
    Ok(Killed(child))
}

/// qemu-nbd writeback on a fresh image: the ceiling.
pub async fn qemu_nbd_run(dir: &Path, job: &Job) -> Result<Fio> {
    let image = dir.join("qemu-nbd.raw");
    sparse_image(&image, DISK)?;
    let addr = free_addr().to_string();
    let server = qemu_nbd(&image, &addr, "os")?;
    listening(&addr).await;
    let job = job.clone();
    let a = addr.clone();
    let figures = tokio::task::spawn_blocking(move || fio(&a, "os", &job)).await??;
    drop(server);
    std::fs::remove_file(&image)?;
    Ok(figures)
}

/// One QMP command on a monitor socket; its `return`, or the error.
fn qmp(stream: &mut UnixStream, reader: &mut impl BufRead, cmd: &str) -> Result<serde_json::Value> {
    stream.write_all(cmd.as_bytes())?;
    stream.write_all(b"\n")?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("QMP closed");
        }
        let v: serde_json::Value = serde_json::from_str(&line)?;
        if v.get("event").is_some() {
            continue;
        }
        if let Some(e) = v.get("error") {
            bail!("QMP {cmd}: {e}");
        }
        return Ok(v["return"].clone());
    }
}

/// qemu-storage-daemon exporting a fresh image with an active mirror
/// (write-blocking) to a second qemu-nbd: QEMU's own replication.
pub async fn mirror_run(dir: &Path, job: &Job) -> Result<Fio> {
    let (source, target) = (dir.join("mirror-source.raw"), dir.join("mirror-target.raw"));
    sparse_image(&source, DISK)?;
    sparse_image(&target, DISK)?;
    let target_addr = free_addr().to_string();
    let target_server = qemu_nbd(&target, &target_addr, "tgt")?;
    listening(&target_addr).await;
    let (thost, tport) = target_addr.split_once(':').context("host:port")?;
    let export_addr = free_addr().to_string();
    let (host, port) = export_addr.split_once(':').context("host:port")?;
    let qmp_path = dir.join("qsd.qmp");
    let daemon = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},cache.direct=off,aio=threads",
            source.display()
        ))
        .args(["--blockdev", "driver=raw,node-name=src,file=file0"])
        .arg("--blockdev")
        .arg(format!(
            "driver=nbd,node-name=tgt,server.type=inet,server.host={thost},server.port={tport},export=tgt"
        ))
        .arg("--nbd-server")
        .arg(format!("addr.type=inet,addr.host={host},addr.port={port}"))
        .args(["--export", "type=nbd,id=e0,node-name=src,name=os,writable=on"])
        .arg("--chardev")
        .arg(format!("socket,id=qmp,path={},server=on,wait=off", qmp_path.display()))
        .args(["--monitor", "chardev=qmp"])
        .stdin(Stdio::null())
        .spawn()
        .context("run qemu-storage-daemon (Debian package qemu-system-common or qemu-utils)")?;
    let daemon = Killed(daemon);
    listening(&export_addr).await;
    let monitor = qmp_path.clone();
    let mut stream = wait_for("the QMP socket", Duration::from_secs(30), || {
        let monitor = monitor.clone();
        async move { UnixStream::connect(&monitor).ok() }
    })
    .await;
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut greeting = String::new();
        reader.read_line(&mut greeting)?;
        qmp(&mut stream, &mut reader, r#"{"execute":"qmp_capabilities"}"#)?;
        qmp(
            &mut stream,
            &mut reader,
            r#"{"execute":"blockdev-mirror","arguments":{"job-id":"m","device":"src","target":"tgt","sync":"full","copy-mode":"write-blocking"}}"#,
        )?;
        // Ready: the (empty) image is copied and every write is mirrored.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let jobs = qmp(&mut stream, &mut reader, r#"{"execute":"query-block-jobs"}"#)?;
            if jobs[0]["ready"].as_bool() == Some(true) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the mirror job is not ready after 120 s: {jobs}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await??;
    let job = job.clone();
    let a = export_addr.clone();
    let figures = tokio::task::spawn_blocking(move || fio(&a, "os", &job)).await??;
    drop(daemon);
    drop(target_server);
    std::fs::remove_file(&source)?;
    std::fs::remove_file(&target)?;
    Ok(figures)
}

/// What a Ferry run measured beside fio's figures.
#[derive(Debug, Clone, Default)]
pub struct Ferry {
    pub fio: Fio,
    /// Times the agent's buffer overflowed into tracking during the job.
    pub overflows: u64,
    /// Writer stopped → a recovery point holds a write made right after its
    /// last one.
    pub catch_up_secs: f64,
    /// Peak resident set of the agent and processor-svc, MiB.
    pub agent_rss_mib: f64,
    pub processor_rss_mib: f64,
    /// The RPO sampled while the writer ran: (seconds since it started,
    /// now minus the time of the newest write in the newest point).
    pub rpo: Vec<(f64, f64)>,
}

/// The full stack as processes, one VM with a 4 GiB disk, 1 s points.
pub struct Stack {
    insecure: Insecure,
    _registry: ServiceProcess,
    _cache: ServiceProcess,
    processor: ServiceProcess,
    agent: Killed,
    registry_url: String,
    processor_url: String,
    nbd: String,
    agent_log: PathBuf,
    source: PathBuf,
}

impl Stack {
    pub async fn start(dir: &Path) -> Result<Stack> {
        let insecure = Insecure::new();
        let (registry_addr, cache_addr) = (free_addr(), free_addr());
        let cache_url = format!("http://{cache_addr}");
        let registry_url = format!("http://{registry_addr}");
        let registry = ServiceProcess::start_at(
            &insecure,
            registry_addr,
            bin_path("registry-svc"),
            dir.join("registry"),
            &["--cache", &cache_url],
        );
        ferry_testkit::wait_serving(&registry_url).await;
        let cache = ServiceProcess::start_at(
            &insecure,
            cache_addr,
            bin_path("cache-svc"),
            dir.join("cache"),
            &["--registry", &registry_url],
        );
        let processor = ServiceProcess::start(
            &insecure,
            bin_path("processor-svc"),
            dir.join("processor"),
            &["--registry", &registry_url, "--cache", &cache_url],
        );
        let processor_url = processor.url();
        for url in [&cache_url, &processor_url] {
            ferry_testkit::wait_serving(url).await;
        }
        let day = Duration::from_secs(86400);
        ferry_testkit::create_policy(
            insecure.at(&registry_url),
            "bench",
            Duration::from_secs(1),
            day,
            day,
            day,
        )
        .await;
        let source = dir.join("ferry-source.raw");
        sparse_image(&source, DISK)?;
        ferry_testkit::protect_vm_with(
            insecure.at(&registry_url),
            "vm",
            &[("os", DISK, &source)],
            "bench",
        )
        .await;
        insecure.enroll(&registry_url, "vm").await;
        let nbd = free_addr().to_string();
        let agent_log = dir.join("agent.log");
        let log = std::fs::File::create(&agent_log)?;
        let agent = agent_command(&registry_url, "vm", AgentAuth::Token(&insecure))
            .args(["--nbd-listen", &nbd, "--group-listen", "off"])
            .arg("--state-dir")
            .arg(dir.join("agent"))
            .arg("--disk-root")
            .arg(dir)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start ferry-agent")?;
        let stack = Stack {
            insecure,
            _registry: registry,
            _cache: cache,
            processor,
            agent: Killed(agent),
            registry_url,
            processor_url,
            nbd,
            agent_log,
            source,
        };
        let (url, at) = (stack.registry_url.clone(), stack.insecure.clone());
        wait_for("PROTECTED", Duration::from_secs(120), || {
            let (url, at) = (url.clone(), at.clone());
            async move {
                ferry_testkit::protected_item(at.at(&url), "vm")
                    .await
                    .filter(|i| i.state() == reg::ReplicationState::Protected)
            }
        })
        .await;
        listening(&stack.nbd).await;
        Ok(stack)
    }

    fn overflows(&self) -> u64 {
        std::fs::read_to_string(&self.agent_log)
            .map(|s| s.matches("replication buffer full").count() as u64)
            .unwrap_or(0)
    }

    /// Writes `stamp` in the disk's last 4 KiB, then waits until the newest
    /// recovery point holds it; the seconds that took.
    async fn until_point_holds_stamp(&self, stamp: u64) -> Result<f64> {
        let offset = DISK - 4096;
        let bytes: Vec<u8> = stamp
            .to_le_bytes()
            .iter()
            .copied()
            .cycle()
            .take(4096)
            .collect();
        let (nbd, data) = (self.nbd.clone(), bytes.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mut client = ferry_testkit::nbd::Nbd::go(&nbd, "os")
                .map_err(|e| anyhow::anyhow!("attach the agent's export: {e:?}"))?;
            client.write(offset, &data)?;
            Ok(())
        })
        .await??;
        let t = Instant::now();
        let mut processor = ProcessorClient::new(
            self.insecure
                .at(&self.processor_url)
                .as_service(ferry_runtime::security::ServiceKind::Failover),
        );
        let deadline = t + Duration::from_secs(600);
        loop {
            if self.holds(&mut processor, offset, &bytes).await? {
                return Ok(t.elapsed().as_secs_f64());
            }
            if Instant::now() > deadline {
                bail!("no recovery point holds the last write after 600 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn holds(
        &self,
        processor: &mut ProcessorClient<ferry_testkit::insecure::TestChannel>,
        offset: u64,
        want: &[u8],
    ) -> Result<bool> {
        let points = processor
            .list_recovery_points(proc::ListRecoveryPointsRequest {
                vm_name: "vm".into(),
                limit: 1,
                ..Default::default()
            })
            .await?
            .into_inner()
            .points;
        let Some(newest) = points.first() else {
            return Ok(false);
        };
        let mut stream = processor
            .read_disk(proc::ReadDiskRequest {
                vm_name: "vm".into(),
                point_id: newest.id.clone(),
                disk_id: "os".into(),
                offset,
                length: want.len() as u64,
            })
            .await?
            .into_inner();
        let mut got = Vec::new();
        while let Some(extent) = stream.message().await? {
            match extent.content {
                Some(proc::disk_extent::Content::Data(d)) => got.extend_from_slice(&d),
                _ => got.resize(got.len() + extent.length as usize, 0),
            }
        }
        Ok(got == want)
    }

    /// Runs `job` against the agent's export while sampling the RPO, then
    /// measures the catch-up.
    pub async fn run(&self, job: &Job, stamp: u64) -> Result<Ferry> {
        let before = self.overflows();
        let (nbd, j) = (self.nbd.clone(), job.clone());
        let writer_done = ferry_runtime::CancellationToken::new();
        let sampler = tokio::spawn(sample_rpo(
            ProcessorClient::new(
                self.insecure
                    .at(&self.processor_url)
                    .as_service(ferry_runtime::security::ServiceKind::Failover),
            ),
            writer_done.clone(),
        ));
        let fio = tokio::task::spawn_blocking(move || fio(&nbd, "os", &j)).await;
        writer_done.cancel();
        let rpo = sampler.await?;
        let fio = fio??;
        let catch_up_secs = self.until_point_holds_stamp(stamp).await?;
        Ok(Ferry {
            fio,
            overflows: self.overflows() - before,
            catch_up_secs,
            agent_rss_mib: peak_rss_mib(self.agent.0.id()),
            processor_rss_mib: peak_rss_mib(self.processor.child.id()),
            rpo,
        })
    }

    pub fn stop(self) -> Result<()> {
        let source = self.source.clone();
        drop(self);
        std::fs::remove_file(source)?;
        Ok(())
    }
}

/// Every 250 ms until `done`: the RPO a failover at that moment would
/// have, now minus the time of the newest write held by the newest point
/// (no sample while there is no point yet).
async fn sample_rpo(
    mut processor: ProcessorClient<ferry_testkit::insecure::TestChannel>,
    done: ferry_runtime::CancellationToken,
) -> Vec<(f64, f64)> {
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = done.cancelled() => return samples,
            _ = tick.tick() => {}
        }
        let newest = processor
            .list_recovery_points(proc::ListRecoveryPointsRequest {
                vm_name: "vm".into(),
                limit: 1,
                ..Default::default()
            })
            .await
            .ok()
            .and_then(|r| r.into_inner().points.into_iter().next())
            .and_then(|p| p.time);
        if let Some(t) = newest {
            let written = t.seconds as f64 + f64::from(t.nanos) / 1e9;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            samples.push((started.elapsed().as_secs_f64(), (now - written).max(0.0)));
        }
    }
}

/// A process's peak resident set (VmHWM), MiB; 0 when unknown.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// min, median, max.
pub fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => (0.0, 0.0, 0.0),
        n => (v[0], v[n / 2], v[n - 1]),
    }
}

/// Every run's figures.
#[derive(Default)]
pub struct Results {
    pub qemu_nbd: Vec<Vec<Fio>>,
    pub mirror: Vec<Vec<Fio>>,
    pub ferry: Vec<Vec<Ferry>>,
}

/// `runs` rounds of every job against every export.
pub async fn measure(dir: &Path, jobs: &[Job], runs: usize) -> Result<Results> {
    let mut results = Results {
        qemu_nbd: vec![Vec::new(); jobs.len()],
        mirror: vec![Vec::new(); jobs.len()],
        ferry: vec![Vec::new(); jobs.len()],
    };
    for run in 1..=runs {
        for (j, job) in jobs.iter().enumerate() {
            eprintln!("run {run}/{runs}: {} (qemu-nbd)", job.name);
            results.qemu_nbd[j].push(qemu_nbd_run(dir, job).await?);
            eprintln!(
                "run {run}/{runs}: {} (qemu-storage-daemon mirror)",
                job.name
            );
            results.mirror[j].push(mirror_run(dir, job).await?);
        }
        let work = tempfile::tempdir_in(dir)?;
        let stack = Stack::start(work.path()).await?;
        for (j, job) in jobs.iter().enumerate() {
            eprintln!("run {run}/{runs}: {} (Ferry)", job.name);
            let stamp = (run * 100 + j) as u64;
            results.ferry[j].push(stack.run(job, stamp).await?);
        }
        stack.stop()?;
    }
    Ok(results)
}

fn cell(values: &[f64], decimals: usize) -> String {
    let (lo, mid, hi) = spread(values);
    format!("{mid:.decimals$} ({lo:.decimals$}–{hi:.decimals$})")
}

/// The table, as Markdown: per job, each export's MiB/s, IOPS and p99
/// (median, min–max), and Ferry's over qemu-nbd's medians.
pub fn table(jobs: &[Job], r: &Results) -> String {
    let mut out = String::new();
    out.push_str("| job | export | MiB/s | IOPS | p99 latency ms | vs qemu-nbd (MiB/s; p99) |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for (j, job) in jobs.iter().enumerate() {
        let base = &r.qemu_nbd[j];
        let base_mibs = spread(&base.iter().map(|f| f.mibs).collect::<Vec<_>>()).1;
        let base_p99 = spread(&base.iter().map(|f| f.p99_ms).collect::<Vec<_>>()).1;
        let ferry: Vec<Fio> = r.ferry[j].iter().map(|f| f.fio).collect();
        for (name, figures) in [(QEMU_NBD, base), (MIRROR, &r.mirror[j]), (FERRY, &ferry)] {
            let mibs: Vec<f64> = figures.iter().map(|f| f.mibs).collect();
            let iops: Vec<f64> = figures.iter().map(|f| f.iops).collect();
            let p99: Vec<f64> = figures.iter().map(|f| f.p99_ms).collect();
            out.push_str(&format!(
                "| {} | {name} | {} | {} | {} | {:.2}×; {:.2}× |\n",
                job.name,
                cell(&mibs, 1),
                cell(&iops, 0),
                cell(&p99, 2),
                spread(&mibs).1 / base_mibs.max(f64::MIN_POSITIVE),
                spread(&p99).1 / base_p99.max(f64::MIN_POSITIVE),
            ));
        }
    }
    out.push_str("\n| job | Ferry: buffer overflows | writer stopped → in a point, s | agent peak RSS MiB | processor-svc peak RSS MiB |\n");
    out.push_str("|---|---|---|---|---|\n");
    for (j, job) in jobs.iter().enumerate() {
        let f = &r.ferry[j];
        let of = |g: fn(&Ferry) -> f64| f.iter().map(g).collect::<Vec<f64>>();
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            job.name,
            cell(&of(|x| x.overflows as f64), 0),
            cell(&of(|x| x.catch_up_secs), 2),
            cell(&of(|x| x.agent_rss_mib), 0),
            cell(&of(|x| x.processor_rss_mib), 0),
        ));
    }
    out
}

/// The figures the report plots: every export's spread per job, and the
/// RPO series of the 4 KiB random job's Ferry runs.
pub fn figures(jobs: &[Job], r: &Results) -> CompareFigures {
    let bars = |name: &str, figures: &[Fio]| Bar {
        export: name.to_string(),
        mibs: Spread::of(&figures.iter().map(|f| f.mibs).collect::<Vec<_>>()),
        iops: Spread::of(&figures.iter().map(|f| f.iops).collect::<Vec<_>>()),
        p99_ms: Spread::of(&figures.iter().map(|f| f.p99_ms).collect::<Vec<_>>()),
    };
    let mut out = CompareFigures::default();
    for (j, job) in jobs.iter().enumerate() {
        let ferry: Vec<Fio> = r.ferry[j].iter().map(|f| f.fio).collect();
        out.jobs.push((
            job.name.to_string(),
            vec![
                bars(QEMU_NBD, &r.qemu_nbd[j]),
                bars(MIRROR, &r.mirror[j]),
                bars(FERRY, &ferry),
            ],
        ));
        if job.name.starts_with("4 KiB") {
            out.rpo_job = job.name.to_string();
            out.rpo = r.ferry[j].iter().map(|f| f.rpo.clone()).collect();
        }
    }
    out
}

pub async fn run(
    dir: &Path,
    seq_mib: u64,
    random_secs: u64,
    runs: usize,
    figures_to: Option<&Path>,
) -> Result<()> {
    let jobs = jobs(seq_mib, random_secs);
    let results = measure(dir, &jobs, runs).await?;
    if let Some(path) = figures_to {
        crate::plots::save(path, &figures(&jobs, &results))?;
    }
    println!(
        "fio (nbd engine) against exports of a raw 4 GiB image in {}; median (min–max) of {runs} runs",
        dir.display()
    );
    print!("{}", table(&jobs, &results));
    Ok(())
}
