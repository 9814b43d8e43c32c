//! The transactional state machine: the step contract, the runner (forward, resume,
//! rollback), runner locks, crash points and signal handling. Knows nothing about sandboxes.

pub mod crash;
mod error;
mod forward;
pub mod lock;
mod report;
mod rollback;
pub mod runner;
pub mod signals;
pub mod step;
pub mod synthetic;

pub use crash::CrashPoint;
pub use lock::LockDir;
pub use runner::{
    resume, rollback, start, EngineError, Observer, PlanError, PlanResolver, Quiet, RunReport,
    RunSpec, StepOutcome,
};
pub use step::{decode, DataError, Plan, Probe, Step, StepCtx, StepError};
