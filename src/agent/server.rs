//! The agent service on the node: the controller's hands on this node's volumes.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::op_guard::OpGuard;
use crate::proto::agent as pb;
use crate::proto::agent::agent_server::Agent;
use crate::volume::{Access, CreateSpec, VolumeManager, VolumeState};

/// Serves the agent API over a node's volume manager.
pub struct AgentService {
    /// The node's volumes.
    pub manager: Arc<VolumeManager>,
    /// Shared with the CSI node service, so agent and kubelet calls on one volume exclude each other.
    pub guard: OpGuard,
    /// The node's zone.
    pub zone: String,
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
    }
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
        let _t = self.guard.acquire(&r.volume_id)?;
        let spec = CreateSpec {
            id: r.volume_id,
            name: r.name,
            capacity_bytes: r.capacity_bytes as u64,
            access,
            fs_type: r.fs_type,
            parameters: r.parameters.into_iter().collect(),
        };
        let v = self.manager.create(&spec).await?;
        Ok(Response::new(volume_to_pb(&v, self.manager.node_name())))
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let id = req.into_inner().volume_id;
        id_ok(&id)?;
        let _t = self.guard.acquire(&id)?;
        self.manager.delete(&id).await?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn get_volume(&self, req: Request<pb::GetVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        let id = req.into_inner().volume_id;
        id_ok(&id)?;
        let v = self.manager.get(&id)?;
        Ok(Response::new(volume_to_pb(&v, self.manager.node_name())))
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
        let _t = self.guard.acquire(&r.volume_id)?;
        let (capacity, node_expansion_required) =
            self.manager.expand(&r.volume_id, r.capacity_bytes as u64).await?;
        Ok(Response::new(pb::ExpandVolumeResponse {
            capacity_bytes: capacity as i64,
            node_expansion_required,
        }))
    }
}
