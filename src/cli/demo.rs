//! `nemoclaw demo`: the quickstart story on the embedded local gateway.

use super::args::DemoArgs;
use super::{not_yet, CmdResult, Ctx};

/// `nemoclaw demo`.
pub fn run(_ctx: &Ctx, _a: DemoArgs) -> CmdResult {
    Err(not_yet("demo"))
}
