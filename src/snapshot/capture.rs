//! Point-in-time capture: freeze the mounted filesystems, clone the backing files, thaw.
//!
//! The clone is a reflink (FICLONE through `cp --reflink=always`) on XFS and btrfs, taking
//! milliseconds whatever the volume's size; elsewhere it is a sparse copy, as long as the data.
//! A filesystem must not stay frozen for a copy (every writer of the volume hangs meanwhile, and
//! the RPC outlives the CO's timeout), so the [`Freezer`] bounds the frozen time:
//!
//! * whether the storage directory clones by reflink is probed once, before the first freeze, so
//!   a copy-only storage never pays for a failed reflink attempt under freeze;
//! * every clone made while anything is frozen must finish by one deadline (`--max-freeze-secs`
//!   after the first freeze); past it the copy is killed, everything thawed, the partial clone
//!   removed, and the capture fails with [`CaptureError::FreezeLimit`] (FAILED_PRECONDITION),
//!   whose message tells the operator what to change;
//! * before freezing, the mounts are written to a durable record (`frozen/<tag>.rec` under the
//!   storage directory), removed once they are thawed: a crash while frozen leaves the record,
//!   and [`Freezer::thaw_leftovers`] thaws them when the agent starts again.
//!
//! Captures without a mounted filesystem freeze nothing and may copy for as long as it takes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::volume::record::{self, RecordError};
use crate::volume::sys::{self, SysError};

/// Default of `--max-freeze-secs`: well inside the controller's 50 s agent timeout and the
/// sidecar's 60 s, and short enough that applications ride it out.
pub const DEFAULT_MAX_FREEZE: Duration = Duration::from_secs(10);

const FROZEN_RECORD: &str = "frozen-mounts";

/// Why a capture failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Freezing, cloning or thawing failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// The record of the mounts about to be frozen could not be written (nothing was frozen).
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The clone did not finish within the freeze limit: it was stopped, the filesystems thawed
    /// and nothing was captured.
    #[error("{}", freeze_limit_message(storage, *reflinks, *bytes, *limit))]
    FreezeLimit {
        /// The storage directory.
        storage: PathBuf,
        /// Whether it clones by reflink (false: the clone was a full copy).
        reflinks: bool,
        /// Bytes of data to clone (allocated in the backing files).
        bytes: u64,
        /// The limit.
        limit: Duration,
    },
}

fn freeze_limit_message(storage: &Path, reflinks: bool, bytes: u64, limit: Duration) -> String {
    let gib = bytes as f64 / f64::from(1u32 << 30);
    let secs = limit.as_secs_f64();
    if reflinks {
        format!(
            "cloning {gib:.1} GiB at {} did not finish within the {secs} s freeze limit; the filesystem \
             was thawed and nothing captured; retry, or raise the limit (--max-freeze-secs)",
            storage.display()
        )
    } else {
        format!(
            "storage at {} does not support reflinks: copying {gib:.1} GiB would keep the filesystem \
             frozen longer than {secs} s; put the storage directory on XFS or btrfs, or raise the limit \
             (--max-freeze-secs)",
            storage.display()
        )
    }
}

/// One backing file to clone at the captured instant.
#[derive(Debug, Clone)]
pub struct CloneJob {
    /// The volume's backing file.
    pub data: PathBuf,
    /// Where its point-in-time image goes.
    pub clone: PathBuf,
    /// Small files copied at the same instant, before the clone (state describing the image,
    /// such as a hydration map).
    pub also: Vec<(PathBuf, PathBuf)>,
}

/// What a capture did.
#[derive(Debug, Clone)]
pub struct Captured {
    /// Per job, whether its clone is a reflink (shares the source's blocks).
    pub reflinked: Vec<bool>,
    /// The captured instant (after the freeze, before the first clone), Unix milliseconds.
    pub instant_unix_ms: i64,
    /// How long the filesystems stayed frozen; `None` when nothing was mounted.
    pub frozen: Option<Duration>,
}

