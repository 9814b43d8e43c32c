//! The rebuild saga: preflight classification, the concrete steps, NemoClaw's messages.
//!
//! `preflight` changes nothing: it loads the entry, resolves its gateway binding and classifies
//! the sandbox. Its [`Decision`] picks the plan (normal or stale) or a refusal. The plan runs on
//! the generic engine; [`Resolver`] rebuilds it from the journaled params for `recover`.

pub mod damaged;
pub mod data;
pub mod files;
pub mod messages;
pub mod saga;
pub mod snapshot;
pub mod steps;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::engine::runner::{PlanError, PlanResolver};
use crate::engine::{decode, Plan, Step};
use crate::gateway::{Gateway, Liveness, Unhealthy};
use crate::host::registry::{self, Binding};
use crate::host::{shields, HostError};
use crate::journal::runs::RunRecord;
use crate::names::SandboxName;
use data::{Evidence, PriorPolicy, RebuildParams, SnapshotOutput};
use steps::Rebuild;

/// Name of the rebuild plan in the journal.
pub const PLAN_NAME: &str = "rebuild";

/// Image used for a recreate when `NEMOCLAW_SANDBOX_IMAGE` is not set.
pub const DEFAULT_IMAGE: &str = "openshell/sandbox-base:latest";

/// Normal rebuild or stale recovery (journaled as `normal` / `stale`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The sandbox is live: backup → replace → restore.
    Normal,
    /// The sandbox is registered but proved gone: recreate from the registry metadata.
    Stale,
}

impl Mode {
    /// Journaled spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Stale => "stale",
        }
    }

    /// Parse the journaled spelling.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "normal" => Some(Mode::Normal),
            "stale" => Some(Mode::Stale),
            _ => None,
        }
    }
}

/// What preflight decided.
#[derive(Debug)]
pub enum Decision {
    /// Go ahead in this mode.
    Proceed(Mode),
    /// Refuse: these lines, in order (the first is the error, the rest follow-up lines).
    Refuse(Vec<String>),
}

/// Everything preflight learned. Nothing was changed to learn it.
pub struct Preflight {
    /// The sandbox.
    pub name: SandboxName,
    /// Its registry entry, verbatim.
    pub entry: Value,
    /// Its gateway binding.
    pub binding: Binding,
    /// The gateway driver.
    pub gateway: Arc<dyn Gateway>,
    /// The classification.
    pub liveness: Liveness,
    /// Whether shields are up.
    pub shields_locked: bool,
    /// The decision.
    pub decision: Decision,
}

