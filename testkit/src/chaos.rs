//! Chaos: the four services and ferry-agent as real processes, a
//! [`FaultProxy`] on the agent's and processor-svc's links to the cache and
//! on every link to registry, qemu-io writing seeded data through the
//! agent's NBD export, and SIGKILLs and partitions drawn from one seed.
//! Then everything is healed and the VM failed over PLANNED: its target
//! disks must equal the source images, and the source images must hold
//! every write qemu-io saw complete.
//!
//! Shared by `tests/tests/chaos.rs` (a bounded run in CI) and
//! `ferry-loadgen chaos --minutes N` (a soak).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::cache::v1 as cache;
use ferry_proto::cache::v1::cache_client::CacheClient;
use ferry_proto::failover::v1 as fo;
use ferry_proto::failover::v1::failover_client::FailoverClient;
use ferry_proto::processor::v1 as pb;
use ferry_proto::registry::v1 as reg;

use crate::{bin_path, free_addr, identical_images, wait_for, FaultProxy, Rng};

/// The VM's disks: (id, size).
pub const DISKS: [(&str, u64); 2] = [("os", 8 << 20), ("data", 4 << 20)];
const SECTOR: u64 = 512;
/// Largest write; the pattern files are this long, so a write's bytes are
/// a pattern file's first `len` bytes.
const MAX_WRITE: u64 = 128 << 10;
const PATTERN_FILES: usize = 8;

/// What a run does.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub seed: u64,
    /// SIGKILLs (each followed by a restart), spread over the services and
    /// the agent; each is killed at least once when there are 5 or more.
    pub kills: usize,
    /// Network faults (a cut or a blackhole, then restore), spread over
    /// the proxied links; each link at least once when there are 3 or more.
    pub faults: usize,
    /// The mean time between two events.
    pub pace: Duration,
    /// Where the run's directory goes (the system's temporary directory
    /// when None). It is kept, with every process's log, when the run
    /// fails, and removed when it succeeds.
    pub dir: Option<PathBuf>,
}

impl ChaosOptions {
    /// The bounded run CI makes: 22 kills and 6 faults about 2.2 s apart.
    pub fn ci(seed: u64) -> ChaosOptions {
        ChaosOptions {
            seed,
            kills: 22,
            faults: 6,
            pace: Duration::from_millis(2200),
            dir: None,
        }
    }

    /// A soak of about `minutes` of chaos at the CI run's pace and mix.
    pub fn soak(seed: u64, minutes: u64) -> ChaosOptions {
        let ci = ChaosOptions::ci(seed);
        let events = (minutes * 60 * 1000 / ci.pace.as_millis() as u64).max(1) as usize;
        let faults = (events * ci.faults).div_ceil(ci.kills + ci.faults);
        ChaosOptions {
            kills: events - faults,
            faults,
            ..ci
        }
    }
}

/// What a run survived, and how the failover came out.
#[derive(Debug, Default, Clone)]
pub struct ChaosReport {
    pub seed: u64,
    /// SIGKILLs by process.
    pub kills: BTreeMap<&'static str, usize>,
    /// Clean stops (SIGTERM) by process, each followed by a start.
    pub stops: BTreeMap<&'static str, usize>,
    /// Network faults by kind and link ("cut agent→cache").
    pub faults: BTreeMap<String, usize>,
    /// Times the agent exited of its own accord and was started again (it
    /// needs registry and the cache at start; see docs/reliability.md).
    pub agent_exits: usize,
    /// qemu-io invocations: all writes completed / some failed or were
    /// cut off / the export was not there (the agent down).
    pub batches_ok: usize,
    pub batches_failed: usize,
    pub batches_refused: usize,
    /// Writes qemu-io saw complete, their bytes, and writes that failed
    /// or were cut off (their ranges may hold old or new data).
    pub writes_completed: usize,
    pub bytes_completed: u64,
    pub writes_uncertain: usize,
    /// The slowest qemu-io invocation that completed every write.
    pub slowest_batch: Duration,
    pub chaos: Duration,
    /// From healed to PROTECTED with the agent streaming.
    pub heal: Duration,
    /// The planned failover job, start to end.
    pub failover: Duration,
    pub failover_job: String,
    pub final_point: String,
    pub final_sequence: u64,
    /// Bytes of the source disks compared with the target disks.
    pub bytes_compared: u64,
}

impl ChaosReport {
    pub fn total_kills(&self) -> usize {
        self.kills.values().sum()
    }

    pub fn total_faults(&self) -> usize {
        self.faults.values().sum()
    }
}

