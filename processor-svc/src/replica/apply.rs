//! Applying records, in sequence, to the open interval: writes, zeroes,
//! markers, chunk digests compared, damaged records refused.

use ferry_proto::cache::v1::record::Op;
use ferry_proto::cache::v1::{MarkerKind, Record};
use ferry_proto::ids::{Sequence, UnixNanos};
use ferry_runtime::Refused;

use super::blobs::Writer;
use super::interval::{dirty_len, Dirty, Meta, FULL_RESYNC};
use super::patch::{Patch, Piece};
use super::{Result, VmReplica};
use crate::error::ProcessorError;

/// What a record did, for the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    Data,
    /// A marker: its kind, id and time (Unix ns; bookmarks only).
    Marker(MarkerKind, String, u64),
    /// Chunk digests compared: these (offset, length) ranges of the disk
    /// differ from the source and must be sent again.
    Mismatched(String, Vec<(u64, u64)>),
}

/// The unit in which the agent sends a range again (its changed-chunk
/// size, 64 KiB): a differing range is recorded in these, so that each
/// resent chunk resolves one.
pub(super) const RESYNC_UNIT: u64 = 64 * 1024;

/// The largest range a damaged record may name and still be asked for
/// again by range (larger: DATA_LOSS, the pipeline stops).
pub(super) const MAX_REFUSED_RANGE: u64 = 64 * 1024 * 1024;

/// Data for `offset..offset + length` arrived: mismatched ranges inside it
/// are resolved.
pub(super) fn resolve(meta: &mut Meta, disk: &str, offset: u64, length: u64) {
    if let Some(ranges) = meta.mismatched.get_mut(disk) {
        let end = offset + length;
        let inside: Vec<(u64, u64)> = ranges
            .range((offset, 0)..(end, 0))
            .filter(|(o, l)| o + l <= end)
            .copied()
            .collect();
        for r in inside {
            ranges.remove(&r);
        }
        if ranges.is_empty() {
            meta.mismatched.remove(disk);
        }
    }
}

/// Records `start..end` of `disk` as differing from the source, in the
/// agent's resync units; returns the pieces.
pub(super) fn mark_mismatched(
    meta: &mut Meta,
    disk: &str,
    start: u64,
    end: u64,
    size: u64,
) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    let mut at = start / RESYNC_UNIT * RESYNC_UNIT;
    while at < end {
        let piece = (at, RESYNC_UNIT.min(size - at));
        meta.mismatched
            .entry(disk.to_string())
            .or_default()
            .insert(piece);
        ranges.push(piece);
        at += RESYNC_UNIT;
    }
    ranges
}

impl VmReplica {
    /// Takes `lineage` as the log's if this replica has followed none yet;
    /// false if it follows another (a gap).
    pub fn adopt_lineage(&self, lineage: u64) -> Result<bool> {
        let mut w = self.writer()?;
        if w.meta.lineage == lineage {
            return Ok(true);
        }
        if w.meta.lineage == 0 {
            w.meta.lineage = lineage;
            return Ok(true);
        }
        Ok(false)
    }

    /// Records a gap in the stream before the next record: the applied
    /// sequence moves to at least `applied` (numbers below it are gone from
    /// the cache), the log's lineage becomes `lineage`, and every disk must
    /// be checked whole against the source before the next point. Durable
    /// before it returns.
    pub fn gap(&self, applied: Sequence, lineage: u64, reason: &str) -> Result<()> {
        let mut w = self.writer()?;
        tracing::error!(
            vm = %self.vm,
            from = %w.meta.applied,
            to = %applied.max(w.meta.applied),
            lineage,
            reason,
            "a gap in the stream: no point until every disk is checked against the source"
        );
        w.meta.applied = w.meta.applied.max(applied);
        w.meta.lineage = lineage;
        w.meta.gap = w.meta.disks.keys().cloned().collect();
        w.meta.gap_reason = reason.to_string();
        self.checkpoint_locked(&mut w, None)
    }

