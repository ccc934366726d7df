//! Restore: every chunk of a manifest fetched in parallel, verified against its hash, and written
//! at its offset. Chunks absent from the manifest are zeros: left as holes in a fresh file, written
//! as zeros over a device or an existing file.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::stream::{self, StreamExt};
use tokio_util::sync::CancellationToken;

use super::chunk::{self, ChunkError, Hash};
use super::crypto::ChunkCodec;
use super::manifest::{self, lease_key};
use super::upload::Progress;
use crate::proto::store::Manifest;
use crate::store::{Store, StoreError};

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The store failed (after retries).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A chunk the manifest names is missing from the store.
    #[error("chunk {hash} of snapshot {snapshot_id} is missing from the store")]
    MissingChunk {
        /// The snapshot.
        snapshot_id: String,
        /// The chunk.
        hash: String,
    },
    /// A chunk failed verification.
    #[error(transparent)]
    Corrupt(#[from] ChunkError),
    /// The snapshot was deleted before the restore could protect its chunks.
    #[error("snapshot {snapshot_id} was deleted")]
    SnapshotGone {
        /// The snapshot.
        snapshot_id: String,
    },
    /// Writing the target failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Cancelled (volume deleted, shutdown).
    #[error("restore cancelled")]
    Cancelled,
}

/// Writes the snapshot `m` into `target` (already at least `m.size_bytes` long). `lease_id` names
/// the lease that protects the chunks while this runs. With `zero_fill`, chunks absent from the
/// manifest are written as zeros (for targets that may hold old data). `codec` opens its chunks
/// (see [`super::crypto::codec_for`]).
#[allow(clippy::too_many_arguments)]
pub async fn restore(
    store: &Store,
    m: &Manifest,
    codec: &ChunkCodec,
    target: &Path,
    lease_id: &str,
    zero_fill: bool,
    progress: &Progress,
    concurrency: usize,
    cancel: &CancellationToken,
) -> Result<(), RestoreError> {
    manifest::lease_chunks_of(store, m, lease_id).await?;
    let result = restore_leased(store, m, codec, target, zero_fill, progress, concurrency, cancel).await;
    // The lease is dropped whatever happened; a failed restore starts over with a new one.
    if let Err(e) = store.delete(&lease_key(lease_id)).await {
        tracing::warn!(lease = %lease_id, error = %e, "could not remove restore lease");
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn restore_leased(
    store: &Store,
    m: &Manifest,
    codec: &ChunkCodec,
    target: &Path,
    zero_fill: bool,
    progress: &Progress,
    concurrency: usize,
    cancel: &CancellationToken,
) -> Result<(), RestoreError> {
    if !manifest::snapshot_live(store, &m.snapshot_id).await? {
        return Err(RestoreError::SnapshotGone {
            snapshot_id: m.snapshot_id.clone(),
        });
    }
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .write(true)
            .open(target)
            .map_err(|source| RestoreError::Io {
                context: format!("open {}", target.display()),
                source,
            })?,
    );
    let cs = u64::from(m.chunk_size);
    let n_chunks = m.size_bytes.div_ceil(cs);
    progress.total.store(n_chunks, Ordering::Relaxed);
    progress.done.store(0, Ordering::Relaxed);
    let present: std::collections::HashSet<u64> = m.chunks.iter().map(|c| c.index).collect();
    let zeros: Vec<u64> = if zero_fill {
        (0..n_chunks).filter(|i| !present.contains(i)).collect()
    } else {
        Vec::new()
    };
    progress.done.fetch_add(
        n_chunks - m.chunks.len() as u64 - zeros.len() as u64,
        Ordering::Relaxed,
    );

    // Owned work items: (index, hash), an empty hash meaning "write zeros".
    let mut items: Vec<(u64, Vec<u8>)> = Vec::with_capacity(m.chunks.len() + zeros.len());
    for c in &m.chunks {
        items.push((c.index, c.hash.clone()));
    }
    items.extend(zeros.into_iter().map(|i| (i, Vec::new())));
    let fetches = stream::iter(items)
        .map(|(index, hash): (u64, Vec<u8>)| {
            let (file, codec) = (file.clone(), codec.clone());
            async move {
                if cancel.is_cancelled() {
                    return Err(RestoreError::Cancelled);
                }
                let off = index * cs;
                let len = cs.min(m.size_bytes - off) as usize;
                let data = if hash.is_empty() {
                    None
                } else {
                    let h: Hash = hash.as_slice().try_into().map_err(|_| ChunkError::Corrupt {
                        hash: format!("{hash:02x?}"),
                        reason: "manifest holds a malformed hash".into(),
                    })?;
                    let obj = match store.get(&chunk::key(&h)).await {
                        Ok(o) => o,
                        Err(StoreError::NotFound { .. }) => {
                            return Err(RestoreError::MissingChunk {
                                snapshot_id: m.snapshot_id.clone(),
                                hash: chunk::hex(&h),
                            })
                        }
                        Err(e) => return Err(e.into()),
                    };
                    progress.bytes_read.fetch_add(obj.len() as u64, Ordering::Relaxed);
                    Some((h, obj))
                };
                tokio::task::spawn_blocking(move || -> Result<(), RestoreError> {
                    let raw = match data {
                        Some((h, obj)) => codec.decode(&h, &obj)?,
                        None => vec![0u8; len],
                    };
                    file.write_all_at(&raw[..len.min(raw.len())], off)
                        .map_err(|source| RestoreError::Io {
                            context: format!("write chunk {index}"),
                            source,
                        })
                })
                .await
                .expect("write task panicked")
            }
        })
        .buffer_unordered(concurrency.max(1));
    tokio::pin!(fetches);
    while let Some(r) = fetches.next().await {
        r?;
        progress.done.fetch_add(1, Ordering::Relaxed);
    }
    let f = file.clone();
    tokio::task::spawn_blocking(move || f.sync_all())
        .await
        .expect("sync task panicked")
        .map_err(|source| RestoreError::Io {
            context: "sync restored data".into(),
            source,
        })?;
    Ok(())
}

/// Bytes restored so far, for progress bars.
pub fn percent(p: &Progress) -> u64 {
    let total = p.total.load(Ordering::Relaxed).max(1);
    p.done.load(Ordering::Relaxed) * 100 / total
}

/// Unused-progress helper for callers that do not report.
pub fn silent() -> Progress {
    Progress {
        total: AtomicU64::new(0),
        ..Default::default()
    }
}
