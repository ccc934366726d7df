//! One operation at a time per volume. A call that finds another call on the same volume gets
//! ABORTED, as the CSI spec asks, instead of racing it; the message names the operation that holds
//! the volume and for how long. A CO repeats an ABORTED call, so ABORTED is only answered while a
//! conflicting *call* runs: a call that finds the volume held by the node's own background work
//! (retiring a finished hydration, which takes seconds) waits for it, within a bound, instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a call waits for background work to release a volume before it answers ABORTED
/// (well under the controller's timeout for agent calls).
pub const BACKGROUND_WAIT: Duration = Duration::from_secs(30);

/// Keys (volume ids, names) with an operation in flight.
#[derive(Debug, Clone)]
pub struct OpGuard {
    inner: Arc<Inner>,
    /// [`BACKGROUND_WAIT`], shorter in tests.
    background_wait: Duration,
}

impl Default for OpGuard {
    fn default() -> Self {
        Self::with_background_wait(BACKGROUND_WAIT)
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Held only for a lookup, insert or remove, never across an await.
    busy: Mutex<HashMap<String, Holder>>,
    /// Woken whenever a key is released, for calls waiting on background work.
    released: tokio::sync::Notify,
}

/// Who holds a key.
#[derive(Debug, Clone)]
struct Holder {
    /// The operation, for the ABORTED message ("CreateSnapshot", "retire hydration").
    op: String,
    /// Since when, for the message.
    since: Instant,
    /// Background work of the node, not a call: callers wait for it instead of failing.
    background: bool,
}

/// Proof that an operation owns a key; dropping it releases the key.
#[derive(Debug)]
pub struct OpTicket {
    inner: Arc<Inner>,
    key: String,
}

impl OpGuard {
    /// A guard whose calls wait at most `wait` for background work.
    pub fn with_background_wait(wait: Duration) -> Self {
        Self {
            inner: Arc::default(),
            background_wait: wait,
        }
    }

    /// Takes `key` for the call `op`. ABORTED, naming the holder, while another call holds the
    /// key; while background work holds it, waits up to [`BACKGROUND_WAIT`] for it first.
    pub async fn acquire(&self, key: &str, op: &str) -> Result<OpTicket, tonic::Status> {
        let deadline = tokio::time::Instant::now() + self.background_wait;
        loop {
            // Registered before the check, so a release in between is not missed.
            let released = self.inner.released.notified();
            let holder = match self.try_take(key, op, false) {
                Ok(t) => return Ok(t),
                Err(h) => h,
            };
            if !holder.background || tokio::time::Instant::now() >= deadline {
                return Err(tonic::Status::aborted(format!(
                    "{key} is busy: {} has been running on it for {:.1} s; retry",
                    holder.op,
                    holder.since.elapsed().as_secs_f64()
                )));
            }
            let _ = tokio::time::timeout_at(deadline, released).await;
        }
    }

    /// Takes `key` for background work `op` if nothing holds it (background work skips a busy
    /// volume and comes back later).
    pub fn try_background(&self, key: &str, op: &str) -> Option<OpTicket> {
        self.try_take(key, op, true).ok()
    }

    fn try_take(&self, key: &str, op: &str, background: bool) -> Result<OpTicket, Holder> {
        let mut busy = self.inner.busy.lock().expect("op guard poisoned");
        if let Some(h) = busy.get(key) {
            return Err(h.clone());
        }
        busy.insert(
            key.to_owned(),
            Holder {
                op: op.to_owned(),
                since: Instant::now(),
                background,
            },
        );
        Ok(OpTicket {
            inner: self.inner.clone(),
            key: key.to_owned(),
        })
    }
}

impl Drop for OpTicket {
    fn drop(&mut self) {
        self.inner
            .busy
            .lock()
            .expect("op guard poisoned")
            .remove(&self.key);
        self.inner.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_call_is_aborted_naming_the_first_until_release() {
        let g = OpGuard::default();
        let t = g.acquire("vol-1", "CreateSnapshot").await.unwrap();
        let e = g.acquire("vol-1", "NodeStageVolume").await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Aborted);
        assert!(
            e.message()
                .starts_with("vol-1 is busy: CreateSnapshot has been running"),
            "{}",
            e.message()
        );
        assert!(g.acquire("vol-2", "x").await.is_ok());
        assert!(g.try_background("vol-1", "retire hydration").is_none());
        drop(t);
        assert!(g.acquire("vol-1", "x").await.is_ok());
    }

    #[tokio::test]
    async fn a_call_waits_for_background_work_instead_of_failing() {
        let g = OpGuard::default();
        let bg = g.try_background("vol-1", "retire hydration").unwrap();
        let releaser = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(bg);
        });
        let started = Instant::now();
        let t = g.acquire("vol-1", "CreateSnapshot").await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(150));
        releaser.await.unwrap();
        // And a call holding it makes the next call fail at once, background or not.
        let e = g.acquire("vol-1", "DeleteVolume").await.unwrap_err();
        assert!(e.message().contains("CreateSnapshot"), "{}", e.message());
        drop(t);
    }

    #[tokio::test]
    async fn background_work_that_never_ends_gives_aborted_after_the_bound() {
        let g = OpGuard::with_background_wait(Duration::from_millis(100));
        let _bg = g.try_background("vol-1", "retire hydration").unwrap();
        let e = g.acquire("vol-1", "CreateSnapshot").await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Aborted);
        assert!(e.message().contains("retire hydration"), "{}", e.message());
    }
}
