//! The real ferry-agent binary: registers, copies its VM's disk (initial
//! replication) while qemu-io writes through its NBD export, reaches
//! PROTECTED, and everything lands in a real cache-svc process. Its
//! changed-chunk map survives a clean restart (only those chunks are sent
//! again); after a crash the map is lost and every chunk is checked by
//! checksum against processor-svc's replica, which asks for the one that
//! differs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use ferry_testkit::run_tool;

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_agent::state::{Saved, StateFile};
use ferry_proto::cache::v1 as pb;
use ferry_proto::cache::v1::record::Op;
use ferry_proto::registry::v1 as reg;
use ferry_runtime::security::ServiceKind;
use ferry_testkit::replay::{apply, tail_all};
use ferry_testkit::scrape::sample;
use ferry_testkit::{
    agent_command, bin_path, free_addr, protect_vm, protected_item, start_registry, wait_for,
    wait_serving, AgentAuth, At, Insecure, ServiceProcess,
};

const SIZE: u64 = 8 << 20;

/// The agent process, killed however the test ends.
struct Agent {
    child: std::process::Child,
    nbd: SocketAddr,
}

impl Agent {
    /// The agent of `vm` for `setup`'s registry, with its agent token.
    fn start(setup: &Setup, state_dir: &Path) -> Agent {
        Self::start_with(setup, state_dir, &[])
    }

    fn start_with(setup: &Setup, state_dir: &Path, extra: &[&str]) -> Agent {
        let nbd = free_addr();
        Self::start_listening(setup, state_dir, &nbd.to_string(), nbd, extra)
    }

    /// With `--nbd-listen listen`, which clients reach at `nbd`.
    fn start_listening(
        setup: &Setup,
        state_dir: &Path,
        listen: &str,
        nbd: SocketAddr,
        extra: &[&str],
    ) -> Agent {
        let child = agent_command(&setup.registry.url, "vm", AgentAuth::Token(&setup.insecure))
            .args(extra)
            .args(["--nbd-listen", listen])
            .args(["--group-listen", "127.0.0.1:0", "--drain-secs", "1"])
            .arg("--state-dir")
            .arg(state_dir)
            // The images lie beside the state directory.
            .arg("--disk-root")
            .arg(state_dir.parent().unwrap())
            .spawn()
            .unwrap();
        Agent { child, nbd }
    }

    /// Sends `signal` and waits for the exit; whether it exited with 0.
    fn stop(&mut self, signal: &str) -> bool {
        let killed = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(killed.success());
        self.child.wait().unwrap().success()
    }

    /// qemu-io against the agent's export of `disk`, off the async runtime.
    async fn qemu_io(&self, disk: &str, commands: &[&str]) {
        qemu_io(format!("nbd://{}/{disk}", self.nbd), commands).await;
    }
}

/// qemu-io against the NBD `url`, off the async runtime; its output.
async fn qemu_io(url: String, commands: &[&str]) -> String {
    {
        let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
        for c in commands {
            args.extend(["-c".to_string(), c.to_string()]);
        }
        args.push(url);
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_tool("qemu-io", &args)
        })
        .await
        .unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A registry, cache-svc and processor-svc processes and a protected VM with
/// one 8 MiB disk holding 3 MiB of data.
struct Setup {
    dir: tempfile::TempDir,
    /// The services' cluster secret; the agent's token.
    insecure: Insecure,
    source: PathBuf,
    registry: ferry_testkit::Running,
    cache: ServiceProcess,
    _processor: ServiceProcess,
}

