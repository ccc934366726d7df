//! Admin verbs that work on a store directly, no Kubernetes needed: `snapshot ls|show`,
//! `restore`, `verify`, `gc`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::stream::{self, StreamExt};

use crate::proto::store::Manifest;
use crate::snapshot::chunk::{self, Hash};
use crate::snapshot::crypto::{codec_for, ChunkCodec, Kek, LineageKey};
use crate::snapshot::upload::Progress;
use crate::snapshot::{gc, manifest, restore};
use crate::store::{Store, StoreError};

/// Which store to work on.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Snapshot store: a directory path, or `s3://bucket/prefix?endpoint=..&region=..&path_style=true`.
    #[arg(long, env = "STRATA_STORE")]
    pub store: String,
}

impl StoreArgs {
    async fn open(&self) -> anyhow::Result<Store> {
        crate::store::open(&self.store)
            .await
            .with_context(|| format!("opening store {}", self.store))
    }
}

/// The key-encryption key of encrypted snapshots.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KeyArgs {
    /// File holding the 256-bit key-encryption key of encrypted snapshots (64 hex digits or
    /// base64, as in the class's Secret entry `encryptionKey`).
    #[arg(long, env = "STRATA_KEY_FILE")]
    pub key_file: Option<PathBuf>,
}

impl KeyArgs {
    /// The key, if one was given.
    pub fn kek(&self) -> anyhow::Result<Option<Kek>> {
        Ok(match &self.key_file {
            Some(p) => Some(Kek::from_file(p)?),
            None => None,
        })
    }
}

/// The codec of `m`'s chunks, opening its data key with `kek` when it is encrypted.
fn codec(m: &Manifest, kek: Option<&Kek>) -> anyhow::Result<ChunkCodec> {
    let key = LineageKey::unwrap(m, kek)?;
    Ok(codec_for(m, key.as_ref())?)
}

/// `strata key ...`
#[derive(Debug, clap::Subcommand)]
pub enum KeyCommand {
    /// Print a new random 256-bit key (64 hex digits), for a Secret's `encryptionKey` entry or a
    /// key file. Its fingerprint goes to stderr.
    Generate,
    /// Re-wrap the data key of a lineage's snapshots under a new key-encryption key. No chunk is
    /// read or written; afterwards only the new key opens them. Name the new key in the classes
    /// too, so the next snapshots are wrapped under it.
    Rotate {
        /// Lineage id, or the id of one of its snapshots.
        lineage: String,
        /// Store.
        #[command(flatten)]
        store: StoreArgs,
        /// The current key.
        #[command(flatten)]
        key: KeyArgs,
        /// File holding the new key.
        #[arg(long)]
        new_key_file: PathBuf,
    },
}

/// Runs `strata key ...`.
pub async fn key(cmd: KeyCommand) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::Generate => {
            let k = Kek::generate();
            println!("{}", k.to_hex());
            eprintln!("fingerprint {}", k.fingerprint());
            Ok(())
        }
        KeyCommand::Rotate {
            lineage,
            store,
            key,
            new_key_file,
        } => {
            let store = store.open().await?;
            let old = key
                .kek()?
                .context("--key-file (the key the snapshots are wrapped under now) is required")?;
            let new = Kek::from_file(&new_key_file)?;
            let ms = all_manifests(&store).await?;
            let lineage = match ms.iter().find(|m| m.snapshot_id == lineage) {
                Some(m) => m.lineage.clone(),
                None => lineage,
            };
            let ms: Vec<Manifest> = ms.into_iter().filter(|m| m.lineage == lineage).collect();
            if ms.is_empty() {
                bail!("no snapshot of lineage {lineage} (give a lineage or snapshot id)");
            }
            // Every snapshot is checked before any is rewritten: a wrong key changes nothing.
            let mut work = Vec::new();
            let mut already = 0;
            for m in &ms {
                if m.encryption.is_none() {
                    bail!("snapshot {} is not encrypted: nothing to rotate", m.snapshot_id);
                }
                if LineageKey::unwrap(m, Some(&new)).is_ok() {
                    already += 1;
                    continue;
                }
                let k = LineageKey::unwrap(m, Some(&old))?.expect("encrypted");
                work.push((m.clone(), k.rewrapped(&new, &lineage)));
            }
            for (mut m, k) in work.iter().cloned() {
                m.encryption = Some(k.record());
                manifest::write_manifest(&store, &m).await?;
                // A delete that ran meanwhile wrote its tombstone first: the snapshot stays deleted.
                if store.exists(&manifest::tombstone_key(&m.snapshot_id)).await? {
                    store.delete(&manifest::manifest_key(&m.snapshot_id)).await?;
                }
                eprintln!("re-wrapped {}", m.snapshot_id);
            }
            println!(
                "lineage {lineage}: {} re-wrapped, {already} already under key {}",
                work.len(),
                new.fingerprint()
            );
            Ok(())
        }
    }
}

