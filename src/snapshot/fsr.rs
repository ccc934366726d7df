//! Fast snapshot restore (FSR): a snapshot enabled in a zone is pre-hydrated into a local image on
//! every node of that zone, so a volume restored there is a clone of the image, fully initialized
//! at once.
//!
//! State lives in the store, so every component and the CLI see the same thing:
//!
//! ```text
//! fsr/<zone>/<snap-id>   FsrRecord: enabling -> optimizing -> enabled; disabling (then removed)
//! nodes/<node>           NodeRecord: a node's zone, liveness and images, written by its agent
//! ```
//!
//! Agents hydrate what their zone enables and drop what it does not; the controller moves the
//! states on (enabling -> optimizing once the zone has live nodes, -> enabled once every live node
//! of the zone holds the image; disabling -> removed once none does).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::manifest::{self, ManifestError};
use super::upload::now_ms;
use crate::store::{Store, StoreError};
use crate::volume::record::{self, RecordError};

const FSR_KIND: &str = "fsr";
const NODE_KIND: &str = "node";

/// A node record older than this is of a node that is gone or down.
pub const NODE_TTL: Duration = Duration::from_secs(120);

/// EBS's fast-restore states ("disabled" is the absence of a record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsrState {
    /// Asked for; nodes start hydrating.
    Enabling,
    /// Nodes of the zone are hydrating.
    Optimizing,
    /// Every live node of the zone holds the image.
    Enabled,
    /// Being removed from the nodes.
    Disabling,
}

impl std::fmt::Display for FsrState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FsrState::Enabling => "enabling",
            FsrState::Optimizing => "optimizing",
            FsrState::Enabled => "enabled",
            FsrState::Disabling => "disabling",
        })
    }
}

/// Fast restore of one snapshot in one zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsrRecord {
    /// The snapshot.
    pub snapshot_id: String,
    /// The zone.
    pub zone: String,
    /// Where it stands.
    pub state: FsrState,
    /// When the state last changed.
    pub updated_unix_ms: i64,
}

/// A node's image of one snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageStatus {
    /// Fully hydrated.
    pub ready: bool,
    /// Chunks written so far.
    pub done: u64,
    /// Chunks in all.
    pub total: u64,
}

/// What an agent publishes about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node name.
    pub node: String,
    /// Its zone.
    pub zone: String,
    /// When written.
    pub updated_unix_ms: i64,
    /// Fast-restore images by snapshot id.
    pub images: BTreeMap<String, ImageStatus>,
}

impl NodeRecord {
    /// Written recently enough to count.
    pub fn live(&self) -> bool {
        now_ms() - self.updated_unix_ms < NODE_TTL.as_millis() as i64
    }
}

/// Errors of fast-restore operations.
#[derive(Debug, thiserror::Error)]
pub enum FsrError {
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record is damaged.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A manifest could not be read.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The snapshot is not committed (does not exist, or is still uploading).
    #[error("snapshot {0} does not exist or is not ready")]
    NotReady(String),
    /// No live node is in the zone.
    #[error("no node is in zone {zone:?} (known zones: {known})")]
    UnknownZone {
        /// The zone asked for.
        zone: String,
        /// Zones with live nodes.
        known: String,
    },
    /// A zone name that cannot be a key.
    #[error("invalid zone: {0}")]
    InvalidZone(String),
}

fn fsr_key(zone: &str, snapshot_id: &str) -> String {
    format!("fsr/{zone}/{snapshot_id}")
}

fn node_key(node: &str) -> String {
    format!("nodes/{node}")
}

