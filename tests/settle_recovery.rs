//! Start-up recovery, case by case: pending entries fully applied, partly applied, not applied,
//! superseded by a newer entry, and diverged (the store holds the entry's LSN with another value),
//! which stops recovery unless `--accept-divergence`. Also `settlement run --recover-only`.

mod common;

use std::path::Path;
use std::sync::Arc;

use settlement_wal::ledger::cql::CqlLedger;
use settlement_wal::ledger::embedded::EmbeddedLedger;
use settlement_wal::ledger::{
    coalesce, BalanceKey, BalanceRow, BalanceWrite, EntryWrites, Ledger, LedgerError, StoreUrl,
};
use settlement_wal::settle::entry::{BalanceCache, SettlementEntry};
use settlement_wal::settle::event::parse_event;
use settlement_wal::settle::recovery::{plan, recover, EntryClass};
use settlement_wal::settle::{RecoveryReport, SettleError, Settlement, SettlementOptions};
use settlement_wal::wal::{Wal, WalOptions};

/// Appends the settlement entries of `lines` to a new WAL (synced, no markers) and returns
/// `(lsn, entry)` for each.
fn pending_wal(dir: &Path, lines: &[&str]) -> Vec<(u64, SettlementEntry)> {
    let wal = Wal::open(dir, WalOptions::default().segment_size_bytes(256 * 1024)).unwrap();
    let mut cache = BalanceCache::default();
    let mut out = Vec::new();
    for l in lines {
        let event = parse_event(l.as_bytes()).unwrap();
        let mut keys = Vec::new();
        cache.missing(&event, &mut keys);
        for k in keys {
            cache.load(k, 0);
        }
        let entry = cache.settle(event).unwrap();
        let lsn = wal.append(&entry.encode()).unwrap();
        out.push((lsn, entry));
    }
    wal.sync().unwrap();
    out
}

const LINES: [&str; 5] = [
    r#"{"output_sequence":1,"type":"deposit","user_id":1,"asset":"USDT","amount":1000}"#,
    r#"{"output_sequence":2,"type":"deposit","user_id":2,"asset":"BTC","amount":10}"#,
    r#"{"output_sequence":3,"trade_id":7,"symbol":"BTC-USDT","buyer_user_id":1,"seller_user_id":2,"price":100,"quantity":2,"timestamp_ns":1}"#,
    r#"{"output_sequence":4,"type":"deposit","user_id":1,"asset":"USDT","amount":5}"#,
    r#"{"output_sequence":5,"type":"deposit","user_id":3,"asset":"ETH","amount":9}"#,
];

