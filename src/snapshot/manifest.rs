//! Manifests (the commit point of a snapshot) and leases, in a checksummed envelope.
//!
//! Envelope, version 1:
//!
//! ```text
//! 0   8  magic: "STRATAMF" (manifest) or "STRATALS" (lease)
//! 8   4  version (1), little endian
//! 12  4  CRC32 of the body, little endian
//! 16  8  body length, little endian
//! 24  .. body: protobuf `strata.store.v1.Manifest` / `Lease`
//! ```
//!
//! A snapshot exists exactly when its manifest object exists: the manifest is written last, after
//! every chunk it names, in one PUT (atomic on S3 and on the local store).

use bytes::Bytes;
use prost::Message;

use crate::proto::store::{Lease, Manifest};
use crate::store::{Store, StoreError};

const MANIFEST_MAGIC: &[u8; 8] = b"STRATAMF";
const LEASE_MAGIC: &[u8; 8] = b"STRATALS";
const VERSION: u32 = 1;

/// Errors reading manifests and leases.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The object is damaged or not what it should be.
    #[error("{key} is corrupt: {reason}")]
    Corrupt {
        /// The object.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// Key of a snapshot's manifest.
pub fn manifest_key(snapshot_id: &str) -> String {
    format!("snapshots/{snapshot_id}.manifest")
}

/// Where tombstones of deleted snapshots live (see [`crate::snapshot::gc`]).
pub const TOMBSTONE_PREFIX: &str = "deleted/";

/// Key of a deleted snapshot's tombstone: a copy of its manifest.
pub fn tombstone_key(snapshot_id: &str) -> String {
    format!("{TOMBSTONE_PREFIX}{snapshot_id}.manifest")
}

/// Key of a lease.
pub fn lease_key(id: &str) -> String {
    format!("leases/{id}")
}

fn seal(magic: &[u8; 8], body: Vec<u8>) -> Bytes {
    let mut out = Vec::with_capacity(24 + body.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    Bytes::from(out)
}

fn open_envelope<'a>(magic: &[u8; 8], key: &str, data: &'a [u8]) -> Result<&'a [u8], ManifestError> {
    let corrupt = |reason: &str| ManifestError::Corrupt {
        key: key.to_owned(),
        reason: reason.to_owned(),
    };
    if data.len() < 24 || &data[..8] != magic {
        return Err(corrupt("bad magic"));
    }
    let version = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(corrupt(&format!("unsupported version {version}")));
    }
    let crc = u32::from_le_bytes(data[12..16].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(data[16..24].try_into().expect("8 bytes")) as usize;
    let body = &data[24..];
    if body.len() != len {
        return Err(corrupt("truncated"));
    }
    if crc32fast::hash(body) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(body)
}

/// Encodes a manifest.
pub fn encode_manifest(m: &Manifest) -> Bytes {
    seal(MANIFEST_MAGIC, m.encode_to_vec())
}

/// Decodes a manifest read from `key`.
pub fn decode_manifest(key: &str, data: &[u8]) -> Result<Manifest, ManifestError> {
    let body = open_envelope(MANIFEST_MAGIC, key, data)?;
    Manifest::decode(body).map_err(|e| ManifestError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// Reads a committed manifest; `Ok(None)` when the snapshot does not exist.
pub async fn read_manifest(store: &Store, snapshot_id: &str) -> Result<Option<Manifest>, ManifestError> {
    let key = manifest_key(snapshot_id);
    match store.get(&key).await {
        Ok(data) => decode_manifest(&key, &data).map(Some),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Commits a snapshot by writing its manifest.
pub async fn write_manifest(store: &Store, m: &Manifest) -> Result<(), StoreError> {
    store.put(&manifest_key(&m.snapshot_id), encode_manifest(m)).await
}

/// Deletes a snapshot: its tombstone (a copy of the manifest) first, then the manifest. The
/// tombstone keeps the chunks for one grace period, for uploads and restores that checked the
/// snapshot live just before (see [`crate::snapshot::gc`]). OK when the snapshot does not exist.
pub async fn delete_snapshot(store: &Store, snapshot_id: &str) -> Result<(), ManifestError> {
    let key = manifest_key(snapshot_id);
    let data = match store.get(&key).await {
        Ok(d) => d,
        Err(StoreError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    // A damaged manifest still goes; its tombstone is only written when it can be read back.
    if decode_manifest(&key, &data).is_ok() {
        store.put(&tombstone_key(snapshot_id), data).await?;
    }
    store.delete(&key).await?;
    Ok(())
}

/// Whether a snapshot is live: no tombstone, then its manifest exists (in that order: a delete
/// writes the tombstone first, so a snapshot seen live here was deleted, if at all, after this
/// call began). Uploads and restores call it after writing their lease.
pub async fn snapshot_live(store: &Store, snapshot_id: &str) -> Result<bool, StoreError> {
    if store.exists(&tombstone_key(snapshot_id)).await? {
        return Ok(false);
    }
    store.exists(&manifest_key(snapshot_id)).await
}

/// Ids of all committed snapshots, sorted.
pub async fn list_snapshot_ids(store: &Store) -> Result<Vec<String>, StoreError> {
    Ok(store
        .list("snapshots/")
        .await?
        .into_iter()
        .filter_map(|o| {
            o.key
                .strip_prefix("snapshots/")?
                .strip_suffix(".manifest")
                .map(str::to_owned)
        })
        .collect())
}

/// Writes a lease named `lease_id` over every chunk of `m`: what a restore (eager or lazy) needs
/// kept until it is done.
pub async fn lease_chunks_of(store: &Store, m: &Manifest, lease_id: &str) -> Result<(), StoreError> {
    let lease = Lease {
        id: lease_id.to_owned(),
        snapshot_id: m.snapshot_id.clone(),
        hashes: m.chunks.iter().map(|c| c.hash.clone()).collect(),
        created_unix_ms: crate::snapshot::upload::now_ms(),
    };
    write_lease(store, &lease).await
}

/// Writes a lease.
pub async fn write_lease(store: &Store, lease: &Lease) -> Result<(), StoreError> {
    store
        .put(&lease_key(&lease.id), seal(LEASE_MAGIC, lease.encode_to_vec()))
        .await
}

/// Decodes a lease read from `key`.
pub fn decode_lease(key: &str, data: &[u8]) -> Result<Lease, ManifestError> {
    let body = open_envelope(LEASE_MAGIC, key, data)?;
    Lease::decode(body).map_err(|e| ManifestError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::store::ChunkRef;

    #[test]
    fn manifest_round_trip_and_damage() {
        let m = Manifest {
            snapshot_id: "snap-1".into(),
            volume_id: "vol-1".into(),
            size_bytes: 1 << 30,
            chunk_size: 4 << 20,
            chunks: vec![ChunkRef {
                index: 3,
                hash: vec![7; 32],
                stored_size: 100,
            }],
            ..Default::default()
        };
        let data = encode_manifest(&m);
        assert_eq!(decode_manifest("k", &data).unwrap(), m);
        let mut bad = data.to_vec();
        let n = bad.len();
        bad[n - 2] ^= 1;
        assert!(decode_manifest("k", &bad).is_err());
        assert!(decode_manifest("k", &data[..data.len() - 1]).is_err());
        assert!(decode_lease("k", &data).is_err(), "a manifest passed as a lease");
    }
}
