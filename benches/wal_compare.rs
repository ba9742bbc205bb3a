//! Same-run comparison harness for the settlement WAL (plain `main`, no criterion).
//!
//! Runs every workload in one process so that each ratio is taken against a floor
//! (or a peer) measured minutes apart on the same noisy machine, then prints markdown
//! tables that can be pasted into `docs/benchmarks.md`.
//!
//! ```text
//! cargo bench --bench wal_compare                      # full run, ~1.5-2 minutes
//! WAL_BENCH_SCALE=0.2 cargo bench --bench wal_compare  # shorter, noisier
//! ```
//!
//! Workloads (128-byte entries everywhere):
//! 1. records/s with one sync every 1, 16, 256 and 4096 records: ours (`append` x N, then
//!    `sync`) against the raw floor (one `pwrite` of the N records into a preallocated file,
//!    then `fdatasync`) and against its fair twin, the fresh-file floor (the same, but into
//!    fresh `posix_fallocate`d files of our segment size, created like our segments: a WAL
//!    that never reuses files pays allocation, unwritten-extent conversion and first-touch
//!    faults that rewriting one cached file in place does not);
//! 2. sync latency p50/p99 of those same runs;
//! 3. durable append, 1 and 8 writers, each waiting for its own entry: ours
//!    (`append_durable`), okaywal 0.3.1 (`begin_entry` / `write_chunk` / `commit`) and
//!    walrus-rust 0.2.0 (`FsyncSchedule::SyncEach`);
//! 4. recovery scan speed: re-open ours over ~256 MiB of 128-byte records, page cache warm;
//! 5. device bytes written per sync (`/sys/block/<dev>/stat`) for ours and raw.
//!
//! Command-line arguments are ignored (cargo passes `--bench`). When `--bench` is absent
//! (`cargo test --benches`), a smoke scale of 0.02 is used unless `WAL_BENCH_SCALE` is set.

use std::env;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::hint::black_box;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use settlement_wal::wal::{Wal, WalOptions};
use tempfile::TempDir;

/// Size of every benchmark entry.
const REC: usize = 128;
/// Records per sync for workload 1.
const INTERVALS: [usize; 4] = [1, 16, 256, 4096];
/// Segment size handed to our WAL.
const SEGMENT_BYTES: u64 = 64 << 20;
/// Size of the raw floor's preallocated file; writes wrap around inside it.
const RAW_FILE_BYTES: u64 = 64 << 20;

// ---------------------------------------------------------------------------------------
// Our WAL (the only place the crate's API is touched).
// ---------------------------------------------------------------------------------------

fn ours_options() -> WalOptions {
    WalOptions::default().segment_size_bytes(SEGMENT_BYTES)
}

fn ours_open(dir: &Path) -> Wal {
    Wal::open(dir, ours_options()).expect("open our WAL")
}

// ---------------------------------------------------------------------------------------
// Environment: where to put files, which block device backs them.
// ---------------------------------------------------------------------------------------

/// statfs(2) magic of the filesystem holding `path`.
fn fs_magic(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path; `st` is plain-old-data written by the kernel.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        #[allow(clippy::unnecessary_cast)]
        Some(st.f_type as i64)
    }
}

fn fs_name(magic: Option<i64>) -> &'static str {
    match magic {
        Some(0xEF53) => "ext2/3/4",
        Some(0x0102_1994) => "tmpfs",
        Some(0x5846_5342) => "xfs",
        Some(0x9123_683E) => "btrfs",
        Some(0x794C_7630) => "overlayfs",
        Some(_) => "other",
        None => "unknown",
    }
}

/// Directory under which all benchmark temp dirs are created: the system temp dir,
/// unless that is tmpfs (no real sync), in which case `target/wal-bench-tmp`.
fn bench_base_dir() -> PathBuf {
    let tmp = env::temp_dir();
    if fs_magic(&tmp) == Some(0x0102_1994) {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/wal-bench-tmp");
        fs::create_dir_all(&p).expect("create target/wal-bench-tmp");
        p
    } else {
        tmp
    }
}

fn tempdir_in(base: &Path, prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .expect("create temp dir")
}

/// Device-level write counter of the whole disk backing a directory.
struct DevStat {
    name: String,
    stat: PathBuf,
}

impl DevStat {
    /// st_dev of `dir` -> /sys/dev/block/MAJ:MIN -> whole disk (parent, for a partition)
    /// -> /sys/block/<dev>/stat.
    fn for_dir(dir: &Path) -> Option<DevStat> {
        let dev = fs::metadata(dir).ok()?.dev();
        let (maj, min) = (libc::major(dev), libc::minor(dev));
        let sys = fs::canonicalize(format!("/sys/dev/block/{maj}:{min}")).ok()?;
        let disk = if sys.join("partition").exists() {
            sys.parent()?.to_path_buf()
        } else {
            sys
        };
        let name = disk.file_name()?.to_string_lossy().into_owned();
        let stat = Path::new("/sys/block").join(&name).join("stat");
        stat.exists().then_some(DevStat { name, stat })
    }

