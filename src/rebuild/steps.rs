//! The concrete rebuild steps. Each has a real probe, an idempotent apply and an idempotent
//! compensate (spec §4.1). They share one [`Rebuild`] and read each other's journaled outputs
//! as the types in [`super::data`].
//!
//! Order: snapshot → \[shields_down\] → \[backup\] → remove → onboard → \[restore\] → policies →
//! shields (brackets: normal mode only).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::data::{
    encode, BackupOutput, Evidence, OnboardOutput, PoliciesOutput, PriorPolicy, RebuildParams,
    RemoveOutput, RestoreOutput, ShieldsDownOutput, ShieldsOutput, SnapshotOutput,
};
use super::snapshot::{self, Snapshot};
use super::{messages, Mode};
use crate::engine::crash::{self, CrashPoint};
use crate::engine::{decode, DataError, Probe, Step, StepCtx, StepError};
use crate::gateway::{
    CheckedUpload, CreateSpec, Gateway, GatewayError, LiveSandbox, Liveness, PolicySpec,
};
use crate::host::backup::{self, Backup, BackupMeta, Node};
use crate::host::{registry, shields, HostError};
use crate::names::SandboxName;

/// Label put on a replacement sandbox so a retried create can adopt it, and only it.
pub const RUN_LABEL: &str = "rebuild-run";

/// One rebuild of one sandbox, as every step of its run sees it: the host and gateway it works
/// on, the run's journaled params, and what this process was told about the run.
pub struct Rebuild {
    /// NemoClaw home.
    pub home: PathBuf,
    /// The sandbox.
    pub name: SandboxName,
    /// Its recorded gateway.
    pub gateway: Arc<dyn Gateway>,
    /// Normal or stale.
    pub mode: Mode,
    /// Image for the recreate.
    pub image: String,
    /// Stale mode: the earlier run whose snapshot holds the sandbox's last policy, from the
    /// journaled params.
    pub prior_policy: Option<PriorPolicy>,
    /// Backup directory name (fixed at run creation so a retried backup lands in the same place).
    pub backup_ts: String,
    /// Preflight's classification, from the journaled params: `remove` deletes only the
    /// sandbox with this id.
    pub evidence: Option<Evidence>,
    /// How long to wait for a delete to be confirmed.
    pub delete_timeout: Duration,
    /// The run's `onboard` step was attempted (its journaled state is past `pending`). A stale
    /// rollback then puts the entry back with `imageTag: null`: the recorded image was tried
    /// and cannot be trusted to produce a sandbox.
    pub onboard_attempted: bool,
    /// `recover --rollback --accept-damaged-backup`: a rollback whose backup fails
    /// verification finishes without restoring it (the registry row comes back, the sandbox
    /// stays absent) instead of stopping. A backup that verifies is restored regardless.
    pub accept_damaged_backup: bool,
}

impl Rebuild {
    /// The rebuild a run's params describe, on `gateway` (nothing attempted, nothing accepted).
    pub fn new(home: &Path, params: RebuildParams, gateway: Arc<dyn Gateway>) -> Self {
        Rebuild {
            home: home.to_path_buf(),
            name: params.sandbox,
            gateway,
            mode: params.mode,
            image: params.image,
            prior_policy: params.prior_policy,
            backup_ts: params.backup_ts,
            evidence: params.evidence,
            delete_timeout: super::delete_timeout(),
            onboard_attempted: false,
            accept_damaged_backup: false,
        }
    }

    fn backup_path(&self) -> PathBuf {
        backup::backups_dir(&self.home, &self.name).join(&self.backup_ts)
    }

    /// The journaled id of the sandbox preflight saw, if it saw one.
    fn evidence_id(&self) -> Option<&str> {
        self.evidence.as_ref().and_then(|e| e.id.as_deref())
    }
}

fn host_err(e: HostError) -> StepError {
    let io = matches!(e, HostError::Io { .. });
    let s = StepError::new(e.to_string());
    if io {
        s.io()
    } else {
        s
    }
}

fn gw_err(e: GatewayError) -> StepError {
    let io = matches!(e, GatewayError::Io { .. });
    let s = StepError::new(e.to_string());
    if io {
        s.io()
    } else {
        s
    }
}

