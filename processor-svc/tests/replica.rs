//! The replica store on its own: random writes (partial chunks, zeroes,
//! checkpoints mid-interval) with a shadow copy per point, every point read
//! back equal to its shadow, also after reopening; no point while a disk
//! syncs; pruning and compaction give the disk space back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use ferry_testkit::{Rng, SmallFs};

use std::collections::{BTreeMap, BTreeSet};

use ferry_proto::cache::v1::record::Op;
use ferry_proto::cache::v1::{Marker, MarkerKind, Record, WriteOp, ZeroOp};
use ferry_proto::ids::Incarnation;
use ferry_runtime::{Refusal, Refused};
use processor_svc::replica::{Point, PointKind, Replicas, VmReplica};
use processor_svc::ProcessorError;

const SIZE: u64 = 4 << 20;
const CHUNK: u64 = 64 * 1024;

struct Feed {
    seq: u64,
}

impl Feed {
    fn record(&mut self, disk: &str, op: Op) -> Record {
        self.seq += 1;
        let mut record = Record {
            sequence: self.seq,
            disk_id: disk.into(),
            op: Some(op),
            crc32c: 0,
            captured_at_unix_nanos: self.seq * 1000,
        };
        ferry_proto::checksum::seal(&mut record);
        record
    }

    fn marker(&mut self, disk: &str, kind: MarkerKind) -> Record {
        self.record(
            disk,
            Op::Marker(Marker {
                kind: kind as i32,
                id: String::new(),
                time_unix_nanos: 0,
            }),
        )
    }
}

/// Opens the replicas in `dir` again after a handle was dropped in this
/// process: sled's flusher thread lets go of the database's file lock a
/// moment after the last handle, so a lock still held is waited for (up to
/// 10 s), never mistaken for a failure.
fn reopen(dir: &std::path::Path) -> Replicas {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Replicas::open(dir, CHUNK, 1 << 20) {
            Ok(replicas) => return replicas,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("reopening the replicas: {e}"),
        }
    }
}

fn disks() -> BTreeMap<String, u64> {
    // The data disk's size is not a multiple of the chunk size.
    BTreeMap::from([("os".to_string(), SIZE), ("data".to_string(), SIZE - 4096)])
}

/// A disk at a point, holes as zeros.
fn read_all(replica: &VmReplica, point: &Point, disk: &str, size: u64) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let mut at = 0;
    while at < size {
        let extents = replica.read(point, disk, at, size, 1 << 20).unwrap();
        assert!(!extents.is_empty());
        for e in extents {
            assert_eq!(e.offset, at, "extents are contiguous");
            if let Some(d) = e.data {
                assert_eq!(d.len() as u64, e.length);
                out[e.offset as usize..(e.offset + e.length) as usize].copy_from_slice(&d);
            }
            at = e.offset + e.length;
        }
    }
    out
}

fn synced(replica: &VmReplica, feed: &mut Feed) {
    for disk in disks().keys() {
        replica
            .apply(&feed.marker(disk, MarkerKind::SyncStarted))
            .unwrap();
        replica
            .apply(&feed.marker(disk, MarkerKind::SyncCompleted))
            .unwrap();
    }
}

