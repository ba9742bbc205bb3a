//! Naming problems precisely: re-reads the bytes at each bad offset the inspection reported and
//! says what was expected there and what was found.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;

use super::source::{read_header, read_prefix};
use crate::wal::format::{
    decode_payload, decode_record, parse_segment_file_name, CheckpointPayload, CommitPayload,
    Decoded, HeaderError, RecordError, RecordType, SegmentHeader, MAX_PAYLOAD_SIZE_BYTES,
    MAX_RECORD_SIZE_BYTES, RECORD_ALIGNMENT_BYTES, RECORD_HEADER_SIZE_BYTES,
    SEGMENT_HEADER_SIZE_BYTES, SEGMENT_MAGIC,
};
use crate::wal::{Inspection, Lsn, SegmentInfo, TailState};

/// One problem, as `verify` reports it.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Problem {
    /// `torn` (repairable: an unacknowledged partial write at the end) or `corrupt`.
    pub(super) severity: &'static str,
    /// The segment file.
    pub(super) file: String,
    /// Byte offset in that file.
    pub(super) offset: u64,
    /// The LSN a valid record there should have had.
    pub(super) expected_lsn: Option<Lsn>,
    /// What was checked ("record checksum", "record LSN", "segment header", ...).
    pub(super) what: String,
    /// The value expected.
    pub(super) expected: String,
    /// The value found.
    pub(super) found: String,
    /// The scanner's own words.
    pub(super) reason: String,
    /// Where valid records of this segment resume after the damage (`None`: nothing valid
    /// follows in this segment, as for a torn tail).
    pub(super) resumes_at: Option<Resume>,
}

/// The first valid record after a damaged region of a segment.
#[derive(Clone, Copy, Debug, Serialize)]
pub(super) struct Resume {
    /// Its offset.
    pub(super) offset: u64,
    /// Its LSN.
    pub(super) lsn: Lsn,
    /// LSNs that no valid record holds between the damage and it (`expected..lsn`), if any.
    pub(super) lost_lsns: Option<(Lsn, Lsn)>,
    /// Valid records from it to the next damage or the end of the segment.
    pub(super) valid_records: u64,
    /// For lost LSNs: does a commit marker (or checkpoint) later in this segment cover every one
    /// of them? `true` means those entries took effect in the store before the damage was done.
    /// `false`: no marker in the rest of this segment does (a later segment may; see `dump`).
    pub(super) lost_committed: Option<bool>,
}

/// LSNs lost to damage, and which of them a later commit marker covers.
struct LostRange {
    problem: usize,
    first: Lsn,
    covered: Vec<bool>,
}

/// Longest lost LSN range whose coverage by later markers is tracked.
const MAX_TRACKED_LOST_LSNS: u64 = 4096;

fn cover(ranges: &mut [LostRange], first: Lsn, last: Lsn) {
    for r in ranges.iter_mut() {
        let end = r.first + r.covered.len() as u64 - 1;
        for lsn in first.max(r.first)..=last.min(end) {
            r.covered[(lsn - r.first) as usize] = true;
        }
    }
}

impl Problem {
    /// `file:offset`.
    pub(super) fn location(&self) -> String {
        format!("{}:{}", self.file, self.offset)
    }

    /// Is it corruption (not a repairable torn tail)?
    pub(super) fn is_corrupt(&self) -> bool {
        self.severity == "corrupt"
    }
}

