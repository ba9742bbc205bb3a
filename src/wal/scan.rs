//! The recovery scan: walks segments record by record, verifies every checksum and the LSN
//! sequence, and classifies the end of the newest segment as clean, a torn tail, or corruption.
//!
//! The rule (see wal-format.md, "Torn tail versus corruption"):
//! - In the newest segment, the first invalid record (or non-zero bytes after the end-of-log mark)
//!   with **no** valid record anywhere after it is a *torn tail*: the remains of a write that was
//!   never acknowledged as durable. It is cut off.
//! - In the newest segment of format version 2, the same with valid records after it, each of
//!   which was written while every acknowledged LSN was below the bad spot's (their durable
//!   bounds say so), is a *hole in never-acknowledged data*: pages of an unsynced region that
//!   reached the disk out of order before a power cut. It is cut like a torn tail, with every
//!   record after it, and the next LSN stays above every LSN seen.
//! - Everything else is *corruption*: a bad record followed by a valid one whose durable bound
//!   covers the bad spot's LSN (acknowledged data was lost) or that has no bound (version 1), a
//!   bad record in an older segment, an LSN gap, a bad header.

use std::path::{Path, PathBuf};

use super::error::{Result, WalError};
use super::format::{
    decode_record_in, parse_segment_file_name, Decoded, Lsn, RecordView, MAX_LSN_JUMP,
    MAX_PAYLOAD_SIZE_BYTES, MAX_RECORD_SIZE_BYTES, RECORD_ALIGNMENT_BYTES,
    RECORD_HEADER_SIZE_BYTES, SEGMENT_HEADER_SIZE_BYTES,
};
use super::fs::WalFs;
use super::segment::Segment;

/// Name of the writer lock file inside a WAL directory.
pub const LOCK_FILE_NAME: &str = "LOCK";
/// Name of the marker a WAL leaves in its directory when it enters the failed state (a sync
/// failed): the next open syncs every segment, drops its cached pages and scans what the
/// medium holds, then removes the marker.
pub const SYNC_FAILED_FILE_NAME: &str = "SYNC_FAILED";
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
    /// For a torn tail that is a hole in never-acknowledged data: the valid records after the
    /// hole, which the cut removes too.
    pub(crate) cut_records: Option<ValidAfter>,
}

/// The valid records found after a bad spot of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ValidAfter {
    /// How many.
    pub(crate) count: u64,
    /// Offset and LSN of the first one.
    pub(crate) first: (usize, Lsn),
    /// The highest LSN among them.
    pub(crate) max_lsn: Lsn,
    /// The highest durable bound among them, with the offset and LSN of the record carrying it;
    /// `None` when some record has no bound (version 1, or a distance that did not fit), which
    /// counts as "may cover everything before it".
    pub(crate) max_bound: Option<(Lsn, usize, Lsn)>,
}

/// Bytes the recovery scan reads per `pread` (its window onto a segment, one reused buffer).
/// Large enough that syscalls cost nothing; larger buffers measured no faster.
pub const SCAN_CHUNK_BYTES: usize = 1 << 20;

/// Room at the front of the window buffer of a segment larger than one chunk: the unconsumed
/// tail of the previous window (less than one record) is moved there at a refill, so no byte is
/// read twice.
const KEEP_BYTES: usize = MAX_RECORD_SIZE_BYTES;

/// A forward-moving window onto a segment's bytes, read through [`WalFs::read_at`] into one
/// reused buffer: `KEEP_BYTES + SCAN_CHUNK_BYTES`, or just the file's length when it fits in
/// one chunk (then the first read reaches the end and there is never a refill).
pub(crate) struct SegmentReader<'a> {
    fs: &'a dyn WalFs,
    segment: &'a Segment,
    /// Bytes readable in the file.
    len: usize,
    /// Where chunks are read into `buf` (room before it for a kept tail).
    front: usize,
    /// The window: `buf[start..end]` holds the file's bytes from offset `base` on.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    base: usize,
}

