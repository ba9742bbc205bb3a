//! `settlement`: the long-running settlement process (a thin wrapper over the library).

/// mimalloc: the pipeline allocates on one thread and frees on another (parser, settle loop,
/// syncer, applier); glibc's arenas spend a fifth of the CPU on that (perf, instant-ack bench).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use settlement_wal::app::{self, RunOptions};
use settlement_wal::ingest::Input;
use settlement_wal::ledger::StoreUrl;
use settlement_wal::observe::{init_logging, LogFormat};
use settlement_wal::settle::demo::DemoSpec;
use settlement_wal::settle::pipeline::{MAX_BATCH_EVENTS, MAX_INFLIGHT_BATCHES};
use settlement_wal::settle::{GapPolicy, PipelineSettings};
use settlement_wal::wal::format::MAX_SEGMENT_SIZE_BYTES;

/// A flag's parser accepting 1 to `max`: a value outside is an error naming the flag and the
/// range, not a silent clamp.
fn in_range(max: usize) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..=max as u64)
}

#[derive(Parser)]
#[command(
    version,
    about = "Settles matched trades into ScyllaDB/Cassandra through a write-ahead log: never lost, never applied twice."
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, global = true, default_value = "human")]
    log_format: LogFormatArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Human,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnGap {
    /// Record the gap as an open hole, count it, carry on.
    Log,
    /// Settle and sync everything before the gap, then stop naming the first missing sequence.
    Halt,
}

