//! The runner: starts a plan, resumes it, rolls it back, under the write-ahead protocol.
//!
//! Write ordering (the whole point of this module):
//! - A step's intent (`started`, attempt+1) is committed before its effect starts, so a crash
//!   during the effect leaves a `started` row that the next runner probes.
//! - A step's outcome (`done` + output, or `failed` + error) and the next step's intent are
//!   ONE transaction: one fsync per transition, and there is never a moment where the journal
//!   says "k done" without the effect of k, or "k+1 started" without "k done".
//! - The last outcome and the run's final state are one transaction too.
//! - Rollback mirrors this with `compensating` / `compensated`.
//!
//! Every boundary between those commits and the effects is a crash point ([`crash`]).
//!
//! This file owns the entry points ([`start`], [`resume`], [`rollback`]), the runner lock's
//! takeover protocol and the run being driven (`Exec`); the forward walk is in
//! `engine::forward`, the backward walk in `engine::rollback`, what a call reports in
//! `engine::report` and its failures in `engine::error`.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::crash::{self, CrashPoint};
use super::lock::{process_start_ms, KernelLock, LockDir};
use super::signals;
use super::step::{Plan, StepCtx};
use crate::journal::runs::{
    self, HolderRecord, NewRun, NewStep, RunRecord, RunState, StepState, UnfinishedFilter,
};
use crate::journal::Journal;

// The runner's vocabulary stays reachable where callers have always found it.
pub use super::error::{EngineError, PlanError};
pub use super::report::{Observer, Quiet, RunReport, StepOutcome};

/// What a new run is about.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    /// What the runner lock protects (one runner per key), e.g. `local/demo`.
    pub lock_key: String,
    /// Sandbox name, when the plan is about one. A label: journaled with the run for the
    /// audit and `recover`'s filters; the engine does not interpret it.
    pub sandbox: Option<String>,
    /// Gateway binding, when the plan is about one (a label, like `sandbox`).
    pub gateway: Option<String>,
    /// Plan-specific mode (`normal`, `stale`; a label, like `sandbox`).
    pub mode: Option<String>,
    /// Parameters fixed at creation; a [`PlanResolver`] rebuilds the plan from them.
    pub params: Value,
    /// The command line, journaled for the audit.
    pub argv: Vec<String>,
}

/// Rebuilds the plan of a journaled run (from its plan name and params).
pub trait PlanResolver {
    /// The plan for `run`: [`PlanError::Unknown`] when this binary does not know the plan,
    /// [`PlanError::Data`] when the run's params do not decode.
    fn plan_for(&self, run: &RunRecord) -> Result<Plan, PlanError>;
}

/// A runner lock held by this process: the kernel lock plus our `holders` row.
struct Held {
    key: String,
    _lock: KernelLock,
}

impl Held {
    /// Remove our holder row, then drop the kernel lock (in that order: the row must never
    /// claim a lock that a new holder already has; the delete is scoped to our pid anyway).
    fn release(self, journal: &mut Journal) {
        let (pid, host) = (std::process::id() as i64, crate::util::hostname());
        if let Err(e) = journal
            .write("release the runner lock", |tx| runs::clear_holder(tx, &self.key, pid, &host))
        {
            // Harmless: the next runner sees a stale row and journals a takeover.
            tracing::warn!("cannot clear the lock holder row: {e}");
        }
    }
}

