//! The `openshell` driver: drives the real `openshell` CLI for bindings `nemoclaw` and
//! `nemoclaw-<port>` (openshell.md).
//!
//! Every call: `-g <recorded gateway>` (nothing relies on the globally selected gateway, and the
//! driver never runs `gateway select`); `OPENSHELL_GATEWAY`, `OPENSHELL_GATEWAY_ENDPOINT` and
//! `OPENSHELL_WORKSPACE` scrubbed from the environment; stdin `/dev/null`; stdout and stderr
//! captured separately up to a size bound; its own process group, killed as a whole when the
//! call times out. A timeout is *unknown*, never *missing*.
//!
//! State moves with the CLI's `sandbox download` / `sandbox upload` (`tar` over `ssh`); what
//! that pipeline loses, and the digests that let a backup describe the sandbox's own files, go
//! through `sandbox exec` scripts (see [`super::sandbox_tree`]).
//!
//! Knobs (environment): `NEMOCLAW_OPENSHELL_TIMEOUT_MS` (per call, default 60 s),
//! `NEMOCLAW_OPENSHELL_CREATE_TIMEOUT_MS` (create and wait-until-ready, default 600 s),
//! `NEMOCLAW_OPENSHELL_POLL_MS` (delete / readiness polling interval, default 500 ms),
//! `NEMOCLAW_POLICY_PRESETS` (directory of `<preset>.yaml` files).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use super::classify::{self, CallOutput, Capabilities, ErrorText, Version};
use super::sandbox_tree;
use super::{CreateSpec, Gateway, GatewayError, LiveSandbox, Liveness, PolicySpec, Unhealthy};
use crate::host::fstree::{Keeps, Node};
use crate::names::SandboxName;

/// Where a sandbox's state lives inside it.
pub const SANDBOX_STATE_PATH: &str = "/sandbox/.openclaw";
/// The parent of [`SANDBOX_STATE_PATH`]: uploads go here, as a directory named
/// [`STATE_DIR_NAME`].
pub const SANDBOX_ROOT: &str = "/sandbox";
/// The basename of [`SANDBOX_STATE_PATH`].
pub const STATE_DIR_NAME: &str = ".openclaw";
/// Environment variables that would redirect `openshell` away from the recorded gateway.
/// `OPENSHELL_SANDBOX_POLICY` is the CLI's fallback for `create --policy`: a stray value would
/// silently become the replacement's policy.
pub const SCRUBBED_ENV: [&str; 4] = [
    "OPENSHELL_GATEWAY",
    "OPENSHELL_GATEWAY_ENDPOINT",
    "OPENSHELL_WORKSPACE",
    "OPENSHELL_SANDBOX_POLICY",
];
/// At most this much of stdout and of stderr is kept (the rest is drained and dropped).
pub const MAX_OUTPUT: usize = 4 << 20;
/// At most this much of a script's stdout is kept (a listing of a large tree); a listing cut
/// at the bound has no end marker and is refused.
pub const MAX_SCRIPT_OUTPUT: usize = 512 << 20;

fn env_ms(var: &str, default: u64) -> Duration {
    Duration::from_millis(std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default))
}

/// First executable `openshell` on PATH.
pub fn find_on_path() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("openshell")).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Run `program args` as openshell calls are run: scrubbed env, stdin null, own process group,
/// bounded capture, and on timeout SIGKILL to the whole group. ANSI is stripped from the output.
pub fn run_command(program: &Path, args: &[String], timeout: Duration) -> CallOutput {
    run_command_io(program, args, None, MAX_OUTPUT, timeout)
}