impl fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |m: Vec<(String, usize)>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(f, "chaos seed {:#x}", self.seed)?;
        writeln!(
            f,
            "  kills survived: {} ({})",
            self.total_kills(),
            list(
                self.kills
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect()
            )
        )?;
        writeln!(
            f,
            "  clean stops (SIGTERM) and starts: {} ({})",
            self.stops.values().sum::<usize>(),
            list(
                self.stops
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect()
            )
        )?;
        writeln!(
            f,
            "  network faults survived: {} ({})",
            self.total_faults(),
            list(self.faults.iter().map(|(k, v)| (k.clone(), *v)).collect())
        )?;
        writeln!(
            f,
            "  agent exits at start-up (restarted): {}",
            self.agent_exits
        )?;
        writeln!(
            f,
            "  qemu-io batches: {} complete, {} cut off, {} refused (agent down); slowest complete {:.1?}",
            self.batches_ok, self.batches_failed, self.batches_refused, self.slowest_batch
        )?;
        writeln!(
            f,
            "  writes completed: {} ({} bytes); uncertain: {}",
            self.writes_completed, self.bytes_completed, self.writes_uncertain
        )?;
        writeln!(
            f,
            "  chaos {:.1?}; healed to PROTECTED in {:.1?}; planned failover {} in {:.1?}",
            self.chaos, self.heal, self.failover_job, self.failover
        )?;
        write!(
            f,
            "  final point {} at sequence {}: target disks identical to the source ({} bytes)",
            self.final_point, self.final_sequence, self.bytes_compared
        )
    }
}

