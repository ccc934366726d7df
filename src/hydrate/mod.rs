//! Lazy hydration: a volume restored from a snapshot is usable at once and fills in behind.
//!
//! CreateVolume from a snapshot (outside a fast-restore zone) only writes the records below and
//! returns. A hydrator process (`strata hydrate`, started by the agent) serves the volume's data
//! through a FUSE file, `lazy/data.img`, which is what the loop device is attached to while the
//! volume hydrates:
//!
//! * a read or write of a chunk that is not local yet fetches that chunk first, ahead of the
//!   background queue (on-demand fetches do not wait for a transfer slot);
//! * background workers fetch the remaining chunks in parallel, starting after the last on-demand
//!   read (sequential readers find their next chunk already there);
//! * every chunk is verified against its BLAKE3 hash before it is written; a mismatch is an I/O
//!   error to the reader, never silent data.
//!
//! Once every chunk is local the hydrator drops the restore lease; the agent retires it when the
//! volume is not attached to it (at once when unstaged, else at the next unstage), and from then on
//! the loop device uses the plain `data.img`.
//!
//! On disk, in the volume's directory:
//!
//! ```text
//! data.img           the plain file; chunks land at their offsets, user writes too
//! hydrate.rec        HydrateRecord (record envelope)
//! hydrate.manifest   the snapshot's manifest, so a deleted snapshot cannot stop the hydration
//! hydrate.map        one byte per chunk: 0 absent, 1 fetched, 2 written since (see below)
//! hydrate.status     HydrateStatus (JSON), rewritten by the hydrator a few times a second
//! lazy/              the FUSE mount point while a hydrator runs
//! ```
//!
//! # Writes are never overwritten
//!
//! A write first makes its chunks local (fetching them if needed), and a fetch writes a chunk only
//! while its state is "absent", with one fetch per chunk at a time. So a chunk arriving later can
//! never land on data written meanwhile.
//!
//! # Crashes
//!
//! The map byte of a chunk is written after its data, both through the page cache. A killed
//! hydrator or agent loses neither, and a new hydrator resumes from the map. After a power loss
//! the map may claim a fetched chunk whose data never reached the disk; a hydrator that starts in
//! a different boot than the one that last ran therefore re-verifies every "fetched" chunk
//! against its hash and fetches again the ones that do not match. A chunk only becomes "written"
//! once its fetched data is on disk (the first write to a freshly fetched chunk syncs the file
//! first), and an fsync from the filesystem above syncs the data and the map.

pub mod bench;
pub mod engine;
pub mod fuse;
pub mod pods;
pub mod serve;
pub mod supervise;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::volume::LineageRecord;

/// Record kind of `hydrate.rec`.
pub const HYDRATE_RECORD: &str = "hydrate";

/// What a hydration restores, written when the volume is created.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HydrateRecord {
    /// The snapshot being restored.
    pub snapshot_id: String,
    /// The store lease protecting its chunks until the hydration is complete.
    pub lease_id: String,
    /// The lineage the volume continues once hydrated.
    pub lineage: LineageRecord,
}

/// Progress a hydrator publishes in `hydrate.status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HydrateStatus {
    /// The hydrator's process id.
    pub pid: u32,
    /// The kernel boot the hydrator runs in (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// The snapshot.
    pub snapshot_id: String,
    /// Chunks of the snapshot's range.
    pub total_chunks: u64,
    /// Chunks local (fetched, written, or zero in the snapshot).
    pub local_chunks: u64,
    /// Chunks fetched by the background workers.
    pub fetched_background: u64,
    /// Chunks fetched because a read or write needed them first.
    pub fetched_on_demand: u64,
    /// Bytes downloaded (as stored: compressed).
    pub bytes_fetched: u64,
    /// Chunks re-verified after a power loss that had to be fetched again.
    pub refetched_after_crash: u64,
    /// When this hydrator started.
    pub started_unix_ms: i64,
    /// When this status was written.
    pub updated_unix_ms: i64,
    /// When every chunk was local (0 while not).
    pub completed_unix_ms: i64,
    /// The last error, if any.
    pub error: String,
    /// Whether that error is permanent (a chunk missing or corrupt in the store).
    pub permanent: bool,
}

