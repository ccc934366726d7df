//! Group snapshots (CSI GroupController) on the two-node bed: two mounted volumes of one node are
//! captured at one instant while a writer keeps two counters in step across them (A, then B, each
//! synced); the restored members must show the counters at most one step apart, which separate
//! snapshots taken one after the other do not promise. Also: capabilities, codes, idempotency,
//! Get, restores of the members on another node, and Delete.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use strata::proto::csi as pb;
use strata::proto::csi::group_controller_client::GroupControllerClient;
use strata::topology::ZONE_KEY;
use tonic::transport::Channel;
use tonic::Code;

async fn group_client(bed: &TestBed) -> GroupControllerClient<Channel> {
    GroupControllerClient::new(
        strata::client::connect_unix(&bed.controller_socket)
            .await
            .unwrap(),
    )
}

fn in_zone(mut r: pb::CreateVolumeRequest, zone: &str) -> pb::CreateVolumeRequest {
    r.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: vec![topo(&[(ZONE_KEY, zone)])],
        preferred: vec![],
    });
    r
}

fn group_req(name: &str, volumes: &[&str]) -> pb::CreateVolumeGroupSnapshotRequest {
    pb::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: volumes.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    }
}

/// CreateVolumeGroupSnapshot, repeated (as the external-snapshotter does) until ready.
async fn group_until_ready(
    g: &mut GroupControllerClient<Channel>,
    req: pb::CreateVolumeGroupSnapshotRequest,
) -> pb::VolumeGroupSnapshot {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let gs = g
            .create_volume_group_snapshot(req.clone())
            .await
            .unwrap()
            .into_inner()
            .group_snapshot
            .unwrap();
        if gs.ready_to_use {
            return gs;
        }
        assert!(Instant::now() < deadline, "group never ready: {gs:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn read_counter(p: &Path) -> u64 {
    let f = std::fs::File::open(p).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 0).unwrap();
    u64::from_le_bytes(b)
}

