//! The commands of the `settlement` binary, as library functions (the binary only parses
//! arguments): `run`, `balances`, `audit`, `demo`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::watch;

use crate::ingest::{self, Input};
use crate::ledger::{open_store, Asset, Ledger, StoreUrl};
use crate::observe::{serve_metrics, Health};
use crate::settle::audit::{audit, AuditReport};
use crate::settle::demo::{generate, DemoSpec};
use crate::settle::{
    Message, PipelineSettings, RejectSink, Settlement, SettlementOptions, Summary,
    SOURCE_CHUNK_MESSAGES,
};
use crate::wal::format::DEFAULT_SEGMENT_SIZE_BYTES;

/// Options of `settlement run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Where messages come from.
    pub input: Input,
    /// WAL directory.
    pub wal_dir: PathBuf,
    /// The store.
    pub store: StoreUrl,
    /// Rejects file (JSON lines); `None` discards.
    pub rejects: Option<PathBuf>,
    /// Pipeline settings.
    pub pipeline: PipelineSettings,
    /// WAL segment size.
    pub segment_size_bytes: u64,
    /// Keep diverged entries instead of stopping.
    pub accept_divergence: bool,
    /// Bind a new WAL to a store another WAL wrote (`--new-wal`).
    pub new_wal: bool,
    /// Let this WAL take over a store behind it or bound elsewhere (`--adopt-store`).
    pub adopt_store: bool,
    /// Run recovery and exit.
    pub recover_only: bool,
    /// Serve /metrics and /health here.
    pub metrics_addr: Option<SocketAddr>,
    /// Show a progress bar (file input, stderr a terminal).
    pub progress: bool,
}

impl RunOptions {
    /// Defaults of the interface contract for `input`.
    pub fn new(input: Input) -> RunOptions {
        RunOptions {
            input,
            wal_dir: PathBuf::from("./data/wal"),
            store: StoreUrl::default(),
            rejects: Some(PathBuf::from("./data/rejects.jsonl")),
            pipeline: PipelineSettings::default(),
            segment_size_bytes: DEFAULT_SEGMENT_SIZE_BYTES,
            accept_divergence: false,
            new_wal: false,
            adopt_store: false,
            recover_only: false,
            metrics_addr: None,
            progress: true,
        }
    }
}

