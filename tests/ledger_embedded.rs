//! The ledger conformance suite on the embedded (redb) store, plus its own durability and
//! locking behaviour.

mod common;

use settlement_wal::ledger::conformance::{self, deposit_entry};
use settlement_wal::ledger::embedded::EmbeddedLedger;
use settlement_wal::ledger::{BalanceKey, BalanceRow, Ledger, LedgerError};

#[tokio::test]
async fn embedded_store_passes_the_conformance_suite() {
    let dir = common::temp_dir();
    let ledger = EmbeddedLedger::open(&dir.path().join("ledger.redb")).unwrap();
    conformance::run_all(&ledger, 0).await;
    // A second, disjoint run in the same store does not interfere.
    conformance::run_all(&ledger, 1_000_000).await;
}

#[tokio::test]
async fn acknowledged_writes_survive_reopen() {
    let dir = common::temp_dir();
    let path = dir.path().join("sub/ledger.redb");
    {
        let ledger = EmbeddedLedger::open(&path).unwrap();
        ledger
            .apply(&[deposit_entry(7, 70, 1, "USDT", 100, 100)])
            .await
            .unwrap();
    }
    let ledger = EmbeddedLedger::open(&path).unwrap();
    let rows = ledger
        .read_balances(&[BalanceKey::new(1, "USDT")])
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![Some(BalanceRow {
            amount: 100,
            last_lsn: 7
        })]
    );
    assert_eq!(ledger.movement_lsn(70).await.unwrap(), Some(7));
    assert_eq!(ledger.describe(), format!("embedded:{}", path.display()));
}

#[tokio::test]
async fn a_second_open_of_the_same_file_is_refused_clearly() {
    let dir = common::temp_dir();
    let path = dir.path().join("ledger.redb");
    let _first = EmbeddedLedger::open(&path).unwrap();
    let err = EmbeddedLedger::open(&path).unwrap_err();
    assert!(matches!(err, LedgerError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains("ledger.redb"), "{err}");
}

#[tokio::test]
async fn invalid_input_is_rejected_before_writing() {
    let dir = common::temp_dir();
    let ledger = EmbeddedLedger::open(&dir.path().join("ledger.redb")).unwrap();
    let mut e = deposit_entry(1, 1, 1, "USDT", 5, 5);
    e.balances[0].key.asset = "A-VERY-LONG-ASSET-NAME".into();
    let err = ledger.apply(&[e]).await.unwrap_err();
    assert!(matches!(err, LedgerError::Invalid(_)), "{err:?}");
    assert!(
        ledger.scan_movements().await.unwrap().is_empty(),
        "nothing written"
    );
}