    /// Applies one record (the next in sequence) to the open interval.
    pub fn apply(&self, record: &Record) -> Result<Applied> {
        let mut w = self.writer()?;
        let expected = w.meta.applied.next().get();
        if record.sequence != expected {
            return Err(Refused::failed_precondition(format!(
                "VM {:?}: record {} arrived where {expected} comes next",
                self.vm, record.sequence
            ))
            .into());
        }
        if ferry_proto::checksum::record_crc32c(record) != record.crc32c {
            return self.refuse_damaged(&mut w, record);
        }
        let applied = match &record.op {
            Some(Op::Write(op)) => {
                let length = op.data.len() as u64;
                self.apply_range(&mut w, &record.disk_id, op.offset, length, Some(&op.data))?;
                resolve(&mut w.meta, &record.disk_id, op.offset, length);
                Applied::Data
            }
            Some(Op::Trim(z)) | Some(Op::WriteZeroes(z)) => {
                self.apply_range(&mut w, &record.disk_id, z.offset, z.length, None)?;
                resolve(&mut w.meta, &record.disk_id, z.offset, z.length);
                Applied::Data
            }
            Some(Op::Digests(d)) => {
                let differ = self.compare(&mut w, &record.disk_id, d)?;
                Applied::Mismatched(record.disk_id.clone(), differ)
            }
            Some(Op::Marker(m)) => {
                let kind = MarkerKind::try_from(m.kind).unwrap_or(MarkerKind::Unspecified);
                match kind {
                    MarkerKind::SyncStarted => {
                        w.meta.syncing.insert(record.disk_id.clone());
                        if m.id == FULL_RESYNC {
                            // The round checks every chunk: the gap closes
                            // once it completes (the disk is syncing now).
                            w.meta.gap.remove(&record.disk_id);
                        }
                    }
                    MarkerKind::SyncCompleted => {
                        w.meta.syncing.remove(&record.disk_id);
                        w.meta.synced.insert(record.disk_id.clone());
                    }
                    _ => {}
                }
                Applied::Marker(kind, m.id.clone(), m.time_unix_nanos)
            }
            None => {
                return Err(ProcessorError::DataLoss(format!(
                    "VM {:?}: record {} has no operation",
                    self.vm, record.sequence
                )))
            }
        };
        w.meta.applied = Sequence(record.sequence);
        // The stream is in completion order: a record captured at T says
        // every write completed before T is in it, a marker as much as a
        // write (the one that ends an initial replication, an idle agent's
        // tick). So a point holds the source up to its newest record's time.
        // A capture time ahead of this clock (the agent's clock stepped, or
        // is wrong) counts as now: a point's time never lies in the future,
        // where it would freeze retention and hide the RPO.
        let captured = record
            .captured_at_unix_nanos
            .min(ferry_runtime::time::unix_nanos_now());
        w.meta.last_time_nanos = w.meta.last_time_nanos.max(UnixNanos(captured));
        Ok(applied)
    }

    /// A record that fails its checksum (damaged between the agent and
    /// here) is never applied. When it still names a disk and a range of
    /// it, that range is recorded as differing from the source, in the
    /// agent's resync units, so no point is cut until the agent has sent it
    /// again, and the stream moves on (the sequence is consumed, never
    /// reused). A record that cannot be trusted that far is DATA_LOSS: the
    /// pipeline stops at it and says so.
    pub(super) fn refuse_damaged(&self, w: &mut Writer, record: &Record) -> Result<Applied> {
        let range = match &record.op {
            Some(Op::Write(op)) => Some((op.offset, op.data.len() as u64)),
            Some(Op::Trim(z)) | Some(Op::WriteZeroes(z)) => Some((z.offset, z.length)),
            _ => None,
        };
        let size = w.meta.disks.get(&record.disk_id).copied();
        let (Some(size), Some((offset, length))) = (size, range) else {
            return Err(ProcessorError::DataLoss(format!(
                "VM {:?}: record {} fails its checksum and names no range of a known disk",
                self.vm, record.sequence
            )));
        };
        let end = offset.saturating_add(length).min(size);
        if length == 0 || offset >= end || end - offset > MAX_REFUSED_RANGE {
            return Err(ProcessorError::DataLoss(format!(
                "VM {:?}: record {} fails its checksum ({offset}+{length} of disk {:?})",
                self.vm, record.sequence, record.disk_id
            )));
        }
        tracing::error!(
            vm = %self.vm,
            sequence = record.sequence,
            disk = %record.disk_id,
            offset,
            length,
            "a record fails its checksum: not applied; its range is asked for again"
        );
        let ranges = mark_mismatched(&mut w.meta, &record.disk_id, offset, end, size);
        w.meta.applied = Sequence(record.sequence);
        Ok(Applied::Mismatched(record.disk_id.clone(), ranges))
    }

    /// Compares chunk digests with the replica as it is at this point of
    /// the stream; records and returns the ranges that differ.
    pub(super) fn compare(
        &self,
        w: &mut Writer,
        disk: &str,
        d: &ferry_proto::cache::v1::ChunkDigests,
    ) -> Result<Vec<(u64, u64)>> {
        let size = *w.meta.disks.get(disk).ok_or_else(|| {
            ProcessorError::DataLoss(format!("VM {:?} has no disk {disk:?}", self.vm))
        })?;
        let end = d.offset.saturating_add(d.length);
        if end > size || d.chunk_bytes == 0 || d.chunk_bytes > ferry_proto::MAX_DIGEST_CHUNK_BYTES {
            return Err(ProcessorError::DataLoss(format!(
                "VM {:?}: digests of {}+{} do not fit disk {disk:?} ({size})",
                self.vm, d.offset, d.length
            )));
        }
        let mut differ = Vec::new();
        for (i, crc) in d.crc32c.iter().enumerate() {
            let offset = d.offset + i as u64 * d.chunk_bytes;
            if offset >= end {
                break;
            }
            let length = d.chunk_bytes.min(end - offset);
            let distrusted = super::seed::take_distrusted(&mut w.meta, disk, offset, length);
            let bytes = self.current_bytes(w, disk, offset, length, size)?;
            if distrusted || crc32c::crc32c(&bytes) != *crc {
                differ.push((offset, length));
                w.meta
                    .mismatched
                    .entry(disk.to_string())
                    .or_default()
                    .insert((offset, length));
            }
        }
        Ok(differ)
    }