/// The durable note of mounts frozen by a capture in progress.
#[derive(Debug, Serialize, Deserialize)]
struct FrozenRecord {
    mounts: Vec<PathBuf>,
    since_unix_ms: i64,
}

/// Freezes, clones and thaws within a bound, for one storage directory.
#[derive(Debug)]
pub struct Freezer {
    /// The storage directory: where clones are made (probed for reflinks) and records kept.
    root: PathBuf,
    /// Longest time filesystems may stay frozen.
    max_freeze: Duration,
    /// Whether `root` clones by reflink, probed once on first use.
    reflinks: tokio::sync::OnceCell<bool>,
    /// Frozen durations, observed for every capture that froze something.
    frozen_seconds: Option<Histogram>,
}

impl Freezer {
    /// A freezer for the storage directory `root`, keeping filesystems frozen at most `max_freeze`.
    pub fn new(root: &Path, max_freeze: Duration) -> Self {
        Self {
            root: root.to_owned(),
            max_freeze,
            reflinks: tokio::sync::OnceCell::new(),
            frozen_seconds: None,
        }
    }

    /// Observes every frozen duration in `h`.
    pub fn with_histogram(mut self, h: Histogram) -> Self {
        self.frozen_seconds = Some(h);
        self
    }

    fn records_dir(&self) -> PathBuf {
        self.root.join("frozen")
    }

    /// Whether the storage directory clones by reflink (probed once: a small file cloned with
    /// `cp --reflink=always`).
    pub async fn reflinks(&self) -> bool {
        *self
            .reflinks
            .get_or_init(|| async {
                let tag = uuid::Uuid::new_v4().simple().to_string();
                let (src, dst) = (
                    self.root.join(format!(".reflink-probe-{tag}")),
                    self.root.join(format!(".reflink-probe-{tag}.clone")),
                );
                let ok = match std::fs::write(&src, [0x5a; 4096]) {
                    Ok(()) => sys::run(
                        "cp",
                        &["--reflink=always", &src.to_string_lossy(), &dst.to_string_lossy()],
                    )
                    .await
                    .is_ok(),
                    Err(e) => {
                        tracing::warn!(storage = %self.root.display(), error = %e, "reflink probe failed");
                        false
                    }
                };
                let _ = std::fs::remove_file(&src);
                let _ = std::fs::remove_file(&dst);
                tracing::info!(storage = %self.root.display(), reflinks = ok, max_freeze_secs = self.max_freeze.as_secs_f64(),
                    "storage clone support probed");
                ok
            })
            .await
    }

    /// Captures every job at one instant. Each filesystem of `mounts` is frozen before the first
    /// clone and thawed after the last (always, also when a clone fails), and the clones must
    /// finish within the freeze limit. `tag` names the capture (its record, its logs).
    ///
    /// The frozen part runs as a task of its own: a caller that gives up (the RPC is cancelled)
    /// drops this future, and must not take the thaw with it.
    pub async fn capture(
        &self,
        tag: &str,
        mounts: Vec<PathBuf>,
        jobs: Vec<CloneJob>,
    ) -> Result<Captured, CaptureError> {
        let limit = Limit {
            storage: self.root.clone(),
            reflinks: self.reflinks().await,
            max_freeze: self.max_freeze,
        };
        if mounts.is_empty() {
            return Ok(Captured {
                reflinked: limit.clone_all(&jobs, None).await?,
                instant_unix_ms: now_ms(),
                frozen: None,
            });
        }
        let rec = self.records_dir().join(format!("{tag}.rec"));
        let (tag, histogram) = (tag.to_owned(), self.frozen_seconds.clone());
        tokio::spawn(async move { limit.frozen_capture(&tag, &rec, &mounts, &jobs, histogram).await })
            .await
            .unwrap_or_else(|e| {
                Err(CaptureError::Sys(SysError {
                    command: "capture".into(),
                    message: e.to_string(),
                }))
            })
    }

