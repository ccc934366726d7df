//! A store that holds every call until a test lets it through, for driving concurrent actors
//! (a GC, an upload, a restore, a delete) through chosen or all interleavings of their store
//! calls; and whose clock can run behind the caller's, as a remote store's may.
//!
//! Each actor gets its own [`Pausable`] over the same inner store and the same [`Scheduler`].
//! A call announces itself and waits; the test waits until every actor is either waiting at a
//! call or finished ([`Scheduler::quiescent`]), picks one, lets exactly that call run
//! ([`Scheduler::grant`]), and repeats. Actors must make one store call at a time (uploads and
//! restores with a concurrency of 1) for the order to be theirs alone.
//!
//! A filter can let some calls run without waiting: calls that commute with every call of the
//! other actors (reads of keys nobody else writes, writes of keys nobody else reads) need not be
//! interleaved, which keeps "every ordering" small enough to run them all.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{oneshot, watch};

use super::{ObjectMeta, ObjectStore, Store, StoreError};

#[derive(Debug)]
enum State {
    /// Between calls (computing, or not started).
    Running,
    /// At a call, until granted.
    Waiting {
        /// What it is about to do, for traces.
        op: String,
        go: oneshot::Sender<()>,
    },
    Finished,
}

/// A kind of store call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `put`.
    Put,
    /// `get`.
    Get,
    /// `exists`.
    Exists,
    /// `delete`.
    Delete,
    /// `list` (the key is the prefix).
    List,
}

/// Which calls wait for their turn: `true` waits, `false` runs at once.
pub type Filter = Arc<dyn Fn(Call, &str) -> bool + Send + Sync>;

/// Orders the calls of several actors.
#[derive(Debug)]
pub struct Scheduler {
    actors: Mutex<BTreeMap<String, State>>,
    /// Bumped on every state change; the driver waits on it.
    changed: watch::Sender<u64>,
}

impl Default for Scheduler {
    fn default() -> Self {
        Self {
            actors: Mutex::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl Scheduler {
    /// A scheduler with no actors.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    fn set(&self, actor: &str, s: State) {
        self.actors.lock().expect("actors").insert(actor.to_owned(), s);
        self.bump();
    }

    /// Registers `actor` (running) and returns its view of `inner`, with the store's clock
    /// `clock_behind` the caller's; only calls `filter` accepts wait (all without one).
    pub fn store(
        self: &Arc<Self>,
        inner: Store,
        actor: &str,
        clock_behind: Duration,
        filter: Option<Filter>,
    ) -> Store {
        self.set(actor, State::Running);
        Arc::new(Pausable {
            inner,
            actor: actor.to_owned(),
            sched: self.clone(),
            clock_behind,
            filter,
        })
    }

    /// Marks `actor` done: it makes no more calls.
    pub fn finish(&self, actor: &str) {
        self.set(actor, State::Finished);
    }

    /// Waits until no actor is between calls; returns the waiting ones and what each is about to
    /// do, by actor name. Empty when all are finished. Panics after `timeout` (an actor blocked
    /// elsewhere).
    pub async fn quiescent(&self, timeout: Duration) -> Vec<(String, String)> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let _ = rx.borrow_and_update();
            {
                let actors = self.actors.lock().expect("actors");
                if !actors.values().any(|s| matches!(s, State::Running)) {
                    return actors
                        .iter()
                        .filter_map(|(a, s)| match s {
                            State::Waiting { op, .. } => Some((a.clone(), op.clone())),
                            _ => None,
                        })
                        .collect();
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                panic!("actors never settled: {:?}", self.actors.lock().expect("actors"));
            }
        }
    }

    /// Lets the call `actor` waits at run. Panics when it is not waiting.
    pub fn grant(&self, actor: &str) {
        let mut actors = self.actors.lock().expect("actors");
        let s = actors.insert(actor.to_owned(), State::Running);
        drop(actors);
        match s {
            Some(State::Waiting { go, .. }) => {
                // The actor may have been dropped (a test that gave up on it): nothing to run.
                let _ = go.send(());
            }
            other => panic!("{actor} is not waiting at a call: {other:?}"),
        }
        self.bump();
    }

    async fn gate(&self, actor: &str, op: String) {
        let (go, rx) = oneshot::channel();
        self.set(actor, State::Waiting { op, go });
        // A dropped scheduler side means the test is over: run freely.
        let _ = rx.await;
    }
}

/// One actor's view of a store: every call waits for its turn (see [`Scheduler`]).
pub struct Pausable {
    inner: Store,
    actor: String,
    sched: Arc<Scheduler>,
    /// How far the store's clock is behind the caller's: listed modification times are shifted
    /// by it, then truncated to whole seconds as S3's `LastModified` is.
    clock_behind: Duration,
    /// Calls that wait; `None`: all.
    filter: Option<Filter>,
}

impl std::fmt::Debug for Pausable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pausable")
            .field("inner", &self.inner)
            .field("actor", &self.actor)
            .field("clock_behind", &self.clock_behind)
            .finish_non_exhaustive()
    }
}

impl Pausable {
    async fn turn(&self, call: Call, key: &str) {
        if self.filter.as_ref().is_none_or(|f| f(call, key)) {
            let op = format!("{} {key}", format!("{call:?}").to_lowercase());
            self.sched.gate(&self.actor, op).await;
        }
    }
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

#[tonic::async_trait]
impl ObjectStore for Pausable {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.turn(Call::Put, key).await;
        self.inner.put(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.turn(Call::Get, key).await;
        self.inner.get(key).await
    }
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.turn(Call::Exists, key).await;
        self.inner.exists(key).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.turn(Call::Delete, key).await;
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.turn(Call::List, prefix).await;
        let mut out = self.inner.list(prefix).await?;
        for o in &mut out {
            o.modified = whole_seconds(o.modified.checked_sub(self.clock_behind).unwrap_or(UNIX_EPOCH));
        }
        Ok(out)
    }
}
