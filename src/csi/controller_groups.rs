//! Controller group snapshots (CSI GroupController): crash-consistent snapshots of several
//! volumes, like EBS multi-volume snapshots of one instance. The volumes must be on one node,
//! whose agent freezes every mounted filesystem, clones every volume and thaws them all before
//! anything is uploaded; each member is then an ordinary snapshot (incremental, restorable,
//! listed) that also carries its group id.
//!
//! The group itself is a small record in the store, `groups/<group-id>.json`, written before the
//! capture so that Get and Delete find the members whatever happened after.

use serde::{Deserialize, Serialize};
use tonic::Status;

use super::controller::ControllerService;
use super::controller_snapshots::timestamp;
use super::status::invalid;
use super::validate;
use crate::controller::directory::from_agent;
use crate::controller::Error;
use crate::ids;
use crate::proto::agent as apb;
use crate::proto::csi as pb;
use crate::store::{Store, StoreError};

/// Manifest tag naming a member's group.
pub const TAG_GROUP: &str = "strata.io/group-snapshot-id";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct GroupRecord {
    group_snapshot_id: String,
    name: String,
    /// (volume id, snapshot id), sorted by volume.
    members: Vec<(String, String)>,
    created_unix_ms: i64,
}

fn group_key(id: &str) -> String {
    format!("groups/{id}.json")
}

/// The member snapshot id of `volume_id` in the group named `name`.
fn member_id(name: &str, volume_id: &str) -> String {
    ids::snapshot_id_for_name(&format!("group\u{0}{name}\u{0}{volume_id}"))
}

fn store_status(e: StoreError) -> Status {
    Status::new(super::status::store_code(&e), e.to_string())
}

async fn read_group(store: &Store, id: &str) -> Result<Option<GroupRecord>, Status> {
    match store.get(&group_key(id)).await {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Status::data_loss(format!("group record {id}: {e}"))),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(store_status(e)),
    }
}

/// How long CreateVolumeGroupSnapshot waits for its members' uploads (under the sidecar's 60 s).
const GROUP_READY_WAIT: std::time::Duration = std::time::Duration::from_secs(40);

impl ControllerService {
    fn group_response(&self, g: &GroupRecord, snapshots: Vec<pb::Snapshot>) -> pb::VolumeGroupSnapshot {
        let snapshots: Vec<pb::Snapshot> = snapshots
            .into_iter()
            .map(|mut s| {
                s.group_snapshot_id = g.group_snapshot_id.clone();
                s
            })
            .collect();
        pb::VolumeGroupSnapshot {
            group_snapshot_id: g.group_snapshot_id.clone(),
            ready_to_use: snapshots.iter().all(|s| s.ready_to_use),
            // One instant for all members: the capture.
            creation_time: snapshots
                .first()
                .and_then(|s| s.creation_time)
                .or(Some(timestamp(g.created_unix_ms))),
            snapshots,
        }
    }