#[test]
fn every_point_reads_as_the_source_was_at_its_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut shadows: Vec<(Point, BTreeMap<String, Vec<u8>>)> = Vec::new();
    {
        let replicas = Replicas::open(dir.path(), CHUNK, 1 << 20).unwrap();
        let replica = replicas
            .open_vm_with("vm", &disks(), Incarnation(0))
            .unwrap();
        let mut feed = Feed { seq: 0 };
        let mut shadow: BTreeMap<String, Vec<u8>> = disks()
            .iter()
            .map(|(d, s)| (d.clone(), vec![0u8; *s as usize]))
            .collect();
        // No point before every disk completed its initial sync.
        let err = replica.cut(PointKind::CrashConsistent, "", 0).unwrap_err();
        assert!(
            matches!(
                err,
                ProcessorError::Refused(Refused {
                    kind: Refusal::FailedPrecondition,
                    ..
                })
            ),
            "{err}"
        );
        synced(&replica, &mut feed);

        let mut rng = Rng(0x2545f4914f6cdd1d);
        for round in 0..8 {
            for _ in 0..60 {
                let disk = if rng.next().is_multiple_of(2) {
                    "os"
                } else {
                    "data"
                };
                let size = disks()[disk];
                let sectors = 1 + rng.next() % 300;
                let len = (sectors * 512).min(size);
                let offset = (rng.next() % ((size - len) / 512 + 1)) * 512;
                let image = shadow.get_mut(disk).unwrap();
                let range = offset as usize..(offset + len) as usize;
                let op = match rng.next() % 6 {
                    0 => {
                        image[range].fill(0);
                        Op::WriteZeroes(ZeroOp {
                            offset,
                            length: len,
                        })
                    }
                    1 => {
                        image[range].fill(0);
                        Op::Trim(ZeroOp {
                            offset,
                            length: len,
                        })
                    }
                    _ => {
                        let byte = (rng.next() % 255 + 1) as u8;
                        image[range].fill(byte);
                        Op::Write(WriteOp {
                            offset,
                            data: vec![byte; len as usize].into(),
                        })
                    }
                };
                replica.apply(&feed.record(disk, op)).unwrap();
                if rng.next().is_multiple_of(17) {
                    // Memory pressure: written before the point.
                    replica.checkpoint().unwrap();
                }
            }
            if round == 3 {
                // A resync of one disk: no point until it completes.
                replica
                    .apply(&feed.marker("data", MarkerKind::SyncStarted))
                    .unwrap();
                let err = replica
                    .cut(PointKind::CrashConsistent, "", round)
                    .unwrap_err();
                assert!(
                    matches!(
                        err,
                        ProcessorError::Refused(Refused {
                            kind: Refusal::FailedPrecondition,
                            ..
                        })
                    ),
                    "{err}"
                );
                replica
                    .apply(&feed.marker("data", MarkerKind::SyncCompleted))
                    .unwrap();
            }
            let point = replica.cut(PointKind::CrashConsistent, "", round).unwrap();
            assert_eq!(point.sequence_cut.get(), feed.seq);
            shadows.push((point, shadow.clone()));
        }
        for (point, shadow) in &shadows {
            for (disk, image) in shadow {
                assert!(
                    read_all(&replica, point, disk, image.len() as u64) == *image,
                    "point {} disk {disk} differs from its shadow",
                    point.id()
                );
            }
        }
        // Points are listed oldest first with their cuts.
        let listed: Vec<u64> = replica
            .points()
            .unwrap()
            .iter()
            .map(|p| p.sequence_cut.get())
            .collect();
        let cuts: Vec<u64> = shadows.iter().map(|(p, _)| p.sequence_cut.get()).collect();
        assert_eq!(listed, cuts);
    }
    // Reopened (as after a restart): the same points, the same contents.
    let replicas = reopen(dir.path());
    let replica = replicas
        .get("vm")
        .unwrap()
        .expect("the replica is still there");
    assert_eq!(
        replica.meta().unwrap().applied,
        shadows.last().unwrap().0.sequence_cut
    );
    for (point, shadow) in &shadows {
        for (disk, image) in shadow {
            assert!(read_all(&replica, point, disk, image.len() as u64) == *image);
        }
    }
}

#[test]
fn unwritten_ranges_are_holes_and_a_point_costs_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let replicas = Replicas::open(dir.path(), CHUNK, 1 << 20).unwrap();
    // A 1 TiB disk: nothing may scale with its size.
    let big = BTreeMap::from([("os".to_string(), 1u64 << 40)]);
    let replica = replicas.open_vm_with("vm", &big, Incarnation(0)).unwrap();
    let mut feed = Feed { seq: 0 };
    replica
        .apply(&feed.marker("os", MarkerKind::SyncStarted))
        .unwrap();
    replica
        .apply(&feed.marker("os", MarkerKind::SyncCompleted))
        .unwrap();
    let write = Op::Write(WriteOp {
        offset: 1 << 39,
        data: vec![7u8; 1 << 20].into(),
    });
    replica.apply(&feed.record("os", write)).unwrap();
    let point = replica.cut(PointKind::CrashConsistent, "", 0).unwrap();
    let extents = replica.read(&point, "os", 0, 1 << 40, 4 << 20).unwrap();
    assert_eq!(extents.len(), 3, "hole, 1 MiB of data, hole");
    assert!(extents[0].data.is_none() && extents[2].data.is_none());
    assert_eq!(extents[0].length, 1 << 39);
    assert_eq!(extents[1].data.as_deref(), Some(&vec![7u8; 1 << 20][..]));
    assert_eq!(extents[2].offset + extents[2].length, 1 << 40);
}

