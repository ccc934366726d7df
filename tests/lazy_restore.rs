//! Lazy restore on the multi-node test bed: a volume created from a snapshot is usable at the
//! first CreateVolume answer and fills in behind (background hydration held to a few MiB/s here,
//! so everything below happens while chunks are still missing). Checked against a byte model:
//! random reads during hydration, writes during hydration that must survive the chunks arriving
//! later, a snapshot taken mid-hydration, the agent killed, the hydrator killed (resumed from its
//! map, attached or not), concurrent restores of one snapshot, and a chunk missing from the store.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use strata::demo::pattern;
use strata::hydrate::{HydrateStatus, Paths};
use strata::proto::csi as pb;
use strata::topology::ZONE_KEY;

/// Background hydration cap for the beds: 1 MiB chunks at 4 MiB/s.
const BANDWIDTH: &str = "--hydration-bandwidth-mib=4";

fn restore_req(name: &str, snap: &str, zone: Option<&str>, bytes: u64) -> pb::CreateVolumeRequest {
    let mut r = create_req(name, bytes as i64, block_cap());
    r.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(
            pb::volume_content_source::SnapshotSource {
                snapshot_id: snap.into(),
            },
        )),
    });
    if let Some(z) = zone {
        r.accessibility_requirements = Some(pb::TopologyRequirement {
            requisite: vec![topo(&[(ZONE_KEY, z)])],
            preferred: vec![],
        });
    }
    r
}

fn paths(bed: &TestBed, node: usize, vol: &str) -> Paths {
    Paths::new(&bed.nodes[node].storage.join("volumes").join(vol))
}

fn status(bed: &TestBed, node: usize, vol: &str) -> HydrateStatus {
    paths(bed, node, vol)
        .read_status()
        .unwrap_or_else(|| panic!("{vol} has no hydration status"))
}

