//! Integration tests: `nemoclaw journal list|show|export|verify|prune` on journals written by
//! the real engine (in-process `engine::start/resume/rollback` with rebuild-shaped plans, and
//! the `internal synthetic` runner in a child process for interruption), read back by the real
//! binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use nemoclaw::engine::{
    self, LockDir, Plan, PlanError, PlanResolver, Probe, RunSpec, Step, StepCtx, StepError,
};
use nemoclaw::journal::audit::{list_query_plan, RunFilter};
use nemoclaw::journal::runs::RunRecord;
use nemoclaw::journal::Journal;
use rstest::rstest;
use serde_json::{json, Value};

use crate::common::{need_sqlite3, sqlite, stderr, stdout, Home};

const NORMAL: &[&str] =
    &["snapshot", "shields_down", "backup", "remove", "onboard", "restore", "policies", "shields"];
const STALE: &[&str] = &["snapshot", "remove", "onboard", "policies", "shields"];
const DAY: i64 = 86_400_000;

/// A rebuild-shaped step: no real effect, except `backup`, which makes a directory under
/// `<home>/rebuild-backups/` (or the run's `backup_dir` param) and returns `backup_path` and
/// `manifest_sha256` like the rebuild's backup step. `apply` fails while `<home>/fail-<name>`
/// exists.
struct FakeStep {
    name: &'static str,
    home: PathBuf,
}

impl Step for FakeStep {
    fn name(&self) -> &'static str {
        self.name
    }
    fn destructive(&self) -> bool {
        self.name == "remove"
    }
    fn probe(&self, _ctx: &StepCtx<'_>) -> Result<Probe, StepError> {
        Ok(Probe::NotDone)
    }
    fn apply(&self, ctx: &StepCtx<'_>) -> Result<Value, StepError> {
        if self.home.join(format!("fail-{}", self.name)).exists() {
            return Err(StepError::new(format!("{} failed on purpose", self.name)));
        }
        if self.name != "backup" {
            return Ok(json!({"ok": true}));
        }
        let dir = match ctx.params.get("backup_dir").and_then(Value::as_str) {
            Some(d) => PathBuf::from(d),
            None => self.home.join("rebuild-backups").join("sb").join(ctx.run_id),
        };
        std::fs::create_dir_all(&dir).map_err(|e| StepError::new(e.to_string()))?;
        std::fs::write(dir.join("rebuild-manifest.json"), b"{}")
            .map_err(|e| StepError::new(e.to_string()))?;
        Ok(json!({"backup_path": dir, "manifest_sha256": "ab".repeat(32), "token": "s3cret"}))
    }
    fn compensate(&self, _ctx: &StepCtx<'_>, _out: Option<&Value>) -> Result<(), StepError> {
        Ok(())
    }
}

pub(crate) fn plan(home: &Path, stale: bool) -> Plan {
    let names = if stale { STALE } else { NORMAL };
    Plan {
        name: "rebuild".into(),
        steps: names
            .iter()
            .map(|n| Box::new(FakeStep { name: n, home: home.into() }) as Box<dyn Step>)
            .collect(),
    }
}

struct Resolver(PathBuf);
impl PlanResolver for Resolver {
    fn plan_for(&self, run: &RunRecord) -> Result<Plan, PlanError> {
        Ok(plan(&self.0, run.mode.as_deref() == Some("stale")))
    }
}

/// Start a rebuild-shaped run through the real engine; returns the run id.
pub(crate) fn rebuild(home: &Path, sandbox: &str, stale: bool, params: Value) -> String {
    let mut j = Journal::open_home(home).unwrap();
    let spec = RunSpec {
        lock_key: format!("local/{sandbox}"),
        sandbox: Some(sandbox.into()),
        gateway: Some("local".into()),
        mode: Some(if stale { "stale" } else { "normal" }.into()),
        params,
        argv: vec!["nemoclaw".into(), sandbox.into(), "rebuild".into(), "--yes".into()],
    };
    let r = engine::start(&mut j, &LockDir::new(home), &plan(home, stale), spec, &engine::Quiet)
        .unwrap();
    r.run_id
}

/// Run `f` again while it is busy, for a moment. These helpers run the engine inside the test
/// process while other tests spawn children: a child forked just as the previous run released
/// its lock holds a copy of the lock's descriptor until it execs (close-on-exec), so the lock
/// can look held for that instant. Not a product path: nemoclaw itself never forks mid-release.
fn busy_retry<T>(mut f: impl FnMut() -> Result<T, engine::EngineError>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match f() {
            Err(engine::EngineError::Busy { .. }) if std::time::Instant::now() < deadline => {
                // Deliberate: the forked child execs within milliseconds.
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other.unwrap(),
        }
    }
}

pub(crate) fn resume(home: &Path, run: &str) {
    let mut j = Journal::open_home(home).unwrap();
    busy_retry(|| {
        engine::resume(&mut j, &LockDir::new(home), run, &Resolver(home.into()), &engine::Quiet)
    });
}

