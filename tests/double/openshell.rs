//! A test double of the `openshell` CLI (0.0.x), used by nemoclaw's tests in real child
//! processes. It speaks the real output formats (tables, JSON, both generations of error text,
//! chosen by the configured version), keeps its sandboxes on disk between calls, holds a real
//! state tree per sandbox (so `sandbox download` / `upload` move real files), and misbehaves on
//! request.
//!
//! State directory: `$OPENSHELL_DOUBLE_STATE` (required).
//!   config.json   optional, all fields optional:
//!     {"version": "0.0.116",            reported by --version; selects formats and error texts
//!      "active": "nemoclaw",            the globally selected gateway
//!      "gateways": {"nemoclaw": "connected"},   per gateway: connected | refused | auth |
//!                                       handshake | schema | disconnected (absent = unknown gateway)
//!      "hang": "sandbox get",           this command sleeps (with a child in its process group)
//!                                       after doing its effect; pids go to hang.pids
//!      "garbage": "sandbox get",        this command prints garbage and exits 0
//!      "create_fail": "message",        sandbox create fails with this message
//!      "no_spec": true,                 sandbox get fails with INTERNAL `sandbox has no spec`
//!      "delete_polls": 2}               a deleted sandbox stays in phase Deleting for N gets
//!   calls.log     one JSON line per call: {"argv": [...], "scrubbed": bool}
//!   gw/<gateway>/<name>/meta.json, gw/<gateway>/<name>/state/   (state = /sandbox/.openclaw)

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::{json, Value};

const STATE_PATH: &str = "/sandbox/.openclaw";

struct Ctx {
    state: PathBuf,
    config: Value,
    version: (u32, u32, u32),
    gateway: String,
    json: bool,
}

impl Ctx {
    fn at_least(&self, patch: u32) -> bool {
        self.version >= (0, 0, patch)
    }

    fn gw_state(&self) -> Option<String> {
        self.config
            .pointer(&format!("/gateways/{}", self.gateway))
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    fn not_found(&self) -> ExitCode {
        if self.at_least(61) {
            fail("Error:   × code: 'Some requested entity was not found', message: \"sandbox not found\"")
        } else {
            fail("Error:   × status: NotFound, message: \"sandbox not found\", details: [], metadata: MetadataMap { headers: {} }")
        }
    }

    fn save_config(&self) {
        let _ = fs::write(
            self.state.join("config.json"),
            serde_json::to_vec_pretty(&self.config).unwrap_or_default(),
        );
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("{msg}");
    ExitCode::from(1)
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("error: {msg}\n\nUsage: openshell [OPTIONS] <COMMAND>");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let Some(state) = std::env::var_os("OPENSHELL_DOUBLE_STATE").map(PathBuf::from) else {
        return fail("openshell double: OPENSHELL_DOUBLE_STATE is not set");
    };
    let _ = fs::create_dir_all(&state);
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let scrubbed = ["OPENSHELL_GATEWAY", "OPENSHELL_GATEWAY_ENDPOINT", "OPENSHELL_WORKSPACE"]
        .iter()
        .all(|v| std::env::var_os(v).is_none());
    if let Ok(mut f) =
        fs::OpenOptions::new().create(true).append(true).open(state.join("calls.log"))
    {
        let _ = writeln!(f, "{}", json!({"argv": argv, "scrubbed": scrubbed}));
    }
    let config: Value = fs::read(state.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| json!({}));
    let vtext = config.get("version").and_then(Value::as_str).unwrap_or("0.0.116").to_owned();
    let mut vparts = vtext.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let version =
        (vparts.next().unwrap_or(0), vparts.next().unwrap_or(0), vparts.next().unwrap_or(0));

    // Global flags may appear anywhere.
    let (mut gateway, mut json_out, mut words) = (None, false, Vec::new());
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--version" | "-V" => {
                println!("openshell {vtext}");
                return ExitCode::SUCCESS;
            }
            "-g" | "--gateway" => gateway = it.next().cloned(),
            "-o" | "--output" => json_out = it.next().map(String::as_str) == Some("json"),
            "--workspace" => {
                if version < (0, 0, 88) {
                    return usage("unexpected argument '--workspace' found");
                }
                it.next();
            }
            _ => words.push(a.clone()),
        }
    }
    let active = config.get("active").and_then(Value::as_str).unwrap_or("nemoclaw").to_owned();
    let gateways_configured = config.get("gateways").is_some();
    let mut config = config;
    if !gateways_configured {
        config["gateways"] = json!({"nemoclaw": "connected"});
    }
    let ctx =
        Ctx { state, config, version, gateway: gateway.unwrap_or(active.clone()), json: json_out };
    let key = match words.first().map(String::as_str) {
        Some("sandbox" | "gateway" | "policy") => {
            words.iter().take(2).cloned().collect::<Vec<_>>().join(" ")
        }
        Some(w) => w.to_owned(),
        None => return usage("a subcommand is required"),
    };
    if ctx.config.get("garbage").and_then(Value::as_str) == Some(key.as_str()) {
        println!("\u{1}\u{7f}}}{{ garbage ~~~ [[[");
        return ExitCode::SUCCESS;
    }
    let hang = ctx.config.get("hang").and_then(Value::as_str) == Some(key.as_str());
    if hang && key != "sandbox create" {
        do_hang(&ctx);
    }
    let code = run(&ctx, &key, &words, &active);
    if hang {
        do_hang(&ctx);
    }
    code
}

