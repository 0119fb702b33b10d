//! The engine over fake peers and the local inventory in a tempdir: each
//! job kind's steps in their documented order, resume after a crash,
//! peers' refusals, and storage failing under a running job.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferry_proto::ids::{JobId, MacAddr, UnixNanos, VmName};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::peers::{
    Digest, Extent, Extents, Group, GroupPoint, Item, Peers, Point, PointDisk, PointKind,
    ReplicationState, SourceNic, TargetResources,
};
use super::steps::Step;
use super::Engine;
use crate::error::FailoverError;
use crate::inventory::{Backend, LocalBackend, Network, Nic, Run, Subnet, TargetVm};
use crate::jobs::{Choice, FailoverKind, JobRecord, JobState, Jobs};
use crate::requests::{FailoverRequest, Target};

type Result<T> = std::result::Result<T, FailoverError>;

const CHUNK: u64 = 64 << 10;
const DISK: u64 = 2 * CHUNK;

/// What the fake peers hold and were asked.
#[derive(Default)]
struct State {
    items: HashMap<String, Item>,
    /// Each VM's points, newest first.
    points: HashMap<String, Vec<Point>>,
    /// The effectful calls, in order.
    calls: Vec<String>,
    /// An operation to refuse, and how.
    refuse: Option<(&'static str, tonic::Code)>,
    /// An operation to stop in until released.
    hold: Option<&'static str>,
}

/// Registry, processor and cache in memory.
#[derive(Default)]
struct Fake {
    state: Mutex<State>,
    /// Told when the held operation is entered.
    entered: Notify,
    /// Lets the held operation go on.
    release: Notify,
}

/// The data of the first half of the disk; the second half is a hole.
fn data() -> Vec<u8> {
    (0..CHUNK).map(|i| (i % 251) as u8).collect()
}

fn image() -> Vec<u8> {
    let mut image = data();
    image.resize(DISK as usize, 0);
    image
}

fn vm() -> VmName {
    VmName::parse("vm").unwrap()
}

fn point(n: u64, bookmark: &str) -> Point {
    Point {
        id: format!("rp-{n}"),
        vm_name: "vm".into(),
        time: UnixNanos::now().minus(Duration::from_secs(1)),
        sequence_cut: n * 10,
        disks: vec![PointDisk {
            disk_id: "os".into(),
            size_bytes: DISK,
        }],
        bookmark_id: bookmark.into(),
    }
}

impl Fake {
    fn new() -> Arc<Fake> {
        let fake = Fake::default();
        {
            let mut s = fake.state.lock().unwrap();
            s.items.insert(
                "vm".into(),
                Item {
                    vm_name: vm(),
                    state: ReplicationState::Protected,
                    replication_group: String::new(),
                    target: TargetResources {
                        region: "westus".into(),
                        resource_group: "rg".into(),
                        virtual_network: "vnet".into(),
                        subnet: "default".into(),
                        availability_set: String::new(),
                        replica_disks: vec![("os".into(), "vm-os".into())],
                    },
                    source_disks: vec!["os".into()],
                    source_nics: vec![SourceNic {
                        name: "nic0".into(),
                        private_ip: "10.0.0.4".into(),
                        mac_address: None,
                    }],
                    os_disk: Some("os".into()),
                    shape: Default::default(),
                    incarnation: 1,
                    disks: vec![crate::engine::peers::SourceDisk {
                        id: "os".into(),
                        size_bytes: 1 << 20,
                        path: "/src/vm-os.img".into(),
                    }],
                    reprotection: None,
                },
            );
            s.points
                .insert("vm".into(), vec![point(2, ""), point(1, "")]);
        }
        Arc::new(fake)
    }

    fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    fn state_of(&self, vm: &str) -> ReplicationState {
        self.state.lock().unwrap().items[vm].state
    }

    /// Records an effectful call; refuses or holds it if asked to.
    async fn call(&self, op: &'static str, what: String) -> Result<()> {
        let (refuse, hold) = {
            let mut s = self.state.lock().unwrap();
            let refuse = s.refuse.filter(|(o, _)| *o == op).map(|(_, c)| c);
            if refuse.is_none() && !what.is_empty() {
                s.calls.push(what);
            }
            (refuse, s.hold == Some(op))
        };
        if let Some(code) = refuse {
            return Err(FailoverError::peer(
                format!("fake ({op})"),
                Status::new(code, format!("{op} refused")),
            ));
        }
        if hold {
            self.entered.notify_one();
            self.release.notified().await;
        }
        Ok(())
    }

