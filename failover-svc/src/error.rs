//! failover-svc's one error type and its mapping onto gRPC status codes.

use ferry_runtime::Refused;
use tonic::Status;

use crate::libvirt::LibvirtError;

/// Everything a failover operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// A refusal the caller can act on (bad request, unknown job, state,
    /// a peer away, a failed end-to-end check...); its message reaches the
    /// client as it is.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// A peer refused; its status is kept.
    #[error("{what}: {status}")]
    Peer { what: String, status: Status },
    /// Target storage failed.
    #[error("target storage {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The embedded index failed.
    #[error("index: {0}")]
    Index(#[from] sled::Error),
    /// A stored record could not be decoded.
    #[error("record damaged: {0}")]
    Corrupt(String),
    /// A libvirt host refused or did not answer.
    #[error(transparent)]
    Libvirt(#[from] crate::libvirt::LibvirtError),
}

impl FailoverError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        FailoverError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn peer(what: impl Into<String>, status: Status) -> Self {
        FailoverError::Peer {
            what: what.into(),
            status,
        }
    }

    /// The status code a peer refused with, if this is a peer's refusal.
    pub(crate) fn peer_code(&self) -> Option<tonic::Code> {
        match self {
            FailoverError::Peer { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    /// The peer's own message, or this error's.
    pub(crate) fn peer_message(&self) -> String {
        match self {
            FailoverError::Peer { status, .. } => status.message().to_string(),
            other => other.to_string(),
        }
    }
}

impl From<FailoverError> for Status {
    fn from(err: FailoverError) -> Status {
        let message = err.to_string();
        match err {
            FailoverError::Refused(refused) => refused.into(),
            FailoverError::Peer { status, .. } => Status::new(status.code(), message),
            FailoverError::Io { .. } | FailoverError::Index(_) | FailoverError::Corrupt(_) => {
                Status::internal(message)
            }
            // The host's operator acts on these: virsh missing, a refusal
            // (permissions, a name in use); a host that does not answer
            // may answer later.
            FailoverError::Libvirt(e) => match e {
                LibvirtError::Spawn { .. } | LibvirtError::Failed { .. } => {
                    Status::failed_precondition(message)
                }
                LibvirtError::Timeout { .. } => Status::unavailable(message),
            },
        }
    }
}
