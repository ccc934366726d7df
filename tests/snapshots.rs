//! Snapshots through CSI on the multi-node, two-zone test bed, against the local store and a real
//! S3 server: point-in-time capture, incremental uploads, restores on any node and zone compared
//! byte for byte, deletes in any order, GC down to zero chunks, clones, and the CSI error codes.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use strata::demo::pattern;
use strata::proto::csi as pb;
use strata::proto::csi::controller_client::ControllerClient;
use strata::topology::ZONE_KEY;
use tonic::transport::Channel;
use tonic::Code;

const TWO_ZONES: &[(&str, &str)] = &[("node-a", "zone-a"), ("node-b", "zone-b")];

/// CreateVolume from a snapshot in a zone, repeated while the restore is in progress.
async fn restore(
    ctl: &mut ControllerClient<Channel>,
    name: &str,
    snap: &str,
    zone: &str,
    bytes: i64,
) -> pb::Volume {
    let mut r = create_req(name, bytes, mount_cap(""));
    r.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(
            pb::volume_content_source::SnapshotSource {
                snapshot_id: snap.into(),
            },
        )),
    });
    r.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: vec![topo(&[(ZONE_KEY, zone)])],
        preferred: vec![],
    });
    match retry_aborted!(ctl.create_volume(r.clone())) {
        Ok(v) => v.into_inner().volume.unwrap(),
        Err(s) => panic!("restore {name} from {snap}: {s:?}"),
    }
}

fn node_of(bed: &TestBed, v: &pb::Volume) -> usize {
    let n = v.accessible_topology[0]
        .segments
        .get(strata::topology::NODE_KEY)
        .unwrap();
    bed.nodes.iter().position(|x| &x.name == n).unwrap()
}

