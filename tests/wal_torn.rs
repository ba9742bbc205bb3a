//! Crash simulation on real files (promise P5): truncate a copy of a WAL at every byte offset of
//! its last records, and flip single bits in every record in turn.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use settlement_wal::wal::{inspect, inspect_with, TailState, Wal, WalError};

/// `(offset, payload_end, lsn)` of every record in the WAL, with its file.
fn record_layout(dir: &Path) -> Vec<(PathBuf, usize, usize, u64)> {
    let mut out = Vec::new();
    inspect_with(dir, &mut |path, r| {
        out.push((
            path.to_path_buf(),
            r.offset,
            r.offset + 24 + r.payload.len(),
            r.lsn,
        ));
    })
    .unwrap();
    out
}

fn build_wal(dir: &Path, entries: u64) {
    let wal = open_small(dir);
    for i in 0..entries {
        wal.append(&payload(i)).unwrap();
        if i % 3 == 2 {
            wal.sync().unwrap();
        }
    }
    wal.sync().unwrap();
    wal.commit_range(1, 2).unwrap();
    wal.sync().unwrap();
}

/// LSNs of every record left after a writable open (which repairs a torn tail).
fn surviving_lsns(dir: &Path) -> Vec<u64> {
    drop(open_small(dir));
    record_layout(dir).iter().map(|r| r.3).collect()
}

#[test]
fn truncating_at_every_offset_of_the_last_records_drops_only_the_cut_record() {
    let src = temp_dir();
    build_wal(src.path(), 12);
    let layout = record_layout(src.path());
    let seg = segment_files(src.path()).remove(0);
    let original = std::fs::read(&seg).unwrap();
    // The last five records: four entries and the commit marker.
    let from = layout[layout.len() - 5].1;
    let end = layout.last().unwrap().1 + 24 + 16 + 8;
    for cut in from..=end {
        let work = temp_dir();
        let copy = work.path().join(seg.file_name().unwrap());
        std::fs::write(&copy, &original[..cut]).unwrap();
        let view = inspect(work.path()).unwrap();
        assert!(
            view.is_clean() || view.is_torn_only(),
            "cut at {cut}: {:?}",
            view.problem
        );
        let wal = Wal::open(work.path(), small_options())
            .unwrap_or_else(|e| panic!("cut at {cut}: open failed: {e}"));
        // Loud: a short newest segment is never a crash's doing.
        assert_eq!(
            wal.open_report().short_newest_segment,
            Some((copy.clone(), cut as u64)),
            "cut at {cut}"
        );
        // A record survives when its header and payload are wholly before the cut (padding is
        // zeros and may be cut: the file is re-extended with zeros).
        let expected_next = layout
            .iter()
            .filter(|(_, _, payload_end, _)| *payload_end <= cut)
            .count() as u64
            + 1;
        assert_eq!(wal.last_lsn() + 1, expected_next, "cut at {cut}");
        // Every surviving entry reads back intact.
        for e in wal.pending().unwrap() {
            assert_eq!(e.payload, payload(e.lsn - 1), "cut at {cut}");
        }
        // The repaired WAL accepts appends and reopens clean.
        let lsn = wal.append(b"after the cut").unwrap();
        wal.sync().unwrap();
        drop(wal);
        let wal = Wal::open(work.path(), small_options()).unwrap();
        assert!(wal.open_report().torn_tail.is_none(), "cut at {cut}");
        assert_eq!(wal.last_lsn(), lsn);
    }
}

