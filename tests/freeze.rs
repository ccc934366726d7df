//! Bounded freezes, on real storage: a snapshot of a mounted volume keeps its filesystem frozen for
//! milliseconds where the storage directory clones by reflink (XFS), is refused within the freeze
//! limit where it would copy (ext4), and a filesystem left frozen by an agent killed mid-capture is
//! thawed when the agent starts again. Frozen times are the agent's own measurements (its
//! `strata_snapshot_freeze_seconds` histogram), not the test's wall clock.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use strata::proto::csi as pb;
use tonic::Code;

const GIB: i64 = 1 << 30;

/// One node whose storage directory is ext4 (`Some(GiB)`) or XFS (`None`), with a metrics
/// endpoint and a freeze limit (seconds; the agent's default when `None`). The limit is given
/// through the environment, as the chart does.
async fn bed(ext4_gib: Option<u64>, metrics_port: u16, max_freeze_secs: Option<u64>) -> TestBed {
    TestBed::start_spec(BedSpec {
        nodes: vec![("node-a".into(), Some("zone-a".into()), "127.0.0.1".into(), None)],
        xfs_storage: ext4_gib.is_none(),
        ext4_storage_gib: ext4_gib,
        node_args: vec![format!("--metrics-addr=127.0.0.1:{metrics_port}")],
        env: max_freeze_secs
            .map(|s| vec![("STRATA_MAX_FREEZE_SECS".to_string(), s.to_string())])
            .unwrap_or_default(),
        ..Default::default()
    })
    .await
}

/// A mounted (staged and published) ext4 volume of `bytes` holding `data_bytes` of non-zero data
/// (so a copy has to copy them); its id and paths.
async fn mounted_volume(
    bed: &TestBed,
    name: &str,
    bytes: i64,
    data_bytes: usize,
) -> (String, PathBuf, PathBuf) {
    let mut ctl = bed.controller().await;
    let id = create_volume(&mut ctl, create_req(name, bytes, mount_cap("ext4")))
        .await
        .volume_id;
    let (staging, target) = bed.kubelet_paths(name);
    attach(&mut bed.node(0).await, &id, &staging, &target, mount_cap("ext4")).await;
    let block = strata::demo::pattern(4 << 20, 11);
    let mut f = std::fs::File::create(target.join("data.bin")).unwrap();
    for _ in 0..data_bytes / block.len() {
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
    (id, staging, target)
}

/// Starts a small write (create, write, fsync) in `dir` on its own thread: the receiver hears
/// when it completes. A write on a frozen filesystem waits until it is thawed.
fn start_write(dir: &Path, name: &str) -> mpsc::Receiver<std::io::Result<()>> {
    let p = dir.join(name);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = (|| {
            let mut f = std::fs::File::create(&p)?;
            f.write_all(b"written after the capture")?;
            f.sync_all()
        })();
        let _ = tx.send(r);
    });
    rx
}

/// Waits up to `t` for a write started by [`start_write`]; whether it completed.
fn completed(rx: &mpsc::Receiver<std::io::Result<()>>, t: Duration) -> bool {
    match rx.recv_timeout(t) {
        Ok(r) => {
            r.unwrap();
            true
        }
        Err(_) => false,
    }
}

/// Thaws a mount when dropped, so that a failing test does not leave a frozen filesystem behind
/// (nothing could unmount it). Declared after the bed, it runs before the bed's cleanup.
struct ThawOnDrop(PathBuf);

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Reads by a node agent — and by the `cp` it runs — from the device under its storage directory,
/// throttled through a blkio cgroup, with the page cache dropped: a copy of `n` bytes then takes at
/// least `n / bytes_per_sec`, however fast the machine's disk and memory are. Undone on drop (the
/// processes go back to the root cgroup, the cgroup is removed).
struct SlowStorage {
    cgroup: PathBuf,
}

impl SlowStorage {
    fn new(bed: &TestBed, node: usize, bytes_per_sec: u64) -> Self {
        use std::os::unix::fs::MetadataExt;
        let pid = bed.nodes[node].child.as_ref().expect("agent running").id();
        let dev = std::fs::metadata(&bed.nodes[node].storage).unwrap().dev();
        let (major, minor) = (
            ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff),
            (dev & 0xff) | ((dev >> 12) & !0xff),
        );
        let cgroup = PathBuf::from(format!(
            "/sys/fs/cgroup/blkio/strata-test-{}-{node}",
            std::process::id()
        ));
        std::fs::create_dir_all(&cgroup).expect("blkio cgroup (cgroup v1)");
        let slow = SlowStorage { cgroup };
        std::fs::write(
            slow.cgroup.join("blkio.throttle.read_bps_device"),
            format!("{major}:{minor} {bytes_per_sec}"),
        )
        .expect("read throttle on the storage device");
        std::fs::write(slow.cgroup.join("cgroup.procs"), pid.to_string()).unwrap();
        Self::drop_caches();
        slow
    }

    /// Writes dirty pages back, then drops clean ones: the next copy reads from the device.
    fn drop_caches() {
        assert!(Command::new("sync").status().unwrap().success());
        std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    }
}

