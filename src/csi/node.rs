//! CSI Node: stage, publish, stats and expansion of this node's volumes, for the kubelet.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::op_guard::OpGuard;
use super::status::invalid;
use super::validate;
use crate::hydrate::supervise::Hydrators;
use crate::proto::csi as pb;
use crate::proto::csi::node_server::Node;
use crate::proto::csi::node_service_capability::rpc::Type as Rpc;
use crate::telemetry::Metrics;
use crate::volume::VolumeManager;

/// The node service.
pub struct NodeService {
    /// This node's volumes.
    pub manager: Arc<VolumeManager>,
    /// Lazy restores: a hydrating volume is staged on its hydrator's file.
    pub hydrators: Arc<Hydrators>,
    /// Shared with the agent service.
    pub guard: OpGuard,
    /// The node's zone.
    pub zone: String,
    /// RPC metrics.
    pub metrics: Arc<Metrics>,
}

impl NodeService {
    async fn stage(&self, r: pb::NodeStageVolumeRequest) -> Result<pb::NodeStageVolumeResponse, Status> {
        let id = validate::volume_id(&r.volume_id)?;
        let staging = validate::path("staging_target_path", &r.staging_target_path)?;
        let (spec, _) = validate::stage_spec(r.volume_capability.as_ref())?;
        let _t = self.guard.acquire(id, "NodeStageVolume").await?;
        self.hydrators.prepare_stage(id).await?;
        self.manager.stage(id, &staging, &spec).await?;
        Ok(pb::NodeStageVolumeResponse {})
    }

    async fn unstage(
        &self,
        r: pb::NodeUnstageVolumeRequest,
    ) -> Result<pb::NodeUnstageVolumeResponse, Status> {
        let id = validate::volume_id(&r.volume_id)?;
        let staging = validate::path("staging_target_path", &r.staging_target_path)?;
        let _t = self.guard.acquire(id, "NodeUnstageVolume").await?;
        self.manager.unstage(id, &staging).await?;
        Ok(pb::NodeUnstageVolumeResponse {})
    }

    async fn publish(
        &self,
        r: pb::NodePublishVolumeRequest,
    ) -> Result<pb::NodePublishVolumeResponse, Status> {
        let id = validate::volume_id(&r.volume_id)?;
        let target = validate::path("target_path", &r.target_path)?;
        if r.staging_target_path.is_empty() {
            return Err(invalid(
                "staging_target_path is required: this driver stages volumes",
            ));
        }
        let staging = validate::path("staging_target_path", &r.staging_target_path)?;
        let (spec, reader_only) = validate::stage_spec(r.volume_capability.as_ref())?;
        let mode = validate::publish_mode(r.volume_capability.as_ref());
        let _t = self.guard.acquire(id, "NodePublishVolume").await?;
        let access = validate::access_of(&spec);
        self.manager
            .publish(id, &staging, &target, access, r.readonly || reader_only, mode)
            .await?;
        Ok(pb::NodePublishVolumeResponse {})
    }

    async fn unpublish(
        &self,
        r: pb::NodeUnpublishVolumeRequest,
    ) -> Result<pb::NodeUnpublishVolumeResponse, Status> {
        let id = validate::volume_id(&r.volume_id)?;
        let target = validate::path("target_path", &r.target_path)?;
        let _t = self.guard.acquire(id, "NodeUnpublishVolume").await?;
        self.manager.unpublish(id, &target).await?;
        Ok(pb::NodeUnpublishVolumeResponse {})
    }

    async fn stats(
        &self,
        r: pb::NodeGetVolumeStatsRequest,
    ) -> Result<pb::NodeGetVolumeStatsResponse, Status> {
        let id = validate::volume_id(&r.volume_id)?;
        if r.volume_path.is_empty() {
            return Err(invalid("volume_path is required"));
        }
        // The manager looks the volume up before it judges the path (NOT_FOUND for either).
        let s = self.manager.stats(id, std::path::Path::new(&r.volume_path))?;
        let mut usage = vec![pb::VolumeUsage {
            available: s.available_bytes.unwrap_or(0) as i64,
            total: s.total_bytes as i64,
            used: s.used_bytes.unwrap_or(0) as i64,
            unit: pb::volume_usage::Unit::Bytes as i32,
        }];
        if let Some((total, used, free)) = s.inodes {
            usage.push(pb::VolumeUsage {
                available: free as i64,
                total: total as i64,
                used: used as i64,
                unit: pb::volume_usage::Unit::Inodes as i32,
            });
        }
        Ok(pb::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(pb::VolumeCondition {
                abnormal: s.abnormal.is_some(),
                message: s.abnormal.unwrap_or_else(|| "volume is healthy".into()),
            }),
        })
    }

    async fn expand(&self, r: pb::NodeExpandVolumeRequest) -> Result<pb::NodeExpandVolumeResponse, Status> {
        let id = validate::volume_id(&r.volume_id)?;
        if r.volume_path.is_empty() {
            return Err(invalid("volume_path is required"));
        }
        if let Some(c) = &r.volume_capability {
            if let Some(p) = validate::capability_problem(c) {
                return Err(invalid(p));
            }
        }
        let _t = self.guard.acquire(id, "NodeExpandVolume").await?;
        // The manager looks the volume up before it judges the path (NOT_FOUND for either).
        let size = self
            .manager
            .node_expand(id, std::path::Path::new(&r.volume_path))
            .await?;
        Ok(pb::NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        })
    }
}

fn rpc_cap(t: Rpc) -> pb::NodeServiceCapability {
    pb::NodeServiceCapability {
        r#type: Some(pb::node_service_capability::Type::Rpc(
            pb::node_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        self.metrics
            .observe("NodeStageVolume", self.stage(req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn node_unstage_volume(
        &self,
        req: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        self.metrics
            .observe("NodeUnstageVolume", self.unstage(req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        self.metrics
            .observe("NodePublishVolume", self.publish(req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        self.metrics
            .observe("NodeUnpublishVolume", self.unpublish(req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        self.metrics
            .observe("NodeGetVolumeStats", self.stats(req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn node_expand_volume(
        &self,
        req: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        self.metrics
            .observe("NodeExpandVolume", self.expand(req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            Rpc::StageUnstageVolume,
            Rpc::ExpandVolume,
            Rpc::GetVolumeStats,
            Rpc::VolumeCondition,
            Rpc::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(rpc_cap)
        .collect();
        Ok(Response::new(pb::NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        let node = self.manager.node_name();
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: node.to_owned(),
            max_volumes_per_node: self.manager.max_volumes() as i64,
            accessible_topology: Some(pb::Topology {
                segments: crate::topology::segments(node, &self.zone).into_iter().collect(),
            }),
        }))
    }
}
