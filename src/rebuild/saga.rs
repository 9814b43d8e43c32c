//! The rebuild as library calls, so the command line only parses, confirms, calls and prints:
//! [`prepare`] the plan after preflight, [`dry_run`] its probes, [`run`] it (with the rollback
//! it decides at once: a stale recreate that failed, or a failure before the point of no
//! return), [`select_run`] and [`recover`] an unfinished run, and [`blocker`] — is a run of this
//! sandbox in progress (someone holds it) or unfinished (nobody does)?

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

pub use super::damaged::BackupCheck;
use super::data::RebuildParams;
use super::steps::Rebuild;
use super::{Mode, Preflight, Resolver};
use crate::engine::lock::LockDir;
use crate::engine::runner::{self, EngineError, Observer, RunReport, RunSpec};
use crate::engine::{DataError, Plan, Probe, StepCtx};
use crate::exit::{Exit, ExitCoded};
use crate::journal::runs::{self, StepState, UnfinishedFilter};
pub use crate::journal::runs::{HolderRecord, RunRecord, RunState};
use crate::journal::{Journal, JournalError};
use crate::names::SandboxName;

/// Failures of the saga's own bookkeeping (step failures are in the [`RunReport`]).
#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    /// The journal.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The engine (busy, lock, unknown plan…).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A journaled value the saga reads itself (a run's params, its backup's output) does not
    /// decode: corrupt input.
    #[error("run {run_id}: {source}")]
    Data {
        /// The run.
        run_id: String,
        /// What did not decode.
        source: DataError,
    },
}

impl ExitCoded for SagaError {
    fn exit(&self) -> Exit {
        match self {
            SagaError::Journal(e) => e.exit(),
            SagaError::Engine(e) => e.exit(),
            SagaError::Data { .. } => Exit::Corrupt,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Who holds a sandbox.

/// Why a command may not touch a sandbox now.
#[derive(Debug, Clone)]
pub enum Blocker {
    /// A live process runs this rebuild (running, or stopped).
    InProgress {
        /// The run.
        run: Box<RunRecord>,
        /// Who holds it (from the holders table, else from the run row).
        holder: HolderRecord,
    },
    /// Nobody holds it: it was interrupted or failed, and waits for `recover`.
    Unfinished {
        /// The run.
        run: Box<RunRecord>,
    },
}

/// Every unfinished run of `name`, each told live or interrupted. `recovering`: open the
/// journal as a writer would (a journal left mid-write is rolled back first); else strictly
/// read-only.
pub fn blockers(
    home: &Path,
    name: &SandboxName,
    recovering: bool,
) -> Result<Vec<Blocker>, JournalError> {
    let path = home.join(crate::journal::store::FILE_NAME);
    let j =
        if recovering { Journal::open_recovering(&path)? } else { Journal::open_readonly(&path)? };
    let Some(j) = j else { return Ok(Vec::new()) };
    let list = runs::unfinished_runs(
        j.conn(),
        &UnfinishedFilter { lock_key: None, sandbox: Some(name.as_str()) },
    )?;
    Ok(list.into_iter().map(|r| classify(home, &j, r)).collect())
}

/// The first [`Blocker`] of `name`, if any.
pub fn blocker(home: &Path, name: &SandboxName) -> Result<Option<Blocker>, JournalError> {
    Ok(blockers(home, name, true)?.into_iter().next())
}

/// Whether a live process holds the runner lock `key`. Asked without taking the lock (a
/// runner starting now must not find it busy because of us); where the kernel's table cannot
/// be read, a try-and-drop is the fallback.
fn is_held(home: &Path, key: &str) -> bool {
    let locks = LockDir::new(home);
    match locks.is_held(key) {
        Some(h) => h,
        None => matches!(locks.try_lock(key), Ok(None)),
    }
}

fn classify(home: &Path, j: &Journal, r: RunRecord) -> Blocker {
    if !is_held(home, &r.lock_key) {
        return Blocker::Unfinished { run: Box::new(r) };
    }
    let holder = runs::holder(j.conn(), &r.lock_key).ok().flatten().unwrap_or(HolderRecord {
        lock_key: r.lock_key.clone(),
        run_id: Some(r.id.clone()),
        pid: r.pid,
        host: r.host.clone(),
        started_at: r.created_at,
        acquired_at: r.updated_at,
    });
    Blocker::InProgress { run: Box::new(r), holder }
}

// ---------------------------------------------------------------------------------------------
// Starting a rebuild.

/// A rebuild ready to run: preflight's findings, the mode, the journaled parameters, the plan.
pub struct Prepared {
    /// Preflight.
    pub pf: Preflight,
    /// Normal or stale.
    pub mode: Mode,
    /// The run's parameters (journaled with it).
    pub params: RebuildParams,
    /// The steps.
    pub plan: Plan,
}

impl Prepared {
    /// The step names, in order.
    pub fn step_names(&self) -> Vec<&'static str> {
        self.plan.steps.iter().map(|s| s.name()).collect()
    }
}

/// Build the plan for a rebuild preflight said may proceed in `mode`.
pub fn prepare(home: &Path, pf: Preflight, mode: Mode) -> Result<Prepared, SagaError> {
    let mut params = super::params(&pf, mode, crate::util::now_ms());
    if mode == Mode::Stale {
        params.prior_policy = super::prior_policy(home, &pf.name);
    }
    let rb = Rebuild::new(home, params.clone(), pf.gateway.clone());
    let plan = super::plan(Arc::new(rb), pf.shields_locked);
    Ok(Prepared { pf, mode, params, plan })
}

/// One line of a dry run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeLine {
    /// 1-based step number, as in progress lines and `journal show`.
    pub seq: usize,
    /// Step name.
    pub step: &'static str,
    /// Whether this is the point of no return.
    pub destructive: bool,
    /// What its probe says now.
    pub probe: String,
}

/// Each step's probe, changing nothing.
pub fn dry_run(p: &Prepared) -> Vec<ProbeLine> {
    let empty = Default::default();
    let params = serde_json::json!(p.params);
    p.plan
        .steps
        .iter()
        .enumerate()
        .map(|(seq, s)| {
            let sc =
                StepCtx { run_id: "dry-run", seq, params: &params, outputs: &empty, attempt: 0 };
            let probe = match s.probe(&sc) {
                Ok(Probe::Done(_)) => "done".to_owned(),
                Ok(Probe::NotDone) => "to do".to_owned(),
                Ok(Probe::Unknown(t)) => format!("unknown: {t}"),
                Err(_) => "to do (depends on earlier steps)".to_owned(),
            };
            ProbeLine { seq: seq + 1, step: s.name(), destructive: s.destructive(), probe }
        })
        .collect()
}

/// Why a failed run was rolled back in the same command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoRollback {
    /// A stale recovery's recreate failed: the registry row is put back (NemoClaw's behaviour).
    StaleRecreateFailed,
    /// The run failed before its first destructive step: nothing an operator cares about
    /// changed, so nothing should wait for `recover`.
    BeforePointOfNoReturn,
}

