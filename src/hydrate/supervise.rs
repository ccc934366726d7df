//! The agent's side of hydration: starting hydrators (at create, at stage, after a restart or a
//! reboot), stopping them (delete), retiring finished ones, and progress for status and metrics.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{HydrateRecord, HydrateStatus, Paths, HYDRATE_RECORD};
use crate::csi::op_guard::OpGuard;
use crate::telemetry::Metrics;
use crate::volume::{record, sys, Error, VolumeManager};

/// How long a new hydrator may take to serve its file.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// The same for a hydrator pod, which is scheduled and started by the kubelet first.
const POD_START_TIMEOUT: Duration = Duration::from_secs(90);
/// Ticks between two sweeps of ended hydrator pods.
const POD_SWEEP_TICKS: u32 = 30;

/// The hydrators of one node.
pub struct Hydrators {
    manager: Arc<VolumeManager>,
    store_url: Option<String>,
    concurrency: usize,
    bandwidth_mib: u64,
    exe: PathBuf,
    children: Mutex<HashMap<String, Child>>,
    /// In a cluster: hydrators run in pods of their own, which outlive this process's container.
    pods: Option<super::pods::PodLauncher>,
    ticks: std::sync::atomic::AtomicU32,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Hydrators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hydrators")
            .field("store", &self.store_url)
            .finish()
    }
}

/// Starts `strata hydrate` for the volume at `p` in its own process group (signals meant for the
/// agent, such as a restart, do not reach it), logging to the volume's `hydrate.log`. The store
/// URL goes through the environment; credentials come from the inherited AWS environment.
pub fn spawn_hydrator(
    exe: &std::path::Path,
    p: &Paths,
    store_url: &str,
    concurrency: usize,
    bandwidth_mib: u64,
) -> std::io::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p.log())?;
    Command::new(exe)
        .args(hydrate_args(p, concurrency, bandwidth_mib))
        .env("STRATA_STORE", store_url)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
}

/// The arguments of `strata hydrate` for the volume at `p`, as a child process or in a pod.
fn hydrate_args(p: &Paths, concurrency: usize, bandwidth_mib: u64) -> Vec<String> {
    vec![
        "hydrate".into(),
        "--volume-dir".into(),
        p.dir.to_string_lossy().into_owned(),
        "--concurrency".into(),
        concurrency.to_string(),
        "--bandwidth-mib".into(),
        bandwidth_mib.to_string(),
    ]
}

fn alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("hydrate"))
        .unwrap_or(false)
}

