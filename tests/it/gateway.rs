//! Integration tests: gateway classification (a table over every output and error text of
//! openshell.md) and one behavioural suite run against both drivers — the local gateway and the
//! openshell driver running the real `openshell` CLI against the fake gateway.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nemoclaw::gateway::classify::{classify_get, classify_status, CallOutput};
use nemoclaw::gateway::local::LocalGateway;
use nemoclaw::gateway::openshell::OpenShellGateway;
use nemoclaw::gateway::{CreateSpec, Gateway, GatewayError, Liveness, PolicySpec, Unhealthy};
use nemoclaw::host::tree_digest;
use nemoclaw::names::SandboxName;
use rstest::rstest;
use serde_json::json;

use crate::fakegw::FakeGateway;

/// A compact verdict for table assertions.
fn verdict(l: &Liveness) -> String {
    match l {
        Liveness::Present(s) => format!("present:{}:{}", s.name, s.phase),
        Liveness::Missing => "missing".into(),
        Liveness::Unknown { .. } => "unknown".into(),
        Liveness::Unhealthy { reason, active, .. } => match active {
            Some(a) => format!("unhealthy:{reason:?}:{a}").to_lowercase(),
            None => format!("unhealthy:{reason:?}").to_lowercase(),
        },
    }
}

fn timeout() -> CallOutput {
    CallOutput { timed_out: true, ..Default::default() }
}

const OLD_NOT_FOUND: &str =
    "Error:   × status: NotFound, message: \"sandbox not found\", details: [], metadata: MetadataMap { headers: {} }";
const NEW_NOT_FOUND: &str =
    "Error:   × code: 'Some requested entity was not found', message: \"sandbox not found\"";
const TABLE_GET: &str = "Sandbox:\n\n  Id: 5f0c01\n  Name: demo\n  Phase: \x1b[1;32mReady\x1b[0m\n  Resource version: 7\n  Labels:\n    rebuild-run: 0190\n";

