//! A simulated, fault-injecting store for deterministic tests (beside the real ones, never instead
//! of them). It keeps rows in memory with the same last-write-wins-by-LSN rule, and, driven by a
//! seeded PRNG, can: apply a random subset of a batch and fail; apply everything and report a
//! timeout (an unknown outcome); fail without applying; apply writes in a shuffled order; and
//! "crash": after the chosen call, every operation fails until [`SimLedger::restart`].

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{
    validate_entries, validate_lookup, validate_lookup_count, BalanceKey, BalanceRow, Claim,
    EntryWrites, EventKey, EventRow, HighWaterRow, HoleRow, Ledger, LedgerError, MovementRow,
    RejectionRow, Result, StoreIdentity, TradeRow,
};
use crate::wal::Lsn;

/// What the next faulty `apply` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Apply a random subset of the rows, then fail (the process "dies" mid-batch).
    PartialThenCrash,
    /// Apply every row, then fail as if the acknowledgement was lost (crash before the marker).
    AppliedThenCrash,
    /// Apply every row and report a timeout: an unknown outcome.
    AppliedThenTimeout,
    /// Apply nothing and fail.
    NothingThenCrash,
}

/// The rows of a [`SimLedger`] at one moment (a backup), for [`SimLedger::restore`].
#[derive(Clone, Debug, Default)]
pub struct SimSnapshot {
    balances: HashMap<BalanceKey, BalanceRow>,
    trades: HashMap<u64, TradeRow>,
    movements: HashMap<u64, MovementRow>,
    rejections: HashMap<u64, RejectionRow>,
    holes: HashMap<u64, HoleRow>,
    high_water: Option<HighWaterRow>,
    identity: Option<StoreIdentity>,
}

#[derive(Default)]
struct State {
    /// Every row and the identity.
    rows: SimSnapshot,
    rng: u64,
    calls: u64,
    /// Fail every operation (the simulated process is dead) until restart.
    crashed: bool,
    /// Fault plan: call number -> fault.
    plan: HashMap<u64, Fault>,
    /// Highest LSN any write may carry (P1 check): set by the test from the WAL's durable LSN.
    durable_lsn_check: Option<Arc<dyn Fn() -> Lsn + Send + Sync>>,
    /// P1 violations seen: (row LSN, durable LSN at the time).
    p1_violations: Vec<(Lsn, Lsn)>,
    applies: u64,
    /// Full-table scans of trades, movements or balances (start-up must need none).
    scans: u64,
}

/// The simulated store. Cheap to clone (shared state): a "restarted process" gets a clone.
#[derive(Clone)]
pub struct SimLedger {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for SimLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimLedger")
    }
}

impl SimLedger {
    /// An empty store whose random choices follow `seed`.
    pub fn new(seed: u64) -> SimLedger {
        SimLedger {
            state: Arc::new(Mutex::new(State {
                rng: seed | 1,
                ..State::default()
            })),
        }
    }

    /// Makes `apply` call number `call` (counted from 1 over the store's life) inject `fault`.
    pub fn inject(&self, call: u64, fault: Fault) {
        self.state.lock().plan.insert(call, fault);
    }

    /// Full-table scans of trades, movements or balances so far.
    pub fn scans(&self) -> u64 {
        self.state.lock().scans
    }

    /// Drops every fault not injected yet.
    pub fn clear_faults(&self) {
        self.state.lock().plan.clear();
    }

    /// `apply` calls so far.
    pub fn calls(&self) -> u64 {
        self.state.lock().calls
    }

    /// Every row and the identity, as a backup would hold them.
    pub fn snapshot(&self) -> SimSnapshot {
        self.state.lock().rows.clone()
    }

    /// Puts a backup back: every row (and the identity) as it was at [`SimLedger::snapshot`].
    pub fn restore(&self, snapshot: &SimSnapshot) {
        self.state.lock().rows = snapshot.clone();
    }

    /// Brings the store back after a simulated crash.
    pub fn restart(&self) {
        self.state.lock().crashed = false;
    }

    /// Checks every write against `durable_lsn()` (P1: nothing reaches the store before its entry
    /// is durable); violations are recorded for [`SimLedger::p1_violations`].
    pub fn check_durability(&self, durable_lsn: Arc<dyn Fn() -> Lsn + Send + Sync>) {
        self.state.lock().durable_lsn_check = Some(durable_lsn);
    }

