//! What settlement writes into the WAL for one event: the event and the post-image of every
//! balance row it touches; and the balance cache that computes those post-images.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::event::{Event, Movement, Trade};
use crate::ledger::{
    Amount, Asset, BalanceKey, BalanceWrite, EntryWrites, EventRow, MovementKind, MovementRow,
    TradeRow, UserId, MAX_ASSET_LEN_BYTES,
};
use crate::wal::format::{decode_payload, encode_payload, encode_payload_into};
use crate::wal::Lsn;

/// The payload of one settlement WAL entry (bincode, fixed-int little-endian).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementEntry {
    /// The validated event.
    pub event: Event,
    /// Each touched balance row with its amount after this event (one per row, at most
    /// [`MAX_POST_IMAGES`] for a settled event: held inline, no allocation).
    pub post_images: PostImages,
}

/// Most balance rows one event touches (a trade: buyer and seller, base and quote).
pub const MAX_POST_IMAGES: usize = 4;

/// The post-images of one entry. Serialized as a sequence, exactly as a `Vec` (the WAL bytes
/// did not change when it replaced one); a decoded payload with more than
/// [`MAX_POST_IMAGES`] rows still decodes (it spills to the heap), as it did as a `Vec`.
pub type PostImages = smallvec::SmallVec<[(BalanceKey, Amount); MAX_POST_IMAGES]>;

impl SettlementEntry {
    /// Encodes the WAL payload.
    pub fn encode(&self) -> Vec<u8> {
        encode_payload(self).expect("a settlement entry always encodes")
    }

    /// Appends the WAL payload to `buf` (the bytes of [`SettlementEntry::encode`]) and returns
    /// its length.
    pub fn encode_into(&self, buf: &mut Vec<u8>) -> usize {
        encode_payload_into(self, buf).expect("a settlement entry always encodes")
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
        self.clone().into_writes(lsn)
    }

    /// Every store write of this entry at `lsn`, taking the entry instead of copying it.
    pub fn into_writes(self, lsn: Lsn) -> EntryWrites {
        EntryWrites {
            lsn,
            event: Some(into_event_row(self.event, lsn)),
            balances: self
                .post_images
                .into_iter()
                .map(|(key, amount)| BalanceWrite { key, amount, lsn })
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
        asset: m.asset,
        amount: m.amount,
        lsn,
    }
}

/// The stored row of `event` settled at `lsn`, taking the event's strings instead of copying.
pub fn into_event_row(event: Event, lsn: Lsn) -> EventRow {
    match event {
        Event::Trade(t) => EventRow::Trade(trade_row(&t, lsn)),
        Event::Movement(m) => EventRow::Movement(MovementRow {
            output_sequence: m.output_sequence,
            kind: m.kind,
            user_id: m.user_id,
            asset: m.asset,
            amount: m.amount,
            lsn,
        }),
    }
}

/// The rows an event touches (at most four), with their deltas, without allocating: a buyer who
/// is also the seller nets to zero on each row, never two writes of one row.
struct RowDeltas {
    rows: [(UserId, Asset, Amount); 4],
    len: usize,
}

impl RowDeltas {
    /// The rows an event touches, without deltas (for loading them).
    fn keys(event: &Event) -> RowDeltas {
        let mut out = RowDeltas {
            rows: [(0, Asset::EMPTY, 0); 4],
            len: 0,
        };
        match event {
            Event::Trade(t) => {
                for (user_id, asset) in [
                    (t.buyer_user_id, t.base),
                    (t.buyer_user_id, t.quote),
                    (t.seller_user_id, t.base),
                    (t.seller_user_id, t.quote),
                ] {
                    out.add(user_id, asset, 0)
                        .expect("adding zero never overflows");
                }
            }
            Event::Movement(m) => out
                .add(m.user_id, m.asset, 0)
                .expect("adding zero never overflows"),
        }
        out
    }

    /// The balance changes of an event, one per row. `None` on overflow.
    fn of(event: &Event) -> Option<RowDeltas> {
        let mut out = RowDeltas {
            rows: [(0, Asset::EMPTY, 0); 4],
            len: 0,
        };
        match event {
            Event::Trade(t) => {
                let notional = t.price.checked_mul(t.quantity)?;
                out.add(t.buyer_user_id, t.base, t.quantity)?;
                out.add(t.buyer_user_id, t.quote, notional.checked_neg()?)?;
                out.add(t.seller_user_id, t.base, t.quantity.checked_neg()?)?;
                out.add(t.seller_user_id, t.quote, notional)?;
            }
            Event::Movement(m) => {
                let delta = match m.kind {
                    MovementKind::Deposit => m.amount,
                    MovementKind::Withdraw => m.amount.checked_neg()?,
                };
                out.add(m.user_id, m.asset, delta)?;
            }
        }
        Some(out)
    }

