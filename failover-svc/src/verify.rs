//! End-to-end checks of a materialized disk: the extents received cover it
//! exactly once, and the image as written has the point's digest
//! (`ferry_proto::digest`), computed here over the file itself (its data
//! ranges read back, its holes as zeros), never over what was received.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ferry_proto::digest::DiskDigester;
use ferry_runtime::Refused;

use crate::error::FailoverError;

/// Follows a ReadDisk stream: each extent must start where the previous one
/// ended, and the last must end at the disk's size.
pub struct Coverage {
    disk: String,
    size: u64,
    covered: u64,
}

impl Coverage {
    pub fn new(disk: &str, size: u64) -> Coverage {
        Coverage {
            disk: disk.to_string(),
            size,
            covered: 0,
        }
    }

    /// One extent of `length` at `offset`, `data_len` bytes of data (None:
    /// a hole).
    pub fn extent(
        &mut self,
        offset: u64,
        length: u64,
        data_len: Option<u64>,
    ) -> Result<(), FailoverError> {
        let end = offset.checked_add(length).filter(|e| *e <= self.size);
        let fits = offset == self.covered && length > 0 && end.is_some();
        if !fits || data_len.is_some_and(|n| n != length) {
            return Err(Refused::unavailable(format!(
                "disk {}: the processor sent {offset}+{length} ({} bytes of data) where byte \
                 {} of {} comes next; nothing is failed over from a stream that skips or \
                 repeats; retry the job",
                self.disk,
                data_len.map_or("no".to_string(), |n| n.to_string()),
                self.covered,
                self.size
            ))
            .into());
        }
        self.covered = offset + length;
        Ok(())
    }

    /// The stream ended: it must have covered the whole disk.
    pub fn finish(&self) -> Result<(), FailoverError> {
        if self.covered != self.size {
            return Err(Refused::unavailable(format!(
                "disk {}: the processor's stream ended after {} of {} bytes (was it \
                 stopped?); a partial disk is never failed over; retry the job",
                self.disk, self.covered, self.size
            ))
            .into());
        }
        Ok(())
    }
}

/// The digest of the first `size` bytes of the image at `path`, in chunks
/// of `chunk_bytes`.
pub fn image_digest(path: &Path, size: u64, chunk_bytes: u64) -> Result<[u8; 32], FailoverError> {
    let file = File::open(path).map_err(|e| FailoverError::io(path, e))?;
    let mut digest = DiskDigester::new(chunk_bytes, size);
    let chunk = chunk_bytes.max(1);
    let mut buf = vec![0u8; chunk.min(size.max(1)) as usize];
    for (start, end) in ferry_runtime::sparse::data_ranges(&file, size) {
        if end <= start {
            continue;
        }
        let first = (start / chunk).max(digest.next_chunk());
        let last = (end - 1) / chunk;
        if last < first {
            continue;
        }
        digest.push_zeros(first - digest.next_chunk());
        for c in first..=last {
            let len = digest.chunk_len(c) as usize;
            file.read_exact_at(&mut buf[..len], c * chunk)
                .map_err(|e| FailoverError::io(path, e))?;
            digest.push(crc32c::crc32c(&buf[..len]));
        }
    }
    digest.push_zeros(u64::MAX);
    digest
        .finish()
        .map_err(|e| FailoverError::Corrupt(format!("digest of {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_must_tile_the_disk() {
        let mut c = Coverage::new("os", 4096);
        c.extent(0, 1024, Some(1024)).unwrap();
        assert!(c.finish().is_err(), "short");
        assert!(c.clone_at(1024).extent(2048, 1024, None).is_err(), "gap");
        assert!(c.clone_at(1024).extent(512, 1024, None).is_err(), "overlap");
        assert!(
            c.clone_at(1024).extent(1024, 4096, None).is_err(),
            "past the end"
        );
        assert!(
            c.clone_at(1024).extent(1024, 1024, Some(10)).is_err(),
            "short data"
        );
        c.extent(1024, 3072, None).unwrap();
        c.finish().unwrap();
    }

    impl Coverage {
        fn clone_at(&self, covered: u64) -> Coverage {
            Coverage {
                disk: self.disk.clone(),
                size: self.size,
                covered,
            }
        }
    }

    #[test]
    fn an_image_digest_is_the_digest_of_its_bytes() {
        let path = std::env::temp_dir().join(format!("ferry-verify-{}", std::process::id()));
        let size = (8 << 20) + 512;
        let file = File::create(&path).unwrap();
        file.set_len(size).unwrap();
        file.write_all_at(&[7; 5000], 3 << 20).unwrap();
        file.write_all_at(&[9; 100], size - 100).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let got = image_digest(&path, size, 65536).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(got, ferry_proto::digest::of_bytes(65536, &bytes));
    }
}