/// The seed from `FERRY_TEST_SEED` (hex, `0x` optional), else `default`.
pub fn seed_from_env(default: u64) -> u64 {
    std::env::var("FERRY_TEST_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
        .unwrap_or(default)
}

// Processes.

/// A binary run as a child process, its output appended to a log file,
/// started again with the same arguments.
struct Proc {
    name: &'static str,
    binary: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// Killed on purpose and not started again yet.
    down: bool,
}

impl Proc {
    fn new(name: &'static str, binary: PathBuf, args: Vec<String>, log: PathBuf) -> Proc {
        let mut p = Proc {
            name,
            binary,
            args,
            log,
            child: None,
            down: false,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open a process log");
        let level = std::env::var("FERRY_CHAOS_LOG").unwrap_or_else(|_| "warn".into());
        let child = Command::new(&self.binary)
            .args(&self.args)
            .env("FERRY_LOG", level)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.child = Some(child);
        self.down = false;
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.down = true;
    }

    /// The exit status, if it exited without being killed.
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.down {
            return None;
        }
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

const REGISTRY: usize = 0;
const CACHE: usize = 1;
const PROCESSOR: usize = 2;
const FAILOVER: usize = 3;
const AGENT: usize = 4;
const NAMES: [&str; 5] = [
    "registry-svc",
    "cache-svc",
    "processor-svc",
    "failover-svc",
    "ferry-agent",
];
/// How often each is picked for a kill beyond the first round, in
/// twentieths: the data path more often than the control plane.
const KILL_WEIGHTS: [u64; 5] = [3, 5, 5, 2, 5];

/// The links with a proxy.
const LINKS: [&str; 3] = ["agent→cache", "processor→cache", "all→registry"];

/// The processes, the proxies in front of the cache and registry, and the
/// services' own addresses (which the run's checks use, unproxied).
struct Stack {
    procs: Arc<Mutex<Vec<Proc>>>,
    /// In the order of [`LINKS`].
    proxies: Vec<Arc<FaultProxy>>,
    registry: String,
    cache: String,
    processor: String,
    failover: String,
    nbd: String,
    agent_args: Vec<String>,
    dir: PathBuf,
}

impl Stack {
    /// Starts the four services, each reaching the cache and registry
    /// through its proxy, and waits until they are SERVING.
    async fn start(dir: &Path) -> Stack {
        let addrs = [free_addr(), free_addr(), free_addr(), free_addr()];
        let [registry, cache, processor, failover] = addrs.map(|a| format!("http://{a}"));
        let agent_cache = Arc::new(FaultProxy::start(addrs[CACHE]).await);
        let processor_cache = Arc::new(FaultProxy::start(addrs[CACHE]).await);
        let to_registry = Arc::new(FaultProxy::start(addrs[REGISTRY]).await);
        let via_registry = to_registry.url();
        // Small segments, so that the cache rolls and trims during the run.
        let cache_toml = dir.join("cache.toml");
        std::fs::write(&cache_toml, "[cache]\nsegment_bytes = 1048576\n").unwrap();
        let service = |name: &str, addr: std::net::SocketAddr, extra: &[&str]| -> Vec<String> {
            let mut args = vec![
                "--listen".to_string(),
                addr.to_string(),
                "--data-dir".to_string(),
                dir.join(name).display().to_string(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            args
        };
        let specs = [
            service(
                "registry",
                addrs[REGISTRY],
                &["--cache", &agent_cache.url()],
            ),
            service(
                "cache",
                addrs[CACHE],
                &[
                    "--registry",
                    &via_registry,
                    "--config",
                    cache_toml.to_str().unwrap(),
                ],
            ),
            service(
                "processor",
                addrs[PROCESSOR],
                &[
                    "--registry",
                    &via_registry,
                    "--cache",
                    &processor_cache.url(),
                ],
            ),
            service(
                "failover",
                addrs[FAILOVER],
                &[
                    "--registry",
                    &via_registry,
                    "--processor",
                    &processor,
                    "--cache",
                    &cache,
                ],
            ),
        ];
        let procs: Vec<Proc> = specs
            .into_iter()
            .zip(NAMES)
            .map(|(args, name)| {
                Proc::new(name, bin_path(name), args, dir.join(format!("{name}.log")))
            })
            .collect();
        for url in [&registry, &cache, &processor, &failover] {
            crate::wait_serving(url).await;
        }
        let nbd = free_addr().to_string();
        let agent_args = [
            "--registry",
            &via_registry,
            "--vm",
            "vm",
            "--nbd-listen",
            &nbd,
            "--group-listen",
            "off",
            "--drain-secs",
            "1",
            "--state-dir",
            &dir.join("agent").display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        Stack {
            procs: Arc::new(Mutex::new(procs)),
            proxies: vec![agent_cache, processor_cache, to_registry],
            registry,
            cache,
            processor,
            failover,
            nbd,
            agent_args,
            dir: dir.to_path_buf(),
        }
    }

    fn note(&self, what: &str) {
        note_in(&self.dir, what);
    }

    fn start_agent(&self) {
        let name = NAMES[AGENT];
        let agent = Proc::new(
            name,
            bin_path(name),
            self.agent_args.clone(),
            self.dir.join(format!("{name}.log")),
        );
        self.procs.lock().unwrap().push(agent);
    }

    fn kill(&self, which: usize) {
        self.procs.lock().unwrap()[which].kill();
    }

    /// SIGTERM, and the exit awaited: Err unless it exits 0 within 20 s
    /// (then it is killed).
    async fn terminate(&self, which: usize) -> Result<(), String> {
        let pid = {
            let mut procs = self.procs.lock().unwrap();
            let p = &mut procs[which];
            // Not the supervisor's to restart.
            p.down = true;
            p.child.as_ref().map(Child::id)
        };
        let Some(pid) = pid else {
            return Ok(());
        };
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = {
                let mut procs = self.procs.lock().unwrap();
                let p = &mut procs[which];
                match p.child.as_mut().map(Child::try_wait) {
                    Some(Ok(Some(status))) => {
                        p.child = None;
                        Some(status)
                    }
                    _ => None,
                }
            };
            match status {
                Some(s) if s.success() => return Ok(()),
                Some(s) => return Err(format!("{} exited {s} after SIGTERM", NAMES[which])),
                None if Instant::now() >= deadline => {
                    self.kill(which);
                    return Err(format!(
                        "{} did not exit within 20 s of SIGTERM",
                        NAMES[which]
                    ));
                }
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn restart(&self, which: usize) {
        self.procs.lock().unwrap()[which].spawn();
    }

    /// The log tails of every process, for a failure's message.
    fn logs(&self) -> String {
        let procs = self.procs.lock().unwrap();
        let events = std::fs::read_to_string(self.dir.join("events.log")).unwrap_or_default();
        let events: Vec<&str> = events.lines().collect();
        let mut out = format!(
            "--- the last chaos events (events.log)\n{}",
            events[events.len().saturating_sub(30)..].join("\n")
        );
        for p in procs.iter() {
            out += &format!(
                "\n--- {} (last lines of {})\n{}",
                p.name,
                p.log.display(),
                p.log_tail(15)
            );
        }
        out
    }
}

/// Appends a line to the run's `events.log`, stamped with the time of day
/// in UTC as the processes' logs are.
fn note_in(dir: &Path, what: &str) {
    use std::io::Write as _;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    if let Ok(mut f) = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("events.log"))
    {
        let day = now.as_secs() % 86400;
        let (h, m, sec) = (day / 3600, day / 60 % 60, day % 60);
        let ms = now.subsec_millis();
        let _ = writeln!(f, "{h:02}:{m:02}:{sec:02}.{ms:03}Z {what}");
    }
}

/// Restarts whatever exits without being killed: the agent, as a service
/// manager would (it exits when registry or the cache is away at its
/// start); a service exiting is a failure, noted and restarted.
struct Supervisor {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Supervisor {
    fn start(procs: Arc<Mutex<Vec<Proc>>>, dir: PathBuf) -> Supervisor {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut agent_exits, mut unexpected) = (0, Vec::new());
            let mut exited: BTreeMap<usize, Instant> = BTreeMap::new();
            while !flag.load(Ordering::Relaxed) {
                {
                    let mut procs = procs.lock().unwrap();
                    for (i, p) in procs.iter_mut().enumerate() {
                        if let Some(status) = p.exited() {
                            note_in(&dir, &format!("{} exited by itself: {status}", p.name));
                            if i == AGENT {
                                agent_exits += 1;
                            } else {
                                unexpected.push(format!(
                                    "{} exited by itself ({status}):\n{}",
                                    p.name,
                                    p.log_tail(20)
                                ));
                            }
                            exited.insert(i, Instant::now());
                        }
                        // Started again a second later, as a service
                        // manager's restart delay.
                        if exited
                            .get(&i)
                            .is_some_and(|t| t.elapsed() >= Duration::from_secs(1))
                        {
                            exited.remove(&i);
                            if p.child.is_none() && !p.down {
                                p.spawn();
                                note_in(&dir, &format!("start {} again", p.name));
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (agent_exits, unexpected)
        });
        Supervisor { stop, task }
    }

    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the supervisor")
    }
}

// The VM's writes and what they must leave on its disks.

#[derive(Debug, Clone, Copy)]
enum Content {
    /// Every byte this one (`write -P`).
    Pattern(u8),
    /// The first bytes of pattern file k (`write -s`).
    File(usize),
    /// Zeroes (`write -z`, with `-u`: the export may unmap).
    Zero { unmap: bool },
}

#[derive(Debug, Clone, Copy)]
struct Write {
    offset: u64,
    len: u64,
    content: Content,
}

impl Write {
    fn command(&self, files: &[PathBuf]) -> String {
        let (o, l) = (self.offset, self.len);
        match self.content {
            Content::Pattern(p) => format!("write -P {p} {o} {l}"),
            Content::File(k) => format!("write -s {} {o} {l}", files[k].display()),
            Content::Zero { unmap: false } => format!("write -z {o} {l}"),
            Content::Zero { unmap: true } => format!("write -z -u {o} {l}"),
        }
    }
}

/// The disks as the completed writes left them, and the sectors a failed
/// write may have touched (old or new data both right there).
struct Reference {
    disks: Vec<Vec<u8>>,
    uncertain: Vec<Vec<bool>>,
    patterns: Vec<Vec<u8>>,
}

impl Reference {
    fn completed(&mut self, disk: usize, w: &Write) {
        let range = w.offset as usize..(w.offset + w.len) as usize;
        let target = &mut self.disks[disk][range];
        match w.content {
            Content::Pattern(p) => target.fill(p),
            Content::File(k) => target.copy_from_slice(&self.patterns[k][..w.len as usize]),
            Content::Zero { .. } => target.fill(0),
        }
        let sectors = (w.offset / SECTOR) as usize..((w.offset + w.len) / SECTOR) as usize;
        self.uncertain[disk][sectors].fill(false);
    }

    fn uncertain(&mut self, disk: usize, w: &Write) {
        let sectors = (w.offset / SECTOR) as usize..((w.offset + w.len) / SECTOR) as usize;
        self.uncertain[disk][sectors].fill(true);
    }

    /// Where `image` (disk `disk`) differs from the reference outside the
    /// uncertain sectors: up to 8 sector offsets, and how many in all.
    fn differences(&self, disk: usize, image: &[u8]) -> (Vec<u64>, usize) {
        let want = &self.disks[disk];
        let mut first = Vec::new();
        let mut count = 0;
        for (s, uncertain) in self.uncertain[disk].iter().enumerate() {
            let range = s * SECTOR as usize..(s + 1) * SECTOR as usize;
            if !uncertain && image.get(range.clone()) != want.get(range) {
                count += 1;
                if first.len() < 8 {
                    first.push(s as u64 * SECTOR);
                }
            }
        }
        (first, count)
    }
}

#[derive(Default)]
struct WriterStats {
    ok: usize,
    failed: usize,
    refused: usize,
    completed: usize,
    bytes: u64,
    uncertain: usize,
    slowest: Duration,
    /// qemu-io invocations that had to be killed: a VM write that hung.
    hung: Vec<String>,
}

/// How long one qemu-io invocation may take before the VM's disk counts
/// as hung (promise 1: a VM write never waits on replication).
const BATCH_BOUND: Duration = Duration::from_secs(30);

/// qemu-io through the agent's export, batches of seeded writes in a
/// loop until stopped, each write journaled as completed (qemu-io printed
/// "wrote") or uncertain.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Reference, WriterStats)>,
}

impl Writer {
    fn start(
        seed: u64,
        nbd: String,
        reference: Reference,
        files: Vec<PathBuf>,
        dir: PathBuf,
    ) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut reference = reference;
            let mut stats = WriterStats::default();
            let mut rng = Rng(seed ^ 0x00c0_ffee_0000_0001);
            while !flag.load(Ordering::Relaxed) {
                let disk = (rng.next() % DISKS.len() as u64) as usize;
                let writes = draw_writes(&mut rng, DISKS[disk].1);
                let started = Instant::now();
                let outcome = qemu_io(&nbd, DISKS[disk].0, &writes, &files);
                let took = started.elapsed();
                match outcome {
                    Batch::Refused => stats.refused += 1,
                    Batch::Ran { completed, hung } => {
                        if completed.iter().all(|c| *c) && !hung {
                            stats.ok += 1;
                            stats.slowest = stats.slowest.max(took);
                        } else {
                            stats.failed += 1;
                            let done = completed.iter().filter(|c| **c).count();
                            note_in(
                                &dir,
                                &format!(
                                    "qemu-io to {}: {done} of {} writes completed{}",
                                    DISKS[disk].0,
                                    writes.len(),
                                    if hung { ", hung" } else { "" }
                                ),
                            );
                        }
                        if hung {
                            stats.hung.push(format!(
                                "{} writes to {} not done after {took:?}",
                                writes.len(),
                                DISKS[disk].0
                            ));
                        }
                        for (w, done) in writes.iter().zip(completed) {
                            if done {
                                stats.completed += 1;
                                stats.bytes += w.len;
                                reference.completed(disk, w);
                            } else {
                                stats.uncertain += 1;
                                reference.uncertain(disk, w);
                            }
                        }
                    }
                }
                // Pacing, so that the services have CPU too.
                std::thread::sleep(Duration::from_millis(50 + rng.next() % 200));
            }
            (reference, stats)
        });
        Writer { stop, thread }
    }

    async fn stop(self) -> (Reference, WriterStats) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join().expect("the writer"))
            .await
            .expect("join the writer")
    }
}

/// 8 to 32 writes at distinct (offset, length), mostly small, some up to
/// [`MAX_WRITE`], sector-aligned.
fn draw_writes(rng: &mut Rng, size: u64) -> Vec<Write> {
    let n = 8 + rng.next() % 25;
    let mut seen = std::collections::BTreeSet::new();
    let mut writes = Vec::new();
    for _ in 0..n {
        let sectors = match rng.next() % 20 {
            0..=9 => 1 + rng.next() % 8,
            10..=16 => 1 + rng.next() % (64 << 10) / SECTOR,
            _ => 1 + rng.next() % (MAX_WRITE / SECTOR),
        };
        let len = sectors * SECTOR;
        let offset = rng.next() % ((size - len) / SECTOR + 1) * SECTOR;
        let content = match rng.next() % 20 {
            0..=13 => Content::File((rng.next() % PATTERN_FILES as u64) as usize),
            14..=17 => Content::Pattern((1 + rng.next() % 255) as u8),
            _ => Content::Zero {
                unmap: rng.next().is_multiple_of(2),
            },
        };
        // Distinct, so that qemu-io's "wrote <len> bytes at offset <o>"
        // names exactly one of them.
        if seen.insert((offset, len)) {
            writes.push(Write {
                offset,
                len,
                content,
            });
        }
    }
    writes
}

enum Batch {
    /// qemu-io could not attach (the agent was down): nothing written.
    Refused,
    /// Which writes qemu-io saw complete; hung if it had to be killed.
    Ran { completed: Vec<bool>, hung: bool },
}

/// One qemu-io invocation with every write as a `-c` command.
fn qemu_io(nbd: &str, disk: &str, writes: &[Write], files: &[PathBuf]) -> Batch {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for w in writes {
        command.arg("-c").arg(w.command(files));
    }
    command
        .arg(format!("nbd://{nbd}/{disk}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("qemu-io is missing ({e}); scripts/test.sh installs it"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let (output, hung) = match rx.recv_timeout(BATCH_BOUND) {
        Ok(output) => (output, false),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            (rx.recv().expect("qemu-io's output"), true)
        }
    };
    let output = output.expect("wait for qemu-io");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // "wrote 4096/4096 bytes at offset 8192", in command order.
    let done: Vec<(u64, u64)> = stdout
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("wrote ")?;
            let (counts, offset) = rest.split_once(" bytes at offset ")?;
            let (n, _) = counts.split_once('/')?;
            Some((offset.trim().parse().ok()?, n.parse().ok()?))
        })
        .collect();
    if done.is_empty() && stderr.contains("can't open device") {
        return Batch::Refused;
    }
    let mut next = done.iter().peekable();
    let completed = writes
        .iter()
        .map(|w| {
            let hit = next.peek() == Some(&&(w.offset, w.len));
            if hit {
                next.next();
            }
            hit
        })
        .collect();
    Batch::Ran { completed, hung }
}

/// Seeded source images: a few MiB of data scattered over each disk
/// before protection (initial replication copies it), and the pattern
/// files the writes use.
fn prepare(dir: &Path, rng: &mut Rng) -> (Vec<PathBuf>, Reference, Vec<PathBuf>) {
    let mut bytes = |n: usize| -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&rng.next().to_le_bytes());
        }
        out.truncate(n);
        out
    };
    let files: Vec<PathBuf> = (0..PATTERN_FILES)
        .map(|k| {
            let path = dir.join(format!("pattern-{k}.bin"));
            std::fs::write(&path, bytes(MAX_WRITE as usize)).unwrap();
            path
        })
        .collect();
    let patterns = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let mut sources = Vec::new();
    let mut disks = Vec::new();
    for (id, size) in DISKS {
        let mut image = vec![0u8; size as usize];
        // Every other 256 KiB block holds data; the rest are holes.
        for block in (0..size / (256 << 10)).step_by(2) {
            let at = (block * (256 << 10)) as usize;
            image[at..at + (256 << 10)].copy_from_slice(&bytes(256 << 10));
        }
        let path = dir.join(format!("{id}.raw"));
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        use std::os::unix::fs::FileExt;
        for block in (0..size / (256 << 10)).step_by(2) {
            let at = block * (256 << 10);
            f.write_all_at(&image[at as usize..(at + (256 << 10)) as usize], at)
                .unwrap();
        }
        f.sync_all().unwrap();
        sources.push(path);
        disks.push(image);
    }
    let uncertain = DISKS
        .iter()
        .map(|(_, size)| vec![false; (size / SECTOR) as usize])
        .collect();
    (
        sources,
        Reference {
            disks,
            uncertain,
            patterns,
        },
        files,
    )
}

