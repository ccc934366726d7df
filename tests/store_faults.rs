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
        key: None,
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
    restore::restore(
        &store,
        &m,
        &strata::snapshot::crypto::ChunkCodec::Plain,
        &out,
        "r",
        false,
        &Progress::default(),
        4,
        &cancel,
    )
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
    restore::restore(
        &local,
        &m,
        &strata::snapshot::crypto::ChunkCodec::Plain,
        &out,
        "r",
        false,
        &Progress::default(),
        4,
        &cancel,
    )
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

// The agent's own handling of upload failures, on the multi-process test bed: faults are switched
// in the agent's store through a rule file (see `strata::store::unreliable`).

mod common;

use common::*;
use strata::proto::csi as pb;
use strata::store::unreliable::FAULTS_ENV;
use tonic::Code;

/// A bed of one node whose store reads faults from `faults`, serving metrics on `metrics_port`.
async fn faulty_bed(store: StoreKind, faults: &std::path::Path, metrics_port: u16) -> TestBed {
    TestBed::start_spec(BedSpec {
        store,
        nodes: vec![("node-a".into(), Some("zone-a".into()), "127.0.0.1".into(), None)],
        node_env: vec![(FAULTS_ENV.into(), faults.display().to_string())],
        per_node_args: vec![vec![format!("--metrics-addr=127.0.0.1:{metrics_port}")]],
        ..Default::default()
    })
    .await
}