    /// A range of a disk as the replica holds it now (changed chunks in
    /// memory first).
    pub(super) fn current_bytes(
        &self,
        w: &Writer,
        disk: &str,
        offset: u64,
        length: u64,
        size: u64,
    ) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(length as usize);
        let mut at = offset;
        while at < offset + length {
            let chunk = at / self.chunk;
            let start = chunk * self.chunk;
            let chunk_len = self.chunk.min(size - start);
            let n = (start + chunk_len).min(offset + length) - at;
            let from = (at - start) as usize;
            match w.dirty.get(&(disk.to_string(), chunk)) {
                Some(Dirty::Data(d)) => out.extend_from_slice(&d[from..from + n as usize]),
                Some(Dirty::Zero) => out.resize(out.len() + n as usize, 0),
                patched => {
                    let mut bytes = self.head(disk, chunk, chunk_len, w.meta.interval)?;
                    if let Some(Dirty::Patch(p)) = patched {
                        p.apply_to(&mut bytes)?;
                    }
                    out.extend_from_slice(bytes.get(from..from + n as usize).ok_or_else(|| {
                        ProcessorError::DataLoss(format!("chunk {chunk} of disk {disk:?} is short"))
                    })?);
                }
            }
            at += n;
        }
        Ok(out)
    }

    pub(super) fn apply_range(
        &self,
        w: &mut Writer,
        disk: &str,
        offset: u64,
        length: u64,
        data: Option<&[u8]>,
    ) -> Result<()> {
        let size = *w.meta.disks.get(disk).ok_or_else(|| {
            ProcessorError::DataLoss(format!("VM {:?} has no disk {disk:?}", self.vm))
        })?;
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(ProcessorError::DataLoss(format!(
                "VM {:?}: range {offset}+{length} is past the end of disk {disk:?} ({size})",
                self.vm
            )));
        }
        let mut at = offset;
        while at < offset + length {
            let chunk = at / self.chunk;
            let start = chunk * self.chunk;
            let chunk_len = self.chunk.min(size - start);
            let within = at - start;
            let n = (chunk_len - within).min(offset + length - at);
            let piece = data.map(|d| &d[(at - offset) as usize..(at - offset + n) as usize]);
            let key = (disk.to_string(), chunk);
            if within == 0 && n == chunk_len {
                let new = match piece {
                    Some(p) => Dirty::Data(p.to_vec()),
                    None => Dirty::Zero,
                };
                let old = w.dirty.insert(key, new.clone());
                w.dirty_bytes = w.dirty_bytes + dirty_len(&new) - old.as_ref().map_or(0, dirty_len);
            } else {
                // A partial write: onto the chunk when the interval holds it
                // whole, else as a patch over its previous version (nothing
                // read now; the checkpoint decides how it is stored).
                let within = within as u32;
                let piece = match piece {
                    Some(p) => Piece::Data(p.to_vec()),
                    None => Piece::Zero(n as u32),
                };
                let entry = w
                    .dirty
                    .entry(key)
                    .or_insert_with(|| Dirty::Patch(Patch::default()));
                let before = dirty_len(entry);
                if let Dirty::Zero = entry {
                    *entry = Dirty::Data(vec![0; chunk_len as usize]);
                }
                match entry {
                    Dirty::Data(buf) => {
                        let range = within as usize..within as usize + n as usize;
                        match piece {
                            Piece::Data(p) => buf[range].copy_from_slice(&p),
                            Piece::Zero(_) => buf[range].fill(0),
                        }
                    }
                    Dirty::Patch(patch) => {
                        patch.put(within, piece);
                        if patch.covered() == chunk_len {
                            // Written whole, a piece at a time.
                            let mut whole = vec![0; chunk_len as usize];
                            patch.apply_to(&mut whole)?;
                            *entry = Dirty::Data(whole);
                        }
                    }
                    Dirty::Zero => {}
                }
                w.dirty_bytes = w.dirty_bytes + dirty_len(entry) - before;
            }
            at += n;
        }
        Ok(())
    }

    /// The newest contents of a chunk up to `interval`, as bytes (with the
    /// writer held).
    pub(super) fn head(
        &self,
        disk: &str,
        chunk: u64,
        chunk_len: u64,
        interval: u64,
    ) -> Result<Vec<u8>> {
        let chain = self.chain_at(disk, chunk, interval)?;
        self.compose(chunk_len, &chain, |_, stored| self.read_blob(&stored))
    }
}
