//! The node side of snapshots: captures, background uploads (resumed after a restart), and
//! restores of new volumes from snapshots.
//!
//! On disk, per pending snapshot, under the storage directory:
//!
//! ```text
//! snapshots/<snap-id>/pending.rec    the UploadSpec (record envelope)
//! snapshots/<snap-id>/clone.img      the captured point-in-time image
//! snapshots/<snap-id>/progress.log   chunks already uploaded (index hash size)
//! snapshots/<snap-id>/failed.rec     why the upload ended for good (FailureRecord)
//! ```
//!
//! The directory is removed once the manifest is committed, or when the snapshot is deleted.
//!
//! An upload that fails transiently (the store still failing after its own retries, a dropped
//! connection) is restarted here, in the background, with a backoff from [`RETRY_FIRST`] doubling
//! to [`RETRY_MAX`], until it commits or is cancelled. One that fails for good (see
//! [`UploadError::is_permanent`]) ends the snapshot: `failed.rec` is written, the image is dropped,
//! and every later CreateSnapshot of that id answers [`SnapshotError::Failed`], also after a
//! restart. It is never captured again under the same id: a new capture would be another instant
//! than the one the first CreateSnapshot answered with.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::capture::{CaptureError, CloneJob};
use super::crypto::{Kek, KeyError, LineageKey};
use super::manifest::{self, read_manifest};
use super::restore::{self, RestoreError};
use super::upload::{self, now_ms, Progress, UploadError, UploadSpec};
use crate::proto::agent::SnapshotStatus;
use crate::proto::store::Manifest;
use crate::store::Store;
use crate::volume::{record, Access, HydrateSeed, LineageRecord, VolumeManager};

const PENDING_RECORD: &str = "pending-snapshot";
const FAILED_RECORD: &str = "failed-snapshot";

/// First wait before an upload that failed transiently is started again.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between two attempts of an upload.
pub const RETRY_MAX: Duration = Duration::from_secs(60);
/// Longest failure reason kept and reported: it ends up in a gRPC message (8 KiB of metadata at
/// most) and in the VolumeSnapshot's status.
const REASON_LEN: usize = 1024;

/// Why an upload ended for good, kept beside the pending record so that a restarted agent reports
/// the same failure instead of resuming (or capturing again under the same id).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
struct FailureRecord {
    /// The error, as reported to the CO.
    reason: String,
    /// When the upload failed.
    failed_unix_ms: i64,
}

/// Errors of node snapshot operations, mapped to gRPC codes in `csi::status`.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// No store is configured on this node.
    #[error("no snapshot store is configured (--store)")]
    NoStore,
    /// Volume layer failure (not found, busy, ...).
    #[error(transparent)]
    Volume(#[from] crate::volume::Error),
    /// The snapshot exists for another volume.
    #[error("snapshot {snapshot_id} already exists for volume {volume_id}")]
    OtherVolume {
        /// The snapshot.
        snapshot_id: String,
        /// Its source volume.
        volume_id: String,
    },
    /// The snapshot does not exist (or is not committed).
    #[error("snapshot {snapshot_id} does not exist")]
    NotFound {
        /// The snapshot.
        snapshot_id: String,
    },
    /// Store or manifest failure.
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    /// Capture failed, or could not be made within the freeze limit.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// A group snapshot was promised only in part and some members are already committed.
    #[error(
        "group members {snapshot_ids:?} were captured at different times; delete the group and take it again"
    )]
    PartialGroup {
        /// The members.
        snapshot_ids: Vec<String>,
    },
    /// A restore failed for good (data missing or corrupt).
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// A key is missing, wrong or malformed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The snapshot's upload failed for good: it will never be ready.
    #[error(
        "snapshot {snapshot_id} failed and will not become ready: {reason}; delete it and take a new snapshot"
    )]
    Failed {
        /// The snapshot.
        snapshot_id: String,
        /// Why its upload ended.
        reason: String,
    },
}

#[derive(Debug)]
enum JobState {
    /// Uploading, or waiting to start again after a transient failure.
    Running {
        /// The last transient failure, reported with the progress until the upload commits.
        last_error: Option<String>,
    },
    /// Ended for good (see [`FailureRecord`]).
    Failed(String),
}

/// One volume of a capture.
#[derive(Debug, Clone)]
pub struct Member {
    /// The volume.
    pub volume_id: String,
    /// Its new snapshot.
    pub snapshot_id: String,
    /// The CreateSnapshot name.
    pub name: String,
}