/// An [`Observer`] that is also told when the saga rolls a failed run back by itself, before
/// the rollback starts (so its messages come first).
pub trait SagaObserver: Observer {
    /// The run failed and is about to be rolled back, for `why`.
    fn auto_rollback(&self, _why: AutoRollback, _failed: &RunReport) {}
}

/// What a run came to.
#[derive(Debug)]
pub struct Outcome {
    /// The run's report.
    pub report: RunReport,
    /// The rollback this command made at once, and why.
    pub auto_rollback: Option<(AutoRollback, RunReport)>,
    /// Warnings the steps journaled (a preset that could not be re-applied…), on success.
    pub warnings: Vec<String>,
}

/// Run a prepared rebuild to its end, then roll it back at once when that is the rule.
pub fn run(
    home: &Path,
    openshell: Option<&Path>,
    p: &Prepared,
    argv: Vec<String>,
    obs: &dyn SagaObserver,
) -> Result<Outcome, SagaError> {
    let mut journal = Journal::open_home(home)?;
    let locks = LockDir::new(home);
    let name = &p.pf.name;
    let spec = RunSpec {
        lock_key: super::lock_key(p.pf.binding.name(), name),
        sandbox: Some(name.to_string()),
        gateway: Some(p.pf.binding.name().to_owned()),
        mode: Some(p.mode.as_str().to_owned()),
        params: serde_json::json!(p.params),
        argv,
    };
    let report = runner::start(&mut journal, &locks, &p.plan, spec, obs)?;
    let why = match (report.state, report.failed_step.as_deref()) {
        (RunState::Failed, Some("onboard")) if p.mode == Mode::Stale => {
            Some(AutoRollback::StaleRecreateFailed)
        }
        (RunState::Failed, Some("snapshot" | "shields_down" | "backup"))
            if report.needs_operator.is_none() && !report.interrupted =>
        {
            Some(AutoRollback::BeforePointOfNoReturn)
        }
        _ => None,
    };
    let auto_rollback = match why {
        Some(why) => {
            obs.auto_rollback(why, &report);
            let resolver = resolver(home, openshell, &journal, &report.run_id, false)?;
            Some((why, runner::rollback(&mut journal, &locks, &report.run_id, &resolver, obs)?))
        }
        None => None,
    };
    let warnings = warnings_of(&journal, &report);
    Ok(Outcome { report, auto_rollback, warnings })
}

// ---------------------------------------------------------------------------------------------
// Recovering a run.

/// One unfinished run, as `nemoclaw recover` lists it.
#[derive(Debug)]
pub struct Listed {
    /// The run.
    pub run: RunRecord,
    /// "backup started", or "none started".
    pub last_step: String,
    /// The last recorded holder, if any (a dead one stays until the next runner takes over).
    pub holder: Option<HolderRecord>,
    /// Whether a live process holds the run now.
    pub live: bool,
}

