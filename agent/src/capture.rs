//! The library API of write capture: a VM's disks as source images, every
//! completed write turned into the next record of the VM's stream. The NBD
//! export and the load generator both write through it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use ferry_proto::cache::v1::record::Op;
use ferry_proto::cache::v1::{Marker, MarkerKind, WriteOp, ZeroOp};
use tokio::sync::RwLock;

use crate::ranges::InFlight;
use crate::stream::Stream;

/// Why a write was refused.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("unknown disk {0:?}")]
    UnknownDisk(String),
    #[error("range {offset}+{length} is outside disk {disk:?} ({size} bytes)")]
    OutOfRange {
        disk: String,
        offset: u64,
        length: u64,
        size: u64,
    },
    #[error("source image {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the agent is stopping; writes are refused")]
    Closed,
    #[error("a planned failover is draining the stream; writes are refused until it ends")]
    Draining,
}

impl CaptureError {
    /// The OS error behind an I/O failure, if any (ENOSPC, EIO, ...).
    pub fn os_error(&self) -> Option<i32> {
        match self {
            CaptureError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// The largest payload of one record: a larger write travels as several
/// consecutive records (the cache takes messages of a few MiB, and a tail
/// batch must fit half of one).
pub const MAX_RECORD_DATA: usize = 1024 * 1024;

/// One source disk: an image file of a fixed size.
pub struct SourceDisk {
    pub id: String,
    pub size: u64,
    path: String,
    file: File,
}

impl SourceDisk {
    /// Opens (creating and sizing if missing) the image at `path`.
    pub fn open(id: &str, path: &Path, size: u64) -> Result<SourceDisk, CaptureError> {
        let io = |source| CaptureError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        Self::from_file(id, path, file, size)
    }

    /// The image `file`, opened at `path`, sized to at least `size`.
    pub fn from_file(
        id: &str,
        path: &Path,
        file: File,
        size: u64,
    ) -> Result<SourceDisk, CaptureError> {
        let io = |source| CaptureError::Io {
            path: path.display().to_string(),
            source,
        };
        if file.metadata().map_err(io)?.len() < size {
            file.set_len(size).map_err(io)?;
        }
        Ok(SourceDisk {
            id: id.to_string(),
            size,
            path: path.display().to_string(),
            file,
        })
    }

    fn check(&self, offset: u64, length: u64) -> Result<(), CaptureError> {
        match offset.checked_add(length) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(CaptureError::OutOfRange {
                disk: self.id.clone(),
                offset,
                length,
                size: self.size,
            }),
        }
    }

    fn io(&self, source: std::io::Error) -> CaptureError {
        CaptureError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), CaptureError> {
        self.check(offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset).map_err(|e| self.io(e))
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), CaptureError> {
        self.file.write_all_at(data, offset).map_err(|e| self.io(e))
    }

    /// Zeroes a range: a hole punched where the filesystem can (no bytes
    /// written, whatever the length), else zeros written 1 MiB at a time.
    fn zero(&self, offset: u64, length: u64) -> Result<(), CaptureError> {
        use std::os::fd::AsRawFd;
        if let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(length)) {
            // SAFETY: fallocate on a descriptor we own, inside the file.
            let punched = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                )
            };
            if punched == 0 {
                return Ok(());
            }
            let err = std::io::Error::last_os_error();
            if !matches!(
                err.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
            ) {
                return Err(self.io(err));
            }
        }
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(length) as usize];
        let mut done = 0;
        while done < length {
            let n = (length - done).min(CHUNK) as usize;
            self.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// The ranges of the image that may hold data, from SEEK_DATA/SEEK_HOLE;
    /// the whole disk where the filesystem cannot tell.
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        ferry_runtime::sparse::data_ranges(&self.file, self.size)
    }

    /// Makes what was written reach the disk.
    pub fn flush(&self) -> Result<(), CaptureError> {
        self.file.sync_data().map_err(|e| self.io(e))
    }

    /// Whether the image holds exactly `data` at `offset`.
    fn holds(&self, offset: u64, data: &[u8]) -> Result<bool, CaptureError> {
        let mut current = vec![0u8; data.len()];
        self.read_at(&mut current, offset)?;
        Ok(current == data)
    }

    /// Whether `length` bytes at `offset` are all zero (read a MiB at a
    /// time).
    fn is_zero(&self, offset: u64, length: u64) -> Result<bool, CaptureError> {
        const PIECE: u64 = 1 << 20;
        let mut buf = vec![0u8; PIECE.min(length) as usize];
        let mut at = offset;
        while at < offset + length {
            let n = PIECE.min(offset + length - at) as usize;
            self.read_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            at += n as u64;
        }
        Ok(true)
    }
}

