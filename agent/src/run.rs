//! A whole agent for one VM: registration, its disks, the stream with the
//! changed-chunk map carried over from the last run, the NBD export,
//! initial replication or resync, and a clean stop. The binary is this plus
//! flags; tests and `ferry demo` run it in-process.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::ids::Epoch;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_proto::registry::v1::ReplicationState;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::capture::{Capture, CaptureError, SourceDisk};
use crate::state::{Saved, StateError, StateFile};
use crate::stream::{Dirty, ResyncSet, Stream, StreamLimits};
use crate::AgentError;

/// How to run an agent.
pub struct AgentOptions {
    /// registry-svc's URL.
    pub registry: String,
    /// The VM.
    pub vm: String,
    /// Where the NBD export listens (bound by the caller): TCP, a Unix
    /// socket, or both (a `TcpListener` converts with `.into()`).
    pub nbd: crate::nbd::NbdListeners,
    /// The replication group port (`ferry.agent.v1.AgentGroup`), used only
    /// when the VM is in a group.
    pub group: GroupPort,
    /// The group port's address as the other members reach it; empty for
    /// the listener's address (with the host name if it listens on all
    /// interfaces).
    pub group_address: String,
    /// Where the changed-chunk map is kept.
    pub state_dir: PathBuf,
    /// The directories under which the agent opens its disks' source images
    /// (at least one). A disk whose image lies elsewhere is not opened nor
    /// exported, and the agent's health is CRITICAL saying so.
    pub disk_roots: Vec<PathBuf>,
    /// The stream's buffer limits.
    pub limits: StreamLimits,
    /// What one NBD client may hold of the agent.
    pub nbd_limits: crate::nbd::NbdLimits,
    /// The VM runs already and its drives reach the agent by an active
    /// mirror (`crate::mirror`): no sync round completes until the mirror
    /// is ready, and writes that change nothing in the agent's copy are
    /// dropped.
    pub attached: bool,
    /// How often the agent's health goes to registry (its heartbeat).
    pub heartbeat: Duration,
    /// Pre and post scripts for app-consistent points; None for none.
    pub scripts: Option<crate::quiesce::Scripts>,
    /// What the agent presents to registry and cache (its certificate
    /// `spiffe://ferry/agent/<vm>`, or an agent token), and the CA it
    /// trusts; [`Credentials::none`](ferry_runtime::peers::Credentials::none)
    /// for a deployment that checks nothing (http:// URLs).
    pub credentials: ferry_runtime::peers::Credentials,
    /// The group port's TLS (the agent's certificate, key and CA): with it
    /// the port speaks only TLS, admits only the agents of the group's
    /// members, and its address is advertised as https://. None: plaintext,
    /// admitting only rounds signed with the group's secret — refused on a
    /// non-loopback address unless `group_insecure`.
    pub group_tls: Option<ferry_runtime::security::Tls>,
    /// Serve a plaintext group port beyond loopback anyway.
    pub group_insecure: bool,
    /// A one-time enrollment token (`ferry agent enroll VM`) for the first
    /// registration; later starts register with the credential kept in
    /// `state_dir`.
    pub enrollment_token: Option<String>,
}

/// Where the replication group port listens.
pub enum GroupPort {
    /// Off: a VM in a group then gets no multi-VM points.
    Off,
    /// A listener bound by the caller.
    Bound(TcpListener),
    /// An address bound at start, only if the VM is in a group.
    Listen(String),
}

impl AgentOptions {
    /// An agent of `vm` exporting on `nbd`, its disks under `disk_roots`,
    /// with every other setting at the binary's default: no group port,
    /// no scripts, not attached, default limits and heartbeat, no
    /// credentials.
    pub fn new(
        registry: impl Into<String>,
        vm: impl Into<String>,
        nbd: crate::nbd::NbdListeners,
        state_dir: PathBuf,
        disk_roots: Vec<PathBuf>,
    ) -> AgentOptions {
        AgentOptions {
            registry: registry.into(),
            vm: vm.into(),
            nbd,
            group: GroupPort::Off,
            group_tls: None,
            group_insecure: false,
            enrollment_token: None,
            group_address: String::new(),
            state_dir,
            disk_roots,
            limits: StreamLimits::default(),
            nbd_limits: Default::default(),
            attached: false,
            heartbeat: crate::health::HEARTBEAT,
            scripts: None,
            credentials: Default::default(),
        }
    }
}

