//! A full disk under cache-svc or processor-svc, each on a small
//! filesystem of its own (`SmallFs`) that a ballast file fills while the VM
//! writes a causal chain through its NBD export.
//!
//! cache-svc: batches are refused like a quota (RESOURCE_EXHAUSTED with a
//! Throttle); the VM's writes go on, the agent tracks changed chunks
//! (RESYNC_REQUIRED), registry hears "cache" CRITICAL "disk full"; once
//! space returns the agent resyncs and the item is PROTECTED again.
//! processor-svc: the pipeline pauses before writing anything (health
//! CRITICAL "disk full", cuts refused, no point) and resumes when space
//! returns. In both, nothing acknowledged is lost: every point holds
//! exactly the chain's first n writes (what the source held at some
//! moment), n never falls, and a new point holds every write.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_agent::stream::StreamLimits;
use ferry_proto::registry::v1 as reg;
use ferry_testkit::nbd::Nbd;
use ferry_testkit::points::{cut_latest, list_points, read_disk};
use ferry_testkit::{protect_vm_with, protected_item, wait_for, Cluster, ClusterOptions, SmallFs};

/// The disk: 64 slots of 64 KiB.
const DISK: u64 = 4 << 20;
const SLOT: u64 = 64 << 10;
const SLOTS: u64 = DISK / SLOT;

/// Iteration `k` of the chain writes `k + 1` into slot `k % SLOTS`.
fn slot_write(k: u64) -> (u64, Vec<u8>) {
    let value = (k + 1) as u32;
    (
        (k % SLOTS) * SLOT,
        value.to_le_bytes().repeat((SLOT / 4) as usize),
    )
}

/// The iteration count an image holds; panics unless it is exactly the
/// chain's first n writes.
fn chain_prefix(image: &[u8]) -> u64 {
    let values: Vec<u32> = (0..SLOTS)
        .map(|s| {
            let slot = &image[(s * SLOT) as usize..((s + 1) * SLOT) as usize];
            let v = u32::from_le_bytes(slot[..4].try_into().unwrap());
            assert!(
                slot.chunks(4).all(|c| c == v.to_le_bytes()),
                "slot {s} is torn"
            );
            v
        })
        .collect();
    let n = u64::from(values.iter().copied().max().unwrap_or(0));
    for (s, v) in values.iter().enumerate() {
        let s = s as u64;
        // The newest iteration k < n with k % SLOTS == s, if any.
        let expected = if n > s {
            s + (n - 1 - s) / SLOTS * SLOTS + 1
        } else {
            0
        };
        assert_eq!(u64::from(*v), expected, "slot {s} after {n} iterations");
    }
    n
}

/// The VM writing the chain through one NBD connection, one write per
/// `pace` (adjustable), every write completing, until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    pace_ms: Arc<AtomicU64>,
    thread: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(nbd: &str, pace: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let pace_ms = Arc::new(AtomicU64::new(pace.as_millis() as u64));
        let (flag, count, ms) = (stop.clone(), done.clone(), pace_ms.clone());
        let nbd = nbd.trim_start_matches("nbd://").to_string();
        let thread = tokio::task::spawn_blocking(move || {
            let mut nbd = Nbd::go(&nbd, "os").unwrap();
            while !flag.load(Ordering::Relaxed) {
                let k = count.load(Ordering::Relaxed);
                let (offset, data) = slot_write(k);
                assert_eq!(nbd.write(offset, &data).unwrap(), 0, "a VM write completes");
                count.fetch_add(1, Ordering::Relaxed);
                // Pacing, not synchronisation.
                std::thread::sleep(Duration::from_millis(ms.load(Ordering::Relaxed)));
            }
        });
        Writer {
            stop,
            done,
            pace_ms,
            thread,
        }
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    fn pace(&self, pace: Duration) {
        self.pace_ms
            .store(pace.as_millis() as u64, Ordering::Relaxed);
    }

    /// Waits until `n` more writes have completed.
    async fn more(&self, n: u64) {
        let target = self.done() + n;
        wait_for(
            &format!("{n} more VM writes to complete"),
            Duration::from_secs(30),
            || async { (self.done() >= target).then_some(()) },
        )
        .await;
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.await.unwrap();
        self.done.load(Ordering::Relaxed)
    }
}

