//! The one framing of Ferry's segment files: cache-svc's log and
//! processor-svc's replica blobs both store each body behind an 8-byte
//! header holding the body's length (`u32`) and its CRC-32C (`u32`), and
//! check the two before a body is used. This crate holds that header, its
//! checksum, and the decoding of a frame at the start of a buffer (whole,
//! torn, damaged, impossibly long); what a body means stays with each
//! service.
//!
//! The two services laid the header out differently before this crate
//! existed, and data directories hold those bytes, so both layouts stay,
//! named by [`Layout`]:
//!
//! - [`Layout::LOG`] (cache-svc): `len u32 LE | crc32c u32 LE | body`. A
//!   frame of length 0 carries only a checksum: the log's commit frame.
//! - [`Layout::BLOB`] (processor-svc): `crc32c u32 BE | len u32 BE | body`.
//!   The replica's index also keeps each blob's length and checksum, and a
//!   blob is read by its place, never scanned for.
//!
//! Unifying them would change bytes on disk (every existing log and replica
//! would have to be rewritten, or read both ways forever): what is shared is
//! the header's size and fields, the checksum, and the checks.

/// Bytes of a frame header.
pub const HEADER: usize = 8;

/// The checksum of a body (CRC-32C, Castagnoli).
pub fn checksum(body: &[u8]) -> u32 {
    crc32c::crc32c(body)
}

/// How a header's two fields are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Length first, then checksum, both little-endian.
    LenCrcLe,
    /// Checksum first, then length, both big-endian.
    CrcLenBe,
}

impl Layout {
    /// cache-svc's log frames.
    pub const LOG: Layout = Layout::LenCrcLe;
    /// processor-svc's replica blobs.
    pub const BLOB: Layout = Layout::CrcLenBe;
}

/// A frame header: the body's length and checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub crc: u32,
}

impl Header {
    /// The header of `body`. Bodies are at most `u32::MAX` bytes (callers
    /// refuse longer ones well before: see [`decode`]'s `max_body`).
    pub fn of(body: &[u8]) -> Header {
        Header {
            len: body.len() as u32,
            crc: checksum(body),
        }
    }

    /// Its bytes in `layout`.
    pub fn encode(&self, layout: Layout) -> [u8; HEADER] {
        let mut out = [0u8; HEADER];
        match layout {
            Layout::LenCrcLe => {
                out[..4].copy_from_slice(&self.len.to_le_bytes());
                out[4..].copy_from_slice(&self.crc.to_le_bytes());
            }
            Layout::CrcLenBe => {
                out[..4].copy_from_slice(&self.crc.to_be_bytes());
                out[4..].copy_from_slice(&self.len.to_be_bytes());
            }
        }
        out
    }

    /// The header in `bytes`, laid out as `layout`.
    pub fn decode(layout: Layout, bytes: &[u8; HEADER]) -> Header {
        let [a0, a1, a2, a3, b0, b1, b2, b3] = *bytes;
        let (a, b) = ([a0, a1, a2, a3], [b0, b1, b2, b3]);
        match layout {
            Layout::LenCrcLe => Header {
                len: u32::from_le_bytes(a),
                crc: u32::from_le_bytes(b),
            },
            Layout::CrcLenBe => Header {
                crc: u32::from_be_bytes(a),
                len: u32::from_be_bytes(b),
            },
        }
    }

    /// The header at the start of `buf`, if it holds one whole.
    pub fn read(layout: Layout, buf: &[u8]) -> Option<Header> {
        let bytes: &[u8; HEADER] = buf.get(..HEADER)?.try_into().ok()?;
        Some(Header::decode(layout, bytes))
    }

    /// Whether `body` is the body this header describes.
    pub fn matches(&self, body: &[u8]) -> bool {
        body.len() == self.len as usize && checksum(body) == self.crc
    }
}

/// Appends the frame of `body` (header, then body) to `out`.
pub fn encode(layout: Layout, body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&Header::of(body).encode(layout));
    out.extend_from_slice(body);
}

/// What the bytes at the start of a buffer hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame whose body matches its checksum; `size` is the frame's
    /// (header and body).
    Frame { body: &'a [u8], size: usize },
    /// A header of length 0 ([`HEADER`] bytes): a marker carrying only a
    /// checksum (the log's commit frame).
    Empty { crc: u32 },
    /// Not enough bytes for a whole frame (a torn tail, or read more).
    Incomplete,
    /// The length is larger than any body may be: a torn or damaged file.
    Oversize { len: usize },
    /// The body does not match its checksum.
    Mismatch,
}

