//! Integration tests: the journaled rebuild on the local gateway — scenarios, refusals, the
//! crash matrix over the real rebuild plan, SIGINT, and a seeded kill -9 soak.
//!
//! Every test checks state, not just exit codes: registry bytes, workspace digests, shields
//! bytes, the gateway's sandboxes, and the journal (integrity, hash chain, run state).

use std::path::{Path, PathBuf};
use std::process::Output;

use nemoclaw::gateway::local::LocalGateway;
use nemoclaw::gateway::{CreateSpec, Gateway, PolicySpec};
use nemoclaw::host::{backup, registry, shields};
use nemoclaw::journal::{events, Journal};
use nemoclaw::names::SandboxName;
use serde_json::{json, Value};

use crate::common::{stderr, stdout, Home};

/// A registered sandbox on the local gateway with a small workspace, next to a second
/// sandbox whose row must never change.
pub struct World {
    pub home: Home,
    pub name: SandboxName,
}

pub struct Opts {
    pub locked: bool,
    pub files: usize,
}

impl Default for Opts {
    fn default() -> Self {
        Self { locked: true, files: 12 }
    }
}

fn sb(s: &str) -> SandboxName {
    SandboxName::parse(s).unwrap()
}

pub fn entry(name: &str) -> Value {
    json!({
        "name": name,
        "createdAt": "2026-06-01T10:00:00.000Z",
        "model": "meta/llama-3.3-70b-instruct",
        "provider": "nvidia-prod",
        "gpuEnabled": false,
        "policies": ["npm", "telegram"],
        "customPolicies": [{"name": "corp-proxy", "content": "version: 1\nnetwork_policies: {}\n"}],
        "agent": null,
        "imageTag": "openshell/sandbox-from:1779212437",
        "dashboardPort": 18789,
        "gatewayName": "local",
        "providerCredentialHashes": {"NVIDIA_API_KEY": "5e884898da28047151d0e56f8dc629"},
        "futureField": {"nested": [1, 2, 3], "keep": "verbatim"}
    })
}

impl World {
    pub fn new(opts: Opts) -> Self {
        let home = Home::new();
        let name = sb("alpha");
        let gw = LocalGateway::open(home.path()).unwrap();
        for n in ["alpha", "bystander"] {
            let spec = CreateSpec {
                name: sb(n),
                image: "openshell/sandbox-from:1779212437".into(),
                labels: Default::default(),
                agent: None,
                gpu: false,
                policy: None,
            };
            gw.create(&spec).unwrap();
        }
        let state = gw.state_dir(&name);
        for i in 0..opts.files {
            let dir = state.join(format!("workspace/d{}", i % 3));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("f{i}.txt")), format!("file {i} ").repeat(i + 1))
                .unwrap();
        }
        std::fs::create_dir_all(state.join("memory")).unwrap();
        std::fs::write(state.join("memory/MEMORY.md"), b"remember this\n").unwrap();
        for p in ["npm", "telegram"] {
            gw.apply_policy(&name, &PolicySpec::Preset { name: p.into() }).unwrap();
        }
        registry::update(home.path(), |reg| {
            reg.set_entry(&sb("bystander"), entry("bystander"));
            reg.set_entry(&name, entry("alpha"));
            reg.set_default(Some(&name));
            Ok(())
        })
        .unwrap();
        if opts.locked {
            shields::raise(home.path(), &name).unwrap();
        }
        World { home, name }
    }

    pub fn path(&self) -> &Path {
        self.home.path()
    }

    pub fn gw(&self) -> LocalGateway {
        LocalGateway::open(self.path()).unwrap()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.gw().state_dir(&self.name)
    }

    pub fn digest(&self) -> String {
        backup::tree_digest(&self.state_dir()).unwrap()
    }

    pub fn registry_bytes(&self) -> Vec<u8> {
        std::fs::read(self.path().join("sandboxes.json")).unwrap()
    }

    pub fn registry(&self) -> Value {
        serde_json::from_slice(&self.registry_bytes()).unwrap()
    }

    pub fn row(&self) -> Option<Value> {
        self.registry()["sandboxes"].get(self.name.as_str()).cloned()
    }

    pub fn shields_bytes(&self) -> Option<Vec<u8>> {
        std::fs::read(shields::shields_path(self.path(), &self.name)).ok()
    }

    /// Make the sandbox look reaped: its directory is gone from the gateway.
    pub fn reap(&self) {
        std::fs::remove_dir_all(self.gw().sandbox_dir(&self.name)).unwrap();
    }

    pub fn live_id(&self) -> Option<String> {
        nemoclaw::gateway::local::meta_json(&self.gw(), &self.name)
            .and_then(|m| m["id"].as_str().map(str::to_owned))
    }

    pub fn meta(&self) -> Option<Value> {
        nemoclaw::gateway::local::meta_json(&self.gw(), &self.name)
    }

    pub fn fault(&self, v: Value) {
        std::fs::write(self.path().join("local-gateway/fault.json"), v.to_string()).unwrap();
    }

    pub fn clear_fault(&self) {
        let _ = std::fs::remove_file(self.path().join("local-gateway/fault.json"));
    }

    pub fn rebuild(&self) -> Output {
        self.home.run(&["alpha", "rebuild", "--yes"])
    }

    pub fn snapshot(&self) -> Before {
        Before {
            registry: self.registry_bytes(),
            row: self.row().unwrap(),
            digest: self.digest(),
            shields: self.shields_bytes(),
            id: self.live_id(),
        }
    }

    /// Sandboxes the local gateway holds, and any leftover temp/trash directory.
    pub fn gateway_listing(&self) -> (Vec<String>, Vec<String>) {
        let gw = self.gw();
        let mut names: Vec<String> = gw.list().unwrap().into_iter().map(|s| s.name).collect();
        names.sort();
        let leftovers = std::fs::read_dir(gw.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp") || n.starts_with(".trash"))
            .collect();
        (names, leftovers)
    }
}

