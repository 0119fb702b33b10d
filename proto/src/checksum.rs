//! The record checksum of docs/checksums.md: CRC-32C over a canonical
//! encoding of a `ferry.cache.v1.Record` (protobuf encodings are not unique,
//! so the checksum cannot cover the wire bytes).

use crate::cache::v1::{record::Op, Record};

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// The CRC-32C a record must carry in `crc32c` (that field excluded).
pub fn record_crc32c(record: &Record) -> u32 {
    let mut head = Vec::with_capacity(64);
    head.extend_from_slice(&record.sequence.to_le_bytes());
    put_str(&mut head, &record.disk_id);
    let mut payload: &[u8] = &[];
    match &record.op {
        Some(Op::Write(w)) => {
            head.push(1);
            head.extend_from_slice(&w.offset.to_le_bytes());
            head.extend_from_slice(&(w.data.len() as u64).to_le_bytes());
            payload = &w.data;
        }
        Some(Op::Trim(z)) | Some(Op::WriteZeroes(z)) => {
            head.push(if matches!(record.op, Some(Op::Trim(_))) {
                2
            } else {
                3
            });
            head.extend_from_slice(&z.offset.to_le_bytes());
            head.extend_from_slice(&z.length.to_le_bytes());
        }
        Some(Op::Marker(m)) => {
            head.push(4);
            head.extend_from_slice(&(m.kind as u32).to_le_bytes());
            put_str(&mut head, &m.id);
            head.extend_from_slice(&m.time_unix_nanos.to_le_bytes());
        }
        Some(Op::Digests(d)) => {
            head.push(5);
            head.extend_from_slice(&d.offset.to_le_bytes());
            head.extend_from_slice(&d.chunk_bytes.to_le_bytes());
            head.extend_from_slice(&d.length.to_le_bytes());
            head.extend_from_slice(&(d.crc32c.len() as u32).to_le_bytes());
            for c in &d.crc32c {
                head.extend_from_slice(&c.to_le_bytes());
            }
        }
        None => head.push(0),
    }
    let crc = crc32c::crc32c(&head);
    let crc = crc32c::crc32c_append(crc, payload);
    crc32c::crc32c_append(crc, &record.captured_at_unix_nanos.to_le_bytes())
}

/// Sets `record.crc32c` to its checksum.
pub fn seal(record: &mut Record) {
    record.crc32c = record_crc32c(record);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::v1::{WriteOp, ZeroOp};

    #[test]
    fn every_field_counts() {
        let mut r = Record {
            sequence: 7,
            disk_id: "os".into(),
            op: Some(Op::Write(WriteOp {
                offset: 512,
                data: vec![1; 512].into(),
            })),
            crc32c: 0,
            captured_at_unix_nanos: 99,
        };
        let base = record_crc32c(&r);
        assert_eq!(base, record_crc32c(&r.clone()));
        let mut changed = Vec::new();
        let mut c = r.clone();
        c.sequence = 8;
        changed.push(c);
        let mut c = r.clone();
        c.disk_id = "data".into();
        changed.push(c);
        let mut c = r.clone();
        if let Some(Op::Write(w)) = &mut c.op {
            let mut d = w.data.to_vec();
            d[100] ^= 1;
            w.data = d.into();
        }
        changed.push(c);
        let mut c = r.clone();
        c.captured_at_unix_nanos = 100;
        changed.push(c);
        let mut c = r.clone();
        c.op = Some(Op::Trim(ZeroOp {
            offset: 512,
            length: 512,
        }));
        changed.push(c.clone());
        c.op = Some(Op::WriteZeroes(ZeroOp {
            offset: 512,
            length: 512,
        }));
        changed.push(c);
        let crcs: Vec<u32> = changed.iter().map(record_crc32c).collect();
        for (i, crc) in crcs.iter().enumerate() {
            assert_ne!(*crc, base, "change {i} went unnoticed");
        }
        assert_ne!(crcs[4], crcs[5], "trim and write-zeroes differ");
        seal(&mut r);
        assert_eq!(r.crc32c, base);
    }
}
