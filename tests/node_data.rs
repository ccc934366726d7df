//! Data through real loop devices, filesystems and mounts: what is written is what is read back,
//! across unstage/stage, expansion, read-only publishes and a kill -9 of the agent.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use common::*;
use strata::demo::pattern;
use strata::proto::csi as pb;
use tonic::Code;

fn write_file(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn mounted(path: &Path) -> bool {
    strata::volume::sys::mount_at(path).is_some()
}

async fn create(bed: &TestBed, name: &str, bytes: i64, cap: pb::VolumeCapability) -> String {
    let mut ctl = bed.controller().await;
    create_volume(&mut ctl, create_req(name, bytes, cap))
        .await
        .volume_id
}

async fn fs_round_trip(fs: &str, size: i64) {
    let bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let id = create(&bed, "data", size, mount_cap(fs)).await;
    let mut node = bed.node(0).await;
    let (staging, target) = bed.kubelet_paths("data");
    node.node_stage_volume(stage_req(&id, &staging, mount_cap(fs)))
        .await
        .unwrap();
    // Stage and publish twice: idempotent.
    attach(&mut node, &id, &staging, &target, mount_cap(fs)).await;
    node.node_publish_volume(publish_req(&id, &staging, &target, mount_cap(fs), false))
        .await
        .unwrap();
    let mi = strata::volume::sys::mount_at(&staging).unwrap();
    assert_eq!(mi.fs_type, fs);
    let data = pattern(24 << 20, 7);
    write_file(&target.join("a.bin"), &data);
    std::fs::create_dir_all(target.join("dir/sub")).unwrap();
    write_file(&target.join("dir/sub/small.txt"), b"hello strata");

    node.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    node.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    assert!(!target.exists());
    node.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(!mounted(&staging));
    let backing = bed.nodes[0].storage.join("volumes").join(&id).join("data.img");
    assert!(
        strata::volume::sys::loops_for(&backing).is_empty(),
        "loop device left attached"
    );

    attach(&mut node, &id, &staging, &target, mount_cap(fs)).await;
    assert!(
        std::fs::read(target.join("a.bin")).unwrap() == data,
        "data differs after restage"
    );
    assert_eq!(
        std::fs::read(target.join("dir/sub/small.txt")).unwrap(),
        b"hello strata"
    );

    // A staged volume cannot be deleted; after unstage it can, and its file is gone.
    let mut ctl = bed.controller().await;
    let del = ctl
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(del), Code::FailedPrecondition);
    detach(&mut node, &id, &staging, &target).await;
    ctl.delete_volume(pb::DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!backing.exists());
}

#[tokio::test]
async fn ext4_data_survives_unstage_and_restage() {
    fs_round_trip("ext4", 128 * MIB).await;
}

#[tokio::test]
async fn xfs_data_survives_unstage_and_restage() {
    fs_round_trip("xfs", 320 * MIB).await;
}

