//! What the driver asks of the Kubernetes API: a node's zone label, and where the node agents are.

pub mod rollout;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};

use crate::topology::ZONE_KEY;

/// The zone label of `node`, or an empty string when it has none.
pub async fn zone_of_node(client: &kube::Client, node: &str) -> Result<String, kube::Error> {
    let n = Api::<Node>::all(client.clone()).get(node).await?;
    Ok(n.metadata
        .labels
        .unwrap_or_default()
        .get(ZONE_KEY)
        .cloned()
        .unwrap_or_default())
}

/// `node -> pod_ip:port` for the running pods of the node DaemonSet.
pub async fn discover_agents(
    client: &kube::Client,
    namespace: &str,
    selector: &str,
    port: u16,
) -> Result<BTreeMap<String, String>, kube::Error> {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(selector))
        .await?;
    Ok(agents_from_pods(&pods.items, port))
}

/// The pure part of discovery: running pods with a node and an IP, not being deleted. The port is
/// the pod's container port named `agent` (node groups may use different ones), else `port`.
pub fn agents_from_pods(pods: &[Pod], port: u16) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for p in pods {
        if p.metadata.deletion_timestamp.is_some() {
            continue; // an old pod of a rolling update: its successor takes over
        }
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
        let status = p.status.as_ref();
        let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
        let ip = status.and_then(|s| s.pod_ip.clone());
        let named = p
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|cp| cp.name.as_deref() == Some("agent"))
            .and_then(|cp| u16::try_from(cp.container_port).ok());
        if let (Some(node), Some(ip), true) = (node, ip, running) {
            let host = if ip.contains(':') { format!("[{ip}]") } else { ip };
            m.insert(node, format!("{host}:{}", named.unwrap_or(port)));
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_running_pods_with_ip_are_agents() {
        let pods: Vec<Pod> = serde_json::from_value(serde_json::json!([
            {"spec": {"nodeName": "n1", "containers": []}, "status": {"phase": "Running", "podIP": "10.0.0.1"}},
            {"spec": {"nodeName": "n2", "containers": []}, "status": {"phase": "Pending"}},
            {"spec": {"nodeName": "n3", "containers": []}, "status": {"phase": "Running", "podIP": "fd00::3"}},
            {"spec": {"nodeName": "n4", "containers": [{"name": "strata", "ports": [{"name": "agent", "containerPort": 7101}]}]},
             "status": {"phase": "Running", "podIP": "10.0.0.4"}},
            {"metadata": {"deletionTimestamp": "2026-12-03T10:00:00Z"},
             "spec": {"nodeName": "n5", "containers": []}, "status": {"phase": "Running", "podIP": "10.0.0.5"}}
        ]))
        .unwrap();
        let m = agents_from_pods(&pods, 7001);
        assert_eq!(m.get("n1").map(String::as_str), Some("10.0.0.1:7001"));
        assert!(!m.contains_key("n2"));
        assert_eq!(m.get("n3").map(String::as_str), Some("[fd00::3]:7001"));
        assert_eq!(
            m.get("n4").map(String::as_str),
            Some("10.0.0.4:7101"),
            "the pod's agent port"
        );
        assert!(!m.contains_key("n5"), "a pod being deleted is no agent");
    }
}
