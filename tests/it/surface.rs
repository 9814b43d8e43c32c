//! The command-line surface, pinned: every `--help`, the usage errors a person meets, and
//! that nothing but `nemoclaw` gets installed. A change to any of them shows up as a snapshot
//! diff (`tests/it/snapshots/`) to be reviewed, not as a silent drift.

use std::process::Output;

use crate::common::{stderr, stdout, Home};

/// Run with no `NEMOCLAW_HOME` in the environment (clap would print its value in the help):
/// the home is `$HOME/.nemoclaw`, inside the test's directory.
fn run(h: &Home, args: &[&str]) -> Output {
    h.cmd().env_remove("NEMOCLAW_HOME").args(args).output().unwrap()
}

/// Every command path whose `--help` is pinned.
const HELP: &[&[&str]] = &[
    &[],
    &["onboard"],
    &["list"],
    &["recover"],
    &["journal"],
    &["journal", "list"],
    &["journal", "show"],
    &["journal", "export"],
    &["journal", "verify"],
    &["journal", "prune"],
    &["demo"],
    &["completion"],
    &["man"],
    &["alpha"],
    &["alpha", "status"],
    &["alpha", "rebuild"],
    &["alpha", "shields"],
    &["alpha", "shields", "up"],
    &["alpha", "shields", "down"],
    &["alpha", "shields", "status"],
    &["alpha", "destroy"],
];

