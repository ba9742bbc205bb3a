//! Criterion benchmarks for the settlement WAL.
//!
//! * `group_commit/{ours,raw_fdatasync}/N`: append N 128-byte records, then one sync;
//!   throughput in records (elements). `raw_fdatasync` is the plain-file floor: the N
//!   records assembled into one buffer, one `pwrite` into a preallocated file (set_len +
//!   zeros written in 4 KiB `write()` calls, wrapping around inside 64 MiB), then
//!   `fdatasync`.
//! * `recovery_scan/ours`: `Wal::open` over a 64 MiB-payload WAL (page cache warm);
//!   throughput in payload bytes.
//!
//! Same-run ratios, peers (okaywal, walrus-rust), latency percentiles and device bytes per
//! sync are in `benches/wal_compare.rs`. Run with `cargo bench --bench wal`.

use std::env;
use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use settlement_wal::wal::{Wal, WalOptions};
use tempfile::TempDir;

const REC: usize = 128;
const INTERVALS: [u64; 4] = [1, 16, 256, 4096];
const SEGMENT_BYTES: u64 = 64 << 20;
const RAW_FILE_BYTES: u64 = 64 << 20;
const RECOVERY_PAYLOAD_BYTES: u64 = 64 << 20;

fn ours_open(dir: &Path) -> Wal {
    Wal::open(dir, WalOptions::default().segment_size_bytes(SEGMENT_BYTES)).expect("open our WAL")
}

fn record() -> Vec<u8> {
    (0..REC)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(7))
        .collect()
}

/// The system temp dir unless it is tmpfs (no real sync), else `target/wal-bench-tmp`.
fn bench_base_dir() -> PathBuf {
    let tmp = env::temp_dir();
    let c = std::ffi::CString::new(tmp.as_os_str().as_encoded_bytes()).expect("temp dir path");
    // SAFETY: `c` is a valid NUL-terminated path; `st` is plain-old-data.
    let is_tmpfs = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        #[allow(clippy::unnecessary_cast)]
        let tmpfs = libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == 0x0102_1994;
        tmpfs
    };
    if is_tmpfs {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/wal-bench-tmp");
        std::fs::create_dir_all(&p).expect("create target/wal-bench-tmp");
        p
    } else {
        tmp
    }
}

fn tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(bench_base_dir())
        .expect("create temp dir")
}

/// Plain-file floor: preallocated (pre-zeroed) file, one pwrite per group, fdatasync.
struct RawLog {
    file: File,
    pos: u64,
    buf: Vec<u8>,
}

impl RawLog {
    fn create(dir: &Path) -> io::Result<RawLog> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.join("raw.log"))?;
        file.set_len(RAW_FILE_BYTES)?;
        let zeros = [0u8; 4096];
        let mut off = 0;
        while off < RAW_FILE_BYTES {
            file.write_all_at(&zeros, off)?;
            off += zeros.len() as u64;
        }
        file.sync_all()?;
        File::open(dir)?.sync_all()?;
        Ok(RawLog {
            file,
            pos: 0,
            buf: Vec::with_capacity(4096 * REC),
        })
    }

    fn commit(&mut self, rec: &[u8], n: u64) {
        self.buf.clear();
        for _ in 0..n {
            self.buf.extend_from_slice(rec);
        }
        let len = self.buf.len() as u64;
        if self.pos + len > RAW_FILE_BYTES {
            self.pos = 0;
        }
        self.file
            .write_all_at(&self.buf, self.pos)
            .expect("raw pwrite");
        self.pos += len;
        self.file.sync_data().expect("raw fdatasync");
    }
}

fn group_commit(c: &mut Criterion) {
    let rec = record();
    let mut g = c.benchmark_group("group_commit");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for n in INTERVALS {
        g.throughput(Throughput::Elements(n));

        let dir = tempdir("wal-bench-ours-");
        let wal = ours_open(dir.path());
        g.bench_with_input(BenchmarkId::new("ours", n), &n, |b, &n| {
            b.iter(|| {
                for _ in 0..n {
                    black_box(wal.append(black_box(&rec)).expect("append"));
                }
                black_box(wal.sync().expect("sync"))
            })
        });
        drop(wal);
        drop(dir);

        let dir = tempdir("wal-bench-raw-");
        let mut raw = RawLog::create(dir.path()).expect("raw log");
        g.bench_with_input(BenchmarkId::new("raw_fdatasync", n), &n, |b, &n| {
            b.iter(|| raw.commit(black_box(&rec), n))
        });
    }
    g.finish();
}

fn recovery_scan(c: &mut Criterion) {
    let rec = record();
    let dir = tempdir("wal-bench-recovery-");
    let nrec = RECOVERY_PAYLOAD_BYTES / REC as u64;
    {
        let wal = ours_open(dir.path());
        for i in 0..nrec {
            wal.append(&rec).expect("append");
            if i % 4096 == 4095 {
                wal.sync().expect("sync");
            }
        }
        wal.sync().expect("sync");
    }
    let mut g = c.benchmark_group("recovery_scan");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(nrec * REC as u64));
    g.bench_function("ours", |b| {
        b.iter_with_large_drop(|| ours_open(black_box(dir.path())))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().without_plots();
    targets = group_commit, recovery_scan
}
criterion_main!(benches);
