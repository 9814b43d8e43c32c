//! Live runs: signals, a second command while a run is held, and concurrent rebuilds.

use super::*;

/// SIGINT mid-rebuild: the current step finishes journaling, the run is `interrupted`, exit
/// 130, and `recover --resume` completes it.
#[test]
fn sigint_interrupts_cleanly_and_resume_completes() {
    let w = World::new(Opts { locked: true, files: 40 });
    let b = w.snapshot();
    let child = slow_rebuild(&w, 300, std::process::Stdio::piped());
    // Deliberate: let the run get into its steps (the delay makes each step take 300 ms).
    std::thread::sleep(std::time::Duration::from_millis(700));
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let (id, state) = runs(w.path()).last().unwrap().clone();
    assert_eq!(state, "interrupted");
    check_journal(w.path());
    let r = w.home.run(&["recover", "--resume", &id]);
    assert_ok(&r);
    check_rebuilt(&w, &b, "normal");
}

/// Wait until the rebuild started by another process has journaled its run.
fn wait_for_a_run(w: &World) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while runs(w.path()).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the rebuild never journaled a run");
        // Deliberate: waiting for the other process to write its run.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `alpha rebuild --yes` in the background, each step taking at least `step_ms`.
fn slow_rebuild(w: &World, step_ms: u32, stderr: std::process::Stdio) -> std::process::Child {
    w.home
        .cmd()
        .env("NEMOCLAW_STEP_DELAY_MS", step_ms.to_string())
        .args(["alpha", "rebuild", "--yes"])
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// The first Ctrl-C is answered at once, while the step is still running, naming the step and
/// the second Ctrl-C; the second says what it did and exits 130; the journal is left for
/// `recover --resume`, which completes the rebuild.
#[test]
fn ctrl_c_is_acknowledged_at_once_and_the_second_says_what_it_did() {
    use std::io::BufRead;
    let w = World::new(Opts { locked: true, files: 12 });
    let b = w.snapshot();
    let mut child = slow_rebuild(&w, 4000, std::process::Stdio::piped());
    let (tx, rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    wait_for_a_run(&w);
    let pid = child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGINT) };
    let first =
        rx.iter().find(|l| l.starts_with("Stopping:")).expect("the first Ctrl-C is acknowledged");
    // Each step takes 4 s: the answer came while the step was still running.
    assert!(child.try_wait().unwrap().is_none(), "answered only after the process ended");
    assert!(first.contains("step `") && first.contains("Ctrl-C again"), "{first}");
    assert!(first.contains("nemoclaw recover"), "{first}");
    unsafe { libc::kill(pid, libc::SIGINT) };
    let second = rx.iter().find(|l| l.starts_with("Stopped at once")).expect("the second says so");
    assert!(second.contains("during step `") && second.contains("nemoclaw recover"), "{second}");
    assert_eq!(child.wait().unwrap().code(), Some(130));
    // Stopped at once is like kill -9: the run is still `running` until recover takes it over.
    let (id, state) = runs(w.path()).last().unwrap().clone();
    assert_eq!(state, "running");
    assert_ok(&w.home.run(&["recover", "--resume", &id]));
    check_journal(w.path());
    check_rebuilt(&w, &b, "normal");
}

/// While a live process runs a rebuild (running, or stopped with SIGSTOP), every mutating
/// command on that sandbox is busy (75) and names the holder; `shields up` is refused rather
/// than answered and silently undone when the run re-locks; status says "in progress". Once
/// nobody holds an unfinished run, the same commands get exit 3 and the recover commands.
#[test]
fn live_run_is_busy_and_an_interrupted_one_unfinished_and_shields_changes_are_refused() {
    let w = World::new(Opts { locked: true, files: 12 });
    let b = w.snapshot();
    let mut child = slow_rebuild(&w, 400, std::process::Stdio::null());
    wait_for_a_run(&w);
    let pid = child.id() as i32;
    for stopped in [false, true] {
        if stopped {
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        let shields = w.shields_bytes();
        for args in [
            &["alpha", "rebuild", "--yes"][..],
            &["alpha", "destroy", "--yes"],
            &["alpha", "shields", "up"],
            &["alpha", "shields", "down"],
        ] {
            let o = w.home.run(args);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(75), "{args:?} stopped={stopped}: {err}");
            assert!(
                err.contains("is in progress") && err.contains(&format!("pid {pid} ")),
                "{err}"
            );
            assert!(err.contains("running `") && err.contains("alpha rebuild --yes`"), "{err}");
            assert!(!err.contains("recover --resume"), "a live run is not to be recovered: {err}");
            assert_eq!(w.shields_bytes(), shields, "{args:?}: shields untouched");
        }
        let o = w.home.run(&["alpha", "status"]);
        assert!(stderr(&o).contains("is in progress"), "{}", stderr(&o));
        assert!(!stderr(&o).contains("was interrupted"), "{}", stderr(&o));
    }
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(child.wait().unwrap().success());
    check_rebuilt(&w, &b, "normal");

    // Killed mid-run: nobody holds it, so it is unfinished (3), with the commands that finish it.
    let o = w
        .home
        .cmd()
        .env("NEMOCLAW_CRASHPOINT", "after_effect:2")
        .args(["alpha", "rebuild", "--yes"])
        .output()
        .unwrap();
    assert!(killed(&o), "{}", stderr(&o));
    let shields = w.shields_bytes();
    for args in [&["alpha", "shields", "up"][..], &["alpha", "destroy", "--yes"]] {
        let o = w.home.run(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {err}");
        assert!(err.contains("is unfinished") && err.contains("recover --resume"), "{err}");
        assert_eq!(w.shields_bytes(), shields, "{args:?}: shields untouched");
    }
    let o = w.home.run(&["alpha", "status"]);
    assert!(stderr(&o).contains("was interrupted"), "{}", stderr(&o));
}

/// Eight rebuilds of eight sandboxes at once, on a home with no journal yet: the processes race
/// to create and migrate it, then share it. All succeed; no "database is locked".
#[test]
fn eight_concurrent_rebuilds_on_a_fresh_journal() {
    let home = Home::new();
    let gw = LocalGateway::open(home.path()).unwrap();
    let names: Vec<String> = (0..8).map(|i| format!("sb{i}")).collect();
    for n in &names {
        gw.create(&CreateSpec {
            name: sb(n),
            image: "img:1".into(),
            labels: Default::default(),
            agent: None,
            gpu: false,
            policy: None,
            providers: Vec::new(),
        })
        .unwrap();
        std::fs::write(gw.state_dir(&sb(n)).join("MEMORY.md"), n.as_bytes()).unwrap();
        registry::update(home.path(), |reg| {
            reg.set_entry(&sb(n), json!({"name": n, "gatewayName": "local", "imageTag": "img:1"}));
            Ok(())
        })
        .unwrap();
    }
    let children: Vec<_> = names
        .iter()
        .map(|n| {
            home.cmd()
                .args([n.as_str(), "rebuild", "--yes"])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert_ok(&o);
        assert!(!stderr(&o).contains("locked"), "{}", stderr(&o));
    }
    check_journal(home.path());
    let all = runs(home.path());
    assert_eq!(all.len(), 8);
    assert!(all.iter().all(|(_, s)| s == "succeeded"), "{all:?}");
    for n in &names {
        assert_eq!(std::fs::read(gw.state_dir(&sb(n)).join("MEMORY.md")).unwrap(), n.as_bytes());
    }
}