/// Why the agent could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    DiskRoots(#[from] crate::roots::RootsError),
    #[error(transparent)]
    CredentialFile(#[from] crate::enrollment::CredentialFileError),
    #[error("cache-svc ended the stream: {:?}: {}", .0.code(), .0.message())]
    Cache(tonic::Status),
    #[error("cannot listen for the replication group on {address}: {source} (--group-listen HOST:PORT, or off)")]
    GroupPort {
        address: String,
        source: std::io::Error,
    },
    #[error(
        "the replication group port {address} is not on a loopback address: plaintext there \
         lets anyone who reaches it hold the group's writes and place its points. Give the \
         agent its certificate (--tls-cert, --tls-key and --tls-ca) for TLS, or \
         --group-insecure to serve plaintext anyway (or --group-listen off)"
    )]
    GroupPlaintext { address: String },
    #[error("the stream task failed: {0}")]
    Task(String),
}

/// A running agent.
pub struct Agent {
    pub vm: String,
    /// Its side of the replication group protocol, if the VM is in a group
    /// and the group port is on.
    pub member: Option<Arc<crate::group::Member>>,
    /// Its group port's address as other members reach it (empty if off).
    pub group_address: String,
    pub capture: Arc<Capture>,
    pub stream: Arc<Stream>,
    /// The fencing epoch registry gave this agent.
    pub epoch: Epoch,
    streaming: JoinHandle<Result<(), tonic::Status>>,
    /// Stops the stream (after the drain).
    stream_stop: CancellationToken,
    /// Stops NBD, initial replication and resync.
    stop: CancellationToken,
    state: StateFile,
    /// The NBD Unix socket's file, removed at the stop.
    socket_file: Option<crate::nbd::SocketFile>,
}