#[tokio::test]
async fn block_volume_data_round_trips() {
    let bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let id = create(&bed, "blk", 64 * MIB, block_cap()).await;
    let mut node = bed.node(0).await;
    let (staging, target) = bed.kubelet_paths("blk");
    attach(&mut node, &id, &staging, &target, block_cap()).await;
    let data = pattern(8 << 20, 11);
    {
        let mut dev = std::fs::OpenOptions::new().write(true).open(&target).unwrap();
        dev.seek(SeekFrom::Start(5 << 20)).unwrap();
        dev.write_all(&data).unwrap();
        dev.sync_all().unwrap();
    }
    let stats = node
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.to_string_lossy().into(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage[0].total, 64 * MIB);
    // Read-only publish of the same block volume: reads work, writes are refused.
    let ro_target = bed.dir.join("kubelet/pods/ro/dev");
    node.node_publish_volume(publish_req(&id, &staging, &ro_target, block_cap(), true))
        .await
        .unwrap();
    // The kernel may let a read-only device be opened for write; the write itself is refused.
    let write_refused = match std::fs::OpenOptions::new().write(true).open(&ro_target) {
        Err(_) => true,
        Ok(mut f) => f.write_all(&[0u8; 4096]).and_then(|_| f.sync_all()).is_err(),
    };
    assert!(write_refused, "a write through the read-only publish succeeded");
    let mut got = vec![0u8; data.len()];
    let mut f = std::fs::File::open(&ro_target).unwrap();
    f.seek(SeekFrom::Start(5 << 20)).unwrap();
    f.read_exact(&mut got).unwrap();
    assert!(got == data, "read-only view differs");
    drop(f);
    node.node_unpublish_volume(unpublish_req(&id, &ro_target))
        .await
        .unwrap();
    detach(&mut node, &id, &staging, &target).await;
    let backing = bed.nodes[0].storage.join("volumes").join(&id).join("data.img");
    assert!(
        strata::volume::sys::loops_for(&backing).is_empty(),
        "loop device left attached"
    );
    // The bytes are in the backing file itself, at the same offset.
    let mut f = std::fs::File::open(&backing).unwrap();
    f.seek(SeekFrom::Start(5 << 20)).unwrap();
    let mut got = vec![0u8; data.len()];
    f.read_exact(&mut got).unwrap();
    assert!(got == data);
    // Stage and publish again: the data is there through the device.
    attach(&mut node, &id, &staging, &target, block_cap()).await;
    let mut f = std::fs::File::open(&target).unwrap();
    f.seek(SeekFrom::Start(5 << 20)).unwrap();
    f.read_exact(&mut got).unwrap();
    assert!(got == data);
}

#[tokio::test]
async fn read_only_filesystem_publish_refuses_writes() {
    let bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let id = create(&bed, "ro", 64 * MIB, mount_cap("ext4")).await;
    let mut node = bed.node(0).await;
    let (staging, target) = bed.kubelet_paths("ro");
    let rw_target = bed.dir.join("kubelet/pods/rw/mount");
    node.node_stage_volume(stage_req(&id, &staging, mount_cap("ext4")))
        .await
        .unwrap();
    node.node_publish_volume(publish_req(&id, &staging, &rw_target, mount_cap("ext4"), false))
        .await
        .unwrap();
    write_file(&rw_target.join("f"), b"written rw");
    node.node_publish_volume(publish_req(&id, &staging, &target, mount_cap("ext4"), true))
        .await
        .unwrap();
    assert_eq!(std::fs::read(target.join("f")).unwrap(), b"written rw");
    let err = std::fs::File::create(target.join("g")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    // The same target again with another read-only flag is a conflict.
    let r = node
        .node_publish_volume(publish_req(&id, &staging, &target, mount_cap("ext4"), false))
        .await;
    assert_eq!(code(r), Code::AlreadyExists);
    // Unstage while published is refused.
    assert_eq!(
        code(node.node_unstage_volume(unstage_req(&id, &staging)).await),
        Code::FailedPrecondition
    );
    // The volume reports where it is published.
    let mut ctl = bed.controller().await;
    let got = ctl
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        got.into_inner().status.unwrap().published_node_ids,
        vec!["node-a".to_string()]
    );
}

fn fs_bytes(path: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    s.blocks() as u64 * s.fragment_size() as u64
}

/// Online ext4 growth (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE; privileged pods have it, some
/// sandboxes do not. The agents the bed starts inherit this process's capabilities.
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    const CAP_SYS_RESOURCE: u64 = 24;
    u64::from_str_radix(eff, 16).unwrap() & (1 << CAP_SYS_RESOURCE) != 0
}

