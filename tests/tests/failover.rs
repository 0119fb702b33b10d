//! Failover end to end: register → enable → initial replication → writes
//! through NBD → points → test failover (disks verified, cleanup leaves
//! nothing behind) → unplanned failover to an older point (disks equal the
//! source at that point's cut, by `qemu-img compare`) → a change of point →
//! commit; the stale agent's writes are refused. failover-svc killed
//! mid-job finishes it exactly once; a planned failover loses nothing. Bad
//! input gets precise codes.

mod common;

use common::{failover, failover_request as start, finish, succeed};

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_proto::failover::v1 as fo;
use ferry_proto::processor::v1 as pb;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_testkit::points::{cut_latest, list_points};
use ferry_testkit::{
    identical_images, protect_vm_with, protected_item, run_tool, wait_for, At, Cluster,
    ClusterOptions, Insecure,
};
use tonic::Code;

const OS: u64 = 16 << 20;
const DATA: u64 = 8 << 20;

async fn qemu_io(nbd: &str, disk: &str, commands: Vec<String>) {
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for c in commands {
        args.extend(["-c".to_string(), c]);
    }
    args.push(format!("{nbd}/{disk}"));
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_tool("qemu-io", &args)
    })
    .await
    .unwrap();
}

fn copy_sources(sources: &[(&str, PathBuf)], dir: &Path, tag: &str) -> Vec<(String, PathBuf)> {
    sources
        .iter()
        .map(|(id, path)| {
            let shadow = dir.join(format!("{tag}-{id}.raw"));
            std::fs::copy(path, &shadow).unwrap();
            (id.to_string(), shadow)
        })
        .collect()
}

/// A VM "vm" with one disk of `size` bytes whose first `data` bytes are
/// written (0x5a), protected with its agent, and a point holding it all.
async fn protected_with_data(
    cluster: &Cluster,
    dir: &Path,
    size: u64,
    data: u64,
) -> (ferry_agent::run::Agent, PathBuf, pb::RecoveryPoint) {
    let registry = cluster.registry.url.clone();
    let source = dir.join("os.raw");
    let s = source.to_str().unwrap();
    run_tool("qemu-img", &["create", "-f", "raw", s, &size.to_string()]);
    run_tool(
        "qemu-io",
        &["-f", "raw", "-c", &format!("write -P 0x5a 0 {data}"), s],
    );
    common::policy(&registry, "fast", Duration::from_secs(1)).await;
    protect_vm_with(&registry, "vm", &[("os", size, &source)], "fast").await;
    let (agent, _) = common::protected_agent(&registry, "vm", &dir.join("agent")).await;
    agent.stream.flushed().await;
    let point = cut_latest(&cluster.processor.url, "vm").await.unwrap();
    (agent, source, point)
}

/// The services in-process, registry knowing `insecure`'s admin token: a
/// failover-svc process checks its callers and asks registry about
/// operator tokens.
async fn cluster_knowing(insecure: &Insecure) -> Cluster {
    Cluster::start_options(ClusterOptions {
        registry: registry_svc::Settings {
            bootstrap_token_file: Some(insecure.admin_token_file()),
            ..Default::default()
        },
        ..Default::default()
    })
    .await
}

/// failover-svc as a real process writing at most 8 MiB/s, so that a job
/// is surely mid-way for a while.
fn slow_failover_svc(
    insecure: &Insecure,
    cluster: &Cluster,
    dir: &Path,
) -> ferry_testkit::ServiceProcess {
    let config = dir.join("failover.toml");
    std::fs::write(&config, "[failover]\nmaterialize_mib_per_sec = 8\n").unwrap();
    ferry_testkit::ServiceProcess::start(
        insecure,
        ferry_testkit::bin_path("failover-svc"),
        dir.join("failover"),
        &[
            "--registry",
            &cluster.registry.url,
            "--processor",
            &cluster.processor.url,
            "--config",
            config.to_str().unwrap(),
        ],
    )
}

