//! Replica disks as versioned chunks, and recovery points over them.
//!
//! A disk is cut into fixed-size chunks. Time is cut into intervals: the
//! open interval collects writes, and cutting a point closes it. A chunk gets
//! at most one version per interval (writes to it inside the interval are
//! coalesced in memory), so the point closing interval `g` reads, for each
//! chunk, its newest version `<= g`. A version is whole (the chunk's bytes,
//! or zeros) or a patch: the extents written in the interval, over the
//! version before it. A point reads a patched chunk as its newest whole
//! version `<= g` with the patches over it put down in order; the chain is
//! bounded (`MAX_PATCH_DEPTH` patches, `MAX_PATCH_CHAIN` chunks of bytes),
//! past which the checkpoint stores the chunk whole again. Bulk bytes go to append-only segment files of framed, checksummed
//! blobs (`crc32c u32 BE | len u32 BE | bytes`), fsynced before the index names
//! them; sled holds the index of each VM in a tree of its own:
//!
//! - `v disk chunk version` → where the version is (or "zero"), whole or
//!   a patch (with its depth and chain bytes over the whole version)
//! - `g version disk chunk` → () (the versions an interval made, for pruning)
//! - `r segment offset` → the `v` key (what a segment holds, for compaction)
//! - `s segment` → its size and live bytes
//! - `p interval` → a recovery point
//! - `m` → the VM's meta: applied sequence, open interval, disk states
//!
//! Cutting a point writes the chunks changed in the interval and one point
//! entry: O(changed chunks), whatever the disk size.
//!
//! One idea per module; this one holds [`Replicas`] and [`VmReplica`]'s
//! shape (its fields, locks and meta accessors) and what ties them together:
//!
//! - `keys`: the index key encodings above and their parsers.
//! - `interval`: what an interval is: the VM's [`Meta`], the chunks changed
//!   in the open interval (in memory), its cut into a [`Point`], the points'
//!   catalogue (list, get, pin). Point and Meta live here because they are
//!   the interval's records: a point is a closed interval, the meta names
//!   the open one.
//! - `point_kind`: [`PointKind`], the stored kind of a point (not the
//!   wire's enum), legacy numbers read, unknown values refused.
//! - `patch`: a chunk's partial changes ([`patch::Patch`]): extents put
//!   over each other in memory, the blob they are stored as.
//! - `apply`: records applied, in sequence, to the open interval (writes,
//!   zeroes, markers, digests compared, damaged records refused). Not in
//!   `interval`: it is the stream's side (sequence, lineage, gaps), which
//!   the cut does not need.
//! - `store`: the one storage seam, [`BlobStore`] (segments put by
//!   append-then-seal, read by range, deleted, listed), and
//!   [`LocalBlobStore`], fsynced local files; every blob byte goes through
//!   it.
//! - `blobs`: the blob frame in segments, the writer appending blobs,
//!   reading a blob, and the checkpoint that makes blobs and index entries durable
//!   together (with segment accounting, reload after a failure, deleting
//!   dead segments).
//! - `read`: reading a point's disks, its digest, the lease held meanwhile.
//! - `prune`: retention, deleting points and the versions only they read.
//! - `compact`: moving live blobs out of mostly dead segments.
//! - `damage`: blobs that failed their checksum, and the scrub.
//! - `seed`: a re-protected item's replica filled from the original disks
//!   before its agent streams, and the ranges it must not trust.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

mod apply;
mod blobs;
mod compact;
mod damage;
mod interval;
mod keys;
mod patch;
mod point_kind;
mod prune;
mod read;
mod seed;
mod store;
#[cfg(test)]
mod testing;

pub use apply::Applied;
pub use damage::{Damaged, Scrubbed};
pub use interval::{missing_point, Meta, Point, FULL_RESYNC};
pub use point_kind::PointKind;
pub use read::{Extent, ReadLease};
pub use store::{BlobStore, LocalBlobStore, OpenSegment, SegmentInfo};

use blobs::Writer;
use ferry_runtime::Refused;
use keys::{json, unjson, META};

use ferry_proto::ids::{Incarnation, Sequence};

use crate::error::ProcessorError;

type Result<T> = std::result::Result<T, ProcessorError>;

