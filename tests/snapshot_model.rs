//! Reference-model test of the snapshot engine: random writes to a volume image, snapshots
//! (first full, then incremental against the previous), deletes in random order, GC, and restores,
//! applied to the real engine and store and to a `Vec<u8>` model. Every restore is compared byte
//! for byte with the model's copy at that snapshot; after deleting everything, no chunk remains.
//! Runs against the local store, and against S3 when the test S3 server is configured.
//!
//! The concurrent variant runs a GC in a loop, at the minimum grace, beside several workers that
//! snapshot, restore, clone and delete at once on the S3 server: no snapshot may be damaged.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use strata::snapshot::upload::{upload, Progress, UploadSpec};
use strata::snapshot::{gc, manifest, restore};
use strata::store::{self, Store};
use tokio_util::sync::CancellationToken;

const CHUNK: u32 = 64 << 10;
const SIZE: u64 = 24 * CHUNK as u64 + 1000; // a partial last chunk too

#[derive(Debug, Clone)]
enum Op {
    /// Write `len` bytes of pattern `seed` at `off`.
    Write {
        off: u64,
        len: u64,
        seed: u8,
    },
    /// Zero a range (becomes zero chunks).
    Zero {
        off: u64,
        len: u64,
    },
    Snapshot,
    /// Delete the n-th live snapshot (modulo).
    Delete(usize),
    Gc,
    /// Restore the n-th live snapshot and compare.
    Restore(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SIZE, 1..(3 * CHUNK as u64), any::<u8>()).prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        1 => (0..SIZE, 1..(2 * CHUNK as u64)).prop_map(|(off, len)| Op::Zero { off, len }),
        3 => Just(Op::Snapshot),
        2 => any::<usize>().prop_map(Op::Delete),
        1 => Just(Op::Gc),
        2 => any::<usize>().prop_map(Op::Restore),
    ]
}

/// The upload of a block volume of SIZE bytes captured into `id`'s image, diffed against `parent`
/// (empty: a full snapshot).
fn block_spec(id: &str, volume_id: &str, parent_id: String) -> UploadSpec {
    UploadSpec {
        snapshot_id: id.into(),
        name: id.into(),
        volume_id: volume_id.into(),
        lineage: "lin".into(),
        parent_id,
        capture_unix_ms: 0,
        size_bytes: SIZE,
        chunk_size: CHUNK,
        fs_type: String::new(),
        block: true,
        tags: BTreeMap::new(),
        reflinked: false,
        base: None,
        hydrating: None,
        key: None,
    }
}

fn fill(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add(((off + i) % 251) as u8) | 1)
        .collect()
}

