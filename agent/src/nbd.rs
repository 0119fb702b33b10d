//! The agent's NBD export: each protected disk by its id, through
//! [`Capture`], so that every completed write, TRIM and WRITE_ZEROES a VM
//! (qemu, qemu-io, qemu-img, nbd-client) sends goes into its stream. The
//! protocol server is `ferry_runtime::nbd`, which failover-svc serves
//! recovery points with too.

use crate::capture::{Capture, CaptureError};
use ferry_runtime::nbd::{Export, Exports, NbdError};

pub use ferry_runtime::nbd::{
    serve, serve_all, serve_with, NbdLimits, NbdListener, NbdListeners, NbdTls, SocketError,
    SocketFile, TlsError, UnixSocket, MAX_REQUEST,
};

fn nbd_error(e: CaptureError) -> NbdError {
    match &e {
        CaptureError::OutOfRange { .. } => NbdError::NoSpace,
        CaptureError::UnknownDisk(_) => NbdError::Invalid,
        CaptureError::Io { .. } => match e.os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => NbdError::NoSpace,
            _ => NbdError::Io,
        },
        CaptureError::Closed | CaptureError::Draining => NbdError::ShuttingDown,
    }
}

/// Logged where the error is known, since NBD carries only an errno.
fn failed(disk: &str, what: &str, e: CaptureError) -> NbdError {
    tracing::warn!(disk, error = %e, "NBD {what} failed");
    nbd_error(e)
}

impl Exports for Capture {
    fn list(&self) -> Vec<String> {
        self.disk_ids()
    }

    fn export(&self, name: &str) -> Option<Export> {
        self.disk(name).ok().map(|d| Export {
            size: d.size,
            read_only: false,
        })
    }

    async fn read(&self, name: &str, offset: u64, length: u32) -> Result<Vec<u8>, NbdError> {
        Capture::read(self, name, offset, length as usize)
            .await
            .map_err(|e| failed(name, "read", e))
    }

    async fn write(&self, name: &str, offset: u64, data: Vec<u8>) -> Result<(), NbdError> {
        Capture::write(self, name, offset, data)
            .await
            .map(|_| ())
            .map_err(|e| failed(name, "write", e))
    }

    async fn zero(&self, name: &str, offset: u64, length: u64, trim: bool) -> Result<(), NbdError> {
        Capture::zero(self, name, offset, length, trim)
            .await
            .map(|_| ())
            .map_err(|e| failed(name, "zeroing", e))
    }

    async fn flush(&self, name: &str) -> Result<(), NbdError> {
        Capture::flush(self, name)
            .await
            .map_err(|e| failed(name, "flush", e))
    }
}
