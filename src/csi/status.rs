//! The one place where domain errors become gRPC statuses. Every match is exhaustive so that a new
//! error variant cannot silently fall into INTERNAL.

use tonic::{Code, Status};

use crate::controller::Error as ControllerError;
use crate::volume::record::RecordError;
use crate::volume::Error as VolumeError;

impl From<VolumeError> for Status {
    fn from(e: VolumeError) -> Self {
        let code = match &e {
            VolumeError::InvalidArgument { .. } => Code::InvalidArgument,
            VolumeError::NotFound { .. } | VolumeError::PathNotFound { .. } => Code::NotFound,
            VolumeError::AlreadyExists { .. } => Code::AlreadyExists,
            VolumeError::FailedPrecondition { .. } => Code::FailedPrecondition,
            VolumeError::NoSpace { .. } | VolumeError::TooManyVolumes { .. } => Code::ResourceExhausted,
            VolumeError::Record(RecordError::Corrupt { .. }) => Code::DataLoss,
            VolumeError::Record(RecordError::Io { .. }) | VolumeError::Sys(_) | VolumeError::Io { .. } => {
                Code::Internal
            }
        };
        Status::new(code, e.to_string())
    }
}

impl From<ControllerError> for Status {
    fn from(e: ControllerError) -> Self {
        let code = match &e {
            ControllerError::InvalidArgument { .. } => Code::InvalidArgument,
            ControllerError::NotFound { .. } => Code::NotFound,
            ControllerError::AlreadyExists { .. } => Code::AlreadyExists,
            ControllerError::OutOfRange { .. } => Code::OutOfRange,
            ControllerError::NoPlacement { .. } => Code::ResourceExhausted,
            ControllerError::AgentUnavailable { .. } | ControllerError::Discovery { .. } => Code::Unavailable,
            // The agent already chose the code for its own failure; keep it.
            ControllerError::Agent { status, .. } => status.code(),
        };
        Status::new(code, e.to_string())
    }
}

/// INVALID_ARGUMENT with a message.
pub fn invalid(reason: impl Into<String>) -> Status {
    Status::invalid_argument(reason.into())
}