/// A shutdown signal that turns true on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> anyhow::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(false);
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT: draining"),
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// `settlement run`: recovery, then the pipeline until end of input or a signal. Returns the
/// summary (already printed as one line on stdout).
pub async fn run(options: RunOptions, shutdown: watch::Receiver<bool>) -> anyhow::Result<Summary> {
    let health = Health::new();
    if let Some(addr) = options.metrics_addr {
        serve_metrics(addr, health.clone())
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    let ledger: Arc<dyn Ledger> = Arc::from(open_store(&options.store).await?);
    let settlement = Settlement::open(
        ledger.clone(),
        &SettlementOptions {
            wal_dir: options.wal_dir.clone(),
            segment_size_bytes: options.segment_size_bytes,
            accept_divergence: options.accept_divergence,
            new_wal: options.new_wal,
            adopt_store: options.adopt_store,
        },
    )
    .await
    .inspect_err(|_| health.set_unhealthy())?;
    health.set_open_holes(settlement.sequences().hole_count() as u64);
    let mut pipeline_settings = options.pipeline.clone();
    pipeline_settings.open_holes = Some(health.open_holes_counter());
    let r = settlement.recovery();
    if r.pending > 0 {
        eprintln!(
            "recovery: {} pending entries: {} applied, {} partial, {} missing, {} diverged; {} rows re-sent, {} superseded ({} ms)",
            r.pending, r.applied, r.partial, r.missing, r.diverged, r.resent_rows, r.superseded_rows, r.duration_ms
        );
    }
    if options.recover_only {
        println!(
            "recovered: pending={} resent_rows={}",
            r.pending, r.resent_rows
        );
        return Ok(Summary::default());
    }
    let rejects = match &options.rejects {
        Some(path) => RejectSink::open(path)
            .with_context(|| format!("opening rejects file {}", path.display()))?,
        None => RejectSink::discard(),
    };
    let progress = ingest::Progress::default();
    let source = ingest::start(&options.input, shutdown.clone(), progress.clone())
        .await
        .map_err(anyhow::Error::msg)?;
    let bar = progress_bar(&options, progress);
    let result = settlement
        .run(source, shutdown, pipeline_settings, rejects)
        .await;
    if let Some((bar, task)) = bar {
        task.abort();
        bar.finish_and_clear();
    }
    match result {
        Ok(summary) => {
            println!("{summary}");
            Ok(summary)
        }
        Err(e) => {
            health.set_unhealthy();
            Err(e.into())
        }
    }
}

fn progress_bar(
    options: &RunOptions,
    progress: ingest::Progress,
) -> Option<(indicatif::ProgressBar, tokio::task::JoinHandle<()>)> {
    let Input::File(path) = &options.input else {
        return None;
    };
    if !options.progress || !std::io::stderr().is_terminal() {
        return None;
    }
    let len = std::fs::metadata(path).ok()?.len();
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .ok()?,
    );
    let b = bar.clone();
    let task = tokio::spawn(async move {
        loop {
            b.set_position(progress.load(std::sync::atomic::Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Some((bar, task))
}

/// One balance row as `balances --json` prints it.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct BalanceJson {
    /// User.
    pub user_id: u64,
    /// Asset.
    pub asset: Asset,
    /// Amount in minor units.
    pub amount: i64,
    /// LSN of the entry that wrote it.
    pub last_lsn: u64,
}

/// `settlement balances`: every balance row, sorted by user and asset.
pub async fn balances(store: &StoreUrl) -> anyhow::Result<Vec<BalanceJson>> {
    let ledger = open_store(store).await?;
    let mut rows: Vec<BalanceJson> = ledger
        .scan_balances()
        .await?
        .into_iter()
        .map(|(k, r)| BalanceJson {
            user_id: k.user_id,
            asset: k.asset,
            amount: r.amount,
            last_lsn: r.last_lsn,
        })
        .collect();
    rows.sort_by(|a, b| (a.user_id, &a.asset).cmp(&(b.user_id, &b.asset)));
    Ok(rows)
}

/// The open holes of a store, as `settlement holes` prints them.
#[derive(Debug, serde::Serialize)]
pub struct HolesReport {
    /// The open holes, in sequence order.
    pub holes: Vec<crate::ledger::HoleRow>,
    /// Sequences missing in all.
    pub missing: u64,
    /// The highest sequence accounted for.
    pub high_sequence: Option<u64>,
}

/// `settlement holes`: the open holes (sequences never seen, waiting for a backfill).
pub async fn holes(store: &StoreUrl) -> anyhow::Result<HolesReport> {
    let ledger = crate::ledger::open_store_read_only(store).await?;
    let holes = ledger.open_holes().await?;
    let missing = holes
        .iter()
        .map(|h| h.last_sequence - h.first_sequence + 1)
        .sum();
    let high_sequence = ledger.high_water().await?.map(|h| h.high_sequence);
    Ok(HolesReport {
        holes,
        missing,
        high_sequence,
    })
}

/// `settlement audit`.
pub async fn audit_store(store: &StoreUrl) -> anyhow::Result<AuditReport> {
    let ledger = open_store(store).await?;
    Ok(audit(&*ledger).await?)
}

/// `settlement demo`: seeded synthetic input through the whole pipeline on a fresh embedded
/// store under `dir`; prints a summary table and the audit. Errors when the audit fails.
pub async fn demo(dir: &std::path::Path, spec: DemoSpec) -> anyhow::Result<AuditReport> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("clearing the demo directory {}", dir.display()))?;
    }
    let lines = generate(&spec);
    let input = dir.join("input.jsonl");
    std::fs::create_dir_all(dir)?;
    std::fs::write(&input, lines.join("\n") + "\n")?;
    let store = StoreUrl::Embedded(dir.join("ledger.redb"));
    let mut options = RunOptions::new(Input::File(input.clone()));
    options.wal_dir = dir.join("wal");
    options.store = store.clone();
    options.rejects = Some(dir.join("rejects.jsonl"));
    options.progress = false;
    eprintln!(
        "demo: {} messages ({} users, {} trades, seed {}) -> WAL {} -> store {}",
        lines.len(),
        spec.users,
        spec.trades,
        spec.seed,
        options.wal_dir.display(),
        store
    );
    let (_tx, shutdown) = watch::channel(false);
    let started = Instant::now();
    let summary = run(options, shutdown).await?;
    let secs = started.elapsed().as_secs_f64();
    let report = audit_store(&store).await?;
    println!();
    println!("| metric | value |");
    println!("|---|---|");
    println!("| messages | {} |", summary.events);
    println!("| settled | {} |", summary.settled);
    println!(
        "| rejected (see {}) | {} |",
        dir.join("rejects.jsonl").display(),
        summary.rejected
    );
    println!("| duplicates | {} |", summary.duplicates);
    println!(
        "| micro-batches (one WAL sync each) | {} |",
        summary.batches
    );
    println!("| wall time | {secs:.2} s |");
    println!(
        "| throughput | {:.0} events/s |",
        summary.events as f64 / secs.max(1e-9)
    );
    println!();
    println!("{report}");
    if !report.passed() {
        bail!("the demo's audit failed");
    }
    Ok(report)
}

/// Feeds prepared messages into a pipeline (tests and benches): returns the queue receiver.
pub fn messages_source(lines: Vec<String>) -> tokio::sync::mpsc::Receiver<Vec<Message>> {
    let (tx, rx) = ingest::source_channel();
    tokio::spawn(async move {
        let mut lines = lines.into_iter().peekable();
        while lines.peek().is_some() {
            let chunk: Vec<Message> = lines
                .by_ref()
                .take(SOURCE_CHUNK_MESSAGES)
                .map(|l| Message {
                    bytes: l.into_bytes(),
                })
                .collect();
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    rx
}
