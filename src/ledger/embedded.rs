//! The embedded ledger: a redb database file, the default store for a first run with no server.
//!
//! Same trait and same rule as the CQL store, implemented explicitly: a row write whose LSN is
//! lower than the row's stored LSN is ignored (P4). Every `apply` is one redb write transaction
//! committed with `Durability::Immediate` (fsync) before it returns, so an acknowledged write is
//! durable (P2 depends on it).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    Database, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
};

use super::{
    validate_entries, validate_lookup, BalanceKey, BalanceRow, EntryWrites, EventKey, EventRow,
    Ledger, LedgerError, MovementRow, Result, TradeRow,
};
use crate::wal::format::{decode_payload, encode_payload};
use crate::wal::Lsn;

/// The schema version this build writes; a newer one in the file is refused.
pub const SCHEMA_VERSION: u64 = 1;

/// (user_id, asset) -> (amount, last_lsn)
const BALANCES: TableDefinition<(u64, &str), (i64, u64)> = TableDefinition::new("balances");
/// trade_id -> (lsn, encoded TradeRow)
const TRADES: TableDefinition<u64, (u64, &[u8])> = TableDefinition::new("trades");
/// output_sequence -> (lsn, encoded MovementRow)
const MOVEMENTS: TableDefinition<u64, (u64, &[u8])> = TableDefinition::new("movements");
/// "schema_version" -> version
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The database, opened for writing or read-only.
enum Db {
    ReadWrite(Database),
    ReadOnly(ReadOnlyDatabase),
}

impl Db {
    fn begin_read(&self) -> std::result::Result<ReadTransaction, redb::TransactionError> {
        match self {
            Db::ReadWrite(db) => db.begin_read(),
            Db::ReadOnly(db) => db.begin_read(),
        }
    }
}

/// The embedded (redb) ledger.
pub struct EmbeddedLedger {
    db: Arc<Db>,
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddedLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLedger")
            .field("path", &self.path)
            .finish()
    }
}

fn store_err(path: &Path, what: &str, e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Other(format!("embedded store {}: {what}: {e}", path.display()))
}

impl EmbeddedLedger {
    /// Opens (or creates) the database file at `path`, creating parent directories and the
    /// tables. Only one process may have it open.
    pub fn open(path: &Path) -> Result<EmbeddedLedger> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| LedgerError::Unreachable {
                target: format!("embedded:{}", path.display()),
                reason: format!("cannot create {}: {e}", parent.display()),
            })?;
        }
        let db = Database::create(path).map_err(|e| LedgerError::Unreachable {
            target: format!("embedded:{}", path.display()),
            reason: e.to_string(),
        })?;
        let txn = db.begin_write().map_err(|e| store_err(path, "begin", e))?;
        {
            let mut meta = txn
                .open_table(META)
                .map_err(|e| store_err(path, "open meta", e))?;
            let stored = meta
                .get("schema_version")
                .map_err(|e| store_err(path, "read schema version", e))?
                .map(|g| g.value());
            match stored {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(LedgerError::Rejected(format!(
                        "{} has schema version {v}, newer than this build's {SCHEMA_VERSION}; use a matching release",
                        path.display()
                    )))
                }
                Some(_) => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(|e| store_err(path, "write schema version", e))?;
                }
            }
            txn.open_table(BALANCES)
                .map_err(|e| store_err(path, "open balances", e))?;
            txn.open_table(TRADES)
                .map_err(|e| store_err(path, "open trades", e))?;
            txn.open_table(MOVEMENTS)
                .map_err(|e| store_err(path, "open movements", e))?;
        }
        txn.commit()
            .map_err(|e| store_err(path, "commit schema", e))?;
        Ok(EmbeddedLedger {
            db: Arc::new(Db::ReadWrite(db)),
            path: path.to_path_buf(),
        })
    }

    /// Opens an existing database without writing anything (for inspection tools): no file or
    /// table is created, and [`Ledger::apply`] is refused.
    pub fn open_read_only(path: &Path) -> Result<EmbeddedLedger> {
        let unreachable = |reason: String| LedgerError::Unreachable {
            target: format!("embedded:{}", path.display()),
            reason,
        };
        if !path.is_file() {
            return Err(unreachable("no such database file".into()));
        }
        let db = Database::builder()
            .open_read_only(path)
            .map_err(|e| unreachable(e.to_string()))?;
        {
            let txn = db.begin_read().map_err(|e| store_err(path, "begin", e))?;
            let meta = txn
                .open_table(META)
                .map_err(|e| unreachable(format!("not a settlement ledger: {e}")))?;
            let version = meta
                .get("schema_version")
                .map_err(|e| store_err(path, "read schema version", e))?
                .map(|g| g.value());
            if version.is_none_or(|v| v > SCHEMA_VERSION) {
                return Err(LedgerError::Rejected(format!(
                    "{} has schema version {version:?}; this build reads version {SCHEMA_VERSION}",
                    path.display()
                )));
            }
        }
        Ok(EmbeddedLedger {
            db: Arc::new(Db::ReadOnly(db)),
            path: path.to_path_buf(),
        })
    }

    /// Runs blocking redb work off the async executor.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Db, &Path) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || f(&db, &path))
            .await
            .map_err(|e| LedgerError::Other(format!("embedded store task failed: {e}")))?
    }
}