/// Errors before a run starts.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// Host files.
    #[error(transparent)]
    Host(#[from] HostError),
    /// Gateway driver could not be opened.
    #[error(transparent)]
    Gateway(#[from] crate::gateway::GatewayError),
    /// No such sandbox in the registry.
    #[error("sandbox '{0}' does not exist in the registry")]
    NotRegistered(String),
}

impl crate::exit::ExitCoded for PreflightError {
    fn exit(&self) -> crate::exit::Exit {
        match self {
            PreflightError::Host(e) => e.exit(),
            PreflightError::Gateway(e) => e.exit(),
            PreflightError::NotRegistered(_) => crate::exit::Exit::Refused,
        }
    }
}

/// Load, resolve, classify. Changes nothing.
pub fn preflight(
    home: &Path,
    name: &SandboxName,
    openshell: Option<&Path>,
) -> Result<Preflight, PreflightError> {
    let reg = registry::Registry::load(home)?;
    let entry =
        reg.entry(name).cloned().ok_or_else(|| PreflightError::NotRegistered(name.to_string()))?;
    let binding = registry::binding_of(&entry)?;
    // A corrupt shields file or onboard session stops here (exit 65), before anything is
    // touched: the run reads both.
    let shields_locked = shields::ShieldsState::load_strict(home, name)?.locked();
    let session =
        crate::host::session::OnboardSession::load(home)?.filter(|s| s.belongs_to(name.as_str()));
    let dockerfile = session.as_ref().and_then(|s| s.from_dockerfile()).map(str::to_owned);
    let gateway: Arc<dyn Gateway> =
        Arc::from(crate::gateway::open(home, binding.name(), openshell)?);
    let liveness = gateway.classify(name);
    let mut decision = decide(name, &binding, &liveness);
    if let (Decision::Proceed(_), Some(d)) = (&decision, &dockerfile) {
        // The recreate builds from this Dockerfile (`--from`): it must be there before the
        // old sandbox is deleted.
        if !Path::new(d).is_file() {
            decision = Decision::Refuse(vec![
                format!("Sandbox '{name}' was built from the Dockerfile {d}, which does not exist, so it could not be recreated."),
                "  Restore the Dockerfile (or onboard again), then retry.".to_owned(),
                messages::ENTRY_PRESERVED.to_owned(),
            ]);
        }
    }
    if let (Decision::Proceed(_), Some(p)) =
        (&decision, entry.get("provider").and_then(Value::as_str))
    {
        // The replacement is created with the old sandbox's provider (`--provider`): it must
        // be on the gateway. nemoclaw never creates providers, so the credential named by the
        // onboard session matters only to the person who creates it.
        let missing = |why: String| {
            let cred = session.as_ref().and_then(|s| s.credential_env()).map(|v| {
                let set = std::env::var_os(v).is_some_and(|x| !x.is_empty());
                format!(
                    "  Its credential comes from ${v}, which is {} in this environment.",
                    if set { "set" } else { "NOT set" }
                )
            });
            let mut lines = vec![format!(
                "Sandbox '{name}' uses the provider '{p}', {why}, so it could not be recreated."
            )];
            lines.extend(cred);
            lines.push(format!("  Create it (`openshell provider create --name {p} --type <type> --credential <KEY> -g {}`), then retry.", binding.name()));
            lines.push(messages::ENTRY_PRESERVED.to_owned());
            Decision::Refuse(lines)
        };
        match gateway.provider_exists(p) {
            Ok(Some(true)) | Ok(None) => {}
            Ok(Some(false)) => {
                decision = missing(format!("which is not on gateway '{}'", binding.name()))
            }
            Err(e) => decision = missing(format!("which could not be checked ({e})")),
        }
    }
    if matches!(decision, Decision::Proceed(Mode::Normal)) {
        // Never delete what cannot be recreated: the replacement is created with the live
        // policy, so a gateway that keeps whole policies must be able to say what it is.
        if let Err(e) = gateway.live_policy(name) {
            decision = Decision::Refuse(vec![
                format!("Cannot read the live policy of '{name}', so its replacement could not enforce it."),
                format!("  {e}"),
                messages::ENTRY_PRESERVED.to_owned(),
            ]);
        }
    }
    Ok(Preflight {
        name: name.clone(),
        entry,
        binding,
        gateway,
        liveness,
        shields_locked,
        decision,
    })
}

/// The decision table of spec §3.1.
pub fn decide(name: &SandboxName, binding: &Binding, live: &Liveness) -> Decision {
    let n = name.as_str();
    match live {
        Liveness::Present(_) => Decision::Proceed(Mode::Normal),
        Liveness::Missing => Decision::Proceed(Mode::Stale),
        Liveness::Unhealthy { reason: Unhealthy::Foreign, active, .. } => {
            let active = active.clone().unwrap_or_else(|| "unknown".to_owned());
            Decision::Refuse(vec![
                messages::foreign_gateway(n, binding.name(), &active),
                messages::SWITCH_AND_RETRY.to_owned(),
                format!("  {}", messages::select_cmd(binding.name())),
            ])
        }
        Liveness::Unhealthy { detail, .. } | Liveness::Unknown { detail } => {
            Decision::Refuse(vec![
                messages::could_not_confirm(n),
                format!("  {detail}"),
                messages::ENTRY_PRESERVED.to_owned(),
            ])
        }
    }
}

/// The image a recreate uses.
pub fn current_image() -> String {
    std::env::var("NEMOCLAW_SANDBOX_IMAGE")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_IMAGE.to_owned())
}

