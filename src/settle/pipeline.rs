//! The settlement pipeline: validate and dedup messages, compute post-images, make each
//! micro-batch durable in the WAL with one sync (P1), send it to the store as UNLOGGED batches
//! with several in flight, write commit markers after acknowledgement (P2), checkpoint.
//!
//! ```text
//! source -(queue)-> parser -(queue)-> settle loop -(queue)-> syncer -(queue: inflight)-> applier
//!                   parse and         dedup, cache,           1 WAL sync per batch      coalesce rows,
//!                   validate          encode, WAL append                                ledger.apply
//!                                                                                       (x inflight),
//!                                                                                       markers,
//!                                                                                       checkpoints
//! ```
//!
//! Every queue is bounded, so a slow stage slows the ones before it. The stages overlap: while
//! the syncer waits for the disk to make batch N durable, the settle loop computes batch N+1 and
//! the parser reads ahead; no batch reaches the applier before its sync returned (P1).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::control::{ControlEntry, HighWater};
use super::entry::{into_event_row, BalanceCache, Settled, SettlementEntry, DEFAULT_CACHE_ROWS};
use super::event::{parse_event, Event, Rejection};
use super::sequence::{HoleChanges, Placement, SequenceState, DEFAULT_MAX_SEQUENCE_JUMP};
use super::trade_ids::TradeIds;
use super::SettleError;
use crate::ledger::{BalanceWrite, EntryWrites, Ledger, StoreUrl};
use crate::wal::{Lsn, Wal};

/// Largest `--batch-max`.
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// Default `--batch-max` with the embedded store, which is fastest with large batches.
pub const DEFAULT_BATCH_MAX: usize = 1000;
/// Default `--batch-max` with a CQL store. Measured on one Cassandra node (docs/cql.md,
/// "Tuning"): 100, 500 and 1000 gave the same trades/s within the node's drift, while the p99 of
/// a micro-batch at saturation was 339, 800 and 2,068 ms: waiting micro-batches are merged into
/// one apply of up to `batch_max` events, and the node's latency grows with what an apply carries.
pub const DEFAULT_CQL_BATCH_MAX: usize = 100;
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
    /// Store applies in flight at once. Micro-batches that wait for a free slot are merged
    /// into one apply of up to `batch_max` events when it frees.
    pub inflight: usize,
    /// Gap handling.
    pub on_gap: GapPolicy,
    /// Run a WAL checkpoint after this many acknowledged batches.
    pub checkpoint_every_batches: usize,
    /// Bound of the balance cache, in rows (raised to `4 * batch_max`: every row a micro-batch
    /// touches is cached while it is settled; see [`BalanceCache`]).
    pub cache_rows: usize,
    /// A sequence more than this far past the highest one is refused as wild, not taken as
    /// progress ([`SequenceState`]).
    pub max_seq_jump: u64,
    /// Kept equal to the number of open holes (for `/health`), when set.
    pub open_holes: Option<Arc<AtomicU64>>,
}

impl PipelineSettings {
    /// The defaults for `store`: [`PipelineSettings::default`], with `batch_max`
    /// [`DEFAULT_CQL_BATCH_MAX`] for a CQL store.
    pub fn for_store(store: &StoreUrl) -> PipelineSettings {
        let batch_max = match store {
            StoreUrl::Embedded(_) => DEFAULT_BATCH_MAX,
            StoreUrl::Cql(_) => DEFAULT_CQL_BATCH_MAX,
        };
        PipelineSettings {
            batch_max,
            ..PipelineSettings::default()
        }
    }
}

impl Default for PipelineSettings {
    /// The defaults for the embedded store (see [`PipelineSettings::for_store`]).
    fn default() -> Self {
        PipelineSettings {
            batch_max: DEFAULT_BATCH_MAX,
            batch_delay_ms: 2,
            inflight: 8,
            on_gap: GapPolicy::Log,
            checkpoint_every_batches: 32,
            cache_rows: DEFAULT_CACHE_ROWS,
            max_seq_jump: DEFAULT_MAX_SEQUENCE_JUMP,
            open_holes: None,
        }
    }
}

/// One raw message from a source.
#[derive(Clone, Debug)]
pub struct Message {
    /// The bytes (one JSON object).
    pub bytes: Vec<u8>,
}