/// `strata snapshot ...`
#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// List committed snapshots with their chain and sizes.
    Ls(StoreArgs),
    /// Show one snapshot: chain, sizes, bytes new and reused, tags.
    Show {
        /// Snapshot id.
        id: String,
        /// Store.
        #[command(flatten)]
        store: StoreArgs,
        /// With a key: whether it opens the snapshot.
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Byte ranges that differ between two snapshots of one lineage (from the manifests, no data
    /// read), or with --allocated the ranges one snapshot holds data for. One `OFFSET LENGTH` line
    /// per range, in bytes, then a summary.
    Diff {
        /// Base snapshot id (with --allocated: the snapshot to list).
        base: String,
        /// Target snapshot id (a later snapshot of the same volume, or of a volume restored from
        /// the base's lineage).
        target: Option<String>,
        /// List the ranges the base snapshot holds data for instead.
        #[arg(long)]
        allocated: bool,
        /// Store.
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Human-readable bytes.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// UTC time of a Unix millisecond timestamp, `YYYY-MM-DD HH:MM:SS`.
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

async fn all_manifests(store: &Store) -> anyhow::Result<Vec<Manifest>> {
    let mut out = Vec::new();
    for id in manifest::list_snapshot_ids(store).await? {
        if let Some(m) = manifest::read_manifest(store, &id).await? {
            out.push(m);
        }
    }
    out.sort_by_key(|m| (m.capture_unix_ms, m.snapshot_id.clone()));
    Ok(out)
}

/// Runs `strata snapshot ...`.
pub async fn snapshot(cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Ls(s) => {
            let store = s.open().await?;
            let ms = all_manifests(&store).await?;
            println!(
                "{:<41} {:<40} {:<19} {:>9} {:>9} {:>9} {:>9}  PARENT",
                "SNAPSHOT", "VOLUME", "CAPTURED (UTC)", "SIZE", "DATA", "NEW", "READ"
            );
            for m in &ms {
                let st = m.stats.unwrap_or_default();
                let data = st.bytes_new + st.bytes_reused;
                println!(
                    "{:<41} {:<40} {:<19} {:>9} {:>9} {:>9} {:>9}  {}",
                    m.snapshot_id,
                    m.volume_id,
                    utc(m.capture_unix_ms),
                    bytes(m.size_bytes),
                    bytes(data),
                    bytes(st.bytes_uploaded),
                    bytes(st.bytes_read),
                    if m.parent_id.is_empty() { "-" } else { &m.parent_id }
                );
            }
            println!("{} snapshot(s)", ms.len());
        }
        SnapshotCommand::Diff {
            base,
            target,
            allocated,
            store,
        } => {
            let store = store.open().await?;
            let read = |id: String| {
                let store = store.clone();
                async move {
                    crate::ids::check_id("snapshot id", &id).map_err(anyhow::Error::msg)?;
                    manifest::read_manifest(&store, &id)
                        .await?
                        .with_context(|| format!("snapshot {id} does not exist"))
                }
            };
            let b = read(base).await?;
            let (ranges, of) = match (allocated, target) {
                (true, None) => (crate::snapshot::diff::allocated(&b), b.size_bytes),
                (false, Some(t)) => {
                    let t = read(t).await?;
                    (crate::snapshot::diff::changed(&b, &t)?, t.size_bytes)
                }
                (true, Some(_)) => bail!("--allocated takes one snapshot"),
                (false, None) => bail!("give a base and a target snapshot, or --allocated and one snapshot"),
            };
            for r in &ranges {
                println!("{} {}", r.offset, r.length);
            }
            let sum = crate::snapshot::diff::total(&ranges);
            eprintln!(
                "{} range(s), {} of {} ({:.1}%), in units of {}",
                ranges.len(),
                bytes(sum),
                bytes(of),
                sum as f64 * 100.0 / of.max(1) as f64,
                bytes(u64::from(b.chunk_size))
            );
        }
        SnapshotCommand::Show { id, store, key } => {
            let store = store.open().await?;
            let m = manifest::read_manifest(&store, &id)
                .await?
                .with_context(|| format!("snapshot {id} does not exist"))?;
            let st = m.stats.unwrap_or_default();
            println!("snapshot        {}", m.snapshot_id);
            println!("name            {}", m.name);
            println!("volume          {}", m.volume_id);
            println!("lineage         {}", m.lineage);
            println!("captured        {} UTC", utc(m.capture_unix_ms));
            println!("committed       {} UTC", utc(m.committed_unix_ms));
            println!("size            {} ({} bytes)", bytes(m.size_bytes), m.size_bytes);
            println!("chunk size      {}", bytes(u64::from(m.chunk_size)));
            println!(
                "filesystem      {}",
                if m.block {
                    "(block)".to_string()
                } else {
                    m.fs_type.clone()
                }
            );
            println!(
                "chunks          {} stored, {} zero (not stored)",
                m.chunks.len(),
                st.chunks_zero
            );
            println!("bytes read      {}", bytes(st.bytes_read));
            println!(
                "new             {} in {} chunks, {} uploaded",
                bytes(st.bytes_new),
                st.chunks_new,
                bytes(st.bytes_uploaded)
            );
            println!(
                "reused          {} in {} chunks",
                bytes(st.bytes_reused),
                st.chunks_reused
            );
            println!("upload time     {:.1} s", st.upload_ms as f64 / 1000.0);
            match &m.encryption {
                None => println!("encryption      none (plaintext chunks)"),
                Some(e) => {
                    println!(
                        "encryption      {}, data key {} wrapped by key {}",
                        e.scheme, e.key_id, e.kek_fingerprint
                    );
                    if let Some(kek) = key.kek()? {
                        match LineageKey::unwrap(&m, Some(&kek)) {
                            Ok(_) => println!("key given       {}: opens it", kek.fingerprint()),
                            Err(e) => {
                                println!("key given       {}: does not open it ({e})", kek.fingerprint())
                            }
                        }
                    }
                }
            }
            let tags: BTreeMap<_, _> = m.tags.iter().collect();
            for (k, v) in tags {
                println!("tag             {k}={v}");
            }
            let mut chain = vec![m.snapshot_id.clone()];
            let mut parent = m.parent_id.clone();
            while !parent.is_empty() && chain.len() < 10_000 {
                match manifest::read_manifest(&store, &parent).await? {
                    Some(p) => {
                        chain.push(p.snapshot_id.clone());
                        parent = p.parent_id.clone();
                    }
                    None => {
                        chain.push(format!("{parent} (deleted)"));
                        break;
                    }
                }
            }
            println!("chain           {}", chain.join(" <- "));
        }
    }
    Ok(())
}

/// `strata restore` options.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// Snapshot id.
    pub snapshot: String,
    /// Target: a file (created or replaced) or a block device at least as large as the snapshot.
    #[arg(long)]
    pub to: PathBuf,
    /// Parallel chunk fetches.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Store.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Key of an encrypted snapshot.
    #[command(flatten)]
    pub key: KeyArgs,
}

/// Runs `strata restore`, with a progress bar on stderr.
pub async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let store = args.store.open().await?;
    let m = manifest::read_manifest(&store, &args.snapshot)
        .await?
        .with_context(|| format!("snapshot {} does not exist", args.snapshot))?;
    // Before the target is touched: a missing or wrong key changes nothing.
    let codec = codec(&m, args.key.kek()?.as_ref())?;
    let is_device = std::fs::metadata(&args.to)
        .map(|md| md.file_type().is_block_device())
        .unwrap_or(false);
    if is_device {
        let size = std::fs::OpenOptions::new()
            .read(true)
            .open(&args.to)
            .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
            .with_context(|| format!("sizing {}", args.to.display()))?;
        if size < m.size_bytes {
            bail!(
                "{} holds {size} bytes; the snapshot needs {}",
                args.to.display(),
                m.size_bytes
            );
        }
    } else {
        let f = std::fs::File::create(&args.to).with_context(|| format!("creating {}", args.to.display()))?;
        f.set_len(m.size_bytes)?;
    }
    let progress = Progress::default();
    let bar = indicatif::ProgressBar::new(m.size_bytes.div_ceil(u64::from(m.chunk_size)));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} restoring [{bar:40}] {pos}/{len} chunks {msg} ({eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let lease = format!("restore-cli-{}", uuid::Uuid::new_v4().simple());
    let cancel = tokio_util::sync::CancellationToken::new();
    let job = restore::restore(
        &store,
        &m,
        &codec,
        &args.to,
        &lease,
        is_device,
        &progress,
        args.concurrency,
        &cancel,
    );
    tokio::pin!(job);
    let result = loop {
        tokio::select! {
            r = &mut job => break r,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                bar.set_position(progress.done.load(Ordering::Relaxed));
                bar.set_message(bytes(progress.bytes_read.load(Ordering::Relaxed)));
            }
        }
    };
    bar.finish_and_clear();
    result?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "restored {} ({}) to {} in {:.2} s: {:.0} MB/s of volume, {} fetched",
        m.snapshot_id,
        bytes(m.size_bytes),
        args.to.display(),
        secs,
        m.size_bytes as f64 / secs / 1e6,
        bytes(progress.bytes_read.load(Ordering::Relaxed))
    );
    Ok(())
}

