//! CSI API behaviour of the controller and node services, over real gRPC on unix sockets against
//! real agent processes: the checks csi-sanity makes, plus topology across two zones.

mod common;

use common::*;
use strata::proto::csi as pb;
use strata::proto::csi::volume_capability::access_mode::Mode;
use strata::topology::{NODE_KEY, ZONE_KEY};
use tonic::Code;

const TWO_ZONES: &[(&str, &str)] = &[("node-a", "zone-a"), ("node-b", "zone-b")];

#[tokio::test]
async fn identity_and_capabilities() {
    let bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let mut id = bed.controller_identity().await;
    let info = id
        .get_plugin_info(pb::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "strata.csi.dev");
    assert!(!info.vendor_version.is_empty());
    let caps = id
        .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let services: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(pb::plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    use pb::plugin_capability::service::Type as S;
    assert!(services.contains(&(S::ControllerService as i32)));
    assert!(services.contains(&(S::VolumeAccessibilityConstraints as i32)));
    assert_eq!(
        id.probe(pb::ProbeRequest {}).await.unwrap().into_inner().ready,
        Some(true)
    );

    let mut node = bed.node(0).await;
    let ni = node
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ni.node_id, "node-a");
    assert!(ni.max_volumes_per_node > 0);
    let segs = ni.accessible_topology.unwrap().segments;
    assert_eq!(segs.get(NODE_KEY).map(String::as_str), Some("node-a"));
    assert_eq!(segs.get(ZONE_KEY).map(String::as_str), Some("zone-a"));
    let ncaps = node
        .node_get_capabilities(pb::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use pb::node_service_capability::rpc::Type as N;
    let rpcs: Vec<i32> = ncaps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(pb::node_service_capability::Type::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    for want in [
        N::StageUnstageVolume,
        N::ExpandVolume,
        N::GetVolumeStats,
        N::VolumeCondition,
    ] {
        assert!(rpcs.contains(&(want as i32)), "{want:?} not advertised");
    }
    let mut ctl = bed.controller().await;
    let ccaps = ctl
        .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(ccaps.capabilities.len() >= 6);
    // An RPC we do not advertise answers UNIMPLEMENTED.
    let r = ctl
        .controller_publish_volume(pb::ControllerPublishVolumeRequest::default())
        .await;
    assert_eq!(code(r), Code::Unimplemented);
}

#[tokio::test]
async fn create_validates_first() {
    let bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let mut ctl = bed.controller().await;
    // Missing name, missing capabilities, missing access mode / type, multi-node modes, bad fs,
    // unknown parameter, contradictory range.
    let mut r = create_req("", MIB * 64, mount_cap("ext4"));
    assert_eq!(code(ctl.create_volume(r.clone()).await), Code::InvalidArgument);
    r.name = "v".into();
    r.volume_capabilities.clear();
    assert_eq!(code(ctl.create_volume(r.clone()).await), Code::InvalidArgument);
    r.volume_capabilities = vec![pb::VolumeCapability {
        access_mode: None,
        ..mount_cap("ext4")
    }];
    assert_eq!(code(ctl.create_volume(r.clone()).await), Code::InvalidArgument);
    r.volume_capabilities = vec![pb::VolumeCapability {
        access_type: None,
        ..mount_cap("ext4")
    }];
    assert_eq!(code(ctl.create_volume(r.clone()).await), Code::InvalidArgument);
    for mode in [
        Mode::MultiNodeMultiWriter,
        Mode::MultiNodeReaderOnly,
        Mode::MultiNodeSingleWriter,
    ] {
        let r = create_req("v", MIB * 64, mount_cap_mode("ext4", mode));
        assert_eq!(
            code(ctl.create_volume(r).await),
            Code::InvalidArgument,
            "{mode:?} accepted"
        );
    }
    assert_eq!(
        code(
            ctl.create_volume(create_req("v", MIB * 64, mount_cap("vfat")))
                .await
        ),
        Code::InvalidArgument
    );
    let mut r = create_req("v", MIB * 64, mount_cap("ext4"));
    r.parameters.insert("fstpye".into(), "xfs".into());
    assert_eq!(code(ctl.create_volume(r).await), Code::InvalidArgument);
    let mut r = create_req("v", MIB * 64, mount_cap("ext4"));
    r.capacity_range = Some(pb::CapacityRange {
        required_bytes: MIB * 64,
        limit_bytes: MIB * 32,
    });
    assert_eq!(code(ctl.create_volume(r).await), Code::InvalidArgument);
    // A limit below the smallest volume we make is OUT_OF_RANGE.
    let mut r = create_req("v", 0, mount_cap("ext4"));
    r.capacity_range = Some(pb::CapacityRange {
        required_bytes: 0,
        limit_bytes: MIB,
    });
    assert_eq!(code(ctl.create_volume(r).await), Code::OutOfRange);
    // Nothing was created by any of these.
    let list = ctl
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.entries.is_empty());
}

#[tokio::test]
async fn create_is_idempotent_and_names_conflict_by_capacity() {
    let bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let mut ctl = bed.controller().await;
    let a = ctl
        .create_volume(create_req("pvc-1", MIB * 64, mount_cap("ext4")))
        .await
        .unwrap()
        .into_inner();
    let b = ctl
        .create_volume(create_req("pvc-1", MIB * 64, mount_cap("ext4")))
        .await
        .unwrap()
        .into_inner();
    let (a, b) = (a.volume.unwrap(), b.volume.unwrap());
    assert_eq!(a.volume_id, b.volume_id);
    assert_eq!(a.capacity_bytes, MIB * 64);
    assert!(a.volume_id.starts_with("vol-"));
    assert_eq!(
        code(
            ctl.create_volume(create_req("pvc-1", MIB * 128, mount_cap("ext4")))
                .await
        ),
        Code::AlreadyExists
    );
    assert_eq!(
        code(
            ctl.create_volume(create_req("pvc-1", MIB * 64, block_cap()))
                .await
        ),
        Code::AlreadyExists
    );
    // Deletes are idempotent, and unknown ids are fine to delete.
    for _ in 0..2 {
        ctl.delete_volume(pb::DeleteVolumeRequest {
            volume_id: a.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    ctl.delete_volume(pb::DeleteVolumeRequest {
        volume_id: "reallyfakevolumeid".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        code(
            ctl.delete_volume(pb::DeleteVolumeRequest {
                volume_id: String::new(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    let r = ctl
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: a.volume_id.clone(),
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
}

#[tokio::test]
async fn concurrent_creates_of_one_name_make_one_volume() {
    let bed = TestBed::start(&[("node-a", "zone-a"), ("node-b", "zone-b")]).await;
    let ctl = bed.controller().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = ctl.clone();
        tasks.push(tokio::spawn(async move {
            c.create_volume(create_req("race", MIB * 64, mount_cap("ext4")))
                .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) => assert_eq!(s.code(), Code::Aborted, "unexpected: {s:?}"),
        }
    }
    assert!(ok >= 1);
    let mut ctl = ctl;
    let list = ctl
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.entries.len(), 1, "one name must give one volume on one node");
}

#[tokio::test]
async fn topology_requisite_constrains_and_preferred_orders() {
    let bed = TestBed::start(TWO_ZONES).await;
    let mut ctl = bed.controller().await;
    let mut r = create_req("in-b", MIB * 64, mount_cap("ext4"));
    r.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: vec![topo(&[(ZONE_KEY, "zone-b")])],
        preferred: vec![],
    });
    let v = create_volume(&mut ctl, r).await;
    let seg = &v.accessible_topology[0].segments;
    assert_eq!(seg.get(NODE_KEY).map(String::as_str), Some("node-b"));
    assert_eq!(seg.get(ZONE_KEY).map(String::as_str), Some("zone-b"));
    // The backing file is really on node-b.
    assert!(bed.nodes[1]
        .storage
        .join("volumes")
        .join(&v.volume_id)
        .join("data.img")
        .exists());
    assert!(!bed.nodes[0].storage.join("volumes").join(&v.volume_id).exists());

    // Preferred picks among requisite, in order.
    for (name, pref) in [("pref-a", "node-a"), ("pref-b", "node-b")] {
        let mut r = create_req(name, MIB * 64, mount_cap("ext4"));
        r.accessibility_requirements = Some(pb::TopologyRequirement {
            requisite: vec![topo(&[(ZONE_KEY, "zone-a")]), topo(&[(ZONE_KEY, "zone-b")])],
            preferred: vec![topo(&[(NODE_KEY, pref)]), topo(&[(ZONE_KEY, "zone-a")])],
        });
        let v = create_volume(&mut ctl, r).await;
        assert_eq!(
            v.accessible_topology[0]
                .segments
                .get(NODE_KEY)
                .map(String::as_str),
            Some(pref)
        );
    }
    // A zone nobody is in, or a size nobody has: RESOURCE_EXHAUSTED.
    let mut r = create_req("nowhere", MIB * 64, mount_cap("ext4"));
    r.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: vec![topo(&[(ZONE_KEY, "zone-x")])],
        preferred: vec![],
    });
    assert_eq!(code(ctl.create_volume(r).await), Code::ResourceExhausted);
    let huge = create_req("huge", 1 << 60, mount_cap("ext4"));
    assert_eq!(code(ctl.create_volume(huge).await), Code::ResourceExhausted);
    // The node plugin of the other node does not hold the volume.
    let (staging, _) = bed.kubelet_paths("x");
    let mut node_a = bed.node(0).await;
    assert_eq!(
        code(
            node_a
                .node_stage_volume(stage_req(&v.volume_id, &staging, mount_cap("ext4")))
                .await
        ),
        Code::NotFound
    );
}

#[tokio::test]
async fn capacity_per_segment_and_volume_limit() {
    let bed = TestBed::start_with(TWO_ZONES, &["--max-volumes=2"]).await;
    let mut ctl = bed.controller().await;
    let cap_of = |t: Option<pb::Topology>| pb::GetCapacityRequest {
        volume_capabilities: vec![mount_cap("ext4")],
        accessible_topology: t,
        ..Default::default()
    };
    let all = ctl.get_capacity(cap_of(None)).await.unwrap().into_inner();
    let a = ctl
        .get_capacity(cap_of(Some(topo(&[(ZONE_KEY, "zone-a")]))))
        .await
        .unwrap()
        .into_inner();
    let none = ctl
        .get_capacity(cap_of(Some(topo(&[(ZONE_KEY, "zone-x")]))))
        .await
        .unwrap()
        .into_inner();
    assert!(a.available_capacity > 0);
    assert!(all.available_capacity >= a.available_capacity);
    assert_eq!(none.available_capacity, 0);
    // Creating a volume lowers the capacity by its (reserved) size.
    let mut r = create_req("c1", MIB * 512, mount_cap("ext4"));
    r.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: vec![topo(&[(NODE_KEY, "node-a")])],
        preferred: vec![],
    });
    ctl.create_volume(r).await.unwrap();
    let a2 = ctl
        .get_capacity(cap_of(Some(topo(&[(ZONE_KEY, "zone-a")]))))
        .await
        .unwrap()
        .into_inner();
    let dropped = a.available_capacity - a2.available_capacity;
    assert!(
        (MIB * 500..MIB * 600).contains(&dropped),
        "capacity dropped by {dropped}"
    );
    // Multi-node capabilities have no capacity.
    let mut multi = cap_of(None);
    multi.volume_capabilities = vec![mount_cap_mode("ext4", Mode::MultiNodeMultiWriter)];
    assert_eq!(
        ctl.get_capacity(multi)
            .await
            .unwrap()
            .into_inner()
            .available_capacity,
        0
    );
    // Volume count limit per node: a third volume pinned to node-a has nowhere to go.
    for name in ["c2", "c3"] {
        let mut r = create_req(name, MIB * 16, mount_cap("ext4"));
        r.accessibility_requirements = Some(pb::TopologyRequirement {
            requisite: vec![topo(&[(NODE_KEY, "node-a")])],
            preferred: vec![],
        });
        let c = code(ctl.create_volume(r).await);
        if name == "c3" {
            assert_eq!(c, Code::ResourceExhausted);
        } else {
            assert_eq!(c, Code::Ok);
        }
    }
}

#[tokio::test]
async fn list_volumes_pages_and_validate_capabilities() {
    let bed = TestBed::start(TWO_ZONES).await;
    let mut ctl = bed.controller().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let v = ctl
            .create_volume(create_req(&format!("l{i}"), MIB * 16, mount_cap("ext4")))
            .await
            .unwrap();
        ids.push(v.into_inner().volume.unwrap().volume_id);
    }
    ids.sort();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = ctl
            .list_volumes(pb::ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen, ids);
    let bad = ctl
        .list_volumes(pb::ListVolumesRequest {
            max_entries: 0,
            starting_token: "invalid-token".into(),
        })
        .await;
    assert_eq!(code(bad), Code::Aborted);
    let neg = ctl
        .list_volumes(pb::ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })
        .await;
    assert_eq!(code(neg), Code::InvalidArgument);

    let vreq = |id: &str, cap| pb::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: vec![cap],
        ..Default::default()
    };
    let ok = ctl
        .validate_volume_capabilities(vreq(&ids[0], mount_cap("ext4")))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    let multi = ctl
        .validate_volume_capabilities(vreq(&ids[0], mount_cap_mode("ext4", Mode::MultiNodeMultiWriter)))
        .await
        .unwrap()
        .into_inner();
    assert!(multi.confirmed.is_none() && !multi.message.is_empty());
    let missing = ctl
        .validate_volume_capabilities(vreq("vol-missing", mount_cap("ext4")))
        .await;
    assert_eq!(code(missing), Code::NotFound);
    let mut no_caps = vreq(&ids[0], mount_cap("ext4"));
    no_caps.volume_capabilities.clear();
    assert_eq!(
        code(ctl.validate_volume_capabilities(no_caps).await),
        Code::InvalidArgument
    );

    let got = ctl
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: ids[0].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let cond = got.status.unwrap().volume_condition.unwrap();
    assert!(!cond.abnormal);
}

