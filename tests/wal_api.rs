//! The WAL's public behaviour: append/sync/reopen, commit markers, pending, checkpoints, segment
//! rolling, the writer lock, limits and typed errors.

mod common;

use std::sync::Arc;

use common::*;
use settlement_wal::wal::{
    inspect, Retention, TailState, Wal, WalError, WalOptions, MAX_PAYLOAD_SIZE_BYTES,
};

#[test]
fn appended_and_synced_entries_survive_reopen_in_order() {
    let dir = temp_dir();
    let mut lsns = Vec::new();
    {
        let wal = open_small(dir.path());
        for i in 0..100 {
            lsns.push(wal.append(&payload(i)).unwrap());
        }
        assert_eq!(wal.sync().unwrap(), *lsns.last().unwrap());
    }
    assert_eq!(lsns, (1..=100).collect::<Vec<_>>());
    let wal = open_small(dir.path());
    let pending = wal.pending().unwrap();
    assert_eq!(pending.len(), 100);
    for (i, e) in pending.iter().enumerate() {
        assert_eq!(e.lsn, i as u64 + 1);
        assert_eq!(e.payload, payload(i as u64));
    }
    assert_eq!(wal.open_report().records, 100);
    assert!(wal.open_report().torn_tail.is_none());
}

#[test]
fn commit_markers_remove_entries_from_pending_across_reopen() {
    let dir = temp_dir();
    {
        let wal = open_small(dir.path());
        let (first, last) = wal
            .append_batch(&(0..10).map(payload).collect::<Vec<_>>())
            .unwrap();
        assert_eq!((first, last), (1, 10));
        wal.sync().unwrap();
        wal.commit_range(2, 4).unwrap();
        wal.commit(7).unwrap();
        assert_eq!(wal.pending_count(), 6);
        wal.sync().unwrap();
    }
    let wal = open_small(dir.path());
    let pending: Vec<u64> = wal.pending().unwrap().iter().map(|e| e.lsn).collect();
    assert_eq!(pending, vec![1, 5, 6, 8, 9, 10]);
    assert_eq!(wal.committed_watermark(), 0);
    wal.commit(1).unwrap();
    assert_eq!(wal.committed_watermark(), 4);
}

#[test]
fn lsns_keep_increasing_across_restarts_and_markers_take_lsns() {
    let dir = temp_dir();
    {
        let wal = open_small(dir.path());
        wal.append(b"a").unwrap();
        wal.sync().unwrap();
        assert_eq!(wal.commit(1).unwrap(), 2);
        wal.sync().unwrap();
    }
    for round in 0..3u64 {
        let wal = open_small(dir.path());
        let lsn = wal.append(b"b").unwrap();
        assert_eq!(lsn, 3 + round);
        wal.sync().unwrap();
    }
}

#[test]
fn a_batch_costs_one_sync() {
    let dir = temp_dir();
    let wal = open_small(dir.path());
    let before = wal.stats().syncs;
    wal.append_batch(&(0..500).map(payload).collect::<Vec<_>>())
        .unwrap();
    wal.sync().unwrap();
    assert_eq!(wal.stats().syncs - before, 1);
    // Nothing new: no sync at all.
    wal.sync().unwrap();
    assert_eq!(wal.stats().syncs - before, 1);
}

#[test]
fn commit_refuses_unappended_and_undurable_ranges() {
    let dir = temp_dir();
    let wal = open_small(dir.path());
    wal.append(b"x").unwrap();
    assert!(
        matches!(wal.commit(1), Err(WalError::InvalidCommit { .. })),
        "not durable yet"
    );
    wal.sync().unwrap();
    assert!(matches!(wal.commit(5), Err(WalError::InvalidCommit { .. })));
    assert!(matches!(
        wal.commit_range(1, 0),
        Err(WalError::InvalidCommit { .. })
    ));
    assert!(matches!(wal.commit(0), Err(WalError::InvalidCommit { .. })));
    wal.commit(1).unwrap();
    wal.commit(1).unwrap(); // idempotent
    assert_eq!(wal.pending_count(), 0);
}

