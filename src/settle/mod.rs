//! Settlement: the event model, the pipeline, start-up recovery and the audit.
//!
//! [`Settlement::open`] is what `settlement run` does before reading any input: open the store,
//! open the WAL (above the store's LSNs when the WAL directory is new), recover pending entries,
//! and find the last durable output sequence. [`Settlement::run`] then drives the pipeline.

pub mod audit;
pub mod demo;
pub mod entry;
pub mod event;
pub mod pipeline;
pub mod recovery;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::ledger::{Ledger, LedgerError};
use crate::wal::{Lsn, Wal, WalError, WalOptions};
use entry::SettlementEntry;
pub use pipeline::{
    GapPolicy, Message, PipelineSettings, RejectSink, Summary, SOURCE_CHUNK_MESSAGES,
};
pub use recovery::RecoveryReport;

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
    #[error("gap in output_sequence: expected {expected}, got {got}; stopped (--on-gap halt). Everything before it is settled")]
    Gap {
        /// The sequence expected.
        expected: u64,
        /// The sequence received.
        got: u64,
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
    /// Leave diverged rows as the store has them instead of stopping.
    pub accept_divergence: bool,
}

/// An opened settlement state: WAL recovered, store verified, ready for input.
pub struct Settlement {
    wal: Arc<Wal>,
    ledger: Arc<dyn Ledger>,
    last_seq: Option<u64>,
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

/// The highest LSN and output sequence the store holds (a full scan: only used when the WAL
/// directory is new but the store is not).
async fn store_high_water(ledger: &dyn Ledger) -> Result<(Lsn, Option<u64>), SettleError> {
    let mut lsn = 0;
    let mut seq = None::<u64>;
    for t in ledger.scan_trades().await? {
        lsn = lsn.max(t.lsn);
        seq = seq.max(Some(t.output_sequence));
    }
    for m in ledger.scan_movements().await? {
        lsn = lsn.max(m.lsn);
        seq = seq.max(Some(m.output_sequence));
    }
    for (_, b) in ledger.scan_balances().await? {
        lsn = lsn.max(b.last_lsn);
    }
    Ok((lsn, seq))
}

impl Settlement {
    /// Opens the WAL, runs recovery against `ledger`, and finds where input resumes.
    pub async fn open(
        ledger: Arc<dyn Ledger>,
        options: &SettlementOptions,
    ) -> Result<Settlement, SettleError> {
        let mut wal_options = WalOptions::default().segment_size_bytes(options.segment_size_bytes);
        let mut store_seq = None;
        if !wal_exists(&options.wal_dir) {
            let (lsn, seq) = store_high_water(&*ledger).await?;
            if lsn > 0 {
                tracing::warn!(wal_dir = %options.wal_dir.display(), store = %ledger.describe(), store_lsn = lsn,
                    "new WAL over a non-empty store: starting LSNs above the store's");
                wal_options = wal_options.first_lsn(lsn + 1);
                store_seq = seq;
            }
        }
        let wal = tokio::task::block_in_place(|| Wal::open(&options.wal_dir, wal_options))?;
        let wal = Arc::new(wal);
        let recovery = recovery::recover(&wal, &*ledger, options.accept_divergence).await?;
        let last_entry = tokio::task::block_in_place(|| wal.last_entry())?;
        let wal_seq = match last_entry {
            Some(e) => Some(
                SettlementEntry::decode(&e.payload)
                    .map_err(|reason| SettleError::BadEntry { lsn: e.lsn, reason })?
                    .event
                    .output_sequence(),
            ),
            None => None,
        };
        Ok(Settlement {
            wal,
            ledger,
            last_seq: wal_seq.max(store_seq),
            recovery,
        })
    }

    /// What recovery did.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The last durable output sequence: messages at or below it are duplicates.
    pub fn last_output_sequence(&self) -> Option<u64> {
        self.last_seq
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
        settings: PipelineSettings,
        rejects: RejectSink,
    ) -> Result<Summary, SettleError> {
        let pipeline = pipeline::Pipeline::new(
            self.wal.clone(),
            self.ledger.clone(),
            self.last_seq,
            settings,
            rejects,
        );
        pipeline.run(source, shutdown).await
    }
}
