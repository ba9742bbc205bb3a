//! A real, small file system fills up under the WAL: no fault injection, the kernel's own ENOSPC.
//!
//! - `wal_on_a_full_*`: the `Wal` library on a 4 MiB tmpfs and on a loop-mounted 24 MiB ext4
//!   image: appends until the disk is full give `WalError::DiskFull` naming the file (an
//!   `append_batch` needing a new segment, then single `append`s filling the last segment's
//!   preallocated room), nothing of the failed call is kept, the WAL reopens consistent *while
//!   the disk is still full*, and carries on once space is freed (tmpfs remounted twice as
//!   large; ext4: a ballast file deleted).
//! - `settlement_stops_on_a_full_disk_and_recovers_after_space_is_freed`: the real `settlement`
//!   binary with its WAL on a small file system that fills during the run: it stops with an
//!   error naming the disk-full condition and the path (exit code 1, no panic); a restart on
//!   the still-full disk stops the same clean way; after the filler file is deleted a rerun
//!   over the same input settles everything exactly once (balances equal an independent model,
//!   `settlement audit` passes).
//!
//! Mounting needs root (the tests run `mount`/`umount`; a guard unmounts on every path,
//! failures included). Where it is impossible they print `skipping: <reason>` and pass, unless
//! `WAL_SMALL_FS_REQUIRED=1`, where they fail.

mod common;

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{assert_store_matches_model, model, payload, SMALL_SEGMENT_BYTES};
use settlement_wal::settle::demo::{generate, DemoSpec};
use settlement_wal::wal::{inspect, Lsn, Wal, WalError, WalOptions};

/// Which kind of small file system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `mount -t tmpfs -o size=N`: pages in memory, `fallocate` reserves them for real.
    Tmpfs,
    /// An ext4 image made with `mkfs.ext4` (no reserved blocks) and mounted with `-o loop`.
    Ext4Loop,
}

/// A mounted small file system, unmounted (and its image deleted) when dropped, whatever
/// happened in between.
struct SmallFs {
    kind: Kind,
    mount_point: PathBuf,
    image: Option<PathBuf>,
    // Dropped after `Drop::drop` unmounted: removes the mount point and the image's directory.
    _base: tempfile::TempDir,
}