pub(crate) fn rollback(home: &Path, run: &str) {
    let mut j = Journal::open_home(home).unwrap();
    busy_retry(|| {
        engine::rollback(&mut j, &LockDir::new(home), run, &Resolver(home.into()), &engine::Quiet)
    });
}

pub(crate) fn fail(home: &Path, step: &str, on: bool) {
    let f = home.join(format!("fail-{step}"));
    if on {
        std::fs::write(f, b"").unwrap();
    } else {
        std::fs::remove_file(f).unwrap();
    }
}

pub(crate) fn json_out(home: &Home, args: &[&str]) -> Value {
    let o = home.cmd().arg("--json").args(args).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("valid JSON");
    assert_eq!(v["schema_version"], 1);
    v
}

fn run_state(home: &Path, run: &str) -> String {
    let j = Journal::open_readonly(&home.join("journal.sqlite3")).unwrap().unwrap();
    j.conn().query_row("SELECT state FROM runs WHERE id = ?1", [run], |r| r.get(0)).unwrap()
}

pub(crate) fn count(home: &Path, sql: &str) -> i64 {
    let j = Journal::open_readonly(&home.join("journal.sqlite3")).unwrap().unwrap();
    j.conn().query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Replace volatile values (ids, times, hashes, process identity, paths) so a JSON document
/// can be compared with an expected one.
fn normalise(v: &mut Value) {
    const VOLATILE: &[&str] = &[
        "id",
        "run_id",
        "at",
        "now",
        "created_at",
        "updated_at",
        "finished_at",
        "started_at",
        "compensated_at",
        "duration_ms",
        "pid",
        "host",
        "user",
        "argv",
        "hash",
        "plan_fingerprint",
        "binary_version",
        "path",
        "backup_path",
        "lock_key",
        "error",
    ];
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if VOLATILE.contains(&k.as_str()) && !x.is_null() {
                    *x = json!("<v>");
                } else {
                    normalise(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(normalise),
        _ => {}
    }
}

#[test]
fn list_filters_ordering_and_index_use() {
    let h = Home::new();
    // A missing journal is "no runs yet", and reading does not create it.
    let o = h.run(&["journal", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("No runs"), "{}", stderr(&o));
    assert!(!h.path().join("journal.sqlite3").exists());

    let a1 = rebuild(h.path(), "alpha", false, json!({}));
    let b1 = rebuild(h.path(), "beta", true, json!({}));
    fail(h.path(), "onboard", true);
    let a2 = rebuild(h.path(), "alpha", false, json!({}));
    fail(h.path(), "onboard", false);
    rollback(h.path(), &a2);
    let c1 = rebuild(h.path(), "gamma", true, json!({}));

    let ids = |v: &Value| -> Vec<String> {
        v["data"]["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().into())
            .collect()
    };
    let all = json_out(&h, &["journal", "list"]);
    assert_eq!(all["type"], "journal.list");
    assert_eq!(ids(&all), vec![c1.clone(), a2.clone(), b1.clone(), a1.clone()], "newest first");
    let r0 = &all["data"]["runs"][3];
    assert_eq!(r0["sandbox"], "alpha");
    assert_eq!(r0["gateway"], "local");
    assert_eq!(r0["mode"], "normal");
    assert_eq!(r0["state"], "succeeded");
    assert_eq!(r0["last_step"]["name"], "shields");
    assert_eq!(r0["argv"], json!(["nemoclaw", "alpha", "rebuild", "--yes"]));
    assert_eq!(all["data"]["runs"][1]["state"], "rolled_back");

    assert_eq!(
        ids(&json_out(&h, &["journal", "list", "--sandbox", "alpha"])),
        vec![a2.clone(), a1.clone()]
    );
    assert_eq!(
        ids(&json_out(&h, &["journal", "list", "--state", "rolled_back"])),
        vec![a2.clone()]
    );
    assert_eq!(
        ids(&json_out(&h, &["journal", "list", "--limit", "2"])),
        vec![c1.clone(), a2.clone()]
    );
    let t = |i: usize| all["data"]["runs"][i]["created_at"].as_i64().unwrap();
    let iso = |ms: i64| nemoclaw::util::iso_ms(ms);
    assert_eq!(
        ids(&json_out(&h, &["journal", "list", "--since", &iso(t(2)), "--until", &iso(t(0))])),
        vec![a2.clone(), b1.clone()]
    );
    // Relative --since against an injected clock: 1h after the newest run, `2h` covers all.
    let o = h
        .cmd()
        .env("NEMOCLAW_NOW_MS", (t(0) + 3_600_000).to_string())
        .args(["--json", "journal", "list", "--since", "2h", "--state", "succeeded"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ids(&v), vec![c1, b1, a1]);

    let o = h.run(&["journal", "list", "--state", "bogus"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = h.run(&["journal", "list", "--since", "yesterday"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    // Every filter walks an index newest-first; nothing scans the table or sorts it whole.
    let j = Journal::open_readonly(&h.path().join("journal.sqlite3")).unwrap().unwrap();
    for f in [
        RunFilter { limit: Some(50), ..Default::default() },
        RunFilter { sandbox: Some("alpha".into()), ..Default::default() },
        RunFilter { state: Some("failed".into()), ..Default::default() },
        RunFilter { since: Some(1), until: Some(2), ..Default::default() },
    ] {
        let plan = list_query_plan(j.conn(), &f).unwrap();
        let outer: Vec<&str> =
            plan.iter().filter(|(parent, _)| *parent == 0).map(|(_, d)| d.as_str()).collect();
        let all = format!("{plan:?}");
        assert!(outer[0].contains("USING INDEX runs_by_"), "{f:?}: {all}");
        // At most ties (same millisecond) are sorted, never the whole result.
        assert!(!outer.contains(&"USE TEMP B-TREE FOR ORDER BY"), "{f:?}: {all}");
        // Steps are looked up by primary key per listed run.
        assert!(all.contains("sqlite_autoindex_steps_1 (run_id=?)"), "{all}");
    }
}

#[test]
fn show_normal_stale_resumed_rolled_back_and_interrupted_runs() {
    let h = Home::new();
    let normal = rebuild(h.path(), "alpha", false, json!({}));
    let stale = rebuild(h.path(), "beta", true, json!({}));
    fail(h.path(), "restore", true);
    let resumed = rebuild(h.path(), "alpha", false, json!({}));
    fail(h.path(), "restore", false);
    resume(h.path(), &resumed);
    fail(h.path(), "onboard", true);
    let rolled = rebuild(h.path(), "gamma", true, json!({}));
    fail(h.path(), "onboard", false);
    rollback(h.path(), &rolled);
    let interrupted = synthetic_run_stopped(&h, "intr", libc::SIGTERM);

    // Normal: every step with times and durations, the backup artifact with its digest.
    let o = h.run(&["journal", "show", &normal]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for s in NORMAL {
        assert!(out.contains(s), "{s} missing:\n{out}");
    }
    let backup = h.path().join("rebuild-backups/sb").join(&normal);
    assert!(out.contains(&backup.display().to_string()), "{out}");
    assert!(out.contains(&"ab".repeat(32)), "{out}");
    assert!(out.contains("rebuild (normal) of sandbox alpha on gateway local"), "{out}");
    assert!(!out.contains("s3cret"), "secrets never shown");
    let d = json_out(&h, &["journal", "show", &normal]);
    assert_eq!(d["data"]["artifacts"][0]["path"], backup.display().to_string());
    assert_eq!(d["data"]["steps"].as_array().unwrap().len(), NORMAL.len());
    assert!(d["data"]["steps"].as_array().unwrap().iter().all(|s| s["state"] == "done"));

    // Stale: no backup step, no artifact.
    let d = json_out(&h, &["journal", "show", &stale]);
    assert_eq!(d["data"]["mode"], "stale");
    assert_eq!(d["data"]["artifacts"], json!([]));

    // Resumed: the failed step has attempt 2, the failure and the resume are on the timeline.
    let d = json_out(&h, &["journal", "show", &resumed]);
    assert_eq!(d["data"]["state"], "succeeded");
    let restore = &d["data"]["steps"][5];
    assert_eq!((restore["name"].as_str(), restore["attempt"].as_i64()), (Some("restore"), Some(2)));
    let kinds: Vec<&str> = d["data"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in ["step_failed", "run_failed", "run_running", "run_succeeded"] {
        assert!(kinds.contains(&k), "{k} not in {kinds:?}");
    }
    let out = stdout(&h.run(&["journal", "show", &resumed]));
    assert!(out.contains("restore failed on purpose"), "{out}");
    assert!(out.contains("failed -> running"), "{out}");

    // Rolled back: compensations in reverse order, with times.
    let d = json_out(&h, &["journal", "show", &rolled]);
    assert_eq!(d["data"]["state"], "rolled_back");
    let comp: Vec<i64> = d["data"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "step_compensated")
        .map(|e| e["step_seq"].as_i64().unwrap())
        .collect();
    assert_eq!(comp, vec![2, 1, 0], "onboard (failed), remove, snapshot undone in reverse");
    assert!(d["data"]["steps"][0]["compensated_at"].is_i64());

    // Interrupted: the run says so and the timeline has the interruption.
    let d = json_out(&h, &["journal", "show", &interrupted]);
    assert_eq!(d["data"]["state"], "interrupted");
    assert!(d["data"]["events"].as_array().unwrap().iter().any(|e| e["kind"] == "run_interrupted"));
    let out = stdout(&h.run(&["journal", "show", &interrupted[..20]]));
    assert!(out.contains("running -> interrupted"), "{out}");

    // The whole journal is consistent.
    let o = h.run(&["journal", "verify"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}

/// A synthetic run in a child process, sent `signal` while its second step sleeps. Returns the
/// run id.
fn synthetic_run_stopped(h: &Home, key: &str, signal: i32) -> String {
    let child = h
        .cmd()
        .args(["internal", "synthetic", "run", "--steps", "3", "--step-ms", "400", "--key", key])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait (bounded) until step 1 has started, then interrupt.
    let db = h.path().join("journal.sqlite3");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let started = Journal::open_readonly(&db)
            .ok()
            .flatten()
            .and_then(|j| {
                j.conn()
                    .query_row(
                        "SELECT count(*) FROM events WHERE kind = 'step_started' AND step_seq = 1 \
                         AND run_id IN (SELECT id FROM runs WHERE lock_key = ?1)",
                        [key],
                        |r| r.get::<_, i64>(0),
                    )
                    .ok()
            })
            .unwrap_or(0);
        if started > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "synthetic run never started step 1");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = child.id() as i32;
    unsafe { libc::kill(pid, signal) };
    let o = child.wait_with_output().unwrap();
    if signal == libc::SIGKILL {
        // Nothing got to run: the run id comes from the journal.
        assert_eq!(o.status.code(), None);
        let j = Journal::open_readonly(&h.path().join("journal.sqlite3")).unwrap().unwrap();
        return j
            .conn()
            .query_row("SELECT id FROM runs WHERE lock_key = ?1", [key], |r| r.get(0))
            .unwrap();
    }
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let id = stdout(&o).trim().to_owned();
    assert_eq!(run_state(h.path(), &id), "interrupted");
    id
}

#[test]
fn show_takeover_after_a_killed_runner_and_verify_wants_a_holder_for_running_runs() {
    need_sqlite3!();
    let h = Home::new();
    let run = synthetic_run_stopped(&h, "kill", libc::SIGKILL);
    assert_eq!(run_state(h.path(), &run), "running");
    // A killed runner leaves its holder row: still consistent.
    let o = h.run(&["journal", "verify"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&h.run(&["journal", "show", &run]));
    assert!(
        out.lines().any(|l| l.starts_with("State") && l.trim_end().ends_with(" running")),
        "{out}"
    );

    // Without its holder row a running run is an inconsistency.
    sqlite(h.path(), "DELETE FROM holders;");
    let o = h.run(&["journal", "verify"]);
    assert_eq!(o.status.code(), Some(65));
    assert!(stdout(&o).contains("no holder row names it"), "{}", stdout(&o));

    // Resume takes the dead runner's run over; the timeline shows the takeover.
    let o = h.run(&["internal", "synthetic", "resume", "--key", "kill"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let d = json_out(&h, &["journal", "show", &run]);
    assert_eq!(d["data"]["state"], "succeeded");
    let kinds: Vec<&str> = d["data"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"takeover"), "{kinds:?}");
    let out = stdout(&h.run(&["journal", "show", &run]));
    assert!(out.contains("takeover"), "{out}");
    let o = h.run(&["journal", "verify"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}

#[test]
fn show_prefix_ambiguous_unknown() {
    let h = Home::new();
    let a = rebuild(h.path(), "alpha", true, json!({}));
    let b = rebuild(h.path(), "alpha", true, json!({}));
    // UUID v7 ids share their leading timestamp digits.
    let common: String =
        a.chars().zip(b.chars()).take_while(|(x, y)| x == y).map(|(x, _)| x).collect();
    assert!(!common.is_empty());
    let o = h.run(&["journal", "show", &common]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("ambiguous") && e.contains(&a) && e.contains(&b), "{e}");
    let o = h.run(&["journal", "show", "ffffffff"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no run matches `ffffffff`"), "{}", stderr(&o));
    let o = h.run(&["journal", "show", &b.to_uppercase()[..common.len() + 1]]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `id, run_id, step_seq, at, kind, data, prev_hash, hash` of one events row.
type EventRow = (i64, Option<String>, Option<i64>, i64, String, String, String, String);

#[test]
fn export_round_trips_into_the_same_events() {
    let h = Home::new();
    rebuild(h.path(), "alpha", false, json!({}));
    let beta = rebuild(h.path(), "beta", true, json!({}));
    let o = h.run(&["journal", "export"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<Value> =
        stdout(&o).lines().map(|l| serde_json::from_str(l).expect("each line is JSON")).collect();
    let j = Journal::open_readonly(&h.path().join("journal.sqlite3")).unwrap().unwrap();
    let mut stmt = j
        .conn()
        .prepare(
            "SELECT id, run_id, step_seq, at, kind, data, prev_hash, hash FROM events ORDER BY id",
        )
        .unwrap();
    let rows: Vec<EventRow> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(lines.len(), rows.len());
    assert!(rows.len() >= 30);
    for (l, r) in lines.iter().zip(&rows) {
        assert_eq!(l["schema_version"], 1);
        assert_eq!(l["type"], "event");
        let d = &l["data"];
        assert_eq!(d["id"], r.0);
        assert_eq!(d["run_id"].as_str(), r.1.as_deref());
        assert_eq!(d["step_seq"].as_i64(), r.2);
        assert_eq!(d["at"], r.3);
        assert_eq!(d["kind"], r.4.as_str());
        // The compact serialisation of `data` is exactly the hashed text.
        assert_eq!(d["data"].to_string(), r.5);
        assert_eq!(d["prev_hash"], r.6.as_str());
        assert_eq!(d["hash"], r.7.as_str());
    }
    let o = h.run(&["journal", "export", "--sandbox", "beta"]);
    let only: Vec<Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        only.len() as i64,
        count(h.path(), &format!("SELECT count(*) FROM events WHERE run_id = '{beta}'"))
    );
    assert!(only.iter().all(|l| l["data"]["sandbox"] == "beta"));
    let o = h.run(&["journal", "export", "--since", "2999-01-01T00:00:00Z"]);
    assert_eq!(stdout(&o), "");
}

#[rstest]
#[case::edited(
    "DROP TRIGGER events_no_update; UPDATE events SET data = '{\"name\":\"x\"}' WHERE id = 5;",
    5
)]
#[case::deleted("DROP TRIGGER events_no_delete; DELETE FROM events WHERE id = 5;", 6)]
#[case::reordered(
    "DROP TRIGGER events_no_update; UPDATE events SET id = -5 WHERE id = 5; \
     UPDATE events SET id = 5 WHERE id = 6; UPDATE events SET id = 6 WHERE id = -5;",
    5
)]
fn verify_catches_tampering(#[case] attack: &str, #[case] first_bad: i64) {
    need_sqlite3!();
    let h = Home::new();
    rebuild(h.path(), "alpha", true, json!({}));
    let o = h.run(&["journal", "verify"]);
    assert!(o.status.success(), "clean journal: {}", stderr(&o));
    sqlite(h.path(), attack);
    let o = h.run(&["journal", "verify"]);
    assert_eq!(o.status.code(), Some(65), "{}{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains(&format!("at event {first_bad}")), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&h.run(&["--json", "journal", "verify"]).stdout).unwrap();
    assert_eq!(v["data"]["ok"], false);
    assert_eq!(v["data"]["problems"][0]["check"], "chain");
    assert_eq!(v["data"]["problems"][0]["event_id"], first_bad);
}

#[test]
fn verify_catches_inconsistent_rows() {
    need_sqlite3!();
    let h = Home::new();
    fail(h.path(), "onboard", true);
    let run = rebuild(h.path(), "alpha", true, json!({}));
    // A failed run rewritten as succeeded (runs have no triggers): the chain is intact, but the
    // run no longer agrees with its events.
    sqlite(h.path(), &format!("UPDATE runs SET state = 'succeeded' WHERE id = '{run}';"));
    let v: Value = serde_json::from_slice(&h.run(&["--json", "journal", "verify"]).stdout).unwrap();
    assert_eq!(v["data"]["ok"], false);
    let p = &v["data"]["problems"][0];
    assert_eq!(p["check"], "consistency");
    assert_eq!(p["run_id"], run.as_str());
    assert!(
        p["detail"].as_str().unwrap().contains("`succeeded` but its events end in `failed`"),
        "{p}"
    );
    // A step marked done out of order.
    sqlite(h.path(), &format!("UPDATE runs SET state = 'failed' WHERE id = '{run}'; UPDATE steps SET state = 'done' WHERE run_id = '{run}' AND seq = 4;"));
    let o = h.run(&["journal", "verify"]);
    assert_eq!(o.status.code(), Some(65));
    assert!(
        stdout(&o).contains("step 4 is `done` but its events end in `pending`"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn prune_removes_a_finished_prefix_only_and_keeps_the_chain_verifiable() {
    let h = Home::new();
    let home = h.path();
    let shared = home.join("rebuild-backups/alpha/shared");
    let outside = tempfile::tempdir().unwrap();
    // Old finished runs: succeeded (own backup), rolled back, succeeded sharing a backup with
    // the unfinished run below, succeeded with a backup outside rebuild-backups.
    let ok1 = rebuild(home, "alpha", false, json!({}));
    fail(home, "onboard", true);
    let rb = rebuild(home, "beta", true, json!({}));
    fail(home, "onboard", false);
    rollback(home, &rb);
    let ok2 = rebuild(home, "alpha", false, json!({"backup_dir": shared}));
    let ok3 = rebuild(home, "delta", false, json!({"backup_dir": outside.path().join("b")}));
    // A symlinked directory inside rebuild-backups must not lead the removal outside it.
    std::os::unix::fs::symlink(outside.path(), home.join("rebuild-backups/link")).unwrap();
    let ok4 =
        rebuild(home, "delta", false, json!({"backup_dir": home.join("rebuild-backups/link/c")}));
    // Unfinished: failed after its backup (same directory as ok2), then a later finished run.
    fail(home, "restore", true);
    let unfinished = rebuild(home, "alpha", false, json!({"backup_dir": shared}));
    fail(home, "restore", false);
    let later = rebuild(home, "gamma", false, json!({}));
    assert_eq!(run_state(home, &unfinished), "failed");
    let b1 = home.join("rebuild-backups/sb").join(&ok1);
    let b_later = home.join("rebuild-backups/sb").join(&later);
    assert!(b1.is_dir() && shared.is_dir() && b_later.is_dir());

    let future = (nemoclaw::util::now_ms() + 40 * DAY).to_string();
    let prune = |extra: &[&str]| {
        let o = h
            .cmd()
            .env("NEMOCLAW_NOW_MS", &future)
            .args(["--json", "journal", "prune", "--older-than", "30d"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<Value>(&o.stdout).unwrap()["data"].clone()
    };
    let events_before = count(home, "SELECT count(*) FROM events");

    // Dry run: reports, changes nothing.
    let d = prune(&["--dry-run"]);
    assert_eq!(d["runs_removed"].as_array().unwrap().len(), 5);
    assert_eq!(count(home, "SELECT count(*) FROM events"), events_before);
    assert_eq!(count(home, "SELECT count(*) FROM runs"), 7);
    assert!(b1.is_dir());

    // Nothing is old enough yet: nothing changes.
    let o = h.cmd().args(["--json", "journal", "prune", "--older-than", "30d"]).output().unwrap();
    let d0: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(d0["data"]["runs_removed"], json!([]));
    assert_eq!(count(home, "SELECT count(*) FROM events"), events_before);

    let d = prune(&[]);
    let mut removed: Vec<String> =
        d["runs_removed"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().into()).collect();
    removed.sort();
    let mut want = vec![ok1.clone(), rb.clone(), ok2.clone(), ok3.clone(), ok4.clone()];
    want.sort();
    assert_eq!(removed, want);
    // The unfinished run stops the prefix; the later finished run waits for a later prune.
    assert_eq!(d["eligible_remaining"], 1);
    let left: Vec<String> = {
        let j = Journal::open_readonly(&home.join("journal.sqlite3")).unwrap().unwrap();
        let mut s = j.conn().prepare("SELECT id FROM runs ORDER BY id").unwrap();
        let v = s.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap();
        v
    };
    assert_eq!(left, vec![unfinished.clone(), later.clone()]);
    assert_eq!(run_state(home, &unfinished), "failed");
    assert_eq!(
        count(home, &format!("SELECT count(*) FROM steps WHERE run_id = '{unfinished}'")),
        8
    );
    // Backups: the removed runs' own one is gone; the one an unfinished run references, the one
    // outside rebuild-backups and the later run's are kept.
    assert!(!b1.exists(), "backup of a pruned run is removed");
    assert!(shared.join("rebuild-manifest.json").is_file(), "an unfinished run's backup is kept");
    assert!(outside.path().join("b/rebuild-manifest.json").is_file(), "outside backups kept");
    assert!(outside.path().join("c/rebuild-manifest.json").is_file(), "no escape via symlink");
    assert!(d["backups_kept"].to_string().contains("link/c"), "{d}");
    assert!(b_later.is_dir());
    // The checkpoint event and the anchor; the chain verifies; new events chain on.
    assert_eq!(
        count(home, "SELECT count(*) FROM events WHERE kind = 'prune' AND run_id IS NULL"),
        1
    );
    assert_eq!(
        count(home, "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'pruned_head_id'"),
        d["pruned_through"].as_i64().unwrap()
    );
    assert_eq!(count(home, "SELECT count(*) FROM meta WHERE key = 'prune_in_progress'"), 0);
    let o = h.run(&["journal", "verify"]);
    assert!(o.status.success(), "after prune: {}{}", stdout(&o), stderr(&o));
    resume(home, &unfinished);
    let o = h.run(&["journal", "verify"]);
    assert!(o.status.success(), "after prune + append: {}{}", stdout(&o), stderr(&o));

    // Now everything is finished: a second prune (keeping backups) takes the rest.
    let d = prune(&["--keep-backups"]);
    assert_eq!(d["runs_removed"].as_array().unwrap().len(), 2);
    assert_eq!(count(home, "SELECT count(*) FROM runs"), 0);
    assert!(shared.is_dir() && b_later.is_dir(), "--keep-backups keeps them");
    let o = h.run(&["journal", "verify"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}

/// Backups keep the sandbox's modes, read-only directories included, and prune must still
/// remove them when it does not run as root. Root ignores directory permissions, so as root the
/// prune runs as `nobody` (through `setpriv`) in a home handed to it.
#[test]
fn prune_removes_backups_holding_read_only_directories_without_root() {
    use std::os::unix::fs::PermissionsExt;
    let h = Home::new();
    let home = h.path();
    let run = rebuild(home, "alpha", false, json!({}));
    let backup = home.join("rebuild-backups/sb").join(&run);
    let ro = backup.join("workspace/ro");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("kept.txt"), b"x").unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();

    let future = (nemoclaw::util::now_ms() + 40 * DAY).to_string();
    let args = ["--json", "journal", "prune", "--older-than", "30d"];
    let mut c = h.cmd();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        if Command::new("setpriv").arg("--version").output().is_err() {
            eprintln!("skipped: running as root without `setpriv` to drop to an unprivileged user");
            return;
        }
        let st = Command::new("chown").args(["-R", "65534:65534"]).arg(home).status().unwrap();
        assert!(st.success());
        c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(crate::common::bin())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", home)
            .env("NEMOCLAW_HOME", home)
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null());
    }
    let o = c.env("NEMOCLAW_NOW_MS", &future).args(args).output().unwrap();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let d: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(d["data"]["runs_removed"], json!([run]));
    assert!(!backup.exists(), "the pruned run's backup is removed: {}", stderr(&o));
    assert_eq!(count(home, "SELECT count(*) FROM runs"), 0);
}

#[test]
fn output_is_aligned_coloured_only_when_asked_and_json_is_stable() {
    let h = Home::new();
    let run = rebuild(h.path(), "alpha", true, json!({}));
    let created = count(h.path(), "SELECT created_at FROM runs");
    let now = (created + 3 * 3_600_000).to_string();

    let o = h.cmd().env("NEMOCLAW_NOW_MS", &now).args(["journal", "list"]).output().unwrap();
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    // Columns line up: each header starts where its value starts.
    for (head, val) in [("STATE", "succeeded"), ("SANDBOX", "alpha"), ("MODE", "stale")] {
        assert_eq!(lines[0].find(head), lines[1].find(val), "{head}:\n{out}");
    }
    assert!(lines[1].contains(&format!("{} (3h ago)", nemoclaw::util::iso_ms(created))), "{out}");
    assert!(!out.contains('\x1b'), "NO_COLOR and no TTY: no escapes");

    // --color always colours; NO_COLOR does not override an explicit --color always, but
    // --json never carries escapes.
    let o = h
        .cmd()
        .env_remove("NO_COLOR")
        .args(["--color", "always", "journal", "list"])
        .output()
        .unwrap();
    assert!(stdout(&o).contains("\x1b[32msucceeded\x1b[0m"), "{}", stdout(&o));
    let o = h.cmd().args(["--color", "always", "--json", "journal", "list"]).output().unwrap();
    assert!(!stdout(&o).contains('\x1b'));
    let o = h.cmd().env_remove("NO_COLOR").args(["journal", "show", &run]).output().unwrap();
    assert!(!stdout(&o).contains('\x1b'), "not a TTY: no colour");

    // JSON snapshots, volatile fields normalised.
    let mut v = json_out(&h, &["journal", "list"]);
    normalise(&mut v);
    assert_eq!(
        v,
        json!({"schema_version": 1, "type": "journal.list", "data": {"now": "<v>", "runs": [{
            "id": "<v>", "plan": "rebuild", "sandbox": "alpha", "gateway": "local", "mode": "stale",
            "state": "succeeded", "created_at": "<v>", "updated_at": "<v>", "finished_at": "<v>",
            "duration_ms": "<v>", "last_step": {"seq": 4, "name": "shields", "state": "done"},
            "user": "<v>", "host": "<v>", "pid": "<v>", "argv": "<v>", "error": null}]}})
    );
    let mut v = json_out(&h, &["journal", "verify"]);
    normalise(&mut v);
    assert_eq!(
        v,
        json!({"schema_version": 1, "type": "journal.verify", "data": {"ok": true,
            "events_checked": 12, "runs_checked": 1, "steps_checked": 5, "pruned_head_id": null,
            "legacy_runs": 0, "head": {"id": "<v>", "hash": "<v>"}, "expect_head": null,
            "problems": []}})
    );
    let mut v = json_out(&h, &["journal", "show", &run]);
    normalise(&mut v);
    // Every event records the row it creates or changes (compared column by column in
    // `tests/it/evidence.rs`); the rest of the data is the stable format below.
    for e in v["data"]["events"].as_array_mut().unwrap() {
        let d = e["data"].as_object_mut().unwrap();
        assert!(d.remove("row").is_some(), "{e}");
        if e["kind"] == "run_created" {
            assert!(e["data"].as_object_mut().unwrap().remove("step_rows").is_some(), "{e}");
        }
    }
    let step = |seq: i64, name: &str| {
        json!({"seq": seq, "name": name, "version": 1, "destructive": name == "remove",
               "state": "done", "attempt": 1, "started_at": "<v>", "finished_at": "<v>",
               "duration_ms": "<v>", "compensated_at": null, "error": null,
               "output": {"ok": true}, "artifacts": []})
    };
    let ev = |kind: &str, seq: Option<i64>, data: Value| json!({"id": "<v>", "at": "<v>", "step_seq": seq, "kind": kind, "data": data, "hash": "<v>"});
    let mut events = vec![ev(
        "run_created",
        None,
        json!({"lock": "local/alpha", "plan": "rebuild", "plan_fingerprint": "<v>", "sandbox": "alpha",
               "gateway": "local", "mode": "stale", "steps": STALE, "pid": "<v>", "host": "<v>"}),
    )];
    for (i, s) in STALE.iter().enumerate() {
        events.push(ev(
            "step_started",
            Some(i as i64),
            json!({"name": s, "from": "pending", "attempt": 1}),
        ));
        events.push(ev("step_done", Some(i as i64), json!({"name": s, "from": "started"})));
    }
    events.push(ev("run_succeeded", None, json!({"from": "running", "to": "succeeded"})));
    let expected = json!({"schema_version": 1, "type": "journal.show", "data": {
        "id": "<v>", "plan": "rebuild", "sandbox": "alpha", "gateway": "local", "mode": "stale",
        "state": "succeeded", "created_at": "<v>", "updated_at": "<v>", "finished_at": "<v>",
        "duration_ms": "<v>", "last_step": {"seq": 4, "name": "shields", "state": "done"},
        "user": "<v>", "host": "<v>", "pid": "<v>", "argv": "<v>", "error": null,
        "lock_key": "<v>", "plan_fingerprint": "<v>", "binary_version": "<v>", "params": {},
        "steps": STALE.iter().enumerate().map(|(i, s)| step(i as i64, s)).collect::<Vec<_>>(),
        "events": events, "now": "<v>", "artifacts": []}});
    assert_eq!(v, expected, "{}", serde_json::to_string_pretty(&v).unwrap());
}

/// Colour follows the terminal: on a pseudo-terminal (`script` from util-linux) `auto` colours,
/// and `NO_COLOR` turns it off there too.
#[test]
fn colour_on_a_tty_unless_no_color() {
    let script = Path::new("/usr/bin/script");
    if !script.exists() {
        eprintln!("skipped: /usr/bin/script (util-linux) is not installed");
        return;
    }
    let h = Home::new();
    rebuild(h.path(), "alpha", true, json!({}));
    let on_tty = |no_color: bool| {
        let line = format!(
            "{} --home {} journal list",
            crate::common::bin().display(),
            h.path().display()
        );
        let mut c = Command::new(script);
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", h.path())
            .env("TERM", "xterm")
            .args(["-qec", &line, "/dev/null"])
            .stdin(std::process::Stdio::null());
        if no_color {
            c.env("NO_COLOR", "1");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let coloured = on_tty(false);
    assert!(coloured.contains("\x1b[32msucceeded\x1b[0m"), "{coloured:?}");
    let plain = on_tty(true);
    assert!(plain.contains("succeeded") && !plain.contains('\x1b'), "{plain:?}");
}

/// The journal and its `-wal`/`-shm` are 0600 whatever the umask (item 8).
#[test]
fn journal_files_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let h = Home::new();
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o022) };
    let j = Journal::open_home(h.path()).unwrap();
    unsafe { libc::umask(old) };
    for name in ["journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm"] {
        let m = std::fs::metadata(h.path().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{name}");
    }
    drop(j);
    // A journal written by a whole run stays private.
    let h2 = Home::new();
    rebuild(h2.path(), "alpha", true, json!({}));
    let m = std::fs::metadata(h2.path().join("journal.sqlite3")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
}

/// A foreign SQLite database (tables, `user_version` 0) where the journal should be is corrupt
/// input: exit 65 naming the file, for readers and writers alike, and the file is untouched.
#[test]
fn foreign_database_as_journal_is_refused_and_left_untouched() {
    let h = Home::new();
    let path = h.path().join("journal.sqlite3");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE notes(x TEXT); INSERT INTO notes VALUES ('mine');").unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    for args in [
        &["journal", "verify"][..],
        &["journal", "list"],
        &["journal", "export"],
        &["recover"],
        &["recover", "--rollback", "--sandbox", "alpha"],
    ] {
        let o = h.run(args);
        assert_eq!(o.status.code(), Some(65), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains(&path.display().to_string()), "{args:?}: {err}");
        assert!(err.contains("not a nemoclaw journal"), "{args:?}: {err}");
        assert_eq!(std::fs::read(&path).unwrap(), before, "{args:?} changed the file");
    }
    let e = Journal::open_home(h.path()).unwrap_err();
    assert!(e.to_string().contains("not a nemoclaw journal"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert!(!h.path().join("journal.sqlite3-wal").exists());
}
