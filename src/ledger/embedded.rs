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
    validate_entries, validate_lookup, validate_lookup_count, BalanceKey, BalanceRow, Claim,
    EntryWrites, EventKey, EventRow, HighWaterRow, HoleRow, Ledger, LedgerError, MovementRow,
    RejectionRow, Result, StoreIdentity, TradeRow, MAX_OPEN_HOLES,
};
use crate::wal::format::{decode_payload, encode_payload};
use crate::wal::Lsn;

/// The schema version this build writes; a newer one in the file is refused. Version 2 added
/// the rejections and holes tables and the identity and high-water keys of `meta`; a version 1
/// file is upgraded in place when opened for writing (read-only, its missing tables read as
/// empty).
pub const SCHEMA_VERSION: u64 = 2;

/// (user_id, asset) -> (amount, last_lsn)
const BALANCES: TableDefinition<(u64, &str), (i64, u64)> = TableDefinition::new("balances");
/// trade_id -> (lsn, encoded TradeRow)
const TRADES: TableDefinition<u64, (u64, &[u8])> = TableDefinition::new("trades");
/// output_sequence -> (lsn, encoded MovementRow)
const MOVEMENTS: TableDefinition<u64, (u64, &[u8])> = TableDefinition::new("movements");
/// "schema_version" -> version; the identity ("store_id", "wal_id", "wal_lsn_base", "epoch")
/// and the high-water ("hw_lsn", "hw_first_sequence", "hw_high_sequence", "hw_max_trade_id").
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// output_sequence -> (lsn, reason)
const REJECTIONS: TableDefinition<u64, (u64, &str)> = TableDefinition::new("rejections");
/// first_sequence -> (last_sequence, open, lsn)
const HOLES: TableDefinition<u64, (u64, bool, u64)> = TableDefinition::new("holes");

