//! Input checks shared by the CSI handlers. Every handler validates before it touches anything.

use std::path::PathBuf;

use tonic::Status;

use super::status::invalid;
use crate::ids;
use crate::proto::csi::volume_capability::access_mode::Mode;
use crate::proto::csi::volume_capability::AccessType;
use crate::proto::csi::VolumeCapability;
use crate::volume::{Access, PublishMode, StageSpec};

/// A required volume id that may reach a path.
pub fn volume_id(id: &str) -> Result<&str, Status> {
    if id.is_empty() {
        return Err(invalid("volume_id is required"));
    }
    ids::check_id("volume_id", id).map_err(invalid)?;
    Ok(id)
}

/// A required absolute path from the CO.
pub fn path(what: &str, p: &str) -> Result<PathBuf, Status> {
    if p.is_empty() {
        return Err(invalid(format!("{what} is required")));
    }
    ids::check_path(what, p).map_err(invalid)?;
    Ok(PathBuf::from(p))
}

/// Access modes this driver supports: single-node ones only (a node-local volume lives on one node).
pub fn mode_supported(mode: i32) -> bool {
    matches!(
        Mode::try_from(mode),
        Ok(Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter)
    )
}

/// Checks one capability: an access type and a supported access mode. Returns why not otherwise.
pub fn capability_problem(cap: &VolumeCapability) -> Option<String> {
    let Some(mode) = cap.access_mode.as_ref() else {
        return Some("access_mode is required".into());
    };
    if !mode_supported(mode.mode) {
        let name = Mode::try_from(mode.mode)
            .map(|m| m.as_str_name().to_string())
            .unwrap_or(mode.mode.to_string());
        return Some(format!(
            "access mode {name} is not supported: volumes are node-local, single-node modes only"
        ));
    }
    match &cap.access_type {
        None => Some("access_type (block or mount) is required".into()),
        Some(AccessType::Mount(m))
            if !m.fs_type.is_empty() && !crate::volume::SUPPORTED_FS.contains(&m.fs_type.as_str()) =>
        {
            Some(format!(
                "fsType {} is not supported (supported: {})",
                ids::echo(&m.fs_type),
                crate::volume::SUPPORTED_FS.join(", ")
            ))
        }
        Some(_) => None,
    }
}

/// Validates a capability list (required, each valid).
pub fn capabilities(caps: &[VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(invalid("volume_capabilities is required"));
    }
    for c in caps {
        if let Some(p) = capability_problem(c) {
            return Err(invalid(p));
        }
    }
    Ok(())
}

/// Validates one required capability and says how to stage it.
pub fn stage_spec(cap: Option<&VolumeCapability>) -> Result<(StageSpec, bool), Status> {
    let cap = cap.ok_or_else(|| invalid("volume_capability is required"))?;
    if let Some(p) = capability_problem(cap) {
        return Err(invalid(p));
    }
    let reader_only = cap
        .access_mode
        .as_ref()
        .is_some_and(|m| m.mode == Mode::SingleNodeReaderOnly as i32);
    let spec = match &cap.access_type {
        Some(AccessType::Mount(m)) => StageSpec::Mount {
            fs_type: m.fs_type.clone(),
            mount_flags: m.mount_flags.clone(),
        },
        _ => StageSpec::Block,
    };
    Ok((spec, reader_only))
}

/// How a publish with this (validated) capability shares the volume with its other publishes.
pub fn publish_mode(cap: Option<&VolumeCapability>) -> PublishMode {
    match cap
        .and_then(|c| c.access_mode.as_ref())
        .map(|m| Mode::try_from(m.mode))
    {
        Some(Ok(Mode::SingleNodeSingleWriter)) => PublishMode::SingleWriter,
        _ => PublishMode::Shared,
    }
}

/// The access type of a staged/published capability.
pub fn access_of(spec: &StageSpec) -> Access {
    match spec {
        StageSpec::Block => Access::Block,
        StageSpec::Mount { .. } => Access::Mount,
    }
}
