//! One segment file: preallocated, with its verified header. A segment opened for writing is
//! mapped (appends are copies into the shared mapping, made durable with msync); every *read* of
//! segment bytes goes through [`WalFs::read_at`] instead, so a failing disk is a
//! [`WalError::ReadFailed`] naming the file and offset, never a SIGBUS in a mapping.

use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use memmap2::{Advice, MmapOptions, MmapRaw, UncheckedAdvice};

use super::error::{Result, WalError};
use super::format::{
    segment_file_name, HeaderError, Lsn, SegmentHeader, WalIdentity, FORMAT_VERSION,
    SEGMENT_HEADER_SIZE_BYTES,
};
use super::fs::{read_exact_at, write_all_at, WalFs};

/// A segment file: its header, and for a segment opened for writing, its shared mapping.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) path: PathBuf,
    pub(crate) header: SegmentHeader,
    pub(crate) hasher: crc32fast::Hasher,
    /// Bytes readable in the file: its length when opened read-only (shorter than the segment
    /// size for a file cut short by someone), the segment size when writable.
    pub(crate) len_bytes: usize,
    /// The writable shared mapping; `None` for a segment opened read-only.
    map: Option<MmapRaw>,
    /// The open file: reads go through it, and it outlives the mapping.
    file: File,
    /// Offset up to which the mapping's pages (from where the writer starts) were made present
    /// and writable with a checked `MADV_POPULATE_WRITE`: the writer writes only below it, so a
    /// page that cannot be paged in (EIO reading it, beyond a truncated end) is an error
    /// instead of a SIGBUS. Only grows.
    pub(crate) populated_to: std::sync::atomic::AtomicUsize,
}

/// A fresh random salt for a new segment (std's per-process random keys, mixed with time and pid).
pub(crate) fn random_salt() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.finish()
}

/// A fresh random, non-zero `wal_id` for a new WAL.
pub(crate) fn random_wal_id() -> u64 {
    // A zero draw (one in 2^64) takes another; the bound keeps the loop finite even against a
    // broken hasher.
    for _ in 0..64 {
        let id = random_salt();
        if id != 0 {
            return id;
        }
    }
    1
}

