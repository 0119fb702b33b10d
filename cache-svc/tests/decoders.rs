//! Property tests of what cache-svc decodes from its disk: the record frame
//! (`frame::decode`) and the segment scan at open (`VmLog::open`), over
//! arbitrary bytes and over valid segments with flipped bytes, truncations
//! and torn tails. None may panic; damage in acknowledged records is never
//! cut silently (docs/reliability.md): the log is refused and kept as it is.
//! Bounded for CI; `PROPTEST_CASES=100000` runs longer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::path::Path;

use cache_svc::error::CacheError;
use cache_svc::frame::{self, Decoded, HEADER};
use cache_svc::log::{self, segment_path, Cursor, SegmentMeta, VmLog};
use ferry_proto::cache::v1::record::Op;
use ferry_proto::cache::v1::{ChunkDigests, Marker, Record, WriteOp, ZeroOp};
use ferry_testkit::props;
use proptest::collection::vec;
use proptest::prelude::*;

fn op() -> impl Strategy<Value = Option<Op>> {
    prop_oneof![
        Just(None),
        (any::<u64>(), vec(any::<u8>(), 0..700)).prop_map(|(offset, data)| Some(Op::Write(
            WriteOp {
                offset,
                data: data.into(),
            }
        ))),
        (any::<u64>(), any::<u64>())
            .prop_map(|(offset, length)| Some(Op::Trim(ZeroOp { offset, length }))),
        (any::<u64>(), any::<u64>())
            .prop_map(|(offset, length)| Some(Op::WriteZeroes(ZeroOp { offset, length }))),
        (any::<i32>(), ".{0,12}", any::<u64>()).prop_map(|(kind, id, time_unix_nanos)| Some(
            Op::Marker(Marker {
                kind,
                id,
                time_unix_nanos,
            })
        )),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            vec(any::<u32>(), 0..6)
        )
            .prop_map(|(offset, chunk_bytes, length, crc32c)| Some(Op::Digests(
                ChunkDigests {
                    offset,
                    chunk_bytes,
                    length,
                    crc32c,
                }
            ))),
    ]
}

/// Any record at all, fields unchecked.
fn record() -> impl Strategy<Value = Record> {
    (any::<u64>(), ".{0,12}", op(), any::<u32>(), any::<u64>()).prop_map(
        |(sequence, disk_id, op, crc32c, captured_at_unix_nanos)| Record {
            sequence,
            disk_id,
            op,
            crc32c,
            captured_at_unix_nanos,
        },
    )
}

/// A sealed record as the cache stores it, of sequence `seq`.
fn stored(seq: u64, mut r: Record) -> Record {
    r.sequence = seq;
    ferry_proto::checksum::seal(&mut r);
    r
}

/// The frame of a body with a correct header, whatever the body holds.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Every record of the log, in order, through the reader tails use.
fn read_all(log: &VmLog) -> Result<Vec<Record>, CacheError> {
    read_segments(log.dir(), log.segments(), log.first_seq())
}

fn read_segments(
    dir: &Path,
    segments: &[SegmentMeta],
    from: u64,
) -> Result<Vec<Record>, CacheError> {
    let mut cursor = Cursor {
        next_seq: from,
        at: None,
    };
    let mut out = Vec::new();
    loop {
        let batch = log::read(dir, segments, &mut cursor, 64 * 1024)?;
        if batch.is_empty() {
            return Ok(out);
        }
        out.extend(batch);
    }
}

/// The bytes of every segment file under `dir`, by name.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// A log of `batches` (each a batch of records) appended through
/// `VmLog::append`; returns its directory, the records, the segments the
/// index would list as sealed, and the segments as the log saw them.
fn write_log(
    batches: &[Vec<Record>],
    segment_limit: u64,
) -> (
    tempfile::TempDir,
    Vec<Record>,
    Vec<SegmentMeta>,
    Vec<SegmentMeta>,
) {
    let dir = props::tempdir();
    let mut log = VmLog::open(dir.path(), vec![], 1, segment_limit).unwrap();
    let mut all = Vec::new();
    let mut sealed = Vec::new();
    for batch in batches {
        let batch: Vec<Record> = batch
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, r)| stored(all.len() as u64 + 1 + i as u64, r))
            .collect();
        sealed.extend(log.append(&batch).unwrap().sealed);
        all.extend(batch);
    }
    let segments = log.segments().to_vec();
    (dir, all, sealed, segments)
}

