//! `wal-inspect` end to end: the real binary over WALs built here with the real `Wal` and real
//! settlement entries, then damaged (torn tail, bit flips, a deleted segment, a future format
//! version, a truncated header) and checked command by command, text and JSON.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;
use common::{segment_files, temp_dir};
use serde_json::Value;
use settlement_wal::ledger::embedded::EmbeddedLedger;
use settlement_wal::ledger::{EntryWrites, Ledger};
use settlement_wal::settle::entry::{BalanceCache, SettlementEntry};
use settlement_wal::settle::event::parse_event;
use settlement_wal::wal::{inspect_with, Lsn, Wal, WalIdentity, WalOptions};

// ---------------------------------------------------------------- helpers

fn small() -> WalOptions {
    WalOptions::default().segment_size_bytes(256 * 1024)
}

/// Computes real settlement entries the way the pipeline does (cache, post-images).
#[derive(Default)]
struct Entries {
    cache: BalanceCache,
    seq: u64,
}

impl Entries {
    fn settle(&mut self, json: String) -> SettlementEntry {
        let event = parse_event(json.as_bytes()).expect("valid event");
        let mut keys = Vec::new();
        self.cache.missing(&event, &mut keys);
        for k in keys {
            self.cache.load(k, 0);
        }
        self.cache.settle(event).expect("settles")
    }

    fn trade(
        &mut self,
        trade_id: u64,
        buyer: u64,
        seller: u64,
        price: i64,
        qty: i64,
    ) -> SettlementEntry {
        self.seq += 1;
        self.settle(format!(
            r#"{{"output_sequence":{},"trade_id":{trade_id},"symbol":"BTC-USDT","buyer_user_id":{buyer},"seller_user_id":{seller},"price":{price},"quantity":{qty},"timestamp_ns":1763900000000000000}}"#,
            self.seq
        ))
    }

    fn deposit(&mut self, user: u64, asset: &str, amount: i64) -> SettlementEntry {
        self.seq += 1;
        self.settle(format!(
            r#"{{"output_sequence":{},"type":"deposit","user_id":{user},"asset":"{asset}","amount":{amount}}}"#,
            self.seq
        ))
    }
}

/// The standard WAL: 2,400 trades (trade id = 1000 + i, buyers and sellers among users 1..=7) in
/// synced batches of 100, all committed, then 5 more trades left pending. Several 256 KiB
/// segments. Returns the LSNs of the pending entries.
fn build_standard(dir: &Path) -> Vec<Lsn> {
    let wal = Wal::open(dir, small()).unwrap();
    let mut entries = Entries::default();
    for batch in 0..24u64 {
        let payloads: Vec<Vec<u8>> = (0..100u64)
            .map(|j| {
                let i = batch * 100 + j;
                entries
                    .trade(
                        1000 + i,
                        1 + i % 7,
                        1 + (i + 3) % 7,
                        100 + (i % 50) as i64,
                        1 + (i % 9) as i64,
                    )
                    .encode()
            })
            .collect();
        let (first, last) = wal.append_batch(&payloads).unwrap();
        wal.sync().unwrap();
        wal.commit_range(first, last).unwrap();
    }
    let pending: Vec<Lsn> = (0..5u64)
        .map(|j| {
            wal.append(&entries.trade(9000 + j, 11, 12, 7, 2).encode())
                .unwrap()
        })
        .collect();
    wal.sync().unwrap();
    assert!(
        segment_files(dir).len() >= 3,
        "the standard WAL spans several segments"
    );
    pending
}

/// `(file, offset, size, lsn)` of every record, through the library's read-only view.
fn layout(dir: &Path) -> Vec<(PathBuf, u64, usize, Lsn)> {
    let mut out = Vec::new();
    inspect_with(dir, &mut |path, r| {
        out.push((path.to_path_buf(), r.offset as u64, r.size_bytes, r.lsn))
    })
    .unwrap();
    out
}

fn flip_bit(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, offset).unwrap();
}

fn wal_inspect(args: &[&str]) -> Output {
    Command::cargo_bin("wal-inspect")
        .unwrap()
        .args(args)
        .timeout(std::time::Duration::from_secs(120))
        .output()
        .unwrap()
}

fn run_dir(args: &[&str], dir: &Path) -> Output {
    let mut all: Vec<&str> = args.to_vec();
    all.insert(1, dir.to_str().unwrap());
    wal_inspect(&all)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", stdout(o)))
}

/// A failure that is exactly one `error: ...` line on stderr, no panic, exit 2.
fn assert_one_line_error(o: &Output, mentions: &str) {
    let err = stderr(o);
    assert_eq!(code(o), 2, "stderr: {err}\nstdout: {}", stdout(o));
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains(mentions),
        "{err:?} should mention {mentions:?}"
    );
}

