//! An L7 proxy hop as a service mesh puts one: nginx (Debian's package)
//! with `grpc_pass` in front of cache-svc and processor-svc. The agent's
//! Ingest stream, the processor's Tail stream and ReadDisk all go through
//! it while a VM writes for a while; the recovery point cut at the end
//! reads back, through nginx, as the source disk byte for byte, and the
//! agent's buffer never overflowed (no stall).
//!
//! The nginx settings that matter for gRPC streams are in the config
//! below: no body size limit (a stream is one request body), long read and
//! send timeouts, HTTP/2 to the client and to the service.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_proto::registry::v1 as reg;
use ferry_testkit::points::{cut_latest, read_disk};
use ferry_testkit::{
    agent_command, bin_path, free_addr, wait_for, wait_serving, AgentAuth, Insecure, ServiceProcess,
};

const DISK: u64 = 64 << 20;
/// How long the VM writes through the proxy: 20 s in CI, longer with
/// FERRY_NGINX_WRITE_SECS (minutes, for a soak of the streams).
fn writing() -> Duration {
    let secs = std::env::var("FERRY_NGINX_WRITE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(secs)
}

/// A child killed however the test ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx, stopped however the test ends: SIGTERM to the master, which
/// stops its workers (a SIGKILL would leave them running).
struct Nginx(Option<Child>);

impl Drop for Nginx {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        // Its exit, waited for on a thread so the wait has a deadline.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        if rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }
}

/// nginx fronting `cache` at `cache_front` and `processor` at
/// `processor_front`, with its files under `dir`.
fn nginx(
    dir: &Path,
    cache_front: &str,
    cache: &str,
    processor_front: &str,
    processor: &str,
) -> Nginx {
    let d = dir.display();
    let server = |front: &str, upstream: &str| {
        format!(
            "  server {{\n\
             \x20   listen {front} http2;\n\
             \x20   location / {{\n\
             \x20     grpc_pass grpc://{upstream};\n\
             \x20   }}\n\
             \x20 }}\n"
        )
    };
    let conf = format!(
        "daemon off;\n\
         worker_processes 1;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 client_body_temp_path {d}/body;\n\
         \x20 proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n\
         \x20 uwsgi_temp_path {d}/uwsgi;\n\
         \x20 scgi_temp_path {d}/scgi;\n\
         \x20 # A stream is one request body: no size limit, and long waits\n\
         \x20 # between its messages are normal.\n\
         \x20 client_max_body_size 0;\n\
         \x20 client_body_timeout 1h;\n\
         \x20 grpc_read_timeout 1h;\n\
         \x20 grpc_send_timeout 1h;\n\
         \x20 grpc_socket_keepalive on;\n\
         \x20 http2_idle_timeout 1h;\n\
         {}{}}}\n",
        server(cache_front, cache),
        server(processor_front, processor)
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (Debian package nginx; scripts/test.sh installs it)");
    Nginx(Some(child))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_tail_and_read_disk_stream_through_nginx() {
    let dir = tempfile::tempdir().unwrap();
    let insecure = Insecure::new();
    let (registry_addr, cache_addr, processor_addr) = (free_addr(), free_addr(), free_addr());
    let (cache_front, processor_front) = (free_addr().to_string(), free_addr().to_string());
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir_all(&nginx_dir).unwrap();
    let _nginx = nginx(
        &nginx_dir,
        &cache_front,
        &cache_addr.to_string(),
        &processor_front,
        &processor_addr.to_string(),
    );
    let (cache_via, processor_via) = (
        format!("http://{cache_front}"),
        format!("http://{processor_front}"),
    );
    let registry_url = format!("http://{registry_addr}");
    // Agents (and the processor) reach the cache only through nginx.
    let _registry = ServiceProcess::start_at(
        &insecure,
        registry_addr,
        bin_path("registry-svc"),
        dir.path().join("registry"),
        &["--cache", &cache_via],
    );
    wait_serving(&registry_url).await;
    let _cache = ServiceProcess::start_at(
        &insecure,
        cache_addr,
        bin_path("cache-svc"),
        dir.path().join("cache"),
        &["--registry", &registry_url],
    );
    let _processor = ServiceProcess::start_at(
        &insecure,
        processor_addr,
        bin_path("processor-svc"),
        dir.path().join("processor"),
        &["--registry", &registry_url, "--cache", &cache_via],
    );
    for url in [&cache_via, &processor_via] {
        wait_serving(url).await;
    }
    let day = Duration::from_secs(86400);
    ferry_testkit::create_policy(
        insecure.at(&registry_url),
        "fast",
        Duration::from_secs(1),
        day,
        day,
        day,
    )
    .await;
    let source = dir.path().join("os.raw");
    std::fs::File::create(&source)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    ferry_testkit::protect_vm_with(
        insecure.at(&registry_url),
        "vm",
        &[("os", DISK, &source)],
        "fast",
    )
    .await;
    insecure.enroll(&registry_url, "vm").await;
    let nbd = free_addr().to_string();
    let agent_log = dir.path().join("agent.log");
    let log = std::fs::File::create(&agent_log).unwrap();
    let _agent = Killed(
        agent_command(&registry_url, "vm", AgentAuth::Token(&insecure))
            .args(["--nbd-listen", &nbd, "--group-listen", "off"])
            .arg("--state-dir")
            .arg(dir.path().join("agent"))
            .arg("--disk-root")
            .arg(dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_for("PROTECTED", Duration::from_secs(60), || async {
        ferry_testkit::protected_item(insecure.at(&registry_url), "vm")
            .await
            .filter(|i| i.state() == reg::ReplicationState::Protected)
    })
    .await;

    // The VM writes 64 KiB at scattered offsets, 20 a second, for a while:
    // a ticker paces the writes a blocking NBD client makes.
    let seed = 0x5eed_2026_u64;
    eprintln!("seed {seed:#x}");
    let (offsets, pending) = std::sync::mpsc::sync_channel::<u64>(1);
    let writer = tokio::task::spawn_blocking(move || {
        let mut client = ferry_testkit::nbd::Nbd::go(&nbd, "os").unwrap();
        let mut n = 0u64;
        for offset in pending {
            let data = vec![(n % 251) as u8 + 1; 65536];
            assert_eq!(
                client.write(offset, &data).unwrap(),
                0,
                "a VM write completes"
            );
            n += 1;
        }
        n
    });
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let (started, mut x) = (Instant::now(), seed);
    let writing = writing();
    while started.elapsed() < writing {
        tick.tick().await;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let offsets = offsets.clone();
        let offset = (x % (DISK / 65536)) * 65536;
        tokio::task::spawn_blocking(move || offsets.send(offset))
            .await
            .unwrap()
            .unwrap();
    }
    drop(offsets);
    let writes = writer.await.unwrap();
    assert!(writes > 100, "{writes} writes");

    // Everything written is in the point cut now, read back through nginx.
    let processor = insecure.at(&processor_via);
    let point = cut_latest(processor, "vm").await.unwrap();
    let replica = read_disk(processor, "vm", &point, "os").await;
    let original = std::fs::read(&source).unwrap();
    assert!(
        replica == original,
        "the point differs from the source disk"
    );
    let log = std::fs::read_to_string(&agent_log).unwrap();
    assert!(!log.contains("replication buffer full"), "{log}");
}
