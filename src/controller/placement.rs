//! Choosing a node for a new volume from CSI accessibility requirements.
//!
//! CSI semantics: a `requisite` list constrains (the volume must be accessible from one of those
//! topologies); a `preferred` list orders (try the first, then the next). A topology matches a
//! node when every key/value of the topology equals the node's segment for that key.

use std::collections::{BTreeMap, HashMap};

use crate::proto::csi::{Topology, TopologyRequirement};

/// What placement knows about a node.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Node name.
    pub node: String,
    /// Its topology segments.
    pub segments: BTreeMap<String, String>,
    /// Bytes it can still give.
    pub available_bytes: u64,
    /// Volumes on it.
    pub volume_count: u32,
    /// Its limit.
    pub max_volumes: u32,
    /// It holds a fast-restore image of the snapshot being restored.
    pub has_image: bool,
}

/// True when `segments` satisfies every key of `topology`.
pub fn matches(topology: &HashMap<String, String>, segments: &BTreeMap<String, String>) -> bool {
    topology.iter().all(|(k, v)| segments.get(k) == Some(v))
}

/// True when a node is allowed by the requisite list (or there is none).
pub fn allowed(req: Option<&TopologyRequirement>, segments: &BTreeMap<String, String>) -> bool {
    match req {
        Some(r) if !r.requisite.is_empty() => r.requisite.iter().any(|t| matches(&t.segments, segments)),
        _ => true,
    }
}

/// Orders the allowed candidates that can hold `size` bytes: by the first preferred topology they
/// match, then by most free space. Returns why nothing fits when the result would be empty.
pub fn rank(
    req: Option<&TopologyRequirement>,
    candidates: &[Candidate],
    size: u64,
) -> Result<Vec<Candidate>, String> {
    let allowed_nodes: Vec<&Candidate> = candidates.iter().filter(|c| allowed(req, &c.segments)).collect();
    if allowed_nodes.is_empty() {
        return Err(format!(
            "no reachable node matches the requisite topology (known nodes: {})",
            candidates
                .iter()
                .map(|c| c.node.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let mut fitting: Vec<&Candidate> = allowed_nodes
        .iter()
        .copied()
        .filter(|c| c.available_bytes >= size && c.volume_count < c.max_volumes)
        .collect();
    if fitting.is_empty() {
        let best = allowed_nodes.iter().map(|c| c.available_bytes).max().unwrap_or(0);
        return Err(format!(
            "{size} bytes requested; the most any allowed node has free is {best} bytes"
        ));
    }
    let preferred: &[Topology] = req.map(|r| r.preferred.as_slice()).unwrap_or(&[]);
    let pref_rank = |c: &Candidate| {
        preferred
            .iter()
            .position(|t| matches(&t.segments, &c.segments))
            .unwrap_or(preferred.len())
    };
    fitting.sort_by(|a, b| {
        pref_rank(a)
            .cmp(&pref_rank(b))
            .then(b.has_image.cmp(&a.has_image))
            .then(b.available_bytes.cmp(&a.available_bytes))
            .then(a.node.cmp(&b.node))
    });
    Ok(fitting.into_iter().cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{NODE_KEY, ZONE_KEY};

    fn cand(node: &str, zone: &str, free: u64) -> Candidate {
        Candidate {
            node: node.into(),
            segments: [
                (NODE_KEY.to_string(), node.to_string()),
                (ZONE_KEY.to_string(), zone.to_string()),
            ]
            .into(),
            available_bytes: free,
            volume_count: 0,
            max_volumes: 10,
            has_image: false,
        }
    }

    fn topo(pairs: &[(&str, &str)]) -> Topology {
        Topology {
            segments: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn requisite_constrains_and_preferred_orders() {
        let c = vec![cand("a", "z1", 100), cand("b", "z2", 500), cand("c", "z2", 300)];
        let req = TopologyRequirement {
            requisite: vec![topo(&[(ZONE_KEY, "z2")])],
            preferred: vec![topo(&[(NODE_KEY, "c")])],
        };
        let r = rank(Some(&req), &c, 10).unwrap();
        assert_eq!(r.iter().map(|c| c.node.as_str()).collect::<Vec<_>>(), ["c", "b"]);
        // Without preference: most free first.
        let r = rank(None, &c, 10).unwrap();
        assert_eq!(r[0].node, "b");
    }

    #[test]
    fn among_equals_a_node_with_the_image_wins() {
        let mut c = vec![cand("a", "z1", 500), cand("b", "z1", 100)];
        c[1].has_image = true;
        assert_eq!(rank(None, &c, 10).unwrap()[0].node, "b");
    }

    #[test]
    fn nothing_fits_is_an_error() {
        let c = vec![cand("a", "z1", 100)];
        assert!(rank(None, &c, 1000).is_err());
        let req = TopologyRequirement {
            requisite: vec![topo(&[(ZONE_KEY, "nowhere")])],
            preferred: vec![],
        };
        assert!(rank(Some(&req), &c, 1).is_err());
    }
}