/// Test hook: `NEMOCLAW_STEP_DELAY_MS` makes every step's apply take at least that long, so
/// signal and kill tests can land inside a step. Not an operator knob.
fn test_delay() {
    if let Some(ms) = std::env::var("NEMOCLAW_STEP_DELAY_MS").ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// The snapshot this run took, verified against the journaled digest.
fn snap(rb: &Rebuild, ctx: &StepCtx<'_>) -> Result<Snapshot, StepError> {
    let out: SnapshotOutput = ctx
        .output_as("snapshot")?
        .ok_or_else(|| StepError::new("the snapshot step has no journaled output"))?;
    snapshot::read(&rb.home, ctx.run_id, &out.snapshot_sha256)
}

/// Whether a step's journaled output decodes as `T` (see [`Step::check_output`]).
fn check<T: serde::de::DeserializeOwned>(step: &str, out: &Value) -> Result<(), DataError> {
    decode::<T>(&format!("output of step `{step}`"), out).map(drop)
}

fn unknown_liveness(l: &Liveness) -> Option<String> {
    match l {
        Liveness::Unknown { detail } => Some(detail.clone()),
        Liveness::Unhealthy { detail, .. } => Some(format!("gateway not healthy: {detail}")),
        _ => None,
    }
}

/// Classify the sandbox before acting on it; a gateway that cannot tell fails the step (the run
/// stops `failed`, nothing guessed).
fn confirm(rb: &Rebuild) -> Result<Liveness, StepError> {
    let live = rb.gateway.classify(&rb.name);
    match unknown_liveness(&live) {
        Some(why) => {
            Err(StepError::new(format!("cannot confirm the state of '{}': {why}", rb.name)))
        }
        None => Ok(live),
    }
}

/// The sandbox's classification and whether its registry row exists, for a probe; `Err` is the
/// probe's *unknown* answer when the gateway cannot tell.
fn observe(rb: &Rebuild, what: &str) -> Result<Result<(Liveness, bool), Probe>, StepError> {
    let live = rb.gateway.classify(&rb.name);
    if let Some(why) = unknown_liveness(&live) {
        return Ok(Err(Probe::Unknown(format!(
            "cannot tell whether sandbox '{}' was {what}: {why}",
            rb.name
        ))));
    }
    let row = registry::Registry::load(&rb.home).map_err(host_err)?.entry(&rb.name).is_some();
    Ok(Ok((live, row)))
}

fn carries_run_label(l: &Liveness, run_id: &str) -> bool {
    matches!(l, Liveness::Present(s) if s.labels.get(RUN_LABEL).map(String::as_str) == Some(run_id))
}

// ---------------------------------------------------------------------------------------------

/// Step 1: Record the registry entry verbatim, the default flag, shields files and session.
pub struct SnapshotStep(pub Arc<Rebuild>);

impl SnapshotStep {
    fn take(&self) -> Result<Snapshot, StepError> {
        let rb = &self.0;
        let reg = registry::Registry::load(&rb.home).map_err(host_err)?;
        let entry = reg.entry(&rb.name).cloned().ok_or_else(|| {
            StepError::new(format!("sandbox '{}' is not in the registry", rb.name))
        })?;
        let was_default = reg.default_sandbox() == Some(rb.name.as_str());
        let sh = shields::ShieldsState::load_strict(&rb.home, &rb.name).map_err(host_err)?;
        let text = |b: Option<Vec<u8>>| b.map(|b| String::from_utf8_lossy(&b).into_owned());
        let timer = std::fs::read(shields::timer_path(&rb.home, &rb.name)).ok();
        let session = crate::host::session::OnboardSession::load(&rb.home)
            .map_err(host_err)?
            .filter(|s| s.belongs_to(rb.name.as_str()))
            .map(|s| s.doc);
        Ok(Snapshot {
            entry,
            was_default,
            shields_locked: sh.locked(),
            shields_raw: text(sh.raw),
            shields_timer_raw: text(timer),
            session,
            policy: self.capture_policy()?,
            position: reg.position(&rb.name),
        })
    }

    /// Normal mode: the live policy, read before anything moves. A gateway that keeps whole
    /// policies but cannot say what this one is stops the run here, before the delete: a
    /// replacement with a guessed policy is not the sandbox that was deleted.
    fn capture_policy(&self) -> Result<Option<String>, StepError> {
        let rb = &self.0;
        if rb.mode != Mode::Normal {
            // No live sandbox to read: the last policy a journaled run captured, checked against
            // that run's journaled snapshot digest.
            let Some(prior) = &rb.prior_policy else { return Ok(None) };
            return Ok(snapshot::read(&rb.home, &prior.run, &prior.snapshot_sha256)?.policy);
        }
        rb.gateway.live_policy(&rb.name).map_err(|e| {
            StepError::new(format!("cannot read the live policy of '{}': {e}", rb.name))
                .hint("nothing was changed; fix the gateway and run the rebuild again")
        })
    }

    fn output(&self, snap: &Snapshot, sha: &str, run_id: &str) -> Result<Value, StepError> {
        encode(&SnapshotOutput {
            snapshot_path: snapshot::path(&self.0.home, run_id).display().to_string(),
            snapshot_sha256: sha.to_owned(),
            was_default: snap.was_default,
            shields_locked: snap.shields_locked,
            evidence: self.0.evidence.clone(),
            policy_sha256: snap.policy.as_deref().map(|p| crate::util::sha256_hex(p.as_bytes())),
        })
    }
}

impl Step for SnapshotStep {
    fn name(&self) -> &'static str {
        "snapshot"
    }
    fn probe(&self, ctx: &StepCtx<'_>) -> Result<Probe, StepError> {
        // Nothing on the host changes before this step is done, so a missing or unreadable
        // snapshot file simply means: take it (again).
        Ok(match snapshot::read_unchecked(&self.0.home, ctx.run_id) {
            Some((snap, sha)) => Probe::Done(self.output(&snap, &sha, ctx.run_id)?),
            None => Probe::NotDone,
        })
    }
    fn apply(&self, ctx: &StepCtx<'_>) -> Result<Value, StepError> {
        test_delay();
        let snap = self.take()?;
        let sha = snapshot::write(&self.0.home, ctx.run_id, &snap)?;
        self.output(&snap, &sha, ctx.run_id)
    }
    fn check_output(&self, output: &Value) -> Result<(), DataError> {
        check::<SnapshotOutput>(self.name(), output)
    }
    fn compensate(&self, _ctx: &StepCtx<'_>, _output: Option<&Value>) -> Result<(), StepError> {
        // The snapshot changed nothing; the file stays as part of the run's record.
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

/// Step 2: (normal, only when locked) Unlock shields so the state can be read.
pub struct ShieldsDownStep(pub Arc<Rebuild>);

impl Step for ShieldsDownStep {
    fn name(&self) -> &'static str {
        "shields_down"
    }
    fn probe(&self, _ctx: &StepCtx<'_>) -> Result<Probe, StepError> {
        let sh = shields::ShieldsState::load(&self.0.home, &self.0.name).map_err(host_err)?;
        Ok(if sh.locked() {
            Probe::NotDone
        } else {
            Probe::Done(encode(&ShieldsDownOutput { unlocked: true })?)
        })
    }
    fn apply(&self, ctx: &StepCtx<'_>) -> Result<Value, StepError> {
        test_delay();
        let sh = shields::ShieldsState::load(&self.0.home, &self.0.name).map_err(host_err)?;
        if sh.locked() {
            let reason = format!("nemoclaw rebuild {}", ctx.run_id);
            shields::lower(&self.0.home, &self.0.name, Some(&reason)).map_err(host_err)?;
        }
        encode(&ShieldsDownOutput { unlocked: true })
    }
    fn check_output(&self, output: &Value) -> Result<(), DataError> {
        check::<ShieldsDownOutput>(self.name(), output)
    }
    fn compensate(&self, ctx: &StepCtx<'_>, _output: Option<&Value>) -> Result<(), StepError> {
        let s = snap(&self.0, ctx)?;
        restore_shields(&self.0, &s)
    }
}

fn restore_shields(rb: &Rebuild, s: &Snapshot) -> Result<(), StepError> {
    shields::restore_raw(&rb.home, &rb.name, s.shields_raw.clone().map(String::into_bytes))
        .map_err(host_err)?;
    let timer = shields::timer_path(&rb.home, &rb.name);
    match &s.shields_timer_raw {
        Some(t) => crate::util::atomic_write(&timer, t.as_bytes())
            .map_err(|e| StepError::new(format!("cannot write {}: {e}", timer.display())).io()),
        None => match std::fs::remove_file(&timer) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StepError::new(format!("cannot remove {}: {e}", timer.display())).io()),
        },
    }
}