#[rstest]
#[case::table_present(CallOutput::exited(0, TABLE_GET, ""), true, "present:demo:Ready")]
#[case::json_present(CallOutput::exited(0, r#"{"id":"1","name":"demo","phase":"Running","labels":{},"policy_source":"x","revision":1,"policy":null}"#, ""), true, "present:demo:Running")]
#[case::json_phase_number(
    CallOutput::exited(0, r#"{"id":"1","name":"demo","phase":1}"#, ""),
    true,
    "present:demo:Provisioning"
)]
#[case::old_not_found_proved(CallOutput::exited(1, "", OLD_NOT_FOUND), true, "missing")]
#[case::new_not_found_proved(CallOutput::exited(1, "", NEW_NOT_FOUND), true, "missing")]
#[case::not_found_health_not_proved(CallOutput::exited(1, "", NEW_NOT_FOUND), false, "unknown")]
#[case::old_not_found_not_proved(CallOutput::exited(1, "", OLD_NOT_FOUND), false, "unknown")]
#[case::timeout(timeout(), true, "unknown")]
#[case::spawn_failure(CallOutput { spawn_error: Some("No such file".into()), ..Default::default() }, true, "unknown")]
#[case::garbage_exit0(CallOutput::exited(0, "\u{1}}{ garbage ~~~", ""), true, "unknown")]
#[case::empty_exit0(CallOutput::exited(0, "", ""), true, "unknown")]
#[case::no_spec(
    CallOutput::exited(1, "", "Error:   × status: Internal, message: \"sandbox has no spec\""),
    true,
    "unknown"
)]
#[case::other_error(CallOutput::exited(1, "", "Error:   × something odd"), true, "unknown")]
#[case::usage_error(
    CallOutput::exited(2, "", "error: unexpected argument '-o' found"),
    true,
    "unknown"
)]
#[case::other_name(
    CallOutput::exited(0, r#"{"id":"1","name":"other","phase":"Ready"}"#, ""),
    true,
    "unknown"
)]
#[case::transport(
    CallOutput::exited(1, "", "Error:   × transport error"),
    true,
    "unhealthy:unreachable"
)]
#[case::tcp_connect(
    CallOutput::exited(1, "", "Error: tcp connect error: Connection refused (os error 111)"),
    true,
    "unhealthy:unreachable"
)]
#[case::refused(
    CallOutput::exited(1, "", "Connection refused (os error 111)"),
    true,
    "unhealthy:unreachable"
)]
#[case::reset(
    CallOutput::exited(1, "", "Error:   × connection reset by peer"),
    true,
    "unhealthy:unreachable"
)]
#[case::client_connect(
    CallOutput::exited(1, "", "Error:   × client error (Connect)"),
    true,
    "unhealthy:unreachable"
)]
#[case::no_active(
    CallOutput::exited(1, "", "Error:   × No active gateway"),
    true,
    "unhealthy:unreachable"
)]
#[case::no_configured(
    CallOutput::exited(1, "", "Error:   × No gateway configured"),
    true,
    "unhealthy:unreachable"
)]
#[case::unknown_gateway(
    CallOutput::exited(1, "", "Error:   × Unknown gateway 'nemoclaw-9000'"),
    true,
    "unhealthy:unreachable"
)]
#[case::handshake(
    CallOutput::exited(1, "", "Error:   × handshake verification failed"),
    true,
    "unhealthy:identity"
)]
#[case::unauthorized(CallOutput::exited(1, "", "Error: unauthorized"), true, "unhealthy:auth")]
#[case::forbidden(CallOutput::exited(1, "", "Error: Forbidden"), true, "unhealthy:auth")]
#[case::permission_denied(
    CallOutput::exited(1, "", "Error: permission denied"),
    true,
    "unhealthy:auth"
)]
#[case::invalid_token(CallOutput::exited(1, "", "Error: invalid token"), true, "unhealthy:auth")]
#[case::expired_token(CallOutput::exited(1, "", "Error: expired token"), true, "unhealthy:auth")]
#[case::missing_token(
    CallOutput::exited(1, "", "Error: missing gateway auth token"),
    true,
    "unhealthy:auth"
)]
#[case::wire_type(
    CallOutput::exited(1, "", "Error: invalid wire type: LengthDelimited"),
    true,
    "unhealthy:schema"
)]
#[case::proto_decode(
    CallOutput::exited(1, "", "Error: proto decode failed"),
    true,
    "unhealthy:schema"
)]
#[case::protobuf_decode(
    CallOutput::exited(1, "", "Error: protobuf decode error"),
    true,
    "unhealthy:schema"
)]
#[case::schema_before_not_found(
    CallOutput::exited(1, "", "invalid wire type; sandbox not found"),
    true,
    "unhealthy:schema"
)]
#[case::auth_before_transport(
    CallOutput::exited(1, "", "transport error: unauthorized"),
    true,
    "unhealthy:auth"
)]
#[case::identity_before_transport(
    CallOutput::exited(1, "", "transport error: handshake verification failed"),
    true,
    "unhealthy:identity"
)]
#[case::transport_before_not_found(
    CallOutput::exited(1, "", "tcp connect error; sandbox not found"),
    true,
    "unhealthy:unreachable"
)]
fn classify_sandbox_get(#[case] out: CallOutput, #[case] proved: bool, #[case] want: &str) {
    assert_eq!(verdict(&classify_get(&out, "demo", proved)), want);
}

