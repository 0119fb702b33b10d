//! Sequence numbers and incarnations reconciled after a loss: a cache that
//! lost its log never hands out numbers the processor applied; a log trimmed
//! past what the processor has is a gap repaired by a checksum resync, not an
//! endless retry; replication disabled and enabled again is a new
//! incarnation in cache-svc and processor-svc, also when they were down
//! during the disable. cache-svc and processor-svc run as real processes
//! (SIGKILLed, their data directories wiped); registry and the agent
//! in-process.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_agent::run::Agent;
use ferry_proto::cache::v1 as cache;
use ferry_proto::cache::v1::cache_client::CacheClient;
use ferry_proto::processor::v1 as pb;
use ferry_proto::processor::v1::processor_client::ProcessorClient;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::security::ServiceKind;
use ferry_testkit::points::{cut_latest, list_points, read_disk};
use ferry_testkit::{
    bin_path, free_addr, protect_vm_with, protected_item, start_registry, wait_for, wait_serving,
    At, Insecure, Rng, Running, ServiceProcess,
};

const SIZE: u64 = 8 << 20;

/// registry in-process; cache-svc (small segments, so it trims) and
/// processor-svc as processes.
struct Stack {
    registry: Running,
    cache: ServiceProcess,
    processor: ServiceProcess,
    dir: tempfile::TempDir,
    /// cache-svc and processor-svc check their callers.
    insecure: Insecure,
}

impl Stack {
    async fn start() -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let cache_addr = free_addr();
        let cache_url = format!("http://{cache_addr}");
        let registry = start_registry(dir.path().join("registry"), Some(cache_url.clone())).await;
        let config = dir.path().join("cache.toml");
        std::fs::write(&config, "[cache]\nsegment_bytes = 65536\n").unwrap();
        let insecure = Insecure::new();
        let cache = ServiceProcess::start_at(
            &insecure,
            cache_addr,
            bin_path("cache-svc"),
            dir.path().join("cache"),
            &[
                "--registry",
                &registry.url,
                "--config",
                config.to_str().unwrap(),
            ],
        );
        let processor = ServiceProcess::start(
            &insecure,
            bin_path("processor-svc"),
            dir.path().join("processor"),
            &["--registry", &registry.url, "--cache", &cache_url],
        );
        wait_serving(&cache.url()).await;
        wait_serving(&processor.url()).await;
        common::policy(&registry.url, "fast", Duration::from_secs(1)).await;
        Stack {
            registry,
            cache,
            processor,
            dir,
            insecure,
        }
    }

    /// `url` with this stack's credentials.
    fn at<'a>(&'a self, url: &'a str) -> At<'a> {
        self.insecure.at(url)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A protected VM with one empty disk and its agent.
    async fn protect(&self, vm: &str) -> (Agent, PathBuf) {
        let source = self.path(&format!("{vm}.raw"));
        std::fs::File::create(&source)
            .unwrap()
            .set_len(SIZE)
            .unwrap();
        protect_vm_with(&self.registry.url, vm, &[("os", SIZE, &source)], "fast").await;
        let (agent, _) = self.agent(vm, &format!("{vm}-agent")).await;
        (agent, source)
    }

    /// `vm`'s agent in-process, with its agent token, state in `state`.
    async fn agent(&self, vm: &str, state: &str) -> (Agent, String) {
        common::protected_agent_as(
            &self.registry.url,
            vm,
            &self.path(state),
            self.insecure.agent(vm),
        )
        .await
    }
}

/// `n` random sector-aligned writes through the agent's library API.
async fn write_some(agent: &Agent, rng: &mut Rng, n: usize) -> u64 {
    let mut last = 0;
    for _ in 0..n {
        let length = (1 + rng.next() % 32) * 512;
        let offset = (rng.next() % ((SIZE - length) / 512)) * 512;
        let data = vec![(rng.next() % 255 + 1) as u8; length as usize];
        last = agent.capture.write("os", offset, data).await.unwrap();
    }
    last
}

