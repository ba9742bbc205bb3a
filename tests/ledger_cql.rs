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
use settlement_wal::ledger::cql::{CqlLedger, SCHEMA_VERSION};
use settlement_wal::ledger::{
    BalanceKey, BalanceRow, CqlConfig, EntryWrites, Ledger, LedgerError, StoreUrl,
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
                "INSERT INTO {keyspace}.schema_version (component, version) VALUES ('ledger', 2) \
                 USING TIMESTAMP 2"
            ),
            (),
        )
        .await
        .unwrap();
    let err = CqlLedger::connect(config_for(&keyspace)).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("schema version 2") && msg.contains("newer"),
        "{msg}"
    );
    assert_eq!(second.stored_schema_version().await.unwrap(), Some(2));
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

/// An apply much larger than one batch, with the default split (20 statements per UNLOGGED
/// batch), lands completely and never trips Cassandra's batch size warning (5 KiB here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_batches_stay_below_the_size_warning() {
    let Some((ledger, keyspace)) = connect_or_skip("size").await else {
        return;
    };
    assert_eq!(ledger.config().max_statements_per_batch, 20);
    let n = 2000u64;
    // Long-ish symbols and large numbers: the widest rows settlement writes.
    let entries: Vec<EntryWrites> = (0..n)
        .map(|i| {
            let mut e = trade_entry(
                1_000_000_000 + i,
                u64::from(u32::MAX) + i,
                1_000_000 + i,
                2_000_000 + i,
                [i64::MAX - 1, i64::MIN + 1, -(i as i64), i as i64],
            );
            if let Some(settlement_wal::ledger::EventRow::Trade(t)) = &mut e.event {
                t.symbol = "ABCDEFGHIJKLMNOP-QRSTUVWXYZABCDEF".into();
            }
            for b in &mut e.balances {
                b.key.asset = if b.key.asset == "BTC" {
                    "ABCDEFGHIJKLMNOP".into()
                } else {
                    "QRSTUVWXYZABCDEF".into()
                };
            }
            e
        })
        .collect();
    let t0 = Instant::now();
    ledger.apply(&entries).await.unwrap();
    eprintln!(
        "applied {n} trades ({} statements) in {:?}",
        n * 5,
        t0.elapsed()
    );
    assert!(ledger
        .trade_exists(u64::from(u32::MAX) + n - 1)
        .await
        .unwrap());
    assert_eq!(ledger.scan_trades().await.unwrap().len() as u64, n);
    assert_eq!(ledger.scan_balances().await.unwrap().len() as u64, 4 * n);

    match node_log() {
        Some(log) => {
            let bad: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(&keyspace) && l.contains("exceeding"))
                .collect();
            assert!(
                bad.is_empty(),
                "batch size warnings in the node log:\n{}",
                bad.join("\n")
            );
        }
        None => eprintln!("note: node log not found; batch size warnings not checked"),
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

/// The negative control of the check above: batches far larger than the default do show up in
/// the node's log as "exceeding", so an empty grep there means something.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_batches_do_trip_the_size_warning() {
    let keyspace = fresh_keyspace("oversize");
    let mut config = config_for(&keyspace);
    config.max_statements_per_batch = 300;
    let ledger = match CqlLedger::connect(config).await {
        Ok(l) => l,
        Err(_) => {
            drop(connect_or_skip("oversize").await);
            return;
        }
    };
    let Some(_) = node_log() else {
        eprintln!("note: node log not found; nothing to check");
        return;
    };
    let entries: Vec<EntryWrites> = (0..60u64)
        .map(|i| trade_entry(i + 1, i + 1, 1000 + i, 2000 + i, [1, -1, -1, 1]))
        .collect();
    ledger.apply(&entries).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = node_log().unwrap_or_default();
        let hit = log
            .lines()
            .find(|l| l.contains(&keyspace) && l.contains("exceeding"));
        if let Some(line) = hit {
            eprintln!("node log: {line}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a 300-statement batch did not produce a size warning for {keyspace}"
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
