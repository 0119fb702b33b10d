//! Replication groups over the agents' group port: multi-VM points never
//! show a write without the writes it depended on, on any VM of the group;
//! a coordinator dying mid-round stalls nobody past the hold bound, and the
//! next coordinator's rounds make points again.

mod common;

use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_agent::group::{Peers, ROUND_DEADLINE};
use ferry_agent::group_signature::{Signed, HEADER as SIGNATURE_HEADER};
use ferry_agent::run::Agent;
use ferry_proto::agent::v1 as agent_pb;
use ferry_proto::agent::v1::agent_group_client::AgentGroupClient;
use ferry_proto::failover::v1 as fo;
use ferry_proto::processor::v1 as proc;
use ferry_proto::registry::v1 as reg;
use ferry_testkit::group::{create_group, group, group_points, join_group};
use ferry_testkit::points::read_disk;
use ferry_testkit::{agent_command, free_addr, wait_for, AgentAuth, Cluster, Insecure};

use common::{chain_prefix, image, slot_write, DISK};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_vm_points_never_show_an_effect_without_its_cause() {
    let cluster = Cluster::start().await;
    let registry = cluster.registry.url.clone();
    let dir = tempfile::tempdir().unwrap();
    create_group(&registry, "shop", Duration::from_secs(1)).await;
    // db's write is acknowledged before app writes, app's before web writes.
    let vms = ["db", "app", "web"];
    let mut agents: Vec<Agent> = Vec::new();
    for vm in vms {
        let image = image(dir.path(), vm);
        join_group(&registry, vm, &[("os", DISK, &image)], "shop").await;
    }
    for vm in vms {
        let state = dir.path().join(format!("{vm}-state"));
        agents.push(common::protected_agent(&registry, vm, &state).await.0);
    }
    let captures: Vec<_> = agents.iter().map(|a| a.capture.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let iterations = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, iterations) = (stop.clone(), iterations.clone());
        tokio::spawn(async move {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (offset, data) = slot_write(k);
                for capture in &captures {
                    capture.write("os", offset, data.clone()).await.unwrap();
                }
                k += 1;
                iterations.store(k, Ordering::Relaxed);
            }
        })
    };

    // Beside the coordinator's round a second, rounds back to back from
    // here, through the same code, for many cuts mid-chain.
    let members: Vec<(String, String)> = agents
        .iter()
        .map(|a| (a.vm.clone(), a.group_address.clone()))
        .collect();
    assert!(members.iter().all(|(_, a)| !a.is_empty()));
    // The test coordinates as a member would: with the group's secret.
    let member = agents[0].member.clone().expect("a group member");
    let secret = wait_for("the group's secret", Duration::from_secs(30), || {
        let member = member.clone();
        async move { member.secret() }
    })
    .await;
    let mut peers = Peers::default();
    peers.set_secret(Some(secret));
    let mut committed = Vec::new();
    let mut failed = 0;
    while committed.len() < 20 {
        match ferry_agent::group::round(&mut peers, "shop", &members[0].0, &members, ROUND_DEADLINE)
            .await
        {
            Ok(r) => committed.push(r.id),
            // Colliding with the coordinator's round: ABORTED, retried.
            Err(e) => {
                failed += 1;
                assert!(failed < 40, "too many failed rounds; last: {e}");
            }
        }
        // The chain goes on between rounds, so each one cuts it mid-way.
        let from = iterations.load(Ordering::Relaxed);
        wait_for("the chain to advance", Duration::from_secs(30), || {
            let iterations = iterations.clone();
            async move { (iterations.load(Ordering::Relaxed) >= from + 10).then_some(()) }
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let total = iterations.load(Ordering::Relaxed);
    assert!(total > 100, "the chain advanced {total} iterations only");

    let processor = cluster.processor.url.clone();
    let points = wait_for(
        "a group point at every committed round",
        Duration::from_secs(120),
        || {
            let (processor, committed) = (processor.clone(), committed.clone());
            async move {
                let points = group_points(&processor, "shop").await;
                committed
                    .iter()
                    .all(|id| points.iter().any(|p| &p.bookmark_id == id))
                    .then_some(points)
            }
        },
    )
    .await;
    let mut mid_chain = 0;
    let mut prefixes: std::collections::HashMap<String, Vec<u64>> =
        std::collections::HashMap::new();
    for point in &points {
        assert_eq!(point.points.len(), 3, "one point per member");
        let mut prefix = Vec::new();
        for vm in vms {
            let p: &proc::RecoveryPoint = point
                .points
                .iter()
                .find(|p| p.vm_name == vm)
                .expect("member point");
            assert_eq!(p.kind, proc::PointKind::MultiVm as i32);
            assert_eq!(p.replication_group, "shop");
            assert_eq!(p.time, point.time, "members share the round's time");
            let image = read_disk(&processor, vm, p, "os").await;
            prefix.push(chain_prefix(&image));
        }
        assert!(
            prefix[0] >= prefix[1] && prefix[1] >= prefix[2],
            "point {}: db holds {} iterations, app {}, web {}: an effect without its cause",
            point.bookmark_id,
            prefix[0],
            prefix[1],
            prefix[2]
        );
        if prefix[2] > 0 && prefix[0] < total {
            mid_chain += 1;
        }
        prefixes.insert(point.bookmark_id.clone(), prefix);
    }
    assert!(
        mid_chain >= 10,
        "only {mid_chain} points cut the chain mid-way"
    );

    // The group fails over as a whole to one of its points (one VM alone
    // cannot); every failed-over disk holds exactly that point's writes.
    let failover_url = cluster.failover.url.clone();
    let chosen = &points[points.len() / 2];
    let alone = common::failover(&failover_url)
        .await
        .start_failover(fo::StartFailoverRequest {
            target: Some(fo::start_failover_request::Target::VmName("app".into())),
            kind: fo::FailoverKind::Unplanned as i32,
            point: None,
            test_network: String::new(),
            request_id: String::new(),
            instant: false,
            alternate_location: false,
        })
        .await
        .unwrap_err();
    assert_eq!(alone.code(), tonic::Code::FailedPrecondition, "{alone}");
    // A drill first: the whole group into an isolated network, then gone.
    common::isolated_network(&failover_url).await;
    let (drill, _) = common::succeed(
        &failover_url,
        fo::StartFailoverRequest {
            target: Some(fo::start_failover_request::Target::ReplicationGroup(
                "shop".into(),
            )),
            kind: fo::FailoverKind::Test as i32,
            point: None,
            test_network: "isolated".into(),
            request_id: String::new(),
            instant: false,
            alternate_location: false,
        },
    )
    .await;
    assert_eq!(drill.points.len(), 3, "{drill:?}");
    // The newest multi-VM point when it started: one bookmark on all three.
    let now = group_points(&processor, "shop").await;
    let used = now
        .iter()
        .find(|g| {
            drill.points.iter().all(|u| {
                g.points
                    .iter()
                    .any(|p| p.vm_name == u.vm_name && p.id == u.point_id)
            })
        })
        .expect("the drill used one group point");
    let nanos = |t: &Option<prost_types::Timestamp>| {
        t.as_ref().map(|t| (t.seconds, t.nanos)).unwrap_or_default()
    };
    assert!(
        nanos(&used.time) >= nanos(&points[0].time),
        "latest multi-VM point by default"
    );
    let tests = common::target_vms(&failover_url).await;
    assert_eq!(tests.iter().filter(|t| t.test).count(), 3);
    let cleanup = common::failover(&failover_url)
        .await
        .cleanup_test_failover(fo::CleanupTestFailoverRequest {
            target: Some(fo::cleanup_test_failover_request::Target::ReplicationGroup(
                "shop".into(),
            )),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let (cleanup, _) = common::finish(&failover_url, &cleanup).await;
    assert_eq!(cleanup.state, fo::JobState::Succeeded as i32, "{cleanup:?}");
    let left = common::target_vms(&failover_url).await;
    assert!(left.is_empty(), "{left:?}");

    let (job, _) = common::succeed(
        &failover_url,
        fo::StartFailoverRequest {
            target: Some(fo::start_failover_request::Target::ReplicationGroup(
                "shop".into(),
            )),
            kind: fo::FailoverKind::Unplanned as i32,
            point: Some(fo::PointChoice {
                choice: Some(fo::point_choice::Choice::PointId(
                    chosen.bookmark_id.clone(),
                )),
            }),
            test_network: String::new(),
            request_id: "shop-failover".into(),
            instant: false,
            alternate_location: false,
        },
    )
    .await;
    assert_eq!(job.replication_group, "shop");
    assert_eq!(job.points.len(), 3, "{job:?}");
    let vms_after = common::target_vms(&failover_url).await;
    let expected = &prefixes[&chosen.bookmark_id];
    for (i, vm) in vms.iter().enumerate() {
        let target = vms_after
            .iter()
            .find(|t| t.source_vm == *vm && !t.test)
            .expect("failed-over VM");
        let used = job.points.iter().find(|u| u.vm_name == *vm).unwrap();
        let at_bookmark = chosen.points.iter().find(|p| p.vm_name == *vm).unwrap();
        assert_eq!(used.point_id, at_bookmark.id);
        let image = std::fs::read(&target.disks[0].path).unwrap();
        assert_eq!(chain_prefix(&image), expected[i], "{vm}");
    }
    // The points in use stay pinned until the commit.
    let pins = |vm: String, id: String| {
        let processor = processor.clone();
        async move {
            ferry_testkit::points::list_points(&processor, &vm)
                .await
                .into_iter()
                .find(|p| p.id == id)
                .map(|p| p.pinned_by)
                .unwrap_or_default()
        }
    };
    for used in &job.points {
        let pinned = pins(used.vm_name.clone(), used.point_id.clone()).await;
        assert!(!pinned.is_empty(), "{}: {pinned:?}", used.vm_name);
    }
    let commit = common::failover(&failover_url)
        .await
        .commit_failover(fo::CommitFailoverRequest {
            target: Some(fo::commit_failover_request::Target::ReplicationGroup(
                "shop".into(),
            )),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let (commit, _) = common::finish(&failover_url, &commit).await;
    assert_eq!(commit.state, fo::JobState::Succeeded as i32, "{commit:?}");
    for vm in vms {
        let item = ferry_testkit::protected_item(&registry, vm).await.unwrap();
        assert_eq!(
            item.state(),
            ferry_proto::registry::v1::ReplicationState::Committed
        );
    }
    for used in &job.points {
        let pinned = pins(used.vm_name.clone(), used.point_id.clone()).await;
        assert!(
            pinned.is_empty(),
            "{}: still pinned by {pinned:?}",
            used.vm_name
        );
    }
    for a in agents {
        // Fenced by the failover: the stream has ended.
        let _ = a.stop(Duration::from_secs(1)).await;
    }
}

/// An agent binary in its own process, to be killed.
struct AgentProcess {
    child: Child,
    /// Its token's file, kept while it runs.
    _token: Insecure,
}

impl AgentProcess {
    /// With an agent token, as a deployment's agent has (the in-process
    /// services check nobody).
    fn start(registry: &str, vm: &str, state: &Path) -> AgentProcess {
        let insecure = Insecure::new();
        let child = agent_command(registry, vm, AgentAuth::Token(&insecure))
            .args(["--nbd-listen", &free_addr().to_string()])
            .args(["--group-listen", "127.0.0.1:0", "--drain-secs", "1"])
            .arg("--state-dir")
            .arg(state)
            // The tests put the images beside the state directory.
            .arg("--disk-root")
            .arg(state.parent().unwrap())
            .spawn()
            .unwrap();
        AgentProcess {
            child,
            _token: insecure,
        }
    }

    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_dying_mid_round_holds_writes_no_longer_than_the_bound() {
    let cluster = Cluster::start().await;
    let registry = cluster.registry.url.clone();
    let processor = cluster.processor.url.clone();
    let dir = tempfile::tempdir().unwrap();
    create_group(&registry, "erp", Duration::from_secs(1)).await;
    for vm in ["erp-a", "erp-b", "erp-c"] {
        let image = image(dir.path(), vm);
        join_group(&registry, vm, &[("os", DISK, &image)], "erp").await;
    }
    // The first member coordinates; its agent is a process of its own.
    assert_eq!(group(&registry, "erp").await.coordinator, "erp-a");
    let mut a = AgentProcess::start(&registry, "erp-a", &dir.path().join("a"));
    let (b, _) = common::protected_agent(&registry, "erp-b", &dir.path().join("b")).await;
    let (c, _) = common::protected_agent(&registry, "erp-c", &dir.path().join("c")).await;
    wait_for("a group point under erp-a", Duration::from_secs(60), || {
        let processor = processor.clone();
        async move { group_points(&processor, "erp").await.first().cloned() }
    })
    .await;

    // A coordinator prepares a round on b and c, then dies before Commit.
    // Its calls are signed with the group's secret, as erp-a's would be.
    let member = b.member.clone().expect("group member");
    let secret = wait_for("the group's secret", Duration::from_secs(30), || {
        let member = member.clone();
        async move { member.secret() }
    })
    .await;
    let sign = |message: Signed<'_>| {
        let signature = secret
            .sign(&message, "erp-a", now_nanos())
            .expect("a signature");
        tonic::metadata::MetadataValue::try_from(signature).expect("ASCII")
    };
    let hold = Duration::from_secs(1);
    for agent in [&b, &c] {
        let client = AgentGroupClient::connect(format!("http://{}", agent.group_address))
            .await
            .unwrap();
        // The real coordinator's round may be holding for a moment.
        wait_for("the lost round's Prepare", Duration::from_secs(10), || {
            let mut client = client.clone();
            let prepare = agent_pb::PrepareRequest {
                replication_group: "erp".into(),
                round_id: "lost-round".into(),
                coordinator: "erp-a".into(),
                hold: Some(ferry_runtime::time::to_duration(hold)),
            };
            let mut request = tonic::Request::new(prepare.clone());
            request.metadata_mut().insert(
                SIGNATURE_HEADER,
                sign(Signed::Prepare {
                    group: "erp",
                    round_id: "lost-round",
                    coordinator: "erp-a",
                    hold_nanos: hold.as_nanos(),
                }),
            );
            async move { client.prepare(request).await.ok() }
        })
        .await;
    }
    a.kill();
    let killed_at = now_nanos();
    // Writes wait for the hold to end by itself, then go on.
    let (offset, data) = slot_write(7);
    tokio::time::timeout(
        ferry_agent::group::MAX_HOLD + Duration::from_secs(10),
        b.capture.write("os", offset, data),
    )
    .await
    .expect("a write on erp-b completes once the hold has ended")
    .unwrap();
    for agent in [&b, &c] {
        let member = agent.member.clone().expect("group member");
        wait_for("the hold to end by itself", Duration::from_secs(10), || {
            let member = member.clone();
            async move { (member.expired_holds() >= 1).then_some(()) }
        })
        .await;
        let mut client = AgentGroupClient::connect(format!("http://{}", agent.group_address))
            .await
            .unwrap();
        let mut request = tonic::Request::new(agent_pb::CommitRequest {
            replication_group: "erp".into(),
            round_id: "lost-round".into(),
            time_unix_nanos: killed_at,
        });
        request.metadata_mut().insert(
            SIGNATURE_HEADER,
            sign(Signed::Commit {
                group: "erp",
                round_id: "lost-round",
                time_unix_nanos: killed_at,
            }),
        );
        let late = client.commit(request).await.unwrap_err();
        assert_eq!(late.code(), tonic::Code::FailedPrecondition, "{late}");
    }

    // Registry passes the role on once erp-a is silent past the lease; with
    // erp-a's agent back, the new coordinator's rounds cover the group.
    wait_for("a new coordinator", Duration::from_secs(30), || {
        let registry = registry.clone();
        async move {
            let g = group(&registry, "erp").await;
            (g.coordinator != "erp-a").then_some(g)
        }
    })
    .await;
    assert_eq!(group(&registry, "erp").await.coordinator, "erp-b");
    // Without erp-a's agent the group gets no multi-VM points, and the
    // members' health says why.
    let group_health = |health: reg::ReplicationHealth| {
        let registry = registry.clone();
        move || {
            let registry = registry.clone();
            async move {
                let item = ferry_testkit::protected_item(&registry, "erp-c").await?;
                item.health_reports
                    .into_iter()
                    .find(|r| r.component == "group" && r.health == health as i32)
            }
        }
    };
    let warning = wait_for(
        "a group warning",
        Duration::from_secs(30),
        group_health(reg::ReplicationHealth::Warning),
    )
    .await;
    assert!(warning.message.contains("erp-a"), "{}", warning.message);
    let _a = AgentProcess::start(&registry, "erp-a", &dir.path().join("a"));
    let point = wait_for(
        "a group point after the kill",
        Duration::from_secs(120),
        || {
            let processor = processor.clone();
            async move {
                group_points(&processor, "erp").await.into_iter().find(|p| {
                    p.time.as_ref().is_some_and(|t| {
                        (t.seconds as u64) * 1_000_000_000 + t.nanos as u64 > killed_at
                    })
                })
            }
        },
    )
    .await;
    assert_eq!(point.points.len(), 3);
    assert!(point.points.iter().all(|p| p.bookmark_id != "lost-round"));
    wait_for(
        "the group healthy again",
        Duration::from_secs(30),
        group_health(reg::ReplicationHealth::Normal),
    )
    .await;
    b.stop(Duration::from_secs(5)).await.unwrap();
    c.stop(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_agents_share_multi_vm_points() {
    let cluster = Cluster::start().await;
    let registry = cluster.registry.url.clone();
    let processor = cluster.processor.url.clone();
    let dir = tempfile::tempdir().unwrap();
    create_group(&registry, "fleet", Duration::from_secs(1)).await;
    let vms: Vec<String> = (0..20).map(|i| format!("node-{i:02}")).collect();
    for vm in &vms {
        let image = image(dir.path(), vm);
        join_group(&registry, vm, &[("os", DISK, &image)], "fleet").await;
    }
    let mut agents = Vec::new();
    for vm in &vms {
        let state = dir.path().join(format!("{vm}-state"));
        agents.push(common::protected_agent(&registry, vm, &state).await.0);
    }
    // The group port answers grpcurl, with health and reflection.
    let address = agents[0].group_address.clone();
    tokio::task::spawn_blocking(move || {
        ferry_testkit::assert_reflection_and_health(&address, ferry_agent::group::SERVICE_NAME)
    })
    .await
    .unwrap();
    // Each VM writes iteration i of the chain (i = its index), then the
    // group needs a point taken after all of them.
    for (i, agent) in agents.iter().enumerate() {
        for k in 0..=i as u64 {
            let (offset, data) = slot_write(k);
            agent.capture.write("os", offset, data).await.unwrap();
        }
    }
    let written = now_nanos();
    let point = wait_for("a group point of 20 VMs", Duration::from_secs(120), || {
        let processor = processor.clone();
        async move {
            group_points(&processor, "fleet")
                .await
                .into_iter()
                .find(|p| {
                    p.time.as_ref().is_some_and(|t| {
                        (t.seconds as u64) * 1_000_000_000 + t.nanos as u64 > written
                    })
                })
        }
    })
    .await;
    assert_eq!(point.points.len(), 20);
    for (i, vm) in vms.iter().enumerate() {
        let p = point.points.iter().find(|p| &p.vm_name == vm).unwrap();
        let image = read_disk(&processor, vm, p, "os").await;
        assert_eq!(chain_prefix(&image), i as u64 + 1, "{vm}");
    }
    for a in agents {
        a.stop(Duration::from_secs(5)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planned_group_failover_loses_no_write_of_any_member() {
    let cluster = Cluster::start().await;
    let registry = cluster.registry.url.clone();
    let dir = tempfile::tempdir().unwrap();
    create_group(&registry, "pair", Duration::from_secs(30)).await;
    let vms = ["pair-a", "pair-b"];
    let mut images = Vec::new();
    for vm in vms {
        let image = image(dir.path(), vm);
        join_group(&registry, vm, &[("os", DISK, &image)], "pair").await;
        images.push(image);
    }
    let mut agents = Vec::new();
    for vm in vms {
        let state = dir.path().join(format!("{vm}-state"));
        agents.push(common::protected_agent(&registry, vm, &state).await.0);
    }
    // Writes on both up to the failover, none of them awaited by the cache.
    for k in 0..200 {
        for agent in &agents {
            let (offset, data) = slot_write(k);
            agent.capture.write("os", offset, data).await.unwrap();
        }
    }
    let url = cluster.failover.url.clone();
    let (job, _) = common::succeed(
        &url,
        fo::StartFailoverRequest {
            target: Some(fo::start_failover_request::Target::ReplicationGroup(
                "pair".into(),
            )),
            kind: fo::FailoverKind::Planned as i32,
            point: None,
            test_network: String::new(),
            request_id: String::new(),
            instant: false,
            alternate_location: false,
        },
    )
    .await;
    assert_eq!(job.points.len(), 2, "{job:?}");
    for used in &job.points {
        let window = used.data_loss_window.unwrap();
        assert_eq!((window.seconds, window.nanos), (0, 0), "zero data loss");
    }
    let targets = common::target_vms(&url).await;
    for (vm, image) in vms.iter().zip(&images) {
        let target = targets.iter().find(|t| t.source_vm == *vm).unwrap();
        assert!(
            ferry_testkit::identical_images(Path::new(&target.disks[0].path), image),
            "{vm}: the failed-over disk is the source"
        );
    }
    for a in agents {
        let _ = a.stop(Duration::from_secs(1)).await;
    }
}

/// A group port without TLS checks no caller: the agent serves it beyond
/// loopback only when told to (`--group-insecure`), and a refused start
/// serves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_group_port_beyond_loopback_needs_insecure() {
    use ferry_agent::run::{AgentOptions, GroupPort, RunError};
    let cluster = Cluster::start().await;
    let registry = cluster.registry.url.clone();
    let dir = tempfile::tempdir().unwrap();
    create_group(&registry, "lan", Duration::from_secs(30)).await;
    let image = image(dir.path(), "lan-a");
    join_group(&registry, "lan-a", &[("os", DISK, &image)], "lan").await;
    let options = |insecure: bool, nbd: tokio::net::TcpListener, group| AgentOptions {
        registry: registry.clone(),
        vm: "lan-a".into(),
        nbd: nbd.into(),
        group: GroupPort::Bound(group),
        group_tls: None,
        group_insecure: insecure,
        enrollment_token: None,
        group_address: String::new(),
        state_dir: dir.path().join("lan-a-state"),
        disk_roots: vec![dir.path().to_path_buf()],
        limits: Default::default(),
        nbd_limits: Default::default(),
        attached: false,
        heartbeat: ferry_agent::health::HEARTBEAT,
        scripts: None,
        credentials: Default::default(),
    };
    let bind = |a: &'static str| async move { tokio::net::TcpListener::bind(a).await.unwrap() };

    let nbd = bind("127.0.0.1:0").await;
    let nbd_addr = nbd.local_addr().unwrap();
    match Agent::start(options(false, nbd, bind("0.0.0.0:0").await)).await {
        Err(e @ RunError::GroupPlaintext { .. }) => {
            assert!(e.to_string().contains("--group-insecure"), "{e}")
        }
        Err(e) => panic!("refused for the wrong reason: {e}"),
        Ok(_) => panic!("a plaintext group port on 0.0.0.0 was served"),
    }
    // Its NBD export is not served either.
    assert!(tokio::net::TcpStream::connect(nbd_addr).await.is_err());

    let agent = Agent::start(options(
        true,
        bind("127.0.0.1:0").await,
        bind("0.0.0.0:0").await,
    ))
    .await
    .unwrap();
    assert!(!agent.group_address.is_empty());
    assert!(
        !agent.group_address.contains("://"),
        "{}",
        agent.group_address
    );
    agent.stop(Duration::from_secs(5)).await.unwrap();
}
