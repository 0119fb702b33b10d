//! Bulk bytes: append-only segment files of framed, checksummed blobs, the
//! writer that appends to them, and the checkpoint that makes blobs and
//! their index entries durable together (and the accounting of each
//! segment's live bytes, and deleting segments nothing reads).

use std::collections::BTreeMap;

use ferry_proto::ids::Sequence;
use ferry_segment::{Header, Layout};
use serde::{Deserialize, Serialize};

use super::interval::{Dirty, Meta, Point};
use super::keys::{be32, be64, gkey, json, pkey, rkey, skey, unjson, vkey, META};
use super::patch::Patch;
use super::store::OpenSegment;
use super::{poisoned, Result, VmReplica};
use crate::error::ProcessorError;

/// Bytes of a blob's header: `crc32c u32 BE | len u32 BE` before its bytes
/// (`ferry_segment`'s [`Layout::BLOB`]).
pub(super) const BLOB_HEADER: u64 = ferry_segment::HEADER as u64;

/// Where a chunk version lives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Stored {
    /// All zeros (written as zeros, zeroed or trimmed).
    Zero,
    /// The whole chunk.
    Data {
        seg: u64,
        off: u64,
        len: u32,
        crc: u32,
    },
    /// Extents over the chunk's previous version (a [`Patch`] blob):
    /// `depth` patches down to a whole version (1: on one), `chain` their
    /// blob bytes together, this one's included.
    Patch {
        seg: u64,
        off: u64,
        len: u32,
        crc: u32,
        depth: u16,
        chain: u32,
    },
}

/// Patches at most between a chunk's whole versions: reading a chunk reads
/// at most this many blobs and one whole version.
pub(super) const MAX_PATCH_DEPTH: u16 = 32;

/// A chunk's patches over its last whole version hold at most this many
/// chunks' worth of bytes before the next version is stored whole: reading
/// a chunk reads at most that much again, and a chunk written over and over
/// in small pieces takes at most 1.5 times the bytes written.
pub(super) const MAX_PATCH_CHAIN: u64 = 2;

/// How a chunk changed in the interval is stored, and what the index held.
struct Settled {
    /// Whole, or a patch over the version below.
    dirty: Dirty,
    /// The version an earlier checkpoint of the same interval stored: its
    /// blob is dead once this one is indexed.
    replaced: Option<Stored>,
    /// Depth and chain bytes of the patches a patch goes over.
    below: (u16, u32),
}

/// Where a blob is: segment, offset, length, checksum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct BlobAt {
    pub(super) seg: u64,
    pub(super) off: u64,
    pub(super) len: u32,
    pub(super) crc: u32,
}

impl Stored {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(31);
        match self {
            Stored::Zero => v.push(0),
            Stored::Data { .. } => v.push(1),
            Stored::Patch { .. } => v.push(2),
        }
        if let Some(b) = self.blob() {
            v.extend_from_slice(&b.seg.to_be_bytes());
            v.extend_from_slice(&b.off.to_be_bytes());
            v.extend_from_slice(&b.len.to_be_bytes());
            v.extend_from_slice(&b.crc.to_be_bytes());
        }
        if let Stored::Patch { depth, chain, .. } = self {
            v.extend_from_slice(&depth.to_be_bytes());
            v.extend_from_slice(&chain.to_be_bytes());
        }
        v
    }

    pub(super) fn decode(b: &[u8]) -> Result<Stored> {
        let blob = |rest: &[u8]| BlobAt {
            seg: be64(&rest[0..8]),
            off: be64(&rest[8..16]),
            len: be32(&rest[16..20]),
            crc: be32(&rest[20..24]),
        };
        match b {
            [0] => Ok(Stored::Zero),
            [1, rest @ ..] if rest.len() == 24 => Ok(Stored::whole(blob(rest))),
            [2, rest @ ..] if rest.len() == 30 => {
                let BlobAt { seg, off, len, crc } = blob(rest);
                Ok(Stored::Patch {
                    seg,
                    off,
                    len,
                    crc,
                    depth: u16::from_be_bytes([rest[24], rest[25]]),
                    chain: be32(&rest[26..30]),
                })
            }
            _ => Err(ProcessorError::Corrupt("chunk version entry".into())),
        }
    }

    /// A whole chunk in the blob `b`.
    pub(super) fn whole(b: BlobAt) -> Stored {
        Stored::Data {
            seg: b.seg,
            off: b.off,
            len: b.len,
            crc: b.crc,
        }
    }

    /// Its blob, if it has one.
    pub(super) fn blob(&self) -> Option<BlobAt> {
        match *self {
            Stored::Zero => None,
            Stored::Data { seg, off, len, crc }
            | Stored::Patch {
                seg, off, len, crc, ..
            } => Some(BlobAt { seg, off, len, crc }),
        }
    }

    /// The same version with its blob at `to` (compaction moved it).
    pub(super) fn moved(&self, to: BlobAt) -> Stored {
        match *self {
            Stored::Patch { depth, chain, .. } => Stored::Patch {
                seg: to.seg,
                off: to.off,
                len: to.len,
                crc: to.crc,
                depth,
                chain,
            },
            _ => Stored::whole(to),
        }
    }

    /// Whether it holds the whole chunk (reading it needs no older version).
    pub(super) fn is_whole(&self) -> bool {
        !matches!(self, Stored::Patch { .. })
    }

    /// Bytes it takes in its segment.
    pub(super) fn footprint(&self) -> u64 {
        self.blob().map_or(0, |b| BLOB_HEADER + u64::from(b.len))
    }
}

