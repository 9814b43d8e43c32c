//! Gateways are where live sandboxes exist. The [`Gateway`] trait is the one seam between the
//! rebuild and a concrete driver: `local` (embedded, directories under the NemoClaw home) or
//! `openshell` (the real `openshell` CLI, scoped with `-g <gateway>` on every call).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::exit::{Exit, ExitCoded};
use crate::host::fstree::{Keeps, Node};
use crate::names::SandboxName;

pub mod classify;
pub mod local;
pub mod openshell;
pub mod policy;
pub mod sandbox_tree;

/// A sandbox as a gateway reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LiveSandbox {
    /// Gateway-assigned id. A different id under the same name is a different sandbox.
    pub id: String,
    /// Sandbox name.
    pub name: String,
    /// Phase word as the gateway prints it (`Ready`, `Provisioning`, ...).
    pub phase: String,
    /// Labels, e.g. `rebuild-run=<run id>`.
    pub labels: BTreeMap<String, String>,
}

impl LiveSandbox {
    /// Ready ⇔ phase `Ready` or (older gateways) `Running`.
    pub fn is_ready(&self) -> bool {
        matches!(self.phase.as_str(), "Ready" | "Running")
    }
}

/// Why a gateway is not in a known-good state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unhealthy {
    /// Transport errors, connection refused, no gateway configured.
    Unreachable,
    /// Authentication or authorization failed.
    Auth,
    /// TLS handshake verification failed (identity drift: never auto-recover).
    Identity,
    /// The CLI and the gateway disagree on the wire format.
    Schema,
    /// The gateway answered, but the active gateway is another one (`active` names it).
    Foreign,
}

/// The one answer classification gives for a sandbox (spec §3.1).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Liveness {
    /// Present on the recorded, healthy gateway.
    Present(LiveSandbox),
    /// Proven gone: the recorded gateway was just shown healthy and a query scoped to it said
    /// not-found.
    Missing,
    /// The gateway is not in a known-good state.
    Unhealthy {
        /// Category.
        reason: Unhealthy,
        /// What the gateway or CLI said, for the operator.
        detail: String,
        /// The gateway that is actually active, when known and different from the recorded one.
        active: Option<String>,
    },
    /// Could not tell (timeout, unparseable output, unexpected error).
    Unknown {
        /// What happened, for the operator.
        detail: String,
    },
}

/// What to create. Built by the rebuild from the journaled registry snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CreateSpec {
    /// Sandbox name.
    pub name: SandboxName,
    /// Image to create from (`--from`).
    pub image: String,
    /// Labels to set, e.g. `rebuild-run=<id>`.
    pub labels: BTreeMap<String, String>,
    /// Agent kind (`None` = openclaw).
    pub agent: Option<String>,
    /// GPU requested.
    pub gpu: bool,
    /// The whole policy to create the sandbox with (`--policy`), as captured from the sandbox
    /// being replaced; `None` = the gateway's default.
    #[serde(default)]
    pub policy: Option<String>,
    /// Providers to attach (`--provider`, repeatable): the registry row's `provider`.
    #[serde(default)]
    pub providers: Vec<String>,
}

/// A policy to apply to a sandbox: a preset name or custom policy content.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PolicySpec {
    /// A NemoClaw preset (`npm`, `telegram`, ...).
    Preset {
        /// Preset name.
        name: String,
    },
    /// A custom policy with YAML content.
    Custom {
        /// Policy name.
        name: String,
        /// YAML content.
        content: String,
    },
}

impl PolicySpec {
    /// The policy's name.
    pub fn name(&self) -> &str {
        match self {
            PolicySpec::Preset { name } | PolicySpec::Custom { name, .. } => name,
        }
    }
}

/// What [`Gateway::upload_checked`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckedUpload {
    /// What the copy read passed the check, and the sandbox's state tree is now that copy.
    Committed,
    /// What the copy read failed the check (the reason): the sandbox's state tree is as it was,
    /// and nothing of the copy is left.
    Refused(String),
    /// The driver cannot check what it reads before the sandbox holds it: nothing was done.
    Unsupported,
}