#[rstest]
#[case::json_connected(r#"{"gateway":"nemoclaw","server":"https://127.0.0.1:8080","status":"connected","authentication":{"status":"authenticated"},"version":"0.0.92"}"#, "nemoclaw", "healthy")]
#[case::json_no_auth_needed(
    r#"{"gateway":"nemoclaw","status":"connected","authentication":{"status":"not_required"}}"#,
    "nemoclaw",
    "healthy"
)]
#[case::json_foreign(
    r#"{"gateway":"nemoclaw","status":"connected","authentication":{"status":"authenticated"}}"#,
    "nemoclaw-9000",
    "unhealthy:foreign:nemoclaw"
)]
#[case::json_error(
    r#"{"gateway":"nemoclaw","status":"error","authentication":{"status":"unverified"}}"#,
    "nemoclaw",
    "unhealthy:unreachable"
)]
#[case::json_disconnected(
    r#"{"gateway":"nemoclaw","status":"disconnected"}"#,
    "nemoclaw",
    "unhealthy:unreachable"
)]
#[case::json_not_configured(r#"{"status":"not_configured"}"#, "nemoclaw", "unhealthy:unreachable")]
#[case::json_auth_failed(
    r#"{"gateway":"nemoclaw","status":"connected","authentication":{"status":"failed"}}"#,
    "nemoclaw",
    "unhealthy:auth"
)]
#[case::json_connected_http(
    r#"{"gateway":"nemoclaw","status":"connected_http"}"#,
    "nemoclaw",
    "unhealthy:unreachable"
)]
#[case::json_broken("{\"gateway\": ", "nemoclaw", "unknown")]
#[case::table_connected(
    "Server Status\n\n  Gateway: nemoclaw\n  Server: http://127.0.0.1:8080\n  Status: Connected\n",
    "nemoclaw",
    "healthy"
)]
#[case::table_connected_ansi(
    "Server Status\n\n  Gateway: nemoclaw\n  Status: \x1b[32mConnected\x1b[0m\n",
    "nemoclaw",
    "healthy"
)]
#[case::table_foreign(
    "Server Status\n\n  Gateway: nemoclaw\n  Status: Connected\n",
    "nemoclaw-9000",
    "unhealthy:foreign:nemoclaw"
)]
#[case::table_refused(
    "Server Status\n\nGateway: nemoclaw\nError: Connection refused (os error 111)",
    "nemoclaw",
    "unhealthy:unreachable"
)]
#[case::table_disconnected(
    "Server Status\n\n  Gateway: nemoclaw\n  Status: Disconnected\n",
    "nemoclaw",
    "unhealthy:unreachable"
)]
#[case::no_active_gateway("Error:   × No active gateway", "nemoclaw", "unhealthy:unreachable")]
#[case::handshake(
    "Server Status\n\nGateway: nemoclaw\nError:   × handshake verification failed",
    "nemoclaw",
    "unhealthy:identity"
)]
#[case::garbage("\u{1}}{ garbage ~~~", "nemoclaw", "unknown")]
fn classify_gateway_status(#[case] stdout: &str, #[case] gateway: &str, #[case] want: &str) {
    let got = classify_status(&CallOutput::exited(0, stdout, ""), gateway);
    assert_eq!(got.as_ref().map(verdict).unwrap_or_else(|| "healthy".into()), want);
}

#[test]
fn status_timeout_is_unknown() {
    assert_eq!(
        classify_status(&timeout(), "nemoclaw").as_ref().map(verdict).as_deref(),
        Some("unknown")
    );
}

// ---------------------------------------------------------------------------------------------
// Both drivers, one behavioural suite.

/// A gateway under test plus the means to make it misbehave.
struct Rig {
    _home: tempfile::TempDir,
    home: PathBuf,
    /// The fake gateway behind the real CLI (openshell rigs only).
    fake: Option<FakeGateway>,
    gw: Box<dyn Gateway>,
}

impl Rig {
    fn local() -> Option<Rig> {
        let t = tempfile::tempdir().unwrap();
        let home = t.path().to_owned();
        Some(Rig { gw: Box::new(LocalGateway::open(&home).unwrap()), home, fake: None, _home: t })
    }

    /// The openshell driver running the real CLI against the fake gateway, recorded on
    /// `gateway`; `None` (the reason printed) where the real CLI cannot run.
    fn real(gateway: &str) -> Option<Rig> {
        let fake = FakeGateway::start("nemoclaw")?;
        let t = tempfile::tempdir().unwrap();
        let home = t.path().to_owned();
        let gw = OpenShellGateway::new(fake.wrapper(), gateway)
            .with_timeout(Duration::from_secs(20))
            .with_create_timeout(Duration::from_secs(20))
            .with_poll(Duration::from_millis(10));
        Some(Rig { gw: Box::new(gw), home, fake: Some(fake), _home: t })
    }

    fn fake(&self) -> &FakeGateway {
        self.fake.as_ref().expect("an openshell rig")
    }

