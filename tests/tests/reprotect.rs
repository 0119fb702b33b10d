//! The whole DR cycle on one VM with two disks, every write going through
//! the agent's NBD export: protect (eastus -> westus), unplanned failover,
//! commit, re-protect (westus -> eastus, the reverse replica seeded from
//! the original disks: only the chunks that differ cross), writes in
//! westus, failback (a planned failover into the original disks: only the
//! blocks that differ are written), commit, re-protect again (eastus ->
//! westus), writes, planned failover again. Every disk is compared with
//! `qemu-img compare` at every step, and the bytes that crossed regions
//! and were written are asserted against what changed.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_agent::run::{Agent, AgentOptions};
use ferry_proto::failover::v1 as fo;
use ferry_proto::registry::v1 as reg;
use ferry_testkit::{
    identical_images, protect_vm_with, protected_item, run_tool, wait_for, Cluster, ClusterOptions,
};

const OS: u64 = 8 << 20;
const DATA: u64 = 8 << 20;
/// The unit digests compare and the stream resends.
const CHUNK: u64 = 64 << 10;
/// What a digest record costs per chunk compared (4 bytes of CRC-32C),
/// with room for record framing and markers.
const DIGEST_BYTES_PER_CHUNK: u64 = 8;
/// Records, markers and ticks besides data and digests.
const OVERHEAD: u64 = 64 << 10;

async fn qemu_io(nbd: &str, disk: &str, command: &str) {
    let (target, command) = (format!("{nbd}/{disk}"), command.to_string());
    tokio::task::spawn_blocking(move || {
        run_tool("qemu-io", &["-f", "raw", "-c", &command, &target]);
    })
    .await
    .unwrap();
}

/// The VM's agent, its disks under `roots`, its NBD export on loopback.
async fn agent(registry: &str, state_dir: &Path, roots: Vec<PathBuf>) -> (Agent, String) {
    let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = nbd.local_addr().unwrap();
    let agent = Agent::start(AgentOptions::new(
        registry,
        "vm",
        nbd.into(),
        state_dir.to_path_buf(),
        roots,
    ))
    .await
    .unwrap();
    (agent, format!("nbd://{addr}"))
}

async fn item(registry: &str) -> reg::ProtectedItem {
    protected_item(registry, "vm").await.unwrap()
}

async fn wait_state(registry: &str, state: reg::ReplicationState) -> reg::ProtectedItem {
    wait_for(&format!("{state:?}"), Duration::from_secs(90), || async {
        protected_item(registry, "vm")
            .await
            .filter(|i| i.state() == state)
    })
    .await
}

/// Follows a job to its end; it must have succeeded.
async fn succeeded(url: &str, job: fo::Job) -> fo::Job {
    let (job, _) = common::finish(url, &job).await;
    assert_eq!(job.state, fo::JobState::Succeeded as i32, "{job:#?}");
    job
}

async fn failover(url: &str, kind: fo::FailoverKind, point: fo::point_choice::Choice) -> fo::Job {
    let job = common::failover(url)
        .await
        .start_failover(common::failover_request("vm", kind, point, ""))
        .await
        .unwrap()
        .into_inner();
    succeeded(url, job).await
}

