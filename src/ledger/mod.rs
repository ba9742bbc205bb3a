//! Ledger stores: where settled trades and balances live.
//!
//! The [`Ledger`] trait is what the settlement pipeline and recovery need from a store; it has
//! two real implementations: [`cql::CqlLedger`] (ScyllaDB/Cassandra through the scylla driver)
//! and [`embedded::EmbeddedLedger`] (redb, the default that needs no server).
//!
//! The idempotency rule every implementation keeps (promise P4): each row carries the LSN of the
//! WAL entry that last wrote it, and a write with a lower LSN than the row's never overwrites it.
//! Cassandra/Scylla get that from client timestamps derived from the LSN (last write wins); the
//! embedded store checks it explicitly. So replaying an entry, or applying entries out of order,
//! always leaves the newest entry's values.

pub mod conformance;
pub mod cql;
pub mod embedded;
mod name;
pub mod sim;
mod url;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use name::{Asset, NameTooLong, ShortStr, Symbol, MAX_SYMBOL_LEN_BYTES};
pub use url::{
    Consistency, CqlConfig, StoreUrl, DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_INFLIGHT_READS,
    DEFAULT_MAX_KEYS_PER_READ, MAX_BATCH_BYTES_LIMIT, MAX_KEYS_PER_READ,
};

use crate::wal::Lsn;

/// A user id, as the matching engine numbers them.
pub type UserId = u64;
/// An amount in minor units (satoshis, cents...). Balances may be negative: trades are never
/// rejected for funds, they already happened.
pub type Amount = i64;

/// Most writes (rows) one [`Ledger::apply`] call may carry.
pub const MAX_APPLY_ROWS: usize = 64 * 1024;
/// Most keys one [`Ledger::event_lsns`] call may look up.
pub const MAX_LOOKUP_KEYS: usize = 64 * 1024;
/// Longest asset name accepted (bytes).
pub const MAX_ASSET_LEN_BYTES: usize = 16;

/// Identifies one balance row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BalanceKey {
    /// The account owner.
    pub user_id: UserId,
    /// The asset, e.g. `"BTC"`.
    pub asset: Asset,
}

impl BalanceKey {
    /// Builds a key from an asset name known to fit ([`MAX_ASSET_LEN_BYTES`]), such as a
    /// literal. Names from outside go through [`BalanceKey::named`].
    ///
    /// # Panics
    /// If `asset` is longer than [`MAX_ASSET_LEN_BYTES`].
    pub fn new(user_id: UserId, asset: &str) -> BalanceKey {
        BalanceKey::named(user_id, asset).expect("asset name of at most MAX_ASSET_LEN_BYTES")
    }

    /// Builds a key, or says that the asset name is too long.
    pub fn named(user_id: UserId, asset: &str) -> Result<BalanceKey, NameTooLong> {
        Ok(BalanceKey {
            user_id,
            asset: Asset::new(asset)?,
        })
    }
}

impl fmt::Display for BalanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "user {} {}", self.user_id, self.asset)
    }
}

/// A balance row as stored: the absolute amount and the LSN of the entry that wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceRow {
    /// Amount in minor units.
    pub amount: Amount,
    /// LSN of the WAL entry that wrote this value.
    pub last_lsn: Lsn,
}

/// One balance write: the post-image of a row after entry `lsn`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceWrite {
    /// The row.
    pub key: BalanceKey,
    /// Amount after the entry.
    pub amount: Amount,
    /// The entry's LSN (also the row's new `last_lsn` and, in CQL, the write timestamp).
    pub lsn: Lsn,
}

/// A settled trade, as stored in the `trades` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TradeRow {
    /// The matching engine's trade id (primary key).
    pub trade_id: u64,
    /// The engine's output sequence of the trade message.
    pub output_sequence: u64,
    /// `BASE-QUOTE`, e.g. `BTC-USDT`.
    pub symbol: Symbol,
    /// Buyer.
    pub buyer_user_id: UserId,
    /// Seller.
    pub seller_user_id: UserId,
    /// Price in quote minor units per base unit.
    pub price: Amount,
    /// Quantity in base minor units.
    pub quantity: Amount,
    /// Engine timestamp, nanoseconds since the epoch.
    pub timestamp_ns: i64,
    /// LSN of the WAL entry of this trade.
    pub lsn: Lsn,
}