    fn not_found(what: String) -> FailoverError {
        FailoverError::peer("fake", Status::not_found(what))
    }
}

#[tonic::async_trait]
impl Peers for Fake {
    async fn item(&self, vm: &VmName) -> Result<Item> {
        self.call("item", String::new()).await?;
        let s = self.state.lock().unwrap();
        s.items
            .get(vm.as_str())
            .cloned()
            .ok_or_else(|| Fake::not_found(format!("no item {vm}")))
    }

    async fn transition(
        &self,
        vm: &VmName,
        to: ReplicationState,
        bump_epoch: bool,
        _reason: &str,
    ) -> Result<()> {
        let bump = if bump_epoch { " +epoch" } else { "" };
        self.call(
            "transition",
            format!("transition {}{bump}", to.as_str_name()),
        )
        .await?;
        let mut s = self.state.lock().unwrap();
        if let Some(item) = s.items.get_mut(vm.as_str()) {
            item.state = to;
        }
        Ok(())
    }

    async fn group(&self, name: &str) -> Result<Group> {
        Err(Fake::not_found(format!("no group {name}")))
    }

    async fn point(&self, vm: &VmName, id: &str) -> Result<Point> {
        self.call("point", String::new()).await?;
        let s = self.state.lock().unwrap();
        s.points
            .get(vm.as_str())
            .and_then(|ps| ps.iter().find(|p| p.id == id).cloned())
            .ok_or_else(|| Fake::not_found(format!("no point {id}")))
    }

    async fn points(&self, vm: &VmName, _kind: PointKind, limit: u32) -> Result<Vec<Point>> {
        self.call("points", String::new()).await?;
        let s = self.state.lock().unwrap();
        let mut points = s.points.get(vm.as_str()).cloned().unwrap_or_default();
        if limit > 0 {
            points.truncate(limit as usize);
        }
        Ok(points)
    }

    async fn cut_point(&self, vm: &VmName) -> Result<Point> {
        self.call("cut", "cut".into()).await?;
        let mut s = self.state.lock().unwrap();
        let p = point(9, "");
        s.points
            .entry(vm.to_string())
            .or_default()
            .insert(0, p.clone());
        Ok(p)
    }

    async fn group_points(&self, _group: &str) -> Result<Vec<GroupPoint>> {
        Ok(Vec::new())
    }

    async fn pin(&self, _vm: &VmName, point: &str, _holder: &JobId) -> Result<()> {
        self.call("pin", format!("pin {point}")).await
    }

    async fn unpin(&self, _vm: &VmName, point: &str, _holder: &JobId) -> Result<()> {
        self.call("unpin", format!("unpin {point}")).await
    }

    async fn read_disk(
        &self,
        _vm: &VmName,
        point: &str,
        disk: &str,
        _offset: u64,
        _length: u64,
    ) -> Result<Extents> {
        self.call("read_disk", format!("read {point}/{disk}"))
            .await?;
        let data = Bytes::from(data());
        let extents = vec![
            Ok(Extent {
                offset: 0,
                length: CHUNK,
                crc32c: crc32c::crc32c(&data),
                data: Some(data),
            }),
            Ok(Extent {
                offset: CHUNK,
                length: CHUNK,
                data: None,
                crc32c: 0,
            }),
        ];
        Ok(Box::pin(tokio_stream::iter(extents)))
    }

    async fn disk_digest(&self, _vm: &VmName, point: &str, disk: &str) -> Result<Digest> {
        self.call("digest", format!("digest {point}/{disk}"))
            .await?;
        Ok(Digest {
            algorithm: ferry_proto::digest::ALGORITHM.into(),
            size_bytes: DISK,
            chunk_bytes: CHUNK,
            sha256: ferry_proto::digest::of_bytes(CHUNK, &image()).to_vec(),
        })
    }

    fn has_cache(&self) -> bool {
        true
    }