/// A protected VM "vm" writing the chain: its source image under `dir`,
/// its agent, and a point every second.
async fn protected_vm(
    registry: &str,
    dir: &std::path::Path,
    limits: StreamLimits,
) -> (ferry_agent::run::Agent, String) {
    let source = dir.join("os.raw");
    std::fs::File::create(&source)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    common::policy(registry, "fast", Duration::from_secs(1)).await;
    protect_vm_with(registry, "vm", &[("os", DISK, &source)], "fast").await;
    common::protected_agent_limited(registry, "vm", &dir.join("agent"), None, limits).await
}

/// The VM's health report from `component`, once there is one.
async fn report(registry: &str, component: &str) -> Option<reg::HealthReport> {
    protected_item(registry, "vm")
        .await?
        .health_reports
        .into_iter()
        .find(|r| r.component == component)
}

/// Waits for `component`'s report to be `health`, its message containing
/// `says`; the report.
async fn wait_report(
    registry: &str,
    component: &str,
    health: reg::ReplicationHealth,
    says: &str,
) -> reg::HealthReport {
    wait_for(
        &format!("{component} to report {health:?} \"{says}\""),
        Duration::from_secs(30),
        || async {
            report(registry, component)
                .await
                .filter(|r| r.health == health as i32 && r.message.contains(says))
        },
    )
    .await
}

