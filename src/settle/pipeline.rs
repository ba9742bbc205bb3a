//! The settlement pipeline: validate and dedup messages, compute post-images, make each
//! micro-batch durable in the WAL with one sync (P1), send it to the store as UNLOGGED batches
//! with several in flight, write commit markers after acknowledgement (P2), checkpoint.
//!
//! ```text
//! source --(bounded queue)--> settle loop --(bounded: inflight)--> applier --> markers/checkpoint
//!                              parse, dedup, cache,                ledger.apply (x inflight)
//!                              WAL append + 1 sync
//! ```

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::entry::{BalanceCache, SettlementEntry};
use super::event::{parse_event, Event, Rejection};
use super::SettleError;
use crate::ledger::{Amount, BalanceKey, BalanceWrite, EntryWrites, Ledger};
use crate::wal::{Lsn, Wal};

/// Largest `--batch-max`.
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// Largest `--inflight`.
pub const MAX_INFLIGHT_BATCHES: usize = 256;

/// What to do when an output sequence is skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GapPolicy {
    /// Log and count it, carry on.
    #[default]
    Log,
    /// Stop the process (after settling what came before).
    Halt,
}

/// Pipeline settings (limits are clamped to their maxima).
#[derive(Clone, Debug)]
pub struct PipelineSettings {
    /// Flush a micro-batch at this many events.
    pub batch_max: usize,
    /// ... or when its first event has waited this long.
    pub batch_delay_ms: u64,
    /// Store batches in flight at once.
    pub inflight: usize,
    /// Gap handling.
    pub on_gap: GapPolicy,
    /// Run a WAL checkpoint after this many acknowledged batches.
    pub checkpoint_every_batches: usize,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        PipelineSettings {
            batch_max: 1000,
            batch_delay_ms: 2,
            inflight: 8,
            on_gap: GapPolicy::Log,
            checkpoint_every_batches: 32,
        }
    }
}

/// One raw message from a source.
#[derive(Clone, Debug)]
pub struct Message {
    /// The bytes (one JSON object).
    pub bytes: Vec<u8>,
}

/// Counters of a run, printed as the one-line summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Messages received.
    pub events: u64,
    /// Events settled (durable in the WAL and acknowledged by the store).
    pub settled: u64,
    /// Messages skipped as duplicates (output sequence at or below the last durable one).
    pub duplicates: u64,
    /// Messages rejected (invalid, or refused: a withdrawal above the balance).
    pub rejected: u64,
    /// Gaps seen in the output sequence.
    pub gaps: u64,
    /// Micro-batches written.
    pub batches: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "events={} settled={} duplicates={} rejected={} gaps={}",
            self.events, self.settled, self.duplicates, self.rejected, self.gaps
        )
    }
}

/// Where rejected messages go: JSON lines `{"reason", "output_sequence", "message"}`.
pub struct RejectSink {
    out: Option<std::io::BufWriter<std::fs::File>>,
    path: Option<PathBuf>,
}

impl RejectSink {
    /// Appends to `path` (created when missing).
    pub fn open(path: &std::path::Path) -> std::io::Result<RejectSink> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(RejectSink {
            out: Some(std::io::BufWriter::new(file)),
            path: Some(path.to_path_buf()),
        })
    }

    /// Discards rejects (they are still counted and logged).
    pub fn discard() -> RejectSink {
        RejectSink {
            out: None,
            path: None,
        }
    }

    fn write(&mut self, message: &[u8], rejection: &Rejection) -> Result<(), SettleError> {
        tracing::debug!(%rejection, "rejected message");
        let Some(out) = &mut self.out else {
            return Ok(());
        };
        #[derive(Serialize)]
        struct Line<'a> {
            reason: &'a str,
            output_sequence: Option<u64>,
            message: &'a str,
        }
        let text = String::from_utf8_lossy(message);
        let line = serde_json::to_string(&Line {
            reason: &rejection.reason,
            output_sequence: rejection.output_sequence,
            message: &text,
        })
        .expect("a reject line serializes");
        writeln!(out, "{line}").map_err(|e| self.io_error(e))
    }

    fn flush(&mut self) -> Result<(), SettleError> {
        match &mut self.out {
            Some(out) => out.flush().map_err(|e| self.io_error(e)),
            None => Ok(()),
        }
    }

    /// Makes every reject written so far durable. Called before the WAL sync of a batch that
    /// rejected something: once an entry after them is durable, a restart skips those messages
    /// as duplicates, so their reject lines must already be on disk (P6).
    fn sync(&mut self) -> Result<(), SettleError> {
        self.flush()?;
        match &self.out {
            Some(out) => out.get_ref().sync_data().map_err(|e| self.io_error(e)),
            None => Ok(()),
        }
    }

    fn io_error(&self, e: std::io::Error) -> SettleError {
        SettleError::Io(format!(
            "writing rejects file {}: {e}",
            self.path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ))
    }
}

