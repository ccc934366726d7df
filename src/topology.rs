//! Topology keys this driver reports and honours.

use std::collections::BTreeMap;

/// The node a volume lives on.
pub const NODE_KEY: &str = "topology.strata.csi.dev/node";
/// The node's zone (the well-known Kubernetes label).
pub const ZONE_KEY: &str = "topology.kubernetes.io/zone";

/// The segments of a node.
pub fn segments(node: &str, zone: &str) -> BTreeMap<String, String> {
    let mut s = BTreeMap::new();
    s.insert(NODE_KEY.to_owned(), node.to_owned());
    if !zone.is_empty() {
        s.insert(ZONE_KEY.to_owned(), zone.to_owned());
    }
    s
}
