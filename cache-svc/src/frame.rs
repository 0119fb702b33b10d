//! The on-disk frame of one record: `len u32 LE | crc32c(body) u32 LE | body`,
//! body = the protobuf-encoded `Record`. The frame checksum guards the file;
//! the record's own checksum (docs/checksums.md) guards its contents end to end.
//!
//! Every appended batch ends with a commit frame: `0u32 | crc32c("commit" |
//! last sequence LE)`, written and fsynced with the batch. Everything before
//! a commit frame was durable before it was acknowledged; so at open, damage
//! before the last commit frame is acknowledged data damaged (reported,
//! never cut), and only what follows the last commit frame may be a torn
//! tail. (A record's body is never empty: its sequence is at least 1.)

use ferry_proto::cache::v1::Record;
use prost::Message;

/// Bytes of a frame header.
pub const HEADER: usize = 8;
/// The largest body a frame may hold; longer lengths mean a torn or damaged file.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// Appends the frame of `record` to `out`.
pub fn encode(record: &Record, out: &mut Vec<u8>) {
    let body = record.encode_to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
}

/// The checksum a commit frame after sequence `last` carries.
pub fn commit_crc(last: u64) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(b"commit"), &last.to_le_bytes())
}

/// Appends the commit frame of a batch ending at sequence `last`.
pub fn encode_commit(last: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&commit_crc(last).to_le_bytes());
}

/// What the bytes at the start of a buffer hold.
#[derive(Debug)]
pub enum Decoded {
    /// A whole, intact frame of this many bytes.
    Frame(Record, usize),
    /// A commit frame (HEADER bytes) carrying this checksum; it commits
    /// the records before it when it equals [`commit_crc`] of the last.
    Commit(u32),
    /// Not enough bytes for a whole frame (a torn tail, or read more).
    Incomplete,
    /// The bytes are not a valid frame.
    Invalid(String),
}

/// Decodes the frame at the start of `buf`.
pub fn decode(buf: &[u8]) -> Decoded {
    if buf.len() < HEADER {
        return Decoded::Incomplete;
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len == 0 {
        return Decoded::Commit(crc);
    }
    if len > MAX_BODY {
        return Decoded::Invalid(format!("frame length {len} is impossible"));
    }
    if buf.len() < HEADER + len {
        return Decoded::Incomplete;
    }
    let body = &buf[HEADER..HEADER + len];
    if crc32c::crc32c(body) != crc {
        return Decoded::Invalid("frame checksum mismatch".into());
    }
    match Record::decode(body) {
        Ok(record) => Decoded::Frame(record, HEADER + len),
        Err(e) => Decoded::Invalid(format!("frame body does not decode: {e}")),
    }
}
