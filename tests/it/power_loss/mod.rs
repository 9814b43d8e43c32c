//! Power-loss tests: real `nemoclaw` rebuilds and recoveries on a file system that forgets
//! everything that was not made durable (see [`memfs`]), cut at a random operation, then
//! recovered from what a disk would hold after the power came back.
//!
//! Unlike the kill -9 tests, the page cache does not survive here: a missing `fsync` of a
//! file, of a directory after a create or rename, or a journal commit that claims files the
//! disk does not have yet, shows up as a difference in the same invariants the kill -9 soak
//! checks (registry bytes, workspace digest, shields bytes, no orphans, journal clean).
//!
//! `NEMOCLAW_POWER_SEED` replays a run; `NEMOCLAW_POWER_CUTS` changes the number of cuts.
//! Skips, saying why, where FUSE cannot be mounted.

mod memfs;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nemoclaw::host::backup::Backup;
use nemoclaw::names::SandboxName;

use crate::common::{cmd_in, nanos, stderr, XorShift};
use crate::rebuild::{
    assert_ok, check_recovered_from, killed, recover_args, runs, Before, Mode, Opts, World,
};
use memfs::Mounted;

/// Whether FUSE can be used here; prints why not (the caller then skips).
fn fuse_available(test: &str) -> bool {
    match memfs::unavailable() {
        None => true,
        Some(why) => {
            eprintln!("{test}: SKIPPED: {why}; the power-loss tests need FUSE");
            false
        }
    }
}

/// Mount, or print why not and return `None` (the caller then skips).
fn mount(test: &str, src: &Path, at: &Path, cut_at: Option<u64>) -> Option<Mounted> {
    match Mounted::new(src, at, cut_at) {
        Ok(m) => Some(m),
        Err(why) => {
            eprintln!("{test}: SKIPPED: {why}; the power-loss tests need FUSE");
            None
        }
    }
}

/// The host every cut starts from: a world whose home is where every run happens (the file
/// system is mounted there, and the durable image is put there after the cut, as a disk comes
/// back at the same path), a pristine copy of that home, what it looked like before the
/// rebuild, and how many runs its journal had.
struct Template {
    w: World,
    pristine: tempfile::TempDir,
    b: Before,
    mode: Mode,
    runs_before: usize,
}

impl Template {
    /// `history`: one rebuild already happened (the journal and a backup exist); else the
    /// rebuild creates the journal, so cuts land in its creation too.
    fn new(mode: Mode, history: bool) -> Template {
        let w = World::new(Opts { locked: true, files: 6 });
        if history {
            assert_ok(&w.rebuild());
        }
        let b = w.snapshot();
        if mode == Mode::Stale {
            w.reap();
        }
        let runs_before = journal_runs(w.path());
        let pristine = tempfile::Builder::new().prefix("nemoclaw-pristine-").tempdir().unwrap();
        copy_dir(w.path(), pristine.path());
        Template { w, pristine, b, mode, runs_before }
    }

    fn home(&self) -> &Path {
        self.w.path()
    }

    fn recover(&self, resume: bool) -> Output {
        let mut c = cmd_in(self.home());
        c.args(recover_args(resume));
        run_bounded(c)
    }
}

/// Number of runs in a home's journal, without creating one.
fn journal_runs(home: &Path) -> usize {
    if home.join("journal.sqlite3").exists() {
        runs(home).len()
    } else {
        0
    }
}

/// Run a command, killing it if it outlives a generous bound (a hang is a failure, not a
/// reason to block the suite).
fn run_bounded(mut cmd: Command) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(120);
    // Drain the pipes while waiting, so a chatty child cannot block on a full pipe.
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut so, &mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut se, &mut v);
        v
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        // Deliberate, bounded: polling for the child's exit.
        std::thread::sleep(Duration::from_millis(5));
    };
    Output { status, stdout: t1.join().unwrap(), stderr: t2.join().unwrap() }
}

/// One process on the home of `t`, on a fresh power-loss file system loaded from `src`, the
/// power cut before operation `cut_at` (if given). Returns the mount and the output.
fn run_on_power_fs(
    t: &Template,
    src: &Path,
    cut_at: Option<u64>,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Mounted, Output) {
    let m = mount("power_loss", src, t.home(), cut_at).expect("FUSE mounted a moment ago");
    let mut cmd = cmd_in(m.path());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_bounded(cmd);
    (m, out)
}

/// The exactness invariants after a recovery, as a difference instead of a panic.
fn differences(t: &Template, resume: bool, ctx: &str) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| {
        check_recovered_from(&t.w, &t.b, t.mode, resume, t.runs_before, ctx)
    }))
    .map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a check panicked".into())
    })
}

