//! The one storage seam of a replica's bulk bytes: a [`BlobStore`] holds a
//! VM's segments (numbered, append-only files of framed blobs) and every
//! byte of blob data the replica writes or reads goes through it. The index
//! (sled) stays local; only segments are behind the seam.
//!
//! Segments are written append-then-seal, as the replica always has: the
//! open segment ([`OpenSegment`]) takes blobs, is made durable by
//! [`OpenSegment::sync`] at each checkpoint (the index then names blobs in
//! it), and is sealed when it rolls: after that its bytes never change, it
//! is only read by range, and deleted whole once nothing in it is live.
//! [`LocalBlobStore`], today's only implementation, keeps them as fsynced
//! files `<dir>/<id:016>.seg`, the layout existing data directories have.
//!
//! An object-store backend (S3-like: whole objects, no append, no fsync)
//! would keep the open segment local (a staging file, synced like today)
//! and put it as one immutable object when it seals; reads of a sealed
//! segment become ranged GETs, `delete` a DELETE, `list` a prefix listing.
//! That relies on sealed segments being immutable (compaction writes live
//! blobs into a new segment, never into an old one), and needs the index to
//! know which segments are sealed and uploaded before the local staging copy
//! goes; `truncate` only ever applies to the open, local segment.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{poisoned, Result};
use crate::error::ProcessorError;

/// Blob bytes gathered before one write(2).
const WRITE_BUFFER: usize = 4 << 20;

/// A segment and its size in bytes, as listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    pub id: u64,
    pub bytes: u64,
}

/// Where a VM's segments live.
pub trait BlobStore: Send + Sync {
    /// Starts segment `id`, empty. Whatever held that id before is replaced:
    /// a segment the index does not know holds nothing anyone needs (a crash
    /// before its checkpoint).
    fn create(&self, id: u64) -> Result<Box<dyn OpenSegment>>;

    /// `len` bytes of segment `id` from `offset`. A segment that is not
    /// there is [`ProcessorError::Io`] (compaction may have moved its blobs
    /// meanwhile: the caller looks the blob up again).
    fn get_range(&self, id: u64, offset: u64, len: u64) -> Result<Vec<u8>>;

    /// Deletes segment `id`; one already gone is no error.
    fn delete(&self, id: u64) -> Result<()>;

    /// Every segment held, with its size.
    fn list(&self) -> Result<Vec<SegmentInfo>>;

    /// Deletes every segment and the store itself (the VM's replica goes).
    fn delete_all(&self) -> Result<()>;
}

/// The segment blobs are appended to.
pub trait OpenSegment: Send {
    /// Its id.
    fn id(&self) -> u64;

    /// Its length in bytes, including what is appended but not yet
    /// durable.
    fn bytes(&self) -> u64;

    /// Appends `bytes`; returns the offset they start at. Durable only once
    /// [`OpenSegment::sync`] returns.
    fn append(&mut self, bytes: &[u8]) -> Result<u64>;

    /// Makes everything appended durable.
    fn sync(&mut self) -> Result<()>;

    /// Drops what is not durable and cuts the segment to `len` bytes (what
    /// the index names of it): a failed write's tail is named by nothing,
    /// and on a full disk it is the space needed to go on.
    fn truncate(&mut self, len: u64) -> Result<()>;
}

/// Segments as local files, fsynced.
pub struct LocalBlobStore {
    dir: PathBuf,
    /// Open segment files for reading.
    files: Mutex<HashMap<u64, Arc<File>>>,
}

impl LocalBlobStore {
    /// The store in `dir`; touches nothing on disk.
    pub fn new(dir: PathBuf) -> LocalBlobStore {
        LocalBlobStore {
            dir,
            files: Mutex::new(HashMap::new()),
        }
    }

    /// The store in `dir`, created durably if missing.
    pub fn open(dir: PathBuf) -> Result<LocalBlobStore> {
        ferry_runtime::durable::create_dir_all(&dir).map_err(|e| ProcessorError::io(&dir, e))?;
        Ok(LocalBlobStore::new(dir))
    }

    /// The file of segment `id`.
    pub fn path(&self, id: u64) -> PathBuf {
        segment_path(&self.dir, id)
    }

