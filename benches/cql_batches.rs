//! LOGGED vs UNLOGGED batches against a real Cassandra node (127.0.0.1:9042), in one run.
//!
//! A trade is 1 `trades` insert + 4 `balances` inserts (5 rows), each with its LSN as the write
//! timestamp, as settlement writes them. Scenarios, each at several concurrency levels (worker
//! tasks, each issuing its unit of work back to back):
//!
//! - (a) one LOGGED batch per trade (5 statements);
//! - (b) LOGGED micro-batches of 10 and 50 trades (50 / 250 statements);
//! - (c) `CqlLedger::apply` of 1, 10 and 50 trades: UNLOGGED batches with the default split
//!   (30 statements per batch, up to 16 in flight per apply);
//! - the node's raw capacity: single-row inserts (no batch) at several concurrencies, the best
//!   one being the ceiling in rows/s.
//!
//! Prints a markdown table. Run: `tools/cassandra start && cargo bench --bench cql_batches`.
//! Environment: `CQL_BENCH_SECS` (seconds per measurement, default 4),
//! `CQL_BENCH_CONCURRENCY` (default `1,8,32`), `CQL_BENCH_NODE` (default 127.0.0.1:9042).
//! Without a node it prints a skip message and exits 0.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;
use settlement_wal::ledger::conformance::trade_entry;
use settlement_wal::ledger::cql::CqlLedger;
use settlement_wal::ledger::{EntryWrites, EventRow, Ledger, LedgerError, StoreUrl};

/// What one worker does per iteration.
#[derive(Clone, Copy, Debug)]
enum Unit {
    /// One LOGGED batch holding `n` trades.
    Logged(usize),
    /// One `CqlLedger::apply` of `n` trades.
    Apply(usize),
    /// One single-row insert (raw capacity).
    Row,
}

impl Unit {
    fn trades(self) -> u64 {
        match self {
            Unit::Logged(n) | Unit::Apply(n) => n as u64,
            Unit::Row => 0,
        }
    }

    fn label(self) -> String {
        match self {
            Unit::Logged(1) => "(a) LOGGED, 1 trade per batch".into(),
            Unit::Logged(n) => format!("(b) LOGGED, {n} trades per batch"),
            Unit::Apply(n) => format!(
                "(c) UNLOGGED via apply, {n} trade{} per apply",
                if n == 1 { "" } else { "s" }
            ),
            Unit::Row => "raw: single-row INSERT, no batch".into(),
        }
    }

    fn latency_unit(self) -> String {
        match self {
            Unit::Logged(n) => format!("batch ({} stmts)", 5 * n),
            Unit::Apply(n) => {
                let stmts = 5 * n;
                format!("apply ({stmts} stmts, {} batch(es))", stmts.div_ceil(30))
            }
            Unit::Row => "insert".into(),
        }
    }
}

struct Bench {
    ledger: CqlLedger,
    insert_trade: PreparedStatement,
    insert_balance: PreparedStatement,
    /// LSNs / trade ids, unique across the whole run.
    next: AtomicU64,
}

/// Trade `lsn` between pseudo-random users among 100k.
fn trade(lsn: u64) -> EntryWrites {
    let h = lsn.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let buyer = 1 + (h >> 20) % 100_000;
    let seller = 1 + (h >> 40) % 100_000;
    let q = (lsn % 97) as i64;
    trade_entry(lsn, lsn, buyer, seller, [q, -q * 65_000, -q, q * 65_000])
}

