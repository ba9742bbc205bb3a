//! The small file-system trait every durability-relevant WAL operation (and every read of segment
//! bytes) goes through, so tests can inject faults (a failed msync, ENOSPC at preallocation, a
//! short write, EIO on a read or a directory sync) without touching the real disk.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use memmap2::MmapRaw;

/// How many `EINTR` results in a row [`write_all_at`] and [`read_exact_at`] retry before they
/// give up with the error (a real signal storm ends long before this).
pub const MAX_INTERRUPTED_RETRIES: u32 = 1000;

/// File operations that decide durability or read WAL bytes. The default implementation is
/// [`OsFs`].
///
/// Implementations must be honest: returning `Ok` from a sync means the bytes are on stable
/// storage. A wrapper that injects faults returns an error *instead of* doing the operation (or,
/// for [`WalFs::write_at`] / [`WalFs::read_at`], may do less than asked and say so, like
/// `pwrite(2)` / `pread(2)`).
pub trait WalFs: Send + Sync + std::fmt::Debug + 'static {
    /// Preallocates `size_bytes` for `file` for real (no sparse file), so a full disk is an error
    /// here and never a SIGBUS on a later write through the mapping.
    fn allocate(&self, file: &File, path: &Path, size_bytes: u64) -> io::Result<()>;
    /// Writes at most `bytes.len()` bytes at `offset` of `file` in one call, like `pwrite(2)`, and
    /// returns how many it wrote. Fewer than asked (a *short write*) is allowed: callers go
    /// through [`write_all_at`], which continues after a short write and turns a write that makes
    /// no progress into an error. Used for segment headers only.
    fn write_at(&self, file: &File, path: &Path, bytes: &[u8], offset: u64) -> io::Result<usize>;
    /// Reads at most `buf.len()` bytes at `offset` of `file` in one call, like `pread(2)`, and
    /// returns how many it read (0 at the end of the file). Callers go through
    /// [`read_exact_at`]. Every read of segment bytes (the recovery scan, segment headers,
    /// pending entries) comes here, so a failing disk is an `EIO` error and not a SIGBUS in a
    /// memory mapping.
    fn read_at(&self, file: &File, path: &Path, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Makes the file's data (and the metadata needed to read it) durable.
    fn sync_file(&self, file: &File, path: &Path) -> io::Result<()>;
    /// Makes `len` bytes at `offset` of a shared file mapping durable (msync).
    fn sync_range(&self, map: &MmapRaw, path: &Path, offset: usize, len: usize) -> io::Result<()>;
    /// Makes a directory's entries (created, renamed, removed files) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Creates (or truncates) the file `path` for reading and writing. Every file the WAL
    /// creates comes here, so a recording implementation sees each directory entry appear.
    fn create_file(&self, path: &Path) -> io::Result<File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
    }
    /// Renames `from` to `to` (same file system). Without `replace`, an existing `to` is an
    /// [`io::ErrorKind::AlreadyExists`] error and nothing changes (`renameat2(RENAME_NOREPLACE)`,
    /// or a hard link and an unlink where the file system lacks it); with it, `to` is replaced
    /// atomically. Not durable until [`WalFs::sync_dir`] of both directories.
    fn rename(&self, from: &Path, to: &Path, replace: bool) -> io::Result<()> {
        if replace {
            std::fs::rename(from, to)
        } else {
            rename_noreplace(from, to)
        }
    }
    /// Removes the file `path`. Not durable until [`WalFs::sync_dir`] of its directory.
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
}

/// `rename(2)` that never replaces an existing `to`: `renameat2(RENAME_NOREPLACE)`, falling back
/// to `link` + `unlink` on file systems without it (`EINVAL`, `ENOSYS`).
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated paths; plain syscall.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        _ => Err(err),
    }
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

    fn write_at(&self, file: &File, _path: &Path, bytes: &[u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::write_at(file, bytes, offset)
    }

    fn read_at(&self, file: &File, _path: &Path, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(file, buf, offset)
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

/// Writes all of `bytes` at `offset` through `fs`, continuing after short writes (and up to
/// [`MAX_INTERRUPTED_RETRIES`] `EINTR`s in a row).
///
/// A call that writes nothing (`Ok(0)`) is a [`io::ErrorKind::WriteZero`] error saying how many
/// bytes were missing where, never a silent success; a call claiming more bytes than asked is an
/// [`io::ErrorKind::InvalidData`] error. Each successful call makes progress, so the loop is bounded
/// by `bytes.len()` calls plus the `EINTR` retries.
pub fn write_all_at(
    fs: &dyn WalFs,
    file: &File,
    path: &Path,
    bytes: &[u8],
    offset: u64,
) -> io::Result<()> {
    let len = bytes.len();
    transfer_all(
        len,
        offset,
        "write",
        |done, at| {
            io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "short write: the file system accepted 0 of the {} remaining bytes at offset {at} ({done} of {len} written)",
                    len - done
                ),
            )
        },
        |done, at| fs.write_at(file, path, &bytes[done..], at),
    )
}

/// Fills `buf` from `offset` through `fs`, continuing after short reads (and up to
/// [`MAX_INTERRUPTED_RETRIES`] `EINTR`s in a row).
///
/// The end of the file before `buf` is full is an [`io::ErrorKind::UnexpectedEof`] error (the
/// file shrank after its length was taken); a call claiming more bytes than asked is an
/// [`io::ErrorKind::InvalidData`] error.
pub fn read_exact_at(
    fs: &dyn WalFs,
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
) -> io::Result<()> {
    let len = buf.len();
    transfer_all(
        len,
        offset,
        "read",
        |_, at| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the file ends at byte {at}, before the {len} bytes asked at offset {offset} (was it truncated while being read?)"
                ),
            )
        },
        |done, at| fs.read_at(file, path, &mut buf[done..], at),
    )
}

/// The loop of [`write_all_at`] and [`read_exact_at`]: calls `step(done, at)` until `len` bytes
/// are through, retrying up to [`MAX_INTERRUPTED_RETRIES`] `EINTR`s in a row. A call that moves
/// nothing is `no_progress(done, at)`; a call claiming more than was asked is an
/// [`io::ErrorKind::InvalidData`] error naming `what` (`"read"`, `"write"`).
fn transfer_all(
    len: usize,
    offset: u64,
    what: &str,
    no_progress: impl Fn(usize, u64) -> io::Error,
    mut step: impl FnMut(usize, u64) -> io::Result<usize>,
) -> io::Result<()> {
    let mut done = 0usize;
    let mut interrupted = 0u32;
    while done < len {
        let at = offset + done as u64;
        match step(done, at) {
            Ok(0) => return Err(no_progress(done, at)),
            Ok(n) if n > len - done => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{what} reported {n} bytes at offset {at} but only {} were asked",
                        len - done
                    ),
                ))
            }
            Ok(n) => {
                done += n;
                interrupted = 0;
            }
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    && interrupted < MAX_INTERRUPTED_RETRIES =>
            {
                interrupted += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
