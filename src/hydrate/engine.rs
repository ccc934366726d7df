//! The hydration engine: chunk states, fetches (one per chunk at a time), the background queue and
//! the sync rules described in the module above.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use futures::stream::{self, StreamExt};
use tokio::sync::OnceCell;

use super::state::{ABSENT, FETCHED, WRITTEN};
use super::{HydrateStatus, Paths};
use crate::proto::store::Manifest;
use crate::snapshot::chunk::{self, ChunkError, Hash};
use crate::store::{Store, StoreError};

/// Why a chunk could not be made local.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The store failed (after its retries); worth retrying later.
    #[error("store: {0}")]
    Store(String),
    /// The chunk is missing or does not match its hash: the snapshot cannot be restored.
    #[error("{0}")]
    Permanent(String),
    /// Writing the local file failed.
    #[error("local file: {0}")]
    Io(String),
}

impl From<std::io::Error> for FetchError {
    fn from(e: std::io::Error) -> Self {
        FetchError::Io(e.to_string())
    }
}

impl FetchError {
    /// Whether retrying cannot help.
    pub fn permanent(&self) -> bool {
        matches!(self, FetchError::Permanent(_))
    }
}

type Inflight = Arc<OnceCell<Result<(), FetchError>>>;

/// One volume's hydration.
pub struct Engine {
    paths: Paths,
    data: File,
    map: File,
    states: Vec<AtomicU8>,
    hashes: HashMap<u64, Hash>,
    /// Opens the snapshot's chunks (sealed when its lineage is encrypted).
    codec: crate::snapshot::crypto::ChunkCodec,
    chunk_size: u64,
    snapshot_size: u64,
    store: Store,
    inflight: Mutex<HashMap<u64, Inflight>>,
    /// Chunks fetched since the data file was last synced.
    unsynced: Mutex<HashSet<u64>>,
    sync_lock: Mutex<()>,
    /// Where the background queue goes on (after the last on-demand fetch), or `u64::MAX`.
    hint: AtomicU64,
    local: AtomicU64,
    fetched_background: AtomicU64,
    fetched_on_demand: AtomicU64,
    bytes_fetched: AtomicU64,
    refetched_after_crash: AtomicU64,
    last_error: Mutex<Option<FetchError>>,
    complete: AtomicBool,
    /// Background bytes per second (0: unlimited), and when the next background fetch may start.
    bandwidth: AtomicU64,
    next_slot: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    /// Background fetches running, and when the last on-demand fetch started: while reads are
    /// waiting for chunks, the background queue steps back so they get the bandwidth.
    background_running: AtomicU64,
    last_demand: Mutex<std::time::Instant>,
}

/// Background fetches allowed while on-demand fetches are recent.
const BACKGROUND_WHILE_DEMAND: u64 = 2;
/// How long an on-demand fetch keeps the background queue narrow.
const DEMAND_WINDOW: std::time::Duration = std::time::Duration::from_millis(250);

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("dir", &self.paths.dir).finish()
    }
}

/// Initial `hydrate.map` for a manifest: zero chunks are local already, the rest absent.
pub fn initial_map(m: &Manifest) -> Vec<u8> {
    let n = m.size_bytes.div_ceil(u64::from(m.chunk_size.max(1))) as usize;
    let mut map = vec![FETCHED; n];
    for c in &m.chunks {
        if let Some(b) = map.get_mut(c.index as usize) {
            *b = ABSENT;
        }
    }
    map
}

