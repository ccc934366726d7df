//! `strata demo`: a guided local run of the driver on the embedded default, no Kubernetes.
//!
//! It starts a real controller and a real node process (this same binary) on temporary
//! directories, then plays the kubelet and the provisioner over their unix sockets.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

use crate::client::{connect_unix, wait_for_socket};
use crate::proto::csi as pb;
use crate::proto::csi::controller_client::ControllerClient;
use crate::proto::csi::node_client::NodeClient;
use crate::proto::csi::volume_capability::{access_mode::Mode, AccessType, MountVolume};

/// Options of the demo.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Work directory (default: a new directory under /tmp); kept when given.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Volume size in MiB.
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// Data written and read back, in MiB.
    #[arg(long, default_value_t = 64)]
    pub data_mib: usize,
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.start_kill();
        }
    }
}

fn step(n: usize, what: &str, t: Instant) {
    println!(
        "  [{n}] {what:<58} {:>7.1} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
}

/// Deterministic, incompressible test data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn cap() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_mode: Some(pb::volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
    }
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo attaches loop devices and mounts filesystems: run it as root");
    }
    let keep = args.dir.is_some();
    let dir = match args.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("strata-demo-{}", uuid::Uuid::new_v4().simple())),
    };
    std::fs::create_dir_all(&dir)?;
    let result = demo(&dir, args.size_mib, args.data_mib).await;
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn demo(dir: &Path, size_mib: u64, data_mib: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let token = crate::agent::auth::Token::generate();
    let token_file = dir.join("agent.token");
    std::fs::write(&token_file, token.expose())?;
    let port = free_port()?;
    let (csock, nsock) = (dir.join("controller.sock"), dir.join("node.sock"));
    println!("Strata demo in {}", dir.display());
    println!(
        "  controller: {}   node: demo-node (zone demo-zone), agent 127.0.0.1:{port}",
        csock.display()
    );
    let spawn = |args: Vec<String>| {
        Command::new(&exe)
            .args(args)
            .env("STRATA_LOG_LEVEL", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
    };
    let mut procs = Procs(Vec::new());
    procs.0.push(spawn(vec![
        "node".into(),
        format!("--csi-endpoint={}", nsock.display()),
        "--node-name=demo-node".into(),
        "--zone=demo-zone".into(),
        format!("--storage-dir={}", dir.join("storage").display()),
        format!("--agent-listen=127.0.0.1:{port}"),
        format!("--agent-token-file={}", token_file.display()),
    ])?);
    procs.0.push(spawn(vec![
        "controller".into(),
        format!("--csi-endpoint={}", csock.display()),
        format!("--agents=demo-node=127.0.0.1:{port}"),
        format!("--agent-token-file={}", token_file.display()),
    ])?);
    for s in [&csock, &nsock] {
        if !wait_for_socket(s, Duration::from_secs(10)).await {
            bail!("{} did not come up", s.display());
        }
    }
    let mut ctl = ControllerClient::new(connect_unix(&csock).await?);
    let mut node = NodeClient::new(connect_unix(&nsock).await?);
    let staging = dir.join("kubelet/staging");
    let target = dir.join("kubelet/pods/demo/volume");

    let t = Instant::now();
    let vol = ctl
        .create_volume(pb::CreateVolumeRequest {
            name: "demo-volume".into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: (size_mib << 20) as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap()],
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .context("no volume in answer")?;
    step(
        1,
        &format!(
            "CreateVolume {} ({} MiB)",
            vol.volume_id,
            vol.capacity_bytes >> 20
        ),
        t,
    );
    let id = vol.volume_id.clone();
    let stage = |n: &mut NodeClient<_>| {
        let req = pb::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
            volume_capability: Some(cap()),
            ..Default::default()
        };
        let mut n = n.clone();
        async move { n.node_stage_volume(req).await }
    };
    let publish = |n: &mut NodeClient<_>| {
        let req = pb::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
            target_path: target.to_string_lossy().into(),
            volume_capability: Some(cap()),
            ..Default::default()
        };
        let mut n = n.clone();
        async move { n.node_publish_volume(req).await }
    };
    let t = Instant::now();
    stage(&mut node).await?;
    step(2, "NodeStageVolume (loop device, mkfs.ext4, mount)", t);
    let t = Instant::now();
    publish(&mut node).await?;
    step(3, &format!("NodePublishVolume -> {}", target.display()), t);

    let data = pattern(data_mib << 20, 42);
    let file = target.join("data.bin");
    let t = Instant::now();
    {
        let (f, d) = (file.clone(), data.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let mut fh = std::fs::File::create(&f)?;
            fh.write_all(&d)?;
            fh.sync_all()
        })
        .await??;
    }
    step(4, &format!("wrote {data_mib} MiB through the mount (fsync)"), t);

    let unpublish_unstage = |n: &mut NodeClient<_>| {
        let mut n = n.clone();
        let (id, staging, target) = (id.clone(), staging.clone(), target.clone());
        async move {
            n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target.to_string_lossy().into(),
            })
            .await?;
            n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: id,
                staging_target_path: staging.to_string_lossy().into(),
            })
            .await
        }
    };
    let t = Instant::now();
    unpublish_unstage(&mut node).await?;
    step(5, "NodeUnpublishVolume + NodeUnstageVolume (unmount, detach)", t);
    let t = Instant::now();
    stage(&mut node).await?;
    publish(&mut node).await?;
    step(6, "staged and published again", t);
    let t = Instant::now();
    let back = tokio::fs::read(&file).await?;
    if back != data {
        bail!("data read back differs from data written");
    }
    step(
        7,
        &format!("read {data_mib} MiB back: identical byte for byte"),
        t,
    );
    let stats = node
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.to_string_lossy().into(),
            staging_target_path: String::new(),
        })
        .await?
        .into_inner();
    if let Some(b) = stats.usage.first() {
        println!(
            "      NodeGetVolumeStats: {} MiB used of {} MiB; condition: {}",
            b.used >> 20,
            b.total >> 20,
            stats.volume_condition.map(|c| c.message).unwrap_or_default()
        );
    }
    let t = Instant::now();
    unpublish_unstage(&mut node).await?;
    ctl.delete_volume(pb::DeleteVolumeRequest {
        volume_id: id.clone(),
        secrets: Default::default(),
    })
    .await?;
    step(8, "unpublished, unstaged, DeleteVolume", t);
    println!(
        "Demo complete: the volume lived on a sparse file, a loop device and an ext4 mount, and is gone."
    );
    drop(procs);
    Ok(())
}