impl Setup {
    async fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("os.raw");
        let s = source.to_str().unwrap();
        run_tool("qemu-img", &["create", "-f", "raw", s, &SIZE.to_string()]);
        run_tool("qemu-io", &["-f", "raw", "-c", "write -P 0x42 1M 3M", s]);
        let cache_addr = free_addr();
        let cache_url = format!("http://{cache_addr}");
        let registry = start_registry(dir.path().join("registry"), Some(cache_url.clone())).await;
        wait_serving(&registry.url).await;
        let insecure = Insecure::new();
        let cache = ServiceProcess::start_at(
            &insecure,
            cache_addr,
            bin_path("cache-svc"),
            dir.path().join("cache"),
            &["--registry", &registry.url],
        );
        wait_serving(&cache_url).await;
        let processor = ServiceProcess::start(
            &insecure,
            bin_path("processor-svc"),
            dir.path().join("processor"),
            &["--registry", &registry.url, "--cache", &cache_url],
        );
        protect_vm(&registry.url, "vm", &[("os", SIZE, &source)]).await;
        Setup {
            dir,
            insecure,
            source,
            registry,
            cache,
            _processor: processor,
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("agent")
    }

    async fn wait_state(&self, state: reg::ReplicationState) {
        let url = self.registry.url.clone();
        wait_for(&format!("{state:?}"), Duration::from_secs(60), || {
            let url = url.clone();
            async move {
                protected_item(&url, "vm")
                    .await
                    .filter(|i| i.state() == state)
            }
        })
        .await;
    }

    /// Waits until the cache's log, replayed onto an empty disk, equals the
    /// source image; returns the log.
    async fn wait_replay_equals_source(&self) -> Vec<pb::Record> {
        let cache_url = self.cache.url();
        wait_for(
            "the log to rebuild the source",
            Duration::from_secs(60),
            || {
                let cache_url = cache_url.clone();
                async move {
                    let records: Vec<pb::Record> =
                        tail_all(self.insecure.at(&cache_url), "vm", 1).await;
                    self.replay_equals_source(&records).then_some(records)
                }
            },
        )
        .await
    }

    /// Whether `records` replayed onto an empty disk give the source image.
    fn replay_equals_source(&self, records: &[pb::Record]) -> bool {
        let replica = self.dir.path().join("replica.raw");
        let f = File::create(&replica).unwrap();
        f.set_len(SIZE).unwrap();
        apply(records, &HashMap::from([("os".to_string(), f)]));
        std::fs::read(&replica).unwrap() == std::fs::read(&self.source).unwrap()
    }

    /// Restarts the cache; the last sequence it holds.
    async fn restart_cache(&mut self) -> u64 {
        self.cache.restart();
        wait_serving(&self.cache.url()).await;
        let records = tail_all(self.insecure.at(&self.cache.url()), "vm", 1).await;
        records.last().map_or(0, |r| r.sequence)
    }

    /// Waits until the checksums of at least `n` chunks follow `after`.
    async fn wait_digests(&self, after: u64, n: u64) {
        let cache_url = self.cache.url();
        wait_for(
            &format!("{n} chunk checksums after {after}"),
            Duration::from_secs(60),
            || {
                let cache_url = cache_url.clone();
                async move {
                    let records: Vec<pb::Record> =
                        tail_all(self.insecure.at(&cache_url), "vm", 1).await;
                    (digests_after(&records, after) >= n).then_some(())
                }
            },
        )
        .await;
    }

    /// Waits until at least `n` data records follow `after`; the whole log.
    async fn wait_data_records(&self, after: u64, n: usize) -> Vec<pb::Record> {
        let cache_url = self.cache.url();
        wait_for(
            &format!("{n} data records after {after}"),
            Duration::from_secs(60),
            || {
                let cache_url = cache_url.clone();
                async move {
                    let records: Vec<pb::Record> =
                        tail_all(self.insecure.at(&cache_url), "vm", 1).await;
                    (data_records_after(&records, after) >= n).then_some(records)
                }
            },
        )
        .await
    }
}

/// Data records (writes and zeroes) above `after`.
fn data_records_after(records: &[pb::Record], after: u64) -> usize {
    records
        .iter()
        .filter(|r| r.sequence > after)
        .filter(|r| matches!(r.op, Some(Op::Write(_) | Op::WriteZeroes(_) | Op::Trim(_))))
        .count()
}

