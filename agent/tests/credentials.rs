//! An agent in a secured deployment: registry-svc and cache-svc serve TLS
//! and check every caller. The agent of web-1, with web-1's certificate,
//! registers, reports its health, replicates and takes the VM to PROTECTED;
//! an agent presenting web-2's certificate for web-1 is refused
//! (PERMISSION_DENIED) without fencing the real one, whose disk keeps taking
//! writes; an agent with no certificate is UNAUTHENTICATED. The binary takes
//! its certificate or an agent token from its flags. A group's members
//! serve their group ports with TLS and admit only each other.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_agent::run::{Agent, AgentOptions, GroupPort, RunError};
use ferry_agent::stream::StreamLimits;
use ferry_agent::AgentError;
use ferry_proto::cache::v1 as cache;
use ferry_proto::cache::v1::cache_client::CacheClient;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::config::Security;
use ferry_runtime::peers::Credentials;
use ferry_runtime::security::{ClusterSecret, OperatorRole, Principal, ServiceKind};
use ferry_runtime::{CancellationToken, ServiceConfig};
use ferry_testkit::pki::CertFiles;
use ferry_testkit::{agent_command, wait_for, AgentAuth, TestPki};
use tokio::net::TcpListener;

const SIZE: u64 = 4 << 20;

/// registry-svc and cache-svc in-process, TLS on, every caller checked.
struct Secured {
    pki: TestPki,
    registry: String,
    cache: String,
    shutdown: CancellationToken,
}

impl Drop for Secured {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn security(pki: &TestPki, service: ServiceKind, secret: Option<&ClusterSecret>) -> Security {
    pki.security(service, secret)
}

/// A client presenting `files` (or no certificate), trusting the test CA.
fn presenting(pki: &TestPki, files: Option<&CertFiles>) -> Credentials {
    pki.presenting(files)
}

async fn secured(dir: &Path) -> Secured {
    secured_with(dir, None).await
}

/// As [`secured`]; with a cluster secret, agents may also present agent
/// tokens minted from it (over TLS, without a certificate).
async fn secured_with(dir: &Path, secret: Option<&ClusterSecret>) -> Secured {
    let pki = TestPki::new();
    let registry_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cache_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry = format!("https://{}", registry_listener.local_addr().unwrap());
    let cache = format!("https://{}", cache_listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();

    let mut config = ServiceConfig::in_process(dir.join("registry"));
    config.cache = Some(cache.clone());
    config.security = security(&pki, ServiceKind::Registry, secret);
    let config = registry_svc::Config::new(config, registry_svc::Settings::default()).unwrap();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = registry_svc::serve(config, registry_listener, stop).await {
            panic!("registry-svc failed: {e}");
        }
    });

    let mut config = ServiceConfig::in_process(dir.join("cache"));
    config.registry = Some(registry.clone());
    config.security = security(&pki, ServiceKind::Cache, secret);
    let stop = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = cache_svc::run(config, Default::default(), cache_listener, stop).await {
            panic!("cache-svc failed: {e}");
        }
    });

    // Health is public; TLS is still needed to reach it.
    let anyone = presenting(&pki, None);
    for url in [&registry, &cache] {
        tokio::time::timeout(
            Duration::from_secs(30),
            ferry_runtime::peers::wait_serving(url, "", &anyone, &shutdown),
        )
        .await
        .expect("the service serves within 30 s")
        .unwrap();
    }
    Secured {
        pki,
        registry,
        cache,
        shutdown,
    }
}

impl Secured {
    fn admin(&self) -> Credentials {
        presenting(&self.pki, Some(&self.pki.operator(OperatorRole::Admin)))
    }

    fn agent(&self, vm: &str) -> Credentials {
        presenting(&self.pki, Some(&self.pki.agent(vm)))
    }

    fn registry_client(&self) -> RegistryClient<ferry_runtime::PeerChannel> {
        RegistryClient::new(ferry_runtime::connect(&self.registry, &self.admin()).unwrap())
    }

