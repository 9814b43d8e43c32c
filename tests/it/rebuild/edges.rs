//! The command line's edges on a real home: corrupt host files, typos and logging, control
//! characters in output.

use super::*;

/// A mistyped command is not taken for a sandbox name, a NemoClaw action this tool lacks says
/// so, `help <action>` shows the action's usage, and `-v` after the action (or `RUST_LOG`)
/// shows the journal's commits. Nothing is written by a usage error.
#[test]
fn command_line_edges_suggest_explain_and_log() {
    let w = World::new(Opts::default());
    let b = w.snapshot();
    for (args, want) in [
        (&["lst"][..], "a similar command exists: 'list'"),
        (&["recovr"], "a similar command exists: 'recover'"),
        (&["jornal", "list"], "a similar command exists: 'journal'"),
        (&["alpha", "connect"], "`connect` is a NemoClaw command that nemoclaw does not implement"),
        (&["alpha", "rebuld"], "a similar subcommand exists: 'rebuild'"),
    ] {
        let o = w.home.run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
    assert_eq!(w.registry_bytes(), b.registry, "usage errors write nothing");
    assert!(!w.path().join("journal.sqlite3").exists(), "no journal was created");
    let o = w.home.run(&["help", "rebuild"]);
    assert!(stdout(&o).contains("Usage: nemoclaw <NAME> rebuild [OPTIONS]"), "{}", stdout(&o));
    let o = w.home.run(&["alpha", "status", "-v"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = w.home.run(&["alpha", "rebuild", "--yes", "-v"]);
    assert_ok(&o);
    assert!(stderr(&o).contains("journal: committed `"), "{}", stderr(&o));
    let o = w
        .home
        .cmd()
        .env("RUST_LOG", "nemoclaw=info")
        .args(["alpha", "rebuild", "--yes"])
        .output()
        .unwrap();
    assert_ok(&o);
    assert!(stderr(&o).contains("journal: committed `"), "{}", stderr(&o));
    let o = w
        .home
        .cmd()
        .env_remove("RUST_LOG")
        .env_remove("NEMOCLAW_LOG")
        .args(["alpha", "rebuild", "--yes"])
        .output()
        .unwrap();
    assert!(!stderr(&o).contains("journal: committed"), "quiet without -v: {}", stderr(&o));
}

/// Control characters from the registry, a gateway's error text and the journal are written
/// out as escapes in human output (no OSC retitling, no `\r` overwriting a line), while
/// `--json` keeps the exact text.
#[test]
fn control_characters_never_reach_the_terminal() {
    let w = World::new(Opts::default());
    let evil = "x\u{1b}]0;pwned\u{7}\rFAKE\u{0}";
    let mut reg = w.registry();
    reg["sandboxes"]["alpha"]["model"] = json!(evil);
    reg["sandboxes"][format!("bad{evil}")] = json!({"name": "bad"});
    std::fs::write(w.path().join("sandboxes.json"), serde_json::to_vec_pretty(&reg).unwrap())
        .unwrap();
    w.fault(json!({"fail": {"download": format!("ssh said {evil}")}}));
    let o = w.rebuild();
    w.clear_fault();
    let id = runs(w.path()).last().unwrap().0.clone();
    let human = [
        w.home.run(&["list"]),
        o,
        w.home.run(&["journal", "show", &id]),
        w.home.run(&["alpha", "status"]),
    ];
    for (i, o) in human.iter().enumerate() {
        for (what, bytes) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
            let bad: Vec<u8> =
                bytes.iter().copied().filter(|b| matches!(b, 0 | 7 | 0x1b | b'\r')).collect();
            assert!(
                bad.is_empty(),
                "output {i} {what} carries control bytes {bad:?}: {}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
    assert!(stdout(&human[0]).contains("x\\x1b]0;pwned\\x07\\rFAKE\\x00"), "{}", stdout(&human[0]));
    assert!(stderr(&human[1]).contains("ssh said x\\x1b]0;pwned"), "{}", stderr(&human[1]));
    let j = w.home.run(&["--json", "list"]);
    let doc: Value = serde_json::from_slice(&j.stdout).unwrap();
    let alpha = doc["data"]["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "alpha")
        .unwrap()
        .clone();
    assert_eq!(alpha["model"], evil, "JSON keeps the exact text");
}
