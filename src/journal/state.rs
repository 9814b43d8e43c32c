//! The state machines of runs and steps: [`RunState`] and [`StepState`], each with its one
//! transition function (the only place the allowed transitions live; the SQL `CHECK`
//! constraints of `runs.state` and `steps.state` mirror the states), and their tables of tests.

use std::fmt;

/// A forbidden state change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} transition {from} -> {to}")]
pub struct TransitionError {
    /// `run` or `step`.
    pub what: &'static str,
    /// State before.
    pub from: String,
    /// State asked for.
    pub to: String,
}

/// State of a run (mirrors the `runs.state` CHECK constraint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunState {
    /// A runner is (or was, if it died) moving the run forward.
    Running,
    /// Every step is done.
    Succeeded,
    /// A step failed; resume retries it, rollback undoes the run.
    Failed,
    /// Stopped by a signal or found abandoned by a dead runner.
    Interrupted,
    /// A probe could not tell whether an effect happened; a person must look.
    NeedsOperator,
    /// Compensations are being applied (only rollback may continue it).
    RollingBack,
    /// Every started step was compensated.
    RolledBack,
}

impl RunState {
    /// Every run state, in schema order.
    pub const ALL: [RunState; 7] = [
        RunState::Running,
        RunState::Succeeded,
        RunState::Failed,
        RunState::Interrupted,
        RunState::NeedsOperator,
        RunState::RollingBack,
        RunState::RolledBack,
    ];

    /// The text stored in `runs.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Interrupted => "interrupted",
            RunState::NeedsOperator => "needs_operator",
            RunState::RollingBack => "rolling_back",
            RunState::RolledBack => "rolled_back",
        }
    }

    /// Parse the stored text.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the run is over (nothing can resume or roll it back).
    pub fn is_final(self) -> bool {
        matches!(self, RunState::Succeeded | RunState::RolledBack)
    }

    /// The one transition function for runs.
    ///
    /// running → succeeded | failed | interrupted | needs_operator | rolling_back;
    /// failed | interrupted | needs_operator → running (resume) | rolling_back (rollback);
    /// rolling_back → rolled_back. Nothing leaves succeeded or rolled_back.
    pub fn transition(from: RunState, to: RunState) -> Result<(), TransitionError> {
        use RunState::*;
        let ok = matches!(
            (from, to),
            (Running, Succeeded | Failed | Interrupted | NeedsOperator | RollingBack)
                | (Failed | Interrupted | NeedsOperator, Running | RollingBack)
                | (RollingBack, RolledBack)
        );
        if ok {
            Ok(())
        } else {
            Err(TransitionError { what: "run", from: from.to_string(), to: to.to_string() })
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// State of a step (mirrors the `steps.state` CHECK constraint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepState {
    /// Not started.
    Pending,
    /// Intent recorded; the effect may or may not have happened.
    Started,
    /// Effect in place, output recorded.
    Done,
    /// `apply` reported an error.
    Failed,
    /// Compensation intent recorded.
    Compensating,
    /// Effect undone.
    Compensated,
}

impl StepState {
    /// Every step state, in schema order.
    pub const ALL: [StepState; 6] = [
        StepState::Pending,
        StepState::Started,
        StepState::Done,
        StepState::Failed,
        StepState::Compensating,
        StepState::Compensated,
    ];

    /// The text stored in `steps.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Started => "started",
            StepState::Done => "done",
            StepState::Failed => "failed",
            StepState::Compensating => "compensating",
            StepState::Compensated => "compensated",
        }
    }

    /// Parse the stored text.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The one transition function for steps.
    ///
    /// pending → started; started → started (a new attempt after a NotDone probe) | done |
    /// failed | compensating; failed → started (retry) | done (probe found it done) |
    /// compensating; done → compensating; compensating → compensated.
    /// Re-entering `compensating` after a crash is not a transition: the row already says it.
    pub fn transition(from: StepState, to: StepState) -> Result<(), TransitionError> {
        use StepState::*;
        let ok = matches!(
            (from, to),
            (Pending, Started)
                | (Started, Started | Done | Failed | Compensating)
                | (Failed, Started | Done | Compensating)
                | (Done, Compensating)
                | (Compensating, Compensated)
        );
        if ok {
            Ok(())
        } else {
            Err(TransitionError { what: "step", from: from.to_string(), to: to.to_string() })
        }
    }
}

