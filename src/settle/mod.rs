//! Settlement: the event model, the pipeline, start-up recovery and the audit.
//!
//! [`Settlement::open`] is what `settlement run` does before reading any input: check that the
//! WAL and the store belong together (P8), take the next writer epoch, open the WAL (above the
//! store's LSNs when the WAL directory is new), recover pending entries, and rebuild the dedup
//! state (settled, rejected, open holes: P9) from the store. [`Settlement::run`] then drives the
//! pipeline. The design is in `docs/architecture.md`.

pub mod audit;
pub mod control;
pub mod demo;
pub mod entry;
pub mod event;
pub mod pipeline;
pub mod recovery;
pub mod sequence;
pub mod trade_ids;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::ledger::{Claim, HighWaterRow, Ledger, LedgerError, StoreIdentity, MAX_EPOCH};
use crate::wal::{Lsn, Wal, WalError, WalIdentity, WalOptions};
pub use pipeline::{
    GapPolicy, Message, PipelineSettings, RejectSink, StartState, Summary, SOURCE_CHUNK_MESSAGES,
};
pub use recovery::RecoveryReport;
use sequence::SequenceState;

/// Errors of the settlement process. Each says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The WAL failed.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// The store failed outside a batch write.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A batch write failed; its entries stay pending in the WAL.
    #[error("store write of entries {first_lsn}..={last_lsn} failed: {source}; they stay pending in the WAL and are verified at the next start")]
    Store {
        /// First LSN of the batch.
        first_lsn: Lsn,
        /// Last LSN of the batch.
        last_lsn: Lsn,
        /// The store error.
        #[source]
        source: LedgerError,
    },
    /// A gap in the output sequence under `--on-gap halt`.
    #[error("gap in output_sequence: {first_missing} is missing (the next message was {got}); stopped (--on-gap halt) after settling and syncing every message before it. Backfill from {first_missing} (for example `settlement run --input JOURNAL`), or rerun with --on-gap log to record the hole and go on")]
    Gap {
        /// The first missing sequence.
        first_missing: u64,
        /// The sequence received.
        got: u64,
    },
    /// A newer writer took the store over (P8).
    #[error("fenced: this writer holds epoch {ours} but the store is now held by epoch {found:?}; another settlement process took the store over, so this one stops before writing further commit markers (its late writes lose to the new writer's timestamps). Its pending entries stay in its WAL; do not restart it against this store")]
    Fenced {
        /// This writer's epoch.
        ours: u64,
        /// What the store holds.
        found: Option<u64>,
    },
    /// Recovery found rows that the store holds with the entry's LSN but another value.
    #[error("recovery found {entries} diverged entr(y/ies); nothing was overwritten. Investigate with `wal-inspect plan`, then rerun with --accept-divergence to keep the store's values:{report}")]
    Divergence {
        /// Entries with a diverged row.
        entries: usize,
        /// The rows, one per line.
        report: String,
    },
    /// A WAL entry that does not decode as a settlement entry.
    #[error("WAL entry LSN {lsn} is not a settlement entry: {reason}")]
    BadEntry {
        /// The entry.
        lsn: Lsn,
        /// Why.
        reason: String,
    },
    /// The WAL and the store do not belong together (P8): nothing was written.
    #[error("refusing to start: {0}")]
    Mismatch(String),
    /// I/O outside the WAL (rejects file, input).
    #[error("{0}")]
    Io(String),
    /// A bug: a task panicked.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Options for opening the settlement state.
#[derive(Clone, Debug)]
pub struct SettlementOptions {
    /// WAL directory.
    pub wal_dir: PathBuf,
    /// WAL segment size.
    pub segment_size_bytes: u64,
    /// Leave diverged entries as the store has them instead of stopping.
    pub accept_divergence: bool,
    /// Bind a new WAL (an empty directory) to a store that another WAL wrote: the old WAL's
    /// pending entries are given up (`--new-wal`).
    pub new_wal: bool,
    /// Re-bind this WAL to a store that is behind it or bound elsewhere (a store restored from a
    /// backup): what the store lacks is not re-sent from the WAL; replay the engine's journal
    /// to fill it (`--adopt-store`).
    pub adopt_store: bool,
}

impl SettlementOptions {
    /// The defaults for `wal_dir`: no deliberate re-binding.
    pub fn new(wal_dir: PathBuf) -> SettlementOptions {
        SettlementOptions {
            wal_dir,
            segment_size_bytes: crate::wal::format::DEFAULT_SEGMENT_SIZE_BYTES,
            accept_divergence: false,
            new_wal: false,
            adopt_store: false,
        }
    }
}

