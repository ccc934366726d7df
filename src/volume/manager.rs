//! The volume manager: every node-local volume operation, idempotent and restart-safe.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::publish::{self, PublishEntry, PublishMode, PublishRecord};
use super::record::{self, RecordError};
use super::sys::{self, LoopDevice, SysError};
use crate::ids;
use crate::snapshot::capture::{CaptureError, CloneJob, Freezer, DEFAULT_MAX_FREEZE};
use prometheus_client::metrics::histogram::Histogram;

const VOLUME_RECORD: &str = "volume";
const STAGE_RECORD: &str = "stage";

/// A filesystem this much smaller than its device is grown (xfs also loses its log to statvfs).
const GROW_SLACK: u64 = 4 << 20;

/// Filesystems we make and grow.
pub const SUPPORTED_FS: &[&str] = &["ext4", "xfs"];

/// How a volume is consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// A filesystem, mounted.
    Mount,
    /// The raw block device.
    Block,
}

/// Errors of node-local volume operations. Mapped to gRPC codes in `csi::status`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input that can never succeed.
    #[error("{reason}")]
    InvalidArgument {
        /// What is wrong.
        reason: String,
    },
    /// The node does not hold the volume.
    #[error("volume {volume_id} does not exist on this node")]
    NotFound {
        /// The volume.
        volume_id: String,
    },
    /// A path the caller named does not exist or is not where the volume is staged/published.
    #[error("volume is not staged or published at {}", ids::echo(&path.to_string_lossy()))]
    PathNotFound {
        /// The path.
        path: PathBuf,
    },
    /// The volume exists with other properties than asked for.
    #[error("volume {volume_id} already exists and is incompatible: {reason}")]
    AlreadyExists {
        /// The volume.
        volume_id: String,
        /// The difference.
        reason: String,
    },
    /// The volume's state does not allow the operation now (staged, not staged, published...).
    #[error("volume {volume_id}: {reason}")]
    FailedPrecondition {
        /// The volume.
        volume_id: String,
        /// Why not now.
        reason: String,
    },
    /// Not usable yet (being restored); retry later.
    #[error("volume {volume_id}: {reason}")]
    Unavailable {
        /// The volume.
        volume_id: String,
        /// Why not yet.
        reason: String,
    },
    /// Not enough free space on the node.
    #[error("not enough space on node: {needed} bytes needed, {available} available")]
    NoSpace {
        /// Bytes asked for.
        needed: u64,
        /// Bytes free after reservations.
        available: u64,
    },
    /// The node holds as many volumes as it may.
    #[error("node already holds its maximum of {max} volumes")]
    TooManyVolumes {
        /// The limit.
        max: u32,
    },
    /// A persisted record is unreadable.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A system tool or kernel interface failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// What is persisted about a volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeRecord {
    /// `vol-<uuid>`.
    pub id: String,
    /// The CreateVolume name (the PV name in Kubernetes).
    pub name: String,
    /// Size of the backing file.
    pub capacity_bytes: u64,
    /// How it was created to be used.
    pub access: Access,
    /// Filesystem made at first stage (mount access).
    pub fs_type: String,
    /// CreateVolume parameters, kept for ListVolumes / ControllerGetVolume.
    pub parameters: BTreeMap<String, String>,
    /// Creation time.
    pub created_unix_ms: i64,
    /// Snapshot the volume was restored from, if any.
    #[serde(default)]
    pub source_snapshot_id: String,
    /// Volume the volume was cloned from, if any.
    #[serde(default)]
    pub source_volume_id: String,
}

/// The snapshot history of a volume: what its next snapshot is diffed against.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LineageRecord {
    /// Shared by a volume, its snapshots and volumes restored from them.
    pub lineage: String,
    /// Newest committed snapshot of this volume (or the snapshot it was restored from).
    pub last_snapshot_id: String,
    /// Capture time of that snapshot, so a slower older upload never replaces a newer parent.
    pub last_capture_unix_ms: i64,
    /// Chunk size, fixed per lineage.
    pub chunk_size: u32,
    /// The data key of an encrypted lineage (absent: plaintext). Every snapshot of the volume is
    /// sealed with it, whatever the class says, so an encrypted lineage stays encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<crate::snapshot::crypto::LineageKey>,
}

impl LineageRecord {
    /// The lineage a volume continues after snapshot `m` (its own, or the one it was restored
    /// from), with `m`'s data key when it is encrypted.
    pub fn of(m: &crate::proto::store::Manifest, key: Option<crate::snapshot::crypto::LineageKey>) -> Self {
        Self {
            lineage: m.lineage.clone(),
            last_snapshot_id: m.snapshot_id.clone(),
            last_capture_unix_ms: m.capture_unix_ms,
            chunk_size: m.chunk_size,
            key,
        }
    }
}

/// Which snapshot the kept base image belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct BaseRecord {
    snapshot_id: String,
    capture_unix_ms: i64,
}

const BASE_RECORD: &str = "base";
const LINEAGE_RECORD: &str = "lineage";

/// What is persisted while a volume is staged; the kernel state is the truth, this records the
/// caller's intent (so a second stage elsewhere is refused and unstage knows what to undo).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct StageRecord {
    staging_path: PathBuf,
    access: Access,
    fs_type: String,
    mount_flags: Vec<String>,
}

/// A create request as the agent receives it.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    /// Volume id.
    pub id: String,
    /// CreateVolume name.
    pub name: String,
    /// Exact size (the controller already applied the capacity range).
    pub capacity_bytes: u64,
    /// Access type.
    pub access: Access,
    /// Filesystem for mount access.
    pub fs_type: String,
    /// Parameters.
    pub parameters: BTreeMap<String, String>,
    /// Where the data comes from.
    pub source: VolumeSource,
    /// For a snapshot source: a fully hydrated local image of it (fast restore) and the lineage
    /// the volume continues; the volume is then a clone of the image, with nothing to restore.
    pub image: Option<(PathBuf, LineageRecord)>,
    /// For a snapshot source without an image: what the volume hydrates from.
    pub hydrate: Option<HydrateSeed>,
}

