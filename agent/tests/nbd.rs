//! Real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio's nbd engine)
//! write through the agent's export; the cache's log replayed onto a copy of
//! the original image gives an image that `qemu-img compare` finds identical
//! to the source.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use ferry_testkit::run_tool;

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_agent::capture::{Capture, SourceDisk};
use ferry_agent::stream::{self, Stream, StreamLimits};
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::CancellationToken;
use ferry_testkit::replay::{apply, tail_all};
use ferry_testkit::{
    bin_path, free_addr, start_registry, wait_serving, Insecure, Running, ServiceProcess,
};

const SIZE: u64 = 16 << 20;

/// Runs a client without blocking the runtime that serves it.
async fn client(program: &'static str, args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_tool(program, &args)
    })
    .await
    .unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// registry, a real cache-svc process, and an agent exporting disk "os".
struct Agent {
    dir: tempfile::TempDir,
    original: PathBuf,
    source: PathBuf,
    cache_url: String,
    /// The cache checks its callers: the agent's token, processor-svc's.
    insecure: Insecure,
    registry: Running,
    _cache: ServiceProcess,
    stream: Arc<Stream>,
    capture: Arc<Capture>,
    shutdown: CancellationToken,
    sender: tokio::task::JoinHandle<Result<(), tonic::Status>>,
    port: u16,
}

impl Agent {
    async fn start() -> Agent {
        Self::start_with("write -P 0x5a 0 1M").await
    }

