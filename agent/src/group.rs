//! Replication groups: every member's agent serves `ferry.agent.v1.AgentGroup`
//! (port 20004 by default) and says it is alive to registry; the member
//! registry names coordinator runs a bookmark round every multi-VM interval.
//!
//! A round: Prepare on every member (each holds the completion of new writes
//! and reports its last sequence), then Commit on every member (each puts a
//! BOOKMARK marker with the round's id and time into its stream and releases
//! writes), or Abort. While every member holds, no write completes anywhere,
//! so a write acknowledged to one VM before another VM's write was issued is
//! before the bookmark on its own VM whenever the later one is before it on
//! its VM: the bookmarks cut the group consistently. A member releases by
//! itself when the hold it was asked for (at most [`MAX_HOLD`]) ends, and then
//! refuses that round's Commit, so a coordinator dying mid-round stalls
//! writes for that long at most.
//!
//! Who may call: with TLS (the agent's certificate, `--tls-cert`/`--tls-key`/
//! `--tls-ca`) the port speaks only TLS, the authorization layer admits only
//! agents (by certificate), and each handler admits only the agent of a VM
//! that is a current member of this agent's group (the member list registry's
//! GroupHeartbeat answers); anyone else is PERMISSION_DENIED and nothing is
//! held. A Commit's time must lie within [`MAX_SKEW`] of the member's clock
//! and not before the last bookmark it committed. Without TLS the port admits
//! only calls signed with the group's secret by a current member
//! ([`crate::group_signature`]); the agent binary then serves it only on a
//! loopback address unless `--group-insecure` (see docs/security.md).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proto::agent::v1 as pb;
use ferry_proto::agent::v1::agent_group_client::AgentGroupClient;
use ferry_proto::agent::v1::agent_group_server::{AgentGroup, AgentGroupServer};
use ferry_proto::cache::v1::record::Op;
use ferry_proto::cache::v1::{Marker, MarkerKind};
use ferry_proto::ids::Epoch;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::peers::Credentials;
use ferry_runtime::security::{Caller, Principal};
use ferry_runtime::time::from_duration;
use ferry_runtime::PeerChannel;
use tokio::sync::{Mutex, OwnedRwLockWriteGuard};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::capture::Capture;
use crate::group_signature::{GroupSecret, Refusal, Replays, Signed, HEADER as SIGNATURE_HEADER};

/// The gRPC service name, for health and reflection.
pub const SERVICE_NAME: &str = "ferry.agent.v1.AgentGroup";
/// A member never holds writes longer than this, whatever it is asked.
pub const MAX_HOLD: Duration = Duration::from_secs(2);
/// How long a coordinator gives a round (and asks members to hold at most).
pub const ROUND_DEADLINE: Duration = Duration::from_millis(500);
/// Rounds failing in a row before the members' health says so.
const FAILURES_TO_WARN: u32 = 3;
/// How often a member's agent says it is alive to registry.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How far a Commit's time (the multi-VM point's time, set by the
/// coordinator) may lie from the receiving member's clock: a caller can
/// neither backdate nor postdate a point by more, and members' clocks must
/// agree within it (NTP) for rounds to commit.
pub const MAX_SKEW: Duration = Duration::from_secs(5);

struct Hold {
    round: String,
    /// Dropping it releases writes.
    _writes: OwnedRwLockWriteGuard<()>,
}

/// This agent's side of the group protocol.
pub struct Member {
    vm: String,
    group: String,
    capture: Arc<Capture>,
    /// The round holding writes, if any. Locked across taking the hold, so
    /// that two rounds never hold at once.
    hold: Arc<Mutex<Option<Hold>>>,
    /// Holds that ended by themselves (their round did not finish in time).
    expired: Arc<std::sync::atomic::AtomicU64>,
    /// The group's members as registry last said (None until the first
    /// heartbeat answered): the only agents admitted on a checked port.
    members: std::sync::Mutex<Option<std::collections::HashSet<String>>>,
    /// The group's secret as registry last gave it (None until then): a
    /// port without TLS admits only calls signed with it.
    secret: std::sync::Mutex<Option<GroupSecret>>,
    /// Signatures admitted lately, refused if they come again.
    replays: std::sync::Mutex<Replays>,
    /// The time of the last bookmark this member committed (Unix ns): no
    /// later Commit may carry an earlier one.
    last_bookmark: std::sync::atomic::AtomicU64,
}

