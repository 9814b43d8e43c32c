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