    fn add(&mut self, user_id: UserId, asset: Asset, delta: Amount) -> Option<()> {
        let rows = &mut self.rows[..self.len];
        match rows
            .iter_mut()
            .find(|(u, a, _)| *u == user_id && *a == asset)
        {
            Some((_, _, d)) => *d = d.checked_add(delta)?,
            None => {
                assert!(
                    self.len < self.rows.len(),
                    "an event touches at most 4 rows"
                );
                self.rows[self.len] = (user_id, asset, delta);
                self.len += 1;
            }
        }
        Some(())
    }

    fn as_slice(&self) -> &[(UserId, Asset, Amount)] {
        &self.rows[..self.len]
    }
}

/// An asset name packed into one integer (its bytes, zero-padded), so that a cache lookup never
/// allocates and compares two integers. Injective: validated names are 1 to
/// `MAX_ASSET_LEN_BYTES` upper-case letters or digits, never a zero byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct AssetCode(u128);

const _: () = assert!(MAX_ASSET_LEN_BYTES == 16, "an asset name fits a u128");

impl AssetCode {
    fn new(asset: &Asset) -> AssetCode {
        debug_assert!(
            !asset.bytes().any(|b| b == 0),
            "asset names have no zero byte"
        );
        AssetCode(u128::from_le_bytes(*asset.padded_bytes()))
    }
}

/// A cached balance row.
#[derive(Clone, Copy, Debug)]
struct CachedRow {
    amount: Amount,
    /// The write batch that last changed the row (0: loaded from the store, never changed).
    batch: u64,
}

/// Default bound of [`BalanceCache`] rows (about 64 bytes each in memory).
pub const DEFAULT_CACHE_ROWS: usize = 4 << 20;

/// The current balance of every row the process has touched or loaded. The process is the only
/// writer of these rows, so after loading a row once from the store the cache is authoritative.
///
/// The cache is bounded: past `max_rows` it forgets rows whose last change the store has
/// acknowledged (their stored value is current, so reloading them later is exact). Rows changed
/// by batches not yet acknowledged are never forgotten, so the cache can exceed its bound by the
/// rows of the batches in flight.
#[derive(Debug)]
pub struct BalanceCache {
    rows: HashMap<(UserId, AssetCode), CachedRow, foldhash::fast::RandomState>,
    /// The batch that [`BalanceCache::settle`] stamps on the rows it changes.
    batch: u64,
    max_rows: usize,
    evicted_rows: u64,
}

impl Default for BalanceCache {
    fn default() -> Self {
        BalanceCache::with_max_rows(DEFAULT_CACHE_ROWS)
    }
}

impl BalanceCache {
    /// A cache that keeps at most about `max_rows` rows (see the type's documentation).
    pub fn with_max_rows(max_rows: usize) -> BalanceCache {
        BalanceCache {
            rows: HashMap::default(),
            batch: 0,
            max_rows: max_rows.max(1),
            evicted_rows: 0,
        }
    }

    /// Rows of `event` that are not cached yet (to load from the store), added to `out` unless
    /// `out` has them already (a linear check: for a few events; see [`BalanceCache::missing_rows`]).
    pub fn missing(&self, event: &Event, out: &mut Vec<BalanceKey>) {
        for key in self.missing_rows([event]) {
            if !out.contains(&key) {
                out.push(key);
            }
        }
    }

    /// Rows of all `events` that are not cached yet, each once, in first-seen order.
    pub fn missing_rows<'e>(&self, events: impl IntoIterator<Item = &'e Event>) -> Vec<BalanceKey> {
        let mut seen: std::collections::HashSet<(UserId, AssetCode), foldhash::fast::RandomState> =
            Default::default();
        let mut out = Vec::new();
        for event in events {
            for (user_id, asset, _) in RowDeltas::keys(event).as_slice() {
                let key = (*user_id, AssetCode::new(asset));
                if !self.rows.contains_key(&key) && seen.insert(key) {
                    out.push(BalanceKey {
                        user_id: *user_id,
                        asset: *asset,
                    });
                }
            }
        }
        out
    }

