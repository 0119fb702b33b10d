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
                let needed = self.needed(&disk, chunk, version, &retained)?;
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

impl VmReplica {
    /// Whether a retained point (or the head) reads `version` of a chunk:
    /// it is the newest at or below the point's interval, or a patch that
    /// such a point reads lies over it (a patch is read with every version
    /// under it down to a whole one).
    fn needed(
        &self,
        disk: &str,
        chunk: u64,
        version: u64,
        retained: &BTreeSet<u64>,
    ) -> Result<bool> {
        let mut at = version;
        loop {
            // The next version of the chunk, if any.
            let next = self
                .tree
                .range(vkey(disk, chunk, at + 1)..=vkey(disk, chunk, u64::MAX))
                .next()
                .transpose()?;
            let Some((k, v)) = next else {
                return Ok(true);
            };
            let next = vkey_parts(&k)?.2;
            if retained.range(at..next).next().is_some() {
                return Ok(true);
            }
            if Stored::decode(&v)?.is_whole() {
                return Ok(false);
            }
            at = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::super::testing::{Fixture, CHUNK, SIZE};

    #[test]
    fn a_pruned_interval_keeps_the_versions_retained_points_read_and_frees_the_rest() {
        let mut f = Fixture::new(1 << 20);
        let mut image = vec![0u8; SIZE as usize];
        let mut points = Vec::new();
        // Chunk 0 in every interval, chunk 1 only in the second, chunk 2 in
        // the first and the third.
        for (chunks, byte) in [(&[0, 2][..], 1), (&[0, 1], 2), (&[0, 2], 3), (&[0], 4)] {
            f.write_chunks(&mut image, chunks, byte);
            points.push((f.cut(), image.clone()));
        }
        // Chunk 1 again in the open interval, written before its point: the
        // last point still reads the version of the second interval.
        f.write_chunks(&mut image, &[1], 5);
        f.replica.checkpoint().unwrap();
        let interval = |i: usize| points[i].0.interval;
        let pruned = f
            .replica
            .prune(&BTreeSet::from([interval(1), interval(2)]))
            .unwrap();
        assert_eq!(pruned, vec![interval(1), interval(2)]);
        for i in [0, 3] {
            assert!(f.read_all(&points[i].0) == points[i].1, "point {i}");
        }
        // Kept: what points 0 and 3 (and the head) read; chunk 0's versions
        // of the pruned intervals are read by no one now.
        let (a, b, c, d) = (interval(0), interval(1), interval(2), interval(3));
        let mut expected = vec![(0, a), (0, d), (1, b), (1, d + 1), (2, a), (2, c)];
        expected.sort();
        assert_eq!(f.versions(), expected);
        // Freed in the segment accounting too: only the kept blobs are live.
        let live: u64 = f
            .replica
            .tree
            .scan_prefix(b"s")
            .map(|kv| {
                let m: super::super::blobs::SegMeta =
                    super::super::keys::unjson(&kv.unwrap().1).unwrap();
                m.live
            })
            .sum();
        assert_eq!(live, 6 * (super::super::blobs::BLOB_HEADER + CHUNK));
    }
}