/// Decodes the frame at the start of `buf`; bodies longer than `max_body`
/// are refused before anything past the header is looked at.
pub fn decode(layout: Layout, buf: &[u8], max_body: usize) -> Decoded<'_> {
    let Some(header) = Header::read(layout, buf) else {
        return Decoded::Incomplete;
    };
    let len = header.len as usize;
    if len == 0 {
        return Decoded::Empty { crc: header.crc };
    }
    if len > max_body {
        return Decoded::Oversize { len };
    }
    let Some(body) = buf.get(HEADER..HEADER + len) else {
        return Decoded::Incomplete;
    };
    if checksum(body) != header.crc {
        return Decoded::Mismatch;
    }
    Decoded::Frame {
        body,
        size: HEADER + len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;
    const LAYOUTS: [Layout; 2] = [Layout::LOG, Layout::BLOB];

    #[test]
    fn a_frame_decodes_to_its_body_in_both_layouts() {
        for layout in LAYOUTS {
            let mut buf = Vec::new();
            encode(layout, b"first body", &mut buf);
            encode(layout, b"second", &mut buf);
            let Decoded::Frame { body, size } = decode(layout, &buf, MAX) else {
                panic!("{layout:?}: a whole frame");
            };
            assert_eq!((body, size), (&b"first body"[..], HEADER + 10));
            assert_eq!(
                decode(layout, &buf[size..], MAX),
                Decoded::Frame {
                    body: b"second",
                    size: HEADER + 6
                }
            );
            let header = Header::read(layout, &buf).unwrap();
            assert_eq!(header, Header::of(b"first body"));
            assert!(header.matches(b"first body"));
            assert!(!header.matches(b"first bodY"));
        }
    }

    #[test]
    fn the_bytes_on_disk_are_the_ones_each_service_always_wrote() {
        let body = b"abc";
        let crc = checksum(body);
        assert_eq!(crc, 0x364b_3fb7, "CRC-32C");
        let mut log = Vec::new();
        encode(Layout::LOG, body, &mut log);
        let mut want = 3u32.to_le_bytes().to_vec();
        want.extend_from_slice(&crc.to_le_bytes());
        want.extend_from_slice(body);
        assert_eq!(log, want, "cache-svc: len LE | crc LE | body");
        let mut blob = Vec::new();
        encode(Layout::BLOB, body, &mut blob);
        let mut want = crc.to_be_bytes().to_vec();
        want.extend_from_slice(&3u32.to_be_bytes());
        want.extend_from_slice(body);
        assert_eq!(blob, want, "processor-svc: crc BE | len BE | body");
    }

    #[test]
    fn a_torn_tail_is_incomplete_not_damage() {
        for layout in LAYOUTS {
            let mut buf = Vec::new();
            encode(layout, &[7u8; 100], &mut buf);
            for cut in [0, 1, HEADER - 1, HEADER, HEADER + 99] {
                assert_eq!(
                    decode(layout, &buf[..cut], MAX),
                    Decoded::Incomplete,
                    "{layout:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        for layout in LAYOUTS {
            let mut buf = Vec::new();
            encode(layout, b"a body worth keeping", &mut buf);
            for at in 0..buf.len() {
                let mut damaged = buf.clone();
                damaged[at] ^= 0x40;
                let decoded = decode(layout, &damaged, MAX);
                assert!(
                    !matches!(decoded, Decoded::Frame { .. } | Decoded::Empty { .. }),
                    "{layout:?} byte {at}: {decoded:?}"
                );
            }
        }
    }

    #[test]
    fn an_impossible_length_is_refused_before_the_body_is_read() {
        for layout in LAYOUTS {
            let header = Header {
                len: MAX as u32 + 1,
                crc: 0,
            };
            assert_eq!(
                decode(layout, &header.encode(layout), MAX),
                Decoded::Oversize { len: MAX + 1 }
            );
            let header = Header { len: 0, crc: 42 };
            assert_eq!(
                decode(layout, &header.encode(layout), MAX),
                Decoded::Empty { crc: 42 }
            );
        }
    }
}