#[test]
fn pruned_versions_give_their_space_back_and_what_remains_reads_right() {
    let dir = tempfile::tempdir().unwrap();
    let replicas = Replicas::open(dir.path(), CHUNK, 1 << 20).unwrap();
    let one = BTreeMap::from([("os".to_string(), SIZE)]);
    let replica = replicas.open_vm_with("vm", &one, Incarnation(0)).unwrap();
    let mut feed = Feed { seq: 0 };
    replica
        .apply(&feed.marker("os", MarkerKind::SyncStarted))
        .unwrap();
    replica
        .apply(&feed.marker("os", MarkerKind::SyncCompleted))
        .unwrap();
    let mut points = Vec::new();
    let mut rng = Rng(7);
    for round in 0..10u8 {
        // The whole disk rewritten each round, half of it with random bytes.
        let data: Vec<u8> = (0..SIZE)
            .map(|i| {
                if i % 2 == 0 {
                    round + 1
                } else {
                    rng.next() as u8
                }
            })
            .collect();
        let op = Op::Write(WriteOp {
            offset: 0,
            data: data.clone().into(),
        });
        replica.apply(&feed.record("os", op)).unwrap();
        points.push((
            replica
                .cut(PointKind::CrashConsistent, "", u64::from(round))
                .unwrap(),
            data,
        ));
    }
    let before = replica.disk_bytes().unwrap();
    assert!(before >= 10 * SIZE, "ten versions of the disk: {before}");

    // A pinned point survives pruning; the others but the newest go.
    replica.pin(points[3].0.id(), "job-1").unwrap();
    let all: BTreeSet<u64> = points[..9].iter().map(|(p, _)| p.interval).collect();
    let pruned = replica.prune(&all).unwrap();
    assert_eq!(pruned.len(), 8);
    assert!(replica.point(points[0].0.id()).is_err());
    while replica.compact_step(8 << 20).unwrap() > 0 {}
    let after = replica.disk_bytes().unwrap();
    assert!(
        after <= 2 * SIZE + 2 * (1 << 20) + (64 << 10),
        "two live versions left (+ one partly filled segment each): {after} of {before}"
    );
    for i in [3, 9] {
        let (point, data) = &points[i];
        assert!(read_all(&replica, point, "os", SIZE) == *data, "point {i}");
    }
    // Unpinned, it goes too.
    replica.unpin(points[3].0.id(), "job-1").unwrap();
    assert_eq!(replica.prune(&all).unwrap(), vec![points[3].0.interval]);
}

#[test]
fn a_record_that_fails_its_checksum_is_never_applied_and_blocks_points_until_resent() {
    let dir = tempfile::tempdir().unwrap();
    let replicas = Replicas::open(dir.path(), CHUNK, 1 << 20).unwrap();
    let replica = replicas
        .open_vm_with("vm", &disks(), Incarnation(0))
        .unwrap();
    let mut feed = Feed { seq: 0 };
    synced(&replica, &mut feed);
    let good = feed.record(
        "os",
        Op::Write(WriteOp {
            offset: 0,
            data: vec![1u8; CHUNK as usize].into(),
        }),
    );
    replica.apply(&good).unwrap();
    let before = replica.cut(PointKind::CrashConsistent, "", 1).unwrap();

    // One flipped byte in transit.
    let mut damaged = feed.record(
        "os",
        Op::Write(WriteOp {
            offset: 4096,
            data: vec![2u8; 8192].into(),
        }),
    );
    if let Some(Op::Write(w)) = &mut damaged.op {
        let mut bytes = w.data.to_vec();
        bytes[100] ^= 0x40;
        w.data = bytes.into();
    }
    replica.apply(&damaged).unwrap();
    assert_eq!(
        replica.meta().unwrap().applied.get(),
        damaged.sequence,
        "consumed"
    );
    let why = replica
        .not_cuttable()
        .unwrap()
        .expect("no point while it is missing");
    assert!(why.contains("differ from the source"), "{why}");
    assert!(replica.cut(PointKind::CrashConsistent, "", 2).is_err());
    // Nothing of it reached the replica.
    assert_eq!(
        read_all(&replica, &before, "os", SIZE)[..CHUNK as usize],
        vec![1u8; CHUNK as usize][..]
    );

    // The agent sends the chunk again: resolved, and the next point holds it.
    let mut chunk = vec![1u8; CHUNK as usize];
    chunk[4096..4096 + 8192].fill(2);
    let resent = feed.record(
        "os",
        Op::Write(WriteOp {
            offset: 0,
            data: chunk.clone().into(),
        }),
    );
    replica.apply(&resent).unwrap();
    assert_eq!(replica.not_cuttable().unwrap(), None);
    let after = replica.cut(PointKind::CrashConsistent, "", 3).unwrap();
    assert_eq!(
        read_all(&replica, &after, "os", SIZE)[..CHUNK as usize],
        chunk[..]
    );

    // A damaged marker names no range: DATA_LOSS, never applied.
    let mut marker = feed.marker("os", MarkerKind::SyncCompleted);
    marker.crc32c ^= 1;
    let err = replica.apply(&marker).unwrap_err();
    assert!(matches!(err, ProcessorError::DataLoss(_)), "{err}");
}

