//! Dedup by what was settled, not by a high-water mark (P9).
//!
//! Every output sequence ever seen ends in exactly one durable state: **settled** (a trade or
//! movement row), **rejected** (a rejection row with its reason), or an **open hole** (a gap not
//! yet filled). [`SequenceState`] holds the highest sequence accounted for and the open holes
//! (disjoint ranges, all below it); everything at or below the highest that is not in a hole was
//! settled or rejected. So a message is:
//!
//! - the next one (`high + 1`, or the first ever): accepted;
//! - beyond the next: accepted, and the sequences skipped become an open hole (a gap);
//! - inside an open hole: accepted, and that part of the hole closes (a backfill);
//! - at or below the highest and not in a hole: a duplicate (a re-delivered reject too, so it is
//!   not written to the rejects file again);
//! - below the first sequence ever accounted for (a message that arrived after its successors
//!   at the very start): accepted, the range grows downwards and any sequences between become
//!   an open hole;
//! - more than `max_jump` past the highest (or below the first): refused as a wild sequence,
//!   never taken as progress (one bad `output_sequence` must not turn every later message into
//!   a "duplicate").
//!
//! The hole rows a batch opens, shrinks, splits or closes are gathered in [`HoleChanges`] and go
//! into the batch's control entry (WAL and store), so the state survives restarts and a new WAL
//! over an existing store rebuilds it from the store's open holes in O(holes).

use std::collections::BTreeMap;

use crate::ledger::{HighWaterRow, HoleRow};

/// Default `--max-seq-jump`: a sequence more than this far past the highest one is refused.
pub const DEFAULT_MAX_SEQUENCE_JUMP: u64 = 1_000_000;
/// Largest `--max-seq-jump`.
pub const MAX_SEQUENCE_JUMP_LIMIT: u64 = 1 << 40;

/// Where a sequence falls, before it is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The next sequence (or the first ever).
    Next,
    /// Past the next: `first_missing..=last_missing` were never seen.
    Gap {
        /// First skipped sequence.
        first_missing: u64,
        /// Last skipped sequence.
        last_missing: u64,
    },
    /// Inside the open hole `first..=last`.
    Fill {
        /// The hole's first sequence.
        hole_first: u64,
        /// The hole's last sequence.
        hole_last: u64,
    },
    /// Already settled or rejected.
    Duplicate,
    /// Below the first sequence accounted for, within `max_jump` of it: the range grows
    /// downwards; `first_missing..=last_missing` (when not empty) become an open hole.
    BeforeFirst {
        /// The first sequence accounted for until now.
        first: u64,
    },
    /// More than `max_jump` past the highest, or below the first.
    TooFar {
        /// The sequence it is compared with (the highest, or the first).
        from: u64,
        /// The bound.
        max_jump: u64,
    },
}

/// The hole rows changed by one batch: first sequence -> (last sequence, still open). A row
/// changed twice keeps its final state.
pub type HoleChanges = BTreeMap<u64, (u64, bool)>;

/// The dedup state of one stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceState {
    first: Option<u64>,
    high: Option<u64>,
    /// Open holes, first -> last; disjoint, each below `high`.
    holes: BTreeMap<u64, u64>,
    max_jump: u64,
}

impl SequenceState {
    /// An empty state (nothing seen yet).
    pub fn new(max_jump: u64) -> SequenceState {
        assert!(
            (1..=MAX_SEQUENCE_JUMP_LIMIT).contains(&max_jump),
            "max_jump {max_jump} outside 1..=2^40"
        );
        SequenceState {
            first: None,
            high: None,
            holes: BTreeMap::new(),
            max_jump,
        }
    }

    /// The state a store's high-water row and open holes describe.
    pub fn from_store(
        high_water: Option<HighWaterRow>,
        open_holes: &[HoleRow],
        max_jump: u64,
    ) -> Result<SequenceState, String> {
        let mut state = SequenceState::new(max_jump);
        let Some(hw) = high_water.filter(|hw| hw.high_sequence > 0 || hw.first_sequence > 0) else {
            if let Some(h) = open_holes.first() {
                return Err(format!(
                    "the store has open hole {}..={} but no high-water row",
                    h.first_sequence, h.last_sequence
                ));
            }
            return Ok(state);
        };
        if hw.first_sequence > hw.high_sequence {
            return Err(format!(
                "the store's high-water row says first sequence {} above the highest {}",
                hw.first_sequence, hw.high_sequence
            ));
        }
        state.first = Some(hw.first_sequence);
        state.high = Some(hw.high_sequence);
        for h in open_holes.iter().filter(|h| h.open) {
            let overlaps = state
                .holes
                .range(..=h.last_sequence)
                .next_back()
                .is_some_and(|(_, &last)| last >= h.first_sequence);
            if h.first_sequence > h.last_sequence
                || h.first_sequence < hw.first_sequence
                || h.last_sequence >= hw.high_sequence
                || overlaps
            {
                return Err(format!(
                    "the store's open hole {}..={} is not inside {}..{} or overlaps another",
                    h.first_sequence, h.last_sequence, hw.first_sequence, hw.high_sequence
                ));
            }
            state.holes.insert(h.first_sequence, h.last_sequence);
        }
        Ok(state)
    }

