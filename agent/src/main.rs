//! The ferry-agent binary.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ferry_agent::mirror::NbdTarget;
use ferry_agent::nbd::{NbdLimits, NbdListeners, NbdTls, UnixSocket};
use ferry_agent::qmp::Monitor;
use ferry_agent::quiesce::Scripts;
use ferry_agent::run::{Agent, AgentOptions, GroupPort};
use ferry_agent::stream::StreamLimits;
use ferry_runtime::peers::Credentials;
use ferry_runtime::security::ClientTls;

/// How long an attached agent's NBD requests may take: the guest's writes
/// wait on the mirror, so a hung disk under the agent ends the mirror
/// (QEMU fails the write, the guest writes on) instead of stalling them.
const ATTACHED_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Ferry's agent: captures a VM's disk writes and streams them to the cache.
#[derive(Parser)]
#[command(name = "ferry-agent", version)]
struct Args {
    /// URL of registry-svc.
    #[arg(long, env = "FERRY_REGISTRY", value_name = "URL")]
    registry: String,
    /// The VM this agent replicates.
    #[arg(long, env = "FERRY_VM", value_name = "NAME")]
    vm: String,
    /// Where the NBD export of the VM's disks listens over TCP; `off` for
    /// no TCP (then --nbd-socket is needed).
    #[arg(
        long,
        env = "FERRY_NBD_LISTEN",
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:10809"
    )]
    nbd_listen: String,
    /// Require TLS on the TCP NBD export, with this server certificate
    /// (PEM, leaf first; with --nbd-tls-key). Clients must send
    /// NBD_OPT_STARTTLS first, as with `qemu-nbd --tls-creds`.
    #[arg(
        long,
        env = "FERRY_NBD_TLS_CERT",
        value_name = "PEM",
        requires = "nbd_tls_key"
    )]
    nbd_tls_cert: Option<PathBuf>,
    /// The private key of --nbd-tls-cert (PEM).
    #[arg(
        long,
        env = "FERRY_NBD_TLS_KEY",
        value_name = "PEM",
        requires = "nbd_tls_cert"
    )]
    nbd_tls_key: Option<PathBuf>,
    /// Require NBD clients to present a certificate signed by this CA (PEM);
    /// without it any client that speaks TLS is served.
    #[arg(
        long,
        env = "FERRY_NBD_TLS_CA",
        value_name = "PEM",
        requires = "nbd_tls_cert"
    )]
    nbd_tls_ca: Option<PathBuf>,
    /// Serve plaintext NBD on a --nbd-listen address that is not loopback:
    /// anyone who reaches it reads and writes the VM's disks. Without it
    /// such an address needs TLS (--nbd-tls-cert and --nbd-tls-key).
    #[arg(long, env = "FERRY_NBD_INSECURE")]
    nbd_insecure: bool,
    /// Also serve the NBD export on this Unix socket (mode 0600, created
    /// fresh, a stale one replaced, removed at exit); qemu reaches it as
    /// nbd+unix:///DISK?socket=PATH.
    #[arg(long, env = "FERRY_NBD_SOCKET", value_name = "PATH")]
    nbd_socket: Option<PathBuf>,
    /// Serve Prometheus metrics over plain HTTP at http://HOST:PORT/metrics
    /// (writes captured, buffer fill, tracking); off unless set.
    #[arg(long, env = "FERRY_METRICS_LISTEN", value_name = "HOST:PORT")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Where the replication group port (ASR's 20004) listens when the VM is
    /// in a replication group; `off` turns it off.
    #[arg(
        long,
        env = "FERRY_GROUP_LISTEN",
        value_name = "HOST:PORT",
        default_value = "0.0.0.0:20004"
    )]
    group_listen: String,
    /// The group port's address as the group's other agents reach it;
    /// default: the listen address (the host name if it is 0.0.0.0).
    #[arg(long, env = "FERRY_GROUP_ADVERTISE", value_name = "HOST:PORT")]
    group_advertise: Option<String>,
    /// Serve the group port in plaintext on a --group-listen address that is
    /// not loopback: anyone who reaches it can hold the group's writes and
    /// place its points. Without it such a port needs the agent's
    /// certificate (--tls-cert, --tls-key, --tls-ca): TLS, members only.
    #[arg(long, env = "FERRY_GROUP_INSECURE")]
    group_insecure: bool,
    /// A directory under which the VM's source images lie (repeatable; in
    /// FERRY_DISK_ROOT, ':'-separated). The agent opens a disk's image only
    /// if its real path (symlinks and `..` resolved) is inside one; a disk
    /// elsewhere is not exported and the agent reports CRITICAL. Required.
    #[arg(
        long = "disk-root",
        env = "FERRY_DISK_ROOT",
        value_name = "DIR",
        value_delimiter = ':'
    )]
    disk_root: Vec<PathBuf>,
    /// Where the changed-chunk map is kept across restarts (one file per VM).
    #[arg(
        long,
        env = "FERRY_STATE_DIR",
        value_name = "DIR",
        default_value = "/var/lib/ferry-agent"
    )]
    state_dir: PathBuf,
    /// At SIGTERM, how long to wait for the cache to take what is buffered
    /// before saving the rest as changed chunks.
    #[arg(
        long,
        env = "FERRY_DRAIN_SECS",
        value_name = "SECONDS",
        default_value_t = 10
    )]
    drain_secs: u64,
    /// Script that quiesces the VM's applications before an app-consistent
    /// point (fsfreeze, a database flush), run at the policy's
    /// app-consistent frequency with FERRY_VM, FERRY_SEQUENCE, FERRY_PHASE.
    #[arg(long, env = "FERRY_PRE_SCRIPT", value_name = "PATH")]
    pre_script: Option<PathBuf>,
    /// Script that thaws them; runs after every pre script.
    #[arg(
        long,
        env = "FERRY_POST_SCRIPT",
        value_name = "PATH",
        requires = "pre_script"
    )]
    post_script: Option<PathBuf>,
    /// How long each script may run before it is killed (then the point is
    /// crash-consistent only, and the VM's health says why).
    #[arg(
        long,
        env = "FERRY_SCRIPT_TIMEOUT_SECS",
        value_name = "SECONDS",
        default_value_t = 60
    )]
    script_timeout_secs: u64,
    /// How often the agent tells registry how replication is going (its
    /// heartbeat: registry marks the VM CRITICAL when it stops).
    #[arg(
        long,
        env = "FERRY_HEARTBEAT_SECS",
        value_name = "SECONDS",
        default_value_t = 5
    )]
    heartbeat_secs: u64,
    /// NBD clients attached to one disk export at once.
    #[arg(
        long,
        env = "FERRY_NBD_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = 16
    )]
    nbd_max_connections: usize,
    /// Seconds one NBD request may take before its connection is closed
    /// (the client then fails it instead of waiting on a hung disk); 0 for
    /// no limit. Default: 10 with --attach-qmp/--attach-domain (a guest's
    /// writes wait on the mirror), else no limit.
    #[arg(long, env = "FERRY_NBD_REQUEST_TIMEOUT", value_name = "SECONDS")]
    nbd_request_timeout: Option<u64>,
    /// The agent's certificate (PEM), presented to registry and cache:
    /// it names the agent `spiffe://ferry/agent/<VM>` (`ferry certs init
    /// --agent VM` makes it), and the agent may act only for that VM. With
    /// --tls-key and --tls-ca; --registry must then be https://.
    #[arg(
        long,
        env = "FERRY_TLS_CERT",
        value_name = "PEM",
        requires_all = ["tls_key", "tls_ca"]
    )]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "FERRY_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA that registry's and cache's certificates must chain to (PEM).
    /// Turns TLS on: registry and cache URLs must be https://. Alone (no
    /// --tls-cert) the agent proves who it is with --token-file.
    #[arg(long, env = "FERRY_TLS_CA", value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// A file holding the agent's bearer token (`fyagent.<VM>.<MAC>`, minted
    /// from the cluster secret), sent to registry and cache with every
    /// call; surrounding whitespace is ignored. For a deployment without
    /// client certificates.
    #[arg(long, env = "FERRY_AGENT_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// A file holding the one-time enrollment token for the agent's first
    /// registration (`ferry agent enroll VM`, or the one `ferry enable`
    /// printed). Once registered the agent keeps its credential in
    /// --state-dir and restarts without it; a used token left here is
    /// harmless.
    #[arg(long, env = "FERRY_ENROLLMENT_TOKEN_FILE", value_name = "FILE")]
    enrollment_token_file: Option<PathBuf>,
    /// Log filter.
    #[arg(long, env = "FERRY_LOG", default_value = "info")]
    log: String,
    /// Log lines as text (coloured only on a terminal) or one JSON object
    /// per line, for log shippers.
    #[arg(
        long,
        env = "FERRY_LOG_FORMAT",
        value_name = "FORMAT",
        default_value = "text"
    )]
    log_format: ferry_runtime::telemetry::LogFormat,
    /// Export traces over OTLP/gRPC to this collector (e.g.
    /// http://127.0.0.1:4317): then one batch of writes a second is traced
    /// through cache-svc and processor-svc to the point that holds it.
    #[arg(long, env = "FERRY_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Protect a VM that runs already: QEMU's QMP socket. The agent
    /// mirrors each --attach-drive into its NBD export (an active mirror:
    /// every guest write reaches the agent in order); the disk's
    /// registered path is the agent's own copy. See docs/agent.md.
    #[arg(
        long,
        env = "FERRY_ATTACH_QMP",
        value_name = "PATH",
        requires = "attach_drive",
        conflicts_with = "attach_domain"
    )]
    attach_qmp: Option<PathBuf>,
    /// As --attach-qmp, for a libvirt domain (by name): commands go through
    /// `virsh qemu-monitor-command`, and QEMU reaches the export over
    /// --nbd-listen (libvirt's QEMU user cannot open --nbd-socket).
    #[arg(
        long,
        env = "FERRY_ATTACH_DOMAIN",
        value_name = "NAME",
        requires = "attach_drive"
    )]
    attach_domain: Option<String>,
    /// The libvirt connection of --attach-domain.
    #[arg(
        long,
        env = "FERRY_ATTACH_LIBVIRT_URI",
        value_name = "URI",
        default_value = "qemu:///system"
    )]
    attach_libvirt_uri: String,
    /// NODE=DISK: QEMU's block node (or drive id, or device alias such as
    /// libvirt's virtio-disk0) of a protected drive and its disk id;
    /// repeatable.
    #[arg(long = "attach-drive", value_name = "NODE=DISK")]
    attach_drive: Vec<ferry_agent::mirror::Drive>,
}

