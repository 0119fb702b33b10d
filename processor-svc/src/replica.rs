//! Replica disks as versioned chunks, and recovery points over them.
//!
//! A disk is cut into fixed-size chunks. Time is cut into intervals: the
//! open interval collects writes, and cutting a point closes it. A chunk gets
//! at most one version per interval (writes to it inside the interval are
//! coalesced in memory, partial writes merged onto its previous version), so
//! the point closing interval `g` reads, for each chunk, its newest version
//! `<= g`. Bulk bytes go to append-only segment files of framed, checksummed
//! blobs (`crc32c u32 | len u32 | bytes`), fsynced before the index names
//! them; sled holds the index of each VM in a tree of its own:
//!
//! - `v disk chunk version` → where the version is (or "zero")
//! - `g version disk chunk` → () (the versions an interval made, for pruning)
//! - `r segment offset` → the `v` key (what a segment holds, for compaction)
//! - `s segment` → its size and live bytes
//! - `p interval` → a recovery point
//! - `m` → the VM's meta: applied sequence, open interval, disk states
//!
//! Cutting a point writes the chunks changed in the interval and one point
//! entry: O(changed chunks), whatever the disk size.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

mod damage;
pub use damage::{Damaged, Scrubbed};

use ferry_proto::cache::v1::record::Op;
use ferry_proto::cache::v1::{MarkerKind, Record};
use ferry_proto::digest::DiskDigester;
use serde::{Deserialize, Serialize};

use crate::error::ProcessorError;

type Result<T> = std::result::Result<T, ProcessorError>;

const BLOB_HEADER: u64 = 8;

/// A recovery point as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// The interval it closed; its versions are those `<= interval`.
    pub interval: u64,
    /// It holds exactly the records with sequence `<=` this.
    pub sequence_cut: u64,
    /// `ferry.processor.v1.PointKind`.
    pub kind: i32,
    /// When the newest write it holds completed at the agent (Unix ns).
    pub time_nanos: u64,
    /// When it was cut (Unix ns).
    pub created_nanos: u64,
    /// The disks and their sizes.
    pub disks: Vec<(String, u64)>,
    /// Who pinned it; never pruned while non-empty.
    pub pinned_by: Vec<String>,
    /// The bookmark id of a multi-VM point.
    pub bookmark_id: String,
    /// The replication group of a multi-VM point.
    #[serde(default)]
    pub group: String,
    /// Why its data is known damaged (a blob it reads failed its checksum
    /// on a read or in the scrub); such a point is never served. Not
    /// stored: worked out from the replica's damage record when read.
    #[serde(skip)]
    pub damaged: Option<String>,
}

impl Point {
    /// Its id, unique per VM.
    pub fn id(&self) -> String {
        format!("rp-{}", self.interval)
    }
}

/// The interval of a point id, if it is one.
pub fn parse_point_id(id: &str) -> Option<u64> {
    id.strip_prefix("rp-")?.parse().ok()
}

/// What the index keeps of a VM.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Meta {
    /// Every record up to this sequence is in the replica (durably once
    /// saved).
    pub applied: u64,
    /// The open interval; the next point closes it.
    pub interval: u64,
    /// Disks whose initial replication completed.
    pub synced: BTreeSet<String>,
    /// Disks in initial replication or resync now.
    pub syncing: BTreeSet<String>,
    /// Disk sizes.
    pub disks: BTreeMap<String, u64>,
    /// When the newest applied write completed at the agent (Unix ns).
    pub last_time_nanos: u64,
    /// The id the next segment file gets.
    pub next_segment: u64,
    /// The sequence cut of the newest point (0 if none).
    pub last_point_sequence: u64,
    /// Ranges (offset, length) per disk whose checksum differed from the
    /// source's in a checksum-based resync; no point until data for each
    /// has arrived.
    pub mismatched: BTreeMap<String, BTreeSet<(u64, u64)>>,
    /// The protected item's incarnation (registry) this replica belongs
    /// to; 0 for replicas from before incarnations.
    pub incarnation: u64,
    /// The lineage of the cache log that `applied` counts in (0: none
    /// yet). Records of another lineage do not follow those applied.
    pub lineage: u64,
    /// Disks that must be checked whole against the source before any
    /// point: records between what was applied and what comes next were
    /// lost (the cache's log was trimmed past this replica, or lost and
    /// started again). Cleared per disk by a "resync:full" round.
    pub gap: BTreeSet<String>,
    /// Why the gap is there, for people.
    pub gap_reason: String,
}

/// The SYNC_STARTED id of a resync round that covers every chunk of its
/// disk (cache.proto): only such a round closes a gap.
pub const FULL_RESYNC: &str = "resync:full";