/// A VM's disks and its stream.
pub struct Capture {
    disks: HashMap<String, Arc<SourceDisk>>,
    stream: Arc<Stream>,
    /// Shared by writes from their start to their sequence number;
    /// exclusive for what must sit at one place in the stream with every
    /// write before it complete and none after it begun (markers, copies
    /// and checksums read from the source, the end of tracking, close).
    order: Arc<RwLock<()>>,
    /// The ranges of the writes in flight: overlapping writes go one after
    /// another, so the stream's order of them is the images' order.
    in_flight: InFlight,
    /// Set under `order` by [`Capture::close`]: no write reaches a disk after.
    closed: std::sync::atomic::AtomicBool,
    /// Set under `order` while a planned failover drains the stream: writes
    /// are refused until the drain ends (and only until then).
    draining: std::sync::atomic::AtomicBool,
    /// Writes taken and their bytes, since the start (for metrics).
    writes: std::sync::atomic::AtomicU64,
    written_bytes: std::sync::atomic::AtomicU64,
    /// Drop writes and zeroings that change nothing in the image (a
    /// mirror's full sync over a copy that holds most of it already).
    skip_unchanged: std::sync::atomic::AtomicBool,
    /// Writes dropped so, and their bytes.
    unchanged: std::sync::atomic::AtomicU64,
    unchanged_bytes: std::sync::atomic::AtomicU64,
    /// Whether a sync round may complete: closed while an active mirror
    /// is not ready, since until then the agent's copy of the disk is
    /// partial (no recovery point may show it).
    sync_gate: tokio::sync::watch::Sender<bool>,
    /// Set while a re-protected VM's initial replication compares digests:
    /// the chunks the processor then asks for are part of it, not a resync.
    comparing: std::sync::atomic::AtomicBool,
}

