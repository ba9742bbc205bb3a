//! What settlement writes into the WAL for one event: the event and the post-image of every
//! balance row it touches; and the balance cache that computes those post-images.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::event::{Event, Movement, Trade};
use crate::ledger::{
    Amount, BalanceKey, BalanceWrite, EntryWrites, EventRow, MovementKind, MovementRow, TradeRow,
};
use crate::wal::format::{decode_payload, encode_payload};
use crate::wal::Lsn;

/// The payload of one settlement WAL entry (bincode, fixed-int little-endian).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementEntry {
    /// The validated event.
    pub event: Event,
    /// Each touched balance row with its amount after this event (one per row).
    pub post_images: Vec<(BalanceKey, Amount)>,
}

impl SettlementEntry {
    /// Encodes the WAL payload.
    pub fn encode(&self) -> Vec<u8> {
        encode_payload(self).expect("a settlement entry always encodes")
    }

    /// Decodes a WAL payload written by [`SettlementEntry::encode`].
    pub fn decode(bytes: &[u8]) -> Result<SettlementEntry, String> {
        decode_payload(bytes)
    }

    /// The event row this entry writes.
    pub fn event_row(&self, lsn: Lsn) -> EventRow {
        match &self.event {
            Event::Trade(t) => EventRow::Trade(trade_row(t, lsn)),
            Event::Movement(m) => EventRow::Movement(movement_row(m, lsn)),
        }
    }

    /// Every store write of this entry at `lsn`.
    pub fn writes(&self, lsn: Lsn) -> EntryWrites {
        EntryWrites {
            lsn,
            event: Some(self.event_row(lsn)),
            balances: self
                .post_images
                .iter()
                .map(|(key, amount)| BalanceWrite {
                    key: key.clone(),
                    amount: *amount,
                    lsn,
                })
                .collect(),
        }
    }
}

/// The stored trade row of a trade settled at `lsn`.
pub fn trade_row(t: &Trade, lsn: Lsn) -> TradeRow {
    TradeRow {
        trade_id: t.trade_id,
        output_sequence: t.output_sequence,
        symbol: t.symbol(),
        buyer_user_id: t.buyer_user_id,
        seller_user_id: t.seller_user_id,
        price: t.price,
        quantity: t.quantity,
        timestamp_ns: t.timestamp_ns,
        lsn,
    }
}

/// The stored movement row of a deposit/withdrawal settled at `lsn`.
pub fn movement_row(m: &Movement, lsn: Lsn) -> MovementRow {
    MovementRow {
        output_sequence: m.output_sequence,
        kind: m.kind,
        user_id: m.user_id,
        asset: m.asset.clone(),
        amount: m.amount,
        lsn,
    }
}

/// The balance changes of an event, one per row (a buyer who is also the seller nets to zero on
/// each row, never two writes of one row). Checked: `None` on overflow.
pub fn deltas(event: &Event) -> Option<Vec<(BalanceKey, Amount)>> {
    let mut out: Vec<(BalanceKey, Amount)> = Vec::with_capacity(4);
    let mut add = |key: BalanceKey, delta: Amount| -> Option<()> {
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, d)) => *d = d.checked_add(delta)?,
            None => out.push((key, delta)),
        }
        Some(())
    };
    match event {
        Event::Trade(t) => {
            let notional = t.price.checked_mul(t.quantity)?;
            add(BalanceKey::new(t.buyer_user_id, &t.base), t.quantity)?;
            add(
                BalanceKey::new(t.buyer_user_id, &t.quote),
                notional.checked_neg()?,
            )?;
            add(
                BalanceKey::new(t.seller_user_id, &t.base),
                t.quantity.checked_neg()?,
            )?;
            add(BalanceKey::new(t.seller_user_id, &t.quote), notional)?;
        }
        Event::Movement(m) => {
            let delta = match m.kind {
                MovementKind::Deposit => m.amount,
                MovementKind::Withdraw => m.amount.checked_neg()?,
            };
            add(BalanceKey::new(m.user_id, &m.asset), delta)?;
        }
    }
    Some(out)
}

/// The current balance of every row the process has touched or loaded. The process is the only
/// writer of these rows, so after loading a row once from the store the cache is authoritative.
#[derive(Debug, Default)]
pub struct BalanceCache {
    rows: HashMap<BalanceKey, Amount>,
}

impl BalanceCache {
    /// Rows of `event` that are not cached yet (to load from the store).
    pub fn missing(&self, event: &Event, out: &mut Vec<BalanceKey>) {
        let keys: Vec<BalanceKey> = match event {
            Event::Trade(t) => vec![
                BalanceKey::new(t.buyer_user_id, &t.base),
                BalanceKey::new(t.buyer_user_id, &t.quote),
                BalanceKey::new(t.seller_user_id, &t.base),
                BalanceKey::new(t.seller_user_id, &t.quote),
            ],
            Event::Movement(m) => vec![BalanceKey::new(m.user_id, &m.asset)],
        };
        for k in keys {
            if !self.rows.contains_key(&k) && !out.contains(&k) {
                out.push(k);
            }
        }
    }

