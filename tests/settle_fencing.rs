//! P8 fencing on the real Cassandra node (`tools/cassandra start`): the writer epoch is taken
//! with a lightweight transaction, a stale claim loses, a fenced writer's late write loses
//! last-write-wins to the new writer's however high its LSN, and of two `settlement` processes
//! on one keyspace the second is refused unless told to take over, in which case the first
//! stops before writing further commit markers. Skipped with a message when no node runs,
//! except under CI, where a missing node is a failure.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use settlement_wal::ledger::cql::CqlLedger;
use settlement_wal::ledger::{
    BalanceKey, BalanceWrite, Claim, EntryWrites, Ledger, LedgerError, StoreIdentity, StoreUrl,
};

const NODE: &str = "127.0.0.1:9042";

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

fn keyspace(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000_000;
    format!("fence_{tag}_{}_{nanos}", std::process::id())
}

async fn connect(keyspace: &str) -> Option<CqlLedger> {
    let url = format!("cql://{NODE}/{keyspace}?consistency=one");
    let StoreUrl::Cql(config) = url.parse::<StoreUrl>().unwrap() else {
        unreachable!()
    };
    match CqlLedger::connect(config).await {
        Ok(l) => Some(l),
        Err(e @ LedgerError::Unreachable { .. }) => {
            assert!(!under_ci(), "CI is set but Cassandra is not reachable: {e}");
            eprintln!("skipping: no Cassandra on {NODE} (run tools/cassandra start)");
            None
        }
        Err(e) => panic!("connecting to {NODE}/{keyspace}: {e}"),
    }
}

