//! Transient store failures are retried with backoff and change nothing in the result; permanent
//! ones end the operation with a clear error, quickly, and commit nothing.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata::snapshot::upload::{upload, Progress, UploadSpec};
use strata::snapshot::{manifest, restore};
use strata::store::local::LocalStore;
use strata::store::retry::{Policy, Retrying};
use strata::store::unreliable::Unreliable;
use strata::store::{Store, StoreError};
use tokio_util::sync::CancellationToken;

const CHUNK: u32 = 64 << 10;

fn spec(id: &str, size: u64) -> UploadSpec {
    UploadSpec {
        snapshot_id: id.into(),
        name: id.into(),
        volume_id: "vol-f".into(),
        lineage: "lin".into(),
        parent_id: String::new(),
        capture_unix_ms: 1,
        size_bytes: size,
        chunk_size: CHUNK,
        fs_type: String::new(),
        block: true,
        tags: BTreeMap::new(),
        reflinked: false,
        base: None,
        hydrating: None,
    }
}

fn image(dir: &std::path::Path, size: usize) -> (std::path::PathBuf, Vec<u8>) {
    let data = strata::demo::pattern(size, 77);
    let p = dir.join("img");
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

#[tokio::test]
async fn transient_failures_are_retried_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let local: Store = Arc::new(LocalStore::open(&dir.path().join("store")).unwrap());
    let faulty = Arc::new(Unreliable::new(local.clone(), 3));
    let policy = Policy {
        attempts: 10,
        base: Duration::from_millis(1),
        max: Duration::from_millis(20),
    };
    let retrying = Arc::new(Retrying::with_policy(faulty.clone(), policy));
    let store: Store = retrying.clone();
    let (img, data) = image(dir.path(), 40 * CHUNK as usize + 123);
    let p = Progress::default();
    let cancel = CancellationToken::new();
    let m = upload(
        &store,
        &spec("snap-f", data.len() as u64),
        &img,
        &dir.path().join("log"),
        &p,
        4,
        &cancel,
    )
    .await
    .unwrap();
    let injected = faulty.injected.load(Ordering::Relaxed);
    assert!(injected > 10, "no faults were injected");
    // Every injected fault was answered by a retry of this store (its own count, not the
    // process's: other tests retry in parallel).
    assert_eq!(retrying.retries(), injected, "faults and retries differ");
    let out = dir.path().join("out");
    std::fs::File::create(&out)
        .unwrap()
        .set_len(data.len() as u64)
        .unwrap();
    restore::restore(&store, &m, &out, "r", false, &Progress::default(), 4, &cancel)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
}

#[tokio::test]
async fn permanent_failure_ends_quickly_and_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let local: Store = Arc::new(LocalStore::open(&dir.path().join("store")).unwrap());
    let faulty = Arc::new(Unreliable::new(local.clone(), 0));
    faulty.poison("chunks/");
    let store: Store = Arc::new(Retrying::new(faulty.clone()));
    let (img, data) = image(dir.path(), 8 * CHUNK as usize);
    let started = Instant::now();
    let err = upload(
        &store,
        &spec("snap-p", data.len() as u64),
        &img,
        &dir.path().join("log"),
        &Progress::default(),
        4,
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a permanent error was retried"
    );
    assert!(
        err.to_string().contains("injected permanent failure"),
        "unclear error: {err}"
    );
    assert!(
        manifest::read_manifest(&local, "snap-p").await.unwrap().is_none(),
        "a manifest was committed"
    );
}

