//! Arbitrary bytes into the segment-header, record and payload decoders.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    settlement_wal::wal::fuzzing::decode_arbitrary(data);
});
