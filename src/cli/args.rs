//! clap definitions for every command. Handlers live in one file per command group.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Flags accepted by every command, before or after it.
#[derive(Debug, Clone, Args, Default)]
#[command(next_help_heading = "Global options")]
pub struct Global {
    /// NemoClaw home directory (default: $NEMOCLAW_HOME, else ~/.nemoclaw).
    #[arg(long, global = true, env = "NEMOCLAW_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Machine-readable JSON on stdout (schema-versioned).
    #[arg(long, global = true)]
    pub json: bool,
    /// More detail on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// When to use colour (NO_COLOR is honoured with `auto`).
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// The `openshell` binary, for the commands that talk to a gateway ([`OpenShellOpt`]).
    #[arg(skip)]
    pub openshell: Option<PathBuf>,
    /// NemoClaw's presets directory, for the commands that apply presets ([`PresetsOpt`]).
    #[arg(skip)]
    pub policy_presets: Option<PathBuf>,
}

/// `--openshell`, on the commands that talk to an OpenShell gateway (onboard, recover, status,
/// rebuild, destroy). The environment variable is read by [`GatewayFlags::resolve`], so a
/// flag given anywhere on the command line wins over it.
#[derive(Debug, Clone, Args, Default)]
#[command(next_help_heading = "Gateway options")]
pub struct OpenShellOpt {
    /// Path of the `openshell` binary (default: $NEMOCLAW_OPENSHELL, else found on PATH).
    #[arg(long, value_name = "PATH")]
    pub openshell: Option<PathBuf>,
}

/// `--policy-presets`, on the commands that apply NemoClaw's presets (onboard, and rebuild and
/// recover for a stale recovery).
#[derive(Debug, Clone, Args, Default)]
#[command(next_help_heading = "Gateway options")]
pub struct PresetsOpt {
    /// NemoClaw's policy presets directory (`<preset>.yaml` files; default:
    /// $NEMOCLAW_POLICY_PRESETS), read by onboard and when a stale recovery has no journaled
    /// policy and re-applies the registry's presets.
    #[arg(long, value_name = "DIR")]
    pub policy_presets: Option<PathBuf>,
}

/// The gateway flags as given before the command (`nemoclaw --openshell P <name> rebuild`):
/// still accepted, not shown in help, and overridden by the same flag after the command.
#[derive(Debug, Clone, Args, Default)]
pub struct GatewayFlags {
    #[arg(long = "openshell", id = "early_openshell", value_name = "PATH", hide = true)]
    pub openshell: Option<PathBuf>,
    #[arg(long = "policy-presets", id = "early_policy_presets", value_name = "DIR", hide = true)]
    pub policy_presets: Option<PathBuf>,
}

impl GatewayFlags {
    /// The settings a command runs with: its own flags, else those before it, else
    /// `$NEMOCLAW_OPENSHELL` / `$NEMOCLAW_POLICY_PRESETS`.
    pub fn resolve(self, openshell: Option<PathBuf>, presets: Option<PathBuf>) -> Self {
        self.resolve_with(openshell, presets, |v| {
            std::env::var_os(v).filter(|s| !s.is_empty()).map(PathBuf::from)
        })
    }

    fn resolve_with(
        self,
        openshell: Option<PathBuf>,
        presets: Option<PathBuf>,
        env: impl Fn(&str) -> Option<PathBuf>,
    ) -> Self {
        Self {
            openshell: openshell.or(self.openshell).or_else(|| env("NEMOCLAW_OPENSHELL")),
            policy_presets: presets
                .or(self.policy_presets)
                .or_else(|| env("NEMOCLAW_POLICY_PRESETS")),
        }
    }
}

/// `--color` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum ColorChoice {
    /// Colour on a terminal, unless NO_COLOR is set.
    #[default]
    Auto,
    /// Always colour.
    Always,
    /// Never colour.
    Never,
}

/// nemoclaw rebuilds and recovers NemoClaw sandboxes with a crash-safe journal.
#[derive(Debug, Parser)]
#[command(name = "nemoclaw", version, about, allow_external_subcommands = true)]
#[command(after_help = "Sandbox commands: nemoclaw <name> status|rebuild|shields|destroy")]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(flatten)]
    pub early: GatewayFlags,
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands. `nemoclaw <name> <action>` arrives as [`Command::Sandbox`].
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a sandbox on a gateway and register it.
    Onboard(OnboardArgs),
    /// List registered sandboxes.
    List,
    /// List unfinished runs, or finish one with --resume / --rollback.
    Recover(RecoverArgs),
    /// Review past runs: list, show, export, verify, prune.
    #[command(subcommand)]
    Journal(JournalCmd),
    /// Run the whole story on the embedded local gateway in a scratch home.
    Demo(DemoArgs),
    /// Print the shell completion script (completes commands, sandbox names and run ids).
    Completion {
        /// The shell: bash, zsh or fish.
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Print the man page (roff): `nemoclaw man > nemoclaw.1`.
    Man,
    /// Internal commands for tests and benchmarks.
    #[command(subcommand, hide = true)]
    Internal(InternalCmd),
    /// `nemoclaw <name> <action> ...`
    #[command(external_subcommand)]
    Sandbox(Vec<OsString>),
}

