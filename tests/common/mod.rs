//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use settlement_wal::wal::{Wal, WalOptions};

/// Smallest segment size, so tests roll segments quickly.
pub const SMALL_SEGMENT_BYTES: u64 = 256 * 1024;

/// A temporary directory on the same file system as the work tree (tmpfs has no real sync).
pub fn temp_dir() -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).unwrap();
    tempfile::Builder::new()
        .prefix("wal-test-")
        .tempdir_in(base)
        .unwrap()
}

pub fn small_options() -> WalOptions {
    WalOptions::default().segment_size_bytes(SMALL_SEGMENT_BYTES)
}

pub fn open_small(dir: &Path) -> Wal {
    Wal::open(dir, small_options()).expect("open WAL")
}

/// The payload a test writes for `lsn`-ish index `i`: deterministic, variable length.
pub fn payload(i: u64) -> Vec<u8> {
    let len = 1 + (i as usize * 37) % 300;
    (0..len)
        .map(|j| (i as usize * 31 + j * 7) as u8 ^ 0x5a)
        .collect()
}

/// Segment files of a WAL directory, in name (= LSN) order.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

/// Copies a WAL directory's segment files into a fresh directory.
pub fn copy_wal(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in segment_files(from) {
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
}

/// A tiny deterministic PRNG (xorshift64*), so failures print a seed that reproduces them.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// A seed from the clock, or from `$var` when set (to replay a failure).
    pub fn seed_from_env(var: &str) -> u64 {
        std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
}

/// An independent model of settlement (written from the interface contract, sharing no code with
/// the library): final balances, the trades and movements that must be settled, and the number
/// of messages that must be rejected.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Model {
    pub balances: std::collections::BTreeMap<(u64, String), i64>,
    pub trades: std::collections::BTreeSet<u64>,
    pub movements: std::collections::BTreeSet<u64>,
    pub rejected: u64,
}

impl Model {
    /// The balances that are not zero (a row that nets to zero may or may not exist in a store).
    pub fn nonzero_balances(&self) -> std::collections::BTreeMap<(u64, String), i64> {
        self.balances
            .iter()
            .filter(|(_, a)| **a != 0)
            .map(|(k, a)| (k.clone(), *a))
            .collect()
    }
}

/// Checks a settled store through the `settlement` binary, as an operator would: every nonzero
/// balance (`balances --json`) equals the model's, and `audit --json` passes and counts every
/// trade and every movement exactly once (P3, P7). `context` starts every failure message.
/// Returns how many balance rows were verified.
#[cfg(feature = "settlement")]
pub fn assert_store_matches_model(store: &str, want: &Model, context: &str) -> usize {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_settlement"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["balances", "--json", "--store", store]);
    assert!(
        out.status.success(),
        "{context}: balances failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let got: std::collections::BTreeMap<(u64, String), i64> = rows
        .iter()
        .map(|r| {
            (
                (
                    r["user_id"].as_u64().unwrap(),
                    r["asset"].as_str().unwrap().to_string(),
                ),
                r["amount"].as_i64().unwrap(),
            )
        })
        .filter(|(_, a)| *a != 0)
        .collect();
    let want_balances = want.nonzero_balances();
    assert_eq!(got.len(), want_balances.len(), "{context}: balance rows");
    for (k, a) in &want_balances {
        assert_eq!(got.get(k), Some(a), "{context}: balance of {k:?}");
    }
    let out = run(&["audit", "--json", "--store", store]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{context}: audit failed: {report}");
    assert_eq!(
        report["trades"].as_u64().unwrap(),
        want.trades.len() as u64,
        "{context}: every trade once"
    );
    assert_eq!(
        report["movements"].as_u64().unwrap(),
        want.movements.len() as u64,
        "{context}: every movement once"
    );
    want_balances.len()
}

pub fn model(lines: &[String]) -> Model {
    use serde_json::Value;
    let mut m = Model::default();
    // Dedup by what was seen (P9): a sequence is handled the first time it arrives, in
    // whatever order; a trade id is settled once.
    let mut seen: std::collections::BTreeSet<u64> = Default::default();
    for line in lines {
        let Ok(Value::Object(o)) = serde_json::from_str::<Value>(line) else {
            m.rejected += 1;
            continue;
        };
        let Some(seq) = o.get("output_sequence").and_then(Value::as_u64) else {
            m.rejected += 1;
            continue;
        };
        if !seen.insert(seq) {
            continue; // duplicate
        }
        let pos = |k: &str| o.get(k).and_then(Value::as_i64).filter(|v| *v > 0);
        match o.get("type").and_then(Value::as_str) {
            None => {
                let sym = o.get("symbol").and_then(Value::as_str).unwrap_or("");
                let parts: Vec<&str> = sym.split('-').collect();
                let (Some(p), Some(q), Some(b), Some(s), Some(id), true) = (
                    pos("price"),
                    pos("quantity"),
                    o.get("buyer_user_id").and_then(Value::as_u64),
                    o.get("seller_user_id").and_then(Value::as_u64),
                    o.get("trade_id").and_then(Value::as_u64),
                    parts.len() == 2 && parts[0] != parts[1],
                ) else {
                    m.rejected += 1;
                    continue;
                };
                if m.trades.contains(&id) {
                    m.rejected += 1; // a reused trade id
                    continue;
                }
                let n = p * q;
                *m.balances.entry((b, parts[0].into())).or_default() += q;
                *m.balances.entry((b, parts[1].into())).or_default() -= n;
                *m.balances.entry((s, parts[0].into())).or_default() -= q;
                *m.balances.entry((s, parts[1].into())).or_default() += n;
                m.trades.insert(id);
            }
            Some(kind) => {
                let (Some(user), Some(asset), Some(amount), true) = (
                    o.get("user_id").and_then(Value::as_u64),
                    o.get("asset").and_then(Value::as_str).map(str::to_string),
                    pos("amount"),
                    kind == "deposit" || kind == "withdraw",
                ) else {
                    m.rejected += 1;
                    continue;
                };
                let bal = m.balances.entry((user, asset)).or_default();
                if kind == "deposit" {
                    *bal += amount;
                } else if *bal >= amount {
                    *bal -= amount;
                } else {
                    m.rejected += 1;
                    continue;
                }
                m.movements.insert(seq);
            }
        }
    }
    m
}

/// The pipeline settings `settlement run` logged when it started settling (its `settling` event
/// under `--log-format json`), as the JSON object of the event's fields; `None` when `stderr`
/// holds no such event.
pub fn logged_settings(stderr: &str) -> Option<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["fields"].clone())
        .find(|f| f["message"] == "settling")
}