/// The files a lazily restored volume starts with (see [`crate::hydrate`]).
#[derive(Debug, Clone)]
pub struct HydrateSeed {
    /// `hydrate.rec`.
    pub record: crate::hydrate::HydrateRecord,
    /// The snapshot's manifest, encoded.
    pub manifest: Vec<u8>,
    /// The initial chunk map.
    pub map: Vec<u8>,
}

/// Initial content of a new volume.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum VolumeSource {
    /// Empty (sparse zeros).
    #[default]
    Empty,
    /// Restored from a snapshot: cloned from a fast-restore image, or hydrated lazily.
    Snapshot(String),
    /// Cloned from a volume on this node, during creation.
    Volume(String),
}

/// How to stage.
#[derive(Debug, Clone)]
pub enum StageSpec {
    /// Raw block: attach the loop device only.
    Block,
    /// Filesystem: make it if absent, mount it at the staging path.
    Mount {
        /// Requested filesystem; empty means the volume's.
        fs_type: String,
        /// Mount options.
        mount_flags: Vec<String>,
    },
}

/// A volume with its live state.
#[derive(Debug, Clone)]
pub struct VolumeState {
    /// The record.
    pub record: VolumeRecord,
    /// Bytes allocated by the sparse file.
    pub allocated_bytes: u64,
    /// The read-write loop device while staged.
    pub device: Option<LoopDevice>,
    /// Where it is staged.
    pub staging_path: Option<PathBuf>,
    /// Publish targets currently mounted.
    pub published: Vec<PathBuf>,
    /// `Some(reason)` when the volume is abnormal.
    pub abnormal: Option<String>,
    /// Set while the volume hydrates from this snapshot.
    pub restoring: Option<String>,
    /// While hydrating: the hydrator's progress.
    pub hydration: Option<crate::hydrate::HydrateStatus>,
}

/// Usage of a published or staged volume path.
#[derive(Debug, Clone)]
pub struct VolumeStats {
    /// Total bytes (filesystem size, or device size for block).
    pub total_bytes: u64,
    /// Bytes used (filesystem only).
    pub used_bytes: Option<u64>,
    /// Bytes available (filesystem only).
    pub available_bytes: Option<u64>,
    /// Inodes: (total, used, free) for filesystems.
    pub inodes: Option<(u64, u64, u64)>,
    /// `Some(reason)` when abnormal.
    pub abnormal: Option<String>,
}