/// A durable micro-batch on its way to the store.
struct DurableBatch {
    first_lsn: Lsn,
    last_lsn: Lsn,
    writes: Vec<EntryWrites>,
    events: u64,
    started: Instant,
}

/// Per-row coalescing: every entry keeps its event row; of the balance rows touched several
/// times in the batch only the newest post-image is written, with the newest entry's LSN.
fn coalesce(entries: &[(Lsn, SettlementEntry)]) -> Vec<EntryWrites> {
    let mut rows: HashMap<BalanceKey, (Amount, Lsn)> = HashMap::new();
    let mut writes = Vec::with_capacity(entries.len() + 1);
    for (lsn, entry) in entries {
        writes.push(EntryWrites {
            lsn: *lsn,
            event: Some(entry.event_row(*lsn)),
            balances: Vec::new(),
        });
        for (key, amount) in &entry.post_images {
            rows.insert(key.clone(), (*amount, *lsn));
        }
    }
    if let Some((last, _)) = entries.last() {
        let mut balances: Vec<BalanceWrite> = rows
            .into_iter()
            .map(|(key, (amount, lsn))| BalanceWrite { key, amount, lsn })
            .collect();
        balances.sort_by(|a, b| a.key.cmp(&b.key));
        writes.push(EntryWrites {
            lsn: *last,
            event: None,
            balances,
        });
    }
    writes
}

/// The single writer: owns the balance cache and the dedup state.
pub struct Pipeline {
    wal: Arc<Wal>,
    ledger: Arc<dyn Ledger>,
    cache: BalanceCache,
    /// Highest output sequence seen (durable or rejected with a readable sequence).
    last_seq: Option<u64>,
    settings: PipelineSettings,
    rejects: RejectSink,
    /// `summary.rejected` when the rejects file was last synced.
    rejects_synced: u64,
    summary: Summary,
}

impl Pipeline {
    /// A pipeline continuing after `last_seq` (the last durable output sequence, from recovery).
    pub fn new(
        wal: Arc<Wal>,
        ledger: Arc<dyn Ledger>,
        last_seq: Option<u64>,
        mut settings: PipelineSettings,
        rejects: RejectSink,
    ) -> Pipeline {
        settings.batch_max = settings.batch_max.clamp(1, MAX_BATCH_EVENTS);
        settings.inflight = settings.inflight.clamp(1, MAX_INFLIGHT_BATCHES);
        settings.checkpoint_every_batches = settings.checkpoint_every_batches.max(1);
        Pipeline {
            wal,
            ledger,
            cache: BalanceCache::default(),
            last_seq,
            settings,
            rejects,
            rejects_synced: 0,
            summary: Summary::default(),
        }
    }

