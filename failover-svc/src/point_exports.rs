//! Recovery points served over NBD, read-only, for instant failover: the
//! VM starts at once on qcow2 overlays whose backing file is its point's
//! disk here, and hydrates in the background (see
//! `engine::steps::serve_disks` and `hydrate`).
//!
//! Each read is one ReadDisk of that range from the processor, every extent
//! checked against its CRC-32C and the extents against the range: a read
//! waits no longer than that extent's read from the point, and a damaged or
//! missing extent is an I/O error for the guest, never wrong data. A
//! processor that is briefly away is retried (bounded), so a restart of it
//! does not fail the guest's reads.
//!
//! Export names carry a per-job secret (`<job>.<disk index>.<secret>`) and
//! are never listed: the listener is on loopback, and a local user who does
//! not know the name cannot read a point.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferry_proto::ids::VmName;
use ferry_runtime::nbd::{Export, Exports, NbdError};
use ferry_runtime::retry::{retry, RetryParams};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::engine::peers::{Extent, Peers};
use crate::error::FailoverError;

/// What instant failover needs: the exports, the address VMs reach them
/// at, qemu-img for the overlays, and the cap on hydration.
pub struct InstantFailover {
    pub exports: Arc<PointExports>,
    pub address: std::net::SocketAddr,
    pub qemu_img: crate::overlay::QemuImg,
    /// MiB/s per disk; 0 for no cap.
    pub hydrate_mib_per_sec: u64,
}

impl InstantFailover {
    /// The URL an overlay names its backing by.
    pub fn url(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.address)
    }
}

/// A point's disk served as one export.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedDisk {
    pub vm: VmName,
    pub point_id: String,
    pub disk_id: String,
    pub size_bytes: u64,
    /// The job that serves it; its exports go when it is done with them.
    pub job: String,
}

/// A read's retries: about 20 s in all, then the guest sees EIO.
const READ_RETRY: RetryParams = RetryParams {
    base: Duration::from_millis(100),
    max: Duration::from_secs(2),
    max_attempts: Some(12),
};

/// The served disks, by export name.
pub struct PointExports {
    peers: Arc<dyn Peers>,
    served: RwLock<HashMap<String, ServedDisk>>,
    shutdown: CancellationToken,
}

impl PointExports {
    pub fn new(peers: Arc<dyn Peers>, shutdown: CancellationToken) -> PointExports {
        PointExports {
            peers,
            served: RwLock::new(HashMap::new()),
            shutdown,
        }
    }

    /// Serves `disk` as `export` (again: replaces it).
    pub fn serve(&self, export: &str, disk: ServedDisk) {
        let mut served = self.served.write().unwrap_or_else(|e| e.into_inner());
        served.insert(export.to_string(), disk);
    }

    /// Stops serving every export of `job`; how many there were.
    pub fn forget_job(&self, job: &str) -> usize {
        let mut served = self.served.write().unwrap_or_else(|e| e.into_inner());
        let before = served.len();
        served.retain(|_, d| d.job != job);
        before - served.len()
    }

    /// The disk behind `export`.
    pub fn served(&self, export: &str) -> Option<ServedDisk> {
        let served = self.served.read().unwrap_or_else(|e| e.into_inner());
        served.get(export).cloned()
    }

    async fn read_once(
        &self,
        d: &ServedDisk,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, FailoverError> {
        let mut extents = self
            .peers
            .read_disk(&d.vm, &d.point_id, &d.disk_id, offset, length)
            .await?;
        let mut got = Vec::new();
        while let Some(e) = extents.next().await.transpose()? {
            got.push(e);
        }
        assemble(offset, length, got).map_err(FailoverError::Corrupt)
    }
}

/// The bytes of `[offset, offset+length)` from extents that must tile it in
/// order, each matching its CRC (holes read as zeros).
pub fn assemble(offset: u64, length: u64, extents: Vec<Extent>) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(length as usize);
    let mut at = offset;
    for e in extents {
        if e.offset != at || e.length == 0 {
            return Err(format!(
                "extent at {} (of {} bytes) where byte {at} was due",
                e.offset, e.length
            ));
        }
        match e.data {
            Some(data) => {
                if data.len() as u64 != e.length {
                    return Err(format!(
                        "extent at {} holds {} bytes, not {}",
                        e.offset,
                        data.len(),
                        e.length
                    ));
                }
                if crc32c::crc32c(&data) != e.crc32c {
                    return Err(format!("extent at {} does not match its CRC", e.offset));
                }
                out.extend_from_slice(&data);
            }
            None => out.resize(out.len() + e.length as usize, 0),
        }
        at += e.length;
    }
    if at != offset + length {
        return Err(format!(
            "extents end at byte {at}; {} was asked for",
            offset + length
        ));
    }
    Ok(out)
}

