//! The embedded `local` gateway: sandboxes are directories under `<home>/local-gateway/`.
//!
//! ```text
//! local-gateway/
//!   sandboxes/<name>/meta.json   id, name, phase, createdAt, image, labels, policies
//!   sandboxes/<name>/state/      the sandbox's /sandbox/.openclaw (workspace/, memory/, ...)
//!   .tmp.<name>.<pid>.<uuid>/    a create in progress, or a checked upload being staged (or
//!                                the state tree it replaced); never counted as a sandbox
//!   .trash.<name>.<uuid>/        a delete in progress (never counted as a sandbox)
//!   fault.json                   test-only fault injection, see below
//! ```
//!
//! Create builds the whole sandbox in a temp directory and renames it into `sandboxes/`, so a
//! crash leaves either no sandbox or a complete one. A checked upload (the restore of a backup)
//! builds the new state tree in a temp directory the same way and swaps it with `state/` in one
//! rename once what it read was accepted, so the sandbox holds either its old state or the
//! whole accepted copy. Delete renames the sandbox out of
//! `sandboxes/` first (the atomic point: from then on it is absent) and then removes it.
//! Leftovers of either are cleaned by the next [`LocalGateway::open`]. Removing
//! `sandboxes/<name>/` by hand is what a reaped (stale) sandbox looks like.
//!
//! Fault injection (for tests of refusal paths; read on every call):
//! `fault.json` = `{"health": "unreachable"|"auth"|"identity"|"schema"|"foreign"|"unknown",
//! "foreign_active": "<gateway>", "fail": {"<op>": "<message>"}}` where `<op>` is one of
//! `create`, `delete`, `get`, `list`, `download`, `upload`, `policy`; and
//! `"corrupt": {"download"|"upload": {"path": "<relative path>", "how": "flip"|"truncate"|"drop"}}`,
//! which damages that one file of the copy after it was made and still reports success (a
//! transport that corrupts silently): `flip` inverts the first byte, `truncate` cuts the file to
//! half its size, `drop` removes it; and `"silent": ["delete"]`, which makes a delete report
//! success without deleting anything.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    CheckedUpload, CreateSpec, Gateway, GatewayError, LiveSandbox, Liveness, PolicySpec, Unhealthy,
};
use crate::host::fstree::Node;
use crate::names::SandboxName;

/// Directory of the local gateway inside the NemoClaw home.
pub const LOCAL_DIR: &str = "local-gateway";
/// The fault-injection file inside the local gateway directory.
pub const FAULT_FILE: &str = "fault.json";

/// A sandbox's metadata file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalMeta {
    /// Gateway-assigned id (UUID v7).
    pub id: String,
    /// Sandbox name.
    pub name: String,
    /// Phase (`Ready`).
    pub phase: String,
    /// Creation time, RFC 3339 UTC.
    pub created_at: String,
    /// Image it was created from.
    pub image: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Agent kind.
    #[serde(default)]
    pub agent: Option<String>,
    /// GPU requested.
    #[serde(default)]
    pub gpu: bool,
    /// Policies applied, in order of first application.
    #[serde(default)]
    pub policies: Vec<PolicySpec>,
}

/// The embedded gateway.
#[derive(Debug, Clone)]
pub struct LocalGateway {
    root: PathBuf,
}

impl LocalGateway {
    /// Open (creating `<home>/local-gateway/sandboxes/` if needed) and clean leftovers of
    /// interrupted creates and deletes.
    pub fn open(home: &Path) -> Result<LocalGateway, GatewayError> {
        let root = home.join(LOCAL_DIR);
        crate::host::mkdir_private(&root.join("sandboxes"))
            .map_err(|e| io_err("cannot create", &root.join("sandboxes"), e))?;
        let gw = LocalGateway { root };
        gw.clean_leftovers();
        Ok(gw)
    }

    /// The gateway directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of one sandbox.
    pub fn sandbox_dir(&self, name: &SandboxName) -> PathBuf {
        self.root.join("sandboxes").join(name.as_str())
    }

