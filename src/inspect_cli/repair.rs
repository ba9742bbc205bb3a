//! `repair DIR --truncate-torn-tail`: the only command that writes. It backs the segment up,
//! then opens the WAL for writing with [`Wal::open`], which is exactly what `settlement` does at
//! start: it cuts a torn tail (zeroes it and syncs) and refuses anything else. Corruption is
//! refused before anything is touched.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::read::{self, non_zero_end};
use super::report::{file_name, human_bytes};
use super::source::{open_dir, settled_scan};
use super::{CliError, Ctx, EXIT_ATTENTION, EXIT_FAILURE, EXIT_OK};
use crate::wal::{TailState, Wal, WalOptions};

/// Copies `segment` to `<segment>.bak-<unix time>` beside it (never over an existing file) and
/// makes the copy durable.
fn backup(segment: &Path) -> Result<PathBuf, CliError> {
    let fail = |what: &str, path: &Path, e: std::io::Error| {
        CliError::cannot(format!(
            "refusing to repair: {what} {} failed: {e}; nothing was changed",
            path.display()
        ))
    };
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut source = File::open(segment).map_err(|e| fail("reading", segment, e))?;
    let mut n = 0;
    let (path, mut dest) = loop {
        let mut name = segment.as_os_str().to_owned();
        name.push(format!(".bak-{secs}"));
        if n > 0 {
            name.push(format!("-{n}"));
        }
        let path = PathBuf::from(name);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => break (path, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => n += 1,
            Err(e) => return Err(fail("creating the backup", &path, e)),
        }
    };
    let copied = std::io::copy(&mut source, &mut dest)
        .and_then(|_| dest.sync_all())
        .and_then(|_| match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
            _ => Ok(()),
        });
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&path);
        return Err(fail("writing the backup", &path, e));
    }
    Ok(path)
}

/// `repair DIR [--truncate-torn-tail]`.
pub(super) fn repair(ctx: &mut Ctx<'_>, dir: &Path, truncate: bool) -> Result<u8, CliError> {
    let wal = open_dir(dir)?;
    if let Some(w) = wal.writer {
        return Err(CliError::cannot(format!(
            "refusing to repair {}: {w} holds its writer lock (settlement is running); the end of a running WAL is being written, not torn. Stop settlement first (it cuts a torn tail itself when it starts)",
            dir.display()
        )));
    }
    let scan = settled_scan(&wal)?;
    let inspection = &scan.inspection;
    let problems = read::problems(inspection);
    let shown = dir.display().to_string();
    if problems.is_empty() {
        if ctx.json {
            ctx.json_doc(&json!({"dir": shown, "action": "none", "reason": "nothing to repair: the WAL is clean"}))?;
        } else {
            writeln!(ctx.out, "nothing to repair: the WAL in {shown} is clean")?;
        }
        return Ok(EXIT_OK);
    }
    if let Some(bad) = problems.iter().find(|p| p.is_corrupt()) {
        let reason = format!(
            "refusing to repair: corruption at {} (expected LSN {}): {}: expected {}, found {} ({}). Corruption is not a torn tail: cutting it could drop entries that were acknowledged as durable. Nothing was changed; copy the WAL directory aside and see docs/debugging-a-recovery.md",
            bad.location(),
            bad.expected_lsn.map_or("-".into(), |l| l.to_string()),
            bad.what,
            bad.expected,
            bad.found,
            bad.reason
        );
        if ctx.json {
            ctx.json_doc(
                &json!({"dir": shown, "action": "refused", "reason": reason, "problems": problems}),
            )?;
        } else {
            writeln!(ctx.out, "{reason}")?;
        }
        ctx.note("error", &reason);
        return Ok(EXIT_FAILURE);
    }
    let Some((segment, TailState::Torn { offset, reason })) = inspection.problem.clone() else {
        return Err(CliError::cannot(
            "refusing to repair: the inspection reports a problem that is neither a torn tail nor corruption",
        ));
    };
    let torn = &problems[0];
    let cut_to = non_zero_end(&segment, offset)
        .map_err(|e| CliError::cannot(format!("cannot read {}: {e}", segment.display())))?;
    let size = std::fs::metadata(&segment).map(|m| m.len()).unwrap_or(0);
    let name = file_name(&segment);
    if !truncate {
        let text = format!(
            "torn tail at {name}:{offset} ({}: expected {}, found {}; {reason}): the remains of a write never acknowledged as durable.\nrepair --truncate-torn-tail would: 1) copy {name} ({}) to {name}.bak-<unix time> in {shown}; 2) cut the torn tail: zero bytes {offset}..{cut_to} ({} bytes) of {name} and sync, exactly as settlement does when it starts.\nNothing was changed. Run `wal-inspect repair {shown} --truncate-torn-tail` to do it.",
            torn.what,
            torn.expected,
            torn.found,
            human_bytes(size),
            cut_to - offset
        );
        if ctx.json {
            ctx.json_doc(&json!({
                "dir": shown, "action": "would_cut", "file": name, "offset": offset,
                "cut_to": cut_to, "zeroed_bytes": cut_to - offset, "reason": reason,
                "problems": problems,
            }))?;
        } else {
            writeln!(ctx.out, "{text}")?;
        }
        ctx.note(
            "warning",
            &format!("torn tail at {name}:{offset} not cut: run again with --truncate-torn-tail"),
        );
        return Ok(EXIT_ATTENTION);
    }
    let backup_path = backup(&segment)?;
    let opened = Wal::open(dir, WalOptions::default()).map_err(|e| {
        CliError::cannot(format!(
            "opening the WAL for writing to cut the torn tail failed: {e}; the backup {} was kept",
            backup_path.display()
        ))
    })?;
    let report = opened.open_report().clone();
    drop(opened);
    let after = settled_scan(&wal)?;
    let clean = after.inspection.is_clean();
    let (cut_offset, zeroed) = report
        .torn_tail
        .as_ref()
        .map_or((offset, 0), |t| (t.offset, t.zeroed_bytes));
    if ctx.json {
        ctx.json_doc(&json!({
            "dir": shown, "action": "cut", "file": name, "offset": cut_offset,
            "zeroed_bytes": zeroed, "reason": reason,
            "backup": backup_path.display().to_string(),
            "removed_temp_files": report.removed_temp_files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "after": if clean { "clean" } else { "not clean" },
        }))?;
    } else {
        writeln!(
            ctx.out,
            "backup: {} ({})",
            backup_path.display(),
            human_bytes(size)
        )?;
        match &report.torn_tail {
            Some(t) => writeln!(
                ctx.out,
                "cut the torn tail at {name}:{}: zeroed {} bytes and synced ({})",
                t.offset, t.zeroed_bytes, t.reason
            )?,
            None => writeln!(
                ctx.out,
                "opening the WAL found no torn tail left to cut (it changed since the inspection)"
            )?,
        }
        for tmp in &report.removed_temp_files {
            writeln!(
                ctx.out,
                "removed the leftover of an interrupted segment creation: {}",
                tmp.display()
            )?;
        }
        writeln!(
            ctx.out,
            "after: {}",
            if clean {
                "clean (settlement can start; recovery will verify the pending entries)".to_string()
            } else {
                super::report::problem_text(&after.inspection)
            }
        )?;
    }
    if clean {
        Ok(EXIT_OK)
    } else {
        ctx.note(
            "error",
            &format!(
                "the WAL is still not clean after the cut: {}",
                super::report::problem_text(&after.inspection)
            ),
        );
        Ok(EXIT_FAILURE)
    }
}