    async fn drain(&self, vm: &VmName, _reason: &str, marker: &JobId) -> Result<()> {
        self.call("drain", "drain".into()).await?;
        // The agent's FINAL marker arrives and the processor cuts at it.
        let mut s = self.state.lock().unwrap();
        s.points
            .entry(vm.to_string())
            .or_default()
            .insert(0, point(3, marker.as_str()));
        Ok(())
    }

    async fn reprotect(
        &self,
        vm: &VmName,
        _incarnation: u64,
        _disks: &[(String, std::path::PathBuf)],
        _job: &JobId,
    ) -> Result<Item> {
        self.call("reprotect", String::new()).await?;
        Err(Fake::not_found(format!(
            "the fake does not re-protect {vm}"
        )))
    }

    async fn complete_seed(&self, _vm: &VmName, _incarnation: u64, _summary: &str) -> Result<()> {
        self.call("complete-seed", String::new()).await
    }

    async fn seed_replica(
        &self,
        _vm: &VmName,
        _incarnation: u64,
        _distrusted: Vec<(String, u64, u64)>,
        mut chunks: tokio::sync::mpsc::Receiver<crate::engine::peers::SeedChunk>,
    ) -> Result<u64> {
        self.call("seed", String::new()).await?;
        let mut bytes = 0;
        while let Some(c) = chunks.recv().await {
            bytes += c.data.len() as u64;
        }
        Ok(bytes)
    }
}

/// An engine over `fake`, the sled db and the regions under `dir`.
fn engine(db: &sled::Db, dir: &Path, fake: &Arc<Fake>) -> (Arc<Engine>, CancellationToken) {
    let backend = LocalBackend::new(db, &dir.join("regions")).unwrap();
    let jobs = Arc::new(Jobs::open(db).unwrap());
    let shutdown = CancellationToken::new();
    let peers: Arc<dyn Peers> = fake.clone();
    let engine = Engine::new(
        peers,
        Arc::new(backend),
        jobs,
        Arc::new(crate::plans::Plans::open(db, &dir.join("plan-scripts")).unwrap()),
        crate::engine::Tuning {
            write_rate: None,
            start_timeout: Duration::from_secs(5),
            instant: None,
        },
        shutdown.clone(),
    );
    (engine, shutdown)
}

struct Setup {
    dir: tempfile::TempDir,
    db: sled::Db,
    fake: Arc<Fake>,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("index"))
        .open()
        .unwrap();
    let fake = Fake::new();
    let (engine, shutdown) = engine(&db, dir.path(), &fake);
    Setup {
        dir,
        db,
        fake,
        engine,
        shutdown,
    }
}

const DEADLINE: Duration = Duration::from_secs(20);