    /// The VM's log in the cache, read as an admin; None before it has one.
    async fn log(&self, vm: &str) -> Option<cache::LogInfo> {
        let channel = ferry_runtime::connect(&self.cache, &self.admin()).unwrap();
        CacheClient::new(channel)
            .get_log_info(cache::GetLogInfoRequest {
                vm_name: vm.to_string(),
            })
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    async fn item(&self, vm: &str) -> reg::ProtectedItem {
        self.registry_client()
            .get_protected_item(reg::GetProtectedItemRequest {
                vm_name: vm.to_string(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// A one-time enrollment token for `vm`'s agent, issued by an admin.
    async fn enroll(&self, vm: &str) -> String {
        self.registry_client()
            .create_enrollment_token(reg::CreateEnrollmentTokenRequest {
                vm_name: vm.to_string(),
                ttl_seconds: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .token
    }

    /// Registers `vm` with one disk "os" at `image` and enables its
    /// replication, as an admin; the enrollment token for its agent.
    async fn protect(&self, vm: &str, image: &Path) -> String {
        let mut r = self.registry_client();
        r.register_vm(reg::RegisterVmRequest {
            vm: Some(ferry_testkit::vm::vm_spec(vm, &[("os", SIZE, image)])),
        })
        .await
        .unwrap();
        r.enable_replication(reg::EnableReplicationRequest {
            vm_name: vm.to_string(),
            target_region: "westus".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        self.enroll(vm).await
    }
}

/// Starts the agent of `vm`, presenting `credentials` and showing
/// `enrollment_token`; its NBD address.
async fn start(
    s: &Secured,
    vm: &str,
    credentials: Credentials,
    enrollment_token: Option<&str>,
    dir: &Path,
) -> (Result<Agent, RunError>, String) {
    let nbd = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = nbd.local_addr().unwrap().to_string();
    let started = Agent::start(AgentOptions {
        registry: s.registry.clone(),
        vm: vm.into(),
        nbd: nbd.into(),
        group: GroupPort::Off,
        group_tls: None,
        group_insecure: false,
        enrollment_token: enrollment_token.map(str::to_string),
        group_address: String::new(),
        state_dir: dir.join("agent"),
        disk_roots: vec![dir.join("images")],
        limits: StreamLimits::default(),
        nbd_limits: Default::default(),
        attached: false,
        heartbeat: Duration::from_millis(200),
        scripts: None,
        credentials,
    })
    .await;
    (started, addr)
}

fn image(dir: &Path) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let path = images.join("os.raw");
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    path
}

/// qemu-io writes 64 KiB at `offset` through the export and reads it back.
async fn write_through(addr: &str, offset: u64) {
    let url = format!("nbd://{addr}/os");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .args(["-c", &format!("write -P 0x5a {offset} 64k")])
            .args(["-c", &format!("read -P 0x5a {offset} 64k"), &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io: {text}"
    );
}

/// Waits until the cache holds the VM's records up to `sequence`.
async fn reaches_cache(s: &Secured, vm: &str, sequence: u64) -> cache::LogInfo {
    wait_for(
        &format!("{vm}'s records up to {sequence} in the cache"),
        Duration::from_secs(30),
        || async { s.log(vm).await.filter(|l| l.last_sequence >= sequence) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vms_own_agent_replicates_over_tls_and_an_impostor_is_refused_without_harm() {
    let dir = tempfile::tempdir().unwrap();
    let s = secured(dir.path()).await;
    let os = image(dir.path());
    let token = s.protect("web-1", &os).await;

    // The agent of web-1 with web-1's certificate and its enrollment token:
    // registered, its health reaches registry, its writes reach the cache.
    let (agent, addr) = start(&s, "web-1", s.agent("web-1"), Some(&token), dir.path()).await;
    let agent = agent.expect("web-1's agent starts");
    let epoch = agent.epoch;
    assert_eq!(s.item("web-1").await.epoch, epoch.get());
    let seq = agent.capture.write("os", 0, vec![7u8; 4096]).await.unwrap();
    assert!(seq > 0);
    let log = reaches_cache(&s, "web-1", seq).await;
    assert_eq!(log.epoch, epoch.get(), "{log:?}");
    wait_for(
        "web-1's agent heartbeat in registry",
        Duration::from_secs(30),
        || async {
            s.item("web-1")
                .await
                .health_reports
                .into_iter()
                .find(|r| r.component == "agent")
        },
    )
    .await;

    // Initial replication, reported by the agent: the VM is PROTECTED.
    wait_for("web-1 PROTECTED", Duration::from_secs(30), || async {
        (s.item("web-1").await.state() == reg::ReplicationState::Protected).then_some(())
    })
    .await;

    // An agent for web-1 presenting web-2's certificate: refused by
    // registry, so it never registers, never streams, and does not fence
    // web-1's own agent.
    let impostor_dir = dir.path().join("impostor");
    std::fs::create_dir_all(&impostor_dir).unwrap();
    image(&impostor_dir);
    let (refused, _) = start(&s, "web-1", s.agent("web-2"), None, &impostor_dir).await;
    match refused {
        Err(RunError::Agent(AgentError::Registry { vm, status })) => {
            assert_eq!(vm, "web-1");
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
            assert!(status.message().contains("web-2"), "{status}");
        }
        Err(e) => panic!("refused for the wrong reason: {e}"),
        Ok(_) => panic!("an agent with web-2's certificate started for web-1"),
    }
    assert_eq!(
        s.item("web-1").await.epoch,
        epoch.get(),
        "the impostor fenced the VM's own agent"
    );

    // web-1's own certificate on another host (a fresh state directory, so
    // no credential of its own), without an enrollment token, then with the
    // token the real agent already used: refused, and nothing is fenced.
    for (shown, says) in [
        (None, "showed neither"),
        (Some(token.as_str()), "used already"),
    ] {
        let (refused, _) = start(&s, "web-1", s.agent("web-1"), shown, &impostor_dir).await;
        match refused {
            Err(RunError::Agent(AgentError::Registry { status, .. })) => {
                assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
                assert!(status.message().contains(says), "{status}");
                assert!(
                    status.message().contains("ferry agent enroll web-1"),
                    "{status}"
                );
            }
            Err(e) => panic!("refused for the wrong reason: {e}"),
            Ok(_) => panic!("an agent without a valid enrollment took web-1 over"),
        }
        assert_eq!(
            s.item("web-1").await.epoch,
            epoch.get(),
            "a registration without enrollment fenced the VM's own agent"
        );
    }

    // The VM's disk stays online: a write through the NBD export (qemu-io)
    // completes, and it still reaches the cache from the real agent.
    let before = agent.stream.last().await;
    write_through(&addr, 1 << 20).await;
    let after = agent.stream.last().await;
    assert!(after > before, "the NBD write went into the stream");
    let log = reaches_cache(&s, "web-1", after).await;
    assert_eq!(log.epoch, epoch.get(), "{log:?}");
    agent.stop(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_a_certificate_is_unauthenticated_and_a_plain_url_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = secured(dir.path()).await;
    let os = image(dir.path());
    s.protect("web-1", &os).await;

    // TLS with no client certificate nor token: nobody.
    let (refused, _) = start(&s, "web-1", presenting(&s.pki, None), None, dir.path()).await;
    match refused {
        Err(RunError::Agent(AgentError::Registry { status, .. })) => {
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
        }
        Err(e) => panic!("refused for the wrong reason: {e}"),
        Ok(_) => panic!("an agent without credentials started"),
    }
    // No credentials at all against an https:// registry: said at once.
    let (refused, _) = start(&s, "web-1", Credentials::none(), None, dir.path()).await;
    let err = refused.err().expect("refused");
    assert!(matches!(err, RunError::Agent(AgentError::Peer(_))), "{err}");
    assert!(err.to_string().contains("https:// URL needs TLS"), "{err}");
    assert!(s.log("web-1").await.is_none_or(|l| l.last_sequence == 0));
}

/// The ferry-agent binary for web-1 against `s`, with `args` (and the
/// environment `env`; no other FERRY_* variable), its stderr piped.
fn agent_binary(
    s: &Secured,
    dir: &Path,
    args: &[&str],
    env: &[(&str, &Path)],
) -> std::process::Child {
    let mut command = agent_command(&s.registry, "web-1", AgentAuth::Given);
    for (key, _) in std::env::vars() {
        if key.starts_with("FERRY_") && key != "FERRY_LOG" {
            command.env_remove(key);
        }
    }
    command
        .args(["--nbd-listen", "127.0.0.1:0", "--group-listen", "off"])
        .arg("--state-dir")
        .arg(dir.join("agent"))
        .arg("--disk-root")
        .arg(dir.join("images"))
        .args(["--heartbeat-secs", "1"])
        .args(args)
        .stderr(std::process::Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    command.spawn().unwrap()
}

/// The agent's health report in registry once web-1's epoch has risen past
/// `before` (the agent binary registered); 30 s at most.
async fn heard_after(s: &Secured, before: u64, what: &str) -> reg::HealthReport {
    wait_for(what, Duration::from_secs(30), || async {
        let item = s.item("web-1").await;
        (item.epoch > before)
            .then(|| {
                item.health_reports
                    .into_iter()
                    .find(|r| r.component == "agent")
            })
            .flatten()
    })
    .await
}

/// Waits (20 s at most) for `child` to exit; its status and stderr.
fn exited(child: std::process::Child) -> (std::process::ExitStatus, String) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_takes_its_certificate_from_flags_and_says_why_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = secured(dir.path()).await;
    let os = image(dir.path());
    let token = s.protect("web-1", &os).await;
    let token_file = dir.path().join("enrollment-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let enrollment = token_file.to_str().unwrap();
    let own = s.pki.agent("web-1");
    let other = s.pki.agent("web-2");
    let ca = s.pki.ca();
    let (ca_s, cert, key) = (
        ca.to_str().unwrap(),
        own.cert.to_str().unwrap(),
        own.key.to_str().unwrap(),
    );

    // Another VM's certificate (through the environment): refused, said.
    let child = agent_binary(
        &s,
        dir.path(),
        &[],
        &[
            ("FERRY_TLS_CERT", &other.cert),
            ("FERRY_TLS_KEY", &other.key),
            ("FERRY_TLS_CA", &ca),
        ],
    );
    let (status, stderr) = exited(child);
    assert!(!status.success());
    assert!(stderr.contains("PermissionDenied"), "{stderr}");
    assert!(
        stderr.contains("web-2") && stderr.contains("may not act for VM"),
        "{stderr}"
    );
    assert!(stderr.contains("ferry certs init --agent"), "{stderr}");

    // TLS with a plain http:// registry URL: refused at once.
    let plain_url = s.registry.replace("https://", "http://");
    let child = agent_command(&plain_url, "web-1", AgentAuth::Given)
        .args(["--nbd-listen", "127.0.0.1:0", "--group-listen", "off"])
        .arg("--disk-root")
        .arg(dir.path().join("images"))
        .args(["--tls-ca", ca_s, "--tls-cert", cert, "--tls-key", key])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (status, stderr) = exited(child);
    assert!(!status.success());
    assert!(
        stderr.contains("--registry") && stderr.contains("use an https:// URL"),
        "{stderr}"
    );

    // An empty token file: refused at once.
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, " \n").unwrap();
    let child = agent_binary(
        &s,
        dir.path(),
        &["--tls-ca", ca_s, "--token-file", empty.to_str().unwrap()],
        &[],
    );
    let (status, stderr) = exited(child);
    assert!(!status.success());
    assert!(
        stderr.contains("--token-file") && stderr.contains("empty"),
        "{stderr}"
    );

    // Its own certificate but no enrollment token: refused, and told how to
    // enroll.
    let own_cert = ["--tls-ca", ca_s, "--tls-cert", cert, "--tls-key", key];
    let child = agent_binary(&s, dir.path(), &own_cert, &[]);
    let (status, stderr) = exited(child);
    assert!(!status.success());
    assert!(
        stderr.contains("PermissionDenied") && stderr.contains("--enrollment-token-file"),
        "{stderr}"
    );

    // Its own certificate and the enrollment token: registered and heard.
    // Killed and started again with the same (now used) token file, it
    // registers on the credential it kept in its state directory.
    let with_token = [&own_cert[..], &["--enrollment-token-file", enrollment]].concat();
    for start in ["first", "after a SIGKILL"] {
        let before = s.item("web-1").await.epoch;
        let mut child = agent_binary(&s, dir.path(), &with_token, &[]);
        let report = heard_after(
            &s,
            before,
            &format!("the agent binary's heartbeat in registry ({start} start)"),
        )
        .await;
        assert!(!report.message.contains("silent"), "{report:?}");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the agent binary exited ({start} start)"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_proves_who_it_is_with_an_agent_token_from_its_file() {
    let dir = tempfile::tempdir().unwrap();
    // The secret file as docs/security.md makes it (two lines of hex).
    let secret_file = dir.path().join("cluster-secret");
    let made = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 32 /dev/urandom | xxd -p > '{}'",
            secret_file.display()
        ))
        .status()
        .unwrap();
    assert!(made.success());
    let secret = ClusterSecret::load(&secret_file).unwrap();
    let s = secured_with(dir.path(), Some(&secret)).await;
    let os = image(dir.path());
    let enrollment = dir.path().join("enrollment-token");
    std::fs::write(&enrollment, s.protect("web-1", &os).await).unwrap();
    let token = |vm: &str| {
        secret
            .token_for(&Principal::Agent {
                vm: ferry_proto::ids::VmName::parse(vm).unwrap(),
            })
            .unwrap()
    };
    let ca = s.pki.ca();

    // web-2's token for web-1: refused, said.
    let file = dir.path().join("web-2.token");
    std::fs::write(&file, token("web-2")).unwrap();
    let child = agent_binary(
        &s,
        dir.path(),
        &[],
        &[("FERRY_TLS_CA", &ca), ("FERRY_AGENT_TOKEN_FILE", &file)],
    );
    let (status, stderr) = exited(child);
    assert!(!status.success());
    assert!(
        stderr.contains("PermissionDenied") && stderr.contains("may not act for VM"),
        "{stderr}"
    );

    // Its own token, minted with the openssl CLI as docs/agent.md says
    // (the file ends with a newline): the same token, and heard.
    let file = dir.path().join("web-1.token");
    let recipe = format!(
        "printf 'fyagent.web-1.%s\\n' \"$(printf %s spiffe://ferry/agent/web-1 \
         | openssl dgst -sha256 -hmac \"$(cat '{}')\" -r | cut -d' ' -f1)\" > '{}'",
        secret_file.display(),
        file.display()
    );
    let minted = Command::new("sh").arg("-c").arg(&recipe).status().unwrap();
    assert!(minted.success(), "{recipe}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        format!("{}\n", token("web-1")),
        "the openssl recipe mints the agent token"
    );
    let before = s.item("web-1").await.epoch;
    let mut child = agent_binary(
        &s,
        dir.path(),
        &[
            "--tls-ca",
            ca.to_str().unwrap(),
            "--token-file",
            file.to_str().unwrap(),
        ],
        &[("FERRY_ENROLLMENT_TOKEN_FILE", &enrollment)],
    );
    heard_after(&s, before, "the agent binary's heartbeat in registry").await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the agent binary exited"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A group port without TLS checks no caller: a member's agent token must
/// not travel to it in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_token_never_goes_to_a_plain_group_port() {
    use ferry_agent::capture::{Capture, SourceDisk};
    use ferry_agent::group::{round, Member, Peers, ROUND_DEADLINE};
    use ferry_agent::stream::Stream;
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let capture = Arc::new(Capture::new(
        vec![SourceDisk::open("os", &dir.path().join("os.raw"), 1 << 20).unwrap()],
        Stream::new(1, StreamLimits::default()),
    ));
    let member = Member::new("web-1", "g", capture);
    member.set_members(["web-1"]);
    let secret = ferry_agent::group_signature::GroupSecret::new(vec![1; 32]);
    member.set_secret(secret.clone());
    // Whether each call carried an authorization header.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let service = tonic::service::interceptor::InterceptedService::new(
        member.service(),
        move |request: tonic::Request<()>| {
            let carried = request.metadata().get("authorization").is_some();
            record.lock().unwrap().push(carried);
            Ok(request)
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    let serving = stop.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move { serving.cancelled().await },
            ),
    );

    let mut peers = Peers::new(Credentials {
        tls: None,
        bearer: Some("fyagent.web-1.0123".into()),
    });
    peers.set_secret(secret);
    let members = [("web-1".to_string(), address)];
    let done = round(&mut peers, "g", "web-1", &members, ROUND_DEADLINE)
        .await
        .unwrap();
    assert_eq!(done.sequences.len(), 1);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "Prepare and Commit: {seen:?}");
    assert!(seen.iter().all(|carried| !carried), "{seen:?}");
    stop.cancel();
}

/// A replication group in a deployment with TLS: each member's agent serves
/// its group port with its own certificate and advertises it as https://;
/// the coordinator's rounds reach the members with its certificate and
/// commit (the group's health turns NORMAL on both); another VM's agent is
/// refused a Prepare and the member's writes are not held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_rounds_run_over_tls_between_its_members_only() {
    use ferry_agent::group::ROUND_DEADLINE;
    use ferry_proto::agent::v1 as pb;
    use ferry_proto::agent::v1::agent_group_client::AgentGroupClient;
    use ferry_runtime::time::to_duration;

    let dir = tempfile::tempdir().unwrap();
    let s = secured(dir.path()).await;
    let mut r = s.registry_client();
    let day = to_duration(Duration::from_secs(86400));
    r.create_policy(reg::CreatePolicyRequest {
        policy: Some(reg::ReplicationPolicy {
            name: "shop-policy".into(),
            crash_consistent_interval: Some(to_duration(Duration::from_secs(1))),
            multi_vm_consistency: true,
            multi_vm_interval: Some(to_duration(Duration::from_secs(1))),
            keep_all_points_for: Some(day),
            thinned_point_spacing: Some(day),
            recovery_point_retention: Some(day),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    r.create_replication_group(reg::CreateReplicationGroupRequest {
        name: "shop".into(),
        policy_name: "shop-policy".into(),
    })
    .await
    .unwrap();
    let mut agents = Vec::new();
    for vm in ["web-1", "web-2"] {
        let vm_dir = dir.path().join(vm);
        std::fs::create_dir_all(&vm_dir).unwrap();
        let os = image(&vm_dir);
        r.register_vm(reg::RegisterVmRequest {
            vm: Some(ferry_testkit::vm::vm_spec(vm, &[("os", SIZE, &os)])),
        })
        .await
        .unwrap();
        r.enable_replication(reg::EnableReplicationRequest {
            vm_name: vm.to_string(),
            target_region: "westus".into(),
            replication_group: "shop".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // Both are members before either agent starts: the first round's
    // report reaches both.
    for vm in ["web-1", "web-2"] {
        let vm_dir = dir.path().join(vm);
        let own = s.pki.agent(vm);
        let enrollment = s.enroll(vm).await;
        let agent = Agent::start(AgentOptions {
            registry: s.registry.clone(),
            vm: vm.into(),
            nbd: TcpListener::bind("127.0.0.1:0").await.unwrap().into(),
            group: GroupPort::Bound(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            group_tls: Some(
                ferry_runtime::security::Tls::load(ferry_runtime::security::TlsFiles {
                    cert: own.cert,
                    key: own.key,
                    ca: s.pki.ca(),
                })
                .unwrap(),
            ),
            group_insecure: false,
            enrollment_token: Some(enrollment),
            group_address: String::new(),
            state_dir: vm_dir.join("agent"),
            disk_roots: vec![vm_dir.join("images")],
            limits: StreamLimits::default(),
            nbd_limits: Default::default(),
            attached: false,
            heartbeat: Duration::from_millis(200),
            scripts: None,
            credentials: s.agent(vm),
        })
        .await
        .unwrap();
        assert!(
            agent.group_address.starts_with("https://127.0.0.1:"),
            "{}",
            agent.group_address
        );
        agents.push(agent);
    }

    // The coordinator's rounds commit on both members.
    for vm in ["web-1", "web-2"] {
        wait_for(
            &format!("a committed round's NORMAL group health on {vm}"),
            Duration::from_secs(30),
            || async {
                s.item(vm).await.health_reports.into_iter().find(|h| {
                    h.component == "group" && h.health == reg::ReplicationHealth::Normal as i32
                })
            },
        )
        .await;
    }

    // Another VM's agent, with a certificate from the same CA: refused,
    // and web-1's writes go on.
    let outsider = presenting(&s.pki, Some(&s.pki.agent("db-9")));
    let mut port =
        AgentGroupClient::new(ferry_runtime::connect(&agents[0].group_address, &outsider).unwrap());
    let answer = port
        .prepare(pb::PrepareRequest {
            replication_group: "shop".into(),
            round_id: "shop-forged".into(),
            coordinator: "db-9".into(),
            hold: Some(to_duration(Duration::from_secs(2))),
        })
        .await;
    for k in 0..3u64 {
        tokio::time::timeout(
            ROUND_DEADLINE * 3,
            agents[0].capture.write("os", k * 4096, vec![9; 4096]),
        )
        .await
        .expect("web-1's writes are held by an outsider's Prepare")
        .unwrap();
    }
    let refused = answer.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("db-9"), "{refused:?}");

    for agent in agents {
        agent.stop(Duration::from_secs(5)).await.unwrap();
    }
}