/// How long a delete may take to be confirmed.
pub fn delete_timeout() -> Duration {
    Duration::from_millis(
        std::env::var("NEMOCLAW_DELETE_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(120_000),
    )
}

/// The runner-lock key of a sandbox: one runner per gateway + sandbox.
pub fn lock_key(binding: &str, name: &SandboxName) -> String {
    format!("{binding}/{name}")
}

/// Params journaled with a new run: enough to rebuild the plan in another process.
pub fn params(pf: &Preflight, mode: Mode, now_ms: i64) -> RebuildParams {
    let gateway = pf.binding.name().to_owned();
    let evidence = match &pf.liveness {
        Liveness::Present(s) => Evidence {
            gateway: gateway.clone(),
            status: "present".to_owned(),
            id: Some(s.id.clone()),
            phase: Some(s.phase.clone()),
        },
        Liveness::Missing => Evidence {
            gateway: gateway.clone(),
            status: "missing".to_owned(),
            id: None,
            phase: None,
        },
        other => Evidence {
            gateway: gateway.clone(),
            status: format!("{other:?}"),
            id: None,
            phase: None,
        },
    };
    RebuildParams {
        sandbox: pf.name.clone(),
        gateway,
        mode,
        image: current_image(),
        backup_ts: crate::host::backup::backup_timestamp(now_ms),
        shields_locked: pf.shields_locked,
        evidence: Some(evidence),
        prior_policy: None,
    }
}

/// The last policy a succeeded run of `name` captured or created the sandbox with: the run id
/// and its snapshot digest, for a stale recovery to recreate with exactly that policy (the
/// journal is the only record of it once the sandbox is gone). `None` when no run has one, or
/// the journal cannot be read (the stale recovery then falls back to the registry's presets).
pub fn prior_policy(home: &Path, name: &SandboxName) -> Option<PriorPolicy> {
    let j = crate::journal::Journal::open_readonly(&home.join(crate::journal::store::FILE_NAME))
        .ok()??;
    let filter = crate::journal::audit::RunFilter {
        sandbox: Some(name.as_str().to_owned()),
        state: Some("succeeded".to_owned()),
        ..Default::default()
    };
    let mut runs = Vec::new();
    crate::journal::audit::list_runs(&j, &filter, |r| {
        runs.push(r.id);
        Ok(())
    })
    .ok()?;
    // Newest first: UUID v7 ids sort by creation time.
    runs.sort();
    for id in runs.iter().rev() {
        let steps = crate::journal::runs::steps(j.conn(), id).ok()?;
        let Some(out) = steps.iter().find(|s| s.name == "snapshot").and_then(|s| s.output.as_ref())
        else {
            continue;
        };
        // An older run's output that does not decode names no policy this recovery could
        // check; the search goes on to the run before it.
        match decode::<SnapshotOutput>("output of step `snapshot`", out) {
            Ok(o) if o.policy_sha256.is_some() => {
                return Some(PriorPolicy { run: id.clone(), snapshot_sha256: o.snapshot_sha256 })
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("run {id}: {e}"),
        }
    }
    None
}

/// Build the plan for a mode. `shields_locked` decides whether `shields_down` is in it.
pub fn plan(rb: Arc<Rebuild>, shields_locked: bool) -> Plan {
    let mut steps: Vec<Box<dyn Step>> = vec![Box::new(steps::SnapshotStep(rb.clone()))];
    if rb.mode == Mode::Normal {
        if shields_locked {
            steps.push(Box::new(steps::ShieldsDownStep(rb.clone())));
        }
        steps.push(Box::new(steps::BackupStep(rb.clone())));
    }
    steps.push(Box::new(steps::RemoveStep(rb.clone())));
    steps.push(Box::new(steps::OnboardStep(rb.clone())));
    if rb.mode == Mode::Normal {
        steps.push(Box::new(steps::RestoreStep(rb.clone())));
    }
    steps.push(Box::new(steps::PoliciesStep(rb.clone())));
    steps.push(Box::new(steps::ShieldsStep(rb)));
    Plan { name: PLAN_NAME.to_owned(), steps }
}

/// Rebuilds the rebuild plan of a journaled run, for `recover`.
pub struct Resolver {
    /// NemoClaw home.
    pub home: PathBuf,
    /// `--openshell`, when given.
    pub openshell: Option<PathBuf>,
    /// See [`Rebuild::onboard_attempted`].
    pub onboard_attempted: bool,
    /// `recover --rollback --accept-damaged-backup` (see [`Rebuild::accept_damaged_backup`]).
    pub accept_damaged_backup: bool,
}

impl PlanResolver for Resolver {
    fn plan_for(&self, run: &RunRecord) -> Result<Plan, PlanError> {
        if run.plan != PLAN_NAME {
            return Err(PlanError::Unknown);
        }
        let params: RebuildParams = decode("params", &run.params)?;
        let gw: Arc<dyn Gateway> = Arc::from(
            crate::gateway::open(&self.home, &params.gateway, self.openshell.as_deref()).map_err(
                |e| {
                    use crate::exit::ExitCoded;
                    PlanError::Unavailable { message: e.to_string(), exit: e.exit() }
                },
            )?,
        );
        let locked = params.shields_locked;
        let mut rb = Rebuild::new(&self.home, params, gw);
        rb.onboard_attempted = self.onboard_attempted;
        rb.accept_damaged_backup = self.accept_damaged_backup;
        Ok(plan(Arc::new(rb), locked))
    }
}