/// The replica index's memory by default (sled's own is 1 GiB).
pub const INDEX_CACHE_BYTES: u64 = 64 << 20;

/// Every VM's replica.
pub struct Replicas {
    dir: PathBuf,
    db: sled::Db,
    chunk: u64,
    segment_bytes: u64,
    vms: Mutex<HashMap<String, Arc<VmReplica>>>,
}

fn poisoned() -> ProcessorError {
    ProcessorError::Corrupt("a replica lock was poisoned by a panic".into())
}

fn tree_name(vm: &str) -> String {
    format!("vm/{vm}")
}

impl Replicas {
    /// Opens (or creates) the replicas under `dir`, the index's memory the
    /// default [`INDEX_CACHE_BYTES`].
    pub fn open(dir: &Path, chunk: u64, segment_bytes: u64) -> Result<Replicas> {
        Self::open_with(dir, chunk, segment_bytes, INDEX_CACHE_BYTES)
    }

    /// Opens (or creates) the replicas under `dir`, keeping at most about
    /// `cache_bytes` of the index in memory.
    pub fn open_with(
        dir: &Path,
        chunk: u64,
        segment_bytes: u64,
        cache_bytes: u64,
    ) -> Result<Replicas> {
        fs::create_dir_all(dir.join("segments")).map_err(|e| ProcessorError::io(dir, e))?;
        let db = sled::Config::new()
            .path(dir.join("index"))
            .cache_capacity(cache_bytes)
            .open()?;
        Ok(Replicas {
            dir: dir.to_path_buf(),
            db,
            chunk,
            segment_bytes,
            vms: Mutex::new(HashMap::new()),
        })
    }

    /// The names of every VM with a replica.
    pub fn names(&self) -> Vec<String> {
        self.db
            .tree_names()
            .into_iter()
            .filter_map(|n| String::from_utf8(n.to_vec()).ok())
            .filter_map(|n| n.strip_prefix("vm/").map(str::to_string))
            .collect()
    }

    /// A VM's replica if it has one.
    pub fn get(&self, vm: &str) -> Result<Option<Arc<VmReplica>>> {
        if let Some(r) = self.vms.lock().map_err(|_| poisoned())?.get(vm) {
            return Ok(Some(r.clone()));
        }
        if !self.names().iter().any(|n| n == vm) {
            return Ok(None);
        }
        self.open_vm(vm).map(Some)
    }

    /// The replica of `vm`'s protected item at `incarnation`, created
    /// empty with `disks` if missing; disk sizes are updated from `disks`.
    /// A replica of an older incarnation (replication was disabled and
    /// enabled again while this processor did not see it) is deleted first;
    /// one of a newer incarnation than registry's is refused and kept.
    pub fn open_vm_with(
        &self,
        vm: &str,
        disks: &BTreeMap<String, u64>,
        incarnation: Incarnation,
    ) -> Result<Arc<VmReplica>> {
        let mut replica = match self.get(vm)? {
            Some(r) => r,
            None => self.open_vm(vm)?,
        };
        let meta = replica.meta()?;
        let held = meta.incarnation;
        // Nothing applied, no point: a new replica, not an old item's.
        let fresh =
            held.get() == 0 && meta.applied.get() == 0 && meta.last_point_sequence.get() == 0;
        if fresh && incarnation.get() > 0 {
            replica.set_incarnation(incarnation)?;
        } else if held > incarnation {
            return Err(Refused::failed_precondition(format!(
                "the replica of VM {vm:?} is of incarnation {held}, newer than registry's \
                 {incarnation}: is registry restored from an older backup? The replica is kept"
            ))
            .into());
        } else if held < incarnation {
            tracing::warn!(
                vm,
                old = held.get(),
                new = incarnation.get(),
                "replication was enabled again: the old replica is deleted"
            );
            self.remove(vm)?;
            replica = self.open_vm(vm)?;
            replica.set_incarnation(incarnation)?;
        }
        replica.set_disks(disks)?;
        Ok(replica)
    }

