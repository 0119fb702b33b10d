//! Damaged chunk versions: blobs that failed their checksum on a read, in
//! compaction or in the background scrub. Each is recorded durably (its own
//! index entry), never served: a point that reads one is marked damaged and
//! refused (DATA_LOSS) for reads and failover; when the head reads one, its
//! range is asked of the agent again (as a checksum mismatch is), so the
//! replica is repaired from the source and no point is cut until then. The
//! damaged blob stays in its segment for inspection.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::apply::mark_mismatched;
use super::blobs::{BlobAt, Stored, Writer};
use super::interval::Dirty;
use super::interval::Point;
use super::keys::{json, rkey, unjson, vkey, vkey_parts, META};
use super::{Result, VmReplica};
use crate::error::ProcessorError;

/// The index entry of the damage record.
const DAMAGE: &[u8] = b"d";

/// What the scrub found in one step.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Scrubbed {
    /// Blob bytes read and checked.
    pub bytes: u64,
    /// Damaged versions found (new ones).
    pub damaged: u64,
    /// The scrub went round the whole replica and starts again.
    pub wrapped: bool,
}

/// One damaged chunk version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Damaged {
    pub disk: String,
    pub chunk: u64,
    pub version: u64,
    /// Segment and byte offset of the blob, and what found it.
    pub segment: u64,
    pub offset: u64,
    pub found_by: String,
    pub why: String,
    /// The newest version of its chunk (the replica's head reads it, until
    /// the agent has sent the chunk again). Worked out when asked.
    #[serde(skip)]
    pub head: bool,
}

/// Every damaged version of a VM's replica, by (disk, chunk, version).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Damage {
    versions: BTreeMap<String, Damaged>,
}

fn key(disk: &str, chunk: u64, version: u64) -> String {
    format!("{disk}/{chunk}/{version}")
}

impl Damage {
    pub(super) fn load(tree: &sled::Tree) -> Result<Damage> {
        match tree.get(DAMAGE)? {
            Some(b) => unjson(&b),
            None => Ok(Damage::default()),
        }
    }

    /// Every damaged version.
    pub fn all(&self) -> impl Iterator<Item = &Damaged> {
        self.versions.values()
    }

    pub fn is_empty(&self) -> bool {
        self.versions.is_empty()
    }
}

impl VmReplica {
    /// The damaged versions still kept (those pruned since are forgotten).
    pub fn damage(&self) -> Result<Vec<Damaged>> {
        let mut d = self.damage.lock().map_err(|_| super::poisoned())?;
        if d.is_empty() {
            return Ok(Vec::new());
        }
        let before = d.versions.len();
        let mut gone = Vec::new();
        for (k, v) in &d.versions {
            if !self.tree.contains_key(vkey(&v.disk, v.chunk, v.version))? {
                gone.push(k.clone());
            }
        }
        for k in gone {
            d.versions.remove(&k);
        }
        if d.versions.len() != before {
            self.tree.insert(DAMAGE, json(&*d)?)?;
        }
        let mut out: Vec<Damaged> = d.all().cloned().collect();
        drop(d);
        for v in &mut out {
            v.head = self.reads(&v.disk, v.chunk, u64::MAX, v.version)?;
        }
        Ok(out)
    }

    /// `point` with why it is damaged, if it reads a damaged version.
    pub(super) fn with_damage(&self, mut point: Point) -> Result<Point> {
        let damaged: Vec<Damaged> = {
            let d = self.damage.lock().map_err(|_| super::poisoned())?;
            if d.is_empty() {
                return Ok(point);
            }
            d.all().cloned().collect()
        };
        for v in damaged {
            if v.version <= point.interval
                && self.reads(&v.disk, v.chunk, point.interval, v.version)?
            {
                point.damaged = Some(format!(
                    "chunk {} of disk {:?} (segment {} offset {}) failed its checksum ({}, \
                     found by {}); this point cannot be read or failed over: choose another",
                    v.chunk, v.disk, v.segment, v.offset, v.why, v.found_by
                ));
                break;
            }
        }
        Ok(point)
    }

    /// Whether a point closing `interval` reads `version` of a chunk (the
    /// version it reads, or one under its patches).
    fn reads(&self, disk: &str, chunk: u64, interval: u64, version: u64) -> Result<bool> {
        Ok(self
            .chain_at(disk, chunk, interval)?
            .iter()
            .any(|(v, _)| *v == version))
    }