/// Sleep "forever" with a child in the same process group; record both pids.
fn do_hang(ctx: &Ctx) {
    let child = std::process::Command::new("sleep").arg("300").spawn();
    let cpid = child.as_ref().map(|c| c.id()).unwrap_or(0);
    let _ = fs::write(ctx.state.join("hang.pids"), format!("{} {cpid}", std::process::id()));
    std::thread::sleep(std::time::Duration::from_secs(300));
}

fn gateway_error(state: Option<&str>, gateway: &str) -> Option<String> {
    match state {
        Some("connected") => None,
        Some("refused") | Some("disconnected") => Some(
            "Error:   × transport error\n  ├─▶ tcp connect error\n  ╰─▶ Connection refused (os error 111)".to_owned(),
        ),
        Some("auth") => Some("Error:   × status: Unauthenticated, message: \"unauthorized: invalid token\"".to_owned()),
        Some("handshake") => Some("Error:   × handshake verification failed".to_owned()),
        Some("schema") => Some("Error:   × failed to decode Protobuf message: invalid wire type: LengthDelimited".to_owned()),
        _ => Some(format!("Error:   × Unknown gateway '{gateway}'")),
    }
}

fn run(ctx: &Ctx, key: &str, words: &[String], active: &str) -> ExitCode {
    let gw_state = ctx.gw_state();
    match key {
        "status" => status(ctx, gw_state.as_deref()),
        "gateway list" => {
            let gws =
                ctx.config.get("gateways").and_then(Value::as_object).cloned().unwrap_or_default();
            let rows: Vec<Value> = gws
                .keys()
                .map(|n| json!({"name": n, "endpoint": "https://127.0.0.1:8080", "type": "local", "source": "config", "auth": "mtls", "active": n == active, "is_remote": false}))
                .collect();
            if ctx.json {
                println!("{}", Value::Array(rows));
            } else {
                for r in rows {
                    println!(
                        "{}{}",
                        if r["active"] == true { "* " } else { "  " },
                        r["name"].as_str().unwrap_or("")
                    );
                }
            }
            ExitCode::SUCCESS
        }
        "gateway info" => {
            if gw_state.is_none() {
                return fail("No gateway metadata found");
            }
            println!(
                "Gateway Info\n\nGateway: {}\nGateway endpoint: https://127.0.0.1:8080/",
                ctx.gateway
            );
            ExitCode::SUCCESS
        }
        "gateway select" => {
            let Some(g) = words.get(2) else { return usage("gateway name required") };
            let mut c = ctx.config.clone();
            c["active"] = json!(g);
            Ctx { config: c, state: ctx.state.clone(), gateway: g.clone(), ..*ctx }.save_config();
            ExitCode::SUCCESS
        }
        _ if key.starts_with("sandbox ") || key.starts_with("policy ") => {
            if let Some(e) = gateway_error(gw_state.as_deref(), &ctx.gateway) {
                return fail(&e);
            }
            sandbox(ctx, key, &words[2..])
        }
        other => usage(&format!("unrecognized subcommand '{other}'")),
    }
}

