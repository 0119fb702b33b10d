//! One VM's durable log: append-only segment files of framed records, named
//! by their first sequence (`00000000000000000001.seg`). Appends are written
//! and fsynced before they count; segments roll at a size limit; whole
//! segments below the processor's applied sequence are deleted.
//!
//! The index of sealed segments lives in sled (the caller persists what
//! [`VmLog::append`] and [`VmLog::trim`] report); any segment file the index
//! does not list as sealed is scanned at open, and a torn final record is cut
//! off, so the log holds exactly what was acknowledged.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ferry_proto::cache::v1::Record;
use ferry_runtime::Refused;
use serde::{Deserialize, Serialize};

use crate::error::CacheError;
use crate::frame::{self, Decoded, HEADER};

/// One segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentMeta {
    /// The sequence of its first record (also its file name).
    pub first_seq: u64,
    /// The sequence of its last record; `first_seq - 1` while empty.
    pub last_seq: u64,
    /// Bytes of whole frames in it.
    pub len: u64,
}

impl SegmentMeta {
    fn empty(first_seq: u64) -> Self {
        SegmentMeta {
            first_seq,
            last_seq: first_seq.saturating_sub(1),
            len: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The path of the segment starting at `first_seq` under `dir`.
pub fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.seg"))
}

/// A VM's log, open for appending.
pub struct VmLog {
    dir: PathBuf,
    /// All segments, oldest first; the last is the active one.
    segments: Vec<SegmentMeta>,
    active: File,
    segment_limit: u64,
    /// Set when a failed write could not be undone: no more appends.
    broken: Option<String>,
}

/// What an append did to the segment index.
#[derive(Debug, Default)]
pub struct Appended {
    /// A segment sealed by rolling over; persist it.
    pub sealed: Option<SegmentMeta>,
}

fn sync_dir(dir: &Path) -> Result<(), CacheError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CacheError::io(dir, e))
}

fn create_segment(dir: &Path, first_seq: u64) -> Result<File, CacheError> {
    let path = segment_path(dir, first_seq);
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| CacheError::io(&path, e))?;
    sync_dir(dir)?;
    Ok(file)
}