fn batches() -> impl Strategy<Value = Vec<Vec<Record>>> {
    vec(vec(record(), 1..4), 1..6)
}

/// What the segment scan sees in a file of arbitrary content: pieces that
/// are frames of records (with a sequence near the file's), commit frames
/// (right or wrong), framed junk, or junk.
#[derive(Debug, Clone)]
enum Piece {
    Record(u64, Record),
    Commit(u64),
    FramedJunk(Vec<u8>),
    Junk(Vec<u8>),
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        3 => (0u64..4, record()).prop_map(|(d, r)| Piece::Record(d, r)),
        2 => (0u64..4).prop_map(Piece::Commit),
        1 => vec(any::<u8>(), 0..64).prop_map(Piece::FramedJunk),
        1 => vec(any::<u8>(), 0..64).prop_map(Piece::Junk),
    ]
}

fn first_seq() -> impl Strategy<Value = u64> {
    prop_oneof![
        1u64..100,
        (u64::MAX - 8)..=u64::MAX,
        any::<u64>().prop_map(|s| s.max(1))
    ]
}

proptest! {
    #![proptest_config(props::config(1000))]

    #[test]
    fn a_frame_of_arbitrary_bytes_never_panics(bytes in vec(any::<u8>(), 0..256)) {
        match frame::decode(&bytes) {
            Decoded::Frame(_, used) => prop_assert!(used > HEADER && used <= bytes.len()),
            Decoded::Commit(_) => prop_assert!(bytes.len() >= HEADER),
            Decoded::Incomplete | Decoded::Invalid(_) => {}
        }
    }

    /// A body whose checksum is right but which is not a record, or not a
    /// sane one: decoded or refused, never a panic.
    #[test]
    fn a_checksummed_body_of_arbitrary_bytes_never_panics(body in vec(any::<u8>(), 1..256)) {
        let bytes = framed(&body);
        if let Decoded::Frame(_, used) = frame::decode(&bytes) {
            prop_assert_eq!(used, bytes.len());
        }
    }

    #[test]
    fn a_frame_round_trips_and_any_damage_or_cut_is_never_a_record(
        r in record(),
        trailing in vec(any::<u8>(), 0..16),
        at in any::<usize>(),
        mask in 1u8..,
        cut in any::<usize>(),
    ) {
        let mut bytes = Vec::new();
        frame::encode(&r, &mut bytes);
        let len = bytes.len();
        let mut with_tail = bytes.clone();
        with_tail.extend_from_slice(&trailing);
        match frame::decode(&with_tail) {
            Decoded::Frame(back, used) => {
                prop_assert_eq!(back, r.clone());
                prop_assert_eq!(used, len);
            }
            other => prop_assert!(false, "a valid frame decoded as {:?}", other),
        }

        let mut flipped = bytes.clone();
        let at = props::flip(&mut flipped, at, mask);
        if let Decoded::Frame(back, _) = frame::decode(&flipped) {
            prop_assert!(false, "byte {} flipped, yet decoded {:?}", at, back);
        }

        let cut = cut % len;
        prop_assert!(
            matches!(frame::decode(&bytes[..cut]), Decoded::Incomplete),
            "a frame cut at {} of {} is not incomplete", cut, len
        );
    }

    #[test]
    fn a_commit_frame_round_trips(last in any::<u64>()) {
        let mut bytes = Vec::new();
        frame::encode_commit(last, &mut bytes);
        prop_assert!(matches!(frame::decode(&bytes), Decoded::Commit(c) if c == frame::commit_crc(last)));
    }
}

