//! File-system faults injected through the `WalFs` trait, on real files: a failed msync
//! (fsyncgate), ENOSPC at preallocation (opening, `append`, `append_batch` within one segment and
//! across several), short and zero-progress writes of segment headers, EIO and short reads in the
//! recovery scan, in segment headers and in `pending()`, and EIO syncing the directory. Each
//! gives a clear typed error, the WAL never pretends failed data is durable (or appended), and it
//! reopens consistent: every record synced before the fault, nothing of the failed call.
//!
//! `tests/wal_small_fs.rs` fills a real (tmpfs / loop-mounted ext4) file system instead.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use memmap2::MmapRaw;
use settlement_wal::wal::{
    inspect, Lsn, OsFs, TailState, Wal, WalError, WalFs, WalOptions, MAX_PAYLOAD_SIZE_BYTES,
    SCAN_CHUNK_BYTES,
};

/// Wraps the real file system and fails (or shortens) chosen operations.
#[derive(Debug, Default)]
struct FaultyFs {
    fail_sync_range: AtomicBool,
    fail_allocate_enospc: AtomicBool,
    /// Preallocations that still succeed before every further one is ENOSPC (`u64::MAX`: no
    /// limit). Used when `fail_allocate_enospc` is off.
    allocations_left: AtomicU64,
    fail_sync_dir: AtomicBool,
    /// Each `write_at` writes at most this many bytes (0: no limit).
    write_max_bytes: AtomicUsize,
    /// Each `write_at` writes nothing and returns `Ok(0)`.
    write_zero: AtomicBool,
    /// Each `read_at` reads at most this many bytes (0: no limit).
    read_max_bytes: AtomicUsize,
    /// A bad sector: reads of this file whose range covers this byte fail with EIO.
    bad_byte: Mutex<Option<(PathBuf, u64)>>,
    sync_ranges: AtomicU64,
    write_calls: AtomicU64,
    read_calls: AtomicU64,
    failed_reads: AtomicU64,
}

impl FaultyFs {
    fn new() -> Arc<FaultyFs> {
        let fs = FaultyFs::default();
        fs.allocations_left.store(u64::MAX, Ordering::SeqCst);
        Arc::new(fs)
    }

    fn set_bad_byte(&self, path: &Path, offset: u64) {
        *self.bad_byte.lock().unwrap() = Some((path.to_path_buf(), offset));
    }

    fn clear_bad_byte(&self) {
        *self.bad_byte.lock().unwrap() = None;
    }
}

impl WalFs for FaultyFs {
    fn allocate(&self, file: &File, path: &Path, size_bytes: u64) -> io::Result<()> {
        if self.fail_allocate_enospc.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let left = self.allocations_left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if left != u64::MAX {
            self.allocations_left.store(left - 1, Ordering::SeqCst);
        }
        OsFs.allocate(file, path, size_bytes)
    }
    fn write_at(&self, file: &File, path: &Path, bytes: &[u8], offset: u64) -> io::Result<usize> {
        self.write_calls.fetch_add(1, Ordering::SeqCst);
        if self.write_zero.load(Ordering::SeqCst) {
            return Ok(0);
        }
        let max = self.write_max_bytes.load(Ordering::SeqCst);
        let n = if max == 0 {
            bytes.len()
        } else {
            bytes.len().min(max)
        };
        // A real (short) pwrite of the first `n` bytes.
        OsFs.write_at(file, path, &bytes[..n], offset)
    }
    fn read_at(&self, file: &File, path: &Path, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.read_calls.fetch_add(1, Ordering::SeqCst);
        if let Some((bad_path, bad)) = &*self.bad_byte.lock().unwrap() {
            if bad_path == path && (offset..offset + buf.len() as u64).contains(bad) {
                self.failed_reads.fetch_add(1, Ordering::SeqCst);
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        let max = self.read_max_bytes.load(Ordering::SeqCst);
        let n = if max == 0 {
            buf.len()
        } else {
            buf.len().min(max)
        };
        OsFs.read_at(file, path, &mut buf[..n], offset)
    }
    fn sync_file(&self, file: &File, path: &Path) -> io::Result<()> {
        OsFs.sync_file(file, path)
    }
    fn sync_range(&self, map: &MmapRaw, path: &Path, offset: usize, len: usize) -> io::Result<()> {
        self.sync_ranges.fetch_add(1, Ordering::SeqCst);
        if self.fail_sync_range.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        OsFs.sync_range(map, path, offset, len)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if self.fail_sync_dir.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        OsFs.sync_dir(dir)
    }
}

fn open_faulty(dir: &Path) -> (Wal, Arc<FaultyFs>) {
    let fs = FaultyFs::new();
    let wal = Wal::open(dir, small_options().fs(fs.clone())).unwrap();
    (wal, fs)
}

/// Every file of a directory (recursively) with its bytes: "nothing changed on disk" is
/// `snapshot(dir)` equal before and after.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else {
            out.insert(p.clone(), std::fs::read(&p).unwrap());
        }
    }
    out
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// `(lsn, payload)` of every pending entry after opening `dir` with the real file system.
fn reopen_pending(dir: &Path) -> (Wal, Vec<(Lsn, Vec<u8>)>) {
    let wal = open_small(dir);
    let pending = wal
        .pending()
        .unwrap()
        .into_iter()
        .map(|e| (e.lsn, e.payload))
        .collect();
    (wal, pending)
}

