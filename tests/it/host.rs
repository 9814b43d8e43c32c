//! Integration tests: NemoClaw host files (registry compatibility and lock, shields, session,
//! backups) and the sandbox commands (`onboard`, `list`, `status`, `shields`, `destroy`) run as
//! real child processes.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nemoclaw::exit::{Exit, ExitCoded};
use nemoclaw::host::backup::{backup_timestamp, BackupMeta, Keeps, MANIFEST_FILE};
use nemoclaw::host::{registry, tree_digest, Backup, HostError, OnboardSession, Registry};
use nemoclaw::names::SandboxName;
use rstest::rstest;
use serde_json::{json, Value};

use crate::common::{stderr, stdout, Home};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sandboxes.json");
const SESSION_FIXTURE: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/onboard-session.json");

fn name(s: &str) -> SandboxName {
    SandboxName::parse(s).unwrap()
}

fn home_with_fixture() -> (tempfile::TempDir, Vec<u8>) {
    let t = tempfile::tempdir().unwrap();
    let bytes = fs::read(FIXTURE).unwrap();
    fs::write(t.path().join("sandboxes.json"), &bytes).unwrap();
    (t, bytes)
}

fn parse(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

/// Keys of an object, in file order.
fn keys(v: &Value) -> Vec<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn noop_round_trip_of_a_nemoclaw_registry_is_byte_identical() {
    let (t, before) = home_with_fixture();
    registry::update(t.path(), |_| Ok(())).unwrap();
    assert_eq!(fs::read(t.path().join("sandboxes.json")).unwrap(), before);
    // And with a trailing newline, which is kept.
    let mut nl = before.clone();
    nl.push(b'\n');
    fs::write(t.path().join("sandboxes.json"), &nl).unwrap();
    registry::update(t.path(), |_| Ok(())).unwrap();
    assert_eq!(fs::read(t.path().join("sandboxes.json")).unwrap(), nl);
}

#[test]
fn modifying_one_row_changes_only_that_row() {
    let (t, before) = home_with_fixture();
    let old = parse(&before);
    registry::update(t.path(), |reg| {
        let mut row = reg.entry(&name("my-assistant")).unwrap().clone();
        row["imageTag"] = json!("openshell/sandbox-from:1780000000");
        row["addedByRebuild"] = json!(true);
        reg.set_entry(&name("my-assistant"), row);
        Ok(())
    })
    .unwrap();
    let after = fs::read(t.path().join("sandboxes.json")).unwrap();
    let new = parse(&after);
    // Top-level and row order are unchanged, the touched row kept its position.
    assert_eq!(keys(&new), keys(&old));
    assert_eq!(keys(&new["sandboxes"]), ["my-assistant", "work-bot", "scratch"]);
    for other in ["work-bot", "scratch"] {
        assert_eq!(
            serde_json::to_string_pretty(&new["sandboxes"][other]).unwrap(),
            serde_json::to_string_pretty(&old["sandboxes"][other]).unwrap(),
            "row {other} changed"
        );
        assert_eq!(keys(&new["sandboxes"][other]), keys(&old["sandboxes"][other]));
    }
    assert_eq!(new["registryExtension"], old["registryExtension"]);
    assert_eq!(new["defaultSandbox"], "work-bot");
    // The touched row: every old field verbatim and in order, then the new one.
    let row = &new["sandboxes"]["my-assistant"];
    let mut want_keys = keys(&old["sandboxes"]["my-assistant"]);
    want_keys.push("addedByRebuild".into());
    assert_eq!(keys(row), want_keys);
    assert_eq!(row["futureField"], old["sandboxes"]["my-assistant"]["futureField"]);
    assert_eq!(row["customPolicies"], old["sandboxes"]["my-assistant"]["customPolicies"]);
    // Byte level: the file is exactly the original document with that one row replaced.
    let mut expected = old.clone();
    expected["sandboxes"]["my-assistant"] = row.clone();
    assert_eq!(String::from_utf8(after).unwrap(), serde_json::to_string_pretty(&expected).unwrap());
}

#[test]
fn removing_rows_keeps_order_and_moves_the_default_to_the_first_remaining_row() {
    let (t, before) = home_with_fixture();
    let old = parse(&before);
    // Removing the first row must not swap the last one into its place.
    registry::update(t.path(), |reg| Ok(reg.remove_entry(&name("my-assistant")))).unwrap();
    let reg = Registry::load(t.path()).unwrap();
    assert_eq!(reg.names(), ["work-bot", "scratch"]);
    assert_eq!(reg.default_sandbox(), Some("work-bot"));
    let removed =
        registry::update(t.path(), |reg| Ok(reg.remove_entry(&name("work-bot")))).unwrap();
    assert_eq!(removed.unwrap(), old["sandboxes"]["work-bot"]);
    let reg = Registry::load(t.path()).unwrap();
    assert_eq!(reg.default_sandbox(), Some("scratch"));
    assert_eq!(reg.entry(&name("scratch")).unwrap(), &old["sandboxes"]["scratch"]);
    assert_eq!(keys(reg.document()), keys(&old));
}

#[rstest]
#[case::garbage("{ this is not json")]
#[case::truncated("{\"sandboxes\": {\"a\": {\"name\": \"a\"}")]
#[case::array("[]")]
#[case::sandboxes_not_object("{\"sandboxes\": [], \"defaultSandbox\": null}")]
fn corrupt_registry_is_refused_and_left_untouched(#[case] content: &str) {
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("sandboxes.json");
    fs::write(&file, content).unwrap();
    let e = Registry::load(t.path()).unwrap_err();
    assert_eq!(e.exit(), Exit::Corrupt);
    assert!(e.to_string().contains(&file.display().to_string()), "{e}");
    let e = registry::update(t.path(), |_| Ok(())).unwrap_err();
    assert!(matches!(e, HostError::Corrupt { .. }));
    assert_eq!(fs::read_to_string(&file).unwrap(), content);
    assert!(!t.path().join("sandboxes.json.lock").exists(), "lock must be released");
}

#[test]
fn onboard_session_is_read_and_corrupt_one_refused() {
    let t = tempfile::tempdir().unwrap();
    assert!(OnboardSession::load(t.path()).unwrap().is_none());
    fs::copy(SESSION_FIXTURE, t.path().join("onboard-session.json")).unwrap();
    let s = OnboardSession::load(t.path()).unwrap().unwrap();
    assert!(s.belongs_to("my-assistant") && !s.belongs_to("work-bot"));
    assert_eq!(s.from_dockerfile(), Some("/home/op/Dockerfile"));
    assert_eq!(s.credential_env(), Some("NVIDIA_API_KEY"));
    assert_eq!(s.gateway_name(), Some("nemoclaw"));
    for bad in ["{nope", r#"{"version": 2, "sandboxName": "x"}"#] {
        let p = t.path().join("onboard-session.json");
        fs::write(&p, bad).unwrap();
        let e = OnboardSession::load(t.path()).unwrap_err();
        assert_eq!(e.exit(), Exit::Corrupt);
        assert!(e.to_string().contains("onboard-session.json"), "{e}");
        assert_eq!(fs::read_to_string(&p).unwrap(), bad);
    }
}

// ---------------------------------------------------------------------------------------------
// Backups.

fn state_tree(dir: &Path) {
    fs::create_dir_all(dir.join("workspace/skills")).unwrap();
    fs::create_dir_all(dir.join("memory")).unwrap();
    fs::write(dir.join("workspace/AGENTS.md"), "# agents\n").unwrap();
    fs::write(dir.join("workspace/skills/s.py"), "print('hi')\n").unwrap();
    fs::write(dir.join("memory/2026-06-01.md"), vec![b'x'; 70_000]).unwrap();
    std::os::unix::fs::symlink("../memory/2026-06-01.md", dir.join("workspace/today")).unwrap();
}

fn meta() -> BackupMeta {
    BackupMeta {
        sandbox: name("demo"),
        agent_type: None,
        agent_version: Some("2026.5.1".into()),
        policy_presets: vec!["npm".into()],
        custom_policies: json!([{"name": "corp-proxy", "content": "version: 1\n"}]),
    }
}

#[test]
fn backup_round_trip_verifies_digests_and_commits_the_manifest_last() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    state_tree(&src);
    let ts = backup_timestamp(1_780_999_331_399);
    let b = Backup::create(t.path(), &meta(), &ts, &src).unwrap();
    assert!(b.path.ends_with("rebuild-backups/demo/2026-06-09T10-02-11-399Z"));
    let mbytes = fs::read(b.path.join(MANIFEST_FILE)).unwrap();
    assert_eq!(b.manifest_digest, nemoclaw::util::sha256_hex(&mbytes));
    let m: Value = parse(&mbytes);
    for k in [
        "version",
        "sandboxName",
        "timestamp",
        "agentType",
        "agentVersion",
        "stateDirs",
        "backedUpDirs",
        "backupPath",
        "policyPresets",
        "customPolicies",
        "files",
        "complete",
    ] {
        assert!(m.get(k).is_some(), "manifest lacks {k}");
    }
    assert_eq!(m["agentType"], "openclaw");
    assert_eq!(m["stateDirs"], json!(["memory", "workspace"]));
    assert_eq!(m["files"].as_array().unwrap().len(), 4);
    let opened = Backup::open(&b.path).unwrap();
    assert_eq!(opened.manifest_digest, b.manifest_digest);
    opened.verify().unwrap();
    let out = t.path().join("restored");
    opened.copy_out(&out).unwrap();
    assert_eq!(tree_digest(&out).unwrap(), tree_digest(&src).unwrap());
    opened.verify_tree(&out, Keeps::ALL).unwrap();
    assert_eq!(Backup::list(t.path(), &name("demo")).unwrap().len(), 1);
    // A flipped byte is caught.
    fs::write(b.path.join("workspace/AGENTS.md"), "# agentz\n").unwrap();
    assert!(opened.verify().is_err());
    assert!(opened.verify_tree(&b.path, Keeps::ALL).is_err());
    // Modes and permissions: backup dirs and files are private.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(&b.path).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(
        fs::metadata(t.path().join("rebuild-backups")).unwrap().permissions().mode() & 0o777,
        0o700
    );
}

