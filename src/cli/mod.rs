//! The command-line edge: clap definitions, the printer, dispatch and exit-code mapping.
//! Library errors become [`CliError`]s here; nothing below this module prints or exits.

pub mod args;
pub mod error;
pub mod printer;
pub mod style;
mod suggest;

mod completion;
mod demo;
mod internal;
mod journal_cmd;
mod rebuild_cmd;
mod sandbox;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::exit::Exit;
use args::{Cli, Command, GatewayFlags, Global, SandboxCli};
pub use error::{CliError, Refusal};
pub use printer::Printer;

/// What every handler gets.
pub struct Ctx {
    /// Global flags.
    pub global: Global,
    /// The printer.
    pub printer: Printer,
    /// Resolved NemoClaw home.
    pub home: PathBuf,
}

/// Result of a handler: the exit code on success paths (0, or 1/3/130 after printing).
pub type CmdResult = Result<Exit, CliError>;

fn resolve_home(g: &Global) -> Result<PathBuf, CliError> {
    if let Some(h) = &g.home {
        return Ok(h.clone());
    }
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => Ok(PathBuf::from(h).join(".nemoclaw")),
        _ => Err(Refusal::HomeUnset.into()),
    }
}

/// Entry point used by `main`.
pub fn main() -> ExitCode {
    // A <TAB> in a shell with nemoclaw's completion registered: answer and exit.
    completion::answer_if_asked();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // clap's help and usage errors follow `--color` too: set it before clap parses anything.
    if let Some(c) = style::choice_in_argv(&argv) {
        style::init(c);
    }
    if let Some(code) = help_for_sandbox_action(&argv) {
        return code;
    }
    let json = argv.iter().any(|a| a == "--json");
    let cli = match Cli::try_parse_from(sandbox_named_like_a_command(argv)) {
        Ok(c) => c,
        Err(e) => return usage_error(json, e),
    };
    let outcome = match cli.command {
        Command::Sandbox(argv) => return sandbox_command(cli.global, cli.early, argv, json),
        other => {
            init_tracing(cli.global.verbose);
            let global = with_gateway(cli.global, cli.early, gateway_flags(&other));
            run_with(global, |ctx| dispatch(ctx, other))
        }
    };
    ExitCode::from(outcome.code())
}

/// `nemoclaw help rebuild`: the sandbox actions are not top-level commands, so clap's own
/// `help` cannot find them; show the action's help as `nemoclaw <name> rebuild --help` would.
fn help_for_sandbox_action(argv: &[std::ffi::OsString]) -> Option<ExitCode> {
    let [_, help, action] = argv else { return None };
    let action = action.to_string_lossy();
    if help != "help" || !args::SANDBOX_ACTIONS.contains(&action.as_ref()) {
        return None;
    }
    use clap::CommandFactory;
    let mut cmd = SandboxCli::command();
    cmd.build();
    let sub = cmd.find_subcommand_mut(action.as_ref())?;
    let _ = sub.print_help();
    Some(ExitCode::from(0))
}

/// `nemoclaw <name> <action> ...` (clap's external subcommand): parse it, merge its flags with
/// those before the name, run it.
fn sandbox_command(
    global: Global,
    early: GatewayFlags,
    mut argv: Vec<std::ffi::OsString>,
    json: bool,
) -> ExitCode {
    let marked = argv.first().is_some_and(|a| a == SANDBOX_MARKER);
    if marked {
        argv.remove(0);
    }
    use clap::{CommandFactory, FromArgMatches};
    let parsed = SandboxCli::command()
        .try_get_matches_from(argv.clone())
        .and_then(|m| SandboxCli::from_arg_matches(&m).map(|sc| (sc, m)));
    match parsed {
        Ok((sc, m)) => {
            let given =
                |id: &str| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
            // `-v` after the action counts: tracing starts once both sets are merged.
            let merged = merge_global(global, sc.global.clone(), given);
            let merged = with_gateway(merged, early, action_gateway_flags(&sc.action));
            init_tracing(merged.verbose);
            ExitCode::from(run_with(merged, |ctx| sandbox::dispatch(ctx, sc)).code())
        }
        // Not `<name> <action>`: perhaps a mistyped command, or a NemoClaw action this tool
        // does not have. (A marked word is a real command name, never a typo.)
        Err(e) => {
            let words: Vec<String> =
                argv.iter().map(|w| w.to_string_lossy().into_owned()).collect();
            let hint = if marked { None } else { suggest::explain(&words) };
            let Some(msg) = hint else { return usage_error(json, e) };
            Printer::plain().say(&msg);
            if json {
                let first = msg.lines().next().unwrap_or("").trim_start_matches("error: ");
                Printer::plain().json_doc("error", CliError::new(Exit::Usage, first).document());
            }
            ExitCode::from(Exit::Usage.code())
        }
    }
}

/// A sandbox may be named like a top-level command (`nemoclaw demo status`): when the word
/// after the command is a sandbox action, parse it as `nemoclaw <name> <action>` instead.
/// The flags before the name are kept; a marker word in front of the name makes clap take the
/// external-subcommand path.
fn sandbox_named_like_a_command(argv: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    const COMMANDS: [&str; 8] =
        ["onboard", "list", "recover", "journal", "demo", "completion", "man", "internal"];
    const VALUED: [&str; 4] = ["--home", "--color", "--openshell", "--policy-presets"];
    let mut i = 1;
    while i < argv.len() {
        let a = argv[i].to_string_lossy();
        if VALUED.contains(&a.as_ref()) {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            break;
        }
    }
    let word = |j: usize| argv.get(j).map(|w| w.to_string_lossy().into_owned()).unwrap_or_default();
    if COMMANDS.contains(&word(i).as_str()) && args::SANDBOX_ACTIONS.contains(&word(i + 1).as_str())
    {
        // `nemoclaw [flags] sandbox-as <name> <action> ...` — clap has no such command, so the
        // whole tail arrives as the external `Sandbox` subcommand; the marker is dropped again
        // in `main` before the sandbox arguments are parsed.
        let mut out = argv[..i].to_vec();
        out.push(SANDBOX_MARKER.into());
        out.extend(argv[i..].iter().cloned());
        return out;
    }
    argv
}

