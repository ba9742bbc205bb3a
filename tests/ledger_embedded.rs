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
    // An empty asset name (a too-long one cannot be built: `Asset` holds at most 16 bytes).
    e.balances[0].key.asset = settlement_wal::ledger::Asset::EMPTY;
    assert!(settlement_wal::ledger::Asset::new("A-VERY-LONG-ASSET-NAME").is_err());
    let err = ledger.apply(&[e]).await.unwrap_err();
    assert!(matches!(err, LedgerError::Invalid(_)), "{err:?}");
    assert!(
        ledger.scan_movements().await.unwrap().is_empty(),
        "nothing written"
    );
}

#[tokio::test]
async fn read_only_open_reads_but_never_writes_or_creates() {
    let dir = common::temp_dir();
    let path = dir.path().join("ledger.redb");
    let missing = EmbeddedLedger::open_read_only(&path).unwrap_err();
    assert!(
        matches!(missing, LedgerError::Unreachable { .. }),
        "{missing:?}"
    );
    assert!(!path.exists(), "a read-only open creates nothing");
    {
        let ledger = EmbeddedLedger::open(&path).unwrap();
        ledger
            .apply(&[deposit_entry(3, 30, 9, "BTC", 4, 4)])
            .await
            .unwrap();
        // While the writer holds the file, a read-only open is refused clearly.
        assert!(EmbeddedLedger::open_read_only(&path).is_err());
    }
    let before = std::fs::read(&path).unwrap();
    let ro = EmbeddedLedger::open_read_only(&path).unwrap();
    assert_eq!(
        ro.read_balances(&[BalanceKey::new(9, "BTC")])
            .await
            .unwrap(),
        vec![Some(BalanceRow {
            amount: 4,
            last_lsn: 3
        })]
    );
    let err = ro
        .apply(&[deposit_entry(4, 31, 9, "BTC", 1, 5)])
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::Rejected(_)), "{err:?}");
    drop(ro);
    assert_eq!(std::fs::read(&path).unwrap(), before, "not a byte changed");
}