/// Chunks whose checksums follow `after`.
fn digests_after(records: &[pb::Record], after: u64) -> u64 {
    records
        .iter()
        .filter(|r| r.sequence > after)
        .filter_map(|r| match &r.op {
            Some(Op::Digests(d)) => Some(d.crc32c.len() as u64),
            _ => None,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_replicates_its_vm() {
    let setup = Setup::new().await;
    let agent = Agent::start(&setup, &setup.state_dir());
    setup.wait_state(reg::ReplicationState::Protected).await;
    agent
        .qemu_io("os", &["write -P 0x99 2M 256k", "write -z 3M 64k"])
        .await;
    setup.wait_replay_equals_source().await;
    setup.registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_its_metrics_when_asked() {
    let setup = Setup::new().await;
    let metrics = free_addr().to_string();
    let agent = Agent::start_with(&setup, &setup.state_dir(), &["--metrics-listen", &metrics]);
    setup.wait_state(reg::ReplicationState::Protected).await;
    agent.qemu_io("os", &["write -P 0x17 0 1M"]).await;
    let body = wait_for(
        "the write in the agent's metrics",
        Duration::from_secs(30),
        || {
            let metrics = metrics.clone();
            async move {
                let body = ferry_testkit::scrape::metrics(&metrics).await?;
                sample(&body, r#"ferry_agent_written_bytes_total{vm="vm"}"#)
                    .is_some_and(|b| b >= f64::from(1 << 20))
                    .then_some(body)
            }
        },
    )
    .await;
    assert!(
        sample(&body, r#"ferry_agent_writes_total{vm="vm"}"#).is_some_and(|n| n >= 1.0),
        "{body}"
    );
    let capacity = ferry_agent::stream::StreamLimits::default().buffer_bytes as f64;
    assert_eq!(
        sample(&body, r#"ferry_agent_buffer_capacity_bytes{vm="vm"}"#),
        Some(capacity),
        "{body}"
    );
    assert!(
        sample(&body, r#"ferry_agent_buffered_bytes{vm="vm"}"#).is_some(),
        "{body}"
    );
    assert_eq!(
        sample(&body, r#"ferry_agent_tracking{vm="vm"}"#),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, r#"ferry_agent_detached{vm="vm"}"#),
        Some(0.0),
        "{body}"
    );
    assert!(
        sample(&body, "process_resident_memory_bytes").is_some(),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_changed_chunk_map_survives_a_clean_restart_and_a_crash_means_a_checksum_resync() {
    let mut setup = Setup::new().await;
    let state_dir = setup.state_dir();
    let mut agent = Agent::start(&setup, &state_dir);
    setup.wait_state(reg::ReplicationState::Protected).await;
    setup.wait_replay_equals_source().await;

    // The cache goes away; writes complete at the agent and wait there.
    assert!(setup.cache.signal_and_wait("TERM").success());
    agent.qemu_io("os", &["write -P 0x77 5M 128k"]).await;
    assert!(agent.stop("TERM"), "the agent stops cleanly");
    let saved = StateFile::open(&state_dir, "vm").unwrap().load().unwrap();
    let Some(Saved::Clean(dirty)) = saved else {
        panic!("expected a clean map, got {saved:?}");
    };
    assert_eq!(
        dirty.data.chunks("os"),
        vec![80, 81],
        "5M..5M+128k is chunks 80 and 81"
    );

    // Back: only the two saved chunks travel again, and the log rebuilds
    // the source.
    let last = setup.restart_cache().await;
    let mut agent = Agent::start(&setup, &state_dir);
    setup.wait_data_records(last, 2).await;
    setup.wait_state(reg::ReplicationState::Protected).await;
    let records = tail_all(setup.insecure.at(&setup.cache.url()), "vm", 1).await;
    assert_eq!(
        data_records_after(&records, last),
        2,
        "only the saved chunks"
    );
    assert!(setup.replay_equals_source(&records));

    // A crash with writes still buffered: the map is lost, so every chunk
    // of the disk is checked by checksum against the replica, and only the
    // chunk whose write was lost travels again.
    assert!(setup.cache.signal_and_wait("TERM").success());
    agent.qemu_io("os", &["write -P 0x55 7M 64k"]).await;
    agent.stop("KILL");
    assert_eq!(
        StateFile::open(&state_dir, "vm").unwrap().load().unwrap(),
        Some(Saved::Unclean)
    );
    let last = setup.restart_cache().await;
    let _agent = Agent::start(&setup, &state_dir);
    let chunks = SIZE / ferry_agent::stream::DIRTY_CHUNK;
    setup.wait_digests(last, chunks).await;
    setup.wait_data_records(last, 1).await;
    setup.wait_state(reg::ReplicationState::Protected).await;
    let records = tail_all(setup.insecure.at(&setup.cache.url()), "vm", 1).await;
    assert_eq!(
        digests_after(&records, last),
        chunks,
        "every chunk checked once"
    );
    assert_eq!(
        data_records_after(&records, last),
        1,
        "only 7M..7M+64k differed"
    );
    assert!(setup.replay_equals_source(&records));
    setup.registry.stop().await;
}

/// The cache's newest durable sequence of the VM.
async fn cache_last(cache: At<'_>) -> u64 {
    pb::cache_client::CacheClient::new(cache.as_service(ServiceKind::Processor))
        .get_log_info(pb::GetLogInfoRequest {
            vm_name: "vm".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .last_sequence
}

/// Whether an agent streams the VM into the cache now.
async fn streaming(cache: At<'_>) -> bool {
    let sent = pb::cache_client::CacheClient::new(cache.as_service(ServiceKind::Processor))
        .send_control(pb::SendControlRequest {
            vm_name: "vm".into(),
            control: Some(pb::send_control_request::Control::Bookmark(
                pb::BookmarkRequest { id: "probe".into() },
            )),
        })
        .await;
    match sent {
        Ok(_) => true,
        Err(s) if s.code() == tonic::Code::FailedPrecondition => false,
        Err(s) => panic!("SendControl: {s}"),
    }
}

/// A write and a read back through one held NBD connection, off the
/// runtime; panics unless both succeed.
async fn write_and_read(
    nbd: ferry_testkit::nbd::Nbd,
    offset: u64,
    byte: u8,
) -> ferry_testkit::nbd::Nbd {
    tokio::task::spawn_blocking(move || {
        let mut nbd = nbd;
        let data = vec![byte; 64 * 1024];
        assert_eq!(nbd.write(offset, &data).unwrap(), 0, "the write completes");
        assert_eq!(nbd.read(offset, data.len() as u32).unwrap(), data);
        nbd
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_stopped_or_fenced_never_takes_the_vm_disk_offline() {
    let setup = Setup::new().await;
    let mut agent = Agent::start_with(&setup, &setup.state_dir(), &["--heartbeat-secs", "1"]);
    setup.wait_state(reg::ReplicationState::Protected).await;
    setup.wait_replay_equals_source().await;
    // One NBD connection, held across everything below, as a VM holds it.
    let addr = agent.nbd.to_string();
    let nbd =
        tokio::task::spawn_blocking(move || ferry_testkit::nbd::Nbd::go(&addr, "os").unwrap())
            .await
            .unwrap();

    // The cache stops the stream: the export stays, the write completes,
    // and since registry still lets this agent replicate, it streams again
    // and resyncs what it tracked meanwhile.
    pb::cache_client::CacheClient::new(
        setup
            .insecure
            .at(&setup.cache.url())
            .as_service(ServiceKind::Processor),
    )
    .send_control(pb::SendControlRequest {
        vm_name: "vm".into(),
        control: Some(pb::send_control_request::Control::Stop(pb::Stop {
            reason: "operator".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let nbd = write_and_read(nbd, 6 << 20, 0xab).await;
    setup.wait_replay_equals_source().await;
    setup.wait_state(reg::ReplicationState::Protected).await;

    // A newer agent registers (fencing this one): the export still serves
    // and the VM's writes complete, tracked, never reaching the cache.
    let registry = setup.registry.url.clone();
    ferry_agent::register(
        &registry,
        &ferry_runtime::peers::Credentials::none(),
        "vm",
        "newer",
        "",
        Default::default(),
    )
    .await
    .unwrap();
    let cache_url = setup.cache.url();
    wait_for("the fenced stream to end", Duration::from_secs(30), || {
        let cache_url = cache_url.clone();
        let insecure = setup.insecure.clone();
        async move { (!streaming(insecure.at(&cache_url)).await).then_some(()) }
    })
    .await;
    let before = cache_last(setup.insecure.at(&cache_url)).await;
    let _nbd = write_and_read(nbd, 7 << 20, 0xcd).await;
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent runs on"
    );
    assert!(agent.stop("TERM"), "and stops cleanly when told");
    assert_eq!(
        cache_last(setup.insecure.at(&cache_url)).await,
        before,
        "nothing reached the cache"
    );
    let saved = StateFile::open(&setup.state_dir(), "vm")
        .unwrap()
        .load()
        .unwrap();
    let Some(Saved::Clean(dirty)) = saved else {
        panic!("expected a clean map, got {saved:?}");
    };
    assert_eq!(
        dirty.data.chunks("os"),
        vec![112],
        "the fenced write is tracked"
    );
    setup.registry.stop().await;
}

/// Runs the binary for VM `vm` of `registry` with `args` (no FERRY_DISK_ROOT
/// nor FERRY_NBD_LISTEN from the environment) until it exits, or kills it
/// after 20 s (an agent that started although it should have refused); its
/// status and stderr.
fn run_refused(registry: &str, args: &[&str]) -> (std::process::ExitStatus, String) {
    let child = agent_command(registry, "vm", AgentAuth::Given)
        .args(args)
        .env_remove("FERRY_DISK_ROOT")
        .env_remove("FERRY_NBD_LISTEN")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            rx.recv().unwrap().unwrap()
        }
    };
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_agent_binary_requires_a_disk_root() {
    let (status, stderr) = run_refused("http://127.0.0.1:1", &["--nbd-listen", "127.0.0.1:0"]);
    assert!(!status.success());
    assert!(stderr.contains("--disk-root DIR"), "{stderr}");
    // A sentence, not Rust's debug print of an error.
    assert!(!stderr.contains("Error: \""), "{stderr}");
    assert!(stderr.trim_end().lines().count() == 1, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_serves_on_a_unix_socket_of_mode_0600_that_replaces_a_stale_one() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let setup = Setup::new().await;
    let socket = setup.dir.path().join("nbd.sock");
    let s = socket.to_str().unwrap();
    // A stale socket a killed agent left: bound, its listener gone.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let mut agent = Agent::start_with(&setup, &setup.state_dir(), &["--nbd-socket", s]);
    setup.wait_state(reg::ReplicationState::Protected).await;
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o600,
        "only the agent's user connects"
    );

    let url = format!("nbd+unix:///os?socket={s}");
    let read = qemu_io(
        url.clone(),
        &[
            "write -P 0x99 2M 256k",
            "write -z 3M 64k",
            "read -P 0x99 2M 256k",
        ],
    )
    .await;
    assert!(read.contains("read 262144/262144 bytes"), "{read}");
    setup.wait_replay_equals_source().await;

    // A second agent does not take a socket someone serves on.
    let (status, stderr) = run_refused(
        &setup.registry.url,
        &[
            "--disk-root",
            setup.dir.path().to_str().unwrap(),
            "--nbd-listen",
            "127.0.0.1:0",
            "--nbd-socket",
            s,
        ],
    );
    assert!(!status.success());
    assert!(stderr.contains("another process serves on it"), "{stderr}");
    qemu_io(url, &["read -P 0x99 2M 4k"]).await;

    assert!(agent.stop("TERM"), "the agent stops cleanly");
    assert!(!socket.exists(), "the socket is removed at exit");
    setup.registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_nbd_beyond_loopback_needs_nbd_insecure() {
    let setup = Setup::new().await;
    let root = setup.dir.path().to_str().unwrap().to_string();
    let registry = setup.registry.url.clone();
    let base = ["--disk-root", root.as_str()];
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let mut args = base.to_vec();
        args.extend(["--nbd-listen", listen]);
        let (status, stderr) = run_refused(&registry, &args);
        assert!(!status.success(), "{listen}");
        for flag in ["--nbd-insecure", "--nbd-tls-cert", "--nbd-tls-key"] {
            assert!(stderr.contains(flag), "{listen}: {flag} in {stderr}");
        }
        assert!(
            stderr.contains(&format!("--nbd-listen {listen} is not a loopback address")),
            "{stderr}"
        );
    }

    // With --nbd-insecure it serves, on every interface.
    let port = free_addr().port();
    let listen = format!("0.0.0.0:{port}");
    let nbd: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut agent = Agent::start_listening(
        &setup,
        &setup.state_dir(),
        &listen,
        nbd,
        &["--nbd-insecure"],
    );
    setup.wait_state(reg::ReplicationState::Protected).await;
    agent.qemu_io("os", &["write -P 0x99 2M 64k"]).await;
    setup.wait_replay_equals_source().await;
    assert!(agent.stop("TERM"));
    setup.registry.stop().await;
}

/// A test PKI in `dir`: a CA; the agent's server certificate for 127.0.0.1
/// (`server/`); qemu client directories `client/` (CA and a client
/// certificate), `anonymous/` (the CA only) and `rogue/` (a client
/// certificate from another CA).
fn test_pki(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    fn ca(name: &str) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        (cert, Issuer::new(params, key))
    }
    fn leaf(
        issuer: &Issuer<'static, KeyPair>,
        names: &[&str],
        purpose: ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "ferry test");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
    let write = |sub: &str, name: &str, pem: &str| {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        std::fs::write(dir.join(sub).join(name), pem).unwrap();
    };
    let (ca_cert, issuer) = ca("ferry test CA");
    let (rogue_ca, rogue) = ca("someone else's CA");
    let (cert, key) = leaf(
        &issuer,
        &["127.0.0.1", "localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    write("server", "server-cert.pem", &cert);
    write("server", "server-key.pem", &key);
    write("server", "ca-cert.pem", &ca_cert.pem());
    let (cert, key) = leaf(&issuer, &["client"], ExtendedKeyUsagePurpose::ClientAuth);
    write("client", "ca-cert.pem", &ca_cert.pem());
    write("client", "client-cert.pem", &cert);
    write("client", "client-key.pem", &key);
    write("anonymous", "ca-cert.pem", &ca_cert.pem());
    let (cert, key) = leaf(&rogue, &["client"], ExtendedKeyUsagePurpose::ClientAuth);
    // qemu checks its own certificate against its CA file too: the rogue
    // client trusts both, so that only the agent can refuse it.
    write(
        "rogue",
        "ca-cert.pem",
        &format!("{}{}", ca_cert.pem(), rogue_ca.pem()),
    );
    write("rogue", "client-cert.pem", &cert);
    write("rogue", "client-key.pem", &key);
}

/// qemu-io with `commands` against export `disk` at `nbd`, over TLS with
/// the credentials in `creds` (None: plaintext); its output, or Err with
/// what it said.
async fn qemu_io_tls(
    nbd: SocketAddr,
    disk: &str,
    creds: Option<&Path>,
    commands: &[&str],
) -> Result<String, String> {
    let mut args: Vec<String> = Vec::new();
    let mut opts = format!(
        "driver=nbd,host={},port={},export={disk}",
        nbd.ip(),
        nbd.port()
    );
    if let Some(dir) = creds {
        args.push("--object".into());
        args.push(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            dir.display()
        ));
        opts.push_str(",tls-creds=tls0");
    }
    args.push("--image-opts".into());
    args.push(opts);
    for c in commands {
        args.extend(["-c".to_string(), c.to_string()]);
    }
    tokio::task::spawn_blocking(move || {
        let out = Command::new("qemu-io").args(&args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // qemu-io exits 0 even when a command fails: look at what it did.
        if out.status.success() && !text.contains("failed") && !text.contains("Could not") {
            Ok(text)
        } else {
            Err(text)
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_over_tls_takes_only_clients_with_a_certificate_of_its_ca() {
    let setup = Setup::new().await;
    let pki = setup.dir.path().join("pki");
    test_pki(&pki);
    let server = pki.join("server");
    let (cert, key, ca) = (
        server.join("server-cert.pem"),
        server.join("server-key.pem"),
        server.join("ca-cert.pem"),
    );
    // TLS makes a non-loopback address acceptable without --nbd-insecure.
    let port = free_addr().port();
    let nbd: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut agent = Agent::start_listening(
        &setup,
        &setup.state_dir(),
        &format!("0.0.0.0:{port}"),
        nbd,
        &[
            "--nbd-tls-cert",
            cert.to_str().unwrap(),
            "--nbd-tls-key",
            key.to_str().unwrap(),
            "--nbd-tls-ca",
            ca.to_str().unwrap(),
        ],
    );
    setup.wait_state(reg::ReplicationState::Protected).await;

    let out = qemu_io_tls(
        nbd,
        "os",
        Some(&pki.join("client")),
        &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"],
    )
    .await
    .unwrap();
    assert!(out.contains("read 65536/65536 bytes"), "{out}");
    setup.wait_replay_equals_source().await;

    // Plaintext: every option but STARTTLS is refused (TLS_REQD).
    let plain = qemu_io_tls(nbd, "os", None, &["read 0 4k"])
        .await
        .unwrap_err();
    assert!(plain.contains("TLS negotiation required"), "{plain}");
    // TLS without a client certificate, or with one of another CA.
    for dir in ["anonymous", "rogue"] {
        let refused = qemu_io_tls(nbd, "os", Some(&pki.join(dir)), &["write -P 0x66 0 4k"])
            .await
            .unwrap_err();
        // The agent ends the TLS handshake (qemu sees its alert, or the
        // connection gone under its next write): the image never opens.
        assert!(
            refused.contains("can't open") && !refused.contains("wrote"),
            "{dir}: {refused}"
        );
    }
    let _ = setup.wait_replay_equals_source().await;
    assert_eq!(
        &std::fs::read(&setup.source).unwrap()[..65536],
        &[0x5a; 65536][..],
        "no refused client wrote"
    );
    assert!(agent.stop("TERM"));
    setup.registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_over_tls_without_a_client_ca_serves_any_tls_client() {
    let setup = Setup::new().await;
    let pki = setup.dir.path().join("pki");
    test_pki(&pki);
    let server = pki.join("server");
    let mut agent = Agent::start_with(
        &setup,
        &setup.state_dir(),
        &[
            "--nbd-tls-cert",
            server.join("server-cert.pem").to_str().unwrap(),
            "--nbd-tls-key",
            server.join("server-key.pem").to_str().unwrap(),
        ],
    );
    setup.wait_state(reg::ReplicationState::Protected).await;
    let out = qemu_io_tls(
        agent.nbd,
        "os",
        Some(&pki.join("anonymous")),
        &["write -P 0x5a 1M 64k", "read -P 0x5a 1M 64k"],
    )
    .await
    .unwrap();
    assert!(out.contains("read 65536/65536 bytes"), "{out}");
    setup.wait_replay_equals_source().await;
    let plain = qemu_io_tls(agent.nbd, "os", None, &["read 0 4k"])
        .await
        .unwrap_err();
    assert!(plain.contains("TLS negotiation required"), "{plain}");
    assert!(agent.stop("TERM"));
    setup.registry.stop().await;
}
