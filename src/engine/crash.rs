//! Crash points: named places in the runner where a test can make the process die as if it
//! had been killed with `kill -9` (no destructors, no rollback, no flush of anything not
//! already durable).
//!
//! `NEMOCLAW_CRASHPOINT=name[:hit]` kills the process the `hit`-th time (default 1) it reaches
//! the point `name`. The hook is always compiled in: the variable is read once per process and
//! a point that is not armed costs one string comparison. It is a test hook, documented in
//! docs/design.md, not an operator knob. Every name is in [`CRASH_POINTS`]; the crash-matrix
//! test fails if it does not cover all of them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Environment variable that arms one crash point.
pub const ENV: &str = "NEMOCLAW_CRASHPOINT";

/// After the runner lock is taken and its holder row written, before anything else.
pub const AFTER_LOCK: &str = "after_lock";
/// After the commit that creates the run (every step pending), before the first intent.
pub const AFTER_RUN_CREATED: &str = "after_run_created";
/// Before the commit that records a step's intent (with the previous step's outcome).
pub const BEFORE_INTENT: &str = "before_intent";
/// After a step's intent is durable, before its effect starts.
pub const AFTER_INTENT: &str = "after_intent";
/// Inside a step's effect (or a compensation's), between two of its parts — e.g. after the
/// rebuild's delete and before its registry removal. Steps call it; the runner does not.
pub const MID_EFFECT: &str = "mid_effect";
/// After a step's effect returned, before its outcome is committed.
pub const AFTER_EFFECT: &str = "after_effect";
/// After the commit that holds a step's outcome.
pub const AFTER_OUTCOME: &str = "after_outcome";
/// Before the commit that records the last outcome and the run's success.
pub const BEFORE_FINISH: &str = "before_finish";
/// Before the commit that records a compensation intent (with the previous one's outcome).
pub const BEFORE_COMP_INTENT: &str = "before_comp_intent";
/// After a compensation intent is durable, before the compensation runs.
pub const AFTER_COMP_INTENT: &str = "after_comp_intent";
/// After a compensation returned, before its outcome is committed.
pub const AFTER_COMP_EFFECT: &str = "after_comp_effect";
/// After the commit that holds a compensation's outcome.
pub const AFTER_COMP_OUTCOME: &str = "after_comp_outcome";
/// Before the commit that records the last compensation and the run `rolled_back`.
pub const BEFORE_ROLLBACK_FINISH: &str = "before_rollback_finish";

/// Every crash point, in the order a run then a rollback meets them.
pub const CRASH_POINTS: &[&str] = &[
    AFTER_LOCK,
    AFTER_RUN_CREATED,
    BEFORE_INTENT,
    AFTER_INTENT,
    MID_EFFECT,
    AFTER_EFFECT,
    AFTER_OUTCOME,
    BEFORE_FINISH,
    BEFORE_COMP_INTENT,
    AFTER_COMP_INTENT,
    AFTER_COMP_EFFECT,
    AFTER_COMP_OUTCOME,
    BEFORE_ROLLBACK_FINISH,
];

struct Armed {
    name: String,
    hit: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var(ENV).ok()?;
            let (name, hit) = match v.split_once(':') {
                Some((n, h)) => (n.to_owned(), h.parse().ok()?),
                None => (v, 1),
            };
            Some(Armed { name, hit, seen: AtomicU64::new(0) })
        })
        .as_ref()
}

/// Mark that the process reached crash point `name`; dies here if that point is armed and this
/// is its `hit`-th arrival.
pub fn point(name: &str) {
    debug_assert!(CRASH_POINTS.contains(&name), "unknown crash point {name}");
    let Some(a) = armed() else { return };
    if a.name != name {
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
