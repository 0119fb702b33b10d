//! ferry-agent: runs beside a VM's disks, captures every write and streams it
//! in order to cache-svc. It registers with registry-svc for its VM and
//! receives its cache endpoint, disk layout, epoch and credential; writes go
//! through [`capture::Capture`] (the library API) and reach the cache through
//! [`stream`]; [`nbd`] exports the disks to qemu and friends.

pub mod capture;
pub mod enrollment;
pub mod group;
pub mod group_signature;
pub mod health;
pub mod initial;
pub mod metrics;
pub mod mirror;
pub mod nbd;
pub mod qmp;
pub mod quiesce;
pub mod ranges;
pub mod resync;
pub mod roots;
pub mod run;
pub mod state;
pub mod stream;

use ferry_proto::ids::Epoch;
use ferry_proto::registry::v1 as pb;
use ferry_proto::registry::v1::registry_client::RegistryClient;

/// The agent's replication group port (as ASR's Mobility service).
pub const DEFAULT_GROUP_PORT: u16 = 20004;

/// Why the agent cannot run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The registry URL is unusable.
    #[error(transparent)]
    Peer(#[from] ferry_runtime::HostError),
    /// registry-svc refused or could not be reached.
    #[error(
        "registry refused the agent for VM {vm:?}: {:?}: {}{}",
        status.code(),
        status.message(),
        credentials_hint(status.code())
    )]
    Registry { vm: String, status: tonic::Status },
}

/// What to do about a refusal of the agent's credentials.
fn credentials_hint(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Unauthenticated => {
            " (give the agent its certificate, --tls-cert and --tls-key, or --token-file)"
        }
        tonic::Code::PermissionDenied => {
            " (the agent's certificate or token must be the one made for this VM: \
             `ferry certs init --agent VM` names it spiffe://ferry/agent/VM; a first \
             registration needs a one-time token from `ferry agent enroll VM`, given with \
             --enrollment-token-file)"
        }
        _ => "",
    }
}

/// What registry assigned to this agent. The credential is deliberately not
/// printed by `Debug`.
pub struct Assignment {
    pub cache_endpoint: String,
    pub disks: Vec<pb::Disk>,
    /// The fencing epoch this registration got.
    pub epoch: Epoch,
    /// The protected item's state at registration.
    pub state: pb::ReplicationState,
    /// The VM's replication group; empty if none.
    pub group: String,
    /// The item was re-protected: its reverse replica holds the original
    /// disks, and initial replication compares digests instead of copying.
    pub reprotected: bool,
    credential: String,
}

impl Assignment {
    /// The secret to present to cache-svc.
    pub fn credential(&self) -> &str {
        &self.credential
    }
}

impl std::fmt::Debug for Assignment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assignment")
            .field("cache_endpoint", &self.cache_endpoint)
            .field("disks", &self.disks.len())
            .field("epoch", &self.epoch)
            .field("state", &self.state)
            .field("group", &self.group)
            .field("reprotected", &self.reprotected)
            .field("credential", &"<redacted>")
            .finish()
    }
}

/// What the agent shows to be admitted (see [`enrollment`]).
#[derive(Default)]
pub struct Admission<'a> {
    /// The credential of its previous registration, if it kept one.
    pub credential: Option<&'a str>,
    /// A one-time enrollment token, if it was given one.
    pub enrollment_token: Option<&'a str>,
}

/// Registers the agent for `vm` with the registry at `registry_url`,
/// presenting `credentials` and showing `admission`.
pub async fn register(
    registry_url: &str,
    credentials: &ferry_runtime::peers::Credentials,
    vm: &str,
    hostname: &str,
    group_address: &str,
    admission: Admission<'_>,
) -> Result<Assignment, AgentError> {
    let mut client = RegistryClient::new(ferry_runtime::connect(registry_url, credentials)?);
    let grant = client
        .register_agent(pb::RegisterAgentRequest {
            vm_name: vm.to_string(),
            hostname: hostname.to_string(),
            group_address: group_address.to_string(),
            credential: admission.credential.unwrap_or_default().to_string(),
            enrollment_token: admission.enrollment_token.unwrap_or_default().to_string(),
        })
        .await
        .map_err(|status| AgentError::Registry {
            vm: vm.to_string(),
            status,
        })?
        .into_inner();
    Ok(Assignment {
        cache_endpoint: grant.cache_endpoint,
        disks: grant.disks,
        epoch: Epoch(grant.epoch),
        state: grant
            .item
            .as_ref()
            .map(|i| i.state())
            .unwrap_or(pb::ReplicationState::Unspecified),
        reprotected: grant
            .item
            .as_ref()
            .is_some_and(|i| i.reprotection.is_some()),
        group: grant.item.map(|i| i.replication_group).unwrap_or_default(),
        credential: grant.credential,
    })
}
