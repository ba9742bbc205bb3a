//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same code paths as the
//! cargo-fuzz targets, on the stable toolchain, in every `cargo test`. A crash the fuzzer finds
//! becomes a regression test by copying its artifact into the target's corpus directory.
//!
//! Also here: the readable `wal_ops` seeds (checked against their committed files; regenerate with
//! `WAL_OPS_WRITE_SEEDS=1 cargo test --test fuzz_corpus`), a short deterministic pseudo-random run
//! of each target, and an allocation bound: decoding arbitrary bytes never makes a single
//! allocation larger than a record, and the segment scan none larger than a segment.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

use settlement_wal::wal::format::{MAX_RECORD_SIZE_BYTES, MIN_SEGMENT_SIZE_BYTES};
use settlement_wal::wal::fuzzing::{
    decode_arbitrary, scan_arbitrary_segment, wal_ops, wal_ops_input, WalOpsStep,
};

/// Records the largest single allocation of the current thread while a measurement is running.
struct Tracking;

thread_local! {
    static LARGEST: Cell<Option<usize>> = const { Cell::new(None) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|c| {
        if let Some(max) = c.get() {
            if size > max {
                c.set(Some(size));
            }
        }
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Runs `f` and returns the largest single allocation it made on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|c| c.set(Some(0)));
    f();
    LARGEST.with(|c| c.take()).unwrap_or(0)
}

fn corpus_dir(target: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the {target} corpus is empty");
    files
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect()
}

/// A small deterministic generator (xorshift64*), so the pseudo-random runs are reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn wal_decode_corpus_replays_without_panics_or_large_allocations() {
    for (name, data) in corpus("wal_decode") {
        eprintln!("{name}");
        let largest = largest_allocation(|| decode_arbitrary(&data));
        assert!(
            largest <= MAX_RECORD_SIZE_BYTES,
            "{name}: an allocation of {largest} bytes"
        );
    }
}

#[test]
fn wal_scan_corpus_replays_without_panics_or_large_allocations() {
    let scratch = common::temp_dir();
    for (name, data) in corpus("wal_scan") {
        eprintln!("{name}");
        let largest =
            largest_allocation(|| scan_arbitrary_segment(&data, &scratch.path().join("wal")));
        assert!(
            largest <= MIN_SEGMENT_SIZE_BYTES as usize,
            "{name}: an allocation of {largest} bytes"
        );
    }
}

#[test]
fn wal_ops_corpus_replays_against_the_model() {
    let scratch = common::temp_dir();
    for (name, data) in corpus("wal_ops") {
        eprintln!("{name}");
        wal_ops(&data, &scratch.path().join("wal"));
    }
}

