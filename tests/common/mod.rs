//! The local multi-node test bed: a real controller and real node agents (this crate's binary)
//! on temporary directories, over unix sockets and loopback TCP, driven by the generated CSI
//! clients. Dropping the bed kills the processes and removes every mount and loop device under its
//! directory, also when the test failed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use strata::client::{connect_unix, wait_for_socket};
use strata::proto::csi as pb;
use strata::proto::csi::controller_client::ControllerClient;
use strata::proto::csi::identity_client::IdentityClient;
use strata::proto::csi::node_client::NodeClient;
use strata::proto::csi::volume_capability::{access_mode::Mode, AccessType, BlockVolume, MountVolume};
use tonic::transport::Channel;

/// How long a test keeps repeating a call that answers ABORTED before it takes the answer.
pub const ABORTED_PATIENCE: Duration = Duration::from_secs(60);

/// Repeats a call while it answers ABORTED, as the kubelet and the sidecars do (another call on
/// the volume holds it for a moment), with a backoff from 50 ms doubling to 1 s, for at most
/// [`ABORTED_PATIENCE`]; then the last answer is returned, so a volume that stays busy fails the
/// test with the driver's message (which names the operation holding it).
#[macro_export]
macro_rules! retry_aborted {
    ($call:expr) => {{
        let deadline = std::time::Instant::now() + $crate::common::ABORTED_PATIENCE;
        let mut delay = std::time::Duration::from_millis(50);
        loop {
            match $call.await {
                Err(s) if s.code() == tonic::Code::Aborted && std::time::Instant::now() < deadline => {
                    eprintln!("retrying after ABORTED: {}", s.message());
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(1));
                }
                r => break r,
            }
        }
    }};
}

pub const TOKEN: &str = "test-agent-token-0123456789";
pub const BIN: &str = env!("CARGO_BIN_EXE_strata");

pub struct NodeProc {
    pub name: String,
    /// `None`: no --zone flag (the zone then comes from the Node object through KUBECONFIG).
    pub zone: Option<String>,
    /// Loopback address the agent listens on.
    pub agent_host: String,
    pub socket: PathBuf,
    pub storage: PathBuf,
    pub agent_port: u16,
    pub log: PathBuf,
    pub child: Option<Child>,
}

pub struct TestBed {
    pub dir: PathBuf,
    pub controller_socket: PathBuf,
    pub controller: Option<Child>,
    pub nodes: Vec<NodeProc>,
    token_file: PathBuf,
    /// Extra environment for every process.
    env: Vec<(String, String)>,
    /// Extra environment for the nodes only (after `env`).
    node_env: Vec<(String, String)>,
    /// The snapshot store every process uses.
    pub store_url: String,
    /// TLS files of the agent API, when it is not plaintext.
    pub tls: Option<BedTls>,
}

/// Which snapshot store a bed uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StoreKind {
    /// A directory in the bed (the embedded default).
    #[default]
    Local,
    /// A fresh prefix in the test S3 bucket (scripts/test.sh starts the server).
    S3,
}

/// Chunk size the beds use: small enough that test volumes have many chunks.
pub const CHUNK: u64 = 1 << 20;

/// How to start a bed when the defaults do not fit.
#[derive(Default)]
pub struct BedSpec {
    /// (name, zone or None, agent host, agent port or None for a free one)
    pub nodes: Vec<(String, Option<String>, String, Option<u16>)>,
    /// Controller arguments replacing the static agent map.
    pub controller_args: Option<Vec<String>>,
    /// Extra arguments for every node.
    pub node_args: Vec<String>,
    /// Extra environment for every process.
    pub env: Vec<(String, String)>,
    /// Snapshot store.
    pub store: StoreKind,
    /// Put each node's storage directory on its own XFS filesystem (reflink clones, FIEMAP).
    pub xfs_storage: bool,
    /// Put each node's storage directory on its own ext4 filesystem of this many GiB (no
    /// reflinks: clones are copies, whatever filesystem holds the temporary directory).
    pub ext4_storage_gib: Option<u64>,
    /// Extra arguments per node (by index), after `node_args`.
    pub per_node_args: Vec<Vec<String>>,
    /// Extra arguments for the controller.
    pub controller_extra: Vec<String>,
    /// Extra environment for the nodes only (e.g. a store fault rule file, see
    /// `strata::store::unreliable`).
    pub node_env: Vec<(String, String)>,
    /// Agent API over TLS with these files; `None` runs it in plaintext (`--agent-insecure`).
    pub tls: Option<BedTls>,
}

