//! gRPC adapters for the CSI services. A handler reads as: validate, take the volume guard, call
//! the domain layer, map the result (errors are mapped in `status`).

pub mod controller;
pub mod controller_groups;
pub mod controller_snapshots;
pub mod identity;
pub mod node;
pub mod op_guard;
pub mod paging;
pub mod status;
pub mod summaries;
pub mod validate;

/// The CSI driver name.
pub const DRIVER_NAME: &str = "strata.csi.dev";
