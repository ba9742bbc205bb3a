//! Opening a WAL directory for inspection: the checks that turn bad input into one clear line,
//! the probe for a running writer, and the streaming scan.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::CliError;
use crate::wal::format::{
    decode_payload, parse_segment_file_name, CheckpointPayload, CommitPayload, HeaderError,
    RecordType, RecordView, SegmentHeader, FORMAT_VERSION, OLDEST_READ_FORMAT_VERSION,
    SEGMENT_HEADER_SIZE_BYTES,
};
use crate::wal::{inspect_with, Inspection, Lsn, PendingEntry, ARCHIVE_DIR_NAME, LOCK_FILE_NAME};

/// One segment file as listed before the scan, with its header as decoded.
struct SegmentFile {
    path: PathBuf,
    header: Result<SegmentHeader, HeaderError>,
}

/// A WAL directory that passed the "can it be inspected at all" checks.
pub(super) struct WalDir {
    pub(super) dir: PathBuf,
    /// The process holding the writer lock, if one does (a running `settlement`).
    pub(super) writer: Option<LockHolder>,
    /// Leftovers of interrupted segment creations (`<segment>.wal.tmp`), which the next
    /// writable open deletes.
    pub(super) temp_files: Vec<String>,
}

/// A process holding a lock on a file, from `/proc/locks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LockHolder {
    /// Its pid, when the kernel reports one (open-file-description locks report none).
    pub(super) pid: Option<u32>,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "pid {pid}"),
            None => f.write_str("another process"),
        }
    }
}

/// Checks that `dir` is a WAL directory this build can read, and lists its segments. Every
/// failure is "cannot inspect": a one-line reason, exit 2.
pub(super) fn open_dir(dir: &Path) -> Result<WalDir, CliError> {
    let shown = dir.display();
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CliError::cannot(format!(
                "{shown}: no such file or directory (give the WAL directory, settlement's --wal-dir, default ./data/wal)"
            )))
        }
        Err(e) => return Err(CliError::cannot(format!("cannot read {shown}: {e}"))),
    };
    if !meta.is_dir() {
        return Err(CliError::cannot(format!(
            "{shown} is a file, not a WAL directory (give the directory that holds the <20 digits>.wal segment files)"
        )));
    }
    let listing = std::fs::read_dir(dir)
        .map_err(|e| CliError::cannot(format!("cannot list {shown}: {e}")))?;
    let mut segments: Vec<(Lsn, PathBuf)> = Vec::new();
    let mut others: Vec<String> = Vec::new();
    for entry in listing {
        let entry = entry.map_err(|e| CliError::cannot(format!("cannot list {shown}: {e}")))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        match parse_segment_file_name(&name) {
            Some(lsn) => segments.push((lsn, entry.path())),
            None if name == LOCK_FILE_NAME => {}
            None => others.push(name),
        }
    }
    if segments.is_empty() {
        let archived = std::fs::read_dir(dir.join(ARCHIVE_DIR_NAME))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| parse_segment_file_name(&e.file_name().to_string_lossy()).is_some())
                    .count()
            })
            .unwrap_or(0);
        others.sort();
        return Err(CliError::cannot(if archived > 0 {
            format!(
                "{shown} holds no WAL segment files, but {archived} archived segment(s) are in {}: inspect that directory",
                dir.join(ARCHIVE_DIR_NAME).display()
            )
        } else if others.is_empty() {
            format!(
                "{shown} is empty: it holds no WAL segment files (<20 digits>.wal); is this the WAL directory (settlement --wal-dir, default ./data/wal)?"
            )
        } else {
            format!(
                "{shown} is not a WAL directory: it holds no segment files (<20 digits>.wal), only other files such as {}",
                others[0]
            )
        }));
    }
    segments.sort_by_key(|(lsn, _)| *lsn);
    let mut files = Vec::with_capacity(segments.len());
    for (_, path) in segments {
        let header = read_header(&path)?;
        if let Err(HeaderError::UnsupportedVersion { found }) = &header {
            return Err(CliError::cannot(format!(
                "{}: WAL format version {found} is not supported by this wal-inspect (it reads versions {OLDEST_READ_FORMAT_VERSION} to {FORMAT_VERSION}); use the wal-inspect of the settlement release that wrote this WAL",
                path.display()
            )));
        }
        files.push(SegmentFile { path, header });
    }
    if let Some(Err(first)) = files
        .iter()
        .all(|f| f.header.is_err())
        .then(|| &files[0].header)
    {
        return Err(CliError::cannot(format!(
            "{shown} holds no readable WAL segment: {}: {first}",
            files[0].path.display()
        )));
    }
    let writer = lock_holder(&dir.join(LOCK_FILE_NAME));
    let mut temp_files: Vec<String> = others
        .into_iter()
        .filter(|n| {
            n.strip_suffix(".tmp")
                .is_some_and(|s| parse_segment_file_name(s).is_some())
        })
        .collect();
    temp_files.sort();
    Ok(WalDir {
        dir: dir.to_path_buf(),
        writer,
        temp_files,
    })
}