impl Agent {
    /// Registers for the VM and starts replicating it.
    pub async fn start(mut opts: AgentOptions) -> Result<Agent, RunError> {
        let roots = crate::roots::DiskRoots::new(&opts.disk_roots)?;
        let hostname = std::env::var("HOSTNAME").unwrap_or_default();
        let scheme = if opts.group_tls.is_some() {
            "https://"
        } else {
            ""
        };
        let mut group_address = match (&opts.group, opts.group_address.is_empty()) {
            (GroupPort::Bound(listener), true) => {
                with_scheme(scheme, &advertised(listener, &hostname))
            }
            (GroupPort::Listen(address), true) => with_scheme(scheme, address),
            _ => with_scheme(scheme, &opts.group_address),
        };
        let kept = crate::enrollment::CredentialFile::open(&opts.state_dir, &opts.vm)?;
        let previous = kept.load()?;
        let assignment = crate::register(
            &opts.registry,
            &opts.credentials,
            &opts.vm,
            &hostname,
            &group_address,
            crate::Admission {
                credential: previous.as_deref(),
                enrollment_token: opts.enrollment_token.as_deref(),
            },
        )
        .await?;
        if previous.as_deref() != Some(assignment.credential()) {
            // Before anything streams: a restart must find the credential
            // the cache now knows.
            kept.save(assignment.credential())?;
        }
        let (disks, refused) = open_disks(&roots, &assignment.disks)?;
        // Before anything serves: a refused group port stops the start here.
        let port = match (
            &assignment.group,
            std::mem::replace(&mut opts.group, GroupPort::Off),
        ) {
            (g, _) if g.is_empty() => None,
            (_, GroupPort::Off) => None,
            (_, GroupPort::Bound(listener)) => {
                if opts.group_tls.is_none() && !opts.group_insecure {
                    refuse_plaintext_beyond_loopback(&listener)?;
                }
                Some(listener)
            }
            (_, GroupPort::Listen(address)) => {
                let listener =
                    TcpListener::bind(&address)
                        .await
                        .map_err(|source| RunError::GroupPort {
                            address: address.clone(),
                            source,
                        })?;
                if opts.group_tls.is_none() && !opts.group_insecure {
                    refuse_plaintext_beyond_loopback(&listener)?;
                }
                if opts.group_address.is_empty() {
                    group_address = with_scheme(scheme, &advertised(&listener, &hostname));
                }
                Some(listener)
            }
        };
        let conditions = crate::health::Conditions::new();
        if !refused.is_empty() {
            conditions.set(
                "disk-roots",
                Some((
                    ferry_proto::registry::v1::ReplicationHealth::Critical,
                    refused.join("; "),
                )),
            );
        }
        let stop = CancellationToken::new();
        // Sequences continue after what the cache holds. Writes a previous
        // agent had not streamed are covered by the resync below.
        let next = crate::stream::resume_point(
            &assignment.cache_endpoint,
            &opts.credentials,
            &opts.vm,
            assignment.epoch,
            assignment.credential(),
            &stop,
        )
        .await
        .map_err(RunError::Cache)?;
        let state = StateFile::open(&opts.state_dir, &opts.vm)?;
        let fresh = matches!(
            assignment.state,
            ReplicationState::Enabling | ReplicationState::InitialReplication
        );
        let sizes: Vec<(String, u64)> = disks.iter().map(|d| (d.id.clone(), d.size)).collect();
        let stream = initial_stream(&opts, &state, fresh, next, &sizes);
        state.mark_running()?;
        let capture = Arc::new(Capture::new(disks, stream.clone()));
        if opts.attached {
            capture.set_sync_gate(false);
            capture.skip_unchanged(true);
        }
        tracing::info!(
            vm = %opts.vm,
            cache = %assignment.cache_endpoint,
            epoch = assignment.epoch.get(),
            disks = assignment.disks.len(),
            "replicating; NBD exports are the disk ids"
        );
        let mut listeners = Vec::new();
        if let Some(tcp) = opts.nbd.tcp {
            listeners.push((crate::nbd::NbdListener::Tcp(tcp), opts.nbd.tls.clone()));
        }
        let socket_file = match opts.nbd.unix {
            Some(unix) => {
                listeners.push((crate::nbd::NbdListener::Unix(unix.listener), None));
                Some(unix.file)
            }
            None => None,
        };
        tokio::spawn(crate::nbd::serve_all(
            listeners,
            capture.clone(),
            opts.nbd_limits,
            stop.clone(),
        ));
        tokio::spawn(crate::health::run(
            stream.clone(),
            conditions.clone(),
            RegistryClient::new(
                ferry_runtime::connect(&opts.registry, &opts.credentials)
                    .map_err(AgentError::from)?,
            ),
            opts.vm.clone(),
            assignment.epoch,
            opts.heartbeat,
            stop.clone(),
        ));
        if let Some(scripts) = opts.scripts.clone() {
            let capture = capture.clone();
            let mut registry = RegistryClient::new(
                ferry_runtime::connect(&opts.registry, &opts.credentials)
                    .map_err(AgentError::from)?,
            );
            let (vm, stop, conditions) = (opts.vm.clone(), stop.clone(), conditions.clone());
            tokio::spawn(async move {
                match app_consistent_frequency(&mut registry, &vm).await {
                    Ok(Some(frequency)) => {
                        crate::quiesce::run(&capture, &conditions, &vm, &scripts, frequency, &stop)
                            .await
                    }
                    Ok(None) => tracing::warn!(
                        vm,
                        "the VM's policy has app-consistent points off: the scripts are not run"
                    ),
                    Err(status) => {
                        tracing::error!(vm, %status, "cannot read the VM's policy: no app-consistent points")
                    }
                }
            });
        }
        let member = match (&assignment.group, port) {
            (g, _) if g.is_empty() => None,
            (g, None) => {
                tracing::warn!(vm = %opts.vm, group = %g, "the VM is in a replication group but the group port is off: it gets no multi-VM points");
                None
            }
            (g, Some(listener)) => {
                let member = crate::group::Member::new(&opts.vm, g, capture.clone());
                crate::group::serve(
                    member.clone(),
                    listener,
                    opts.group_tls.clone(),
                    stop.clone(),
                )
                .await
                .map_err(AgentError::from)?;
                tokio::spawn(crate::group::run(
                    crate::group::GroupOptions {
                        registry: opts.registry.clone(),
                        credentials: opts.credentials.clone(),
                        vm: opts.vm.clone(),
                        epoch: assignment.epoch,
                        credential: assignment.credential().to_string(),
                        address: group_address.clone(),
                        member: member.clone(),
                    },
                    stop.clone(),
                ));
                tracing::info!(vm = %opts.vm, group = %g, address = %group_address, "replication group port serving");
                Some(member)
            }
        };
        {
            let capture = capture.clone();
            let mut registry = RegistryClient::new(
                ferry_runtime::connect(&opts.registry, &opts.credentials)
                    .map_err(AgentError::from)?,
            );
            let (vm, stop) = (opts.vm.clone(), stop.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::resync::run(&capture, &mut registry, &vm, &stop).await {
                    tracing::error!(vm, error = %e, "resync stopped");
                }
            });
        }
        if fresh && !refused.is_empty() {
            tracing::error!(vm = %opts.vm, "initial replication waits: not every disk is open (see the agent's health)");
        } else if fresh {
            let capture = capture.clone();
            let mut registry = RegistryClient::new(
                ferry_runtime::connect(&opts.registry, &opts.credentials)
                    .map_err(AgentError::from)?,
            );
            let (vm, stop) = (opts.vm.clone(), stop.clone());
            let reprotected = assignment.reprotected;
            tokio::spawn(async move {
                let work = async {
                    if reprotected {
                        crate::initial::replicate_by_checksum(&capture, &mut registry, &vm).await
                    } else {
                        crate::initial::replicate(&capture, &mut registry, &vm).await
                    }
                };
                let done = tokio::select! {
                    _ = stop.cancelled() => Ok(0),
                    done = work => done,
                };
                if let Err(e) = done {
                    tracing::error!(vm, error = %e, "initial replication failed");
                }
            });
        }
        let stream_stop = CancellationToken::new();
        tokio::spawn(tick_while_idle(stream.clone(), stop.clone()));
        tokio::spawn(drain_on_request(
            capture.clone(),
            stream.clone(),
            opts.vm.clone(),
            stop.clone(),
        ));
        let streaming = tokio::spawn(supervise(
            stream.clone(),
            Session {
                cache: assignment.cache_endpoint.clone(),
                registry: opts.registry.clone(),
                credentials: opts.credentials.clone(),
                vm: opts.vm.clone(),
                epoch: assignment.epoch,
                credential: assignment.credential().to_string(),
            },
            stream_stop.clone(),
        ));
        Ok(Agent {
            group_address: if member.is_some() {
                group_address
            } else {
                String::new()
            },
            member,
            vm: opts.vm,
            capture,
            stream,
            epoch: assignment.epoch,
            streaming,
            stream_stop,
            stop,
            state,
            socket_file,
        })
    }

    /// Bytes of the records this agent put into the replication stream.
    pub fn streamed_bytes(&self) -> u64 {
        self.stream.streamed_bytes()
    }

    /// Waits until replication has stopped for good (the cache stopped or
    /// fenced this agent, or a planned failover drained it); why. The
    /// agent runs on: its exports serve and its writes are tracked.
    pub async fn replication_stopped(&self) -> String {
        loop {
            let changed = self.stream.notify().notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(why) = self.stream.detached().await {
                return why;
            }
            changed.await;
        }
    }

    /// Stops cleanly: refuses writes, gives the cache `drain` to take what is
    /// buffered, saves the rest as changed chunks for the next start.
    pub async fn stop(mut self, drain: Duration) -> Result<(), RunError> {
        self.stop.cancel();
        // No new NBD client finds the socket.
        drop(self.socket_file.take());
        // No write reaches a disk from here on; what the stream holds is all.
        self.capture.close().await;
        if self.stream.detached().await.is_none()
            && tokio::time::timeout(drain, self.stream.flushed())
                .await
                .is_err()
        {
            tracing::warn!(vm = %self.vm, "the cache did not take everything in time");
        }
        self.stream_stop.cancel();
        let ended = self.streaming.await;
        let unsent = self.stream.unsent().await;
        self.state.save_clean(&unsent)?;
        tracing::info!(vm = %self.vm, unsent_chunks = unsent.count(), "stopped; changed-chunk map saved");
        match ended {
            Ok(Ok(())) => Ok(()),
            Ok(Err(status)) => Err(RunError::Cache(status)),
            Err(e) => Err(RunError::Task(e.to_string())),
        }
    }
}