/// Placeholder external subcommand used by [`sandbox_named_like_a_command`].
const SANDBOX_MARKER: &str = "sandbox-named-like-a-command";

fn run_with(global: Global, f: impl FnOnce(&Ctx) -> CmdResult) -> Exit {
    let printer = Printer::from_global(&global);
    // The openshell driver reads the presets directory from the environment, so the flag and
    // the variable are one setting. Set before any thread of ours exists.
    if let Some(dir) = &global.policy_presets {
        std::env::set_var("NEMOCLAW_POLICY_PRESETS", dir);
    }
    let result = resolve_home(&global).and_then(|home| {
        let ctx = Ctx { global, printer: printer.clone(), home };
        f(&ctx)
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            printer.error(&e.message);
            for c in &e.causes {
                printer.cause(c);
            }
            for h in &e.hints {
                printer.hint(h);
            }
            if printer.json && !printer::doc_printed() {
                // Scripts get the failure as data too: the same envelope as every document
                // (unless the command's own document already says what failed).
                printer.json_doc("error", e.document());
            }
            e.exit
        }
    }
}

/// A usage error from clap: printed as clap prints it, plus the `error` document on stdout
/// when `--json` was asked for.
fn usage_error(argv_has_json: bool, e: clap::Error) -> ExitCode {
    let _ = e.print();
    if !e.use_stderr() {
        return ExitCode::from(0);
    }
    if argv_has_json {
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or("").trim_start_matches("error: ").to_owned();
        Printer::plain().json_doc("error", CliError::new(Exit::Usage, first).document());
    }
    ExitCode::from(Exit::Usage.code())
}

/// Flags given after `<name> <action>` count as much as those before it. `given` says which
/// of `b`'s valued flags were on the command line: the others hold only what the environment
/// said (`NEMOCLAW_HOME`, …), which must not override a flag given before the name.
fn merge_global(a: Global, b: Global, given: impl Fn(&str) -> bool) -> Global {
    Global {
        home: if given("home") { b.home } else { a.home },
        json: a.json || b.json,
        verbose: a.verbose.max(b.verbose),
        quiet: a.quiet || b.quiet,
        color: if b.color != args::ColorChoice::Auto { b.color } else { a.color },
        openshell: None,
        policy_presets: None,
    }
}

/// `global` with the gateway settings the command runs with: its own `--openshell` /
/// `--policy-presets` (`own`), else those given before it, else the environment.
fn with_gateway(mut global: Global, early: GatewayFlags, own: GatewayFlags) -> Global {
    let g = early.resolve(own.openshell, own.policy_presets);
    global.openshell = g.openshell;
    global.policy_presets = g.policy_presets;
    global
}

/// The gateway flags a top-level command takes (only onboard and recover talk to gateways).
fn gateway_flags(c: &Command) -> GatewayFlags {
    match c {
        Command::Onboard(a) => GatewayFlags {
            openshell: a.openshell.openshell.clone(),
            policy_presets: a.presets.policy_presets.clone(),
        },
        Command::Recover(a) => GatewayFlags {
            openshell: a.openshell.openshell.clone(),
            policy_presets: a.presets.policy_presets.clone(),
        },
        _ => GatewayFlags::default(),
    }
}

/// The gateway flags a sandbox action takes (shields never reach the gateway).
fn action_gateway_flags(a: &args::SandboxAction) -> GatewayFlags {
    use args::SandboxAction as A;
    match a {
        A::Status { openshell } | A::Destroy { openshell, .. } => {
            GatewayFlags { openshell: openshell.openshell.clone(), policy_presets: None }
        }
        A::Rebuild(r) => GatewayFlags {
            openshell: r.openshell.openshell.clone(),
            policy_presets: r.presets.policy_presets.clone(),
        },
        A::Shields { .. } => GatewayFlags::default(),
    }
}

fn dispatch(ctx: &Ctx, command: Command) -> CmdResult {
    match command {
        Command::Onboard(a) => sandbox::onboard(ctx, a),
        Command::List => sandbox::list(ctx),
        Command::Recover(a) => rebuild_cmd::recover(ctx, a),
        Command::Journal(j) => journal_cmd::dispatch(ctx, j),
        Command::Demo(a) => demo::run(ctx, a),
        Command::Completion { shell } => completion::script(ctx, shell),
        Command::Man => completion::man(ctx),
        Command::Internal(i) => internal::dispatch(ctx, i),
        Command::Sandbox(_) => unreachable!("handled in main"),
    }
}

fn init_tracing(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    // NEMOCLAW_LOG wins, then the usual RUST_LOG, then -v.
    let filter = tracing_subscriber::EnvFilter::try_from_env("NEMOCLAW_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("nemoclaw={level}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .try_init();
}

/// Parse a sandbox name at the CLI edge: an invalid one is a usage error (exit 2) before any I/O.
pub fn parse_name(s: &str) -> Result<crate::names::SandboxName, CliError> {
    Ok(crate::names::SandboxName::parse(s)?)
}