/// Every unfinished run (of `sandbox`, if given); `None` when there is no journal at all.
pub fn unfinished(home: &Path, sandbox: Option<&str>) -> Result<Option<Vec<Listed>>, JournalError> {
    let Some(j) = Journal::open_recovering(&home.join(crate::journal::store::FILE_NAME))? else {
        return Ok(None);
    };
    let list = runs::unfinished_runs(j.conn(), &UnfinishedFilter { lock_key: None, sandbox })?;
    Ok(Some(
        list.into_iter()
            .map(|r| {
                let last_step = runs::steps(j.conn(), &r.id)
                    .ok()
                    .and_then(|steps| {
                        steps
                            .iter()
                            .rev()
                            .find(|s| s.state != StepState::Pending)
                            .map(|s| format!("{} {}", s.name, s.state.as_str()))
                    })
                    .unwrap_or_else(|| "none started".to_owned());
                let holder = runs::holder(j.conn(), &r.lock_key).ok().flatten();
                let live = is_held(home, &r.lock_key);
                Listed { run: r, last_step, holder, live }
            })
            .collect(),
    ))
}

/// Which run `recover --resume|--rollback` means.
#[derive(Debug)]
pub enum Selected {
    /// This one.
    Run(Box<RunRecord>),
    /// No unfinished run matches: nothing to do.
    Nothing,
    /// Several unfinished runs match: say which.
    Ambiguous(usize),
}

/// The run named by id (or prefix), else the one unfinished run (of `sandbox`, if given).
pub fn select_run(
    home: &Path,
    run: Option<&str>,
    sandbox: Option<&SandboxName>,
) -> Result<Selected, SagaError> {
    let journal = Journal::open_home(home)?;
    if let Some(r) = run {
        return Ok(Selected::Run(Box::new(runs::find_run(journal.conn(), r)?)));
    }
    let mut list = runs::unfinished_runs(
        journal.conn(),
        &UnfinishedFilter { lock_key: None, sandbox: sandbox.map(SandboxName::as_str) },
    )?;
    Ok(match list.len() {
        0 => Selected::Nothing,
        1 => Selected::Run(Box::new(list.remove(0))),
        n => Selected::Ambiguous(n),
    })
}

/// Check `run`'s backup for `recover --rollback --accept-damaged-backup`; only a backup that
/// really fails verification is accepted, and the acceptance is journaled.
pub fn accept_damaged_backup(home: &Path, run: &RunRecord) -> Result<BackupCheck, SagaError> {
    let mut journal = Journal::open_home(home)?;
    super::damaged::accept_damaged_backup(&mut journal, &run.id)
}

/// A rebuild run's journaled params; [`SagaError::Data`] (exit 65) when they do not decode.
pub fn run_params(run: &RunRecord) -> Result<RebuildParams, SagaError> {
    crate::engine::decode("params", &run.params)
        .map_err(|source| SagaError::Data { run_id: run.id.clone(), source })
}

/// Resume (forward) or roll back `run`; `accept_damaged`: the rollback skips restoring a backup
/// that was accepted as damaged (see [`accept_damaged_backup`]).
pub fn recover(
    home: &Path,
    openshell: Option<&Path>,
    run: &RunRecord,
    resume: bool,
    accept_damaged: bool,
    obs: &dyn SagaObserver,
) -> Result<Outcome, SagaError> {
    let mut journal = Journal::open_home(home)?;
    let locks = LockDir::new(home);
    let resolver = resolver(home, openshell, &journal, &run.id, accept_damaged)?;
    let report = if resume {
        runner::resume(&mut journal, &locks, &run.id, &resolver, obs)?
    } else {
        runner::rollback(&mut journal, &locks, &run.id, &resolver, obs)?
    };
    let warnings = warnings_of(&journal, &report);
    Ok(Outcome { report, auto_rollback: None, warnings })
}

/// A resolver for `run_id`, knowing whether its onboard step was attempted (a stale
/// rollback then records `imageTag: null`: that image just failed to make a sandbox).
fn resolver(
    home: &Path,
    openshell: Option<&Path>,
    journal: &Journal,
    run_id: &str,
    accept_damaged_backup: bool,
) -> Result<Resolver, JournalError> {
    let onboard_attempted = runs::steps(journal.conn(), run_id)?
        .iter()
        .any(|s| s.name == "onboard" && s.state != StepState::Pending);
    Ok(Resolver {
        home: home.to_path_buf(),
        openshell: openshell.map(PathBuf::from),
        onboard_attempted,
        accept_damaged_backup,
    })
}

/// The warnings a step journaled in its output (`warnings`: a preset that could not be
/// re-applied…): the step succeeded, but someone has something left to do.
pub fn step_warnings(output: Option<&Value>) -> impl Iterator<Item = &str> {
    output
        .and_then(|o| o.get("warnings"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

/// The warnings of a succeeded run's steps.
fn warnings_of(journal: &Journal, r: &RunReport) -> Vec<String> {
    if r.state != RunState::Succeeded {
        return Vec::new();
    }
    runs::steps(journal.conn(), &r.run_id)
        .unwrap_or_default()
        .iter()
        .flat_map(|s| step_warnings(s.output.as_ref()).map(str::to_owned).collect::<Vec<_>>())
        .collect()
}