/// A gateway operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The sandbox already exists (ALREADY_EXISTS).
    #[error("sandbox '{0}' already exists on gateway '{1}'")]
    AlreadyExists(String, String),
    /// The sandbox does not exist.
    #[error("sandbox '{0}' not found on gateway '{1}'")]
    NotFound(String, String),
    /// The call timed out; its effect is unknown.
    #[error("`{command}` timed out after {after:?}; its effect is unknown")]
    Timeout {
        /// The command line, for the operator.
        command: String,
        /// The timeout.
        after: Duration,
    },
    /// The gateway is not in a known-good state.
    #[error("gateway '{gateway}' is not healthy: {detail}")]
    Unhealthy {
        /// Gateway name.
        gateway: String,
        /// Details.
        detail: String,
    },
    /// The `openshell` binary could not be run.
    #[error("could not run `{program}`: {source}")]
    Spawn {
        /// Program path.
        program: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Local I/O failed (copying state in or out).
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The `openshell` CLI is too old for an operation (names the version it needs).
    #[error("{0}")]
    TooOld(String),
    /// Anything else the gateway or CLI reported.
    #[error("{0}")]
    Other(String),
}

/// Where live sandboxes exist. Every method is scoped to this gateway only.
pub trait Gateway: Send + Sync {
    /// The binding name (`local`, `nemoclaw`, `nemoclaw-<port>`).
    fn name(&self) -> &str;

    /// Prove the gateway healthy, or say why not (`Ok(None)` = healthy).
    fn health(&self) -> Option<Liveness>;

    /// Classify one sandbox, following spec §3.1: `Missing` only right after this gateway was
    /// proved healthy and a scoped query answered not-found.
    fn classify(&self, name: &SandboxName) -> Liveness;

    /// All sandboxes on this gateway.
    fn list(&self) -> Result<Vec<LiveSandbox>, GatewayError>;

    /// Create a sandbox and wait until it is ready. Never retried blindly after a timeout:
    /// callers `classify` first and adopt only a sandbox carrying their run label.
    fn create(&self, spec: &CreateSpec) -> Result<LiveSandbox, GatewayError>;

    /// Delete a sandbox and poll until it is confirmed absent (not-found is success).
    fn delete(&self, name: &SandboxName, timeout: Duration) -> Result<(), GatewayError>;

    /// Copy the sandbox's state tree (the `/sandbox/.openclaw` equivalent) into `dest`,
    /// which must be an empty directory ([`Gateway::download_listed`] without the listing).
    fn download_state(&self, name: &SandboxName, dest: &Path) -> Result<(), GatewayError> {
        self.download_listed(name, dest).map(|_| ())
    }

    /// The sandbox's live state tree on this host's filesystem, when the driver keeps it here
    /// (the local gateway). Lets a verification read it in place instead of downloading a copy.
    /// Nothing may be written through it.
    fn local_state_path(&self, _name: &SandboxName) -> Option<std::path::PathBuf> {
        None
    }

    /// Copy the contents of `src` into the sandbox's state tree, replacing files of the same path.
    fn upload_state(&self, name: &SandboxName, src: &Path) -> Result<(), GatewayError>;

    /// Replace the sandbox's state tree with a copy of the entries `nodes` (a walk of `src`, in
    /// tree order), but only if `accept` approves what the copy read — the listing it computed
    /// while copying (the SHA-256 of the bytes read, mode and mtime of each opened file): the
    /// copy is staged where the sandbox does not see it, made durable, and becomes its state
    /// tree in one step only once accepted. Meant for a sandbox whose state is only what the
    /// caller put there (a replacement it just created). Drivers that cannot do this answer
    /// [`CheckedUpload::Unsupported`] having done nothing; the caller then checks the source
    /// itself and uses [`Gateway::upload_state`].
    fn upload_checked(
        &self,
        _name: &SandboxName,
        _src: &Path,
        _nodes: &[Node],
        _accept: &dyn Fn(&[Node]) -> Result<(), String>,
    ) -> Result<CheckedUpload, GatewayError> {
        Ok(CheckedUpload::Unsupported)
    }

    /// Copy the sandbox's state tree into `dest` (an empty directory), returning the source's
    /// own listing (digests and metadata taken while reading the sandbox's files, or computed
    /// inside the sandbox) when the driver can give one, so a copy damaged on its way can be
    /// told from the source. `None`: only the copy can be described.
    fn download_listed(
        &self,
        name: &SandboxName,
        dest: &Path,
    ) -> Result<Option<Vec<Node>>, GatewayError>;

    /// The sandbox's state tree as listed inside the sandbox — type, mode, mtime, size,
    /// symlink target and hard-link group of every entry, and with `digests` the SHA-256 of
    /// every file, computed there — when the driver lists it there; `Ok(None)` when it does
    /// not (the local gateway reads the tree in place instead, see
    /// [`Gateway::local_state_path`]).
    fn list_state(
        &self,
        _name: &SandboxName,
        _digests: bool,
    ) -> Result<Option<Vec<Node>>, GatewayError> {
        Ok(None)
    }