#[tokio::test]
async fn node_calls_validate_and_know_missing_volumes() {
    let bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let mut node = bed.node(0).await;
    let (staging, target) = bed.kubelet_paths("v");
    let r = node
        .node_stage_volume(stage_req("", &staging, mount_cap("ext4")))
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    let mut no_cap = stage_req("vol-x", &staging, mount_cap("ext4"));
    no_cap.volume_capability = None;
    assert_eq!(code(node.node_stage_volume(no_cap).await), Code::InvalidArgument);
    let mut no_path = stage_req("vol-x", &staging, mount_cap("ext4"));
    no_path.staging_target_path.clear();
    assert_eq!(code(node.node_stage_volume(no_path).await), Code::InvalidArgument);
    assert_eq!(
        code(
            node.node_stage_volume(stage_req("vol-x", &staging, mount_cap("ext4")))
                .await
        ),
        Code::NotFound
    );
    let r = node
        .node_publish_volume(publish_req("vol-x", &staging, &target, mount_cap("ext4"), false))
        .await;
    assert_eq!(code(r), Code::NotFound);
    let mut no_staging = publish_req("vol-x", &staging, &target, mount_cap("ext4"), false);
    no_staging.staging_target_path.clear();
    assert_eq!(
        code(node.node_publish_volume(no_staging).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(node.node_unpublish_volume(unpublish_req("", &target)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(node.node_unstage_volume(unstage_req("vol-x", &staging)).await),
        Code::NotFound
    );
    let stats = node
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: "vol-x".into(),
            volume_path: target.to_string_lossy().into(),
            staging_target_path: String::new(),
        })
        .await;
    assert_eq!(code(stats), Code::NotFound);
}

#[tokio::test]
async fn hostile_ids_and_paths_touch_nothing() {
    let bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let mut node = bed.node(0).await;
    let mut ctl = bed.controller().await;
    let canary = bed.dir.join("canary");
    std::fs::create_dir_all(&canary).unwrap();
    std::fs::write(canary.join("keep"), b"x").unwrap();
    let (staging, target) = bed.kubelet_paths("h");
    let evil_ids = ["../../canary", "..", "a/b", "vol\0x", &"v".repeat(300)];
    for id in evil_ids {
        assert_eq!(
            code(
                node.node_stage_volume(stage_req(id, &staging, mount_cap("ext4")))
                    .await
            ),
            Code::InvalidArgument
        );
        assert_eq!(
            code(node.node_unpublish_volume(unpublish_req(id, &target)).await),
            Code::InvalidArgument
        );
        let d = ctl
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            })
            .await;
        assert_eq!(code(d), Code::InvalidArgument);
        let e = ctl
            .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: id.into(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: MIB * 100,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await;
        assert_eq!(code(e), Code::InvalidArgument);
    }
    let relative = stage_req("vol-x", std::path::Path::new("relative/path"), mount_cap("ext4"));
    assert_eq!(
        code(node.node_stage_volume(relative).await),
        Code::InvalidArgument
    );
    let dotdot = stage_req("vol-x", &bed.dir.join("a/../../etc"), mount_cap("ext4"));
    assert_eq!(code(node.node_stage_volume(dotdot).await), Code::InvalidArgument);
    let long_name = create_req(&"n".repeat(300), MIB * 16, mount_cap("ext4"));
    assert_eq!(code(ctl.create_volume(long_name).await), Code::InvalidArgument);
    assert!(canary.join("keep").exists());
    assert!(!staging.exists(), "a refused call created the staging path");
}

