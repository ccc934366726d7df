//! Encrypted snapshots end to end, through the CSI API with the secrets the external-snapshotter
//! and external-provisioner pass (`encryptionKey` of the classes' Secrets), against the real S3
//! server: chains, deletes in any order with GC, lazy restores on both nodes, snapshots of a
//! restored volume continuing the lineage encrypted, key rotation by a class change and by
//! `strata key rotate`; a missing key, a wrong key, a tampered object and a chunk swapped between
//! two lineages each give a clear error, never wrong data; the store and the logs never hold a
//! plaintext block or the key.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use strata::demo::pattern;
use strata::proto::csi as pb;
use strata::snapshot::manifest::read_manifest;
use strata::topology::ZONE_KEY;
use tonic::Code;

const TWO_ZONES: &[(&str, &str)] = &[("node-a", "zone-a"), ("node-b", "zone-b")];
const SIZE: usize = 24 << 20;

fn secrets(key_hex: &str) -> HashMap<String, String> {
    HashMap::from([("encryptionKey".to_string(), key_hex.to_string())])
}

fn new_key() -> String {
    strata::snapshot::crypto::Kek::generate().to_hex()
}

fn snap_req(name: &str, vol: &str, key: Option<&str>) -> pb::CreateSnapshotRequest {
    let mut r = snapshot_req(name, vol);
    if let Some(k) = key {
        r.secrets = secrets(k);
    }
    r
}

fn restore_req(name: &str, snap: &str, zone: &str, key: Option<&str>) -> pb::CreateVolumeRequest {
    let mut r = create_req(name, SIZE as i64, block_cap());
    r.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(
            pb::volume_content_source::SnapshotSource {
                snapshot_id: snap.into(),
            },
        )),
    });
    r.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: vec![topo(&[(ZONE_KEY, zone)])],
        preferred: vec![],
    });
    if let Some(k) = key {
        r.secrets = secrets(k);
    }
    r
}

fn write_at(dev: &Path, off: usize, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.write_all_at(data, off as u64).unwrap();
    f.sync_all().unwrap();
}

/// Restores `snap` in `zone` (node `node`) with `key`, attaches it as a block device and checks
/// every byte against `want` (read while it hydrates, then again once hydrated); detaches it.
/// Returns the volume id.
async fn restore_and_check(
    bed: &TestBed,
    name: &str,
    snap: &str,
    zone: &str,
    node: usize,
    key: &str,
    want: &[u8],
) -> String {
    let mut ctl = bed.controller().await;
    let v = create_volume(&mut ctl, restore_req(name, snap, zone, Some(key)))
        .await
        .volume_id;
    let (st, tg) = bed.kubelet_paths(name);
    let mut n = bed.node(node).await;
    attach(&mut n, &v, &st, &tg, block_cap()).await;
    let got = std::fs::read(&tg).unwrap();
    assert!(
        got[..want.len()] == *want,
        "{name}: restored bytes differ from the snapshot"
    );
    detach(&mut n, &v, &st, &tg).await;
    v
}

async fn manifest(bed: &TestBed, id: &str) -> strata::proto::store::Manifest {
    read_manifest(&bed.store().await, id).await.unwrap().unwrap()
}

/// No object under `chunks/` holds 8 bytes of `data` (the volume's plaintext, random) found at
/// any 512-byte-aligned offset of it, at any offset of the object: a plaintext chunk would.
async fn assert_no_plaintext(bed: &TestBed, data: &[u8]) {
    let store = bed.store().await;
    let needles: std::collections::HashSet<u64> = data
        .chunks_exact(512)
        .map(|b| u64::from_ne_bytes(b[..8].try_into().unwrap()))
        .filter(|&w| w != 0)
        .collect();
    let keys = store.list("chunks/").await.unwrap();
    assert!(!keys.is_empty());
    for k in keys {
        let obj = store.get(&k.key).await.unwrap();
        let hit = obj
            .windows(8)
            .position(|w| needles.contains(&u64::from_ne_bytes(w.try_into().unwrap())));
        assert!(
            hit.is_none(),
            "{}: plaintext of the volume at offset {hit:?}",
            k.key
        );
    }
}

