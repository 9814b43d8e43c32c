//! Crash points: named places in the runner where a test can make the process die as if it
//! had been killed with `kill -9` (no destructors, no rollback, no flush of anything not
//! already durable).
//!
//! `NEMOCLAW_CRASHPOINT=name[:hit]` kills the process the `hit`-th time (default 1) it reaches
//! the point `name`. The hook is always compiled in: the variable is read once per process and
//! a point that is not armed costs one comparison. It is a test hook, documented in
//! docs/design.md, not an operator knob. Every point is a [`CrashPoint`] variant, listed in
//! [`CrashPoint::ALL`] by construction; the crash-matrix tests place each one with an exhaustive
//! `match`, so a new point that no matrix covers does not compile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Environment variable that arms one crash point.
pub const ENV: &str = "NEMOCLAW_CRASHPOINT";

// One list makes the enum, its spellings and `ALL`, so no point can be left out of `ALL`.
macro_rules! crash_points {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// A named place where an armed process kills itself (see the module docs).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum CrashPoint {
            $($(#[$doc])* $variant,)*
        }

        impl CrashPoint {
            /// Every crash point, in the order a run then a rollback meets them.
            pub const ALL: &'static [CrashPoint] = &[$(CrashPoint::$variant,)*];

            /// The spelling `NEMOCLAW_CRASHPOINT` uses.
            pub const fn name(self) -> &'static str {
                match self {
                    $(CrashPoint::$variant => $name,)*
                }
            }
        }
    };
}

crash_points! {
    /// After the runner lock is taken and its holder row written, before anything else.
    AfterLock = "after_lock",
    /// After the commit that creates the run (every step pending), before the first intent.
    AfterRunCreated = "after_run_created",
    /// Before the commit that records a step's intent (with the previous step's outcome).
    BeforeIntent = "before_intent",
    /// After a step's intent is durable, before its effect starts.
    AfterIntent = "after_intent",
    /// Inside a step's effect (or a compensation's), between two of its parts — e.g. after the
    /// rebuild's delete and before its registry removal. Steps call it; the runner does not.
    MidEffect = "mid_effect",
    /// After a step's effect returned, before its outcome is committed.
    AfterEffect = "after_effect",
    /// After the commit that holds a step's outcome.
    AfterOutcome = "after_outcome",
    /// Before the commit that records the last outcome and the run's success.
    BeforeFinish = "before_finish",
    /// Before the commit that records a compensation intent (with the previous one's outcome).
    BeforeCompIntent = "before_comp_intent",
    /// After a compensation intent is durable, before the compensation runs.
    AfterCompIntent = "after_comp_intent",
    /// After a compensation returned, before its outcome is committed.
    AfterCompEffect = "after_comp_effect",
    /// After the commit that holds a compensation's outcome.
    AfterCompOutcome = "after_comp_outcome",
    /// Before the commit that records the last compensation and the run `rolled_back`.
    BeforeRollbackFinish = "before_rollback_finish",
}

impl CrashPoint {
    /// The point spelled `name`, if there is one.
    pub fn parse(name: &str) -> Option<CrashPoint> {
        CrashPoint::ALL.iter().copied().find(|p| p.name() == name)
    }
}

impl std::fmt::Display for CrashPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

struct Armed {
    point: CrashPoint,
    hit: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var(ENV).ok()?;
            let (name, hit) = match v.split_once(':') {
                Some((n, h)) => (n, h.parse().ok()?),
                None => (v.as_str(), 1),
            };
            // A name that is no crash point arms nothing, as before the points were an enum.
            Some(Armed { point: CrashPoint::parse(name)?, hit, seen: AtomicU64::new(0) })
        })
        .as_ref()
}

/// Mark that the process reached crash point `p`; dies here if that point is armed and this
/// is its `hit`-th arrival.
pub fn point(p: CrashPoint) {
    let Some(a) = armed() else { return };
    if a.point != p {
        return;
    }
    if a.seen.fetch_add(1, Ordering::SeqCst) + 1 == a.hit {
        // SIGKILL to ourselves: exactly what `kill -9` does, nothing runs after this.
        // SAFETY: plain libc calls with no memory arguments.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
            libc::_exit(137);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::CrashPoint;

    #[test]
    fn every_point_has_one_distinct_spelling_that_parses_back() {
        let mut names: Vec<_> = CrashPoint::ALL.iter().map(|p| p.name()).collect();
        for p in CrashPoint::ALL {
            assert_eq!(CrashPoint::parse(p.name()), Some(*p));
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CrashPoint::ALL.len());
        assert_eq!(CrashPoint::parse("after_everything"), None);
    }
}
