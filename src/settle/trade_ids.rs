//! trade_id is the trade's identity (the seed design's `trade_exists(trade_id)`): a trade whose
//! id was already settled under another output sequence is refused, never written over the
//! first one's row.
//!
//! The fast path costs no read: the engine numbers trades upwards, so an id above the highest
//! one ever settled is new. An id at or below it is looked up in the ids this process settled
//! recently (a bounded map that always covers every batch still in flight), then in the store.

use std::collections::{HashMap, VecDeque};

/// Fewest recent trade ids remembered (the bound grows with the pipeline's in-flight events).
pub const MIN_RECENT_TRADE_IDS: usize = 262_144;

/// The trade ids settled so far, as far as they are needed.
///
/// Recent ids live in two bounded FIFOs: ids that arrived in increasing order (the usual case)
/// in a sorted deque, appended at the back and searched by bisection, no hashing; the rare id
/// that arrived below the newest one in a small map with its own FIFO. Both forget their oldest
/// entries past `capacity`.
#[derive(Debug)]
pub struct TradeIds {
    max_settled: u64,
    /// `(trade_id, output_sequence)`, trade ids strictly increasing.
    ascending: VecDeque<(u64, u64)>,
    /// Ids that arrived below the newest one, and their arrival order.
    others: HashMap<u64, u64>,
    others_order: VecDeque<u64>,
    capacity: usize,
}

impl TradeIds {
    /// Ids above `max_settled` are new; `capacity` recent ids are remembered (at least
    /// [`MIN_RECENT_TRADE_IDS`]; it must cover every trade still in flight to the store).
    pub fn new(max_settled: u64, capacity: usize) -> TradeIds {
        TradeIds {
            max_settled,
            ascending: VecDeque::new(),
            others: HashMap::new(),
            others_order: VecDeque::new(),
            capacity: capacity.max(MIN_RECENT_TRADE_IDS),
        }
    }

    /// The highest trade id settled.
    pub fn max_settled(&self) -> u64 {
        self.max_settled
    }

    /// What is known of `trade_id` without the store: `Ok(None)` new for sure, `Ok(Some(seq))`
    /// settled under `seq`, `Err(())` only the store can tell.
    #[allow(clippy::result_unit_err)]
    pub fn known(&self, trade_id: u64) -> Result<Option<u64>, ()> {
        if trade_id > self.max_settled {
            return Ok(None);
        }
        if let Ok(i) = self
            .ascending
            .binary_search_by_key(&trade_id, |&(id, _)| id)
        {
            return Ok(Some(self.ascending[i].1));
        }
        match self.others.get(&trade_id) {
            Some(&seq) => Ok(Some(seq)),
            None => Err(()),
        }
    }

    /// Records `trade_id` as settled under `output_sequence`.
    pub fn settled(&mut self, trade_id: u64, output_sequence: u64) {
        match self.ascending.back() {
            Some(&(newest, _)) if trade_id <= newest => {
                if self.others.insert(trade_id, output_sequence).is_none() {
                    self.others_order.push_back(trade_id);
                }
                while self.others_order.len() > self.capacity {
                    let oldest = self.others_order.pop_front().expect("not empty");
                    self.others.remove(&oldest);
                }
            }
            _ => {
                self.ascending.push_back((trade_id, output_sequence));
                if self.ascending.len() > self.capacity {
                    self.ascending.pop_front();
                }
            }
        }
        self.max_settled = self.max_settled.max(trade_id);
        debug_assert!(self.ascending.len() <= self.capacity);
        debug_assert_eq!(self.others.len(), self.others_order.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_out_of_order_are_remembered_too() {
        let mut ids = TradeIds::new(0, 0);
        for id in [10, 20, 30] {
            ids.settled(id, id + 1);
        }
        ids.settled(15, 99);
        ids.settled(5, 98);
        assert_eq!(ids.known(15), Ok(Some(99)));
        assert_eq!(ids.known(5), Ok(Some(98)));
        assert_eq!(ids.known(20), Ok(Some(21)));
        assert_eq!(ids.known(25), Err(()));
        assert_eq!(ids.known(31), Ok(None));
        ids.settled(40, 41);
        assert_eq!(ids.known(40), Ok(Some(41)));
    }

    #[test]
    fn ids_above_the_highest_are_new_and_recent_ones_are_remembered() {
        let mut ids = TradeIds::new(100, 0);
        assert_eq!(ids.known(101), Ok(None));
        assert_eq!(ids.known(100), Err(()));
        ids.settled(150, 7);
        assert_eq!(ids.known(150), Ok(Some(7)));
        assert_eq!(ids.known(120), Err(()));
        assert_eq!(ids.known(151), Ok(None));
        for i in 0..MIN_RECENT_TRADE_IDS as u64 + 10 {
            ids.settled(1000 + i, i);
        }
        // The oldest fell out; the store must answer for it.
        assert_eq!(ids.known(150), Err(()));
        assert_eq!(
            ids.known(1000 + MIN_RECENT_TRADE_IDS as u64),
            Ok(Some(MIN_RECENT_TRADE_IDS as u64))
        );
    }
}