#[test]
fn a_backup_without_a_complete_manifest_is_never_used() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    state_tree(&src);
    let b = Backup::create(t.path(), &meta(), "2026-06-09T10-02-11-399Z", &src).unwrap();
    let mpath = b.path.join(MANIFEST_FILE);
    let mut m: Value = parse(&fs::read(&mpath).unwrap());
    m["complete"] = json!(false);
    fs::write(&mpath, m.to_string()).unwrap();
    assert!(Backup::open(&b.path).is_err());
    fs::remove_file(&mpath).unwrap();
    assert!(Backup::open(&b.path).unwrap_err().to_string().contains("incomplete"));
    assert!(Backup::list(t.path(), &name("demo")).unwrap().is_empty());
}

#[test]
fn a_manifest_listing_dotdot_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    state_tree(&src);
    let b = Backup::create(t.path(), &meta(), "2026-06-09T10-02-11-399Z", &src).unwrap();
    let mpath = b.path.join(MANIFEST_FILE);
    let mut m: Value = parse(&fs::read(&mpath).unwrap());
    m["files"][0]["path"] = json!("../../../etc/passwd");
    fs::write(&mpath, m.to_string()).unwrap();
    let e = Backup::open(&b.path).unwrap_err();
    assert!(e.to_string().contains("../../../etc/passwd"), "{e}");
    assert_eq!(e.exit(), Exit::Refused);
}

