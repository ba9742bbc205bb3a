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
//! - (d) the 50-trade batch of (b) sent UNLOGGED, and then (b) and (d) head to head at 8
//!   workers, back to back in ABBA order: the batchlog's whole cost on this node, so the most
//!   any UNLOGGED design could gain over LOGGED micro-batches here;
//! - the node's raw capacity: single-row inserts (no batch) at several concurrencies, the best
//!   one being the ceiling in rows/s.
//!
//! Prints a markdown table. Run: `tools/cassandra start && cargo bench --bench cql_batches`.
//! Environment: `CQL_BENCH_SECS` (seconds per measurement, default 4),
//! `CQL_BENCH_CONCURRENCY` (default `1,8,32`), `CQL_BENCH_NODE` (default 127.0.0.1:9042).
//! Without a node it prints a skip message and exits 0.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use scylla::statement::batch::BatchType;
use settlement_wal::ledger::conformance::trade_entry;
use settlement_wal::ledger::cql::CqlLedger;
use settlement_wal::ledger::{EntryWrites, Ledger, LedgerError, StoreUrl};

mod common;
use common::{measure, ms, pct, LoggedStatements, Measured};

/// Rounds of the LOGGED-vs-UNLOGGED head-to-head (an even number: ABBA order).
const HEAD_TO_HEAD_ROUNDS: usize = 4;

/// What one worker does per iteration.
#[derive(Clone, Copy, Debug)]
enum Unit {
    /// One LOGGED batch holding `n` trades.
    Logged(usize),
    /// One UNLOGGED batch holding `n` trades: the LOGGED batch's exact statements, without the
    /// batchlog. What it saves over [`Unit::Logged`] is all any UNLOGGED design can gain on
    /// this node.
    Unlogged(usize),
    /// One `CqlLedger::apply` of `n` trades.
    Apply(usize),
    /// One single-row insert (raw capacity).
    Row,
}

impl Unit {
    fn trades(self) -> u64 {
        match self {
            Unit::Logged(n) | Unit::Unlogged(n) | Unit::Apply(n) => n as u64,
            Unit::Row => 0,
        }
    }

    fn label(self) -> String {
        match self {
            Unit::Logged(1) => "(a) LOGGED, 1 trade per batch".into(),
            Unit::Logged(n) => format!("(b) LOGGED, {n} trades per batch"),
            Unit::Unlogged(n) => format!("(d) the same batch UNLOGGED, {n} trades"),
            Unit::Apply(n) => format!(
                "(c) UNLOGGED via apply, {n} trade{} per apply",
                if n == 1 { "" } else { "s" }
            ),
            Unit::Row => "raw: single-row INSERT, no batch".into(),
        }
    }

    fn latency_unit(self) -> String {
        match self {
            Unit::Logged(n) | Unit::Unlogged(n) => format!("batch ({} stmts)", 5 * n),
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
    statements: LoggedStatements,
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

async fn run_unit(b: &Bench, unit: Unit) -> Result<(), String> {
    match unit {
        Unit::Logged(n) | Unit::Unlogged(n) | Unit::Apply(n) => {
            let first = b.next.fetch_add(n as u64, Ordering::Relaxed);
            let entries: Vec<EntryWrites> = (first..first + n as u64).map(trade).collect();
            if let Unit::Apply(_) = unit {
                b.ledger.apply(&entries).await.map_err(|e| e.to_string())
            } else {
                let batch_type = match unit {
                    Unit::Unlogged(_) => BatchType::Unlogged,
                    _ => BatchType::Logged,
                };
                let (batch, values) = b.statements.batch(&entries, batch_type);
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
                .execute_unpaged(
                    &b.statements.insert_balance,
                    (lsn % 100_000, "BTC", lsn, lsn, lsn),
                )
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    }
}

/// Runs `unit` on `workers` tasks for `secs` seconds.
async fn measure_unit(b: &Arc<Bench>, unit: Unit, workers: usize, secs: f64) -> Measured {
    let b = Arc::clone(b);
    measure(workers, secs, move || {
        let b = Arc::clone(&b);
        async move { run_unit(&b, unit).await }
    })
    .await
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
    let statements = LoggedStatements::prepare(ledger.session(), &keyspace).await;
    let cfg = ledger.config().clone();
    let b = Arc::new(Bench {
        ledger,
        statements,
        next: AtomicU64::new(1),
    });

    eprintln!("warming up (JIT, connections) for {secs} s...");
    let _ = measure_unit(&b, Unit::Apply(10), 8, secs).await;

    let mut units = vec![
        Unit::Logged(1),
        Unit::Logged(10),
        Unit::Logged(50),
        Unit::Unlogged(50),
    ];
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
            let m = measure_unit(&b, unit, w, secs).await;
            let tps = (m.units * unit.trades()) as f64 / m.secs;
            println!(
                "| {} | {w} | {:.0} | {:.0} | {} | {} | {} | {} |",
                unit.label(),
                tps,
                tps * 5.0,
                unit.latency_unit(),
                ms(pct(&m.lat, 0.50)),
                ms(pct(&m.lat, 0.99)),
                m.errors
            );
            if let Some(e) = m.first_error {
                eprintln!("  first error: {e}");
            }
        }
    }
    // What the batchlog costs on this node: the same 50-trade batch LOGGED and UNLOGGED, back
    // to back in ABBA order (the node keeps speeding up while its JVM warms).
    let mut pairs = Vec::new();
    for round in 0..HEAD_TO_HEAD_ROUNDS {
        let order = if round % 2 == 0 {
            [Unit::Logged(50), Unit::Unlogged(50)]
        } else {
            [Unit::Unlogged(50), Unit::Logged(50)]
        };
        let mut tps = [0.0f64; 2];
        for unit in order {
            let m = measure_unit(&b, unit, 8, secs).await;
            let i = usize::from(matches!(unit, Unit::Unlogged(_)));
            tps[i] = (m.units * unit.trades()) as f64 / m.secs;
        }
        pairs.push(tps);
    }
    let sum = |i: usize| pairs.iter().map(|p| p[i]).sum::<f64>();
    println!(
        "\nThe same 250-statement batch, 8 workers, {HEAD_TO_HEAD_ROUNDS} rounds back to back \
         (ABBA): LOGGED / UNLOGGED trades/s {}; UNLOGGED / LOGGED = **{:.2}x** over all rounds.\n",
        pairs
            .iter()
            .map(|p| format!("{:.0} / {:.0}", p[0], p[1]))
            .collect::<Vec<_>>()
            .join(", "),
        sum(1) / sum(0)
    );

    let mut best = 0.0f64;
    let mut raw_levels = levels.clone();
    for extra in [64, 128] {
        if !raw_levels.contains(&extra) {
            raw_levels.push(extra);
        }
    }
    for &w in &raw_levels {
        let m = measure_unit(&b, Unit::Row, w, secs).await;
        let rps = m.units as f64 / m.secs;
        best = best.max(rps);
        println!(
            "| {} | {w} | {:.0} | {:.0} | {} | {} | {} | {} |",
            Unit::Row.label(),
            rps / 5.0,
            rps,
            Unit::Row.latency_unit(),
            ms(pct(&m.lat, 0.50)),
            ms(pct(&m.lat, 0.99)),
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