/// A LOGGED batch (and its values) for `entries`, statements as in `CqlLedger::apply`.
fn logged_batch(b: &Bench, entries: &[EntryWrites]) -> (Batch, Vec<Vals>) {
    let mut batch = Batch::new(BatchType::Logged);
    batch.set_consistency(Consistency::One);
    batch.set_is_idempotent(true);
    let mut values = Vec::with_capacity(entries.len() * 5);
    for e in entries {
        if let Some(EventRow::Trade(t)) = &e.event {
            batch.append_statement(b.insert_trade.clone());
            let lsn = t.lsn as i64;
            values.push(Vals::Trade((
                t.trade_id as i64,
                t.output_sequence as i64,
                t.symbol.clone(),
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
            batch.append_statement(b.insert_balance.clone());
            let lsn = w.lsn as i64;
            values.push(Vals::Balance((
                w.key.user_id as i64,
                w.key.asset.clone(),
                w.amount,
                lsn,
                lsn,
            )));
        }
    }
    (batch, values)
}

/// Batch values of mixed statements (the driver needs one type per batch).
enum Vals {
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

async fn run_unit(b: &Bench, unit: Unit) -> Result<(), String> {
    match unit {
        Unit::Logged(n) | Unit::Apply(n) => {
            let first = b.next.fetch_add(n as u64, Ordering::Relaxed);
            let entries: Vec<EntryWrites> = (first..first + n as u64).map(trade).collect();
            if let Unit::Apply(_) = unit {
                b.ledger.apply(&entries).await.map_err(|e| e.to_string())
            } else {
                let (batch, values) = logged_batch(b, &entries);
                b.ledger
                    .session()
                    .batch(&batch, &values)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        }
        Unit::Row => {
            let lsn = b.next.fetch_add(1, Ordering::Relaxed) as i64;
            b.ledger
                .session()
                .execute_unpaged(&b.insert_balance, (lsn % 100_000, "BTC", lsn, lsn, lsn))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    }
}

struct Measured {
    units: u64,
    trades: u64,
    errors: u64,
    secs: f64,
    p50: Duration,
    p99: Duration,
    first_error: Option<String>,
}

async fn measure(b: &Arc<Bench>, unit: Unit, workers: usize, secs: f64) -> Measured {
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let b = Arc::clone(b);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            while Instant::now() < deadline {
                let s = Instant::now();
                match run_unit(&b, unit).await {
                    Ok(()) => lat.push(s.elapsed()),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (lat, errors, first_error)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (lat, e, fe) = t.await.unwrap();
        all.extend(lat);
        errors += e;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        if all.is_empty() {
            Duration::ZERO
        } else {
            all[((all.len() as f64 * p) as usize).min(all.len() - 1)]
        }
    };
    Measured {
        units: all.len() as u64,
        trades: all.len() as u64 * unit.trades(),
        errors,
        secs,
        p50: pct(0.50),
        p99: pct(0.99),
        first_error,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let secs: f64 = std::env::var("CQL_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4.0);
    let levels: Vec<usize> = std::env::var("CQL_BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,8,32".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .filter(|&n| n > 0)
        .collect();
    let node = std::env::var("CQL_BENCH_NODE").unwrap_or_else(|_| "127.0.0.1:9042".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(node, secs, levels));
}

async fn run(node: String, secs: f64, levels: Vec<usize>) {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000_000;
    let keyspace = format!("settle_bench_{}_{nanos}", std::process::id());
    let StoreUrl::Cql(config) = format!("cql://{node}/{keyspace}?consistency=one")
        .parse::<StoreUrl>()
        .unwrap()
    else {
        unreachable!()
    };
    let ledger = match CqlLedger::connect(config).await {
        Ok(l) => l,
        Err(e @ LedgerError::Unreachable { .. }) => {
            println!("skipping: no Cassandra on {node} (run tools/cassandra start): {e}");
            return;
        }
        Err(e) => panic!("connect: {e}"),
    };
    let prep = |cql: String| {
        let s = ledger.session();
        async move {
            let mut p = s.prepare(cql).await.unwrap();
            p.set_is_idempotent(true);
            p.set_consistency(Consistency::One);
            p
        }
    };
    let insert_trade = prep(format!(
        "INSERT INTO {keyspace}.trades (trade_id, output_sequence, symbol, buyer_user_id, \
         seller_user_id, price, quantity, timestamp_ns, lsn) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
         USING TIMESTAMP ?"
    ))
    .await;
    let insert_balance = prep(format!(
        "INSERT INTO {keyspace}.balances (user_id, asset, amount, last_lsn) VALUES (?, ?, ?, ?) \
         USING TIMESTAMP ?"
    ))
    .await;
    let cfg = ledger.config().clone();
    let b = Arc::new(Bench {
        ledger,
        insert_trade,
        insert_balance,
        next: AtomicU64::new(1),
    });

    eprintln!("warming up (JIT, connections) for {secs} s...");
    let _ = measure(&b, Unit::Apply(10), 8, secs).await;

    let mut units = vec![Unit::Logged(1), Unit::Logged(10), Unit::Logged(50)];
    units.extend([Unit::Apply(1), Unit::Apply(10), Unit::Apply(50)]);

    println!(
        "CQL batch benchmark: {node}, consistency ONE, {secs} s per row, apply split = {} \
         statements per UNLOGGED batch, {} batches in flight per apply\n",
        cfg.max_statements_per_batch, cfg.max_inflight_batches
    );
    println!(
        "| scenario | workers | trades/s | rows/s | latency unit | p50 ms | p99 ms | errors |"
    );
    println!("|---|---:|---:|---:|---|---:|---:|---:|");
    for &unit in &units {
        for &w in &levels {
            let m = measure(&b, unit, w, secs).await;
            let tps = m.trades as f64 / m.secs;
            println!(
                "| {} | {w} | {:.0} | {:.0} | {} | {} | {} | {} |",
                unit.label(),
                tps,
                tps * 5.0,
                unit.latency_unit(),
                ms(m.p50),
                ms(m.p99),
                m.errors
            );
            if let Some(e) = m.first_error {
                eprintln!("  first error: {e}");
            }
        }
    }
    let mut best = 0.0f64;
    let mut raw_levels = levels.clone();
    for extra in [64, 128] {
        if !raw_levels.contains(&extra) {
            raw_levels.push(extra);
        }
    }
    for &w in &raw_levels {
        let m = measure(&b, Unit::Row, w, secs).await;
        let rps = m.units as f64 / m.secs;
        best = best.max(rps);
        println!(
            "| {} | {w} | {:.0} | {:.0} | {} | {} | {} | {} |",
            Unit::Row.label(),
            rps / 5.0,
            rps,
            Unit::Row.latency_unit(),
            ms(m.p50),
            ms(m.p99),
            m.errors
        );
    }
    println!(
        "\nRaw ceiling: {best:.0} single-row inserts/s = {:.0} trades/s at 5 rows per trade.",
        best / 5.0
    );

    let _ = b
        .ledger
        .session()
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
        .await;
}
