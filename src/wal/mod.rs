//! The application write-ahead log.
//!
//! A WAL is a directory of preallocated, memory-mapped segment files (`<first LSN>.wal`, 20
//! digits, so name order is LSN order). Records are checksummed and salted with their segment's
//! identity (layout: [`format`], and `wal-format.md`). The API:
//!
//! - [`Wal::open`] takes the directory's writer lock and runs the recovery scan: every checksum
//!   is verified, a torn tail is cut (and logged), anything else is a [`WalError::Corrupt`].
//!   Before anything counts as durable, it fsyncs the directory and every segment (a killed
//!   predecessor's unsynced appends are still in the page cache). Every record carries the
//!   durable LSN of the moment it was written, so after a power cut a hole in
//!   never-acknowledged data (a stretch of zeros followed by intact records) is cut like a
//!   torn tail, while lost acknowledged data is refused (wal-format.md, "Torn tail versus
//!   corruption").
//! - [`Wal::append`] / [`Wal::append_batch`] copy entries into the mapping and return their
//!   LSNs; [`Wal::sync`] is the durability barrier. Concurrent callers of [`Wal::sync`] and
//!   [`Wal::append_durable`] share syncs (group commit with a leader/follower barrier).
//! - [`Wal::commit`] / [`Wal::commit_range`] write commit markers (not synced on their own: a
//!   lost marker only causes a harmless re-verification at recovery).
//! - [`Wal::pending`] yields the entries without a marker, in LSN order.
//! - [`Wal::checkpoint`] removes (or archives) segments whose entries are all committed.
//! - [`Wal::identity`] / [`Wal::rebind`]: every segment carries the WAL's random `wal_id` and
//!   the `owner_id` of the store it belongs to ([`WalIdentity`], format version 2); a segment of
//!   another WAL is refused at open ([`WalError::ForeignSegment`]).
//! - [`inspect`] is the read-only view for tools: no lock, no repair, works on a corrupt WAL.
//!
//! ```no_run
//! # fn main() -> Result<(), settlement_wal::wal::WalError> {
//! use settlement_wal::wal::{Wal, WalOptions};
//! let wal = Wal::open("./data/wal".as_ref(), WalOptions::default())?;
//! let first = wal.append(b"event 1")?;
//! let last = wal.append(b"event 2")?;
//! wal.sync()?; // both entries are durable now
//! // ... apply them to the store, then:
//! wal.commit_range(first, last)?;
//! for entry in wal.pending()? {
//!     println!("still pending: {}", entry.lsn);
//! }
//! # Ok(()) }
//! ```

mod barrier;
pub mod error;
pub mod format;
pub mod fs;
#[doc(hidden)]
pub mod fuzzing;
mod inspect;
mod prefault;
mod scan;
mod segment;
mod tracker;

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

pub use error::{Result, WalError};
pub use format::{Lsn, RecordType, WalIdentity, MAX_PAYLOAD_SIZE_BYTES};
pub use fs::{OsFs, WalFs};
pub use inspect::{inspect, inspect_with, Inspection, RecordCounts, SegmentInfo};
pub use scan::{
    TailState, ARCHIVE_DIR_NAME, LOCK_FILE_NAME, SCAN_CHUNK_BYTES, SYNC_FAILED_FILE_NAME,
};

use barrier::SyncBarrier;
use format::{
    encode_payload, record_size, CheckpointPayload, CommitPayload, DEFAULT_SEGMENT_SIZE_BYTES,
    MAX_SEGMENT_SIZE_BYTES, MIN_SEGMENT_SIZE_BYTES, RECORD_ALIGNMENT_BYTES,
    RECORD_HEADER_SIZE_BYTES, SEGMENT_HEADER_SIZE_BYTES,
};
use prefault::Prefaulter;
use segment::Segment;
use tracker::Tracker;

/// Most records one [`Wal::append_batch`] call may carry.
pub const MAX_BATCH_RECORDS: usize = 64 * 1024;

/// Pages of the active segment are prefaulted writable this far ahead of the write offset (by
/// the `wal-prefault` thread, see `prefault.rs`), so appends do not take a page fault per new
/// page (msync leaves the pages it cleaned write-protected; pages ahead of the synced range
/// stay writable). A new request goes out when the writer is half a window from its end.
const PREFAULT_WINDOW_BYTES: usize = 2 * 1024 * 1024;

/// Bytes the writer pages in itself (checked) when it reaches pages the prefault thread has
/// not populated yet.
const INLINE_POPULATE_BYTES: usize = 64 * 1024;

/// Bytes read at once for one pending entry ([`Wal::pending`], [`Wal::last_entry`]): most
/// entries fit; a larger one takes a second read of its exact size.
const ENTRY_READ_BYTES: usize = 1024;

/// Default upper bound on how long a group-commit leader waits for the writers of the previous
/// group to append again before it syncs.
pub const DEFAULT_GROUP_COMMIT_WAIT_US: u64 = 100;

/// What happens to a segment once every entry in it (and in all older ones) is committed.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Retention {
    /// Delete it (the default).
    #[default]
    Delete,
    /// Keep the newest N such segments, delete older ones.
    KeepLast(usize),
    /// Move it into this directory (relative paths are relative to the WAL directory); it must be
    /// on the same file system.
    Archive(PathBuf),
}

/// Options for [`Wal::open`].
#[derive(Clone, Debug)]
pub struct WalOptions {
    segment_size_bytes: u64,
    first_lsn: Lsn,
    group_commit_wait_us: u64,
    retention: Retention,
    identity: Option<WalIdentity>,
    fs: Arc<dyn WalFs>,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_size_bytes: DEFAULT_SEGMENT_SIZE_BYTES,
            first_lsn: 1,
            group_commit_wait_us: DEFAULT_GROUP_COMMIT_WAIT_US,
            retention: Retention::Delete,
            identity: None,
            fs: Arc::new(OsFs),
        }
    }
}

impl WalOptions {
    /// Size of each new segment file (default 64 MiB; between 256 KiB and 1 GiB, a multiple of 8).
    pub fn segment_size_bytes(mut self, size_bytes: u64) -> Self {
        self.segment_size_bytes = size_bytes;
        self
    }

    /// The LSN of the first record of a WAL created in an empty directory (default 1; ignored
    /// when the directory already holds segments). An application whose store already holds
    /// LSNs (the WAL directory was lost) starts above them, so LSNs keep increasing.
    pub fn first_lsn(mut self, lsn: Lsn) -> Self {
        self.first_lsn = lsn.max(1);
        self
    }

    /// How long (at most) a group-commit leader waits for as many writers as its previous group
    /// had before it syncs (default 100 us; 0 syncs at once). A lone writer never waits: the
    /// expected group size adapts to the number of writers actually seen.
    pub fn group_commit_wait_us(mut self, wait_us: u64) -> Self {
        self.group_commit_wait_us = wait_us.min(10_000);
        self
    }