/// What the host looked like before a run.
pub struct Before {
    pub registry: Vec<u8>,
    pub row: Value,
    pub digest: String,
    pub shields: Option<Vec<u8>>,
    pub id: Option<String>,
}

/// (run id, state) of every run in the journal, oldest first.
pub fn runs(home: &Path) -> Vec<(String, String)> {
    let j = Journal::open_home(home).unwrap();
    let mut st = j.conn().prepare("SELECT id, state FROM runs ORDER BY created_at, id").unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
}

/// Journal invariants of spec §4.2: integrity, hash chain, nothing left running.
pub fn check_journal(home: &Path) {
    let j = Journal::open_home(home).unwrap();
    j.integrity_check().unwrap();
    events::verify_chain(j.conn()).unwrap_or_else(|b| panic!("hash chain broken: {b:?}"));
    let running: i64 = j
        .conn()
        .query_row("SELECT count(*) FROM runs WHERE state IN ('running','rolling_back')", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(running, 0, "a run was left running");
}

fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
}

/// The row after a successful rebuild: the snapshot's, with `imageTag` updated.
fn rebuilt_row(before: &Value) -> Value {
    let mut r = before.clone();
    r["imageTag"] = json!(nemoclaw::rebuild::DEFAULT_IMAGE);
    r
}

/// Invariants after a successful (or resumed) rebuild.
fn check_rebuilt(w: &World, b: &Before, mode: &str) {
    check_journal(w.path());
    let reg = w.registry();
    assert_eq!(reg["sandboxes"][w.name.as_str()], rebuilt_row(&b.row), "registry row");
    assert_eq!(reg["sandboxes"]["bystander"], entry("bystander"), "bystander row untouched");
    assert_eq!(reg["defaultSandbox"], "alpha", "default pointer");
    let (names, leftovers) = w.gateway_listing();
    assert_eq!(names, vec!["alpha", "bystander"], "exactly one sandbox of that name");
    assert!(leftovers.is_empty(), "gateway leftovers: {leftovers:?}");
    assert_ne!(w.live_id(), b.id, "the sandbox was recreated");
    let meta = w.meta().unwrap();
    let run = runs(w.path()).last().unwrap().clone();
    assert_eq!(meta["labels"]["rebuild-run"], run.0.as_str(), "new sandbox carries the run label");
    assert_eq!(run.1, "succeeded");
    let policies: Vec<&str> =
        meta["policies"].as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
    for p in ["npm", "telegram", "corp-proxy"] {
        assert!(policies.contains(&p), "policy {p} re-applied: {policies:?}");
    }
    match mode {
        "normal" => {
            assert_eq!(w.digest(), b.digest, "workspace restored byte for byte");
            assert_eq!(w.shields_bytes(), b.shields, "shields as before (re-locked)");
        }
        "stale" => {
            assert_eq!(w.shields_bytes(), None, "stale seal cleared");
        }
        _ => unreachable!(),
    }
}

/// Invariants after a rollback: the host is as it was before the run.
fn check_rolled_back(w: &World, b: &Before, mode: &str) {
    check_journal(w.path());
    assert_eq!(runs(w.path()).last().unwrap().1, "rolled_back");
    let reg = w.registry();
    assert_eq!(
        serde_json::to_string(&reg["sandboxes"][w.name.as_str()]).unwrap(),
        serde_json::to_string(&b.row).unwrap(),
        "registry row byte-equal to the snapshot"
    );
    assert_eq!(reg["sandboxes"]["bystander"], entry("bystander"));
    assert_eq!(reg["defaultSandbox"], "alpha", "default pointer reclaimed");
    assert_eq!(w.shields_bytes(), b.shields, "shields as before");
    let (names, leftovers) = w.gateway_listing();
    assert!(leftovers.is_empty(), "gateway leftovers: {leftovers:?}");
    match mode {
        "normal" => {
            assert_eq!(names, vec!["alpha", "bystander"]);
            assert_eq!(w.digest(), b.digest, "workspace as before");
        }
        "stale" => assert_eq!(names, vec!["bystander"], "no half-created sandbox left"),
        _ => unreachable!(),
    }
}