impl fmt::Display for StepState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;
    use RunState as R;
    use StepState as S;

    #[rstest]
    #[case::finish(R::Running, R::Succeeded, true)]
    #[case::fail(R::Running, R::Failed, true)]
    #[case::interrupt(R::Running, R::Interrupted, true)]
    #[case::operator(R::Running, R::NeedsOperator, true)]
    #[case::auto_rollback(R::Running, R::RollingBack, true)]
    #[case::resume_failed(R::Failed, R::Running, true)]
    #[case::resume_interrupted(R::Interrupted, R::Running, true)]
    #[case::resume_operator(R::NeedsOperator, R::Running, true)]
    #[case::rollback_failed(R::Failed, R::RollingBack, true)]
    #[case::rollback_interrupted(R::Interrupted, R::RollingBack, true)]
    #[case::rollback_operator(R::NeedsOperator, R::RollingBack, true)]
    #[case::rolled_back(R::RollingBack, R::RolledBack, true)]
    #[case::no_resume_of_rollback(R::RollingBack, R::Running, false)]
    #[case::no_interrupt_of_rollback(R::RollingBack, R::Interrupted, false)]
    #[case::succeeded_is_final(R::Succeeded, R::RollingBack, false)]
    #[case::rolled_back_is_final(R::RolledBack, R::Running, false)]
    #[case::no_self_loop(R::Running, R::Running, false)]
    #[case::no_skip_to_rolled_back(R::Failed, R::RolledBack, false)]
    #[case::failed_to_succeeded(R::Failed, R::Succeeded, false)]
    fn run_transitions(#[case] from: RunState, #[case] to: RunState, #[case] ok: bool) {
        assert_eq!(RunState::transition(from, to).is_ok(), ok, "{from} -> {to}");
    }

    #[rstest]
    #[case::intent(S::Pending, S::Started, true)]
    #[case::new_attempt(S::Started, S::Started, true)]
    #[case::outcome_done(S::Started, S::Done, true)]
    #[case::outcome_failed(S::Started, S::Failed, true)]
    #[case::retry_failed(S::Failed, S::Started, true)]
    #[case::probe_found_done(S::Failed, S::Done, true)]
    #[case::undo_done(S::Done, S::Compensating, true)]
    #[case::undo_started(S::Started, S::Compensating, true)]
    #[case::undo_failed(S::Failed, S::Compensating, true)]
    #[case::undone(S::Compensating, S::Compensated, true)]
    #[case::no_skip_intent(S::Pending, S::Done, false)]
    #[case::no_undo_pending(S::Pending, S::Compensating, false)]
    #[case::no_redo_done(S::Done, S::Started, false)]
    #[case::compensated_is_final(S::Compensated, S::Started, false)]
    #[case::no_back_to_pending(S::Started, S::Pending, false)]
    #[case::no_forward_from_compensating(S::Compensating, S::Started, false)]
    fn step_transitions(#[case] from: StepState, #[case] to: StepState, #[case] ok: bool) {
        assert_eq!(StepState::transition(from, to).is_ok(), ok, "{from} -> {to}");
    }

    #[test]
    fn states_round_trip_and_match_the_schema() {
        let sql = include_str!("../../journal-schema/0001_init.sql");
        for s in RunState::ALL {
            assert_eq!(RunState::parse(s.as_str()), Some(s));
            assert!(sql.contains(&format!("'{}'", s.as_str())), "{s} missing from CHECK");
        }
        for s in StepState::ALL {
            assert_eq!(StepState::parse(s.as_str()), Some(s));
            assert!(sql.contains(&format!("'{}'", s.as_str())), "{s} missing from CHECK");
        }
    }
}