/// Most messages a source hands over in one chunk. Sources send `Vec<Message>` chunks of 1 to
/// this many (what they have ready), so the queue costs one channel operation per chunk, not
/// per message (~120 ns a message on this machine class, a tenth of the pipeline's budget).
pub const SOURCE_CHUNK_MESSAGES: usize = 256;

/// Counters of a run, printed as the one-line summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Messages received.
    pub events: u64,
    /// Events settled (durable in the WAL and acknowledged by the store).
    pub settled: u64,
    /// Messages skipped as duplicates (a sequence already settled or rejected).
    pub duplicates: u64,
    /// Messages rejected (invalid, or refused: a withdrawal above the balance).
    pub rejected: u64,
    /// Gaps seen in the output sequence, above the highest or below the first (each opened a
    /// hole).
    pub gaps: u64,
    /// Messages that filled (part of) an open hole.
    pub filled: u64,
    /// Micro-batches written.
    pub batches: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "events={} settled={} duplicates={} rejected={} gaps={} filled={}",
            self.events, self.settled, self.duplicates, self.rejected, self.gaps, self.filled
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
    /// Write batch number (1, 2, ...: the order the settle loop produced them).
    batch: u64,
    first_lsn: Lsn,
    last_lsn: Lsn,
    /// The batch's entries with their LSNs (coalesced into store writes by the apply task).
    entries: Vec<(Lsn, SettlementEntry)>,
    /// The batch's control entry, at `last_lsn`.
    control: ControlEntry,
    events: u64,
    started: Instant,
}

/// Per-row coalescing of a micro-batch ([`crate::ledger::coalesce`]): every entry keeps its event
/// row; of the balance rows touched several times only the newest post-image is written, with
/// the newest entry's LSN. Takes the entries, so nothing is copied.
pub fn coalesce(
    entries: Vec<(Lsn, SettlementEntry)>,
    controls: &[(Lsn, ControlEntry)],
) -> Vec<EntryWrites> {
    // What `ledger::coalesce` of each entry's `into_writes` gives, without a balance `Vec` per
    // entry: the event rows, then every balance write gathered in entry order (the stable sort
    // of `coalesce_rows` keeps that order among equal keys and LSNs).
    let mut writes: Vec<EntryWrites> = Vec::with_capacity(entries.len() + 2);
    let mut balances: Vec<BalanceWrite> =
        Vec::with_capacity(entries.iter().map(|(_, e)| e.post_images.len()).sum());
    let mut last_lsn = None;
    for (lsn, entry) in entries {
        last_lsn = last_lsn.max(Some(lsn));
        balances.extend(entry.post_images.iter().map(|&(key, amount)| BalanceWrite {
            key,
            amount,
            lsn,
        }));
        writes.push(EntryWrites {
            lsn,
            event: Some(into_event_row(entry.event, lsn)),
            balances: Vec::new(),
        });
    }
    // The control rows: of several batches' high-water rows only the newest is written (an
    // older one would lose to it anyway).
    let newest = controls.iter().map(|(lsn, _)| *lsn).max();
    for (lsn, control) in controls {
        last_lsn = last_lsn.max(Some(*lsn));
        let mut rows = control.writes(*lsn);
        if Some(*lsn) != newest {
            rows.remove(0); // the high-water row comes first
        }
        writes.extend(rows);
    }
    crate::ledger::coalesce_rows(writes, balances, last_lsn)
}

/// The single writer: owns the balance cache and the dedup state.
pub struct Pipeline {
    wal: Arc<Wal>,
    ledger: Arc<dyn Ledger>,
    cache: BalanceCache,
    /// The WAL payloads of the micro-batch being appended (reused).
    encode_buf: Vec<u8>,
    /// Which sequences are settled, rejected or open holes (P9).
    sequences: SequenceState,
    /// Trade ids settled (a trade id is settled once).
    trade_ids: TradeIds,
    /// The writer's epoch and how the applier checks it (P8).
    fence: Fence,
    settings: PipelineSettings,
    rejects: RejectSink,
    /// `summary.rejected` when the rejects file was last synced.
    rejects_synced: u64,
    /// Number of the next write batch.
    next_batch: u64,
    /// Every write batch up to this one is acknowledged by the store (set by the applier).
    acked_batch: Arc<AtomicU64>,
    summary: Summary,
}

/// A message after the parser stage.
struct Parsed {
    event: Result<Event, Rejection>,
    bytes: Vec<u8>,
}

