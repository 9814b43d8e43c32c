//! Power-loss tests: real `nemoclaw` rebuilds and recoveries on a file system that forgets
//! everything that was not made durable (see [`memfs`]), cut at a random operation, then
//! recovered from what a disk would hold after the power came back.
//!
//! Unlike the kill -9 tests, the page cache does not survive here: a missing `fsync` of a
//! file, of a directory after a create or rename, or a journal commit that claims files the
//! disk does not have yet, shows up as a difference in the same invariants the kill -9 soak
//! checks (registry bytes, workspace digest, shields bytes, no orphans, journal clean).
//!
//! `NEMOCLAW_POWER_SEED` replays a run; `NEMOCLAW_POWER_CUTS=N` changes the number of cuts,
//! `NEMOCLAW_POWER_CUTS=every` cuts at every operation instead (minutes, not for CI). Skips,
//! saying why, where FUSE cannot be mounted.

mod harness;
mod memfs;

use std::time::Instant;

use nemoclaw::host::backup::Backup;
use nemoclaw::names::SandboxName;

use crate::common::killed;
use crate::common::{nanos, stderr};
use crate::rebuild::Mode;
use harness::{
    copy_dir, count_rebuild, differences, env_u64, fuse_available, mount, power_cut_at_crash_point,
    run_on_power_fs, soak, template,
};
use memfs::clear_dir;

/// The seeded power-cut soak: normal and stale rebuilds, on fresh homes (the journal is
/// created during the run) and on homes with history, cut at a uniformly chosen operation of
/// the rebuild or of the first recovery, recovered alternately with `--resume` and
/// `--rollback`, about half of the images with torn unsynced writes.
#[test]
fn power_loss_soak() {
    if !fuse_available("power_loss_soak") {
        return;
    }
    let seed = env_u64("NEMOCLAW_POWER_SEED").unwrap_or_else(nanos);
    // `NEMOCLAW_POWER_CUTS=every`: every operation of each rebuild once.
    let cuts = match std::env::var("NEMOCLAW_POWER_CUTS").as_deref() {
        Ok("every") => None,
        _ => Some(env_u64("NEMOCLAW_POWER_CUTS").unwrap_or(100)),
    };
    eprintln!(
        "power_loss_soak: seed {seed} (replay with NEMOCLAW_POWER_SEED={seed}), cuts {cuts:?}"
    );
    let started = Instant::now();
    let kinds =
        [(Mode::Normal, false), (Mode::Stale, false), (Mode::Normal, true), (Mode::Stale, true)];
    let Some(r) = soak(seed, cuts, &kinds, &[]) else { return };
    eprintln!(
        "power_loss_soak: seed {seed}: {} cuts, {} distinct operations cut at, {} journal \
         windows, {} torn files, {} differences, {:?}",
        r.cuts,
        r.windows.len(),
        r.steps.len(),
        r.torn_files,
        r.failures.len(),
        started.elapsed()
    );
    for (w, n) in r.steps.iter().chain(&r.windows) {
        eprintln!("  {n:4}  {w}");
    }
    assert!(
        r.failures.is_empty(),
        "seed {seed}: {} differences:\n{}",
        r.failures.len(),
        r.failures.join("\n")
    );
}

/// The soak finds the bug this suite was built for: with backups and state copies made
/// durable by `syncfs` alone (as before the per-file fallback), which on FUSE reaches no
/// daemon, power cuts after the backup step lose backed-up files.
#[test]
fn power_loss_soak_finds_backups_synced_only_by_syncfs() {
    if !fuse_available("power_loss_soak_finds_backups_synced_only_by_syncfs") {
        return;
    }
    let seed = env_u64("NEMOCLAW_POWER_SEED").unwrap_or_else(nanos);
    eprintln!("power_loss_soak_finds_backups_synced_only_by_syncfs: seed {seed}");
    let env = [("NEMOCLAW_SYNC_TREE", "syncfs")];
    let Some(r) = soak(seed, Some(12), &[(Mode::Normal, false)], &env) else { return };
    let lost =
        r.failures.iter().filter(|f| f.contains("workspace") || f.contains("backup")).count();
    assert!(lost >= 1, "seed {seed}: no lost workspace or backup found: {:?}", r.failures);
}

