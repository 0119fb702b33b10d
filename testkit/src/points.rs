//! Recovery points from processor-svc, read back whole for comparison.
//! The helpers call as failover-svc (with [`crate::Insecure::at`]).

use ferry_proto::processor::v1 as pb;
use ferry_proto::processor::v1::processor_client::ProcessorClient;
use ferry_runtime::security::ServiceKind;

use crate::insecure::{At, TestChannel};

/// A call (or a stream's next message) not answered within this fails the
/// test with the call's name, rather than hanging it.
pub const CALL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// A client of processor-svc as failover-svc, which may make every call
/// here (ReadDisk is for failover-svc only).
pub(crate) fn client(processor: At<'_>) -> ProcessorClient<TestChannel> {
    ProcessorClient::new(processor.as_service(ServiceKind::Failover))
        .max_decoding_message_size(64 << 20)
}

/// A VM's points, oldest first.
pub async fn list_points<'a>(processor: impl Into<At<'a>>, vm: &str) -> Vec<pb::RecoveryPoint> {
    let mut points = client(processor.into())
        .list_recovery_points(pb::ListRecoveryPointsRequest {
            vm_name: vm.to_string(),
            ..Default::default()
        })
        .await
        .expect("list recovery points")
        .into_inner()
        .points;
    points.reverse();
    points
}

/// Cuts a point after everything pending ("latest").
pub async fn cut_latest<'a>(
    processor: impl Into<At<'a>>,
    vm: &str,
) -> Result<pb::RecoveryPoint, tonic::Status> {
    client(processor.into())
        .cut_recovery_point(pb::CutRecoveryPointRequest {
            vm_name: vm.to_string(),
        })
        .await
        .map(|r| r.into_inner())
}

/// A disk at a point, holes as zeros. Panics unless the extents are
/// contiguous, cover the disk and carry correct checksums.
pub async fn read_disk<'a>(
    processor: impl Into<At<'a>>,
    vm: &str,
    point: &pb::RecoveryPoint,
    disk: &str,
) -> Vec<u8> {
    let size = point
        .disks
        .iter()
        .find(|d| d.disk_id == disk)
        .map(|d| d.size_bytes)
        .expect("the point has the disk");
    let mut stream = client(processor.into())
        .read_disk(pb::ReadDiskRequest {
            vm_name: vm.to_string(),
            point_id: point.id.clone(),
            disk_id: disk.to_string(),
            offset: 0,
            length: 0,
        })
        .await
        .expect("read disk")
        .into_inner();
    let mut out = vec![0u8; size as usize];
    let mut at = 0u64;
    while let Some(extent) = tokio::time::timeout(CALL_DEADLINE, stream.message())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "ReadDisk of {vm} {}: no extent within {CALL_DEADLINE:?}",
                point.id
            )
        })
        .expect("read disk stream")
    {
        assert_eq!(extent.offset, at, "extents are contiguous");
        match extent.content {
            Some(pb::disk_extent::Content::Data(d)) => {
                assert_eq!(d.len() as u64, extent.length);
                assert_eq!(crc32c::crc32c(&d), extent.crc32c, "extent checksum");
                out[at as usize..(at + extent.length) as usize].copy_from_slice(&d);
            }
            Some(pb::disk_extent::Content::Hole(true)) => {}
            other => panic!("extent without content: {other:?}"),
        }
        at += extent.length;
    }
    assert_eq!(at, size, "the extents cover the disk");
    out
}