async fn wait_status(
    bed: &TestBed,
    node: usize,
    vol: &str,
    what: &str,
    ok: impl Fn(&HydrateStatus) -> bool,
) -> HydrateStatus {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(s) = paths(bed, node, vol).read_status() {
            if ok(&s) {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{vol}: waiting for {what}; status {:?}\n{}",
            paths(bed, node, vol).read_status(),
            bed.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The hydrator's status as written after this call: it rewrites its status file every 200 ms,
/// so one read right after some I/O may not count that I/O yet.
async fn fresh_status(bed: &TestBed, node: usize, vol: &str) -> HydrateStatus {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    wait_status(bed, node, vol, "a status written after the I/O", |s| {
        s.updated_unix_ms > now_ms
    })
    .await
}

/// Waits until the agent has retired the hydration (the volume runs on its plain file).
async fn wait_retired(bed: &TestBed, node: usize, vol: &str) {
    let p = paths(bed, node, vol);
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.hydrating() {
        assert!(Instant::now() < deadline, "{vol} was not retired\n{}", bed.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until NodeGetVolumeStats reports the volume abnormal, with `why` in the message.
async fn wait_abnormal(
    node: &mut strata::proto::csi::node_client::NodeClient<tonic::transport::Channel>,
    vol: &str,
    staging: &Path,
    target: &Path,
    why: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = node
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: vol.into(),
                volume_path: target.to_string_lossy().into(),
                staging_target_path: staging.to_string_lossy().into(),
            })
            .await
            .unwrap()
            .into_inner()
            .volume_condition
            .unwrap();
        if c.abnormal {
            assert!(c.message.contains(why), "{}", c.message);
            return;
        }
        assert!(Instant::now() < deadline, "{vol}: no abnormal condition ({why})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn open_rw(p: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap()
}

/// `n` random 4 KiB reads compared with the model.
fn random_reads(dev: &std::fs::File, model: &[u8], rng: &mut Rng, n: usize) {
    let mut buf = vec![0u8; 4096];
    for _ in 0..n {
        let off = rng.below(model.len() as u64 / 4096) * 4096;
        dev.read_exact_at(&mut buf, off).unwrap();
        assert!(
            buf[..] == model[off as usize..off as usize + 4096],
            "read at {off} differs from the snapshot"
        );
    }
}

/// `n` random writes applied to the device and the model: every other one whole pages (the kernel
/// writes those without reading the page first, so they reach chunks not fetched yet), the others
/// sector-sized (read-modify-write through the page cache).
fn random_writes(dev: &std::fs::File, model: &mut [u8], rng: &mut Rng, n: usize) {
    for k in 0..n {
        let unit = if k % 2 == 0 { 4096 } else { 512 };
        let len = (1 + rng.below(32)) as usize * unit;
        let off = rng.below((model.len() - len) as u64 / unit as u64) as usize * unit;
        let data = pattern(len, rng.next());
        dev.write_all_at(&data, off as u64).unwrap();
        model[off..off + len].copy_from_slice(&data);
    }
    dev.sync_all().unwrap();
}

fn whole(p: &Path, len: usize) -> Vec<u8> {
    let mut v = std::fs::read(p).unwrap();
    v.truncate(len);
    v
}

/// Writes `data` into a new block volume on `node` and snapshots it.
async fn source_snapshot(
    bed: &TestBed,
    node: usize,
    zone: Option<&str>,
    data: &[u8],
    name: &str,
) -> (String, String) {
    let mut ctl = bed.controller().await;
    let mut r = create_req(name, data.len() as i64, block_cap());
    if let Some(z) = zone {
        r.accessibility_requirements = Some(pb::TopologyRequirement {
            requisite: vec![topo(&[(ZONE_KEY, z)])],
            preferred: vec![],
        });
    }
    let (id, _, tg) = attached_block_volume(bed, &mut ctl, node, r).await;
    let f = open_rw(&tg);
    f.write_all_at(data, 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let snap = snapshot(&mut ctl, &format!("{name}-snap"), &id).await.snapshot_id;
    (id, snap)
}

fn node_spec(zones: &[(&str, &str)], per_node: Vec<Vec<String>>, store: StoreKind) -> BedSpec {
    BedSpec {
        nodes: zones
            .iter()
            .map(|(n, z)| (n.to_string(), Some(z.to_string()), "127.0.0.1".into(), None))
            .collect(),
        per_node_args: per_node,
        store,
        ..Default::default()
    }
}

#[tokio::test]
async fn lazy_restore_serves_reads_and_keeps_writes_while_hydrating() {
    let port_b = free_port();
    let b_args = vec![
        BANDWIDTH.to_string(),
        format!("--metrics-addr=127.0.0.1:{port_b}"),
    ];
    let mut bed = TestBed::start_spec(node_spec(
        &[("node-a", "zone-a"), ("node-b", "zone-b")],
        vec![vec![], b_args.clone()],
        StoreKind::S3,
    ))
    .await;
    let size = 48 * MIB as usize;
    // 40 MiB of data and an 8 MiB zero tail (never stored, never fetched).
    let mut data = pattern(40 << 20, 21);
    data.resize(size, 0);
    let (_, s1) = source_snapshot(&bed, 0, Some("zone-a"), &data, "src").await;
    let store = bed.store().await;
    let m1 = strata::snapshot::manifest::read_manifest(&store, &s1)
        .await
        .unwrap()
        .unwrap();

    // The first CreateVolume answer is the volume; it stages and reads at once.
    let mut ctl = bed.controller().await;
    let v = create_volume(&mut ctl, restore_req("lazy", &s1, Some("zone-b"), size as u64))
        .await
        .volume_id;
    let st0 = status(&bed, 1, &v);
    assert!(!st0.complete() && st0.local_chunks < st0.total_chunks, "{st0:?}");
    let mut nb = bed.node(1).await;
    let (stg, tg) = bed.kubelet_paths("lazy");
    attach(&mut nb, &v, &stg, &tg, block_cap()).await;
    assert!(
        !strata::volume::sys::loops_for(&paths(&bed, 1, &v).lazy_data()).is_empty(),
        "a hydrating volume is attached through its hydrator's file"
    );
    let dev = open_rw(&tg);
    let mut model = data.clone();
    let mut rng = Rng(0x5eed);
    // Writes first, so that most land on chunks not fetched yet: they must survive those chunks
    // arriving later (checked below through a fresh loop device, past any page cache).
    random_writes(&dev, &mut model, &mut rng, 40);
    random_reads(&dev, &model, &mut rng, 200);
    let mid = fresh_status(&bed, 1, &v).await;
    assert!(
        !mid.complete(),
        "hydration finished too early for this test: {mid:?}"
    );
    assert!(mid.fetched_on_demand > 0, "{mid:?}");
    // A clone needs the whole source: refused (retryable) while it hydrates.
    let mut clone = restore_req("clone-mid", &s1, Some("zone-b"), size as u64);
    clone.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Volume(
            pb::volume_content_source::VolumeSource { volume_id: v.clone() },
        )),
    });
    let refused = ctl.create_volume(clone).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("still hydrating"),
        "{}",
        refused.message()
    );
    // Progress as an operator sees it on the node.
    let storage = format!("--storage-dir={}", bed.nodes[1].storage.display());
    let (ok, text) = cli(&["volume", "show", &v, &storage]);
    assert!(
        ok && text.contains("hydrating") && text.contains("on demand"),
        "{text}"
    );
    let (ok, text) = cli(&["volume", "ls", &storage]);
    assert!(ok && text.contains(&v) && text.contains("hydrating"), "{text}");

    // A snapshot taken while hydrating: the restored chunks are reused, the written ones read.
    let s2 = snapshot(&mut ctl, "mid-hydration", &v).await.snapshot_id;
    let model_s2 = model.clone();
    random_writes(&dev, &mut model, &mut rng, 20);

    // The agent crashes: the hydrator (own process group) goes on serving the attached volume.
    bed.kill_node(1);
    random_reads(&dev, &model, &mut rng, 50);
    random_writes(&dev, &mut model, &mut rng, 10);
    let args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    bed.start_node(1, &args).await;

    let done = wait_status(&bed, 1, &v, "hydration to complete", HydrateStatus::complete).await;
    assert!(done.error.is_empty(), "{done:?}");
    // Every stored chunk was fetched exactly once; zero chunks never.
    assert_eq!(
        done.fetched_background + done.fetched_on_demand,
        m1.chunks.len() as u64,
        "{done:?}"
    );
    assert!(
        whole(&tg, size) == model,
        "volume differs from the model after hydration"
    );
    drop(dev);

    // Unstaged, the agent retires the hydration; the next stage uses the plain file.
    detach(&mut nb, &v, &stg, &tg).await;
    wait_retired(&bed, 1, &v).await;
    let metrics = http_get(port_b, "/metrics").await;
    assert!(
        metrics.contains(r#"strata_restores_total{outcome="ok"} 1"#),
        "{metrics}"
    );
    attach(&mut nb, &v, &stg, &tg, block_cap()).await;
    let data_path = bed.nodes[1].storage.join("volumes").join(&v).join("data.img");
    assert!(!strata::volume::sys::loops_for(&data_path).is_empty());
    assert!(
        whole(&tg, size) == model,
        "volume differs from the model on its plain file"
    );

    // The mid-hydration snapshot restores exactly, on the other node.
    let r2 = create_volume(
        &mut ctl,
        restore_req("from-mid", &s2, Some("zone-a"), size as u64),
    )
    .await
    .volume_id;
    let mut na = bed.node(0).await;
    let (st2, tg2) = bed.kubelet_paths("from-mid");
    attach(&mut na, &r2, &st2, &tg2, block_cap()).await;
    assert!(
        whole(&tg2, size) == model_s2,
        "snapshot taken mid-hydration differs"
    );
}

#[tokio::test]
async fn hydrator_killed_resumes_from_its_map() {
    let bed = TestBed::start_spec(node_spec(
        &[("node-a", "zone-a")],
        vec![vec![BANDWIDTH.into()]],
        StoreKind::Local,
    ))
    .await;
    let size = 24 * MIB as usize;
    let data = pattern(size, 33);
    let (_, snap) = source_snapshot(&bed, 0, None, &data, "src").await;
    let mut ctl = bed.controller().await;
    let mut node = bed.node(0).await;

    // Not attached: killed, then resumed by the agent without fetching again what it had.
    let v = create_volume(&mut ctl, restore_req("detached", &snap, None, size as u64))
        .await
        .volume_id;
    let before = wait_status(&bed, 0, &v, "some progress", |s| s.local_chunks >= 4).await;
    let _ = std::process::Command::new("kill")
        .args(["-9", &before.pid.to_string()])
        .status();
    let resumed = wait_status(&bed, 0, &v, "a new hydrator", |s| s.pid != before.pid).await;
    assert!(
        resumed.local_chunks >= before.local_chunks,
        "{before:?} -> {resumed:?}"
    );
    let done = wait_status(&bed, 0, &v, "completion", |s| s.pid != before.pid && s.complete()).await;
    assert!(
        done.fetched_background + done.fetched_on_demand <= done.total_chunks - before.local_chunks,
        "the resumed hydrator fetched chunks it already had: {before:?} -> {done:?}"
    );
    wait_retired(&bed, 0, &v).await;
    let (st, tg) = bed.kubelet_paths("detached");
    attach(&mut node, &v, &st, &tg, block_cap()).await;
    assert!(whole(&tg, size) == data);

    // Attached: I/O cannot survive its hydrator, and the volume says so; a restage recovers.
    let v2 = create_volume(&mut ctl, restore_req("attached", &snap, None, size as u64))
        .await
        .volume_id;
    let (st2, tg2) = bed.kubelet_paths("attached");
    attach(&mut node, &v2, &st2, &tg2, block_cap()).await;
    let first = status(&bed, 0, &v2);
    let _ = std::process::Command::new("kill")
        .args(["-9", &first.pid.to_string()])
        .status();
    wait_abnormal(&mut node, &v2, &st2, &tg2, "hydrator stopped").await;
    detach(&mut node, &v2, &st2, &tg2).await;
    attach(&mut node, &v2, &st2, &tg2, block_cap()).await;
    assert!(whole(&tg2, size) == data, "restaged volume differs");
    assert_ne!(status(&bed, 0, &v2).pid, first.pid);
}

#[tokio::test]
async fn concurrent_restores_of_one_snapshot_are_independent() {
    let bed = TestBed::start_spec(node_spec(
        &[("node-a", "zone-a"), ("node-b", "zone-b")],
        vec![vec![BANDWIDTH.into()], vec![BANDWIDTH.into()]],
        StoreKind::S3,
    ))
    .await;
    let size = 16 * MIB as usize;
    let data = pattern(size, 44);
    let (_, snap) = source_snapshot(&bed, 0, Some("zone-a"), &data, "src").await;
    let names = [("c0", "zone-a", 0usize), ("c1", "zone-b", 1), ("c2", "zone-b", 1)];
    let creates = names.iter().map(|(name, zone, _)| {
        let (bed, snap) = (&bed, snap.clone());
        async move {
            let mut ctl = bed.controller().await;
            create_volume(&mut ctl, restore_req(name, &snap, Some(zone), size as u64))
                .await
                .volume_id
        }
    });
    let ids = futures::future::join_all(creates).await;
    let mut devs: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    let mut rng = Rng(77);
    for ((name, _, node), id) in names.iter().zip(&ids) {
        let mut n = bed.node(*node).await;
        let (st, tg) = bed.kubelet_paths(name);
        attach(&mut n, id, &st, &tg, block_cap()).await;
        let dev = open_rw(&tg);
        let mut model = data.clone();
        random_reads(&dev, &model, &mut rng, 50);
        random_writes(&dev, &mut model, &mut rng, 10);
        devs.push((tg, model));
    }
    for ((_, _, node), id) in names.iter().zip(&ids) {
        wait_status(&bed, *node, id, "completion", HydrateStatus::complete).await;
    }
    for (tg, model) in &devs {
        assert!(
            whole(tg, size) == *model,
            "{} differs from its own model",
            tg.display()
        );
    }
}

#[tokio::test]
async fn a_chunk_missing_from_the_store_is_an_io_error_not_silent_data() {
    let bed = TestBed::start_spec(node_spec(
        &[("node-a", "zone-a")],
        vec![vec![BANDWIDTH.into()]],
        StoreKind::Local,
    ))
    .await;
    let size = 8 * MIB as usize;
    let data = pattern(size, 55);
    let (_, snap) = source_snapshot(&bed, 0, None, &data, "src").await;
    let store = bed.store().await;
    let m = strata::snapshot::manifest::read_manifest(&store, &snap)
        .await
        .unwrap()
        .unwrap();
    let last = m.chunks.iter().max_by_key(|c| c.index).unwrap();
    let h: strata::snapshot::chunk::Hash = last.hash.as_slice().try_into().unwrap();
    store.delete(&strata::snapshot::chunk::key(&h)).await.unwrap();

    let mut ctl = bed.controller().await;
    let v = create_volume(&mut ctl, restore_req("broken", &snap, None, size as u64))
        .await
        .volume_id;
    let mut node = bed.node(0).await;
    let (st, tg) = bed.kubelet_paths("broken");
    attach(&mut node, &v, &st, &tg, block_cap()).await;
    let dev = std::fs::File::open(&tg).unwrap();
    let mut buf = vec![0u8; 4096];
    dev.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..] == data[..4096]);
    let off = last.index * CHUNK;
    let err = dev.read_exact_at(&mut buf, off).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let s = wait_status(&bed, 0, &v, "the permanent error", |s| s.permanent).await;
    assert!(s.error.contains("missing from the store"), "{s:?}");
    wait_abnormal(&mut node, &v, &st, &tg, "hydration cannot complete").await;
}

/// A read-only block publish of a volume still hydrating reads what the snapshot holds: its own
/// read-only loop device reads through the hydrator's file, as the staged device does, so a chunk
/// not fetched yet is fetched first (on the plain file it would read as zeros).
#[tokio::test]
async fn read_only_block_publish_while_hydrating_reads_the_snapshot() {
    let bed = TestBed::start_spec(node_spec(
        &[("node-a", "zone-a")],
        vec![vec![BANDWIDTH.into()]],
        StoreKind::Local,
    ))
    .await;
    let size = 32 * MIB as usize;
    let data = pattern(size, 66);
    let (_, snap) = source_snapshot(&bed, 0, None, &data, "src").await;
    let mut ctl = bed.controller().await;
    let v = create_volume(&mut ctl, restore_req("ro", &snap, None, size as u64))
        .await
        .volume_id;
    let mut node = bed.node(0).await;
    let (st, tg) = bed.kubelet_paths("ro");
    retry_aborted!(node.node_stage_volume(stage_req(&v, &st, block_cap()))).unwrap();
    retry_aborted!(node.node_publish_volume(publish_req(&v, &st, &tg, block_cap(), true))).unwrap();
    let p = paths(&bed, 0, &v);
    let ro = strata::volume::sys::loop_of_device_node(&tg).expect("the target is a loop device");
    assert!(ro.read_only, "{ro:?}");
    assert!(
        strata::volume::sys::loops_for(&p.lazy_data()).contains(&ro),
        "the read-only device is not on the hydrator's file"
    );
    let before = status(&bed, 0, &v);
    assert!(
        before.local_chunks < before.total_chunks,
        "hydration finished too early for this test: {before:?}"
    );
    // From the end backwards: the background queue goes forwards, so these are the chunks least
    // likely to be local yet.
    let dev = std::fs::File::open(&tg).unwrap();
    let mut buf = vec![0u8; CHUNK as usize];
    for i in (0..size / CHUNK as usize).rev() {
        let off = i * CHUNK as usize;
        dev.read_exact_at(&mut buf, off as u64).unwrap();
        assert!(
            buf[..] == data[off..off + CHUNK as usize],
            "chunk {i} read through the read-only publish differs from the snapshot"
        );
    }
    let after = fresh_status(&bed, 0, &v).await;
    assert!(
        after.fetched_on_demand > 0,
        "no read needed a chunk first, so nothing was proved: {after:?}"
    );
    drop(dev);
    retry_aborted!(node.node_unpublish_volume(unpublish_req(&v, &tg))).unwrap();
    assert!(
        strata::volume::sys::loops_for(&p.lazy_data())
            .iter()
            .all(|l| !l.read_only),
        "unpublish left the read-only device"
    );
    retry_aborted!(node.node_unstage_volume(unstage_req(&v, &st))).unwrap();
    wait_status(&bed, 0, &v, "completion", HydrateStatus::complete).await;
    wait_retired(&bed, 0, &v).await;
}
