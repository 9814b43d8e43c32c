//! The driver's parsers against the real `openshell` CLI (v0.0.111): every recorded transcript
//! in `tests/fixtures/openshell-transcripts/` (copied from the real binary's recordings) is fed
//! to the classifier the driver uses for that command, and the verdict must be the one a person
//! reading the transcript would give. A new transcript without a verdict fails the test.

use std::collections::BTreeMap;
use std::path::PathBuf;

use nemoclaw::gateway::classify::{
    classify_get, classify_status, error_text, parse_active_gateway, parse_list, parse_sandbox,
    CallOutput, ErrorText, Version,
};
use nemoclaw::gateway::{Liveness, Unhealthy};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openshell-transcripts")
}

fn liveness(l: &Liveness) -> String {
    match l {
        Liveness::Present(s) => format!("present:{}:{}", s.name, s.phase),
        Liveness::Missing => "missing".into(),
        Liveness::Unknown { .. } => "unknown".into(),
        Liveness::Unhealthy { reason, .. } => format!("unhealthy:{reason:?}").to_lowercase(),
    }
}

fn text(e: Option<ErrorText>) -> String {
    match e {
        None => "other".into(),
        Some(e) => format!("{e:?}").to_lowercase(),
    }
}

/// The driver's reading of one recorded call.
fn verdict(argv: &[String], out: &CallOutput) -> String {
    let a: Vec<&str> = argv.iter().skip(1).map(String::as_str).collect();
    let gw = a.windows(2).find(|w| w[0] == "-g").map(|w| w[1]).unwrap_or("nemoclaw");
    match a.as_slice() {
        ["--version"] => format!("version:{}", Version::parse(&out.stdout).unwrap()),
        ["gateway", "add" | "select", ..] => "not-used".into(),
        ["gateway", "list", ..] => {
            format!("active:{}", parse_active_gateway(&out.stdout).unwrap_or_default())
        }
        ["status", ..] => match classify_status(out, gw) {
            None => "healthy".into(),
            Some(l) => liveness(&l),
        },
        ["sandbox", "get", name, ..] => liveness(&classify_get(out, name, true)),
        ["sandbox", "list", ..] if out.ok() => {
            format!("list:{}", parse_list(&out.stdout).map(|l| l.len()).unwrap())
        }
        ["sandbox", "create", ..] if out.ok() => match parse_sandbox(&out.stdout) {
            Ok(s) => format!("created:{}:{}", s.name, s.phase),
            // Table output (no `-o json`) carries no object: the driver polls `get`.
            Err(_) => "created:poll".into(),
        },
        _ if out.ok() => "ok".into(),
        _ => text(error_text(&out.text())),
    }
}

