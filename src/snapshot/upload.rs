//! Upload of a captured image: fixed-size chunks, holes and zero chunks recorded by absence,
//! chunks found in the parent reused, new ones compressed and PUT in parallel; the manifest last.
//!
//! Resumable: every finished chunk is appended to a progress log next to the clone, so an upload
//! interrupted by a crash continues where it was. Safe against GC: a lease listing the parent's
//! chunks is written before any of them is relied upon, and the chunks PUT are checked once no
//! sweep runs, before the manifest is written (see [`super::gc`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::stream::{self, StreamExt};
use tokio_util::sync::CancellationToken;

use super::chunk::{self, Hash};
use super::crypto::{ChunkCodec, LineageKey};
use super::manifest::{self, lease_key, read_manifest, ManifestError};
use crate::proto::store::{ChunkRef, Codec, Lease, Manifest, Stats};
use crate::store::{Store, StoreError};

/// What to upload.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct UploadSpec {
    /// `snap-<uuid>`.
    pub snapshot_id: String,
    /// CreateSnapshot name.
    pub name: String,
    /// Source volume.
    pub volume_id: String,
    /// Lineage of the source volume.
    pub lineage: String,
    /// Snapshot to diff against; empty for a full snapshot.
    pub parent_id: String,
    /// When the image was captured.
    pub capture_unix_ms: i64,
    /// Volume size at capture.
    pub size_bytes: u64,
    /// Chunk size of the lineage.
    pub chunk_size: u32,
    /// Filesystem of the source volume (empty for block).
    pub fs_type: String,
    /// Source volume was a block volume.
    pub block: bool,
    /// Manifest tags.
    pub tags: BTreeMap<String, String>,
    /// The capture is a reflink clone (keep it as the next snapshot's base).
    #[serde(default)]
    pub reflinked: bool,
    /// A reflink image of the parent snapshot, private to this upload: chunks whose extents are
    /// unchanged against it are taken from the parent without being read.
    #[serde(default)]
    pub base: Option<PathBuf>,
    /// The source volume was hydrating: a directory holding its `hydrate.manifest` and
    /// `hydrate.map` as of the capture. Chunks not written since the restore are the restored
    /// snapshot's (and may be absent from the image): taken from its manifest, never read.
    #[serde(default)]
    pub hydrating: Option<PathBuf>,
    /// The data key of an encrypted lineage (absent: plaintext). Kept with the pending upload so a
    /// restarted agent resumes it sealed the same way.
    #[serde(default)]
    pub key: Option<LineageKey>,
}

impl UploadSpec {
    /// The codec of this upload's chunks.
    pub fn codec(&self) -> ChunkCodec {
        self.key.as_ref().map_or(ChunkCodec::Plain, ChunkCodec::sealed)
    }

    /// Whether chunks of snapshot `m` may be reused here: same lineage, chunking and data key.
    fn shares_chunks_with(&self, m: &Manifest) -> bool {
        m.lineage == self.lineage
            && m.chunk_size == self.chunk_size
            && m.encryption.as_ref().map(|e| e.key_id.as_str())
                == self.key.as_ref().map(LineageKey::key_id).as_deref()
    }
}

/// Live progress, shared with status queries and metrics.
#[derive(Debug, Default)]
pub struct Progress {
    /// Chunks in the image.
    pub total: AtomicU64,
    /// Chunks finished.
    pub done: AtomicU64,
    /// Bytes read from the image.
    pub bytes_read: AtomicU64,
    /// Bytes sent to the store.
    pub bytes_uploaded: AtomicU64,
}

/// Why an upload failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The store failed (after retries).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A manifest could not be read.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Reading the image failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The upload was cancelled (snapshot deleted, shutdown).
    #[error("upload cancelled")]
    Cancelled,
    /// The volume was captured while hydrating, and the chunks it had not fetched yet are no
    /// longer protected: its restore ended and the restored snapshot was deleted before this
    /// upload's lease was in place.
    #[error(
        "snapshot {restored} (restored into this volume, which was still hydrating when captured) was \
         deleted before the upload could protect its chunks: take the snapshot again"
    )]
    RestoredGone {
        /// The restored snapshot.
        restored: String,
    },
}

