//! `wal-inspect`: the on-call engineer's view of a settlement WAL.
//!
//! Everything the binary does lives here, so `src/bin/wal-inspect.rs` only parses arguments and
//! exits with the code [`run`] returns. Every command but `repair --truncate-torn-tail` is
//! read-only: it never takes the writer lock, never changes a byte of the WAL, and works on a WAL
//! whose writer is running (it reads a consistent prefix) and on a copied directory.
//!
//! | command | what | exit |
//! |---|---|---|
//! | `summary DIR` | one row per segment, then totals and the tail state | 0, or 2 for corruption |
//! | `dump DIR [filters]` | every record decoded | 0, or 2 for corruption |
//! | `verify DIR` | every checksum and the LSN sequence; each problem with file, offset, expected and found | 0 clean, 1 torn tail only, 2 corruption |
//! | `pending DIR` | the entries recovery would process | 0, or 2 for corruption |
//! | `plan DIR --store STORE` | recovery dry run: each pending entry's class per row and the writes recovery would send | 0, 1 when recovery would stop (divergence, undecodable entry), 2 for corruption |
//! | `repair DIR --truncate-torn-tail` | backs the segment up, then cuts a torn tail; refuses corruption | 0 repaired or nothing to repair, 1 without the flag, 2 refused |
//!
//! Any command that cannot inspect (no such path, a file, an empty or foreign directory, a
//! segment of a newer format version, no readable segment header, an unreachable store) prints
//! one line `error: ...` on stderr and exits 2. Memory stays flat whatever the WAL size: records
//! are streamed through [`crate::wal::inspect_with`]; `pending` and `plan` keep only the payloads
//! of entries not yet committed.
//!
//! The on-call guide is `docs/debugging-a-recovery.md`.

mod describe;
mod plan;
mod read;
mod repair;
mod report;
mod source;

use std::io::{self, Write};
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::ledger::StoreUrl;
use crate::wal::Lsn;

/// Exit code: success, a clean WAL, or nothing to repair.
pub const EXIT_OK: u8 = 0;
/// Exit code: a torn tail only (`verify`), an action needed (`repair` without its flag), or a
/// recovery that would stop (`plan`: a diverged row or an undecodable entry).
pub const EXIT_ATTENTION: u8 = 1;
/// Exit code: corruption, a refused repair, or "cannot inspect" (bad input, unreachable store).
pub const EXIT_FAILURE: u8 = 2;

/// `wal-inspect`: see what a settlement WAL holds, what is wrong with it, and what recovery
/// would do. Read-only unless `repair --truncate-torn-tail` is given.
#[derive(Debug, Parser)]
#[command(
    name = "wal-inspect",
    version,
    about = "See what a settlement WAL holds, what is wrong with it, and what recovery would do. Read-only unless `repair --truncate-torn-tail` is given.",
    after_help = "Exit codes: 0 ok/clean; 1 torn tail only (verify), action needed (repair without its flag) or recovery would stop (plan); 2 corruption, refused repair, or cannot inspect.\nGuide: docs/debugging-a-recovery.md"
)]
pub struct Cli {
    /// Machine-readable JSON on stdout instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Record types, for `dump --type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TypeFilter {
    /// Settlement entries (an event with its balance post-images).
    Entry,
    /// Commit markers.
    Commit,
    /// Checkpoint records.
    Checkpoint,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// One row per segment (LSNs, records by type, bytes, state), then totals: LSN range,
    /// committed watermark, pending entries, tail state.
    Summary {
        /// The WAL directory (settlement's --wal-dir).
        dir: PathBuf,
    },
    /// Every record decoded: LSN, type, file:offset, size, checksum, and the entry's event and
    /// balance post-images (or a commit's range, a checkpoint's watermark).
    Dump {
        /// The WAL directory.
        dir: PathBuf,
        /// Only records at or above this LSN.
        #[arg(long)]
        from: Option<Lsn>,
        /// Only records at or below this LSN.
        #[arg(long)]
        to: Option<Lsn>,
        /// Only entries of this trade.
        #[arg(long)]
        trade_id: Option<u64>,
        /// Only entries that touch this user (buyer, seller, or deposit/withdrawal owner).
        #[arg(long)]
        user: Option<u64>,
        /// Only records of this type.
        #[arg(long = "type", value_enum)]
        record_type: Option<TypeFilter>,
    },
    /// Check every checksum and the LSN sequence. Exit 0 clean, 1 torn tail only (repairable),
    /// 2 corruption; every problem is named with file, offset, expected and found values.
    Verify {
        /// The WAL directory.
        dir: PathBuf,
    },
    /// The entries recovery would process: LSN, output sequence, event.
    Pending {
        /// The WAL directory.
        dir: PathBuf,
    },
    /// Recovery dry run against the store: each pending entry's class per row (applied, partial,
    /// missing, superseded, diverged) and the writes recovery would send. Sends no writes.
    Plan {
        /// The WAL directory.
        dir: PathBuf,
        /// embedded:PATH or cql://HOST:PORT[,HOST:PORT]/KEYSPACE (the store settlement uses).
        #[arg(long)]
        store: StoreUrl,
    },
    /// Cut a torn tail, after a backup copy of its segment (DIR/<segment>.bak-<unix time>).
    /// Refuses corruption. Without --truncate-torn-tail it only says what it would do.
    Repair {
        /// The WAL directory.
        dir: PathBuf,
        /// Really do it: back up the segment, then cut the torn tail (zero it and sync).
        #[arg(long)]
        truncate_torn_tail: bool,
    },
}