    /// Bytes written to the device so far (field 7: sectors written, 512 bytes each).
    fn bytes_written(&self) -> Option<u64> {
        let s = fs::read_to_string(&self.stat).ok()?;
        let sectors: u64 = s.split_whitespace().nth(6)?.parse().ok()?;
        Some(sectors * 512)
    }
}

/// Bytes this process caused to be written to storage so far (`write_bytes` of
/// `/proc/self/io`: page-cache bytes dirtied, accounted per page or folio). Unlike the
/// device counter it excludes other processes' I/O and file-system metadata.
fn self_write_bytes() -> Option<u64> {
    let s = fs::read_to_string("/proc/self/io").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Page faults (minor + major) taken by the calling thread so far.
fn thread_faults() -> u64 {
    // SAFETY: rusage is plain-old-data filled by the kernel.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_THREAD, &mut ru) != 0 {
            return 0;
        }
        (ru.ru_minflt + ru.ru_majflt) as u64
    }
}

/// Flush everything dirty on the machine, so a measured window starts clean.
fn quiesce() {
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() };
    thread::sleep(Duration::from_millis(50));
}

// ---------------------------------------------------------------------------------------
// Raw floor: plain file, preallocated, one pwrite per group, fdatasync.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Prealloc {
    /// set_len, then zeros written in 4 KiB write() calls, then fsync: a true overwrite
    /// afterwards (no unwritten-extent conversion), small page-cache folios.
    Zero4k,
    /// posix_fallocate(2): unwritten extents, converted on first write.
    Fallocate,
}

impl Prealloc {
    fn from_env() -> Prealloc {
        match env::var("WAL_BENCH_RAW_PREALLOC").as_deref() {
            Ok("fallocate") => Prealloc::Fallocate,
            _ => Prealloc::Zero4k,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Prealloc::Zero4k => "set_len + zeros written in 4 KiB write() calls + fsync",
            Prealloc::Fallocate => "posix_fallocate",
        }
    }
}

struct RawLog {
    file: File,
    size: u64,
    pos: u64,
    buf: Vec<u8>,
}

impl RawLog {
    fn create(dir: &Path, size: u64, prealloc: Prealloc) -> io::Result<RawLog> {
        let path = dir.join("raw.log");
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        match prealloc {
            Prealloc::Zero4k => {
                file.set_len(size)?;
                let zeros = [0u8; 4096];
                let mut off = 0;
                while off < size {
                    file.write_all_at(&zeros, off)?;
                    off += zeros.len() as u64;
                }
            }
            Prealloc::Fallocate => {
                // SAFETY: valid fd, non-negative offset and length.
                let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, size as libc::off_t) };
                if rc != 0 {
                    return Err(io::Error::from_raw_os_error(rc));
                }
            }
        }
        file.sync_all()?;
        File::open(dir)?.sync_all()?;
        Ok(RawLog {
            file,
            size,
            pos: 0,
            buf: Vec::with_capacity(4096 * REC),
        })
    }
}

/// The raw floor's fair twin: fresh files of our segment size, each created the way our
/// segments are (`posix_fallocate`, `fsync`, directory `fsync`), one `pwrite` per group and
/// `fdatasync`; a new file when the group does not fit (created inside the group that needs
/// it, as our roll is). Files are never reused, like ours.
struct FreshRawLog {
    dir: PathBuf,
    size: u64,
    file: File,
    pos: u64,
    files: u64,
    buf: Vec<u8>,
}

impl FreshRawLog {
    fn create(dir: &Path, size: u64) -> io::Result<FreshRawLog> {
        let file = FreshRawLog::new_file(dir, 0, size)?;
        Ok(FreshRawLog {
            dir: dir.to_path_buf(),
            size,
            file,
            pos: 0,
            files: 1,
            buf: Vec::with_capacity(4096 * REC),
        })
    }

    fn new_file(dir: &Path, n: u64, size: u64) -> io::Result<File> {
        let path = dir.join(format!("fresh-{n:08}.log"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        // SAFETY: valid fd, non-negative offset and length.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, size as libc::off_t) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        file.sync_all()?;
        File::open(dir)?.sync_all()?;
        Ok(file)
    }
}

impl GroupLog for FreshRawLog {
    fn append_group(&mut self, rec: &[u8], n: usize) {
        self.buf.clear();
        for _ in 0..n {
            self.buf.extend_from_slice(rec);
        }
        let len = self.buf.len() as u64;
        if self.pos + len > self.size {
            // The full file is synced before the next exists, as our roll syncs a segment.
            self.file.sync_data().expect("fresh fdatasync");
            self.file =
                FreshRawLog::new_file(&self.dir, self.files, self.size).expect("fresh file");
            self.files += 1;
            self.pos = 0;
        }
        self.file
            .write_all_at(&self.buf, self.pos)
            .expect("fresh pwrite");
        self.pos += len;
    }

    fn sync(&mut self) {
        self.file.sync_data().expect("fresh fdatasync");
    }
}

/// A log that can take a group of records and then be synced.
trait GroupLog {
    fn append_group(&mut self, rec: &[u8], n: usize);
    fn sync(&mut self);
}

impl GroupLog for RawLog {
    fn append_group(&mut self, rec: &[u8], n: usize) {
        // Assemble the group (what a real writer would do), then one write() for it.
        self.buf.clear();
        for _ in 0..n {
            self.buf.extend_from_slice(rec);
        }
        let len = self.buf.len() as u64;
        if self.pos + len > self.size {
            self.pos = 0;
        }
        self.file
            .write_all_at(&self.buf, self.pos)
            .expect("raw pwrite");
        self.pos += len;
    }

    fn sync(&mut self) {
        self.file.sync_data().expect("raw fdatasync");
    }
}

struct OursLog<'a>(&'a Wal);

impl GroupLog for OursLog<'_> {
    fn append_group(&mut self, rec: &[u8], n: usize) {
        for _ in 0..n {
            black_box(self.0.append(rec).expect("ours append"));
        }
    }

