//! The CQL ledger against a real Cassandra node on 127.0.0.1:9042 (`tools/cassandra start`):
//! the shared conformance suite, schema creation, unreachable stores, and batch sizes.
//!
//! Without a node these tests print a skip message and pass, except under CI (`CI` set), where
//! the node must be there and its absence fails them.
//! The node-restart test lives in `tests/ledger_cql_restart.rs` (it stops the shared node).

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use settlement_wal::ledger::conformance::{self, deposit_entry, trade_entry};
use settlement_wal::ledger::cql::{
    estimated_statement_bytes, plan_batches, BatchSizeWarnings, CqlLedger, SCHEMA_VERSION,
};
use settlement_wal::ledger::{
    coalesce, BalanceKey, BalanceRow, CqlConfig, EntryWrites, EventRow, Ledger, LedgerError,
    StoreUrl, DEFAULT_MAX_BATCH_BYTES, MAX_BATCH_BYTES_LIMIT,
};

const NODE: &str = "127.0.0.1:9042";

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// A keyspace name no other test (or run) uses.
fn fresh_keyspace(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000_000;
    format!(
        "settle_test_{tag}_{}_{nanos}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn config_for(keyspace: &str) -> CqlConfig {
    let url = format!("cql://{NODE}/{keyspace}?consistency=one");
    match url.parse::<StoreUrl>().unwrap() {
        StoreUrl::Cql(c) => c,
        other => panic!("not a cql url: {other}"),
    }
}

/// Connects to a fresh keyspace on the local node; `None` (after a skip message) when there is
/// no node and we are not under CI.
async fn connect_or_skip(tag: &str) -> Option<(CqlLedger, String)> {
    let keyspace = fresh_keyspace(tag);
    match CqlLedger::connect(config_for(&keyspace)).await {
        Ok(ledger) => Some((ledger, keyspace)),
        Err(e @ LedgerError::Unreachable { .. }) => {
            if under_ci() {
                panic!(
                    "CI is set but Cassandra is not reachable on {NODE}: {e}\n\
                     (CI must start the node first: tools/cassandra start)"
                );
            }
            eprintln!("skipping: no Cassandra on {NODE} (run tools/cassandra start)");
            None
        }
        Err(e) => panic!("connecting to {NODE}/{keyspace} failed: {e}"),
    }
}

async fn drop_keyspace(ledger: &CqlLedger, keyspace: &str) {
    let cql = format!("DROP KEYSPACE IF EXISTS {keyspace}");
    if let Err(e) = ledger.session().query_unpaged(cql, ()).await {
        eprintln!("note: could not drop keyspace {keyspace}: {e}");
    }
}

/// The node's log (tools/cassandra keeps it under its cache dir).
fn node_log() -> Option<String> {
    let dir = std::env::var_os("CASSANDRA_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/.cache/cassandra")
        });
    std::fs::read_to_string(dir.join("logs/cassandra.out")).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_store_passes_the_conformance_suite() {
    let Some((ledger, keyspace)) = connect_or_skip("conf").await else {
        return;
    };
    assert_eq!(ledger.describe(), format!("cql://{NODE}/{keyspace}"));
    conformance::run_all(&ledger, 0).await;
    // A second, disjoint run in the same keyspace does not interfere.
    conformance::run_all(&ledger, 1_000_000).await;
    drop_keyspace(&ledger, &keyspace).await;
}