/// A segment's size and the bytes of it still referenced.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(super) struct SegMeta {
    pub(super) bytes: u64,
    pub(super) live: u64,
}

pub(super) struct Writer {
    pub(super) meta: Meta,
    /// The meta as last flushed with the chunk data it covers: its applied
    /// sequence is what may be reported to the cache (which trims below
    /// it), and any other write of the meta stores it, not the open
    /// interval's state (in memory only, applied again after a crash).
    pub(super) flushed: Meta,
    pub(super) dirty: BTreeMap<(String, u64), Dirty>,
    pub(super) dirty_bytes: usize,
    /// The open segment appends go to.
    pub(super) current: Option<Box<dyn OpenSegment>>,
}

impl Writer {
    /// The meta as a write outside a checkpoint (pruning, compaction, new
    /// disk sizes) may store it: as last flushed with its data, with the
    /// live segment numbering and disk sizes.
    pub(super) fn stored_meta(&self) -> Meta {
        let mut meta = self.flushed.clone();
        meta.next_segment = self.meta.next_segment.max(meta.next_segment);
        meta.disks = self.meta.disks.clone();
        meta.incarnation = self.meta.incarnation;
        meta
    }
}

impl VmReplica {
    pub(super) fn read_blob(&self, stored: &Stored) -> Result<Vec<u8>> {
        let Some(BlobAt { seg, off, len, crc }) = stored.blob() else {
            return Ok(Vec::new());
        };
        let mut buf = self
            .store
            .get_range(seg, off, BLOB_HEADER + u64::from(len))?;
        let data = buf.split_off(BLOB_HEADER as usize);
        // The header and the body must both be what the index names.
        let named = Header { len, crc };
        if Header::read(Layout::BLOB, &buf) != Some(named) || !named.matches(&data) {
            return Err(ProcessorError::DataLoss(format!(
                "VM {:?}: segment {seg} offset {off} does not match its checksum",
                self.vm
            )));
        }
        Ok(data)
    }

    /// Makes the current segment's blobs durable.
    pub(super) fn sync_current(&self, w: &mut Writer) -> Result<()> {
        match w.current.as_mut() {
            Some(cur) => cur.sync(),
            None => Ok(()),
        }
    }

    pub(super) fn append_blob(&self, w: &mut Writer, data: &[u8]) -> Result<BlobAt> {
        let roll = w
            .current
            .as_ref()
            .is_none_or(|cur| cur.bytes() >= self.segment_bytes);
        if roll {
            // The full segment is durable (sealed) before the next starts.
            self.sync_current(w)?;
            let seg = w.meta.next_segment;
            w.meta.next_segment += 1;
            w.current = Some(self.store.create(seg)?);
        }
        let cur = w.current.as_mut().ok_or_else(poisoned)?;
        let header = Header::of(data);
        let off = cur.append(&header.encode(Layout::BLOB))?;
        cur.append(data)?;
        Ok(BlobAt {
            seg: cur.id(),
            off,
            len: header.len,
            crc: header.crc,
        })
    }

    /// Writes the open interval's changed chunks and the meta durably
    /// (segment fdatasync, then the index, then its flush); returns the
    /// applied sequence that is now durable.
    pub fn checkpoint(&self) -> Result<Sequence> {
        let mut w = self.writer()?;
        self.checkpoint_locked(&mut w, None)?;
        Ok(w.meta.applied)
    }

    /// On failure the writer is reset to what the index holds (the applied
    /// sequence falls back), so nothing unwritten is ever reported applied.
    pub(super) fn checkpoint_locked(&self, w: &mut Writer, point: Option<&Point>) -> Result<()> {
        let written = self.write_checkpoint(w, point);
        if written.is_err() {
            if let Err(e) = self.reload(w) {
                tracing::error!(vm = %self.vm, error = %e, "cannot reload the replica's meta");
            }
        }
        written
    }

