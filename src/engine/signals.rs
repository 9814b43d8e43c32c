//! SIGINT/SIGTERM handling for runners. The first signal only sets a flag: the runner lets
//! the effect in flight finish, commits its outcome, marks the run interrupted and returns.
//! A second signal of the same kind exits at once with status 130 (an impatient operator gets
//! the same guarantees as `kill -9`: the journal is still consistent).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

fn flag() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Install the handlers (idempotent). Called by every runner entry point.
pub fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // Order matters: the conditional exit sees the flag before the first signal sets
            // it, so only the second signal exits.
            let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, flag().clone());
            let _ = signal_hook::flag::register(sig, flag().clone());
        }
    });
}

/// Whether a stop was requested (by a signal or [`request_stop`]).
pub fn stop_requested() -> bool {
    flag().load(Ordering::SeqCst)
}

/// Ask runners in this process to stop at the next step boundary (as SIGTERM would).
pub fn request_stop() {
    flag().store(true, Ordering::SeqCst);
}
