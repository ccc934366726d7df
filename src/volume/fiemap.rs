//! File extent maps (FS_IOC_FIEMAP): where a file's logical ranges live on disk.
//!
//! Two reflink clones of one file taken at different times share physical blocks exactly where
//! the file was not written in between, so comparing their maps finds changed regions without
//! reading data. Physical addresses are compared, not the "shared" flag (btrfs reports an
//! untouched clone as shared throughout).
#![allow(unsafe_code)] // The ioctl below is the only way to the extent map; see the SAFETY note.

use std::os::fd::AsRawFd;

/// One mapped extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the device.
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
    /// FIEMAP_EXTENT_* flags.
    pub flags: u32,
}

const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Extents whose physical address means nothing stable: unknown, delayed allocation, encoded,
/// inline data, not aligned.
const UNRELIABLE: u32 = 0x2 | 0x4 | 0x8 | 0x100 | 0x200;
const HEADER_WORDS: usize = 4; // fm_start, fm_length, (flags, mapped), (count, reserved)
const EXTENT_WORDS: usize = 7; // 56 bytes
const BATCH: usize = 512;

/// The extent map of `file` (flushed first). `None` when the filesystem does not support FIEMAP.
pub fn extents(file: &std::fs::File) -> std::io::Result<Option<Vec<Extent>>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut start = 0u64;
    loop {
        let mut buf = vec![0u64; HEADER_WORDS + BATCH * EXTENT_WORDS];
        buf[0] = start;
        buf[1] = u64::MAX - start;
        buf[2] = u64::from(FIEMAP_FLAG_SYNC); // fm_flags (low half), fm_mapped_extents (high half)
        buf[3] = BATCH as u64; // fm_extent_count (low half)
                               // SAFETY: `buf` is a properly aligned `struct fiemap` header followed by room for BATCH
                               // `struct fiemap_extent`s, as fm_extent_count tells the kernel; it outlives the call.
        let r = unsafe { libc::ioctl(fd, FS_IOC_FIEMAP as _, buf.as_mut_ptr()) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) => Ok(None),
                _ => Err(e),
            };
        }
        let mapped = (buf[2] >> 32) as usize;
        if mapped == 0 {
            return Ok(Some(out));
        }
        let mut last = false;
        for i in 0..mapped.min(BATCH) {
            let w = &buf[HEADER_WORDS + i * EXTENT_WORDS..HEADER_WORDS + (i + 1) * EXTENT_WORDS];
            let flags = (w[5] & 0xffff_ffff) as u32;
            let e = Extent {
                logical: w[0],
                physical: w[1],
                length: w[2],
                flags,
            };
            last |= flags & FIEMAP_EXTENT_LAST != 0;
            start = e.logical + e.length;
            out.push(e);
        }
        if last {
            return Ok(Some(out));
        }
    }
}

/// Physical mapping of `[off, off+len)`: (logical start, physical start or None for a hole, length)
/// pieces, with physically contiguous neighbours merged. `None` if any piece is unreliable.
fn mapping(ext: &[Extent], off: u64, len: u64) -> Option<Vec<(u64, Option<u64>, u64)>> {
    let end = off + len;
    let mut pieces: Vec<(u64, Option<u64>, u64)> = Vec::new();
    let mut pos = off;
    let i = ext.partition_point(|e| e.logical + e.length <= off);
    for e in &ext[i..] {
        if e.logical >= end {
            break;
        }
        if e.flags & UNRELIABLE != 0 {
            return None;
        }
        if e.logical > pos {
            pieces.push((pos, None, e.logical - pos));
        }
        let s = e.logical.max(off);
        let t = (e.logical + e.length).min(end);
        pieces.push((s, Some(e.physical + (s - e.logical)), t - s));
        pos = t;
    }
    if pos < end {
        pieces.push((pos, None, end - pos));
    }
    let mut merged: Vec<(u64, Option<u64>, u64)> = Vec::new();
    for p in pieces {
        if let Some(last) = merged.last_mut() {
            let contiguous = match (last.1, p.1) {
                (None, None) => true,
                (Some(a), Some(b)) => a + last.2 == b,
                _ => false,
            };
            if contiguous {
                last.2 += p.2;
                continue;
            }
        }
        merged.push(p);
    }
    Some(merged)
}

/// True when `[off, off+len)` maps to the same blocks (or holes) in both maps: unchanged.
pub fn same_range(a: &[Extent], b: &[Extent], off: u64, len: u64) -> bool {
    match (mapping(a, off, len), mapping(b, off, len)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(logical: u64, physical: u64, length: u64) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags: 0,
        }
    }

    #[test]
    fn ranges_compare_by_physical_address() {
        let base = vec![e(0, 1000, 100), e(100, 1100, 100), e(300, 5000, 100)];
        let new = vec![
            e(0, 1000, 50),
            e(50, 9000, 10),
            e(60, 1060, 140),
            e(300, 5000, 100),
        ];
        assert!(same_range(&base, &new, 0, 50));
        assert!(!same_range(&base, &new, 40, 20));
        assert!(
            same_range(&base, &new, 60, 140),
            "split extents that stay contiguous are the same"
        );
        assert!(same_range(&base, &new, 200, 100), "holes in both");
        assert!(same_range(&base, &new, 300, 100));
        let moved = vec![e(300, 6000, 100)];
        assert!(!same_range(&base, &moved, 300, 100));
        let mut delalloc = new.clone();
        delalloc[3].flags = 0x4;
        assert!(!same_range(&base, &delalloc, 300, 100));
    }

    // Real files: `fiemap_finds_shared_and_changed_extents_on_xfs` in tests/node_data.rs, on an XFS
    // loop mount, where FIEMAP and reflinks are always there (a temporary directory may be on a
    // filesystem without them, where such a test could only pass without checking anything).
}