async fn commit(url: &str) -> fo::Job {
    let job = common::failover(url)
        .await
        .commit_failover(fo::CommitFailoverRequest {
            target: Some(fo::commit_failover_request::Target::VmName("vm".into())),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    succeeded(url, job).await
}

async fn reprotect(url: &str) -> Result<fo::Job, tonic::Status> {
    let job = common::failover(url)
        .await
        .reprotect(fo::ReprotectRequest {
            vm_name: "vm".into(),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    Ok(succeeded(url, job).await)
}

/// The VM failover-svc made in `region`: its disks by id.
async fn disks_in(url: &str, region: &str) -> Vec<(String, PathBuf)> {
    let vms = common::target_vms(url).await;
    let vm = vms
        .iter()
        .find(|v| v.source_vm == "vm" && v.region == region && !v.test)
        .unwrap_or_else(|| panic!("no VM in {region}: {vms:#?}"));
    let mut disks: Vec<(String, PathBuf)> = vm
        .disks
        .iter()
        .map(|d| (d.disk_id.clone(), PathBuf::from(&d.path)))
        .collect();
    disks.sort();
    disks
}

fn assert_identical(a: &[(String, PathBuf)], b: &[(String, PathBuf)], when: &str) {
    assert_eq!(a.len(), b.len());
    for ((id, x), (_, y)) in a.iter().zip(b) {
        assert!(
            identical_images(x, y),
            "{when}: disk {id}: {} differs from {}",
            x.display(),
            y.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protect_failover_reprotect_failback_reprotect_and_fail_over_again() {
    let dir = tempfile::tempdir().unwrap();
    let failover_dir = dir.path().join("failover");
    let cluster = Cluster::start_options(ClusterOptions {
        failover_dir: Some(failover_dir.clone()),
        ..Default::default()
    })
    .await;
    let (registry, url) = (cluster.registry.url.clone(), cluster.failover.url.clone());
    let east = dir.path().join("east");
    std::fs::create_dir_all(&east).unwrap();
    let mut originals = Vec::new();
    for (id, size) in [("data", DATA), ("os", OS)] {
        let path = east.join(format!("{id}.raw"));
        let p = path.to_str().unwrap();
        run_tool("qemu-img", &["create", "-f", "raw", p, &size.to_string()]);
        originals.push((id.to_string(), path));
    }
    common::policy(&registry, "fast", Duration::from_secs(1)).await;
    protect_vm_with(
        &registry,
        "vm",
        &[("os", OS, &originals[1].1), ("data", DATA, &originals[0].1)],
        "fast",
    )
    .await;

    // Protected; written through the agent.
    let (a, nbd) = agent(&registry, &east.join("agent"), vec![east.clone()]).await;
    wait_state(&registry, reg::ReplicationState::Protected).await;
    qemu_io(&nbd, "os", "write -P 0x11 0 2M").await;
    qemu_io(&nbd, "data", "write -P 0x22 1M 3M").await;
    a.stream.flushed().await;

    // Unplanned failover to the newest point, then commit.
    let job = failover(
        &url,
        fo::FailoverKind::Unplanned,
        fo::point_choice::Choice::Latest(true),
    )
    .await;
    assert!(!job.original_location, "{job:#?}");
    let west = disks_in(&url, "westus").await;
    assert_identical(&west, &originals, "after the failover");
    commit(&url).await;

    // The old source is fenced but stays online: a write after the fence
    // lands on the original disk only (failback undoes it). Another
    // rewrites bytes the disk held already: its digest still matches, yet
    // it crosses again, since its agent reported it as written after the
    // fence.
    qemu_io(&nbd, "os", "write -P 0x33 1M 64k").await;
    qemu_io(&nbd, "os", "write -P 0x11 0 64k").await;
    let reported = wait_for(
        "the fenced writes reported",
        Duration::from_secs(30),
        || async {
            protected_item(&registry, "vm")
                .await
                .filter(|i| i.fenced_writes.len() == 2)
        },
    )
    .await;
    assert_eq!(
        reported
            .fenced_writes
            .iter()
            .map(|r| (r.disk_id.as_str(), r.offset, r.length))
            .collect::<Vec<_>>(),
        vec![("os", 0, CHUNK), ("os", 1 << 20, CHUNK)]
    );
    a.stop(Duration::from_secs(5)).await.unwrap();

    // Re-protect: westus -> eastus, seeded from the original disks.
    let job = reprotect(&url).await.unwrap();
    let seeded = job.bytes_written;
    assert_eq!(seeded, (2 << 20) + (3 << 20), "{job:#?}");
    let turned = item(&registry).await;
    assert_eq!(turned.state(), reg::ReplicationState::Enabling);
    assert_eq!(turned.target.as_ref().unwrap().region, "eastus");
    assert_eq!(turned.source.as_ref().unwrap().source_region, "westus");
    let r = turned.reprotection.clone().unwrap();
    assert!(r.seed_complete, "{r:?}");
    assert_eq!(r.distrusted, reported.fenced_writes);
    assert!(turned.fenced_writes.is_empty());
    let (b, nbd) = agent(
        &registry,
        &dir.path().join("west-agent"),
        vec![failover_dir.clone()],
    )
    .await;
    let protected = wait_state(&registry, reg::ReplicationState::Protected).await;
    assert!(protected.incarnation > 0 && protected.incarnation == turned.incarnation);
    // What crossed: the two chunks the fenced source wrote (one differs,
    // one is distrusted), and digests.
    let chunks = (OS + DATA) / CHUNK;
    let crossed = b.streamed_bytes();
    println!(
        "re-protect: {crossed} bytes crossed regions for {} bytes of disk ({} MiB seeded in \
         eastus); 1 chunk differed, 1 was written after the fence",
        OS + DATA,
        seeded >> 20
    );
    assert!(
        crossed <= 2 * CHUNK + chunks * DIGEST_BYTES_PER_CHUNK + OVERHEAD,
        "re-protect sent {crossed} bytes; at most two chunks, digests and markers should cross"
    );
    assert!(
        crossed >= 2 * CHUNK,
        "both chunks written after the fence crossed again, the one whose digest matches too"
    );

    // Writes in westus, then failback into the original disks.
    qemu_io(&nbd, "data", "write -P 0x44 6M 512k").await;
    let job = failover(
        &url,
        fo::FailoverKind::Planned,
        fo::point_choice::Choice::Latest(true),
    )
    .await;
    assert!(job.original_location, "{job:#?}");
    let changed = (64 << 10) + (512 << 10);
    println!(
        "failback: {} bytes written into the original disks ({} changed), {} bytes of disk",
        job.bytes_written,
        changed,
        OS + DATA
    );
    assert_eq!(job.bytes_written, changed, "{job:#?}");
    assert_identical(&originals, &west, "after the failback");
    assert_eq!(disks_in(&url, "eastus").await, originals);
    commit(&url).await;
    b.stop(Duration::from_secs(5)).await.unwrap();

    // Re-protect again: eastus -> westus, nothing differs.
    let job = reprotect(&url).await.unwrap();
    assert!(job.bytes_written > 0, "{job:#?}");
    let (c, nbd) = agent(&registry, &east.join("agent-2"), vec![east.clone()]).await;
    wait_state(&registry, reg::ReplicationState::Protected).await;
    let crossed = c.streamed_bytes();
    println!("re-protect again: {crossed} bytes crossed; nothing differed");
    assert!(
        crossed <= chunks * DIGEST_BYTES_PER_CHUNK + OVERHEAD,
        "re-protect again sent {crossed} bytes; only digests and markers should cross"
    );
    qemu_io(&nbd, "os", "write -P 0x55 3M 256k").await;
    let job = failover(
        &url,
        fo::FailoverKind::Planned,
        fo::point_choice::Choice::Latest(true),
    )
    .await;
    assert!(job.original_location, "{job:#?}");
    assert_eq!(job.bytes_written, 256 << 10, "{job:#?}");
    assert_identical(&west, &originals, "after the second planned failover");
    assert_eq!(
        item(&registry).await.state(),
        reg::ReplicationState::FailedOver
    );
    c.stop(Duration::from_secs(5)).await.unwrap();
    cluster.stop().await;
}

/// The services (failover-svc's data under `dir/failover`) and "vm" with one
/// OS disk under `dir/east`: protected, its agent running, 1 MiB of `byte`
/// written through it and durable in the cache.
struct OneDisk {
    cluster: Cluster,
    registry: String,
    url: String,
    failover_dir: PathBuf,
    source: PathBuf,
    agent: Agent,
}

async fn one_disk_vm(dir: &Path, byte: u8) -> OneDisk {
    let failover_dir = dir.join("failover");
    let cluster = Cluster::start_options(ClusterOptions {
        failover_dir: Some(failover_dir.clone()),
        ..Default::default()
    })
    .await;
    let (registry, url) = (cluster.registry.url.clone(), cluster.failover.url.clone());
    let east = dir.join("east");
    std::fs::create_dir_all(&east).unwrap();
    let source = east.join("os.raw");
    run_tool(
        "qemu-img",
        &[
            "create",
            "-f",
            "raw",
            source.to_str().unwrap(),
            &OS.to_string(),
        ],
    );
    common::policy(&registry, "fast", Duration::from_secs(1)).await;
    protect_vm_with(&registry, "vm", &[("os", OS, &source)], "fast").await;
    let (agent, nbd) = agent(&registry, &east.join("agent"), vec![east.clone()]).await;
    wait_state(&registry, reg::ReplicationState::Protected).await;
    qemu_io(&nbd, "os", &format!("write -P {byte:#x} 0 1M")).await;
    agent.stream.flushed().await;
    OneDisk {
        cluster,
        registry,
        url,
        failover_dir,
        source,
        agent,
    }
}

/// A processor-svc of its own for eastus (`[processor] endpoint`), set in
/// registry as that region's; its token and task.
async fn eastus_processor(
    cluster: &Cluster,
    dir: &Path,
) -> (
    String,
    ferry_runtime::CancellationToken,
    tokio::task::JoinHandle<Result<(), processor_svc::ServeError>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut config = ferry_runtime::ServiceConfig::in_process(dir.join("east-processor"));
    config.registry = Some(cluster.registry.url.clone());
    config.cache = Some(cluster.cache.url.clone());
    let stop = ferry_runtime::CancellationToken::new();
    let task = tokio::spawn(processor_svc::run(
        config,
        processor_svc::Settings {
            endpoint: url.clone(),
            ..Default::default()
        },
        listener,
        stop.clone(),
    ));
    ferry_testkit::wait_serving(&url).await;
    ferry_proto::registry::v1::registry_client::RegistryClient::connect(
        cluster.registry.url.clone(),
    )
    .await
    .unwrap()
    .set_region_services(reg::SetRegionServicesRequest {
        services: Some(reg::RegionServices {
            region: "eastus".into(),
            cache_endpoint: String::new(),
            processor_endpoint: url.clone(),
        }),
    })
    .await
    .unwrap();
    (url, stop, task)
}

async fn jobs(url: &str) -> Vec<fo::Job> {
    common::failover(url)
        .await
        .list_jobs(fo::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprotect_and_failback_refuse_what_they_cannot_do_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let OneDisk {
        cluster,
        registry,
        url,
        failover_dir,
        agent: a,
        ..
    } = one_disk_vm(dir.path(), 0x61).await;
    // The reverse direction's replica lives on eastus's own processor.
    let (east_url, stop_east, east_task) = eastus_processor(&cluster, dir.path()).await;

    // Re-protect of a VM that is not committed.
    let before = item(&registry).await;
    let err = reprotect(&url).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("PROTECTED"), "{err:?}");
    let after = item(&registry).await;
    assert_eq!(
        (after.revision, after.incarnation),
        (before.revision, before.incarnation)
    );
    assert!(jobs(&url).await.is_empty());

    failover(
        &url,
        fo::FailoverKind::Unplanned,
        fo::point_choice::Choice::Latest(true),
    )
    .await;
    commit(&url).await;
    // The old agent goes on serving the original disk (fenced).
    let job = reprotect(&url).await.unwrap();
    assert_eq!(job.bytes_written, 1 << 20, "{job:#?}");
    assert_eq!(item(&registry).await.processor_endpoint, east_url);
    let (b, _) = agent(
        &registry,
        &dir.path().join("west-agent"),
        vec![failover_dir],
    )
    .await;
    wait_state(&registry, reg::ReplicationState::Protected).await;

    let planned = || async {
        common::failover(&url)
            .await
            .start_failover(common::failover_request(
                "vm",
                fo::FailoverKind::Planned,
                fo::point_choice::Choice::Latest(true),
                "",
            ))
            .await
    };
    // Failback into an original disk the old agent still serves: refused,
    // nothing fenced, drained or started.
    let before = item(&registry).await;
    let err = planned().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("in use"), "{err:?}");
    assert!(err.message().contains("os.raw"), "{err:?}");
    let after = item(&registry).await;
    assert_eq!((after.state(), after.epoch), (before.state(), before.epoch));
    assert!(
        b.stream.detached().await.is_none(),
        "the agent still streams"
    );
    a.stop(Duration::from_secs(5)).await.unwrap();

    // Failback while the original region's processor is away: UNAVAILABLE
    // naming it, and nothing fenced, drained or started.
    stop_east.cancel();
    let _ = east_task.await;
    let before = item(&registry).await;
    let count = jobs(&url).await.len();
    let err = planned().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("eastus"), "{err:?}");
    assert!(err.message().contains("nothing was fenced"), "{err:?}");
    let after = item(&registry).await;
    assert_eq!(after.state(), reg::ReplicationState::Protected);
    assert_eq!(after.epoch, before.epoch);
    assert_eq!(jobs(&url).await.len(), count);
    assert!(
        b.stream.detached().await.is_none(),
        "the agent still streams"
    );
    b.stop(Duration::from_secs(5)).await.unwrap();
    cluster.stop().await;
}

/// SeedReplica takes a seed only for an item being re-protected onto it,
/// and only data that arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_is_taken_only_for_a_reprotected_item_and_only_whole() {
    use ferry_proto::processor::v1 as proc;
    use ferry_proto::registry::v1::registry_client::RegistryClient;
    let cluster = Cluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("os.raw");
    run_tool(
        "qemu-img",
        &[
            "create",
            "-f",
            "raw",
            source.to_str().unwrap(),
            &OS.to_string(),
        ],
    );
    let registry = cluster.registry.url.clone();
    let item = protect_vm_with(&registry, "vm", &[("os", OS, &source)], "").await;
    let seed = |messages: Vec<proc::SeedReplicaRequest>| {
        let url = cluster.processor.url.clone();
        async move {
            proc::processor_client::ProcessorClient::connect(url)
                .await
                .unwrap()
                .seed_replica(tokio_stream::iter(messages))
                .await
                .map(|r| r.into_inner().bytes_seeded)
        }
    };
    let open = |incarnation: u64| proc::SeedReplicaRequest {
        msg: Some(proc::seed_replica_request::Msg::Open(proc::SeedOpen {
            vm_name: "vm".into(),
            incarnation,
            distrusted: Vec::new(),
        })),
    };
    let data = |disk: &str, offset: u64, bytes: Vec<u8>, crc: u32| proc::SeedReplicaRequest {
        msg: Some(proc::seed_replica_request::Msg::Data(proc::SeedData {
            disk_id: disk.into(),
            offset,
            data: bytes.into(),
            crc32c: crc,
        })),
    };
    let block = vec![0x7fu8; 64 << 10];
    let crc = crc32c::crc32c(&block);

    // Not re-protected.
    let err = seed(vec![open(item.incarnation)]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not re-protected"), "{err:?}");

    let mut r = RegistryClient::connect(registry.clone()).await.unwrap();
    for to in [
        reg::ReplicationState::InitialReplication,
        reg::ReplicationState::Protected,
        reg::ReplicationState::FailoverInProgress,
        reg::ReplicationState::FailedOver,
        reg::ReplicationState::Committed,
    ] {
        r.transition_state(reg::TransitionStateRequest {
            vm_name: "vm".into(),
            to: to as i32,
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let turned = r
        .reprotect_item(reg::ReprotectItemRequest {
            vm_name: "vm".into(),
            incarnation: item.incarnation,
            disks: vec![reg::DiskAt {
                disk_id: "os".into(),
                path: "/west/vm-os.img".into(),
            }],
            job_id: "job-x".into(),
        })
        .await
        .unwrap()
        .into_inner();
    for (messages, code, says) in [
        (
            vec![data("os", 0, block.clone(), crc)],
            tonic::Code::InvalidArgument,
            "first message",
        ),
        (
            vec![open(item.incarnation)],
            tonic::Code::FailedPrecondition,
            "incarnation",
        ),
        (
            vec![
                open(turned.incarnation),
                data("os", 0, block.clone(), crc ^ 1),
            ],
            tonic::Code::DataLoss,
            "CRC-32C",
        ),
        (
            vec![
                open(turned.incarnation),
                data("swap", 0, block.clone(), crc),
            ],
            tonic::Code::InvalidArgument,
            "swap",
        ),
        (
            vec![open(turned.incarnation), data("os", OS, block.clone(), crc)],
            tonic::Code::InvalidArgument,
            "past the end",
        ),
    ] {
        let err = seed(messages).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(says), "{err:?}");
    }
    // Whole: taken (a seed sent again replaces the last, cut-short one).
    let bytes = seed(vec![
        open(turned.incarnation),
        data("os", 0, block.clone(), crc),
    ])
    .await
    .unwrap();
    assert_eq!(bytes, 64 << 10);
    r.complete_reprotect_seed(reg::CompleteReprotectSeedRequest {
        vm_name: "vm".into(),
        incarnation: turned.incarnation,
        summary: "test".into(),
    })
    .await
    .unwrap();
    let err = seed(vec![open(turned.incarnation)]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("seeded already"), "{err:?}");
    cluster.stop().await;
}

/// Failback to an alternate location makes a new VM in the original region
/// and leaves the original disks as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_to_an_alternate_location_leaves_the_original_disks_alone() {
    let dir = tempfile::tempdir().unwrap();
    let OneDisk {
        cluster,
        registry,
        url,
        failover_dir,
        source,
        agent: a,
        ..
    } = one_disk_vm(dir.path(), 0x71).await;
    failover(
        &url,
        fo::FailoverKind::Unplanned,
        fo::point_choice::Choice::Latest(true),
    )
    .await;
    commit(&url).await;
    a.stop(Duration::from_secs(5)).await.unwrap();
    let kept = dir.path().join("original-before.raw");
    std::fs::copy(&source, &kept).unwrap();

    reprotect(&url).await.unwrap();
    let (b, nbd) = agent(
        &registry,
        &dir.path().join("west-agent"),
        vec![failover_dir],
    )
    .await;
    wait_state(&registry, reg::ReplicationState::Protected).await;
    qemu_io(&nbd, "os", "write -P 0x72 2M 1M").await;
    let mut request = common::failover_request(
        "vm",
        fo::FailoverKind::Planned,
        fo::point_choice::Choice::Latest(true),
        "",
    );
    request.alternate_location = true;
    let (job, _) = common::succeed(&url, request).await;
    assert!(!job.original_location, "{job:#?}");
    let west = disks_in(&url, "westus").await;
    let back = disks_in(&url, "eastus").await;
    assert_ne!(back[0].1, source, "a new VM's disk, not the original");
    assert_identical(&back, &west, "the new VM in eastus");
    assert!(
        identical_images(&source, &kept),
        "the original disk was left alone"
    );
    b.stop(Duration::from_secs(5)).await.unwrap();
    cluster.stop().await;
}
