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
