//! One segment file: preallocated, mapped, with its verified header.

use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};

use memmap2::{Advice, MmapOptions, MmapRaw};

use super::error::{Result, WalError};
use super::format::{
    segment_file_name, HeaderError, Lsn, SegmentHeader, FORMAT_VERSION, SEGMENT_HEADER_SIZE_BYTES,
};
use super::fs::WalFs;

/// A mapped segment file.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) path: PathBuf,
    pub(crate) header: SegmentHeader,
    pub(crate) map: MmapRaw,
    pub(crate) hasher: crc32fast::Hasher,
    // Keeps the descriptor alive for as long as the mapping (and for fdatasync/fallocate).
    pub(crate) _file: File,
}

/// A fresh random salt for a new segment (std's per-process random keys, mixed with time and pid).
fn random_salt() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.finish()
}

impl Segment {
    /// Creates the segment that starts at `first_lsn`: a temporary file is preallocated, its header
    /// written and synced, then it is renamed into place and the directory is synced, so a segment
    /// file under its final name always has a durable header.
    pub(crate) fn create(
        fs: &dyn WalFs,
        dir: &Path,
        first_lsn: Lsn,
        segment_size_bytes: u64,
    ) -> Result<Segment> {
        let path = dir.join(segment_file_name(first_lsn));
        let tmp = dir.join(format!("{}.tmp", segment_file_name(first_lsn)));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| WalError::io("creating segment", &tmp, e))?;
        let header = SegmentHeader {
            first_lsn,
            salt: random_salt(),
            segment_size_bytes,
        };
        let result = (|| {
            fs.allocate(&file, &tmp, segment_size_bytes)
                .map_err(|e| WalError::io("preallocating segment", &tmp, e))?;
            fs.write_at(&file, &tmp, &header.encode(), 0)
                .map_err(|e| WalError::io("writing segment header", &tmp, e))?;
            fs.sync_file(&file, &tmp)
                .map_err(|e| WalError::io("syncing new segment", &tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| WalError::io("renaming segment", &path, e))?;
            fs.sync_dir(dir)
                .map_err(|e| WalError::io("syncing WAL directory", dir, e))
        })();
        if let Err(e) = result {
            // Best effort: a half-made temporary file is removed again at the next open anyway.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let map = map_writable(&file, &path)?;
        tracing::debug!(path = %path.display(), first_lsn, segment_size_bytes, "created segment");
        Ok(Segment {
            path,
            hasher: header.record_hasher(),
            header,
            map,
            _file: file,
        })
    }

    /// Opens an existing segment and verifies its header. With `writable`, a file shorter than its
    /// header says (truncated by someone) is extended back with preallocated zeros first.
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
        let head_len =
            read_prefix(&file, &mut head).map_err(|e| WalError::io("reading", path, e))?;
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
        let map = if writable {
            if file_len < header.segment_size_bytes {
                tracing::warn!(path = %path.display(), file_len, segment_size_bytes = header.segment_size_bytes,
                    "segment file is shorter than its header records; extending it with zeros");
                fs.allocate(&file, path, header.segment_size_bytes)
                    .map_err(|e| WalError::io("re-extending segment", path, e))?;
            }
            map_writable(&file, path)?
        } else {
            let map = MmapOptions::new()
                .len(file_len as usize)
                .map_raw_read_only(&file)
                .map_err(|e| WalError::io("mapping segment", path, e))?;
            let _ = map.advise(Advice::Sequential);
            map
        };
        Ok(Segment {
            path: path.to_path_buf(),
            hasher: header.record_hasher(),
            header,
            map,
            _file: file,
        })
    }

    /// The mapped bytes. For a read-only segment opened on a short file this is shorter than the
    /// segment size.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping lives as long as `self`. Within this process the only writer is the
        // WAL writer, which writes (under its state lock) only bytes past every record a reader
        // can be handed; another process appending to the same file is the documented
        // "consistent prefix" caveat of inspecting a live WAL.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.map.len()) }
    }

    /// Copies `bytes` to `offset` in the mapping.
    ///
    /// # Safety
    /// The caller must hold the writer's exclusive state lock and `offset..offset+len` must lie
    /// past every byte any reader may be reading.
    pub(crate) unsafe fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(
            offset + bytes.len() <= self.map.len(),
            "write past the segment end"
        );
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            self.map.as_mut_ptr().add(offset),
            bytes.len(),
        );
    }

    /// Zeroes `offset..offset+len`. Same safety contract as [`Segment::write`].
    pub(crate) unsafe fn zero(&self, offset: usize, len: usize) {
        assert!(offset + len <= self.map.len(), "zero past the segment end");
        std::ptr::write_bytes(self.map.as_mut_ptr().add(offset), 0, len);
    }
}

fn map_writable(file: &File, path: &Path) -> Result<MmapRaw> {
    let map = MmapOptions::new()
        .map_raw(file)
        .map_err(|e| WalError::io("mapping segment", path, e))?;
    // Without readahead each first touch faults in one 4 KiB page, and msync writes back little
    // more than the dirtied pages (see MEASUREMENTS.md: large readahead folios made every msync
    // write ~200 KiB to 1 MiB).
    map.advise(Advice::Random)
        .map_err(|e| WalError::io("advising mapping of", path, e))?;
    Ok(map)
}

fn read_prefix(file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read_at(&mut buf[filled..], filled as u64)?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
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
