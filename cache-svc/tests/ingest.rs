//! cache-svc over real gRPC: records acknowledged only when durable, served
//! back in order by Tail (also live), every bad input refused with its status
//! and the log unchanged, trimming below the applied sequence, a real
//! cache-svc process killed with SIGKILL mid-stream losing nothing it acked,
//! and control messages (resync, bookmark, stop on fencing or disable).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::time::Duration;

use ferry_proto::cache::v1 as pb;
use ferry_proto::cache::v1::cache_client::CacheClient;
use ferry_proto::cache::v1::record::Op;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::security::ServiceKind;
use ferry_runtime::{CancellationToken, ServiceConfig};
use ferry_testkit::{
    protected_item, start_registry, wait_for, wait_serving, At, Insecure, Running, ServiceProcess,
    SmallFs,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const DISK: u64 = 4 << 20;

/// A deterministic record for `seq`: what it writes depends only on `seq`.
fn record(seq: u64) -> pb::Record {
    let op = match seq % 7 {
        3 => Op::Trim(pb::ZeroOp {
            offset: (seq % 64) * 4096,
            length: 8192,
        }),
        5 => Op::WriteZeroes(pb::ZeroOp {
            offset: (seq % 64) * 4096,
            length: 4096,
        }),
        _ => Op::Write(pb::WriteOp {
            offset: (seq % 1000) * 4096,
            data: vec![(seq % 251) as u8; 4096].into(),
        }),
    };
    let mut r = pb::Record {
        sequence: seq,
        disk_id: if seq.is_multiple_of(2) { "os" } else { "data" }.into(),
        op: Some(op),
        crc32c: 0,
        captured_at_unix_nanos: seq,
    };
    ferry_proto::checksum::seal(&mut r);
    r
}

fn batch(records: Vec<pb::Record>) -> pb::IngestRequest {
    pb::IngestRequest {
        msg: Some(pb::ingest_request::Msg::Batch(pb::RecordBatch {
            records,
            traces: Vec::new(),
        })),
    }
}

/// What registry gave the VM's agent.
#[derive(Clone)]
struct Cred {
    epoch: u64,
    credential: String,
}

fn open(vm: &str, cred: &Cred) -> pb::IngestRequest {
    pb::IngestRequest {
        msg: Some(pb::ingest_request::Msg::Open(pb::IngestOpen {
            vm_name: vm.into(),
            credential: cred.credential.clone(),
            epoch: cred.epoch,
        })),
    }
}

/// Registers and protects `vm` with disks "os" and "data"; returns what its
/// agent got.
async fn protect(registry_url: &str, vm: &str) -> Cred {
    let mut r = RegistryClient::connect(registry_url.to_string())
        .await
        .unwrap();
    let disk = |id: &str, role: reg::DiskRole| reg::Disk {
        id: id.into(),
        size_bytes: DISK,
        role: role as i32,
        storage: reg::DiskStorage::Managed as i32,
        source_path: format!("/images/{vm}-{id}.raw"),
    };
    r.register_vm(reg::RegisterVmRequest {
        vm: Some(reg::Vm {
            name: vm.into(),
            source_region: "eastus".into(),
            resource_group: "rg".into(),
            virtual_network: "net".into(),
            subnet: "sub".into(),
            nics: vec![reg::Nic {
                name: "nic0".into(),
                private_ip: "10.0.0.4".into(),
                mac_address: String::new(),
            }],
            disks: vec![
                disk("os", reg::DiskRole::Os),
                disk("data", reg::DiskRole::Data),
            ],
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    r.enable_replication(reg::EnableReplicationRequest {
        vm_name: vm.into(),
        target_region: "westus".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    register_agent(registry_url, vm).await
}

async fn register_agent(registry_url: &str, vm: &str) -> Cred {
    let mut r = RegistryClient::connect(registry_url.to_string())
        .await
        .unwrap();
    let grant = r
        .register_agent(reg::RegisterAgentRequest {
            vm_name: vm.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    Cred {
        epoch: grant.epoch,
        credential: grant.credential,
    }
}

/// An open ingest stream.
struct Stream {
    tx: mpsc::Sender<pb::IngestRequest>,
    rx: tonic::Streaming<pb::IngestResponse>,
}

impl Stream {
    /// As `vm`'s agent (with the cache's credentials, if any).
    async fn open<'a>(
        cache: impl Into<At<'a>>,
        vm: &str,
        cred: &Cred,
    ) -> Result<(Stream, u64), tonic::Status> {
        let mut client = CacheClient::new(cache.into().channel(|i| i.agent(vm)));
        let (tx, rx) = mpsc::channel(16);
        tx.send(open(vm, cred)).await.unwrap();
        let mut rx = client.ingest(ReceiverStream::new(rx)).await?.into_inner();
        match rx.message().await?.and_then(|m| m.msg) {
            Some(pb::ingest_response::Msg::Opened(o)) => {
                Ok((Stream { tx, rx }, o.durable_sequence))
            }
            other => panic!("expected opened, got {other:?}"),
        }
    }

    /// Sends a batch and returns the ack's durable sequence, or the status
    /// that ended the stream.
    async fn send(&mut self, records: Vec<pb::Record>) -> Result<u64, tonic::Status> {
        if self.tx.send(batch(records)).await.is_err() {
            return Err(tonic::Status::unavailable("stream closed"));
        }
        loop {
            match self.rx.message().await?.and_then(|m| m.msg) {
                Some(pb::ingest_response::Msg::Ack(a)) => return Ok(a.durable_sequence),
                Some(_) => continue,
                None => return Err(tonic::Status::unavailable("stream ended")),
            }
        }
    }
}

impl Stream {
    /// The next message that is not an ack (within 10 s); Err with the
    /// status that ended the stream.
    async fn next_control(&mut self) -> Result<pb::ingest_response::Msg, tonic::Status> {
        let next = async {
            loop {
                match self.rx.message().await?.and_then(|m| m.msg) {
                    Some(pb::ingest_response::Msg::Ack(_)) => continue,
                    Some(other) => return Ok(other),
                    None => return Err(tonic::Status::unavailable("stream ended")),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), next)
            .await
            .expect("a control message within 10 s")
    }
}

async fn send_control<'a>(
    cache: impl Into<At<'a>>,
    vm: &str,
    control: Option<pb::send_control_request::Control>,
) -> Result<u64, tonic::Status> {
    CacheClient::new(cache.into().as_service(ServiceKind::Processor))
        .send_control(pb::SendControlRequest {
            vm_name: vm.into(),
            control,
        })
        .await
        .map(|r| r.into_inner().agent_epoch)
}

async fn transition(registry_url: &str, vm: &str, to: reg::ReplicationState, bump_epoch: bool) {
    RegistryClient::connect(registry_url.to_string())
        .await
        .unwrap()
        .transition_state(reg::TransitionStateRequest {
            vm_name: vm.into(),
            to: to as i32,
            bump_epoch,
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn tail_all<'a>(
    cache: impl Into<At<'a>>,
    vm: &str,
    from: u64,
) -> Result<Vec<pb::Record>, tonic::Status> {
    let mut client = CacheClient::new(cache.into().as_service(ServiceKind::Processor));
    let mut stream = client
        .tail(pb::TailRequest {
            vm_name: vm.into(),
            from_sequence: from,
            follow: false,
            max_batch_bytes: 64 * 1024,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(resp) = stream.message().await? {
        out.extend(resp.batch.unwrap_or_default().records);
    }
    Ok(out)
}

async fn info<'a>(cache: impl Into<At<'a>>, vm: &str) -> pb::LogInfo {
    CacheClient::new(cache.into().as_service(ServiceKind::Processor))
        .get_log_info(pb::GetLogInfoRequest { vm_name: vm.into() })
        .await
        .unwrap()
        .into_inner()
}

struct InProcess {
    registry: Running,
    cache_url: String,
    cache_shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

async fn in_process(segment_bytes: u64, max_message_bytes: usize) -> InProcess {
    let settings = cache_svc::Settings {
        segment_bytes,
        ..Default::default()
    };
    in_process_with(settings, max_message_bytes).await
}

async fn in_process_with(settings: cache_svc::Settings, max_message_bytes: usize) -> InProcess {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cache_url = format!("http://{}", listener.local_addr().unwrap());
    let registry = start_registry(dir.path().join("registry"), Some(cache_url.clone())).await;
    let mut config = ServiceConfig::in_process(dir.path().join("cache"));
    config.registry = Some(registry.url.clone());
    config.limits.max_message_bytes = max_message_bytes;
    let cache_shutdown = CancellationToken::new();
    tokio::spawn(cache_svc::run(
        config,
        settings,
        listener,
        cache_shutdown.clone(),
    ));
    wait_serving(&cache_url).await;
    InProcess {
        registry,
        cache_url,
        cache_shutdown,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_records_come_back_in_order_and_live() {
    let env = in_process(256 * 1024, 16 << 20).await;
    let cred = protect(&env.registry.url, "vm1").await;
    let (mut s, durable) = Stream::open(&env.cache_url, "vm1", &cred).await.unwrap();
    assert_eq!(durable, 0);

    // A follower started before anything is written sees everything live.
    let mut client = CacheClient::connect(env.cache_url.clone()).await.unwrap();
    let mut live = client
        .tail(pb::TailRequest {
            vm_name: "vm1".into(),
            from_sequence: 1,
            follow: true,
            max_batch_bytes: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let mut seq = 1;
    for size in [1, 10, 50, 100] {
        let records: Vec<_> = (seq..seq + size).map(record).collect();
        seq += size;
        assert_eq!(s.send(records).await.unwrap(), seq - 1);
    }
    // A resend of durable records is dropped, not stored twice.
    assert_eq!(
        s.send((100..=161).map(record).collect()).await.unwrap(),
        161
    );

    let all = tail_all(&env.cache_url, "vm1", 1).await.unwrap();
    assert_eq!(all.len(), 161);
    for (i, r) in all.iter().enumerate() {
        assert_eq!(*r, record(i as u64 + 1));
    }
    let from_middle = tail_all(&env.cache_url, "vm1", 77).await.unwrap();
    assert_eq!(from_middle.first().map(|r| r.sequence), Some(77));
    assert_eq!(from_middle.len(), 85);

    let mut seen = Vec::new();
    while seen.len() < 161 {
        let resp = tokio::time::timeout(Duration::from_secs(10), live.message())
            .await
            .expect("live records within 10 s")
            .unwrap()
            .unwrap();
        seen.extend(resp.batch.unwrap().records.into_iter().map(|r| r.sequence));
    }
    assert_eq!(seen, (1..=161).collect::<Vec<_>>());
    let i = info(&env.cache_url, "vm1").await;
    assert_eq!(
        (i.first_sequence, i.last_sequence, i.epoch),
        (1, 161, cred.epoch)
    );
    assert!(i.segments > 1, "rolled over at 256 KiB: {i:?}");
    env.cache_shutdown.cancel();
    env.registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_status_and_the_log_is_unchanged() {
    let env = in_process(1 << 20, 256 * 1024).await;
    let cred = protect(&env.registry.url, "vm2").await;
    let (mut s, _) = Stream::open(&env.cache_url, "vm2", &cred).await.unwrap();
    assert_eq!(s.send((1..=5).map(record).collect()).await.unwrap(), 5);
    drop(s);
    let before = tail_all(&env.cache_url, "vm2", 1).await.unwrap();

    let write = |offset: u64, len: usize| {
        let mut r = pb::Record {
            sequence: 6,
            disk_id: "os".into(),
            op: Some(Op::Write(pb::WriteOp {
                offset,
                data: vec![1; len].into(),
            })),
            ..Default::default()
        };
        ferry_proto::checksum::seal(&mut r);
        r
    };
    let mut wrong_crc = write(0, 512);
    wrong_crc.crc32c ^= 0xdead;
    let mut unknown_disk = write(0, 512);
    unknown_disk.disk_id = "swap".into();
    ferry_proto::checksum::seal(&mut unknown_disk);
    let cases: Vec<(&str, Vec<pb::Record>, Code)> = vec![
        (
            "write past the disk's end",
            vec![write(DISK, 512)],
            Code::InvalidArgument,
        ),
        (
            "write straddling the end",
            vec![write(DISK - 512, 1024)],
            Code::InvalidArgument,
        ),
        (
            "unaligned offset",
            vec![write(100, 512)],
            Code::InvalidArgument,
        ),
        (
            "unaligned length",
            vec![write(0, 700)],
            Code::InvalidArgument,
        ),
        ("zero length", vec![write(0, 0)], Code::InvalidArgument),
        ("wrong checksum", vec![wrong_crc], Code::DataLoss),
        ("unknown disk", vec![unknown_disk], Code::InvalidArgument),
        ("sequence gap", vec![record(7)], Code::Aborted),
        // A good record before a bad one in the same batch is not stored either.
        (
            "bad record after a good one",
            vec![record(6), {
                let mut r = write(DISK, 512);
                r.sequence = 7;
                ferry_proto::checksum::seal(&mut r);
                r
            }],
            Code::InvalidArgument,
        ),
        (
            "oversized message",
            vec![pb::Record {
                sequence: 6,
                ..write(0, 512 * 1024)
            }],
            Code::ResourceExhausted,
        ),
    ];
    for (what, records, code) in cases {
        let (mut s, durable) = Stream::open(&env.cache_url, "vm2", &cred).await.unwrap();
        assert_eq!(durable, 5, "{what}");
        let err = s.send(records).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(!err.message().is_empty());
        if what == "oversized message" {
            // One record: splitting the batch would not help, and the
            // message says what would.
            assert!(
                err.message()
                    .contains("a single record over it can never be taken"),
                "{}",
                err.message()
            );
        }
        assert_eq!(
            tail_all(&env.cache_url, "vm2", 1).await.unwrap(),
            before,
            "{what}"
        );
    }

    // Unknown VM, and an agent older than registry's epoch (fenced).
    let err = Stream::open(&env.cache_url, "ghost", &cred)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let stale = Cred {
        epoch: cred.epoch - 1,
        ..cred.clone()
    };
    let err = Stream::open(&env.cache_url, "vm2", &stale)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // A credential registry did not issue.
    let forged = Cred {
        credential: "00".repeat(32),
        ..cred.clone()
    };
    let err = Stream::open(&env.cache_url, "vm2", &forged)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // A newer agent registers: the old one is refused, the new one admitted.
    let newer = register_agent(&env.registry.url, "vm2").await;
    let err = Stream::open(&env.cache_url, "vm2", &cred)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let (_, durable) = Stream::open(&env.cache_url, "vm2", &newer).await.unwrap();
    assert_eq!(durable, 5);
    // Tail of a VM the cache does not know.
    let err = tail_all(&env.cache_url, "ghost", 1).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(info(&env.cache_url, "vm2").await.last_sequence, 5);
    env.cache_shutdown.cancel();
    env.registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_below_the_applied_sequence_are_deleted() {
    let env = in_process(64 * 1024, 16 << 20).await;
    let cred = protect(&env.registry.url, "vm3").await;
    let (mut s, _) = Stream::open(&env.cache_url, "vm3", &cred).await.unwrap();
    for chunk in (1..=200u64).collect::<Vec<_>>().chunks(20) {
        s.send(chunk.iter().copied().map(record).collect())
            .await
            .unwrap();
    }
    let before = info(&env.cache_url, "vm3").await;
    let mut client = CacheClient::connect(env.cache_url.clone()).await.unwrap();
    let err = client
        .report_applied(pb::ReportAppliedRequest {
            vm_name: "vm3".into(),
            applied_sequence: 201,
            lineage: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    let trim = client
        .report_applied(pb::ReportAppliedRequest {
            vm_name: "vm3".into(),
            applied_sequence: 150,
            lineage: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .trim_point;
    assert!(trim > 1 && trim <= 151, "trim point {trim}");
    let after = info(&env.cache_url, "vm3").await;
    assert!(after.size_bytes < before.size_bytes);
    assert!(after.segments < before.segments);
    assert_eq!((after.first_sequence, after.applied_sequence), (trim, 150));
    // Nothing not yet applied is gone; what was trimmed is out of range.
    let rest = tail_all(&env.cache_url, "vm3", trim).await.unwrap();
    assert_eq!(rest.last().map(|r| r.sequence), Some(200));
    assert_eq!(
        tail_all(&env.cache_url, "vm3", 1).await.unwrap_err().code(),
        Code::OutOfRange
    );
    env.cache_shutdown.cancel();
    env.registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let cache_addr = ferry_testkit::free_addr();
    let cache_url = format!("http://{cache_addr}");
    let registry = start_registry(dir.path().join("registry"), Some(cache_url.clone())).await;
    wait_serving(&registry.url).await;
    let cred = protect(&registry.url, "vm4").await;
    let insecure = Insecure::new();
    let cache_at = insecure.at(&cache_url);
    let mut cache = ServiceProcess::start_at(
        &insecure,
        cache_addr,
        env!("CARGO_BIN_EXE_cache-svc"),
        dir.path().join("cache"),
        &["--registry", &registry.url],
    );
    wait_serving(&cache_url).await;

    // Stream until well past the point of the kill, which comes while a
    // batch is in flight.
    let (mut s, _) = Stream::open(cache_at, "vm4", &cred).await.unwrap();
    let mut acked = 0;
    let mut next = 1;
    while acked < 300 {
        let records: Vec<_> = (next..next + 25).map(record).collect();
        next += 25;
        acked = s.send(records).await.unwrap();
    }
    let records: Vec<_> = (next..next + 25).map(record).collect();
    let _ = s.tx.send(batch(records)).await;
    cache.signal_and_wait("KILL");
    drop(s);

    cache.restart();
    wait_serving(&cache_url).await;
    // Reconnect: the cache says what is durable; resend the rest.
    let (mut s, durable) = Stream::open(cache_at, "vm4", &cred).await.unwrap();
    assert!(
        durable >= acked,
        "acknowledged {acked}, durable after restart {durable}"
    );
    let upto = next + 25 + 50;
    let resent: Vec<_> = (durable + 1..upto).map(record).collect();
    assert_eq!(s.send(resent).await.unwrap(), upto - 1);

    let all = tail_all(cache_at, "vm4", 1).await.unwrap();
    assert_eq!(all.len() as u64, upto - 1, "every record exactly once");
    for (i, r) in all.iter().enumerate() {
        assert_eq!(*r, record(i as u64 + 1), "record {}", i + 1);
    }
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_quota_a_vm_is_throttled_and_nothing_is_lost() {
    let settings = cache_svc::Settings {
        segment_bytes: 32 * 1024,
        vm_quota_bytes: 192 * 1024,
        total_quota_bytes: 1 << 30,
        ..Default::default()
    };
    let env = in_process_with(settings, 64 * 1024).await;
    let cred = protect(&env.registry.url, "vm5").await;
    let (mut s, _) = Stream::open(&env.cache_url, "vm5", &cred).await.unwrap();
    let mut next = 1;
    let refused = loop {
        let records: Vec<_> = (next..next + 5).map(record).collect();
        match s.send(records).await {
            Ok(durable) => {
                assert_eq!(durable, next + 4);
                next += 5;
                assert!(next < 200, "the quota never bit");
            }
            Err(status) => break status,
        }
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("quota"), "{}", refused.message());
    let kept = tail_all(&env.cache_url, "vm5", 1).await.unwrap();
    assert_eq!(
        kept.len() as u64,
        next - 1,
        "everything acknowledged is kept"
    );

    // The refusal came with a throttle, ahead of the status.
    let (tx, rx) = mpsc::channel(4);
    tx.send(open("vm5", &cred)).await.unwrap();
    let mut client = CacheClient::connect(env.cache_url.clone()).await.unwrap();
    let mut responses = client
        .ingest(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    responses.message().await.unwrap();
    tx.send(batch((next..next + 5).map(record).collect()))
        .await
        .unwrap();
    let msg = responses.message().await.unwrap().and_then(|m| m.msg);
    assert!(
        matches!(msg, Some(pb::ingest_response::Msg::Throttle(ref t)) if t.max_bytes_per_second == 0),
        "{msg:?}"
    );
    assert_eq!(
        responses.message().await.unwrap_err().code(),
        Code::ResourceExhausted
    );

    // Once the processor has applied everything, room is made and the same
    // batch is accepted.
    CacheClient::connect(env.cache_url.clone())
        .await
        .unwrap()
        .report_applied(pb::ReportAppliedRequest {
            vm_name: "vm5".into(),
            applied_sequence: next - 1,
            lineage: 0,
        })
        .await
        .unwrap();
    let (mut s, durable) = Stream::open(&env.cache_url, "vm5", &cred).await.unwrap();
    assert_eq!(durable, next - 1);
    assert_eq!(
        s.send((next..next + 5).map(record).collect())
            .await
            .unwrap(),
        next + 4
    );
    env.cache_shutdown.cancel();
    env.registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_messages_reach_the_agent_and_a_fenced_disabled_or_superseded_stream_is_stopped() {
    use pb::send_control_request::Control;
    let env = in_process(256 * 1024, 16 << 20).await;
    let cache = env.cache_url.as_str();
    let cred = protect(&env.registry.url, "vm1").await;
    let bookmark = |id: &str| Some(Control::Bookmark(pb::BookmarkRequest { id: id.into() }));

    // Nobody streaming, nothing to send, or a bookmark without an id.
    let err = send_control(cache, "vm1", bookmark("b1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    for bad in [None, bookmark("")] {
        let err = send_control(cache, "vm1", bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    }

    // Streaming: resync and bookmark requests arrive as sent.
    let (mut s, _) = Stream::open(cache, "vm1", &cred).await.unwrap();
    let resync = Some(Control::Resync(pb::ResyncRequest {
        disk_ids: vec!["os".into()],
        reason: "replica check".into(),
        ranges: Vec::new(),
    }));
    assert_eq!(
        send_control(cache, "vm1", resync).await.unwrap(),
        cred.epoch
    );
    match s.next_control().await.unwrap() {
        pb::ingest_response::Msg::Resync(r) => assert_eq!(r.disk_ids, vec!["os".to_string()]),
        other => panic!("expected resync, got {other:?}"),
    }
    send_control(cache, "vm1", bookmark("b1")).await.unwrap();
    match s.next_control().await.unwrap() {
        pb::ingest_response::Msg::Bookmark(b) => assert_eq!(b.id, "b1"),
        other => panic!("expected bookmark, got {other:?}"),
    }
    assert_eq!(s.send(vec![record(1)]).await.unwrap(), 1);

    // Failover fences the source: the open stream is told to stop and ends
    // with FAILED_PRECONDITION; the same agent cannot come back.
    for to in [
        reg::ReplicationState::InitialReplication,
        reg::ReplicationState::Protected,
    ] {
        transition(&env.registry.url, "vm1", to, false).await;
    }
    transition(
        &env.registry.url,
        "vm1",
        reg::ReplicationState::FailoverInProgress,
        true,
    )
    .await;
    match s.next_control().await.unwrap() {
        pb::ingest_response::Msg::Stop(stop) => assert!(stop.reason.contains("fenced"), "{stop:?}"),
        other => panic!("expected stop, got {other:?}"),
    }
    let err = s.next_control().await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let err = Stream::open(cache, "vm1", &cred).await.err().unwrap();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert_eq!(tail_all(cache, "vm1", 1).await.unwrap().len(), 1);

    // Disabling replication stops the stream too.
    let cred2 = protect(&env.registry.url, "vm2").await;
    let (mut s2, _) = Stream::open(cache, "vm2", &cred2).await.unwrap();
    RegistryClient::connect(env.registry.url.clone())
        .await
        .unwrap()
        .disable_replication(reg::DisableReplicationRequest {
            vm_name: "vm2".into(),
        })
        .await
        .unwrap();
    match s2.next_control().await.unwrap() {
        pb::ingest_response::Msg::Stop(stop) => {
            assert!(stop.reason.contains("disabled"), "{stop:?}")
        }
        other => panic!("expected stop, got {other:?}"),
    }

    // A newer agent's registration stops the open stream of the one it
    // superseded at once, not at its next open.
    let cred3 = protect(&env.registry.url, "vm3").await;
    let (mut s3, _) = Stream::open(cache, "vm3", &cred3).await.unwrap();
    assert_eq!(s3.send(vec![record(1)]).await.unwrap(), 1);
    let newer = register_agent(&env.registry.url, "vm3").await;
    assert!(newer.epoch > cred3.epoch);
    match s3.next_control().await.unwrap() {
        pb::ingest_response::Msg::Stop(stop) => assert!(stop.reason.contains("fenced"), "{stop:?}"),
        other => panic!("expected stop, got {other:?}"),
    }
    let err = s3.next_control().await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert_eq!(tail_all(cache, "vm3", 1).await.unwrap().len(), 1);
    let (_, durable) = Stream::open(cache, "vm3", &newer).await.unwrap();
    assert_eq!(durable, 1);
    env.cache_shutdown.cancel();
    env.registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_acknowledged_records_is_set_aside_loudly_and_the_log_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let cache_addr = ferry_testkit::free_addr();
    let cache_url = format!("http://{cache_addr}");
    let registry = start_registry(dir.path().join("registry"), Some(cache_url.clone())).await;
    wait_serving(&registry.url).await;
    let insecure = Insecure::new();
    let cache_at = insecure.at(&cache_url);
    let mut cache = ServiceProcess::start_at(
        &insecure,
        cache_addr,
        env!("CARGO_BIN_EXE_cache-svc"),
        dir.path().join("cache"),
        &["--registry", &registry.url],
    );
    wait_serving(&cache_url).await;
    for vm in ["vm5", "vm6"] {
        let cred = protect(&registry.url, vm).await;
        let (mut s, _) = Stream::open(cache_at, vm, &cred).await.unwrap();
        for first in (1..=100).step_by(10) {
            s.send((first..first + 10).map(record).collect())
                .await
                .unwrap();
        }
    }
    let before = info(cache_at, "vm5").await;
    assert!(cache.signal_and_wait("TERM").success());
    // One flipped byte in the middle of vm5's acknowledged records.
    let segment = dir
        .path()
        .join("cache/logs/vm5")
        .join(format!("{:020}.seg", 1));
    let mut bytes = std::fs::read(&segment).unwrap();
    let len = bytes.len();
    bytes[len / 2] ^= 0x01;
    std::fs::write(&segment, &bytes).unwrap();

    cache.restart();
    wait_serving(&cache_url).await;
    // Never served, never cut: the damaged log is kept whole, aside, and a
    // new one (another lineage) starts past what was applied; its agent
    // finds the cache behind what it acknowledged and resyncs by checksum.
    assert_eq!(
        std::fs::metadata(&segment).map(|m| m.len()).unwrap_or(0),
        0,
        "the damaged log is no longer the VM's"
    );
    let aside: Vec<_> = std::fs::read_dir(dir.path().join("cache/damaged"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let kept = aside[0].join(format!("{:020}.seg", 1));
    assert_eq!(
        std::fs::metadata(&kept).unwrap().len() as usize,
        len,
        "nothing was cut: the log is kept for inspection"
    );
    assert!(tail_all(cache_at, "vm5", 1).await.unwrap().is_empty());
    let after = info(cache_at, "vm5").await;
    assert_eq!(after.last_sequence, 0, "{after:?}");
    assert_ne!(after.lineage, before.lineage, "a new lineage");
    // The other VM is untouched.
    assert_eq!(tail_all(cache_at, "vm6", 1).await.unwrap().len(), 100);
    // registry hears it.
    let url = registry.url.clone();
    let item = ferry_testkit::wait_for("vm5 to be CRITICAL", Duration::from_secs(30), || {
        let url = url.clone();
        async move {
            ferry_testkit::protected_item(&url, "vm5")
                .await
                .filter(|i| i.health() == reg::ReplicationHealth::Critical)
        }
    })
    .await;
    let report = item
        .health_reports
        .iter()
        .find(|r| r.component == "cache")
        .unwrap();
    assert!(report.message.contains("vm5"), "{}", report.message);
    assert!(
        report.message.contains("damaged at byte") && report.message.contains("kept in"),
        "{}",
        report.message
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_its_agent_gave_up_on_appends_nothing_once_a_newer_one_opened() {
    let env = in_process(256 * 1024, 16 << 20).await;
    let cred = protect(&env.registry.url, "vm1").await;
    let (mut old, _) = Stream::open(&env.cache_url, "vm1", &cred).await.unwrap();
    assert_eq!(old.send((1..=5).map(record).collect()).await.unwrap(), 5);
    // The agent gave up on `old` (a stalled link) and opened a new stream,
    // told to go on after 5; then `old`'s last batch arrives. Taken, it
    // would hold the sequences the new stream was told to use.
    let (mut new, durable) = Stream::open(&env.cache_url, "vm1", &cred).await.unwrap();
    assert_eq!(durable, 5);
    let late = old.send((6..=8).map(record).collect()).await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late}");
    assert!(late.message().contains("newer stream"), "{late}");
    assert_eq!(new.send((6..=9).map(record).collect()).await.unwrap(), 9);
    let all = tail_all(&env.cache_url, "vm1", 1).await.unwrap();
    assert_eq!(all, (1..=9).map(record).collect::<Vec<_>>());
    env.cache_shutdown.cancel();
    env.registry.stop().await;
}

/// The VM's "cache" health report in registry, once it has one.
async fn cache_report(registry_url: &str, vm: &str) -> Option<reg::HealthReport> {
    protected_item(registry_url, vm)
        .await?
        .health_reports
        .into_iter()
        .find(|r| r.component == "cache")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_throttled_like_a_quota_and_nothing_acknowledged_is_lost() {
    // cache-svc, a real process, with its data on a 16 MiB filesystem of
    // which the test takes all but 1 MiB over the index's reserve.
    let dir = tempfile::tempdir().unwrap();
    let fs = SmallFs::mount(16 << 20);
    let reserve: u64 = 2 << 20;
    let config = dir.path().join("cache.toml");
    std::fs::write(&config, format!("[cache]\nreserve_bytes = {reserve}\n")).unwrap();
    let cache_addr = ferry_testkit::free_addr();
    let cache_url = format!("http://{cache_addr}");
    let registry = start_registry(dir.path().join("registry"), Some(cache_url.clone())).await;
    wait_serving(&registry.url).await;
    let cred = protect(&registry.url, "vm7").await;
    let insecure = Insecure::new();
    let cache_at = insecure.at(&cache_url);
    let mut cache = ServiceProcess::start_at(
        &insecure,
        cache_addr,
        env!("CARGO_BIN_EXE_cache-svc"),
        fs.path().join("cache"),
        &[
            "--registry",
            &registry.url,
            "--config",
            config.to_str().unwrap(),
        ],
    );
    wait_serving(&cache_url).await;
    let (mut s, _) = Stream::open(cache_at, "vm7", &cred).await.unwrap();
    assert_eq!(s.send((1..=5).map(record).collect()).await.unwrap(), 5);
    let ballast = fs.fill_leaving(reserve + (1 << 20));

    // Batches of 5 records (20 KiB) until the disk is full.
    let mut next = 6;
    let refused = loop {
        let records: Vec<_> = (next..next + 5).map(record).collect();
        match s.send(records).await {
            Ok(durable) => {
                assert_eq!(durable, next + 4);
                next += 5;
                assert!(next < 2000, "the disk never filled: {} B free", fs.free());
            }
            Err(status) => break status,
        }
    };
    // Like a quota: the agent backs off and resends (INTERNAL before).
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("disk full"), "{refused:?}");
    assert!(
        fs.free() >= reserve,
        "the index's reserve is kept: {} B free",
        fs.free()
    );
    let report = wait_for(
        "registry to hear the cache's disk is full",
        Duration::from_secs(10),
        || async {
            cache_report(&registry.url, "vm7")
                .await
                .filter(|r| r.health == reg::ReplicationHealth::Critical as i32)
        },
    )
    .await;
    assert!(report.message.contains("disk full"), "{}", report.message);

    // A throttle comes ahead of the status, as for a quota.
    let (tx, rx) = mpsc::channel(4);
    tx.send(open("vm7", &cred)).await.unwrap();
    let mut client = CacheClient::new(cache_at.channel(|i| i.agent("vm7")));
    let mut responses = client
        .ingest(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    responses.message().await.unwrap();
    tx.send(batch((next..next + 5).map(record).collect()))
        .await
        .unwrap();
    let msg = responses.message().await.unwrap().and_then(|m| m.msg);
    assert!(
        matches!(msg, Some(pb::ingest_response::Msg::Throttle(ref t)) if t.reason.contains("disk full")),
        "{msg:?}"
    );
    assert_eq!(
        responses.message().await.unwrap_err().code(),
        Code::ResourceExhausted
    );

    // What the processor reports still lands: the index has its reserve.
    CacheClient::new(cache_at.as_service(ServiceKind::Processor))
        .report_applied(pb::ReportAppliedRequest {
            vm_name: "vm7".into(),
            applied_sequence: 5,
            lineage: 0,
        })
        .await
        .unwrap();

    // Killed on the full disk, the cache opens its log with exactly what
    // it acknowledged.
    cache.signal_and_wait("KILL");
    cache.restart();
    wait_serving(&cache_url).await;
    let all = tail_all(cache_at, "vm7", 1).await.unwrap();
    assert_eq!(all.len() as u64, next - 1, "every acknowledged record");
    for (i, r) in all.iter().enumerate() {
        assert_eq!(*r, record(i as u64 + 1), "record {}", i + 1);
    }
    assert_eq!(info(cache_at, "vm7").await.applied_sequence, 5);

    // Space returns: the refused batch is taken, and registry hears so.
    std::fs::remove_file(&ballast).unwrap();
    let (mut s, durable) = Stream::open(cache_at, "vm7", &cred).await.unwrap();
    assert_eq!(durable, next - 1);
    assert_eq!(
        s.send((next..next + 5).map(record).collect())
            .await
            .unwrap(),
        next + 4
    );
    wait_for(
        "registry to hear space returned",
        Duration::from_secs(10),
        || async {
            cache_report(&registry.url, "vm7")
                .await
                .filter(|r| r.health == reg::ReplicationHealth::Normal as i32)
        },
    )
    .await;
    let all = tail_all(cache_at, "vm7", 1).await.unwrap();
    assert_eq!(all.len() as u64, next + 4);
    drop(cache);
    registry.stop().await;
}

#[test]
fn an_append_the_full_disk_took_in_part_is_undone() {
    use cache_svc::log::{read, Cursor, VmLog};
    // No reserve at this level: the filesystem itself runs out mid-write.
    let fs = SmallFs::mount(1 << 20);
    let dir = fs.path().join("vm");
    let mut log = VmLog::open(&dir, Vec::new(), 1, 64 << 20).unwrap();
    log.append(&(1..=10).map(record).collect::<Vec<_>>())
        .unwrap();
    let size = log.size();
    let ballast = fs.fill_leaving(32 << 10);
    // 25 records of 4 KiB: 100 KiB into 32.
    let err = log
        .append(&(11..=35).map(record).collect::<Vec<_>>())
        .unwrap_err();
    assert!(
        matches!(err, cache_svc::CacheError::DiskFull(_)),
        "ENOSPC is a full disk, for the agent to wait out: {err}"
    );
    assert_eq!(tonic::Status::from(err).code(), Code::ResourceExhausted);
    assert_eq!(
        (log.last_seq(), log.size()),
        (10, size),
        "nothing of it counts"
    );
    let segment = cache_svc::log::segment_path(&dir, 1);
    assert_eq!(
        std::fs::metadata(&segment).unwrap().len(),
        size,
        "nothing of it is left in the file"
    );
    std::fs::remove_file(ballast).unwrap();
    log.append(&(11..=35).map(record).collect::<Vec<_>>())
        .unwrap();
    drop(log);
    let log = VmLog::open(&dir, Vec::new(), 1, 64 << 20).unwrap();
    let mut cursor = Cursor {
        next_seq: 1,
        at: None,
    };
    let mut all = Vec::new();
    loop {
        let batch = read(log.dir(), log.segments(), &mut cursor, 1 << 20).unwrap();
        if batch.is_empty() {
            break;
        }
        all.extend(batch);
    }
    assert_eq!(all, (1..=35).map(record).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reaching_a_cache_its_item_is_not_placed_on_is_refused() {
    // This cache names no endpoint: it takes only items placed on no cache.
    let env = in_process(1 << 20, 256 * 1024).await;
    RegistryClient::connect(env.registry.url.clone())
        .await
        .unwrap()
        .set_region_services(reg::SetRegionServicesRequest {
            services: Some(reg::RegionServices {
                region: "eastus".into(),
                cache_endpoint: "http://cache.eastus:7102".into(),
                processor_endpoint: String::new(),
            }),
        })
        .await
        .unwrap();
    let cred = protect(&env.registry.url, "elsewhere").await;
    let err = match Stream::open(&env.cache_url, "elsewhere", &cred).await {
        Err(err) => err,
        Ok(_) => panic!("a stream of an item placed on another cache was opened"),
    };
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("http://cache.eastus:7102"),
        "{err:?}"
    );
    // Nothing of it is kept here.
    let info = CacheClient::connect(env.cache_url.clone())
        .await
        .unwrap()
        .get_log_info(pb::GetLogInfoRequest {
            vm_name: "elsewhere".into(),
        })
        .await;
    assert_eq!(info.unwrap_err().code(), Code::NotFound);

    // A cache that names itself takes no item placed on none.
    let named = in_process_with(
        cache_svc::Settings {
            endpoint: "http://cache.westus:7102".into(),
            ..Default::default()
        },
        256 * 1024,
    )
    .await;
    let cred = protect(&named.registry.url, "default").await;
    let err = match Stream::open(&named.cache_url, "default", &cred).await {
        Err(err) => err,
        Ok(_) => panic!("a stream of an item placed on no cache was opened"),
    };
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    env.cache_shutdown.cancel();
    named.cache_shutdown.cancel();
}