fn options(dir: &Path) -> SettlementOptions {
    SettlementOptions {
        wal_dir: dir.to_path_buf(),
        segment_size_bytes: 256 * 1024,
        accept_divergence: false,
        ..SettlementOptions::new(dir.to_path_buf())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_classifies_each_entry_and_resends_only_what_is_missing() {
    let tmp = common::temp_dir();
    let wal_dir = tmp.path().join("wal");
    let entries = pending_wal(&wal_dir, &LINES);
    let ledger = Arc::new(EmbeddedLedger::open(&tmp.path().join("l.redb")).unwrap());
    // Entry 1: fully applied. Entry 3 (the trade): partly (event row + one balance).
    // Entry 4 (user 1 USDT deposit) applied, which supersedes entry 3's user 1 USDT row.
    // Entries 2 and 5: nothing.
    ledger
        .apply(&[entries[0].1.writes(entries[0].0)])
        .await
        .unwrap();
    let mut partial = entries[2].1.writes(entries[2].0);
    partial.balances.truncate(1);
    ledger.apply(&[partial]).await.unwrap();
    ledger
        .apply(&[entries[3].1.writes(entries[3].0)])
        .await
        .unwrap();

    let wal = Wal::open(
        &wal_dir,
        WalOptions::default().segment_size_bytes(256 * 1024),
    )
    .unwrap();
    let plans = plan(&*ledger, &wal.pending().unwrap()).await.unwrap();
    drop(wal);
    let classes: Vec<EntryClass> = plans.iter().map(|p| p.class).collect();
    assert_eq!(
        classes,
        vec![
            EntryClass::Applied,
            EntryClass::Missing,
            EntryClass::Partial,
            EntryClass::Applied,
            EntryClass::Missing
        ]
    );
    // The trade's user 1 USDT row is superseded by entry 4: never re-sent.
    assert!(plans[2]
        .resend
        .iter()
        .flat_map(|w| &w.balances)
        .all(|b| b.key != BalanceKey::new(1, "USDT")));
    assert!(
        plans[2].resend.iter().all(|w| w.event.is_none()),
        "the trade row exists"
    );

    let settlement = Settlement::open(ledger.clone(), &options(&wal_dir))
        .await
        .unwrap();
    let r = settlement.recovery();
    assert_eq!(
        (r.pending, r.applied, r.partial, r.missing, r.diverged),
        (5, 2, 1, 2, 0)
    );
    // Entry 4 wrote user 1 USDT: entry 1's and the trade's rows for it are superseded.
    assert_eq!(r.superseded_rows, 2);
    assert!(r.written_rows <= r.resent_rows, "{r:?}");
    assert_eq!(settlement.last_output_sequence(), Some(5));
    drop(settlement);
    // Everything landed once; a second start has nothing to do.
    let report = settlement_wal::settle::audit::audit(&*ledger)
        .await
        .unwrap();
    assert!(report.passed(), "{report}");
    let rows = ledger
        .read_balances(&[
            BalanceKey::new(1, "USDT"),
            BalanceKey::new(2, "BTC"),
            BalanceKey::new(3, "ETH"),
        ])
        .await
        .unwrap();
    assert_eq!(rows[0].unwrap().amount, 1000 - 200 + 5);
    assert_eq!(rows[1].unwrap().amount, 10 - 2);
    assert_eq!(rows[2].unwrap().amount, 9);
    let settlement = Settlement::open(ledger.clone(), &options(&wal_dir))
        .await
        .unwrap();
    assert_eq!(settlement.recovery().pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn divergence_stops_recovery_unless_accepted_and_is_never_overwritten() {
    let tmp = common::temp_dir();
    let wal_dir = tmp.path().join("wal");
    let entries = pending_wal(&wal_dir, &LINES[..2]);
    let ledger = Arc::new(EmbeddedLedger::open(&tmp.path().join("l.redb")).unwrap());
    // The store holds entry 1's LSN with another amount.
    ledger
        .apply(&[EntryWrites {
            lsn: entries[0].0,
            event: None,
            balances: vec![BalanceWrite {
                key: BalanceKey::new(1, "USDT"),
                amount: 999_999,
                lsn: entries[0].0,
            }],
        }])
        .await
        .unwrap();
    let err = Settlement::open(ledger.clone(), &options(&wal_dir))
        .await
        .err()
        .expect("divergence");
    let text = err.to_string();
    assert!(
        matches!(err, SettleError::Divergence { entries: 1, .. }),
        "{text}"
    );
    assert!(
        text.contains("user 1 USDT") && text.contains("999999"),
        "{text}"
    );
    let mut accept = options(&wal_dir);
    accept.accept_divergence = true;
    let settlement = Settlement::open(ledger.clone(), &accept).await.unwrap();
    assert_eq!(settlement.recovery().diverged, 1);
    let row = ledger
        .read_balances(&[BalanceKey::new(1, "USDT")])
        .await
        .unwrap()[0];
    assert_eq!(
        row,
        Some(BalanceRow {
            amount: 999_999,
            last_lsn: entries[0].0
        }),
        "left as the store had it"
    );
    // Wholly as the store had it: the entry's missing movement row is not re-sent either, so
    // no entry lands half from the WAL and half from the store.
    assert_eq!(ledger.movement_lsn(1).await.unwrap(), None);
}

#[test]
fn recover_only_runs_recovery_and_exits() {
    let tmp = common::temp_dir();
    let wal_dir = tmp.path().join("wal");
    pending_wal(&wal_dir, &LINES);
    let store = format!("embedded:{}", tmp.path().join("l.redb").display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_settlement"))
        .args([
            "run",
            "--input",
            "/nonexistent-not-read",
            "--recover-only",
            "--store",
            &store,
            "--wal-dir",
        ])
        .arg(&wal_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("recovered: pending=5"));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("5 pending entries: 0 applied, 0 partial, 5 missing"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_settlement"))
        .args(["audit", "--store", &store])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

// ---------------------------------------------------------------------------------------------
// A WAL left by a kill with many batches in flight (some applied without their markers, some
// partly, most not at all), recovered on the embedded store and on the real Cassandra node
// (`tools/cassandra start`).

const NODE: &str = "127.0.0.1:9042";

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Connects to a fresh keyspace on the local node; `None` (after a skip message) when there is
/// no node and we are not under CI.
async fn cql_or_skip(tag: &str) -> Option<(Arc<CqlLedger>, String)> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000_000;
    let keyspace = format!("settle_rec_{tag}_{}_{nanos}", std::process::id());
    let extra = std::env::var("RECOVERY_BENCH_OPTIONS").unwrap_or_default();
    let url = format!("cql://{NODE}/{keyspace}?consistency=one{extra}");
    let StoreUrl::Cql(config) = url.parse::<StoreUrl>().unwrap() else {
        unreachable!()
    };
    match CqlLedger::connect(config).await {
        Ok(l) => Some((Arc::new(l), keyspace)),
        Err(e @ LedgerError::Unreachable { .. }) => {
            assert!(
                !under_ci(),
                "CI is set but Cassandra is not reachable on {NODE}: {e}"
            );
            eprintln!("skipping: no Cassandra on {NODE} (run tools/cassandra start)");
            None
        }
        Err(e) => panic!("connecting to {NODE}/{keyspace} failed: {e}"),
    }
}

/// The pipeline's per-row coalescing of one micro-batch: every event row first, then the newest
/// post-image of each balance row it touches (`coalesce` in `src/settle/pipeline.rs`).
fn pipeline_writes(entries: &[(u64, SettlementEntry)]) -> Vec<EntryWrites> {
    coalesce(entries.iter().map(|(lsn, e)| e.writes(*lsn)).collect())
}

/// What a kill leaves behind: `entries` trades (after a deposit of every asset for 100 users)
/// synced in the WAL with no commit marker, in micro-batches of 1000 as the pipeline makes them
/// (with `--inflight 8`, 16 batches can be between the WAL and the store's acknowledgement): the
/// store holds the first quarter of the batches fully, a pseudo-random half of the row writes of
/// the second quarter, nothing of the rest. Returns the WAL, the final balances (the model) and the
/// number of settled events.
async fn killed_run(
    wal_dir: &Path,
    ledger: &dyn Ledger,
    entries: usize,
) -> (Wal, std::collections::BTreeMap<BalanceKey, i64>, usize) {
    let lines = settlement_wal::settle::demo::generate(&settlement_wal::settle::demo::DemoSpec {
        seed: 7,
        users: 100,
        trades: entries as u64,
        withdraw_every: 0,
        malformed_every: 0,
    });
    let wal = Wal::open(
        wal_dir,
        WalOptions::default().segment_size_bytes(64 * 1024 * 1024),
    )
    .unwrap();
    let mut cache = BalanceCache::default();
    let mut settled = Vec::new();
    for l in &lines {
        let event = parse_event(l.as_bytes()).unwrap();
        let mut keys = Vec::new();
        cache.missing(&event, &mut keys);
        for k in keys {
            cache.load(k, 0);
        }
        settled.push(cache.settle(event).unwrap());
    }
    let payloads: Vec<Vec<u8>> = settled.iter().map(SettlementEntry::encode).collect();
    let mut lsns = Vec::with_capacity(payloads.len());
    for chunk in payloads.chunks(1000) {
        let (first, last) = wal.append_batch(chunk).unwrap();
        lsns.extend(first..=last);
    }
    wal.sync().unwrap();
    let numbered: Vec<(u64, SettlementEntry)> = lsns.into_iter().zip(settled).collect();
    let mut model = std::collections::BTreeMap::new();
    for (_, e) in &numbered {
        for (k, amount) in &e.post_images {
            model.insert(*k, *amount);
        }
    }
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let batches = numbered.len().div_ceil(1000);
    for (i, batch) in numbered.chunks(1000).enumerate() {
        let mut writes = pipeline_writes(batch);
        match 4 * i / batches {
            0 => {}
            1 => {
                for w in &mut writes {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    if rng % 2 == 0 {
                        w.event = None;
                    }
                    w.balances.retain(|_| {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng % 2 == 0
                    });
                }
            }
            _ => continue,
        }
        for chunk in writes.chunks(500) {
            ledger.apply(chunk).await.unwrap();
        }
    }
    (wal, model, numbered.len())
}

/// Recovery of [`killed_run`] leaves exactly the model's balances, every event once, nothing
/// pending, each balance row written once; a second start finds nothing to do. Unless `measure`
/// it first makes a dry-run `plan` and checks that recovery did what it listed (a measurement
/// leaves it out, so that recovery's reads are the first ones).
async fn recover_killed_run(
    ledger: Arc<dyn Ledger>,
    entries: usize,
    measure: bool,
) -> RecoveryReport {
    let tmp = common::temp_dir();
    let wal_dir = tmp.path().join("wal");
    let (wal, model, events) = killed_run(&wal_dir, &*ledger, entries).await;
    let pending = wal.pending().unwrap();
    assert_eq!(pending.len(), events);
    let plans = if measure {
        Vec::new()
    } else {
        plan(&*ledger, &pending).await.unwrap()
    };
    drop(pending);
    let report = recover(&wal, &*ledger, false).await.unwrap();
    assert_eq!(report.pending, events);
    assert_eq!(report.diverged, 0);
    assert!(
        report.applied > 0 && report.partial > 0 && report.missing > 0,
        "{report:?}"
    );
    if !measure {
        let count = |c: EntryClass| plans.iter().filter(|p| p.class == c).count();
        assert_eq!(
            (report.applied, report.partial, report.missing),
            (
                count(EntryClass::Applied),
                count(EntryClass::Partial),
                count(EntryClass::Missing)
            )
        );
        assert_eq!(
            report.resent_rows,
            plans
                .iter()
                .flat_map(|p| &p.resend)
                .map(|w| w.row_count())
                .sum::<usize>()
        );
        // Each missing event row once, each balance row (100 users x 3 assets at most) once.
        let missing_events = plans
            .iter()
            .flat_map(|p| &p.resend)
            .filter(|w| w.event.is_some())
            .count();
        assert!(report.written_rows <= missing_events + 300, "{report:?}");
    }
    assert!(report.written_rows < report.resent_rows, "{report:?}");
    assert!(wal.pending().unwrap().is_empty());
    let stored: std::collections::BTreeMap<BalanceKey, i64> = ledger
        .scan_balances()
        .await
        .unwrap()
        .into_iter()
        .map(|(k, r)| (k, r.amount))
        .collect();
    assert_eq!(
        stored, model,
        "balances after recovery differ from the model"
    );
    assert_eq!(
        ledger.scan_trades().await.unwrap().len() + ledger.scan_movements().await.unwrap().len(),
        events
    );
    drop(wal);
    // The entries were written by hand, without control entries: the store has no high-water
    // row until a start binds it (as a store written before identities existed).
    let again = Settlement::open(ledger.clone(), &options(&wal_dir))
        .await
        .unwrap();
    assert_eq!(again.recovery().pending, 0);
    let audit = settlement_wal::settle::audit::audit(&*ledger)
        .await
        .unwrap();
    assert!(audit.passed(), "{audit}");
    report
}

async fn recover_killed_run_on_cql(entries: usize, measure: bool) -> Option<RecoveryReport> {
    let (ledger, keyspace) = cql_or_skip("kill").await?;
    let report = recover_killed_run(ledger.clone(), entries, measure).await;
    if let Err(e) = ledger
        .session()
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
        .await
    {
        eprintln!("note: could not drop keyspace {keyspace}: {e}");
    }
    Some(report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_after_a_kill_with_batches_in_flight() {
    let tmp = common::temp_dir();
    let ledger = Arc::new(EmbeddedLedger::open(&tmp.path().join("l.redb")).unwrap());
    recover_killed_run(ledger, 3000, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_on_cql_after_a_kill_with_batches_in_flight() {
    recover_killed_run_on_cql(3000, false).await;
}

/// Recovery throughput on the node (prints entries/s; no timing is asserted):
/// `cargo test --release --test settle_recovery recovery_throughput_on_cql -- --ignored --nocapture`
/// (`RECOVERY_BENCH_ENTRIES`, default 16,800: about what a kill leaves with the defaults;
/// `RECOVERY_BENCH_OPTIONS` is appended to the store URL, e.g. `&inflight_reads=16`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run it with --ignored --nocapture"]
async fn recovery_throughput_on_cql() {
    let entries: usize = std::env::var("RECOVERY_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16_800);
    let Some(r) = recover_killed_run_on_cql(entries, true).await else {
        return;
    };
    let per_s = |ms: u64| r.pending as f64 * 1000.0 / ms.max(1) as f64;
    eprintln!(
        "recovery on {NODE}: {} pending entries ({} applied, {} partial, {} missing; {} rows \
         re-sent in {} writes, {} superseded): {} ms, {:.0} entries/s (classification {} ms, \
         {:.0} entries/s)",
        r.pending,
        r.applied,
        r.partial,
        r.missing,
        r.resent_rows,
        r.written_rows,
        r.superseded_rows,
        r.duration_ms,
        per_s(r.duration_ms),
        r.plan_ms,
        per_s(r.plan_ms),
    );
}

/// A batch cut before its control entry (a crash in the middle of its append; a SIGKILL leaves
/// such a prefix in the page cache): recovery applies its entries and writes the bookkeeping the
/// control entry would have, so its sequences count as settled (no second application on
/// re-delivery) and the sequences it skipped are open holes; the WAL and the store still agree
/// at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_cut_before_its_control_entry_is_accounted_for() {
    let tmp = common::temp_dir();
    let wal_dir = tmp.path().join("wal");
    let ledger: Arc<dyn Ledger> =
        Arc::new(EmbeddedLedger::open(&tmp.path().join("l.redb")).unwrap());
    let run = |lines: Vec<String>| {
        let ledger = ledger.clone();
        let wal_dir = wal_dir.clone();
        async move {
            let s = Settlement::open(ledger, &options(&wal_dir)).await.unwrap();
            s.run(
                settlement_wal::app::messages_source(lines),
                tokio::sync::watch::channel(false).1,
                settlement_wal::settle::PipelineSettings::default(),
                settlement_wal::settle::RejectSink::discard(),
            )
            .await
            .unwrap()
        }
    };
    run(LINES[..2].iter().map(|l| l.to_string()).collect()).await;
    // The torn batch: user 3's deposit (sequence 5) reached the WAL, its control entry did not.
    {
        let wal = Wal::open(
            &wal_dir,
            WalOptions::default().segment_size_bytes(256 * 1024),
        )
        .unwrap();
        let mut cache = BalanceCache::default();
        let event = parse_event(LINES[4].as_bytes()).unwrap();
        let mut keys = Vec::new();
        cache.missing(&event, &mut keys);
        for k in keys {
            cache.load(k, 0);
        }
        wal.append(&cache.settle(event).unwrap().encode()).unwrap();
        wal.sync().unwrap();
    }
    let s = Settlement::open(ledger.clone(), &options(&wal_dir))
        .await
        .unwrap();
    assert_eq!(s.recovery().torn_batch_entries, 1);
    assert_eq!(s.last_output_sequence(), Some(5));
    assert_eq!(s.sequences().holes().collect::<Vec<_>>(), vec![(3, 4)]);
    drop(s);
    // Re-delivered in full: 5 is a duplicate, 3 and 4 fill the hole.
    let summary = run(LINES.iter().map(|l| l.to_string()).collect()).await;
    assert_eq!(
        (summary.settled, summary.duplicates, summary.filled),
        (2, 3, 2)
    );
    let report = settlement_wal::settle::audit::audit(&*ledger)
        .await
        .unwrap();
    assert!(report.passed(), "{report}");
    let eth = ledger
        .read_balances(&[BalanceKey::new(3, "ETH")])
        .await
        .unwrap();
    assert_eq!(eth[0].map(|r| r.amount), Some(9), "deposited once");
    // And the next start finds the WAL and the store in agreement.
    Settlement::open(ledger.clone(), &options(&wal_dir))
        .await
        .unwrap();
}
