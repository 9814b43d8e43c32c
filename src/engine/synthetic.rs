//! A synthetic plan for tests and benchmarks: N tiny steps whose effects are lines appended to
//! a ledger file, so "exactly once" can be checked from the outside.
//!
//! Step `k` applies by appending `+k` (only when `k` is not already net-applied), compensates by
//! appending `-k` (only when it is), and probes by reading the ledger. `apply` called while `k`
//! is already applied appends `=k` instead: a correct runner never does that, so a test that
//! finds a `=` line has caught the runner repeating a finished effect.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::runner::{PlanError, PlanResolver};
use super::step::{decode, Plan, Probe, Step, StepCtx, StepError};
use crate::journal::runs::RunRecord;

/// Plan name journaled for synthetic runs.
pub const PLAN_NAME: &str = "synthetic";

/// Step names (a step name is `&'static str`); also the maximum number of steps.
pub const STEP_NAMES: &[&str] = &[
    "s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9", "s10", "s11", "s12", "s13", "s14",
    "s15", "s16", "s17", "s18", "s19", "s20", "s21", "s22", "s23", "s24", "s25", "s26", "s27",
    "s28", "s29", "s30", "s31", "s32", "s33", "s34", "s35", "s36", "s37", "s38", "s39", "s40",
    "s41", "s42", "s43", "s44", "s45", "s46", "s47", "s48", "s49", "s50", "s51", "s52", "s53",
    "s54", "s55", "s56", "s57", "s58", "s59", "s60", "s61", "s62", "s63",
];

/// Knobs that belong to one process, not to the run (not journaled, not in the fingerprint).
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Make `apply` of this step fail.
    pub fail_at: Option<usize>,
    /// Sleep this long inside every `apply` and `compensate` (a window for kill tests).
    pub step_ms: u64,
}

/// Net state of each step in a ledger: +1 applied, 0 not, anything else is a broken ledger.
pub fn ledger_net(path: &Path, steps: usize) -> Result<Vec<i64>, StepError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(StepError::new(format!("cannot read ledger {}: {e}", path.display())).io())
        }
    };
    let mut net = vec![0i64; steps];
    for line in text.lines() {
        let (sign, k) = line.split_at(1.min(line.len()));
        let Ok(k) = k.parse::<usize>() else { continue };
        if k < steps {
            match sign {
                "+" => net[k] += 1,
                "-" => net[k] -= 1,
                _ => {}
            }
        }
    }
    Ok(net)
}

fn append_line(path: &Path, line: &str) -> Result<(), StepError> {
    let io = |e: std::io::Error| {
        StepError::new(format!("cannot append to ledger {}: {e}", path.display())).io()
    };
    let mut f = OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(io)?;
    // One write(2) of the whole line: a kill cannot leave half a line behind.
    f.write_all(format!("{line}\n").as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

struct LedgerStep {
    k: usize,
    steps: usize,
    ledger: PathBuf,
    opts: Options,
}

impl LedgerStep {
    fn net(&self) -> Result<i64, StepError> {
        Ok(ledger_net(&self.ledger, self.steps)?[self.k])
    }

    fn pause(&self) {
        if self.opts.step_ms > 0 {
            std::thread::sleep(Duration::from_millis(self.opts.step_ms));
        }
    }
}

impl Step for LedgerStep {
    fn name(&self) -> &'static str {
        STEP_NAMES[self.k]
    }

    fn probe(&self, _ctx: &StepCtx<'_>) -> Result<Probe, StepError> {
        Ok(match self.net()? {
            1 => Probe::Done(json!({ "k": self.k })),
            0 => Probe::NotDone,
            n => Probe::Unknown(format!(
                "ledger {} shows step {} applied {n} times net",
                self.ledger.display(),
                self.k
            )),
        })
    }

    fn apply(&self, _ctx: &StepCtx<'_>) -> Result<Value, StepError> {
        self.pause();
        if self.opts.fail_at == Some(self.k) {
            return Err(StepError::new(format!("step {} fails on purpose (--fail-at)", self.k)));
        }
        if self.net()? == 0 {
            append_line(&self.ledger, &format!("+{}", self.k))?;
        } else {
            append_line(&self.ledger, &format!("={}", self.k))?;
        }
        // The ledger line is the effect; the step's output is its second part.
        crate::engine::crash::point(crate::engine::CrashPoint::MidEffect);
        Ok(json!({ "k": self.k }))
    }

    fn compensate(&self, _ctx: &StepCtx<'_>, _output: Option<&Value>) -> Result<(), StepError> {
        self.pause();
        if self.net()? == 1 {
            append_line(&self.ledger, &format!("-{}", self.k))?;
        }
        crate::engine::crash::point(crate::engine::CrashPoint::MidEffect);
        Ok(())
    }
}

/// The run parameters of a synthetic plan (what [`Resolver`] needs to rebuild it).
pub fn params(steps: usize, ledger: &Path) -> Value {
    json!(Params { steps, ledger: ledger.to_string_lossy().into_owned() })
}

/// A synthetic run's journaled params (`{"steps": 3, "ledger": "<path>"}`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Params {
    steps: usize,
    ledger: String,
}