    /// What [`Wal::checkpoint`] does with fully committed segments.
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// The identity written into new segments when the directory holds no identity yet (a new
    /// directory, or one with only format version 1 segments); ignored when it holds one (the
    /// directory's identity wins: compare [`Wal::identity`] after open, and use
    /// [`Wal::rebind`] to change the owner). Without it, such a directory gets a random
    /// `wal_id` and `owner_id` 0 (not bound). `wal_id` must not be 0.
    pub fn identity(mut self, identity: WalIdentity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The file-system layer (tests inject faults through it).
    pub fn fs(mut self, fs: Arc<dyn WalFs>) -> Self {
        self.fs = fs;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.identity.is_some_and(|id| id.wal_id == 0) {
            return Err(WalError::InvalidOptions(
                "identity: wal_id 0 is reserved (it marks a segment without identity); use a random non-zero id".into(),
            ));
        }
        let s = self.segment_size_bytes;
        if !(MIN_SEGMENT_SIZE_BYTES..=MAX_SEGMENT_SIZE_BYTES).contains(&s)
            || s % RECORD_ALIGNMENT_BYTES as u64 != 0
        {
            return Err(WalError::InvalidOptions(format!(
                "segment_size_bytes {s} must be a multiple of {RECORD_ALIGNMENT_BYTES} between {MIN_SEGMENT_SIZE_BYTES} and {MAX_SEGMENT_SIZE_BYTES}"
            )));
        }
        Ok(())
    }
}

/// An entry that has no commit marker yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingEntry {
    /// The entry's LSN.
    pub lsn: Lsn,
    /// The payload as appended.
    pub payload: Vec<u8>,
}

/// A torn tail that opening the WAL cut off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// The segment file.
    pub path: PathBuf,
    /// Offset of the first byte that was cut.
    pub offset: u64,
    /// How many bytes were zeroed.
    pub zeroed_bytes: u64,
    /// What was found at the cut.
    pub reason: String,
    /// Valid records after the cut that were removed with it (a hole in never-acknowledged
    /// data, format version 2); 0 for a plain torn tail.
    pub records_cut: u64,
    /// LSNs the cut records held, never used again (`first..=last`): an LSN-jump record at the
    /// cut offset makes the next record's LSN `last + 2` (the jump record takes `last + 1`).
    pub skipped_lsns: Option<(Lsn, Lsn)>,
}

/// What [`Wal::open`]'s recovery scan found and did.
#[derive(Clone, Debug, Default)]
pub struct OpenReport {
    /// Segment files scanned.
    pub segments: usize,
    /// Valid records scanned.
    pub records: u64,
    /// Bytes of valid records scanned (headers included).
    pub record_bytes: u64,
    /// Entries with no commit marker after the scan.
    pub pending: usize,
    /// The torn tail that was cut, if any.
    pub torn_tail: Option<TornTail>,
    /// Temporary files of interrupted segment creations that were removed.
    pub removed_temp_files: Vec<PathBuf>,
    /// Segment files fsynced at open (every inherited byte durable before the WAL counts it).
    pub synced_segments: usize,
    /// The newest segment was shorter than its header records (`(file, its length)`): it
    /// was truncated or partly copied by someone (a crash or power cut never does this), and
    /// whatever it held past that length is lost. It was extended back with zeros.
    pub short_newest_segment: Option<(PathBuf, u64)>,
    /// The previous writer failed a sync in this boot ([`SYNC_FAILED_FILE_NAME`] was there):
    /// every segment was written back, its cached pages dropped, and the scan read the medium.
    pub reverified_from_medium: bool,
    /// The LSN the next record gets.
    pub next_lsn: Lsn,
    /// Wall time of the scan and repair.
    pub duration: Duration,
}

/// Counters since open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Records appended (entries, markers and checkpoints).
    pub records_appended: u64,
    /// Bytes appended (headers and padding included).
    pub bytes_appended: u64,
    /// Durability syncs issued (msync calls of a dirty range).
    pub syncs: u64,
    /// Segments created.
    pub segments_created: u64,
    /// Segments removed or archived by checkpoints.
    pub segments_removed: u64,
}

/// What [`Wal::checkpoint`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointReport {
    /// Every entry at or below this LSN is committed.
    pub committed_watermark: Lsn,
    /// Segment files removed (or moved to the archive).
    pub removed: Vec<PathBuf>,
}

struct State {
    /// Live segments, oldest first; the last one is the active segment.
    segments: Vec<Arc<Segment>>,
    /// Offset in the active segment where the next record goes.
    write_offset: usize,
    /// Start of the active segment's range no sync has started on yet.
    sync_from: usize,
    /// Offset up to which the active segment's syncs have completed (every byte before it is
    /// durable). A roll syncs from here, not from `sync_from`: a leader's sync of the range
    /// between them may still be running, and a sealed segment must be wholly durable before
    /// a newer one exists.
    durable_offset: usize,
    /// Every LSN at or below this is durable by the WAL's own doing (at open: everything
    /// recovered; after a roll: the sealed segment), besides what the barrier published.
    durable_floor: Lsn,
    /// Offset up to which the active segment's pages were prefaulted writable.
    prefaulted_to: usize,
    next_lsn: Lsn,
    tracker: Tracker,
    failed: Option<String>,
    /// The identity of the newest segment that carries one (`None` while every segment is a
    /// format version 1 segment).
    identity: Option<WalIdentity>,
    /// What the next new segment carries: `identity` when there is one, otherwise the
    /// options' identity or a random `wal_id` chosen at open.
    next_segment_identity: WalIdentity,
}

/// An open, writable write-ahead log. `Send + Sync`: share it with an `Arc`.
pub struct Wal {
    dir: PathBuf,
    options: WalOptions,
    state: Mutex<State>,
    /// Group commit: who syncs, who waits, the durable LSN.
    barrier: SyncBarrier,
    /// Populates the pages ahead of the write offset. Started by the first prefault request
    /// after the WAL has appended one window's worth of bytes (a small WAL, as in tests and
    /// fuzzing, never starts a thread); `None` inside when it could not be spawned (inline).
    prefaulter: std::sync::OnceLock<Option<Prefaulter>>,
    last_appended_lsn: AtomicU64,
    stat_records: AtomicU64,
    stat_bytes: AtomicU64,
    stat_syncs: AtomicU64,
    stat_segments_created: AtomicU64,
    stat_segments_removed: AtomicU64,
    report: OpenReport,
    _lock: File,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .field("last_lsn", &self.last_lsn())
            .finish_non_exhaustive()
    }
}