/// What a command failed with: a one-line message and the exit code.
#[derive(Debug)]
struct CliError {
    code: u8,
    message: String,
    /// stdout was closed under us (`wal-inspect dump | head`): exit quietly.
    broken_pipe: bool,
}

impl CliError {
    /// "Cannot inspect" (exit 2).
    fn cannot(message: impl Into<String>) -> CliError {
        CliError {
            code: EXIT_FAILURE,
            message: message.into(),
            broken_pipe: false,
        }
    }
}

/// Errors writing the output.
impl From<io::Error> for CliError {
    fn from(e: io::Error) -> CliError {
        CliError {
            code: EXIT_FAILURE,
            broken_pipe: e.kind() == io::ErrorKind::BrokenPipe,
            message: format!("writing the output: {e}"),
        }
    }
}

/// Where a command writes: stdout (tables or JSON) and stderr (one-line notes).
struct Ctx<'a> {
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
    json: bool,
}

impl Ctx<'_> {
    /// A one-line note on stderr (`warning: ...`, `error: ...`).
    fn note(&mut self, level: &str, message: &str) {
        let _ = writeln!(self.err, "{level}: {}", one_line(message));
    }

    /// Writes one JSON document on stdout.
    fn json_doc(&mut self, value: &impl serde::Serialize) -> Result<(), CliError> {
        serde_json::to_writer_pretty(&mut *self.out, value).map_err(io::Error::from)?;
        writeln!(self.out)?;
        Ok(())
    }
}

/// Folds a message onto one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Runs one command, writing its output to `out` and notes to `err`, and returns the exit code.
/// Never panics on bad input: every failure is one `error: ...` line on `err`.
pub fn run(cli: Cli, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let mut ctx = Ctx {
        out,
        err,
        json: cli.json,
    };
    let result = match cli.command {
        Command::Summary { dir } => report::summary(&mut ctx, &dir),
        Command::Dump {
            dir,
            from,
            to,
            trade_id,
            user,
            record_type,
        } => report::dump(
            &mut ctx,
            &dir,
            &report::DumpFilter {
                from,
                to,
                trade_id,
                user,
                record_type,
            },
        ),
        Command::Verify { dir } => report::verify(&mut ctx, &dir),
        Command::Pending { dir } => report::pending(&mut ctx, &dir),
        Command::Plan { dir, store } => plan::plan(&mut ctx, &dir, &store),
        Command::Repair {
            dir,
            truncate_torn_tail,
        } => repair::repair(&mut ctx, &dir, truncate_torn_tail),
    };
    let code = match result {
        Ok(code) => code,
        Err(e) if e.broken_pipe => EXIT_OK,
        Err(e) => {
            ctx.note("error", &e.message);
            e.code
        }
    };
    let _ = ctx.out.flush();
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_parses_every_subcommand_and_rejects_bad_stores() {
        let cli = Cli::try_parse_from([
            "wal-inspect",
            "dump",
            "d",
            "--from",
            "3",
            "--type",
            "commit",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Dump {
                from: Some(3),
                record_type: Some(TypeFilter::Commit),
                ..
            }
        ));
        let cli = Cli::try_parse_from(["wal-inspect", "verify", "d", "--json"]).unwrap();
        assert!(cli.json);
        let cli =
            Cli::try_parse_from(["wal-inspect", "plan", "d", "--store", "embedded:/x"]).unwrap();
        assert!(matches!(cli.command, Command::Plan { .. }));
        assert!(Cli::try_parse_from(["wal-inspect", "plan", "d", "--store", "pg://x"]).is_err());
        assert!(Cli::try_parse_from(["wal-inspect", "plan", "d"]).is_err());
    }

    #[test]
    fn messages_fold_onto_one_line() {
        assert_eq!(one_line("a\n  b\n\nc"), "a; b; c");
    }
}
