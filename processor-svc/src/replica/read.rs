//! Reading a point: its disks' extents, its digest, and the lease that
//! holds it against pruning meanwhile.

use std::sync::Arc;

use ferry_proto::digest::DiskDigester;
use ferry_runtime::Refused;

use super::blobs::Stored;
use super::interval::Point;
use super::keys::vkey;
use super::keys::vkey_parts;
use super::{poisoned, Result, VmReplica};
use crate::error::ProcessorError;

/// A range of a disk at a point.
#[derive(Debug, Clone, PartialEq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// None: reads as zeros (never written, or zeroed).
    pub data: Option<Vec<u8>>,
}

/// Holds a point against pruning while it is read.
pub struct ReadLease {
    replica: Arc<VmReplica>,
    interval: u64,
}

impl Drop for ReadLease {
    fn drop(&mut self) {
        if let Ok(mut reading) = self.replica.reading.lock() {
            if let Some(n) = reading.get_mut(&self.interval) {
                *n -= 1;
                if *n == 0 {
                    reading.remove(&self.interval);
                }
            }
        }
    }
}

impl VmReplica {
    /// The version of a chunk a point closing `interval` reads.
    pub(super) fn version_at(
        &self,
        disk: &str,
        chunk: u64,
        interval: u64,
    ) -> Result<Option<Stored>> {
        let range = vkey(disk, chunk, 0)..=vkey(disk, chunk, interval);
        match self.tree.range(range).next_back() {
            Some(kv) => Ok(Some(Stored::decode(&kv?.1)?)),
            None => Ok(None),
        }
    }

    /// Holds `point` against pruning while it is read.
    pub fn lease(self: &Arc<Self>, point: &Point) -> Result<ReadLease> {
        let _w = self.writer()?;
        // Still there under the writer lock, so pruning cannot have begun.
        self.point(point.id())?;
        *self
            .reading
            .lock()
            .map_err(|_| poisoned())?
            .entry(point.interval)
            .or_default() += 1;
        Ok(ReadLease {
            replica: self.clone(),
            interval: point.interval,
        })
    }