// ---- fsyncgate ---------------------------------------------------------------------------

#[test]
fn a_failed_sync_is_never_retried_as_durable_and_the_wal_reopens_consistent() {
    let dir = temp_dir();
    let (wal, fs) = open_faulty(dir.path());
    let durable = wal.append_durable(b"durable before the fault").unwrap();
    fs.fail_sync_range.store(true, Ordering::SeqCst);
    let lsn = wal.append(b"written, never durable").unwrap();
    let err = wal.sync().unwrap_err();
    assert!(matches!(err, WalError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("syncing"), "{err}");
    assert_eq!(wal.durable_lsn(), durable, "the failed LSN is not durable");
    // The fault goes away, but the WAL does not retry and pretend: every call now fails.
    fs.fail_sync_range.store(false, Ordering::SeqCst);
    let syncs_before = fs.sync_ranges.load(Ordering::SeqCst);
    assert!(matches!(wal.sync(), Err(WalError::Failed { .. })));
    assert!(matches!(wal.append(b"more"), Err(WalError::Failed { .. })));
    assert!(matches!(
        wal.append_batch(&[&b"more"[..]]),
        Err(WalError::Failed { .. })
    ));
    assert!(matches!(
        wal.commit(lsn),
        Err(WalError::InvalidCommit { .. }) | Err(WalError::Failed { .. })
    ));
    assert!(matches!(wal.checkpoint(), Err(WalError::Failed { .. })));
    assert_eq!(
        fs.sync_ranges.load(Ordering::SeqCst),
        syncs_before,
        "no msync retried"
    );
    drop(wal);
    // Reopening re-verifies from disk: the earlier durable entry is there; the WAL is consistent.
    let wal = open_small(dir.path());
    let pending: Vec<u64> = wal.pending().unwrap().iter().map(|e| e.lsn).collect();
    assert_eq!(pending[0], durable);
    assert!(wal.last_lsn() >= durable);
    wal.append_durable(b"after reopen").unwrap();
}

#[test]
fn a_failed_sync_wakes_every_waiting_writer_with_an_error() {
    let dir = temp_dir();
    let (wal, fs) = open_faulty(dir.path());
    let wal = Arc::new(wal);
    fs.fail_sync_range.store(true, Ordering::SeqCst);
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let wal = wal.clone();
            std::thread::spawn(move || wal.append_durable(&payload(i)))
        })
        .collect();
    for t in threads {
        assert!(t.join().unwrap().is_err());
    }
}

// ---- ENOSPC ------------------------------------------------------------------------------

