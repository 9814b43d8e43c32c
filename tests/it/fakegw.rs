//! The real `openshell` CLI against a loopback fake gateway (`tests/fake-gateway/`): the Python
//! gRPC server speaking `openshell.v1.OpenShell`, and a fake `ssh` first on `PATH` that runs the
//! CLI's remote `tar` commands in the sandbox's directory. Runs whenever
//! `NEMOCLAW_TEST_OPENSHELL` names the binary (`.ci/run` points it at the shared v0.0.111 build)
//! and Python can import `grpc` and `openshell`; otherwise each test prints why it skipped.

#![allow(dead_code)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fake-gateway")
}

/// The real CLI, or why the real-CLI tests skip.
pub fn real_cli() -> Result<PathBuf, String> {
    let Some(p) = std::env::var_os("NEMOCLAW_TEST_OPENSHELL").filter(|p| !p.is_empty()) else {
        return Err(
            "NEMOCLAW_TEST_OPENSHELL is not set (point it at a real `openshell` binary)".into()
        );
    };
    let p = PathBuf::from(p);
    if !p.is_file() {
        return Err(format!("NEMOCLAW_TEST_OPENSHELL={} is not a file", p.display()));
    }
    let ok = Command::new("python3")
        .args(["-c", "import grpc, openshell._proto.openshell_pb2"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    // Asked for the real CLI but unable to run its gateway: a failure, not a silent skip.
    assert!(
        ok,
        "NEMOCLAW_TEST_OPENSHELL is set but python3 cannot import grpc and openshell \
         (pip install openshell==0.0.116)"
    );
    Ok(p)
}

/// One fake gateway process, registered with the real CLI under `name` in a private config dir.
pub struct FakeGateway {
    pub tmp: tempfile::TempDir,
    pub name: String,
    pub port: u16,
    pub cli: PathBuf,
    child: Child,
}

impl FakeGateway {
    /// Start it, or `None` (with the reason printed) when the real CLI cannot run here.
    pub fn start(name: &str) -> Option<FakeGateway> {
        let cli = match real_cli() {
            Ok(c) => c,
            Err(why) => {
                eprintln!("skipping the real-openshell test: {why}");
                return None;
            }
        };
        let tmp = tempfile::Builder::new().prefix("nemoclaw-fakegw-").tempdir().unwrap();
        let state = tmp.path().join("state");
        let child = Command::new("python3")
            .arg(dir().join("fake_gateway.py"))
            .arg("--state")
            .arg(&state)
            .args(["--port", "0"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start the fake gateway");
        let deadline = Instant::now() + Duration::from_secs(20);
        let port = loop {
            if let Some(p) = std::fs::read_to_string(state.join("port"))
                .ok()
                .and_then(|s| s.trim().parse::<u16>().ok())
            {
                break p;
            }
            assert!(Instant::now() < deadline, "the fake gateway did not start in 20 s");
            // Deliberate: waiting for another process to write its port file.
            std::thread::sleep(Duration::from_millis(20));
        };
        let gw = FakeGateway { tmp, name: name.to_owned(), port, cli, child };
        gw.register(name, &format!("http://127.0.0.1:{port}"));
        Some(gw)
    }

    /// Register another gateway name in the same CLI config (e.g. one nobody listens on).
    pub fn register(&self, name: &str, endpoint: &str) {
        let d = self.config().join("openshell/gateways").join(name);
        std::fs::create_dir_all(&d).unwrap();
        let meta = serde_json::json!({"name": name, "gateway_endpoint": endpoint,
            "is_remote": false, "gateway_port": 0, "auth_mode": "plaintext"});
        std::fs::write(d.join("metadata.json"), meta.to_string()).unwrap();
        self.select(name);
    }

    /// Make `name` the operator's active gateway.
    pub fn select(&self, name: &str) {
        std::fs::write(self.config().join("openshell/active_gateway"), name).unwrap();
    }

    /// A gateway name registered at a port that refuses connections.
    pub fn register_refused(&self, name: &str) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        self.register(name, &format!("http://127.0.0.1:{port}"));
    }

    pub fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    pub fn config(&self) -> PathBuf {
        self.tmp.path().join("config")
    }

    /// What a child process needs to reach this gateway through the real CLI.
    pub fn env(&self) -> Vec<(OsString, OsString)> {
        let path = std::env::join_paths(
            std::iter::once(dir())
                .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
        )
        .unwrap();
        vec![
            ("XDG_CONFIG_HOME".into(), self.config().into()),
            ("PATH".into(), path),
            ("FAKE_GATEWAY_STATE".into(), self.state().into()),
            ("NEMOCLAW_OPENSHELL".into(), self.cli.clone().into()),
            ("NEMOCLAW_OPENSHELL_POLL_MS".into(), "20".into()),
        ]
    }

    /// An `openshell` wrapper script that reaches this gateway from any process (its config
    /// dir, the fake `ssh` first on `PATH`) and logs every invocation to `invocations.log`:
    /// what the driver runs when it is used in-process.
    pub fn wrapper(&self) -> PathBuf {
        let wrapper = self.tmp.path().join("bin/openshell");
        if wrapper.is_file() {
            return wrapper;
        }
        std::fs::create_dir_all(wrapper.parent().unwrap()).unwrap();
        let log = self.tmp.path().join("invocations.log");
        let mut script = String::from("#!/bin/sh\n");
        for (k, v) in self.env() {
            let (k, v) = (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned());
            if !k.starts_with("NEMOCLAW_") {
                script.push_str(&format!("export {k}='{v}'\n"));
            }
        }
        // Any OPENSHELL_* variable that reached the CLI is recorded in env.log.
        script.push_str(&format!(
            "env | grep '^OPENSHELL_' >> '{}'\nprintf '%s\\n' \"$*\" >> '{}'\nexec '{}' \"$@\"\n",
            self.tmp.path().join("env.log").display(),
            log.display(),
            self.cli.display()
        ));
        crate::common::write_script(&wrapper, &script);
        wrapper
    }

    /// Invocations of [`FakeGateway::wrapper`] so far (argv joined by spaces).
    pub fn invocations(&self) -> Vec<String> {
        std::fs::read_to_string(self.tmp.path().join("invocations.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Run the real CLI itself.
    pub fn openshell(&self, args: &[&str]) -> std::process::Output {
        let mut c = Command::new(&self.cli);
        c.args(args).stdin(Stdio::null());
        for (k, v) in self.env() {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    /// Set the faults (`faults.json`, re-read by the gateway on every call).
    pub fn faults(&self, v: Value) {
        let tmp = self.state().join("faults.json.tmp");
        std::fs::write(&tmp, v.to_string()).unwrap();
        std::fs::rename(tmp, self.state().join("faults.json")).unwrap();
    }

    /// The gateway's sandboxes, by name.
    pub fn sandboxes(&self) -> serde_json::Map<String, Value> {
        let v: Value =
            serde_json::from_slice(&std::fs::read(self.state().join("index.json")).unwrap())
                .unwrap();
        v.as_object().cloned().unwrap_or_default()
    }

    /// The directory playing `/sandbox` of sandbox `name`.
    pub fn sandbox_root(&self, name: &str) -> Option<PathBuf> {
        self.sandboxes().get(name).and_then(|s| s["root"].as_str()).map(PathBuf::from)
    }

    /// RPCs made so far: `(method, sandbox name)`.
    pub fn calls(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(self.state().join("calls.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| {
                (
                    v["method"].as_str().unwrap_or("").to_owned(),
                    v["name"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }
}

impl Drop for FakeGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `policy get --full` body (after the `---` line), through the real CLI.
pub fn live_policy(gw: &FakeGateway, name: &str) -> String {
    let o = gw.openshell(&["policy", "get", "--full", name, "-g", &gw.name]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    out.split_once("\n---\n").expect("a --- line").1.to_owned()
}

/// Change alpha's live policy through the real CLI as an operator would: a network rule and a
/// static field (a read-only path: a live sandbox accepts added paths); returns the new policy.
fn add_corp_rule(gw: &FakeGateway) -> String {
    let custom = gw.tmp.path().join("custom.yaml");
    let mut body: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&live_policy(gw, "alpha")).unwrap();
    let corp: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        "name: corp\nendpoints:\n- host: proxy.corp.example\n  port: 3128\n",
    )
    .unwrap();
    let net = &mut body["network_policies"];
    if !net.is_mapping() {
        *net = serde_yaml_ng::Value::Mapping(Default::default());
    }
    net.as_mapping_mut().unwrap().insert("corp".into(), corp);
    let ro = body["filesystem_policy"]["read_only"].as_sequence_mut().expect("read_only paths");
    ro.push("/opt/corp-data".into());
    std::fs::write(&custom, serde_yaml_ng::to_string(&body).unwrap()).unwrap();
    let o = gw.openshell(&["policy", "set", "alpha", "--policy", &sh(&custom), "-g", &gw.name]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let after = live_policy(gw, "alpha");
    assert!(after.contains("/opt/corp-data") && after.contains("proxy.corp.example"), "{after}");
    after
}

fn sh(p: &Path) -> String {
    p.display().to_string()
}

// --- the harness itself, through the real CLI -----------------------------------------------

#[test]
fn real_cli_create_get_list_delete() {
    let Some(gw) = FakeGateway::start("nemoclaw") else { return };
    let o = gw.openshell(&[
        "sandbox",
        "create",
        "--name",
        "alpha",
        "--from",
        "img:1",
        "--label",
        "rebuild-run=r1",
        "-o",
        "json",
        "-g",
        "nemoclaw",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["name"].as_str(), v["phase"].as_str()), (Some("alpha"), Some("Ready")));
    assert_eq!(v["labels"]["rebuild-run"], "r1");
    let o = gw.openshell(&["sandbox", "list", "-o", "json", "-g", "nemoclaw"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    let o = gw.openshell(&["sandbox", "delete", "alpha", "-g", "nemoclaw"]);
    assert!(o.status.success());
    let o = gw.openshell(&["sandbox", "get", "alpha", "-o", "json", "-g", "nemoclaw"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Some requested entity was not found"));
    assert!(gw.sandboxes().is_empty());
}

#[test]
fn real_cli_upload_nests_under_the_basename_and_download_unpacks_contents() {
    let Some(gw) = FakeGateway::start("nemoclaw") else { return };
    let o = gw.openshell(&[
        "sandbox", "create", "--name", "alpha", "--from", "img:1", "-o", "json", "-g", "nemoclaw",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let src = gw.tmp.path().join("work/state-src");
    std::fs::create_dir_all(src.join("workspace")).unwrap();
    std::fs::write(src.join("workspace/a.md"), "a\n").unwrap();
    let o = gw.openshell(&[
        "sandbox",
        "upload",
        "alpha",
        &sh(&src),
        "/sandbox/.openclaw",
        "-g",
        "nemoclaw",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let root = gw.sandbox_root("alpha").unwrap();
    assert!(root.join(".openclaw/state-src/workspace/a.md").is_file(), "nested under the basename");
    let dl = gw.tmp.path().join("work/dl");
    let o = gw.openshell(&[
        "sandbox",
        "download",
        "alpha",
        "/sandbox/.openclaw",
        &sh(&dl),
        "-g",
        "nemoclaw",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(dl.join("state-src/workspace/a.md").is_file(), "contents unpacked into DEST");
}

/// `sandbox exec` as the real CLI drives it: piped stdin goes in the request (over 4 MiB is
/// refused before any call), output comes back byte for byte, the exit code is the remote
/// command's, the argv is joined with single quotes where needed, `--timeout` gives 124, and a
/// stream that ends without an exit status makes the CLI exit 0.
#[test]
fn real_cli_exec_passes_stdin_bytes_and_exit_codes() {
    let Some(gw) = FakeGateway::start("nemoclaw") else { return };
    let o = gw.openshell(&[
        "sandbox", "create", "--name", "alpha", "--from", "img:1", "-o", "json", "-g", "nemoclaw",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let exec = |args: &[&str], stdin: &[u8]| {
        let mut c = Command::new(&gw.cli);
        c.args(["sandbox", "exec", "-g", "nemoclaw", "-n", "alpha", "--no-tty"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in gw.env() {
            c.env(k, v);
        }
        let mut child = c.spawn().unwrap();
        let mut pipe = child.stdin.take().unwrap();
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let _ = pipe.write_all(&data);
        });
        let o = child.wait_with_output().unwrap();
        writer.join().unwrap();
        o
    };
    let o = exec(&["--", "sh", "-c", "cat; printf '\\377'; exit 7", "it's"], b"a\0b\n");
    assert_eq!(o.status.code(), Some(7), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, b"a\0b\n\xff");
    let log = std::fs::read_to_string(gw.state().join("exec.log")).unwrap();
    let first: Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(first["stdin"], 4, "piped stdin travels in the request");
    assert_eq!(first["command"][3], "it's");
    let o = exec(&["--timeout", "1", "--", "sleep", "5"], b"");
    assert_eq!(o.status.code(), Some(124));
    let o = exec(&["--", "cat"], &vec![0u8; 4 * 1024 * 1024 + 1]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("exceeds 4194304 byte limit"));
    assert_eq!(std::fs::read_to_string(gw.state().join("exec.log")).unwrap().lines().count(), 2);
    let long = "x".repeat(100 * 1024);
    let o = exec(&["--", "echo", &long, &long, &long], b"");
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.contains("Client specified an invalid argument"), "{err}");
    gw.faults(serde_json::json!({"exec_cut": 3}));
    let o = exec(&["--", "sh", "-c", "echo started; exit 9"], b"");
    assert_eq!(o.status.code(), Some(0), "no exit status in the stream: the CLI says 0");
    assert_eq!(o.stdout, b"start");
}

#[test]
fn real_cli_status_refused_and_auth_failure() {
    let Some(gw) = FakeGateway::start("nemoclaw") else { return };
    gw.register_refused("down");
    let o = gw.openshell(&["status", "-o", "json", "-g", "down"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Connection refused"));
    gw.faults(serde_json::json!({"unauthenticated": true}));
    let o = gw.openshell(&["sandbox", "get", "alpha", "-o", "json", "-g", "nemoclaw"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("The request does not have valid authentication credentials"));
}

/// The fake answers `GET /healthz` on its gRPC port, so `status` after a failed gRPC `Health`
/// reads exactly as recorded from the real CLI (transcripts 61 and 64), and the driver calls
/// both answers unhealthy: an HTTP answer is not a working gateway.
#[test]
fn real_cli_status_falls_back_to_healthz_like_the_transcripts() {
    use nemoclaw::gateway::openshell::OpenShellGateway;
    use nemoclaw::gateway::Gateway;
    let Some(gw) = FakeGateway::start("nemoclaw") else { return };
    for (faults, transcript) in [
        (serde_json::json!({"unavailable": true}), "61-unavailable-status-json"),
        (
            serde_json::json!({"unavailable": true, "healthz": 503}),
            "64-unavailable-healthz503-status-json",
        ),
    ] {
        gw.faults(faults);
        let o = gw.openshell(&["status", "-o", "json", "-g", "nemoclaw"]);
        let t: Value = serde_json::from_str(
            &std::fs::read_to_string(
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join(format!("tests/fixtures/openshell-transcripts/{transcript}.json")),
            )
            .unwrap(),
        )
        .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout).replace(&gw.port.to_string(), "<PORT>");
        assert_eq!(o.status.code(), t["exit"].as_i64().map(|c| c as i32), "{transcript}");
        assert_eq!(stdout, t["stdout"].as_str().unwrap(), "{transcript}");
        let driver = OpenShellGateway::new(gw.wrapper(), "nemoclaw");
        assert!(driver.health().is_some(), "{transcript}: an HTTP-only answer is not healthy");
    }
    let http: Vec<_> = gw.calls().into_iter().filter(|(m, _)| m.starts_with("HTTP ")).collect();
    // Two `status` runs of ours and two of the driver, each asking `/healthz` once.
    assert_eq!(http.len(), 4, "{http:?}");
}

// --- rebuilds through the real CLI --------------------------------------------------------

/// A NemoClaw home with sandbox `alpha` onboarded on the fake gateway through the real CLI,
/// with workspace files, and an `openshell` wrapper that logs every invocation.
pub struct Real {
    pub gw: FakeGateway,
    pub home: crate::common::Home,
    pub wrapper: PathBuf,
}

impl Real {
    pub fn new() -> Option<Real> {
        let gw = FakeGateway::start("nemoclaw")?;
        let home = crate::common::Home::new();
        let wrapper = gw.wrapper();
        let r = Real { gw, home, wrapper };
        let o = r.run(&["onboard", "alpha", "--gateway", "nemoclaw"]);
        assert!(o.status.success(), "onboard: {}", crate::common::stderr(&o));
        // NemoClaw's onboard creates the row's provider on the gateway; so does this fixture.
        let reg: Value = serde_json::from_slice(&r.registry_bytes()).unwrap();
        if let Some(p) = reg["sandboxes"]["alpha"]["provider"].as_str() {
            std::fs::write(r.gw.state().join("providers.json"), serde_json::json!([p]).to_string())
                .unwrap();
        }
        let ws = r.tree();
        std::fs::create_dir_all(ws.join("workspace/notes")).unwrap();
        for i in 0..10 {
            std::fs::write(ws.join(format!("workspace/notes/n{i}.md")), format!("note {i}\n"))
                .unwrap();
        }
        std::fs::write(ws.join("MEMORY.md"), "remember\n").unwrap();
        Some(r)
    }

    pub fn cmd(&self) -> Command {
        let mut c = self.home.cmd();
        for (k, v) in self.gw.env() {
            c.env(k, v);
        }
        c.env("NEMOCLAW_OPENSHELL", &self.wrapper);
        c
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.cmd().args(args).output().unwrap()
    }

    /// alpha's `/sandbox/.openclaw` on the fake gateway.
    pub fn tree(&self) -> PathBuf {
        self.gw.sandbox_root("alpha").expect("alpha exists on the gateway").join(".openclaw")
    }

    pub fn digest(&self) -> String {
        nemoclaw::host::tree_digest(&self.tree()).unwrap()
    }

    /// Edit alpha's registry row in place (as an operator or NemoClaw would have left it).
    pub fn edit_row(&self, f: impl FnOnce(&mut Value)) {
        let path = self.home.path().join("sandboxes.json");
        let mut reg: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        f(&mut reg["sandboxes"]["alpha"]);
        std::fs::write(&path, serde_json::to_vec_pretty(&reg).unwrap()).unwrap();
    }

    pub fn registry_bytes(&self) -> Vec<u8> {
        std::fs::read(self.home.path().join("sandboxes.json")).unwrap()
    }

    /// `openshell` invocations so far (argv joined by spaces).
    pub fn invocations(&self) -> Vec<String> {
        self.gw.invocations()
    }
}

fn ok(o: &std::process::Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        crate::common::stdout(o),
        crate::common::stderr(o)
    );
}

/// What a rebuild must leave (or give back) after a crash and a recover.
struct Pre {
    bytes: Vec<u8>,
    digest: String,
    policy: String,
}

/// `recover --resume` or `--rollback` after a kill, then the invariants: every file back at
/// its path, one sandbox, the same policy, a clean journal, the run finished; after a
/// rollback the registry byte for byte.
fn recover_and_check(r: &Real, resume: bool, ctx: &str, pre: &Pre) {
    let how = if resume { "--resume" } else { "--rollback" };
    let o = r.run(&["recover", how, "--sandbox", "alpha"]);
    assert!(o.status.success(), "{ctx} {how}: {}", crate::common::stderr(&o));
    assert_eq!(r.digest(), pre.digest, "{ctx} {how}: workspace");
    only_original_paths(r);
    assert_eq!(r.gw.sandboxes().len(), 1, "{ctx} {how}: no orphans");
    assert_eq!(live_policy(&r.gw, "alpha"), pre.policy, "{ctx} {how}: the same policy");
    crate::rebuild::check_journal(r.home.path());
    let last = crate::rebuild::runs(r.home.path()).last().unwrap().1.clone();
    if resume {
        assert_eq!(last, "succeeded", "{ctx}");
    } else {
        assert_eq!(last, "rolled_back", "{ctx}");
        assert_eq!(r.registry_bytes(), pre.bytes, "{ctx}: registry byte-equal");
    }
}

/// No `<run>.restore` (or any other staging name) inside the sandbox: only the original paths.
fn only_original_paths(r: &Real) {
    let root = r.gw.sandbox_root("alpha").unwrap();
    let top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(top, [".openclaw"], "/sandbox holds only .openclaw");
    let mut names: Vec<String> = std::fs::read_dir(r.tree())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.iter().all(|n| !n.contains(".restore") && !n.contains(".upload")), "{names:?}");
}

#[test]
fn real_cli_normal_rebuild_restores_every_file_at_its_path_and_the_policy() {
    let Some(r) = Real::new() else { return };
    let (digest, policy) = (r.digest(), add_corp_rule(&r.gw));
    let old_id = r.gw.sandboxes()["alpha"]["id"].clone();
    let n = r.invocations().len();
    let o = r.run(&["alpha", "rebuild", "--yes"]);
    ok(&o);
    assert_ne!(r.gw.sandboxes()["alpha"]["id"], old_id, "a new sandbox");
    assert_eq!(r.digest(), digest, "every file back at its original path, byte for byte");
    only_original_paths(&r);
    assert_eq!(live_policy(&r.gw, "alpha"), policy, "the replacement enforces the old policy");
    crate::rebuild::check_journal(r.home.path());
    assert_eq!(crate::rebuild::runs(r.home.path()).last().unwrap().1, "succeeded");
    let calls = r.invocations()[n..].to_vec();
    eprintln!("normal rebuild: {} openshell calls", calls.len());
    let count = |p: &str| calls.iter().filter(|c| c.starts_with(p)).count();
    // The state's trips (docs/benchmarks.md): a listing with digests at backup; after the
    // upload a listing, the fix-up and the verifying listing; one download, one upload.
    assert_eq!(
        (count("sandbox exec"), count("sandbox download"), count("sandbox upload")),
        (4, 1, 1),
        "{calls:#?}"
    );
}

#[test]
fn real_cli_stale_recovery_and_call_budget() {
    let Some(r) = Real::new() else { return };
    let o = r.gw.openshell(&["sandbox", "delete", "alpha", "-g", "nemoclaw"]);
    assert!(o.status.success());
    let n = r.invocations().len();
    let o = r.run(&["alpha", "rebuild", "--yes"]);
    ok(&o);
    assert!(crate::common::stderr(&o).contains("absent from the live OpenShell gateway"));
    assert!(r.gw.sandboxes().contains_key("alpha"), "recreated");
    let calls = r.invocations()[n..].to_vec();
    let upto = calls.iter().position(|c| c.starts_with("sandbox create")).expect("a create");
    eprintln!("stale recovery: {upto} openshell calls up to the recreate: {:?}", &calls[..upto]);
    assert!(upto <= 8, "stale recovery needs about 8 calls up to the recreate: {calls:?}");
}

#[test]
fn real_cli_refusal_changes_nothing_and_call_budget() {
    let Some(r) = Real::new() else { return };
    // Re-bind alpha to a port gateway that is down while `nemoclaw` is the active one.
    r.gw.register_refused("nemoclaw-9000");
    r.gw.select("nemoclaw");
    r.edit_row(|row| {
        row["gatewayName"] = "nemoclaw-9000".into();
        row["gatewayPort"] = 9000.into();
    });
    let (bytes, digest) = (r.registry_bytes(), r.digest());
    let n = r.invocations().len();
    let o = r.run(&["alpha", "rebuild", "--yes"]);
    assert_eq!(o.status.code(), Some(3), "{}", crate::common::stderr(&o));
    let err = crate::common::stderr(&o);
    assert!(err.contains("openshell gateway select nemoclaw-9000"), "{err}");
    assert_eq!((r.registry_bytes(), r.digest()), (bytes, digest), "nothing changed");
    let calls = r.invocations()[n..].to_vec();
    eprintln!("refusal: {} openshell calls: {calls:?}", calls.len());
    assert!(calls.len() <= 4, "a refusal needs about 4 calls: {calls:?}");
}

#[test]
fn real_cli_unreachable_gateway_is_refused() {
    let Some(r) = Real::new() else { return };
    let (bytes, digest) = (r.registry_bytes(), r.digest());
    r.gw.faults(serde_json::json!({"unavailable": true}));
    let o = r.run(&["alpha", "rebuild", "--yes"]);
    assert_eq!(o.status.code(), Some(3), "{}", crate::common::stderr(&o));
    assert!(crate::common::stderr(&o).contains("Could not confirm live state of 'alpha'"));
    r.gw.faults(serde_json::json!({}));
    assert_eq!((r.registry_bytes(), r.digest()), (bytes, digest));
}

#[test]
fn real_cli_recreate_failure_then_rollback_gives_the_old_files_back() {
    let Some(r) = Real::new() else { return };
    let (bytes, digest) = (r.registry_bytes(), r.digest());
    r.gw.faults(serde_json::json!({"create_error": true}));
    let o = r.run(&["alpha", "rebuild", "--yes"]);
    assert_eq!(o.status.code(), Some(1), "{}", crate::common::stderr(&o));
    r.gw.faults(serde_json::json!({}));
    // The failed replacement is still there in phase Error: rollback must clear it.
    let o = r.run(&["recover", "--rollback", "--sandbox", "alpha"]);
    ok(&o);
    assert_eq!(r.registry_bytes(), bytes, "registry byte-equal after rollback");
    assert_eq!(r.digest(), digest, "the old files, at their paths");
    only_original_paths(&r);
    assert_eq!(r.gw.sandboxes().len(), 1);
    crate::rebuild::check_journal(r.home.path());
    assert_eq!(crate::rebuild::runs(r.home.path()).last().unwrap().1, "rolled_back");
}

/// kill -9 at every forward crash point of every step, at every hit, through the real CLI;
/// then `recover`, resuming and rolling back in turn. The same invariants as the local matrix:
/// workspace digest, files at their original paths, registry bytes after a rollback, one
/// sandbox on the gateway, a consistent journal, the run finished.
#[test]
fn real_cli_crash_matrix_then_resume_or_rollback() {
    if let Err(why) = real_cli() {
        eprintln!("skipping the real-openshell crash matrix: {why}");
        return;
    }
    let mut cases = 0;
    for point in ["before_intent", "after_intent", "mid_effect", "after_effect"] {
        for hit in 1.. {
            let resume = (cases % 2) == 0;
            let r = Real::new().unwrap();
            let policy = add_corp_rule(&r.gw);
            let (bytes, digest) = (r.registry_bytes(), r.digest());
            let armed = format!("{point}:{hit}");
            let o = r
                .cmd()
                .env("NEMOCLAW_CRASHPOINT", &armed)
                .args(["alpha", "rebuild", "--yes"])
                .output()
                .unwrap();
            if !crate::common::killed(&o) {
                // Past the last hit of this point: the run completed.
                ok(&o);
                assert!(hit > 1, "{armed} was never reached");
                break;
            }
            cases += 1;
            recover_and_check(
                &r,
                resume,
                &armed,
                &Pre { bytes: bytes.clone(), digest: digest.clone(), policy: policy.clone() },
            );
        }
    }
    eprintln!("real-CLI crash matrix: {cases} kills recovered");
    assert!(cases >= 20, "the matrix really ran ({cases} cases)");
}

/// The real CLI has no request timeout: a gateway that never answers `GetSandbox` keeps it
/// waiting. nemoclaw's per-call timeout kills the process group, the answer is *unknown* (never
/// *missing*), and the rebuild is refused with nothing changed.
#[test]
fn real_cli_hanging_gateway_is_timed_out_and_refused() {
    let Some(r) = Real::new() else { return };
    let (bytes, digest) = (r.registry_bytes(), r.digest());
    r.gw.faults(serde_json::json!({"hang": ["GetSandbox"]}));
    let started = Instant::now();
    let o = r
        .cmd()
        .env("NEMOCLAW_OPENSHELL_TIMEOUT_MS", "1500")
        .args(["alpha", "rebuild", "--yes"])
        .output()
        .unwrap();
    let took = started.elapsed();
    r.gw.faults(serde_json::json!({}));
    assert_eq!(o.status.code(), Some(3), "{}", crate::common::stderr(&o));
    assert!(crate::common::stderr(&o).contains("Could not confirm live state of 'alpha'"));
    assert!(took < Duration::from_secs(30), "bounded by the timeout, took {took:?}");
    assert_eq!((r.registry_bytes(), r.digest()), (bytes, digest), "nothing changed");
    // No `openshell` of this test is left running (the process group was killed).
    let mine = format!("FAKE_GATEWAY_STATE={}", r.gw.state().display());
    let left = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains("sandbox\0get")
                && String::from_utf8_lossy(&env).split('\0').any(|v| v == mine)
        })
        .count();
    assert_eq!(left, 0, "a hung openshell survived its timeout");
}

/// After a journaled rebuild, the sandbox disappears: the stale recovery recreates it with the
/// policy that run captured (the journal is the only record left), through the real CLI.
#[test]
fn real_cli_stale_recovery_recreates_with_the_journaled_policy() {
    let Some(r) = Real::new() else { return };
    let policy = add_corp_rule(&r.gw);
    ok(&r.run(&["alpha", "rebuild", "--yes"]));
    let o = r.gw.openshell(&["sandbox", "delete", "alpha", "-g", "nemoclaw"]);
    assert!(o.status.success());
    let o = r.run(&["alpha", "rebuild", "--yes"]);
    ok(&o);
    assert!(crate::common::stderr(&o).contains("absent from the live OpenShell gateway"));
    assert_eq!(live_policy(&r.gw, "alpha"), policy, "recreated with the journaled policy");
}

/// The gateway answers the sandbox but not its policy: the replacement could not be given the
/// same policy, so the rebuild is refused before anything is journaled or removed.
#[test]
fn real_cli_unreadable_live_policy_is_refused_before_anything_changes() {
    let Some(r) = Real::new() else { return };
    let (reg, digest) = (r.registry_bytes(), r.digest());
    r.gw.faults(serde_json::json!({"no_policy": true}));
    let n = r.invocations().len();
    let o = r.run(&["alpha", "rebuild", "--yes"]);
    let err = crate::common::stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("Cannot read the live policy of 'alpha'"), "{err}");
    assert_eq!((r.registry_bytes(), r.digest()), (reg, digest), "nothing changed");
    let calls = r.invocations()[n..].to_vec();
    assert!(!calls.iter().any(|c| c.starts_with("sandbox delete")), "{calls:?}");
    assert!(crate::rebuild::runs(r.home.path()).is_empty(), "nothing journaled");
}

#[test]
fn real_cli_gpu_enabled_row_recreates_with_a_gpu() {
    let Some(r) = Real::new() else { return };
    r.edit_row(|row| {
        row["gpuEnabled"] = serde_json::json!(true);
    });
    // The fake records whether the create request carried a GPU requirement.
    assert_eq!(r.gw.sandboxes()["alpha"]["gpu"], false);
    ok(&r.run(&["alpha", "rebuild", "--yes"]));
    assert_eq!(r.gw.sandboxes()["alpha"]["gpu"], true, "the create request asked for a GPU");
}

/// Built from a Dockerfile: refused (nothing changed) while the Dockerfile is missing, rebuilt
/// from it once it is back. The real CLI would build a Dockerfile with a local Docker daemon,
/// which this machine cannot reach; so a shim in front of it checks the `--from` path is the
/// Dockerfile and hands the CLI the image such a build would have tagged. Everything else
/// (the create request, the watch, the restore) is the real CLI's.
#[test]
fn real_cli_dockerfile_sandbox_is_recreated_from_it_and_refused_without_it() {
    let Some(r) = Real::new() else { return };
    let dockerfile = r.home.path().join("build/Dockerfile");
    let session = serde_json::json!({"version": 1, "sandboxName": "alpha", "status": "complete",
        "metadata": {"gatewayName": "nemoclaw", "fromDockerfile": dockerfile}});
    std::fs::write(r.home.path().join("onboard-session.json"), session.to_string()).unwrap();
    let (reg, digest) = (r.registry_bytes(), r.digest());
    let n = r.invocations().len();
    let o = r.run(&["alpha", "rebuild", "--yes"]);
    let err = crate::common::stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("does not exist, so it could not be recreated"), "{err}");
    assert_eq!((r.registry_bytes(), r.digest()), (reg, digest.clone()), "nothing changed");
    assert!(!r.invocations()[n..].iter().any(|c| c.starts_with("sandbox delete")));

    std::fs::create_dir_all(dockerfile.parent().unwrap()).unwrap();
    std::fs::write(&dockerfile, "FROM openshell/sandbox-base:latest\n").unwrap();
    let shim = r.gw.tmp.path().join("docker-shim");
    let froms = r.gw.tmp.path().join("from.log");
    crate::common::write_script(
        &shim,
        &format!(
            "#!/bin/sh\nfor a in \"$@\"; do shift; if [ \"$prev\" = --from ]; then \
             printf '%s\\n' \"$a\" >> '{froms}'; [ -f \"$a\" ] && a=openshell/sandbox-from:built; \
             fi; set -- \"$@\" \"$a\"; prev=\"$a\"; done\nexec '{}' \"$@\"\n",
            r.wrapper.display(),
            froms = froms.display()
        ),
    );
    let o = r.cmd().env("NEMOCLAW_OPENSHELL", &shim).args(["alpha", "rebuild", "--yes"]).output();
    ok(&o.unwrap());
    let froms = std::fs::read_to_string(froms).unwrap();
    assert_eq!(froms.lines().collect::<Vec<_>>(), [dockerfile.to_str().unwrap()], "{froms}");
    assert_eq!(r.gw.sandboxes()["alpha"]["image"], "openshell/sandbox-from:built");
    assert_eq!(r.digest(), digest);
}

/// Stale recovery with no policy journaled for the sandbox: the replacement starts with the
/// gateway's default policy, and the registry's presets and custom policies are merged into it
/// as NemoClaw does (by `network_policies` key, one whole-policy `policy set`); static fields
/// stay the default's. A preset that is not in the presets directory is NemoClaw's non-fatal
/// warning, journaled with the step and shown by `journal show`.
#[test]
fn real_cli_stale_recovery_without_a_journaled_policy_merges_presets_and_custom_policies() {
    let Some(r) = Real::new() else { return };
    let presets = r.gw.tmp.path().join("presets");
    std::fs::create_dir_all(&presets).unwrap();
    std::fs::write(
        presets.join("npm.yaml"),
        "preset:\n  name: npm\n  description: npm registry\nnetwork_policies:\n  npm:\n    name: npm\n    endpoints:\n    - host: registry.npmjs.org\n      port: 443\n",
    )
    .unwrap();
    r.edit_row(|row| {
        row["policies"] = serde_json::json!(["npm", "gone"]);
        row["customPolicies"] = serde_json::json!([{"name": "corp-proxy",
            "content": "preset:\n  name: corp-proxy\nnetwork_policies:\n  corp_proxy:\n    name: corp_proxy\n    endpoints:\n    - host: proxy.corp.example\n      port: 3128\n"}]);
    });
    let default: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&live_policy(&r.gw, "alpha")).unwrap();
    let o = r.gw.openshell(&["sandbox", "delete", "alpha", "-g", "nemoclaw"]);
    assert!(o.status.success());

    let n = r.invocations().len();
    let o = r
        .cmd()
        .args(["--policy-presets"])
        .arg(&presets)
        .args(["alpha", "rebuild", "--yes"])
        .output()
        .unwrap();
    ok(&o);
    let err = crate::common::stderr(&o);
    assert!(err.contains("⚠ Failed to restore presets: gone"), "{err}");
    assert!(err.contains("Re-apply manually with: nemoclaw alpha policy-add"), "{err}");
    let after: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&live_policy(&r.gw, "alpha")).unwrap();
    let net = after["network_policies"].as_mapping().expect("network_policies");
    let keys: Vec<&str> = net.keys().filter_map(|k| k.as_str()).collect();
    assert!(keys.contains(&"npm") && keys.contains(&"corp_proxy"), "{keys:?}");
    assert_eq!(
        after["network_policies"]["corp_proxy"]["endpoints"][0]["port"],
        serde_yaml_ng::Value::from(3128)
    );
    for field in ["filesystem_policy", "landlock", "process"] {
        assert_eq!(after[field], default[field], "{field} is the default's");
    }
    let sets = r.invocations()[n..].iter().filter(|c| c.starts_with("policy set")).count();
    assert_eq!(sets, 1, "one whole-policy set of the merged result");

    let id = crate::rebuild::runs(r.home.path()).last().unwrap().0.clone();
    let show = r.run(&["journal", "show", &id]);
    let out = crate::common::stdout(&show);
    assert!(
        out.contains("Warnings") && out.contains("policies: ⚠ Failed to restore presets: gone"),
        "{out}"
    );
}

/// The registry row's provider: while the gateway does not have it the rebuild is refused in
/// preflight (exit 3, nothing changed), naming the credential the onboard session says it
/// uses and whether it is set; once it is there the replacement is created with it.
#[test]
fn real_cli_provider_is_checked_in_preflight_and_attached_to_the_replacement() {
    let Some(r) = Real::new() else { return };
    r.edit_row(|row| {
        row["provider"] = serde_json::json!("corp-llm");
    });
    let session = serde_json::json!({"version": 1, "sandboxName": "alpha", "status": "complete",
        "credentialEnv": "NEMOCLAW_TEST_PROVIDER_KEY", "metadata": {"gatewayName": "nemoclaw"}});
    std::fs::write(r.home.path().join("onboard-session.json"), session.to_string()).unwrap();
    let (reg, digest) = (r.registry_bytes(), r.digest());
    let id = r.gw.sandboxes()["alpha"]["id"].clone();
    let n = r.invocations().len();
    let o = r
        .cmd()
        .env_remove("NEMOCLAW_TEST_PROVIDER_KEY")
        .args(["alpha", "rebuild", "--yes"])
        .output()
        .unwrap();
    let err = crate::common::stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("uses the provider 'corp-llm', which is not on gateway 'nemoclaw'"),
        "{err}"
    );
    assert!(err.contains("$NEMOCLAW_TEST_PROVIDER_KEY, which is NOT set"), "{err}");
    assert_eq!((r.registry_bytes(), r.digest()), (reg, digest.clone()), "nothing changed");
    assert_eq!(r.gw.sandboxes()["alpha"]["id"], id, "the same sandbox");
    let calls = r.invocations()[n..].to_vec();
    assert!(!calls.iter().any(|c| c.starts_with("sandbox delete")), "{calls:?}");
    assert!(crate::rebuild::runs(r.home.path()).is_empty(), "nothing journaled");

    std::fs::write(r.gw.state().join("providers.json"), r#"["corp-llm"]"#).unwrap();
    ok(&r.run(&["alpha", "rebuild", "--yes"]));
    assert_eq!(r.gw.sandboxes()["alpha"]["providers"], serde_json::json!(["corp-llm"]));
    assert_eq!(r.digest(), digest);
}

/// A kill -9 soak subset through the real CLI: rebuilds whose whole process group (nemoclaw and
/// any `openshell`/`ssh` it is running) is killed at a seeded random moment, each followed by
/// `recover --resume` or `--rollback` alternately, with the crash matrix's invariants.
/// `NEMOCLAW_SOAK_SEED` replays; `NEMOCLAW_REAL_SOAK_CYCLES` changes the count (default 8).
#[test]
fn real_cli_kill9_soak() {
    use std::os::unix::process::CommandExt;
    if let Err(why) = real_cli() {
        eprintln!("skipping the real-openshell soak: {why}");
        return;
    }
    let seed: u64 = std::env::var("NEMOCLAW_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(crate::common::nanos);
    let cycles: u32 =
        std::env::var("NEMOCLAW_REAL_SOAK_CYCLES").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    eprintln!(
        "real_cli_kill9_soak: seed {seed} (replay with NEMOCLAW_SOAK_SEED={seed}), {cycles} cycles"
    );
    let mut rng = crate::common::XorShift(seed | 1);
    let r = Real::new().unwrap();
    let policy = add_corp_rule(&r.gw);
    let t0 = Instant::now();
    ok(&r.run(&["alpha", "rebuild", "--yes"]));
    let full = t0.elapsed();
    let mut killed = 0;
    for cycle in 0..cycles {
        let pre = Pre { bytes: r.registry_bytes(), digest: r.digest(), policy: policy.clone() };
        let runs_before = crate::rebuild::runs(r.home.path()).len();
        let resume = cycle % 2 == 0;
        // Inside the run: its first ~15% is process start and preflight, which journal nothing.
        let delay = full.mul_f64(0.15 + rng.unit() * 0.85);
        let mut child = r
            .cmd()
            .args(["alpha", "rebuild", "--yes"])
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        // Deliberate: the kill must land at a random moment of the run.
        std::thread::sleep(delay);
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let st = child.wait().unwrap();
        let ctx = format!("seed {seed} cycle {cycle} after {delay:?}");
        if crate::common::killed(&st) && crate::rebuild::runs(r.home.path()).len() == runs_before {
            // Killed before it journaled its run: nothing may have changed.
            assert_eq!((r.registry_bytes(), r.digest()), (pre.bytes, pre.digest), "{ctx}");
            assert_eq!(r.gw.sandboxes().len(), 1, "{ctx}: no orphans");
        } else if crate::common::killed(&st) {
            killed += 1;
            recover_and_check(&r, resume, &ctx, &pre);
        } else {
            assert!(st.success(), "{ctx}: the rebuild failed");
            assert_eq!(r.digest(), pre.digest, "{ctx}: workspace");
        }
    }
    eprintln!("real_cli_kill9_soak: {killed} of {cycles} rebuilds killed and recovered");
    assert!(killed >= cycles.min(3), "the soak really killed runs ({killed} of {cycles})");
}