    /// Thaws the mounts of captures that a crash interrupted while they were frozen (their
    /// records are still there) and removes the records. A mount that is not frozen (the crash
    /// came before the freeze, or a reboot thawed it) or no longer exists is only logged.
    pub async fn thaw_leftovers(&self) {
        let Ok(rd) = std::fs::read_dir(self.records_dir()) else {
            return;
        };
        for e in rd.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "rec") {
                // A temporary file of a record write that a crash interrupted.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            match record::read::<FrozenRecord>(&path, FROZEN_RECORD) {
                Ok(Some(r)) => {
                    for m in &r.mounts {
                        match thaw(m).await {
                            Ok(()) => {
                                tracing::warn!(mount = %m.display(), since_unix_ms = r.since_unix_ms,
                                    "thawed a filesystem left frozen by an interrupted capture")
                            }
                            Err(e) => tracing::info!(mount = %m.display(), error = %e,
                                "left over from an interrupted capture; not frozen"),
                        }
                    }
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::error!(path = %path.display(), error = %err, "unreadable frozen-mounts record")
                }
            }
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// What bounds a capture: the storage, whether it clones by reflink, the freeze limit.
#[derive(Debug, Clone)]
struct Limit {
    storage: PathBuf,
    reflinks: bool,
    max_freeze: Duration,
}

impl Limit {
    /// Writes the record of `mounts`, freezes them, clones every job by the deadline, thaws,
    /// removes the record; measures the frozen time into `histogram`.
    async fn frozen_capture(
        &self,
        tag: &str,
        rec: &Path,
        mounts: &[PathBuf],
        jobs: &[CloneJob],
        histogram: Option<Histogram>,
    ) -> Result<Captured, CaptureError> {
        // Flushed before the freeze, so that the freeze itself (which syncs too) is short.
        for m in mounts {
            if let Err(e) = sys::run("sync", &["-f", &m.to_string_lossy()]).await {
                tracing::warn!(mount = %m.display(), error = %e, "sync before freeze failed");
            }
        }
        if let Some(dir) = rec.parent() {
            std::fs::create_dir_all(dir).map_err(|source| RecordError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        record::write(
            rec,
            FROZEN_RECORD,
            &FrozenRecord {
                mounts: mounts.to_vec(),
                since_unix_ms: now_ms(),
            },
        )?;
        let start = Instant::now();
        let deadline = start + self.max_freeze;
        let mut frozen = Vec::with_capacity(mounts.len());
        let mut failed: Option<CaptureError> = None;
        for m in mounts {
            match freeze(m).await {
                Ok(()) => frozen.push(m.clone()),
                Err(e) => {
                    failed = Some(e.into());
                    break;
                }
            }
        }
        let instant_unix_ms = now_ms();
        let mut reflinked = Vec::new();
        if failed.is_none() {
            match self.clone_all(jobs, Some(deadline)).await {
                Ok(r) => reflinked = r,
                Err(e) => failed = Some(e),
            }
        }
        let mut all_thawed = true;
        for m in &frozen {
            if let Err(e) = thaw(m).await {
                tracing::error!(mount = %m.display(), error = %e, "thaw failed");
                all_thawed = false;
                failed.get_or_insert(e.into());
            }
        }
        let held = start.elapsed();
        if let Some(h) = &histogram {
            h.observe(held.as_secs_f64());
        }
        // A mount that failed to thaw keeps its record: the next start of the agent tries again.
        if all_thawed {
            if let Err(e) = std::fs::remove_file(rec) {
                tracing::warn!(path = %rec.display(), error = %e, "could not remove the frozen-mounts record");
            }
        }
        let frozen_ms = held.as_secs_f64() * 1000.0;
        match failed {
            Some(e) => {
                for j in jobs {
                    let _ = std::fs::remove_file(&j.clone);
                }
                tracing::warn!(capture = %tag, frozen_ms, mounts = mounts.len(), thawed = all_thawed, error = %e, "capture failed");
                Err(e)
            }
            None => {
                tracing::info!(capture = %tag, frozen_ms, mounts = mounts.len(), reflinks = self.reflinks, "captured; thawed");
                Ok(Captured {
                    reflinked,
                    instant_unix_ms,
                    frozen: Some(held),
                })
            }
        }
    }

    /// Clones every job in turn, all by `deadline`; whether each is a reflink.
    async fn clone_all(
        &self,
        jobs: &[CloneJob],
        deadline: Option<Instant>,
    ) -> Result<Vec<bool>, CaptureError> {
        let mut reflinked = Vec::with_capacity(jobs.len());
        for j in jobs {
            match clone_job(j, self.reflinks, deadline).await {
                Ok(r) => reflinked.push(r),
                Err(CloneFailed::Sys(e)) => return Err(e.into()),
                Err(CloneFailed::Deadline) => {
                    return Err(CaptureError::FreezeLimit {
                        storage: self.storage.clone(),
                        reflinks: self.reflinks,
                        bytes: jobs.iter().map(|j| allocated_bytes(&j.data)).sum(),
                        limit: self.max_freeze,
                    })
                }
            }
        }
        Ok(reflinked)
    }
}

enum CloneFailed {
    Sys(SysError),
    Deadline,
}

/// Copies a job's side files, then clones its data: by reflink where the storage supports it
/// (falling back to a copy if this file cannot be), else by a sparse copy; all by `deadline`.
async fn clone_job(j: &CloneJob, reflinks: bool, deadline: Option<Instant>) -> Result<bool, CloneFailed> {
    for (from, to) in &j.also {
        std::fs::copy(from, to).map_err(|e| {
            CloneFailed::Sys(SysError {
                command: format!("copy {} at capture", from.display()),
                message: e.to_string(),
            })
        })?;
    }
    let (s, d) = (j.data.to_string_lossy(), j.clone.to_string_lossy());
    if reflinks {
        match run_by("cp", &["--reflink=always", &s, &d], deadline).await {
            Ok(()) => return Ok(true),
            Err(CloneFailed::Deadline) => return Err(CloneFailed::Deadline),
            Err(CloneFailed::Sys(e)) => {
                tracing::warn!(file = %j.data.display(), error = %e, "reflink failed on reflink storage; copying");
            }
        }
    }
    run_by("cp", &["--reflink=never", "--sparse=always", &s, &d], deadline)
        .await
        .map(|()| false)
}

/// Runs a tool to its end, or kills it at `deadline`.
async fn run_by(program: &str, args: &[&str], deadline: Option<Instant>) -> Result<(), CloneFailed> {
    let command = format!("{program} {}", args.join(" "));
    let err = |message: String| {
        CloneFailed::Sys(SysError {
            command: command.clone(),
            message,
        })
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    let waited = match deadline {
        None => Some(child.wait().await),
        Some(d) => tokio::time::timeout_at(d.into(), child.wait()).await.ok(),
    };
    let Some(status) = waited else {
        // Killed and reaped before the caller thaws and removes the partial file.
        let _ = child.kill().await;
        return Err(CloneFailed::Deadline);
    };
    let status = status.map_err(|e| err(e.to_string()))?;
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr).await;
    }
    Err(err(format!("{} ({status})", stderr.trim())))
}

fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Clones `src` to `dst` with nothing frozen: a reflink where the filesystem can (returns true),
/// else a sparse copy.
pub async fn clone_file(src: &Path, dst: &Path) -> Result<bool, SysError> {
    let (s, d) = (src.to_string_lossy(), dst.to_string_lossy());
    if sys::run("cp", &["--reflink=always", &s, &d]).await.is_ok() {
        return Ok(true);
    }
    sys::run("cp", &["--reflink=never", "--sparse=always", &s, &d])
        .await
        .map(|_| false)
}

/// Freezes the filesystem mounted at `mount` (writes block until [`thaw`]).
pub async fn freeze(mount: &Path) -> Result<(), SysError> {
    sys::run("fsfreeze", &["--freeze", &mount.to_string_lossy()])
        .await
        .map(drop)
}

/// Thaws a filesystem frozen by [`freeze`].
pub async fn thaw(mount: &Path) -> Result<(), SysError> {
    sys::run("fsfreeze", &["--unfreeze", &mount.to_string_lossy()])
        .await
        .map(drop)
}