// The chaos.

#[derive(Debug, Clone)]
enum Event {
    /// SIGKILL these (one, or two at once: the second while the first is
    /// down), each started again after its own delay.
    Kill(Vec<(usize, Duration)>),
    /// SIGTERM (a clean stop: the agent saves its changed-chunk map), then
    /// started again.
    Stop(usize),
    /// Link (index into [`LINKS`]), cut (else blackhole), for how long.
    Fault(usize, bool, Duration),
}

fn weighted(rng: &mut Rng) -> usize {
    let total: u64 = KILL_WEIGHTS.iter().sum();
    let mut pick = rng.next() % total;
    for (i, w) in KILL_WEIGHTS.iter().enumerate() {
        if pick < *w {
            return i;
        }
        pick -= w;
    }
    AGENT
}

/// The run's events from the seed: every process killed once and every
/// link faulted once first (when there are enough), the rest drawn by
/// weight; about one kill in three takes a second process down with it;
/// a clean stop for every eight kills; all shuffled.
fn plan(rng: &mut Rng, kills: usize, faults: usize) -> Vec<Event> {
    let mut events = Vec::new();
    let down = |rng: &mut Rng| Duration::from_millis(rng.next() % 1500);
    let mut i = 0;
    while i < kills {
        let which = if kills >= NAMES.len() && i < NAMES.len() {
            i
        } else {
            weighted(rng)
        };
        let mut victims = vec![(which, down(rng))];
        if i + 1 < kills && i >= NAMES.len() && rng.next().is_multiple_of(3) {
            let other = weighted(rng);
            if other != which {
                victims.push((other, down(rng)));
            }
        }
        i += victims.len();
        events.push(Event::Kill(victims));
    }
    for _ in 0..kills / 8 {
        // Mostly the agent, whose clean stop saves its map.
        let which = if rng.next().is_multiple_of(2) {
            AGENT
        } else {
            weighted(rng)
        };
        events.push(Event::Stop(which));
    }
    for i in 0..faults {
        let link = if faults >= LINKS.len() && i < LINKS.len() {
            i
        } else {
            (rng.next() % LINKS.len() as u64) as usize
        };
        let cut = rng.next().is_multiple_of(2);
        let lasts = Duration::from_millis(1000 + rng.next() % 4000);
        events.push(Event::Fault(link, cut, lasts));
    }
    for i in (1..events.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        events.swap(i, j);
    }
    events
}

