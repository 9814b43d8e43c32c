//! The step contract. A plan is an ordered list of steps; each step can tell whether its
//! effect already happened (`probe`), make it happen idempotently (`apply`) and undo it
//! idempotently (`compensate`). The runner journals intent before `apply` and the outcome after.
//!
//! Steps read journaled data (their run's params, earlier steps' outputs) as serde types through
//! [`decode`] and [`StepCtx::output_as`]: a value that does not decode is corrupt input
//! ([`DataError`], exit 65), never a default.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// What a probe found out about a step's effect.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// The effect is in place. Carries the output `apply` would have returned, so later steps
    /// see the same data whether the step finished normally or was found done after a crash.
    Done(Value),
    /// The effect has not happened (or was fully undone); `apply` may run.
    NotDone,
    /// Cannot tell. The runner stops the run as `needs_operator` and prints this text.
    Unknown(String),
}

/// An error from a step's `apply`, `probe` or `compensate`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    /// One-sentence description for the operator.
    pub message: String,
    /// Optional hint lines, printed as `hint: ...`.
    pub hints: Vec<String>,
    /// Whether the failure was an I/O error on this host (exit 74) rather than a step failure.
    pub io: bool,
    /// Whether the step stopped on journaled data that does not decode (exit 65).
    pub corrupt: bool,
}

impl StepError {
    /// A step failure with a message.
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), hints: Vec::new(), io: false, corrupt: false }
    }

    /// Add a hint line.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hints.push(hint.into());
        self
    }

    /// Mark as a local I/O failure (disk full, read-only home).
    pub fn io(mut self) -> Self {
        self.io = true;
        self
    }
}

impl From<DataError> for StepError {
    fn from(e: DataError) -> Self {
        let mut s = StepError::new(e.to_string());
        s.corrupt = true;
        s
    }
}

/// A journaled value (a run's params, a step's output) that does not decode into the type its
/// plan reads it as. Corrupt input: exit 65, and nothing is guessed in its place.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the journaled {what} cannot be decoded: {detail}")]
pub struct DataError {
    /// What was read (`params`, `output of step \`backup\``).
    pub what: String,
    /// What serde said.
    pub detail: String,
}

/// Decode the journaled value `v` (described by `what`, for the error) as a `T`.
pub fn decode<T: DeserializeOwned>(what: &str, v: &Value) -> Result<T, DataError> {
    T::deserialize(v).map_err(|e| DataError { what: what.to_owned(), detail: e.to_string() })
}

/// Read-only view a step gets of its run.
#[derive(Debug)]
pub struct StepCtx<'a> {
    /// The run id (UUID v7 text).
    pub run_id: &'a str,
    /// This step's position in the plan.
    pub seq: usize,
    /// The run's parameters, fixed when the run was created (e.g. preflight evidence).
    pub params: &'a Value,
    /// Outputs of the steps of this run that are `done`, by step name.
    pub outputs: &'a BTreeMap<String, Value>,
    /// Which attempt of `apply` this is (1 for the first).
    pub attempt: u32,
}

impl StepCtx<'_> {
    /// The output of an earlier finished step, if any.
    pub fn output(&self, step: &str) -> Option<&Value> {
        self.outputs.get(step)
    }

    /// The output of an earlier finished step, decoded as a `T`; `Ok(None)` when that step has
    /// not finished, [`DataError`] when its journaled output does not decode.
    pub fn output_as<T: DeserializeOwned>(&self, step: &str) -> Result<Option<T>, DataError> {
        self.outputs.get(step).map(|v| decode(&format!("output of step `{step}`"), v)).transpose()
    }

    /// The run's params, decoded as a `T`.
    pub fn params_as<T: DeserializeOwned>(&self) -> Result<T, DataError> {
        decode("params", self.params)
    }
}

/// One step of a plan.
pub trait Step: Send + Sync {
    /// Stable name, journaled (`snapshot`, `backup`, ...).
    fn name(&self) -> &'static str;

    /// Bumped whenever the step's meaning changes; part of the plan fingerprint.
    fn version(&self) -> u32 {
        1
    }

    /// Whether applying this step destroys something that only a compensation can bring back.
    fn destructive(&self) -> bool {
        false
    }

    /// Has this step's effect happened? Must not change anything.
    fn probe(&self, ctx: &StepCtx<'_>) -> Result<Probe, StepError>;

    /// Make the effect happen. Idempotent: applying twice is the same as applying once.
    /// Returns the output to journal (secrets are redacted by the journal).
    fn apply(&self, ctx: &StepCtx<'_>) -> Result<Value, StepError>;

    /// Whether `output`, journaled by this step, still decodes as what the step and the steps
    /// after it read. The runner asks before it resumes or rolls back a run, so a run whose
    /// journal holds data this binary cannot read is refused (exit 65) before anything moves.
    fn check_output(&self, _output: &Value) -> Result<(), DataError> {
        Ok(())
    }

    /// Undo the effect. Idempotent, and a no-op when the effect is not in place.
    /// `output` is the journaled output when the step finished, `None` when it only started.
    fn compensate(&self, ctx: &StepCtx<'_>, output: Option<&Value>) -> Result<(), StepError>;
}

/// A named, ordered list of steps.
pub struct Plan {
    /// Plan name, journaled (`rebuild`, `synthetic`).
    pub name: String,
    /// The steps, in order.
    pub steps: Vec<Box<dyn Step>>,
}

impl Plan {
    /// sha256 over the plan name and every step's name and version. A run records this;
    /// resume refuses a run whose fingerprint the current binary's plan does not match.
    pub fn fingerprint(&self) -> String {
        let mut s = format!("plan:{}", self.name);
        for st in &self.steps {
            s.push_str(&format!("\nstep:{}@{}", st.name(), st.version()));
        }
        crate::util::sha256_hex(s.as_bytes())
    }
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.steps.iter().map(|s| s.name()).collect();
        f.debug_struct("Plan").field("name", &self.name).field("steps", &names).finish()
    }
}
