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

use crate::{
    agent_command, bin_path, free_addr, identical_images, wait_for, AgentAuth, At, FaultProxy,
    Insecure, Rng,
};

/// The VM's disks: (id, size).
pub const DISKS: [(&str, u64); 2] = [("os", 8 << 20), ("data", 4 << 20)];
const SECTOR: u64 = 512;
/// Largest write.
const MAX_WRITE: u64 = 128 << 10;

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
    /// Partitions of the agent's link longer than its `max_outage` (60 s),
    /// so that it drops what it buffered into its changed-chunk map and
    /// resyncs it once healed; the other events go on meanwhile.
    pub long_partitions: usize,
    /// The mean time between two events.
    pub pace: Duration,
    /// Recovery points read back at the end and checked for holding a
    /// prefix of the writes (spread over the run; the newest included).
    pub points: usize,
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
            long_partitions: 0,
            pace: Duration::from_millis(2200),
            points: 12,
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
            // One every 5 minutes (each lasts over a minute).
            long_partitions: (minutes / 5) as usize,
            points: 12 + minutes as usize,
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
    /// Points read back whole, each with the prefix of the run's writes
    /// it holds.
    pub points_checked: Vec<(String, usize)>,
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
        writeln!(
            f,
            "  final point {} at sequence {}: target disks identical to the source ({} bytes)",
            self.final_point, self.final_sequence, self.bytes_compared
        )?;
        write!(
            f,
            "  points read back, each the first k writes: {}",
            self.points_checked
                .iter()
                .map(|(id, k)| format!("{id} k={k}"))
                .collect::<Vec<_>>()
                .join(", ")
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
/// started again with the same command.
struct Proc {
    name: &'static str,
    /// Makes the command that starts it (each time the same).
    command: Box<dyn Fn() -> Command + Send>,
    log: PathBuf,
    child: Option<Child>,
    /// Killed on purpose and not started again yet.
    down: bool,
}

impl Proc {
    fn new(name: &'static str, command: Box<dyn Fn() -> Command + Send>, log: PathBuf) -> Proc {
        let mut p = Proc {
            name,
            command,
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
        let child = (self.command)()
            .env("FERRY_LOG", level)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.name));
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

/// ferry-agent's `max_outage` (`StreamLimits::default()`).
const AGENT_MAX_OUTAGE: Duration = Duration::from_secs(60);

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
    /// The cluster secret and tokens every process and check uses.
    insecure: Insecure,
}

impl Stack {
    /// Starts the four services, each reaching the cache and registry
    /// through its proxy, and waits until they are SERVING.
    async fn start(dir: &Path) -> Stack {
        let insecure = Insecure::new();
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
            let mut args = insecure.args(Path::new(&format!("{name}-svc")));
            args.extend([
                "--listen".to_string(),
                addr.to_string(),
                "--data-dir".to_string(),
                dir.join(name).display().to_string(),
            ]);
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
                let binary = bin_path(name);
                let command = move || {
                    let mut command = Command::new(&binary);
                    command.args(&args);
                    command
                };
                Proc::new(name, Box::new(command), dir.join(format!("{name}.log")))
            })
            .collect();
        for url in [&registry, &cache, &processor, &failover] {
            crate::wait_serving(url).await;
        }
        let nbd = free_addr().to_string();
        let agent_args = [
            "--nbd-listen",
            &nbd,
            "--group-listen",
            "off",
            "--drain-secs",
            "1",
            "--state-dir",
            &dir.join("agent").display().to_string(),
            // The source images (`prepare`) lie in `dir`.
            "--disk-root",
            &dir.display().to_string(),
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
            insecure,
        }
    }

    /// `url` with this stack's credentials.
    fn at<'a>(&'a self, url: &'a str) -> At<'a> {
        self.insecure.at(url)
    }

    fn note(&self, what: &str) {
        note_in(&self.dir, what);
    }

    fn start_agent(&self) {
        let name = NAMES[AGENT];
        let (registry, args, insecure) = (
            self.proxies[2].url(),
            self.agent_args.clone(),
            self.insecure.clone(),
        );
        let command = move || {
            let mut command = agent_command(&registry, "vm", AgentAuth::Token(&insecure));
            command.args(&args);
            command
        };
        let agent = Proc::new(
            name,
            Box::new(command),
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
//
// Every sector a data write puts down names the write (its number in the
// run, counting from 1), its disk and its own position, followed by bytes
// derived from those: any image can then be read back as "which write last
// wrote each sector", and a recovery point checked for being a prefix of
// the writes (crash-consistent), not only the final image.

/// A data sector's first bytes.
const MAGIC: &[u8; 8] = b"FERRYCHS";

/// The sector `sector` of disk `disk` as write `id` writes it.
fn stamped(id: u64, disk: usize, sector: u64) -> [u8; SECTOR as usize] {
    let mut out = [0u8; SECTOR as usize];
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&id.to_le_bytes());
    out[16..24].copy_from_slice(&(disk as u64).to_le_bytes());
    out[24..32].copy_from_slice(&sector.to_le_bytes());
    let mut rng = Rng((id.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ sector.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ disk as u64)
        | 1);
    for word in out[32..].chunks_mut(8) {
        word.copy_from_slice(&rng.next().to_le_bytes());
    }
    out
}

/// The write a sector read at (`disk`, `sector`) names, if it is exactly
/// what that write put there.
fn stamp_of(bytes: &[u8], disk: usize, sector: u64) -> Option<u64> {
    if bytes.len() != SECTOR as usize || &bytes[..8] != MAGIC {
        return None;
    }
    let id = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
    (bytes == stamped(id, disk, sector)).then_some(id)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Stamped sectors (`write -s <file>`).
    Data,
    /// Zeroes (`write -z`; with `-u` the export may unmap).
    Zero { unmap: bool },
}

/// One write of the run; its id is its index in the journal + 1.
#[derive(Debug, Clone, Copy)]
struct Write {
    disk: usize,
    offset: u64,
    len: u64,
    kind: Kind,
    /// qemu-io saw it complete. Otherwise it failed or was cut off: it may
    /// be on the disk, in part or not at all.
    completed: bool,
}

/// What a sector must hold after a prefix of the writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cell {
    Initial,
    Zero,
    Data(u64),
    /// An uncertain write touched it last: anything.
    Any,
}

