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
pub mod sim;
mod url;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use url::{Consistency, CqlConfig, StoreUrl};

use crate::wal::Lsn;

/// A user id, as the matching engine numbers them.
pub type UserId = u64;
/// An amount in minor units (satoshis, cents...). Balances may be negative: trades are never
/// rejected for funds, they already happened.
pub type Amount = i64;

/// Most writes (rows) one [`Ledger::apply`] call may carry.
pub const MAX_APPLY_ROWS: usize = 64 * 1024;
/// Longest asset name accepted (bytes).
pub const MAX_ASSET_LEN_BYTES: usize = 16;

/// Identifies one balance row.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BalanceKey {
    /// The account owner.
    pub user_id: UserId,
    /// The asset, e.g. `"BTC"`.
    pub asset: String,
}

impl BalanceKey {
    /// Builds a key.
    pub fn new(user_id: UserId, asset: impl Into<String>) -> BalanceKey {
        BalanceKey {
            user_id,
            asset: asset.into(),
        }
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
    pub symbol: String,
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
    pub asset: String,
    /// Amount moved, positive, in minor units.
    pub amount: Amount,
    /// LSN of the WAL entry.
    pub lsn: Lsn,
}

/// The event row an entry writes besides its balances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventRow {
    /// A trade row.
    Trade(TradeRow),
    /// A deposit or withdrawal row.
    Movement(MovementRow),
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
    #[error("write outcome unknown after {attempts} attempts ({reason}); the entry stays pending and recovery will verify it")]
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

    /// A short description for logs (`embedded:./data/ledger.redb`, `cql://127.0.0.1:9042/ks`).
    fn describe(&self) -> String;
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
