//! SIGINT/SIGTERM handling for runners. The first signal only sets a flag: the runner lets
//! the effect in flight finish, commits its outcome, marks the run interrupted and returns.
//! A second signal exits at once with status 130 (an impatient operator gets the same
//! guarantees as `kill -9`: the journal is still consistent).
//!
//! Signals are received on a thread of their own (not in the handler), so the program can say
//! at once what is happening: whoever drives the run registers a [`Notice`] with
//! [`on_signal`], which is told of the first signal (the run stops at the next step boundary)
//! and of the second (the process exits right after it returns).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// What a signal did, for the [`Notice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// First signal: the run stops once the step in flight is finished and journaled.
    AfterThisStep,
    /// Second signal: the process exits with status 130 as soon as the notice returns.
    Now,
}

/// Told of each stop signal, on the signal thread. Must be quick and must not panic.
pub type Notice = Box<dyn Fn(Stop) + Send + Sync>;

fn flag() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

fn notice() -> &'static OnceLock<Notice> {
    static NOTICE: OnceLock<Notice> = OnceLock::new();
    &NOTICE
}

/// Register what to say when a stop signal arrives (first registration wins).
pub fn on_signal(n: Notice) {
    let _ = notice().set(n);
}

fn tell(stop: Stop) {
    if let Some(n) = notice().get() {
        n(stop);
    }
}

/// Install the handlers (idempotent). Called by every runner entry point.
pub fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
            return flag_only();
        };
        let count = AtomicUsize::new(0);
        let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
            for _ in signals.forever() {
                if count.fetch_add(1, Ordering::SeqCst) == 0 {
                    flag().store(true, Ordering::SeqCst);
                    tell(Stop::AfterThisStep);
                } else {
                    tell(Stop::Now);
                    std::process::exit(130);
                }
            }
        });
        if spawned.is_err() {
            flag_only();
        }
    });
}

/// Without a signal thread: the flag alone, and an exit in the handler on the second signal
/// (silent, but just as safe). Order matters: the conditional exit sees the flag before the
/// first signal sets it, so only the second one exits.
fn flag_only() {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, flag().clone());
        let _ = signal_hook::flag::register(sig, flag().clone());
    }
}

/// Whether a stop was requested (by a signal or [`request_stop`]).
pub fn stop_requested() -> bool {
    flag().load(Ordering::SeqCst)
}

/// Ask runners in this process to stop at the next step boundary (as SIGTERM would).
pub fn request_stop() {
    flag().store(true, Ordering::SeqCst);
}
