//! Read-only inspection of a WAL directory: no lock, no repair, and it works on a corrupt WAL
//! (it reports the problem and still describes everything it can read).

use std::path::{Path, PathBuf};

use super::error::{Result, WalError};
use super::format::{Lsn, RecordType, RecordView, WalIdentity};
use super::fs::OsFs;
use super::scan::{self, TailState};
use super::segment::Segment;
use super::tracker::Tracker;

/// Records of one segment by type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordCounts {
    /// Entry records.
    pub entries: u64,
    /// Commit markers.
    pub commits: u64,
    /// Checkpoint records.
    pub checkpoints: u64,
}

/// One segment as inspected.
#[derive(Clone, Debug)]
pub struct SegmentInfo {
    /// The segment file.
    pub path: PathBuf,
    /// First LSN, from the file name.
    pub first_lsn: Lsn,
    /// LSN of the last valid record, if any.
    pub last_lsn: Option<Lsn>,
    /// Valid records by type.
    pub counts: RecordCounts,
    /// Bytes from the start of the file to the end of the last valid record.
    pub used_bytes: u64,
    /// File size on disk.
    pub file_size_bytes: u64,
    /// How the segment's log ends (for a bad header, or a `wal_id` of another WAL: `Corrupt`
    /// at offset 0).
    pub tail: TailState,
    /// The header's format version (`None` when the header could not be read).
    pub format_version: Option<u32>,
    /// The header's identity (`None` for a format version 1 segment or an unreadable header).
    pub identity: Option<WalIdentity>,
}

/// A read-only view of a whole WAL directory.
#[derive(Clone, Debug)]
pub struct Inspection {
    /// The directory.
    pub dir: PathBuf,
    /// Segments in LSN order.
    pub segments: Vec<SegmentInfo>,
    /// The first problem, as `(file, state)`: a torn tail (which opening for writing would cut) or
    /// corruption (which makes opening for writing fail). `None` when the WAL is clean.
    pub problem: Option<(PathBuf, TailState)>,
    /// Every entry at or below this LSN is committed (over the consistent prefix).
    pub committed_watermark: Lsn,
    /// Entries without a commit marker (over the consistent prefix before any problem).
    pub pending: Vec<Lsn>,
    /// The LSN after the consistent prefix.
    pub next_lsn: Lsn,
    /// The WAL's identity: the `wal_id` of its segments and the owner of the newest segment
    /// with an identity (`None` when every readable segment is format version 1). A segment
    /// with another `wal_id` is reported as a problem and does not count here.
    pub identity: Option<WalIdentity>,
}

impl Inspection {
    /// True when neither a torn tail nor corruption was found.
    pub fn is_clean(&self) -> bool {
        self.problem.is_none()
    }

    /// True when the only problem is a torn tail (repairable by opening for writing).
    pub fn is_torn_only(&self) -> bool {
        matches!(self.problem, Some((_, TailState::Torn { .. })))
    }
}

/// Inspects the WAL in `dir` read-only. See [`inspect_with`].
pub fn inspect(dir: &Path) -> Result<Inspection> {
    inspect_with(dir, &mut |_, _| {})
}

