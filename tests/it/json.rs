//! Every `--json` document, pinned: one snapshot per type (`tests/it/snapshots/it__json__*.snap`),
//! with what differs between runs normalised, checked against the types docs/json.md lists;
//! failures and "nothing to do" are documents too.

use crate::common::{stderr, stdout, Home};
use crate::surface::run;

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
        insta::assert_snapshot!(name, serde_json::to_string_pretty(&doc).unwrap());
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
