//! Compaction: moving the live blobs out of a mostly dead segment so that
//! it can be deleted.

use std::collections::BTreeMap;

use super::blobs::{BlobAt, SegMeta, Stored, BLOB_HEADER};
use super::keys::{be64, json, rkey, unjson, META};
use super::{Result, VmReplica};
use crate::error::ProcessorError;

impl VmReplica {
    /// Moves the live blobs of the sealed segment with the least live share
    /// (below half) into the current one, up to `max_bytes`, then deletes it
    /// once nothing in it is live. Returns the bytes moved.
    pub fn compact_step(&self, max_bytes: u64) -> Result<u64> {
        let mut w = self.writer()?;
        let current = w.current.as_ref().map(|cur| cur.id());
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
            let new = old.moved(self.append_blob(&mut w, &data)?);
            moved += old.footprint();
            moves.push((rk, vk, old, new));
        }
        self.sync_current(&mut w)?;
        for (rk, vk, old, new) in moves {
            self.release(&mut segs, &mut batch, &old)?;
            batch.remove(rk);
            if let Some(BlobAt { seg, off, len, .. }) = new.blob() {
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
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::super::blobs::{Stored, BLOB_HEADER};
    use super::super::keys::vkey;
    use super::super::testing::{Fixture, CHUNK, SIZE};

    /// Four blobs a segment. Segment 1 holds chunks 0-3 of the first point,
    /// pruned; the second point rewrote chunks 0-2 (segment 2) and still
    /// reads chunk 3 from segment 1: a quarter of it is live.
    fn mostly_dead_first_segment() -> (Fixture, super::super::Point, Vec<u8>) {
        let mut f = Fixture::new(4 * (BLOB_HEADER + CHUNK));
        let mut image = vec![0u8; SIZE as usize];
        f.write_chunks(&mut image, &[0, 1, 2, 3], 1);
        let first = f.cut();
        f.write_chunks(&mut image, &[0, 1, 2], 2);
        let second = f.cut();
        f.replica.prune(&BTreeSet::from([first.interval])).unwrap();
        (f, second, image)
    }

    fn chunk_3(f: &Fixture, point: &super::super::Point) -> Stored {
        f.replica.chain_at("os", 3, point.interval).unwrap()[0].1
    }

    #[test]
    fn compaction_moves_live_blobs_without_changing_what_a_point_reads() {
        let (f, point, image) = mostly_dead_first_segment();
        assert!(matches!(chunk_3(&f, &point), Stored::Data { seg: 1, .. }));
        let moved = f.replica.compact_step(u64::MAX).unwrap();
        assert_eq!(moved, BLOB_HEADER + CHUNK, "one live blob moved");
        assert!(matches!(chunk_3(&f, &point), Stored::Data { seg: 2, .. }));
        assert!(f.read_all(&point) == image);
        assert!(!f.segment_path(1).exists(), "the emptied segment goes");
        assert_eq!(f.replica.compact_step(u64::MAX).unwrap(), 0, "nothing left");
        assert!(f.read_all(&point) == image);
    }

    #[test]
    fn compaction_leaves_a_damaged_blob_in_place_and_records_it() {
        let (f, point, _) = mostly_dead_first_segment();
        let before = chunk_3(&f, &point);
        let Stored::Data { off, .. } = before else {
            panic!("chunk 3 is data");
        };
        let path = f.segment_path(1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(off + BLOB_HEADER) as usize + 100] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();

        assert_eq!(f.replica.compact_step(u64::MAX).unwrap(), 0);
        assert_eq!(chunk_3(&f, &point), before, "still where it was");
        assert!(path.exists());
        let key = vkey("os", 3, point.interval - 1);
        assert!(f.replica.tree.contains_key(key).unwrap());
        let damage = f.replica.damage().unwrap();
        assert_eq!(damage.len(), 1);
        assert_eq!((damage[0].chunk, damage[0].segment), (3, 1));
        let point = f.replica.point(point.id()).unwrap();
        assert!(point.damaged.is_some(), "the point reading it is refused");
    }
}