    fn make_unreachable(&self) {
        match &self.fake {
            None => {
                fs::write(self.home.join("local-gateway/fault.json"), r#"{"health":"unreachable"}"#)
                    .unwrap()
            }
            // The recorded gateway now points at a port nobody listens on.
            Some(f) => f.register_refused("nemoclaw"),
        }
    }

    /// The argument vectors the driver ran (openshell rigs only).
    fn calls(&self) -> Vec<Vec<String>> {
        let Some(f) = &self.fake else { return Vec::new() };
        f.invocations().iter().map(|l| l.split(' ').map(str::to_owned).collect()).collect()
    }
}

fn name(s: &str) -> SandboxName {
    SandboxName::parse(s).unwrap()
}

fn spec(n: &str, run: &str) -> CreateSpec {
    CreateSpec {
        name: name(n),
        image: "openshell/sandbox-from:1".into(),
        labels: BTreeMap::from([("rebuild-run".to_owned(), run.to_owned())]),
        agent: None,
        gpu: false,
        policy: None,
        providers: Vec::new(),
    }
}

fn sample_tree(dir: &Path) {
    fs::create_dir_all(dir.join("workspace/notes")).unwrap();
    fs::create_dir_all(dir.join("memory")).unwrap();
    fs::write(dir.join("workspace/AGENTS.md"), "# agents\n").unwrap();
    fs::write(dir.join("workspace/notes/todo.txt"), "ship it\n").unwrap();
    fs::write(dir.join("memory/facts.json"), "{\"k\":1}\n").unwrap();
    std::os::unix::fs::symlink("notes/todo.txt", dir.join("workspace/latest")).unwrap();
}

#[rstest]
#[case::local(Rig::local())]
#[case::real_openshell(Rig::real("nemoclaw"))]
fn driver_behaviour(#[case] rig: Option<Rig>) {
    let Some(rig) = rig else { return };
    let gw = rig.gw.as_ref();
    let demo = name("demo");
    assert_eq!(gw.health(), None, "fresh gateway must be healthy");
    assert_eq!(gw.classify(&demo), Liveness::Missing);

    let created = gw.create(&spec("demo", "run-1")).unwrap();
    assert!(created.is_ready());
    assert_eq!(created.labels.get("rebuild-run").map(String::as_str), Some("run-1"));
    assert!(matches!(gw.create(&spec("demo", "run-2")), Err(GatewayError::AlreadyExists(..))));
    let Liveness::Present(live) = gw.classify(&demo) else { panic!("demo must be present") };
    assert_eq!(live.id, created.id);
    assert_eq!(live.labels.get("rebuild-run").map(String::as_str), Some("run-1"));
    assert_eq!(gw.list().unwrap().iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["demo"]);

    // State moves as real files, byte for byte.
    let scratch = tempfile::tempdir().unwrap();
    let src = scratch.path().join("src");
    sample_tree(&src);
    gw.upload_state(&demo, &src).unwrap();
    let out = scratch.path().join("out");
    fs::create_dir(&out).unwrap();
    gw.download_state(&demo, &out).unwrap();
    assert_eq!(tree_digest(&out).unwrap(), tree_digest(&src).unwrap());
    assert_eq!(fs::read(out.join("workspace/notes/todo.txt")).unwrap(), b"ship it\n");

    match gw.live_policy(&demo).unwrap() {
        // The local gateway keeps applied preset names.
        None => {
            gw.apply_policy(&demo, &PolicySpec::Preset { name: "npm".into() }).unwrap();
            let custom = PolicySpec::Custom {
                name: "corp-proxy".into(),
                content: "version: 1\nnetwork_policies: {}\n".into(),
            };
            gw.apply_policy(&demo, &custom).unwrap();
            gw.apply_policy(&demo, &custom).unwrap();
            assert_eq!(gw.applied_policies(&demo).unwrap(), ["npm", "corp-proxy"]);
        }
        // openshell keeps one whole policy: `policy set` replaces it, `get --full` reads it back.
        Some(before) => {
            assert!(before.starts_with("version: 1\n"), "{before}");
            let changed = format!("{before}network_policies:\n  pypi:\n    name: pypi\n");
            gw.set_policy(&demo, &format!("# a comment the gateway drops\n{changed}")).unwrap();
            assert_eq!(gw.live_policy(&demo).unwrap().as_deref(), Some(changed.as_str()));
            gw.set_policy(&demo, &changed).unwrap(); // the same again: unchanged, exit 0
                                                     // A NemoClaw preset file is not an OpenShell policy: refused, nothing changed.
            let preset = PolicySpec::Custom {
                name: "npm".into(),
                content: "preset:\n  name: npm\nnetwork_policies: {}\n".into(),
            };
            assert!(gw.apply_policy(&demo, &preset).is_err());
            assert_eq!(gw.live_policy(&demo).unwrap().as_deref(), Some(changed.as_str()));
            // A preset name never reaches a path unchecked, and a missing one is an error.
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("secret.yaml"), "version: 1\n").unwrap();
            std::env::set_var("NEMOCLAW_POLICY_PRESETS", dir.path().join("presets"));
            for bad in ["../secret", "a/b", "UPPER", "x\ny: injected"] {
                let e = gw.apply_policy(&demo, &PolicySpec::Preset { name: bad.into() });
                assert!(format!("{e:?}").contains("invalid policy preset name"), "{bad}: {e:?}");
                // A custom policy's name passes the same rule, though only its content is used.
                let custom = PolicySpec::Custom {
                    name: bad.into(),
                    content: "network_policies:\n  x:\n    name: x\n".into(),
                };
                let e = gw.apply_policy(&demo, &custom);
                assert!(format!("{e:?}").contains("invalid policy preset name"), "{bad}: {e:?}");
            }
            let e = gw.apply_policy(&demo, &PolicySpec::Preset { name: "npm".into() });
            assert!(format!("{e:?}").contains("not found"), "{e:?}");
            assert_eq!(gw.live_policy(&demo).unwrap().as_deref(), Some(changed.as_str()));
        }
    }

