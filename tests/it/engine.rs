//! Integration tests: the engine in real child processes (`nemoclaw internal synthetic`):
//! the crash matrix, a seeded SIGKILL soak, the lock race, signals, bad journals, tampering.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nemoclaw::engine::CrashPoint;
use nemoclaw::journal::chain::{event_hash, EventFields, GENESIS};
use nemoclaw::journal::runs::{self, RunRecord, RunState, StepState};
use nemoclaw::journal::Journal;
use rusqlite::Connection;

use crate::common::{killed, need_sqlite3, sqlite, stderr, stdout, Home, XorShift};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Wait for a child with the suite's timeout, capturing its output.
fn wait_output(child: Child) -> Output {
    crate::common::wait_output(child, TIMEOUT)
}

fn piped(mut c: Command) -> Child {
    c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn nemoclaw")
}

/// `nemoclaw internal synthetic <args>` in `home`, optionally armed with a crash point.
fn synth(home: &Home, args: &[&str], crash: Option<&str>) -> Output {
    let mut c = home.cmd();
    c.args(["internal", "synthetic"]).args(args);
    if let Some(p) = crash {
        c.env("NEMOCLAW_CRASHPOINT", p);
    }
    wait_output(piped(c))
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn db(home: &Home) -> PathBuf {
    home.path().join("journal.sqlite3")
}

fn conn(home: &Home) -> Connection {
    Connection::open(db(home)).expect("open journal")
}

fn latest_run(home: &Home) -> Option<RunRecord> {
    let c = conn(home);
    let id: Option<String> = c
        .query_row("SELECT id FROM runs ORDER BY created_at DESC, id DESC LIMIT 1", [], |r| {
            r.get(0)
        })
        .ok();
    id.map(|id| runs::get_run(&c, &id).expect("read run").expect("run exists"))
}

/// Recompute the whole hash chain with `journal::chain` (independently of `verify_chain`).
fn recompute_chain(c: &Connection) -> u64 {
    let mut stmt = c
        .prepare(
            "SELECT id, run_id, step_seq, at, kind, data, prev_hash, hash FROM events ORDER BY id",
        )
        .unwrap();
    let mut rows = stmt.query([]).unwrap();
    let mut prev = GENESIS.to_owned();
    let mut n = 0;
    while let Some(r) = rows.next().unwrap() {
        let id: i64 = r.get(0).unwrap();
        let run_id: Option<String> = r.get(1).unwrap();
        let (kind, data): (String, String) = (r.get(4).unwrap(), r.get(5).unwrap());
        let f = EventFields {
            id,
            run_id: run_id.as_deref(),
            step_seq: r.get(2).unwrap(),
            at: r.get(3).unwrap(),
            kind: &kind,
            data: &data,
        };
        assert_eq!(r.get::<_, String>(6).unwrap(), prev, "prev_hash of event {id}");
        let h = event_hash(&prev, &f);
        assert_eq!(r.get::<_, String>(7).unwrap(), h, "hash of event {id}");
        assert_eq!(id, n as i64 + 1, "event ids are gap-free");
        prev = h;
        n += 1;
    }
    n
}

/// Ledger lines per step.
fn ledger(path: &Path) -> BTreeMap<usize, Vec<char>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut m: BTreeMap<usize, Vec<char>> = BTreeMap::new();
    for line in text.lines() {
        let sign = line.chars().next().expect("no empty ledger lines");
        let k: usize = line[1..].parse().expect("ledger line is <sign><k>");
        m.entry(k).or_default().push(sign);
    }
    m
}