    fn open_vm(&self, vm: &str) -> Result<Arc<VmReplica>> {
        let mut vms = self.vms.lock().map_err(|_| poisoned())?;
        if let Some(r) = vms.get(vm) {
            return Ok(r.clone());
        }
        let tree = self.db.open_tree(tree_name(vm))?;
        let meta: Meta = match tree.get(META)? {
            Some(b) => unjson(&b)?,
            None => Meta {
                interval: 1,
                next_segment: 1,
                ..Meta::default()
            },
        };
        let store = Arc::new(LocalBlobStore::open(self.segments_of(vm))?);
        let damage = damage::Damage::load(&tree)?;
        let replica = Arc::new(VmReplica {
            vm: vm.to_string(),
            tree,
            db: self.db.clone(),
            store,
            chunk: self.chunk,
            segment_bytes: self.segment_bytes,
            reading: Mutex::new(HashMap::new()),
            writer: Mutex::new(Writer {
                flushed: meta.clone(),
                meta,
                dirty: BTreeMap::new(),
                dirty_bytes: 0,
                current: None,
            }),
            damage: Mutex::new(damage),
            scrub_at: Mutex::new(Vec::new()),
        });
        vms.insert(vm.to_string(), replica.clone());
        Ok(replica)
    }

    /// Deletes a VM's replica (its replication was disabled).
    pub fn remove(&self, vm: &str) -> Result<()> {
        let removed = self.vms.lock().map_err(|_| poisoned())?.remove(vm);
        let store: Arc<dyn BlobStore> = match removed {
            Some(r) => r.store.clone(),
            None => Arc::new(LocalBlobStore::new(self.segments_of(vm))),
        };
        self.db.drop_tree(tree_name(vm))?;
        self.db.flush()?;
        store.delete_all()
    }

    /// Where a VM's segments are.
    fn segments_of(&self, vm: &str) -> PathBuf {
        self.dir.join("segments").join(ferry_runtime::path_name(vm))
    }
}

/// One VM's replica disks and points.
pub struct VmReplica {
    pub vm: String,
    tree: sled::Tree,
    db: sled::Db,
    /// Its segments: every blob byte is written and read through it.
    store: Arc<dyn BlobStore>,
    chunk: u64,
    segment_bytes: u64,
    /// Points being read now (interval → readers): never pruned meanwhile.
    reading: Mutex<HashMap<u64, usize>>,
    writer: Mutex<Writer>,
    /// Chunk versions whose blobs failed their checksum (see `damage`).
    damage: Mutex<damage::Damage>,
    /// Where the scrub goes on: the next blob key.
    scrub_at: Mutex<Vec<u8>>,
}

impl VmReplica {
    fn writer(&self) -> Result<MutexGuard<'_, Writer>> {
        self.writer.lock().map_err(|_| poisoned())
    }

    /// The chunk size in bytes.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk
    }

    /// The VM's meta as it is in memory now.
    pub fn meta(&self) -> Result<Meta> {
        Ok(self.writer()?.meta.clone())
    }

    /// The applied sequence (in memory).
    pub fn applied(&self) -> Result<Sequence> {
        Ok(self.writer()?.meta.applied)
    }

    /// The applied sequence the index holds (what survives a crash).
    pub fn durable_applied(&self) -> Result<Sequence> {
        Ok(self.writer()?.flushed.applied)
    }

    /// The durable applied sequence and the log lineage it counts in.
    pub fn durable_position(&self) -> Result<(Sequence, u64)> {
        let w = self.writer()?;
        Ok((w.flushed.applied, w.flushed.lineage))
    }

    /// Bytes of changed chunks held in memory for the open interval.
    pub fn dirty_bytes(&self) -> Result<usize> {
        Ok(self.writer()?.dirty_bytes)
    }

    fn set_disks(&self, disks: &BTreeMap<String, u64>) -> Result<()> {
        let mut w = self.writer()?;
        if w.meta.disks != *disks {
            w.meta.disks = disks.clone();
            self.tree.insert(META, json(&w.stored_meta())?)?;
            self.db.flush()?;
        }
        Ok(())
    }

    fn set_incarnation(&self, incarnation: Incarnation) -> Result<()> {
        let mut w = self.writer()?;
        w.meta.incarnation = incarnation;
        w.flushed.incarnation = incarnation;
        self.tree.insert(META, json(&w.stored_meta())?)?;
        self.db.flush()?;
        Ok(())
    }
}
