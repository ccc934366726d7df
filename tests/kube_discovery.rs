//! The Kubernetes path without a cluster: a fake API server over real HTTP (reached through a
//! kubeconfig) serves Node objects with zone labels and the node DaemonSet's pods. Nodes started
//! without --zone must report the zone of their Node object; a controller with kube discovery must
//! find the agents by node name and place volumes by zone, calling them over mutual TLS at their
//! pod IPs.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Json;
use common::*;
use serde_json::{json, Value};
use strata::proto::csi as pb;
use strata::topology::{NODE_KEY, ZONE_KEY};

#[derive(Clone, Default)]
struct Fake {
    /// node -> (zone, pod IP)
    nodes: BTreeMap<String, (String, String)>,
    /// Label selectors the controller listed pods with.
    selectors: Arc<Mutex<Vec<String>>>,
}

async fn get_node(State(f): State<Fake>, Path(name): Path<String>) -> (StatusCode, Json<Value>) {
    match f.nodes.get(&name) {
        Some((zone, _)) => (
            StatusCode::OK,
            Json(json!({"apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}})),
        ),
        None => (
            StatusCode::NOT_FOUND,
            Json(
                json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound",
                        "code": 404, "message": format!("nodes \"{name}\" not found")}),
            ),
        ),
    }
}

async fn list_pods(State(f): State<Fake>, Query(q): Query<BTreeMap<String, String>>) -> Json<Value> {
    f.selectors
        .lock()
        .unwrap()
        .push(q.get("labelSelector").cloned().unwrap_or_default());
    let items: Vec<Value> = f
        .nodes
        .iter()
        .map(|(node, (_, ip))| {
            json!({"metadata": {"name": format!("strata-node-{node}"), "namespace": "strata"},
                   "spec": {"nodeName": node, "containers": []},
                   "status": {"phase": "Running", "podIP": ip}})
        })
        .collect();
    Json(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_from_node_label_and_agents_from_pods() {
    require_root();
    let fake = Fake {
        nodes: [
            (
                "node-a".to_string(),
                ("zone-a".to_string(), "127.0.0.2".to_string()),
            ),
            (
                "node-b".to_string(),
                ("zone-b".to_string(), "127.0.0.3".to_string()),
            ),
        ]
        .into(),
        selectors: Default::default(),
    };
    let app = axum::Router::new()
        .route("/api/v1/nodes/{name}", get(get_node))
        .route("/api/v1/namespaces/strata/pods", get(list_pods))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let kubeconfig =
        std::env::temp_dir().join(format!("strata-kubeconfig-{}", uuid::Uuid::new_v4().simple()));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{api}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n"
        ),
    )
    .unwrap();
    // Both agents on one port, on the loopback addresses the fake pods report as their IPs.
    let port = std::net::TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Over mutual TLS as the chart runs it: agents dialled at their pod IPs, their one certificate
    // naming strata-agent, not any address.
    let certs = tempfile::tempdir().unwrap();
    let bed = TestBed::start_spec(BedSpec {
        tls: Some(make_tls(certs.path())),
        nodes: vec![
            ("node-a".into(), None, "127.0.0.2".into(), Some(port)),
            ("node-b".into(), None, "127.0.0.3".into(), Some(port)),
        ],
        controller_args: Some(vec![
            "--agent-discovery=kube".into(),
            "--agent-namespace=strata".into(),
            format!("--agent-port={port}"),
        ]),
        env: vec![("KUBECONFIG".into(), kubeconfig.to_string_lossy().into())],
        ..Default::default()
    })
    .await;
    let _ = std::fs::remove_file(&kubeconfig);

    for (i, zone) in [(0, "zone-a"), (1, "zone-b")] {
        let info = bed
            .node(i)
            .await
            .node_get_info(pb::NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        let segs = info.accessible_topology.unwrap().segments;
        assert_eq!(
            segs.get(ZONE_KEY).map(String::as_str),
            Some(zone),
            "zone of {}",
            info.node_id
        );
    }

    let mut ctl = bed.controller().await;
    for (name, zone, node) in [("in-a", "zone-a", "node-a"), ("in-b", "zone-b", "node-b")] {
        let mut r = create_req(name, 64 * MIB, mount_cap("ext4"));
        r.accessibility_requirements = Some(pb::TopologyRequirement {
            requisite: vec![topo(&[(ZONE_KEY, zone)])],
            preferred: vec![],
        });
        let v = ctl.create_volume(r).await.unwrap().into_inner().volume.unwrap();
        assert_eq!(
            v.accessible_topology[0]
                .segments
                .get(NODE_KEY)
                .map(String::as_str),
            Some(node)
        );
        let i = if node == "node-a" { 0 } else { 1 };
        assert!(bed.nodes[i].storage.join("volumes").join(&v.volume_id).exists());
    }
    let selectors = fake.selectors.lock().unwrap().clone();
    assert!(
        !selectors.is_empty(),
        "the controller never listed the agent pods"
    );
    assert!(selectors
        .iter()
        .all(|s| s == "app.kubernetes.io/name=strata,app.kubernetes.io/component=node"));
}