/// `ferry-agent detach`: ends the agent's active mirrors of a running VM;
/// the VM runs on, on its own disks.
#[derive(Parser)]
#[command(name = "ferry-agent detach")]
struct DetachArgs {
    /// QEMU's QMP socket.
    #[arg(long, value_name = "PATH", required_unless_present = "domain")]
    qmp: Option<PathBuf>,
    /// Or a libvirt domain, by name.
    #[arg(long, value_name = "NAME", conflicts_with = "qmp")]
    domain: Option<String>,
    /// The libvirt connection of --domain.
    #[arg(long, value_name = "URI", default_value = "qemu:///system")]
    libvirt_uri: String,
    /// A disk id whose mirror ends; repeatable.
    #[arg(long = "disk", value_name = "DISK", required = true)]
    disks: Vec<String>,
}

/// The secret in `path` (surrounding whitespace ignored), for `flag`.
fn read_secret(flag: &str, path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{flag} {}: cannot read it: {e}", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("{flag} {}: the file is empty", path.display()));
    }
    Ok(secret.to_string())
}

/// What the agent presents to registry and cache, from its flags.
fn credentials(args: &Args) -> Result<Credentials, ferry_runtime::binary::BinaryError> {
    let tls = match &args.tls_ca {
        Some(ca) => Some(
            ClientTls::load(ca, args.tls_cert.as_deref(), args.tls_key.as_deref())
                .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let bearer = args
        .token_file
        .as_deref()
        .map(|path| read_secret("--token-file", path))
        .transpose()?;
    Ok(Credentials { tls, bearer })
}

/// Refuses a plaintext NBD listen address that is not loopback (any of
/// the addresses it resolves to).
async fn refuse_plaintext_beyond_loopback(
    address: &str,
) -> Result<(), ferry_runtime::binary::BinaryError> {
    let resolved: Vec<std::net::SocketAddr> = tokio::net::lookup_host(address)
        .await
        .map_err(|e| format!("--nbd-listen {address}: {e}"))?
        .collect();
    if resolved.is_empty() || resolved.iter().any(|a| !a.ip().is_loopback()) {
        return Err(format!(
            "--nbd-listen {address} is not a loopback address: plaintext NBD there lets anyone \
             who reaches it read and write the VM's disks. Give --nbd-tls-cert and \
             --nbd-tls-key (and --nbd-tls-ca to require client certificates) for TLS, or \
             --nbd-insecure to serve plaintext anyway (or --nbd-socket PATH for local clients)"
        )
        .into());
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    ferry_runtime::memory::limit_malloc_arenas();
    // A refusal is printed as the sentence it is, not as a debug dump.
    ferry_runtime::binary::exit(
        ferry_runtime::memory::runtime()
            .map_err(Into::into)
            .and_then(|runtime| runtime.block_on(agent_main())),
    )
}

async fn agent_main() -> Result<(), ferry_runtime::binary::BinaryError> {
    if std::env::args().nth(1).as_deref() == Some("detach") {
        let args = DetachArgs::parse_from(std::env::args().skip(1));
        let monitor = match (&args.qmp, &args.domain) {
            (Some(path), _) => Monitor::Socket(path.clone()),
            (None, Some(domain)) => Monitor::Libvirt {
                uri: args.libvirt_uri.clone(),
                domain: domain.clone(),
            },
            (None, None) => return Err("give --qmp PATH or --domain NAME".into()),
        };
        let ended = ferry_agent::mirror::detach(&monitor, &args.disks)
            .await
            .map_err(|e| e.to_string())?;
        println!("detached: {}", ended.join(", "));
        return Ok(());
    }
    let args = Args::parse();
    let _telemetry = ferry_runtime::telemetry::init_with(
        "ferry-agent",
        &args.log,
        args.otlp_endpoint.as_deref(),
        args.log_format,
    )?;
    let shutdown = ferry_runtime::shutdown_token();
    let disk_roots: Vec<PathBuf> = args
        .disk_root
        .iter()
        .filter(|p| !p.as_os_str().is_empty())
        .cloned()
        .collect();
    // Checked before anything listens: a mistyped root is an error now.
    ferry_agent::roots::DiskRoots::new(&disk_roots).map_err(|e| e.to_string())?;
    let credentials = credentials(&args)?;
    // An attached VM: its monitor, and where its QEMU reaches the export
    // (the Unix socket for a QMP socket of QEMU's own, else TCP).
    let monitor = match (&args.attach_qmp, &args.attach_domain) {
        (Some(path), _) => Some(Monitor::Socket(path.clone())),
        (None, Some(domain)) => Some(Monitor::Libvirt {
            uri: args.attach_libvirt_uri.clone(),
            domain: domain.clone(),
        }),
        (None, None) => None,
    };
    let nbd_target = match (&monitor, &args.nbd_socket, args.nbd_listen.as_str()) {
        (None, _, _) => None,
        (Some(Monitor::Socket(_)), Some(socket), _) => Some(NbdTarget::Unix(socket.clone())),
        (Some(_), _, "off") => {
            return Err(
                "--attach-domain needs --nbd-listen (QEMU reaches the export over \
                 TCP); --attach-qmp needs --nbd-socket or --nbd-listen"
                    .into(),
            )
        }
        (Some(_), _, address) => Some(NbdTarget::Tcp(address.parse().map_err(|e| {
            format!("--nbd-listen {address}: an attached VM's QEMU needs an IP:PORT here: {e}")
        })?)),
    };
    if monitor.is_some() && args.attach_drive.is_empty() {
        return Err("--attach-qmp and --attach-domain need at least one --attach-drive".into());
    }
    // A registry URL that does not fit the credentials (http:// with TLS,
    // https:// without) is an error now, not a retry later.
    ferry_runtime::connect(&args.registry, &credentials).map_err(|e| format!("--registry: {e}"))?;
    if credentials.tls.is_none() && credentials.bearer.is_none() {
        tracing::warn!(
            "no --tls-ca, --tls-cert or --token-file: the agent presents no credentials, and \
             registry and cache refuse it (UNAUTHENTICATED); see docs/agent.md"
        );
    }
    let tls = match (&args.nbd_tls_cert, &args.nbd_tls_key) {
        (Some(cert), Some(key)) => Some(
            NbdTls::from_pem_files(cert, key, args.nbd_tls_ca.as_deref())
                .map_err(|e| e.to_string())?,
        ),
        _ => None,
    };
    let tcp = match args.nbd_listen.as_str() {
        "off" if args.nbd_socket.is_none() => {
            return Err("--nbd-listen off leaves no NBD export: give --nbd-socket PATH".into())
        }
        "off" => {
            if tls.is_some() {
                tracing::warn!("--nbd-tls-cert applies to the TCP export, and --nbd-listen is off: TLS is unused");
            }
            None
        }
        address => {
            if !args.nbd_insecure && tls.is_none() {
                refuse_plaintext_beyond_loopback(address).await?;
            }
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|e| format!("cannot listen for NBD on {address}: {e}"))?;
            tracing::info!(
                nbd = %address,
                tls = tls.is_some(),
                client_certificates = tls.as_ref().is_some_and(|t| t.client_certificates),
                "NBD export listening"
            );
            Some(listener)
        }
    };
    let unix = match &args.nbd_socket {
        Some(path) => {
            let socket = UnixSocket::bind(path).map_err(|e| e.to_string())?;
            tracing::info!(socket = %path.display(), "NBD export listening on a Unix socket");
            Some(socket)
        }
        None => None,
    };
    // The agent's certificate also serves its group port.
    let group_tls = match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(
            ferry_runtime::security::Tls::load(ferry_runtime::security::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            })
            .map_err(|e| e.to_string())?,
        ),
        _ => None,
    };
    let group = match args.group_listen.as_str() {
        "off" => GroupPort::Off,
        address => GroupPort::Listen(address.to_string()),
    };
    // Bound before the agent starts: an unusable address stops start-up.
    if let Some(addr) = args.metrics_listen {
        ferry_runtime::metrics::serve(addr, shutdown.clone()).await?;
    }
    let agent = Agent::start(AgentOptions {
        registry: args.registry.clone(),
        vm: args.vm.clone(),
        nbd: NbdListeners { tcp, tls, unix },
        group,
        group_address: args.group_advertise.clone().unwrap_or_default(),
        group_tls,
        group_insecure: args.group_insecure,
        enrollment_token: args
            .enrollment_token_file
            .as_deref()
            .map(|path| read_secret("--enrollment-token-file", path))
            .transpose()?,
        state_dir: args.state_dir.clone(),
        disk_roots,
        limits: StreamLimits::default(),
        attached: monitor.is_some(),
        nbd_limits: NbdLimits {
            connections_per_export: args.nbd_max_connections.max(1),
            request_timeout: match args.nbd_request_timeout {
                Some(0) => None,
                Some(secs) => Some(Duration::from_secs(secs)),
                None if monitor.is_some() => Some(ATTACHED_REQUEST_TIMEOUT),
                None => None,
            },
            ..NbdLimits::default()
        },
        heartbeat: Duration::from_secs(args.heartbeat_secs.max(1)),
        scripts: args.pre_script.clone().map(|pre| Scripts {
            pre,
            post: args.post_script.clone(),
            timeout: Duration::from_secs(args.script_timeout_secs.max(1)),
        }),
        credentials,
    })
    .await
    .map_err(|e| e.to_string())?;
    if args.metrics_listen.is_some() {
        ferry_runtime::metrics::register_collector(Box::new(
            ferry_agent::metrics::AgentMetrics::start(
                &agent.vm,
                &agent.capture,
                agent.stream.clone(),
                shutdown.clone(),
            ),
        ));
    }
    if let (Some(monitor), Some(target)) = (&monitor, &nbd_target) {
        tokio::spawn(ferry_agent::mirror::supervise(
            agent.capture.clone(),
            agent.vm.clone(),
            monitor.clone(),
            args.attach_drive.clone(),
            target.clone(),
            shutdown.clone(),
        ));
    }
    // The agent runs until it is told to stop: whatever happens to
    // replication, the VM's disks stay exported.
    shutdown.cancelled().await;
    // An attached VM's mirrors end before the export does, cleanly: the
    // guest goes on on its own disks.
    if let Some(monitor) = &monitor {
        let disks: Vec<String> = args.attach_drive.iter().map(|d| d.disk.clone()).collect();
        match ferry_agent::mirror::detach(monitor, &disks).await {
            Ok(ended) => tracing::info!(jobs = ?ended, "detached from the running VM"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot detach from the running VM; its mirror ends when QEMU next writes to the stopped agent")
            }
        }
    }
    agent
        .stop(Duration::from_secs(args.drain_secs))
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