impl Member {
    pub fn new(vm: &str, group: &str, capture: Arc<Capture>) -> Arc<Member> {
        Arc::new(Member {
            vm: vm.to_string(),
            group: group.to_string(),
            capture,
            hold: Arc::new(Mutex::new(None)),
            expired: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            members: std::sync::Mutex::new(None),
            secret: std::sync::Mutex::new(None),
            replays: std::sync::Mutex::new(Replays::default()),
            last_bookmark: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The group's current members (VM names), as registry's GroupHeartbeat
    /// answers them.
    pub fn set_members<I, S>(&self, members: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let set = members.into_iter().map(Into::into).collect();
        if let Ok(mut slot) = self.members.lock() {
            *slot = Some(set);
        }
    }

    /// The group's secret, as registry's GroupHeartbeat answers it.
    pub fn set_secret(&self, secret: Option<GroupSecret>) {
        if let Ok(mut slot) = self.secret.lock() {
            *slot = secret;
        }
    }

    /// The group's secret as this member last heard it (for a coordinator
    /// in the same process).
    pub fn secret(&self) -> Option<GroupSecret> {
        self.secret.lock().ok().and_then(|s| s.clone())
    }

    /// The VM of a call signed with the group's secret (a port without TLS).
    fn signer(&self, signature: Option<&str>, message: &Signed<'_>) -> Result<String, Status> {
        let secret = self.secret.lock().ok().and_then(|s| s.clone());
        let Some(secret) = secret else {
            return Err(Status::unauthenticated(format!(
                "VM {:?}'s agent does not know replication group {:?}'s secret yet \
                 (registry's heartbeat has not answered): no call is admitted",
                self.vm, self.group
            )));
        };
        let refused = |why: Refusal| {
            Status::unauthenticated(format!(
                "replication group {:?}, VM {:?}: {why}",
                self.group, self.vm
            ))
        };
        let signature = signature.ok_or(Refusal::Unsigned).map_err(refused)?;
        let now = ferry_runtime::time::unix_nanos_now();
        let vm = secret.verify(signature, message, now).map_err(refused)?;
        match self.replays.lock() {
            Ok(mut replays) => replays.admit(signature, now).map_err(refused)?,
            Err(_) => return Err(Status::internal("the replay list is poisoned")),
        }
        Ok(vm)
    }

    /// Admits the agent of a current member of this group: by certificate
    /// on a TLS port, by a signature with the group's secret on a plaintext
    /// one.
    fn check_caller(&self, call: &Call, message: Signed<'_>) -> Result<(), Status> {
        let vm = match &call.caller {
            Caller::Unchecked => self.signer(call.signature.as_deref(), &message)?,
            Caller::Known(Principal::Agent { vm }) => vm.as_str().to_string(),
            Caller::Known(other) => {
                return Err(Status::permission_denied(format!(
                    "{} may not take part in replication group {:?}: only its members' agents may",
                    other.uri(),
                    self.group
                )))
            }
        };
        let known = self.members.lock().ok().and_then(|m| m.clone());
        match known {
            Some(members) if members.contains(&vm) => Ok(()),
            Some(_) => Err(Status::permission_denied(format!(
                "the agent of VM {vm:?} is not a member of replication group {:?} \
                 (as registry last said): it may not Prepare, Commit or Abort its rounds",
                self.group
            ))),
            None => Err(Status::permission_denied(format!(
                "the agent of VM {vm:?} is refused: VM {:?}'s agent does not know replication \
                 group {:?}'s members yet (registry's heartbeat has not answered)",
                self.vm, self.group
            ))),
        }
    }

    /// A Commit's time must be near this member's clock and not before
    /// its last bookmark.
    fn check_time(&self, time_unix_nanos: u64) -> Result<(), Status> {
        let now = ferry_runtime::time::unix_nanos_now();
        let skew = u64::try_from(MAX_SKEW.as_nanos()).unwrap_or(u64::MAX);
        if time_unix_nanos.abs_diff(now) > skew {
            let off = Duration::from_nanos(time_unix_nanos.abs_diff(now));
            let way = if time_unix_nanos < now {
                "before"
            } else {
                "after"
            };
            return Err(Status::invalid_argument(format!(
                "the round's time {time_unix_nanos} is {off:?} {way} VM {:?}'s clock \
                 (at most {MAX_SKEW:?} either way): no bookmark; check the members' clocks (NTP)",
                self.vm
            )));
        }
        let last = self
            .last_bookmark
            .load(std::sync::atomic::Ordering::Relaxed);
        if time_unix_nanos < last {
            return Err(Status::invalid_argument(format!(
                "the round's time {time_unix_nanos} is before VM {:?}'s last bookmark \
                 ({last}): a point cannot be backdated",
                self.vm
            )));
        }
        Ok(())
    }

    /// How many holds ended by themselves because their round did not finish.
    pub fn expired_holds(&self) -> u64 {
        self.expired.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn check_group(&self, group: &str) -> Result<(), Status> {
        if group != self.group {
            return Err(Status::failed_precondition(format!(
                "VM {:?} is in replication group {:?}, not {group:?}",
                self.vm, self.group
            )));
        }
        Ok(())
    }

    async fn prepare(
        &self,
        call: &Call,
        req: pb::PrepareRequest,
    ) -> Result<pb::PrepareResponse, Status> {
        self.check_caller(call, prepare_signed(&req))?;
        self.check_group(&req.replication_group)?;
        if req.round_id.is_empty() {
            return Err(Status::invalid_argument("round_id is empty"));
        }
        let hold = req
            .hold
            .as_ref()
            .and_then(from_duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(ROUND_DEADLINE)
            .min(MAX_HOLD);
        let mut slot = self.hold.lock().await;
        if let Some(h) = slot.as_ref() {
            if h.round == req.round_id {
                return Ok(pb::PrepareResponse {
                    vm_name: self.vm.clone(),
                    sequence: self.capture.stream().last().await,
                });
            }
            return Err(Status::aborted(format!(
                "round {:?} holds VM {:?}'s writes",
                h.round, self.vm
            )));
        }
        if self.capture.stream().tracking().await.0 {
            return Err(Status::failed_precondition(format!(
                "VM {:?} is tracking changed chunks until resync: no bookmark possible",
                self.vm
            )));
        }
        let writes = tokio::time::timeout(hold, self.capture.hold_writes())
            .await
            .map_err(|_| {
                Status::aborted(format!(
                    "VM {:?}: a write in progress did not finish within {hold:?}",
                    self.vm
                ))
            })?;
        let sequence = self.capture.stream().last().await;
        *slot = Some(Hold {
            round: req.round_id.clone(),
            _writes: writes,
        });
        drop(slot);
        // The hold ends by itself if the round does not finish in time.
        let (slot, expired, round, vm) = (
            self.hold.clone(),
            self.expired.clone(),
            req.round_id.clone(),
            self.vm.clone(),
        );
        tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            let mut slot = slot.lock().await;
            if slot.as_ref().is_some_and(|h| h.round == round) {
                *slot = None;
                expired.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    vm,
                    round,
                    ?hold,
                    "round did not finish in time: writes released, no bookmark"
                );
            }
        });
        tracing::debug!(vm = %self.vm, round = %req.round_id, coordinator = %req.coordinator, sequence, "writes held");
        Ok(pb::PrepareResponse {
            vm_name: self.vm.clone(),
            sequence,
        })
    }

    async fn commit(
        &self,
        call: &Call,
        req: pb::CommitRequest,
    ) -> Result<pb::CommitResponse, Status> {
        self.check_caller(call, commit_signed(&req))?;
        self.check_group(&req.replication_group)?;
        let mut slot = self.hold.lock().await;
        if slot.as_ref().is_none_or(|h| h.round != req.round_id) {
            return Err(Status::failed_precondition(format!(
                "VM {:?} holds no writes for round {:?} (its hold ended, or Prepare never \
                 reached it): abort the round",
                self.vm, req.round_id
            )));
        }
        if let Err(status) = self.check_time(req.time_unix_nanos) {
            // The round cannot make a point: its writes go on.
            *slot = None;
            return Err(status);
        }
        // Writes are held, so the marker needs no ordering lock: every write
        // before it has completed, none after it has.
        let marker = Op::Marker(Marker {
            kind: MarkerKind::Bookmark as i32,
            id: req.round_id.clone(),
            time_unix_nanos: req.time_unix_nanos,
        });
        let sequence = self.capture.stream().push("", marker).await;
        *slot = None;
        if sequence != 0 {
            self.last_bookmark
                .fetch_max(req.time_unix_nanos, std::sync::atomic::Ordering::Relaxed);
        }
        if sequence == 0 {
            return Err(Status::failed_precondition(format!(
                "VM {:?} started tracking changed chunks: no bookmark",
                self.vm
            )));
        }
        tracing::debug!(vm = %self.vm, round = %req.round_id, sequence, "bookmark");
        Ok(pb::CommitResponse { sequence })
    }

    async fn abort(&self, call: &Call, req: pb::AbortRequest) -> Result<pb::AbortResponse, Status> {
        self.check_caller(call, abort_signed(&req))?;
        self.check_group(&req.replication_group)?;
        let mut slot = self.hold.lock().await;
        if slot.as_ref().is_some_and(|h| h.round == req.round_id) {
            *slot = None;
        }
        Ok(pb::AbortResponse {})
    }

    /// The tonic service.
    pub fn service(self: &Arc<Self>) -> AgentGroupServer<MemberService> {
        AgentGroupServer::new(MemberService(self.clone()))
    }
}

/// Who sent a group call: the caller the port's layer saw, and the
/// signature the call carried, if any.
struct Call {
    caller: Caller,
    signature: Option<String>,
}

impl Call {
    fn of<T>(request: &Request<T>) -> Call {
        Call {
            caller: Caller::of(request),
            signature: request
                .metadata()
                .get(SIGNATURE_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        }
    }
}

/// What a Prepare's signature covers.
fn prepare_signed(req: &pb::PrepareRequest) -> Signed<'_> {
    Signed::Prepare {
        group: &req.replication_group,
        round_id: &req.round_id,
        coordinator: &req.coordinator,
        hold_nanos: req
            .hold
            .as_ref()
            .and_then(from_duration)
            .map_or(0, |d| d.as_nanos()),
    }
}

/// What a Commit's signature covers.
fn commit_signed(req: &pb::CommitRequest) -> Signed<'_> {
    Signed::Commit {
        group: &req.replication_group,
        round_id: &req.round_id,
        time_unix_nanos: req.time_unix_nanos,
    }
}

/// What an Abort's signature covers.
fn abort_signed(req: &pb::AbortRequest) -> Signed<'_> {
    Signed::Abort {
        group: &req.replication_group,
        round_id: &req.round_id,
    }
}

