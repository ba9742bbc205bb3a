//! P9, nothing is dropped silently: the `settlement` binary on the embedded store. Every
//! output_sequence ends settled, rejected, or an open hole that a later message fills exactly
//! once, across restarts; a wild sequence never becomes progress; a reused trade id is refused;
//! a re-delivered reject is not written again; the audit proves completeness.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{assert_store_matches_model, model};

fn settlement() -> Command {
    Command::new(env!("CARGO_BIN_EXE_settlement"))
}

fn store(dir: &Path) -> String {
    format!("embedded:{}", dir.join("ledger.redb").display())
}

fn run(dir: &Path, lines: &[String], extra: &[&str]) -> String {
    let input = dir.join("in.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = settlement()
        .args(["run", "--no-progress", "--input"])
        .arg(&input)
        .arg("--wal-dir")
        .arg(dir.join("wal"))
        .args(["--store", &store(dir), "--rejects"])
        .arg(dir.join("rejects.jsonl"))
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn cli(args: &[&str]) -> Output {
    settlement().args(args).output().unwrap()
}

fn deposit(seq: u64, user: u64, amount: i64) -> String {
    format!(
        r#"{{"output_sequence": {seq}, "type": "deposit", "user_id": {user}, "asset": "USDT", "amount": {amount}}}"#
    )
}

fn trade(seq: u64, id: u64) -> String {
    format!(
        r#"{{"output_sequence": {seq}, "trade_id": {id}, "symbol": "BTC-USDT", "buyer_user_id": 1, "seller_user_id": 2, "price": 10, "quantity": 1, "timestamp_ns": 1}}"#
    )
}

fn holes(dir: &Path) -> serde_json::Value {
    let out = cli(&["holes", "--json", "--store", &store(dir)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn audit(dir: &Path) -> (bool, serde_json::Value) {
    let out = cli(&["audit", "--json", "--store", &store(dir)]);
    (
        out.status.success(),
        serde_json::from_slice(&out.stdout).unwrap(),
    )
}

fn reject_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("rejects.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_gap_is_an_open_hole_until_a_backfill_fills_it_exactly_once_across_restarts() {
    let dir = common::temp_dir();
    let dir = dir.path();
    let first: Vec<String> = [1, 2, 5, 6, 9]
        .iter()
        .map(|&s| deposit(s, s % 2, 10 * s as i64))
        .collect();
    let summary = run(dir, &first, &[]);
    assert!(
        summary.contains("settled=5 duplicates=0 rejected=0 gaps=2 filled=0"),
        "{summary}"
    );
    let h = holes(dir);
    assert_eq!(h["missing"], 4, "{h}");
    let ranges: Vec<(u64, u64)> = h["holes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["first_sequence"].as_u64().unwrap(),
                r["last_sequence"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ranges, vec![(3, 4), (7, 8)]);
    // The audit proves completeness with the holes open, and names them.
    let (passed, report) = audit(dir);
    assert!(passed, "{report}");
    assert_eq!(
        (
            report["open_holes"].as_u64(),
            report["missing_sequences"].as_u64()
        ),
        (Some(2), Some(4))
    );
    // A backfill from the engine's journal, out of order, with re-deliveries, after a restart.
    let backfill: Vec<String> = [8, 4, 5, 3, 3, 10]
        .iter()
        .map(|&s| deposit(s, s % 2, 10 * s as i64))
        .collect();
    let summary = run(dir, &backfill, &[]);
    assert!(
        summary.contains("settled=4 duplicates=2 rejected=0 gaps=0 filled=3"),
        "{summary}"
    );
    assert_eq!(
        holes(dir)["holes"].as_array().unwrap().len(),
        1,
        "7 is still open"
    );
    let summary = run(dir, &[deposit(7, 1, 70)], &[]);
    assert!(
        summary.contains("settled=1") && summary.contains("filled=1"),
        "{summary}"
    );
    assert_eq!(holes(dir)["missing"], 0);
    let all: Vec<String> = first
        .iter()
        .chain(&backfill)
        .cloned()
        .chain([deposit(7, 1, 70)])
        .collect();
    assert_store_matches_model(&store(dir), &model(&all), "after the backfill");
}

#[test]
fn a_wild_sequence_is_refused_and_never_turns_later_messages_into_duplicates() {
    let dir = common::temp_dir();
    let dir = dir.path();
    let lines = vec![
        deposit(1, 1, 5),
        // An unknown type with a huge sequence, and a valid event at one.
        r#"{"output_sequence": 9223372036854775807, "type": "teleport", "user_id": 1}"#.to_string(),
        deposit(9_000_000_000_000_000_000, 1, 1_000_000),
        deposit(2, 1, 7),
    ];
    let summary = run(dir, &lines, &[]);
    assert!(
        summary.contains("settled=2 duplicates=0 rejected=2"),
        "{summary}"
    );
    let rejects = reject_lines(dir);
    assert_eq!(rejects.len(), 2);
    for r in &rejects {
        assert!(
            r["reason"].as_str().unwrap().contains("wild sequence"),
            "{r}"
        );
    }
    // Later messages settle normally.
    let summary = run(dir, &[deposit(3, 1, 11)], &[]);
    assert!(summary.contains("settled=1 duplicates=0"), "{summary}");
    let out = cli(&["balances", "--json", "--store", &store(dir)]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["amount"], 23);
    // A jump within --max-seq-jump is a gap, not a refusal.
    let summary = run(dir, &[deposit(50, 1, 1)], &["--max-seq-jump", "100"]);
    assert!(
        summary.contains("settled=1") && summary.contains("gaps=1"),
        "{summary}"
    );
    let (passed, report) = audit(dir);
    assert!(passed, "{report}");
}

#[test]
fn a_reused_trade_id_is_refused_naming_both_sequences() {
    let dir = common::temp_dir();
    let dir = dir.path();
    let first = vec![trade(1, 9001), trade(2, 9002), trade(3, 9001)];
    let summary = run(dir, &first, &[]);
    assert!(
        summary.contains("settled=2 duplicates=0 rejected=1"),
        "{summary}"
    );
    let rejects = reject_lines(dir);
    let reason = rejects[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("trade_id 9001 was already settled under output_sequence 1")
            && reason.contains("output_sequence 3"),
        "{reason}"
    );
    // After a restart the store answers (the id is not above the highest, not in memory).
    let summary = run(dir, &[trade(4, 9001), trade(5, 9003)], &[]);
    assert!(
        summary.contains("settled=1 duplicates=0 rejected=1"),
        "{summary}"
    );
    let all: Vec<String> = first
        .into_iter()
        .chain([trade(4, 9001), trade(5, 9003)])
        .collect();
    assert_store_matches_model(&store(dir), &model(&all), "trade ids");
}

#[test]
fn rejects_are_durable_state_and_are_not_written_again_on_redelivery() {
    let dir = common::temp_dir();
    let dir = dir.path();
    let lines = vec![
        deposit(1, 1, 5),
        // Trailing rejects: a withdrawal above the balance and a deposit of nothing.
        r#"{"output_sequence": 2, "type": "withdraw", "user_id": 1, "asset": "USDT", "amount": 500}"#.to_string(),
        r#"{"output_sequence": 3, "type": "deposit", "user_id": 1, "asset": "USDT", "amount": 0}"#.to_string(),
    ];
    let summary = run(dir, &lines, &[]);
    assert!(
        summary.contains("settled=1 duplicates=0 rejected=2"),
        "{summary}"
    );
    assert_eq!(reject_lines(dir).len(), 2);
    for _ in 0..2 {
        let summary = run(dir, &lines, &[]);
        assert!(
            summary.contains("settled=0 duplicates=3 rejected=0"),
            "{summary}"
        );
    }
    assert_eq!(reject_lines(dir).len(), 2, "not written again");
    let (passed, report) = audit(dir);
    assert!(passed, "{report}");
    assert_eq!(report["rejections"], 2);
    assert_eq!(report["sequence_range"], serde_json::json!([1, 3]));
}