/// Most messages the parser hands over at once (one queue hop for up to this many).
const PARSE_CHUNK_MESSAGES: usize = 256;

/// A micro-batch appended to the WAL, on its way to the syncer.
struct AppendedBatch {
    batch: u64,
    first_lsn: Lsn,
    last_lsn: Lsn,
    entries: Vec<SettlementEntry>,
    control: ControlEntry,
    started: Instant,
}

/// Where the pipeline starts: the dedup state and the trade ids the store accounts for, and the
/// writer's epoch.
#[derive(Clone, Debug)]
pub struct StartState {
    /// The dedup state.
    pub sequences: SequenceState,
    /// The highest trade id settled.
    pub max_trade_id: u64,
    /// This writer's epoch (P8); 0 for a pipeline that does not check fencing (tests).
    pub epoch: u64,
}

/// Least time between two fence checks of the applier ([`Fence`]).
pub const FENCE_CHECK_INTERVAL_MS: u64 = 250;

/// The applier's fence check: before writing commit markers it re-reads the store's epoch (at
/// most every [`FENCE_CHECK_INTERVAL_MS`]) and stops once a newer writer holds the store. The
/// newer writer's timestamps already win every row, so this bounds how long a fenced writer
/// keeps writing markers for writes that lost.
#[derive(Clone, Debug)]
struct Fence {
    epoch: u64,
    started: Instant,
    /// Milliseconds since `started` of the last check.
    last_check_ms: Arc<AtomicU64>,
}

impl Fence {
    fn due(&self) -> bool {
        if self.epoch == 0 {
            return false;
        }
        let now_ms = self.started.elapsed().as_millis() as u64;
        let last = self.last_check_ms.load(Ordering::Relaxed);
        now_ms >= last + FENCE_CHECK_INTERVAL_MS
            && self
                .last_check_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    async fn check(&self, ledger: &dyn Ledger) -> Result<(), SettleError> {
        if !self.due() {
            return Ok(());
        }
        match ledger.identity().await? {
            Some(id) if id.epoch == self.epoch => Ok(()),
            found => Err(SettleError::Fenced {
                ours: self.epoch,
                found: found.map(|i| i.epoch),
            }),
        }
    }
}

impl Pipeline {
    /// A pipeline continuing from `start` (the store's state after recovery).
    pub fn new(
        wal: Arc<Wal>,
        ledger: Arc<dyn Ledger>,
        start: StartState,
        mut settings: PipelineSettings,
        rejects: RejectSink,
    ) -> Pipeline {
        settings.batch_max = settings.batch_max.clamp(1, MAX_BATCH_EVENTS);
        settings.inflight = settings.inflight.clamp(1, MAX_INFLIGHT_BATCHES);
        settings.checkpoint_every_batches = settings.checkpoint_every_batches.max(1);
        settings.cache_rows = settings.cache_rows.max(4 * settings.batch_max);
        // Every trade in flight (queued, syncing, applying, merged) is remembered.
        let recent_trade_ids =
            (settings.inflight + SYNC_QUEUE_BATCHES + 2) * settings.batch_max * 2;
        tracing::info!(
            batch_max = settings.batch_max,
            batch_delay_ms = settings.batch_delay_ms,
            inflight = settings.inflight,
            cache_rows = settings.cache_rows,
            "settling"
        );
        Pipeline {
            wal,
            ledger,
            cache: BalanceCache::with_max_rows(settings.cache_rows),
            encode_buf: Vec::new(),
            sequences: start.sequences,
            trade_ids: TradeIds::new(start.max_trade_id, recent_trade_ids),
            fence: Fence {
                epoch: start.epoch,
                started: Instant::now(),
                last_check_ms: Arc::new(AtomicU64::new(0)),
            },
            settings,
            rejects,
            rejects_synced: 0,
            next_batch: 1,
            acked_batch: Arc::new(AtomicU64::new(0)),
            summary: Summary::default(),
        }
    }