impl UploadError {
    /// True when restarting the upload cannot help: the store refused for good (missing bucket,
    /// denied access), the captured image or a manifest cannot be read, or the chunks the capture
    /// relies on are gone. Transient store errors (after the store's own retries) and dropped
    /// connections are worth another attempt; a cancelled upload is neither.
    pub fn is_permanent(&self) -> bool {
        match self {
            UploadError::Store(e) | UploadError::Manifest(ManifestError::Store(e)) => e.is_permanent(),
            UploadError::Manifest(ManifestError::Corrupt { .. }) => true,
            UploadError::Io { .. } => true,
            UploadError::RestoredGone { .. } => true,
            UploadError::Cancelled => false,
        }
    }
}

enum Outcome {
    Zero,
    Known {
        index: u64,
        hash: Hash,
        stored: u32,
        reused: bool,
        raw_len: u64,
    },
    New {
        index: u64,
        hash: Hash,
        stored: u32,
        raw_len: u64,
    },
}

/// Byte ranges of `file` holding data (SEEK_DATA/SEEK_HOLE): holes are never read.
pub fn data_ranges(file: &std::fs::File, size: u64) -> Vec<(u64, u64)> {
    use nix::unistd::{lseek, Whence};
    let fd = file;
    let mut out = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < size {
        let Ok(start) = lseek(fd, pos, Whence::SeekData) else {
            break;
        };
        let end = lseek(fd, start, Whence::SeekHole).unwrap_or(size as i64);
        out.push((start as u64, (end as u64).min(size)));
        pos = end;
    }
    out
}

fn overlaps(ranges: &[(u64, u64)], off: u64, len: u64) -> bool {
    let i = ranges.partition_point(|&(_, end)| end <= off);
    i < ranges.len() && ranges[i].0 < off + len
}

/// Chunks of a hydrating volume still holding the restored snapshot's data.
#[derive(Debug, Default)]
struct RestoredChunks {
    /// The restored snapshot.
    source: String,
    /// Index -> (hash, stored size) of the restored snapshot.
    known: HashMap<u64, (Hash, u32)>,
    /// Zero in the restored snapshot and not written since.
    zero: HashSet<u64>,
}

fn restored_chunks(dir: &Path, spec: &UploadSpec) -> Result<RestoredChunks, UploadError> {
    let io = |what: &str| {
        let context = format!("read {} of the hydrating volume", dir.join(what).display());
        move |source| UploadError::Io { context, source }
    };
    let m = manifest::decode_manifest(
        "hydrate.manifest",
        &std::fs::read(dir.join("hydrate.manifest")).map_err(io("hydrate.manifest"))?,
    )?;
    let map = std::fs::read(dir.join("hydrate.map")).map_err(io("hydrate.map"))?;
    if !spec.shares_chunks_with(&m) {
        // Another lineage's chunking or key: nothing can be matched by index.
        return Ok(RestoredChunks::default());
    }
    let mut out = RestoredChunks {
        source: m.snapshot_id.clone(),
        ..Default::default()
    };
    let mut in_manifest = HashSet::new();
    for c in &m.chunks {
        in_manifest.insert(c.index);
        let unwritten = map
            .get(c.index as usize)
            .is_some_and(|&s| s != crate::hydrate::state::WRITTEN);
        if let (true, Ok(h)) = (unwritten, <Hash>::try_from(c.hash.as_slice())) {
            out.known.insert(c.index, (h, c.stored_size));
        }
    }
    for (i, &s) in map.iter().enumerate() {
        if s != crate::hydrate::state::WRITTEN && !in_manifest.contains(&(i as u64)) {
            out.zero.insert(i as u64);
        }
    }
    Ok(out)
}

/// Reads the progress log: index -> (hash, stored size, reused).
fn load_progress(path: &Path) -> HashMap<u64, (Hash, u32)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return HashMap::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let i = f.next()?.parse().ok()?;
            let h = blake3::Hash::from_hex(f.next()?).ok()?;
            let s = f.next()?.parse().ok()?;
            Some((i, (*h.as_bytes(), s)))
        })
        .collect()
}

