//! Who uses a disk image, told by open-file-description locks (the kind
//! QEMU's image locking takes, so it sees them and they see QEMU's). An
//! agent serving an image holds a read lock on one byte far past any data
//! (never in QEMU's way: it locks bytes 100 to 299); a writer that must
//! have an image to itself (failback into the original disks) takes a
//! write lock over all of it, which fails while an agent or a QEMU holds
//! the image. The locks go with the open file: closing it releases them.

use std::fs::File;
use std::os::fd::AsRawFd;

/// The byte an agent's read lock covers.
const IN_USE_BYTE: i64 = i64::MAX - 1;

fn lock(file: &File, kind: i32, start: i64, len: i64) -> std::io::Result<bool> {
    // SAFETY: `flock` is plain data; zeroed is a valid value for it.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l.l_start = start;
    l.l_len = len;
    // SAFETY: the descriptor is open for the call's duration and `l` is a
    // valid flock the kernel only reads.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &l) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

/// Marks `file` as served (an agent): a read lock, shared with other
/// readers. False while a writer holds the image to itself.
pub fn hold_served(file: &File) -> std::io::Result<bool> {
    lock(file, libc::F_RDLCK, IN_USE_BYTE, 1)
}

/// Takes `file` for a writer alone: false while an agent or a QEMU holds
/// it (nothing is taken then).
pub fn take_alone(file: &File) -> std::io::Result<bool> {
    lock(file, libc::F_WRLCK, 0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn a_served_image_is_not_taken_alone_until_its_server_closes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let agent = open(&path);
        assert!(hold_served(&agent).unwrap());
        // A second reader shares it.
        let other = open(&path);
        assert!(hold_served(&other).unwrap());
        drop(other);
        let writer = open(&path);
        assert!(!take_alone(&writer).unwrap());
        drop(agent);
        assert!(take_alone(&writer).unwrap());
        // Taken: an agent cannot serve it meanwhile.
        assert!(!hold_served(&open(&path)).unwrap());
    }
}