fn name_of(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

fn files_of(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    segment_files(dir)
        .into_iter()
        .map(|p| (name_of(&p), std::fs::read(&p).unwrap()))
        .collect()
}

/// Makes the newest record a torn tail: flips a bit in its payload (no valid record follows).
fn tear_last_record(dir: &Path) -> (PathBuf, u64, Lsn) {
    let (path, offset, _, lsn) = layout(dir).pop().unwrap();
    flip_bit(&path, offset + 30);
    (path, offset, lsn)
}

// ---------------------------------------------------------------- summary

#[test]
fn summary_lists_every_segment_with_states_and_totals() {
    let dir = temp_dir();
    let pending = build_standard(dir.path());
    let segs = segment_files(dir.path());
    let o = run_dir(&["summary"], dir.path());
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    for s in &segs {
        assert!(text.contains(&name_of(s)), "{text}");
    }
    assert!(
        text.contains("recyclable") && text.contains("active"),
        "{text}"
    );
    assert!(text.contains("5 pending entries"), "{text}");
    assert!(text.contains("tail: clean"), "{text}");
    assert!(text.contains("writer: none"), "{text}");

    let v = json(&run_dir(&["summary", "--json"], dir.path()));
    let rows = v["segments"].as_array().unwrap();
    assert_eq!(rows.len(), segs.len());
    assert_eq!(rows.last().unwrap()["state"], "active");
    // Everything but the last 5 entries is committed: every sealed segment is recyclable
    // except the one holding the newest entry (checkpoints keep it) -- that is the active one.
    for r in &rows[..rows.len() - 1] {
        assert_eq!(r["state"], "recyclable", "{r}");
        assert_eq!(r["tail"]["state"], "clean");
    }
    let t = &v["totals"];
    assert_eq!(t["pending"], 5);
    assert_eq!(t["entries"], 2405);
    assert_eq!(t["commits"], 24);
    assert_eq!(t["first_lsn"], 1);
    assert_eq!(t["last_lsn"], *pending.last().unwrap());
    assert_eq!(t["committed_watermark"], pending[0] - 1);
    assert_eq!(v["tail"]["state"], "clean");
    let counted: u64 = rows.iter().map(|r| r["entries"].as_u64().unwrap()).sum();
    assert_eq!(counted, 2405);
}

#[test]
fn summary_prints_the_wal_id_and_owner_id() {
    let dir = temp_dir();
    let identity = WalIdentity {
        wal_id: 0x0123_4567_89ab_cdef,
        owner_id: 41,
    };
    let wal = Wal::open(dir.path(), small().identity(identity)).unwrap();
    wal.append(b"x").unwrap();
    wal.sync().unwrap();
    wal.rebind(42).unwrap();
    drop(wal);
    let o = run_dir(&["summary"], dir.path());
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("identity: wal_id 0x0123456789abcdef, owner_id 42"),
        "{text}"
    );
    // The older segment's other owner is listed by name.
    let first = name_of(&segment_files(dir.path())[0]);
    assert!(
        text.contains(&format!(
            "{first}: format version 2, wal_id 0x0123456789abcdef, owner_id 41"
        )),
        "{text}"
    );
    let v = json(&run_dir(&["summary", "--json"], dir.path()));
    assert_eq!(v["identity"]["wal_id"], 0x0123_4567_89ab_cdef_u64);
    assert_eq!(v["identity"]["owner_id"], 42);
    let rows = v["segments"].as_array().unwrap();
    assert_eq!(rows[0]["identity"]["owner_id"], 41);
    assert_eq!(rows[1]["identity"]["owner_id"], 42);
    assert_eq!(rows[1]["format_version"], 2);
}

#[test]
fn verify_names_a_segment_of_another_wal() {
    let dir = temp_dir();
    let other = temp_dir();
    let ours = WalIdentity {
        wal_id: 0x1111,
        owner_id: 0,
    };
    let theirs = WalIdentity {
        wal_id: 0x2222,
        owner_id: 0,
    };
    let next = {
        let wal = Wal::open(dir.path(), small().identity(ours)).unwrap();
        wal.append(b"ours").unwrap();
        wal.sync().unwrap();
        wal.last_lsn() + 1
    };
    {
        let wal = Wal::open(other.path(), small().identity(theirs).first_lsn(next)).unwrap();
        wal.append(b"theirs").unwrap();
        wal.sync().unwrap();
    }
    let foreign = segment_files(other.path()).remove(0);
    std::fs::copy(&foreign, dir.path().join(foreign.file_name().unwrap())).unwrap();
    let o = run_dir(&["verify"], dir.path());
    assert_eq!(code(&o), 2, "{}", stdout(&o));
    let text = stdout(&o);
    assert!(
        text.contains(&name_of(&foreign)) && text.contains("belongs to another WAL"),
        "{text}"
    );
    assert!(text.contains("0x0000000000002222"), "{text}");
}

#[test]
fn summary_shows_sealed_segments_when_entries_are_uncommitted() {
    let dir = temp_dir();
    let wal = Wal::open(dir.path(), small()).unwrap();
    let mut e = Entries::default();
    for i in 0..2500u64 {
        wal.append(&e.trade(i, 1, 2, 10, 1).encode()).unwrap();
    }
    wal.sync().unwrap();
    drop(wal);
    let v = json(&run_dir(&["summary", "--json"], dir.path()));
    let rows = v["segments"].as_array().unwrap();
    assert!(rows.len() >= 2);
    assert!(rows[..rows.len() - 1]
        .iter()
        .all(|r| r["state"] == "sealed"));
    assert_eq!(v["totals"]["pending"], 2500);
    assert_eq!(v["totals"]["committed_watermark"], 0);
}