    fn sync(&mut self) {
        black_box(self.0.sync().expect("ours sync"));
    }
}

// ---------------------------------------------------------------------------------------
// Statistics.
// ---------------------------------------------------------------------------------------

/// Nearest-rank percentile of sorted nanosecond samples, in microseconds.
fn pct_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

#[derive(Default)]
struct IntervalStats {
    records: u64,
    syncs: u64,
    secs: f64,
    /// Latency of the sync call alone (ours: `sync()`, raw: `fdatasync`), ns.
    sync_ns: Vec<u64>,
    /// Latency of the whole group commit (append/write of N records + sync), ns.
    commit_ns: Vec<u64>,
    dev_bytes: Option<u64>,
    self_bytes: Option<u64>,
    /// Total time spent appending / assembling+writing records (outside the sync), ns.
    append_ns: u64,
    /// Page faults taken by the benchmark thread in the measured windows.
    faults: u64,
}

impl IntervalStats {
    fn merge(&mut self, o: IntervalStats) {
        (self.dev_bytes, self.self_bytes) = if self.syncs == 0 {
            (o.dev_bytes, o.self_bytes)
        } else {
            (
                self.dev_bytes.zip(o.dev_bytes).map(|(a, b)| a + b),
                self.self_bytes.zip(o.self_bytes).map(|(a, b)| a + b),
            )
        };
        self.records += o.records;
        self.append_ns += o.append_ns;
        self.faults += o.faults;
        self.syncs += o.syncs;
        self.secs += o.secs;
        self.sync_ns.extend(o.sync_ns);
        self.commit_ns.extend(o.commit_ns);
    }

    fn finish(&mut self) {
        self.sync_ns.sort_unstable();
        self.commit_ns.sort_unstable();
    }

    fn rate(&self) -> f64 {
        self.records as f64 / self.secs
    }

    fn bytes_per_sync(&self) -> Option<f64> {
        self.dev_bytes.map(|b| b as f64 / self.syncs as f64)
    }

    fn faults_per_sync(&self) -> f64 {
        self.faults as f64 / self.syncs as f64
    }

    fn append_ns_per_record(&self) -> f64 {
        self.append_ns as f64 / self.records as f64
    }

    fn self_bytes_per_sync(&self) -> Option<f64> {
        self.self_bytes.map(|b| b as f64 / self.syncs as f64)
    }
}

/// Short raw write+fdatasync probe (1 record per sync): p50 in microseconds. Run at the
/// start and the end, it tells whether the disk was contended while we measured.
fn probe_disk(base: &Path, rec: &[u8], dur: Duration) -> f64 {
    let d = tempdir_in(base, "probe-");
    let mut raw = RawLog::create(d.path(), 1 << 20, Prealloc::Zero4k).expect("probe file");
    let mut st = run_interval(&mut raw, 1, rec, Duration::ZERO, dur, None);
    st.finish();
    pct_us(&st.commit_ns, 50.0)
}

fn run_interval(
    log: &mut dyn GroupLog,
    n: usize,
    rec: &[u8],
    warmup: Duration,
    dur: Duration,
    dev: Option<&DevStat>,
) -> IntervalStats {
    let end = Instant::now() + warmup;
    while Instant::now() < end {
        log.append_group(rec, n);
        log.sync();
    }
    quiesce();
    let d0 = dev.and_then(DevStat::bytes_written);
    let s0 = self_write_bytes();
    let f0 = thread_faults();
    let mut st = IntervalStats::default();
    let t0 = Instant::now();
    let end = t0 + dur;
    loop {
        let c = Instant::now();
        log.append_group(rec, n);
        let s = Instant::now();
        log.sync();
        let e = Instant::now();
        st.sync_ns.push((e - s).as_nanos() as u64);
        st.commit_ns.push((e - c).as_nanos() as u64);
        st.append_ns += (s - c).as_nanos() as u64;
        st.records += n as u64;
        st.syncs += 1;
        if e >= end {
            break;
        }
    }
    st.secs = t0.elapsed().as_secs_f64();
    let d1 = dev.and_then(DevStat::bytes_written);
    let s1 = self_write_bytes();
    st.faults = thread_faults() - f0;
    st.dev_bytes = d0.zip(d1).map(|(a, b)| b.saturating_sub(a));
    st.self_bytes = s0.zip(s1).map(|(a, b)| b.saturating_sub(a));
    st
}

