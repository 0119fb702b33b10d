//! The index's key encodings (and its JSON values): every key starts with
//! one letter naming its kind, numbers big-endian so that keys sort as the
//! scans need (a chunk's versions in order, an interval's chunks together,
//! a segment's blobs by offset).

use serde::{Deserialize, Serialize};

use super::Result;
use crate::error::ProcessorError;

pub(super) fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

pub(super) fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

pub(super) fn disk_part(out: &mut Vec<u8>, disk: &str) {
    out.push(disk.len().min(255) as u8);
    out.extend_from_slice(&disk.as_bytes()[..disk.len().min(255)]);
}

pub(super) fn vkey(disk: &str, chunk: u64, version: u64) -> Vec<u8> {
    let mut k = vec![b'v'];
    disk_part(&mut k, disk);
    k.extend_from_slice(&chunk.to_be_bytes());
    k.extend_from_slice(&version.to_be_bytes());
    k
}

pub(super) fn vkey_parts(k: &[u8]) -> Result<(String, u64, u64)> {
    let bad = || ProcessorError::Corrupt("version key".into());
    let len = *k.get(1).ok_or_else(bad)? as usize;
    if k.len() != 2 + len + 16 {
        return Err(bad());
    }
    let disk = String::from_utf8(k[2..2 + len].to_vec()).map_err(|_| bad())?;
    Ok((disk, be64(&k[2 + len..]), be64(&k[2 + len + 8..])))
}

/// Checked like [`vkey_parts`]: a damaged key is an error, not a panic.
pub(super) fn gkey_parts(k: &[u8]) -> Result<(u64, String, u64)> {
    let bad = || ProcessorError::Corrupt("interval key".into());
    let len = *k.get(9).ok_or_else(bad)? as usize;
    if k.len() != 10 + len + 8 {
        return Err(bad());
    }
    let disk = String::from_utf8(k[10..10 + len].to_vec()).map_err(|_| bad())?;
    Ok((be64(&k[1..9]), disk, be64(&k[10 + len..])))
}

pub(super) fn gkey(version: u64, disk: &str, chunk: u64) -> Vec<u8> {
    let mut k = vec![b'g'];
    k.extend_from_slice(&version.to_be_bytes());
    disk_part(&mut k, disk);
    k.extend_from_slice(&chunk.to_be_bytes());
    k
}

pub(super) fn rkey(seg: u64, off: u64) -> Vec<u8> {
    let mut k = vec![b'r'];
    k.extend_from_slice(&seg.to_be_bytes());
    k.extend_from_slice(&off.to_be_bytes());
    k
}

pub(super) fn skey(seg: u64) -> Vec<u8> {
    let mut k = vec![b's'];
    k.extend_from_slice(&seg.to_be_bytes());
    k
}

pub(super) fn pkey(interval: u64) -> Vec<u8> {
    let mut k = vec![b'p'];
    k.extend_from_slice(&interval.to_be_bytes());
    k
}

pub(super) const META: &[u8] = b"m";

pub(super) fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| ProcessorError::Corrupt(e.to_string()))
}

pub(super) fn unjson<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| ProcessorError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_keys_round_trip_and_sort_by_disk_then_chunk_then_version() {
        let mut keys = Vec::new();
        for disk in ["a", "os", "os2", "b"] {
            for chunk in [0, 1, 255, 256, 1 << 40] {
                for version in [0, 1, 2, 255, 256, u64::MAX] {
                    let k = vkey(disk, chunk, version);
                    assert_eq!(vkey_parts(&k).unwrap(), (disk.into(), chunk, version));
                    keys.push(((disk.len(), disk), chunk, version, k));
                }
            }
        }
        // The byte order is the (disk, chunk, version) order, a disk's keys
        // together: the newest version `<= g` of a chunk is the last key of
        // `vkey(d, c, 0)..=vkey(d, c, g)`.
        let mut by_bytes = keys.clone();
        by_bytes.sort_by(|a, b| a.3.cmp(&b.3));
        keys.sort();
        assert_eq!(by_bytes, keys);
    }

    #[test]
    fn interval_keys_round_trip_and_hold_an_intervals_chunks_together() {
        let mut keys = Vec::new();
        for version in [1, 2, 256, u64::MAX - 1] {
            for disk in ["os", "data"] {
                for chunk in [0, 7, 1 << 33] {
                    let k = gkey(version, disk, chunk);
                    assert_eq!(gkey_parts(&k).unwrap(), (version, disk.into(), chunk));
                    keys.push(k);
                }
            }
        }
        // Pruning scans `gkey(from, "", 0)..gkey(to + 1, "", 0)` for the
        // versions of intervals `from..=to`, whatever disk.
        for (from, to) in [(1, 1), (2, 256), (1, u64::MAX - 1)] {
            let range = gkey(from, "", 0)..gkey(to + 1, "", 0);
            for k in &keys {
                let (v, _, _) = gkey_parts(k).unwrap();
                assert_eq!(range.contains(k), (from..=to).contains(&v), "{v}");
            }
        }
    }

    #[test]
    fn blob_segment_and_point_keys_sort_by_their_numbers() {
        let pairs = [(1u64, 0u64), (1, 8), (1, 256), (2, 0), (256, 1)];
        for w in pairs.windows(2) {
            assert!(rkey(w[0].0, w[0].1) < rkey(w[1].0, w[1].1));
        }
        // Compaction scans a segment's blobs by its prefix.
        assert!(rkey(1, u64::MAX).starts_with(&rkey(1, 0)[..9]));
        assert!(!rkey(2, 0).starts_with(&rkey(1, 0)[..9]));
        for n in [(0u64, 1u64), (255, 256), (1 << 32, u64::MAX)] {
            assert!(skey(n.0) < skey(n.1));
            assert!(pkey(n.0) < pkey(n.1));
            assert_eq!(be64(&skey(n.1)[1..]), n.1);
        }
    }

    #[test]
    fn a_damaged_key_is_corrupt_not_a_panic() {
        for k in [&b""[..], b"v", b"v\x05os", &vkey("os", 1, 2)[..19]] {
            assert!(matches!(vkey_parts(k), Err(ProcessorError::Corrupt(_))));
        }
        for k in [&b"g"[..], &gkey(1, "os", 2)[..12]] {
            assert!(matches!(gkey_parts(k), Err(ProcessorError::Corrupt(_))));
        }
    }
}