/// A counter of the node's metrics (0 when not exported yet).
async fn counter(port: u16, name: &str) -> u64 {
    let text = http_get(port, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

fn write_device(path: &std::path::Path, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// The agent's report of an upload not yet committed (what the controller sees).
async fn agent_pending(bed: &TestBed, snapshot_id: &str) -> Option<strata::proto::agent::SnapshotStatus> {
    use strata::proto::agent::agent_client::AgentClient;
    let url = format!("http://127.0.0.1:{}", bed.nodes[0].agent_port);
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut agent = AgentClient::with_interceptor(channel, |mut req: tonic::Request<()>| {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        Ok(req)
    });
    agent
        .list_pending_snapshots(strata::proto::agent::ListPendingSnapshotsRequest {})
        .await
        .unwrap()
        .into_inner()
        .snapshots
        .into_iter()
        .find(|s| s.snapshot_id == snapshot_id)
}

fn assert_final_failure(s: &tonic::Status, snap: &str) {
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(
        s.message().contains(snap),
        "the error does not name the snapshot: {s:?}"
    );
    assert!(
        s.message().contains("injected permanent failure"),
        "the error does not say why: {s:?}"
    );
}

#[tokio::test]
async fn permanent_upload_failure_ends_the_snapshot_with_a_final_error() {
    let faults = tempfile::NamedTempFile::new().unwrap();
    let metrics = free_port();
    let mut bed = faulty_bed(StoreKind::Local, faults.path(), metrics).await;
    let mut ctl = bed.controller().await;
    let (vol, _, target) =
        attached_block_volume(&bed, &mut ctl, 0, create_req("perm", 16 * MIB, block_cap())).await;
    write_device(&target, &strata::demo::pattern(8 << 20, 5));
    // The store refuses every chunk for good (as a missing bucket or denied access would).
    std::fs::write(faults.path(), "permanent chunks/\n").unwrap();
    let req = snapshot_req("perm-snap", &vol);
    let first = retry_aborted!(ctl.create_snapshot(req.clone()))
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let snap = first.snapshot_id.clone();
    assert!(!first.ready_to_use, "committed despite a failing store");
    // Repeated as the external-snapshotter does: the failure comes as a final error.
    let deadline = Instant::now() + Duration::from_secs(60);
    let err = loop {
        match retry_aborted!(ctl.create_snapshot(req.clone())) {
            Ok(r) => assert!(!r.into_inner().snapshot.unwrap().ready_to_use),
            Err(s) => break s,
        }
        assert!(
            Instant::now() < deadline,
            "CreateSnapshot answers \"not ready\" forever after a permanent failure"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_final_failure(&err, &snap);
    assert_eq!(
        counter(metrics, r#"strata_snapshots_total{outcome="failed"}"#).await,
        1
    );
    assert_eq!(counter(metrics, "strata_snapshot_upload_retries_total").await, 0);
    for _ in 0..3 {
        let again = retry_aborted!(ctl.create_snapshot(req.clone())).unwrap_err();
        assert_final_failure(&again, &snap);
        assert_eq!(again.message(), err.message(), "the answer changed");
    }
    // Recorded durably; the captured image is dropped.
    let pending = bed.nodes[0].storage.join("snapshots").join(&snap);
    assert!(pending.join("failed.rec").exists(), "the failure is not recorded");
    assert!(
        !pending.join("clone.img").exists(),
        "the image of a failed snapshot is kept"
    );
    // The store heals and the agent restarts: the snapshot stays failed (its instant is gone; no
    // upload resumes, no capture is redone under the same id).
    std::fs::write(faults.path(), "").unwrap();
    bed.kill_node(0);
    bed.start_node(0, &[]).await;
    let after = retry_aborted!(ctl.create_snapshot(req.clone())).unwrap_err();
    assert_final_failure(&after, &snap);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let store = bed.store().await;
    assert!(
        strata::snapshot::manifest::read_manifest(&store, &snap)
            .await
            .unwrap()
            .is_none(),
        "a failed snapshot was committed after the restart"
    );
    assert_final_failure(
        &retry_aborted!(ctl.create_snapshot(req.clone())).unwrap_err(),
        &snap,
    );
    // Deleting it succeeds and removes the node's state; a new snapshot works.
    retry_aborted!(ctl.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot_id: snap.clone(),
        ..Default::default()
    }))
    .unwrap();
    assert!(!pending.exists(), "a deleted failed snapshot left its state");
    assert!(
        !store
            .exists(&strata::snapshot::manifest::lease_key(&snap))
            .await
            .unwrap(),
        "a deleted failed snapshot left its lease"
    );
    let s = snapshot(&mut ctl, "perm-snap-2", &vol).await;
    assert!(s.ready_to_use);
}

#[tokio::test]
async fn transient_failures_are_retried_by_the_agent_until_the_upload_commits() {
    let faults = tempfile::NamedTempFile::new().unwrap();
    let metrics = free_port();
    let bed = faulty_bed(StoreKind::S3, faults.path(), metrics).await;
    let mut ctl = bed.controller().await;
    let (vol, _, target) =
        attached_block_volume(&bed, &mut ctl, 0, create_req("trans", 24 * MIB, block_cap())).await;
    let data = strata::demo::pattern(24 << 20, 9);
    write_device(&target, &data);
    // A burst longer than the store's own retries: the upload attempt fails.
    std::fs::write(faults.path(), "transient chunks/\n").unwrap();
    let first = retry_aborted!(ctl.create_snapshot(snapshot_req("trans-snap", &vol)))
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(!first.ready_to_use, "committed despite a failing store");
    let snap = first.snapshot_id.clone();
    // The agent reports the transient error with the progress while it retries.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = agent_pending(&bed, &snap)
            .await
            .expect("the snapshot is not pending");
        if st.error.contains("injected transient failure") {
            assert_eq!(st.chunks_total, 24, "{st:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no transient failure reported: {st:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Still retrying, not given up: later attempts fail too while the burst lasts.
    let deadline = Instant::now() + Duration::from_secs(60);
    while counter(metrics, "strata_snapshot_upload_retries_total").await < 2 {
        assert!(Instant::now() < deadline, "the agent stopped retrying");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    std::fs::write(faults.path(), "").unwrap();
    // No further CreateSnapshot: the agent finishes by itself; ListSnapshots shows it ready.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let listed = ctl
            .list_snapshots(pb::ListSnapshotsRequest {
                snapshot_id: snap.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries;
        if listed
            .first()
            .and_then(|e| e.snapshot.as_ref())
            .is_some_and(|s| s.ready_to_use)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the upload did not complete by itself after the burst"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        counter(metrics, r#"strata_snapshots_total{outcome="failed"}"#).await,
        0,
        "a transient failure was counted as final"
    );
    let store = bed.store().await;
    let m = manifest::read_manifest(&store, &snap).await.unwrap().unwrap();
    assert_eq!(m.capture_unix_ms, {
        let t = first.creation_time.unwrap();
        t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
    });
    let out = bed.dir.join("restored.img");
    std::fs::File::create(&out)
        .unwrap()
        .set_len(m.size_bytes)
        .unwrap();
    restore::restore(
        &store,
        &m,
        &strata::snapshot::crypto::ChunkCodec::Plain,
        &out,
        "t",
        false,
        &Progress::default(),
        4,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let got = std::fs::read(&out).unwrap();
    assert!(got[..data.len()] == data[..], "restored data differs");
    assert!(got[data.len()..].iter().all(|&b| b == 0));
}