impl Segment {
    /// Creates the segment that starts at `first_lsn` (format version 2, carrying `identity`): a
    /// temporary file is preallocated, its header written and synced, then it is renamed into
    /// place and the directory is synced, so a segment file under its final name always has a
    /// durable header. Without `replace`, an existing file of that name is an error (never
    /// silently replaced); with it (an active segment without records being replaced by
    /// [`super::Wal::rebind`]) it is replaced atomically.
    ///
    /// A failure after the rename (the directory sync) removes the final-named file again when
    /// it can; [`CreateError::name_taken`] says whether a file of the new segment's name may
    /// still be in the directory, in which case the caller must stop writing (the next open
    /// sees that file).
    pub(crate) fn create(
        fs: &dyn WalFs,
        dir: &Path,
        first_lsn: Lsn,
        segment_size_bytes: u64,
        identity: WalIdentity,
        replace: bool,
    ) -> std::result::Result<Segment, CreateError> {
        let path = dir.join(segment_file_name(first_lsn));
        let tmp = dir.join(format!("{}.tmp", segment_file_name(first_lsn)));
        let before_rename = |error| CreateError {
            error,
            name_taken: false,
        };
        let file = fs
            .create_file(&tmp)
            .map_err(|e| before_rename(WalError::io("creating segment", &tmp, e)))?;
        let header = SegmentHeader::new(first_lsn, random_salt(), segment_size_bytes, identity);
        let prepared = (|| {
            fs.allocate(&file, &tmp, segment_size_bytes)
                .map_err(|e| WalError::io("preallocating segment", &tmp, e))?;
            // A short write continues where it stopped; a write that makes no progress is an
            // error. The header is never treated as written until every byte is.
            write_all_at(fs, &file, &tmp, &header.encode(), 0)
                .map_err(|e| WalError::io("writing segment header", &tmp, e))?;
            fs.sync_file(&file, &tmp)
                .map_err(|e| WalError::io("syncing new segment", &tmp, e))?;
            fs.rename(&tmp, &path, replace).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    WalError::Io {
                        op: "renaming a new segment into place: a segment file of that name already exists (it was not made by this writer: move it out of the WAL directory, then reopen)",
                        path: path.clone(),
                        source: e,
                    }
                } else {
                    WalError::io("renaming segment", &path, e)
                }
            })
        })();
        if let Err(error) = prepared {
            // Best effort: a half-made temporary file is removed again at the next open anyway.
            let _ = fs.remove_file(&tmp);
            return Err(before_rename(error));
        }
        if let Err(e) = fs.sync_dir(dir) {
            let error = WalError::io("syncing WAL directory", dir, e);
            // The new name may or may not be durable: take it back, so that the writer can go
            // on in the old segment. If that fails too, the name stays taken.
            let undone = !replace && fs.remove_file(&path).is_ok() && fs.sync_dir(dir).is_ok();
            return Err(CreateError {
                error,
                name_taken: !undone,
            });
        }
        let map = map_writable(&file, &path).map_err(|error| CreateError {
            error,
            name_taken: true,
        })?;
        tracing::debug!(path = %path.display(), first_lsn, segment_size_bytes, "created segment");
        Ok(Segment {
            path,
            hasher: header.record_hasher(),
            header,
            len_bytes: map.len(),
            map: Some(map),
            file,
            populated_to: std::sync::atomic::AtomicUsize::new(SEGMENT_HEADER_SIZE_BYTES),
        })
    }

    /// Drops the file's clean cached pages (`POSIX_FADV_DONTNEED`), so the next reads come from
    /// the medium. A hint: failure only means the cache is used.
    pub(crate) fn drop_cached_pages(&self) {
        // SAFETY: plain syscall on a valid open descriptor.
        let _ =
            unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }

    /// Makes the file's data durable (`fsync` through `fs`): at open, every segment may hold
    /// bytes a killed predecessor appended and never synced, which the page cache still has.
    pub(crate) fn sync_data(&self, fs: &dyn WalFs) -> Result<()> {
        fs.sync_file(&self.file, &self.path)
            .map_err(|e| WalError::io("syncing inherited data of", &self.path, e))
    }

    /// Opens an existing segment and verifies its header (read through `fs`). With `writable`, a
    /// file shorter than its header says (truncated by someone) is extended back with
    /// preallocated zeros first, and the file is mapped for appending. Without it, nothing on
    /// disk changes and nothing is mapped.
    pub(crate) fn open(
        fs: &dyn WalFs,
        path: &Path,
        expected_first_lsn: Lsn,
        writable: bool,
    ) -> Result<Segment> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| WalError::io("opening segment", path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| WalError::io("reading metadata of", path, e))?
            .len();
        let mut head = [0u8; SEGMENT_HEADER_SIZE_BYTES];
        let head_len = file_len.min(SEGMENT_HEADER_SIZE_BYTES as u64) as usize;
        read_exact_at(fs, &file, path, &mut head[..head_len], 0)
            .map_err(|e| WalError::read("reading the header of segment", path, 0, head_len, e))?;
        let header = SegmentHeader::decode(&head[..head_len]).map_err(|e| header_error(path, e))?;
        if header.first_lsn != expected_first_lsn {
            return Err(WalError::Corrupt {
                path: path.to_path_buf(),
                offset: 16,
                expected_lsn: expected_first_lsn,
                reason: format!(
                    "header says the segment starts at LSN {} but its file name says {}",
                    header.first_lsn, expected_first_lsn
                ),
            });
        }
        if file_len > header.segment_size_bytes {
            return Err(WalError::Corrupt {
                path: path.to_path_buf(),
                offset: header.segment_size_bytes,
                expected_lsn: expected_first_lsn,
                reason: format!(
                    "file is {file_len} bytes, longer than the {} bytes its header records",
                    header.segment_size_bytes
                ),
            });
        }
        let (map, len_bytes) = if writable {
            if file_len < header.segment_size_bytes {
                tracing::warn!(path = %path.display(), file_len, segment_size_bytes = header.segment_size_bytes,
                    "segment file is shorter than its header records; extending it with zeros");
                fs.allocate(&file, path, header.segment_size_bytes)
                    .map_err(|e| WalError::io("re-extending segment", path, e))?;
            }
            let map = map_writable(&file, path)?;
            let len = map.len();
            (Some(map), len)
        } else {
            // A hint only: the recovery scan reads the file front to back.
            // SAFETY: plain syscall on a valid open descriptor.
            let _ =
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
            (None, file_len as usize)
        };
        Ok(Segment {
            path: path.to_path_buf(),
            hasher: header.record_hasher(),
            header,
            len_bytes,
            map,
            file,
            // Set to the write offset by the writer that maps it.
            populated_to: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Fills `buf` with the bytes at `offset` through `fs` (short reads continue; `EIO` or a file
    /// that ends early is a [`WalError::ReadFailed`] naming this file, `op` and the offset).
    pub(crate) fn read_exact(
        &self,
        fs: &dyn WalFs,
        op: &'static str,
        offset: usize,
        buf: &mut [u8],
    ) -> Result<()> {
        read_exact_at(fs, &self.file, &self.path, buf, offset as u64)
            .map_err(|e| WalError::read(op, &self.path, offset as u64, buf.len(), e))
    }

    /// The writable mapping.
    ///
    /// # Panics
    /// On a segment opened read-only: only the active segment (always opened writable) and
    /// segments it rolled over from are ever written or synced.
    pub(crate) fn map(&self) -> &MmapRaw {
        self.map
            .as_ref()
            .expect("only segments opened for writing are mapped")
    }

    /// The mapped bytes of a writable segment (for debug checks of the writer; every reader goes
    /// through [`Segment::read_exact`]).
    pub(crate) fn mapped_bytes(&self) -> &[u8] {
        let map = self.map();
        // SAFETY: the mapping lives as long as `self`, and the caller (the writer, under its
        // state lock) is the only one writing to it.
        unsafe { std::slice::from_raw_parts(map.as_ptr(), map.len()) }
    }

    /// Copies `bytes` to `offset` in the mapping.
    ///
    /// # Safety
    /// The caller must hold the writer's exclusive state lock and `offset..offset+len` must lie
    /// past every byte any reader may be reading.
    pub(crate) unsafe fn write(&self, offset: usize, bytes: &[u8]) {
        let map = self.map();
        assert!(
            offset + bytes.len() <= map.len(),
            "write past the segment end"
        );
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), map.as_mut_ptr().add(offset), bytes.len());
    }

    /// Makes appended records `from..to` durable (msync through `fs`), releasing the mapping of
    /// their whole pages first ([`Segment::release_synced_pages`]). Every sync of appended
    /// records comes here; syncs of zeroed ranges (tail cleaning, a rolled-back batch) do not,
    /// as those pages are written again.
    pub(crate) fn sync_appended(
        &self,
        fs: &dyn WalFs,
        from: usize,
        to: usize,
    ) -> std::io::Result<()> {
        self.release_synced_pages(from, to);
        fs.sync_range(self.map(), &self.path, from, to - from)
    }

    /// Drops this process's page-table entries for the whole pages of `from..to` (a range
    /// about to be synced, that the writer never touches again: appends only go forward).
    /// The dirty data stays in the page cache and the msync that follows writes it out; what
    /// changes is that the msync finds no mapped page to write-protect. Without this, msync
    /// write-protects every page it cleans and flushes the TLB of every CPU running one of our
    /// threads once per page: an inter-processor interrupt per 4 KiB, 14% of all CPU in the
    /// instant-ack pipeline (perf, `docs/benchmarks-pipeline.md`). Here the kernel flushes
    /// once for the whole range. A failure only loses that saving.
    fn release_synced_pages(&self, from: usize, to: usize) {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let start = from - from % page;
        let end = to - to % page;
        if end <= start || (end - start) / page < RELEASE_MIN_PAGES {
            // Too few pages: the madvise would cost a TLB flush of its own, as many as the
            // msync saves (the small syncs of concurrent single-entry writers were ~5% slower).
            return;
        }
        // SAFETY: DONTNEED on a shared file mapping keeps the data (the dirty bits move to the
        // page cache); nothing holds a reference into these pages (the writer's copies are
        // done, readers use `read_exact`), and a later touch would fault the page back in.
        let result = unsafe {
            self.map()
                .unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
        };
        debug_assert!(result.is_ok(), "madvise DONTNEED failed: {result:?}");
    }

    /// Zeroes `offset..offset+len`. Same safety contract as [`Segment::write`].
    pub(crate) unsafe fn zero(&self, offset: usize, len: usize) {
        let map = self.map();
        assert!(offset + len <= map.len(), "zero past the segment end");
        std::ptr::write_bytes(map.as_mut_ptr().add(offset), 0, len);
    }
}