impl Capture {
    pub fn new(disks: Vec<SourceDisk>, stream: Arc<Stream>) -> Capture {
        let mut sizes: Vec<(String, u64)> = disks.iter().map(|d| (d.id.clone(), d.size)).collect();
        sizes.sort();
        stream.set_disks(sizes);
        Capture {
            disks: disks
                .into_iter()
                .map(|d| (d.id.clone(), Arc::new(d)))
                .collect(),
            stream,
            order: Arc::new(RwLock::new(())),
            in_flight: InFlight::default(),
            closed: std::sync::atomic::AtomicBool::new(false),
            draining: std::sync::atomic::AtomicBool::new(false),
            writes: std::sync::atomic::AtomicU64::new(0),
            written_bytes: std::sync::atomic::AtomicU64::new(0),
            skip_unchanged: std::sync::atomic::AtomicBool::new(false),
            unchanged: std::sync::atomic::AtomicU64::new(0),
            unchanged_bytes: std::sync::atomic::AtomicU64::new(0),
            sync_gate: tokio::sync::watch::channel(true).0,
            comparing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Marks the initial replication by digest comparison as running (or
    /// over).
    pub fn set_comparing(&self, on: bool) {
        self.comparing
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether an initial replication by digest comparison runs.
    pub fn comparing(&self) -> bool {
        self.comparing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Opens or closes the sync gate: while closed, initial replication and
    /// resync rounds wait before their SYNC_COMPLETED (an active mirror
    /// that is not ready yet closes it).
    pub fn set_sync_gate(&self, open: bool) {
        self.sync_gate.send_replace(open);
    }

    /// Waits until the sync gate is open.
    pub async fn sync_gate(&self) {
        let mut rx = self.sync_gate.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }

    /// From now on, writes and zeroings that leave the image as it is are
    /// neither applied nor recorded: the image already holds them, and
    /// every change that made it so is in the stream (or tracked). A
    /// mirror's full sync over an agent's own copy thus sends only what
    /// differs.
    pub fn skip_unchanged(&self, on: bool) {
        self.skip_unchanged
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Writes and zeroings dropped as unchanged, and their bytes.
    pub fn unchanged(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.unchanged.load(Relaxed),
            self.unchanged_bytes.load(Relaxed),
        )
    }

    fn count_unchanged(&self, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.unchanged.fetch_add(1, Relaxed);
        self.unchanged_bytes.fetch_add(bytes, Relaxed);
    }

    /// Writes taken (written to the source and recorded) and their bytes,
    /// since the agent started.
    pub fn written(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.writes.load(Relaxed), self.written_bytes.load(Relaxed))
    }

    /// Refuses every write from now on (the agent is stopping); returns once
    /// no write is between the disk and the stream, so that what the stream
    /// holds is everything the disks received.
    pub async fn close(&self) {
        let _order = self.order.write().await;
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Refuses writes while a planned failover drains the stream; returns
    /// once no write is between the disk and the stream.
    pub async fn begin_drain(&self) {
        let _order = self.order.write().await;
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The drain is over (done, or given up): writes complete again.
    pub async fn end_drain(&self) {
        let _order = self.order.write().await;
        self.draining
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn check_open(&self) -> Result<(), CaptureError> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(CaptureError::Closed);
        }
        if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(CaptureError::Draining);
        }
        Ok(())
    }

    /// Holds the completion of new writes until the guard is dropped (a
    /// group bookmark round): writes in flight finish first, later ones wait
    /// before reaching the disks, and the stream's last sequence is stable.
    pub async fn hold_writes(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.order.clone().write_owned().await
    }

    /// The stream records go to.
    pub fn stream(&self) -> &Arc<Stream> {
        &self.stream
    }

    /// A disk by id.
    pub fn disk(&self, id: &str) -> Result<&Arc<SourceDisk>, CaptureError> {
        self.disks
            .get(id)
            .ok_or_else(|| CaptureError::UnknownDisk(id.to_string()))
    }

    /// Copies one chunk of the source into the stream for initial
    /// replication or resync, under the ordering lock: writes completed
    /// before it are in what it reads, writes after it follow it in the
    /// stream, so the newest data wins on replay. All-zero chunks are skipped
    /// (the replica starts zeroed). Returns whether a record was sent.
    pub async fn copy_chunk(
        &self,
        disk: &str,
        offset: u64,
        length: u64,
    ) -> Result<bool, CaptureError> {
        self.copy(disk, offset, length, true).await
    }

    /// Copies one chunk for resync: as [`Capture::copy_chunk`], but an
    /// all-zero chunk travels as WRITE_ZEROES, since the replica may hold
    /// older data there.
    pub async fn resync_chunk(
        &self,
        disk: &str,
        offset: u64,
        length: u64,
    ) -> Result<bool, CaptureError> {
        self.copy(disk, offset, length, false).await
    }

    async fn copy(
        &self,
        disk: &str,
        offset: u64,
        length: u64,
        skip_zero: bool,
    ) -> Result<bool, CaptureError> {
        let d = self.disk(disk)?.clone();
        d.check(offset, length)?;
        // Room first, without the ordering lock: a VM's writes never wait
        // for the cache behind a copy.
        self.stream.copy_room(length as usize).await;
        let _order = self.order.write().await;
        self.check_open()?;
        let d2 = d.clone();
        let data = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; length as usize];
            d2.read_at(&mut buf, offset).map(|_| buf)
        })
        .await
        .map_err(|e| d.io(std::io::Error::other(e)))??;
        let op = if data.iter().all(|b| *b == 0) {
            if skip_zero {
                return Ok(false);
            }
            Op::WriteZeroes(ZeroOp { offset, length })
        } else {
            Op::Write(WriteOp {
                offset,
                data: data.into(),
            })
        };
        self.stream.push(disk, op).await;
        Ok(true)
    }

    /// Checks `length` bytes at `offset` by checksum: one CRC-32C per
    /// `chunk_bytes` goes into the stream (under the ordering lock, so the
    /// processor compares them with its replica at exactly this point).
    pub async fn digest_chunks(
        &self,
        disk: &str,
        offset: u64,
        length: u64,
        chunk_bytes: u64,
    ) -> Result<(), CaptureError> {
        let d = self.disk(disk)?.clone();
        d.check(offset, length)?;
        self.stream
            .copy_room(length.div_ceil(chunk_bytes.max(1)) as usize * 4)
            .await;
        let _order = self.order.write().await;
        self.check_open()?;
        let d2 = d.clone();
        let crcs = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; length as usize];
            d2.read_at(&mut buf, offset)?;
            Ok::<_, CaptureError>(
                buf.chunks(chunk_bytes.max(1) as usize)
                    .map(crc32c::crc32c)
                    .collect::<Vec<u32>>(),
            )
        })
        .await
        .map_err(|e| d.io(std::io::Error::other(e)))??;
        let op = Op::Digests(ferry_proto::cache::v1::ChunkDigests {
            offset,
            chunk_bytes,
            length,
            crc32c: crcs,
        });
        self.stream.push(disk, op).await;
        Ok(())
    }

    /// Puts a marker into the stream, in order with the writes around it.
    pub async fn marker(&self, disk: &str, kind: MarkerKind, id: &str) -> u64 {
        let _order = self.order.write().await;
        let op = Op::Marker(Marker {
            kind: kind as i32,
            id: id.to_string(),
            time_unix_nanos: 0,
        });
        self.stream.push(disk, op).await
    }

    /// Ends changed-chunk tracking under the ordering lock and returns the
    /// changed chunks; None while not tracking or before the stream has
    /// re-established its numbering with the cache.
    ///
    /// Every disk the round covers is opened (SYNC_STARTED) here, before
    /// the first write that follows tracking: until its SYNC_COMPLETED the
    /// processor cuts no point, which would otherwise show newer writes of
    /// a disk beside older chunks the round has yet to send again.
    pub async fn end_tracking(&self) -> Option<crate::stream::ResyncSet> {
        let _order = self.order.write().await;
        let set = self.stream.take_tracking().await?;
        for (disk, id) in set.opening(&self.stream.disks()) {
            let op = Op::Marker(Marker {
                kind: MarkerKind::SyncStarted as i32,
                id: id.to_string(),
                time_unix_nanos: 0,
            });
            self.stream.push(&disk, op).await;
        }
        Some(set)
    }

    /// The disk ids, sorted.
    pub fn disk_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.disks.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Reads `length` bytes at `offset`.
    pub async fn read(
        &self,
        disk: &str,
        offset: u64,
        length: usize,
    ) -> Result<Vec<u8>, CaptureError> {
        let d = self.disk(disk)?.clone();
        let d2 = d.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; length];
            d2.read_at(&mut buf, offset).map(|_| buf)
        })
        .await
        .map_err(|e| d.io(std::io::Error::other(e)))?
    }

    /// Makes the disk's completed writes durable on the source (FLUSH, FUA).
    pub async fn flush(&self, disk: &str) -> Result<(), CaptureError> {
        let d = self.disk(disk)?.clone();
        let d2 = d.clone();
        tokio::task::spawn_blocking(move || d2.flush())
            .await
            .map_err(|e| d.io(std::io::Error::other(e)))?
    }

    /// Writes `data` at `offset` and records it; returns its sequence (or the
    /// last one, for an empty write). A write not aligned to 512 bytes is
    /// widened to whole sectors with the bytes around it (read under the
    /// ordering lock), since records are sector-aligned.
    pub async fn write(&self, disk: &str, offset: u64, data: Vec<u8>) -> Result<u64, CaptureError> {
        let d = self.disk(disk)?.clone();
        d.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(self.stream.last().await);
        }
        let _order = self.order.read().await;
        self.check_open()?;
        let written = data.len() as u64;
        let d2 = d.clone();
        // The sectors the write may touch, should it fail part way.
        let touched = (
            offset / 512 * 512,
            (offset + data.len() as u64).div_ceil(512) * 512 - offset / 512 * 512,
        );
        // Held to the sequence number: overlapping writes (and the sectors
        // an unaligned one reads to widen itself) go one after another.
        let _range = self
            .in_flight
            .hold(disk, touched.0, touched.0 + touched.1)
            .await;
        let skip = self
            .skip_unchanged
            .load(std::sync::atomic::Ordering::SeqCst);
        let (start, block) = match tokio::task::spawn_blocking(move || {
            let (start, block) = widen(&d2, offset, data).map_err(|e| (None, e))?;
            if skip && d2.holds(start, &block).map_err(|e| (None, e))? {
                return Ok(None);
            }
            match d2.write_at(&block, start) {
                Ok(()) => Ok(Some((start, block))),
                Err(e) => Err((Some((start, block.len() as u64)), e)),
            }
        })
        .await
        {
            Ok(Ok(Some(done))) => done,
            Ok(Ok(None)) => {
                self.count_unchanged(written);
                return Ok(self.stream.last().await);
            }
            Ok(Err((range, e))) => return Err(self.failed(disk, range, e).await),
            Err(e) => {
                // The write may have happened: the range must go again.
                let e = d.io(std::io::Error::other(e));
                return Err(self.failed(disk, Some(touched), e).await);
            }
        };
        // One record per MAX_RECORD_DATA, pushed together: dense, in order,
        // nothing of another write between them.
        let block = bytes::Bytes::from(block);
        let ops = (0..block.len())
            .step_by(MAX_RECORD_DATA)
            .map(|at| {
                let n = (block.len() - at).min(MAX_RECORD_DATA);
                Op::Write(WriteOp {
                    offset: start + at as u64,
                    data: block.slice(at..at + n),
                })
            })
            .collect();
        let sequence = self.stream.push_all(disk, ops).await;
        use std::sync::atomic::Ordering::Relaxed;
        self.writes.fetch_add(1, Relaxed);
        self.written_bytes.fetch_add(written, Relaxed);
        Ok(sequence)
    }

    /// A write or zeroing failed part way (ENOSPC, EIO): the source may hold
    /// part of it, so the range is marked for resync, never left unrecorded.
    async fn failed(
        &self,
        disk: &str,
        range: Option<(u64, u64)>,
        error: CaptureError,
    ) -> CaptureError {
        // Only an I/O failure can have changed the image.
        if let (Some((offset, length)), CaptureError::Io { .. }) = (range, &error) {
            tracing::warn!(disk, offset, length, %error, "a write failed on the source image: the range is resynced");
            self.stream
                .request_resync(
                    &[],
                    &[(disk.to_string(), offset, length)],
                    &format!("a write failed on the source image: {error}"),
                )
                .await;
        }
        error
    }

    /// Zeroes a range (WRITE_ZEROES, or TRIM when `trim`) and records it
    /// without a payload; returns its sequence. An unaligned range becomes a
    /// write of zeros widened to whole sectors. TRIM zeroes the source too, so
    /// that the replica and the source read the same afterwards.
    pub async fn zero(
        &self,
        disk: &str,
        offset: u64,
        length: u64,
        trim: bool,
    ) -> Result<u64, CaptureError> {
        let d = self.disk(disk)?.clone();
        d.check(offset, length)?;
        if length == 0 {
            return Ok(self.stream.last().await);
        }
        // An unaligned range: its partial sectors become writes of zeros
        // (at most a sector each, widened), the aligned middle stays a
        // payload-free record; nothing of the range's length is allocated.
        let end = offset + length;
        let head_end = offset.div_ceil(512) * 512;
        let tail_start = end / 512 * 512;
        if head_end >= tail_start {
            // Inside one or two sectors.
            return self.write(disk, offset, vec![0u8; length as usize]).await;
        }
        let mut seq = 0;
        if head_end > offset {
            seq = self
                .write(disk, offset, vec![0u8; (head_end - offset) as usize])
                .await?;
        }
        seq = self
            .zero_aligned(&d, disk, head_end, tail_start - head_end, trim)
            .await?
            .max(seq);
        if end > tail_start {
            seq = self
                .write(disk, tail_start, vec![0u8; (end - tail_start) as usize])
                .await?;
        }
        Ok(seq)
    }

    async fn zero_aligned(
        &self,
        d: &Arc<SourceDisk>,
        disk: &str,
        offset: u64,
        length: u64,
        trim: bool,
    ) -> Result<u64, CaptureError> {
        let _order = self.order.read().await;
        self.check_open()?;
        let _range = self.in_flight.hold(disk, offset, offset + length).await;
        let d2 = d.clone();
        let skip = self
            .skip_unchanged
            .load(std::sync::atomic::Ordering::SeqCst);
        match tokio::task::spawn_blocking(move || {
            if skip && d2.is_zero(offset, length)? {
                return Ok(false);
            }
            d2.zero(offset, length).map(|()| true)
        })
        .await
        {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                self.count_unchanged(length);
                return Ok(self.stream.last().await);
            }
            Ok(Err(e)) => return Err(self.failed(disk, Some((offset, length)), e).await),
            Err(e) => {
                let e = d.io(std::io::Error::other(e));
                return Err(self.failed(disk, Some((offset, length)), e).await);
            }
        }
        let z = ZeroOp { offset, length };
        let op = if trim {
            Op::Trim(z)
        } else {
            Op::WriteZeroes(z)
        };
        Ok(self.stream.push(disk, op).await)
    }
}

