//! The ledger conformance suite: written once, run against every [`Ledger`] implementation
//! (`tests/ledger_embedded.rs`, `tests/ledger_cql.rs`). Each check panics with a message naming
//! the broken rule. `base` keeps runs apart in a shared store: ids and users are offset by it.
#![doc(hidden)]

use super::{
    Asset, BalanceKey, BalanceRow, BalanceWrite, Claim, EntryWrites, EventKey, EventRow,
    HighWaterRow, HoleRow, Ledger, LedgerError, MovementKind, MovementRow, RejectionRow,
    StoreIdentity, Symbol, TradeRow, MAX_LOOKUP_KEYS,
};
use crate::wal::Lsn;

/// A trade entry at `lsn` for `trade_id` between `buyer` and `seller`, with the given post-images
/// (buyer base, buyer quote, seller base, seller quote).
pub fn trade_entry(
    lsn: Lsn,
    trade_id: u64,
    buyer: u64,
    seller: u64,
    post: [i64; 4],
) -> EntryWrites {
    let row = TradeRow {
        trade_id,
        output_sequence: trade_id,
        symbol: Symbol::new("BTC-USDT").expect("fits"),
        buyer_user_id: buyer,
        seller_user_id: seller,
        price: 65_000,
        quantity: 3,
        timestamp_ns: 1_763_900_000_000_000_000,
        lsn,
    };
    let w = |user, asset: &str, amount| BalanceWrite {
        key: BalanceKey::new(user, asset),
        amount,
        lsn,
    };
    EntryWrites {
        lsn,
        event: Some(EventRow::Trade(row)),
        balances: vec![
            w(buyer, "BTC", post[0]),
            w(buyer, "USDT", post[1]),
            w(seller, "BTC", post[2]),
            w(seller, "USDT", post[3]),
        ],
    }
}

/// A deposit entry.
pub fn deposit_entry(
    lsn: Lsn,
    seq: u64,
    user: u64,
    asset: &str,
    amount: i64,
    post: i64,
) -> EntryWrites {
    EntryWrites {
        lsn,
        event: Some(EventRow::Movement(MovementRow {
            output_sequence: seq,
            kind: MovementKind::Deposit,
            user_id: user,
            asset: Asset::new(asset).expect("test asset names fit"),
            amount,
            lsn,
        })),
        balances: vec![BalanceWrite {
            key: BalanceKey::new(user, asset),
            amount: post,
            lsn,
        }],
    }
}

async fn balance(ledger: &dyn Ledger, user: u64, asset: &str) -> Option<BalanceRow> {
    ledger
        .read_balances(&[BalanceKey::new(user, asset)])
        .await
        .expect("read_balances")
        .remove(0)
}

/// Applying the same batch twice leaves exactly the state of applying it once.
pub async fn idempotent_reapply(ledger: &dyn Ledger, base: u64) {
    let (b, s) = (base + 1, base + 2);
    let entry = trade_entry(base + 10, base + 9001, b, s, [3, -195_000, -3, 195_000]);
    assert!(
        !ledger.trade_exists(base + 9001).await.unwrap(),
        "trade exists before apply"
    );
    ledger
        .apply(std::slice::from_ref(&entry))
        .await
        .expect("first apply");
    ledger
        .apply(std::slice::from_ref(&entry))
        .await
        .expect("re-apply");
    assert!(
        ledger.trade_exists(base + 9001).await.unwrap(),
        "trade_exists after apply"
    );
    assert_eq!(
        ledger.trade_lsn(base + 9001).await.unwrap(),
        Some(base + 10)
    );
    let rows = ledger
        .read_balances(&[
            BalanceKey::new(b, "BTC"),
            BalanceKey::new(b, "USDT"),
            BalanceKey::new(s, "BTC"),
            BalanceKey::new(s, "USDT"),
        ])
        .await
        .unwrap();
    let want = [3, -195_000, -3, 195_000].map(|amount| {
        Some(BalanceRow {
            amount,
            last_lsn: base + 10,
        })
    });
    assert_eq!(rows, want, "balances after re-apply");
    let trades = ledger.scan_trades().await.unwrap();
    assert_eq!(
        trades.iter().filter(|t| t.trade_id == base + 9001).count(),
        1,
        "exactly one trade row"
    );
    let row = trades.iter().find(|t| t.trade_id == base + 9001).unwrap();
    assert_eq!(
        Some(&EventRow::Trade(row.clone())),
        entry.event.as_ref(),
        "trade row round-trips"
    );
}

