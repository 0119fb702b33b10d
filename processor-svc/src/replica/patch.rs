//! A chunk's partial changes: the extents written over its previous
//! version. A 4 KiB write into a 64 KiB chunk is kept (in memory, then in
//! a blob of its own) as those 4 KiB and where they go, not as a new copy of
//! the whole chunk: replica space follows the bytes written, and applying
//! a small write reads nothing.

use std::collections::BTreeMap;

use crate::error::ProcessorError;

/// What an extent puts down.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Piece {
    Data(Vec<u8>),
    /// This many zero bytes.
    Zero(u32),
}

impl Piece {
    pub(super) fn len(&self) -> u32 {
        match self {
            Piece::Data(d) => d.len() as u32,
            Piece::Zero(n) => *n,
        }
    }

    /// The part `from..to` (offsets within the piece).
    fn slice(&self, from: u32, to: u32) -> Piece {
        match self {
            Piece::Data(d) => Piece::Data(d[from as usize..to as usize].to_vec()),
            Piece::Zero(_) => Piece::Zero(to - from),
        }
    }
}

/// Extents over a chunk's previous version, by offset in the chunk; they
/// never overlap.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Patch {
    pieces: BTreeMap<u32, Piece>,
}

/// Bytes of an encoded extent's header: offset u32, length u32, kind u8.
const EXTENT_HEADER: usize = 9;
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 0;

fn corrupt(why: &str) -> ProcessorError {
    ProcessorError::Corrupt(format!("chunk patch: {why}"))
}

impl Patch {
    /// Puts `piece` at `at`, over whatever the patch held there.
    pub(super) fn put(&mut self, at: u32, piece: Piece) {
        let end = at + piece.len();
        if piece.len() == 0 {
            return;
        }
        // The pieces that overlap at..end: cut out what they hold there.
        let overlapping: Vec<u32> = self
            .pieces
            .range(..end)
            .rev()
            .take_while(|(s, p)| *s + p.len() > at)
            .map(|(s, _)| *s)
            .collect();
        for s in overlapping {
            let Some(old) = self.pieces.remove(&s) else {
                continue;
            };
            let old_end = s + old.len();
            if s < at {
                self.pieces.insert(s, old.slice(0, at - s));
            }
            if old_end > end {
                self.pieces.insert(end, old.slice(end - s, old.len()));
            }
        }
        // A data piece right after data joins it: sequential small writes
        // stay one extent.
        if let Piece::Data(bytes) = &piece {
            if let Some((s, Piece::Data(prev))) = self.pieces.range_mut(..at).next_back() {
                if *s + prev.len() as u32 == at {
                    prev.extend_from_slice(bytes);
                    return;
                }
            }
        }
        self.pieces.insert(at, piece);
    }

    /// Every piece of `newer` put over this patch.
    pub(super) fn overlay(&mut self, newer: Patch) {
        for (at, piece) in newer.pieces {
            self.put(at, piece);
        }
    }

    /// Bytes of the chunk the patch covers.
    pub(super) fn covered(&self) -> u64 {
        self.pieces.values().map(|p| u64::from(p.len())).sum()
    }

    /// Bytes of data it holds in memory.
    pub(super) fn data_bytes(&self) -> usize {
        self.pieces
            .values()
            .map(|p| match p {
                Piece::Data(d) => d.len(),
                Piece::Zero(_) => 0,
            })
            .sum()
    }

    /// Puts the patch down on `chunk` (the previous version's bytes).
    pub(super) fn apply_to(&self, chunk: &mut [u8]) -> Result<(), ProcessorError> {
        for (at, piece) in &self.pieces {
            let range = *at as usize..(*at + piece.len()) as usize;
            let target = chunk
                .get_mut(range)
                .ok_or_else(|| corrupt("an extent past the chunk's end"))?;
            match piece {
                Piece::Data(d) => target.copy_from_slice(d),
                Piece::Zero(_) => target.fill(0),
            }
        }
        Ok(())
    }

