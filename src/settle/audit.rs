//! `settlement audit`: proves money is conserved (P7), that every balance is exactly what the
//! settled trades and movements in the store say, and that the stream is complete (P9): every
//! output sequence from the first to the highest is settled, rejected or an open hole, exactly
//! once, and the high-water row matches the rows. Against the store alone, on a consistent view:
//! the identity and high-water are read before and after the scans, and a change between them
//! (a writer running) is reported instead of a verdict on a moving store.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::SettleError;
use crate::ledger::{
    Amount, Asset, BalanceKey, HighWaterRow, HoleRow, Ledger, MovementKind, MovementRow,
    RejectionRow, TradeRow, MAX_ASSET_LEN_BYTES,
};
use crate::wal::Lsn;

/// Most problems listed in a report (the counts are always complete).
const MAX_LISTED_PROBLEMS: usize = 20;

/// Per-asset totals.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AssetTotals {
    /// Sum of all balances.
    pub balances: i128,
    /// Sum of deposits.
    pub deposits: i128,
    /// Sum of withdrawals.
    pub withdrawals: i128,
}

/// The result of an audit.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditReport {
    /// Rows read.
    pub trades: usize,
    /// Movement rows read.
    pub movements: usize,
    /// Balance rows read.
    pub balance_rows: usize,
    /// Rejection rows read.
    pub rejections: usize,
    /// Open holes (runs of sequences never seen).
    pub open_holes: usize,
    /// Sequences in open holes.
    pub missing_sequences: u64,
    /// The sequences the high-water row says are accounted for, `(first, highest)`.
    pub sequence_range: Option<(u64, u64)>,
    /// Totals per asset.
    pub assets: BTreeMap<Asset, AssetTotals>,
    /// Problems found (at most 20 listed).
    pub problems: Vec<String>,
    /// Number of problems.
    pub problem_count: usize,
}

impl AuditReport {
    /// True when every check passed.
    pub fn passed(&self) -> bool {
        self.problem_count == 0
    }

    fn problem(&mut self, text: String) {
        self.problem_count += 1;
        if self.problems.len() < MAX_LISTED_PROBLEMS {
            self.problems.push(text);
        }
    }
}

impl std::fmt::Display for AuditReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "audit: {} trades, {} movements, {} balance rows, {} rejections",
            self.trades, self.movements, self.balance_rows, self.rejections
        )?;
        match self.sequence_range {
            Some((first, high)) => writeln!(
                f,
                "sequences {first}..={high}: {} open hole(s) with {} sequence(s) not yet seen (`settlement holes` lists them)",
                self.open_holes, self.missing_sequences
            )?,
            None => writeln!(f, "no sequence accounted for yet")?,
        }
        writeln!(
            f,
            "{:<8} {:>22} {:>22} {:>22}",
            "asset", "sum(balances)", "deposits", "withdrawals"
        )?;
        for (asset, t) in &self.assets {
            writeln!(
                f,
                "{asset:<8} {:>22} {:>22} {:>22}",
                t.balances, t.deposits, t.withdrawals
            )?;
        }
        if self.passed() {
            write!(f, "audit PASSED: per asset, balances = deposits - withdrawals; every balance matches its trades and movements; every sequence is settled, rejected or an open hole exactly once")
        } else {
            writeln!(f, "audit FAILED: {} problem(s)", self.problem_count)?;
            for p in &self.problems {
                writeln!(f, "  - {p}")?;
            }
            if self.problem_count > self.problems.len() {
                writeln!(
                    f,
                    "  ... and {} more",
                    self.problem_count - self.problems.len()
                )?;
            }
            Ok(())
        }
    }
}

