//! What clients ask for, as domain types: service.rs turns each gRPC
//! request into one of these once (a malformed request is
//! INVALID_ARGUMENT there), and the engine works with these inward.

use ferry_proto::ids::VmName;

use crate::jobs::{Choice, FailoverKind};

/// One VM, or a replication group as a whole.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Vm(VmName),
    Group(String),
}

/// A failover asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct FailoverRequest {
    pub target: Target,
    pub kind: FailoverKind,
    /// None: the default for the target (latest processed for a VM, the
    /// latest multi-VM point for a group).
    pub choice: Option<Choice>,
    pub test_network: String,
    /// The idempotency key; empty for none.
    pub request_id: String,
    /// Start the VM on overlays of the served point, then hydrate.
    pub instant: bool,
    /// Failback: a new VM, not the original disks.
    pub alternate_location: bool,
}

/// A commit or a test cleanup asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRequest {
    pub target: Target,
    /// The idempotency key; empty for none.
    pub request_id: String,
}