// ---------------------------------------------------------------- dump

#[test]
fn dump_decodes_entries_commits_and_filters() {
    let dir = temp_dir();
    let pending = build_standard(dir.path());
    // Everything, as JSON: one document, every record.
    let all = json(&run_dir(&["dump", "--json"], dir.path()));
    let records = all["records"].as_array().unwrap();
    assert_eq!(records.len() as u64, 2405 + 24);
    assert_eq!(all["matched"], 2429);
    let first = &records[0];
    assert_eq!(first["lsn"], 1);
    assert_eq!(first["type"], "entry");
    assert_eq!(first["checksum"], "ok");
    assert_eq!(first["offset"], 64);
    assert_eq!(first["entry"]["event"]["type"], "trade");
    assert_eq!(first["entry"]["event"]["trade_id"], 1000);
    assert_eq!(first["entry"]["event"]["symbol"], "BTC-USDT");
    assert_eq!(first["entry"]["post_images"].as_array().unwrap().len(), 4);
    let commit = records.iter().find(|r| r["type"] == "commit").unwrap();
    assert_eq!(commit["commit"]["first_lsn"], 1);
    assert_eq!(commit["commit"]["last_lsn"], 100);

    // LSN range.
    let v = json(&run_dir(
        &["dump", "--json", "--from", "50", "--to", "60"],
        dir.path(),
    ));
    let lsns: Vec<u64> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["lsn"].as_u64().unwrap())
        .collect();
    assert_eq!(lsns, (50..=60).collect::<Vec<_>>());

    // One trade.
    let v = json(&run_dir(
        &["dump", "--json", "--trade-id", "9002"],
        dir.path(),
    ));
    let recs = v["records"].as_array().unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["lsn"], pending[2]);

    // One user: users 11 and 12 only trade in the 5 pending entries.
    let v = json(&run_dir(&["dump", "--json", "--user", "12"], dir.path()));
    assert_eq!(v["records"].as_array().unwrap().len(), 5);

    // Only commits.
    let v = json(&run_dir(
        &["dump", "--json", "--type", "commit"],
        dir.path(),
    ));
    let recs = v["records"].as_array().unwrap();
    assert_eq!(recs.len(), 24);
    assert!(recs
        .iter()
        .all(|r| r["type"] == "commit" && r["commit"]["last_lsn"].is_u64()));

    // Text: one line per record with file:offset, size, checksum and the decoded event.
    let o = run_dir(&["dump", "--trade-id", "1000"], dir.path());
    assert_eq!(code(&o), 0);
    let text = stdout(&o);
    let line = text
        .lines()
        .find(|l| l.contains("trade 1000 "))
        .expect(&text);
    assert!(line.contains("00000000000000000001.wal:64"), "{line}");
    assert!(line.contains(" ok "), "{line}");
    assert!(
        line.contains("user 1 BTC=") && line.contains("user 4 USDT="),
        "{line}"
    );
    assert!(text.contains("1 record(s) shown"), "{text}");
}

#[test]
fn dump_shows_a_payload_that_is_not_a_settlement_entry_as_hex() {
    let dir = temp_dir();
    let wal = Wal::open(dir.path(), small()).unwrap();
    let mut e = Entries::default();
    wal.append(&e.deposit(1, "USDT", 1000).encode()).unwrap();
    wal.append(&[0xde, 0xad, 0xbe, 0xef, 0x01]).unwrap();
    wal.sync().unwrap();
    wal.commit_range(1, 1).unwrap();
    wal.checkpoint().unwrap();
    wal.sync().unwrap();
    drop(wal);
    let o = run_dir(&["dump"], dir.path());
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("deposit user 1 USDT 1000"), "{text}");
    assert!(
        text.contains("not a settlement entry") && text.contains("deadbeef01"),
        "{text}"
    );
    assert!(text.contains("commits entries 1..=1"), "{text}");
    let v = json(&run_dir(&["dump", "--json"], dir.path()));
    let bad = &v["records"][1];
    assert_eq!(bad["undecodable"]["hex"], "deadbeef01");
    // pending shows it too, and says recovery would stop there.
    let o = run_dir(&["pending"], dir.path());
    assert_eq!(code(&o), 0);
    assert!(
        stdout(&o).contains("deadbeef01") && stdout(&o).contains("recovery would stop"),
        "{}",
        stdout(&o)
    );
    let v = json(&run_dir(&["pending", "--json"], dir.path()));
    assert_eq!(v["count"], 1);
    assert_eq!(v["entries"][0]["lsn"], 2);
    assert!(v["entries"][0]["undecodable"]["note"]
        .as_str()
        .unwrap()
        .contains("not a settlement entry"));
}