async fn run_model(store: Store, ops: Vec<Op>, dir: &Path) {
    let vol = dir.join("vol.img");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&vol)
        .unwrap();
    f.set_len(SIZE).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut live: Vec<(String, Vec<u8>)> = Vec::new();
    let mut last: Option<String> = None;
    let cancel = CancellationToken::new();
    for (n, op) in ops.into_iter().enumerate() {
        match op {
            Op::Write { off, len, seed } => {
                let len = len.min(SIZE - off);
                let data = fill(seed, off, len);
                f.write_all_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Zero { off, len } => {
                let len = len.min(SIZE - off);
                f.write_all_at(&vec![0u8; len as usize], off).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Snapshot => {
                let id = format!("snap-{n}");
                let clone = dir.join(format!("{id}.img"));
                std::fs::copy(&vol, &clone).unwrap();
                // The parent may have been deleted: the upload must then go in full.
                let spec = block_spec(&id, "vol-model", last.clone().unwrap_or_default());
                let p = Progress::default();
                let m = upload(
                    &store,
                    &spec,
                    &clone,
                    &dir.join(format!("{id}.progress")),
                    &p,
                    4,
                    &cancel,
                )
                .await
                .unwrap();
                assert!(m.chunks.iter().all(|c| c.index < SIZE.div_ceil(CHUNK as u64)));
                std::fs::remove_file(&clone).unwrap();
                live.push((id.clone(), model.clone()));
                last = Some(id);
            }
            Op::Delete(i) if !live.is_empty() => {
                let (id, _) = live.remove(i % live.len());
                manifest::delete_snapshot(&store, &id).await.unwrap();
            }
            Op::Gc => {
                gc::collect(&store, gc::MIN_GRACE).await.unwrap();
            }
            Op::Restore(i) if !live.is_empty() => {
                let (id, want) = &live[i % live.len()];
                check_restore(&store, id, want, dir).await;
            }
            _ => {}
        }
    }
    // Everything still live restores exactly, after a final GC.
    gc::collect(&store, gc::MIN_GRACE).await.unwrap();
    for (id, want) in &live {
        check_restore(&store, id, want, dir).await;
    }
    // Deleting everything (the caller then checks that no chunk is left).
    for (id, _) in &live {
        manifest::delete_snapshot(&store, id).await.unwrap();
    }
}

/// After every snapshot was deleted: GC, once the chunks are older than the grace by the store's
/// clock, leaves no chunk, lease or manifest.
async fn assert_empty_after_grace(store: &Store) {
    let r = gc::collect_settled(store, gc::MIN_GRACE, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        store.list("chunks/").await.unwrap().is_empty(),
        "chunks left after deleting every snapshot: {r:?}"
    );
    assert!(
        store.list("leases/").await.unwrap().is_empty(),
        "leases left behind"
    );
    assert!(
        store.list("snapshots/").await.unwrap().is_empty(),
        "manifests left behind"
    );
}

async fn check_restore(store: &Store, id: &str, want: &[u8], dir: &Path) {
    let m = manifest::read_manifest(store, id)
        .await
        .unwrap()
        .expect("live snapshot has a manifest");
    let out = dir.join("restore.img");
    let f = std::fs::File::create(&out).unwrap();
    f.set_len(m.size_bytes).unwrap();
    drop(f);
    let p = Progress::default();
    restore::restore(
        store,
        &m,
        &strata::snapshot::crypto::ChunkCodec::Plain,
        &out,
        "restore-model",
        false,
        &p,
        4,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let got = std::fs::read(&out).unwrap();
    assert!(got == want, "restore of {id} differs from the model");
}

fn s3_store_url() -> Option<String> {
    let ep = std::env::var("STRATA_TEST_S3_ENDPOINT").ok()?;
    let bucket = std::env::var("STRATA_TEST_S3_BUCKET").ok()?;
    Some(format!(
        "s3://{bucket}/model-{}?endpoint={ep}&path_style=true",
        uuid::Uuid::new_v4().simple()
    ))
}

fn cases(store_kind: &'static str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let config = ProptestConfig {
        cases: 16,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    // Every case's store, emptied at the end: one wait for the grace serves them all.
    let done: Mutex<Vec<(Store, tempfile::TempDir)>> = Mutex::default();
    proptest!(config, |(ops in prop::collection::vec(op(), 1..40))| {
        let dir = tempfile::tempdir().unwrap();
        rt.block_on(async {
            let store: Store = match store_kind {
                "local" => store::open(&dir.path().join("store").to_string_lossy()).await.unwrap(),
                _ => store::open(&s3_store_url().expect("S3 test server not configured: run scripts/test.sh")).await.unwrap(),
            };
            run_model(Arc::clone(&store), ops, dir.path()).await;
            done.lock().unwrap().push((store, dir));
        });
    });
    rt.block_on(async {
        for (store, _dir) in done.into_inner().unwrap() {
            assert_empty_after_grace(&store).await;
        }
    });
}

#[test]
fn model_local_store() {
    cases("local");
}

#[test]
fn model_s3_store() {
    cases("s3");
}

/// A small deterministic generator (xorshift64*), one per worker.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// What the workers share: the live snapshots with the model's bytes, and counters.
#[derive(Default)]
struct World {
    live: Mutex<Vec<(String, Arc<Vec<u8>>)>>,
    ops: AtomicUsize,
    snapshots: AtomicUsize,
    restores: AtomicUsize,
    clones: AtomicUsize,
    deletes: AtomicUsize,
    /// Restores of a snapshot deleted meanwhile, refused cleanly (not damage).
    gone: AtomicUsize,
    /// Restores that failed or differed from the model while the snapshot was live.
    damaged: Mutex<Vec<String>>,
    stop: AtomicBool,
}

const WORKERS: usize = 4;
const MIN_OPS: usize = 1000;
/// Long enough for chunks to age past the grace while uploads and restores still run.
const MIN_RUN: Duration = Duration::from_secs(30);

fn pick(world: &World, rng: &mut Rng) -> Option<(String, Arc<Vec<u8>>)> {
    let live = world.live.lock().unwrap();
    if live.is_empty() {
        return None;
    }
    Some(live[rng.below(live.len() as u64) as usize].clone())
}

/// Restores `id` into `out`; `Ok(None)` when it was deleted before the restore could lease it.
async fn restore_to(store: &Store, id: &str, out: &Path, lease: &str) -> Result<Option<Vec<u8>>, String> {
    let Some(m) = manifest::read_manifest(store, id)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let f = std::fs::File::create(out).unwrap();
    f.set_len(m.size_bytes).unwrap();
    drop(f);
    let p = Progress::default();
    match restore::restore(
        store,
        &m,
        &strata::snapshot::crypto::ChunkCodec::Plain,
        out,
        lease,
        false,
        &p,
        4,
        &CancellationToken::new(),
    )
    .await
    {
        Ok(()) => Ok(Some(std::fs::read(out).unwrap())),
        Err(restore::RestoreError::SnapshotGone { .. }) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

async fn worker(store: Store, world: Arc<World>, w: usize, dir: std::path::PathBuf) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1));
    let vol = dir.join(format!("w{w}.img"));
    let mut model = vec![0u8; SIZE as usize];
    std::fs::write(&vol, &model).unwrap();
    let mut last: Option<String> = None;
    let cancel = CancellationToken::new();
    let mut n = 0usize;
    while !world.stop.load(Ordering::Relaxed) {
        n += 1;
        // Deletes keep the live set small, so each GC run reads few manifests.
        let crowded = world.live.lock().unwrap().len() > 16;
        match if crowded { 9 } else { rng.below(10) } {
            // Snapshot, after a few writes.
            0..=3 => {
                let f = std::fs::OpenOptions::new().write(true).open(&vol).unwrap();
                for _ in 0..=rng.below(3) {
                    let off = rng.below(SIZE);
                    let len = (1 + rng.below(2 * CHUNK as u64)).min(SIZE - off);
                    let data = fill(rng.below(256) as u8, off, len);
                    f.write_all_at(&data, off).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                drop(f);
                let id = format!("snap-w{w}-{n}");
                let clone = dir.join(format!("{id}.img"));
                std::fs::copy(&vol, &clone).unwrap();
                let spec = block_spec(&id, &format!("vol-{w}"), last.clone().unwrap_or_default());
                let p = Progress::default();
                let log = dir.join(format!("{id}.progress"));
                upload(&store, &spec, &clone, &log, &p, 4, &cancel).await.unwrap();
                let _ = std::fs::remove_file(&clone);
                let _ = std::fs::remove_file(&log);
                world
                    .live
                    .lock()
                    .unwrap()
                    .push((id.clone(), Arc::new(model.clone())));
                last = Some(id);
                world.snapshots.fetch_add(1, Ordering::Relaxed);
            }
            // Restore any worker's snapshot and compare.
            4..=5 => {
                let Some((id, want)) = pick(&world, &mut rng) else {
                    continue;
                };
                let out = dir.join(format!("w{w}-restore.img"));
                match restore_to(&store, &id, &out, &format!("restore-w{w}")).await {
                    Ok(Some(got)) if got == *want => {}
                    Ok(Some(_)) => world
                        .damaged
                        .lock()
                        .unwrap()
                        .push(format!("{id}: restore differs")),
                    Ok(None) => {
                        world.gone.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => world.damaged.lock().unwrap().push(format!("{id}: {e}")),
                }
                world.restores.fetch_add(1, Ordering::Relaxed);
            }
            // Clone: this worker's volume becomes a restore of any snapshot, and its next
            // snapshot is incremental against that one (another worker may delete it meanwhile).
            6 => {
                let Some((id, want)) = pick(&world, &mut rng) else {
                    continue;
                };
                let out = dir.join(format!("w{w}-clone.img"));
                match restore_to(&store, &id, &out, &format!("clone-w{w}")).await {
                    Ok(Some(got)) if got == *want => {
                        std::fs::rename(&out, &vol).unwrap();
                        model = got;
                        last = Some(id);
                    }
                    Ok(Some(_)) => world.damaged.lock().unwrap().push(format!("{id}: clone differs")),
                    Ok(None) => {
                        world.gone.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => world.damaged.lock().unwrap().push(format!("{id}: {e}")),
                }
                world.clones.fetch_add(1, Ordering::Relaxed);
            }
            // Delete any worker's snapshot (more often when many are live).
            _ => {
                let victim = {
                    let mut live = world.live.lock().unwrap();
                    if live.len() < 3 {
                        continue;
                    }
                    let i = rng.below(live.len() as u64) as usize;
                    live.remove(i).0
                };
                manifest::delete_snapshot(&store, &victim).await.unwrap();
                world.deletes.fetch_add(1, Ordering::Relaxed);
            }
        }
        world.ops.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_gc_s3_store() {
    let url = s3_store_url().expect("S3 test server not configured: run scripts/test.sh");
    let store = store::open(&url).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let world = Arc::new(World::default());
    let started = Instant::now();
    let gc_task = {
        let (store, world) = (store.clone(), world.clone());
        tokio::spawn(async move {
            let (mut runs, mut deleted) = (0usize, 0usize);
            while !world.stop.load(Ordering::Relaxed) {
                let r = gc::collect(&store, gc::MIN_GRACE).await.unwrap();
                runs += 1;
                deleted += r.deleted;
                world.ops.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (runs, deleted)
        })
    };
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| tokio::spawn(worker(store.clone(), world.clone(), w, dir.path().to_owned())))
        .collect();
    while world.ops.load(Ordering::Relaxed) < MIN_OPS || started.elapsed() < MIN_RUN {
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "too slow: {} ops",
            world.ops.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    world.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (gc_runs, gc_deleted) = gc_task.await.unwrap();
    // Every snapshot still live restores exactly, after one more collection.
    gc::collect(&store, gc::MIN_GRACE).await.unwrap();
    let live = world.live.lock().unwrap().clone();
    for (id, want) in &live {
        match restore_to(&store, id, &dir.path().join("final.img"), "restore-final").await {
            Ok(Some(got)) if got == **want => {}
            other => {
                let what = other.map(|o| o.map(|_| "differs"));
                world
                    .damaged
                    .lock()
                    .unwrap()
                    .push(format!("{id} at the end: {what:?}"));
            }
        }
    }
    let verified = strata::admin::verify(strata::admin::VerifyArgs {
        snapshots: Vec::new(),
        concurrency: 16,
        store: strata::admin::StoreArgs { store: url.clone() },
        key: Default::default(),
    })
    .await;
    let damaged = world.damaged.lock().unwrap().clone();
    eprintln!(
        "{} operations in {:.1} s: {} snapshots, {} restores, {} clones, {} deletes, {} GC runs \
         ({gc_deleted} chunks deleted during the run); {} restores of snapshots deleted meanwhile \
         refused; {} live at the end; {} damaged",
        world.ops.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        world.snapshots.load(Ordering::Relaxed),
        world.restores.load(Ordering::Relaxed),
        world.clones.load(Ordering::Relaxed),
        world.deletes.load(Ordering::Relaxed),
        gc_runs,
        world.gone.load(Ordering::Relaxed),
        live.len(),
        damaged.len(),
    );
    assert!(damaged.is_empty(), "damaged snapshots: {damaged:#?}");
    verified.expect("verify found damage");
    assert!(
        gc_deleted > 0,
        "the GC never deleted anything: the run proved nothing"
    );
    // Delete the rest: nothing is left once the grace has passed.
    for (id, _) in &live {
        manifest::delete_snapshot(&store, id).await.unwrap();
    }
    assert_empty_after_grace(&store).await;
}
