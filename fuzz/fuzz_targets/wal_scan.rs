//! Arbitrary bytes as a whole segment file through the recovery scan (read-only and writable).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let scratch = std::env::temp_dir().join(format!("wal-fuzz-scan-{}", std::process::id()));
    settlement_wal::wal::fuzzing::scan_arbitrary_segment(data, &scratch);
});