/// [`run_command`] with `stdin` written to the child (else `/dev/null`) and up to `limit`
/// bytes of stdout kept (also raw, in [`CallOutput::raw_stdout`]).
pub fn run_command_io(
    program: &Path,
    args: &[String],
    stdin: Option<Vec<u8>>,
    limit: usize,
    timeout: Duration,
) -> CallOutput {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for v in SCRUBBED_ENV {
        cmd.env_remove(v);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return CallOutput {
                spawn_error: Some(format!("{}: {e}", program.display())),
                ..Default::default()
            }
        }
    };
    let pgid = child.id() as i32;
    if let (Some(mut pipe), Some(data)) = (child.stdin.take(), stdin) {
        // A thread of its own: the child may fill its output pipes before it reads all of it.
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = pipe.write_all(&data);
        });
    }
    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    for (is_out, pipe) in [
        (true, child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>)),
        (false, child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>)),
    ] {
        let tx = tx.clone();
        let bound = if is_out { limit } else { MAX_OUTPUT };
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            if let Some(mut p) = pipe {
                let mut buf = [0u8; 8192];
                // Keep reading past the bound so the child never blocks on a full pipe.
                while let Ok(n) = p.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let room = bound.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
            let _ = tx.send((is_out, kept));
        });
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s.code(),
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                // SAFETY: kill(2) on our own child's process group; -pgid addresses the group.
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
                let _ = child.wait();
                break None;
            }
            // Deliberate polling: std has no wait-with-timeout; 5 ms keeps latency low.
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => {
                let _ = child.wait();
                break None;
            }
        }
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    // A grandchild that escaped the group could hold a pipe open forever: do not wait on it.
    let drain_deadline = Instant::now() + Duration::from_secs(2);
    for _ in 0..2 {
        let left = drain_deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((true, b)) => out = b,
            Ok((false, b)) => err = b,
            Err(_) => break,
        }
    }
    CallOutput {
        status,
        // The text is for messages and parsers of small answers: a script's large output is
        // read from `raw_stdout` only.
        stdout: classify::strip_ansi(&String::from_utf8_lossy(&out[..out.len().min(MAX_OUTPUT)])),
        raw_stdout: out,
        stderr: classify::strip_ansi(&String::from_utf8_lossy(&err)),
        timed_out,
        spawn_error: None,
    }
}

/// The openshell driver for one recorded gateway.
#[derive(Debug)]
pub struct OpenShellGateway {
    program: PathBuf,
    gateway: String,
    timeout: Duration,
    create_timeout: Duration,
    poll: Duration,
    exec_stdin_max: usize,
    version: OnceLock<Result<(Version, Capabilities), String>>,
}

impl OpenShellGateway {
    /// A driver running `program` against `gateway`. Runs nothing yet.
    pub fn new(program: PathBuf, gateway: &str) -> Self {
        OpenShellGateway {
            program,
            gateway: gateway.to_owned(),
            timeout: env_ms("NEMOCLAW_OPENSHELL_TIMEOUT_MS", 60_000),
            create_timeout: env_ms("NEMOCLAW_OPENSHELL_CREATE_TIMEOUT_MS", 600_000),
            poll: env_ms("NEMOCLAW_OPENSHELL_POLL_MS", 500),
            exec_stdin_max: sandbox_tree::MAX_STDIN,
            version: OnceLock::new(),
        }
    }

    /// Override the per-call timeout.
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Override the create (and wait-until-ready) timeout.
    pub fn with_create_timeout(mut self, t: Duration) -> Self {
        self.create_timeout = t;
        self
    }

    /// Override the polling interval of delete and readiness waits.
    pub fn with_poll(mut self, p: Duration) -> Self {
        self.poll = p;
        self
    }

    /// Override the most stdin bytes one `sandbox exec` call carries (a fix-up list longer
    /// than this is cut into several calls).
    pub fn with_exec_stdin_max(mut self, bytes: usize) -> Self {
        self.exec_stdin_max = bytes.max(1);
        self
    }

    /// The `openshell` version and its capability profile (one `--version` call, cached).
    pub fn version(&self) -> Result<(Version, Capabilities), GatewayError> {
        self.version
            .get_or_init(|| {
                let out = run_command(&self.program, &["--version".to_owned()], self.timeout);
                if !out.ok() {
                    return Err(format!("`openshell --version` failed: {}", out.summary()));
                }
                let v = Version::parse(&out.stdout).ok_or_else(|| {
                    format!("unrecognised `openshell --version` output: {}", out.stdout.trim())
                })?;
                Ok((v, Capabilities::of(v)))
            })
            .clone()
            .map_err(GatewayError::Other)
    }

    fn caps(&self) -> Option<Capabilities> {
        self.version().ok().map(|(_, c)| c)
    }

    /// Run one scoped call: `openshell <args...> -g <gateway>`.
    fn call(&self, args: &[&str], timeout: Duration) -> CallOutput {
        let mut argv: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        argv.push("-g".to_owned());
        argv.push(self.gateway.clone());
        let started = Instant::now();
        let out = run_command(&self.program, &argv, timeout);
        tracing::info!(
            "openshell {} → {} in {:.2}s",
            argv.join(" "),
            if out.timed_out { "timed out".to_owned() } else { format!("exit {:?}", out.status) },
            started.elapsed().as_secs_f64()
        );
        out
    }

