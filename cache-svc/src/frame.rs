//! The on-disk frame of one record: `len u32 LE | crc32c(body) u32 LE | body`
//! (`ferry_segment`'s [`Layout::LOG`]), body = the protobuf-encoded `Record`.
//! The frame checksum guards the file; the record's own checksum
//! (docs/checksums.md) guards its contents end to end.
//!
//! Every appended batch ends with a commit frame: `0u32 | crc32c("commit" |
//! last sequence LE)`, written and fsynced with the batch. Everything before
//! a commit frame was durable before it was acknowledged; so at open, damage
//! before the last commit frame is acknowledged data damaged (reported,
//! never cut), and only what follows the last commit frame may be a torn
//! tail. (A record's body is never empty: its sequence is at least 1.)

use ferry_proto::cache::v1::Record;
use ferry_segment::{Header, Layout};
use prost::Message;

/// Bytes of a frame header.
pub const HEADER: usize = ferry_segment::HEADER;
/// The largest body a frame may hold; longer lengths mean a torn or damaged file.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// Appends the frame of `record` to `out`.
pub fn encode(record: &Record, out: &mut Vec<u8>) {
    ferry_segment::encode(Layout::LOG, &record.encode_to_vec(), out);
}

/// The checksum a commit frame after sequence `last` carries.
pub fn commit_crc(last: u64) -> u32 {
    crc32c::crc32c_append(ferry_segment::checksum(b"commit"), &last.to_le_bytes())
}

/// Appends the commit frame of a batch ending at sequence `last`.
pub fn encode_commit(last: u64, out: &mut Vec<u8>) {
    let header = Header {
        len: 0,
        crc: commit_crc(last),
    };
    out.extend_from_slice(&header.encode(Layout::LOG));
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
    match ferry_segment::decode(Layout::LOG, buf, MAX_BODY) {
        ferry_segment::Decoded::Frame { body, size } => match Record::decode(body) {
            Ok(record) => Decoded::Frame(record, size),
            Err(e) => Decoded::Invalid(format!("frame body does not decode: {e}")),
        },
        ferry_segment::Decoded::Empty { crc } => Decoded::Commit(crc),
        ferry_segment::Decoded::Incomplete => Decoded::Incomplete,
        ferry_segment::Decoded::Oversize { len } => {
            Decoded::Invalid(format!("frame length {len} is impossible"))
        }
        ferry_segment::Decoded::Mismatch => Decoded::Invalid("frame checksum mismatch".into()),
    }
}