/// Runs the chaos of `options` to its end and checks the outcome;
/// panics (keeping the run's directory and naming it) when something is
/// wrong.
pub async fn run(options: ChaosOptions) -> ChaosReport {
    let seed = options.seed;
    let mut rng = Rng(seed.max(1));
    let base = options.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::Builder::new()
        .prefix(&format!("ferry-chaos-{seed:x}-"))
        .tempdir_in(&base)
        .unwrap()
        .keep();
    println!(
        "chaos seed {seed:#x}: {} kills, {} network faults about {:?} apart; logs in {}",
        options.kills,
        options.faults,
        options.pace,
        dir.display()
    );
    let mut report = ChaosReport {
        seed,
        ..Default::default()
    };
    let (sources, reference, files) = prepare(&dir, &mut rng);
    let stack = Stack::start(&dir).await;

    // Protect the VM: points every second.
    let day = Duration::from_secs(86400);
    crate::create_policy(
        &stack.registry,
        "chaos",
        Duration::from_secs(1),
        day,
        day,
        day,
    )
    .await;
    let disks: Vec<(&str, u64, &Path)> = DISKS
        .iter()
        .zip(&sources)
        .map(|((id, size), path)| (*id, *size, path.as_path()))
        .collect();
    crate::protect_vm_with(&stack.registry, "vm", &disks, "chaos").await;
    stack.start_agent();
    wait_for(
        "PROTECTED after initial replication",
        Duration::from_secs(120),
        || async {
            crate::protected_item(&stack.registry, "vm")
                .await
                .filter(|i| i.state() == reg::ReplicationState::Protected)
        },
    )
    .await;

    // Chaos while the VM writes.
    let supervisor = Supervisor::start(stack.procs.clone(), dir.clone());
    let writer = Writer::start(seed, stack.nbd.clone(), reference, files, dir.clone());
    let events = plan(&mut rng, options.kills, options.faults);
    let link_locks: Vec<Arc<tokio::sync::Mutex<()>>> =
        LINKS.iter().map(|_| Default::default()).collect();
    let mut faults = Vec::new();
    let mut stack_failures = Vec::new();
    let started = Instant::now();
    for event in events {
        let pause = options.pace / 2
            + Duration::from_millis(rng.next() % options.pace.as_millis().max(1) as u64);
        tokio::time::sleep(pause).await;
        match event {
            Event::Kill(victims) => {
                for (which, _) in &victims {
                    stack.note(&format!("kill {}", NAMES[*which]));
                    stack.kill(*which);
                    *report.kills.entry(NAMES[*which]).or_default() += 1;
                }
                // Each down for up to 1.5 s, then started again on the
                // same address and data.
                let mut order = victims.clone();
                order.sort_by_key(|(_, down)| *down);
                let mut waited = Duration::ZERO;
                for (which, down) in order {
                    tokio::time::sleep(down - waited).await;
                    waited = down;
                    stack.restart(which);
                    stack.note(&format!("start {}", NAMES[which]));
                }
            }
            Event::Stop(which) => {
                stack.note(&format!("stop {} (SIGTERM)", NAMES[which]));
                if let Err(why) = stack.terminate(which).await {
                    stack.note(&why);
                    stack_failures.push(why);
                }
                *report.stops.entry(NAMES[which]).or_default() += 1;
                stack.restart(which);
                stack.note(&format!("start {}", NAMES[which]));
            }
            Event::Fault(link, cut, lasts) => {
                let name = format!("{} {}", if cut { "cut" } else { "blackhole" }, LINKS[link]);
                *report.faults.entry(name.clone()).or_default() += 1;
                let (proxy, lock) = (stack.proxies[link].clone(), link_locks[link].clone());
                let (dir, note) = (stack.dir.clone(), name.clone());
                faults.push(tokio::spawn(async move {
                    let _one_at_a_time = lock.lock().await;
                    let stamp = |what: &str| note_in(&dir, what);
                    stamp(&format!("{note} for {lasts:?}"));
                    if cut {
                        proxy.cut();
                    } else {
                        proxy.blackhole();
                    }
                    tokio::time::sleep(lasts).await;
                    proxy.restore();
                    stamp(&format!("restore {}", LINKS[link]));
                }));
            }
        }
    }
    for fault in faults {
        fault.await.expect("a fault task");
    }
    for proxy in &stack.proxies {
        proxy.restore();
    }
    report.chaos = started.elapsed();
    let (reference, stats) = writer.stop().await;
    report.batches_ok = stats.ok;
    report.batches_failed = stats.failed;
    report.batches_refused = stats.refused;
    report.writes_completed = stats.completed;
    report.bytes_completed = stats.bytes;
    report.writes_uncertain = stats.uncertain;
    report.slowest_batch = stats.slowest;
    let fail = |what: String| -> ! {
        panic!(
            "chaos seed {seed:#x} (FERRY_TEST_SEED={seed:x} repeats the schedule): {what}\n\
             run directory kept: {}\n{}",
            dir.display(),
            stack.logs()
        )
    };
    if !stack_failures.is_empty() {
        fail(format!("clean stops failed: {stack_failures:?}"));
    }
    if !stats.hung.is_empty() {
        fail(format!("VM writes hung: {:?}", stats.hung));
    }

    stack.note("chaos over: every link restored, every process started");

    // Healed: every link restored, every process running (the supervisor
    // restarts an agent that exits while registry or the cache is away).
    let healed = Instant::now();
    for url in [
        &stack.registry,
        &stack.cache,
        &stack.processor,
        &stack.failover,
    ] {
        crate::wait_serving(url).await;
    }
    let settled = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            if protected_and_streaming(&stack).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if settled.is_err() {
        let item = crate::protected_item(&stack.registry, "vm").await;
        fail(format!(
            "not PROTECTED with the agent streaming 120 s after healing: {item:#?}"
        ));
    }
    report.heal = healed.elapsed();
    stack.note("PROTECTED with the agent streaming; planned failover");

    // The source images hold every completed write (the rest of what
    // replication must deliver is checked against them below).
    for (disk, path) in sources.iter().enumerate() {
        let image = std::fs::read(path).unwrap();
        let (first, count) = reference.differences(disk, &image);
        if count > 0 {
            fail(format!(
                "source disk {} differs from the completed writes in {count} sectors, first at {first:?}",
                DISKS[disk].0
            ));
        }
    }

    // A planned failover: drained, fenced, materialized from the final
    // point; nothing writes any more.
    let t = Instant::now();
    let job = match planned_failover(&stack.failover).await {
        Ok(job) => job,
        Err(why) => fail(why),
    };
    report.failover = t.elapsed();
    stack.note(&format!("planned failover {} succeeded", job.id));
    report.failover_job = job.id.clone();
    let (agent_exits, unexpected) = supervisor.stop().await;
    report.agent_exits = agent_exits;
    if !unexpected.is_empty() {
        fail(format!("services exited by themselves: {unexpected:#?}"));
    }
    let Some(used) = job.points.first() else {
        fail(format!("the job used no point: {job:?}"));
    };
    let zero = used
        .data_loss_window
        .as_ref()
        .is_some_and(|w| w.seconds == 0 && w.nanos == 0);
    if !zero {
        fail(format!("a planned failover loses nothing: {used:?}"));
    }
    let point = final_point(&stack.processor, &used.point_id).await;
    match &point {
        Some(p) if p.bookmark_id == job.id => {
            report.final_point = p.id.clone();
            report.final_sequence = p.sequence_cut;
        }
        other => fail(format!("the final point is the drain's: {other:?}")),
    }
    let vms = FailoverClient::connect(stack.failover.clone())
        .await
        .expect("connect to failover-svc")
        .list_target_vms(fo::ListTargetVmsRequest {
            source_vm: "vm".into(),
        })
        .await
        .expect("list target VMs")
        .into_inner()
        .vms;
    let [target] = &vms[..] else {
        fail(format!("one target VM: {vms:?}"));
    };
    for ((id, size), source) in DISKS.iter().zip(&sources) {
        let Some(disk) = target.disks.iter().find(|d| d.disk_id == *id) else {
            fail(format!("target disk {id} missing: {target:?}"));
        };
        if !identical_images(source, Path::new(&disk.path)) {
            fail(format!(
                "target disk {id} ({}) differs from the source {}",
                disk.path,
                source.display()
            ));
        }
        report.bytes_compared += size;
    }
    drop(stack);
    let _ = std::fs::remove_dir_all(&dir);
    report
}

