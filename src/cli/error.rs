//! The one error→hint table. Every failure the operator sees passes through here on its way
//! out: a library error (journal, engine, audit, host files, gateway, rebuild) or a refusal the
//! command line decides itself ([`Refusal`]) becomes a [`CliError`] with its exit code, its
//! cause chain (one `caused by:` line per `source()` the message does not already say) and its
//! `hint:` lines, the last of which names the exact next command. Handlers never attach hints
//! themselves: a new failure gets a row here.

use std::error::Error;
use std::path::PathBuf;

use crate::engine::synthetic::DriveError;
use crate::engine::EngineError;
use crate::exit::{Exit, ExitCoded};
use crate::gateway::GatewayError;
use crate::host::HostError;
use crate::journal::audit::{AuditError, BadHead};
use crate::journal::JournalError;
use crate::names::{InvalidName, SandboxName};
use crate::rebuild::files::PruneError;
use crate::rebuild::messages;
use crate::rebuild::saga::{HolderRecord, RunRecord, SagaError};
use crate::rebuild::PreflightError;

/// An error on its way to the operator: the exit code, the sentence, its causes and the hints.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub exit: Exit,
    /// The error sentence.
    pub message: String,
    /// The cause chain, outermost first, without what the message already says.
    pub causes: Vec<String>,
    /// `hint:` lines; the last names the next command.
    pub hints: Vec<String>,
}

impl CliError {
    /// An error with no obvious next command (a demo step that failed, stdout closed).
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Self { exit, message: message.into(), causes: Vec::new(), hints: Vec::new() }
    }

    fn hint(mut self, h: impl Into<String>) -> Self {
        self.hints.push(h.into());
        self
    }

    fn hints(mut self, hs: Vec<String>) -> Self {
        self.hints.extend(hs);
        self
    }

    /// An error from a library error: its exit code, its message and its cause chain.
    fn caused(e: &(dyn Error + 'static), exit: Exit) -> Self {
        let mut err = CliError::new(exit, e.to_string());
        let mut src = e.source();
        while let Some(s) = src {
            let t = s.to_string();
            if !err.message.contains(&t) && !err.causes.iter().any(|c| c.contains(&t)) {
                err.causes.push(t);
            }
            src = s.source();
        }
        err
    }

    /// The `error` document `--json` prints: exit code, its name, the message, the causes and
    /// the hints (the last names the next command).
    pub fn document(&self) -> serde_json::Value {
        serde_json::json!({
            "exit": self.exit.code(),
            "kind": format!("{:?}", self.exit).to_lowercase(),
            "message": self.message,
            "causes": self.causes,
            "hints": self.hints,
        })
    }
}

/// The two commands that finish an unfinished run; `resumable` is false once a rollback has
/// begun (a rollback is only ever finished by rolling back).
pub fn recover_commands(run_id: &str, resumable: bool) -> Vec<String> {
    let mut out = Vec::new();
    if resumable {
        out.push(format!("continue it: `nemoclaw recover --resume {run_id}`"));
    }
    let or = if resumable { "or " } else { "" };
    out.push(format!("{or}undo it: `nemoclaw recover --rollback {run_id}`"));
    out
}

// ---------------------------------------------------------------------------------------------
// Library errors: exit code from the error itself (`ExitCoded`), hints from this table.

/// The hints of one library error type.
trait Hints {
    fn hints(&self) -> Vec<String>;
}

impl<E: Error + ExitCoded + Hints + 'static> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError::caused(&e, e.exit()).hints(e.hints())
    }
}

