//! `onboard`, `list`, and `nemoclaw <name> status|shields|destroy`.
//!
//! Every handler validates the sandbox name before any path or command is built, reads host
//! files through `crate::host` (corrupt files are reported, never overwritten) and reaches live
//! sandboxes only through a `Gateway` scoped to the entry's recorded binding.

use std::io::IsTerminal;
use std::time::Duration;

use serde_json::{json, Value};

use super::args::{OnboardArgs, SandboxAction, SandboxCli, ShieldsAction};
use super::style::Cell;
use super::{CliError, CmdResult, Ctx, Refusal};

use crate::exit::Exit;
use crate::gateway::{self, CreateSpec, Gateway, Liveness, PolicySpec, Unhealthy};
use crate::host::{
    self, binding_of, registry, shields, Binding, HostError, Registry, ShieldsState,
};
use crate::names::SandboxName;
use crate::rebuild::messages;

/// How long `destroy` waits for the gateway to confirm a deletion.
const DELETE_TIMEOUT: Duration = Duration::from_secs(120);

/// The gateway binding onboard uses when none is given: `local` unless an `openshell` binary is
/// available (`--openshell` / `NEMOCLAW_OPENSHELL`, or on PATH), then `nemoclaw`.
fn default_binding(ctx: &Ctx) -> Binding {
    if ctx.global.openshell.is_some() || gateway::openshell::find_on_path().is_some() {
        Binding::OpenShell("nemoclaw".to_owned())
    } else {
        Binding::Local
    }
}

fn open_gateway(ctx: &Ctx, binding: &Binding) -> Result<Box<dyn Gateway>, CliError> {
    crate::host::mkdir_private(&ctx.home)
        .map_err(|e| HostError::io("cannot create", &ctx.home, e))?;
    Ok(gateway::open(&ctx.home, binding.name(), ctx.global.openshell.as_deref())?)
}

/// Files a freshly onboarded sandbox starts with (its `/sandbox/.openclaw`).
fn sample_state(dir: &std::path::Path, name: &SandboxName, agent: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir.join("workspace"))?;
    std::fs::create_dir_all(dir.join("memory"))?;
    std::fs::write(dir.join("workspace/AGENTS.md"), format!("# {name}\n\nAgent: {agent}\n"))?;
    std::fs::write(dir.join("workspace/USER.md"), "# User\n\nNotes the agent keeps about you.\n")?;
    std::fs::write(dir.join("memory/MEMORY.md"), "# Memory\n")?;
    std::fs::write(dir.join("openclaw.json"), format!("{{\n  \"agent\": \"{agent}\"\n}}\n"))?;
    Ok(())
}

/// NemoClaw's policy presets (`nemoclaw-blueprint/policies/presets/<name>.yaml`), the names
/// `onboard --policy` accepts when no presets directory is given.
const NEMOCLAW_PRESETS: &[&str] = &[
    "apt",
    "brew",
    "cargo",
    "claude-code",
    "clawmetry",
    "discord",
    "docker",
    "duckduckgo",
    "firecrawl",
    "gemini",
    "ghcr",
    "github",
    "gmail",
    "go",
    "goldrush",
    "grafana",
    "heygen",
    "huggingface",
    "jira",
    "local-inference",
    "microsoft-teams",
    "mnemo-cortex",
    "nous-browser",
    "npm",
    "observability-otlp-local",
    "ollama",
    "otel-collector",
    "outlook",
    "prometheus",
    "pypi",
    "qdrant",
    "shrike-security",
    "sidclaw",
    "signal",
    "slack",
    "tavily",
    "telegram",
    "weather",
    "whatsapp",
];

