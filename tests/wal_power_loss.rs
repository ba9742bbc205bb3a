//! Power loss on CPU, in every `cargo test` (issue 15): a [`WalFs`] that records every
//! durability point (`sync_range`, `sync_file`, `sync_dir`) and every directory change, and
//! builds "what reached the disk" at a cut: each 4 KiB page (or 512-byte sector) that differs
//! between its durable and its current version is taken from either at random, each unsynced
//! create, rename and unlink is applied or dropped at random. Thousands of seeds run
//! appends, batches, group commits from several threads, rolls, checkpoints, rebinds, SIGKILL-
//! like drops (the page cache survives) and power cuts at random durability points; after every
//! cut the WAL is opened on the image and must hold every acknowledged record, refuse nothing
//! unless acknowledged bytes were really lost (then it must refuse), and give out LSNs above
//! every LSN the image holds.
//!
//! A failing seed prints itself; `WAL_POWER_LOSS_SEED=<seed>` replays it alone with a trace
//! (`WAL_POWER_LOSS_SEEDS=<n>` changes how many seeds run). Seeds with writer threads replay
//! the same operations and disk choices, but the interleaving of the threads may differ.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use memmap2::MmapRaw;
use parking_lot::Mutex;
use settlement_wal::wal::format::{
    decode_record, decode_record_in, parse_segment_file_name, Decoded, Lsn, RecordType,
    SegmentHeader, MIN_SEGMENT_SIZE_BYTES, RECORD_ALIGNMENT_BYTES, SEGMENT_HEADER_SIZE_BYTES,
};
use settlement_wal::wal::fs::{OsFs, WalFs};
use settlement_wal::wal::{Retention, Wal, WalError, WalOptions};

const PAGE_BYTES: usize = 4096;
const SECTOR_BYTES: usize = 512;
/// Seeds run by default: a few seconds on two cores.
const DEFAULT_SEEDS: u64 = 2000;
/// Every this many seeds runs group commits from several threads.
const THREADED_EVERY: u64 = 8;

// ------------------------------------------------------------------------------------------
// The recording file system.

/// A directory change not yet made durable by `sync_dir`.
#[derive(Clone, Debug)]
enum DirOp {
    Link { name: OsString, ino: u64 },
    Unlink { name: OsString },
    Rename { from: OsString, to: OsString },
}

#[derive(Clone, Debug, Default)]
struct SimDir {
    /// Entries as the disk has them.
    durable: BTreeMap<OsString, u64>,
    /// Changes since the last `sync_dir`, in order.
    pending: Vec<DirOp>,
}

#[derive(Clone, Debug, Default)]
struct SimFile {
    /// The file's bytes as the disk has them (its durable length is this length).
    durable: Vec<u8>,
    /// The bytes of a file that was unlinked (the page cache version the image may still get).
    last_seen: Option<Vec<u8>>,
}

#[derive(Debug, Default)]
struct Sim {
    files: HashMap<u64, SimFile>,
    dirs: HashMap<PathBuf, SimDir>,
    /// Durability points and directory changes so far.
    points: u64,
    /// Freeze (cut the power) when `points` reaches this.
    cut_at: Option<u64>,
    /// The disk as it was at the cut: files and directories.
    frozen: Option<(HashMap<u64, SimFile>, HashMap<PathBuf, SimDir>)>,
    /// Sync calls that were recorded, by kind (for the mutation notes).
    sync_ranges: u64,
    sync_files: u64,
    sync_dirs: u64,
}

/// The [`WalFs`] of the harness: does the real operation on a scratch directory (no real
/// syncs: the "disk" is the model in [`Sim`]) and records what it made durable.
#[derive(Debug, Default)]
struct PowerLossFs {
    sim: Mutex<Sim>,
    /// Targeted tests: the next `sync_range` call parks here until released.
    gate: Mutex<Option<Arc<Gate>>>,
    /// Targeted tests: this many of the next `sync_range` calls fail with EIO (doing nothing).
    fail_sync_ranges: std::sync::atomic::AtomicU32,
    /// Targeted tests: this many of the next `sync_dir` calls fail with EIO (doing nothing).
    fail_sync_dirs: std::sync::atomic::AtomicU32,
}

/// A one-shot rendezvous: a `sync_range` caller parks until the test releases it.
#[derive(Debug, Default)]
struct Gate {
    entered: AtomicBool,
    released: AtomicBool,
}

impl Gate {
    fn wait_entered(&self) {
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while !self.entered.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "nobody reached the gate");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    fn release(&self) {
        self.released.store(true, Ordering::Release);
    }
}

