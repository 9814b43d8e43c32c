//! The journal as evidence: `journal verify` covers every column an auditor reads or a
//! restore trusts (rows edited with the `sqlite3` shell, as an attacker with write access
//! would), an anchor kept outside the file detects a chain rewritten as a whole, and a journal
//! written before events recorded whole rows still opens and verifies.

use std::path::Path;

use nemoclaw::journal::chain::{event_hash, EventFields, GENESIS};
use rstest::rstest;
use serde_json::{json, Value};

use crate::audit::{fail, json_out, rebuild};
use crate::common::{need_sqlite3, sqlite, sqlite3_cmd, stderr, stdout, Home};

fn db(home: &Path) -> std::path::PathBuf {
    home.join("journal.sqlite3")
}

fn digest(home: &Path) -> String {
    nemoclaw::util::sha256_hex(&std::fs::read(db(home)).unwrap())
}

/// `journal verify` on a journal whose rows were edited: exit 65, the first problem is a
/// `rows` problem naming the run and `column`, at the event that recorded the true value, and
/// the file is left as it was (verify reads only).
fn assert_caught(h: &Home, run: &str, column: &str, event: i64) {
    let before = digest(h.path());
    let o = h.run(&["journal", "verify"]);
    assert_eq!(o.status.code(), Some(65), "{}{}", stdout(&o), stderr(&o));
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(out.contains("rows         FAILED"), "{out}");
    assert!(out.contains(run), "the run is named: {out}");
    assert!(err.contains(column) && err.contains("(the row was edited)"), "{err}");
    assert!(err.contains(&format!("failed verification at event {event}")), "{err}");
    let o = h.cmd().args(["--json", "journal", "verify"]).output().unwrap();
    assert_eq!(o.status.code(), Some(65));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let p = &v["data"]["problems"][0];
    assert_eq!(p["check"], "rows", "{v}");
    assert_eq!(p["run_id"], run);
    assert_eq!(p["event_id"], event, "{p}");
    assert!(p["detail"].as_str().unwrap().starts_with(column), "{p}");
    assert_eq!(digest(h.path()), before, "verify changed the journal");
}