    /// Records a row loaded from the store (absent rows are zero). A cached row is kept.
    pub fn load(&mut self, key: BalanceKey, amount: Amount) {
        self.rows
            .entry((key.user_id, AssetCode::new(&key.asset)))
            .or_insert(CachedRow { amount, batch: 0 });
    }

    /// The cached amount of a row.
    pub fn get(&self, key: &BalanceKey) -> Option<Amount> {
        self.rows
            .get(&(key.user_id, AssetCode::new(&key.asset)))
            .map(|r| r.amount)
    }

    /// Number of cached rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Rows forgotten so far to stay within the bound.
    pub fn evicted_rows(&self) -> u64 {
        self.evicted_rows
    }

    /// Starts write batch `batch` (increasing, from 1): the rows [`BalanceCache::settle`]
    /// changes from now on belong to it.
    pub fn begin_batch(&mut self, batch: u64) {
        assert!(batch >= self.batch, "write batches only move forward");
        self.batch = batch;
    }

    /// When over the bound, forgets rows whose last change belongs to a batch at or below
    /// `acked_batch` (every batch up to it acknowledged by the store), down to 7/8 of the bound.
    /// Returns the number of rows forgotten.
    pub fn evict(&mut self, acked_batch: u64) -> usize {
        if self.rows.len() <= self.max_rows {
            return 0;
        }
        let target = self.max_rows - self.max_rows / 8;
        let mut excess = self.rows.len().saturating_sub(target);
        let before = self.rows.len();
        self.rows.retain(|_, row| {
            if excess > 0 && row.batch <= acked_batch {
                excess -= 1;
                false
            } else {
                true
            }
        });
        let evicted = before - self.rows.len();
        self.evicted_rows += evicted as u64;
        evicted
    }

    /// Computes the entry for `event` and updates the cache, or refuses the event (a withdrawal
    /// above the balance, an overflow) leaving the cache untouched. Every row must be loaded
    /// (see [`BalanceCache::try_settle`] otherwise).
    pub fn settle(&mut self, event: Event) -> Result<SettlementEntry, String> {
        match self.try_settle(event) {
            Settled::Entry(entry) => Ok(entry),
            Settled::Refused(reason) => Err(reason),
            Settled::NotLoaded(_) => panic!("rows are loaded before settling"),
        }
    }

    /// Like [`BalanceCache::settle`], but hands the event back when one of its rows is not
    /// cached (load the rows, e.g. [`BalanceCache::missing_rows`], and try again). One hash
    /// lookup per row.
    pub fn try_settle(&mut self, event: Event) -> Settled {
        let Some(deltas) = RowDeltas::of(&event) else {
            return Settled::Refused("balance arithmetic overflows 64-bit minor units".into());
        };
        let rows = deltas.as_slice();
        let outcome = match rows.len() {
            1 => self.apply::<1>(rows, &event),
            2 => self.apply::<2>(rows, &event),
            3 => self.apply::<3>(rows, &event),
            4 => self.apply::<4>(rows, &event),
            n => unreachable!("an event touches 1 to 4 rows, not {n}"),
        };
        match outcome {
            Ok(Some(after)) => {
                let post_images = rows
                    .iter()
                    .zip(after)
                    .map(|(&(user_id, asset, _), amount)| (BalanceKey { user_id, asset }, amount))
                    .collect();
                Settled::Entry(SettlementEntry { event, post_images })
            }
            Ok(None) => Settled::NotLoaded(event),
            Err(reason) => Settled::Refused(reason),
        }
    }

