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
#[derive(Debug)]
pub struct TradeIds {
    max_settled: u64,
    recent: HashMap<u64, u64>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl TradeIds {
    /// Ids above `max_settled` are new; `capacity` recent ids are remembered (at least
    /// [`MIN_RECENT_TRADE_IDS`]; it must cover every trade still in flight to the store).
    pub fn new(max_settled: u64, capacity: usize) -> TradeIds {
        let capacity = capacity.max(MIN_RECENT_TRADE_IDS);
        TradeIds {
            max_settled,
            recent: HashMap::with_capacity(capacity.min(1 << 16)),
            order: VecDeque::new(),
            capacity,
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
        match self.recent.get(&trade_id) {
            Some(&seq) => Ok(Some(seq)),
            None => Err(()),
        }
    }

    /// Records `trade_id` as settled under `output_sequence`.
    pub fn settled(&mut self, trade_id: u64, output_sequence: u64) {
        self.max_settled = self.max_settled.max(trade_id);
        if self.recent.insert(trade_id, output_sequence).is_none() {
            self.order.push_back(trade_id);
        }
        while self.order.len() > self.capacity {
            let oldest = self.order.pop_front().expect("not empty");
            self.recent.remove(&oldest);
        }
        assert_eq!(
            self.order.len(),
            self.recent.len(),
            "one order entry per id"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
