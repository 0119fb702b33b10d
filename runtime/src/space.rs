//! Free space on a data directory's filesystem, and a full disk told apart
//! from other I/O failures. cache-svc and processor-svc keep a reserve free
//! for their sled index: sled turns a failed write into an error that stays
//! until the process restarts, so bulk data (log segments, replica blobs)
//! stops short of the reserve and the index always has room to record what
//! frees space (an applied sequence, a trim, a pruned point).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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
}
