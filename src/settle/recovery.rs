//! Start-up recovery: classify every pending WAL entry against the store, re-send only what is
//! missing, then mark everything committed (P3: exactly once).
//!
//! Per row, comparing the row's `last_lsn` with the entry's LSN `n`:
//! `< n` (or no row) missing; `= n` with the expected amount applied; `> n` superseded by a newer
//! entry; `= n` with another amount diverged (reported, never overwritten silently).
//!
//! Reads are in bulk: every event row's LSN through [`Ledger::event_lsns`] (the CQL store keeps
//! `inflight_reads` point reads in flight), and every distinct balance row once through
//! [`Ledger::read_balances`], however many entries touch it; the store does not change while
//! the plan is made, so every entry is classified against the same state as if it had been read
//! alone. The missing rows are re-sent the way the pipeline sends a micro-batch
//! ([`crate::ledger::coalesce`]: event rows, then each balance row once with its newest missing
//! post-image), in applies of at most [`RECOVERY_APPLY_ROWS`] rows, at most
//! [`RECOVERY_INFLIGHT_APPLIES`] at once. Leaving out an older post-image of a row that a newer
//! one overwrites anyway changes nothing in the store (last write wins by LSN, P4), and if the
//! process dies half-way the next recovery classifies those entries again: their rows are then
//! superseded or applied.

use std::collections::HashMap;
use std::time::Instant;

use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;

use super::control::{ControlEntry, HighWater, WalPayload};
use super::entry::SettlementEntry;
use super::event::Event;
use super::sequence::{HoleChanges, Placement, SequenceState, MAX_SEQUENCE_JUMP_LIMIT};
use super::SettleError;
use crate::ledger::{
    coalesce, BalanceKey, BalanceRow, BalanceWrite, EntryWrites, EventKey, Ledger, LedgerError,
    MAX_LOOKUP_KEYS,
};
use crate::wal::{Lsn, PendingEntry, Wal};

/// Keys per bulk read (`event_lsns`, `read_balances`): bounds one call, not the concurrency
/// (the store's own in-flight limit does that).
pub const RECOVERY_LOOKUP_KEYS: usize = 4096;
/// Most row writes per `apply` when re-sending (about one pipeline micro-batch: 1000 trades'
/// event rows plus their coalesced balance rows).
pub const RECOVERY_APPLY_ROWS: usize = 2000;
/// Most re-send applies in flight at once (the pipeline's default `--inflight`).
pub const RECOVERY_INFLIGHT_APPLIES: usize = 8;

const _: () = assert!(RECOVERY_LOOKUP_KEYS <= MAX_LOOKUP_KEYS);
const _: () = assert!(RECOVERY_APPLY_ROWS <= crate::ledger::MAX_APPLY_ROWS);

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
    pub resend: Vec<EntryWrites>,
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
    /// Rows found missing and re-sent (per entry, as `wal-inspect plan` lists them).
    pub resent_rows: usize,
    /// Row writes sent for them: each balance row once, with its newest missing post-image
    /// (an older one would be overwritten by it anyway).
    pub written_rows: usize,
    /// Entries of a batch whose control entry never reached the WAL (a crash in the middle of
    /// the batch's append), accounted for by a control write of recovery's own.
    pub torn_batch_entries: usize,
    /// Wall time of the classification (the reads), part of `duration_ms`.
    pub plan_ms: u64,
    /// Wall time.
    pub duration_ms: u64,
}

/// Classifies pending entries against the store without changing anything (`wal-inspect plan`
/// and the first half of [`recover`]).
pub async fn plan(
    ledger: &dyn Ledger,
    pending: &[PendingEntry],
) -> Result<Vec<EntryPlan>, SettleError> {
    let decoded: Vec<(Lsn, WalPayload)> = pending
        .iter()
        .map(|p| {
            WalPayload::decode(&p.payload)
                .map(|e| (p.lsn, e))
                .map_err(|reason| SettleError::BadEntry { lsn: p.lsn, reason })
        })
        .collect::<Result<_, _>>()?;
    // Every event row of every entry (a control entry has several: its high-water, rejection
    // and hole rows), in entry order.
    let mut event_keys: Vec<EventKey> = Vec::with_capacity(decoded.len());
    for (_, payload) in &decoded {
        match payload {
            WalPayload::Settle(e) => event_keys.push(match &e.event {
                Event::Trade(t) => EventKey::Trade(t.trade_id),
                Event::Movement(m) => EventKey::Movement(m.output_sequence),
            }),
            WalPayload::Control(c) => event_keys.extend(c.keys()),
        }
    }
    let mut balance_keys: Vec<BalanceKey> = decoded
        .iter()
        .filter_map(|(_, p)| match p {
            WalPayload::Settle(e) => Some(e.post_images.iter().map(|(k, _)| *k)),
            WalPayload::Control(_) => None,
        })
        .flatten()
        .collect();
    balance_keys.sort_unstable();
    balance_keys.dedup();
    // Event rows and balance rows are independent reads: both at once.
    let (event_lsns, balances) = futures::try_join!(
        read_event_lsns(ledger, &event_keys),
        read_balance_rows(ledger, &balance_keys),
    )?;
    let mut event_lsns = event_lsns.into_iter();
    Ok(decoded
        .into_iter()
        .map(|(lsn, payload)| match payload {
            WalPayload::Settle(entry) => {
                let event_lsn = event_lsns.next().expect("one lookup per event row");
                let mut rows = entry.post_images.iter().map(|(k, _)| balances[k]);
                classify(lsn, &entry, event_lsn, &mut rows)
            }
            WalPayload::Control(control) => classify_control(lsn, &control, &mut event_lsns),
        })
        .collect())
}

