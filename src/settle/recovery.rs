//! Start-up recovery: classify every pending WAL entry against the store, re-send only what is
//! missing, then mark everything committed (P3: exactly once).
//!
//! Per row, comparing the row's `last_lsn` with the entry's LSN `n`:
//! `< n` (or no row) missing; `= n` with the expected amount applied; `> n` superseded by a newer
//! entry; `= n` with another amount diverged (reported, never overwritten silently).

use std::time::Instant;

use futures::stream::{self, StreamExt};
use serde::Serialize;

use super::entry::SettlementEntry;
use super::event::Event;
use super::SettleError;
use crate::ledger::{BalanceKey, BalanceWrite, EntryWrites, EventRow, Ledger};
use crate::wal::{Lsn, PendingEntry, Wal};

/// Pending entries classified per round trip to the store.
const RECOVERY_CHUNK_ENTRIES: usize = 1000;
/// Concurrent existence checks.
const RECOVERY_CONCURRENCY: usize = 32;

/// How one row of a pending entry stands in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RowClass {
    /// Not written (absent, or an older LSN).
    Missing,
    /// Written by this entry with the expected value.
    Applied,
    /// Overwritten by a newer entry.
    Superseded,
    /// Written with this entry's LSN but another value: needs a human.
    Diverged,
}

/// The class of a whole entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryClass {
    /// Every row applied or superseded: nothing to send.
    Applied,
    /// Some rows applied, some missing.
    Partial,
    /// Nothing applied.
    Missing,
    /// At least one row diverged.
    Diverged,
}

/// One row's verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RowVerdict {
    /// `trade 9001`, `movement 18` or `user 1 BTC`.
    pub row: String,
    /// The class.
    pub class: RowClass,
    /// What the store holds: `(amount or 0 for event rows, lsn)`, if anything.
    pub found: Option<(i64, Lsn)>,
    /// What the entry expects (amount, 0 for event rows).
    pub expected: i64,
}

/// The plan for one pending entry.
#[derive(Clone, Debug, Serialize)]
pub struct EntryPlan {
    /// The entry's LSN.
    pub lsn: Lsn,
    /// Its output sequence.
    pub output_sequence: u64,
    /// Its class.
    pub class: EntryClass,
    /// Every row.
    pub rows: Vec<RowVerdict>,
    /// The writes recovery would send (only the missing rows).
    #[serde(skip)]
    pub resend: EntryWrites,
}

/// What a recovery did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RecoveryReport {
    /// Pending entries found.
    pub pending: usize,
    /// Entries already fully applied.
    pub applied: usize,
    /// Entries partly applied (missing rows re-sent).
    pub partial: usize,
    /// Entries not applied at all (re-sent).
    pub missing: usize,
    /// Entries with a diverged row.
    pub diverged: usize,
    /// Rows found superseded by newer entries.
    pub superseded_rows: usize,
    /// Rows re-sent.
    pub resent_rows: usize,
    /// Wall time.
    pub duration_ms: u64,
}