impl<'a> SegmentReader<'a> {
    pub(crate) fn new(fs: &'a dyn WalFs, segment: &'a Segment) -> SegmentReader<'a> {
        SegmentReader {
            fs,
            segment,
            len: segment.len_bytes,
            front: if segment.len_bytes > SCAN_CHUNK_BYTES {
                KEEP_BYTES
            } else {
                0
            },
            buf: Vec::new(),
            start: 0,
            end: 0,
            base: 0,
        }
    }

    /// Makes `offset..min(offset + want_bytes, len)` readable (`want_bytes` at most
    /// [`SCAN_CHUNK_BYTES`]) and returns the window with `offset`'s position in it. The window
    /// always reaches at least that far, and runs to the end of the file when it ends before
    /// `offset + want_bytes`, so a record decoded at `offset` with `want_bytes >=
    /// MAX_RECORD_SIZE_BYTES` sees the same bytes as in the file.
    fn window(&mut self, offset: usize, want_bytes: usize) -> Result<(&[u8], usize)> {
        debug_assert!(want_bytes <= SCAN_CHUNK_BYTES);
        if offset >= self.len {
            return Ok((&[], 0));
        }
        let need_end = offset.saturating_add(want_bytes).min(self.len);
        let window_end = self.base + (self.end - self.start);
        if offset < self.base || need_end > window_end {
            // What is left of the window from `offset` on (less than one record: the scan
            // refills as soon as a record might not fit) moves to the front, not read again.
            let keep = if offset >= self.base
                && offset < window_end
                && window_end - offset <= self.front
            {
                window_end - offset
            } else {
                0
            };
            let front = self.front;
            if self.buf.is_empty() {
                self.buf = vec![0; front + SCAN_CHUNK_BYTES.min(self.len)];
            }
            if keep > 0 {
                let from = self.start + (offset - self.base);
                self.buf.copy_within(from..from + keep, front - keep);
            }
            // Invalid until the read succeeded.
            (self.start, self.end, self.base) = (0, 0, 0);
            let read_from = offset + keep;
            let n = SCAN_CHUNK_BYTES.min(self.len - read_from);
            self.segment.read_exact(
                self.fs,
                "scanning segment",
                read_from,
                &mut self.buf[front..front + n],
            )?;
            (self.start, self.end, self.base) = (front - keep, front + n, offset);
        }
        Ok((&self.buf[self.start..self.end], offset - self.base))
    }
}

