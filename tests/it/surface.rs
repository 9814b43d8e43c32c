//! The command-line surface, pinned: every `--help`, the usage errors a person meets, and
//! that nothing but `nemoclaw` gets installed. A change to any of them shows up as a snapshot
//! diff (`tests/it/snapshots/`) to be reviewed, not as a silent drift.

use std::process::Output;

use crate::common::{stderr, stdout, Home};

/// Run with no `NEMOCLAW_HOME` in the environment (clap would print its value in the help):
/// the home is `$HOME/.nemoclaw`, inside the test's directory.
pub(crate) fn run(h: &Home, args: &[&str]) -> Output {
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
        ("usage-openshell-where-it-means-nothing", &["journal", "list", "--openshell", "/x"]),
        ("usage-presets-on-status", &["alpha", "status", "--policy-presets", "/x"]),
        (
            "usage-unreadable-presets-dir",
            &["onboard", "alpha", "--policy", "npm", "--policy-presets", "/nonexistent/presets"],
        ),
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
    assert_eq!(complete(&h, &["nemoclaw", "journal", "show", ""]).first(), Some(&run));
    // `recover` offers only runs there is something to recover: none yet, then the one a
    // SIGKILL left unfinished.
    assert!(!complete(&h, &["nemoclaw", "recover", ""]).contains(&run), "a finished run offered");
    let o = h
        .cmd()
        .env("NEMOCLAW_CRASHPOINT", "after_outcome:2")
        .args(["beta", "rebuild", "--yes"])
        .output()
        .unwrap();
    assert!(crate::common::killed(&o), "{}", stderr(&o));
    let doc: serde_json::Value =
        serde_json::from_str(&stdout(&h.run(&["--json", "recover"]))).unwrap();
    let unfinished = doc["data"]["unfinished"][0]["run_id"].as_str().expect("run_id").to_owned();
    let offered = complete(&h, &["nemoclaw", "recover", ""]);
    assert!(offered.contains(&unfinished) && !offered.contains(&run), "{offered:?}");
    let shown = complete(&h, &["nemoclaw", "journal", "show", ""]);
    assert_eq!(shown[..2], [unfinished, run], "journal show offers every run, newest first");
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

/// All output goes through the printer: no `print!`/`eprint!` family, `io::stdout()` or
/// `anstream` stream anywhere else in `src/` (the styling module excepted).
#[test]
fn only_the_printer_writes_to_the_terminal() {
    let macros = ["println!(", "eprintln!(", "print!(", "eprint!(", "io::stdout()", "anstream::"];
    let offenders: Vec<String> = sources()
        .into_iter()
        .filter(|(path, _)| path != "src/cli/printer.rs" && path != "src/cli/style.rs")
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