impl HydrateStatus {
    /// Every chunk is local.
    pub fn complete(&self) -> bool {
        self.completed_unix_ms > 0
    }
}

/// Paths of a volume's hydration files.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The volume directory.
    pub dir: PathBuf,
}

impl Paths {
    /// Paths under a volume directory.
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned() }
    }
    /// The plain data file.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data.img")
    }
    /// `hydrate.rec`.
    pub fn record(&self) -> PathBuf {
        self.dir.join("hydrate.rec")
    }
    /// `hydrate.manifest`.
    pub fn manifest(&self) -> PathBuf {
        self.dir.join("hydrate.manifest")
    }
    /// `hydrate.map`.
    pub fn map(&self) -> PathBuf {
        self.dir.join("hydrate.map")
    }
    /// `hydrate.status`.
    pub fn status(&self) -> PathBuf {
        self.dir.join("hydrate.status")
    }
    /// The FUSE mount point.
    pub fn mount_point(&self) -> PathBuf {
        self.dir.join("lazy")
    }
    /// The FUSE-served file the loop device uses while hydrating.
    pub fn lazy_data(&self) -> PathBuf {
        self.mount_point().join("data.img")
    }
    /// The hydrator's log.
    pub fn log(&self) -> PathBuf {
        self.dir.join("hydrate.log")
    }
    /// Whether a live hydrator serves the file (a FUSE mount whose server died answers ENOTCONN;
    /// no mount, ENOENT).
    pub fn served(&self) -> bool {
        std::fs::metadata(self.lazy_data()).is_ok()
    }
    /// Whether the volume is (still) hydrating.
    pub fn hydrating(&self) -> bool {
        self.record().exists()
    }
    /// Reads the status, if a hydrator wrote one.
    pub fn read_status(&self) -> Option<HydrateStatus> {
        let text = std::fs::read(self.status()).ok()?;
        serde_json::from_slice(&text).ok()
    }
    /// Writes the status atomically.
    pub fn write_status(&self, s: &HydrateStatus) -> std::io::Result<()> {
        let tmp = self.dir.join(".hydrate.status.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(s).expect("status serializes"))?;
        std::fs::rename(&tmp, self.status())
    }
    /// The hydration files besides the record, removed (before it) once the volume runs on its
    /// plain file.
    pub fn working_files(&self) -> [PathBuf; 4] {
        [
            self.manifest(),
            self.map(),
            self.status(),
            self.dir.join(".hydrate.status.tmp"),
        ]
    }
}

/// What a volume restored lazily from snapshot `m` starts with, its chunks held by `lease_id`.
pub fn seed(
    m: &crate::proto::store::Manifest,
    lease_id: String,
    key: Option<crate::snapshot::crypto::LineageKey>,
) -> crate::volume::HydrateSeed {
    crate::volume::HydrateSeed {
        record: HydrateRecord {
            snapshot_id: m.snapshot_id.clone(),
            lease_id,
            lineage: LineageRecord::of(m, key),
        },
        manifest: crate::snapshot::manifest::encode_manifest(m).to_vec(),
        map: engine::initial_map(m),
    }
}

/// Writes the files a lazily restored volume starts with into its (new) directory.
pub fn write_seed(dir: &Path, seed: &crate::volume::HydrateSeed) -> Result<(), crate::volume::Error> {
    let p = Paths::new(dir);
    let io = |what: &'static str| {
        move |source| crate::volume::Error::Io {
            context: format!("write {what}"),
            source,
        }
    };
    std::fs::write(p.manifest(), &seed.manifest).map_err(io("hydrate.manifest"))?;
    std::fs::write(p.map(), &seed.map).map_err(io("hydrate.map"))?;
    crate::volume::record::write(&p.record(), HYDRATE_RECORD, &seed.record)?;
    Ok(())
}

/// The current kernel boot id.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Chunk states in `hydrate.map`.
pub mod state {
    /// Not local yet.
    pub const ABSENT: u8 = 0;
    /// Fetched from the store (or zero in the snapshot) and unchanged since.
    pub const FETCHED: u8 = 1;
    /// Written through the volume after it was local; its data is no longer the snapshot's.
    pub const WRITTEN: u8 = 2;
}
