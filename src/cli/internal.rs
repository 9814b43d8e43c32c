//! Hidden commands for the test suite and benchmarks (synthetic plans in a real process).
//!
//! `nemoclaw internal synthetic run|resume|rollback`: exit 0 succeeded / rolled back, 1 failed,
//! 3 refused, 65 corrupt or newer journal, 74 I/O, 75 busy, 130 interrupted. The run id is
//! printed on stdout (or in the `--json` document).

use serde_json::json;

use super::args::{InternalCmd, SyntheticAction, SyntheticArgs};
use super::{CmdResult, Ctx};
use crate::engine::synthetic::{self, Action};
use crate::engine::RunReport;

/// `nemoclaw internal ...`.
pub fn dispatch(ctx: &Ctx, i: InternalCmd) -> CmdResult {
    match i {
        InternalCmd::Synthetic(a) => synthetic_cmd(ctx, a),
    }
}

fn synthetic_cmd(ctx: &Ctx, a: SyntheticArgs) -> CmdResult {
    let opts = synthetic::Options { fail_at: a.fail_at, step_ms: a.step_ms };
    let action = match a.action {
        SyntheticAction::Run => Action::Run {
            steps: a.steps,
            ledger: a.ledger.clone().unwrap_or_else(|| ctx.home.join("synthetic-ledger.txt")),
            argv: std::env::args().collect(),
        },
        SyntheticAction::Resume => Action::Resume(a.run.clone()),
        SyntheticAction::Rollback => Action::Rollback(a.run.clone()),
    };
    let report = synthetic::drive(&ctx.home, &a.key, action, opts)?;
    print_report(ctx, &report);
    Ok(report.exit())
}

fn print_report(ctx: &Ctx, r: &RunReport) {
    let p = &ctx.printer;
    if p.json {
        p.json_doc(
            "internal.synthetic",
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