impl Drop for SlowStorage {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.cgroup.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = std::fs::write("/sys/fs/cgroup/blkio/cgroup.procs", pid);
        }
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// The agent's freeze histogram: (sum of seconds, count).
async fn frozen_seconds(port: u16) -> (f64, u64) {
    let m = http_get(port, "/metrics").await;
    let get = |suffix: &str| {
        let prefix = format!("strata_snapshot_freeze_seconds_{suffix} ");
        m.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.trim().parse::<f64>().unwrap())
            .unwrap_or_else(|| panic!("no {prefix}in the agent's metrics:\n{m}"))
    };
    (get("sum"), get("count") as u64)
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Storage on ext4 (no reflinks) and a volume whose copy takes longer than the 1 s limit: the
/// snapshot is refused with FAILED_PRECONDITION saying why and what to do, within the limit; the
/// filesystem is writable right after; nothing is left behind. A group snapshot with it is
/// refused the same way, its members frozen once, together. Unmounted, the same volume is copied
/// (nothing is frozen, so no limit applies).
#[tokio::test]
async fn copy_that_outlasts_the_freeze_limit_is_refused_and_thawed() {
    let port = free_port();
    let bed = bed(Some(6), port, Some(1)).await;
    let (id, staging, target) = mounted_volume(&bed, "big", 2 * GIB, 1 << 30).await;
    let _thaw = ThawOnDrop(staging.clone());
    // At 64 MiB/s the 1 GiB copy needs 16 s: far past the 1 s limit on any machine.
    let slow = SlowStorage::new(&bed, 0, 64 << 20);
    let mut ctl = bed.controller().await;

    let started = Instant::now();
    let r = retry_aborted!(ctl.create_snapshot(snapshot_req("too-slow", &id)));
    let took = started.elapsed();
    let status = r.expect_err("a 1 GiB copy under a 1 s freeze limit must be refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let msg = status.message();
    for want in [
        "does not support reflinks",
        "copying 1.",
        "longer than 1 s",
        "XFS or btrfs",
        "--max-freeze-secs",
    ] {
        assert!(msg.contains(want), "message lacks {want:?}: {msg}");
    }
    let storage = std::fs::canonicalize(&bed.nodes[0].storage).unwrap();
    assert!(
        msg.contains(&*storage.to_string_lossy()),
        "message names no storage: {msg}"
    );

    // Thawed: a write completes at once.
    assert!(
        completed(&start_write(&target, "after.txt"), Duration::from_secs(10)),
        "the volume stayed frozen after the refused snapshot"
    );
    let (secs, n) = frozen_seconds(port).await;
    assert_eq!(n, 1, "one capture froze the volume");
    assert!(
        (1.0..=2.5).contains(&secs),
        "frozen for {secs:.3} s with a 1 s limit (CreateSnapshot took {took:?})"
    );
    eprintln!("copy refused: frozen {secs:.3} s, CreateSnapshot answered in {took:?}");
    // Neither the partial clone nor the record of frozen mounts remains.
    assert_eq!(files_in(&storage.join("snapshots")), Vec::<String>::new());
    assert_eq!(files_in(&storage.join("frozen")), Vec::<String>::new());

    // A group snapshot of it and a small volume: one freeze of both, within the same limit.
    let (small, small_staging, small_target) = mounted_volume(&bed, "small", 64 << 20, 4 << 20).await;
    let _thaw_small = ThawOnDrop(small_staging);
    SlowStorage::drop_caches();
    let mut g = strata::proto::csi::group_controller_client::GroupControllerClient::new(
        strata::client::connect_unix(&bed.controller_socket)
            .await
            .unwrap(),
    );
    let r = g
        .create_volume_group_snapshot(pb::CreateVolumeGroupSnapshotRequest {
            name: "too-slow-group".into(),
            source_volume_ids: vec![id.clone(), small.clone()],
            ..Default::default()
        })
        .await;
    let status = r.expect_err("the group's copy under a 1 s freeze limit must be refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("does not support reflinks"),
        "{status:?}"
    );
    for t in [&target, &small_target] {
        assert!(
            completed(&start_write(t, "after-group.txt"), Duration::from_secs(10)),
            "a member stayed frozen after the refused group snapshot"
        );
    }
    let (secs2, n2) = frozen_seconds(port).await;
    assert_eq!(n2, 2, "the group froze its members once, together");
    eprintln!("group copy refused: frozen {:.3} s", secs2 - secs);
    assert!(
        (1.0..=2.5).contains(&(secs2 - secs)),
        "group frozen for {:.3} s with a 1 s limit",
        secs2 - secs
    );
    assert_eq!(files_in(&storage.join("snapshots")), Vec::<String>::new());
    assert_eq!(files_in(&storage.join("frozen")), Vec::<String>::new());

    // Unmounted: nothing to freeze, so the copy may take as long as it takes.
    drop(slow);
    detach(&mut bed.node(0).await, &id, &staging, &target).await;
    let s = retry_aborted!(ctl.create_snapshot(snapshot_req("unmounted", &id)))
        .expect("a snapshot of an unmounted volume copies without a freeze");
    assert!(s.into_inner().snapshot.is_some());
    assert_eq!(frozen_seconds(port).await.1, 2, "an unmounted volume was frozen");
}

/// Storage on XFS: a snapshot of a mounted volume with data clones by reflink and keeps the
/// filesystem frozen well under a second (as the agent measured it); so does a clone of it.
#[tokio::test]
async fn reflink_storage_freezes_for_milliseconds() {
    let port = free_port();
    let bed = bed(None, port, None).await;
    let (id, _staging, target) = mounted_volume(&bed, "fast", 1 << 30, 512 << 20).await;
    let mut ctl = bed.controller().await;
    let started = Instant::now();
    let s = snapshot(&mut ctl, "fast-snap", &id).await;
    assert!(s.ready_to_use);
    let (secs, n) = frozen_seconds(port).await;
    assert_eq!(n, 1);
    assert!(secs < 0.5, "frozen {secs:.3} s on reflink storage");
    eprintln!(
        "reflink: frozen {:.1} ms (snapshot ready after {:?})",
        secs * 1000.0,
        started.elapsed()
    );
    assert!(completed(
        &start_write(&target, "after.txt"),
        Duration::from_secs(10)
    ));

    // A volume cloned from the mounted one freezes it the same way.
    let mut req = create_req("fast-clone", 1 << 30, mount_cap("ext4"));
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Volume(
            pb::volume_content_source::VolumeSource {
                volume_id: id.clone(),
            },
        )),
    });
    create_volume(&mut ctl, req).await;
    let (secs2, n2) = frozen_seconds(port).await;
    assert_eq!(n2, 2);
    assert!(secs2 - secs < 0.5, "clone froze the source {:.3} s", secs2 - secs);
    eprintln!(
        "reflink clone of a mounted volume: frozen {:.1} ms",
        (secs2 - secs) * 1000.0
    );
}