#[tokio::test]
async fn unreachable_s3_endpoint_fails_with_a_clear_error_not_a_hang() {
    // A port nothing listens on: connections are refused (a transient error, retried, then given up).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::env::set_var(
        "AWS_ACCESS_KEY_ID",
        std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_else(|_| "x".into()),
    );
    std::env::set_var(
        "AWS_SECRET_ACCESS_KEY",
        std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|_| "y".into()),
    );
    // This store's own retry count: tests running beside this one retry too.
    let retries = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let store = strata::store::open_counting(
        &format!("s3://bucket/p?endpoint=http://127.0.0.1:{port}&path_style=true"),
        retries.clone(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let err = store.get("snapshots/x.manifest").await.unwrap_err();
    assert!(matches!(err, StoreError::Transient { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "gave up only after {:?}",
        started.elapsed()
    );
    // Every attempt of the default policy was made: a retry after each but the last.
    assert_eq!(
        retries.load(Ordering::Relaxed),
        u64::from(Policy::default().attempts - 1),
        "the refused connection was not retried as the policy says"
    );
}

#[tokio::test]
async fn resumed_upload_keeps_protecting_chunks_of_a_deleted_parent() {
    use strata::snapshot::gc;
    let dir = tempfile::tempdir().unwrap();
    let local: Store = Arc::new(LocalStore::open(&dir.path().join("store")).unwrap());
    let cancel = CancellationToken::new();
    let size = 16 * CHUNK as usize;
    // Parent: 16 chunks of data.
    let (img, mut data) = image(dir.path(), size);
    let parent = upload(
        &local,
        &spec("snap-parent", size as u64),
        &img,
        &dir.path().join("p.log"),
        &Progress::default(),
        4,
        &cancel,
    )
    .await
    .unwrap();
    // Child: one chunk changed; its upload fails on that new chunk, after recording the others
    // (reused from the parent) in its progress log.
    let patch = strata::demo::pattern(CHUNK as usize, 99);
    data[5 * CHUNK as usize..6 * CHUNK as usize].copy_from_slice(&patch);
    std::fs::write(&img, &data).unwrap();
    let new_chunk = strata::snapshot::chunk::key(&strata::snapshot::chunk::hash(&patch));
    let mut child = spec("snap-child", size as u64);
    child.parent_id = parent.snapshot_id.clone();
    let log = dir.path().join("c.log");
    let failing = || {
        let u = Arc::new(Unreliable::new(local.clone(), 0));
        u.poison(&new_chunk);
        Arc::new(Retrying::new(u)) as Store
    };
    assert!(
        upload(&failing(), &child, &img, &log, &Progress::default(), 1, &cancel)
            .await
            .is_err()
    );
    let recorded = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(recorded >= 1, "nothing was recorded before the failure");
    // The parent is deleted while the child is not committed; a resumed attempt rewrites the
    // lease (the parent is gone now) and fails again; GC runs.
    manifest::delete_snapshot(&local, &parent.snapshot_id)
        .await
        .unwrap();
    assert!(
        upload(&failing(), &child, &img, &log, &Progress::default(), 1, &cancel)
            .await
            .is_err()
    );
    // Everything was written long ago by the store's clock (the parent three hours ago, the
    // resumed attempt's lease two), so only references can keep a chunk: the GC deletes what
    // the lease does not name.
    backdate(&dir.path().join("store"), Duration::from_secs(3 * 3600));
    std::fs::File::options()
        .write(true)
        .open(
            dir.path()
                .join("store")
                .join(manifest::lease_key(&child.snapshot_id)),
        )
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(2 * 3600))
        .unwrap();
    let r = gc::collect(&local, gc::MIN_GRACE).await.unwrap();
    assert_eq!(r.kept_recent, 0, "{r:?}");
    assert!(
        r.deleted > 0,
        "nothing was garbage, the test proves nothing: {r:?}"
    );
    // Resumed once more without faults: it commits, and every chunk it names exists.
    let m = upload(&local, &child, &img, &log, &Progress::default(), 1, &cancel)
        .await
        .unwrap();
    for c in &m.chunks {
        let h: [u8; 32] = c.hash.as_slice().try_into().unwrap();
        assert!(
            local.exists(&strata::snapshot::chunk::key(&h)).await.unwrap(),
            "committed manifest names a collected chunk"
        );
    }
    let out = dir.path().join("out");
    std::fs::File::create(&out).unwrap().set_len(size as u64).unwrap();
    restore::restore(&local, &m, &out, "r", false, &Progress::default(), 4, &cancel)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
}

/// Sets every object's modification time `ago` in the past (the local store's clock is mtime).
fn backdate(root: &std::path::Path, ago: Duration) {
    let t = std::time::SystemTime::now() - ago;
    let mut dirs = vec![root.to_owned()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                std::fs::File::options()
                    .write(true)
                    .open(e.path())
                    .unwrap()
                    .set_modified(t)
                    .unwrap();
            }
        }
    }
}