    /// The live state tree of one sandbox (its `/sandbox/.openclaw`).
    pub fn state_dir(&self, name: &SandboxName) -> PathBuf {
        self.sandbox_dir(name).join("state")
    }

    fn clean_leftovers(&self) {
        let Ok(rd) = fs::read_dir(&self.root) else { return };
        for e in rd.filter_map(Result::ok) {
            let n = e.file_name().to_string_lossy().into_owned();
            let parts: Vec<&str> = n.split('.').collect();
            let stale = match parts.as_slice() {
                ["", "trash", ..] => true,
                // `.tmp.<name>.<pid>.<uuid>`: only a dead creator's temp dir is garbage; a live
                // one may be mid-create in another process.
                ["", "tmp", _, pid, _] => {
                    !pid.parse::<i32>().is_ok_and(crate::host::registry::pid_alive)
                }
                _ => false,
            };
            if stale {
                let _ = crate::host::fstree::remove_tree(&e.path());
            }
        }
    }

    /// A fresh temp directory name for `name`, owned by this process (see `clean_leftovers`).
    fn temp_dir(&self, name: &SandboxName) -> PathBuf {
        self.root.join(format!(".tmp.{name}.{}.{}", std::process::id(), uuid::Uuid::now_v7()))
    }

    /// Make the complete, durable tree at `stage` the state tree `state` in one rename: onto
    /// the empty `state/` of a fresh sandbox, or swapped with a filled one (`RENAME_EXCHANGE`),
    /// which leaves the old tree at `stage` for the caller to remove. Both names are in this
    /// gateway's directory, so on one filesystem.
    fn swap_in(&self, stage: &Path, state: &Path) -> Result<(), GatewayError> {
        let err = |e| io_err("cannot put the restored state in place at", state, e);
        match fs::rename(stage, state) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {
                if let Err(e) = rename_exchange(stage, state) {
                    if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
                        return Err(err(e));
                    }
                    // A filesystem without exchange: copy the accepted tree over the old one
                    // (one more read of it; the verification that follows reads what landed).
                    crate::host::backup::copy_tree(stage, state).map_err(host_err)?;
                    // Durable like the staged copy was, before the restore reports done.
                    crate::host::fstree::sync_tree(state).map_err(host_err)?;
                }
            }
            Err(e) => return Err(err(e)),
        }
        for dir in [state.parent().unwrap_or(&self.root), &self.root] {
            crate::util::fsync_dir(dir).map_err(|e| io_err("cannot sync", dir, e))?;
        }
        Ok(())
    }

    fn fault(&self) -> Fault {
        match fs::read(self.root.join(FAULT_FILE)) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or(Fault {
                health: Some("unknown".into()),
                foreign_active: None,
                fail: BTreeMap::new(),
                corrupt: BTreeMap::new(),
                silent: Vec::new(),
            }),
            Err(_) => Fault::default(),
        }
    }

    fn check(&self, op: &str) -> Result<(), GatewayError> {
        let f = self.fault();
        if let Some(l) = f.health_liveness(self.name()) {
            let detail = match l {
                Liveness::Unhealthy { detail, .. } | Liveness::Unknown { detail } => detail,
                _ => String::new(),
            };
            return Err(GatewayError::Unhealthy { gateway: self.name().to_owned(), detail });
        }
        match f.fail.get(op) {
            Some(msg) => Err(GatewayError::Other(msg.clone())),
            None => Ok(()),
        }
    }

    fn read_meta(&self, name: &SandboxName) -> Result<Option<LocalMeta>, GatewayError> {
        let p = self.sandbox_dir(name).join("meta.json");
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| GatewayError::Other(format!("{} is unreadable: {e}", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("cannot read", &p, e)),
        }
    }

    fn write_meta(&self, dir: &Path, meta: &LocalMeta) -> Result<(), GatewayError> {
        let p = dir.join("meta.json");
        let bytes = serde_json::to_vec_pretty(meta).expect("meta serialises");
        crate::util::atomic_write(&p, &bytes).map_err(|e| io_err("cannot write", &p, e))
    }

    fn require(&self, name: &SandboxName) -> Result<LocalMeta, GatewayError> {
        self.read_meta(name)?
            .ok_or_else(|| GatewayError::NotFound(name.to_string(), self.name().to_owned()))
    }
}