    /// The blob: `count u32 BE`, then per extent `offset u32 BE | length u32
    /// BE | kind u8` (1 data, 0 zeros), then the data extents' bytes in
    /// order. The blob's frame carries its checksum.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.pieces.len() * EXTENT_HEADER + self.data_bytes());
        out.extend_from_slice(&(self.pieces.len() as u32).to_be_bytes());
        for (at, piece) in &self.pieces {
            out.extend_from_slice(&at.to_be_bytes());
            out.extend_from_slice(&piece.len().to_be_bytes());
            out.push(match piece {
                Piece::Data(_) => KIND_DATA,
                Piece::Zero(_) => KIND_ZERO,
            });
        }
        for piece in self.pieces.values() {
            if let Piece::Data(d) = piece {
                out.extend_from_slice(d);
            }
        }
        out
    }

    /// A blob [`Patch::encode`] wrote; anything else is refused.
    pub(super) fn decode(b: &[u8]) -> Result<Patch, ProcessorError> {
        let count = b
            .get(..4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
            .ok_or_else(|| corrupt("short"))?;
        let headers = count
            .checked_mul(EXTENT_HEADER)
            .and_then(|n| n.checked_add(4))
            .filter(|n| *n <= b.len())
            .ok_or_else(|| corrupt("more extents than bytes"))?;
        let mut data = &b[headers..];
        let mut pieces = BTreeMap::new();
        let mut end = 0u64;
        for h in b[4..headers].chunks_exact(EXTENT_HEADER) {
            let at = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            if u64::from(at) < end || len == 0 {
                return Err(corrupt("extents out of order"));
            }
            end = u64::from(at) + u64::from(len);
            let piece = match h[8] {
                KIND_DATA => {
                    let (bytes, rest) = data
                        .split_at_checked(len as usize)
                        .ok_or_else(|| corrupt("fewer bytes than extents"))?;
                    data = rest;
                    Piece::Data(bytes.to_vec())
                }
                KIND_ZERO => Piece::Zero(len),
                _ => return Err(corrupt("unknown extent kind")),
            };
            pieces.insert(at, piece);
        }
        if !data.is_empty() {
            return Err(corrupt("bytes past the last extent"));
        }
        Ok(Patch { pieces })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: the same writes on a plain buffer.
    fn check(ops: &[(u32, Piece)], len: usize) {
        let mut patch = Patch::default();
        let mut want = vec![0xeeu8; len];
        for (at, piece) in ops {
            patch.put(*at, piece.clone());
            let range = *at as usize..(*at + piece.len()) as usize;
            match piece {
                Piece::Data(d) => want[range].copy_from_slice(d),
                Piece::Zero(_) => want[range].fill(0),
            }
        }
        let mut got = vec![0xeeu8; len];
        patch.apply_to(&mut got).unwrap();
        assert_eq!(got, want, "{ops:?}");
        let again = Patch::decode(&patch.encode()).unwrap();
        assert_eq!(again, patch);
        // No overlaps, and the covered bytes are those written.
        let mut end = 0;
        for (at, p) in &patch.pieces {
            assert!(*at >= end);
            end = at + p.len();
        }
    }

    #[test]
    fn pieces_put_over_each_other_read_as_the_writes_in_order() {
        let data = |n: usize, b: u8| Piece::Data(vec![b; n]);
        check(
            &[(0, data(10, 1)), (5, data(10, 2)), (2, Piece::Zero(4))],
            64,
        );
        check(&[(20, data(10, 1)), (0, data(64, 2))], 64);
        check(&[(0, data(8, 1)), (8, data(8, 2)), (16, data(8, 3))], 64);
        check(
            &[(10, data(30, 1)), (15, Piece::Zero(5)), (12, data(2, 9))],
            64,
        );
        // Seeded random extents over a 4 KiB chunk.
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200 {
            let ops: Vec<(u32, Piece)> = (0..next() % 12 + 1)
                .map(|i| {
                    let at = (next() % 4096) as u32;
                    let len = (next() % u64::from(4096 - at)) as u32 + 1;
                    let piece = if next() % 4 == 0 {
                        Piece::Zero(len)
                    } else {
                        data(len as usize, i as u8 + 1)
                    };
                    (at.min(4095), piece)
                })
                .collect();
            check(&ops, 4096);
        }
    }

    #[test]
    fn a_damaged_patch_blob_is_refused_not_applied() {
        let mut patch = Patch::default();
        patch.put(4, Piece::Data(vec![1; 8]));
        patch.put(20, Piece::Zero(4));
        let blob = patch.encode();
        assert!(Patch::decode(&blob[..blob.len() - 1]).is_err(), "short");
        let mut more = blob.clone();
        more.push(0);
        assert!(Patch::decode(&more).is_err(), "trailing bytes");
        let mut kind = blob.clone();
        kind[4 + 8] = 7;
        assert!(Patch::decode(&kind).is_err(), "unknown kind");
        let mut past = Patch::default();
        past.put(60, Piece::Data(vec![1; 8]));
        assert!(past.apply_to(&mut [0u8; 64]).is_err(), "past the chunk");
    }
}

/// Partial writes through the whole replica: points, checkpoints inside an
/// interval, thinning, compaction and restarts, each point read back and
/// digested against a reference image.
#[cfg(test)]
mod replica_tests {
    use std::collections::BTreeSet;

    use ferry_proto::cache::v1::record::Op;
    use ferry_proto::cache::v1::{WriteOp, ZeroOp};

    use super::super::blobs::{Stored, BLOB_HEADER};
    use super::super::testing::{Fixture, CHUNK, SIZE};
    use super::super::Point;

    use ferry_testkit::Rng;

    trait Below {
        fn below(&mut self, n: u64) -> u64;
    }

    impl Below for Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const SEGMENT: u64 = 16 * 1024;

    fn check(f: &Fixture, points: &[(Point, Vec<u8>)], seed: u64) {
        for (i, (point, image)) in points.iter().enumerate() {
            let read = f.read_all(point);
            if read != *image {
                let at = read.iter().zip(image).position(|(a, b)| a != b).unwrap();
                panic!(
                    "seed {seed:#x}: point {i} ({}) differs at byte {at}",
                    point.interval
                );
            }
            let (chunk, digest) = f.replica.digest(point, "os").unwrap();
            assert_eq!(
                digest,
                ferry_proto::digest::of_bytes(chunk, image),
                "seed {seed:#x}: digest of point {i}"
            );
        }
    }

    #[test]
    fn random_partial_writes_read_back_at_every_point_through_thinning_compaction_and_restarts() {
        let seed = ferry_testkit::chaos::seed_from_env(0x5eed_9a7c);
        eprintln!("seed {seed:#x} (FERRY_TEST_SEED={seed:x} repeats it)");
        let mut rng = Rng(seed | 1);
        let mut f = Fixture::new(SEGMENT);
        let mut image = vec![0u8; SIZE as usize];
        let mut points: Vec<(Point, Vec<u8>)> = Vec::new();
        let mut patched = 0;
        for step in 0..1500u64 {
            match rng.below(100) {
                0..=59 => {
                    // Anywhere, any length up to three chunks.
                    let offset = rng.below(SIZE);
                    let len = (rng.below(3 * CHUNK) + 1).min(SIZE - offset);
                    let data: Vec<u8> = (0..len).map(|i| (step + i * 7) as u8 | 1).collect();
                    image[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                    f.apply(Op::Write(WriteOp {
                        offset,
                        data: data.into(),
                    }));
                }
                60..=69 => {
                    let offset = rng.below(SIZE);
                    let length = (rng.below(2 * CHUNK) + 1).min(SIZE - offset);
                    image[offset as usize..(offset + length) as usize].fill(0);
                    f.apply(Op::WriteZeroes(ZeroOp { offset, length }));
                }
                70..=74 => {
                    let c = rng.below(SIZE / CHUNK);
                    f.write_chunks(&mut image, &[c], (step as u8) | 1);
                }
                75..=84 => points.push((f.cut(), image.clone())),
                85..=89 => {
                    f.replica.checkpoint().unwrap();
                }
                90..=93 if points.len() > 2 => {
                    // Thin: a random half of the points go.
                    let mut gone = BTreeSet::new();
                    points.retain(|(p, _)| {
                        let drop = rng.below(2) == 0;
                        if drop {
                            gone.insert(p.interval);
                        }
                        !drop
                    });
                    f.replica.prune(&gone).unwrap();
                }
                94..=96 => {
                    f.replica.compact_step(u64::MAX).unwrap();
                }
                97..=99 => {
                    f.replica.checkpoint().unwrap();
                    f = f.reopen(SEGMENT);
                }
                _ => {}
            }
            patched = patched.max(
                f.replica
                    .tree
                    .scan_prefix(b"v")
                    .filter(|kv| {
                        matches!(
                            Stored::decode(&kv.as_ref().unwrap().1),
                            Ok(Stored::Patch { .. })
                        )
                    })
                    .count(),
            );
            if step % 100 == 99 {
                check(&f, &points, seed);
            }
        }
        points.push((f.cut(), image.clone()));
        check(&f, &points, seed);
        assert!(patched > 0, "partial writes were stored as patches");
    }

    #[test]
    fn small_random_writes_take_about_the_space_they_write() {
        let mut f = Fixture::new(1 << 20);
        let mut rng = Rng(0x2545f4914f6cdd1d);
        let mut image = vec![0u8; SIZE as usize];
        let mut points = Vec::new();
        let mut written = 0u64;
        for i in 0..2000u64 {
            let offset = rng.below(SIZE / 512) * 512;
            let data = vec![(i % 251) as u8 + 1; 512];
            image[offset as usize..offset as usize + 512].copy_from_slice(&data);
            f.apply(Op::Write(WriteOp {
                offset,
                data: data.into(),
            }));
            written += 512;
            if i % 50 == 49 {
                points.push((f.cut(), image.clone()));
            }
        }
        check(&f, &points, 0);
        // Patches of what was written, and a whole version after every two
        // chunks' worth of patches of a chunk: at most 1.5 times, plus the
        // blobs' headers. A whole chunk per point it changed would be 8x.
        let on_disk = f.replica.disk_bytes().unwrap();
        let headers = 40 * (BLOB_HEADER + 4 + 9);
        assert!(
            on_disk <= written * 3 / 2 + 2000 * headers / 40,
            "{on_disk} bytes on disk for {written} written"
        );
    }
}
