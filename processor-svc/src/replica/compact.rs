//! Compaction: moving the live blobs out of a mostly dead segment so that
//! it can be deleted.

use std::collections::BTreeMap;

use super::blobs::{SegMeta, Stored, BLOB_HEADER};
use super::keys::{be64, json, rkey, unjson, META};
use super::{Result, VmReplica};
use crate::error::ProcessorError;

impl VmReplica {
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
}
