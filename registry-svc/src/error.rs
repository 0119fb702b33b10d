//! registry-svc's one error type and its mapping onto gRPC status codes.

use tonic::Status;

/// Everything a registry operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request is malformed; nothing was changed.
    #[error("{0}")]
    InvalidArgument(String),
    /// A named object does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    /// An object of that name exists already.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    /// The request does not fit the current state; nothing was changed.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A credential that does not match.
    #[error("{0}")]
    PermissionDenied(String),
    /// The embedded database failed.
    #[error("storage error: {0}")]
    Storage(#[from] sled::Error),
    /// A stored record cannot be decoded.
    #[error("stored record {key} is corrupt: {message}")]
    Corrupt { key: String, message: String },
    /// The machine failed the registry (e.g. no randomness for a credential).
    #[error("internal error: {0}")]
    Internal(String),
}

impl RegistryError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        RegistryError::InvalidArgument(message.into())
    }

    pub(crate) fn precondition(message: impl Into<String>) -> Self {
        RegistryError::FailedPrecondition(message.into())
    }

    pub(crate) fn not_found(kind: &'static str, name: impl Into<String>) -> Self {
        RegistryError::NotFound {
            kind,
            name: name.into(),
        }
    }
}

impl From<RegistryError> for Status {
    fn from(err: RegistryError) -> Status {
        let message = err.to_string();
        match err {
            RegistryError::InvalidArgument(_) => Status::invalid_argument(message),
            RegistryError::NotFound { .. } => Status::not_found(message),
            RegistryError::AlreadyExists { .. } => Status::already_exists(message),
            RegistryError::FailedPrecondition(_) => Status::failed_precondition(message),
            RegistryError::PermissionDenied(_) => Status::permission_denied(message),
            RegistryError::Storage(_) => Status::internal(message),
            RegistryError::Corrupt { .. } => Status::data_loss(message),
            RegistryError::Internal(_) => Status::internal(message),
        }
    }
}