/// The kind of a deposit or withdrawal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MovementKind {
    /// Money in.
    Deposit,
    /// Money out.
    Withdraw,
}

impl MovementKind {
    /// `"deposit"` or `"withdraw"`, as in the interface contract.
    pub fn name(self) -> &'static str {
        match self {
            MovementKind::Deposit => "deposit",
            MovementKind::Withdraw => "withdraw",
        }
    }

    /// Parses [`MovementKind::name`].
    pub fn from_name(name: &str) -> Option<MovementKind> {
        match name {
            "deposit" => Some(MovementKind::Deposit),
            "withdraw" => Some(MovementKind::Withdraw),
            _ => None,
        }
    }
}

/// A deposit or withdrawal, as stored in the `movements` table (keyed by output sequence).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovementRow {
    /// The engine's output sequence of the message (primary key).
    pub output_sequence: u64,
    /// Deposit or withdrawal.
    pub kind: MovementKind,
    /// Whose balance.
    pub user_id: UserId,
    /// Which asset.
    pub asset: Asset,
    /// Amount moved, positive, in minor units.
    pub amount: Amount,
    /// LSN of the WAL entry.
    pub lsn: Lsn,
}

/// A rejected message, as stored in the `rejections` table (keyed by output sequence): the
/// durable proof that this sequence was seen and refused (P9).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectionRow {
    /// The engine's output sequence of the message (primary key).
    pub output_sequence: u64,
    /// Why it was refused, at most [`MAX_REJECTION_REASON_BYTES`].
    pub reason: String,
    /// LSN of the WAL entry that recorded it.
    pub lsn: Lsn,
}

/// A run of output sequences never seen (a gap), as stored in the `holes` table (keyed by its
/// first sequence). `open` is false once every sequence in it was settled or rejected, or the
/// row was split when part of it was filled (the rest lives on in other rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoleRow {
    /// First missing sequence (primary key).
    pub first_sequence: u64,
    /// Last missing sequence (inclusive, `>= first_sequence`).
    pub last_sequence: u64,
    /// Still missing?
    pub open: bool,
    /// LSN of the WAL entry that wrote this state of the row.
    pub lsn: Lsn,
}

/// The store's high-water: what every apply up to `lsn` accounted for. One row, written in every
/// apply beside the data (so it advances with the commit markers), newest LSN wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HighWaterRow {
    /// The LSN of the entry that wrote it (the highest acknowledged, for a store that has it).
    pub lsn: Lsn,
    /// The first output sequence this store ever accounted for.
    pub first_sequence: u64,
    /// The highest output sequence accounted for (settled, rejected, or the end of a hole).
    pub high_sequence: u64,
    /// The highest trade id settled.
    pub max_trade_id: u64,
}

/// The store's identity and its owner: which WAL writes it, from which LSN, under which writer
/// epoch (P8). Changed only by [`Ledger::claim`], a conditional write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreIdentity {
    /// Random, created with the schema; never changes.
    pub store_id: u64,
    /// The id of the WAL that owns the store (0: none yet).
    pub wal_id: u64,
    /// The first LSN that WAL wrote to this store.
    pub wal_lsn_base: Lsn,
    /// The writer epoch: every start of a writer takes the next one; a writer that finds a
    /// newer epoch stops (fencing). At most [`MAX_EPOCH`].
    pub epoch: u64,
}

/// The outcome of a [`Ledger::claim`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The identity was written: the caller now owns the store under its epoch.
    Won,
    /// Another writer changed the identity first: here is what the store holds now.
    Lost(Option<StoreIdentity>),
}

/// Bits of a CQL write timestamp that carry the LSN; the epoch is above them
/// ([`write_timestamp`]).
pub const TIMESTAMP_LSN_BITS: u32 = 40;
/// Highest LSN a write timestamp can carry (2^40 - 1, about 1.1e12).
pub const MAX_TIMESTAMP_LSN: Lsn = (1 << TIMESTAMP_LSN_BITS) - 1;
/// Highest writer epoch: `(MAX_EPOCH + 1) << 40` is 1.69e15 microseconds (July 2023), so every
/// timestamp settlement writes stays below wall-clock time and a deliberate manual fix written
/// with the current time wins over it (the audit then reports the row).
pub const MAX_EPOCH: u64 = 1535;
/// Longest rejection reason stored (longer ones are cut at a character boundary).
pub const MAX_REJECTION_REASON_BYTES: usize = 512;
/// Most open holes a store may report at once: beyond it the stream is not a stream and a
/// human must look (`settlement holes`).
pub const MAX_OPEN_HOLES: usize = 100_000;