/// The local gateway's copies and the backups are made durable per file and directory on a
/// FUSE file system, where `syncfs(2)` makes nothing durable: a backup created on the mount
/// survives a power cut right after `Backup::create` returns.
#[test]
fn power_loss_backup_on_fuse_survives_without_syncfs() {
    let test = "power_loss_backup_on_fuse_survives_without_syncfs";
    let Some(t) = template(test, Mode::Normal, false) else { return };
    let Some(m) = mount(test, t.pristine.path(), t.home(), None) else { return };
    let home = m.path().to_owned();
    let gw = nemoclaw::gateway::local::LocalGateway::open(&home).unwrap();
    let name = SandboxName::parse("alpha").unwrap();
    let meta = nemoclaw::host::backup::BackupMeta {
        sandbox: name.clone(),
        agent_type: None,
        agent_version: None,
        policy_presets: vec![],
        custom_policies: serde_json::json!([]),
    };
    let b = Backup::create(&home, &meta, "2026-06-09T10-02-11-399Z", &gw.state_dir(&name)).unwrap();
    m.power_cut(None).unwrap();
    let back = Backup::open(&b.path).expect("the backup's manifest survived");
    back.verify().expect("every backed-up file survived with its bytes");
    assert_eq!(back.manifest.files, b.manifest.files, "the same files");
}

/// Proof that the harness can fail: with the directory fsync after the backup manifest's
/// rename skipped (a test-only switch), a power cut after the backup step was journaled loses
/// the backup, and the harness reports it; kill -9 at the same point does not notice.
#[test]
fn power_loss_harness_reports_a_lost_backup_when_the_manifest_rename_is_not_synced() {
    let test = "power_loss_harness_reports_a_lost_backup_when_the_manifest_rename_is_not_synced";
    let Some(t) = template(test, Mode::Normal, false) else { return };
    // after_outcome hits: snapshot 1, shields_down 2, backup 3.
    let env =
        [("NEMOCLAW_TEST_SKIP_SYNC", "manifest_dir"), ("NEMOCLAW_CRASHPOINT", "after_outcome:3")];
    let rebuild = ["alpha", "rebuild", "--yes"];
    let (m, out) = run_on_power_fs(&t, t.pristine.path(), None, &rebuild, &env);
    assert!(killed(&out), "not killed at the crash point: {}", stderr(&out));
    let live = tempfile::Builder::new().prefix("nemoclaw-live-").tempdir().unwrap();
    copy_dir(m.path(), live.path());
    // The power cut at that moment loses the manifest: the harness reports it.
    m.power_cut(None).unwrap();
    let r = t.recover(true);
    let report = if r.status.success() {
        differences(&t, true, "power cut").err().unwrap_or_default()
    } else {
        stderr(&r)
    };
    assert!(report.contains("manifest"), "the harness did not report the lost backup: {report}");
    // kill -9 alone: the page cache keeps the manifest, and recovery is exact.
    clear_dir(t.home());
    copy_dir(live.path(), t.home());
    let r = t.recover(true);
    assert!(r.status.success(), "{}", stderr(&r));
    differences(&t, true, "kill -9 only").expect("kill -9 cannot see a missing sync");
}

/// The kernel fact the per-file path rests on: `syncfs(2)` on a FUSE mount returns success but
/// never reaches the daemon, so it makes nothing durable; `sync_tree` does, by fsyncs.
#[test]
fn power_loss_syncfs_on_fuse_reaches_no_daemon() {
    let test = "power_loss_syncfs_on_fuse_reaches_no_daemon";
    if !fuse_available(test) {
        return;
    }
    let empty = tempfile::tempdir().unwrap();
    let at = tempfile::tempdir().unwrap();
    let Some(m) = mount(test, empty.path(), at.path(), None) else { return };
    assert!(!nemoclaw::util::syncfs_is_trusted(m.path()), "a FUSE mount is recognised");
    assert!(nemoclaw::util::syncfs_is_trusted(empty.path()), "a local file system is trusted");
    for d in ["synced", "unsynced"] {
        std::fs::create_dir_all(m.path().join(d).join("sub")).unwrap();
        std::fs::write(m.path().join(d).join("sub/f"), b"bytes").unwrap();
    }
    nemoclaw::util::syncfs(&m.path().join("unsynced")).expect("syncfs reports success");
    assert!(m.syncs().is_empty(), "syncfs reached the daemon: {:?}", m.syncs());
    nemoclaw::util::sync_tree(&m.path().join("synced")).unwrap();
    assert!(m.syncs().get("fsync").copied().unwrap_or(0) >= 1, "{:?}", m.syncs());
    m.power_cut(None).unwrap();
    assert_eq!(std::fs::read(at.path().join("synced/sub/f")).unwrap(), b"bytes");
    // (The root was fsynced by the other tree's sync, so the name `unsynced` itself survives.)
    assert!(!at.path().join("unsynced/sub").exists(), "syncfs made something durable");
}

