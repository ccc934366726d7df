//! CSI Controller: placement and lifecycle of volumes, delegated to the agent on the chosen node.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::op_guard::OpGuard;
use super::status::{invalid, key_code};
use super::validate;
use crate::controller::directory::{from_agent, Directory};
use crate::controller::placement::{self, Candidate};
use crate::controller::Error;
use crate::ids;
use crate::proto::agent as apb;
use crate::proto::csi as pb;
use crate::proto::csi::controller_server::Controller;
use crate::proto::csi::controller_service_capability::rpc::Type as Rpc;
use crate::proto::csi::volume_capability::AccessType;
use crate::telemetry::Metrics;

/// Size of a volume created without a capacity range.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Sizes are rounded up to this.
pub const ALIGN: u64 = 1 << 20;
/// Largest size: CSI sizes are int64, and sizes are whole multiples of [`ALIGN`].
pub const MAX_SIZE: u64 = (i64::MAX as u64) / ALIGN * ALIGN;
/// Smallest volume; xfs refuses filesystems under 300 MiB.
fn min_size(fs_type: &str) -> u64 {
    if fs_type == "xfs" {
        300 << 20
    } else {
        16 << 20
    }
}

/// StorageClass parameter naming the filesystem.
pub const PARAM_FS_TYPE: &str = "fsType";
/// Parameters the external sidecars add (prefix); accepted and stored.
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

/// The controller service.
pub struct ControllerService {
    /// Agents and where volumes are.
    pub directory: Arc<Directory>,
    /// One operation per volume id at a time.
    pub guard: OpGuard,
    /// RPC metrics.
    pub metrics: Arc<Metrics>,
    /// Where snapshots live; snapshot RPCs answer FAILED_PRECONDITION without one.
    pub store: Option<crate::store::Store>,
    /// Summaries of committed snapshots read so far (manifests without their chunk lists).
    pub manifests: super::summaries::Summaries,
    /// Wakes the garbage collector after a delete.
    pub gc_kick: Arc<tokio::sync::Notify>,
}

/// Where a new volume's data comes from, resolved.
enum Source {
    Empty,
    Snapshot(crate::proto::store::Manifest),
    /// Source volume and the node holding it.
    Volume(apb::Volume, String),
}