#[test]
fn dump_shows_checkpoints_and_summary_starts_after_removed_segments() {
    let dir = temp_dir();
    let wal = Wal::open(dir.path(), small()).unwrap();
    let mut e = Entries::default();
    for i in 0..3000u64 {
        let lsn = wal.append(&e.trade(i, 1, 2, 10, 1).encode()).unwrap();
        wal.sync().unwrap();
        wal.commit(lsn).unwrap();
    }
    wal.append(&e.deposit(5, "BTC", 1).encode()).unwrap();
    wal.sync().unwrap();
    let report = wal.checkpoint().unwrap();
    assert!(!report.removed.is_empty());
    wal.sync().unwrap();
    drop(wal);
    let first_kept: Lsn = name_of(&segment_files(dir.path())[0])[..20]
        .parse()
        .unwrap();
    let v = json(&run_dir(
        &["dump", "--json", "--type", "checkpoint"],
        dir.path(),
    ));
    let recs = v["records"].as_array().unwrap();
    assert_eq!(recs.len(), 1, "{v}");
    assert_eq!(recs[0]["checkpoint"]["first_retained_lsn"], first_kept);
    assert_eq!(
        recs[0]["checkpoint"]["committed_watermark"],
        report.committed_watermark
    );
    let text = stdout(&run_dir(&["dump", "--type", "checkpoint"], dir.path()));
    assert!(
        text.contains(&format!("first retained LSN {first_kept}")),
        "{text}"
    );
    let s = json(&run_dir(&["summary", "--json"], dir.path()));
    assert_eq!(s["totals"]["first_lsn"], first_kept);
    assert_eq!(s["totals"]["pending"], 1);
    assert_eq!(s["totals"]["checkpoints"], 1);
}

// ---------------------------------------------------------------- verify

#[test]
fn verify_a_clean_wal_exits_0() {
    let dir = temp_dir();
    build_standard(dir.path());
    let o = run_dir(&["verify"], dir.path());
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("verdict: clean"), "{}", stdout(&o));
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    let v = json(&run_dir(&["verify", "--json"], dir.path()));
    assert_eq!(v["status"], "clean");
    assert_eq!(v["records"], 2429);
    assert_eq!(v["problems"].as_array().unwrap().len(), 0);
}

#[test]
fn verify_a_torn_tail_exits_1_and_names_it() {
    let dir = temp_dir();
    build_standard(dir.path());
    let (path, offset, lsn) = tear_last_record(dir.path());
    let o = run_dir(&["verify"], dir.path());
    assert_eq!(code(&o), 1, "{}\n{}", stdout(&o), stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains(&format!("{}:{offset}", name_of(&path))),
        "{text}"
    );
    assert!(text.contains("torn tail only"), "{text}");
    let v = json(&run_dir(&["verify", "--json"], dir.path()));
    assert_eq!(v["status"], "torn");
    let p = &v["problems"][0];
    assert_eq!(p["severity"], "torn");
    assert_eq!(p["offset"], offset);
    assert_eq!(p["expected_lsn"], lsn);
    assert_eq!(p["what"], "record checksum");
    assert_ne!(p["expected"], p["found"]);
}

#[test]
fn verify_a_truncated_newest_segment_is_a_torn_tail() {
    let dir = temp_dir();
    build_standard(dir.path());
    let (path, offset, _, _) = layout(dir.path()).pop().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(offset + 30).unwrap();
    let v = json(&run_dir(&["verify", "--json"], dir.path()));
    assert_eq!(v["status"], "torn");
    assert_eq!(v["problems"][0]["offset"], offset);
    assert_eq!(
        v["problems"][0]["what"],
        "record size versus the end of the file"
    );
}

#[test]
fn verify_a_bit_flip_in_a_sealed_segment_exits_2_with_file_offset_expected_and_found() {
    let dir = temp_dir();
    build_standard(dir.path());
    let recs = layout(dir.path());
    let (path, offset, _, lsn) = recs[500].clone();
    assert_eq!(
        path,
        segment_files(dir.path())[0],
        "a record of the first, sealed segment"
    );
    flip_bit(&path, offset + 40);
    let o = run_dir(&["verify"], dir.path());
    assert_eq!(code(&o), 2);
    let text = stdout(&o);
    assert!(
        text.contains(&format!("BAD corrupt at {}:{offset}", path.display())),
        "{text}"
    );
    assert!(text.contains(&format!("expected LSN {lsn}")), "{text}");
    assert!(text.contains("record checksum: expected 0x"), "{text}");
    assert!(text.contains("found 0x"), "{text}");
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: WAL corrupt"), "{err}");
    let v = json(&run_dir(&["verify", "--json"], dir.path()));
    assert_eq!(v["status"], "corrupt");
    assert_eq!(v["exit_code"], 2);
    let p = &v["problems"][0];
    assert_eq!(p["severity"], "corrupt");
    assert_eq!(p["file"], path.display().to_string());
    assert_eq!(p["offset"], offset);
    assert_eq!(p["expected_lsn"], lsn);
    // The scan goes on after the damage: later segments are checked too (they are clean here).
    assert_eq!(v["problems"].as_array().unwrap().len(), 1);
    // Summary still describes the WAL, flags it and exits 2.
    let o = run_dir(&["summary"], dir.path());
    assert_eq!(code(&o), 2);
    assert!(
        stdout(&o).contains(&format!("tail: corrupt at {}:{offset}", name_of(&path))),
        "{}",
        stdout(&o)
    );
}