#[test]
fn normal_rebuild_restores_every_file_and_relocks_shields() {
    let w = World::new(Opts::default());
    let b = w.snapshot();
    assert!(b.shields.is_some());
    let o = w.rebuild();
    assert_ok(&o);
    let err = stderr(&o);
    for phrase in [
        "Rebuild sandbox 'alpha'",
        "Backing up sandbox state...",
        "Deleting old sandbox...",
        "Creating new sandbox with current image...",
        "Restoring workspace state...",
        "✓ Sandbox 'alpha' rebuilt successfully",
    ] {
        assert!(err.contains(phrase), "missing `{phrase}` in:\n{err}");
    }
    check_rebuilt(&w, &b, "normal");
    // The backup is complete and its digest is the journaled one.
    let j = Journal::open_home(w.path()).unwrap();
    let out: String = j
        .conn()
        .query_row("SELECT output FROM steps WHERE name='backup'", [], |r| r.get(0))
        .unwrap();
    let out: Value = serde_json::from_str(&out).unwrap();
    let bk = backup::Backup::open(Path::new(out["backup_path"].as_str().unwrap())).unwrap();
    assert_eq!(out["manifest_sha256"], bk.manifest_digest.as_str());
    assert!(bk.manifest.complete);
}

#[test]
fn stale_rebuild_recreates_from_registry_and_clears_the_seal() {
    let w = World::new(Opts::default());
    let b = w.snapshot();
    w.reap();
    let o = w.rebuild();
    assert_ok(&o);
    let err = stderr(&o);
    for phrase in [
        "absent from the live OpenShell gateway",
        "No live workspace state to back up",
        "Recovered from a stale registry entry",
        "Shields were previously enabled but the recreated sandbox starts unlocked",
        "nemoclaw alpha shields up",
    ] {
        assert!(err.contains(phrase), "missing `{phrase}` in:\n{err}");
    }
    assert!(!err.contains("Backing up sandbox state"), "stale path must not back up:\n{err}");
    check_rebuilt(&w, &b, "stale");
    // No backup directory was made.
    assert!(!w.path().join("rebuild-backups/alpha").exists());
}

#[test]
fn foreign_active_gateway_is_refused_and_nothing_changes() {
    let w = World::new(Opts::default());
    let b = w.snapshot();
    w.fault(json!({"health": "foreign", "foreign_active": "nemoclaw"}));
    let o = w.rebuild();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("NOT been removed"), "{err}");
    assert!(err.contains("openshell gateway select local"), "{err}");
    assert_eq!(w.registry_bytes(), b.registry, "registry untouched");
    w.clear_fault();
    assert_eq!(w.live_id(), b.id, "no delete, no create");
    assert_eq!(w.digest(), b.digest);
    assert!(runs(w.path()).is_empty(), "no run was started");
}

#[test]
fn unreachable_gateway_is_refused_and_entry_preserved() {
    let w = World::new(Opts::default());
    let b = w.snapshot();
    w.fault(json!({"health": "unreachable"}));
    let o = w.rebuild();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("Could not confirm live state of 'alpha'"), "{err}");
    assert!(err.contains("Your local registry entry has been preserved"), "{err}");
    assert_eq!(w.registry_bytes(), b.registry);
    w.clear_fault();
    assert_eq!(w.live_id(), b.id);
}

#[test]
fn stale_recreate_failure_rolls_back_with_image_tag_null() {
    let w = World::new(Opts::default());
    let b = w.snapshot();
    w.reap();
    w.fault(json!({"fail": {"create": "image pull failed: manifest unknown"}}));
    let o = w.rebuild();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("Recovery recreate failed."), "{err}");
    assert!(err.contains("image pull failed"), "{err}");
    assert!(err.contains("Your local registry entry has been preserved — you can retry"), "{err}");
    let mut want = b.row.clone();
    want["imageTag"] = Value::Null;
    let reg = w.registry();
    assert_eq!(reg["sandboxes"]["alpha"], want, "entry preserved with imageTag null");
    assert_eq!(reg["defaultSandbox"], "alpha");
    assert_eq!(w.shields_bytes(), b.shields, "shields file as before");
    assert_eq!(runs(w.path()).last().unwrap().1, "rolled_back");
    check_journal(w.path());
    // Once the issue is fixed, the retry succeeds.
    w.clear_fault();
    assert_ok(&w.rebuild());
}

#[test]
fn failed_normal_rebuild_stops_with_both_next_commands_and_blocks_a_second_rebuild() {
    let w = World::new(Opts::default());
    let b = w.snapshot();
    w.fault(json!({"fail": {"create": "quota exceeded"}}));
    let o = w.rebuild();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("quota exceeded"), "{err}");
    assert!(err.contains("nemoclaw recover --resume"), "{err}");
    assert!(err.contains("nemoclaw recover --rollback"), "{err}");
    assert_eq!(runs(w.path()).last().unwrap().1, "failed");
    // A second rebuild is refused while the first is unfinished.
    let o2 = w.rebuild();
    assert_eq!(o2.status.code(), Some(3), "{}", stderr(&o2));
    assert!(stderr(&o2).contains("unfinished"), "{}", stderr(&o2));
    // The fix, then resume: every file back.
    w.clear_fault();
    let o3 = w.home.run(&["recover", "--resume", "--sandbox", "alpha"]);
    assert_ok(&o3);
    check_rebuilt(&w, &b, "normal");
}