    /// Drops what is in memory and takes the meta from the index again.
    pub(super) fn reload(&self, w: &mut Writer) -> Result<()> {
        w.dirty.clear();
        w.dirty_bytes = 0;
        if let Some(cur) = w.current.take() {
            self.discard_unindexed(cur);
        }
        // What was last flushed, not what the index holds in memory: a
        // checkpoint whose flush failed is not durable.
        w.meta = w.stored_meta();
        Ok(())
    }

    /// Cuts what a failed write left past the index's end of the segment
    /// (a disk that filled mid-write): nothing names those bytes, and on a
    /// full disk they are the space needed to go on. A segment the index
    /// does not know holds nothing named at all.
    pub(super) fn discard_unindexed(&self, mut cur: Box<dyn OpenSegment>) {
        let id = cur.id();
        let known = self
            .tree
            .get(skey(id))
            .map_err(ProcessorError::from)
            .and_then(|b| b.map(|b| unjson::<SegMeta>(&b)).transpose());
        let cut = match known {
            Ok(Some(m)) => cur.truncate(m.bytes),
            Ok(None) => {
                drop(cur);
                self.store.delete(id)
            }
            Err(e) => {
                tracing::warn!(vm = %self.vm, error = %e, "cannot tell what of a segment is named");
                return;
            }
        };
        if let Err(e) = cut {
            tracing::warn!(vm = %self.vm, segment = id, error = %e, "cannot cut what a failed write left");
        }
    }

    /// Forgets what is not durable (after a failed apply): the pipeline
    /// resumes from the durable applied sequence.
    pub fn reset(&self) -> Result<Sequence> {
        let mut w = self.writer()?;
        self.reload(&mut w)?;
        Ok(w.meta.applied)
    }

    pub(super) fn write_checkpoint(&self, w: &mut Writer, point: Option<&Point>) -> Result<()> {
        let dirty = std::mem::take(&mut w.dirty);
        w.dirty_bytes = 0;
        // A cut has opened the next interval already; its chunks belong to
        // the interval the point closes.
        let version = point.map_or(w.meta.interval, |p| p.interval);
        let mut entries = Vec::with_capacity(dirty.len());
        let mut wrote = false;
        for ((disk, chunk), d) in dirty {
            let settled = match d {
                Dirty::Patch(patch) => self.settle(w, &disk, chunk, version, patch)?,
                whole => Settled {
                    replaced: self
                        .tree
                        .get(vkey(&disk, chunk, version))?
                        .map(|v| Stored::decode(&v))
                        .transpose()?,
                    dirty: whole,
                    below: (0, 0),
                },
            };
            let stored = match settled.dirty {
                Dirty::Zero => Stored::Zero,
                Dirty::Data(data) if data.iter().all(|b| *b == 0) => Stored::Zero,
                Dirty::Data(data) => {
                    wrote = true;
                    Stored::whole(self.append_blob(w, &data)?)
                }
                Dirty::Patch(patch) => {
                    wrote = true;
                    let (depth, chain) = settled.below;
                    let at = self.append_blob(w, &patch.encode())?;
                    Stored::Patch {
                        seg: at.seg,
                        off: at.off,
                        len: at.len,
                        crc: at.crc,
                        depth: depth + 1,
                        chain: chain.saturating_add(at.len),
                    }
                }
            };
            entries.push((disk, chunk, stored, settled.replaced));
        }
        if wrote {
            self.sync_current(w)?;
        }
        let mut segs: BTreeMap<u64, SegMeta> = BTreeMap::new();
        let mut batch = sled::Batch::default();
        for (disk, chunk, stored, replaced) in entries {
            let key = vkey(&disk, chunk, version);
            // The same chunk written again in this interval: the older blob
            // of this version is dead.
            if let Some(old) = replaced {
                self.release(&mut segs, &mut batch, &old)?;
            }
            if let Some(BlobAt { seg, off, len, .. }) = stored.blob() {
                let m = self.seg_meta(&mut segs, seg)?;
                m.bytes = m.bytes.max(off + BLOB_HEADER + u64::from(len));
                m.live += BLOB_HEADER + u64::from(len);
                batch.insert(rkey(seg, off), key.clone());
            }
            batch.insert(key, stored.encode());
            batch.insert(gkey(version, &disk, chunk), &[][..]);
        }
        if let Some(p) = point {
            batch.insert(pkey(p.interval), json(p)?);
        }
        let dead = self.write_segs(&mut batch, &segs, w);
        batch.insert(META, json(&w.meta)?);
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        // Only now is everything up to `applied` durable.
        w.flushed = w.meta.clone();
        self.delete_segments(&dead);
        Ok(())
    }

