//! Free space on a data directory's filesystem, and a full disk told apart
//! from other I/O failures. cache-svc and processor-svc keep a reserve free
//! for their sled index: sled turns a failed write into an error that stays
//! until the process restarts, so bulk data (log segments, replica blobs)
//! stops short of the reserve and the index always has room to record what
//! frees space (an applied sequence, a trim, a pruned point).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Bytes an unprivileged writer may still use on the filesystem of `path`.
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: a NUL-terminated path and a buffer of the right type, which
    // statvfs fills when it returns 0.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    let st = unsafe { st.assume_init() };
    // Narrower than u64 on some targets.
    #[allow(clippy::useless_conversion)]
    let (blocks, size) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    Ok(blocks.saturating_mul(size))
}

/// Whether an I/O error means the filesystem (or a quota on it) is full.
pub fn is_full(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || matches!(
            err.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        )
}

/// Room for bulk data on a data directory's filesystem: each write claims
/// its bytes first and is refused if it would leave less than `reserve`
/// free, counting what other writes in flight have claimed (so that
/// concurrent writers cannot together eat the reserve).
#[derive(Debug, Clone)]
pub struct Room {
    dir: PathBuf,
    reserve: u64,
    claimed: Arc<Mutex<u64>>,
}

/// Bytes claimed by a write in flight; released when dropped.
#[derive(Debug)]
pub struct Claim {
    claimed: Arc<Mutex<u64>>,
    bytes: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut claimed = self
            .claimed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *claimed = claimed.saturating_sub(self.bytes);
    }
}

/// Why a write gets no room.
#[derive(Debug, thiserror::Error)]
pub enum NoRoom {
    #[error("cannot tell the free space under {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{free} bytes free under {}, {claimed} of them claimed by writes in flight and \
         {reserve} kept for the index: {bytes} bytes do not fit",
        path.display()
    )]
    Full {
        path: PathBuf,
        free: u64,
        claimed: u64,
        reserve: u64,
        bytes: u64,
    },
}

impl Room {
    pub fn new(dir: PathBuf, reserve: u64) -> Room {
        Room {
            dir,
            reserve,
            claimed: Arc::new(Mutex::new(0)),
        }
    }

    /// Claims `bytes` if writing them leaves the reserve free.
    pub fn claim(&self, bytes: u64) -> Result<Claim, NoRoom> {
        // Checked and claimed under one lock: two writers cannot both fit
        // into the same free bytes.
        let mut claimed = self
            .claimed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let free = available_bytes(&self.dir).map_err(|source| NoRoom::Io {
            path: self.dir.clone(),
            source,
        })?;
        if free.saturating_sub(*claimed) < bytes.saturating_add(self.reserve) {
            return Err(NoRoom::Full {
                path: self.dir.clone(),
                free,
                claimed: *claimed,
                reserve: self.reserve,
                bytes,
            });
        }
        *claimed += bytes;
        Ok(Claim {
            claimed: self.claimed.clone(),
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_directory_has_some_space_and_enospc_is_full() {
        let dir = tempfile::tempdir().unwrap();
        assert!(super::available_bytes(dir.path()).unwrap() > 0);
        assert!(super::available_bytes(&dir.path().join("missing")).is_err());
        assert!(super::is_full(&std::io::Error::from_raw_os_error(
            libc::ENOSPC
        )));
        assert!(!super::is_full(&std::io::Error::from_raw_os_error(
            libc::EIO
        )));
    }

    #[test]
    fn writes_in_flight_cannot_together_eat_the_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let free = super::available_bytes(dir.path()).unwrap();
        let room = super::Room::new(dir.path().to_path_buf(), free / 4);
        let half = room.claim(free / 2).unwrap();
        assert!(
            matches!(room.claim(free / 2), Err(super::NoRoom::Full { .. })),
            "the second half would take the reserve"
        );
        drop(half);
        room.claim(free / 2).unwrap();
    }
}