/// Whether the encoded manifest holds the key, as hex or as its 32 raw bytes.
fn holds_key(m: &strata::proto::store::Manifest, key_hex: &str) -> bool {
    use prost::Message;
    let bytes = m.encode_to_vec();
    let raw = hex::decode(key_hex).unwrap();
    String::from_utf8_lossy(&bytes).contains(key_hex) || bytes.windows(32).any(|w| w == raw.as_slice())
}

#[tokio::test]
async fn encrypted_chain_restores_on_both_nodes_and_keeps_its_lineage_encrypted() {
    let bed = TestBed::start_store(TWO_ZONES, StoreKind::S3).await;
    let mut ctl = bed.controller().await;
    let key = new_key();
    let mut r = create_req("src", SIZE as i64, block_cap());
    r.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: vec![topo(&[(ZONE_KEY, "zone-a")])],
        preferred: vec![],
    });
    let (id, _, dev) = attached_block_volume(&bed, &mut ctl, 0, r).await;
    let mut v1 = pattern(16 << 20, 1);
    v1.resize(SIZE, 0);
    write_at(&dev, 0, &v1);

    // Full, then incremental (two 1 MiB extents rewritten).
    let s1 = snapshot_with(&mut ctl, snap_req("e1", &id, Some(&key))).await;
    let m1 = manifest(&bed, &s1.snapshot_id).await;
    let enc = m1
        .encryption
        .clone()
        .expect("the manifest records the encryption");
    assert_eq!(enc.scheme, "aes-256-gcm");
    assert!(!holds_key(&m1, &key), "the key is in the manifest");
    let mut v2 = v1.clone();
    for (off, seed) in [(2 << 20, 2), (9 << 20, 3)] {
        let p = pattern(1 << 20, seed);
        write_at(&dev, off, &p);
        v2[off..off + (1 << 20)].copy_from_slice(&p);
    }
    let s2 = snapshot_with(&mut ctl, snap_req("e2", &id, Some(&key))).await;
    let m2 = manifest(&bed, &s2.snapshot_id).await;
    assert_eq!(m2.parent_id, s1.snapshot_id, "not incremental");
    assert_eq!(m2.lineage, m1.lineage);
    let st = m2.stats.unwrap();
    assert_eq!(st.chunks_new, 2, "{st:?}");
    assert_eq!(st.chunks_reused, 14, "{st:?}");
    assert_eq!(
        m2.encryption.as_ref().unwrap().key_id,
        enc.key_id,
        "one data key per lineage"
    );
    assert_no_plaintext(&bed, &v2).await;

    // Restores on both nodes, byte for byte (lazily hydrated through the hydrator's codec).
    restore_and_check(&bed, "r1b", &s1.snapshot_id, "zone-b", 1, &key, &v1).await;
    let r2a = restore_and_check(&bed, "r2a", &s2.snapshot_id, "zone-a", 0, &key, &v2).await;

    // Without the key, or with another one: a clear error with the right code, nothing created.
    let volumes_before = list_volumes(&mut ctl).await;
    let e = ctl
        .create_volume(restore_req("nokey", &s2.snapshot_id, "zone-b", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("is encrypted") && e.message().contains("encryptionKey"),
        "{e:?}"
    );
    let other = new_key();
    let e = ctl
        .create_volume(restore_req("wrongkey", &s2.snapshot_id, "zone-b", Some(&other)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains(&enc.kek_fingerprint), "{e:?}");
    assert!(!e.message().contains(&other) && !e.message().contains(&key));
    let e = ctl
        .create_volume(restore_req(
            "badkey",
            &s2.snapshot_id,
            "zone-b",
            Some("not-a-key"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        list_volumes(&mut ctl).await,
        volumes_before,
        "a refused restore left a volume"
    );

    // A snapshot of the restored volume, taken with a class naming no key, continues the
    // lineage encrypted, incrementally.
    let (st_, tg) = bed.kubelet_paths("r2a-again");
    let mut a = bed.node(0).await;
    attach(&mut a, &r2a, &st_, &tg, block_cap()).await;
    let mut v3 = v2.clone();
    let p = pattern(1 << 20, 4);
    write_at(&tg, 5 << 20, &p);
    v3[5 << 20..6 << 20].copy_from_slice(&p);
    detach(&mut a, &r2a, &st_, &tg).await;
    let s3 = snapshot_with(&mut ctl, snap_req("e3", &r2a, None)).await;
    let m3 = manifest(&bed, &s3.snapshot_id).await;
    assert_eq!(m3.lineage, m1.lineage, "the restored volume left the lineage");
    assert_eq!(m3.encryption.as_ref().unwrap().key_id, enc.key_id);
    assert!(m3.stats.unwrap().chunks_new <= 2, "{:?}", m3.stats);

    // Deletes in any order, with GC: what remains restores exactly.
    for s in [&s1, &s2] {
        ctl.delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let store = format!("--store={}", bed.store_url);
    let (ok, text) = cli(&["gc", "--grace-seconds=10", "--settle-seconds=60", &store]);
    assert!(ok, "{text}");
    restore_and_check(&bed, "r3b", &s3.snapshot_id, "zone-b", 1, &key, &v3).await;

    // The CLI: show names the encryption, never the key; verify and restore need the key file.
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("kek");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let kf = format!("--key-file={}", key_file.display());
    let (ok, text) = cli(&["snapshot", "show", &s3.snapshot_id, &store, &kf]);
    assert!(ok, "{text}");
    assert!(
        text.contains("aes-256-gcm") && text.contains("opens it"),
        "{text}"
    );
    assert!(!text.contains(&key), "show printed the key");
    let out = dir.path().join("restored.img");
    let (ok, text) = cli(&[
        "restore",
        &s3.snapshot_id,
        &format!("--to={}", out.display()),
        &store,
    ]);
    assert!(
        !ok && text.contains("is encrypted") && text.contains("--key-file"),
        "{text}"
    );
    assert!(!out.exists(), "a restore without the key created its target");
    let (ok, text) = cli(&[
        "restore",
        &s3.snapshot_id,
        &format!("--to={}", out.display()),
        &store,
        &kf,
    ]);
    assert!(ok, "{text}");
    assert!(
        std::fs::read(&out).unwrap()[..SIZE] == v3[..],
        "CLI restore differs"
    );
    let (ok, text) = cli(&["verify", &s3.snapshot_id, &store, &kf]);
    assert!(ok && text.contains("ok "), "{text}");
    let (ok, text) = cli(&["verify", &s3.snapshot_id, &store]);
    assert!(ok && text.contains("CRC"), "{text}");

    // Keys never in the logs.
    let logs = bed.logs();
    assert!(!logs.contains(&key), "the key is in the logs");
}

/// Damage and substitution: a sealed object altered (even with its CRC fixed up), or a chunk of
/// another lineage copied over one of this lineage's names, is refused on restore and by verify.
#[tokio::test]
async fn tampered_or_swapped_chunks_are_errors_never_data() {
    let bed = TestBed::start_store(&[("node-a", "zone-a")], StoreKind::S3).await;
    let mut ctl = bed.controller().await;
    let key = new_key();
    let mut made = Vec::new();
    for name in ["la", "lb"] {
        let (id, _, dev) =
            attached_block_volume(&bed, &mut ctl, 0, create_req(name, SIZE as i64, block_cap())).await;
        write_at(&dev, 0, &pattern(4 << 20, if name == "la" { 7 } else { 8 }));
        let s = snapshot_with(&mut ctl, snap_req(&format!("{name}-s"), &id, Some(&key))).await;
        made.push(manifest(&bed, &s.snapshot_id).await);
    }
    let (a, b) = (&made[0], &made[1]);
    assert_ne!(a.lineage, b.lineage);
    assert_ne!(
        a.encryption.as_ref().unwrap().key_id,
        b.encryption.as_ref().unwrap().key_id,
        "two lineages share a data key"
    );
    let store = bed.store().await;
    let key_of = |m: &strata::proto::store::Manifest, i: usize| {
        strata::snapshot::chunk::key(&m.chunks[i].hash.clone().try_into().unwrap())
    };
    // Swap: b's chunk 0 object stored under a's chunk 0 name.
    let swapped = store.get(&key_of(b, 0)).await.unwrap();
    store.put(&key_of(a, 0), swapped).await.unwrap();
    // Tamper: a's chunk 1 with one ciphertext bit flipped and its CRC recomputed.
    let mut obj = store.get(&key_of(a, 1)).await.unwrap().to_vec();
    let n = obj.len();
    obj[n - 40] ^= 1;
    let crc = crc32fast::hash(&obj[16..]);
    obj[12..16].copy_from_slice(&crc.to_le_bytes());
    store.put(&key_of(a, 1), obj.into()).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("kek");
    std::fs::write(&key_file, &key).unwrap();
    let st = format!("--store={}", bed.store_url);
    let kf = format!("--key-file={}", key_file.display());
    let (ok, text) = cli(&["verify", &a.snapshot_id, &st, &kf]);
    assert!(!ok, "verify accepted a swapped and a tampered chunk:\n{text}");
    assert!(
        text.contains("DAMAGED") && text.contains("2 of 4 chunks bad"),
        "{text}"
    );
    assert!(
        text.contains("another lineage") || text.contains("altered"),
        "{text}"
    );
    let out = dir.path().join("r.img");
    let (ok, text) = cli(&[
        "restore",
        &a.snapshot_id,
        &format!("--to={}", out.display()),
        &st,
        &kf,
    ]);
    assert!(
        !ok && text.contains("altered"),
        "restore gave data from a tampered snapshot:\n{text}"
    );
    // b is untouched.
    let (ok, text) = cli(&["verify", &b.snapshot_id, &st, &kf]);
    assert!(ok, "{text}");

    // Through the CSI path: the lazily restored volume answers the damaged chunk with EIO.
    let v = create_volume(&mut ctl, {
        let mut r = create_req("dmg", SIZE as i64, block_cap());
        r.volume_content_source = Some(pb::VolumeContentSource {
            r#type: Some(pb::volume_content_source::Type::Snapshot(
                pb::volume_content_source::SnapshotSource {
                    snapshot_id: a.snapshot_id.clone(),
                },
            )),
        });
        r.secrets = secrets(&key);
        r
    })
    .await
    .volume_id;
    let (stg, tg) = bed.kubelet_paths("dmg");
    let mut node = bed.node(0).await;
    attach(&mut node, &v, &stg, &tg, block_cap()).await;
    let f = std::fs::File::open(&tg).unwrap();
    let mut buf = vec![0u8; 4096];
    let r = f.read_exact_at(&mut buf, (1 << 20) + 4096);
    assert!(r.is_err(), "a tampered chunk was served as data");
    drop(f);
    detach(&mut node, &v, &stg, &tg).await;
}

/// Rotation: a class naming a new key re-wraps the lineage's data key in the next snapshot (no
/// chunk uploaded again); `strata key rotate` re-wraps the older snapshots; afterwards only the
/// new key opens any of them.
#[tokio::test]
async fn key_rotation_rewraps_without_uploading_chunks() {
    let bed = TestBed::start_store(&[("node-a", "zone-a")], StoreKind::S3).await;
    let mut ctl = bed.controller().await;
    let (old, new) = (new_key(), new_key());
    let (id, _, dev) =
        attached_block_volume(&bed, &mut ctl, 0, create_req("rot", SIZE as i64, block_cap())).await;
    let data = pattern(8 << 20, 11);
    write_at(&dev, 0, &data);
    let s1 = snapshot_with(&mut ctl, snap_req("rot-1", &id, Some(&old))).await;
    let chunks_before = bed.store().await.list("chunks/").await.unwrap().len();
    let s2 = snapshot_with(&mut ctl, snap_req("rot-2", &id, Some(&new))).await;
    let m2 = manifest(&bed, &s2.snapshot_id).await;
    let m1 = manifest(&bed, &s1.snapshot_id).await;
    assert_eq!(m2.parent_id, s1.snapshot_id, "rotation broke the chain");
    assert_eq!(m2.stats.unwrap().chunks_new, 0, "rotation uploaded chunks");
    assert_eq!(
        bed.store().await.list("chunks/").await.unwrap().len(),
        chunks_before
    );
    let (e1, e2) = (m1.encryption.unwrap(), m2.encryption.unwrap());
    assert_eq!(e1.key_id, e2.key_id, "rotation changed the data key");
    assert_ne!(e1.kek_fingerprint, e2.kek_fingerprint);

    let dir = tempfile::tempdir().unwrap();
    let (old_f, new_f) = (dir.path().join("old"), dir.path().join("new"));
    std::fs::write(&old_f, &old).unwrap();
    std::fs::write(&new_f, &new).unwrap();
    let st = format!("--store={}", bed.store_url);
    let (ok, text) = cli(&[
        "key",
        "rotate",
        &m1.lineage,
        &st,
        &format!("--key-file={}", old_f.display()),
        &format!("--new-key-file={}", new_f.display()),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("1 re-wrapped") && text.contains("1 already"),
        "{text}"
    );
    assert!(
        !text.contains(&old) && !text.contains(&new),
        "rotate printed a key"
    );
    assert_eq!(
        bed.store().await.list("chunks/").await.unwrap().len(),
        chunks_before
    );
    for s in [&s1, &s2] {
        let e = ctl
            .create_volume(restore_req(
                &format!("{}-old", s.snapshot_id),
                &s.snapshot_id,
                "zone-a",
                Some(&old),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    restore_and_check(&bed, "rot-r1", &s1.snapshot_id, "zone-a", 0, &new, &data).await;
    restore_and_check(&bed, "rot-r2", &s2.snapshot_id, "zone-a", 0, &new, &data).await;
    // Again: nothing left to do.
    let rotate = |from: &Path, to: &Path| {
        cli(&[
            "key",
            "rotate",
            &s1.snapshot_id,
            &st,
            &format!("--key-file={}", from.display()),
            &format!("--new-key-file={}", to.display()),
        ])
    };
    let (ok, text) = rotate(&old_f, &new_f);
    assert!(ok && text.contains("0 re-wrapped, 2 already"), "{text}");
    // Rotating to a third key with one that no longer opens the lineage changes nothing.
    let third_f = dir.path().join("third");
    std::fs::write(&third_f, new_key()).unwrap();
    let (ok, text) = rotate(&old_f, &third_f);
    assert!(!ok && text.contains("not that key"), "{text}");
    restore_and_check(&bed, "rot-r3", &s2.snapshot_id, "zone-a", 0, &new, &data).await;
}

/// A plaintext volume snapshotted with a class naming a key starts a new, encrypted lineage (a
/// full upload: plaintext chunks are never reused in it); its plaintext snapshots still restore.
#[tokio::test]
async fn encrypting_a_plaintext_volume_starts_an_encrypted_lineage() {
    let bed = TestBed::start_store(&[("node-a", "zone-a")], StoreKind::S3).await;
    let mut ctl = bed.controller().await;
    let key = new_key();
    let (id, _, dev) =
        attached_block_volume(&bed, &mut ctl, 0, create_req("pl", SIZE as i64, block_cap())).await;
    let data = pattern(6 << 20, 21);
    write_at(&dev, 0, &data);
    let p = snapshot_with(&mut ctl, snap_req("pl-1", &id, None)).await;
    let e = snapshot_with(&mut ctl, snap_req("pl-2", &id, Some(&key))).await;
    let (mp, me) = (
        manifest(&bed, &p.snapshot_id).await,
        manifest(&bed, &e.snapshot_id).await,
    );
    assert!(mp.encryption.is_none());
    assert!(me.encryption.is_some());
    assert_ne!(me.lineage, mp.lineage);
    assert_eq!(
        me.parent_id, "",
        "an encrypted snapshot was diffed against a plaintext one"
    );
    assert_eq!(me.stats.unwrap().chunks_new, 6);
    // Later snapshots without a key stay encrypted.
    let e2 = snapshot_with(&mut ctl, snap_req("pl-3", &id, None)).await;
    let me2 = manifest(&bed, &e2.snapshot_id).await;
    assert_eq!(me2.lineage, me.lineage);
    assert!(
        me2.encryption.is_some(),
        "an encrypted lineage went back to plaintext"
    );
    let mut want = data.clone();
    want.resize(SIZE, 0);
    restore_and_check(&bed, "pl-r", &p.snapshot_id, "zone-a", 0, &key, &want).await;
    restore_and_check(&bed, "pl-re", &e2.snapshot_id, "zone-a", 0, &key, &want).await;
    // Fast restore cannot be asked for together with a key yet: said clearly.
    let mut r = snap_req("pl-fsr", &id, Some(&key));
    r.parameters.insert("fastRestoreZones".into(), "zone-a".into());
    let err = ctl.create_snapshot(r).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

async fn list_volumes(
    ctl: &mut pb::controller_client::ControllerClient<tonic::transport::Channel>,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ctl.list_volumes(pb::ListVolumesRequest::default()).await {
            Ok(r) => {
                let mut v: Vec<String> = r
                    .into_inner()
                    .entries
                    .into_iter()
                    .filter_map(|e| e.volume.map(|v| v.volume_id))
                    .collect();
                v.sort();
                return v;
            }
            Err(s) if s.code() == Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("ListVolumes: {s:?}"),
        }
    }
}