/// Take the runner lock for `key`. With the kernel lock held, any run of this key still marked
/// `running`/`rolling_back`, and any holder row, belong to a dead runner: mark such runs
/// `interrupted` (running) and journal a `takeover`, in the same transaction that records us.
fn acquire(journal: &mut Journal, locks: &LockDir, key: &str) -> Result<Held, EngineError> {
    let lock = match locks.try_lock(key) {
        Ok(Some(l)) => l,
        Ok(None) => {
            let holder = runs::holder(journal.conn(), key)?.map(Box::new);
            return Err(EngineError::Busy {
                key: key.to_owned(),
                lock_path: locks.path_for(key),
                holder,
            });
        }
        Err(source) => return Err(EngineError::Lock { path: locks.path_for(key), source }),
    };
    let now = crate::util::now_ms();
    let me = HolderRecord {
        lock_key: key.to_owned(),
        run_id: None,
        pid: std::process::id() as i64,
        host: crate::util::hostname(),
        started_at: process_start_ms(),
        acquired_at: now,
    };
    journal.write("take the runner lock", |tx| {
        let old = runs::holder(tx, key)?;
        let filter = UnfinishedFilter { lock_key: Some(key), sandbox: None };
        let abandoned: Vec<RunRecord> = runs::unfinished_runs(tx, &filter)?
            .into_iter()
            .filter(|r| matches!(r.state, RunState::Running | RunState::RollingBack))
            .collect();
        let data = |run: Option<&RunRecord>| {
            json!({
                "lock": key,
                "old_pid": old.as_ref().map(|o| o.pid).or(run.map(|r| r.pid)),
                "old_host": old.as_ref().map(|o| o.host.clone()).or(run.map(|r| r.host.clone())),
                "old_started_at": old.as_ref().map(|o| o.started_at),
                "old_acquired_at": old.as_ref().map(|o| o.acquired_at),
                "new_pid": me.pid,
                "new_host": me.host,
            })
        };
        for run in &abandoned {
            runs::run_event(tx, &run.id, "takeover", now, data(Some(run)))?;
            if run.state == RunState::Running {
                runs::set_run_state(
                    tx,
                    &run.id,
                    RunState::Interrupted,
                    Some("the runner died (its lock was free)"),
                    now,
                    json!({ "takeover": true }),
                )?;
            }
        }
        if abandoned.is_empty() {
            if let Some(o) = &old {
                // A dead holder that had no run in flight (died between runs or before
                // creating one): still worth an audit line.
                crate::journal::events::append(
                    tx,
                    o.run_id.as_deref(),
                    None,
                    now,
                    "takeover",
                    &data(None),
                )?;
            }
        }
        runs::set_holder(tx, &me)
    })?;
    crash::point(CrashPoint::AfterLock);
    Ok(Held { key: key.to_owned(), _lock: lock })
}

fn new_run_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Start a new run of `plan` and drive it forward until it succeeds, fails, needs an operator
/// or is interrupted.
///
/// The runner lock is released before this returns, whatever the outcome, so the caller may
/// call [`rollback`] right away (the rebuild's stale mode does after a failed recreate).
/// Refuses ([`EngineError::Unfinished`]) when the key has an unfinished run.
pub fn start(
    journal: &mut Journal,
    locks: &LockDir,
    plan: &Plan,
    spec: RunSpec,
    obs: &dyn Observer,
) -> Result<RunReport, EngineError> {
    signals::install();
    let held = acquire(journal, locks, &spec.lock_key)?;
    let result = start_locked(journal, plan, spec, obs);
    held.release(journal);
    result
}

fn start_locked(
    journal: &mut Journal,
    plan: &Plan,
    spec: RunSpec,
    obs: &dyn Observer,
) -> Result<RunReport, EngineError> {
    let filter = UnfinishedFilter { lock_key: Some(&spec.lock_key), sandbox: None };
    if let Some(r) = runs::unfinished_runs(journal.conn(), &filter)?.into_iter().next() {
        return Err(EngineError::Unfinished { key: spec.lock_key, run_id: r.id, state: r.state });
    }
    let new = NewRun {
        id: new_run_id(),
        lock_key: spec.lock_key,
        plan: plan.name.clone(),
        plan_fingerprint: plan.fingerprint(),
        sandbox: spec.sandbox,
        gateway: spec.gateway,
        mode: spec.mode,
        params: spec.params,
        argv: spec.argv,
        steps: plan
            .steps
            .iter()
            .map(|s| NewStep {
                name: s.name().to_owned(),
                version: s.version(),
                destructive: s.destructive(),
            })
            .collect(),
    };
    let now = crate::util::now_ms();
    journal.write("create the run", |tx| {
        runs::create_run(tx, &new, now)?;
        runs::set_holder_run(tx, &new.lock_key, &new.id)
    })?;
    crash::point(CrashPoint::AfterRunCreated);
    let rows = runs::steps(journal.conn(), &new.id)?;
    Exec::new(journal, plan, &new.id, new.params.clone(), obs).forward(rows)
}