/// The sector-aligned block that holds `data` at `offset`, filled around it
/// with what the disk holds.
fn widen(d: &SourceDisk, offset: u64, data: Vec<u8>) -> Result<(u64, Vec<u8>), CaptureError> {
    let end = offset + data.len() as u64;
    if offset.is_multiple_of(512) && end.is_multiple_of(512) {
        return Ok((offset, data));
    }
    let start = offset / 512 * 512;
    let aligned_end = end.div_ceil(512) * 512;
    let mut block = vec![0u8; (aligned_end - start) as usize];
    d.read_at(&mut block, start)?;
    let at = (offset - start) as usize;
    block[at..at + data.len()].copy_from_slice(&data);
    Ok((start, block))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{StreamLimits, DIRTY_CHUNK};

    fn is_sync_started(r: &ferry_proto::cache::v1::Record) -> bool {
        matches!(&r.op, Some(Op::Marker(m)) if m.kind == MarkerKind::SyncStarted as i32)
    }

    /// A capture of one disk `os` at `path`, its stream's buffer large
    /// enough for everything a test writes (nothing reaches a cache).
    fn one_disk(path: &std::path::Path, size: u64) -> (Arc<Capture>, Arc<Stream>) {
        let disk = SourceDisk::open("os", path, size).unwrap();
        let stream = Stream::new(
            1,
            StreamLimits {
                buffer_bytes: 256 << 20,
                ..StreamLimits::default()
            },
        );
        (Arc::new(Capture::new(vec![disk], stream.clone())), stream)
    }

    /// Writes from many clients at once, overlapping each other and not,
    /// aligned and not: replaying the stream in sequence order gives the
    /// image the source holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writes_replay_to_the_image_the_source_holds() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * 1024;
        let path = dir.path().join("os");
        let (capture, stream) = one_disk(&path, size);
        let writers: Vec<_> = (0..16u64)
            .map(|w| {
                let capture = capture.clone();
                tokio::spawn(async move {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (w + 1);
                    for i in 0..800u64 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // A few hot sectors, so that writes overlap often.
                        let offset = (x % 32) * 512 + (x >> 40) % 3 * 100;
                        let len = 512 + (x >> 20) % 3000;
                        let byte = (w * 800 + i) as u8 | 1;
                        if (x >> 50).is_multiple_of(7) {
                            capture.zero("os", offset, len, false).await.unwrap();
                        } else {
                            capture
                                .write("os", offset, vec![byte; len as usize])
                                .await
                                .unwrap();
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        let mut replica = vec![0u8; size as usize];
        let mut records = stream.pending_records().await;
        records.sort_by_key(|r| r.sequence);
        for r in &records {
            match &r.op {
                Some(Op::Write(w)) => {
                    let at = w.offset as usize;
                    replica[at..at + w.data.len()].copy_from_slice(&w.data);
                }
                Some(Op::WriteZeroes(z)) | Some(Op::Trim(z)) => {
                    replica[z.offset as usize..(z.offset + z.length) as usize].fill(0);
                }
                _ => {}
            }
        }
        assert!(std::fs::read(&path).unwrap() == replica);
    }

    /// With `skip_unchanged`, a write or zeroing that leaves the image as it
    /// is records nothing and is counted; one that changes a byte is
    /// written and recorded as always. Without it, every write is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_that_change_nothing_are_dropped_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (capture, stream) = one_disk(&dir.path().join("os"), 1 << 20);
        capture.write("os", 4096, vec![7u8; 8192]).await.unwrap();
        // Off: the same bytes again are a write like any other.
        capture.write("os", 4096, vec![7u8; 8192]).await.unwrap();
        assert_eq!(stream.pending_records().await.len(), 2);
        capture.skip_unchanged(true);
        capture.write("os", 4096, vec![7u8; 8192]).await.unwrap();
        // Unaligned, inside what is there: widened, still unchanged.
        capture.write("os", 5000, vec![7u8; 100]).await.unwrap();
        // Zeros over zeros.
        capture.zero("os", 65536, 65536, false).await.unwrap();
        assert_eq!(stream.pending_records().await.len(), 2);
        assert_eq!(capture.unchanged(), (3, 8192 + 100 + 65536));
        // One byte differs: written and recorded.
        let mut data = vec![7u8; 8192];
        data[8191] = 8;
        capture.write("os", 4096, data).await.unwrap();
        capture.zero("os", 4096, 512, false).await.unwrap();
        assert_eq!(stream.pending_records().await.len(), 4);
        let image = std::fs::read(dir.path().join("os")).unwrap();
        assert_eq!(&image[4096..4608], &[0u8; 512][..]);
        assert_eq!(image[4096 + 8191], 8);
    }

    /// A write larger than a record goes as several, and nothing of a
    /// write running beside it comes between them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_records_of_one_large_write_are_consecutive() {
        let dir = tempfile::tempdir().unwrap();
        let piece = MAX_RECORD_DATA as u64;
        let (capture, stream) = one_disk(&dir.path().join("os"), 16 * 3 * piece);
        let writers: Vec<_> = (0..16u64)
            .map(|w| {
                let capture = capture.clone();
                tokio::spawn(async move {
                    let data = vec![w as u8 + 1; 3 * MAX_RECORD_DATA];
                    capture.write("os", w * 3 * piece, data).await.unwrap()
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        let records = stream.pending_records().await;
        assert_eq!(records.len(), 48);
        for three in records.chunks(3) {
            let offsets: Vec<u64> = three
                .iter()
                .map(|r| match &r.op {
                    Some(Op::Write(w)) => w.offset,
                    _ => u64::MAX,
                })
                .collect();
            let first = offsets[0];
            assert_eq!(offsets, [first, first + piece, first + 2 * piece]);
        }
    }

    /// A write waits for a write in flight that it overlaps (even only in
    /// the sectors it widens itself to), and for no other.
    #[tokio::test]
    async fn a_write_waits_only_for_the_writes_in_flight_it_overlaps() {
        let dir = tempfile::tempdir().unwrap();
        let disk = SourceDisk::open("os", &dir.path().join("os"), 64 * 1024).unwrap();
        let capture = Capture::new(vec![disk], Stream::new(1, StreamLimits::default()));
        let held = capture.in_flight.hold("os", 4096, 8192).await;
        // Elsewhere: completes while the range is held.
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            capture.write("os", 0, vec![1; 4096]),
        )
        .await
        .expect("a write elsewhere does not wait")
        .unwrap();
        // Its unaligned end widens into sector 8 (4096..4608): it waits.
        let mut overlapping = Box::pin(capture.write("os", 3000, vec![2; 1100]));
        for _ in 0..10 {
            assert!(futures::poll!(overlapping.as_mut()).is_pending());
            tokio::task::yield_now().await;
        }
        let mut zeroing = Box::pin(capture.zero("os", 8192 - 512, 1024, false));
        assert!(futures::poll!(zeroing.as_mut()).is_pending());
        drop(held);
        overlapping.await.unwrap();
        zeroing.await.unwrap();
    }

    /// A point is cut wherever the stream allows it: a write to a disk
    /// whose round has yet to send its chunks again must never come before
    /// that disk's SYNC_STARTED, or a point would show the new write beside
    /// the old chunks (the chaos run with seed 0xc4a05eed0011 caught one).
    #[tokio::test]
    async fn ending_tracking_opens_every_disk_of_the_round_before_any_write_follows() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8 * DIRTY_CHUNK;
        let disks = ["a", "b"]
            .map(|id| SourceDisk::open(id, &dir.path().join(id), size).unwrap())
            .into();
        let stream = Stream::new(1, StreamLimits::default());
        let capture = Capture::new(disks, stream.clone());
        // The cache asks for every chunk of both disks to be checked.
        stream.request_resync(&[], &[], "test").await;
        let set = capture.end_tracking().await.unwrap();
        assert_eq!(set.verify.count(), 16);
        // A write to disk b, whose chunks the round checks last.
        capture.write("b", 0, vec![7; 4096]).await.unwrap();
        let pending = stream.pending_records().await;
        let opened: Vec<(&str, &str)> = pending
            .iter()
            .take_while(|r| is_sync_started(r))
            .map(|r| match &r.op {
                Some(Op::Marker(m)) => (r.disk_id.as_str(), m.id.as_str()),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(opened, [("a", "resync:full"), ("b", "resync:full")]);
        assert_eq!(pending.len(), 3, "the write follows: {pending:?}");
    }
}