fn balance(lsn: u64, amount: i64) -> EntryWrites {
    EntryWrites {
        lsn,
        event: None,
        balances: vec![BalanceWrite {
            key: BalanceKey::new(1, "BTC"),
            amount,
            lsn,
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_writers_late_write_loses_to_the_new_writer_on_the_node() {
    let ks = keyspace("lww");
    let Some(old) = connect(&ks).await else {
        return;
    };
    let new = connect(&ks).await.unwrap();
    let first = StoreIdentity {
        store_id: 7,
        wal_id: 100,
        wal_lsn_base: 1,
        epoch: 1,
    };
    assert_eq!(old.claim(None, first).await.unwrap(), Claim::Won);
    old.set_write_epoch(1);
    old.apply(&[balance(40, 1)]).await.unwrap();
    // The new writer takes the next epoch; the old one's claim with its stale epoch loses.
    let second = StoreIdentity {
        wal_id: 200,
        wal_lsn_base: 41,
        epoch: 2,
        ..first
    };
    assert_eq!(new.claim(Some(1), second).await.unwrap(), Claim::Won);
    assert_eq!(
        old.claim(
            Some(1),
            StoreIdentity {
                epoch: 2,
                wal_id: 300,
                ..first
            }
        )
        .await
        .unwrap(),
        Claim::Lost(Some(second))
    );
    new.set_write_epoch(2);
    new.apply(&[balance(41, 200)]).await.unwrap();
    // A late write of the fenced writer, with a far higher LSN, lands after it: it loses.
    old.apply(&[balance(5_000, 999)]).await.unwrap();
    let row = new
        .read_balances(&[BalanceKey::new(1, "BTC")])
        .await
        .unwrap()[0]
        .unwrap();
    assert_eq!(
        (row.amount, row.last_lsn),
        (200, 41),
        "the new epoch's write wins"
    );
    new.session()
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {ks}"), ())
        .await
        .unwrap();
}

fn settlement() -> Command {
    Command::new(env!("CARGO_BIN_EXE_settlement"))
}

fn deposit(seq: u64) -> String {
    format!(
        r#"{{"output_sequence": {seq}, "type": "deposit", "user_id": {}, "asset": "USDT", "amount": 1}}"#,
        seq % 7
    )
}

fn spawn_stdin_writer(dir: &Path, store: &str) -> std::process::Child {
    settlement()
        .args([
            "run",
            "--no-progress",
            "--input",
            "-",
            "--batch-delay-ms",
            "1",
        ])
        .arg("--wal-dir")
        .arg(dir.join("wal"))
        .args(["--store", store])
        .arg("--rejects")
        .arg(dir.join("rejects.jsonl"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_second_process_is_refused_and_a_deliberate_takeover_fences_the_first() {
    let ks = keyspace("proc");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Some(probe) = runtime.block_on(connect(&ks)) else {
        return;
    };
    let store = format!("cql://{NODE}/{ks}?consistency=one");
    let a = common::temp_dir();
    let b = common::temp_dir();
    let mut first = spawn_stdin_writer(a.path(), &store);
    let mut stdin = first.stdin.take().unwrap();
    for seq in 1..=50 {
        writeln!(stdin, "{}", deposit(seq)).unwrap();
    }
    stdin.flush().unwrap();
    // Wait until the first writer has settled something.
    let deadline = Instant::now() + Duration::from_secs(60);
    while runtime
        .block_on(probe.high_water())
        .unwrap()
        .is_none_or(|h| h.high_sequence < 50)
    {
        assert!(
            Instant::now() < deadline,
            "the first writer settled nothing"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A second process with its own WAL directory is refused before any write.
    let journal = b.path().join("journal.jsonl");
    std::fs::write(
        &journal,
        (1..=50).map(deposit).collect::<Vec<_>>().join("\n") + "\n",
    )
    .unwrap();
    let args = |extra: &[&str]| {
        let mut c = settlement();
        c.args(["run", "--no-progress", "--input"])
            .arg(&journal)
            .arg("--wal-dir")
            .arg(b.path().join("wal"))
            .args(["--store", &store])
            .arg("--rejects")
            .arg(b.path().join("rejects.jsonl"))
            .args(extra);
        c
    };
    let out = args(&[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("refusing to start") && err.contains("--new-wal"),
        "{err}"
    );
    let epoch_before = runtime.block_on(probe.identity()).unwrap().unwrap().epoch;
    // Told that the first WAL is gone, the second takes the store over with the next epoch...
    let out = args(&["--new-wal"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("settled=0 duplicates=50"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let epoch_after = runtime.block_on(probe.identity()).unwrap().unwrap().epoch;
    assert!(epoch_after > epoch_before);
    // ... and the first, still running, stops at its next commit markers: fenced.
    let mut seq = 51;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = first.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the fenced writer did not stop");
        let _ = writeln!(stdin, "{}", deposit(seq));
        let _ = stdin.flush();
        seq += 1;
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(first.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("fenced"), "{err}");
    runtime
        .block_on(
            probe
                .session()
                .query_unpaged(format!("DROP KEYSPACE IF EXISTS {ks}"), ()),
        )
        .unwrap();
}

/// The deleted-WAL scenario on the node: a rerun is refused before any write; `--new-wal`
/// starts above the store's high-water and finds every event settled (nothing applied twice).
#[test]
fn a_deleted_wal_over_a_cql_store_is_refused_then_adopted_without_double_applying() {
    let ks = keyspace("wal");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Some(probe) = runtime.block_on(connect(&ks)) else {
        return;
    };
    let store = format!("cql://{NODE}/{ks}?consistency=one");
    let dir = common::temp_dir();
    let input = dir.path().join("in.jsonl");
    let lines: Vec<String> = (1..=30).map(deposit).collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let run = |extra: &[&str]| {
        settlement()
            .args(["run", "--no-progress", "--input"])
            .arg(&input)
            .arg("--wal-dir")
            .arg(dir.path().join("wal"))
            .args(["--store", &store])
            .arg("--rejects")
            .arg(dir.path().join("rejects.jsonl"))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(dir.path().join("wal")).unwrap();
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("holds no WAL"),
        "{err}"
    );
    let out = run(&["--new-wal"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("settled=0 duplicates=30"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    common::assert_store_matches_model(&store, &common::model(&lines), "after --new-wal");
    runtime
        .block_on(
            probe
                .session()
                .query_unpaged(format!("DROP KEYSPACE IF EXISTS {ks}"), ()),
        )
        .unwrap();
}
