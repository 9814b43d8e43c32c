//! The transactional state machine: the step contract, the runner (forward, resume,
//! rollback), runner locks, crash points and signal handling. Knows nothing about sandboxes.

pub mod step;

pub use step::{Plan, Probe, Step, StepCtx, StepError};
