//! CSI API behaviour of the controller and node services, over real gRPC on unix sockets against
//! real agent processes: the checks csi-sanity makes, plus topology across two zones.

mod common;

use common::*;
use strata::proto::csi as pb;
use strata::proto::csi::volume_capability::access_mode::Mode;
use strata::topology::{NODE_KEY, ZONE_KEY};
use tonic::Code;

const TWO_ZONES: &[(&str, &str)] = &[("node-a", "zone-a"), ("node-b", "zone-b")];

fn sorted(mut v: Vec<i32>) -> Vec<i32> {
    v.sort();
    v
}

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
    assert_eq!(
        sorted(services),
        sorted(vec![
            S::ControllerService as i32,
            S::VolumeAccessibilityConstraints as i32,
            S::GroupControllerService as i32,
        ]),
        "plugin service capabilities"
    );
    let expansion: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(pb::plugin_capability::Type::VolumeExpansion(e)) => Some(e.r#type),
            _ => None,
        })
        .collect();
    assert_eq!(
        expansion,
        vec![pb::plugin_capability::volume_expansion::Type::Online as i32]
    );
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
    // Exactly what the node implements (DESIGN.md §2): advertising more would make the CO call
    // what is not there, less would hide what is.
    assert_eq!(
        sorted(rpcs),
        sorted(vec![
            N::StageUnstageVolume as i32,
            N::ExpandVolume as i32,
            N::GetVolumeStats as i32,
            N::VolumeCondition as i32,
            N::SingleNodeMultiWriter as i32,
        ]),
        "node capabilities"
    );
    let mut ctl = bed.controller().await;
    let ccaps = ctl
        .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use pb::controller_service_capability::rpc::Type as C;
    let crpcs: Vec<i32> = ccaps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(pb::controller_service_capability::Type::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    assert_eq!(
        crpcs.len(),
        ccaps.capabilities.len(),
        "a capability without an RPC type"
    );
    assert_eq!(
        sorted(crpcs),
        sorted(vec![
            C::CreateDeleteVolume as i32,
            C::ListVolumes as i32,
            C::GetCapacity as i32,
            C::ExpandVolume as i32,
            C::GetVolume as i32,
            C::VolumeCondition as i32,
            C::SingleNodeMultiWriter as i32,
            C::CreateDeleteSnapshot as i32,
            C::ListSnapshots as i32,
            C::GetSnapshot as i32,
            C::CloneVolume as i32,
        ]),
        "controller capabilities"
    );
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
            Err(s) => {
                assert_eq!(s.code(), Code::Aborted, "unexpected: {s:?}");
                // The answer says which call holds the volume, so a user can tell.
                assert!(s.message().contains("CreateVolume"), "{}", s.message());
            }
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

/// Both access types, as csi-sanity runs them: (tag, capability with `mode`).
fn access_types(mode: Mode) -> [(&'static str, pb::VolumeCapability); 2] {
    [
        ("mount", mount_cap_mode("ext4", mode)),
        ("block", block_cap_mode(mode)),
    ]
}

fn stats_req(id: &str, path: &str) -> pb::NodeGetVolumeStatsRequest {
    pb::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    }
}

fn node_expand_req(id: &str, path: &str) -> pb::NodeExpandVolumeRequest {
    pb::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 32 * MIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

/// csi-sanity "should fail when the volume is attempted to be published to a second target path
/// with SINGLE_NODE_SINGLE_WRITER" (Kubernetes ReadWriteOncePod): FAILED_PRECONDITION. The node
/// keeps each publish's mode, so this holds across an agent restart, and a single-writer publish
/// also refuses a shared one beside it.
#[tokio::test]
async fn single_writer_volumes_publish_at_one_target_only() {
    let mut bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let mut ctl = bed.controller().await;
    for (tag, sw) in access_types(Mode::SingleNodeSingleWriter) {
        let shared = match tag {
            "mount" => mount_cap("ext4"),
            _ => block_cap(),
        };
        let v = create_volume(&mut ctl, create_req(&format!("rwop-{tag}"), 16 * MIB, sw.clone())).await;
        let id = v.volume_id;
        let (staging, t1) = bed.kubelet_paths(&format!("rwop-{tag}-1"));
        let t2 = bed.kubelet_paths(&format!("rwop-{tag}-2")).1;
        let t3 = bed.kubelet_paths(&format!("rwop-{tag}-3")).1;
        let mut node = bed.node(0).await;
        node.node_stage_volume(stage_req(&id, &staging, sw.clone()))
            .await
            .unwrap();
        let publish = |t: &std::path::Path, cap: &pb::VolumeCapability| {
            publish_req(&id, &staging, t, cap.clone(), false)
        };
        node.node_publish_volume(publish(&t1, &sw)).await.unwrap();
        // The same publish again is idempotent.
        node.node_publish_volume(publish(&t1, &sw)).await.unwrap();
        let second = node.node_publish_volume(publish(&t2, &sw)).await;
        assert_eq!(
            code(second),
            Code::FailedPrecondition,
            "{tag}: second single-writer publish"
        );
        assert!(sys_mount_absent(&t2), "{tag}: a refused publish left a mount");

        // The first publish's mode outlives the agent: a shared publish beside it is refused too.
        bed.kill_node(0);
        bed.start_node(0, &[]).await;
        let mut node = bed.node(0).await;
        let beside = node.node_publish_volume(publish(&t2, &shared)).await.unwrap_err();
        assert_eq!(beside.code(), Code::FailedPrecondition, "{tag}: {beside:?}");
        assert!(
            beside.message().contains("SINGLE_NODE_SINGLE_WRITER"),
            "{tag}: {}",
            beside.message()
        );

        // Once unpublished, another target may take it; shared publishes coexist, but a
        // single-writer one is refused beside them.
        node.node_unpublish_volume(unpublish_req(&id, &t1)).await.unwrap();
        node.node_publish_volume(publish(&t2, &sw)).await.unwrap();
        node.node_unpublish_volume(unpublish_req(&id, &t2)).await.unwrap();
        node.node_publish_volume(publish(&t1, &shared)).await.unwrap();
        node.node_publish_volume(publish(&t2, &shared)).await.unwrap();
        assert_eq!(
            code(node.node_publish_volume(publish(&t3, &sw)).await),
            Code::FailedPrecondition,
            "{tag}: single-writer publish beside shared ones"
        );
        for t in [&t1, &t2] {
            node.node_unpublish_volume(unpublish_req(&id, t)).await.unwrap();
        }
        node.node_unstage_volume(unstage_req(&id, &staging))
            .await
            .unwrap();
    }
}

fn sys_mount_absent(p: &std::path::Path) -> bool {
    strata::volume::sys::mount_at(p).is_none()
}

/// csi-sanity NodeGetVolumeStats "should fail when volume is not found" / "when volume does not
/// exist on the specified path" and NodeExpandVolume "should fail when volume is not found", all
/// with the relative path `some/path`: NOT_FOUND, as the reference driver answers. The volume is
/// looked up before the path is judged.
#[tokio::test]
async fn node_stats_and_expand_look_the_volume_up_before_the_path() {
    let bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let mut ctl = bed.controller().await;
    let mut node = bed.node(0).await;
    for id in ["id", "vol-unknown"] {
        let s = node.node_get_volume_stats(stats_req(id, "some/path")).await;
        assert_eq!(code(s), Code::NotFound, "stats of unknown {id}");
        let e = node.node_expand_volume(node_expand_req(id, "some/path")).await;
        assert_eq!(code(e), Code::NotFound, "expand of unknown {id}");
    }
    let mut targets = Vec::new();
    for (tag, cap) in access_types(Mode::SingleNodeWriter) {
        let v = create_volume(&mut ctl, create_req(&format!("st-{tag}"), 16 * MIB, cap.clone())).await;
        let (staging, target) = bed.kubelet_paths(&format!("st-{tag}"));
        attach(&mut node, &v.volume_id, &staging, &target, cap).await;
        targets.push((tag, v.volume_id, target));
    }
    for (tag, id, target) in &targets {
        let good = node
            .node_get_volume_stats(stats_req(id, &target.to_string_lossy()))
            .await
            .unwrap()
            .into_inner();
        assert!(good.usage[0].total > 0, "{tag}: {good:?}");
        let nowhere = bed.dir.join("nowhere").to_string_lossy().into_owned();
        let not_it = bed.dir.to_string_lossy().into_owned();
        for path in ["some/path", nowhere.as_str(), not_it.as_str()] {
            let s = node.node_get_volume_stats(stats_req(id, path)).await;
            assert_eq!(code(s), Code::NotFound, "{tag}: stats at {path}");
        }
        let e = node.node_expand_volume(node_expand_req(id, "some/path")).await;
        assert_eq!(code(e), Code::NotFound, "{tag}: expand at some/path");
        // A required field is still INVALID_ARGUMENT.
        let s = node.node_get_volume_stats(stats_req(id, "")).await;
        assert_eq!(code(s), Code::InvalidArgument, "{tag}: stats without a path");
        let e = node.node_expand_volume(node_expand_req(id, "")).await;
        assert_eq!(code(e), Code::InvalidArgument, "{tag}: expand without a path");
    }
    // Another volume's publish is not where this volume is, block devices included.
    let (_, mount_id, mount_target) = &targets[0];
    let (_, block_id, block_target) = &targets[1];
    for (id, other) in [(mount_id, block_target), (block_id, mount_target)] {
        let s = node
            .node_get_volume_stats(stats_req(id, &other.to_string_lossy()))
            .await;
        assert_eq!(code(s), Code::NotFound, "{id} at {}", other.display());
    }
}

/// GetSnapshot validates its id like every other RPC (INVALID_ARGUMENT, not NOT_FOUND), and no
/// answer echoes more of a caller's value than fits: gRPC carries the message in a header, and a
/// header over 8 KiB reaches the client as RESOURCE_EXHAUSTED instead of the answer.
#[tokio::test]
async fn ids_are_validated_and_echoed_input_is_bounded() {
    let bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let mut ctl = bed.controller().await;
    let mut node = bed.node(0).await;
    let huge = "x".repeat(10_000);
    let get = |id: &str| pb::GetSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    for id in ["../../../etc/passwd", huge.as_str()] {
        let e = ctl.get_snapshot(get(id)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "GetSnapshot {:.40}: {e:?}", id);
        assert!(
            e.message().len() < 512,
            "GetSnapshot echoed {} bytes",
            e.message().len()
        );
    }
    assert_eq!(
        code(ctl.get_snapshot(get("snap-does-not-exist")).await),
        Code::NotFound
    );
    // Values that reach a message elsewhere, each 10,000 characters (or escaped to more).
    let bounded = |what: &str, r: Result<(), tonic::Status>, want: Code| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), want, "{what}: {e:?}");
        assert!(
            e.message().len() < 512,
            "{what}: {} bytes of message",
            e.message().len()
        );
    };
    let mut r = create_req("p", 16 * MIB, mount_cap("ext4"));
    r.parameters.insert(huge.clone(), "v".into());
    bounded(
        "CreateVolume parameter",
        ctl.create_volume(r).await.map(drop),
        Code::InvalidArgument,
    );
    let (staging, _) = bed.kubelet_paths("echo");
    // A relative path of control characters, which are escaped in messages: 4,000 of them would
    // be 24,000 bytes.
    let control = "\u{1}".repeat(4000);
    for (tag, cap) in access_types(Mode::SingleNodeWriter) {
        let r = node
            .node_stage_volume(stage_req(&huge, &staging, cap.clone()))
            .await;
        bounded(
            &format!("NodeStageVolume id ({tag})"),
            r.map(drop),
            Code::InvalidArgument,
        );
        let r = node
            .node_stage_volume(stage_req("vol-x", std::path::Path::new(&control), cap))
            .await;
        bounded(
            &format!("NodeStageVolume path ({tag})"),
            r.map(drop),
            Code::InvalidArgument,
        );
    }
    let r = node
        .node_stage_volume(stage_req("vol-x", &staging, mount_cap(&huge)))
        .await;
    bounded("NodeStageVolume fsType", r.map(drop), Code::InvalidArgument);
    let r = ctl
        .list_volumes(pb::ListVolumesRequest {
            max_entries: 1,
            starting_token: huge.clone(),
        })
        .await;
    bounded("ListVolumes token", r.map(drop), Code::Aborted);
}

/// A request for 2^63 - 1 bytes cannot be rounded up to whole MiB within int64: OUT_OF_RANGE,
/// naming the size that was asked for (the round-up overflowed to 2^63 before).
#[tokio::test]
async fn sizes_near_the_int64_limit_are_out_of_range() {
    let bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let mut ctl = bed.controller().await;
    for (tag, cap) in access_types(Mode::SingleNodeWriter) {
        let e = ctl
            .create_volume(create_req(&format!("max-{tag}"), i64::MAX, cap.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{tag}: {e:?}");
        assert!(
            e.message().contains("9223372036854775807 bytes requested"),
            "{tag}: {}",
            e.message()
        );
        assert!(
            !e.message().contains("9223372036854775808"),
            "{tag}: {}",
            e.message()
        );
        // Expansion takes the same arithmetic.
        let v = create_volume(
            &mut ctl,
            create_req(&format!("grow-{tag}"), 16 * MIB, cap.clone()),
        )
        .await;
        let e = ctl
            .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: v.volume_id,
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: i64::MAX,
                    limit_bytes: 0,
                }),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{tag} expand: {e:?}");
    }
}