    fn json_flag(&self, cap: impl Fn(Capabilities) -> bool) -> Vec<&'static str> {
        if self.caps().is_some_and(cap) {
            vec!["-o", "json"]
        } else {
            Vec::new()
        }
    }

    /// `status -g G`; on a non-healthy answer, look for a foreign active gateway.
    fn prove_health(&self) -> Option<Liveness> {
        if let Err(e) = self.version() {
            return Some(Liveness::Unknown { detail: e.to_string() });
        }
        let mut args = vec!["status"];
        args.extend(self.json_flag(|c| c.get_json));
        let out = self.call(&args, self.timeout);
        let bad = classify::classify_status(&out, &self.gateway)?;
        Some(match bad {
            Liveness::Unhealthy { reason: Unhealthy::Unreachable, detail, .. } => match self.active_gateway() {
                Some(active) if active != self.gateway => Liveness::Unhealthy {
                    reason: Unhealthy::Foreign,
                    detail: format!("gateway '{}' is not reachable ({detail}); the active gateway is '{active}'", self.gateway),
                    active: Some(active),
                },
                _ => Liveness::Unhealthy { reason: Unhealthy::Unreachable, detail, active: None },
            },
            other => other,
        })
    }

    /// The operator's active gateway (unscoped on purpose: this is the one question about the
    /// global selection). `gateway list -o json` first, plain `status` as a fallback.
    fn active_gateway(&self) -> Option<String> {
        let out = run_command(
            &self.program,
            &["gateway".into(), "list".into(), "-o".into(), "json".into()],
            self.timeout,
        );
        if out.ok() {
            if let Some(a) = classify::parse_active_gateway(&out.stdout) {
                return Some(a);
            }
        }
        let out = run_command(&self.program, &["status".into()], self.timeout);
        if out.ok()
            && classify::classify_status(&out, "")
                .is_none_or(|l| matches!(l, Liveness::Unhealthy { reason: Unhealthy::Foreign, .. }))
        {
            return classify::parse_active_gateway(&out.stdout);
        }
        None
    }

    fn get(&self, name: &str, health_proved: bool) -> Liveness {
        let mut args = vec!["sandbox", "get", name];
        args.extend(self.json_flag(|c| c.get_json));
        let out = self.call(&args, self.timeout);
        classify::classify_get(&out, name, health_proved)
    }

    fn fail(&self, out: &CallOutput, what: &str, name: &str, timeout: Duration) -> GatewayError {
        if out.timed_out {
            return GatewayError::Timeout {
                command: format!("openshell {what} -g {}", self.gateway),
                after: timeout,
            };
        }
        if let Some(e) = &out.spawn_error {
            return GatewayError::Spawn {
                program: self.program.display().to_string(),
                source: std::io::Error::other(e.clone()),
            };
        }
        if let Some(Liveness::Unhealthy { detail, .. }) = classify::gateway_trouble(out) {
            return GatewayError::Unhealthy { gateway: self.gateway.clone(), detail };
        }
        match classify::error_text(&out.text()) {
            Some(ErrorText::AlreadyExists) => {
                GatewayError::AlreadyExists(name.to_owned(), self.gateway.clone())
            }
            Some(ErrorText::NotFound) => {
                GatewayError::NotFound(name.to_owned(), self.gateway.clone())
            }
            _ => GatewayError::Other(format!(
                "`openshell {what} -g {}` failed: {}",
                self.gateway,
                out.summary()
            )),
        }
    }

    fn require_healthy(&self) -> Result<(), GatewayError> {
        match self.prove_health() {
            None => Ok(()),
            Some(l) => {
                Err(GatewayError::Unhealthy { gateway: self.gateway.clone(), detail: describe(&l) })
            }
        }
    }

    /// Run `script` inside the sandbox: `sandbox exec -n NAME --no-tty --timeout S -g G --
    /// sh -c SCRIPT nemoclaw ARGS...`, `stdin` piped in. Its whole stdout, which must end with
    /// the script's end marker: the CLI exits 0 when the stream ends without an exit status,
    /// so output without the marker is a failure, never a result.
    fn exec_script(
        &self,
        name: &SandboxName,
        what: &str,
        script: &str,
        args: &[String],
        stdin: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, GatewayError> {
        let secs = self.create_timeout.as_secs().max(1).to_string();
        let mut argv: Vec<String> = [
            "sandbox",
            "exec",
            "-n",
            name.as_str(),
            "--no-tty",
            "--timeout",
            &secs,
            "-g",
            &self.gateway,
            "--",
            "sh",
            "-c",
            script,
            "nemoclaw",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        argv.extend(args.iter().cloned());
        let started = Instant::now();
        // A little longer than the sandbox's own timeout, so that one fires first (exit 124).
        let out = run_command_io(
            &self.program,
            &argv,
            stdin,
            MAX_SCRIPT_OUTPUT,
            self.create_timeout + Duration::from_secs(10),
        );
        tracing::info!(
            "openshell sandbox exec -n {name} -g {} ({what}) → {} in {:.2}s",
            self.gateway,
            if out.timed_out { "timed out".to_owned() } else { format!("exit {:?}", out.status) },
            started.elapsed().as_secs_f64()
        );
        if !out.ok() {
            return Err(self.fail(
                &out,
                &format!("sandbox exec ({what})"),
                name.as_str(),
                self.create_timeout,
            ));
        }
        if sandbox_tree::finished(&out.raw_stdout).is_none() {
            return Err(GatewayError::Other(format!(
                "`openshell sandbox exec -n {name} -g {}` ({what}) ended without the script's end \
                 marker: the stream was cut short or the script did not finish, so nothing it \
                 printed is trusted",
                self.gateway
            )));
        }
        Ok(out.raw_stdout)
    }

    /// Put the metadata of `want` (what was uploaded, in walk order) on the sandbox's state
    /// tree where the CLI's upload lost it: one listing, then fix-up calls for what differs.
    fn fix_state(&self, name: &SandboxName, want: &[Node]) -> Result<(), GatewayError> {
        let got = self.listed(name, false)?;
        let ops = sandbox_tree::fixups(want, &got);
        let script = sandbox_tree::fixup_script();
        for (args, stdin) in sandbox_tree::fixup_calls(&ops, self.exec_stdin_max) {
            self.exec_script(name, "metadata fix-up", &script, &args, Some(stdin))?;
        }
        Ok(())
    }

    /// The state tree listed inside the sandbox (see [`Gateway::list_state`]).
    fn listed(&self, name: &SandboxName, digests: bool) -> Result<Vec<Node>, GatewayError> {
        let args = if digests { vec!["digests".to_owned()] } else { Vec::new() };
        let what = if digests { "listing with digests" } else { "listing" };
        let out = self.exec_script(name, what, &sandbox_tree::listing_script(), &args, None)?;
        sandbox_tree::parse_listing(&out, digests).map_err(|e| {
            GatewayError::Other(format!(
                "the state of '{name}' listed inside the sandbox (gateway '{}'): {e}",
                self.gateway
            ))
        })
    }

    /// The CLI's `sandbox download` of the state tree into `dest`, as it comes.
    fn download_raw(&self, name: &SandboxName, dest: &Path) -> Result<(), GatewayError> {
        crate::host::mkdir_private(dest).map_err(|e| GatewayError::Io {
            context: format!("cannot create {}", dest.display()),
            source: e,
        })?;
        let d = dest.to_string_lossy();
        let download = || {
            self.call(
                &["sandbox", "download", name.as_str(), SANDBOX_STATE_PATH, &d],
                self.create_timeout,
            )
        };
        let mut out = download();
        // The CLI stops reading the archive at its end marker and closes the pipe; the
        // sandbox's `tar` may still be writing its record padding and die of SIGPIPE (observed
        // with v0.0.111 on archives of tens of MiB: `ssh tar create exited with status exit
        // status: 141`). Nothing was lost, but the unpacked tree cannot be trusted to be whole:
        // clear it and download once more.
        if !out.ok()
            && classify::report_words(&out.text()).contains("exited with status exit status: 141")
        {
            let io = |e| GatewayError::Io {
                context: format!("cannot clear {}", dest.display()),
                source: e,
            };
            std::fs::remove_dir_all(dest).map_err(io)?;
            crate::host::mkdir_private(dest).map_err(io)?;
            out = download();
        }
        if !out.ok() {
            return Err(self.fail(&out, "sandbox download", name.as_str(), self.create_timeout));
        }
        // A directory download unpacks the directory's *contents* into DEST (real CLI 0.0.111):
        // nothing to move afterwards.
        Ok(())
    }

    /// Poll `get` until the sandbox is ready (or the deadline passes).
    fn wait_ready(&self, name: &str, deadline: Instant) -> Result<LiveSandbox, GatewayError> {
        loop {
            match self.get(name, false) {
                Liveness::Present(s) if s.is_ready() => return Ok(s),
                Liveness::Present(s) if s.phase == "Error" => {
                    return Err(GatewayError::Other(format!(
                        "sandbox '{name}' went to phase Error after create"
                    )))
                }
                Liveness::Present(_) | Liveness::Unknown { .. } if Instant::now() < deadline => {}
                Liveness::Present(s) => {
                    return Err(GatewayError::Timeout {
                        command: format!(
                            "waiting for '{name}' to become Ready (phase {})",
                            s.phase
                        ),
                        after: self.create_timeout,
                    })
                }
                other => {
                    return Err(GatewayError::Other(format!(
                        "sandbox '{name}' after create: {}",
                        describe(&other)
                    )))
                }
            }
            std::thread::sleep(self.poll);
        }
    }
}

/// One line describing a non-present liveness.
pub fn describe(l: &Liveness) -> String {
    match l {
        Liveness::Present(s) => format!("present (id {}, phase {})", s.id, s.phase),
        Liveness::Missing => "missing".to_owned(),
        Liveness::Unhealthy { detail, .. } | Liveness::Unknown { detail } => detail.clone(),
    }
}

/// The policy in `policy get --full` output: everything after the first `---` line (the lines
/// before it are `Version:`, `Hash:`, `Status:` ... of the revision). `None` when there is no
/// such line or nothing after it.
pub fn policy_body(stdout: &str) -> Option<String> {
    let mut lines = stdout.split_inclusive('\n');
    lines.by_ref().find(|l| l.trim_end() == "---")?;
    let body: String = lines.collect();
    (!body.trim().is_empty()).then_some(body)
}

fn too_old(v: Version, what: &str, first: &str) -> GatewayError {
    GatewayError::TooOld(format!(
        "openshell {v} is too old for {what}: it needs {first} or newer; upgrade openshell"
    ))
}

/// A hard-linked view of the tree `src` at `dest` (created): directories made with the
/// source's mode and mtime, files linked (same inode, so same bytes, mode and mtime), symlinks
/// recreated as links with their mtime. Nothing is followed.
fn link_view(src: &Path, dest: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = |from: &Path, to: &Path, link: bool| -> std::io::Result<()> {
        let m = std::fs::symlink_metadata(from)?;
        let ns = m.mtime() * 1_000_000_000 + m.mtime_nsec();
        crate::host::fstree::set_path_meta(to, m.mode() & 0o7777, Some(ns), link)
            .map_err(|e| std::io::Error::other(e.to_string()))
    };
    crate::host::mkdir_private(dest)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let (from, to) = (e.path(), dest.join(e.file_name()));
        let ft = e.file_type()?;
        if ft.is_dir() {
            link_view(&from, &to)?;
            meta(&from, &to, false)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
            meta(&from, &to, true)?;
        } else if ft.is_file() {
            std::fs::hard_link(&from, &to)?;
        } else {
            return Err(std::io::Error::other(format!(
                "{} is not a regular file, directory or symlink",
                from.display()
            )));
        }
    }
    Ok(())
}