/// Shells `nemoclaw completion` writes a script for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    /// GNU bash (4.4 or later).
    Bash,
    /// zsh.
    Zsh,
    /// fish.
    Fish,
}

/// `nemoclaw onboard`.
#[derive(Debug, Args)]
pub struct OnboardArgs {
    /// Sandbox name (DNS-1123 label).
    pub name: String,
    /// Gateway: `local`, `nemoclaw` or `nemoclaw-<port>` (default: local when no openshell is on PATH).
    #[arg(long)]
    pub gateway: Option<String>,
    /// Agent kind (default: openclaw).
    #[arg(long)]
    pub agent: Option<String>,
    /// Model.
    #[arg(long)]
    pub model: Option<String>,
    /// Inference provider.
    #[arg(long)]
    pub provider: Option<String>,
    /// Policy preset to apply (repeatable).
    #[arg(long = "policy", value_name = "PRESET")]
    pub policies: Vec<String>,
    /// Image to create the sandbox from.
    #[arg(long)]
    pub image: Option<String>,
    #[command(flatten)]
    pub openshell: OpenShellOpt,
    #[command(flatten)]
    pub presets: PresetsOpt,
}

/// The words that make `nemoclaw <NAME> <word>` a sandbox command (see [`SandboxAction`]).
pub const SANDBOX_ACTIONS: [&str; 4] = ["status", "rebuild", "shields", "destroy"];

/// Act on one sandbox: `nemoclaw <NAME> <COMMAND>`.
//
// Parsed from the external subcommand. `bin_name` makes each action's usage read
// `nemoclaw <NAME> rebuild [OPTIONS]` (clap puts the name positional in between); the sandbox
// command's own usage is spelt out.
#[derive(Debug, Parser)]
#[command(name = "nemoclaw", bin_name = "nemoclaw", no_binary_name = true)]
#[command(override_usage = "nemoclaw [OPTIONS] <NAME> <COMMAND>")]
pub struct SandboxCli {
    /// Sandbox name.
    pub name: String,
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub action: SandboxAction,
}

/// Actions on one sandbox.
#[derive(Debug, Subcommand)]
pub enum SandboxAction {
    /// Registry entry and live state.
    Status {
        #[command(flatten)]
        openshell: OpenShellOpt,
    },
    /// Back up, recreate with the current image, restore — journaled and resumable.
    Rebuild(RebuildArgs),
    /// Shields (lockdown) state.
    Shields {
        #[command(subcommand)]
        action: ShieldsAction,
    },
    /// Delete the sandbox and its registry entry.
    Destroy {
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        openshell: OpenShellOpt,
    },
}

/// `rebuild` flags.
#[derive(Debug, Args)]
pub struct RebuildArgs {
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Print the plan and each step's probe; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub openshell: OpenShellOpt,
    #[command(flatten)]
    pub presets: PresetsOpt,
}

/// `shields` actions.
//
// clap writes a nested action's usage without the name positional (`nemoclaw shields up`):
// each one is spelt out.
#[derive(Debug, Subcommand)]
pub enum ShieldsAction {
    /// Lock the sandbox down.
    #[command(override_usage = "nemoclaw <NAME> shields up [OPTIONS]")]
    Up,
    /// Unlock the sandbox.
    #[command(override_usage = "nemoclaw <NAME> shields down [OPTIONS]")]
    Down {
        /// Why (recorded in the shields file).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Show whether shields are up.
    #[command(override_usage = "nemoclaw <NAME> shields status [OPTIONS]")]
    Status,
}

/// `nemoclaw recover`.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// Continue the run forward from its first unfinished step.
    #[arg(long, conflicts_with = "rollback")]
    pub resume: bool,
    /// Undo the run's finished steps in reverse.
    #[arg(long)]
    pub rollback: bool,
    /// With --rollback: when the run's backup fails verification, finish the rollback without
    /// restoring it (the registry row comes back, the sandbox stays absent, the backup is kept).
    #[arg(long, conflicts_with = "resume")]
    pub accept_damaged_backup: bool,
    /// The run (id or unique prefix).
    pub run: Option<String>,
    /// Pick the unfinished run of this sandbox.
    #[arg(long, conflicts_with = "run")]
    pub sandbox: Option<String>,
    #[command(flatten)]
    pub openshell: OpenShellOpt,
    #[command(flatten)]
    pub presets: PresetsOpt,
}

