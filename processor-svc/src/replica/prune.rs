//! Retention: deleting points and every chunk version no retained point
//! (or the head) reads any more.

use std::collections::{BTreeMap, BTreeSet};

use super::blobs::Stored;
use super::keys::{gkey, gkey_parts, json, pkey, vkey, vkey_parts, META};
use super::{poisoned, Result, VmReplica};

impl VmReplica {
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
}
