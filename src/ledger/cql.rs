//! ScyllaDB/Cassandra ledger through the scylla driver (1.x).
//!
//! How it keeps the promises of `docs/architecture.md`:
//!
//! - **P4 (monotonic state)**: every data statement is `INSERT ... USING TIMESTAMP ?` and binds
//!   [`write_timestamp`]`(epoch, lsn)` (microseconds): the writer's epoch in the high bits, the
//!   LSN of the entry that wrote it below. Cassandra/Scylla keep the cell with the highest
//!   timestamp, so a replayed or late write of entry `n` never overwrites what entry `m > n`
//!   wrote, whatever order the writes land in, and a fenced writer's late writes (an older
//!   epoch) never overwrite the new writer's (P8). The timestamp is
//!   bound per statement because a CQL batch carries at most one batch-level timestamp (the
//!   driver's `Batch::set_timestamp`), and the per-statement `set_timestamp` of a prepared
//!   statement is *not* sent when that statement is inside a batch.
//! - **P2 (marker after effect)**: [`CqlLedger::apply`] returns `Ok` only when every batch was
//!   acknowledged at the configured consistency. A timeout, an unavailable replica or a broken
//!   connection is an unknown outcome: the (idempotent) batch is retried with bounded
//!   exponential backoff, and after `max_attempts` the call fails with
//!   [`LedgerError::Unknown`]; it never guesses.
//! - No counter columns: balances are absolute post-images with the LSN that wrote them.
//!
//! Schema (created when missing, idempotently; version [`SCHEMA_VERSION`] in `schema_version`):
//!
//! ```text
//! trades(trade_id bigint PRIMARY KEY, output_sequence, symbol, buyer_user_id, seller_user_id,
//!        price, quantity, timestamp_ns, lsn)
//! movements(output_sequence bigint PRIMARY KEY, kind text, user_id, asset, amount, lsn)
//! balances(user_id bigint, asset text, amount bigint, last_lsn bigint,
//!          PRIMARY KEY ((user_id), asset))
//! rejections(output_sequence bigint PRIMARY KEY, reason text, lsn bigint)
//! holes(first_sequence bigint PRIMARY KEY, last_sequence bigint, open boolean, lsn bigint)
//! high_water(k text PRIMARY KEY, lsn, first_sequence, high_sequence, max_trade_id)
//!                                                              -- one row: 'ledger'
//! identity(k text PRIMARY KEY, store_id, wal_id, wal_lsn_base, epoch)
//!                                       -- one row: 'ledger', written only by lightweight transactions
//! schema_version(component text PRIMARY KEY, version int)     -- one row: ('ledger', 2)
//! ```
//!
//! Caveat of these timestamps: they stay below wall-clock microseconds (see [`MAX_EPOCH`]), so
//! a write to these tables *without* an explicit timestamp (a manual `cqlsh` fix, a `DELETE`)
//! gets "now" and wins over every later settlement write of that row. Never write these tables
//! by hand; drop and rebuild the keyspace instead.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::cluster::metadata::ColumnType;
use scylla::errors::{DbError, ExecutionError, NewSessionError, PrepareError, RequestAttemptError};
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::policies::retry::FallthroughRetryPolicy;
use scylla::response::query_result::QueryResult;
use scylla::response::{PagingState, PagingStateResponse};
use scylla::routing::partitioner::{Murmur3Partitioner, Partitioner};
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::value::SerializeValue;
use scylla::serialize::writers::{CellWriter, RowWriter, WrittenCellProof};
use scylla::serialize::SerializationError;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency as CqlConsistency, SerialConsistency, Statement};
use scylla::value::{CqlValue, Row as UntypedRow};
use tokio::task::JoinSet;

use super::{
    validate_entries, validate_lookup, validate_lookup_count, write_timestamp, Asset, BalanceKey,
    BalanceRow, BalanceWrite, Claim, Consistency, CqlConfig, EntryWrites, EventKey, EventRow,
    HighWaterRow, HoleRow, Ledger, LedgerError, MovementKind, MovementRow, RejectionRow, Result,
    ShortStr, StoreIdentity, Symbol, TradeRow, MAX_EPOCH, MAX_OPEN_HOLES,
};
use crate::wal::Lsn;

/// The schema version this code creates and understands. Version 2 added the rejections, holes,
/// high_water and identity tables (created when missing, so a version 1 keyspace is upgraded by
/// the first writer that connects).
pub const SCHEMA_VERSION: i32 = 2;

/// Rows per page of the full-table scans.
const SCAN_PAGE_SIZE: i32 = 1000;
/// First retry delay; doubles per attempt up to [`BACKOFF_CAP`] (with jitter).
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest delay between two attempts.
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// Shortest client-side timeout for schema statements (DDL can take seconds).
const MIN_DDL_TIMEOUT: Duration = Duration::from_secs(10);

/// ScyllaDB/Cassandra ledger. Cheap to share: one session, statements prepared once at connect.
pub struct CqlLedger {
    inner: Arc<Inner>,
}

struct Inner {
    session: Session,
    config: CqlConfig,
    insert_trade: PreparedStatement,
    insert_movement: PreparedStatement,
    insert_balance: PreparedStatement,
    select_trade_lsn: PreparedStatement,
    select_movement_lsn: PreparedStatement,
    select_trade_lsns: PreparedStatement,
    select_movement_lsns: PreparedStatement,
    select_balances: PreparedStatement,
    scan_trades: PreparedStatement,
    scan_movements: PreparedStatement,
    scan_balances: PreparedStatement,
    insert_rejection: PreparedStatement,
    insert_hole: PreparedStatement,
    insert_high_water: PreparedStatement,
    select_rejection_lsn: PreparedStatement,
    select_hole_lsn: PreparedStatement,
    select_high_water: PreparedStatement,
    select_trade_sequences: PreparedStatement,
    select_identity: PreparedStatement,
    claim_new: PreparedStatement,
    claim_next: PreparedStatement,
    scan_rejections: PreparedStatement,
    scan_holes: PreparedStatement,
    /// The epoch of this writer, in every write timestamp ([`write_timestamp`]).
    epoch: AtomicU64,
    /// Batches the store answered with a batch-size warning.
    size_warnings: AtomicU64,
    /// Largest batch size (bytes) read from such a warning; 0 when none had a readable size.
    largest_warned_bytes: AtomicU64,
}

/// Batch-size warnings the store sent back with its responses (Cassandra's
/// `batch_size_warn_threshold`) since this ledger connected. With the default limits there are
/// none; a count above zero means `batch_bytes=` is above the store's threshold (or the size
/// estimate is off for these rows).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchSizeWarnings {
    /// Batches the store warned about.
    pub batches: u64,
    /// The largest batch size the store reported in a warning, in bytes as the store counts them
    /// (`None` when no warning carried a size this code could read).
    pub largest_reported_bytes: Option<u64>,
}

/// One UNLOGGED batch as [`Ledger::apply`] sends it (see [`plan_batches`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchShape {
    /// Statements in the batch.
    pub statements: usize,
    /// The sum of [`estimated_statement_bytes`] over them.
    pub estimated_bytes: usize,
}

impl std::fmt::Debug for CqlLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CqlLedger")
            .field("url", &self.inner.config.display_url())
            .finish_non_exhaustive()
    }
}