/// An opened settlement state: WAL recovered, store verified, ready for input.
pub struct Settlement {
    wal: Arc<Wal>,
    ledger: Arc<dyn Ledger>,
    start: StartState,
    recovery: RecoveryReport,
}

/// Does `dir` already hold WAL segments?
fn wal_exists(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()).any(|e| {
                crate::wal::format::parse_segment_file_name(&e.file_name().to_string_lossy())
                    .is_some()
            })
        })
        .unwrap_or(false)
}

/// What a store written before identities existed holds (one full scan, once: the first start
/// of this version over such a store binds it).
async fn legacy_high_water(ledger: &dyn Ledger) -> Result<Option<HighWaterRow>, SettleError> {
    let mut lsn = 0;
    let mut first = u64::MAX;
    let mut high = 0;
    let mut max_trade_id = 0;
    let mut any = false;
    for t in ledger.scan_trades().await? {
        any = true;
        lsn = lsn.max(t.lsn);
        first = first.min(t.output_sequence);
        high = high.max(t.output_sequence);
        max_trade_id = max_trade_id.max(t.trade_id);
    }
    for m in ledger.scan_movements().await? {
        any = true;
        lsn = lsn.max(m.lsn);
        first = first.min(m.output_sequence);
        high = high.max(m.output_sequence);
    }
    for (_, b) in ledger.scan_balances().await? {
        lsn = lsn.max(b.last_lsn);
    }
    Ok(any.then_some(HighWaterRow {
        lsn,
        first_sequence: first,
        high_sequence: high,
        max_trade_id,
    }))
}

/// A random id that fits a CQL `bigint` and is never 0.
fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    (h.finish() >> 1).max(1)
}

/// Why the WAL and the store do not belong together (P8): refused before any write.
fn mismatch(text: String) -> SettleError {
    SettleError::Mismatch(text)
}

