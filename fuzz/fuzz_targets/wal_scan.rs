//! Arbitrary bytes as a whole segment file through the recovery scan (read-only and writable).
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| settlement_wal::wal::fuzzing::scratch_dir("wal-fuzz-scan"))
}

fuzz_target!(|data: &[u8]| {
    settlement_wal::wal::fuzzing::scan_arbitrary_segment(data, scratch());
});