/// Load a run, take its lock, check its plan. Returns the fresh run record (after any
/// takeover) and the plan.
fn open_run(
    journal: &mut Journal,
    locks: &LockDir,
    run_id: &str,
    plans: &dyn PlanResolver,
) -> Result<(Held, RunRecord, Plan), EngineError> {
    signals::install();
    let run = runs::find_run(journal.conn(), run_id)?;
    let held = acquire(journal, locks, &run.lock_key)?;
    let checked = (|| {
        let run = runs::find_run(journal.conn(), &run.id)?;
        let plan = plans.plan_for(&run).map_err(|e| match e {
            PlanError::Unknown => {
                EngineError::UnknownPlan { run_id: run.id.clone(), plan: run.plan.clone() }
            }
            PlanError::Data(source) => EngineError::Data { run_id: run.id.clone(), source },
            PlanError::Unavailable { message, exit } => {
                EngineError::PlanUnavailable { run_id: run.id.clone(), message, exit }
            }
        })?;
        let current = plan.fingerprint();
        if current != run.plan_fingerprint || plan.name != run.plan {
            return Err(EngineError::PlanChanged {
                run_id: run.id.clone(),
                plan: run.plan.clone(),
                recorded: run.plan_fingerprint.clone(),
                current,
            });
        }
        // Every journaled output the plan will read must still decode: a run whose journal
        // this binary cannot read is refused here, before anything is written or moved.
        for row in runs::steps(journal.conn(), &run.id)? {
            let (Some(out), Some(step)) =
                (&row.output, plan.steps.iter().find(|s| s.name() == row.name))
            else {
                continue;
            };
            step.check_output(out)
                .map_err(|source| EngineError::Data { run_id: run.id.clone(), source })?;
        }
        journal.write("record the lock holder's run", |tx| {
            runs::set_holder_run(tx, &run.lock_key, &run.id)
        })?;
        Ok((run, plan))
    })();
    match checked {
        Ok((run, plan)) => Ok((held, run, plan)),
        Err(e) => {
            held.release(journal);
            Err(e)
        }
    }
}

/// Continue an unfinished run forward from its first unfinished step.
///
/// A step found `started` (or `failed`) is probed first: `Done` records it done with the
/// probe's output, `NotDone` applies it again (attempt+1), `Unknown` stops the run as
/// `needs_operator`. A `succeeded` run is reported as is. A run that is `rolling_back` or
/// `rolled_back` is refused ([`EngineError::Refused`], exit 3), as is a run whose plan this
/// binary does not know or whose plan fingerprint differs. The lock is released on return.
pub fn resume(
    journal: &mut Journal,
    locks: &LockDir,
    run_id: &str,
    plans: &dyn PlanResolver,
    obs: &dyn Observer,
) -> Result<RunReport, EngineError> {
    let (held, run, plan) = open_run(journal, locks, run_id, plans)?;
    let result = resume_locked(journal, &run, &plan, obs);
    held.release(journal);
    result
}

fn resume_locked(
    journal: &mut Journal,
    run: &RunRecord,
    plan: &Plan,
    obs: &dyn Observer,
) -> Result<RunReport, EngineError> {
    match run.state {
        RunState::Succeeded => return Ok(RunReport::new(&run.id, run.state)),
        RunState::RollingBack | RunState::RolledBack => {
            return Err(EngineError::Refused {
                run_id: run.id.clone(),
                state: run.state,
                why:
                    "a run that started rolling back can only be rolled back further (`--rollback`)"
                        .into(),
            })
        }
        // `running` cannot be seen here: with the lock held, acquire() turned it interrupted.
        RunState::Running | RunState::Failed | RunState::Interrupted | RunState::NeedsOperator => {}
    }
    let rows = runs::steps(journal.conn(), &run.id)?;
    if rows.len() != plan.steps.len()
        || rows.iter().any(|r| matches!(r.state, StepState::Compensating | StepState::Compensated))
    {
        return Err(EngineError::Refused {
            run_id: run.id.clone(),
            state: run.state,
            why: "its steps do not allow going forward; roll it back instead".into(),
        });
    }
    let now = crate::util::now_ms();
    if run.state != RunState::Running {
        journal.write("resume the run", |tx| {
            runs::set_run_state(
                tx,
                &run.id,
                RunState::Running,
                None,
                now,
                json!({ "resumed_by": std::process::id() }),
            )
            .map(|_| ())
        })?;
    }
    Exec::new(journal, plan, &run.id, run.params.clone(), obs).forward(rows)
}

