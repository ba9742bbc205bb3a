//! What the CQL benches share (`cql_batches`, `settle_pipeline`): the seed's alternative of
//! writing a trade's rows in LOGGED batches, statement for statement as `CqlLedger::apply`
//! writes them, and a closed-loop measurement of workers issuing one unit of work after
//! another. Included with `mod common;`.

use std::future::Future;
use std::time::{Duration, Instant};

use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;
use settlement_wal::ledger::{EntryWrites, EventRow};

/// The two inserts a trade's rows take, prepared idempotent at consistency ONE.
pub struct LoggedStatements {
    pub insert_trade: PreparedStatement,
    pub insert_balance: PreparedStatement,
}

impl LoggedStatements {
    /// Prepares them for `keyspace` (which holds the ledger's schema).
    pub async fn prepare(session: &Session, keyspace: &str) -> LoggedStatements {
        let prep = |cql: String| async move {
            let mut p = session.prepare(cql).await.expect("prepare");
            p.set_is_idempotent(true);
            p.set_consistency(Consistency::One);
            p
        };
        LoggedStatements {
            insert_trade: prep(format!(
                "INSERT INTO {keyspace}.trades (trade_id, output_sequence, symbol, buyer_user_id, \
                 seller_user_id, price, quantity, timestamp_ns, lsn) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await,
            insert_balance: prep(format!(
                "INSERT INTO {keyspace}.balances (user_id, asset, amount, last_lsn) \
                 VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await,
        }
    }

    /// A batch of `batch_type` (and its values) holding every row of `entries`, in entry order.
    pub fn batch(&self, entries: &[EntryWrites], batch_type: BatchType) -> (Batch, Vec<Vals>) {
        let mut batch = Batch::new(batch_type);
        batch.set_consistency(Consistency::One);
        batch.set_is_idempotent(true);
        let mut values = Vec::with_capacity(entries.len() * 5);
        for e in entries {
            if let Some(EventRow::Trade(t)) = &e.event {
                batch.append_statement(self.insert_trade.clone());
                let lsn = t.lsn as i64;
                values.push(Vals::Trade((
                    t.trade_id as i64,
                    t.output_sequence as i64,
                    t.symbol.to_string(),
                    t.buyer_user_id as i64,
                    t.seller_user_id as i64,
                    t.price,
                    t.quantity,
                    t.timestamp_ns,
                    lsn,
                    lsn,
                )));
            }
            for w in &e.balances {
                batch.append_statement(self.insert_balance.clone());
                let lsn = w.lsn as i64;
                values.push(Vals::Balance((
                    w.key.user_id as i64,
                    w.key.asset.to_string(),
                    w.amount,
                    lsn,
                    lsn,
                )));
            }
        }
        (batch, values)
    }
}

/// Batch values of mixed statements (the driver needs one type per batch).
pub enum Vals {
    Trade((i64, i64, String, i64, i64, i64, i64, i64, i64, i64)),
    Balance((i64, String, i64, i64, i64)),
}

impl scylla::serialize::row::SerializeRow for Vals {
    fn serialize(
        &self,
        ctx: &scylla::serialize::row::RowSerializationContext<'_>,
        writer: &mut scylla::serialize::writers::RowWriter,
    ) -> Result<(), scylla::serialize::SerializationError> {
        match self {
            Vals::Trade(v) => v.serialize(ctx, writer),
            Vals::Balance(v) => v.serialize(ctx, writer),
        }
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// What [`measure`] saw.
pub struct Measured {
    /// Units of work that succeeded.
    pub units: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub secs: f64,
    /// Latency of each successful unit, seconds, sorted.
    pub lat: Vec<f64>,
}

/// Closed loop: `workers` tasks each run `unit` back to back for `secs` seconds.
pub async fn measure<F, Fut>(workers: usize, secs: f64, unit: F) -> Measured
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let unit = unit.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors, mut first_error) = (Vec::new(), 0u64, None);
            while Instant::now() < deadline {
                let s = Instant::now();
                match unit().await {
                    Ok(()) => lat.push(s.elapsed().as_secs_f64()),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (lat, errors, first_error)
        }));
    }
    let mut m = Measured {
        units: 0,
        errors: 0,
        first_error: None,
        secs: 0.0,
        lat: Vec::new(),
    };
    for t in tasks {
        let (lat, errors, first_error) = t.await.expect("worker task");
        m.lat.extend(lat);
        m.errors += errors;
        if m.first_error.is_none() {
            m.first_error = first_error;
        }
    }
    m.secs = t0.elapsed().as_secs_f64();
    m.lat.sort_by(f64::total_cmp);
    m.units = m.lat.len() as u64;
    m
}

/// The `p` quantile (0..=1) of sorted samples; NaN when there are none.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Seconds as milliseconds with two decimals; "-" when there was no sample (NaN).
pub fn ms(secs: f64) -> String {
    if secs.is_nan() {
        "-".into()
    } else {
        format!("{:.2}", secs * 1e3)
    }
}
