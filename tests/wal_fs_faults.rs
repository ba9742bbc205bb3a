//! File-system faults injected through the `WalFs` trait, on real files: a failed msync
//! (fsyncgate), ENOSPC at preallocation (opening, `append`, `append_batch` within one segment and
//! across several), and EIO syncing the directory. Each gives a clear typed error, the WAL never
//! pretends failed data is durable (or appended), and it reopens consistent: every record synced
//! before the fault, nothing of the failed call.

mod common;

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use memmap2::MmapRaw;
use settlement_wal::wal::{Lsn, OsFs, Wal, WalError, WalFs, MAX_PAYLOAD_SIZE_BYTES};

/// Wraps the real file system and fails chosen operations.
#[derive(Debug, Default)]
struct FaultyFs {
    fail_sync_range: AtomicBool,
    fail_allocate_enospc: AtomicBool,
    /// Preallocations that still succeed before every further one is ENOSPC (`u64::MAX`: no
    /// limit). Used when `fail_allocate_enospc` is off.
    allocations_left: AtomicU64,
    fail_sync_dir: AtomicBool,
    sync_ranges: AtomicU64,
}

impl FaultyFs {
    fn new() -> Arc<FaultyFs> {
        let fs = FaultyFs::default();
        fs.allocations_left.store(u64::MAX, Ordering::SeqCst);
        Arc::new(fs)
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
    fn write_at(&self, file: &File, path: &Path, bytes: &[u8], offset: u64) -> io::Result<()> {
        OsFs.write_at(file, path, bytes, offset)
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