/// Scans `segment`, reading it through `fs`. `visit` sees every valid record in order; an `Err`
/// from it (a record whose checksum is fine but whose content is impossible) is reported as
/// corruption at that record. A failed read is a [`WalError::ReadFailed`].
pub(crate) fn scan_segment(
    fs: &dyn WalFs,
    segment: &Segment,
    is_newest: bool,
    visit: &mut dyn FnMut(&RecordView<'_>) -> std::result::Result<(), String>,
) -> Result<SegmentScan> {
    let reader = &mut SegmentReader::new(fs, segment);
    let version = segment.header.version;
    let mut offset = SEGMENT_HEADER_SIZE_BYTES;
    let mut expected = segment.header.first_lsn;
    let mut records = 0u64;
    loop {
        let (window, at) = reader.window(offset, MAX_RECORD_SIZE_BYTES)?;
        match decode_record_in(window, at, &segment.hasher, version) {
            Decoded::Record(r) => {
                // A record flagged as an LSN jump (written by a recovery that cut a hole of
                // never-acknowledged records) may skip up to MAX_LSN_JUMP LSNs; any other
                // record has exactly the next LSN.
                let lsn_ok = if r.meta.lsn_jump {
                    r.lsn > expected && r.lsn - expected <= MAX_LSN_JUMP
                } else {
                    r.lsn == expected
                };
                if !lsn_ok {
                    let reason = if r.meta.lsn_jump {
                        format!(
                            "LSN gap: an LSN-jump record says LSN {} where at least {} and at most {} were possible",
                            r.lsn,
                            expected + 1,
                            expected.saturating_add(MAX_LSN_JUMP)
                        )
                    } else {
                        format!(
                            "LSN gap: found LSN {} where {} was expected",
                            r.lsn, expected
                        )
                    };
                    return Ok(SegmentScan {
                        tail: TailState::Corrupt {
                            offset: offset as u64,
                            expected_lsn: expected,
                            reason,
                        },
                        ..scan_result(offset, expected, records)
                    });
                }
                let size = r.size_bytes;
                // Offsets in the file, not in the window.
                let r = RecordView { offset, ..r };
                if let Err(reason) = visit(&r) {
                    return Ok(SegmentScan {
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
                    });
                }
                records += 1;
                expected = r.lsn + 1;
                offset += size;
            }
            Decoded::End => {
                if !is_newest {
                    return Ok(scan_result(offset, expected, records));
                }
                return Ok(match first_non_zero(reader, offset)? {
                    None => scan_result(offset, expected, records),
                    Some(at) => classify_bad(
                        reader,
                        is_newest,
                        offset,
                        expected,
                        format!("non-zero bytes at offset {at} after the end-of-log mark"),
                        records,
                    )?,
                });
            }
            Decoded::Invalid(e) => {
                let reason = e.to_string();
                return classify_bad(reader, is_newest, offset, expected, reason, records);
            }
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
        cut_records: None,
    }
}

fn classify_bad(
    reader: &mut SegmentReader<'_>,
    is_newest: bool,
    offset: usize,
    expected: Lsn,
    reason: String,
    records: u64,
) -> Result<SegmentScan> {
    let corrupt = |reason: String| SegmentScan {
        tail: TailState::Corrupt {
            offset: offset as u64,
            expected_lsn: expected,
            reason,
        },
        ..scan_result(offset, expected, records)
    };
    if !is_newest {
        return Ok(corrupt(format!(
            "{reason} (in a sealed segment: a newer segment exists)"
        )));
    }
    let after = valid_records_after(reader, offset)?;
    let dirty_end = |reader: &mut SegmentReader<'_>| -> Result<usize> {
        Ok(last_non_zero(reader, offset)?.map_or(offset, |i| i + 1))
    };
    let Some(after) = after else {
        return Ok(SegmentScan {
            tail: TailState::Torn {
                offset: offset as u64,
                reason,
            },
            dirty_end: dirty_end(reader)?,
            ..scan_result(offset, expected, records)
        });
    };
    let (first_at, first_lsn) = after.first;
    let follows =
        format!("{reason}, but a valid record (LSN {first_lsn}) follows at offset {first_at}");
    if after.max_lsn.saturating_sub(expected) >= MAX_LSN_JUMP {
        return Ok(corrupt(format!(
            "{follows}, and a record after it has LSN {}, more than {MAX_LSN_JUMP} above the expected one",
            after.max_lsn
        )));
    }
    match after.max_bound {
        None if reader.segment.header.version < 2 => Ok(corrupt(follows)),
        None => Ok(corrupt(format!(
            "{follows}, and a record after it has no durable bound, so the LSNs from {expected} on may have been acknowledged"
        ))),
        Some((bound, at, lsn)) if bound >= expected => Ok(corrupt(format!(
            "{follows}; the record at offset {at} (LSN {lsn}) was written when every LSN up to {bound} was acknowledged durable, so acknowledged data was lost here"
        ))),
        Some(_) if !zero_shaped(reader, offset)? => Ok(corrupt(format!(
            "{follows}; the bad record is not what a power cut leaves (its header, or one {SECTOR_BYTES}-byte sector of it, reading as zeros): this is damage, not an unsynced write"
        ))),
        Some((bound, ..)) => Ok(SegmentScan {
            tail: TailState::Torn {
                offset: offset as u64,
                reason: format!(
                    "{reason}; the {} valid record(s) after it (from offset {first_at}, LSNs up to {}) were all written while at most LSN {bound} (below {expected}) was acknowledged durable: a hole in never-acknowledged data, as a power cut leaves it; cut with everything after it",
                    after.count, after.max_lsn
                ),
            },
            dirty_end: dirty_end(reader)?,
            cut_records: Some(after),
            ..scan_result(offset, expected, records)
        }),
    }
}

/// The unit a disk writes atomically at best: after a power cut, each sector of a segment holds
/// its bytes as of one moment (the last sync that covered it, or later).
pub(crate) const SECTOR_BYTES: usize = 512;

/// Whether the bad record at `offset` has the shape a power cut leaves in a file that is never
/// rewritten (preallocated zeros, appended once): each 512-byte sector holds its bytes of one
/// moment, so an unsynced record is missing by whole zero sectors. True when the record's first
/// 8 bytes (length, type, flags: always in its first sector, as records are 8-aligned) read as
/// zeros, which no written record has; or when they give a length and at least one sector's part
/// of the record (header and payload) is all zeros. A bit flip or foreign bytes in an otherwise
/// complete record are not (unless a sector's part of it is zeros by nature).
fn zero_shaped(reader: &mut SegmentReader<'_>, offset: usize) -> Result<bool> {
    let (window, i) = reader.window(offset, MAX_RECORD_SIZE_BYTES)?;
    let rec = &window[i..];
    let head = RECORD_ALIGNMENT_BYTES.min(rec.len());
    assert!(offset % SECTOR_BYTES + head <= SECTOR_BYTES);
    if rec[..head] == ZEROS[..head] {
        return Ok(true);
    }
    if rec.len() < 4 {
        return Ok(false);
    }
    let len = u32::from_le_bytes(rec[..4].try_into().expect("4 bytes")) as usize;
    if len == 0 || len > MAX_PAYLOAD_SIZE_BYTES {
        // The first sector holds the length: a power cut leaves it whole or zero.
        return Ok(false);
    }
    let end = (RECORD_HEADER_SIZE_BYTES + len).min(rec.len());
    let mut start = 0;
    while start < end {
        let part = (SECTOR_BYTES - (offset + start) % SECTOR_BYTES).min(end - start);
        if rec[start..start + part] == ZEROS[..part] {
            return Ok(true);
        }
        start += part;
    }
    Ok(false)
}

/// Every record that validates with this segment's salt at an aligned offset after `offset`:
/// how many, the first, the highest LSN and the highest durable bound. After a valid record the
/// search goes on at its end, so a run of intact records costs one decode each.
fn valid_records_after(
    reader: &mut SegmentReader<'_>,
    offset: usize,
) -> Result<Option<ValidAfter>> {
    let hasher = &reader.segment.hasher;
    let version = reader.segment.header.version;
    let mut found: Option<ValidAfter> = None;
    let mut unknown_bound = false;
    let mut at = offset + RECORD_ALIGNMENT_BYTES;
    while at < reader.len {
        let (window, i) = reader.window(at, MAX_RECORD_SIZE_BYTES)?;
        // Skip zero stretches in one go: a valid record header never starts with zeros (its
        // length is not zero), so the next candidate is the aligned offset holding the next
        // non-zero byte.
        if window[i..(i + RECORD_ALIGNMENT_BYTES).min(window.len())]
            .iter()
            .all(|&b| b == 0)
        {
            let Some(non_zero) = first_non_zero(reader, at)? else {
                break;
            };
            let next = non_zero - non_zero % RECORD_ALIGNMENT_BYTES;
            assert!(next > at, "a zero stretch moves the search forward");
            at = next;
            continue;
        }
        let Decoded::Record(r) = decode_record_in(window, i, hasher, version) else {
            at += RECORD_ALIGNMENT_BYTES;
            continue;
        };
        let f = found.get_or_insert(ValidAfter {
            count: 0,
            first: (at, r.lsn),
            max_lsn: r.lsn,
            max_bound: None,
        });
        f.count += 1;
        f.max_lsn = f.max_lsn.max(r.lsn);
        match r.meta.durable_bound {
            None => unknown_bound = true,
            Some(bound) if f.max_bound.is_none_or(|(b, ..)| bound > b) => {
                f.max_bound = Some((bound, at, r.lsn));
            }
            Some(_) => {}
        }
        assert!(r.size_bytes >= RECORD_ALIGNMENT_BYTES);
        at += r.size_bytes;
    }
    if unknown_bound {
        if let Some(f) = found.as_mut() {
            f.max_bound = None;
        }
    }
    Ok(found)
}

/// Offset of the first non-zero byte at or after `from`.
fn first_non_zero(reader: &mut SegmentReader<'_>, from: usize) -> Result<Option<usize>> {
    let mut at = from;
    while at < reader.len {
        // Whatever the window holds from `at` on; the next call continues where it ends.
        let (window, i) = reader.window(at, 1)?;
        let chunk = &window[i..];
        if let Some(j) = first_non_zero_in(chunk) {
            return Ok(Some(at + j));
        }
        at += chunk.len();
    }
    Ok(None)
}

/// Offset of the last non-zero byte at or after `from`.
fn last_non_zero(reader: &mut SegmentReader<'_>, from: usize) -> Result<Option<usize>> {
    let mut at = from;
    let mut last = None;
    while at < reader.len {
        // Whatever the window holds from `at` on; the next call continues where it ends.
        let (window, i) = reader.window(at, 1)?;
        let chunk = &window[i..];
        if let Some(j) = last_non_zero_in(chunk) {
            last = Some(at + j);
        }
        at += chunk.len();
    }
    Ok(last)
}

/// Zeros to compare against: `==` on byte slices is one `memcmp`, fast in every build profile
/// (an iterator fold vectorizes only when optimized, and tests run unoptimized).
static ZEROS: [u8; 4096] = [0; 4096];

/// Position of the first non-zero byte of `bytes`, comparing 4 KiB at a time against zeros.
fn first_non_zero_in(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    while at < bytes.len() {
        let end = (at + ZEROS.len()).min(bytes.len());
        if bytes[at..end] != ZEROS[..end - at] {
            return bytes[at..end].iter().position(|&b| b != 0).map(|i| at + i);
        }
        at = end;
    }
    None
}

/// Position of the last non-zero byte of `bytes`, comparing 4 KiB at a time from the end.
fn last_non_zero_in(bytes: &[u8]) -> Option<usize> {
    let mut end = bytes.len();
    while end > 0 {
        let start = end.saturating_sub(ZEROS.len());
        if bytes[start..end] != ZEROS[..end - start] {
            return bytes[start..end]
                .iter()
                .rposition(|&b| b != 0)
                .map(|i| start + i);
        }
        end = start;
    }
    None
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
        } else if name != LOCK_FILE_NAME
            && name != ARCHIVE_DIR_NAME
            && name != SYNC_FAILED_FILE_NAME
        {
            listing.foreign.push(path);
        }
    }
    listing.segments.sort_by_key(|(lsn, _)| *lsn);
    listing.foreign.sort();
    Ok(listing)
}
