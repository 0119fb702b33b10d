//! cache-svc's one error type and its mapping onto gRPC status codes.

use ferry_runtime::Refused;
use tonic::Status;

/// Everything a cache operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A refusal the caller can act on (bad request, state, quota...);
    /// its message reaches the client as it is.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The data directory's filesystem is full, or would keep less than the
    /// index's reserve: like a quota, the agent backs off and resends (then
    /// tracks changed chunks). Nothing of the batch was stored.
    #[error("disk full: {0}")]
    DiskFull(String),
    /// registry-svc could not be asked.
    #[error("registry unavailable: {0}")]
    Registry(String),
    /// The log's files failed.
    #[error("log I/O on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A stored log is damaged (not just a torn final record).
    #[error("log corrupt: {0}")]
    Corrupt(String),
    /// Acknowledged records in a segment are damaged: the log is kept as it
    /// is for inspection and refused, never cut.
    #[error("segment {segment} is damaged at byte {offset}, after sequence {after_sequence} ({why}); acknowledged records follow, so the log is kept as it is and refused")]
    Damaged {
        segment: String,
        offset: u64,
        after_sequence: u64,
        why: String,
    },
    /// The embedded index failed.
    #[error("index: {0}")]
    Index(#[from] sled::Error),
    /// The service is stopping.
    #[error("cache-svc is shutting down")]
    ShuttingDown,
}

impl CacheError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        // ENOSPC is the agent's to wait out, not a fault of the cache.
        if ferry_runtime::space::is_full(&source) {
            return CacheError::DiskFull(format!(
                "{}: {source}; back off until the log is trimmed or space is freed",
                path.display()
            ));
        }
        CacheError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<CacheError> for Status {
    fn from(err: CacheError) -> Status {
        let message = err.to_string();
        match err {
            CacheError::Refused(refused) => refused.into(),
            CacheError::DiskFull(_) => Status::resource_exhausted(message),
            CacheError::Registry(_) => Status::unavailable(message),
            CacheError::Io { .. } | CacheError::Index(_) => Status::internal(message),
            CacheError::Corrupt(_) => Status::data_loss(message),
            CacheError::Damaged { .. } => Status::data_loss(message),
            CacheError::ShuttingDown => Status::unavailable(message),
        }
    }
}
