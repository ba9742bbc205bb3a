//! Power loss on the real kernel for the whole process (P10, with P1/P3/P7/P9 checked at the
//! end): the `settlement` binary runs with its WAL and its embedded store (redb) on an ext4 file
//! system on a loop device whose backing file is written with direct I/O
//! (`losetup --direct-io=on`), so that file holds exactly what reached the "disk", never what
//! only sits in the page cache of the loop file system.
//!
//! At random moments the test either SIGKILLs the process (the page cache survives; restart on
//! the same mount) or cuts the power: SIGSTOP the settlement process itself, wait until every
//! thread in /proc/PID/task is stopped, copy the backing file (`cp --sparse=always`: the copy is
//! what a power cut at that moment would have left), SIGKILL, unmount and detach the old loop
//! device, `e2fsck -f -p` the copy, attach and mount the copy, and restart settlement there over
//! the same input. The input (the matching engine's journal) lives outside the loop file system:
//! in reality it is the engine's and survives the cut. The last run must finish (exit 0); then
//! every trade is settled once, every balance equals an independent model and `audit` passes.
//!
//! A start that fails is a failure, shown with its stderr, never retried: after a power cut the
//! store (fsynced on every commit) must never be ahead of what the WAL kept, and a cut must
//! never read as WAL corruption.
//!
//! Skips (passes, with the reason printed) when not root, when the loop device or the mount does
//! not work here, or when a tool is missing (util-linux `losetup`/`mount`/`umount`, e2fsprogs
//! `mkfs.ext4`/`e2fsck`, coreutils `cp`); with `CI` set a missing tool fails instead.
//! `POWER_LOSS_KERNEL_SEED` replays a run; `POWER_LOSS_KERNEL_CUTS` (default 8),
//! `POWER_LOSS_KERNEL_KILLS` (default 6) and `POWER_LOSS_KERNEL_TRADES` (default 50,000) tune it;
//! `POWER_LOSS_KERNEL_KEEP=1` keeps the cut images and the logs of every run for a post-mortem.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{assert_store_matches_model, logged_settings, model, Rng};
use settlement_wal::settle::demo::{generate, DemoSpec};

/// Size of the (sparse) ext4 image.
const IMAGE_MIB: u64 = 192;
/// Longest wait for every thread of a SIGSTOPped process to be stopped.
const STOP_WAIT: Duration = Duration::from_secs(20);
/// Longest wait for a restarted process to get through start-up (identity check, recovery).
const START_WAIT: Duration = Duration::from_secs(120);
/// Longest wait for the final run to drain the input.
const FINISH_WAIT: Duration = Duration::from_secs(300);

fn env_u64(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The external programs the test drives, by absolute path.
struct Tools {
    losetup: PathBuf,
    mkfs: PathBuf,
    mount: PathBuf,
    umount: PathBuf,
    e2fsck: PathBuf,
    cp: PathBuf,
}

/// `name` on `$PATH`, or in the sbin directories a non-login root shell may lack.
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

impl Tools {
    /// Every tool, or the names of the missing ones.
    fn find() -> Result<Tools, Vec<&'static str>> {
        let names = ["losetup", "mkfs.ext4", "mount", "umount", "e2fsck", "cp"];
        let found: Vec<Option<PathBuf>> = names.iter().map(|n| find_tool(n)).collect();
        let missing: Vec<&'static str> = names
            .iter()
            .zip(&found)
            .filter(|(_, p)| p.is_none())
            .map(|(n, _)| *n)
            .collect();
        if !missing.is_empty() {
            return Err(missing);
        }
        let mut it = found.into_iter().map(Option::unwrap);
        let mut next = || it.next().unwrap();
        Ok(Tools {
            losetup: next(),
            mkfs: next(),
            mount: next(),
            umount: next(),
            e2fsck: next(),
            cp: next(),
        })
    }
}

/// Runs `program args`, returning its status and its stdout + stderr as text.
fn run_tool(program: &Path, args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text.trim().to_string())
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// An image attached to a loop device (direct I/O) and mounted; unmounted and detached on drop
/// (also on panic).
struct Mounted<'t> {
    tools: &'t Tools,
    device: Option<String>,
    mnt: PathBuf,
    mounted: bool,
}