#[test]
fn verify_looks_past_damage_and_checks_every_record_of_the_segment() {
    let dir = temp_dir();
    build_standard(dir.path());
    let recs = layout(dir.path());
    let seg0 = segment_files(dir.path())[0].clone();
    let in_seg0 = recs.iter().filter(|r| r.0 == seg0).count();
    for i in [10, 20] {
        flip_bit(&recs[i].0, recs[i].1 + 26);
    }
    let o = run_dir(&["verify", "--json"], dir.path());
    assert_eq!(code(&o), 2);
    let v = json(&o);
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{v}");
    let first = &problems[0];
    assert_eq!(first["offset"], recs[10].1);
    assert_eq!(first["resumes_at"]["offset"], recs[11].1);
    assert_eq!(first["resumes_at"]["lsn"], recs[11].3);
    assert_eq!(
        first["resumes_at"]["lost_lsns"],
        serde_json::json!([recs[10].3, recs[10].3])
    );
    assert_eq!(first["resumes_at"]["valid_records"], 9);
    // The batch's commit marker (later in the segment) covers the lost entry: it is in the store.
    assert_eq!(first["resumes_at"]["lost_committed"], true);
    let second = &problems[1];
    assert_eq!(second["offset"], recs[20].1);
    assert_eq!(second["expected_lsn"], recs[20].3);
    assert!(
        second["what"].as_str().unwrap().contains("further damage"),
        "{second}"
    );
    assert_eq!(second["resumes_at"]["valid_records"], in_seg0 - 21);
    // Every record but the two damaged ones was verified.
    assert_eq!(v["records"], recs.len() - 2);
    let text = stdout(&run_dir(&["verify"], dir.path()));
    assert!(
        text.contains(&format!(
            "valid records resume at offset {} with LSN {}",
            recs[11].1, recs[11].3
        )),
        "{text}"
    );
}

#[test]
fn verify_says_when_a_lost_entry_was_never_committed() {
    let dir = temp_dir();
    let pending = build_standard(dir.path());
    let rec = layout(dir.path())
        .into_iter()
        .find(|r| r.3 == pending[2])
        .unwrap();
    flip_bit(&rec.0, rec.1 + 26);
    let v = json(&run_dir(&["verify", "--json"], dir.path()));
    let p = &v["problems"][0];
    assert_eq!(
        p["severity"], "corrupt",
        "a valid record follows: not a torn tail"
    );
    assert_eq!(
        p["resumes_at"]["lost_lsns"],
        serde_json::json!([pending[2], pending[2]])
    );
    assert_eq!(p["resumes_at"]["lost_committed"], false);
    let text = stdout(&run_dir(&["verify"], dir.path()));
    assert!(text.contains("may be missing from the store"), "{text}");
}

#[test]
fn verify_a_missing_middle_segment_is_an_lsn_gap() {
    let dir = temp_dir();
    build_standard(dir.path());
    let segs = segment_files(dir.path());
    let next = &segs[2];
    let gap_from: Lsn = name_of(&segs[1])[..20].parse().unwrap();
    let found: Lsn = name_of(next)[..20].parse().unwrap();
    std::fs::remove_file(&segs[1]).unwrap();
    let o = run_dir(&["verify"], dir.path());
    assert_eq!(code(&o), 2, "{}", stdout(&o));
    let v = json(&run_dir(&["verify", "--json"], dir.path()));
    let p = &v["problems"][0];
    assert_eq!(p["file"], next.display().to_string());
    assert_eq!(p["offset"], 0);
    assert_eq!(p["expected"], gap_from.to_string());
    assert_eq!(p["found"], found.to_string());
    assert!(p["reason"].as_str().unwrap().contains("LSN gap"), "{p}");
}

// ---------------------------------------------------------------- pending

#[test]
fn pending_lists_what_recovery_would_process() {
    let dir = temp_dir();
    let pending = build_standard(dir.path());
    let o = run_dir(&["pending"], dir.path());
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("5 pending entries"), "{text}");
    assert!(
        text.contains("trade 9004 BTC-USDT buyer 11 seller 12"),
        "{text}"
    );
    let v = json(&run_dir(&["pending", "--json"], dir.path()));
    let entries = v["entries"].as_array().unwrap();
    let lsns: Vec<u64> = entries.iter().map(|e| e["lsn"].as_u64().unwrap()).collect();
    assert_eq!(lsns, pending);
    assert_eq!(entries[0]["output_sequence"], 2401);
    assert_eq!(entries[4]["event"]["trade_id"], 9004);
}

#[test]
fn pending_on_a_torn_wal_warns_that_the_tail_will_be_cut() {
    let dir = temp_dir();
    let pending = build_standard(dir.path());
    tear_last_record(dir.path());
    let o = run_dir(&["pending", "--json"], dir.path());
    assert_eq!(code(&o), 0);
    let v = json(&o);
    // The torn (last) entry was never acknowledged: it is not pending.
    let lsns: Vec<u64> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["lsn"].as_u64().unwrap())
        .collect();
    assert_eq!(lsns, pending[..4]);
    assert_eq!(v["tail"]["state"], "torn");
    assert!(
        stderr(&o).starts_with("warning: torn tail"),
        "{}",
        stderr(&o)
    );
}

