//! The read-only commands that need no store: `summary`, `dump`, `verify`, `pending`.

use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::describe::{self, Payload};
use super::read::{self, Problem};
use super::source::{self, open_dir, PendingCollector, Scan, WalDir};
use super::{CliError, Ctx, TypeFilter, EXIT_ATTENTION, EXIT_FAILURE, EXIT_OK};
use crate::wal::format::{RecordType, RecordView};
use crate::wal::{Inspection, Lsn, PendingEntry, TailState};

/// The file name of a path, for tables (the directory is printed once above them).
pub(super) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// `1.2 MiB`.
pub(super) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// One line on who holds the writer lock.
pub(super) fn writer_text(wal: &WalDir) -> String {
    match wal.writer {
        Some(w) => format!(
            "writer: {w} holds the writer lock (settlement is running): this is a consistent prefix of a log that is still growing"
        ),
        None => "writer: none (no process holds the writer lock)".into(),
    }
}

/// The writer as JSON.
pub(super) fn writer_json(wal: &WalDir) -> Value {
    match wal.writer {
        Some(w) => json!({"running": true, "pid": w.pid}),
        None => json!({"running": false, "pid": null}),
    }
}

/// One line on the WAL's identity (format version 2 segment headers).
pub(super) fn identity_text(inspection: &Inspection) -> String {
    match inspection.identity {
        Some(id) => format!(
            "identity: wal_id {:#018x}, owner_id {}{}",
            id.wal_id,
            id.owner_id,
            if id.owner_id == 0 { " (not bound)" } else { "" }
        ),
        None => {
            "identity: none (format version 1 segments only; the next new segment gets one)".into()
        }
    }
}

/// The identity as JSON (`null` fields for a WAL without one).
pub(super) fn identity_json(identity: Option<crate::wal::WalIdentity>) -> Value {
    match identity {
        Some(id) => json!({"wal_id": id.wal_id, "owner_id": id.owner_id}),
        None => json!({"wal_id": null, "owner_id": null}),
    }
}

/// The WAL-wide problem state: `clean`, `torn at file:offset (...)`, `corrupt at ...`.
pub(super) fn problem_text(inspection: &Inspection) -> String {
    match &inspection.problem {
        None => "clean".into(),
        Some((path, state)) => tail_text(state, &file_name(path)),
    }
}

fn tail_text(state: &TailState, file: &str) -> String {
    match state {
        TailState::Clean => "clean".into(),
        TailState::Torn { offset, reason } => format!("torn at {file}:{offset} ({reason})"),
        TailState::Corrupt {
            offset,
            expected_lsn,
            reason,
        } => format!("corrupt at {file}:{offset} (expected LSN {expected_lsn}: {reason})"),
    }
}

fn tail_json(state: &TailState, path: Option<&Path>) -> Value {
    let file = path.map(|p| p.display().to_string());
    match state {
        TailState::Clean => json!({"state": "clean"}),
        TailState::Torn { offset, reason } => {
            json!({"state": "torn", "file": file, "offset": offset, "reason": reason})
        }
        TailState::Corrupt {
            offset,
            expected_lsn,
            reason,
        } => json!({
            "state": "corrupt", "file": file, "offset": offset,
            "expected_lsn": expected_lsn, "reason": reason,
        }),
    }
}

/// The WAL-wide problem as JSON.
pub(super) fn problem_json(inspection: &Inspection) -> Value {
    match &inspection.problem {
        None => json!({"state": "clean"}),
        Some((path, state)) => tail_json(state, Some(path)),
    }
}

/// Does the inspection show corruption (not only a torn tail)?
pub(super) fn is_corrupt(inspection: &Inspection) -> bool {
    inspection.problem.is_some() && !inspection.is_torn_only()
}

/// What settlement would do about the WAL's problem, one line (empty when clean).
pub(super) fn consequence(inspection: &Inspection) -> Option<String> {
    match &inspection.problem {
        None => None,
        Some((path, TailState::Torn { offset, .. })) => Some(format!(
            "torn tail at {}:{offset}: the remains of a write never acknowledged as durable; settlement cuts it when it starts (or `wal-inspect repair DIR --truncate-torn-tail`, which keeps a backup)",
            file_name(path)
        )),
        Some((path, TailState::Corrupt { offset, .. })) => Some(format!(
            "corruption at {}:{offset}: settlement will refuse to start and changes nothing on disk; do not delete segments; copy the directory aside, then `wal-inspect verify DIR` (guide: docs/debugging-a-recovery.md)",
            file_name(path)
        )),
        Some((_, TailState::Clean)) => None,
    }
}