fn shields_match(rb: &Rebuild, raw: Option<&str>) -> Result<bool, StepError> {
    let sh = shields::ShieldsState::load(&rb.home, &rb.name).map_err(host_err)?;
    Ok(sh.raw.as_deref() == raw.map(str::as_bytes))
}

// ---------------------------------------------------------------------------------------------

/// Step 3: (normal) Copy the live state into a verified backup; commit its manifest.
pub struct BackupStep(pub Arc<Rebuild>);

impl BackupStep {
    fn output(b: &Backup) -> Result<Value, StepError> {
        encode(&BackupOutput {
            backup_path: b.path.display().to_string(),
            manifest_sha256: b.manifest_digest.clone(),
            files: b.manifest.files.len(),
            bytes: b.manifest.files.iter().map(|f| f.size).sum::<u64>(),
        })
    }
}

impl Step for BackupStep {
    fn name(&self) -> &'static str {
        "backup"
    }
    fn probe(&self, _ctx: &StepCtx<'_>) -> Result<Probe, StepError> {
        // Only a complete manifest counts: a half-copied directory is not a backup.
        Ok(match Backup::open(&self.0.backup_path()) {
            Ok(b) => Probe::Done(Self::output(&b)?),
            Err(_) => Probe::NotDone,
        })
    }
    fn apply(&self, ctx: &StepCtx<'_>) -> Result<Value, StepError> {
        test_delay();
        let rb = &self.0;
        let target = rb.backup_path();
        if let Ok(b) = Backup::open(&target) {
            return Self::output(&b);
        }
        // A previous attempt died mid-copy: its directory has no manifest and is nobody's
        // backup, so it is removed and the copy starts again.
        if target.exists() {
            crate::host::fstree::remove_tree(&target).map_err(|e| {
                StepError::new(format!("cannot remove incomplete backup {}: {e}", target.display()))
                    .io()
            })?;
        }
        let s = snap(rb, ctx)?;
        let meta = BackupMeta {
            sandbox: rb.name.clone(),
            agent_type: s.entry.get("agent").and_then(Value::as_str).map(str::to_owned),
            agent_version: s.entry.get("agentVersion").and_then(Value::as_str).map(str::to_owned),
            policy_presets: string_list(s.entry.get("policies")),
            custom_policies: s.entry.get("customPolicies").cloned().unwrap_or(json!([])),
        };
        // The gateway writes straight into the backup directory; the manifest is committed
        // only after the files are durable and checked. The gateway also lists the sandbox's
        // files as they are at the source (local: from the read that fed the copy; openshell:
        // digests computed inside the sandbox), so the manifest describes the source and a
        // copy damaged on its way is refused here, before anything is deleted.
        let mut gw_failure = None;
        let keeps = rb.gateway.download_keeps();
        let b = Backup::create_with(&rb.home, &meta, &rb.backup_ts, keeps, |dir| {
            let listed = match rb.gateway.download_listed(&rb.name, dir) {
                Ok(l) => l,
                Err(e) => {
                    let msg = e.to_string();
                    gw_failure = Some(e);
                    return Err(HostError::Invalid(msg));
                }
            };
            crash::point(CrashPoint::MidEffect);
            Ok(listed)
        })
        .map_err(|e| gw_failure.take().map(gw_err).unwrap_or_else(|| host_err(e)))?;
        Self::output(&b)
    }
    fn check_output(&self, output: &Value) -> Result<(), DataError> {
        check::<BackupOutput>(self.name(), output)
    }
    fn compensate(&self, _ctx: &StepCtx<'_>, _output: Option<&Value>) -> Result<(), StepError> {
        // A backup is never destroyed by a rollback: it is the operator's safety net, and
        // `journal prune` removes it with its run.
        Ok(())
    }
}

