//! `nemoclaw journal list|show|export|verify|prune`.

use super::args::JournalCmd;
use super::{not_yet, CmdResult, Ctx};

/// `nemoclaw journal ...`.
pub fn dispatch(_ctx: &Ctx, _j: JournalCmd) -> CmdResult {
    Err(not_yet("journal"))
}