/// Owns the storage directory of one node.
#[derive(Debug)]
pub struct VolumeManager {
    /// The storage directory.
    root: PathBuf,
    /// Reported in volume states.
    node_name: String,
    /// Refuse creates past this many volumes (loop devices are a finite resource).
    max_volumes: u32,
    /// Serializes creates and expansions so two of them cannot both claim the last free bytes.
    space_lock: tokio::sync::Mutex<()>,
    /// Freezes mounted volumes for clones and snapshots, within the node's freeze limit.
    freezer: Freezer,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl VolumeManager {
    /// Opens (creating if needed) a storage directory and clears half-done creates and deletes.
    pub fn open(root: &Path, node_name: &str, max_volumes: u32) -> Result<Self, Error> {
        for d in ["volumes", "trash"] {
            std::fs::create_dir_all(root.join(d))
                .map_err(io(format!("create {}", root.join(d).display())))?;
        }
        let root = std::fs::canonicalize(root).map_err(io(format!("resolve {}", root.display())))?;
        let m = Self {
            freezer: Freezer::new(&root, DEFAULT_MAX_FREEZE),
            root,
            node_name: node_name.to_owned(),
            max_volumes,
            space_lock: Default::default(),
        };
        m.sweep_leftovers();
        Ok(m)
    }

    /// Opens a storage directory for reading only (`strata volume`): nothing is created or
    /// cleaned, so it is safe beside the agent that owns it.
    pub fn inspect(root: &Path) -> Result<Self, Error> {
        let root = std::fs::canonicalize(root).map_err(io(format!("resolve {}", root.display())))?;
        if !root.join("volumes").is_dir() {
            return Err(Error::InvalidArgument {
                reason: format!("{} is not a Strata storage directory", root.display()),
            });
        }
        Ok(Self {
            freezer: Freezer::new(&root, DEFAULT_MAX_FREEZE),
            root,
            node_name: String::new(),
            max_volumes: 0,
            space_lock: Default::default(),
        })
    }

    fn sweep_leftovers(&self) {
        if let Ok(rd) = std::fs::read_dir(self.root.join("volumes")) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(".new-") {
                    tracing::info!(path = %e.path().display(), "removing half-created volume");
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.root.join("trash")) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// The same manager with `max_freeze` as its freeze limit, observing frozen durations in
    /// `histogram`.
    pub fn with_freeze_limit(mut self, max_freeze: std::time::Duration, histogram: Histogram) -> Self {
        self.freezer = Freezer::new(&self.root, max_freeze).with_histogram(histogram);
        self
    }

    /// Freezes mounted volumes of this storage directory for captures.
    pub fn freezer(&self) -> &Freezer {
        &self.freezer
    }

    /// The storage directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The volume limit.
    pub fn max_volumes(&self) -> u32 {
        self.max_volumes
    }

    /// A volume's directory.
    pub fn volume_dir(&self, id: &str) -> Result<PathBuf, Error> {
        self.dir(id)
    }

    /// Loop devices on the volume's data: the plain file, or the hydrator's file while hydrating.
    pub fn loops(&self, id: &str) -> Result<Vec<sys::LoopDevice>, Error> {
        let p = crate::hydrate::Paths::new(&self.dir(id)?);
        let mut loops = sys::loops_for(&p.data());
        loops.extend(sys::loops_for(&p.lazy_data()));
        Ok(loops)
    }

    fn dir(&self, id: &str) -> Result<PathBuf, Error> {
        ids::check_id("volume id", id).map_err(|reason| Error::InvalidArgument { reason })?;
        Ok(self.root.join("volumes").join(id))
    }

    /// Path of a volume's backing file.
    pub fn data_path(&self, id: &str) -> Result<PathBuf, Error> {
        Ok(self.dir(id)?.join("data.img"))
    }

    fn read_record(&self, id: &str) -> Result<VolumeRecord, Error> {
        let dir = self.dir(id)?;
        record::read(&dir.join("volume.rec"), VOLUME_RECORD)?.ok_or_else(|| Error::NotFound {
            volume_id: id.to_owned(),
        })
    }

    fn read_stage(&self, id: &str) -> Result<Option<StageRecord>, Error> {
        Ok(record::read(&self.dir(id)?.join("stage.rec"), STAGE_RECORD)?)
    }

    /// Ids of all volumes on this node, sorted.
    pub fn ids(&self) -> Result<Vec<String>, Error> {
        let dir = self.root.join("volumes");
        let mut ids: Vec<String> = std::fs::read_dir(&dir)
            .map_err(io(format!("list {}", dir.display())))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// (total bytes, available bytes): the storage filesystem's free space minus what existing
    /// sparse volumes may still claim, so thin files never overcommit the node.
    pub fn capacity(&self) -> Result<(u64, u64), Error> {
        let fs = sys::statvfs(&self.root)?;
        let mut reserved = 0u64;
        for id in self.ids()? {
            if let Ok(r) = self.read_record(&id) {
                let allocated = allocated(&self.data_path(&id)?);
                reserved += r.capacity_bytes.saturating_sub(allocated);
            }
        }
        Ok((fs.total_bytes, fs.available_bytes.saturating_sub(reserved)))
    }

    /// Creates a volume; the same spec again returns the existing one.
    pub async fn create(&self, spec: &CreateSpec) -> Result<VolumeState, Error> {
        let dir = self.dir(&spec.id)?;
        ids::check_name("volume name", &spec.name).map_err(|reason| Error::InvalidArgument { reason })?;
        if spec.access == Access::Mount && !SUPPORTED_FS.contains(&spec.fs_type.as_str()) {
            return Err(Error::InvalidArgument {
                reason: format!(
                    "unsupported fsType {:?} (supported: {})",
                    spec.fs_type,
                    SUPPORTED_FS.join(", ")
                ),
            });
        }
        let _space = self.space_lock.lock().await;
        match self.read_record(&spec.id) {
            Ok(existing) => {
                let mismatch = if existing.name != spec.name {
                    Some(format!("it was created for name {:?}", existing.name))
                } else if existing.capacity_bytes != spec.capacity_bytes {
                    Some(format!(
                        "its capacity is {} bytes, not {}",
                        existing.capacity_bytes, spec.capacity_bytes
                    ))
                } else if existing.access != spec.access {
                    Some(format!("its access type is {:?}", existing.access))
                } else if existing.access == Access::Mount && existing.fs_type != spec.fs_type {
                    Some(format!("its filesystem is {}", existing.fs_type))
                } else if (
                    existing.source_snapshot_id.as_str(),
                    existing.source_volume_id.as_str(),
                ) != source_ids(&spec.source)
                {
                    Some("it was created from another source".to_string())
                } else {
                    None
                };
                return match mismatch {
                    Some(reason) => Err(Error::AlreadyExists {
                        volume_id: spec.id.clone(),
                        reason,
                    }),
                    None => self.state(existing),
                };
            }
            Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let count = self.ids()?.len();
        if count >= self.max_volumes as usize {
            return Err(Error::TooManyVolumes {
                max: self.max_volumes,
            });
        }
        let (_, available) = self.capacity()?;
        if spec.capacity_bytes > available {
            return Err(Error::NoSpace {
                needed: spec.capacity_bytes,
                available,
            });
        }
        let rec = VolumeRecord {
            id: spec.id.clone(),
            name: spec.name.clone(),
            capacity_bytes: spec.capacity_bytes,
            access: spec.access,
            fs_type: if spec.access == Access::Mount {
                spec.fs_type.clone()
            } else {
                String::new()
            },
            parameters: spec.parameters.clone(),
            created_unix_ms: now_ms(),
            source_snapshot_id: source_ids(&spec.source).0.to_owned(),
            source_volume_id: source_ids(&spec.source).1.to_owned(),
        };
        // A clone copies the source's image (frozen if mounted) before the new volume exists.
        let clone_from = match &spec.source {
            VolumeSource::Volume(src) => {
                let v = self.get(src)?;
                // A hydrated source (even if its hydrator still serves it) is complete on disk.
                if let Some(h) = v.hydration.as_ref().filter(|h| !h.complete()) {
                    return Err(Error::Unavailable {
                        volume_id: src.clone(),
                        reason: format!(
                            "still hydrating ({} of {} chunks local); retry once it is complete",
                            h.local_chunks, h.total_chunks
                        ),
                    });
                }
                if v.record.capacity_bytes > spec.capacity_bytes {
                    return Err(Error::InvalidArgument {
                        reason: format!(
                            "clone must be at least the source's {} bytes",
                            v.record.capacity_bytes
                        ),
                    });
                }
                let mount = v
                    .staging_path
                    .clone()
                    .filter(|_| v.record.access == Access::Mount);
                Some((self.data_path(src)?, mount, self.lineage(src)?))
            }
            VolumeSource::Snapshot(_) => spec.image.clone().map(|(p, l)| (p, None, Some(l))),
            _ => None,
        };
        let tmp =
            self.root
                .join("volumes")
                .join(format!(".new-{}-{}", spec.id, uuid::Uuid::new_v4().simple()));
        let (tmp2, dir2, rec2) = (tmp.clone(), dir.clone(), rec.clone());
        std::fs::create_dir(&tmp).map_err(io(format!("create {}", tmp.display())))?;
        if let Some((src_data, mount, lineage)) = &clone_from {
            let job = CloneJob {
                data: src_data.clone(),
                clone: tmp.join("data.img"),
                also: Vec::new(),
            };
            let mounts: Vec<PathBuf> = mount.iter().cloned().collect();
            if let Err(e) = self.freezer.capture(&spec.id, mounts, vec![job]).await {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(match e {
                    CaptureError::Sys(e) => e.into(),
                    CaptureError::Record(e) => e.into(),
                    limit @ CaptureError::FreezeLimit { .. } => Error::FailedPrecondition {
                        volume_id: spec.id.clone(),
                        reason: format!("cannot clone the source volume while it is mounted: {limit}"),
                    },
                });
            }
            if let Some(l) = lineage {
                record::write(&tmp.join("lineage.rec"), LINEAGE_RECORD, l)?;
            }
        }
        if let (VolumeSource::Snapshot(_), None, Some(seed)) = (&spec.source, &spec.image, &spec.hydrate) {
            if let Err(e) = crate::hydrate::write_seed(&tmp, seed) {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        }
        let result = tokio::task::spawn_blocking(move || -> Result<(), Error> {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(tmp2.join("data.img"))
                .map_err(io("create backing file"))?;
            f.set_len(rec2.capacity_bytes).map_err(io("size backing file"))?;
            f.sync_all().map_err(io("sync backing file"))?;
            record::write(&tmp2.join("volume.rec"), VOLUME_RECORD, &rec2)?;
            std::fs::rename(&tmp2, &dir2).map_err(io(format!("rename into {}", dir2.display())))?;
            std::fs::File::open(dir2.parent().unwrap_or(Path::new("/")))
                .and_then(|d| d.sync_all())
                .map_err(io("sync volumes directory"))
        })
        .await
        .expect("create task panicked");
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        tracing::info!(volume.id = %spec.id, capacity = spec.capacity_bytes, "volume created");
        self.state(rec)
    }

    /// FAILED_PRECONDITION while a loop device is attached to the volume (it is staged).
    pub fn check_detached(&self, id: &str) -> Result<(), Error> {
        let loops = self.loops(id)?;
        if loops.is_empty() {
            return Ok(());
        }
        let names: Vec<_> = loops.iter().map(|l| l.name.as_str()).collect();
        Err(Error::FailedPrecondition {
            volume_id: id.to_owned(),
            reason: format!(
                "still staged (attached to {}); unstage it first",
                names.join(", ")
            ),
        })
    }

    /// Deletes a volume; OK when it does not exist. Refused while it is staged.
    pub async fn delete(&self, id: &str) -> Result<(), Error> {
        let dir = self.dir(id)?;
        if !dir.exists() {
            return Ok(());
        }
        self.check_detached(id)?;
        let trash = self
            .root
            .join("trash")
            .join(format!("{id}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::rename(&dir, &trash).map_err(io(format!("move {} to trash", dir.display())))?;
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&trash))
            .await
            .expect("delete task panicked")
            .map_err(io("remove deleted volume"))?;
        tracing::info!(volume.id = %id, "volume deleted");
        Ok(())
    }

    /// A volume with its live state.
    pub fn get(&self, id: &str) -> Result<VolumeState, Error> {
        let rec = self.read_record(id)?;
        self.state(rec)
    }

    /// All volumes with live state; unreadable records are logged and skipped.
    pub fn list(&self) -> Result<Vec<VolumeState>, Error> {
        // One read of the mount table for the whole listing, not one per volume.
        let mounts = sys::mounts();
        let mut out = Vec::new();
        for id in self.ids()? {
            match self.read_record(&id).and_then(|r| self.state_with(r, &mounts)) {
                Ok(v) => out.push(v),
                Err(Error::NotFound { .. }) => {}
                Err(e) => tracing::warn!(volume.id = %id, error = %e, "skipping unreadable volume"),
            }
        }
        Ok(out)
    }

    fn state(&self, record: VolumeRecord) -> Result<VolumeState, Error> {
        self.state_with(record, &sys::mounts())
    }

    fn state_with(&self, record: VolumeRecord, mounts: &[sys::MountEntry]) -> Result<VolumeState, Error> {
        let data = self.data_path(&record.id)?;
        let stage = self.read_stage(&record.id)?;
        let loops = self.loops(&record.id)?;
        let hp = crate::hydrate::Paths::new(&self.dir(&record.id)?);
        let hydrating =
            record::read::<crate::hydrate::HydrateRecord>(&hp.record(), crate::hydrate::HYDRATE_RECORD)?;
        let hydration = hydrating.as_ref().map(|_| hp.read_status().unwrap_or_default());
        let device = loops.iter().find(|l| !l.read_only).cloned();
        let dev_nums: Vec<(u32, u32)> = loops.iter().filter_map(sys::loop_dev_numbers).collect();
        let loop_roots: Vec<String> = loops.iter().map(|l| format!("/{}", l.name)).collect();
        let staging_path = stage
            .as_ref()
            .filter(|_| device.is_some())
            .map(|s| s.staging_path.clone());
        let published: Vec<PathBuf> = mounts
            .iter()
            .filter(|m| Some(&m.mount_point) != staging_path.as_ref())
            .filter(|m| {
                dev_nums.contains(&m.dev) || (m.fs_type == "devtmpfs" && loop_roots.contains(&m.root))
            })
            .map(|m| m.mount_point.clone())
            .collect();
        let abnormal = match std::fs::metadata(&data) {
            Err(_) => Some(format!("backing file {} is missing", data.display())),
            Ok(md) if md.len() < record.capacity_bytes => Some(format!(
                "backing file is {} bytes, volume is {}",
                md.len(),
                record.capacity_bytes
            )),
            Ok(_) => match (&stage, &device) {
                (Some(s), Some(_))
                    if s.access == Access::Mount
                        && !mounts.iter().any(|m| m.mount_point == s.staging_path) =>
                {
                    Some(format!(
                        "filesystem is not mounted at staging path {}",
                        s.staging_path.display()
                    ))
                }
                _ => None,
            },
        };
        let hydrator_gone =
            hydration.is_some() && !sys::loops_for(&hp.lazy_data()).is_empty() && !hp.served();
        let abnormal = abnormal.or_else(|| match &hydration {
            _ if hydrator_gone => Some(
                "its hydrator stopped while the volume was attached: I/O fails until it is unstaged and staged again"
                    .into(),
            ),
            Some(h) if h.permanent => Some(format!("hydration cannot complete: {}", h.error)),
            _ => None,
        });
        let restoring = hydrating.map(|r| r.snapshot_id);
        Ok(VolumeState {
            allocated_bytes: allocated(&data),
            record,
            device,
            staging_path,
            published,
            abnormal,
            restoring,
            hydration,
        })
    }

    /// Grows a volume. Returns the new size and whether a filesystem must still be grown on the
    /// node. A size at or below the current one changes nothing.
    pub async fn expand(&self, id: &str, capacity_bytes: u64) -> Result<(u64, bool), Error> {
        let _space = self.space_lock.lock().await;
        let mut rec = self.read_record(id)?;
        let needs_fs = rec.access == Access::Mount;
        if capacity_bytes <= rec.capacity_bytes {
            return Ok((
                rec.capacity_bytes,
                needs_fs && self.fs_smaller_than_device(id).await,
            ));
        }
        let (_, available) = self.capacity()?;
        let delta = capacity_bytes - rec.capacity_bytes;
        if delta > available {
            return Err(Error::NoSpace {
                needed: delta,
                available,
            });
        }
        let data = self.data_path(id)?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&data)
            .map_err(io("open backing file"))?;
        f.set_len(capacity_bytes).map_err(io("grow backing file"))?;
        f.sync_all().map_err(io("sync backing file"))?;
        rec.capacity_bytes = capacity_bytes;
        let dir = self.dir(id)?;
        let rec2 = rec.clone();
        tokio::task::spawn_blocking(move || record::write(&dir.join("volume.rec"), VOLUME_RECORD, &rec2))
            .await
            .expect("record task panicked")?;
        for l in self.loops(id)? {
            sys::loop_refresh(&l).await?;
        }
        tracing::info!(volume.id = %id, capacity = capacity_bytes, "volume expanded");
        Ok((capacity_bytes, needs_fs))
    }

    async fn fs_smaller_than_device(&self, id: &str) -> bool {
        // After a crash between growing the file and the node expansion, the CO asks again with
        // the same size: it must still be told that the filesystem needs growing.
        let Ok(v) = self.get(id) else { return false };
        let (Some(dev), Some(stage)) = (v.device, v.staging_path) else {
            return false;
        };
        match (dev.size_bytes(), sys::statvfs(&stage)) {
            (Ok(d), Ok(fs)) => fs.total_bytes + d / 10 < d,
            _ => false,
        }
    }

    /// Attaches the volume and, for mount access, makes (first time) and mounts its filesystem.
    pub async fn stage(&self, id: &str, staging_path: &Path, spec: &StageSpec) -> Result<VolumeState, Error> {
        let rec = self.read_record(id)?;
        // While hydrating, the loop device uses the hydrator's file (the caller started it).
        let hp = crate::hydrate::Paths::new(&self.dir(id)?);
        let data = if hp.hydrating() {
            hp.lazy_data()
        } else {
            self.data_path(id)?
        };
        let (access, fs_type, mount_flags) = match spec {
            StageSpec::Block => (Access::Block, String::new(), Vec::new()),
            StageSpec::Mount { fs_type, mount_flags } => {
                let fs = if !fs_type.is_empty() {
                    fs_type.clone()
                } else if !rec.fs_type.is_empty() {
                    rec.fs_type.clone()
                } else {
                    "ext4".to_owned()
                };
                if !SUPPORTED_FS.contains(&fs.as_str()) {
                    return Err(Error::InvalidArgument {
                        reason: format!(
                            "unsupported fsType {fs:?} (supported: {})",
                            SUPPORTED_FS.join(", ")
                        ),
                    });
                }
                (Access::Mount, fs, mount_flags.clone())
            }
        };
        let wanted = StageRecord {
            staging_path: staging_path.to_owned(),
            access,
            fs_type,
            mount_flags,
        };
        let existing_dev = self.loops(id)?.into_iter().find(|l| !l.read_only);
        if let (Some(prev), Some(_)) = (self.read_stage(id)?, &existing_dev) {
            if prev.staging_path != wanted.staging_path {
                return Err(Error::AlreadyExists {
                    volume_id: id.to_owned(),
                    reason: format!("already staged at {}", prev.staging_path.display()),
                });
            }
            if prev.access != wanted.access || (access == Access::Mount && prev.fs_type != wanted.fs_type) {
                return Err(Error::AlreadyExists {
                    volume_id: id.to_owned(),
                    reason: "already staged with another volume capability".into(),
                });
            }
        }
        if !staging_path.exists() {
            std::fs::create_dir_all(staging_path)
                .map_err(io(format!("create {}", staging_path.display())))?;
        }
        // The record goes first: if we crash after attaching, unstage still knows what to undo.
        let dir = self.dir(id)?;
        let w = wanted.clone();
        tokio::task::spawn_blocking(move || record::write(&dir.join("stage.rec"), STAGE_RECORD, &w))
            .await
            .expect("record task panicked")?;
        let dev = match existing_dev {
            Some(d) => d,
            None => sys::loop_attach(&data, false).await?,
        };
        if access == Access::Mount {
            let dev_nums = sys::loop_dev_numbers(&dev);
            match sys::mount_at(staging_path) {
                Some(m) if Some(m.dev) == dev_nums => {}
                Some(m) => {
                    return Err(Error::FailedPrecondition {
                        volume_id: id.to_owned(),
                        reason: format!("staging path is already a mount of {}", m.source),
                    })
                }
                None => {
                    match sys::probe_fs(&dev.path()).await? {
                        None => {
                            tracing::info!(volume.id = %id, fs = %wanted.fs_type, "making filesystem");
                            sys::mkfs(&dev.path(), &wanted.fs_type).await?;
                        }
                        Some(found) if found != wanted.fs_type => {
                            return Err(Error::FailedPrecondition {
                                volume_id: id.to_owned(),
                                reason: format!(
                                    "volume holds a {found} filesystem, {} was asked for",
                                    wanted.fs_type
                                ),
                            })
                        }
                        Some(_) => {}
                    }
                    // A volume expanded while unstaged: grow ext4 before mounting (offline growth
                    // works without CAP_SYS_RESOURCE); xfs only grows mounted, below.
                    let dev_size = dev.size_bytes()?;
                    if wanted.fs_type == "ext4" && sys::ext4_size(&dev.path()).await? + GROW_SLACK < dev_size
                    {
                        tracing::info!(volume.id = %id, "growing ext4 to the volume size before mounting");
                        sys::ext4_grow_offline(&dev.path()).await?;
                    }
                    let mut options = wanted.mount_flags.clone();
                    // Clones and restores carry their source's XFS UUID; without nouuid the kernel
                    // refuses to mount one while the source is mounted on the same node.
                    if wanted.fs_type == "xfs" && !options.iter().any(|o| o == "nouuid") {
                        options.push("nouuid".into());
                    }
                    sys::mount_fs(&dev.path(), staging_path, &wanted.fs_type, &options).await?;
                    if wanted.fs_type == "xfs"
                        && sys::statvfs(staging_path)?.total_bytes + GROW_SLACK * 16 < dev_size
                    {
                        tracing::info!(volume.id = %id, "growing xfs to the volume size");
                        sys::grow_fs(&dev.path(), staging_path, "xfs").await?;
                    }
                }
            }
        }
        tracing::info!(volume.id = %id, device = %dev.path().display(), staging = %staging_path.display(), "volume staged");
        self.get(id)
    }

    /// Undoes stage: unmounts the staging path, detaches the loop device. OK when not staged.
    pub async fn unstage(&self, id: &str, staging_path: &Path) -> Result<(), Error> {
        let v = self.get(id)?;
        if !v.published.is_empty() {
            return Err(Error::FailedPrecondition {
                volume_id: id.to_owned(),
                reason: format!("still published at {}", v.published[0].display()),
            });
        }
        if let Some(dev) = &v.device {
            let nums = sys::loop_dev_numbers(dev);
            if sys::mount_at(staging_path).is_some_and(|m| Some(m.dev) == nums) {
                sys::unmount_all(staging_path).await?;
            }
        }
        // A device already going away may refuse a second detach; what counts is that it goes.
        let mut detach_error = None;
        for l in self.loops(id)? {
            if let Err(e) = sys::loop_detach(&l).await {
                detach_error = Some(e);
            }
        }
        // A device something still holds open (udev probing it, say) is only marked for removal
        // and goes when the last opener closes: unstage is done once it is really gone.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !self.loops(id)?.is_empty() {
            if tokio::time::Instant::now() > deadline {
                if let Some(e) = detach_error {
                    return Err(e.into());
                }
                return Err(Error::Unavailable {
                    volume_id: id.to_owned(),
                    reason: "its loop device is still held open by another process; retry".into(),
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let stage = self.dir(id)?.join("stage.rec");
        match std::fs::remove_file(&stage) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove stage record")(e)),
        }
        tracing::info!(volume.id = %id, "volume unstaged");
        Ok(())
    }

    /// Bind-mounts a staged volume at `target` (a directory for mount access, a file for block).
    /// `mode` is recorded with the publish: a single-writer publish refuses, and is refused by,
    /// any other publish of the volume (FAILED_PRECONDITION), also after an agent restart.
    pub async fn publish(
        &self,
        id: &str,
        staging_path: &Path,
        target: &Path,
        access: Access,
        read_only: bool,
        mode: PublishMode,
    ) -> Result<(), Error> {
        let v = self.get(id)?;
        let (Some(dev), Some(staged_at)) = (&v.device, &v.staging_path) else {
            return Err(Error::FailedPrecondition {
                volume_id: id.to_owned(),
                reason: "volume is not staged".into(),
            });
        };
        if staged_at != staging_path {
            return Err(Error::FailedPrecondition {
                volume_id: id.to_owned(),
                reason: format!(
                    "volume is staged at {}, not {}",
                    staged_at.display(),
                    staging_path.display()
                ),
            });
        }
        let stage = self.read_stage(id)?;
        if access == Access::Mount && stage.as_ref().is_some_and(|s| s.access == Access::Block) {
            return Err(Error::FailedPrecondition {
                volume_id: id.to_owned(),
                reason: "volume was staged for block access, cannot publish as a filesystem".into(),
            });
        }
        let dir = self.dir(id)?;
        let mut publishes = PublishRecord::read(&dir, &v.published)?;
        if let Some(m) = sys::mount_at(target) {
            let ours = v.published.contains(&target.to_path_buf());
            let is_ro = m.options.split(',').any(|o| o == "ro");
            // A publish from before modes were recorded has no entry: its mode is not known.
            let same_mode = publishes.get(target).is_none_or(|e| e.mode == mode);
            if ours && is_ro == read_only && same_mode {
                return Ok(());
            }
            let reason = if ours && !same_mode {
                format!(
                    "already published at {} with another access mode",
                    target.display()
                )
            } else {
                format!("{} is already a mount of {}", target.display(), m.source)
            };
            return Err(Error::AlreadyExists {
                volume_id: id.to_owned(),
                reason,
            });
        }
        let others: Vec<PathBuf> = v.published.iter().filter(|p| *p != target).cloned().collect();
        if let Some(reason) = publish::conflict(&publishes, &others, mode) {
            return Err(Error::FailedPrecondition {
                volume_id: id.to_owned(),
                reason,
            });
        }
        // The mode is on disk before the mount it describes (see `publish`).
        publishes.set(PublishEntry {
            target: target.to_owned(),
            mode,
            read_only,
        });
        let (rec, d) = (publishes.clone(), dir.clone());
        tokio::task::spawn_blocking(move || rec.write(&d))
            .await
            .expect("record task panicked")?;
        match access {
            Access::Mount => {
                std::fs::create_dir_all(target).map_err(io(format!("create {}", target.display())))?;
                sys::bind_mount(staging_path, target, read_only).await?;
            }
            Access::Block => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
                }
                if target.is_dir() {
                    // Some COs pre-create the target as a directory; block publish needs a file.
                    std::fs::remove_dir(target)
                        .map_err(io(format!("replace directory {}", target.display())))?;
                }
                if !target.exists() {
                    std::fs::File::create(target).map_err(io(format!("create {}", target.display())))?;
                }
                // A read-only publish gets its own read-only loop device: a read-only bind mount of
                // a device node does not stop writes to the device. It reads the file the staged
                // device reads: while the volume hydrates that is the hydrator's file, where a
                // chunk not fetched yet is fetched first (the plain file would read it as zeros).
                let source = if read_only {
                    sys::loop_attach(&self.backing_of(id, dev)?, true).await?
                } else {
                    dev.clone()
                };
                if let Err(e) = sys::bind_mount(&source.path(), target, false).await {
                    if read_only {
                        let _ = sys::loop_detach(&source).await;
                    }
                    return Err(e.into());
                }
            }
        }
        tracing::info!(volume.id = %id, target = %target.display(), read_only, "volume published");
        Ok(())
    }

    /// The file the volume's loop device `dev` is attached to: the hydrator's file while the
    /// volume is staged on it, else the plain backing file.
    fn backing_of(&self, id: &str, dev: &LoopDevice) -> Result<PathBuf, Error> {
        let hp = crate::hydrate::Paths::new(&self.dir(id)?);
        if sys::loops_for(&hp.lazy_data()).contains(dev) {
            Ok(hp.lazy_data())
        } else {
            self.data_path(id)
        }
    }

    /// Undoes publish and removes the target. OK when not published.
    pub async fn unpublish(&self, id: &str, target: &Path) -> Result<(), Error> {
        self.read_record(id)?;
        let loops = self.loops(id)?;
        let ro_loop = sys::loop_of_device_node(target).filter(|l| l.read_only && loops.contains(l));
        sys::unmount_all(target).await?;
        if let Some(l) = ro_loop {
            sys::loop_detach(&l).await?;
        }
        let removed = if target.is_dir() {
            std::fs::remove_dir(target)
        } else {
            std::fs::remove_file(target)
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("remove {}", target.display()))(e)),
        }
        let dir = self.dir(id)?;
        let live = self.get(id)?.published;
        let mut publishes = PublishRecord::read(&dir, &live)?;
        publishes.remove(target);
        tokio::task::spawn_blocking(move || publishes.write(&dir))
            .await
            .expect("record task panicked")?;
        tracing::info!(volume.id = %id, target = %target.display(), "volume unpublished");
        Ok(())
    }

    /// The volume, and `path` if it is one the volume is staged or published at. The volume is
    /// looked up first: an unknown volume is NOT_FOUND whatever the path (as csi-sanity and the
    /// reference driver answer). A path that is not a valid absolute path cannot be where the
    /// volume is, so it is NOT_FOUND as well, and is never touched.
    fn at_path(&self, id: &str, path: &Path) -> Result<VolumeState, Error> {
        let v = self.get(id)?;
        let not_here = || Error::PathNotFound {
            path: path.to_owned(),
        };
        ids::check_path("volume_path", &path.to_string_lossy()).map_err(|_| not_here())?;
        if v.staging_path.as_deref() != Some(path) && !v.published.iter().any(|p| p == path) {
            return Err(not_here());
        }
        Ok(v)
    }

    /// Usage and condition at a staged or published path.
    pub fn stats(&self, id: &str, path: &Path) -> Result<VolumeStats, Error> {
        // The spec's answer for "not staged or published at the given volume_path" is NOT_FOUND.
        let v = self.at_path(id, path)?;
        let md = std::fs::metadata(path).map_err(|_| Error::PathNotFound {
            path: path.to_owned(),
        })?;
        let abnormal = v.abnormal.clone();
        let block_staged = self.read_stage(id)?.is_some_and(|s| s.access == Access::Block);
        if md.file_type().is_block_device() || block_staged {
            let total = match sys::loop_of_device_node(path).or_else(|| v.device.clone()) {
                Some(l) => l.size_bytes()?,
                None => 0,
            };
            return Ok(VolumeStats {
                total_bytes: total,
                used_bytes: None,
                available_bytes: None,
                inodes: None,
                abnormal,
            });
        }
        let fs = sys::statvfs(path)?;
        Ok(VolumeStats {
            total_bytes: fs.total_bytes,
            used_bytes: Some(fs.used_bytes),
            available_bytes: Some(fs.available_bytes),
            inodes: Some((fs.total_inodes, fs.used_inodes, fs.free_inodes)),
            abnormal,
        })
    }

    /// Refreshes the loop device and grows the filesystem to the volume's size. Returns the size.
    /// `path` (where the CO sees the volume) must exist; the volume is looked up first, so an
    /// unknown volume is NOT_FOUND whatever the path.
    pub async fn node_expand(&self, id: &str, path: &Path) -> Result<u64, Error> {
        let v = self.get(id)?;
        let valid = ids::check_path("volume_path", &path.to_string_lossy()).is_ok();
        if !valid || !path.exists() {
            return Err(Error::PathNotFound {
                path: path.to_owned(),
            });
        }
        let Some(dev) = &v.device else {
            return Err(Error::FailedPrecondition {
                volume_id: id.to_owned(),
                reason: "volume is not staged".into(),
            });
        };
        sys::loop_refresh(dev).await?;
        if let (Some(stage), Some(staged_at)) = (self.read_stage(id)?, &v.staging_path) {
            if stage.access == Access::Mount {
                if let Err(e) = sys::grow_fs(&dev.path(), staged_at, &stage.fs_type).await {
                    // Documented: without the capability, ext4 grows at the next stage (offline).
                    if stage.fs_type == "ext4" && !sys::has_capability(sys::CAP_SYS_RESOURCE) {
                        return Err(Error::FailedPrecondition {
                            volume_id: id.to_owned(),
                            reason: format!(
                                "online ext4 growth needs CAP_SYS_RESOURCE, which the node plugin \
                                 does not have ({e}); the filesystem grows when the volume is next staged"
                            ),
                        });
                    }
                    return Err(e.into());
                }
            }
        }
        tracing::info!(volume.id = %id, "volume expanded on node");
        Ok(dev.size_bytes()?)
    }
}

impl VolumeManager {
    /// The volume's lineage, if it has had a snapshot or came from one.
    pub fn lineage(&self, id: &str) -> Result<Option<LineageRecord>, Error> {
        let dir = self.dir(id)?;
        if let Some(l) = record::read(&dir.join("lineage.rec"), LINEAGE_RECORD)? {
            return Ok(Some(l));
        }
        // While hydrating, the volume continues the lineage of the snapshot it comes from.
        let p = crate::hydrate::Paths::new(&dir);
        Ok(
            record::read::<crate::hydrate::HydrateRecord>(&p.record(), crate::hydrate::HYDRATE_RECORD)?
                .map(|h| h.lineage),
        )
    }

    /// Records a committed snapshot of the volume as the parent of its next one, unless a newer
    /// capture is already recorded. OK when the volume was deleted meanwhile.
    pub fn record_snapshot(&self, id: &str, rec: &LineageRecord) -> Result<(), Error> {
        let dir = self.dir(id)?;
        if !dir.exists() {
            return Ok(());
        }
        if let Some(cur) = self.lineage(id)? {
            if cur.last_capture_unix_ms > rec.last_capture_unix_ms {
                return Ok(());
            }
        }
        Ok(record::write(&dir.join("lineage.rec"), LINEAGE_RECORD, rec)?)
    }

    /// The reflink image of the volume's newest committed snapshot, if kept: (path, snapshot id).
    pub fn base(&self, id: &str) -> Result<Option<(PathBuf, String)>, Error> {
        let dir = self.dir(id)?;
        let rec: Option<BaseRecord> = record::read(&dir.join("base.rec"), BASE_RECORD)?;
        Ok(rec
            .map(|r| (dir.join("base.img"), r.snapshot_id))
            .filter(|(p, _)| p.exists()))
    }

    /// Keeps `image` (a reflink clone captured for `snapshot_id`) as the base the next snapshot is
    /// compared with, unless a newer capture is already the base. Removes `image` otherwise.
    pub fn set_base(
        &self,
        id: &str,
        image: &Path,
        snapshot_id: &str,
        capture_unix_ms: i64,
    ) -> Result<(), Error> {
        let dir = self.dir(id)?;
        let current: Option<BaseRecord> = if dir.exists() {
            record::read(&dir.join("base.rec"), BASE_RECORD)?
        } else {
            None
        };
        if !dir.exists()
            || current
                .as_ref()
                .is_some_and(|c| c.capture_unix_ms > capture_unix_ms)
        {
            let _ = std::fs::remove_file(image);
            return Ok(());
        }
        // Record first pointing at nothing valid, then the image: a crash in between leaves a
        // record whose snapshot id no longer matches the image, which is never used.
        let _ = std::fs::remove_file(dir.join("base.rec"));
        std::fs::rename(image, dir.join("base.img")).map_err(io("keep base image"))?;
        let rec = BaseRecord {
            snapshot_id: snapshot_id.to_owned(),
            capture_unix_ms,
        };
        Ok(record::write(&dir.join("base.rec"), BASE_RECORD, &rec)?)
    }

    /// Marks a hydration complete: the volume inherits the snapshot's lineage and runs on its
    /// plain file. The hydration record goes last, so a crash in between only repeats this.
    pub fn finish_hydration(&self, id: &str, lineage: &LineageRecord) -> Result<(), Error> {
        let dir = self.dir(id)?;
        // A snapshot taken while hydrating has already recorded a newer parent: keep it.
        if record::read::<LineageRecord>(&dir.join("lineage.rec"), LINEAGE_RECORD)?.is_none() {
            record::write(&dir.join("lineage.rec"), LINEAGE_RECORD, lineage)?;
        }
        let p = crate::hydrate::Paths::new(&dir);
        for f in p.working_files() {
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(format!("remove {}", f.display()))(e)),
            }
        }
        let _ = std::fs::remove_dir(p.mount_point());
        std::fs::remove_file(p.record()).map_err(io("remove hydration record"))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync volume directory"))
    }
}

fn source_ids(s: &VolumeSource) -> (&str, &str) {
    match s {
        VolumeSource::Empty => ("", ""),
        VolumeSource::Snapshot(id) => (id.as_str(), ""),
        VolumeSource::Volume(id) => ("", id.as_str()),
    }
}

/// Bytes allocated on disk by a (sparse) file; 0 if it is missing.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}
