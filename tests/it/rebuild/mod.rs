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

use crate::common::{killed, nanos, stderr, stdout, Home, XorShift};

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
                providers: Vec::new(),
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

pub(crate) fn assert_ok(o: &Output) {
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

// ---------------------------------------------------------------------------------------------
// Crash matrix over the real rebuild plan.

use nemoclaw::engine::CrashPoint;

/// Where the rebuild's crash matrix makes a point happen: during the rebuild (then a recovery),
/// during a rollback, or both. No wildcard: a new crash point does not compile until it is
/// placed here.
fn matrix_phase(p: CrashPoint) -> (bool, bool) {
    use CrashPoint::*;
    const FORWARD: (bool, bool) = (true, false);
    const COMPENSATION: (bool, bool) = (false, true);
    match p {
        AfterLock | AfterRunCreated | BeforeIntent | AfterIntent | AfterEffect | AfterOutcome
        | BeforeFinish => FORWARD,
        MidEffect => (true, true),
        BeforeCompIntent | AfterCompIntent | AfterCompEffect | AfterCompOutcome
        | BeforeRollbackFinish => COMPENSATION,
    }
}

/// The points a rebuild (or a resume) meets.
fn forward_points() -> Vec<CrashPoint> {
    CrashPoint::ALL.iter().copied().filter(|&p| matrix_phase(p).0).collect()
}

/// The points a rollback meets.
fn comp_points() -> Vec<CrashPoint> {
    CrashPoint::ALL.iter().copied().filter(|&p| matrix_phase(p).1).collect()
}

pub(crate) use nemoclaw::rebuild::Mode;

fn world(mode: Mode) -> (World, Before) {
    let w = World::new(Opts { locked: true, files: 6 });
    let b = w.snapshot();
    if mode == Mode::Stale {
        w.reap();
    }
    (w, b)
}

fn run_with_crash(w: &World, args: &[&str], point: CrashPoint, hit: u32) -> Output {
    w.home.cmd().env("NEMOCLAW_CRASHPOINT", format!("{point}:{hit}")).args(args).output().unwrap()
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
    check_recovered_from(w, b, mode, resume, 0, ctx)
}

/// [`check_recovered`] for a home whose journal held `runs_before` runs before the rebuild
/// that was interrupted: no new run ⇒ the interruption came before the run was created, and
/// nothing may have changed.
pub(crate) fn check_recovered_from(
    w: &World,
    b: &Before,
    mode: Mode,
    resume: bool,
    runs_before: usize,
    ctx: &str,
) {
    let all = runs(w.path());
    if all.len() == runs_before {
        check_journal(w.path());
        assert_eq!(w.registry_bytes(), b.registry, "{ctx}: registry changed without a run");
        assert_eq!(w.shields_bytes(), b.shields, "{ctx}: shields changed without a run");
        let (names, leftovers) = w.gateway_listing();
        assert!(leftovers.is_empty(), "{ctx}: gateway leftovers: {leftovers:?}");
        match mode {
            Mode::Normal => {
                assert_eq!(names, vec!["alpha", "bystander"], "{ctx}");
                assert_eq!(w.live_id(), b.id, "{ctx}: the sandbox was replaced without a run");
                assert_eq!(w.digest(), b.digest, "{ctx}: workspace changed without a run");
            }
            Mode::Stale => assert_eq!(names, vec!["bystander"], "{ctx}"),
        }
        return;
    }
    assert_eq!(all.len(), runs_before + 1, "{ctx}: one new run");
    // A kill after the commit that finished the run leaves nothing to recover: it succeeded.
    if resume || all.last().unwrap().1 == "succeeded" {
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

pub(crate) fn recover_args(resume: bool) -> [&'static str; 4] {
    ["recover", if resume { "--resume" } else { "--rollback" }, "--sandbox", "alpha"]
}

/// Every forward crash point, at every hit it is reached, then one recovery.
fn forward_matrix(mode: Mode, resume: bool) {
    let mut covered = std::collections::BTreeSet::new();
    let mut cases = 0;
    let points = forward_points();
    for &point in &points {
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
    assert_eq!(covered.len(), points.len());
}

mod crash;
mod data;
mod edges;
mod live;
mod scenarios;