impl CqlLedger {
    /// Connects to `config.contact_points`, creates the keyspace and tables when missing
    /// (idempotently), checks the schema version and prepares every data statement.
    ///
    /// An unreachable store gives [`LedgerError::Unreachable`] naming the contact points, within
    /// about `connect_timeout_ms + request_timeout_ms`.
    pub async fn connect(config: CqlConfig) -> Result<CqlLedger> {
        check_keyspace_name(&config)?;
        if config.contact_points.is_empty() {
            return Err(LedgerError::BadUrl {
                url: config.display_url(),
                reason: "no contact points".into(),
            });
        }
        let session = open_session(&config).await?;
        let ddl = Ddl {
            session: &session,
            config: &config,
        };
        if config.read_only {
            ddl.check_schema().await?;
        } else {
            ddl.ensure_schema().await?;
        }

        let ks = &config.keyspace;
        let inner = Inner {
            insert_trade: ddl
                .prepare(&format!(
                    "INSERT INTO {ks}.trades (trade_id, output_sequence, symbol, buyer_user_id, \
                     seller_user_id, price, quantity, timestamp_ns, lsn) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
                ))
                .await?,
            insert_movement: ddl
                .prepare(&format!(
                    "INSERT INTO {ks}.movements (output_sequence, kind, user_id, asset, amount, lsn) \
                     VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
                ))
                .await?,
            insert_balance: ddl
                .prepare(&format!(
                    "INSERT INTO {ks}.balances (user_id, asset, amount, last_lsn) \
                     VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
                ))
                .await?,
            select_trade_lsn: ddl
                .prepare(&format!("SELECT lsn FROM {ks}.trades WHERE trade_id = ?"))
                .await?,
            select_movement_lsn: ddl
                .prepare(&format!(
                    "SELECT lsn FROM {ks}.movements WHERE output_sequence = ?"
                ))
                .await?,
            select_trade_lsns: ddl
                .prepare(&format!(
                    "SELECT trade_id, lsn FROM {ks}.trades WHERE trade_id IN ?"
                ))
                .await?,
            select_movement_lsns: ddl
                .prepare(&format!(
                    "SELECT output_sequence, lsn FROM {ks}.movements WHERE output_sequence IN ?"
                ))
                .await?,
            select_balances: ddl
                .prepare(&format!(
                    "SELECT asset, amount, last_lsn FROM {ks}.balances \
                     WHERE user_id = ? AND asset IN ?"
                ))
                .await?,
            scan_trades: ddl
                .prepare_scan(&format!(
                    "SELECT trade_id, output_sequence, symbol, buyer_user_id, seller_user_id, \
                     price, quantity, timestamp_ns, lsn FROM {ks}.trades"
                ))
                .await?,
            scan_movements: ddl
                .prepare_scan(&format!(
                    "SELECT output_sequence, kind, user_id, asset, amount, lsn FROM {ks}.movements"
                ))
                .await?,
            scan_balances: ddl
                .prepare_scan(&format!(
                    "SELECT user_id, asset, amount, last_lsn FROM {ks}.balances"
                ))
                .await?,
            insert_rejection: ddl
                .prepare(&format!(
                    "INSERT INTO {ks}.rejections (output_sequence, reason, lsn) \
                     VALUES (?, ?, ?) USING TIMESTAMP ?"
                ))
                .await?,
            insert_hole: ddl
                .prepare(&format!(
                    "INSERT INTO {ks}.holes (first_sequence, last_sequence, open, lsn) \
                     VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
                ))
                .await?,
            insert_high_water: ddl
                .prepare(&format!(
                    "INSERT INTO {ks}.high_water (k, lsn, first_sequence, high_sequence, \
                     max_trade_id) VALUES ('ledger', ?, ?, ?, ?) USING TIMESTAMP ?"
                ))
                .await?,
            select_rejection_lsn: ddl
                .prepare(&format!(
                    "SELECT lsn FROM {ks}.rejections WHERE output_sequence = ?"
                ))
                .await?,
            select_hole_lsn: ddl
                .prepare(&format!(
                    "SELECT lsn FROM {ks}.holes WHERE first_sequence = ?"
                ))
                .await?,
            select_high_water: ddl
                .prepare(&format!(
                    "SELECT lsn, first_sequence, high_sequence, max_trade_id \
                     FROM {ks}.high_water WHERE k = 'ledger'"
                ))
                .await?,
            select_trade_sequences: ddl
                .prepare(&format!(
                    "SELECT trade_id, output_sequence FROM {ks}.trades WHERE trade_id IN ?"
                ))
                .await?,
            select_identity: ddl
                .prepare_serial(&format!(
                    "SELECT store_id, wal_id, wal_lsn_base, epoch FROM {ks}.identity \
                     WHERE k = 'ledger'"
                ))
                .await?,
            claim_new: ddl
                .prepare_lwt(&format!(
                    "INSERT INTO {ks}.identity (k, store_id, wal_id, wal_lsn_base, epoch) \
                     VALUES ('ledger', ?, ?, ?, ?) IF NOT EXISTS"
                ))
                .await?,
            claim_next: ddl
                .prepare_lwt(&format!(
                    "UPDATE {ks}.identity SET store_id = ?, wal_id = ?, wal_lsn_base = ?, \
                     epoch = ? WHERE k = 'ledger' IF epoch = ?"
                ))
                .await?,
            scan_rejections: ddl
                .prepare_scan(&format!(
                    "SELECT output_sequence, reason, lsn FROM {ks}.rejections"
                ))
                .await?,
            scan_holes: ddl
                .prepare_scan(&format!(
                    "SELECT first_sequence, last_sequence, open, lsn FROM {ks}.holes"
                ))
                .await?,
            epoch: AtomicU64::new(0),
            session,
            config,
            size_warnings: AtomicU64::new(0),
            largest_warned_bytes: AtomicU64::new(0),
        };
        tracing::info!(store = %inner.config.display_url(), "cql ledger connected");
        Ok(CqlLedger {
            inner: Arc::new(inner),
        })
    }

    /// The configuration this ledger was opened with.
    pub fn config(&self) -> &CqlConfig {
        &self.inner.config
    }

    /// The driver session (for benchmarks and diagnostics; data writes go through
    /// [`Ledger::apply`]).
    pub fn session(&self) -> &Session {
        &self.inner.session
    }

    /// The batch-size warnings the store returned since connect.
    pub fn batch_size_warnings(&self) -> BatchSizeWarnings {
        let largest = self.inner.largest_warned_bytes.load(Ordering::Relaxed);
        BatchSizeWarnings {
            batches: self.inner.size_warnings.load(Ordering::Relaxed),
            largest_reported_bytes: (largest > 0).then_some(largest),
        }
    }

    /// The schema version stored in the keyspace (`None` when the row is missing).
    pub async fn stored_schema_version(&self) -> Result<Option<i32>> {
        Ddl {
            session: &self.inner.session,
            config: &self.inner.config,
        }
        .read_version()
        .await
    }
}

fn check_keyspace_name(config: &CqlConfig) -> Result<()> {
    let ks = &config.keyspace;
    let ok = !ks.is_empty()
        && ks.len() <= 48
        && ks.starts_with(|c: char| c.is_ascii_alphabetic())
        && ks.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(LedgerError::BadUrl {
            url: config.display_url(),
            reason:
                "keyspace must start with a letter and hold only letters, digits and _ (at most 48)"
                    .into(),
        })
    }
}

fn cql_consistency(c: Consistency) -> CqlConsistency {
    match c {
        Consistency::One => CqlConsistency::One,
        Consistency::Quorum => CqlConsistency::Quorum,
        Consistency::LocalQuorum => CqlConsistency::LocalQuorum,
        Consistency::All => CqlConsistency::All,
    }
}

fn target(config: &CqlConfig) -> String {
    config.contact_points.join(",")
}

fn unreachable(config: &CqlConfig, reason: impl Into<String>) -> LedgerError {
    LedgerError::Unreachable {
        target: target(config),
        reason: reason.into(),
    }
}

/// Builds the session with explicit limits, bounded in time as a whole.
async fn open_session(config: &CqlConfig) -> Result<Session> {
    let connect_timeout = Duration::from_millis(config.connect_timeout_ms.max(1));
    let request_timeout = Duration::from_millis(config.request_timeout_ms.max(1));

    let mut policy = DefaultPolicy::builder().token_aware(true);
    if let Some(dc) = &config.datacenter {
        policy = policy
            .prefer_datacenter(dc.clone())
            .permit_dc_failover(false);
    }
    // Retries are ours (counted, with backoff, unknown outcome reported): the driver's own
    // retry policy is turned off so `max_attempts` means what it says.
    let profile = ExecutionProfile::builder()
        .consistency(cql_consistency(config.consistency))
        .request_timeout(Some(request_timeout))
        .retry_policy(Arc::new(FallthroughRetryPolicy::new()))
        .load_balancing_policy(policy.build())
        .build();

    let mut builder = SessionBuilder::new()
        .known_nodes(&config.contact_points)
        .connection_timeout(connect_timeout)
        .hostname_resolution_timeout(Some(connect_timeout))
        .keyspaces_to_fetch([config.keyspace.clone()])
        .schema_agreement_timeout(MIN_DDL_TIMEOUT.max(request_timeout) * 3)
        .default_execution_profile_handle(profile.into_handle());
    if let Some(dc) = &config.datacenter {
        builder = builder.prefer_datacenter(dc.clone());
    }

    // The driver's connection timeout bounds each TCP connect; the outer bound also covers the
    // handshake and the first metadata fetch, so a store that accepts connections but never
    // answers cannot hang us either.
    let bound = connect_timeout + request_timeout.max(Duration::from_secs(2));
    let session = match tokio::time::timeout(bound, builder.build()).await {
        Err(_) => {
            return Err(unreachable(
                config,
                format!("no CQL session within {} ms", bound.as_millis()),
            ))
        }
        Ok(Err(NewSessionError::IllegalConfig(reason))) => {
            return Err(LedgerError::Other(format!(
                "illegal driver configuration for {}: {reason}",
                config.display_url()
            )))
        }
        Ok(Err(e)) => return Err(unreachable(config, e.to_string())),
        Ok(Ok(s)) => s,
    };

    if let Some(dc) = &config.datacenter {
        let state = session.get_cluster_state();
        let known: Vec<String> = state
            .get_nodes_info()
            .iter()
            .filter_map(|n| n.datacenter.clone())
            .collect();
        if !known.iter().any(|d| d == dc) {
            return Err(LedgerError::BadUrl {
                url: config.display_url(),
                reason: format!("datacenter {dc:?} is not in the cluster (known: {known:?})"),
            });
        }
    }
    Ok(session)
}

/// How an error is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ErrorClass {
    /// No connection to any node (pool broken, empty plan, connection lost mid-request).
    Connectivity,
    /// The store answered but could not complete in time (timeouts, unavailable, overloaded):
    /// for a write, an unknown outcome.
    Transient,
    /// The request itself is wrong; retrying cannot help.
    Permanent,
}