/// The presets `onboard` knows: the `*.yaml` files of `--policy-presets DIR` when given (a
/// directory that cannot be read is refused, never silently replaced by the built-in list),
/// else NemoClaw's own list.
fn known_presets(ctx: &Ctx) -> Result<Vec<String>, CliError> {
    let Some(path) = &ctx.global.policy_presets else {
        return Ok(NEMOCLAW_PRESETS.iter().map(|s| (*s).to_owned()).collect());
    };
    let unreadable = |e: std::io::Error| Refusal::UnreadablePresetsDir {
        path: path.clone(),
        error: e.to_string(),
    };
    let mut names = Vec::new();
    for e in std::fs::read_dir(path).map_err(unreadable)? {
        let e = e.map_err(unreadable)?;
        if let Some(n) = e.file_name().to_str().and_then(|n| n.strip_suffix(".yaml")) {
            names.push(n.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Everything `onboard` checks before it creates anything: the name, no unfinished run, the
/// binding, not registered yet, presets it knows and can apply.
fn onboard_preflight(ctx: &Ctx, a: &OnboardArgs) -> Result<(SandboxName, Binding), CliError> {
    let name = super::parse_name(&a.name)?;
    super::rebuild_cmd::refuse_if_unfinished(ctx, &name, "onboard")?;
    let binding = match &a.gateway {
        Some(g) => Binding::parse(g).ok_or_else(|| Refusal::InvalidGateway(g.clone()))?,
        None => default_binding(ctx),
    };
    if Registry::load(&ctx.home)?.entry(&name).is_some() {
        return Err(Refusal::AlreadyRegistered(name).into());
    }
    let known = known_presets(ctx)?;
    let unknown: Vec<String> = a.policies.iter().filter(|p| !known.contains(p)).cloned().collect();
    if !unknown.is_empty() {
        return Err(Refusal::UnknownPresets { unknown, known }.into());
    }
    if binding.name() != "local" && !a.policies.is_empty() {
        // OpenShell takes whole policies only (`policy set` replaces everything and refuses a
        // NemoClaw preset file); NemoClaw's merge of presets into the live policy is not
        // implemented here, so refuse before anything is created rather than half-apply.
        return Err(Refusal::PresetsOnOpenShell { name, gateway: binding.to_string() }.into());
    }
    Ok((name, binding))
}

/// `nemoclaw onboard`: check → create → seed, apply presets, register (undoing the create if
/// that fails) → print.
pub fn onboard(ctx: &Ctx, a: OnboardArgs) -> CmdResult {
    let (name, binding) = onboard_preflight(ctx, &a)?;
    let p = &ctx.printer;
    let gw = open_gateway(ctx, &binding)?;
    if let Some(bad) = gw.health() {
        return Err(Refusal::GatewayNotHealthy {
            gateway: binding.to_string(),
            detail: gateway::openshell::describe(&bad),
        }
        .into());
    }
    let image = a
        .image
        .clone()
        .unwrap_or_else(|| format!("openshell/sandbox-from:{}", crate::util::now_ms() / 1000));
    let spec = CreateSpec {
        name: name.clone(),
        image: image.clone(),
        labels: [("nemoclaw-sandbox".to_owned(), name.to_string())].into(),
        agent: a.agent.clone(),
        gpu: false,
        policy: None,
        providers: Vec::new(),
    };
    p.info(format!("Creating sandbox '{name}' on gateway '{binding}'..."));
    let live = gw.create(&spec)?;
    // From here on a failure must not leave an unregistered sandbox behind: undo the create.
    let entry = match finish_onboard(ctx, gw.as_ref(), &name, &binding, &a, &image) {
        Ok(e) => e,
        Err(e) => {
            p.warn(format!("Onboarding failed; removing the half-created sandbox '{name}'..."));
            if let Err(undo) = gw.delete(&name, DELETE_TIMEOUT) {
                p.warn(format!("Could not remove it: {undo}"));
            }
            return Err(e);
        }
    };
    if p.json {
        p.json_doc("onboard", json!({"name": name.as_str(), "gateway": binding.name(), "sandbox": live, "entry": entry}));
    } else {
        p.success(format!("✓ Sandbox '{name}' created on gateway '{binding}'"));
        p.hint(format!("check it with `nemoclaw {name} status`"));
    }
    Ok(Exit::Ok)
}

/// After the create: the sample files, the presets, then the registry entry.
fn finish_onboard(
    ctx: &Ctx,
    gw: &dyn Gateway,
    name: &SandboxName,
    binding: &Binding,
    a: &OnboardArgs,
    image: &str,
) -> Result<Value, CliError> {
    let agent = a.agent.as_deref().unwrap_or("openclaw");
    let staging = ctx.home.join(format!(".onboard-{}", uuid::Uuid::now_v7()));
    let seeded = sample_state(&staging, name, agent)
        .map_err(|e| CliError::from(HostError::io("cannot write", &staging, e)))
        .and_then(|_| gw.upload_state(name, &staging).map_err(CliError::from));
    let _ = std::fs::remove_dir_all(&staging);
    seeded?;
    for preset in &a.policies {
        ctx.printer.info(format!("Applying policy preset '{preset}'..."));
        gw.apply_policy(name, &PolicySpec::Preset { name: preset.clone() })?;
    }
    let entry = registry::NewEntry {
        name,
        binding,
        model: a.model.as_deref(),
        provider: a.provider.as_deref(),
        agent: a.agent.as_deref(),
        policies: &a.policies,
        image,
    }
    .to_value(crate::util::now_ms());
    registry::register_new(&ctx.home, name, entry.clone())?;
    Ok(entry)
}

/// `nemoclaw list`.
pub fn list(ctx: &Ctx) -> CmdResult {
    let reg = Registry::load(&ctx.home)?;
    let p = &ctx.printer;
    let default = reg.default_sandbox().map(str::to_owned);
    let mut rows = Vec::new();
    for (name, entry) in reg.entries() {
        let gateway = binding_of(entry)
            .map(|b| b.name().to_owned())
            .unwrap_or_else(|_| "(invalid)".to_owned());
        let shields = SandboxName::parse(name)
            .ok()
            .and_then(|n| ShieldsState::load(&ctx.home, &n).ok())
            .map(|s| shields_word(&s))
            .unwrap_or("unknown");
        rows.push(json!({
            "name": name,
            "default": default.as_deref() == Some(name),
            "gateway": gateway,
            "model": entry.get("model").cloned().unwrap_or(Value::Null),
            "provider": entry.get("provider").cloned().unwrap_or(Value::Null),
            "createdAt": entry.get("createdAt").cloned().unwrap_or(Value::Null),
            "shields": shields,
        }));
    }
    if p.json {
        p.json_doc("list", json!({"default": default, "sandboxes": rows}));
        return Ok(Exit::Ok);
    }
    if rows.is_empty() {
        p.info("No sandboxes registered.");
        p.hint("create one with `nemoclaw onboard <name>`");
        return Ok(Exit::Ok);
    }
    let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let cells = rows
        .iter()
        .map(|r| {
            let mark = if r["default"] == true { "*" } else { " " };
            vec![
                format!("{mark} {}", s(&r["name"])).into(),
                s(&r["gateway"]).into(),
                s(&r["shields"]).into(),
                s(&r["model"]).into(),
            ]
        })
        .collect();
    p.table("", &["  NAME", "GATEWAY", "SHIELDS", "MODEL"], cells);
    p.progress("* = default sandbox");
    Ok(Exit::Ok)
}

fn shields_word(s: &ShieldsState) -> &'static str {
    match (s.exists(), s.corrupt.is_some(), s.locked()) {
        (false, _, _) => "none",
        (true, true, _) => "corrupt",
        (true, false, true) => "up",
        (true, false, false) => "down",
    }
}

/// `nemoclaw <name> <action>`.
pub fn dispatch(ctx: &Ctx, sc: SandboxCli) -> CmdResult {
    let name = super::parse_name(&sc.name)?;
    match sc.action {
        // rebuild makes its own, stricter check (it refuses).
        SandboxAction::Rebuild(a) => super::rebuild_cmd::rebuild(ctx, &sc.name, a),
        SandboxAction::Status { .. } => {
            super::rebuild_cmd::warn_unfinished(ctx, &name);
            status(ctx, &name)
        }
        // A shields change during a live or unfinished run would be undone silently when the
        // run re-locks (or clears) the shields at its end: refused, naming the next command.
        SandboxAction::Shields { action: ShieldsAction::Status } => {
            super::rebuild_cmd::warn_unfinished(ctx, &name);
            shields_cmd(ctx, &name, ShieldsAction::Status)
        }
        SandboxAction::Shields { action } => {
            let what = match action {
                ShieldsAction::Up => "shields up",
                _ => "shields down",
            };
            super::rebuild_cmd::refuse_if_unfinished(ctx, &name, what)?;
            shields_cmd(ctx, &name, action)
        }
        SandboxAction::Destroy { yes, .. } => {
            super::rebuild_cmd::refuse_if_unfinished(ctx, &name, "destroy")?;
            destroy(ctx, &name, yes)
        }
    }
}

fn registered(reg: &Registry, name: &SandboxName) -> Result<Value, CliError> {
    reg.entry(name).cloned().ok_or_else(|| {
        Refusal::NotRegistered { name: name.clone(), registry: reg.path().to_owned() }.into()
    })
}

fn classify(ctx: &Ctx, binding: &Binding, name: &SandboxName) -> Liveness {
    match open_gateway(ctx, binding) {
        Ok(gw) => gw.classify(name),
        Err(e) => Liveness::Unknown { detail: e.message },
    }
}

fn status(ctx: &Ctx, name: &SandboxName) -> CmdResult {
    let reg = Registry::load(&ctx.home)?;
    let entry = registered(&reg, name)?;
    let binding = binding_of(&entry)?;
    let is_default = reg.default_sandbox() == Some(name.as_str());
    let sh = ShieldsState::load(&ctx.home, name)?;
    let live = classify(ctx, &binding, name);
    let p = &ctx.printer;
    if p.json {
        p.json_doc(
            "status",
            json!({
                "name": name.as_str(),
                "default": is_default,
                "gateway": binding.name(),
                "entry": entry,
                "live": live,
                "shields": {"state": shields_word(&sh), "locked": sh.locked(), "corrupt": sh.corrupt},
            }),
        );
        return Ok(Exit::Ok);
    }
    p.data(p.bold(&format!("Sandbox: {name}{}", if is_default { " (default)" } else { "" })));
    p.table("  ", &[], status_rows(&entry, &binding, &sh, &live));
    if let Some(why) = &sh.corrupt {
        p.warn(format!(
            "the shields file {} is corrupt ({why}); it counts as locked.",
            sh.path.display()
        ));
    }
    advise_on_liveness(p, name, &binding, &live);
    Ok(Exit::Ok)
}

/// The key/value lines of `status`.
fn status_rows(
    entry: &Value,
    binding: &Binding,
    sh: &ShieldsState,
    live: &Liveness,
) -> Vec<Vec<Cell>> {
    let field = |k: &str| entry.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
    let policies: Vec<&str> = entry
        .get("policies")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let custom = entry.get("customPolicies").and_then(Value::as_array).map(Vec::len).unwrap_or(0);
    let pol = if policies.is_empty() { "-".to_owned() } else { policies.join(", ") };
    let pol = if custom > 0 { format!("{pol} (+{custom} custom)") } else { pol };
    let live_word = match live {
        Liveness::Present(s) => format!("present (id {}, phase {})", s.id, s.phase),
        Liveness::Missing => "missing".to_owned(),
        Liveness::Unhealthy { reason, detail, .. } => {
            format!("unknown — gateway unhealthy ({reason:?}): {detail}")
        }
        Liveness::Unknown { detail } => format!("unknown — {detail}"),
    };
    let agent = entry.get("agent").and_then(Value::as_str).unwrap_or("openclaw");
    [
        ("Gateway:", binding.to_string()),
        ("Model:", field("model")),
        ("Provider:", field("provider")),
        ("Agent:", agent.to_owned()),
        ("Image:", field("imageTag")),
        ("Created:", field("createdAt")),
        ("Policies:", pol),
        ("Shields:", shields_word(sh).to_owned()),
        ("Live:", live_word),
    ]
    .into_iter()
    .map(|(k, v)| vec![k.into(), v.into()])
    .collect()
}

/// What `status` says after the table when the sandbox is not plainly present, in NemoClaw's
/// words where it has them.
fn advise_on_liveness(p: &super::Printer, name: &SandboxName, binding: &Binding, live: &Liveness) {
    let n = name.as_str();
    match live {
        Liveness::Present(_) => {}
        Liveness::Missing => {
            p.warn(messages::missing_from_gateway(n, binding.name()));
            p.info(messages::ENTRY_PRESERVED);
            p.hint(format!(
                "recreate it from the preserved registry metadata with `nemoclaw {name} rebuild --yes`"
            ));
        }
        Liveness::Unhealthy { reason: Unhealthy::Foreign, active: Some(active), .. } => {
            p.warn(messages::foreign_gateway(n, binding.name(), active));
            p.info(messages::SWITCH_AND_RETRY);
            p.hint(format!("`{}`", messages::select_cmd(binding.name())));
        }
        _ => {
            p.warn(messages::could_not_confirm(n));
            p.info(messages::ENTRY_PRESERVED);
            p.hint(format!("check the gateway, then run `nemoclaw {name} status` again"));
        }
    }
}

fn shields_cmd(ctx: &Ctx, name: &SandboxName, action: ShieldsAction) -> CmdResult {
    let p = &ctx.printer;
    match action {
        ShieldsAction::Status => {
            let s = ShieldsState::load_strict(&ctx.home, name)?;
            if p.json {
                p.json_doc(
                    "shields.status",
                    json!({"name": name.as_str(), "state": shields_word(&s), "locked": s.locked(), "file": s.doc}),
                );
            } else {
                let line = match shields_word(&s) {
                    "up" => format!("Shields are UP for '{name}' (locked)."),
                    "down" => format!(
                        "Shields are DOWN for '{name}'{}.",
                        s.reason().map(|r| format!(" (reason: {r})")).unwrap_or_default()
                    ),
                    _ => format!("Shields were never raised for '{name}' (mutable)."),
                };
                p.data(line);
            }
            Ok(Exit::Ok)
        }
        ShieldsAction::Up => {
            registered(&Registry::load(&ctx.home)?, name)?;
            shields::raise(&ctx.home, name)?;
            report_shields(ctx, name, "up")
        }
        ShieldsAction::Down { reason } => {
            registered(&Registry::load(&ctx.home)?, name)?;
            shields::lower(&ctx.home, name, reason.as_deref())?;
            report_shields(ctx, name, "down")
        }
    }
}

fn report_shields(ctx: &Ctx, name: &SandboxName, word: &str) -> CmdResult {
    let p = &ctx.printer;
    if p.json {
        p.json_doc(
            &format!("shields.{word}"),
            json!({"name": name.as_str(), "state": word, "locked": word == "up"}),
        );
    } else {
        p.success(format!("✓ Shields {word} for '{name}'"));
    }
    Ok(Exit::Ok)
}

/// The refusal for a sandbox whose live state could not be confirmed, in NemoClaw's words.
fn refusal(name: &SandboxName, binding: &Binding, live: &Liveness) -> CliError {
    match live {
        Liveness::Unhealthy { reason: Unhealthy::Foreign, active: Some(active), .. } => {
            Refusal::ForeignGateway {
                name: name.clone(),
                gateway: binding.to_string(),
                active: active.clone(),
            }
        }
        other => Refusal::CouldNotConfirm {
            name: name.clone(),
            detail: gateway::openshell::describe(other),
        },
    }
    .into()
}

fn destroy(ctx: &Ctx, name: &SandboxName, yes: bool) -> CmdResult {
    let p = &ctx.printer;
    let reg = Registry::load(&ctx.home)?;
    let entry = registered(&reg, name)?;
    let binding = binding_of(&entry)?;
    let gw = open_gateway(ctx, &binding)?;
    // Classify before asking: the question must describe what will really happen.
    let live = gw.classify(name);
    let plan = match &live {
        Liveness::Present(_) => {
            format!("delete sandbox '{name}' on gateway '{binding}' and remove its registry entry")
        }
        Liveness::Missing => format!(
            "remove the registry entry of '{name}' (it is already absent from gateway '{binding}')"
        ),
        other => return Err(refusal(name, &binding, other)),
    };
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(Refusal::NeedsConfirmation {
                what: format!("destroy of '{name}'"),
                yes: format!("nemoclaw {name} destroy --yes"),
            }
            .into());
        }
        if !p.confirm(&format!("This will {plan}. Continue?")) {
            return Ok(Exit::Refused);
        }
    }
    if matches!(live, Liveness::Present(_)) {
        p.info(format!("Deleting sandbox '{name}'..."));
        gw.delete(name, DELETE_TIMEOUT)?;
    }
    // Registry row only after the gateway confirmed absence: a crash in between leaves a
    // registered-but-missing sandbox, which `status` explains and `rebuild` can recover.
    registry::update(&ctx.home, |reg| {
        reg.remove_entry(name);
        Ok(())
    })?;
    host::shields::clear(&ctx.home, name)?;
    if p.json {
        p.json_doc(
            "destroy",
            json!({"name": name.as_str(), "gateway": binding.name(), "deleted": true}),
        );
    } else {
        p.success(format!("✓ Sandbox '{name}' destroyed"));
        p.info("Backups under rebuild-backups/ were kept.");
    }
    Ok(Exit::Ok)
}