/// Exit code and stderr note for the read-only commands: 2 for corruption, else 0.
fn finish(ctx: &mut Ctx<'_>, inspection: &Inspection) -> u8 {
    if let Some(text) = consequence(inspection) {
        if is_corrupt(inspection) {
            ctx.note("error", &format!("WAL {}", text));
            return EXIT_FAILURE;
        }
        ctx.note("warning", &text);
    }
    EXIT_OK
}

/// `summary DIR`.
pub(super) fn summary(ctx: &mut Ctx<'_>, dir: &Path) -> Result<u8, CliError> {
    let wal = open_dir(dir)?;
    let Scan {
        inspection,
        newest_entry,
    } = source::settled_scan(&wal)?;
    let segs = &inspection.segments;
    // Same rule as `Wal::checkpoint`: sealed segments, oldest first, wholly at or below the
    // committed watermark, and not holding the newest entry; nothing at or after a problem.
    let problem_at = inspection
        .problem
        .as_ref()
        .and_then(|(p, _)| segs.iter().position(|s| &s.path == p))
        .unwrap_or(segs.len());
    let newest = newest_entry.unwrap_or(0);
    let recyclable = segs
        .windows(2)
        .take(problem_at)
        .take_while(|w| {
            let last_in_segment = w[1].first_lsn.saturating_sub(1);
            last_in_segment <= inspection.committed_watermark && last_in_segment < newest
        })
        .count();
    let state = |i: usize| {
        if i + 1 == segs.len() {
            "active"
        } else if i < recyclable {
            "recyclable"
        } else {
            "sealed"
        }
    };
    let (mut entries, mut commits, mut checkpoints, mut used, mut file_bytes) = (0, 0, 0, 0, 0);
    for s in segs {
        entries += s.counts.entries;
        commits += s.counts.commits;
        checkpoints += s.counts.checkpoints;
        used += s.used_bytes;
        file_bytes += s.file_size_bytes;
    }
    let first_lsn = segs.first().map_or(0, |s| s.first_lsn);
    let last_lsn = (inspection.next_lsn > first_lsn).then(|| inspection.next_lsn - 1);
    let code = if ctx.json {
        let rows: Vec<Value> = segs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                json!({
                    "file": file_name(&s.path),
                    "path": s.path.display().to_string(),
                    "state": state(i),
                    "first_lsn": s.first_lsn,
                    "last_lsn": s.last_lsn,
                    "entries": s.counts.entries,
                    "commits": s.counts.commits,
                    "checkpoints": s.counts.checkpoints,
                    "used_bytes": s.used_bytes,
                    "file_size_bytes": s.file_size_bytes,
                    "format_version": s.format_version,
                    "identity": identity_json(s.identity),
                    "tail": tail_json(&s.tail, None),
                })
            })
            .collect();
        ctx.json_doc(&json!({
            "dir": wal.dir.display().to_string(),
            "writer": writer_json(&wal),
            "identity": identity_json(inspection.identity),
            "segments": rows,
            "totals": {
                "segments": segs.len(),
                "records": entries + commits + checkpoints,
                "entries": entries,
                "commits": commits,
                "checkpoints": checkpoints,
                "used_bytes": used,
                "file_size_bytes": file_bytes,
                "first_lsn": first_lsn,
                "last_lsn": last_lsn,
                "next_lsn": inspection.next_lsn,
                "committed_watermark": inspection.committed_watermark,
                "pending": inspection.pending.len(),
                "recyclable_segments": recyclable,
            },
            "tail": problem_json(&inspection),
            "temp_files": wal.temp_files,
        }))?;
        finish(ctx, &inspection)
    } else {
        let out = &mut *ctx.out;
        writeln!(out, "WAL {}: {} segment(s)", wal.dir.display(), segs.len())?;
        writeln!(out, "{}", writer_text(&wal))?;
        writeln!(out, "{}", identity_text(&inspection))?;
        // Segments whose header disagrees with the WAL's identity (another owner after a
        // rebind, no identity in a version 1 segment) are listed by name.
        for s in segs {
            if s.identity != inspection.identity && s.format_version.is_some() {
                writeln!(
                    out,
                    "  {}: format version {}, {}",
                    file_name(&s.path),
                    s.format_version.unwrap_or(0),
                    match s.identity {
                        Some(id) => format!("wal_id {:#018x}, owner_id {}", id.wal_id, id.owner_id),
                        None => "no identity".into(),
                    }
                )?;
            }
        }
        writeln!(
            out,
            "{:<26} {:<10} {:>12} {:>12} {:>8} {:>8} {:>6} {:>12} {:>12}  TAIL",
            "SEGMENT",
            "STATE",
            "FIRST LSN",
            "LAST LSN",
            "ENTRIES",
            "COMMITS",
            "CKPTS",
            "USED BYTES",
            "FILE BYTES"
        )?;
        for (i, s) in segs.iter().enumerate() {
            let name = file_name(&s.path);
            writeln!(
                out,
                "{:<26} {:<10} {:>12} {:>12} {:>8} {:>8} {:>6} {:>12} {:>12}  {}",
                name,
                state(i),
                s.first_lsn,
                s.last_lsn.map_or("-".to_string(), |l| l.to_string()),
                s.counts.entries,
                s.counts.commits,
                s.counts.checkpoints,
                s.used_bytes,
                s.file_size_bytes,
                tail_text(&s.tail, &name)
            )?;
        }
        let range = match last_lsn {
            Some(last) => format!("LSN {first_lsn}..={last}"),
            None => format!("no records (first LSN {first_lsn})"),
        };
        writeln!(
            out,
            "totals: {range} (next {}), committed watermark {}, {} pending entr{}",
            inspection.next_lsn,
            inspection.committed_watermark,
            inspection.pending.len(),
            if inspection.pending.len() == 1 {
                "y"
            } else {
                "ies"
            },
        )?;
        writeln!(
            out,
            "        {} records ({entries} entries, {commits} commits, {checkpoints} checkpoints), {} used in {} of segment files, {recyclable} recyclable segment(s)",
            entries + commits + checkpoints,
            human_bytes(used),
            human_bytes(file_bytes),
        )?;
        writeln!(out, "tail: {}", problem_text(&inspection))?;
        for tmp in &wal.temp_files {
            writeln!(
                out,
                "note: {tmp} is the leftover of an interrupted segment creation (harmless; settlement deletes it when it starts)"
            )?;
        }
        finish(ctx, &inspection)
    };
    Ok(code)
}