/// Whether the item is PROTECTED, the agent says it streams (its health
/// NORMAL), the cache has seen the item's current epoch (the agent
/// registered last has opened a stream) and that stream is open now: the
/// cache hands it a bookmark (a marker that makes no point outside a
/// replication group). The stored state and reports may be from before
/// the last kill; the bookmark is not.
async fn protected_and_streaming(stack: &Stack) -> bool {
    let Some(item) = crate::protected_item(&stack.registry, "vm").await else {
        return false;
    };
    let agent_normal = item
        .health_reports
        .iter()
        .any(|r| r.component == "agent" && r.health == reg::ReplicationHealth::Normal as i32);
    if item.state() != reg::ReplicationState::Protected || !agent_normal {
        return false;
    }
    let Ok(mut cache) = CacheClient::connect(stack.cache.clone()).await else {
        return false;
    };
    let info = cache
        .get_log_info(cache::GetLogInfoRequest {
            vm_name: "vm".into(),
        })
        .await;
    if !info.is_ok_and(|i| i.into_inner().epoch == item.epoch) {
        return false;
    }
    let probe = cache
        .send_control(cache::SendControlRequest {
            vm_name: "vm".into(),
            control: Some(cache::send_control_request::Control::Bookmark(
                cache::BookmarkRequest {
                    id: "chaos-probe".into(),
                },
            )),
        })
        .await;
    probe.is_ok_and(|r| r.into_inner().agent_epoch == item.epoch)
}

