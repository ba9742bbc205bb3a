//! `plan DIR --store STORE`: the recovery dry run. Classifies every pending entry against the
//! store with the same code recovery uses (`settle::recovery::plan`) and sends no writes.

use std::path::Path;

use serde_json::{json, Value};

use super::describe::{self, Payload};
use super::report::{
    collect_pending, consequence, is_corrupt, problem_json, problem_text, writer_json, writer_text,
};
use super::source::{lock_holder, open_dir};
use super::{CliError, Ctx, EXIT_ATTENTION, EXIT_FAILURE, EXIT_OK};
use crate::ledger::{open_store_read_only, EntryWrites, EventRow, LedgerError, StoreUrl};
use crate::settle::recovery::{self, EntryClass, EntryPlan, RowClass};
use crate::wal::format::RecordType;
use crate::wal::{Lsn, PendingEntry};

/// Refuses an embedded store that does not exist (opening would create one) or that a running
/// process holds.
fn check_embedded(path: &Path) -> Result<(), CliError> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CliError::cannot(format!(
                "no embedded store at {shown} (plan never creates one): give the file settlement uses, --store embedded:PATH (default ./data/ledger.redb)"
            )))
        }
        Err(e) => {
            return Err(CliError::cannot(format!(
                "cannot read the embedded store {shown}: {e}"
            )))
        }
        Ok(m) if m.is_dir() => {
            return Err(CliError::cannot(format!(
                "{shown} is a directory, not an embedded store file"
            )))
        }
        Ok(_) => {}
    }
    if let Some(holder) = lock_holder(path) {
        return Err(locked(path, &holder.to_string()));
    }
    Ok(())
}

fn locked(path: &Path, holder: &str) -> CliError {
    let shown = path.display();
    CliError::cannot(format!(
        "the embedded store {shown} is locked by {holder}: a running settlement process holds it open (only one process may open it). Stop settlement first (it runs this recovery itself when it starts), or plan against a copy: cp {shown} /tmp/ledger-copy.redb && wal-inspect plan DIR --store embedded:/tmp/ledger-copy.redb"
    ))
}

fn store_error(store: &StoreUrl, e: LedgerError) -> CliError {
    let text = e.to_string();
    match store {
        StoreUrl::Embedded(path) if text.contains("already open") => {
            locked(path, "another process")
        }
        _ => CliError::cannot(format!("cannot open the store {store}: {text}")),
    }
}

fn writes_text(w: &EntryWrites) -> String {
    let mut parts = Vec::new();
    match &w.event {
        Some(EventRow::Trade(t)) => parts.push(format!("trade {} row", t.trade_id)),
        Some(EventRow::Movement(m)) => parts.push(format!("movement {} row", m.output_sequence)),
        Some(EventRow::Rejection(r)) => parts.push(format!("rejection {} row", r.output_sequence)),
        Some(EventRow::Hole(h)) => parts.push(format!(
            "hole {}..={} row ({})",
            h.first_sequence,
            h.last_sequence,
            if h.open { "open" } else { "closed" }
        )),
        Some(EventRow::HighWater(hw)) => parts.push(format!(
            "high-water row (LSN {}, sequences {}..={}, max trade_id {})",
            hw.lsn, hw.first_sequence, hw.high_sequence, hw.max_trade_id
        )),
        None => {}
    }
    for b in &w.balances {
        parts.push(format!("{}={} (last_lsn {})", b.key, b.amount, b.lsn));
    }
    parts.join(", ")
}

fn class_name(class: impl serde::Serialize) -> String {
    serde_json::to_value(class)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn rows_json(plan: &EntryPlan, control: bool) -> Value {
    Value::Array(
        plan.rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                // Row 0 is the event row (trade or movement), whose only state is its LSN.
                let (found, expected) = if i == 0 || control {
                    (
                        r.found.map(|(_, lsn)| json!({"lsn": lsn})),
                        json!({"lsn": plan.lsn}),
                    )
                } else {
                    (
                        r.found
                            .map(|(amount, lsn)| json!({"amount": amount, "last_lsn": lsn})),
                        json!({"amount": r.expected, "last_lsn": plan.lsn}),
                    )
                };
                json!({"row": r.row, "class": class_name(r.class), "found": found, "expected": expected})
            })
            .collect(),
    )
}