#[tokio::test]
async fn agent_refuses_calls_without_the_token() {
    use strata::proto::agent::agent_client::AgentClient;
    use strata::proto::agent::{GetNodeInfoRequest, ListVolumesRequest};
    let bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let url = format!("http://127.0.0.1:{}", bed.nodes[0].agent_port);
    let mut anon = AgentClient::connect(url.clone()).await.unwrap();
    assert_eq!(
        code(anon.get_node_info(GetNodeInfoRequest {}).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(anon.list_volumes(ListVolumesRequest {}).await),
        Code::Unauthenticated
    );
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut wrong = AgentClient::with_interceptor(channel, |mut req: tonic::Request<()>| {
        req.metadata_mut()
            .insert("authorization", "Bearer not-the-token-at-all!".parse().unwrap());
        Ok(req)
    });
    assert_eq!(
        code(wrong.get_node_info(GetNodeInfoRequest {}).await),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    let bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let secret = "S3CRET-VALUE-must-not-be-logged";
    let mut ctl = bed.controller().await;
    let mut node = bed.node(0).await;
    let mut r = create_req("sec", MIB * 16, mount_cap("ext4"));
    r.secrets.insert("key".into(), secret.into());
    let v = create_volume(&mut ctl, r).await;
    let (staging, target) = bed.kubelet_paths("sec");
    let mut s = stage_req(&v.volume_id, &staging, mount_cap("ext4"));
    s.secrets.insert("key".into(), secret.into());
    node.node_stage_volume(s).await.unwrap();
    let mut p = publish_req(&v.volume_id, &staging, &target, mount_cap("ext4"), false);
    p.secrets.insert("key".into(), secret.into());
    node.node_publish_volume(p).await.unwrap();
    // A failing call with secrets too (errors are logged).
    let mut bad = stage_req("vol-missing", &staging, mount_cap("ext4"));
    bad.secrets.insert("key".into(), secret.into());
    assert_eq!(code(node.node_stage_volume(bad).await), Code::NotFound);
    node.node_unpublish_volume(unpublish_req(&v.volume_id, &target))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_req(&v.volume_id, &staging))
        .await
        .unwrap();
    let mut d = pb::DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        ..Default::default()
    };
    d.secrets.insert("key".into(), secret.into());
    ctl.delete_volume(d).await.unwrap();
    let logs = bed.logs();
    assert!(logs.contains("volume staged"), "debug logs were not captured");
    assert!(!logs.contains(secret), "a secret reached the logs");
    assert!(!logs.contains(TOKEN), "the agent token reached the logs");
}