    /// Applies the deltas of `N` distinct rows at once: `Ok(None)` when a row is not cached,
    /// `Err` (nothing changed) when the event is refused, else the amounts after it (the first
    /// `N`).
    fn apply<const N: usize>(
        &mut self,
        rows: &[(UserId, Asset, Amount)],
        event: &Event,
    ) -> Result<Option<[Amount; 4]>, String> {
        assert_eq!(rows.len(), N);
        let keys: [(UserId, AssetCode); N] =
            std::array::from_fn(|i| (rows[i].0, AssetCode::new(&rows[i].1)));
        // The rows of one event are distinct (`RowDeltas` merges repeats).
        let cached = self
            .rows
            .get_disjoint_mut(std::array::from_fn::<_, N, _>(|i| &keys[i]));
        let mut after = [0 as Amount; 4];
        for (i, row) in cached.iter().enumerate() {
            let Some(row) = row else { return Ok(None) };
            let (user_id, asset, delta) = rows[i];
            let current = row.amount;
            let key = || BalanceKey { user_id, asset };
            let Some(amount) = current.checked_add(delta) else {
                return Err(format!(
                    "balance of {} would overflow ({current} + {delta})",
                    key()
                ));
            };
            if let Event::Movement(m) = event {
                if m.kind == MovementKind::Withdraw && amount < 0 {
                    return Err(format!(
                        "insufficient balance: {} has {current}, withdrawal of {} refused",
                        key(),
                        m.amount
                    ));
                }
            }
            after[i] = amount;
        }
        for (row, amount) in cached.into_iter().zip(after) {
            let row = row.expect("checked above");
            row.amount = amount;
            row.batch = self.batch;
        }
        Ok(Some(after))
    }
}

/// What [`BalanceCache::try_settle`] did with an event.
#[derive(Debug)]
pub enum Settled {
    /// Settled: the cache holds the rows' new amounts.
    Entry(SettlementEntry),
    /// Refused (a withdrawal above the balance, an overflow), with the reason; cache untouched.
    Refused(String),
    /// A row of the event is not cached: load it and try again; cache untouched.
    NotLoaded(Event),
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
            e.post_images.to_vec(),
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
        // Encoding into a shared buffer appends exactly the same bytes.
        let mut buf = vec![0xAA];
        let n = e.encode_into(&mut buf);
        assert_eq!(n, buf.len() - 1);
        assert_eq!(&buf[1..], &e.encode()[..]);
    }

    #[test]
    fn the_cache_forgets_only_rows_the_store_has_acknowledged() {
        let mut c = BalanceCache::with_max_rows(8);
        let deposit = |seq: u64, user: u64| {
            ev(&format!(
                r#"{{"output_sequence":{seq},"type":"deposit","user_id":{user},"asset":"USDT","amount":{}}}"#,
                user + 1
            ))
        };
        // Batch 1 changes 6 rows, batch 2 changes 6 more: 12 rows, bound 8.
        for (batch, users) in [(1u64, 0u64..6), (2, 6..12)] {
            c.begin_batch(batch);
            for user in users {
                let e = deposit(user + 1, user);
                loaded(&mut c, &e);
                c.settle(e).unwrap();
            }
        }
        assert_eq!(c.len(), 12);
        // Nothing acknowledged: nothing may go (the store may not have these values yet).
        assert_eq!(c.evict(0), 0);
        assert_eq!(c.len(), 12);
        // Batch 1 acknowledged: only its rows may go, down to 7/8 of the bound.
        assert_eq!(c.evict(1), 5);
        assert_eq!(c.len(), 7);
        for user in 6..12 {
            assert_eq!(c.get(&BalanceKey::new(user, "USDT")), Some(user as i64 + 1));
        }
        assert_eq!(c.evicted_rows(), 5);
        // Within the bound: nothing more goes, even when everything is acknowledged.
        assert_eq!(c.evict(2), 0);
        // A forgotten row is missing again and reloads from the store's (current) value.
        let gone = (0..6)
            .find(|u| c.get(&BalanceKey::new(*u, "USDT")).is_none())
            .unwrap();
        let again = deposit(100, gone);
        assert_eq!(
            c.missing_rows([&again]),
            vec![BalanceKey::new(gone, "USDT")]
        );
    }

    #[test]
    fn missing_rows_lists_each_uncached_row_once() {
        let c = BalanceCache::default();
        let t = ev(
            r#"{"output_sequence":1,"trade_id":1,"symbol":"ETH-USDT","buyer_user_id":1,"seller_user_id":2,"price":10,"quantity":3,"timestamp_ns":7}"#,
        );
        let own = ev(
            r#"{"output_sequence":2,"trade_id":2,"symbol":"ETH-USDT","buyer_user_id":1,"seller_user_id":1,"price":10,"quantity":3,"timestamp_ns":7}"#,
        );
        let rows = c.missing_rows([&t, &own, &t]);
        assert_eq!(rows.len(), 4);
        let mut one_by_one = Vec::new();
        for e in [&t, &own, &t] {
            c.missing(e, &mut one_by_one);
        }
        assert_eq!(rows, one_by_one);
    }
}
