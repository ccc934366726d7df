//! The controller's domain: where volumes live (agent directory) and where new ones go
//! (placement). The controller keeps no state of its own: agents hold the truth about their
//! volumes, and volume ids are derived from names, so a restarted controller answers the same.

pub mod directory;
pub mod placement;

/// Errors of controller operations. Mapped to gRPC codes in `csi::status`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input that can never succeed.
    #[error("{reason}")]
    InvalidArgument {
        /// What is wrong.
        reason: String,
    },
    /// No such object.
    #[error("{what} does not exist")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// Exists with other properties.
    #[error("{reason}")]
    AlreadyExists {
        /// The difference.
        reason: String,
    },
    /// A capacity the driver cannot honour.
    #[error("{reason}")]
    OutOfRange {
        /// Why.
        reason: String,
    },
    /// No node can take the volume (topology, space or volume count).
    #[error("no node can hold the volume: {reason}")]
    NoPlacement {
        /// What ruled the nodes out.
        reason: String,
    },
    /// An agent could not be reached.
    #[error("agent on node {node} is unavailable: {message}")]
    AgentUnavailable {
        /// The node.
        node: String,
        /// Transport error.
        message: String,
    },
    /// The agent answered with an error of its own.
    #[error("agent on node {node}: {}", status.message())]
    Agent {
        /// The node.
        node: String,
        /// Its answer.
        status: tonic::Status,
    },
    /// Agents could not be listed (Kubernetes API unreachable).
    #[error("agent discovery failed: {message}")]
    Discovery {
        /// Why.
        message: String,
    },
}