/// Every point of the VM, oldest first, holds a prefix of the chain, and
/// the prefixes never shrink; the newest one's length.
async fn every_point_is_the_source_at_its_cut(processor: &str) -> u64 {
    let mut last = 0;
    let points = list_points(processor, "vm").await;
    assert!(!points.is_empty());
    for p in &points {
        let n = chain_prefix(&read_disk(processor, "vm", p, "os").await);
        assert!(
            n >= last,
            "point {} holds {n} writes, an older one {last}",
            p.id
        );
        last = n;
    }
    println!("{} points, the newest holding {last} writes", points.len());
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_disk_throttles_then_tracks_then_resyncs_and_loses_nothing() {
    let fs = SmallFs::mount(32 << 20);
    let reserve: u64 = 4 << 20;
    let cluster = Cluster::start_options(ClusterOptions {
        cache: cache_svc::Settings {
            reserve_bytes: reserve,
            ..Default::default()
        },
        cache_dir: Some(fs.path().join("cache")),
        ..Default::default()
    })
    .await;
    let registry = cluster.registry.url.clone();
    let dir = tempfile::tempdir().unwrap();
    // A small buffer, the cache given up on after 2 s.
    let limits = StreamLimits {
        buffer_bytes: 2 << 20,
        in_flight_bytes: 1 << 20,
        batch_bytes: 256 << 10,
        max_outage: Duration::from_secs(2),
    };
    let (agent, nbd) = protected_vm(&registry, dir.path(), limits).await;
    let writer = Writer::start(&nbd, Duration::from_millis(100));
    wait_for("a point", Duration::from_secs(30), || async {
        (!list_points(&cluster.processor.url, "vm").await.is_empty()).then_some(())
    })
    .await;

    // The cache's disk fills: 1 MiB over the reserve, written in a second.
    let ballast = fs.fill_leaving(reserve + (1 << 20));
    writer.pace(Duration::from_millis(20));
    let full = wait_report(
        &registry,
        "cache",
        reg::ReplicationHealth::Critical,
        "disk full",
    )
    .await;
    println!("cache: {}", full.message);
    writer.pace(Duration::from_millis(100));
    wait_for(
        "RESYNC_REQUIRED, the agent tracking changed chunks",
        Duration::from_secs(30),
        || async {
            let item = protected_item(&registry, "vm").await?;
            (item.state() == reg::ReplicationState::ResyncRequired).then_some(())
        },
    )
    .await;
    // The VM's writes go on meanwhile; replication never stops for it.
    writer.more(20).await;
    let agent_report = report(&registry, "agent").await.unwrap();
    assert_ne!(
        agent_report.health,
        reg::ReplicationHealth::Critical as i32,
        "{}",
        agent_report.message
    );
    // Data stops short of the reserve; the index itself may use some.
    assert!(
        fs.free() >= reserve / 2,
        "the cache's index keeps its reserve: {} B free",
        fs.free()
    );

    // Space returns: the agent resyncs what it tracked.
    std::fs::remove_file(&ballast).unwrap();
    wait_for("PROTECTED again", Duration::from_secs(60), || async {
        let item = protected_item(&registry, "vm").await?;
        (item.state() == reg::ReplicationState::Protected).then_some(())
    })
    .await;
    wait_report(&registry, "cache", reg::ReplicationHealth::Normal, "").await;
    writer.more(10).await;
    let total = writer.stop().await;

    let point = cut_latest(&cluster.processor.url, "vm").await.unwrap();
    let image = read_disk(&cluster.processor.url, "vm", &point, "os").await;
    assert_eq!(chain_prefix(&image), total, "a new point holds every write");
    assert_eq!(
        every_point_is_the_source_at_its_cut(&cluster.processor.url).await,
        total
    );
    agent.stop(Duration::from_secs(5)).await.unwrap();
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_replica_disk_pauses_the_pipeline_critical_until_space_returns() {
    let fs = SmallFs::mount(32 << 20);
    let reserve: u64 = 4 << 20;
    let cluster = Cluster::start_options(ClusterOptions {
        processor: processor_svc::Settings {
            reserve_bytes: reserve,
            ..Default::default()
        },
        processor_dir: Some(fs.path().join("processor")),
        ..Default::default()
    })
    .await;
    let registry = cluster.registry.url.clone();
    let processor = cluster.processor.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let (agent, nbd) = protected_vm(&registry, dir.path(), StreamLimits::default()).await;
    let writer = Writer::start(&nbd, Duration::from_millis(100));
    wait_for("a point", Duration::from_secs(30), || async {
        (!list_points(&processor, "vm").await.is_empty()).then_some(())
    })
    .await;

    // 256 KiB over the reserve: a second's 640 KiB of writes do not fit.
    let ballast = fs.fill_leaving(reserve + (256 << 10));
    let full = wait_report(
        &registry,
        "processor",
        reg::ReplicationHealth::Critical,
        "disk full",
    )
    .await;
    println!("processor: {}", full.message);
    // Paused: a cut is refused, and no point is cut while writes go on.
    let points = list_points(&processor, "vm").await.len();
    let err = cut_latest(&processor, "vm").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("disk full"), "{err:?}");
    writer.more(20).await;
    assert_eq!(
        list_points(&processor, "vm").await.len(),
        points,
        "no point while paused"
    );
    // Data stops short of the reserve; the index itself may use some.
    assert!(
        fs.free() >= reserve / 2,
        "the processor's index keeps its reserve: {} B free",
        fs.free()
    );
    let item = protected_item(&registry, "vm").await.unwrap();
    assert_eq!(
        item.state(),
        reg::ReplicationState::Protected,
        "the agent streams on"
    );

    // Space returns: the pipeline resumes from what is durable.
    writer.pace(Duration::from_millis(250));
    std::fs::remove_file(&ballast).unwrap();
    wait_report(&registry, "processor", reg::ReplicationHealth::Normal, "").await;
    writer.more(5).await;
    let total = writer.stop().await;
    let point = cut_latest(&processor, "vm").await.unwrap();
    let image = read_disk(&processor, "vm", &point, "os").await;
    assert_eq!(chain_prefix(&image), total, "a new point holds every write");
    assert_eq!(
        every_point_is_the_source_at_its_cut(&processor).await,
        total
    );
    agent.stop(Duration::from_secs(5)).await.unwrap();
    cluster.stop().await;
}