/// A control entry's rows: each present at its LSN (applied), newer (superseded) or missing.
/// These rows are the entry's own bookkeeping, so an equal LSN is the entry's write.
fn classify_control(
    lsn: Lsn,
    control: &ControlEntry,
    event_lsns: &mut impl Iterator<Item = Option<Lsn>>,
) -> EntryPlan {
    let mut verdicts = Vec::new();
    let mut resend = Vec::new();
    for (key, write) in control.keys().into_iter().zip(control.writes(lsn)) {
        let found = event_lsns.next().expect("one lookup per control row");
        let class = match found {
            Some(l) if l == lsn => RowClass::Applied,
            Some(l) if l > lsn => RowClass::Superseded,
            _ => RowClass::Missing,
        };
        if class == RowClass::Missing {
            resend.push(write);
        }
        verdicts.push(RowVerdict {
            row: key.to_string(),
            class,
            found: found.map(|l| (0, l)),
            expected: 0,
        });
    }
    EntryPlan {
        lsn,
        output_sequence: control.high_water.high_sequence,
        class: entry_class(&verdicts),
        rows: verdicts,
        resend,
    }
}

fn entry_class(verdicts: &[RowVerdict]) -> EntryClass {
    let any = |c| verdicts.iter().any(|v| v.class == c);
    if any(RowClass::Diverged) {
        EntryClass::Diverged
    } else if !any(RowClass::Missing) {
        EntryClass::Applied
    } else if any(RowClass::Applied) || any(RowClass::Superseded) {
        EntryClass::Partial
    } else {
        EntryClass::Missing
    }
}

/// The LSN of each event row, [`RECOVERY_LOOKUP_KEYS`] per call.
async fn read_event_lsns(
    ledger: &dyn Ledger,
    keys: &[EventKey],
) -> Result<Vec<Option<Lsn>>, SettleError> {
    read_in_chunks(keys, "event lookups", |chunk| ledger.event_lsns(chunk)).await
}

/// Each (distinct) balance row, [`RECOVERY_LOOKUP_KEYS`] per call.
async fn read_balance_rows(
    ledger: &dyn Ledger,
    keys: &[BalanceKey],
) -> Result<HashMap<BalanceKey, Option<BalanceRow>>, SettleError> {
    let found = read_in_chunks(keys, "balance reads", |chunk| ledger.read_balances(chunk)).await?;
    Ok(keys.iter().cloned().zip(found).collect())
}