#[test]
fn rollback_of_a_failed_normal_rebuild_gives_the_old_sandbox_back() {
    let w = World::new(Opts::default());
    let b = w.snapshot();
    w.fault(json!({"fail": {"create": "quota exceeded"}}));
    assert_eq!(w.rebuild().status.code(), Some(1));
    w.clear_fault();
    let o = w.home.run(&["recover", "--rollback", "--sandbox", "alpha"]);
    assert_ok(&o);
    check_rolled_back(&w, &b, "normal");
}

#[test]
fn dry_run_changes_nothing() {
    let w = World::new(Opts::default());
    let b = w.snapshot();
    let o = w.home.run(&["alpha", "rebuild", "--dry-run", "--json"]);
    assert_ok(&o);
    let doc: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let steps: Vec<&str> = doc["data"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "snapshot",
            "shields_down",
            "backup",
            "remove",
            "onboard",
            "restore",
            "policies",
            "shields"
        ]
    );
    assert_eq!(w.registry_bytes(), b.registry);
    assert_eq!(w.live_id(), b.id);
    assert!(!w.path().join("journal.sqlite3").exists(), "dry run must not even create a journal");
}

#[test]
fn no_tty_and_no_yes_is_refused() {
    let w = World::new(Opts::default());
    let b = w.snapshot();
    let o = w.home.run(&["alpha", "rebuild"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("rebuild --yes"), "{}", stderr(&o));
    assert_eq!(w.registry_bytes(), b.registry);
    assert_eq!(w.live_id(), b.id);
}

// ---------------------------------------------------------------------------------------------
// Crash matrix over the real rebuild plan.

use std::os::unix::process::ExitStatusExt;

use nemoclaw::engine::crash::CRASH_POINTS;

const FORWARD_POINTS: &[&str] = &[
    "after_lock",
    "after_run_created",
    "before_intent",
    "after_intent",
    "mid_effect",
    "after_effect",
    "after_outcome",
    "before_finish",
];
const COMP_POINTS: &[&str] = &[
    "before_comp_intent",
    "after_comp_intent",
    "mid_effect",
    "after_comp_effect",
    "after_comp_outcome",
    "before_rollback_finish",
];

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Normal,
    Stale,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Stale => "stale",
        }
    }
}

fn world(mode: Mode) -> (World, Before) {
    let w = World::new(Opts { locked: true, files: 6 });
    let b = w.snapshot();
    if mode == Mode::Stale {
        w.reap();
    }
    (w, b)
}

fn run_with_crash(w: &World, args: &[&str], point: &str, hit: u32) -> Output {
    w.home.cmd().env("NEMOCLAW_CRASHPOINT", format!("{point}:{hit}")).args(args).output().unwrap()
}

fn killed(o: &Output) -> bool {
    o.status.signal() == Some(9)
}

