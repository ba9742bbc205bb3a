//! Issue 15 point 9: a page the writer cannot page in (here: the active segment truncated
//! under the writer, the same failure as EIO reading the page at the write offset) is an
//! error, not a SIGBUS. This test has its own binary: without the check, the copy into the
//! mapping raises SIGBUS and kills the process.

use settlement_wal::wal::format::MIN_SEGMENT_SIZE_BYTES;
use settlement_wal::wal::{Wal, WalError, WalOptions};

#[test]
fn appending_into_a_segment_truncated_under_the_writer_is_an_error_not_a_sigbus() {
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).unwrap();
    let dir = tempfile::tempdir_in(base).unwrap();
    let wal = Wal::open(
        dir.path(),
        WalOptions::default().segment_size_bytes(MIN_SEGMENT_SIZE_BYTES),
    )
    .unwrap();
    let seg = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "wal"))
        .unwrap();
    // Someone truncates the active segment before the writer touched its pages.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let mut result = Ok(0);
    for _ in 0..200 {
        result = wal.append(&[0x42; 1000]);
        if result.is_err() {
            break;
        }
    }
    let err = result.expect_err("appends past the truncated end fail");
    assert!(
        matches!(&err, WalError::Io { path, .. } if *path == seg),
        "{err}"
    );
    assert!(err.to_string().contains("SIGBUS"), "{err}");
    assert!(matches!(wal.append(b"x"), Err(WalError::Failed { .. })));
}