/// `cp` processes whose command line mentions `dir` (the copy a killed agent left running).
fn copies_under(dir: &Path) -> Vec<u32> {
    let want = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "cp"))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&want))
                .unwrap_or(false)
        })
        .collect()
}

/// An agent killed (SIGKILL) while a volume is frozen for a capture leaves it frozen, every writer
/// hanging; the agent started again thaws it before serving, and the writer completes.
#[tokio::test]
async fn restarted_agent_thaws_what_a_killed_one_froze() {
    let port = free_port();
    let mut bed = bed(Some(6), port, Some(40)).await;
    let (id, staging, target) = mounted_volume(&bed, "crash", 2 * GIB, 1 << 30).await;
    let _thaw = ThawOnDrop(staging.clone());
    let storage = bed.nodes[0].storage.clone();
    // The copy must outlast the probing below (16 s at 64 MiB/s), however fast the machine.
    let _slow = SlowStorage::new(&bed, 0, 64 << 20);

    let mut ctl = bed.controller().await;
    let call = tokio::spawn(async move { ctl.create_snapshot(snapshot_req("crash-snap", &id)).await });
    // The record of the mounts is written before the freeze; the freeze is seen by a write that
    // does not complete.
    let deadline = Instant::now() + Duration::from_secs(60);
    while files_in(&storage.join("frozen")).is_empty() {
        assert!(Instant::now() < deadline, "no record of frozen mounts appeared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut i = 0;
    let hanging = loop {
        let w = start_write(&target, &format!("probe-{i}"));
        if !completed(&w, Duration::from_millis(300)) {
            break w;
        }
        assert!(Instant::now() < deadline, "the volume was never frozen");
        i += 1;
    };
    bed.kill_node(0);
    assert!(
        !completed(&hanging, Duration::from_secs(1)),
        "killing the agent thawed the volume: nothing to test"
    );
    assert_eq!(files_in(&storage.join("frozen")).len(), 1, "the record is gone");

    bed.start_node(0, &[]).await;
    assert!(
        completed(&hanging, Duration::from_secs(10)),
        "the restarted agent did not thaw the volume"
    );
    assert!(completed(
        &start_write(&target, "after.txt"),
        Duration::from_secs(10)
    ));
    assert_eq!(files_in(&storage.join("frozen")), Vec::<String>::new());
    assert!(
        bed.logs()
            .contains("thawed a filesystem left frozen by an interrupted capture"),
        "the thaw was not logged"
    );
    let r = call.await.unwrap();
    assert!(r.is_err(), "the capture of a killed agent answered {r:?}");

    // The copy the killed agent started runs on as an orphan: let it end before the bed unmounts.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !copies_under(&storage).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
