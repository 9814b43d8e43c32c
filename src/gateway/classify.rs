//! Pure classification of `openshell` output (openshell.md, "Classification order"). No I/O
//! here: the driver runs a command, captures a [`CallOutput`], and these functions decide.
//!
//! The order matters and is fixed: (1) spawn failure or timeout → unknown; (2) schema drift →
//! unhealthy; (3) auth → unhealthy; (4) handshake → unhealthy (identity); (5) transport / no
//! gateway → unhealthy (unreachable); (6) not-found → missing **only if** the same gateway's
//! health was just proved, else unknown; (7) other non-zero → unknown; (8) exit 0 with a
//! parsable object of the right name → present.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{LiveSandbox, Liveness, Unhealthy};

/// What one `openshell` call produced (ANSI already stripped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallOutput {
    /// Exit code, `None` when killed or not started.
    pub status: Option<i32>,
    /// stdout text.
    pub stdout: String,
    /// stderr text.
    pub stderr: String,
    /// stdout as the program wrote it (for binary output; empty when not captured).
    pub raw_stdout: Vec<u8>,
    /// The call was killed by its timeout.
    pub timed_out: bool,
    /// The program could not be started.
    pub spawn_error: Option<String>,
}

impl CallOutput {
    /// A finished call (for tests and the driver).
    pub fn exited(status: i32, stdout: &str, stderr: &str) -> Self {
        CallOutput {
            status: Some(status),
            stdout: strip_ansi(stdout),
            stderr: strip_ansi(stderr),
            ..Default::default()
        }
    }

