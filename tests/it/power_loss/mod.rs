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
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nemoclaw::host::backup::Backup;
use nemoclaw::names::SandboxName;

use crate::common::{cmd_in, nanos, stderr, Home, XorShift};
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
fn mount(test: &str, src: &Path, cut_at: Option<u64>) -> Option<Mounted> {
    match Mounted::new(src, cut_at) {
        Ok(m) => Some(m),
        Err(why) => {
            eprintln!("{test}: SKIPPED: {why}; the power-loss tests need FUSE");
            None
        }
    }
}

/// The host every cut starts from: a world on a real directory (copied into the file system
/// for each run), what it looked like before the rebuild, and how many runs it had.
struct Template {
    w: World,
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
        Template { w, b, mode, runs_before }
    }

    fn path(&self) -> &Path {
        self.w.path()
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

/// Run the binary with NemoClaw home `home`, killing it if it outlives a generous bound (a
/// hang is a failure, not a reason to block the suite).
fn run_bounded(mut cmd: Command) -> (ExitStatus, Output) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        // Deliberate, bounded: polling for the child's exit.
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().expect("wait");
    (out.status, out)
}

/// One process on a fresh file system loaded from `src`, the power cut before operation
/// `cut_at` (if given). Returns the mount (for its durable image) and the process's output.
fn run_on_power_fs(
    src: &Path,
    cut_at: Option<u64>,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Mounted, Output) {
    let m = mount("power_loss", src, cut_at).expect("FUSE mounted a moment ago");
    let mut cmd = cmd_in(m.path());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (_, out) = run_bounded(cmd);
    (m, out)
}

/// A world on a durable image (a plain directory).
struct Image {
    w: World,
}

impl Image {
    /// Cut the power of `m` (if it was not cut yet) and write its durable image.
    fn of(m: Mounted, torn: Option<u64>) -> Image {
        let dir = tempfile::Builder::new().prefix("nemoclaw-image-").tempdir().unwrap();
        m.durable_image(dir.path(), torn).expect("write the durable image");
        Image { w: World { home: Home { dir }, name: SandboxName::parse("alpha").unwrap() } }
    }

    fn path(&self) -> &Path {
        self.w.path()
    }

    fn recover(&self, resume: bool) -> Output {
        run_bounded({
            let mut c = cmd_in(self.path());
            c.args(recover_args(resume));
            c
        })
        .1
    }
}

/// The exactness invariants after a recovery, as a difference instead of a panic.
fn differences(t: &Template, img: &Image, resume: bool, ctx: &str) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| {
        check_recovered_from(&img.w, &t.b, t.mode, resume, t.runs_before, ctx)
    }))
    .map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a check panicked".into())
    })
}

/// The operation the power was cut at, with numbers (timestamps, pids, ids) blanked: the
/// window the cut landed in.
fn window_of(op: &str) -> String {
    let mut out = String::new();
    let mut prev_digit = false;
    for c in op.chars() {
        if c.is_ascii_digit() {
            if !prev_digit {
                out.push('#');
            }
            prev_digit = true;
        } else {
            out.push(c);
            prev_digit = false;
        }
    }
    // uuids: collapse runs of hex-and-#
    out.split('.')
        .map(|part| {
            if part.len() >= 20 && part.chars().all(|c| c.is_ascii_hexdigit() || c == '#' || c == '-')
            {
                "<id>"
            } else {
                part
            }
        })
        .collect::<Vec<_>>()
        .join(".")
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
    window: String,
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
    let (m, _out) = run_on_power_fs(t.path(), Some(at), &rebuild, env);
    let mut window = m.cut().map(|op| window_of(&op)).unwrap_or_else(|| "(after the end)".into());
    let mut img = Image::of(m, torn);
    let ctx0 = format!("{:?} cut at {at} ({window}) resume={resume} torn={torn:?}", t.mode);
    if phase == Phase::Recover {
        // How many operations an uninterrupted recovery of this image makes, and that its own
        // final durable state is exact.
        let (m, out) = run_on_power_fs(img.path(), None, &recover_args(resume), env);
        let total = m.ops().max(1);
        let done = Image::of(m, None);
        if !out.status.success() {
            return CutReport {
                window: format!("recover: {window}"),
                result: Err(format!("{ctx0}: recover failed\n{}", stderr(&out))),
            };
        }
        if let Err(e) = differences(t, &done, resume, &format!("{ctx0}, recover uncut")) {
            return CutReport { window: format!("recover: {window}"), result: Err(e) };
        }
        let at2 = rng.range(1, total);
        let (m, _out) = run_on_power_fs(img.path(), Some(at2), &recover_args(resume), env);
        let w2 = m.cut().map(|op| window_of(&op)).unwrap_or_else(|| "(after the end)".into());
        window = format!("recover: {w2}");
        img = Image::of(m, torn);
    }
    let ctx = format!("{ctx0} phase={phase:?} window={window}");
    let r = img.recover(resume);
    let result = if r.status.success() {
        differences(t, &img, resume, &ctx)
    } else {
        Err(format!("{ctx}: recover failed (exit {:?})\n{}", r.status.code(), stderr(&r)))
    };
    CutReport { window, result }
}

