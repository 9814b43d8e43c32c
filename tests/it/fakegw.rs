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
    if !ok {
        return Err(
            "python3 cannot import grpc and openshell (pip install openshell==0.0.116)".into()
        );
    }
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