impl Engine {
    /// Opens a volume's hydration state. With `verify_fetched` (after a power loss), every
    /// "fetched" chunk is read back and checked against its hash; mismatches become absent.
    pub fn open(
        paths: Paths,
        m: &Manifest,
        codec: crate::snapshot::crypto::ChunkCodec,
        store: Store,
        verify_fetched: bool,
    ) -> std::io::Result<Self> {
        let data = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(paths.data())?;
        let map = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(paths.map())?;
        let bytes = std::fs::read(paths.map())?;
        let expected = initial_map(m);
        if bytes.len() != expected.len() {
            return Err(std::io::Error::other(format!(
                "{} holds {} chunk states, the snapshot has {} chunks",
                paths.map().display(),
                bytes.len(),
                expected.len()
            )));
        }
        let mut hashes = HashMap::with_capacity(m.chunks.len());
        for c in &m.chunks {
            let h: Hash = c.hash.as_slice().try_into().map_err(|_| {
                std::io::Error::other(format!("manifest holds a malformed hash for chunk {}", c.index))
            })?;
            hashes.insert(c.index, h);
        }
        let engine = Self {
            states: bytes.iter().map(|b| AtomicU8::new(*b)).collect(),
            data,
            map,
            hashes,
            codec,
            chunk_size: u64::from(m.chunk_size),
            snapshot_size: m.size_bytes,
            store,
            paths,
            inflight: Mutex::default(),
            unsynced: Mutex::default(),
            sync_lock: Mutex::new(()),
            hint: AtomicU64::new(u64::MAX),
            local: AtomicU64::new(0),
            fetched_background: AtomicU64::new(0),
            fetched_on_demand: AtomicU64::new(0),
            bytes_fetched: AtomicU64::new(0),
            refetched_after_crash: AtomicU64::new(0),
            last_error: Mutex::new(None),
            complete: AtomicBool::new(false),
            bandwidth: AtomicU64::new(0),
            next_slot: tokio::sync::Mutex::new(None),
            background_running: AtomicU64::new(0),
            // A volume just created is about to be read (filesystem mount, partition scan): the
            // background queue starts narrow so those first reads find the bandwidth free.
            last_demand: Mutex::new(std::time::Instant::now()),
        };
        if verify_fetched {
            engine.verify_fetched()?;
        }
        let local = engine
            .states
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) != ABSENT)
            .count();
        engine.local.store(local as u64, Ordering::Relaxed);
        Ok(engine)
    }

    fn verify_fetched(&self) -> std::io::Result<()> {
        let mut buf = vec![0u8; self.chunk_size as usize];
        let mut bad = 0u64;
        for (&index, h) in &self.hashes {
            if self.states[index as usize].load(Ordering::Relaxed) != FETCHED {
                continue;
            }
            let (off, len) = self.extent(index);
            let b = &mut buf[..len];
            self.data.read_exact_at(b, off)?;
            if self.codec.name(b) != *h {
                self.set_state(index, ABSENT)?;
                bad += 1;
            }
        }
        if bad > 0 {
            tracing::warn!(
                chunks = bad,
                "chunks lost in a power failure will be fetched again"
            );
            self.map.sync_data()?;
        }
        self.refetched_after_crash.store(bad, Ordering::Relaxed);
        Ok(())
    }

    /// Caps background fetches at `bytes_per_second` (0: no cap).
    pub fn limit_bandwidth(&self, bytes_per_second: u64) {
        self.bandwidth.store(bytes_per_second, Ordering::Relaxed);
    }

    /// Waits for the background share of the bandwidth a chunk needs.
    async fn pace(&self) {
        let rate = self.bandwidth.load(Ordering::Relaxed);
        if rate == 0 {
            return;
        }
        let cost = std::time::Duration::from_secs_f64(self.chunk_size as f64 / rate as f64);
        let start = {
            let mut next = self.next_slot.lock().await;
            let now = tokio::time::Instant::now();
            let start = next.map_or(now, |n| n.max(now));
            *next = Some(start + cost);
            start
        };
        tokio::time::sleep_until(start).await;
    }

    /// Stamped when an on-demand fetch starts and again when its data arrives, so the narrow
    /// window covers the whole fetch however long the store takes.
    fn note_demand(&self) {
        *self.last_demand.lock().expect("demand") = std::time::Instant::now();
    }

    /// Waits while on-demand fetches are recent and the background already has its narrow share.
    async fn yield_to_demand(&self) {
        loop {
            let recent = self.last_demand.lock().expect("demand").elapsed() < DEMAND_WINDOW;
            if !recent || self.background_running.load(Ordering::Relaxed) < BACKGROUND_WHILE_DEMAND {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// Number of chunks in the snapshot's range.
    pub fn total(&self) -> u64 {
        self.states.len() as u64
    }

    /// Offset and length of chunk `index` within the snapshot.
    fn extent(&self, index: u64) -> (u64, usize) {
        let off = index * self.chunk_size;
        (off, self.chunk_size.min(self.snapshot_size - off) as usize)
    }

    fn state(&self, index: u64) -> u8 {
        self.states
            .get(index as usize)
            .map_or(WRITTEN, |s| s.load(Ordering::Acquire))
    }

    fn set_state(&self, index: u64, s: u8) -> std::io::Result<()> {
        self.map.write_all_at(&[s], index)?;
        self.states[index as usize].store(s, Ordering::Release);
        Ok(())
    }

    /// Chunks overlapping `[offset, offset+len)` that lie within the snapshot.
    pub fn chunks_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 || offset >= self.snapshot_size {
            return 0..0;
        }
        let end = (offset + len).min(self.snapshot_size);
        offset / self.chunk_size..end.div_ceil(self.chunk_size)
    }

    /// Makes chunk `index` local, fetching it if needed. Concurrent callers share one fetch.
    pub async fn ensure(&self, index: u64, on_demand: bool) -> Result<(), FetchError> {
        if self.state(index) != ABSENT {
            return Ok(());
        }
        if on_demand {
            self.hint.store(index + 1, Ordering::Relaxed);
        }
        let cell = self
            .inflight
            .lock()
            .expect("inflight")
            .entry(index)
            .or_default()
            .clone();
        let r = cell.get_or_init(|| self.fetch(index, on_demand)).await.clone();
        let mut inflight = self.inflight.lock().expect("inflight");
        if inflight.get(&index).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            inflight.remove(&index);
        }
        r
    }

    async fn fetch(&self, index: u64, on_demand: bool) -> Result<(), FetchError> {
        // Another fetch may have finished between the caller's check and getting the cell.
        if self.state(index) != ABSENT {
            return Ok(());
        }
        if on_demand {
            self.note_demand();
        }
        let h = *self
            .hashes
            .get(&index)
            .ok_or_else(|| FetchError::Io(format!("chunk {index} is absent but not in the manifest")))?;
        let obj = match self.store.get(&chunk::key(&h)).await {
            Ok(o) => o,
            Err(StoreError::NotFound { .. }) => {
                return Err(FetchError::Permanent(format!(
                    "chunk {} (index {index}) is missing from the store",
                    chunk::hex(&h)
                )))
            }
            Err(e) if e.is_permanent() => return Err(FetchError::Permanent(e.to_string())),
            Err(e) => return Err(FetchError::Store(e.to_string())),
        };
        let fetched = obj.len() as u64;
        if on_demand {
            self.note_demand();
        }
        let (off, len) = self.extent(index);
        let codec = self.codec.clone();
        let raw = tokio::task::spawn_blocking(move || codec.decode(&h, &obj))
            .await
            .expect("decode task panicked")
            .map_err(|e: ChunkError| FetchError::Permanent(e.to_string()))?;
        if raw.len() < len {
            return Err(FetchError::Permanent(format!(
                "chunk {} holds {} bytes, {len} expected",
                chunk::hex(&h),
                raw.len()
            )));
        }
        // Data first, then its state: whoever sees the state sees the data.
        self.data
            .write_all_at(&raw[..len], off)
            .and_then(|_| self.set_state(index, FETCHED))?;
        self.unsynced.lock().expect("unsynced").insert(index);
        self.local.fetch_add(1, Ordering::Relaxed);
        self.bytes_fetched.fetch_add(fetched, Ordering::Relaxed);
        if on_demand {
            self.fetched_on_demand.fetch_add(1, Ordering::Relaxed);
        } else {
            self.fetched_background.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`, fetching the chunks they cover first.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<usize, FetchError> {
        let chunks = self.chunks_of(offset, buf.len() as u64);
        futures::future::try_join_all(chunks.map(|i| self.ensure(i, true))).await?;
        let mut done = 0;
        while done < buf.len() {
            match self.data.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(done)
    }

    /// Writes `data` at `offset`: its chunks are made local first, and marked as written.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), FetchError> {
        let chunks = self.chunks_of(offset, data.len() as u64);
        futures::future::try_join_all(chunks.clone().map(|i| self.ensure(i, true))).await?;
        for i in chunks {
            if self.state(i) == FETCHED {
                // "Written" must never describe a chunk whose fetched data is not on disk yet.
                if self.unsynced.lock().expect("unsynced").contains(&i) {
                    self.sync()?;
                }
                self.set_state(i, WRITTEN)?;
            }
        }
        self.data.write_all_at(data, offset).map_err(FetchError::from)
    }

    /// Syncs the data file, then the map.
    pub fn sync(&self) -> std::io::Result<()> {
        let _g = self.sync_lock.lock().expect("sync lock");
        let batch: Vec<u64> = self.unsynced.lock().expect("unsynced").iter().copied().collect();
        self.data.sync_data()?;
        self.map.sync_data()?;
        let mut u = self.unsynced.lock().expect("unsynced");
        for i in batch {
            u.remove(&i);
        }
        Ok(())
    }

    /// The next absent chunk for the background queue, from `pos` (or the on-demand hint).
    fn next_absent(&self, pos: &mut u64, picked: &mut HashSet<u64>) -> Option<u64> {
        let n = self.total();
        if n == 0 {
            return None;
        }
        let hint = self.hint.swap(u64::MAX, Ordering::Relaxed);
        if hint != u64::MAX {
            *pos = hint % n;
        }
        let inflight = self.inflight.lock().expect("inflight");
        for k in 0..n {
            let i = (*pos + k) % n;
            if self.state(i) == ABSENT && !inflight.contains_key(&i) && !picked.contains(&i) {
                *pos = i + 1;
                picked.insert(i);
                return Some(i);
            }
        }
        None
    }

    /// Fetches every absent chunk with `concurrency` parallel transfers. Returns when all are
    /// local, or with the first error once the pass is over.
    pub async fn hydrate_pass(&self, concurrency: usize) -> Result<(), FetchError> {
        let (mut pos, mut picked) = (0u64, HashSet::new());
        let picks = stream::iter(std::iter::from_fn(move || {
            self.next_absent(&mut pos, &mut picked)
        }));
        let mut results = picks
            .map(|i| async move {
                self.pace().await;
                self.yield_to_demand().await;
                self.background_running.fetch_add(1, Ordering::Relaxed);
                let r = self.ensure(i, false).await;
                self.background_running.fetch_sub(1, Ordering::Relaxed);
                r
            })
            .buffer_unordered(concurrency.max(1));
        let mut first_error = None;
        while let Some(r) = results.next().await {
            if let Err(e) = r {
                tracing::warn!(error = %e, "chunk fetch failed");
                *self.last_error.lock().expect("error") = Some(e.clone());
                if first_error.is_none() {
                    first_error = Some(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None if self.local.load(Ordering::Relaxed) >= self.total() => {
                self.sync()?;
                self.complete.store(true, Ordering::Release);
                *self.last_error.lock().expect("error") = None;
                Ok(())
            }
            // On-demand fetches of the last chunks are still running: go round again.
            None => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Box::pin(self.hydrate_pass(concurrency)).await
            }
        }
    }

    /// Records an error seen outside the background queue (an on-demand read).
    pub fn note_error(&self, e: &FetchError) {
        *self.last_error.lock().expect("error") = Some(e.clone());
    }

    /// Fills in the live fields of a status.
    pub fn fill_status(&self, s: &mut HydrateStatus) {
        s.total_chunks = self.total();
        s.local_chunks = self.local.load(Ordering::Relaxed);
        s.fetched_background = self.fetched_background.load(Ordering::Relaxed);
        s.fetched_on_demand = self.fetched_on_demand.load(Ordering::Relaxed);
        s.bytes_fetched = self.bytes_fetched.load(Ordering::Relaxed);
        s.refetched_after_crash = self.refetched_after_crash.load(Ordering::Relaxed);
        let err = self.last_error.lock().expect("error").clone();
        s.error = err.as_ref().map(|e| e.to_string()).unwrap_or_default();
        s.permanent = err.as_ref().is_some_and(FetchError::permanent);
    }

    /// Whether every chunk is local.
    pub fn complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// The size of the plain file.
    pub fn size(&self) -> std::io::Result<u64> {
        Ok(self.data.metadata()?.len())
    }
}
