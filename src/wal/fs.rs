//! The small file-system trait every durability-relevant WAL operation goes through, so tests can
//! inject faults (a failed msync, ENOSPC at preallocation, EIO) without touching the real disk.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use memmap2::MmapRaw;

/// File operations that decide durability. The default implementation is [`OsFs`].
///
/// Implementations must be honest: returning `Ok` from a sync means the bytes are on stable
/// storage. A wrapper that injects faults returns an error *instead of* doing the operation.
pub trait WalFs: Send + Sync + std::fmt::Debug + 'static {
    /// Preallocates `size_bytes` for `file` for real (no sparse file), so a full disk is an error
    /// here and never a SIGBUS on a later write through the mapping.
    fn allocate(&self, file: &File, path: &Path, size_bytes: u64) -> io::Result<()>;
    /// Writes `bytes` at `offset` of `file` (used for segment headers only).
    fn write_at(&self, file: &File, path: &Path, bytes: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the file's data (and the metadata needed to read it) durable.
    fn sync_file(&self, file: &File, path: &Path) -> io::Result<()>;
    /// Makes `len` bytes at `offset` of a shared file mapping durable (msync).
    fn sync_range(&self, map: &MmapRaw, path: &Path, offset: usize, len: usize) -> io::Result<()>;
    /// Makes a directory's entries (created, renamed, removed files) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsFs;

impl WalFs for OsFs {
    fn allocate(&self, file: &File, _path: &Path, size_bytes: u64) -> io::Result<()> {
        let len = libc::off_t::try_from(size_bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "size too large"))?;
        // SAFETY: plain syscall on a valid open descriptor.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    fn write_at(&self, file: &File, _path: &Path, bytes: &[u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        file.write_all_at(bytes, offset)
    }

    fn sync_file(&self, file: &File, _path: &Path) -> io::Result<()> {
        file.sync_all()
    }

    fn sync_range(&self, map: &MmapRaw, _path: &Path, offset: usize, len: usize) -> io::Result<()> {
        map.flush_range(offset, len)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}
