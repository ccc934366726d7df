//! Object stores: where chunks, manifests and leases live.
//!
//! One store is an S3 bucket + prefix ([`s3`]) or a local directory ([`local`], the embedded
//! default). Callers see [`ObjectStore`] behind an `Arc`; [`retry::Retrying`] wraps every store
//! so transient failures are retried with backoff in one place, [`unreliable`] injects faults
//! for tests and [`pausable`] orders concurrent callers' calls (and skews the store's clock).
//!
//! Keys (relative to the store's prefix):
//!
//! ```text
//! chunks/<aa>/<bb>/<blake3-hex>   immutable chunk objects (see snapshot::chunk)
//! snapshots/<snap-id>.manifest    the commit point of a snapshot (see snapshot::manifest)
//! leases/<id>                     chunks an upload or restore in progress relies on (see snapshot::gc)
//! deleted/<snap-id>.manifest      tombstone of a deleted snapshot, kept for the GC grace
//! gc/clock-<uuid>                 a collector's marker, written to read the store's clock
//! ```

pub mod local;
pub mod pausable;
pub mod retry;
pub mod s3;
pub mod unreliable;

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

/// Errors of store operations.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// No object at the key.
    #[error("object {key} not found")]
    NotFound {
        /// The key.
        key: String,
    },
    /// Worth retrying: 5xx, throttling, timeouts, dropped connections.
    #[error("store unavailable: {message}")]
    Transient {
        /// What happened.
        message: String,
    },
    /// Will not succeed by retrying: bad credentials, missing bucket, malformed key.
    #[error("store error: {message}")]
    Permanent {
        /// What happened.
        message: String,
    },
}

impl StoreError {
    /// True when retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, StoreError::Transient { .. })
    }
}

/// An object as listed.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    /// Key relative to the store prefix.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, by the store's clock.
    pub modified: SystemTime,
}

/// What the snapshot engine needs from a store.
#[tonic::async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Writes an object whole (atomically: readers see the old object or the new one).
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError>;
    /// Reads an object whole.
    async fn get(&self, key: &str) -> Result<Bytes, StoreError>;
    /// Whether an object exists.
    async fn exists(&self, key: &str) -> Result<bool, StoreError>;
    /// Deletes an object; OK when it does not exist.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Every object whose key starts with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError>;
}

/// A shared store.
pub type Store = Arc<dyn ObjectStore>;

/// Checks a key: relative, no empty, `.` or `..` components.
pub fn check_key(key: &str) -> Result<(), StoreError> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key.contains('\0')
        || key.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(StoreError::Permanent {
            message: format!("invalid object key {key:?}"),
        });
    }
    Ok(())
}

/// Opens a store from its URL, wrapped with retries:
///
/// * `/path` or `local:///path`: a local directory;
/// * `s3://bucket/prefix?endpoint=http://host:port&region=us-east-1&path_style=true`: S3 (credentials
///   from the standard AWS environment variables, profile files or web identity).
pub async fn open(url: &str) -> Result<Store, StoreError> {
    open_counting(url, Arc::default()).await
}

/// [`open`], counting the store's retries in `retries` (the process's metric).
pub async fn open_counting(
    url: &str,
    retries: Arc<std::sync::atomic::AtomicU64>,
) -> Result<Store, StoreError> {
    let inner: Store = if let Some(rest) = url.strip_prefix("s3://") {
        Arc::new(s3::S3Store::from_url(rest).await?)
    } else {
        let path = url.strip_prefix("local://").unwrap_or(url);
        if !path.starts_with('/') {
            return Err(StoreError::Permanent {
                message: format!("store {url:?}: use an absolute directory path or s3://bucket/prefix"),
            });
        }
        Arc::new(local::LocalStore::open(std::path::Path::new(path))?)
    };
    // Faults for the multi-process tests, below the retries as a real store's would be.
    let inner: Store = match std::env::var_os(unreliable::FAULTS_ENV) {
        Some(file) if !file.is_empty() => {
            tracing::warn!(file = ?file, "injecting store faults from a test rule file");
            Arc::new(unreliable::Unreliable::new(inner, 0).with_fault_file(file.into()))
        }
        _ => inner,
    };
    Ok(Arc::new(retry::Retrying::new(inner).counting(retries)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        for bad in ["", "/abs", "a//b", "a/../b", "./a", "a/."] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        assert!(check_key("chunks/ab/cd/abcdef").is_ok());
    }
}