/// Uploads the captured image `clone` and commits the snapshot. Returns its manifest.
pub async fn upload(
    store: &Store,
    spec: &UploadSpec,
    clone: &Path,
    progress_log: &Path,
    progress: &Progress,
    concurrency: usize,
    cancel: &CancellationToken,
) -> Result<Manifest, UploadError> {
    let started = Instant::now();
    let parent = if spec.parent_id.is_empty() {
        None
    } else {
        read_manifest(store, &spec.parent_id).await?
    };
    let parent = parent.filter(|p| spec.shares_chunks_with(p));
    let codec = spec.codec();
    let mut parent_chunks: HashMap<Hash, u32> = parent
        .iter()
        .flat_map(|p| p.chunks.iter())
        .filter_map(|c| Some((c.hash.as_slice().try_into().ok()?, c.stored_size)))
        .collect();
    // The lease goes first; only then may the parent's chunks be relied upon, and only if the
    // parent is still live after the lease is in place (see the table in `super::gc`).
    // A resumed upload keeps relying on the chunks its progress log records (some reused from a
    // parent that may be gone by now): the new lease must go on protecting them.
    let done = Arc::new(load_progress(progress_log));
    let restored = Arc::new(match &spec.hydrating {
        Some(dir) => restored_chunks(dir, spec)?,
        None => RestoredChunks::default(),
    });
    let mut leased: HashSet<Hash> = parent_chunks.keys().copied().collect();
    leased.extend(done.values().map(|(h, _)| *h));
    leased.extend(restored.known.values().map(|(h, _)| *h));
    manifest::write_lease(
        store,
        &Lease {
            id: spec.snapshot_id.clone(),
            snapshot_id: spec.snapshot_id.clone(),
            hashes: leased.iter().map(|h| h.to_vec()).collect(),
            created_unix_ms: now_ms(),
        },
    )
    .await?;
    // The restored snapshot's chunks are relied upon from here: still protected by the restore's
    // lease, or by the snapshot being live (see the table in `super::gc`).
    if !restored.known.is_empty()
        && !store
            .exists(&lease_key(&format!("restore-{}", spec.volume_id)))
            .await?
        && !manifest::snapshot_live(store, &restored.source).await?
    {
        return Err(UploadError::RestoredGone {
            restored: restored.source.clone(),
        });
    }
    if parent.is_some() && !manifest::snapshot_live(store, &spec.parent_id).await? {
        tracing::warn!(snapshot.id = %spec.snapshot_id, parent = %spec.parent_id, "parent deleted; uploading in full");
        parent_chunks.clear();
    }
    // With a reflink base of the parent, unchanged chunks are found from extent maps alone.
    let unchanged: Arc<HashSet<u64>> = Arc::new(match (&spec.base, &parent, parent_chunks.is_empty()) {
        (Some(base), Some(p), false) => {
            let (base, clone) = (base.clone(), clone.to_owned());
            let (size, cs) = (spec.size_bytes, u64::from(spec.chunk_size));
            let p_chunks = p.chunks.len();
            tokio::task::spawn_blocking(move || unchanged_chunks(&base, &clone, size, cs))
                .await
                .expect("extent task panicked")
                .inspect(|u| {
                    tracing::debug!(unchanged = u.len(), parent_chunks = p_chunks, "extent comparison")
                })
                .unwrap_or_default()
        }
        _ => HashSet::new(),
    });
    let parent_index: Arc<HashMap<u64, (Hash, u32)>> = Arc::new(
        parent
            .iter()
            .flat_map(|p| p.chunks.iter())
            .filter(|c| parent_chunks.contains_key(c.hash.as_slice()))
            .filter_map(|c| Some((c.index, (c.hash.as_slice().try_into().ok()?, c.stored_size))))
            .collect(),
    );
    let parent_chunks = Arc::new(parent_chunks);

    let file = Arc::new(std::fs::File::open(clone).map_err(|source| UploadError::Io {
        context: format!("open captured image {}", clone.display()),
        source,
    })?);
    let size = spec.size_bytes;
    let cs = u64::from(spec.chunk_size);
    let n_chunks = size.div_ceil(cs);
    let ranges = {
        let f = file.clone();
        Arc::new(
            tokio::task::spawn_blocking(move || data_ranges(&f, size))
                .await
                .expect("seek task panicked"),
        )
    };
    progress.total.store(n_chunks, Ordering::Relaxed);
    progress.done.store(0, Ordering::Relaxed);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(progress_log)
        .map_err(|source| UploadError::Io {
            context: "open progress log".into(),
            source,
        })?;

    let results = stream::iter(0..n_chunks)
        .map(|index| {
            let (file, ranges, parent_chunks, done) =
                (file.clone(), ranges.clone(), parent_chunks.clone(), done.clone());
            let (unchanged, parent_index) = (unchanged.clone(), parent_index.clone());
            let restored = restored.clone();
            let codec = codec.clone();
            async move {
                if cancel.is_cancelled() {
                    return Err(UploadError::Cancelled);
                }
                if let Some(&(hash, stored)) = done.get(&index) {
                    let raw_len = cs.min(size - index * cs);
                    return Ok(Outcome::Known {
                        index,
                        hash,
                        stored,
                        reused: false,
                        raw_len,
                    });
                }
                let off = index * cs;
                let len = cs.min(size - off);
                if let Some(&(hash, stored)) = restored.known.get(&index) {
                    return Ok(Outcome::Known {
                        index,
                        hash,
                        stored,
                        reused: true,
                        raw_len: len,
                    });
                }
                if restored.zero.contains(&index) {
                    return Ok(Outcome::Zero);
                }
                if unchanged.contains(&index) {
                    return Ok(match parent_index.get(&index) {
                        Some(&(hash, stored)) => Outcome::Known {
                            index,
                            hash,
                            stored,
                            reused: true,
                            raw_len: len,
                        },
                        None => Outcome::Zero,
                    });
                }
                if !overlaps(&ranges, off, len) {
                    return Ok(Outcome::Zero);
                }
                let work = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                    let mut buf = vec![0u8; len as usize];
                    file.read_exact_at(&mut buf, off)?;
                    if chunk::is_zero(&buf) {
                        return Ok((len, None));
                    }
                    let hash = codec.name(&buf);
                    if let Some(&stored) = parent_chunks.get(&hash) {
                        return Ok((len, Some((hash, Err(stored)))));
                    }
                    Ok((len, Some((hash, Ok(codec.encode(&hash, &buf, 1))))))
                })
                .await
                .expect("chunk task panicked")
                .map_err(|source| UploadError::Io {
                    context: format!("read chunk {index}"),
                    source,
                })?;
                progress.bytes_read.fetch_add(work.0, Ordering::Relaxed);
                match work.1 {
                    None => Ok(Outcome::Zero),
                    Some((hash, Err(stored))) => Ok(Outcome::Known {
                        index,
                        hash,
                        stored,
                        reused: true,
                        raw_len: len,
                    }),
                    Some((hash, Ok(encoded))) => {
                        let stored = encoded.len() as u32;
                        store.put(&chunk::key(&hash), encoded).await?;
                        progress
                            .bytes_uploaded
                            .fetch_add(u64::from(stored), Ordering::Relaxed);
                        Ok(Outcome::New {
                            index,
                            hash,
                            stored,
                            raw_len: len,
                        })
                    }
                }
            }
        })
        .buffer_unordered(concurrency.max(1));
    tokio::pin!(results);

    let mut refs = Vec::new();
    // Chunks this upload PUT, now or before a restart: checked once no sweep runs (`fence`).
    let mut put_here: Vec<(u64, Hash)> = Vec::new();
    let mut stats = Stats::default();
    while let Some(r) = results.next().await {
        let (index, hash, stored) = match r? {
            Outcome::Zero => {
                stats.chunks_zero += 1;
                progress.done.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Outcome::Known {
                index,
                hash,
                stored,
                reused,
                raw_len,
            } => {
                if reused {
                    stats.chunks_reused += 1;
                    stats.bytes_reused += raw_len;
                } else {
                    // Uploaded before a restart.
                    put_here.push((index, hash));
                    stats.chunks_new += 1;
                    stats.bytes_new += raw_len;
                    stats.bytes_uploaded += u64::from(stored);
                }
                (index, hash, stored)
            }
            Outcome::New {
                index,
                hash,
                stored,
                raw_len,
            } => {
                put_here.push((index, hash));
                stats.chunks_new += 1;
                stats.bytes_new += raw_len;
                stats.bytes_uploaded += u64::from(stored);
                (index, hash, stored)
            }
        };
        // Losing the tail of this log in a crash only means re-uploading those chunks.
        let _ = writeln!(log, "{index} {} {stored}", chunk::hex(&hash));
        progress.done.fetch_add(1, Ordering::Relaxed);
        refs.push(ChunkRef {
            index,
            hash: hash.to_vec(),
            stored_size: stored,
        });
    }
    refs.sort_by_key(|c| c.index);
    stats.bytes_read = progress.bytes_read.load(Ordering::Relaxed);
    stats.upload_ms = started.elapsed().as_millis() as u64;
    let m = Manifest {
        snapshot_id: spec.snapshot_id.clone(),
        name: spec.name.clone(),
        volume_id: spec.volume_id.clone(),
        lineage: spec.lineage.clone(),
        parent_id: if parent_chunks.is_empty() {
            String::new()
        } else {
            spec.parent_id.clone()
        },
        capture_unix_ms: spec.capture_unix_ms,
        size_bytes: spec.size_bytes,
        chunk_size: spec.chunk_size,
        codec: Codec::Zstd as i32,
        tags: spec.tags.clone().into_iter().collect(),
        chunks: refs,
        stats: Some(stats),
        fs_type: spec.fs_type.clone(),
        block: spec.block,
        committed_unix_ms: now_ms(),
        encryption: spec.key.as_ref().map(LineageKey::record),
    };
    fence(store, &codec, &file, &put_here, size, cs, cancel).await?;
    if cancel.is_cancelled() {
        return Err(UploadError::Cancelled);
    }
    manifest::write_manifest(store, &m).await?;
    store.delete(&lease_key(&spec.snapshot_id)).await?;
    Ok(m)
}

