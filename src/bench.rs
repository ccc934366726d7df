//! `strata bench`: snapshot, incremental and restore throughput of the engine against a store,
//! beside baselines measured in the same run: raw PUT/GET of the same bytes with the same client
//! and concurrency, a raw sequential read of the image, and restic on the same image and server.
//! Prints a table; no timing is ever asserted.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::stream::{self, TryStreamExt};
use tokio_util::sync::CancellationToken;

use crate::admin::bytes;
use crate::snapshot::upload::{self, Progress, UploadSpec};
use crate::snapshot::{capture, manifest, restore};

/// Options.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Store to measure (S3 for the comparisons that matter).
    #[command(flatten)]
    pub store: crate::admin::StoreArgs,
    /// Work directory: the filesystem under test (XFS or btrfs for reflink and extent maps).
    #[arg(long)]
    pub dir: PathBuf,
    /// Volume size in MiB: the first half random, the second half zeros.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Chunk size in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub chunk_size: u32,
    /// Parallel transfers, for Strata and the raw baselines alike.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Percentage of the volume rewritten (in 1 MiB extents) before the incremental snapshot.
    #[arg(long, default_value_t = 1.0)]
    pub change_percent: f64,
    /// Also run restic (Debian package) against the same server: `--restic-repo s3:http://host:port/bucket/path`.
    #[arg(long)]
    pub restic_repo: Option<String>,
}

struct Row {
    name: String,
    secs: f64,
    /// Bytes the row is about (for MB/s).
    bytes: u64,
    read: Option<u64>,
    uploaded: Option<u64>,
    note: String,
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9) / 1e6
}

