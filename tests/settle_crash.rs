//! Crash test with real processes (P3): the `settlement` binary runs over 100,000 events on the
//! embedded store and is SIGKILLed at random moments 30 times, restarted over the same input each
//! time, then allowed to finish. Every trade must be in the store exactly once, every balance must
//! equal an independent recomputation from the input, and `settlement audit` must pass.
//! `SETTLE_CRASH_KILLS` / `SETTLE_CRASH_TRADES` / `SETTLE_CRASH_SEED` tune or replay it.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_store_matches_model, model, Rng};
use settlement_wal::settle::demo::{generate, DemoSpec};

fn settlement() -> Command {
    Command::new(env!("CARGO_BIN_EXE_settlement"))
}

fn run_args(dir: &Path, input: &Path) -> Vec<String> {
    vec![
        "run".into(),
        "--input".into(),
        input.display().to_string(),
        "--wal-dir".into(),
        dir.join("wal").display().to_string(),
        "--store".into(),
        format!("embedded:{}", dir.join("ledger.redb").display()),
        "--rejects".into(),
        dir.join("rejects.jsonl").display().to_string(),
        "--segment-mib".into(),
        "1".into(),
        "--no-progress".into(),
    ]
}

#[test]
fn sigkill_at_random_moments_then_finish_settles_everything_exactly_once() {
    let kills: u64 = std::env::var("SETTLE_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let trades: u64 = std::env::var("SETTLE_CRASH_TRADES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(97_000);
    let seed = Rng::seed_from_env("SETTLE_CRASH_SEED");
    eprintln!("settlement crash test seed {seed} (replay with SETTLE_CRASH_SEED={seed})");
    let mut rng = Rng::new(seed);
    let lines = generate(&DemoSpec {
        seed,
        users: 300,
        trades,
        withdraw_every: 40,
        malformed_every: 2000,
    });
    assert!(
        lines.len() >= 100_000,
        "at least 100,000 events: {}",
        lines.len()
    );
    let dir = common::temp_dir();
    let input = dir.path().join("input.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let args = run_args(dir.path(), &input);

    // Kill moments scale with how long one whole run takes with this build (debug or
    // release): up to 4x the mean share of the work per kill, so the kills spread over the
    // whole input instead of the first run draining it (a fixed bound fit one build only).
    let scratch = common::temp_dir();
    let timed = Instant::now();
    let out = settlement()
        .args(run_args(scratch.path(), &input))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "timing run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let full_run_ms = timed.elapsed().as_millis() as u64;
    drop(scratch);
    let kill_max_ms = (4 * full_run_ms / kills.max(1)).max(100);
    eprintln!("one whole run takes {full_run_ms} ms; kills at 30..{kill_max_ms} ms after start");

    let mut killed = 0;
    let mut finished_early = 0;
    let mut recoveries = 0;
    for round in 0..kills {
        let mut child = settlement()
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Kill at a random moment: during start-up/recovery, mid-stream, near the end.
        std::thread::sleep(Duration::from_millis(rng.range(30, kill_max_ms)));
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        if stderr.contains("recovery:") {
            recoveries += 1;
        }
        if status.success() {
            finished_early += 1; // it drained the whole input before the kill
        } else {
            killed += 1;
        }
        let _ = round;
    }
    // Let it finish.
    let out = settlement().args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "final run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let want = model(&lines);
    let store = format!("embedded:{}", dir.path().join("ledger.redb").display());
    // Shown when the comparison below fails: what was refused, by reason.
    let rejects = std::fs::read_to_string(dir.path().join("rejects.jsonl")).unwrap_or_default();
    let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
    for line in rejects.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let reason: String = v["reason"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(50)
            .collect();
        *reasons.entry(reason).or_default() += 1;
    }
    println!(
        "rejects by reason (the model rejects {}): {reasons:#?}",
        want.rejected
    );
    let out = settlement()
        .args(["audit", "--store", &store])
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    let balances = assert_store_matches_model(&store, &want, &format!("seed {seed}"));
    eprintln!(
        "{killed} SIGKILLs ({finished_early} runs finished before their kill), {} trades and {} balances verified",
        want.trades.len(),
        balances
    );
    assert!(
        killed >= kills / 2,
        "most runs were really killed mid-way: {killed} of {kills}"
    );
    eprintln!("{recoveries} restarts found pending entries and recovered them");
    assert!(
        recoveries > 0,
        "some kills left pending entries for recovery"
    );
}