#[derive(Default)]
struct DurableStats {
    /// Calls started inside the measured windows.
    ops: u64,
    secs: f64,
    lat_ns: Vec<u64>,
    /// Calls including warm-up (denominator of `dev_bytes`).
    all_ops: u64,
    dev_bytes: Option<u64>,
}

impl DurableStats {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs
    }

    fn merge(&mut self, o: DurableStats) {
        self.dev_bytes = if self.all_ops == 0 {
            o.dev_bytes
        } else {
            self.dev_bytes.zip(o.dev_bytes).map(|(a, b)| a + b)
        };
        self.ops += o.ops;
        self.secs += o.secs;
        self.all_ops += o.all_ops;
        self.lat_ns.extend(o.lat_ns);
        self.lat_ns.sort_unstable();
    }

    fn bytes_per_entry(&self) -> Option<f64> {
        self.dev_bytes.map(|b| b as f64 / self.all_ops as f64)
    }
}

/// `threads` writers each call `op` (one durable 128-byte entry) in a loop; only calls
/// started inside the measured window count toward rate and latency.
fn run_writers<F: Fn() + Sync>(
    threads: usize,
    warmup: Duration,
    dur: Duration,
    dev: Option<&DevStat>,
    op: F,
) -> DurableStats {
    let barrier = Barrier::new(threads + 1);
    let d0 = dev.and_then(DevStat::bytes_written);
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + warmup;
    let end = measure_from + dur;
    let per_thread: Vec<(Vec<u64>, u64)> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (barrier, op) = (&barrier, &op);
                s.spawn(move || {
                    let mut lat = Vec::with_capacity(1 << 16);
                    let mut all = 0u64;
                    barrier.wait();
                    loop {
                        let t = Instant::now();
                        if t >= end {
                            break;
                        }
                        op();
                        all += 1;
                        if t >= measure_from {
                            lat.push(t.elapsed().as_nanos() as u64);
                        }
                    }
                    (lat, all)
                })
            })
            .collect();
        barrier.wait();
        handles
            .into_iter()
            .map(|h| h.join().expect("writer thread panicked"))
            .collect()
    });
    let d1 = dev.and_then(DevStat::bytes_written);
    let all_ops = per_thread.iter().map(|(_, a)| a).sum();
    let mut lat_ns: Vec<u64> = per_thread.into_iter().flat_map(|(l, _)| l).collect();
    lat_ns.sort_unstable();
    DurableStats {
        ops: lat_ns.len() as u64,
        secs: dur.as_secs_f64(),
        lat_ns,
        all_ops,
        dev_bytes: d0.zip(d1).map(|(a, b)| b.saturating_sub(a)),
    }
}

// ---------------------------------------------------------------------------------------
// Peers.
// ---------------------------------------------------------------------------------------

/// okaywal log manager that recovers nothing and checkpoints nothing.
#[derive(Debug)]
struct NoopCheckpointer;

impl okaywal::LogManager for NoopCheckpointer {
    fn recover(&mut self, _entry: &mut okaywal::Entry<'_>) -> io::Result<()> {
        Ok(())
    }

    fn checkpoint_to(
        &mut self,
        _last_checkpointed_id: okaywal::EntryId,
        _checkpointed_entries: &mut okaywal::SegmentReader,
        _wal: &okaywal::WriteAheadLog,
    ) -> io::Result<()> {
        Ok(())
    }
}

fn okaywal_append(log: &okaywal::WriteAheadLog, rec: &[u8]) {
    let mut entry = log.begin_entry().expect("okaywal begin_entry");
    entry.write_chunk(rec).expect("okaywal write_chunk");
    entry.commit().expect("okaywal commit");
}

// ---------------------------------------------------------------------------------------
// Formatting.
// ---------------------------------------------------------------------------------------

fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M/s", r / 1e6)
    } else if r >= 1e4 {
        format!("{:.1} k/s", r / 1e3)
    } else {
        format!("{r:.0}/s")
    }
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} us")
    }
}

fn fmt_bytes(b: Option<f64>) -> String {
    match b {
        None => "n/a".into(),
        Some(b) if b >= 1024.0 * 1024.0 => format!("{:.2} MiB", b / 1024.0 / 1024.0),
        Some(b) if b >= 1024.0 => format!("{:.1} KiB", b / 1024.0),
        Some(b) => format!("{b:.0} B"),
    }
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "MISS"
    }
}

fn uname() -> String {
    // SAFETY: utsname is plain-old-data filled by the kernel.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return "unknown".into();
        }
        let s = |f: &[libc::c_char]| {
            std::ffi::CStr::from_ptr(f.as_ptr())
                .to_string_lossy()
                .into_owned()
        };
        format!("{} {} {}", s(&u.sysname), s(&u.release), s(&u.machine))
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[wal_compare] {}", msg.as_ref());
    let _ = io::stderr().flush();
}