#[tokio::test]
async fn group_snapshot_is_one_instant_across_volumes_of_a_node() {
    let bed = TestBed::start(&[("node-a", "zone-a"), ("node-b", "zone-b")]).await;
    let mut ctl = bed.controller().await;
    let mut g = group_client(&bed).await;

    // Capabilities: the plugin offers the group controller, which creates, deletes and gets.
    let caps = bed
        .controller_identity()
        .await
        .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(format!("{caps:?}").contains("GroupControllerService"), "{caps:?}");
    let gc = g
        .group_controller_get_capabilities(pb::GroupControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gc.capabilities.len(), 1, "{gc:?}");

    let mut vols = Vec::new();
    let mut mounts: Vec<PathBuf> = Vec::new();
    let mut a = bed.node(0).await;
    for name in ["db-data", "db-log"] {
        let id = create_volume(
            &mut ctl,
            in_zone(create_req(name, 64 * MIB, mount_cap("ext4")), "zone-a"),
        )
        .await
        .volume_id;
        let (st, tg) = bed.kubelet_paths(name);
        attach(&mut a, &id, &st, &tg, mount_cap("ext4")).await;
        std::fs::write(tg.join("counter"), 0u64.to_le_bytes()).unwrap();
        std::fs::write(
            tg.join("payload"),
            strata::demo::pattern(3 << 20, vols.len() as u64 + 1),
        )
        .unwrap();
        vols.push(id);
        mounts.push(tg);
    }
    let other = create_volume(
        &mut ctl,
        in_zone(create_req("elsewhere", 16 * MIB, block_cap()), "zone-b"),
    )
    .await
    .volume_id;

    // Clear errors before anything is captured.
    let c = |r: Result<tonic::Response<pb::CreateVolumeGroupSnapshotResponse>, tonic::Status>| match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    };
    assert_eq!(
        c(g.create_volume_group_snapshot(group_req("", &[&vols[0]])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        c(g.create_volume_group_snapshot(group_req("g", &[])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        c(
            g.create_volume_group_snapshot(group_req("g", &[&vols[0], &vols[0]]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        c(
            g.create_volume_group_snapshot(group_req("g", &[&vols[0], "vol-missing"]))
                .await
        ),
        Code::NotFound
    );
    let across = g
        .create_volume_group_snapshot(group_req("across", &[&vols[0], &other]))
        .await
        .unwrap_err();
    assert_eq!(across.code(), Code::FailedPrecondition, "{across:?}");
    assert!(across.message().contains("one node"), "{}", across.message());

    // A writer keeps the counters in step: A = i, then B = i, each synced.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, pa, pb_) = (stop.clone(), mounts[0].join("counter"), mounts[1].join("counter"));
        std::thread::spawn(move || {
            let fa = std::fs::OpenOptions::new().write(true).open(pa).unwrap();
            let fb = std::fs::OpenOptions::new().write(true).open(pb_).unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                fa.write_all_at(&i.to_le_bytes(), 0).unwrap();
                fa.sync_data().unwrap();
                fb.write_all_at(&i.to_le_bytes(), 0).unwrap();
                fb.sync_data().unwrap();
            }
            i
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let req = group_req("db-consistent", &[&vols[1], &vols[0]]);
    let gs = group_until_ready(&mut g, req.clone()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > 10, "the writer barely ran ({written} steps)");

    assert!(gs.group_snapshot_id.starts_with("group-"), "{gs:?}");
    assert_eq!(gs.snapshots.len(), 2);
    assert!(gs
        .snapshots
        .iter()
        .all(|s| s.group_snapshot_id == gs.group_snapshot_id && s.ready_to_use));
    assert_eq!(
        gs.snapshots[0].creation_time, gs.snapshots[1].creation_time,
        "one instant"
    );
    // Idempotent; the name is taken for other volumes.
    let again = group_until_ready(&mut g, req.clone()).await;
    assert_eq!(again.group_snapshot_id, gs.group_snapshot_id);
    assert_eq!(
        c(
            g.create_volume_group_snapshot(group_req("db-consistent", &[&vols[0]]))
                .await
        ),
        Code::AlreadyExists
    );
    let got = g
        .get_volume_group_snapshot(pb::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: gs.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(got.snapshots.len(), 2);
    assert!(got.ready_to_use);

    // Both members restored on the other node: the counters are at most one step apart (A first).
    let mut b = bed.node(1).await;
    let mut counters = Vec::new();
    for (i, vol) in vols.iter().enumerate() {
        let snap = gs.snapshots.iter().find(|s| &s.source_volume_id == vol).unwrap();
        let mut r = in_zone(
            create_req(&format!("restored-{i}"), 64 * MIB, mount_cap("ext4")),
            "zone-b",
        );
        r.volume_content_source = Some(pb::VolumeContentSource {
            r#type: Some(pb::volume_content_source::Type::Snapshot(
                pb::volume_content_source::SnapshotSource {
                    snapshot_id: snap.snapshot_id.clone(),
                },
            )),
        });
        let rid = create_volume(&mut ctl, r).await.volume_id;
        let (st, tg) = bed.kubelet_paths(&format!("restored-{i}"));
        attach(&mut b, &rid, &st, &tg, mount_cap("ext4")).await;
        assert!(
            std::fs::read(tg.join("payload")).unwrap() == strata::demo::pattern(3 << 20, i as u64 + 1),
            "payload of member {i} differs"
        );
        counters.push(read_counter(&tg.join("counter")));
    }
    let (ca, cb) = (counters[0], counters[1]);
    assert!(ca >= 1 && written >= ca, "counters {ca}, {cb} of {written}");
    assert!(cb == ca || cb + 1 == ca, "not one instant: A = {ca}, B = {cb}");

    // Delete: the members go with the group; a second delete is fine.
    g.delete_volume_group_snapshot(pb::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: gs.group_snapshot_id.clone(),
        snapshot_ids: gs.snapshots.iter().map(|s| s.snapshot_id.clone()).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    for s in &gs.snapshots {
        let l = ctl
            .list_snapshots(pb::ListSnapshotsRequest {
                snapshot_id: s.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            l.entries.is_empty(),
            "member {} survived its group",
            s.snapshot_id
        );
    }
    let gone = g
        .get_volume_group_snapshot(pb::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: gs.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    g.delete_volume_group_snapshot(pb::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: gs.group_snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
}