/// The initial images and every write in order.
struct Journal {
    initial: Vec<Vec<u8>>,
    writes: Vec<Write>,
}

impl Journal {
    fn sectors(w: &Write) -> std::ops::Range<usize> {
        (w.offset / SECTOR) as usize..((w.offset + w.len) / SECTOR) as usize
    }

    /// The cells after the first `k` writes.
    fn state(&self, k: usize) -> Vec<Vec<Cell>> {
        let mut state: Vec<Vec<Cell>> = DISKS
            .iter()
            .map(|(_, size)| vec![Cell::Initial; (size / SECTOR) as usize])
            .collect();
        for (i, w) in self.writes[..k].iter().enumerate() {
            Self::apply(&mut state, i as u64 + 1, w);
        }
        state
    }

    fn apply(state: &mut [Vec<Cell>], id: u64, w: &Write) {
        let cell = match (w.completed, w.kind) {
            (false, _) => Cell::Any,
            (true, Kind::Data) => Cell::Data(id),
            (true, Kind::Zero { .. }) => Cell::Zero,
        };
        state[w.disk][Self::sectors(w)].fill(cell);
    }

    fn holds(&self, cell: Cell, disk: usize, sector: usize, bytes: &[u8]) -> bool {
        let at = sector * SECTOR as usize;
        match cell {
            Cell::Any => true,
            Cell::Initial => bytes == &self.initial[disk][at..at + SECTOR as usize],
            Cell::Zero => bytes.iter().all(|b| *b == 0),
            Cell::Data(id) => stamp_of(bytes, disk, sector as u64) == Some(id),
        }
    }

