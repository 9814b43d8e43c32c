//! `onboard`, `list`, and `nemoclaw <name> status|shields|destroy`.

use super::args::{OnboardArgs, SandboxAction, SandboxCli};
use super::{not_yet, CmdResult, Ctx};

/// `nemoclaw onboard`.
pub fn onboard(_ctx: &Ctx, _a: OnboardArgs) -> CmdResult {
    Err(not_yet("onboard"))
}

/// `nemoclaw list`.
pub fn list(_ctx: &Ctx) -> CmdResult {
    Err(not_yet("list"))
}

/// `nemoclaw <name> <action>`.
pub fn dispatch(ctx: &Ctx, sc: SandboxCli) -> CmdResult {
    let _name = super::parse_name(&sc.name)?;
    match sc.action {
        SandboxAction::Rebuild(a) => super::rebuild_cmd::rebuild(ctx, &sc.name, a),
        SandboxAction::Status => Err(not_yet("status")),
        SandboxAction::Shields { .. } => Err(not_yet("shields")),
        SandboxAction::Destroy { .. } => Err(not_yet("destroy")),
    }
}