proptest! {
    #![proptest_config(props::config(256))]

    /// A segment of anything at all: opening never panics; a log it opens
    /// reads back densely; a log it refuses is left as it was.
    #[test]
    fn a_segment_of_arbitrary_content_never_panics(
        first in first_seq(),
        pieces in vec(piece(), 0..8),
    ) {
        let dir = props::tempdir();
        let mut bytes = Vec::new();
        for p in pieces {
            match p {
                Piece::Record(d, r) => frame::encode(&stored(first.wrapping_add(d), r), &mut bytes),
                Piece::Commit(d) => frame::encode_commit(first.wrapping_add(d), &mut bytes),
                Piece::FramedJunk(j) => bytes.extend(framed(&j)),
                Piece::Junk(j) => bytes.extend(j),
            }
        }
        let path = segment_path(dir.path(), first);
        std::fs::write(&path, &bytes).unwrap();
        match VmLog::open(dir.path(), vec![], 1, 1 << 20) {
            Ok(log) => {
                let kept = std::fs::read(&path).unwrap();
                prop_assert_eq!(kept.len() as u64, log.size());
                prop_assert_eq!(&kept[..], &bytes[..kept.len()], "only a tail is ever cut");
                if log.last_seq() < u64::MAX {
                    let seqs: Vec<u64> = read_all(&log).unwrap().iter().map(|r| r.sequence).collect();
                    let want: Vec<u64> = (log.first_seq()..=log.last_seq()).collect();
                    prop_assert_eq!(seqs, want);
                }
            }
            Err(_) => prop_assert_eq!(std::fs::read(&path).unwrap(), bytes, "a refused log is kept"),
        }
    }

    /// One flipped byte anywhere in acknowledged records is refused, the
    /// segment kept as it was; only a flip in a segment's final commit
    /// frame (no record lost with it) opens, with every record intact.
    #[test]
    fn a_flipped_byte_in_acknowledged_records_is_refused_never_cut(
        batches in batches(),
        small_segments in any::<bool>(),
        which in any::<usize>(),
        at in any::<usize>(),
        mask in 1u8..,
    ) {
        let limit = if small_segments { 1024 } else { 1 << 20 };
        let (dir, all, _, segments) = write_log(&batches, limit);
        let seg = segments[which % segments.len()];
        let path = segment_path(dir.path(), seg.first_seq);
        let mut bytes = std::fs::read(&path).unwrap();
        prop_assume!(!bytes.is_empty());
        let at = props::flip(&mut bytes, at, mask);
        std::fs::write(&path, &bytes).unwrap();
        let before = files(dir.path());
        let in_final_commit = at >= bytes.len() - HEADER;
        match VmLog::open(dir.path(), vec![], 1, limit) {
            Ok(log) => {
                prop_assert!(in_final_commit, "byte {} of {} flipped, yet opened", at, bytes.len());
                prop_assert_eq!(read_all(&log).unwrap(), all);
            }
            Err(e) => {
                prop_assert!(!in_final_commit, "a flipped final commit frame refused: {}", e);
                prop_assert!(
                    matches!(e, CacheError::Damaged { .. } | CacheError::Corrupt(_)),
                    "{}", e
                );
                prop_assert_eq!(files(dir.path()), before, "a refused log is kept");
            }
        }
    }

    /// A flipped byte in a segment the index lists as sealed (never scanned
    /// at open) is caught by the reader: records come back exactly, or not
    /// at all.
    #[test]
    fn a_flipped_byte_in_a_sealed_segment_is_never_read_as_records(
        batches in vec(vec(record(), 1..4), 4..8),
        which in any::<usize>(),
        at in any::<usize>(),
        mask in 1u8..,
    ) {
        // A limit of one byte: every batch after the first rolls over.
        let (dir, all, sealed, _) = write_log(&batches, 1);
        let seg = sealed[which % sealed.len()];
        let path = segment_path(dir.path(), seg.first_seq);
        let mut bytes = std::fs::read(&path).unwrap();
        props::flip(&mut bytes, at, mask);
        std::fs::write(&path, &bytes).unwrap();
        let log = VmLog::open(dir.path(), sealed.clone(), 1, 1).unwrap();
        if let Ok(records) = read_all(&log) {
            prop_assert_eq!(records, all);
        }
    }

    /// A segment cut anywhere (a lost tail, a torn batch) opens with a
    /// prefix of its records holding every batch whose commit frame is
    /// before the cut, or is refused as damaged and kept (a false alarm);
    /// junk after the last commit frame (a torn batch) is cut.
    #[test]
    fn a_cut_or_torn_tail_loses_no_committed_batch(
        batches in batches(),
        cut in any::<usize>(),
        junk in vec(any::<u8>(), 1..200),
    ) {
        let (dir, all, _, segments) = write_log(&batches, 1 << 20);
        prop_assert_eq!(segments.len(), 1);
        let path = segment_path(dir.path(), 1);
        let bytes = std::fs::read(&path).unwrap();
        // Where each batch's commit frame ends, and its last sequence.
        let mut ends = Vec::new();
        let mut offset = 0;
        let mut seq = 0;
        for batch in &batches {
            for _ in batch {
                seq += 1;
                let mut f = Vec::new();
                frame::encode(&all[seq as usize - 1], &mut f);
                offset += f.len();
            }
            offset += HEADER;
            ends.push((offset, seq));
        }
        prop_assert_eq!(offset, bytes.len());

        let cut = cut % bytes.len();
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let committed = ends.iter().filter(|(end, _)| *end <= cut).map(|(_, s)| *s).max().unwrap_or(0);
        match VmLog::open(dir.path(), vec![], 1, 1 << 20) {
            Ok(log) => {
                let back = read_all(&log).unwrap();
                prop_assert!(back.len() as u64 >= committed, "{} records back, {} committed", back.len(), committed);
                prop_assert_eq!(&back[..], &all[..back.len()]);
            }
            Err(e) => {
                prop_assert!(matches!(e, CacheError::Damaged { .. }), "{}", e);
                prop_assert_eq!(std::fs::read(&path).unwrap(), &bytes[..cut]);
            }
        }
        drop(dir);

        // Junk after the last commit frame: a batch whose write was torn.
        let (dir, all, _, _) = write_log(&batches, 1 << 20);
        let path = segment_path(dir.path(), 1);
        let mut torn = std::fs::read(&path).unwrap();
        let len = torn.len();
        torn.extend_from_slice(&junk);
        std::fs::write(&path, &torn).unwrap();
        let log = VmLog::open(dir.path(), vec![], 1, 1 << 20);
        prop_assert!(log.is_ok(), "{:?}", log.err());
        prop_assert_eq!(read_all(&log.unwrap()).unwrap(), all);
        prop_assert_eq!(std::fs::metadata(&path).unwrap().len(), len as u64);
    }
}