    fn file(&self, id: u64) -> Result<Arc<File>> {
        let mut files = self.files.lock().map_err(|_| poisoned())?;
        if let Some(f) = files.get(&id) {
            return Ok(f.clone());
        }
        let path = self.path(id);
        let f = Arc::new(File::open(&path).map_err(|e| ProcessorError::io(&path, e))?);
        files.insert(id, f.clone());
        Ok(f)
    }

    fn forget(&self, id: u64) {
        if let Ok(mut files) = self.files.lock() {
            files.remove(&id);
        }
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016}.seg"))
}

impl BlobStore for LocalBlobStore {
    fn create(&self, id: u64) -> Result<Box<dyn OpenSegment>> {
        self.forget(id);
        let path = self.path(id);
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| ProcessorError::io(&path, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| ProcessorError::io(&self.dir, e))?;
        Ok(Box::new(LocalSegment {
            id,
            path,
            file,
            len: 0,
            buf: Vec::with_capacity(WRITE_BUFFER),
        }))
    }

    fn get_range(&self, id: u64, offset: u64, len: u64) -> Result<Vec<u8>> {
        let f = self.file(id)?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| ProcessorError::io(&self.path(id), e))?;
        Ok(buf)
    }

    fn delete(&self, id: u64) -> Result<()> {
        self.forget(id);
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ProcessorError::io(&path, e)),
        }
    }

    fn list(&self) -> Result<Vec<SegmentInfo>> {
        let entries = fs::read_dir(&self.dir).map_err(|e| ProcessorError::io(&self.dir, e))?;
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse().ok())
            else {
                continue;
            };
            out.push(SegmentInfo {
                id,
                bytes: e.metadata().map(|m| m.len()).unwrap_or(0),
            });
        }
        out.sort_by_key(|s| s.id);
        Ok(out)
    }

    fn delete_all(&self) -> Result<()> {
        if let Ok(mut files) = self.files.lock() {
            files.clear();
        }
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ProcessorError::io(&self.dir, e)),
        }
    }
}

/// The open segment's file, with blobs gathered for one write(2).
struct LocalSegment {
    id: u64,
    path: PathBuf,
    file: File,
    /// Its length including `buf`.
    len: u64,
    buf: Vec<u8>,
}

impl LocalSegment {
    fn write_buffer(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.file
                .write_all(&self.buf)
                .map_err(|e| ProcessorError::io(&self.path, e))?;
            self.buf.clear();
        }
        Ok(())
    }
}

impl OpenSegment for LocalSegment {
    fn id(&self) -> u64 {
        self.id
    }

    fn bytes(&self) -> u64 {
        self.len
    }

    fn append(&mut self, bytes: &[u8]) -> Result<u64> {
        let at = self.len;
        self.buf.extend_from_slice(bytes);
        self.len += bytes.len() as u64;
        if self.buf.len() >= WRITE_BUFFER {
            self.write_buffer()?;
        }
        Ok(at)
    }

    fn sync(&mut self) -> Result<()> {
        self.write_buffer()?;
        self.file
            .sync_data()
            .map_err(|e| ProcessorError::io(&self.path, e))
    }

    fn truncate(&mut self, len: u64) -> Result<()> {
        self.buf.clear();
        self.len = len;
        self.file
            .set_len(len)
            .map_err(|e| ProcessorError::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_bytes_read_back_by_range_once_synced_and_list_and_delete_see_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path().join("vm")).unwrap();
        let mut seg = store.create(7).unwrap();
        assert_eq!(seg.append(b"hello").unwrap(), 0);
        assert_eq!(seg.append(b" world").unwrap(), 5);
        seg.sync().unwrap();
        assert_eq!(store.get_range(7, 6, 5).unwrap(), b"world");
        // Today's layout: one file per segment, named by its id.
        assert!(dir.path().join("vm/0000000000000007.seg").exists());
        assert_eq!(
            store.list().unwrap(),
            vec![SegmentInfo { id: 7, bytes: 11 }]
        );

        // A failed write's tail is cut back to what the index names.
        seg.append(b"tail").unwrap();
        seg.sync().unwrap();
        seg.truncate(5).unwrap();
        assert_eq!(store.list().unwrap()[0].bytes, 5);

        store.delete(7).unwrap();
        store.delete(7).unwrap();
        assert!(store.list().unwrap().is_empty());
        let gone = store.get_range(7, 0, 1).unwrap_err();
        assert!(matches!(gone, ProcessorError::Io { .. }), "{gone}");
        store.delete_all().unwrap();
        assert!(!dir.path().join("vm").exists());
    }
}
