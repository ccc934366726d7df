//! The agent service on the node: the controller's hands on this node's volumes.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::op_guard::OpGuard;
use crate::hydrate::supervise::Hydrators;
use crate::proto::agent as pb;
use crate::proto::agent::agent_server::Agent;
use crate::snapshot::crypto::Kek;
use crate::snapshot::node::{Member, NodeSnapshots};
use crate::volume::{Access, CreateSpec, VolumeManager, VolumeSource, VolumeState};

/// Serves the agent API over a node's volume manager.
pub struct AgentService {
    /// The node's volumes.
    pub manager: Arc<VolumeManager>,
    /// Shared with the CSI node service, so agent and kubelet calls on one volume exclude each other.
    pub guard: OpGuard,
    /// The node's zone.
    pub zone: String,
    /// Snapshot captures, uploads and fast-restore images.
    pub snapshots: Arc<NodeSnapshots>,
    /// Lazy restores.
    pub hydrators: Arc<Hydrators>,
}

/// Proto form of a volume state.
pub fn volume_to_pb(v: &VolumeState, node: &str) -> pb::Volume {
    pb::Volume {
        volume_id: v.record.id.clone(),
        name: v.record.name.clone(),
        capacity_bytes: v.record.capacity_bytes as i64,
        access_type: match v.record.access {
            Access::Mount => pb::AccessType::Mount as i32,
            Access::Block => pb::AccessType::Block as i32,
        },
        fs_type: v.record.fs_type.clone(),
        parameters: v.record.parameters.clone().into_iter().collect(),
        node_name: node.to_owned(),
        allocated_bytes: v.allocated_bytes as i64,
        created_unix_ms: v.record.created_unix_ms,
        device: v
            .device
            .as_ref()
            .map(|d| d.path().to_string_lossy().into_owned())
            .unwrap_or_default(),
        staging_path: v
            .staging_path
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
        published_paths: v
            .published
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect(),
        condition: Some(pb::VolumeCondition {
            abnormal: v.abnormal.is_some(),
            message: v.abnormal.clone().unwrap_or_else(|| "volume is healthy".into()),
        }),
        source_snapshot_id: v.record.source_snapshot_id.clone(),
        source_volume_id: v.record.source_volume_id.clone(),
        restoring: v.restoring.is_some(),
        restore_chunks_done: v.hydration.as_ref().map_or(0, |h| h.local_chunks),
        restore_chunks_total: v.hydration.as_ref().map_or(0, |h| h.total_chunks),
    }
}

impl AgentService {
    fn volume(&self, v: &VolumeState) -> pb::Volume {
        volume_to_pb(v, self.manager.node_name())
    }
}

/// The key-encryption key of a request: none when empty.
fn kek_of(bytes: &[u8]) -> Result<Option<Kek>, Status> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let b: [u8; 32] = bytes
        .try_into()
        .map_err(|_| Status::invalid_argument(format!("kek must be 32 bytes, not {}", bytes.len())))?;
    Ok(Some(Kek::from_bytes(b)))
}