fn classify(e: &ExecutionError) -> ErrorClass {
    match e {
        ExecutionError::ConnectionPoolError(_) | ExecutionError::EmptyPlan => {
            ErrorClass::Connectivity
        }
        ExecutionError::RequestTimeout(_)
        | ExecutionError::SchemaAgreementError(_)
        | ExecutionError::MetadataError(_) => ErrorClass::Transient,
        ExecutionError::PrepareError(p) => classify_prepare(p),
        ExecutionError::LastAttemptError(a) => classify_attempt(a),
        _ => ErrorClass::Permanent,
    }
}

fn classify_prepare(e: &PrepareError) -> ErrorClass {
    match e {
        PrepareError::ConnectionPoolError(_) => ErrorClass::Connectivity,
        PrepareError::AllAttemptsFailed { first_attempt } => classify_attempt(first_attempt),
        _ => ErrorClass::Permanent,
    }
}

fn classify_attempt(e: &RequestAttemptError) -> ErrorClass {
    match e {
        RequestAttemptError::BrokenConnectionError(_)
        | RequestAttemptError::UnableToAllocStreamId => ErrorClass::Connectivity,
        RequestAttemptError::DbError(
            DbError::WriteTimeout { .. }
            | DbError::ReadTimeout { .. }
            | DbError::WriteFailure { .. }
            | DbError::ReadFailure { .. }
            | DbError::Unavailable { .. }
            | DbError::Overloaded
            | DbError::IsBootstrapping
            | DbError::TruncateError
            | DbError::ServerError
            | DbError::RateLimitReached { .. },
            _,
        ) => ErrorClass::Transient,
        _ => ErrorClass::Permanent,
    }
}

/// A request that failed for good (after its retries).
#[derive(Debug)]
struct Failure {
    attempts: u32,
    class: ErrorClass,
    error: String,
}

impl Failure {
    /// For writes: a retryable failure is an unknown outcome.
    fn into_write_error(self) -> LedgerError {
        match self.class {
            ErrorClass::Permanent => LedgerError::Rejected(self.error),
            ErrorClass::Connectivity | ErrorClass::Transient => LedgerError::Unknown {
                attempts: self.attempts,
                reason: self.error,
            },
        }
    }

    /// For reads and schema work.
    fn into_read_error(self, config: &CqlConfig) -> LedgerError {
        match self.class {
            ErrorClass::Permanent => LedgerError::Rejected(self.error),
            ErrorClass::Connectivity => unreachable(
                config,
                format!("{} (after {} attempts)", self.error, self.attempts),
            ),
            ErrorClass::Transient => LedgerError::Other(format!(
                "request to {} failed after {} attempts: {}",
                config.display_url(),
                self.attempts,
                self.error
            )),
        }
    }
}

/// Delay before attempt `attempt + 1`: exponential from [`BACKOFF_BASE`], capped, with "equal
/// jitter" (half fixed, half random) so concurrent batches do not retry in lockstep.
fn backoff(attempt: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let ms = exp.min(BACKOFF_CAP).as_millis() as u64;
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Duration::from_millis(ms / 2 + random % (ms / 2 + 1))
}

/// Runs `op` until it succeeds, fails permanently, or `max_attempts` attempts ran.
async fn with_retries<T, F, Fut>(max_attempts: u32, what: &str, mut op: F) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, ExecutionError>>,
{
    let max_attempts = max_attempts.max(1);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                let class = classify(&e);
                if class == ErrorClass::Permanent || attempt >= max_attempts {
                    if class != ErrorClass::Permanent {
                        tracing::warn!(%what, attempt, error = %e, "cql request failed, no attempts left");
                    }
                    return Err(Failure {
                        attempts: attempt,
                        class,
                        error: e.to_string(),
                    });
                }
                let delay = backoff(attempt);
                tracing::warn!(%what, attempt, max_attempts, ?delay, error = %e, "cql request failed, retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Schema creation and statement preparation at connect time.
struct Ddl<'a> {
    session: &'a Session,
    config: &'a CqlConfig,
}

impl Ddl<'_> {
    fn ddl_timeout(&self) -> Duration {
        MIN_DDL_TIMEOUT.max(Duration::from_millis(self.config.request_timeout_ms))
    }

    async fn run(&self, cql: &str) -> Result<()> {
        let mut st = Statement::new(cql);
        st.set_request_timeout(Some(self.ddl_timeout()));
        st.set_is_idempotent(true);
        with_retries(self.config.max_attempts, "schema", || {
            self.session.query_unpaged(st.clone(), ())
        })
        .await
        .map(drop)
        .map_err(|f| f.into_read_error(self.config))
    }

    async fn read_version(&self) -> Result<Option<i32>> {
        let ks = &self.config.keyspace;
        let mut st = Statement::new(format!(
            "SELECT version FROM {ks}.schema_version WHERE component = 'ledger'"
        ));
        st.set_request_timeout(Some(self.ddl_timeout()));
        let result = with_retries(self.config.max_attempts, "schema version", || {
            self.session.query_unpaged(st.clone(), ())
        })
        .await
        .map_err(|f| f.into_read_error(self.config))?;
        let row = result
            .into_rows_result()
            .map_err(other)?
            .maybe_first_row::<(Option<i32>,)>()
            .map_err(other)?;
        Ok(row.and_then(|(v,)| v))
    }

    /// Read-only connect: the schema must exist at a version this build reads; nothing is
    /// created.
    async fn check_schema(&self) -> Result<()> {
        let ks = &self.config.keyspace;
        match self.read_version().await {
            Ok(Some(v)) if v == SCHEMA_VERSION => Ok(()),
            Ok(Some(v)) if v < SCHEMA_VERSION => Err(LedgerError::Rejected(format!(
                "keyspace {ks} at {} has schema version {v}, older than this build's \
                 {SCHEMA_VERSION}; a read-only tool does not upgrade it: run `settlement run \
                 --recover-only` with this store once (it adds the new tables)",
                target(self.config)
            ))),
            Ok(Some(v)) => Err(LedgerError::Rejected(format!(
                "keyspace {ks} at {} has schema version {v}; this build reads version {SCHEMA_VERSION}",
                target(self.config)
            ))),
            Ok(None) | Err(_) => Err(LedgerError::Rejected(format!(
                "keyspace {ks} at {} holds no settlement schema (opened read-only: nothing was created)",
                target(self.config)
            ))),
        }
    }

    async fn ensure_schema(&self) -> Result<()> {
        let ks = &self.config.keyspace;
        let rf = self.config.replication_factor.max(1);
        self.run(&format!(
            "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = \
             {{'class': 'SimpleStrategy', 'replication_factor': {rf}}}"
        ))
        .await?;
        self.run(&format!(
            "CREATE TABLE IF NOT EXISTS {ks}.schema_version (component text PRIMARY KEY, version int)"
        ))
        .await?;
        let stored = self.read_version().await?;
        if let Some(v) = stored {
            if v > SCHEMA_VERSION {
                return Err(LedgerError::Other(format!(
                    "keyspace {ks} at {} has schema version {v}, newer than version \
                     {SCHEMA_VERSION} that this build knows; upgrade settlement-wal (refusing to \
                     write to a schema it does not understand)",
                    target(self.config)
                )));
            }
        }
        self.run(&format!(
            "CREATE TABLE IF NOT EXISTS {ks}.trades (trade_id bigint PRIMARY KEY, \
             output_sequence bigint, symbol text, buyer_user_id bigint, seller_user_id bigint, \
             price bigint, quantity bigint, timestamp_ns bigint, lsn bigint)"
        ))
        .await?;
        self.run(&format!(
            "CREATE TABLE IF NOT EXISTS {ks}.movements (output_sequence bigint PRIMARY KEY, \
             kind text, user_id bigint, asset text, amount bigint, lsn bigint)"
        ))
        .await?;
        self.run(&format!(
            "CREATE TABLE IF NOT EXISTS {ks}.balances (user_id bigint, asset text, \
             amount bigint, last_lsn bigint, PRIMARY KEY ((user_id), asset))"
        ))
        .await?;
        self.run(&format!(
            "CREATE TABLE IF NOT EXISTS {ks}.rejections (output_sequence bigint PRIMARY KEY, \
             reason text, lsn bigint)"
        ))
        .await?;
        self.run(&format!(
            "CREATE TABLE IF NOT EXISTS {ks}.holes (first_sequence bigint PRIMARY KEY, \
             last_sequence bigint, open boolean, lsn bigint)"
        ))
        .await?;
        self.run(&format!(
            "CREATE TABLE IF NOT EXISTS {ks}.high_water (k text PRIMARY KEY, lsn bigint, \
             first_sequence bigint, high_sequence bigint, max_trade_id bigint)"
        ))
        .await?;
        self.run(&format!(
            "CREATE TABLE IF NOT EXISTS {ks}.identity (k text PRIMARY KEY, store_id bigint, \
             wal_id bigint, wal_lsn_base bigint, epoch bigint)"
        ))
        .await?;
        if stored.is_none_or(|v| v < SCHEMA_VERSION) {
            // The write timestamp is the version: concurrent connects of different versions
            // converge on the highest one (last write wins), never on an older one.
            self.run(&format!(
                "INSERT INTO {ks}.schema_version (component, version) VALUES ('ledger', \
                 {SCHEMA_VERSION}) USING TIMESTAMP {SCHEMA_VERSION}"
            ))
            .await?;
        }
        // The driver already waits for agreement after each DDL statement; this makes it
        // explicit (and covers a schema created by another client a moment ago).
        self.session.await_schema_agreement().await.map_err(|e| {
            LedgerError::Other(format!(
                "schema agreement not reached at {}: {e}",
                self.config.display_url()
            ))
        })?;
        Ok(())
    }

    async fn prepare(&self, cql: &str) -> Result<PreparedStatement> {
        let mut st = Statement::new(cql);
        st.set_request_timeout(Some(self.ddl_timeout()));
        let mut prepared = with_retries(self.config.max_attempts, "prepare", || {
            let st = st.clone();
            async move { self.session.prepare(st).await.map_err(ExecutionError::from) }
        })
        .await
        .map_err(|f| f.into_read_error(self.config))?;
        prepared.set_is_idempotent(true);
        prepared.set_consistency(cql_consistency(self.config.consistency));
        Ok(prepared)
    }

    /// A read of the identity row at SERIAL consistency: it sees every lightweight transaction
    /// that completed, so a fence check never reads an epoch older than one already claimed.
    async fn prepare_serial(&self, cql: &str) -> Result<PreparedStatement> {
        let mut prepared = self.prepare(cql).await?;
        prepared.set_consistency(CqlConsistency::Serial);
        Ok(prepared)
    }

    /// A lightweight transaction (Paxos at SERIAL, its commit at the configured consistency).
    /// Not idempotent: a timed-out claim is not retried blindly; the caller reads the identity
    /// and decides.
    async fn prepare_lwt(&self, cql: &str) -> Result<PreparedStatement> {
        let mut prepared = self.prepare(cql).await?;
        prepared.set_is_idempotent(false);
        prepared.set_serial_consistency(Some(SerialConsistency::Serial));
        Ok(prepared)
    }

    async fn prepare_scan(&self, cql: &str) -> Result<PreparedStatement> {
        let mut prepared = self.prepare(cql).await?;
        prepared.set_page_size(SCAN_PAGE_SIZE);
        Ok(prepared)
    }
}

