//! The crash matrix over the real rebuild plan (kill -9 at every crash point, then resume or
//! roll back) and the seeded kill -9 soak.

use super::*;

#[test]
fn crash_matrix_normal_then_resume() {
    forward_matrix(Mode::Normal, true);
}

#[test]
fn crash_matrix_normal_then_rollback() {
    forward_matrix(Mode::Normal, false);
}

#[test]
fn crash_matrix_stale_then_resume() {
    forward_matrix(Mode::Stale, true);
}

#[test]
fn crash_matrix_stale_then_rollback() {
    forward_matrix(Mode::Stale, false);
}

/// A crash during the recovery itself, then recovery again: every compensation point during
/// rollback, every forward point during resume.
fn recovery_matrix(mode: Mode, resume: bool) {
    let mut covered = std::collections::BTreeSet::new();
    let mut cases = 0;
    // First crash: right after the recreate's effect, so rollback has the most to undo.
    let first = (CrashPoint::AfterEffect, if mode == Mode::Normal { 5 } else { 3 });
    let points = if resume { forward_points() } else { comp_points() };
    for &point in &points {
        if resume && point == CrashPoint::AfterRunCreated {
            continue; // a resume creates no run
        }
        for hit in 1.. {
            let (w, b) = world(mode);
            let o = run_with_crash(&w, &["alpha", "rebuild", "--yes"], first.0, first.1);
            assert!(killed(&o), "first crash did not happen: {}", stderr(&o));
            let ctx = format!("{mode:?} then {point}:{hit} resume={resume}");
            let o2 = run_with_crash(&w, &recover_args(resume), point, hit);
            if !killed(&o2) {
                assert!(o2.status.success(), "{ctx}: {}", stderr(&o2));
                check_recovered(&w, &b, mode, resume, &ctx);
                break;
            }
            covered.insert(point);
            cases += 1;
            let r = w.home.run(&recover_args(resume));
            assert!(r.status.success(), "{ctx}: second recover failed\n{}", stderr(&r));
            check_recovered(&w, &b, mode, resume, &ctx);
        }
    }
    eprintln!("{mode:?} two crashes, resume={resume}: {cases} cases");
    if !resume {
        for p in comp_points() {
            assert!(covered.contains(&p), "compensation crash point {p} never reached");
        }
    }
}

#[test]
fn crash_during_rollback_normal() {
    recovery_matrix(Mode::Normal, false);
}

#[test]
fn crash_during_rollback_stale() {
    recovery_matrix(Mode::Stale, false);
}

#[test]
fn crash_during_resume_normal() {
    recovery_matrix(Mode::Normal, true);
}

#[test]
fn crash_during_resume_stale() {
    recovery_matrix(Mode::Stale, true);
}

/// The matrix above meets every crash point the engine has (`matrix_phase` places each one;
/// this checks that each is placed somewhere).
#[test]
fn crash_matrix_covers_every_crash_point() {
    let (fwd, comp) = (forward_points(), comp_points());
    for p in CrashPoint::ALL {
        assert!(
            fwd.contains(p) || comp.contains(p),
            "crash point {p} is not in the rebuild crash matrix"
        );
    }
}

/// Seeded kill -9 soak: rebuilds of a few-hundred-file workspace killed at random moments,
/// each followed by `recover --resume` or `--rollback` alternately; invariants after each.
/// `NEMOCLAW_SOAK_SEED` replays a failure; `NEMOCLAW_SOAK_CYCLES` changes the count (≥ 50).
#[test]
fn kill9_soak() {
    let seed: u64 =
        std::env::var("NEMOCLAW_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(nanos);
    let cycles: u32 =
        std::env::var("NEMOCLAW_SOAK_CYCLES").ok().and_then(|s| s.parse().ok()).unwrap_or(50);
    eprintln!("kill9_soak: seed {seed} (replay with NEMOCLAW_SOAK_SEED={seed}), {cycles} cycles");
    let mut rng = XorShift(seed | 1);
    let w = World::new(Opts { locked: true, files: 300 });
    // How long an undisturbed rebuild takes here, so kills land anywhere inside one: the
    // fastest of three (the first also creates the journal; a loaded machine slows any one).
    let full = (0..3)
        .map(|_| {
            let t0 = std::time::Instant::now();
            assert_ok(&w.rebuild());
            t0.elapsed()
        })
        .min()
        .unwrap();
    let (mut killed_runs, mut completed) = (0, 0);
    for cycle in 0..cycles {
        let b = w.snapshot();
        let resume = cycle % 2 == 0;
        let delay = full.mul_f64(rng.unit() * 1.1);
        let mut child = w
            .home
            .cmd()
            .args(["alpha", "rebuild", "--yes"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Deliberate: the kill must land at a random moment of the run.
        std::thread::sleep(delay);
        unsafe {
            libc::kill(child.id() as i32, libc::SIGKILL);
        }
        let st = child.wait().unwrap();
        let ctx = format!("seed {seed} cycle {cycle} after {delay:?} resume={resume}");
        if killed(&st) {
            killed_runs += 1;
            let r = w.home.run(&recover_args(resume));
            assert!(r.status.success(), "{ctx}: recover failed\n{}", stderr(&r));
        } else {
            completed += 1;
            assert!(st.success(), "{ctx}: rebuild failed on its own");
        }
        check_soak(&w, &b, &ctx);
    }
    eprintln!(
        "kill9_soak: {killed_runs} killed and recovered, {completed} completed before the kill"
    );
    assert!(killed_runs >= cycles / 3, "too few kills landed inside a run: {killed_runs}");
}

/// After any soak cycle: the journal is clean, the row is the snapshot's (imageTag aside), the
/// workspace and shields are as before, one sandbox, no leftovers.
fn check_soak(w: &World, b: &Before, ctx: &str) {
    check_journal(w.path());
    let last = runs(w.path()).last().unwrap().1.clone();
    assert!(last == "succeeded" || last == "rolled_back", "{ctx}: last run {last}");
    let row = w.row().unwrap_or_else(|| panic!("{ctx}: registry row missing"));
    assert_eq!(row, rebuilt_row(&b.row), "{ctx}: registry row");
    assert_eq!(w.registry()["defaultSandbox"], "alpha", "{ctx}");
    assert_eq!(w.digest(), b.digest, "{ctx}: workspace digest");
    assert_eq!(w.shields_bytes(), b.shields, "{ctx}: shields");
    let (names, leftovers) = w.gateway_listing();
    assert_eq!(names, vec!["alpha", "bystander"], "{ctx}");
    assert!(leftovers.is_empty(), "{ctx}: leftovers {leftovers:?}");
}