/// Bulk event lookups give the same answers whatever their shape: one single-partition read
/// per key, or `IN` queries of a few keys (chunks that end mid-table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_lookups_agree_for_every_query_shape() {
    let Some((ledger, keyspace)) = connect_or_skip("lookups").await else {
        return;
    };
    for (i, (keys_per_read, inflight_reads)) in [(1, 16), (7, 3), (1000, 1)].into_iter().enumerate()
    {
        let mut config = config_for(&keyspace);
        config.max_keys_per_read = keys_per_read;
        config.max_inflight_reads = inflight_reads;
        let ledger = CqlLedger::connect(config).await.unwrap();
        conformance::bulk_event_lookups(&ledger, 10_000_000 * (i as u64 + 1)).await;
    }
    drop_keyspace(&ledger, &keyspace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_creation_is_idempotent_and_versioned() {
    let Some((first, keyspace)) = connect_or_skip("schema").await else {
        return;
    };
    assert_eq!(
        first.stored_schema_version().await.unwrap(),
        Some(SCHEMA_VERSION)
    );
    first
        .apply(&[deposit_entry(5, 50, 1, "USDT", 100, 100)])
        .await
        .unwrap();

    // Connecting again to the same keyspace keeps the data and the single version row.
    let second = CqlLedger::connect(config_for(&keyspace)).await.unwrap();
    assert_eq!(
        second.stored_schema_version().await.unwrap(),
        Some(SCHEMA_VERSION)
    );
    assert_eq!(
        second
            .read_balances(&[BalanceKey::new(1, "USDT")])
            .await
            .unwrap(),
        vec![Some(BalanceRow {
            amount: 100,
            last_lsn: 5
        })]
    );
    assert_eq!(second.movement_lsn(50).await.unwrap(), Some(5));
    let rows = second
        .session()
        .query_unpaged(
            format!("SELECT component, version FROM {keyspace}.schema_version"),
            (),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap();
    assert_eq!(rows.rows_num(), 1, "exactly one schema_version row");

    // A schema from a newer build is refused with a clear error, and left alone.
    second
        .session()
        .query_unpaged(
            format!(
                "INSERT INTO {keyspace}.schema_version (component, version) VALUES ('ledger', 3) \
                 USING TIMESTAMP 3"
            ),
            (),
        )
        .await
        .unwrap();
    let err = CqlLedger::connect(config_for(&keyspace)).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("schema version 3") && msg.contains("newer"),
        "{msg}"
    );
    assert_eq!(second.stored_schema_version().await.unwrap(), Some(3));
    drop_keyspace(&second, &keyspace).await;
}

/// Connecting to something that is not a Cassandra node fails with `Unreachable` naming it,
/// in bounded time. Needs no node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_store_is_reported_with_its_contact_point() {
    // A port that was free a moment ago (bound, then released).
    let free_port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cases = vec![
        vec!["127.0.0.1:1".to_string()],
        vec![format!("127.0.0.1:{free_port}")],
        vec!["127.0.0.1:1".to_string(), format!("127.0.0.1:{free_port}")],
    ];
    for points in cases {
        let mut config = CqlConfig::new(points.clone(), "settle_unreachable");
        config.connect_timeout_ms = 2000;
        config.request_timeout_ms = 2000;
        let t0 = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(60), CqlLedger::connect(config))
            .await
            .expect("connect did not return within 60 s");
        let took = t0.elapsed();
        eprintln!("unreachable {points:?}: returned after {took:?}");
        match result {
            Err(LedgerError::Unreachable { target, reason }) => {
                for p in &points {
                    assert!(target.contains(p.as_str()), "target {target:?} names {p}");
                }
                assert!(!reason.is_empty());
                let msg = LedgerError::Unreachable { target, reason }.to_string();
                assert!(msg.contains(points[0].as_str()), "{msg}");
            }
            Err(other) => panic!("{points:?}: expected Unreachable, got {other}"),
            Ok(_) => panic!("{points:?}: connected to a closed port?"),
        }
        assert!(took < Duration::from_secs(30), "{points:?} took {took:?}");
    }
}