    /// stdout and stderr together.
    pub fn text(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// Exit 0.
    pub fn ok(&self) -> bool {
        self.status == Some(0) && !self.timed_out && self.spawn_error.is_none()
    }

    /// A short description of the failure for the operator (first meaningful stderr line).
    pub fn summary(&self) -> String {
        if let Some(e) = &self.spawn_error {
            return e.clone();
        }
        if self.timed_out {
            return "timed out (the process group was killed)".to_owned();
        }
        let pick = |s: &str| {
            s.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let t = pick(&self.stderr);
        let t = if t.is_empty() { pick(&self.stdout) } else { t };
        let t: String = t.chars().take(300).collect();
        match self.status {
            Some(c) => format!("exit {c}: {t}"),
            None => t,
        }
    }
}

/// Remove ANSI colour sequences (`ESC [ digits ; m`): table output is coloured even when piped.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' && it.peek() == Some(&'[') {
            it.next();
            // Consume parameters and the final byte of the CSI sequence.
            for d in it.by_ref() {
                if !(d.is_ascii_digit() || d == ';') {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// What an error text says, in classification order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorText {
    /// `invalid wire type`, `proto decode`, `protobuf decode`.
    Schema,
    /// `unauthorized`, `forbidden`, `permission denied`, token problems.
    Auth,
    /// `handshake verification failed`.
    Identity,
    /// Transport errors and "no gateway" messages.
    Transport,
    /// Not found (both generations).
    NotFound,
    /// `already exists` (ALREADY_EXISTS).
    AlreadyExists,
}

/// An `openshell` error report as one line of words: the CLI (miette) wraps reports at about
/// 80 columns with `  │ ` continuation lines and cause lines `├─▶` / `╰─▶`, splitting anywhere
/// between words (`'<name>' already` / `  │ exists`), so phrases are matched only after the
/// report's frame is removed and its lines are joined.
pub fn report_words(text: &str) -> String {
    let mut words = Vec::new();
    for line in strip_ansi(text).lines() {
        let mut l = line.trim_start();
        for frame in ["│", "├─▶", "╰─▶", "Error:", "×"] {
            l = l.trim_start_matches(frame).trim_start();
        }
        words.extend(l.split_whitespace().map(str::to_owned));
    }
    words.join(" ")
}

/// Categorise an error text; the first matching rule in classification order wins.
pub fn error_text(text: &str) -> Option<ErrorText> {
    let t = report_words(text).to_ascii_lowercase();
    let any = |words: &[&str]| words.iter().any(|w| t.contains(w));
    if any(&["invalid wire type", "proto decode", "protobuf decode"]) {
        return Some(ErrorText::Schema);
    }
    if any(&[
        "unauthorized",
        "unauthenticated",
        "forbidden",
        "permission denied",
        "invalid token",
        "expired token",
        "missing gateway auth token",
        // tonic 0.14 code descriptions (UNAUTHENTICATED, PERMISSION_DENIED).
        "does not have valid authentication credentials",
        "does not have permission to execute",
    ]) {
        return Some(ErrorText::Auth);
    }
    if t.contains("handshake verification failed") {
        return Some(ErrorText::Identity);
    }
    if any(&[
        "transport error",
        "tcp connect error",
        "connection refused",
        "connection reset",
        "client error (connect)",
        "no active gateway",
        "no gateway configured",
        "unknown gateway '",
        "no gateway metadata found",
        "failed to connect to gateway",
        // tonic 0.14 description of UNAVAILABLE.
        "the service is currently unavailable",
    ]) {
        return Some(ErrorText::Transport);
    }
    if any(&["status: notfound", "some requested entity was not found", "sandbox not found"]) {
        return Some(ErrorText::NotFound);
    }
    if any(&["already exists", "alreadyexists"]) {
        return Some(ErrorText::AlreadyExists);
    }
    None
}

/// Steps 1–5 of the order: the verdict when the call failed for a gateway-level reason, or
/// `None` when the caller must look further (not-found, other errors, a parsable answer).
pub fn gateway_trouble(out: &CallOutput) -> Option<Liveness> {
    if let Some(e) = &out.spawn_error {
        return Some(Liveness::Unknown { detail: format!("could not run openshell: {e}") });
    }
    if out.timed_out {
        return Some(Liveness::Unknown {
            detail: "openshell timed out; the process group was killed".to_owned(),
        });
    }
    let unhealthy = |reason| Liveness::Unhealthy { reason, detail: out.summary(), active: None };
    match error_text(&out.text()) {
        Some(ErrorText::Schema) => Some(unhealthy(Unhealthy::Schema)),
        Some(ErrorText::Auth) => Some(unhealthy(Unhealthy::Auth)),
        Some(ErrorText::Identity) => Some(unhealthy(Unhealthy::Identity)),
        Some(ErrorText::Transport) => Some(unhealthy(Unhealthy::Unreachable)),
        _ => None,
    }
}

/// Classify `openshell status -g <gateway> [-o json]`. `None` = healthy (connected, for this
/// gateway); otherwise why not. A status naming another gateway is `Foreign`.
pub fn classify_status(out: &CallOutput, gateway: &str) -> Option<Liveness> {
    if out.spawn_error.is_some() || out.timed_out {
        return gateway_trouble(out);
    }
    let text = out.stdout.trim();
    if text.starts_with('{') {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return Some(Liveness::Unknown {
                detail: format!("unparsable status JSON: {}", out.summary()),
            });
        };
        let status = v.get("status").and_then(Value::as_str).unwrap_or("");
        let named = v.get("gateway").and_then(Value::as_str);
        let auth = v.pointer("/authentication/status").and_then(Value::as_str);
        if auth == Some("failed") {
            return Some(Liveness::Unhealthy {
                reason: Unhealthy::Auth,
                detail: format!("gateway '{gateway}' authentication failed"),
                active: None,
            });
        }
        if auth == Some("unverified") || status == "connected_http" {
            // The gRPC health check failed and only the HTTP `/healthz` answered: the RPCs a
            // rebuild needs are not proved to work, so this is not a known-good state.
            let why = v.get("error").and_then(Value::as_str).unwrap_or("gRPC health check failed");
            let reason = match error_text(why) {
                Some(ErrorText::Auth) => Unhealthy::Auth,
                _ => Unhealthy::Unreachable,
            };
            return Some(Liveness::Unhealthy {
                reason,
                detail: format!("gateway '{gateway}' answers HTTP only (status `{status}`): {why}"),
                active: None,
            });
        }
        return match status {
            "connected" => match named {
                Some(n) if n != gateway => Some(foreign(gateway, n)),
                _ => None,
            },
            "error" | "disconnected" | "not_configured" => Some(Liveness::Unhealthy {
                reason: Unhealthy::Unreachable,
                detail: format!("gateway '{gateway}' status is `{status}`"),
                active: None,
            }),
            other => Some(Liveness::Unknown {
                detail: format!("gateway '{gateway}' status is `{other}`"),
            }),
        };
    }
    let fields = table_fields(&out.stdout);
    let named = fields.get("gateway").map(String::as_str);
    if let Some(a) = fields.get("authentication") {
        let a = a.to_ascii_lowercase();
        if a.starts_with("failed") || a.starts_with("unverified") {
            // `Unverified` = the gRPC health check failed; its `gRPC error:` line says why.
            let why = fields.get("grpc error").map(String::as_str).unwrap_or("");
            let reason = match error_text(why) {
                Some(ErrorText::Auth) => Unhealthy::Auth,
                _ if a.starts_with("failed") => Unhealthy::Auth,
                _ => Unhealthy::Unreachable,
            };
            return Some(Liveness::Unhealthy {
                reason,
                detail: format!("gateway '{gateway}' authentication: {a}"),
                active: None,
            });
        }
    }
    if let Some(s) = fields.get("status") {
        if s.eq_ignore_ascii_case("connected") {
            return match named {
                Some(n) if n != gateway => Some(foreign(gateway, n)),
                _ => None,
            };
        }
    }
    if let Some(bad) = gateway_trouble(out) {
        return Some(bad);
    }
    if let Some(s) = fields.get("status") {
        return Some(Liveness::Unhealthy {
            reason: Unhealthy::Unreachable,
            detail: format!("gateway '{gateway}' status is `{s}`"),
            active: None,
        });
    }
    Some(Liveness::Unknown { detail: format!("unrecognised status output: {}", out.summary()) })
}

fn foreign(gateway: &str, active: &str) -> Liveness {
    Liveness::Unhealthy {
        reason: Unhealthy::Foreign,
        detail: format!("asked about gateway '{gateway}' but '{active}' answered"),
        active: Some(active.to_owned()),
    }
}

/// Classify `openshell sandbox get -g <gateway> <name>`; `health_proved` says whether the same
/// gateway was shown healthy in this classification (the only way to reach `Missing`).
pub fn classify_get(out: &CallOutput, name: &str, health_proved: bool) -> Liveness {
    if let Some(bad) = gateway_trouble(out) {
        return bad;
    }
    if !out.ok() {
        if error_text(&out.text()) == Some(ErrorText::NotFound) {
            return if health_proved {
                Liveness::Missing
            } else {
                Liveness::Unknown {
                    detail: format!(
                        "'{name}' was not found, but the gateway's health was not proved: {}",
                        out.summary()
                    ),
                }
            };
        }
        return Liveness::Unknown { detail: out.summary() };
    }
    match parse_sandbox(&out.stdout) {
        Ok(s) if s.name == name => Liveness::Present(s),
        Ok(s) => Liveness::Unknown {
            detail: format!("asked for '{name}' but openshell described '{}'", s.name),
        },
        Err(why) => {
            Liveness::Unknown { detail: format!("unparsable `sandbox get` output ({why})") }
        }
    }
}

const PHASES: [&str; 9] = [
    "Unspecified",
    "Provisioning",
    "Ready",
    "Error",
    "Deleting",
    "Stopping",
    "Stopped",
    "Starting",
    "Unknown",
];

fn phase_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n
            .as_u64()
            .and_then(|i| PHASES.get(i as usize))
            .map(|s| (*s).to_owned())
            .unwrap_or_else(|| "Unknown".to_owned()),
        _ => "Unknown".to_owned(),
    }
}