async fn expand_to(bed: &TestBed, id: &str, bytes: i64, fs: &str) -> pb::ControllerExpandVolumeResponse {
    let mut ctl = bed.controller().await;
    ctl.controller_expand_volume(pb::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capability: Some(mount_cap(fs)),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// Both filesystems, whatever the host: where the node plugin has CAP_SYS_RESOURCE, ext4 grows
/// online like xfs; where it does not, NodeExpandVolume says so (FAILED_PRECONDITION naming the
/// capability) and the filesystem grows at the next stage, as the README documents.
#[tokio::test]
async fn online_expansion_grows_filesystem_and_keeps_data() {
    let cap_sys_resource = has_cap_sys_resource();
    eprintln!("CAP_SYS_RESOURCE: {cap_sys_resource}");
    for fs in ["ext4", "xfs"] {
        let bed = TestBed::start(&[("node-a", "zone-a")]).await;
        let id = create(&bed, "grow", 320 * MIB, mount_cap(fs)).await;
        let mut node = bed.node(0).await;
        let (staging, target) = bed.kubelet_paths("grow");
        attach(&mut node, &id, &staging, &target, mount_cap(fs)).await;
        let data = pattern(16 << 20, 3);
        write_file(&target.join("keep.bin"), &data);
        let before = fs_bytes(&target);

        let resp = expand_to(&bed, &id, 1024 * MIB, fs).await;
        assert_eq!(resp.capacity_bytes, 1024 * MIB);
        assert!(resp.node_expansion_required);
        let n = node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target.to_string_lossy().into(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: 1024 * MIB,
                    limit_bytes: 0,
                }),
                staging_target_path: staging.to_string_lossy().into(),
                volume_capability: Some(mount_cap(fs)),
                ..Default::default()
            })
            .await;
        if fs == "ext4" && !cap_sys_resource {
            let e = n.unwrap_err();
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
            assert!(
                e.message().contains("CAP_SYS_RESOURCE") && e.message().contains("next staged"),
                "{}",
                e.message()
            );
            assert!(
                fs_bytes(&target) < before + (64 << 20),
                "ext4 grew online without CAP_SYS_RESOURCE"
            );
            // The documented way: the next stage grows it offline.
            detach(&mut node, &id, &staging, &target).await;
            attach(&mut node, &id, &staging, &target, mount_cap(fs)).await;
        } else {
            assert_eq!(n.unwrap().into_inner().capacity_bytes, 1024 * MIB);
        }
        let after = fs_bytes(&target);
        assert!(
            after > before * 2,
            "{fs}: filesystem did not grow ({before} -> {after})"
        );
        assert!(
            std::fs::read(target.join("keep.bin")).unwrap() == data,
            "{fs}: data changed by expansion"
        );
        // Expanding to a smaller size changes nothing.
        assert_eq!(
            expand_to(&bed, &id, 320 * MIB, fs).await.capacity_bytes,
            1024 * MIB
        );
        let mut ctl = bed.controller().await;
        let missing = ctl
            .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: "vol-missing".into(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: 320 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await;
        assert_eq!(code(missing), Code::NotFound);
    }
}

#[tokio::test]
async fn expansion_while_unstaged_grows_filesystem_at_next_stage() {
    for fs in ["ext4", "xfs"] {
        let bed = TestBed::start(&[("node-a", "zone-a")]).await;
        let id = create(&bed, "grow-offline", 320 * MIB, mount_cap(fs)).await;
        let mut node = bed.node(0).await;
        let (staging, target) = bed.kubelet_paths("g");
        attach(&mut node, &id, &staging, &target, mount_cap(fs)).await;
        let data = pattern(16 << 20, 9);
        write_file(&target.join("keep.bin"), &data);
        let before = fs_bytes(&target);
        detach(&mut node, &id, &staging, &target).await;

        assert_eq!(
            expand_to(&bed, &id, 1024 * MIB, fs).await.capacity_bytes,
            1024 * MIB
        );
        attach(&mut node, &id, &staging, &target, mount_cap(fs)).await;
        let after = fs_bytes(&target);
        assert!(
            after > before * 2,
            "{fs}: filesystem did not grow at stage ({before} -> {after})"
        );
        assert!(
            std::fs::read(target.join("keep.bin")).unwrap() == data,
            "{fs}: data changed by expansion"
        );
    }
}

