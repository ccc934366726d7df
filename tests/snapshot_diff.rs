//! `strata snapshot diff` on snapshots the driver made: a block volume written through its device,
//! snapshotted, a few known ranges rewritten, snapshotted again; the changed ranges printed are
//! exactly the chunks touched, and `--allocated` lists the chunks holding data.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use strata::demo::pattern;

fn ranges(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (a, b) = (it.next()?.parse().ok()?, it.next()?.parse().ok()?);
            it.next().is_none().then_some((a, b))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn diff_lists_exactly_the_chunks_rewritten_between_two_snapshots() {
    require_root();
    let bed = TestBed::start(&[("node-a", "zone-a")]).await;
    let mut ctl = bed.controller().await;
    let r = create_req("diff", 64 * MIB, block_cap());
    let (id, _, dev) = attached_block_volume(&bed, &mut ctl, 0, r).await;
    let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
    // Chunks 0..4 hold data (the bed's chunk size, CHUNK); the rest stays zeros (never stored).
    f.write_all_at(&pattern(4 * CHUNK as usize, 1), 0).unwrap();
    f.sync_all().unwrap();
    let s1 = snapshot(&mut ctl, "diff-1", &id).await.snapshot_id;
    // Rewrite 4 KiB in chunk 1, 1 MiB across the chunk 2/3 border, and new data in chunk 9.
    f.write_all_at(&pattern(4096, 2), CHUNK + 8192).unwrap();
    f.write_all_at(&pattern(1 << 20, 3), 3 * CHUNK - (512 << 10))
        .unwrap();
    f.write_all_at(&pattern(4096, 4), 9 * CHUNK).unwrap();
    f.sync_all().unwrap();
    let s2 = snapshot(&mut ctl, "diff-2", &id).await.snapshot_id;
    let store = format!("--store={}", bed.store_url);

    let (ok, text) = cli(&["snapshot", "diff", &s1, &s2, &store]);
    assert!(ok, "{text}");
    assert_eq!(
        ranges(&text),
        vec![(CHUNK, 3 * CHUNK), (9 * CHUNK, CHUNK)],
        "{text}"
    );
    let summary = format!("2 range(s), {} of 64.0 MiB", strata::admin::bytes(4 * CHUNK));
    assert!(text.contains(&summary), "{text}");

    let (ok, text) = cli(&["snapshot", "diff", &s1, "--allocated", &store]);
    assert!(ok, "{text}");
    assert_eq!(ranges(&text), vec![(0, 4 * CHUNK)], "{text}");
    let (ok, text) = cli(&["snapshot", "diff", &s2, "--allocated", &store]);
    assert!(ok, "{text}");
    assert_eq!(ranges(&text), vec![(0, 4 * CHUNK), (9 * CHUNK, CHUNK)], "{text}");

    // Nothing changed between a snapshot and itself; clear errors for bad input.
    let (ok, text) = cli(&["snapshot", "diff", &s2, &s2, &store]);
    assert!(ok && ranges(&text).is_empty(), "{text}");
    let (ok, text) = cli(&["snapshot", "diff", &s1, "snap-missing", &store]);
    assert!(!ok && text.contains("snap-missing does not exist"), "{text}");
    let (ok, text) = cli(&["snapshot", "diff", "../etc", &s2, &store]);
    assert!(!ok && text.contains("snapshot id"), "{text}");
    let (ok, text) = cli(&["snapshot", "diff", &s1, &store]);
    assert!(!ok && text.contains("give a base and a target"), "{text}");
}