impl VmLog {
    /// Opens the log under `dir` (created if missing). `sealed` lists the
    /// segments the index knows to be sealed; every other segment file is
    /// scanned and its torn tail, if any, truncated. `start_seq` is where an
    /// empty log begins.
    pub fn open(
        dir: &Path,
        mut sealed: Vec<SegmentMeta>,
        start_seq: u64,
        segment_limit: u64,
    ) -> Result<VmLog, CacheError> {
        ferry_runtime::durable::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
        let mut files: Vec<u64> = std::fs::read_dir(dir)
            .map_err(|e| CacheError::io(dir, e))?
            .filter_map(|entry| {
                let name = entry.ok()?.file_name();
                name.to_str()?.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        files.sort_unstable();
        sealed.sort_by_key(|s| s.first_seq);
        // Sealed segments whose files are gone were trimmed before a crash
        // could update the index.
        sealed.retain(|s| files.binary_search(&s.first_seq).is_ok());

        let mut segments = sealed.clone();
        for first in files {
            if sealed.iter().any(|s| s.first_seq == first) {
                continue;
            }
            let meta = scan_and_repair(dir, first)?;
            if let Some(prev) = segments.last() {
                if prev.last_seq.checked_add(1) != Some(meta.first_seq) {
                    return Err(CacheError::Corrupt(format!(
                        "{}: segment {} does not follow sequence {}",
                        dir.display(),
                        meta.first_seq,
                        prev.last_seq
                    )));
                }
            }
            segments.push(meta);
        }
        if segments.is_empty() {
            segments.push(SegmentMeta::empty(start_seq.max(1)));
        }
        let active_first = segments.last().map(|s| s.first_seq).unwrap_or(1);
        let active = create_segment(dir, active_first)?;
        Ok(VmLog {
            dir: dir.to_path_buf(),
            segments,
            active,
            segment_limit,
            broken: None,
        })
    }

    /// The highest durable sequence (0 if none was ever written).
    pub fn last_seq(&self) -> u64 {
        self.segments.last().map(|s| s.last_seq).unwrap_or(0)
    }

    /// The lowest retained sequence.
    pub fn first_seq(&self) -> u64 {
        self.segments.first().map(|s| s.first_seq).unwrap_or(1)
    }

    /// Bytes on disk.
    pub fn size(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// The segments, oldest first (the last is active).
    pub fn segments(&self) -> &[SegmentMeta] {
        &self.segments
    }

    /// The directory of the segment files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends records whose sequences continue the log without a gap, and
    /// returns once they are on disk (fsynced). On failure nothing of them
    /// remains in the log.
    pub fn append(&mut self, records: &[Record]) -> Result<Appended, CacheError> {
        if let Some(why) = &self.broken {
            return Err(CacheError::Corrupt(why.clone()));
        }
        let Some(first) = records.first() else {
            return Ok(Appended::default());
        };
        let mut expected = self.last_seq() + 1;
        if first.sequence != expected {
            return Err(Refused::aborted(format!(
                "record {} does not follow the log's last sequence {}",
                first.sequence,
                self.last_seq()
            ))
            .into());
        }
        let mut buf = Vec::new();
        for r in records {
            if r.sequence != expected {
                return Err(Refused::aborted(format!(
                    "record {} leaves a gap after {}",
                    r.sequence,
                    expected - 1
                ))
                .into());
            }
            frame::encode(r, &mut buf);
            expected += 1;
        }
        frame::encode_commit(expected - 1, &mut buf);

        let mut appended = Appended::default();
        let active = *self.active_meta();
        if !active.is_empty() && active.len + buf.len() as u64 > self.segment_limit {
            appended.sealed = Some(active);
            let next = active.last_seq + 1;
            self.active = create_segment(&self.dir, next)?;
            self.segments.push(SegmentMeta::empty(next));
        }

        let path = segment_path(&self.dir, self.active_meta().first_seq);
        let old_len = self.active_meta().len;
        let written = self
            .active
            .write_all(&buf)
            .and_then(|_| self.active.sync_data());
        if let Err(e) = written {
            // Undo a partial write so that the next append does not follow garbage.
            if let Err(undo) = self
                .active
                .set_len(old_len)
                .and_then(|_| self.active.sync_data())
            {
                self.broken = Some(format!(
                    "{}: a failed append could not be undone: {undo}",
                    path.display()
                ));
            }
            return Err(CacheError::io(&path, e));
        }
        let meta = self.active_meta_mut();
        meta.len += buf.len() as u64;
        meta.last_seq = expected - 1;
        Ok(appended)
    }

    fn active_meta(&self) -> &SegmentMeta {
        // `open` always leaves at least one segment.
        &self.segments[self.segments.len() - 1]
    }

    fn active_meta_mut(&mut self) -> &mut SegmentMeta {
        let last = self.segments.len() - 1;
        &mut self.segments[last]
    }

    /// Deletes every segment and starts the log again, empty, at
    /// `first_seq` (a new incarnation, or numbering moved past a loss).
    /// The caller has recorded the restart durably first, so a crash part
    /// way is finished at the next open.
    pub fn restart(&mut self, first_seq: u64) -> Result<(), CacheError> {
        remove_segments(&self.dir)?;
        let first_seq = first_seq.max(1);
        self.active = create_segment(&self.dir, first_seq)?;
        self.segments = vec![SegmentMeta::empty(first_seq)];
        self.broken = None;
        Ok(())
    }

    /// Deletes every sealed segment whose records are all `<= applied`, and
    /// returns what was deleted. The active segment is never deleted.
    pub fn trim(&mut self, applied: u64) -> Result<Vec<SegmentMeta>, CacheError> {
        let mut removed = Vec::new();
        while self.segments.len() > 1 && self.segments[0].last_seq <= applied {
            let seg = self.segments.remove(0);
            let path = segment_path(&self.dir, seg.first_seq);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    self.segments.insert(0, seg);
                    return Err(CacheError::io(&path, e));
                }
            }
            removed.push(seg);
        }
        if !removed.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }
}

/// Deletes every segment file under `dir` (a missing `dir` has none); the
/// directory entries are synced by whoever creates the next segment.
pub fn remove_segments(dir: &Path) -> Result<(), CacheError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CacheError::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| CacheError::io(dir, e))?;
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.ends_with(".seg")) {
            let path = entry.path();
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CacheError::io(&path, e)),
            }
        }
    }
    Ok(())
}

