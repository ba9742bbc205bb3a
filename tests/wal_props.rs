//! Property tests: random sequences of append / commit / sync / checkpoint / reopen against a
//! simple model. Invariants: every synced record survives reopen, nothing appears that was not
//! appended, and pending = appended minus committed.

mod common;

use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use settlement_wal::wal::{inspect, Wal};

#[derive(Clone, Debug)]
enum Op {
    /// Append this many entries with payloads of these sizes.
    Append(Vec<usize>),
    Sync,
    /// Commit a range given as fractions of the durable entries.
    Commit(u8, u8),
    Checkpoint,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(1usize..2000, 1..40).prop_map(Op::Append),
        3 => Just(Op::Sync),
        3 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::Commit(a.min(b), a.max(b))),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Reopen),
    ]
}

fn bytes_for(lsn: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (lsn as usize * 131 + i * 17) as u8 | 1)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_operation_sequences_match_the_model(ops in prop::collection::vec(op(), 1..40)) {
        let dir = temp_dir();
        let mut wal = open_small(dir.path());
        // Model: entry LSN -> payload, for entries not yet committed.
        let mut pending: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut durable_entries: Vec<u64> = Vec::new();
        let mut unsynced: Vec<u64> = Vec::new();
        let mut last_lsn = 0u64;
        for op in ops {
            match op {
                Op::Append(sizes) => {
                    let payloads: Vec<Vec<u8>> = sizes
                        .iter()
                        .enumerate()
                        .map(|(i, &len)| bytes_for(last_lsn + 1 + i as u64, len))
                        .collect();
                    let (first, last) = wal.append_batch(&payloads).unwrap();
                    prop_assert_eq!(first, last_lsn + 1);
                    for (lsn, p) in (first..=last).zip(payloads) {
                        pending.insert(lsn, p);
                        unsynced.push(lsn);
                    }
                    last_lsn = last;
                }
                Op::Sync => {
                    prop_assert_eq!(wal.sync().unwrap(), last_lsn);
                    durable_entries.append(&mut unsynced);
                }
                Op::Commit(a, b) => {
                    if durable_entries.is_empty() {
                        continue;
                    }
                    let n = durable_entries.len();
                    let i = a as usize * (n - 1) / 255;
                    let j = b as usize * (n - 1) / 255;
                    let (first, last) = (durable_entries[i], durable_entries[j]);
                    let marker = wal.commit_range(first, last).unwrap();
                    prop_assert_eq!(marker, last_lsn + 1);
                    last_lsn = marker;
                    pending.retain(|lsn, _| *lsn < first || *lsn > last);
                }
                Op::Checkpoint => {
                    let report = wal.checkpoint().unwrap();
                    let watermark = report.committed_watermark;
                    prop_assert!(pending.keys().all(|&lsn| lsn > watermark));
                    if !report.removed.is_empty() {
                        last_lsn += 1; // the checkpoint record
                    }
                }
                Op::Reopen => {
                    drop(wal);
                    wal = open_small(dir.path());
                    // A clean drop loses nothing (the mapping's pages are in the page cache), so
                    // unsynced entries come back too, and are durable after the reopen.
                    durable_entries.append(&mut unsynced);
                    prop_assert!(wal.open_report().torn_tail.is_none());
                }
            }
            prop_assert_eq!(wal.last_lsn(), last_lsn);
            let got: Vec<(u64, Vec<u8>)> =
                wal.pending().unwrap().into_iter().map(|e| (e.lsn, e.payload)).collect();
            let want: Vec<(u64, Vec<u8>)> = pending.clone().into_iter().collect();
            prop_assert_eq!(got, want);
        }
        // Finally: sync, reopen, and the read-only inspection agrees with the writer.
        wal.sync().unwrap();
        drop(wal);
        let view = inspect(dir.path()).unwrap();
        prop_assert!(view.is_clean());
        prop_assert_eq!(view.pending, pending.keys().copied().collect::<Vec<_>>());
        let wal = Wal::open(dir.path(), small_options()).unwrap();
        prop_assert_eq!(wal.pending_count(), pending.len());
        prop_assert_eq!(wal.last_lsn(), last_lsn);
    }
}