/// The widest trade entries settlement writes: long symbols and asset names, large numbers.
fn wide_trade_entries(n: u64) -> Vec<EntryWrites> {
    (0..n)
        .map(|i| {
            let mut e = trade_entry(
                1_000_000_000 + i,
                u64::from(u32::MAX) + i,
                1_000_000 + i % 100,
                2_000_000 + i % 100,
                [i64::MAX - 1, i64::MIN + 1, -(i as i64), i as i64],
            );
            if let Some(EventRow::Trade(t)) = &mut e.event {
                t.symbol = "ABCDEFGHIJKLMNOP-QRSTUVWXYZABCDEF".parse().unwrap();
            }
            for b in &mut e.balances {
                b.key.asset = if b.key.asset == "BTC" {
                    "ABCDEFGHIJKLMNOP".parse().unwrap()
                } else {
                    "QRSTUVWXYZABCDEF".parse().unwrap()
                };
            }
            e
        })
        .collect()
}

/// Size warnings for `keyspace` in the node's log (`None` when the log is not found).
fn size_warnings_in_node_log(keyspace: &str) -> Option<Vec<String>> {
    Some(
        node_log()?
            .lines()
            .filter(|l| l.contains(keyspace) && l.contains("exceeding"))
            .map(str::to_string)
            .collect(),
    )
}

/// Micro-batches in the pipeline's order (every event row first, then the coalesced balance
/// rows: `coalesce` in `src/settle/pipeline.rs`, `ledger::coalesce`), much larger than one
/// batch, with the default limits: every batch stays within `batch_bytes` by the estimate, the
/// node sends no size warning back and logs none, and everything lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_batches_stay_below_the_size_warning() {
    let Some((ledger, keyspace)) = connect_or_skip("size").await else {
        return;
    };
    let config = ledger.config().clone();
    assert_eq!(
        (config.max_statements_per_batch, config.max_batch_bytes),
        (20, DEFAULT_MAX_BATCH_BYTES)
    );
    let n = 2000u64;
    let entries = wide_trade_entries(n);
    let t0 = Instant::now();
    for micro_batch in entries.chunks(1000) {
        let writes = coalesce(micro_batch.to_vec());
        assert!(writes[..micro_batch.len()]
            .iter()
            .all(|w| w.event.is_some() && w.balances.is_empty()));
        let shapes = plan_batches(&writes, &config).unwrap();
        for s in &shapes {
            assert!(
                s.estimated_bytes <= config.max_batch_bytes && s.statements <= 20,
                "{s:?}"
            );
        }
        // Event rows alone would make 20-statement batches of about 5.9 KiB: bytes decide.
        assert!(shapes[0].statements < 20, "{:?}", shapes[0]);
        ledger.apply(&writes).await.unwrap();
    }
    eprintln!(
        "applied {n} trades in the pipeline's order in {:?}",
        t0.elapsed()
    );
    assert_eq!(
        ledger.batch_size_warnings(),
        BatchSizeWarnings::default(),
        "the node warned about batch sizes"
    );
    assert!(ledger
        .trade_exists(u64::from(u32::MAX) + n - 1)
        .await
        .unwrap());
    assert_eq!(ledger.scan_trades().await.unwrap().len() as u64, n);
    assert_eq!(ledger.scan_balances().await.unwrap().len(), 4 * 100);
    match size_warnings_in_node_log(&keyspace) {
        Some(bad) => assert!(
            bad.is_empty(),
            "batch size warnings in the node log:\n{}",
            bad.join("\n")
        ),
        None => eprintln!("note: node log not found; only the driver's warnings were checked"),
    }
    drop_keyspace(&ledger, &keyspace).await;
}

/// u64 values beyond i64 (the store's bigint) are rejected as invalid input before anything is
/// written, never wrapped or panicked on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_beyond_bigint_are_invalid_and_nothing_is_written() {
    let Some((ledger, keyspace)) = connect_or_skip("range").await else {
        return;
    };
    let ok = deposit_entry(1, 10, 7, "BTC", 1, 1);
    let mut bad = deposit_entry(2, 11, 7, "ETH", 1, 1);
    bad.balances[0].key.user_id = u64::MAX;
    let err = ledger.apply(&[ok, bad]).await.unwrap_err();
    assert!(matches!(err, LedgerError::Invalid(_)), "{err}");
    assert_eq!(
        ledger.movement_lsn(10).await.unwrap(),
        None,
        "nothing written"
    );
    let err = ledger.trade_lsn(u64::MAX).await.unwrap_err();
    assert!(matches!(err, LedgerError::Invalid(_)), "{err}");
    drop_keyspace(&ledger, &keyspace).await;
}

