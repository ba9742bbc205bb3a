//! The recovery scan: walks segments record by record, verifies every checksum and the LSN
//! sequence, and classifies the end of the newest segment as clean, a torn tail, or corruption.
//!
//! The rule (see wal-format.md, "Torn tail versus corruption"):
//! - In the newest segment, the first invalid record (or non-zero bytes after the end-of-log mark)
//!   with **no** valid record anywhere after it is a *torn tail*: the remains of a write that was
//!   never acknowledged as durable. It is cut off.
//! - Everything else is *corruption*: a bad record followed by a valid one, a bad record in an
//!   older segment, an LSN gap, a bad header.

use std::path::{Path, PathBuf};

use super::error::{Result, WalError};
use super::format::{
    decode_record, parse_segment_file_name, Decoded, Lsn, RecordView, RECORD_ALIGNMENT_BYTES,
    SEGMENT_HEADER_SIZE_BYTES,
};
use super::segment::Segment;

/// Name of the writer lock file inside a WAL directory.
pub const LOCK_FILE_NAME: &str = "LOCK";
/// Name of the directory segments are moved to under [`super::Retention::Archive`] when it is
/// given as a relative path.
pub const ARCHIVE_DIR_NAME: &str = "archive";

/// How a segment's log ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TailState {
    /// A clean end: zeros after the last record.
    Clean,
    /// A torn tail at `offset`: an unacknowledged partial write, safe to cut.
    Torn {
        /// Offset of the first byte that is not part of a valid record.
        offset: u64,
        /// What was found there.
        reason: String,
    },
    /// Corruption at `offset`.
    Corrupt {
        /// Offset of the bad record.
        offset: u64,
        /// The LSN a valid record at that offset should have had.
        expected_lsn: Lsn,
        /// What is wrong.
        reason: String,
    },
}

/// What scanning one segment found.
#[derive(Clone, Debug)]
pub(crate) struct SegmentScan {
    pub(crate) records: u64,
    /// Offset just past the last valid record.
    pub(crate) end_offset: usize,
    /// LSN the next record would have.
    pub(crate) next_lsn: Lsn,
    pub(crate) tail: TailState,
    /// For a torn tail: offset just past the last non-zero byte (what must be zeroed).
    pub(crate) dirty_end: usize,
}