impl Hints for JournalError {
    fn hints(&self) -> Vec<String> {
        let side = |p: &PathBuf, s: &str| format!("{}{s}", p.display());
        match self {
            JournalError::NeedsRollback { read_only_dir: false, .. } => vec![
                "`nemoclaw recover` rolls the unfinished write back (restoring the last committed \
                 state) and lists unfinished runs"
                    .into(),
            ],
            JournalError::NeedsRollback { path, read_only_dir: true } => vec![format!(
                "copy the whole directory, `{}` included, to writable storage and run `nemoclaw --home <copy> recover` there",
                side(path, "-journal")
            )],
            JournalError::UnreadableWal { path } => vec![format!(
                "copy the whole directory, `{}` included, to writable storage and run the command there with `--home <copy>`",
                side(path, "-wal")
            )],
            JournalError::Full { .. } => {
                vec!["free space on the disk that holds the home, then run the command again".into()]
            }
            _ if self.exit() == Exit::Busy => {
                vec!["another nemoclaw is writing the journal: run the command again when it is done".into()]
            }
            _ => Vec::new(),
        }
    }
}

impl Hints for EngineError {
    fn hints(&self) -> Vec<String> {
        match self {
            EngineError::Journal(e) => e.hints(),
            EngineError::Busy { holder, .. } => {
                let follow = holder
                    .as_ref()
                    .and_then(|h| h.run_id.as_ref())
                    .map(|r| format!("follow its run with `nemoclaw journal show {r}`"));
                follow
                    .into_iter()
                    .chain(["when it has finished, run the command again; if its holder died, `nemoclaw recover` lists the run".into()])
                    .collect()
            }
            EngineError::Unfinished { run_id, .. } => recover_commands(run_id, true),
            EngineError::UnknownPlan { run_id, .. } | EngineError::PlanChanged { run_id, .. } => {
                vec![format!(
                    "finish it with the nemoclaw that started it (`nemoclaw journal show {run_id}` names its version)"
                )]
            }
            EngineError::Data { run_id, .. } => vec![
                "`nemoclaw journal verify` tells whether the journal was edited".into(),
                format!("`nemoclaw journal show {run_id}` shows what the run recorded"),
            ],
            EngineError::PlanUnavailable { run_id, .. } => {
                let mut out = vec!["fix the cause above, then:".to_owned()];
                out.extend(recover_commands(run_id, true));
                out
            }
            EngineError::Lock { .. } | EngineError::Refused { .. } => Vec::new(),
        }
    }
}

impl Hints for SagaError {
    fn hints(&self) -> Vec<String> {
        match self {
            SagaError::Journal(e) => e.hints(),
            SagaError::Engine(e) => e.hints(),
            SagaError::Data { .. } => Vec::new(),
        }
    }
}

impl Hints for AuditError {
    fn hints(&self) -> Vec<String> {
        match self {
            AuditError::Journal(e) => e.hints(),
            AuditError::AmbiguousRun { .. } => vec!["give more characters of the run id".into()],
            AuditError::UnknownRun { .. } => vec!["`nemoclaw journal list` shows the runs".into()],
            AuditError::BadDuration { .. } => {
                vec!["for example `nemoclaw journal prune --older-than 30d`".into()]
            }
            AuditError::BadTime { .. } => {
                vec!["for example `nemoclaw journal list --since 7d`".into()]
            }
            AuditError::BadState { .. } => {
                vec!["for example `nemoclaw journal list --state failed`".into()]
            }
            _ => Vec::new(),
        }
    }
}

impl Hints for PruneError {
    fn hints(&self) -> Vec<String> {
        match self {
            PruneError::Audit(e) => e.hints(),
            PruneError::Backup { path, .. } => vec![format!(
                "the runs are pruned; remove `{}` by hand once the cause is fixed",
                path.display()
            )],
        }
    }
}

impl Hints for HostError {
    fn hints(&self) -> Vec<String> {
        match self {
            HostError::Corrupt { .. } => vec![
                "nemoclaw never overwrites a corrupt file: repair it or move it aside, then run the command again".into(),
            ],
            HostError::LockTimeout { .. } => vec![
                "another NemoClaw command is changing the registry: run the command again when it is done".into(),
            ],
            HostError::Io { .. } | HostError::Invalid(_) => Vec::new(),
        }
    }
}