/// The invariants after any crash + recovery: integrity, chain, a finished run with
/// consistent steps, nothing running, no holder left, every effect exactly once net.
fn check(home: &Home, run_id: &str, ledger_path: &Path, n: usize) -> RunState {
    let c = conn(home);
    let ok: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(ok, "ok");
    let events = recompute_chain(&c);
    assert_eq!(nemoclaw::journal::verify_chain(&c), Ok(events));
    let run = runs::get_run(&c, run_id).unwrap().expect("run");
    let steps = runs::steps(&c, run_id).unwrap();
    assert_eq!(steps.len(), n);
    let running: i64 = c
        .query_row(
            "SELECT count(*) FROM runs WHERE state IN ('running', 'rolling_back')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(running, 0, "a run is left running");
    // A holder row may only remain when its process is dead (killed after the run finished,
    // before it released the lock); the next runner journals a takeover for it.
    let pids: Vec<i64> = c
        .prepare("SELECT pid FROM holders")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for pid in pids {
        // SAFETY: signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
        assert!(!alive, "a live process {pid} is still recorded as a lock holder");
    }
    let l = ledger(ledger_path);
    assert!(l.keys().all(|k| *k < n), "ledger {l:?}");
    for (k, s) in steps.iter().enumerate() {
        let lines = l.get(&k).cloned().unwrap_or_default();
        match run.state {
            RunState::Succeeded => {
                assert_eq!(s.state, StepState::Done, "step {k}");
                assert_eq!(lines, ['+'], "step {k} applied exactly once: {l:?}");
            }
            RunState::RolledBack => match s.state {
                StepState::Pending => {
                    assert!(lines.is_empty(), "pending step {k} has effects {l:?}")
                }
                StepState::Compensated => {
                    assert!(lines.is_empty() || lines == ['+', '-'], "step {k}: {l:?}")
                }
                other => panic!("step {k} is {other} in a rolled back run"),
            },
            other => panic!("run {run_id} ended {other}, expected succeeded or rolled_back"),
        }
    }
    run.state
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// The point is on the forward path: `run` crashes there.
    Forward { per_step: bool },
    /// The point is reached by any runner after taking the lock: crash the recovery command.
    Lock,
    /// The point is on the rollback path: a failed run's `rollback` crashes there.
    Compensation { per_step: bool },
}

/// Where the matrix makes each crash point happen. No wildcard: a new point does not compile
/// until it is placed here.
fn phase(point: CrashPoint) -> Phase {
    use CrashPoint::*;
    match point {
        AfterRunCreated | BeforeFinish => Phase::Forward { per_step: false },
        // `mid_effect` is reached inside the synthetic step's apply (after its ledger line) and
        // compensate; on the forward path it is the apply's.
        BeforeIntent | AfterIntent | MidEffect | AfterEffect | AfterOutcome => {
            Phase::Forward { per_step: true }
        }
        AfterLock => Phase::Lock,
        BeforeRollbackFinish => Phase::Compensation { per_step: false },
        BeforeCompIntent | AfterCompIntent | AfterCompEffect | AfterCompOutcome => {
            Phase::Compensation { per_step: true }
        }
    }
}

/// One matrix case (`hit`: which arrival at a per-step point crashes; default the middle
/// step); returns the final run state.
fn crash_case(point: CrashPoint, recovery: &str, n: usize, hit: Option<usize>) -> RunState {
    let home = Home::new();
    let ledger_path = home.path().join("ledger");
    let lp = ledger_path.to_str().unwrap().to_owned();
    let ns = n.to_string();
    let fail_last = (n - 1).to_string();
    let per_step_hit = |p: bool| if p { hit.unwrap_or(n.div_ceil(2)) } else { 1 };
    let ctx = format!("{point}:{hit:?} x {recovery}, {n} steps");
    match phase(point) {
        Phase::Forward { per_step } => {
            let armed = format!("{point}:{}", per_step_hit(per_step));
            let o = synth(&home, &["run", "--steps", &ns, "--ledger", &lp], Some(&armed));
            assert!(
                killed(&o.status),
                "{ctx}: run was not killed at the point: {:?} {}",
                o.status,
                stderr(&o)
            );
        }
        Phase::Lock => {
            let o = synth(
                &home,
                &["run", "--steps", &ns, "--ledger", &lp, "--fail-at", &fail_last],
                None,
            );
            assert_eq!(code(&o), Some(1), "{ctx}: {}", stderr(&o));
            let o = synth(&home, &[recovery], Some(point.name()));
            assert!(killed(&o.status), "{ctx}: {recovery} was not killed: {}", stderr(&o));
        }
        Phase::Compensation { per_step } => {
            let o = synth(
                &home,
                &["run", "--steps", &ns, "--ledger", &lp, "--fail-at", &fail_last],
                None,
            );
            assert_eq!(code(&o), Some(1), "{ctx}: {}", stderr(&o));
            let armed = format!("{point}:{}", per_step_hit(per_step));
            let o = synth(&home, &["rollback"], Some(&armed));
            assert!(killed(&o.status), "{ctx}: rollback was not killed: {}", stderr(&o));
        }
    }
    let Some(run) = latest_run(&home) else {
        panic!("{ctx}: no run in the journal");
    };
    // Recovery in a new process.
    let o = synth(&home, &[recovery, "--run", &run.id], None);
    let expected = match (run.state, recovery) {
        (RunState::Succeeded, "rollback") => {
            assert_eq!(code(&o), Some(3), "{ctx}: rollback of a succeeded run: {}", stderr(&o));
            RunState::Succeeded
        }
        (RunState::RollingBack | RunState::RolledBack, "resume") => {
            assert_eq!(code(&o), Some(3), "{ctx}: resume of a rollback must be refused");
            assert!(stderr(&o).contains("rolled back further"), "{}", stderr(&o));
            let o = synth(&home, &["rollback", "--run", &run.id], None);
            assert_eq!(code(&o), Some(0), "{ctx}: {}", stderr(&o));
            RunState::RolledBack
        }
        (_, "resume") => {
            assert_eq!(code(&o), Some(0), "{ctx}: {}", stderr(&o));
            assert_eq!(stdout(&o).trim(), run.id);
            RunState::Succeeded
        }
        _ => {
            assert_eq!(code(&o), Some(0), "{ctx}: {}", stderr(&o));
            RunState::RolledBack
        }
    };
    let got = check(&home, &run.id, &ledger_path, n);
    assert_eq!(got, expected, "{ctx}");
    got
}

fn matrix(n: usize) -> BTreeSet<CrashPoint> {
    let mut covered = BTreeSet::new();
    for &point in CrashPoint::ALL {
        for recovery in ["resume", "rollback"] {
            crash_case(point, recovery, n, None);
        }
        covered.insert(point);
    }
    covered
}

#[rstest::rstest]
#[case::one_step(1)]
#[case::three_steps(3)]
#[case::six_steps(6)]
fn crash_matrix(#[case] n: usize) {
    let covered = matrix(n);
    let all: BTreeSet<CrashPoint> = CrashPoint::ALL.iter().copied().collect();
    assert_eq!(covered, all);
    assert_eq!(all.len(), CrashPoint::ALL.len(), "no point is listed twice");
}

#[test]
fn crash_matrix_every_hit_of_per_step_points() {
    // On 3 steps, crash at every arrival (first, middle, last step) of each per-step point.
    for &point in CrashPoint::ALL {
        let per_step = matches!(
            phase(point),
            Phase::Forward { per_step: true } | Phase::Compensation { per_step: true }
        );
        if per_step {
            for hit in [1, 3] {
                for recovery in ["resume", "rollback"] {
                    crash_case(point, recovery, 3, Some(hit));
                }
            }
        }
    }
}

#[test]
fn crash_during_resume_and_during_rollback() {
    // (crash of run, crash of the first recovery, recovery) on 3 steps.
    let cases = [
        ("after_effect:2", "after_intent:1", "resume"),
        ("after_intent:2", "before_finish", "resume"),
        ("before_intent:3", "after_lock", "resume"),
        ("after_effect:2", "after_comp_effect:1", "rollback"),
        ("mid_effect:2", "mid_effect:1", "rollback"),
        ("mid_effect:2", "mid_effect:1", "resume"),
        ("after_outcome:1", "before_comp_intent:2", "rollback"),
        ("before_finish", "after_comp_outcome:2", "rollback"),
    ];
    for (first, second, recovery) in cases {
        let home = Home::new();
        let lp = home.path().join("ledger");
        let o =
            synth(&home, &["run", "--steps", "3", "--ledger", lp.to_str().unwrap()], Some(first));
        assert!(killed(&o.status), "{first}");
        let o = synth(&home, &[recovery], Some(second));
        assert!(killed(&o.status), "{first} then {second}: {}", stderr(&o));
        let o = synth(&home, &[recovery], None);
        assert_eq!(code(&o), Some(0), "{first} then {second}: {}", stderr(&o));
        let run = latest_run(&home).unwrap();
        let want = if recovery == "resume" { RunState::Succeeded } else { RunState::RolledBack };
        assert_eq!(check(&home, &run.id, &lp, 3), want, "{first} then {second}");
    }
    // A third crash in a row, mid-rollback again, still converges.
    let home = Home::new();
    let lp = home.path().join("ledger");
    let o = synth(
        &home,
        &["run", "--steps", "6", "--ledger", lp.to_str().unwrap()],
        Some("after_effect:5"),
    );
    assert!(killed(&o.status));
    for p in ["after_comp_intent:2", "after_comp_effect:1", "after_comp_outcome:1"] {
        let o = synth(&home, &["rollback"], Some(p));
        assert!(killed(&o.status), "{p}: {}", stderr(&o));
    }
    assert_eq!(code(&synth(&home, &["rollback"], None)), Some(0));
    let run = latest_run(&home).unwrap();
    assert_eq!(check(&home, &run.id, &lp, 6), RunState::RolledBack);
}

/// Spawn and SIGKILL after `delay` (if still running). Returns whether it was killed.
fn spawn_and_kill(home: &Home, args: &[&str], delay: Duration) -> bool {
    let mut c = home.cmd();
    c.args(["internal", "synthetic"]).args(args).stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = c.spawn().expect("spawn nemoclaw");
    // Deliberate: the random moment of the kill.
    std::thread::sleep(delay);
    let was_running = child.try_wait().expect("poll").is_none();
    let _ = child.kill();
    let status = child.wait().expect("reap");
    was_running && killed(&status)
}

#[test]
fn sigkill_soak() {
    let seed: u64 = std::env::var("NEMOCLAW_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| nemoclaw::util::now_ms() as u64 | 1);
    eprintln!("soak seed: {seed} (replay with NEMOCLAW_SOAK_SEED={seed})");
    // Cycles continue until this many kills have landed on a live runner (a kill that comes
    // after the process exited does not count).
    let want_kills: usize =
        std::env::var("NEMOCLAW_SOAK_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    let mut rng = XorShift(seed | 1);
    let home = Home::new();
    let t0 = Instant::now();
    let mut kills = 0;
    let mut finals = BTreeMap::new();
    let mut cycles = 0;
    for i in 0..want_kills * 4 {
        if kills >= want_kills {
            break;
        }
        cycles += 1;
        let n = 1 + rng.below(4) as usize;
        let lp = home.path().join(format!("ledger-{i}"));
        let ns = n.to_string();
        let fail = rng.below(4) == 0;
        let fail_at = rng.below(n as u64).to_string();
        let mut args =
            vec!["run", "--steps", &ns, "--ledger", lp.to_str().unwrap(), "--step-ms", "3"];
        if fail {
            args.extend(["--fail-at", &fail_at]);
        }
        kills += spawn_and_kill(&home, &args, Duration::from_millis(4 + rng.below(40))) as usize;
        let Some(run) = latest_run(&home).filter(|r| r.params["ledger"] == lp.to_str().unwrap())
        else {
            // Killed before the run was created: nothing to recover, nothing may have happened.
            assert!(!lp.exists(), "seed {seed} cycle {i}: effects without a run");
            continue;
        };
        // A second kill, during a recovery, half of the time.
        if !run.state.is_final() && rng.below(2) == 0 {
            let action = if run.state == RunState::RollingBack || rng.below(2) == 0 {
                "rollback"
            } else {
                "resume"
            };
            let a = ["--step-ms", "3", "--run", &run.id];
            let mut args = vec![action];
            args.extend(a);
            kills +=
                spawn_and_kill(&home, &args, Duration::from_millis(4 + rng.below(30))) as usize;
        }
        // Final recovery, not killed.
        let state = runs::get_run(&conn(&home), &run.id).unwrap().unwrap().state;
        if !state.is_final() {
            let action = if state == RunState::RollingBack || rng.below(2) == 0 {
                "rollback"
            } else {
                "resume"
            };
            let o = synth(&home, &[action, "--run", &run.id], None);
            assert_eq!(code(&o), Some(0), "seed {seed} cycle {i}: {action}: {}", stderr(&o));
        }
        let got = check(&home, &run.id, &lp, n);
        *finals.entry(got.as_str()).or_insert(0) += 1;
    }
    eprintln!("soak: {cycles} cycles, {kills} kills landed, finals {finals:?}, {:?}", t0.elapsed());
    assert!(kills >= want_kills, "seed {seed}: only {kills} kills landed in {cycles} cycles");
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        // Deliberate: polling the journal for another process's progress.
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn holder_pid(home: &Home, key: &str) -> Option<i64> {
    if !db(home).exists() {
        return None;
    }
    Journal::open_readonly(&db(home))
        .ok()
        .flatten()
        .and_then(|j| runs::holder(j.conn(), key).ok().flatten())
        .map(|h| h.pid)
}

#[test]
fn lock_race_one_runner_per_key_and_takeover_after_kill() {
    let home = Home::new();
    let la = home.path().join("ledger-a");
    let lb = home.path().join("ledger-b");
    let mut ca = home.cmd();
    ca.args(["internal", "synthetic", "run", "--key", "race", "--steps", "3", "--step-ms", "400"])
        .args(["--ledger", la.to_str().unwrap()]);
    let mut a = piped(ca);
    let a_pid = a.id() as i64;
    wait_until("runner A to record itself", || holder_pid(&home, "race") == Some(a_pid));
    let b = synth(
        &home,
        &["run", "--key", "race", "--steps", "1", "--ledger", lb.to_str().unwrap()],
        None,
    );
    assert_eq!(code(&b), Some(75), "{}", stderr(&b));
    let msg = stderr(&b);
    assert!(msg.contains(&format!("pid {a_pid} on host")) && msg.contains("since"), "{msg}");
    assert!(msg.contains("`race`"), "{msg}");
    assert!(!lb.exists(), "the refused runner changed something");
    // Simultaneous start on another key: exactly one of two proceeds.
    let race2 = |ledger: &Path| {
        let mut c = home.cmd();
        c.args([
            "internal",
            "synthetic",
            "run",
            "--key",
            "race2",
            "--steps",
            "2",
            "--step-ms",
            "300",
        ])
        .args(["--ledger", ledger.to_str().unwrap()]);
        piped(c)
    };
    let (l1, l2) = (home.path().join("l1"), home.path().join("l2"));
    let (c1, c2) = (race2(&l1), race2(&l2));
    let (o1, o2) = (wait_output(c1), wait_output(c2));
    let mut codes = [code(&o1), code(&o2)];
    codes.sort();
    assert_eq!(codes, [Some(0), Some(75)], "{} / {}", stderr(&o1), stderr(&o2));
    assert_eq!(l1.exists() as u8 + l2.exists() as u8, 1);

    // kill -9 the holder mid-run: the next runner takes over at once.
    wait_until("runner A's first step", || la.exists());
    a.kill().unwrap();
    let st = a.wait().unwrap();
    assert!(killed(&st));
    let run = latest_run(&home).filter(|r| r.lock_key == "race").unwrap_or_else(|| {
        let c = conn(&home);
        let id: String =
            c.query_row("SELECT id FROM runs WHERE lock_key = 'race'", [], |r| r.get(0)).unwrap();
        runs::get_run(&c, &id).unwrap().unwrap()
    });
    assert_eq!(run.state, RunState::Running, "the dead runner's run still says running");
    let t = Instant::now();
    let c = synth(&home, &["resume", "--key", "race", "--run", &run.id], None);
    assert_eq!(code(&c), Some(0), "{}", stderr(&c));
    assert!(t.elapsed() < Duration::from_secs(10), "takeover waited {:?}", t.elapsed());
    let (data, kind): (String, String) = conn(&home)
        .query_row(
            "SELECT data, kind FROM events WHERE run_id = ?1 AND kind = 'takeover'",
            [&run.id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("a takeover event row");
    assert_eq!(kind, "takeover");
    let d: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(d["old_pid"], a_pid);
    assert!(d["new_pid"].as_i64().unwrap() != a_pid);
    let kinds: Vec<String> = conn(&home)
        .prepare("SELECT kind FROM events WHERE run_id = ?1 ORDER BY id")
        .unwrap()
        .query_map([&run.id], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let pos = kinds.iter().position(|k| k == "takeover").unwrap();
    assert_eq!(kinds[pos + 1], "run_interrupted", "{kinds:?}");
    assert_eq!(check(&home, &run.id, &la, 3), RunState::Succeeded);
}

#[test]
fn sigterm_finishes_the_current_step_then_interrupts() {
    let home = Home::new();
    let lp = home.path().join("ledger");
    let mut c = home.cmd();
    c.args(["internal", "synthetic", "run", "--steps", "3", "--step-ms", "300"])
        .args(["--ledger", lp.to_str().unwrap()]);
    let child = piped(c);
    let pid = child.id() as i32;
    // Signal while step 0's effect is in flight (its intent is durable, the ledger is empty).
    wait_until("step 0 intent", || {
        latest_run(&home).is_some_and(|r| {
            runs::steps(&conn(&home), &r.id).unwrap()[0].state == StepState::Started
        })
    });
    assert!(!lp.exists());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let o = wait_output(child);
    assert_eq!(code(&o), Some(130), "{}", stderr(&o));
    let run = latest_run(&home).unwrap();
    assert_eq!(run.state, RunState::Interrupted);
    let st = runs::steps(&conn(&home), &run.id).unwrap();
    let states: Vec<_> = st.iter().map(|s| s.state).collect();
    assert_eq!(states, [StepState::Done, StepState::Pending, StepState::Pending]);
    assert_eq!(std::fs::read_to_string(&lp).unwrap(), "+0\n", "the effect in flight completed");
    let o = synth(&home, &["resume"], None);
    assert_eq!(code(&o), Some(0), "{}", stderr(&o));
    assert_eq!(check(&home, &run.id, &lp, 3), RunState::Succeeded);
}

#[test]
fn sigterm_during_rollback_keeps_rolling_back_then_rollback_finishes() {
    let home = Home::new();
    let lp = home.path().join("ledger");
    let o = synth(
        &home,
        &["run", "--steps", "3", "--fail-at", "2", "--ledger", lp.to_str().unwrap()],
        None,
    );
    assert_eq!(code(&o), Some(1));
    let run = latest_run(&home).unwrap();
    let mut c = home.cmd();
    c.args(["--json", "internal", "synthetic", "rollback", "--step-ms", "300", "--run", &run.id]);
    let child = piped(c);
    let pid = child.id() as i32;
    wait_until("the first compensation intent", || {
        runs::steps(&conn(&home), &run.id).unwrap()[2].state == StepState::Compensating
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let o = wait_output(child);
    assert_eq!(code(&o), Some(130), "{}", stderr(&o));
    let doc: serde_json::Value =
        serde_json::from_str(stdout(&o).trim()).expect("one JSON document");
    assert_eq!(doc["type"], "internal.synthetic");
    assert_eq!(doc["data"]["run_id"], run.id.as_str());
    assert_eq!(doc["data"]["state"], "rolling_back");
    assert_eq!(doc["data"]["interrupted"], true);
    let states: Vec<_> =
        runs::steps(&conn(&home), &run.id).unwrap().iter().map(|s| s.state).collect();
    assert_eq!(states, [StepState::Done, StepState::Done, StepState::Compensated]);
    let n: i64 = conn(&home)
        .query_row(
            "SELECT count(*) FROM events WHERE run_id = ?1 AND kind = 'rollback_interrupted'",
            [&run.id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1);
    // Only rollback may continue it.
    assert_eq!(code(&synth(&home, &["resume", "--run", &run.id], None)), Some(3));
    assert_eq!(code(&synth(&home, &["rollback", "--run", &run.id], None)), Some(0));
    assert_eq!(check(&home, &run.id, &lp, 3), RunState::RolledBack);
    assert_eq!(std::fs::read_to_string(&lp).unwrap(), "+0\n+1\n-1\n-0\n");
}

#[test]
fn resume_refuses_unknown_or_changed_plans() {
    let home = Home::new();
    let lp = home.path().join("ledger");
    let o = synth(
        &home,
        &["run", "--steps", "2", "--fail-at", "1", "--ledger", lp.to_str().unwrap()],
        None,
    );
    assert_eq!(code(&o), Some(1));
    let run = latest_run(&home).unwrap();
    let c = conn(&home);
    c.execute("UPDATE runs SET plan_fingerprint = 'x' WHERE id = ?1", [&run.id]).unwrap();
    let o = synth(&home, &["resume", "--run", &run.id[..13]], None);
    assert_eq!(code(&o), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("different `synthetic` plan"), "{}", stderr(&o));
    c.execute("UPDATE runs SET plan = 'mystery' WHERE id = ?1", [&run.id]).unwrap();
    let o = synth(&home, &["rollback", "--run", &run.id], None);
    assert_eq!(code(&o), Some(3));
    assert!(stderr(&o).contains("plan `mystery`"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&lp).unwrap(), "+0\n", "nothing was touched");
    assert_eq!(holder_pid(&home, "synthetic"), None, "the lock was released");
}

fn file_digest(p: &Path) -> String {
    nemoclaw::util::sha256_hex(&std::fs::read(p).unwrap())
}

fn events_dump(home: &Home) -> Vec<(i64, String)> {
    conn(home)
        .prepare("SELECT id, hash FROM events ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn one_good_run(home: &Home) {
    let lp = home.path().join("ledger0");
    let o = synth(home, &["run", "--steps", "2", "--ledger", lp.to_str().unwrap()], None);
    assert_eq!(code(&o), Some(0), "{}", stderr(&o));
}

#[test]
fn newer_schema_is_refused_and_untouched() {
    let home = Home::new();
    one_good_run(&home);
    conn(&home).pragma_update(None, "user_version", 99).unwrap();
    let before = file_digest(&db(&home));
    let o = synth(&home, &["run", "--steps", "1"], None);
    assert_eq!(code(&o), Some(65), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains(db(&home).to_str().unwrap()) && e.contains("schema version 99"), "{e}");
    assert_eq!(file_digest(&db(&home)), before);
}

#[test]
fn corrupt_and_truncated_journals_are_refused_and_untouched() {
    // Garbage bytes.
    let home = Home::new();
    let garbage: Vec<u8> =
        (0..8192u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(db(&home), &garbage).unwrap();
    let o = synth(&home, &["run", "--steps", "1"], None);
    assert_eq!(code(&o), Some(65), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains(db(&home).to_str().unwrap()) && e.contains("corrupt"), "{e}");
    assert_eq!(std::fs::read(db(&home)).unwrap(), garbage);

    // A real journal cut short (its header says it has more pages than the file holds).
    let home = Home::new();
    one_good_run(&home);
    let full = std::fs::read(db(&home)).unwrap();
    let cut = &full[..full.len() / 2];
    std::fs::write(db(&home), cut).unwrap();
    let o = synth(&home, &["run", "--steps", "1"], None);
    assert_eq!(code(&o), Some(65), "{}", stderr(&o));
    assert!(stderr(&o).contains(db(&home).to_str().unwrap()), "{}", stderr(&o));
    assert_eq!(std::fs::read(db(&home)).unwrap(), cut);
}

#[test]
fn read_only_home_is_an_io_error_and_nothing_changes() {
    let home = Home::new();
    one_good_run(&home);
    let before = (file_digest(&db(&home)), events_dump(&home));
    let mut c = home.cmd();
    c.args(["internal", "synthetic", "run", "--steps", "1"]);
    // SAFETY: getuid has no arguments.
    let root = unsafe { libc::getuid() } == 0;
    set_mode(home.path(), 0o500);
    if root {
        // Root ignores permission bits: run the child as `nobody`, owning the home, so the
        // read-only directory really is read-only for it.
        chown_tree(home.path(), 65534);
        // The temp dir's parents must be traversable by nobody.
        c.uid(65534).gid(65534);
    }
    let o = wait_output(piped(c));
    set_mode(home.path(), 0o700);
    if root {
        chown_tree(home.path(), 0);
    }
    assert_eq!(code(&o), Some(74), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains(db(&home).to_str().unwrap()) && e.contains("read-only"), "{e}");
    assert_eq!((file_digest(&db(&home)), events_dump(&home)), before);
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown_tree(p: &Path, uid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            chown_tree(&e.path(), uid);
        } else {
            std::os::unix::fs::chown(e.path(), Some(uid), Some(uid)).unwrap();
        }
    }
}

#[test]
fn full_journal_is_an_io_error_and_keeps_what_was_recorded() {
    let home = Home::new();
    one_good_run(&home);
    let before = events_dump(&home);
    let pages: i64 = conn(&home).query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
    let lp = home.path().join("ledger1");
    let o = home
        .cmd()
        .args(["internal", "synthetic", "run", "--steps", "40", "--ledger", lp.to_str().unwrap()])
        .env("NEMOCLAW_JOURNAL_MAX_PAGES", pages.to_string())
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(74), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains(db(&home).to_str().unwrap()) && e.contains("disk is full"), "{e}");
    let c = conn(&home);
    let ok: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(ok, "ok");
    let after = events_dump(&home);
    assert_eq!(&after[..before.len()], &before[..], "recorded events changed");
    nemoclaw::journal::verify_chain(&c).unwrap();
    // With room again, whatever was left unfinished recovers.
    if let Some(r) = runs::unfinished_runs(&c, &Default::default()).unwrap().first() {
        let o = synth(&home, &["rollback", "--run", &r.id], None);
        assert_eq!(code(&o), Some(0), "{}", stderr(&o));
        check(&home, &r.id, &lp, 40);
    }
}

#[test]
fn tampered_event_breaks_the_hash_chain() {
    need_sqlite3!();
    let home = Home::new();
    one_good_run(&home);
    let c = conn(&home);
    let total = nemoclaw::journal::verify_chain(&c).unwrap();
    assert!(total >= 6);
    drop(c);
    // The append-only trigger stops an honest mistake; a tamperer drops it first.
    sqlite(
        home.path(),
        "DROP TRIGGER events_no_update; UPDATE events SET data = '{\"name\":\"s9\"}' WHERE id = 3;",
    );
    let brk = nemoclaw::journal::verify_chain(&conn(&home)).unwrap_err();
    assert_eq!(brk.event_id, 3, "{brk}");
    assert!(brk.reason.contains("edited"), "{brk}");
    // A smarter tamperer also rewrites that row's hash: the next event's link breaks.
    let c = conn(&home);
    let (prev, id, run_id, seq, at, kind, data): (
        String,
        i64,
        Option<String>,
        Option<i64>,
        i64,
        String,
        String,
    ) = c
        .query_row(
            "SELECT prev_hash, id, run_id, step_seq, at, kind, data FROM events WHERE id = 3",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .unwrap();
    let forged = event_hash(
        &prev,
        &EventFields { id, run_id: run_id.as_deref(), step_seq: seq, at, kind: &kind, data: &data },
    );
    drop(c);
    sqlite(home.path(), &format!("UPDATE events SET hash = '{forged}' WHERE id = 3;"));
    let brk = nemoclaw::journal::verify_chain(&conn(&home)).unwrap_err();
    assert_eq!(brk.event_id, 4, "{brk}");
}
