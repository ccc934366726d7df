//! Garbage collection of chunks: mark from leases, manifests and tombstones, sweep the rest.
//!
//! **Invariant: a chunk referenced by a committed manifest, or relied upon by an upload or restore
//! in progress, is never deleted.** It holds whatever the timing, by the order of the records
//! below, with one collector at a time (the controller) and a store with read-after-write and
//! list-after-write consistency (S3 since 2020, SeaweedFS, the local store).
//!
//! # Records
//!
//! * `leases/<id>`: written by an upload or restore *before* it relies on any chunk; lists the
//!   existing chunks it relies on. Chunks an upload PUTs are newer than its lease.
//! * `snapshots/<id>.manifest`: the commit point; written before the upload's lease is deleted.
//! * `deleted/<id>.manifest`: a tombstone, a copy of a deleted manifest written *before* the
//!   manifest is removed ([`super::manifest::delete_snapshot`]).
//! * A snapshot is *live* when it has no tombstone and its manifest exists, checked in that
//!   order ([`super::manifest::snapshot_live`]). An upload re-checks that its parent is live after
//!   writing its lease (else it uploads in full); a restore re-checks its snapshot (else it fails).
//!
//! # Which record protects a chunk
//!
//! | moment | protected by |
//! |---|---|
//! | upload: parent read, lease not yet written | the parent's manifest (nothing is relied upon yet) |
//! | upload: lease written, parent re-checked live | the lease (parent chunks it lists); new chunks: newer than the lease |
//! | upload: chunks PUT, fence (no sweep marker, each chunk checked, re-PUT if a stale sweep took it) | as above |
//! | upload: manifest written, lease not yet deleted | the lease and the manifest |
//! | upload: committed (lease deleted) | the manifest |
//! | restore (eager, lazy, fast-restore image): lease written, snapshot re-checked | the lease |
//! | parent or restored snapshot deleted after the re-check | the lease, and the tombstone (newer than the GC's start) |
//! | clone (a volume restored from a snapshot, lazily hydrated) | the restore lease until hydrated |
//! | snapshot of a volume still hydrating: chunks not fetched yet | its upload lease, written while the restore lease still exists or the restored snapshot is live (checked after; else the upload fails) |
//! | copy to another store (not built yet) | must be an upload there: its lease lists the chunks found present before they are relied upon |
//! | delete: tombstone written, manifest not yet removed | the manifest and the tombstone |
//! | delete: manifest removed | the tombstone, until it is older than the grace; then nothing |
//!
//! # One collection
//!
//! 0. `T` := the store's own clock: a marker object is written and its `LastModified` read.
//!    Every time compared below is a store timestamp; the clocks of nodes, controller and CLI
//!    are never used.
//! 1. List leases, then read each. Every listed lease lowers the cutoff to its modification
//!    time, *even when it vanished before the read*; the hashes of those read are marked. A lease
//!    that vanished because its upload committed has its manifest (written first) seen in step 2.
//!    One that vanished otherwise (a restore that ended) may have protected chunks an upload
//!    started after the listing relies on: marking starts over (bounded; a run that cannot
//!    finish marking deletes nothing).
//! 2. List and read manifests (after every lease read): mark. A manifest deleted since the
//!    listing left a tombstone first: step 3 sees it.
//! 3. List tombstones (after the manifests): those not older than `T - grace` are read and
//!    marked; older ones are removed at the end.
//! 4. Put a sweep marker; list chunks; delete the unmarked ones older than
//!    `min(T - grace, oldest listed lease)`; remove the marker.
//!
//! The listing in step 4 can be stale: an upload may PUT a chunk whose content equals a garbage
//! chunk listed (old) just before, and the sweep would delete the new copy. Uploads therefore
//! finish with a fence ([`super::upload`]): once no sweep marker is in place, every chunk they
//! PUT is checked and re-PUT if gone, before the manifest is written. A sweep that started later
//! lists the new modification time, and the upload's lease or manifest protects the chunk.
//!
//! Why nothing in use is lost: a snapshot committed before step 2's listing is marked there (or
//! was deleted: then only leases can need its chunks). One committed later had its lease in
//! place during step 1: if listed, its hashes are marked or it vanished (then its manifest was
//! written before step 2), and its new chunks are not older than the lease; if written after the
//! listing (after `T`), its new chunks are not older than `T`, and the parent chunks it lists were
//! checked live after that: the parent's manifest is seen in step 2 or its tombstone, written
//! after `T`, in step 3. Restores are the same without new chunks.
//!
//! # The grace and its minimum
//!
//! With every comparison in the store's clock, the grace only has to absorb what the store's own
//! timestamps get wrong: `LastModified` has one-second resolution, and the marker and a chunk may
//! be stamped by different servers of the store (an S3 endpoint is a fleet; a SeaweedFS or Ceph
//! cluster has several gateways), whose clocks agree to well under a second under NTP.
//! [`MIN_GRACE`] (10 s) is ten times the resolution; values below it are refused, here and in
//! the CLI and controller configuration. Larger values (the default is an hour) only keep garbage
//! longer. Skew between the store and the nodes or controller does not matter any more.
//!
//! A manifest or lease that cannot be read stops the collection: nothing is deleted on
//! incomplete marks.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::chunk::{self, Hash};
use super::manifest::{self, decode_lease, ManifestError};
use crate::store::{Store, StoreError};

