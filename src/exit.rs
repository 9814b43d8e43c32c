//! The exit-code contract (spec §6). Every library error maps to exactly one of these.

/// Process exit codes, stable for scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Success.
    Ok = 0,
    /// Failed after starting; the journal is consistent and the next command was printed.
    Failed = 1,
    /// Usage error (including an invalid sandbox name), detected before any I/O.
    Usage = 2,
    /// Refused in preflight; nothing changed.
    Refused = 3,
    /// Corrupt input: registry, session, shields or journal file.
    Corrupt = 65,
    /// I/O error: disk full, read-only home, missing directory.
    Io = 74,
    /// Busy: another runner holds the sandbox.
    Busy = 75,
    /// Interrupted by SIGINT/SIGTERM; the run is journaled as interrupted.
    Interrupted = 130,
}

impl Exit {
    /// The numeric code handed to the OS.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Implemented by library errors so the CLI edge can pick the exit code without string matching.
/// (What to do next is the CLI's business: its hints live in one table, `cli::error`.)
pub trait ExitCoded {
    /// The exit code this error maps to.
    fn exit(&self) -> Exit;
}