/// Window: the backup step's outcome is journaled, and the power goes. The journal says the
/// backup is committed, so the first backup of a sandbox must be reachable after the cut —
/// `rebuild-backups/` and `rebuild-backups/<name>/` included — for resume to restore it and
/// for rollback to leave the old sandbox.
#[test]
fn power_loss_after_the_backup_outcome_keeps_the_first_backup() {
    let test = "power_loss_after_the_backup_outcome_keeps_the_first_backup";
    for resume in [true, false] {
        let Some(t) = template(test, Mode::Normal, false) else { return };
        // after_outcome hits: snapshot 1, shields_down 2, backup 3.
        power_cut_at_crash_point(&t, "after_outcome:3", resume, &[]).unwrap();
    }
}

/// Window: the restore step's outcome is journaled, and the power goes: the restored files
/// in the new sandbox must be on disk (the local gateway's upload is a durable copy).
#[test]
fn power_loss_after_the_restore_outcome_keeps_the_restored_workspace() {
    let test = "power_loss_after_the_restore_outcome_keeps_the_restored_workspace";
    let Some(t) = template(test, Mode::Normal, true) else { return };
    // after_outcome hits: snapshot 1, shields_down 2, backup 3, remove 4, onboard 5, restore 6.
    power_cut_at_crash_point(&t, "after_outcome:6", true, &[]).unwrap();
}

/// Window: the rebuild has exited successfully and the power goes: everything it reported
/// done is on disk.
#[test]
fn power_loss_right_after_a_successful_rebuild_loses_nothing() {
    let test = "power_loss_right_after_a_successful_rebuild_loses_nothing";
    for (mode, history) in [(Mode::Normal, false), (Mode::Stale, false)] {
        let Some(t) = template(test, mode, history) else { return };
        count_rebuild(&t, &[]).1.unwrap();
    }
}

/// Window: the snapshot step's outcome is journaled on a home that never had a run, and the
/// power goes: `rebuild-runs/<run>.json` must survive with its directory, or rollback cannot
/// put the registry row back and resume cannot finish.
#[test]
fn power_loss_after_the_snapshot_outcome_keeps_the_run_snapshot() {
    let test = "power_loss_after_the_snapshot_outcome_keeps_the_run_snapshot";
    for (mode, resume) in [(Mode::Normal, false), (Mode::Stale, true), (Mode::Stale, false)] {
        let Some(t) = template(test, mode, false) else { return };
        power_cut_at_crash_point(&t, "after_outcome:1", resume, &[]).unwrap();
    }
}

/// SQLite survives the model on its own: a journal created and migrated on the file system,
/// then the power cut, opens clean and migrated. It does so because SQLite fsyncs the
/// directory after creating its WAL file (which also makes `journal.sqlite3`'s own name,
/// created just before, durable) and fsyncs the WAL at every commit (`synchronous=FULL`).
#[test]
fn power_loss_right_after_the_journal_is_created_keeps_it() {
    let test = "power_loss_right_after_the_journal_is_created_keeps_it";
    if !fuse_available(test) {
        return;
    }
    let (empty, at) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let Some(m) = mount(test, empty.path(), at.path(), None) else { return };
    drop(nemoclaw::journal::Journal::open_home(m.path()).unwrap());
    let log = m.log();
    let wal = log.iter().position(|o| o == "create journal.sqlite3-wal").expect("a WAL");
    let dirsync = log.iter().skip(wal).position(|o| o == "fsyncdir <home>");
    assert!(dirsync.is_some(), "SQLite did not fsync the home after creating its WAL: {log:?}");
    m.power_cut(None).unwrap();
    // Read-only: a journal whose migration was lost would be migrated again by a writer.
    let j = nemoclaw::journal::Journal::open_readonly(&at.path().join("journal.sqlite3"))
        .unwrap()
        .expect("the journal and its migrations survived");
    j.integrity_check().unwrap();
    let tables: i64 = j
        .conn()
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name IN ('runs','steps','events')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 3);
}

/// Window: `shields up` on a home that never had a `state/` directory, then the power goes:
/// the seal must still be there (its directory was created durably).
#[test]
fn power_loss_right_after_shields_up_on_a_fresh_home_keeps_them_up() {
    let test = "power_loss_right_after_shields_up_on_a_fresh_home_keeps_them_up";
    if !fuse_available(test) {
        return;
    }
    let (empty, at) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let Some(m) = mount(test, empty.path(), at.path(), None) else { return };
    let name = SandboxName::parse("alpha").unwrap();
    nemoclaw::host::shields::raise(m.path(), &name).unwrap();
    m.power_cut(None).unwrap();
    let s = nemoclaw::host::ShieldsState::load(at.path(), &name).unwrap();
    assert!(s.locked(), "shields came back down after the power cut");
}
