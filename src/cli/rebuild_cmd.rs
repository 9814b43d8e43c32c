//! `nemoclaw <name> rebuild` and `nemoclaw recover`.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use serde_json::{json, Value};

use super::args::{RebuildArgs, RecoverArgs};
use super::{CliError, CmdResult, Ctx, Printer};
use crate::engine::lock::LockDir;
use crate::engine::runner::{self, Observer, RunReport, RunSpec, StepOutcome};
use crate::engine::signals::{self, Stop};
use crate::engine::StepCtx;
use crate::exit::Exit;
use crate::journal::runs::{self, RunRecord, RunState, StepState, UnfinishedFilter};
use crate::journal::Journal;
use crate::names::SandboxName;
use crate::rebuild::{self, messages, Decision, Mode, Resolver};

/// Prints NemoClaw's step messages, and a progress line per step on a terminal.
struct Progress<'a> {
    p: &'a Printer,
}

/// The step in flight, for the stop notice (the signal thread reads it).
static CURRENT_STEP: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

impl<'a> Progress<'a> {
    /// The observer of a run; also what a Ctrl-C is answered with while it runs.
    fn new(p: &'a Printer) -> Self {
        let printer = p.clone();
        signals::on_signal(Box::new(move |stop| {
            let step = CURRENT_STEP.lock().map(|s| s.clone()).unwrap_or_default();
            let step = if step.is_empty() {
                "the current step".to_owned()
            } else {
                format!("step `{step}`")
            };
            printer.notice(match stop {
                Stop::AfterThisStep => format!(
                    "Stopping: {step} is finishing and will be journaled, then the run stops as interrupted. \
                     Press Ctrl-C again to stop at once (the journal stays consistent); `nemoclaw recover` continues the run."
                ),
                Stop::Now => format!(
                    "Stopped at once during {step}; the journal is consistent. Run `nemoclaw recover` to resume or roll back."
                ),
            });
        }));
        Self { p }
    }
}

impl Observer for Progress<'_> {
    fn step_started(&self, _seq: usize, name: &str, resumed: bool) {
        if let Ok(mut s) = CURRENT_STEP.lock() {
            name.clone_into(&mut s);
        }
        let msg = match name {
            "backup" => Some(messages::BACKING_UP),
            "remove" => Some(messages::DELETING),
            "onboard" => Some(messages::CREATING),
            "restore" => Some(messages::RESTORING),
            _ => None,
        };
        if let Some(m) = msg {
            self.p.info(if resumed { format!("{m} (resuming)") } else { m.to_owned() });
        }
    }
    fn step_finished(&self, seq: usize, name: &str, elapsed: Duration, outcome: &StepOutcome) {
        if !self.p.tty {
            return;
        }
        let what = match outcome {
            StepOutcome::Done => "done".to_owned(),
            StepOutcome::FoundDone => "already done".to_owned(),
            StepOutcome::Failed(e) => format!("failed: {e}"),
            StepOutcome::Unknown(e) => format!("unknown: {e}"),
        };
        self.p.info(self.p_dim(&format!(
            "  [{}] {name:<13} {:>7.2}s  {what}",
            seq + 1,
            secs(elapsed)
        )));
    }
    fn compensating(&self, _seq: usize, name: &str) {
        self.p.info(format!("Undoing {name}..."));
    }
    fn compensated(&self, seq: usize, name: &str, elapsed: Duration) {
        if self.p.tty {
            self.p.info(self.p_dim(&format!(
                "  [{}] {name:<13} {:>7.2}s  undone",
                seq + 1,
                secs(elapsed)
            )));
        }
    }
}