/// A synthetic plan of `steps` (at most [`STEP_NAMES`]`.len()`) ledger steps.
pub fn plan(steps: usize, ledger: &Path, opts: Options) -> Plan {
    let steps = steps.min(STEP_NAMES.len());
    Plan {
        name: PLAN_NAME.to_owned(),
        steps: (0..steps)
            .map(|k| {
                Box::new(LedgerStep { k, steps, ledger: ledger.to_path_buf(), opts })
                    as Box<dyn super::step::Step>
            })
            .collect(),
    }
}

/// Rebuilds synthetic plans from their journaled params.
#[derive(Debug, Clone, Copy, Default)]
pub struct Resolver {
    /// This process's knobs.
    pub opts: Options,
}

impl PlanResolver for Resolver {
    fn plan_for(&self, run: &RunRecord) -> Result<Plan, PlanError> {
        if run.plan != PLAN_NAME {
            return Err(PlanError::Unknown);
        }
        let p: Params = decode("params", &run.params)?;
        Ok(plan(p.steps, Path::new(&p.ledger), self.opts))
    }
}

/// What `nemoclaw internal synthetic` asks for.
#[derive(Debug, Clone)]
pub enum Action {
    /// Start a new run of `steps` ledger steps under `key`.
    Run {
        /// Number of steps (1..=[`STEP_NAMES`]`.len()`).
        steps: usize,
        /// The ledger file.
        ledger: PathBuf,
        /// The journaled command line.
        argv: Vec<String>,
    },
    /// Resume `run`, or the unfinished run under the key.
    Resume(Option<String>),
    /// Roll back `run`, or the unfinished run under the key.
    Rollback(Option<String>),
}

/// Why a synthetic command did not run.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The engine refused or failed.
    #[error(transparent)]
    Engine(#[from] super::EngineError),
    /// `--steps` out of range.
    #[error("--steps must be 1..={}", STEP_NAMES.len())]
    Steps,
    /// Resume or rollback with no run id, and none unfinished under the key.
    #[error("no unfinished run on `{0}`")]
    NothingUnfinished(String),
}

/// Run, resume or roll back a synthetic plan in the journal and lock directory of `home`,
/// with one runner per `key`.
pub fn drive(
    home: &Path,
    key: &str,
    action: Action,
    opts: Options,
) -> Result<super::RunReport, DriveError> {
    use crate::journal::runs::{unfinished_runs, UnfinishedFilter};
    let mut journal = crate::journal::Journal::open_home(home).map_err(super::EngineError::from)?;
    let locks = super::LockDir::new(home);
    let resolver = Resolver { opts };
    let unfinished = |journal: &crate::journal::Journal, run: Option<String>| match run {
        Some(r) => Ok(r),
        None => {
            let filter = UnfinishedFilter { lock_key: Some(key), sandbox: None };
            unfinished_runs(journal.conn(), &filter)
                .map_err(super::EngineError::from)?
                .into_iter()
                .next()
                .map(|r| r.id)
                .ok_or_else(|| DriveError::NothingUnfinished(key.to_owned()))
        }
    };
    Ok(match action {
        Action::Run { steps, ledger, argv } => {
            if steps == 0 || steps > STEP_NAMES.len() {
                return Err(DriveError::Steps);
            }
            let spec = super::RunSpec {
                lock_key: key.to_owned(),
                params: params(steps, &ledger),
                argv,
                ..super::RunSpec::default()
            };
            super::start(&mut journal, &locks, &plan(steps, &ledger, opts), spec, &super::Quiet)?
        }
        Action::Resume(run) => {
            let id = unfinished(&journal, run)?;
            super::resume(&mut journal, &locks, &id, &resolver, &super::Quiet)?
        }
        Action::Rollback(run) => {
            let id = unfinished(&journal, run)?;
            super::rollback(&mut journal, &locks, &id, &resolver, &super::Quiet)?
        }
    })
}