fn staging_dir(home: &Path, run_id: &str, what: &str) -> Result<PathBuf, StepError> {
    let dir = home.join(snapshot::RUNS_DIR).join(format!("{run_id}.{what}"));
    if dir.exists() {
        crate::host::fstree::remove_tree(&dir)
            .map_err(|e| StepError::new(format!("cannot clear {}: {e}", dir.display())).io())?;
    }
    crate::util::create_private_dir(&dir)
        .map_err(|e| StepError::new(format!("cannot create {}: {e}", dir.display())).io())?;
    Ok(dir)
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------

/// Step 4: Delete the sandbox, confirm absence, then remove the registry row. Point of no return.
pub struct RemoveStep(pub Arc<Rebuild>);

impl RemoveStep {
    /// The sandbox on the gateway is the one this run snapshotted (or there is none).
    fn check_identity(&self, ctx: &StepCtx<'_>, live: &Liveness) -> Result<(), StepError> {
        if let Liveness::Present(s) = live {
            let journaled = self.0.evidence_id();
            if self.0.mode == Mode::Stale || journaled.is_some_and(|id| id != s.id) {
                return Err(StepError::new(format!(
                    "a different sandbox named '{}' (id {}) is on gateway '{}'; it was not created by this rebuild and will not be deleted",
                    self.0.name, s.id, self.0.gateway.name()
                ))
                .hint(format!("inspect it, then run `nemoclaw recover --rollback {}`", ctx.run_id)));
            }
        }
        Ok(())
    }
}

impl Step for RemoveStep {
    fn name(&self) -> &'static str {
        "remove"
    }
    fn destructive(&self) -> bool {
        true
    }
    fn probe(&self, _ctx: &StepCtx<'_>) -> Result<Probe, StepError> {
        let (live, row) = match observe(&self.0, "deleted")? {
            Ok(seen) => seen,
            Err(unknown) => return Ok(unknown),
        };
        Ok(if live == Liveness::Missing && !row {
            Probe::Done(encode(&RemoveOutput { deleted: true })?)
        } else {
            Probe::NotDone
        })
    }
    fn apply(&self, ctx: &StepCtx<'_>) -> Result<Value, StepError> {
        test_delay();
        let rb = &self.0;
        let live = confirm(rb)?;
        self.check_identity(ctx, &live)?;
        if matches!(live, Liveness::Present(_)) {
            rb.gateway.delete(&rb.name, rb.delete_timeout).map_err(gw_err)?;
            // Two guards before the row goes: the driver's delete polls until not-found, and
            // then the gateway is asked once more here, so a delete that reports success
            // without taking effect cannot cost the operator the registry entry.
            match confirm(rb)? {
                Liveness::Missing => {}
                other => {
                    return Err(StepError::new(format!(
                        "sandbox '{}' is still on gateway '{}' after its delete reported success ({}); the registry entry was kept",
                        rb.name,
                        rb.gateway.name(),
                        crate::gateway::openshell::describe(&other)
                    )))
                }
            }
        }
        crash::point(CrashPoint::MidEffect);
        // Absence is confirmed (above); only then is the registry row removed, so a crash in
        // between leaves the row (resume finishes it).
        registry::update(&rb.home, |reg| {
            reg.remove_entry(&rb.name);
            Ok(())
        })
        .map_err(host_err)?;
        encode(&RemoveOutput { deleted: true })
    }
    fn check_output(&self, output: &Value) -> Result<(), DataError> {
        check::<RemoveOutput>(self.name(), output)
    }
    fn compensate(&self, ctx: &StepCtx<'_>, _output: Option<&Value>) -> Result<(), StepError> {
        // Put the old sandbox back: recreate it from the snapshot (normal mode), restore the
        // backup into it, then the registry row verbatim and the default pointer.
        let rb = &self.0;
        let s = snap(rb, ctx)?;
        if rb.mode == Mode::Normal {
            let live = confirm(rb)?;
            let label = format!("{}-rollback", ctx.run_id);
            let present_ok = match &live {
                Liveness::Present(l) => {
                    // Either the old sandbox was never deleted, or our rollback recreate exists.
                    l.labels.get(RUN_LABEL) == Some(&label)
                        || rb.evidence_id() == Some(l.id.as_str())
                }
                _ => false,
            };
            if matches!(live, Liveness::Present(_)) && !present_ok {
                return Err(StepError::new(format!(
                    "a sandbox named '{}' exists that this rollback did not create; not touching it",
                    rb.name
                )));
            }
            let ours = carries_run_label(&live, &label);
            let backup = ctx.output_as::<BackupOutput>("backup")?;
            if let (true, Some(out)) = (live == Liveness::Missing || ours, &backup) {
                // The backup is checked before a replacement is created for it, so a damaged one
                // never leaves an empty replacement behind.
                match checked_backup(out)? {
                    Ok(b) => {
                        if live == Liveness::Missing {
                            let image = s
                                .entry
                                .get("imageTag")
                                .and_then(Value::as_str)
                                .unwrap_or(&rb.image);
                            create(rb, &s, image, &label)?;
                            crash::point(CrashPoint::MidEffect);
                        }
                        // (Or created by an earlier attempt of this compensation: make sure the
                        // state is in.)
                        restore_checked(rb, ctx, &b, true)?;
                    }
                    Err(why) if rb.accept_damaged_backup => {
                        // The operator accepted (journaled by `recover`) that nothing is restored
                        // from this backup: no sandbox is left, only the registry row comes back.
                        tracing::warn!("{why}; rolling back without restoring it");
                        if ours {
                            rb.gateway.delete(&rb.name, rb.delete_timeout).map_err(gw_err)?;
                        }
                    }
                    Err(why) => return Err(damaged(ctx, &why)),
                }
            }
        }
        let mut entry = s.entry.clone();
        if rb.mode == Mode::Stale && rb.onboard_attempted {
            if let Some(o) = entry.as_object_mut() {
                if o.contains_key("imageTag") {
                    o.insert("imageTag".into(), Value::Null);
                }
            }
        }
        put_row(rb, &s, entry)
    }
}