    /// Where `images` (one per disk) differ from `state`: up to 6, with
    /// what was expected and what is there, and how many in all.
    fn differences(&self, state: &[Vec<Cell>], images: &[Vec<u8>]) -> (Vec<String>, usize) {
        let (mut first, mut count) = (Vec::new(), 0);
        for (disk, cells) in state.iter().enumerate() {
            for (s, cell) in cells.iter().enumerate() {
                let at = s * SECTOR as usize;
                let bytes = images[disk].get(at..at + SECTOR as usize).unwrap_or(&[]);
                if self.holds(*cell, disk, s, bytes) {
                    continue;
                }
                count += 1;
                if first.len() < 6 {
                    let found = match stamp_of(bytes, disk, s as u64) {
                        Some(id) => format!("write {id} ({:?})", self.writes[id as usize - 1]),
                        None if bytes.iter().all(|b| *b == 0) => "zeroes".into(),
                        None if self.holds(Cell::Initial, disk, s, bytes) => "initial data".into(),
                        None => "other bytes".into(),
                    };
                    first.push(format!(
                        "{} at {}: want {cell:?}, found {found}",
                        DISKS[disk].0, at
                    ));
                }
            }
        }
        (first, count)
    }

    /// The prefix of the writes `images` hold (a crash-consistent image
    /// holds the first k writes, uncertain ones either way), or where they
    /// differ from the shortest prefix they could be.
    fn prefix(&self, images: &[Vec<u8>]) -> Result<usize, String> {
        // At least every write whose sectors it shows.
        let mut newest = 0;
        for (disk, image) in images.iter().enumerate() {
            for (s, bytes) in image.chunks(SECTOR as usize).enumerate() {
                if let Some(id) = stamp_of(bytes, disk, s as u64) {
                    newest = newest.max(id as usize);
                }
            }
        }
        if newest > self.writes.len() {
            return Err(format!("a sector of write {newest}, which was never made"));
        }
        let mut state = self.state(newest);
        // Zeroes (and uncertain writes) after it leave no stamp: try a few
        // more.
        for k in newest..=(newest + 64).min(self.writes.len()) {
            if k > newest {
                Self::apply(&mut state, k as u64, &self.writes[k - 1]);
            }
            if self.differences(&state, images).1 == 0 {
                return Ok(k);
            }
        }
        let (first, count) = self.differences(&self.state(newest), images);
        Err(format!(
            "no prefix of the writes: {count} sectors differ from the first {newest} writes \
             (the newest it shows): {first:#?}"
        ))
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
    thread: std::thread::JoinHandle<(Journal, WriterStats)>,
}

impl Writer {
    fn start(seed: u64, nbd: String, journal: Journal, dir: PathBuf) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut journal = journal;
            let mut stats = WriterStats::default();
            let mut rng = Rng(seed ^ 0x00c0_ffee_0000_0001);
            let files = dir.join("writes");
            std::fs::create_dir_all(&files).unwrap();
            while !flag.load(Ordering::Relaxed) {
                let disk = (rng.next() % DISKS.len() as u64) as usize;
                let writes = draw_writes(&mut rng, disk);
                let first = journal.writes.len() as u64 + 1;
                let commands: Vec<String> = writes
                    .iter()
                    .enumerate()
                    .map(|(i, w)| {
                        let (o, l) = (w.offset, w.len);
                        match w.kind {
                            Kind::Data => {
                                let file = files.join(format!("{i}.bin"));
                                let mut data = Vec::with_capacity(l as usize);
                                for s in o / SECTOR..(o + l) / SECTOR {
                                    data.extend_from_slice(&stamped(first + i as u64, disk, s));
                                }
                                std::fs::write(&file, data).unwrap();
                                format!("write -s {} {o} {l}", file.display())
                            }
                            Kind::Zero { unmap: false } => format!("write -z {o} {l}"),
                            Kind::Zero { unmap: true } => format!("write -z -u {o} {l}"),
                        }
                    })
                    .collect();
                let started = Instant::now();
                let outcome = qemu_io(&nbd, DISKS[disk].0, &writes, &commands);
                let took = started.elapsed();
                let Batch::Ran { completed, hung } = outcome else {
                    // Nothing written: the writes are not in the journal.
                    stats.refused += 1;
                    std::thread::sleep(Duration::from_millis(50 + rng.next() % 200));
                    continue;
                };
                let done = completed.iter().filter(|c| **c).count();
                if done == writes.len() && !hung {
                    stats.ok += 1;
                    stats.slowest = stats.slowest.max(took);
                } else {
                    stats.failed += 1;
                    note_in(
                        &dir,
                        &format!(
                            "qemu-io to {}: {done} of {} writes (from {first}) completed{}",
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
                for (mut w, done) in writes.into_iter().zip(completed) {
                    w.completed = done;
                    if done {
                        stats.completed += 1;
                        stats.bytes += w.len;
                    } else {
                        stats.uncertain += 1;
                    }
                    journal.writes.push(w);
                }
                // Pacing, so that the services have CPU too.
                std::thread::sleep(Duration::from_millis(50 + rng.next() % 200));
            }
            (journal, stats)
        });
        Writer { stop, thread }
    }