#[test]
fn record_limits_are_enforced_on_write() {
    let dir = temp_dir();
    let wal = open_small(dir.path());
    assert!(matches!(wal.append(b""), Err(WalError::EmptyPayload)));
    let big = vec![1u8; MAX_PAYLOAD_SIZE_BYTES + 1];
    assert!(matches!(
        wal.append(&big),
        Err(WalError::RecordTooLarge { .. })
    ));
    let max = vec![2u8; MAX_PAYLOAD_SIZE_BYTES];
    let lsn = wal.append(&max).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let wal = open_small(dir.path());
    assert_eq!(wal.pending().unwrap()[0].lsn, lsn);
    assert_eq!(wal.pending().unwrap()[0].payload, max);
}

#[test]
fn segments_roll_and_checkpoint_deletes_only_fully_committed_ones() {
    let dir = temp_dir();
    let wal = open_small(dir.path());
    let entries: Vec<Vec<u8>> = (0..6000).map(payload).collect();
    let (first, last) = wal.append_batch(&entries).unwrap();
    wal.sync().unwrap();
    let segs = segment_files(dir.path());
    assert!(
        segs.len() >= 4,
        "6000 entries of ~170 B roll 256 KiB segments: {}",
        segs.len()
    );
    // Nothing committed: nothing to remove.
    assert!(wal.checkpoint().unwrap().removed.is_empty());
    // Commit all but the last entry: every sealed segment goes, the active one stays.
    wal.commit_range(first, last - 1).unwrap();
    let report = wal.checkpoint().unwrap();
    assert_eq!(report.committed_watermark, last - 1);
    assert_eq!(report.removed.len(), segs.len() - 1);
    assert_eq!(segment_files(dir.path()).len(), 1);
    wal.sync().unwrap();
    drop(wal);
    let wal = open_small(dir.path());
    let pending: Vec<u64> = wal.pending().unwrap().iter().map(|e| e.lsn).collect();
    assert_eq!(pending, vec![last]);
    assert!(wal.append(b"more").unwrap() > last);
}

#[test]
fn checkpoint_keeps_segments_with_uncommitted_entries() {
    let dir = temp_dir();
    let wal = open_small(dir.path());
    let entries: Vec<Vec<u8>> = (0..6000).map(payload).collect();
    let (first, last) = wal.append_batch(&entries).unwrap();
    wal.sync().unwrap();
    // Entry `first` stays uncommitted: the oldest segment must stay, and with it all newer ones.
    wal.commit_range(first + 1, last).unwrap();
    let before = segment_files(dir.path()).len();
    assert!(wal.checkpoint().unwrap().removed.is_empty());
    assert_eq!(segment_files(dir.path()).len(), before);
    wal.commit(first).unwrap();
    assert_eq!(wal.checkpoint().unwrap().removed.len(), before - 1);
}

#[test]
fn retention_keep_last_and_archive() {
    let dir = temp_dir();
    let wal = Wal::open(
        dir.path(),
        small_options().retention(Retention::KeepLast(2)),
    )
    .unwrap();
    let (first, last) = wal
        .append_batch(&(0..8000).map(payload).collect::<Vec<_>>())
        .unwrap();
    wal.sync().unwrap();
    let n = segment_files(dir.path()).len();
    wal.commit_range(first, last).unwrap();
    wal.checkpoint().unwrap();
    assert_eq!(
        segment_files(dir.path()).len(),
        3,
        "2 kept + the active one (had {n})"
    );
    drop(wal);

    let dir = temp_dir();
    let wal = Wal::open(
        dir.path(),
        small_options().retention(Retention::Archive("old".into())),
    )
    .unwrap();
    let (first, last) = wal
        .append_batch(&(0..8000).map(payload).collect::<Vec<_>>())
        .unwrap();
    wal.sync().unwrap();
    let n = segment_files(dir.path()).len();
    wal.commit_range(first, last).unwrap();
    let removed = wal.checkpoint().unwrap().removed.len();
    assert_eq!(removed, n - 1);
    assert_eq!(segment_files(&dir.path().join("old")).len(), removed);
    drop(wal);
    // The archive directory does not confuse the next open.
    Wal::open(dir.path(), small_options()).unwrap();
}