fn status(ctx: &Ctx, state: Option<&str>) -> ExitCode {
    if ctx.json {
        if !ctx.at_least(92) {
            return usage("unexpected argument '-o' found");
        }
        let doc = match state {
            None => json!({"status": "not_configured"}),
            Some(s) => {
                let (status, auth) = match s {
                    "connected" => ("connected", "authenticated"),
                    "auth" => ("error", "failed"),
                    "disconnected" => ("disconnected", "unverified"),
                    _ => ("error", "unverified"),
                };
                json!({"gateway": ctx.gateway, "server": "https://127.0.0.1:8080", "status": status,
                       "authentication": {"status": auth}, "version": format!("{}.{}.{}", ctx.version.0, ctx.version.1, ctx.version.2)})
            }
        };
        println!("{doc}");
        return ExitCode::SUCCESS;
    }
    match state {
        None => println!("Error:   × No gateway configured"),
        Some("connected") => println!(
            "Server Status\n\n  Gateway: {}\n  Server: http://127.0.0.1:8080\n  Status: \x1b[32mConnected\x1b[0m",
            ctx.gateway
        ),
        Some("refused") => println!("Server Status\n\nGateway: {}\nError: Connection refused (os error 111)", ctx.gateway),
        Some("disconnected") => println!("Server Status\n\n  Gateway: {}\n  Status: Disconnected", ctx.gateway),
        Some(s) => println!(
            "Server Status\n\nGateway: {}\n{}",
            ctx.gateway,
            gateway_error(Some(s), &ctx.gateway).unwrap_or_default()
        ),
    }
    ExitCode::SUCCESS
}

fn read_meta(dir: &Path) -> Option<Value> {
    fs::read(dir.join("meta.json")).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

fn write_meta(dir: &Path, meta: &Value) {
    let _ = fs::write(dir.join("meta.json"), serde_json::to_vec_pretty(meta).unwrap_or_default());
}

fn flag<'a>(args: &'a [String], name: &str) -> Vec<&'a str> {
    args.windows(2).filter(|w| w[0] == name).map(|w| w[1].as_str()).collect()
}

fn positionals(args: &[String], with_value: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if with_value.contains(&a.as_str()) {
            it.next();
        } else if !a.starts_with("--") {
            out.push(a.clone());
        }
    }
    out
}

fn paint_phase(p: &str) -> String {
    format!("\x1b[1;32m{p}\x1b[0m")
}

fn print_sandbox(ctx: &Ctx, meta: &Value, full: bool) {
    if ctx.json {
        let mut m = meta.clone();
        if let Some(o) = m.as_object_mut() {
            o.remove("deleting_left");
            o.remove("policies");
            if full {
                o.insert("policy_source".into(), json!("sandbox"));
                o.insert("revision".into(), json!(1));
                o.insert("policy".into(), json!(null));
            }
        }
        println!("{m}");
        return;
    }
    println!("Sandbox:\n");
    println!("  Id: {}", meta["id"].as_str().unwrap_or(""));
    println!("  Name: {}", meta["name"].as_str().unwrap_or(""));
    println!("  Phase: {}", paint_phase(meta["phase"].as_str().unwrap_or("")));
    println!("  Resource version: {}", meta["resource_version"]);
    println!("  Labels:");
    if let Some(l) = meta["labels"].as_object() {
        for (k, v) in l {
            println!("    {k}: {}", v.as_str().unwrap_or(""));
        }
    }
}