fn write_file(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn overwrite(path: &Path, off: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

async fn chunk_count(bed: &TestBed) -> usize {
    bed.store().await.list("chunks/").await.unwrap().len()
}

/// Waits until the controller's GC has brought the chunk count to what `done` accepts: the
/// chunks must first age past the minimum grace (by the store's clock), then a periodic run
/// (every 2 s in the test bed) collects them.
async fn wait_for_gc(bed: &TestBed, done: impl Fn(usize) -> bool, what: &str) {
    let deadline = Instant::now() + strata::snapshot::gc::MIN_GRACE + Duration::from_secs(40);
    loop {
        let n = chunk_count(bed).await;
        if done(n) {
            return;
        }
        assert!(Instant::now() < deadline, "{what} ({n} chunks)");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn chain_restore_delete_gc(kind: StoreKind) {
    let bed = TestBed::start_store(TWO_ZONES, kind).await;
    let mut ctl = bed.controller().await;
    let mut r = create_req("src", 64 * MIB, mount_cap("ext4"));
    r.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: vec![topo(&[(ZONE_KEY, "zone-a")])],
        preferred: vec![],
    });
    let src = create_volume(&mut ctl, r).await;
    let id = src.volume_id.clone();
    let mut a = bed.node(0).await;
    let (staging, target) = bed.kubelet_paths("src");
    attach(&mut a, &id, &staging, &target, mount_cap("ext4")).await;
    let v1 = pattern(12 << 20, 1);
    write_file(&target.join("a.bin"), &v1);

    let s1 = snapshot(&mut ctl, "snap-one", &id).await;
    assert_eq!(s1.source_volume_id, id);
    assert_eq!(s1.size_bytes, 64 * MIB);
    assert!(s1.creation_time.as_ref().unwrap().seconds > 1_700_000_000);
    assert!(s1.snapshot_id.starts_with("snap-"));
    // A repeated call returns the same snapshot.
    assert_eq!(snapshot(&mut ctl, "snap-one", &id).await, s1);

    // Change about 1 MiB and add a file, then an incremental snapshot.
    let patch = pattern(1 << 20, 2);
    overwrite(&target.join("a.bin"), 3 << 20, &patch);
    let mut v2 = v1.clone();
    v2[3 << 20..4 << 20].copy_from_slice(&patch);
    write_file(&target.join("b.txt"), b"second snapshot only");
    let s2 = snapshot(&mut ctl, "snap-two", &id).await;
    let store = bed.store().await;
    let m2 = strata::snapshot::manifest::read_manifest(&store, &s2.snapshot_id)
        .await
        .unwrap()
        .unwrap();
    let st = m2.stats.unwrap();
    assert_eq!(m2.parent_id, s1.snapshot_id, "second snapshot is not incremental");
    assert!(st.chunks_reused >= 10, "{st:?}");
    assert!(
        st.chunks_new <= 6,
        "too many chunks uploaded for a 1 MiB change: {st:?}"
    );

    // Restore each on the other zone and compare.
    for (name, snap, want_b) in [("r1", &s1, false), ("r2", &s2, true)] {
        let v = restore(&mut ctl, name, &snap.snapshot_id, "zone-b", 64 * MIB).await;
        assert_eq!(node_of(&bed, &v), 1);
        let mut b = bed.node(1).await;
        let (st, tg) = bed.kubelet_paths(name);
        attach(&mut b, &v.volume_id, &st, &tg, mount_cap("ext4")).await;
        let got = std::fs::read(tg.join("a.bin")).unwrap();
        let want = if want_b { &v2 } else { &v1 };
        assert!(&got == want, "{name}: restored a.bin differs");
        assert_eq!(tg.join("b.txt").exists(), want_b, "{name}: b.txt presence");
        detach(&mut b, &v.volume_id, &st, &tg).await;
    }
    // Delete the first (the parent): the second still restores, in zone-a this time, after a GC
    // has collected what only the first used.
    let before = chunk_count(&bed).await;
    ctl.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot_id: s1.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    ctl.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot_id: s1.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    wait_for_gc(
        &bed,
        |n| n < before,
        "the first snapshot's own chunks are never collected",
    )
    .await;
    let v = restore(&mut ctl, "r3", &s2.snapshot_id, "zone-a", 96 * MIB).await;
    assert_eq!(
        v.capacity_bytes,
        96 * MIB,
        "a larger requested size grows the restored volume"
    );
    let (st, tg) = bed.kubelet_paths("r3");
    attach(&mut a, &v.volume_id, &st, &tg, mount_cap("ext4")).await;
    assert!(std::fs::read(tg.join("a.bin")).unwrap() == v2);
    let fs_size = nix::sys::statvfs::statvfs(&tg).unwrap();
    assert!(
        fs_size.blocks() as u64 * fs_size.fragment_size() as u64 > 80 * MIB as u64,
        "filesystem not grown"
    );
    detach(&mut a, &v.volume_id, &st, &tg).await;
    // A snapshot of a restored volume continues its lineage incrementally.
    let s3 = snapshot(&mut ctl, "snap-of-restore", &v.volume_id).await;
    let m3 = strata::snapshot::manifest::read_manifest(&store, &s3.snapshot_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m3.parent_id, s2.snapshot_id);

    // Delete everything: GC leaves no chunk.
    for s in [&s2.snapshot_id, &s3.snapshot_id] {
        ctl.delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: s.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    wait_for_gc(&bed, |n| n == 0, "chunks remain after deleting every snapshot").await;
    assert!(store.list("snapshots/").await.unwrap().is_empty());
    assert!(store.list("leases/").await.unwrap().is_empty());
}

#[tokio::test]
async fn chain_restore_delete_gc_local() {
    chain_restore_delete_gc(StoreKind::Local).await;
}

#[tokio::test]
async fn chain_restore_delete_gc_s3() {
    chain_restore_delete_gc(StoreKind::S3).await;
}

#[tokio::test]
async fn snapshot_is_point_in_time_and_incremental_by_chunk() {
    let bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let mut ctl = bed.controller().await;
    let (id, staging, target) =
        attached_block_volume(&bed, &mut ctl, 0, create_req("blk", 64 * MIB, block_cap())).await;
    let mut a = bed.node(0).await;
    // Half random, half zeros.
    let first = pattern(32 << 20, 9);
    overwrite(&target, 0, &first);
    let s1 = snapshot(&mut ctl, "p1", &id).await;
    // Written after CreateSnapshot returned: must not be in s1.
    overwrite(&target, 40 << 20, &pattern(1 << 20, 10));
    let store = bed.store().await;
    let m1 = strata::snapshot::manifest::read_manifest(&store, &s1.snapshot_id)
        .await
        .unwrap()
        .unwrap();
    let st1 = m1.stats.unwrap();
    assert_eq!(st1.chunks_new, 32, "{st1:?}");
    assert_eq!(st1.chunks_zero, 32, "zero chunks are never stored: {st1:?}");
    assert!(st1.bytes_read <= 33 * CHUNK, "holes were read: {st1:?}");
    // Rewrite two 1 MiB extents (chunk-aligned) and snapshot again.
    overwrite(&target, 5 << 20, &pattern(1 << 20, 11));
    overwrite(&target, 20 << 20, &pattern(1 << 20, 12));
    let s2 = snapshot(&mut ctl, "p2", &id).await;
    let m2 = strata::snapshot::manifest::read_manifest(&store, &s2.snapshot_id)
        .await
        .unwrap()
        .unwrap();
    let st2 = m2.stats.unwrap();
    // The 40 MiB write happened before s2's capture: 3 new chunks.
    assert_eq!(st2.chunks_new, 3, "{st2:?}");
    assert_eq!(st2.chunks_reused, 30, "{st2:?}");
    assert!(st2.bytes_uploaded <= 3 * CHUNK + 4096, "{st2:?}");
    detach(&mut a, &id, &staging, &target).await;

    // Restore s1 as a block volume: exactly the first 32 MiB and zeros after.
    let mut r = create_req("blk-r", 64 * MIB, block_cap());
    r.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(
            pb::volume_content_source::SnapshotSource {
                snapshot_id: s1.snapshot_id.clone(),
            },
        )),
    });
    let v = create_volume(&mut ctl, r).await;
    let (st, tg) = bed.kubelet_paths("blk-r");
    attach(&mut a, &v.volume_id, &st, &tg, block_cap()).await;
    let got = std::fs::read(&tg).unwrap();
    assert_eq!(got.len(), 64 << 20);
    assert!(got[..32 << 20] == first[..], "restored data differs");
    assert!(
        got[32 << 20..].iter().all(|&b| b == 0),
        "data written after the capture leaked into the snapshot"
    );
}