/// Register `entry` under the sandbox's name and reclaim the default pointer if it was ours.
fn put_row(rb: &Rebuild, s: &Snapshot, entry: Value) -> Result<(), StepError> {
    registry::update(&rb.home, |reg| {
        match s.position {
            Some(i) => reg.insert_entry_at(&rb.name, entry, i),
            None => reg.set_entry(&rb.name, entry),
        }
        if s.was_default {
            reg.set_default(Some(&rb.name));
        }
        Ok(())
    })
    .map_err(host_err)
}

fn create(rb: &Rebuild, s: &Snapshot, image: &str, label: &str) -> Result<LiveSandbox, StepError> {
    // A sandbox built from a Dockerfile is rebuilt from it (`--from <Dockerfile>`), as
    // NemoClaw's `onboard --resume` does; preflight checked that it exists.
    let dockerfile = s
        .session
        .as_ref()
        .and_then(|d| d.pointer("/metadata/fromDockerfile"))
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty());
    let spec = CreateSpec {
        name: rb.name.clone(),
        image: dockerfile.unwrap_or(image).to_owned(),
        labels: BTreeMap::from([(RUN_LABEL.to_owned(), label.to_owned())]),
        agent: s.entry.get("agent").and_then(Value::as_str).map(str::to_owned),
        gpu: s.entry.get("gpuEnabled").and_then(Value::as_bool).unwrap_or(false),
        policy: s.policy.clone(),
        providers: s
            .entry
            .get("provider")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .into_iter()
            .collect(),
    };
    // The driver returns once the sandbox is ready, with its id: no second query needed.
    rb.gateway.create(&spec).map_err(gw_err)
}

/// Upload a backup's files into the sandbox and verify them against the manifest.
fn restore_backup(
    rb: &Rebuild,
    ctx: &StepCtx<'_>,
    out: Option<&BackupOutput>,
) -> Result<(), StepError> {
    let Some(out) = out else { return Ok(()) };
    match opened_backup(out) {
        Ok(b) => restore_checked(rb, ctx, &b, false),
        Err(why) => Err(damaged(ctx, &why)),
    }
}

/// The run's backup (from the backup step's output), opened and checked against the journaled
/// manifest digest, its files not read yet. `Err(why)`: it must not be restored.
fn opened_backup(out: &BackupOutput) -> Result<Backup, String> {
    let path = &out.backup_path;
    let b = Backup::open(Path::new(path)).map_err(|e| e.to_string())?;
    if b.manifest_digest != out.manifest_sha256 {
        return Err(format!(
            "backup {path} does not match the journaled manifest digest (its manifest was changed)"
        ));
    }
    Ok(b)
}

/// The run's backup (from the backup step's output), opened and verified in full against the
/// journaled manifest digest and its own manifest. `Ok(Err(why))`: it is damaged and must not
/// be restored; `why` names the backup and every file that failed.
pub(crate) fn checked_backup(out: &BackupOutput) -> Result<Result<Backup, String>, StepError> {
    Ok(opened_backup(out).and_then(|b| read_in_full(&b).map(|()| b)))
}