fn apply_blocking(db: &Db, path: &Path, entries: &[EntryWrites]) -> Result<()> {
    let Db::ReadWrite(db) = db else {
        return Err(LedgerError::Rejected(format!(
            "{} was opened read-only; nothing is written",
            path.display()
        )));
    };
    let txn = db.begin_write().map_err(|e| store_err(path, "begin", e))?;
    {
        let mut balances = txn
            .open_table(BALANCES)
            .map_err(|e| store_err(path, "open", e))?;
        let mut trades = txn
            .open_table(TRADES)
            .map_err(|e| store_err(path, "open", e))?;
        let mut movements = txn
            .open_table(MOVEMENTS)
            .map_err(|e| store_err(path, "open", e))?;
        for entry in entries {
            match &entry.event {
                Some(EventRow::Trade(t)) => {
                    let stored = trades
                        .get(t.trade_id)
                        .map_err(|e| store_err(path, "read trade", e))?
                        .map(|g| g.value().0);
                    if stored.is_none_or(|lsn| lsn <= t.lsn) {
                        let bytes = encode_payload(t).map_err(|e| store_err(path, "encode", e))?;
                        trades
                            .insert(t.trade_id, (t.lsn, bytes.as_slice()))
                            .map_err(|e| store_err(path, "write trade", e))?;
                    }
                }
                Some(EventRow::Movement(m)) => {
                    let stored = movements
                        .get(m.output_sequence)
                        .map_err(|e| store_err(path, "read movement", e))?
                        .map(|g| g.value().0);
                    if stored.is_none_or(|lsn| lsn <= m.lsn) {
                        let bytes = encode_payload(m).map_err(|e| store_err(path, "encode", e))?;
                        movements
                            .insert(m.output_sequence, (m.lsn, bytes.as_slice()))
                            .map_err(|e| store_err(path, "write movement", e))?;
                    }
                }
                None => {}
            }
            for b in &entry.balances {
                let key = (b.key.user_id, b.key.asset.as_str());
                let stored = balances
                    .get(key)
                    .map_err(|e| store_err(path, "read balance", e))?
                    .map(|g| g.value().1);
                // Last write wins by LSN: an older entry never overwrites a newer one (P4).
                if stored.is_none_or(|lsn| lsn <= b.lsn) {
                    balances
                        .insert(key, (b.amount, b.lsn))
                        .map_err(|e| store_err(path, "write balance", e))?;
                }
            }
        }
    }
    // Durability::Immediate (the default): durable when commit returns.
    txn.commit().map_err(|e| store_err(path, "commit", e))
}

/// Every row of a table of `(lsn, encoded row)` values, decoded.
fn scan_encoded<T: serde::de::DeserializeOwned>(
    db: &Db,
    path: &Path,
    table: TableDefinition<u64, (u64, &[u8])>,
    what: &str,
) -> Result<Vec<T>> {
    let txn = db.begin_read().map_err(|e| store_err(path, "begin", e))?;
    let t = txn
        .open_table(table)
        .map_err(|e| store_err(path, "open", e))?;
    let mut out = Vec::new();
    for item in t.iter().map_err(|e| store_err(path, "scan", e))? {
        let (_, v) = item.map_err(|e| store_err(path, "scan", e))?;
        out.push(
            decode_payload::<T>(v.value().1)
                .map_err(|e| store_err(path, &format!("decode {what}"), e))?,
        );
    }
    Ok(out)
}

