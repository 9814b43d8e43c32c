//! `nemoclaw <name> rebuild` and `nemoclaw recover`.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use serde_json::{json, Value};

use super::args::{RebuildArgs, RecoverArgs};
use super::{CliError, CmdResult, Ctx, Printer};
use crate::engine::lock::LockDir;
use crate::engine::runner::{self, Observer, RunReport, RunSpec, StepOutcome};
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

impl Observer for Progress<'_> {
    fn step_started(&self, _seq: usize, name: &str, resumed: bool) {
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

/// Print the notice about an unfinished run of `name`, if there is one. Used by every command
/// that touches a sandbox. Returns whether one was found.
pub fn warn_unfinished(ctx: &Ctx, name: &SandboxName) -> bool {
    let path = ctx.home.join(crate::journal::store::FILE_NAME);
    let Ok(Some(j)) = Journal::open_readonly(&path) else { return false };
    let Ok(list) = unfinished_for(&j, name) else { return false };
    for r in &list {
        ctx.printer.warn(format!(
            "⚠ A rebuild of '{name}' was interrupted (run {}, {}); you must run `nemoclaw recover --resume {}` or `nemoclaw recover --rollback {}`.",
            short(&r.id), r.state.as_str(), r.id, r.id
        ));
    }
    !list.is_empty()
}

/// Refuse (exit 3) a command that would change a sandbox with an unfinished run: recovery
/// needs the host as the journal left it.
pub fn refuse_if_unfinished(ctx: &Ctx, name: &SandboxName, what: &str) -> Result<(), CliError> {
    let path = ctx.home.join(crate::journal::store::FILE_NAME);
    let Some(j) = Journal::open_readonly(&path)? else { return Ok(()) };
    match unfinished_for(&j, name)?.into_iter().next() {
        None => Ok(()),
        Some(r) => Err(CliError::new(
            Exit::Refused,
            format!(
                "a rebuild of '{name}' is unfinished (run {}, {}); `{what}` is refused until it is resumed or rolled back (nothing was changed)",
                r.id,
                r.state.as_str()
            ),
        )
        .hint(format!("resume it: `nemoclaw recover --resume {}`", r.id))
        .hint(format!("or undo it: `nemoclaw recover --rollback {}`", r.id))),
    }
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
                eprintln!("{l}");
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
        eprintln!("{what}");
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
    let obs = Progress { p };
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
                eprintln!("  {}", e.message);
            }
            let resolver = resolver(ctx, journal, &id)?;
            let rb = runner::rollback(journal, locks, &id, &resolver, &Progress { p })?;
            if rb.state == RunState::RolledBack {
                eprintln!("{}", messages::ENTRY_PRESERVED_RETRY);
                json_report(p, name, mode, &report, Some(&rb));
                Ok(Exit::Failed)
            } else {
                json_report(p, name, mode, &report, Some(&rb));
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
        eprintln!("A person must look before anything else is done; nemoclaw will not guess.");
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
        accept_damaged_backup: false,
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
    if a.accept_damaged_backup && !a.rollback {
        return Err(CliError::new(Exit::Usage, "--accept-damaged-backup goes with --rollback")
            .hint("`nemoclaw recover --rollback RUN --accept-damaged-backup`"));
    }
    if !a.resume && !a.rollback {
        let Some(j) = Journal::open_readonly(&journal_path)? else {
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
    let mut resolver = resolver(ctx, &journal, &run.id)?;
    let mut damaged_at = None;
    if a.accept_damaged_backup {
        use crate::rebuild::damaged::{accept_damaged_backup, BackupCheck};
        match accept_damaged_backup(&mut journal, &run.id)? {
            BackupCheck::Damaged { path, why } => {
                p.warn(format!("{why}."));
                p.warn(format!(
                    "Rolling back without restoring it: the registry entry comes back, the sandbox stays absent, and the backup stays at {path}."
                ));
                resolver.accept_damaged_backup = true;
                damaged_at = Some(path);
            }
            BackupCheck::Intact { path } => {
                p.info(format!("Backup {path} verifies: it will be restored as usual."))
            }
            BackupCheck::NoBackup => p.info("This run made no backup: nothing to accept."),
        }
    }
    let locks = LockDir::new(&ctx.home);
    let obs = Progress { p };
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
            p.success(messages::rebuilt(n.as_str()));
            if mode == Mode::Stale {
                p.info(messages::STALE_RECOVERED);
                if shields_locked {
                    p.warn(messages::shields_unlocked_warning(n.as_str()));
                }
            }
        }
        (RunState::RolledBack, Some(n)) if damaged_at.is_some() => {
            p.success(format!(
                "✓ Run {} rolled back without its damaged backup: '{n}' is registered as before, with no sandbox on its gateway",
                run.id
            ));
            p.info(format!(
                "The backup was kept at {}; files in it that still match can be copied back by hand.",
                damaged_at.as_deref().unwrap_or("?")
            ));
            p.hint(format!("recreate the sandbox (stale recovery): `nemoclaw {n} rebuild`"));
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