impl Hydrators {
    /// Hydrators for `manager`'s volumes, fetching from the store at `store_url`.
    pub fn new(
        manager: Arc<VolumeManager>,
        store_url: Option<String>,
        concurrency: usize,
        bandwidth_mib: u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            manager,
            store_url,
            concurrency,
            bandwidth_mib,
            exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
            children: Mutex::default(),
            pods: None,
            ticks: Default::default(),
            metrics,
        }
    }

    /// Runs hydrators as pods started by `launcher` instead of child processes.
    pub fn with_pods(mut self, launcher: super::pods::PodLauncher) -> Self {
        self.pods = Some(launcher);
        self
    }

    /// Starts the volume's hydrator pod and waits until it serves the file.
    async fn start_pod(
        &self,
        id: &str,
        p: &Paths,
        url: &str,
        launcher: &super::pods::PodLauncher,
    ) -> Result<(), Error> {
        use super::pods::PodState;
        let unavailable = |reason: String| Error::Unavailable {
            volume_id: id.to_owned(),
            reason,
        };
        launcher
            .start(
                id,
                &hydrate_args(p, self.concurrency, self.bandwidth_mib),
                &[("STRATA_STORE", url)],
            )
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        tracing::info!(volume.id = %id, pod = %super::pods::PodLauncher::name(id), "hydrator pod started");
        let deadline = tokio::time::Instant::now() + POD_START_TIMEOUT;
        loop {
            if p.served() {
                return Ok(());
            }
            if let PodState::Ended(phase) =
                launcher.state(id).await.map_err(|e| unavailable(e.to_string()))?
            {
                return Err(unavailable(format!(
                    "its hydrator pod ended ({phase}): {}",
                    launcher.log_tail(id).await
                )));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(unavailable("its hydrator pod did not serve in time".into()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Hydration paths of a volume.
    pub fn paths(&self, id: &str) -> Result<Paths, Error> {
        Ok(Paths::new(&self.manager.volume_dir(id)?))
    }

    /// The hydration status of a volume, while it hydrates.
    pub fn status(&self, id: &str) -> Option<HydrateStatus> {
        let p = self.paths(id).ok()?;
        if !p.hydrating() {
            return None;
        }
        Some(p.read_status().unwrap_or_default())
    }

    /// Starts the volume's hydrator unless one serves it already, and waits until its file is
    /// served. Nothing to do for a volume that is not hydrating.
    pub async fn ensure_running(&self, id: &str) -> Result<(), Error> {
        let p = self.paths(id)?;
        if !p.hydrating() || p.served() {
            return Ok(());
        }
        let Some(url) = self.store_url.clone() else {
            return Err(Error::Unavailable {
                volume_id: id.to_owned(),
                reason: "it is restored from a snapshot but this node has no store configured".into(),
            });
        };
        let mp = p.mount_point();
        if sys::mount_at(&mp).is_some() {
            if !sys::loops_for(&p.lazy_data()).is_empty() {
                return Err(Error::Unavailable {
                    volume_id: id.to_owned(),
                    reason: "its hydrator stopped while the volume was attached; unstage and stage it again"
                        .into(),
                });
            }
            let _ = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH);
        }
        if let Some(launcher) = &self.pods {
            return self.start_pod(id, &p, &url, launcher).await;
        }
        let child =
            spawn_hydrator(&self.exe, &p, &url, self.concurrency, self.bandwidth_mib).map_err(|source| {
                Error::Io {
                    context: "start the hydrator".into(),
                    source,
                }
            })?;
        tracing::info!(volume.id = %id, pid = child.id(), "hydrator started");
        self.children
            .lock()
            .expect("children")
            .insert(id.to_owned(), child);
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if p.served() {
                return Ok(());
            }
            let exited = {
                let mut children = self.children.lock().expect("children");
                match children.get_mut(id).map(|c| c.try_wait()) {
                    Some(Ok(Some(st))) => {
                        children.remove(id);
                        Some(st.to_string())
                    }
                    _ => None,
                }
            };
            if let Some(st) = exited {
                let log = std::fs::read_to_string(p.log()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                return Err(Error::Unavailable {
                    volume_id: id.to_owned(),
                    reason: format!(
                        "its hydrator exited ({st}): {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    ),
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Unavailable {
                    volume_id: id.to_owned(),
                    reason: "its hydrator did not start in time".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the volume's hydrator (unmounting its directory ends it). The caller makes sure no
    /// loop device uses the file.
    pub async fn stop(&self, id: &str) -> Result<(), Error> {
        let p = self.paths(id)?;
        let pid = p.read_status().map(|s| s.pid);
        let mp = p.mount_point();
        if sys::mount_at(&mp).is_some() {
            nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH).map_err(|e| Error::Io {
                context: format!("unmount {}", mp.display()),
                source: std::io::Error::from(e),
            })?;
        }
        if let Some(launcher) = &self.pods {
            // Unmounted, the hydrator ends by itself; the pod goes either way.
            return launcher
                .delete(id, Duration::from_secs(15))
                .await
                .map_err(|e| Error::Unavailable {
                    volume_id: id.to_owned(),
                    reason: e.to_string(),
                });
        }
        let child = self.children.lock().expect("children").remove(id);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        match child {
            Some(mut c) => loop {
                if matches!(c.try_wait(), Ok(Some(_))) || tokio::time::Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            },
            // A hydrator adopted after an agent restart: not our child, wait for it to go.
            None => {
                while pid.is_some_and(alive) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Ok(())
    }

    /// One round of supervision: resume hydrations without a hydrator, retire finished ones
    /// whose volume is not attached, reap exited children. Volumes busy with another operation
    /// are left for the next round.
    pub async fn tick(&self, guard: &OpGuard) {
        let ids = match self.manager.ids() {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list volumes");
                return;
            }
        };
        let (mut active, mut pending) = (0i64, 0i64);
        for id in ids {
            let Ok(p) = self.paths(&id) else { continue };
            if !p.hydrating() {
                continue;
            }
            let st = p.read_status().unwrap_or_default();
            let attached = !sys::loops_for(&p.lazy_data()).is_empty();
            let act = (st.complete() && !attached) || (!p.served() && !attached);
            // Only acting needs the volume to itself; a busy volume waits for the next round. A
            // call that comes while we act waits for us rather than failing (see OpGuard).
            let op = if st.complete() {
                "retiring its finished hydration"
            } else {
                "restarting its hydrator"
            };
            let _t = match act.then(|| guard.try_background(&id, op)) {
                Some(None) => {
                    active += 1;
                    continue;
                }
                Some(Some(t)) => Some(t),
                None => None,
            };
            // Re-read under the guard: a stage or delete may have run in between.
            if act && !p.hydrating() {
                continue;
            }
            let attached = !sys::loops_for(&p.lazy_data()).is_empty();
            if st.complete() && !attached {
                if let Err(e) = self.retire(&id, &p, &st).await {
                    tracing::warn!(volume.id = %id, error = %e, "could not retire the hydration");
                }
                continue;
            }
            active += 1;
            pending += st.total_chunks.saturating_sub(st.local_chunks) as i64;
            self.metrics
                .hydration
                .progress(&id, st.local_chunks, st.total_chunks);
            if !p.served() {
                if attached {
                    continue; // reported as abnormal; needs a restage
                }
                tracing::info!(volume.id = %id, "resuming hydration");
                if let Err(e) = self.ensure_running(&id).await {
                    tracing::warn!(volume.id = %id, error = %e, "could not resume hydration");
                }
            }
        }
        self.metrics.hydration.volumes.set(active);
        self.metrics.hydration.chunks_pending.set(pending);
        self.sweep_pods().await;
        self.children
            .lock()
            .expect("children")
            .retain(|_, c| !matches!(c.try_wait(), Ok(Some(_))));
    }

    /// Before a stage: a finished hydration is retired (the volume then stages on its plain
    /// file); an unfinished one gets its hydrator running.
    pub async fn prepare_stage(&self, id: &str) -> Result<(), Error> {
        let p = self.paths(id)?;
        if !p.hydrating() {
            return Ok(());
        }
        let st = p.read_status().unwrap_or_default();
        if st.complete() && sys::loops_for(&p.lazy_data()).is_empty() {
            return self.retire(id, &p, &st).await;
        }
        self.ensure_running(id).await
    }

    /// Now and then: deletes ended hydrator pods of volumes that no longer hydrate (their end was
    /// not seen by a `stop`, e.g. across a restart). Ended pods of hydrating volumes stay for
    /// diagnosis until the volume is restaged, which replaces them.
    async fn sweep_pods(&self) {
        let Some(launcher) = &self.pods else { return };
        let n = self.ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % POD_SWEEP_TICKS != 0 {
            return;
        }
        match launcher.ended().await {
            Ok(ids) => {
                for id in ids {
                    if self.paths(&id).map(|p| !p.hydrating()).unwrap_or(true) {
                        if let Err(e) = launcher.delete(&id, Duration::ZERO).await {
                            tracing::warn!(volume.id = %id, error = %e, "could not delete an ended hydrator pod");
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list hydrator pods"),
        }
    }

    async fn retire(&self, id: &str, p: &Paths, st: &HydrateStatus) -> Result<(), Error> {
        let rec: HydrateRecord = record::read(&p.record(), HYDRATE_RECORD)?.ok_or(Error::NotFound {
            volume_id: id.to_owned(),
        })?;
        self.stop(id).await?;
        self.manager.finish_hydration(id, &rec.lineage)?;
        self.metrics.hydration.forget(id);
        let secs = (st.completed_unix_ms - st.started_unix_ms).max(0) as f64 / 1000.0;
        self.metrics.snapshot.restored(true, st.bytes_fetched, secs);
        self.metrics.hydration.on_demand.inc_by(st.fetched_on_demand);
        tracing::info!(volume.id = %id, snapshot.id = %rec.snapshot_id,
            fetched_on_demand = st.fetched_on_demand, fetched_background = st.fetched_background,
            "hydration complete: the volume runs on its plain file");
        Ok(())
    }

    /// Ends the hydration of a volume being deleted: stops the hydrator and returns the lease it
    /// held, which the caller drops.
    pub async fn abandon(&self, id: &str) -> Result<Option<String>, Error> {
        let p = self.paths(id)?;
        if !p.hydrating() {
            return Ok(None);
        }
        self.stop(id).await?;
        Ok(record::read::<HydrateRecord>(&p.record(), HYDRATE_RECORD)?.map(|r| r.lease_id))
    }
}