// ---------------------------------------------------------------------------------------
// Main.
// ---------------------------------------------------------------------------------------

fn main() {
    let bench_mode = env::args().any(|a| a == "--bench");
    let scale = env::var("WAL_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(if bench_mode { 1.0 } else { 0.02 });
    let secs = |s: f64| Duration::from_secs_f64((s * scale).max(0.02));
    let prealloc = Prealloc::from_env();
    // walrus-rust reads these at construction and on every debug print.
    env::set_var("WALRUS_QUIET", "1");

    let base = bench_base_dir();
    let dev = DevStat::for_dir(&base);
    let rec: Vec<u8> = (0..REC)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(7))
        .collect();
    let mut keep: Vec<TempDir> = Vec::new(); // removed at exit, so deletes don't pollute device stats
    let t_all = Instant::now();
    let probe_start = probe_disk(&base, &rec, secs(0.5));
    let dev_start = dev.as_ref().and_then(DevStat::bytes_written);
    let self_start = self_write_bytes();

    log(format!(
        "scale {scale}, dir {} ({}), device {}, raw prealloc: {}",
        base.display(),
        fs_name(fs_magic(&base)),
        dev.as_ref().map_or("n/a", |d| d.name.as_str()),
        prealloc.describe()
    ));

    // ---- Workloads 1, 2, 5: group commit, ours vs raw, alternating rounds ---------------
    const ROUNDS: usize = 2;
    let (warm, per_round) = (secs(0.25), secs(2.0));
    let mut interval_rows: Vec<(usize, IntervalStats, IntervalStats)> = Vec::new();
    // The fresh-file floor, per interval, measured in the same alternating rounds.
    let mut fresh_rows: Vec<(usize, IntervalStats)> = Vec::new();
    for &n in &INTERVALS {
        log(format!("group commit, sync every {n} records"));
        let od = tempdir_in(&base, "ours-interval-");
        let rd = tempdir_in(&base, "raw-interval-");
        let wal = ours_open(od.path());
        let mut raw = RawLog::create(rd.path(), RAW_FILE_BYTES, prealloc).expect("raw create");
        let fd = tempdir_in(&base, "fresh-interval-");
        let mut fresh = FreshRawLog::create(fd.path(), SEGMENT_BYTES).expect("fresh create");
        let (mut o, mut r) = (IntervalStats::default(), IntervalStats::default());
        let mut f = IntervalStats::default();
        for _ in 0..ROUNDS {
            f.merge(run_interval(
                &mut fresh,
                n,
                &rec,
                warm,
                per_round,
                dev.as_ref(),
            ));
            let mut ol = OursLog(&wal);
            o.merge(run_interval(
                &mut ol,
                n,
                &rec,
                warm,
                per_round,
                dev.as_ref(),
            ));
            r.merge(run_interval(
                &mut raw,
                n,
                &rec,
                warm,
                per_round,
                dev.as_ref(),
            ));
        }
        o.finish();
        r.finish();
        f.finish();
        drop(wal);
        keep.push(od);
        keep.push(rd);
        keep.push(fd);
        interval_rows.push((n, o, r));
        fresh_rows.push((n, f));
    }

    // ---- Workload 3: durable append, 1 and 8 writers, alternating rounds ---------------
    // walrus keeps process-global state (fsync schedule, file registry), so one instance
    // for the whole run, one topic per writer count.
    let walrus_mmap = env::var("WAL_BENCH_WALRUS_MMAP").is_ok_and(|v| v == "1");
    if walrus_mmap {
        walrus_rust::disable_fd_backend();
    }
    let wd = tempdir_in(&base, "walrus-");
    env::set_var("WALRUS_DATA_DIR", wd.path());
    let walrus = walrus_rust::Walrus::with_consistency_and_schedule(
        walrus_rust::ReadConsistency::StrictlyAtOnce,
        walrus_rust::FsyncSchedule::SyncEach,
    )
    .expect("walrus");
    keep.push(wd);
    const DURABLE_ROUNDS: usize = 2;
    let (dwarm, dround) = (secs(0.2), secs(1.5));
    let mut durable: Vec<(&'static str, usize, DurableStats)> = Vec::new();
    // (writers, entries per msync, msyncs) of ours
    let mut ours_grouping: Vec<(usize, f64, u64)> = Vec::new();
    for &threads in &[1usize, 8] {
        log(format!(
            "durable append, {threads} writer(s): ours, okaywal, walrus-rust{}",
            if threads == 1 { ", raw" } else { "" }
        ));
        let od = tempdir_in(&base, "ours-durable-");
        let wal = Arc::new(ours_open(od.path()));
        let kd = tempdir_in(&base, "okaywal-");
        let okw = okaywal::WriteAheadLog::recover(kd.path(), NoopCheckpointer).expect("okaywal");
        let rd = tempdir_in(&base, "raw-durable-");
        let raw = Mutex::new(RawLog::create(rd.path(), RAW_FILE_BYTES, prealloc).expect("raw"));
        let topic = format!("bench-{threads}");
        let mut acc: [DurableStats; 4] = Default::default();
        let s0 = wal.stats();
        for _ in 0..DURABLE_ROUNDS {
            acc[0].merge(run_writers(threads, dwarm, dround, dev.as_ref(), || {
                black_box(wal.append_durable(&rec).expect("ours append_durable"));
            }));
            acc[1].merge(run_writers(threads, dwarm, dround, dev.as_ref(), || {
                okaywal_append(&okw, &rec)
            }));
            acc[2].merge(run_writers(threads, dwarm, dround, dev.as_ref(), || {
                walrus
                    .append_for_topic(&topic, &rec)
                    .expect("walrus append_for_topic");
            }));
            if threads == 1 {
                acc[3].merge(run_writers(threads, dwarm, dround, dev.as_ref(), || {
                    let mut raw = raw.lock().expect("raw lock");
                    raw.append_group(&rec, 1);
                    raw.sync();
                }));
            }
        }
        let s1 = wal.stats();
        let syncs = s1.syncs - s0.syncs;
        ours_grouping.push((
            threads,
            (s1.records_appended - s0.records_appended) as f64 / syncs.max(1) as f64,
            syncs,
        ));
        let [a0, a1, a2, a3] = acc;
        durable.push(("ours", threads, a0));
        durable.push(("okaywal", threads, a1));
        durable.push(("walrus", threads, a2));
        if threads == 1 {
            durable.push(("raw", threads, a3));
        }
        drop(wal);
        okw.shutdown().expect("okaywal shutdown");
        keep.extend([od, kd, rd]);
    }
    drop(walrus);

    // ---- Workload 4: recovery scan ------------------------------------------------------
    let target_bytes = ((256u64 << 20) as f64 * scale.min(1.0)).max((4u64 << 20) as f64) as u64;
    let nrec = target_bytes / REC as u64;
    log(format!(
        "recovery: writing {nrec} records ({} MiB of payload)",
        target_bytes >> 20
    ));
    let rdir = tempdir_in(&base, "ours-recovery-");
    {
        let wal = ours_open(rdir.path());
        for i in 0..nrec {
            wal.append(&rec).expect("append");
            if i % 4096 == 4095 {
                wal.sync().expect("sync");
            }
        }
        wal.sync().expect("sync");
    }
    let mut open_secs = Vec::new();
    let mut record_bytes = 0u64;
    for _ in 0..3 {
        let t = Instant::now();
        let wal = ours_open(rdir.path());
        open_secs.push(t.elapsed().as_secs_f64());
        // Bytes of valid records the scan verified (headers and padding included).
        record_bytes = wal.open_report().record_bytes;
        drop(wal);
    }
    open_secs.sort_by(f64::total_cmp);
    let on_disk: u64 = fs::read_dir(rdir.path())
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    keep.push(rdir);
    let scan_payload = nrec * REC as u64;
    let scan_bytes = if record_bytes > 0 {
        record_bytes
    } else {
        scan_payload
    };
    let scan_mbps_med = scan_bytes as f64 / open_secs[1] / 1e6;
    let scan_mbps_best = scan_bytes as f64 / open_secs[0] / 1e6;
    let payload_mbps_med = scan_payload as f64 / open_secs[1] / 1e6;

    let dev_total = dev
        .as_ref()
        .and_then(DevStat::bytes_written)
        .zip(dev_start)
        .map(|(b, a)| b.saturating_sub(a));
    let self_total = self_write_bytes()
        .zip(self_start)
        .map(|(b, a)| b.saturating_sub(a));
    let probe_end = probe_disk(&base, &rec, secs(0.5));
    log(format!("done in {:.1} s", t_all.elapsed().as_secs_f64()));

    // ---- Report -------------------------------------------------------------------------
    let by = |name: &str, t: usize| {
        durable
            .iter()
            .find(|(n, th, _)| *n == name && *th == t)
            .map(|(_, _, s)| s)
            .expect("durable result")
    };
    let iv = |n: usize| {
        interval_rows
            .iter()
            .find(|(k, _, _)| *k == n)
            .map(|(_, o, r)| (o, r))
            .expect("interval result")
    };
    let (o1, r1) = iv(1);
    let (o4096, r4096) = iv(4096);
    let ours1 = by("ours", 1);
    let ours8 = by("ours", 8);
    let okw1 = by("okaywal", 1);
    let okw8 = by("okaywal", 8);
    let raw1 = by("raw", 1);

    let mut out = String::new();
    let w = &mut out;
    use std::fmt::Write as _;
    let _ = writeln!(
        w,
        "Machine: {} cores, {}; files in {} ({} on /dev/{}); raw floor file preallocated with {}; \
         WAL_BENCH_SCALE={scale}; total run {:.0} s.\n",
        thread::available_parallelism().map_or(0, |n| n.get()),
        uname(),
        base.display(),
        fs_name(fs_magic(&base)),
        dev.as_ref().map_or("?", |d| d.name.as_str()),
        prealloc.describe(),
        t_all.elapsed().as_secs_f64()
    );

    let contended = probe_start > 400.0 || probe_end > 400.0;
    let _ = writeln!(
        w,
        "Disk probe (raw 128 B write + fdatasync, p50): {} before, {} after{}. Device writes during \
         the run: {}, of which this process dirtied {} (the rest is file-system metadata and \
         other processes).\n",
        fmt_us(probe_start),
        fmt_us(probe_end),
        if contended {
            " -- WARNING: well above the ~110 us this machine does when idle; the disk was \
             contended and absolute numbers are not representative"
        } else {
            ""
        },
        fmt_bytes(dev_total.map(|b| b as f64)),
        fmt_bytes(self_total.map(|b| b as f64)),
    );
    let _ = writeln!(w, "### Targets\n");
    let _ = writeln!(w, "| workload | ours | baseline | ratio | target |");
    let _ = writeln!(w, "|---|---|---|---|---|");
    let lat_ratio = pct_us(&ours1.lat_ns, 50.0) / pct_us(&raw1.lat_ns, 50.0);
    let _ = writeln!(
        w,
        "| single durable append, p50 latency (ours `append_durable` vs raw write+fdatasync, same rounds) | {} | {} | {:.2}x | <= 1.1x: {} |",
        fmt_us(pct_us(&ours1.lat_ns, 50.0)),
        fmt_us(pct_us(&raw1.lat_ns, 50.0)),
        lat_ratio,
        verdict(lat_ratio <= 1.1)
    );
    let c8 = ours8.rate() / okw8.rate();
    let _ = writeln!(
        w,
        "| 8 concurrent durable writers, entries/s (vs okaywal) | {} | {} | {:.2}x | >= 2.5x: {} |",
        fmt_rate(ours8.rate()),
        fmt_rate(okw8.rate()),
        c8,
        verdict(c8 >= 2.5)
    );
    let g = o4096.rate() / r4096.rate();
    let _ = writeln!(
        w,
        "| sync every 4096 records, records/s (vs raw floor) | {} | {} | {:.2}x | >= 0.75x: {} |",
        fmt_rate(o4096.rate()),
        fmt_rate(r4096.rate()),
        g,
        verdict(g >= 0.75)
    );
    let f4096 = &fresh_rows
        .iter()
        .find(|(k, _)| *k == 4096)
        .expect("fresh result")
        .1;
    let gf = o4096.rate() / f4096.rate();
    let _ = writeln!(
        w,
        "| sync every 4096 records, records/s (vs fresh-file floor) | {} | {} | {:.2}x | >= 0.75x: {} |",
        fmt_rate(o4096.rate()),
        fmt_rate(f4096.rate()),
        gf,
        verdict(gf >= 0.75)
    );
    let _ = writeln!(
        w,
        "| recovery scan, record MB/s (median of 3 opens) | {:.0} MB/s | 1000 MB/s | {:.2}x | >= 1 GB/s: {} |",
        scan_mbps_med,
        scan_mbps_med / 1000.0,
        verdict(scan_mbps_med >= 1000.0)
    );

    let _ = writeln!(
        w,
        "\n### Group commit: records/s, sync latency, device bytes per sync\n"
    );
    let _ = writeln!(
        w,
        "| records/sync | ours rec/s | raw rec/s | ratio | ours sync p50 / p99 | raw fdatasync p50 / p99 | ours / raw append time per record |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|");
    for (n, o, r) in &interval_rows {
        let _ = writeln!(
            w,
            "| {n} | {} | {} | {:.2}x | {} / {} | {} / {} | {:.0} / {:.0} ns |",
            fmt_rate(o.rate()),
            fmt_rate(r.rate()),
            o.rate() / r.rate(),
            fmt_us(pct_us(&o.sync_ns, 50.0)),
            fmt_us(pct_us(&o.sync_ns, 99.0)),
            fmt_us(pct_us(&r.sync_ns, 50.0)),
            fmt_us(pct_us(&r.sync_ns, 99.0)),
            o.append_ns_per_record(),
            r.append_ns_per_record(),
        );
    }
    let _ = writeln!(
        w,
        "\nAppend time: ours `append` x N; raw copying N records into one buffer + one pwrite.\n"
    );
    let _ = writeln!(
        w,
        "| records/sync | ours rec/s | raw floor (one file rewritten in place) | fresh-file floor (new fallocated {} MiB files) | ours / raw | ours / fresh | fresh fdatasync p50 / p99 |",
        SEGMENT_BYTES >> 20
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|");
    for ((n, o, r), (_, f)) in interval_rows.iter().zip(&fresh_rows) {
        let _ = writeln!(
            w,
            "| {n} | {} | {} | {} | {:.2}x | {:.2}x | {} / {} |",
            fmt_rate(o.rate()),
            fmt_rate(r.rate()),
            fmt_rate(f.rate()),
            o.rate() / r.rate(),
            o.rate() / f.rate(),
            fmt_us(pct_us(&f.sync_ns, 50.0)),
            fmt_us(pct_us(&f.sync_ns, 99.0)),
        );
    }
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "| records/sync | ours dev bytes/sync | raw dev bytes/sync | ratio | ours / raw dirtied bytes/sync | ours / raw page faults/sync |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    for (n, o, r) in &interval_rows {
        let ratio = o
            .bytes_per_sync()
            .zip(r.bytes_per_sync())
            .map_or("n/a".to_string(), |(a, b)| format!("{:.2}x", a / b));
        let _ = writeln!(
            w,
            "| {n} | {} | {} | {ratio} | {} / {} | {:.2} / {:.2} |",
            fmt_bytes(o.bytes_per_sync()),
            fmt_bytes(r.bytes_per_sync()),
            fmt_bytes(o.self_bytes_per_sync()),
            fmt_bytes(r.self_bytes_per_sync()),
            o.faults_per_sync(),
            r.faults_per_sync(),
        );
    }
    let _ = writeln!(
        w,
        "\nDev bytes/sync: delta of sectors written in /sys/block/{}/stat over the measured \
         windows / syncs (includes file-system metadata and any other process's writes). \
         Dirtied bytes/sync: delta of write_bytes in /proc/self/io / syncs (this process only). \
         Page faults: getrusage(RUSAGE_THREAD) of the benchmark thread.",
        dev.as_ref().map_or("?", |d| d.name.as_str())
    );
    let _ = writeln!(
        w,
        "\nWhole group commit (append/write N + sync) p50 / p99: {}",
        interval_rows
            .iter()
            .map(|(n, o, r)| format!(
                "N={n}: ours {} / {}, raw {} / {}",
                fmt_us(pct_us(&o.commit_ns, 50.0)),
                fmt_us(pct_us(&o.commit_ns, 99.0)),
                fmt_us(pct_us(&r.commit_ns, 50.0)),
                fmt_us(pct_us(&r.commit_ns, 99.0))
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );

    let _ = writeln!(
        w,
        "\n### Durable append (each writer waits for its own entry)\n"
    );
    let _ = writeln!(
        w,
        "| system | writers | entries/s | vs okaywal | p50 | p99 | p999 | dev bytes/entry |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|");
    let walrus_label = if walrus_mmap {
        "walrus-rust 0.2.0 (SyncEach, mmap backend)"
    } else {
        "walrus-rust 0.2.0 (SyncEach, FD backend)"
    };
    for (name, threads, st) in &durable {
        let okw = if *threads == 1 { okw1 } else { okw8 };
        let label = match *name {
            "ours" => "ours (`append_durable`)",
            "okaywal" => "okaywal 0.3.1 (`begin_entry`/`write_chunk`/`commit`)",
            "raw" => "raw pwrite + fdatasync (mutex, pre-zeroed file)",
            _ => walrus_label,
        };
        let _ = writeln!(
            w,
            "| {label} | {threads} | {} | {:.2}x | {} | {} | {} | {} |",
            fmt_rate(st.rate()),
            st.rate() / okw.rate(),
            fmt_us(pct_us(&st.lat_ns, 50.0)),
            fmt_us(pct_us(&st.lat_ns, 99.0)),
            fmt_us(pct_us(&st.lat_ns, 99.9)),
            fmt_bytes(st.bytes_per_entry()),
        );
    }
    let _ = writeln!(
        w,
        "\n{DURABLE_ROUNDS} alternating rounds of {:.2} s per system (after {:.2} s warm-up each); \
         latency is per call, all writers pooled. Ours grouping: {}. For comparison, workload 1 \
         at N=1: ours `append`+`sync` {} (p50 {}), raw {} (p50 {}).",
        dround.as_secs_f64(),
        dwarm.as_secs_f64(),
        ours_grouping
            .iter()
            .map(|(t, per, syncs)| format!(
                "{t} writer(s): {per:.2} entries per msync over {syncs} msyncs"
            ))
            .collect::<Vec<_>>()
            .join(", "),
        fmt_rate(o1.rate()),
        fmt_us(pct_us(&o1.commit_ns, 50.0)),
        fmt_rate(r1.rate()),
        fmt_us(pct_us(&r1.commit_ns, 50.0)),
    );

    let _ = writeln!(w, "\n### Recovery scan\n");
    let _ = writeln!(
        w,
        "{nrec} records x {REC} B = {:.1} MiB of payload, {:.1} MiB of records with headers \
         (`open_report().record_bytes`), {:.1} MiB of segment files on disk. `Wal::open` took \
         {:.1} / {:.1} / {:.1} ms (best / median / worst of 3, page cache warm) = {:.0} MB/s \
         median, {:.0} MB/s best of record bytes; {:.0} MB/s median of payload bytes \
         (MB = 10^6 B).",
        scan_payload as f64 / 1048576.0,
        record_bytes as f64 / 1048576.0,
        on_disk as f64 / 1048576.0,
        open_secs[0] * 1e3,
        open_secs[1] * 1e3,
        open_secs[2] * 1e3,
        scan_mbps_med,
        scan_mbps_best,
        payload_mbps_med
    );

    println!("{out}");
    drop(keep);
}
