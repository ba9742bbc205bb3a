//! Structured: arbitrary sequences of append / commit / sync / checkpoint / crash-cut / bit-flip /
//! reopen against a real WAL (256 KiB segments) and a model; see `wal::fuzzing::wal_ops`.
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| settlement_wal::wal::fuzzing::scratch_dir("wal-fuzz-ops"))
}

fuzz_target!(|data: &[u8]| {
    settlement_wal::wal::fuzzing::wal_ops(data, scratch());
});
