//! The `settlement` binary end to end on the embedded store: the interface contract (commands,
//! flags, JSON), validation into the rejects file (P6), exactly-once over re-delivery, gaps,
//! signals, ZeroMQ, and the metrics endpoint.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::model;

fn settlement() -> Command {
    Command::new(env!("CARGO_BIN_EXE_settlement"))
}

fn store(dir: &Path) -> String {
    format!("embedded:{}", dir.join("ledger.redb").display())
}

fn run(dir: &Path, input: &str, extra: &[&str]) -> std::process::Output {
    settlement()
        .args(["run", "--input", input, "--wal-dir"])
        .arg(dir.join("wal"))
        .args(["--store", &store(dir), "--rejects"])
        .arg(dir.join("rejects.jsonl"))
        .args(["--no-progress"])
        .args(extra)
        .output()
        .unwrap()
}

fn balances(dir: &Path) -> Vec<serde_json::Value> {
    let out = settlement()
        .args(["balances", "--json", "--store", &store(dir)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const INPUT: &str = r#"{"output_sequence": 1, "type": "deposit", "user_id": 1, "asset": "USDT", "amount": 1000000}
{"output_sequence": 2, "type": "deposit", "user_id": 2, "asset": "BTC", "amount": 10}
{"output_sequence": 3, "trade_id": 9001, "symbol": "BTC-USDT", "buyer_user_id": 1, "seller_user_id": 2, "price": 65000, "quantity": 3, "timestamp_ns": 1763900000000000000, "venue": "ignored"}
{"output_sequence": 4, "type": "withdraw", "user_id": 1, "asset": "USDT", "amount": 500}
{"output_sequence": 5, "type": "withdraw", "user_id": 2, "asset": "BTC", "amount": 999}
not json at all
{"output_sequence": 6, "trade_id": 9002, "symbol": "BTC-USDT", "buyer_user_id": 1, "seller_user_id": 2, "price": 0, "quantity": 3, "timestamp_ns": 1}
{"output_sequence": 7, "trade_id": 9003, "symbol": "BTC-USDT", "buyer_user_id": 1, "seller_user_id": 2, "price": 4294967296, "quantity": 4294967296, "timestamp_ns": 1}
{"output_sequence": 8, "trade_id": 9004, "symbol": "BTC-USDT", "buyer_user_id": 7, "seller_user_id": 7, "price": 100, "quantity": 2, "timestamp_ns": 1}
{"output_sequence": 3, "trade_id": 9001, "symbol": "BTC-USDT", "buyer_user_id": 1, "seller_user_id": 2, "price": 65000, "quantity": 3, "timestamp_ns": 1763900000000000000}
"#;

/// The embedded store's default micro-batch bound is 1000 (a CQL store's is 100: settle_cql), and
/// `--batch-max` overrides it; the settings in effect are logged when settling starts.
#[test]
fn the_embedded_store_settles_with_the_large_default_batch_bound() {
    let dir = common::temp_dir();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, INPUT).unwrap();
    for (extra, want) in [
        (&["--log-format", "json"][..], 1000),
        (&["--log-format", "json", "--batch-max", "7"][..], 7),
    ] {
        let out = run(dir.path(), input.to_str().unwrap(), extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let settings = common::logged_settings(&stderr)
            .unwrap_or_else(|| panic!("no `settling` event in: {stderr}"));
        assert_eq!(settings["batch_max"], want, "{extra:?}: {settings}");
        assert_eq!(settings["inflight"], 8, "{settings}");
    }
}

/// Out-of-range limits (micro-batch size, applies in flight, segment size) are refused before
/// anything is opened, with the flag and its range named
/// (they used to be clamped silently).
#[test]
fn out_of_range_limits_are_refused() {
    let dir = common::temp_dir();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, INPUT).unwrap();
    for (flag, value, range) in [
        ("--batch-max", "0", "1..=10000"),
        ("--batch-max", "10001", "1..=10000"),
        ("--inflight", "0", "1..=256"),
        ("--inflight", "257", "1..=256"),
        ("--segment-mib", "0", "1..=1024"),
        ("--segment-mib", "2048", "1..=1024"),
    ] {
        let out = run(dir.path(), input.to_str().unwrap(), &[flag, value]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(&format!("{value} is not in {range}")),
            "{flag} {value}: {stderr}"
        );
        assert!(
            !dir.path().join("wal").exists(),
            "nothing is opened: {stderr}"
        );
    }
}

#[test]
fn a_file_is_settled_with_a_summary_rejects_with_reasons_and_exactly_once_on_rerun() {
    let dir = common::temp_dir();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, INPUT).unwrap();
    let out = run(dir.path(), input.to_str().unwrap(), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        summary.trim(),
        "events=10 settled=5 duplicates=1 rejected=4 gaps=0 filled=0",
        "{summary}"
    );

    // Rejects: the original message and a reason for each.
    let rejects = std::fs::read_to_string(dir.path().join("rejects.jsonl")).unwrap();
    let rejects: Vec<serde_json::Value> = rejects
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rejects.len(), 4);
    let reason_of = |needle: &str| {
        rejects
            .iter()
            .find(|r| r["reason"].as_str().unwrap().contains(needle))
            .unwrap_or_else(|| panic!("no reject with {needle:?}: {rejects:?}"))
    };
    assert_eq!(reason_of("insufficient balance")["output_sequence"], 5);
    assert_eq!(reason_of("not valid JSON")["message"], "not json at all");
    assert_eq!(
        reason_of("\"price\" must be positive")["output_sequence"],
        6
    );
    assert_eq!(reason_of("overflows")["output_sequence"], 7);

    let rows = balances(dir.path());
    let get = |u: u64, a: &str| {
        rows.iter()
            .find(|r| r["user_id"] == u && r["asset"] == a)
            .map(|r| r["amount"].as_i64().unwrap())
    };
    assert_eq!(get(1, "USDT"), Some(1_000_000 - 195_000 - 500));
    assert_eq!(get(1, "BTC"), Some(3));
    assert_eq!(get(2, "BTC"), Some(7));
    assert_eq!(get(2, "USDT"), Some(195_000));
    assert_eq!(get(7, "BTC"), Some(0), "self-trade nets to zero");
    for r in &rows {
        assert!(r["last_lsn"].as_u64().unwrap() > 0);
    }

    // The same file again: everything is a duplicate, nothing changes.
    let out = run(dir.path(), input.to_str().unwrap(), &[]);
    assert!(out.status.success());
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("settled=0 duplicates=9"), "{summary}");
    assert_eq!(balances(dir.path()), rows);

    let out = settlement()
        .args(["audit", "--store", &store(dir.path())])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("audit PASSED"));
}