/// A late write of an older entry never overwrites a newer one (P4), in separate applies and
/// within one apply.
pub async fn out_of_order_keeps_newest(ledger: &dyn Ledger, base: u64) {
    let user = base + 3;
    let newer = deposit_entry(base + 5, base + 105, user, "ETH", 500, 500);
    let older = deposit_entry(base + 3, base + 103, user, "ETH", 300, 300);
    ledger.apply(std::slice::from_ref(&newer)).await.unwrap();
    ledger.apply(std::slice::from_ref(&older)).await.unwrap();
    assert_eq!(
        balance(ledger, user, "ETH").await,
        Some(BalanceRow {
            amount: 500,
            last_lsn: base + 5
        }),
        "entry 3 applied after entry 5 overwrote it"
    );
    // Both movement rows exist (they are different rows).
    assert_eq!(
        ledger.movement_lsn(base + 103).await.unwrap(),
        Some(base + 3)
    );
    assert_eq!(
        ledger.movement_lsn(base + 105).await.unwrap(),
        Some(base + 5)
    );

    // Within one apply, in either order.
    let user2 = base + 4;
    let e7 = deposit_entry(base + 7, base + 107, user2, "SOL", 70, 70);
    let e8 = deposit_entry(base + 8, base + 108, user2, "SOL", 80, 150);
    ledger.apply(&[e8.clone(), e7.clone()]).await.unwrap();
    assert_eq!(
        balance(ledger, user2, "SOL").await,
        Some(BalanceRow {
            amount: 150,
            last_lsn: base + 8
        })
    );
    ledger.apply(&[e7, e8]).await.unwrap();
    assert_eq!(
        balance(ledger, user2, "SOL").await.unwrap().last_lsn,
        base + 8
    );
}

/// An entry applied in parts (balances first, then the whole) ends exactly as applied whole; a
/// missing row reads as `None`; reads keep the order of the keys asked for.
pub async fn partial_batches(ledger: &dyn Ledger, base: u64) {
    let (b, s) = (base + 5, base + 6);
    let full = trade_entry(base + 20, base + 9002, b, s, [1, -65_000, -1, 65_000]);
    let mut part = full.clone();
    part.event = None;
    part.balances.truncate(2);
    ledger.apply(&[part]).await.unwrap();
    assert!(
        !ledger.trade_exists(base + 9002).await.unwrap(),
        "no trade row from a balances-only apply"
    );
    assert_eq!(
        balance(ledger, s, "BTC").await,
        None,
        "an unwritten row reads as None"
    );
    ledger.apply(&[full]).await.unwrap();
    assert!(ledger.trade_exists(base + 9002).await.unwrap());
    let rows = ledger
        .read_balances(&[
            BalanceKey::new(s, "USDT"),
            BalanceKey::new(base + 999_999, "BTC"),
            BalanceKey::new(b, "BTC"),
        ])
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![
            Some(BalanceRow {
                amount: 65_000,
                last_lsn: base + 20
            }),
            None,
            Some(BalanceRow {
                amount: 1,
                last_lsn: base + 20
            }),
        ]
    );
}