    async fn stop(self) -> (Journal, WriterStats) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join().expect("the writer"))
            .await
            .expect("join the writer")
    }
}

/// 8 to 32 writes to `disk` at distinct (offset, length), mostly small,
/// some up to [`MAX_WRITE`], sector-aligned; one in six zeroes.
fn draw_writes(rng: &mut Rng, disk: usize) -> Vec<Write> {
    let size = DISKS[disk].1;
    let n = 8 + rng.next() % 25;
    let mut seen = std::collections::BTreeSet::new();
    let mut writes = Vec::new();
    for _ in 0..n {
        let sectors = match rng.next() % 20 {
            0..=9 => 1 + rng.next() % 8,
            10..=16 => 1 + rng.next() % ((64 << 10) / SECTOR),
            _ => 1 + rng.next() % (MAX_WRITE / SECTOR),
        };
        let len = sectors * SECTOR;
        let offset = rng.next() % ((size - len) / SECTOR + 1) * SECTOR;
        let kind = match rng.next() % 6 {
            0 => Kind::Zero {
                unmap: rng.next().is_multiple_of(2),
            },
            _ => Kind::Data,
        };
        // Distinct, so that qemu-io's "wrote <len> bytes at offset <o>"
        // names exactly one of them.
        if seen.insert((offset, len)) {
            writes.push(Write {
                disk,
                offset,
                len,
                kind,
                completed: false,
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
fn qemu_io(nbd: &str, disk: &str, writes: &[Write], commands: &[String]) -> Batch {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.arg("-c").arg(c);
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

/// Seeded source images: every other 256 KiB block of each disk holds
/// data before protection (initial replication copies it), the rest are
/// holes.
fn prepare(dir: &Path, rng: &mut Rng) -> (Vec<PathBuf>, Journal) {
    use std::os::unix::fs::FileExt;
    const BLOCK: u64 = 256 << 10;
    let mut sources = Vec::new();
    let mut initial = Vec::new();
    for (id, size) in DISKS {
        let mut image = vec![0u8; size as usize];
        let path = dir.join(format!("{id}.raw"));
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        for block in (0..size / BLOCK).step_by(2) {
            let at = (block * BLOCK) as usize;
            for word in image[at..at + BLOCK as usize].chunks_mut(8) {
                word.copy_from_slice(&rng.next().to_le_bytes());
            }
            f.write_all_at(&image[at..at + BLOCK as usize], at as u64)
                .unwrap();
        }
        f.sync_all().unwrap();
        sources.push(path);
        initial.push(image);
    }
    (
        sources,
        Journal {
            initial,
            writes: Vec::new(),
        },
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
fn plan(rng: &mut Rng, kills: usize, faults: usize, long: usize) -> Vec<Event> {
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
    for _ in 0..long {
        let cut = rng.next().is_multiple_of(2);
        events.push(Event::Fault(
            0,
            cut,
            AGENT_MAX_OUTAGE + Duration::from_secs(5),
        ));
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
        "chaos seed {seed:#x}: {} kills, {} network faults ({} of the agent's link over a minute) about {:?} apart; logs in {}",
        options.kills,
        options.faults + options.long_partitions,
        options.long_partitions,
        options.pace,
        dir.display()
    );
    let mut report = ChaosReport {
        seed,
        ..Default::default()
    };
    let (sources, journal) = prepare(&dir, &mut rng);
    let stack = Stack::start(&dir).await;

    // Protect the VM: points every second.
    let day = Duration::from_secs(86400);
    crate::create_policy(
        stack.at(&stack.registry),
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
    crate::protect_vm_with(stack.at(&stack.registry), "vm", &disks, "chaos").await;
    // The agent's first start enrolls; its restarts show the credential it
    // kept in its state directory.
    stack.insecure.enroll(&stack.registry, "vm").await;
    stack.start_agent();
    wait_for(
        "PROTECTED after initial replication",
        Duration::from_secs(120),
        || async {
            crate::protected_item(stack.at(&stack.registry), "vm")
                .await
                .filter(|i| i.state() == reg::ReplicationState::Protected)
        },
    )
    .await;

    // Chaos while the VM writes.
    let supervisor = Supervisor::start(stack.procs.clone(), dir.clone());
    let writer = Writer::start(seed, stack.nbd.clone(), journal, dir.clone());
    let events = plan(
        &mut rng,
        options.kills,
        options.faults,
        options.long_partitions,
    );
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
                let name = format!(
                    "{} {}{}",
                    if cut { "cut" } else { "blackhole" },
                    LINKS[link],
                    if lasts > AGENT_MAX_OUTAGE {
                        " past max_outage"
                    } else {
                        ""
                    }
                );
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
    let (journal, stats) = writer.stop().await;
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
        let item = crate::protected_item(stack.at(&stack.registry), "vm").await;
        fail(format!(
            "not PROTECTED with the agent streaming 120 s after healing: {item:#?}"
        ));
    }
    report.heal = healed.elapsed();
    stack.note("PROTECTED with the agent streaming; planned failover");

    // The source images hold every completed write (the rest of what
    // replication must deliver is checked against them below).
    let images: Vec<Vec<u8>> = sources.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let (first, count) = journal.differences(&journal.state(journal.writes.len()), &images);
    if count > 0 {
        fail(format!(
            "the source disks differ from the completed writes in {count} sectors: {first:#?}"
        ));
    }

    // A planned failover: drained, fenced, materialized from the final
    // point; nothing writes any more.
    let t = Instant::now();
    let job = match planned_failover(stack.at(&stack.failover)).await {
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
    let point = final_point(stack.at(&stack.processor), &used.point_id).await;
    match &point {
        Some(p) if p.bookmark_id == job.id => {
            report.final_point = p.id.clone();
            report.final_sequence = p.sequence_cut;
        }
        other => fail(format!("the final point is the drain's: {other:?}")),
    }
    let vms = FailoverClient::new(stack.at(&stack.failover).admin())
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
    match crate::protected_item(stack.at(&stack.registry), "vm").await {
        Some(item) if item.state() == reg::ReplicationState::FailedOver => {}
        other => fail(format!("the item is FAILED_OVER: {other:?}")),
    }

    // Every point is crash-consistent: it holds a prefix of the writes,
    // whatever was killed or cut while it was made. A sample spread over
    // the run, the final point last.
    let points = crate::points::list_points(stack.at(&stack.processor), "vm").await;
    let n = points.len();
    let want = options.points.max(2);
    let picks: std::collections::BTreeSet<usize> = if n <= want {
        (0..n).collect()
    } else {
        (0..want).map(|i| i * (n - 1) / (want - 1)).collect()
    };
    for i in picks {
        let point = &points[i];
        let mut images = Vec::new();
        for (id, _) in DISKS {
            images
                .push(crate::points::read_disk(stack.at(&stack.processor), "vm", point, id).await);
        }
        match journal.prefix(&images) {
            Ok(k) => report.points_checked.push((point.id.clone(), k)),
            Err(why) => fail(format!(
                "point {} (sequence {}) is not crash-consistent: {why}",
                point.id, point.sequence_cut
            )),
        }
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
    let Some(item) = crate::protected_item(stack.at(&stack.registry), "vm").await else {
        return false;
    };
    let agent_normal = item
        .health_reports
        .iter()
        .any(|r| r.component == "agent" && r.health == reg::ReplicationHealth::Normal as i32);
    if item.state() != reg::ReplicationState::Protected || !agent_normal {
        return false;
    }
    let mut cache = CacheClient::new(
        stack
            .at(&stack.cache)
            .as_service(ferry_runtime::security::ServiceKind::Processor),
    );
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
async fn planned_failover(failover: At<'_>) -> Result<fo::Job, String> {
    let mut client = FailoverClient::new(failover.admin());
    let job = client
        .start_failover(fo::StartFailoverRequest {
            target: Some(fo::start_failover_request::Target::VmName("vm".into())),
            kind: fo::FailoverKind::Planned as i32,
            point: Some(fo::PointChoice {
                choice: Some(fo::point_choice::Choice::Latest(true)),
            }),
            test_network: String::new(),
            request_id: "chaos-planned".into(),
            instant: false,
            alternate_location: false,
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

async fn final_point(processor: At<'_>, id: &str) -> Option<pb::RecoveryPoint> {
    crate::points::list_points(processor, "vm")
        .await
        .into_iter()
        .find(|p| p.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(disk: usize, offset: u64, len: u64, kind: Kind, completed: bool) -> Write {
        Write {
            disk,
            offset,
            len,
            kind,
            completed,
        }
    }

    /// The images after the first `k` writes, the uncertain ones landed.
    fn images(journal: &Journal, k: usize) -> Vec<Vec<u8>> {
        let mut images = journal.initial.clone();
        for (i, w) in journal.writes[..k].iter().enumerate() {
            for s in Journal::sectors(w) {
                let at = s * SECTOR as usize;
                let sector = match w.kind {
                    Kind::Data => stamped(i as u64 + 1, w.disk, s as u64),
                    Kind::Zero { .. } => [0; SECTOR as usize],
                };
                images[w.disk][at..at + SECTOR as usize].copy_from_slice(&sector);
            }
        }
        images
    }

    fn journal() -> Journal {
        let mut rng = Rng(7);
        let initial = DISKS
            .iter()
            .map(|(_, size)| {
                (0..*size / 8)
                    .flat_map(|_| rng.next().to_le_bytes())
                    .collect()
            })
            .collect();
        Journal {
            initial,
            writes: vec![
                write(0, 0, 1024, Kind::Data, true),
                write(0, 512, 512, Kind::Zero { unmap: true }, true),
                write(1, 4096, 512, Kind::Data, true),
                write(0, 8192, 1024, Kind::Data, false),
                write(1, 4096, 512, Kind::Zero { unmap: false }, true),
            ],
        }
    }

    #[test]
    fn a_prefix_of_the_writes_is_recognised() {
        let journal = journal();
        for k in 0..=journal.writes.len() {
            assert_eq!(journal.prefix(&images(&journal, k)), Ok(k), "prefix {k}");
        }
        // The uncertain write (4) not landed: still the first 4, or 5.
        let mut without = images(&journal, 5);
        without[0][8192..9216].copy_from_slice(&journal.initial[0][8192..9216]);
        assert_eq!(journal.prefix(&without), Ok(5));
    }

    #[test]
    fn a_lost_moved_or_damaged_write_is_no_prefix() {
        let journal = journal();
        // Write 3 without write 1.
        let mut lost = images(&journal, 3);
        lost[0][..512].copy_from_slice(&journal.initial[0][..512]);
        assert!(journal.prefix(&lost).is_err());
        // Write 3's sector at another offset.
        let mut moved = images(&journal, 3);
        let sector = moved[1][4096..4608].to_vec();
        moved[1][4608..5120].copy_from_slice(&sector);
        assert!(journal.prefix(&moved).is_err());
        // One flipped byte.
        let mut flipped = images(&journal, 3);
        flipped[1][4100] ^= 1;
        assert!(journal.prefix(&flipped).is_err());
        // The source with a completed write missing.
        let (_, count) = journal.differences(&journal.state(5), &images(&journal, 2));
        assert!(count > 0);
    }

    #[test]
    fn the_plan_kills_every_process_and_faults_every_link() {
        let events = plan(&mut Rng(3), 22, 6, 1);
        let mut killed = BTreeMap::new();
        let mut links = BTreeMap::new();
        for e in &events {
            match e {
                Event::Kill(victims) => {
                    for (w, _) in victims {
                        *killed.entry(*w).or_insert(0) += 1;
                    }
                }
                Event::Fault(l, _, _) => *links.entry(*l).or_insert(0) += 1,
                Event::Stop(_) => {}
            }
        }
        assert_eq!(killed.values().sum::<usize>(), 22);
        assert_eq!(killed.len(), NAMES.len());
        assert_eq!(links.values().sum::<usize>(), 7);
        assert_eq!(links.len(), LINKS.len());
    }
}