// ---------------------------------------------------------------- plan

#[test]
fn plan_classifies_each_pending_entry_against_an_embedded_store() {
    let dir = temp_dir();
    let store_dir = temp_dir();
    let store = store_dir.path().join("ledger.redb");
    let wal = Wal::open(dir.path(), small()).unwrap();
    let mut e = Entries::default();
    let entries = [
        e.trade(101, 10, 11, 100, 2), // applied
        e.trade(102, 20, 21, 100, 1), // partial: event row and two balances only
        e.trade(103, 30, 31, 100, 3), // missing
        e.deposit(40, "ETH", 5),      // diverged: the store holds another amount at this LSN
        e.trade(104, 50, 51, 10, 1),  // balances superseded by 105, trade row missing: partial
        e.trade(105, 50, 51, 10, 1),  // applied
    ];
    let payloads: Vec<Vec<u8>> = entries.iter().map(SettlementEntry::encode).collect();
    let (first, _) = wal.append_batch(&payloads).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let lsn = |i: usize| first + i as u64;
    let writes = |i: usize| entries[i].writes(lsn(i));
    let mut partial = writes(1);
    partial.balances.truncate(2);
    let mut diverged = writes(3);
    diverged.balances[0].amount = 999;
    let applied: Vec<EntryWrites> = vec![writes(0), partial, diverged, writes(5)];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ledger = EmbeddedLedger::open(&store).unwrap();
        ledger.apply(&applied).await.unwrap();
    });
    let store_arg = format!("embedded:{}", store.display());

    let o = run_dir(&["plan", "--store", &store_arg], dir.path());
    let text = stdout(&o);
    assert_eq!(
        code(&o),
        1,
        "divergence: recovery would stop\n{text}\n{}",
        stderr(&o)
    );
    assert!(
        text.contains("recovery would: stop: 1 diverged entry"),
        "{text}"
    );
    assert!(text.contains("writes recovery would send"), "{text}");

    let o = run_dir(&["plan", "--json", "--store", &store_arg], dir.path());
    let v = json(&o);
    let plans = v["entries"].as_array().unwrap();
    let classes: Vec<&str> = plans.iter().map(|p| p["class"].as_str().unwrap()).collect();
    assert_eq!(
        classes,
        ["applied", "partial", "missing", "diverged", "partial", "applied"]
    );
    let row_classes = |i: usize| -> Vec<String> {
        plans[i]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["class"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        row_classes(1),
        ["applied", "applied", "applied", "missing", "missing"]
    );
    assert_eq!(row_classes(2), ["missing"; 5]);
    assert_eq!(row_classes(3), ["applied", "diverged"]);
    assert_eq!(
        row_classes(4),
        [
            "missing",
            "superseded",
            "superseded",
            "superseded",
            "superseded"
        ]
    );
    assert_eq!(plans[3]["rows"][1]["found"]["amount"], 999);
    assert_eq!(plans[3]["rows"][1]["expected"]["amount"], 5);
    // The writes recovery would send: only the missing rows.
    assert_eq!(
        plans[0]["resend"][0]["balances"].as_array().unwrap().len(),
        0
    );
    assert_eq!(
        plans[1]["resend"][0]["balances"].as_array().unwrap().len(),
        2
    );
    assert!(plans[1]["resend"][0]["event"].is_null());
    assert_eq!(
        plans[2]["resend"][0]["balances"].as_array().unwrap().len(),
        4
    );
    assert!(plans[2]["resend"][0]["event"].is_object());
    assert_eq!(v["totals"]["superseded_rows"], 4);
    assert_eq!(v["totals"]["resend_rows"], 2 + 5 + 1);

    // Read-only: planning again gives the same answer (nothing was sent).
    let again = json(&run_dir(
        &["plan", "--json", "--store", &store_arg],
        dir.path(),
    ));
    assert_eq!(again["entries"], v["entries"]);
}