/// `dump` filters.
pub(super) struct DumpFilter {
    pub(super) from: Option<Lsn>,
    pub(super) to: Option<Lsn>,
    pub(super) trade_id: Option<u64>,
    pub(super) user: Option<u64>,
    pub(super) record_type: Option<TypeFilter>,
}

impl DumpFilter {
    /// The cheap part: LSN range and type.
    fn admits(&self, r: &RecordView<'_>) -> bool {
        let ty = match r.record_type {
            RecordType::Entry => TypeFilter::Entry,
            RecordType::Commit => TypeFilter::Commit,
            RecordType::Checkpoint => TypeFilter::Checkpoint,
        };
        self.from.is_none_or(|f| r.lsn >= f)
            && self.to.is_none_or(|t| r.lsn <= t)
            && self.record_type.is_none_or(|t| t == ty)
    }

    /// The part that needs the decoded payload: trade and user (entries only).
    fn admits_payload(&self, payload: &Payload) -> bool {
        if self.trade_id.is_none() && self.user.is_none() {
            return true;
        }
        let Payload::Entry(e) = payload else {
            return false;
        };
        self.trade_id
            .is_none_or(|t| describe::is_trade(&e.event, t))
            && self
                .user
                .is_none_or(|u| describe::touches_user(&e.event, u))
    }
}

fn dump_text_header(out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "{:>12}  {:<10}  {:<36} {:>6}  {:<3}  DETAIL",
        "LSN", "TYPE", "FILE:OFFSET", "SIZE", "CRC"
    )
}