    /// Runs until the source closes (end of input) or `shutdown` turns true, then drains: every
    /// durable batch is applied and committed before it returns.
    pub async fn run(
        mut self,
        source: mpsc::Receiver<Vec<Message>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Summary, SettleError> {
        let (batch_tx, batch_rx) = mpsc::channel::<DurableBatch>(self.settings.inflight);
        let applier = tokio::spawn(apply_loop(
            self.wal.clone(),
            self.ledger.clone(),
            batch_rx,
            ApplyLimits {
                inflight: self.settings.inflight,
                merge_max_events: self.settings.batch_max,
                checkpoint_every: self.settings.checkpoint_every_batches,
            },
            self.acked_batch.clone(),
            self.fence.clone(),
        ));
        // The syncer: one thread, since a sync blocks on the disk.
        let (append_tx, append_rx) = mpsc::channel::<AppendedBatch>(SYNC_QUEUE_BATCHES);
        let syncer = {
            let wal = self.wal.clone();
            std::thread::Builder::new()
                .name("settlement-sync".into())
                .spawn(move || sync_loop(wal, append_rx, batch_tx))
                .map_err(|e| SettleError::Io(format!("cannot start the WAL sync thread: {e}")))?
        };
        let (parsed_tx, mut parsed) =
            mpsc::channel::<Vec<Parsed>>(ingest_queue_chunks(self.settings.batch_max));
        let parser = tokio::spawn(parse_loop(source, parsed_tx));

        let delay = Duration::from_millis(self.settings.batch_delay_ms);
        let mut halted: Option<SettleError> = None;
        let mut open = true;
        let mut carry: Vec<Parsed> = Vec::new();
        while halted.is_none() && !*shutdown.borrow() {
            let mut raw = std::mem::take(&mut carry);
            if raw.is_empty() {
                if !open {
                    break;
                }
                let first = tokio::select! {
                    m = parsed.recv() => m,
                    _ = shutdown.changed() => None,
                };
                let Some(first) = first else { break };
                raw = first;
            }
            let deadline = tokio::time::Instant::now() + delay;
            while open && raw.len() < self.settings.batch_max {
                match tokio::time::timeout_at(deadline, parsed.recv()).await {
                    Ok(Some(mut chunk)) => raw.append(&mut chunk),
                    Ok(None) => open = false,
                    Err(_) => break,
                }
            }
            if raw.len() > self.settings.batch_max {
                carry = raw.split_off(self.settings.batch_max);
            }
            match self.settle_batch(raw).await {
                Ok((batch, halt)) => {
                    if let Some(batch) = batch {
                        if append_tx.send(batch).await.is_err() {
                            break; // the syncer stopped: its error is reported below
                        }
                    }
                    if let Some(halt) = halt {
                        // Everything before the gap is appended; the drain below syncs and
                        // applies it before the error is returned.
                        carry.clear();
                        halted = Some(halt);
                    }
                }
                Err(e) => halted = Some(e),
            }
        }
        // Messages parsed but not settled are dropped: they are not durable, so a restart reads
        // them again (file, stdin re-run, the engine's journal).
        drop(parsed);
        parser.abort();
        drop(append_tx);
        let synced = tokio::task::spawn_blocking(move || syncer.join())
            .await
            .map_err(|e| SettleError::Internal(format!("sync thread join failed: {e}")))?
            .map_err(|_| SettleError::Internal("the WAL sync thread panicked".into()))?;
        let applied = applier
            .await
            .map_err(|e| SettleError::Internal(format!("applier task failed: {e}")))?;
        self.rejects.flush()?;
        synced?;
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

    /// Validates, dedups and settles one micro-batch and appends it to the WAL (not yet
    /// synced: the syncer does that): the batch's entries, then its control entry. The batch is
    /// `None` when it accounted for no sequence (all duplicates). Under `--on-gap halt`, a gap
    /// ends the batch before the message after it, and the error to stop with comes back
    /// beside what came before it.
    async fn settle_batch(
        &mut self,
        raw: Vec<Parsed>,
    ) -> Result<(Option<AppendedBatch>, Option<SettleError>), SettleError> {
        let started = Instant::now();
        self.summary.events += raw.len() as u64;
        metrics::counter!("settlement_events_total").increment(raw.len() as u64);
        let mut control = ControlEntry::default();
        let mut holes = HoleChanges::new();
        let mut accepted = 0usize;
        let mut halt: Option<SettleError> = None;
        let mut events: Vec<(Event, Vec<u8>)> = Vec::with_capacity(raw.len());
        for m in raw {
            let seq = match &m.event {
                Ok(event) => Some(event.output_sequence()),
                Err(rejection) => rejection.output_sequence,
            };
            let Some(seq) = seq else {
                // No readable sequence: it cannot be placed, only reported.
                let rejection = m.event.expect_err("events have a sequence");
                self.reject(&m.bytes, &rejection)?;
                continue;
            };
            let placement = self.sequences.place(seq);
            match placement {
                Placement::Duplicate => {
                    self.duplicate();
                    continue;
                }
                Placement::BeforeFirst { first } => {
                    if seq + 1 < first {
                        self.gap(seq + 1, first - 1, seq);
                    }
                }
                Placement::TooFar { from, max_jump } => {
                    let rejection = Rejection {
                        output_sequence: Some(seq),
                        reason: format!(
                            "output_sequence {seq} is more than {max_jump} away from the range accounted for (it ends at {from}); refused as a wild sequence (raise --max-seq-jump if the engine really skipped that far)"
                        ),
                    };
                    self.reject(&m.bytes, &rejection)?;
                    continue;
                }
                Placement::Gap {
                    first_missing,
                    last_missing,
                } => {
                    self.gap(first_missing, last_missing, seq);
                    if self.settings.on_gap == GapPolicy::Halt {
                        halt = Some(SettleError::Gap {
                            first_missing,
                            got: seq,
                        });
                        break;
                    }
                }
                Placement::Fill { .. } => {
                    self.summary.filled += 1;
                    metrics::counter!("settlement_hole_fills_total").increment(1);
                }
                Placement::Next => {}
            }
            self.sequences.accept(seq, placement, &mut holes);
            accepted += 1;
            match m.event {
                Err(rejection) => {
                    control.reject(seq, &rejection.reason);
                    self.reject(&m.bytes, &rejection)?;
                }
                Ok(event) => events.push((event, m.bytes)),
            }
        }
        metrics::gauge!("settlement_open_holes").set(self.sequences.hole_count() as f64);
        if let Some(counter) = &self.settings.open_holes {
            counter.store(self.sequences.hole_count() as u64, Ordering::Relaxed);
        }
        if accepted == 0 {
            return Ok((None, halt));
        }
        let known_trades = self.stored_trade_sequences(&events).await?;
        // Stay within the cache bound, then load the rows this batch touches that it lacks.
        let evicted = self.cache.evict(self.acked_batch.load(Ordering::Acquire));
        if evicted > 0 {
            metrics::counter!("settlement_cache_evicted_rows_total").increment(evicted as u64);
        }
        let batch = self.next_batch;
        self.cache.begin_batch(batch);
        let mut settled: Vec<SettlementEntry> = Vec::with_capacity(events.len());
        let mut queue: std::collections::VecDeque<(Event, Vec<u8>)> = events.into();
        let mut loaded = false;
        while let Some((event, bytes)) = queue.pop_front() {
            let seq = event.output_sequence();
            if let Event::Trade(t) = &event {
                let earlier = match self.trade_ids.known(t.trade_id) {
                    Ok(found) => found,
                    Err(()) => known_trades.get(&t.trade_id).copied(),
                };
                if let Some(earlier) = earlier.filter(|&e| e != seq) {
                    let rejection = Rejection {
                        output_sequence: Some(seq),
                        reason: format!(
                            "trade_id {} was already settled under output_sequence {earlier}; this message (output_sequence {seq}) reuses it and is refused",
                            t.trade_id
                        ),
                    };
                    control.reject(seq, &rejection.reason);
                    self.reject(&bytes, &rejection)?;
                    continue;
                }
            }
            match self.cache.try_settle(event) {
                Settled::Entry(entry) => {
                    if let Event::Trade(t) = &entry.event {
                        self.trade_ids.settled(t.trade_id, seq);
                    }
                    settled.push(entry);
                }
                Settled::Refused(reason) => {
                    let rejection = Rejection {
                        output_sequence: Some(seq),
                        reason,
                    };
                    control.reject(seq, &rejection.reason);
                    self.reject(&bytes, &rejection)?;
                }
                Settled::NotLoaded(event) => {
                    // Load every row the rest of the batch lacks, once: nothing is forgotten
                    // during a batch, so every later event finds its rows.
                    assert!(!loaded, "the rows of the whole batch were loaded");
                    loaded = true;
                    queue.push_front((event, bytes));
                    let missing = self.cache.missing_rows(queue.iter().map(|(e, _)| e));
                    let rows = self.ledger.read_balances(&missing).await?;
                    for (key, row) in missing.into_iter().zip(rows) {
                        self.cache.load(key, row.map_or(0, |r| r.amount));
                    }
                }
            }
        }
        metrics::gauge!("settlement_cache_rows").set(self.cache.len() as f64);
        control.set_holes(holes);
        control.high_water = HighWater {
            first_sequence: self.sequences.first().expect("a sequence was accepted"),
            high_sequence: self.sequences.high().expect("a sequence was accepted"),
            max_trade_id: self.trade_ids.max_settled(),
        };
        // The rejects file is the human-readable log of what the control entry records; it is
        // made durable first so that every rejection the WAL holds has its line.
        if self.summary.rejected > self.rejects_synced {
            self.rejects.sync()?;
            self.rejects_synced = self.summary.rejected;
        }
        // All payloads in one reused buffer, then one append of the slices.
        let buf = &mut self.encode_buf;
        buf.clear();
        let mut ends = Vec::with_capacity(settled.len() + 1);
        for entry in &settled {
            entry.encode_into(buf);
            ends.push(buf.len());
        }
        control.encode_into(buf);
        ends.push(buf.len());
        let payloads: Vec<&[u8]> = ends
            .iter()
            .scan(0, |start, &end| {
                let payload = &buf[*start..end];
                *start = end;
                Some(payload)
            })
            .collect();
        let wal = self.wal.clone();
        let (first_lsn, last_lsn) = tokio::task::block_in_place(|| wal.append_batch(&payloads))?;
        assert_eq!(
            last_lsn - first_lsn + 1,
            settled.len() as u64 + 1,
            "one LSN per appended entry, the control entry last"
        );
        self.next_batch += 1;
        self.summary.batches += 1;
        Ok((
            Some(AppendedBatch {
                batch,
                first_lsn,
                last_lsn,
                entries: settled,
                control,
                started,
            }),
            halt,
        ))
    }

    /// The output sequences under which the store holds the batch's trades whose ids only the
    /// store can place (at or below the highest settled id and not remembered): no read at all
    /// for an engine that numbers trades upwards.
    async fn stored_trade_sequences(
        &self,
        events: &[(Event, Vec<u8>)],
    ) -> Result<std::collections::HashMap<u64, u64>, SettleError> {
        let mut ask: Vec<u64> = events
            .iter()
            .filter_map(|(e, _)| match e {
                Event::Trade(t) if self.trade_ids.known(t.trade_id).is_err() => Some(t.trade_id),
                _ => None,
            })
            .collect();
        ask.sort_unstable();
        ask.dedup();
        let seqs = super::recovery::read_in_chunks(&ask, "trade lookups", |chunk| {
            self.ledger.trade_sequences(chunk)
        })
        .await?;
        let found: std::collections::HashMap<u64, u64> = ask
            .iter()
            .zip(seqs)
            .filter_map(|(&id, s)| s.map(|s| (id, s)))
            .collect();
        if !ask.is_empty() {
            metrics::counter!("settlement_trade_id_lookups_total").increment(ask.len() as u64);
        }
        Ok(found)
    }

    /// Counts and logs a gap: `first_missing..=last_missing` become an open hole.
    fn gap(&mut self, first_missing: u64, last_missing: u64, got: u64) {
        self.summary.gaps += 1;
        metrics::counter!("settlement_gaps_total").increment(1);
        tracing::warn!(
            first_missing,
            last_missing,
            got,
            missing = last_missing - first_missing + 1,
            "gap in output_sequence: recorded as an open hole"
        );
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
}

/// Appended batches waiting for their sync (the settle loop runs at most this far ahead of the
/// disk).
const SYNC_QUEUE_BATCHES: usize = 2;

/// Chunks of parsed messages buffered between the parser and the settle loop: about two
/// micro-batches' worth.
fn ingest_queue_chunks(batch_max: usize) -> usize {
    (2 * batch_max).div_ceil(PARSE_CHUNK_MESSAGES).max(2)
}

/// The parser stage: parses and validates messages off the settle loop, handing them over in
/// chunks of what is ready (up to [`PARSE_CHUNK_MESSAGES`]).
async fn parse_loop(mut source: mpsc::Receiver<Vec<Message>>, out: mpsc::Sender<Vec<Parsed>>) {
    let parse = |messages: Vec<Message>, into: &mut Vec<Parsed>| {
        assert!(
            messages.len() <= SOURCE_CHUNK_MESSAGES,
            "a source chunk holds at most {SOURCE_CHUNK_MESSAGES} messages"
        );
        into.extend(messages.into_iter().map(|m| Parsed {
            event: parse_event(&m.bytes),
            bytes: m.bytes,
        }));
    };
    loop {
        let Some(first) = source.recv().await else {
            return; // the source closed
        };
        let mut chunk: Vec<Parsed> = Vec::with_capacity(first.len().max(PARSE_CHUNK_MESSAGES));
        parse(first, &mut chunk);
        // And whatever else is ready, up to a parse chunk.
        while chunk.len() < PARSE_CHUNK_MESSAGES {
            match source.try_recv() {
                Ok(more) => parse(more, &mut chunk),
                Err(_) => break,
            }
        }
        if chunk.is_empty() {
            continue; // an empty chunk from a source: nothing to hand on
        }
        if out.send(chunk).await.is_err() {
            return; // the settle loop stopped
        }
    }
}

/// The syncer (its own thread): one WAL sync per appended batch (P1: nothing reaches the store
/// before its entries are durable; a sync also covers whatever was appended after the batch),
/// then on to the applier (whose apply tasks coalesce the rows, on the runtime's workers).
fn sync_loop(
    wal: Arc<Wal>,
    mut batches: mpsc::Receiver<AppendedBatch>,
    out: mpsc::Sender<DurableBatch>,
) -> Result<(), SettleError> {
    while let Some(b) = batches.blocking_recv() {
        if wal.durable_lsn() < b.last_lsn {
            let sync_started = Instant::now();
            let durable_lsn = wal.sync()?;
            metrics::histogram!("settlement_wal_sync_seconds")
                .record(sync_started.elapsed().as_secs_f64());
            assert!(
                durable_lsn >= b.last_lsn,
                "a sync covers everything appended before it"
            );
        }
        let events = b.entries.len() as u64;
        let entries: Vec<(Lsn, SettlementEntry)> =
            (b.first_lsn..b.last_lsn).zip(b.entries).collect();
        assert_eq!(
            entries.len() as u64,
            events,
            "the entries take the LSNs before the control entry's"
        );
        let durable = DurableBatch {
            batch: b.batch,
            first_lsn: b.first_lsn,
            last_lsn: b.last_lsn,
            entries,
            control: b.control,
            events,
            started: b.started,
        };
        if out.blocking_send(durable).is_err() {
            break; // the applier stopped: its error is reported by the pipeline
        }
    }
    Ok(())
}

/// The batches one apply wrote, each as `(batch, first LSN, last LSN, events, started)`, or why
/// it failed.
type BatchOutcome = Result<Vec<(u64, Lsn, Lsn, u64, Instant)>, SettleError>;

/// The highest write batch below which every batch is acknowledged (batches complete out of
/// order with several in flight); published for the balance cache's eviction.
struct AckedBatches {
    contiguous: u64,
    done: std::collections::BTreeSet<u64>,
    published: Arc<AtomicU64>,
}

impl AckedBatches {
    fn new(published: Arc<AtomicU64>) -> AckedBatches {
        AckedBatches {
            contiguous: published.load(Ordering::Acquire),
            done: Default::default(),
            published,
        }
    }

    fn acked(&mut self, batch: u64) {
        assert!(batch > self.contiguous, "a batch is acknowledged once");
        self.done.insert(batch);
        while self.done.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
        self.published.store(self.contiguous, Ordering::Release);
    }
}

/// The applier's limits.
struct ApplyLimits {
    /// Applies in flight at once.
    inflight: usize,
    /// Most events one apply carries when waiting batches are merged.
    merge_max_events: usize,
    /// A WAL checkpoint after this many acknowledged batches.
    checkpoint_every: usize,
}

/// Applies durable batches with up to `inflight` in flight; writes a commit marker for each
/// acknowledged batch (P2) and checkpoints every `checkpoint_every` batches. Returns the number
/// of events settled.
async fn apply_loop(
    wal: Arc<Wal>,
    ledger: Arc<dyn Ledger>,
    mut batches: mpsc::Receiver<DurableBatch>,
    limits: ApplyLimits,
    acked_batch: Arc<AtomicU64>,
    fence: Fence,
) -> Result<u64, SettleError> {
    let ApplyLimits {
        inflight,
        merge_max_events,
        checkpoint_every,
    } = limits;
    let mut running: JoinSet<BatchOutcome> = JoinSet::new();
    let mut acked = AckedBatches::new(acked_batch);
    let mut settled = 0u64;
    let mut acked_batches = 0usize;
    let mut failure: Option<SettleError> = None;
    let mut open = true;
    loop {
        if failure.is_none() && open && running.len() < inflight {
            tokio::select! {
                b = batches.recv() => match b {
                    Some(b) => {
                        // Batches that queued up while every slot was busy (a slow store) go out
                        // as one apply, up to `merge_max_events`: the backlog drains in fewer,
                        // larger applies instead of one slot per small micro-batch.
                        let mut group = vec![b];
                        let mut events = group[0].entries.len();
                        while events < merge_max_events {
                            match batches.try_recv() {
                                Ok(next) => {
                                    events += next.entries.len();
                                    group.push(next);
                                }
                                Err(_) => break,
                            }
                        }
                        let ledger = ledger.clone();
                        let fence = fence.clone();
                        running.spawn(async move {
                            let (first_lsn, last_lsn) =
                                (group[0].first_lsn, group[group.len() - 1].last_lsn);
                            let mut applied = Vec::with_capacity(group.len());
                            let mut entries = Vec::with_capacity(events);
                            let mut controls = Vec::with_capacity(group.len());
                            for b in group {
                                applied.push((b.batch, b.first_lsn, b.last_lsn, b.events, b.started));
                                entries.extend(b.entries);
                                controls.push((b.last_lsn, b.control));
                            }
                            let writes = coalesce(entries, &controls);
                            ledger.apply(&writes).await.map_err(|e| SettleError::Store {
                                first_lsn,
                                last_lsn,
                                source: e,
                            })?;
                            // P8: no commit marker once a newer writer holds the store.
                            fence.check(&*ledger).await?;
                            Ok(applied)
                        });
                        continue;
                    }
                    None => open = false,
                },
                Some(done) = running.join_next(), if !running.is_empty() => {
                    on_done(&wal, done, &mut settled, &mut acked_batches, checkpoint_every, &mut failure, &mut acked)?;
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
                &mut acked,
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
    acked: &mut AckedBatches,
) -> Result<(), SettleError> {
    match done {
        Ok(Ok(applied)) => {
            for (batch, first, last, events, started) in applied {
                // P2: the marker only after the store acknowledged every write of the batch.
                wal.commit_range(first, last)?;
                acked.acked(batch);
                *settled += events;
                *acked_batches += 1;
                metrics::counter!("settlement_settled_total").increment(events);
                metrics::histogram!("settlement_batch_seconds")
                    .record(started.elapsed().as_secs_f64());
                if *acked_batches % checkpoint_every == 0 {
                    tokio::task::block_in_place(|| wal.checkpoint())?;
                }
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::ledger::{Asset, BalanceKey, MovementKind};
    use crate::settle::event::{Event, Movement};

    proptest! {
        /// The pipeline's coalesce (no balance `Vec` per entry) writes exactly what
        /// `ledger::coalesce` of every entry's own writes does: same event rows, same newest
        /// post-image per row, same LSNs.
        #[test]
        fn coalesce_equals_the_ledger_coalesce_of_each_entrys_writes(
            entries in proptest::collection::vec(
                (1u64..4, proptest::collection::vec((0u64..3, 0usize..3, -50i64..50), 0..=4)),
                0..40,
            ),
        ) {
            let assets = ["BTC", "USDT", "ETH"].map(|a| Asset::new(a).unwrap());
            let mut lsn = 0;
            let entries: Vec<(Lsn, SettlementEntry)> = entries
                .into_iter()
                .map(|(step, images)| {
                    lsn += step;
                    let event = Event::Movement(Movement {
                        output_sequence: lsn,
                        kind: MovementKind::Deposit,
                        user_id: 1,
                        asset: assets[0],
                        amount: 1,
                    });
                    let post_images = images
                        .into_iter()
                        .map(|(user_id, a, amount)| (BalanceKey { user_id, asset: assets[a] }, amount))
                        .collect();
                    (lsn, SettlementEntry { event, post_images })
                })
                .collect();
            let want = crate::ledger::coalesce(
                entries.iter().map(|(lsn, e)| e.writes(*lsn)).collect(),
            );
            prop_assert_eq!(coalesce(entries, &[]), want);
        }
    }
}