/// Regressions the properties found: segment files named near u64::MAX
/// overflowed the scan's sequence arithmetic (a panic in debug builds).
#[test]
fn a_record_after_the_last_sequence_is_corrupt_not_an_overflow() {
    let dir = props::tempdir();
    let mut bytes = Vec::new();
    frame::encode(&stored(u64::MAX, Record::default()), &mut bytes);
    frame::encode(&stored(1, Record::default()), &mut bytes);
    std::fs::write(segment_path(dir.path(), u64::MAX), &bytes).unwrap();
    assert!(matches!(
        VmLog::open(dir.path(), vec![], 1, 1 << 20),
        Err(CacheError::Corrupt(_))
    ));
}

#[test]
fn commit_frame_candidates_past_the_last_sequence_never_overflow() {
    // Damage, then what may be the final batch's commit frame, whose
    // candidate sequences would run past u64::MAX.
    let dir = props::tempdir();
    let mut bytes = framed(&[0xff]);
    bytes[4] ^= 1;
    frame::encode_commit(7, &mut bytes);
    std::fs::write(segment_path(dir.path(), u64::MAX), &bytes).unwrap();
    let log = VmLog::open(dir.path(), vec![], 1, 1 << 20).unwrap();
    assert_eq!(log.size(), 0, "a torn tail, cut");
}

#[test]
fn a_segment_after_one_ending_at_the_last_sequence_is_corrupt_not_an_overflow() {
    let dir = props::tempdir();
    let mut bytes = Vec::new();
    frame::encode(&stored(u64::MAX - 1, Record::default()), &mut bytes);
    frame::encode(&stored(u64::MAX, Record::default()), &mut bytes);
    frame::encode_commit(u64::MAX, &mut bytes);
    std::fs::write(segment_path(dir.path(), u64::MAX - 1), &bytes).unwrap();
    std::fs::write(segment_path(dir.path(), u64::MAX), b"").unwrap();
    assert!(matches!(
        VmLog::open(dir.path(), vec![], 1, 1 << 20),
        Err(CacheError::Corrupt(_))
    ));
}
