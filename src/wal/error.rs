//! Errors of the write-ahead log. Each says what went wrong, where, and what to do next.

use std::io;
use std::path::PathBuf;

use super::format::Lsn;

/// Everything that can go wrong opening, writing or reading a WAL.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// An operating-system error other than a full disk.
    #[error("WAL I/O error while {op} {path}: {source}")]
    Io {
        /// What the WAL was doing ("creating segment", "syncing", ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Reading WAL bytes failed: `EIO` from a failing disk, or the file ended early. The read
    /// happened before anything was changed on disk (a failed [`super::Wal::open`] changes
    /// nothing; a failed [`super::Wal::pending`] leaves the WAL usable).
    #[error(
        "WAL read error while {op} {path} at byte offset {offset} ({len_bytes} bytes): {source}; nothing was changed on disk: check the disk (dmesg, SMART), copy the WAL directory to a healthy disk if it still reads, then open it again"
    )]
    ReadFailed {
        /// What the WAL was reading ("scanning segment", "reading pending entry", ...).
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// Byte offset in that file where the failed read started.
        offset: u64,
        /// How many bytes the failed read asked for.
        len_bytes: usize,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The disk (or quota) is full.
    #[error(
        "disk full while {op} {path}: free space on that file system (or move the WAL directory to a larger one), then open the WAL again (restart the process); nothing acknowledged as durable was lost"
    )]
    DiskFull {
        /// What the WAL was doing.
        op: &'static str,
        /// The file involved.
        path: PathBuf,
    },
    /// Another process (or another handle in this one) holds the writer lock.
    #[error(
        "WAL directory {dir} is already open for writing by {holder}; stop that writer first, or open the WAL read-only to inspect it"
    )]
    Locked {
        /// The WAL directory.
        dir: PathBuf,
        /// "pid N" when the lock file names the holder, otherwise "another process".
        holder: String,
    },
    /// A path that should be a WAL directory or segment is something else.
    #[error("{path} is not a settlement-wal {what}: {reason}")]
    NotAWal {
        /// The offending path.
        path: PathBuf,
        /// "directory" or "segment".
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A segment written by a newer (or unknown) format version.
    #[error(
        "{path}: WAL format version {found} is not supported by this build (it reads versions 1 to {supported}); use a matching settlement-wal release"
    )]
    UnsupportedVersion {
        /// The segment file.
        path: PathBuf,
        /// The version found in its header.
        found: u32,
        /// The newest version this build reads (it reads every version from 1 up to this).
        supported: u32,
    },
    /// A segment whose header carries another WAL's `wal_id` than the rest of the directory:
    /// a file of another WAL was copied or restored into this directory.
    #[error(
        "{path} belongs to another WAL: its header says wal_id {found_wal_id:#018x}, but {reference} (the oldest segment with an identity) says wal_id {expected_wal_id:#018x}; nothing was changed on disk: move the file that does not belong to this WAL out of the directory (`wal-inspect summary` prints each segment's wal_id), then open it again"
    )]
    ForeignSegment {
        /// The segment that does not match.
        path: PathBuf,
        /// The `wal_id` in its header.
        found_wal_id: u64,
        /// The segment the directory's `wal_id` was taken from.
        reference: PathBuf,
        /// The `wal_id` of the directory (of `reference`).
        expected_wal_id: u64,
    },
    /// The WAL is damaged somewhere other than a repairable torn tail.
    #[error(
        "WAL corruption in {path} at byte offset {offset} (expected LSN {expected_lsn}): {reason}; nothing was changed on disk: inspect it with `wal-inspect verify` before deciding anything"
    )]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the first bad byte or record within that file.
        offset: u64,
        /// The LSN the next valid record should have had.
        expected_lsn: Lsn,
        /// What is wrong.
        reason: String,
    },
    /// An append was larger than the record limit.
    #[error("record payload of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    RecordTooLarge {
        /// Payload size.
        size_bytes: usize,
        /// The limit.
        limit_bytes: usize,
    },
    /// An append with an empty payload (a zero length marks the end of the log on disk).
    #[error("record payload is empty; entries need at least one byte")]
    EmptyPayload,
    /// A batch larger than the batch limit.
    #[error("batch of {count} records exceeds the limit of {limit} records per call")]
    BatchTooLarge {
        /// Records in the batch.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A commit for LSNs that are not appended yet, or an inverted range.
    #[error("invalid commit of LSN range {first_lsn}..={last_lsn}: {reason}")]
    InvalidCommit {
        /// First LSN of the range.
        first_lsn: Lsn,
        /// Last LSN of the range.
        last_lsn: Lsn,
        /// Why it was refused.
        reason: String,
    },
    /// Invalid options.
    #[error("invalid WAL options: {0}")]
    InvalidOptions(String),
    /// A sync (or another write) failed earlier. The WAL never retries a failed sync as if the data
    /// were durable; it refuses all further work instead.
    #[error(
        "WAL is in a failed state after an earlier error ({cause}); nothing after the last successful sync counts as durable. Drop it and reopen: the reopen syncs every segment, drops its cached pages and re-reads it from the medium (where the marker file SYNC_FAILED could be left; otherwise drop the page cache or reboot first)"
    )]
    Failed {
        /// The first error, as text.
        cause: String,
    },
}

impl WalError {
    /// Maps an I/O error, turning ENOSPC/EDQUOT into [`WalError::DiskFull`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> WalError {
        let path = path.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => WalError::DiskFull { op, path },
            _ => WalError::Io { op, path, source },
        }
    }
}

impl WalError {
    /// A failed read of `len_bytes` at `offset` of `path`.
    pub(crate) fn read(
        op: &'static str,
        path: impl Into<PathBuf>,
        offset: u64,
        len_bytes: usize,
        source: io::Error,
    ) -> WalError {
        WalError::ReadFailed {
            op,
            path: path.into(),
            offset,
            len_bytes,
            source,
        }
    }
}

/// Result alias for WAL operations.
pub type Result<T, E = WalError> = std::result::Result<T, E>;