impl Hints for GatewayError {
    fn hints(&self) -> Vec<String> {
        match self {
            GatewayError::AlreadyExists(name, _) => vec![format!(
                "a sandbox '{name}' exists on the gateway but is not registered; remove it there first"
            )],
            GatewayError::Spawn { .. } => {
                vec!["install `openshell` or pass `--openshell PATH`, then retry".into()]
            }
            GatewayError::Unhealthy { gateway, .. } => vec![format!(
                "nothing was changed; once gateway '{gateway}' is healthy again, run the command again"
            )],
            GatewayError::Timeout { .. } => vec![
                "the gateway may still finish it: `nemoclaw list` and `nemoclaw <name> status` show where things stand".into(),
            ],
            _ => Vec::new(),
        }
    }
}

impl Hints for PreflightError {
    fn hints(&self) -> Vec<String> {
        match self {
            PreflightError::Host(e) => e.hints(),
            PreflightError::Gateway(e) => e.hints(),
            PreflightError::NotRegistered(_) => {
                vec!["see registered sandboxes with `nemoclaw list`".into()]
            }
        }
    }
}

impl Hints for BadHead {
    fn hints(&self) -> Vec<String> {
        vec!["give the head `nemoclaw journal verify` printed, e.g. `nemoclaw journal verify --expect-head <64 hex digits>`".into()]
    }
}

impl From<InvalidName> for CliError {
    fn from(e: InvalidName) -> Self {
        CliError::new(Exit::Usage, e.to_string()).hint("`nemoclaw list` shows the registered names")
    }
}

/// The synthetic plan's failures (`nemoclaw internal synthetic`): its own recover commands.
impl From<DriveError> for CliError {
    fn from(e: DriveError) -> Self {
        let e = match e {
            DriveError::Engine(e) => e,
            DriveError::Steps => return CliError::new(Exit::Usage, e.to_string()),
            DriveError::NothingUnfinished(_) => return CliError::new(Exit::Refused, e.to_string()),
        };
        let hints = match &e {
            EngineError::Busy { .. } => vec!["wait for the other run to finish, then retry".into()],
            EngineError::Unfinished { run_id, .. } => vec![format!(
                "run `nemoclaw internal synthetic resume --run {run_id}` or `... rollback --run {run_id}`"
            )],
            EngineError::Refused { run_id, .. } => {
                vec![format!("run `nemoclaw internal synthetic rollback --run {run_id}`")]
            }
            _ => Vec::new(),
        };
        CliError::caused(&e, e.exit()).hints(hints)
    }
}

// ---------------------------------------------------------------------------------------------
// Refusals the command line decides itself.

/// A failure found by the command line rather than returned by the library.
#[derive(Debug)]
pub enum Refusal {
    /// No `--home`, no `NEMOCLAW_HOME`, no `HOME`.
    HomeUnset,
    /// A live process runs a rebuild of the sandbox.
    InProgress {
        /// The sandbox.
        name: SandboxName,
        /// The command refused (`rebuild`, `shields up`, …).
        what: &'static str,
        /// The run.
        run: Box<RunRecord>,
        /// Who holds it.
        holder: HolderRecord,
    },
    /// A rebuild of the sandbox waits for `recover`.
    Unfinished {
        /// The sandbox.
        name: SandboxName,
        /// The command refused.
        what: &'static str,
        /// The run.
        run: Box<RunRecord>,
    },
    /// The recorded gateway has no usable driver (no `openshell`): NemoClaw's refusal.
    NoGatewayDriver {
        /// The sandbox.
        name: SandboxName,
        /// Why the driver could not be opened.
        error: GatewayError,
    },
    /// A question with no terminal to ask it on.
    NeedsConfirmation {
        /// What would be done, as a sentence fragment (`rebuild of 'alpha'`).
        what: String,
        /// The command that proceeds without asking.
        yes: String,
    },
    /// `--accept-damaged-backup` without `--rollback`.
    DamagedNeedsRollback,
    /// `recover --resume|--rollback` with several unfinished runs and none named.
    AmbiguousUnfinished(usize),
    /// `journal show` with no journal.
    NoJournal {
        /// The run asked for.
        prefix: String,
    },
    /// `journal verify --expect-head` with no journal.
    NoJournalForHead {
        /// Where the journal should be.
        path: PathBuf,
        /// The expected head.
        head: String,
    },
    /// `journal verify` found a problem.
    VerifyFailed {
        /// The journal.
        path: PathBuf,
        /// The first bad event, if any.
        event: Option<i64>,
        /// What is wrong.
        detail: String,
    },
    /// `onboard --gateway` with a binding that is not one.
    InvalidGateway(String),
    /// `onboard` of a registered name.
    AlreadyRegistered(SandboxName),
    /// `onboard --policy` with presets nobody knows.
    UnknownPresets {
        /// The unknown names.
        unknown: Vec<String>,
        /// The known ones.
        known: Vec<String>,
    },
    /// `--policy-presets DIR` (or `NEMOCLAW_POLICY_PRESETS`) names a directory that cannot
    /// be read.
    UnreadablePresetsDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        error: String,
    },
    /// Presets asked for on an OpenShell gateway.
    PresetsOnOpenShell {
        /// The sandbox.
        name: SandboxName,
        /// The gateway.
        gateway: String,
    },
    /// `onboard` on an unhealthy gateway.
    GatewayNotHealthy {
        /// The gateway.
        gateway: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A sandbox command on an unregistered name.
    NotRegistered {
        /// The sandbox.
        name: SandboxName,
        /// The registry file.
        registry: PathBuf,
    },
    /// The sandbox is on another gateway than the active one (NemoClaw's words).
    ForeignGateway {
        /// The sandbox.
        name: SandboxName,
        /// Its recorded gateway.
        gateway: String,
        /// The active one.
        active: String,
    },
    /// Live state unknown (NemoClaw's words).
    CouldNotConfirm {
        /// The sandbox.
        name: SandboxName,
        /// What the gateway said.
        detail: String,
    },
}