/// `plan DIR --store STORE`.
pub(super) fn plan(ctx: &mut Ctx<'_>, dir: &Path, store: &StoreUrl) -> Result<u8, CliError> {
    let wal = open_dir(dir)?;
    if let StoreUrl::Embedded(path) = store {
        check_embedded(path)?;
    }
    let (scan, entries, missing) = collect_pending(&wal)?;
    let inspection = &scan.inspection;
    let mut decodable: Vec<PendingEntry> = Vec::with_capacity(entries.len());
    let mut decoded: Vec<Payload> = Vec::with_capacity(entries.len());
    let mut undecodable: Vec<(Lsn, String, String)> = Vec::new();
    for e in entries {
        match describe::decode(RecordType::Entry, &e.payload) {
            p @ (Payload::Entry(_) | Payload::Control(_)) => {
                decoded.push(p);
                decodable.push(e);
            }
            other => {
                let text = describe::detail_text(&other, &e.payload);
                let note = match other {
                    Payload::Undecodable { note } => note,
                    _ => String::new(),
                };
                undecodable.push((e.lsn, note, text));
            }
        }
    }
    let plans: Vec<EntryPlan> = if decodable.is_empty() {
        Vec::new()
    } else {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| CliError::cannot(format!("cannot start the async runtime: {e}")))?;
        runtime.block_on(async {
            let ledger = open_store_read_only(store)
                .await
                .map_err(|e| store_error(store, e))?;
            recovery::plan(&*ledger, &decodable)
                .await
                .map_err(|e| CliError::cannot(format!("planning against {store}: {e}")))
        })?
    };
    let count = |c: EntryClass| plans.iter().filter(|p| p.class == c).count();
    let (applied, partial, missing_entries, diverged) = (
        count(EntryClass::Applied),
        count(EntryClass::Partial),
        count(EntryClass::Missing),
        count(EntryClass::Diverged),
    );
    let superseded_rows: usize = plans
        .iter()
        .map(|p| {
            p.rows
                .iter()
                .filter(|r| r.class == RowClass::Superseded)
                .count()
        })
        .sum();
    let resend_rows: usize = plans
        .iter()
        .flat_map(|p| &p.resend)
        .map(EntryWrites::row_count)
        .sum();
    let verdict = if is_corrupt(inspection) {
        "refuse to start: the WAL is corrupt (see `wal-inspect verify`)".to_string()
    } else if !undecodable.is_empty() {
        format!(
            "stop: {} pending entr{} not settlement entries",
            undecodable.len(),
            if undecodable.len() == 1 {
                "y is"
            } else {
                "ies are"
            }
        )
    } else if diverged > 0 {
        format!(
            "stop: {diverged} diverged entr{} (settlement exits with a divergence report and overwrites nothing; --accept-divergence keeps the store's values)",
            if diverged == 1 { "y" } else { "ies" }
        )
    } else if plans.is_empty() {
        "nothing to do: no pending entries".to_string()
    } else {
        format!(
            "proceed: re-send {resend_rows} row write(s), then mark LSN {}..={} committed",
            plans[0].lsn,
            plans[plans.len() - 1].lsn
        )
    };
    let code = if is_corrupt(inspection) {
        EXIT_FAILURE
    } else if diverged > 0 || !undecodable.is_empty() {
        EXIT_ATTENTION
    } else {
        EXIT_OK
    };
    if ctx.json {
        let rows: Vec<Value> = plans
            .iter()
            .zip(&decoded)
            .map(|(p, e)| {
                let event = match e {
                    Payload::Entry(e) => describe::event_json(&e.event),
                    other => describe::detail_json(other, &[]).1,
                };
                json!({
                    "lsn": p.lsn,
                    "output_sequence": p.output_sequence,
                    "class": class_name(p.class),
                    "event": event,
                    "rows": rows_json(p, matches!(e, Payload::Control(_))),
                    "resend": p.resend,
                })
            })
            .collect();
        let undecodable: Vec<Value> = undecodable
            .iter()
            .map(|(lsn, note, _)| json!({"lsn": lsn, "note": note}))
            .collect();
        ctx.json_doc(&json!({
            "dir": wal.dir.display().to_string(),
            "store": store.to_string(),
            "writer": writer_json(&wal),
            "pending": inspection.pending.len(),
            "entries": rows,
            "undecodable": undecodable,
            "unreadable_lsns": missing,
            "totals": {
                "applied": applied,
                "partial": partial,
                "missing": missing_entries,
                "diverged": diverged,
                "superseded_rows": superseded_rows,
                "resend_rows": resend_rows,
                "undecodable": undecodable.len(),
            },
            "recovery_would": verdict,
            "tail": problem_json(inspection),
        }))?;
    } else {
        let out = &mut *ctx.out;
        writeln!(out, "WAL {}", wal.dir.display())?;
        writeln!(out, "{}", writer_text(&wal))?;
        writeln!(
            out,
            "plan against {store} (dry run: no writes are sent), {} pending entr{}",
            inspection.pending.len(),
            if inspection.pending.len() == 1 {
                "y"
            } else {
                "ies"
            }
        )?;
        if !plans.is_empty() {
            writeln!(
                out,
                "{:>12}  {:>12}  {:<10} EVENT / ROWS",
                "LSN", "OUTPUT SEQ", "CLASS"
            )?;
        }
        for (p, e) in plans.iter().zip(&decoded) {
            let control = matches!(e, Payload::Control(_));
            writeln!(
                out,
                "{:>12}  {:>12}  {:<10} {}",
                p.lsn,
                p.output_sequence,
                class_name(p.class),
                match e {
                    Payload::Entry(e) => describe::event_text(&e.event),
                    other => describe::detail_text(other, &[]),
                }
            )?;
            if p.class == EntryClass::Applied {
                continue;
            }
            for (i, r) in p.rows.iter().enumerate() {
                let lsn_only = i == 0 || control;
                let found = match (lsn_only, r.found) {
                    (_, None) => "absent".to_string(),
                    (true, Some((_, lsn))) => format!("found at LSN {lsn}"),
                    (false, Some((amount, lsn))) => format!("found {amount} (last_lsn {lsn})"),
                };
                let expected = if lsn_only {
                    format!("expected LSN {}", p.lsn)
                } else {
                    format!("expected {} (last_lsn {})", r.expected, p.lsn)
                };
                writeln!(
                    out,
                    "{:>40} {:<20} {:<11} {found}, {expected}{}",
                    "",
                    r.row,
                    class_name(r.class),
                    if r.class == RowClass::Missing {
                        "  -> re-send"
                    } else {
                        ""
                    }
                )?;
            }
        }
        if applied > 0 {
            writeln!(
                out,
                "(rows of the {applied} applied entr{} are not listed: nothing to send for them; --json lists every row)",
                if applied == 1 { "y" } else { "ies" }
            )?;
        }
        for (lsn, _, text) in &undecodable {
            writeln!(out, "{lsn:>12}  {:>12}  {:<10} {text}", "?", "undecodable")?;
        }
        if resend_rows > 0 {
            writeln!(out, "writes recovery would send ({resend_rows} rows):")?;
            for p in plans.iter() {
                for w in p.resend.iter().filter(|w| w.row_count() > 0) {
                    writeln!(out, "  LSN {}: {}", p.lsn, writes_text(w))?;
                }
            }
        }
        if !missing.is_empty() {
            writeln!(
                out,
                "note: the payloads of pending LSN {missing:?} could not be read (the WAL changed during the scan?)"
            )?;
        }
        writeln!(
            out,
            "totals: {applied} applied, {partial} partial, {missing_entries} missing, {diverged} diverged, {} undecodable; {superseded_rows} superseded row(s); {resend_rows} row write(s) to re-send",
            undecodable.len()
        )?;
        writeln!(out, "tail: {}", problem_text(inspection))?;
        writeln!(out, "recovery would: {verdict}")?;
    }
    if let Some(text) = consequence(inspection) {
        ctx.note(
            if is_corrupt(inspection) {
                "error"
            } else {
                "warning"
            },
            &format!("WAL {text}"),
        );
    } else if code == EXIT_ATTENTION {
        ctx.note("warning", &format!("recovery would {verdict}"));
    }
    Ok(code)
}