    /// Records that the blob of `stored` failed its checksum.
    pub(super) fn note_damage(&self, stored: &Stored, found_by: &str, why: &str) -> Result<()> {
        let Some(BlobAt { seg, off, .. }) = stored.blob() else {
            return Ok(());
        };
        let Some(vk) = self.tree.get(rkey(seg, off))? else {
            // Moved or pruned meanwhile: nothing reads it any more.
            return Ok(());
        };
        let mut w = self.writer()?;
        self.damage_locked(&mut w, &vk, found_by, why)
    }

    /// As [`VmReplica::note_damage`], for the version key `vk`, with the
    /// writer held.
    pub(super) fn damage_locked(
        &self,
        w: &mut Writer,
        vk: &[u8],
        found_by: &str,
        why: &str,
    ) -> Result<()> {
        let (disk, chunk, version) = vkey_parts(vk)?;
        let Some(value) = self.tree.get(vk)? else {
            return Ok(());
        };
        let Some(BlobAt { seg, off, .. }) = Stored::decode(&value)?.blob() else {
            return Ok(());
        };
        {
            let mut d = self.damage.lock().map_err(|_| super::poisoned())?;
            let k = key(&disk, chunk, version);
            if d.versions.contains_key(&k) {
                return Ok(());
            }
            tracing::error!(
                vm = %self.vm,
                disk,
                chunk,
                version,
                segment = seg,
                offset = off,
                found_by,
                why,
                "a replica blob failed its checksum: never served; points reading it are refused"
            );
            d.versions.insert(
                k,
                Damaged {
                    disk: disk.clone(),
                    chunk,
                    version,
                    segment: seg,
                    offset: off,
                    found_by: found_by.to_string(),
                    why: why.to_string(),
                    head: false,
                },
            );
            self.tree.insert(DAMAGE, json(&*d)?)?;
        }
        // The head reads it (no newer version, none in memory): the source
        // sends the chunk again; no point until it has.
        // A patch in memory is still put down on what the head reads.
        let replaced = matches!(
            w.dirty.get(&(disk.clone(), chunk)),
            Some(Dirty::Data(_) | Dirty::Zero)
        );
        let head = self.reads(&disk, chunk, u64::MAX, version)? && !replaced;
        if head {
            if let Some(size) = w.meta.disks.get(&disk).copied() {
                let start = chunk.saturating_mul(self.chunk);
                let end = start.saturating_add(self.chunk).min(size);
                for meta in [&mut w.meta, &mut w.flushed] {
                    mark_mismatched(meta, &disk, start, end, size);
                }
                self.tree.insert(META, json(&w.stored_meta())?)?;
            }
        }
        self.db.flush()?;
        Ok(())
    }

    /// Checks up to `max_bytes` of blobs against their checksums, going on
    /// from where the last step stopped, and records what is damaged.
    pub fn scrub_step(&self, max_bytes: u64) -> Result<Scrubbed> {
        let mut done = Scrubbed::default();
        let mut start = self.scrub_at.lock().map_err(|_| super::poisoned())?.clone();
        if start.is_empty() {
            // The blob keys ('r' and a segment and offset), from the first.
            start = b"r".to_vec();
        }
        let mut next = start.clone();
        let mut iter = self.tree.range(start.clone()..);
        loop {
            if done.bytes >= max_bytes {
                break;
            }
            let Some(kv) = iter.next() else {
                done.wrapped = true;
                next = Vec::new();
                break;
            };
            let (rk, vk) = kv?;
            if rk.first() != Some(&b'r') {
                done.wrapped = true;
                next = Vec::new();
                break;
            }
            next = rk.to_vec();
            next.push(0);
            let Some(value) = self.tree.get(&vk)? else {
                continue;
            };
            let stored = Stored::decode(&value)?;
            done.bytes += stored.footprint();
            match self.read_blob(&stored) {
                Ok(_) => {}
                Err(e @ ProcessorError::DataLoss(_)) => {
                    let known = self
                        .damage
                        .lock()
                        .map_err(|_| super::poisoned())?
                        .versions
                        .len();
                    let mut w = self.writer()?;
                    self.damage_locked(&mut w, &vk, "the scrub", &e.to_string())?;
                    drop(w);
                    let now = self
                        .damage
                        .lock()
                        .map_err(|_| super::poisoned())?
                        .versions
                        .len();
                    done.damaged += (now - known) as u64;
                }
                // Compaction moved it meanwhile (its segment is gone).
                Err(ProcessorError::Io { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        *self.scrub_at.lock().map_err(|_| super::poisoned())? = next;
        Ok(done)
    }
}
