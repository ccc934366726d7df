//! `strata bench-controller`: the controller's memory and ListSnapshots time as the store grows.
//!
//! Starts a real controller process (this binary) on a store, commits snapshot manifests into the
//! store in steps (each referencing `--chunks` chunks, as a snapshot of a `chunks × 4 MiB` volume
//! would), and after each step pages through ListSnapshots twice over the controller's unix socket
//! (cold: the controller reads the new manifests; warm: it answers from memory), then reads the
//! controller's resident and peak memory from /proc. The baseline is the same controller's memory
//! before the first snapshot; the table gives the growth per 1,000 snapshots and as a share of
//! the manifest bytes in the store. No timing is asserted anywhere.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::stream::{self, TryStreamExt};
use tokio::process::Command;

use crate::client::{connect_unix, wait_for_socket};
use crate::proto::csi::controller_client::ControllerClient;
use crate::proto::csi::ListSnapshotsRequest;
use crate::proto::store::{ChunkRef, Manifest};
use crate::snapshot::manifest;

/// Options.
#[derive(Debug, clap::Args)]
pub struct BenchControllerArgs {
    /// Snapshots committed in all (measured at a tenth, a quarter, half and all of them).
    #[arg(long, default_value_t = 10_000)]
    pub snapshots: usize,
    /// Chunk references per snapshot (256 is a 1 GiB volume at 4 MiB chunks).
    #[arg(long, default_value_t = 256)]
    pub chunks: u64,
    /// Store to fill (default: a new local-directory store under the system's temporary dir,
    /// removed afterwards). An S3 store must be empty: the bench commits manifests into it and
    /// deletes them at the end.
    #[arg(long)]
    pub store: Option<String>,
    /// ListSnapshots page size (the external-snapshotter's default is 0, "all"; paging is harder).
    #[arg(long, default_value_t = 500)]
    pub page: i32,
}