fn other(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Other(e.to_string())
}

fn to_i64(what: &str, v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| {
        LedgerError::Invalid(format!(
            "{what} {v} does not fit the store's bigint (at most {})",
            i64::MAX
        ))
    })
}

fn to_u64(what: &str, v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| LedgerError::Other(format!("stored {what} {v} is negative")))
}

/// Bound values of one data statement; the variant decides which prepared statement it is for.
/// The last value of each is the write timestamp (`USING TIMESTAMP ?`).
#[derive(Clone, Debug)]
enum RowValues {
    Trade((i64, i64, Symbol, i64, i64, i64, i64, i64, i64, i64)),
    Movement((i64, &'static str, i64, Asset, i64, i64, i64)),
    Balance((i64, Asset, i64, i64, i64)),
    Rejection((i64, String, i64, i64)),
    Hole((i64, i64, bool, i64, i64)),
    HighWater((i64, i64, i64, i64, i64)),
}

/// Binds a short name as the `text` value it holds (no `String` per bound value).
impl<const CAP_BYTES: usize> SerializeValue for ShortStr<CAP_BYTES> {
    fn serialize<'b>(
        &self,
        typ: &ColumnType,
        writer: CellWriter<'b>,
    ) -> std::result::Result<WrittenCellProof<'b>, SerializationError> {
        SerializeValue::serialize(&self.as_str(), typ, writer)
    }
}

/// An asset name read from the store, or an error naming the row's field.
fn stored_asset(what: &str, name: &str) -> Result<Asset> {
    Asset::new(name).map_err(|e| LedgerError::Other(format!("stored {what}: {e}")))
}