/// The smallest grace the collector accepts (see the module docs for why).
pub const MIN_GRACE: Duration = Duration::from_secs(10);

/// Tombstones are removed once older than the grace plus this: a second collector (an operator's
/// `strata gc` beside the controller's) that started up to this long before still sees the
/// tombstones it may need.
const TOMBSTONE_KEEP: Duration = Duration::from_secs(24 * 3600);

/// Marking starts over at most this many times (see [`mark_all`]) before the run gives up.
const MARK_ATTEMPTS: u32 = 8;

/// Prefix of the per-run clock markers.
const CLOCK_PREFIX: &str = "gc/clock-";

/// Prefix of the markers a sweep keeps in place while it may delete chunks.
pub const SWEEP_PREFIX: &str = "gc/sweep-";

/// A sweep stops deleting this long after its marker is in place (by its own monotonic clock);
/// what is left waits for the next run.
const SWEEP_WINDOW: Duration = Duration::from_secs(600);

/// A sweep marker older than this (store clock) is a dead collector's: well past
/// [`SWEEP_WINDOW`] plus the time a last delete request may take.
pub const SWEEP_STALE: Duration = Duration::from_secs(1800);

/// What a collection did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    /// Committed manifests read.
    pub manifests: usize,
    /// Leases honoured.
    pub leases: usize,
    /// Leases listed that were gone when read (uploads that committed meanwhile).
    pub leases_vanished: usize,
    /// Times marking started over (a restore lease ended while being read).
    pub restarts: u32,
    /// Tombstones of recently deleted snapshots honoured.
    pub tombstones: usize,
    /// Chunk objects found.
    pub chunks: usize,
    /// Chunks referenced by manifests, leases or tombstones.
    pub referenced: usize,
    /// Unreferenced chunks kept because they are recent.
    pub kept_recent: usize,
    /// Chunks deleted.
    pub deleted: usize,
    /// Bytes deleted.
    pub bytes_deleted: u64,
    /// The store's clock when the collection started.
    pub store_now: Option<SystemTime>,
    /// The newest unreferenced chunk kept for its age (store clock): a collection started
    /// `grace` after it can delete it, unless something references it by then.
    pub newest_kept: Option<SystemTime>,
    /// The newest tombstone honoured (store clock): it protects chunks until `grace` after it.
    pub newest_tombstone: Option<SystemTime>,
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
    /// The grace is below [`MIN_GRACE`].
    #[error(
        "GC grace {grace:?} is below the minimum of {min:?}: chunks of uploads in progress could be deleted"
    )]
    GraceTooShort {
        /// What was asked.
        grace: Duration,
        /// The minimum.
        min: Duration,
    },
    /// Leases kept vanishing while being read: nothing was deleted this time.
    #[error("not collecting: restore leases kept ending while being read ({attempts} attempts)")]
    Busy {
        /// Marking attempts made.
        attempts: u32,
    },
}

/// Checks a grace against [`MIN_GRACE`].
pub fn check_grace(grace: Duration) -> Result<Duration, GcError> {
    if grace < MIN_GRACE {
        return Err(GcError::GraceTooShort {
            grace,
            min: MIN_GRACE,
        });
    }
    Ok(grace)
}

/// The store's clock now: writes a marker object and reads back its modification time. The
/// marker is unique to the caller, so concurrent callers never read each other's.
pub async fn store_now(store: &Store) -> Result<SystemTime, StoreError> {
    let key = format!("{CLOCK_PREFIX}{}", uuid::Uuid::new_v4().simple());
    store
        .put(&key, Bytes::from_static(b"strata gc clock marker\n"))
        .await?;
    let listed = store.list(&key).await;
    let deleted = store.delete(&key).await;
    let t = listed?
        .into_iter()
        .find(|o| o.key == key)
        .map(|o| o.modified)
        .ok_or_else(|| StoreError::Permanent {
            message: format!(
                "the store did not list the clock marker {key} just written: it is not list-after-write consistent"
            ),
        })?;
    deleted?;
    Ok(t)
}