fn io_err(what: &str, path: &Path, source: std::io::Error) -> GatewayError {
    GatewayError::Io { context: format!("{what} {}", path.display()), source }
}

fn host_err(e: crate::host::HostError) -> GatewayError {
    match e {
        crate::host::HostError::Io { context, source } => GatewayError::Io { context, source },
        other => GatewayError::Other(other.to_string()),
    }
}

/// `renameat2(from, to, RENAME_EXCHANGE)`: swap two existing directories atomically.
fn rename_exchange(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: both paths are NUL-terminated; the syscall only reads them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn live(meta: &LocalMeta) -> LiveSandbox {
    LiveSandbox {
        id: meta.id.clone(),
        name: meta.name.clone(),
        phase: meta.phase.clone(),
        labels: meta.labels.clone(),
    }
}

#[derive(Debug, Default, Deserialize)]
struct Fault {
    #[serde(default)]
    health: Option<String>,
    #[serde(default)]
    foreign_active: Option<String>,
    #[serde(default)]
    fail: BTreeMap<String, String>,
    #[serde(default)]
    corrupt: BTreeMap<String, Corruption>,
    #[serde(default)]
    silent: Vec<String>,
}

/// A silent corruption of one file of a copy (test-only).
#[derive(Debug, Clone, Deserialize)]
struct Corruption {
    path: String,
    how: String,
}

impl Corruption {
    fn apply(&self, root: &Path) -> Result<(), GatewayError> {
        let p = root.join(&self.path);
        let r = match self.how.as_str() {
            "flip" => fs::read(&p).and_then(|mut b| {
                if let Some(x) = b.first_mut() {
                    *x = !*x;
                }
                fs::write(&p, b)
            }),
            "truncate" => fs::metadata(&p)
                .and_then(|m| fs::OpenOptions::new().write(true).open(&p)?.set_len(m.len() / 2)),
            "drop" => fs::remove_file(&p),
            other => {
                return Err(GatewayError::Other(format!(
                    "unknown corruption `{other}` (injected fault)"
                )))
            }
        };
        r.map_err(|e| io_err("cannot corrupt (injected fault)", &p, e))
    }
}

impl Fault {
    fn health_liveness(&self, gw: &str) -> Option<Liveness> {
        let h = self.health.as_deref()?;
        let unhealthy = |reason, detail: &str| Liveness::Unhealthy {
            reason,
            detail: detail.to_owned(),
            active: if reason == Unhealthy::Foreign { self.foreign_active.clone() } else { None },
        };
        Some(match h {
            "unreachable" => {
                unhealthy(Unhealthy::Unreachable, "local gateway unreachable (injected fault)")
            }
            "auth" => {
                unhealthy(Unhealthy::Auth, "local gateway refused authentication (injected fault)")
            }
            "identity" => {
                unhealthy(Unhealthy::Identity, "handshake verification failed (injected fault)")
            }
            "schema" => unhealthy(Unhealthy::Schema, "invalid wire type (injected fault)"),
            "foreign" => unhealthy(
                Unhealthy::Foreign,
                &format!(
                    "the active gateway is '{}', not '{gw}' (injected fault)",
                    self.foreign_active.as_deref().unwrap_or("?")
                ),
            ),
            other => Liveness::Unknown {
                detail: format!("local gateway state `{other}` (injected fault)"),
            },
        })
    }
}

impl Gateway for LocalGateway {
    fn name(&self) -> &str {
        "local"
    }

    fn health(&self) -> Option<Liveness> {
        if !self.root.join("sandboxes").is_dir() {
            return Some(Liveness::Unknown {
                detail: format!("{} is missing", self.root.display()),
            });
        }
        self.fault().health_liveness(self.name())
    }

    fn classify(&self, name: &SandboxName) -> Liveness {
        if let Some(bad) = self.health() {
            return bad;
        }
        if let Some(msg) = self.fault().fail.get("get") {
            return Liveness::Unknown { detail: msg.clone() };
        }
        // Health was just proved (above), so not-found here is a real absence.
        match self.read_meta(name) {
            Ok(Some(m)) => Liveness::Present(live(&m)),
            Ok(None) => Liveness::Missing,
            Err(e) => Liveness::Unknown { detail: e.to_string() },
        }
    }

    fn list(&self) -> Result<Vec<LiveSandbox>, GatewayError> {
        self.check("list")?;
        let dir = self.root.join("sandboxes");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| io_err("cannot list", &dir, e))? {
            let e = e.map_err(|err| io_err("cannot list", &dir, err))?;
            let Some(name) = e.file_name().to_str().and_then(|n| SandboxName::parse(n).ok()) else {
                continue;
            };
            if let Some(m) = self.read_meta(&name)? {
                out.push(live(&m));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn create(&self, spec: &CreateSpec) -> Result<LiveSandbox, GatewayError> {
        self.check("create")?;
        let final_dir = self.sandbox_dir(&spec.name);
        if final_dir.exists() {
            return Err(GatewayError::AlreadyExists(spec.name.to_string(), self.name().to_owned()));
        }
        let tmp = self.temp_dir(&spec.name);
        let meta = LocalMeta {
            id: uuid::Uuid::now_v7().to_string(),
            name: spec.name.to_string(),
            phase: "Ready".to_owned(),
            created_at: crate::util::iso_ms(crate::util::now_ms()),
            image: spec.image.clone(),
            labels: spec.labels.clone(),
            agent: spec.agent.clone(),
            gpu: spec.gpu,
            policies: Vec::new(),
        };
        let build = || -> Result<(), GatewayError> {
            crate::host::mkdir_private(&tmp.join("state"))
                .map_err(|e| io_err("cannot create", &tmp, e))?;
            self.write_meta(&tmp, &meta)?;
            crate::util::fsync_dir(&tmp).map_err(|e| io_err("cannot sync", &tmp, e))?;
            // The commit point: the rename makes the complete sandbox appear at once. Renaming
            // onto an existing (non-empty) sandbox fails, so a racing create cannot clobber it.
            fs::rename(&tmp, &final_dir).map_err(|e| {
                if final_dir.exists() {
                    GatewayError::AlreadyExists(spec.name.to_string(), "local".to_owned())
                } else {
                    io_err("cannot create", &final_dir, e)
                }
            })?;
            let parent = self.root.join("sandboxes");
            crate::util::fsync_dir(&parent).map_err(|e| io_err("cannot sync", &parent, e))
        };
        build().inspect_err(|_| {
            let _ = fs::remove_dir_all(&tmp);
        })?;
        Ok(live(&meta))
    }

    fn delete(&self, name: &SandboxName, _timeout: Duration) -> Result<(), GatewayError> {
        self.check("delete")?;
        if self.fault().silent.iter().any(|op| op == "delete") {
            return Ok(());
        }
        let dir = self.sandbox_dir(name);
        if !dir.exists() {
            return Ok(());
        }
        let trash = self.root.join(format!(".trash.{name}.{}", uuid::Uuid::now_v7()));
        // Rename first: from this durable rename on the sandbox is absent, even if removing the
        // files is interrupted (the next open finishes it).
        fs::rename(&dir, &trash).map_err(|e| io_err("cannot delete", &dir, e))?;
        let parent = self.root.join("sandboxes");
        crate::util::fsync_dir(&parent).map_err(|e| io_err("cannot sync", &parent, e))?;
        // Best effort: the rename above was the delete. Another process opening the gateway may
        // be removing the same trash directory right now (leftover cleaning), and a failure here
        // only leaves garbage that the next open removes.
        if let Err(e) = crate::host::fstree::remove_tree(&trash) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("could not remove {}: {e}; the next open will", trash.display());
            }
        }
        // Confirm absence.
        match self.read_meta(name)? {
            None => Ok(()),
            Some(_) => {
                Err(GatewayError::Other(format!("sandbox '{name}' is still present after delete")))
            }
        }
    }

    fn download_listed(
        &self,
        name: &SandboxName,
        dest: &Path,
    ) -> Result<Option<Vec<Node>>, GatewayError> {
        self.check("download")?;
        self.require(name)?;
        // The listing comes from the one read of the sandbox's files that fed the copy.
        let read =
            crate::host::backup::copy_tree_listed(&self.state_dir(name), dest).map_err(host_err)?;
        if let Some(c) = self.fault().corrupt.get("download") {
            c.apply(dest)?;
        }
        Ok(Some(read))
    }

    fn local_state_path(&self, name: &SandboxName) -> Option<PathBuf> {
        let dir = self.state_dir(name);
        dir.is_dir().then_some(dir)
    }

    fn upload_state(&self, name: &SandboxName, src: &Path) -> Result<(), GatewayError> {
        self.check("upload")?;
        self.require(name)?;
        crate::host::backup::copy_tree(src, &self.state_dir(name)).map_err(host_err)?;
        if let Some(c) = self.fault().corrupt.get("upload") {
            c.apply(&self.state_dir(name))?;
        }
        Ok(())
    }

    fn upload_checked(
        &self,
        name: &SandboxName,
        src: &Path,
        nodes: &[Node],
        accept: &dyn Fn(&[Node]) -> Result<(), String>,
    ) -> Result<CheckedUpload, GatewayError> {
        self.check("upload")?;
        self.require(name)?;
        let state = self.state_dir(name);
        // Staged beside the sandboxes, on the same filesystem: a crash leaves a temp directory
        // of a dead process, which the next open removes; the sandbox never sees a byte of it
        // before it was accepted.
        let stage = self.temp_dir(name);
        let staged = || -> Result<Result<(), String>, GatewayError> {
            crate::host::mkdir_private(&stage).map_err(|e| io_err("cannot create", &stage, e))?;
            // The one read of the source: it feeds the copy, and its digests are what `accept`
            // judges.
            let read = crate::host::fstree::copy_nodes(src, nodes, &stage).map_err(host_err)?;
            if let Err(why) = accept(&read) {
                return Ok(Err(why));
            }
            // Durable before it becomes the sandbox's state.
            crate::host::fstree::sync_tree(&stage).map_err(host_err)?;
            Ok(Ok(()))
        };
        match staged() {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                let _ = crate::host::fstree::remove_tree(&stage);
                return Ok(CheckedUpload::Refused(why));
            }
            Err(e) => {
                let _ = crate::host::fstree::remove_tree(&stage);
                return Err(e);
            }
        }
        self.swap_in(&stage, &state).inspect_err(|_| {
            let _ = crate::host::fstree::remove_tree(&stage);
        })?;
        // What was swapped out (if anything): garbage now, and the next open's if not ours.
        if let Err(e) = crate::host::fstree::remove_tree(&stage) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("could not remove {}: {e}; the next open will", stage.display());
            }
        }
        if let Some(c) = self.fault().corrupt.get("upload") {
            c.apply(&state)?;
        }
        Ok(CheckedUpload::Committed)
    }

    fn apply_policy(&self, name: &SandboxName, policy: &PolicySpec) -> Result<(), GatewayError> {
        self.check("policy")?;
        let mut meta = self.require(name)?;
        match meta.policies.iter_mut().find(|p| p.name() == policy.name()) {
            Some(p) => *p = policy.clone(),
            None => meta.policies.push(policy.clone()),
        }
        self.write_meta(&self.sandbox_dir(name), &meta)
    }

    fn applied_policies(&self, name: &SandboxName) -> Result<Vec<String>, GatewayError> {
        self.check("get")?;
        Ok(self.require(name)?.policies.iter().map(|p| p.name().to_owned()).collect())
    }
}

/// Raw metadata of a local sandbox, for status output.
pub fn meta_json(gw: &LocalGateway, name: &SandboxName) -> Option<Value> {
    fs::read(gw.sandbox_dir(name).join("meta.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}