/// Makes sure every chunk this upload PUT still exists before the manifest names it. A GC sweep
/// lists chunks, then deletes the old unreferenced ones: if this upload PUT a chunk whose
/// content equals such a garbage chunk after the listing, the sweep deletes the new copy. So:
/// wait until no sweep marker is in place (every sweep that listed before a PUT here has ended),
/// then check each chunk, PUT again (read from the image) those gone, and repeat until a check
/// finds them all. A sweep that starts later lists the new modification time, and this upload's
/// lease protects the chunk (see `super::gc`).
async fn fence(
    store: &Store,
    codec: &ChunkCodec,
    file: &Arc<std::fs::File>,
    chunks: &[(u64, Hash)],
    size: u64,
    cs: u64,
    cancel: &CancellationToken,
) -> Result<(), UploadError> {
    if chunks.is_empty() {
        return Ok(());
    }
    loop {
        let mut pause = std::time::Duration::from_millis(10);
        while super::gc::sweep_running(store).await? {
            if cancel.is_cancelled() {
                return Err(UploadError::Cancelled);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_secs(1));
        }
        let checks: Vec<(u64, Hash, Result<bool, StoreError>)> = stream::iter(chunks.iter().copied())
            .map(|(i, h)| async move { (i, h, store.exists(&chunk::key(&h)).await) })
            .buffer_unordered(16)
            .collect()
            .await;
        let mut missing = Vec::new();
        for (i, h, present) in checks {
            if !present? {
                missing.push((i, h));
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            chunks = missing.len(),
            "chunks removed by a concurrent GC sweep (same content as garbage): uploading them again"
        );
        for (index, hash) in missing {
            let (f, codec) = (file.clone(), codec.clone());
            let (off, len) = (index * cs, cs.min(size - index * cs));
            let encoded = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                let mut buf = vec![0u8; len as usize];
                f.read_exact_at(&mut buf, off)?;
                if codec.name(&buf) != hash {
                    return Err(std::io::Error::other(
                        "the captured image changed during the upload",
                    ));
                }
                Ok(codec.encode(&hash, &buf, 1))
            })
            .await
            .expect("chunk task panicked")
            .map_err(|source| UploadError::Io {
                context: format!("read chunk {index} again"),
                source,
            })?;
            store.put(&chunk::key(&hash), encoded).await?;
        }
    }
}