/// Where a chunk version lives.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stored {
    /// All zeros (written as zeros, zeroed or trimmed).
    Zero,
    Data {
        seg: u64,
        off: u64,
        len: u32,
        crc: u32,
    },
}

impl Stored {
    fn encode(&self) -> Vec<u8> {
        match self {
            Stored::Zero => vec![0],
            Stored::Data { seg, off, len, crc } => {
                let mut v = Vec::with_capacity(25);
                v.push(1);
                v.extend_from_slice(&seg.to_be_bytes());
                v.extend_from_slice(&off.to_be_bytes());
                v.extend_from_slice(&len.to_be_bytes());
                v.extend_from_slice(&crc.to_be_bytes());
                v
            }
        }
    }

    fn decode(b: &[u8]) -> Result<Stored> {
        match b {
            [0] => Ok(Stored::Zero),
            [1, rest @ ..] if rest.len() == 24 => Ok(Stored::Data {
                seg: be64(&rest[0..8]),
                off: be64(&rest[8..16]),
                len: be32(&rest[16..20]),
                crc: be32(&rest[20..24]),
            }),
            _ => Err(ProcessorError::Corrupt("chunk version entry".into())),
        }
    }

    /// Bytes it takes in its segment.
    fn footprint(&self) -> u64 {
        match self {
            Stored::Zero => 0,
            Stored::Data { len, .. } => BLOB_HEADER + u64::from(*len),
        }
    }
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn disk_part(out: &mut Vec<u8>, disk: &str) {
    out.push(disk.len().min(255) as u8);
    out.extend_from_slice(&disk.as_bytes()[..disk.len().min(255)]);
}

fn vkey(disk: &str, chunk: u64, version: u64) -> Vec<u8> {
    let mut k = vec![b'v'];
    disk_part(&mut k, disk);
    k.extend_from_slice(&chunk.to_be_bytes());
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn vkey_parts(k: &[u8]) -> Result<(String, u64, u64)> {
    let bad = || ProcessorError::Corrupt("version key".into());
    let len = *k.get(1).ok_or_else(bad)? as usize;
    if k.len() != 2 + len + 16 {
        return Err(bad());
    }
    let disk = String::from_utf8(k[2..2 + len].to_vec()).map_err(|_| bad())?;
    Ok((disk, be64(&k[2 + len..]), be64(&k[2 + len + 8..])))
}

/// Checked like [`vkey_parts`]: a damaged key is an error, not a panic.
fn gkey_parts(k: &[u8]) -> Result<(u64, String, u64)> {
    let bad = || ProcessorError::Corrupt("interval key".into());
    let len = *k.get(9).ok_or_else(bad)? as usize;
    if k.len() != 10 + len + 8 {
        return Err(bad());
    }
    let disk = String::from_utf8(k[10..10 + len].to_vec()).map_err(|_| bad())?;
    Ok((be64(&k[1..9]), disk, be64(&k[10 + len..])))
}

fn gkey(version: u64, disk: &str, chunk: u64) -> Vec<u8> {
    let mut k = vec![b'g'];
    k.extend_from_slice(&version.to_be_bytes());
    disk_part(&mut k, disk);
    k.extend_from_slice(&chunk.to_be_bytes());
    k
}

fn rkey(seg: u64, off: u64) -> Vec<u8> {
    let mut k = vec![b'r'];
    k.extend_from_slice(&seg.to_be_bytes());
    k.extend_from_slice(&off.to_be_bytes());
    k
}

fn skey(seg: u64) -> Vec<u8> {
    let mut k = vec![b's'];
    k.extend_from_slice(&seg.to_be_bytes());
    k
}

fn pkey(interval: u64) -> Vec<u8> {
    let mut k = vec![b'p'];
    k.extend_from_slice(&interval.to_be_bytes());
    k
}

const META: &[u8] = b"m";

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| ProcessorError::Corrupt(e.to_string()))
}

fn unjson<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| ProcessorError::Corrupt(e.to_string()))
}

/// A segment's size and the bytes of it still referenced.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct SegMeta {
    bytes: u64,
    live: u64,
}

/// A chunk changed in the open interval, not yet written.
#[derive(Debug, Clone)]
enum Dirty {
    Zero,
    Data(Vec<u8>),
}

/// The segment appends go to, with blobs not yet written to it.
struct Segment {
    id: u64,
    file: File,
    /// Its length including `buf`.
    len: u64,
    buf: Vec<u8>,
}

/// Blob bytes gathered before one write(2).
const WRITE_BUFFER: usize = 4 << 20;

