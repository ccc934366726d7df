//! Node-local volumes: a sparse backing file per volume plus an atomically written record, a loop
//! device while staged, a filesystem mounted at the staging path (mount access) and bind mounts
//! at publish targets.
//!
//! Layout under the storage directory:
//!
//! ```text
//! volumes/<vol-id>/volume.rec   VolumeRecord (see record.rs for the envelope)
//! volumes/<vol-id>/data.img     the sparse backing file
//! volumes/<vol-id>/stage.rec    StageRecord, present while staged
//! volumes/<vol-id>/publish.rec  PublishRecord: the access mode of each publish
//! volumes/.new-<vol-id>-<uuid>  a volume being created (renamed into place when complete)
//! trash/                        volumes being deleted (renamed here first, then removed)
//! ```
//!
//! Nothing is kept in memory that the kernel already knows: which loop device backs a file comes
//! from `/sys/block/loop*/loop/backing_file`, what is mounted where from `/proc/self/mountinfo`. So
//! a restarted (or `kill -9`ed) agent picks up exactly where the kernel is.

mod manager;
pub use manager::SUPPORTED_FS;
pub mod fiemap;
pub mod publish;
pub mod record;
pub mod sys;

pub use publish::PublishMode;

pub use manager::{
    Access, CreateSpec, Error, HydrateSeed, LineageRecord, StageSpec, VolumeManager, VolumeRecord,
    VolumeSource, VolumeState, VolumeStats,
};