/// The negative control of the checks above: with the old split (20 statements, no byte limit)
/// the same pipeline-ordered writes do come back with size warnings, seen through the driver
/// and in the node's log, so zero warnings there means something.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_count_alone_trips_the_size_warning() {
    let keyspace = fresh_keyspace("oversize");
    let mut config = config_for(&keyspace);
    config.max_batch_bytes = MAX_BATCH_BYTES_LIMIT;
    let ledger = match CqlLedger::connect(config).await {
        Ok(l) => l,
        Err(_) => {
            drop(connect_or_skip("oversize").await);
            return;
        }
    };
    let entries: Vec<EntryWrites> = (0..200u64)
        .map(|i| trade_entry(i + 1, i + 1, 1000 + i % 50, 2000 + i % 50, [1, -1, -1, 1]))
        .collect();
    ledger.apply(&coalesce(entries)).await.unwrap();
    let warned = ledger.batch_size_warnings();
    // 200 trade rows make 10 batches of 20 (about 5.4 KiB each, as the finding measured).
    assert_eq!(warned.batches, 10, "{warned:?}");
    let largest = warned
        .largest_reported_bytes
        .expect("a size in the warning");
    assert!((5 * 1024..6 * 1024).contains(&largest), "{warned:?}");
    if node_log().is_none() {
        eprintln!("note: node log not found; only the driver's warnings were checked");
        drop_keyspace(&ledger, &keyspace).await;
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let hits = size_warnings_in_node_log(&keyspace).unwrap_or_default();
        if let Some(line) = hits.first() {
            eprintln!("node log: {line}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "20-trade batches did not produce a size warning in the node log for {keyspace}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop_keyspace(&ledger, &keyspace).await;
}

/// `dc=` turns on datacenter-aware load balancing; a datacenter the cluster does not have is a
/// configuration error named at connect time, not an empty query plan on every write later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datacenter_preference_is_checked_at_connect() {
    let Some((ledger, keyspace)) = connect_or_skip("dc").await else {
        return;
    };
    let local_dc = ledger
        .session()
        .query_unpaged("SELECT data_center FROM system.local", ())
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .single_row::<(String,)>()
        .unwrap()
        .0;
    let mut config = config_for(&keyspace);
    config.datacenter = Some(local_dc.clone());
    let with_dc = CqlLedger::connect(config.clone()).await.unwrap();
    with_dc
        .apply(&[deposit_entry(1, 1, 1, "BTC", 5, 5)])
        .await
        .unwrap();
    assert_eq!(with_dc.movement_lsn(1).await.unwrap(), Some(1));

    config.datacenter = Some("no_such_dc".into());
    let err = CqlLedger::connect(config).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, LedgerError::BadUrl { .. })
            && msg.contains("no_such_dc")
            && msg.contains(&local_dc),
        "{msg}"
    );
    drop_keyspace(&ledger, &keyspace).await;
}

/// Inspection tools open the store read-only: a keyspace without the schema is refused with
/// nothing created, an existing one is readable, and writes are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_connect_creates_nothing_and_refuses_writes() {
    let Some((ledger, keyspace)) = connect_or_skip("readonly").await else {
        return;
    };
    let mut config = config_for(&keyspace);
    config.read_only = true;
    let ro = CqlLedger::connect(config).await.unwrap();
    let err = ro
        .apply(&[conformance::deposit_entry(1, 1, 1, "BTC", 1, 1)])
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::Rejected(_)), "{err:?}");
    assert!(ro.scan_balances().await.unwrap().is_empty());
    let mut absent = config_for(&fresh_keyspace("absent"));
    absent.read_only = true;
    let err = CqlLedger::connect(absent).await.expect_err("no schema");
    assert!(
        err.to_string().contains("holds no settlement schema"),
        "{err}"
    );
    drop_keyspace(&ledger, &keyspace).await;
}