/// The write timestamp (microseconds) of a write of entry `lsn` by a writer of `epoch`: the
/// epoch in the high bits, so a fenced writer's late writes (an older epoch) always lose
/// last-write-wins to the new writer's, and within an epoch a higher LSN wins (P4). Epoch 0 is
/// what stores written before epochs existed hold (timestamp = LSN).
///
/// # Panics
/// If `epoch > MAX_EPOCH` or `lsn > MAX_TIMESTAMP_LSN` (callers check both at start-up).
pub fn write_timestamp(epoch: u64, lsn: Lsn) -> i64 {
    assert!(epoch <= MAX_EPOCH, "epoch {epoch} above {MAX_EPOCH}");
    assert!(lsn <= MAX_TIMESTAMP_LSN, "LSN {lsn} above 2^40 - 1");
    ((epoch << TIMESTAMP_LSN_BITS) | lsn) as i64
}

/// The event row an entry writes besides its balances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventRow {
    /// A trade row.
    Trade(TradeRow),
    /// A deposit or withdrawal row.
    Movement(MovementRow),
    /// A rejected message.
    Rejection(RejectionRow),
    /// A hole's state.
    Hole(HoleRow),
    /// The high-water row.
    HighWater(HighWaterRow),
}

/// Names one event row: a trade by its id, a deposit/withdrawal, rejection or hole by its
/// output sequence, or the single high-water row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EventKey {
    /// The `trades` row with this trade id.
    Trade(u64),
    /// The `movements` row with this output sequence.
    Movement(u64),
    /// The `rejections` row with this output sequence.
    Rejection(u64),
    /// The `holes` row with this first sequence.
    Hole(u64),
    /// The high-water row.
    HighWater,
}

impl EventRow {
    /// The key of this row.
    pub fn key(&self) -> EventKey {
        match self {
            EventRow::Trade(t) => EventKey::Trade(t.trade_id),
            EventRow::Movement(m) => EventKey::Movement(m.output_sequence),
            EventRow::Rejection(r) => EventKey::Rejection(r.output_sequence),
            EventRow::Hole(h) => EventKey::Hole(h.first_sequence),
            EventRow::HighWater(_) => EventKey::HighWater,
        }
    }

    /// The LSN of the entry that wrote this row.
    pub fn lsn(&self) -> Lsn {
        match self {
            EventRow::Trade(t) => t.lsn,
            EventRow::Movement(m) => m.lsn,
            EventRow::Rejection(r) => r.lsn,
            EventRow::Hole(h) => h.lsn,
            EventRow::HighWater(h) => h.lsn,
        }
    }
}

impl fmt::Display for EventKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventKey::Trade(id) => write!(f, "trade {id}"),
            EventKey::Movement(seq) => write!(f, "movement {seq}"),
            EventKey::Rejection(seq) => write!(f, "rejection {seq}"),
            EventKey::Hole(seq) => write!(f, "hole {seq}"),
            EventKey::HighWater => write!(f, "high-water"),
        }
    }
}

/// Every store write of one WAL entry: its event row and the post-images of the balance rows it
/// touches. A store may receive the writes of several entries in one [`Ledger::apply`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryWrites {
    /// The entry's LSN.
    pub lsn: Lsn,
    /// The event row (`None` when per-row coalescing or recovery sends only balances).
    pub event: Option<EventRow>,
    /// Balance post-images, each with this entry's LSN (or, after coalescing, a newer one).
    pub balances: Vec<BalanceWrite>,
}

impl EntryWrites {
    /// Number of row writes.
    pub fn row_count(&self) -> usize {
        self.balances.len() + usize::from(self.event.is_some())
    }
}

