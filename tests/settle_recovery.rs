//! Start-up recovery, case by case: pending entries fully applied, partly applied, not applied,
//! superseded by a newer entry, and diverged (the store holds the entry's LSN with another value),
//! which stops recovery unless `--accept-divergence`. Also `settlement run --recover-only`.

mod common;

use std::path::Path;
use std::sync::Arc;

use settlement_wal::ledger::embedded::EmbeddedLedger;
use settlement_wal::ledger::{BalanceKey, BalanceRow, BalanceWrite, EntryWrites, Ledger};
use settlement_wal::settle::entry::{BalanceCache, SettlementEntry};
use settlement_wal::settle::event::parse_event;
use settlement_wal::settle::recovery::{plan, EntryClass};
use settlement_wal::settle::{SettleError, Settlement, SettlementOptions};
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
        .balances
        .iter()
        .all(|b| b.key != BalanceKey::new(1, "USDT")));
    assert!(plans[2].resend.event.is_none(), "the trade row exists");

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