#[rstest]
#[case::escaping_symlink("escape")]
#[case::absolute_symlink("absolute")]
#[case::fifo("fifo")]
fn unsafe_state_is_refused_before_anything_is_copied(#[case] what: &str) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    state_tree(&src);
    let bad = src.join("workspace/bad");
    match what {
        "escape" => std::os::unix::fs::symlink("../../../outside", &bad).unwrap(),
        "absolute" => std::os::unix::fs::symlink("/etc/passwd", &bad).unwrap(),
        _ => {
            let c = std::ffi::CString::new(bad.to_str().unwrap()).unwrap();
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        }
    }
    let e = Backup::create(t.path(), &meta(), "2026-06-09T10-02-11-399Z", &src).unwrap_err();
    assert!(e.to_string().contains("workspace/bad"), "{e}");
    assert!(!t.path().join("rebuild-backups/demo/2026-06-09T10-02-11-399Z").exists());
}

// ---------------------------------------------------------------------------------------------
// The sandbox commands, as an operator runs them.

/// A command with no `openshell` anywhere on PATH.
fn cmd(h: &Home) -> Command {
    let mut c = h.cmd();
    c.env("PATH", "/usr/bin:/bin");
    c
}

fn run(h: &Home, args: &[&str]) -> std::process::Output {
    cmd(h).args(args).output().unwrap()
}