fn labels_of(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (k.clone(), v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn sandbox_from_json(v: &Value) -> Result<LiveSandbox, String> {
    let name = v.get("name").and_then(Value::as_str).ok_or("no `name`")?;
    Ok(LiveSandbox {
        id: v.get("id").and_then(Value::as_str).unwrap_or("").to_owned(),
        name: name.to_owned(),
        phase: v.get("phase").map(phase_of).unwrap_or_else(|| "Unknown".to_owned()),
        labels: labels_of(v.get("labels")),
    })
}

/// Parse `sandbox get` output: JSON object, or the table (`Sandbox:` / `Id:` / `Name:` /
/// `Phase:` / `Labels:` with indented `key: value` lines).
pub fn parse_sandbox(stdout: &str) -> Result<LiveSandbox, String> {
    let t = stdout.trim();
    if t.starts_with('{') {
        let v: Value = serde_json::from_str(t).map_err(|e| format!("invalid JSON: {e}"))?;
        return sandbox_from_json(&v);
    }
    if !t.lines().any(|l| l.trim() == "Sandbox:") {
        return Err("no `Sandbox:` header".to_owned());
    }
    let mut fields = BTreeMap::new();
    let mut labels = BTreeMap::new();
    let mut label_indent: Option<usize> = None;
    for line in t.lines() {
        let indent = line.len() - line.trim_start().len();
        let l = line.trim();
        if l.is_empty() {
            continue;
        }
        // The table ends with the sandbox's policy as YAML, whose `name:` keys are not the
        // sandbox's: everything from the `Policy:` heading on is not sandbox metadata.
        if indent == 0 && l == "Policy:" {
            break;
        }
        if let Some(li) = label_indent {
            if indent > li {
                if let Some((k, v)) = l.split_once(':') {
                    labels.insert(k.trim().to_owned(), v.trim().to_owned());
                }
                continue;
            }
            label_indent = None;
        }
        if l == "Labels:" {
            label_indent = Some(indent);
            continue;
        }
        if let Some((k, v)) = l.split_once(':') {
            fields.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let name = fields.get("name").ok_or("no `Name:` line")?;
    Ok(LiveSandbox {
        id: fields.get("id").cloned().unwrap_or_default(),
        name: name.clone(),
        phase: fields.get("phase").cloned().unwrap_or_else(|| "Unknown".to_owned()),
        labels,
    })
}

/// Parse `sandbox list` output: JSON array, `No sandboxes found.`, or the two-space separated
/// table with header `NAME  CREATED  PHASE` (≤0.0.36: `NAME  NAMESPACE  CREATED  PHASE`).
pub fn parse_list(stdout: &str) -> Result<Vec<LiveSandbox>, String> {
    let t = stdout.trim();
    if t.starts_with('[') {
        let v: Value = serde_json::from_str(t).map_err(|e| format!("invalid JSON: {e}"))?;
        return v.as_array().ok_or("not an array")?.iter().map(sandbox_from_json).collect();
    }
    if t.is_empty() || t.starts_with("No sandboxes found") {
        return Ok(Vec::new());
    }
    let mut lines = t.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = split_cols(lines.next().unwrap_or(""));
    let name_col = header.iter().position(|h| h == "NAME").ok_or("no NAME column")?;
    let phase_col = header.iter().position(|h| h == "PHASE").ok_or("no PHASE column")?;
    let mut out = Vec::new();
    for l in lines {
        let cols = split_cols(l);
        if cols.len() != header.len() {
            return Err(format!("row `{l}` does not match the header"));
        }
        out.push(LiveSandbox {
            id: String::new(),
            name: cols[name_col].clone(),
            phase: cols[phase_col].clone(),
            labels: BTreeMap::new(),
        });
    }
    Ok(out)
}

/// Split a table row on runs of two or more spaces (a CREATED value holds a single space).
fn split_cols(line: &str) -> Vec<String> {
    line.trim().split("  ").map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect()
}

/// `key: value` lines of table output, keys lowercased.
fn table_fields(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

/// The active gateway from `openshell gateway list -o json` (array of objects with `name` and
/// `active`), or from a plain `openshell status` table/JSON (`Gateway:` / `"gateway"`).
pub fn parse_active_gateway(stdout: &str) -> Option<String> {
    let t = stdout.trim();
    if let Ok(v) = serde_json::from_str::<Value>(t) {
        if let Some(arr) = v.as_array() {
            return arr
                .iter()
                .find(|g| g.get("active").and_then(Value::as_bool) == Some(true))
                .and_then(|g| g.get("name").and_then(Value::as_str))
                .map(str::to_owned);
        }
        return v.get("gateway").and_then(Value::as_str).map(str::to_owned);
    }
    table_fields(t).get("gateway").cloned()
}

/// A parsed `openshell --version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    /// Parse `openshell 0.0.116` (or a bare semver).
    pub fn parse(s: &str) -> Option<Version> {
        let word =
            s.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
        let core = word.split(['-', '+']).next()?;
        let mut it = core.split('.').map(|p| p.parse::<u32>());
        let v = Version(it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?);
        Some(v)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// What an `openshell` version can do (openshell.md capability table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// `sandbox create --label`, and directory uploads nested under `DEST/<basename>` (0.0.37).
    pub label: bool,
    /// `sandbox list -o json` (0.0.44).
    pub list_json: bool,
    /// Global `--workspace` (0.0.88).
    pub workspace: bool,
    /// `sandbox get -o json`, `status -o json` (0.0.92).
    pub get_json: bool,
    /// `sandbox stop` / `start` (0.0.105).
    pub stop_start: bool,
    /// A create whose command exits goes to phase Error (0.0.111).
    pub create_needs_detach: bool,
    /// tonic 0.14 error text (0.0.61).
    pub new_errors: bool,
}

impl Capabilities {
    /// The profile of a version.
    pub fn of(v: Version) -> Capabilities {
        let at = |p| v >= Version(0, 0, p);
        Capabilities {
            label: at(37),
            list_json: at(44),
            workspace: at(88),
            get_json: at(92),
            stop_start: at(105),
            create_needs_detach: at(111),
            new_errors: at(61),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(strip_ansi("\x1b[1;32mReady\x1b[0m x"), "Ready x");
    }

    #[rstest]
    #[case::old("openshell 0.0.36", Version(0, 0, 36))]
    #[case::new("openshell 0.0.116\n", Version(0, 0, 116))]
    #[case::pre("openshell 0.1.0-rc.1", Version(0, 1, 0))]
    fn versions(#[case] s: &str, #[case] v: Version) {
        assert_eq!(Version::parse(s), Some(v));
    }

    #[test]
    fn capability_table() {
        let c = Capabilities::of(Version(0, 0, 92));
        assert!(c.list_json && c.workspace && c.get_json && !c.stop_start && c.new_errors);
        let old = Capabilities::of(Version(0, 0, 43));
        assert!(!old.list_json && !old.get_json && !old.new_errors);
    }

    #[rstest]
    #[case::table("NAME  CREATED  PHASE\na  2026-08-20 10:00:00  Ready\nb-2  2026-08-20 10:00:01  Provisioning\n", &[("a", "Ready"), ("b-2", "Provisioning")])]
    #[case::old_table("NAME  NAMESPACE  CREATED  PHASE\na  default  2026-08-20 10:00:00  Running\n", &[("a", "Running")])]
    #[case::empty("No sandboxes found.\n", &[])]
    #[case::json("[{\"id\":\"1\",\"name\":\"a\",\"phase\":\"Ready\",\"labels\":{}}]", &[("a", "Ready")])]
    #[case::json_empty("[]", &[])]
    fn lists(#[case] out: &str, #[case] want: &[(&str, &str)]) {
        let got = parse_list(out).unwrap();
        let got: Vec<(&str, &str)> =
            got.iter().map(|s| (s.name.as_str(), s.phase.as_str())).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn active_gateway_from_list() {
        let j = r#"[{"name":"nemoclaw","active":false},{"name":"nemoclaw-9000","active":true}]"#;
        assert_eq!(parse_active_gateway(j).as_deref(), Some("nemoclaw-9000"));
        assert_eq!(
            parse_active_gateway("Server Status\n\n  Gateway: nemoclaw\n").as_deref(),
            Some("nemoclaw")
        );
    }
}
