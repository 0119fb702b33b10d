//! Applies a VM's records to disk images, as a check of what the stream
//! carries: replayed onto copies of the original images, the log must give
//! images identical to the sources.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use ferry_proto::cache::v1::record::Op;
use ferry_proto::cache::v1::Record;

use crate::At;

/// Applies `records` in order to the images, by disk id.
pub fn apply(records: &[Record], images: &HashMap<String, File>) {
    for r in records {
        let image = || {
            images
                .get(&r.disk_id)
                .unwrap_or_else(|| panic!("no image for disk {:?}", r.disk_id))
        };
        match &r.op {
            Some(Op::Write(w)) => image().write_all_at(&w.data, w.offset).unwrap(),
            Some(Op::Trim(z)) | Some(Op::WriteZeroes(z)) => {
                let zeros = vec![0u8; z.length as usize];
                image().write_all_at(&zeros, z.offset).unwrap();
            }
            Some(Op::Marker(_)) | Some(Op::Digests(_)) => {}
            None => panic!("record {} has no op", r.sequence),
        }
    }
}

/// Reads every record of `vm` from the cache from `from` on (as
/// processor-svc, the one service that may tail).
pub async fn tail_all<'a>(cache: impl Into<At<'a>>, vm: &str, from: u64) -> Vec<Record> {
    use ferry_proto::cache::v1 as pb;
    let cache = cache.into();
    let mut client = pb::cache_client::CacheClient::new(
        cache.as_service(ferry_runtime::security::ServiceKind::Processor),
    )
    .max_decoding_message_size(64 << 20);
    let mut stream = client
        .tail(pb::TailRequest {
            vm_name: vm.into(),
            from_sequence: from,
            follow: false,
            max_batch_bytes: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(resp) = stream.message().await.unwrap() {
        out.extend(resp.batch.unwrap_or_default().records);
    }
    out
}