/// Whether a sweep may be running: a sweep marker younger than [`SWEEP_STALE`] by the store's
/// clock. Uploads wait for this to be false before checking that their new chunks exist.
pub async fn sweep_running(store: &Store) -> Result<bool, StoreError> {
    let markers = store.list(SWEEP_PREFIX).await?;
    if markers.is_empty() {
        return Ok(false);
    }
    let now = store_now(store).await?;
    Ok(markers
        .iter()
        .any(|o| now.duration_since(o.modified).unwrap_or_default() < SWEEP_STALE))
}

fn mark(marked: &mut HashSet<Hash>, hashes: &[Vec<u8>]) {
    marked.extend(hashes.iter().filter_map(|h| <Hash>::try_from(h.as_slice()).ok()));
}

/// Runs one collection. `grace`: unreferenced chunks younger than this (by the store's clock) are
/// kept; at least [`MIN_GRACE`].
pub async fn collect(store: &Store, grace: Duration) -> Result<GcReport, GcError> {
    let grace = check_grace(grace)?;
    let started = store_now(store).await?;
    let mut report = GcReport {
        store_now: Some(started),
        ..Default::default()
    };
    let grace_cutoff = started.checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH);
    let tombstone_expiry = grace_cutoff
        .checked_sub(TOMBSTONE_KEEP)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut attempt = 0;
    let (marked, cutoff, expired) = loop {
        attempt += 1;
        match mark_all(store, started, grace_cutoff, tombstone_expiry, &mut report).await? {
            Some(m) => break m,
            None if attempt < MARK_ATTEMPTS => continue,
            None => return Err(GcError::Busy { attempts: attempt }),
        }
    };

    // 4. Sweep, with a marker in place from before the chunk listing until after the last
    // delete (see `super::upload`: an upload re-checks its new chunks once no sweep runs).
    report.restarts = attempt - 1;
    let sweep_key = format!("{SWEEP_PREFIX}{}", uuid::Uuid::new_v4().simple());
    store
        .put(&sweep_key, Bytes::from_static(b"strata gc sweep marker\n"))
        .await?;
    let swept = sweep(store, &marked, cutoff, &mut report).await;
    let unmarked = store.delete(&sweep_key).await;
    swept?;
    unmarked?;
    for key in expired {
        store.delete(&key).await?;
    }
    // Markers of collectors that died mid-sweep.
    for o in store.list(SWEEP_PREFIX).await? {
        if started.duration_since(o.modified).unwrap_or_default() > SWEEP_STALE {
            store.delete(&o.key).await?;
        }
    }
    tracing::debug!(?report, "garbage collection done");
    Ok(report)
}

async fn sweep(
    store: &Store,
    marked: &HashSet<Hash>,
    cutoff: SystemTime,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let window = tokio::time::Instant::now() + SWEEP_WINDOW;
    for obj in store.list("chunks/").await? {
        let Some(h) = chunk::hash_of_key(&obj.key) else {
            continue;
        };
        report.chunks += 1;
        if marked.contains(&h) {
            report.referenced += 1;
        } else if obj.modified >= cutoff || tokio::time::Instant::now() >= window {
            report.kept_recent += 1;
            report.newest_kept = Some(report.newest_kept.map_or(obj.modified, |t| t.max(obj.modified)));
        } else {
            store.delete(&obj.key).await?;
            report.deleted += 1;
            report.bytes_deleted += obj.size;
        }
    }
    Ok(())
}

