//! Fast snapshot restore on the two-zone test bed: a snapshot enabled in zone-b is pre-hydrated on
//! node-b, and a volume restored there is a clone of the image (no store fetch, usable at the first
//! CreateVolume answer) and byte-exact; in zone-a the restore is lazy and fetches. States move
//! enabling -> optimizing -> enabled and, on disable, the image goes. Unknown zones and snapshots
//! that are not ready get clear errors.

mod common;

use std::time::{Duration, Instant};

use common::*;
use strata::demo::pattern;
use strata::proto::csi as pb;
use strata::snapshot::fsr::{self, FsrState};
use strata::topology::ZONE_KEY;
use tonic::Code;

async fn wait_state(store: &strata::store::Store, snap: &str, zone: &str, want: Option<FsrState>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = fsr::list(store, Some(zone))
            .await
            .unwrap()
            .into_iter()
            .find(|r| r.snapshot_id == snap)
            .map(|r| r.state);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{snap} in {zone}: state {got:?}, waiting for {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn from_snapshot(name: &str, snap: &str, zone: &str) -> pb::CreateVolumeRequest {
    let mut r = create_req(name, 32 * MIB, block_cap());
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
    r
}

#[tokio::test]
async fn fast_restore_zone_gets_initialized_volumes_at_once() {
    let (pa, pb_) = (free_port(), free_port());
    let bed = TestBed::start_spec(BedSpec {
        nodes: vec![
            ("node-a".into(), Some("zone-a".into()), "127.0.0.1".into(), None),
            ("node-b".into(), Some("zone-b".into()), "127.0.0.1".into(), None),
        ],
        node_args: vec!["--fsr-interval-ms=200".into()],
        per_node_args: vec![
            vec![format!("--metrics-addr=127.0.0.1:{pa}")],
            vec![format!("--metrics-addr=127.0.0.1:{pb_}")],
        ],
        controller_extra: vec!["--fsr-interval-ms=200".into()],
        ..Default::default()
    })
    .await;
    let mut ctl = bed.controller().await;
    let mut r = create_req("src", 32 * MIB, block_cap());
    r.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: vec![topo(&[(ZONE_KEY, "zone-a")])],
        preferred: vec![],
    });
    let (id, _, tg) = attached_block_volume(&bed, &mut ctl, 0, r).await;
    let mut a = bed.node(0).await;
    let data = pattern(20 << 20, 8);
    std::fs::write(&tg, &data).unwrap();
    let snap = snapshot(&mut ctl, "fsr", &id).await.snapshot_id;
    let store_arg = format!("--store={}", bed.store_url);
    let store = bed.store().await;

    // Clear errors first: a zone without nodes, a snapshot that does not exist.
    let (ok, text) = cli(&["fsr", "enable", &snap, "--zone", "zone-x", &store_arg]);
    assert!(
        !ok && text.contains("no node is in zone \"zone-x\"") && text.contains("zone-a, zone-b"),
        "{text}"
    );
    let (ok, text) = cli(&["fsr", "enable", "snap-missing", "--zone", "zone-b", &store_arg]);
    assert!(!ok && text.contains("does not exist or is not ready"), "{text}");

    let (ok, text) = cli(&["fsr", "enable", &snap, "--zone", "zone-b", &store_arg]);
    assert!(ok && text.contains("enabling"), "{text}");
    wait_state(&store, &snap, "zone-b", Some(FsrState::Enabled)).await;
    let (ok, text) = cli(&["fsr", "status", &store_arg]);
    assert!(ok && text.contains("enabled") && text.contains("1/1"), "{text}");
    assert!(bed.nodes[1]
        .storage
        .join("fsr")
        .join(format!("{snap}.img"))
        .exists());

    // In zone-b: one CreateVolume call, no restore, no fetch, exact data.
    let v = create_volume(&mut ctl, from_snapshot("in-b", &snap, "zone-b")).await;
    let mut b = bed.node(1).await;
    let (st, tg) = bed.kubelet_paths("in-b");
    attach(&mut b, &v.volume_id, &st, &tg, block_cap()).await;
    let got = std::fs::read(&tg).unwrap();
    assert!(
        got[..20 << 20] == data[..] && got[20 << 20..].iter().all(|&x| x == 0),
        "fast-restored data differs"
    );
    let mb = http_get(pb_, "/metrics").await;
    assert!(
        !mb.contains("strata_restores_total{"),
        "node-b fetched a restore:\n{mb}"
    );
    assert!(
        mb.contains("strata_restore_fetched_bytes_total 0"),
        "node-b fetched chunks:\n{mb}"
    );

    // In zone-a: a lazy restore. The first CreateVolume answer is usable; the data arrives behind
    // it, and once unstaged the volume is retired onto its plain file (counted as a restore).
    let v = create_volume(&mut ctl, from_snapshot("in-a", &snap, "zone-a")).await;
    let (st, tg) = bed.kubelet_paths("in-a");
    attach(&mut a, &v.volume_id, &st, &tg, block_cap()).await;
    assert!(std::fs::read(&tg).unwrap()[..20 << 20] == data[..]);
    detach(&mut a, &v.volume_id, &st, &tg).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ma = http_get(pa, "/metrics").await;
        if ma.contains(r#"strata_restores_total{outcome="ok"} 1"#) {
            assert!(
                !ma.contains("strata_restore_fetched_bytes_total 0"),
                "node-a restored without fetching:\n{ma}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-a did not finish its restore:\n{ma}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Disable: the image goes, then the record.
    let (ok, text) = cli(&["fsr", "disable", &snap, "--zone", "zone-b", &store_arg]);
    assert!(ok && text.contains("disabling"), "{text}");
    wait_state(&store, &snap, "zone-b", None).await;
    assert!(!bed.nodes[1]
        .storage
        .join("fsr")
        .join(format!("{snap}.img"))
        .exists());

    // A snapshot class with fastRestoreZones: enabled once ready; an unknown zone is refused first.
    let with = |zones: &str, name: &str| pb::CreateSnapshotRequest {
        source_volume_id: id.clone(),
        name: name.into(),
        parameters: [("fastRestoreZones".to_string(), zones.to_string())].into(),
        ..Default::default()
    };
    let bad = ctl.create_snapshot(with("zone-a,zone-q", "fsr-bad")).await;
    assert_eq!(code(bad), Code::InvalidArgument);
    let snap2 = snapshot_with(&mut ctl, with("zone-a", "fsr-class"))
        .await
        .snapshot_id;
    wait_state(&store, &snap2, "zone-a", Some(FsrState::Enabled)).await;
    // Deleting the snapshot removes its fast-restore state and images.
    ctl.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot_id: snap2.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    wait_state(&store, &snap2, "zone-a", None).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while bed.nodes[0]
        .storage
        .join("fsr")
        .join(format!("{snap2}.img"))
        .exists()
    {
        assert!(Instant::now() < deadline, "image of a deleted snapshot kept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn committed_snapshot_is_ready_when_its_fast_restore_zone_lost_its_node() {
    let mut bed = TestBed::start_spec(BedSpec {
        nodes: vec![
            ("node-a".into(), Some("zone-a".into()), "127.0.0.1".into(), None),
            ("node-b".into(), Some("zone-b".into()), "127.0.0.1".into(), None),
        ],
        node_args: vec!["--fsr-interval-ms=200".into()],
        controller_extra: vec!["--fsr-interval-ms=200".into()],
        ..Default::default()
    })
    .await;
    let mut ctl = bed.controller().await;
    let store = bed.store().await;
    // node-b has published itself: zone-b has a live node when the snapshot is asked for.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fsr::zone_has_live_node(&store, "zone-b").await.unwrap() {
        assert!(Instant::now() < deadline, "node-b never published its record");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut r = create_req("src", 16 * MIB, block_cap());
    r.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: vec![topo(&[(ZONE_KEY, "zone-a")])],
        preferred: vec![],
    });
    let (id, _, tg) = attached_block_volume(&bed, &mut ctl, 0, r).await;
    let data = pattern(12 << 20, 3);
    std::fs::write(&tg, &data).unwrap();
    let with = |name: &str| pb::CreateSnapshotRequest {
        source_volume_id: id.clone(),
        name: name.into(),
        parameters: [("fastRestoreZones".to_string(), "zone-b".to_string())].into(),
        ..Default::default()
    };
    let first = retry_aborted!(ctl.create_snapshot(with("fsr-lost")))
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let snap = first.snapshot_id.clone();
    // zone-b's only node goes away for good, its record with it.
    bed.kill_node(1);
    store.delete("nodes/node-b").await.unwrap();
    assert!(!fsr::zone_has_live_node(&store, "zone-b").await.unwrap());
    // The snapshot was promised with zone-b: it becomes ready all the same, fast restore enabling.
    let s = snapshot_with(&mut ctl, with("fsr-lost")).await;
    assert_eq!(s.snapshot_id, snap);
    assert_eq!(s.creation_time, first.creation_time);
    wait_state(&store, &snap, "zone-b", Some(FsrState::Enabling)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_state(&store, &snap, "zone-b", Some(FsrState::Enabling)).await;
    // A new snapshot asking for the zone is still refused, and so is the CLI.
    assert_eq!(
        code(ctl.create_snapshot(with("fsr-new")).await),
        Code::InvalidArgument
    );
    let store_arg = format!("--store={}", bed.store_url);
    let (ok, text) = cli(&["fsr", "enable", &snap, "--zone", "zone-b", &store_arg]);
    assert!(!ok && text.contains("no node is in zone \"zone-b\""), "{text}");
    // A node of the zone is back: it makes the image, and the state moves on.
    bed.start_node(1, &["--fsr-interval-ms=200"]).await;
    wait_state(&store, &snap, "zone-b", Some(FsrState::Enabled)).await;
    assert!(bed.nodes[1]
        .storage
        .join("fsr")
        .join(format!("{snap}.img"))
        .exists());
}
