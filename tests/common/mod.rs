//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use settlement_wal::wal::{Wal, WalOptions};

/// Smallest segment size, so tests roll segments quickly.
pub const SMALL_SEGMENT_BYTES: u64 = 256 * 1024;

/// A temporary directory on the same file system as the work tree (tmpfs has no real sync).
pub fn temp_dir() -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).unwrap();
    tempfile::Builder::new()
        .prefix("wal-test-")
        .tempdir_in(base)
        .unwrap()
}

pub fn small_options() -> WalOptions {
    WalOptions::default().segment_size_bytes(SMALL_SEGMENT_BYTES)
}

pub fn open_small(dir: &Path) -> Wal {
    Wal::open(dir, small_options()).expect("open WAL")
}

/// The payload a test writes for `lsn`-ish index `i`: deterministic, variable length.
pub fn payload(i: u64) -> Vec<u8> {
    let len = 1 + (i as usize * 37) % 300;
    (0..len)
        .map(|j| (i as usize * 31 + j * 7) as u8 ^ 0x5a)
        .collect()
}

/// Segment files of a WAL directory, in name (= LSN) order.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

/// Copies a WAL directory's segment files into a fresh directory.
pub fn copy_wal(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in segment_files(from) {
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
}

/// A tiny deterministic PRNG (xorshift64*), so failures print a seed that reproduces them.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// A seed from the clock, or from `$var` when set (to replay a failure).
    pub fn seed_from_env(var: &str) -> u64 {
        std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
}
