//! P8, one WAL, one store, one writer: the `settlement` binary on the embedded store, in the
//! situations that leave the happy envelope. A WAL directory deleted (and a first run over it
//! that settles nothing), a store restored from a backup while the WAL went on, an older copy of
//! the WAL put back over a newer store: each ends with balances equal to an independent model,
//! or with a refusal that names both sides and changed nothing.

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

fn run(dir: &Path, input: &Path, extra: &[&str]) -> Output {
    settlement()
        .args(["run", "--input"])
        .arg(input)
        .arg("--wal-dir")
        .arg(dir.join("wal"))
        .args(["--store", &store(dir), "--rejects"])
        .arg(dir.join("rejects.jsonl"))
        .args(["--no-progress"])
        .args(extra)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn refused(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a refusal: {err}");
    assert!(err.contains("refusing to start"), "{err}");
    for n in needles {
        assert!(err.contains(n), "the refusal names {n:?}: {err}");
    }
}

fn deposits(seqs: std::ops::RangeInclusive<u64>) -> Vec<String> {
    seqs.map(|s| {
        format!(
            r#"{{"output_sequence": {s}, "type": "deposit", "user_id": {}, "asset": "USDT", "amount": {}}}"#,
            s % 3,
            10 + s
        )
    })
    .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// What the store holds, as an operator reads it (every balance row and the audit report), to
/// show that a refusal changed nothing.
fn store_bytes(dir: &Path) -> String {
    let read = |args: &[&str]| {
        let out = settlement().args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let st = store(dir);
    read(&["balances", "--json", "--store", &st]) + &read(&["audit", "--json", "--store", &st])
}

#[test]
fn a_deleted_wal_and_a_run_that_settles_nothing_never_double_apply() {
    let dir = common::temp_dir();
    let input = dir.path().join("in.jsonl");
    let lines = deposits(1..=10);
    write_lines(&input, &lines);
    ok(&run(dir.path(), &input, &[]));
    let want = model(&lines);
    assert_store_matches_model(&store(dir.path()), &want, "first run");

    // The WAL directory is deleted. A plain rerun is refused before any write: the store's WAL
    // wrote to it and held its pending entries.
    std::fs::remove_dir_all(dir.path().join("wal")).unwrap();
    let before = store_bytes(dir.path());
    let out = run(dir.path(), &input, &[]);
    refused(&out, &["holds no WAL", "is bound to WAL", "--new-wal"]);
    assert!(
        store_bytes(dir.path()) == before,
        "the refusal changed the store"
    );

    // --new-wal: a new WAL above the store's high-water; the rerun finds every event settled.
    let summary = ok(&run(dir.path(), &input, &["--new-wal"]));
    assert!(summary.contains("settled=0 duplicates=10"), "{summary}");
    assert_store_matches_model(&store(dir.path()), &want, "after --new-wal");

    // The issue's case: the WAL deleted again, then a first run that settles nothing (a typo in
    // --input fails after the WAL was opened), then a rerun over the real input.
    std::fs::remove_dir_all(dir.path().join("wal")).unwrap();
    let typo = run(
        dir.path(),
        &dir.path().join("no-such-file.jsonl"),
        &["--new-wal"],
    );
    assert!(!typo.status.success());
    let summary = ok(&run(dir.path(), &input, &[]));
    assert!(summary.contains("settled=0 duplicates=10"), "{summary}");
    assert_store_matches_model(&store(dir.path()), &want, "after the empty run");
}

#[test]
fn a_store_restored_from_a_backup_is_refused_until_adopted_and_the_journal_fills_it() {
    let dir = common::temp_dir();
    let journal = dir.path().join("journal.jsonl");
    let all = deposits(1..=40);
    write_lines(&journal, &all[..20]);
    ok(&run(dir.path(), &journal, &[]));
    let backup = dir.path().join("backup.redb");
    std::fs::copy(dir.path().join("ledger.redb"), &backup).unwrap();
    // The WAL goes on: 21..=40 are settled after the backup was taken.
    write_lines(&journal, &all);
    let summary = ok(&run(dir.path(), &journal, &[]));
    assert!(summary.contains("settled=20 duplicates=20"), "{summary}");
    // The store is restored from the backup: 21..=40 are gone from it.
    std::fs::copy(&backup, dir.path().join("ledger.redb")).unwrap();
    let before = store_bytes(dir.path());
    let out = run(dir.path(), &journal, &[]);
    refused(
        &out,
        &[
            "is behind its WAL",
            "restored from a backup",
            "--adopt-store",
        ],
    );
    assert!(
        store_bytes(dir.path()) == before,
        "the refusal changed the store"
    );
    // Adopted on purpose: the WAL still holds every entry above the backup's high-water, so
    // they are re-sent from it, and the journal replay finds everything settled.
    let out = run(dir.path(), &journal, &["--adopt-store"]);
    let summary = ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("row(s) re-sent"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(summary.contains("settled=0 duplicates=40"), "{summary}");
    assert_store_matches_model(&store(dir.path()), &model(&all), "after --adopt-store");
    // And from then on the WAL and the store belong together again.
    let summary = ok(&run(dir.path(), &journal, &[]));
    assert!(summary.contains("settled=0 duplicates=40"), "{summary}");
}

#[test]
fn a_restored_store_behind_a_checkpointed_wal_is_filled_from_the_journal() {
    let dir = common::temp_dir();
    let journal = dir.path().join("journal.jsonl");
    let all = deposits(1..=30_000);
    let small = ["--segment-mib", "1"];
    write_lines(&journal, &all[..5_000]);
    ok(&run(dir.path(), &journal, &small));
    let backup = dir.path().join("backup.redb");
    std::fs::copy(dir.path().join("ledger.redb"), &backup).unwrap();
    write_lines(&journal, &all);
    ok(&run(dir.path(), &journal, &small));
    std::fs::copy(&backup, dir.path().join("ledger.redb")).unwrap();
    refused(&run(dir.path(), &journal, &small), &["is behind its WAL"]);
    // The checkpoints removed the segments right above the backup's high-water: nothing is
    // re-sent from the WAL (a suffix alone would skip sequences); the journal fills the store.
    let out = run(
        dir.path(),
        &journal,
        &["--adopt-store", "--segment-mib", "1"],
    );
    let summary = ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing is re-sent from the WAL"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        summary.contains("settled=25000 duplicates=5000"),
        "{summary}"
    );
    assert_store_matches_model(&store(dir.path()), &model(&all), "after the journal replay");
}

#[test]
fn an_older_copy_of_the_wal_over_a_newer_store_is_always_refused() {
    let dir = common::temp_dir();
    let journal = dir.path().join("journal.jsonl");
    let all = deposits(1..=30);
    write_lines(&journal, &all[..10]);
    ok(&run(dir.path(), &journal, &[]));
    let old_wal = dir.path().join("wal-copy");
    common::copy_wal(&dir.path().join("wal"), &old_wal);
    write_lines(&journal, &all);
    ok(&run(dir.path(), &journal, &[]));
    // The old copy is put back.
    std::fs::remove_dir_all(dir.path().join("wal")).unwrap();
    common::copy_wal(&old_wal, &dir.path().join("wal"));
    let before = store_bytes(dir.path());
    for extra in [&[][..], &["--adopt-store"][..]] {
        let out = run(dir.path(), &journal, extra);
        refused(&out, &["older copy of the WAL", "holds writes up to LSN"]);
        assert!(
            store_bytes(dir.path()) == before,
            "the refusal changed the store"
        );
    }
    assert_store_matches_model(&store(dir.path()), &model(&all), "after the refusals");
}

#[test]
fn a_wal_of_another_store_is_refused() {
    let a = common::temp_dir();
    let b = common::temp_dir();
    let journal = a.path().join("journal.jsonl");
    write_lines(&journal, &deposits(1..=5));
    ok(&run(a.path(), &journal, &[]));
    ok(&run(b.path(), &journal, &[]));
    // A's WAL pointed at B's store.
    let out = settlement()
        .args(["run", "--no-progress", "--input"])
        .arg(&journal)
        .arg("--wal-dir")
        .arg(a.path().join("wal"))
        .args(["--store", &store(b.path())])
        .arg("--rejects")
        .arg(b.path().join("rejects.jsonl"))
        .output()
        .unwrap();
    refused(&out, &["belongs to store", "--adopt-store"]);
}

#[test]
fn a_second_writer_on_the_embedded_store_is_refused_and_each_start_takes_an_epoch() {
    let dir = common::temp_dir();
    let journal = dir.path().join("journal.jsonl");
    write_lines(&journal, &deposits(1..=3));
    // A long-running writer on stdin.
    let mut first = settlement()
        .args(["run", "--no-progress", "--input", "-", "--wal-dir"])
        .arg(dir.path().join("wal"))
        .args(["--store", &store(dir.path()), "--rejects"])
        .arg(dir.path().join("rejects.jsonl"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(800));
    let other = common::temp_dir();
    let out = settlement()
        .args(["run", "--no-progress", "--new-wal", "--input"])
        .arg(&journal)
        .arg("--wal-dir")
        .arg(other.path().join("wal"))
        .args(["--store", &store(dir.path())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already open") || err.contains("another process"),
        "{err}"
    );
    drop(first.stdin.take());
    assert!(first.wait().unwrap().success());
    // Every start took the next epoch (logged as `writer epoch claimed`).
    let out = run(dir.path(), &journal, &["--log-format", "json"]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("writer epoch claimed"), "{err}");
    assert!(err.contains("\"epoch\":2"), "{err}");
}