    gw.delete(&demo, Duration::from_secs(10)).unwrap();
    assert_eq!(gw.classify(&demo), Liveness::Missing);
    gw.delete(&demo, Duration::from_secs(10)).unwrap();
    assert!(gw.list().unwrap().is_empty());

    // A gateway in trouble never reports a sandbox missing.
    gw.create(&spec("demo", "run-3")).unwrap();
    rig.make_unreachable();
    let l = gw.classify(&demo);
    assert!(matches!(l, Liveness::Unhealthy { reason: Unhealthy::Unreachable, .. }), "{l:?}");
    assert!(gw.delete(&demo, Duration::from_secs(1)).is_err());

    // openshell: every sandbox call was scoped to the recorded gateway.
    for c in rig.calls() {
        let argv: Vec<&str> = c.iter().map(String::as_str).collect();
        let unscoped_ok =
            argv == ["--version"] || argv.starts_with(&["gateway", "list"]) || argv == ["status"];
        assert!(
            unscoped_ok || argv.windows(2).any(|w| w == ["-g", "nemoclaw"]),
            "unscoped call {argv:?}"
        );
        assert!(!argv.contains(&"select"), "must never select a gateway: {argv:?}");
    }
}

fn pid_dead(pid: i32) -> bool {
    // A zombie (state Z) is dead too: it only waits for its parent to reap it.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    !alive
        || fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
            .unwrap_or(true)
}

/// A gateway that never answers: the real CLI waits forever, so the driver's timeout must kill
/// the whole process group (here the wrapper also starts a `sleep` of its own, as a shell
/// pipeline would) and classify the sandbox unknown, never missing.
#[test]
fn hang_is_killed_with_its_process_group_and_classified_unknown() {
    let Some(rig) = Rig::real("nemoclaw") else { return };
    rig.gw.create(&spec("demo", "r")).unwrap();
    rig.fake().faults(json!({"hang": ["GetSandbox"]}));
    let pids = rig.home.join("hang.pids");
    let wrapper = rig.home.join("openshell");
    crate::common::write_script(
        &wrapper,
        &format!(
            "#!/bin/sh\ncase \"$*\" in *'sandbox get'*) sleep 300 </dev/null >/dev/null 2>&1 &\n\
             echo $$ $! > '{}';; esac\nexec '{}' \"$@\"\n",
            pids.display(),
            rig.fake().wrapper().display()
        ),
    );
    let gw = OpenShellGateway::new(wrapper, "nemoclaw").with_timeout(Duration::from_millis(1500));
    let t = Instant::now();
    let l = gw.classify(&name("demo"));
    assert!(matches!(&l, Liveness::Unknown { detail } if detail.contains("timed out")), "{l:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    let pids = fs::read_to_string(&pids).expect("the wrapper recorded its pids");
    let pids: Vec<i32> = pids.split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert_eq!(pids.len(), 2);
    // The grandchild (`sleep`) is reaped by init asynchronously: allow it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pids.iter().all(|p| pid_dead(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in pids {
        assert!(pid_dead(p), "pid {p} of the hung process group is still alive");
    }
}