/// Flushes and drops the page cache so reads come from disk; false when not allowed.
fn drop_caches() -> bool {
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

async fn timed<T, F: std::future::Future<Output = anyhow::Result<T>>>(f: F) -> anyhow::Result<(T, f64)> {
    let t = Instant::now();
    let v = f.await?;
    Ok((v, t.elapsed().as_secs_f64()))
}

fn restic(repo: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("restic")
        .args(args)
        .env("RESTIC_REPOSITORY", repo)
        .env("RESTIC_PASSWORD", "strata-bench")
        .env_remove("AWS_CA_BUNDLE")
        .output()
        .context("running restic (apt-get install restic)")?;
    if !out.status.success() {
        bail!(
            "restic {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Compares two files block by block (volumes may be larger than memory).
pub(crate) fn same_content(a: &std::path::Path, b: &std::path::Path) -> std::io::Result<bool> {
    let (fa, fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (la, lb) = (fa.metadata()?.len(), fb.metadata()?.len());
    if la != lb {
        return Ok(false);
    }
    let (mut x, mut y) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    let mut off = 0;
    while off < la {
        let n = (x.len() as u64).min(la - off) as usize;
        fa.read_exact_at(&mut x[..n], off)?;
        fb.read_exact_at(&mut y[..n], off)?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

/// Runs the benchmark and prints the table.
pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    let store = crate::store::open(&a.store.store).await?;
    std::fs::create_dir_all(&a.dir)?;
    let size = a.size_mib << 20;
    let cs = u64::from(a.chunk_size);
    let img = a.dir.join("bench-volume.img");
    let half = (size / 2) as usize;
    eprintln!(
        "writing a {} test volume ({} random, {} zeros) in {}",
        bytes(size),
        bytes(half as u64),
        bytes(size - half as u64),
        a.dir.display()
    );
    // Shared, not copied: the raw baselines PUT slices of it.
    let random = Bytes::from(crate::demo::pattern(half, 7));
    {
        let f = std::fs::File::create(&img)?;
        f.write_all_at(&random, 0)?;
        // Zeros written for real, not left as holes.
        let zeros = vec![0u8; 8 << 20];
        let mut off = half as u64;
        while off < size {
            let n = zeros.len().min((size - off) as usize);
            f.write_all_at(&zeros[..n], off)?;
            off += n as u64;
        }
        f.sync_all()?;
    }
    let mut rows = Vec::new();

    // Baseline: raw sequential read of the image.
    let cold = drop_caches();
    let (_, secs) = timed(async {
        let f = std::fs::File::open(&img)?;
        let mut buf = vec![0u8; 4 << 20];
        let mut off = 0;
        while off < size {
            let n = f.read_at(&mut buf, off)?;
            if n == 0 {
                break;
            }
            off += n as u64;
        }
        Ok(())
    })
    .await?;
    rows.push(Row {
        name: "raw read of the image".into(),
        secs,
        bytes: size,
        read: Some(size),
        uploaded: None,
        note: if cold {
            "page cache dropped".into()
        } else {
            "page cache NOT dropped (not root?)".into()
        },
    });

    // Baseline: raw PUT and GET of the same (non-zero) bytes, same client, same concurrency.
    let prefix = format!("bench-raw-{}", uuid::Uuid::new_v4().simple());
    let objects: Vec<(String, Bytes)> = (0..(half as u64).div_ceil(cs))
        .map(|i| {
            let end = ((i + 1) * cs).min(half as u64) as usize;
            (format!("{prefix}/{i}"), random.slice((i * cs) as usize..end))
        })
        .collect();
    let (_, secs) = timed(async {
        stream::iter(objects.iter().cloned().map(Ok::<_, anyhow::Error>))
            .try_for_each_concurrent(a.concurrency, |(k, b)| {
                let s = store.clone();
                async move { s.put(&k, b).await.map_err(Into::into) }
            })
            .await
    })
    .await?;
    let raw_put = mbps(half as u64, secs);
    rows.push(Row {
        name: "raw PUT of the data (4 MiB objects)".into(),
        secs,
        bytes: half as u64,
        read: None,
        uploaded: Some(half as u64),
        note: format!("{} objects", objects.len()),
    });
    let (_, secs) = timed(async {
        stream::iter(objects.iter().map(|(k, _)| Ok::<_, anyhow::Error>(k.clone())))
            .try_for_each_concurrent(a.concurrency, |k| {
                let s = store.clone();
                async move { s.get(&k).await.map(drop).map_err(Into::into) }
            })
            .await
    })
    .await?;
    let raw_get = mbps(half as u64, secs);
    rows.push(Row {
        name: "raw GET of the data".into(),
        secs,
        bytes: half as u64,
        read: None,
        uploaded: None,
        note: String::new(),
    });
    // Baseline: the same GETs written to a file on the work filesystem and fsynced, which a restore
    // must also do; on a slow disk this, not the store, bounds a restore.
    let sink_path = a.dir.join("bench-raw-sink.img");
    let sink = Arc::new(std::fs::File::create(&sink_path)?);
    let (_, secs) = timed(async {
        stream::iter(
            objects
                .iter()
                .enumerate()
                .map(|(i, (k, _))| Ok::<_, anyhow::Error>((i, k.clone()))),
        )
        .try_for_each_concurrent(a.concurrency, |(i, k)| {
            let (s, f) = (store.clone(), sink.clone());
            async move {
                let b = s.get(&k).await?;
                tokio::task::spawn_blocking(move || f.write_all_at(&b, i as u64 * cs)).await??;
                Ok(())
            }
        })
        .await?;
        let f = sink.clone();
        tokio::task::spawn_blocking(move || f.sync_all()).await??;
        Ok(())
    })
    .await?;
    let raw_get_write = mbps(half as u64, secs);
    rows.push(Row {
        name: "raw GET + write to the work fs + fsync".into(),
        secs,
        bytes: half as u64,
        read: None,
        uploaded: None,
        note: "the disk-inclusive bound of any restore".into(),
    });
    let _ = std::fs::remove_file(&sink_path);
    for (k, _) in &objects {
        store.delete(k).await?;
    }

    // Strata: full snapshot (capture + upload + commit).
    let lineage = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let cancel = CancellationToken::new();
    let snap = |n: u32, parent: &str, base: Option<PathBuf>, reflinked: bool| UploadSpec {
        snapshot_id: format!("snap-{lineage}-{n}"),
        name: format!("bench-{n}"),
        volume_id: "vol-bench".into(),
        lineage: lineage.clone(),
        parent_id: parent.into(),
        capture_unix_ms: upload::now_ms(),
        size_bytes: size,
        chunk_size: a.chunk_size,
        fs_type: String::new(),
        block: true,
        tags: Default::default(),
        reflinked,
        base,
        hydrating: None,
        key: None,
    };
    let clone1 = a.dir.join("bench-capture-1.img");
    let _ = std::fs::remove_file(&clone1);
    drop_caches();
    let ((m1, reflink), secs) = timed(async {
        let reflinked = capture::clone_file(&img, &clone1).await?;
        let spec = snap(1, "", None, reflinked);
        let m = upload::upload(
            &store,
            &spec,
            &clone1,
            &a.dir.join("bench-1.progress"),
            &Progress::default(),
            a.concurrency,
            &cancel,
        )
        .await?;
        Ok((m, reflinked))
    })
    .await?;
    let st1 = m1.stats.unwrap_or_default();
    let full_rate = mbps(st1.bytes_new, secs);
    rows.push(Row {
        name: "Strata full snapshot".into(),
        secs,
        bytes: size,
        read: Some(st1.bytes_read),
        uploaded: Some(st1.bytes_uploaded),
        note: format!(
            "{:.0}% of raw PUT (data rate {:.0} MB/s); {}",
            100.0 * full_rate / raw_put,
            full_rate,
            if reflink {
                "reflink capture"
            } else {
                "copy capture (no reflink here)"
            }
        ),
    });

    // restic full, on the same image before it changes.
    if let Some(repo) = &a.restic_repo {
        restic(repo, &["init"])?;
        drop_caches();
        let (_, secs) = timed(async { restic(repo, &["backup", "--quiet", &img.to_string_lossy()]) }).await?;
        rows.push(Row {
            name: "restic full backup".into(),
            secs,
            bytes: size,
            read: Some(size),
            uploaded: None,
            note: String::new(),
        });
    }

    // Rewrite change_percent of the volume in 1 MiB extents, spread over the whole volume.
    let extents = ((size as f64 * a.change_percent / 100.0) / (1 << 20) as f64)
        .ceil()
        .max(1.0) as u64;
    let stride = (size >> 20) / extents;
    drop(objects);
    drop(random);
    // The image on disk is the model from here on: the restore is compared with it.
    let mut touched = BTreeSet::new();
    {
        let f = std::fs::OpenOptions::new().write(true).open(&img)?;
        for i in 0..extents {
            let off = (i * stride + stride / 2) << 20;
            let patch = crate::demo::pattern(1 << 20, 5000 + i);
            f.write_all_at(&patch, off)?;
            touched.insert(off / cs);
        }
        f.sync_all()?;
    }
    let changed_chunk_bytes = touched.len() as u64 * cs;

    // Strata: incremental, compared by extents with the kept capture of the full snapshot.
    let clone2 = a.dir.join("bench-capture-2.img");
    let _ = std::fs::remove_file(&clone2);
    drop_caches();
    let (m2, secs) = timed(async {
        let reflinked = capture::clone_file(&img, &clone2).await?;
        let spec = snap(2, &m1.snapshot_id, reflinked.then(|| clone1.clone()), reflinked);
        Ok(upload::upload(
            &store,
            &spec,
            &clone2,
            &a.dir.join("bench-2.progress"),
            &Progress::default(),
            a.concurrency,
            &cancel,
        )
        .await?)
    })
    .await?;
    let st2 = m2.stats.unwrap_or_default();
    let incremental_secs = secs;
    rows.push(Row {
        name: format!(
            "Strata incremental ({:.1}% rewritten, {extents} x 1 MiB)",
            a.change_percent
        ),
        secs,
        bytes: size,
        read: Some(st2.bytes_read),
        uploaded: Some(st2.bytes_uploaded),
        note: format!(
            "read {:.1}% of the volume; uploaded {:.2} x the {} changed chunks ({})",
            100.0 * st2.bytes_read as f64 / size as f64,
            st2.bytes_uploaded as f64 / changed_chunk_bytes as f64,
            touched.len(),
            bytes(changed_chunk_bytes)
        ),
    });
    if let Some(repo) = &a.restic_repo {
        drop_caches();
        let (_, secs) = timed(async { restic(repo, &["backup", "--quiet", &img.to_string_lossy()]) }).await?;
        rows.push(Row {
            name: "restic incremental backup".into(),
            secs,
            bytes: size,
            read: Some(size),
            uploaded: None,
            note: "re-reads the whole image".into(),
        });
    }

    // Strata: restore of the incremental snapshot into a fresh file; checked byte for byte.
    let out = a.dir.join("bench-restore.img");
    let _ = std::fs::remove_file(&out);
    std::fs::File::create(&out)?.set_len(size)?;
    let progress = Arc::new(Progress::default());
    let (_, secs) = timed(async {
        restore::restore(
            &store,
            &m2,
            &crate::snapshot::crypto::ChunkCodec::Plain,
            &out,
            "bench-restore",
            false,
            &progress,
            a.concurrency,
            &cancel,
        )
        .await?;
        Ok(())
    })
    .await?;
    let fetched = progress.bytes_read.load(std::sync::atomic::Ordering::Relaxed);
    let restore_rate = mbps(st2.bytes_new + st2.bytes_reused, secs);
    let same = same_content(&out, &img)?;
    rows.push(Row {
        name: "Strata restore".into(),
        secs,
        bytes: size,
        read: None,
        uploaded: None,
        note: format!(
            "{:.0}% of raw GET, {:.0}% of raw GET+write (data rate {:.0} MB/s, {} fetched); {}",
            100.0 * restore_rate / raw_get,
            100.0 * restore_rate / raw_get_write,
            restore_rate,
            bytes(fetched),
            if same { "byte-identical" } else { "DIFFERS" }
        ),
    });
    // Fast restore: the restored file plays the pre-hydrated image of a fast-restore zone; a new
    // volume there is a clone of it (what the agent does on CreateVolume).
    let fast = a.dir.join("bench-fast-restore.img");
    let _ = std::fs::remove_file(&fast);
    let (reflinked, secs) = timed(async { Ok(capture::clone_file(&out, &fast).await?) }).await?;
    rows.push(Row {
        name: "Strata fast-restore volume (clone of the image)".into(),
        secs,
        bytes: size,
        read: None,
        uploaded: None,
        note: format!(
            "fully initialized at once; {}",
            if reflinked {
                "reflink"
            } else {
                "full copy: no reflink on this filesystem"
            }
        ),
    });
    let _ = std::fs::remove_file(&fast);
    // Lazy restore of the same snapshot: usable at once, hydrated behind (needs root: loop, FUSE).
    let lazy = crate::hydrate::bench::measure(
        &store,
        &a.store.store,
        &m2,
        None,
        &img,
        &a.dir,
        a.concurrency,
        raw_get,
        raw_get_write,
    )
    .await
    .context("lazy restore rows")?;
    rows.extend(lazy.into_iter().map(|r| Row {
        name: r.name,
        secs: r.secs,
        bytes: r.bytes,
        read: None,
        uploaded: None,
        note: r.note,
    }));
    if let Some(repo) = &a.restic_repo {
        let target = a.dir.join("bench-restic-restore");
        let _ = std::fs::remove_dir_all(&target);
        let (_, secs) = timed(async {
            restic(
                repo,
                &["restore", "latest", "--target", &target.to_string_lossy()],
            )
        })
        .await?;
        rows.push(Row {
            name: "restic restore".into(),
            secs,
            bytes: size,
            read: None,
            uploaded: None,
            note: String::new(),
        });
        let _ = std::fs::remove_dir_all(&target);
    }

    // Encrypted: the same steps for a lineage sealed with AES-256-GCM (keyed names, compressed
    // then sealed), beside the plaintext rows: what encryption costs on this machine.
    let kek = crate::snapshot::crypto::Kek::generate();
    let enc_lineage = format!("bench-enc-{}", uuid::Uuid::new_v4().simple());
    let enc_key = crate::snapshot::crypto::LineageKey::generate(&kek, &enc_lineage);
    let enc_snap = |n: u32, parent: &str, base: Option<PathBuf>, reflinked: bool| UploadSpec {
        snapshot_id: format!("snap-{enc_lineage}-{n}"),
        name: format!("bench-enc-{n}"),
        lineage: enc_lineage.clone(),
        key: Some(enc_key.clone()),
        ..snap(n, parent, base, reflinked)
    };
    let clone3 = a.dir.join("bench-capture-3.img");
    let clone4 = a.dir.join("bench-capture-4.img");
    let _ = std::fs::remove_file(&clone3);
    let _ = std::fs::remove_file(&clone4);
    drop_caches();
    let (m3, secs) = timed(async {
        let reflinked = capture::clone_file(&img, &clone3).await?;
        Ok(upload::upload(
            &store,
            &enc_snap(3, "", None, reflinked),
            &clone3,
            &a.dir.join("bench-3.progress"),
            &Progress::default(),
            a.concurrency,
            &cancel,
        )
        .await?)
    })
    .await?;
    let st3 = m3.stats.unwrap_or_default();
    let enc_full_rate = mbps(st3.bytes_new, secs);
    rows.push(Row {
        name: "Strata full snapshot, encrypted".into(),
        secs,
        bytes: size,
        read: Some(st3.bytes_read),
        uploaded: Some(st3.bytes_uploaded),
        note: format!(
            "{:.0}% of the plaintext full snapshot's data rate ({enc_full_rate:.0} MB/s)",
            100.0 * enc_full_rate / full_rate
        ),
    });
    {
        let f = std::fs::OpenOptions::new().write(true).open(&img)?;
        for i in 0..extents {
            let off = (i * stride + stride / 2) << 20;
            f.write_all_at(&crate::demo::pattern(1 << 20, 7000 + i), off)?;
        }
        f.sync_all()?;
    }
    drop_caches();
    let (m4, secs) = timed(async {
        let reflinked = capture::clone_file(&img, &clone4).await?;
        let spec = enc_snap(4, &m3.snapshot_id, reflinked.then(|| clone3.clone()), reflinked);
        Ok(upload::upload(
            &store,
            &spec,
            &clone4,
            &a.dir.join("bench-4.progress"),
            &Progress::default(),
            a.concurrency,
            &cancel,
        )
        .await?)
    })
    .await?;
    let st4 = m4.stats.unwrap_or_default();
    rows.push(Row {
        name: "Strata incremental, encrypted".into(),
        secs,
        bytes: size,
        read: Some(st4.bytes_read),
        uploaded: Some(st4.bytes_uploaded),
        note: format!(
            "{:.0}% of the plaintext incremental's speed ({} new chunks)",
            100.0 * incremental_secs / secs,
            st4.chunks_new
        ),
    });
    let out_enc = a.dir.join("bench-restore-encrypted.img");
    let _ = std::fs::remove_file(&out_enc);
    std::fs::File::create(&out_enc)?.set_len(size)?;
    let codec = crate::snapshot::crypto::ChunkCodec::sealed(&enc_key);
    let (_, secs) = timed(async {
        restore::restore(
            &store,
            &m4,
            &codec,
            &out_enc,
            "bench-restore-encrypted",
            false,
            &Progress::default(),
            a.concurrency,
            &cancel,
        )
        .await?;
        Ok(())
    })
    .await?;
    let enc_restore_rate = mbps(st4.bytes_new + st4.bytes_reused, secs);
    let same_enc = same_content(&out_enc, &img)?;
    rows.push(Row {
        name: "Strata restore, encrypted".into(),
        secs,
        bytes: size,
        read: None,
        uploaded: None,
        note: format!(
            "{:.0}% of the plaintext restore's data rate ({enc_restore_rate:.0} MB/s); {}",
            100.0 * enc_restore_rate / restore_rate,
            if same_enc { "byte-identical" } else { "DIFFERS" }
        ),
    });
    let lazy = crate::hydrate::bench::measure(
        &store,
        &a.store.store,
        &m4,
        Some(enc_key.clone()),
        &img,
        &a.dir,
        a.concurrency,
        raw_get,
        raw_get_write,
    )
    .await
    .context("encrypted lazy restore rows")?;
    rows.extend(
        lazy.into_iter()
            .filter(|r| !r.name.starts_with("baseline"))
            .map(|r| Row {
                name: format!("{}, encrypted", r.name),
                secs: r.secs,
                bytes: r.bytes,
                read: None,
                uploaded: None,
                note: r.note,
            }),
    );

    // Clean up what the run stored.
    for m in [&m1, &m2, &m3, &m4] {
        manifest::delete_snapshot(&store, &m.snapshot_id).await?;
    }
    crate::snapshot::gc::collect_settled(
        &store,
        crate::snapshot::gc::MIN_GRACE,
        std::time::Duration::from_secs(60),
    )
    .await?;
    for p in [&img, &clone1, &clone2, &clone3, &clone4, &out, &out_enc] {
        let _ = std::fs::remove_file(p);
    }
    for n in 1..=4 {
        let _ = std::fs::remove_file(a.dir.join(format!("bench-{n}.progress")));
    }
    print_table(&a, &rows);
    if !same || !same_enc {
        bail!("a restored volume differs from the model");
    }
    Ok(())
}

fn print_table(a: &BenchArgs, rows: &[Row]) {
    println!();
    println!(
        "strata bench: {} volume (half random, half zeros), chunk {}, {} parallel transfers, store {}",
        bytes(a.size_mib << 20),
        bytes(u64::from(a.chunk_size)),
        a.concurrency,
        redact(&a.store.store)
    );
    println!();
    println!(
        "| {:<48} | {:>8} | {:>9} | {:>10} | {:>10} | {}",
        "what", "seconds", "MB/s", "read", "uploaded", "notes"
    );
    println!(
        "|{:-<50}|{:->10}|{:->11}|{:->12}|{:->12}|{:-<7}",
        "", "", "", "", "", ""
    );
    for r in rows {
        println!(
            "| {:<48} | {:>8.2} | {:>9.0} | {:>10} | {:>10} | {}",
            r.name,
            r.secs,
            mbps(r.bytes, r.secs),
            r.read.map(bytes).unwrap_or_default(),
            r.uploaded.map(bytes).unwrap_or_default(),
            r.note
        );
    }
    println!();
    println!(
        "MB/s is of the volume size (of the bytes moved for the raw rows); notes give data rates and ratios."
    );
}

fn redact(url: &str) -> String {
    // Store URLs carry no secrets, but keep the table short.
    url.split('?').next().unwrap_or(url).to_string()
}
