//! Generated protobuf and gRPC code.

/// The Container Storage Interface, spec v1.12 (`proto/csi/v1/csi.proto`).
#[allow(missing_docs, clippy::all)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

/// Strata's controller↔node agent API (`proto/strata/agent/v1/agent.proto`).
#[allow(missing_docs, clippy::all)]
pub mod agent {
    tonic::include_proto!("strata.agent.v1");
}

/// Persisted snapshot formats (`proto/strata/store/v1/manifest.proto`).
#[allow(missing_docs, clippy::all)]
pub mod store {
    tonic::include_proto!("strata.store.v1");
}