/// Every problem of the inspection: each segment's bad spot (a scan stops at the first bad
/// record of a segment, and the next segments are still checked) and every LSN gap between
/// segments.
pub(super) fn problems(inspection: &Inspection) -> Vec<Problem> {
    let mut out: Vec<Problem> = Vec::new();
    let mut prev: Option<&SegmentInfo> = None;
    for seg in &inspection.segments {
        let next_of = |s: &SegmentInfo| s.last_lsn.map_or(s.first_lsn, |l| l + 1);
        match &seg.tail {
            TailState::Clean => {}
            TailState::Torn { offset, reason } => {
                out.push(diagnose(
                    &seg.path,
                    *offset,
                    Some(next_of(seg)),
                    reason,
                    "torn",
                ));
            }
            TailState::Corrupt {
                offset,
                expected_lsn,
                reason,
            } => {
                out.push(diagnose(
                    &seg.path,
                    *offset,
                    Some(*expected_lsn),
                    reason,
                    "corrupt",
                ));
                if *offset >= SEGMENT_HEADER_SIZE_BYTES as u64 {
                    let first = out.len() - 1;
                    look_past(&seg.path, &mut out, first);
                }
            }
        }
        if let Some(p) = prev {
            let header_read = !(matches!(seg.tail, TailState::Corrupt { offset: 0, .. })
                && seg.last_lsn.is_none());
            if p.tail == TailState::Clean && header_read && seg.first_lsn != next_of(p) {
                let expected = next_of(p);
                out.push(Problem {
                    severity: "corrupt",
                    file: seg.path.display().to_string(),
                    offset: 0,
                    expected_lsn: Some(expected),
                    what: "first LSN of the segment (LSN sequence between segments)".into(),
                    expected: expected.to_string(),
                    found: seg.first_lsn.to_string(),
                    resumes_at: None,
                    reason: if seg.first_lsn > expected {
                        format!(
                            "LSN gap: the previous segment ends before LSN {expected}, this one starts at {}: LSNs {expected}..={} are missing (a deleted or lost segment file?)",
                            seg.first_lsn,
                            seg.first_lsn - 1
                        )
                    } else {
                        format!(
                            "LSN overlap: the previous segment ends before LSN {expected}, this one starts at {}",
                            seg.first_lsn
                        )
                    },
                });
            }
        }
        prev = Some(seg);
    }
    if let Some((path, state)) = &inspection.problem {
        let file = path.display().to_string();
        let (offset, expected_lsn, reason, severity) = match state {
            TailState::Torn { offset, reason } => (*offset, None, reason, "torn"),
            TailState::Corrupt {
                offset,
                expected_lsn,
                reason,
            } => (*offset, Some(*expected_lsn), reason, "corrupt"),
            TailState::Clean => return out,
        };
        if !out.iter().any(|p| p.file == file && p.offset == offset) {
            out.push(diagnose(path, offset, expected_lsn, reason, severity));
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Names the problem at `offset` of `path`.
fn diagnose(
    path: &Path,
    offset: u64,
    expected_lsn: Option<Lsn>,
    reason: &str,
    severity: &'static str,
) -> Problem {
    let mut p = Problem {
        severity,
        file: path.display().to_string(),
        offset,
        expected_lsn,
        what: "record".into(),
        expected: "-".into(),
        found: "-".into(),
        reason: reason.to_string(),
        resumes_at: None,
    };
    let header = match read_header(path) {
        Ok(h) => h,
        Err(e) => {
            p.what = "segment file".into();
            p.expected = "a readable file".into();
            p.found = e.message;
            return p;
        }
    };
    let header = match header {
        Ok(h) => h,
        Err(e) => {
            let head = read_prefix(path, SEGMENT_HEADER_SIZE_BYTES).unwrap_or_default();
            p.what = "segment header".into();
            (p.expected, p.found) = match e {
                HeaderError::Truncated { len_bytes } => (
                    format!("{SEGMENT_HEADER_SIZE_BYTES} header bytes"),
                    format!("{len_bytes} bytes"),
                ),
                HeaderError::BadMagic => (
                    format!("magic {}", hex(&SEGMENT_MAGIC)),
                    hex(&head[..head.len().min(8)]),
                ),
                HeaderError::UnsupportedVersion { found } => (
                    format!(
                        "format version {} to {}",
                        crate::wal::format::OLDEST_READ_FORMAT_VERSION,
                        crate::wal::format::FORMAT_VERSION
                    ),
                    format!("format version {found}"),
                ),
                HeaderError::ChecksumMismatch { stored, computed } => {
                    p.what = "segment header checksum".into();
                    (format!("{computed:#010x}"), format!("{stored:#010x}"))
                }
                HeaderError::BadField { reason } => ("valid header fields".into(), reason),
            };
            return p;
        }
    };
    let file_len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if offset == 0 || offset >= header.segment_size_bytes {
        let name_lsn = path
            .file_name()
            .and_then(|n| parse_segment_file_name(&n.to_string_lossy()));
        if file_len > header.segment_size_bytes {
            p.what = "file size".into();
            p.expected = format!(
                "at most {} bytes (from the header)",
                header.segment_size_bytes
            );
            p.found = format!("{file_len} bytes");
        } else if let Some(name_lsn) = name_lsn.filter(|&l| l != header.first_lsn) {
            p.what = "first LSN in the header versus the file name".into();
            p.expected = name_lsn.to_string();
            p.found = header.first_lsn.to_string();
        } else if let Some(expected) = expected_lsn.filter(|&e| e != header.first_lsn) {
            p.what = "first LSN of the segment (LSN sequence between segments)".into();
            p.expected = expected.to_string();
            p.found = header.first_lsn.to_string();
        } else {
            p.what = "segment".into();
        }
        return p;
    }
    diagnose_record(path, &header, offset, file_len, expected_lsn, &mut p);
    p
}

/// Fills in `p` for a bad record at `offset`.
fn diagnose_record(
    path: &Path,
    header: &SegmentHeader,
    offset: u64,
    file_len: u64,
    expected_lsn: Option<Lsn>,
    p: &mut Problem,
) {
    let want = (file_len.saturating_sub(offset) as usize).min(MAX_RECORD_SIZE_BYTES);
    let mut buf = vec![0u8; want];
    if let Err(e) = File::open(path).and_then(|f| f.read_exact_at(&mut buf, offset)) {
        p.found = format!("unreadable: {e}");
        return;
    }
    let head = &buf[..buf.len().min(RECORD_HEADER_SIZE_BYTES)];
    let (what, expected, found): (&str, String, String) =
        match decode_record(&buf, 0, &header.record_hasher()) {
            Decoded::Invalid(RecordError::ChecksumMismatch { stored, computed }) => (
                "record checksum",
                format!("{computed:#010x}"),
                format!("{stored:#010x}"),
            ),
            Decoded::Invalid(RecordError::Truncated {
                needed_bytes,
                available_bytes,
            }) => (
                "record size versus the end of the file",
                format!("{needed_bytes} bytes"),
                format!("{available_bytes} bytes to the end of the file"),
            ),
            Decoded::Invalid(RecordError::LengthTooLarge { len_bytes }) => (
                "record length",
                format!("1..={MAX_PAYLOAD_SIZE_BYTES} bytes"),
                format!("{len_bytes} bytes"),
            ),
            Decoded::Invalid(RecordError::BadType { found }) => (
                "record type",
                "1 (entry), 2 (commit) or 3 (checkpoint)".into(),
                found.to_string(),
            ),
            Decoded::Invalid(RecordError::NonZeroReserved) => (
                "flags and reserved header bytes (4..8, 16..20)",
                "type byte then zeros".into(),
                format!(
                    "{} / {}",
                    hex(head.get(4..8).unwrap_or(&[])),
                    hex(head.get(16..20).unwrap_or(&[]))
                ),
            ),
            Decoded::Invalid(RecordError::ZeroLengthNotEmpty) => (
                "record header with a zero length",
                "24 zero bytes (the end-of-log mark)".into(),
                hex(head),
            ),
            Decoded::Invalid(RecordError::NonZeroPadding) => {
                let len = u32::from_le_bytes(head[0..4].try_into().unwrap_or([0; 4])) as usize;
                let start = RECORD_HEADER_SIZE_BYTES + len;
                let end = crate::wal::format::record_size(len).min(buf.len());
                (
                    "padding after the payload",
                    "zeros".into(),
                    hex(buf.get(start..end).unwrap_or(&[])),
                )
            }
            Decoded::Record(r) if expected_lsn.is_some_and(|e| e != r.lsn) => (
                "record LSN",
                expected_lsn.map_or_else(String::new, |l| l.to_string()),
                r.lsn.to_string(),
            ),
            Decoded::Record(r) => {
                let found = match (r.record_type, decode_payload::<CommitPayload>(r.payload)) {
                    (RecordType::Commit, Ok(c)) => {
                        format!(
                            "commit of {}..={} at LSN {}",
                            c.first_lsn, c.last_lsn, r.lsn
                        )
                    }
                    _ => format!("a valid {} record, LSN {}", r.record_type.name(), r.lsn),
                };
                (
                    "record content (checksum valid, content impossible)",
                    "a payload consistent with its LSN".into(),
                    found,
                )
            }
            Decoded::End => {
                let at = buf.iter().position(|&b| b != 0);
                (
                    "bytes after the end-of-log mark",
                    "zeros".into(),
                    match at {
                        Some(i) => format!("byte {:#04x} at offset {}", buf[i], offset + i as u64),
                        None => "non-zero bytes further on".into(),
                    },
                )
            }
        };
    p.what = what.into();
    p.expected = expected;
    p.found = found;
}

/// Most damaged regions reported per segment (memory stays bounded on a wrecked file).
const MAX_REGIONS_PER_SEGMENT: usize = 64;

/// A scan stops at the first bad record of a segment; this looks past it, so that every
/// checksum of the segment is checked: it finds where valid records resume (`out[first]`'s
/// `resumes_at`, with the LSNs lost in between), verifies the records from there, and adds a
/// problem for every further damaged region or LSN jump. Reads the file through a read-only
/// mapping, so memory stays flat.
fn look_past(path: &Path, out: &mut Vec<Problem>, first: usize) {
    let Ok(Ok(header)) = read_header(path) else {
        return;
    };
    let Ok(file) = File::open(path) else {
        return;
    };
    // SAFETY: a read-only mapping; the WAL writer never truncates a segment (the documented
    // "consistent prefix" caveat of inspecting a live WAL applies, as for `inspect`).
    let Ok(map) = (unsafe { memmap2::Mmap::map(&file) }) else {
        return;
    };
    let bytes: &[u8] = &map;
    let hasher = header.record_hasher();
    let file_name = path.display().to_string();
    let mut current = first;
    let mut bad = out[first].offset as usize;
    let mut expected = out[first].expected_lsn.unwrap_or(header.first_lsn);
    let mut regions = 1;
    let mut lost: Vec<LostRange> = Vec::new();
    loop {
        // Find the next aligned offset where a record validates with this segment's salt.
        let mut at = bad + RECORD_ALIGNMENT_BYTES;
        let found = loop {
            if at + RECORD_HEADER_SIZE_BYTES > bytes.len() {
                break None;
            }
            if bytes[at..at + RECORD_ALIGNMENT_BYTES]
                .iter()
                .all(|&b| b == 0)
            {
                at += RECORD_ALIGNMENT_BYTES;
                continue;
            }
            if let Decoded::Record(r) = decode_record(bytes, at, &hasher) {
                break Some((at, r.lsn));
            }
            at += RECORD_ALIGNMENT_BYTES;
        };
        let Some((resume, lsn)) = found else {
            break;
        };
        if lsn > expected && lsn - expected <= MAX_TRACKED_LOST_LSNS {
            lost.push(LostRange {
                problem: current,
                first: expected,
                covered: vec![false; (lsn - expected) as usize],
            });
        }
        // Verify sequentially from there.
        let mut valid = 0u64;
        let mut off = resume;
        let mut next = lsn;
        let stop = loop {
            match decode_record(bytes, off, &hasher) {
                Decoded::Record(r) if r.lsn == next => {
                    match r.record_type {
                        RecordType::Commit => {
                            if let Ok(c) = decode_payload::<CommitPayload>(r.payload) {
                                cover(&mut lost, c.first_lsn, c.last_lsn);
                            }
                        }
                        RecordType::Checkpoint => {
                            if let Ok(c) = decode_payload::<CheckpointPayload>(r.payload) {
                                cover(&mut lost, 1, c.committed_watermark);
                            }
                        }
                        RecordType::Entry => {}
                    }
                    valid += 1;
                    next += 1;
                    off += r.size_bytes;
                }
                Decoded::Record(r) => {
                    break Some((
                        off,
                        format!("LSN gap: found LSN {} where {next} was expected", r.lsn),
                        "record LSN",
                        next.to_string(),
                        r.lsn.to_string(),
                    ))
                }
                Decoded::End => break None,
                Decoded::Invalid(e) => {
                    break Some((
                        off,
                        e.to_string(),
                        "record",
                        "a valid record".to_string(),
                        e.to_string(),
                    ))
                }
            }
        };
        out[current].resumes_at = Some(Resume {
            offset: resume as u64,
            lsn,
            lost_lsns: (lsn > expected).then(|| (expected, lsn - 1)),
            valid_records: valid,
            lost_committed: None,
        });
        let Some((at, reason, what, exp, found)) = stop else {
            break;
        };
        if regions >= MAX_REGIONS_PER_SEGMENT {
            break;
        }
        regions += 1;
        out.push(Problem {
            severity: "corrupt",
            file: file_name.clone(),
            offset: at as u64,
            expected_lsn: Some(next),
            what: format!("{what} (further damage in the same segment)"),
            expected: exp,
            found,
            reason,
            resumes_at: None,
        });
        current = out.len() - 1;
        bad = at;
        expected = next;
    }
    for r in lost {
        if let Some(resume) = out[r.problem].resumes_at.as_mut() {
            resume.lost_committed = Some(r.covered.iter().all(|&c| c));
        }
    }
}

/// The offset just past the last non-zero byte of `path` at or after `from` (what cutting a
/// torn tail zeroes), reading backwards in chunks.
pub(super) fn non_zero_end(path: &Path, from: u64) -> std::io::Result<u64> {
    const CHUNK: u64 = 1 << 20;
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; CHUNK as usize];
    while end > from {
        let start = end.saturating_sub(CHUNK).max(from);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b != 0) {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(from)
}