#[test]
fn stdin_input_and_the_demo_generator_agree_with_an_independent_model() {
    let dir = common::temp_dir();
    let lines = settlement_wal::settle::demo::generate(&settlement_wal::settle::demo::DemoSpec {
        trades: 3000,
        users: 20,
        ..Default::default()
    });
    let mut child = settlement()
        .args(["run", "--input", "-", "--wal-dir"])
        .arg(dir.path().join("wal"))
        .args(["--store", &store(dir.path()), "--rejects"])
        .arg(dir.path().join("rejects.jsonl"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all((lines.join("\n") + "\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = model(&lines);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains(&format!("rejected={}", want.rejected)),
        "{summary} vs {}",
        want.rejected
    );
    for r in balances(dir.path()) {
        let key = (
            r["user_id"].as_u64().unwrap(),
            r["asset"].as_str().unwrap().to_string(),
        );
        assert_eq!(
            r["amount"].as_i64().unwrap(),
            *want.balances.get(&key).unwrap_or(&0),
            "{key:?}"
        );
    }
}

#[test]
fn on_gap_halt_settles_what_came_before_and_log_counts() {
    let dir = common::temp_dir();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"output_sequence\": 1, \"type\": \"deposit\", \"user_id\": 1, \"asset\": \"USDT\", \"amount\": 5}\n\
         {\"output_sequence\": 2, \"type\": \"deposit\", \"user_id\": 1, \"asset\": \"USDT\", \"amount\": 7}\n\
         {\"output_sequence\": 4, \"type\": \"deposit\", \"user_id\": 1, \"asset\": \"USDT\", \"amount\": 5}\n",
    )
    .unwrap();
    // The gap is inside one micro-batch (the default bound is 1000): 1 and 2 are settled and
    // synced, then the process stops naming 3.
    let out = run(dir.path(), input.to_str().unwrap(), &["--on-gap", "halt"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gap in output_sequence: 3 is missing (the next message was 4)"),
        "{err}"
    );
    let rows = balances(dir.path());
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["amount"], 12, "1 and 2 are settled before the halt");
    // A rerun with the backfill settles 3 and then 4, exactly once.
    std::fs::write(
        &input,
        "{\"output_sequence\": 3, \"type\": \"deposit\", \"user_id\": 1, \"asset\": \"USDT\", \"amount\": 100}\n\
         {\"output_sequence\": 4, \"type\": \"deposit\", \"user_id\": 1, \"asset\": \"USDT\", \"amount\": 5}\n\
         {\"output_sequence\": 2, \"type\": \"deposit\", \"user_id\": 1, \"asset\": \"USDT\", \"amount\": 7}\n",
    )
    .unwrap();
    let out = run(dir.path(), input.to_str().unwrap(), &["--on-gap", "halt"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(balances(dir.path())[0]["amount"], 117);

    let dir = common::temp_dir();
    std::fs::write(
        &input,
        "{\"output_sequence\": 1, \"type\": \"deposit\", \"user_id\": 1, \"asset\": \"USDT\", \"amount\": 5}\n\
         {\"output_sequence\": 4, \"type\": \"deposit\", \"user_id\": 1, \"asset\": \"USDT\", \"amount\": 5}\n",
    )
    .unwrap();
    let out = run(dir.path(), input.to_str().unwrap(), &[]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("settled=2 duplicates=0 rejected=0 gaps=1 filled=0"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn sigterm_drains_and_exits_zero_with_a_summary() {
    let dir = common::temp_dir();
    let mut child = settlement()
        .args(["run", "--input", "-", "--wal-dir"])
        .arg(dir.path().join("wal"))
        .args(["--store", &store(dir.path()), "--rejects"])
        .arg(dir.path().join("rejects.jsonl"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for i in 1..=50 {
        writeln!(stdin, r#"{{"output_sequence": {i}, "type": "deposit", "user_id": 1, "asset": "USDT", "amount": 10}}"#).unwrap();
    }
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "exit {status:?}");
    assert!(out.contains("settled=50"), "{out}");
    drop(stdin);
    let rows = balances(dir.path());
    assert_eq!(rows[0]["amount"], 500);
}

#[test]
fn zeromq_publisher_messages_are_settled_and_metrics_are_served() {
    use zeromq::{Socket, SocketSend};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let dir = common::temp_dir();
    let mut publisher = zeromq::PubSocket::new();
    let endpoint = rt.block_on(publisher.bind("tcp://127.0.0.1:0")).unwrap();
    let port = match endpoint {
        zeromq::Endpoint::Tcp(_, port) => port,
        other => panic!("{other:?}"),
    };
    let metrics_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = settlement()
        .args([
            "run",
            "--input",
            &format!("zmq+tcp://127.0.0.1:{port}"),
            "--wal-dir",
        ])
        .arg(dir.path().join("wal"))
        .args(["--store", &store(dir.path()), "--rejects"])
        .arg(dir.path().join("rejects.jsonl"))
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // A slow-joiner publisher: keep sending until the subscriber has connected and settled.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut metrics = String::new();
    let mut seq = 0u64;
    while Instant::now() < deadline {
        seq += 1;
        let msg = format!(
            r#"{{"output_sequence": {seq}, "type": "deposit", "user_id": 3, "asset": "ETH", "amount": 1}}"#
        );
        rt.block_on(publisher.send(msg.into())).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        if seq % 10 == 0 {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", metrics_port)) {
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    .unwrap();
                metrics.clear();
                s.read_to_string(&mut metrics).unwrap();
                if metrics.contains("settlement_settled_total") && seq > 40 {
                    break;
                }
            }
        }
    }
    // A gap (ZeroMQ dropped 10 messages): /health reports the open hole once it is settled.
    seq += 11;
    let msg = format!(
        r#"{{"output_sequence": {seq}, "type": "deposit", "user_id": 3, "asset": "ETH", "amount": 1}}"#
    );
    rt.block_on(publisher.send(msg.into())).unwrap();
    let mut health = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        health.clear();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\n\r\n").unwrap();
        s.read_to_string(&mut health).unwrap();
        if health.contains("open_holes 1") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("open_holes 1"), "{health}");
    assert!(metrics.contains("settlement_settled_total"), "{metrics}");
    assert!(metrics.contains("settlement_wal_sync_seconds"), "{metrics}");
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let summary = String::from_utf8_lossy(&out.stdout);
    let settled: u64 = summary
        .split_whitespace()
        .find_map(|w| w.strip_prefix("settled="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(settled > 0, "{summary}");
    // Messages before the subscriber joined were never received: the first settled one is a gap.
    let rows = balances(dir.path());
    assert_eq!(rows[0]["amount"].as_u64().unwrap(), settled);
}

#[test]
fn bad_arguments_and_stores_give_clear_errors() {
    let out = settlement()
        .args(["run", "--input", "x", "--store", "postgres://nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid store URL"));
    let dir = common::temp_dir();
    let out = run(
        dir.path(),
        dir.path().join("missing.jsonl").to_str().unwrap(),
        &[],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot open input"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