impl From<Refusal> for CliError {
    fn from(r: Refusal) -> Self {
        use Refusal as R;
        match r {
            R::HomeUnset => CliError::new(Exit::Usage, "cannot find the NemoClaw home: HOME is not set")
                .hint("pass `--home DIR` or set `NEMOCLAW_HOME`"),
            R::InProgress { name, what, run, holder } => CliError::new(
                Exit::Busy,
                format!(
                    "a rebuild of '{name}' is in progress (run {}, {}): {}; `{what}` is refused while it runs (nothing was changed)",
                    run.id,
                    run.state.as_str(),
                    holder_line(&run, &holder)
                ),
            )
            .hint(format!("follow it with `nemoclaw journal show {}`", run.id))
            .hint(format!(
                "when it has finished, run `nemoclaw {name} {what}` again; if its holder died, `nemoclaw recover` lists the run"
            )),
            R::Unfinished { name, what, run } => CliError::new(
                Exit::Refused,
                format!(
                    "a rebuild of '{name}' is unfinished (run {}, {}); `{what}` is refused until it is resumed or rolled back (nothing was changed)",
                    run.id,
                    run.state.as_str()
                ),
            )
            .hints(recover_commands(&run.id, run.state != crate::rebuild::saga::RunState::RollingBack)),
            R::NoGatewayDriver { name, error } => CliError::new(
                Exit::Refused,
                format!(
                    "{}\n  {error}\n{}",
                    messages::could_not_confirm(name.as_str()),
                    messages::ENTRY_PRESERVED
                ),
            )
            .hint(format!("install `openshell` or pass `--openshell PATH`, then run `nemoclaw {name} rebuild` again")),
            R::NeedsConfirmation { what, yes } => CliError::new(
                Exit::Refused,
                format!("{what} needs confirmation, and there is no terminal to ask on (nothing was changed)"),
            )
            .hint(format!("run `{yes}` to proceed without asking")),
            R::DamagedNeedsRollback => {
                CliError::new(Exit::Usage, "--accept-damaged-backup goes with --rollback")
                    .hint("`nemoclaw recover --rollback RUN --accept-damaged-backup`")
            }
            R::AmbiguousUnfinished(n) => {
                CliError::new(Exit::Usage, format!("{n} unfinished runs; say which one to recover"))
                    .hint("list them with `nemoclaw recover`, then `nemoclaw recover --resume RUN`")
            }
            R::NoJournal { prefix } => CliError::new(
                Exit::Usage,
                format!("no run matches `{prefix}`: there is no journal yet"),
            )
            .hint("`nemoclaw journal list` shows the runs"),
            R::NoJournalForHead { path, head } => CliError::new(
                Exit::Corrupt,
                format!(
                    "there is no journal at {}, so it cannot contain the expected head {head}",
                    path.display()
                ),
            )
            .hint("check `--home`; the journal may have been removed"),
            R::VerifyFailed { path, event, detail } => CliError::new(
                Exit::Corrupt,
                format!(
                    "journal {} failed verification{}: {detail}",
                    path.display(),
                    event.map(|e| format!(" at event {e}")).unwrap_or_default(),
                ),
            )
            .hint("keep the file for inspection; `nemoclaw journal export` still reads every row"),
            R::InvalidGateway(g) => CliError::new(
                Exit::Usage,
                format!("invalid gateway `{g}`: expected `local`, `nemoclaw` or `nemoclaw-<port>` (not `nemoclaw-8080`)"),
            )
            .hint("for example `nemoclaw onboard NAME --gateway local`"),
            R::AlreadyRegistered(name) => {
                CliError::new(Exit::Refused, format!("sandbox '{name}' is already registered")).hint(
                    format!(
                        "see it with `nemoclaw {name} status`, or recreate it with `nemoclaw {name} rebuild`"
                    ),
                )
            }
            R::UnknownPresets { unknown, known } => CliError::new(
                Exit::Usage,
                format!(
                    "unknown policy preset{} {}: the known presets are {}",
                    if unknown.len() == 1 { "" } else { "s" },
                    unknown.iter().map(|u| format!("`{u}`")).collect::<Vec<_>>().join(", "),
                    known.join(", ")
                ),
            )
            .hint("use one of these, or pass NemoClaw's own presets directory with `--policy-presets DIR`"),
            R::UnreadablePresetsDir { path, error } => CliError::new(
                Exit::Usage,
                format!("cannot read the policy presets directory {}: {error}", path.display()),
            )
            .hint("give NemoClaw's presets directory with `--policy-presets DIR`, or leave it out (and unset `NEMOCLAW_POLICY_PRESETS`) for NemoClaw's own preset names"),
            R::PresetsOnOpenShell { name, gateway } => CliError::new(
                Exit::Refused,
                format!(
                    "policy presets cannot be applied on the OpenShell gateway '{gateway}' by nemoclaw"
                ),
            )
            .hint(format!(
                "onboard without `--policy` and add presets with NemoClaw: `nemoclaw {name} policy-add`"
            )),
            R::GatewayNotHealthy { gateway, detail } => CliError::new(
                Exit::Refused,
                format!("gateway '{gateway}' is not in a known-good state: {detail}"),
            )
            .hint(format!(
                "nothing was created; once gateway '{gateway}' is healthy, run the same `nemoclaw onboard` again"
            )),
            R::NotRegistered { name, registry } => CliError::new(
                Exit::Refused,
                format!("sandbox '{name}' is not registered in {}", registry.display()),
            )
            .hint("see registered sandboxes with `nemoclaw list`"),
            R::ForeignGateway { name, gateway, active } => CliError::new(
                Exit::Refused,
                messages::foreign_gateway(name.as_str(), &gateway, &active),
            )
            .hint(format!(
                "{} `{}`",
                messages::SWITCH_AND_RETRY.to_lowercase(),
                messages::select_cmd(&gateway)
            )),
            R::CouldNotConfirm { name, detail } => CliError::new(
                Exit::Refused,
                format!(
                    "{}\n  {detail}\n{}",
                    messages::could_not_confirm(name.as_str()),
                    messages::ENTRY_PRESERVED
                ),
            )
            .hint(format!("check the gateway, then run `nemoclaw {name} status` again")),
        }
    }
}