/// A large apply (more rows than one batch) lands completely, and scans see it.
pub async fn large_apply_and_scans(ledger: &dyn Ledger, base: u64) {
    let n = 600u64;
    let entries: Vec<EntryWrites> = (0..n)
        .map(|i| {
            let lsn = base + 1000 + i;
            trade_entry(
                lsn,
                base + 20_000 + i,
                base + 100 + i % 7,
                base + 200 + i % 5,
                [i as i64, -(i as i64), -(i as i64), i as i64],
            )
        })
        .collect();
    ledger.apply(&entries).await.unwrap();
    let trades = ledger.scan_trades().await.unwrap();
    let ours = trades
        .iter()
        .filter(|t| (base + 20_000..base + 20_000 + n).contains(&t.trade_id))
        .count();
    assert_eq!(ours as u64, n, "every trade of a large apply landed");
    let balances = ledger.scan_balances().await.unwrap();
    // Buyer base + 100 + k ends with the value of the last entry touching it.
    for k in 0..7u64 {
        let last_i = (0..n).rev().find(|i| i % 7 == k).unwrap();
        let row = balances
            .iter()
            .find(|(key, _)| key.user_id == base + 100 + k && key.asset == "BTC")
            .map(|(_, r)| *r);
        assert_eq!(
            row,
            Some(BalanceRow {
                amount: last_i as i64,
                last_lsn: base + 1000 + last_i
            }),
            "buyer {k}"
        );
    }
    let movements = ledger.scan_movements().await.unwrap();
    assert!(movements.iter().all(|m| m.amount > 0));
}

/// Bulk event lookups answer like the one-at-a-time ones, in the order asked, for present and
/// absent trades and movements (trade ids and output sequences are separate key spaces), many
/// more than the store keeps in flight; more than [`MAX_LOOKUP_KEYS`] is refused as invalid.
pub async fn bulk_event_lookups(ledger: &dyn Ledger, base: u64) {
    let n = 300u64;
    let entries: Vec<EntryWrites> = (0..n)
        .map(|i| {
            let lsn = base + 40_000 + i;
            if i % 3 == 0 {
                deposit_entry(lsn, base + 40_000 + i, base + 300, "BTC", 1, i as i64)
            } else {
                trade_entry(
                    lsn,
                    base + 40_000 + i,
                    base + 301,
                    base + 302,
                    [1, -1, -1, 1],
                )
            }
        })
        .collect();
    // Every other entry is stored.
    let stored: Vec<EntryWrites> = entries.iter().step_by(2).cloned().collect();
    ledger.apply(&stored).await.unwrap();
    let mut keys = Vec::new();
    let mut want = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let key = e.event.as_ref().unwrap().key();
        keys.push(key);
        want.push((i % 2 == 0).then_some(e.lsn));
        // The same number in the other key space does not exist.
        keys.push(match key {
            EventKey::Trade(id) => EventKey::Movement(id),
            EventKey::Movement(seq) => EventKey::Trade(seq),
            other => panic!("the suite writes trades and movements, not {other}"),
        });
        want.push(None);
    }
    let got = ledger.event_lsns(&keys).await.expect("event_lsns");
    assert_eq!(got, want, "bulk lookups answer in the order asked");
    for (key, want) in keys.iter().zip(&want).step_by(37) {
        let one = match *key {
            EventKey::Trade(id) => ledger.trade_lsn(id).await.unwrap(),
            EventKey::Movement(seq) => ledger.movement_lsn(seq).await.unwrap(),
            other => panic!("the suite writes trades and movements, not {other}"),
        };
        assert_eq!(one, *want, "{key}: bulk and single lookups agree");
    }
    assert_eq!(ledger.event_lsns(&[]).await.unwrap(), Vec::new());
    let too_many = vec![EventKey::Trade(base); MAX_LOOKUP_KEYS + 1];
    let err = ledger.event_lsns(&too_many).await.unwrap_err();
    assert!(matches!(err, LedgerError::Invalid(_)), "{err}");
}

fn row(lsn: Lsn, event: EventRow) -> EntryWrites {
    EntryWrites {
        lsn,
        event: Some(event),
        balances: Vec::new(),
    }
}