    /// How a chunk's patch of interval `version` is stored: as a patch
    /// over the chunk's previous version, or (returned as `Dirty::Data`)
    /// put together whole when the patches under it are too many
    /// ([`MAX_PATCH_DEPTH`]) or too large ([`MAX_PATCH_CHAIN`] chunks)
    /// to read through, or when an earlier checkpoint of the same interval
    /// stored it whole. A patch an earlier checkpoint of the interval
    /// stored goes under this one: the version is replaced, never lost.
    fn settle(
        &self,
        w: &Writer,
        disk: &str,
        chunk: u64,
        version: u64,
        mut patch: Patch,
    ) -> Result<Settled> {
        let size = *w.meta.disks.get(disk).ok_or_else(|| {
            ProcessorError::DataLoss(format!("VM {:?} has no disk {disk:?}", self.vm))
        })?;
        let chunk_len = self.chunk.min(size.saturating_sub(chunk * self.chunk));
        // One look at the index: the chain under this version, and the
        // version an earlier checkpoint of this interval stored.
        let mut chain = self.chain_at(disk, chunk, version)?;
        let whole = |dirty: Dirty, replaced: Option<Stored>| Settled {
            dirty,
            replaced,
            below: (0, 0),
        };
        let mut replaced = None;
        if chain.last().is_some_and(|(v, _)| *v == version) {
            match chain.last().map(|(_, s)| *s) {
                Some(same @ Stored::Patch { .. }) => {
                    chain.pop();
                    let mut older = Patch::decode(&self.read_blob(&same)?)?;
                    older.overlay(patch);
                    patch = older;
                    replaced = Some(same);
                }
                same => {
                    // Stored whole already: the chain ends there.
                    let mut bytes = self.compose(chunk_len, &chain, |_, s| self.read_blob(&s))?;
                    patch.apply_to(&mut bytes)?;
                    return Ok(whole(Dirty::Data(bytes), same));
                }
            }
        }
        let below = match chain.last() {
            Some((_, Stored::Patch { depth, chain, .. })) => (*depth, *chain),
            _ => (0, 0),
        };
        let too_deep = below.0 >= MAX_PATCH_DEPTH
            || u64::from(below.1) + patch.data_bytes() as u64 > MAX_PATCH_CHAIN * chunk_len;
        if patch.covered() == chunk_len {
            let mut bytes = vec![0; chunk_len as usize];
            patch.apply_to(&mut bytes)?;
            return Ok(whole(Dirty::Data(bytes), replaced));
        }
        if too_deep {
            let mut bytes = self.compose(chunk_len, &chain, |_, s| self.read_blob(&s))?;
            patch.apply_to(&mut bytes)?;
            return Ok(whole(Dirty::Data(bytes), replaced));
        }
        Ok(Settled {
            dirty: Dirty::Patch(patch),
            replaced,
            below,
        })
    }

    pub(super) fn seg_meta<'a>(
        &self,
        segs: &'a mut BTreeMap<u64, SegMeta>,
        seg: u64,
    ) -> Result<&'a mut SegMeta> {
        if let std::collections::btree_map::Entry::Vacant(e) = segs.entry(seg) {
            let m = match self.tree.get(skey(seg))? {
                Some(b) => unjson(&b)?,
                None => SegMeta::default(),
            };
            e.insert(m);
        }
        segs.get_mut(&seg).ok_or_else(poisoned)
    }

    /// Accounts a version's blob as dead.
    pub(super) fn release(
        &self,
        segs: &mut BTreeMap<u64, SegMeta>,
        batch: &mut sled::Batch,
        old: &Stored,
    ) -> Result<()> {
        if let Some(BlobAt { seg, off, .. }) = old.blob() {
            let m = self.seg_meta(segs, seg)?;
            m.live = m.live.saturating_sub(old.footprint());
            batch.remove(rkey(seg, off));
        }
        Ok(())
    }

    /// Puts segment metas in the batch; returns the sealed segments that hold
    /// nothing live any more (their files go once the batch is durable).
    pub(super) fn write_segs(
        &self,
        batch: &mut sled::Batch,
        segs: &BTreeMap<u64, SegMeta>,
        w: &Writer,
    ) -> Vec<u64> {
        let current = w.current.as_ref().map(|cur| cur.id());
        let mut dead = Vec::new();
        for (seg, m) in segs {
            if m.live == 0 && Some(*seg) != current {
                batch.remove(skey(*seg));
                dead.push(*seg);
            } else if let Ok(b) = json(m) {
                batch.insert(skey(*seg), b);
            }
        }
        dead
    }

    pub(super) fn delete_segments(&self, dead: &[u64]) {
        for seg in dead {
            if let Err(e) = self.store.delete(*seg) {
                tracing::warn!(vm = %self.vm, segment = seg, error = %e, "cannot delete a dead segment");
            }
        }
    }

    /// Bytes of segment files on disk.
    pub fn disk_bytes(&self) -> Result<u64> {
        Ok(self.store.list()?.iter().map(|s| s.bytes).sum())
    }
}
