//! Property tests of what processor-svc decodes from its disk and from the
//! cache: segment blobs (`crc32c | len | bytes`), the sled index (keys and
//! values), and records as they arrive. None may panic; a flipped or lost
//! byte of a blob, or of a chunk version's index entry, is an error, never
//! data. Bounded for CI; `PROPTEST_CASES=100000` runs longer
//! (docs/reliability.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_proto::cache::v1::record::Op;
use ferry_proto::cache::v1::{ChunkDigests, Marker, MarkerKind, Record, WriteOp, ZeroOp};
use ferry_proto::ids::Incarnation;
use ferry_testkit::props;
use processor_svc::replica::{Point, PointKind, Replicas, VmReplica};
use processor_svc::ProcessorError;
use proptest::collection::vec;
use proptest::prelude::*;

const CHUNK: u64 = 4096;
/// Not a whole number of chunks.
const SIZE: u64 = 8 * CHUNK + 1024;

/// Opens `what` once the previous handle's sled has let go of its lock
/// (its flusher thread drops it a moment after the last handle).
fn reopened<T, E: std::fmt::Debug>(mut what: impl FnMut() -> Result<T, E>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match what() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("cannot reopen: {e:?}"),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn open(dir: &Path) -> Replicas {
    reopened(|| Replicas::open(dir, CHUNK, 16 * 1024))
}

fn disks(size: u64) -> BTreeMap<String, u64> {
    BTreeMap::from([("os".to_string(), size)])
}

fn seal(sequence: u64, disk: &str, op: Op) -> Record {
    let mut r = Record {
        sequence,
        disk_id: disk.into(),
        op: Some(op),
        crc32c: 0,
        captured_at_unix_nanos: sequence,
    };
    ferry_proto::checksum::seal(&mut r);
    r
}

/// A replica of one disk that completed its initial sync; the next sequence.
fn synced(replicas: &Replicas, size: u64) -> (std::sync::Arc<VmReplica>, u64) {
    let replica = replicas
        .open_vm_with("vm", &disks(size), Incarnation(0))
        .unwrap();
    for (seq, kind) in [(1, MarkerKind::SyncStarted), (2, MarkerKind::SyncCompleted)] {
        let marker = Op::Marker(Marker {
            kind: kind as i32,
            id: String::new(),
            time_unix_nanos: 0,
        });
        replica.apply(&seal(seq, "os", marker)).unwrap();
    }
    (replica, 3)
}

/// A write inside the disk: sector offset and count, and a seed for its
/// bytes (never all zeros, so that each chunk it touches has a blob).
#[derive(Debug, Clone)]
struct Write {
    sector: u64,
    sectors: u64,
    seed: u8,
}

fn write() -> impl Strategy<Value = Write> {
    (0..SIZE / 512, 1u64..24, any::<u8>()).prop_map(|(sector, sectors, seed)| Write {
        sector,
        sectors: sectors.min(SIZE / 512 - sector),
        seed,
    })
}

fn bytes_of(w: &Write) -> Vec<u8> {
    (0..w.sectors * 512)
        .map(|i| (i as u8).wrapping_mul(17).wrapping_add(w.seed) | 1)
        .collect()
}

/// Rounds of writes, a point cut after each; the points and what each
/// must read.
fn build(dir: &Path, rounds: &[Vec<Write>]) -> Vec<(Point, Vec<u8>)> {
    let replicas = open(dir);
    let (replica, mut seq) = synced(&replicas, SIZE);
    let mut shadow = vec![0u8; SIZE as usize];
    let mut points = Vec::new();
    for round in rounds {
        for w in round {
            let data = bytes_of(w);
            let offset = w.sector * 512;
            shadow[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            let op = Op::Write(WriteOp {
                offset,
                data: data.into(),
            });
            replica.apply(&seal(seq, "os", op)).unwrap();
            seq += 1;
        }
        points.push((
            replica.cut(PointKind::CrashConsistent, "", seq).unwrap(),
            shadow.clone(),
        ));
    }
    points
}

/// A disk at a point, holes as zeros; checks the extents' shape on the way.
fn read_all(replica: &VmReplica, point: &Point, size: u64) -> Result<Vec<u8>, ProcessorError> {
    let mut out = vec![0u8; size as usize];
    let mut at = 0;
    while at < size {
        let extents = replica.read(point, "os", at, size, 8 * 1024)?;
        assert!(!extents.is_empty(), "no progress at {at}");
        for e in extents {
            assert_eq!(e.offset, at, "extents are contiguous");
            if let Some(d) = e.data {
                assert_eq!(d.len() as u64, e.length);
                out[e.offset as usize..(e.offset + e.length) as usize].copy_from_slice(&d);
            }
            at = e.offset + e.length;
        }
    }
    Ok(out)
}

fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let vm_dir = dir.join("segments").join(ferry_runtime::path_name("vm"));
    let mut files: Vec<_> = std::fs::read_dir(vm_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    files.sort();
    files
}

fn rounds() -> impl Strategy<Value = Vec<Vec<Write>>> {
    vec(vec(write(), 1..6), 1..4)
}

#[derive(Debug, Clone)]
enum BlobDamage {
    Flip(usize, u8),
    Cut(usize),
}

/// How an index entry is damaged.
#[derive(Debug, Clone)]
enum IndexDamage {
    /// One byte of the value flipped.
    FlipValue(usize, u8),
    /// The value replaced by other bytes.
    Value(Vec<u8>),
    /// One byte of the key flipped (the value moves to another key).
    FlipKey(usize, u8),
    /// The entry gone.
    Remove,
    /// An entry of a known kind with any key and value.
    Junk(u8, Vec<u8>, Vec<u8>),
}

fn index_damage() -> impl Strategy<Value = IndexDamage> {
    prop_oneof![
        3 => (any::<usize>(), 1u8..).prop_map(|(a, m)| IndexDamage::FlipValue(a, m)),
        1 => vec(any::<u8>(), 0..40).prop_map(IndexDamage::Value),
        1 => (any::<usize>(), 1u8..).prop_map(|(a, m)| IndexDamage::FlipKey(a, m)),
        1 => Just(IndexDamage::Remove),
        2 => (
            prop::sample::select(b"vgrspm".to_vec()),
            vec(any::<u8>(), 0..40),
            vec(any::<u8>(), 0..40)
        )
            .prop_map(|(kind, k, v)| IndexDamage::Junk(kind, k, v)),
    ]
}

proptest! {
    #![proptest_config(props::config(256))]

    /// A flipped byte anywhere in a segment, or a segment cut short: every
    /// point reads exactly as written or fails, and some point fails (every
    /// blob belongs to a point).
    #[test]
    fn a_damaged_segment_blob_is_an_error_never_data(
        rounds in rounds(),
        which in any::<usize>(),
        damage in prop_oneof![
            (any::<usize>(), 1u8..).prop_map(|(a, m)| BlobDamage::Flip(a, m)),
            any::<usize>().prop_map(BlobDamage::Cut),
        ],
    ) {
        let dir = props::tempdir();
        let points = build(dir.path(), &rounds);
        let files = segment_files(dir.path());
        prop_assume!(!files.is_empty());
        let file = &files[which % files.len()];
        let mut bytes = std::fs::read(file).unwrap();
        prop_assume!(!bytes.is_empty());
        match damage {
            BlobDamage::Flip(at, mask) => {
                props::flip(&mut bytes, at, mask);
            }
            BlobDamage::Cut(at) => bytes.truncate(at % bytes.len()),
        }
        std::fs::write(file, &bytes).unwrap();

        let replicas = open(dir.path());
        let replica = replicas.get("vm").unwrap().unwrap();
        let mut failed = 0;
        for (point, shadow) in &points {
            match read_all(&replica, point, SIZE) {
                Ok(disk) => prop_assert!(disk == *shadow, "point {} read other bytes", point.id()),
                Err(ProcessorError::DataLoss(_) | ProcessorError::Io { .. }) => failed += 1,
                Err(e) => prop_assert!(false, "{}", e),
            }
        }
        prop_assert!(failed > 0, "damage in {} went unnoticed", file.display());
    }

    /// Any damage to one index entry, or a junk entry: opening, listing,
    /// reading, pruning, compacting, applying and cutting never panic. A
    /// flipped byte in a chunk version's entry (or in any entry but a
    /// point's, whose JSON has no checksum of its own) never reads as
    /// other data, and one in a version's entry is an error.
    #[test]
    fn a_damaged_index_entry_never_panics_nor_reads_as_other_data(
        rounds in rounds(),
        which in any::<usize>(),
        damage in index_damage(),
    ) {
        let dir = props::tempdir();
        let points = build(dir.path(), &rounds);
        let damaged_kind = damage_index(dir.path(), which, &damage);

        let replicas = open(dir.path());
        let replica = match replicas.get("vm") {
            Ok(Some(r)) => r,
            Ok(None) => return Err(TestCaseError::fail("the VM's replica is gone")),
            // A damaged meta: refused.
            Err(_) => return Ok(()),
        };
        let _ = replica.meta();
        let _ = replica.points();
        let mut failed = 0;
        for (point, shadow) in &points {
            let _ = replica.point(point.id());
            match read_all(&replica, point, SIZE) {
                Ok(disk) => {
                    if let (IndexDamage::FlipValue(..), Some(kind)) = (&damage, damaged_kind) {
                        if kind != b'p' {
                            prop_assert!(disk == *shadow, "point {} read other bytes", point.id());
                        }
                    }
                }
                Err(_) => failed += 1,
            }
        }
        if matches!(damage, IndexDamage::FlipValue(..)) && damaged_kind == Some(b'v') {
            prop_assert!(failed > 0, "a damaged version entry went unnoticed");
        }
        let intervals = points.iter().map(|(p, _)| p.interval).take(points.len() - 1).collect();
        let _ = replica.prune(&intervals);
        let _ = replica.compact_step(1 << 20);
        if let Ok(meta) = replica.meta() {
            let op = Op::WriteZeroes(ZeroOp { offset: 0, length: 512 });
            let _ = replica.apply(&seal(meta.applied.get() + 1, "os", op));
            let _ = replica.cut(PointKind::CrashConsistent, "", 0);
        }
        let _ = replica.points();
        let _ = replica.checkpoint();
    }
}

/// Applies `damage` to the entry `which` (modulo their number) of the VM's
/// index tree; returns the kind of entry damaged (its key's first byte).
fn damage_index(dir: &Path, which: usize, damage: &IndexDamage) -> Option<u8> {
    let db = reopened(|| sled::Config::new().path(dir.join("index")).open());
    let tree = db.open_tree("vm/vm").unwrap();
    let entries: Vec<(sled::IVec, sled::IVec)> = tree.iter().map(|kv| kv.unwrap()).collect();
    let (key, value) = entries[which % entries.len()].clone();
    let kind = key.first().copied();
    match damage {
        IndexDamage::FlipValue(at, mask) => {
            if value.is_empty() {
                return None;
            }
            let mut v = value.to_vec();
            props::flip(&mut v, *at, *mask);
            tree.insert(&key, v).unwrap();
        }
        IndexDamage::Value(v) => {
            tree.insert(&key, v.clone()).unwrap();
        }
        IndexDamage::FlipKey(at, mask) => {
            let mut k = key.to_vec();
            props::flip(&mut k, *at, *mask);
            tree.remove(&key).unwrap();
            tree.insert(k, value).unwrap();
        }
        IndexDamage::Remove => {
            tree.remove(&key).unwrap();
        }
        IndexDamage::Junk(kind, k, v) => {
            let mut key = vec![*kind];
            key.extend_from_slice(k);
            tree.insert(key, v.clone()).unwrap();
        }
    }
    db.flush().unwrap();
    kind
}

/// Disk sizes up to the largest a VM may register.
fn any_size() -> impl Strategy<Value = u64> {
    const MAX: u64 = registry_svc::model::MAX_DISK_BYTES;
    prop_oneof![
        Just(SIZE),
        Just(MAX),
        ((MAX / 512 - 4096)..=MAX / 512).prop_map(|s| s * 512),
        (1u64..=MAX / 512).prop_map(|s| s * 512),
    ]
}

/// A record's operation with any range, near the disk's end or not.
/// Ranges inside the disk stay short, so that a case stays fast (applying
/// is linear in a range's chunks).
fn any_op(size: u64) -> impl Strategy<Value = Op> {
    let offset = prop_oneof![
        (0..SIZE / 512).prop_map(|s| s * 512),
        Just(size.saturating_sub(512)),
        ((size / 512).saturating_sub(4096)..=size / 512).prop_map(|s| s * 512),
        any::<u64>(),
    ];
    let length = prop_oneof![
        Just(0u64),
        (1u64..256).prop_map(|s| s * 512),
        1u64..(1 << 17),
        Just(u64::MAX),
        size.saturating_add(1)..=u64::MAX,
    ];
    let chunk_bytes = prop_oneof![
        Just(0u64),
        Just(512u64),
        Just(CHUNK),
        (1u64..=u64::MAX / 512).prop_map(|s| s * 512),
        any::<u64>(),
    ];
    prop_oneof![
        (offset.clone(), 0usize..5000).prop_map(|(offset, n)| Op::Write(WriteOp {
            offset,
            data: vec![0x5a; n].into(),
        })),
        (offset.clone(), length.clone())
            .prop_map(|(offset, length)| Op::Trim(ZeroOp { offset, length })),
        (offset.clone(), length.clone())
            .prop_map(|(offset, length)| Op::WriteZeroes(ZeroOp { offset, length })),
        (offset, chunk_bytes, length, vec(any::<u32>(), 0..6)).prop_map(
            |(offset, chunk_bytes, length, crc32c)| Op::Digests(ChunkDigests {
                offset,
                chunk_bytes,
                length,
                crc32c,
            })
        ),
        (any::<i32>(), ".{0,8}", any::<u64>()).prop_map(|(kind, id, time_unix_nanos)| {
            Op::Marker(Marker {
                kind,
                id,
                time_unix_nanos,
            })
        }),
    ]
}

proptest! {
    #![proptest_config(props::config(256))]

    /// Records with any range on a disk of any size (up to the largest a VM
    /// may register): those the cache's ingest lets through, and damaged
    /// ones (their checksum wrong: anything may have happened to them on
    /// the way). Applied or refused, never a panic; then a cut and reads
    /// anywhere on the disk never panic either.
    #[test]
    fn any_record_the_cache_hands_over_never_panics(
        (size, records, reads) in any_size().prop_flat_map(|size| (
            Just(size),
            vec((any::<bool>(), any_op(size)), 1..8),
            vec((0..=size / 512, 0u64..(1 << 20)), 1..6),
        )),
    ) {
        let dir = props::tempdir();
        let replicas = open(dir.path());
        let (replica, mut seq) = synced(&replicas, size);
        let cache_disks = cache_svc::ingest::Disks::from([("os".to_string(), size)]);
        for (damaged, op) in records {
            let mut r = seal(seq, "os", op);
            if damaged {
                r.crc32c ^= 1;
            } else if cache_svc::ingest::validate(&r, &cache_disks).is_err() {
                continue;
            }
            match replica.apply(&r) {
                Ok(_) => seq += 1,
                // What the pipeline does after an error.
                Err(_) => seq = replica.reset().unwrap().get() + 1,
            }
        }
        let Ok(point) = replica.cut(PointKind::CrashConsistent, "", 0) else {
            return Ok(());
        };
        for (sector, len) in reads {
            let offset = sector * 512;
            let end = offset.saturating_add(len).min(size);
            if let Ok(extents) = replica.read(&point, "os", offset, end, 64 * 1024) {
                let mut at = offset;
                for e in extents {
                    prop_assert_eq!(e.offset, at);
                    let e_end = e.offset.checked_add(e.length);
                    prop_assert!(e.length > 0 && e_end.is_some_and(|x| x <= end), "{:?}", (e.offset, e.length, end));
                    at = e.offset + e.length;
                }
            }
        }
    }
}

/// Regressions the damaged index found: a short segment key ("s" alone)
/// made compaction panic, a short interval key made pruning panic, each
/// under the replica's writer lock (poisoning it for good).
#[test]
fn short_index_keys_are_corrupt_not_a_panic() {
    let dir = props::tempdir();
    let write = Write {
        sector: 0,
        sectors: 8,
        seed: 1,
    };
    build(dir.path(), &[vec![write.clone()], vec![write]]);
    {
        let db = reopened(|| sled::Config::new().path(dir.path().join("index")).open());
        let tree = db.open_tree("vm/vm").unwrap();
        tree.insert(b"s", b"{}").unwrap();
        let mut g = b"g".to_vec();
        g.extend_from_slice(&1u64.to_be_bytes());
        g.push(5);
        tree.insert(g, b"").unwrap();
        db.flush().unwrap();
    }
    let replicas = open(dir.path());
    let replica = replicas.get("vm").unwrap().unwrap();
    assert!(matches!(
        replica.compact_step(1 << 20),
        Err(ProcessorError::Corrupt(_))
    ));
    assert!(matches!(
        replica.prune(&[1].into()),
        Err(ProcessorError::Corrupt(_))
    ));
    // The writer lock is not poisoned: the replica still works.
    assert!(replica.meta().is_ok());
}
