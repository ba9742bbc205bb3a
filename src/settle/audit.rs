//! `settlement audit`: proves money is conserved (P7) and that every balance is exactly what the
//! settled trades and movements in the store say, against the store alone.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::SettleError;
use crate::ledger::{Amount, Asset, BalanceKey, Ledger, MovementKind, MAX_ASSET_LEN_BYTES};
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
            "audit: {} trades, {} movements, {} balance rows",
            self.trades, self.movements, self.balance_rows
        )?;
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
            write!(f, "audit PASSED: per asset, balances = deposits - withdrawals; every balance matches its trades and movements")
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
    let balances = ledger.scan_balances().await?;
    let trades = ledger.scan_trades().await?;
    let movements = ledger.scan_movements().await?;
    let mut report = AuditReport {
        trades: trades.len(),
        movements: movements.len(),
        balance_rows: balances.len(),
        ..AuditReport::default()
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::conformance::trade_entry;
    use crate::ledger::sim::SimLedger;
    use crate::ledger::{EventRow, Symbol};

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
