//! Reference-model test of the snapshot engine: random writes to a volume image, snapshots
//! (first full, then incremental against the previous), deletes in random order, GC, and restores,
//! applied to the real engine and store and to a `Vec<u8>` model. Every restore is compared byte
//! for byte with the model's copy at that snapshot; after deleting everything, no chunk remains.
//! Runs against the local store, and against S3 when the test S3 server is configured.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

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
                let spec = UploadSpec {
                    snapshot_id: id.clone(),
                    name: id.clone(),
                    volume_id: "vol-model".into(),
                    lineage: "lin".into(),
                    // The parent may have been deleted: the upload must then go in full.
                    parent_id: last.clone().unwrap_or_default(),
                    capture_unix_ms: 0,
                    size_bytes: SIZE,
                    chunk_size: CHUNK,
                    fs_type: String::new(),
                    block: true,
                    tags: BTreeMap::new(),
                    reflinked: false,
                    base: None,
                    hydrating: None,
                };
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
                store.delete(&manifest::manifest_key(&id)).await.unwrap();
            }
            Op::Gc => {
                gc::collect(&store, Duration::ZERO).await.unwrap();
            }
            Op::Restore(i) if !live.is_empty() => {
                let (id, want) = &live[i % live.len()];
                check_restore(&store, id, want, dir).await;
            }
            _ => {}
        }
    }
    // Everything still live restores exactly, after a final GC.
    gc::collect(&store, Duration::ZERO).await.unwrap();
    for (id, want) in &live {
        check_restore(&store, id, want, dir).await;
    }
    // Deleting everything leaves no chunk behind.
    for (id, _) in &live {
        store.delete(&manifest::manifest_key(id)).await.unwrap();
    }
    gc::collect(&store, Duration::ZERO).await.unwrap();
    assert!(
        store.list("chunks/").await.unwrap().is_empty(),
        "chunks left after deleting every snapshot"
    );
    assert!(
        store.list("leases/").await.unwrap().is_empty(),
        "leases left behind"
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
    proptest!(config, |(ops in prop::collection::vec(op(), 1..40))| {
        let dir = tempfile::tempdir().unwrap();
        rt.block_on(async {
            let store: Store = match store_kind {
                "local" => store::open(&dir.path().join("store").to_string_lossy()).await.unwrap(),
                _ => store::open(&s3_store_url().expect("S3 test server not configured: run scripts/test.sh")).await.unwrap(),
            };
            run_model(Arc::clone(&store), ops, dir.path()).await;
        });
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