/// The control rows (P8, P9) keep the newest LSN like every other row: a rejection, a hole that
/// is opened then closed (and a replayed older open state that must not reopen it), the single
/// high-water row; `trade_sequences` answers in order; `claim` is a compare-and-set on the epoch.
pub async fn control_rows_and_identity(ledger: &dyn Ledger, base: u64) {
    let lsn = base + 500_000;
    let seq = base + 700_000;
    let hole = |first: u64, last: u64, open: bool, lsn: Lsn| {
        row(
            lsn,
            EventRow::Hole(HoleRow {
                first_sequence: first,
                last_sequence: last,
                open,
                lsn,
            }),
        )
    };
    ledger
        .apply(&[
            row(
                lsn,
                EventRow::Rejection(RejectionRow {
                    output_sequence: seq,
                    reason: "withdrawal above the balance".into(),
                    lsn,
                }),
            ),
            hole(seq + 1, seq + 9, true, lsn),
            hole(seq + 20, seq + 29, true, lsn),
        ])
        .await
        .expect("apply control rows");
    // The first hole closes at a newer LSN; the old open state replayed afterwards loses.
    ledger
        .apply(&[hole(seq + 1, seq + 9, false, lsn + 1)])
        .await
        .unwrap();
    ledger
        .apply(&[hole(seq + 1, seq + 9, true, lsn)])
        .await
        .unwrap();
    let open: Vec<HoleRow> = ledger
        .open_holes()
        .await
        .expect("open_holes")
        .into_iter()
        .filter(|h| h.first_sequence >= seq && h.first_sequence < seq + 100)
        .collect();
    assert_eq!(
        open,
        vec![HoleRow {
            first_sequence: seq + 20,
            last_sequence: seq + 29,
            open: true,
            lsn
        }],
        "a closed hole stays closed (newest LSN wins)"
    );
    let rejections: Vec<RejectionRow> = ledger
        .scan_rejections()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.output_sequence == seq)
        .collect();
    assert_eq!(rejections.len(), 1);
    assert_eq!(rejections[0].reason, "withdrawal above the balance");
    let got = ledger
        .event_lsns(&[
            EventKey::Rejection(seq),
            EventKey::Hole(seq + 1),
            EventKey::Hole(seq + 2),
        ])
        .await
        .unwrap();
    assert_eq!(got, vec![Some(lsn), Some(lsn + 1), None]);
    // The high-water row: the newest LSN wins whatever order the writes land in.
    let hw = |lsn: Lsn, high: u64| {
        row(
            lsn,
            EventRow::HighWater(HighWaterRow {
                lsn,
                first_sequence: 1,
                high_sequence: high,
                max_trade_id: high * 2,
            }),
        )
    };
    ledger.apply(&[hw(lsn + 10, seq + 30)]).await.unwrap();
    ledger.apply(&[hw(lsn + 5, seq + 3)]).await.unwrap();
    let stored = ledger
        .high_water()
        .await
        .unwrap()
        .expect("a high-water row");
    assert!(stored.lsn >= lsn + 10, "{stored:?}");
    if stored.lsn == lsn + 10 {
        assert_eq!(stored.high_sequence, seq + 30);
    }
    // trade_sequences answers in the order asked.
    ledger
        .apply(&[trade_entry(
            lsn + 20,
            seq + 40,
            base + 1,
            base + 2,
            [1, -1, -1, 1],
        )])
        .await
        .unwrap();
    assert_eq!(
        ledger.trade_sequences(&[seq + 41, seq + 40]).await.unwrap(),
        vec![None, Some(seq + 40)]
    );
    // claim: compare-and-set on the epoch.
    let current = ledger.identity().await.unwrap();
    let next = StoreIdentity {
        store_id: current.map_or(base + 11, |c| c.store_id),
        wal_id: base + 12,
        wal_lsn_base: 1,
        epoch: current.map_or(1, |c| c.epoch + 1),
    };
    assert_eq!(
        ledger.claim(current.map(|c| c.epoch), next).await.unwrap(),
        Claim::Won
    );
    assert_eq!(ledger.identity().await.unwrap(), Some(next));
    let stale = StoreIdentity {
        wal_id: base + 13,
        epoch: next.epoch + 1,
        ..next
    };
    assert_eq!(
        ledger.claim(current.map(|c| c.epoch), stale).await.unwrap(),
        Claim::Lost(Some(next)),
        "a claim with a stale epoch loses"
    );
    assert_eq!(ledger.identity().await.unwrap(), Some(next));
}

/// Runs every check.
pub async fn run_all(ledger: &dyn Ledger, base: u64) {
    idempotent_reapply(ledger, base).await;
    out_of_order_keeps_newest(ledger, base).await;
    partial_batches(ledger, base).await;
    large_apply_and_scans(ledger, base).await;
    bulk_event_lookups(ledger, base).await;
    control_rows_and_identity(ledger, base).await;
}
