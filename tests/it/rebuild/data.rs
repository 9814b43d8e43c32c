//! Journaled data that does not decode: a run's params or a step's output that this nemoclaw
//! cannot read as its types is corrupt input (exit 65), refused before anything changes — not
//! defaulted, and not taken for an unknown plan.

use super::*;

/// Every row of the journal's run tables, as text, for "nothing changed" comparisons.
fn journal_rows(home: &Path) -> Vec<String> {
    let c = rusqlite::Connection::open(home.join("journal.sqlite3")).unwrap();
    let mut out = Vec::new();
    for t in ["runs", "steps", "events", "holders"] {
        let mut st = c.prepare(&format!("SELECT * FROM {t} ORDER BY rowid")).unwrap();
        let n = st.column_count();
        let rows = st
            .query_map([], |r| {
                (0..n)
                    .map(|i| r.get_ref(i).map(|v| format!("{v:?}")))
                    .collect::<Result<Vec<_>, _>>()
            })
            .unwrap();
        for r in rows {
            out.push(format!("{t}: {}", r.unwrap().join(" | ")));
        }
    }
    out
}

/// Run `sql` on the journal (binding `?1` to `run`).
fn edit(home: &Path, sql: &str, run: &str) {
    let c = rusqlite::Connection::open(home.join("journal.sqlite3")).unwrap();
    assert_eq!(c.execute(sql, [run]).unwrap(), 1, "{sql}");
}

/// The whole host as a recovery could change it: registry, shields, the gateway's sandboxes,
/// the workspace, the journal.
fn host(w: &World) -> String {
    format!(
        "{:?}",
        (w.registry_bytes(), w.shields_bytes(), w.gateway_listing(), w.live_id(), w.digest())
    )
}

/// A normal rebuild that failed after its point of no return (the restore's upload fails):
/// its run waits for `recover`, holding a snapshot, a backup and a replacement sandbox.
fn failed_after_remove() -> (World, Before, String) {
    let w = World::new(Opts::default());
    let b = w.snapshot();
    w.fault(json!({"fail": {"upload": "the upload fails on purpose"}}));
    let o = w.rebuild();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    w.clear_fault();
    let all = runs(w.path());
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].1, "failed");
    (w, b, all[0].0.clone())
}

fn assert_refused_as_corrupt(w: &World, args: &[&str], what: &str) {
    let (rows, host_before) = (journal_rows(w.path()), host(w));
    let o = w.home.run(args);
    assert_eq!(o.status.code(), Some(65), "{args:?}: {}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains(what) && e.contains("cannot be decoded"), "{args:?}: {e}");
    assert!(!e.contains("does not know"), "not an unknown plan: {e}");
    assert_eq!(journal_rows(w.path()), rows, "{args:?}: the journal changed");
    assert_eq!(host(w), host_before, "{args:?}: the host changed");
}

/// Params whose `shields_locked` is not a boolean: resume and rollback both refuse with exit
/// 65 and change nothing (before, the value was read as `false` or the run reported as an
/// unknown plan); with the params put back, the rollback restores the sandbox as it was.
#[test]
fn params_that_do_not_decode_are_refused_as_corrupt_and_change_nothing() {
    let (w, b, run) = failed_after_remove();
    let c = rusqlite::Connection::open(w.path().join("journal.sqlite3")).unwrap();
    let params: String =
        c.query_row("SELECT params FROM runs WHERE id = ?1", [&run], |r| r.get(0)).unwrap();
    drop(c);
    assert!(params.contains(r#""shields_locked":true"#), "{params}");
    edit(
        w.path(),
        "UPDATE runs SET params = json_set(params, '$.shields_locked', 'yes') WHERE id = ?1",
        &run,
    );
    for args in
        [&["recover", "--resume", run.as_str()][..], &["recover", "--rollback", run.as_str()]]
    {
        assert_refused_as_corrupt(&w, args, "journaled params");
    }
    let mode = "UPDATE runs SET params = json_set(params, '$.mode', 'sideways', '$.shields_locked', json('true')) WHERE id = ?1";
    edit(w.path(), mode, &run);
    assert_refused_as_corrupt(&w, &["recover", "--rollback", &run], "journaled params");

    // The same bytes as before: the run rolls back, and the host is as it was.
    let c = rusqlite::Connection::open(w.path().join("journal.sqlite3")).unwrap();
    c.execute("UPDATE runs SET params = ?1 WHERE id = ?2", [&params, &run]).unwrap();
    drop(c);
    assert_ok(&w.home.run(&["recover", "--rollback", &run]));
    check_rolled_back(&w, &b, "normal");
}

/// A step output that does not decode (the backup's file count is text): the rollback that
/// would read it, the resume, and accepting a damaged backup all refuse with exit 65 before
/// anything changes; put back, the rollback restores the sandbox.
#[test]
fn a_step_output_that_does_not_decode_is_refused_as_corrupt_and_changes_nothing() {
    let (w, b, run) = failed_after_remove();
    let c = rusqlite::Connection::open(w.path().join("journal.sqlite3")).unwrap();
    let output: String = c
        .query_row("SELECT output FROM steps WHERE run_id = ?1 AND name = 'backup'", [&run], |r| {
            r.get(0)
        })
        .unwrap();
    drop(c);
    edit(
        w.path(),
        "UPDATE steps SET output = json_set(output, '$.files', 'many') WHERE run_id = ?1 AND name = 'backup'",
        &run,
    );
    for args in [
        &["recover", "--rollback", run.as_str()][..],
        &["recover", "--resume", run.as_str()],
        &["recover", "--rollback", run.as_str(), "--accept-damaged-backup"],
    ] {
        assert_refused_as_corrupt(&w, args, "output of step `backup`");
    }
    let c = rusqlite::Connection::open(w.path().join("journal.sqlite3")).unwrap();
    c.execute(
        "UPDATE steps SET output = ?1 WHERE run_id = ?2 AND name = 'backup'",
        [&output, &run],
    )
    .unwrap();
    drop(c);
    assert_ok(&w.home.run(&["recover", "--rollback", &run]));
    check_rolled_back(&w, &b, "normal");
}

/// A run journaled before `policy_sha256` existed (its snapshot output lacks it), with fields
/// a later nemoclaw might add (params and outputs carry keys this one does not know): still
/// read as it was written, and resumed to a finished rebuild.
#[test]
fn older_and_newer_journals_still_resume() {
    let (w, b, run) = failed_after_remove();
    edit(
        w.path(),
        "UPDATE steps SET output = json_set(json_remove(output, '$.policy_sha256'), '$.later', 1) WHERE run_id = ?1 AND name = 'snapshot'",
        &run,
    );
    edit(
        w.path(),
        "UPDATE runs SET params = json_set(params, '$.later', json('{\"x\": 1}')) WHERE id = ?1",
        &run,
    );
    assert_ok(&w.home.run(&["recover", "--resume", &run]));
    check_rebuilt(&w, &b, "normal");
    assert_eq!(runs(w.path()), vec![(run, "succeeded".to_owned())]);
}
