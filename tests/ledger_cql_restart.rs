//! The CQL ledger while the node goes away and comes back: applies fail with a bounded number
//! of retries (`Unknown`/`Unreachable`), nothing is reported applied that was not written, and
//! the same `CqlLedger` carries on once the node is back.
//!
//! This test STOPS the shared local node (`tools/cassandra stop`) and starts it again; a guard
//! restarts it even when the test fails. It skips without a node (fails under CI).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use settlement_wal::ledger::conformance::trade_entry;
use settlement_wal::ledger::cql::CqlLedger;
use settlement_wal::ledger::{BalanceKey, BalanceRow, CqlConfig, Ledger, LedgerError, StoreUrl};

const NODE: &str = "127.0.0.1:9042";

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

fn cassandra(cmd: &str) -> bool {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/cassandra");
    let t0 = Instant::now();
    let status = Command::new(&script)
        .arg(cmd)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status();
    eprintln!("tools/cassandra {cmd}: {status:?} after {:?}", t0.elapsed());
    matches!(status, Ok(s) if s.success())
}

/// Starts the node again when dropped, whatever happened in between.
struct RestartGuard;

impl Drop for RestartGuard {
    fn drop(&mut self) {
        if !cassandra("start") {
            eprintln!("WARNING: could not restart the Cassandra node; run tools/cassandra start");
        }
    }
}

fn config() -> CqlConfig {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000_000;
    let keyspace = format!("settle_test_restart_{}_{nanos}", std::process::id());
    let url = format!(
        "cql://{NODE}/{keyspace}?consistency=one&request_timeout_ms=2000&connect_timeout_ms=2000&max_attempts=3"
    );
    match url.parse::<StoreUrl>().unwrap() {
        StoreUrl::Cql(c) => c,
        other => panic!("not a cql url: {other}"),
    }
}

/// Trade `i` (LSN `i`) with post-images derived from `i`; 5 row writes.
fn entry(i: u64) -> settlement_wal::ledger::EntryWrites {
    trade_entry(
        i,
        10_000 + i,
        1 + i % 13,
        100 + i % 11,
        [i as i64, -(i as i64), -(i as i64), i as i64],
    )
}

/// Bound for one failing apply: 3 attempts of at most 2 s, backoff below 2 s each, margin.
const FAILING_APPLY_BOUND: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stopped_mid_run_then_restarted() {
    let config = config();
    let keyspace = config.keyspace.clone();
    let ledger = match CqlLedger::connect(config.clone()).await {
        Ok(l) => l,
        Err(e @ LedgerError::Unreachable { .. }) => {
            if under_ci() {
                panic!("CI is set but Cassandra is not reachable on {NODE}: {e} (run tools/cassandra start first)");
            }
            eprintln!("skipping: no Cassandra on {NODE} (run tools/cassandra start)");
            return;
        }
        Err(e) => panic!("connect: {e}"),
    };
    let guard = RestartGuard;

    // Apply one trade per call, in a loop, until an apply fails (the node is being stopped).
    let applier = {
        let ledger = std::sync::Arc::new(ledger);
        let l = std::sync::Arc::clone(&ledger);
        let task = tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 1u64;
            let deadline = Instant::now() + Duration::from_secs(180);
            loop {
                let t0 = Instant::now();
                match l.apply(&[entry(i)]).await {
                    Ok(()) => acked.push(i),
                    Err(e) => return (acked, Some((i, e, t0.elapsed()))),
                }
                if Instant::now() > deadline {
                    return (acked, None);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        (ledger, task)
    };
    let (ledger, task) = applier;

    // Let some applies land, then stop the node under the applier's feet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped = tokio::task::spawn_blocking(|| cassandra("stop"))
        .await
        .unwrap();
    assert!(stopped, "tools/cassandra stop failed");

    let (acked, failure) = task.await.unwrap();
    let (failed_i, err, took) = failure.expect("no apply failed although the node was stopped");
    eprintln!(
        "{} applies acknowledged; apply {failed_i} failed after {took:?}: {err}",
        acked.len()
    );
    assert!(!acked.is_empty(), "nothing was applied before the stop");
    assert!(
        matches!(
            err,
            LedgerError::Unknown { attempts: 3, .. } | LedgerError::Unreachable { .. }
        ),
        "expected Unknown after 3 attempts or Unreachable, got {err:?}"
    );
    assert!(took < FAILING_APPLY_BOUND, "failing apply took {took:?}");

    // While the node is down every call fails, each in bounded time.
    let t0 = Instant::now();
    let err = ledger.apply(&[entry(failed_i)]).await.unwrap_err();
    let took = t0.elapsed();
    eprintln!("apply while down: {err} after {took:?}");
    assert!(
        matches!(err, LedgerError::Unknown { attempts: 3, .. }),
        "{err:?}"
    );
    assert!(took < FAILING_APPLY_BOUND, "{took:?}");
    let t0 = Instant::now();
    let err = ledger.trade_lsn(10_000 + acked[0]).await.unwrap_err();
    eprintln!("read while down: {err} after {:?}", t0.elapsed());
    assert!(
        matches!(err, LedgerError::Unreachable { .. } | LedgerError::Other(_)),
        "{err:?}"
    );

    // Node back (the guard's job, done explicitly here so the rest can run).
    tokio::task::spawn_blocking(move || drop(guard))
        .await
        .unwrap();

    // The same ledger carries on once the driver has reconnected.
    let t0 = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match ledger.apply(&[entry(failed_i)]).await {
            Ok(()) => break,
            Err(e) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(120),
                    "the same ledger could not apply 120 s after the restart: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    eprintln!(
        "same ledger applied again {:?} after the restart ({attempts} calls)",
        t0.elapsed()
    );
    for i in failed_i + 1..failed_i + 50 {
        ledger
            .apply(&[entry(i)])
            .await
            .expect("apply after restart");
    }

    // Every acknowledged apply is there (nothing reported applied that was not written).
    for &i in &acked {
        assert_eq!(
            ledger.trade_lsn(10_000 + i).await.unwrap(),
            Some(i),
            "acknowledged trade {i} missing after the restart"
        );
    }
    // Balances hold the newest acknowledged post-images.
    let last = failed_i + 49;
    let e = entry(last);
    let keys: Vec<BalanceKey> = e.balances.iter().map(|b| b.key).collect();
    let rows = ledger.read_balances(&keys).await.unwrap();
    for (b, row) in e.balances.iter().zip(rows) {
        assert_eq!(
            row,
            Some(BalanceRow {
                amount: b.amount,
                last_lsn: last
            }),
            "{}",
            b.key
        );
    }
    // A reconnect works too.
    let again = CqlLedger::connect(config)
        .await
        .expect("reconnect after restart");
    assert_eq!(again.trade_lsn(10_000 + last).await.unwrap(), Some(last));
    let _ = again
        .session()
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
        .await;
}