#[test]
fn asynchronous_delete_is_confirmed_by_polling() {
    let Some(rig) = Rig::real("nemoclaw") else { return };
    rig.gw.create(&spec("demo", "r")).unwrap();
    rig.fake().faults(json!({"delete_polls": 3}));
    let before = rig.calls().len();
    rig.gw.delete(&name("demo"), Duration::from_secs(10)).unwrap();
    let gets = rig.calls()[before..]
        .iter()
        .filter(|c| c.starts_with(&["sandbox".into(), "get".into()]))
        .count();
    assert!(gets >= 4, "absence must be confirmed by polling (saw {gets} gets)");
    assert!(!rig.fake().sandboxes().contains_key("demo"));
    assert_eq!(rig.gw.classify(&name("demo")), Liveness::Missing);
}

/// Recorded on `nemoclaw-9000`, which the CLI does not know, while `nemoclaw` is active.
#[test]
fn recorded_port_gateway_while_another_is_active_is_foreign() {
    let Some(rig) = Rig::real("nemoclaw-9000") else { return };
    let l = rig.gw.classify(&name("demo"));
    assert_eq!(verdict(&l), "unhealthy:foreign:nemoclaw", "{l:?}");
}

/// Gateway faults the real CLI turns into errors, and a program printing garbage: none of them
/// may ever read as "missing" (that would start a stale recovery) or "present".
#[rstest]
#[case::unauthenticated(json!({"unauthenticated": true}))]
#[case::unavailable(json!({"unavailable": true}))]
#[case::internal(json!({"fail": {"GetSandbox": "INTERNAL:sandbox has no spec"}}))]
#[case::schema(json!({"fail": {"GetSandbox": "UNKNOWN:failed to decode Protobuf message: invalid wire type"}}))]
#[case::garbage(json!("garbage"))]
fn misbehaving_openshell_is_never_missing(#[case] fault: serde_json::Value) {
    let Some(rig) = Rig::real("nemoclaw") else { return };
    let gw = if fault == "garbage" {
        let p = rig.home.join("garbage");
        crate::common::write_script(&p, "#!/bin/sh\necho '}{ not json'\n");
        OpenShellGateway::new(p, "nemoclaw")
    } else {
        rig.fake().faults(fault);
        OpenShellGateway::new(rig.fake().wrapper(), "nemoclaw")
    };
    let l = gw.classify(&name("demo"));
    assert!(!matches!(l, Liveness::Missing | Liveness::Present(_)), "{l:?}");
}

/// The create request went through but the CLI never returned (its watch stream hangs): after
/// the timeout the driver adopts the sandbox only because it carries this run's label.
#[test]
fn create_timeout_adopts_only_a_sandbox_with_this_runs_label() {
    let Some(rig) = Rig::real("nemoclaw") else { return };
    rig.fake().faults(json!({"hang": ["WatchSandbox"]}));
    let gw = OpenShellGateway::new(rig.fake().wrapper(), "nemoclaw")
        .with_timeout(Duration::from_secs(20))
        .with_create_timeout(Duration::from_millis(1500))
        .with_poll(Duration::from_millis(10));
    let s = gw.create(&spec("demo", "run-7")).unwrap();
    assert_eq!(s.labels.get("rebuild-run").map(String::as_str), Some("run-7"));
    // Another run's sandbox of the same name is not adopted.
    let other = gw.create(&spec("demo", "run-8"));
    assert!(other.is_err(), "{other:?}");
    assert_eq!(rig.fake().sandboxes()["demo"]["labels"]["rebuild-run"], "run-7");
}