#[test]
fn second_writer_gets_a_clear_lock_error_and_read_only_inspection_works() {
    let dir = temp_dir();
    let wal = open_small(dir.path());
    wal.append(b"x").unwrap();
    wal.sync().unwrap();
    let err = Wal::open(dir.path(), small_options()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, WalError::Locked { .. }), "{err:?}");
    assert!(text.contains(&dir.path().display().to_string()), "{text}");
    assert!(
        text.contains(&format!("pid {}", std::process::id())),
        "{text}"
    );
    let view = inspect(dir.path()).unwrap();
    assert!(view.is_clean());
    assert_eq!(view.pending, vec![1]);
    drop(wal);
    Wal::open(dir.path(), small_options()).unwrap();
}

#[test]
fn bad_directories_and_files_give_typed_errors() {
    let dir = temp_dir();
    // A file instead of a directory.
    let file = dir.path().join("plain");
    std::fs::write(&file, b"hello").unwrap();
    let err = Wal::open(&file, small_options()).unwrap_err();
    assert!(
        matches!(err, WalError::NotAWal { .. } | WalError::Io { .. }),
        "{err:?}"
    );
    // A directory with other people's files.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), b"x").unwrap();
    let err = Wal::open(&other, small_options()).unwrap_err();
    assert!(matches!(err, WalError::NotAWal { .. }), "{err:?}");
    // A segment-named file that is not a segment.
    let fake = dir.path().join("fake");
    std::fs::create_dir(&fake).unwrap();
    std::fs::write(fake.join("00000000000000000001.wal"), vec![7u8; 4096]).unwrap();
    let err = Wal::open(&fake, small_options()).unwrap_err();
    assert!(matches!(err, WalError::NotAWal { .. }), "{err:?}");
    assert!(err.to_string().contains("00000000000000000001.wal"));
    // A future format version.
    let future = dir.path().join("future");
    {
        let wal = open_small(&future);
        wal.append(b"x").unwrap();
        wal.sync().unwrap();
    }
    let seg = segment_files(&future).remove(0);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[8] = 9;
    let crc = crc32fast::hash(&bytes[..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&seg, &bytes).unwrap();
    let err = Wal::open(&future, small_options()).unwrap_err();
    assert!(
        matches!(err, WalError::UnsupportedVersion { found: 9, .. }),
        "{err:?}"
    );
    // Bad options.
    let err = Wal::open(
        &dir.path().join("opts"),
        WalOptions::default().segment_size_bytes(1000),
    )
    .unwrap_err();
    assert!(matches!(err, WalError::InvalidOptions(_)), "{err:?}");
}

#[test]
fn leftover_temp_segment_files_are_removed() {
    let dir = temp_dir();
    {
        let wal = open_small(dir.path());
        wal.append(b"x").unwrap();
        wal.sync().unwrap();
    }
    let tmp = dir.path().join("00000000000000000099.wal.tmp");
    std::fs::write(&tmp, vec![0u8; 100]).unwrap();
    let wal = open_small(dir.path());
    assert!(!tmp.exists());
    assert_eq!(wal.open_report().removed_temp_files, vec![tmp]);
}

#[test]
fn opening_twice_gives_the_same_state() {
    let dir = temp_dir();
    {
        let wal = open_small(dir.path());
        wal.append_batch(&(0..3000).map(payload).collect::<Vec<_>>())
            .unwrap();
        wal.sync().unwrap();
        wal.commit_range(10, 2000).unwrap();
        wal.sync().unwrap();
    }
    // Tear the tail: the first open cuts it, the second sees a clean WAL with the same state.
    let seg = segment_files(dir.path()).pop().unwrap();
    let view = inspect(dir.path()).unwrap();
    let used = view.segments.last().unwrap().used_bytes;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&[0xAB; 40], used).unwrap();
    }
    let first = {
        let wal = open_small(dir.path());
        assert!(wal.open_report().torn_tail.is_some());
        (
            wal.pending().unwrap(),
            wal.last_lsn(),
            wal.committed_watermark(),
        )
    };
    let wal = open_small(dir.path());
    assert!(wal.open_report().torn_tail.is_none());
    assert_eq!(
        (
            wal.pending().unwrap(),
            wal.last_lsn(),
            wal.committed_watermark()
        ),
        first
    );
}

