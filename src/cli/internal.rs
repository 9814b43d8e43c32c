//! Hidden commands for the test suite and benchmarks (synthetic plans in a real process).
//!
//! `nemoclaw internal synthetic run|resume|rollback`: exit 0 succeeded / rolled back, 1 failed,
//! 3 refused, 65 corrupt or newer journal, 74 I/O, 75 busy, 130 interrupted. The run id is
//! printed on stdout (or in the `--json` document).

use serde_json::json;

use super::args::{InternalCmd, SyntheticArgs};
use super::{CliError, CmdResult, Ctx};
use crate::engine::{self, synthetic, EngineError, LockDir, RunReport, RunSpec};
use crate::exit::Exit;
use crate::journal::runs::{self, UnfinishedFilter};
use crate::journal::Journal;

/// `nemoclaw internal ...`.
pub fn dispatch(ctx: &Ctx, i: InternalCmd) -> CmdResult {
    match i {
        InternalCmd::Synthetic(a) => synthetic_cmd(ctx, a),
    }
}

fn engine_err(e: EngineError) -> CliError {
    let hint = match &e {
        EngineError::Busy { .. } => Some("wait for the other run to finish, then retry".to_owned()),
        EngineError::Unfinished { run_id, .. } => Some(format!(
            "run `nemoclaw internal synthetic resume --run {run_id}` or `... rollback --run {run_id}`"
        )),
        EngineError::Refused { run_id, .. } => {
            Some(format!("run `nemoclaw internal synthetic rollback --run {run_id}`"))
        }
        _ => None,
    };
    let mut c = CliError::from(e);
    if let Some(h) = hint {
        c = c.hint(h);
    }
    c
}

fn synthetic_cmd(ctx: &Ctx, a: SyntheticArgs) -> CmdResult {
    let mut journal = Journal::open_home(&ctx.home)?;
    let locks = LockDir::new(&ctx.home);
    let opts = synthetic::Options { fail_at: a.fail_at, step_ms: a.step_ms };
    let resolver = synthetic::Resolver { opts };
    let report = match a.action.as_str() {
        "run" => {
            if a.steps == 0 || a.steps > synthetic::STEP_NAMES.len() {
                return Err(CliError::new(
                    Exit::Usage,
                    format!("--steps must be 1..={}", synthetic::STEP_NAMES.len()),
                ));
            }
            let ledger = a.ledger.clone().unwrap_or_else(|| ctx.home.join("synthetic-ledger.txt"));
            let plan = synthetic::plan(a.steps, &ledger, opts);
            let spec = RunSpec {
                lock_key: a.key.clone(),
                params: synthetic::params(a.steps, &ledger),
                argv: std::env::args().collect(),
                ..RunSpec::default()
            };
            engine::start(&mut journal, &locks, &plan, spec, &engine::Quiet)
        }
        "resume" | "rollback" => {
            let run_id = match &a.run {
                Some(r) => r.clone(),
                None => {
                    let filter = UnfinishedFilter { lock_key: Some(&a.key), sandbox: None };
                    match runs::unfinished_runs(journal.conn(), &filter)?.into_iter().next() {
                        Some(r) => r.id,
                        None => {
                            return Err(CliError::new(
                                Exit::Refused,
                                format!("no unfinished run on `{}`", a.key),
                            ))
                        }
                    }
                }
            };
            if a.action == "resume" {
                engine::resume(&mut journal, &locks, &run_id, &resolver, &engine::Quiet)
            } else {
                engine::rollback(&mut journal, &locks, &run_id, &resolver, &engine::Quiet)
            }
        }
        other => {
            return Err(CliError::new(
                Exit::Usage,
                format!("unknown action `{other}`; expected run, resume or rollback"),
            ))
        }
    }
    .map_err(engine_err)?;
    print_report(ctx, &report);
    Ok(report.exit())
}

fn print_report(ctx: &Ctx, r: &RunReport) {
    let p = &ctx.printer;
    if p.json {
        p.json_doc(
            "synthetic_run",
            json!({
                "run_id": r.run_id,
                "state": r.state.as_str(),
                "failed_step": r.failed_step,
                "error": r.error.as_ref().map(|e| e.message.clone()),
                "needs_operator": r.needs_operator,
                "interrupted": r.interrupted,
            }),
        );
    } else {
        p.data(&r.run_id);
        if let Some(e) = &r.error {
            p.error(&e.message);
        }
        if let Some(t) = &r.needs_operator {
            p.warn(format!("an operator must check: {t}"));
        }
        p.info(format!("run {} is {}", r.run_id, r.state));
    }
}
