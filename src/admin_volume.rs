//! `strata volume ls|show`: a node's volumes read straight from its storage directory (run it on
//! the node, e.g. `kubectl exec` into the node pod). Read-only: safe beside a running agent.

use std::path::PathBuf;

use crate::admin::bytes;
use crate::volume::{Access, VolumeManager, VolumeState};

/// Where the node keeps its volumes.
#[derive(Debug, Clone, clap::Args)]
pub struct StorageArgs {
    /// The node's storage directory.
    #[arg(long, env = "STRATA_STORAGE_DIR", default_value = "/var/lib/strata")]
    pub storage_dir: PathBuf,
}

/// `strata volume ...`
#[derive(Debug, clap::Subcommand)]
pub enum VolumeCommand {
    /// This node's volumes: size, use, and hydration progress of restored ones.
    Ls(StorageArgs),
    /// One volume in detail, with its hydration (chunks local, fetched on demand, rate, errors).
    Show {
        /// Volume id.
        id: String,
        /// Storage directory.
        #[command(flatten)]
        storage: StorageArgs,
    },
}

fn state_text(v: &VolumeState) -> String {
    if let Some(a) = &v.abnormal {
        return format!("abnormal: {a}");
    }
    match &v.hydration {
        Some(h) if h.complete() => "hydrated (plain file from the next stage)".into(),
        Some(h) => format!(
            "hydrating {}% ({}/{} chunks)",
            h.local_chunks * 100 / h.total_chunks.max(1),
            h.local_chunks,
            h.total_chunks
        ),
        None => "ready".into(),
    }
}

/// Runs a `strata volume` command.
pub fn volume(cmd: VolumeCommand) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::Ls(s) => {
            let m = VolumeManager::inspect(&s.storage_dir)?;
            println!(
                "{:<40} {:<24} {:>9} {:>9} {:<6} {:<7} STATE",
                "VOLUME", "NAME", "SIZE", "USED", "ACCESS", "STAGED"
            );
            for v in m.list()? {
                println!(
                    "{:<40} {:<24} {:>9} {:>9} {:<6} {:<7} {}",
                    v.record.id,
                    v.record.name,
                    bytes(v.record.capacity_bytes),
                    bytes(v.allocated_bytes),
                    match v.record.access {
                        Access::Mount => "mount",
                        Access::Block => "block",
                    },
                    if v.staging_path.is_some() { "yes" } else { "no" },
                    state_text(&v)
                );
            }
        }
        VolumeCommand::Show { id, storage } => {
            let m = VolumeManager::inspect(&storage.storage_dir)?;
            let v = m.get(&id)?;
            let r = &v.record;
            println!("volume:      {}", r.id);
            println!("name:        {}", r.name);
            println!(
                "size:        {} ({} allocated)",
                bytes(r.capacity_bytes),
                bytes(v.allocated_bytes)
            );
            println!("access:      {:?} {}", r.access, r.fs_type);
            if !r.source_snapshot_id.is_empty() {
                println!("from:        snapshot {}", r.source_snapshot_id);
            }
            if !r.source_volume_id.is_empty() {
                println!("from:        volume {}", r.source_volume_id);
            }
            if let Some(d) = &v.device {
                println!("device:      {}", d.path().display());
            }
            if let Some(s) = &v.staging_path {
                println!("staged at:   {}", s.display());
            }
            for p in &v.published {
                println!("published:   {}", p.display());
            }
            println!("state:       {}", state_text(&v));
            if let Some(h) = &v.hydration {
                let now = crate::snapshot::upload::now_ms();
                let end = if h.complete() { h.completed_unix_ms } else { now };
                let secs = (end - h.started_unix_ms).max(1) as f64 / 1e3;
                println!("hydration:   {}/{} chunks local", h.local_chunks, h.total_chunks);
                println!(
                    "  fetched:   {} in the background, {} on demand ({} from the store, {:.1} MB/s)",
                    h.fetched_background,
                    h.fetched_on_demand,
                    bytes(h.bytes_fetched),
                    h.bytes_fetched as f64 / secs / 1e6
                );
                println!("  hydrator:  pid {} for {:.0} s", h.pid, secs);
                if h.refetched_after_crash > 0 {
                    println!(
                        "  refetched: {} chunks lost in a power failure",
                        h.refetched_after_crash
                    );
                }
                if !h.error.is_empty() {
                    println!(
                        "  error:     {}{}",
                        h.error,
                        if h.permanent {
                            " (permanent)"
                        } else {
                            " (retrying)"
                        }
                    );
                }
            }
        }
    }
    Ok(())
}