/// Waits until the job has ended (as watchers see it) and its VM is free.
async fn ended(engine: &Engine, job: &JobRecord) -> JobRecord {
    let mut rx = engine.jobs.watch(job).unwrap();
    let done = tokio::time::timeout(DEADLINE, rx.wait_for(|j| j.ended()))
        .await
        .expect("the job ends in time")
        .unwrap()
        .clone();
    tokio::time::timeout(DEADLINE, async {
        while !engine.busy.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the VM is released in time");
    done
}

fn failover(kind: FailoverKind, choice: Choice, network: &str) -> FailoverRequest {
    FailoverRequest {
        instant: false,
        alternate_location: false,
        target: Target::Vm(vm()),
        kind,
        choice: Some(choice),
        test_network: network.into(),
        request_id: String::new(),
    }
}

fn names(job: &JobRecord) -> Vec<&'static str> {
    job.steps.iter().map(|s| s.step.name()).collect()
}

fn succeeded(job: &JobRecord) {
    assert_eq!(job.state, JobState::Succeeded, "{job:#?}");
    assert!(job.steps.iter().all(|s| s.state == JobState::Succeeded));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplanned_failover_and_its_commit_run_their_steps_in_the_documented_order() {
    let s = setup();
    let job = s
        .engine
        .start_failover(failover(
            FailoverKind::Unplanned,
            Choice::LatestProcessed,
            "",
        ))
        .await
        .unwrap();
    let done = ended(&s.engine, &job).await;
    succeeded(&done);
    assert_eq!(
        names(&done),
        [
            "validate",
            "fence",
            "pin-point",
            "network",
            "materialize-disks",
            "create-vm",
            "start-vm",
            "update-registry"
        ]
    );
    assert_eq!(
        s.fake.calls(),
        [
            "transition REPLICATION_STATE_FAILOVER_IN_PROGRESS +epoch",
            "pin rp-2",
            "read rp-2/os",
            "digest rp-2/os",
            "transition REPLICATION_STATE_FAILED_OVER",
        ]
    );
    let vms = s.engine.backend().vms().unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!((vms[0].name.as_str(), vms[0].test), ("vm", false));
    assert_eq!(vms[0].nics[0].private_ip, "10.0.0.4");
    assert_eq!(std::fs::read(&vms[0].disks[0].path).unwrap(), image());
    assert_eq!(done.verified.len(), 1);

    let commit = s.engine.commit(vm(), String::new()).await.unwrap();
    let done = ended(&s.engine, &commit).await;
    succeeded(&done);
    assert_eq!(
        names(&done),
        ["validate", "commit-registry", "release-points"]
    );
    assert_eq!(
        s.fake.calls()[5..],
        ["transition REPLICATION_STATE_COMMITTED", "unpin rp-2"]
    );
    assert_eq!(s.fake.state_of("vm"), ReplicationState::Committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_failover_and_its_cleanup_run_their_steps_in_the_documented_order() {
    let s = setup();
    s.engine
        .backend()
        .create_network(Network {
            region: "westus".into(),
            resource_group: "rg".into(),
            name: "isolated".into(),
            subnets: vec![Subnet {
                name: "s".into(),
                address_prefix: "10.9.0.0/24".into(),
            }],
        })
        .unwrap();
    let job = s
        .engine
        .start_failover(failover(
            FailoverKind::Test,
            Choice::Point("rp-1".into()),
            "isolated",
        ))
        .await
        .unwrap();
    let done = ended(&s.engine, &job).await;
    succeeded(&done);
    assert_eq!(
        names(&done),
        [
            "validate",
            "pin-point",
            "network",
            "materialize-disks",
            "create-vm",
            "start-vm"
        ]
    );
    // Never fenced: replication goes on.
    assert_eq!(
        s.fake.calls(),
        ["pin rp-1", "read rp-1/os", "digest rp-1/os"]
    );
    assert_eq!(s.fake.state_of("vm"), ReplicationState::Protected);
    let vms = s.engine.backend().vms().unwrap();
    assert_eq!((vms[0].name.as_str(), vms[0].test), ("vm-test", true));
    assert_eq!(vms[0].virtual_network, "isolated");

    let cleanup = s.engine.cleanup_test(vm(), String::new()).await.unwrap();
    let done = ended(&s.engine, &cleanup).await;
    succeeded(&done);
    assert_eq!(names(&done), ["validate", "delete-vm", "release-points"]);
    assert_eq!(s.fake.calls()[3..], ["unpin rp-1"]);
    assert!(s.engine.backend().vms().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_failover_drains_before_it_fences_and_uses_the_final_point() {
    let s = setup();
    let job = s
        .engine
        .start_failover(failover(FailoverKind::Planned, Choice::Latest, ""))
        .await
        .unwrap();
    let done = ended(&s.engine, &job).await;
    succeeded(&done);
    assert_eq!(
        names(&done),
        [
            "validate",
            "drain",
            "fence",
            "pin-point",
            "network",
            "materialize-disks",
            "create-vm",
            "start-vm",
            "update-registry"
        ]
    );
    assert_eq!(
        s.fake.calls(),
        [
            "drain",
            "transition REPLICATION_STATE_FAILOVER_IN_PROGRESS +epoch",
            "pin rp-3",
            "read rp-3/os",
            "digest rp-3/os",
            "transition REPLICATION_STATE_FAILED_OVER",
        ]
    );
    assert_eq!(done.points[0].data_loss_nanos, 0, "nothing lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_stopped_after_a_step_resumes_at_the_next_and_never_fences_twice() {
    let s = setup();
    s.fake.state.lock().unwrap().hold = Some("read_disk");
    let job = s
        .engine
        .start_failover(failover(
            FailoverKind::Unplanned,
            Choice::LatestProcessed,
            "",
        ))
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, s.fake.entered.notified())
        .await
        .expect("materialize-disks starts");
    // The crash: this engine stops mid materialize-disks and is dropped.
    s.shutdown.cancel();
    tokio::time::timeout(DEADLINE, async {
        while !s.engine.busy.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the old engine lets go");
    drop(s.engine);
    let stored = Jobs::open(&s.db)
        .unwrap()
        .get(job.id.as_str())
        .unwrap()
        .unwrap();
    let states: Vec<JobState> = stored.steps.iter().map(|s| s.state).collect();
    use JobState::{Queued, Running, Succeeded};
    assert_eq!(
        states,
        [Succeeded, Succeeded, Succeeded, Succeeded, Running, Queued, Queued, Queued]
    );

    // A new engine over the same records resumes at materialize-disks.
    s.fake.state.lock().unwrap().hold = None;
    let (engine, _shutdown) = engine(&s.db, s.dir.path(), &s.fake);
    assert_eq!(engine.resume().unwrap(), 1);
    let done = ended(&engine, &stored).await;
    succeeded(&done);
    assert_eq!(
        s.fake.calls(),
        [
            "transition REPLICATION_STATE_FAILOVER_IN_PROGRESS +epoch",
            "pin rp-2",
            "read rp-2/os",
            "read rp-2/os",
            "digest rp-2/os",
            "transition REPLICATION_STATE_FAILED_OVER",
        ],
        "fenced and pinned once; only the unfinished step ran again"
    );
    assert_eq!(engine.backend().vms().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_refusing_fails_the_job_with_the_peers_status() {
    let s = setup();
    s.fake.state.lock().unwrap().refuse = Some(("pin", tonic::Code::PermissionDenied));
    let job = s
        .engine
        .start_failover(failover(
            FailoverKind::Unplanned,
            Choice::LatestProcessed,
            "",
        ))
        .await
        .unwrap();
    let done = ended(&s.engine, &job).await;
    assert_eq!(done.state, JobState::Failed);
    let failed: Vec<_> = done
        .steps
        .iter()
        .filter(|s| s.state == JobState::Failed)
        .map(|s| s.step)
        .collect();
    assert_eq!(failed, [Step::PinPoint]);
    assert!(done.error.starts_with("pin-point: "), "{}", done.error);
    assert!(done.error.contains("pin refused"), "{}", done.error);
    // Nothing after the failed step ran.
    assert!(!s.fake.calls().iter().any(|c| c.starts_with("read")));
    assert_eq!(stored(&s.engine, &job).steps[4].state, JobState::Queued);

    // The step's error keeps the peer's status code to the API.
    let mut again = stored(&s.engine, &job);
    let err = Step::PinPoint.run(&s.engine, &mut again).await.unwrap_err();
    assert_eq!(Status::from(err).code(), tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_save_stops_the_job_before_its_next_step() {
    let s = setup();
    s.fake.state.lock().unwrap().hold = Some("pin");
    let job = s
        .engine
        .start_failover(failover(
            FailoverKind::Unplanned,
            Choice::LatestProcessed,
            "",
        ))
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, s.fake.entered.notified())
        .await
        .expect("pin-point starts");
    // Storage fails while pin-point works: its outcome cannot be saved.
    s.engine
        .jobs
        .fail_saves
        .store(true, std::sync::atomic::Ordering::SeqCst);
    s.fake.release.notify_one();
    let done = ended(&s.engine, &job).await;
    assert_eq!(done.state, JobState::Failed, "watchers see it stopped");
    assert!(
        done.error
            .contains("cannot persist the outcome of pin-point"),
        "{}",
        done.error
    );
    assert!(
        !s.fake.calls().iter().any(|c| c.starts_with("read")),
        "no step ran after one whose outcome was not saved: {:?}",
        s.fake.calls()
    );
    // On disk it is as last saved: pin-point running, to resume there.
    let on_disk = stored(&s.engine, &job);
    assert_eq!(on_disk.state, JobState::Running);
    assert_eq!(on_disk.steps[2].state, JobState::Running);

    // Storage back, after a restart it resumes and finishes, fenced once.
    s.fake.state.lock().unwrap().hold = None;
    s.shutdown.cancel();
    drop(s.engine);
    let (engine, _shutdown) = engine(&s.db, s.dir.path(), &s.fake);
    assert_eq!(engine.resume().unwrap(), 1);
    succeeded(&ended(&engine, &on_disk).await);
    let fences = s
        .fake
        .calls()
        .iter()
        .filter(|c| c.ends_with("+epoch"))
        .count();
    assert_eq!(fences, 1);
}

/// The job as stored.
fn stored(engine: &Engine, job: &JobRecord) -> JobRecord {
    engine.jobs.get(job.id.as_str()).unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_job_with_a_damaged_kind_is_not_resumed_as_an_unplanned_failover() {
    let s = setup();
    // A legacy record (proto integers) whose failover kind was damaged.
    let record = r#"{"id":"job-1","kind":1,"failover_kind":7,"vm_name":"vm",
        "choice":"LatestProcessed","test_network":"","state":2,
        "steps":[{"name":"validate","state":3,"message":""},
                 {"name":"fence","state":1,"message":""}],
        "bytes_done":0,"bytes_total":0,"points":[],"error":"","request_id":"",
        "created_nanos":1,"finished_nanos":0,"from_state":2}"#;
    s.db.open_tree("jobs")
        .unwrap()
        .insert("job-1", record.as_bytes())
        .unwrap();
    // Kept, said, not resumed; nothing is asked of the peers.
    let resumed = s.engine.resume();
    assert!(matches!(resumed, Ok(0)), "{resumed:?}");
    assert!(s.fake.calls().is_empty(), "{:?}", s.fake.calls());
    assert!(s
        .db
        .open_tree("jobs")
        .unwrap()
        .contains_key("job-1")
        .unwrap());
    assert_eq!(s.fake.state_of("vm"), ReplicationState::Protected);
}

/// A VM "other" of the region on `network`, its one NIC holding `mac`.
fn other_vm(network: &str, mac: MacAddr) -> TargetVm {
    TargetVm {
        region: "westus".into(),
        resource_group: "rg".into(),
        name: "other".into(),
        source_vm: "other".into(),
        virtual_network: network.into(),
        availability_set: String::new(),
        nics: vec![Nic {
            name: "nic0".into(),
            subnet: "default".into(),
            private_ip: "10.0.0.9".into(),
            mac_address: Some(mac),
        }],
        disks: Vec::new(),
        point_id: "rp-1".into(),
        test: false,
        job_id: "job-other".into(),
        created_nanos: 1,
        shape: Default::default(),
        host: String::new(),
        domain: String::new(),
        console_path: String::new(),
    }
}

/// The target VM `name` the engine's backend holds.
fn target_vm(s: &Setup, name: &str) -> TargetVm {
    s.engine
        .backend()
        .vms()
        .unwrap()
        .into_iter()
        .find(|v| v.name == name)
        .unwrap()
}

fn registered_mac(s: &Setup, mac: Option<MacAddr>) {
    s.fake
        .state
        .lock()
        .unwrap()
        .items
        .get_mut("vm")
        .unwrap()
        .source_nics[0]
        .mac_address = mac;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mac_is_never_given_to_two_vms_of_a_network() {
    let unplanned = || failover(FailoverKind::Unplanned, Choice::LatestProcessed, "");
    // A registered MAC another VM on the target network holds: refused at
    // create-vm, naming the holder, nothing created.
    let s = setup();
    let mac = MacAddr::parse("mac", "52:54:00:aa:bb:cc").unwrap();
    registered_mac(&s, Some(mac));
    s.engine.backend().put_vm(other_vm("vnet", mac)).unwrap();
    let job = s.engine.start_failover(unplanned()).await.unwrap();
    let done = ended(&s.engine, &job).await;
    assert_eq!(done.state, JobState::Failed, "{done:#?}");
    assert!(
        done.error.starts_with("create-vm: ")
            && done.error.contains("52:54:00:aa:bb:cc")
            && done.error.contains("VM other"),
        "{}",
        done.error
    );
    let names: Vec<String> = s
        .engine
        .backend()
        .vms()
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["other"]);

    // On another network (a drill's isolated one) the same MAC is no
    // conflict: the failed-over NIC keeps it.
    let s = setup();
    registered_mac(&s, Some(mac));
    s.engine.backend().put_vm(other_vm("drill", mac)).unwrap();
    let done = ended(
        &s.engine,
        &s.engine.start_failover(unplanned()).await.unwrap(),
    )
    .await;
    succeeded(&done);
    let vm = target_vm(&s, "vm");
    assert_eq!(vm.nics[0].mac_address, Some(mac));

    // Unregistered: derived from the names, stepping past one another VM
    // of the region holds.
    let s = setup();
    let first = MacAddr::derived(&["vm", "nic0", "vm", "0"]);
    s.engine.backend().put_vm(other_vm("drill", first)).unwrap();
    let done = ended(
        &s.engine,
        &s.engine.start_failover(unplanned()).await.unwrap(),
    )
    .await;
    succeeded(&done);
    let vm = target_vm(&s, "vm");
    assert_eq!(
        vm.nics[0].mac_address,
        Some(MacAddr::derived(&["vm", "nic0", "vm", "1"]))
    );
}

/// The local inventory as a hypervisor would be: VMs start, and then are
/// in `state`.
struct Hypervisor {
    local: LocalBackend,
    state: Run,
}

impl Backend for Hypervisor {
    fn create_network(&self, network: Network) -> Result<Network> {
        self.local.create_network(network)
    }
    fn network(&self, region: &str, name: &str) -> Result<Option<Network>> {
        self.local.network(region, name)
    }
    fn networks(&self, region: Option<&str>) -> Result<Vec<Network>> {
        self.local.networks(region)
    }
    fn disk_path(&self, region: &str, resource_group: &str, name: &str) -> std::path::PathBuf {
        self.local.disk_path(region, resource_group, name)
    }
    fn prepare_disk(
        &self,
        region: &str,
        resource_group: &str,
        name: &str,
        size: u64,
    ) -> Result<std::path::PathBuf> {
        self.local.prepare_disk(region, resource_group, name, size)
    }
    fn delete_network(&self, region: &str, name: &str) -> Result<Option<Network>> {
        self.local.delete_network(region, name)
    }
    fn put_vm(&self, mut vm: TargetVm) -> Result<TargetVm> {
        vm.host = "test:///".into();
        vm.domain = format!("domain-{}", vm.name);
        vm.console_path = "/nonexistent/console.log".into();
        self.local.put_vm(vm)
    }
    fn record_vm(&self, vm: TargetVm) -> Result<TargetVm> {
        self.local.put_vm(vm)
    }
    fn start_vm(&self, _vm: &TargetVm) -> Result<Run> {
        Ok(Run::Running)
    }
    fn run_state(&self, _vm: &TargetVm) -> Result<Run> {
        Ok(self.state.clone())
    }
    fn vms(&self) -> Result<Vec<TargetVm>> {
        self.local.vms()
    }
    fn delete_vm(
        &self,
        region: &str,
        resource_group: &str,
        name: &str,
    ) -> Result<Option<TargetVm>> {
        self.local.delete_vm(region, resource_group, name)
    }
}

/// A test failover on a hypervisor where started VMs are in `state`,
/// the VM's shape naming `marker`; the ended job.
async fn start_on(state: Run, marker: Option<&str>) -> JobRecord {
    let s = setup();
    s.fake
        .state
        .lock()
        .unwrap()
        .items
        .get_mut("vm")
        .unwrap()
        .shape
        .ready_marker = marker.map(str::to_string);
    let backend = Hypervisor {
        local: LocalBackend::new(&s.db, &s.dir.path().join("regions")).unwrap(),
        state,
    };
    let engine = Engine::new(
        s.fake.clone(),
        Arc::new(backend),
        s.engine.jobs.clone(),
        s.engine.plans.clone(),
        crate::engine::Tuning {
            write_rate: None,
            start_timeout: Duration::from_millis(600),
            instant: None,
        },
        s.shutdown.clone(),
    );
    engine
        .backend()
        .create_network(Network {
            region: "westus".into(),
            resource_group: "drill".into(),
            name: "isolated".into(),
            subnets: vec![Subnet {
                name: "default".into(),
                address_prefix: "10.9.0.0/24".into(),
            }],
        })
        .unwrap();
    let job = engine
        .start_failover(failover(
            FailoverKind::Test,
            Choice::LatestProcessed,
            "isolated",
        ))
        .await
        .unwrap();
    ended(&engine, &job).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_vm_waits_for_the_vm_to_be_ready_and_says_why_it_is_not() {
    // Running, no marker asked for: ready.
    let done = start_on(Run::Running, None).await;
    succeeded(&done);
    let step = done.steps.last().unwrap();
    assert_eq!(step.step, Step::StartVm);
    assert!(step.message.contains("runs on test:///"), "{step:?}");
    // Stopped before it was ready: FAILED_PRECONDITION with its console.
    let done = start_on(Run::Stopped("shut off".into()), Some("READY")).await;
    assert_eq!(done.state, JobState::Failed, "{done:#?}");
    assert!(
        done.error.starts_with("start-vm: ")
            && done.error.contains("is shut off before it was ready")
            && done.error.contains("/nonexistent/console.log"),
        "{}",
        done.error
    );
    // Running without the marker on its console: the start timeout.
    let done = start_on(Run::Running, Some("READY")).await;
    assert_eq!(done.state, JobState::Failed, "{done:#?}");
    assert!(
        done.error.starts_with("start-vm: ") && done.error.contains("did not print \"READY\""),
        "{}",
        done.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instant_failover_is_refused_where_it_cannot_run_with_nothing_started() {
    let s = setup();
    let code = |e: FailoverError| Status::from(e);
    let instant = |kind| FailoverRequest {
        instant: true,
        ..failover(kind, Choice::LatestProcessed, "")
    };
    // Off: no NBD listener configured.
    let off = code(
        s.engine
            .start_failover(instant(FailoverKind::Unplanned))
            .await
            .unwrap_err(),
    );
    assert_eq!(off.code(), tonic::Code::FailedPrecondition, "{off:?}");
    assert!(off.message().contains("instant failover is off"), "{off:?}");
    // A whole group: instant failover is of one VM.
    let group = code(
        s.engine
            .start_failover(FailoverRequest {
                target: Target::Group("shop".into()),
                ..instant(FailoverKind::Unplanned)
            })
            .await
            .unwrap_err(),
    );
    assert_eq!(group.code(), tonic::Code::FailedPrecondition, "{group:?}");
    assert!(group.message().contains("of one VM"), "{group:?}");

    // On, but the target region is the local inventory's: nothing would
    // hydrate the disks.
    let peers: Arc<dyn Peers> = s.fake.clone();
    let on = Engine::new(
        peers.clone(),
        s.engine.backend.clone(),
        s.engine.jobs.clone(),
        s.engine.plans.clone(),
        crate::engine::Tuning {
            write_rate: None,
            start_timeout: Duration::from_secs(5),
            instant: Some(crate::point_exports::InstantFailover {
                exports: Arc::new(crate::point_exports::PointExports::new(
                    peers,
                    s.shutdown.clone(),
                )),
                address: "127.0.0.1:10809".parse().unwrap(),
                qemu_img: crate::overlay::QemuImg::new("qemu-img".into()),
                hydrate_mib_per_sec: 0,
            }),
        },
        s.shutdown.clone(),
    );
    let local = code(
        on.start_failover(instant(FailoverKind::Unplanned))
            .await
            .unwrap_err(),
    );
    assert_eq!(local.code(), tonic::Code::FailedPrecondition, "{local:?}");
    assert!(
        local.message().contains("not a libvirt region"),
        "{local:?}"
    );
    // Nothing was started: no job, no fencing.
    assert!(s.engine.jobs.list(None, 0).unwrap().is_empty());
    assert!(!s.fake.calls().iter().any(|c| c.starts_with("transition")));
}

#[test]
fn an_instant_failover_serves_and_hydrates_instead_of_materializing() {
    use super::steps::failover as plan;
    for kind in [
        FailoverKind::Test,
        FailoverKind::Planned,
        FailoverKind::Unplanned,
    ] {
        let (slow, instant) = (plan(kind, false), plan(kind, true));
        let swapped: Vec<Step> = slow
            .iter()
            .map(|s| match s {
                Step::MaterializeDisks => Step::ServeDisks,
                s => *s,
            })
            .collect();
        // The same steps, the disks served instead of copied, and hydrate
        // last: the job ends when the VM runs from local images only.
        assert_eq!(&instant[..instant.len() - 1], swapped.as_slice());
        assert_eq!(instant.last(), Some(&Step::Hydrate));
    }
}