impl Settlement {
    /// Checks that the WAL and the store belong together (P8), takes the next writer epoch,
    /// opens the WAL, recovers its pending entries against `ledger`, and rebuilds the dedup
    /// state from the store.
    pub async fn open(
        ledger: Arc<dyn Ledger>,
        options: &SettlementOptions,
    ) -> Result<Settlement, SettleError> {
        let store = ledger.describe();
        let dir = options.wal_dir.display().to_string();
        let identity = ledger.identity().await?;
        let mut high_water = ledger.high_water().await?;
        let legacy = identity.is_none() && high_water.is_none();
        if legacy {
            high_water = legacy_high_water(&*ledger).await?;
            if let Some(hw) = high_water {
                tracing::warn!(%store, lsn = hw.lsn, high_sequence = hw.high_sequence,
                    "a store without an identity (written before identities existed): binding it to this WAL, high-water from one full scan");
            }
        }
        let store_lsn = high_water.map_or(0, |h| h.lsn);
        let store_id = identity.map_or_else(random_id, |i| i.store_id);
        let wal_present = wal_exists(&options.wal_dir);
        let mut wal_options = WalOptions::default().segment_size_bytes(options.segment_size_bytes);
        let (wal, wal_lsn_base) = if !wal_present {
            if let Some(id) = identity.filter(|i| i.wal_id != 0) {
                let owner_wrote = store_lsn >= id.wal_lsn_base;
                if owner_wrote && !options.new_wal {
                    return Err(mismatch(format!(
                        "the WAL directory {dir} holds no WAL, but the store {store} (store id {}) is bound to WAL {} which wrote to it up to LSN {store_lsn} (output_sequence {}). That WAL holds the store's pending entries. If {dir} is the wrong directory, point --wal-dir at that WAL. If it is lost for good, rerun with --new-wal: a new WAL starts above the store's high-water and entries that were pending in the lost WAL are given up (audit the store afterwards)",
                        id.store_id,
                        id.wal_id,
                        high_water.map_or(0, |h| h.high_sequence)
                    )));
                }
                if owner_wrote {
                    tracing::warn!(%store, old_wal_id = id.wal_id, store_lsn, "--new-wal: a new WAL takes over the store; the old WAL's pending entries are given up");
                }
            }
            let wal_id = random_id();
            let base = store_lsn + 1;
            wal_options = wal_options.first_lsn(base).identity(WalIdentity {
                wal_id,
                owner_id: store_id,
            });
            let wal = tokio::task::block_in_place(|| Wal::open(&options.wal_dir, wal_options))?;
            (wal, base)
        } else {
            if options.new_wal {
                return Err(mismatch(format!(
                    "--new-wal binds a new, empty WAL directory, but {dir} holds a WAL; move it away first (keep it: it may hold pending entries) or drop --new-wal"
                )));
            }
            wal_options = wal_options.identity(WalIdentity {
                wal_id: random_id(),
                owner_id: store_id,
            });
            let wal = tokio::task::block_in_place(|| Wal::open(&options.wal_dir, wal_options))?;
            let base = check_binding(
                &wal,
                identity,
                high_water,
                &store,
                &dir,
                options.adopt_store,
            )?;
            if wal.identity().is_none_or(|w| w.owner_id != store_id) {
                tokio::task::block_in_place(|| wal.rebind(store_id))?;
            }
            (wal, base)
        };
        let wal = Arc::new(wal);
        let wal_id = wal
            .identity()
            .expect("a WAL opened with an identity has one")
            .wal_id;
        let epoch = claim_epoch(
            &*ledger,
            identity,
            StoreIdentity {
                store_id,
                wal_id,
                wal_lsn_base,
                epoch: 0,
            },
        )
        .await?;
        ledger.set_write_epoch(epoch);
        if options.adopt_store {
            adopt(
                &wal,
                &*ledger,
                identity,
                high_water,
                options.accept_divergence,
            )
            .await?;
        }
        let recovery = recovery::recover(&wal, &*ledger, options.accept_divergence).await?;
        // The dedup state is the store's (recovery made it complete), in O(open holes).
        let mut high_water = ledger.high_water().await?;
        if legacy && high_water.is_none() {
            // Bind the legacy store for good: its high-water row, from a scan after recovery
            // (which may have re-sent entries written before control entries existed).
            high_water = legacy_high_water(&*ledger).await?;
            if let Some(hw) = high_water {
                ledger
                    .apply(&[crate::ledger::EntryWrites {
                        lsn: hw.lsn,
                        event: Some(crate::ledger::EventRow::HighWater(hw)),
                        balances: Vec::new(),
                    }])
                    .await?;
            }
        }
        let holes = ledger.open_holes().await?;
        // The bound is the pipeline's (`PipelineSettings::max_seq_jump`, set by `run`).
        let sequences =
            SequenceState::from_store(high_water, &holes, sequence::DEFAULT_MAX_SEQUENCE_JUMP)
                .map_err(|e| SettleError::Ledger(LedgerError::Other(format!("{store}: {e}"))))?;
        Ok(Settlement {
            wal,
            ledger,
            start: StartState {
                sequences,
                max_trade_id: high_water.map_or(0, |h| h.max_trade_id),
                epoch,
            },
            recovery,
        })
    }

    /// What recovery did.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The highest output sequence accounted for (settled or rejected).
    pub fn last_output_sequence(&self) -> Option<u64> {
        self.start.sequences.high()
    }

    /// The dedup state the pipeline starts from.
    pub fn sequences(&self) -> &SequenceState {
        &self.start.sequences
    }

    /// This writer's epoch.
    pub fn epoch(&self) -> u64 {
        self.start.epoch
    }

    /// The WAL.
    pub fn wal(&self) -> &Arc<Wal> {
        &self.wal
    }

    /// Runs the pipeline over `source` (chunks of at most [`SOURCE_CHUNK_MESSAGES`] messages,
    /// see [`crate::ingest::source_channel`]) until it closes or `shutdown` turns true.
    pub async fn run(
        &self,
        source: mpsc::Receiver<Vec<Message>>,
        shutdown: watch::Receiver<bool>,
        mut settings: PipelineSettings,
        rejects: RejectSink,
    ) -> Result<Summary, SettleError> {
        settings.max_seq_jump = settings.max_seq_jump.min(sequence::MAX_SEQUENCE_JUMP_LIMIT);
        let mut start = self.start.clone();
        start.sequences = start.sequences.with_max_jump(settings.max_seq_jump);
        let pipeline = pipeline::Pipeline::new(
            self.wal.clone(),
            self.ledger.clone(),
            start,
            settings,
            rejects,
        );
        pipeline.run(source, shutdown).await
    }
}