#[test]
fn a_bit_flip_in_the_last_record_is_a_torn_tail_and_earlier_is_corruption() {
    let src = temp_dir();
    build_wal(src.path(), 20);
    let layout = record_layout(src.path());
    let seg = segment_files(src.path()).remove(0);
    let original = std::fs::read(&seg).unwrap();
    let all_lsns = surviving_lsns(src.path());
    for (idx, (_, offset, payload_end, lsn)) in layout.iter().enumerate() {
        let is_last = idx + 1 == layout.len();
        let record_end = payload_end.div_ceil(8) * 8;
        for byte in *offset..record_end {
            let bit = byte % 8;
            let mut bytes = original.clone();
            bytes[byte] ^= 1 << bit;
            let work = temp_dir();
            std::fs::write(work.path().join(seg.file_name().unwrap()), &bytes).unwrap();
            let result = Wal::open(work.path(), small_options());
            if is_last {
                let wal = result.unwrap_or_else(|e| panic!("flip at {byte}: {e}"));
                let torn = wal
                    .open_report()
                    .torn_tail
                    .clone()
                    .expect("a torn tail was cut");
                assert_eq!(torn.offset as usize, *offset);
                assert_eq!(wal.last_lsn(), lsn - 1);
                drop(wal);
                assert_eq!(surviving_lsns(work.path()), all_lsns[..all_lsns.len() - 1]);
            } else {
                match result {
                    Err(WalError::Corrupt {
                        offset: at,
                        expected_lsn,
                        ..
                    }) => {
                        assert_eq!(at as usize, *offset, "flip at byte {byte} of LSN {lsn}");
                        assert_eq!(expected_lsn, *lsn);
                    }
                    other => panic!(
                        "flip at byte {byte} (LSN {lsn}): expected corruption, got {other:?}"
                    ),
                }
                // Nothing was changed on disk by the failed open.
                let after = std::fs::read(work.path().join(seg.file_name().unwrap())).unwrap();
                assert_eq!(after, bytes);
            }
        }
    }
}

#[test]
fn damage_in_a_sealed_segment_is_corruption_even_at_its_end() {
    let src = temp_dir();
    {
        let wal = open_small(src.path());
        wal.append_batch(&(0..3000).map(payload).collect::<Vec<_>>())
            .unwrap();
        wal.sync().unwrap();
    }
    let segs = segment_files(src.path());
    assert!(segs.len() >= 2);
    let layout = record_layout(src.path());
    let (path, offset, _, lsn) = layout
        .iter()
        .rfind(|(p, ..)| *p == segs[0])
        .unwrap()
        .clone();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0x01], offset as u64 + 30).unwrap();
    match Wal::open(src.path(), small_options()) {
        Err(WalError::Corrupt {
            path: p,
            offset: at,
            expected_lsn,
            ..
        }) => {
            assert_eq!(p, path);
            assert_eq!(at as usize, offset);
            assert_eq!(expected_lsn, lsn);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn a_missing_middle_segment_is_an_lsn_gap() {
    let src = temp_dir();
    {
        let wal = open_small(src.path());
        wal.append_batch(&(0..5000).map(payload).collect::<Vec<_>>())
            .unwrap();
        wal.sync().unwrap();
    }
    let segs = segment_files(src.path());
    assert!(segs.len() >= 3);
    std::fs::remove_file(&segs[1]).unwrap();
    let err = Wal::open(src.path(), small_options()).unwrap_err();
    assert!(
        matches!(&err, WalError::Corrupt { path, .. } if *path == segs[2]),
        "{err:?}"
    );
    assert!(err.to_string().contains("LSN gap"), "{err}");
}

#[test]
fn garbage_after_the_end_mark_is_cut_and_a_valid_record_after_garbage_is_corruption() {
    let src = temp_dir();
    build_wal(src.path(), 5);
    let layout = record_layout(src.path());
    let end = layout.last().unwrap().2.div_ceil(8) * 8;
    let seg = segment_files(src.path()).remove(0);
    let original = std::fs::read(&seg).unwrap();

    // Stray non-zero bytes well after the end: a torn tail, zeroed.
    let work = temp_dir();
    let mut bytes = original.clone();
    bytes[end + 4096 + 3] = 0x77;
    let copy = work.path().join(seg.file_name().unwrap());
    std::fs::write(&copy, &bytes).unwrap();
    let wal = Wal::open(work.path(), small_options()).unwrap();
    let torn = wal.open_report().torn_tail.clone().unwrap();
    assert_eq!(torn.offset as usize, end);
    drop(wal);
    assert!(std::fs::read(&copy).unwrap()[end..].iter().all(|&b| b == 0));

    // A hole (zeroed record) followed by valid records: corruption, not a torn tail.
    let work = temp_dir();
    let mut bytes = original.clone();
    let (_, off, payload_end, lsn) = layout[1].clone();
    bytes[off..payload_end].fill(0);
    std::fs::write(work.path().join(seg.file_name().unwrap()), &bytes).unwrap();
    match Wal::open(work.path(), small_options()) {
        Err(WalError::Corrupt {
            offset,
            expected_lsn,
            ..
        }) => {
            assert_eq!(offset as usize, off);
            assert_eq!(expected_lsn, lsn);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    let view = inspect(work.path()).unwrap();
    assert!(matches!(view.problem, Some((_, TailState::Corrupt { .. }))));
}
