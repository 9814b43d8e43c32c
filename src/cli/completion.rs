//! Shell completion and the man page, both generated from the clap definitions in
//! [`super::args`], so they cannot drift from the parser.
//!
//! Completion is dynamic (clap_complete's engine): `nemoclaw completion bash` prints a small
//! registration script; at each `<TAB>` the shell runs `NEMOCLAW_COMPLETE=bash nemoclaw -- <words>`
//! and this process answers from the definitions *and the home*: the sandbox names registered
//! in `sandboxes.json` complete in the `nemoclaw <NAME> <action>` position, and run ids from
//! the journal (opened read-only) complete after `recover` and `journal show`.

use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::engine::{ArgValueCandidates, CompletionCandidate};
use clap_complete::env::{Bash, EnvCompleter, Fish, Zsh};

use super::args::{Cli, CompletionShell, SandboxCli};
use super::{CliError, CmdResult, Ctx};
use crate::exit::Exit;
use crate::journal::audit::{list_runs, RunFilter};
use crate::journal::state::RunState;
use crate::journal::store::FILE_NAME;
use crate::journal::Journal;

/// The environment variable the registration scripts set when they ask for candidates.
pub const VAR: &str = "NEMOCLAW_COMPLETE";

/// Answer a completion request when the shell made one (then exit); otherwise return.
pub fn answer_if_asked() {
    clap_complete::CompleteEnv::with_factory(command).var(VAR).bin("nemoclaw").complete();
}

/// `nemoclaw completion <shell>`: the registration script for that shell on stdout.
pub fn script(ctx: &Ctx, shell: CompletionShell) -> CmdResult {
    let completer: &dyn EnvCompleter = match shell {
        CompletionShell::Bash => &Bash,
        CompletionShell::Zsh => &Zsh,
        CompletionShell::Fish => &Fish,
    };
    let mut buf = Vec::new();
    completer
        .write_registration(VAR, "nemoclaw", "nemoclaw", "nemoclaw", &mut buf)
        .map_err(stdout_err)?;
    ctx.printer.raw(&buf).map_err(stdout_err)?;
    Ok(Exit::Ok)
}

/// `nemoclaw man`: the roff man page on stdout (`nemoclaw man > nemoclaw.1`).
pub fn man(ctx: &Ctx) -> CmdResult {
    let mut buf = Vec::new();
    clap_mangen::Man::new(documented_command(None)).render(&mut buf).map_err(stdout_err)?;
    ctx.printer.raw(&buf).map_err(stdout_err)?;
    Ok(Exit::Ok)
}

fn stdout_err(e: std::io::Error) -> CliError {
    CliError::new(Exit::Io, format!("cannot write to stdout: {e}"))
}

/// The whole command tree as completion sees it: the top-level commands, and one subcommand
/// per registered sandbox carrying the sandbox actions.
fn command() -> clap::Command {
    let home = home();
    let names = home.as_deref().map(registered_names).unwrap_or_default();
    let sandboxes = || {
        let names = names.clone();
        ArgValueCandidates::new(move || names.iter().map(CompletionCandidate::new).collect())
    };
    let runs = |unfinished_only: bool| {
        let home = home.clone();
        ArgValueCandidates::new(move || {
            home.as_deref().map(|h| run_ids(h, unfinished_only)).unwrap_or_default()
        })
    };
    documented_command(Some(&names))
        .mut_subcommand("recover", |c| {
            c.mut_arg("run", |a| a.add(runs(true))).mut_arg("sandbox", |a| a.add(sandboxes()))
        })
        .mut_subcommand("journal", |j| {
            j.mut_subcommand("show", |c| c.mut_arg("run", |a| a.add(runs(false))))
                .mut_subcommand("list", |c| c.mut_arg("sandbox", |a| a.add(sandboxes())))
                .mut_subcommand("export", |c| c.mut_arg("sandbox", |a| a.add(sandboxes())))
        })
}

/// The top-level command with the sandbox actions attached under each of `names`, or under a
/// `<NAME>` placeholder for the man page.
fn documented_command(names: Option<&[String]>) -> clap::Command {
    let actions: Vec<clap::Command> = SandboxCli::command().get_subcommands().cloned().collect();
    let sandbox = |name: &str| {
        clap::Command::new(name.to_owned())
            .about("Act on this sandbox (status, rebuild, shields, destroy)")
            .subcommand_required(true)
            .subcommands(actions.clone())
    };
    let mut cmd = Cli::command();
    match names {
        Some(names) => {
            for n in names {
                cmd = cmd.subcommand(sandbox(n));
            }
        }
        None => cmd = cmd.subcommand(sandbox("<NAME>")),
    }
    cmd
}

/// The home completion reads: `NEMOCLAW_HOME`, else `~/.nemoclaw` (a `--home` on the command
/// line being completed is not seen).
fn home() -> Option<PathBuf> {
    let home = std::env::var_os("NEMOCLAW_HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
    super::resolve_home(&super::args::Global { home, ..Default::default() }).ok()
}

/// Registered sandbox names that are valid names and not command words (an unreadable registry
/// completes nothing; completion never reports errors into the shell).
fn registered_names(home: &std::path::Path) -> Vec<String> {
    let Ok(reg) = crate::host::registry::Registry::load(home) else { return Vec::new() };
    let cmd = Cli::command();
    reg.names()
        .into_iter()
        .filter(|n| crate::names::SandboxName::parse(n).is_ok())
        .filter(|n| cmd.find_subcommand(n).is_none())
        .collect()
}

/// Run ids, newest first, with their sandbox and state as the description; with
/// `unfinished_only`, only runs not yet succeeded or rolled back (what `recover` can take).
fn run_ids(home: &std::path::Path, unfinished_only: bool) -> Vec<CompletionCandidate> {
    let Ok(Some(j)) = Journal::open_readonly(&home.join(FILE_NAME)) else { return Vec::new() };
    let mut out = Vec::new();
    let filter = RunFilter { limit: Some(200), ..RunFilter::default() };
    let _ = list_runs(&j, &filter, |r| {
        if unfinished_only && RunState::parse(&r.state).is_none_or(RunState::is_final) {
            return Ok(());
        }
        let about = format!("{} {}", r.sandbox.as_deref().unwrap_or("-"), r.state);
        out.push(CompletionCandidate::new(r.id).help(Some(about.into())));
        Ok(())
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tree completion and the man page are built from passes clap's own checks.
    #[test]
    fn generated_trees_are_consistent() {
        documented_command(None).debug_assert();
        documented_command(Some(&["alpha".to_owned(), "beta".to_owned()])).debug_assert();
    }
}
