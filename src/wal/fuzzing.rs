//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the corpus replay test
//! (`tests/fuzz_corpus.rs`), so the stable `cargo test` runs exactly the fuzzed code paths.
//! Each function panics only when a WAL invariant is broken, never on bad input.

use std::path::Path;

use super::format::{
    decode_payload, decode_record, record_size, CheckpointPayload, CommitPayload, Decoded,
    SegmentHeader, MAX_PAYLOAD_SIZE_BYTES, MIN_SEGMENT_SIZE_BYTES, RECORD_ALIGNMENT_BYTES,
    SEGMENT_HEADER_SIZE_BYTES,
};
use super::{inspect, TailState, Wal, WalError, WalOptions};

/// Feeds arbitrary bytes to the header decoder, the record decoder (at every aligned offset) and
/// the payload decoders.
pub fn decode_arbitrary(data: &[u8]) {
    let _ = SegmentHeader::decode(data);
    let salt = data
        .get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let hasher = SegmentHeader {
        first_lsn: 1,
        salt,
        segment_size_bytes: MIN_SEGMENT_SIZE_BYTES,
    }
    .record_hasher();
    let mut offset = 0;
    while offset <= data.len() {
        if let Decoded::Record(r) = decode_record(data, offset, &hasher) {
            assert!(r.payload.len() <= MAX_PAYLOAD_SIZE_BYTES);
            assert_eq!(r.size_bytes, record_size(r.payload.len()));
            assert!(r.offset + 24 + r.payload.len() <= data.len());
        }
        offset += RECORD_ALIGNMENT_BYTES;
    }
    let _ = decode_payload::<CommitPayload>(data);
    let _ = decode_payload::<CheckpointPayload>(data);
}

/// Writes arbitrary bytes as the only segment of a fresh WAL directory under `scratch` and runs
/// the recovery scan over it, read-only and then for writing. The first byte picks the mode:
/// even = the bytes are the whole file; odd = a valid header (first LSN 1, salt from the next 8
/// bytes) followed by the rest as the record area, padded with zeros to the minimum segment size.
///
/// Invariants: inspection and opening agree (clean or torn tail: open succeeds; corruption: open
/// fails with `Corrupt` and changes nothing), and after a successful open the WAL is clean.
pub fn scan_arbitrary_segment(data: &[u8], scratch: &Path) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).expect("create scratch dir");
    let file = scratch.join("00000000000000000001.wal");
    let bytes = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let salt = rest
            .get(..8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        let body = rest.get(8..).unwrap_or(&[]);
        let size = MIN_SEGMENT_SIZE_BYTES as usize;
        let mut bytes = SegmentHeader {
            first_lsn: 1,
            salt,
            segment_size_bytes: size as u64,
        }
        .encode()
        .to_vec();
        let take = body.len().min(size - SEGMENT_HEADER_SIZE_BYTES);
        bytes.extend_from_slice(&body[..take]);
        bytes.resize(size, 0);
        bytes
    };
    std::fs::write(&file, &bytes).expect("write scratch segment");
    let view = inspect(scratch);
    let opts = WalOptions::default().segment_size_bytes(MIN_SEGMENT_SIZE_BYTES);
    let opened = Wal::open(scratch, opts.clone());
    match (&view, &opened) {
        (Ok(v), Ok(_)) => assert!(
            v.is_clean() || v.is_torn_only(),
            "open succeeded on a WAL inspection called corrupt: {:?}",
            v.problem
        ),
        (
            Ok(v),
            Err(
                WalError::Corrupt { .. }
                | WalError::NotAWal { .. }
                | WalError::UnsupportedVersion { .. },
            ),
        ) => {
            assert!(matches!(v.problem, Some((_, TailState::Corrupt { .. }))));
            let after = std::fs::read(&file).expect("read back");
            assert!(after == bytes, "a failed open changed the file");
        }
        (Ok(v), Err(e)) => panic!("inspection gave {:?} but open failed with {e}", v.problem),
        (Err(_), Ok(_)) => panic!("open succeeded where inspection failed"),
        (Err(_), Err(_)) => {}
    }
    if let Ok(wal) = opened {
        let pending = wal.pending().expect("pending after open");
        drop(wal);
        let again = inspect(scratch).expect("inspect after repair");
        assert!(
            again.is_clean(),
            "not clean after open: {:?}",
            again.problem
        );
        assert_eq!(
            again.pending,
            pending.iter().map(|e| e.lsn).collect::<Vec<_>>()
        );
        let reopened = Wal::open(scratch, opts).expect("reopen");
        assert!(reopened.open_report().torn_tail.is_none());
    }
}
