//! Which entries are committed: a deque of entries in LSN order, popped from the front as soon as
//! the oldest ones are committed, so memory is proportional to the uncommitted window.

use std::collections::VecDeque;

use super::format::{
    decode_payload, CheckpointPayload, CommitPayload, Lsn, RecordType, RecordView,
};

#[derive(Clone, Copy, Debug)]
struct Tracked {
    lsn: Lsn,
    segment_first_lsn: Lsn,
    offset: u32,
    committed: bool,
}

/// Entries not yet known to be committed (plus committed ones behind an uncommitted one).
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    entries: VecDeque<Tracked>,
    uncommitted: usize,
    /// `(lsn, segment first LSN, offset)` of the newest entry, committed or not.
    last_entry: Option<(Lsn, Lsn, u32)>,
    /// The highest `last_lsn` of any commit marker seen or written (0: none).
    max_commit_last: Lsn,
    /// The first retained LSN of the newest checkpoint record scanned.
    first_retained: Option<Lsn>,
}

impl Tracker {
    /// Records a newly appended (or scanned) entry. LSNs must increase.
    pub(crate) fn push(&mut self, lsn: Lsn, segment_first_lsn: Lsn, offset: u32) {
        if let Some(last) = self.entries.back() {
            assert!(lsn > last.lsn, "entries are tracked in LSN order");
        }
        self.entries.push_back(Tracked {
            lsn,
            segment_first_lsn,
            offset,
            committed: false,
        });
        self.uncommitted += 1;
        self.last_entry = Some((lsn, segment_first_lsn, offset));
    }

    /// Records a commit marker for `first..=last` written by this process.
    pub(crate) fn commit_marker(&mut self, first: Lsn, last: Lsn) {
        self.mark_committed(first, last);
        self.max_commit_last = self.max_commit_last.max(last);
    }

    /// The highest entry LSN a commit marker in the retained segments (or written since open)
    /// covers: an entry LSN, unlike [`Tracker::watermark`], which may be a marker's.
    pub(crate) fn max_commit_last(&self) -> Lsn {
        self.max_commit_last
    }

    /// The first retained LSN of the newest checkpoint record fed to [`Tracker::apply`]: every
    /// segment from it on must still be in the directory.
    pub(crate) fn first_retained(&self) -> Option<Lsn> {
        self.first_retained
    }

    /// `(lsn, segment first LSN, offset)` of the newest entry.
    pub(crate) fn last_entry(&self) -> Option<(Lsn, Lsn, u32)> {
        self.last_entry
    }

    /// Marks every tracked entry in `first..=last` committed; other LSNs in the range (markers,
    /// or entries already released) are ignored.
    pub(crate) fn mark_committed(&mut self, first: Lsn, last: Lsn) {
        let start = self.entries.partition_point(|e| e.lsn < first);
        for i in start..self.entries.len() {
            let e = &mut self.entries[i];
            if e.lsn > last {
                break;
            }
            if !e.committed {
                e.committed = true;
                self.uncommitted -= 1;
            }
        }
        while self.entries.front().is_some_and(|e| e.committed) {
            self.entries.pop_front();
        }
        debug_assert_eq!(
            self.uncommitted,
            self.entries.iter().filter(|e| !e.committed).count()
        );
    }

    /// Every entry at or below the returned LSN is committed.
    pub(crate) fn watermark(&self, next_lsn: Lsn) -> Lsn {
        match self.entries.front() {
            Some(first) => first.lsn - 1,
            None => next_lsn - 1,
        }
    }

    pub(crate) fn pending_count(&self) -> usize {
        self.uncommitted
    }

    /// `(lsn, segment first LSN, offset)` of each uncommitted entry, in LSN order.
    pub(crate) fn pending(&self) -> impl Iterator<Item = (Lsn, Lsn, u32)> + '_ {
        self.entries
            .iter()
            .filter(|e| !e.committed)
            .map(|e| (e.lsn, e.segment_first_lsn, e.offset))
    }

    /// Feeds one scanned record. An `Err` is a record whose checksum is valid but whose content
    /// is impossible (a marker for the future, an undecodable payload).
    pub(crate) fn apply(
        &mut self,
        segment_first_lsn: Lsn,
        r: &RecordView<'_>,
    ) -> Result<(), String> {
        match r.record_type {
            RecordType::Entry => {
                self.push(r.lsn, segment_first_lsn, r.offset as u32);
            }
            RecordType::Commit => {
                let c: CommitPayload =
                    decode_payload(r.payload).map_err(|e| format!("bad commit payload: {e}"))?;
                if c.first_lsn == 0 || c.first_lsn > c.last_lsn || c.last_lsn >= r.lsn {
                    return Err(format!(
                        "commit marker for range {}..={} is impossible at this LSN",
                        c.first_lsn, c.last_lsn
                    ));
                }
                self.mark_committed(c.first_lsn, c.last_lsn);
                self.max_commit_last = self.max_commit_last.max(c.last_lsn);
            }
            RecordType::Checkpoint => {
                let c: CheckpointPayload = decode_payload(r.payload)
                    .map_err(|e| format!("bad checkpoint payload: {e}"))?;
                if c.committed_watermark >= r.lsn || c.first_retained_lsn > r.lsn {
                    return Err(format!(
                        "checkpoint watermark {} / first retained LSN {} is impossible at this LSN",
                        c.committed_watermark, c.first_retained_lsn
                    ));
                }
                if c.committed_watermark > 0 {
                    self.mark_committed(1, c.committed_watermark);
                }
                self.first_retained = Some(c.first_retained_lsn);
            }
        }
        Ok(())
    }
}