/// Whether the last run's onboard step was attempted (a stale rollback then nulls `imageTag`).
fn onboard_attempted(home: &Path) -> bool {
    let j = Journal::open_home(home).unwrap();
    j.conn()
        .query_row(
            "SELECT count(*) FROM steps WHERE name='onboard' AND state != 'pending'
               AND run_id = (SELECT id FROM runs ORDER BY created_at DESC, id DESC LIMIT 1)",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
        > 0
}

/// After recovery: resume ⇒ rebuilt; rollback ⇒ as before; no run at all ⇒ nothing changed.
fn check_recovered(w: &World, b: &Before, mode: Mode, resume: bool, ctx: &str) {
    let all = runs(w.path());
    if all.is_empty() {
        // Killed before the run was created: nothing may have changed.
        assert_eq!(w.registry_bytes(), b.registry, "{ctx}: registry changed without a run");
        return;
    }
    // A kill after the commit that finished the run leaves nothing to recover: it succeeded.
    if resume || all.last().unwrap().1 == "succeeded" {
        eprintln!("{ctx}: checking rebuilt");
        check_rebuilt(w, b, mode.as_str());
    } else {
        let mut before = Before {
            registry: b.registry.clone(),
            row: b.row.clone(),
            digest: b.digest.clone(),
            shields: b.shields.clone(),
            id: b.id.clone(),
        };
        if mode == Mode::Stale && onboard_attempted(w.path()) {
            before.row["imageTag"] = Value::Null;
        }
        check_rolled_back(w, &before, mode.as_str());
    }
}

fn recover_args(resume: bool) -> [&'static str; 4] {
    ["recover", if resume { "--resume" } else { "--rollback" }, "--sandbox", "alpha"]
}

/// Every forward crash point, at every hit it is reached, then one recovery.
fn forward_matrix(mode: Mode, resume: bool) {
    let mut covered = std::collections::BTreeSet::new();
    let mut cases = 0;
    for &point in FORWARD_POINTS {
        for hit in 1.. {
            let (w, b) = world(mode);
            let o = run_with_crash(&w, &["alpha", "rebuild", "--yes"], point, hit);
            let ctx = format!("{mode:?} {point}:{hit} resume={resume}");
            if !killed(&o) {
                // Past the last time this point is reached: the run just succeeds.
                assert_ok(&o);
                check_rebuilt(&w, &b, mode.as_str());
                assert!(hit > 1, "{ctx}: crash point never reached\n{}", stderr(&o));
                break;
            }
            covered.insert(point);
            cases += 1;
            let r = w.home.run(&recover_args(resume));
            assert!(r.status.success(), "{ctx}: recover failed\n{}", stderr(&r));
            check_recovered(&w, &b, mode, resume, &ctx);
        }
    }
    eprintln!("{mode:?} resume={resume}: {cases} crash cases");
    assert_eq!(covered.len(), FORWARD_POINTS.len());
}

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
    let first = ("after_effect", if mode == Mode::Normal { 5 } else { 3 });
    let points = if resume { FORWARD_POINTS } else { COMP_POINTS };
    for &point in points {
        if resume && point == "after_run_created" {
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
        for p in COMP_POINTS {
            assert!(covered.contains(p), "compensation crash point {p} never reached");
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

/// The matrix above names every crash point the engine has.
#[test]
fn crash_matrix_covers_every_crash_point() {
    for p in CRASH_POINTS {
        assert!(
            FORWARD_POINTS.contains(p) || COMP_POINTS.contains(p),
            "crash point {p} is not in the rebuild crash matrix"
        );
    }
}

/// SIGINT mid-rebuild: the current step finishes journaling, the run is `interrupted`, exit
/// 130, and `recover --resume` completes it.
#[test]
fn sigint_interrupts_cleanly_and_resume_completes() {
    let w = World::new(Opts { locked: true, files: 40 });
    let b = w.snapshot();
    let child = w
        .home
        .cmd()
        .env("NEMOCLAW_STEP_DELAY_MS", "300")
        .args(["alpha", "rebuild", "--yes"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
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
    // How long an undisturbed rebuild takes here, so kills land anywhere inside one. Timed
    // after a first rebuild: that one also creates the journal and flushes the freshly written
    // workspace, so it runs longer than the rebuilds that are killed.
    assert_ok(&w.rebuild());
    let t0 = std::time::Instant::now();
    assert_ok(&w.rebuild());
    let full = t0.elapsed();
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
        if st.signal() == Some(9) {
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
    assert!(killed_runs >= cycles / 2, "too few kills landed inside a run: {killed_runs}");
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

fn nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// A tiny deterministic PRNG: the soak must replay from its seed alone.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

// ---------------------------------------------------------------------------------------------
// The same rebuild through the openshell driver, against the test double in child processes.

mod via_openshell {
    use super::*;
    use crate::gateway::{double_config, double_wrapper};

    /// A sandbox onboarded on gateway `gw` through the double, with workspace files.
    pub struct Os {
        pub home: Home,
        pub state: PathBuf,
        pub program: PathBuf,
        pub gw: String,
    }

    impl Os {
        pub fn new(gw: &str) -> Os {
            let home = Home::new();
            let state = home.path().join("double");
            double_config(
                &state,
                json!({"version": "0.0.116", "gateways": {gw: "connected"}, "active": gw}),
            );
            let program = double_wrapper(home.path(), &state);
            let os = Os { home, state, program, gw: gw.to_owned() };
            let o = os.run(&["onboard", "alpha", "--gateway", gw]);
            assert_ok(&o);
            let ws = os.tree();
            for i in 0..10 {
                std::fs::create_dir_all(ws.join("workspace/notes")).unwrap();
                std::fs::write(ws.join(format!("workspace/notes/n{i}.md")), format!("note {i}\n"))
                    .unwrap();
            }
            os
        }

        pub fn run(&self, args: &[&str]) -> Output {
            self.cmd().args(args).output().unwrap()
        }

        pub fn cmd(&self) -> std::process::Command {
            let mut c = self.home.cmd();
            c.env("NEMOCLAW_OPENSHELL", &self.program).env("NEMOCLAW_OPENSHELL_POLL_MS", "10");
            c
        }

        /// The sandbox's `/sandbox/.openclaw` as the double keeps it.
        pub fn tree(&self) -> PathBuf {
            self.state.join(format!("gw/{}/alpha/state", self.gw))
        }

        pub fn config(&self, cfg: Value) {
            double_config(&self.state, cfg);
        }

        pub fn calls(&self) -> Vec<Value> {
            std::fs::read_to_string(self.state.join("calls.log"))
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }

        pub fn registry_bytes(&self) -> Vec<u8> {
            std::fs::read(self.home.path().join("sandboxes.json")).unwrap()
        }

        pub fn digest(&self) -> String {
            backup::tree_digest(&self.tree()).unwrap()
        }
    }

    fn verbs(calls: &[Value]) -> Vec<String> {
        calls
            .iter()
            .map(|c| {
                let a: Vec<&str> =
                    c["argv"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
                a.iter().take(2).cloned().collect::<Vec<_>>().join(" ")
            })
            .collect()
    }

    #[test]
    fn normal_rebuild_moves_real_files_through_the_cli() {
        let os = Os::new("nemoclaw");
        let before = os.digest();
        let calls_before = os.calls().len();
        let o = os.run(&["alpha", "rebuild", "--yes"]);
        assert_ok(&o);
        assert_eq!(os.digest(), before, "workspace byte-identical after the rebuild");
        let calls = os.calls()[calls_before..].to_vec();
        // Every call is scoped to the recorded gateway; the operator's selection is never changed.
        for c in &calls {
            let argv: Vec<&str> =
                c["argv"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
            if argv == ["--version"] {
                continue;
            }
            assert!(argv.windows(2).any(|w| w == ["-g", "nemoclaw"]), "unscoped call {argv:?}");
            assert!(!argv.starts_with(&["gateway", "select"]), "changed the selected gateway");
            assert_eq!(c["scrubbed"], true);
        }
        let v = verbs(&calls);
        assert!(v.iter().any(|x| x == "sandbox delete"), "{v:?}");
        assert!(v.iter().any(|x| x == "sandbox create"), "{v:?}");
        assert!(v.iter().any(|x| x == "sandbox upload"), "{v:?}");
        check_journal(os.home.path());
        assert_eq!(runs(os.home.path()).last().unwrap().1, "succeeded");
    }

    /// `policy get --full` body of alpha, through the double.
    fn live_policy(os: &Os) -> String {
        let o = std::process::Command::new(&os.program)
            .args(["policy", "get", "--full", "alpha", "-g", &os.gw])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        out.split_once("\n---\n").expect("a --- line").1.to_owned()
    }

    /// Add a network rule to alpha's live policy through the double; returns the new policy.
    fn add_corp_rule(os: &Os) -> String {
        let custom = os.home.path().join("custom.yaml");
        let mut body = live_policy(os);
        body.push_str("network_policies:\n  corp:\n    name: corp\n    endpoints:\n    - host: proxy.corp.example\n      port: 3128\n");
        std::fs::write(&custom, &body).unwrap();
        let o = std::process::Command::new(&os.program)
            .args(["policy", "set", "alpha", "--policy"])
            .arg(&custom)
            .args(["-g", "nemoclaw"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        live_policy(os)
    }

    #[test]
    fn normal_rebuild_hands_the_live_policy_to_the_replacement() {
        let os = Os::new("nemoclaw");
        let before = add_corp_rule(&os);
        assert!(before.contains("proxy.corp.example"));
        let n = os.calls().len();
        assert_ok(&os.run(&["alpha", "rebuild", "--yes"]));
        assert_eq!(live_policy(&os), before, "the replacement enforces the old sandbox's policy");
        // Created with it: one `create --policy`, no preset re-application afterwards.
        let calls = os.calls()[n..].to_vec();
        let create = calls
            .iter()
            .find(|c| c["argv"][0] == "sandbox" && c["argv"][1] == "create")
            .expect("a create");
        let argv: Vec<&str> =
            create["argv"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
        assert!(argv.contains(&"--policy"), "{argv:?}");
        assert!(!verbs(&calls).iter().any(|v| v == "policy set"), "{:?}", verbs(&calls));
        let tmp_left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("nemoclaw-policy-"))
            .filter(|e| argv.iter().any(|a| a.ends_with(&*e.file_name().to_string_lossy())))
            .collect();
        assert!(tmp_left.is_empty(), "the 0600 policy file is removed after the create");
    }

    /// A stale recovery after an earlier journaled run recreates with exactly the policy that
    /// run captured: the journal is the record of it once the sandbox is gone.
    #[test]
    fn stale_recovery_recreates_with_the_last_journaled_policy() {
        let os = Os::new("nemoclaw");
        let before = add_corp_rule(&os);
        assert_ok(&os.run(&["alpha", "rebuild", "--yes"]));
        // The sandbox disappears from the gateway: the next rebuild is a stale recovery.
        std::fs::remove_dir_all(os.state.join("gw/nemoclaw/alpha")).unwrap();
        let o = os.run(&["alpha", "rebuild", "--yes"]);
        assert_ok(&o);
        assert!(stderr(&o).contains("absent from the live OpenShell gateway"), "{}", stderr(&o));
        assert_eq!(live_policy(&os), before, "recreated with the journaled policy");
    }

    #[test]
    fn unreadable_live_policy_is_refused_before_anything_changes() {
        let os = Os::new("nemoclaw");
        let (reg, digest) = (os.registry_bytes(), os.digest());
        os.config(json!({"version": "0.0.116", "gateways": {"nemoclaw": "connected"}, "active": "nemoclaw", "garbage": "policy get"}));
        let n = os.calls().len();
        let o = os.run(&["alpha", "rebuild", "--yes"]);
        assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
        assert!(stderr(&o).contains("Cannot read the live policy of 'alpha'"), "{}", stderr(&o));
        assert_eq!(os.registry_bytes(), reg, "registry untouched");
        assert_eq!(os.digest(), digest, "sandbox untouched");
        let v = verbs(&os.calls()[n..]);
        assert!(!v.iter().any(|x| x == "sandbox delete" || x == "sandbox create"), "{v:?}");
        assert!(runs(os.home.path()).is_empty(), "nothing journaled: {:?}", runs(os.home.path()));
    }

    /// Built from a Dockerfile: rebuilt from it, and refused (nothing changed) while it is missing.
    #[test]
    fn dockerfile_sandbox_is_recreated_from_it_and_refused_without_it() {
        let os = Os::new("nemoclaw");
        let dockerfile = os.home.path().join("build/Dockerfile");
        let session = json!({"version": 1, "sandboxName": "alpha", "status": "complete",
            "metadata": {"gatewayName": "nemoclaw", "fromDockerfile": dockerfile}});
        std::fs::write(os.home.path().join("onboard-session.json"), session.to_string()).unwrap();
        let (reg, digest) = (os.registry_bytes(), os.digest());
        let n = os.calls().len();
        let o = os.run(&["alpha", "rebuild", "--yes"]);
        assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("does not exist, so it could not be recreated"),
            "{}",
            stderr(&o)
        );
        assert_eq!((os.registry_bytes(), os.digest()), (reg, digest.clone()), "nothing changed");
        assert!(!verbs(&os.calls()[n..]).iter().any(|v| v == "sandbox delete"));

        std::fs::create_dir_all(dockerfile.parent().unwrap()).unwrap();
        std::fs::write(&dockerfile, "FROM openshell/sandbox-base:latest\n").unwrap();
        let n = os.calls().len();
        assert_ok(&os.run(&["alpha", "rebuild", "--yes"]));
        let calls = os.calls()[n..].to_vec();
        let create = calls.iter().find(|c| c["argv"][1] == "create").expect("a create");
        let argv: Vec<&str> =
            create["argv"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
        let d = dockerfile.to_string_lossy();
        assert!(argv.windows(2).any(|w| w == ["--from", &*d]), "{argv:?}");
        assert_eq!(os.digest(), digest);
    }

    #[test]
    fn gpu_enabled_row_recreates_with_a_gpu() {
        let os = Os::new("nemoclaw");
        let reg_path = os.home.path().join("sandboxes.json");
        let mut reg: Value = serde_json::from_slice(&std::fs::read(&reg_path).unwrap()).unwrap();
        reg["sandboxes"]["alpha"]["gpuEnabled"] = json!(true);
        std::fs::write(&reg_path, serde_json::to_vec_pretty(&reg).unwrap()).unwrap();
        assert_ok(&os.run(&["alpha", "rebuild", "--yes"]));
        let meta: Value = serde_json::from_slice(
            &std::fs::read(os.state.join("gw/nemoclaw/alpha/meta.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(meta["gpu"], true, "the create asked for a GPU: {meta}");
    }

    #[test]
    fn stale_rebuild_through_the_cli() {
        let os = Os::new("nemoclaw");
        std::fs::remove_dir_all(os.state.join("gw/nemoclaw/alpha")).unwrap();
        let n = os.calls().len();
        let o = os.run(&["alpha", "rebuild", "--yes"]);
        let v = verbs(&os.calls()[n..]);
        let upto = v.iter().position(|x| x == "sandbox create").expect("recreated");
        eprintln!("stale: {upto} openshell calls before the recreate: {:?}", &v[..upto]);
        assert!(
            upto <= 8,
            "stale recovery needs about 8 calls up to the recreate (NemoClaw: 22): {v:?}"
        );
        assert_ok(&o);
        let err = stderr(&o);
        assert!(err.contains("absent from the live OpenShell gateway"), "{err}");
        assert!(!err.contains("Backing up sandbox state"), "{err}");
        assert!(os.state.join("gw/nemoclaw/alpha/meta.json").is_file(), "recreated");
    }

    #[test]
    fn recorded_on_9000_while_nemoclaw_is_active_is_refused() {
        let os = Os::new("nemoclaw-9000");
        let reg = os.registry_bytes();
        let digest = os.digest();
        // The operator switched to `nemoclaw`; nemoclaw-9000 is down.
        os.config(json!({"version": "0.0.116", "gateways": {"nemoclaw": "connected", "nemoclaw-9000": "refused"}, "active": "nemoclaw"}));
        let n = os.calls().len();
        let o = os.run(&["alpha", "rebuild", "--yes"]);
        assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains("registered against the NemoClaw gateway 'nemoclaw-9000', but the currently active OpenShell gateway is 'nemoclaw'"), "{err}");
        assert!(err.contains("NOT been removed"), "{err}");
        assert!(err.contains("openshell gateway select nemoclaw-9000"), "{err}");
        assert_eq!(os.registry_bytes(), reg, "registry untouched");
        assert_eq!(os.digest(), digest);
        let v = verbs(&os.calls()[n..]);
        assert!(!v.iter().any(|x| x == "sandbox delete" || x == "sandbox create"), "{v:?}");
        eprintln!("refusal: {} openshell calls: {v:?}", v.len());
        assert!(
            v.len() <= 4,
            "a refusal needs about 4 calls (NemoClaw: 33), made {}: {v:?}",
            v.len()
        );
    }

    #[test]
    fn unreachable_gateway_is_refused_and_not_found_from_it_is_not_missing() {
        let os = Os::new("nemoclaw");
        let reg = os.registry_bytes();
        os.config(json!({"version": "0.0.116", "gateways": {"nemoclaw": "refused"}, "active": "nemoclaw"}));
        let o = os.run(&["alpha", "rebuild", "--yes"]);
        assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
        assert!(stderr(&o).contains("Could not confirm live state of 'alpha'"), "{}", stderr(&o));
        assert_eq!(os.registry_bytes(), reg);
        assert!(os.state.join("gw/nemoclaw/alpha/meta.json").is_file(), "nothing removed");
    }

    /// A representative subset of the crash matrix through the double: kill inside and after
    /// the delete, after the recreate, then resume or roll back.
    #[test]
    fn crash_subset_through_the_double() {
        for (point, resume) in [
            ("mid_effect:2", true), // normal: between delete and registry removal
            ("mid_effect:2", false),
            ("after_effect:4", true), // after the recreate
            ("after_effect:4", false),
            ("after_intent:5", true), // restore started
        ] {
            let os = Os::new("nemoclaw");
            let before = os.digest();
            let reg = os.registry_bytes();
            let o = os
                .cmd()
                .env("NEMOCLAW_CRASHPOINT", point)
                .args(["alpha", "rebuild", "--yes"])
                .output()
                .unwrap();
            assert!(killed(&o), "{point}: not killed: {}", stderr(&o));
            let r = os.run(&recover_args(resume));
            assert!(r.status.success(), "{point} resume={resume}: {}", stderr(&r));
            check_journal(os.home.path());
            assert_eq!(os.digest(), before, "{point} resume={resume}: workspace");
            let last = runs(os.home.path()).last().unwrap().1.clone();
            if resume {
                assert_eq!(last, "succeeded");
            } else {
                assert_eq!(last, "rolled_back");
                assert_eq!(os.registry_bytes(), reg, "{point}: registry byte-equal after rollback");
            }
        }
    }
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

/// The crash NemoClaw could not survive: the old sandbox deleted, its registry row still there.
/// NemoClaw's next rebuild would take the stale path and skip the backup it had just made; here
/// every command points at the unfinished run, and resuming it restores that backup.
#[test]
fn crash_between_delete_and_registry_removal_then_resume_restores_the_backup() {
    let w = World::new(Opts::default());
    let b = w.snapshot();
    // mid_effect hits: 1 = backup (after the download), 2 = remove (after the delete).
    let o = run_with_crash(&w, &["alpha", "rebuild", "--yes"], "mid_effect", 2);
    assert!(killed(&o), "{}", stderr(&o));
    assert_eq!(w.live_id(), None, "the old sandbox is gone");
    assert_eq!(w.row(), Some(b.row.clone()), "its registry row is still there");
    // A new rebuild does not take the stale path: it is refused, pointing at the run.
    let again = w.rebuild();
    assert_eq!(again.status.code(), Some(3), "{}", stderr(&again));
    assert!(stderr(&again).contains("nemoclaw recover --resume"), "{}", stderr(&again));
    assert!(!stderr(&again).contains("absent from the live OpenShell gateway"));
    let status = w.home.run(&["alpha", "status"]);
    assert!(stderr(&status).contains("was interrupted"), "{}", stderr(&status));
    let r = w.home.run(&["recover", "--resume", "--sandbox", "alpha"]);
    assert_ok(&r);
    check_rebuilt(&w, &b, "normal");
}

/// A sandbox bound to an OpenShell gateway on a host without `openshell`: refused like any
/// gateway that cannot confirm live state, nothing changed.
#[test]
fn missing_openshell_binary_is_refused_and_nothing_changes() {
    let home = Home::new();
    let reg = br#"{"defaultSandbox":"x","sandboxes":{"x":{"name":"x","gatewayName":"nemoclaw"}}}"#;
    std::fs::write(home.path().join("sandboxes.json"), reg).unwrap();
    let o =
        home.cmd().env("PATH", "/nonexistent").args(["x", "rebuild", "--yes"]).output().unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("Could not confirm live state of 'x'"), "{err}");
    assert!(err.contains("nothing was removed"), "{err}");
    assert!(err.contains("--openshell PATH"), "{err}");
    assert_eq!(std::fs::read(home.path().join("sandboxes.json")).unwrap(), reg);
    assert!(!home.path().join("journal.sqlite3").exists());
}

/// The sandbox is the first of two rows: a rollback after the row was removed puts it back in
/// its place, so `sandboxes.json` is byte-identical (it used to be re-appended at the end).
#[test]
fn rollback_puts_the_registry_row_back_at_its_position() {
    let w = World::new(Opts::default());
    registry::update(w.path(), |reg| {
        let a = reg.remove_entry(&w.name).unwrap();
        let b = reg.remove_entry(&sb("bystander")).unwrap();
        reg.set_entry(&w.name, a);
        reg.set_entry(&sb("bystander"), b);
        reg.set_default(Some(&w.name));
        Ok(())
    })
    .unwrap();
    let before = w.registry_bytes();
    assert_eq!(registry::Registry::load(w.path()).unwrap().names(), ["alpha", "bystander"]);
    // after_effect hits: snapshot 1, shields_down 2, backup 3, remove 4 (row gone).
    let o = run_with_crash(&w, &["alpha", "rebuild", "--yes"], "after_effect", 4);
    assert!(killed(&o), "not killed: {}", stderr(&o));
    assert!(w.row().is_none(), "the row was removed before the kill");
    let r = w.home.run(&["recover", "--rollback", "--sandbox", "alpha"]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(
        String::from_utf8_lossy(&w.registry_bytes()),
        String::from_utf8_lossy(&before),
        "registry byte-identical after the rollback"
    );
}
