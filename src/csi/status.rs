//! The one place where domain errors become gRPC statuses. Every match is exhaustive so that a new
//! error variant cannot silently fall into INTERNAL.

use tonic::{Code, Status};

use crate::controller::Error as ControllerError;
use crate::snapshot::capture::CaptureError;
use crate::snapshot::manifest::ManifestError;
use crate::snapshot::node::SnapshotError;
use crate::snapshot::restore::RestoreError;
use crate::store::StoreError;
use crate::volume::record::RecordError;
use crate::volume::Error as VolumeError;

impl From<VolumeError> for Status {
    fn from(e: VolumeError) -> Self {
        Status::new(volume_code(&e), e.to_string())
    }
}

fn volume_code(e: &VolumeError) -> Code {
    {
        match e {
            VolumeError::InvalidArgument { .. } => Code::InvalidArgument,
            VolumeError::NotFound { .. } | VolumeError::PathNotFound { .. } => Code::NotFound,
            VolumeError::AlreadyExists { .. } => Code::AlreadyExists,
            VolumeError::FailedPrecondition { .. } => Code::FailedPrecondition,
            VolumeError::Unavailable { .. } => Code::Unavailable,
            VolumeError::NoSpace { .. } | VolumeError::TooManyVolumes { .. } => Code::ResourceExhausted,
            VolumeError::Record(RecordError::Corrupt { .. }) => Code::DataLoss,
            VolumeError::Record(RecordError::Io { .. }) | VolumeError::Sys(_) | VolumeError::Io { .. } => {
                Code::Internal
            }
        }
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

/// The code for a store failure.
pub fn store_code(e: &StoreError) -> Code {
    match e {
        StoreError::NotFound { .. } => Code::NotFound,
        StoreError::Transient { .. } => Code::Unavailable,
        StoreError::Permanent { .. } => Code::Internal,
    }
}

impl From<SnapshotError> for Status {
    fn from(e: SnapshotError) -> Self {
        let code = match &e {
            SnapshotError::NoStore => Code::FailedPrecondition,
            SnapshotError::Volume(v) => return Status::from(VolumeErrorRef(v)),
            SnapshotError::OtherVolume { .. } => Code::AlreadyExists,
            SnapshotError::PartialGroup { .. } => Code::FailedPrecondition,
            SnapshotError::NotFound { .. } => Code::NotFound,
            SnapshotError::Manifest(ManifestError::Store(s)) => store_code(s),
            SnapshotError::Manifest(ManifestError::Corrupt { .. }) => Code::DataLoss,
            SnapshotError::Capture(c) => match c {
                // The storage cannot capture this volume within the freeze limit: retrying the
                // same call cannot help until the operator changes something.
                CaptureError::FreezeLimit { .. } => Code::FailedPrecondition,
                CaptureError::Sys(_) | CaptureError::Record(RecordError::Io { .. }) => Code::Internal,
                CaptureError::Record(RecordError::Corrupt { .. }) => Code::DataLoss,
            },
            SnapshotError::Restore(r) => match r {
                RestoreError::Store(s) => store_code(s),
                RestoreError::MissingChunk { .. } | RestoreError::Corrupt(_) => Code::DataLoss,
                RestoreError::SnapshotGone { .. } => Code::NotFound,
                RestoreError::Io { .. } => Code::Internal,
                RestoreError::Cancelled => Code::Aborted,
            },
            // The external-snapshotter treats CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE,
            // RESOURCE_EXHAUSTED and ABORTED as "maybe still in progress" (its
            // `isCSIFinalError`), keeping the content's being-created annotation and retrying as
            // if the snapshot could still come. Any other code is final: the message lands in the
            // VolumeSnapshotContent's and the VolumeSnapshot's `status.error` (what `kubectl
            // describe volumesnapshot` shows) with a SnapshotCreationFailed event. Of the final
            // codes, FAILED_PRECONDITION says what is true: the snapshot is in a state (failed)
            // from which this call cannot succeed until the caller acts (deletes it and takes
            // another); INTERNAL would claim a broken invariant of the driver.
            SnapshotError::Failed { .. } => Code::FailedPrecondition,
            SnapshotError::Key(k) => key_code(k),
        };
        Status::new(code, e.to_string())
    }
}

/// The code of a key error: a key the class must name but does not, or a malformed one, is the
/// request's fault (INVALID_ARGUMENT); a key that does not open the snapshot is PERMISSION_DENIED.
pub fn key_code(e: &crate::snapshot::crypto::KeyError) -> Code {
    use crate::snapshot::crypto::KeyError;
    match e {
        KeyError::Missing { .. } | KeyError::Invalid(_) => Code::InvalidArgument,
        KeyError::Wrong { .. } => Code::PermissionDenied,
        KeyError::Unsupported { .. } => Code::FailedPrecondition,
    }
}

/// Borrowing form of the volume error mapping.
struct VolumeErrorRef<'a>(&'a VolumeError);

impl From<VolumeErrorRef<'_>> for Status {
    fn from(e: VolumeErrorRef<'_>) -> Self {
        Status::new(volume_code(e.0), e.0.to_string())
    }
}

/// INVALID_ARGUMENT with a message.
pub fn invalid(reason: impl Into<String>) -> Status {
    Status::invalid_argument(reason.into())
}

/// Longest message a CSI answer carries. The message travels in a gRPC header; past 8 KiB the
/// client sees RESOURCE_EXHAUSTED instead of the answer, so a message is cut well before that.
pub const MAX_MESSAGE: usize = 2048;

/// `s` with its message cut to [`MAX_MESSAGE`] bytes (on a character boundary). Every CSI answer
/// passes through here ([`crate::telemetry::Metrics::observe`]): values echoed into messages are
/// already bounded by [`crate::ids::echo`], and this keeps any other message from growing past
/// what gRPC can carry.
pub fn bounded(s: Status) -> Status {
    if s.message().len() <= MAX_MESSAGE {
        return s;
    }
    let msg = s.message();
    let mut cut = MAX_MESSAGE;
    while !msg.is_char_boundary(cut) {
        cut -= 1;
    }
    Status::new(
        s.code(),
        format!("{}... (message cut, {} bytes)", &msg[..cut], msg.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_and_keep_their_code() {
        let s = bounded(Status::not_found("é".repeat(5000)));
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().len() < MAX_MESSAGE + 64, "{}", s.message().len());
        assert!(s.message().ends_with("(message cut, 10000 bytes)"));
        let short = bounded(Status::aborted("busy"));
        assert_eq!((short.code(), short.message()), (Code::Aborted, "busy"));
    }
}
