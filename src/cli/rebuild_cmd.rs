//! `nemoclaw <name> rebuild` and `nemoclaw recover`.

use std::io::IsTerminal;
use std::time::Duration;

use serde_json::{json, Value};

use super::args::{RebuildArgs, RecoverArgs};
use super::style::{self, Cell};
use super::{CliError, CmdResult, Ctx, Printer, Refusal};
use crate::engine::runner::{Observer, RunReport, StepOutcome};
use crate::engine::signals::{self, Stop};
use crate::exit::Exit;
use crate::names::SandboxName;
use crate::rebuild::saga::{
    self, AutoRollback, Blocker, Outcome, RunState, SagaObserver, Selected,
};
use crate::rebuild::{self, messages, Decision, Mode};

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
        self.p.progress(format!("  [{}] {name:<13} {:>7.2}s  {what}", seq + 1, secs(elapsed)));
    }
    fn compensating(&self, _seq: usize, name: &str) {
        self.p.info(format!("Undoing {name}..."));
    }
    fn compensated(&self, seq: usize, name: &str, elapsed: Duration) {
        if self.p.tty {
            self.p.progress(format!("  [{}] {name:<13} {:>7.2}s  undone", seq + 1, secs(elapsed)));
        }
    }
}

impl SagaObserver for Progress<'_> {
    /// Said before the rollback's own progress lines.
    fn auto_rollback(&self, why: AutoRollback, failed: &RunReport) {
        match why {
            AutoRollback::StaleRecreateFailed => {
                self.p.error(messages::RECREATE_FAILED);
                if let Some(e) = &failed.error {
                    self.p.say(format!("  {}", e.message));
                }
            }
            AutoRollback::BeforePointOfNoReturn => explain(self.p, failed),
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn argv() -> Vec<String> {
    std::env::args().collect()
}

/// Print the notice about an unfinished run of `name`, if there is one: "in progress" when a
/// live process holds it, "was interrupted" (with the recover commands) when nobody does.
/// Used by every command that touches a sandbox. Returns whether one was found.
pub fn warn_unfinished(ctx: &Ctx, name: &SandboxName) -> bool {
    let Ok(list) = saga::blockers(&ctx.home, name, false) else { return false };
    for b in &list {
        match b {
            Blocker::InProgress { run: r, holder } => ctx.printer.warn(format!(
                "a rebuild of '{name}' is in progress (run {}, {}): {}.",
                short(&r.id),
                r.state.as_str(),
                super::error::holder_line(r, holder)
            )),
            Blocker::Unfinished { run: r } => ctx.printer.warn(format!(
                "a rebuild of '{name}' was interrupted (run {}, {}); you must run `nemoclaw recover --resume {}` or `nemoclaw recover --rollback {}`.",
                short(&r.id), r.state.as_str(), r.id, r.id
            )),
        }
    }
    !list.is_empty()
}

/// Refuse a command that would change a sandbox with an unfinished run: exit 75 naming the
/// holder while a live process runs it, else exit 3 with the recover commands (recovery needs
/// the host as the journal left it).
pub fn refuse_if_unfinished(
    ctx: &Ctx,
    name: &SandboxName,
    what: &'static str,
) -> Result<(), CliError> {
    let name = name.clone();
    match saga::blocker(&ctx.home, &name)? {
        None => Ok(()),
        Some(Blocker::InProgress { run, holder }) => {
            Err(Refusal::InProgress { name, what, run, holder }.into())
        }
        Some(Blocker::Unfinished { run }) => Err(Refusal::Unfinished { name, what, run }.into()),
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(13)]
}

/// `nemoclaw <name> rebuild`: refuse if unfinished → preflight → plan → (dry run | confirm →
/// run) → print.
pub fn rebuild(ctx: &Ctx, name: &str, a: RebuildArgs) -> CmdResult {
    let name = &super::parse_name(name)?;
    let p = &ctx.printer;
    // A second rebuild of the same sandbox is refused until the first is finished.
    refuse_if_unfinished(ctx, name, "rebuild")?;
    let pf = match rebuild::preflight(&ctx.home, name, ctx.global.openshell.as_deref()) {
        Ok(pf) => pf,
        // No driver for the recorded gateway (e.g. `openshell` is not installed): the live
        // state cannot be confirmed, which is NemoClaw's refusal, not a crash.
        Err(rebuild::PreflightError::Gateway(error)) => {
            return Err(Refusal::NoGatewayDriver { name: name.clone(), error }.into())
        }
        Err(e) => return Err(e.into()),
    };
    let mode = match &pf.decision {
        Decision::Refuse(lines) => return Ok(refused(p, name, lines)),
        Decision::Proceed(m) => *m,
    };
    p.info(messages::header(name.as_str()));
    if mode == Mode::Stale {
        p.warn(messages::stale_absent(name.as_str()));
        p.info(messages::STALE_NO_BACKUP);
    }
    let prepared = saga::prepare(&ctx.home, pf, mode)?;
    if a.dry_run {
        print_dry_run(p, name, &prepared);
        return Ok(Exit::Ok);
    }
    if !a.yes && !confirm(p, name, &prepared)? {
        return Ok(Exit::Refused);
    }
    let obs = Progress::new(p);
    let out = saga::run(&ctx.home, ctx.global.openshell.as_deref(), &prepared, argv(), &obs)?;
    Ok(print_outcome(p, name, mode, &out, prepared.pf.shields_locked))
}

/// Preflight refused: the lines in order, nothing changed.
fn refused(p: &Printer, name: &SandboxName, lines: &[String]) -> Exit {
    if p.json {
        p.json_doc("rebuild.refused", json!({"sandbox": name, "reason": lines, "changed": false}));
    }
    let mut it = lines.iter();
    if let Some(first) = it.next() {
        p.error(first);
    }
    for l in it {
        p.say(l);
    }
    Exit::Refused
}

fn print_dry_run(p: &Printer, name: &SandboxName, prepared: &saga::Prepared) {
    let probes = saga::dry_run(prepared);
    if p.json {
        // In JSON a step's `seq` is the journal's (from 0), as in every journal document.
        let steps: Vec<Value> = probes
            .iter()
            .map(|s| json!({"seq": s.seq - 1, "step": s.step, "destructive": s.destructive, "probe": s.probe}))
            .collect();
        p.json_doc(
            "rebuild.plan",
            json!({"sandbox": name, "gateway": prepared.pf.binding.name(), "mode": prepared.mode.as_str(), "steps": steps, "changed": false}),
        );
        return;
    }
    p.data(format!(
        "Plan for '{name}' on gateway '{}' ({} mode):",
        prepared.pf.binding,
        prepared.mode.as_str()
    ));
    for s in &probes {
        p.data(format!(
            "  {}. {:<13} {}{}",
            s.seq,
            s.step,
            s.probe,
            if s.destructive { "  (point of no return)" } else { "" }
        ));
    }
    p.info("Dry run: nothing was changed.");
}

/// Ask on the terminal; no terminal is a refusal (with the `--yes` command).
fn confirm(p: &Printer, name: &SandboxName, prepared: &saga::Prepared) -> Result<bool, CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(Refusal::NeedsConfirmation {
            what: format!("rebuild of '{name}'"),
            yes: format!("nemoclaw {name} rebuild --yes"),
        }
        .into());
    }
    let steps = prepared.step_names().join(" → ");
    let what = match prepared.mode {
        Mode::Normal => format!(
            "This will back up '{name}', delete it, recreate it with the current image and restore its state ({steps})."
        ),
        Mode::Stale => format!(
            "'{name}' is gone from its gateway: there is nothing to back up. This will recreate it from the registry metadata ({steps})."
        ),
    };
    p.say(what);
    let yes = p.confirm("Proceed?");
    Ok(yes)
}