/// Errors of a ledger store.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The store could not be reached at all.
    #[error("cannot reach the store at {target}: {reason}; check that it is running and the address is right")]
    Unreachable {
        /// The contact point(s) or path.
        target: String,
        /// Why.
        reason: String,
    },
    /// A write's outcome is unknown (a timeout after the retries ran out). It may or may not have
    /// been applied: never treat it as either; recovery verifies it.
    #[error("write outcome unknown after {attempts} attempts ({reason}): the store may or may not have applied it; verify before re-sending")]
    Unknown {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        reason: String,
    },
    /// The store refused a request (bad schema, invalid query, a value out of range).
    #[error("the store rejected the request: {0}")]
    Rejected(String),
    /// A store URL that cannot be parsed.
    #[error("invalid store URL {url:?}: {reason} (expected embedded:PATH or cql://HOST:PORT[,HOST:PORT]/KEYSPACE[?consistency=one&dc=NAME])")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Invalid input to the ledger (too many rows, an asset name too long).
    #[error("invalid ledger input: {0}")]
    Invalid(String),
    /// Any other store error.
    #[error("store error: {0}")]
    Other(String),
}

/// Result alias for ledger operations.
pub type Result<T, E = LedgerError> = std::result::Result<T, E>;

/// What a store needs to offer settlement, recovery and `audit`.
#[async_trait::async_trait]
pub trait Ledger: Send + Sync {
    /// Applies every write of `entries`. `Ok` means the store acknowledged every row write (P2
    /// depends on it). Rows keep the newest LSN: a write with a lower LSN than the row's
    /// `last_lsn` is ignored. On `Err`, any subset may have been applied.
    async fn apply(&self, entries: &[EntryWrites]) -> Result<()>;

    /// The LSN of the trade row with this id, if it exists.
    async fn trade_lsn(&self, trade_id: u64) -> Result<Option<Lsn>>;

    /// The LSN of each event row in `keys`, in the order of `keys` (`None` for a row that does
    /// not exist): recovery's existence checks for many entries at once. At most
    /// [`MAX_LOOKUP_KEYS`] keys per call ([`LedgerError::Invalid`] beyond). A store with a
    /// network round trip per read makes concurrent reads under an explicit limit.
    async fn event_lsns(&self, keys: &[EventKey]) -> Result<Vec<Option<Lsn>>>;

    /// Does the trade row exist?
    async fn trade_exists(&self, trade_id: u64) -> Result<bool> {
        Ok(self.trade_lsn(trade_id).await?.is_some())
    }

    /// The LSN of the movement row with this output sequence, if it exists.
    async fn movement_lsn(&self, output_sequence: u64) -> Result<Option<Lsn>>;

    /// Reads balance rows, in the order of `keys` (`None` for a row that does not exist).
    async fn read_balances(&self, keys: &[BalanceKey]) -> Result<Vec<Option<BalanceRow>>>;

    /// Every balance row (for `balances` and `audit`).
    async fn scan_balances(&self) -> Result<Vec<(BalanceKey, BalanceRow)>>;

    /// Every trade row (for `audit`).
    async fn scan_trades(&self) -> Result<Vec<TradeRow>>;

    /// Every movement row (for `audit`).
    async fn scan_movements(&self) -> Result<Vec<MovementRow>>;

    /// Every rejection row (for `audit`).
    async fn scan_rejections(&self) -> Result<Vec<RejectionRow>>;

    /// Every hole row that is still open, at most [`MAX_OPEN_HOLES`] ([`LedgerError::Invalid`]
    /// beyond): start-up rebuilds the dedup state from them, `settlement holes` lists them.
    async fn open_holes(&self) -> Result<Vec<HoleRow>>;

    /// The high-water row, if one was ever written.
    async fn high_water(&self) -> Result<Option<HighWaterRow>>;

    /// The output sequence of each trade row in `ids` (`None` for one that does not exist), in
    /// the order of `ids`, at most [`MAX_LOOKUP_KEYS`]: the pipeline's check that a trade id is
    /// not settled twice under different sequences.
    async fn trade_sequences(&self, ids: &[u64]) -> Result<Vec<Option<u64>>>;

    /// The store's identity, if it has one (a store written before identities existed, or a new
    /// one, has none).
    async fn identity(&self) -> Result<Option<StoreIdentity>>;

    /// Writes `new` as the store's identity if the stored one's epoch is still
    /// `expected_epoch` (`None`: no identity stored yet): a conditional write (a lightweight
    /// transaction on CQL), so of two writers starting at once exactly one wins.
    async fn claim(&self, expected_epoch: Option<u64>, new: StoreIdentity) -> Result<Claim>;

    /// Sets the epoch later writes carry in their timestamps (stores with last-write-wins
    /// timestamps; [`write_timestamp`]). The default does nothing.
    fn set_write_epoch(&self, _epoch: u64) {}

