//! Kills a real child process with SIGKILL while it appends, syncs, commits and checkpoints, many
//! times over the same WAL directory; after each kill every LSN the child reported as synced (and
//! not as committed) must be pending after reopen, with its exact payload (promise P1's base).

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use settlement_wal::wal::{Wal, WalOptions};

const CHILD_ENV: &str = "WAL_CRASH_CHILD_DIR";

fn payload_for(lsn: u64) -> Vec<u8> {
    payload(lsn.wrapping_mul(7919))
}

/// The child: an endless loop of batches. Runs only when re-executed by the parent test.
#[test]
#[ignore = "runs only as the child process of crash_test_sigkill_many_times"]
fn crash_child_writer() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let seed: u64 = std::env::var("WAL_CRASH_CHILD_SEED")
        .unwrap()
        .parse()
        .unwrap();
    let mut rng = Rng::new(seed);
    let wal = Wal::open(
        dir.as_ref(),
        WalOptions::default().segment_size_bytes(SMALL_SEGMENT_BYTES),
    )
    .unwrap();
    // Settle what earlier runs left pending, as an application would after recovery.
    let pending = wal.pending().unwrap();
    if let (Some(first), Some(last)) = (pending.first(), pending.last()) {
        if rng.range(0, 2) == 0 {
            // Announced before the marker is written: a kill right after writing it still
            // leaves the marker in the page cache, so the parent must not expect these pending.
            println!("COMMITTING {} {}", first.lsn, last.lsn);
            wal.commit_range(first.lsn, last.lsn).unwrap();
        }
    }
    loop {
        let n = rng.range(1, 64);
        let start = wal.last_lsn() + 1;
        let payloads: Vec<Vec<u8>> = (start..start + n).map(payload_for).collect();
        let (first, last) = wal.append_batch(&payloads).unwrap();
        assert_eq!((first, last), (start, start + n - 1));
        wal.sync().unwrap();
        println!("SYNCED {first} {last}");
        if rng.range(0, 3) > 0 {
            println!("COMMITTING {first} {last}");
            wal.commit_range(first, last).unwrap();
        }
        if rng.range(0, 20) == 0 {
            wal.checkpoint().unwrap();
        }
    }
}

#[test]
fn crash_test_sigkill_many_times() {
    let kills: u64 = std::env::var("WAL_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let seed = Rng::seed_from_env("WAL_CRASH_SEED");
    eprintln!("crash test seed {seed} (replay with WAL_CRASH_SEED={seed})");
    let mut rng = Rng::new(seed);
    let dir = temp_dir();
    let exe = std::env::current_exe().unwrap();
    let mut synced: BTreeSet<u64> = BTreeSet::new();
    let mut committed: BTreeSet<u64> = BTreeSet::new();
    let mut total_lines = 0;
    for round in 0..kills {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child_writer",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .env("WAL_CRASH_CHILD_SEED", (seed ^ (round + 1)).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.range(20, 150)));
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "round {round}: the child must die by the signal"
        );
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            // libtest prints "test crash_child_writer ... " without a newline before the child's
            // first line, so look for the report anywhere in the line.
            let Some(at) = line.find("SYNCED ").or_else(|| line.find("COMMITTING ")) else {
                continue;
            };
            let mut parts = line[at..].split_whitespace();
            let (Some(kind), Some(a), Some(b)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) else {
                continue;
            };
            match kind {
                "SYNCED" => synced.extend(a..=b),
                "COMMITTING" => committed.extend(a..=b),
                _ => continue,
            }
            total_lines += 1;
        }
        // Reopen in the parent and check.
        let wal = Wal::open(dir.path(), small_options())
            .unwrap_or_else(|e| panic!("round {round} (seed {seed}): reopen failed: {e}"));
        let pending = wal.pending().unwrap();
        let pending_lsns: BTreeSet<u64> = pending.iter().map(|e| e.lsn).collect();
        for e in &pending {
            assert_eq!(
                e.payload,
                payload_for(e.lsn),
                "round {round} seed {seed}: LSN {} payload",
                e.lsn
            );
        }
        for lsn in synced.difference(&committed) {
            assert!(
                pending_lsns.contains(lsn),
                "round {round} seed {seed}: synced, uncommitted LSN {lsn} is missing after SIGKILL"
            );
        }
        if let Some(max) = synced.iter().next_back() {
            assert!(
                wal.last_lsn() >= *max,
                "round {round} seed {seed}: LSNs went backwards"
            );
        }
    }
    assert!(
        synced.len() > 1000,
        "the children made real progress: {} synced",
        synced.len()
    );
    eprintln!(
        "{kills} kills, {} synced entries checked, {total_lines} reports",
        synced.len()
    );
}