/// Starts a PLANNED failover to the latest point and follows it to its
/// end: the job if it succeeded, else why not.
async fn planned_failover(url: &str) -> Result<fo::Job, String> {
    let mut client = FailoverClient::connect(url.to_string())
        .await
        .map_err(|e| format!("connect to failover-svc: {e}"))?;
    let job = client
        .start_failover(fo::StartFailoverRequest {
            target: Some(fo::start_failover_request::Target::VmName("vm".into())),
            kind: fo::FailoverKind::Planned as i32,
            point: Some(fo::PointChoice {
                choice: Some(fo::point_choice::Choice::Latest(true)),
            }),
            test_network: String::new(),
            request_id: "chaos-planned".into(),
        })
        .await
        .map_err(|s| format!("the planned failover was refused: {s}"))?
        .into_inner();
    let mut stream = client
        .watch_job(fo::WatchJobRequest { id: job.id.clone() })
        .await
        .map_err(|s| format!("watch the job: {s}"))?
        .into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let mut last = job;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(j))) => last = j,
            Ok(Ok(None)) => break,
            Ok(Err(s)) => return Err(format!("watching {}: {s}", last.id)),
            Err(_) => return Err(format!("the job did not end within 180 s: {last:?}")),
        }
    }
    if last.state == fo::JobState::Succeeded as i32 {
        Ok(last)
    } else {
        Err(format!("the planned failover failed: {last:#?}"))
    }
}

async fn final_point(processor: &str, id: &str) -> Option<pb::RecoveryPoint> {
    crate::points::list_points(processor, "vm")
        .await
        .into_iter()
        .find(|p| p.id == id)
}