/// Undo an unfinished run: compensate every step that is `done`, `started`, `failed` or
/// `compensating`, in reverse order, journaled (`compensating` → `compensated`), then mark the
/// run `rolled_back`. Resumable: a rollback that crashed continues where it stopped. A
/// `rolled_back` run is reported as is; a `succeeded` run is refused. The lock is released on
/// return.
pub fn rollback(
    journal: &mut Journal,
    locks: &LockDir,
    run_id: &str,
    plans: &dyn PlanResolver,
    obs: &dyn Observer,
) -> Result<RunReport, EngineError> {
    let (held, run, plan) = open_run(journal, locks, run_id, plans)?;
    let result = match run.state {
        RunState::RolledBack => Ok(RunReport::new(&run.id, run.state)),
        RunState::Succeeded => Err(EngineError::Refused {
            run_id: run.id.clone(),
            state: run.state,
            why: "a finished run has nothing to roll back".into(),
        }),
        _ => runs::steps(journal.conn(), &run.id).map_err(EngineError::from).and_then(|rows| {
            Exec::new(journal, &plan, &run.id, run.params.clone(), obs).backward(run.state, rows)
        }),
    };
    held.release(journal);
    result
}

/// One run being driven by this process.
pub(super) struct Exec<'a> {
    pub(super) journal: &'a mut Journal,
    pub(super) plan: &'a Plan,
    pub(super) run_id: String,
    pub(super) params: Value,
    pub(super) obs: &'a dyn Observer,
    pub(super) outputs: BTreeMap<String, Value>,
}

impl<'a> Exec<'a> {
    pub(super) fn new(
        journal: &'a mut Journal,
        plan: &'a Plan,
        run_id: &str,
        params: Value,
        obs: &'a dyn Observer,
    ) -> Self {
        Self { journal, plan, run_id: run_id.to_owned(), params, obs, outputs: BTreeMap::new() }
    }