#[test]
fn every_help_is_pinned() {
    let h = Home::new();
    for path in HELP {
        let mut args: Vec<&str> = path.to_vec();
        args.push("--help");
        let o = run(&h, &args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        let name =
            if path.is_empty() { "help".to_owned() } else { format!("help-{}", path.join("-")) };
        insta::assert_snapshot!(name, stdout(&o));
    }
}

/// Usage errors: exit 2, a message naming what is wrong, and nothing written to the home.
#[test]
fn usage_errors_are_pinned() {
    let h = Home::new();
    for (name, args) in [
        ("usage-typo-list", &["lst"][..]),
        ("usage-typo-journal", &["jornal", "list"]),
        ("usage-nemoclaw-only-action", &["alpha", "connect"]),
        ("usage-action-typo", &["alpha", "rebuld"]),
        ("usage-lone-name", &["alpha"]),
        ("usage-bad-name", &["Bad_Name", "status"]),
        ("usage-recover-both", &["recover", "--resume", "--rollback"]),
        ("usage-unknown-flag", &["list", "--frobnicate"]),
        ("usage-bad-duration", &["journal", "prune", "--older-than", "soon"]),
        ("usage-damaged-without-rollback", &["recover", "--accept-damaged-backup"]),
        ("usage-unknown-preset", &["onboard", "alpha", "--policy", "nmp"]),
        ("usage-bad-gateway", &["onboard", "alpha", "--gateway", "nemoclaw-8080"]),
    ] {
        let o = run(&h, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        insta::assert_snapshot!(name, stderr(&o));
    }
    let left: Vec<_> =
        std::fs::read_dir(h.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "a usage error wrote {left:?}");
}

/// The one installable binary is `nemoclaw`: no test helper is a `[[bin]]`.
#[test]
fn only_nemoclaw_is_installed() {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let bins: Vec<&str> = manifest
        .split("[[bin]]")
        .skip(1)
        .filter_map(|b| b.lines().find_map(|l| l.trim().strip_prefix("name = ")))
        .collect();
    assert_eq!(bins, ["\"nemoclaw\""]);
}

/// With `--json`, a failure is a document too (`type: error`: exit code, kind, message,
/// hints), for usage errors, refusals and corrupt files alike; "nothing to do" is a document.
#[test]
fn json_errors_and_nothing_to_do_are_documents() {
    let h = Home::new();
    let home = h.path().join(".nemoclaw");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("sandboxes.json"), "{ not json").unwrap();
    for (args, exit, kind) in [
        (&["--json", "lst"][..], 2, "usage"),
        (&["--json", "list", "--frobnicate"], 2, "usage"),
        (&["--json", "alpha", "status"], 65, "corrupt"),
    ] {
        let o = run(&h, args);
        assert_eq!(o.status.code(), Some(exit), "{args:?}: {}", stderr(&o));
        let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| {
            panic!("{args:?}: stdout is not one JSON document ({e}): {}", stdout(&o))
        });
        assert_eq!(doc["type"], "error", "{args:?}");
        assert_eq!(
            (doc["data"]["exit"].as_i64(), doc["data"]["kind"].as_str()),
            (Some(i64::from(exit)), Some(kind)),
            "{args:?}"
        );
        assert!(!doc["data"]["message"].as_str().unwrap_or("").is_empty(), "{args:?}");
    }
    std::fs::remove_file(home.join("sandboxes.json")).unwrap();
    let o = run(&h, &["--json", "alpha", "status"]);
    let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        (doc["data"]["kind"].as_str(), doc["data"]["hints"][0].is_string()),
        (Some("refused"), true)
    );
    let o = run(&h, &["--json", "recover", "--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(doc["data"]["nothing_to_do"], true);
}

/// Ask the binary for completions as bash's registration script does (`_CLAP_COMPLETE_INDEX`
/// = the word being completed), returning the candidates.
fn complete(h: &Home, words: &[&str]) -> Vec<String> {
    let o = h
        .cmd()
        .env("NEMOCLAW_COMPLETE", "bash")
        .env("_CLAP_COMPLETE_INDEX", (words.len() - 1).to_string())
        .env("_CLAP_IFS", "\n")
        .arg("--")
        .args(words)
        .output()
        .unwrap();
    assert!(o.status.success(), "{words:?}: {}", stderr(&o));
    stdout(&o).lines().map(str::to_owned).collect()
}

/// Completion knows the home: sandbox names in the `<NAME>` position and for `--sandbox`, run
/// ids after `recover` and `journal show`, the actions after a name; and the registration
/// scripts are what each shell sources.
#[test]
fn completion_offers_sandboxes_runs_and_actions() {
    let h = Home::new();
    for n in ["alpha", "beta"] {
        let o = h.run(&["onboard", n, "--gateway", "local"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = h.run(&["--json", "alpha", "rebuild", "--yes"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let run = doc["data"]["run_id"].as_str().expect("run_id").to_owned();

    let top = complete(&h, &["nemoclaw", ""]);
    for w in ["onboard", "recover", "journal", "completion", "alpha", "beta"] {
        assert!(top.contains(&w.to_owned()), "{w} not in {top:?}");
    }
    assert!(!top.contains(&"internal".to_owned()), "hidden command offered: {top:?}");
    assert_eq!(complete(&h, &["nemoclaw", "al"]), ["alpha"]);
    let actions = complete(&h, &["nemoclaw", "beta", ""]);
    assert_eq!(actions[..4], ["status", "rebuild", "shields", "destroy"], "{actions:?}");
    assert_eq!(complete(&h, &["nemoclaw", "alpha", "shields", "d"]), ["down"]);
    for words in [&["nemoclaw", "recover", ""][..], &["nemoclaw", "journal", "show", ""]] {
        let c = complete(&h, words);
        assert_eq!(c.first(), Some(&run), "{words:?}: {c:?}");
    }
    assert_eq!(complete(&h, &["nemoclaw", "recover", "--sandbox", ""]), ["alpha", "beta"]);

    for (shell, marker) in
        [("bash", "complete -o nospace"), ("zsh", "compdef"), ("fish", "complete --keep-order")]
    {
        let o = h.run(&["completion", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let script = stdout(&o);
        assert!(
            script.contains(marker) && script.contains("NEMOCLAW_COMPLETE"),
            "{shell}: {script}"
        );
    }
    // The bash script really registers: sourced in bash, `complete -p` shows it.
    if std::process::Command::new("bash").arg("--version").output().is_ok() {
        let o = std::process::Command::new("bash")
            .args(["-c", "source /dev/stdin; complete -p nemoclaw"])
            .stdin(
                std::fs::File::open({
                    let p = h.path().join("nemoclaw.bash");
                    std::fs::write(&p, stdout(&h.run(&["completion", "bash"]))).unwrap();
                    p
                })
                .unwrap(),
            )
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&o.stdout).contains("_clap_complete_nemoclaw"), "{o:?}");
    }
}

/// The man page is generated from the same definitions: every command and sandbox action is
/// in it.
#[test]
fn man_page_covers_every_command() {
    let h = Home::new();
    let o = run(&h, &["man"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let page = stdout(&o);
    assert!(
        page.starts_with(".ie") || page.contains(".TH nemoclaw"),
        "{}",
        &page[..200.min(page.len())]
    );
    for w in
        ["onboard", "recover", "journal", "completion", "<NAME>", "rebuild", "shields", "destroy"]
    {
        assert!(page.contains(w), "man page lacks {w}");
    }
}

/// Every `src/**/*.rs` file with its text.
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<(String, String)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap();
                out.push((rel.display().to_string(), std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
    assert!(out.len() > 20, "found only {} source files", out.len());
    out
}

/// All output goes through the printer: no `print!`/`eprint!` family anywhere else in `src/`.
#[test]
fn only_the_printer_writes_to_the_terminal() {
    let macros = ["println!(", "eprintln!(", "print!(", "eprint!("];
    let offenders: Vec<String> = sources()
        .into_iter()
        .filter(|(path, _)| path != "src/cli/printer.rs")
        .flat_map(|(path, text)| {
            text.lines()
                .enumerate()
                .filter(|(_, l)| {
                    macros.iter().any(|m| l.contains(m)) && !l.trim_start().starts_with("//")
                })
                .map(|(i, l)| format!("{path}:{}: {}", i + 1, l.trim()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(offenders.is_empty(), "output outside the printer:\n{}", offenders.join("\n"));
}

/// The CLI edge calls the library; it does not take locks, build step contexts or query the
/// journal's run tables itself.
#[test]
fn the_cli_does_not_reach_into_the_engine_or_the_run_tables() {
    let forbidden =
        ["engine::lock", "LockDir", "StepCtx", "journal::runs", "engine::start", "engine::resume"];
    let offenders: Vec<String> = sources()
        .into_iter()
        .filter(|(path, _)| path.starts_with("src/cli/"))
        .flat_map(|(path, text)| {
            forbidden
                .iter()
                .filter(|f| text.contains(*f))
                .map(|f| format!("{path} uses {f}"))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(offenders.is_empty(), "{}", offenders.join("\n"));
}

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

/// Replace what differs between runs with placeholders: the home's path, run and sandbox ids,
/// hashes, ISO times, and the numbers and words under keys that hold times, durations, pids,
/// hosts and users. The structure, the keys and every other value stay as they are.
fn normalise(v: &mut serde_json::Value, home: &str) {
    use serde_json::Value;
    const VOLATILE_NUMBERS: &[&str] = &[
        "now",
        "at",
        "created_at",
        "updated_at",
        "finished_at",
        "started_at",
        "acquired_at",
        "compensated_at",
        "duration_ms",
        "age_ms",
        "pid",
        "cutoff",
        "size",
        "mtime_ms",
    ];
    const VOLATILE_STRINGS: &[&str] = &["host", "user", "binary_version"];
    fn word(s: &str) -> String {
        let hex = |t: &str| t.chars().all(|c| c.is_ascii_hexdigit());
        let uuid = |t: &str| {
            let p: Vec<&str> = t.split('-').collect();
            p.len() == 5
                && p.iter().map(|x| x.len()).eq([8, 4, 4, 4, 12])
                && p.iter().all(|x| hex(x))
        };
        let iso = |t: &str| t.len() >= 20 && chrono_like(t);
        fn chrono_like(t: &str) -> bool {
            let b = t.as_bytes();
            b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && t.ends_with('Z')
        }
        // Split on the separators ids and times sit between, keep the separators.
        let mut out = String::new();
        let mut tok = String::new();
        let flush = |tok: &mut String, out: &mut String| {
            let t = tok.as_str();
            let r = if uuid(t) {
                "[id]"
            } else if t.len() == 64 && hex(t) {
                "[sha256]"
            } else if iso(t) {
                "[time]"
            } else if t.len() >= 12 && t.chars().all(|c| c.is_ascii_digit()) {
                "[n]"
            } else {
                t
            };
            out.push_str(r);
            tok.clear();
        };
        // A `:` inside an ISO time (`2026-06-01T10:00:00Z`) does not end the token.
        let in_time = |tok: &str| tok.as_bytes().get(10) == Some(&b'T');
        for c in s.chars() {
            let separator = c.is_whitespace() || "/:,()'`\"=@".contains(c);
            if separator && !(c == ':' && in_time(&tok)) {
                flush(&mut tok, &mut out);
                out.push(c);
            } else {
                tok.push(c);
            }
        }
        flush(&mut tok, &mut out);
        out
    }
    match v {
        Value::String(s) => {
            let bin = crate::common::bin();
            *s = word(&s.replace(bin.to_str().unwrap(), "nemoclaw").replace(home, "[home]"))
        }
        Value::Array(a) => a.iter_mut().for_each(|x| normalise(x, home)),
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if VOLATILE_NUMBERS.contains(&k.as_str()) && x.is_number() {
                    *x = Value::String("[n]".into());
                } else if VOLATILE_STRINGS.contains(&k.as_str()) && x.is_string() {
                    *x = Value::String(format!("[{k}]"));
                } else {
                    normalise(x, home);
                }
            }
        }
        _ => {}
    }
}

/// Every `--json` document type, pinned field by field (`tests/it/snapshots/*json-*.snap`),
/// and the types met here are exactly the ones docs/json.md documents.
#[test]
fn every_json_document_is_pinned() {
    use serde_json::Value;
    let h = Home::new();
    let home = h.path().to_str().unwrap().to_owned();
    let mut seen = std::collections::BTreeSet::new();
    let mut pin = |name: &str, env: &[(&str, &str)], args: &[&str], exit: i32| -> Value {
        let o = h.cmd().envs(env.iter().copied()).arg("--json").args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(exit), "{args:?}: {}", stderr(&o));
        let text = stdout(&o);
        let first = text.lines().next().unwrap_or("");
        let raw: Value = serde_json::from_str(first)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text}"));
        if !args.contains(&"export") {
            assert_eq!(text.lines().count(), 1, "{args:?}: one document: {text}");
        }
        assert_eq!(raw["schema_version"], 1, "{args:?}");
        let ty = raw["type"].as_str().expect("type").to_owned();
        seen.insert(ty.clone());
        let mut doc = raw.clone();
        normalise(&mut doc, &home);
        insta::assert_snapshot!(
            format!("json-{name}"),
            serde_json::to_string_pretty(&doc).unwrap()
        );
        raw
    };
    let none: &[(&str, &str)] = &[];
    pin("journal.prune-no-journal", none, &["journal", "prune", "--older-than", "30d"], 0);
    pin(
        "onboard",
        none,
        &["onboard", "alpha", "--gateway", "local", "--image", "img:1", "--policy", "npm"],
        0,
    );
    pin("list", none, &["list"], 0);
    pin("status", none, &["alpha", "status"], 0);
    pin("shields.up", none, &["alpha", "shields", "up"], 0);
    pin("shields.status", none, &["alpha", "shields", "status"], 0);
    pin("shields.down", none, &["alpha", "shields", "down", "--reason", "backup"], 0);
    pin("rebuild.plan", none, &["alpha", "rebuild", "--dry-run"], 0);
    pin("rebuild", none, &["alpha", "rebuild", "--yes"], 0);
    // A rebuild killed right after the old sandbox was deleted: recover lists it, then resumes.
    let killed = h
        .cmd()
        .env("NEMOCLAW_CRASHPOINT", "after_effect:4")
        .args(["alpha", "rebuild", "--yes"])
        .output()
        .unwrap();
    assert_ne!(killed.status.code(), Some(0), "{}", stderr(&killed));
    let listed = pin("recover.list", none, &["recover"], 0);
    assert_eq!(listed["data"]["unfinished"].as_array().map(Vec::len), Some(1), "{listed}");
    pin("error", none, &["alpha", "rebuild", "--yes"], 3);
    let done = pin("recover", none, &["recover", "--resume"], 0);
    assert_eq!(
        (done["data"]["state"].as_str(), done["data"]["nothing_to_do"].as_bool()),
        (Some("succeeded"), Some(false))
    );
    let nothing = pin("recover-nothing-to-do", none, &["recover", "--resume"], 0);
    assert_eq!(nothing["data"]["nothing_to_do"], true);
    std::fs::write(h.path().join("local-gateway/fault.json"), r#"{"health": "unreachable"}"#)
        .unwrap();
    pin("rebuild.refused", none, &["alpha", "rebuild", "--yes"], 3);
    std::fs::remove_file(h.path().join("local-gateway/fault.json")).unwrap();
    let synthetic =
        pin("internal.synthetic", none, &["internal", "synthetic", "run", "--steps", "1"], 0);
    pin("journal.list", none, &["journal", "list", "--limit", "2"], 0);
    // The smallest run there is: one synthetic step.
    pin(
        "journal.show",
        none,
        &["journal", "show", synthetic["data"]["run_id"].as_str().unwrap()],
        0,
    );
    pin("event", none, &["journal", "export"], 0);
    pin("journal.verify", none, &["journal", "verify"], 0);
    let later = (nemoclaw::util::now_ms() + 86_400_000).to_string();
    pin(
        "journal.prune",
        &[("NEMOCLAW_NOW_MS", &later)],
        &["journal", "prune", "--dry-run", "--older-than", "1h"],
        0,
    );
    pin("destroy", none, &["alpha", "destroy", "--yes"], 0);
    // The whole story in a scratch home: its steps' output goes to stderr, the document alone
    // to stdout.
    let scratch = h.path().join("demo-home");
    let demo = pin("demo", none, &["demo", "--dir", scratch.to_str().unwrap()], 0);
    assert_eq!(demo["data"]["restored"], true);

    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/json.md")).unwrap();
    let documented: std::collections::BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("### `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect();
    assert_eq!(seen, documented, "the types met and the types docs/json.md documents");
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

/// Handlers stay short (parse → confirm → call → print): no function in `src/cli/` is longer
/// than 60 lines, except the error→hint table, which is one `match` on purpose.
#[test]
fn cli_functions_are_at_most_60_lines() {
    let mut long = Vec::new();
    for (path, text) in sources().into_iter().filter(|(p, _)| p.starts_with("src/cli/")) {
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let l = lines[i];
            let indent = &l[..l.len() - l.trim_start().len()];
            let t = l.trim_start();
            let is_fn =
                t.starts_with("fn ") || t.starts_with("pub fn ") || t.starts_with("pub(crate) fn ");
            if is_fn && !l.trim_end().ends_with(';') {
                let end = format!("{indent}}}");
                let len = lines[i..].iter().position(|x| *x == end).map_or(0, |n| n + 1);
                let name =
                    t.split("fn ").nth(1).and_then(|r| r.split(['(', '<']).next()).unwrap_or("");
                if len > 60 && !(path == "src/cli/error.rs" && name == "from") {
                    long.push(format!("{path}: {name} is {len} lines"));
                }
                i += len.max(1);
            } else {
                i += 1;
            }
        }
    }
    assert!(long.is_empty(), "{}", long.join("\n"));
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