/// Mutating operations of an uninterrupted rebuild of `t`, and a check that its final durable
/// state (the power cut right after it exits) is exact.
fn count_rebuild(t: &Template, env: &[(&str, &str)]) -> u64 {
    let (m, out) = run_on_power_fs(t.path(), None, &["alpha", "rebuild", "--yes"], env);
    assert_ok(&out);
    let ops = m.ops();
    let syncs = m.syncs();
    let img = Image::of(m, None);
    if let Err(e) = differences(t, &img, true, &format!("{:?} uncut rebuild", t.mode)) {
        panic!("the durable state right after an uninterrupted rebuild is not exact: {e}");
    }
    eprintln!("power_loss: {:?} rebuild: {ops} mutating operations, syncs {syncs:?}", t.mode);
    ops
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// The seeded power-cut soak: normal and stale rebuilds, on fresh homes (the journal is
/// created during the run) and on homes with history, cut at a uniformly chosen operation of
/// the rebuild or of the first recovery, recovered alternately with `--resume` and
/// `--rollback`, half of the images with torn unsynced writes.
#[test]
fn power_loss_soak() {
    if !fuse_available("power_loss_soak") {
        return;
    }
    let seed = env_u64("NEMOCLAW_POWER_SEED").unwrap_or_else(nanos);
    let cuts = env_u64("NEMOCLAW_POWER_CUTS").unwrap_or(56);
    eprintln!("power_loss_soak: seed {seed} (replay with NEMOCLAW_POWER_SEED={seed}), {cuts} cuts");
    let started = Instant::now();
    let mut rng = XorShift(seed | 1);
    let templates: Vec<(Template, u64)> = [
        (Mode::Normal, false),
        (Mode::Stale, false),
        (Mode::Normal, true),
        (Mode::Stale, true),
    ]
    .into_iter()
    .map_while(|(mode, history)| {
        let t = Template::new(mode, history);
        mount("power_loss_soak", t.path(), None)?;
        let n = count_rebuild(&t, &[]);
        Some((t, n))
    })
    .collect();
    if templates.len() < 4 {
        return;
    }
    let mut windows = std::collections::BTreeMap::<String, u32>::new();
    let mut failures = Vec::new();
    for i in 0..cuts {
        let (t, total) = &templates[(i % 4) as usize];
        let resume = (i / 4) % 2 == 0;
        let phase = if i % 3 == 2 { Phase::Recover } else { Phase::Rebuild };
        let torn = (i % 2 == 1).then(|| rng.next());
        let at = rng.range(1, *total);
        let r = one_cut(t, phase, at, resume, torn, &mut rng, &[]);
        *windows.entry(r.window.clone()).or_default() += 1;
        if let Err(e) = r.result {
            eprintln!("power_loss_soak: seed {seed} cut {i}: {e}");
            failures.push(format!("cut {i}: {e}"));
        }
    }
    eprintln!(
        "power_loss_soak: seed {seed}: {cuts} cuts, {} distinct windows, {} differences, {:?}",
        windows.len(),
        failures.len(),
        started.elapsed()
    );
    for (w, n) in &windows {
        eprintln!("  {n:4}  {w}");
    }
    assert!(failures.is_empty(), "seed {seed}: {} differences:\n{}", failures.len(), failures.join("\n"));
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
    let Some(m) = mount("power_loss_backup_on_fuse_survives_without_syncfs", t.path(), None) else {
        return;
    };
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
    let rel: PathBuf = b.path.strip_prefix(&home).unwrap().to_owned();
    let img = Image::of(m, None);
    let back = Backup::open(&img.path().join(&rel)).expect("the backup's manifest survived");
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
    if mount(test, t.path(), None).is_none() {
        return;
    }
    // after_outcome hits: snapshot 1, shields_down 2, backup 3.
    let env = [("NEMOCLAW_TEST_SKIP_SYNC", "manifest_dir"), ("NEMOCLAW_CRASHPOINT", "after_outcome:3")];
    let (m, out) = run_on_power_fs(t.path(), None, &["alpha", "rebuild", "--yes"], &env);
    assert!(killed(&out), "not killed at the crash point: {}", stderr(&out));
    // kill -9 alone: the page cache keeps the manifest, and recovery is exact.
    let live = tempfile::Builder::new().prefix("nemoclaw-live-").tempdir().unwrap();
    copy_dir(m.path(), live.path());
    let live = Image { w: World { home: Home { dir: live }, name: SandboxName::parse("alpha").unwrap() } };
    let r = live.recover(true);
    assert!(r.status.success(), "{}", stderr(&r));
    differences(&t, &live, true, "kill -9 only").expect("kill -9 cannot see a missing sync");
    // The power cut at the same moment loses the manifest: the harness reports it.
    let img = Image::of(m, None);
    let r = img.recover(true);
    let report = if r.status.success() {
        differences(&t, &img, true, "power cut").err().unwrap_or_default()
    } else {
        stderr(&r)
    };
    assert!(report.contains("manifest"), "the harness did not report the lost backup: {report}");
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
    let Some(m) = mount(test, empty.path(), None) else { return };
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
    let img = Image::of(m, None);
    assert_eq!(std::fs::read(img.path().join("synced/sub/f")).unwrap(), b"bytes");
    // (The root was fsynced by the other tree's sync, so the name `unsynced` itself survives.)
    assert!(!img.path().join("unsynced/sub").exists(), "syncfs made something durable");
}