    /// Which metadata [`Gateway::download_state`] carries from the sandbox to this host.
    fn download_keeps(&self) -> Keeps {
        Keeps::ALL
    }

    /// Which metadata [`Gateway::upload_state`] carries from this host into the sandbox.
    fn upload_keeps(&self) -> Keeps {
        Keeps::ALL
    }

    /// Apply one policy to the sandbox. Idempotent.
    fn apply_policy(&self, name: &SandboxName, policy: &PolicySpec) -> Result<(), GatewayError>;

    /// Names of the policies currently applied, when the gateway can tell.
    fn applied_policies(&self, name: &SandboxName) -> Result<Vec<String>, GatewayError>;

    /// Apply several policies at once; one result per policy, in order. Gateways that keep one
    /// whole policy merge them all and write the result once.
    fn apply_policies(
        &self,
        name: &SandboxName,
        policies: &[PolicySpec],
    ) -> Vec<Result<(), GatewayError>> {
        policies.iter().map(|p| self.apply_policy(name, p)).collect()
    }

    /// Whether the gateway has provider `provider`: `Ok(None)` when this gateway has no
    /// providers to ask about (the local gateway).
    fn provider_exists(&self, _provider: &str) -> Result<Option<bool>, GatewayError> {
        Ok(None)
    }

    /// The names of those of `policies` that are not in force on the sandbox.
    fn missing_policies(
        &self,
        name: &SandboxName,
        policies: &[PolicySpec],
    ) -> Result<Vec<String>, GatewayError> {
        let applied = self.applied_policies(name)?;
        Ok(policies
            .iter()
            .filter(|p| !applied.iter().any(|a| a == p.name()))
            .map(|p| p.name().to_owned())
            .collect())
    }

    /// The sandbox's whole live policy, as the gateway serialises it, when this gateway keeps
    /// whole policies (openshell: the body of `policy get --full`); `Ok(None)` when it does not
    /// (the local gateway keeps applied preset names instead).
    fn live_policy(&self, _name: &SandboxName) -> Result<Option<String>, GatewayError> {
        Ok(None)
    }

    /// Replace the sandbox's whole policy with `body` and wait until the sandbox loaded it.
    fn set_policy(&self, name: &SandboxName, _body: &str) -> Result<(), GatewayError> {
        Err(GatewayError::Other(format!(
            "gateway '{}' cannot replace the whole policy of '{name}'",
            self.name()
        )))
    }
}

impl ExitCoded for GatewayError {
    fn exit(&self) -> Exit {
        match self {
            // Nothing was changed: the operator must act first.
            GatewayError::AlreadyExists(..)
            | GatewayError::NotFound(..)
            | GatewayError::Unhealthy { .. }
            | GatewayError::Spawn { .. }
            | GatewayError::TooOld(_) => Exit::Refused,
            GatewayError::Io { .. } => Exit::Io,
            GatewayError::Timeout { .. } | GatewayError::Other(_) => Exit::Failed,
        }
    }
}

/// Open the driver for a binding: `local` → the embedded [`local::LocalGateway`] under `home`;
/// `nemoclaw` / `nemoclaw-<port>` → [`openshell::OpenShellGateway`] running `openshell`
/// (`openshell` path given, else found on PATH). Opening runs nothing on the gateway.
pub fn open(
    home: &Path,
    binding: &str,
    openshell: Option<&Path>,
) -> Result<Box<dyn Gateway>, GatewayError> {
    match binding {
        "local" => Ok(Box::new(local::LocalGateway::open(home)?)),
        b if b == "nemoclaw"
            || b.strip_prefix("nemoclaw-")
                .is_some_and(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit())) =>
        {
            let program = match openshell {
                Some(p) => p.to_owned(),
                None => openshell::find_on_path().ok_or_else(|| GatewayError::Spawn {
                    program: "openshell".to_owned(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "not found on PATH (pass --openshell PATH)",
                    ),
                })?,
            };
            Ok(Box::new(openshell::OpenShellGateway::new(program, b)))
        }
        other => Err(GatewayError::Other(format!(
            "unknown gateway binding `{other}` (expected `local`, `nemoclaw` or `nemoclaw-<port>`)"
        ))),
    }
}