fn assert_disk_full(err: &WalError, dir: &Path) {
    assert!(matches!(err, WalError::DiskFull { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("disk full"), "{text}");
    assert!(
        text.contains(&dir.display().to_string()),
        "names the path: {text}"
    );
    assert!(text.contains("free space"), "says what to do: {text}");
}

/// Appends and syncs entries until the active (first) segment has less than `room_bytes` left;
/// returns what was appended.
fn fill_first_segment(wal: &Wal, dir: &Path, room_bytes: usize) -> Vec<(Lsn, Vec<u8>)> {
    let mut appended = Vec::new();
    let mut i = 0u64;
    // 256 KiB segment, entries of 1..300 bytes: stop once the bytes appended leave `room_bytes`.
    while wal.stats().bytes_appended + (room_bytes as u64) < SMALL_SEGMENT_BYTES - 64 {
        let p = payload(i);
        appended.push((wal.append(&p).unwrap(), p));
        i += 1;
    }
    wal.sync().unwrap();
    assert_eq!(segment_files(dir).len(), 1, "still in the first segment");
    appended
}

#[test]
fn enospc_at_segment_preallocation_is_disk_full_with_no_partial_record() {
    let dir = temp_dir();
    let (wal, fs) = open_faulty(dir.path());
    // Fill the first segment almost completely.
    let mut last = 0;
    while segment_files(dir.path()).len() == 1 {
        fs.fail_allocate_enospc.store(true, Ordering::SeqCst);
        match wal.append(&payload(last)) {
            Ok(lsn) => last = lsn,
            Err(e) => {
                assert_disk_full(&e, dir.path());
                break;
            }
        }
    }
    assert_eq!(
        segment_files(dir.path()).len(),
        1,
        "no half-made segment left behind"
    );
    assert!(temp_files(dir.path()).is_empty());
    wal.sync().unwrap();
    // Space comes back: the same WAL carries on (nothing was half-written).
    fs.fail_allocate_enospc.store(false, Ordering::SeqCst);
    let next = wal.append(b"after space was freed").unwrap();
    assert_eq!(next, last + 1);
    wal.sync().unwrap();
    drop(wal);
    let wal = open_small(dir.path());
    assert_eq!(wal.last_lsn(), next);
    assert_eq!(wal.pending_count() as u64, next);
}

#[test]
fn enospc_in_append_leaves_nothing_and_synced_records_survive_a_reopen() {
    let dir = temp_dir();
    let (wal, fs) = open_faulty(dir.path());
    let synced = fill_first_segment(&wal, dir.path(), 200);
    fs.fail_allocate_enospc.store(true, Ordering::SeqCst);
    // Bigger than the room left: needs a new segment, which the full disk refuses.
    let err = wal.append(&[7u8; 1000]).unwrap_err();
    assert_disk_full(&err, dir.path());
    let err = wal.append_durable(&[7u8; 1000]).unwrap_err();
    assert_disk_full(&err, dir.path());
    assert_eq!(wal.last_lsn(), synced.last().unwrap().0, "nothing appended");
    // No sync, no clean shutdown of the failed call: drop and reopen with the disk still full.
    drop(wal);
    let (wal, pending) = reopen_pending(dir.path());
    assert_eq!(pending, synced, "every synced record, nothing else");
    assert!(wal.open_report().torn_tail.is_none());
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert!(temp_files(dir.path()).is_empty());
}

#[test]
fn enospc_in_append_batch_within_one_segment_leaves_no_part_of_the_batch() {
    let dir = temp_dir();
    let (wal, fs) = open_faulty(dir.path());
    let synced = fill_first_segment(&wal, dir.path(), 4000);
    fs.fail_allocate_enospc.store(true, Ordering::SeqCst);
    // The first records of the batch fit in the active segment; a later one needs a new segment.
    let batch: Vec<Vec<u8>> = (0..40).map(|i| vec![i as u8 + 1; 200]).collect();
    let stats_before = wal.stats();
    let err = wal.append_batch(&batch).unwrap_err();
    assert_disk_full(&err, dir.path());
    assert_eq!(wal.last_lsn(), synced.last().unwrap().0, "nothing appended");
    assert_eq!(wal.pending_count(), synced.len());
    assert_eq!(
        wal.stats().records_appended,
        stats_before.records_appended,
        "the undone records are not counted"
    );
    // The WAL is not failed: a smaller batch that fits still goes in, at the next LSN.
    let (first, last) = wal.append_batch(&[&b"fits"[..], &b"too"[..]]).unwrap();
    assert_eq!(first, synced.last().unwrap().0 + 1);
    wal.sync().unwrap();
    let mut expected = synced.clone();
    expected.push((first, b"fits".to_vec()));
    expected.push((last, b"too".to_vec()));
    drop(wal);
    let (wal, pending) = reopen_pending(dir.path());
    assert_eq!(pending, expected, "no record of the failed batch, ever");
    assert!(
        wal.open_report().torn_tail.is_none(),
        "the undone bytes are zeros"
    );
    drop(wal);
    // Space comes back: the whole batch goes in.
    fs.fail_allocate_enospc.store(false, Ordering::SeqCst);
    let wal = Wal::open(dir.path(), small_options().fs(fs.clone())).unwrap();
    let (first, last) = wal.append_batch(&batch).unwrap();
    assert_eq!(first, expected.last().unwrap().0 + 1);
    assert_eq!(last, first + 39);
    wal.sync().unwrap();
    assert_eq!(segment_files(dir.path()).len(), 2);
}

#[test]
fn enospc_in_append_batch_across_segments_removes_the_segments_it_made() {
    let dir = temp_dir();
    let (wal, fs) = open_faulty(dir.path());
    let synced = fill_first_segment(&wal, dir.path(), 100_000);
    // A batch of about 3 segments: the first new segment is allowed, the second is ENOSPC.
    fs.allocations_left.store(1, Ordering::SeqCst);
    let batch: Vec<Vec<u8>> = (0..12)
        .map(|i| vec![i as u8 + 1; MAX_PAYLOAD_SIZE_BYTES])
        .collect();
    let err = wal.append_batch(&batch).unwrap_err();
    assert_disk_full(&err, dir.path());
    assert_eq!(wal.last_lsn(), synced.last().unwrap().0);
    assert_eq!(
        segment_files(dir.path()).len(),
        1,
        "the segment the batch created is gone"
    );
    assert!(temp_files(dir.path()).is_empty());
    assert_eq!(wal.stats().segments_created, 1, "one segment was made");
    // Still usable, and a reopen sees exactly the synced records.
    let lsn = wal.append_durable(b"after the failed batch").unwrap();
    assert_eq!(lsn, synced.last().unwrap().0 + 1);
    let mut expected = synced;
    expected.push((lsn, b"after the failed batch".to_vec()));
    drop(wal);
    let (wal, pending) = reopen_pending(dir.path());
    assert_eq!(pending, expected);
    assert!(wal.open_report().torn_tail.is_none());
}

#[test]
fn enospc_creating_the_first_segment_fails_open_cleanly() {
    let dir = temp_dir();
    let fs = FaultyFs::new();
    fs.fail_allocate_enospc.store(true, Ordering::SeqCst);
    let err = Wal::open(dir.path(), small_options().fs(fs.clone())).unwrap_err();
    assert_disk_full(&err, dir.path());
    assert!(segment_files(dir.path()).is_empty());
    assert!(temp_files(dir.path()).is_empty());
    fs.fail_allocate_enospc.store(false, Ordering::SeqCst);
    Wal::open(dir.path(), small_options().fs(fs)).unwrap();
}

// ---- short writes ------------------------------------------------------------------------

#[test]
fn short_writes_of_segment_headers_are_continued_until_complete() {
    let dir = temp_dir();
    let fs = FaultyFs::new();
    // 7 bytes per call: a 64-byte header takes 10 calls.
    fs.write_max_bytes.store(7, Ordering::SeqCst);
    let wal = Wal::open(dir.path(), small_options().fs(fs.clone())).unwrap();
    let mut appended = Vec::new();
    let mut i = 0u64;
    while segment_files(dir.path()).len() < 3 {
        let p = payload(i);
        appended.push((wal.append(&p).unwrap(), p));
        i += 1;
    }
    wal.sync().unwrap();
    drop(wal);
    // A header taken as complete after its first 7 bytes would fail this reopen.
    let (_wal, pending) = reopen_pending(dir.path());
    assert_eq!(pending, appended);
    let headers = segment_files(dir.path()).len() as u64;
    assert!(
        fs.write_calls.load(Ordering::SeqCst) >= headers * 10,
        "the headers were written in short pieces"
    );
}

#[test]
fn a_write_that_makes_no_progress_is_an_error_not_a_silent_success() {
    let dir = temp_dir();
    let fs = FaultyFs::new();
    fs.write_zero.store(true, Ordering::SeqCst);
    let err = Wal::open(dir.path(), small_options().fs(fs.clone())).unwrap_err();
    assert!(matches!(err, WalError::Io { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("short write"), "{text}");
    assert!(text.contains("writing segment header"), "{text}");
    assert!(segment_files(dir.path()).is_empty());
    assert!(temp_files(dir.path()).is_empty());

    // The same while appending: the roll to a new segment fails, nothing of the append stays.
    fs.write_zero.store(false, Ordering::SeqCst);
    let wal = Wal::open(dir.path(), small_options().fs(fs.clone())).unwrap();
    let synced = fill_first_segment(&wal, dir.path(), 2000);
    fs.write_zero.store(true, Ordering::SeqCst);
    let batch: Vec<Vec<u8>> = (0..20).map(|i| vec![i as u8 + 1; 200]).collect();
    let err = wal.append_batch(&batch).unwrap_err();
    assert!(err.to_string().contains("short write"), "{err}");
    assert_eq!(wal.last_lsn(), synced.last().unwrap().0);
    drop(wal);
    let (_wal, pending) = reopen_pending(dir.path());
    assert_eq!(pending, synced);
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert!(temp_files(dir.path()).is_empty());
}

// ---- reads: EIO and short reads ----------------------------------------------------------

/// A WAL of several segments with pending entries and commit markers, a torn tail in the newest
/// segment (garbage after the last record) and a leftover temporary file: every kind of thing a
/// successful open would change on disk. Returns the `(lsn, payload)` of the pending entries.
fn wal_with_everything_to_repair(dir: &Path) -> Vec<(Lsn, Vec<u8>)> {
    let wal = open_small(dir);
    let mut i = 0u64;
    while segment_files(dir).len() < 4 {
        let lsn = wal.append(&payload(i)).unwrap();
        if i % 7 == 0 {
            wal.sync().unwrap();
            wal.commit(lsn).unwrap();
        }
        i += 1;
    }
    wal.sync().unwrap();
    let pending = wal
        .pending()
        .unwrap()
        .into_iter()
        .map(|e| (e.lsn, e.payload))
        .collect();
    drop(wal);
    let view = inspect(dir).unwrap();
    let newest = view.segments.last().unwrap();
    let garbage_at = newest.used_bytes + 40;
    let mut bytes = std::fs::read(&newest.path).unwrap();
    bytes[garbage_at as usize..garbage_at as usize + 5].copy_from_slice(b"torn!");
    std::fs::write(&newest.path, bytes).unwrap();
    let tmp = dir.join(format!(
        "{}.tmp",
        newest.path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(tmp, b"half-made segment").unwrap();
    assert!(inspect(dir).unwrap().is_torn_only());
    pending
}

#[test]
fn eio_in_the_recovery_scan_fails_open_naming_file_and_offset_and_changes_nothing() {
    let dir = temp_dir();
    let pending = wal_with_everything_to_repair(dir.path());
    let before = snapshot(dir.path());
    let segments = segment_files(dir.path());
    // A bad sector in the middle of the second segment, then in the newest one.
    for (victim, bad) in [(&segments[1], 100_000u64), (&segments[3], 200)] {
        let fs = FaultyFs::new();
        fs.set_bad_byte(victim, bad);
        let err = Wal::open(dir.path(), small_options().fs(fs.clone())).unwrap_err();
        let WalError::ReadFailed {
            path,
            offset,
            len_bytes,
            ..
        } = &err
        else {
            panic!("expected ReadFailed, got {err:?}");
        };
        assert_eq!(path, victim);
        assert!(
            *offset <= bad && bad < offset + *len_bytes as u64,
            "the failed read {offset}+{len_bytes} covers the bad byte {bad}"
        );
        let text = err.to_string();
        assert!(text.contains(&victim.display().to_string()), "{text}");
        assert!(text.contains(&format!("offset {offset}")), "{text}");
        assert!(text.contains("Input/output error"), "{text}");
        assert!(text.contains("nothing was changed on disk"), "{text}");
        assert!(fs.failed_reads.load(Ordering::SeqCst) >= 1);
        assert_eq!(
            snapshot(dir.path()),
            before,
            "a failed open changes nothing on disk (torn tail and temp file still there)"
        );
        // The read-only inspection, which never repairs, still works with the real disk.
        assert!(inspect(dir.path()).unwrap().is_torn_only());
    }
    // The fault is gone: the open repairs and everything synced is there.
    let (wal, got) = reopen_pending(dir.path());
    assert_eq!(got, pending);
    assert!(wal.open_report().torn_tail.is_some());
    assert_eq!(wal.open_report().removed_temp_files.len(), 1);
    wal.append_durable(b"after the disk came back").unwrap();
}

#[test]
fn eio_reading_a_segment_header_fails_open_with_a_read_error() {
    let dir = temp_dir();
    let pending = wal_with_everything_to_repair(dir.path());
    let before = snapshot(dir.path());
    let first = segment_files(dir.path())[0].clone();
    let fs = FaultyFs::new();
    fs.set_bad_byte(&first, 3);
    let err = Wal::open(dir.path(), small_options().fs(fs)).unwrap_err();
    assert!(
        matches!(&err, WalError::ReadFailed { path, offset: 0, .. } if *path == first),
        "{err:?}"
    );
    assert!(err.to_string().contains("header"), "{err}");
    assert_eq!(snapshot(dir.path()), before);
    let (_wal, got) = reopen_pending(dir.path());
    assert_eq!(got, pending);
}

#[test]
fn eio_reading_a_pending_entry_is_an_error_and_the_wal_stays_usable() {
    let dir = temp_dir();
    let fs = FaultyFs::new();
    let wal = Wal::open(dir.path(), small_options().fs(fs.clone())).unwrap();
    let (first, last) = wal.append_batch(&[&b"one"[..], b"two", b"three"]).unwrap();
    wal.sync().unwrap();
    let seg = segment_files(dir.path())[0].clone();
    // The bad byte lies in the second entry (64-byte segment header, 32-byte records).
    let bad = 64 + 32 + 4;
    fs.set_bad_byte(&seg, bad);
    let err = wal.pending().unwrap_err();
    let WalError::ReadFailed {
        path,
        offset,
        len_bytes,
        ..
    } = &err
    else {
        panic!("expected ReadFailed, got {err:?}");
    };
    assert_eq!(path, &seg);
    assert!(*offset <= bad && bad < offset + *len_bytes as u64, "{err}");
    assert!(err.to_string().contains("reading pending entry"), "{err}");
    // Appending goes on (reads failed, nothing was written wrong); once the disk is back the
    // same call works.
    let more = wal.append_durable(b"four").unwrap();
    fs.clear_bad_byte();
    let got: Vec<(Lsn, Vec<u8>)> = wal
        .pending()
        .unwrap()
        .into_iter()
        .map(|e| (e.lsn, e.payload))
        .collect();
    assert_eq!(
        got,
        vec![
            (first, b"one".to_vec()),
            (first + 1, b"two".to_vec()),
            (last, b"three".to_vec()),
            (more, b"four".to_vec()),
        ]
    );
}

#[test]
fn short_reads_are_continued_and_give_the_same_scan() {
    let dir = temp_dir();
    let pending = wal_with_everything_to_repair(dir.path());
    let copy = temp_dir();
    copy_wal(dir.path(), copy.path());
    let fs = FaultyFs::new();
    // An odd size, so pieces never line up with records or pages.
    fs.read_max_bytes.store(4093, Ordering::SeqCst);
    let wal = Wal::open(dir.path(), small_options().fs(fs.clone())).unwrap();
    let got: Vec<(Lsn, Vec<u8>)> = wal
        .pending()
        .unwrap()
        .into_iter()
        .map(|e| (e.lsn, e.payload))
        .collect();
    assert_eq!(got, pending);
    let torn = wal.open_report().torn_tail.clone().unwrap();
    let reads = fs.read_calls.load(Ordering::SeqCst);
    assert!(
        reads > 3 * (SMALL_SEGMENT_BYTES / 4093),
        "short reads happened: {reads}"
    );
    // Same result as the real file system on an identical copy.
    let (plain, plain_pending) = reopen_pending(copy.path());
    assert_eq!(plain_pending, pending);
    let plain_torn = plain.open_report().torn_tail.clone().unwrap();
    assert_eq!(
        (torn.offset, torn.zeroed_bytes),
        (plain_torn.offset, plain_torn.zeroed_bytes)
    );
    assert_eq!(wal.last_lsn(), plain.last_lsn());
}

/// Segments larger than the scan's read window: records straddle window boundaries, a torn tail
/// spans a window boundary, and damage whose next valid record lies in a later window (found
/// only by reading on) is still corruption. Record offsets are file offsets, not window ones.
#[test]
fn the_chunked_scan_sees_records_across_window_boundaries() {
    const SEGMENT: u64 = 4 * 1024 * 1024;
    assert!(
        SEGMENT as usize > 3 * SCAN_CHUNK_BYTES,
        "several windows per segment"
    );
    let options = || WalOptions::default().segment_size_bytes(SEGMENT);
    let dir = temp_dir();
    let wal = Wal::open(dir.path(), options()).unwrap();
    let mut rng = Rng::new(7);
    let mut appended = Vec::new();
    // About 3.5 segments of records of every size up to the maximum.
    while wal.stats().bytes_appended < 3 * SEGMENT + SEGMENT / 2 {
        let len = 1 + rng.range(0, MAX_PAYLOAD_SIZE_BYTES as u64) as usize;
        let p: Vec<u8> = (0..len)
            .map(|j| (j as u64 ^ rng.next_u64()) as u8)
            .collect();
        appended.push((wal.append(&p).unwrap(), p));
    }
    wal.sync().unwrap();
    drop(wal);
    let fs = FaultyFs::new();
    let wal = Wal::open(dir.path(), options().fs(fs.clone())).unwrap();
    let got: Vec<(Lsn, Vec<u8>)> = wal
        .pending()
        .unwrap()
        .into_iter()
        .map(|e| (e.lsn, e.payload))
        .collect();
    assert_eq!(got, appended);
    assert!(
        fs.read_calls.load(Ordering::SeqCst) as usize > 3 * (SEGMENT as usize / SCAN_CHUNK_BYTES)
    );
    drop(wal);

    let view = inspect(dir.path()).unwrap();
    let newest = view.segments.last().unwrap().clone();
    assert!(newest.used_bytes as usize > SCAN_CHUNK_BYTES + 100_000);
    // Garbage over a window boundary well past the end of the log: a torn tail, all of it cut.
    let torn_dir = temp_dir();
    copy_wal(dir.path(), torn_dir.path());
    let torn_path = torn_dir.path().join(newest.path.file_name().unwrap());
    let mut bytes = std::fs::read(&torn_path).unwrap();
    let from = newest.used_bytes as usize + 8;
    let to = from + SCAN_CHUNK_BYTES + 12_345;
    for b in &mut bytes[from..to] {
        *b = 0xA5;
    }
    std::fs::write(&torn_path, &bytes).unwrap();
    let wal = Wal::open(torn_dir.path(), options()).unwrap();
    let torn = wal.open_report().torn_tail.clone().unwrap();
    assert_eq!(torn.offset, newest.used_bytes);
    assert_eq!(torn.zeroed_bytes as usize, to - newest.used_bytes as usize);
    assert_eq!(wal.last_lsn(), appended.last().unwrap().0);
    drop(wal);
    assert!(inspect(torn_dir.path()).unwrap().is_clean());

    // Every record of the newest segment's first window damaged, valid records after it only in
    // later windows: corruption, not a torn tail; nothing is changed.
    let mut offsets = Vec::new();
    settlement_wal::wal::inspect_with(dir.path(), &mut |path, r| {
        if path == newest.path {
            offsets.push((r.offset, r.lsn));
        }
    })
    .unwrap();
    assert_eq!(offsets[0].0, 64, "offsets are file offsets");
    let reach = SCAN_CHUNK_BYTES + 50_000;
    let (next_valid, next_lsn) = *offsets.iter().find(|(o, _)| *o >= reach).unwrap();
    let bad_dir = temp_dir();
    copy_wal(dir.path(), bad_dir.path());
    let bad_path = bad_dir.path().join(newest.path.file_name().unwrap());
    let mut bytes = std::fs::read(&bad_path).unwrap();
    for (o, _) in offsets.iter().filter(|(o, _)| *o < reach) {
        bytes[o + 24] ^= 0x10; // the first payload byte
    }
    std::fs::write(&bad_path, &bytes).unwrap();
    let err = Wal::open(bad_dir.path(), options()).unwrap_err();
    assert!(
        matches!(&err, WalError::Corrupt { offset: 64, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&format!(
            "a valid record (LSN {next_lsn}) follows at offset {next_valid}"
        )),
        "{err}"
    );
    assert_eq!(std::fs::read(&bad_path).unwrap(), bytes);
    match inspect(bad_dir.path()).unwrap().problem {
        Some((_, TailState::Corrupt { offset: 64, .. })) => {}
        other => panic!("{other:?}"),
    }
}

// ---- directory sync ----------------------------------------------------------------------

#[test]
fn eio_syncing_the_directory_of_a_new_segment_is_an_error_and_leaves_no_temp_file() {
    let dir = temp_dir();
    let fs = FaultyFs::new();
    fs.fail_sync_dir.store(true, Ordering::SeqCst);
    let err = Wal::open(dir.path(), small_options().fs(fs)).unwrap_err();
    assert!(matches!(err, WalError::Io { .. }), "{err:?}");
    assert!(temp_files(dir.path()).is_empty());
    // A renamed-but-unsynced segment may exist; reopening must accept it.
    open_small(dir.path());
}