fn run_cmd(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl SmallFs {
    /// Mounts a `size_bytes` file system of `kind`, or says why that is impossible here.
    fn mount(kind: Kind, size_bytes: u64) -> Result<SmallFs, String> {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            return Err("mounting a file system needs root".into());
        }
        let base = tempfile::Builder::new()
            .prefix("wal-small-fs-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
        let mount_point = base.path().join("mnt");
        std::fs::create_dir(&mount_point).map_err(|e| e.to_string())?;
        let mp = mount_point.display().to_string();
        let image = match kind {
            Kind::Tmpfs => {
                run_cmd(
                    "mount",
                    &[
                        "-t",
                        "tmpfs",
                        "-o",
                        &format!("size={size_bytes}"),
                        "tmpfs",
                        &mp,
                    ],
                )?;
                None
            }
            Kind::Ext4Loop => {
                let image = base.path().join("fs.img");
                std::fs::File::create(&image)
                    .and_then(|f| f.set_len(size_bytes))
                    .map_err(|e| format!("cannot make the image file: {e}"))?;
                let img = image.display().to_string();
                // No reserved blocks: we run as root, who could otherwise use them.
                run_cmd("mkfs.ext4", &["-q", "-F", "-m", "0", &img])?;
                run_cmd("mount", &["-o", "loop", &img, &mp])?;
                Some(image)
            }
        };
        Ok(SmallFs {
            kind,
            mount_point,
            image,
            _base: base,
        })
    }

    /// The first kind in `kinds` that mounts, or every reason none did.
    fn mount_any(kinds: &[(Kind, u64)]) -> Result<SmallFs, String> {
        let mut reasons = Vec::new();
        for &(kind, size) in kinds {
            match SmallFs::mount(kind, size) {
                Ok(fs) => return Ok(fs),
                Err(e) => reasons.push(format!("{kind:?}: {e}")),
            }
        }
        Err(reasons.join("; "))
    }

    fn path(&self) -> &Path {
        &self.mount_point
    }

    /// Bytes an unprivileged and a privileged writer can still allocate (no reserved blocks).
    fn free_bytes(&self) -> u64 {
        let c = CString::new(self.mount_point.as_os_str().as_bytes()).unwrap();
        // SAFETY: statvfs into a zeroed struct, on a valid C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bavail * st.f_frsize
    }

    /// Writes a `len_bytes` file of non-zero bytes (synced) and returns its path.
    fn ballast(&self, name: &str, len_bytes: usize) -> PathBuf {
        let path = self.mount_point.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![0xB7u8; len_bytes]).unwrap();
        f.sync_all().unwrap();
        path
    }

    /// A tmpfs grows in place: `mount -o remount,size=N`.
    fn remount_tmpfs(&self, size_bytes: u64) {
        assert_eq!(self.kind, Kind::Tmpfs);
        let mp = self.mount_point.display().to_string();
        run_cmd(
            "mount",
            &["-o", &format!("remount,size={size_bytes}"), "tmpfs", &mp],
        )
        .unwrap();
    }

    /// Writes a filler file until `leave_bytes` (or less) stay free; returns its path.
    fn fill_leaving(&self, name: &str, leave_bytes: u64) -> PathBuf {
        let path = self.mount_point.join(name);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let chunk = vec![0xF1u8; 64 * 1024];
        loop {
            let free = self.free_bytes();
            if free <= leave_bytes {
                break;
            }
            let n = ((free - leave_bytes) as usize).min(chunk.len());
            match f.write(&chunk[..n]) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        f.sync_all().unwrap();
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let mp = self.mount_point.display().to_string();
        if let Err(e) = run_cmd("umount", &[&mp]) {
            // Something (a leaked file handle of a failed test) still holds it: detach lazily so
            // the mount does not outlive the test process.
            eprintln!("umount {mp}: {e}; detaching lazily");
            let _ = run_cmd("umount", &["-l", &mp]);
        }
        if let Some(image) = &self.image {
            let _ = std::fs::remove_file(image);
        }
    }
}

/// Mounts or explains: `None` after printing `skipping: <reason>` (a failure under
/// `WAL_SMALL_FS_REQUIRED=1`).
fn mount_or_skip(test: &str, kinds: &[(Kind, u64)]) -> Option<SmallFs> {
    match SmallFs::mount_any(kinds) {
        Ok(fs) => Some(fs),
        Err(reason) => {
            if std::env::var("WAL_SMALL_FS_REQUIRED").is_ok_and(|v| v == "1") {
                panic!("{test}: cannot mount a small file system: {reason}");
            }
            eprintln!("skipping: {test}: cannot mount a small file system here: {reason}");
            None
        }
    }
}

// ---- the WAL library ---------------------------------------------------------------------

fn wal_on_a_full_file_system(kind: Kind, size_bytes: u64) {
    let test = format!("wal_on_a_full_{kind:?}");
    let Some(fs) = mount_or_skip(&test, &[(kind, size_bytes)]) else {
        return;
    };
    let dir = fs.path().join("wal");
    // Deleted to free space later (ext4): room for four more segments.
    let ballast = fs.ballast("ballast", 4 * SMALL_SEGMENT_BYTES as usize);
    let options = || WalOptions::default().segment_size_bytes(SMALL_SEGMENT_BYTES);
    let wal = Wal::open(&dir, options()).unwrap();
    let mut synced: Vec<(Lsn, Vec<u8>)> = Vec::new();
    let mut i = 0u64;
    // Batches of 256 entries, each synced, nothing committed: segments pile up until the disk
    // is full (a bounded loop: the file system holds at most `size_bytes`).
    let err = loop {
        assert!(
            i < size_bytes,
            "{test}: the disk never filled ({i} entries)"
        );
        let batch: Vec<Vec<u8>> = (i..i + 256).map(payload).collect();
        match wal.append_batch(&batch) {
            Ok((first, last)) => {
                wal.sync().unwrap();
                synced.extend((first..=last).zip(batch));
                i += 256;
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(err, WalError::DiskFull { .. }), "{test}: {err:?}");
    let text = err.to_string();
    assert!(text.contains("disk full"), "{text}");
    assert!(text.contains(&dir.display().to_string()), "{text}");
    assert!(segment_count(&dir) > 3, "{test}: several segments first");
    assert_eq!(
        wal.last_lsn(),
        synced.last().unwrap().0,
        "{test}: nothing kept"
    );

    // Take the rest of the space too, then fill the active segment's preallocated room: single
    // appends go in until one needs a new segment.
    let filler = fs.fill_leaving("filler", 0);
    let err = loop {
        let p = payload(i);
        match wal.append(&p) {
            Ok(lsn) => {
                synced.push((lsn, p));
                i += 1;
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(err, WalError::DiskFull { .. }), "{test}: {err:?}");
    wal.sync().unwrap();
    drop(wal);

    // Reopen while the disk is still full: nothing needs new space, everything synced is there.
    let wal = Wal::open(&dir, options()).unwrap();
    assert!(wal.open_report().torn_tail.is_none(), "{test}");
    let pending: Vec<(Lsn, Vec<u8>)> = wal
        .pending()
        .unwrap()
        .into_iter()
        .map(|e| (e.lsn, e.payload))
        .collect();
    assert_eq!(pending.len(), synced.len(), "{test}");
    assert!(
        pending == synced,
        "{test}: every synced entry, nothing else"
    );
    assert!(inspect(&dir).unwrap().is_clean());

    // Free space (tmpfs: remount it twice as large; ext4: delete the ballast and the filler):
    // the same WAL carries on into new segments.
    match kind {
        Kind::Tmpfs => fs.remount_tmpfs(2 * size_bytes),
        Kind::Ext4Loop => {
            std::fs::remove_file(&filler).unwrap();
            std::fs::remove_file(&ballast).unwrap();
        }
    }
    let segments = segment_count(&dir);
    while segment_count(&dir) < segments + 2 {
        let p = payload(i);
        synced.push((wal.append(&p).unwrap(), p));
        i += 1;
    }
    wal.sync().unwrap();
    drop(wal);
    let wal = Wal::open(&dir, options()).unwrap();
    assert_eq!(wal.pending().unwrap().len(), synced.len(), "{test}");
    assert_eq!(wal.last_lsn(), synced.last().unwrap().0, "{test}");
    eprintln!(
        "{test}: {} entries synced, DiskFull at {} segments, reopened full and after freeing space",
        synced.len(),
        segments
    );
}

fn segment_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "wal")
        })
        .count()
}

#[test]
fn wal_on_a_full_tmpfs_gives_disk_full_and_reopens_consistent() {
    wal_on_a_full_file_system(Kind::Tmpfs, 4 << 20);
}

#[test]
fn wal_on_a_full_ext4_gives_disk_full_and_reopens_consistent() {
    wal_on_a_full_file_system(Kind::Ext4Loop, 24 << 20);
}

// ---- the settlement binary ---------------------------------------------------------------

fn settlement(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_settlement"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn settlement_stops_on_a_full_disk_and_recovers_after_space_is_freed() {
    let test = "settlement_stops_on_a_full_disk_and_recovers_after_space_is_freed";
    let Some(fs) = mount_or_skip(test, &[(Kind::Ext4Loop, 24 << 20), (Kind::Tmpfs, 8 << 20)])
    else {
        return;
    };
    eprintln!("{test}: WAL on a {:?} at {}", fs.kind, fs.path().display());
    // The input and the store live on the big disk; only the WAL is on the small one.
    let work = common::temp_dir();
    let lines = generate(&DemoSpec {
        seed: 20261124,
        users: 60,
        trades: 20_000,
        withdraw_every: 40,
        malformed_every: 2000,
    });
    let input = work.path().join("input.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let wal_dir = fs.path().join("wal");
    let store = format!("embedded:{}", work.path().join("ledger.redb").display());
    let rejects = work.path().join("rejects.jsonl");
    let input_s = input.display().to_string();
    let wal_s = wal_dir.display().to_string();
    let rejects_s = rejects.display().to_string();
    let run_args = [
        "run",
        "--input",
        &input_s,
        "--wal-dir",
        &wal_s,
        "--store",
        &store,
        "--rejects",
        &rejects_s,
        "--segment-mib",
        "1",
        "--no-progress",
    ];
    // Room for the first 1 MiB segment and a little more, not for a second one: the run fills
    // the disk when its first segment is full (about 1/5 of the input).
    std::fs::create_dir(&wal_dir).unwrap();
    let filler = fs.fill_leaving("filler", (1 << 20) + (512 << 10));

    for attempt in ["first run", "restart on the still-full disk"] {
        let out = settlement(&run_args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{attempt}: exit code; stderr:\n{stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "{attempt}: no panic:\n{stderr}"
        );
        let error_line = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("{attempt}: an `error:` line:\n{stderr}"));
        assert!(error_line.contains("disk full"), "{attempt}: {error_line}");
        assert!(
            error_line.contains(&wal_s),
            "{attempt}: names the path: {error_line}"
        );
        assert!(
            error_line.contains("free space"),
            "{attempt}: what to do: {error_line}"
        );
        eprintln!("{test}: {attempt}: {error_line}");
        // The WAL is intact: entries were made durable before the disk filled, nothing damaged.
        let view = inspect(&wal_dir).unwrap();
        assert!(view.is_clean(), "{attempt}: {:?}", view.problem);
        assert!(
            view.next_lsn > 1000,
            "{attempt}: it ran before the disk filled"
        );
        assert_eq!(view.segments.len(), 1, "{attempt}: no second segment fits");
    }

    // Free space and run again over the same input: it recovers and finishes.
    std::fs::remove_file(&filler).unwrap();
    let out = settlement(&run_args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rerun after freeing space:\n{stderr}");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("events="), "{summary}");
    eprintln!("{test}: rerun: {}", summary.trim());
    assert!(inspect(&wal_dir).unwrap().is_clean());

    // Exactly once, balances right, audit passes (P3, P7).
    let want = model(&lines);
    let balances = assert_store_matches_model(&store, &want, test);
    eprintln!(
        "{test}: {} trades and {} balances verified, audit passed",
        want.trades.len(),
        balances
    );
}