/// Takes one from `counter` if it is not zero.
fn take_one(counter: &std::sync::atomic::AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn ino_of(path: &Path) -> io::Result<u64> {
    Ok(std::fs::symlink_metadata(path)?.ino())
}

fn read_all(file: &File) -> io::Result<Vec<u8>> {
    let len = file.metadata()?.len() as usize;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

fn split(path: &Path) -> (PathBuf, OsString) {
    (
        path.parent().expect("a parent directory").to_path_buf(),
        path.file_name().expect("a file name").to_os_string(),
    )
}

impl PowerLossFs {
    /// A file system whose disk holds exactly what `dir` holds now (an image after a cut, or a
    /// fresh directory).
    fn adopt(dir: &Path) -> Arc<PowerLossFs> {
        let fs = PowerLossFs::default();
        {
            let mut sim = fs.sim.lock();
            let mut d = SimDir::default();
            for e in std::fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                if !e.file_type().unwrap().is_file() {
                    continue;
                }
                let ino = e.metadata().unwrap().ino();
                let bytes = std::fs::read(e.path()).unwrap();
                d.durable.insert(e.file_name(), ino);
                sim.files.insert(
                    ino,
                    SimFile {
                        durable: bytes,
                        last_seen: None,
                    },
                );
            }
            sim.dirs.insert(dir.to_path_buf(), d);
        }
        Arc::new(fs)
    }

    /// [`PowerLossFs::adopt`] of an image whose files' bytes are already known.
    fn adopt_files(dir: &Path, files: &BTreeMap<OsString, Vec<u8>>) -> Arc<PowerLossFs> {
        let fs = PowerLossFs::default();
        {
            let mut sim = fs.sim.lock();
            let mut d = SimDir::default();
            for (name, bytes) in files {
                let ino = ino_of(&dir.join(name)).unwrap();
                d.durable.insert(name.clone(), ino);
                sim.files.insert(
                    ino,
                    SimFile {
                        durable: bytes.clone(),
                        last_seen: None,
                    },
                );
            }
            sim.dirs.insert(dir.to_path_buf(), d);
        }
        Arc::new(fs)
    }

    /// Counts a durability point or directory change; false when the power is (now) off.
    fn point(&self, sim: &mut Sim) -> bool {
        if sim.frozen.is_some() {
            return false;
        }
        sim.points += 1;
        if sim.cut_at.is_some_and(|at| sim.points >= at) {
            sim.frozen = Some((sim.files.clone(), sim.dirs.clone()));
            return false;
        }
        true
    }

    /// Cuts the power now (if not already).
    fn cut_now(&self) {
        let mut sim = self.sim.lock();
        if sim.frozen.is_none() {
            sim.frozen = Some((sim.files.clone(), sim.dirs.clone()));
        }
    }

    /// Cuts the power at the `n`-th durability point or directory change from now.
    fn cut_after(&self, n: u64) {
        let mut sim = self.sim.lock();
        sim.cut_at = Some(sim.points + n.max(1));
    }

    fn is_cut(&self) -> bool {
        self.sim.lock().frozen.is_some()
    }
}

impl WalFs for PowerLossFs {
    fn allocate(&self, file: &File, path: &Path, size_bytes: u64) -> io::Result<()> {
        if self.sim.lock().frozen.is_some() {
            return Err(eio());
        }
        OsFs.allocate(file, path, size_bytes)
    }

    fn write_at(&self, file: &File, path: &Path, bytes: &[u8], offset: u64) -> io::Result<usize> {
        if self.sim.lock().frozen.is_some() {
            return Err(eio());
        }
        OsFs.write_at(file, path, bytes, offset)
    }

    fn read_at(&self, file: &File, path: &Path, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        OsFs.read_at(file, path, buf, offset)
    }

    fn sync_file(&self, file: &File, _path: &Path) -> io::Result<()> {
        let mut sim = self.sim.lock();
        if !self.point(&mut sim) {
            return Err(eio());
        }
        let ino = file.metadata()?.ino();
        let bytes = read_all(file)?;
        sim.files.entry(ino).or_default().durable = bytes;
        sim.sync_files += 1;
        Ok(())
    }

    fn sync_range(&self, _map: &MmapRaw, path: &Path, offset: usize, len: usize) -> io::Result<()> {
        let gate = self.gate.lock().take();
        if let Some(gate) = gate {
            gate.entered.store(true, Ordering::Release);
            while !gate.released.load(Ordering::Acquire) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        if take_one(&self.fail_sync_ranges) {
            return Err(eio());
        }
        let mut sim = self.sim.lock();
        if !self.point(&mut sim) {
            return Err(eio());
        }
        // Exactly the synced bytes (whole records; the file's new length too, as fdatasync
        // makes it durable): bytes of the same page past the range were being written by other
        // threads and count as written back before that (a possible outcome of a real msync).
        let file = File::open(path)?;
        let cur_len = file.metadata()?.len() as usize;
        let mut range = vec![0u8; len];
        file.read_exact_at(&mut range, offset as u64)?;
        let ino = file.metadata()?.ino();
        let f = sim.files.entry(ino).or_default();
        if f.durable.len() < cur_len {
            f.durable.resize(cur_len, 0);
        }
        f.durable[offset..offset + len].copy_from_slice(&range);
        sim.sync_ranges += 1;
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if take_one(&self.fail_sync_dirs) {
            return Err(eio());
        }
        let mut sim = self.sim.lock();
        if !self.point(&mut sim) {
            return Err(eio());
        }
        let d = sim.dirs.entry(dir.to_path_buf()).or_default();
        for op in std::mem::take(&mut d.pending) {
            apply(&mut d.durable, &op);
        }
        sim.sync_dirs += 1;
        Ok(())
    }

    fn create_file(&self, path: &Path) -> io::Result<File> {
        let mut sim = self.sim.lock();
        if !self.point(&mut sim) {
            return Err(eio());
        }
        let file = OsFs.create_file(path)?;
        let ino = file.metadata()?.ino();
        sim.files.insert(ino, SimFile::default());
        let (dir, name) = split(path);
        sim.dirs
            .entry(dir)
            .or_default()
            .pending
            .push(DirOp::Link { name, ino });
        Ok(file)
    }

    fn rename(&self, from: &Path, to: &Path, replace: bool) -> io::Result<()> {
        let mut sim = self.sim.lock();
        if !self.point(&mut sim) {
            return Err(eio());
        }
        let ino = ino_of(from)?;
        OsFs.rename(from, to, replace)?;
        let (from_dir, from_name) = split(from);
        let (to_dir, to_name) = split(to);
        if from_dir == to_dir {
            sim.dirs
                .entry(from_dir)
                .or_default()
                .pending
                .push(DirOp::Rename {
                    from: from_name,
                    to: to_name,
                });
        } else {
            sim.dirs
                .entry(from_dir)
                .or_default()
                .pending
                .push(DirOp::Unlink { name: from_name });
            sim.dirs
                .entry(to_dir)
                .or_default()
                .pending
                .push(DirOp::Link { name: to_name, ino });
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut sim = self.sim.lock();
        if !self.point(&mut sim) {
            return Err(eio());
        }
        let ino = ino_of(path)?;
        let bytes = std::fs::read(path)?;
        OsFs.remove_file(path)?;
        sim.files.entry(ino).or_default().last_seen = Some(bytes);
        let (dir, name) = split(path);
        sim.dirs
            .entry(dir)
            .or_default()
            .pending
            .push(DirOp::Unlink { name });
        Ok(())
    }
}

/// Applies one directory change to a name -> inode map (a change that does not apply, such as
/// the rename of a name whose creation was dropped, changes nothing).
fn apply(entries: &mut BTreeMap<OsString, u64>, op: &DirOp) {
    match op {
        DirOp::Link { name, ino } => {
            entries.insert(name.clone(), *ino);
        }
        DirOp::Unlink { name } => {
            entries.remove(name);
        }
        DirOp::Rename { from, to } => {
            if let Some(ino) = entries.remove(from) {
                entries.insert(to.clone(), ino);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// What the seeds exercised (printed at the end, so a change that stops exercising something
// shows).

#[derive(Debug, Default)]
struct Stats {
    cuts: std::sync::atomic::AtomicU64,
    kills: std::sync::atomic::AtomicU64,
    torn_tails: std::sync::atomic::AtomicU64,
    holes_cut: std::sync::atomic::AtomicU64,
    lsn_jumps: std::sync::atomic::AtomicU64,
    refused_lost: std::sync::atomic::AtomicU64,
    multi_segment_images: std::sync::atomic::AtomicU64,
    torn_pages: std::sync::atomic::AtomicU64,
    dropped_dir_ops: std::sync::atomic::AtomicU64,
    group_commits: std::sync::atomic::AtomicU64,
    checkpoints_removing: std::sync::atomic::AtomicU64,
}

static STATS: Stats = Stats {
    cuts: std::sync::atomic::AtomicU64::new(0),
    kills: std::sync::atomic::AtomicU64::new(0),
    torn_tails: std::sync::atomic::AtomicU64::new(0),
    holes_cut: std::sync::atomic::AtomicU64::new(0),
    lsn_jumps: std::sync::atomic::AtomicU64::new(0),
    refused_lost: std::sync::atomic::AtomicU64::new(0),
    multi_segment_images: std::sync::atomic::AtomicU64::new(0),
    torn_pages: std::sync::atomic::AtomicU64::new(0),
    dropped_dir_ops: std::sync::atomic::AtomicU64::new(0),
    group_commits: std::sync::atomic::AtomicU64::new(0),
    checkpoints_removing: std::sync::atomic::AtomicU64::new(0),
};

fn bump(counter: &std::sync::atomic::AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

// ------------------------------------------------------------------------------------------
// Randomness.

/// xorshift64*: small, deterministic, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

// ------------------------------------------------------------------------------------------
// The image: what reached the disk.

/// The real files of `dir`, by inode, with their current (page cache) bytes.
fn current_files(dir: &Path) -> HashMap<u64, Vec<u8>> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            out.insert(
                e.metadata().unwrap().ino(),
                std::fs::read(e.path()).unwrap(),
            );
        }
    }
    out
}

/// Builds the power-loss image of `dir` (whose file system `fs` was cut) into `image`.
/// Returns a description of the choices (for the trace).
fn build_image(
    fs: &PowerLossFs,
    dir: &Path,
    image: &Path,
    rng: &mut Rng,
) -> (String, BTreeMap<OsString, Vec<u8>>) {
    build_image_with(fs, dir, image, &mut Choice::Random(rng))
}

/// How an image is chosen.
enum Choice<'a> {
    /// Each differing page and each directory change at random.
    Random(&'a mut Rng),
    /// The worst case: nothing unsynced reached the disk (every page its durable version,
    /// every unsynced directory change dropped).
    DurableOnly,
}

impl Choice<'_> {
    /// 0..n at random, or 0 for the durable-only image.
    fn below(&mut self, n: u64) -> u64 {
        match self {
            Choice::Random(rng) => rng.below(n),
            Choice::DurableOnly => 0,
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        match self {
            Choice::Random(rng) => rng.chance(percent),
            Choice::DurableOnly => false,
        }
    }
}

fn build_image_with(
    fs: &PowerLossFs,
    dir: &Path,
    image: &Path,
    rng: &mut Choice<'_>,
) -> (String, BTreeMap<OsString, Vec<u8>>) {
    let (files, dirs) = fs.sim.lock().frozen.clone().expect("the power was cut");
    let current = current_files(dir);
    let d = dirs.get(dir).cloned().unwrap_or_default();
    let mut entries = d.durable.clone();
    let mut notes = Vec::new();
    for op in &d.pending {
        if rng.chance(50) {
            apply(&mut entries, op);
            notes.push(format!("applied {op:?}"));
        } else {
            bump(&STATS.dropped_dir_ops);
            notes.push(format!("dropped {op:?}"));
        }
    }
    std::fs::create_dir_all(image).unwrap();
    let mut written = BTreeMap::new();
    for (name, ino) in &entries {
        let sim = files.get(ino).cloned().unwrap_or_default();
        let durable = sim.durable;
        let cur = current
            .get(ino)
            .cloned()
            .or(sim.last_seen)
            .unwrap_or_else(|| durable.clone());
        let len = if durable.len() == cur.len() || rng.chance(50) {
            if matches!(rng, Choice::DurableOnly) {
                durable.len()
            } else {
                cur.len()
            }
        } else {
            durable.len()
        };
        let (durable_len, current_len) = (durable.len(), cur.len());
        // Both versions at the image's length, zero-extended.
        let mut d = durable;
        d.resize(len, 0);
        let mut c = cur;
        c.resize(len, 0);
        let mut out = c.clone();
        let (mut mixed, mut torn) = (0, 0);
        for page in (0..len).step_by(PAGE_BYTES) {
            let end = (page + PAGE_BYTES).min(len);
            if d[page..end] == c[page..end] {
                continue;
            }
            mixed += 1;
            match rng.below(5) {
                // Durable version.
                0 | 1 => out[page..end].copy_from_slice(&d[page..end]),
                // Current version.
                2 | 3 => {}
                // Torn page: sector by sector.
                _ => {
                    torn += 1;
                    bump(&STATS.torn_pages);
                    for s in (page..end).step_by(SECTOR_BYTES) {
                        let se = (s + SECTOR_BYTES).min(end);
                        if rng.chance(50) {
                            out[s..se].copy_from_slice(&d[s..se]);
                        }
                    }
                }
            }
        }
        notes.push(format!(
            "{}: {len} bytes (durable {}, current {}), {mixed} unsynced page(s), {torn} torn",
            name.to_string_lossy(),
            durable_len,
            current_len
        ));
        write_sparse(&image.join(name), &out);
        written.insert(name.clone(), out);
    }
    (notes.join("\n  "), written)
}

/// Writes `bytes` to a new file at `path`, leaving zero pages as holes (tmpfs then allocates
/// nothing for them; they read as zeros).
fn write_sparse(path: &Path, bytes: &[u8]) {
    static ZEROS: [u8; PAGE_BYTES] = [0; PAGE_BYTES];
    let file = File::create(path).unwrap();
    file.set_len(bytes.len() as u64).unwrap();
    for (i, page) in bytes.chunks(PAGE_BYTES).enumerate() {
        if page != &ZEROS[..page.len()] {
            file.write_all_at(page, (i * PAGE_BYTES) as u64).unwrap();
        }
    }
}

/// Every valid record in the newest segment file of an image, at any aligned offset (the highest LSN
/// the image holds, whatever the WAL makes of it).
fn max_lsn_in(files: &BTreeMap<OsString, Vec<u8>>) -> Lsn {
    let mut max = 0;
    // Records of a sealed segment all have LSNs below the next segment's first: only the
    // newest segment can hold higher ones.
    let newest = files
        .keys()
        .filter(|n| parse_segment_file_name(&n.to_string_lossy()).is_some())
        .max();
    for (_, bytes) in files.iter().filter(|(n, _)| Some(*n) == newest) {
        let Ok(header) = SegmentHeader::decode(bytes) else {
            continue;
        };
        let hasher = header.record_hasher();
        let mut at = SEGMENT_HEADER_SIZE_BYTES;
        while at + RECORD_ALIGNMENT_BYTES <= bytes.len() {
            if bytes[at..at + RECORD_ALIGNMENT_BYTES] == [0u8; RECORD_ALIGNMENT_BYTES] {
                // Zero stretches (most of a segment) in big steps.
                static ZEROS: [u8; PAGE_BYTES] = [0; PAGE_BYTES];
                let end = (at + PAGE_BYTES).min(bytes.len());
                at = if bytes[at..end] == ZEROS[..end - at] {
                    end
                } else {
                    at + RECORD_ALIGNMENT_BYTES
                };
                continue;
            }
            if let Decoded::Record(r) = decode_record_in(bytes, at, &hasher, header.version) {
                max = max.max(r.lsn);
                at += r.size_bytes;
            } else {
                at += RECORD_ALIGNMENT_BYTES;
            }
        }
    }
    max
}

// ------------------------------------------------------------------------------------------
// The workload and its model.

/// A record the WAL was given, by LSN.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rec {
    record_type: RecordType,
    payload: Vec<u8>,
}

fn options(fs: Arc<PowerLossFs>, rng: &mut Rng) -> WalOptions {
    let retention = match rng.below(3) {
        0 => Retention::KeepLast(1),
        _ => Retention::Delete,
    };
    WalOptions::default()
        .segment_size_bytes(MIN_SEGMENT_SIZE_BYTES)
        .group_commit_wait_us(rng.below(2) * 50)
        .retention(retention)
        .fs(fs)
}

fn payload(rng: &mut Rng, tag: u64) -> Vec<u8> {
    // Mostly small records (settlement's are ~100-200 bytes), some across sectors and pages.
    let len = match rng.below(40) {
        0 => 1 + rng.below(9000) as usize,
        1..=4 => 400 + rng.below(1200) as usize,
        _ => 1 + rng.below(200) as usize,
    };
    let fill = (tag as u8) | 1;
    let mut p = vec![fill; len];
    let n = 8.min(len);
    p[..n].copy_from_slice(&tag.to_le_bytes()[..n]);
    // Zero runs, as bincode payloads have (fixed-width integers with small values).
    if len > 64 && rng.chance(50) {
        let at = rng.below(len as u64 - 32) as usize;
        p[at..at + 24].fill(0);
    }
    p
}

/// One seed's run.
struct Run {
    seed: u64,
    rng: Rng,
    trace: bool,
    root: tempfile::TempDir,
    generation: u32,
    dir: PathBuf,
    fs: Arc<PowerLossFs>,
    /// Every record the WAL holds or was given since the last cut, by LSN.
    records: BTreeMap<Lsn, Rec>,
    /// Every record at or below this was acknowledged durable.
    acked: Lsn,
    /// For each record appended since the last open: what was acknowledged durable when it
    /// was appended (the harness's own knowledge, independent of the bounds the WAL writes).
    acked_at_append: BTreeMap<Lsn, Lsn>,
    threads: bool,
    cuts: u32,
}

impl Run {
    fn new(seed: u64, trace: bool) -> Run {
        let root = scratch_dir();
        let dir = root.path().join("g0");
        std::fs::create_dir_all(&dir).unwrap();
        let fs = PowerLossFs::adopt(&dir);
        Run {
            seed,
            rng: Rng::new(seed),
            trace,
            root,
            generation: 0,
            dir,
            fs,
            records: BTreeMap::new(),
            acked: 0,
            acked_at_append: BTreeMap::new(),
            threads: seed % THREADED_EVERY == THREADED_EVERY - 1,
            cuts: 0,
        }
    }

    fn ctx(&self) -> String {
        format!(
            "seed {} generation {} (replay: WAL_POWER_LOSS_SEED={} cargo test --test wal_power_loss)",
            self.seed, self.generation, self.seed
        )
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[seed {} g{}] {}", self.seed, self.generation, what());
        }
    }

    /// Opens the WAL on the current directory and learns what it holds: every record it
    /// recovered is acknowledged from now on (the WAL counts it durable).
    fn open(&mut self) -> Result<Wal, WalError> {
        let opts = options(self.fs.clone(), &mut self.rng);
        let wal = Wal::open(&self.dir, opts)?;
        // What the WAL holds now. The newest segment is read back every time; sealed segments
        // (which the open verified record by record) are read back in one cut of four, and
        // otherwise carried over from the model (reading them costs most of a seed's time in
        // an unoptimized test build).
        let deep = self.rng.chance(25);
        let segments = segment_first_lsns(&self.dir);
        let newest_first = segments.last().copied().unwrap_or(Lsn::MAX);
        let mut held: BTreeMap<Lsn, Rec> = if deep {
            BTreeMap::new()
        } else {
            let oldest = segments.first().copied().unwrap_or(Lsn::MAX);
            self.records
                .range(oldest.min(newest_first)..newest_first)
                .map(|(l, r)| (*l, r.clone()))
                .collect()
        };
        for first in segments.iter().filter(|f| deep || **f == newest_first) {
            let path = self
                .dir
                .join(settlement_wal::wal::format::segment_file_name(*first));
            let bytes = std::fs::read(&path).unwrap();
            let header = SegmentHeader::decode(&bytes)
                .unwrap_or_else(|e| panic!("{}: {}: {e}", self.ctx(), path.display()));
            let hasher = header.record_hasher();
            let mut at = SEGMENT_HEADER_SIZE_BYTES;
            while let Decoded::Record(r) = decode_record_in(&bytes, at, &hasher, header.version) {
                held.insert(
                    r.lsn,
                    Rec {
                        record_type: r.record_type,
                        payload: r.payload.to_vec(),
                    },
                );
                at += r.size_bytes;
            }
        }
        // Records below the oldest segment were checkpointed away: keep them out of the check.
        self.records = held;
        self.acked = wal.durable_lsn();
        self.acked_at_append.clear();
        assert_eq!(
            wal.durable_lsn(),
            wal.last_lsn(),
            "{}: open counts everything durable",
            self.ctx()
        );
        Ok(wal)
    }

    /// Runs operations on `wal` until the power is cut (or `ops` operations ran).
    fn work(&mut self, wal: &Wal, ops: u32) {
        for _ in 0..ops {
            if self.fs.is_cut() {
                return;
            }
            let op = self.rng.below(100);
            let ok = match op {
                0..=34 => {
                    let tag = self.rng.next();
                    let p = payload(&mut self.rng, tag);
                    wal.append(&p).map(|lsn| {
                        self.acked_at_append.insert(lsn, self.acked);
                        self.records.insert(
                            lsn,
                            Rec {
                                record_type: RecordType::Entry,
                                payload: p,
                            },
                        );
                    })
                }
                35..=49 => {
                    let n = 2 + self.rng.below(20) as usize;
                    let ps: Vec<Vec<u8>> = (0..n)
                        .map(|_| {
                            let tag = self.rng.next();
                            payload(&mut self.rng, tag)
                        })
                        .collect();
                    wal.append_batch(&ps).map(|(first, _)| {
                        for (i, p) in ps.into_iter().enumerate() {
                            self.acked_at_append.insert(first + i as u64, self.acked);
                            self.records.insert(
                                first + i as u64,
                                Rec {
                                    record_type: RecordType::Entry,
                                    payload: p,
                                },
                            );
                        }
                    })
                }
                50..=69 => wal.sync().map(|d| self.acked = self.acked.max(d)),
                70..=79 if self.threads => self.group_commit(wal),
                70..=79 => wal.sync().map(|d| self.acked = self.acked.max(d)),
                80..=89 => self.commit_some(wal),
                90..=95 => wal.checkpoint().map(|r| {
                    if !r.removed.is_empty() {
                        bump(&STATS.checkpoints_removing);
                    }
                    self.acked = self.acked.max(wal.durable_lsn());
                    self.log(|| format!("checkpoint removed {}", r.removed.len()));
                }),
                _ => wal
                    .rebind(self.rng.below(3))
                    .map(|id| self.log(|| format!("rebind -> {id:?}"))),
            };
            if let Err(e) = ok {
                assert!(
                    self.fs.is_cut(),
                    "{}: operation {op} failed without a power cut: {e}",
                    self.ctx()
                );
                return;
            }
        }
    }

    /// A commit marker for a durable range of entries (the store applied them).
    fn commit_some(&mut self, wal: &Wal) -> Result<(), WalError> {
        let durable = wal.durable_lsn();
        let entries: Vec<Lsn> = self
            .records
            .range(..=durable)
            .filter(|(_, r)| r.record_type == RecordType::Entry)
            .map(|(l, _)| *l)
            .collect();
        if entries.is_empty() {
            return Ok(());
        }
        let a = entries[self.rng.below(entries.len() as u64) as usize];
        let b = entries[self.rng.below(entries.len() as u64) as usize];
        let (first, last) = (a.min(b), a.max(b));
        let lsn = wal.commit_range(first, last)?;
        self.acked_at_append.insert(lsn, self.acked);
        let payload = settlement_wal::wal::format::encode_payload(
            &settlement_wal::wal::format::CommitPayload {
                first_lsn: first,
                last_lsn: last,
            },
        )
        .unwrap();
        self.records.insert(
            lsn,
            Rec {
                record_type: RecordType::Commit,
                payload,
            },
        );
        Ok(())
    }

    /// Several threads append and wait for durability at once (group commit); some of them
    /// large enough to roll segments. Errors (after a cut) end a thread.
    fn group_commit(&mut self, wal: &Wal) -> Result<(), WalError> {
        bump(&STATS.group_commits);
        let threads = 2 + self.rng.below(3) as usize;
        let per_thread = 1 + self.rng.below(12) as usize;
        let plans: Vec<Vec<Vec<u8>>> = (0..threads)
            .map(|_| {
                (0..per_thread)
                    .map(|_| {
                        let tag = self.rng.next();
                        payload(&mut self.rng, tag)
                    })
                    .collect()
            })
            .collect();
        let failed = AtomicBool::new(false);
        let got: Vec<Vec<(Lsn, Vec<u8>, Lsn)>> = std::thread::scope(|s| {
            let handles: Vec<_> = plans
                .into_iter()
                .map(|plan| {
                    let failed = &failed;
                    s.spawn(move || {
                        let mut mine = Vec::new();
                        for p in plan {
                            // Read before the append: acknowledged when it was appended.
                            let durable = wal.durable_lsn();
                            let Ok(lsn) = wal.append(&p) else {
                                failed.store(true, Ordering::Relaxed);
                                break;
                            };
                            mine.push((lsn, p, durable));
                            if wal.sync().is_err() {
                                failed.store(true, Ordering::Relaxed);
                                break;
                            }
                        }
                        mine
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (lsn, p, durable) in got.into_iter().flatten() {
            self.acked_at_append.insert(lsn, durable);
            self.records.insert(
                lsn,
                Rec {
                    record_type: RecordType::Entry,
                    payload: p,
                },
            );
        }
        // Only successful syncs move the durable LSN, and after a cut none succeeds.
        self.acked = self.acked.max(wal.durable_lsn());
        if failed.load(Ordering::Relaxed) {
            return Err(WalError::Failed {
                cause: "a writer thread saw an error".into(),
            });
        }
        Ok(())
    }

    /// Cuts the power (now or at a random later point of the next operations), builds the
    /// image, opens it and checks it.
    fn power_cut(&mut self, wal: Wal) {
        if !self.fs.is_cut() {
            if self.rng.chance(30) {
                self.fs.cut_now();
            } else {
                self.fs.cut_after(1 + self.rng.below(12));
                let ops = 5 + self.rng.below(40) as u32;
                self.work(&wal, ops);
                self.fs.cut_now();
            }
        }
        self.acked = self.acked.max(wal.durable_lsn());
        drop(wal);
        self.cuts += 1;
        self.generation += 1;
        let image = self.root.path().join(format!("g{}", self.generation));
        let (notes, mut files) = build_image(&self.fs, &self.dir, &image, &mut self.rng);
        self.log(|| {
            format!(
                "power cut, acknowledged up to LSN {}; image:\n  {notes}",
                self.acked
            )
        });
        let seen = max_lsn_in(&files);
        bump(&STATS.cuts);
        if files
            .keys()
            .filter(|n| parse_segment_file_name(&n.to_string_lossy()).is_some())
            .count()
            > 1
        {
            bump(&STATS.multi_segment_images);
        }
        // Sometimes lose acknowledged bytes for real, where a later record proves they were
        // acknowledged: then the open must refuse.
        let lost = if self.rng.chance(15) {
            lose_proven_acknowledged_sector(
                &image,
                &mut files,
                self.acked,
                &self.acked_at_append,
                &mut self.rng,
            )
        } else {
            None
        };
        self.dir = image;
        self.fs = PowerLossFs::adopt_files(&self.dir, &files);
        let want = self.records.clone();
        let acked = self.acked;
        let ctx = self.ctx();
        match (self.open(), lost) {
            (Err(e), Some(path)) => {
                assert!(
                    matches!(&e, WalError::Corrupt { path: p, .. } if *p == path),
                    "{ctx}: lost acknowledged bytes in {} but the open said: {e}",
                    path.display()
                );
                assert!(
                    snapshot_files(&self.dir) == files,
                    "{ctx}: a refused open changed the files"
                );
                self.log(|| format!("refused as it must: {e}"));
                bump(&STATS.refused_lost);
                // Nothing more to do with this image: start over from a fresh directory.
                self.generation += 1;
                self.dir = self.root.path().join(format!("g{}", self.generation));
                std::fs::create_dir_all(&self.dir).unwrap();
                self.fs = PowerLossFs::adopt(&self.dir);
                self.records.clear();
                self.acked = 0;
                self.next_generation();
            }
            (Err(e), None) => panic!(
                "{ctx}: the open refused an image that lost nothing acknowledged (acknowledged up to LSN {acked}): {e}"
            ),
            (Ok(wal), Some(path)) => panic!(
                "{ctx}: acknowledged bytes of {} were lost (a later record proves it) but the open succeeded: {:?}",
                path.display(),
                wal.open_report().torn_tail
            ),
            (Ok(wal), None) => {
                // Records of segments a checkpoint removed are not in the WAL any more.
                let oldest = segment_first_lsns(&self.dir).first().copied().unwrap_or(1);
                for (lsn, rec) in want.range(oldest..).take_while(|(l, _)| **l <= acked) {
                    let got = self.records.get(lsn);
                    assert!(
                        got == Some(rec),
                        "{ctx}: acknowledged LSN {lsn} ({:?}, {} bytes) is {} after the cut (torn tail cut: {:?})",
                        rec.record_type,
                        rec.payload.len(),
                        if got.is_some() { "different" } else { "missing" },
                        wal.open_report().torn_tail
                    );
                }
                assert!(
                    wal.last_lsn() + 1 > seen,
                    "{ctx}: the next LSN {} is not above LSN {seen} that the image holds",
                    wal.last_lsn() + 1
                );
                if let Some(t) = &wal.open_report().torn_tail {
                    bump(&STATS.torn_tails);
                    if t.records_cut > 0 {
                        bump(&STATS.holes_cut);
                    }
                    if t.skipped_lsns.is_some() {
                        bump(&STATS.lsn_jumps);
                    }
                    self.log(|| format!("cut at {}:{}: {}", t.path.display(), t.offset, t.reason));
                }
                self.next_generation_with(wal);
            }
        }
    }

    fn next_generation(&mut self) {
        let wal = self
            .open()
            .unwrap_or_else(|e| panic!("{}: open of a fresh directory: {e}", self.ctx()));
        self.next_generation_with(wal);
    }

    /// Goes on with `wal`: work, then a SIGKILL-like drop or a power cut.
    fn next_generation_with(&mut self, wal: Wal) {
        if self.cuts >= 3 {
            return;
        }
        let ops = 10 + self.rng.below(50) as u32;
        self.work(&wal, ops);
        if self.fs.is_cut() {
            return self.power_cut(wal);
        }
        if self.rng.chance(40) {
            // SIGKILL: the process dies, the page cache (the real files) stays; what the
            // disk has stays what was synced. The next open must make inherited bytes durable.
            self.acked = self.acked.max(wal.durable_lsn());
            drop(wal);
            self.log(|| "SIGKILL-like drop and reopen".into());
            bump(&STATS.kills);
            let wal = self
                .open()
                .unwrap_or_else(|e| panic!("{}: reopen after a drop: {e}", self.ctx()));
            let ops = 5 + self.rng.below(30) as u32;
            self.work(&wal, ops);
            return self.power_cut(wal);
        }
        self.power_cut(wal);
    }
}

fn segment_first_lsns(dir: &Path) -> Vec<Lsn> {
    let mut v: Vec<Lsn> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| parse_segment_file_name(&e.unwrap().file_name().to_string_lossy()))
        .collect();
    v.sort();
    v
}

fn snapshot_files(dir: &Path) -> BTreeMap<OsString, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file() && e.file_name() != "LOCK")
        .map(|e| (e.file_name(), std::fs::read(e.path()).unwrap()))
        .collect()
}

/// Zeroes the sector holding the header of an acknowledged record of the newest segment when a
/// record in a later sector was appended after it was acknowledged (so its loss is provable);
/// returns that segment.
fn lose_proven_acknowledged_sector(
    image: &Path,
    files: &mut BTreeMap<OsString, Vec<u8>>,
    acked: Lsn,
    acked_at_append: &BTreeMap<Lsn, Lsn>,
    rng: &mut Rng,
) -> Option<PathBuf> {
    let lsns = segment_first_lsns(image);
    let name = OsString::from(settlement_wal::wal::format::segment_file_name(
        *lsns.last()?,
    ));
    let newest = image.join(&name);
    let bytes = files.get_mut(&name)?;
    let header = SegmentHeader::decode(bytes).ok()?;
    let hasher = header.record_hasher();
    let mut recs = Vec::new();
    let mut at = SEGMENT_HEADER_SIZE_BYTES;
    while let Decoded::Record(r) = decode_record(bytes, at, &hasher) {
        // The proof is the harness's: the record was appended after `lsn` was acknowledged
        // (whatever bound the WAL wrote into it).
        recs.push((
            at,
            r.size_bytes,
            r.lsn,
            acked_at_append.get(&r.lsn).copied(),
        ));
        at += r.size_bytes;
    }
    let candidates: Vec<(usize, Lsn)> = recs
        .iter()
        .filter(|(off, _, lsn, _)| {
            *lsn <= acked
                && recs.iter().any(|(o2, _, _, b)| {
                    *o2 >= (off / SECTOR_BYTES + 1) * SECTOR_BYTES && b.is_some_and(|b| b >= *lsn)
                })
        })
        .map(|(off, _, lsn, _)| (*off, *lsn))
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let (off, _) = candidates[rng.below(candidates.len() as u64) as usize];
    // Not the segment header (that would be a bad header, another error).
    let sector = (off - off % SECTOR_BYTES).max(SEGMENT_HEADER_SIZE_BYTES);
    let end = (off - off % SECTOR_BYTES) + SECTOR_BYTES;
    bytes[sector..end].fill(0);
    write_sparse(&newest, bytes);
    Some(newest)
}

/// Scratch space on tmpfs when there is one (nothing here needs a real sync).
fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() {
        shm.to_path_buf()
    } else {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
    };
    tempfile::Builder::new()
        .prefix("wal-power-loss-")
        .tempdir_in(base)
        .unwrap()
}

fn run_seed(seed: u64, trace: bool) -> (u64, u64, u64) {
    let mut run = Run::new(seed, trace);
    run.next_generation();
    let sim = run.fs.sim.lock();
    (sim.sync_ranges, sim.sync_files, sim.sync_dirs)
}

#[test]
fn every_acknowledged_record_survives_power_cuts_at_random_points() {
    if let Some(seed) = std::env::var("WAL_POWER_LOSS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run_seed(seed, true);
        return;
    }
    let seeds: u64 = std::env::var("WAL_POWER_LOSS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEEDS);
    let started = Instant::now();
    let mut syncs = (0, 0, 0);
    for seed in 0..seeds {
        let r = std::panic::catch_unwind(|| run_seed(seed, false));
        match r {
            Ok(s) => {
                syncs.0 += s.0;
                syncs.1 += s.1;
                syncs.2 += s.2;
            }
            Err(e) => {
                eprintln!(
                    "power-loss seed {seed} failed; replay it alone with WAL_POWER_LOSS_SEED={seed} cargo test --test wal_power_loss"
                );
                std::panic::resume_unwind(e);
            }
        }
    }
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    eprintln!(
        "{seeds} power-loss seeds in {:.1} s: {} cuts ({} with several segments), {} SIGKILL drops, {} group commits, {} checkpoints removing segments; images: {} torn pages, {} dropped directory changes; opens: {} torn tails cut, {} of them holes with valid records after, {} LSN jumps, {} refusals of really lost acknowledged bytes (syncs recorded in final generations: {} sync_range, {} sync_file, {} sync_dir)",
        started.elapsed().as_secs_f64(),
        n(&STATS.cuts),
        n(&STATS.multi_segment_images),
        n(&STATS.kills),
        n(&STATS.group_commits),
        n(&STATS.checkpoints_removing),
        n(&STATS.torn_pages),
        n(&STATS.dropped_dir_ops),
        n(&STATS.torn_tails),
        n(&STATS.holes_cut),
        n(&STATS.lsn_jumps),
        n(&STATS.refused_lost),
        syncs.0,
        syncs.1,
        syncs.2
    );
}

// ------------------------------------------------------------------------------------------
// Targeted tests of single mechanisms (each fails when its mechanism is taken out; see the
// notes at each).

fn small_options(fs: Arc<PowerLossFs>) -> WalOptions {
    WalOptions::default()
        .segment_size_bytes(MIN_SEGMENT_SIZE_BYTES)
        .group_commit_wait_us(0)
        .fs(fs)
}

/// Opens the durable-only image of `dir` (nothing unsynced reached the disk) in `image`.
fn open_durable_image(fs: &PowerLossFs, dir: &Path, image: &Path) -> Result<Wal, WalError> {
    fs.cut_now();
    let (_, files) = build_image_with(fs, dir, image, &mut Choice::DurableOnly);
    Wal::open(
        image,
        small_options(PowerLossFs::adopt_files(image, &files)),
    )
}

/// Appends 1 KiB entries until the WAL has created `more` new segments.
fn roll(wal: &Wal, more: u64) -> Vec<Lsn> {
    let target = wal.stats().segments_created + more;
    let mut lsns = Vec::new();
    while wal.stats().segments_created < target {
        lsns.push(wal.append(&[0x5a; 1024]).unwrap());
    }
    lsns
}

/// Issue 15 point 6: a roll while a leader's msync of the active segment is still running
/// must make the whole sealed segment durable itself (it syncs from the offset up to which
/// syncs completed, not from where the last one started). Mutation: the roll syncing from
/// `sync_from` makes this fail (the sealed segment has a hole; the open refuses).
#[test]
fn a_roll_during_a_leaders_sync_leaves_the_sealed_segment_whole() {
    let root = scratch_dir();
    let dir = root.path().join("wal");
    std::fs::create_dir_all(&dir).unwrap();
    let fs = PowerLossFs::adopt(&dir);
    let wal = Wal::open(&dir, small_options(fs.clone())).unwrap();
    let first = wal.append(b"appended before the leader's sync").unwrap();
    let gate = Arc::new(Gate::default());
    *fs.gate.lock() = Some(gate.clone());
    std::thread::scope(|s| {
        let leader = s.spawn(|| wal.sync());
        gate.wait_entered();
        // The leader took its range and is inside its msync; a writer rolls the segment.
        roll(&wal, 1);
        fs.cut_now();
        gate.release();
        assert!(
            leader.join().unwrap().is_err(),
            "the leader's sync hit the cut"
        );
    });
    drop(wal);
    let image = root.path().join("image");
    let wal = open_durable_image(&fs, &dir, &image)
        .expect("nothing acknowledged was lost: the sealed segment must be whole");
    assert!(wal.last_lsn() >= first);
    assert_eq!(
        wal.pending().unwrap()[0].payload,
        b"appended before the leader's sync"
    );
}

/// Issue 15 point 3: a sync that returns success after a concurrent sync of the same file
/// (here a roll) failed must not report success: the kernel reports a writeback error once per
/// file, and the other caller may have consumed it. Mutation: dropping the re-check of the
/// failed state after the msync makes this fail (the leader's sync returns Ok).
#[test]
fn a_leader_does_not_succeed_after_a_concurrent_sync_of_its_file_failed() {
    let root = scratch_dir();
    let dir = root.path().join("wal");
    std::fs::create_dir_all(&dir).unwrap();
    let fs = PowerLossFs::adopt(&dir);
    let wal = Wal::open(&dir, small_options(fs.clone())).unwrap();
    wal.append(b"x").unwrap();
    let gate = Arc::new(Gate::default());
    *fs.gate.lock() = Some(gate.clone());
    std::thread::scope(|s| {
        let leader = s.spawn(|| wal.sync());
        gate.wait_entered();
        // The roll's msync of the same file gets the EIO (and would consume it)...
        fs.fail_sync_ranges.store(1, Ordering::SeqCst);
        let target = wal.stats().segments_created + 1;
        let mut rolled = Ok(0);
        while wal.stats().segments_created < target && rolled.is_ok() {
            rolled = wal.append(&[1; 1024]);
        }
        assert!(rolled.is_err(), "the roll's sync failed");
        // ...and the leader's own msync then returns success.
        gate.release();
        let got = leader.join().unwrap();
        assert!(
            got.is_err(),
            "the leader reported success after the file's writeback failed: {got:?}"
        );
    });
    assert!(matches!(wal.sync(), Err(WalError::Failed { .. })));
}

/// Issue 15 point 1: a segment a killed predecessor renamed into place without the directory
/// sync is made durable at open (directory fsync). Mutation: without the directory sync at
/// open, the segment (and the record acknowledged in it) is gone from the image.
#[test]
fn a_rename_a_killed_predecessor_did_not_sync_is_made_durable_at_open() {
    let root = scratch_dir();
    let dir = root.path().join("wal");
    std::fs::create_dir_all(&dir).unwrap();
    let fs = PowerLossFs::adopt(&dir);
    let next = {
        let wal = Wal::open(&dir, small_options(fs.clone())).unwrap();
        wal.append(b"old").unwrap();
        wal.sync().unwrap();
        let identity = wal.identity().unwrap();
        let next = wal.last_lsn() + 1;
        drop(wal);
        // The predecessor's roll: a new segment created and renamed into place, killed
        // before its directory sync.
        let tmp = dir.join(format!(
            "{}.tmp",
            settlement_wal::wal::format::segment_file_name(next)
        ));
        let file = fs.create_file(&tmp).unwrap();
        fs.allocate(&file, &tmp, MIN_SEGMENT_SIZE_BYTES).unwrap();
        let header = SegmentHeader::new(next, 0x1234_5678, MIN_SEGMENT_SIZE_BYTES, identity);
        file.write_all_at(&header.encode(), 0).unwrap();
        fs.sync_file(&file, &tmp).unwrap();
        fs.rename(
            &tmp,
            &dir.join(settlement_wal::wal::format::segment_file_name(next)),
            false,
        )
        .unwrap();
        next
    };
    let wal = Wal::open(&dir, small_options(fs.clone())).unwrap();
    let lsn = wal
        .append(b"acknowledged in the inherited segment")
        .unwrap();
    assert_eq!(lsn, next);
    wal.sync().unwrap();
    drop(wal);
    let image = root.path().join("image");
    let wal = open_durable_image(&fs, &dir, &image).expect("open the image");
    assert_eq!(
        wal.last_lsn(),
        lsn,
        "the acknowledged record in the inherited segment was lost"
    );
}

/// Issue 15 point 1: records a killed predecessor appended and never synced are made durable
/// at open before the WAL counts them durable. Mutation: without the fsync of inherited
/// segments at open, the image lacks them although the WAL said they were durable.
#[test]
fn records_a_killed_predecessor_never_synced_are_durable_after_open() {
    let root = scratch_dir();
    let dir = root.path().join("wal");
    std::fs::create_dir_all(&dir).unwrap();
    let fs = PowerLossFs::adopt(&dir);
    {
        let wal = Wal::open(&dir, small_options(fs.clone())).unwrap();
        for i in 0..50u64 {
            wal.append(&i.to_le_bytes()).unwrap();
        }
        // Killed: nothing synced; the page cache keeps the records.
    }
    let wal = Wal::open(&dir, small_options(fs.clone())).unwrap();
    assert_eq!(
        wal.durable_lsn(),
        50,
        "open counts the inherited records durable"
    );
    drop(wal);
    let image = root.path().join("image");
    let wal = open_durable_image(&fs, &dir, &image).expect("open the image");
    assert_eq!(
        wal.last_lsn(),
        50,
        "inherited records were counted durable but lost"
    );
}

/// Issue 15 point 4: a segment creation that fails after its rename (the directory sync)
/// takes the new name back, so small appends go on in the old segment and the next open sees
/// no LSN gap; if taking it back fails too, the WAL refuses further work instead. Mutation:
/// without the take-back (and without failing the WAL), the reopen refuses with an LSN gap.
#[test]
fn a_segment_creation_failing_after_its_rename_leaves_a_consistent_directory() {
    for take_back_fails in [false, true] {
        let root = scratch_dir();
        let dir = root.path().join("wal");
        std::fs::create_dir_all(&dir).unwrap();
        let fs = PowerLossFs::adopt(&dir);
        let wal = Wal::open(&dir, small_options(fs.clone())).unwrap();
        // Fill the segment to just below a roll.
        let room = (MIN_SEGMENT_SIZE_BYTES as usize - SEGMENT_HEADER_SIZE_BYTES) / 1048 - 1;
        for _ in 0..room {
            wal.append(&[7; 1024]).unwrap();
        }
        fs.fail_sync_dirs
            .store(if take_back_fails { 2 } else { 1 }, Ordering::SeqCst);
        let err = wal.append(&[8; 4096]).unwrap_err();
        assert!(err.to_string().contains("syncing WAL directory"), "{err}");
        let small = wal.append(b"small");
        if take_back_fails {
            assert!(
                matches!(small, Err(WalError::Failed { .. })),
                "the new name is still taken: the WAL must stop ({small:?})"
            );
        } else {
            small.expect("the name was taken back: small appends go on");
            wal.sync().unwrap();
        }
        let last = wal.last_lsn();
        drop(wal);
        let wal = Wal::open(&dir, small_options(PowerLossFs::adopt(&dir)))
            .unwrap_or_else(|e| panic!("take-back fails: {take_back_fails}: reopen: {e}"));
        assert_eq!(wal.last_lsn(), last);
    }
}

/// Issue 15 point 5: a roll never replaces an existing file of the new segment's name.
/// Mutation: renaming with replace makes this fail (the stray file is silently replaced).
#[test]
fn a_roll_does_not_replace_an_existing_file_of_the_new_segments_name() {
    let root = scratch_dir();
    let dir = root.path().join("wal");
    std::fs::create_dir_all(&dir).unwrap();
    let wal = Wal::open(&dir, small_options(PowerLossFs::adopt(&dir))).unwrap();
    let room = (MIN_SEGMENT_SIZE_BYTES as usize - SEGMENT_HEADER_SIZE_BYTES) / 1048;
    for _ in 0..room {
        wal.append(&[7; 1024]).unwrap();
    }
    let stray = dir.join(settlement_wal::wal::format::segment_file_name(
        wal.last_lsn() + 1,
    ));
    std::fs::write(&stray, b"not ours").unwrap();
    let err = wal.append(&[8; 1024]).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&stray).unwrap(), b"not ours");
}

/// Issue 15 point 7: segments below the newest checkpoint's first retained LSN may be left
/// over (an unlink that did not reach the disk), but a missing one above it is refused.
/// Mutation: without the check, the open succeeds with the oldest segment gone.
#[test]
fn a_missing_oldest_segment_after_a_checkpoint_is_refused() {
    let root = scratch_dir();
    let dir = root.path().join("wal");
    std::fs::create_dir_all(&dir).unwrap();
    let wal = Wal::open(&dir, small_options(PowerLossFs::adopt(&dir))).unwrap();
    let lsns = roll(&wal, 4);
    wal.sync().unwrap();
    wal.commit_range(lsns[0], lsns[lsns.len() / 3]).unwrap();
    let report = wal.checkpoint().unwrap();
    assert!(
        !report.removed.is_empty(),
        "the checkpoint removed segments"
    );
    drop(wal);
    let oldest = segment_first_lsns(&dir)[0];
    let oldest_path = dir.join(settlement_wal::wal::format::segment_file_name(oldest));
    std::fs::remove_file(&oldest_path).unwrap();
    let err = Wal::open(&dir, small_options(PowerLossFs::adopt(&dir))).unwrap_err();
    match &err {
        WalError::Corrupt {
            expected_lsn,
            reason,
            ..
        } => {
            assert_eq!(*expected_lsn, oldest);
            assert!(reason.contains("missing"), "{reason}");
        }
        other => panic!("expected corruption, got {other}"),
    }
}

/// Issue 15 point 2, directly: in one group of records synced together, a lost (zero)
/// sector followed by intact records of the same group is a hole in never-acknowledged data
/// when the sync did not return; it is cut, reported with file, offset, the records cut and
/// the retired LSNs, and the next LSN goes above them. The same damage as a bit flip is
/// corruption: records missing by zeros are what a power cut leaves, flipped bits are not.
#[test]
fn a_zero_sector_in_unacknowledged_records_is_cut_and_a_bit_flip_there_is_not() {
    let root = scratch_dir();
    let dir = root.path().join("wal");
    std::fs::create_dir_all(&dir).unwrap();
    let wal = Wal::open(&dir, small_options(PowerLossFs::adopt(&dir))).unwrap();
    wal.append(b"acknowledged").unwrap();
    wal.sync().unwrap();
    let mut offsets = Vec::new();
    for i in 0..40u8 {
        wal.append(&[i | 1; 100]).unwrap();
    }
    drop(wal);
    let seg = dir.join(settlement_wal::wal::format::segment_file_name(1));
    settlement_wal::wal::inspect_with(&dir, &mut |_, r| offsets.push((r.offset, r.lsn))).unwrap();
    let original = std::fs::read(&seg).unwrap();
    let (hole_at, hole_lsn) = offsets[10];
    let sector = hole_at - hole_at % SECTOR_BYTES;
    let first_bad = offsets.iter().find(|(o, _)| o + 124 > sector).unwrap();

    let mut bytes = original.clone();
    bytes[sector..sector + SECTOR_BYTES].fill(0);
    std::fs::write(&seg, &bytes).unwrap();
    let wal = Wal::open(&dir, small_options(PowerLossFs::adopt(&dir))).unwrap();
    let torn = wal.open_report().torn_tail.clone().expect("a cut");
    assert_eq!(
        (torn.path.clone(), torn.offset as usize),
        (seg.clone(), first_bad.0)
    );
    assert!(torn.records_cut > 0, "{torn:?}");
    assert_eq!(torn.skipped_lsns, Some((first_bad.1, 41)), "{torn:?}");
    assert!(
        torn.reason.contains("never-acknowledged"),
        "{}",
        torn.reason
    );
    assert_eq!(
        wal.last_lsn(),
        42,
        "the LSN-jump record takes the LSN after the cut ones"
    );
    assert_eq!(wal.append(b"next").unwrap(), 43);
    wal.sync().unwrap();
    drop(wal);
    let wal = Wal::open(&dir, small_options(PowerLossFs::adopt(&dir))).unwrap();
    assert!(wal.open_report().torn_tail.is_none());
    assert_eq!(wal.last_lsn(), 43);
    drop(wal);

    let mut bytes = original.clone();
    bytes[hole_at + 30] ^= 0x04;
    std::fs::write(&seg, &bytes).unwrap();
    let err = Wal::open(&dir, small_options(PowerLossFs::adopt(&dir))).unwrap_err();
    assert!(
        matches!(&err, WalError::Corrupt { offset, expected_lsn, .. } if *offset as usize == hole_at && *expected_lsn == hole_lsn),
        "{err}"
    );
    assert!(
        err.to_string().contains("not what a power cut leaves"),
        "{err}"
    );
}

/// Issue 15 point 8: after a failed sync, the reopen does not trust the page cache (the kernel
/// may have marked the failed pages clean while keeping their bytes): the failed WAL leaves a
/// marker, and the next open syncs every segment, drops its cached pages and scans what the
/// medium holds, then removes the marker. Mutation: without the marker the reopen reports no
/// re-verification and this fails.
#[test]
fn a_reopen_after_a_failed_sync_rereads_the_segments_from_the_medium() {
    use settlement_wal::wal::SYNC_FAILED_FILE_NAME;
    let root = scratch_dir();
    let dir = root.path().join("wal");
    std::fs::create_dir_all(&dir).unwrap();
    let fs = PowerLossFs::adopt(&dir);
    let wal = Wal::open(&dir, small_options(fs.clone())).unwrap();
    let durable = wal.append_durable(b"durable").unwrap();
    wal.append(b"never durable").unwrap();
    fs.fail_sync_ranges.store(1, Ordering::SeqCst);
    assert!(wal.sync().is_err());
    let err = wal.sync().unwrap_err();
    assert!(
        err.to_string().contains("re-reads it from the medium"),
        "{err}"
    );
    drop(wal);
    let marker = dir.join(SYNC_FAILED_FILE_NAME);
    assert!(marker.exists(), "the failed WAL left its marker");
    let wal = Wal::open(&dir, small_options(fs.clone())).unwrap();
    assert!(wal.open_report().reverified_from_medium);
    assert!(
        !marker.exists(),
        "the marker is removed after the re-verified open"
    );
    assert!(wal.last_lsn() >= durable);
    drop(wal);
    let wal = Wal::open(&dir, small_options(fs)).unwrap();
    assert!(!wal.open_report().reverified_from_medium);
}
