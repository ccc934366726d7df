//! The lazy-restore rows of `strata bench`: what the agent does for a CreateVolume from a snapshot
//! outside a fast-restore zone (seed files, lease, hydrator), then a loop device on the hydrator's
//! file, read with O_DIRECT so every read reaches it:
//!
//! * CreateVolume to the first correct 4 KiB read, beside one raw GET of one chunk;
//! * random 4 KiB read latency while hydrating, once hydrated (still through FUSE), and on the
//!   plain file (what the volume uses from its next stage), beside a volume that never hydrated;
//! * full hydration throughput beside raw GET throughput.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::Paths;
use crate::proto::store::Manifest;
use crate::snapshot::chunk;
use crate::snapshot::manifest::{self, lease_key};
use crate::store::Store;
use crate::volume::sys;

/// One result for the table.
pub struct Measured {
    /// Row name.
    pub name: String,
    /// Seconds the row took.
    pub secs: f64,
    /// Bytes moved (0 for latency rows).
    pub bytes: u64,
    /// Notes: latencies, ratios.
    pub note: String,
}

/// A page-aligned 4 KiB buffer inside a Vec (O_DIRECT needs aligned memory; no unsafe needed).
struct Aligned {
    buf: Vec<u8>,
    start: usize,
}

impl Aligned {
    fn new() -> Self {
        let buf = vec![0u8; 8192];
        let start = (4096 - buf.as_ptr() as usize % 4096) % 4096;
        Self { buf, start }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + 4096]
    }
}

fn open_direct(dev: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
}

/// Latency summary of random 4 KiB reads, each checked against the model.
struct Lat {
    n: usize,
    total: f64,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Lat {
    fn note(&self) -> String {
        format!(
            "{} reads: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.n,
            self.p50 * 1e3,
            self.p99 * 1e3,
            self.max * 1e3
        )
    }
}

/// Random 4 KiB reads of `dev` until `n` reads or `until` says stop, compared with `model`.
fn random_reads(
    dev: &Path,
    model: &std::fs::File,
    size: u64,
    n: usize,
    seed: u64,
    until: &dyn Fn() -> bool,
) -> anyhow::Result<Lat> {
    let f = open_direct(dev).with_context(|| format!("open {} with O_DIRECT", dev.display()))?;
    let mut buf = Aligned::new();
    let mut want = vec![0u8; 4096];
    let mut x = seed | 1;
    let mut lat = Vec::with_capacity(n);
    let started = Instant::now();
    while lat.len() < n && !until() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (size / 4096)) * 4096;
        let t = Instant::now();
        f.read_exact_at(buf.get(), off)?;
        lat.push(t.elapsed().as_secs_f64());
        model.read_exact_at(&mut want, off)?;
        if buf.get()[..] != want[..] {
            bail!("read at {off} of {} differs from the snapshot", dev.display());
        }
    }
    let total = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let at = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
    };
    Ok(Lat {
        n: lat.len(),
        total,
        p50: at(0.5).unwrap_or(0.0),
        p99: at(0.99).unwrap_or(0.0),
        max: lat.last().copied().unwrap_or(0.0),
    })
}

struct Cleanup {
    loops: Vec<sys::LoopDevice>,
    child: Option<Child>,
    mount: PathBuf,
}