#[test]
fn vms_whose_names_differ_only_in_punctuation_keep_their_own_data() {
    let dir = tempfile::tempdir().unwrap();
    let replicas = Replicas::open(dir.path(), CHUNK, 1 << 20).unwrap();
    let mut points = Vec::new();
    for (vm, byte) in [("web.1", 0x11u8), ("web_1", 0x22u8)] {
        let replica = replicas.open_vm_with(vm, &disks(), Incarnation(0)).unwrap();
        let mut feed = Feed { seq: 0 };
        synced(&replica, &mut feed);
        replica
            .apply(&feed.record(
                "os",
                Op::Write(WriteOp {
                    offset: 0,
                    data: vec![byte; CHUNK as usize].into(),
                }),
            ))
            .unwrap();
        points.push((
            replica.clone(),
            replica.cut(PointKind::CrashConsistent, "", 1).unwrap(),
            byte,
        ));
    }
    for (replica, point, byte) in points {
        assert_eq!(
            read_all(&replica, &point, "os", SIZE)[..CHUNK as usize],
            vec![byte; CHUNK as usize][..],
            "each VM reads its own data"
        );
    }
}

#[test]
fn a_capture_time_from_the_future_never_dates_a_point_in_the_future() {
    let dir = tempfile::tempdir().unwrap();
    let replicas = Replicas::open(dir.path(), CHUNK, 1 << 20).unwrap();
    let replica = replicas
        .open_vm_with("vm", &disks(), Incarnation(0))
        .unwrap();
    let mut feed = Feed { seq: 0 };
    synced(&replica, &mut feed);
    let day = 86_400 * 1_000_000_000u64;
    let mut ahead = feed.record(
        "os",
        Op::Write(WriteOp {
            offset: 0,
            data: vec![3u8; 4096].into(),
        }),
    );
    ahead.captured_at_unix_nanos = ferry_runtime::time::unix_nanos_now() + day;
    ferry_proto::checksum::seal(&mut ahead);
    replica.apply(&ahead).unwrap();
    let point = replica
        .cut(
            PointKind::CrashConsistent,
            "",
            ferry_runtime::time::unix_nanos_now(),
        )
        .unwrap();
    assert!(
        point.time_nanos.get() <= ferry_runtime::time::unix_nanos_now(),
        "the point is dated {} ns ahead",
        point.time_nanos.get() - ferry_runtime::time::unix_nanos_now()
    );
}

#[test]
fn pruning_never_makes_the_open_intervals_records_look_durable() {
    let dir = tempfile::tempdir().unwrap();
    let cut_at;
    {
        let replicas = Replicas::open(dir.path(), CHUNK, 1 << 20).unwrap();
        let replica = replicas
            .open_vm_with("vm", &disks(), Incarnation(0))
            .unwrap();
        let mut feed = Feed { seq: 0 };
        synced(&replica, &mut feed);
        let write = |feed: &mut Feed, byte: u8| {
            feed.record(
                "os",
                Op::Write(WriteOp {
                    offset: 0,
                    data: vec![byte; 4096].into(),
                }),
            )
        };
        replica.apply(&write(&mut feed, 1)).unwrap();
        let first = replica.cut(PointKind::CrashConsistent, "", 1).unwrap();
        replica.apply(&write(&mut feed, 2)).unwrap();
        let second = replica.cut(PointKind::CrashConsistent, "", 2).unwrap();
        cut_at = second.sequence_cut.get();
        // A write in memory only, then a point pruned: the index is written.
        replica.apply(&write(&mut feed, 3)).unwrap();
        assert_eq!(
            replica.prune(&BTreeSet::from([first.interval])).unwrap(),
            vec![first.interval]
        );
        assert_eq!(
            replica.durable_applied().unwrap().get(),
            cut_at,
            "only what was flushed with its data may be reported"
        );
    }
    // A crash now: the write that was in memory is applied again, not lost.
    let replicas = reopen(dir.path());
    let replica = replicas
        .open_vm_with("vm", &disks(), Incarnation(0))
        .unwrap();
    assert_eq!(replica.meta().unwrap().applied.get(), cut_at);
}