#[test]
fn onboard_list_status_on_a_fresh_home_without_openshell() {
    let h = Home::new();
    let o = run(&h, &["onboard", "demo", "--policy", "npm"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("✓ Sandbox 'demo' created on gateway 'local'"));
    let o = run(&h, &["list"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("* demo") && stdout(&o).contains("local"), "{}", stdout(&o));
    let o = run(&h, &["demo", "status"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("Live:      present"), "{}", stdout(&o));
    // Readable without colour: not one escape sequence anywhere.
    assert!(!stdout(&o).contains('\x1b') && !stderr(&o).contains('\x1b'));
    let o = run(&h, &["--color", "always", "list"]);
    assert!(stdout(&o).contains("\x1b[1m"), "colour requested but absent");

    // The registry row is NemoClaw-shaped, the sandbox holds the sample state.
    let reg: Value = parse(&fs::read(h.path().join("sandboxes.json")).unwrap());
    assert_eq!(reg["defaultSandbox"], "demo");
    let row = &reg["sandboxes"]["demo"];
    for k in ["name", "createdAt", "model", "provider", "policies", "imageTag", "gatewayName"] {
        assert!(row.get(k).is_some(), "row lacks {k}");
    }
    assert_eq!(row["gatewayName"], "local");
    assert!(row.get("gatewayPort").is_none());
    assert!(h.path().join("local-gateway/sandboxes/demo/state/workspace/AGENTS.md").is_file());
    let meta: Value =
        parse(&fs::read(h.path().join("local-gateway/sandboxes/demo/meta.json")).unwrap());
    assert_eq!(meta["policies"][0]["name"], "npm");

    // --json documents parse and carry the schema version.
    let o = run(&h, &["list", "--json"]);
    let doc: Value = parse(&o.stdout);
    assert_eq!(doc["schema_version"], 1);
    assert_eq!(doc["data"]["sandboxes"][0]["name"], "demo");
    let o = run(&h, &["demo", "status", "--json"]);
    let doc: Value = parse(&o.stdout);
    assert_eq!(doc["type"], "status");
    assert_eq!(doc["data"]["live"]["status"], "present");
    assert_eq!(doc["data"]["gateway"], "local");

    let o = run(&h, &["onboard", "second", "--gateway", "local", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let doc: Value = parse(&o.stdout);
    assert_eq!(
        (doc["type"].clone(), doc["data"]["sandbox"]["phase"].clone()),
        (json!("onboard"), json!("Ready"))
    );
    assert_eq!(doc["data"]["entry"]["gatewayName"], "local");
    assert!(stderr(&o).is_empty(), "--json keeps stderr for errors: {}", stderr(&o));
    let reg: Value = parse(&fs::read(h.path().join("sandboxes.json")).unwrap());
    assert_eq!(reg["defaultSandbox"], "demo", "an existing default is kept");

    // Onboarding the same name again is refused; nothing changes.
    let before = fs::read(h.path().join("sandboxes.json")).unwrap();
    assert_eq!(run(&h, &["onboard", "demo"]).status.code(), Some(3));
    assert_eq!(fs::read(h.path().join("sandboxes.json")).unwrap(), before);
}

#[test]
fn status_of_a_reaped_sandbox_explains_and_removes_nothing() {
    let h = Home::new();
    assert_eq!(run(&h, &["onboard", "demo"]).status.code(), Some(0));
    let before = fs::read(h.path().join("sandboxes.json")).unwrap();
    fs::remove_dir_all(h.path().join("local-gateway/sandboxes/demo")).unwrap();
    let o = run(&h, &["demo", "status"]);
    assert_eq!(o.status.code(), Some(0));
    let err = stderr(&o);
    assert!(err.contains("is registered locally but not present in the live gateway"), "{err}");
    assert!(
        err.contains("Your local registry entry has been preserved — nothing was removed."),
        "{err}"
    );
    assert!(err.contains("nemoclaw demo rebuild --yes"), "{err}");
    assert_eq!(fs::read(h.path().join("sandboxes.json")).unwrap(), before);
    // An unhealthy gateway is not a missing sandbox.
    fs::write(h.path().join("local-gateway/fault.json"), r#"{"health":"unreachable"}"#).unwrap();
    let o = run(&h, &["demo", "status"]);
    assert!(stderr(&o).contains("Could not confirm live state of 'demo'"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("not present in the live gateway"));
}

#[rstest]
#[case::traversal(&["../x", "status"])]
#[case::upper(&["A", "status"])]
#[case::leading_dash(&["-a", "status"])]
#[case::too_long(&["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "destroy", "--yes"])]
#[case::shell(&["a;rm", "shields", "up"])]
#[case::onboard_traversal(&["onboard", "../x"])]
#[case::onboard_shell(&["onboard", "a;rm"])]
#[case::onboard_upper(&["onboard", "A"])]
#[case::onboard_bad_gateway(&["onboard", "ok", "--gateway", "nemoclaw-8080"])]
fn invalid_input_is_a_usage_error_before_any_io(#[case] args: &[&str]) {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let o = Command::new(crate::common::bin())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", t.path())
        .env("NEMOCLAW_HOME", &home)
        .args(args)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!home.exists(), "the home directory must not even be created");
}

#[test]
fn corrupt_host_files_exit_65_naming_the_file_and_stay_untouched() {
    let h = Home::new();
    let reg = h.path().join("sandboxes.json");
    fs::write(&reg, "{ corrupt").unwrap();
    for args in
        [&["list"][..], &["onboard", "demo"], &["demo", "status"], &["demo", "destroy", "--yes"]]
    {
        let o = run(&h, args);
        assert_eq!(o.status.code(), Some(65), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(&reg.display().to_string()), "{}", stderr(&o));
        assert_eq!(fs::read_to_string(&reg).unwrap(), "{ corrupt");
    }
    assert!(!h.path().join("local-gateway/sandboxes/demo").exists());

    fs::remove_file(&reg).unwrap();
    assert_eq!(run(&h, &["onboard", "demo"]).status.code(), Some(0));
    let sh = h.path().join("state/shields-demo.json");
    fs::create_dir_all(h.path().join("state")).unwrap();
    fs::write(&sh, "{\"shieldsDown\": fal").unwrap();
    for args in [
        &["demo", "shields", "status"][..],
        &["demo", "shields", "up"],
        &["demo", "shields", "down"],
    ] {
        let o = run(&h, args);
        assert_eq!(o.status.code(), Some(65), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(&sh.display().to_string()));
        assert_eq!(fs::read_to_string(&sh).unwrap(), "{\"shieldsDown\": fal");
    }
    // `status` still works and says the corrupt file counts as locked.
    let o = run(&h, &["demo", "status"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("corrupt") && stderr(&o).contains("counts as locked"));
}

#[test]
fn shields_up_down_and_destroy() {
    let h = Home::new();
    assert_eq!(run(&h, &["onboard", "demo"]).status.code(), Some(0));
    assert_eq!(run(&h, &["demo", "shields", "up"]).status.code(), Some(0));
    let o = run(&h, &["demo", "shields", "status", "--json"]);
    assert_eq!(parse(&o.stdout)["data"]["locked"], true);
    assert_eq!(
        run(&h, &["demo", "shields", "down", "--reason", "maintenance"]).status.code(),
        Some(0)
    );
    let f: Value = parse(&fs::read(h.path().join("state/shields-demo.json")).unwrap());
    assert_eq!(
        (f["shieldsDown"].clone(), f["shieldsDownReason"].clone()),
        (json!(true), json!("maintenance"))
    );

    // No TTY and no --yes: refused, nothing changed.
    let before = fs::read(h.path().join("sandboxes.json")).unwrap();
    let o = run(&h, &["demo", "destroy"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("nemoclaw demo destroy --yes"));
    assert_eq!(fs::read(h.path().join("sandboxes.json")).unwrap(), before);
    assert!(h.path().join("local-gateway/sandboxes/demo").is_dir());

    let o = run(&h, &["demo", "destroy", "--yes"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!h.path().join("local-gateway/sandboxes/demo").exists());
    assert!(!h.path().join("state/shields-demo.json").exists());
    let reg: Value = parse(&fs::read(h.path().join("sandboxes.json")).unwrap());
    assert_eq!(reg, json!({"sandboxes": {}, "defaultSandbox": null}));
}

#[test]
fn a_live_nemoclaw_lock_makes_writers_wait_then_fail_and_a_dead_ones_is_broken() {
    let h = Home::new();
    let lock = h.path().join("sandboxes.json.lock");
    fs::create_dir(&lock).unwrap();
    fs::write(lock.join("owner"), std::process::id().to_string()).unwrap();
    let t = Instant::now();
    let o = cmd(&h)
        .env("NEMOCLAW_REGISTRY_LOCK_RETRIES", "4")
        .args(["onboard", "demo"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    assert!(t.elapsed() >= Duration::from_millis(300), "it must have waited");
    let err = stderr(&o);
    assert!(
        err.contains("sandboxes.json.lock") && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    // Nothing half-done: no registry, no sandbox left on the gateway, the lock is still theirs.
    assert!(!h.path().join("sandboxes.json").exists());
    assert!(!h.path().join("local-gateway/sandboxes/demo").exists());
    assert_eq!(fs::read_to_string(lock.join("owner")).unwrap(), std::process::id().to_string());

    // The owner dies: its lock is broken and the write goes through.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    fs::write(lock.join("owner"), dead.to_string()).unwrap();
    let o = cmd(&h)
        .env("NEMOCLAW_REGISTRY_LOCK_RETRIES", "4")
        .args(["onboard", "demo"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!lock.exists(), "our own lock must be released");
    assert!(Registry::load(h.path()).unwrap().entry(&name("demo")).is_some());
}

#[test]
fn onboard_and_status_through_openshell_are_scoped_and_scrubbed() {
    let Some(gw) = crate::fakegw::FakeGateway::start("nemoclaw") else { return };
    let h = Home::new();
    let program = gw.wrapper();
    let with = |args: &[&str]| {
        let mut c = cmd(&h);
        for (k, v) in gw.env() {
            c.env(k, v);
        }
        c.env("OPENSHELL_GATEWAY", "elsewhere")
            .env("OPENSHELL_WORKSPACE", "other")
            .env("OPENSHELL_SANDBOX_POLICY", "/nonexistent.yaml")
            .arg("--openshell")
            .arg(&program)
            .args(args)
            .output()
            .unwrap()
    };
    // Presets are not whole policies: refused before anything is created.
    let o = with(&["onboard", "demo", "--policy", "npm"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(Registry::load(h.path()).unwrap().entry(&name("demo")).is_none());
    assert!(!gw.sandboxes().contains_key("demo"), "nothing created");
    let o = with(&["onboard", "demo"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let row = Registry::load(h.path()).unwrap().entry(&name("demo")).cloned().unwrap();
    assert_eq!(
        (row["gatewayName"].clone(), row["gatewayPort"].clone()),
        (json!("nemoclaw"), json!(8080))
    );
    let root = gw.sandbox_root("demo").expect("created on the gateway");
    assert!(root.join(".openclaw/workspace/AGENTS.md").is_file());
    let o = with(&["demo", "status", "--json"]);
    assert_eq!(parse(&o.stdout)["data"]["live"]["status"], "present", "{}", stderr(&o));
    let leaked = fs::read_to_string(gw.tmp.path().join("env.log")).unwrap_or_default();
    assert!(leaked.trim().is_empty(), "OPENSHELL_* leaked into a call: {leaked}");
    let calls = gw.invocations();
    assert!(calls.iter().any(|c| c.starts_with("sandbox create")), "{calls:?}");
    assert!(calls.iter().all(|c| c == "--version" || c.contains("-g nemoclaw")), "{calls:?}");

    // Recorded on nemoclaw-9000 while nemoclaw is the active gateway: the refusal names the
    // gateway to select, and nothing is removed.
    registry::update(h.path(), |reg| {
        let mut r = row.clone();
        r["gatewayName"] = json!("nemoclaw-9000");
        r["gatewayPort"] = json!(9000);
        reg.set_entry(&name("demo"), r);
        Ok(())
    })
    .unwrap();
    let o = with(&["demo", "status"]);
    let err = stderr(&o);
    assert!(
        err.contains("registered against the NemoClaw gateway 'nemoclaw-9000', but the currently active OpenShell gateway is 'nemoclaw'"),
        "{err}"
    );
    assert!(err.contains("openshell gateway select nemoclaw-9000"), "{err}");
    assert!(err.contains("Your sandbox has NOT been removed."), "{err}");
    let o = with(&["demo", "destroy", "--yes"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("openshell gateway select nemoclaw-9000"), "{}", stderr(&o));
    assert!(gw.sandboxes().contains_key("demo"));
}

#[test]
fn an_invalid_gateway_binding_is_refused_not_guessed() {
    let h = Home::new();
    let doc = json!({"sandboxes": {"demo": {"name": "demo", "gatewayName": "prod"}}, "defaultSandbox": "demo"});
    fs::write(h.path().join("sandboxes.json"), doc.to_string()).unwrap();
    for args in [&["demo", "status"][..], &["demo", "destroy", "--yes"]] {
        let o = run(&h, args);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("invalid gatewayName"), "{}", stderr(&o));
    }
    assert_eq!(parse(&fs::read(h.path().join("sandboxes.json")).unwrap()), doc);
    assert!(!h.path().join("local-gateway").exists(), "no gateway may be opened");
}

/// A process inside the workspace swaps `workspace/zz` between a regular file and a symlink to
/// a host file, as fast as it can, while backups copy the tree. No copy may ever hold the host
/// file's bytes (the copy opens with O_NOFOLLOW and checks what it opened, not the path).
#[test]
fn symlink_swap_during_backup_never_copies_the_host_file() {
    let t = tempfile::tempdir().unwrap();
    let secret = t.path().join("host-secret");
    let marker = b"HOST-SECRET-7f3a9c\n";
    fs::write(&secret, marker).unwrap();
    let ws = t.path().join("state/workspace");
    fs::create_dir_all(&ws).unwrap();
    for i in 0..50 {
        fs::write(ws.join(format!("f{i:02}")), format!("file {i}\n")).unwrap();
    }
    fs::write(ws.join("zz"), b"in-tree\n").unwrap();
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let swaps = std::sync::Arc::new(AtomicU64::new(0));
    let swapper = {
        let (ws, secret, stop, swaps) = (ws.clone(), secret.clone(), stop.clone(), swaps.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let tmp = ws.join(".swap");
                let _ = fs::remove_file(&tmp);
                if n.is_multiple_of(2) {
                    std::os::unix::fs::symlink(&secret, &tmp).unwrap();
                } else {
                    fs::write(&tmp, b"in-tree\n").unwrap();
                }
                let _ = fs::rename(&tmp, ws.join("zz"));
                n += 1;
                swaps.store(n, Ordering::Relaxed);
            }
        })
    };
    // At least 300 copies, and on until the swapper has really raced them (a loaded machine
    // slows it down), within a bound.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut copies, mut refused) = (0, 0);
    for i in 0.. {
        if i >= 300 && (swaps.load(Ordering::Relaxed) >= 200 || Instant::now() > deadline) {
            break;
        }
        let dest = t.path().join(format!("copy{i}"));
        match nemoclaw::host::backup::copy_tree(&t.path().join("state"), &dest) {
            Ok(()) => {
                copies += 1;
                let zz = dest.join("workspace/zz");
                if let Ok(bytes) = fs::read(&zz) {
                    assert_ne!(bytes, marker, "copy {i} holds the host file's bytes at {zz:?}");
                }
                if let Ok(target) = fs::read_link(&zz) {
                    panic!("copy {i} holds a symlink to {target:?}");
                }
            }
            Err(_) => refused += 1,
        }
        let _ = fs::remove_dir_all(&dest);
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    let swaps = swaps.load(Ordering::Relaxed);
    eprintln!("symlink swap race: {swaps} swaps, {copies} copies, {refused} refused");
    assert!(swaps >= 200, "the swapper really raced ({swaps} swaps)");
}

/// `workspace/up -> ..` is harmless alone, but `workspace/b -> up/workspace/up/../secret`
/// walks through it and out of the tree: the lexical check passed it; resolving against the
/// tree's own links refuses it, in a copy and in a backup manifest.
#[test]
fn chained_symlinks_that_leave_the_tree_are_refused() {
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("secret"), b"outside\n").unwrap();
    let ws = t.path().join("state/workspace");
    fs::create_dir_all(&ws).unwrap();
    std::os::unix::fs::symlink("..", ws.join("up")).unwrap();
    std::os::unix::fs::symlink("up/workspace/up/../secret", ws.join("b")).unwrap();
    // The chain really does reach the outside file through the file system.
    assert_eq!(fs::read(ws.join("b")).unwrap(), b"outside\n");
    let e = nemoclaw::host::backup::copy_tree(&t.path().join("state"), &t.path().join("copy"))
        .unwrap_err();
    assert!(e.to_string().contains("escapes the tree"), "{e}");
    assert!(!t.path().join("copy/workspace/b").exists(), "nothing copied");
    let ok = [
        ("workspace/up".to_owned(), "..".to_owned()),
        ("workspace/c".to_owned(), "up/workspace/x".to_owned()),
    ];
    assert!(nemoclaw::host::backup::check_links_in_tree(&ok).is_ok());
    let looped = [("a".to_owned(), "b".to_owned()), ("b".to_owned(), "a".to_owned())];
    assert!(nemoclaw::host::backup::check_links_in_tree(&looped).is_err());
}