/// Audits the store: conservation per asset (sum of balances = deposits - withdrawals), and a
/// replay of every trade and movement row in LSN order that must reproduce every balance row
/// exactly, amount and `last_lsn` (so a trade applied twice, or a lost balance write, shows).
pub async fn audit(ledger: &dyn Ledger) -> Result<AuditReport, SettleError> {
    let before = (ledger.identity().await?, ledger.high_water().await?);
    let balances = ledger.scan_balances().await?;
    let trades = ledger.scan_trades().await?;
    let movements = ledger.scan_movements().await?;
    let rejections = ledger.scan_rejections().await?;
    let holes = ledger.open_holes().await?;
    let after = (ledger.identity().await?, ledger.high_water().await?);
    let mut report = AuditReport {
        trades: trades.len(),
        movements: movements.len(),
        balance_rows: balances.len(),
        rejections: rejections.len(),
        open_holes: holes.len(),
        missing_sequences: holes
            .iter()
            .map(|h| h.last_sequence.saturating_sub(h.first_sequence) + 1)
            .sum(),
        ..AuditReport::default()
    };
    if before != after {
        report.problem(format!(
            "the store changed during the audit (identity and high-water before {before:?}, after {after:?}): a writer is running; stop it (or wait for it to drain) and audit again"
        ));
    }
    completeness(
        &mut report,
        after.1,
        &trades,
        &movements,
        &rejections,
        &holes,
    );
    for (key, row) in &balances {
        report.assets.entry(key.asset).or_default().balances += i128::from(row.amount);
    }
    for m in &movements {
        let t = report.assets.entry(m.asset).or_default();
        match m.kind {
            MovementKind::Deposit => t.deposits += i128::from(m.amount),
            MovementKind::Withdraw => t.withdrawals += i128::from(m.amount),
        }
    }
    let totals: Vec<(Asset, AssetTotals)> = report.assets.clone().into_iter().collect();
    for (asset, t) in totals {
        if t.balances != t.deposits - t.withdrawals {
            report.problem(format!(
                "{asset}: sum of balances {} != deposits {} - withdrawals {} (off by {})",
                t.balances,
                t.deposits,
                t.withdrawals,
                t.balances - (t.deposits - t.withdrawals)
            ));
        }
    }
    // Replay in LSN order.
    let mut seen_seq: HashMap<u64, Lsn> = HashMap::new();
    let mut events: Vec<(Lsn, Vec<(BalanceKey, Amount)>)> = Vec::new();
    for t in &trades {
        if let Some(other) = seen_seq.insert(t.output_sequence, t.lsn) {
            report.problem(format!(
                "output_sequence {} is settled twice (LSNs {other} and {})",
                t.output_sequence, t.lsn
            ));
        }
        let Some((base, quote)) = t.symbol.split_once('-') else {
            report.problem(format!(
                "trade {} has a bad symbol {:?}",
                t.trade_id, t.symbol
            ));
            continue;
        };
        let (Ok(base), Ok(quote)) = (Asset::new(base), Asset::new(quote)) else {
            report.problem(format!(
                "trade {} has a bad symbol {:?}: an asset name is longer than {} bytes",
                t.trade_id, t.symbol, MAX_ASSET_LEN_BYTES
            ));
            continue;
        };
        let Some(notional) = t.price.checked_mul(t.quantity) else {
            report.problem(format!("trade {}: price * quantity overflows", t.trade_id));
            continue;
        };
        let base_key = |user_id| BalanceKey {
            user_id,
            asset: base,
        };
        let quote_key = |user_id| BalanceKey {
            user_id,
            asset: quote,
        };
        events.push((
            t.lsn,
            vec![
                (base_key(t.buyer_user_id), t.quantity),
                (quote_key(t.buyer_user_id), -notional),
                (base_key(t.seller_user_id), -t.quantity),
                (quote_key(t.seller_user_id), notional),
            ],
        ));
    }
    for m in &movements {
        if let Some(other) = seen_seq.insert(m.output_sequence, m.lsn) {
            report.problem(format!(
                "output_sequence {} is settled twice (LSNs {other} and {})",
                m.output_sequence, m.lsn
            ));
        }
        let delta = match m.kind {
            MovementKind::Deposit => m.amount,
            MovementKind::Withdraw => -m.amount,
        };
        let key = BalanceKey {
            user_id: m.user_id,
            asset: m.asset,
        };
        events.push((m.lsn, vec![(key, delta)]));
    }
    events.sort_by_key(|(lsn, _)| *lsn);
    for pair in events.windows(2) {
        if pair[0].0 == pair[1].0 {
            report.problem(format!("two event rows share LSN {}", pair[0].0));
        }
    }
    let mut expected: HashMap<BalanceKey, (i128, Lsn)> = HashMap::new();
    for (lsn, deltas) in events {
        for (key, delta) in deltas {
            let e = expected.entry(key).or_insert((0, 0));
            e.0 += i128::from(delta);
            e.1 = lsn;
        }
    }
    for (key, row) in &balances {
        match expected.remove(key) {
            None if row.amount == 0 => {}
            None => report.problem(format!(
                "{key}: balance {} at LSN {} but no trade or movement touches it",
                row.amount, row.last_lsn
            )),
            Some((amount, lsn)) => {
                if amount != i128::from(row.amount) || lsn != row.last_lsn {
                    report.problem(format!(
                        "{key}: stored {} at LSN {}, the trades and movements give {amount} at LSN {lsn}",
                        row.amount, row.last_lsn
                    ));
                }
            }
        }
    }
    let mut left: Vec<(BalanceKey, (i128, Lsn))> = expected.into_iter().collect();
    left.sort();
    for (key, (amount, lsn)) in left {
        report.problem(format!(
            "{key}: no balance row, but the trades and movements give {amount} at LSN {lsn}"
        ));
    }
    Ok(report)
}