/// Inspects the WAL in `dir` read-only, handing every valid record to `visit` with its file, in
/// order. Fails only when `dir` cannot be read, is not a WAL directory at all, or a segment's
/// bytes cannot be read ([`WalError::ReadFailed`]: `EIO` from the disk, naming file and offset);
/// damage inside segments is described in the result instead.
pub fn inspect_with(
    dir: &Path,
    visit: &mut dyn FnMut(&Path, &RecordView<'_>),
) -> Result<Inspection> {
    let listing = scan::list_dir(dir)?;
    if listing.segments.is_empty() {
        return Err(WalError::NotAWal {
            path: dir.to_path_buf(),
            what: "directory",
            reason: "it holds no WAL segment files (<20 digits>.wal)".into(),
        });
    }
    let count = listing.segments.len();
    let mut tracker = Tracker::default();
    let mut segments = Vec::with_capacity(count);
    let mut problem: Option<(PathBuf, TailState)> = None;
    let mut next_lsn: Option<Lsn> = None;
    // The first segment with an identity, and its wal_id: every later one must match it.
    let mut reference: Option<(PathBuf, u64)> = None;
    let mut identity: Option<WalIdentity> = None;
    for (i, (first_lsn, path)) in listing.segments.iter().enumerate() {
        let is_newest = i + 1 == count;
        let file_size_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let mut info = SegmentInfo {
            path: path.clone(),
            first_lsn: *first_lsn,
            last_lsn: None,
            counts: RecordCounts::default(),
            used_bytes: 0,
            file_size_bytes,
            tail: TailState::Clean,
            format_version: None,
            identity: None,
        };
        let seg = match Segment::open(&OsFs, path, *first_lsn, false) {
            Ok(seg) => seg,
            // The disk failed, the bytes may well be fine: not a damage report.
            Err(e @ WalError::ReadFailed { .. }) => return Err(e),
            Err(e) => {
                info.tail = TailState::Corrupt {
                    offset: 0,
                    expected_lsn: next_lsn.unwrap_or(*first_lsn),
                    reason: e.to_string(),
                };
                problem.get_or_insert((path.clone(), info.tail.clone()));
                segments.push(info);
                continue;
            }
        };
        info.format_version = Some(seg.header.version);
        info.identity = seg.header.identity;
        if let Some(id) = seg.header.identity {
            match &reference {
                Some((ref_path, ref_id)) if *ref_id != id.wal_id => {
                    info.tail = TailState::Corrupt {
                        offset: 0,
                        expected_lsn: next_lsn.unwrap_or(*first_lsn),
                        reason: WalError::ForeignSegment {
                            path: path.clone(),
                            found_wal_id: id.wal_id,
                            reference: ref_path.clone(),
                            expected_wal_id: *ref_id,
                        }
                        .to_string(),
                    };
                    problem.get_or_insert((path.clone(), info.tail.clone()));
                    segments.push(info);
                    continue;
                }
                Some(_) => {}
                None => reference = Some((path.clone(), id.wal_id)),
            }
            identity = Some(id);
        }
        let consistent = problem.is_none();
        if consistent {
            if let Some(expected) = next_lsn {
                if expected != *first_lsn {
                    problem = Some((
                        path.clone(),
                        TailState::Corrupt {
                            offset: 0,
                            expected_lsn: expected,
                            reason: format!(
                                "LSN gap between segments: this segment starts at LSN {first_lsn}, the previous one ends before LSN {expected}"
                            ),
                        },
                    ));
                }
            }
        }
        let feed = problem.is_none();
        let mut counts = RecordCounts::default();
        let result = scan::scan_segment(&OsFs, &seg, is_newest, &mut |r| {
            match r.record_type {
                RecordType::Entry => counts.entries += 1,
                RecordType::Commit => counts.commits += 1,
                RecordType::Checkpoint => counts.checkpoints += 1,
            }
            visit(path, r);
            if feed {
                tracker.apply(*first_lsn, r)
            } else {
                Ok(())
            }
        })?;
        info.counts = counts;
        info.used_bytes = result.end_offset as u64;
        info.last_lsn = (result.records > 0).then(|| result.next_lsn - 1);
        info.tail = result.tail.clone();
        if feed {
            next_lsn = Some(result.next_lsn);
        }
        if result.tail != TailState::Clean {
            problem.get_or_insert((path.clone(), result.tail));
        }
        segments.push(info);
    }
    let next_lsn = next_lsn.unwrap_or(listing.segments[0].0);
    Ok(Inspection {
        dir: dir.to_path_buf(),
        segments,
        problem,
        committed_watermark: tracker.watermark(next_lsn),
        pending: tracker.pending().map(|(lsn, _, _)| lsn).collect(),
        next_lsn,
        identity,
    })
}