/// Applies a CSI capacity range: the size to create, or why none fits.
pub fn pick_size(range: Option<&pb::CapacityRange>, fs_type: &str) -> Result<u64, Error> {
    let (required, limit) = range.map(|r| (r.required_bytes, r.limit_bytes)).unwrap_or((0, 0));
    if required < 0 || limit < 0 {
        return Err(Error::InvalidArgument {
            reason: "capacity_range bytes must not be negative".into(),
        });
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit > 0 && limit < required {
        return Err(Error::InvalidArgument {
            reason: format!("limit_bytes {limit} is smaller than required_bytes {required}"),
        });
    }
    let min = min_size(fs_type);
    let base = if required > 0 {
        required
    } else if limit > 0 {
        limit.min(DEFAULT_SIZE)
    } else {
        DEFAULT_SIZE
    };
    let wanted = base.max(min);
    // Checked: near 2^63 the round-up overflows what CSI's int64 sizes carry.
    let rounded = wanted.checked_next_multiple_of(ALIGN).filter(|s| *s <= MAX_SIZE);
    match rounded {
        Some(size) if limit == 0 || size <= limit => Ok(size),
        // Rounding went past the limit: the largest 4 KiB multiple within it still serves.
        _ if limit > 0 => {
            let size = limit / 4096 * 4096;
            if limit < min {
                return Err(Error::OutOfRange {
                    reason: format!(
                        "limit_bytes {limit} is below the smallest volume this driver makes ({min} bytes)"
                    ),
                });
            }
            if size < required.max(min) {
                return Err(Error::OutOfRange {
                    reason: format!(
                        "required_bytes {required} and limit_bytes {limit} leave no size this driver \
                         makes (a multiple of 4096 bytes)"
                    ),
                });
            }
            Ok(size)
        }
        _ => Err(Error::OutOfRange {
            reason: format!(
                "{wanted} bytes requested; the largest volume this driver makes is {MAX_SIZE} bytes \
                 (whole MiB within int64)"
            ),
        }),
    }
}

/// Access type and filesystem asked for by a create: mount wins when any capability mounts.
fn access_and_fs(
    caps: &[pb::VolumeCapability],
    params: &HashMap<String, String>,
) -> Result<(apb::AccessType, String), Error> {
    let param_fs = params
        .get(PARAM_FS_TYPE)
        .or_else(|| params.get("csi.storage.k8s.io/fstype"))
        .cloned();
    let mut mount = false;
    let mut cap_fs: Option<String> = None;
    for c in caps {
        if let Some(AccessType::Mount(m)) = &c.access_type {
            mount = true;
            if !m.fs_type.is_empty() {
                if cap_fs.as_ref().is_some_and(|f| f != &m.fs_type) {
                    return Err(Error::InvalidArgument {
                        reason: "capabilities ask for different filesystems".into(),
                    });
                }
                cap_fs = Some(m.fs_type.clone());
            }
        }
    }
    if let (Some(c), Some(p)) = (&cap_fs, &param_fs) {
        if c != p {
            return Err(Error::InvalidArgument {
                reason: format!(
                    "capability fsType {} contradicts parameter fsType {}",
                    ids::echo(c),
                    ids::echo(p)
                ),
            });
        }
    }
    let fs = cap_fs.or(param_fs).unwrap_or_else(|| "ext4".into());
    if !crate::volume::SUPPORTED_FS.contains(&fs.as_str()) {
        return Err(Error::InvalidArgument {
            reason: format!(
                "fsType {} is not supported (supported: {})",
                ids::echo(&fs),
                crate::volume::SUPPORTED_FS.join(", ")
            ),
        });
    }
    Ok(if mount {
        (apb::AccessType::Mount, fs)
    } else {
        (apb::AccessType::Block, String::new())
    })
}

/// Refuses parameters we do not know: a typo in a StorageClass should fail loudly, not be ignored.
fn check_params(params: &HashMap<String, String>) -> Result<(), Error> {
    for k in params.keys() {
        if k != PARAM_FS_TYPE && !k.starts_with(SIDECAR_PREFIX) {
            return Err(Error::InvalidArgument {
                reason: format!(
                    "unknown parameter {} (known: {PARAM_FS_TYPE}, {SIDECAR_PREFIX}*)",
                    ids::echo(k)
                ),
            });
        }
    }
    Ok(())
}

fn csi_volume(v: &apb::Volume, segments: HashMap<String, String>) -> pb::Volume {
    use pb::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let content_source = if !v.source_snapshot_id.is_empty() {
        Some(Type::Snapshot(SnapshotSource {
            snapshot_id: v.source_snapshot_id.clone(),
        }))
    } else if !v.source_volume_id.is_empty() {
        Some(Type::Volume(VolumeSource {
            volume_id: v.source_volume_id.clone(),
        }))
    } else {
        None
    };
    pb::Volume {
        capacity_bytes: v.capacity_bytes,
        volume_id: v.volume_id.clone(),
        volume_context: [("strata.csi.dev/node".to_string(), v.node_name.clone())].into(),
        content_source: content_source.map(|t| pb::VolumeContentSource { r#type: Some(t) }),
        accessible_topology: vec![pb::Topology { segments }],
    }
}

fn condition(v: &apb::Volume) -> Option<pb::VolumeCondition> {
    v.condition.as_ref().map(|c| pb::VolumeCondition {
        abnormal: c.abnormal,
        message: c.message.clone(),
    })
}

fn published_nodes(v: &apb::Volume) -> Vec<String> {
    if v.published_paths.is_empty() {
        Vec::new()
    } else {
        vec![v.node_name.clone()]
    }
}

impl ControllerService {
    fn segments_of(&self, node: &str) -> HashMap<String, String> {
        match self.directory.last_info(node) {
            Some(i) => i.segments,
            None => crate::topology::segments(node, "").into_iter().collect(),
        }
    }

    async fn find(&self, volume_id: &str) -> Result<(String, apb::Volume), Error> {
        self.directory
            .find_volume(volume_id, |_| false)
            .await?
            .ok_or_else(|| Error::NotFound {
                what: format!("volume {volume_id}"),
            })
    }

    async fn create(&self, r: pb::CreateVolumeRequest) -> Result<pb::CreateVolumeResponse, Status> {
        if r.name.is_empty() {
            return Err(invalid("name is required"));
        }
        ids::check_name("name", &r.name).map_err(invalid)?;
        validate::capabilities(&r.volume_capabilities)?;
        check_params(&r.parameters)?;
        let source = self.resolve_source(r.volume_content_source.as_ref()).await?;
        let (access, mut fs_type) = access_and_fs(&r.volume_capabilities, &r.parameters)?;
        let fs_explicit = r.parameters.contains_key(PARAM_FS_TYPE)
            || r.volume_capabilities
                .iter()
                .any(|c| matches!(&c.access_type, Some(AccessType::Mount(m)) if !m.fs_type.is_empty()));
        // A restore or clone keeps the filesystem it holds unless another one is asked for.
        let (src_fs, src_size, src_snap, src_vol) = match &source {
            Source::Empty => (String::new(), 0, String::new(), String::new()),
            Source::Snapshot(m) => (
                m.fs_type.clone(),
                m.size_bytes,
                m.snapshot_id.clone(),
                String::new(),
            ),
            Source::Volume(v, _) => (
                v.fs_type.clone(),
                v.capacity_bytes as u64,
                String::new(),
                v.volume_id.clone(),
            ),
        };
        if access == apb::AccessType::Mount && !src_fs.is_empty() {
            if fs_explicit && src_fs != fs_type {
                return Err(invalid(format!(
                    "the source holds a {src_fs} filesystem, {fs_type} was asked for"
                )));
            }
            fs_type = src_fs;
        }
        let mut size = pick_size(r.capacity_range.as_ref(), &fs_type)?;
        if src_size > 0 {
            let limit = r.capacity_range.as_ref().map(|c| c.limit_bytes).unwrap_or(0);
            if limit > 0 && (limit as u64) < src_size {
                return Err(Error::OutOfRange {
                    reason: format!("the source is {src_size} bytes, more than limit_bytes {limit}"),
                }
                .into());
            }
            size = size.max(src_size);
        }
        // An encrypted snapshot opens only with its key (the provisioner secret named by the
        // StorageClass): checked here, before any node is asked, so a missing or wrong key leaves
        // nothing behind.
        let kek = crate::snapshot::crypto::Kek::from_secrets(&r.secrets, "provisioner secret")
            .map_err(|e| Status::new(key_code(&e), e.to_string()))?;
        if let Source::Snapshot(m) = &source {
            if m.encryption.is_some() {
                // Read again, not from the summaries: `strata key rotate` may have re-wrapped
                // the data key since.
                let fresh = match &self.store {
                    Some(store) => crate::snapshot::manifest::read_manifest(store, &m.snapshot_id)
                        .await
                        .map_err(super::controller_snapshots::manifest_status)?
                        .map(|f| self.manifests.insert(f)),
                    None => None,
                };
                crate::snapshot::crypto::LineageKey::unwrap(fresh.as_ref().unwrap_or(m), kek.as_ref())
                    .map_err(|e| Status::new(key_code(&e), e.to_string()))?;
            }
        }
        let id = ids::volume_id_for_name(&r.name);
        let _ticket = self.guard.acquire(&id, "CreateVolume").await?;
        let req_topo = r.accessibility_requirements.as_ref();

        // An earlier attempt can only have landed on a node the requisite topology allows, so an
        // unreachable node outside it cannot hold the volume; one inside it might.
        let existing = self
            .directory
            .find_volume(&id, |node| {
                self.directory
                    .last_info(node)
                    .is_some_and(|i| !placement::allowed(req_topo, &i.segments.into_iter().collect()))
            })
            .await?;
        if let Some((node, v)) = existing {
            let (required, limit) = r
                .capacity_range
                .as_ref()
                .map(|c| (c.required_bytes, c.limit_bytes))
                .unwrap_or((0, 0));
            let cap = v.capacity_bytes;
            let problem = if cap < required || (limit > 0 && cap > limit) {
                Some(format!(
                    "volume {id} for name {:?} exists with capacity {cap} bytes",
                    r.name
                ))
            } else if v.access_type != access as i32
                || (access == apb::AccessType::Mount && v.fs_type != fs_type)
            {
                Some(format!(
                    "volume {id} for name {:?} exists with another access type or filesystem",
                    r.name
                ))
            } else if v.source_snapshot_id != src_snap || v.source_volume_id != src_vol {
                Some(format!(
                    "volume {id} for name {:?} exists with another content source",
                    r.name
                ))
            } else {
                None
            };
            if let Some(reason) = problem {
                return Err(Error::AlreadyExists { reason }.into());
            }
            return Ok(pb::CreateVolumeResponse {
                volume: Some(csi_volume(&v, self.segments_of(&node))),
            });
        }

        let infos = self.directory.node_infos().await?;
        let candidates: Vec<Candidate> = infos
            .into_iter()
            .filter_map(|(node, r)| match r {
                Ok(i) => Some(Candidate {
                    node,
                    segments: i.segments.into_iter().collect(),
                    available_bytes: i.available_bytes.max(0) as u64,
                    volume_count: i.volume_count,
                    max_volumes: i.max_volumes,
                    has_image: false,
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "agent skipped for placement");
                    None
                }
            })
            .collect();
        // Nodes holding a fast-restore image of the snapshot restore it at once: prefer them.
        let mut candidates = candidates;
        if let (Source::Snapshot(m), Some(store)) = (&source, &self.store) {
            match crate::snapshot::fsr::nodes(store).await {
                Ok(nodes) => {
                    for c in &mut candidates {
                        c.has_image = nodes.iter().any(|n| {
                            n.node == c.node
                                && n.live()
                                && n.images.get(&m.snapshot_id).is_some_and(|i| i.ready)
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "fast-restore images unknown; placing without them"),
            }
        }
        // A clone is made on its source's node (reflink or copy of the backing file).
        let candidates: Vec<Candidate> = match &source {
            Source::Volume(_, node) => {
                let c: Vec<Candidate> = candidates.into_iter().filter(|c| &c.node == node).collect();
                if c.is_empty() || !placement::allowed(req_topo, &c[0].segments) {
                    return Err(Error::NoPlacement {
                        reason: format!("a clone is created on its source's node {node}, which is unavailable or outside the requisite topology"),
                    }
                    .into());
                }
                c
            }
            _ => candidates,
        };
        let ranked =
            placement::rank(req_topo, &candidates, size).map_err(|reason| Error::NoPlacement { reason })?;
        let mut last_err = None;
        for c in ranked {
            let mut client = self.directory.client_for(&c.node).await?;
            let areq = apb::CreateVolumeRequest {
                volume_id: id.clone(),
                name: r.name.clone(),
                capacity_bytes: size as i64,
                access_type: access as i32,
                fs_type: fs_type.clone(),
                parameters: r.parameters.clone(),
                source_snapshot_id: src_snap.clone(),
                source_volume_id: src_vol.clone(),
                kek: kek.as_ref().map(|k| k.bytes().to_vec()).unwrap_or_default(),
            };
            match client.create_volume(areq).await {
                Ok(v) => {
                    let v = v.into_inner();
                    self.directory.remember(&id, &c.node);
                    tracing::info!(volume.id = %id, node = %c.node, size, "volume placed");
                    let segments = c.segments.into_iter().collect();
                    return Ok(pb::CreateVolumeResponse {
                        volume: Some(csi_volume(&v, segments)),
                    });
                }
                // The node filled up since it reported its space: try the next one.
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    last_err = Some(from_agent(&c.node, s))
                }
                Err(s) => return Err(from_agent(&c.node, s).into()),
            }
        }
        Err(last_err
            .unwrap_or(Error::NoPlacement {
                reason: "no candidate node".into(),
            })
            .into())
    }

    async fn resolve_source(&self, src: Option<&pb::VolumeContentSource>) -> Result<Source, Status> {
        use pb::volume_content_source::Type;
        match src.and_then(|s| s.r#type.as_ref()) {
            None => Ok(Source::Empty),
            Some(Type::Snapshot(s)) => {
                if s.snapshot_id.is_empty() {
                    return Err(invalid("volume_content_source.snapshot.snapshot_id is required"));
                }
                ids::check_id("snapshot_id", &s.snapshot_id).map_err(invalid)?;
                match self.manifest(&s.snapshot_id).await? {
                    Some(m) => Ok(Source::Snapshot(m)),
                    None => Err(Status::not_found(format!(
                        "snapshot {} does not exist or is not ready",
                        s.snapshot_id
                    ))),
                }
            }
            Some(Type::Volume(v)) => {
                let vid = validate::volume_id(&v.volume_id)?;
                let (node, vol) = self.find(vid).await?;
                Ok(Source::Volume(vol, node))
            }
        }
    }

    async fn delete(&self, r: pb::DeleteVolumeRequest) -> Result<pb::DeleteVolumeResponse, Status> {
        let id = validate::volume_id(&r.volume_id)?;
        let _ticket = self.guard.acquire(id, "DeleteVolume").await?;
        if let Some((node, _)) = self.directory.find_volume(id, |_| false).await? {
            let mut c = self.directory.client_for(&node).await?;
            c.delete_volume(apb::DeleteVolumeRequest {
                volume_id: id.to_owned(),
            })
            .await
            .map_err(|s| from_agent(&node, s))?;
            self.directory.forget(id);
            tracing::info!(volume.id = %id, node = %node, "volume deleted");
        }
        Ok(pb::DeleteVolumeResponse {})
    }

    async fn validate_caps(
        &self,
        r: pb::ValidateVolumeCapabilitiesRequest,
    ) -> Result<pb::ValidateVolumeCapabilitiesResponse, Status> {
        let id = validate::volume_id(&r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities is required"));
        }
        let (_, v) = self.find(id).await?;
        let mut problem = None;
        for c in &r.volume_capabilities {
            problem = problem.or_else(|| validate::capability_problem(c));
            if let Some(AccessType::Mount(m)) = &c.access_type {
                if !m.fs_type.is_empty() && !v.fs_type.is_empty() && m.fs_type != v.fs_type {
                    problem = problem.or(Some(format!("volume has {}, not {}", v.fs_type, m.fs_type)));
                }
            }
        }
        Ok(match problem {
            Some(message) => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            },
            None => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            },
        })
    }

    async fn list(&self, r: pb::ListVolumesRequest) -> Result<pb::ListVolumesResponse, Status> {
        super::paging::check(r.max_entries, &r.starting_token, "vol-")?;
        let answers = self
            .directory
            .gather("ListVolumes", |_, mut c| async move {
                c.list_volumes(apb::ListVolumesRequest {})
                    .await
                    .map(|r| r.into_inner().volumes)
            })
            .await?;
        let all: Vec<(String, apb::Volume)> = answers
            .into_iter()
            .flat_map(|(node, vs)| vs.into_iter().map(move |v| (node.clone(), v)))
            .collect();
        let (rest, next_token) = super::paging::page(
            all,
            |(_, v)| v.volume_id.as_str(),
            &r.starting_token,
            r.max_entries,
        );
        let entries = rest
            .into_iter()
            .map(|(node, v)| pb::list_volumes_response::Entry {
                volume: Some(csi_volume(&v, self.segments_of(&node))),
                status: Some(pb::list_volumes_response::VolumeStatus {
                    published_node_ids: published_nodes(&v),
                    volume_condition: condition(&v),
                }),
            })
            .collect();
        Ok(pb::ListVolumesResponse { entries, next_token })
    }

    async fn capacity(&self, r: pb::GetCapacityRequest) -> Result<pb::GetCapacityResponse, Status> {
        let supported = r
            .volume_capabilities
            .iter()
            .all(|c| validate::capability_problem(c).is_none())
            && check_params(&r.parameters).is_ok()
            && access_and_fs(&r.volume_capabilities, &r.parameters).is_ok();
        if !supported {
            return Ok(pb::GetCapacityResponse {
                available_capacity: 0,
                ..Default::default()
            });
        }
        let infos = self.directory.node_infos().await?;
        let (mut total, mut largest) = (0i64, 0i64);
        for (_, info) in infos {
            let Ok(i) = info else { continue };
            let segs = i.segments.clone().into_iter().collect();
            if r.accessible_topology
                .as_ref()
                .is_none_or(|t| placement::matches(&t.segments, &segs))
            {
                total += i.available_bytes.max(0);
                largest = largest.max(i.available_bytes.max(0));
            }
        }
        Ok(pb::GetCapacityResponse {
            available_capacity: total,
            maximum_volume_size: Some(largest),
            minimum_volume_size: Some(min_size("ext4") as i64),
        })
    }

    async fn expand(
        &self,
        r: pb::ControllerExpandVolumeRequest,
    ) -> Result<pb::ControllerExpandVolumeResponse, Status> {
        let id = validate::volume_id(&r.volume_id)?;
        let range = r
            .capacity_range
            .as_ref()
            .ok_or_else(|| invalid("capacity_range is required"))?;
        if range.required_bytes <= 0 && range.limit_bytes <= 0 {
            return Err(invalid("capacity_range needs required_bytes or limit_bytes"));
        }
        if let Some(c) = &r.volume_capability {
            if let Some(p) = validate::capability_problem(c) {
                return Err(invalid(p));
            }
        }
        let _ticket = self.guard.acquire(id, "ControllerExpandVolume").await?;
        let (node, v) = self.find(id).await?;
        let fs = if v.fs_type.is_empty() {
            "ext4"
        } else {
            v.fs_type.as_str()
        };
        let size = pick_size(Some(range), fs)?;
        let mut c = self.directory.client_for(&node).await?;
        let resp = c
            .expand_volume(apb::ExpandVolumeRequest {
                volume_id: id.to_owned(),
                capacity_bytes: size as i64,
            })
            .await
            .map_err(|s| from_agent(&node, s))?
            .into_inner();
        let block = matches!(
            r.volume_capability.as_ref().and_then(|c| c.access_type.as_ref()),
            Some(AccessType::Block(_))
        );
        Ok(pb::ControllerExpandVolumeResponse {
            capacity_bytes: resp.capacity_bytes,
            node_expansion_required: resp.node_expansion_required && !block,
        })
    }

    async fn get(
        &self,
        r: pb::ControllerGetVolumeRequest,
    ) -> Result<pb::ControllerGetVolumeResponse, Status> {
        let id = validate::volume_id(&r.volume_id)?;
        let (node, v) = self.find(id).await?;
        Ok(pb::ControllerGetVolumeResponse {
            volume: Some(csi_volume(&v, self.segments_of(&node))),
            status: Some(pb::controller_get_volume_response::VolumeStatus {
                published_node_ids: published_nodes(&v),
                volume_condition: condition(&v),
            }),
        })
    }
}

fn rpc_cap(t: Rpc) -> pb::ControllerServiceCapability {
    pb::ControllerServiceCapability {
        r#type: Some(pb::controller_service_capability::Type::Rpc(
            pb::controller_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        self.metrics
            .observe("CreateVolume", self.create(req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        self.metrics
            .observe("DeleteVolume", self.delete(req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        self.metrics
            .observe("ValidateVolumeCapabilities", self.validate_caps(req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        self.metrics
            .observe("ListVolumes", self.list(req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn get_capacity(
        &self,
        req: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        self.metrics
            .observe("GetCapacity", self.capacity(req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = [
            Rpc::CreateDeleteVolume,
            Rpc::ListVolumes,
            Rpc::GetCapacity,
            Rpc::ExpandVolume,
            Rpc::GetVolume,
            Rpc::VolumeCondition,
            Rpc::SingleNodeMultiWriter,
            Rpc::CreateDeleteSnapshot,
            Rpc::ListSnapshots,
            Rpc::GetSnapshot,
            Rpc::CloneVolume,
        ]
        .into_iter()
        .map(rpc_cap)
        .collect();
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        self.metrics
            .observe("CreateSnapshot", self.create_snapshot_impl(req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        self.metrics
            .observe("DeleteSnapshot", self.delete_snapshot_impl(req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        self.metrics
            .observe("ListSnapshots", self.list_snapshots_impl(req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn get_snapshot(
        &self,
        req: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        self.metrics
            .observe("GetSnapshot", self.get_snapshot_impl(req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn controller_expand_volume(
        &self,
        req: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        self.metrics
            .observe("ControllerExpandVolume", self.expand(req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn controller_get_volume(
        &self,
        req: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        self.metrics
            .observe("ControllerGetVolume", self.get(req.into_inner()))
            .await
            .map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(req: i64, lim: i64) -> pb::CapacityRange {
        pb::CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        }
    }

    #[test]
    fn sizes_follow_the_range() {
        assert_eq!(pick_size(None, "ext4").unwrap(), DEFAULT_SIZE);
        assert_eq!(pick_size(Some(&range(1, 0)), "ext4").unwrap(), 16 << 20);
        assert_eq!(
            pick_size(Some(&range((20 << 20) + 1, 0)), "ext4").unwrap(),
            21 << 20
        );
        assert_eq!(pick_size(Some(&range(0, 100 << 20)), "ext4").unwrap(), 100 << 20);
        assert_eq!(
            pick_size(Some(&range(0, (100 << 20) + 5)), "ext4").unwrap(),
            100 << 20
        );
        assert_eq!(
            pick_size(Some(&range(10 << 30, 10 << 30)), "ext4").unwrap(),
            10 << 30
        );
        assert!(matches!(
            pick_size(Some(&range(0, 1 << 20)), "ext4"),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            pick_size(Some(&range(0, 200 << 20)), "xfs"),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            pick_size(Some(&range(5, 4)), "ext4"),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            pick_size(Some(&range(-1, 0)), "ext4"),
            Err(Error::InvalidArgument { .. })
        ));
    }

    #[test]
    fn sizes_near_the_int64_limit_do_not_overflow() {
        // 2^63 - 1 rounds up past int64: OUT_OF_RANGE, naming the size asked for.
        match pick_size(Some(&range(i64::MAX, 0)), "ext4") {
            Err(Error::OutOfRange { reason }) => {
                assert!(
                    reason.starts_with("9223372036854775807 bytes requested"),
                    "{reason}"
                );
                assert!(reason.contains(&MAX_SIZE.to_string()), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            pick_size(Some(&range(MAX_SIZE as i64, 0)), "ext4").unwrap(),
            MAX_SIZE
        );
        assert!(matches!(
            pick_size(Some(&range(MAX_SIZE as i64 + 1, 0)), "ext4"),
            Err(Error::OutOfRange { .. })
        ));
        // With a limit, the largest 4 KiB multiple within it serves when it covers the request.
        assert_eq!(
            pick_size(Some(&range(MAX_SIZE as i64 + 1, i64::MAX)), "ext4").unwrap(),
            (i64::MAX as u64) / 4096 * 4096
        );
        assert!(matches!(
            pick_size(Some(&range(i64::MAX, i64::MAX)), "ext4"),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            pick_size(Some(&range(0, i64::MAX)), "ext4"),
            Ok(DEFAULT_SIZE)
        ));
    }

    #[test]
    fn unknown_parameters_are_refused() {
        let mut p = HashMap::new();
        p.insert("fsType".to_string(), "xfs".to_string());
        p.insert("csi.storage.k8s.io/pvc/name".to_string(), "x".to_string());
        assert!(check_params(&p).is_ok());
        p.insert("fstpye".to_string(), "xfs".to_string());
        assert!(check_params(&p).is_err());
    }
}
