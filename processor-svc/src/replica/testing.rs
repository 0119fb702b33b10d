//! What the replica's unit tests share: a replica in a temporary directory,
//! records to feed it, and a point read back whole.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferry_proto::cache::v1::record::Op;
use ferry_proto::cache::v1::{Marker, MarkerKind, Record, WriteOp};

use super::{Point, Replicas, VmReplica};

/// The chunk size of the test replicas.
pub const CHUNK: u64 = 4096;
/// The one disk's size: 16 chunks.
pub const SIZE: u64 = 16 * CHUNK;

/// A replica of one synced disk `os` of [`SIZE`], segments rolling past
/// `segment_bytes`; the directory goes when the first value is dropped.
pub struct Fixture {
    dir: tempfile::TempDir,
    _replicas: Replicas,
    pub replica: Arc<VmReplica>,
    seq: u64,
}

impl Fixture {
    pub fn new(segment_bytes: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let replicas = Replicas::open(dir.path(), CHUNK, segment_bytes).unwrap();
        let disks = BTreeMap::from([("os".to_string(), SIZE)]);
        let replica = replicas
            .open_vm_with("vm", &disks, ferry_proto::ids::Incarnation(1))
            .unwrap();
        let mut f = Fixture {
            dir,
            _replicas: replicas,
            replica,
            seq: 0,
        };
        for kind in [MarkerKind::SyncStarted, MarkerKind::SyncCompleted] {
            f.apply(Op::Marker(Marker {
                kind: kind as i32,
                id: String::new(),
                time_unix_nanos: 0,
            }));
        }
        f
    }

    pub fn apply(&mut self, op: Op) {
        self.seq += 1;
        let mut record = Record {
            sequence: self.seq,
            disk_id: "os".into(),
            op: Some(op),
            crc32c: 0,
            captured_at_unix_nanos: self.seq,
        };
        ferry_proto::checksum::seal(&mut record);
        self.replica.apply(&record).unwrap();
    }

    /// Writes `byte` over whole chunks `chunks`, and into `image`.
    pub fn write_chunks(&mut self, image: &mut [u8], chunks: &[u64], byte: u8) {
        for c in chunks {
            let range = (c * CHUNK) as usize..((c + 1) * CHUNK) as usize;
            image[range].fill(byte);
            self.apply(Op::Write(WriteOp {
                offset: c * CHUNK,
                data: vec![byte; CHUNK as usize].into(),
            }));
        }
    }

    pub fn cut(&self) -> Point {
        self.replica
            .cut(super::PointKind::CrashConsistent, "", 0)
            .unwrap()
    }

    /// Disk `os` at `point`, holes as zeros.
    pub fn read_all(&self, point: &Point) -> Vec<u8> {
        let mut out = vec![0u8; SIZE as usize];
        let mut at = 0;
        while at < SIZE {
            for e in self.replica.read(point, "os", at, SIZE, 1 << 20).unwrap() {
                if let Some(d) = e.data {
                    out[e.offset as usize..(e.offset + e.length) as usize].copy_from_slice(&d);
                }
                at = e.offset + e.length;
            }
        }
        out
    }

    /// Closes the replica and opens it again from its directory (a
    /// restart: what was not checkpointed is gone).
    pub fn reopen(self, segment_bytes: u64) -> Fixture {
        let Fixture {
            dir,
            _replicas,
            replica,
            ..
        } = self;
        drop(replica);
        drop(_replicas);
        // sled lets go of its files a moment after the last handle drops.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let replicas = loop {
            match Replicas::open(dir.path(), CHUNK, segment_bytes) {
                Ok(r) => break r,
                Err(e) if std::time::Instant::now() >= deadline => panic!("cannot reopen: {e}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        };
        let disks = BTreeMap::from([("os".to_string(), SIZE)]);
        let replica = replicas
            .open_vm_with("vm", &disks, ferry_proto::ids::Incarnation(1))
            .unwrap();
        let seq = replica.applied().unwrap().get();
        Fixture {
            dir,
            _replicas: replicas,
            replica,
            seq,
        }
    }

    /// The file of segment `id`.
    pub fn segment_path(&self, id: u64) -> std::path::PathBuf {
        let vm = self
            .dir
            .path()
            .join("segments")
            .join(ferry_runtime::path_name("vm"));
        super::LocalBlobStore::new(vm).path(id)
    }

    /// Every (chunk, version) the index holds of disk `os`.
    pub fn versions(&self) -> Vec<(u64, u64)> {
        self.replica
            .tree
            .scan_prefix(b"v")
            .map(|kv| {
                let (_, chunk, version) = super::keys::vkey_parts(&kv.unwrap().0).unwrap();
                (chunk, version)
            })
            .collect()
    }
}
