//! processor-svc's one error type and its mapping onto gRPC status codes.

use tonic::Status;

/// Everything a processor operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    /// A malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    /// An unknown VM, point or disk, or an expired point.
    #[error("{0}")]
    NotFound(String),
    /// The request does not fit the current state (a disk is syncing).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A range outside the disk.
    #[error("{0}")]
    OutOfRange(String),
    /// A peer (cache, registry) could not be asked.
    #[error("{0}")]
    Unavailable(String),
    /// The data directory's filesystem is full, or would keep less than the
    /// index's reserve: the pipeline pauses until space returns.
    #[error("disk full: {0}")]
    DiskFull(String),
    /// The request took longer than it may.
    #[error("{0}")]
    DeadlineExceeded(String),
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
            ProcessorError::InvalidArgument(_) => Status::invalid_argument(message),
            ProcessorError::NotFound(_) => Status::not_found(message),
            ProcessorError::FailedPrecondition(_) => Status::failed_precondition(message),
            ProcessorError::OutOfRange(_) => Status::out_of_range(message),
            ProcessorError::Unavailable(_) | ProcessorError::ShuttingDown => {
                Status::unavailable(message)
            }
            ProcessorError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
            ProcessorError::DiskFull(_) => Status::resource_exhausted(message),
            ProcessorError::DataLoss(_) => Status::data_loss(message),
            ProcessorError::Io { .. } | ProcessorError::Index(_) | ProcessorError::Corrupt(_) => {
                Status::internal(message)
            }
        }
    }
}