/// Reads a whole segment and returns its metadata. Damage after its last
/// commit frame is a torn tail (a batch whose fsync never finished, so never
/// acknowledged) and is cut off; damage before it is acknowledged data
/// damaged: [`CacheError::Damaged`], the file left as it is.
fn scan_and_repair(dir: &Path, first_seq: u64) -> Result<SegmentMeta, CacheError> {
    let path = segment_path(dir, first_seq);
    let bytes = std::fs::read(&path).map_err(|e| CacheError::io(&path, e))?;
    let mut meta = SegmentMeta::empty(first_seq);
    let mut offset = 0usize;
    let mut damage = None;
    while offset < bytes.len() {
        match frame::decode(&bytes[offset..]) {
            Decoded::Frame(record, used) => {
                // Checked: a file named near u64::MAX must not overflow.
                if meta.last_seq.checked_add(1) != Some(record.sequence) {
                    return Err(CacheError::Corrupt(format!(
                        "{}: record {} follows {}",
                        path.display(),
                        record.sequence,
                        meta.last_seq
                    )));
                }
                meta.last_seq = record.sequence;
                offset += used;
            }
            Decoded::Commit(crc) if crc == frame::commit_crc(meta.last_seq) => offset += HEADER,
            Decoded::Commit(_) => {
                damage = Some("a commit frame does not match its batch".to_string());
                break;
            }
            Decoded::Incomplete => break,
            Decoded::Invalid(why) => {
                damage = Some(why);
                break;
            }
        }
    }
    if offset < bytes.len() && committed_after(&bytes, offset, meta.last_seq) {
        return Err(CacheError::Damaged {
            segment: path.display().to_string(),
            offset: offset as u64,
            after_sequence: meta.last_seq,
            why: damage.unwrap_or_else(|| "a frame is cut short".into()),
        });
    }
    meta.len = offset as u64;
    if offset < bytes.len() {
        tracing::warn!(
            segment = %path.display(),
            dropped = bytes.len() - offset,
            "truncating a torn final batch (never acknowledged)"
        );
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| CacheError::io(&path, e))?;
        file.set_len(meta.len)
            .and_then(|_| file.sync_all())
            .map_err(|e| CacheError::io(&path, e))?;
    }
    Ok(meta)
}

/// Whether an intact record frame of a later sequence follows the damage
/// at `from`: then the damage is inside acknowledged data, not a torn tail
/// (a torn tail is one batch whose write did not finish). Searched byte by
/// byte, since the damage may hide where the next frame starts; a position
/// is checksummed only when its header fits and its body starts with a
/// sequence just above `after` (field 1, the first prost writes).
fn committed_after(bytes: &[u8], from: usize, after: u64) -> bool {
    let mut at = from + 1;
    while at + HEADER + 2 <= bytes.len() {
        let len =
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let fits = len > 0 && at + HEADER + len <= bytes.len() && bytes[at + HEADER] == 0x08;
        if fits {
            let plausible = varint(&bytes[at + HEADER + 1..])
                .is_some_and(|seq| seq > after && seq <= after.saturating_add(1 << 24));
            if plausible && matches!(frame::decode(&bytes[at..]), Decoded::Frame(..)) {
                return true;
            }
        }
        at += 1;
    }
    // The damage is in the final batch, and that batch's commit frame made
    // it to disk: it was fsynced whole, so it was acknowledged.
    let tail = bytes.len().saturating_sub(HEADER);
    tail > from
        && bytes[tail..tail + 4] == [0, 0, 0, 0]
        && (1..=MAX_BATCH_RECORDS).any(|k| {
            let crc = u32::from_le_bytes([
                bytes[tail + 4],
                bytes[tail + 5],
                bytes[tail + 6],
                bytes[tail + 7],
            ]);
            after.checked_add(k).map(frame::commit_crc) == Some(crc)
        })
}

/// The most records one batch may hold, as far as recognising its commit
/// frame after damage is concerned.
const MAX_BATCH_RECORDS: u64 = 1 << 16;

/// A protobuf varint at the start of `b`.
fn varint(b: &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, byte) in b.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// A reader's position in a log.
#[derive(Debug, Clone)]
pub struct Cursor {
    /// The next sequence wanted.
    pub next_seq: u64,
    /// The segment being read and the byte offset of `next_seq`'s frame in
    /// it, once known.
    pub at: Option<(u64, u64)>,
}