/// Applies `entries` as one UNLOGGED batch on a new connection to `keyspace` and returns the
/// size the node reported in its batch-size warning (`None`: no warning).
async fn node_counted_bytes(keyspace: &str, entries: &[EntryWrites]) -> Option<u64> {
    let mut config = config_for(keyspace);
    config.max_statements_per_batch = 1000;
    config.max_batch_bytes = MAX_BATCH_BYTES_LIMIT;
    let ledger = CqlLedger::connect(config.clone()).await.unwrap();
    assert_eq!(plan_batches(entries, &config).unwrap().len(), 1);
    ledger.apply(entries).await.unwrap();
    let w = ledger.batch_size_warnings();
    assert!(w.batches <= 1, "{w:?}");
    w.largest_reported_bytes
}

/// The size estimate that splits batches is never below what the node counts for the same
/// batch (read from the node's own warning), for every kind of row settlement writes and for
/// short and long strings, and not far above it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estimate_covers_what_the_node_counts() {
    let Some((ledger, keyspace)) = connect_or_skip("estimate").await else {
        return;
    };
    let trades = |n: u64, symbol: &str| -> Vec<EntryWrites> {
        (0..n)
            .map(|i| {
                let mut e = trade_entry(1 + i, 1 + i, 10 + i, 20 + i, [1, -1, -1, 1]);
                e.balances.clear();
                if let Some(EventRow::Trade(t)) = &mut e.event {
                    t.symbol = symbol.parse().unwrap();
                }
                e
            })
            .collect()
    };
    let movements = |n: u64, asset: &str| -> Vec<EntryWrites> {
        (0..n)
            .map(|i| {
                let mut e = deposit_entry(1 + i, 5000 + i, 30 + i, asset, 7, 7);
                e.balances.clear();
                e
            })
            .collect()
    };
    let balances = |n: u64, asset: &str| -> Vec<EntryWrites> {
        (0..n)
            .map(|i| {
                let mut e = deposit_entry(1 + i, 9000 + i, 100 + i, asset, 7, 7);
                e.event = None;
                e
            })
            .collect()
    };
    let mixed = coalesce(
        (0..30u64)
            .map(|i| trade_entry(1 + i, 20_000 + i, 1 + i % 7, 8 + i % 5, [1, -1, -1, 1]))
            .collect::<Vec<_>>(),
    );
    let cases: Vec<(&str, Vec<EntryWrites>)> = vec![
        ("trades BTC-USDT", trades(30, "BTC-USDT")),
        (
            "trades long symbol",
            trades(30, "ABCDEFGHIJKLMNOP-QRSTUVWXYZABCDEF"),
        ),
        ("movements", movements(60, "USDT")),
        ("movements long asset", movements(60, "ABCDEFGHIJKLMNOP")),
        ("balances", balances(120, "BTC")),
        ("balances long asset", balances(120, "ABCDEFGHIJKLMNOP")),
        ("pipeline order", mixed),
    ];
    for (name, entries) in cases {
        let estimate: usize = estimated_statement_bytes(&entries).unwrap().iter().sum();
        let counted = node_counted_bytes(&keyspace, &entries).await;
        eprintln!("{name}: estimate {estimate} bytes, node counted {counted:?}");
        let Some(counted) = counted else {
            panic!("{name}: no size warning for an estimated {estimate} bytes")
        };
        assert!(
            estimate as u64 >= counted,
            "{name}: estimate {estimate} below the node's {counted}"
        );
        assert!(
            estimate as u64 <= counted + counted / 5,
            "{name}: estimate {estimate} more than 20% above the node's {counted}"
        );
    }
    drop_keyspace(&ledger, &keyspace).await;
}