impl Cleanup {
    async fn run(&mut self) {
        for l in self.loops.drain(..) {
            let _ = sys::loop_detach(&l).await;
        }
        let _ = nix::mount::umount2(&self.mount, nix::mount::MntFlags::MNT_DETACH);
        if let Some(mut c) = self.child.take() {
            for _ in 0..200 {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the lazy-restore measurements of snapshot `m` (whose data is `model`, the bench volume)
/// in `dir`, with the store at `store_url`. `raw_get` is the raw GET rate (MB/s) of the same run.
/// `key`: the data key when `m` is encrypted.
#[allow(clippy::too_many_arguments)]
pub async fn measure(
    store: &Store,
    store_url: &str,
    m: &Manifest,
    key: Option<crate::snapshot::crypto::LineageKey>,
    model: &Path,
    dir: &Path,
    concurrency: usize,
    raw_get: f64,
    raw_get_write: f64,
) -> anyhow::Result<Vec<Measured>> {
    let vol = dir.join("bench-lazy");
    let _ = std::fs::remove_dir_all(&vol);
    std::fs::create_dir_all(&vol)?;
    let p = Paths::new(&vol);
    let size = m.size_bytes;
    let model_f = std::fs::File::open(model)?;
    let mut rows = Vec::new();

    // Baseline: one chunk, raw GET (the least an on-demand read can cost).
    let first = m.chunks.first().context("snapshot has no data")?;
    let h: chunk::Hash = first.hash.as_slice().try_into().context("malformed hash")?;
    let mut one = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        store.get(&chunk::key(&h)).await?;
        one.push(t.elapsed().as_secs_f64());
    }
    one.sort_by(f64::total_cmp);
    let one_get = one[2];

    // CreateVolume (as the agent does it) to the first correct 4 KiB read.
    let t0 = Instant::now();
    let lease_id = format!("bench-lazy-{}", uuid::Uuid::new_v4().simple());
    manifest::lease_chunks_of(store, m, &lease_id).await?;
    std::fs::File::create(p.data())?.set_len(size)?;
    super::write_seed(&vol, &super::seed(m, lease_id.clone(), key))?;
    let child = super::supervise::spawn_hydrator(&std::env::current_exe()?, &p, store_url, concurrency, 0)
        .context("start the hydrator")?;
    let mut cleanup = Cleanup {
        loops: Vec::new(),
        child: Some(child),
        mount: p.mount_point(),
    };
    let result = async {
        while !p.served() {
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the hydrator did not start: see {}", p.log().display());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let created = t0.elapsed().as_secs_f64();
        let dev = sys::loop_attach(&p.lazy_data(), false).await?;
        cleanup.loops.push(dev.clone());
        let attached = t0.elapsed().as_secs_f64();
        // The first read: in the middle of the data, where no chunk is local yet.
        let off = (size / 4 / 4096) * 4096;
        let f = open_direct(&dev.path())?;
        let mut buf = Aligned::new();
        f.read_exact_at(buf.get(), off)?;
        let first_read = t0.elapsed().as_secs_f64();
        let mut want = vec![0u8; 4096];
        model_f.read_exact_at(&mut want, off)?;
        if buf.get()[..] != want[..] {
            bail!("first read differs from the snapshot");
        }
        drop(f);
        rows.push(Measured {
            name: "lazy: CreateVolume to first 4 KiB read".into(),
            secs: first_read,
            bytes: 0,
            note: format!(
                "served after {:.0} ms, loop device after {:.0} ms; one raw chunk GET {:.1} ms",
                created * 1e3,
                attached * 1e3,
                one_get * 1e3
            ),
        });

        // Random reads while the background hydration runs.
        let hydrated = || p.read_status().is_some_and(|s| s.complete());
        let during = random_reads(&dev.path(), &model_f, size, 400, 11, &hydrated)?;
        let st = p.read_status().unwrap_or_default();
        rows.push(Measured {
            name: "lazy: random 4 KiB reads during hydration".into(),
            secs: during.total,
            bytes: 0,
            note: format!(
                "{}; {} chunks fetched on demand",
                during.note(),
                st.fetched_on_demand
            ),
        });

        // Full hydration.
        while !p.read_status().is_some_and(|s| s.complete()) {
            if t0.elapsed() > Duration::from_secs(3600) {
                bail!("hydration did not finish in an hour");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let st = p.read_status().unwrap_or_default();
        let secs = (st.completed_unix_ms - st.started_unix_ms).max(1) as f64 / 1e3;
        let data: u64 = m
            .chunks
            .iter()
            .map(|c| u64::from(m.chunk_size).min(size - c.index * u64::from(m.chunk_size)))
            .sum();
        let rate = data as f64 / secs / 1e6;
        rows.push(Measured {
            name: "lazy: full hydration".into(),
            secs,
            bytes: size,
            note: format!(
                "data rate {rate:.0} MB/s: {:.0}% of raw GET, {:.0}% of raw GET+write; {} on demand, {} background",
                100.0 * rate / raw_get,
                100.0 * rate / raw_get_write,
                st.fetched_on_demand,
                st.fetched_background
            ),
        });
        let after = random_reads(&dev.path(), &model_f, size, 400, 12, &|| false)?;
        rows.push(Measured {
            name: "lazy: random 4 KiB reads, hydrated (FUSE)".into(),
            secs: after.total,
            bytes: 0,
            note: after.note(),
        });
        // From its next stage the volume runs on the plain file.
        sys::loop_detach(&dev).await?;
        cleanup.loops.clear();
        let plain = sys::loop_attach(&p.data(), false).await?;
        cleanup.loops.push(plain.clone());
        let next = random_reads(&plain.path(), &model_f, size, 400, 13, &|| false)?;
        rows.push(Measured {
            name: "lazy: random 4 KiB reads, next stage (plain)".into(),
            secs: next.total,
            bytes: 0,
            note: next.note(),
        });
        // Baseline: a volume that never hydrated (the bench image itself).
        let base = sys::loop_attach(model, true).await?;
        cleanup.loops.push(base.clone());
        let b = random_reads(&base.path(), &model_f, size, 400, 13, &|| false)?;
        rows.push(Measured {
            name: "baseline: random 4 KiB reads, plain volume".into(),
            secs: b.total,
            bytes: 0,
            note: b.note(),
        });
        if !crate::bench::same_content(&p.data(), model)? {
            bail!("the hydrated volume differs from the snapshot");
        }
        Ok(())
    }
    .await;
    cleanup.run().await;
    let _ = store.delete(&lease_key(&lease_id)).await;
    let _ = std::fs::remove_dir_all(&vol);
    result.map(|()| rows)
}
