//! What the runner tells its caller: progress callbacks while it works ([`Observer`]) and
//! where a call left its run ([`RunReport`], with the exit code it maps to).

use std::time::Duration;

use super::step::StepError;
use crate::exit::Exit;
use crate::journal::runs::RunState;

/// How a step ended, as reported to an [`Observer`].
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    /// `apply` succeeded.
    Done,
    /// A probe of a step found started showed its effect already in place.
    FoundDone,
    /// `apply` (or the probe) failed with this message.
    Failed(String),
    /// The probe could not tell; a person must look.
    Unknown(String),
}

/// Progress callbacks (all default to no-ops). Called from the runner's thread.
pub trait Observer {
    /// A step is about to run (`resumed`: it was found started and is being probed/retried).
    fn step_started(&self, _seq: usize, _name: &str, _resumed: bool) {}
    /// A step ended.
    fn step_finished(&self, _seq: usize, _name: &str, _elapsed: Duration, _outcome: &StepOutcome) {}
    /// A compensation is about to run.
    fn compensating(&self, _seq: usize, _name: &str) {}
    /// A compensation finished.
    fn compensated(&self, _seq: usize, _name: &str, _elapsed: Duration) {}
}

/// An observer that says nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Quiet;

impl Observer for Quiet {}

/// Where a runner call left its run.
#[derive(Debug)]
pub struct RunReport {
    /// The run id.
    pub run_id: String,
    /// The run's state in the journal when the call returned.
    pub state: RunState,
    /// The step that failed or needs an operator.
    pub failed_step: Option<String>,
    /// The failure, when a step (or compensation) failed.
    pub error: Option<StepError>,
    /// The probe's text when the run needs an operator.
    pub needs_operator: Option<String>,
    /// A signal stopped the call. The run is `interrupted`, or still `rolling_back` when the
    /// signal came during a rollback (only rollback may continue it). The CLI exits 130.
    pub interrupted: bool,
}

impl RunReport {
    pub(super) fn new(run_id: &str, state: RunState) -> Self {
        Self {
            run_id: run_id.to_owned(),
            state,
            failed_step: None,
            error: None,
            needs_operator: None,
            interrupted: false,
        }
    }

    /// The exit code this report maps to: 0 succeeded/rolled back, 130 interrupted,
    /// 74 a step's local I/O failure, 65 journaled data that does not decode, 1 anything else
    /// unfinished.
    pub fn exit(&self) -> Exit {
        if self.interrupted {
            Exit::Interrupted
        } else if self.state.is_final() {
            Exit::Ok
        } else if self.error.as_ref().is_some_and(|e| e.io) {
            Exit::Io
        } else if self.error.as_ref().is_some_and(|e| e.corrupt) {
            Exit::Corrupt
        } else {
            Exit::Failed
        }
    }
}