/// Steps 1–3: what is referenced, the cutoff, and tombstones to remove. `None` when a lease that
/// was not an upload's commit vanished while being read: the marks may miss what it protected
/// (a restore lease an upload relied on), so marking starts over.
async fn mark_all(
    store: &Store,
    started: SystemTime,
    grace_cutoff: SystemTime,
    tombstone_expiry: SystemTime,
    report: &mut GcReport,
) -> Result<Option<(HashSet<Hash>, SystemTime, Vec<String>)>, GcError> {
    let mut marked: HashSet<Hash> = HashSet::new();
    (
        report.leases,
        report.leases_vanished,
        report.manifests,
        report.tombstones,
    ) = (0, 0, 0, 0);
    report.newest_tombstone = None;

    // 1. Leases, before manifests: a lease that vanishes is replaced by a manifest listed below.
    let mut cutoff = grace_cutoff;
    for obj in store.list("leases/").await? {
        // Listed, so it was in place: whatever it protected by time is not older than this.
        cutoff = cutoff.min(obj.modified);
        let data = match store.get(&obj.key).await {
            Ok(d) => d,
            Err(StoreError::NotFound { .. }) => {
                report.leases_vanished += 1;
                // An upload's commit writes the manifest, then deletes the lease: that manifest
                // exists now (or was deleted since, leaving a tombstone) and is read below.
                // Anything else (a restore that finished) may have been relied upon by an
                // upload whose lease this listing missed.
                let id = obj.key.strip_prefix("leases/").unwrap_or_default();
                let committed = store.exists(&manifest::manifest_key(id)).await?
                    || store.exists(&manifest::tombstone_key(id)).await?;
                if !committed {
                    tracing::debug!(lease = %obj.key, "lease vanished while read: marking again");
                    return Ok(None);
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let lease = decode_lease(&obj.key, &data)?;
        report.leases += 1;
        mark(&mut marked, &lease.hashes);
        if started.duration_since(obj.modified).unwrap_or_default() > Duration::from_secs(24 * 3600) {
            tracing::warn!(lease = %obj.key, "lease older than a day: an upload or restore may be stuck");
        }
    }

    // 2. Manifests, listed after every lease was read.
    for id in manifest::list_snapshot_ids(store).await? {
        // Deleted since the listing: its tombstone, written first, is read below.
        if let Some(m) = manifest::read_manifest(store, &id).await? {
            report.manifests += 1;
            marked.extend(super::upload::hashes(&m));
        }
    }

    // 3. Tombstones, listed after the manifests.
    let mut expired = Vec::new();
    for obj in store.list(manifest::TOMBSTONE_PREFIX).await? {
        if obj.modified < grace_cutoff {
            if obj.modified < tombstone_expiry {
                expired.push(obj.key);
            }
            continue;
        }
        let data = match store.get(&obj.key).await {
            Ok(d) => d,
            Err(StoreError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let m = manifest::decode_manifest(&obj.key, &data)?;
        report.tombstones += 1;
        report.newest_tombstone = Some(
            report
                .newest_tombstone
                .map_or(obj.modified, |t| t.max(obj.modified)),
        );
        marked.extend(super::upload::hashes(&m));
    }
    Ok(Some((marked, cutoff, expired)))
}

/// Collects until no unreferenced chunk is kept for its age and no tombstone protects chunks, or
/// `deadline` passes: between runs it waits for the store's clock to pass the newest of those
/// plus the grace. Returns the last report. For cleaning up after everything was deleted (tests, demo, benchmarks).
pub async fn collect_settled(
    store: &Store,
    grace: Duration,
    deadline: Duration,
) -> Result<GcReport, GcError> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let r = collect(store, grace).await?;
        // Young garbage, and chunks only recent tombstones hold, go once the grace has passed.
        let newest = match (r.newest_kept, r.newest_tombstone) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let (Some(now), Some(newest)) = (r.store_now, newest) else {
            return Ok(r);
        };
        if tokio::time::Instant::now() >= until {
            return Ok(r);
        }
        // The store's clock has one-second resolution: one more second makes "older" strict.
        let wait = (newest + grace + Duration::from_secs(1))
            .duration_since(now)
            .unwrap_or(Duration::from_millis(200));
        let wait = wait.min(until.saturating_duration_since(tokio::time::Instant::now()));
        tokio::time::sleep(wait.max(Duration::from_millis(200))).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::local::LocalStore;

    #[tokio::test]
    async fn grace_below_the_minimum_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store: Store = Arc::new(LocalStore::open(dir.path()).unwrap());
        for g in [
            Duration::ZERO,
            Duration::from_secs(1),
            MIN_GRACE - Duration::from_millis(1),
        ] {
            let e = collect(&store, g).await.unwrap_err();
            assert!(matches!(e, GcError::GraceTooShort { .. }), "{g:?}: {e}");
        }
        let r = collect(&store, MIN_GRACE).await.unwrap();
        assert_eq!(r.chunks, 0);
        assert!(r.store_now.is_some());
        // The clock marker does not stay behind.
        assert!(store.list("gc/").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_clock_is_the_stores() {
        let dir = tempfile::tempdir().unwrap();
        let store: Store = Arc::new(LocalStore::open(dir.path()).unwrap());
        let before = SystemTime::now();
        let t = store_now(&store).await.unwrap();
        // The local store's clock is this machine's (file modification times).
        assert!(
            t + Duration::from_secs(1) >= before && t <= SystemTime::now(),
            "{t:?}"
        );
    }
}
