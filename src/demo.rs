//! `strata demo`: a guided local run of the driver on the embedded default (a local-directory
//! store), no Kubernetes, no cloud.
//!
//! It starts a real controller and a real node process (this same binary) on temporary
//! directories, then plays provisioner, snapshotter and kubelet over their unix sockets.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

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
    /// Data written before the first snapshot, in MiB.
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
    let result = Demo::start(&dir).await;
    let result = match result {
        Ok(mut d) => {
            let r = d.story(args.size_mib, args.data_mib).await;
            d.cleanup().await;
            r
        }
        Err(e) => Err(e),
    };
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

struct Demo {
    dir: PathBuf,
    store: crate::store::Store,
    ctl: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    /// (volume id, staging, target) of everything attached, for cleanup.
    attached: Vec<(String, PathBuf, PathBuf)>,
    _procs: Procs,
}

fn step(n: usize, what: &str, t: Instant) {
    println!(
        "  [{n:>2}] {what:<66} {:>8.1} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
}

impl Demo {
    async fn start(dir: &Path) -> anyhow::Result<Demo> {
        let exe = std::env::current_exe()?;
        let token = crate::agent::auth::Token::generate();
        let token_file = dir.join("agent.token");
        std::fs::write(&token_file, token.expose())?;
        let port = free_port()?;
        let store_dir = dir.join("store");
        let (csock, nsock) = (dir.join("controller.sock"), dir.join("node.sock"));
        println!("Strata demo in {}", dir.display());
        println!(
            "  controller {}, node demo-node (zone demo-zone), store {}",
            csock.display(),
            store_dir.display()
        );
        let spawn = |args: Vec<String>| {
            Command::new(&exe)
                .args(args)
                .env("STRATA_LOG_LEVEL", "warn")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .spawn()
        };
        let store_arg = format!("--store={}", store_dir.display());
        let mut procs = Procs(Vec::new());
        procs.0.push(spawn(vec![
            "node".into(),
            format!("--csi-endpoint={}", nsock.display()),
            "--node-name=demo-node".into(),
            "--zone=demo-zone".into(),
            format!("--storage-dir={}", dir.join("storage").display()),
            format!("--agent-listen=127.0.0.1:{port}"),
            // Loopback on one machine: nothing to encrypt against, and no certificates to make.
            "--agent-insecure".into(),
            format!("--agent-token-file={}", token_file.display()),
            store_arg.clone(),
        ])?);
        procs.0.push(spawn(vec![
            "controller".into(),
            format!("--csi-endpoint={}", csock.display()),
            format!("--agents=demo-node=127.0.0.1:{port}"),
            "--agent-insecure".into(),
            format!("--agent-token-file={}", token_file.display()),
            store_arg,
            "--gc-grace-seconds=10".into(),
        ])?);
        for s in [&csock, &nsock] {
            if !wait_for_socket(s, Duration::from_secs(10)).await {
                bail!("{} did not come up", s.display());
            }
        }
        Ok(Demo {
            dir: dir.to_owned(),
            store: crate::store::open(&store_dir.to_string_lossy()).await?,
            ctl: ControllerClient::new(connect_unix(&csock).await?),
            node: NodeClient::new(connect_unix(&nsock).await?),
            attached: Vec::new(),
            _procs: procs,
        })
    }

    async fn create(&mut self, name: &str, size_mib: u64, from: Option<&str>) -> anyhow::Result<String> {
        let req = pb::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: (size_mib << 20) as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap()],
            volume_content_source: from.map(|s| pb::VolumeContentSource {
                r#type: Some(pb::volume_content_source::Type::Snapshot(
                    pb::volume_content_source::SnapshotSource {
                        snapshot_id: s.into(),
                    },
                )),
            }),
            ..Default::default()
        };
        loop {
            match self.ctl.create_volume(req.clone()).await {
                Ok(v) => return Ok(v.into_inner().volume.context("no volume in answer")?.volume_id),
                // A restore still in progress: ask again, as the provisioner does.
                Err(s) if s.code() == tonic::Code::Aborted => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(s) => return Err(s.into()),
            }
        }
    }

    async fn attach(&mut self, id: &str, tag: &str) -> anyhow::Result<PathBuf> {
        let staging = self.dir.join("kubelet/staging").join(tag);
        let target = self.dir.join("kubelet/pods").join(tag).join("volume");
        self.node
            .node_stage_volume(pb::NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.to_string_lossy().into(),
                volume_capability: Some(cap()),
                ..Default::default()
            })
            .await?;
        self.node
            .node_publish_volume(pb::NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.to_string_lossy().into(),
                target_path: target.to_string_lossy().into(),
                volume_capability: Some(cap()),
                ..Default::default()
            })
            .await?;
        self.attached.push((id.into(), staging, target.clone()));
        Ok(target)
    }

    async fn detach_all(&mut self) -> anyhow::Result<()> {
        while let Some((id, staging, target)) = self.attached.pop() {
            self.node
                .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: target.to_string_lossy().into(),
                })
                .await?;
            self.node
                .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                    volume_id: id,
                    staging_target_path: staging.to_string_lossy().into(),
                })
                .await?;
        }
        Ok(())
    }

    async fn snapshot(&mut self, name: &str, volume: &str) -> anyhow::Result<String> {
        loop {
            let s = self
                .ctl
                .create_snapshot(pb::CreateSnapshotRequest {
                    source_volume_id: volume.into(),
                    name: name.into(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .snapshot
                .context("no snapshot in answer")?;
            if s.ready_to_use {
                return Ok(s.snapshot_id);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn story(&mut self, size_mib: u64, data_mib: usize) -> anyhow::Result<()> {
        let t = Instant::now();
        let vol = self.create("demo-volume", size_mib, None).await?;
        step(1, &format!("CreateVolume {vol} ({size_mib} MiB)"), t);
        let t = Instant::now();
        let mnt = self.attach(&vol, "demo").await?;
        step(2, "NodeStage (loop device, mkfs.ext4, mount) + NodePublish", t);
        let t = Instant::now();
        let v1 = pattern(data_mib << 20, 42);
        write_synced(&mnt.join("data.bin"), &v1, 0)?;
        step(3, &format!("wrote {data_mib} MiB through the mount"), t);
        let t = Instant::now();
        let s1 = self.snapshot("demo-snapshot-1", &vol).await?;
        step(4, &format!("CreateSnapshot {s1} until ready (full)"), t);

        // About 1% of the volume changes: a few 1 MiB extents rewritten in place.
        let t = Instant::now();
        let mut v2 = v1.clone();
        let extents = ((size_mib as usize).div_ceil(100)).max(1);
        for i in 0..extents {
            let off = (i * 7 + 3) % data_mib.max(1) << 20;
            let patch = pattern(1 << 20, 1000 + i as u64);
            let end = (off + patch.len()).min(v2.len());
            v2[off..end].copy_from_slice(&patch[..end - off]);
            write_synced(&mnt.join("data.bin"), &patch[..end - off], off as u64)?;
        }
        step(5, &format!("rewrote {extents} MiB (about 1% of the volume)"), t);
        let t = Instant::now();
        let s2 = self.snapshot("demo-snapshot-2", &vol).await?;
        step(6, &format!("CreateSnapshot {s2} until ready (incremental)"), t);

        for (n, (snap, want, tag)) in [(&s1, &v1, "restore-1"), (&s2, &v2, "restore-2")]
            .into_iter()
            .enumerate()
        {
            let t = Instant::now();
            let rv = self.create(tag, size_mib, Some(snap)).await?;
            let m = self.attach(&rv, tag).await?;
            let got = std::fs::read(m.join("data.bin"))?;
            if &got != want {
                bail!("restore of {snap} differs from the data at its capture");
            }
            step(7 + n, &format!("restored {snap}: identical byte for byte"), t);
        }
        let t = Instant::now();
        crate::admin::verify(crate::admin::VerifyArgs {
            snapshots: vec![],
            concurrency: 16,
            store: crate::admin::StoreArgs {
                store: self.dir.join("store").to_string_lossy().into(),
            },
            key: Default::default(),
        })
        .await?;
        step(9, "verified every chunk of every snapshot against its hash", t);

        println!();
        println!(
            "  {:<42} {:>8} {:>11} {:>11} {:>11}",
            "snapshot", "parent", "bytes read", "uploaded", "reused"
        );
        for id in [&s1, &s2] {
            let m = crate::snapshot::manifest::read_manifest(&self.store, id)
                .await?
                .context("manifest")?;
            let st = m.stats.unwrap_or_default();
            println!(
                "  {:<42} {:>8} {:>11} {:>11} {:>11}",
                id,
                if m.parent_id.is_empty() { "-" } else { "previous" },
                crate::admin::bytes(st.bytes_read),
                crate::admin::bytes(st.bytes_uploaded),
                crate::admin::bytes(st.bytes_reused)
            );
        }
        println!();

        let t = Instant::now();
        self.detach_all().await?;
        for s in [&s1, &s2] {
            self.ctl
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: s.to_string(),
                    ..Default::default()
                })
                .await?;
        }
        // The chunks are seconds old: wait (on the store's clock) until the grace has passed.
        let report = crate::snapshot::gc::collect_settled(
            &self.store,
            crate::snapshot::gc::MIN_GRACE,
            Duration::from_secs(60),
        )
        .await?;
        let left = self.store.list("chunks/").await?.len();
        step(
            10,
            &format!(
                "deleted both snapshots; GC removed {} chunks, {left} left",
                report.deleted
            ),
            t,
        );
        println!("Demo complete.");
        Ok(())
    }

    async fn cleanup(&mut self) {
        let _ = self.detach_all().await;
        if let Ok(list) = self.ctl.list_volumes(pb::ListVolumesRequest::default()).await {
            for e in list.into_inner().entries {
                if let Some(v) = e.volume {
                    let _ = self
                        .ctl
                        .delete_volume(pb::DeleteVolumeRequest {
                            volume_id: v.volume_id,
                            ..Default::default()
                        })
                        .await;
                }
            }
        }
    }
}

fn write_synced(path: &Path, data: &[u8], off: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    f.write_all_at(data, off)?;
    f.sync_all()
}
