//! Where a sparse image holds data: SEEK_DATA/SEEK_HOLE, so that copying or
//! checking a mostly empty disk costs its data, not its size.

use std::fs::File;
use std::os::fd::AsRawFd;

/// The ranges of the first `size` bytes of `file` that may hold data; the
/// whole range where the filesystem cannot tell.
pub fn data_ranges(file: &File, size: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut at: u64 = 0;
    while at < size {
        let Ok(off) = libc::off_t::try_from(at) else {
            break;
        };
        // SAFETY: lseek on a file descriptor the caller owns; it only moves
        // the offset, which Ferry never relies on (all I/O is positional).
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `at`
            }
            return vec![(0, size)];
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return vec![(0, size)];
        }
        let (start, end) = (data as u64, (hole as u64).min(size));
        if start >= size {
            break;
        }
        ranges.push((start, end));
        at = end;
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_sparse_file_shows_its_data_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("ferry-sparse-{}", std::process::id()));
        let file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&dir)
            .unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(&[1; 4096], 32 << 20).unwrap();
        let ranges = data_ranges(&file, 64 << 20);
        let _ = std::fs::remove_file(&dir);
        let data: u64 = ranges.iter().map(|(s, e)| e - s).sum();
        assert!(
            ranges
                .iter()
                .any(|(s, e)| *s <= 32 << 20 && *e >= (32 << 20) + 4096),
            "{ranges:?}"
        );
        // A filesystem without SEEK_DATA reports everything: still correct.
        assert!(
            data < 64 << 20 || ranges == vec![(0, 64 << 20)],
            "{ranges:?}"
        );
    }
}