    /// The same state with another `max_jump` (1..=[`MAX_SEQUENCE_JUMP_LIMIT`]).
    pub fn with_max_jump(mut self, max_jump: u64) -> SequenceState {
        assert!(
            (1..=MAX_SEQUENCE_JUMP_LIMIT).contains(&max_jump),
            "max_jump {max_jump} outside 1..=2^40"
        );
        self.max_jump = max_jump;
        self
    }

    /// Where `seq` falls (changes nothing).
    pub fn place(&self, seq: u64) -> Placement {
        let (Some(first), Some(high)) = (self.first, self.high) else {
            return Placement::Next;
        };
        if seq < first {
            if first - seq > self.max_jump {
                return Placement::TooFar {
                    from: first,
                    max_jump: self.max_jump,
                };
            }
            return Placement::BeforeFirst { first };
        }
        if seq > high {
            if seq - high > self.max_jump {
                return Placement::TooFar {
                    from: high,
                    max_jump: self.max_jump,
                };
            }
            if seq == high + 1 {
                return Placement::Next;
            }
            return Placement::Gap {
                first_missing: high + 1,
                last_missing: seq - 1,
            };
        }
        match self.holes.range(..=seq).next_back() {
            Some((&hole_first, &hole_last)) if hole_last >= seq => Placement::Fill {
                hole_first,
                hole_last,
            },
            _ => Placement::Duplicate,
        }
    }

    /// Accounts for `seq` (settled or rejected), whose [`SequenceState::place`] was
    /// `placement`, recording in `changes` the hole rows this opens or closes.
    ///
    /// # Panics
    /// If `placement` is a [`Placement::Duplicate`] or [`Placement::TooFar`].
    pub fn accept(&mut self, seq: u64, placement: Placement, changes: &mut HoleChanges) {
        debug_assert_eq!(placement, self.place(seq), "the placement of {seq}");
        match placement {
            Placement::Next => {}
            Placement::BeforeFirst { first } => {
                if seq + 1 < first {
                    self.holes.insert(seq + 1, first - 1);
                    changes.insert(seq + 1, (first - 1, true));
                }
                self.first = Some(seq);
                return;
            }
            Placement::Gap {
                first_missing,
                last_missing,
            } => {
                self.holes.insert(first_missing, last_missing);
                changes.insert(first_missing, (last_missing, true));
            }
            Placement::Fill {
                hole_first,
                hole_last,
            } => {
                self.holes.remove(&hole_first);
                if seq == hole_first {
                    changes.insert(hole_first, (hole_last, false));
                } else {
                    self.holes.insert(hole_first, seq - 1);
                    changes.insert(hole_first, (seq - 1, true));
                }
                if seq < hole_last {
                    self.holes.insert(seq + 1, hole_last);
                    changes.insert(seq + 1, (hole_last, true));
                }
                return;
            }
            other => panic!("sequence {seq} cannot be accepted: {other:?}"),
        }
        self.first = Some(self.first.map_or(seq, |f| f.min(seq)));
        self.high = Some(seq);
    }

    /// The first sequence accounted for.
    pub fn first(&self) -> Option<u64> {
        self.first
    }

    /// The highest sequence accounted for.
    pub fn high(&self) -> Option<u64> {
        self.high
    }

    /// The open holes, in order, as `(first, last)`.
    pub fn holes(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.holes.iter().map(|(&f, &l)| (f, l))
    }

    /// Number of open holes.
    pub fn hole_count(&self) -> usize {
        self.holes.len()
    }