async fn get_record<T: serde::de::DeserializeOwned>(
    store: &Store,
    key: &str,
    kind: &str,
) -> Result<Option<T>, FsrError> {
    match store.get(key).await {
        Ok(data) => Ok(Some(record::decode(Path::new(key), kind, &data)?)),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// All FSR records (of one zone, if given).
pub async fn list(store: &Store, zone: Option<&str>) -> Result<Vec<FsrRecord>, FsrError> {
    let prefix = match zone {
        Some(z) => format!("fsr/{z}/"),
        None => "fsr/".to_string(),
    };
    let mut out = Vec::new();
    for o in store.list(&prefix).await? {
        if let Some(r) = get_record::<FsrRecord>(store, &o.key, FSR_KIND).await? {
            out.push(r);
        }
    }
    Ok(out)
}

/// Writes (or replaces) a record.
pub async fn put(store: &Store, r: &FsrRecord) -> Result<(), FsrError> {
    store
        .put(
            &fsr_key(&r.zone, &r.snapshot_id),
            record::encode(FSR_KIND, r).into(),
        )
        .await?;
    Ok(())
}

/// Removes a record (the state becomes "disabled").
pub async fn remove(store: &Store, zone: &str, snapshot_id: &str) -> Result<(), FsrError> {
    store.delete(&fsr_key(zone, snapshot_id)).await?;
    Ok(())
}

/// Every node record.
pub async fn nodes(store: &Store) -> Result<Vec<NodeRecord>, FsrError> {
    let mut out = Vec::new();
    for o in store.list("nodes/").await? {
        if let Some(r) = get_record::<NodeRecord>(store, &o.key, NODE_KIND).await? {
            out.push(r);
        }
    }
    Ok(out)
}

/// Publishes a node record.
pub async fn put_node(store: &Store, r: &NodeRecord) -> Result<(), FsrError> {
    store
        .put(&node_key(&r.node), record::encode(NODE_KIND, r).into())
        .await?;
    Ok(())
}

/// Enables fast restore of a committed snapshot in a zone with live nodes. Idempotent. Strict: a
/// zone without a live node is refused ([`FsrError::UnknownZone`]), as a person typing a zone
/// name wants to hear about a typo.
pub async fn enable(store: &Store, snapshot_id: &str, zone: &str) -> Result<FsrRecord, FsrError> {
    crate::ids::check_id("zone", zone).map_err(FsrError::InvalidZone)?;
    if manifest::read_manifest(store, snapshot_id).await?.is_none() {
        return Err(FsrError::NotReady(snapshot_id.to_owned()));
    }
    if !zone_has_live_node(store, zone).await? {
        let live: Vec<NodeRecord> = nodes(store).await?.into_iter().filter(NodeRecord::live).collect();
        let mut known: Vec<String> = live.iter().map(|n| n.zone.clone()).collect();
        known.sort();
        known.dedup();
        return Err(FsrError::UnknownZone {
            zone: zone.to_owned(),
            known: known.join(", "),
        });
    }
    record_enabling(store, snapshot_id, zone).await
}

/// Enables fast restore of a committed snapshot in a zone whether or not a node of the zone is
/// live now: the record stays `enabling` until one is, and its agent then hydrates the image.
/// For a zone checked earlier (a snapshot class's zones, checked when the snapshot was taken),
/// whose nodes may have gone since. Idempotent.
pub async fn enable_unchecked(store: &Store, snapshot_id: &str, zone: &str) -> Result<FsrRecord, FsrError> {
    crate::ids::check_id("zone", zone).map_err(FsrError::InvalidZone)?;
    if manifest::read_manifest(store, snapshot_id).await?.is_none() {
        return Err(FsrError::NotReady(snapshot_id.to_owned()));
    }
    record_enabling(store, snapshot_id, zone).await
}

/// Whether a live node is in `zone`.
pub async fn zone_has_live_node(store: &Store, zone: &str) -> Result<bool, FsrError> {
    Ok(nodes(store).await?.iter().any(|n| n.live() && n.zone == zone))
}

/// The zone's record, written as `enabling` unless it is enabled already (or on its way).
async fn record_enabling(store: &Store, snapshot_id: &str, zone: &str) -> Result<FsrRecord, FsrError> {
    let key = fsr_key(zone, snapshot_id);
    match get_record::<FsrRecord>(store, &key, FSR_KIND).await? {
        Some(r) if r.state != FsrState::Disabling => Ok(r),
        _ => {
            let r = FsrRecord {
                snapshot_id: snapshot_id.to_owned(),
                zone: zone.to_owned(),
                state: FsrState::Enabling,
                updated_unix_ms: now_ms(),
            };
            put(store, &r).await?;
            Ok(r)
        }
    }
}

/// Disables fast restore in a zone; OK when it is not enabled.
pub async fn disable(store: &Store, snapshot_id: &str, zone: &str) -> Result<Option<FsrRecord>, FsrError> {
    crate::ids::check_id("zone", zone).map_err(FsrError::InvalidZone)?;
    match get_record::<FsrRecord>(store, &fsr_key(zone, snapshot_id), FSR_KIND).await? {
        Some(mut r) => {
            if r.state != FsrState::Disabling {
                r.state = FsrState::Disabling;
                r.updated_unix_ms = now_ms();
                put(store, &r).await?;
            }
            Ok(Some(r))
        }
        None => Ok(None),
    }
}

/// Moves every record one step on from what the live nodes report (run by the controller).
pub async fn advance(store: &Store) -> Result<(), FsrError> {
    let live: Vec<NodeRecord> = nodes(store).await?.into_iter().filter(NodeRecord::live).collect();
    for mut r in list(store, None).await? {
        let zone_nodes: Vec<&NodeRecord> = live.iter().filter(|n| n.zone == r.zone).collect();
        let holding = zone_nodes
            .iter()
            .filter(|n| n.images.contains_key(&r.snapshot_id))
            .count();
        let ready = zone_nodes
            .iter()
            .filter(|n| n.images.get(&r.snapshot_id).is_some_and(|i| i.ready))
            .count();
        let next = match r.state {
            FsrState::Enabling if !zone_nodes.is_empty() => Some(FsrState::Optimizing),
            FsrState::Optimizing if !zone_nodes.is_empty() && ready == zone_nodes.len() => {
                Some(FsrState::Enabled)
            }
            FsrState::Disabling if holding == 0 => {
                remove(store, &r.zone, &r.snapshot_id).await?;
                tracing::info!(snapshot.id = %r.snapshot_id, zone = %r.zone, "fast restore disabled");
                None
            }
            _ => None,
        };
        if let Some(state) = next {
            r.state = state;
            r.updated_unix_ms = now_ms();
            put(store, &r).await?;
            tracing::info!(snapshot.id = %r.snapshot_id, zone = %r.zone, %state, "fast restore");
        }
    }
    Ok(())
}