impl SerializeRow for RowValues {
    fn serialize(
        &self,
        ctx: &RowSerializationContext<'_>,
        writer: &mut RowWriter,
    ) -> std::result::Result<(), SerializationError> {
        match self {
            RowValues::Trade(v) => SerializeRow::serialize(v, ctx, writer),
            RowValues::Movement(v) => SerializeRow::serialize(v, ctx, writer),
            RowValues::Balance(v) => SerializeRow::serialize(v, ctx, writer),
            RowValues::Rejection(v) => SerializeRow::serialize(v, ctx, writer),
            RowValues::Hole(v) => SerializeRow::serialize(v, ctx, writer),
            RowValues::HighWater(v) => SerializeRow::serialize(v, ctx, writer),
        }
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// The write timestamp of a write of entry `lsn` under `epoch`, or an error when the LSN is
/// beyond what a timestamp can carry.
fn timestamp(epoch: u64, lsn: Lsn) -> Result<i64> {
    if lsn > super::MAX_TIMESTAMP_LSN || epoch > MAX_EPOCH {
        return Err(LedgerError::Invalid(format!(
            "LSN {lsn} at epoch {epoch} does not fit a write timestamp (LSNs below 2^40, epochs up to {MAX_EPOCH}); move to a new keyspace"
        )));
    }
    Ok(write_timestamp(epoch, lsn))
}

fn trade_values(t: &TradeRow, epoch: u64) -> Result<RowValues> {
    let ts = timestamp(epoch, t.lsn)?;
    let lsn = to_i64("trade lsn", t.lsn)?;
    Ok(RowValues::Trade((
        to_i64("trade_id", t.trade_id)?,
        to_i64("output_sequence", t.output_sequence)?,
        t.symbol,
        to_i64("buyer_user_id", t.buyer_user_id)?,
        to_i64("seller_user_id", t.seller_user_id)?,
        t.price,
        t.quantity,
        t.timestamp_ns,
        lsn,
        ts,
    )))
}

fn movement_values(m: &MovementRow, epoch: u64) -> Result<RowValues> {
    let ts = timestamp(epoch, m.lsn)?;
    let lsn = to_i64("movement lsn", m.lsn)?;
    Ok(RowValues::Movement((
        to_i64("output_sequence", m.output_sequence)?,
        m.kind.name(),
        to_i64("user_id", m.user_id)?,
        m.asset,
        m.amount,
        lsn,
        ts,
    )))
}

fn balance_values(b: &BalanceWrite, epoch: u64) -> Result<RowValues> {
    let ts = timestamp(epoch, b.lsn)?;
    let lsn = to_i64("balance lsn", b.lsn)?;
    Ok(RowValues::Balance((
        to_i64("user_id", b.key.user_id)?,
        b.key.asset,
        b.amount,
        lsn,
        ts,
    )))
}

fn event_values(row: &EventRow, epoch: u64) -> Result<RowValues> {
    let ts = timestamp(epoch, row.lsn())?;
    let lsn = to_i64("lsn", row.lsn())?;
    Ok(match row {
        EventRow::Trade(t) => trade_values(t, epoch)?,
        EventRow::Movement(m) => movement_values(m, epoch)?,
        EventRow::Rejection(r) => RowValues::Rejection((
            to_i64("output_sequence", r.output_sequence)?,
            r.reason.clone(),
            lsn,
            ts,
        )),
        EventRow::Hole(h) => RowValues::Hole((
            to_i64("first_sequence", h.first_sequence)?,
            to_i64("last_sequence", h.last_sequence)?,
            h.open,
            lsn,
            ts,
        )),
        EventRow::HighWater(hw) => RowValues::HighWater((
            lsn,
            to_i64("first_sequence", hw.first_sequence)?,
            to_i64("high_sequence", hw.high_sequence)?,
            to_i64("max_trade_id", hw.max_trade_id)?,
            ts,
        )),
    })
}

/// Every row write of `entries`, in order: each entry's event row, then its balances, with
/// timestamps of `epoch`.
fn row_values(entries: &[EntryWrites], epoch: u64) -> Result<Vec<RowValues>> {
    let mut rows = Vec::with_capacity(entries.iter().map(EntryWrites::row_count).sum());
    for e in entries {
        if let Some(event) = &e.event {
            rows.push(event_values(event, epoch)?);
        }
        for b in &e.balances {
            rows.push(balance_values(b, epoch)?);
        }
    }
    Ok(rows)
}

/// What Cassandra counts for one cell towards a batch's size (`Cell::dataSize`: write timestamp,
/// TTL and local deletion time), besides the value's bytes. Measured on Cassandra 5.0.9 from the
/// sizes its warnings report (`estimate_covers_what_the_node_counts` in `tests/ledger_cql.rs`
/// checks it on every run): 20 bytes per cell, 50 per row.
const CELL_OVERHEAD_BYTES: usize = 20;
/// What Cassandra counts for one row besides its cells and its clustering value: about 22 bytes
/// for the row (liveness timestamp, row deletion) and 28 for its partition update. The node
/// counts the partition part once per partition in a batch; counting it per statement
/// over-estimates a batch by 28 bytes per further row of a partition, never under-estimates.
const ROW_OVERHEAD_BYTES: usize = 50;
/// A `bigint` value.
const BIGINT_BYTES: usize = 8;

impl RowValues {
    /// See [`estimated_statement_bytes`].
    fn estimated_bytes(&self) -> usize {
        let cells = |n: usize| n * CELL_OVERHEAD_BYTES + ROW_OVERHEAD_BYTES;
        match self {
            // Key trade_id; 8 cells: 7 bigints and the symbol.
            RowValues::Trade(v) => cells(8) + 7 * BIGINT_BYTES + v.2.len(),
            // Key output_sequence; 5 cells: kind, user_id, asset, amount, lsn.
            RowValues::Movement(v) => cells(5) + v.1.len() + 3 * BIGINT_BYTES + v.3.len(),
            // Key user_id, clustering asset (counted); 2 cells: amount, last_lsn.
            RowValues::Balance(v) => cells(2) + v.1.len() + 2 * BIGINT_BYTES,
            // Key output_sequence; 2 cells: reason, lsn.
            RowValues::Rejection(v) => cells(2) + v.1.len() + BIGINT_BYTES,
            // Key first_sequence; 3 cells: last_sequence, open, lsn.
            RowValues::Hole(_) => cells(3) + 2 * BIGINT_BYTES + 1,
            // Key 'ledger'; 4 bigint cells.
            RowValues::HighWater(_) => cells(4) + 4 * BIGINT_BYTES + 6,
        }
    }
}

/// The table of an event row.
#[derive(Clone, Copy, Debug)]
enum EventTable {
    Trades,
    Movements,
}

/// Sorts `bigint` partition keys by their Murmur3 token (the default partitioner of Cassandra
/// and ScyllaDB), without duplicates: neighbours then mostly belong to the same token range,
/// so an `IN` query of consecutive keys asks few replicas instead of every node. Only an
/// ordering: with another partitioner the queries are as correct, just less local.
fn sort_by_token(ids: &mut Vec<i64>) {
    ids.sort_unstable();
    ids.dedup();
    ids.sort_by_cached_key(|id| Murmur3Partitioner.hash_one(&id.to_be_bytes()).value());
}

/// Estimated size of each statement `apply` sends for `entries`, in their order, in bytes as
/// Cassandra counts a batch for `batch_size_warn_threshold` (the data size of the rows: cell
/// values plus per-cell and per-row overhead; not the bytes on the wire). An overestimate by a
/// few bytes per statement; `tests/ledger_cql.rs` checks it against the sizes the node reports.
pub fn estimated_statement_bytes(entries: &[EntryWrites]) -> Result<Vec<usize>> {
    Ok(row_values(entries, 0)?
        .iter()
        .map(RowValues::estimated_bytes)
        .collect())
}

/// How [`Ledger::apply`] splits `entries` into UNLOGGED batches under `config`'s limits
/// (`batch_statements`, `batch_bytes`), without sending anything.
pub fn plan_batches(entries: &[EntryWrites], config: &CqlConfig) -> Result<Vec<BatchShape>> {
    let rows = row_values(entries, 0)?;
    Ok(split_batches(
        rows,
        config.max_statements_per_batch,
        config.max_batch_bytes,
    )
    .iter()
    .map(|batch| BatchShape {
        statements: batch.len(),
        estimated_bytes: batch.iter().map(RowValues::estimated_bytes).sum(),
    })
    .collect())
}

/// Splits row writes, keeping their order, into batches of at most `max_statements` statements
/// and at most `max_bytes` estimated bytes: a batch ends before the statement that would take it
/// over either limit. A statement larger than `max_bytes` on its own goes alone.
fn split_batches(
    rows: Vec<RowValues>,
    max_statements: usize,
    max_bytes: usize,
) -> Vec<Vec<RowValues>> {
    let max_statements = max_statements.max(1);
    let mut batches = Vec::new();
    let mut current: Vec<RowValues> = Vec::new();
    let mut current_bytes = 0usize;
    for row in rows {
        let bytes = row.estimated_bytes();
        if !current.is_empty()
            && (current.len() >= max_statements || current_bytes + bytes > max_bytes)
        {
            batches.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current_bytes += bytes;
        current.push(row);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// The batch size a store's size warning reports, in bytes: Cassandra 4.1+ writes
/// `Batch for [ks.trades] is of size 5.349KiB, exceeding specified threshold of 5.000KiB by
/// 357B.`, older versions and ScyllaDB a plain number of bytes. `None` when there is no size.
fn reported_batch_bytes(warning: &str) -> Option<u64> {
    let rest = &warning[warning.find("of size ")? + "of size ".len()..];
    // Digits, a decimal point, and commas between digits (thousands separators; a comma after
    // the number ends the clause).
    let bytes = rest.as_bytes();
    let mut number_len = 0;
    while number_len < bytes.len() {
        let c = bytes[number_len];
        let separator = c == b','
            && number_len > 0
            && bytes.get(number_len + 1).is_some_and(u8::is_ascii_digit);
        if !(c.is_ascii_digit() || c == b'.' || separator) {
            break;
        }
        number_len += 1;
    }
    let number: f64 = rest[..number_len].replace(',', "").parse().ok()?;
    let unit: String = rest[number_len..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect();
    let scale = match unit.as_str() {
        "" | "B" | "bytes" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((number * scale).round() as u64)
}

impl Inner {
    fn statement_for(&self, row: &RowValues) -> &PreparedStatement {
        match row {
            RowValues::Trade(_) => &self.insert_trade,
            RowValues::Movement(_) => &self.insert_movement,
            RowValues::Balance(_) => &self.insert_balance,
            RowValues::Rejection(_) => &self.insert_rejection,
            RowValues::Hole(_) => &self.insert_hole,
            RowValues::HighWater(_) => &self.insert_high_water,
        }
    }

    /// One UNLOGGED batch, retried while its outcome is unknown.
    async fn execute_batch(&self, rows: Vec<RowValues>) -> Result<()> {
        let mut batch = Batch::new(BatchType::Unlogged);
        for row in &rows {
            batch.append_statement(self.statement_for(row).clone());
        }
        batch.set_consistency(cql_consistency(self.config.consistency));
        batch.set_is_idempotent(true);
        let result = with_retries(self.config.max_attempts, "apply batch", || {
            self.session.batch(&batch, &rows)
        })
        .await
        .map_err(Failure::into_write_error)?;
        for warning in result.warnings() {
            // A size warning means `batch_bytes` is above the store's threshold (or the estimate
            // is off for these rows); the "unlogged batch covering N partitions" advisory is
            // expected (that is the design).
            if warning.contains("exceeding") {
                let seen = self.size_warnings.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(bytes) = reported_batch_bytes(warning) {
                    self.largest_warned_bytes
                        .fetch_max(bytes, Ordering::Relaxed);
                }
                metrics::counter!("settlement_store_batch_size_warnings_total").increment(1);
                let estimated_bytes: usize = rows.iter().map(RowValues::estimated_bytes).sum();
                // Logged at the 1st, 2nd, 4th, 8th... occurrence, not once per batch: with
                // batch_bytes raised on purpose every batch warns. The metric counts them all.
                if seen.is_power_of_two() {
                    tracing::warn!(store = %self.config.display_url(), %warning, statements = rows.len(), estimated_bytes, warnings_so_far = seen, "store warned about a batch's size (logged at the 1st, 2nd, 4th, ... occurrence; settlement_store_batch_size_warnings_total counts all)");
                } else {
                    tracing::debug!(store = %self.config.display_url(), %warning, statements = rows.len(), estimated_bytes, "store warned about a batch's size");
                }
            } else {
                tracing::debug!(store = %self.config.display_url(), %warning, "store warning");
            }
        }
        Ok(())
    }

    async fn read<V: SerializeRow>(
        &self,
        what: &str,
        statement: &PreparedStatement,
        values: V,
    ) -> Result<QueryResult> {
        with_retries(self.config.max_attempts, what, || {
            self.session.execute_unpaged(statement, &values)
        })
        .await
        .map_err(|f| f.into_read_error(&self.config))
    }

    async fn read_lsn(
        &self,
        what: &str,
        statement: &PreparedStatement,
        key: u64,
    ) -> Result<Option<Lsn>> {
        let key = to_i64(what, key)?;
        let result = self.read(what, statement, (key,)).await?;
        let row = result
            .into_rows_result()
            .map_err(other)?
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(other)?;
        match row {
            None => Ok(None),
            Some((None,)) => Err(LedgerError::Other(format!("{what} {key}: row without lsn"))),
            Some((Some(lsn),)) => Ok(Some(to_u64("lsn", lsn)?)),
        }
    }

    /// The LSN of one event row.
    async fn event_lsn(&self, key: EventKey) -> Result<Option<Lsn>> {
        match key {
            EventKey::Trade(id) => self.read_lsn("trade_id", &self.select_trade_lsn, id).await,
            EventKey::Movement(seq) => {
                self.read_lsn("output_sequence", &self.select_movement_lsn, seq)
                    .await
            }
            EventKey::Rejection(seq) => {
                self.read_lsn("rejection", &self.select_rejection_lsn, seq)
                    .await
            }
            EventKey::Hole(seq) => self.read_lsn("hole", &self.select_hole_lsn, seq).await,
            EventKey::HighWater => Ok(self.high_water().await?.map(|h| h.lsn)),
        }
    }

    /// The single row of a one-row table (`high_water`, `identity`): four bigints.
    async fn read_four(
        &self,
        what: &str,
        statement: &PreparedStatement,
    ) -> Result<Option<(i64, i64, i64, i64)>> {
        self.read(what, statement, ())
            .await?
            .into_rows_result()
            .map_err(other)?
            .maybe_first_row::<(i64, i64, i64, i64)>()
            .map_err(other)
    }

    async fn high_water(&self) -> Result<Option<HighWaterRow>> {
        let row = self
            .read_four("read high-water", &self.select_high_water)
            .await?;
        row.map(|(lsn, first, high, max_trade_id)| {
            Ok(HighWaterRow {
                lsn: to_u64("high-water lsn", lsn)?,
                first_sequence: to_u64("first_sequence", first)?,
                high_sequence: to_u64("high_sequence", high)?,
                max_trade_id: to_u64("max_trade_id", max_trade_id)?,
            })
        })
        .transpose()
    }

    async fn identity(&self) -> Result<Option<StoreIdentity>> {
        let row = self
            .read_four("read identity", &self.select_identity)
            .await?;
        row.map(|(store_id, wal_id, base, epoch)| {
            Ok(StoreIdentity {
                store_id: store_id as u64,
                wal_id: wal_id as u64,
                wal_lsn_base: to_u64("wal_lsn_base", base)?,
                epoch: to_u64("epoch", epoch)?,
            })
        })
        .transpose()
    }

    /// The trade rows' output sequences among `ids` (one `IN` query).
    async fn read_trade_sequences(&self, ids: Vec<i64>) -> Result<Vec<(u64, u64)>> {
        let result = self
            .read("read trade sequences", &self.select_trade_sequences, (ids,))
            .await?;
        let rows = result.into_rows_result().map_err(other)?;
        let mut out = Vec::with_capacity(rows.rows_num());
        for row in rows.rows::<(i64, Option<i64>)>().map_err(other)? {
            let (id, seq) = row.map_err(other)?;
            let Some(seq) = seq else {
                return Err(LedgerError::Other(format!(
                    "trade {id}: row without output_sequence"
                )));
            };
            out.push((to_u64("trade_id", id)?, to_u64("output_sequence", seq)?));
        }
        Ok(out)
    }

    /// The LSNs of the event rows of one table among `ids` (one `IN` query; rows that do not
    /// exist are not in the answer).
    async fn read_lsns(&self, kind: EventTable, ids: Vec<i64>) -> Result<Vec<(EventKey, Lsn)>> {
        let (what, statement) = match kind {
            EventTable::Trades => ("read trade lsns", &self.select_trade_lsns),
            EventTable::Movements => ("read movement lsns", &self.select_movement_lsns),
        };
        let result = self.read(what, statement, (ids,)).await?;
        let rows = result.into_rows_result().map_err(other)?;
        let mut out = Vec::with_capacity(rows.rows_num());
        for row in rows.rows::<(i64, Option<i64>)>().map_err(other)? {
            let (id, lsn) = row.map_err(other)?;
            let id = to_u64("event key", id)?;
            let key = match kind {
                EventTable::Trades => EventKey::Trade(id),
                EventTable::Movements => EventKey::Movement(id),
            };
            let Some(lsn) = lsn else {
                return Err(LedgerError::Other(format!("{key}: row without lsn")));
            };
            out.push((key, to_u64("lsn", lsn)?));
        }
        Ok(out)
    }

    /// Reads the rows of one user's partition for `assets`.
    async fn read_user_balances(
        &self,
        user: u64,
        assets: Vec<Asset>,
    ) -> Result<Vec<(Asset, BalanceRow)>> {
        let uid = to_i64("user_id", user)?;
        let result = self
            .read("read balances", &self.select_balances, (uid, assets))
            .await?;
        let rows = result.into_rows_result().map_err(other)?;
        let mut out = Vec::new();
        for row in rows.rows::<(String, i64, i64)>().map_err(other)? {
            let (asset, amount, last_lsn) = row.map_err(other)?;
            out.push((
                stored_asset("balance asset", &asset)?,
                BalanceRow {
                    amount,
                    last_lsn: to_u64("last_lsn", last_lsn)?,
                },
            ));
        }
        Ok(out)
    }

    /// A full-table scan, page by page; each page is retried on its own.
    async fn scan<R, T>(
        &self,
        what: &str,
        statement: &PreparedStatement,
        mut convert: impl FnMut(R) -> Result<T>,
    ) -> Result<Vec<T>>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
    {
        let mut out = Vec::new();
        let mut paging = PagingState::start();
        loop {
            let (result, next) = with_retries(self.config.max_attempts, what, || {
                self.session
                    .execute_single_page(statement, (), paging.clone())
            })
            .await
            .map_err(|f| f.into_read_error(&self.config))?;
            let rows = result.into_rows_result().map_err(other)?;
            for row in rows.rows::<R>().map_err(other)? {
                out.push(convert(row.map_err(other)?)?);
            }
            match next {
                PagingStateResponse::HasMorePages { state } => paging = state,
                PagingStateResponse::NoMorePages => return Ok(out),
            }
        }
    }
}

#[async_trait::async_trait]
impl Ledger for CqlLedger {
    async fn apply(&self, entries: &[EntryWrites]) -> Result<()> {
        validate_entries(entries)?;
        if self.inner.config.read_only {
            return Err(LedgerError::Rejected(format!(
                "{} was opened read-only; nothing is written",
                self.inner.config.display_url()
            )));
        }
        let rows = row_values(entries, self.inner.epoch.load(Ordering::Acquire))?;
        if rows.is_empty() {
            return Ok(());
        }
        let config = &self.inner.config;
        let inflight = config.max_inflight_batches.max(1);
        let mut chunks = split_batches(
            rows,
            config.max_statements_per_batch,
            config.max_batch_bytes,
        );
        if chunks.len() == 1 {
            let chunk = chunks.pop().expect("one batch");
            return self.inner.execute_batch(chunk).await;
        }
        let mut chunks = chunks.into_iter();
        let mut running = JoinSet::new();
        let mut first_error: Option<LedgerError> = None;
        loop {
            // Keep up to `inflight` batches executing; after an error start no new ones.
            while first_error.is_none() && running.len() < inflight {
                let Some(chunk) = chunks.next() else { break };
                let inner = Arc::clone(&self.inner);
                running.spawn(async move { inner.execute_batch(chunk).await });
            }
            // Wait for every started batch, even after an error, so nothing of this call is
            // still being retried when it returns.
            match running.join_next().await {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    first_error.get_or_insert(e);
                }
                Some(Err(join)) => {
                    first_error
                        .get_or_insert(LedgerError::Other(format!("a batch task failed: {join}")));
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    async fn trade_lsn(&self, trade_id: u64) -> Result<Option<Lsn>> {
        self.inner.event_lsn(EventKey::Trade(trade_id)).await
    }

    async fn movement_lsn(&self, output_sequence: u64) -> Result<Option<Lsn>> {
        self.inner
            .event_lsn(EventKey::Movement(output_sequence))
            .await
    }

    /// `IN` queries of at most `keys_per_read` keys of one table, the keys in token order (so
    /// that one query's keys mostly share their replicas), at most `inflight_reads` queries in
    /// flight; with `keys_per_read=1`, one token-aware single-partition read per key. The first
    /// error ends the call (reads still in flight are dropped: a read changes nothing).
    async fn event_lsns(&self, keys: &[EventKey]) -> Result<Vec<Option<Lsn>>> {
        validate_lookup(keys)?;
        let inner = &*self.inner;
        let inflight = inner.config.max_inflight_reads.max(1);
        let per_query = inner.config.max_keys_per_read.max(1);
        if per_query == 1 {
            return stream::iter(keys.iter().copied())
                .map(|key| inner.event_lsn(key))
                .buffered(inflight)
                .try_collect()
                .await;
        }
        let mut trades = Vec::new();
        let mut movements = Vec::new();
        let mut others = Vec::new();
        for key in keys {
            match *key {
                EventKey::Trade(id) => trades.push(to_i64("trade_id", id)?),
                EventKey::Movement(seq) => movements.push(to_i64("output_sequence", seq)?),
                // Rejections, holes and the high-water row: few, one read each.
                other => others.push(other),
            }
        }
        sort_by_token(&mut trades);
        sort_by_token(&mut movements);
        let mut queries: Vec<(EventTable, Vec<i64>)> = Vec::new();
        for (table, ids) in [
            (EventTable::Trades, &trades),
            (EventTable::Movements, &movements),
        ] {
            queries.extend(ids.chunks(per_query).map(|c| (table, c.to_vec())));
        }
        let mut found: HashMap<EventKey, Lsn> = stream::iter(queries)
            .map(|(table, ids)| inner.read_lsns(table, ids))
            .buffer_unordered(inflight)
            .try_fold(
                HashMap::with_capacity(keys.len()),
                |mut found, rows| async move {
                    found.extend(rows);
                    Ok(found)
                },
            )
            .await?;
        let other_lsns: Vec<Option<Lsn>> = stream::iter(others.iter().copied())
            .map(|key| inner.event_lsn(key))
            .buffered(inflight)
            .try_collect()
            .await?;
        for (key, lsn) in others.into_iter().zip(other_lsns) {
            if let Some(lsn) = lsn {
                found.insert(key, lsn);
            }
        }
        Ok(keys.iter().map(|k| found.get(k).copied()).collect())
    }

    async fn read_balances(&self, keys: &[BalanceKey]) -> Result<Vec<Option<BalanceRow>>> {
        // One query per user partition (`asset IN ?`), at most `inflight_reads` in flight.
        let mut by_user: std::collections::BTreeMap<u64, Vec<Asset>> = Default::default();
        for k in keys {
            let assets = by_user.entry(k.user_id).or_default();
            if !assets.contains(&k.asset) {
                assets.push(k.asset);
            }
        }
        let mut found: HashMap<BalanceKey, BalanceRow> = Default::default();
        let inflight = self.inner.config.max_inflight_reads.max(1);
        let mut users = by_user.into_iter();
        let mut running = JoinSet::new();
        let mut first_error: Option<LedgerError> = None;
        loop {
            while first_error.is_none() && running.len() < inflight {
                let Some((user, assets)) = users.next() else {
                    break;
                };
                let inner = Arc::clone(&self.inner);
                running.spawn(async move {
                    inner
                        .read_user_balances(user, assets)
                        .await
                        .map(|rows| (user, rows))
                });
            }
            match running.join_next().await {
                None => break,
                Some(Ok(Ok((user, rows)))) => {
                    for (asset, row) in rows {
                        found.insert(
                            BalanceKey {
                                user_id: user,
                                asset,
                            },
                            row,
                        );
                    }
                }
                Some(Ok(Err(e))) => {
                    first_error.get_or_insert(e);
                }
                Some(Err(join)) => {
                    first_error
                        .get_or_insert(LedgerError::Other(format!("a read task failed: {join}")));
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        Ok(keys.iter().map(|k| found.get(k).copied()).collect())
    }

    async fn scan_balances(&self) -> Result<Vec<(BalanceKey, BalanceRow)>> {
        self.inner
            .scan(
                "scan balances",
                &self.inner.scan_balances,
                |(user_id, asset, amount, last_lsn): (i64, String, i64, i64)| {
                    Ok((
                        BalanceKey {
                            user_id: to_u64("user_id", user_id)?,
                            asset: stored_asset("balance asset", &asset)?,
                        },
                        BalanceRow {
                            amount,
                            last_lsn: to_u64("last_lsn", last_lsn)?,
                        },
                    ))
                },
            )
            .await
    }

    async fn scan_trades(&self) -> Result<Vec<TradeRow>> {
        type Row = (i64, i64, String, i64, i64, i64, i64, i64, i64);
        self.inner
            .scan("scan trades", &self.inner.scan_trades, |r: Row| {
                Ok(TradeRow {
                    trade_id: to_u64("trade_id", r.0)?,
                    output_sequence: to_u64("output_sequence", r.1)?,
                    symbol: Symbol::new(&r.2).map_err(|e| {
                        LedgerError::Other(format!("stored trade {} symbol: {e}", r.0))
                    })?,
                    buyer_user_id: to_u64("buyer_user_id", r.3)?,
                    seller_user_id: to_u64("seller_user_id", r.4)?,
                    price: r.5,
                    quantity: r.6,
                    timestamp_ns: r.7,
                    lsn: to_u64("lsn", r.8)?,
                })
            })
            .await
    }

    async fn scan_movements(&self) -> Result<Vec<MovementRow>> {
        type Row = (i64, String, i64, String, i64, i64);
        self.inner
            .scan("scan movements", &self.inner.scan_movements, |r: Row| {
                let kind = MovementKind::from_name(&r.1).ok_or_else(|| {
                    LedgerError::Other(format!("movement {} has unknown kind {:?}", r.0, r.1))
                })?;
                Ok(MovementRow {
                    output_sequence: to_u64("output_sequence", r.0)?,
                    kind,
                    user_id: to_u64("user_id", r.2)?,
                    asset: stored_asset("movement asset", &r.3)?,
                    amount: r.4,
                    lsn: to_u64("lsn", r.5)?,
                })
            })
            .await
    }

    async fn scan_rejections(&self) -> Result<Vec<RejectionRow>> {
        self.inner
            .scan(
                "scan rejections",
                &self.inner.scan_rejections,
                |(seq, reason, lsn): (i64, Option<String>, i64)| {
                    Ok(RejectionRow {
                        output_sequence: to_u64("output_sequence", seq)?,
                        reason: reason.unwrap_or_default(),
                        lsn: to_u64("lsn", lsn)?,
                    })
                },
            )
            .await
    }

    async fn open_holes(&self) -> Result<Vec<HoleRow>> {
        let all = self
            .inner
            .scan(
                "scan holes",
                &self.inner.scan_holes,
                |(first, last, open, lsn): (i64, i64, bool, i64)| {
                    Ok(HoleRow {
                        first_sequence: to_u64("first_sequence", first)?,
                        last_sequence: to_u64("last_sequence", last)?,
                        open,
                        lsn: to_u64("lsn", lsn)?,
                    })
                },
            )
            .await?;
        let mut open: Vec<HoleRow> = all.into_iter().filter(|h| h.open).collect();
        if open.len() > MAX_OPEN_HOLES {
            return Err(LedgerError::Invalid(format!(
                "{} holds {} open holes, more than {MAX_OPEN_HOLES}; list them with `settlement holes` and fill them from the engine's journal",
                self.inner.config.display_url(),
                open.len()
            )));
        }
        open.sort_by_key(|h| h.first_sequence);
        Ok(open)
    }

    async fn high_water(&self) -> Result<Option<HighWaterRow>> {
        self.inner.high_water().await
    }

    async fn trade_sequences(&self, ids: &[u64]) -> Result<Vec<Option<u64>>> {
        validate_lookup_count("trade", ids.len())?;
        let inner = &*self.inner;
        let mut keys: Vec<i64> = ids
            .iter()
            .map(|&id| to_i64("trade_id", id))
            .collect::<Result<_>>()?;
        sort_by_token(&mut keys);
        let per_query = inner.config.max_keys_per_read.max(1);
        let found: HashMap<u64, u64> = stream::iter(keys.chunks(per_query).map(<[i64]>::to_vec))
            .map(|chunk| inner.read_trade_sequences(chunk))
            .buffer_unordered(inner.config.max_inflight_reads.max(1))
            .try_fold(HashMap::new(), |mut found, rows| async move {
                found.extend(rows);
                Ok(found)
            })
            .await?;
        Ok(ids.iter().map(|id| found.get(id).copied()).collect())
    }

    async fn identity(&self) -> Result<Option<StoreIdentity>> {
        self.inner.identity().await
    }

    /// A lightweight transaction: `INSERT ... IF NOT EXISTS` for the first identity, `UPDATE
    /// ... IF epoch = ?` after it. A timeout is an unknown outcome: the identity is read back
    /// (at SERIAL) and the claim counts as won only if the store now holds exactly `new`.
    async fn claim(&self, expected_epoch: Option<u64>, new: StoreIdentity) -> Result<Claim> {
        if self.inner.config.read_only {
            return Err(LedgerError::Rejected(format!(
                "{} was opened read-only; nothing is written",
                self.inner.config.display_url()
            )));
        }
        let inner = &*self.inner;
        let store_id = new.store_id as i64;
        let wal_id = new.wal_id as i64;
        let base = to_i64("wal_lsn_base", new.wal_lsn_base)?;
        let epoch = to_i64("epoch", new.epoch)?;
        let outcome = match expected_epoch {
            None => {
                inner
                    .session
                    .execute_unpaged(&inner.claim_new, (store_id, wal_id, base, epoch))
                    .await
            }
            Some(expected) => {
                let expected = to_i64("epoch", expected)?;
                inner
                    .session
                    .execute_unpaged(&inner.claim_next, (store_id, wal_id, base, epoch, expected))
                    .await
            }
        };
        let applied = match outcome {
            Ok(result) => {
                let rows = result.into_rows_result().map_err(other)?;
                let first = rows
                    .maybe_first_row::<UntypedRow>()
                    .map_err(other)?
                    .and_then(|r| r.columns.into_iter().next().flatten());
                match first {
                    Some(CqlValue::Boolean(applied)) => Some(applied),
                    other => {
                        return Err(LedgerError::Other(format!(
                            "the identity claim's answer has no [applied] column (got {other:?})"
                        )))
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "identity claim: outcome unknown, reading the identity back");
                None
            }
        };
        let current = inner.identity().await?;
        match applied {
            Some(true) => Ok(Claim::Won),
            Some(false) => Ok(Claim::Lost(current)),
            None if current == Some(new) => Ok(Claim::Won),
            None => Ok(Claim::Lost(current)),
        }
    }

    fn set_write_epoch(&self, epoch: u64) {
        assert!(epoch <= MAX_EPOCH, "epoch {epoch} above {MAX_EPOCH}");
        self.inner.epoch.store(epoch, Ordering::Release);
    }

    fn describe(&self) -> String {
        self.inner.config.display_url()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u64_values_that_do_not_fit_are_invalid_not_a_panic() {
        let mut e = crate::ledger::conformance::deposit_entry(1, 2, 3, "BTC", 5, 5);
        assert!(row_values(std::slice::from_ref(&e), 0).is_ok());
        e.balances[0].key.user_id = u64::MAX;
        let err = row_values(&[e.clone()], 0).unwrap_err();
        assert!(matches!(err, LedgerError::Invalid(_)), "{err}");
        e.balances[0].key.user_id = 3;
        e.balances[0].lsn = 1 << 63;
        assert!(matches!(
            row_values(&[e], 0).unwrap_err(),
            LedgerError::Invalid(_)
        ));
    }

    #[test]
    fn every_statement_carries_its_epoch_and_lsn_as_timestamp() {
        let e = crate::ledger::conformance::trade_entry(42, 7, 1, 2, [1, -1, -1, 1]);
        for epoch in [0, 3, MAX_EPOCH] {
            let ts = (epoch << 40 | 42) as i64;
            for row in row_values(std::slice::from_ref(&e), epoch).unwrap() {
                match row {
                    RowValues::Trade(v) => assert_eq!((v.8, v.9), (42, ts)),
                    RowValues::Balance(v) => assert_eq!((v.3, v.4), (42, ts)),
                    other => unreachable!("{other:?}"),
                }
            }
        }
        // A fenced writer's newest write loses to the new writer's oldest (P8), and every
        // timestamp stays below wall-clock microseconds (1.69e15 is July 2023).
        assert!(write_timestamp(4, super::super::MAX_TIMESTAMP_LSN) < write_timestamp(5, 1));
        assert!(
            write_timestamp(MAX_EPOCH, super::super::MAX_TIMESTAMP_LSN) < 1_690_000_000_000_000
        );
        let hw = EntryWrites {
            lsn: 1 << 41,
            event: Some(EventRow::HighWater(HighWaterRow {
                lsn: 1 << 41,
                first_sequence: 1,
                high_sequence: 2,
                max_trade_id: 3,
            })),
            balances: Vec::new(),
        };
        assert!(matches!(
            row_values(&[hw], 1).unwrap_err(),
            LedgerError::Invalid(_)
        ));
    }

    /// Row writes in the pipeline's order: 1000 trades' event rows, then their balance rows.
    fn pipeline_rows() -> Vec<RowValues> {
        let entries: Vec<EntryWrites> = (0..1000u64)
            .map(|i| {
                crate::ledger::conformance::trade_entry(
                    i + 1,
                    i + 1,
                    i % 97,
                    100 + i % 89,
                    [1, -1, -1, 1],
                )
            })
            .collect();
        let writes = crate::ledger::coalesce(entries);
        assert!(writes[..1000].iter().all(|w| w.balances.is_empty()));
        row_values(&writes, 0).unwrap()
    }

    fn kinds(rows: &[RowValues]) -> Vec<u8> {
        rows.iter()
            .map(|r| match r {
                RowValues::Trade(_) => 0,
                RowValues::Movement(_) => 1,
                RowValues::Balance(_) => 2,
                _ => 3,
            })
            .collect()
    }

    #[test]
    fn batches_are_split_by_bytes_as_well_as_by_statements() {
        let rows = pipeline_rows();
        let all = kinds(&rows);
        let trade_bytes = rows[0].estimated_bytes();
        for (max_statements, max_bytes) in [(20, 4096), (20, 5120), (1000, 4096), (5, 100_000)] {
            let batches = split_batches(rows.clone(), max_statements, max_bytes);
            // Nothing lost, nothing reordered.
            let flat: Vec<RowValues> = batches.iter().flatten().cloned().collect();
            assert_eq!(kinds(&flat), all);
            for b in &batches {
                let bytes: usize = b.iter().map(RowValues::estimated_bytes).sum();
                assert!(!b.is_empty());
                assert!(b.len() <= max_statements, "{} statements", b.len());
                assert!(bytes <= max_bytes, "{bytes} bytes > {max_bytes}");
            }
            // Batches are full: the next statement would not have fitted.
            for pair in batches.windows(2) {
                let bytes: usize = pair[0].iter().map(RowValues::estimated_bytes).sum();
                assert!(
                    pair[0].len() == max_statements
                        || bytes + pair[1][0].estimated_bytes() > max_bytes
                );
            }
        }
        // The finding: 20 trade rows are over 5 KiB; with the default 4 KiB a batch of trade
        // rows holds what fits.
        assert!(20 * trade_bytes > 5 * 1024, "{trade_bytes}");
        let batches = split_batches(rows, 20, crate::ledger::DEFAULT_MAX_BATCH_BYTES);
        assert_eq!(batches[0].len(), 4096 / trade_bytes);
    }

    #[test]
    fn a_statement_above_the_byte_limit_goes_alone() {
        let rows = pipeline_rows();
        let trade_bytes = rows[0].estimated_bytes();
        let balance_bytes = rows.last().unwrap().estimated_bytes();
        assert!(balance_bytes < trade_bytes);
        // Trades are above the limit, balances below it.
        let batches = split_batches(rows.clone(), 20, trade_bytes - 1);
        for b in &batches {
            let bytes: usize = b.iter().map(RowValues::estimated_bytes).sum();
            assert!(
                b.len() == 1 || bytes < trade_bytes,
                "{} statements, {bytes} bytes",
                b.len()
            );
        }
        assert_eq!(batches.iter().filter(|b| b.len() == 1).count(), 1000);
        // A limit of one byte: one statement per batch.
        assert_eq!(split_batches(rows.clone(), 20, 1).len(), rows.len());
        assert!(split_batches(Vec::new(), 20, 4096).is_empty());
    }

    #[test]
    fn plan_batches_follows_the_config() {
        let entries: Vec<EntryWrites> = (0..100u64)
            .map(|i| crate::ledger::conformance::trade_entry(i + 1, i + 1, 1, 2, [1, -1, -1, 1]))
            .collect();
        let writes = crate::ledger::coalesce(entries);
        let mut config = CqlConfig::new(vec!["127.0.0.1:9042".into()], "ks");
        let shapes = plan_batches(&writes, &config).unwrap();
        assert_eq!(shapes.iter().map(|s| s.statements).sum::<usize>(), 104);
        assert!(shapes.iter().all(|s| s.estimated_bytes <= 4096));
        config.max_batch_bytes = crate::ledger::MAX_BATCH_BYTES_LIMIT;
        config.max_statements_per_batch = 1000;
        assert_eq!(plan_batches(&writes, &config).unwrap().len(), 1);
    }

    #[test]
    fn lookup_keys_are_deduplicated_and_ordered_by_token() {
        let mut ids: Vec<i64> = (0..500).chain(0..100).rev().collect();
        sort_by_token(&mut ids);
        assert_eq!(ids.len(), 500);
        let tokens: Vec<i64> = ids
            .iter()
            .map(|id| Murmur3Partitioner.hash_one(&id.to_be_bytes()).value())
            .collect();
        assert!(tokens.windows(2).all(|w| w[0] <= w[1]));
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..500).collect::<Vec<i64>>());
    }

    #[test]
    fn batch_sizes_are_read_from_store_warnings() {
        for (warning, bytes) in [
            (
                "Batch for [ks.trades] is of size 5.349KiB, exceeding specified threshold of \
                 5.000KiB by 357B.",
                Some(5477),
            ),
            (
                "Batch for [ks.trades, ks.balances] is of size 8220, exceeding specified \
                 threshold of 5120 by 3100.",
                Some(8220),
            ),
            (
                "Batch for [ks.trades] is of size 12,345, exceeding specified threshold of \
                 5,120 by 7,225.",
                Some(12_345),
            ),
            ("Batch of size 1.5MiB, exceeding", Some(1_572_864)),
            ("Unlogged batch covering 30 partitions detected", None),
            ("of size lots, exceeding", None),
            ("of size 12 furlongs", None),
        ] {
            assert_eq!(reported_batch_bytes(warning), bytes, "{warning}");
        }
    }

    #[test]
    fn backoff_is_bounded_and_grows() {
        for attempt in 1..40 {
            let d = backoff(attempt);
            assert!(d <= BACKOFF_CAP, "{attempt}: {d:?}");
            assert!(d >= BACKOFF_BASE / 2, "{attempt}: {d:?}");
        }
        assert!(backoff(10) >= BACKOFF_CAP / 2);
    }

    #[test]
    fn timeouts_and_lost_connections_are_retried_bad_requests_are_not() {
        use scylla::errors::WriteType;
        use scylla::statement::Consistency as C;
        let wt = ExecutionError::LastAttemptError(RequestAttemptError::DbError(
            DbError::WriteTimeout {
                consistency: C::One,
                received: 0,
                required: 1,
                write_type: WriteType::UnloggedBatch,
            },
            "timeout".into(),
        ));
        assert_eq!(classify(&wt), ErrorClass::Transient);
        assert_eq!(
            classify(&ExecutionError::RequestTimeout(Duration::from_secs(1))),
            ErrorClass::Transient
        );
        assert_eq!(
            classify(&ExecutionError::EmptyPlan),
            ErrorClass::Connectivity
        );
        let invalid = ExecutionError::LastAttemptError(RequestAttemptError::DbError(
            DbError::Invalid,
            "bad".into(),
        ));
        assert_eq!(classify(&invalid), ErrorClass::Permanent);
    }
}