#[test]
fn plan_with_everything_applied_says_proceed_and_exits_0() {
    let dir = temp_dir();
    let store_dir = temp_dir();
    let store = store_dir.path().join("ledger.redb");
    let wal = Wal::open(dir.path(), small()).unwrap();
    let mut e = Entries::default();
    let entry = e.trade(7, 1, 2, 10, 1);
    let lsn = wal.append(&entry.encode()).unwrap();
    wal.sync().unwrap();
    drop(wal);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let ledger = EmbeddedLedger::open(&store).unwrap();
        ledger.apply(&[entry.writes(lsn)]).await.unwrap();
    });
    let o = run_dir(
        &["plan", "--store", &format!("embedded:{}", store.display())],
        dir.path(),
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("recovery would: proceed: re-send 0 row write(s)"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn plan_refuses_a_missing_or_locked_embedded_store_clearly() {
    let dir = temp_dir();
    build_standard(dir.path());
    let store_dir = temp_dir();
    let missing = store_dir.path().join("nope.redb");
    let o = run_dir(
        &[
            "plan",
            "--store",
            &format!("embedded:{}", missing.display()),
        ],
        dir.path(),
    );
    assert_one_line_error(&o, "no embedded store");
    assert!(!missing.exists(), "plan never creates a store");

    let store = store_dir.path().join("ledger.redb");
    let held = EmbeddedLedger::open(&store).unwrap();
    let o = run_dir(
        &["plan", "--store", &format!("embedded:{}", store.display())],
        dir.path(),
    );
    assert_one_line_error(&o, "is locked");
    assert!(stderr(&o).contains("running settlement"), "{}", stderr(&o));
    drop(held);
}

// ---------------------------------------------------------------- repair

#[test]
fn repair_backs_up_then_cuts_a_torn_tail() {
    let dir = temp_dir();
    let pending = build_standard(dir.path());
    let (path, offset, torn_lsn) = tear_last_record(dir.path());
    let before = std::fs::read(&path).unwrap();

    // Without the flag: explains, changes nothing, exits 1.
    let o = run_dir(&["repair"], dir.path());
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stdout(&o).contains("would"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains(&format!("{}:{offset}", name_of(&path))),
        "{}",
        stdout(&o)
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert!(!files_of(dir.path()).iter().any(|f| f.contains(".bak-")));

    let o = run_dir(&["repair", "--truncate-torn-tail", "--json"], dir.path());
    assert_eq!(code(&o), 0, "{}\n{}", stdout(&o), stderr(&o));
    let v = json(&o);
    assert_eq!(v["action"], "cut");
    assert_eq!(v["offset"], offset);
    assert_eq!(v["after"], "clean");
    let backup = PathBuf::from(v["backup"].as_str().unwrap());
    assert!(
        name_of(&backup).starts_with(&format!("{}.bak-", name_of(&path))),
        "{backup:?}"
    );
    assert_eq!(
        std::fs::read(&backup).unwrap(),
        before,
        "the backup is the segment as it was"
    );

    // Clean now; the torn entry (never acknowledged) is gone, the others are still pending.
    assert_eq!(code(&run_dir(&["verify"], dir.path())), 0);
    let v = json(&run_dir(&["pending", "--json"], dir.path()));
    let lsns: Vec<u64> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["lsn"].as_u64().unwrap())
        .collect();
    assert_eq!(lsns, pending[..4]);
    assert!(!lsns.contains(&torn_lsn));
    // A second repair has nothing to do.
    let o = run_dir(&["repair", "--truncate-torn-tail"], dir.path());
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("nothing to repair"), "{}", stdout(&o));
}

#[test]
fn repair_refuses_corruption_and_touches_nothing() {
    let dir = temp_dir();
    build_standard(dir.path());
    let recs = layout(dir.path());
    flip_bit(&recs[10].0, recs[10].1 + 28);
    let before = snapshot(dir.path());
    let names = files_of(dir.path());
    let o = run_dir(&["repair", "--truncate-torn-tail"], dir.path());
    assert_eq!(code(&o), 2);
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: refusing to repair: corruption at"),
        "{err}"
    );
    assert_eq!(snapshot(dir.path()), before);
    assert_eq!(
        files_of(dir.path()),
        names,
        "no backup, no lock file, nothing"
    );
    let v = json(&run_dir(&["repair", "--json"], dir.path()));
    assert_eq!(v["action"], "refused");
}

#[test]
fn repair_of_a_clean_wal_has_nothing_to_do() {
    let dir = temp_dir();
    build_standard(dir.path());
    let before = snapshot(dir.path());
    for args in [&["repair"][..], &["repair", "--truncate-torn-tail"][..]] {
        let o = run_dir(args, dir.path());
        assert_eq!(code(&o), 0);
        assert!(stdout(&o).contains("nothing to repair"), "{}", stdout(&o));
    }
    assert_eq!(snapshot(dir.path()), before);
}

// ---------------------------------------------------------------- live and copied WALs

#[test]
fn a_running_writer_is_reported_and_never_blocked_or_repaired() {
    let dir = temp_dir();
    build_standard(dir.path());
    let wal = Wal::open(dir.path(), small()).unwrap();
    let mut e = Entries::default();
    wal.append(&e.deposit(99, "BTC", 1).encode()).unwrap();
    wal.sync().unwrap();
    let before = snapshot(dir.path());
    let o = run_dir(&["summary", "--json"], dir.path());
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["writer"]["running"], true);
    assert_eq!(v["writer"]["pid"], std::process::id());
    assert_eq!(v["totals"]["pending"], 6);
    assert_eq!(code(&run_dir(&["verify"], dir.path())), 0);
    let o = run_dir(&["repair", "--truncate-torn-tail"], dir.path());
    assert_one_line_error(&o, "holds its writer lock");
    assert_eq!(snapshot(dir.path()), before);
    // The writer was never disturbed: it still appends and syncs.
    wal.append(&e.deposit(99, "BTC", 1).encode()).unwrap();
    wal.sync().unwrap();
}

