//! Recovery points from processor-svc, read back whole for comparison.

use ferry_proto::processor::v1 as pb;
use ferry_proto::processor::v1::processor_client::ProcessorClient;

async fn client(url: &str) -> ProcessorClient<tonic::transport::Channel> {
    ProcessorClient::connect(url.to_string())
        .await
        .expect("connect to processor-svc")
        .max_decoding_message_size(64 << 20)
}

/// A VM's points, oldest first.
pub async fn list_points(url: &str, vm: &str) -> Vec<pb::RecoveryPoint> {
    let mut points = client(url)
        .await
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
pub async fn cut_latest(url: &str, vm: &str) -> Result<pb::RecoveryPoint, tonic::Status> {
    client(url)
        .await
        .cut_recovery_point(pb::CutRecoveryPointRequest {
            vm_name: vm.to_string(),
        })
        .await
        .map(|r| r.into_inner())
}

/// A disk at a point, holes as zeros. Panics unless the extents are
/// contiguous, cover the disk and carry correct checksums.
pub async fn read_disk(url: &str, vm: &str, point: &pb::RecoveryPoint, disk: &str) -> Vec<u8> {
    let size = point
        .disks
        .iter()
        .find(|d| d.disk_id == disk)
        .map(|d| d.size_bytes)
        .expect("the point has the disk");
    let mut stream = client(url)
        .await
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
    while let Some(extent) = stream.message().await.expect("read disk stream") {
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