    /// Writes that reached the store before their entry was durable.
    pub fn p1_violations(&self) -> Vec<(Lsn, Lsn)> {
        self.state.lock().p1_violations.clone()
    }

    fn next(rng: &mut u64) -> u64 {
        let mut x = *rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

enum RowWrite {
    Event(EventRow),
    Balance(BalanceKey, BalanceRow),
}

/// Last write wins by LSN: `row` replaces what `map` holds under `key` unless that is newer.
fn keep_newest<K: std::hash::Hash + Eq, R>(
    map: &mut HashMap<K, R>,
    key: K,
    row: R,
    lsn: impl Fn(&R) -> Lsn,
) {
    if map.get(&key).is_none_or(|old| lsn(old) <= lsn(&row)) {
        map.insert(key, row);
    }
}

fn write_row(st: &mut State, w: RowWrite) {
    match w {
        RowWrite::Event(EventRow::Trade(t)) => {
            keep_newest(&mut st.rows.trades, t.trade_id, t, |r| r.lsn)
        }
        RowWrite::Event(EventRow::Movement(m)) => {
            keep_newest(&mut st.rows.movements, m.output_sequence, m, |r| r.lsn)
        }
        RowWrite::Event(EventRow::Rejection(r)) => {
            keep_newest(&mut st.rows.rejections, r.output_sequence, r, |r| r.lsn)
        }
        RowWrite::Event(EventRow::Hole(h)) => {
            keep_newest(&mut st.rows.holes, h.first_sequence, h, |r| r.lsn)
        }
        RowWrite::Event(EventRow::HighWater(hw)) => {
            if st.rows.high_water.is_none_or(|old| old.lsn <= hw.lsn) {
                st.rows.high_water = Some(hw);
            }
        }
        RowWrite::Balance(key, row) => keep_newest(&mut st.rows.balances, key, row, |r| r.last_lsn),
    }
}

fn dead() -> LedgerError {
    LedgerError::Unreachable {
        target: "sim".into(),
        reason: "simulated crash".into(),
    }
}

#[async_trait::async_trait]
impl Ledger for SimLedger {
    async fn apply(&self, entries: &[EntryWrites]) -> Result<()> {
        validate_entries(entries)?;
        let mut st = self.state.lock();
        if st.crashed {
            return Err(dead());
        }
        st.calls += 1;
        let call = st.calls;
        let mut rows: Vec<(Lsn, RowWrite)> = Vec::new();
        for e in entries {
            if let Some(ev) = &e.event {
                rows.push((ev.lsn(), RowWrite::Event(ev.clone())));
            }
            for b in &e.balances {
                rows.push((
                    b.lsn,
                    RowWrite::Balance(
                        b.key,
                        BalanceRow {
                            amount: b.amount,
                            last_lsn: b.lsn,
                        },
                    ),
                ));
            }
        }
        if let Some(check) = st.durable_lsn_check.clone() {
            let durable = check();
            let violations: Vec<(Lsn, Lsn)> = rows
                .iter()
                .filter(|(l, _)| *l > durable)
                .map(|(l, _)| (*l, durable))
                .collect();
            st.p1_violations.extend(violations);
        }
        // Reorder: the store may apply the writes of a batch in any order.
        for i in (1..rows.len()).rev() {
            let j = (SimLedger::next(&mut st.rng) % (i as u64 + 1)) as usize;
            rows.swap(i, j);
        }
        st.applies += 1;
        match st.plan.remove(&call) {
            None => {
                for (_, w) in rows {
                    write_row(&mut st, w);
                }
                Ok(())
            }
            Some(Fault::PartialThenCrash) => {
                for (_, w) in rows {
                    if SimLedger::next(&mut st.rng) % 2 == 0 {
                        write_row(&mut st, w);
                    }
                }
                st.crashed = true;
                Err(dead())
            }
            Some(Fault::AppliedThenCrash) => {
                for (_, w) in rows {
                    write_row(&mut st, w);
                }
                st.crashed = true;
                Err(dead())
            }
            Some(Fault::AppliedThenTimeout) => {
                for (_, w) in rows {
                    write_row(&mut st, w);
                }
                Err(LedgerError::Unknown {
                    attempts: 1,
                    reason: "simulated write timeout".into(),
                })
            }
            Some(Fault::NothingThenCrash) => {
                st.crashed = true;
                Err(dead())
            }
        }
    }

    async fn event_lsns(&self, keys: &[EventKey]) -> Result<Vec<Option<Lsn>>> {
        validate_lookup(keys)?;
        let st = self.state.lock();
        if st.crashed {
            return Err(dead());
        }
        Ok(keys
            .iter()
            .map(|k| match *k {
                EventKey::Trade(id) => st.rows.trades.get(&id).map(|t| t.lsn),
                EventKey::Movement(seq) => st.rows.movements.get(&seq).map(|m| m.lsn),
                EventKey::Rejection(seq) => st.rows.rejections.get(&seq).map(|r| r.lsn),
                EventKey::Hole(seq) => st.rows.holes.get(&seq).map(|h| h.lsn),
                EventKey::HighWater => st.rows.high_water.map(|h| h.lsn),
            })
            .collect())
    }

    async fn trade_lsn(&self, trade_id: u64) -> Result<Option<Lsn>> {
        let st = self.state.lock();
        if st.crashed {
            return Err(dead());
        }
        Ok(st.rows.trades.get(&trade_id).map(|t| t.lsn))
    }

    async fn movement_lsn(&self, output_sequence: u64) -> Result<Option<Lsn>> {
        let st = self.state.lock();
        if st.crashed {
            return Err(dead());
        }
        Ok(st.rows.movements.get(&output_sequence).map(|m| m.lsn))
    }

    async fn read_balances(&self, keys: &[BalanceKey]) -> Result<Vec<Option<BalanceRow>>> {
        let st = self.state.lock();
        if st.crashed {
            return Err(dead());
        }
        Ok(keys
            .iter()
            .map(|k| st.rows.balances.get(k).copied())
            .collect())
    }

    async fn scan_balances(&self) -> Result<Vec<(BalanceKey, BalanceRow)>> {
        let mut st = self.state.lock();
        st.scans += 1;
        Ok(st.rows.balances.iter().map(|(k, r)| (*k, *r)).collect())
    }

    async fn scan_trades(&self) -> Result<Vec<TradeRow>> {
        let mut st = self.state.lock();
        st.scans += 1;
        Ok(st.rows.trades.values().cloned().collect())
    }

    async fn scan_movements(&self) -> Result<Vec<MovementRow>> {
        let mut st = self.state.lock();
        st.scans += 1;
        Ok(st.rows.movements.values().cloned().collect())
    }

    async fn scan_rejections(&self) -> Result<Vec<RejectionRow>> {
        Ok(self
            .state
            .lock()
            .rows
            .rejections
            .values()
            .cloned()
            .collect())
    }

    async fn open_holes(&self) -> Result<Vec<HoleRow>> {
        let st = self.state.lock();
        if st.crashed {
            return Err(dead());
        }
        let mut out: Vec<HoleRow> = st.rows.holes.values().filter(|h| h.open).copied().collect();
        out.sort_by_key(|h| h.first_sequence);
        Ok(out)
    }

    async fn high_water(&self) -> Result<Option<HighWaterRow>> {
        let st = self.state.lock();
        if st.crashed {
            return Err(dead());
        }
        Ok(st.rows.high_water)
    }

    async fn trade_sequences(&self, ids: &[u64]) -> Result<Vec<Option<u64>>> {
        validate_lookup_count("trade", ids.len())?;
        let st = self.state.lock();
        if st.crashed {
            return Err(dead());
        }
        Ok(ids
            .iter()
            .map(|id| st.rows.trades.get(id).map(|t| t.output_sequence))
            .collect())
    }

    async fn identity(&self) -> Result<Option<StoreIdentity>> {
        let st = self.state.lock();
        if st.crashed {
            return Err(dead());
        }
        Ok(st.rows.identity)
    }

    async fn claim(&self, expected_epoch: Option<u64>, new: StoreIdentity) -> Result<Claim> {
        let mut st = self.state.lock();
        if st.crashed {
            return Err(dead());
        }
        if st.rows.identity.map(|i| i.epoch) != expected_epoch {
            return Ok(Claim::Lost(st.rows.identity));
        }
        st.rows.identity = Some(new);
        Ok(Claim::Won)
    }

    fn describe(&self) -> String {
        "sim".into()
    }
}
