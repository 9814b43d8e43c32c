//! What the commands do at the edge: durations, colour, confirmation on a terminal, preset
//! checks, step numbers, labels, and which flag wins.

use std::process::Output;

use crate::common::{stderr, stdout, Home};

/// Durations take humantime's forms (`1min`, `1h30m`) besides the short ones (`7d`, `30m`),
/// for `--since` and `--older-than` alike; anything else is a usage error that shows the forms.
#[test]
fn durations_accept_humantime_forms() {
    let h = Home::new();
    assert!(h.run(&["onboard", "alpha", "--gateway", "local"]).status.success());
    let o = h.run(&["alpha", "rebuild", "--yes"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let runs = |since: &str| {
        let o = h.run(&["--json", "journal", "list", "--since", since]);
        assert!(o.status.success(), "{since}: {}", stderr(&o));
        let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        doc["data"]["runs"].as_array().map(Vec::len).unwrap_or(99)
    };
    assert_eq!((runs("1min"), runs("1h30m"), runs("1h 30m"), runs("7d")), (1, 1, 1, 1));
    let in_3_min = (nemoclaw::util::now_ms() + 180_000).to_string();
    let pruned = |older: &str| {
        let o = h
            .cmd()
            .env("NEMOCLAW_NOW_MS", &in_3_min)
            .args(["--json", "journal", "prune", "--dry-run", "--older-than", older])
            .output()
            .unwrap();
        assert!(o.status.success(), "{older}: {}", stderr(&o));
        let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        doc["data"]["runs_removed"].as_array().map(Vec::len).unwrap_or(99)
    };
    assert_eq!((pruned("1min"), pruned("2m30s"), pruned("1h30m")), (1, 1, 0));
    let o = h.run(&["journal", "prune", "--older-than", "soon"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("invalid duration `soon`") && stderr(&o).contains("`1h30m`"));
}

/// Run `c` with a terminal (a pty) as its stdin and `answer` typed into it.
fn on_terminal(mut c: std::process::Command, answer: &str) -> Output {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fresh descriptors, which the two Files below then own.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    let (mut master, slave) =
        unsafe { (std::fs::File::from_raw_fd(master), std::fs::File::from_raw_fd(slave)) };
    c.stdin(slave).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    drop(c);
    master.write_all(answer.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    drop(master);
    out
}

/// `journal prune` on a terminal lists the backups it would delete and asks; "no" changes
/// nothing (exit 3), "yes" deletes; `--dry-run` lists without asking.
#[test]
fn prune_asks_before_deleting_backups_on_a_terminal() {
    let h = Home::new();
    assert!(h.run(&["onboard", "alpha", "--gateway", "local"]).status.success());
    assert!(h.run(&["alpha", "rebuild", "--yes"]).status.success());
    let backups = || std::fs::read_dir(h.path().join("rebuild-backups/alpha")).unwrap().count();
    assert_eq!(backups(), 1);
    let later = (nemoclaw::util::now_ms() + 86_400_000).to_string();
    let prune = |extra: &[&str]| {
        let mut c = h.cmd();
        c.env("NEMOCLAW_NOW_MS", &later).args(["journal", "prune", "--older-than", "1h"]);
        c.args(extra);
        c
    };
    let dry = prune(&["--dry-run"]).output().unwrap();
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert!(stdout(&dry).starts_with("Would remove 1 run(s)"), "{}", stdout(&dry));
    assert!(stdout(&dry).contains("  backup  "), "{}", stdout(&dry));
    assert!(!stderr(&dry).contains("[y/N]"), "a dry run does not ask");

    let no = on_terminal(prune(&[]), "n\n");
    assert_eq!(no.status.code(), Some(3), "{}", stderr(&no));
    assert!(stdout(&no).contains("  backup  "), "the backups are listed: {}", stdout(&no));
    assert!(stderr(&no).contains("Delete this backup directory? [y/N]"), "{}", stderr(&no));
    assert!(stderr(&no).contains("Aborted: nothing was changed."), "{}", stderr(&no));
    assert_eq!(backups(), 1, "no backup deleted");
    let o = h.run(&["--json", "journal", "list"]);
    let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(doc["data"]["runs"].as_array().map(Vec::len), Some(1), "no run pruned");

    let yes = on_terminal(prune(&[]), "yes\n");
    assert!(yes.status.success(), "{}", stderr(&yes));
    assert!(stderr(&yes).contains("✓ Pruned"), "{}", stderr(&yes));
    assert_eq!(backups(), 0, "the backup is deleted");
}

/// Text with the SGR styling sequences (`ESC [ ... m`) removed.
fn unstyled(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("\x1b[") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 2..];
        match tail.find('m') {
            Some(j) if tail[..j].bytes().all(|b| b.is_ascii_digit() || b == b';') => {
                rest = &tail[j + 1..]
            }
            _ => {
                out.push_str("\x1b[");
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// One colour decision for nemoclaw's output and clap's: `--color`, then `NO_COLOR`, then
/// `CLICOLOR_FORCE`, then whether the stream is a terminal. Coloured output is the plain output
/// plus styling, nothing else.
#[test]
fn colour_follows_color_no_color_and_clicolor_force_for_ours_and_clap_s() {
    let h = Home::new();
    assert!(h.run(&["onboard", "alpha", "--gateway", "local"]).status.success());
    assert!(h.run(&["alpha", "rebuild", "--yes"]).status.success());
    let run = |env: &[(&str, &str)], args: &[&str]| {
        let mut c = h.cmd();
        c.env_remove("NO_COLOR").envs(env.iter().copied()).args(args);
        c.output().unwrap()
    };
    let coloured = |o: &Output| stdout(o).contains('\x1b') || stderr(o).contains('\x1b');
    let force = [("CLICOLOR_FORCE", "1")];
    let both = [("CLICOLOR_FORCE", "1"), ("NO_COLOR", "1")];
    for args in [
        &["list"][..],
        &["journal", "list"],
        &["alpha", "status"],
        &["--help"],
        &["alpha", "rebuild", "--help"],
        &["list", "--frobnicate"],
        &["nope", "status"],
    ] {
        let with = |extra: &[&'static str]| -> Vec<&str> { [extra, args].concat() };
        let plain = run(&[], args);
        assert!(!coloured(&plain), "{args:?}: not a terminal: no colour");
        let forced = run(&force, args);
        assert!(coloured(&forced), "{args:?}: CLICOLOR_FORCE colours: {}", stderr(&forced));
        assert!(!coloured(&run(&both, args)), "{args:?}: NO_COLOR wins over CLICOLOR_FORCE");
        assert!(!coloured(&run(&force, &with(&["--color", "never"]))), "{args:?}: --color never");
        let always = run(&[("NO_COLOR", "1")], &with(&["--color=always"]));
        assert!(coloured(&always), "{args:?}: --color always beats NO_COLOR");
        // Colour adds styling and nothing else (times in `journal list` are relative: compare
        // the shape only there).
        if args != ["journal", "list"] {
            assert_eq!(unstyled(&stdout(&forced)), stdout(&plain), "{args:?}");
            assert_eq!(unstyled(&stderr(&forced)), stderr(&plain), "{args:?}");
        }
    }
    let o = run(&force, &["nope", "status"]);
    assert!(stderr(&o).contains("\x1b[1m\x1b[31merror:\x1b[0m"), "{:?}", stderr(&o));
    assert!(stderr(&o).contains("\x1b[1m\x1b[36mhint:\x1b[0m"), "{:?}", stderr(&o));
}

/// `onboard --policy` takes only presets it knows (NemoClaw's, or the `*.yaml` files of
/// `--policy-presets DIR`): an unknown one is refused with the list, before anything exists.
#[test]
fn unknown_presets_are_refused_at_onboard_with_the_known_ones() {
    let h = Home::new();
    let o =
        h.run(&["onboard", "alpha", "--gateway", "local", "--policy", "npm", "--policy", "nmp"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("unknown policy preset `nmp`: the known presets are apt, brew"), "{err}");
    assert!(err.contains(", npm, ") && err.contains(", telegram, "), "{err}");
    assert!(err.lines().last().unwrap().contains("`--policy-presets DIR`"), "{err}");
    assert!(!h.path().join("sandboxes.json").exists(), "nothing registered");
    assert!(!h.path().join("local-gateway/sandboxes/alpha").exists(), "nothing created");

    let presets = h.path().join("presets");
    std::fs::create_dir_all(&presets).unwrap();
    std::fs::write(presets.join("corp-proxy.yaml"), "preset:\n  name: corp-proxy\n").unwrap();
    let dir = presets.to_str().unwrap();
    let o = h.run(&[
        "--policy-presets",
        dir,
        "onboard",
        "alpha",
        "--gateway",
        "local",
        "--policy",
        "npm",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("the known presets are corp-proxy\n"), "{}", stderr(&o));
    let o = h.run(&[
        "--policy-presets",
        dir,
        "onboard",
        "alpha",
        "--gateway",
        "local",
        "--policy",
        "corp-proxy",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Step numbers are the same wherever a person reads them: the dry run's plan and
/// `journal show`'s step table both count from 1, in the same order. Warnings are labelled.
#[test]
fn step_numbers_agree_and_warnings_are_labelled() {
    let h = Home::new();
    assert!(h.run(&["onboard", "alpha", "--gateway", "local"]).status.success());
    let plan = h.run(&["alpha", "rebuild", "--dry-run"]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let planned: Vec<(String, String)> = stdout(&plan)
        .lines()
        .filter_map(|l| {
            let (n, rest) = l.trim_start().split_once(". ")?;
            Some((n.to_owned(), rest.split_whitespace().next()?.to_owned()))
        })
        .collect();
    assert_eq!(planned.first(), Some(&("1".to_owned(), "snapshot".to_owned())), "{planned:?}");
    assert!(h.run(&["alpha", "rebuild", "--yes"]).status.success());
    let o = h.run(&["--json", "journal", "list"]);
    let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let run = doc["data"]["runs"][0]["id"].as_str().unwrap().to_owned();
    let show = stdout(&h.run(&["journal", "show", &run]));
    let steps: Vec<(String, String)> = show
        .lines()
        .skip_while(|l| *l != "Steps")
        .skip(2)
        .take_while(|l| !l.is_empty())
        .map(|l| {
            let mut w = l.split_whitespace();
            (w.next().unwrap().to_owned(), w.next().unwrap().to_owned())
        })
        .collect();
    assert_eq!(steps, planned, "journal show:\n{show}");
    // In JSON both count from 0, the journal's `steps.seq`.
    let seqs = |args: &[&str]| -> Vec<(i64, String)> {
        let doc: serde_json::Value = serde_json::from_str(&stdout(&h.run(args))).unwrap();
        doc["data"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let name = s["step"].as_str().or(s["name"].as_str()).unwrap().to_owned();
                (s["seq"].as_i64().unwrap(), name)
            })
            .collect()
    };
    let shown = seqs(&["--json", "journal", "show", &run]);
    assert_eq!(seqs(&["--json", "alpha", "rebuild", "--dry-run"]), shown);
    assert_eq!(shown[0].0, 0);

    std::fs::create_dir_all(h.path().join("state")).unwrap();
    std::fs::write(h.path().join("state/shields-alpha.json"), "{ not json").unwrap();
    let o = h.run(&["alpha", "status"]);
    let warning = stderr(&o).lines().find(|l| l.contains("is corrupt")).unwrap_or("").to_owned();
    assert!(warning.starts_with("warning: the shields file "), "{}", stderr(&o));
}

/// `--home` before the sandbox name wins over `NEMOCLAW_HOME` (the environment only fills in
/// what no flag says), and `--home` after the action wins over both.
#[test]
fn home_flag_before_the_name_beats_the_environment() {
    let h = Home::new();
    let other = Home::new();
    assert!(h.run(&["onboard", "alpha", "--gateway", "local"]).status.success());
    let here = h.path().to_str().unwrap();
    let status = |args: &[&str]| {
        let o = other.cmd().args(args).output().unwrap();
        (o.status.code(), stderr(&o))
    };
    // `other`'s NEMOCLAW_HOME has no alpha; the flags point at `h`.
    assert_eq!(status(&["--home", here, "alpha", "status"]).0, Some(0));
    assert_eq!(status(&["alpha", "status", "--home", here]).0, Some(0));
    let (code, err) =
        status(&["--home", here, "alpha", "status", "--home", other.path().to_str().unwrap()]);
    assert_eq!(code, Some(3), "the later flag wins: {err}");
    assert_eq!(status(&["alpha", "status"]).0, Some(3), "the environment alone");
}