/// Messages, JSON and the exit code for a finished `rebuild`.
fn print_outcome(
    p: &Printer,
    name: &SandboxName,
    mode: Mode,
    out: &Outcome,
    shields_locked: bool,
) -> Exit {
    let report = &out.report;
    match &out.auto_rollback {
        None if report.state == RunState::Succeeded => {
            succeeded(p, name, mode, out, shields_locked);
            json_report(p, name, mode, report, None);
            Exit::Ok
        }
        None => {
            json_report(p, name, mode, report, None);
            explain(p, report);
            next_commands(p, report);
            report.exit()
        }
        Some((why, rb)) => {
            json_report(p, name, mode, report, Some(rb));
            if rb.state != RunState::RolledBack {
                next_commands(p, rb);
                return rb.exit().max_failed();
            }
            match why {
                AutoRollback::StaleRecreateFailed => p.say(messages::ENTRY_PRESERVED_RETRY),
                AutoRollback::BeforePointOfNoReturn => {
                    p.notice(messages::nothing_changed(name.as_str(), shields_locked))
                }
            }
            Exit::Failed
        }
    }
}

/// Warnings first (something is left to do), then NemoClaw's success lines.
fn succeeded(p: &Printer, name: &SandboxName, mode: Mode, out: &Outcome, shields_locked: bool) {
    for w in &out.warnings {
        p.warn(w);
    }
    p.success(messages::rebuilt(name.as_str()));
    if mode == Mode::Stale {
        p.info(messages::STALE_RECOVERED);
        if shields_locked {
            p.warn(messages::shields_unlocked_warning(name.as_str()));
        }
    }
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
    // The failure already named the command that gets out (e.g. a damaged backup).
    if r.error.as_ref().is_some_and(|e| e.hints.iter().any(|h| h.contains("nemoclaw recover"))) {
        return;
    }
    for h in super::error::recover_commands(&r.run_id, r.state != RunState::RollingBack) {
        p.hint(h);
    }
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

/// `nemoclaw recover`: the listing, or `--resume` / `--rollback` of one run.
pub fn recover(ctx: &Ctx, a: RecoverArgs) -> CmdResult {
    if a.accept_damaged_backup && !a.rollback {
        return Err(Refusal::DamagedNeedsRollback.into());
    }
    if !a.resume && !a.rollback {
        return list_unfinished(ctx, a.sandbox.as_deref());
    }
    let p = &ctx.printer;
    let action = if a.resume { "resume" } else { "rollback" };
    let sandbox = a.sandbox.as_deref().map(super::parse_name).transpose()?;
    let run = match saga::select_run(&ctx.home, a.run.as_deref(), sandbox.as_ref())? {
        Selected::Run(r) => r,
        Selected::Nothing => {
            p.info("No unfinished runs: nothing to recover.");
            if p.json {
                // Nothing to do is still an answer a script can read.
                p.json_doc("recover", recover_doc(action, None, None));
            }
            return Ok(Exit::Ok);
        }
        Selected::Ambiguous(n) => return Err(Refusal::AmbiguousUnfinished(n).into()),
    };
    p.info(format!(
        "{} run {} of '{}' ({} mode, {})",
        if a.resume { "Resuming" } else { "Rolling back" },
        run.id,
        run.sandbox.as_deref().unwrap_or("-"),
        run.mode.as_deref().unwrap_or("-"),
        run.state.as_str()
    ));
    let damaged_at = if a.accept_damaged_backup { check_damaged_backup(ctx, &run)? } else { None };
    let obs = Progress::new(p);
    let out = saga::recover(
        &ctx.home,
        ctx.global.openshell.as_deref(),
        &run,
        a.resume,
        damaged_at.is_some(),
        &obs,
    )?;
    print_recovered(p, &run, &out, damaged_at.as_deref())?;
    if p.json {
        p.json_doc("recover", recover_doc(action, run.sandbox.as_deref(), Some(&out.report)));
    }
    Ok(out.report.exit())
}

/// `--accept-damaged-backup`: say what the rollback will do with the run's backup; the path
/// of a damaged one, which the rollback then leaves in place.
fn check_damaged_backup(ctx: &Ctx, run: &saga::RunRecord) -> Result<Option<String>, CliError> {
    let p = &ctx.printer;
    Ok(match saga::accept_damaged_backup(&ctx.home, run)? {
        saga::BackupCheck::Damaged { path, why } => {
            p.warn(format!("{why}."));
            p.warn(format!(
                "Rolling back without restoring it: the registry entry comes back, the sandbox stays absent, and the backup stays at {path}."
            ));
            Some(path)
        }
        saga::BackupCheck::Intact { path } => {
            p.info(format!("Backup {path} verifies: it will be restored as usual."));
            None
        }
        saga::BackupCheck::NoBackup => {
            p.info("This run made no backup: nothing to accept.");
            None
        }
    })
}

/// The messages after `recover --resume|--rollback`.
fn print_recovered(
    p: &Printer,
    run: &saga::RunRecord,
    out: &Outcome,
    damaged_at: Option<&str>,
) -> Result<(), CliError> {
    let report = &out.report;
    let name = run.sandbox.as_deref().and_then(|s| SandboxName::parse(s).ok());
    // The run was resumed or rolled back, so its params decoded for its plan.
    let params = saga::run_params(run)?;
    match (report.state, name) {
        (RunState::Succeeded, Some(n)) => succeeded(p, &n, params.mode, out, params.shields_locked),
        (RunState::RolledBack, Some(n)) if damaged_at.is_some() => {
            p.success(format!(
                "✓ Run {} rolled back without its damaged backup: '{n}' is registered as before, with no sandbox on its gateway",
                run.id
            ));
            p.info(format!(
                "The backup was kept at {}; files in it that still match can be copied back by hand.",
                damaged_at.unwrap_or("?")
            ));
            p.hint(format!("recreate the sandbox (stale recovery): `nemoclaw {n} rebuild`"));
        }
        (RunState::RolledBack, Some(n)) => p.success(format!(
            "✓ Run {} rolled back: '{n}' is as it was before the rebuild",
            run.id
        )),
        _ => {
            explain(p, report);
            next_commands(p, report);
        }
    }
    Ok(())
}

/// The `recover` document: one shape whether there was a run to recover or not.
fn recover_doc(action: &str, sandbox: Option<&str>, r: Option<&RunReport>) -> Value {
    json!({
        "action": action,
        "nothing_to_do": r.is_none(),
        "run_id": r.map(|r| &r.run_id),
        "sandbox": sandbox,
        "state": r.map(|r| r.state.as_str()),
        "failed_step": r.and_then(|r| r.failed_step.as_ref()),
        "error": r.and_then(|r| r.error.as_ref()).map(|e| e.message.clone()),
        "needs_operator": r.and_then(|r| r.needs_operator.as_ref()),
        "interrupted": r.is_some_and(|r| r.interrupted),
    })
}

/// `nemoclaw recover` without an action: the unfinished runs and the commands for each.
fn list_unfinished(ctx: &Ctx, sandbox: Option<&str>) -> CmdResult {
    let p = &ctx.printer;
    let list = saga::unfinished(&ctx.home, sandbox)?.unwrap_or_default();
    let now = crate::util::now_ms();
    let rows: Vec<Value> = list
        .iter()
        .map(|l| {
            let r = &l.run;
            json!({
                "run_id": r.id,
                "sandbox": r.sandbox,
                "gateway": r.gateway,
                "mode": r.mode,
                "state": r.state.as_str(),
                "step": l.last_step,
                "age_ms": now - r.created_at,
                "holder": l.holder.as_ref().map(|h| json!({"pid": h.pid, "host": h.host, "alive": l.live})),
                "resume": format!("nemoclaw recover --resume {}", r.id),
                "rollback": format!("nemoclaw recover --rollback {}", r.id),
            })
        })
        .collect();
    if p.json {
        p.json_doc("recover.list", json!({ "now": now, "unfinished": rows }));
        return Ok(Exit::Ok);
    }
    if rows.is_empty() {
        p.info("No unfinished runs.");
        return Ok(Exit::Ok);
    }
    let cells = rows
        .iter()
        .map(|r| {
            let text = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
            vec![
                text("run_id").into(),
                text("sandbox").into(),
                text("mode").into(),
                Cell::styled(text("state"), style::state(&text("state"))),
                text("step").into(),
                age(r["age_ms"].as_i64().unwrap_or(0)).into(),
                holder_text(&r["holder"]).into(),
            ]
        })
        .collect();
    p.table("", &["RUN", "SANDBOX", "MODE", "STATE", "STEP", "AGE", "HOLDER"], cells);
    for r in &rows {
        p.hint(format!(
            "`{}` or `{}`",
            r["resume"].as_str().unwrap_or(""),
            r["rollback"].as_str().unwrap_or("")
        ));
    }
    Ok(Exit::Ok)
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