/// Read every file of `b` and compare it with the manifest. `Err(why)`: it is damaged; `why`
/// names the backup and every file that failed.
fn read_in_full(b: &Backup) -> Result<(), String> {
    let path = b.path.display();
    match b.damage() {
        Ok(bad) if bad.is_empty() => Ok(()),
        Ok(bad) => Err(format!(
            "backup {path} does not match the manifest: {}",
            backup::describe_all(&bad)
        )),
        // Unreadable (EIO from a failing disk, a file swapped for something else): damaged.
        Err(e) => Err(unreadable(b, e)),
    }
}

fn unreadable(b: &Backup, e: HostError) -> String {
    format!("backup {} cannot be read in full: {e}", b.path.display())
}

/// A damaged backup stops the step: nothing is restored from it, ever, without the operator's
/// explicit acceptance.
fn damaged(ctx: &StepCtx<'_>, why: &str) -> StepError {
    StepError::new(format!("{why}; nothing was restored from it"))
        .hint("put the backup's files back as they were and retry, or give up on its contents:")
        .hint(format!(
            "undo the run without restoring the backup (the registry row comes back, the sandbox stays absent, the backup stays where it is): `nemoclaw recover --rollback {} --accept-damaged-backup`",
            ctx.run_id
        ))
}

/// Put a backup's files into the sandbox, never a byte of a damaged one, then verify what the
/// sandbox holds. `verified`: the caller has just checked the backup's files in full.
///
/// A gateway that copies on this host checks what its copy reads from the backup against the
/// manifest before the copy becomes the sandbox's state ([`Gateway::upload_checked`]): the
/// restore's one read of the backup is also its check. Any other gateway gets the backup only
/// after it was read and checked in full here.
fn restore_checked(
    rb: &Rebuild,
    ctx: &StepCtx<'_>,
    b: &Backup,
    verified: bool,
) -> Result<(), StepError> {
    // A walk, reading no file: an entry it refuses (a fifo, a symlink leaving the tree) can
    // only be there if the backup was tampered with.
    let nodes = b.restore_nodes().map_err(|e| damaged(ctx, &unreadable(b, e)))?;
    let accept = |read: &[Node]| b.check_read(read);
    match rb.gateway.upload_checked(&rb.name, &b.path, &nodes, &accept).map_err(gw_err)? {
        CheckedUpload::Committed => crash::point(CrashPoint::MidEffect),
        CheckedUpload::Refused(why) => return Err(damaged(ctx, &why)),
        CheckedUpload::Unsupported => {
            if !verified {
                read_in_full(b).map_err(|why| damaged(ctx, &why))?;
            }
            let staging = staging_dir(&rb.home, ctx.run_id, "restore")?;
            b.link_out_verified(&staging).map_err(host_err)?;
            rb.gateway.upload_state(&rb.name, &staging).map_err(gw_err)?;
            crash::point(CrashPoint::MidEffect);
            let _ = crate::host::fstree::remove_tree(&staging);
        }
    }
    verify_restored(rb, ctx, b)
}

/// The sandbox holds every backed-up file with its bytes and the metadata that can survive the
/// trip (the upload, and for a check through a download, the download too): read in place,
/// else listed with digests inside the sandbox, else downloaded.
fn verify_restored(rb: &Rebuild, ctx: &StepCtx<'_>, b: &Backup) -> Result<(), StepError> {
    let up = rb.gateway.upload_keeps();
    if let Some(live) = rb.gateway.local_state_path(&rb.name) {
        return b.verify_tree(&live, up).map_err(host_err);
    }
    if let Some(listed) = rb.gateway.list_state(&rb.name, true).map_err(gw_err)? {
        let place = format!("sandbox '{}' on gateway '{}'", rb.name, rb.gateway.name());
        return b.verify_listing(&listed, &place).map_err(host_err);
    }
    let check = staging_dir(&rb.home, ctx.run_id, "verify")?;
    rb.gateway.download_state(&rb.name, &check).map_err(gw_err)?;
    let r = b.verify_tree(&check, up.and(rb.gateway.download_keeps())).map_err(host_err);
    let _ = crate::host::fstree::remove_tree(&check);
    r
}

// ---------------------------------------------------------------------------------------------

/// Step 5: Recreate the sandbox from the snapshot with the current image, labelled with the run id;
/// register a fresh entry that keeps the snapshot's fields.
pub struct OnboardStep(pub Arc<Rebuild>);

impl OnboardStep {
    fn fresh_entry(&self, s: &Snapshot) -> Value {
        let mut e = s.entry.clone();
        if let Some(o) = e.as_object_mut() {
            o.insert("imageTag".into(), Value::String(self.0.image.clone()));
        }
        e
    }
}