async fn log_info(at: At<'_>, vm: &str) -> Result<cache::LogInfo, tonic::Status> {
    let mut c = CacheClient::new(at.as_service(ServiceKind::Processor));
    c.get_log_info(cache::GetLogInfoRequest { vm_name: vm.into() })
        .await
        .map(|i| i.into_inner())
}

/// The VM's points, oldest first; None while processor-svc cannot say.
async fn points_now(processor: At<'_>, vm: &str) -> Option<Vec<pb::RecoveryPoint>> {
    let mut p = ProcessorClient::new(processor.as_service(ServiceKind::Failover));
    let mut points = p
        .list_recovery_points(pb::ListRecoveryPointsRequest {
            vm_name: vm.into(),
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner()
        .points;
    points.reverse();
    Some(points)
}

/// Waits for the newest point to hold exactly the source image as it is
/// now (no writes go on meanwhile).
async fn wait_for_point_equal_to_source(processor: At<'_>, vm: &str, source: &Path) {
    let want = std::fs::read(source).unwrap();
    wait_for(
        "a point equal to the source",
        Duration::from_secs(90),
        || async {
            let points = points_now(processor, vm).await?;
            let newest = points.last()?.clone();
            let got = read_disk(processor, vm, &newest, "os").await;
            (got == want).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_that_lost_its_log_never_reuses_numbers_the_processor_applied() {
    let mut stack = Stack::start().await;
    let (agent, source) = stack.protect("vm").await;
    let seed = 0x5eed_0001;
    println!("seed {seed:#x}");
    let mut rng = Rng(seed);
    let last = write_some(&agent, &mut rng, 300).await;
    agent.stream.flushed().await;
    let processor = stack.processor.url();
    // A point at `last`: the processor has durably applied everything.
    let point = cut_latest(stack.at(&processor), "vm").await.unwrap();
    assert!(point.sequence_cut >= last, "{point:?}");

    // The cache's disk is lost: killed, its data gone, started again empty.
    assert!(!stack.cache.signal_and_wait("KILL").success());
    std::fs::remove_dir_all(&stack.cache.data_dir).unwrap();
    stack.cache.restart();
    wait_serving(&stack.cache.url()).await;

    // Writes after the loss. Numbered from 1 again by the empty cache, they
    // would be skipped by the processor as applied, and no point would
    // ever hold them.
    write_some(&agent, &mut rng, 200).await;
    wait_for_point_equal_to_source(stack.at(&processor), "vm", &source).await;
    // The new log was renumbered past what the processor had applied.
    let info = log_info(stack.at(&stack.cache.url()), "vm").await.unwrap();
    assert!(
        info.first_sequence > last,
        "the new log numbers past what the processor applied ({last}): {info:?}"
    );
    wait_for("PROTECTED again", Duration::from_secs(60), || async {
        protected_item(&stack.registry.url, "vm")
            .await
            .filter(|i| i.state() == reg::ReplicationState::Protected)
    })
    .await;
    agent.stop(Duration::from_secs(5)).await.unwrap();
    stack.registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_cache_log_is_set_aside_and_the_vm_resynced_by_checksum() {
    let mut stack = Stack::start().await;
    let (agent, source) = stack.protect("vm").await;
    let seed = 0x5eed_0004;
    println!("seed {seed:#x}");
    let mut rng = Rng(seed);
    write_some(&agent, &mut rng, 100).await;
    agent.stream.flushed().await;
    cut_latest(stack.at(&stack.processor.url()), "vm")
        .await
        .unwrap();
    // The processor is away, so the cache keeps what comes next untrimmed.
    assert!(!stack.processor.signal_and_wait("KILL").success());
    write_some(&agent, &mut rng, 300).await;
    agent.stream.flushed().await;

    // One flipped byte in the middle of the newest sealed segment: records
    // the processor has not applied, in a segment the cache does not scan
    // at open (its tail finds the damage).
    assert!(!stack.cache.signal_and_wait("KILL").success());
    let logs = stack.cache.data_dir.join("logs").join("vm");
    let mut segments: Vec<_> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    assert!(segments.len() >= 2, "{segments:?}");
    let segment = segments[segments.len() - 2].clone();
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&segment, &bytes).unwrap();
    stack.cache.restart();
    stack.processor.restart();
    wait_serving(&stack.cache.url()).await;
    wait_serving(&stack.processor.url()).await;

    // Set aside (kept whole for inspection), registry told, and the VM is
    // whole again at a new point.
    // (Found at open in the active segment, or by the processor's tail in
    // a sealed one.)
    let damaged = stack.cache.data_dir.join("damaged");
    wait_for(
        "the log to be set aside",
        Duration::from_secs(30),
        || async {
            let n = std::fs::read_dir(&damaged).map(|d| d.count()).unwrap_or(0);
            (n == 1).then_some(())
        },
    )
    .await;
    wait_for(
        "registry to hear of it",
        Duration::from_secs(30),
        || async {
            protected_item(&stack.registry.url, "vm").await.filter(|i| {
                i.health_reports
                    .iter()
                    .any(|r| r.component == "cache" && r.message.contains("kept in"))
            })
        },
    )
    .await;
    write_some(&agent, &mut rng, 50).await;
    agent.stream.flushed().await;
    wait_for_point_equal_to_source(stack.at(&stack.processor.url()), "vm", &source).await;
    agent.stop(Duration::from_secs(5)).await.unwrap();
    stack.registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_trimmed_past_the_replica_is_a_gap_repaired_by_a_checksum_resync() {
    let mut stack = Stack::start().await;
    let (agent, source) = stack.protect("vm").await;
    let seed = 0x5eed_0002;
    println!("seed {seed:#x}");
    let mut rng = Rng(seed);
    let processor = stack.processor.url();
    // Enough for the cache to trim whole 64 KiB segments behind the
    // processor.
    let cache_url = stack.cache.url();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let last = loop {
        let last = write_some(&agent, &mut rng, 100).await;
        agent.stream.flushed().await;
        if log_info(stack.at(&cache_url), "vm")
            .await
            .unwrap()
            .first_sequence
            > 1
        {
            break last;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cache never trimmed"
        );
    };

    // processor-svc loses its data: the replica starts empty at sequence 1,
    // below what the cache still has.
    assert!(!stack.processor.signal_and_wait("KILL").success());
    std::fs::remove_dir_all(&stack.processor.data_dir).unwrap();
    stack.processor.restart();
    wait_serving(&processor).await;

    // Without the gap handling the processor retries OUT_OF_RANGE forever
    // and never cuts a point again.
    wait_for_point_equal_to_source(stack.at(&processor), "vm", &source).await;
    let points = list_points(stack.at(&processor), "vm").await;
    assert!(
        points.iter().all(|p| p.sequence_cut >= last),
        "no point from before the repair: {points:?}"
    );
    agent.stop(Duration::from_secs(5)).await.unwrap();
    stack.registry.stop().await;
}

async fn disable(registry: &str, vm: &str) {
    let mut r = RegistryClient::connect(registry.to_string()).await.unwrap();
    r.disable_replication(reg::DisableReplicationRequest { vm_name: vm.into() })
        .await
        .unwrap();
    wait_for("the item to go", Duration::from_secs(30), || async {
        protected_item(registry, vm).await.is_none().then_some(())
    })
    .await;
}

async fn enable(registry: &str, vm: &str) -> reg::ProtectedItem {
    let mut r = RegistryClient::connect(registry.to_string()).await.unwrap();
    r.enable_replication(reg::EnableReplicationRequest {
        vm_name: vm.into(),
        target_region: "westus".into(),
        policy_name: "fast".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_enabled_again_is_a_new_incarnation_even_for_services_that_were_down() {
    let mut stack = Stack::start().await;
    let seed = 0x5eed_0003;
    println!("seed {seed:#x}");
    let mut rng = Rng(seed);
    // VM "a" will be enabled again; "b" only disabled.
    let mut old_points = Vec::new();
    for vm in ["a", "b"] {
        let (agent, _) = stack.protect(vm).await;
        write_some(&agent, &mut rng, 50).await;
        // A second agent raises the epoch the cache keeps to 2: the new
        // incarnation's first agent (epoch 1) must still be let in.
        agent.stop(Duration::from_secs(5)).await.unwrap();
        let (agent, _) = stack.agent(vm, &format!("{vm}-agent")).await;
        let last = write_some(&agent, &mut rng, 50).await;
        agent.stream.flushed().await;
        let processor = stack.processor.url();
        wait_for("points", Duration::from_secs(60), || {
            let at = stack.at(&processor);
            async move {
                let points = points_now(at, vm).await?;
                points
                    .last()
                    .filter(|p| p.sequence_cut >= last)
                    .map(|_| points.clone())
            }
        })
        .await;
        old_points.push(list_points(stack.at(&processor), vm).await);
        agent.stop(Duration::from_secs(5)).await.unwrap();
    }
    let old_a = protected_item(&stack.registry.url, "a").await.unwrap();
    let disabled_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;

    // Both services are down while replication is disabled (and, for "a",
    // enabled again): they never see the removal.
    assert!(!stack.cache.signal_and_wait("KILL").success());
    assert!(!stack.processor.signal_and_wait("KILL").success());
    disable(&stack.registry.url, "a").await;
    disable(&stack.registry.url, "b").await;
    let new_a = enable(&stack.registry.url, "a").await;
    assert!(
        new_a.incarnation > old_a.incarnation,
        "{} then {}",
        old_a.incarnation,
        new_a.incarnation
    );
    stack.cache.restart();
    stack.processor.restart();
    wait_serving(&stack.cache.url()).await;
    wait_serving(&stack.processor.url()).await;
    let processor = stack.processor.url();
    let cache_url = stack.cache.url();

    // "b": its log and replica are deleted once the services reconcile
    // with registry.
    wait_for("b's log and replica to go", Duration::from_secs(30), || {
        let (processor, cache) = (stack.at(&processor), stack.at(&cache_url));
        async move {
            let log = log_info(cache, "b").await;
            let mut p = ProcessorClient::new(processor.as_service(ServiceKind::Failover));
            let points = p
                .list_recovery_points(pb::ListRecoveryPointsRequest {
                    vm_name: "b".into(),
                    ..Default::default()
                })
                .await;
            let log_gone = log.is_err_and(|s| s.code() == tonic::Code::NotFound);
            let replica_gone = match points {
                Err(s) => s.code() == tonic::Code::NotFound,
                Ok(r) => r.into_inner().points.is_empty(),
            };
            (log_gone && replica_gone).then_some(())
        }
    })
    .await;

    // "a": a fresh (empty) source, a new agent (epoch 1, below the old
    // log's 2): let in, streaming into a new log and a new replica.
    let source = stack.path("a.raw");
    std::fs::File::create(&source)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let (agent, _) = stack.agent("a", "a-agent-new").await;
    write_some(&agent, &mut rng, 30).await;
    agent.stream.flushed().await;
    wait_for_point_equal_to_source(stack.at(&processor), "a", &source).await;
    let info = log_info(stack.at(&cache_url), "a").await.unwrap();
    assert_eq!(info.incarnation, new_a.incarnation, "{info:?}");
    // Every point is of the new incarnation: its newest write came after
    // the disable (the old ones' came before).
    let points = list_points(stack.at(&processor), "a").await;
    assert!(!old_points[0].is_empty());
    assert!(
        points
            .iter()
            .all(|p| p.time.as_ref().is_some_and(|t| t.seconds >= disabled_at)),
        "no point of the old incarnation survives: {points:?}"
    );
    agent.stop(Duration::from_secs(5)).await.unwrap();
    stack.registry.stop().await;
}
