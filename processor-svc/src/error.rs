//! processor-svc's one error type and its mapping onto gRPC status codes.

use ferry_runtime::Refused;
use tonic::Status;

/// Everything a processor operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    /// A refusal the caller can act on (bad request, unknown point, a
    /// disk syncing, a peer away...); its message reaches the client as it is.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The data directory's filesystem is full, or would keep less than the
    /// index's reserve: the pipeline pauses until space returns.
    #[error("disk full: {0}")]
    DiskFull(String),
    /// Stored replica data does not match its checksum.
    #[error("replica data damaged: {0}")]
    DataLoss(String),
    /// The replica's files failed.
    #[error("replica I/O on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The embedded index failed.
    #[error("index: {0}")]
    Index(#[from] sled::Error),
    /// An index entry could not be decoded.
    #[error("index entry damaged: {0}")]
    Corrupt(String),
    /// The service is stopping.
    #[error("processor-svc is shutting down")]
    ShuttingDown,
}

impl ProcessorError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        // Space can return; the pipeline waits for it rather than failing.
        if ferry_runtime::space::is_full(&source) {
            return ProcessorError::DiskFull(format!("{}: {source}", path.display()));
        }
        ProcessorError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<ProcessorError> for Status {
    fn from(err: ProcessorError) -> Status {
        let message = err.to_string();
        match err {
            ProcessorError::Refused(refused) => refused.into(),
            ProcessorError::ShuttingDown => Status::unavailable(message),
            ProcessorError::DiskFull(_) => Status::resource_exhausted(message),
            ProcessorError::DataLoss(_) => Status::data_loss(message),
            ProcessorError::Io { .. } | ProcessorError::Index(_) | ProcessorError::Corrupt(_) => {
                Status::internal(message)
            }
        }
    }
}