/// `strata verify` options.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Snapshots to verify (default: all).
    pub snapshots: Vec<String>,
    /// Parallel chunk fetches.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Store.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Key of encrypted snapshots: without it, their chunks are checked for transport damage
    /// (CRC) only; with it, opened and checked against their names.
    #[command(flatten)]
    pub key: KeyArgs,
}

/// Runs `strata verify`: every chunk of every (chosen) manifest is fetched and checked against its
/// hash. Fails when anything is missing or corrupt.
pub async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let store = args.store.open().await?;
    let ms = if args.snapshots.is_empty() {
        all_manifests(&store).await?
    } else {
        let mut v = Vec::new();
        for id in &args.snapshots {
            v.push(
                manifest::read_manifest(&store, id)
                    .await?
                    .with_context(|| format!("snapshot {id} does not exist"))?,
            );
        }
        v
    };
    // Each chunk is checked with the codec of a snapshot naming it (keyed names never collide
    // across lineages); `None`: encrypted and no key, so the frame only.
    let kek = args.key.kek()?;
    let mut sealed_without_key = 0;
    let mut unique: HashMap<Hash, Option<ChunkCodec>> = HashMap::new();
    for m in &ms {
        let c = match codec(m, kek.as_ref()) {
            Ok(c) => Some(c),
            Err(e) => match e.downcast_ref::<crate::snapshot::crypto::KeyError>() {
                Some(crate::snapshot::crypto::KeyError::Missing { .. }) => {
                    sealed_without_key += 1;
                    None
                }
                _ => return Err(e),
            },
        };
        for h in crate::snapshot::upload::hashes(m) {
            unique.entry(h).or_insert_with(|| c.clone());
        }
    }
    if sealed_without_key > 0 {
        eprintln!(
            "{sealed_without_key} snapshot(s) are encrypted and no --key-file was given: their \
             chunks are checked for damage in transit and storage (CRC), not opened"
        );
    }
    let started = Instant::now();
    let results: HashMap<Hash, Result<(), String>> = stream::iter(unique)
        .map(|(h, codec)| {
            let store = store.clone();
            async move {
                let r = match store.get(&chunk::key(&h)).await {
                    Ok(obj) => tokio::task::spawn_blocking(move || match codec {
                        Some(c) => c.decode(&h, &obj).map(drop),
                        None => chunk::split(&h, &obj).map(drop),
                    })
                    .await
                    .expect("verify task panicked")
                    .map_err(|e| e.to_string()),
                    Err(StoreError::NotFound { .. }) => Err("missing".to_string()),
                    Err(e) => Err(e.to_string()),
                };
                (h, r)
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let mut bad_snapshots = 0;
    for m in &ms {
        let bad: Vec<String> = m
            .chunks
            .iter()
            .filter_map(|c| {
                let h: Hash = c.hash.as_slice().try_into().ok()?;
                match results.get(&h) {
                    Some(Err(e)) => Some(format!("chunk {} ({}): {e}", c.index, chunk::hex(&h))),
                    _ => None,
                }
            })
            .collect();
        if bad.is_empty() {
            println!("ok       {}  {} chunks", m.snapshot_id, m.chunks.len());
        } else {
            bad_snapshots += 1;
            println!(
                "DAMAGED  {}  {} of {} chunks bad",
                m.snapshot_id,
                bad.len(),
                m.chunks.len()
            );
            for b in bad.iter().take(20) {
                println!("         {b}");
            }
        }
    }
    println!(
        "verified {} snapshot(s), {} unique chunks in {:.1} s",
        ms.len(),
        results.len(),
        started.elapsed().as_secs_f64()
    );
    if bad_snapshots > 0 {
        bail!("{bad_snapshots} snapshot(s) damaged");
    }
    Ok(())
}

/// `strata gc` options.
#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// Keep unreferenced chunks younger than this many seconds, by the store's clock (at least 10).
    #[arg(long, default_value_t = 3600)]
    pub grace_seconds: u64,
    /// Repeat until no unreferenced chunk is kept for its age (waiting on the store's clock), for
    /// at most this many seconds: cleans up everything deleted up to now.
    #[arg(long, default_value_t = 0)]
    pub settle_seconds: u64,
    /// Store.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Runs `strata gc`.
pub async fn gc(args: GcArgs) -> anyhow::Result<()> {
    let store = args.store.open().await?;
    let grace = gc::check_grace(Duration::from_secs(args.grace_seconds))?;
    let r = if args.settle_seconds > 0 {
        gc::collect_settled(&store, grace, Duration::from_secs(args.settle_seconds)).await?
    } else {
        gc::collect(&store, grace).await?
    };
    println!(
        "{} manifests, {} leases; {} chunks: {} referenced, {} recent kept, {} deleted ({})",
        r.manifests,
        r.leases,
        r.chunks,
        r.referenced,
        r.kept_recent,
        r.deleted,
        bytes(r.bytes_deleted)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_795_000_000_000), "2026-11-18 11:06:40");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}

/// `strata fsr ...`: fast snapshot restore per zone.
#[derive(Debug, clap::Subcommand)]
pub enum FsrCommand {
    /// Enable fast restore of a committed snapshot in zones (nodes there pre-hydrate it).
    Enable {
        /// Snapshot id.
        snapshot: String,
        /// Zones (repeat the flag, or separate with commas).
        #[arg(long = "zone", required = true, value_delimiter = ',')]
        zones: Vec<String>,
        /// Store.
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Disable it: nodes drop their images.
    Disable {
        /// Snapshot id.
        snapshot: String,
        /// Zones.
        #[arg(long = "zone", required = true, value_delimiter = ',')]
        zones: Vec<String>,
        /// Store.
        #[command(flatten)]
        store: StoreArgs,
    },
    /// States per snapshot and zone, with the nodes' hydration progress.
    Status {
        /// Only this snapshot.
        snapshot: Option<String>,
        /// Store.
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Runs `strata fsr ...`.
pub async fn fsr(cmd: FsrCommand) -> anyhow::Result<()> {
    use crate::snapshot::fsr;
    match cmd {
        FsrCommand::Enable {
            snapshot,
            zones,
            store,
        } => {
            let store = store.open().await?;
            for z in zones {
                let r = fsr::enable(&store, &snapshot, &z).await?;
                println!("{snapshot}  {z}  {}", r.state);
            }
        }
        FsrCommand::Disable {
            snapshot,
            zones,
            store,
        } => {
            let store = store.open().await?;
            for z in zones {
                let state = fsr::disable(&store, &snapshot, &z)
                    .await?
                    .map(|r| r.state.to_string());
                println!("{snapshot}  {z}  {}", state.unwrap_or_else(|| "disabled".into()));
            }
        }
        FsrCommand::Status { snapshot, store } => {
            let store = store.open().await?;
            let nodes: Vec<_> = fsr::nodes(&store)
                .await?
                .into_iter()
                .filter(|n| n.live())
                .collect();
            println!(
                "{:<42} {:<16} {:<11} NODES (image ready / nodes in zone)",
                "SNAPSHOT", "ZONE", "STATE"
            );
            for r in fsr::list(&store, None).await? {
                if snapshot.as_ref().is_some_and(|s| s != &r.snapshot_id) {
                    continue;
                }
                let in_zone: Vec<_> = nodes.iter().filter(|n| n.zone == r.zone).collect();
                let ready = in_zone
                    .iter()
                    .filter(|n| n.images.get(&r.snapshot_id).is_some_and(|i| i.ready))
                    .count();
                println!(
                    "{:<42} {:<16} {:<11} {ready}/{}",
                    r.snapshot_id,
                    r.zone,
                    r.state.to_string(),
                    in_zone.len()
                );
            }
        }
    }
    Ok(())
}