#[async_trait::async_trait]
impl Ledger for EmbeddedLedger {
    async fn apply(&self, entries: &[EntryWrites]) -> Result<()> {
        validate_entries(entries)?;
        let entries = entries.to_vec();
        self.blocking(move |db, path| apply_blocking(db, path, &entries))
            .await
    }

    async fn trade_lsn(&self, trade_id: u64) -> Result<Option<Lsn>> {
        self.blocking(move |db, path| {
            let txn = db.begin_read().map_err(|e| store_err(path, "begin", e))?;
            let t = txn
                .open_table(TRADES)
                .map_err(|e| store_err(path, "open", e))?;
            Ok(t.get(trade_id)
                .map_err(|e| store_err(path, "read trade", e))?
                .map(|g| g.value().0))
        })
        .await
    }

    async fn movement_lsn(&self, output_sequence: u64) -> Result<Option<Lsn>> {
        self.blocking(move |db, path| {
            let txn = db.begin_read().map_err(|e| store_err(path, "begin", e))?;
            let t = txn
                .open_table(MOVEMENTS)
                .map_err(|e| store_err(path, "open", e))?;
            Ok(t.get(output_sequence)
                .map_err(|e| store_err(path, "read movement", e))?
                .map(|g| g.value().0))
        })
        .await
    }

    async fn event_lsns(&self, keys: &[EventKey]) -> Result<Vec<Option<Lsn>>> {
        validate_lookup(keys)?;
        let keys = keys.to_vec();
        // One read transaction for all of them (one snapshot, one blocking task).
        self.blocking(move |db, path| {
            let txn = db.begin_read().map_err(|e| store_err(path, "begin", e))?;
            let trades = txn
                .open_table(TRADES)
                .map_err(|e| store_err(path, "open", e))?;
            let movements = txn
                .open_table(MOVEMENTS)
                .map_err(|e| store_err(path, "open", e))?;
            keys.iter()
                .map(|k| {
                    let found = match *k {
                        EventKey::Trade(id) => trades.get(id),
                        EventKey::Movement(seq) => movements.get(seq),
                    };
                    Ok(found
                        .map_err(|e| store_err(path, &format!("read {k}"), e))?
                        .map(|g| g.value().0))
                })
                .collect()
        })
        .await
    }

    async fn read_balances(&self, keys: &[BalanceKey]) -> Result<Vec<Option<BalanceRow>>> {
        let keys = keys.to_vec();
        self.blocking(move |db, path| {
            let txn = db.begin_read().map_err(|e| store_err(path, "begin", e))?;
            let t = txn
                .open_table(BALANCES)
                .map_err(|e| store_err(path, "open", e))?;
            keys.iter()
                .map(|k| {
                    Ok(t.get((k.user_id, k.asset.as_str()))
                        .map_err(|e| store_err(path, "read balance", e))?
                        .map(|g| {
                            let (amount, last_lsn) = g.value();
                            BalanceRow { amount, last_lsn }
                        }))
                })
                .collect()
        })
        .await
    }

    async fn scan_balances(&self) -> Result<Vec<(BalanceKey, BalanceRow)>> {
        self.blocking(move |db, path| {
            let txn = db.begin_read().map_err(|e| store_err(path, "begin", e))?;
            let t = txn
                .open_table(BALANCES)
                .map_err(|e| store_err(path, "open", e))?;
            let mut out = Vec::new();
            for item in t.iter().map_err(|e| store_err(path, "scan", e))? {
                let (k, v) = item.map_err(|e| store_err(path, "scan", e))?;
                let (user_id, asset) = k.value();
                let (amount, last_lsn) = v.value();
                let key = BalanceKey::named(user_id, asset)
                    .map_err(|e| store_err(path, "scan balances", e))?;
                out.push((key, BalanceRow { amount, last_lsn }));
            }
            Ok(out)
        })
        .await
    }

    async fn scan_trades(&self) -> Result<Vec<TradeRow>> {
        self.blocking(|db, path| scan_encoded(db, path, TRADES, "trade"))
            .await
    }

    async fn scan_movements(&self) -> Result<Vec<MovementRow>> {
        self.blocking(|db, path| scan_encoded(db, path, MOVEMENTS, "movement"))
            .await
    }

    fn describe(&self) -> String {
        format!("embedded:{}", self.path.display())
    }
}