    /// A short description for logs (`embedded:./data/ledger.redb`, `cql://127.0.0.1:9042/ks`).
    fn describe(&self) -> String;
}

/// Cuts a rejection reason to [`MAX_REJECTION_REASON_BYTES`] at a character boundary.
pub fn bounded_reason(reason: &str) -> String {
    if reason.len() <= MAX_REJECTION_REASON_BYTES {
        return reason.to_string();
    }
    let mut end = MAX_REJECTION_REASON_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

/// Checks the limits every implementation enforces before writing.
pub(crate) fn validate_entries(entries: &[EntryWrites]) -> Result<()> {
    let rows: usize = entries.iter().map(EntryWrites::row_count).sum();
    if rows > MAX_APPLY_ROWS {
        return Err(LedgerError::Invalid(format!(
            "{rows} row writes in one apply exceeds the limit of {MAX_APPLY_ROWS}"
        )));
    }
    for e in entries {
        for b in &e.balances {
            if b.key.asset.is_empty() || b.key.asset.len() > MAX_ASSET_LEN_BYTES {
                return Err(LedgerError::Invalid(format!(
                    "asset name {:?} must be 1 to {MAX_ASSET_LEN_BYTES} bytes",
                    b.key.asset
                )));
            }
        }
    }
    Ok(())
}

/// Checks the limit of one [`Ledger::event_lsns`] call.
pub(crate) fn validate_lookup(keys: &[EventKey]) -> Result<()> {
    validate_lookup_count("event", keys.len())
}

/// Checks the limit of one lookup call of `n` keys ([`MAX_LOOKUP_KEYS`]); `what` names them.
pub(crate) fn validate_lookup_count(what: &str, n: usize) -> Result<()> {
    if n > MAX_LOOKUP_KEYS {
        return Err(LedgerError::Invalid(format!(
            "{n} {what} lookups in one call exceeds the limit of {MAX_LOOKUP_KEYS}"
        )));
    }
    Ok(())
}

/// Per-row coalescing, the order in which the settlement pipeline sends a micro-batch: every
/// entry's event row first (in the order given), then one write per balance row carrying its
/// newest post-image (the highest LSN; of equal LSNs the later one), sorted by key so that the
/// rows of one user partition are neighbours.
///
/// Applying the result leaves the store exactly as applying `writes` would: a balance write
/// that is left out is older than one that is kept for the same row, and rows keep the newest
/// LSN whatever order writes land in (P4).
pub fn coalesce(writes: Vec<EntryWrites>) -> Vec<EntryWrites> {
    let mut out: Vec<EntryWrites> = Vec::with_capacity(writes.len() + 1);
    let mut balances: Vec<BalanceWrite> =
        Vec::with_capacity(writes.iter().map(|w| w.balances.len()).sum());
    let mut last_lsn = None;
    for w in writes {
        last_lsn = last_lsn.max(Some(w.lsn));
        if let Some(event) = w.event {
            out.push(EntryWrites {
                lsn: w.lsn,
                event: Some(event),
                balances: Vec::new(),
            });
        }
        balances.extend(w.balances);
    }
    coalesce_rows(out, balances, last_lsn)
}

/// The second half of [`coalesce`], for callers that gathered the parts themselves: `events`
/// (entries with their event rows and no balances, in order), then one write per row of
/// `balances` (in entry order) with its newest post-image. `last_lsn` is the highest LSN of
/// them all.
pub(crate) fn coalesce_rows(
    mut events: Vec<EntryWrites>,
    mut balances: Vec<BalanceWrite>,
    mut last_lsn: Option<Lsn>,
) -> Vec<EntryWrites> {
    debug_assert!(events.iter().all(|w| w.balances.is_empty()));
    if balances.is_empty() {
        return events;
    }
    // One sort instead of a map: by row, then LSN. The sort is stable, so of equal LSNs the
    // later write stays later, and the last write of each row's run is the one to keep.
    balances.sort_by(|a, b| a.key.cmp(&b.key).then(a.lsn.cmp(&b.lsn)));
    let mut rows: Vec<BalanceWrite> = Vec::with_capacity(balances.len());
    for b in balances {
        last_lsn = last_lsn.max(Some(b.lsn));
        match rows.last_mut() {
            Some(newest) if newest.key == b.key => *newest = b,
            _ => rows.push(b),
        }
    }
    events.push(EntryWrites {
        lsn: last_lsn.expect("balances were not empty"),
        event: None,
        balances: rows,
    });
    events
}

/// Opens the store a URL names for reading only, for inspection tools: nothing is created or
/// written (an embedded file must exist; a CQL keyspace must already hold the schema).
pub async fn open_store_read_only(url: &StoreUrl) -> Result<Box<dyn Ledger>> {
    match url {
        StoreUrl::Embedded(path) => Ok(Box::new(embedded::EmbeddedLedger::open_read_only(path)?)),
        StoreUrl::Cql(config) => {
            let mut config = config.clone();
            config.read_only = true;
            Ok(Box::new(cql::CqlLedger::connect(config).await?))
        }
    }
}

/// Opens the store a URL names.
pub async fn open_store(url: &StoreUrl) -> Result<Box<dyn Ledger>> {
    match url {
        StoreUrl::Embedded(path) => Ok(Box::new(embedded::EmbeddedLedger::open(path)?)),
        StoreUrl::Cql(config) => Ok(Box::new(cql::CqlLedger::connect(config.clone()).await?)),
    }
}

#[cfg(test)]
mod tests {
    use super::conformance::{deposit_entry, trade_entry};
    use super::*;

    #[test]
    fn coalesce_puts_event_rows_first_and_keeps_the_newest_post_image() {
        let writes = vec![
            trade_entry(5, 50, 1, 2, [10, -10, -10, 10]),
            deposit_entry(6, 60, 1, "BTC", 1, 11),
            trade_entry(7, 70, 2, 1, [-9, 19, 12, -20]),
        ];
        let out = coalesce(writes.clone());
        let events: Vec<EventKey> = out
            .iter()
            .filter_map(|w| w.event.as_ref().map(EventRow::key))
            .collect();
        assert_eq!(
            events,
            vec![
                EventKey::Trade(50),
                EventKey::Movement(60),
                EventKey::Trade(70)
            ]
        );
        assert!(out[..3].iter().all(|w| w.balances.is_empty()));
        let last = out.last().unwrap();
        assert!(last.event.is_none());
        assert_eq!(last.lsn, 7);
        let got: Vec<(u64, &str, i64, u64)> = last
            .balances
            .iter()
            .map(|b| (b.key.user_id, b.key.asset.as_str(), b.amount, b.lsn))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, "BTC", 12, 7),
                (1, "USDT", -20, 7),
                (2, "BTC", -9, 7),
                (2, "USDT", 19, 7)
            ]
        );
        // Out of order input: the highest LSN wins, not the last position.
        let reversed: Vec<EntryWrites> = writes.iter().rev().cloned().collect();
        assert_eq!(coalesce(reversed).last().unwrap().balances, last.balances);
        assert!(coalesce(Vec::new()).is_empty());
    }

    /// The simulated store keeps the same rules as the real ones (without faults injected), and
    /// its `event_lsns` is the trait's default.
    #[tokio::test]
    async fn sim_store_passes_the_conformance_suite() {
        let ledger = sim::SimLedger::new(7);
        conformance::run_all(&ledger, 0).await;
        conformance::run_all(&ledger, 1_000_000).await;
    }

    #[tokio::test]
    async fn applying_coalesced_writes_leaves_the_same_store() {
        let writes: Vec<EntryWrites> = (0..200u64)
            .map(|i| {
                if i % 7 == 0 {
                    deposit_entry(i + 1, 10_000 + i, i % 5, "ETH", 3, i as i64)
                } else {
                    let p = i as i64;
                    trade_entry(i + 1, i, i % 5, (i * 3) % 7, [p, -p, -p, p])
                }
            })
            .collect();
        let all = sim::SimLedger::new(1);
        let coalesced = sim::SimLedger::new(1);
        all.apply(&writes).await.unwrap();
        coalesced.apply(&coalesce(writes.clone())).await.unwrap();
        let mut a = all.scan_balances().await.unwrap();
        let mut b = coalesced.scan_balances().await.unwrap();
        a.sort_by_key(|x| x.0);
        b.sort_by_key(|x| x.0);
        assert_eq!(a, b);
        assert_eq!(
            all.scan_trades().await.unwrap().len(),
            coalesced.scan_trades().await.unwrap().len()
        );
    }
}
