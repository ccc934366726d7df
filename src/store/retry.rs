//! Retries with exponential backoff and jitter, decided by [`StoreError::is_permanent`]. Every
//! store is wrapped in [`Retrying`], so no caller retries on its own.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Retries performed by all stores of this process (exported as a metric).
pub static RETRIES: AtomicU64 = AtomicU64::new(0);

/// Runs `op` until it succeeds, fails permanently, or the attempts run out.
pub async fn retry<T, F, Fut>(policy: Policy, what: &str, mut op: F) -> Result<T, StoreError>
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
                RETRIES.fetch_add(1, Ordering::Relaxed);
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
}

impl Retrying {
    /// Wraps `inner` with the default policy.
    pub fn new(inner: Store) -> Self {
        Self {
            inner,
            policy: Policy::default(),
        }
    }

    /// Wraps `inner` with `policy`.
    pub fn with_policy(inner: Store, policy: Policy) -> Self {
        Self { inner, policy }
    }
}

#[tonic::async_trait]
impl ObjectStore for Retrying {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        retry(self.policy, key, || self.inner.put(key, data.clone())).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        retry(self.policy, key, || self.inner.get(key)).await
    }
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        retry(self.policy, key, || self.inner.exists(key)).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        retry(self.policy, key, || self.inner.delete(key)).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        retry(self.policy, prefix, || self.inner.list(prefix)).await
    }
}