/// The YAML of a preset (from `NEMOCLAW_POLICY_PRESETS/<name>.yaml`, NemoClaw's blueprint
/// presets directory) or of a custom policy (its registry `content`). Names are checked with
/// the sandbox-name rule before they reach a path; there is no fallback body.
fn preset_body(p: &PolicySpec) -> Result<String, GatewayError> {
    SandboxName::parse(p.name()).map_err(|e| {
        GatewayError::Other(format!("invalid policy preset name '{}': {e}", p.name()))
    })?;
    match p {
        PolicySpec::Custom { content, .. } => Ok(content.clone()),
        PolicySpec::Preset { name: preset } => {
            let dir = std::env::var_os("NEMOCLAW_POLICY_PRESETS").map(PathBuf::from);
            let Some(path) = dir.map(|d| d.join(format!("{preset}.yaml"))).filter(|p| p.is_file())
            else {
                return Err(GatewayError::Other(format!(
                    "policy preset '{preset}' not found (give NemoClaw's presets directory with --policy-presets DIR or NEMOCLAW_POLICY_PRESETS)"
                )));
            };
            std::fs::read_to_string(&path).map_err(|e| GatewayError::Io {
                context: format!("cannot read {}", path.display()),
                source: e,
            })
        }
    }
}

fn entries_of(p: &PolicySpec, body: &str) -> Result<serde_yaml_ng::Mapping, GatewayError> {
    super::policy::preset_entries(body)
        .map_err(|e| GatewayError::Other(format!("policy '{}': {e}", p.name())))
}