    /// Number of sequences in open holes.
    pub fn missing_count(&self) -> u64 {
        self.holes.iter().map(|(&f, &l)| l - f + 1).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn accept(state: &mut SequenceState, seq: u64) -> HoleChanges {
        let mut changes = HoleChanges::new();
        state.accept(seq, state.place(seq), &mut changes);
        changes
    }

    #[test]
    fn gaps_open_holes_and_fills_close_them_in_any_order() {
        let mut s = SequenceState::new(100);
        assert_eq!(s.place(1), Placement::Next);
        accept(&mut s, 1);
        accept(&mut s, 2);
        assert_eq!(
            s.place(6),
            Placement::Gap {
                first_missing: 3,
                last_missing: 5
            }
        );
        assert_eq!(accept(&mut s, 6), HoleChanges::from([(3, (5, true))]));
        assert_eq!(s.place(2), Placement::Duplicate);
        assert_eq!(s.place(6), Placement::Duplicate);
        // Fill the middle: the hole splits.
        assert_eq!(
            accept(&mut s, 4),
            HoleChanges::from([(3, (3, true)), (5, (5, true))])
        );
        assert_eq!(s.holes().collect::<Vec<_>>(), vec![(3, 3), (5, 5)]);
        assert_eq!(accept(&mut s, 5), HoleChanges::from([(5, (5, false))]));
        assert_eq!(accept(&mut s, 3), HoleChanges::from([(3, (3, false))]));
        assert_eq!(s.hole_count(), 0);
        assert_eq!(s.place(4), Placement::Duplicate);
        assert_eq!(
            s.place(107),
            Placement::TooFar {
                from: 6,
                max_jump: 100
            }
        );
        assert!(matches!(s.place(106), Placement::Gap { .. }));
    }

    #[test]
    fn a_first_message_that_arrives_late_extends_the_range_downwards() {
        let mut s = SequenceState::new(100);
        accept(&mut s, 500);
        assert_eq!(s.place(498), Placement::BeforeFirst { first: 500 });
        assert_eq!(accept(&mut s, 498), HoleChanges::from([(499, (499, true))]));
        assert_eq!((s.first(), s.high()), (Some(498), Some(500)));
        assert!(matches!(s.place(499), Placement::Fill { .. }));
        assert_eq!(accept(&mut s, 497), HoleChanges::new());
        assert_eq!(
            s.place(396),
            Placement::TooFar {
                from: 497,
                max_jump: 100
            }
        );
    }

    #[test]
    fn the_state_round_trips_through_the_store_rows() {
        let mut s = SequenceState::new(1000);
        for seq in [10, 11, 15, 13, 30, 31, 20] {
            accept(&mut s, seq);
        }
        let holes: Vec<HoleRow> = s
            .holes()
            .map(|(f, l)| HoleRow {
                first_sequence: f,
                last_sequence: l,
                open: true,
                lsn: 1,
            })
            .collect();
        let hw = HighWaterRow {
            lsn: 9,
            first_sequence: s.first().unwrap(),
            high_sequence: s.high().unwrap(),
            max_trade_id: 0,
        };
        assert_eq!(SequenceState::from_store(Some(hw), &holes, 1000), Ok(s));
        assert!(SequenceState::from_store(None, &holes, 1000).is_err());
        let outside = HoleRow {
            first_sequence: 40,
            last_sequence: 41,
            open: true,
            lsn: 1,
        };
        assert!(SequenceState::from_store(Some(hw), &[outside], 1000).is_err());
    }

    proptest! {
        /// Against a model that remembers every sequence: a sequence is accepted exactly once
        /// (unless refused as too far or before the first), holes are exactly the unseen
        /// sequences between the first and the highest, and the hole rows written, replayed on
        /// a table, leave exactly the open holes.
        #[test]
        fn matches_a_model_of_every_sequence(seqs in proptest::collection::vec(0u64..200, 1..300)) {
            let max_jump = 50;
            let mut s = SequenceState::new(max_jump);
            let mut seen: BTreeSet<u64> = BTreeSet::new();
            let mut table: BTreeMap<u64, (u64, bool)> = BTreeMap::new();
            for seq in seqs {
                let placement = s.place(seq);
                let model_first = seen.first().copied();
                let model_high = seen.last().copied();
                match placement {
                    Placement::Duplicate => prop_assert!(seen.contains(&seq)),
                    Placement::TooFar { from, .. } => {
                        prop_assert!(
                            (Some(from) == model_high && seq > from + max_jump)
                                || (Some(from) == model_first && seq + max_jump < from)
                        );
                    }
                    _ => {
                        prop_assert!(!seen.contains(&seq));
                        let mut changes = HoleChanges::new();
                        s.accept(seq, placement, &mut changes);
                        table.extend(changes);
                        seen.insert(seq);
                    }
                }
                let (first, high) = (*seen.first().unwrap(), *seen.last().unwrap());
                let model_holes: Vec<u64> = (first..=high).filter(|q| !seen.contains(q)).collect();
                let holes: Vec<u64> = s.holes().flat_map(|(f, l)| f..=l).collect();
                prop_assert_eq!(&holes, &model_holes);
                let from_table: Vec<u64> = table
                    .iter()
                    .filter(|(_, (_, open))| *open)
                    .flat_map(|(&f, &(l, _))| f..=l)
                    .collect();
                prop_assert_eq!(from_table, model_holes);
            }
        }
    }
}