/// P9: every sequence from the first to the highest is in exactly one state, and the
/// high-water row matches the rows.
fn completeness(
    report: &mut AuditReport,
    high_water: Option<HighWaterRow>,
    trades: &[TradeRow],
    movements: &[MovementRow],
    rejections: &[RejectionRow],
    holes: &[HoleRow],
) {
    // (sequence, what holds it): every settled and rejected sequence, and every hole's range.
    let mut states: Vec<(u64, &'static str)> =
        Vec::with_capacity(trades.len() + movements.len() + rejections.len());
    states.extend(trades.iter().map(|t| (t.output_sequence, "a trade")));
    states.extend(movements.iter().map(|m| (m.output_sequence, "a movement")));
    states.extend(
        rejections
            .iter()
            .map(|r| (r.output_sequence, "a rejection")),
    );
    let max_row_lsn = trades
        .iter()
        .map(|t| t.lsn)
        .chain(movements.iter().map(|m| m.lsn))
        .chain(rejections.iter().map(|r| r.lsn))
        .chain(holes.iter().map(|h| h.lsn))
        .max();
    let Some(hw) = high_water else {
        if !states.is_empty() || !holes.is_empty() {
            report.problem(
                "no high-water row, yet the store holds settled rows: it was written before identities existed (run `settlement run --recover-only` once to bind it) or by another tool".into(),
            );
        }
        return;
    };
    report.sequence_range = Some((hw.first_sequence, hw.high_sequence));
    if let Some(max) = max_row_lsn.filter(|&m| m > hw.lsn) {
        report.problem(format!(
            "a row was written at LSN {max}, after the high-water row (LSN {}): written without its batch's control entry",
            hw.lsn
        ));
    }
    let max_trade_id = trades.iter().map(|t| t.trade_id).max().unwrap_or(0);
    if max_trade_id > hw.max_trade_id {
        report.problem(format!(
            "trade_id {max_trade_id} is stored but the high-water row says the highest settled is {}",
            hw.max_trade_id
        ));
    }
    states.sort_unstable();
    let mut holes: Vec<&HoleRow> = holes.iter().collect();
    holes.sort_by_key(|h| h.first_sequence);
    for h in &holes {
        if h.first_sequence < hw.first_sequence || h.last_sequence >= hw.high_sequence {
            report.problem(format!(
                "open hole {}..={} is outside the accounted range {}..={}",
                h.first_sequence, h.last_sequence, hw.first_sequence, hw.high_sequence
            ));
        }
    }
    for pair in holes.windows(2) {
        if pair[1].first_sequence <= pair[0].last_sequence {
            report.problem(format!(
                "open holes {}..={} and {}..={} overlap",
                pair[0].first_sequence,
                pair[0].last_sequence,
                pair[1].first_sequence,
                pair[1].last_sequence
            ));
        }
    }
    // One walk over the range: the next state row, or the hole that covers the sequence.
    let mut missing: Vec<u64> = Vec::new();
    let mut missing_count = 0u64;
    let (mut i, mut hole) = (0usize, 0usize);
    while i < states.len() && states[i].0 < hw.first_sequence {
        report.problem(format!(
            "output_sequence {} ({}) is below the first accounted sequence {}",
            states[i].0, states[i].1, hw.first_sequence
        ));
        i += 1;
    }
    let mut seq = hw.first_sequence;
    while seq <= hw.high_sequence {
        while hole < holes.len() && holes[hole].last_sequence < seq {
            hole += 1;
        }
        let in_hole = holes
            .get(hole)
            .is_some_and(|h| h.first_sequence <= seq && seq <= h.last_sequence);
        let start = i;
        while i < states.len() && states[i].0 == seq {
            i += 1;
        }
        let held: Vec<&str> = states[start..i].iter().map(|s| s.1).collect();
        match (held.len(), in_hole) {
            (0, true) => {
                // The rest of the hole holds nothing: jump to its end.
                let end = holes[hole].last_sequence;
                let next_state = states.get(i).map_or(u64::MAX, |s| s.0);
                if next_state > end {
                    seq = end + 1;
                    continue;
                }
            }
            (1, false) => {}
            (0, false) => {
                // Nothing holds it, nor anything up to the next row or hole: count the run.
                let next_state = states.get(i).map_or(u64::MAX, |s| s.0);
                let next_hole = holes.get(hole).map_or(u64::MAX, |h| h.first_sequence);
                let next = next_state
                    .min(next_hole)
                    .min(hw.high_sequence + 1)
                    .max(seq + 1);
                missing_count += next - seq;
                if missing.len() < 5 {
                    missing.push(seq);
                }
                seq = next;
                continue;
            }
            (_, true) => report.problem(format!(
                "output_sequence {seq} is an open hole but also stored as {}",
                held.join(" and ")
            )),
            (_, false) => report.problem(format!(
                "output_sequence {seq} is stored twice: as {}",
                held.join(" and ")
            )),
        }
        seq += 1;
    }
    if missing_count > 0 {
        report.problem(format!(
            "{missing_count} sequence(s) in {}..={} are neither settled, rejected nor an open hole (the first: {missing:?}): they were dropped",
            hw.first_sequence, hw.high_sequence
        ));
    }
    for s in &states[i..] {
        report.problem(format!(
            "output_sequence {} ({}) is above the high-water row's highest sequence {}",
            s.0, s.1, hw.high_sequence
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::conformance::trade_entry;
    use crate::ledger::sim::SimLedger;
    use crate::ledger::{EventRow, Symbol};

    fn deposit(lsn: Lsn, seq: u64, amount: i64, post: i64) -> crate::ledger::EntryWrites {
        crate::ledger::conformance::deposit_entry(lsn, seq, 1, "USDT", amount, post)
    }

    fn high_water(lsn: Lsn, first: u64, high: u64) -> crate::ledger::EntryWrites {
        crate::ledger::EntryWrites {
            lsn,
            event: Some(EventRow::HighWater(HighWaterRow {
                lsn,
                first_sequence: first,
                high_sequence: high,
                max_trade_id: 0,
            })),
            balances: Vec::new(),
        }
    }

    /// P9: the audit fails a store where a sequence is neither settled, rejected nor an open
    /// hole, where one is stored twice, or where the high-water row does not match the rows;
    /// and passes the same store once it is complete.
    #[tokio::test]
    async fn completeness_is_proven_not_assumed() {
        // Sequences 1, 2 and 4 settled, the high-water says 1..=4: 3 was dropped.
        let store = SimLedger::new(1);
        store
            .apply(&[
                deposit(1, 1, 10, 10),
                deposit(2, 2, 5, 15),
                deposit(4, 4, 1, 16),
                high_water(5, 1, 4),
            ])
            .await
            .unwrap();
        let report = audit(&store).await.unwrap();
        assert!(!report.passed(), "{report}");
        assert!(
            report.to_string().contains("1 sequence(s) in 1..=4 are neither settled, rejected nor an open hole (the first: [3])"),
            "{report}"
        );
        // 3 recorded as an open hole: complete.
        store
            .apply(&[crate::ledger::EntryWrites {
                lsn: 5,
                event: Some(EventRow::Hole(crate::ledger::HoleRow {
                    first_sequence: 3,
                    last_sequence: 3,
                    open: true,
                    lsn: 5,
                })),
                balances: Vec::new(),
            }])
            .await
            .unwrap();
        let report = audit(&store).await.unwrap();
        assert!(report.passed(), "{report}");
        assert_eq!((report.open_holes, report.missing_sequences), (1, 1));
        // Sequence 2 also stored as a rejection: stored twice.
        store
            .apply(&[crate::ledger::EntryWrites {
                lsn: 5,
                event: Some(EventRow::Rejection(crate::ledger::RejectionRow {
                    output_sequence: 2,
                    reason: "x".into(),
                    lsn: 5,
                })),
                balances: Vec::new(),
            }])
            .await
            .unwrap();
        let report = audit(&store).await.unwrap();
        assert!(
            report
                .to_string()
                .contains("output_sequence 2 is stored twice: as a movement and a rejection"),
            "{report}"
        );
        // A row newer than the high-water (written without its batch's control entry).
        let store = SimLedger::new(2);
        store
            .apply(&[
                deposit(1, 1, 10, 10),
                high_water(1, 1, 1),
                deposit(7, 2, 1, 11),
            ])
            .await
            .unwrap();
        let report = audit(&store).await.unwrap();
        assert!(
            report.to_string().contains("after the high-water row"),
            "{report}"
        );
        assert!(report
            .to_string()
            .contains("above the high-water row's highest sequence"));
        // Rows without any high-water row.
        let store = SimLedger::new(3);
        store.apply(&[deposit(1, 1, 10, 10)]).await.unwrap();
        let report = audit(&store).await.unwrap();
        assert!(report.to_string().contains("no high-water row"), "{report}");
    }

    /// A stored trade whose symbol splits into an asset name too long for [`Asset`] (written by
    /// something other than this process) is a problem in the report, not a panic.
    #[tokio::test]
    async fn a_stored_symbol_with_a_too_long_asset_is_reported() {
        let store = SimLedger::new(1);
        let mut entry = trade_entry(1, 7, 1, 2, [3, -195_000, -3, 195_000]);
        let Some(EventRow::Trade(t)) = &mut entry.event else {
            panic!("a trade entry");
        };
        t.symbol = Symbol::new("ABCDEFGHIJKLMNOPQ-USDT").unwrap();
        store.apply(&[entry]).await.unwrap();
        let report = audit(&store).await.unwrap();
        assert!(!report.passed(), "{report}");
        assert!(
            report.to_string().contains(
                "trade 7 has a bad symbol \"ABCDEFGHIJKLMNOPQ-USDT\": an asset name is longer than 16 bytes"
            ),
            "{report}"
        );
    }
}