impl<'t> Mounted<'t> {
    /// Attaches `image` with `losetup --direct-io=on --find --show` and mounts it on `mnt`.
    fn attach(tools: &'t Tools, image: &Path, mnt: &Path) -> Result<Mounted<'t>, String> {
        let (status, out) = run_tool(
            &tools.losetup,
            &["--direct-io=on", "--find", "--show", p(image)],
        );
        if !status.success() {
            return Err(format!("losetup --direct-io=on failed ({status}): {out}"));
        }
        let device = out.lines().last().unwrap_or("").trim().to_string();
        let mut m = Mounted {
            tools,
            device: Some(device.clone()),
            mnt: mnt.to_path_buf(),
            mounted: false,
        };
        // The backing file must really be written with direct I/O, or the copy would miss what
        // the loop driver still holds in the host page cache.
        let dio = std::fs::read_to_string(format!(
            "/sys/block/{}/loop/dio",
            device.trim_start_matches("/dev/")
        ))
        .unwrap_or_default();
        if dio.trim() != "1" {
            return Err(format!(
                "{device} does not use direct I/O (/sys/block/.../loop/dio = {:?})",
                dio.trim()
            ));
        }
        std::fs::create_dir_all(mnt).unwrap();
        let (status, out) = run_tool(&tools.mount, &["-t", "ext4", &device, p(mnt)]);
        if !status.success() {
            return Err(format!(
                "mount {device} {} failed ({status}): {out}",
                p(mnt)
            ));
        }
        m.mounted = true;
        Ok(m)
    }

    /// Unmounts (lazily when busy) and detaches. Idempotent.
    fn detach(&mut self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.mounted {
            let (status, out) = run_tool(&self.tools.umount, &[p(&self.mnt)]);
            if !status.success() {
                let (lazy, lazy_out) = run_tool(&self.tools.umount, &["-l", p(&self.mnt)]);
                if !lazy.success() {
                    problems.push(format!("umount: {out}; umount -l: {lazy_out}"));
                }
            }
            self.mounted = false;
        }
        if let Some(device) = self.device.take() {
            let (status, out) = run_tool(&self.tools.losetup, &["-d", &device]);
            if !status.success() {
                problems.push(format!("losetup -d {device}: {out}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            eprintln!("power_loss_kernel cleanup: {e}");
        }
    }
}

/// The running settlement process, SIGKILLed on drop (also on panic, before the mount goes).
/// Once reaped it is never signalled again (its pid may belong to another process by then).
struct Running {
    child: Child,
    exit: Option<ExitStatus>,
    stderr: PathBuf,
    started: Instant,
}

impl Running {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        if self.exit.is_none() {
            // SAFETY: kill(2) of our own child, not reaped yet (the pid is still its).
            unsafe { libc::kill(self.pid(), sig) };
        }
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().unwrap();
        }
        self.exit
    }

    fn wait(&mut self) -> ExitStatus {
        if self.exit.is_none() {
            self.exit = Some(self.child.wait().unwrap());
        }
        self.exit.unwrap()
    }

    fn kill_and_wait(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            self.kill_and_wait();
        }
    }
}

/// The scheduler state of every thread of `pid` (`/proc/PID/task/*/stat`), or `None` once the
/// process is gone.
fn thread_states(pid: i32) -> Option<Vec<(String, char)>> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut states = Vec::new();
    for task in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue; // the thread exited meanwhile
        };
        // "tid (comm) S ...": comm may hold spaces and parentheses, the state follows the last ')'.
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].trim_start().chars().next())
            .unwrap_or('?');
        states.push((task.file_name().to_string_lossy().into_owned(), state));
    }
    Some(states)
}