/// Expected verdicts, by transcript number.
const EXPECTED: &[(&str, &str)] = &[
    ("01", "not-used"),
    ("02", "version:0.0.111"),
    ("03", "healthy"),
    ("04", "healthy"),
    ("05", "healthy"),
    ("06", "healthy"),
    ("07", "active:nemoclaw"),
    ("08", "not-used"),
    ("09", "active:other"),
    // Plain `status` against a refused active gateway: exit 1, connect error, no JSON.
    ("10", "unhealthy:unreachable"),
    ("11", "healthy"),
    ("12", "not-used"),
    ("13", "unhealthy:unreachable"),
    ("14", "unhealthy:unreachable"),
    ("15", "unhealthy:unreachable"),
    ("16", "present:alpha:Ready"),
    // Table form ends with a `Policy:` YAML block whose `name:` keys are not the sandbox's.
    ("17", "present:alpha:Ready"),
    ("18", "missing"),
    ("19", "missing"),
    ("20", "list:0"),
    ("21", "list:0"),
    ("22", "list:1"),
    ("23", "list:1"),
    ("24", "list:100"),
    ("25", "list:50"),
    ("26", "list:100"),
    ("27", "list:50"),
    ("28", "list:100"),
    ("29", "created:alpha:Ready"),
    ("30", "created:poll"),
    ("31", "alreadyexists"),
    ("32", "alreadyexists"),
    ("33", "other"),
    ("34", "ok"),
    ("35", "notfound"),
    ("36", "ok"),
    ("37", "present:alpha:Deleting"),
    ("38", "other"),
    ("39", "ok"),
    ("40", "ok"),
    ("41", "ok"),
    ("42", "ok"),
    ("43", "other"),
    ("44", "notfound"),
    ("45", "notfound"),
    ("46", "ok"),
    ("47", "ok"),
    ("48", "other"),
    ("49", "notfound"),
    ("50", "notfound"),
    ("51", "unhealthy:auth"),
    ("52", "unhealthy:auth"),
    ("53", "unhealthy:auth"),
    ("54", "auth"),
    ("55", "auth"),
    ("56", "auth"),
    ("57", "auth"),
    ("58", "auth"),
    ("59", "auth"),
    // gRPC Health failed, HTTP `/healthz` answered: not a known-good state.
    ("60", "unhealthy:auth"),
    ("61", "unhealthy:unreachable"),
    ("62", "unhealthy:unreachable"),
    ("63", "unhealthy:unreachable"),
    ("64", "unhealthy:unreachable"),
    // Wrapped reports: `'<name>'` / `│ already exists` and `already` / `│ exists`.
    ("65", "alreadyexists"),
    ("66", "alreadyexists"),
    ("67", "alreadyexists"),
    ("68", "missing"),
    ("69", "unhealthy:unreachable"),
    ("70", "unhealthy:unreachable"),
    ("71", "unhealthy:unreachable"),
    ("72", "transport"),
    ("73", "transport"),
    ("74", "transport"),
    ("75", "transport"),
    ("76", "transport"),
    ("77", "transport"),
    ("78", "active:nemoclaw"),
];

#[test]
fn every_transcript_classifies_as_a_person_would() {
    let want: BTreeMap<&str, &str> = EXPECTED.iter().copied().collect();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.ends_with(".json") && n.as_bytes()[0].is_ascii_digit()
        })
        .collect();
    files.sort();
    assert_eq!(files.len(), 78, "all 78 recorded transcripts are in the fixtures");
    let mut wrong = Vec::new();
    for f in &files {
        let t: Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
        let argv: Vec<String> =
            t["argv"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
        let out = CallOutput::exited(
            t["exit"].as_i64().unwrap() as i32,
            t["stdout"].as_str().unwrap(),
            t["stderr"].as_str().unwrap(),
        );
        let num = &f.file_name().unwrap().to_string_lossy()[..2];
        let got = verdict(&argv, &out);
        match want.get(num) {
            Some(w) if *w == got => {}
            w => wrong.push(format!("{num} {}: got {got}, want {w:?}", argv.join(" "))),
        }
    }
    assert!(wrong.is_empty(), "transcripts misread:\n{}", wrong.join("\n"));
}

/// The wrapped already-exists report of a 52-character name reads as ALREADY_EXISTS only after
/// the report's continuation lines are joined: the raw text has no "already exists".
#[test]
fn wrapped_report_is_joined_before_matching() {
    let t: Value = serde_json::from_slice(
        &std::fs::read(dir().join("67-create-exists-52name-json.json")).unwrap(),
    )
    .unwrap();
    let err = t["stderr"].as_str().unwrap();
    assert!(!err.contains("already exists"), "the transcript really is wrapped mid-phrase");
    assert_eq!(error_text(err), Some(ErrorText::AlreadyExists));
}

#[test]
fn unavailable_is_unhealthy_not_unknown() {
    let t: Value =
        serde_json::from_slice(&std::fs::read(dir().join("63-unavailable-get-json.json")).unwrap())
            .unwrap();
    let out = CallOutput::exited(1, "", t["stderr"].as_str().unwrap());
    assert!(matches!(
        classify_get(&out, "alpha", true),
        Liveness::Unhealthy { reason: Unhealthy::Unreachable, .. }
    ));
}