fn temp_policy_file(content: &str) -> Result<PathBuf, GatewayError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = std::env::temp_dir().join(format!("nemoclaw-policy-{}.yaml", uuid::Uuid::now_v7()));
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&p).map_err(
            |e| GatewayError::Io { context: format!("cannot write {}", p.display()), source: e },
        )?;
    f.write_all(content.as_bytes()).map_err(|e| GatewayError::Io {
        context: format!("cannot write {}", p.display()),
        source: e,
    })?;
    Ok(p)
}

impl Gateway for OpenShellGateway {
    fn name(&self) -> &str {
        &self.gateway
    }

    fn health(&self) -> Option<Liveness> {
        self.prove_health()
    }

    fn classify(&self, name: &SandboxName) -> Liveness {
        if let Some(bad) = self.prove_health() {
            return bad;
        }
        // The recorded gateway was just proved healthy: a scoped not-found is a real absence.
        self.get(name.as_str(), true)
    }

    fn list(&self) -> Result<Vec<LiveSandbox>, GatewayError> {
        let json = self.caps().is_some_and(|c| c.list_json);
        let mut all = Vec::new();
        let page = 100usize;
        for offset in (0..).step_by(page) {
            let (l, o) = (page.to_string(), offset.to_string());
            let mut args = vec!["sandbox", "list", "--limit", &l, "--offset", &o];
            if json {
                args.extend(["-o", "json"]);
            }
            let out = self.call(&args, self.timeout);
            if !out.ok() {
                return Err(self.fail(&out, "sandbox list", "", self.timeout));
            }
            let rows = classify::parse_list(&out.stdout).map_err(|e| {
                GatewayError::Other(format!("unparsable `openshell sandbox list` output: {e}"))
            })?;
            let n = rows.len();
            all.extend(rows);
            if n < page {
                break;
            }
        }
        Ok(all)
    }

