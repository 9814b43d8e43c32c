//! Hidden commands for the test suite and benchmarks (synthetic plans in a real process).

use super::args::InternalCmd;
use super::{not_yet, CmdResult, Ctx};

/// `nemoclaw internal ...`.
pub fn dispatch(_ctx: &Ctx, _i: InternalCmd) -> CmdResult {
    Err(not_yet("internal"))
}