/// How long the stream may stay silent before an idle tick goes in.
pub const IDLE_TICK: Duration = Duration::from_secs(1);

/// While the VM writes nothing, a TICK marker each [`IDLE_TICK`] (see
/// [`Stream::tick_if_idle`]): the processor's points then hold the source up
/// to a second ago, and the RPO of an idle VM stays that small instead of
/// growing with the age of its last write.
async fn tick_while_idle(stream: Arc<Stream>, stop: CancellationToken) {
    let mut every = tokio::time::interval(IDLE_TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {
                stream.tick_if_idle(IDLE_TICK).await;
            }
        }
    }
}

/// How long a planned failover's drain may refuse the VM's writes: past it
/// the writes complete again (tracked), and the failover fails at its drain.
pub const DRAIN_BOUND: Duration = Duration::from_secs(120);

/// A planned failover: once the cache asks for the FINAL marker, writes are
/// refused, everything is sent, the marker goes in, and the stream ends.
/// Then (or after [`DRAIN_BOUND`]) writes complete again, tracked for
/// failback: the VM is never left without its disks.
async fn drain_on_request(
    capture: Arc<Capture>,
    stream: Arc<Stream>,
    vm: String,
    stop: CancellationToken,
) {
    let id = tokio::select! {
        _ = stop.cancelled() => return,
        id = stream.final_requested() => id,
    };
    capture.begin_drain().await;
    let marker = ferry_proto::cache::v1::record::Op::Marker(ferry_proto::cache::v1::Marker {
        kind: ferry_proto::cache::v1::MarkerKind::Final as i32,
        id: id.clone(),
        time_unix_nanos: 0,
    });
    let reason = if stream.push("", marker).await == 0 {
        tracing::error!(
            vm,
            "cannot end with a FINAL marker while tracking changed chunks"
        );
        "a planned failover asked for a FINAL marker while tracking changed chunks".to_string()
    } else {
        tokio::select! {
            _ = stop.cancelled() => return,
            done = tokio::time::timeout(DRAIN_BOUND, stream.flushed()) => match done {
                Ok(last) => {
                    tracing::warn!(vm, id, last, "planned failover: everything sent; replication ends here");
                    format!("planned failover {id}: the stream ended at its FINAL marker")
                }
                Err(_) => {
                    tracing::error!(vm, id, "planned failover: the cache did not take everything in time; writes resume");
                    format!("planned failover {id}: the drain did not finish within {DRAIN_BOUND:?}")
                }
            },
        }
    };
    stream.detach(&reason).await;
    capture.end_drain().await;
}