fn dump_text_record(
    out: &mut dyn Write,
    path: &Path,
    r: &RecordView<'_>,
    in_prefix: bool,
    payload: &Payload,
) -> io::Result<()> {
    writeln!(
        out,
        "{:>12}  {:<10}  {:<36} {:>6}  {:<3}  {}{}",
        r.lsn,
        r.record_type.name(),
        format!("{}:{}", file_name(path), r.offset),
        r.size_bytes,
        "ok",
        describe::detail_text(payload, r.payload),
        if in_prefix {
            ""
        } else {
            "  [after a problem: not part of the consistent prefix]"
        }
    )
}

fn record_json(path: &Path, r: &RecordView<'_>, in_prefix: bool, payload: &Payload) -> Value {
    let (key, detail) = describe::detail_json(payload, r.payload);
    let mut v = json!({
        "lsn": r.lsn,
        "type": r.record_type.name(),
        "file": file_name(path),
        "offset": r.offset,
        "size_bytes": r.size_bytes,
        "checksum": "ok",
        "in_consistent_prefix": in_prefix,
    });
    v[key] = detail;
    v
}

/// `dump DIR [filters]`: streams records as they are scanned (nothing is collected), then the
/// problems.
pub(super) fn dump(ctx: &mut Ctx<'_>, dir: &Path, filter: &DumpFilter) -> Result<u8, CliError> {
    let wal = open_dir(dir)?;
    let json = ctx.json;
    let out = &mut *ctx.out;
    if json {
        write!(
            out,
            "{{\"dir\":{},\"records\":[",
            serde_json::to_string(&wal.dir.display().to_string()).map_err(io::Error::from)?
        )?;
    } else {
        writeln!(out, "WAL {}", wal.dir.display())?;
        writeln!(out, "{}", writer_text(&wal))?;
        dump_text_header(out)?;
    }
    let mut matched = 0u64;
    let mut failed: Option<io::Error> = None;
    let scan = source::scan(&wal, &mut |path, r, in_prefix| {
        if failed.is_some() || !filter.admits(r) {
            return;
        }
        let payload = describe::decode(r.record_type, r.payload);
        if !filter.admits_payload(&payload) {
            return;
        }
        let result = if json {
            let sep = if matched == 0 { "\n" } else { ",\n" };
            write!(out, "{sep}").and_then(|_| {
                serde_json::to_writer(&mut *out, &record_json(path, r, in_prefix, &payload))
                    .map_err(io::Error::from)
            })
        } else {
            dump_text_record(out, path, r, in_prefix, &payload)
        };
        matched += 1;
        if let Err(e) = result {
            failed = Some(e);
        }
    })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    let inspection = &scan.inspection;
    let problems = read::problems(inspection);
    if json {
        let tail = json!({
            "matched": matched,
            "problems": problems,
            "next_lsn": inspection.next_lsn,
            "committed_watermark": inspection.committed_watermark,
            "tail": problem_json(inspection),
        });
        // Close the array and splice the remaining fields into the same object.
        let tail = serde_json::to_string(&tail).map_err(io::Error::from)?;
        writeln!(out, "\n],{}", &tail[1..])?;
    } else {
        for p in &problems {
            writeln!(out, "{}", problem_line(p))?;
        }
        writeln!(
            out,
            "{matched} record(s) shown; next LSN {}, committed watermark {}; tail: {}",
            inspection.next_lsn,
            inspection.committed_watermark,
            problem_text(inspection)
        )?;
    }
    Ok(finish(ctx, inspection))
}

/// One problem, one line: `BAD corrupt at FILE:OFFSET (expected LSN n): what: expected X, found Y (reason)`.
fn problem_line(p: &Problem) -> String {
    let resume = match &p.resumes_at {
        None => String::new(),
        Some(r) => format!(
            "\n    valid records resume at offset {} with LSN {} ({} valid record(s) from there){}",
            r.offset,
            r.lsn,
            r.valid_records,
            match r.lost_lsns {
                Some((a, b)) => format!(
                    "; LSN {a}..={b} ({} record(s)) unreadable{}",
                    b - a + 1,
                    match r.lost_committed {
                        Some(true) => ": a later commit marker covers them (they took effect in the store)",
                        Some(false) => ": no later commit marker in this segment covers them (entries among them may be missing from the store)",
                        None => "",
                    }
                ),
                None => String::new(),
            }
        ),
    };
    format!(
        "BAD {} at {}{}: {}: expected {}, found {} ({}){resume}",
        p.severity,
        p.location(),
        p.expected_lsn
            .map_or(String::new(), |l| format!(" (expected LSN {l})")),
        p.what,
        p.expected,
        p.found,
        p.reason
    )
}