struct Writer {
    meta: Meta,
    /// The meta as last flushed with the chunk data it covers: its applied
    /// sequence is what may be reported to the cache (which trims below
    /// it), and any other write of the meta stores it, not the open
    /// interval's state (in memory only, applied again after a crash).
    flushed: Meta,
    dirty: BTreeMap<(String, u64), Dirty>,
    dirty_bytes: usize,
    /// The segment appends go to: id, file, length.
    current: Option<Segment>,
}

impl Writer {
    /// The meta as a write outside a checkpoint (pruning, compaction, new
    /// disk sizes) may store it: as last flushed with its data, with the
    /// live segment numbering and disk sizes.
    fn stored_meta(&self) -> Meta {
        let mut meta = self.flushed.clone();
        meta.next_segment = self.meta.next_segment.max(meta.next_segment);
        meta.disks = self.meta.disks.clone();
        meta.incarnation = self.meta.incarnation;
        meta
    }
}

/// A range of a disk at a point.
#[derive(Debug, Clone, PartialEq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// None: reads as zeros (never written, or zeroed).
    pub data: Option<Vec<u8>>,
}

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
const RESYNC_UNIT: u64 = 64 * 1024;

/// The largest range a damaged record may name and still be asked for
/// again by range (larger: DATA_LOSS, the pipeline stops).
const MAX_REFUSED_RANGE: u64 = 64 * 1024 * 1024;

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
    /// Opens (or creates) the replicas under `dir`.
    pub fn open(dir: &Path, chunk: u64, segment_bytes: u64) -> Result<Replicas> {
        fs::create_dir_all(dir.join("segments")).map_err(|e| ProcessorError::io(dir, e))?;
        let db = sled::Config::new().path(dir.join("index")).open()?;
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
        incarnation: u64,
    ) -> Result<Arc<VmReplica>> {
        let mut replica = match self.get(vm)? {
            Some(r) => r,
            None => self.open_vm(vm)?,
        };
        let meta = replica.meta()?;
        let held = meta.incarnation;
        // Nothing applied, no point: a new replica, not an old item's.
        let fresh = held == 0 && meta.applied == 0 && meta.last_point_sequence == 0;
        if fresh && incarnation > 0 {
            replica.set_incarnation(incarnation)?;
        } else if held > incarnation {
            return Err(ProcessorError::FailedPrecondition(format!(
                "the replica of VM {vm:?} is of incarnation {held}, newer than registry's \
                 {incarnation}: is registry restored from an older backup? The replica is kept"
            )));
        } else if held < incarnation {
            tracing::warn!(
                vm,
                old = held,
                new = incarnation,
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
        let dir = self.dir.join("segments").join(ferry_runtime::path_name(vm));
        ferry_runtime::durable::create_dir_all(&dir).map_err(|e| ProcessorError::io(&dir, e))?;
        let damage = damage::Damage::load(&tree)?;
        let replica = Arc::new(VmReplica {
            vm: vm.to_string(),
            tree,
            db: self.db.clone(),
            dir,
            chunk: self.chunk,
            segment_bytes: self.segment_bytes,
            files: Mutex::new(HashMap::new()),
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
        let dir = removed
            .map(|r| r.dir.clone())
            .unwrap_or_else(|| self.dir.join("segments").join(ferry_runtime::path_name(vm)));
        self.db.drop_tree(tree_name(vm))?;
        self.db.flush()?;
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ProcessorError::io(&dir, e)),
        }
    }
}

/// One VM's replica disks and points.
pub struct VmReplica {
    pub vm: String,
    tree: sled::Tree,
    db: sled::Db,
    dir: PathBuf,
    chunk: u64,
    segment_bytes: u64,
    /// Open segment files for reading.
    files: Mutex<HashMap<u64, Arc<File>>>,
    /// Points being read now (interval → readers): never pruned meanwhile.
    reading: Mutex<HashMap<u64, usize>>,
    writer: Mutex<Writer>,
    /// Chunk versions whose blobs failed their checksum (see `damage`).
    damage: Mutex<damage::Damage>,
    /// Where the scrub goes on: the next blob key.
    scrub_at: Mutex<Vec<u8>>,
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
    pub fn applied(&self) -> Result<u64> {
        Ok(self.writer()?.meta.applied)
    }

    /// The applied sequence the index holds (what survives a crash).
    pub fn durable_applied(&self) -> Result<u64> {
        Ok(self.writer()?.flushed.applied)
    }

    /// The durable applied sequence and the log lineage it counts in.
    pub fn durable_position(&self) -> Result<(u64, u64)> {
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

    fn set_incarnation(&self, incarnation: u64) -> Result<()> {
        let mut w = self.writer()?;
        w.meta.incarnation = incarnation;
        w.flushed.incarnation = incarnation;
        self.tree.insert(META, json(&w.stored_meta())?)?;
        self.db.flush()?;
        Ok(())
    }

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
    pub fn gap(&self, applied: u64, lineage: u64, reason: &str) -> Result<()> {
        let mut w = self.writer()?;
        tracing::error!(
            vm = %self.vm,
            from = w.meta.applied,
            to = applied.max(w.meta.applied),
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

    /// Why no point may be cut now, if that is so.
    pub fn not_cuttable(&self) -> Result<Option<String>> {
        let w = self.writer()?;
        Ok(not_cuttable(&w.meta))
    }

    /// Applies one record (the next in sequence) to the open interval.
    pub fn apply(&self, record: &Record) -> Result<Applied> {
        let mut w = self.writer()?;
        let expected = w.meta.applied + 1;
        if record.sequence != expected {
            return Err(ProcessorError::FailedPrecondition(format!(
                "VM {:?}: record {} arrived where {expected} comes next",
                self.vm, record.sequence
            )));
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
        w.meta.applied = record.sequence;
        if matches!(applied, Applied::Data) {
            // A capture time ahead of this clock (the agent's clock stepped,
            // or is wrong) counts as now: a point's time never lies in the
            // future, where it would freeze retention and hide the RPO.
            let captured = record
                .captured_at_unix_nanos
                .min(ferry_runtime::time::unix_nanos_now());
            w.meta.last_time_nanos = w.meta.last_time_nanos.max(captured);
        }
        Ok(applied)
    }

    /// A record that fails its checksum (damaged between the agent and
    /// here) is never applied. When it still names a disk and a range of
    /// it, that range is recorded as differing from the source, in the
    /// agent's resync units, so no point is cut until the agent has sent it
    /// again, and the stream moves on (the sequence is consumed, never
    /// reused). A record that cannot be trusted that far is DATA_LOSS: the
    /// pipeline stops at it and says so.
    fn refuse_damaged(&self, w: &mut Writer, record: &Record) -> Result<Applied> {
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
        w.meta.applied = record.sequence;
        Ok(Applied::Mismatched(record.disk_id.clone(), ranges))
    }

    /// Compares chunk digests with the replica as it is at this point of
    /// the stream; records and returns the ranges that differ.
    fn compare(
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
            let bytes = self.current_bytes(w, disk, offset, length, size)?;
            if crc32c::crc32c(&bytes) != *crc {
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
    fn current_bytes(
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
                None => {
                    let head = self.head(disk, chunk, chunk_len, w.meta.interval)?;
                    out.extend_from_slice(head.get(from..from + n as usize).ok_or_else(|| {
                        ProcessorError::DataLoss(format!("chunk {chunk} of disk {disk:?} is short"))
                    })?);
                }
            }
            at += n;
        }
        Ok(out)
    }

    fn apply_range(
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
                if !w.dirty.contains_key(&key) {
                    let base = self.head(disk, chunk, chunk_len, w.meta.interval)?;
                    w.dirty_bytes += base.len();
                    w.dirty.insert(key.clone(), Dirty::Data(base));
                }
                let entry = w.dirty.get_mut(&key).ok_or_else(poisoned)?;
                if let Dirty::Zero = entry {
                    *entry = Dirty::Data(vec![0; chunk_len as usize]);
                    w.dirty_bytes += chunk_len as usize;
                }
                if let Dirty::Data(buf) = entry {
                    let range = within as usize..(within + n) as usize;
                    match piece {
                        Some(p) => buf[range].copy_from_slice(p),
                        None => buf[range].fill(0),
                    }
                }
            }
            at += n;
        }
        Ok(())
    }

    /// The newest contents of a chunk up to `interval`, as bytes.
    fn head(&self, disk: &str, chunk: u64, chunk_len: u64, interval: u64) -> Result<Vec<u8>> {
        match self.version_at(disk, chunk, interval)? {
            None | Some(Stored::Zero) => Ok(vec![0; chunk_len as usize]),
            Some(stored) => self.read_blob(&stored),
        }
    }

    /// The version of a chunk a point closing `interval` reads.
    fn version_at(&self, disk: &str, chunk: u64, interval: u64) -> Result<Option<Stored>> {
        let range = vkey(disk, chunk, 0)..=vkey(disk, chunk, interval);
        match self.tree.range(range).next_back() {
            Some(kv) => Ok(Some(Stored::decode(&kv?.1)?)),
            None => Ok(None),
        }
    }

    fn file(&self, seg: u64) -> Result<Arc<File>> {
        let mut files = self.files.lock().map_err(|_| poisoned())?;
        if let Some(f) = files.get(&seg) {
            return Ok(f.clone());
        }
        let path = self.segment_path(seg);
        let f = Arc::new(File::open(&path).map_err(|e| ProcessorError::io(&path, e))?);
        files.insert(seg, f.clone());
        Ok(f)
    }

    fn segment_path(&self, seg: u64) -> PathBuf {
        self.dir.join(format!("{seg:016}.seg"))
    }

    fn read_blob(&self, stored: &Stored) -> Result<Vec<u8>> {
        let Stored::Data { seg, off, len, crc } = *stored else {
            return Ok(Vec::new());
        };
        let f = self.file(seg)?;
        let mut buf = vec![0u8; (BLOB_HEADER + u64::from(len)) as usize];
        f.read_exact_at(&mut buf, off)
            .map_err(|e| ProcessorError::io(&self.segment_path(seg), e))?;
        let data = buf.split_off(BLOB_HEADER as usize);
        if be32(&buf[0..4]) != crc || be32(&buf[4..8]) != len || crc32c::crc32c(&data) != crc {
            return Err(ProcessorError::DataLoss(format!(
                "VM {:?}: segment {seg} offset {off} does not match its checksum",
                self.vm
            )));
        }
        Ok(data)
    }

    /// Writes the current segment's buffered blobs and fdatasyncs it.
    fn sync_current(&self, w: &mut Writer) -> Result<()> {
        if let Some(cur) = w.current.as_mut() {
            let path = self.dir.join(format!("{:016}.seg", cur.id));
            if !cur.buf.is_empty() {
                cur.file
                    .write_all(&cur.buf)
                    .map_err(|e| ProcessorError::io(&path, e))?;
                cur.buf.clear();
            }
            cur.file
                .sync_data()
                .map_err(|e| ProcessorError::io(&path, e))?;
        }
        Ok(())
    }

    fn append_blob(&self, w: &mut Writer, data: &[u8]) -> Result<Stored> {
        let roll = w
            .current
            .as_ref()
            .is_none_or(|cur| cur.len >= self.segment_bytes);
        if roll {
            // The full segment is durable before the next one starts.
            self.sync_current(w)?;
            let seg = w.meta.next_segment;
            w.meta.next_segment += 1;
            let path = self.segment_path(seg);
            // Truncating is right: a segment the index does not know yet
            // holds nothing anyone needs (a crash before its checkpoint).
            let f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)
                .map_err(|e| ProcessorError::io(&path, e))?;
            if let Some(dir) = path.parent() {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| ProcessorError::io(dir, e))?;
            }
            w.current = Some(Segment {
                id: seg,
                file: f,
                len: 0,
                buf: Vec::with_capacity(WRITE_BUFFER),
            });
        }
        let cur = w.current.as_mut().ok_or_else(poisoned)?;
        let crc = crc32c::crc32c(data);
        let stored = Stored::Data {
            seg: cur.id,
            off: cur.len,
            len: data.len() as u32,
            crc,
        };
        cur.buf.extend_from_slice(&crc.to_be_bytes());
        cur.buf
            .extend_from_slice(&(data.len() as u32).to_be_bytes());
        cur.buf.extend_from_slice(data);
        cur.len += BLOB_HEADER + data.len() as u64;
        if cur.buf.len() >= WRITE_BUFFER {
            let path = self.segment_path(cur.id);
            cur.file
                .write_all(&cur.buf)
                .map_err(|e| ProcessorError::io(&path, e))?;
            cur.buf.clear();
        }
        Ok(stored)
    }

    /// Writes the open interval's changed chunks and the meta durably
    /// (segment fdatasync, then the index, then its flush); returns the
    /// applied sequence that is now durable.
    pub fn checkpoint(&self) -> Result<u64> {
        let mut w = self.writer()?;
        self.checkpoint_locked(&mut w, None)?;
        Ok(w.meta.applied)
    }

    /// On failure the writer is reset to what the index holds (the applied
    /// sequence falls back), so nothing unwritten is ever reported applied.
    fn checkpoint_locked(&self, w: &mut Writer, point: Option<&Point>) -> Result<()> {
        let written = self.write_checkpoint(w, point);
        if written.is_err() {
            if let Err(e) = self.reload(w) {
                tracing::error!(vm = %self.vm, error = %e, "cannot reload the replica's meta");
            }
        }
        written
    }

    /// Drops what is in memory and takes the meta from the index again.
    fn reload(&self, w: &mut Writer) -> Result<()> {
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
    fn discard_unindexed(&self, cur: Segment) {
        let path = self.segment_path(cur.id);
        let known = self
            .tree
            .get(skey(cur.id))
            .map_err(ProcessorError::from)
            .and_then(|b| b.map(|b| unjson::<SegMeta>(&b)).transpose());
        let cut = match known {
            Ok(Some(m)) => cur.file.set_len(m.bytes),
            Ok(None) => {
                drop(cur);
                fs::remove_file(&path)
            }
            Err(e) => {
                tracing::warn!(vm = %self.vm, error = %e, "cannot tell what of a segment is named");
                return;
            }
        };
        if let Err(e) = cut {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cannot cut what a failed write left");
            }
        }
    }

    /// Forgets what is not durable (after a failed apply): the pipeline
    /// resumes from the durable applied sequence.
    pub fn reset(&self) -> Result<u64> {
        let mut w = self.writer()?;
        self.reload(&mut w)?;
        Ok(w.meta.applied)
    }

    fn write_checkpoint(&self, w: &mut Writer, point: Option<&Point>) -> Result<()> {
        let dirty = std::mem::take(&mut w.dirty);
        w.dirty_bytes = 0;
        // A cut has opened the next interval already; its chunks belong to
        // the interval the point closes.
        let version = point.map_or(w.meta.interval, |p| p.interval);
        let mut entries = Vec::with_capacity(dirty.len());
        let mut wrote = false;
        for ((disk, chunk), d) in dirty {
            let stored = match d {
                Dirty::Zero => Stored::Zero,
                Dirty::Data(data) if data.iter().all(|b| *b == 0) => Stored::Zero,
                Dirty::Data(data) => {
                    wrote = true;
                    self.append_blob(w, &data)?
                }
            };
            entries.push((disk, chunk, stored));
        }
        if wrote {
            self.sync_current(w)?;
        }
        let mut segs: BTreeMap<u64, SegMeta> = BTreeMap::new();
        let mut batch = sled::Batch::default();
        for (disk, chunk, stored) in entries {
            let key = vkey(&disk, chunk, version);
            // The same chunk written again in this interval: the older blob
            // of this version is dead.
            if let Some(old) = self.tree.get(&key)? {
                let old = Stored::decode(&old)?;
                self.release(&mut segs, &mut batch, &old)?;
            }
            if let Stored::Data { seg, off, len, .. } = stored {
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

    fn seg_meta<'a>(
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
    fn release(
        &self,
        segs: &mut BTreeMap<u64, SegMeta>,
        batch: &mut sled::Batch,
        old: &Stored,
    ) -> Result<()> {
        if let Stored::Data { seg, off, .. } = *old {
            let m = self.seg_meta(segs, seg)?;
            m.live = m.live.saturating_sub(old.footprint());
            batch.remove(rkey(seg, off));
        }
        Ok(())
    }

    /// Puts segment metas in the batch; returns the sealed segments that hold
    /// nothing live any more (their files go once the batch is durable).
    fn write_segs(
        &self,
        batch: &mut sled::Batch,
        segs: &BTreeMap<u64, SegMeta>,
        w: &Writer,
    ) -> Vec<u64> {
        let current = w.current.as_ref().map(|cur| cur.id);
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

    fn delete_segments(&self, dead: &[u64]) {
        for seg in dead {
            if let Ok(mut files) = self.files.lock() {
                files.remove(seg);
            }
            let path = self.segment_path(*seg);
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete a dead segment");
                }
            }
        }
    }

    /// Cuts a point of `kind` at the applied sequence: writes the interval's
    /// changed chunks and the point, and opens the next interval.
    pub fn cut(&self, kind: i32, bookmark_id: &str, now_nanos: u64) -> Result<Point> {
        self.cut_inner(kind, bookmark_id, "", None, now_nanos)
    }

    /// Cuts a multi-VM point at a group bookmark: its time is the round's,
    /// the same on every member.
    pub fn cut_bookmark(
        &self,
        id: &str,
        group: &str,
        round_nanos: u64,
        now_nanos: u64,
    ) -> Result<Point> {
        let kind = ferry_proto::processor::v1::PointKind::MultiVm as i32;
        self.cut_inner(kind, id, group, Some(round_nanos), now_nanos)
    }

    fn cut_inner(
        &self,
        kind: i32,
        bookmark_id: &str,
        group: &str,
        time: Option<u64>,
        now_nanos: u64,
    ) -> Result<Point> {
        let mut w = self.writer()?;
        if let Some(why) = not_cuttable(&w.meta) {
            return Err(ProcessorError::FailedPrecondition(why));
        }
        let point = Point {
            interval: w.meta.interval,
            sequence_cut: w.meta.applied,
            kind,
            time_nanos: time.unwrap_or(w.meta.last_time_nanos),
            created_nanos: now_nanos,
            disks: w.meta.disks.iter().map(|(d, s)| (d.clone(), *s)).collect(),
            pinned_by: Vec::new(),
            bookmark_id: bookmark_id.to_string(),
            group: group.to_string(),
            damaged: None,
        };
        w.meta.interval += 1;
        w.meta.last_point_sequence = point.sequence_cut;
        self.checkpoint_locked(&mut w, Some(&point))?;
        Ok(point)
    }

    /// Every point, oldest first.
    pub fn points(&self) -> Result<Vec<Point>> {
        self.tree
            .scan_prefix(b"p")
            .map(|kv| self.with_damage(unjson(&kv?.1)?))
            .collect()
    }

    /// One point by id.
    pub fn point(&self, id: &str) -> Result<Point> {
        let missing = || {
            ProcessorError::NotFound(format!(
                "VM {:?} has no recovery point {id:?} (unknown or expired); list its points",
                self.vm
            ))
        };
        let interval = parse_point_id(id).ok_or_else(missing)?;
        match self.tree.get(pkey(interval))? {
            Some(b) => self.with_damage(unjson(&b)?),
            None => Err(missing()),
        }
    }

    /// Pins a point for `holder` (idempotent).
    pub fn pin(&self, id: &str, holder: &str) -> Result<Point> {
        let _w = self.writer()?;
        let mut p = self.point(id)?;
        if !p.pinned_by.iter().any(|h| h == holder) {
            p.pinned_by.push(holder.to_string());
            self.tree.insert(pkey(p.interval), json(&p)?)?;
            self.db.flush()?;
        }
        Ok(p)
    }

    /// Releases `holder`'s pin (idempotent).
    pub fn unpin(&self, id: &str, holder: &str) -> Result<Point> {
        let _w = self.writer()?;
        let mut p = self.point(id)?;
        if p.pinned_by.iter().any(|h| h == holder) {
            p.pinned_by.retain(|h| h != holder);
            self.tree.insert(pkey(p.interval), json(&p)?)?;
            self.db.flush()?;
        }
        Ok(p)
    }

    /// Holds `point` against pruning while it is read.
    pub fn lease(self: &Arc<Self>, point: &Point) -> Result<ReadLease> {
        let _w = self.writer()?;
        // Still there under the writer lock, so pruning cannot have begun.
        self.point(&point.id())?;
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
                ProcessorError::NotFound(format!(
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
    fn read_blob_retrying(
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

    /// Deletes the points of `intervals` (skipping pinned or read ones) and
    /// every chunk version no remaining point or the head needs; returns the
    /// points deleted.
    pub fn prune(&self, intervals: &BTreeSet<u64>) -> Result<Vec<u64>> {
        let w = self.writer()?;
        let reading = self.reading.lock().map_err(|_| poisoned())?.clone();
        let points = self.points()?;
        let mut deleted = Vec::new();
        let mut retained = BTreeSet::new();
        for p in &points {
            if intervals.contains(&p.interval)
                && p.pinned_by.is_empty()
                && !reading.contains_key(&p.interval)
            {
                deleted.push(p.interval);
            } else {
                retained.insert(p.interval);
            }
        }
        if deleted.is_empty() {
            return Ok(deleted);
        }
        let mut batch = sled::Batch::default();
        let mut segs = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for g in &deleted {
            batch.remove(pkey(*g));
            // Only versions made after the previous retained point and up to
            // this one can have been needed by this point alone.
            let prev = retained.range(..*g).next_back().copied().unwrap_or(0);
            for kv in self.tree.range(gkey(prev + 1, "", 0)..gkey(g + 1, "", 0)) {
                let (k, _) = kv?;
                if !seen.insert(k.to_vec()) {
                    continue;
                }
                let (version, disk, chunk) = gkey_parts(&k)?;
                // The next version of the chunk, if any.
                let next = self
                    .tree
                    .range(vkey(&disk, chunk, version + 1)..=vkey(&disk, chunk, u64::MAX))
                    .next()
                    .transpose()?
                    .map(|(k, _)| vkey_parts(&k).map(|(_, _, v)| v))
                    .transpose()?;
                let needed = match next {
                    None => true,
                    Some(next) => retained.range(version..next).next().is_some(),
                };
                if !needed {
                    let key = vkey(&disk, chunk, version);
                    if let Some(old) = self.tree.get(&key)? {
                        self.release(&mut segs, &mut batch, &Stored::decode(&old)?)?;
                    }
                    batch.remove(key);
                    batch.remove(k);
                }
            }
        }
        let dead = self.write_segs(&mut batch, &segs, &w);
        batch.insert(META, json(&w.stored_meta())?);
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        self.delete_segments(&dead);
        Ok(deleted)
    }

    /// Moves the live blobs of the sealed segment with the least live share
    /// (below half) into the current one, up to `max_bytes`, then deletes it
    /// once nothing in it is live. Returns the bytes moved.
    pub fn compact_step(&self, max_bytes: u64) -> Result<u64> {
        let mut w = self.writer()?;
        let current = w.current.as_ref().map(|cur| cur.id);
        let mut victim: Option<(u64, SegMeta)> = None;
        for kv in self.tree.scan_prefix(b"s") {
            let (k, v) = kv?;
            if k.len() != 9 {
                return Err(ProcessorError::Corrupt("segment key".into()));
            }
            let seg = be64(&k[1..]);
            let m: SegMeta = unjson(&v)?;
            if Some(seg) == current || m.bytes == 0 || m.live * 2 > m.bytes {
                continue;
            }
            if victim.is_none_or(|(_, best)| m.live * best.bytes < best.live * m.bytes) {
                victim = Some((seg, m));
            }
        }
        let Some((seg, _)) = victim else {
            return Ok(0);
        };
        let mut moved = 0u64;
        let mut batch = sled::Batch::default();
        let mut segs = BTreeMap::new();
        let mut moves = Vec::new();
        for kv in self.tree.scan_prefix(&rkey(seg, 0)[..9]) {
            if moved >= max_bytes {
                break;
            }
            let (rk, vk) = kv?;
            let Some(val) = self.tree.get(&vk)? else {
                batch.remove(rk);
                continue;
            };
            let old = Stored::decode(&val)?;
            let data = match self.read_blob(&old) {
                Ok(data) => data,
                // Left where it is, for inspection; the damage is recorded
                // (the head asked for again when it reads it).
                Err(e @ ProcessorError::DataLoss(_)) => {
                    self.damage_locked(&mut w, &vk, "compaction", &e.to_string())?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let new = self.append_blob(&mut w, &data)?;
            moved += old.footprint();
            moves.push((rk, vk, old, new));
        }
        self.sync_current(&mut w)?;
        for (rk, vk, old, new) in moves {
            self.release(&mut segs, &mut batch, &old)?;
            batch.remove(rk);
            if let Stored::Data { seg, off, len, .. } = new {
                let m = self.seg_meta(&mut segs, seg)?;
                m.bytes = m.bytes.max(off + BLOB_HEADER + u64::from(len));
                m.live += BLOB_HEADER + u64::from(len);
                batch.insert(rkey(seg, off), vk.to_vec());
            }
            batch.insert(vk, new.encode());
        }
        let dead = self.write_segs(&mut batch, &segs, &w);
        batch.insert(META, json(&w.stored_meta())?);
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        self.delete_segments(&dead);
        Ok(moved)
    }

    /// Bytes of segment files on disk.
    pub fn disk_bytes(&self) -> Result<u64> {
        let mut total = 0;
        let entries = fs::read_dir(&self.dir).map_err(|e| ProcessorError::io(&self.dir, e))?;
        for e in entries.flatten() {
            total += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
        Ok(total)
    }
}

fn dirty_len(d: &Dirty) -> usize {
    match d {
        Dirty::Zero => 0,
        Dirty::Data(v) => v.len(),
    }
}

/// Data for `offset..offset + length` arrived: mismatched ranges inside it
/// are resolved.
fn resolve(meta: &mut Meta, disk: &str, offset: u64, length: u64) {
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
fn mark_mismatched(
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

fn not_cuttable(meta: &Meta) -> Option<String> {
    if !meta.gap.is_empty() {
        let disks: Vec<&str> = meta.gap.iter().map(String::as_str).collect();
        return Some(format!(
            "disk(s) {} must be checked whole against the source ({}); no recovery point \
             until that resync",
            disks.join(", "),
            meta.gap_reason
        ));
    }
    if let Some((disk, ranges)) = meta.mismatched.iter().next() {
        return Some(format!(
            "disk {disk} has {} range(s) that differ from the source after a checksum \
             resync; no recovery point until they arrive",
            ranges.len()
        ));
    }
    if !meta.syncing.is_empty() {
        let disks: Vec<&str> = meta.syncing.iter().map(String::as_str).collect();
        return Some(format!(
            "disk(s) {} are in initial replication or resync; no recovery point until they finish",
            disks.join(", ")
        ));
    }
    let missing: Vec<&str> = meta
        .disks
        .keys()
        .filter(|d| !meta.synced.contains(*d))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "disk(s) {} have not completed initial replication; no recovery point yet",
            missing.join(", ")
        ));
    }
    None
}
