//! A fault-injecting store for tests: fails a share of operations transiently, or some keys
//! permanently, and counts what reaches the inner store.
//!
//! Tests that run the real binaries (the multi-process test bed) switch faults in another
//! process through a file named by [`FAULTS_ENV`]: [`crate::store::open`] then puts an
//! [`Unreliable`] under the retries, which reads the file at every operation. One rule a line,
//! `transient <key prefix>` or `permanent <key prefix>`; a missing or empty file injects nothing.
//! Unset (always, outside tests), nothing is wrapped.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

use super::{ObjectMeta, ObjectStore, Store, StoreError};

/// Environment variable naming a fault rule file (tests only; see the module docs).
pub const FAULTS_ENV: &str = "STRATA_TEST_STORE_FAULTS";

/// Injects faults in front of another store.
#[derive(Debug)]
pub struct Unreliable {
    inner: Store,
    /// Every `fail_every`-th operation fails transiently before reaching the inner store (0: never).
    fail_every: u64,
    /// Keys starting with one of these fail permanently.
    poisoned: Mutex<Vec<String>>,
    ops: AtomicU64,
    /// Rules read at every operation (see the module docs).
    fault_file: Option<PathBuf>,
    /// Operations that reached the inner store, by kind.
    pub gets: AtomicU64,
    /// PUTs that reached the inner store.
    pub puts: AtomicU64,
    /// Injected failures.
    pub injected: AtomicU64,
}

impl Unreliable {
    /// Wraps `inner`.
    pub fn new(inner: Store, fail_every: u64) -> Self {
        Self {
            inner,
            fail_every,
            poisoned: Mutex::default(),
            ops: AtomicU64::new(0),
            fault_file: None,
            gets: AtomicU64::new(0),
            puts: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }

    /// Also injects the faults the rules in `path` name, read at every operation.
    pub fn with_fault_file(mut self, path: PathBuf) -> Self {
        self.fault_file = Some(path);
        self
    }

    /// The fault the rule file asks for `key`, if any.
    fn file_fault(&self, key: &str) -> Option<StoreError> {
        let text = std::fs::read_to_string(self.fault_file.as_ref()?).ok()?;
        text.lines().find_map(|l| {
            let (kind, prefix) = l.trim().split_once(' ')?;
            if !key.starts_with(prefix.trim()) {
                return None;
            }
            match kind {
                "transient" => Some(StoreError::Transient {
                    message: format!("injected transient failure for {key}"),
                }),
                "permanent" => Some(StoreError::Permanent {
                    message: format!("injected permanent failure for {key}"),
                }),
                _ => None,
            }
        })
    }

    /// Makes every key starting with `prefix` fail permanently.
    pub fn poison(&self, prefix: &str) {
        self.poisoned.lock().expect("poison list").push(prefix.to_owned());
    }

    fn gate(&self, key: &str) -> Result<(), StoreError> {
        if let Some(e) = self.file_fault(key) {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        if self
            .poisoned
            .lock()
            .expect("poison list")
            .iter()
            .any(|p| key.starts_with(p.as_str()))
        {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Permanent {
                message: format!("injected permanent failure for {key}"),
            });
        }
        let n = self.ops.fetch_add(1, Ordering::Relaxed) + 1;
        if self.fail_every > 0 && n % self.fail_every == 0 {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Transient {
                message: format!("injected 503 for {key}"),
            });
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl ObjectStore for Unreliable {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.gate(key)?;
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.inner.put(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.gate(key)?;
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.inner.get(key).await
    }
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.gate(key)?;
        self.inner.exists(key).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.gate(key)?;
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.gate(prefix)?;
        self.inner.list(prefix).await
    }
}