#[tokio::test]
async fn stats_report_usage_and_inodes() {
    let bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let id = create(&bed, "st", 128 * MIB, mount_cap("ext4")).await;
    let mut node = bed.node(0).await;
    let (staging, target) = bed.kubelet_paths("st");
    attach(&mut node, &id, &staging, &target, mount_cap("ext4")).await;
    let req = || pb::NodeGetVolumeStatsRequest {
        volume_id: id.clone(),
        volume_path: target.to_string_lossy().into(),
        staging_target_path: String::new(),
    };
    let before = node.node_get_volume_stats(req()).await.unwrap().into_inner();
    write_file(&target.join("x"), &pattern(20 << 20, 1));
    let after = node.node_get_volume_stats(req()).await.unwrap().into_inner();
    let bytes = |s: &pb::NodeGetVolumeStatsResponse, unit: pb::volume_usage::Unit| {
        s.usage.iter().find(|u| u.unit == unit as i32).cloned().unwrap()
    };
    let (b0, b1) = (
        bytes(&before, pb::volume_usage::Unit::Bytes),
        bytes(&after, pb::volume_usage::Unit::Bytes),
    );
    assert!(
        b1.used - b0.used >= 20 * MIB,
        "used grew by {}",
        b1.used - b0.used
    );
    assert!(b1.total > 100 * MIB && b1.total <= 128 * MIB);
    let i1 = bytes(&after, pb::volume_usage::Unit::Inodes);
    assert!(i1.total > 0 && i1.used > 0);
    assert!(!after.volume_condition.unwrap().abnormal);
    let mut missing = req();
    missing.volume_path = bed.dir.join("nope").to_string_lossy().into();
    assert_eq!(code(node.node_get_volume_stats(missing).await), Code::NotFound);
    // A path that exists but is not where the volume is published: NOT_FOUND too.
    let mut elsewhere = req();
    elsewhere.volume_path = bed.dir.to_string_lossy().into();
    assert_eq!(code(node.node_get_volume_stats(elsewhere).await), Code::NotFound);
}

#[tokio::test]
async fn kill_9_of_the_agent_loses_nothing() {
    let mut bed = TestBed::start(&[("node-a", "zone-a"), ("node-b", "zone-b")]).await;
    let id = create(&bed, "crash", 128 * MIB, mount_cap("ext4")).await;
    let node_i = bed
        .nodes
        .iter()
        .position(|n| n.storage.join("volumes").join(&id).exists())
        .expect("volume on some node");
    let (staging, target) = bed.kubelet_paths("crash");
    let data = pattern(12 << 20, 5);
    {
        let mut node = bed.node(node_i).await;
        attach(&mut node, &id, &staging, &target, mount_cap("ext4")).await;
        write_file(&target.join("before-crash.bin"), &data);
    }
    bed.kill_node(node_i);
    // Mounts and loop devices outlive the agent; the workload keeps writing.
    assert!(mounted(&target) && mounted(&staging));
    write_file(&target.join("during-outage.txt"), b"agent was down");
    // While the agent is down, the controller says so instead of guessing.
    let mut ctl = bed.controller().await;
    let r = ctl
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await;
    assert_eq!(code(r), Code::Unavailable);
    let r = ctl
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::Unavailable);

    bed.start_node(node_i, &[]).await;
    let mut node = bed.node(node_i).await;
    // After restart the agent knows the volume is staged and published.
    let got = ctl
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .unwrap();
    let status = got.into_inner().status.unwrap();
    assert_eq!(status.published_node_ids, vec![bed.nodes[node_i].name.clone()]);
    assert!(!status.volume_condition.unwrap().abnormal);
    // Repeated stage/publish are recognised as done.
    attach(&mut node, &id, &staging, &target, mount_cap("ext4")).await;
    detach(&mut node, &id, &staging, &target).await;
    assert!(!mounted(&staging) && !mounted(&target));
    // The next stage finds everything.
    attach(&mut node, &id, &staging, &target, mount_cap("ext4")).await;
    assert!(std::fs::read(target.join("before-crash.bin")).unwrap() == data);
    assert_eq!(
        std::fs::read(target.join("during-outage.txt")).unwrap(),
        b"agent was down"
    );
    detach(&mut node, &id, &staging, &target).await;
    ctl.delete_volume(pb::DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!bed.nodes[node_i].storage.join("volumes").join(&id).exists());
}