/// `verify DIR`: exit 0 clean, 1 torn tail only, 2 corruption.
pub(super) fn verify(ctx: &mut Ctx<'_>, dir: &Path) -> Result<u8, CliError> {
    let started = Instant::now();
    let wal = open_dir(dir)?;
    let scan = source::settled_scan(&wal)?;
    let elapsed = started.elapsed();
    let inspection = &scan.inspection;
    let problems = read::problems(inspection);
    let corrupt = problems.iter().filter(|p| p.is_corrupt()).count();
    let (status, code) = if corrupt > 0 {
        ("corrupt", EXIT_FAILURE)
    } else if !problems.is_empty() {
        ("torn", EXIT_ATTENTION)
    } else {
        ("clean", EXIT_OK)
    };
    // Records the scan verified, plus those verified past damage (see `read::problems`).
    let records: u64 = inspection
        .segments
        .iter()
        .map(|s| s.counts.entries + s.counts.commits + s.counts.checkpoints)
        .sum::<u64>()
        + problems
            .iter()
            .filter_map(|p| p.resumes_at.map(|r| r.valid_records))
            .sum::<u64>();
    let bytes: u64 = inspection.segments.iter().map(|s| s.used_bytes).sum();
    let scanned: u64 = inspection.segments.iter().map(|s| s.file_size_bytes).sum();
    let rate = mb_per_s(scanned, elapsed);
    if ctx.json {
        ctx.json_doc(&json!({
            "dir": wal.dir.display().to_string(),
            "status": status,
            "exit_code": code,
            "writer": writer_json(&wal),
            "segments": inspection.segments.len(),
            "records": records,
            "record_bytes": bytes,
            "scanned_bytes": scanned,
            "seconds": elapsed.as_secs_f64(),
            "problems": problems,
        }))?;
    } else {
        let out = &mut *ctx.out;
        writeln!(out, "WAL {}", wal.dir.display())?;
        writeln!(out, "{}", writer_text(&wal))?;
        for p in &problems {
            writeln!(out, "{}", problem_line(p))?;
        }
        writeln!(
            out,
            "verified {} segment(s), {records} records ({} of records, {} of files scanned) in {:.3} s ({rate:.0} MB/s): {status}",
            inspection.segments.len(),
            human_bytes(bytes),
            human_bytes(scanned),
            elapsed.as_secs_f64(),
        )?;
        match status {
            "corrupt" => writeln!(
                out,
                "verdict: corruption: settlement will refuse to start, and nothing was changed on disk. Do not delete or edit segments: copy the WAL directory aside first (guide: docs/debugging-a-recovery.md)"
            )?,
            "torn" => writeln!(
                out,
                "verdict: torn tail only (repairable): the remains of a write never acknowledged as durable; settlement cuts it when it starts, or `wal-inspect repair {} --truncate-torn-tail` does it now (keeping a backup)",
                wal.dir.display()
            )?,
            _ => writeln!(out, "verdict: clean")?,
        }
        if wal.writer.is_some() && code != EXIT_OK {
            writeln!(
                out,
                "note: a writer is running; a torn tail at the end of the active segment may be an append in flight: run verify again, or stop settlement first"
            )?;
        }
    }
    if let Some(first) = problems.first() {
        let level = if corrupt > 0 { "error" } else { "warning" };
        ctx.note(
            level,
            &format!(
                "WAL {status}: {} problem(s); first: {} at {}: {}: expected {}, found {}",
                problems.len(),
                first.severity,
                first.location(),
                first.what,
                first.expected,
                first.found
            ),
        );
    }
    Ok(code)
}

/// Megabytes (10^6 bytes) per second.
fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}