fn sandbox(ctx: &Ctx, key: &str, args: &[String]) -> ExitCode {
    let gwdir = ctx.state.join("gw").join(&ctx.gateway);
    match key {
        "sandbox list" => {
            if ctx.json && !ctx.at_least(44) {
                return usage("unexpected argument '-o' found");
            }
            let limit: usize =
                flag(args, "--limit").first().and_then(|v| v.parse().ok()).unwrap_or(100);
            let offset: usize =
                flag(args, "--offset").first().and_then(|v| v.parse().ok()).unwrap_or(0);
            let mut names: Vec<String> = fs::read_dir(&gwdir)
                .map(|rd| {
                    rd.filter_map(Result::ok)
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            let metas: Vec<Value> = names
                .iter()
                .skip(offset)
                .take(limit)
                .filter_map(|n| read_meta(&gwdir.join(n)))
                .collect();
            if ctx.json {
                let rows: Vec<Value> = metas
                    .into_iter()
                    .map(|mut m| {
                        if let Some(o) = m.as_object_mut() {
                            o.remove("deleting_left");
                            o.remove("policies");
                        }
                        m
                    })
                    .collect();
                println!("{}", Value::Array(rows));
            } else if metas.is_empty() {
                println!("No sandboxes found.");
            } else {
                let old = !ctx.at_least(37);
                println!(
                    "{}",
                    if old { "NAME  NAMESPACE  CREATED  PHASE" } else { "NAME  CREATED  PHASE" }
                );
                for m in metas {
                    let ns = if old { "  default" } else { "" };
                    println!(
                        "{}{ns}  {}  {}",
                        m["name"].as_str().unwrap_or(""),
                        m["created_at"].as_str().unwrap_or(""),
                        paint_phase(m["phase"].as_str().unwrap_or(""))
                    );
                }
            }
            ExitCode::SUCCESS
        }
        "sandbox get" => {
            if ctx.json && !ctx.at_least(92) {
                return usage("unexpected argument '-o' found");
            }
            let Some(name) = positionals(args, &[]).into_iter().next() else {
                return usage("NAME required");
            };
            if ctx.config.get("no_spec").and_then(Value::as_bool) == Some(true) {
                return fail("Error:   × status: Internal, message: \"sandbox has no spec\"");
            }
            let dir = gwdir.join(&name);
            let Some(mut meta) = read_meta(&dir) else { return ctx.not_found() };
            if let Some(left) = meta.get("deleting_left").and_then(Value::as_u64) {
                if left == 0 {
                    let _ = fs::remove_dir_all(&dir);
                    return ctx.not_found();
                }
                meta["deleting_left"] = json!(left - 1);
                write_meta(&dir, &meta);
            }
            print_sandbox(ctx, &meta, true);
            ExitCode::SUCCESS
        }
        "sandbox create" => {
            let Some(name) = flag(args, "--name").first().map(|s| s.to_string()) else {
                return usage("--name required");
            };
            let Some(image) = flag(args, "--from").first().map(|s| s.to_string()) else {
                return usage("--from required");
            };
            if let Some(msg) = ctx.config.get("create_fail").and_then(Value::as_str) {
                return fail(&format!("Error:   × {msg}"));
            }
            let dir = gwdir.join(&name);
            if dir.exists() {
                return fail(&format!(
                    "Error:   × status: AlreadyExists, message: \"sandbox '{name}' already exists\""
                ));
            }
            let mut labels = serde_json::Map::new();
            for l in flag(args, "--label") {
                if let Some((k, v)) = l.split_once('=') {
                    labels.insert(k.to_owned(), json!(v));
                }
            }
            let n = fs::read_to_string(ctx.state.join("next-id"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(1);
            let _ = fs::write(ctx.state.join("next-id"), (n + 1).to_string());
            // `--policy FILE` sets the whole policy at creation (static fields included).
            let policy = match flag(args, "--policy").first() {
                Some(f) => match fs::read_to_string(f) {
                    Ok(c) => match parse_policy(&c) {
                        Ok(b) => b,
                        Err(e) => return fail(&e),
                    },
                    Err(_) => return fail(&format!("Error:   × cannot read {f}")),
                },
                None => DEFAULT_POLICY.to_owned(),
            };
            let meta = json!({
                "id": format!("5f0c{n:028x}"), "name": name, "workspace": "default", "labels": labels,
                "annotations": {"image": image}, "resource_version": 1,
                "created_at": "2026-08-20 10:00:00", "phase": "Ready", "current_policy_version": 1,
                "policies": [], "policy": policy,
                "gpu": args.iter().any(|a| a == "--gpu"),
                "providers": flag(args, "--provider"),
            });
            if fs::create_dir_all(dir.join("state")).is_err() {
                return fail("Error:   × could not create sandbox storage");
            }
            write_meta(&dir, &meta);
            if ctx.json {
                print_sandbox(ctx, &meta, false);
            } else {
                println!("✓ Created sandbox {name}");
            }
            ExitCode::SUCCESS
        }
        "sandbox delete" => {
            let Some(name) = positionals(args, &[]).into_iter().next() else {
                return usage("NAME required");
            };
            let dir = gwdir.join(&name);
            let Some(mut meta) = read_meta(&dir) else { return ctx.not_found() };
            let polls = ctx.config.get("delete_polls").and_then(Value::as_u64).unwrap_or(0);
            if polls > 0 {
                meta["phase"] = json!("Deleting");
                if meta.get("deleting_left").is_none() {
                    meta["deleting_left"] = json!(polls);
                }
                write_meta(&dir, &meta);
            } else {
                let _ = fs::remove_dir_all(&dir);
            }
            println!("✓ Deleted sandbox {name}");
            ExitCode::SUCCESS
        }
        "sandbox download" | "sandbox upload" => {
            let pos = positionals(args, &[]);
            let [name, a, b] = pos.as_slice() else { return usage("NAME SRC DEST required") };
            let dir = gwdir.join(name);
            if read_meta(&dir).is_none() {
                return ctx.not_found();
            }
            let (inside, local) = if key == "sandbox download" {
                (a.to_owned(), b)
            } else {
                // As the real CLI (0.0.37 on): a directory upload lands at DEST/<basename of SRC>.
                let base = Path::new(a.as_str())
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (format!("{}/{base}", b.trim_end_matches('/')), a)
            };
            let inside = &inside;
            let Some(rest) =
                inside.strip_prefix(STATE_PATH).filter(|r| r.is_empty() || r.starts_with('/'))
            else {
                return fail(&format!(
                    "Error:   × path '{inside}' is outside the sandbox workspace"
                ));
            };
            let mapped = dir.join("state").join(rest.trim_start_matches('/'));
            let (from, to) = if key == "sandbox download" {
                (mapped, PathBuf::from(local))
            } else {
                (PathBuf::from(local), mapped)
            };
            match copy_contents(&from, &to, key == "sandbox upload") {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("Error:   × copy failed: {e}")),
            }
        }
        // As the real CLI: `policy set` replaces the whole policy (a new revision), parsed
        // locally against the closed schema first; a live sandbox keeps its filesystem policy;
        // the same content again is a no-op.
        "policy set" => {
            let Some(name) = positionals(args, &["--policy", "--timeout"]).into_iter().next()
            else {
                return usage("NAME required");
            };
            let Some(file) = flag(args, "--policy").first().map(|s| s.to_string()) else {
                return usage("--policy required");
            };
            let dir = gwdir.join(&name);
            let Ok(content) = fs::read_to_string(&file) else {
                return fail(&format!("Error:   × cannot read {file}"));
            };
            let body = match parse_policy(&content) {
                Ok(b) => b,
                Err(e) => return fail(&e),
            };
            let Some(mut meta) = read_meta(&dir) else { return ctx.not_found() };
            let current = meta["policy"].as_str().unwrap_or("").to_owned();
            let version = meta["current_policy_version"].as_u64().unwrap_or(1);
            if body == current {
                eprintln!("· Policy unchanged (version {version}, hash: {})", &hash(&body)[..12]);
                return ExitCode::SUCCESS;
            }
            if current.contains("\nfilesystem_policy:") && !body.contains("\nfilesystem_policy:") {
                return fail("Error:   × code: 'Client specified an invalid argument', message: \"filesystem policy\n  │ cannot be removed on a live sandbox\"");
            }
            meta["policy"] = json!(body);
            meta["current_policy_version"] = json!(version + 1);
            write_meta(&dir, &meta);
            eprintln!("✓ Policy version {} submitted (hash: {})", version + 1, &hash(&body)[..12]);
            ExitCode::SUCCESS
        }
        "policy get" => {
            let Some(name) = positionals(args, &[]).into_iter().next() else {
                return usage("NAME required");
            };
            let Some(meta) = read_meta(&gwdir.join(&name)) else { return ctx.not_found() };
            let body = meta["policy"].as_str().unwrap_or("");
            let v = meta["current_policy_version"].as_u64().unwrap_or(1);
            print!(
                "Version:      {v}\nHash:         {}\nStatus:       Effective\nSource:       sandbox\nConfig rev:   {v}\n",
                hash(body)
            );
            if args.iter().any(|a| a == "--full") {
                print!("---\n{body}");
            }
            ExitCode::SUCCESS
        }
        other => usage(&format!("unrecognized subcommand '{other}'")),
    }
}

/// The policy a fresh sandbox gets (the real gateway's default, as `policy get --full` prints it).
const DEFAULT_POLICY: &str = "version: 1\nfilesystem_policy:\n  include_workdir: true\n  read_only:\n  - /usr\n  - /lib\n  - /etc\n  read_write:\n  - /sandbox\n  - /tmp\nlandlock:\n  compatibility: best_effort\nprocess:\n  run_as_group: sandbox\n  run_as_user: sandbox\n";

/// Check a policy file as the CLI does (closed top-level schema, `version` required) and
/// return the body the gateway would keep: comments dropped (the real gateway re-serialises).
fn parse_policy(content: &str) -> Result<String, String> {
    const KEYS: [&str; 6] = [
        "version",
        "filesystem_policy",
        "landlock",
        "process",
        "network_policies",
        "network_middlewares",
    ];
    let mut body = String::new();
    let mut has_version = false;
    for (i, line) in content.lines().enumerate() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(' ') && !line.starts_with('-') {
            let key = line.split(':').next().unwrap_or("").trim();
            if !KEYS.contains(&key) {
                return Err(format!("Error:   × failed to parse sandbox policy YAML\n  ╰─▶ unknown field `{key}`, expected one of `version`, `filesystem_policy`,\n      `landlock`, `process`, `network_policies`, `network_middlewares` at line\n      {} column 1", i + 1));
            }
            has_version |= key == "version";
        }
        body.push_str(line);
        body.push('\n');
    }
    if !has_version {
        return Err(
            "Error:   × failed to parse sandbox policy YAML\n  ╰─▶ missing field `version`"
                .to_owned(),
        );
    }
    Ok(body)
}

/// A stand-in for the gateway's policy hash (64 hex characters, as the real one).
fn hash(s: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Copy the contents of directory `from` into `to` (created), files replaced, symlinks kept,
/// with what the real CLI's tar pipeline keeps: permission bits (setuid/setgid/sticky only on
/// upload), mtimes truncated to whole seconds (directories' only on upload), names of one inode
/// as separate files.
fn copy_contents(from: &Path, to: &Path, upload: bool) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    fs::create_dir_all(to)?;
    let set_mtime = |p: &Path, m: &fs::Metadata, link: bool| -> std::io::Result<()> {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let times = [
            libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
            libc::timespec { tv_sec: m.mtime(), tv_nsec: 0 },
        ];
        let flags = if link { libc::AT_SYMLINK_NOFOLLOW } else { 0 };
        // SAFETY: c is NUL-terminated; times has two entries.
        if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    let mask = if upload { 0o7777 } else { 0o777 };
    for e in fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let m = fs::symlink_metadata(&src)?;
        let ft = m.file_type();
        if ft.is_dir() {
            copy_contents(&src, &dst, upload)?;
            fs::set_permissions(&dst, fs::Permissions::from_mode(m.mode() & mask))?;
            if upload {
                set_mtime(&dst, &m, false)?;
            }
        } else if ft.is_symlink() {
            let _ = fs::remove_file(&dst);
            std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
            set_mtime(&dst, &m, true)?;
        } else {
            let _ = fs::remove_file(&dst);
            fs::copy(&src, &dst)?;
            fs::set_permissions(&dst, fs::Permissions::from_mode(m.mode() & mask))?;
            set_mtime(&dst, &m, false)?;
        }
    }
    Ok(())
}
