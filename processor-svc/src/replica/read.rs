//! Reading a point: its disks' extents, its digest, and the lease that
//! holds it against pruning meanwhile.

use std::sync::Arc;

use ferry_proto::digest::DiskDigester;
use ferry_runtime::Refused;

use super::blobs::Stored;
use super::interval::Point;
use super::keys::vkey;
use super::keys::vkey_parts;
use super::patch::Patch;
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
    /// The versions of a chunk a point closing `interval` reads, oldest
    /// first: the newest whole version at or below it (if any) and the
    /// patches over it.
    pub(super) fn chain_at(
        &self,
        disk: &str,
        chunk: u64,
        interval: u64,
    ) -> Result<Vec<(u64, Stored)>> {
        let mut chain = Vec::new();
        let range = vkey(disk, chunk, 0)..=vkey(disk, chunk, interval);
        for kv in self.tree.range(range).rev() {
            let (k, v) = kv?;
            let stored = Stored::decode(&v)?;
            chain.push((vkey_parts(&k)?.2, stored));
            if stored.is_whole() {
                break;
            }
        }
        chain.reverse();
        Ok(chain)
    }

    /// A chunk of `chunk_len` bytes from its `chain` (as [`chain_at`]
    /// returns it; empty: never written), each blob read by `read`.
    ///
    /// [`chain_at`]: VmReplica::chain_at
    pub(super) fn compose(
        &self,
        chunk_len: u64,
        chain: &[(u64, Stored)],
        mut read: impl FnMut(u64, Stored) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; chunk_len as usize];
        // Each patch names its place over the whole version: an entry
        // damaged there is refused here, never read past.
        let (mut depth, mut bytes_below) = (0u16, 0u32);
        for (version, stored) in chain {
            if let Stored::Patch {
                len,
                depth: d,
                chain: c,
                ..
            } = stored
            {
                depth = depth.saturating_add(1);
                bytes_below = bytes_below.saturating_add(*len);
                if (*d, *c) != (depth, bytes_below) {
                    return Err(ProcessorError::DataLoss(format!(
                        "VM {:?}: the patch of interval {version} says it is {d} deep over \
                         {c} bytes, but lies {depth} deep over {bytes_below}",
                        self.vm
                    )));
                }
            }
            match stored {
                Stored::Zero => bytes.fill(0),
                Stored::Data { .. } => {
                    let blob = read(*version, *stored)?;
                    if blob.len() != bytes.len() {
                        return Err(ProcessorError::DataLoss(format!(
                            "VM {:?}: a chunk version holds {} bytes, not {}",
                            self.vm,
                            blob.len(),
                            bytes.len()
                        )));
                    }
                    bytes.copy_from_slice(&blob);
                }
                Stored::Patch { .. } => {
                    Patch::decode(&read(*version, *stored)?)?.apply_to(&mut bytes)?
                }
            }
        }
        Ok(bytes)
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
            let mut found: Vec<(u64, Stored)> = Vec::new();
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
                        let stored = Stored::decode(&val)?;
                        if stored.is_whole() {
                            found.clear();
                        }
                        found.push((v, stored));
                    }
                }
            }
            let readable = match found.as_slice() {
                [] | [(_, Stored::Zero)] => None,
                [(version, stored @ Stored::Data { .. })] => {
                    Some(self.read_blob_retrying(disk, chunk, *version, *stored)?)
                }
                chain => {
                    let chunk_len =
                        (point_disk_size(point, disk)? - chunk * self.chunk).min(self.chunk);
                    Some(self.compose(chunk_len, chain, |version, stored| {
                        self.read_blob_retrying(disk, chunk, version, stored)
                    })?)
                }
            };
            let (piece, piece_end) = match readable {
                Some(blob) => {
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
                None => (
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
        // The versions a point reads of one chunk: the newest whole one at
        // or below its interval and the patches over it.
        let mut current: Option<(u64, Vec<(u64, Stored)>)> = None;
        let emit = |digest: &mut DiskDigester, chunk: u64, chain: Vec<(u64, Stored)>| {
            digest.push_zeros(chunk - digest.next_chunk());
            let want = digest.chunk_len(chunk);
            match chain.as_slice() {
                [] | [(_, Stored::Zero)] => digest.push_zeros(1),
                [(_, Stored::Data { len, crc, .. })] => {
                    if u64::from(*len) != want {
                        return Err(ProcessorError::DataLoss(format!(
                            "VM {:?}: chunk {chunk} of disk {disk:?} is stored with {len} \
                             bytes, not {want}",
                            self.vm
                        )));
                    }
                    digest.push(*crc);
                }
                // Patched: the chunk's checksum is that of its bytes put
                // together from the blobs (each checked against its own).
                chain => {
                    let bytes = self.compose(want, chain, |version, stored| {
                        self.read_blob_retrying(disk, chunk, version, stored)
                    })?;
                    digest.push(crc32c::crc32c(&bytes));
                }
            }
            Ok(())
        };
        for kv in self.tree.range(vkey(disk, 0, 0)..vkey(disk, chunks, 0)) {
            let (key, value) = kv?;
            let (_, chunk, version) = vkey_parts(&key)?;
            if current.as_ref().is_some_and(|(c, _)| *c != chunk) {
                if let Some((c, chain)) = current.take() {
                    emit(&mut digest, c, chain)?;
                }
            }
            let entry = current.get_or_insert((chunk, Vec::new()));
            if version <= point.interval {
                let stored = Stored::decode(&value)?;
                if stored.is_whole() {
                    entry.1.clear();
                }
                entry.1.push((version, stored));
            }
        }
        if let Some((c, chain)) = current.take() {
            emit(&mut digest, c, chain)?;
        }
        digest.push_zeros(u64::MAX);
        let sha = digest
            .finish()
            .map_err(|e| ProcessorError::Corrupt(format!("disk digest: {e}")))?;
        Ok((self.chunk, sha))
    }

    /// Reads the blob of version `version` of a chunk; if compaction moved
    /// it meanwhile, looks it up again. A blob that fails its checksum is
    /// recorded as damage before the error goes back. Not with the writer
    /// held (recording damage takes it).
    pub(super) fn read_blob_retrying(
        &self,
        disk: &str,
        chunk: u64,
        version: u64,
        stored: Stored,
    ) -> Result<Vec<u8>> {
        let read = match self.read_blob(&stored) {
            Err(ProcessorError::Io { .. }) => match self.tree.get(vkey(disk, chunk, version))? {
                Some(again) => {
                    let again = Stored::decode(&again)?;
                    self.read_blob(&again).map_err(|e| (e, again))
                }
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

/// The size of `disk` at `point`.
fn point_disk_size(point: &Point, disk: &str) -> Result<u64> {
    point
        .disks
        .iter()
        .find(|(d, _)| d == disk)
        .map(|(_, s)| *s)
        .ok_or_else(|| {
            Refused::not_found(format!("point {} has no disk {disk:?}", point.id())).into()
        })
}