/// The tonic face of a [`Member`].
pub struct MemberService(Arc<Member>);

#[tonic::async_trait]
impl AgentGroup for MemberService {
    async fn prepare(
        &self,
        request: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        let call = Call::of(&request);
        self.0
            .prepare(&call, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let call = Call::of(&request);
        self.0
            .commit(&call, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let call = Call::of(&request);
        self.0
            .abort(&call, request.into_inner())
            .await
            .map(Response::new)
    }
}

/// Serves `ferry.agent.v1.AgentGroup` (with health and reflection) on
/// `listener` until `stop`: with `tls`, TLS only and every caller checked
/// (agents only, by certificate; members only, by the handlers); without,
/// plaintext, the handlers admitting only calls signed with the group's
/// secret.
pub async fn serve(
    member: Arc<Member>,
    listener: tokio::net::TcpListener,
    tls: Option<ferry_runtime::security::Tls>,
    stop: CancellationToken,
) -> Result<(), ferry_runtime::HostError> {
    use ferry_runtime::security::{Access, Checks, NoOperatorTokens};
    let mut host = ferry_runtime::Host::new(&[SERVICE_NAME]).await?;
    host.routes().add_service(member.service());
    let health = host.health();
    let access = match &tls {
        Some(_) => Access::Enforced(Arc::new(Checks {
            tokens: Arc::new(NoOperatorTokens),
            secret: None,
        })),
        None => Access::Unchecked,
    };
    tokio::spawn(async move {
        health.serving().await;
        let limits = ferry_runtime::config::Limits::default();
        if let Err(e) = host
            .serve(listener, &limits, tls.as_ref(), access, stop)
            .await
        {
            tracing::error!(error = %e, "replication group port stopped");
        }
    });
    Ok(())
}

/// Channels to the members' group ports, by address.
#[derive(Default)]
pub struct Peers {
    /// Each address's client, and whether it is plaintext (its calls are
    /// signed with the group's secret).
    clients: HashMap<String, (AgentGroupClient<PeerChannel>, bool)>,
    credentials: Credentials,
    secret: Option<GroupSecret>,
}

impl Peers {
    /// Peers reached with the agent's `credentials`. They are presented to
    /// an https:// group address only (a member serving TLS, which admits
    /// members' agents by certificate); a plain address (a member without
    /// TLS, which checks no caller) gets no credentials — the agent's token
    /// never crosses the network in the clear.
    pub fn new(credentials: Credentials) -> Peers {
        Peers {
            clients: HashMap::new(),
            credentials,
            secret: None,
        }
    }

    /// The group's secret, to sign calls to plain group ports with (as
    /// registry's GroupHeartbeat answers it).
    pub fn set_secret(&mut self, secret: Option<GroupSecret>) {
        self.secret = secret;
    }

    /// `request` to a member; signed if the member's port is plaintext.
    fn request<T>(&self, plain: bool, signer: &str, message: Signed<'_>, request: T) -> Request<T> {
        let mut request = Request::new(request);
        let signature = match (&self.secret, plain) {
            (Some(secret), true) => {
                secret.sign(&message, signer, ferry_runtime::time::unix_nanos_now())
            }
            _ => None,
        };
        if let Some(value) = signature.and_then(|s| s.parse().ok()) {
            request.metadata_mut().insert(SIGNATURE_HEADER, value);
        }
        request
    }

    fn client(&mut self, address: &str) -> Result<(AgentGroupClient<PeerChannel>, bool), Status> {
        if let Some(c) = self.clients.get(address) {
            return Ok(c.clone());
        }
        let url = if address.contains("://") {
            address.to_string()
        } else {
            format!("http://{address}")
        };
        let plain = !url.starts_with("https://");
        let credentials = if plain {
            Credentials::none()
        } else {
            self.credentials.clone()
        };
        let channel = ferry_runtime::connect(&url, &credentials)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let client = AgentGroupClient::new(channel);
        self.clients
            .insert(address.to_string(), (client.clone(), plain));
        Ok((client, plain))
    }
}

/// How a round went.
#[derive(Debug, Clone)]
pub struct Round {
    /// The bookmark id.
    pub id: String,
    /// The round's time (Unix ns): the multi-VM point's time.
    pub time_unix_nanos: u64,
    /// From the first Prepare to the last answer.
    pub elapsed: Duration,
    /// Each member's bookmark sequence, when committed.
    pub sequences: Vec<(String, u64)>,
}

/// Why a round produced no bookmark on every member.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    #[error("round {round}: prepare failed on {vm}: {status}; aborted")]
    Prepare {
        round: String,
        vm: String,
        status: Status,
    },
    #[error("round {round}: commit failed on {vm}: {status}; the group has no point here")]
    Commit {
        round: String,
        vm: String,
        status: Status,
    },
    #[error("round {round} did not finish within {deadline:?}; aborted")]
    Deadline { round: String, deadline: Duration },
}

/// Runs one bookmark round over `members` (VM, group address), coordinated
/// by `coordinator`, within `deadline`.
pub async fn round(
    peers: &mut Peers,
    group: &str,
    coordinator: &str,
    members: &[(String, String)],
    deadline: Duration,
) -> Result<Round, RoundError> {
    let started = Instant::now();
    let time_unix_nanos = ferry_runtime::time::unix_nanos_now();
    let id = format!("{group}-{time_unix_nanos:x}");
    let mut clients = Vec::new();
    for (vm, address) in members {
        let client = peers
            .client(address)
            .map_err(|status| RoundError::Prepare {
                round: id.clone(),
                vm: vm.clone(),
                status,
            })?;
        clients.push((vm.clone(), client));
    }
    let peers = &*peers;
    let prepares = clients.iter().map(|(vm, (client, plain))| {
        let mut client = client.clone();
        let request = pb::PrepareRequest {
            replication_group: group.to_string(),
            round_id: id.clone(),
            coordinator: coordinator.to_string(),
            hold: Some(ferry_runtime::time::to_duration(deadline)),
        };
        let request = peers.request(
            *plain,
            coordinator,
            prepare_signed(&request),
            request.clone(),
        );
        async move { (vm.clone(), client.prepare(request).await) }
    });
    let prepared = tokio::time::timeout(deadline, futures::future::join_all(prepares)).await;
    let failure = match prepared {
        Err(_) => Some(RoundError::Deadline {
            round: id.clone(),
            deadline,
        }),
        Ok(answers) => answers
            .into_iter()
            .find_map(|(vm, answer)| answer.err().map(|status| (vm, status)))
            .map(|(vm, status)| RoundError::Prepare {
                round: id.clone(),
                vm,
                status,
            }),
    };
    if let Some(e) = failure {
        let aborts = clients.iter().map(|(_, (client, plain))| {
            let mut client = client.clone();
            let request = pb::AbortRequest {
                replication_group: group.to_string(),
                round_id: id.clone(),
            };
            let request =
                peers.request(*plain, coordinator, abort_signed(&request), request.clone());
            async move { client.abort(request).await }
        });
        // Best effort: members release by themselves anyway.
        let _ = tokio::time::timeout(deadline, futures::future::join_all(aborts)).await;
        return Err(e);
    }
    let left = deadline.saturating_sub(started.elapsed());
    let commits = clients.iter().map(|(vm, (client, plain))| {
        let mut client = client.clone();
        let request = pb::CommitRequest {
            replication_group: group.to_string(),
            round_id: id.clone(),
            time_unix_nanos,
        };
        let request = peers.request(
            *plain,
            coordinator,
            commit_signed(&request),
            request.clone(),
        );
        async move { (vm.clone(), client.commit(request).await) }
    });
    let committed = tokio::time::timeout(
        left.max(Duration::from_millis(50)),
        futures::future::join_all(commits),
    )
    .await
    .map_err(|_| RoundError::Deadline {
        round: id.clone(),
        deadline,
    })?;
    let mut sequences = Vec::new();
    for (vm, answer) in committed {
        match answer {
            Ok(r) => sequences.push((vm, r.into_inner().sequence)),
            Err(status) => {
                return Err(RoundError::Commit {
                    round: id.clone(),
                    vm,
                    status,
                })
            }
        }
    }
    Ok(Round {
        id,
        time_unix_nanos,
        elapsed: started.elapsed(),
        sequences,
    })
}

/// What the group loop needs.
pub struct GroupOptions {
    pub registry: String,
    /// What the agent presents to registry (and to https:// group ports).
    pub credentials: Credentials,
    pub vm: String,
    pub epoch: Epoch,
    pub credential: String,
    /// This agent's group port address, as the other members reach it.
    pub address: String,
    /// This agent's side of the protocol: it learns the members from each
    /// heartbeat's answer.
    pub member: Arc<Member>,
}

/// Says this member is alive to registry every [`HEARTBEAT`]; while registry
/// names it coordinator, runs a round every multi-VM interval. Until `stop`.
pub async fn run(opts: GroupOptions, stop: CancellationToken) {
    let mut registry = match ferry_runtime::connect(&opts.registry, &opts.credentials) {
        Ok(c) => RegistryClient::new(c),
        Err(e) => {
            tracing::error!(vm = %opts.vm, error = %e, "group: bad registry URL");
            return;
        }
    };
    let mut peers = Peers::new(opts.credentials.clone());
    let mut next_round: Option<Instant> = None;
    // Whether the members' health last said multi-VM points are made, and
    // how many rounds in a row failed (one failure alone is no warning).
    let mut reported: Option<bool> = None;
    let mut failures = 0u32;
    loop {
        let beat = registry
            .group_heartbeat(reg::GroupHeartbeatRequest {
                vm_name: opts.vm.clone(),
                credential: opts.credential.clone(),
                epoch: opts.epoch.get(),
                group_address: opts.address.clone(),
            })
            .await;
        let mut wait = HEARTBEAT;
        match beat {
            Ok(view) => {
                let view = view.into_inner();
                let group = view.group.unwrap_or_default();
                opts.member
                    .set_members(view.members.iter().map(|m| m.vm_name.clone()));
                let secret = GroupSecret::new(view.group_secret);
                opts.member.set_secret(secret.clone());
                peers.set_secret(secret);
                let interval = view
                    .multi_vm_interval
                    .as_ref()
                    .and_then(from_duration)
                    .filter(|d| !d.is_zero())
                    .unwrap_or(Duration::from_secs(10));
                if group.coordinator == opts.vm {
                    let due = *next_round.get_or_insert_with(Instant::now);
                    if Instant::now() >= due {
                        next_round = Some(due + interval.max(Duration::from_millis(100)));
                        if next_round.is_some_and(|n| n < Instant::now()) {
                            // Fell behind (a slow round): start the schedule over.
                            next_round = Some(Instant::now() + interval);
                        }
                        let outcome =
                            coordinate(&mut peers, &opts.vm, &group.name, &view.members).await;
                        failures = if outcome.is_ok() { 0 } else { failures + 1 };
                        let healthy = match &outcome {
                            Ok(()) => Some(true),
                            Err(_) if failures >= FAILURES_TO_WARN => Some(false),
                            Err(_) => None,
                        };
                        if healthy.is_some()
                            && healthy != reported
                            && report(&mut registry, &view.members, &outcome).await
                        {
                            reported = healthy;
                        }
                    }
                    if let Some(n) = next_round {
                        wait = wait.min(n.saturating_duration_since(Instant::now()));
                    }
                } else {
                    next_round = None;
                    reported = None;
                }
            }
            Err(status) => {
                tracing::warn!(vm = %opts.vm, %status, "group heartbeat refused");
                next_round = None;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Tells registry, on every member, whether the group gets multi-VM points;
/// whether every report was taken.
async fn report(
    registry: &mut RegistryClient<PeerChannel>,
    members: &[reg::GroupMember],
    outcome: &Result<(), String>,
) -> bool {
    let (health, message) = match outcome {
        Ok(()) => (reg::ReplicationHealth::Normal, String::new()),
        Err(e) => (
            reg::ReplicationHealth::Warning,
            format!("no multi-VM points: {e}"),
        ),
    };
    let mut all = true;
    for m in members {
        let request = reg::ReportHealthRequest {
            vm_name: m.vm_name.clone(),
            component: "group".into(),
            health: health as i32,
            message: message.clone(),
            ..Default::default()
        };
        if let Err(status) = registry.report_health(request).await {
            tracing::warn!(vm = %m.vm_name, %status, "group health report refused");
            all = false;
        }
    }
    all
}

/// One round if every member is alive; why the group got no bookmark.
async fn coordinate(
    peers: &mut Peers,
    vm: &str,
    group: &str,
    members: &[reg::GroupMember],
) -> Result<(), String> {
    if let Some(m) = members
        .iter()
        .find(|m| !m.alive || m.group_address.is_empty())
    {
        tracing::warn!(group, member = %m.vm_name, "a member's agent is not alive: no round (a multi-VM point needs every member)");
        return Err(format!("the agent of member {:?} is not alive", m.vm_name));
    }
    let members: Vec<(String, String)> = members
        .iter()
        .map(|m| (m.vm_name.clone(), m.group_address.clone()))
        .collect();
    match round(peers, group, vm, &members, ROUND_DEADLINE).await {
        Ok(r) => {
            tracing::debug!(group, round = %r.id, members = members.len(), elapsed = ?r.elapsed, "bookmark round committed");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(group, error = %e, "bookmark round failed");
            Err(e.to_string())
        }
    }
}