fn id_ok(id: &str) -> Result<(), Status> {
    crate::ids::check_id("volume_id", id).map_err(Status::invalid_argument)
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn get_node_info(
        &self,
        _: Request<pb::GetNodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let (total, available) = self.manager.capacity()?;
        let node = self.manager.node_name();
        Ok(Response::new(pb::NodeInfo {
            node_name: node.to_owned(),
            zone: self.zone.clone(),
            segments: crate::topology::segments(node, &self.zone).into_iter().collect(),
            available_bytes: available as i64,
            total_bytes: total as i64,
            volume_count: self.manager.ids()?.len() as u32,
            max_volumes: self.manager.max_volumes(),
        }))
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        id_ok(&r.volume_id)?;
        if r.capacity_bytes <= 0 {
            return Err(Status::invalid_argument("capacity_bytes must be positive"));
        }
        let access = match pb::AccessType::try_from(r.access_type) {
            Ok(pb::AccessType::Mount) => Access::Mount,
            Ok(pb::AccessType::Block) => Access::Block,
            _ => return Err(Status::invalid_argument("access_type is required")),
        };
        let source = match (r.source_snapshot_id.as_str(), r.source_volume_id.as_str()) {
            ("", "") => VolumeSource::Empty,
            (snap, "") => {
                crate::ids::check_id("source_snapshot_id", snap).map_err(Status::invalid_argument)?;
                VolumeSource::Snapshot(snap.to_owned())
            }
            ("", vol) => {
                id_ok(vol)?;
                VolumeSource::Volume(vol.to_owned())
            }
            _ => return Err(Status::invalid_argument("at most one volume source")),
        };
        let _t = self.guard.acquire(&r.volume_id, "CreateVolume").await?;
        // A clone reads the source: no other operation may run on it meanwhile.
        let _src = match &source {
            VolumeSource::Volume(src) => Some(self.guard.acquire(src, "CreateVolume (a clone of it)").await?),
            _ => None,
        };
        let kek = kek_of(&r.kek)?;
        let image = match &source {
            VolumeSource::Snapshot(snap) => self.snapshots.fast_image(snap, kek.as_ref()).await?,
            _ => None,
        };
        // A new lazy restore takes its lease and manifest now; a repeated call finds the volume.
        let hydrate = match (&source, &image) {
            (VolumeSource::Snapshot(snap), None) if self.manager.get(&r.volume_id).is_err() => Some(
                self.snapshots
                    .hydrate_seed(&r.volume_id, snap, kek.as_ref())
                    .await?,
            ),
            _ => None,
        };
        let lease = hydrate.as_ref().map(|h| h.record.lease_id.clone());
        let spec = CreateSpec {
            id: r.volume_id.clone(),
            name: r.name,
            capacity_bytes: r.capacity_bytes as u64,
            access,
            fs_type: r.fs_type,
            parameters: r.parameters.into_iter().collect(),
            image,
            hydrate,
            source,
        };
        if spec.image.is_some() {
            tracing::info!(volume.id = %spec.id, "restoring by cloning the fast-restore image");
        }
        let v = match self.manager.create(&spec).await {
            Ok(v) => v,
            Err(e) => {
                if let Some(lease) = &lease {
                    self.snapshots.drop_lease(lease).await;
                }
                return Err(e.into());
            }
        };
        if v.restoring.is_some() {
            // Usable at once: the hydrator serves the data while it arrives.
            self.hydrators.ensure_running(&r.volume_id).await?;
            return Ok(Response::new(self.volume(&self.manager.get(&r.volume_id)?)));
        }
        Ok(Response::new(self.volume(&v)))
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let id = req.into_inner().volume_id;
        id_ok(&id)?;
        let _t = self.guard.acquire(&id, "DeleteVolume").await?;
        // A staged volume is refused before its hydrator is touched: it must keep serving.
        self.manager.check_detached(&id)?;
        let lease = self.hydrators.abandon(&id).await?;
        self.manager.delete(&id).await?;
        if let Some(lease) = lease {
            self.snapshots.drop_lease(&lease).await;
        }
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn get_volume(&self, req: Request<pb::GetVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        let id = req.into_inner().volume_id;
        id_ok(&id)?;
        let v = self.manager.get(&id)?;
        Ok(Response::new(self.volume(&v)))
    }

    async fn list_volumes(
        &self,
        _: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let node = self.manager.node_name();
        let volumes = self
            .manager
            .list()?
            .iter()
            .map(|v| volume_to_pb(v, node))
            .collect();
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn expand_volume(
        &self,
        req: Request<pb::ExpandVolumeRequest>,
    ) -> Result<Response<pb::ExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        id_ok(&r.volume_id)?;
        if r.capacity_bytes <= 0 {
            return Err(Status::invalid_argument("capacity_bytes must be positive"));
        }
        let _t = self.guard.acquire(&r.volume_id, "ExpandVolume").await?;
        let (capacity, node_expansion_required) =
            self.manager.expand(&r.volume_id, r.capacity_bytes as u64).await?;
        Ok(Response::new(pb::ExpandVolumeResponse {
            capacity_bytes: capacity as i64,
            node_expansion_required,
        }))
    }

    #[tracing::instrument(skip_all, fields(snapshot.id = %req.get_ref().snapshot_id, volume.id = %req.get_ref().volume_id))]
    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotStatus>, Status> {
        let r = req.into_inner();
        id_ok(&r.volume_id)?;
        crate::ids::check_id("snapshot_id", &r.snapshot_id).map_err(Status::invalid_argument)?;
        let _t = self.guard.acquire(&r.volume_id, "CreateSnapshot").await?;
        let status = self
            .snapshots
            .create(
                &r.volume_id,
                &r.snapshot_id,
                &r.name,
                r.tags.into_iter().collect(),
                kek_of(&r.kek)?.as_ref(),
            )
            .await?;
        Ok(Response::new(status))
    }

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().name))]
    async fn create_group_snapshot(
        &self,
        req: Request<pb::CreateGroupSnapshotRequest>,
    ) -> Result<Response<pb::CreateGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.members.is_empty() {
            return Err(Status::invalid_argument("a group needs at least one volume"));
        }
        let mut tickets = Vec::with_capacity(r.members.len());
        let mut members = Vec::with_capacity(r.members.len());
        for m in &r.members {
            id_ok(&m.volume_id)?;
            crate::ids::check_id("snapshot_id", &m.snapshot_id).map_err(Status::invalid_argument)?;
            if members.iter().any(|x: &Member| x.volume_id == m.volume_id) {
                return Err(Status::invalid_argument(format!(
                    "volume {} is listed twice",
                    m.volume_id
                )));
            }
            tickets.push(
                self.guard
                    .acquire(&m.volume_id, "CreateVolumeGroupSnapshot")
                    .await?,
            );
            members.push(Member {
                volume_id: m.volume_id.clone(),
                snapshot_id: m.snapshot_id.clone(),
                name: r.name.clone(),
            });
        }
        let snapshots = self
            .snapshots
            .create_group(&members, r.tags.into_iter().collect(), kek_of(&r.kek)?.as_ref())
            .await?;
        Ok(Response::new(pb::CreateGroupSnapshotResponse { snapshots }))
    }

    async fn list_pending_snapshots(
        &self,
        _: Request<pb::ListPendingSnapshotsRequest>,
    ) -> Result<Response<pb::ListPendingSnapshotsResponse>, Status> {
        Ok(Response::new(pb::ListPendingSnapshotsResponse {
            snapshots: self.snapshots.pending(),
        }))
    }

    #[tracing::instrument(skip_all, fields(snapshot.id = %req.get_ref().snapshot_id))]
    async fn abort_snapshot(
        &self,
        req: Request<pb::AbortSnapshotRequest>,
    ) -> Result<Response<pb::AbortSnapshotResponse>, Status> {
        let id = req.into_inner().snapshot_id;
        crate::ids::check_id("snapshot_id", &id).map_err(Status::invalid_argument)?;
        self.snapshots.abort(&id).await?;
        Ok(Response::new(pb::AbortSnapshotResponse {}))
    }
}