/// `nemoclaw journal ...`.
#[derive(Debug, Subcommand)]
pub enum JournalCmd {
    /// Runs, newest first.
    List(JournalListArgs),
    /// One run's timeline.
    Show {
        /// Run id or unique prefix.
        run: String,
    },
    /// Events as JSON Lines.
    Export {
        /// Only events at or after this time (RFC 3339, a date, or a duration before now like `7d` or `1h30m`).
        #[arg(long)]
        since: Option<String>,
        /// Only this sandbox's runs.
        #[arg(long)]
        sandbox: Option<String>,
    },
    /// Check integrity, the hash chain, consistency and that every row matches its events.
    Verify {
        /// Fail unless the chain contains this head (the hash `journal verify` printed earlier,
        /// kept outside the journal): detects a journal rewritten as a whole.
        #[arg(long, value_name = "HASH")]
        expect_head: Option<String>,
    },
    /// Remove finished runs older than a duration.
    Prune {
        /// How old a finished run must be: `30d`, `12h`, `1h30m`, `1min`, ...
        #[arg(long, value_name = "DURATION")]
        older_than: String,
        /// Say what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep the runs' backup directories.
        #[arg(long)]
        keep_backups: bool,
        /// Delete the runs' backups without asking (on a terminal, prune lists them and asks).
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// `journal list` filters.
#[derive(Debug, Args)]
pub struct JournalListArgs {
    /// Only this sandbox.
    #[arg(long)]
    pub sandbox: Option<String>,
    /// Only runs in this state.
    #[arg(long)]
    pub state: Option<String>,
    /// Only runs started at or after this time (RFC 3339, a date, or a duration before now like `7d` or `1h30m`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only runs started before this time.
    #[arg(long)]
    pub until: Option<String>,
    /// At most this many runs.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

/// `nemoclaw demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the scratch home in this directory (default: a new temporary directory).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Hidden commands used by the test suite and benchmarks.
#[derive(Debug, Subcommand)]
pub enum InternalCmd {
    /// Run, resume or roll back a synthetic plan of tiny file-effect steps.
    Synthetic(SyntheticArgs),
}

/// `internal synthetic` actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SyntheticAction {
    /// Start a run.
    Run,
    /// Resume a run.
    Resume,
    /// Roll a run back.
    Rollback,
}

/// `internal synthetic`.
#[derive(Debug, Args)]
pub struct SyntheticArgs {
    /// What to do.
    #[arg(value_enum)]
    pub action: SyntheticAction,
    /// Number of steps (for `run`).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Ledger file the steps append to.
    #[arg(long)]
    pub ledger: Option<PathBuf>,
    /// Lock key.
    #[arg(long, default_value = "synthetic")]
    pub key: String,
    /// Run id (for `resume` / `rollback`).
    #[arg(long)]
    pub run: Option<String>,
    /// Fail this step (0-based) in apply.
    #[arg(long)]
    pub fail_at: Option<usize>,
    /// Sleep this many milliseconds inside each apply (for kill tests).
    #[arg(long, default_value_t = 0)]
    pub step_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// clap's own consistency checks over every command and argument definition.
    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
        SandboxCli::command().debug_assert();
    }

    #[rstest::rstest]
    #[case::after_wins(Some("after"), Some("before"), Some("env"), Some("after"))]
    #[case::before_wins_over_env(None, Some("before"), Some("env"), Some("before"))]
    #[case::env_last(None, None, Some("env"), Some("env"))]
    #[case::nothing(None, None, None, None)]
    fn gateway_flags_precedence(
        #[case] after: Option<&str>,
        #[case] before: Option<&str>,
        #[case] env: Option<&str>,
        #[case] want: Option<&str>,
    ) {
        let p = |s: Option<&str>| s.map(PathBuf::from);
        let early = GatewayFlags { openshell: p(before), policy_presets: p(before) };
        let got = early.resolve_with(p(after), p(after), |_| p(env));
        assert_eq!(got.openshell, p(want));
        assert_eq!(got.policy_presets, p(want));
    }
}