impl Step for OnboardStep {
    fn name(&self) -> &'static str {
        "onboard"
    }
    fn probe(&self, ctx: &StepCtx<'_>) -> Result<Probe, StepError> {
        let (live, row) = match observe(&self.0, "recreated")? {
            Ok(seen) => seen,
            Err(unknown) => return Ok(unknown),
        };
        Ok(match &live {
            Liveness::Present(l) if carries_run_label(&live, ctx.run_id) && row => {
                Probe::Done(encode(&OnboardOutput {
                    id: l.id.clone(),
                    image: self.0.image.clone(),
                })?)
            }
            _ => Probe::NotDone,
        })
    }
    fn apply(&self, ctx: &StepCtx<'_>) -> Result<Value, StepError> {
        test_delay();
        let rb = &self.0;
        let s = snap(rb, ctx)?;
        let live = confirm(rb)?;
        let id = match &live {
            // Created by an earlier attempt of this run (e.g. a create that timed out): adopt it.
            Liveness::Present(l) if carries_run_label(&live, ctx.run_id) => l.id.clone(),
            Liveness::Present(l) => {
                return Err(StepError::new(format!(
                    "a sandbox named '{}' (id {}) appeared on gateway '{}' that this rebuild did not create; not touching it",
                    rb.name, l.id, rb.gateway.name()
                )))
            }
            _ => {
                create(rb, &s, &rb.image, ctx.run_id)?.id
            }
        };
        crash::point(CrashPoint::MidEffect);
        put_row(rb, &s, self.fresh_entry(&s))?;
        encode(&OnboardOutput { id, image: rb.image.clone() })
    }
    fn check_output(&self, output: &Value) -> Result<(), DataError> {
        check::<OnboardOutput>(self.name(), output)
    }
    fn compensate(&self, ctx: &StepCtx<'_>, _output: Option<&Value>) -> Result<(), StepError> {
        let rb = &self.0;
        let live = confirm(rb)?;
        // Only ever delete the sandbox this run created.
        if carries_run_label(&live, ctx.run_id) {
            rb.gateway.delete(&rb.name, rb.delete_timeout).map_err(gw_err)?;
        }
        crash::point(CrashPoint::MidEffect);
        registry::update(&rb.home, |reg| {
            reg.remove_entry(&rb.name);
            Ok(())
        })
        .map_err(host_err)
    }
}

// ---------------------------------------------------------------------------------------------

/// Step 6: (normal) Put the backup into the new sandbox and verify every digest.
pub struct RestoreStep(pub Arc<Rebuild>);