/// "pid 42 on host h since 2026-…, running `nemoclaw alpha rebuild --yes`".
pub fn holder_line(run: &RunRecord, h: &HolderRecord) -> String {
    format!(
        "pid {} on host {} since {}, running `{}`",
        h.pid,
        h.host,
        crate::util::iso_ms(h.acquired_at),
        run.argv.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);
    #[derive(Debug, thiserror::Error)]
    #[error("middle: {0}")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn causes_are_the_source_chain_without_what_the_message_says() {
        let e = Outer(Middle(std::io::Error::other("disk on fire")));
        let c = CliError::caused(&e, Exit::Io);
        assert_eq!(c.message, "outer");
        // "disk on fire" is already part of "middle: disk on fire".
        assert_eq!(c.causes, ["middle: disk on fire"]);
        assert_eq!(c.document()["causes"], serde_json::json!(["middle: disk on fire"]));
    }

    #[test]
    fn unfinished_runs_name_both_recover_commands_last() {
        assert_eq!(
            recover_commands("r1", true),
            [
                "continue it: `nemoclaw recover --resume r1`",
                "or undo it: `nemoclaw recover --rollback r1`"
            ]
        );
        assert_eq!(recover_commands("r1", false), ["undo it: `nemoclaw recover --rollback r1`"]);
        let e = CliError::from(EngineError::Unfinished {
            key: "k".into(),
            run_id: "r1".into(),
            state: crate::rebuild::saga::RunState::Failed,
        });
        assert_eq!(e.exit, Exit::Refused);
        assert!(e.hints.last().unwrap().contains("nemoclaw recover --rollback r1"), "{e:?}");
    }

    /// Every refusal ends with a hint that names a command to run (in backticks).
    #[test]
    fn every_refusal_ends_with_a_command() {
        let name = || SandboxName::parse("alpha").unwrap();
        let refusals = vec![
            Refusal::HomeUnset,
            Refusal::NoGatewayDriver {
                name: name(),
                error: GatewayError::Other("no openshell".into()),
            },
            Refusal::NeedsConfirmation {
                what: "x".into(),
                yes: "nemoclaw alpha rebuild --yes".into(),
            },
            Refusal::DamagedNeedsRollback,
            Refusal::AmbiguousUnfinished(2),
            Refusal::NoJournal { prefix: "01".into() },
            Refusal::NoJournalForHead { path: "/j".into(), head: "ab".into() },
            Refusal::VerifyFailed { path: "/j".into(), event: Some(3), detail: "bad".into() },
            Refusal::InvalidGateway("x".into()),
            Refusal::AlreadyRegistered(name()),
            Refusal::UnknownPresets { unknown: vec!["x".into()], known: vec!["npm".into()] },
            Refusal::UnreadablePresetsDir { path: "/p".into(), error: "gone".into() },
            Refusal::PresetsOnOpenShell { name: name(), gateway: "nemoclaw".into() },
            Refusal::GatewayNotHealthy { gateway: "nemoclaw".into(), detail: "down".into() },
            Refusal::NotRegistered { name: name(), registry: "/r".into() },
            Refusal::ForeignGateway { name: name(), gateway: "a".into(), active: "b".into() },
            Refusal::CouldNotConfirm { name: name(), detail: "?".into() },
        ];
        for r in refusals {
            let what = format!("{r:?}");
            let e = CliError::from(r);
            let last = e.hints.last().unwrap_or_else(|| panic!("{what}: no hint"));
            assert!(last.contains('`'), "{what}: the last hint names no command: {last}");
            assert_ne!(e.exit, Exit::Ok, "{what}");
        }
    }

    #[test]
    fn busy_names_the_holder_and_recover() {
        let e = CliError::from(EngineError::Busy {
            key: "k".into(),
            lock_path: "/l".into(),
            holder: Some(Box::new(HolderRecord {
                lock_key: "k".into(),
                run_id: Some("r9".into()),
                pid: 42,
                host: "h".into(),
                started_at: 0,
                acquired_at: 0,
            })),
        });
        assert_eq!(e.exit, Exit::Busy);
        assert!(e.message.contains("pid 42 on host h"), "{}", e.message);
        assert!(e.hints[0].contains("nemoclaw journal show r9"));
        assert!(e.hints.last().unwrap().contains("`nemoclaw recover`"));
    }
}