#[tokio::test]
async fn restore_in_another_zone_is_refused_by_topology_not_data() {
    // A volume pinned to zone-b is staged on node-b; node-a's plugin does not hold it.
    let bed = TestBed::start(&[("node-a", "zone-a"), ("node-b", "zone-b")]).await;
    let mut ctl = bed.controller().await;
    let mut r = create_req("zb", 64 * MIB, mount_cap("ext4"));
    r.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: vec![topo(&[(strata::topology::ZONE_KEY, "zone-b")])],
        preferred: vec![],
    });
    let id = create_volume(&mut ctl, r).await.volume_id;
    let (staging, target) = bed.kubelet_paths("zb");
    let mut b = bed.node(1).await;
    attach(&mut b, &id, &staging, &target, mount_cap("ext4")).await;
    write_file(&target.join("z"), b"zone-b data");
    let mut a = bed.node(0).await;
    let (sa, _) = bed.kubelet_paths("za");
    assert_eq!(
        code(a.node_stage_volume(stage_req(&id, &sa, mount_cap("ext4"))).await),
        Code::NotFound
    );
    assert_eq!(std::fs::read(target.join("z")).unwrap(), b"zone-b data");
}

/// Unmounts and detaches what a test made under its directory, then removes it, also on failure.
struct KernelScratch(std::path::PathBuf);

impl Drop for KernelScratch {
    fn drop(&mut self) {
        cleanup_kernel_state(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// FIEMAP as the incremental upload uses it, on XFS (an XFS loop mount, so FIEMAP and reflinks are
/// there whatever filesystem holds the temporary directory): a reflink clone maps every range to
/// its source's blocks, and after a 1 MiB overwrite exactly that range differs.
#[test]
fn fiemap_finds_shared_and_changed_extents_on_xfs() {
    use std::os::unix::fs::FileExt;
    use strata::volume::fiemap;
    require_root();
    let dir = std::env::temp_dir().join(format!("strata-fiemap-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let _scratch = KernelScratch(dir.clone());
    let mnt = dir.join("mnt");
    make_xfs(&dir.join("xfs.img"), &mnt);
    let (base, clone) = (mnt.join("base"), mnt.join("clone"));
    write_file(&base, &pattern(8 << 20, 5));
    let ok = std::process::Command::new("cp")
        .arg("--reflink=always")
        .arg(&base)
        .arg(&clone)
        .status()
        .unwrap();
    assert!(ok.success(), "reflink copy on XFS failed");
    let f = std::fs::OpenOptions::new().write(true).open(&clone).unwrap();
    f.write_all_at(&pattern(1 << 20, 6), 3 << 20).unwrap();
    f.sync_all().unwrap();
    let map = |p: &Path| {
        fiemap::extents(&std::fs::File::open(p).unwrap())
            .unwrap()
            .expect("XFS answers FIEMAP")
    };
    let (a, b) = (map(&base), map(&clone));
    for x in [&a, &b] {
        let total: u64 = x.iter().map(|e| e.length).sum();
        assert!(total >= 8 << 20, "extents cover {total} bytes of 8 MiB: {x:?}");
        assert!(x.last().unwrap().flags & 0x1 != 0, "no FIEMAP_EXTENT_LAST: {x:?}");
    }
    for i in 0..8u64 {
        assert_eq!(
            fiemap::same_range(&a, &b, i << 20, 1 << 20),
            i != 3,
            "MiB {i}: base {a:?}, clone {b:?}"
        );
    }
}