/// Checks an existing WAL against the store (P8) and returns the WAL's LSN base for the store's
/// identity. Nothing was written when it fails.
fn check_binding(
    wal: &Wal,
    identity: Option<StoreIdentity>,
    high_water: Option<HighWaterRow>,
    store: &str,
    dir: &str,
    adopt_store: bool,
) -> Result<Lsn, SettleError> {
    let wal_identity = wal.identity();
    let store_lsn = high_water.map_or(0, |h| h.lsn);
    let wal_last = wal.last_lsn();
    let adopt_hint = "If the store was restored from a backup on purpose, rerun with --adopt-store (this WAL takes the store over; then replay the engine's journal with `settlement run --input JOURNAL` to fill what the backup lacks). Otherwise point --store at this WAL's store, or --wal-dir at this store's WAL";
    if let (Some(w), Some(id)) = (wal_identity, identity) {
        if w.owner_id != 0 && w.owner_id != id.store_id && !adopt_store {
            return Err(mismatch(format!(
                "the WAL {dir} (WAL id {}) belongs to store {}, but {store} is store {}. {adopt_hint}",
                w.wal_id, w.owner_id, id.store_id
            )));
        }
        if id.wal_id != 0 && id.wal_id != w.wal_id && !adopt_store {
            return Err(mismatch(format!(
                "the store {store} (store id {}) is bound to WAL {} since LSN {}, not to the WAL {dir} (WAL id {}): another WAL took it over. {adopt_hint}",
                id.store_id, id.wal_id, id.wal_lsn_base, w.wal_id
            )));
        }
    }
    if identity.is_none() && high_water.is_none() && wal.max_committed_lsn() > 0 && !adopt_store {
        return Err(mismatch(format!(
            "the store {store} is empty, but the WAL {dir} committed entries up to LSN {} to a store: this is not its store, or the store was restored from before this WAL wrote. {adopt_hint}",
            wal.max_committed_lsn()
        )));
    }
    if let Some(id) = identity.filter(|i| i.wal_id != 0 && wal_identity.is_none()) {
        if !adopt_store {
            return Err(mismatch(format!(
                "the store {store} is bound to WAL {}, and the WAL {dir} was written before WAL identities existed. {adopt_hint}",
                id.wal_id
            )));
        }
    }
    if store_lsn > wal_last {
        return Err(mismatch(format!(
            "the WAL {dir} ends at LSN {wal_last}, but the store {store} holds writes up to LSN {store_lsn}: this is an older copy of the WAL (new LSNs would repeat the store's). Put back the newest copy of the WAL; if it is lost, move {dir} away and rerun with --new-wal"
        )));
    }
    let committed = wal.max_committed_lsn();
    if store_lsn < committed && !adopt_store {
        return Err(mismatch(format!(
            "the store {store} is behind its WAL: its high-water is LSN {store_lsn} (output_sequence {}), but the WAL {dir} has commit markers up to LSN {committed}, so acknowledged writes are missing from the store (was it restored from a backup?). {adopt_hint}",
            high_water.map_or(0, |h| h.high_sequence)
        )));
    }
    if adopt_store {
        tracing::warn!(%store, wal = %dir, store_lsn, committed, "--adopt-store: this WAL takes the store over; entries the store lacks are not re-sent, replay the engine's journal to fill them");
    }
    Ok(match identity {
        Some(id) if wal_identity.is_some_and(|w| w.wal_id == id.wal_id) => id.wal_lsn_base,
        _ => wal_last + 1,
    })
}