/// Waits until every thread of the SIGSTOPped `pid` is in state T. `Ok(false)` when the process
/// exited (or is a zombie) instead.
fn wait_all_stopped(pid: i32) -> Result<bool, String> {
    let deadline = Instant::now() + STOP_WAIT;
    loop {
        let Some(states) = thread_states(pid) else {
            return Ok(false);
        };
        if states.iter().any(|(_, s)| *s == 'Z' || *s == 'X') && states.len() <= 1 {
            return Ok(false);
        }
        if !states.is_empty() && states.iter().all(|(_, s)| *s == 'T') {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not every thread of {pid} stopped within {STOP_WAIT:?}: {states:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn run_args(mnt: &Path, input: &Path) -> Vec<String> {
    vec![
        "run".into(),
        "--input".into(),
        input.display().to_string(),
        "--wal-dir".into(),
        mnt.join("wal").display().to_string(),
        "--store".into(),
        format!("embedded:{}", mnt.join("ledger.redb").display()),
        "--rejects".into(),
        mnt.join("rejects.jsonl").display().to_string(),
        "--segment-mib".into(),
        "1".into(),
        "--no-progress".into(),
        "--log-format".into(),
        "json".into(),
    ]
}

fn spawn_settlement(args: &[String], logs: &Path, name: &str) -> Running {
    let stderr = logs.join(format!("{name}.stderr"));
    let child = Command::new(env!("CARGO_BIN_EXE_settlement"))
        .args(args)
        .env("RUST_LOG", "info") // the "settling" event marks the end of start-up
        .stdin(Stdio::null())
        .stdout(File::create(logs.join(format!("{name}.stdout"))).unwrap())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    Running {
        child,
        exit: None,
        stderr,
        started: Instant::now(),
    }
}

/// `wal-inspect verify` of the WAL directory: its exit code (0 clean, 1 torn tail only,
/// 2 corruption) and its output. A WAL directory with no segment yet (a cut before the first segment was made durable) is
/// `Some(0)`: there is nothing to verify, and settlement starts a new WAL (refusing if the store
/// was bound to the lost one).
fn verify_wal(wal: &Path) -> (Option<i32>, String) {
    if !wal.is_dir() || common::segment_files(wal).is_empty() {
        return (Some(0), format!("{}: no WAL segment yet", wal.display()));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_wal-inspect"))
        .args(["verify", p(wal)])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text.trim().to_string())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Kill,
    Cut,
    /// The last run, let finish.
    Finish,
}

#[test]
fn power_cuts_and_sigkills_on_a_real_ext4_settle_everything_exactly_once() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipping power_loss_kernel: not root (losetup and mount need root)");
        return;
    }
    let tools = match Tools::find() {
        Ok(t) => t,
        Err(missing) => {
            let msg = format!(
                "missing {} (Debian: apt-get install util-linux mount e2fsprogs coreutils)",
                missing.join(", ")
            );
            assert!(!ci(), "power_loss_kernel under CI: {msg}");
            println!("skipping power_loss_kernel: {msg}");
            return;
        }
    };
    let cuts = env_u64("POWER_LOSS_KERNEL_CUTS", 8);
    let kills = env_u64("POWER_LOSS_KERNEL_KILLS", 6);
    let trades = env_u64("POWER_LOSS_KERNEL_TRADES", 50_000);
    let seed = Rng::seed_from_env("POWER_LOSS_KERNEL_SEED");
    println!("power_loss_kernel seed {seed} (replay with POWER_LOSS_KERNEL_SEED={seed})");
    let mut rng = Rng::new(seed);
    let t0 = Instant::now();

    // Everything that survives a power cut (the input, the logs, the images) lives on the work
    // disk, outside the loop file system. POWER_LOSS_KERNEL_KEEP keeps it for a post-mortem.
    let (root, _temp) = {
        let dir = common::temp_dir();
        if std::env::var_os("POWER_LOSS_KERNEL_KEEP").is_some() {
            let root = dir.keep();
            println!("keeping {} (POWER_LOSS_KERNEL_KEEP)", root.display());
            (root, None)
        } else {
            (dir.path().to_path_buf(), Some(dir))
        }
    };
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let lines = generate(&DemoSpec {
        seed,
        users: 200,
        trades,
        withdraw_every: 40,
        malformed_every: 2000,
    });
    let input = root.join("input.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();

    let image = |n: u64| root.join(format!("disk-{n}.img"));
    let mnt = root.join("mnt");
    {
        let f = File::create(image(0)).unwrap();
        f.set_len(IMAGE_MIB << 20).unwrap();
    }
    let (status, out) = run_tool(&tools.mkfs, &["-q", "-F", p(&image(0))]);
    assert!(status.success(), "mkfs.ext4 failed ({status}): {out}");
    let mut disk = match Mounted::attach(&tools, &image(0), &mnt) {
        Ok(m) => m,
        Err(e) => {
            println!("skipping power_loss_kernel: cannot mount a loop device here: {e}");
            return;
        }
    };
    let args = run_args(&mnt, &input);

    // Interruption moments scale with how long one whole run takes on this file system with
    // this build, so they spread over the whole input instead of the first run draining it.
    let calib = mnt.join("calibration");
    let calib_args = run_args(&calib, &input);
    std::fs::create_dir_all(&calib).unwrap();
    let mut timing = spawn_settlement(&calib_args, &logs, "calibration");
    let status = loop {
        if let Some(s) = timing.try_wait() {
            break s;
        }
        assert!(
            timing.started.elapsed() < FINISH_WAIT,
            "calibration run did not finish"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        status.success(),
        "calibration run failed ({status}): {}",
        timing.stderr_text()
    );
    let full_run_ms = timing.started.elapsed().as_millis() as u64;
    drop(timing);
    std::fs::remove_dir_all(&calib).unwrap();
    let rounds = cuts + kills;
    let max_ms = (3 * full_run_ms / rounds.max(1)).max(100);
    println!(
        "{} events; one whole run takes {full_run_ms} ms here; interruptions at 20..{max_ms} ms",
        lines.len()
    );

    let mut actions: Vec<Action> = (0..rounds)
        .map(|i| if i < cuts { Action::Cut } else { Action::Kill })
        .collect();
    for i in (1..actions.len()).rev() {
        let j = rng.range(0, i as u64 + 1) as usize;
        actions.swap(i, j);
    }
    actions.push(Action::Finish);

    // Which image is mounted (disk-N.img).
    let mut generation = 0u64;
    // Set between a power cut and the next start: `wal-inspect verify` of the cut WAL.
    let mut after_cut: Option<(Option<i32>, String)> = None;
    let mut hit_running = 0u64;
    let mut finished_early = 0u64;
    let mut torn_after_cut = 0u64;
    let mut cut_ms = Vec::new();
    for (round, action) in actions.iter().enumerate() {
        let name = if *action == Action::Finish {
            "final".to_string()
        } else {
            format!("run-{round:02}")
        };
        let mut run = spawn_settlement(&args, &logs, &name);
        let context = |run: &Running, what: &str| {
            let cut = match &after_cut {
                Some((code, out)) => format!(
                    ", the first start after a power cut; before it, wal-inspect verify of the \
                     cut WAL exited {code:?}:\n{out}\n"
                ),
                None => String::new(),
            };
            format!(
                "seed {seed}, round {round} ({what}){cut}\nstderr of {name}:\n{}\n(logs in {}; \
                 POWER_LOSS_KERNEL_KEEP=1 keeps them)",
                run.stderr_text(),
                logs.display()
            )
        };
        // A start after a power cut is always let through start-up: a refusal there (a store
        // ahead of the WAL, a WAL reading as corrupt) is exactly what this test looks for.
        if let Some((verify_code, _)) = &after_cut {
            loop {
                if let Some(status) = run.try_wait() {
                    assert!(
                        status.success(),
                        "settlement refused to start after a power cut ({status}); {}",
                        context(&run, "start-up")
                    );
                    break;
                }
                if logged_settings(&run.stderr_text()).is_some() {
                    break;
                }
                assert!(
                    run.started.elapsed() < START_WAIT,
                    "start-up took over {START_WAIT:?}; {}",
                    context(&run, "start-up")
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            // It started: then the cut WAL must not have read as corrupt either (P5, P10).
            assert!(
                matches!(verify_code, Some(0) | Some(1)),
                "settlement started, but wal-inspect verify called the cut WAL more than a \
                 torn tail; {}",
                context(&run, "start-up")
            );
        }
        let (delay, wait) = if *action == Action::Finish {
            (FINISH_WAIT, FINISH_WAIT)
        } else {
            let d = Duration::from_millis(rng.range(20, max_ms));
            (d, d)
        };
        let until = Instant::now() + wait;
        let mut exited = None;
        while Instant::now() < until {
            if let Some(status) = run.try_wait() {
                exited = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Some(status) = exited {
            assert!(
                status.success(),
                "settlement failed ({status}); {}",
                context(&run, "before its interruption")
            );
            if *action != Action::Finish {
                finished_early += 1;
            }
        }
        match action {
            Action::Finish => {
                assert!(
                    exited.is_some(),
                    "the final run did not finish within {FINISH_WAIT:?}; {}",
                    context(&run, "the final run")
                );
            }
            Action::Kill => {
                if exited.is_none() {
                    let status = run.kill_and_wait();
                    if status.code().is_some() {
                        // It exited by itself just before the kill.
                        assert!(
                            status.success(),
                            "settlement failed ({status}); {}",
                            context(&run, "before its SIGKILL")
                        );
                        finished_early += 1;
                    } else {
                        hit_running += 1;
                    }
                }
                after_cut = None;
            }
            Action::Cut => {
                let cut_started = Instant::now();
                if exited.is_none() {
                    run.signal(libc::SIGSTOP);
                    match wait_all_stopped(run.pid()) {
                        Ok(true) => hit_running += 1,
                        Ok(false) => {
                            // It exited between the delay and the stop: the cut comes after it.
                            let status = run.wait();
                            assert!(
                                status.success(),
                                "settlement failed ({status}); {}",
                                context(&run, "before its power cut")
                            );
                            finished_early += 1;
                        }
                        Err(e) => panic!("seed {seed}, round {round}: {e}"),
                    }
                }
                // The power cut: what the backing file holds now is all that survives.
                let (status, out) = run_tool(
                    &tools.cp,
                    &[
                        "--sparse=always",
                        p(&image(generation)),
                        p(&image(generation + 1)),
                    ],
                );
                assert!(status.success(), "cp of the image failed: {out}");
                run.kill_and_wait();
                drop(run);
                disk.detach()
                    .unwrap_or_else(|e| panic!("detaching the cut disk: {e}"));
                drop(disk);
                std::fs::remove_file(image(generation)).unwrap();
                generation += 1;
                let (status, out) = run_tool(&tools.e2fsck, &["-f", "-p", p(&image(generation))]);
                assert!(
                    matches!(status.code(), Some(0) | Some(1)),
                    "seed {seed}, round {round}: e2fsck -f -p of the cut image exited {status}:\n{out}"
                );
                disk = Mounted::attach(&tools, &image(generation), &mnt).unwrap_or_else(|e| {
                    panic!("seed {seed}, round {round}: remount after the cut: {e}")
                });
                cut_ms.push(cut_started.elapsed().as_millis() as u64);
                // What the WAL looks like after the cut, before settlement opens (and repairs) it;
                // judged once the next start has shown whether it refuses.
                let (code, out) = verify_wal(&mnt.join("wal"));
                if code == Some(1) {
                    torn_after_cut += 1;
                }
                println!(
                    "round {round}: power cut {delay:?} after start; wal-inspect verify exit {code:?}: {}",
                    out.lines().last().unwrap_or("")
                );
                after_cut = Some((code, out));
            }
        }
    }

    let want = model(&lines);
    let store = format!("embedded:{}", mnt.join("ledger.redb").display());
    let balances = assert_store_matches_model(&store, &want, &format!("seed {seed}"));
    let (code, out) = verify_wal(&mnt.join("wal"));
    assert_eq!(
        code,
        Some(0),
        "seed {seed}: the WAL after the final run: {out}"
    );
    assert!(
        hit_running >= rounds / 2,
        "seed {seed}: most interruptions hit a running process: {hit_running} of {rounds} \
         ({finished_early} runs had finished)"
    );
    disk.detach().unwrap();
    // What the starts logged, over every run.
    let mut recoveries = 0;
    let mut tails_cut = 0;
    let mut lsn_jumps = 0;
    for entry in std::fs::read_dir(&logs).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".stderr") && name != "calibration.stderr" {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            recoveries += text.contains("recovery: verifying pending WAL entries") as u64;
            tails_cut += text.matches("cut a torn tail").count();
            lsn_jumps += text.matches("wrote an LSN-jump record").count();
        }
    }
    println!(
        "power_loss_kernel: {cuts} power cuts (each {:?} ms) and {kills} SIGKILLs ({hit_running} \
         hit a running process, {finished_early} runs had finished; {recoveries} starts recovered \
         pending entries, {torn_after_cut} cuts left a torn tail, {tails_cut} tails cut and \
         {lsn_jumps} LSN jumps written at open), {} trades and {balances} balances \
         verified, audit passed, {:.1} s (seed {seed})",
        cut_ms,
        want.trades.len(),
        t0.elapsed().as_secs_f64()
    );
}