/// What a stream session needs.
struct Session {
    cache: String,
    registry: String,
    /// What the agent presents to both.
    credentials: ferry_runtime::peers::Credentials,
    vm: String,
    epoch: Epoch,
    credential: String,
}

/// Streams until `stop`. When the cache refuses this agent for good, the
/// stream is detached (writes go on, tracked) and the agent waits until
/// registry says it may replicate again (its epoch still the item's, the
/// item replicating), then streams and resyncs what was tracked. A fenced
/// agent (failover, a newer agent) waits for the operator: restart it.
async fn supervise(
    stream: Arc<Stream>,
    s: Session,
    stop: CancellationToken,
) -> Result<(), tonic::Status> {
    loop {
        let ended = crate::stream::run(
            stream.clone(),
            s.cache.clone(),
            s.credentials.clone(),
            s.vm.clone(),
            s.epoch,
            s.credential.clone(),
            stop.clone(),
        )
        .await;
        let status = match ended {
            Ok(()) => return Ok(()),
            Err(status) => status,
        };
        tracing::warn!(
            vm = %s.vm,
            code = ?status.code(),
            reason = status.message(),
            "replication stopped (fenced by a failover or a newer agent, stopped by the cache, or \
             disabled); the VM's disks stay online and its writes are tracked until replication \
             may resume"
        );
        let mut told = false;
        let mut reported = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
            match may_stream(&s).await {
                Ok(()) => break,
                Err(Stopped { why, fenced }) => {
                    if !told {
                        tracing::warn!(vm = %s.vm, why, "replication stays stopped");
                        told = true;
                    }
                    if fenced {
                        report_fenced_writes(&s, &stream, &mut reported).await;
                    }
                }
            }
        }
        tracing::info!(vm = %s.vm, "registry lets this agent replicate again: resuming");
    }
}