    /// Starts with the original image's content written by a qemu-io command.
    async fn start_with(original_content: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("os.raw");
        // The original image has content of its own before replication starts.
        let original = dir.path().join("original.raw");
        let o = original.to_str().unwrap();
        run_tool("qemu-img", &["create", "-f", "raw", o, &SIZE.to_string()]);
        run_tool("qemu-io", &["-f", "raw", "-c", original_content, o]);
        std::fs::copy(&original, &source).unwrap();

        let cache_addr = free_addr();
        let cache_url = format!("http://{cache_addr}");
        let registry = start_registry(dir.path().join("registry"), Some(cache_url.clone())).await;
        wait_serving(&registry.url).await;
        let mut r = RegistryClient::connect(registry.url.clone()).await.unwrap();
        r.register_vm(reg::RegisterVmRequest {
            vm: Some(reg::Vm {
                name: "vm".into(),
                source_region: "eastus".into(),
                resource_group: "rg".into(),
                virtual_network: "net".into(),
                subnet: "sub".into(),
                nics: vec![reg::Nic {
                    name: "nic0".into(),
                    private_ip: "10.0.0.4".into(),
                    mac_address: String::new(),
                }],
                disks: vec![reg::Disk {
                    id: "os".into(),
                    size_bytes: SIZE,
                    role: reg::DiskRole::Os as i32,
                    storage: reg::DiskStorage::Managed as i32,
                    source_path: source.display().to_string(),
                }],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
        r.enable_replication(reg::EnableReplicationRequest {
            vm_name: "vm".into(),
            target_region: "westus".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let a = ferry_agent::register(
            &registry.url,
            &ferry_runtime::peers::Credentials::none(),
            "vm",
            "test",
            "",
            Default::default(),
        )
        .await
        .unwrap();
        let insecure = Insecure::new();
        let cache = ServiceProcess::start_at(
            &insecure,
            cache_addr,
            bin_path("cache-svc"),
            dir.path().join("cache"),
            &["--registry", &registry.url],
        );
        wait_serving(&cache_url).await;

        let stream = Stream::new(1, StreamLimits::default());
        let capture = Arc::new(Capture::new(
            vec![SourceDisk::open("os", &source, SIZE).unwrap()],
            stream.clone(),
        ));
        let shutdown = CancellationToken::new();
        let sender = tokio::spawn(stream::run(
            stream.clone(),
            a.cache_endpoint.clone(),
            insecure.agent("vm"),
            "vm".into(),
            a.epoch,
            a.credential().to_string(),
            shutdown.clone(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(ferry_agent::nbd::serve(
            listener,
            capture.clone(),
            shutdown.clone(),
        ));
        Agent {
            capture,
            dir,
            original,
            source,
            cache_url,
            insecure,
            registry,
            _cache: cache,
            stream,
            shutdown,
            sender,
            port,
        }
    }

    fn url(&self) -> String {
        format!("nbd://127.0.0.1:{}/os", self.port)
    }

    /// Waits until everything is durable in the cache, replays the log onto
    /// a copy of the original image and compares it with the source.
    async fn verify(self) -> u64 {
        let base = self.original.clone();
        self.verify_from(base).await
    }

    /// As `verify`, replaying onto `base` instead of the original image.
    async fn verify_from(self, base: PathBuf) -> u64 {
        let last = tokio::time::timeout(Duration::from_secs(60), self.stream.flushed())
            .await
            .expect("everything reaches the cache");
        let records = tail_all(self.insecure.at(&self.cache_url), "vm", 1).await;
        assert_eq!(records.len() as u64, last);
        let replica = self.dir.path().join("replica.raw");
        std::fs::copy(&base, &replica).unwrap();
        let files: HashMap<String, File> = [(
            "os".to_string(),
            std::fs::OpenOptions::new()
                .write(true)
                .open(&replica)
                .unwrap(),
        )]
        .into();
        apply(&records, &files);
        drop(files);
        let (s, r) = (
            self.source.display().to_string(),
            replica.display().to_string(),
        );
        run_tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", &s, &r]);
        self.shutdown.cancel();
        self.sender.await.unwrap().unwrap();
        self.registry.stop().await;
        last
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_and_qemu_img_writes_replay_to_an_identical_image() {
    let agent = Agent::start().await;
    let url = agent.url();
    // Patterns, unaligned writes, zeroes, discards, parallel AIO and FUA.
    let mut args = strings(&["-f", "raw"]);
    for c in [
        "write -P 0xab 0 64k",
        "write -P 0x11 1000 3000",
        "write -z 512k 128k",
        "discard 768k 64k",
        "aio_write -P 0x22 2M 256k",
        "aio_write -P 0x33 4M 1M",
        "aio_write -P 0x44 4M 4k",
        "aio_flush",
        "write -P 0x55 -f 8M 64k",
        "flush",
    ] {
        args.push("-c".into());
        args.push(c.into());
    }
    args.push(url.clone());
    client("qemu-io", args).await;
    let read = client(
        "qemu-io",
        strings(&["-f", "raw", "-c", "read -P 0xab 0 1000", &url]),
    )
    .await;
    assert!(read.contains("read 1000/1000 bytes"), "{read}");

    let pattern = agent.dir.path().join("pattern.raw");
    let p = pattern.display().to_string();
    run_tool("qemu-img", &["create", "-f", "raw", &p, "4M"]);
    run_tool("qemu-io", &["-f", "raw", "-c", "write -P 0x77 1M 2M", &p]);
    client(
        "qemu-img",
        strings(&["convert", "-n", "-f", "raw", "-O", "raw", &p, &url]),
    )
    .await;
    assert!(agent.verify().await > 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_nbdcopy_and_fio_random_writes_replay_to_an_identical_image() {
    let agent = Agent::start().await;
    let url = agent.url();
    let base = format!("nbd://127.0.0.1:{}", agent.port);
    // libnbd asks for structured replies and meta contexts: refused politely.
    let listed = client("nbdinfo", strings(&["--list", &base])).await;
    assert!(listed.contains("export=\"os\""), "{listed}");
    let info = client("nbdinfo", strings(&["--json", &url])).await;
    assert!(info.contains(&format!("\"export-size\": {SIZE}")), "{info}");

    let pattern = agent.dir.path().join("pattern.raw");
    let p = pattern.display().to_string();
    run_tool("qemu-img", &["create", "-f", "raw", &p, "8M"]);
    run_tool("qemu-io", &["-f", "raw", "-c", "write -P 0x3c 2M 3M", &p]);
    client("nbdcopy", strings(&[&p, &url])).await;

    client(
        "fio",
        strings(&[
            "--name=randwrite",
            "--ioengine=nbd",
            &format!("--uri={url}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--io_size=8M",
            "--iodepth=16",
            "--randrepeat=1",
            "--output-format=terse",
        ]),
    )
    .await;
    assert!(
        agent.verify().await > 2048,
        "fio's 2048 writes and nbdcopy's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_replication_racing_live_writes_replays_from_zero() {
    use ferry_proto::cache::v1::record::Op;
    use ferry_proto::cache::v1::MarkerKind;

    // A mostly written original with a hole in the middle.
    let agent = Agent::start_with("write -P 0x5a 0 6M").await;
    run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x6b 10M 6M",
            agent.source.to_str().unwrap(),
        ],
    );
    let url = agent.url();
    let mut registry = RegistryClient::new(
        ferry_runtime::connect(
            &agent.registry.url,
            &ferry_runtime::peers::Credentials::none(),
        )
        .unwrap(),
    );
    let capture = agent.capture.clone();
    let mut r2 = registry.clone();
    let copy = tokio::spawn(async move {
        ferry_agent::initial::replicate(&capture, &mut r2, "vm")
            .await
            .unwrap()
    });
    // Live writes over the ranges being copied, at the same time.
    let mut args = strings(&["-f", "raw"]);
    for c in [
        "aio_write -P 0x01 0 1M",
        "aio_write -P 0x02 4M 2M",
        "aio_write -P 0x03 12M 64k",
        "aio_flush",
        "write -z 11M 512k",
        "discard 2M 1M",
    ] {
        args.push("-c".into());
        args.push(c.into());
    }
    args.push(url);
    client("qemu-io", args).await;
    let chunks = copy.await.unwrap();
    assert!(chunks >= 10, "data chunks copied: {chunks}");

    let item = registry
        .get_protected_item(reg::GetProtectedItemRequest {
            vm_name: "vm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(item.state(), reg::ReplicationState::Protected);
    assert_eq!(item.initial_replication_percent, 100);

    let records = tail_all(agent.insecure.at(&agent.cache_url), "vm", 1).await;
    let markers: Vec<i32> = records
        .iter()
        .filter_map(|r| match &r.op {
            Some(Op::Marker(m)) => Some(m.kind),
            _ => None,
        })
        .collect();
    assert_eq!(
        markers,
        [
            MarkerKind::SyncStarted as i32,
            MarkerKind::SyncCompleted as i32
        ]
    );
    // The hole was skipped: nothing written in 6M..10M by the copy.
    assert!(!records.iter().any(|r| matches!(&r.op,
        Some(Op::Write(w)) if w.offset >= 6 << 20 && w.offset < 10 << 20 && w.data.iter().any(|b| *b != 0))));

    // Replayed onto an empty disk, the stream rebuilds the source.
    let zero = agent.dir.path().join("zero.raw");
    run_tool(
        "qemu-img",
        &[
            "create",
            "-f",
            "raw",
            zero.to_str().unwrap(),
            &SIZE.to_string(),
        ],
    );
    agent.verify_from(zero).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_as_large_as_the_export_takes_is_replicated_in_records_the_cache_takes() {
    let agent = Agent::start().await;
    let url = agent.url();
    // 16 MiB in one NBD request (the export advertises 32 MiB): more than
    // one cache-svc message carries.
    client(
        "qemu-io",
        strings(&["-f", "raw", "-c", "write -P 0x3c 0 16M", &url]),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(60), agent.stream.flushed())
        .await
        .expect("the write reaches the cache");
    assert_eq!(agent.stream.overflows().await, 0, "no overflow, no resync");
    let records = tail_all(agent.insecure.at(&agent.cache_url), "vm", 1).await;
    let largest = records
        .iter()
        .filter_map(|r| match &r.op {
            Some(ferry_proto::cache::v1::record::Op::Write(w)) => Some(w.data.len()),
            _ => None,
        })
        .max();
    assert!(
        largest.is_some_and(|n| n <= ferry_agent::capture::MAX_RECORD_DATA),
        "records of at most {} bytes, got {largest:?}",
        ferry_agent::capture::MAX_RECORD_DATA
    );
    assert!(agent.verify().await >= 16);
}