#[tokio::test]
async fn snapshot_rpcs_validate_and_use_the_right_codes() {
    let bed = TestBed::start(TWO_ZONES).await;
    let mut ctl = bed.controller().await;
    let v1 = create_volume(&mut ctl, create_req("v1", 32 * MIB, mount_cap("ext4"))).await;
    let v2 = create_volume(&mut ctl, create_req("v2", 32 * MIB, mount_cap("ext4"))).await;
    let req = |name: &str, src: &str| pb::CreateSnapshotRequest {
        source_volume_id: src.into(),
        name: name.into(),
        ..Default::default()
    };
    assert_eq!(
        code(ctl.create_snapshot(req("", &v1.volume_id)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.create_snapshot(req("s", "")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.create_snapshot(req("s", "../x")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.create_snapshot(req("s", "vol-missing")).await),
        Code::NotFound
    );
    let s = snapshot(&mut ctl, "s", &v1.volume_id).await;
    assert_eq!(
        code(ctl.create_snapshot(req("s", &v2.volume_id)).await),
        Code::AlreadyExists
    );

    let list = |id: &str, src: &str, max: i32, tok: &str| pb::ListSnapshotsRequest {
        max_entries: max,
        starting_token: tok.into(),
        source_volume_id: src.into(),
        snapshot_id: id.into(),
        ..Default::default()
    };
    for i in 0..3 {
        snapshot(&mut ctl, &format!("x{i}"), &v2.volume_id).await;
    }
    let all = ctl
        .list_snapshots(list("", "", 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 4);
    let by_id = ctl
        .list_snapshots(list(&s.snapshot_id, "", 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.entries.len(), 1);
    assert_eq!(by_id.entries[0].snapshot.as_ref().unwrap(), &s);
    let none = ctl
        .list_snapshots(list("snap-nonexistent", "", 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert!(none.entries.is_empty());
    let by_src = ctl
        .list_snapshots(list("", &v2.volume_id, 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_src.entries.len(), 3);
    let mut seen = Vec::new();
    let mut tok = String::new();
    loop {
        let p = ctl
            .list_snapshots(list("", "", 3, &tok))
            .await
            .unwrap()
            .into_inner();
        seen.extend(p.entries.into_iter().map(|e| e.snapshot.unwrap().snapshot_id));
        if p.next_token.is_empty() {
            break;
        }
        tok = p.next_token;
    }
    let mut want: Vec<String> = all
        .entries
        .iter()
        .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
        .collect();
    want.sort();
    assert_eq!(seen, want);
    assert_eq!(
        code(ctl.list_snapshots(list("", "", 0, "bogus")).await),
        Code::Aborted
    );
    assert_eq!(
        code(ctl.list_snapshots(list("", "", -1, "")).await),
        Code::InvalidArgument
    );

    let got = ctl
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(got.unwrap().into_inner().snapshot.unwrap(), s);
    let missing = ctl
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: "snap-missing".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(missing), Code::NotFound);
    let del = |id: &str| pb::DeleteSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    assert_eq!(code(ctl.delete_snapshot(del("")).await), Code::InvalidArgument);
    assert_eq!(
        code(ctl.delete_snapshot(del("snap-never-existed")).await),
        Code::Ok
    );

    // Restores: unknown snapshot NOT_FOUND; a limit below the snapshot's size OUT_OF_RANGE.
    let from = |name: &str, snap: &str, req: i64, lim: i64| {
        let mut r = create_req(name, req, mount_cap("ext4"));
        r.capacity_range = Some(pb::CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        });
        r.volume_content_source = Some(pb::VolumeContentSource {
            r#type: Some(pb::volume_content_source::Type::Snapshot(
                pb::volume_content_source::SnapshotSource {
                    snapshot_id: snap.into(),
                },
            )),
        });
        r
    };
    assert_eq!(
        code(ctl.create_volume(from("r1", "snap-missing", 32 * MIB, 0)).await),
        Code::NotFound
    );
    assert_eq!(
        code(
            ctl.create_volume(from("r2", &s.snapshot_id, 16 * MIB, 16 * MIB))
                .await
        ),
        Code::OutOfRange
    );
    // Asking for less than the snapshot without a limit gives the snapshot's size.
    let v = create_volume(&mut ctl, from("r3", &s.snapshot_id, 16 * MIB, 0)).await;
    assert_eq!(v.capacity_bytes, 32 * MIB);
    assert!(v.content_source.is_some(), "the content source is echoed");
    let caps = ctl
        .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use pb::controller_service_capability::rpc::Type as Rpc;
    for want in [
        Rpc::CreateDeleteSnapshot,
        Rpc::ListSnapshots,
        Rpc::GetSnapshot,
        Rpc::CloneVolume,
    ] {
        assert!(
            caps.capabilities.iter().any(|c| matches!(&c.r#type,
                Some(pb::controller_service_capability::Type::Rpc(r)) if r.r#type == want as i32)),
            "{want:?} not advertised"
        );
    }
}

#[tokio::test]
async fn clone_copies_a_live_volume_on_its_node() {
    let bed = TestBed::start(TWO_ZONES).await;
    let mut ctl = bed.controller().await;
    let mut r = create_req("orig", 64 * MIB, mount_cap("xfs"));
    r.capacity_range = Some(pb::CapacityRange {
        required_bytes: 320 * MIB,
        limit_bytes: 0,
    });
    r.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: vec![topo(&[(ZONE_KEY, "zone-b")])],
        preferred: vec![],
    });
    let orig = create_volume(&mut ctl, r).await;
    let mut b = bed.node(1).await;
    let (staging, target) = bed.kubelet_paths("orig");
    attach(&mut b, &orig.volume_id, &staging, &target, mount_cap("xfs")).await;
    let data = pattern(10 << 20, 4);
    write_file(&target.join("f"), &data);
    let clone_req = |name: &str, zone: &str| {
        let mut r = create_req(name, 320 * MIB, mount_cap("xfs"));
        r.volume_content_source = Some(pb::VolumeContentSource {
            r#type: Some(pb::volume_content_source::Type::Volume(
                pb::volume_content_source::VolumeSource {
                    volume_id: orig.volume_id.clone(),
                },
            )),
        });
        r.accessibility_requirements = Some(pb::TopologyRequirement {
            requisite: vec![topo(&[(ZONE_KEY, zone)])],
            preferred: vec![],
        });
        r
    };
    // While mounted and in use (frozen for the copy).
    let c = create_volume(&mut ctl, clone_req("copy", "zone-b")).await;
    write_file(&target.join("after"), b"not in the clone");
    let (st, tg) = bed.kubelet_paths("copy");
    attach(&mut b, &c.volume_id, &st, &tg, mount_cap("xfs")).await;
    assert!(std::fs::read(tg.join("f")).unwrap() == data);
    assert!(!tg.join("after").exists());
    assert_eq!(
        code(ctl.create_volume(clone_req("far", "zone-a")).await),
        Code::ResourceExhausted
    );
    let mut missing = clone_req("nosrc", "zone-b");
    missing.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Volume(
            pb::volume_content_source::VolumeSource {
                volume_id: "vol-missing".into(),
            },
        )),
    });
    assert_eq!(code(ctl.create_volume(missing).await), Code::NotFound);
}

