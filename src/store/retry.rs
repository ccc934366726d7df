//! Retries with exponential backoff and jitter, decided by [`StoreError::is_permanent`]. Every
//! store is wrapped in [`Retrying`], so no caller retries on its own.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{ObjectMeta, ObjectStore, Store, StoreError};

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// Delay before the first retry; doubled each time.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            attempts: 8,
            base: Duration::from_millis(50),
            max: Duration::from_secs(5),
        }
    }
}

/// Runs `op` until it succeeds, fails permanently, or the attempts run out, counting each retry
/// in `retries`.
pub async fn retry<T, F, Fut>(
    policy: Policy,
    retries: &AtomicU64,
    what: &str,
    mut op: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut delay = policy.base;
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_permanent() || attempt >= policy.attempts => return Err(e),
            Err(e) => {
                retries.fetch_add(1, Ordering::Relaxed);
                // Jitter from the clock's nanoseconds: enough to spread synchronized retries.
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                let jitter = Duration::from_nanos(u64::from(nanos) % (delay.as_nanos() as u64 / 2 + 1));
                tracing::debug!(%what, attempt, error = %e, "transient store error, retrying");
                tokio::time::sleep(delay + jitter).await;
                delay = (delay * 2).min(policy.max);
                attempt += 1;
            }
        }
    }
}

/// A store whose every operation is retried.
#[derive(Debug)]
pub struct Retrying {
    inner: Store,
    policy: Policy,
    /// Retries made through this store, and only this one (the process's metric shares it; two
    /// stores, or two tests in one process, never count each other's retries).
    retries: Arc<AtomicU64>,
}

impl Retrying {
    /// Wraps `inner` with the default policy.
    pub fn new(inner: Store) -> Self {
        Self::with_policy(inner, Policy::default())
    }

    /// Wraps `inner` with `policy`.
    pub fn with_policy(inner: Store, policy: Policy) -> Self {
        Self {
            inner,
            policy,
            retries: Arc::default(),
        }
    }

    /// Counts this store's retries in `retries` (a counter the caller exports or inspects).
    pub fn counting(mut self, retries: Arc<AtomicU64>) -> Self {
        self.retries = retries;
        self
    }

    /// Retries made through this store so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
}

#[tonic::async_trait]
impl ObjectStore for Retrying {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        retry(self.policy, &self.retries, key, || {
            self.inner.put(key, data.clone())
        })
        .await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        retry(self.policy, &self.retries, key, || self.inner.get(key)).await
    }
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        retry(self.policy, &self.retries, key, || self.inner.exists(key)).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        retry(self.policy, &self.retries, key, || self.inner.delete(key)).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        retry(self.policy, &self.retries, prefix, || self.inner.list(prefix)).await
    }
}