const IDENTITY_KEYS: [&str; 4] = ["store_id", "wal_id", "wal_lsn_base", "epoch"];
const HIGH_WATER_KEYS: [&str; 4] = [
    "hw_lsn",
    "hw_first_sequence",
    "hw_high_sequence",
    "hw_max_trade_id",
];

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
                _ => {}
            }
            txn.open_table(BALANCES)
                .map_err(|e| store_err(path, "open balances", e))?;
            txn.open_table(TRADES)
                .map_err(|e| store_err(path, "open trades", e))?;
            txn.open_table(MOVEMENTS)
                .map_err(|e| store_err(path, "open movements", e))?;
            txn.open_table(REJECTIONS)
                .map_err(|e| store_err(path, "open rejections", e))?;
            txn.open_table(HOLES)
                .map_err(|e| store_err(path, "open holes", e))?;
            if stored != Some(SCHEMA_VERSION) {
                meta.insert("schema_version", SCHEMA_VERSION)
                    .map_err(|e| store_err(path, "write schema version", e))?;
            }
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
        let mut rejections = txn
            .open_table(REJECTIONS)
            .map_err(|e| store_err(path, "open", e))?;
        let mut holes = txn
            .open_table(HOLES)
            .map_err(|e| store_err(path, "open", e))?;
        let mut meta = txn
            .open_table(META)
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
                Some(EventRow::Rejection(r)) => {
                    let stored = rejections
                        .get(r.output_sequence)
                        .map_err(|e| store_err(path, "read rejection", e))?
                        .map(|g| g.value().0);
                    if stored.is_none_or(|lsn| lsn <= r.lsn) {
                        rejections
                            .insert(r.output_sequence, (r.lsn, r.reason.as_str()))
                            .map_err(|e| store_err(path, "write rejection", e))?;
                    }
                }
                Some(EventRow::Hole(h)) => {
                    let stored = holes
                        .get(h.first_sequence)
                        .map_err(|e| store_err(path, "read hole", e))?
                        .map(|g| g.value().2);
                    if stored.is_none_or(|lsn| lsn <= h.lsn) {
                        holes
                            .insert(h.first_sequence, (h.last_sequence, h.open, h.lsn))
                            .map_err(|e| store_err(path, "write hole", e))?;
                    }
                }
                Some(EventRow::HighWater(hw)) => {
                    let stored = meta
                        .get(HIGH_WATER_KEYS[0])
                        .map_err(|e| store_err(path, "read high-water", e))?
                        .map(|g| g.value());
                    if stored.is_none_or(|lsn| lsn <= hw.lsn) {
                        let values = [hw.lsn, hw.first_sequence, hw.high_sequence, hw.max_trade_id];
                        for (key, value) in HIGH_WATER_KEYS.iter().zip(values) {
                            meta.insert(*key, value)
                                .map_err(|e| store_err(path, "write high-water", e))?;
                        }
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
                    let err = |e| store_err(path, &format!("read {k}"), e);
                    Ok(match *k {
                        EventKey::Trade(id) => trades.get(id).map_err(err)?.map(|g| g.value().0),
                        EventKey::Movement(seq) => {
                            movements.get(seq).map_err(err)?.map(|g| g.value().0)
                        }
                        EventKey::Rejection(seq) => {
                            let t = open_optional(&txn, REJECTIONS, path)?;
                            match t {
                                Some(t) => t.get(seq).map_err(err)?.map(|g| g.value().0),
                                None => None,
                            }
                        }
                        EventKey::Hole(seq) => {
                            let t = open_optional(&txn, HOLES, path)?;
                            match t {
                                Some(t) => t.get(seq).map_err(err)?.map(|g| g.value().2),
                                None => None,
                            }
                        }
                        EventKey::HighWater => read_high_water(&txn, path)?.map(|h| h.lsn),
                    })
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

    async fn scan_rejections(&self) -> Result<Vec<RejectionRow>> {
        self.blocking(|db, path| {
            let txn = db.begin_read().map_err(|e| store_err(path, "begin", e))?;
            let Some(t) = open_optional(&txn, REJECTIONS, path)? else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for item in t
                .iter()
                .map_err(|e| store_err(path, "scan rejections", e))?
            {
                let (k, v) = item.map_err(|e| store_err(path, "scan rejections", e))?;
                let (lsn, reason) = v.value();
                out.push(RejectionRow {
                    output_sequence: k.value(),
                    reason: reason.to_string(),
                    lsn,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn open_holes(&self) -> Result<Vec<HoleRow>> {
        self.blocking(|db, path| {
            let txn = db.begin_read().map_err(|e| store_err(path, "begin", e))?;
            let Some(t) = open_optional(&txn, HOLES, path)? else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for item in t.iter().map_err(|e| store_err(path, "scan holes", e))? {
                let (k, v) = item.map_err(|e| store_err(path, "scan holes", e))?;
                let (last_sequence, open, lsn) = v.value();
                if !open {
                    continue;
                }
                if out.len() == MAX_OPEN_HOLES {
                    return Err(LedgerError::Invalid(format!(
                        "{} holds more than {MAX_OPEN_HOLES} open holes; list them with `settlement holes` and fill them from the engine's journal",
                        path.display()
                    )));
                }
                out.push(HoleRow {
                    first_sequence: k.value(),
                    last_sequence,
                    open,
                    lsn,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn high_water(&self) -> Result<Option<HighWaterRow>> {
        self.blocking(|db, path| {
            let txn = db.begin_read().map_err(|e| store_err(path, "begin", e))?;
            read_high_water(&txn, path)
        })
        .await
    }

    async fn trade_sequences(&self, ids: &[u64]) -> Result<Vec<Option<u64>>> {
        validate_lookup_count("trade", ids.len())?;
        let ids = ids.to_vec();
        self.blocking(move |db, path| {
            let txn = db.begin_read().map_err(|e| store_err(path, "begin", e))?;
            let trades = txn
                .open_table(TRADES)
                .map_err(|e| store_err(path, "open", e))?;
            ids.iter()
                .map(|&id| {
                    let Some(g) = trades
                        .get(id)
                        .map_err(|e| store_err(path, "read trade", e))?
                    else {
                        return Ok(None);
                    };
                    let row: TradeRow = decode_payload(g.value().1)
                        .map_err(|e| store_err(path, "decode trade", e))?;
                    Ok(Some(row.output_sequence))
                })
                .collect()
        })
        .await
    }

    async fn identity(&self) -> Result<Option<StoreIdentity>> {
        self.blocking(|db, path| {
            let txn = db.begin_read().map_err(|e| store_err(path, "begin", e))?;
            let meta = txn
                .open_table(META)
                .map_err(|e| store_err(path, "open meta", e))?;
            read_identity(&meta, path)
        })
        .await
    }

    async fn claim(&self, expected_epoch: Option<u64>, new: StoreIdentity) -> Result<Claim> {
        self.blocking(move |db, path| {
            let Db::ReadWrite(db) = db else {
                return Err(LedgerError::Rejected(format!(
                    "{} was opened read-only; nothing is written",
                    path.display()
                )));
            };
            // One write transaction: redb serializes them, and its file lock already keeps a
            // second process out, so the compare and the set are atomic.
            let txn = db.begin_write().map_err(|e| store_err(path, "begin", e))?;
            {
                let mut meta = txn
                    .open_table(META)
                    .map_err(|e| store_err(path, "open meta", e))?;
                let current = read_identity(&meta, path)?;
                if current.map(|c| c.epoch) != expected_epoch {
                    return Ok(Claim::Lost(current));
                }
                let values = [new.store_id, new.wal_id, new.wal_lsn_base, new.epoch];
                for (key, value) in IDENTITY_KEYS.iter().zip(values) {
                    meta.insert(*key, value)
                        .map_err(|e| store_err(path, "write identity", e))?;
                }
            }
            txn.commit()
                .map_err(|e| store_err(path, "commit identity", e))?;
            Ok(Claim::Won)
        })
        .await
    }

    fn describe(&self) -> String {
        format!("embedded:{}", self.path.display())
    }
}

/// A table that a version 1 file does not have yet reads as `None` (empty).
fn open_optional<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    table: TableDefinition<K, V>,
    path: &Path,
) -> Result<Option<redb::ReadOnlyTable<K, V>>> {
    match txn.open_table(table) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(store_err(path, "open", e)),
    }
}

/// The four values under `keys`, all present or all absent (anything else is a damaged file).
fn read_four(
    meta: &impl ReadableTable<&'static str, u64>,
    keys: &[&'static str; 4],
    path: &Path,
) -> Result<Option<[u64; 4]>> {
    let mut out = [0u64; 4];
    let mut found = 0;
    for (i, key) in keys.iter().enumerate() {
        if let Some(g) = meta
            .get(*key)
            .map_err(|e| store_err(path, "read meta", e))?
        {
            out[i] = g.value();
            found += 1;
        }
    }
    match found {
        0 => Ok(None),
        4 => Ok(Some(out)),
        _ => Err(store_err(
            path,
            "read meta",
            format!("only {found} of the keys {keys:?} are present; the file is damaged"),
        )),
    }
}

fn read_identity(
    meta: &impl ReadableTable<&'static str, u64>,
    path: &Path,
) -> Result<Option<StoreIdentity>> {
    Ok(
        read_four(meta, &IDENTITY_KEYS, path)?.map(|v| StoreIdentity {
            store_id: v[0],
            wal_id: v[1],
            wal_lsn_base: v[2],
            epoch: v[3],
        }),
    )
}

fn read_high_water(txn: &ReadTransaction, path: &Path) -> Result<Option<HighWaterRow>> {
    let meta = txn
        .open_table(META)
        .map_err(|e| store_err(path, "open meta", e))?;
    Ok(
        read_four(&meta, &HIGH_WATER_KEYS, path)?.map(|v| HighWaterRow {
            lsn: v[0],
            first_sequence: v[1],
            high_sequence: v[2],
            max_trade_id: v[3],
        }),
    )
}