#[tokio::test]
async fn upload_killed_mid_way_resumes_after_restart_local() {
    upload_killed_mid_way_resumes_after_restart(StoreKind::Local).await;
}

#[tokio::test]
async fn upload_killed_mid_way_resumes_after_restart_s3() {
    upload_killed_mid_way_resumes_after_restart(StoreKind::S3).await;
}

async fn upload_killed_mid_way_resumes_after_restart(store: StoreKind) {
    let mut bed = TestBed::start_spec(BedSpec {
        store,
        nodes: vec![("node-a".into(), Some("zone-a".into()), "127.0.0.1".into(), None)],
        // One transfer at a time so the upload is still running when the agent is killed.
        node_args: vec!["--transfer-concurrency=1".into()],
        ..Default::default()
    })
    .await;
    let mut ctl = bed.controller().await;
    let (id, _, target) =
        attached_block_volume(&bed, &mut ctl, 0, create_req("big", 128 * MIB, block_cap())).await;
    let data = pattern(96 << 20, 21);
    overwrite(&target, 0, &data);
    let first = ctl
        .create_snapshot(pb::CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: "crash".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(
        !first.ready_to_use,
        "a 96 MiB upload finished inside CreateSnapshot"
    );
    // Once a few chunks are uploaded (the progress log says so), kill the agent.
    let log = bed.nodes[0]
        .storage
        .join("snapshots")
        .join(&first.snapshot_id)
        .join("progress.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&log)
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 3
    {
        assert!(Instant::now() < deadline, "upload made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bed.kill_node(0);
    // Written after the capture: must not appear in the snapshot.
    overwrite(&target, 0, &[0xAB; 4096]);
    let store = bed.store().await;
    assert!(
        strata::snapshot::manifest::read_manifest(&store, &first.snapshot_id)
            .await
            .unwrap()
            .is_none()
    );
    bed.start_node(0, &["--transfer-concurrency=1"]).await;
    let s = snapshot(&mut ctl, "crash", &id).await;
    assert_eq!(s.snapshot_id, first.snapshot_id);
    assert_eq!(
        s.creation_time, first.creation_time,
        "the resumed snapshot is the original capture"
    );
    let m = strata::snapshot::manifest::read_manifest(&store, &s.snapshot_id)
        .await
        .unwrap()
        .unwrap();
    // Every chunk the manifest names is in the store.
    for c in &m.chunks {
        let h: [u8; 32] = c.hash.as_slice().try_into().unwrap();
        assert!(
            store.exists(&strata::snapshot::chunk::key(&h)).await.unwrap(),
            "manifest names a missing chunk"
        );
    }
    let out = bed.dir.join("restored.img");
    std::fs::File::create(&out)
        .unwrap()
        .set_len(m.size_bytes)
        .unwrap();
    let p = strata::snapshot::upload::Progress::default();
    strata::snapshot::restore::restore(
        &store,
        &m,
        &strata::snapshot::crypto::ChunkCodec::Plain,
        &out,
        "t",
        false,
        &p,
        4,
        &Default::default(),
    )
    .await
    .unwrap();
    let got = std::fs::read(&out).unwrap();
    assert!(
        got[..96 << 20] == data[..],
        "restored data differs after a crash mid-upload"
    );
    assert!(got[96 << 20..].iter().all(|&b| b == 0));
}

#[tokio::test]
async fn on_xfs_unchanged_chunks_are_not_even_read() {
    let bed = TestBed::start_spec(BedSpec {
        nodes: vec![("node-a".into(), Some("zone-a".into()), "127.0.0.1".into(), None)],
        xfs_storage: true,
        ..Default::default()
    })
    .await;
    let mut ctl = bed.controller().await;
    let (id, staging, target) =
        attached_block_volume(&bed, &mut ctl, 0, create_req("x", 64 * MIB, block_cap())).await;
    let mut a = bed.node(0).await;
    let mut model = pattern(64 << 20, 31);
    model[32 << 20..].fill(0);
    // Zeros written for real (not holes): only the extent maps can tell they did not change.
    overwrite(&target, 0, &model);
    let store = bed.store().await;
    let mut snaps = Vec::new();
    for (round, extents) in [(0u64, vec![]), (1, vec![5u64, 40]), (2, vec![6, 7, 63])] {
        for &e in &extents {
            let patch = pattern(1 << 20, 100 + round * 10 + e);
            overwrite(&target, e << 20, &patch);
            model[(e as usize) << 20..((e as usize) + 1) << 20].copy_from_slice(&patch);
        }
        let s = snapshot(&mut ctl, &format!("xr{round}"), &id).await;
        let m = strata::snapshot::manifest::read_manifest(&store, &s.snapshot_id)
            .await
            .unwrap()
            .unwrap();
        let st = m.stats.unwrap();
        if round > 0 {
            let changed = extents.len() as u64;
            assert_eq!(st.chunks_new, changed, "round {round}: {st:?}");
            assert!(
                st.bytes_read <= changed * CHUNK,
                "round {round}: read {} bytes for {changed} changed chunks: {st:?}",
                st.bytes_read
            );
        }
        snaps.push((s.snapshot_id, model.clone()));
    }
    detach(&mut a, &id, &staging, &target).await;
    for (snap, want) in &snaps {
        let m = strata::snapshot::manifest::read_manifest(&store, snap)
            .await
            .unwrap()
            .unwrap();
        let out = bed.dir.join("check.img");
        std::fs::File::create(&out)
            .unwrap()
            .set_len(m.size_bytes)
            .unwrap();
        strata::snapshot::restore::restore(
            &store,
            &m,
            &strata::snapshot::crypto::ChunkCodec::Plain,
            &out,
            "t",
            false,
            &Default::default(),
            4,
            &Default::default(),
        )
        .await
        .unwrap();
        assert!(&std::fs::read(&out).unwrap() == want, "restore of {snap} differs");
    }
}

#[tokio::test]
async fn admin_cli_lists_shows_restores_verifies_and_collects() {
    let bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let mut ctl = bed.controller().await;
    let (id, _, target) =
        attached_block_volume(&bed, &mut ctl, 0, create_req("cli", 16 * MIB, block_cap())).await;
    let data = pattern(6 << 20, 3);
    overwrite(&target, 0, &data);
    let s1 = snapshot(&mut ctl, "cli-1", &id).await;
    overwrite(&target, 2 << 20, &pattern(1 << 20, 4));
    let s2 = snapshot(&mut ctl, "cli-2", &id).await;
    let store = format!("--store={}", bed.store_url);

    let (ok, ls) = cli(&["snapshot", "ls", &store]);
    assert!(ok, "{ls}");
    assert!(
        ls.contains(&s1.snapshot_id) && ls.contains(&s2.snapshot_id) && ls.contains("2 snapshot(s)"),
        "{ls}"
    );
    let (ok, show) = cli(&["snapshot", "show", &s2.snapshot_id, &store]);
    assert!(ok, "{show}");
    assert!(
        show.contains(&format!("{} <- {}", s2.snapshot_id, s1.snapshot_id)),
        "chain missing:\n{show}"
    );
    assert!(show.contains("reused"), "{show}");

    let out = bed.dir.join("cli-restore.img");
    let (ok, text) = cli(&["restore", &s1.snapshot_id, "--to", &out.to_string_lossy(), &store]);
    assert!(ok, "{text}");
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), 16 << 20);
    assert!(
        got[..6 << 20] == data[..] && got[6 << 20..].iter().all(|&b| b == 0),
        "CLI restore differs"
    );

    let (ok, text) = cli(&["verify", &store]);
    assert!(ok && text.contains("ok "), "{text}");
    // Damage one chunk of the store: verify names the damaged snapshot(s) and fails.
    let chunks = bed.store().await.list("chunks/").await.unwrap();
    let victim = bed.dir.join("store").join(&chunks[0].key);
    let mut bytes = std::fs::read(&victim).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let (ok, text) = cli(&["verify", &store]);
    assert!(
        !ok && text.contains("DAMAGED"),
        "corruption not reported:\n{text}"
    );
    let (ok, text) = cli(&["verify", "snap-missing", &store]);
    assert!(!ok && text.contains("does not exist"), "{text}");

    // After deleting both manifests, gc removes every chunk.
    ctl.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot_id: s1.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    ctl.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot_id: s2.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Below the minimum grace: refused, with the reason.
    let (ok, text) = cli(&["gc", "--grace-seconds=0", &store]);
    assert!(!ok && text.contains("below the minimum"), "{text}");
    // At the minimum, waiting on the store's clock until the chunks are older than the grace.
    let (ok, text) = cli(&["gc", "--grace-seconds=10", "--settle-seconds=60", &store]);
    assert!(ok, "{text}");
    assert_eq!(chunk_count(&bed).await, 0, "{text}");
    let (ok, text) = cli(&["snapshot", "ls", "--store=relative/dir"]);
    assert!(!ok && text.contains("absolute"), "{text}");
}