impl Progress<'_> {
    fn p_dim(&self, s: &str) -> String {
        if self.p.color {
            format!("\x1b[2m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn argv() -> Vec<String> {
    std::env::args().collect()
}

/// The dpkg-style notice: an unfinished run blocks this sandbox until it is finished.
fn unfinished_for(journal: &Journal, name: &SandboxName) -> Result<Vec<RunRecord>, CliError> {
    Ok(runs::unfinished_runs(
        journal.conn(),
        &UnfinishedFilter { lock_key: None, sandbox: Some(name.as_str()) },
    )?)
}

/// Who is working on run `r` right now: the journal's holder row when another live process
/// holds the run's kernel lock, `None` when nobody does (the run was interrupted). The lock is
/// the truth (the OS drops it when its holder dies); the row only names the holder.
fn live_holder(ctx: &Ctx, journal: &Journal, r: &RunRecord) -> Option<runs::HolderRecord> {
    let locks = LockDir::new(&ctx.home);
    // Asked without taking the lock (a runner starting now must not find it busy because of
    // us); where the kernel's table cannot be read, a try-and-drop is the fallback.
    let held = match locks.is_held(&r.lock_key) {
        Some(h) => Ok(h),
        None => locks.try_lock(&r.lock_key).map(|l| l.is_none()),
    };
    match held {
        Ok(false) => None,
        Ok(true) => Some(runs::holder(journal.conn(), &r.lock_key).ok().flatten().unwrap_or(
            runs::HolderRecord {
                lock_key: r.lock_key.clone(),
                run_id: Some(r.id.clone()),
                pid: r.pid,
                host: r.host.clone(),
                started_at: r.created_at,
                acquired_at: r.updated_at,
            },
        )),
        // Cannot even open the lock file (read-only home): say nothing we cannot prove.
        Err(_) => None,
    }
}

/// "pid 42 on host h since 2026-…, running `nemoclaw alpha rebuild --yes`".
fn holder_line(h: &runs::HolderRecord, r: &RunRecord) -> String {
    format!(
        "pid {} on host {} since {}, running `{}`",
        h.pid,
        h.host,
        crate::util::iso_ms(h.acquired_at),
        r.argv.join(" ")
    )
}

/// Print the notice about an unfinished run of `name`, if there is one: "in progress" when a
/// live process holds it, "was interrupted" (with the recover commands) when nobody does.
/// Used by every command that touches a sandbox. Returns whether one was found.
pub fn warn_unfinished(ctx: &Ctx, name: &SandboxName) -> bool {
    let path = ctx.home.join(crate::journal::store::FILE_NAME);
    let Ok(Some(j)) = Journal::open_readonly(&path) else { return false };
    let Ok(list) = unfinished_for(&j, name) else { return false };
    for r in &list {
        match live_holder(ctx, &j, r) {
            Some(h) => ctx.printer.warn(format!(
                "⚠ A rebuild of '{name}' is in progress (run {}, {}): {}.",
                short(&r.id),
                r.state.as_str(),
                holder_line(&h, r)
            )),
            None => ctx.printer.warn(format!(
                "⚠ A rebuild of '{name}' was interrupted (run {}, {}); you must run `nemoclaw recover --resume {}` or `nemoclaw recover --rollback {}`.",
                short(&r.id), r.state.as_str(), r.id, r.id
            )),
        }
    }
    !list.is_empty()
}

/// Refuse a command that would change a sandbox with an unfinished run: exit 75 naming the
/// holder while a live process runs it, else exit 3 with the recover commands (recovery needs
/// the host as the journal left it).
pub fn refuse_if_unfinished(ctx: &Ctx, name: &SandboxName, what: &str) -> Result<(), CliError> {
    let path = ctx.home.join(crate::journal::store::FILE_NAME);
    // A mutating command is about to write anyway: a journal left mid-write by a killed
    // process is rolled back first (as the next writer would), not reported as an I/O error.
    let Some(j) = Journal::open_recovering(&path)? else { return Ok(()) };
    let Some(r) = unfinished_for(&j, name)?.into_iter().next() else { return Ok(()) };
    if let Some(h) = live_holder(ctx, &j, &r) {
        return Err(CliError::new(
            Exit::Busy,
            format!(
                "a rebuild of '{name}' is in progress (run {}, {}): {}; `{what}` is refused while it runs (nothing was changed)",
                r.id,
                r.state.as_str(),
                holder_line(&h, &r)
            ),
        )
        .hint(format!("wait for it to finish (`nemoclaw journal show {}` follows it), then retry", r.id)));
    }
    Err(CliError::new(
        Exit::Refused,
        format!(
            "a rebuild of '{name}' is unfinished (run {}, {}); `{what}` is refused until it is resumed or rolled back (nothing was changed)",
            r.id,
            r.state.as_str()
        ),
    )
    .hint(format!("resume it: `nemoclaw recover --resume {}`", r.id))
    .hint(format!("or undo it: `nemoclaw recover --rollback {}`", r.id)))
}

fn short(id: &str) -> &str {
    &id[..id.len().min(13)]
}

/// `nemoclaw <name> rebuild`.
pub fn rebuild(ctx: &Ctx, name: &str, a: RebuildArgs) -> CmdResult {
    let name = &super::parse_name(name)?;
    let p = &ctx.printer;
    // Unfinished runs first: a second rebuild of the same sandbox is refused until the first
    // is resumed or rolled back.
    refuse_if_unfinished(ctx, name, "rebuild")?;

    let pf = match rebuild::preflight(&ctx.home, name, ctx.global.openshell.as_deref()) {
        Ok(pf) => pf,
        // No driver for the recorded gateway (e.g. `openshell` is not installed): the live
        // state cannot be confirmed, which is NemoClaw's refusal, not a crash.
        Err(rebuild::PreflightError::Gateway(e)) => {
            return Err(CliError::new(
                Exit::Refused,
                format!(
                    "{}\n  {e}\n{}",
                    messages::could_not_confirm(name.as_str()),
                    messages::ENTRY_PRESERVED
                ),
            )
            .hint("install `openshell` or pass `--openshell PATH`, then retry"))
        }
        Err(e) => return Err(e.into()),
    };
    let mode = match &pf.decision {
        Decision::Refuse(lines) => {
            if p.json {
                p.json_doc(
                    "rebuild",
                    json!({"sandbox": name, "state": "refused", "reason": lines, "changed": false}),
                );
            }
            let mut it = lines.iter();
            if let Some(first) = it.next() {
                p.error(first);
            }
            for l in it {
                p.say(l);
            }
            return Ok(Exit::Refused);
        }
        Decision::Proceed(m) => *m,
    };

    p.info(messages::header(name.as_str()));
    if mode == Mode::Stale {
        p.warn(messages::stale_absent(name.as_str()));
        p.info(messages::STALE_NO_BACKUP);
    }
    let now = crate::util::now_ms();
    let mut params = rebuild::params(&pf, mode, now);
    if mode == Mode::Stale {
        if let Some(prior) = rebuild::prior_policy(&ctx.home, name) {
            params["prior_policy"] = prior;
        }
    }
    let env = rebuild::env_from_params(&ctx.home, &params, pf.gateway.clone(), false)
        .ok_or_else(|| CliError::new(Exit::Failed, "internal error: rebuild params incomplete"))?;
    let plan = rebuild::plan(std::sync::Arc::new(env), pf.shields_locked);
    let step_names: Vec<&str> = plan.steps.iter().map(|s| s.name()).collect();

    if a.dry_run {
        let empty = Default::default();
        let probes: Vec<Value> = plan
            .steps
            .iter()
            .enumerate()
            .map(|(seq, s)| {
                let sc = StepCtx { run_id: "dry-run", seq, params: &params, outputs: &empty, attempt: 0 };
                let probe = match s.probe(&sc) {
                    Ok(crate::engine::Probe::Done(_)) => "done".to_owned(),
                    Ok(crate::engine::Probe::NotDone) => "to do".to_owned(),
                    Ok(crate::engine::Probe::Unknown(t)) => format!("unknown: {t}"),
                    Err(_) => "to do (depends on earlier steps)".to_owned(),
                };
                json!({"seq": seq + 1, "step": s.name(), "destructive": s.destructive(), "probe": probe})
            })
            .collect();
        if p.json {
            p.json_doc(
                "rebuild_plan",
                json!({"sandbox": name, "gateway": pf.binding.name(), "mode": mode.as_str(), "steps": probes, "changed": false}),
            );
        } else {
            p.data(format!(
                "Plan for '{name}' on gateway '{}' ({} mode):",
                pf.binding,
                mode.as_str()
            ));
            for s in &probes {
                p.data(format!(
                    "  {}. {:<13} {}{}",
                    s["seq"],
                    s["step"].as_str().unwrap_or(""),
                    s["probe"].as_str().unwrap_or(""),
                    if s["destructive"] == true { "  (point of no return)" } else { "" }
                ));
            }
            p.info("Dry run: nothing was changed.");
        }
        return Ok(Exit::Ok);
    }

    if !a.yes {
        if !std::io::stdin().is_terminal() {
            return Err(CliError::new(
                Exit::Refused,
                format!("rebuild of '{name}' needs confirmation, and there is no terminal to ask on (nothing was changed)"),
            )
            .hint(format!("run `nemoclaw {name} rebuild --yes` to proceed without asking")));
        }
        let what = match mode {
            Mode::Normal => format!(
                "This will back up '{name}', delete it, recreate it with the current image and restore its state ({}).",
                step_names.join(" → ")
            ),
            Mode::Stale => format!(
                "'{name}' is gone from its gateway: there is nothing to back up. This will recreate it from the registry metadata ({}).",
                step_names.join(" → ")
            ),
        };
        eprintln!("{}", super::printer::clean(&what));
        eprint!("Proceed? [y/N] ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        if !matches!(line.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
            p.info("Aborted: nothing was changed.");
            return Ok(Exit::Refused);
        }
    }

    let mut journal = Journal::open_home(&ctx.home)?;
    let locks = LockDir::new(&ctx.home);
    let spec = RunSpec {
        lock_key: rebuild::lock_key(pf.binding.name(), name),
        sandbox: Some(name.to_string()),
        gateway: Some(pf.binding.name().to_owned()),
        mode: Some(mode.as_str().to_owned()),
        params,
        argv: argv(),
    };
    let obs = Progress::new(p);
    let report = runner::start(&mut journal, &locks, &plan, spec, &obs)?;
    finish(ctx, &mut journal, &locks, name, mode, report, pf.shields_locked)
}

/// Turn a report into messages, the stale auto-rollback, and the exit code.
fn finish(
    ctx: &Ctx,
    journal: &mut Journal,
    locks: &LockDir,
    name: &SandboxName,
    mode: Mode,
    report: RunReport,
    shields_locked: bool,
) -> CmdResult {
    let p = &ctx.printer;
    let id = report.run_id.clone();
    match report.state {
        RunState::Succeeded => {
            step_warnings(p, journal, &id);
            p.success(messages::rebuilt(name.as_str()));
            if mode == Mode::Stale {
                p.info(messages::STALE_RECOVERED);
                if shields_locked {
                    p.warn(messages::shields_unlocked_warning(name.as_str()));
                }
            }
            json_report(p, name, mode, &report, None);
            Ok(Exit::Ok)
        }
        RunState::Failed
            if mode == Mode::Stale && report.failed_step.as_deref() == Some("onboard") =>
        {
            // Stale recreate failure rolls back automatically (registry row preserved, as
            // NemoClaw does), and the rollback is journaled like any other.
            p.error(messages::RECREATE_FAILED);
            if let Some(e) = &report.error {
                p.say(format!("  {}", e.message));
            }
            let resolver = resolver(ctx, journal, &id)?;
            let rb = runner::rollback(journal, locks, &id, &resolver, &Progress::new(p))?;
            if rb.state == RunState::RolledBack {
                p.say(messages::ENTRY_PRESERVED_RETRY);
                json_report(p, name, mode, &report, Some(&rb));
                Ok(Exit::Failed)
            } else {
                json_report(p, name, mode, &report, Some(&rb));
                next_commands(p, &rb);
                Ok(rb.exit().max_failed())
            }
        }
        // Failed before the point of no return (nothing deleted, no row removed): undo at
        // once, in this command, so a run that changed nothing an operator cares about never
        // blocks the sandbox, and shields lowered for the backup are raised again.
        RunState::Failed if failed_before_remove(&report) => {
            explain(p, &report);
            let resolver = resolver(ctx, journal, &id)?;
            let rb = runner::rollback(journal, locks, &id, &resolver, &Progress::new(p))?;
            json_report(p, name, mode, &report, Some(&rb));
            if rb.state == RunState::RolledBack {
                p.notice(messages::nothing_changed(name.as_str(), shields_locked));
                Ok(Exit::Failed)
            } else {
                next_commands(p, &rb);
                Ok(rb.exit().max_failed())
            }
        }
        _ => {
            json_report(p, name, mode, &report, None);
            explain(p, &report);
            next_commands(p, &report);
            Ok(report.exit())
        }
    }
}

/// The warnings steps journaled in their output (e.g. a preset that could not be re-applied):
/// the run succeeded, but the operator has something to do.
fn step_warnings(p: &Printer, journal: &Journal, run_id: &str) {
    for step in runs::steps(journal.conn(), run_id).unwrap_or_default() {
        let list = step.output.as_ref().and_then(|o| o.get("warnings")).and_then(Value::as_array);
        for w in list.into_iter().flatten().filter_map(Value::as_str) {
            p.warn(w);
        }
    }
}

/// Whether a failed run stopped before its first destructive step (`remove`): the steps
/// before it only read, lower shields (undone by the rollback) and write a backup.
fn failed_before_remove(r: &RunReport) -> bool {
    matches!(r.failed_step.as_deref(), Some("snapshot" | "shields_down" | "backup"))
        && r.needs_operator.is_none()
        && !r.interrupted
}

trait MaxFailed {
    fn max_failed(self) -> Exit;
}
impl MaxFailed for Exit {
    /// A rollback that itself stopped still means the rebuild failed.
    fn max_failed(self) -> Exit {
        if self == Exit::Ok {
            Exit::Failed
        } else {
            self
        }
    }
}

fn explain(p: &Printer, r: &RunReport) {
    if r.interrupted {
        p.error(format!("interrupted: run {} is journaled as {}", r.run_id, r.state.as_str()));
    } else if let Some(t) = &r.needs_operator {
        p.error(format!(
            "step `{}` cannot tell whether its effect happened: {t}",
            r.failed_step.as_deref().unwrap_or("?")
        ));
        p.say("A person must look before anything else is done; nemoclaw will not guess.");
    } else if let Some(e) = &r.error {
        p.error(format!(
            "step `{}` failed: {}",
            r.failed_step.as_deref().unwrap_or("?"),
            e.message
        ));
        for h in &e.hints {
            p.hint(h);
        }
    }
}

fn next_commands(p: &Printer, r: &RunReport) {
    if r.state.is_final() {
        return;
    }
    if r.state != RunState::RollingBack {
        p.hint(format!("continue it: `nemoclaw recover --resume {}`", r.run_id));
    }
    p.hint(format!("or undo it: `nemoclaw recover --rollback {}`", r.run_id));
}

fn json_report(p: &Printer, name: &SandboxName, mode: Mode, r: &RunReport, rb: Option<&RunReport>) {
    if !p.json {
        return;
    }
    p.json_doc(
        "rebuild",
        json!({
            "sandbox": name,
            "mode": mode.as_str(),
            "run_id": r.run_id,
            "state": rb.map(|x| x.state).unwrap_or(r.state).as_str(),
            "failed_step": r.failed_step,
            "error": r.error.as_ref().map(|e| e.message.clone()),
            "needs_operator": r.needs_operator,
            "interrupted": r.interrupted || rb.is_some_and(|x| x.interrupted),
            "auto_rollback": rb.map(|x| x.state.as_str()),
        }),
    );
}

/// A resolver for `run_id`, knowing whether its onboard step was attempted.
fn resolver(ctx: &Ctx, journal: &Journal, run_id: &str) -> Result<Resolver, CliError> {
    let onboard_attempted = runs::steps(journal.conn(), run_id)?
        .iter()
        .any(|s| s.name == "onboard" && s.state != StepState::Pending);
    Ok(Resolver {
        home: ctx.home.clone(),
        openshell: ctx.global.openshell.clone(),
        onboard_attempted,
    })
}

fn last_step(j: &Journal, run_id: &str) -> String {
    runs::steps(j.conn(), run_id)
        .ok()
        .and_then(|steps| {
            steps
                .iter()
                .rev()
                .find(|s| s.state != StepState::Pending)
                .map(|s| format!("{} {}", s.name, s.state.as_str()))
        })
        .unwrap_or_else(|| "none started".to_owned())
}

/// `nemoclaw recover`.
pub fn recover(ctx: &Ctx, a: RecoverArgs) -> CmdResult {
    let p = &ctx.printer;
    let journal_path = ctx.home.join(crate::journal::store::FILE_NAME);
    if !a.resume && !a.rollback {
        let Some(j) = Journal::open_recovering(&journal_path)? else {
            if p.json {
                p.json_doc("recover", json!({"unfinished": []}));
            } else {
                p.info("No unfinished runs.");
            }
            return Ok(Exit::Ok);
        };
        let list = runs::unfinished_runs(
            j.conn(),
            &UnfinishedFilter { lock_key: None, sandbox: a.sandbox.as_deref() },
        )?;
        let now = crate::util::now_ms();
        let rows: Vec<Value> = list
            .iter()
            .map(|r| {
                let holder = runs::holder(j.conn(), &r.lock_key).ok().flatten();
                json!({
                    "run_id": r.id,
                    "sandbox": r.sandbox,
                    "gateway": r.gateway,
                    "mode": r.mode,
                    "state": r.state.as_str(),
                    "step": last_step(&j, &r.id),
                    "age_ms": now - r.created_at,
                    "holder": holder.map(|h| json!({"pid": h.pid, "host": h.host, "alive": holder_alive(h.pid, &h.host)})),
                    "resume": format!("nemoclaw recover --resume {}", r.id),
                    "rollback": format!("nemoclaw recover --rollback {}", r.id),
                })
            })
            .collect();
        if p.json {
            p.json_doc("recover", json!({ "unfinished": rows }));
        } else if rows.is_empty() {
            p.info("No unfinished runs.");
        } else {
            p.data(format!(
                "{:<36}  {:<16} {:<7} {:<14} {:<22} {:>8}  HOLDER",
                "RUN", "SANDBOX", "MODE", "STATE", "STEP", "AGE"
            ));
            for r in &rows {
                p.data(format!(
                    "{:<36}  {:<16} {:<7} {:<14} {:<22} {:>8}  {}",
                    r["run_id"].as_str().unwrap_or(""),
                    r["sandbox"].as_str().unwrap_or("-"),
                    r["mode"].as_str().unwrap_or("-"),
                    r["state"].as_str().unwrap_or(""),
                    r["step"].as_str().unwrap_or(""),
                    age(r["age_ms"].as_i64().unwrap_or(0)),
                    holder_text(&r["holder"]),
                ));
            }
            for r in &rows {
                p.hint(format!(
                    "`{}` or `{}`",
                    r["resume"].as_str().unwrap_or(""),
                    r["rollback"].as_str().unwrap_or("")
                ));
            }
        }
        return Ok(Exit::Ok);
    }

    let mut journal = Journal::open_home(&ctx.home)?;
    let run = match (&a.run, &a.sandbox) {
        (Some(r), _) => runs::find_run(journal.conn(), r)?,
        (None, s) => {
            let name = s.as_deref().map(super::parse_name).transpose()?;
            let list = runs::unfinished_runs(
                journal.conn(),
                &UnfinishedFilter { lock_key: None, sandbox: name.as_ref().map(|n| n.as_str()) },
            )?;
            match list.len() {
                1 => list.into_iter().next().expect("one"),
                0 => {
                    p.info("No unfinished runs: nothing to recover.");
                    if p.json {
                        // Nothing to do is still an answer a script can read.
                        p.json_doc(
                            "recover",
                            json!({"run_id": null, "action": if a.resume { "resume" } else { "rollback" }, "state": null, "nothing_to_do": true}),
                        );
                    }
                    return Ok(Exit::Ok);
                }
                n => {
                    return Err(CliError::new(
                        Exit::Usage,
                        format!("{n} unfinished runs; say which one to recover"),
                    )
                    .hint(
                        "list them with `nemoclaw recover`, then `nemoclaw recover --resume RUN`",
                    ))
                }
            }
        }
    };
    let name = run.sandbox.as_deref().and_then(|s| SandboxName::parse(s).ok());
    let mode = run.mode.as_deref().and_then(Mode::parse).unwrap_or(Mode::Normal);
    let resolver = resolver(ctx, &journal, &run.id)?;
    let locks = LockDir::new(&ctx.home);
    let obs = Progress::new(p);
    let verb = if a.resume { "Resuming" } else { "Rolling back" };
    p.info(format!(
        "{verb} run {} of '{}' ({} mode, {})",
        run.id,
        run.sandbox.as_deref().unwrap_or("-"),
        mode.as_str(),
        run.state.as_str()
    ));
    let report = if a.resume {
        runner::resume(&mut journal, &locks, &run.id, &resolver, &obs)?
    } else {
        runner::rollback(&mut journal, &locks, &run.id, &resolver, &obs)?
    };
    let shields_locked = run.params["shields_locked"].as_bool().unwrap_or(false);
    match (report.state, name) {
        (RunState::Succeeded, Some(n)) => {
            step_warnings(p, &journal, &run.id);
            p.success(messages::rebuilt(n.as_str()));
            if mode == Mode::Stale {
                p.info(messages::STALE_RECOVERED);
                if shields_locked {
                    p.warn(messages::shields_unlocked_warning(n.as_str()));
                }
            }
        }
        (RunState::RolledBack, Some(n)) => {
            p.success(format!(
                "✓ Run {} rolled back: '{n}' is as it was before the rebuild",
                run.id
            ));
        }
        _ => {
            explain(p, &report);
            next_commands(p, &report);
        }
    }
    if p.json {
        p.json_doc(
            "recover",
            json!({
                "run_id": report.run_id,
                "action": if a.resume { "resume" } else { "rollback" },
                "state": report.state.as_str(),
                "failed_step": report.failed_step,
                "error": report.error.as_ref().map(|e| e.message.clone()),
                "needs_operator": report.needs_operator,
                "interrupted": report.interrupted,
            }),
        );
    }
    Ok(report.exit())
}

/// Whether a recorded holder is still running (same host and its pid exists).
fn holder_alive(pid: i64, host: &str) -> bool {
    host == crate::util::hostname()
        && pid > 0
        // SAFETY: signal 0 only checks that the process exists.
        && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
}

fn holder_text(h: &Value) -> String {
    match h["pid"].as_i64() {
        None => "none (free)".to_owned(),
        Some(pid) if h["alive"] == true => {
            format!("pid {pid} on {} (running)", h["host"].as_str().unwrap_or("?"))
        }
        Some(pid) => format!("pid {pid} on {} (gone)", h["host"].as_str().unwrap_or("?")),
    }
}

fn age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}