/// Scans `segment`. `visit` sees every valid record in order; an `Err` from it (a record whose
/// checksum is fine but whose content is impossible) is reported as corruption at that record.
pub(crate) fn scan_segment(
    segment: &Segment,
    is_newest: bool,
    visit: &mut dyn FnMut(&RecordView<'_>) -> std::result::Result<(), String>,
) -> SegmentScan {
    let bytes = segment.bytes();
    let mut offset = SEGMENT_HEADER_SIZE_BYTES;
    let mut expected = segment.header.first_lsn;
    let mut records = 0u64;
    let bad = |offset: usize, expected: Lsn, reason: String, records: u64| {
        classify_bad(segment, is_newest, offset, expected, reason, records)
    };
    loop {
        match decode_record(bytes, offset, &segment.hasher) {
            Decoded::Record(r) => {
                if r.lsn != expected {
                    return SegmentScan {
                        tail: TailState::Corrupt {
                            offset: offset as u64,
                            expected_lsn: expected,
                            reason: format!(
                                "LSN gap: found LSN {} where {} was expected",
                                r.lsn, expected
                            ),
                        },
                        ..scan_result(offset, expected, records)
                    };
                }
                if let Err(reason) = visit(&r) {
                    return SegmentScan {
                        tail: TailState::Corrupt {
                            offset: offset as u64,
                            expected_lsn: expected,
                            reason: format!(
                                "{} record LSN {}: {reason}",
                                r.record_type.name(),
                                r.lsn
                            ),
                        },
                        ..scan_result(offset, expected, records)
                    };
                }
                records += 1;
                expected += 1;
                offset += r.size_bytes;
            }
            Decoded::End => {
                if !is_newest {
                    return scan_result(offset, expected, records);
                }
                return match first_non_zero(bytes, offset) {
                    None => scan_result(offset, expected, records),
                    Some(at) => bad(
                        offset,
                        expected,
                        format!("non-zero bytes at offset {at} after the end-of-log mark"),
                        records,
                    ),
                };
            }
            Decoded::Invalid(e) => return bad(offset, expected, e.to_string(), records),
        }
    }
}

fn scan_result(offset: usize, expected: Lsn, records: u64) -> SegmentScan {
    SegmentScan {
        records,
        end_offset: offset,
        next_lsn: expected,
        tail: TailState::Clean,
        dirty_end: offset,
    }
}

fn classify_bad(
    segment: &Segment,
    is_newest: bool,
    offset: usize,
    expected: Lsn,
    reason: String,
    records: u64,
) -> SegmentScan {
    let corrupt = |reason: String| SegmentScan {
        tail: TailState::Corrupt {
            offset: offset as u64,
            expected_lsn: expected,
            reason,
        },
        ..scan_result(offset, expected, records)
    };
    if !is_newest {
        return corrupt(format!(
            "{reason} (in a sealed segment: a newer segment exists)"
        ));
    }
    let bytes = segment.bytes();
    if let Some((at, lsn)) = find_valid_record_after(segment, offset) {
        return corrupt(format!(
            "{reason}, but a valid record (LSN {lsn}) follows at offset {at}"
        ));
    }
    let dirty_end = last_non_zero(bytes, offset).map_or(offset, |i| i + 1);
    SegmentScan {
        tail: TailState::Torn {
            offset: offset as u64,
            reason,
        },
        dirty_end,
        ..scan_result(offset, expected, records)
    }
}

/// Looks for any record that validates with this segment's salt at an aligned offset after
/// `offset`.
fn find_valid_record_after(segment: &Segment, offset: usize) -> Option<(usize, Lsn)> {
    let bytes = segment.bytes();
    let mut at = offset + RECORD_ALIGNMENT_BYTES;
    while at < bytes.len() {
        // Skip zero stretches quickly: a valid record header is never all zeros.
        if bytes[at..(at + RECORD_ALIGNMENT_BYTES).min(bytes.len())]
            .iter()
            .all(|&b| b == 0)
        {
            at += RECORD_ALIGNMENT_BYTES;
            continue;
        }
        if let Decoded::Record(r) = decode_record(bytes, at, &segment.hasher) {
            return Some((at, r.lsn));
        }
        at += RECORD_ALIGNMENT_BYTES;
    }
    None
}

fn first_non_zero(bytes: &[u8], from: usize) -> Option<usize> {
    const CHUNK: usize = 64 * 1024;
    let mut at = from;
    while at < bytes.len() {
        let end = (at + CHUNK).min(bytes.len());
        if bytes[at..end].iter().any(|&b| b != 0) {
            return bytes[at..end].iter().position(|&b| b != 0).map(|i| at + i);
        }
        at = end;
    }
    None
}

fn last_non_zero(bytes: &[u8], from: usize) -> Option<usize> {
    bytes
        .get(from..)?
        .iter()
        .rposition(|&b| b != 0)
        .map(|i| from + i)
}

/// The files of a WAL directory, by kind.
#[derive(Debug, Default)]
pub(crate) struct DirListing {
    /// Segments in LSN order.
    pub(crate) segments: Vec<(Lsn, PathBuf)>,
    /// Leftover temporary files of interrupted segment creations.
    pub(crate) temp_files: Vec<PathBuf>,
    /// Any other entries (besides the lock file and the archive directory).
    pub(crate) foreign: Vec<PathBuf>,
}

/// Lists a WAL directory. The directory must exist.
pub(crate) fn list_dir(dir: &Path) -> Result<DirListing> {
    let meta = std::fs::metadata(dir).map_err(|e| WalError::io("opening WAL directory", dir, e))?;
    if !meta.is_dir() {
        return Err(WalError::NotAWal {
            path: dir.to_path_buf(),
            what: "directory",
            reason: "it is a file, not a directory".into(),
        });
    }
    let mut listing = DirListing::default();
    for entry in
        std::fs::read_dir(dir).map_err(|e| WalError::io("listing WAL directory", dir, e))?
    {
        let entry = entry.map_err(|e| WalError::io("listing WAL directory", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if let Some(lsn) = parse_segment_file_name(&name) {
            listing.segments.push((lsn, path));
        } else if name
            .strip_suffix(".tmp")
            .and_then(parse_segment_file_name)
            .is_some()
        {
            listing.temp_files.push(path);
        } else if name != LOCK_FILE_NAME && name != ARCHIVE_DIR_NAME {
            listing.foreign.push(path);
        }
    }
    listing.segments.sort_by_key(|(lsn, _)| *lsn);
    listing.foreign.sort();
    Ok(listing)
}