/// The readable seeds of the `wal_ops` corpus, by file name.
fn wal_ops_seeds() -> Vec<(&'static str, Vec<WalOpsStep>)> {
    use WalOpsStep::*;
    let append = |count, class, seed| Append { count, class, seed };
    // `how` for a crash-cut: bit 0 zero-fills instead of truncating; bits 1-2 pick the region
    // (0 anywhere, 1 the records, 2 the unsynced tail, 3 the last record).
    let cut = |segment, how, at| CrashCut { segment, how, at };
    let flip = |segment, how, at, bit| BitFlip {
        segment,
        how,
        at,
        bit,
    };
    let commit_all = Commit {
        mode: 1,
        a: 0,
        b: 255,
    };
    let roll = || vec![append(4, 6, 1), append(4, 6, 2), append(4, 6, 3)];
    vec![
        (
            "seed-append-sync-commit-reopen",
            vec![
                append(3, 0, 1),
                Sync,
                append(2, 3, 2),
                Reopen,
                commit_all,
                Sync,
                append(1, 0, 9),
                Reopen,
            ],
        ),
        (
            "seed-roll-commit-checkpoint",
            [
                roll(),
                vec![
                    Sync,
                    commit_all,
                    Sync,
                    append(1, 0, 3),
                    Checkpoint,
                    Reopen,
                    append(2, 1, 4),
                ],
            ]
            .concat(),
        ),
        (
            "seed-crash-cut-unsynced-tail",
            vec![
                append(4, 3, 5),
                Sync,
                append(4, 3, 6),
                cut(1, 2 << 1, 30_000),
                append(1, 0, 7),
                Sync,
                Reopen,
            ],
        ),
        (
            "seed-crash-zero-fill-last-record",
            vec![
                append(3, 4, 0x85),
                Sync,
                append(2, 4, 0x86),
                cut(1, (3 << 1) | 1, 40_000),
                commit_all,
                Sync,
            ],
        ),
        (
            "seed-bit-flip-earlier-record",
            vec![
                append(6, 1, 8),
                Sync,
                flip(1, 1, 100, 3),
                append(1, 0, 1),
                Sync,
            ],
        ),
        (
            "seed-bit-flip-sealed-segment",
            [roll(), vec![Sync, flip(0, 1, 20_000, 0), append(1, 0, 2)]].concat(),
        ),
        (
            "seed-bit-flip-headers",
            vec![
                append(2, 0, 3),
                Sync,
                flip(1, 0, 0, 0),
                Reopen,
                flip(1, 0, 9, 5),
                Reopen,
            ],
        ),
        (
            "seed-zero-fill-sealed-segment",
            [
                roll(),
                vec![
                    Sync,
                    cut(0, (1 << 1) | 1, 30_000),
                    Reopen,
                    cut(0, (3 << 1) | 1, 0),
                ],
            ]
            .concat(),
        ),
        (
            "seed-invalid-appends-and-commits",
            vec![
                append(1, 7, 0),
                append(1, 7, 1),
                Commit {
                    mode: 0,
                    a: 5,
                    b: 200,
                },
                append(2, 0, 1),
                Commit {
                    mode: 0,
                    a: 1,
                    b: 2,
                },
                Sync,
                Commit {
                    mode: 0,
                    a: 2,
                    b: 1,
                },
                Commit {
                    mode: 0,
                    a: 0,
                    b: 1,
                },
                Commit {
                    mode: 0,
                    a: 1,
                    b: 2,
                },
            ],
        ),
        (
            // Records after a sync, then a lost sector among the unsynced ones followed by
            // intact unsynced records: a power cut's hole, cut, with an LSN jump.
            "seed-power-cut-hole-in-unsynced-records",
            vec![
                append(4, 3, 5),
                Sync,
                append(8, 3, 6),
                flip(1, 2 | 8, 20_000, 0),
                append(1, 0, 7),
                Sync,
                Reopen,
            ],
        ),
        (
            // The same hole among synced records, proven acknowledged by a commit marker
            // written after the sync: corruption.
            "seed-lost-sector-in-acknowledged-records",
            vec![
                append(8, 3, 5),
                Sync,
                commit_all,
                flip(1, 1 | 8, 16_000, 0),
                Reopen,
            ],
        ),
        (
            "seed-flip-in-tail-zeros",
            vec![
                append(3, 2, 4),
                Sync,
                flip(1, 0, 60_000, 7),
                append(1, 0, 1),
            ],
        ),
    ]
}

#[test]
fn wal_ops_seeds_are_committed_and_pass() {
    let scratch = common::temp_dir();
    let dir = corpus_dir("wal_ops");
    let write = std::env::var_os("WAL_OPS_WRITE_SEEDS").is_some();
    for (name, steps) in wal_ops_seeds() {
        let data = wal_ops_input(&steps);
        let path = dir.join(name);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &data).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == data,
            "{} differs from its seed; rerun with WAL_OPS_WRITE_SEEDS=1",
            path.display()
        );
        wal_ops(&data, &scratch.path().join("wal"));
    }
}

#[test]
fn short_pseudo_random_runs_of_every_target_pass() {
    let scratch = common::temp_dir();
    let mut rng = Rng(0x5eed_f00d_cafe_d00d);
    for i in 0..64 {
        let len = 1 + (rng.next() % 512) as usize;
        let data = rng.bytes(len);
        decode_arbitrary(&data);
        if i % 4 == 0 {
            scan_arbitrary_segment(&data, &scratch.path().join("scan"));
        }
    }
    for i in 0..24 {
        let len = 8 + (rng.next() % 160) as usize;
        let data = rng.bytes(len);
        eprintln!("wal_ops pseudo-random input {i}: {data:02x?}");
        wal_ops(&data, &scratch.path().join("ops"));
    }
}
