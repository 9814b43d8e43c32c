//! The backward walk of a run: compensate its steps in reverse order, journaled
//! (`compensating` → `compensated`), resumable after a crash at any point.

use std::time::Instant;

use serde_json::{json, Value};

use super::crash::{self, CrashPoint};
use super::error::EngineError;
use super::report::RunReport;
use super::runner::Exec;
use super::signals;
use crate::journal::runs::{self, RunState, StepChange, StepRecord, StepState};
use crate::journal::JournalError;

impl Exec<'_> {
    pub(super) fn backward(
        mut self,
        state: RunState,
        rows: Vec<StepRecord>,
    ) -> Result<RunReport, EngineError> {
        let mut rolling = state == RunState::RollingBack;
        for r in &rows {
            if r.state == StepState::Done
                || (r.state == StepState::Compensating && r.output.is_some())
            {
                self.outputs.insert(r.name.clone(), r.output.clone().unwrap_or(Value::Null));
            }
        }
        let targets: Vec<&StepRecord> = rows
            .iter()
            .rev()
            .filter(|r| {
                matches!(
                    r.state,
                    StepState::Done
                        | StepState::Started
                        | StepState::Failed
                        | StepState::Compensating
                )
            })
            .collect();
        // The compensation just finished, committed with the next commit.
        let mut carry: Option<usize> = None;
        for row in targets {
            let k = row.seq;
            let step = self.plan.steps.get(k).ok_or_else(|| EngineError::Refused {
                run_id: self.run_id.clone(),
                state,
                why: format!("step {k} is not in the plan"),
            })?;
            let name = step.name();
            if signals::stop_requested() {
                self.commit_comp(
                    "record the interruption",
                    carry.take(),
                    !rolling,
                    |tx, id, now| {
                        runs::run_event(
                            tx,
                            id,
                            "rollback_interrupted",
                            now,
                            json!({ "signal": true }),
                        )
                    },
                )?;
                let mut r = self.report(RunState::RollingBack);
                r.interrupted = true;
                return Ok(r);
            }
            if row.state != StepState::Compensating || carry.is_some() || !rolling {
                crash::point(CrashPoint::BeforeCompIntent);
                let already = row.state == StepState::Compensating;
                let had_carry = carry.is_some();
                self.commit_comp(
                    "record the compensation intent",
                    carry.take(),
                    !rolling,
                    |tx, id, now| {
                        if already {
                            Ok(())
                        } else {
                            runs::set_step_state(
                                tx,
                                id,
                                k,
                                StepState::Compensating,
                                StepChange::default(),
                                now,
                            )
                            .map(|_| ())
                        }
                    },
                )?;
                rolling = true;
                if had_carry {
                    crash::point(CrashPoint::AfterCompOutcome);
                }
                crash::point(CrashPoint::AfterCompIntent);
            }
            self.obs.compensating(k, name);
            let t = Instant::now();
            // The journaled output exists only when the step finished; a started or failed step
            // is compensated "blind" (compensate is a no-op when the effect is not in place).
            let output = row.output.clone();
            let result = step.compensate(&self.ctx(k, row.attempt), output.as_ref());
            crash::point(CrashPoint::AfterCompEffect);
            match result {
                Ok(()) => {
                    self.obs.compensated(k, name, t.elapsed());
                    carry = Some(k);
                }
                Err(e) => {
                    let msg = format!("compensation of step `{name}` failed: {}", e.message);
                    self.commit_comp(
                        "record the compensation failure",
                        None,
                        false,
                        |tx, id, now| {
                            runs::set_run_error(tx, id, &msg)?;
                            runs::run_event(
                                tx,
                                id,
                                "compensation_failed",
                                now,
                                json!({ "step": name, "seq": k, "error": e.message }),
                            )
                        },
                    )?;
                    let mut r = self.report(RunState::RollingBack);
                    r.failed_step = Some(name.to_owned());
                    r.error = Some(e);
                    return Ok(r);
                }
            }
        }
        crash::point(CrashPoint::BeforeRollbackFinish);
        let had_carry = carry.is_some();
        self.commit_comp("finish the rollback", carry, !rolling, |tx, id, now| {
            runs::set_run_state(tx, id, RunState::RolledBack, None, now, json!({})).map(|_| ())
        })?;
        if had_carry {
            crash::point(CrashPoint::AfterCompOutcome);
        }
        Ok(self.report(RunState::RolledBack))
    }

    /// One rollback commit: the carried compensation outcome, the run's move to `rolling_back`
    /// when it is not there yet, then `then`.
    fn commit_comp(
        &mut self,
        what: &str,
        carry: Option<usize>,
        enter_rolling_back: bool,
        then: impl FnOnce(&rusqlite::Transaction<'_>, &str, i64) -> Result<(), JournalError>,
    ) -> Result<(), EngineError> {
        let run_id = self.run_id.clone();
        let now = crate::util::now_ms();
        self.journal.write(what, |tx| {
            if let Some(seq) = carry {
                runs::set_step_state(
                    tx,
                    &run_id,
                    seq,
                    StepState::Compensated,
                    StepChange::default(),
                    now,
                )?;
            }
            if enter_rolling_back {
                runs::set_run_state(
                    tx,
                    &run_id,
                    RunState::RollingBack,
                    None,
                    now,
                    json!({ "by_pid": std::process::id() }),
                )?;
            }
            then(tx, &run_id, now)
        })?;
        Ok(())
    }
}