    fn create(&self, spec: &CreateSpec) -> Result<LiveSandbox, GatewayError> {
        let (v, caps) = self.version()?;
        if !caps.label {
            // The run label is how an interrupted create is recognised: never create without it.
            return Err(too_old(v, "sandbox create --label", "0.0.37"));
        }
        let name = spec.name.as_str();
        let mut args: Vec<String> = ["sandbox", "create", "--name", name, "--from", &spec.image]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        for (k, v) in &spec.labels {
            args.push("--label".to_owned());
            args.push(format!("{k}={v}"));
        }
        if self.caps().is_some_and(|c| c.get_json) {
            args.extend(["-o".to_owned(), "json".to_owned()]);
        }
        // The captured policy goes in at creation: static fields (filesystem, landlock,
        // process) can only be set then. A 0600 file, removed as soon as the call returns.
        let policy_file = match &spec.policy {
            Some(body) => Some(temp_policy_file(body)?),
            None => None,
        };
        if spec.gpu {
            // The registry row says the old sandbox had a GPU (`gpuEnabled: true`).
            args.push("--gpu".to_owned());
        }
        for p in &spec.providers {
            // The old sandbox's provider (checked to exist on the gateway in preflight).
            SandboxName::parse(p)
                .map_err(|e| GatewayError::Other(format!("invalid provider name '{p}': {e}")))?;
            args.push("--provider".to_owned());
            args.push(p.clone());
        }
        if let Some(f) = &policy_file {
            args.push("--policy".to_owned());
            args.push(f.to_string_lossy().into_owned());
        }
        let started = Instant::now();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.call(&refs, self.create_timeout);
        if let Some(f) = &policy_file {
            let _ = std::fs::remove_file(f);
        }
        let deadline = started + self.create_timeout;
        if out.timed_out {
            // Never retry blindly: adopt only a sandbox carrying this run's label.
            return match (self.get(name, false), spec.labels.get("rebuild-run")) {
                (Liveness::Present(s), Some(run)) if s.labels.get("rebuild-run") == Some(run) => {
                    self.wait_ready(name, Instant::now() + self.create_timeout)
                }
                _ => Err(self.fail(&out, "sandbox create", name, self.create_timeout)),
            };
        }
        if !out.ok() {
            return Err(self.fail(&out, "sandbox create", name, self.create_timeout));
        }
        if let Ok(s) = classify::parse_sandbox(out.stdout.trim()) {
            if s.name == name && s.is_ready() {
                return Ok(s);
            }
        }
        self.wait_ready(name, deadline)
    }

