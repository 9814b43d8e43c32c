//! `nemoclaw <name> rebuild` and `nemoclaw recover`.

use super::args::{RebuildArgs, RecoverArgs};
use super::{not_yet, CmdResult, Ctx};

/// `nemoclaw <name> rebuild`.
pub fn rebuild(_ctx: &Ctx, _name: &str, _a: RebuildArgs) -> CmdResult {
    Err(not_yet("rebuild"))
}

/// `nemoclaw recover`.
pub fn recover(_ctx: &Ctx, _a: RecoverArgs) -> CmdResult {
    Err(not_yet("recover"))
}
