//! The controller's memory of committed snapshots: what its answers need (ids, sizes, times,
//! filesystem, tags), never the chunk lists, and at most a fixed number of them.
//!
//! A manifest holds one reference per chunk (a 1 TiB volume at 4 MiB chunks: 262,144 of them);
//! keeping whole manifests made the controller's memory grow with every chunk in the store. The
//! controller never reads chunk lists (agents do, when they restore), so a summary is the manifest
//! with its chunk list dropped, and the oldest summaries are forgotten past [`DEFAULT_CAPACITY`]
//! (read again from the store when asked for). `strata bench-controller` measures the effect.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::proto::store::Manifest;

/// Summaries kept at most: about 300 bytes each (more with many tags), so tens of MiB at most.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// A bounded map from snapshot id to its manifest without chunks. Manifests never change once
/// committed, so an entry is never stale; a deleted snapshot is removed.
pub struct Summaries {
    cap: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, Manifest>,
    /// Insertion order, for eviction; may hold ids removed since (skipped when evicting).
    order: VecDeque<String>,
}

impl Default for Summaries {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl Summaries {
    /// An empty map keeping at most `cap` summaries (at least one).
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            inner: Mutex::default(),
        }
    }

    /// The summary of `snapshot_id`, if known.
    pub fn get(&self, snapshot_id: &str) -> Option<Manifest> {
        self.inner
            .lock()
            .expect("summaries")
            .map
            .get(snapshot_id)
            .cloned()
    }

    /// Remembers `m` without its chunk list, forgetting the oldest summary when full; returns
    /// the summary.
    pub fn insert(&self, mut m: Manifest) -> Manifest {
        m.chunks = Vec::new();
        let mut g = self.inner.lock().expect("summaries");
        if g.map.insert(m.snapshot_id.clone(), m.clone()).is_none() {
            g.order.push_back(m.snapshot_id.clone());
        }
        while g.map.len() > self.cap {
            match g.order.pop_front() {
                Some(old) => {
                    g.map.remove(&old);
                }
                None => break,
            }
        }
        // Removed ids linger in `order`; compact when they dominate.
        if g.order.len() > 2 * self.cap {
            let Inner { map, order } = &mut *g;
            order.retain(|id| map.contains_key(id));
        }
        m
    }

    /// Forgets `snapshot_id` (deleted).
    pub fn remove(&self, snapshot_id: &str) {
        self.inner.lock().expect("summaries").map.remove(snapshot_id);
    }

    /// Summaries held.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("summaries").map.len()
    }

    /// True when none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Chunk references held over all summaries (always zero: the point of this type).
    pub fn chunk_refs(&self) -> usize {
        self.inner
            .lock()
            .expect("summaries")
            .map
            .values()
            .map(|m| m.chunks.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::store::ChunkRef;

    fn manifest(id: &str, chunks: u64) -> Manifest {
        Manifest {
            snapshot_id: id.into(),
            volume_id: "vol-1".into(),
            size_bytes: chunks << 22,
            chunks: (0..chunks)
                .map(|index| ChunkRef {
                    index,
                    hash: vec![7; 32],
                    stored_size: 1,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn keeps_no_chunks_and_at_most_cap() {
        let s = Summaries::with_capacity(3);
        for i in 0..10 {
            let kept = s.insert(manifest(&format!("snap-{i}"), 256));
            assert!(kept.chunks.is_empty());
            assert_eq!(
                kept.size_bytes,
                256 << 22,
                "everything but the chunk list is kept"
            );
        }
        assert_eq!(s.len(), 3);
        assert_eq!(s.chunk_refs(), 0);
        // The oldest went first.
        assert!(s.get("snap-6").is_none());
        assert!(s.get("snap-9").is_some());
    }

    #[test]
    fn removed_ids_do_not_pin_memory() {
        let s = Summaries::with_capacity(2);
        for i in 0..1000 {
            let id = format!("snap-{i}");
            s.insert(manifest(&id, 1));
            s.remove(&id);
        }
        assert!(s.is_empty());
        assert!(s.inner.lock().unwrap().order.len() <= 4);
    }
}
