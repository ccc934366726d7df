//! CSI Identity: who we are and what we serve.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::proto::csi as pb;
use crate::proto::csi::identity_server::Identity;
use crate::proto::csi::plugin_capability::{self, service, volume_expansion};

/// Identity for the controller or the node process.
pub struct IdentityService {
    /// True in the controller process (advertises CONTROLLER_SERVICE).
    pub controller: bool,
    /// Readiness check: the controller asks nothing, the node checks its storage directory.
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
}

fn service_cap(t: service::Type) -> pb::PluginCapability {
    pb::PluginCapability {
        r#type: Some(plugin_capability::Type::Service(plugin_capability::Service {
            r#type: t as i32,
        })),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: super::DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: [(
                "component".to_string(),
                if self.controller { "controller" } else { "node" }.to_string(),
            )]
            .into(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        let mut capabilities = vec![service_cap(service::Type::VolumeAccessibilityConstraints)];
        if self.controller {
            capabilities.push(service_cap(service::Type::ControllerService));
            capabilities.push(service_cap(service::Type::GroupControllerService));
        }
        capabilities.push(pb::PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(
                plugin_capability::VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                },
            )),
        });
        Ok(Response::new(pb::GetPluginCapabilitiesResponse { capabilities }))
    }

    async fn probe(&self, _: Request<pb::ProbeRequest>) -> Result<Response<pb::ProbeResponse>, Status> {
        let ready = (self.ready)();
        if !ready {
            return Err(Status::failed_precondition("not ready"));
        }
        Ok(Response::new(pb::ProbeResponse { ready: Some(true) }))
    }
}