/// Whether retrying cannot help: the point or disk is gone, or what came
/// back was wrong.
fn permanent(e: &FailoverError) -> bool {
    use tonic::Code;
    match e.peer_code() {
        Some(code) => matches!(
            code,
            Code::NotFound | Code::InvalidArgument | Code::OutOfRange | Code::DataLoss
        ),
        None => matches!(e, FailoverError::Corrupt(_)),
    }
}

impl Exports for PointExports {
    fn list(&self) -> Vec<String> {
        // Names are secrets.
        Vec::new()
    }

    fn export(&self, name: &str) -> Option<Export> {
        self.served(name).map(|d| Export {
            size: d.size_bytes,
            read_only: true,
        })
    }

    async fn read(&self, name: &str, offset: u64, length: u32) -> Result<Vec<u8>, NbdError> {
        let Some(d) = self.served(name) else {
            return Err(NbdError::ShuttingDown);
        };
        let end = offset.saturating_add(u64::from(length));
        if end > d.size_bytes {
            return Err(NbdError::Invalid);
        }
        // The processor reads whole sectors.
        let (start, stop) = (offset / 512 * 512, end.div_ceil(512) * 512);
        let stop = stop.min(d.size_bytes);
        if stop == start {
            return Ok(Vec::new());
        }
        let what = format!(
            "read of {}+{} of disk {} of point {} ({})",
            offset, length, d.disk_id, d.point_id, d.vm
        );
        match retry(READ_RETRY, &self.shutdown, &what, permanent, || {
            self.read_once(&d, start, stop - start)
        })
        .await
        {
            Ok(data) => {
                let from = (offset - start) as usize;
                Ok(data[from..from + length as usize].to_vec())
            }
            Err(e) => {
                tracing::error!(export = name, error = %e, "{what} failed; the guest gets EIO");
                Err(NbdError::Io)
            }
        }
    }

    async fn write(&self, _name: &str, _offset: u64, _data: Vec<u8>) -> Result<(), NbdError> {
        Err(NbdError::ReadOnly)
    }

    async fn zero(&self, _: &str, _: u64, _: u64, _: bool) -> Result<(), NbdError> {
        Err(NbdError::ReadOnly)
    }

    async fn flush(&self, _name: &str) -> Result<(), NbdError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn data(at: u64, bytes: &[u8]) -> Extent {
        Extent {
            offset: at,
            length: bytes.len() as u64,
            crc32c: crc32c::crc32c(bytes),
            data: Some(Bytes::copy_from_slice(bytes)),
        }
    }

    #[test]
    fn extents_that_tile_the_range_read_with_holes_as_zeros() {
        let hole = Extent {
            offset: 1024,
            length: 512,
            data: None,
            crc32c: 0,
        };
        let got = assemble(
            512,
            1536,
            vec![data(512, &[7u8; 512]), hole, data(1536, &[9u8; 512])],
        )
        .unwrap();
        assert_eq!(&got[..512], &[7u8; 512]);
        assert_eq!(&got[512..1024], &[0u8; 512]);
        assert_eq!(&got[1024..], &[9u8; 512]);
    }

    #[test]
    fn a_damaged_short_or_misplaced_extent_is_never_served() {
        let mut bad = data(0, &[1u8; 512]);
        bad.crc32c ^= 1;
        assert!(assemble(0, 512, vec![bad]).unwrap_err().contains("CRC"));
        assert!(assemble(0, 1024, vec![data(0, &[1u8; 512])])
            .unwrap_err()
            .contains("end at byte 512"));
        assert!(assemble(0, 1024, vec![data(512, &[1u8; 512])])
            .unwrap_err()
            .contains("where byte 0 was due"));
        let mut short = data(0, &[1u8; 512]);
        short.length = 1024;
        assert!(assemble(0, 1024, vec![short])
            .unwrap_err()
            .contains("holds 512 bytes"));
    }
}
