//! Original-location recovery writes into a disk image that already holds
//! most of the point: each block is read and compared first, and only the
//! blocks that differ are written (a hole of the point is a run of zeros).
//! What was written is counted, so a failback can say how little it wrote.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// The unit compared and written.
pub const BLOCK: usize = 64 * 1024;

/// Makes `offset..offset + length` of `file` equal to `data` (None: zeros),
/// writing only the blocks that differ; the bytes written.
pub fn write_differing(
    file: &File,
    offset: u64,
    length: u64,
    data: Option<&[u8]>,
) -> std::io::Result<u64> {
    let mut written = 0u64;
    let mut have = vec![0u8; BLOCK];
    let zeros = vec![0u8; BLOCK];
    let mut at = 0u64;
    while at < length {
        let n = (BLOCK as u64).min(length - at) as usize;
        let want = match data {
            Some(d) => &d[at as usize..at as usize + n],
            None => &zeros[..n],
        };
        let have = &mut have[..n];
        read_or_zero(file, have, offset + at)?;
        if have != want {
            file.write_all_at(want, offset + at)?;
            written += n as u64;
        }
        at += n as u64;
    }
    Ok(written)
}

/// Reads `buf.len()` bytes at `offset`; what lies past the end of the
/// file reads as zeros (an image shorter than its disk).
fn read_or_zero(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => {
                buf[done..].fill(0);
                return Ok(());
            }
            n => done += n,
        }
    }
    Ok(())
}

/// Makes a hole of the point (`offset..offset + length`) zeros in `file`:
/// only the file's data ranges are read, so a sparse image's holes cost
/// nothing.
pub fn zero_differing(file: &File, offset: u64, length: u64) -> std::io::Result<u64> {
    let end = offset + length;
    let mut written = 0;
    for (start, stop) in ferry_runtime::sparse::data_ranges(file, end) {
        let (s, e) = (start.max(offset), stop.min(end));
        if s < e {
            written += write_differing(file, s, e - s, None)?;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_blocks_that_differ_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut image = vec![7u8; 4 * BLOCK];
        file.write_all_at(&image, 0).unwrap();
        // The same bytes: nothing written.
        assert_eq!(
            write_differing(&file, 0, image.len() as u64, Some(&image)).unwrap(),
            0
        );
        // One byte of the third block changed: that block only.
        image[2 * BLOCK + 5] = 9;
        assert_eq!(
            write_differing(&file, 0, image.len() as u64, Some(&image)).unwrap(),
            BLOCK as u64
        );
        // A hole over the second block: it becomes zeros.
        assert_eq!(
            zero_differing(&file, BLOCK as u64, BLOCK as u64).unwrap(),
            BLOCK as u64
        );
        image[BLOCK..2 * BLOCK].fill(0);
        assert_eq!(std::fs::read(&path).unwrap(), image);
        // Zeros over zeros: nothing.
        assert_eq!(
            zero_differing(&file, BLOCK as u64, BLOCK as u64).unwrap(),
            0
        );
    }
}