/// Why registry does not let this agent replicate; `fenced`: by a
/// failover (its writes since are reported for re-protect).
struct Stopped {
    why: String,
    fenced: bool,
}

impl From<String> for Stopped {
    fn from(why: String) -> Stopped {
        Stopped { why, fenced: false }
    }
}

/// Whether registry still lets this agent replicate its VM; why not.
async fn may_stream(s: &Session) -> Result<(), Stopped> {
    use ferry_proto::registry::v1 as reg;
    let channel = ferry_runtime::connect(&s.registry, &s.credentials).map_err(|e| e.to_string())?;
    let item = RegistryClient::new(channel)
        .get_protected_item(reg::GetProtectedItemRequest {
            vm_name: s.vm.clone(),
        })
        .await
        .map_err(|status| format!("registry: {}", status.message()))?
        .into_inner();
    if !crate::health::source_active(item.state()) {
        return Err(Stopped {
            why: format!(
                "the VM is {:?}: its source is fenced; its writes are tracked for failback",
                item.state()
            ),
            fenced: true,
        });
    }
    if item.epoch != s.epoch.get() {
        return Err(format!(
            "a newer agent holds the VM (epoch {} > this agent's {}); restart this agent to take it back",
            item.epoch, s.epoch
        )
        .into());
    }
    Ok(())
}

/// The most ranges a fenced-writes report holds (registry's bound).
const FENCED_RANGES: usize = 4096;

/// Tells registry every range the VM wrote since the fence (what the
/// stream holds unsent), when it changed since `reported`: re-protect
/// sends those again whatever their digests say.
async fn report_fenced_writes(
    s: &Session,
    stream: &Stream,
    reported: &mut Option<Vec<(String, u64, u64)>>,
) {
    use ferry_proto::registry::v1 as reg;
    let runs = stream.unsent().await.data.runs(FENCED_RANGES);
    if reported.as_ref() == Some(&runs) {
        return;
    }
    let Ok(channel) = ferry_runtime::connect(&s.registry, &s.credentials) else {
        return;
    };
    let request = reg::ReportFencedWritesRequest {
        vm_name: s.vm.clone(),
        epoch: s.epoch.get(),
        ranges: runs
            .iter()
            .map(|(disk, offset, length)| reg::ChangedRange {
                disk_id: disk.clone(),
                offset: *offset,
                length: *length,
            })
            .collect(),
    };
    match RegistryClient::new(channel)
        .report_fenced_writes(request)
        .await
    {
        Ok(_) => {
            tracing::info!(vm = %s.vm, ranges = runs.len(), "reported the writes made since the fence");
            *reported = Some(runs);
        }
        Err(status) => tracing::debug!(vm = %s.vm, %status, "fenced writes not reported"),
    }
}

/// Opens the disks whose images lie inside the roots; the others are
/// refused (why, one line each) and neither opened nor exported.
fn open_disks(
    roots: &crate::roots::DiskRoots,
    disks: &[ferry_proto::registry::v1::Disk],
) -> Result<(Vec<SourceDisk>, Vec<String>), RunError> {
    use crate::roots::Refused;
    let mut opened = Vec::new();
    let mut refused = Vec::new();
    for d in disks {
        match roots.open(&d.id, Path::new(&d.source_path), d.size_bytes) {
            Ok(disk) => opened.push(disk),
            Err(Refused::Open { source, .. }) => return Err(RunError::Capture(source)),
            Err(why) => {
                tracing::error!(disk = %d.id, "{why}; the disk is not exported");
                refused.push(why.to_string());
            }
        }
    }
    Ok((opened, refused))
}