    pub(super) async fn create_group_impl(
        &self,
        r: pb::CreateVolumeGroupSnapshotRequest,
    ) -> Result<pb::CreateVolumeGroupSnapshotResponse, Status> {
        if r.name.is_empty() {
            return Err(invalid("name is required"));
        }
        ids::check_name("name", &r.name).map_err(invalid)?;
        if r.source_volume_ids.is_empty() {
            return Err(invalid("source_volume_ids is required"));
        }
        let mut volumes = Vec::with_capacity(r.source_volume_ids.len());
        for v in &r.source_volume_ids {
            let v = validate::volume_id(v)?.to_owned();
            if volumes.contains(&v) {
                return Err(invalid(format!("volume {v} is listed twice")));
            }
            volumes.push(v);
        }
        volumes.sort();
        let store = self.store()?.clone();
        let gid = ids::group_snapshot_id_for_name(&r.name);
        let _ticket = self.guard.acquire(&gid, "CreateVolumeGroupSnapshot").await?;
        let record = match read_group(&store, &gid).await? {
            Some(g) => {
                let had: Vec<&String> = g.members.iter().map(|(v, _)| v).collect();
                if had != volumes.iter().collect::<Vec<_>>() {
                    return Err(Status::already_exists(format!(
                        "group snapshot name {:?} is taken by a group of other volumes",
                        r.name
                    )));
                }
                g
            }
            None => GroupRecord {
                group_snapshot_id: gid.clone(),
                name: r.name.clone(),
                members: volumes
                    .iter()
                    .map(|v| (v.clone(), member_id(&r.name, v)))
                    .collect(),
                created_unix_ms: crate::snapshot::upload::now_ms(),
            },
        };
        // Every member must be on one node: the freeze that makes the group consistent is local.
        let mut node: Option<String> = None;
        for v in &volumes {
            let (n, _) = self
                .directory
                .find_volume(v, |_| false)
                .await?
                .ok_or_else(|| Error::NotFound {
                    what: format!("volume {v}"),
                })?;
            match &node {
                Some(first) if *first != n => {
                    return Err(Status::failed_precondition(format!(
                        "volume {} is on node {first} and volume {v} on node {n}: a group snapshot \
                         is crash-consistent across the volumes of one node, as EBS multi-volume \
                         snapshots are across the volumes of one instance",
                        volumes[0]
                    )))
                }
                _ => node = Some(n),
            }
        }
        let node = node.expect("at least one volume");
        // The group snapshot class's secret (csi.storage.k8s.io/group-snapshotter-secret-name)
        // encrypts every member.
        let kek = crate::snapshot::crypto::Kek::from_secrets(&r.secrets, "group snapshotter secret")
            .map_err(|e| Status::new(super::status::key_code(&e), e.to_string()))?;
        store
            .put(
                &group_key(&gid),
                serde_json::to_vec(&record)
                    .expect("group record serializes")
                    .into(),
            )
            .await
            .map_err(store_status)?;
        let mut tags = r.parameters.clone();
        tags.insert(TAG_GROUP.into(), gid.clone());
        let mut c = self.directory.client_for(&node).await?;
        let request = apb::CreateGroupSnapshotRequest {
            name: r.name.clone(),
            members: record
                .members
                .iter()
                .map(|(v, s)| apb::GroupMember {
                    volume_id: v.clone(),
                    snapshot_id: s.clone(),
                })
                .collect(),
            tags,
            kek: kek.as_ref().map(|k| k.bytes().to_vec()).unwrap_or_default(),
        };
        // The snapshot-controller creates the members' VolumeSnapshotContents from the first
        // answer that carries them and never updates their readiness from later ones (seen with
        // v8.2.1 to v8.6.0): a group answered "not ready" leaves members unready for good. So the
        // members are answered only once all are committed. The capture (the point in time) is
        // done by the first call; until the uploads commit, within the sidecar's timeout, the
        // call waits, and past that it answers UNAVAILABLE with the progress, and the sidecar
        // calls again (the same capture, by name).
        let deadline = tokio::time::Instant::now() + GROUP_READY_WAIT;
        let statuses = loop {
            let statuses = c
                .create_group_snapshot(request.clone())
                .await
                .map_err(|s| from_agent(&node, s))?
                .into_inner()
                .snapshots;
            if statuses.iter().all(|s| s.ready) {
                break statuses;
            }
            if tokio::time::Instant::now() >= deadline {
                let done = statuses.iter().filter(|s| s.ready).count();
                return Err(Status::unavailable(format!(
                    "group snapshot {gid} is captured; its members are still uploading ({done} of {} \
                     committed); retry",
                    statuses.len()
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        };
        tracing::info!(group = %gid, node = %node, members = statuses.len(),
            ready = statuses.iter().all(|s| s.ready), "group snapshot");
        let snapshots = statuses
            .iter()
            .map(super::controller_snapshots::from_status)
            .collect();
        Ok(pb::CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(self.group_response(&record, snapshots)),
        })
    }

    pub(super) async fn get_group_impl(
        &self,
        r: pb::GetVolumeGroupSnapshotRequest,
    ) -> Result<pb::GetVolumeGroupSnapshotResponse, Status> {
        if r.group_snapshot_id.is_empty() {
            return Err(invalid("group_snapshot_id is required"));
        }
        ids::check_id("group_snapshot_id", &r.group_snapshot_id).map_err(invalid)?;
        let store = self.store()?.clone();
        let g = read_group(&store, &r.group_snapshot_id).await?.ok_or_else(|| {
            Status::not_found(format!("group snapshot {} does not exist", r.group_snapshot_id))
        })?;
        let mut snapshots = Vec::with_capacity(g.members.len());
        for (v, s) in &g.members {
            if !r.snapshot_ids.is_empty() && !r.snapshot_ids.contains(s) {
                return Err(invalid(format!(
                    "snapshot_ids do not match the group's members ({s} is one)"
                )));
            }
            snapshots.push(self.one(s).await?.ok_or_else(|| {
                Status::not_found(format!(
                    "member {s} (volume {v}) of group {} is gone",
                    g.group_snapshot_id
                ))
            })?);
        }
        Ok(pb::GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(self.group_response(&g, snapshots)),
        })
    }

    pub(super) async fn delete_group_impl(
        &self,
        r: pb::DeleteVolumeGroupSnapshotRequest,
    ) -> Result<pb::DeleteVolumeGroupSnapshotResponse, Status> {
        if r.group_snapshot_id.is_empty() {
            return Err(invalid("group_snapshot_id is required"));
        }
        ids::check_id("group_snapshot_id", &r.group_snapshot_id).map_err(invalid)?;
        for s in &r.snapshot_ids {
            ids::check_id("snapshot_ids", s).map_err(invalid)?;
        }
        let store = self.store()?.clone();
        let _ticket = self
            .guard
            .acquire(&r.group_snapshot_id, "DeleteVolumeGroupSnapshot")
            .await?;
        let mut members: Vec<String> = read_group(&store, &r.group_snapshot_id)
            .await?
            .map(|g| g.members.into_iter().map(|(_, s)| s).collect())
            .unwrap_or_default();
        for s in r.snapshot_ids {
            if !members.contains(&s) {
                members.push(s);
            }
        }
        for s in members {
            self.delete_snapshot_impl(pb::DeleteSnapshotRequest {
                snapshot_id: s,
                ..Default::default()
            })
            .await?;
        }
        // The record goes last: a failure above leaves it for the retry to find the members.
        store
            .delete(&group_key(&r.group_snapshot_id))
            .await
            .map_err(store_status)?;
        tracing::info!(group = %r.group_snapshot_id, "group snapshot deleted");
        Ok(pb::DeleteVolumeGroupSnapshotResponse {})
    }
}

#[tonic::async_trait]
impl pb::group_controller_server::GroupController for ControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _: tonic::Request<pb::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<tonic::Response<pb::GroupControllerGetCapabilitiesResponse>, Status> {
        use pb::group_controller_service_capability::{rpc::Type, Rpc, Type as Cap};
        Ok(tonic::Response::new(pb::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![pb::GroupControllerServiceCapability {
                r#type: Some(Cap::Rpc(Rpc {
                    r#type: Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                })),
            }],
        }))
    }

    async fn create_volume_group_snapshot(
        &self,
        req: tonic::Request<pb::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<tonic::Response<pb::CreateVolumeGroupSnapshotResponse>, Status> {
        self.metrics
            .observe(
                "CreateVolumeGroupSnapshot",
                self.create_group_impl(req.into_inner()),
            )
            .await
            .map(tonic::Response::new)
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: tonic::Request<pb::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<tonic::Response<pb::DeleteVolumeGroupSnapshotResponse>, Status> {
        self.metrics
            .observe(
                "DeleteVolumeGroupSnapshot",
                self.delete_group_impl(req.into_inner()),
            )
            .await
            .map(tonic::Response::new)
    }

    async fn get_volume_group_snapshot(
        &self,
        req: tonic::Request<pb::GetVolumeGroupSnapshotRequest>,
    ) -> Result<tonic::Response<pb::GetVolumeGroupSnapshotResponse>, Status> {
        self.metrics
            .observe("GetVolumeGroupSnapshot", self.get_group_impl(req.into_inner()))
            .await
            .map(tonic::Response::new)
    }
}