/// TLS files of a bed: one CA, one certificate with server and client usage for agents and
/// controller alike (what the chart makes).
#[derive(Debug, Clone)]
pub struct BedTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl BedTls {
    /// The same flags for nodes and controller: the controller presents the certificate as its
    /// client certificate and verifies the agents with the CA, agents the other way round.
    fn args(&self) -> Vec<String> {
        vec![
            format!("--agent-tls-cert={}", self.cert.display()),
            format!("--agent-tls-key={}", self.key.display()),
            format!("--agent-tls-ca={}", self.ca.display()),
        ]
    }
}

/// The agent flags of a bed process: its TLS files, or plaintext.
fn transport_args(tls: &Option<BedTls>) -> Vec<String> {
    match tls {
        Some(t) => t.args(),
        None => vec!["--agent-insecure".into()],
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests attach loop devices and mount filesystems: run them as root"
    );
}

impl TestBed {
    /// A controller and one node per `(name, zone)`.
    pub async fn start(nodes: &[(&str, &str)]) -> Self {
        Self::start_with(nodes, &[]).await
    }

    /// Same, with extra arguments for every node (e.g. `--max-volumes=2`).
    pub async fn start_with(nodes: &[(&str, &str)], node_args: &[&str]) -> Self {
        Self::start_spec(BedSpec {
            nodes: nodes
                .iter()
                .map(|(n, z)| (n.to_string(), Some(z.to_string()), "127.0.0.1".to_string(), None))
                .collect(),
            node_args: node_args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
    }

    /// A controller and nodes using the given store.
    pub async fn start_store(nodes: &[(&str, &str)], store: StoreKind) -> Self {
        Self::start_spec(BedSpec {
            nodes: nodes
                .iter()
                .map(|(n, z)| (n.to_string(), Some(z.to_string()), "127.0.0.1".to_string(), None))
                .collect(),
            store,
            ..Default::default()
        })
        .await
    }

    pub async fn start_spec(spec: BedSpec) -> Self {
        require_root();
        let dir = std::env::temp_dir().join(format!("strata-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let token_file = dir.join("agent.token");
        std::fs::write(&token_file, TOKEN).unwrap();
        let store_url = match spec.store {
            StoreKind::Local => dir.join("store").to_string_lossy().into_owned(),
            StoreKind::S3 => {
                let ep = std::env::var("STRATA_TEST_S3_ENDPOINT")
                    .expect("S3 test server not configured: run the tests through scripts/test.sh");
                let bucket = std::env::var("STRATA_TEST_S3_BUCKET").unwrap_or_else(|_| "strata-test".into());
                format!(
                    "s3://{bucket}/{}?endpoint={ep}&path_style=true",
                    dir.file_name().unwrap().to_string_lossy()
                )
            }
        };
        let mut bed = TestBed {
            controller_socket: dir.join("controller.sock"),
            controller: None,
            nodes: Vec::new(),
            token_file,
            dir,
            env: spec.env.clone(),
            node_env: spec.node_env.clone(),
            store_url,
            tls: spec.tls.clone(),
        };
        for (name, zone, host, port) in spec.nodes {
            let n = NodeProc {
                socket: bed.dir.join(format!("{name}.sock")),
                storage: bed.dir.join(format!("storage-{name}")),
                agent_port: port.unwrap_or_else(free_port),
                log: bed.dir.join(format!("{name}.log")),
                child: None,
                name,
                zone,
                agent_host: host,
            };
            bed.nodes.push(n);
        }
        if spec.xfs_storage {
            for n in &bed.nodes {
                make_xfs(&bed.dir.join(format!("xfs-{}.img", n.name)), &n.storage);
            }
        }
        if let Some(gib) = spec.ext4_storage_gib {
            for n in &bed.nodes {
                make_fs(
                    "ext4",
                    gib,
                    &bed.dir.join(format!("ext4-{}.img", n.name)),
                    &n.storage,
                );
            }
        }
        let node_args: Vec<&str> = spec.node_args.iter().map(String::as_str).collect();
        for i in 0..bed.nodes.len() {
            let mut args = node_args.clone();
            if let Some(extra) = spec.per_node_args.get(i) {
                args.extend(extra.iter().map(String::as_str));
            }
            bed.start_node(i, &args).await;
        }
        let controller_args = spec.controller_args.unwrap_or_else(|| {
            let agents: Vec<String> = bed
                .nodes
                .iter()
                .map(|n| format!("{}={}:{}", n.name, n.agent_host, n.agent_port))
                .collect();
            vec![format!("--agents={}", agents.join(","))]
        });
        let log = std::fs::File::create(bed.dir.join("controller.log")).unwrap();
        let child = Command::new(BIN)
            .arg("controller")
            .arg(format!("--csi-endpoint={}", bed.controller_socket.display()))
            .args(controller_args)
            .arg(format!("--agent-token-file={}", bed.token_file.display()))
            .args(transport_args(&bed.tls))
            .arg(format!("--store={}", bed.store_url))
            // The minimum grace, and GC often enough that tests wait seconds past it, not minutes.
            .arg(format!(
                "--gc-grace-seconds={}",
                strata::snapshot::gc::MIN_GRACE.as_secs()
            ))
            .arg("--gc-interval-seconds=2")
            .args(&spec.controller_extra)
            .env("STRATA_LOG_LEVEL", "strata=debug,info")
            .env_remove("STRATA_AGENT_TOKEN")
            .env_remove("KUBECONFIG")
            .envs(bed.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        bed.controller = Some(child);
        assert!(
            wait_for_socket(&bed.controller_socket, Duration::from_secs(20)).await,
            "controller did not start"
        );
        bed
    }

    pub async fn start_node(&mut self, i: usize, extra: &[&str]) {
        let n = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .unwrap();
        // A socket left by a killed process must not be mistaken for the new one.
        let _ = std::fs::remove_file(&n.socket);
        let mut cmd = Command::new(BIN);
        cmd.arg("node")
            .arg(format!("--csi-endpoint={}", n.socket.display()))
            .arg(format!("--node-name={}", n.name))
            .arg(format!("--storage-dir={}", n.storage.display()))
            .arg(format!("--agent-listen={}:{}", n.agent_host, n.agent_port))
            .arg(format!("--agent-token-file={}", self.token_file.display()))
            .args(transport_args(&self.tls))
            .arg(format!("--store={}", self.store_url))
            .arg(format!("--chunk-size={CHUNK}"))
            .args(extra)
            .env("STRATA_LOG_LEVEL", "strata=debug,info")
            .env_remove("STRATA_AGENT_TOKEN")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBECONFIG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(self.node_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(z) = &n.zone {
            cmd.arg(format!("--zone={z}"));
        }
        let child = cmd.spawn().unwrap();
        n.child = Some(child);
        assert!(
            wait_for_socket(&n.socket, Duration::from_secs(20)).await,
            "node {} did not start",
            n.name
        );
        // The agent port too.
        for _ in 0..200 {
            if tokio::net::TcpStream::connect((n.agent_host.as_str(), n.agent_port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("agent of {} did not listen", n.name);
    }

    /// SIGKILL, as a crash would.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// The bed's snapshot store, for inspection.
    pub async fn store(&self) -> strata::store::Store {
        strata::store::open(&self.store_url).await.unwrap()
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(connect_unix(&self.controller_socket).await.unwrap())
    }

    pub async fn controller_identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(connect_unix(&self.controller_socket).await.unwrap())
    }

    pub async fn node(&self, i: usize) -> NodeClient<Channel> {
        NodeClient::new(connect_unix(&self.nodes[i].socket).await.unwrap())
    }

    pub async fn node_identity(&self, i: usize) -> IdentityClient<Channel> {
        IdentityClient::new(connect_unix(&self.nodes[i].socket).await.unwrap())
    }

    /// Paths for the kubelet's staging and publish directories of a volume.
    pub fn kubelet_paths(&self, tag: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join("kubelet/staging").join(tag),
            self.dir.join("kubelet/pods").join(tag).join("mount"),
        )
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for entry in std::fs::read_dir(&self.dir).unwrap().flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                s.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        s
    }
}

/// An XFS filesystem (reflink on) in a sparse file, mounted at `mount`.
pub fn make_xfs(image: &Path, mount: &Path) {
    make_fs("xfs", 4, image, mount)
}

/// A filesystem `fs` (xfs with reflink on, or ext4) of `gib` GiB in a sparse file on a loop
/// device, mounted at `mount`.
pub fn make_fs(fs: &str, gib: u64, image: &Path, mount: &Path) {
    let f = std::fs::File::create(image).unwrap();
    f.set_len(gib << 30).unwrap();
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let ok = match fs {
        "xfs" => Command::new("mkfs.xfs")
            .args(["-q", "-f", "-m", "reflink=1", &dev])
            .status()
            .unwrap(),
        _ => Command::new(format!("mkfs.{fs}"))
            .args(["-q", "-F", &dev])
            .status()
            .unwrap(),
    };
    assert!(ok.success(), "mkfs.{fs} failed");
    std::fs::create_dir_all(mount).unwrap();
    let ok = Command::new("mount").arg(&dev).arg(mount).status().unwrap();
    assert!(ok.success(), "mount {fs} failed");
}

/// Unmounts everything below `dir` (deepest first), detaches loop devices backed by files in it,
/// and ends hydrators serving volumes in it. FUSE mounts (hydrators) go after the loop devices on
/// them: unmounted first, a loop device's backing path would no longer be recognisable.
pub fn cleanup_kernel_state(dir: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let (fuse, mut points): (Vec<_>, Vec<_>) = strata::volume::sys::parse_mountinfo(&info)
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .partition(|m| m.fs_type.starts_with("fuse"));
    points.sort_by_key(|m| std::cmp::Reverse(m.mount_point.components().count()));
    let loops_in_dir = || -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(entries) = std::fs::read_dir("/sys/block") {
            for e in entries.flatten() {
                if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
                    if Path::new(b.trim()).starts_with(dir) {
                        out.push(format!("/dev/{}", e.file_name().to_string_lossy()));
                    }
                }
            }
        }
        out
    };
    // Found before anything is unmounted: once a storage directory's own filesystem (an XFS or
    // ext4 loop mount in `dir`) is lazily unmounted, the loop devices of the volumes on it print
    // paths outside `dir`, and left attached they would keep that filesystem and its device busy.
    let devices = loops_in_dir();
    for m in points {
        let _ = Command::new("umount").arg("-l").arg(&m.mount_point).status();
    }
    for dev in devices {
        let _ = Command::new("losetup").arg("-d").arg(dev).status();
    }
    // A detach can be deferred while something holds the device; its FUSE file must outlive it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !loops_in_dir().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for m in fuse {
        let _ = Command::new("umount").arg("-l").arg(&m.mount_point).status();
    }
    let _ = Command::new("pkill")
        .arg("-f")
        .arg(format!("hydrate --volume-dir {}", dir.display()))
        .status();
}

impl Drop for TestBed {
    fn drop(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
        cleanup_kernel_state(&self.dir);
        if std::thread::panicking() {
            eprintln!(
                "test bed kept for inspection: {}\n--- logs ---\n{}",
                self.dir.display(),
                self.logs()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn mount_cap(fs: &str) -> pb::VolumeCapability {
    mount_cap_mode(fs, Mode::SingleNodeWriter)
}

pub fn mount_cap_mode(fs: &str, mode: Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_mode: Some(pb::volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
    }
}

pub fn block_cap() -> pb::VolumeCapability {
    block_cap_mode(Mode::SingleNodeWriter)
}

pub fn block_cap_mode(mode: Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_mode: Some(pb::volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

pub fn create_req(name: &str, bytes: i64, cap: pb::VolumeCapability) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

pub fn topo(pairs: &[(&str, &str)]) -> pb::Topology {
    pb::Topology {
        segments: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

pub fn stage_req(id: &str, staging: &Path, cap: pb::VolumeCapability) -> pb::NodeStageVolumeRequest {
    pb::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

pub fn publish_req(
    id: &str,
    staging: &Path,
    target: &Path,
    cap: pb::VolumeCapability,
    readonly: bool,
) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

pub fn unpublish_req(id: &str, target: &Path) -> pb::NodeUnpublishVolumeRequest {
    pb::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.to_string_lossy().into(),
    }
}

pub fn unstage_req(id: &str, staging: &Path) -> pb::NodeUnstageVolumeRequest {
    pb::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.to_string_lossy().into(),
    }
}

/// NodeStage then NodePublish (read-write) with one capability, as the kubelet does.
pub async fn attach(
    node: &mut NodeClient<Channel>,
    id: &str,
    staging: &Path,
    target: &Path,
    cap: pb::VolumeCapability,
) {
    retry_aborted!(node.node_stage_volume(stage_req(id, staging, cap.clone()))).unwrap();
    retry_aborted!(node.node_publish_volume(publish_req(id, staging, target, cap.clone(), false))).unwrap();
}

/// NodeUnpublish then NodeUnstage.
pub async fn detach(node: &mut NodeClient<Channel>, id: &str, staging: &Path, target: &Path) {
    retry_aborted!(node.node_unpublish_volume(unpublish_req(id, target))).unwrap();
    retry_aborted!(node.node_unstage_volume(unstage_req(id, staging))).unwrap();
}

pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

pub const MIB: i64 = 1 << 20;

/// CreateVolume that must succeed (repeated while ABORTED, as the provisioner does); the volume.
pub async fn create_volume(ctl: &mut ControllerClient<Channel>, req: pb::CreateVolumeRequest) -> pb::Volume {
    retry_aborted!(ctl.create_volume(req.clone()))
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
}

/// Creates a block volume from `req` and stages and publishes it on node `node` (the node it lands
/// on). Returns (volume id, staging path, device path).
pub async fn attached_block_volume(
    bed: &TestBed,
    ctl: &mut ControllerClient<Channel>,
    node: usize,
    req: pb::CreateVolumeRequest,
) -> (String, PathBuf, PathBuf) {
    let (staging, target) = bed.kubelet_paths(&req.name);
    let id = create_volume(ctl, req).await.volume_id;
    attach(&mut bed.node(node).await, &id, &staging, &target, block_cap()).await;
    (id, staging, target)
}

/// A CreateSnapshot request for `source`.
pub fn snapshot_req(name: &str, source: &str) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    }
}

/// CreateSnapshot, repeated (as the external-snapshotter does) until ready, and while ABORTED.
pub async fn snapshot_with(
    ctl: &mut ControllerClient<Channel>,
    req: pb::CreateSnapshotRequest,
) -> pb::Snapshot {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let s = retry_aborted!(ctl.create_snapshot(req.clone()))
            .unwrap_or_else(|s| panic!("CreateSnapshot {}: {s:?}", req.name))
            .into_inner()
            .snapshot
            .unwrap();
        if s.ready_to_use {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "snapshot {} not ready in time",
            req.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`snapshot_with`] for a plain request.
pub async fn snapshot(ctl: &mut ControllerClient<Channel>, name: &str, source: &str) -> pb::Snapshot {
    snapshot_with(ctl, snapshot_req(name, source)).await
}

/// Runs the strata binary (without an inherited STRATA_STORE): success and stdout+stderr.
pub fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("STRATA_STORE")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A plain HTTP GET on loopback (metrics and health endpoints): the whole response.
pub async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA in `dir` as `<name>.crt` and `<name>.key`, made as Helm's genCA makes one (RSA 2048,
/// a CA certificate allowed to sign certificates).
pub fn make_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cnf = dir.join(format!("{name}-ca.cnf"));
    std::fs::write(
        &cnf,
        format!(
            "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = ext\n[dn]\nCN = {name}\n\
             [ext]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign,digitalSignature\n\
             subjectKeyIdentifier = hash\n"
        ),
    )
    .unwrap();
    let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
    let cnf = cnf.to_string_lossy().into_owned();
    openssl(
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &crt, "-days", "2",
            "-config", &cnf,
        ],
        dir,
    );
    (dir.join(crt), dir.join(key))
}

/// A certificate signed by `ca` in `dir` as `<name>.crt` and `<name>.key`, made as Helm's
/// genSignedCert makes one: RSA 2048 with a PKCS#1 key, server and client usage, `dns` as its
/// only subject alternative name.
pub fn make_cert(dir: &Path, name: &str, dns: &str, ca: &(PathBuf, PathBuf)) -> (PathBuf, PathBuf) {
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        format!(
            "basicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage = serverAuth,clientAuth\nsubjectAltName = DNS:{dns}\n"
        ),
    )
    .unwrap();
    let (crt, key, csr) = (
        format!("{name}.crt"),
        format!("{name}.key"),
        format!("{name}.csr"),
    );
    openssl(&["genrsa", "-traditional", "-out", &key, "2048"], dir);
    openssl(
        &[
            "req",
            "-new",
            "-key",
            &key,
            "-subj",
            &format!("/CN={dns}"),
            "-out",
            &csr,
        ],
        dir,
    );
    let (ca_crt, ca_key) = (ca.0.to_string_lossy(), ca.1.to_string_lossy());
    let ext = ext.to_string_lossy().into_owned();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
        dir,
    );
    (dir.join(crt), dir.join(key))
}

/// The chart's arrangement in `dir`: one CA and one `strata-agent` certificate it signed, shared
/// by the agents and the controller.
pub fn make_tls(dir: &Path) -> BedTls {
    let ca = make_ca(dir, "agent-ca");
    let (cert, key) = make_cert(dir, "agent", strata::agent::tls::DEFAULT_SERVER_NAME, &ca);
    BedTls { ca: ca.0, cert, key }
}
