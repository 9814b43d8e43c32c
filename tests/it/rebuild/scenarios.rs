//! Rebuild scenarios on the local gateway: normal, stale, refusals, failures and what they leave.

use super::*;

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

/// A failure before the delete (the backup's download fails, as an `ssh` failure does through
/// openshell) is rolled back in the same command: shields locked again, no backup directory
/// left, registry bytes as before, the run `rolled_back`, and the sandbox is not blocked.
#[test]
fn failure_before_the_delete_is_rolled_back_at_once_and_blocks_nothing() {
    let w = World::new(Opts::default());
    let b = w.snapshot();
    assert!(b.shields.is_some(), "the sandbox starts locked");
    w.fault(json!({"fail": {"download": "ssh tar extract exited with status 255"}}));
    let o = w.rebuild();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("step `backup` failed") && err.contains("status 255"), "{err}");
    assert!(err.contains("Nothing was changed (shields are locked again)"), "{err}");
    assert!(!err.contains("recover --"), "nothing to recover: {err}");
    assert_eq!(w.registry_bytes(), b.registry, "registry bytes");
    assert_eq!(w.shields_bytes(), b.shields, "shields as they were");
    assert_eq!(w.digest(), b.digest, "sandbox untouched");
    assert_eq!(w.live_id(), b.id, "the same sandbox");
    assert_eq!(runs(w.path()).last().unwrap().1, "rolled_back");
    check_journal(w.path());
    let backups = w.path().join("rebuild-backups/alpha");
    let left: Vec<_> = std::fs::read_dir(&backups)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "the uncommitted backup directory is removed: {left:?}");
    w.clear_fault();
    assert_ok(&w.rebuild());
}

/// Every host file the run will read is checked in preflight: a corrupt onboard session (like
/// a corrupt shields file) is exit 65 naming the file, nothing journaled, nothing changed, the
/// file itself untouched; `destroy` is not blocked by a run that never started.
#[rstest::rstest]
#[case::session("onboard-session.json")]
#[case::shields("state/shields-alpha.json")]
fn corrupt_host_file_is_refused_in_preflight_with_nothing_journaled(#[case] file: &str) {
    let w = World::new(Opts::default());
    let b = w.snapshot();
    let path = w.path().join(file);
    std::fs::write(&path, b"{ not json").unwrap();
    let o = w.rebuild();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(65), "{err}");
    assert!(err.contains(file.rsplit('/').next().unwrap()), "names the file: {err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"{ not json", "never overwritten");
    assert_eq!(w.registry_bytes(), b.registry);
    assert_eq!((w.digest(), w.live_id()), (b.digest, b.id));
    let journaled = if w.path().join("journal.sqlite3").exists() { runs(w.path()) } else { vec![] };
    assert!(journaled.is_empty(), "nothing journaled: {journaled:?}");
}

/// The crash NemoClaw could not survive: the old sandbox deleted, its registry row still there.
/// NemoClaw's next rebuild would take the stale path and skip the backup it had just made; here
/// every command points at the unfinished run, and resuming it restores that backup.
#[test]
fn crash_between_delete_and_registry_removal_then_resume_restores_the_backup() {
    let w = World::new(Opts::default());
    let b = w.snapshot();
    // mid_effect hits: 1 = backup (after the download), 2 = remove (after the delete).
    let o = run_with_crash(&w, &["alpha", "rebuild", "--yes"], CrashPoint::MidEffect, 2);
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
    let o = run_with_crash(&w, &["alpha", "rebuild", "--yes"], CrashPoint::AfterEffect, 4);
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
