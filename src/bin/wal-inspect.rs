//! `wal-inspect`: the on-call engineer's view of a settlement WAL (a thin wrapper over
//! `settlement_wal::inspect_cli`). See `docs/debugging-a-recovery.md`.

use std::process::ExitCode;

use clap::Parser;
use settlement_wal::inspect_cli::{run, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let code = run(cli, &mut out, &mut std::io::stderr());
    ExitCode::from(code)
}
