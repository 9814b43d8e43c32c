//! The power-cut harness: templates of a host, one process on the forgetting file system,
//! one cut and its recovery, the seeded soak, and the names of the windows cuts land in.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::{cmd_in, killed, stderr, wait_output, XorShift};
use crate::rebuild::{
    assert_ok, check_recovered_from, recover_args, runs, Before, Mode, Opts, World,
};

use super::memfs::{self, Mounted};

/// Whether FUSE can be used here; prints why not (the caller then skips).
pub(super) fn fuse_available(test: &str) -> bool {
    match memfs::unavailable() {
        None => true,
        Some(why) => {
            eprintln!("{test}: SKIPPED: {why}; the power-loss tests need FUSE");
            false
        }
    }
}

/// Mount, or print why not and return `None` (the caller then skips).
pub(super) fn mount(test: &str, src: &Path, at: &Path, cut_at: Option<u64>) -> Option<Mounted> {
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
pub(super) struct Template {
    pub(super) w: World,
    pub(super) pristine: tempfile::TempDir,
    pub(super) b: Before,
    pub(super) mode: Mode,
    pub(super) runs_before: usize,
}

impl Template {
    /// `history`: one rebuild already happened (the journal and a backup exist); else the
    /// rebuild creates the journal, so cuts land in its creation too.
    pub(super) fn new(mode: Mode, history: bool) -> Template {
        let w = World::new(Opts { locked: true, files: 6 });
        // An in-tree symlink too: its durability is its directory's.
        std::os::unix::fs::symlink("d0/f0.txt", w.state_dir().join("workspace/latest")).unwrap();
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

    pub(super) fn home(&self) -> &Path {
        self.w.path()
    }

    pub(super) fn recover(&self, resume: bool) -> Output {
        let mut c = cmd_in(self.home());
        c.args(recover_args(resume));
        run_bounded(c)
    }
}

/// A template for test `test`, or `None` (having said why) where FUSE cannot mount.
pub(super) fn template(test: &str, mode: Mode, history: bool) -> Option<Template> {
    if !fuse_available(test) {
        return None;
    }
    let t = Template::new(mode, history);
    mount(test, t.pristine.path(), t.home(), None)?;
    Some(t)
}

/// Number of runs in a home's journal, without creating one.
pub(super) fn journal_runs(home: &Path) -> usize {
    if home.join("journal.sqlite3").exists() {
        runs(home).len()
    } else {
        0
    }
}

/// Run a command, killing it (and failing) if it outlives a generous bound.
pub(super) fn run_bounded(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_output(child, Duration::from_secs(120))
}

/// One process on the home of `t`, on a fresh power-loss file system loaded from `src`, the
/// power cut before operation `cut_at` (if given). Returns the mount and the output.
pub(super) fn run_on_power_fs(
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
pub(super) fn differences(t: &Template, resume: bool, ctx: &str) -> Result<(), String> {
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

/// `nemoclaw recover` in direction `resume` on the home of `t`, then the invariants.
fn recover_and_check(t: &Template, resume: bool, ctx: &str) -> Result<(), String> {
    let r = t.recover(resume);
    if !r.status.success() {
        return Err(format!("{ctx}: recover failed (exit {:?})\n{}", r.status.code(), stderr(&r)));
    }
    differences(t, resume, ctx)
}

/// The operation the power was cut at, with the parts that differ between runs (timestamps,
/// pids, ids) blanked: the file-system window the cut landed in.
pub(super) fn window_of(op: &str) -> String {
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
/// state and the step it was at. Read from a copy, so that opening it (which
/// replays the WAL) cannot change what the recovery will find.
pub(super) fn journal_window(t: &Template) -> String {
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
                    // Forward: the furthest step that started. Rolling back (which goes in
                    // reverse): the step being undone, else the last one undone.
                    "SELECT name, state FROM steps WHERE run_id = ?1 AND state != 'pending'
                     ORDER BY state = 'compensating' DESC, state = 'compensated' DESC,
                              CASE WHEN state IN ('compensating', 'compensated') THEN seq
                                   ELSE -seq END
                     LIMIT 1",
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
pub(super) enum Phase {
    /// During the rebuild (which also creates the journal on a fresh home).
    Rebuild,
    /// During the first `recover` after a cut of the rebuild.
    Recover,
}

/// What one cut did, for the report.
pub(super) struct CutReport {
    /// The file-system operation the (last) cut landed on.
    pub(super) window: String,
    /// Where the durable journal said the run was.
    pub(super) step: String,
    /// Files that came back torn (part new, part old bytes).
    pub(super) torn_files: usize,
    pub(super) result: Result<(), String>,
}

/// Rebuild on the power-loss file system with the power cut before operation `at`, recover
/// (on the image, or — phase Recover — cut the power again during the first recovery), check.
pub(super) fn one_cut(
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
    let result = recover_and_check(t, resume, &ctx);
    CutReport { window, step, torn_files, result }
}

/// Mutating operations of an uninterrupted rebuild of `t`, and whether its final durable
/// state (the power cut right after it exits) is exact.
pub(super) fn count_rebuild(t: &Template, env: &[(&str, &str)]) -> (u64, Result<(), String>) {
    let (m, out) = run_on_power_fs(t, t.pristine.path(), None, &["alpha", "rebuild", "--yes"], env);
    assert_ok(&out);
    let ops = m.ops();
    let syncs = m.syncs();
    m.power_cut(None).expect("write the durable image");
    eprintln!("power_loss: {:?} rebuild: {ops} mutating operations, syncs {syncs:?}", t.mode);
    (ops, differences(t, true, &format!("{:?} power cut right after the rebuild", t.mode)))
}

pub(super) fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// What a soak found.
pub(super) struct Soak {
    pub(super) cuts: u64,
    /// Cuts per file-system operation cut at.
    pub(super) windows: std::collections::BTreeMap<String, u32>,
    /// Cuts per (mode, phase, where the durable journal said the run was).
    pub(super) steps: std::collections::BTreeMap<String, u32>,
    pub(super) failures: Vec<String>,
    /// Files that came back torn, over all cuts.
    pub(super) torn_files: usize,
}

/// Seeded cuts over `kinds` of templates (mode, history), in turn: each cut lands at a
/// uniformly chosen operation of the rebuild or (every third) of the first recovery;
/// directions alternate per template; torn images at random. `cuts: None` cuts each template's
/// rebuild at every one of its operations instead, and then, after a rebuild killed right
/// after its recreate, the first recovery at every one of its operations, in both directions.
/// `None` if FUSE cannot mount.
pub(super) fn soak(
    seed: u64,
    cuts: Option<u64>,
    kinds: &[(Mode, bool)],
    env: &[(&str, &str)],
) -> Option<Soak> {
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
    // Every operation of every template once, in both directions by turns; else `cuts`
    // uniformly chosen ones.
    let plan: Vec<(usize, Phase, u64, bool)> = match cuts {
        Some(cuts) => (0..cuts)
            .map(|i| {
                let phase = if i % 3 == 2 { Phase::Recover } else { Phase::Rebuild };
                let at = rng.range(1, templates[(i % k) as usize].1);
                ((i % k) as usize, phase, at, (i / k).is_multiple_of(2))
            })
            .collect(),
        None => (0..templates.len())
            .flat_map(|t| (1..=templates[t].1).map(move |at| (t, Phase::Rebuild, at, at % 2 == 0)))
            .collect(),
    };
    let mut out = Soak {
        cuts: plan.len() as u64,
        windows: Default::default(),
        steps: Default::default(),
        failures,
        torn_files: 0,
    };
    for (i, (t, phase, at, resume)) in plan.into_iter().enumerate() {
        let t = &templates[t].0;
        let torn = (rng.next() % 2 == 1).then(|| rng.next());
        let r = one_cut(t, phase, at, resume, torn, &mut rng, env);
        out.torn_files += r.torn_files;
        *out.windows.entry(r.window.clone()).or_default() += 1;
        *out.steps.entry(format!("{:?} {:?} {}", t.mode, phase, r.step)).or_default() += 1;
        if let Err(e) = r.result {
            eprintln!("power_loss: seed {seed} cut {i}: {e}");
            out.failures.push(format!("cut {i}: {e}"));
        }
    }
    if cuts.is_none() {
        for (t, _) in &templates {
            // Killed right after the recreate's effect, so a rollback has the most to undo.
            let first = if t.mode == Mode::Normal { "after_effect:5" } else { "after_effect:3" };
            for resume in [true, false] {
                recovery_sweep(t, first, resume, &mut rng, env, &mut out);
            }
        }
    }
    Some(out)
}

/// A rebuild killed at crash point `first` with the power cut at that moment, then its first
/// recovery (direction `resume`) cut at every one of its operations in turn, each followed by
/// one more recovery and the checks. Adds to `out`.
fn recovery_sweep(
    t: &Template,
    first: &str,
    resume: bool,
    rng: &mut XorShift,
    env: &[(&str, &str)],
    out: &mut Soak,
) {
    let mut env1 = env.to_vec();
    env1.push(("NEMOCLAW_CRASHPOINT", first));
    let (m, o) = run_on_power_fs(t, t.pristine.path(), None, &["alpha", "rebuild", "--yes"], &env1);
    assert!(killed(&o), "{first}: not killed: {}", stderr(&o));
    m.power_cut(None).expect("write the durable image");
    let image = tempfile::Builder::new().prefix("nemoclaw-image-").tempdir().unwrap();
    copy_dir(t.home(), image.path());
    let (m, _) = run_on_power_fs(t, image.path(), None, &recover_args(resume), env);
    let total = m.ops();
    m.power_cut(None).expect("write the durable image");
    let ctx0 = format!("{:?} killed at {first}, recover resume={resume}", t.mode);
    if let Err(e) = differences(t, resume, &format!("{ctx0}, uncut")) {
        out.failures.push(e);
    }
    for at in 1..=total {
        let torn = (rng.next() % 2 == 1).then(|| rng.next());
        let (m, _) = run_on_power_fs(t, image.path(), Some(at), &recover_args(resume), env);
        let window = format!(
            "recover: {}",
            m.cut().map(|op| window_of(&op)).unwrap_or_else(|| "(after the end)".into())
        );
        out.torn_files += m.power_cut(torn).expect("write the durable image");
        let step = journal_window(t);
        let ctx = format!("{ctx0} cut at {at} ({window}) torn={torn:?} journal={step}");
        let result = recover_and_check(t, resume, &ctx);
        out.cuts += 1;
        *out.windows.entry(window).or_default() += 1;
        *out.steps.entry(format!("{:?} Recover {step}", t.mode)).or_default() += 1;
        if let Err(e) = result {
            eprintln!("power_loss: {e}");
            out.failures.push(e);
        }
    }
}

/// Copy a directory tree into `to` as `cp -a` does: modes, mtimes, symlinks and hard links
/// kept, since backups record (and restores verify) the metadata of what they hold.
pub(super) fn copy_dir(from: &Path, to: &Path) {
    let o = std::process::Command::new("cp")
        .arg("-a")
        .arg("--")
        .arg(from.join("."))
        .arg(to)
        .output()
        .expect("cp");
    assert!(o.status.success(), "cp -a {from:?} {to:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// A rebuild on the file system, killed at crash point `point` (`name:hit`), then the power
/// cut at that moment, then `recover` in direction `resume`: the differences found, if any.
pub(super) fn power_cut_at_crash_point(
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
    recover_and_check(t, resume, point)
}