/// Classifies pending entries against the store without changing anything (`wal-inspect plan`
/// and the first half of [`recover`]).
pub async fn plan(
    ledger: &dyn Ledger,
    pending: &[PendingEntry],
) -> Result<Vec<EntryPlan>, SettleError> {
    let mut plans = Vec::with_capacity(pending.len());
    for chunk in pending.chunks(RECOVERY_CHUNK_ENTRIES) {
        let decoded: Vec<(Lsn, SettlementEntry)> = chunk
            .iter()
            .map(|p| {
                SettlementEntry::decode(&p.payload)
                    .map(|e| (p.lsn, e))
                    .map_err(|reason| SettleError::BadEntry { lsn: p.lsn, reason })
            })
            .collect::<Result<_, _>>()?;
        // Owned ids (not borrows of `decoded`) keep the future `Send` for any caller.
        let lookups: Vec<(bool, u64)> = decoded
            .iter()
            .map(|(_, e)| match &e.event {
                Event::Trade(t) => (true, t.trade_id),
                Event::Movement(m) => (false, m.output_sequence),
            })
            .collect();
        let event_lsns: Vec<Option<Lsn>> = stream::iter(lookups)
            .map(|(is_trade, id)| async move {
                if is_trade {
                    ledger.trade_lsn(id).await
                } else {
                    ledger.movement_lsn(id).await
                }
            })
            .buffered(RECOVERY_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let keys: Vec<BalanceKey> = decoded
            .iter()
            .flat_map(|(_, e)| e.post_images.iter().map(|(k, _)| k.clone()))
            .collect();
        let rows = ledger.read_balances(&keys).await?;
        let mut rows = rows.into_iter();
        for ((lsn, entry), event_lsn) in decoded.into_iter().zip(event_lsns) {
            plans.push(classify(lsn, &entry, event_lsn, &mut rows));
        }
    }
    Ok(plans)
}

fn classify(
    lsn: Lsn,
    entry: &SettlementEntry,
    event_lsn: Option<Lsn>,
    rows: &mut impl Iterator<Item = Option<crate::ledger::BalanceRow>>,
) -> EntryPlan {
    let event_row = entry.event_row(lsn);
    let event_name = match &event_row {
        EventRow::Trade(t) => format!("trade {}", t.trade_id),
        EventRow::Movement(m) => format!("movement {}", m.output_sequence),
    };
    let event_class = match event_lsn {
        None => RowClass::Missing,
        Some(l) if l == lsn => RowClass::Applied,
        Some(l) if l < lsn => RowClass::Missing,
        // A trade id or sequence written by a later entry: the engine reused it.
        Some(_) => RowClass::Diverged,
    };
    let mut verdicts = vec![RowVerdict {
        row: event_name,
        class: event_class,
        found: event_lsn.map(|l| (0, l)),
        expected: 0,
    }];
    let mut resend = EntryWrites {
        lsn,
        event: (event_class == RowClass::Missing).then_some(event_row),
        balances: Vec::new(),
    };
    for (key, amount) in &entry.post_images {
        let row = rows.next().expect("one read per post-image");
        let class = match row {
            None => RowClass::Missing,
            Some(r) if r.last_lsn < lsn => RowClass::Missing,
            Some(r) if r.last_lsn > lsn => RowClass::Superseded,
            Some(r) if r.amount == *amount => RowClass::Applied,
            Some(_) => RowClass::Diverged,
        };
        if class == RowClass::Missing {
            resend.balances.push(BalanceWrite {
                key: key.clone(),
                amount: *amount,
                lsn,
            });
        }
        verdicts.push(RowVerdict {
            row: key.to_string(),
            class,
            found: row.map(|r| (r.amount, r.last_lsn)),
            expected: *amount,
        });
    }
    let any = |c| verdicts.iter().any(|v| v.class == c);
    let class = if any(RowClass::Diverged) {
        EntryClass::Diverged
    } else if !any(RowClass::Missing) {
        EntryClass::Applied
    } else if any(RowClass::Applied) || any(RowClass::Superseded) {
        EntryClass::Partial
    } else {
        EntryClass::Missing
    };
    EntryPlan {
        lsn,
        output_sequence: entry.event.output_sequence(),
        class,
        rows: verdicts,
        resend,
    }
}

/// Runs recovery: classify every pending entry, re-send only what is missing, mark everything
/// committed, sync, checkpoint. A divergence stops it with a report unless
/// `accept_divergence` (then the diverged rows are left as the store has them, and logged).
pub async fn recover(
    wal: &Wal,
    ledger: &dyn Ledger,
    accept_divergence: bool,
) -> Result<RecoveryReport, SettleError> {
    let started = Instant::now();
    let pending = tokio::task::block_in_place(|| wal.pending())?;
    let mut report = RecoveryReport {
        pending: pending.len(),
        ..RecoveryReport::default()
    };
    if pending.is_empty() {
        return Ok(report);
    }
    tracing::info!(
        pending = pending.len(),
        "recovery: verifying pending WAL entries against the store"
    );
    let plans = plan(ledger, &pending).await?;
    let diverged: Vec<&EntryPlan> = plans
        .iter()
        .filter(|p| p.class == EntryClass::Diverged)
        .collect();
    if !diverged.is_empty() {
        let mut text = String::new();
        for p in diverged.iter().take(20) {
            for r in p.rows.iter().filter(|r| r.class == RowClass::Diverged) {
                text.push_str(&format!(
                    "\n  entry LSN {} (output_sequence {}): {} holds {:?}, the entry expects {} at LSN {}",
                    p.lsn, p.output_sequence, r.row, r.found, r.expected, p.lsn
                ));
            }
        }
        if !accept_divergence {
            return Err(SettleError::Divergence {
                entries: diverged.len(),
                report: text,
            });
        }
        tracing::error!(entries = diverged.len(), report = %text, "recovery: diverged rows left as the store holds them (--accept-divergence)");
    }
    let mut resend = Vec::new();
    for p in &plans {
        match p.class {
            EntryClass::Applied => report.applied += 1,
            EntryClass::Partial => report.partial += 1,
            EntryClass::Missing => report.missing += 1,
            EntryClass::Diverged => report.diverged += 1,
        }
        report.superseded_rows += p
            .rows
            .iter()
            .filter(|r| r.class == RowClass::Superseded)
            .count();
        if p.resend.row_count() > 0 {
            report.resent_rows += p.resend.row_count();
            resend.push(p.resend.clone());
        }
    }
    let mut batch = Vec::new();
    let mut rows = 0;
    for w in resend {
        rows += w.row_count();
        batch.push(w);
        if rows >= 4000 {
            ledger.apply(&batch).await?;
            batch.clear();
            rows = 0;
        }
    }
    if !batch.is_empty() {
        ledger.apply(&batch).await?;
    }
    let first = pending.first().expect("not empty").lsn;
    let last = pending.last().expect("not empty").lsn;
    tokio::task::block_in_place(|| {
        wal.commit_range(first, last)?;
        wal.sync()?;
        wal.checkpoint()
    })?;
    report.duration_ms = started.elapsed().as_millis() as u64;
    tracing::info!(
        pending = report.pending,
        applied = report.applied,
        partial = report.partial,
        missing = report.missing,
        diverged = report.diverged,
        superseded_rows = report.superseded_rows,
        resent_rows = report.resent_rows,
        duration_ms = report.duration_ms,
        "recovery done"
    );
    metrics::counter!("settlement_recovered_entries_total", "class" => "applied")
        .increment(report.applied as u64);
    metrics::counter!("settlement_recovered_entries_total", "class" => "partial")
        .increment(report.partial as u64);
    metrics::counter!("settlement_recovered_entries_total", "class" => "missing")
        .increment(report.missing as u64);
    metrics::counter!("settlement_recovered_entries_total", "class" => "diverged")
        .increment(report.diverged as u64);
    Ok(report)
}