#[derive(Subcommand)]
enum Command {
    /// Recover, then settle messages until end of input (file, -) or SIGINT/SIGTERM.
    Run {
        /// FILE (JSON lines), - for stdin, or zmq+tcp://HOST:PORT.
        #[arg(long)]
        input: Input,
        /// WAL directory.
        #[arg(long, default_value = "./data/wal")]
        wal_dir: PathBuf,
        /// embedded:PATH or cql://HOST:PORT[,HOST:PORT]/KEYSPACE[?consistency=one&dc=NAME].
        #[arg(long, default_value = "embedded:./data/ledger.redb")]
        store: StoreUrl,
        /// Rejected messages with their reasons (JSON lines).
        #[arg(long, default_value = "./data/rejects.jsonl")]
        rejects: PathBuf,
        /// Flush a micro-batch at this many events (1..=10000) [default: 1000 with the
        /// embedded store, 100 with a CQL store (docs/cql.md, "Tuning")].
        #[arg(long, value_parser = in_range(MAX_BATCH_EVENTS))]
        batch_max: Option<usize>,
        /// ... or when its first event has waited this long.
        #[arg(long, default_value_t = 2)]
        batch_delay_ms: u64,
        /// Store applies in flight (1..=256); micro-batches waiting for a free slot go out
        /// together, as one apply of up to --batch-max events.
        #[arg(long, default_value_t = 8, value_parser = in_range(MAX_INFLIGHT_BATCHES))]
        inflight: usize,
        /// Bound of the balance cache in rows (about 64 bytes each); past it, rows whose last
        /// change the store acknowledged are forgotten and reloaded when needed.
        #[arg(long, default_value_t = settlement_wal::settle::entry::DEFAULT_CACHE_ROWS)]
        cache_rows: usize,
        /// What to do on a gap in output_sequence.
        #[arg(long, value_enum, default_value = "log")]
        on_gap: OnGap,
        /// Keep diverged entries as the store has them (nothing of them is re-sent) instead of
        /// stopping at recovery.
        #[arg(long)]
        accept_divergence: bool,
        /// A sequence more than this far past the highest one is refused as wild instead of
        /// being taken as progress (1..=2^40).
        #[arg(long, default_value_t = settlement_wal::settle::sequence::DEFAULT_MAX_SEQUENCE_JUMP,
              value_parser = clap::value_parser!(u64).range(1..=settlement_wal::settle::sequence::MAX_SEQUENCE_JUMP_LIMIT))]
        max_seq_jump: u64,
        /// Bind a new, empty WAL directory to a store another WAL wrote (that WAL is lost):
        /// LSNs start above the store's high-water; the lost WAL's pending entries are given up.
        #[arg(long, conflicts_with = "adopt_store")]
        new_wal: bool,
        /// Let this WAL take over a store that is behind it or bound to another WAL (a store
        /// restored from a backup); then replay the engine's journal to fill what it lacks.
        #[arg(long)]
        adopt_store: bool,
        /// Run recovery and exit.
        #[arg(long)]
        recover_only: bool,
        /// Serve Prometheus /metrics and /health on this address (e.g. 127.0.0.1:9184).
        #[arg(long)]
        metrics_addr: Option<SocketAddr>,
        /// WAL segment size in MiB (1..=1024).
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=MAX_SEGMENT_SIZE_BYTES >> 20))]
        segment_mib: u64,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// List the open holes: sequences never seen, waiting for a backfill.
    Holes {
        /// The store.
        #[arg(long, default_value = "embedded:./data/ledger.redb")]
        store: StoreUrl,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Print every balance row.
    Balances {
        /// The store.
        #[arg(long, default_value = "embedded:./data/ledger.redb")]
        store: StoreUrl,
        /// JSON array output.
        #[arg(long)]
        json: bool,
    },
    /// Prove conservation (P7) and that every balance matches its trades; exit 1 when not.
    Audit {
        /// The store.
        #[arg(long, default_value = "embedded:./data/ledger.redb")]
        store: StoreUrl,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Settle seeded synthetic trades on a fresh embedded store and audit the result.
    Demo {
        /// Working directory (cleared first).
        #[arg(long, default_value = "./data/demo")]
        dir: PathBuf,
        /// Number of trades.
        #[arg(long, default_value_t = 20_000)]
        trades: u64,
        /// Number of users.
        #[arg(long, default_value_t = 100)]
        users: u64,
        /// PRNG seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(match cli.log_format {
        LogFormatArg::Human => LogFormat::Human,
        LogFormatArg::Json => LogFormat::Json,
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match runtime.block_on(execute(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // A blocking stdin read can outlive the work (the writer keeps the pipe open after SIGTERM):
    // do not wait for it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}

async fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run {
            input,
            wal_dir,
            store,
            rejects,
            batch_max,
            batch_delay_ms,
            inflight,
            cache_rows,
            on_gap,
            accept_divergence,
            max_seq_jump,
            new_wal,
            adopt_store,
            recover_only,
            metrics_addr,
            segment_mib,
            no_progress,
        } => {
            let mut options = RunOptions::new(input);
            options.wal_dir = wal_dir;
            options.store = store;
            options.rejects = Some(rejects);
            let defaults = PipelineSettings::for_store(&options.store);
            options.pipeline = PipelineSettings {
                batch_max: batch_max.unwrap_or(defaults.batch_max),
                batch_delay_ms,
                inflight,
                cache_rows,
                on_gap: match on_gap {
                    OnGap::Log => GapPolicy::Log,
                    OnGap::Halt => GapPolicy::Halt,
                },
                max_seq_jump,
                ..defaults
            };
            options.new_wal = new_wal;
            options.adopt_store = adopt_store;
            options.segment_size_bytes = segment_mib << 20;
            options.accept_divergence = accept_divergence;
            options.recover_only = recover_only;
            options.metrics_addr = metrics_addr;
            options.progress = !no_progress;
            let shutdown = app::shutdown_on_signals()?;
            app::run(options, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Holes { store, json } => {
            let holes = app::holes(&store).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&holes)?);
            } else {
                println!(
                    "{} open hole(s), {} sequence(s) missing",
                    holes.holes.len(),
                    holes.missing
                );
                for h in &holes.holes {
                    println!(
                        "  {}..={} ({} missing, recorded at LSN {})",
                        h.first_sequence,
                        h.last_sequence,
                        h.last_sequence - h.first_sequence + 1,
                        h.lsn
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Balances { store, json } => {
            let rows = app::balances(&store).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:>10} {:<8} {:>20} {:>12}",
                    "user_id", "asset", "amount", "last_lsn"
                );
                for r in rows {
                    println!(
                        "{:>10} {:<8} {:>20} {:>12}",
                        r.user_id, r.asset, r.amount, r.last_lsn
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { store, json } => {
            let report = app::audit_store(&store).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Demo {
            dir,
            trades,
            users,
            seed,
        } => {
            app::demo(
                &dir,
                DemoSpec {
                    seed,
                    users: users.max(2),
                    trades,
                    ..DemoSpec::default()
                },
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
