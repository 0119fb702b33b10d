//! Real NBD clients (qemu-io, qemu-img) write through the agent's export; the
//! cache's log replayed onto a copy of the original image gives an image that
//! `qemu-img compare` finds identical to the source.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ferry_agent::capture::{Capture, SourceDisk};
use ferry_agent::stream::{self, Stream, StreamLimits};
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::CancellationToken;
use ferry_testkit::replay::{apply, tail_all};
use ferry_testkit::{bin_path, free_addr, start_registry, wait_serving, ServiceProcess};

const SIZE: u64 = 16 << 20;

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} is missing ({e}); scripts/test.sh installs qemu-utils")
        });
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn blocking(program: &'static str, args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(program, &args)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_writes_through_nbd_replay_to_an_identical_image() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let source = images.join("os.raw");
    // The original image has content of its own before replication starts.
    let original = dir.path().join("original.raw");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "raw",
            original.to_str().unwrap(),
            &SIZE.to_string(),
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 1M",
            original.to_str().unwrap(),
        ],
    );
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
    let a = ferry_agent::register(&registry.url, "vm", "test", "")
        .await
        .unwrap();
    let _cache = ServiceProcess::start_at(
        cache_addr,
        bin_path("cache-svc"),
        dir.path().join("cache"),
        &["--registry", &registry.url],
    );
    wait_serving(&cache_url).await;

    let s = Stream::new(1, StreamLimits::default());
    let capture = Arc::new(Capture::new(
        vec![SourceDisk::open("os", &source, SIZE).unwrap()],
        s.clone(),
    ));
    let shutdown = CancellationToken::new();
    let sender = tokio::spawn(stream::run(
        s.clone(),
        a.cache_endpoint.clone(),
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
    let url = format!("nbd://127.0.0.1:{port}/os");

    // Patterns, unaligned writes, zeroes, discards and parallel AIO writes.
    let script = [
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
    ];
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for c in script {
        args.push("-c".into());
        args.push(c.into());
    }
    args.push(url.clone());
    blocking("qemu-io", args).await;
    // Reading through NBD sees what was written.
    let read = blocking(
        "qemu-io",
        vec![
            "-f".into(),
            "raw".into(),
            "-c".into(),
            "read -P 0xab 0 1000".into(),
            url.clone(),
        ],
    )
    .await;
    assert!(read.contains("read 1000/1000 bytes"), "{read}");
    // A whole image copied through NBD.
    let pattern = dir.path().join("pattern.raw");
    run(
        "qemu-img",
        &["create", "-f", "raw", pattern.to_str().unwrap(), "4M"],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 1M 2M",
            pattern.to_str().unwrap(),
        ],
    );
    blocking(
        "qemu-img",
        vec![
            "convert".into(),
            "-n".into(),
            "-f".into(),
            "raw".into(),
            "-O".into(),
            "raw".into(),
            pattern.display().to_string(),
            url.clone(),
        ],
    )
    .await;

    let last = tokio::time::timeout(Duration::from_secs(60), s.flushed())
        .await
        .expect("everything reaches the cache");
    assert!(last > 8, "records: {last}");
    let records = tail_all(&cache_url, "vm", 1).await;
    assert_eq!(records.len() as u64, last);
    let replica = dir.path().join("replica.raw");
    std::fs::copy(&original, &replica).unwrap();
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
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", p(&source), p(&replica)],
    );
    shutdown.cancel();
    sender.await.unwrap().unwrap();
    registry.stop().await;
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}