/// Initial replication copies everything anyway; otherwise a clean map is
/// resynced as it is, and a lost one means every chunk.
fn initial_stream(
    opts: &AgentOptions,
    state: &StateFile,
    fresh: bool,
    next: u64,
    sizes: &[(String, u64)],
) -> Arc<Stream> {
    let limits = opts.limits;
    match (fresh, state.load()) {
        (true, _) => Stream::new(next, limits),
        (false, Ok(Some(Saved::Clean(dirty)))) if dirty.is_empty() => Stream::new(next, limits),
        (false, Ok(Some(Saved::Clean(mut dirty)))) => {
            tracing::info!(vm = %opts.vm, chunks = dirty.count(), "resyncing the chunks the last run left");
            // Past initial replication every disk's copy is complete: the
            // round closes any sync the processor may still hold open.
            dirty.close = sizes.iter().map(|(id, _)| id.clone()).collect();
            Stream::with_tracking(
                next,
                limits,
                dirty,
                "the agent restarted with unsent writes",
            )
        }
        (false, loaded) => {
            let why = match loaded {
                Ok(Some(_)) => "the agent did not stop cleanly".to_string(),
                Ok(None) => format!("no changed-chunk map in {}", opts.state_dir.display()),
                Err(e) => e.to_string(),
            };
            tracing::warn!(vm = %opts.vm, why, "changed-chunk map lost: checksum resync of every chunk");
            let set = ResyncSet {
                data: Dirty::default(),
                verify: Dirty::full(sizes),
                close: sizes.iter().map(|(id, _)| id.clone()).collect(),
            };
            Stream::with_tracking(next, limits, set, &format!("full resync: {why}"))
        }
    }
}

/// The group port's address as other members reach it.
fn advertised(listener: &TcpListener, hostname: &str) -> String {
    match listener.local_addr() {
        Ok(a) if a.ip().is_unspecified() => {
            let host = if hostname.is_empty() {
                "localhost"
            } else {
                hostname
            };
            format!("{host}:{}", a.port())
        }
        Ok(a) => a.to_string(),
        Err(_) => String::new(),
    }
}

/// `address` with `scheme` in front, unless empty or it has one.
fn with_scheme(scheme: &str, address: &str) -> String {
    if address.is_empty() || address.contains("://") {
        address.to_string()
    } else {
        format!("{scheme}{address}")
    }
}

/// Refuses a plaintext group port whose listener is not on loopback.
fn refuse_plaintext_beyond_loopback(listener: &TcpListener) -> Result<(), RunError> {
    match listener.local_addr() {
        Ok(a) if a.ip().is_loopback() => Ok(()),
        Ok(a) => Err(RunError::GroupPlaintext {
            address: a.to_string(),
        }),
        Err(e) => Err(RunError::GroupPort {
            address: "?".into(),
            source: e,
        }),
    }
}

/// The app-consistent frequency of the VM's policy; None when it is off.
async fn app_consistent_frequency(
    registry: &mut RegistryClient<ferry_runtime::PeerChannel>,
    vm: &str,
) -> Result<Option<Duration>, tonic::Status> {
    use ferry_proto::registry::v1 as reg;
    let item = registry
        .get_protected_item(reg::GetProtectedItemRequest {
            vm_name: vm.to_string(),
        })
        .await?
        .into_inner();
    let policy = registry
        .get_policy(reg::GetPolicyRequest {
            name: item.policy_name,
        })
        .await?
        .into_inner();
    Ok(policy
        .app_consistent_frequency
        .as_ref()
        .and_then(ferry_runtime::time::from_duration)
        .filter(|d| !d.is_zero()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests may
    use super::*;

    #[tokio::test]
    async fn a_plaintext_group_port_beyond_loopback_is_refused() {
        let loopback = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(refuse_plaintext_beyond_loopback(&loopback).is_ok());
        let everywhere = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let refused = refuse_plaintext_beyond_loopback(&everywhere).unwrap_err();
        assert!(
            matches!(refused, RunError::GroupPlaintext { .. }),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("--group-insecure"),
            "{refused}"
        );
    }

    #[test]
    fn a_tls_group_address_is_https() {
        assert_eq!(with_scheme("https://", "db:20004"), "https://db:20004");
        assert_eq!(with_scheme("", "db:20004"), "db:20004");
        assert_eq!(with_scheme("https://", "https://db:1"), "https://db:1");
        assert_eq!(with_scheme("https://", ""), "");
    }
}