#[test]
fn concurrent_durable_appends_share_syncs() {
    let dir = temp_dir();
    let wal = Arc::new(open_small(dir.path()));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let wal = wal.clone();
            std::thread::spawn(move || {
                let mut lsns = Vec::new();
                for i in 0..200u64 {
                    let lsn = wal.append_durable(&payload(t * 1000 + i)).unwrap();
                    assert!(wal.durable_lsn() >= lsn);
                    lsns.push(lsn);
                }
                lsns
            })
        })
        .collect();
    let mut all: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    all.sort();
    assert_eq!(all, (1..=1600).collect::<Vec<_>>());
    let stats = wal.stats();
    assert!(
        stats.syncs <= 1600,
        "never more than one sync per append: {stats:?}"
    );
}

#[test]
fn inspection_reports_corruption_but_still_describes_the_wal() {
    let dir = temp_dir();
    {
        let wal = open_small(dir.path());
        wal.append_batch(&(0..5000).map(payload).collect::<Vec<_>>())
            .unwrap();
        wal.sync().unwrap();
    }
    let oldest = segment_files(dir.path()).remove(0);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&oldest)
            .unwrap();
        f.write_all_at(&[0xFF], 64 + 30).unwrap();
    }
    let err = Wal::open(dir.path(), small_options()).unwrap_err();
    match &err {
        WalError::Corrupt {
            path,
            offset,
            expected_lsn,
            ..
        } => {
            assert_eq!(path, &oldest);
            assert_eq!(*offset, 64);
            assert_eq!(*expected_lsn, 1);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    let view = inspect(dir.path()).unwrap();
    assert!(matches!(
        view.problem,
        Some((_, TailState::Corrupt { offset: 64, .. }))
    ));
    assert_eq!(view.segments.len(), segment_files(dir.path()).len());
    assert!(view.segments[1..].iter().all(|s| s.counts.entries > 0));
}

#[test]
fn the_newest_entry_is_always_readable_even_after_checkpoints() {
    let dir = temp_dir();
    let wal = open_small(dir.path());
    assert!(wal.last_entry().unwrap().is_none());
    let (first, last) = wal
        .append_batch(&(0..2000).map(payload).collect::<Vec<_>>())
        .unwrap();
    wal.sync().unwrap();
    wal.commit_range(first, last).unwrap();
    // Markers alone fill the next segments; the entry's segment must survive every checkpoint.
    for _ in 0..8000 {
        wal.commit(last).unwrap();
    }
    wal.sync().unwrap();
    wal.checkpoint().unwrap();
    let e = wal.last_entry().unwrap().expect("newest entry kept");
    assert_eq!((e.lsn, e.payload), (last, payload(1999)));
    drop(wal);
    let wal = open_small(dir.path());
    assert_eq!(wal.last_entry().unwrap().unwrap().lsn, last);
    assert_eq!(wal.pending_count(), 0);
}

#[test]
fn a_fresh_wal_can_start_above_a_given_lsn() {
    let dir = temp_dir();
    let wal = Wal::open(dir.path(), small_options().first_lsn(5000)).unwrap();
    assert_eq!(wal.append(b"x").unwrap(), 5000);
    wal.sync().unwrap();
    drop(wal);
    // Ignored once the WAL exists.
    let wal = Wal::open(dir.path(), small_options().first_lsn(10)).unwrap();
    assert_eq!(wal.append(b"y").unwrap(), 5001);
}