#[rstest]
#[case::user("UPDATE runs SET user = 'mallory'", "runs.user", "run_created", None)]
#[case::host("UPDATE runs SET host = 'elsewhere'", "runs.host", "run_created", None)]
#[case::argv(
    "UPDATE runs SET argv = json_array('nemoclaw', 'alpha', 'status')",
    "runs.argv",
    "run_created",
    None
)]
#[case::created_at(
    "UPDATE runs SET created_at = created_at - 86400000",
    "runs.created_at",
    "run_created",
    None
)]
#[case::params(
    "UPDATE runs SET params = '{\"backup_dir\":\"/x\"}'",
    "runs.params",
    "run_created",
    None
)]
#[case::binary_version(
    "UPDATE runs SET binary_version = '9.9.9'",
    "runs.binary_version",
    "run_created",
    None
)]
#[case::finished_at(
    "UPDATE runs SET finished_at = finished_at + 1",
    "runs.finished_at",
    "run_succeeded",
    None
)]
#[case::error("UPDATE runs SET error = 'nothing happened'", "runs.error", "run_succeeded", None)]
#[case::backup_path(
    "UPDATE steps SET output = json_set(output, '$.backup_path', '/tmp/planted') WHERE seq = 2",
    "steps.output of step 2",
    "step_done",
    Some(2)
)]
#[case::manifest_sha256(
    "UPDATE steps SET output = json_set(output, '$.manifest_sha256', printf('%064d', 0)) WHERE seq = 2",
    "steps.output of step 2",
    "step_done",
    Some(2)
)]
#[case::input(
    "UPDATE steps SET input = json_set(input, '$.host', 'elsewhere') WHERE seq = 0",
    "steps.input of step 0",
    "step_done",
    Some(0)
)]
#[case::attempt(
    "UPDATE steps SET attempt = 3 WHERE seq = 3",
    "steps.attempt of step 3",
    "step_done",
    Some(3)
)]
#[case::started_at(
    "UPDATE steps SET started_at = started_at - 5 WHERE seq = 4",
    "steps.started_at of step 4",
    "step_done",
    Some(4)
)]
#[case::version(
    "UPDATE steps SET version = 2 WHERE seq = 1",
    "steps.version of step 1",
    "run_created",
    None
)]
fn verify_names_every_edited_column(
    #[case] edit: &str,
    #[case] column: &str,
    #[case] kind: &str,
    #[case] seq: Option<i64>,
) {
    need_sqlite3!();
    let h = Home::new();
    let run = rebuild(h.path(), "alpha", false, json!({}));
    let o = h.run(&["journal", "verify"]);
    assert!(o.status.success(), "clean journal: {}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("rows         ok"), "{}", stdout(&o));
    // The event that recorded the true value: the last one of `kind` about that row.
    let seq_cond = seq.map(|s| format!("step_seq = {s}")).unwrap_or("step_seq IS NULL".into());
    let event: i64 = sqlite(
        h.path(),
        &format!("SELECT max(id) FROM events WHERE kind = '{kind}' AND {seq_cond}"),
    )
    .parse()
    .unwrap();
    let before = sqlite(h.path(), "SELECT count(*), sum(length(data)) FROM events");
    // The journal holds this one run, so the edit needs no run condition.
    sqlite(h.path(), edit);
    assert_eq!(sqlite(h.path(), "SELECT count(*), sum(length(data)) FROM events"), before);
    assert_caught(&h, &run, column, event);
}

/// A step row deleted: the run's `run_created` says how many steps it had.
#[test]
fn verify_counts_the_steps_run_created_recorded() {
    need_sqlite3!();
    let h = Home::new();
    fail(h.path(), "remove", true);
    let run = rebuild(h.path(), "alpha", false, json!({}));
    sqlite(h.path(), &format!("DELETE FROM steps WHERE run_id = '{run}' AND seq = 7"));
    let o = h.cmd().args(["--json", "journal", "verify"]).output().unwrap();
    assert_eq!(o.status.code(), Some(65));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows: Vec<&Value> =
        v["data"]["problems"].as_array().unwrap().iter().filter(|p| p["check"] == "rows").collect();
    assert_eq!(rows.len(), 1, "{v}");
    assert_eq!(rows[0]["event_id"], 1);
    assert!(
        rows[0]["detail"].as_str().unwrap().contains("recorded 8 step(s), but the journal has 7"),
        "{v}"
    );
}

/// An event's hashed fields, as read back for rehashing.
type EventRow = (i64, Option<String>, Option<i64>, i64, String, String);

/// Rewrite the journal as someone with write access and time would: edit a row and the event
/// that recorded it, then recompute every hash from the genesis on, so that everything in the
/// file agrees again.
fn rewrite_consistently(home: &Path, run: &str) {
    let c = rusqlite::Connection::open(db(home)).unwrap();
    c.execute_batch(&format!(
        "DROP TRIGGER events_no_update;
         UPDATE runs SET user = 'mallory' WHERE id = '{run}';
         UPDATE events SET data = json_set(data, '$.row.user', 'mallory')
          WHERE run_id = '{run}' AND kind = 'run_created';"
    ))
    .unwrap();
    let rows: Vec<EventRow> = c
        .prepare("SELECT id, run_id, step_seq, at, kind, data FROM events ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut prev = GENESIS.to_owned();
    for (id, run_id, step_seq, at, kind, data) in rows {
        let f =
            EventFields { id, run_id: run_id.as_deref(), step_seq, at, kind: &kind, data: &data };
        let hash = event_hash(&prev, &f);
        c.execute("UPDATE events SET prev_hash = ?2, hash = ?3 WHERE id = ?1", (id, &prev, &hash))
            .unwrap();
        prev = hash;
    }
}

#[test]
fn an_anchor_outside_the_file_detects_a_chain_rewritten_as_a_whole() {
    need_sqlite3!();
    let h = Home::new();
    let run = rebuild(h.path(), "alpha", false, json!({}));
    let v = json_out(&h, &["journal", "verify"]);
    let (head_id, head) = (
        v["data"]["head"]["id"].as_i64().unwrap(),
        v["data"]["head"]["hash"].as_str().unwrap().to_owned(),
    );
    assert_eq!(head.len(), 64);
    assert_eq!(
        head,
        sqlite(h.path(), "SELECT hash FROM events ORDER BY id DESC LIMIT 1"),
        "the head is the last event's hash"
    );
    let o = h.run(&["journal", "verify"]);
    assert!(stdout(&o).contains(&format!("head         event {head_id} {head}")), "{}", stdout(&o));

    // The journal goes on; the recorded head stays on the chain.
    rebuild(h.path(), "beta", true, json!({}));
    let o = h.run(&["journal", "verify", "--expect-head", &head.to_ascii_uppercase()]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains(&format!("anchor       ok (the expected head is event {head_id};")),
        "{}",
        stdout(&o)
    );
    let v = json_out(&h, &["journal", "verify", "--expect-head", &head]);
    assert_eq!(v["data"]["expect_head"]["found_at"], head_id);
    assert_eq!(v["data"]["expect_head"]["events_since"], 12, "the stale run's 12 events");

    // Rewritten as a whole: without the anchor nothing in the file can tell.
    rewrite_consistently(h.path(), &run);
    assert_eq!(sqlite(h.path(), &format!("SELECT user FROM runs WHERE id = '{run}'")), "mallory");
    let v = json_out(&h, &["journal", "verify"]);
    assert_eq!(v["data"]["ok"], true, "a consistent rewrite passes on its own: {v}");
    let before = digest(h.path());
    let o = h.run(&["journal", "verify", "--expect-head", &head]);
    assert_eq!(o.status.code(), Some(65), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("anchor       FAILED"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains(&format!("the expected head {head} is not on the chain")),
        "{}",
        stderr(&o)
    );
    let o = h.cmd().args(["--json", "journal", "verify", "--expect-head", &head]).output().unwrap();
    assert_eq!(o.status.code(), Some(65));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["data"]["ok"], false);
    assert_eq!(v["data"]["problems"][0]["check"], "anchor");
    assert_eq!(v["data"]["expect_head"]["found_at"], Value::Null);
    assert_ne!(v["data"]["head"]["hash"], head.as_str());
    assert_eq!(digest(h.path()), before, "verify changed the journal");

    // Not a hash: a usage error before anything is read.
    let o = h.run(&["journal", "verify", "--expect-head", "abc"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // No journal cannot contain a head.
    let empty = Home::new();
    let o = empty.run(&["journal", "verify", "--expect-head", &head]);
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    assert!(!db(empty.path()).exists());
}

/// A journal written by schema 1 (`tests/fixtures/journal-v1.sql`: three synthetic runs, as the
/// 0.1.0 writer left them). It verifies as it is, read-only; the next writer migrates it to
/// schema 2; its old runs are checked on what their `run_created` recorded (lock, plan,
/// fingerprint, sandbox, gateway, mode, pid, host, creation time, step names) and counted as
/// `legacy_runs`; new runs are covered whole.
#[test]
fn a_journal_from_before_row_images_opens_verifies_and_says_what_is_covered() {
    need_sqlite3!();
    let h = Home::new();
    let o = sqlite3_cmd()
        .arg(db(h.path()))
        .stdin(
            std::fs::File::open(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/journal-v1.sql"
            ))
            .unwrap(),
        )
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sqlite(h.path(), "PRAGMA user_version"), "1");
    let before = digest(h.path());
    let v = json_out(&h, &["journal", "verify"]);
    assert_eq!(v["data"]["ok"], true, "{v}");
    assert_eq!(
        (v["data"]["runs_checked"].as_i64(), v["data"]["legacy_runs"].as_i64()),
        (Some(3), Some(3))
    );
    let o = h.run(&["journal", "verify"]);
    assert!(
        stdout(&o).contains("3 run(s) from before schema 2: only their creation facts are covered"),
        "{}",
        stdout(&o)
    );
    assert_eq!(digest(h.path()), before, "reading does not migrate");

    // A writer migrates it and adds a run covered whole.
    let o = h.run(&["internal", "synthetic", "run", "--steps", "1", "--key", "fresh"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(sqlite(h.path(), "PRAGMA user_version"), "2");
    assert_eq!(
        sqlite(h.path(), "SELECT value FROM meta WHERE key = 'row_images_from_event'"),
        "25"
    );
    let v = json_out(&h, &["journal", "verify"]);
    assert_eq!(v["data"]["ok"], true, "{v}");
    assert_eq!(
        (v["data"]["runs_checked"].as_i64(), v["data"]["legacy_runs"].as_i64()),
        (Some(4), Some(3))
    );
    let old = "01a23762-19e0-72e1-8268-4dea9480b43f";
    let new = sqlite(h.path(), "SELECT id FROM runs WHERE lock_key = 'fresh'");

    // What an old run's `run_created` recorded is covered...
    sqlite(h.path(), &format!("UPDATE runs SET host = 'elsewhere' WHERE id = '{old}'"));
    assert_caught(&h, old, "runs.host", 1);
    sqlite(h.path(), &format!("UPDATE runs SET host = 'vm' WHERE id = '{old}'"));
    sqlite(h.path(), &format!("UPDATE steps SET name = 'sX' WHERE run_id = '{old}' AND seq = 1"));
    assert_caught(&h, old, "steps.name of step 1", 1);
    sqlite(h.path(), &format!("UPDATE steps SET name = 's1' WHERE run_id = '{old}' AND seq = 1"));
    assert_eq!(json_out(&h, &["journal", "verify"])["data"]["ok"], true);
    // ...what it did not record is not (the documented limit for schema-1 runs)...
    sqlite(h.path(), &format!("UPDATE runs SET user = 'mallory' WHERE id = '{old}'"));
    let v = json_out(&h, &["journal", "verify"]);
    assert_eq!(v["data"]["ok"], true, "{v}");
    // ...and a new run is covered whole.
    sqlite(h.path(), &format!("UPDATE runs SET user = 'mallory' WHERE id = '{new}'"));
    let event: i64 =
        sqlite(h.path(), &format!("SELECT min(id) FROM events WHERE run_id = '{new}'"))
            .parse()
            .unwrap();
    assert_eq!(event, 25);
    assert_caught(&h, &new, "runs.user", event);
}

/// Prune removes a prefix of the chain on purpose: a head recorded at the point where the prune
/// cut is still confirmed (it is the prune anchor), one recorded earlier cannot be, and verify
/// says why.
#[test]
fn an_anchor_survives_a_prune_only_at_the_prune_point() {
    need_sqlite3!();
    let h = Home::new();
    rebuild(h.path(), "alpha", false, json!({}));
    let early =
        json_out(&h, &["journal", "verify"])["data"]["head"]["hash"].as_str().unwrap().to_owned();
    rebuild(h.path(), "beta", true, json!({}));
    let v = json_out(&h, &["journal", "verify"]);
    let (cut_id, cut) = (
        v["data"]["head"]["id"].as_i64().unwrap(),
        v["data"]["head"]["hash"].as_str().unwrap().to_owned(),
    );
    std::thread::sleep(std::time::Duration::from_millis(5));
    let o = h.run(&["journal", "prune", "--older-than", "1ms"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        sqlite(h.path(), "SELECT value FROM meta WHERE key = 'pruned_head_id'"),
        cut_id.to_string()
    );

    let v = json_out(&h, &["journal", "verify", "--expect-head", &cut]);
    assert_eq!(v["data"]["expect_head"]["found_at"], cut_id, "{v}");
    assert_eq!(v["data"]["expect_head"]["events_since"], 1, "the prune checkpoint");
    let o =
        h.cmd().args(["--json", "journal", "verify", "--expect-head", &early]).output().unwrap();
    assert_eq!(o.status.code(), Some(65));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["data"]["problems"][0]["check"], "anchor");
    let d = v["data"]["problems"][0]["detail"].as_str().unwrap();
    assert!(d.contains(&format!("events up to {cut_id} were")), "{d}");
}