    /// Runs until the source closes (end of input) or `shutdown` turns true, then drains: every
    /// durable batch is applied and committed before it returns.
    pub async fn run(
        mut self,
        mut source: mpsc::Receiver<Message>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Summary, SettleError> {
        let (batch_tx, batch_rx) = mpsc::channel::<DurableBatch>(self.settings.inflight);
        let applier = tokio::spawn(apply_loop(
            self.wal.clone(),
            self.ledger.clone(),
            batch_rx,
            self.settings.inflight,
            self.settings.checkpoint_every_batches,
        ));
        let delay = Duration::from_millis(self.settings.batch_delay_ms);
        let mut halted: Option<SettleError> = None;
        let mut open = true;
        while open && halted.is_none() && !*shutdown.borrow() {
            let first = tokio::select! {
                m = source.recv() => m,
                _ = shutdown.changed() => None,
            };
            let Some(first) = first else { break };
            let mut raw = vec![first];
            let deadline = tokio::time::Instant::now() + delay;
            while raw.len() < self.settings.batch_max {
                match tokio::time::timeout_at(deadline, source.recv()).await {
                    Ok(Some(m)) => raw.push(m),
                    Ok(None) => {
                        open = false;
                        break;
                    }
                    Err(_) => break,
                }
            }
            match self.settle_batch(raw).await {
                Ok(Some(batch)) => {
                    if batch_tx.send(batch).await.is_err() {
                        break; // the applier stopped: its error is reported below
                    }
                }
                Ok(None) => {}
                Err(e) => halted = Some(e),
            }
        }
        drop(batch_tx);
        let applied = applier
            .await
            .map_err(|e| SettleError::Internal(format!("applier task failed: {e}")))?;
        self.rejects.flush()?;
        let settled = applied?;
        self.summary.settled = settled;
        if let Some(e) = halted {
            return Err(e);
        }
        // Markers written by the applier ride on this final sync.
        let wal = self.wal.clone();
        tokio::task::block_in_place(|| wal.sync())?;
        Ok(self.summary)
    }

    /// Validates, dedups and settles one micro-batch and makes it durable. `None` when nothing
    /// in it needs the store.
    async fn settle_batch(
        &mut self,
        raw: Vec<Message>,
    ) -> Result<Option<DurableBatch>, SettleError> {
        let started = Instant::now();
        self.summary.events += raw.len() as u64;
        metrics::counter!("settlement_events_total").increment(raw.len() as u64);
        let mut events: Vec<(Event, Vec<u8>)> = Vec::with_capacity(raw.len());
        for m in raw {
            match parse_event(&m.bytes) {
                Err(rejection) => {
                    if let Some(seq) = rejection.output_sequence {
                        if self.last_seq.is_some_and(|last| seq <= last) {
                            self.duplicate();
                            continue;
                        }
                        self.check_gap(seq)?;
                        self.last_seq = Some(seq);
                    }
                    self.reject(&m.bytes, &rejection)?;
                }
                Ok(event) => {
                    let seq = event.output_sequence();
                    if self.last_seq.is_some_and(|last| seq <= last) {
                        self.duplicate();
                        continue;
                    }
                    self.check_gap(seq)?;
                    self.last_seq = Some(seq);
                    events.push((event, m.bytes));
                }
            }
        }
        if events.is_empty() {
            return Ok(None);
        }
        // Load the rows this batch touches that the cache has not seen.
        let mut missing = Vec::new();
        for (e, _) in &events {
            self.cache.missing(e, &mut missing);
        }
        if !missing.is_empty() {
            let rows = self.ledger.read_balances(&missing).await?;
            for (key, row) in missing.into_iter().zip(rows) {
                self.cache.load(key, row.map_or(0, |r| r.amount));
            }
        }
        let mut settled: Vec<SettlementEntry> = Vec::with_capacity(events.len());
        for (event, bytes) in events {
            let seq = event.output_sequence();
            match self.cache.settle(event) {
                Ok(entry) => settled.push(entry),
                Err(reason) => {
                    let rejection = Rejection {
                        output_sequence: Some(seq),
                        reason,
                    };
                    self.reject(&bytes, &rejection)?;
                }
            }
        }
        if settled.is_empty() {
            return Ok(None);
        }
        if self.summary.rejected > self.rejects_synced {
            self.rejects.sync()?;
            self.rejects_synced = self.summary.rejected;
        }
        let payloads: Vec<Vec<u8>> = settled.iter().map(SettlementEntry::encode).collect();
        let wal = self.wal.clone();
        let sync_started = Instant::now();
        let (first_lsn, last_lsn) = tokio::task::block_in_place(|| {
            let range = wal.append_batch(&payloads)?;
            wal.sync()?; // P1: durable before any statement reaches the store
            Ok::<_, crate::wal::WalError>(range)
        })?;
        metrics::histogram!("settlement_wal_sync_seconds")
            .record(sync_started.elapsed().as_secs_f64());
        let entries: Vec<(Lsn, SettlementEntry)> = (first_lsn..=last_lsn).zip(settled).collect();
        self.summary.batches += 1;
        Ok(Some(DurableBatch {
            first_lsn,
            last_lsn,
            writes: coalesce(&entries),
            events: entries.len() as u64,
            started,
        }))
    }

    fn duplicate(&mut self) {
        self.summary.duplicates += 1;
        metrics::counter!("settlement_duplicates_total").increment(1);
    }

    fn reject(&mut self, bytes: &[u8], rejection: &Rejection) -> Result<(), SettleError> {
        self.summary.rejected += 1;
        metrics::counter!("settlement_rejected_total").increment(1);
        self.rejects.write(bytes, rejection)
    }

    fn check_gap(&mut self, seq: u64) -> Result<(), SettleError> {
        let Some(last) = self.last_seq else {
            return Ok(());
        };
        if seq > last + 1 {
            self.summary.gaps += 1;
            metrics::counter!("settlement_gaps_total").increment(1);
            tracing::warn!(
                expected = last + 1,
                got = seq,
                missing = seq - last - 1,
                "gap in output_sequence"
            );
            if self.settings.on_gap == GapPolicy::Halt {
                return Err(SettleError::Gap {
                    expected: last + 1,
                    got: seq,
                });
            }
        }
        Ok(())
    }
}

/// An applied batch: `(first LSN, last LSN, events, started)`, or why it failed.
type BatchOutcome = Result<(Lsn, Lsn, u64, Instant), SettleError>;

/// Applies durable batches with up to `inflight` in flight; writes a commit marker for each
/// acknowledged batch (P2) and checkpoints every `checkpoint_every` batches. Returns the number
/// of events settled.
async fn apply_loop(
    wal: Arc<Wal>,
    ledger: Arc<dyn Ledger>,
    mut batches: mpsc::Receiver<DurableBatch>,
    inflight: usize,
    checkpoint_every: usize,
) -> Result<u64, SettleError> {
    let mut running: JoinSet<BatchOutcome> = JoinSet::new();
    let mut settled = 0u64;
    let mut acked_batches = 0usize;
    let mut failure: Option<SettleError> = None;
    let mut open = true;
    loop {
        if failure.is_none() && open && running.len() < inflight {
            tokio::select! {
                b = batches.recv() => match b {
                    Some(b) => {
                        let ledger = ledger.clone();
                        running.spawn(async move {
                            ledger.apply(&b.writes).await.map_err(|e| SettleError::Store {
                                first_lsn: b.first_lsn,
                                last_lsn: b.last_lsn,
                                source: e,
                            })?;
                            Ok((b.first_lsn, b.last_lsn, b.events, b.started))
                        });
                        continue;
                    }
                    None => open = false,
                },
                Some(done) = running.join_next(), if !running.is_empty() => {
                    on_done(&wal, done, &mut settled, &mut acked_batches, checkpoint_every, &mut failure)?;
                    continue;
                }
            }
        }
        match running.join_next().await {
            Some(done) => on_done(
                &wal,
                done,
                &mut settled,
                &mut acked_batches,
                checkpoint_every,
                &mut failure,
            )?,
            None if !open || failure.is_some() => break,
            None => {}
        }
    }
    match failure {
        Some(e) => Err(e),
        None => {
            tokio::task::block_in_place(|| wal.checkpoint())?;
            Ok(settled)
        }
    }
}

fn on_done(
    wal: &Wal,
    done: Result<BatchOutcome, tokio::task::JoinError>,
    settled: &mut u64,
    acked_batches: &mut usize,
    checkpoint_every: usize,
    failure: &mut Option<SettleError>,
) -> Result<(), SettleError> {
    match done {
        Ok(Ok((first, last, events, started))) => {
            // P2: the marker only after the store acknowledged every write of the batch.
            wal.commit_range(first, last)?;
            *settled += events;
            *acked_batches += 1;
            metrics::counter!("settlement_settled_total").increment(events);
            metrics::histogram!("settlement_batch_seconds").record(started.elapsed().as_secs_f64());
            if *acked_batches % checkpoint_every == 0 {
                tokio::task::block_in_place(|| wal.checkpoint())?;
            }
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "store write failed; stopping intake, the batch stays pending in the WAL");
            failure.get_or_insert(e);
        }
        Err(e) => {
            failure.get_or_insert(SettleError::Internal(format!("apply task failed: {e}")));
        }
    }
    Ok(())
}