#[tokio::test]
async fn metrics_count_rpcs_by_method_and_code() {
    let port = free_port();
    let bed = TestBed::start_spec(BedSpec {
        nodes: vec![("node-a".into(), Some("zone-a".into()), "127.0.0.1".into(), None)],
        node_args: vec![format!("--metrics-addr=127.0.0.1:{port}")],
        ..Default::default()
    })
    .await;
    let mut node = bed.node(0).await;
    let (staging, _) = bed.kubelet_paths("m");
    for _ in 0..3 {
        let r = node
            .node_stage_volume(stage_req("vol-missing", &staging, mount_cap("ext4")))
            .await;
        assert_eq!(code(r), Code::NotFound);
    }
    let get = |path: &'static str| http_get(port, path);
    // A committed snapshot is counted.
    let mut ctl = bed.controller().await;
    let v = create_volume(&mut ctl, create_req("mv", 8 * MIB, block_cap())).await;
    let (st, tg) = bed.kubelet_paths("mv");
    attach(&mut node, &v.volume_id, &st, &tg, block_cap()).await;
    std::fs::write(&tg, strata::demo::pattern(2 << 20, 5)).unwrap();
    snapshot(&mut ctl, "ms", &v.volume_id).await;
    assert!(get("/healthz").await.contains("200 OK"));
    let m = get("/metrics").await;
    assert!(
        m.contains(r#"strata_csi_requests_total{method="NodeStageVolume",code="NotFound"} 3"#),
        "metrics were:\n{m}"
    );
    assert!(m.contains("strata_csi_request_seconds_bucket"));
    assert!(
        m.contains(r#"strata_snapshots_total{outcome="committed"} 1"#),
        "metrics were:\n{m}"
    );
    assert!(
        m.contains(r#"strata_snapshot_chunks_total{outcome="new"} 2"#),
        "metrics were:\n{m}"
    );
    assert!(
        m.contains("strata_snapshot_uploaded_bytes_total 2"),
        "metrics were:\n{m}"
    );
    assert!(m.contains("strata_store_retries_total"));
}