#[test]
fn local_gateway_cleans_interrupted_creates_and_deletes() {
    let t = tempfile::tempdir().unwrap();
    let gw = LocalGateway::open(t.path()).unwrap();
    // A dead creator's temp dir and an unfinished delete's trash.
    fs::create_dir_all(gw.root().join(".tmp.demo.999999999.x/state")).unwrap();
    fs::create_dir_all(gw.root().join(".trash.old.y/state")).unwrap();
    assert!(gw.list().unwrap().is_empty());
    let gw = LocalGateway::open(t.path()).unwrap();
    let left: Vec<_> = fs::read_dir(gw.root()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["sandboxes"]);
    // A sandbox directory removed by hand is what a reaped sandbox looks like: missing.
    gw.create(&spec("demo", "r")).unwrap();
    fs::remove_dir_all(gw.sandbox_dir(&name("demo"))).unwrap();
    assert_eq!(gw.classify(&name("demo")), Liveness::Missing);
}

/// A checked upload on the local gateway: what its copy read is judged before the sandbox
/// sees any of it. Refused, the state tree is byte-for-byte what it was and nothing staged is
/// left; accepted, the state tree becomes exactly the copy (replacing what was there) and the
/// listing judged is the source's (digests of the bytes read).
#[test]
fn local_checked_upload_commits_only_what_was_accepted() {
    use nemoclaw::gateway::CheckedUpload;
    use nemoclaw::host::fstree;
    let t = tempfile::tempdir().unwrap();
    let gw = LocalGateway::open(t.path()).unwrap();
    gw.create(&spec("demo", "r")).unwrap();
    let state = gw.state_dir(&name("demo"));
    fs::write(state.join("old.txt"), "from an earlier attempt\n").unwrap();
    let before = tree_digest(&state).unwrap();
    let src = t.path().join("src");
    sample_tree(&src);
    let nodes = fstree::walk(&src).unwrap();
    let leftovers = || -> Vec<String> {
        fs::read_dir(gw.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    };

    let seen = std::sync::Mutex::new(Vec::new());
    let refuse = |read: &[fstree::Node]| {
        seen.lock().unwrap().extend(read.iter().cloned());
        Err("not this one".to_owned())
    };
    let r = gw.upload_checked(&name("demo"), &src, &nodes, &refuse).unwrap();
    assert_eq!(r, CheckedUpload::Refused("not this one".into()));
    assert_eq!(tree_digest(&state).unwrap(), before, "state untouched");
    assert_eq!(leftovers(), Vec::<String>::new(), "nothing staged left");
    let todo = seen.lock().unwrap().iter().find(|n| n.rel == b"workspace/notes/todo.txt").cloned();
    assert_eq!(
        todo.unwrap().sha256.as_deref(),
        Some(nemoclaw::util::sha256_hex(b"ship it\n").as_str()),
        "the listing judged carries the digest of the bytes read"
    );

    let r = gw.upload_checked(&name("demo"), &src, &nodes, &|_| Ok(())).unwrap();
    assert_eq!(r, CheckedUpload::Committed);
    assert_eq!(tree_digest(&state).unwrap(), tree_digest(&src).unwrap(), "exactly the copy");
    assert!(!state.join("old.txt").exists());
    assert_eq!(leftovers(), Vec::<String>::new(), "the replaced tree is removed");
}

#[test]
fn local_fault_file_fails_one_operation() {
    let t = tempfile::tempdir().unwrap();
    let gw = LocalGateway::open(t.path()).unwrap();
    fs::write(gw.root().join("fault.json"), r#"{"fail":{"create":"quota exceeded"}}"#).unwrap();
    let e = gw.create(&spec("demo", "r")).unwrap_err();
    assert!(e.to_string().contains("quota exceeded"));
    assert_eq!(gw.classify(&name("demo")), Liveness::Missing);
    fs::write(gw.root().join("fault.json"), r#"{"health":"foreign","foreign_active":"nemoclaw"}"#)
        .unwrap();
    assert_eq!(verdict(&gw.classify(&name("demo"))), "unhealthy:foreign:nemoclaw");
}

#[test]
fn a_missing_openshell_binary_is_unknown_not_missing() {
    let t = tempfile::tempdir().unwrap();
    let gw = OpenShellGateway::new(t.path().join("no-such-openshell"), "nemoclaw");
    assert_eq!(verdict(&gw.classify(&name("demo"))), "unknown");
    let e = gw.create(&spec("demo", "r")).unwrap_err();
    assert!(e.to_string().contains("no-such-openshell"), "{e}");
}

/// A fix-up call prints nothing but the script's end marker: a stream that ends without it
/// (the CLI then exits 0) fails the upload, even though nothing in the output is parsed.
#[test]
fn an_upload_whose_fixup_stream_is_cut_short_fails() {
    let Some(rig) = Rig::real("nemoclaw") else { return };
    let gw = rig.gw.as_ref();
    let demo = name("demo");
    gw.create(&spec("demo", "run-1")).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let src = scratch.path().join("src");
    sample_tree(&src);
    // Execs of an upload: the listing after the CLI's upload (0), then the fix-up (1).
    rig.fake().faults(json!({"exec_cut": 13, "exec_skip": 1}));
    let e = gw.upload_state(&demo, &src).unwrap_err().to_string();
    assert!(e.contains("metadata fix-up") && e.contains("end marker"), "{e}");
    let log = fs::read_to_string(rig.fake().state().join("exec.log")).unwrap();
    let execs: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(execs.len(), 2, "{log}");
    assert!(execs[1]["stdin"].as_u64().unwrap() > 0, "the fix-up list went in on stdin");
    rig.fake().faults(json!({}));
    gw.upload_state(&demo, &src).unwrap();
    let listed = gw.list_state(&demo, true).unwrap().expect("openshell lists in the sandbox");
    let want = nemoclaw::host::fstree::walk(&src).unwrap();
    let bad = nemoclaw::host::fstree::compare(&listed, &want, nemoclaw::host::fstree::Keeps::ALL);
    assert!(bad.is_empty(), "{bad:?}");
}

/// A fix-up list longer than one call's stdin is cut into several calls, kept in order (hard
/// links before mtimes, directories last), and the sandbox ends up exactly as the tree that
/// was sent: listed inside the sandbox, it matches to the nanosecond — with mtimes set by
/// `python3` in one process, and by `touch` in an image without it.
#[rstest]
#[case::python3(json!({}))]
#[case::touch_without_python3(json!({"exec_without": ["python3"]}))]
fn a_long_fixup_is_cut_into_several_calls_and_the_upload_comes_out_exact(
    #[case] image: serde_json::Value,
) {
    let Some(fake) = FakeGateway::start("nemoclaw") else { return };
    fake.faults(image);
    let gw = OpenShellGateway::new(fake.wrapper(), "nemoclaw")
        .with_timeout(Duration::from_secs(20))
        .with_create_timeout(Duration::from_secs(20))
        .with_poll(Duration::from_millis(10))
        .with_exec_stdin_max(100);
    let demo = name("demo");
    gw.create(&spec("demo", "run-1")).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let src = scratch.path().join("src");
    sample_tree(&src);
    fs::create_dir_all(src.join("workspace/empty/deeper")).unwrap();
    fs::hard_link(src.join("workspace/AGENTS.md"), src.join("memory/agents-again.md")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(src.join("workspace/notes"), fs::Permissions::from_mode(0o2750)).unwrap();
    for (i, rel) in ["workspace/AGENTS.md", "workspace/empty/deeper", "workspace/empty", "memory"]
        .iter()
        .enumerate()
    {
        let t = std::time::UNIX_EPOCH + Duration::new(1_600_000_000 + i as u64, 123_456_789);
        let f = fs::File::open(src.join(rel)).unwrap();
        f.set_modified(t).unwrap();
    }
    gw.upload_state(&demo, &src).unwrap();
    let log = fs::read_to_string(fake.state().join("exec.log")).unwrap();
    let fixups = log.lines().filter(|l| l.contains("iflag=fullblock")).count();
    assert!(fixups >= 3, "one call per 100 bytes of fix-up list:\n{log}");
    let listed = gw.list_state(&demo, true).unwrap().unwrap();
    let want = nemoclaw::host::fstree::walk(&src).unwrap();
    let bad = nemoclaw::host::fstree::compare(&listed, &want, nemoclaw::host::fstree::Keeps::ALL);
    assert!(bad.is_empty(), "{bad:?}");
}