/// Reads and decodes a segment's header; an unreadable file is "cannot inspect".
pub(super) fn read_header(path: &Path) -> Result<Result<SegmentHeader, HeaderError>, CliError> {
    let bytes = read_prefix(path, SEGMENT_HEADER_SIZE_BYTES)
        .map_err(|e| CliError::cannot(format!("cannot read {}: {e}", path.display())))?;
    Ok(SegmentHeader::decode(&bytes))
}

/// Up to `len` bytes from the start of `path`.
pub(super) fn read_prefix(path: &Path, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    File::open(path)?.take(len as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Who holds a lock on `path` (the WAL's `LOCK` file, an embedded store), read from
/// `/proc/locks` without taking any lock ourselves: probing with `flock` would, for an instant,
/// make a starting `settlement` fail to take its writer lock.
pub(super) fn lock_holder(path: &Path) -> Option<LockHolder> {
    let meta = std::fs::metadata(path).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    find_lock(
        &locks,
        dev_major(meta.dev()),
        dev_minor(meta.dev()),
        meta.ino(),
    )
}

/// Finds a lock on the file `major:minor:inode` in the text of `/proc/locks`.
fn find_lock(locks: &str, major: u64, minor: u64, inode: u64) -> Option<LockHolder> {
    for line in locks.lines() {
        let fields: Vec<&str> = line.split_whitespace().filter(|f| *f != "->").collect();
        // "1: FLOCK ADVISORY WRITE 8559 fe:00:5562373 0 EOF"
        if fields.len() < 6 {
            continue;
        }
        let mut id = fields[5].split(':');
        let (Some(maj), Some(min), Some(ino), None) = (id.next(), id.next(), id.next(), id.next())
        else {
            continue;
        };
        let parsed = (
            u64::from_str_radix(maj, 16),
            u64::from_str_radix(min, 16),
            ino.parse::<u64>(),
        );
        if parsed == (Ok(major), Ok(minor), Ok(inode)) {
            let pid = fields[4].parse::<u32>().ok().filter(|&p| p > 0);
            return Some(LockHolder { pid });
        }
    }
    None
}

/// glibc's `gnu_dev_major`.
fn dev_major(dev: u64) -> u64 {
    ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)
}

/// glibc's `gnu_dev_minor`.
fn dev_minor(dev: u64) -> u64 {
    (dev & 0xff) | ((dev >> 12) & !0xff)
}

/// Tracks the consistent prefix while records stream by: records with dense LSNs from the first
/// one on. The first gap (a missing segment, a record lost to corruption) ends it.
#[derive(Default)]
pub(super) struct Prefix {
    expected: Option<Lsn>,
    broken: bool,
}

impl Prefix {
    /// Is this record (the next one visited) still part of the consistent prefix?
    pub(super) fn admit(&mut self, lsn: Lsn) -> bool {
        let ok = !self.broken && self.expected.is_none_or(|e| e == lsn);
        self.broken |= !ok;
        self.expected = Some(lsn + 1);
        ok
    }
}

/// The result of a scan: the library's inspection plus what the tool tracked on the way.
pub(super) struct Scan {
    pub(super) inspection: Inspection,
    /// The newest entry of the consistent prefix (checkpoints always keep its segment).
    pub(super) newest_entry: Option<Lsn>,
}

/// Streams every valid record of the WAL through `visit` (with "is it in the consistent
/// prefix"), in LSN order, and returns the inspection. Memory is whatever `visit` keeps.
pub(super) fn scan(
    wal: &WalDir,
    visit: &mut dyn FnMut(&Path, &RecordView<'_>, bool),
) -> Result<Scan, CliError> {
    let mut prefix = Prefix::default();
    let mut newest_entry = None;
    let inspection = inspect_with(&wal.dir, &mut |path, r| {
        let in_prefix = prefix.admit(r.lsn);
        if in_prefix && r.record_type == RecordType::Entry {
            newest_entry = Some(r.lsn);
        }
        visit(path, r, in_prefix);
    })
    .map_err(|e| CliError::cannot(e.to_string()))?;
    Ok(Scan {
        inspection,
        newest_entry,
    })
}

/// A scan without side effects, repeated (up to three times) while a live writer is found and
/// the WAL does not look clean: an append in flight looks like a torn tail, and a checkpoint
/// can remove a segment between listing and reading it.
pub(super) fn settled_scan(wal: &WalDir) -> Result<Scan, CliError> {
    let mut attempt = 0;
    loop {
        let scan = scan(wal, &mut |_, _, _| {})?;
        attempt += 1;
        if scan.inspection.is_clean() || wal.writer.is_none() || attempt >= 3 {
            return Ok(scan);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Keeps the payloads of entries that no commit marker or checkpoint has covered yet, as records
/// stream by: memory is proportional to the uncommitted window, never to the WAL.
#[derive(Default)]
pub(super) struct PendingCollector {
    uncommitted: BTreeMap<Lsn, Vec<u8>>,
}

impl PendingCollector {
    /// Feeds one record of the consistent prefix.
    pub(super) fn feed(&mut self, r: &RecordView<'_>) {
        match r.record_type {
            RecordType::Entry => {
                self.uncommitted
                    .entry(r.lsn)
                    .or_insert_with(|| r.payload.to_vec());
            }
            RecordType::Commit => {
                if let Ok(c) = decode_payload::<CommitPayload>(r.payload) {
                    let covered: Vec<Lsn> = self
                        .uncommitted
                        .range(c.first_lsn..=c.last_lsn)
                        .map(|(lsn, _)| *lsn)
                        .collect();
                    for lsn in covered {
                        self.uncommitted.remove(&lsn);
                    }
                }
            }
            RecordType::Checkpoint => {
                if let Ok(c) = decode_payload::<CheckpointPayload>(r.payload) {
                    self.uncommitted = self
                        .uncommitted
                        .split_off(&c.committed_watermark.saturating_add(1));
                }
            }
        }
    }

    /// The pending entries the inspection names, in LSN order, and the LSNs whose payload was
    /// not seen (which only happens when the WAL changed during the scan).
    pub(super) fn finish(mut self, pending: &[Lsn]) -> (Vec<PendingEntry>, Vec<Lsn>) {
        let mut found = Vec::with_capacity(pending.len());
        let mut missing = Vec::new();
        for &lsn in pending {
            match self.uncommitted.remove(&lsn) {
                Some(payload) => found.push(PendingEntry { lsn, payload }),
                None => missing.push(lsn),
            }
        }
        (found, missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines_are_matched_by_device_and_inode() {
        let text = "1: FLOCK  ADVISORY  WRITE 8559 fe:00:5562373 0 EOF\n\
                    2: OFDLCK ADVISORY  WRITE -1 08:11:77 0 EOF\n\
                    3: POSIX  ADVISORY  WRITE 4242 08:11:99 1073741824 1073741824\n\
                    3: -> POSIX  ADVISORY  WRITE 4343 08:11:99 1073741824 1073741824\n";
        assert_eq!(
            find_lock(text, 0xfe, 0, 5562373),
            Some(LockHolder { pid: Some(8559) })
        );
        assert_eq!(find_lock(text, 8, 0x11, 77), Some(LockHolder { pid: None }));
        assert_eq!(
            find_lock(text, 8, 0x11, 99),
            Some(LockHolder { pid: Some(4242) })
        );
        assert_eq!(find_lock(text, 8, 0x12, 77), None);
        assert_eq!(find_lock("garbage\n\n", 8, 0x11, 77), None);
    }

    #[test]
    fn device_numbers_split_like_glibc() {
        assert_eq!((dev_major(0xfe00), dev_minor(0xfe00)), (0xfe, 0));
        assert_eq!((dev_major(0x0811), dev_minor(0x0811)), (8, 0x11));
    }

    #[test]
    fn the_prefix_ends_at_the_first_gap() {
        let mut p = Prefix::default();
        assert!(p.admit(5) && p.admit(6));
        assert!(!p.admit(8));
        assert!(!p.admit(9));
    }
}