#[test]
fn a_copied_wal_directory_inspects_the_same() {
    let dir = temp_dir();
    build_standard(dir.path());
    let copy = temp_dir();
    common::copy_wal(dir.path(), copy.path());
    let a = json(&run_dir(&["summary", "--json"], dir.path()));
    let b = json(&run_dir(&["summary", "--json"], copy.path()));
    assert_eq!(a["totals"], b["totals"]);
    assert!(
        !copy.path().join("LOCK").exists(),
        "read-only commands create nothing"
    );
}

// ---------------------------------------------------------------- bad input

#[test]
fn bad_inputs_are_one_line_errors_with_exit_2() {
    let tmp = temp_dir();
    let missing = tmp.path().join("missing");
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"hello").unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), b"x").unwrap();
    let cases: [(&Path, &str); 4] = [
        (&missing, "no such file or directory"),
        (&file, "is a file, not a WAL directory"),
        (&empty, "is empty"),
        (&foreign, "is not a WAL directory"),
    ];
    for (path, mentions) in cases {
        for cmd in ["summary", "dump", "verify", "pending", "repair"] {
            assert_one_line_error(&run_dir(&[cmd], path), mentions);
        }
        assert_one_line_error(
            &run_dir(&["plan", "--store", "embedded:/nonexistent/x.redb"], path),
            mentions,
        );
    }
}

#[test]
fn a_future_format_version_is_refused_by_every_command() {
    let dir = temp_dir();
    build_standard(dir.path());
    let seg = segment_files(dir.path()).pop().unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    let mut head = [0u8; 64];
    f.read_exact_at(&mut head, 0).unwrap();
    head[8..12].copy_from_slice(&3u32.to_le_bytes());
    let crc = crc32fast::hash(&head[..60]);
    head[60..64].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&head, 0).unwrap();
    for cmd in ["summary", "dump", "verify", "pending", "repair"] {
        assert_one_line_error(
            &run_dir(&[cmd], dir.path()),
            "format version 3 is not supported",
        );
    }
}

#[test]
fn a_truncated_header_is_a_one_line_error() {
    let dir = temp_dir();
    let wal = Wal::open(dir.path(), small()).unwrap();
    wal.append(&Entries::default().deposit(1, "BTC", 1).encode())
        .unwrap();
    wal.sync().unwrap();
    drop(wal);
    let seg = segment_files(dir.path()).pop().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(30)
        .unwrap();
    for cmd in ["summary", "dump", "verify", "pending", "repair"] {
        assert_one_line_error(
            &run_dir(&[cmd], dir.path()),
            "segment header truncated: 30 of 64 bytes",
        );
    }
}

#[test]
fn a_damaged_header_among_good_segments_is_corruption_that_verify_names() {
    let dir = temp_dir();
    build_standard(dir.path());
    let segs = segment_files(dir.path());
    flip_bit(&segs[1], 25); // inside the salt: the header checksum no longer matches
    let o = run_dir(&["verify", "--json"], dir.path());
    assert_eq!(code(&o), 2);
    let v = json(&o);
    let p = &v["problems"][0];
    assert_eq!(p["file"], segs[1].display().to_string());
    assert_eq!(p["offset"], 0);
    assert_eq!(p["what"], "segment header checksum");
    assert_ne!(p["expected"], p["found"]);
}

// ---------------------------------------------------------------- measurement (not a test)

/// Builds a WAL of about 1 GiB of real settlement entries in `$WAL_INSPECT_BENCH_DIR` (64 MiB
/// segments), for timing `wal-inspect verify` by hand (see docs/debugging-a-recovery.md):
///
/// ```sh
/// WAL_INSPECT_BENCH_DIR=/var/tmp/wal-1g cargo test --release --test wal_inspect_cli -- --ignored build_a_1_gib_wal
/// cargo build --release --bin wal-inspect && time target/release/wal-inspect verify /var/tmp/wal-1g
/// ```
#[test]
#[ignore = "builds a 1 GiB WAL for a manual measurement"]
fn build_a_1_gib_wal() {
    let dir =
        PathBuf::from(std::env::var("WAL_INSPECT_BENCH_DIR").expect("set WAL_INSPECT_BENCH_DIR"));
    let _ = std::fs::remove_dir_all(&dir);
    let wal = Wal::open(&dir, WalOptions::default()).unwrap();
    let mut e = Entries::default();
    let mut written = 0u64;
    let mut i = 0u64;
    while written < 1 << 30 {
        let batch: Vec<Vec<u8>> = (0..1000)
            .map(|_| {
                i += 1;
                e.trade(
                    i,
                    1 + i % 1000,
                    1 + (i * 7) % 1000,
                    100 + (i % 1000) as i64,
                    1 + (i % 10) as i64,
                )
                .encode()
            })
            .collect();
        written += batch
            .iter()
            .map(|p| ((24 + p.len()).div_ceil(8) * 8) as u64)
            .sum::<u64>();
        let (first, last) = wal.append_batch(&batch).unwrap();
        wal.sync().unwrap();
        wal.commit_range(first, last).unwrap();
    }
    wal.sync().unwrap();
    println!(
        "{} entries, {written} bytes of records in {}",
        i,
        dir.display()
    );
}
