//! `strata hydrate`: the per-volume hydrator process the agent starts. It runs in its own process
//! group, so a restart of the agent does not interrupt a volume in use; it ends when the agent
//! unmounts its FUSE directory (after the hydration, or when the volume is deleted).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::engine::Engine;
use super::fuse::LazyFs;
use super::{boot_id, HydrateRecord, HydrateStatus, Paths, HYDRATE_RECORD};
use crate::snapshot::manifest::{decode_manifest, lease_key};
use crate::snapshot::upload::now_ms;
use crate::volume::record;

/// `strata hydrate` arguments (set by the agent).
#[derive(Debug, Clone, clap::Args)]
pub struct HydrateArgs {
    /// The volume directory.
    #[arg(long)]
    pub volume_dir: PathBuf,
    /// Snapshot store (the agent passes its own through the environment).
    #[arg(long, env = "STRATA_STORE")]
    pub store: String,
    /// Parallel background fetches.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Cap on background fetches in MiB/s (0: none); on-demand fetches are never held back.
    #[arg(long, default_value_t = 0)]
    pub bandwidth_mib: u64,
    /// FUSE worker threads (reads and writes served at once).
    #[arg(long, default_value_t = 4)]
    pub fuse_threads: usize,
}

/// Runs one volume's hydration until its FUSE directory is unmounted.
pub async fn run(args: HydrateArgs) -> anyhow::Result<()> {
    let paths = Paths::new(&args.volume_dir);
    let rec: HydrateRecord = record::read(&paths.record(), HYDRATE_RECORD)?
        .ok_or_else(|| anyhow::anyhow!("{} is not hydrating", paths.dir.display()))?;
    let m = decode_manifest("hydrate.manifest", &std::fs::read(paths.manifest())?)?;
    let boot = boot_id();
    let previous = paths.read_status();
    // A status from another boot means the machine went down while hydrating: fetched chunks
    // may not have reached the disk.
    let verify = previous.as_ref().is_some_and(|p| p.boot_id != boot);
    let store = crate::store::open(&args.store).await?;
    let codec = crate::snapshot::crypto::codec_for(&m, rec.lineage.key.as_ref())?;
    let engine = Arc::new(Engine::open(paths.clone(), &m, codec, store.clone(), verify)?);
    engine.limit_bandwidth(args.bandwidth_mib << 20);
    let mut status = HydrateStatus {
        pid: std::process::id(),
        boot_id: boot,
        snapshot_id: rec.snapshot_id.clone(),
        started_unix_ms: now_ms(),
        ..Default::default()
    };
    engine.fill_status(&mut status);

    let mp = paths.mount_point();
    std::fs::create_dir_all(&mp)?;
    if crate::volume::sys::mount_at(&mp).is_some() {
        // A mount left by a hydrator that died; the agent only starts us when nothing uses it.
        let _ = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH);
    }
    let config = {
        let mut c = fuser::Config::default();
        c.mount_options = vec![
            fuser::MountOption::FSName(format!("strata-{}", rec.snapshot_id)),
            fuser::MountOption::Subtype("strata".into()),
            fuser::MountOption::NoAtime,
            fuser::MountOption::NoExec,
            fuser::MountOption::NoSuid,
        ];
        c.n_threads = Some(args.fuse_threads.max(1));
        c.clone_fd = true;
        c
    };
    let fs = LazyFs::new(engine.clone(), tokio::runtime::Handle::current());
    let session = fuser::Session::new(fs, &mp, &config)?.spawn()?;
    paths.write_status(&status)?;
    tracing::info!(
        snapshot.id = %rec.snapshot_id,
        local = status.local_chunks,
        total = status.total_chunks,
        verified_after_power_loss = verify,
        "hydrating"
    );

    let background = {
        let (engine, store, lease) = (engine.clone(), store.clone(), rec.lease_id.clone());
        let concurrency = args.concurrency;
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            loop {
                match engine.hydrate_pass(concurrency).await {
                    Ok(()) => break,
                    Err(e) if e.permanent() => {
                        tracing::error!(error = %e, "hydration cannot complete; reads of the missing data fail");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "hydration pass failed; retrying");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
            tracing::info!(seconds = started.elapsed().as_secs_f64(), "every chunk is local");
            // The lease protected the chunks while they were needed; retried until the store
            // answers (a lease left behind only delays garbage collection).
            for attempt in 0u32.. {
                match store.delete(&lease_key(&lease)).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, attempt, "could not drop the restore lease");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
        })
    };

    let ended = tokio::task::spawn_blocking(move || session.join());
    tokio::pin!(ended);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut since_sync = 0u32;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut completed_recorded = false;
    loop {
        tokio::select! {
            r = &mut ended => {
                r.expect("session task panicked")?;
                break;
            }
            _ = term.recv() => {
                // Unmounting under an attached loop device would fail the volume's I/O: the agent
                // stops us by unmounting once nothing uses the file.
                if crate::volume::sys::loops_for(&paths.lazy_data()).is_empty() {
                    tracing::info!("terminated; unmounting");
                    let _ = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH);
                } else {
                    tracing::warn!("terminated while the volume is attached: serving on");
                }
            }
            _ = tick.tick() => {
                since_sync += 1;
                if since_sync >= 25 {
                    since_sync = 0;
                    let e = engine.clone();
                    if let Err(err) = tokio::task::spawn_blocking(move || e.sync()).await.expect("sync task") {
                        tracing::warn!(error = %err, "periodic sync failed");
                    }
                }
                engine.fill_status(&mut status);
                if background.is_finished() && engine.complete() && !completed_recorded {
                    status.completed_unix_ms = now_ms();
                    completed_recorded = true;
                }
                status.updated_unix_ms = now_ms();
                if let Err(e) = paths.write_status(&status) {
                    tracing::warn!(error = %e, "could not write the hydration status");
                }
            }
        }
    }
    background.abort();
    engine.sync()?;
    engine.fill_status(&mut status);
    status.updated_unix_ms = now_ms();
    let _ = paths.write_status(&status);
    tracing::info!("unmounted; hydrator done");
    Ok(())
}