    pub(super) fn ctx(&self, seq: usize, attempt: u32) -> StepCtx<'_> {
        StepCtx { run_id: &self.run_id, seq, params: &self.params, outputs: &self.outputs, attempt }
    }

    pub(super) fn report(&self, state: RunState) -> RunReport {
        RunReport::new(&self.run_id, state)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::engine::synthetic;
    use crate::exit::{Exit, ExitCoded};

    #[derive(Default)]
    struct Record(Mutex<Vec<String>>);

    impl Observer for Record {
        fn step_started(&self, seq: usize, name: &str, resumed: bool) {
            self.0.lock().unwrap().push(format!("start {seq} {name} {resumed}"));
        }
        fn step_finished(&self, seq: usize, _: &str, _: Duration, outcome: &StepOutcome) {
            self.0.lock().unwrap().push(format!("end {seq} {outcome:?}"));
        }
        fn compensating(&self, seq: usize, _: &str) {
            self.0.lock().unwrap().push(format!("comp {seq}"));
        }
        fn compensated(&self, seq: usize, _: &str, _: Duration) {
            self.0.lock().unwrap().push(format!("undone {seq}"));
        }
    }

    fn spec(ledger: &std::path::Path, n: usize) -> RunSpec {
        RunSpec { lock_key: "k".into(), params: synthetic::params(n, ledger), ..RunSpec::default() }
    }

    /// A three-step synthetic run in `dir` that failed at its third step (`s2`).
    fn failed_at_step_2(
        dir: &std::path::Path,
    ) -> (Journal, LockDir, std::path::PathBuf, RunReport) {
        let mut j = Journal::open_home(dir).unwrap();
        let locks = LockDir::new(dir);
        let ledger = dir.join("ledger");
        let opts = synthetic::Options { fail_at: Some(2), step_ms: 0 };
        let r = start(&mut j, &locks, &synthetic::plan(3, &ledger, opts), spec(&ledger, 3), &Quiet)
            .unwrap();
        (j, locks, ledger, r)
    }

    #[test]
    fn one_commit_per_step_transition() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open_home(dir.path()).unwrap();
        let locks = LockDir::new(dir.path());
        for n in [1usize, 5, 20] {
            let ledger = dir.path().join(format!("l{n}"));
            let plan = synthetic::plan(n, &ledger, synthetic::Options::default());
            let before = j.commits();
            let r = start(&mut j, &locks, &plan, spec(&ledger, n), &Quiet).unwrap();
            assert_eq!(r.state, RunState::Succeeded);
            // lock + create + one commit per step (its intent, carrying the previous outcome)
            // + finish (last outcome + succeeded) + release.
            assert_eq!(j.commits() - before, n as u64 + 4, "{n} steps");
        }
    }

    #[test]
    fn failed_step_then_unknown_probe_needs_an_operator_then_resume_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open_home(dir.path()).unwrap();
        let locks = LockDir::new(dir.path());
        let ledger = dir.path().join("ledger");
        let opts = synthetic::Options { fail_at: Some(1), step_ms: 0 };
        let obs = Record::default();
        let r = start(&mut j, &locks, &synthetic::plan(3, &ledger, opts), spec(&ledger, 3), &obs)
            .unwrap();
        assert_eq!((r.state, r.failed_step.as_deref()), (RunState::Failed, Some("s1")));
        assert_eq!(r.exit(), Exit::Failed);
        // A second start on the key is refused while the run is unfinished.
        let e = start(&mut j, &locks, &synthetic::plan(1, &ledger, opts), spec(&ledger, 1), &Quiet)
            .unwrap_err();
        assert_eq!(e.exit(), Exit::Refused);
        // Someone applied step 1 twice by hand: the probe cannot tell, an operator must look.
        std::fs::write(&ledger, "+0\n+1\n+1\n").unwrap();
        let res = synthetic::Resolver::default();
        let r = resume(&mut j, &locks, &r.run_id, &res, &obs).unwrap();
        assert_eq!(r.state, RunState::NeedsOperator);
        assert!(r.needs_operator.as_deref().unwrap().contains("applied 2 times"), "{r:?}");
        // Fixed by hand: the probe finds step 1 done, so it is not applied again.
        std::fs::write(&ledger, "+0\n+1\n").unwrap();
        let r = resume(&mut j, &locks, &r.run_id[..8], &res, &obs).unwrap();
        assert_eq!(r.state, RunState::Succeeded);
        assert_eq!(std::fs::read_to_string(&ledger).unwrap(), "+0\n+1\n+2\n");
        let log = obs.0.lock().unwrap().join("\n");
        assert!(
            log.contains("start 1 s1 true\nend 1 FoundDone\nstart 2 s2 false\nend 2 Done"),
            "{log}"
        );
        // Finished runs: resume reports, rollback refuses.
        assert_eq!(
            resume(&mut j, &locks, &r.run_id, &res, &Quiet).unwrap().state,
            RunState::Succeeded
        );
        assert_eq!(
            rollback(&mut j, &locks, &r.run_id, &res, &Quiet).unwrap_err().exit(),
            Exit::Refused
        );
    }

    /// Wraps a plan's steps so every journaled output is refused by `check_output`.
    struct Picky(Box<dyn crate::engine::Step>);

    impl crate::engine::Step for Picky {
        fn name(&self) -> &'static str {
            self.0.name()
        }
        fn version(&self) -> u32 {
            self.0.version()
        }
        fn probe(
            &self,
            ctx: &StepCtx<'_>,
        ) -> Result<crate::engine::Probe, crate::engine::StepError> {
            self.0.probe(ctx)
        }
        fn apply(&self, ctx: &StepCtx<'_>) -> Result<Value, crate::engine::StepError> {
            self.0.apply(ctx)
        }
        fn check_output(&self, _: &Value) -> Result<(), crate::engine::DataError> {
            Err(crate::engine::DataError { what: "output".into(), detail: "refused".into() })
        }
        fn compensate(
            &self,
            ctx: &StepCtx<'_>,
            out: Option<&Value>,
        ) -> Result<(), crate::engine::StepError> {
            self.0.compensate(ctx, out)
        }
    }

    struct PickyResolver;

    impl PlanResolver for PickyResolver {
        fn plan_for(&self, run: &RunRecord) -> Result<Plan, PlanError> {
            let mut plan = synthetic::Resolver::default().plan_for(run)?;
            plan.steps = plan.steps.into_iter().map(|s| Box::new(Picky(s)) as _).collect();
            Ok(plan)
        }
    }

    /// Params or a step output that do not decode: resume and rollback refuse with exit 65
    /// (not as an unknown plan), and neither the run nor its effects move.
    #[test]
    fn journaled_data_that_does_not_decode_is_refused_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, locks, ledger, r) = failed_at_step_2(dir.path());
        let good = runs::get_run(j.conn(), &r.run_id).unwrap().unwrap().params.to_string();
        let res = synthetic::Resolver::default();

        // A step output the plan refuses.
        let e = rollback(&mut j, &locks, &r.run_id, &PickyResolver, &Quiet).unwrap_err();
        assert!(matches!(&e, EngineError::Data { source, .. } if source.what == "output"), "{e}");
        assert_eq!(e.exit(), Exit::Corrupt);

        // Params of the wrong type.
        j.conn()
            .execute(
                "UPDATE runs SET params = json_set(params, '$.steps', 'three') WHERE id = ?1",
                [&r.run_id],
            )
            .unwrap();
        for e in [
            resume(&mut j, &locks, &r.run_id, &res, &Quiet).unwrap_err(),
            rollback(&mut j, &locks, &r.run_id, &res, &Quiet).unwrap_err(),
        ] {
            assert_eq!(e.exit(), Exit::Corrupt, "{e}");
            assert!(e.to_string().contains("journaled params cannot be decoded"), "{e}");
        }
        let run = runs::get_run(j.conn(), &r.run_id).unwrap().unwrap();
        assert_eq!(run.state, RunState::Failed);
        assert_eq!(std::fs::read_to_string(&ledger).unwrap(), "+0\n+1\n");
        assert!(runs::holder(j.conn(), "k").unwrap().is_none());

        // Put back, the same run rolls back.
        j.conn().execute("UPDATE runs SET params = ?1 WHERE id = ?2", [&good, &r.run_id]).unwrap();
        let r = rollback(&mut j, &locks, &r.run_id, &res, &Quiet).unwrap();
        assert_eq!(r.state, RunState::RolledBack);
    }

    #[test]
    fn rollback_compensates_in_reverse_and_busy_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, locks, ledger, r) = failed_at_step_2(dir.path());
        let obs = Record::default();
        let res = synthetic::Resolver::default();
        // Hold the key's lock as another runner would: rollback is refused, naming it.
        let held = acquire(&mut j, &locks, "k").unwrap();
        let e = rollback(&mut j, &locks, &r.run_id, &res, &obs).unwrap_err();
        assert_eq!(e.exit(), Exit::Busy);
        assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
        held.release(&mut j);
        let r = rollback(&mut j, &locks, &r.run_id, &res, &obs).unwrap();
        assert_eq!(r.state, RunState::RolledBack);
        assert_eq!(std::fs::read_to_string(&ledger).unwrap(), "+0\n+1\n-1\n-0\n");
        assert_eq!(
            obs.0.lock().unwrap().join(","),
            "comp 2,undone 2,comp 1,undone 1,comp 0,undone 0"
        );
        let steps = runs::steps(j.conn(), &r.run_id).unwrap();
        assert!(steps.iter().all(|s| s.state == StepState::Compensated));
        assert!(crate::journal::verify_chain(j.conn()).unwrap() > 10);
    }
}