/// `--adopt-store`: completes a store that is behind this WAL (restored from a backup).
///
/// First the restored store is audited as it is (one full read; adopting is rare):
/// - consistent (a backup taken between batches, as the embedded store's always are): when the
///   WAL still holds every entry above the store's high-water, every entry it holds is
///   classified and re-sent as recovery does (idempotent: only what is missing is written) and
///   the store is whole again; when a checkpoint removed some, nothing is re-sent (a suffix
///   without the entries before it would skip sequences) and the engine's journal settles what
///   the backup lacks. A partial entry below the high-water that the WAL no longer holds
///   cannot be told from a consistent store: back up between batches (the embedded store always
///   is) or keep the WAL's segments as long as the backups;
/// - inconsistent (a backup taken in the middle of UNLOGGED batches holds partial entries, even
///   below its high-water): only a WAL that still holds its whole history can repair it, by
///   re-sending every entry (idempotent) and auditing again; otherwise it is refused before
///   anything is written.
async fn adopt(
    wal: &Wal,
    ledger: &dyn Ledger,
    identity: Option<StoreIdentity>,
    high_water: Option<HighWaterRow>,
    accept_divergence: bool,
) -> Result<(), SettleError> {
    let store_lsn = high_water.map_or(0, |h| h.lsn);
    let mut entries = Vec::new();
    let view = tokio::task::block_in_place(|| {
        crate::wal::inspect_with(wal.dir(), &mut |_, r| {
            if r.record_type == crate::wal::RecordType::Entry {
                entries.push(crate::wal::PendingEntry {
                    lsn: r.lsn,
                    payload: r.payload.to_vec(),
                });
            }
        })
    })?;
    let oldest = view.segments.first().map_or(u64::MAX, |s| s.first_lsn);
    let wal_id = wal.identity().map(|w| w.wal_id);
    let whole_history = oldest <= 1
        || identity.is_some_and(|i| Some(i.wal_id) == wal_id && oldest <= i.wal_lsn_base);
    let before = audit::audit(ledger).await?;
    let store = ledger.describe();
    if before.passed() {
        if oldest > store_lsn + 1 {
            eprintln!(
                "adopt: {store} is consistent up to LSN {store_lsn}; the WAL starts at LSN {oldest}, after it: nothing is re-sent from the WAL; replay the engine's journal (`settlement run --input JOURNAL`) to settle what the backup lacks"
            );
            return Ok(());
        }
        // Every retained entry, not only those above the high-water: a passing audit does not
        // prove the backup holds no partial entry below it (an apply whose high-water row landed
        // while the rows of a hole's fill did not looks like a consistent store with that hole
        // still open). Classification re-sends only what is missing.
    } else if !whole_history {
        return Err(mismatch(format!(
            "cannot adopt {store}: the restored store is inconsistent (a backup taken in the middle of a batch: {} problem(s), the first: {}), and this WAL no longer holds its whole history (it starts at LSN {oldest}) to repair it. Restore a backup taken while no batch was being written, or rebuild the store from the engine's journal into a new store",
            before.problem_count,
            before.problems.first().map_or("", String::as_str)
        )));
    }
    tracing::warn!(%store, entries = entries.len(), store_lsn, consistent = before.passed(),
        "--adopt-store: re-sending what the store lacks from the WAL");
    let report = recovery::resend(ledger, &entries, accept_divergence).await?;
    if !before.passed() {
        let after = audit::audit(ledger).await?;
        if !after.passed() {
            return Err(mismatch(format!(
                "adopting {store}: re-sending the WAL's {} entries did not make the store consistent ({} problem(s), the first: {}); it needs a human (`settlement audit`)",
                entries.len(),
                after.problem_count,
                after.problems.first().map_or("", String::as_str)
            )));
        }
    }
    eprintln!(
        "adopt: {} WAL entr(y/ies) checked against {store}, {} row(s) re-sent",
        entries.len(),
        report.resent_rows,
    );
    Ok(())
}

/// Takes the next writer epoch with a conditional write (P8).
async fn claim_epoch(
    ledger: &dyn Ledger,
    current: Option<StoreIdentity>,
    mut new: StoreIdentity,
) -> Result<u64, SettleError> {
    let epoch = current.map_or(1, |c| c.epoch + 1);
    if epoch > MAX_EPOCH {
        return Err(SettleError::Ledger(LedgerError::Invalid(format!(
            "the store {} has used all {MAX_EPOCH} writer epochs (every start takes one; write timestamps must stay below wall-clock time); move the ledger to a new keyspace or store",
            ledger.describe()
        ))));
    }
    if MAX_EPOCH - epoch < 100 {
        tracing::warn!(epoch, left = MAX_EPOCH - epoch, "few writer epochs left");
    }
    new.epoch = epoch;
    match ledger.claim(current.map(|c| c.epoch), new).await? {
        Claim::Won => {
            tracing::info!(store = %ledger.describe(), epoch, wal_id = new.wal_id, store_id = new.store_id, "writer epoch claimed");
            metrics::gauge!("settlement_writer_epoch").set(epoch as f64);
            Ok(epoch)
        }
        Claim::Lost(now) => Err(mismatch(format!(
            "another settlement process claimed the store {} at the same moment (it now holds epoch {:?}, WAL {:?}); only one writer may run: stop one of them",
            ledger.describe(),
            now.map(|i| i.epoch),
            now.map(|i| i.wal_id)
        ))),
    }
}