/// The operation the power was cut at, with the parts that differ between runs (timestamps,
/// pids, ids) blanked: the file-system window the cut landed in.
fn window_of(op: &str) -> String {
    let mut out = String::new();
    let mut seg = String::new();
    let flush = |seg: &mut String, out: &mut String| {
        let hexish = seg.len() >= 8
            && seg.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
            && seg.chars().any(|c| c.is_ascii_digit());
        if hexish {
            out.push_str("<id>");
        } else if seg == "sqlite3-wal" || seg == "sqlite3-shm" || seg == "sqlite3" {
            out.push_str(seg);
        } else {
            let mut prev = false;
            for c in seg.chars() {
                if c.is_ascii_digit() {
                    if !prev {
                        out.push('#');
                    }
                    prev = true;
                } else {
                    out.push(c);
                    prev = false;
                }
            }
        }
        seg.clear();
    };
    for c in op.chars() {
        if matches!(c, '/' | '.' | ' ') {
            flush(&mut seg, &mut out);
            out.push(c);
        } else {
            seg.push(c);
        }
    }
    flush(&mut seg, &mut out);
    out
}

/// Where the durable journal of `t`'s home says the run was when the power went: the run's
/// state and its last step that was not pending. Read from a copy, so that opening it (which
/// replays the WAL) cannot change what the recovery will find.
fn journal_window(t: &Template) -> String {
    let scratch = tempfile::Builder::new().prefix("nemoclaw-peek-").tempdir().unwrap();
    for f in ["journal.sqlite3", "journal.sqlite3-wal"] {
        if t.home().join(f).exists() {
            std::fs::copy(t.home().join(f), scratch.path().join(f)).unwrap();
        }
    }
    let Ok(Some(j)) =
        nemoclaw::journal::Journal::open_readonly(&scratch.path().join("journal.sqlite3"))
    else {
        return "no journal".into();
    };
    let row: Option<(String, String)> = j
        .conn()
        .query_row(
            "SELECT id, state FROM runs ORDER BY created_at DESC, id DESC LIMIT 1 OFFSET 0",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .ok();
    let n: i64 = j.conn().query_row("SELECT count(*) FROM runs", [], |r| r.get(0)).unwrap_or(0);
    match row {
        Some((id, state)) if n as usize > t.runs_before => {
            let step: Option<(String, String)> = j
                .conn()
                .query_row(
                    "SELECT name, state FROM steps WHERE run_id = ?1 AND state != 'pending'
                     ORDER BY seq DESC LIMIT 1",
                    [&id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .ok();
            match step {
                Some((name, st)) => format!("run {state}, {name} {st}"),
                None => format!("run {state}, no step started"),
            }
        }
        _ => "no run yet".into(),
    }
}

/// Where in a rebuild the power is cut.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// During the rebuild (which also creates the journal on a fresh home).
    Rebuild,
    /// During the first `recover` after a cut of the rebuild.
    Recover,
}

/// What one cut did, for the report.
struct CutReport {
    /// The file-system operation the (last) cut landed on.
    window: String,
    /// Where the durable journal said the run was.
    step: String,
    /// Files that came back torn (part new, part old bytes).
    torn_files: usize,
    result: Result<(), String>,
}

/// Rebuild on the power-loss file system with the power cut before operation `at`, recover
/// (on the image, or — phase Recover — cut the power again during the first recovery), check.
fn one_cut(
    t: &Template,
    phase: Phase,
    at: u64,
    resume: bool,
    torn: Option<u64>,
    rng: &mut XorShift,
    env: &[(&str, &str)],
) -> CutReport {
    let rebuild = ["alpha", "rebuild", "--yes"];
    let (m, _out) = run_on_power_fs(t, t.pristine.path(), Some(at), &rebuild, env);
    let mut window = m.cut().map(|op| window_of(&op)).unwrap_or_else(|| "(after the end)".into());
    let mut torn_files = m.power_cut(torn).expect("write the durable image");
    let ctx0 = format!("{:?} cut at {at} ({window}) resume={resume} torn={torn:?}", t.mode);
    if phase == Phase::Recover {
        let image = tempfile::Builder::new().prefix("nemoclaw-image-").tempdir().unwrap();
        copy_dir(t.home(), image.path());
        // How many operations an uninterrupted recovery of this image makes, and that its own
        // final durable state is exact.
        let (m, out) = run_on_power_fs(t, image.path(), None, &recover_args(resume), env);
        let total = m.ops().max(1);
        m.power_cut(None).expect("write the durable image");
        let fail = |e| CutReport {
            window: format!("recover: {window}"),
            step: String::new(),
            torn_files,
            result: Err(e),
        };
        if !out.status.success() {
            return fail(format!("{ctx0}: recover failed\n{}", stderr(&out)));
        }
        if let Err(e) = differences(t, resume, &format!("{ctx0}, recover uncut")) {
            return fail(e);
        }
        let at2 = rng.range(1, total);
        let (m, _out) = run_on_power_fs(t, image.path(), Some(at2), &recover_args(resume), env);
        let w2 = m.cut().map(|op| window_of(&op)).unwrap_or_else(|| "(after the end)".into());
        window = format!("recover: {w2}");
        torn_files += m.power_cut(torn).expect("write the durable image");
    }
    let step = journal_window(t);
    let ctx = format!("{ctx0} phase={phase:?} window={window} journal={step}");
    let r = t.recover(resume);
    let result = if r.status.success() {
        differences(t, resume, &ctx)
    } else {
        Err(format!("{ctx}: recover failed (exit {:?})\n{}", r.status.code(), stderr(&r)))
    };
    CutReport { window, step, torn_files, result }
}

/// Mutating operations of an uninterrupted rebuild of `t`, and whether its final durable
/// state (the power cut right after it exits) is exact.
fn count_rebuild(t: &Template, env: &[(&str, &str)]) -> (u64, Result<(), String>) {
    let (m, out) = run_on_power_fs(t, t.pristine.path(), None, &["alpha", "rebuild", "--yes"], env);
    assert_ok(&out);
    let ops = m.ops();
    let syncs = m.syncs();
    m.power_cut(None).expect("write the durable image");
    eprintln!("power_loss: {:?} rebuild: {ops} mutating operations, syncs {syncs:?}", t.mode);
    (ops, differences(t, true, &format!("{:?} power cut right after the rebuild", t.mode)))
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// What a soak found.
struct Soak {
    cuts: u64,
    /// Cuts per file-system operation cut at.
    windows: std::collections::BTreeMap<String, u32>,
    /// Cuts per (mode, phase, where the durable journal said the run was).
    steps: std::collections::BTreeMap<String, u32>,
    failures: Vec<String>,
    /// Files that came back torn, over all cuts.
    torn_files: usize,
}

/// Seeded cuts over `kinds` of templates (mode, history), in turn: each cut lands at a
/// uniformly chosen operation of the rebuild or (every third) of the first recovery;
/// directions alternate per template; torn images at random. `None` if FUSE cannot mount.
fn soak(seed: u64, cuts: u64, kinds: &[(Mode, bool)], env: &[(&str, &str)]) -> Option<Soak> {
    let mut rng = XorShift(seed | 1);
    let mut templates = Vec::new();
    let mut failures = Vec::new();
    for &(mode, history) in kinds {
        let t = Template::new(mode, history);
        mount("power_loss", t.pristine.path(), t.home(), None)?;
        let (n, exact) = count_rebuild(&t, env);
        if let Err(e) = exact {
            failures.push(e);
        }
        templates.push((t, n));
    }
    let k = templates.len() as u64;
    let mut out = Soak {
        cuts,
        windows: Default::default(),
        steps: Default::default(),
        failures,
        torn_files: 0,
    };
    for i in 0..cuts {
        let (t, total) = &templates[(i % k) as usize];
        let resume = (i / k) % 2 == 0;
        let phase = if i % 3 == 2 { Phase::Recover } else { Phase::Rebuild };
        let torn = (rng.next() % 2 == 1).then(|| rng.next());
        let at = rng.range(1, *total);
        let r = one_cut(t, phase, at, resume, torn, &mut rng, env);
        out.torn_files += r.torn_files;
        *out.windows.entry(r.window.clone()).or_default() += 1;
        *out.steps.entry(format!("{:?} {:?} {}", t.mode, phase, r.step)).or_default() += 1;
        if let Err(e) = r.result {
            eprintln!("power_loss: seed {seed} cut {i}: {e}");
            out.failures.push(format!("cut {i}: {e}"));
        }
    }
    Some(out)
}

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
    let cuts = env_u64("NEMOCLAW_POWER_CUTS").unwrap_or(100);
    eprintln!("power_loss_soak: seed {seed} (replay with NEMOCLAW_POWER_SEED={seed}), {cuts} cuts");
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
    let Some(r) = soak(seed, 12, &[(Mode::Normal, false)], &env) else { return };
    let lost =
        r.failures.iter().filter(|f| f.contains("workspace") || f.contains("backup")).count();
    assert!(lost >= 1, "seed {seed}: no lost workspace or backup found: {:?}", r.failures);
}

/// The local gateway's copies and the backups are made durable per file and directory on a
/// FUSE file system, where `syncfs(2)` makes nothing durable: a backup created on the mount
/// survives a power cut right after `Backup::create` returns.
#[test]
fn power_loss_backup_on_fuse_survives_without_syncfs() {
    if !fuse_available("power_loss_backup_on_fuse_survives_without_syncfs") {
        return;
    }
    let t = Template::new(Mode::Normal, false);
    let test = "power_loss_backup_on_fuse_survives_without_syncfs";
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
    if !fuse_available(test) {
        return;
    }
    let t = Template::new(Mode::Normal, false);
    if mount(test, t.pristine.path(), t.home(), None).is_none() {
        return;
    }
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

/// Remove everything inside `dir`.
fn clear_dir(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
}

/// Copy a directory tree (files, directories, symlinks).
fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            std::fs::create_dir(&dst).unwrap();
            copy_dir(&src, &dst);
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
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

/// A rebuild on the file system, killed at crash point `point` (`name:hit`), then the power
/// cut at that moment, then `recover` in direction `resume`: the differences found, if any.
fn power_cut_at_crash_point(
    t: &Template,
    point: &str,
    resume: bool,
    env: &[(&str, &str)],
) -> Result<(), String> {
    let mut env = env.to_vec();
    env.push(("NEMOCLAW_CRASHPOINT", point));
    let (m, out) =
        run_on_power_fs(t, t.pristine.path(), None, &["alpha", "rebuild", "--yes"], &env);
    assert!(killed(&out), "{point}: not killed: {}", stderr(&out));
    m.power_cut(None).unwrap();
    let r = t.recover(resume);
    if !r.status.success() {
        return Err(format!("{point}: recover failed\n{}", stderr(&r)));
    }
    differences(t, resume, point)
}

/// Window: the backup step's outcome is journaled, and the power goes. The journal says the
/// backup is committed, so the first backup of a sandbox must be reachable after the cut —
/// `rebuild-backups/` and `rebuild-backups/<name>/` included — for resume to restore it and
/// for rollback to leave the old sandbox.
#[test]
fn power_loss_after_the_backup_outcome_keeps_the_first_backup() {
    let test = "power_loss_after_the_backup_outcome_keeps_the_first_backup";
    if !fuse_available(test) {
        return;
    }
    for resume in [true, false] {
        let t = Template::new(Mode::Normal, false);
        if mount(test, t.pristine.path(), t.home(), None).is_none() {
            return;
        }
        // after_outcome hits: snapshot 1, shields_down 2, backup 3.
        power_cut_at_crash_point(&t, "after_outcome:3", resume, &[]).unwrap();
    }
}

/// Window: the restore step's outcome is journaled, and the power goes: the restored files
/// in the new sandbox must be on disk (the local gateway's upload is a durable copy).
#[test]
fn power_loss_after_the_restore_outcome_keeps_the_restored_workspace() {
    let test = "power_loss_after_the_restore_outcome_keeps_the_restored_workspace";
    if !fuse_available(test) {
        return;
    }
    let t = Template::new(Mode::Normal, true);
    if mount(test, t.pristine.path(), t.home(), None).is_none() {
        return;
    }
    // after_outcome hits: snapshot 1, shields_down 2, backup 3, remove 4, onboard 5, restore 6.
    power_cut_at_crash_point(&t, "after_outcome:6", true, &[]).unwrap();
}

/// Window: the rebuild has exited successfully and the power goes: everything it reported
/// done is on disk.
#[test]
fn power_loss_right_after_a_successful_rebuild_loses_nothing() {
    let test = "power_loss_right_after_a_successful_rebuild_loses_nothing";
    if !fuse_available(test) {
        return;
    }
    for (mode, history) in [(Mode::Normal, false), (Mode::Stale, false)] {
        let t = Template::new(mode, history);
        if mount(test, t.pristine.path(), t.home(), None).is_none() {
            return;
        }
        count_rebuild(&t, &[]).1.unwrap();
    }
}

/// Window: the snapshot step's outcome is journaled on a home that never had a run, and the
/// power goes: `rebuild-runs/<run>.json` must survive with its directory, or rollback cannot
/// put the registry row back and resume cannot finish.
#[test]
fn power_loss_after_the_snapshot_outcome_keeps_the_run_snapshot() {
    let test = "power_loss_after_the_snapshot_outcome_keeps_the_run_snapshot";
    if !fuse_available(test) {
        return;
    }
    for (mode, resume) in [(Mode::Normal, false), (Mode::Stale, true), (Mode::Stale, false)] {
        let t = Template::new(mode, false);
        if mount(test, t.pristine.path(), t.home(), None).is_none() {
            return;
        }
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