/// Removes the work directory and stops the controller on every exit path.
struct Work {
    dir: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Drop for Work {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Resident and peak resident memory of `pid`, in bytes.
fn memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading the controller's memory")?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("unreadable {line:?}"))?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn manifest_for(i: usize, chunks: u64) -> Manifest {
    let snapshot_id = crate::ids::snapshot_id_for_name(&format!("bench-controller-{i}"));
    let volume_id = crate::ids::volume_id_for_name(&format!("bench-controller-vol-{}", i % 100));
    Manifest {
        snapshot_id,
        name: format!("bench-controller-{i}"),
        volume_id,
        lineage: format!("lin-bench-{}", i % 100),
        capture_unix_ms: 1_700_000_000_000 + i as i64,
        committed_unix_ms: 1_700_000_000_000 + i as i64,
        size_bytes: chunks << 22,
        chunk_size: 4 << 20,
        fs_type: "ext4".into(),
        chunks: (0..chunks)
            .map(|index| ChunkRef {
                index,
                hash: blake3::hash(format!("{i}/{index}").as_bytes())
                    .as_bytes()
                    .to_vec(),
                stored_size: 1 << 21,
            })
            .collect(),
        ..Default::default()
    }
}

/// Pages through every snapshot; returns how many were listed.
async fn list_all(ctl: &mut ControllerClient<tonic::transport::Channel>, page: i32) -> anyhow::Result<usize> {
    let (mut n, mut token) = (0, String::new());
    loop {
        let r = ctl
            .list_snapshots(ListSnapshotsRequest {
                max_entries: page,
                starting_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        n += r.entries.len();
        if r.next_token.is_empty() {
            return Ok(n);
        }
        token = r.next_token;
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// Runs the bench and prints its table.
pub async fn run(args: BenchControllerArgs) -> anyhow::Result<()> {
    if args.snapshots == 0 {
        bail!("--snapshots must be at least 1");
    }
    let dir = std::env::temp_dir().join(format!("strata-bench-controller-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let mut work = Work {
        dir: dir.clone(),
        child: None,
    };
    let store_url = args
        .store
        .clone()
        .unwrap_or_else(|| dir.join("store").to_string_lossy().into_owned());
    let store = crate::store::open(&store_url)
        .await
        .with_context(|| format!("opening store {store_url}"))?;
    if !manifest::list_snapshot_ids(&store).await?.is_empty() {
        bail!("the store {store_url} already holds snapshots: give an empty one");
    }
    let sock = dir.join("controller.sock");
    let token_file = dir.join("agent.token");
    std::fs::write(&token_file, crate::agent::auth::Token::generate().expose())?;
    let child = spawn_controller(&sock, &token_file, &store_url)?;
    let pid = child.id().context("controller pid")?;
    work.child = Some(child);
    if !wait_for_socket(&sock, Duration::from_secs(10)).await {
        bail!("the controller did not come up on {}", sock.display());
    }
    let mut ctl = ControllerClient::new(connect_unix(&sock).await?);
    list_all(&mut ctl, args.page).await?;
    let (base_rss, _) = memory(pid)?;

    let n = args.snapshots;
    let mut steps: Vec<usize> = [n / 10, n / 4, n / 2, n].into_iter().filter(|&s| s > 0).collect();
    steps.dedup();
    println!(
        "controller memory with {n} snapshots of {} chunk references each (store {store_url})",
        args.chunks
    );
    println!(
        "baseline: the controller before any snapshot, {:.1} MiB resident",
        mib(base_rss)
    );
    println!();
    println!(
        "{:>10} {:>14} {:>15} {:>10} {:>10} {:>9} {:>9} {:>13} {:>15}",
        "snapshots",
        "chunk refs",
        "manifest MiB",
        "list cold",
        "list warm",
        "RSS MiB",
        "peak MiB",
        "MiB per 1000",
        "growth/manifest"
    );
    let mut written = 0usize;
    let mut manifest_bytes = 0u64;
    for &step in &steps {
        let batch: Vec<Manifest> = (written..step).map(|i| manifest_for(i, args.chunks)).collect();
        manifest_bytes += batch
            .iter()
            .map(|m| manifest::encode_manifest(m).len() as u64)
            .sum::<u64>();
        stream::iter(batch.into_iter().map(Ok::<_, anyhow::Error>))
            .try_for_each_concurrent(32, |m| {
                let store = store.clone();
                async move { Ok(manifest::write_manifest(&store, &m).await?) }
            })
            .await?;
        written = step;
        let t = Instant::now();
        let listed = list_all(&mut ctl, args.page).await?;
        let cold = t.elapsed().as_secs_f64();
        if listed != step {
            bail!("ListSnapshots returned {listed} snapshots, {step} are committed");
        }
        let t = Instant::now();
        list_all(&mut ctl, args.page).await?;
        let warm = t.elapsed().as_secs_f64();
        let (rss, peak) = memory(pid)?;
        let growth = rss.saturating_sub(base_rss);
        println!(
            "{:>10} {:>14} {:>15.1} {:>9.2}s {:>9.2}s {:>9.1} {:>9.1} {:>13.2} {:>14.1}%",
            step,
            step as u64 * args.chunks,
            mib(manifest_bytes),
            cold,
            warm,
            mib(rss),
            mib(peak),
            mib(growth) * 1000.0 / step as f64,
            growth as f64 * 100.0 / manifest_bytes.max(1) as f64
        );
    }
    println!();
    println!(
        "growth/manifest: resident memory above the baseline as a share of the manifest bytes in the store"
    );
    if args.store.is_some() {
        for i in 0..written {
            let id = crate::ids::snapshot_id_for_name(&format!("bench-controller-{i}"));
            store.delete(&manifest::manifest_key(&id)).await?;
        }
    }
    Ok(())
}

fn spawn_controller(sock: &Path, token_file: &Path, store: &str) -> anyhow::Result<tokio::process::Child> {
    Command::new(std::env::current_exe()?)
        .args([
            "controller".to_owned(),
            format!("--csi-endpoint={}", sock.display()),
            "--agent-discovery=static".to_owned(),
            "--agents=".to_owned(),
            format!("--agent-token-file={}", token_file.display()),
            format!("--store={store}"),
            // No GC during the measurement: it would read every manifest too.
            "--gc-interval-seconds=86400".to_owned(),
        ])
        .env("STRATA_LOG_LEVEL", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the controller")
}