/// Waits until `job` has materialized at least `bytes`.
async fn wait_mid_way(failover_at: At<'_>, job: &fo::Job, bytes: u64) {
    wait_for("the job to be mid-way", Duration::from_secs(60), || {
        let id = job.id.clone();
        async move {
            let j = failover(failover_at)
                .await
                .get_job(fo::GetJobRequest { id })
                .await
                .ok()?
                .into_inner();
            assert_ne!(
                j.state,
                fo::JobState::Succeeded as i32,
                "the job ended before it was interrupted"
            );
            (j.bytes_done >= bytes).then_some(())
        }
    })
    .await;
}

/// The audit records of the server at `url` naming VM `vm`.
async fn audit_records(url: &str, vm: &str) -> Vec<ferry_proto::audit::v1::AuditRecord> {
    ferry_proto::audit::v1::audit_client::AuditClient::connect(url.to_string())
        .await
        .unwrap()
        .list_audit_records(ferry_proto::audit::v1::ListAuditRecordsRequest {
            vm: vm.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_failover_cleanup_unplanned_failover_to_an_older_point_and_commit() {
    let cluster = Cluster::start().await;
    let registry = cluster.registry.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let sources: Vec<(&str, PathBuf)> = vec![
        ("os", dir.path().join("os.raw")),
        ("data", dir.path().join("data.raw")),
    ];
    for ((_, path), size) in sources.iter().zip([OS, DATA]) {
        let p = path.to_str().unwrap();
        run_tool("qemu-img", &["create", "-f", "raw", p, &size.to_string()]);
        run_tool("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 1M", p]);
    }
    common::policy(&registry, "fast", Duration::from_secs(1)).await;
    protect_vm_with(
        &registry,
        "vm",
        &[("os", OS, &sources[0].1), ("data", DATA, &sources[1].1)],
        "fast",
    )
    .await;
    let (agent, nbd) = common::protected_agent(&registry, "vm", &dir.path().join("agent")).await;

    // Two rounds of writes through NBD, a point and a shadow copy after each.
    let mut rounds = Vec::new();
    for round in 0..2u8 {
        qemu_io(
            &nbd,
            "os",
            vec![
                format!("write -P {} {}M 2M", 0x20 + round, 2 + 3 * round as u64),
                "write -z 0 64k".into(),
            ],
        )
        .await;
        qemu_io(
            &nbd,
            "data",
            vec![format!(
                "write -P {} {}M 1M",
                0x40 + round,
                1 + 2 * round as u64
            )],
        )
        .await;
        let last = agent.stream.flushed().await;
        let shadows = copy_sources(&sources, dir.path(), &format!("round{round}"));
        let point = cut_latest(&cluster.processor.url, "vm").await.unwrap();
        assert_eq!(point.sequence_cut, last);
        rounds.push((point, shadows));
    }
    let url = cluster.failover.url.clone();

    // Test failover into an isolated network, while replication goes on.
    common::isolated_network(&url).await;
    let (job, progress) = succeed(
        &url,
        start(
            "vm",
            fo::FailoverKind::Test,
            fo::point_choice::Choice::LatestProcessed(true),
            "isolated",
        ),
    )
    .await;
    assert_eq!(job.bytes_done, OS + DATA);
    assert!(progress >= 2, "progress was streamed");
    let newest = list_points(&cluster.processor.url, "vm")
        .await
        .pop()
        .unwrap();
    assert_eq!(job.points[0].point_id, newest.id);
    let vms = failover(&url)
        .await
        .list_target_vms(fo::ListTargetVmsRequest {
            source_vm: "vm".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert_eq!(vms.len(), 1);
    let test_vm = &vms[0];
    assert!(test_vm.test && test_vm.name == "vm-test" && test_vm.virtual_network == "isolated");
    assert_eq!(
        test_vm.nics[0].private_ip, "10.9.0.4",
        "10.0.0.4 is outside 10.9.0.0/24"
    );
    for (disk, (id, shadow)) in test_vm.disks.iter().zip(&rounds[1].1) {
        assert_eq!(&disk.disk_id, id);
        assert!(
            identical_images(Path::new(&disk.path), shadow),
            "test disk {id}"
        );
    }
    assert_eq!(
        protected_item(&registry, "vm").await.unwrap().state(),
        reg::ReplicationState::Protected,
        "replication goes on during a test failover"
    );
    // The audit trails: failover recorded the drill with its job; processor
    // the points cut and failover's pin of the one used.
    let drills = audit_records(&url, "vm").await;
    let drill_target = format!("vm/vm,job/{}", job.id);
    assert!(
        drills
            .iter()
            .any(|r| r.method == "ferry.failover.v1.Failover/StartFailover"
                && r.target == drill_target
                && r.code == "OK"),
        "{drills:#?}"
    );
    let points = audit_records(&cluster.processor.url, "vm").await;
    assert!(
        points
            .iter()
            .any(|r| r.method.ends_with("/CutRecoveryPoint") && r.target == "vm/vm"),
        "{points:#?}"
    );
    let pinned = format!("vm/vm,point/{}", job.points[0].point_id);
    assert!(
        points
            .iter()
            .any(|r| r.method.ends_with("/PinRecoveryPoint") && r.target == pinned),
        "{points:#?}"
    );
    // The drill's network cannot go while its VM is in it.
    let delete = |name: &str| fo::DeleteNetworkRequest {
        region: "westus".into(),
        name: name.into(),
    };
    let err = failover(&url)
        .await
        .delete_network(delete("isolated"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("vm-test"), "{err}");
    // Cleanup leaves nothing behind and releases the point.
    common::cleanup_test(&url, "vm").await;
    // Now it can, once; then it is unknown.
    let deleted = failover(&url)
        .await
        .delete_network(delete("isolated"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.name, "isolated");
    let err = failover(&url)
        .await
        .delete_network(delete("isolated"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    let err = failover(&url)
        .await
        .delete_network(delete(""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let left = failover(&url)
        .await
        .list_target_vms(fo::ListTargetVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert!(left.is_empty(), "{left:?}");
    for disk in &test_vm.disks {
        assert!(!Path::new(&disk.path).exists(), "{} removed", disk.path);
    }
    let p = list_points(&cluster.processor.url, "vm").await;
    assert!(p.iter().all(|p| p.pinned_by.is_empty()), "pins released");

    // Unplanned failover to the older point; idempotent by request id.
    let older = &rounds[0].0;
    let mut request = start(
        "vm",
        fo::FailoverKind::Unplanned,
        fo::point_choice::Choice::PointId(older.id.clone()),
        "",
    );
    request.request_id = "failover-1".into();
    let job = failover(&url)
        .await
        .start_failover(request.clone())
        .await
        .unwrap()
        .into_inner();
    let again = failover(&url)
        .await
        .start_failover(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.id, again.id, "a retried request gets the same job");
    let (job, _) = finish(&url, &job).await;
    assert_eq!(job.state, fo::JobState::Succeeded as i32, "{job:?}");
    assert_eq!(job.points[0].point_id, older.id);
    assert!(job.points[0].data_loss_window.is_some());
    let item = protected_item(&registry, "vm").await.unwrap();
    assert_eq!(item.state(), reg::ReplicationState::FailedOver);
    let vms = failover(&url)
        .await
        .list_target_vms(fo::ListTargetVmsRequest {
            source_vm: "vm".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert_eq!(vms.len(), 1);
    let target = &vms[0];
    assert!(!target.test && target.name == "vm" && target.point_id == older.id);
    assert_eq!(
        target.nics[0].private_ip, "10.0.0.4",
        "the source's IP is kept"
    );
    for (disk, (id, shadow)) in target.disks.iter().zip(&rounds[0].1) {
        assert!(
            identical_images(Path::new(&disk.path), shadow),
            "failed-over disk {id} equals the source at the older point"
        );
    }

    // Before commit, the point can be changed: a failover again, to the
    // newer point, replaces the VM's disks and releases the older pin.
    let newer = &rounds[1].0;
    succeed(
        &url,
        start(
            "vm",
            fo::FailoverKind::Unplanned,
            fo::point_choice::Choice::PointId(newer.id.clone()),
            "",
        ),
    )
    .await;
    let vms = failover(&url)
        .await
        .list_target_vms(fo::ListTargetVmsRequest {
            source_vm: "vm".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert_eq!(vms.len(), 1, "still one VM");
    assert_eq!(vms[0].point_id, newer.id);
    for (disk, (id, shadow)) in vms[0].disks.iter().zip(&rounds[1].1) {
        assert!(
            identical_images(Path::new(&disk.path), shadow),
            "disk {id} at the newer point"
        );
    }
    let p = list_points(&cluster.processor.url, "vm").await;
    let pins: Vec<(&str, usize)> = p
        .iter()
        .filter(|p| !p.pinned_by.is_empty())
        .map(|p| (p.id.as_str(), p.pinned_by.len()))
        .collect();
    assert_eq!(
        pins,
        vec![(newer.id.as_str(), 1)],
        "only the point in use is pinned"
    );

    // The source was fenced: the agent's replication stopped, but the VM's
    // disk stays online: what it writes now completes locally, is tracked
    // for failback, and never reaches the cache.
    let why = tokio::time::timeout(Duration::from_secs(30), agent.replication_stopped())
        .await
        .expect("the fenced agent's replication stops");
    assert!(why.contains("fenced"), "{why}");
    let before = cluster_log_last(&cluster.cache.url).await;
    agent
        .capture
        .write("os", 0, vec![0xff; 4096])
        .await
        .expect("the fenced source's write completes");
    assert!(
        agent.stream.unsent().await.data.chunks("os").contains(&0),
        "the write is tracked for failback"
    );
    agent.stop(Duration::from_secs(1)).await.unwrap();
    assert_eq!(cluster_log_last(&cluster.cache.url).await, before);

    // Commit releases the pins; a second commit has nothing to commit.
    let commit = fo::CommitFailoverRequest {
        target: Some(fo::commit_failover_request::Target::VmName("vm".into())),
        request_id: String::new(),
    };
    let job = failover(&url)
        .await
        .commit_failover(commit.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        finish(&url, &job).await.0.state,
        fo::JobState::Succeeded as i32
    );
    assert_eq!(
        protected_item(&registry, "vm").await.unwrap().state(),
        reg::ReplicationState::Committed
    );
    let p = list_points(&cluster.processor.url, "vm").await;
    assert!(
        p.iter().all(|p| p.pinned_by.is_empty()),
        "pins released at commit"
    );
    let err = failover(&url)
        .await
        .commit_failover(commit)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let jobs = failover(&url)
        .await
        .list_jobs(fo::ListJobsRequest {
            vm_name: "vm".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(
        jobs.len(),
        5,
        "test, cleanup, failover, change of point, commit"
    );
    assert_eq!(jobs[0].kind, fo::JobKind::Commit as i32, "newest first");
    cluster.stop().await;
}

async fn cluster_log_last(cache: &str) -> u64 {
    use ferry_proto::cache::v1 as cache_pb;
    cache_pb::cache_client::CacheClient::connect(cache.to_string())
        .await
        .unwrap()
        .get_log_info(cache_pb::GetLogInfoRequest {
            vm_name: "vm".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .last_sequence
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_failover_requests_get_precise_codes() {
    let cluster = Cluster::start().await;
    let registry = cluster.registry.url.clone();
    let url = cluster.failover.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("os.raw");
    std::fs::File::create(&image).unwrap().set_len(OS).unwrap();
    // "enabled": replication enabled, no agent yet (ENABLING).
    ferry_testkit::protect_vm(&registry, "enabled", &[("os", OS, &image)]).await;
    // "grouped": in a replication group.
    let mut r = RegistryClient::connect(registry.clone()).await.unwrap();
    r.create_policy(reg::CreatePolicyRequest {
        policy: Some(reg::ReplicationPolicy {
            name: "multi".into(),
            multi_vm_consistency: true,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    r.create_replication_group(reg::CreateReplicationGroupRequest {
        name: "g1".into(),
        policy_name: "multi".into(),
    })
    .await
    .unwrap();
    let mut grouped = ferry_testkit::vm::vm_spec("grouped", &[("os", OS, &image)]);
    grouped.name = "grouped".into();
    r.register_vm(reg::RegisterVmRequest { vm: Some(grouped) })
        .await
        .unwrap();
    r.enable_replication(reg::EnableReplicationRequest {
        vm_name: "grouped".into(),
        target_region: "westus".into(),
        policy_name: "multi".into(),
        replication_group: "g1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // "registered": known, replication never enabled.
    r.register_vm(reg::RegisterVmRequest {
        vm: Some(ferry_testkit::vm::vm_spec(
            "registered",
            &[("os", OS, &image)],
        )),
    })
    .await
    .unwrap();

    use fo::point_choice::Choice;
    let unplanned = |vm: &str, point: Choice| start(vm, fo::FailoverKind::Unplanned, point, "");
    let cases: Vec<(&str, fo::StartFailoverRequest, Code)> = vec![
        (
            "unknown VM",
            unplanned("nope", Choice::LatestProcessed(true)),
            Code::NotFound,
        ),
        (
            "never enabled",
            unplanned("registered", Choice::LatestProcessed(true)),
            Code::NotFound,
        ),
        (
            "not protected yet",
            unplanned("enabled", Choice::LatestProcessed(true)),
            Code::FailedPrecondition,
        ),
        (
            "one VM out of its group",
            unplanned("grouped", Choice::LatestProcessed(true)),
            Code::FailedPrecondition,
        ),
        (
            "kind unset",
            fo::StartFailoverRequest {
                kind: 0,
                ..unplanned("enabled", Choice::LatestProcessed(true))
            },
            Code::InvalidArgument,
        ),
        (
            "empty point id",
            unplanned("enabled", Choice::PointId(String::new())),
            Code::InvalidArgument,
        ),
        (
            "no target",
            fo::StartFailoverRequest {
                target: None,
                ..unplanned("x", Choice::LatestProcessed(true))
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, request, code) in cases {
        let err = failover(&url)
            .await
            .start_failover(request)
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err}");
    }
    // The rest need a protected VM with points.
    let source = dir.path().join("p.raw");
    std::fs::File::create(&source).unwrap().set_len(OS).unwrap();
    common::policy(&registry, "fast", Duration::from_secs(1)).await;
    protect_vm_with(&registry, "vm", &[("os", OS, &source)], "fast").await;
    let (agent, _) = common::protected_agent(&registry, "vm", &dir.path().join("agent")).await;
    agent.capture.write("os", 0, vec![1; 4096]).await.unwrap();
    agent.stream.flushed().await;
    let point: pb::RecoveryPoint = cut_latest(&cluster.processor.url, "vm").await.unwrap();
    assert!(!point.id.is_empty());
    let cases: Vec<(&str, fo::StartFailoverRequest, Code)> = vec![
        (
            "unknown point",
            unplanned("vm", Choice::PointId("rp-999999".into())),
            Code::NotFound,
        ),
        (
            "expired or garbage point",
            unplanned("vm", Choice::PointId("yesterday".into())),
            Code::NotFound,
        ),
        (
            "test network missing",
            start(
                "vm",
                fo::FailoverKind::Test,
                Choice::LatestProcessed(true),
                "nowhere",
            ),
            Code::NotFound,
        ),
        (
            "test network unnamed",
            start(
                "vm",
                fo::FailoverKind::Test,
                Choice::LatestProcessed(true),
                "",
            ),
            Code::InvalidArgument,
        ),
    ];
    for (what, request, code) in cases {
        let err = failover(&url)
            .await
            .start_failover(request)
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err}");
    }
    let commit = fo::CommitFailoverRequest {
        target: Some(fo::commit_failover_request::Target::VmName("vm".into())),
        request_id: String::new(),
    };
    let err = failover(&url)
        .await
        .commit_failover(commit)
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "commit with no failover: {err}"
    );
    let cleanup = fo::CleanupTestFailoverRequest {
        target: Some(fo::cleanup_test_failover_request::Target::VmName(
            "vm".into(),
        )),
        request_id: String::new(),
    };
    let err = failover(&url)
        .await
        .cleanup_test_failover(cleanup)
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "cleanup with no test failover: {err}"
    );
    let err = failover(&url)
        .await
        .get_job(fo::GetJobRequest {
            id: "job-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let bad_network = fo::CreateNetworkRequest {
        network: Some(fo::Network {
            region: "westus".into(),
            resource_group: "rg".into(),
            name: "n".into(),
            subnets: vec![fo::Subnet {
                name: "s".into(),
                address_prefix: "10.0.0.0/33".into(),
            }],
        }),
    };
    let err = failover(&url)
        .await
        .create_network(bad_network)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Nothing was created by any of it.
    let vms = failover(&url)
        .await
        .list_target_vms(fo::ListTargetVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert!(vms.is_empty());
    assert_eq!(
        protected_item(&registry, "vm").await.unwrap().state(),
        reg::ReplicationState::Protected
    );
    agent.stop(Duration::from_secs(5)).await.unwrap();
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_svc_killed_mid_job_completes_the_job_exactly_once() {
    let insecure = Insecure::new();
    let cluster = cluster_knowing(&insecure).await;
    let registry = cluster.registry.url.clone();
    let dir = tempfile::tempdir().unwrap();
    // 48 MiB of data on a 64 MiB disk, copied by initial replication.
    let (agent, source, point) =
        protected_with_data(&cluster, dir.path(), 64 << 20, 48 << 20).await;
    let mut process = slow_failover_svc(&insecure, &cluster, dir.path());
    let url = process.url();
    let at = insecure.at(&url);
    ferry_testkit::wait_serving(&url).await;
    let mut request = start(
        "vm",
        fo::FailoverKind::Unplanned,
        fo::point_choice::Choice::PointId(point.id.clone()),
        "",
    );
    request.request_id = "once".into();
    let job = failover(at)
        .await
        .start_failover(request.clone())
        .await
        .unwrap()
        .into_inner();
    wait_mid_way(at, &job, 2 << 20).await;
    assert!(!process.signal_and_wait("KILL").success());
    process.restart();
    ferry_testkit::wait_serving(&url).await;

    // Resumed: it finishes once; a retry of the request is the same job.
    let (done, _) = finish(at, &job).await;
    assert_eq!(done.state, fo::JobState::Succeeded as i32, "{done:?}");
    assert!(done
        .steps
        .iter()
        .all(|s| s.state == fo::JobState::Succeeded as i32));
    let again = failover(at)
        .await
        .start_failover(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.id, job.id);
    let jobs = failover(at)
        .await
        .list_jobs(fo::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 1, "one job");
    let vms = failover(at)
        .await
        .list_target_vms(fo::ListTargetVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert_eq!(vms.len(), 1, "one VM created");
    assert!(
        identical_images(Path::new(&vms[0].disks[0].path), &source),
        "the disk equals the source"
    );
    // Checked end to end, and the job says so: the digest is the source's.
    let want = ferry_proto::digest::hex(&ferry_proto::digest::of_bytes(
        64 << 10,
        &std::fs::read(&source).unwrap(),
    ));
    assert_eq!(done.verified_disks.len(), 1, "{done:?}");
    let verified = &done.verified_disks[0];
    assert_eq!(verified.disk_id, "os");
    assert_eq!(verified.point_id, point.id);
    assert_eq!(verified.sha256, want);
    assert_eq!(verified.path, vms[0].disks[0].path);
    assert_eq!(
        protected_item(&registry, "vm").await.unwrap().state(),
        reg::ReplicationState::FailedOver
    );
    let _ = agent.stop(Duration::from_secs(1)).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_stopped_mid_read_fails_the_failover_never_a_partial_disk() {
    let insecure = Insecure::new();
    let cluster = cluster_knowing(&insecure).await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, _, point) = protected_with_data(&cluster, dir.path(), 128 << 20, 128 << 20).await;
    // Mid-way when processor-svc stops: the processor sends extents of up
    // to 8 MiB a few ahead, so 128 MiB of data cannot all be on the way.
    let process = slow_failover_svc(&insecure, &cluster, dir.path());
    let url = process.url();
    let at = insecure.at(&url);
    ferry_testkit::wait_serving(&url).await;
    let job = failover(at)
        .await
        .start_failover(start(
            "vm",
            fo::FailoverKind::Unplanned,
            fo::point_choice::Choice::PointId(point.id.clone()),
            "",
        ))
        .await
        .unwrap()
        .into_inner();
    wait_mid_way(at, &job, 2 << 20).await;
    // processor-svc shuts down: its ReadDisk streams end.
    cluster.processor.shutdown.cancel();
    let (done, _) = finish(at, &job).await;
    assert_eq!(done.state, fo::JobState::Failed as i32, "{done:?}");
    assert!(
        done.error.starts_with("materialize-disks:"),
        "{}",
        done.error
    );
    assert!(done.verified_disks.is_empty(), "{done:?}");
    let vms = failover(at)
        .await
        .list_target_vms(fo::ListTargetVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert!(vms.is_empty(), "no VM from a partial disk: {vms:?}");
    let _ = agent.stop(Duration::from_secs(1)).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_failover_drains_the_source_and_loses_nothing() {
    let cluster = Cluster::start().await;
    let registry = cluster.registry.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("os.raw");
    std::fs::File::create(&source).unwrap().set_len(OS).unwrap();
    // Points only every 30 s: the final point is the drain's, not a timer's.
    common::policy(&registry, "slow", Duration::from_secs(30)).await;
    protect_vm_with(&registry, "vm", &[("os", OS, &source)], "slow").await;
    let (agent, _) = common::protected_agent(&registry, "vm", &dir.path().join("agent")).await;
    // Writes up to the moment of the failover, none of them awaited.
    for i in 0..64u64 {
        agent
            .capture
            .write("os", i * 128 * 1024, vec![i as u8 + 1; 64 * 1024])
            .await
            .unwrap();
    }
    let last = agent.stream.last().await;
    let url = cluster.failover.url.clone();
    let (job, _) = succeed(
        &url,
        start(
            "vm",
            fo::FailoverKind::Planned,
            fo::point_choice::Choice::Latest(true),
            "",
        ),
    )
    .await;
    assert_eq!(
        job.steps
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()[..3],
        ["validate", "drain", "fence"]
    );
    // The final point holds every write, and the marker after them.
    let point = list_points(&cluster.processor.url, "vm")
        .await
        .into_iter()
        .find(|p| p.id == job.points[0].point_id)
        .unwrap();
    assert_eq!(point.bookmark_id, job.id);
    assert_eq!(
        point.sequence_cut,
        last + 1,
        "every write, then the FINAL marker"
    );
    let window = job.points[0].data_loss_window.unwrap();
    assert_eq!((window.seconds, window.nanos), (0, 0), "zero data loss");
    // The drain is over and the stream closed: the source's writes complete
    // again (the VM is never left without its disk), tracked, never sent.
    let why = tokio::time::timeout(Duration::from_secs(10), agent.replication_stopped())
        .await
        .expect("the drained agent's replication ends");
    assert!(why.contains("FINAL marker"), "{why}");
    let vms = failover(&url)
        .await
        .list_target_vms(fo::ListTargetVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert!(
        identical_images(Path::new(&vms[0].disks[0].path), &source),
        "the failed-over disk is the source"
    );
    let after_drain = cluster_log_last(&cluster.cache.url).await;
    agent
        .capture
        .write("os", 0, vec![9; 4096])
        .await
        .expect("a write after the drain completes locally");
    assert!(agent.stream.unsent().await.data.chunks("os").contains(&0));
    assert_eq!(
        protected_item(&registry, "vm").await.unwrap().state(),
        reg::ReplicationState::FailedOver
    );
    agent.stop(Duration::from_secs(1)).await.unwrap();
    assert_eq!(cluster_log_last(&cluster.cache.url).await, after_drain);
    cluster.stop().await;
}