/// Flips one byte inside the first data blob of the VM's first segment
/// file (past its 8-byte header).
fn flip_first_blob(dir: &std::path::Path) -> std::path::PathBuf {
    let segments = dir.join("segments");
    let vm_dir = std::fs::read_dir(&segments)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut files: Vec<_> = std::fs::read_dir(&vm_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seg = files[0].clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[8 + 100] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    seg
}

#[test]
fn a_damaged_blob_found_by_the_scrub_is_never_served_and_the_head_is_asked_for_again() {
    let dir = tempfile::tempdir().unwrap();
    let replicas = Replicas::open(dir.path(), CHUNK, 1 << 20).unwrap();
    let replica = replicas
        .open_vm_with("vm", &disks(), Incarnation(0))
        .unwrap();
    let mut feed = Feed { seq: 0 };
    synced(&replica, &mut feed);
    // Chunk 0 of "os" written once: every later point reads that blob.
    let write = |feed: &mut Feed, offset: u64, byte: u8| {
        feed.record(
            "os",
            Op::Write(WriteOp {
                offset,
                data: vec![byte; CHUNK as usize].into(),
            }),
        )
    };
    replica.apply(&write(&mut feed, 0, 7)).unwrap();
    let first = replica.cut(PointKind::CrashConsistent, "", 1).unwrap();
    replica.apply(&write(&mut feed, 4 * CHUNK, 8)).unwrap();
    let second = replica.cut(PointKind::CrashConsistent, "", 2).unwrap();
    assert!(replica.not_cuttable().unwrap().is_none());

    flip_first_blob(dir.path());
    let mut found = 0;
    for _ in 0..8 {
        let step = replica.scrub_step(64 * 1024).unwrap();
        found += step.damaged;
        if step.wrapped {
            break;
        }
    }
    assert_eq!(found, 1, "the scrub finds the damaged blob once");
    let damage = replica.damage().unwrap();
    assert_eq!(damage.len(), 1);
    assert!(damage[0].head, "{damage:?}");

    // Both points read chunk 0's only version: both refused, with a reason.
    for p in [&first, &second] {
        let p = replica.point(p.id()).unwrap();
        let why = p.damaged.clone().expect("the point is marked damaged");
        assert!(why.contains("chunk 0 of disk \"os\""), "{why}");
        let err = replica.read(&p, "os", 0, SIZE, 1 << 20).unwrap_err();
        assert!(matches!(err, ProcessorError::DataLoss(_)), "{err}");
    }
    // The head reads it too: its range is asked of the agent again, and no
    // point is cut until it has arrived.
    let why = replica.not_cuttable().unwrap().expect("no point meanwhile");
    assert!(why.contains("differ from the source"), "{why}");
    replica.apply(&write(&mut feed, 0, 9)).unwrap();
    assert!(replica.not_cuttable().unwrap().is_none());
    let repaired = replica.cut(PointKind::CrashConsistent, "", 3).unwrap();
    let repaired = replica.point(repaired.id()).unwrap();
    assert!(repaired.damaged.is_none(), "{repaired:?}");
    let bytes = read_all(&replica, &repaired, "os", SIZE);
    assert!(bytes[..CHUNK as usize].iter().all(|b| *b == 9));
    assert!(!replica.damage().unwrap()[0].head, "the head is repaired");

    // The record survives a restart.
    drop(replica);
    drop(replicas);
    let replicas = reopen(dir.path());
    let replica = replicas.get("vm").unwrap().unwrap();
    assert!(replica.point(first.id()).unwrap().damaged.is_some());
    assert!(replica.point(repaired.id()).unwrap().damaged.is_none());
}

#[test]
fn a_disk_digest_is_the_digest_of_the_disk_as_read() {
    let dir = tempfile::tempdir().unwrap();
    let replicas = Replicas::open(dir.path(), CHUNK, 1 << 20).unwrap();
    let replica = replicas
        .open_vm_with("vm", &disks(), Incarnation(0))
        .unwrap();
    let mut feed = Feed { seq: 0 };
    synced(&replica, &mut feed);
    let mut rng = Rng(0xd1_9e57);
    let mut points = Vec::new();
    for round in 0..4 {
        for _ in 0..20 {
            let disk = if rng.next().is_multiple_of(2) {
                "os"
            } else {
                "data"
            };
            let size = disks()[disk];
            let len = (1 + rng.next() % 256) * 512;
            let offset = (rng.next() % ((size - len) / 512)) * 512;
            let op = if rng.next().is_multiple_of(5) {
                Op::WriteZeroes(ZeroOp {
                    offset,
                    length: len,
                })
            } else {
                Op::Write(WriteOp {
                    offset,
                    data: vec![(round * 31 + rng.next() % 200) as u8 + 1; len as usize].into(),
                })
            };
            replica.apply(&feed.record(disk, op)).unwrap();
        }
        points.push(
            replica
                .cut(PointKind::CrashConsistent, "", round + 1)
                .unwrap(),
        );
    }
    for p in &points {
        for (disk, size) in disks() {
            let bytes = read_all(&replica, p, &disk, size);
            let (chunk, digest) = replica.digest(p, &disk).unwrap();
            assert_eq!(chunk, CHUNK);
            assert_eq!(
                digest,
                ferry_proto::digest::of_bytes(CHUNK, &bytes),
                "point {} disk {disk}",
                p.id()
            );
        }
    }
}

#[test]
fn a_point_the_full_disk_took_in_part_is_not_cut_and_leaves_nothing_behind() {
    // No reserve at this level: the filesystem itself runs out mid-write.
    let fs = SmallFs::mount(16 << 20);
    let replicas = Replicas::open(fs.path(), CHUNK, 1 << 20).unwrap();
    let replica = replicas
        .open_vm_with("vm", &disks(), Incarnation(1))
        .unwrap();
    let mut feed = Feed { seq: 0 };
    synced(&replica, &mut feed);
    let mut shadow = vec![0u8; SIZE as usize];
    let interval = |feed: &mut Feed, shadow: &mut [u8], chunks: u64, byte: u8| {
        (0..chunks)
            .map(|c| {
                let data = vec![byte ^ c as u8; CHUNK as usize];
                shadow[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize].copy_from_slice(&data);
                feed.record(
                    "os",
                    Op::Write(WriteOp {
                        offset: c * CHUNK,
                        data: data.into(),
                    }),
                )
            })
            .collect::<Vec<_>>()
    };
    for r in interval(&mut feed, &mut shadow, 16, 0xa0) {
        replica.apply(&r).unwrap();
    }
    let first = replica.cut(PointKind::CrashConsistent, "", 1).unwrap();
    let first_shadow = shadow.clone();
    let durable = replica.durable_applied().unwrap();

    // Room for 256 KiB; the next interval writes 2 MiB.
    let ballast = fs.fill_leaving(256 << 10);
    let free = fs.free();
    let second = interval(&mut feed, &mut shadow, 32, 0x5b);
    for r in &second {
        replica.apply(r).unwrap();
    }
    let err = replica.cut(PointKind::CrashConsistent, "", 2).unwrap_err();
    assert!(matches!(err, ProcessorError::DiskFull(_)), "{err}");
    assert_eq!(
        replica.points().unwrap().len(),
        1,
        "no point from data written in part"
    );
    assert_eq!(
        replica.durable_applied().unwrap(),
        durable,
        "nothing more looks durable"
    );
    assert_eq!(
        replica.applied().unwrap(),
        durable,
        "and it is applied again"
    );
    assert!(
        fs.free() + (64 << 10) >= free,
        "what the failed write left is gone: {} B free, {free} before",
        fs.free()
    );
    assert_eq!(read_all(&replica, &first, "os", SIZE), first_shadow);

    // Space returns: applied again from the durable sequence (as the
    // pipeline does), the point is cut and reads as the source, also after
    // reopening.
    std::fs::remove_file(ballast).unwrap();
    for r in &second {
        replica.apply(r).unwrap();
    }
    let point = replica.cut(PointKind::CrashConsistent, "", 3).unwrap();
    assert_eq!(read_all(&replica, &point, "os", SIZE), shadow);
    drop(replica);
    drop(replicas);
    let replicas = Replicas::open(fs.path(), CHUNK, 1 << 20).unwrap();
    let replica = replicas
        .open_vm_with("vm", &disks(), Incarnation(1))
        .unwrap();
    let points = replica.points().unwrap();
    assert_eq!(points.len(), 2);
    assert_eq!(read_all(&replica, &points[0], "os", SIZE), first_shadow);
    assert_eq!(read_all(&replica, &points[1], "os", SIZE), shadow);
}