/// Chunk indexes whose extents are the same in `base` and `clone` (unchanged since the base).
/// Errors and filesystems without FIEMAP give an empty set: everything is read.
fn unchanged_chunks(base: &Path, clone: &Path, size: u64, cs: u64) -> std::io::Result<HashSet<u64>> {
    use crate::volume::fiemap;
    let (Some(a), Some(b)) = (
        fiemap::extents(&std::fs::File::open(base)?)?,
        fiemap::extents(&std::fs::File::open(clone)?)?,
    ) else {
        return Ok(HashSet::new());
    };
    Ok((0..size.div_ceil(cs))
        .filter(|i| fiemap::same_range(&a, &b, i * cs, cs.min(size - i * cs)))
        .collect())
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Hashes of all chunks a manifest names.
pub fn hashes(m: &Manifest) -> HashSet<Hash> {
    m.chunks
        .iter()
        .filter_map(|c| c.hash.as_slice().try_into().ok())
        .collect()
}

/// Where a pending snapshot keeps its files on the node.
pub fn pending_dir(root: &Path, snapshot_id: &str) -> PathBuf {
    root.join("snapshots").join(snapshot_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_found_without_reading() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .read(true)
            .open(&p)
            .unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 10 << 20).unwrap();
        f.sync_all().unwrap();
        let r = data_ranges(&f, 64 << 20);
        assert!(!r.is_empty());
        assert!(overlaps(&r, 8 << 20, 4 << 20));
        assert!(!overlaps(&r, 32 << 20, 4 << 20));
        let total: u64 = r.iter().map(|(a, b)| b - a).sum();
        assert!(total < 8 << 20, "data ranges cover {total} bytes");
    }
}
