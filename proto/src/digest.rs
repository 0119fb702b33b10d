//! The digest of a disk at a recovery point (processor.proto `DiskDigest`,
//! algorithm `ferry-disk-digest-v1`): SHA-256 over the tag, the chunk size
//! and the disk size (u64 little-endian), then the CRC-32C (u32
//! little-endian) of every chunk of the disk in order, the last one shorter
//! when the size is not a multiple of the chunk size, zeros where nothing was
//! written. processor-svc computes it from the checksums its index keeps
//! (never from the bytes it streams), failover-svc over the image it wrote:
//! two independent paths that must agree.

use sha2::{Digest, Sha256};

/// The algorithm's name, as `DiskDigest.algorithm` says it.
pub const ALGORITHM: &str = "ferry-disk-digest-v1";

/// The CRC-32C of `len` zero bytes.
pub fn zero_crc(len: u64) -> u32 {
    const STEP: usize = 64 * 1024;
    let zeros = [0u8; STEP];
    let mut crc = 0u32;
    let mut left = len;
    while left > 0 {
        let n = left.min(STEP as u64) as usize;
        crc = crc32c::crc32c_append(crc, &zeros[..n]);
        left -= n as u64;
    }
    crc
}

/// Builds a disk digest chunk by chunk.
pub struct DiskDigester {
    hasher: Sha256,
    chunk: u64,
    size: u64,
    next: u64,
    zero_full: u32,
}

impl DiskDigester {
    /// A digest of a disk of `size` bytes in chunks of `chunk_bytes` (> 0).
    pub fn new(chunk_bytes: u64, size: u64) -> DiskDigester {
        let chunk = chunk_bytes.max(1);
        let mut hasher = Sha256::new();
        hasher.update(ALGORITHM.as_bytes());
        hasher.update(chunk.to_le_bytes());
        hasher.update(size.to_le_bytes());
        DiskDigester {
            hasher,
            chunk,
            size,
            next: 0,
            zero_full: zero_crc(chunk.min(size)),
        }
    }

    /// How many chunks the disk has.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk)
    }

    /// The index of the next chunk to push.
    pub fn next_chunk(&self) -> u64 {
        self.next
    }

    /// The length of chunk `index`.
    pub fn chunk_len(&self, index: u64) -> u64 {
        let start = index.saturating_mul(self.chunk);
        self.chunk.min(self.size.saturating_sub(start))
    }

    /// The CRC-32C of the next chunk.
    pub fn push(&mut self, crc: u32) {
        self.hasher.update(crc.to_le_bytes());
        self.next += 1;
    }

    /// The next `n` chunks read as zeros.
    pub fn push_zeros(&mut self, n: u64) {
        let n = n.min(self.chunks().saturating_sub(self.next));
        for _ in 0..n {
            let len = self.chunk_len(self.next);
            let crc = if len == self.chunk {
                self.zero_full
            } else {
                zero_crc(len)
            };
            self.push(crc);
        }
    }

    /// The digest, once every chunk was pushed.
    pub fn finish(self) -> Result<[u8; 32], String> {
        if self.next != self.chunks() {
            return Err(format!(
                "{} of {} chunks digested",
                self.next,
                self.chunks()
            ));
        }
        Ok(self.hasher.finalize().into())
    }
}

/// Lower-case hex, as jobs report digests.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest of `bytes` as one whole disk.
pub fn of_bytes(chunk_bytes: u64, bytes: &[u8]) -> [u8; 32] {
    let mut d = DiskDigester::new(chunk_bytes, bytes.len() as u64);
    for c in bytes.chunks(chunk_bytes.max(1) as usize) {
        d.push(crc32c::crc32c(c));
    }
    // Every chunk was pushed.
    d.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_pushed_as_zeros_or_as_bytes_agree_and_sizes_matter() {
        for size in [0u64, 512, 65536, 65536 * 3 + 512] {
            let bytes = vec![0u8; size as usize];
            let mut d = DiskDigester::new(65536, size);
            d.push_zeros(u64::MAX);
            assert_eq!(d.finish().unwrap(), of_bytes(65536, &bytes), "{size}");
        }
        assert_ne!(of_bytes(65536, &[0; 1024]), of_bytes(65536, &[0; 1536]));
        assert_ne!(of_bytes(512, &[0; 1024]), of_bytes(1024, &[0; 1024]));
        let mut one = vec![0u8; 4096];
        one[4095] = 1;
        assert_ne!(of_bytes(1024, &one), of_bytes(1024, &[0; 4096]));
        let short = DiskDigester::new(1024, 4096);
        assert!(short.finish().is_err());
    }
}