impl Wal {
    /// Opens (or creates) the WAL in `dir` for writing: takes the writer lock, runs the recovery
    /// scan, cuts a torn tail, and fails with [`WalError::Corrupt`] on anything else.
    pub fn open(dir: &Path, options: WalOptions) -> Result<Wal> {
        options.validate()?;
        let started = Instant::now();
        std::fs::create_dir_all(dir).map_err(|e| WalError::io("creating WAL directory", dir, e))?;
        // A first look refuses a directory of other files before a lock file is put into it;
        // the listing that counts is taken again under the lock (a writer that held it until
        // now may have created or removed segments since).
        let unlocked = scan::list_dir(dir)?;
        if unlocked.segments.is_empty() && unlocked.temp_files.is_empty() {
            if let Some(first) = unlocked.foreign.first() {
                return Err(WalError::NotAWal {
                    path: dir.to_path_buf(),
                    what: "directory",
                    reason: format!(
                        "it holds other files (such as {}) and no WAL segments; use an empty or new directory",
                        first.display()
                    ),
                });
            }
        }
        let lock = acquire_lock(dir)?;
        let listing = scan::list_dir(dir)?;
        if listing.segments.is_empty() && listing.temp_files.is_empty() {
            if let Some(first) = listing.foreign.first() {
                return Err(WalError::NotAWal {
                    path: dir.to_path_buf(),
                    what: "directory",
                    reason: format!(
                        "it holds other files (such as {}) and no WAL segments; use an empty or new directory",
                        first.display()
                    ),
                });
            }
        }
        let fs = options.fs.clone();
        let mut report = OpenReport::default();

        let mut segments = Vec::with_capacity(listing.segments.len());
        for (first_lsn, path) in &listing.segments {
            // Read-only first: a failed open must not change a single byte on disk.
            segments.push(Arc::new(Segment::open(&*fs, path, *first_lsn, false)?));
        }
        // After a failed sync in this boot, the page cache may hold bytes the kernel marked
        // clean although they never reached the medium: write back what is dirty, drop the
        // cached pages and scan what the medium holds.
        let marker = dir.join(SYNC_FAILED_FILE_NAME);
        let reverify = marker.exists();
        if reverify {
            tracing::warn!(dir = %dir.display(),
                "the previous writer failed a sync: re-reading every segment from the medium");
            for seg in &segments {
                seg.sync_data(&*fs)?;
                seg.drop_cached_pages();
            }
        }
        report.reverified_from_medium = reverify;
        let mut identity = directory_identity(&segments)?;
        let next_segment_identity = identity.or(options.identity).unwrap_or(WalIdentity {
            wal_id: segment::random_wal_id(),
            owner_id: 0,
        });
        let mut tracker = Tracker::default();
        let mut write_offset = SEGMENT_HEADER_SIZE_BYTES;
        let mut next_lsn: Lsn = options.first_lsn;
        let mut record_bytes = 0u64;
        let mut torn: Option<(scan::SegmentScan, u64, String)> = None;
        let count = segments.len();
        for (i, seg) in segments.iter().enumerate() {
            let is_newest = i + 1 == count;
            if i > 0 && seg.header.first_lsn != next_lsn {
                return Err(WalError::Corrupt {
                    path: seg.path.clone(),
                    offset: 0,
                    expected_lsn: next_lsn,
                    reason: format!(
                        "LSN gap between segments: this segment starts at LSN {} but the previous one ends before LSN {next_lsn}",
                        seg.header.first_lsn
                    ),
                });
            }
            let first_lsn = seg.header.first_lsn;
            let mut visit = |r: &format::RecordView<'_>| {
                record_bytes += r.size_bytes as u64;
                tracker.apply(first_lsn, r)
            };
            // A read error (EIO) ends the open here, before anything on disk was changed.
            let result = scan::scan_segment(&*fs, seg, is_newest, &mut visit)?;
            report.records += result.records;
            next_lsn = result.next_lsn;
            write_offset = result.end_offset;
            match result.tail {
                TailState::Clean => {}
                TailState::Corrupt {
                    offset,
                    expected_lsn,
                    reason,
                } => {
                    return Err(WalError::Corrupt {
                        path: seg.path.clone(),
                        offset,
                        expected_lsn,
                        reason,
                    })
                }
                TailState::Torn { offset, ref reason } => {
                    let reason = reason.clone();
                    torn = Some((result, offset, reason));
                }
            }
        }
        // The scan passed: only now remove leftovers of interrupted segment creations, map the
        // newest segment for writing (re-extending a file that was cut short) and cut a torn tail.
        if let (Some(first_retained), Some(oldest)) = (tracker.first_retained(), segments.first()) {
            // Checkpoints remove the oldest segments first, each unlink durable before the next
            // one: the directory may still hold segments below the newest checkpoint's first
            // retained LSN (an unlink that did not reach the disk), never miss one above it.
            if oldest.header.first_lsn > first_retained {
                return Err(WalError::Corrupt {
                    path: oldest.path.clone(),
                    offset: 0,
                    expected_lsn: first_retained,
                    reason: format!(
                        "the oldest segment starts at LSN {}, but the newest checkpoint record keeps every segment from LSN {first_retained} on: the segment(s) holding LSNs {first_retained}..{} are missing (deleted or not copied)",
                        oldest.header.first_lsn,
                        oldest.header.first_lsn - 1
                    ),
                });
            }
        }
        // The scan passed: only now remove leftovers of interrupted segment creations, make
        // every inherited byte durable, map the newest segment for writing (re-extending a file
        // that was cut short) and cut a torn tail.
        for tmp in &listing.temp_files {
            tracing::warn!(path = %tmp.display(), "removing the temporary file of an interrupted segment creation");
            fs.remove_file(tmp)
                .map_err(|e| WalError::io("removing", tmp, e))?;
            report.removed_temp_files.push(tmp.clone());
        }
        // Inherited data becomes durable before anything is counted durable: a killed
        // predecessor may have appended records it never synced (the page cache still holds
        // them, and a successor's msync of its own pages does not write them), and renamed a
        // segment into place without its directory sync. Sealed segments were synced by the
        // roll that sealed them; they are synced again anyway (cheap when clean), as a
        // directory written by an older build may not have synced what it inherited.
        fs.sync_dir(dir)
            .map_err(|e| WalError::io("syncing WAL directory", dir, e))?;
        for seg in &segments {
            seg.sync_data(&*fs)?;
        }
        report.synced_segments = segments.len();
        if let Some(newest) = segments.pop() {
            if (newest.len_bytes as u64) < newest.header.segment_size_bytes {
                // Never the result of a crash or a power cut (a segment is preallocated and
                // its size synced before it gets its name): someone truncated it, or it is a
                // partial copy. What it held past its end is gone, acknowledged or not.
                tracing::error!(path = %newest.path.display(), file_bytes = newest.len_bytes,
                    segment_size_bytes = newest.header.segment_size_bytes,
                    "the newest segment is shorter than its header records (truncated or partly copied): records past its end are lost; it is extended with zeros");
                report.short_newest_segment = Some((newest.path.clone(), newest.len_bytes as u64));
            }
            let seg = Segment::open(&*fs, &newest.path, newest.header.first_lsn, true)?;
            drop(newest);
            if let Some((result, offset, reason)) = torn {
                let first_retained = segments
                    .first()
                    .map_or(seg.header.first_lsn, |s| s.header.first_lsn);
                let cut = cut_torn_tail(&*fs, &seg, &result, &tracker, first_retained)?;
                write_offset = cut.write_offset;
                if let Some((first, last)) = cut.skipped_lsns {
                    next_lsn = last + 2;
                    tracing::warn!(path = %seg.path.display(), offset, first_skipped = first,
                        last_skipped = last, "wrote an LSN-jump record: LSNs of the cut records are never used again");
                }
                tracing::warn!(path = %seg.path.display(), offset, zeroed_bytes = cut.zeroed_bytes,
                    records_cut = cut.records_cut, %reason,
                    "cut a torn tail (unacknowledged writes)");
                report.torn_tail = Some(TornTail {
                    path: seg.path.clone(),
                    offset,
                    zeroed_bytes: cut.zeroed_bytes as u64,
                    reason,
                    records_cut: cut.records_cut,
                    skipped_lsns: cut.skipped_lsns,
                });
            }
            // The writer pages in (checked) from its first write on.
            seg.populated_to
                .store(write_offset - write_offset % 4096, Ordering::Release);
            segments.push(Arc::new(seg));
        }
        if segments.is_empty() {
            let seg = Segment::create(
                &*fs,
                dir,
                next_lsn,
                options.segment_size_bytes,
                next_segment_identity,
                false,
            )
            .map_err(|e| e.error)?;
            segments.push(Arc::new(seg));
            identity = Some(next_segment_identity);
        }
        if reverify {
            // The scan passed on the medium's bytes.
            if let Err(e) = std::fs::remove_file(&marker) {
                tracing::warn!(path = %marker.display(), error = %e, "could not remove the re-verification marker");
            }
        }
        report.segments = listing.segments.len();
        report.record_bytes = record_bytes;
        report.pending = tracker.pending_count();
        report.next_lsn = next_lsn;
        report.duration = started.elapsed();
        tracing::info!(dir = %dir.display(), segments = report.segments, records = report.records,
            pending = report.pending, next_lsn, duration_ms = report.duration.as_millis() as u64,
            "opened WAL");
        let last = next_lsn - 1;
        let gather_wait = Duration::from_micros(options.group_commit_wait_us);
        Ok(Wal {
            dir: dir.to_path_buf(),
            options,
            state: Mutex::new(State {
                segments,
                write_offset,
                sync_from: write_offset,
                durable_offset: write_offset,
                durable_floor: last,
                prefaulted_to: write_offset,
                next_lsn,
                tracker,
                failed: None,
                identity,
                next_segment_identity,
            }),
            barrier: SyncBarrier::new(last, gather_wait),
            prefaulter: std::sync::OnceLock::new(),
            last_appended_lsn: AtomicU64::new(last),
            stat_records: AtomicU64::new(0),
            stat_bytes: AtomicU64::new(0),
            stat_syncs: AtomicU64::new(0),
            stat_segments_created: AtomicU64::new(0),
            stat_segments_removed: AtomicU64::new(0),
            report,
            _lock: lock,
        })
    }

    /// The WAL directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the recovery scan at open found and did.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// The identity of the newest segment that carries one: after open, what the directory
    /// says (the owner of its newest format version 2 segment); for a new directory, the
    /// options' identity (or the random one chosen). `None` while the directory holds only
    /// format version 1 segments: the first new segment (a roll, or [`Wal::rebind`]) gets the
    /// options' identity or a random one.
    pub fn identity(&self) -> Option<WalIdentity> {
        self.state.lock().identity
    }

    /// Binds this WAL to the store `owner_id`: seals the active segment (syncing what it holds)
    /// and starts a new segment with the same `wal_id` and the new `owner_id`, file and directory
    /// fsynced before it returns. Later segments carry the new owner; older ones keep theirs
    /// (the newest wins at open). A no-op when the newest segment already carries `owner_id`.
    /// An active segment without records is replaced by the new one instead of being sealed
    /// empty (same first LSN, so it has the same file name).
    pub fn rebind(&self, owner_id: u64) -> Result<WalIdentity> {
        let mut st = self.state.lock();
        if let Some(cause) = &st.failed {
            return Err(WalError::Failed {
                cause: cause.clone(),
            });
        }
        if let Some(current) = st.identity.filter(|id| id.owner_id == owner_id) {
            let active = st.segments.last().expect("an active segment");
            if active.header.identity == Some(current) {
                return Ok(current);
            }
        }
        let identity = WalIdentity {
            wal_id: st.next_segment_identity.wal_id,
            owner_id,
        };
        self.roll_with(&mut st, identity)?;
        assert_eq!(
            st.identity,
            Some(identity),
            "a roll publishes the new identity"
        );
        tracing::info!(dir = %self.dir.display(), wal_id = identity.wal_id, owner_id,
            "WAL bound to a new owner");
        Ok(identity)
    }

    /// LSN of the last record appended (0 when the WAL has never held one).
    pub fn last_lsn(&self) -> Lsn {
        self.last_appended_lsn.load(Ordering::Acquire)
    }

    /// LSN up to which every record is durable.
    pub fn durable_lsn(&self) -> Lsn {
        self.barrier.durable_lsn()
    }

    /// Every entry at or below this LSN is committed.
    pub fn committed_watermark(&self) -> Lsn {
        let st = self.state.lock();
        st.tracker.watermark(st.next_lsn)
    }

    /// The highest LSN covered by a commit marker in the retained segments or written since
    /// open (0 when there is none): always an entry's LSN. An application compares it with
    /// what its store acknowledged (a store behind it lost acknowledged writes).
    pub fn max_committed_lsn(&self) -> Lsn {
        self.state.lock().tracker.max_commit_last()
    }

    /// Counters since open.
    pub fn stats(&self) -> WalStats {
        WalStats {
            records_appended: self.stat_records.load(Ordering::Relaxed),
            bytes_appended: self.stat_bytes.load(Ordering::Relaxed),
            syncs: self.stat_syncs.load(Ordering::Relaxed),
            segments_created: self.stat_segments_created.load(Ordering::Relaxed),
            segments_removed: self.stat_segments_removed.load(Ordering::Relaxed),
        }
    }

    /// Appends one entry and returns its LSN. Not durable until a [`Wal::sync`] returns.
    pub fn append(&self, payload: &[u8]) -> Result<Lsn> {
        check_payload(payload)?;
        let mut st = self.state.lock();
        self.append_locked(&mut st, RecordType::Entry, payload)
    }

    /// Appends entries in order under one lock and returns the LSN of the first and last (they
    /// are consecutive). One [`Wal::sync`] afterwards makes the whole batch durable.
    pub fn append_batch<P: AsRef<[u8]>>(&self, payloads: &[P]) -> Result<(Lsn, Lsn)> {
        if payloads.is_empty() || payloads.len() > MAX_BATCH_RECORDS {
            return Err(WalError::BatchTooLarge {
                count: payloads.len(),
                limit: MAX_BATCH_RECORDS,
            });
        }
        for p in payloads {
            check_payload(p.as_ref())?;
        }
        let mut st = self.state.lock();
        if let Some(cause) = &st.failed {
            return Err(WalError::Failed {
                cause: cause.clone(),
            });
        }
        let mark = BatchMark {
            segments: st.segments.len(),
            write_offset: st.write_offset,
            sync_from: st.sync_from,
            durable_offset: st.durable_offset,
            prefaulted_to: st.prefaulted_to,
            next_lsn: st.next_lsn,
        };
        // End of what this batch wrote into the segment that was active when it started.
        let mut first_segment_end = st.write_offset;
        let mut written = Vec::with_capacity(payloads.len());
        for p in payloads {
            match self.write_record_locked(&mut st, RecordType::Entry, p.as_ref()) {
                Ok(w) => {
                    if st.segments.len() == mark.segments {
                        first_segment_end = st.write_offset;
                    }
                    written.push(w);
                }
                Err(e) => {
                    // All or nothing: a batch that fails half-way (a full disk when a new
                    // segment is needed) leaves no record behind, not even after a reopen.
                    self.roll_back_batch(&mut st, &mark, first_segment_end);
                    return Err(e);
                }
            }
        }
        for w in &written {
            self.record_written(&mut st, w);
        }
        let first = written[0].lsn;
        let last = written[written.len() - 1].lsn;
        assert_eq!(
            last - first + 1,
            payloads.len() as u64,
            "batch LSNs are consecutive"
        );
        self.last_appended_lsn.store(last, Ordering::Release);
        Ok((first, last))
    }

    /// Appends one entry and returns once it is durable. Concurrent callers share syncs.
    pub fn append_durable(&self, payload: &[u8]) -> Result<Lsn> {
        let lsn = self.append(payload)?;
        self.sync_to(lsn)?;
        Ok(lsn)
    }

    /// The durability barrier: when it returns `Ok`, every record appended before the call is
    /// durable. Returns the durable LSN. If a sync fails, the WAL enters a failed state: the data
    /// is never assumed durable, and every later call returns [`WalError::Failed`].
    pub fn sync(&self) -> Result<Lsn> {
        self.sync_to(self.last_lsn())
    }

    /// Writes a commit marker for one entry.
    pub fn commit(&self, lsn: Lsn) -> Result<Lsn> {
        self.commit_range(lsn, lsn)
    }

    /// Writes a commit marker for entries `first_lsn..=last_lsn` and returns the marker's LSN.
    /// The range must be durable already (an entry's effect may not precede its durability, P1).
    /// Markers are not synced on their own; the next sync carries them.
    pub fn commit_range(&self, first_lsn: Lsn, last_lsn: Lsn) -> Result<Lsn> {
        let invalid = |reason: String| WalError::InvalidCommit {
            first_lsn,
            last_lsn,
            reason,
        };
        if first_lsn == 0 || first_lsn > last_lsn {
            return Err(invalid("the range is empty or starts at 0".into()));
        }
        let mut st = self.state.lock();
        if last_lsn >= st.next_lsn {
            return Err(invalid(format!(
                "LSN {last_lsn} has not been appended (next LSN is {})",
                st.next_lsn
            )));
        }
        let durable = self.barrier.durable_lsn();
        if last_lsn > durable {
            return Err(invalid(format!(
                "LSN {last_lsn} is not durable yet (durable up to {durable}); sync before committing"
            )));
        }
        let payload = encode_payload(&CommitPayload {
            first_lsn,
            last_lsn,
        })
        .expect("a commit payload always encodes");
        let marker = self.append_locked(&mut st, RecordType::Commit, &payload)?;
        st.tracker.commit_marker(first_lsn, last_lsn);
        Ok(marker)
    }

    /// Entries without a commit marker, in LSN order. Read from the files through the
    /// [`WalFs`]: a read error is a [`WalError::ReadFailed`] naming file and offset, and leaves
    /// the WAL usable (call again once the disk is back).
    pub fn pending(&self) -> Result<Vec<PendingEntry>> {
        let st = self.state.lock();
        let mut out = Vec::with_capacity(st.tracker.pending_count());
        let mut buf = Vec::new();
        for (lsn, segment_first_lsn, offset) in st.tracker.pending() {
            let seg = find_segment(&st.segments, segment_first_lsn)
                .expect("a pending entry's segment is live");
            out.push(read_entry(&*self.options.fs, seg, lsn, offset, &mut buf)?);
        }
        Ok(out)
    }

    /// The newest entry in the WAL, committed or not (`None` for a WAL that never held one, or
    /// whose segments were lost). Checkpoints always keep it.
    pub fn last_entry(&self) -> Result<Option<PendingEntry>> {
        let st = self.state.lock();
        let Some((lsn, segment_first_lsn, offset)) = st.tracker.last_entry() else {
            return Ok(None);
        };
        let Some(seg) = find_segment(&st.segments, segment_first_lsn) else {
            return Ok(None);
        };
        read_entry(&*self.options.fs, seg, lsn, offset, &mut Vec::new()).map(Some)
    }

    /// Number of entries without a commit marker.
    pub fn pending_count(&self) -> usize {
        self.state.lock().tracker.pending_count()
    }

    /// Removes (or archives, per [`Retention`]) every sealed segment whose entries, and those of all
    /// older segments, are committed. The active segment is never removed, and files are never
    /// reused. Writes a checkpoint record when it removed anything.
    pub fn checkpoint(&self) -> Result<CheckpointReport> {
        let (watermark, victims, checkpoint_lsn) = {
            let mut st = self.state.lock();
            if let Some(cause) = &st.failed {
                return Err(WalError::Failed {
                    cause: cause.clone(),
                });
            }
            let watermark = st.tracker.watermark(st.next_lsn);
            // The segment holding the newest entry is always kept, so an application can always
            // read its last entry back (`last_entry`), however many markers followed it.
            let newest_entry = st.tracker.last_entry().map_or(0, |(lsn, _, _)| lsn);
            let removable = st
                .segments
                .windows(2)
                .take_while(|w| {
                    let last_in_segment = w[1].header.first_lsn - 1;
                    last_in_segment <= watermark && last_in_segment < newest_entry
                })
                .count();
            let keep = match self.options.retention {
                Retention::KeepLast(n) => n,
                _ => 0,
            };
            let remove = removable.saturating_sub(keep);
            if remove == 0 {
                return Ok(CheckpointReport {
                    committed_watermark: watermark,
                    removed: Vec::new(),
                });
            }
            let victims: Vec<Arc<Segment>> = st.segments.drain(..remove).collect();
            let payload = encode_payload(&CheckpointPayload {
                committed_watermark: watermark,
                first_retained_lsn: st.segments[0].header.first_lsn,
            })
            .expect("a checkpoint payload always encodes");
            let lsn = self.append_locked(&mut st, RecordType::Checkpoint, &payload)?;
            (watermark, victims, lsn)
        };
        // The checkpoint record is durable before the first unlink: after a power cut the
        // directory never lacks a segment the newest durable checkpoint says it keeps, so a
        // missing segment is always detected at open.
        self.sync_to(checkpoint_lsn)?;
        let fs = &self.options.fs;
        let mut removed = Vec::with_capacity(victims.len());
        let archive = match &self.options.retention {
            Retention::Archive(to) => Some(self.dir.join(to)),
            _ => None,
        };
        if let Some(archive) = &archive {
            std::fs::create_dir_all(archive)
                .map_err(|e| WalError::io("creating archive directory", archive, e))?;
            fs.sync_dir(&self.dir)
                .map_err(|e| WalError::io("syncing WAL directory", &self.dir, e))?;
        }
        // Oldest first, each removal durable before the next: whatever a power cut keeps of
        // the victims is a run of the newest ones, so the LSN sequence between the segments
        // left stays gapless.
        for seg in victims {
            match &archive {
                Some(archive) => {
                    let to = archive.join(seg.path.file_name().expect("segment has a name"));
                    fs.rename(&seg.path, &to, false)
                        .map_err(|e| WalError::io("archiving segment", &seg.path, e))?;
                    fs.sync_dir(archive)
                        .map_err(|e| WalError::io("syncing archive directory", archive, e))?;
                }
                None => fs
                    .remove_file(&seg.path)
                    .map_err(|e| WalError::io("removing segment", &seg.path, e))?,
            }
            fs.sync_dir(&self.dir)
                .map_err(|e| WalError::io("syncing WAL directory", &self.dir, e))?;
            tracing::debug!(path = %seg.path.display(), watermark, "checkpoint released segment");
            removed.push(seg.path.clone());
            self.stat_segments_removed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(CheckpointReport {
            committed_watermark: watermark,
            removed,
        })
    }

    /// Appends one record: writes it, then records it (tracker, counters, last LSN).
    fn append_locked(
        &self,
        st: &mut State,
        record_type: RecordType,
        payload: &[u8],
    ) -> Result<Lsn> {
        let w = self.write_record_locked(st, record_type, payload)?;
        self.record_written(st, &w);
        self.last_appended_lsn.store(w.lsn, Ordering::Release);
        Ok(w.lsn)
    }

    /// The bookkeeping of a written record: entries are tracked as pending, counters move.
    fn record_written(&self, st: &mut State, w: &Written) {
        if w.record_type == RecordType::Entry {
            st.tracker.push(w.lsn, w.segment_first_lsn, w.offset as u32);
        }
        self.stat_records.fetch_add(1, Ordering::Relaxed);
        self.stat_bytes
            .fetch_add(w.size_bytes as u64, Ordering::Relaxed);
    }

    /// Undoes the records a failed [`Wal::append_batch`] wrote, so none of them is ever seen:
    /// segments it created are deleted, the bytes it wrote into the segment that was active at
    /// its start are zeroed and synced, and the position goes back to `mark`. If the undo itself fails, the WAL enters the failed state (reopening
    /// re-verifies from disk).
    fn roll_back_batch(&self, st: &mut State, mark: &BatchMark, first_segment_end: usize) {
        let fs = &self.options.fs;
        let mut problem: Option<WalError> = None;
        let created: Vec<Arc<Segment>> = st.segments.drain(mark.segments..).collect();
        for seg in &created {
            if let Err(e) = fs.remove_file(&seg.path) {
                problem.get_or_insert(WalError::io(
                    "removing the segment of a failed batch",
                    &seg.path,
                    e,
                ));
            }
        }
        if !created.is_empty() {
            if let Err(e) = fs.sync_dir(&self.dir) {
                problem.get_or_insert(WalError::io("syncing WAL directory", &self.dir, e));
            }
        }
        let seg = st.segments.last().expect("an active segment").clone();
        let len = first_segment_end - mark.write_offset;
        if len > 0 {
            // SAFETY: we hold the state lock; these bytes lie past every record readers see.
            unsafe { seg.zero(mark.write_offset, len) };
            // The records may be on disk already (the failed roll synced them first, or the
            // kernel wrote the pages back): the zeros must be durable too, or a crash would
            // bring the batch back. After a failed sync the WAL is failed anyway.
            if st.failed.is_none() {
                if let Err(e) = fs.sync_range(seg.map(), &seg.path, mark.write_offset, len) {
                    problem.get_or_insert(WalError::io(
                        "syncing the undone records of a failed batch in",
                        &seg.path,
                        e,
                    ));
                }
            }
        }
        st.write_offset = mark.write_offset;
        st.sync_from = mark.sync_from;
        st.durable_offset = mark.durable_offset.min(mark.write_offset);
        // A roll inside the batch counted the batch's records durable: they are gone again.
        st.durable_floor = st.durable_floor.min(mark.next_lsn - 1);
        st.prefaulted_to = mark.prefaulted_to;
        st.next_lsn = mark.next_lsn;
        if let Some(e) = problem {
            tracing::error!(error = %e, "could not undo a failed batch; the WAL refuses further work until reopened");
            self.fail(st, e.to_string());
        }
    }

    /// Writes one record at the write position (rolling to a new segment when it does not fit)
    /// and advances the position. The caller records it ([`Wal::record_written`]).
    fn write_record_locked(
        &self,
        st: &mut State,
        record_type: RecordType,
        payload: &[u8],
    ) -> Result<Written> {
        if let Some(cause) = &st.failed {
            return Err(WalError::Failed {
                cause: cause.clone(),
            });
        }
        let size = record_size(payload.len());
        let seg_len = st.segments.last().expect("an active segment").len_bytes;
        if st.write_offset + size > seg_len {
            self.roll(st)?;
        }
        let lsn = st.next_lsn;
        let seg = st.segments.last().expect("an active segment").clone();
        // Version 2 records carry the durable lower bound: recovery uses it to tell a hole of
        // never-acknowledged data (a power cut) from lost acknowledged data (corruption).
        // Version 1 segments (an old active segment) keep version 1 records.
        let meta = if seg.header.version >= 2 {
            let bound = self.barrier.durable_lsn().max(st.durable_floor);
            assert!(bound < lsn, "durable bound {bound} at or above LSN {lsn}");
            format::RecordMeta {
                durable_bound: Some(bound),
                lsn_jump: false,
            }
        } else {
            format::RecordMeta::default()
        };
        let header =
            format::encode_record_header_with(&seg.hasher, record_type, lsn, meta, payload);
        let offset = st.write_offset;
        // Only pages paged in with a checked populate are written: an EIO reading the page at
        // the write offset, or a file truncated under the writer, is an error here instead of
        // a SIGBUS in the copy below.
        let populated = seg.populated_to.load(Ordering::Acquire);
        if offset + size > populated {
            // Ahead of the prefault thread (or at a new segment's start): a chunk inline, so a
            // writer that catches up pays one madvise per chunk, not per record.
            let to = (offset + size)
                .max(populated + INLINE_POPULATE_BYTES)
                .min(seg.len_bytes);
            if let Err(e) = prefault::populate(&seg, populated, to) {
                let err = WalError::Io {
                    op: "paging in the next page of the active segment (a write there would raise SIGBUS: the disk failed reading it, or the file was truncated under the writer)",
                    path: seg.path.clone(),
                    source: e,
                };
                self.fail(st, err.to_string());
                return Err(err);
            }
        }
        debug_assert!(
            seg.mapped_bytes()[offset..offset + size]
                .iter()
                .all(|&b| b == 0),
            "writing over non-zero bytes"
        );
        // SAFETY: we hold the state lock; `offset..offset+size` lies past every record readers see.
        unsafe {
            seg.write(offset + RECORD_HEADER_SIZE_BYTES, payload);
            seg.write(offset, &header);
        }
        st.write_offset += size;
        st.next_lsn += 1;
        if st.write_offset + PREFAULT_WINDOW_BYTES / 2 > st.prefaulted_to {
            let from = st.prefaulted_to.max(st.write_offset);
            let to = (from + PREFAULT_WINDOW_BYTES).min(seg.len_bytes);
            if to > from {
                let busy = self.stat_bytes.load(Ordering::Relaxed) >= PREFAULT_WINDOW_BYTES as u64;
                match busy.then(|| self.prefaulter.get_or_init(Prefaulter::start)) {
                    Some(Some(p)) => p.request(seg.clone(), from, to),
                    _ => {
                        // Ahead of need; the write path checks what it needs itself.
                        let _ = prefault::populate(&seg, from, to);
                    }
                }
            }
            st.prefaulted_to = to;
        }
        Ok(Written {
            lsn,
            record_type,
            segment_first_lsn: seg.header.first_lsn,
            offset,
            size_bytes: size,
        })
    }

    /// Seals the active segment (syncing what it holds, so only the newest segment can ever have
    /// a torn tail) and starts a new one at the next LSN, with the WAL's current identity.
    fn roll(&self, st: &mut State) -> Result<()> {
        let identity = st.next_segment_identity;
        self.roll_with(st, identity)
    }

    /// [`Wal::roll`] to a segment carrying `identity` (its `wal_id` is the WAL's). An active
    /// segment without records is replaced (the new one has the same first LSN and name).
    fn roll_with(&self, st: &mut State, identity: WalIdentity) -> Result<()> {
        assert_eq!(
            identity.wal_id, st.next_segment_identity.wal_id,
            "every new segment of one WAL carries its wal_id"
        );
        let active = st.segments.last().expect("an active segment").clone();
        // From the durable offset, not from where the last sync started: a leader's sync of the
        // range between them may still be running, and the sealed segment must be wholly
        // durable before a newer segment exists (only the newest may have a torn tail).
        if st.write_offset > st.durable_offset {
            if let Err(e) =
                active.sync_appended(&*self.options.fs, st.durable_offset, st.write_offset)
            {
                let err = WalError::io("syncing sealed segment", &active.path, e);
                self.fail(st, err.to_string());
                return Err(err);
            }
            self.stat_syncs.fetch_add(1, Ordering::Relaxed);
        }
        st.durable_offset = st.write_offset;
        st.sync_from = st.write_offset;
        st.durable_floor = st.durable_floor.max(st.next_lsn - 1);
        let empty = active.header.first_lsn == st.next_lsn;
        if empty {
            assert_eq!(st.write_offset, SEGMENT_HEADER_SIZE_BYTES);
        }
        let seg = match Segment::create(
            &*self.options.fs,
            &self.dir,
            st.next_lsn,
            self.options.segment_size_bytes,
            identity,
            empty,
        ) {
            Ok(seg) => seg,
            Err(e) => {
                if e.name_taken || empty {
                    // A file of the new segment's name may be in the directory (or replaced
                    // the empty active one): appending LSN `next_lsn` to the old segment now
                    // would make the next open see two segments claiming it.
                    self.fail(st, e.error.to_string());
                }
                return Err(e.error);
            }
        };
        if empty {
            // No record in the active segment: the new file replaced it under the same name.
            st.segments.pop();
        }
        st.segments.push(Arc::new(seg));
        st.identity = Some(identity);
        st.next_segment_identity = identity;
        st.write_offset = SEGMENT_HEADER_SIZE_BYTES;
        st.sync_from = SEGMENT_HEADER_SIZE_BYTES;
        st.durable_offset = SEGMENT_HEADER_SIZE_BYTES;
        st.prefaulted_to = SEGMENT_HEADER_SIZE_BYTES;
        self.stat_segments_created.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Enters the failed state (the first cause wins) and leaves the [`SYNC_FAILED_FILE_NAME`]
    /// marker, so that the next open in this boot re-reads every segment from the medium
    /// instead of the page cache (not synced: after a reboot the cache is cold anyway).
    fn fail(&self, st: &mut State, cause: String) {
        if st.failed.is_none() {
            let marker = self.dir.join(SYNC_FAILED_FILE_NAME);
            if let Err(e) = std::fs::write(&marker, cause.as_bytes()) {
                tracing::error!(path = %marker.display(), error = %e,
                    "could not leave the marker that makes the next open re-read the WAL from the medium; drop the page cache (or reboot) before reopening");
            }
            st.failed = Some(cause);
        }
    }

    fn sync_to(&self, target: Lsn) -> Result<Lsn> {
        self.barrier.sync_to(
            target,
            || self.sync_as_leader(),
            |cause| WalError::Failed { cause },
            |e| e.to_string(),
        )
    }

    fn sync_as_leader(&self) -> Result<Lsn> {
        let (seg, from, to, end_lsn) = {
            let mut st = self.state.lock();
            if let Some(cause) = &st.failed {
                return Err(WalError::Failed {
                    cause: cause.clone(),
                });
            }
            let seg = st.segments.last().expect("an active segment").clone();
            let range = (st.sync_from, st.write_offset);
            st.sync_from = st.write_offset;
            (seg, range.0, range.1, st.next_lsn - 1)
        };
        if to > from {
            if let Err(e) = seg.sync_appended(&*self.options.fs, from, to) {
                let err = WalError::io("syncing", &seg.path, e);
                // Never retried as if durable: the WAL refuses all further work until reopened.
                self.fail(&mut self.state.lock(), err.to_string());
                return Err(err);
            }
            self.stat_syncs.fetch_add(1, Ordering::Relaxed);
        }
        let mut st = self.state.lock();
        // A concurrent sync of the same file (a roll, a batch rollback) may have consumed the
        // writeback error of a page in this range: the kernel reports it once per file. Its
        // caller recorded it here, so this sync is not reported as a success.
        if let Some(cause) = &st.failed {
            return Err(WalError::Failed {
                cause: cause.clone(),
            });
        }
        let active = st.segments.last().expect("an active segment");
        if Arc::ptr_eq(active, &seg) {
            st.durable_offset = st.durable_offset.max(to);
        }
        drop(st);
        Ok(end_lsn)
    }
}

fn check_payload(payload: &[u8]) -> Result<()> {
    if payload.is_empty() {
        return Err(WalError::EmptyPayload);
    }
    if payload.len() > MAX_PAYLOAD_SIZE_BYTES {
        return Err(WalError::RecordTooLarge {
            size_bytes: payload.len(),
            limit_bytes: MAX_PAYLOAD_SIZE_BYTES,
        });
    }
    Ok(())
}

/// Reads the entry `lsn` at `offset` of `seg` through `fs`: one read of
/// [`ENTRY_READ_BYTES`], and a second one for an entry larger than that. `buf` is reused.
fn read_entry(
    fs: &dyn WalFs,
    seg: &Segment,
    lsn: Lsn,
    offset: u32,
    buf: &mut Vec<u8>,
) -> Result<PendingEntry> {
    let offset = offset as usize;
    let available = seg.len_bytes.saturating_sub(offset);
    let mut want = ENTRY_READ_BYTES.min(available);
    loop {
        buf.resize(want, 0);
        seg.read_exact(fs, "reading pending entry from", offset, buf)?;
        match format::decode_record(buf, 0, &seg.hasher) {
            format::Decoded::Record(r) if r.lsn == lsn => {
                return Ok(PendingEntry {
                    lsn,
                    payload: r.payload.to_vec(),
                })
            }
            // Larger than the first read: read all of it (at most once more, want grows).
            format::Decoded::Invalid(format::RecordError::Truncated { needed_bytes, .. })
                if needed_bytes > want && needed_bytes <= available =>
            {
                want = format::align_up(needed_bytes).min(available);
            }
            other => {
                return Err(WalError::Corrupt {
                    path: seg.path.clone(),
                    offset: offset as u64,
                    expected_lsn: lsn,
                    reason: format!(
                        "entry no longer decodes ({other:?}): the file changed under the writer"
                    ),
                })
            }
        }
    }
}

/// What [`Wal::write_record_locked`] wrote.
struct Written {
    lsn: Lsn,
    record_type: RecordType,
    segment_first_lsn: Lsn,
    offset: usize,
    size_bytes: usize,
}

/// The write position before a [`Wal::append_batch`], to undo the batch if it fails.
struct BatchMark {
    /// Live segments before the batch (segments past this count were created by it).
    segments: usize,
    write_offset: usize,
    sync_from: usize,
    durable_offset: usize,
    prefaulted_to: usize,
    next_lsn: Lsn,
}

/// What cutting a torn tail at open did.
struct Cut {
    /// Where the next record goes.
    write_offset: usize,
    /// Bytes zeroed (the LSN-jump record, if any, was written over the first of them).
    zeroed_bytes: usize,
    /// Valid records removed with the cut.
    records_cut: u64,
    /// LSNs of the cut records that an LSN-jump record retired.
    skipped_lsns: Option<(Lsn, Lsn)>,
}

/// Cuts the torn tail (or the hole of never-acknowledged data) that the scan of the newest
/// segment `seg` found: when valid records were cut with LSNs at or above the next expected
/// one, an LSN-jump record (a checkpoint restating the watermark, flagged
/// [`format::RECORD_FLAG_LSN_JUMP`], with the LSN after the highest one cut) is written at the
/// cut and synced first, then the rest is zeroed and synced. In that order a power cut during
/// the repair leaves either the old hole (cut the same way again) or the jump record with
/// stale bytes after it (cut again, no new jump needed): no LSN seen is ever reused.
fn cut_torn_tail(
    fs: &dyn WalFs,
    seg: &Segment,
    result: &scan::SegmentScan,
    tracker: &Tracker,
    first_retained_lsn: Lsn,
) -> Result<Cut> {
    let from = result.end_offset;
    let expected = result.next_lsn;
    assert!(result.dirty_end >= from, "a torn tail ends after it starts");
    let zeroed_bytes = result.dirty_end - from;
    let mut write_offset = from;
    let mut skipped_lsns = None;
    if let Some(c) = result.cut_records.filter(|c| c.max_lsn >= expected) {
        assert!(
            seg.header.version >= 2,
            "only version 2 segments cut holes with valid records after them"
        );
        assert!(c.max_lsn - expected < format::MAX_LSN_JUMP);
        let jump_lsn = c.max_lsn + 1;
        let payload = encode_payload(&CheckpointPayload {
            committed_watermark: tracker.watermark(expected),
            first_retained_lsn,
        })
        .expect("a checkpoint payload always encodes");
        let meta = format::RecordMeta {
            durable_bound: Some(expected - 1),
            lsn_jump: true,
        };
        let header = format::encode_record_header_with(
            &seg.hasher,
            RecordType::Checkpoint,
            jump_lsn,
            meta,
            &payload,
        );
        let size = record_size(payload.len());
        // The first cut record starts at least 8 bytes after `from` and is at least
        // MIN_RECORD_SIZE_BYTES long: the 40-byte jump record ends before it does.
        assert!(from + size <= c.first.0 + format::MIN_RECORD_SIZE_BYTES);
        assert!(from + size <= seg.len_bytes);
        // SAFETY: we hold the writer lock and no reader exists yet.
        unsafe {
            seg.zero(from, size);
            seg.write(from + RECORD_HEADER_SIZE_BYTES, &payload);
            seg.write(from, &header);
        }
        fs.sync_range(seg.map(), &seg.path, from, size)
            .map_err(|e| WalError::io("syncing the LSN-jump record of", &seg.path, e))?;
        write_offset = from + size;
        skipped_lsns = Some((expected, c.max_lsn));
    }
    if result.dirty_end > write_offset {
        let len = result.dirty_end - write_offset;
        // SAFETY: we hold the writer lock and no reader exists yet.
        unsafe { seg.zero(write_offset, len) };
        fs.sync_range(seg.map(), &seg.path, write_offset, len)
            .map_err(|e| WalError::io("syncing the cut torn tail of", &seg.path, e))?;
    }
    Ok(Cut {
        write_offset,
        zeroed_bytes,
        records_cut: result.cut_records.map_or(0, |c| c.count),
        skipped_lsns,
    })
}

/// The identity of a directory's segments (oldest first): every segment with an identity
/// (format version 2) carries the same `wal_id`, or the first one that does not is a
/// [`WalError::ForeignSegment`]; the owner is the newest segment's. `None` when no segment has
/// an identity (only version 1 segments, or none).
fn directory_identity(segments: &[Arc<Segment>]) -> Result<Option<WalIdentity>> {
    let mut reference: Option<&Segment> = None;
    let mut newest = None;
    for seg in segments {
        let Some(id) = seg.header.identity else {
            continue;
        };
        match reference.and_then(|r| r.header.identity.map(|rid| (r, rid))) {
            Some((r, rid)) if rid.wal_id != id.wal_id => {
                return Err(WalError::ForeignSegment {
                    path: seg.path.clone(),
                    found_wal_id: id.wal_id,
                    reference: r.path.clone(),
                    expected_wal_id: rid.wal_id,
                })
            }
            Some(_) => {}
            None => reference = Some(seg),
        }
        newest = Some(id);
    }
    Ok(newest)
}

fn find_segment(segments: &[Arc<Segment>], first_lsn: Lsn) -> Option<&Arc<Segment>> {
    segments
        .binary_search_by_key(&first_lsn, |s| s.header.first_lsn)
        .ok()
        .map(|i| &segments[i])
}

/// Takes the exclusive writer lock of `dir` (flock on `dir/LOCK`) and records our pid in it.
fn acquire_lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE_NAME);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| WalError::io("opening lock file", &path, e))?;
    // SAFETY: plain syscall on a valid descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!("pid {pid}"),
                Err(_) => "another process".to_string(),
            };
            return Err(WalError::Locked {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        return Err(WalError::io("locking", &path, err));
    }
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| write!(file, "{}", std::process::id()))
        .map_err(|e| WalError::io("writing lock file", &path, e))?;
    Ok(file)
}