    fn delete(&self, name: &SandboxName, timeout: Duration) -> Result<(), GatewayError> {
        self.require_healthy()?;
        let out = self.call(&["sandbox", "delete", name.as_str()], self.timeout);
        if !out.ok() && classify::error_text(&out.text()) != Some(ErrorText::NotFound) {
            return Err(self.fail(&out, "sandbox delete", name.as_str(), self.timeout));
        }
        // Deletion is asynchronous: poll until the scoped query says not-found, then prove the
        // gateway healthy once more so the absence is not a transient gateway problem.
        let deadline = Instant::now() + timeout;
        loop {
            match self.get(name.as_str(), true) {
                Liveness::Missing => {
                    self.require_healthy()?;
                    return Ok(());
                }
                Liveness::Present(_) if Instant::now() < deadline => std::thread::sleep(self.poll),
                Liveness::Present(s) => {
                    return Err(GatewayError::Timeout {
                        command: format!("waiting for '{name}' to be deleted (phase {})", s.phase),
                        after: timeout,
                    })
                }
                other => {
                    return Err(GatewayError::Other(format!(
                        "could not confirm that '{name}' was deleted: {}",
                        describe(&other)
                    )))
                }
            }
        }
    }

    /// The sandbox lists its state tree with digests (the source, as it is in the sandbox),
    /// the CLI downloads it, and what its `tar` pipeline lost on the way — sub-second and
    /// directory mtimes, setuid/setgid/sticky bits, holes — is put back from the listing.
    /// The caller checks the copy against the listing.
    fn download_listed(
        &self,
        name: &SandboxName,
        dest: &Path,
    ) -> Result<Option<Vec<Node>>, GatewayError> {
        let listing = self.listed(name, true)?;
        self.download_raw(name, dest)?;
        crate::host::fstree::apply_meta(dest, &listing).map_err(|e| GatewayError::Io {
            context: format!("cannot restore the metadata of the download in {}", dest.display()),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(Some(listing))
    }

    fn list_state(
        &self,
        name: &SandboxName,
        digests: bool,
    ) -> Result<Option<Vec<Node>>, GatewayError> {
        self.listed(name, digests).map(Some)
    }

    /// Everything: the CLI's `sandbox download` (real CLI 0.0.111) loses sub-second and
    /// directory mtimes and setuid/setgid/sticky bits and fills holes, and
    /// [`Gateway::download_listed`] puts them back from the listing taken in the sandbox.
    fn download_keeps(&self) -> Keeps {
        Keeps::ALL
    }

    /// Everything: the CLI's `sandbox upload` keeps whole-second mtimes and stores every name
    /// of a hard-linked inode as a file of its own, and [`Gateway::upload_state`] fixes both
    /// inside the sandbox afterwards.
    fn upload_keeps(&self) -> Keeps {
        Keeps::ALL
    }

    fn upload_state(&self, name: &SandboxName, src: &Path) -> Result<(), GatewayError> {
        // A directory upload lands at `DEST/<basename of SRC>/` (since 0.0.37): to fill
        // `/sandbox/.openclaw`, stage a directory named `.openclaw` (a hard-linked view of
        // `src`, no copying) and upload it to `/sandbox`. `--no-git-ignore`: a home inside a
        // git work tree must not have files filtered out by `.gitignore`.
        let (v, caps) = self.version()?;
        if !caps.label {
            return Err(too_old(v, "sandbox upload (nesting under DEST/<basename>)", "0.0.37"));
        }
        let wrapper = src.with_file_name(format!(
            "{}.upload",
            src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        ));
        let io = |what: &str, p: &Path, e| GatewayError::Io {
            context: format!("cannot {what} {}", p.display()),
            source: e,
        };
        if wrapper.exists() {
            std::fs::remove_dir_all(&wrapper).map_err(|e| io("clear", &wrapper, e))?;
        }
        crate::host::mkdir_private(&wrapper).map_err(|e| io("create", &wrapper, e))?;
        let staged = wrapper.join(STATE_DIR_NAME);
        let result = link_view(src, &staged).map_err(|e| io("stage", &staged, e)).and_then(|()| {
            let s = staged.to_string_lossy();
            let out = self.call(
                &["sandbox", "upload", "--no-git-ignore", name.as_str(), &s, SANDBOX_ROOT],
                self.create_timeout,
            );
            if out.ok() {
                Ok(())
            } else {
                Err(self.fail(&out, "sandbox upload", name.as_str(), self.create_timeout))
            }
        });
        let _ = std::fs::remove_dir_all(&wrapper);
        result?;
        // What the CLI's archive lost (sub-second mtimes, hard links, and a mode or mtime its
        // extraction did not set) is fixed inside the sandbox from the tree that was sent.
        let want = crate::host::fstree::walk(src).map_err(|e| GatewayError::Io {
            context: format!("cannot list {}", src.display()),
            source: std::io::Error::other(e.to_string()),
        })?;
        self.fix_state(name, &want)
    }

    fn apply_policy(&self, name: &SandboxName, policy: &PolicySpec) -> Result<(), GatewayError> {
        self.apply_policies(name, std::slice::from_ref(policy)).remove(0)
    }

    /// NemoClaw's way (see [`super::policy`]): read the live policy, merge every preset's
    /// `network_policies` into it by key, and write the whole result once with `--wait`.
    fn apply_policies(
        &self,
        name: &SandboxName,
        policies: &[PolicySpec],
    ) -> Vec<Result<(), GatewayError>> {
        let entries: Vec<Result<_, GatewayError>> =
            policies.iter().map(|p| preset_body(p).and_then(|b| entries_of(p, &b))).collect();
        let ok: Vec<_> = entries.iter().filter_map(|e| e.as_ref().ok().cloned()).collect();
        let written = if ok.is_empty() {
            Ok(())
        } else {
            self.live_policy(name).and_then(|live| {
                let live = live.unwrap_or_default();
                let merged = super::policy::merge(&live, &ok).map_err(|e| {
                    GatewayError::Other(format!(
                        "cannot merge presets into the live policy of '{name}': {e}"
                    ))
                })?;
                if merged == live {
                    Ok(())
                } else {
                    self.set_policy(name, &merged)
                }
            })
        };
        entries
            .into_iter()
            .map(|e| match (e, &written) {
                (Err(e), _) => Err(e),
                (Ok(_), Ok(())) => Ok(()),
                (Ok(_), Err(w)) => Err(GatewayError::Other(w.to_string())),
            })
            .collect()
    }

    fn provider_exists(&self, provider: &str) -> Result<Option<bool>, GatewayError> {
        // Checked like a sandbox name before it reaches a command line.
        SandboxName::parse(provider)
            .map_err(|e| GatewayError::Other(format!("invalid provider name '{provider}': {e}")))?;
        let out = self.call(&["provider", "get", provider], self.timeout);
        if out.ok() {
            return Ok(Some(true));
        }
        let words = classify::report_words(&out.stderr);
        if !out.timed_out && words.contains("not found") && !words.contains("gateway") {
            return Ok(Some(false));
        }
        Err(self.fail(&out, "provider get", provider, self.timeout))
    }

    fn missing_policies(
        &self,
        name: &SandboxName,
        policies: &[PolicySpec],
    ) -> Result<Vec<String>, GatewayError> {
        let live = self.live_policy(name)?.unwrap_or_default();
        let mut missing = Vec::new();
        for p in policies {
            let applied = match preset_body(p).and_then(|b| entries_of(p, &b)) {
                Ok(entries) => super::policy::is_applied(&live, &entries).map_err(|e| {
                    GatewayError::Other(format!("the live policy of '{name}': {e}"))
                })?,
                // A preset that cannot be read is not in force (apply says why).
                Err(_) => false,
            };
            if !applied {
                missing.push(p.name().to_owned());
            }
        }
        Ok(missing)
    }

    fn live_policy(&self, name: &SandboxName) -> Result<Option<String>, GatewayError> {
        let out = self.call(&["policy", "get", "--full", name.as_str()], self.timeout);
        if !out.ok() {
            return Err(self.fail(&out, "policy get --full", name.as_str(), self.timeout));
        }
        match policy_body(&out.stdout) {
            Some(body) => Ok(Some(body)),
            None => Err(GatewayError::Other(format!(
                "`openshell policy get --full {name} -g {}` printed no policy after a `---` line",
                self.gateway
            ))),
        }
    }

    fn set_policy(&self, name: &SandboxName, body: &str) -> Result<(), GatewayError> {
        let file = temp_policy_file(body)?;
        let f = file.to_string_lossy().into_owned();
        let out = self
            .call(&["policy", "set", name.as_str(), "--policy", &f, "--wait"], self.create_timeout);
        let _ = std::fs::remove_file(&file);
        if !out.ok() {
            return Err(self.fail(&out, "policy set", name.as_str(), self.create_timeout));
        }
        Ok(())
    }

    fn applied_policies(&self, _name: &SandboxName) -> Result<Vec<String>, GatewayError> {
        // The gateway keeps no names: comments are dropped when it re-serialises a policy.
        Ok(Vec::new())
    }
}