/// One answer per key, asking `read` for [`RECOVERY_LOOKUP_KEYS`] keys at a time; a store
/// that answers a call with the wrong number of values is an error (`what` names the reads).
pub(crate) async fn read_in_chunks<'a, K, V, F, Fut>(
    keys: &'a [K],
    what: &str,
    read: F,
) -> Result<Vec<V>, SettleError>
where
    F: Fn(&'a [K]) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<V>, LedgerError>>,
{
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(RECOVERY_LOOKUP_KEYS) {
        let found = read(chunk).await?;
        if found.len() != chunk.len() {
            return Err(answer_count_error(what, found.len(), chunk.len()));
        }
        out.extend(found);
    }
    Ok(out)
}

fn answer_count_error(what: &str, got: usize, asked: usize) -> SettleError {
    SettleError::Ledger(LedgerError::Other(format!(
        "the store answered {got} of {asked} {what} (a bug in the store implementation)"
    )))
}

/// Splits writes into applies of at most `max_rows` row writes each, keeping their order; an
/// entry's writes with more balance rows than that (the coalesced balance rows) are split too.
fn apply_chunks(writes: Vec<EntryWrites>, max_rows: usize) -> Vec<Vec<EntryWrites>> {
    let max_rows = max_rows.max(1);
    let mut chunks: Vec<Vec<EntryWrites>> = Vec::new();
    let mut current: Vec<EntryWrites> = Vec::new();
    let mut rows = 0;
    for mut w in writes {
        while w.row_count() > 0 {
            if rows == max_rows {
                chunks.push(std::mem::take(&mut current));
                rows = 0;
            }
            let room = max_rows - rows;
            let part = if w.row_count() <= room {
                std::mem::replace(
                    &mut w,
                    EntryWrites {
                        lsn: 0,
                        event: None,
                        balances: Vec::new(),
                    },
                )
            } else {
                let event = w.event.take();
                let take = room - usize::from(event.is_some());
                EntryWrites {
                    lsn: w.lsn,
                    event,
                    balances: w.balances.drain(..take).collect(),
                }
            };
            rows += part.row_count();
            current.push(part);
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// Applies every chunk, at most [`RECOVERY_INFLIGHT_APPLIES`] at once. After an error no new
/// apply starts, and the ones in flight are waited for (nothing of this call still writes when
/// it returns); the first error is returned.
async fn apply_all(ledger: &dyn Ledger, chunks: Vec<Vec<EntryWrites>>) -> Result<(), SettleError> {
    let mut chunks = chunks.into_iter();
    let mut running = FuturesUnordered::new();
    let mut first_error: Option<LedgerError> = None;
    loop {
        while first_error.is_none() && running.len() < RECOVERY_INFLIGHT_APPLIES {
            let Some(chunk) = chunks.next() else { break };
            running.push(async move { ledger.apply(&chunk).await });
        }
        match running.next().await {
            None => break,
            Some(Ok(())) => {}
            Some(Err(e)) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        None => Ok(()),
        Some(e) => Err(e.into()),
    }
}

fn classify(
    lsn: Lsn,
    entry: &SettlementEntry,
    event_lsn: Option<Lsn>,
    rows: &mut impl Iterator<Item = Option<crate::ledger::BalanceRow>>,
) -> EntryPlan {
    let event_row = entry.event_row(lsn);
    let event_name = event_row.key().to_string();
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
                key: *key,
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
    EntryPlan {
        lsn,
        output_sequence: entry.event.output_sequence(),
        class: entry_class(&verdicts),
        rows: verdicts,
        resend: vec![resend],
    }
}

/// Classifies `entries` against the store and re-sends only what is missing (the first half of
/// [`recover`], without the commit markers; also what `--adopt-store` runs over the WAL's
/// retained entries above a restored store's high-water). A divergence stops it unless
/// `accept_divergence`.
pub async fn resend(
    ledger: &dyn Ledger,
    entries: &[PendingEntry],
    accept_divergence: bool,
) -> Result<RecoveryReport, SettleError> {
    let pending = entries;
    let mut report = RecoveryReport {
        pending: pending.len(),
        ..RecoveryReport::default()
    };
    if pending.is_empty() {
        return Ok(report);
    }
    let plan_started = Instant::now();
    let plans = plan(ledger, pending).await?;
    report.plan_ms = plan_started.elapsed().as_millis() as u64;
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
        tracing::error!(entries = diverged.len(), report = %text, "recovery: diverged entries left wholly as the store holds them, none of their rows re-sent (--accept-divergence)");
        eprintln!(
            "recovery: {} diverged entr(y/ies) left wholly as the store holds them (--accept-divergence): none of their rows was re-sent, not even the missing ones, so no entry lands half from the WAL and half from the store:{text}",
            diverged.len()
        );
    }
    let mut resend = Vec::new();
    for p in plans {
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
        if p.class == EntryClass::Diverged {
            continue; // wholly as the store has it: nothing of it is re-sent
        }
        for w in p.resend.into_iter().filter(|w| w.row_count() > 0) {
            report.resent_rows += w.row_count();
            resend.push(w);
        }
    }
    let writes = coalesce(resend);
    report.written_rows = writes.iter().map(EntryWrites::row_count).sum();
    apply_all(ledger, apply_chunks(writes, RECOVERY_APPLY_ROWS)).await?;
    Ok(report)
}

/// The settlement entries after the last control entry among `pending`: the part of a batch
/// whose append was cut before its control entry (every batch ends with one, and markers cover
/// whole batches, so only the newest batch can be torn). Their events are applied by recovery
/// like any pending entry; what their control entry would have recorded (the high-water, the
/// holes their sequences open or close) is written here, at the last such entry's LSN, before
/// they are marked committed. Rejections of that batch were never durable: their sequences stay
/// open holes, and a re-delivery decides them again. Returns how many entries it covered.
async fn complete_torn_batch(
    ledger: &dyn Ledger,
    pending: &[PendingEntry],
) -> Result<usize, SettleError> {
    let mut orphans: Vec<(Lsn, SettlementEntry)> = Vec::new();
    for p in pending {
        match WalPayload::decode(&p.payload)
            .map_err(|reason| SettleError::BadEntry { lsn: p.lsn, reason })?
        {
            WalPayload::Control(_) => orphans.clear(),
            WalPayload::Settle(e) => orphans.push((p.lsn, e)),
        }
    }
    let Some(&(last_lsn, _)) = orphans.last() else {
        return Ok(0);
    };
    let high_water = ledger.high_water().await?;
    let holes = ledger.open_holes().await?;
    // Every sequence the pipeline accepted is accepted here, whatever --max-seq-jump is now.
    let mut state = SequenceState::from_store(high_water, &holes, MAX_SEQUENCE_JUMP_LIMIT)
        .map_err(|e| {
            SettleError::Ledger(LedgerError::Other(format!("{}: {e}", ledger.describe())))
        })?;
    let mut max_trade_id = high_water.map_or(0, |h| h.max_trade_id);
    let mut changes = HoleChanges::new();
    for (lsn, e) in &orphans {
        let seq = e.event.output_sequence();
        match state.place(seq) {
            Placement::Duplicate | Placement::TooFar { .. } => {
                tracing::error!(lsn, output_sequence = seq, "a torn batch's entry whose sequence the store already accounts for; left as it is");
                continue;
            }
            placement => state.accept(seq, placement, &mut changes),
        }
        if let Event::Trade(t) = &e.event {
            max_trade_id = max_trade_id.max(t.trade_id);
        }
    }
    let (Some(first_sequence), Some(high_sequence)) = (state.first(), state.high()) else {
        return Ok(0);
    };
    let mut control = ControlEntry {
        high_water: HighWater {
            first_sequence,
            high_sequence,
            max_trade_id,
        },
        ..ControlEntry::default()
    };
    control.set_holes(changes);
    tracing::warn!(
        entries = orphans.len(),
        last_lsn,
        "recovery: a batch cut before its control entry; writing its bookkeeping"
    );
    ledger.apply(&control.writes(last_lsn)).await?;
    Ok(orphans.len())
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
    if pending.is_empty() {
        return Ok(RecoveryReport::default());
    }
    tracing::info!(
        pending = pending.len(),
        "recovery: verifying pending WAL entries against the store"
    );
    let mut report = resend(ledger, &pending, accept_divergence).await?;
    // Before the markers: a batch whose control entry did not reach the WAL (a crash in the
    // middle of its append) gets its bookkeeping now, or its events would not count as settled.
    report.torn_batch_entries = complete_torn_batch(ledger, &pending).await?;
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
        written_rows = report.written_rows,
        plan_ms = report.plan_ms,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::conformance::{deposit_entry, trade_entry};

    fn rows(writes: &[EntryWrites]) -> Vec<String> {
        let mut out = Vec::new();
        for w in writes {
            if let Some(e) = &w.event {
                out.push(e.key().to_string());
            }
            for b in &w.balances {
                out.push(format!("{} {} @{}", b.key, b.amount, b.lsn));
            }
        }
        out
    }

    #[test]
    fn apply_chunks_bound_the_rows_and_keep_every_write_in_order() {
        let entries: Vec<EntryWrites> = (0..50u64)
            .map(|i| {
                if i % 4 == 0 {
                    deposit_entry(i + 1, 1000 + i, i, "ETH", 1, 1)
                } else {
                    trade_entry(i + 1, i, i % 9, 10 + i % 11, [1, -1, -1, 1])
                }
            })
            .collect();
        let coalesced = coalesce(entries);
        let all = rows(&coalesced);
        for max_rows in [1, 2, 3, 7, 50, 51, 1000] {
            let chunks = apply_chunks(coalesced.clone(), max_rows);
            let flat: Vec<EntryWrites> = chunks.iter().flatten().cloned().collect();
            assert_eq!(rows(&flat), all, "max_rows {max_rows}");
            for c in &chunks {
                let n: usize = c.iter().map(EntryWrites::row_count).sum();
                assert!(n >= 1 && n <= max_rows, "{n} rows > {max_rows}");
            }
            // Full chunks but the last.
            for c in &chunks[..chunks.len() - 1] {
                assert_eq!(
                    c.iter().map(EntryWrites::row_count).sum::<usize>(),
                    max_rows
                );
            }
        }
        assert!(apply_chunks(Vec::new(), 10).is_empty());
    }
}