    /// Records a row loaded from the store (absent rows are zero).
    pub fn load(&mut self, key: BalanceKey, amount: Amount) {
        self.rows.entry(key).or_insert(amount);
    }

    /// The cached amount of a row.
    pub fn get(&self, key: &BalanceKey) -> Option<Amount> {
        self.rows.get(key).copied()
    }

    /// Number of cached rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Computes the entry for `event` and updates the cache, or refuses the event (a withdrawal
    /// above the balance, an overflow) leaving the cache untouched. Every row must be loaded.
    pub fn settle(&mut self, event: Event) -> Result<SettlementEntry, String> {
        let Some(deltas) = deltas(&event) else {
            return Err("balance arithmetic overflows 64-bit minor units".into());
        };
        let mut post_images = Vec::with_capacity(deltas.len());
        for (key, delta) in deltas {
            let current = *self
                .rows
                .get(&key)
                .expect("rows are loaded before settling");
            let Some(after) = current.checked_add(delta) else {
                return Err(format!(
                    "balance of {key} would overflow ({current} + {delta})"
                ));
            };
            if let Event::Movement(m) = &event {
                if m.kind == MovementKind::Withdraw && after < 0 {
                    return Err(format!(
                        "insufficient balance: {key} has {current}, withdrawal of {} refused",
                        m.amount
                    ));
                }
            }
            post_images.push((key, after));
        }
        for (key, after) in &post_images {
            self.rows.insert(key.clone(), *after);
        }
        Ok(SettlementEntry { event, post_images })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settle::event::parse_event;

    fn ev(s: &str) -> Event {
        parse_event(s.as_bytes()).unwrap()
    }

    fn loaded(cache: &mut BalanceCache, e: &Event) {
        let mut keys = Vec::new();
        cache.missing(e, &mut keys);
        for k in keys {
            cache.load(k, 0);
        }
    }

    #[test]
    fn a_trade_moves_four_rows_and_self_trade_nets_to_zero() {
        let mut c = BalanceCache::default();
        let t = ev(
            r#"{"output_sequence":1,"trade_id":1,"symbol":"BTC-USDT","buyer_user_id":1,"seller_user_id":2,"price":10,"quantity":3,"timestamp_ns":0}"#,
        );
        loaded(&mut c, &t);
        let e = c.settle(t).unwrap();
        assert_eq!(e.post_images.len(), 4);
        assert_eq!(c.get(&BalanceKey::new(1, "USDT")), Some(-30));
        assert_eq!(c.get(&BalanceKey::new(2, "BTC")), Some(-3));
        let own = ev(
            r#"{"output_sequence":2,"trade_id":2,"symbol":"BTC-USDT","buyer_user_id":5,"seller_user_id":5,"price":10,"quantity":3,"timestamp_ns":0}"#,
        );
        loaded(&mut c, &own);
        let e = c.settle(own).unwrap();
        assert_eq!(
            e.post_images,
            vec![
                (BalanceKey::new(5, "BTC"), 0),
                (BalanceKey::new(5, "USDT"), 0)
            ]
        );
    }

    #[test]
    fn withdrawals_above_the_balance_are_refused_without_touching_the_cache() {
        let mut c = BalanceCache::default();
        let d =
            ev(r#"{"output_sequence":1,"type":"deposit","user_id":1,"asset":"USDT","amount":100}"#);
        loaded(&mut c, &d);
        c.settle(d).unwrap();
        let w = ev(
            r#"{"output_sequence":2,"type":"withdraw","user_id":1,"asset":"USDT","amount":101}"#,
        );
        let reason = c.settle(w).unwrap_err();
        assert!(reason.contains("insufficient balance"), "{reason}");
        assert_eq!(c.get(&BalanceKey::new(1, "USDT")), Some(100));
        let big = ev(
            r#"{"output_sequence":3,"type":"deposit","user_id":1,"asset":"USDT","amount":9223372036854775807}"#,
        );
        assert!(c.settle(big).unwrap_err().contains("overflow"));
        assert_eq!(c.get(&BalanceKey::new(1, "USDT")), Some(100));
    }

    #[test]
    fn entries_round_trip_through_the_wal_encoding() {
        let mut c = BalanceCache::default();
        let t = ev(
            r#"{"output_sequence":1,"trade_id":1,"symbol":"ETH-USDT","buyer_user_id":1,"seller_user_id":2,"price":10,"quantity":3,"timestamp_ns":7}"#,
        );
        loaded(&mut c, &t);
        let e = c.settle(t).unwrap();
        assert_eq!(SettlementEntry::decode(&e.encode()).unwrap(), e);
        assert!(SettlementEntry::decode(&[1, 2, 3]).is_err());
    }
}
