//! Garbage collection of chunks: mark from manifests and leases, sweep the rest.
//!
//! **Invariant: a chunk referenced by a committed manifest or by an upload or restore in progress
//! is never deleted.** The protocol that keeps it, with the controller as the only collector:
//!
//! 1. GC lists and reads every manifest (marks their chunks), *then* lists and reads every lease
//!    (marks their chunks, and notes the oldest lease's modification time).
//! 2. An upload writes its lease (listing the parent's chunks it may reuse) *before* relying on
//!    them, then checks that the parent's manifest still exists; if not, it uploads in full. An
//!    upload that read the parent before a GC's manifest listing is therefore covered either by
//!    the parent's manifest or by its lease; one that starts later sees the parent gone.
//! 3. Chunks an upload PUTs are newer than its lease: GC deletes an unreferenced chunk only when
//!    it is older than every lease and older than the grace period before the GC started.
//!
//! A manifest that cannot be read stops the collection: nothing is deleted on incomplete marks.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use super::chunk::{self, Hash};
use super::manifest::{self, decode_lease, ManifestError};
use crate::store::{Store, StoreError};

/// What a collection did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    /// Committed manifests read.
    pub manifests: usize,
    /// Leases honoured.
    pub leases: usize,
    /// Chunk objects found.
    pub chunks: usize,
    /// Chunks referenced by manifests or leases.
    pub referenced: usize,
    /// Unreferenced chunks kept because they are recent.
    pub kept_recent: usize,
    /// Chunks deleted.
    pub deleted: usize,
    /// Bytes deleted.
    pub bytes_deleted: u64,
}

/// Why a collection stopped.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A manifest or lease is unreadable: refusing to delete anything.
    #[error("not collecting, a manifest or lease is unreadable: {0}")]
    Unreadable(#[from] ManifestError),
}

/// Runs one collection. `grace`: unreferenced chunks younger than this are kept.
pub async fn collect(store: &Store, grace: Duration) -> Result<GcReport, GcError> {
    let started = SystemTime::now();
    let mut report = GcReport::default();
    let mut marked: HashSet<Hash> = HashSet::new();
    for id in manifest::list_snapshot_ids(store).await? {
        // A manifest deleted since the listing simply contributes nothing.
        if let Some(m) = manifest::read_manifest(store, &id).await? {
            report.manifests += 1;
            marked.extend(super::upload::hashes(&m));
        }
    }
    let mut oldest_lease: Option<SystemTime> = None;
    for obj in store.list("leases/").await? {
        let data = match store.get(&obj.key).await {
            Ok(d) => d,
            // Finished since the listing: its snapshot's manifest now exists or it was abandoned;
            // either way its chunks are newer than the GC start or marked above.
            Err(StoreError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let lease = decode_lease(&obj.key, &data)?;
        report.leases += 1;
        oldest_lease = Some(oldest_lease.map_or(obj.modified, |t| t.min(obj.modified)));
        marked.extend(
            lease
                .hashes
                .iter()
                .filter_map(|h| <Hash>::try_from(h.as_slice()).ok()),
        );
        if started.duration_since(obj.modified).unwrap_or_default() > Duration::from_secs(24 * 3600) {
            tracing::warn!(lease = %obj.key, "lease older than a day: an upload or restore may be stuck");
        }
    }
    let cutoff = started.checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH);
    let cutoff = oldest_lease.map_or(cutoff, |t| t.min(cutoff));
    for obj in store.list("chunks/").await? {
        let Some(h) = chunk::hash_of_key(&obj.key) else {
            continue;
        };
        report.chunks += 1;
        if marked.contains(&h) {
            report.referenced += 1;
        } else if obj.modified >= cutoff {
            report.kept_recent += 1;
        } else {
            store.delete(&obj.key).await?;
            report.deleted += 1;
            report.bytes_deleted += obj.size;
        }
    }
    tracing::debug!(?report, "garbage collection done");
    Ok(report)
}