impl Step for RestoreStep {
    fn name(&self) -> &'static str {
        "restore"
    }
    fn probe(&self, ctx: &StepCtx<'_>) -> Result<Probe, StepError> {
        let rb = &self.0;
        let Some(out) = ctx.output_as::<BackupOutput>("backup")? else {
            return Ok(Probe::NotDone);
        };
        let b = Backup::open(Path::new(&out.backup_path)).map_err(host_err)?;
        Ok(match verify_restored(rb, ctx, &b) {
            Ok(()) => {
                Probe::Done(encode(&RestoreOutput { verified_files: b.manifest.files.len() })?)
            }
            Err(_) => Probe::NotDone,
        })
    }
    fn apply(&self, ctx: &StepCtx<'_>) -> Result<Value, StepError> {
        test_delay();
        let out: BackupOutput = ctx
            .output_as("backup")?
            .ok_or_else(|| StepError::new("restore needs the backup step's output"))?;
        restore_backup(&self.0, ctx, Some(&out))?;
        encode(&RestoreOutput { verified_files: out.files })
    }
    fn check_output(&self, output: &Value) -> Result<(), DataError> {
        check::<RestoreOutput>(self.name(), output)
    }
    fn compensate(&self, _ctx: &StepCtx<'_>, _output: Option<&Value>) -> Result<(), StepError> {
        // The restored files live in the new sandbox, which onboard's compensation deletes.
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

/// Step 7: Re-apply `policies` and `customPolicies` (NemoClaw never re-applied custom ones).
pub struct PoliciesStep(pub Arc<Rebuild>);

impl PoliciesStep {
    fn output(wanted: &[PolicySpec], warnings: Vec<String>) -> Result<Value, StepError> {
        let applied = wanted.iter().map(|p| p.name().to_owned()).collect();
        encode(&PoliciesOutput::Applied { applied, warnings })
    }

    fn wanted(s: &Snapshot) -> Vec<PolicySpec> {
        let mut v: Vec<PolicySpec> = string_list(s.entry.get("policies"))
            .into_iter()
            .map(|name| PolicySpec::Preset { name })
            .collect();
        if let Some(list) = s.entry.get("customPolicies").and_then(Value::as_array) {
            for p in list {
                if let (Some(name), Some(content)) = (
                    p.get("name").and_then(Value::as_str),
                    p.get("content").and_then(Value::as_str),
                ) {
                    v.push(PolicySpec::Custom {
                        name: name.to_owned(),
                        content: content.to_owned(),
                    });
                }
            }
        }
        v
    }
}

impl PoliciesStep {
    fn handed_off(captured: &str) -> Result<Value, StepError> {
        encode(&PoliciesOutput::Handoff {
            handoff: true,
            policy_sha256: crate::util::sha256_hex(captured.as_bytes()),
            verified: true,
        })
    }

    /// The replacement was created with the captured policy: check that the gateway enforces
    /// exactly it. One `set` of the captured policy if it does not (a live sandbox accepts it
    /// only when static fields agree), then the check again; a difference fails the step.
    fn verify_handoff(rb: &Rebuild, captured: &str) -> Result<Value, StepError> {
        let live = rb.gateway.live_policy(&rb.name).map_err(gw_err)?;
        if live.as_deref() == Some(captured) {
            return Self::handed_off(captured);
        }
        rb.gateway.set_policy(&rb.name, captured).map_err(gw_err)?;
        let live = rb.gateway.live_policy(&rb.name).map_err(gw_err)?;
        if live.as_deref() == Some(captured) {
            return Self::handed_off(captured);
        }
        Err(StepError::new(format!(
            "the live policy of '{}' differs from the policy captured before the delete",
            rb.name
        ))
        .hint("compare `openshell policy get --full` with the run's snapshot file"))
    }
}

impl Step for PoliciesStep {
    fn name(&self) -> &'static str {
        "policies"
    }
    fn probe(&self, ctx: &StepCtx<'_>) -> Result<Probe, StepError> {
        let rb = &self.0;
        let s = snap(rb, ctx)?;
        if let Some(captured) = &s.policy {
            return Ok(match rb.gateway.live_policy(&rb.name) {
                Ok(Some(live)) if &live == captured => Probe::Done(Self::handed_off(captured)?),
                Ok(_) => Probe::NotDone,
                Err(e) => Probe::Unknown(format!("cannot read the live policy: {e}")),
            });
        }
        let wanted = Self::wanted(&s);
        Ok(match rb.gateway.missing_policies(&rb.name, &wanted) {
            Ok(missing) if missing.is_empty() => Probe::Done(Self::output(&wanted, Vec::new())?),
            Ok(_) => Probe::NotDone,
            Err(e) => Probe::Unknown(format!("cannot read the policies in force: {e}")),
        })
    }
    fn apply(&self, ctx: &StepCtx<'_>) -> Result<Value, StepError> {
        test_delay();
        let rb = &self.0;
        let s = snap(rb, ctx)?;
        if let Some(captured) = &s.policy {
            return Self::verify_handoff(rb, captured);
        }
        let wanted = Self::wanted(&s);
        // As NemoClaw: a preset that cannot be re-applied is a warning with the command to
        // re-apply it by hand, not a failure of a rebuild whose sandbox already exists again.
        // One call for all of them: a gateway keeping one whole policy writes the merge once.
        let mut applied = Vec::new();
        let mut warnings = Vec::new();
        for (p, r) in wanted.iter().zip(rb.gateway.apply_policies(&rb.name, &wanted)) {
            match r {
                Ok(()) => applied.push(p.clone()),
                Err(e) => warnings.push(messages::preset_restore_failed(
                    p.name(),
                    &e.to_string(),
                    rb.name.as_str(),
                )),
            }
        }
        Self::output(&applied, warnings)
    }
    fn check_output(&self, output: &Value) -> Result<(), DataError> {
        check::<PoliciesOutput>(self.name(), output)
    }
    fn compensate(&self, _ctx: &StepCtx<'_>, _output: Option<&Value>) -> Result<(), StepError> {
        // Policies belong to the new sandbox, which onboard's compensation deletes.
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

/// Step 8: Normal: re-lock shields if they were locked. Stale: clear the stale seal.
pub struct ShieldsStep(pub Arc<Rebuild>);

impl ShieldsStep {
    /// What the step reports, whether it did the work or found it done.
    fn output(&self, s: &Snapshot) -> Result<Value, StepError> {
        let stale = self.0.mode == Mode::Stale;
        encode(&ShieldsOutput {
            locked: !stale && s.shields_locked,
            stale_seal_cleared: stale && s.shields_raw.is_some(),
            was_locked: s.shields_locked,
        })
    }

    /// The shields file bytes this step leaves behind.
    fn target(&self, s: &Snapshot) -> Option<String> {
        match self.0.mode {
            // The restored files are the snapshotted ones, so the old seal describes them.
            Mode::Normal => s.shields_raw.clone(),
            // The seal describes files of a sandbox that no longer exists.
            Mode::Stale => None,
        }
    }
}

impl Step for ShieldsStep {
    fn name(&self) -> &'static str {
        "shields"
    }
    fn probe(&self, ctx: &StepCtx<'_>) -> Result<Probe, StepError> {
        let s = snap(&self.0, ctx)?;
        Ok(if shields_match(&self.0, self.target(&s).as_deref())? {
            Probe::Done(self.output(&s)?)
        } else {
            Probe::NotDone
        })
    }
    fn apply(&self, ctx: &StepCtx<'_>) -> Result<Value, StepError> {
        test_delay();
        let rb = &self.0;
        let s = snap(rb, ctx)?;
        match rb.mode {
            Mode::Normal => restore_shields(rb, &s)?,
            Mode::Stale => shields::clear(&rb.home, &rb.name).map_err(host_err)?,
        }
        self.output(&s)
    }
    fn check_output(&self, output: &Value) -> Result<(), DataError> {
        check::<ShieldsOutput>(self.name(), output)
    }
    fn compensate(&self, ctx: &StepCtx<'_>, _output: Option<&Value>) -> Result<(), StepError> {
        let s = snap(&self.0, ctx)?;
        restore_shields(&self.0, &s)
    }
}
