//! File-system faults injected through the `WalFs` trait: a failed msync (fsyncgate), ENOSPC at
//! preallocation, and EIO syncing the directory. Each gives a clear typed error, the WAL never
//! pretends failed data is durable, and it reopens consistent.

mod common;

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use memmap2::MmapRaw;
use settlement_wal::wal::{OsFs, Wal, WalError, WalFs};

/// Wraps the real file system and fails chosen operations.
#[derive(Debug, Default)]
struct FaultyFs {
    fail_sync_range: AtomicBool,
    fail_allocate_enospc: AtomicBool,
    fail_sync_dir: AtomicBool,
    sync_ranges: AtomicU64,
}

impl WalFs for FaultyFs {
    fn allocate(&self, file: &File, path: &Path, size_bytes: u64) -> io::Result<()> {
        if self.fail_allocate_enospc.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
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
    let fs = Arc::new(FaultyFs::default());
    let wal = Wal::open(dir, small_options().fs(fs.clone())).unwrap();
    (wal, fs)
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
                assert!(matches!(e, WalError::DiskFull { .. }), "{e:?}");
                assert!(e.to_string().contains("disk full"), "{e}");
                break;
            }
        }
    }
    assert_eq!(
        segment_files(dir.path()).len(),
        1,
        "no half-made segment left behind"
    );
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
fn enospc_creating_the_first_segment_fails_open_cleanly() {
    let dir = temp_dir();
    let fs = Arc::new(FaultyFs::default());
    fs.fail_allocate_enospc.store(true, Ordering::SeqCst);
    let err = Wal::open(dir.path(), small_options().fs(fs.clone())).unwrap_err();
    assert!(matches!(err, WalError::DiskFull { .. }), "{err:?}");
    assert!(segment_files(dir.path()).is_empty());
    fs.fail_allocate_enospc.store(false, Ordering::SeqCst);
    Wal::open(dir.path(), small_options().fs(fs)).unwrap();
}

#[test]
fn eio_syncing_the_directory_of_a_new_segment_is_an_error_and_leaves_no_temp_file() {
    let dir = temp_dir();
    let fs = Arc::new(FaultyFs::default());
    fs.fail_sync_dir.store(true, Ordering::SeqCst);
    let err = Wal::open(dir.path(), small_options().fs(fs)).unwrap_err();
    assert!(matches!(err, WalError::Io { .. }), "{err:?}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A renamed-but-unsynced segment may exist; reopening must accept it.
    open_small(dir.path());
}
