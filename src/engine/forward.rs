//! The forward walk of a run: each step's intent, effect and outcome under the write-ahead
//! protocol (see [`super::runner`]), probing a step an earlier runner left unfinished first.

use std::time::Instant;

use serde_json::{json, Value};

use super::crash::{self, CrashPoint};
use super::error::EngineError;
use super::report::{RunReport, StepOutcome};
use super::runner::Exec;
use super::signals;
use super::step::{Probe, StepError};
use crate::journal::runs::{self, RunState, StepChange, StepRecord, StepState};
use crate::journal::JournalError;

/// The `input` journaled with an intent: who applies the effect.
fn intent_input() -> Value {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    json!({ "pid": std::process::id(), "host": HOST.get_or_init(crate::util::hostname) })
}

impl Exec<'_> {
    /// Commit `carry` (a finished step's output, not yet durable) together with `then`.
    fn commit(
        &mut self,
        what: &str,
        carry: &Option<(usize, Value)>,
        then: impl FnOnce(&rusqlite::Transaction<'_>, &str, i64) -> Result<(), JournalError>,
    ) -> Result<(), EngineError> {
        let run_id = self.run_id.clone();
        let now = crate::util::now_ms();
        self.journal.write(what, |tx| {
            if let Some((seq, out)) = carry {
                let change = StepChange { output: Some(out), ..Default::default() };
                runs::set_step_state(tx, &run_id, *seq, StepState::Done, change, now)?;
            }
            then(tx, &run_id, now)
        })?;
        Ok(())
    }

    pub(super) fn forward(mut self, rows: Vec<StepRecord>) -> Result<RunReport, EngineError> {
        let n = self.plan.steps.len();
        // The outcome of the previous step, committed with the next commit (intent or finish).
        let mut carry: Option<(usize, Value)> = None;
        let mut k = 0;
        loop {
            if k == n {
                crash::point(CrashPoint::BeforeFinish);
                self.commit("finish the run", &carry, |tx, id, now| {
                    runs::set_run_state(tx, id, RunState::Succeeded, None, now, json!({}))
                        .map(|_| ())
                })?;
                if carry.is_some() {
                    crash::point(CrashPoint::AfterOutcome);
                }
                return Ok(self.report(RunState::Succeeded));
            }
            if signals::stop_requested() {
                self.commit("record the interruption", &carry, |tx, id, now| {
                    runs::set_run_state(
                        tx,
                        id,
                        RunState::Interrupted,
                        Some("interrupted by a signal"),
                        now,
                        json!({}),
                    )
                    .map(|_| ())
                })?;
                let mut r = self.report(RunState::Interrupted);
                r.interrupted = true;
                return Ok(r);
            }
            let step = &self.plan.steps[k];
            let name = step.name();
            let row = &rows[k];
            let resumed = matches!(row.state, StepState::Started | StepState::Failed);
            match row.state {
                StepState::Done if carry.is_none() => {
                    self.outputs.insert(name.to_owned(), row.output.clone().unwrap_or(Value::Null));
                    k += 1;
                    continue;
                }
                StepState::Pending => {}
                StepState::Started | StepState::Failed => {
                    // Unfinished by an earlier runner: find out whether the effect happened
                    // before deciding anything. Never guess.
                    self.obs.step_started(k, name, true);
                    let t = Instant::now();
                    match step.probe(&self.ctx(k, row.attempt)) {
                        Ok(Probe::Done(out)) => {
                            self.obs.step_finished(k, name, t.elapsed(), &StepOutcome::FoundDone);
                            self.outputs.insert(name.to_owned(), out.clone());
                            carry = Some((k, out));
                            k += 1;
                            continue;
                        }
                        Ok(Probe::NotDone) => {}
                        Ok(Probe::Unknown(text)) => {
                            self.obs.step_finished(
                                k,
                                name,
                                t.elapsed(),
                                &StepOutcome::Unknown(text.clone()),
                            );
                            let msg = format!("step `{name}`: {text}");
                            self.commit(
                                "record that an operator is needed",
                                &carry,
                                |tx, id, now| {
                                    runs::set_run_state(
                                        tx,
                                        id,
                                        RunState::NeedsOperator,
                                        Some(&msg),
                                        now,
                                        json!({ "step": name }),
                                    )
                                    .map(|_| ())
                                },
                            )?;
                            let mut r = self.report(RunState::NeedsOperator);
                            r.failed_step = Some(name.to_owned());
                            r.needs_operator = Some(text);
                            return Ok(r);
                        }
                        Err(e) => {
                            self.obs.step_finished(
                                k,
                                name,
                                t.elapsed(),
                                &StepOutcome::Failed(e.message.clone()),
                            );
                            return self.fail(k, carry, e, true);
                        }
                    }
                }
                // Done after a carried outcome, or compensation states: resume_locked refuses
                // these before we get here.
                other => {
                    return Err(EngineError::Refused {
                        run_id: self.run_id.clone(),
                        state: RunState::Running,
                        why: format!(
                            "step {k} (`{name}`) is {other} out of order; roll it back instead"
                        ),
                    })
                }
            }
            // Intent: durable before the effect. Carries the previous step's outcome.
            crash::point(CrashPoint::BeforeIntent);
            let input = intent_input();
            self.commit("record the step intent", &carry, |tx, id, now| {
                let change = StepChange { input: Some(&input), ..Default::default() };
                runs::set_step_state(tx, id, k, StepState::Started, change, now).map(|_| ())
            })?;
            if carry.take().is_some() {
                crash::point(CrashPoint::AfterOutcome);
            }
            crash::point(CrashPoint::AfterIntent);
            if !resumed {
                self.obs.step_started(k, name, false);
            }
            let t = Instant::now();
            let attempt = rows[k].attempt + 1;
            let result = step.apply(&self.ctx(k, attempt));
            crash::point(CrashPoint::AfterEffect);
            match result {
                Ok(out) => {
                    self.obs.step_finished(k, name, t.elapsed(), &StepOutcome::Done);
                    self.outputs.insert(name.to_owned(), out.clone());
                    carry = Some((k, out));
                    k += 1;
                }
                Err(e) => {
                    self.obs.step_finished(
                        k,
                        name,
                        t.elapsed(),
                        &StepOutcome::Failed(e.message.clone()),
                    );
                    return self.fail(k, None, e, false);
                }
            }
        }
    }

    /// Record step `k` failed (with any carried outcome) and the run failed, in one commit.
    /// `probe`: the failure came from a probe of a step found started/failed.
    fn fail(
        mut self,
        k: usize,
        carry: Option<(usize, Value)>,
        e: StepError,
        probe: bool,
    ) -> Result<RunReport, EngineError> {
        let name = self.plan.steps[k].name();
        let msg = if probe {
            format!("step `{name}`: cannot check whether it already happened: {}", e.message)
        } else {
            format!("step `{name}` failed: {}", e.message)
        };
        self.commit("record the step failure", &carry, |tx, id, now| {
            let change = StepChange { error: Some(&e.message), ..Default::default() };
            // A probe failure on an already `failed` step leaves the step as it is.
            if runs::step_state(tx, id, k)? != StepState::Failed {
                runs::set_step_state(tx, id, k, StepState::Failed, change, now)?;
            }
            runs::set_run_state(tx, id, RunState::Failed, Some(&msg), now, json!({ "step": name }))
                .map(|_| ())
        })?;
        crash::point(CrashPoint::AfterOutcome);
        let mut r = self.report(RunState::Failed);
        r.failed_step = Some(name.to_owned());
        r.error = Some(e);
        Ok(r)
    }
}