/// Why [`Segment::create`] failed, and whether the new segment's file name may be taken.
#[derive(Debug)]
pub(crate) struct CreateError {
    pub(crate) error: WalError,
    /// A file under the new segment's final name may be in the directory (the rename happened
    /// and could not be undone): the writer must not append any record with that LSN to the
    /// old segment.
    pub(crate) name_taken: bool,
}

/// [`Segment::release_synced_pages`] leaves ranges of fewer whole pages mapped.
const RELEASE_MIN_PAGES: usize = 4;

fn map_writable(file: &File, path: &Path) -> Result<MmapRaw> {
    let map = MmapOptions::new()
        .map_raw(file)
        .map_err(|e| WalError::io("mapping segment", path, e))?;
    // Without readahead each first touch faults in one 4 KiB page, and msync writes back little
    // more than the dirtied pages (see docs/benchmarks.md: large readahead folios made every msync
    // write ~200 KiB to 1 MiB).
    map.advise(Advice::Random)
        .map_err(|e| WalError::io("advising mapping of", path, e))?;
    Ok(map)
}

/// Turns a header problem into the matching typed error.
pub(crate) fn header_error(path: &Path, e: HeaderError) -> WalError {
    match e {
        HeaderError::BadMagic => WalError::NotAWal {
            path: path.to_path_buf(),
            what: "segment",
            reason: e.to_string(),
        },
        HeaderError::UnsupportedVersion { found } => WalError::UnsupportedVersion {
            path: path.to_path_buf(),
            found,
            supported: FORMAT_VERSION,
        },
        other => WalError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            expected_lsn: super::format::parse_segment_file_name(
                &path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            )
            .unwrap_or(0),
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::fs::OsFs;

    /// Releasing the page-table entries of written, unsynced pages loses nothing: the bytes
    /// are still there through a read, through the mapping, after the msync and after a reopen.
    #[test]
    fn released_pages_keep_their_bytes_through_sync_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let size_bytes = 1 << 20;
        let identity = WalIdentity {
            wal_id: 7,
            owner_id: 0,
        };
        let seg = Segment::create(&OsFs, dir.path(), 1, size_bytes, identity, false).unwrap();
        let from = SEGMENT_HEADER_SIZE_BYTES;
        let to = from + 5 * 4096 + 1000; // five whole pages and a partial one
        let pattern: Vec<u8> = (0..to - from).map(|i| (i % 251) as u8 + 1).collect();
        // SAFETY: the test is the only writer; nothing reads this range concurrently.
        unsafe { seg.write(from, &pattern) };
        seg.release_synced_pages(from, to);
        // Released pages fault back in through the mapping with their data.
        assert_eq!(&seg.mapped_bytes()[from..to], &pattern[..]);
        seg.release_synced_pages(from, to);
        let mut back = vec![0u8; pattern.len()];
        seg.read_exact(&OsFs, "reading back", from, &mut back)
            .unwrap();
        assert_eq!(back, pattern);
        seg.sync_appended(&OsFs, from, to).unwrap();
        // The writer goes on past the partial page after a release.
        // SAFETY: as above.
        unsafe { seg.write(to, b"after") };
        let path = seg.path.clone();
        drop(seg);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[from..to], &pattern[..]);
        assert_eq!(&bytes[to..to + 5], b"after");
    }
}