struct Prepared {
    member: Member,
    data: PathBuf,
    volume: crate::volume::VolumeState,
    lineage: LineageRecord,
    dir: PathBuf,
    mount: Option<PathBuf>,
    hydrating: Option<PathBuf>,
    also: Vec<(PathBuf, PathBuf)>,
}

#[derive(Debug)]
struct Job {
    spec: UploadSpec,
    progress: Progress,
    state: Mutex<JobState>,
    cancel: CancellationToken,
    done: tokio::sync::Notify,
}

/// Node-side snapshot service.
#[derive(Debug)]
pub struct NodeSnapshots {
    manager: Arc<VolumeManager>,
    store: Option<Store>,
    /// Chunk size of new lineages.
    chunk_size: u32,
    /// Parallel chunk transfers per upload or restore.
    concurrency: usize,
    /// Uploads in progress or failed, by snapshot id.
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    /// Where uploads and restores are counted.
    metrics: Arc<crate::telemetry::Metrics>,
    /// Fast-restore images being hydrated, by snapshot id.
    fsr_jobs: Mutex<HashMap<String, Arc<FsrJob>>>,
}

#[derive(Debug)]
struct FsrJob {
    progress: Progress,
    cancel: CancellationToken,
}

impl NodeSnapshots {
    /// A service over `manager`; snapshots need `store`.
    pub fn new(
        manager: Arc<VolumeManager>,
        store: Option<Store>,
        chunk_size: u32,
        concurrency: usize,
        metrics: Arc<crate::telemetry::Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            manager,
            store,
            chunk_size,
            concurrency,
            jobs: Mutex::default(),
            metrics,
            fsr_jobs: Mutex::default(),
        })
    }

    fn store(&self) -> Result<&Store, SnapshotError> {
        self.store.as_ref().ok_or(SnapshotError::NoStore)
    }

    fn pending_dir(&self, snapshot_id: &str) -> PathBuf {
        upload::pending_dir(self.manager.root(), snapshot_id)
    }

    /// Restarts uploads interrupted by a restart of the agent (hydrations resume on their own, see
    /// [`crate::hydrate::supervise`]).
    pub fn resume(self: &Arc<Self>) {
        let dir = self.manager.root().join("snapshots");
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let rec = e.path().join("pending.rec");
                match record::read::<UploadSpec>(&rec, PENDING_RECORD) {
                    Ok(Some(spec)) => {
                        match record::read::<FailureRecord>(&e.path().join("failed.rec"), FAILED_RECORD) {
                            Ok(Some(f)) => {
                                tracing::info!(snapshot.id = %spec.snapshot_id, reason = %f.reason, "snapshot failed before the restart; not resuming");
                                self.insert_failed(spec, f.reason);
                            }
                            Ok(None) => {
                                tracing::info!(snapshot.id = %spec.snapshot_id, "resuming upload");
                                self.start_upload(spec);
                            }
                            Err(err) => {
                                // Written only on a permanent failure: whatever it said, the upload
                                // had ended for good, and the capture must not be redone.
                                tracing::error!(snapshot.id = %spec.snapshot_id, error = %err, "unreadable failure record");
                                self.insert_failed(
                                    spec,
                                    format!("the upload failed (record unreadable: {err})"),
                                );
                            }
                        }
                    }
                    Ok(None) => {
                        // Capture never completed: nothing was promised to anyone yet.
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                    Err(err) => {
                        tracing::error!(path = %rec.display(), error = %err, "unreadable pending snapshot")
                    }
                }
            }
        }
    }

    fn status_of(&self, job: &Job) -> SnapshotStatus {
        SnapshotStatus {
            snapshot_id: job.spec.snapshot_id.clone(),
            volume_id: job.spec.volume_id.clone(),
            name: job.spec.name.clone(),
            ready: false,
            capture_unix_ms: job.spec.capture_unix_ms,
            size_bytes: job.spec.size_bytes,
            chunks_done: job.progress.done.load(Ordering::Relaxed),
            chunks_total: job.progress.total.load(Ordering::Relaxed),
            error: match &*job.state.lock().expect("job state") {
                JobState::Failed(e) => e.clone(),
                JobState::Running { last_error } => last_error.clone().unwrap_or_default(),
            },
        }
    }

    /// Status of a committed snapshot.
    pub fn committed_status(m: &Manifest) -> SnapshotStatus {
        let n = m.size_bytes.div_ceil(u64::from(m.chunk_size.max(1)));
        SnapshotStatus {
            snapshot_id: m.snapshot_id.clone(),
            volume_id: m.volume_id.clone(),
            name: m.name.clone(),
            ready: true,
            capture_unix_ms: m.capture_unix_ms,
            size_bytes: m.size_bytes,
            chunks_done: n,
            chunks_total: n,
            error: String::new(),
        }
    }

    /// Captures and starts uploading, or reports the snapshot's progress if already started.
    pub async fn create(
        self: &Arc<Self>,
        volume_id: &str,
        snapshot_id: &str,
        name: &str,
        tags: std::collections::BTreeMap<String, String>,
        kek: Option<&Kek>,
    ) -> Result<SnapshotStatus, SnapshotError> {
        let member = Member {
            volume_id: volume_id.into(),
            snapshot_id: snapshot_id.into(),
            name: name.into(),
        };
        let mut statuses = self
            .create_group(std::slice::from_ref(&member), tags, kek)
            .await?;
        Ok(statuses.remove(0))
    }

    /// The status of a member already captured (in progress or committed); an error if its upload
    /// failed for good.
    async fn existing(
        self: &Arc<Self>,
        store: &Store,
        m: &Member,
    ) -> Result<Option<SnapshotStatus>, SnapshotError> {
        let existing = self.jobs.lock().expect("jobs").get(&m.snapshot_id).cloned();
        if let Some(job) = existing {
            if job.spec.volume_id != m.volume_id {
                return Err(SnapshotError::OtherVolume {
                    snapshot_id: m.snapshot_id.clone(),
                    volume_id: job.spec.volume_id.clone(),
                });
            }
            if let JobState::Failed(reason) = &*job.state.lock().expect("job state") {
                return Err(SnapshotError::Failed {
                    snapshot_id: m.snapshot_id.clone(),
                    reason: reason.clone(),
                });
            }
            return Ok(Some(self.status_of(&job)));
        }
        if let Some(man) = read_manifest(store, &m.snapshot_id).await? {
            if man.volume_id != m.volume_id {
                return Err(SnapshotError::OtherVolume {
                    snapshot_id: m.snapshot_id.clone(),
                    volume_id: man.volume_id,
                });
            }
            return Ok(Some(Self::committed_status(&man)));
        }
        Ok(None)
    }

    /// Captures several volumes of this node at one instant (every mounted filesystem frozen
    /// before the first clone and thawed after the last: crash-consistent across them), then
    /// uploads each in the background. Repeated calls report progress. One member is a plain
    /// CreateSnapshot. With `kek`, every member is encrypted (see [`Self::prepare`]).
    pub async fn create_group(
        self: &Arc<Self>,
        members: &[Member],
        tags: std::collections::BTreeMap<String, String>,
        kek: Option<&Kek>,
    ) -> Result<Vec<SnapshotStatus>, SnapshotError> {
        let store = self.store()?.clone();
        let mut known = Vec::with_capacity(members.len());
        for m in members {
            known.push(self.existing(&store, m).await?);
        }
        if known.iter().all(Option::is_some) {
            return Ok(known.into_iter().flatten().collect());
        }
        if known.iter().any(Option::is_some) {
            // Promised only in part (a crash while writing the records): the members must share
            // one instant, so the partial ones are dropped and the whole group captured again.
            if known.iter().flatten().any(|s| s.ready) {
                return Err(SnapshotError::PartialGroup {
                    snapshot_ids: members.iter().map(|m| m.snapshot_id.clone()).collect(),
                });
            }
            for (m, k) in members.iter().zip(&known) {
                if k.is_some() {
                    tracing::warn!(snapshot.id = %m.snapshot_id, "dropping a partly promised group member");
                    self.abort(&m.snapshot_id).await?;
                }
            }
        }
        let mut preps = Vec::with_capacity(members.len());
        for m in members {
            preps.push(self.prepare(m, kek)?);
        }
        let mut mounts: Vec<PathBuf> = preps.iter().filter_map(|p| p.mount.clone()).collect();
        mounts.sort();
        mounts.dedup();
        let jobs: Vec<CloneJob> = preps
            .iter()
            .map(|p| CloneJob {
                data: p.data.clone(),
                clone: p.dir.join("clone.img"),
                also: p.also.clone(),
            })
            .collect();
        let captured = match self
            .manager
            .freezer()
            .capture(&members[0].snapshot_id, mounts, jobs)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                for p in &preps {
                    let _ = std::fs::remove_dir_all(&p.dir);
                }
                return Err(e.into());
            }
        };
        let capture_unix_ms = captured.instant_unix_ms;
        let mut specs = Vec::with_capacity(preps.len());
        for (p, reflinked) in preps.into_iter().zip(captured.reflinked) {
            let m = p.member;
            // The kept image of the parent, if this capture can be compared with it by extents.
            let base = match self.manager.base(&m.volume_id)? {
                Some((path, snap)) if reflinked && snap == p.lineage.last_snapshot_id => {
                    self.private_base(&m.volume_id, &path, &snap, &p.dir).await
                }
                _ => None,
            };
            specs.push(UploadSpec {
                snapshot_id: m.snapshot_id.clone(),
                name: m.name.clone(),
                volume_id: m.volume_id.clone(),
                lineage: p.lineage.lineage,
                parent_id: p.lineage.last_snapshot_id,
                capture_unix_ms,
                size_bytes: p.volume.record.capacity_bytes,
                chunk_size: p.lineage.chunk_size,
                fs_type: p.volume.record.fs_type.clone(),
                block: p.volume.record.access == Access::Block,
                tags: tags.clone(),
                reflinked,
                base,
                hydrating: p.hydrating,
                key: p.lineage.key,
            });
        }
        // Only now are the snapshots promised: the records make a restart resume them.
        for spec in &specs {
            let dir = self.pending_dir(&spec.snapshot_id);
            record::write(&dir.join("pending.rec"), PENDING_RECORD, spec)
                .map_err(crate::volume::Error::from)?;
            tracing::info!(snapshot.id = %spec.snapshot_id, volume.id = %spec.volume_id, parent = %spec.parent_id, "snapshot captured");
        }
        Ok(specs
            .into_iter()
            .map(|spec| {
                let job = self.start_upload(spec);
                self.status_of(&job)
            })
            .collect())
    }

    /// Everything a member's capture needs, before anything is frozen.
    ///
    /// Encryption: an encrypted lineage stays encrypted with its data key (re-wrapped under `kek`
    /// when one is given and it is another key: rotation by a class change). A plaintext volume
    /// snapshotted with a `kek` starts a new encrypted lineage (its first snapshot is full:
    /// plaintext chunks cannot be reused).
    fn prepare(&self, m: &Member, kek: Option<&Kek>) -> Result<Prepared, SnapshotError> {
        let v = self.manager.get(&m.volume_id)?;
        let new_lineage = |key: Option<&Kek>| {
            let lineage = format!("lin-{}", uuid::Uuid::new_v4());
            LineageRecord {
                key: key.map(|k| LineageKey::generate(k, &lineage)),
                lineage,
                last_snapshot_id: String::new(),
                last_capture_unix_ms: 0,
                chunk_size: self.chunk_size,
            }
        };
        let lineage = match (self.manager.lineage(&m.volume_id)?, kek) {
            (None, kek) => new_lineage(kek),
            (Some(l), Some(kek)) if l.key.is_none() => {
                tracing::info!(volume.id = %m.volume_id, old_lineage = %l.lineage, "an encrypted snapshot of a plaintext volume starts a new lineage (full upload)");
                new_lineage(Some(kek))
            }
            (Some(mut l), Some(kek)) => {
                let key = l.key.take().expect("checked above");
                l.key = Some(if key.kek_fingerprint == kek.fingerprint() {
                    key
                } else {
                    tracing::info!(volume.id = %m.volume_id, lineage = %l.lineage, from = %key.kek_fingerprint, to = %kek.fingerprint(), "data key re-wrapped under the class's key");
                    key.rewrapped(kek, &l.lineage)
                });
                l
            }
            (Some(l), None) => l,
        };
        let dir = self.pending_dir(&m.snapshot_id);
        let io = |d: &Path| {
            let context = format!("create {}", d.display());
            move |source| crate::volume::Error::Io { context, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let _ = std::fs::remove_file(dir.join("clone.img"));
        let mount = v
            .staging_path
            .clone()
            .filter(|_| v.record.access == Access::Mount);
        // A volume still hydrating: its chunk map at the captured instant tells which chunks are
        // still the restored snapshot's (taken from it without reading) and which were written.
        let hp = crate::hydrate::Paths::new(&self.manager.volume_dir(&m.volume_id)?);
        let hydrating = hp.hydrating().then(|| dir.join("hydrating"));
        let mut also = Vec::new();
        if let Some(h) = &hydrating {
            std::fs::create_dir_all(h).map_err(io(h))?;
            also.push((hp.map(), h.join("hydrate.map")));
            also.push((hp.manifest(), h.join("hydrate.manifest")));
        }
        Ok(Prepared {
            member: m.clone(),
            data: self.manager.data_path(&m.volume_id)?,
            volume: v,
            lineage,
            dir,
            mount,
            hydrating,
            also,
        })
    }

    /// A private reflink of the volume's kept base image, taken for one upload: the kept image may
    /// be replaced by a newer snapshot's while this upload (or its resumption) still compares
    /// against the parent's. Valid only if the base record still names `parent` afterwards
    /// (`set_base` removes the record before replacing the image).
    async fn private_base(&self, volume_id: &str, kept: &Path, parent: &str, dir: &Path) -> Option<PathBuf> {
        let private = dir.join("base.img");
        let _ = std::fs::remove_file(&private);
        let cloned = super::capture::clone_file(kept, &private).await.unwrap_or(false);
        let still = matches!(self.manager.base(volume_id), Ok(Some((_, s))) if s == parent);
        if cloned && still {
            return Some(private);
        }
        let _ = std::fs::remove_file(&private);
        None
    }

    fn start_upload(self: &Arc<Self>, spec: UploadSpec) -> Arc<Job> {
        let job = self.insert_job(spec, JobState::Running { last_error: None });
        let (me, j) = (self.clone(), job.clone());
        tokio::spawn(async move { me.run_upload(j).await });
        job
    }

    fn insert_job(&self, spec: UploadSpec, state: JobState) -> Arc<Job> {
        let job = Arc::new(Job {
            spec,
            progress: Progress::default(),
            state: Mutex::new(state),
            cancel: CancellationToken::new(),
            done: tokio::sync::Notify::new(),
        });
        self.jobs
            .lock()
            .expect("jobs")
            .insert(job.spec.snapshot_id.clone(), job.clone());
        job
    }

    /// Registers a snapshot whose upload failed for good (reported, never run again).
    fn insert_failed(&self, spec: UploadSpec, reason: String) {
        self.insert_job(spec, JobState::Failed(reason));
    }

    /// Uploads until the snapshot commits, fails for good, or is cancelled: transient failures
    /// start the upload again (it resumes from its progress log) after a growing wait.
    async fn upload_with_retries(&self, store: &Store, job: &Job) -> Result<Manifest, UploadError> {
        let id = &job.spec.snapshot_id;
        let dir = self.pending_dir(id);
        let mut delay = RETRY_FIRST;
        loop {
            let started = std::time::Instant::now();
            self.metrics.snapshot.in_progress.inc();
            let result = upload::upload(
                store,
                &job.spec,
                &dir.join("clone.img"),
                &dir.join("progress.log"),
                &job.progress,
                self.concurrency,
                &job.cancel,
            )
            .await;
            self.metrics.snapshot.in_progress.dec();
            let e = match result {
                Err(e) if !e.is_permanent() && !matches!(e, UploadError::Cancelled) => e,
                other => return other,
            };
            // An attempt that ran longer than the longest wait got somewhere: start the
            // backoff over, so a long upload with rare hiccups does not wait a minute for each.
            if started.elapsed() > RETRY_MAX {
                delay = RETRY_FIRST;
            }
            self.metrics.snapshot.retried();
            tracing::warn!(snapshot.id = %id, error = %e, retry_in = ?delay, "snapshot upload failed transiently; retrying");
            if let JobState::Running { last_error } = &mut *job.state.lock().expect("job state") {
                *last_error = Some(bounded(&e.to_string()));
            }
            tokio::select! {
                _ = job.cancel.cancelled() => return Err(UploadError::Cancelled),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    /// Ends a snapshot whose upload failed for good: the failure is recorded durably first (a
    /// restart must report it, not resume or capture again), then the image and the lease go.
    async fn fail(&self, store: &Store, job: &Job, reason: String) {
        let id = &job.spec.snapshot_id;
        let dir = self.pending_dir(id);
        let rec = FailureRecord {
            reason: reason.clone(),
            failed_unix_ms: now_ms(),
        };
        if let Err(e) = record::write(&dir.join("failed.rec"), FAILED_RECORD, &rec) {
            tracing::error!(snapshot.id = %id, error = %e, "could not record the failure; a restart will retry the upload");
        }
        *job.state.lock().expect("job state") = JobState::Failed(reason);
        for f in ["clone.img", "base.img", "progress.log"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let _ = std::fs::remove_dir_all(dir.join("hydrating"));
        // Nothing relies on the chunks any more; DeleteSnapshot removes the lease too, if this
        // fails (the store may be what failed).
        if let Err(e) = store.delete(&manifest::lease_key(id)).await {
            tracing::warn!(snapshot.id = %id, error = %e, "could not remove the failed upload's lease");
        }
    }

    async fn run_upload(self: Arc<Self>, job: Arc<Job>) {
        let Some(store) = self.store.clone() else { return };
        let id = job.spec.snapshot_id.clone();
        let dir = self.pending_dir(&id);
        let result = self.upload_with_retries(&store, &job).await;
        match result {
            Ok(m) => {
                let secs = (m.committed_unix_ms - m.capture_unix_ms).max(0) as f64 / 1000.0;
                self.metrics
                    .snapshot
                    .committed(&m.stats.unwrap_or_default(), secs);
                let lineage = LineageRecord::of(&m, job.spec.key.clone());
                if let Err(e) = self.manager.record_snapshot(&m.volume_id, &lineage) {
                    tracing::warn!(snapshot.id = %id, error = %e, "could not record the snapshot as the volume's parent");
                }
                if job.spec.reflinked {
                    let clone = dir.join("clone.img");
                    if let Err(e) =
                        self.manager
                            .set_base(&m.volume_id, &clone, &m.snapshot_id, m.capture_unix_ms)
                    {
                        tracing::warn!(snapshot.id = %id, error = %e, "could not keep the base image");
                    }
                }
                let _ = std::fs::remove_dir_all(&dir);
                self.jobs.lock().expect("jobs").remove(&id);
                let st = m.stats.unwrap_or_default();
                tracing::info!(snapshot.id = %id, bytes_read = st.bytes_read, bytes_uploaded = st.bytes_uploaded,
                    chunks_new = st.chunks_new, chunks_reused = st.chunks_reused, "snapshot committed");
            }
            Err(UploadError::Cancelled) => {}
            Err(e) => {
                self.metrics.snapshot.failed();
                tracing::error!(snapshot.id = %id, error = %e, "snapshot upload failed for good; it will not be retried");
                self.fail(&store, &job, bounded(&e.to_string())).await;
            }
        }
        job.done.notify_waiters();
    }

    /// Stops every upload and its retries (the agent shuts down); their records stay, so they
    /// resume after the restart.
    pub fn stop_uploads(&self) {
        for job in self.jobs.lock().expect("jobs").values() {
            job.cancel.cancel();
        }
    }

    /// Uploads not yet committed.
    pub fn pending(&self) -> Vec<SnapshotStatus> {
        let jobs: Vec<Arc<Job>> = self.jobs.lock().expect("jobs").values().cloned().collect();
        jobs.iter().map(|j| self.status_of(j)).collect()
    }

    /// Stops an upload and removes its local state and lease. OK when there is none.
    pub async fn abort(&self, snapshot_id: &str) -> Result<(), SnapshotError> {
        let job = self.jobs.lock().expect("jobs").remove(snapshot_id);
        if let Some(job) = job {
            let notified = job.done.notified();
            job.cancel.cancel();
            if matches!(*job.state.lock().expect("job state"), JobState::Running { .. }) {
                // The upload stops at its next chunk (or its wait before the next attempt);
                // bounded so a hung store cannot hang us.
                let _ = tokio::time::timeout(Duration::from_secs(30), notified).await;
            }
        }
        let dir = self.pending_dir(snapshot_id);
        if dir.exists() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        if let Some(store) = &self.store {
            store
                .delete(&manifest::lease_key(snapshot_id))
                .await
                .map_err(manifest::ManifestError::from)?;
        }
        Ok(())
    }

    /// Prepares a lazy restore of `volume_id` from `snapshot_id`: a lease protects the snapshot's
    /// chunks from here until the hydration completes (or the volume is deleted), and the
    /// manifest is kept with the volume so a snapshot deleted meanwhile cannot stop it.
    /// An encrypted snapshot needs `kek`; it is checked before anything is written.
    pub async fn hydrate_seed(
        &self,
        volume_id: &str,
        snapshot_id: &str,
        kek: Option<&Kek>,
    ) -> Result<HydrateSeed, SnapshotError> {
        let store = self.store()?;
        let not_found = || SnapshotError::NotFound {
            snapshot_id: snapshot_id.to_owned(),
        };
        let m = read_manifest(store, snapshot_id).await?.ok_or_else(not_found)?;
        let key = LineageKey::unwrap(&m, kek)?;
        let lease_id = format!("restore-{volume_id}");
        manifest::lease_chunks_of(store, &m, &lease_id)
            .await
            .map_err(manifest::ManifestError::from)?;
        // A delete that ran between the read and the lease: its GC may not have seen the lease.
        if !manifest::snapshot_live(store, snapshot_id)
            .await
            .map_err(manifest::ManifestError::from)?
        {
            self.drop_lease(&lease_id).await;
            return Err(not_found());
        }
        Ok(crate::hydrate::seed(&m, lease_id, key))
    }

    /// Drops a restore lease (the volume is gone); a failure only delays garbage collection.
    pub async fn drop_lease(&self, lease_id: &str) {
        if let Some(store) = &self.store {
            if let Err(e) = store.delete(&manifest::lease_key(lease_id)).await {
                tracing::warn!(lease = %lease_id, error = %e, "could not remove restore lease");
            }
        }
    }
}

/// `reason` cut to [`REASON_LEN`] bytes (on a character boundary).
fn bounded(reason: &str) -> String {
    if reason.len() <= REASON_LEN {
        return reason.to_owned();
    }
    let mut end = REASON_LEN;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &reason[..end], reason.len())
}

impl NodeSnapshots {
    fn fsr_dir(&self) -> PathBuf {
        self.manager.root().join("fsr")
    }

    /// The fast-restore image of a snapshot on this node, if fully hydrated.
    pub fn fsr_image(&self, snapshot_id: &str) -> Option<PathBuf> {
        crate::ids::check_id("snapshot id", snapshot_id).ok()?;
        let p = self.fsr_dir().join(format!("{snapshot_id}.img"));
        p.exists().then_some(p)
    }

    /// A fast-restore image of a committed snapshot, with the lineage a volume cloned from it
    /// continues; `None` when this node holds no ready image. An encrypted snapshot needs `kek`.
    pub async fn fast_image(
        &self,
        snapshot_id: &str,
        kek: Option<&Kek>,
    ) -> Result<Option<(PathBuf, LineageRecord)>, SnapshotError> {
        let Some(image) = self.fsr_image(snapshot_id) else {
            return Ok(None);
        };
        let Some(m) = read_manifest(self.store()?, snapshot_id).await? else {
            return Ok(None);
        };
        let key = LineageKey::unwrap(&m, kek)?;
        Ok(Some((image, LineageRecord::of(&m, key))))
    }

    /// Keeps this node's fast-restore images in line with what its zone enables, and publishes the
    /// node's record, every `interval` until `cancel`.
    pub async fn fast_restore_loop(
        self: Arc<Self>,
        zone: String,
        interval: Duration,
        cancel: CancellationToken,
    ) {
        let Some(store) = self.store.clone() else { return };
        let dir = self.fsr_dir();
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::error!(error = %e, "fast restore disabled on this node: cannot create {}", dir.display());
            return;
        }
        // Hydrations interrupted by a restart start over.
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        loop {
            if let Err(e) = self.fast_restore_round(&store, &zone, &dir).await {
                tracing::warn!(error = %e, "fast restore round failed");
            }
            tokio::select! {
                _ = cancel.cancelled() => {
                    for j in self.fsr_jobs.lock().expect("fsr jobs").values() {
                        j.cancel.cancel();
                    }
                    return;
                }
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    async fn fast_restore_round(
        self: &Arc<Self>,
        store: &Store,
        zone: &str,
        dir: &Path,
    ) -> Result<(), super::fsr::FsrError> {
        use super::fsr::{self, FsrState, ImageStatus, NodeRecord};
        let wanted: std::collections::HashSet<String> = if zone.is_empty() {
            Default::default()
        } else {
            fsr::list(store, Some(zone))
                .await?
                .into_iter()
                .filter(|r| r.state != FsrState::Disabling)
                .map(|r| r.snapshot_id)
                .collect()
        };
        for snap in &wanted {
            let running = self.fsr_jobs.lock().expect("fsr jobs").contains_key(snap);
            if !running && self.fsr_image(snap).is_none() {
                self.start_hydration(store.clone(), snap.clone(), dir.to_owned());
            }
        }
        let mut images = std::collections::BTreeMap::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(snap) = name.strip_suffix(".img") else {
                continue;
            };
            if wanted.contains(snap) {
                images.insert(
                    snap.to_owned(),
                    ImageStatus {
                        ready: true,
                        done: 0,
                        total: 0,
                    },
                );
            } else {
                tracing::info!(snapshot.id = %snap, "dropping fast-restore image");
                let _ = std::fs::remove_file(e.path());
            }
        }
        let jobs: Vec<(String, Arc<FsrJob>)> = self
            .fsr_jobs
            .lock()
            .expect("fsr jobs")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (snap, job) in jobs {
            if !wanted.contains(&snap) {
                job.cancel.cancel();
                continue;
            }
            images.entry(snap).or_insert(ImageStatus {
                ready: false,
                done: job.progress.done.load(Ordering::Relaxed),
                total: job.progress.total.load(Ordering::Relaxed),
            });
        }
        let node = NodeRecord {
            node: self.manager.node_name().to_owned(),
            zone: zone.to_owned(),
            updated_unix_ms: now_ms(),
            images,
        };
        fsr::put_node(store, &node).await
    }

    fn start_hydration(self: &Arc<Self>, store: Store, snap: String, dir: PathBuf) {
        let job = Arc::new(FsrJob {
            progress: Progress::default(),
            cancel: CancellationToken::new(),
        });
        self.fsr_jobs
            .lock()
            .expect("fsr jobs")
            .insert(snap.clone(), job.clone());
        let me = self.clone();
        tokio::spawn(async move {
            let tmp = dir.join(format!("{snap}.img.tmp"));
            let result = async {
                let m = read_manifest(&store, &snap)
                    .await?
                    .ok_or_else(|| SnapshotError::NotFound {
                        snapshot_id: snap.clone(),
                    })?;
                let f = std::fs::File::create(&tmp).map_err(|source| crate::volume::Error::Io {
                    context: format!("create {}", tmp.display()),
                    source,
                })?;
                f.set_len(m.size_bytes)
                    .map_err(|source| crate::volume::Error::Io {
                        context: "size image".into(),
                        source,
                    })?;
                // Fast-restore images are built by the zone's nodes on their own, with no class
                // secret at hand: an encrypted snapshot's data key is not theirs to open.
                let codec = super::crypto::codec_for(&m, None)?;
                let lease = format!("fsr-{}-{snap}", me.manager.node_name());
                restore::restore(
                    &store,
                    &m,
                    &codec,
                    &tmp,
                    &lease,
                    false,
                    &job.progress,
                    me.concurrency,
                    &job.cancel,
                )
                .await?;
                std::fs::rename(&tmp, dir.join(format!("{snap}.img"))).map_err(|source| {
                    crate::volume::Error::Io {
                        context: "keep image".into(),
                        source,
                    }
                })?;
                Ok::<_, SnapshotError>(())
            }
            .await;
            match result {
                Ok(()) => tracing::info!(snapshot.id = %snap, "fast-restore image ready"),
                Err(SnapshotError::Restore(RestoreError::Cancelled)) => {}
                Err(e) => tracing::error!(snapshot.id = %snap, error = %e, "fast-restore hydration failed"),
            }
            let _ = std::fs::remove_file(&tmp);
            me.fsr_jobs.lock().expect("fsr jobs").remove(&snap);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn reasons_are_bounded_on_a_char_boundary() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(REASON_LEN);
        let b = bounded(&long);
        assert!(b.len() < REASON_LEN + 32, "{}", b.len());
        assert!(b.ends_with(&format!("... ({} bytes)", long.len())));
    }

    #[test]
    fn only_transient_store_errors_are_retried() {
        let transient = StoreError::Transient {
            message: "503".into(),
        };
        let permanent = StoreError::Permanent {
            message: "NoSuchBucket".into(),
        };
        assert!(!UploadError::Store(transient.clone()).is_permanent());
        assert!(!UploadError::Manifest(manifest::ManifestError::Store(transient)).is_permanent());
        assert!(UploadError::Store(permanent).is_permanent());
        assert!(UploadError::RestoredGone {
            restored: "snap-x".into()
        }
        .is_permanent());
        assert!(UploadError::Io {
            context: "read image".into(),
            source: std::io::Error::other("EIO"),
        }
        .is_permanent());
    }
}
