//! Which byte ranges a snapshot holds, and which differ between two snapshots of one lineage,
//! read from the manifests alone (no chunk is fetched): the ground for changed-block tracking.
//!
//! A chunk is allocated when the manifest references it (all-zero chunks are never stored, so
//! they read as holes). Between a base and a target of the same lineage (snapshots of one volume
//! and of volumes restored from them), a chunk changed when its hash differs, when only one side
//! holds it, or when it lies past the base's end. The granularity is the lineage's chunk size.

use std::collections::BTreeMap;

use crate::proto::store::Manifest;

/// Why two snapshots cannot be compared.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiffError {
    /// Different lineages share no chunk grid.
    #[error(
        "snapshots {base} and {target} are of different lineages ({base_lineage} and {target_lineage}): \
         only snapshots of one volume, or of volumes restored from its snapshots, can be compared"
    )]
    OtherLineage {
        /// Base snapshot.
        base: String,
        /// Target snapshot.
        target: String,
        /// The base's lineage.
        base_lineage: String,
        /// The target's lineage.
        target_lineage: String,
    },
    /// The chunk sizes differ (a damaged manifest: a lineage has one chunk size).
    #[error("snapshots {base} and {target} have different chunk sizes ({base_size} and {target_size})")]
    ChunkSize {
        /// Base snapshot.
        base: String,
        /// Target snapshot.
        target: String,
        /// The base's chunk size.
        base_size: u32,
        /// The target's chunk size.
        target_size: u32,
    },
}

/// A byte range of a volume: `offset` and `length` in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

/// Byte range of chunk `index` in a volume of `size` bytes (the last chunk may be short).
fn chunk_range(index: u64, chunk_size: u32, size: u64) -> Option<Range> {
    let cs = u64::from(chunk_size.max(1));
    let offset = index.checked_mul(cs)?;
    (offset < size).then(|| Range {
        offset,
        length: cs.min(size - offset),
    })
}

/// Merges adjacent ranges, given in ascending order.
fn coalesce(ranges: impl IntoIterator<Item = Range>) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.offset + last.length == r.offset => last.length += r.length,
            _ => out.push(r),
        }
    }
    out
}

/// The byte ranges `m` holds data for (every referenced chunk), coalesced, ascending.
pub fn allocated(m: &Manifest) -> Vec<Range> {
    let mut indexes: Vec<u64> = m.chunks.iter().map(|c| c.index).collect();
    indexes.sort_unstable();
    indexes.dedup();
    coalesce(
        indexes
            .into_iter()
            .filter_map(|i| chunk_range(i, m.chunk_size, m.size_bytes)),
    )
}

/// The byte ranges of `target` that differ from `base`, coalesced, ascending. Both must be of
/// one lineage. A range the target no longer holds (now zeros) is reported as changed too.
pub fn changed(base: &Manifest, target: &Manifest) -> Result<Vec<Range>, DiffError> {
    if base.lineage != target.lineage {
        return Err(DiffError::OtherLineage {
            base: base.snapshot_id.clone(),
            target: target.snapshot_id.clone(),
            base_lineage: base.lineage.clone(),
            target_lineage: target.lineage.clone(),
        });
    }
    if base.chunk_size != target.chunk_size {
        return Err(DiffError::ChunkSize {
            base: base.snapshot_id.clone(),
            target: target.snapshot_id.clone(),
            base_size: base.chunk_size,
            target_size: target.chunk_size,
        });
    }
    let hashes = |m: &Manifest| -> BTreeMap<u64, Vec<u8>> {
        m.chunks.iter().map(|c| (c.index, c.hash.clone())).collect()
    };
    let (b, t) = (hashes(base), hashes(target));
    let mut indexes: Vec<u64> = b.keys().chain(t.keys()).copied().collect();
    indexes.sort_unstable();
    indexes.dedup();
    // A chunk past the base's end is absent from it; the base's short last chunk hashes fewer
    // bytes than the target's full one: both differ by hash, no size rule is needed.
    let changed = indexes.into_iter().filter(|i| b.get(i) != t.get(i));
    Ok(coalesce(changed.filter_map(|i| {
        chunk_range(i, target.chunk_size, target.size_bytes)
    })))
}

/// Total bytes of `ranges`.
pub fn total(ranges: &[Range]) -> u64 {
    ranges.iter().map(|r| r.length).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::store::ChunkRef;

    const CS: u32 = 4 << 20;

    fn m(id: &str, size: u64, chunks: &[(u64, u8)]) -> Manifest {
        Manifest {
            snapshot_id: id.into(),
            lineage: "lin-1".into(),
            size_bytes: size,
            chunk_size: CS,
            chunks: chunks
                .iter()
                .map(|&(index, h)| ChunkRef {
                    index,
                    hash: vec![h; 32],
                    stored_size: 1,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn r(offset_chunks: u64, length_chunks: u64) -> Range {
        Range {
            offset: offset_chunks * u64::from(CS),
            length: length_chunks * u64::from(CS),
        }
    }

    #[test]
    fn allocated_skips_holes_and_merges_neighbours() {
        let s = m("a", 8 * u64::from(CS), &[(0, 1), (1, 2), (2, 3), (5, 4), (7, 5)]);
        assert_eq!(allocated(&s), vec![r(0, 3), r(5, 1), r(7, 1)]);
    }

    #[test]
    fn the_last_chunk_may_be_short() {
        let size = 2 * u64::from(CS) + 4096;
        let s = m("a", size, &[(2, 1)]);
        assert_eq!(
            allocated(&s),
            vec![Range {
                offset: 2 * u64::from(CS),
                length: 4096
            }]
        );
    }

    #[test]
    fn changed_chunks_are_rewritten_added_or_zeroed() {
        let size = 8 * u64::from(CS);
        let base = m("a", size, &[(0, 1), (1, 2), (2, 3), (4, 9)]);
        // 1 rewritten, 2 and 4 unchanged, 0 zeroed (gone), 3 and 6 new.
        let target = m("b", size, &[(1, 7), (2, 3), (3, 8), (4, 9), (6, 1)]);
        assert_eq!(changed(&base, &target).unwrap(), vec![r(0, 2), r(3, 1), r(6, 1)]);
        assert_eq!(total(&changed(&base, &target).unwrap()), 4 * u64::from(CS));
        assert!(changed(&base, &base).unwrap().is_empty());
    }

    #[test]
    fn growth_past_the_base_counts_as_changed() {
        // The volume was expanded from 2 chunks and a half to 4 chunks: the base's short last
        // chunk (now a full one, another hash) and the new chunk past it differ.
        let base = m("a", 2 * u64::from(CS) + 4096, &[(0, 1), (2, 5)]);
        let target = m("b", 4 * u64::from(CS), &[(0, 1), (2, 6), (3, 6)]);
        assert_eq!(changed(&base, &target).unwrap(), vec![r(2, 2)]);
    }

    #[test]
    fn other_lineages_are_refused() {
        let a = m("a", u64::from(CS), &[(0, 1)]);
        let mut b = m("b", u64::from(CS), &[(0, 1)]);
        b.lineage = "lin-2".into();
        assert!(matches!(changed(&a, &b), Err(DiffError::OtherLineage { .. })));
        let mut c = m("c", u64::from(CS), &[(0, 1)]);
        c.chunk_size = 1 << 20;
        assert!(matches!(changed(&a, &c), Err(DiffError::ChunkSize { .. })));
    }
}