/// Reads records from `cursor.next_seq` on, up to about `max_bytes` of
/// payload, from the given (snapshot of the) segments, never beyond what is
/// durable. Advances the cursor.
pub fn read(
    dir: &Path,
    segments: &[SegmentMeta],
    cursor: &mut Cursor,
    max_bytes: usize,
) -> Result<Vec<Record>, CacheError> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    loop {
        let Some(seg) = segments
            .iter()
            .find(|s| s.first_seq <= cursor.next_seq && cursor.next_seq <= s.last_seq)
        else {
            return Ok(out);
        };
        let (mut offset, skip) = match cursor.at {
            Some((first, offset)) if first == seg.first_seq => (offset, false),
            _ => (0, true),
        };
        let path = segment_path(dir, seg.first_seq);
        let mut file = File::open(&path).map_err(|e| CacheError::io(&path, e))?;
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| CacheError::io(&path, e))?;
        let mut reader = std::io::BufReader::with_capacity(256 * 1024, file);
        let mut header = [0u8; HEADER];
        while offset < seg.len {
            reader
                .read_exact(&mut header)
                .map_err(|e| CacheError::io(&path, e))?;
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
            if len > frame::MAX_BODY {
                return Err(CacheError::Corrupt(format!(
                    "{}: bad frame length",
                    path.display()
                )));
            }
            let mut whole = Vec::with_capacity(HEADER + len);
            whole.extend_from_slice(&header);
            whole.resize(HEADER + len, 0);
            reader
                .read_exact(&mut whole[HEADER..])
                .map_err(|e| CacheError::io(&path, e))?;
            let record = match frame::decode(&whole) {
                Decoded::Frame(record, _) => record,
                Decoded::Commit(_) => {
                    offset += HEADER as u64;
                    continue;
                }
                Decoded::Incomplete | Decoded::Invalid(_) => {
                    return Err(CacheError::Corrupt(format!(
                        "{}: damaged frame at byte {offset}",
                        path.display()
                    )))
                }
            };
            offset += whole.len() as u64;
            if skip && record.sequence < cursor.next_seq {
                continue;
            }
            if record.sequence != cursor.next_seq {
                return Err(CacheError::Corrupt(format!(
                    "{}: found record {} where {} belongs",
                    path.display(),
                    record.sequence,
                    cursor.next_seq
                )));
            }
            if !out.is_empty() && bytes + whole.len() > max_bytes {
                // Leave it for the next batch; the cursor still points at it.
                return Ok(out);
            }
            bytes += whole.len();
            cursor.next_seq += 1;
            cursor.at = Some((seg.first_seq, offset));
            out.push(record);
            if bytes >= max_bytes {
                return Ok(out);
            }
        }
        // Read as far as it is durable. The cursor keeps its place: a tail
        // that caught up goes on from here when more is durable, rather
        // than reading the segment again from its start to skip what it
        // sent (which made a following tail read O(segment) per batch).
        if cursor.next_seq <= seg.last_seq {
            return Err(CacheError::Corrupt(format!(
                "{}: ends before record {}",
                path.display(),
                cursor.next_seq
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::cache::v1::{record::Op, WriteOp};
    use ferry_runtime::Refusal;

    fn rec(seq: u64, size: usize) -> Record {
        let mut r = Record {
            sequence: seq,
            disk_id: "os".into(),
            op: Some(Op::Write(WriteOp {
                offset: seq * 512,
                data: vec![seq as u8; size].into(),
            })),
            crc32c: 0,
            captured_at_unix_nanos: seq,
        };
        ferry_proto::checksum::seal(&mut r);
        r
    }

    fn read_all(log: &VmLog, from: u64) -> Vec<u64> {
        let mut cursor = Cursor {
            next_seq: from,
            at: None,
        };
        let mut seqs = Vec::new();
        loop {
            let batch = read(log.dir(), log.segments(), &mut cursor, 4096).unwrap();
            if batch.is_empty() {
                return seqs;
            }
            seqs.extend(batch.iter().map(|r| r.sequence));
        }
    }

    #[test]
    fn appends_roll_read_and_trim() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = VmLog::open(dir.path(), vec![], 1, 8 * 1024).unwrap();
        let mut sealed = Vec::new();
        for s in 1..=40 {
            let a = log.append(&[rec(s, 512)]).unwrap();
            sealed.extend(a.sealed);
        }
        assert_eq!(log.last_seq(), 40);
        assert!(log.segments().len() > 2, "rolled: {:?}", log.segments());
        assert_eq!(read_all(&log, 1), (1..=40).collect::<Vec<_>>());
        assert_eq!(read_all(&log, 17), (17..=40).collect::<Vec<_>>());

        // A gap or a replay is refused and changes nothing.
        assert!(matches!(
            log.append(&[rec(42, 512)]),
            Err(CacheError::Refused(Refused {
                kind: Refusal::Aborted,
                ..
            }))
        ));
        assert!(log.append(&[rec(41, 512), rec(43, 512)]).is_err());
        assert_eq!(log.last_seq(), 40);

        let removed = log.trim(20).unwrap();
        assert!(!removed.is_empty());
        assert!(removed.iter().all(|s| s.last_seq <= 20));
        assert!(log.first_seq() <= 21);
        assert_eq!(read_all(&log, log.first_seq()).last(), Some(&40));

        // Reopen with the sealed index: the same log, appendable.
        for r in &removed {
            sealed.retain(|s| s.first_seq != r.first_seq);
        }
        drop(log);
        let mut log = VmLog::open(dir.path(), sealed, 1, 8 * 1024).unwrap();
        assert_eq!(log.last_seq(), 40);
        log.append(&[rec(41, 512)]).unwrap();
        assert_eq!(read_all(&log, 38), vec![38, 39, 40, 41]);
    }

    /// Flips one byte of the segment file at `at`.
    fn flip(path: &Path, at: u64) {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[at as usize] ^= 0x20;
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_flipped_byte_in_acknowledged_records_is_reported_and_nothing_is_cut() {
        for (name, victim) in [("in the middle", 2u64), ("in the final batch", 3u64)] {
            let dir = tempfile::tempdir().unwrap();
            let mut log = VmLog::open(dir.path(), vec![], 1, 1 << 20).unwrap();
            let mut ends = Vec::new();
            for s in 1..=3 {
                log.append(&[rec(s, 1024)]).unwrap();
                ends.push(log.segments()[0].len);
            }
            drop(log);
            let path = segment_path(dir.path(), 1);
            let len = std::fs::metadata(&path).unwrap().len();
            // A byte inside the victim record's data.
            let start = if victim == 1 {
                0
            } else {
                ends[victim as usize - 2]
            };
            flip(&path, start + 600);
            match VmLog::open(dir.path(), vec![], 1, 1 << 20) {
                Err(CacheError::Damaged {
                    offset,
                    after_sequence,
                    ..
                }) => {
                    assert_eq!(offset, start, "{name}");
                    assert_eq!(after_sequence, victim - 1, "{name}");
                }
                Err(e) => panic!("{name}: {e}"),
                Ok(log) => panic!("{name}: opened with last {}", log.last_seq()),
            }
            assert_eq!(std::fs::metadata(&path).unwrap().len(), len, "{name}: kept");
        }
    }

    #[test]
    fn a_tail_that_caught_up_goes_on_from_its_place_not_from_the_segment_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = VmLog::open(dir.path(), vec![], 1, 1 << 20).unwrap();
        log.append(&[rec(1, 1024), rec(2, 1024)]).unwrap();
        let mut cursor = Cursor {
            next_seq: 1,
            at: None,
        };
        let first = read(log.dir(), log.segments(), &mut cursor, 1 << 20).unwrap();
        assert_eq!(first.len(), 2);
        // What was sent is not read again: a byte flipped there now would
        // fail any read from the segment's start.
        flip(&segment_path(dir.path(), 1), 600);
        log.append(&[rec(3, 1024)]).unwrap();
        let next = read(log.dir(), log.segments(), &mut cursor, 1 << 20).unwrap();
        assert_eq!(next.iter().map(|r| r.sequence).collect::<Vec<_>>(), vec![3]);
        assert_eq!(cursor.next_seq, 4);
    }

    #[test]
    fn a_torn_tail_is_cut_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = VmLog::open(dir.path(), vec![], 1, 1 << 20).unwrap();
        log.append(&[rec(1, 1024), rec(2, 1024)]).unwrap();
        let len = log.segments()[0].len;
        drop(log);
        // Half a frame of record 3 after the acknowledged ones.
        let mut partial = Vec::new();
        frame::encode(&rec(3, 1024), &mut partial);
        let path = segment_path(dir.path(), 1);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&partial[..partial.len() / 2]).unwrap();
        drop(f);

        let mut log = VmLog::open(dir.path(), vec![], 1, 1 << 20).unwrap();
        assert_eq!(log.last_seq(), 2);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        log.append(&[rec(3, 1024)]).unwrap();
        assert_eq!(read_all(&log, 1), vec![1, 2, 3]);
    }
}