    /// A disk at a point from `offset` for up to `max_bytes` (whole chunks,
    /// clipped to `end`): extents in order, runs of unwritten or zero chunks
    /// as one hole.
    pub fn read(
        &self,
        point: &Point,
        disk: &str,
        offset: u64,
        end: u64,
        max_bytes: u64,
    ) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        let mut data_bytes = 0u64;
        let mut at = offset;
        // Versions of the chunks in range, in chunk order.
        let first_chunk = offset / self.chunk;
        let mut versions = self
            .tree
            .range(vkey(disk, first_chunk, 0)..vkey(disk, end.div_ceil(self.chunk), 0))
            .peekable();
        while at < end && data_bytes < max_bytes {
            let chunk = at / self.chunk;
            let chunk_end = ((chunk + 1) * self.chunk).min(end);
            // The newest version <= the point's interval among this chunk's,
            // and the next chunk that has versions at all.
            let mut found: Option<Stored> = None;
            let mut next_chunk = None;
            loop {
                let head = match versions.peek() {
                    None => None,
                    Some(Err(e)) => return Err(ProcessorError::Index(e.clone())),
                    Some(Ok((k, _))) => Some(vkey_parts(k)?),
                };
                let Some((_, c, v)) = head else { break };
                if c > chunk {
                    next_chunk = Some(c);
                    break;
                }
                if let Some(Ok((_, val))) = versions.next() {
                    if c == chunk && v <= point.interval {
                        found = Some(Stored::decode(&val)?);
                    }
                }
            }
            let (piece, piece_end) = match found {
                Some(stored @ Stored::Data { .. }) => {
                    let blob = self.read_blob_retrying(disk, chunk, point.interval, stored)?;
                    let from = (at - chunk * self.chunk) as usize;
                    let to = (chunk_end - chunk * self.chunk) as usize;
                    let bytes = blob.get(from..to).ok_or_else(|| {
                        ProcessorError::DataLoss(format!("chunk {chunk} of disk {disk:?} is short"))
                    })?;
                    data_bytes += bytes.len() as u64;
                    (Some(bytes.to_vec()), chunk_end)
                }
                // A hole through every following chunk without versions:
                // one step, however large the disk.
                _ => (
                    None,
                    next_chunk
                        .map_or(end, |c| c.saturating_mul(self.chunk))
                        .min(end)
                        .max(chunk_end),
                ),
            };
            let chunk_end = piece_end;
            let length = chunk_end - at;
            match (out.last_mut(), piece) {
                (Some(last), None) if last.data.is_none() => last.length += length,
                (
                    Some(Extent {
                        data: Some(d),
                        length: l,
                        ..
                    }),
                    Some(p),
                ) if d.len() + p.len() <= max_bytes as usize => {
                    d.extend_from_slice(&p);
                    *l += length;
                }
                (_, data) => out.push(Extent {
                    offset: at,
                    length,
                    data,
                }),
            }
            at = chunk_end;
        }
        Ok(out)
    }

    /// The digest of `disk` at `point` (`ferry_proto::digest`), from the
    /// checksums the index keeps for each chunk version: no blob is read,
    /// so it does not share the read path it checks. O(chunks of the disk).
    pub fn digest(&self, point: &Point, disk: &str) -> Result<(u64, [u8; 32])> {
        let size = point
            .disks
            .iter()
            .find(|(d, _)| d == disk)
            .map(|(_, s)| *s)
            .ok_or_else(|| {
                Refused::not_found(format!(
                    "point {} of VM {:?} has no disk {disk:?}",
                    point.id(),
                    self.vm
                ))
            })?;
        let mut digest = DiskDigester::new(self.chunk, size);
        let chunks = digest.chunks();
        // The version a point reads of one chunk: the newest at or below
        // its interval.
        let mut current: Option<(u64, Option<Stored>)> = None;
        let emit = |digest: &mut DiskDigester, chunk: u64, stored: Option<Stored>| {
            digest.push_zeros(chunk - digest.next_chunk());
            match stored {
                Some(Stored::Data { len, crc, .. }) => {
                    let want = digest.chunk_len(chunk);
                    if u64::from(len) != want {
                        return Err(ProcessorError::DataLoss(format!(
                            "VM {:?}: chunk {chunk} of disk {disk:?} is stored with {len} \
                             bytes, not {want}",
                            self.vm
                        )));
                    }
                    digest.push(crc);
                }
                _ => digest.push_zeros(1),
            }
            Ok(())
        };
        for kv in self.tree.range(vkey(disk, 0, 0)..vkey(disk, chunks, 0)) {
            let (key, value) = kv?;
            let (_, chunk, version) = vkey_parts(&key)?;
            if current.as_ref().is_some_and(|(c, _)| *c != chunk) {
                if let Some((c, stored)) = current.take() {
                    emit(&mut digest, c, stored)?;
                }
            }
            let entry = current.get_or_insert((chunk, None));
            if version <= point.interval {
                entry.1 = Some(Stored::decode(&value)?);
            }
        }
        if let Some((c, stored)) = current.take() {
            emit(&mut digest, c, stored)?;
        }
        digest.push_zeros(u64::MAX);
        let sha = digest
            .finish()
            .map_err(|e| ProcessorError::Corrupt(format!("disk digest: {e}")))?;
        Ok((self.chunk, sha))
    }

    /// Reads a blob; if compaction moved it meanwhile, looks it up again. A
    /// blob that fails its checksum is recorded as damage before the error
    /// goes back.
    pub(super) fn read_blob_retrying(
        &self,
        disk: &str,
        chunk: u64,
        interval: u64,
        stored: Stored,
    ) -> Result<Vec<u8>> {
        let read = match self.read_blob(&stored) {
            Err(ProcessorError::Io { .. }) => match self.version_at(disk, chunk, interval)? {
                Some(again) => self.read_blob(&again).map_err(|e| (e, again)),
                None => Ok(Vec::new()),
            },
            other => other.map_err(|e| (e, stored)),
        };
        match read {
            Ok(b) => Ok(b),
            Err((e @ ProcessorError::DataLoss(_), stored)) => {
                self.note_damage(&stored, "a read", &e.to_string())?;
                Err(e)
            }
            Err((e, _)) => Err(e),
        }
    }
}