/// Pending entries with their payloads, read in one streaming pass that keeps only uncommitted
/// payloads (repeated while a running writer makes the WAL look torn).
pub(super) fn collect_pending(
    wal: &WalDir,
) -> Result<(Scan, Vec<PendingEntry>, Vec<Lsn>), CliError> {
    let mut attempt = 0;
    loop {
        let mut collector = PendingCollector::default();
        let scan = source::scan(wal, &mut |_, r, in_prefix| {
            if in_prefix {
                collector.feed(r);
            }
        })?;
        attempt += 1;
        if scan.inspection.is_clean() || wal.writer.is_none() || attempt >= 3 {
            let (entries, missing) = collector.finish(&scan.inspection.pending);
            return Ok((scan, entries, missing));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `pending DIR`.
pub(super) fn pending(ctx: &mut Ctx<'_>, dir: &Path) -> Result<u8, CliError> {
    let wal = open_dir(dir)?;
    let (scan, entries, missing) = collect_pending(&wal)?;
    let inspection = &scan.inspection;
    let decoded: Vec<(Lsn, Payload, &[u8])> = entries
        .iter()
        .map(|e| {
            (
                e.lsn,
                describe::decode(RecordType::Entry, &e.payload),
                e.payload.as_slice(),
            )
        })
        .collect();
    let undecodable = decoded
        .iter()
        .filter(|(_, p, _)| matches!(p, Payload::Undecodable { .. }))
        .count();
    if ctx.json {
        let rows: Vec<Value> = decoded
            .iter()
            .map(|(lsn, p, bytes)| match p {
                Payload::Entry(e) => json!({
                    "lsn": lsn,
                    "output_sequence": e.event.output_sequence(),
                    "event": describe::event_json(&e.event),
                    "post_images": describe::post_images_json(&e.post_images),
                }),
                other => {
                    let (_, detail) = describe::detail_json(other, bytes);
                    json!({"lsn": lsn, "undecodable": detail})
                }
            })
            .collect();
        ctx.json_doc(&json!({
            "dir": wal.dir.display().to_string(),
            "writer": writer_json(&wal),
            "count": inspection.pending.len(),
            "committed_watermark": inspection.committed_watermark,
            "entries": rows,
            "unreadable_lsns": missing,
            "tail": problem_json(inspection),
        }))?;
    } else {
        let out = &mut *ctx.out;
        writeln!(out, "WAL {}", wal.dir.display())?;
        writeln!(out, "{}", writer_text(&wal))?;
        match (inspection.pending.first(), inspection.pending.last()) {
            (Some(first), Some(last)) => writeln!(
                out,
                "{} pending entr{} (LSN {first}..={last}, committed watermark {}): at start, recovery checks each against the store, re-sends only what is missing, then marks them committed",
                inspection.pending.len(),
                if inspection.pending.len() == 1 { "y" } else { "ies" },
                inspection.committed_watermark
            )?,
            _ => writeln!(
                out,
                "no pending entries (committed watermark {}): recovery has nothing to do",
                inspection.committed_watermark
            )?,
        }
        if !decoded.is_empty() {
            writeln!(out, "{:>12}  {:>12}  EVENT", "LSN", "OUTPUT SEQ")?;
        }
        for (lsn, p, bytes) in &decoded {
            match p {
                Payload::Entry(e) => writeln!(
                    out,
                    "{lsn:>12}  {:>12}  {}",
                    e.event.output_sequence(),
                    describe::event_text(&e.event)
                )?,
                other => writeln!(
                    out,
                    "{lsn:>12}  {:>12}  {}",
                    "?",
                    describe::detail_text(other, bytes)
                )?,
            }
        }
        if undecodable > 0 {
            writeln!(
                out,
                "note: {undecodable} pending entr{} not decode as settlement entries: recovery would stop at them (`WAL entry LSN n is not a settlement entry`)",
                if undecodable == 1 { "y does" } else { "ies do" }
            )?;
        }
        if !missing.is_empty() {
            writeln!(
                out,
                "note: the payloads of {} pending entr{} could not be read (the WAL changed during the scan?): LSN {:?}",
                missing.len(),
                if missing.len() == 1 { "y" } else { "ies" },
                missing
            )?;
        }
        writeln!(out, "tail: {}", problem_text(inspection))?;
    }
    Ok(finish(ctx, inspection))
}
