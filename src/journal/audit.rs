//! Audit queries over the journal: list runs, show one run's timeline, export events as JSON
//! Lines, verify integrity / hash chain / consistency, and prune finished runs.
//!
//! Everything here reads with streaming statements (one row at a time) so that a journal with
//! millions of events costs time, not memory. The only writer is [`prune`], which removes a
//! prefix of the hash chain in one IMMEDIATE transaction and leaves an anchor so that the rest
//! of the chain stays verifiable.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use rusqlite::{params_from_iter, Connection, OptionalExtension, Transaction};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::chain::{event_hash, EventFields, GENESIS};
use super::events::{self, META_PRUNED_HEAD, META_PRUNED_ID};
use super::runs::{column_text, RunState, StepState, RUN_IMAGE_COLUMNS, STEP_IMAGE_COLUMNS};
use super::{Journal, JournalError};
use crate::exit::{Exit, ExitCoded};

/// Version of the `journal export` line format and of the audit `--json` payloads.
pub const AUDIT_SCHEMA_VERSION: u32 = 1;

/// meta key that allows deleting events; set and cleared inside the prune transaction.
pub const META_PRUNE_IN_PROGRESS: &str = "prune_in_progress";

/// Directory under the NemoClaw home where rebuild backups live; prune removes nothing else.
pub const BACKUPS_DIR: &str = "rebuild-backups";

/// Run states after which nothing more will happen to a run. `failed`, `interrupted` and
/// `needs_operator` are not finished: they still need `nemoclaw recover`.
pub const FINISHED_STATES: &[&str] = &["succeeded", "rolled_back"];

/// Every step state the schema allows.
pub const STEP_STATES: &[&str] =
    &["pending", "started", "done", "failed", "compensating", "compensated"];

/// Every run state the schema allows.
pub const RUN_STATES: &[&str] = &[
    "running",
    "succeeded",
    "failed",
    "interrupted",
    "needs_operator",
    "rolling_back",
    "rolled_back",
];

/// Audit failures.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A `--since` / `--until` value that is neither RFC 3339 nor a duration.
    #[error("invalid time `{input}`: use RFC 3339 (`2026-06-01T10:00:00Z`), a date (`2026-06-01`) or a duration before now (`7d`, `12h`, `30m`, `45s`)")]
    BadTime {
        /// What was given.
        input: String,
    },
    /// A `--older-than` value that is not a duration.
    #[error("invalid duration `{input}`: use a number and a unit, e.g. `30d`, `12h`, `30m`, `45s`, `2w`")]
    BadDuration {
        /// What was given.
        input: String,
    },
    /// A `--state` value the schema does not know.
    #[error("invalid run state `{input}`: expected one of {}", RUN_STATES.join(", "))]
    BadState {
        /// What was given.
        input: String,
    },
    /// No run matches.
    #[error("no run matches `{prefix}` in journal {path}")]
    UnknownRun {
        /// The id or prefix given.
        prefix: String,
        /// Journal file.
        path: PathBuf,
    },
    /// Several runs match a prefix.
    #[error("run prefix `{prefix}` is ambiguous; it matches: {}", candidates.join(", "))]
    AmbiguousRun {
        /// The prefix given.
        prefix: String,
        /// Up to ten matching ids.
        candidates: Vec<String>,
    },
    /// A journal failure.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Writing the output failed (other than a closed pipe, which ends the output quietly).
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
    /// Removing a backup directory failed.
    #[error("cannot remove backup {path}: {source}")]
    Backup {
        /// The directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

impl ExitCoded for AuditError {
    fn exit(&self) -> Exit {
        match self {
            AuditError::BadTime { .. }
            | AuditError::BadDuration { .. }
            | AuditError::BadState { .. }
            | AuditError::UnknownRun { .. }
            | AuditError::AmbiguousRun { .. } => Exit::Usage,
            AuditError::Journal(e) => e.exit(),
            AuditError::Output(_) | AuditError::Backup { .. } => Exit::Io,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            AuditError::Journal(e) => e.next_command(),
            _ => None,
        }
    }
}

fn sql<'a>(path: &'a Path, what: &str) -> impl FnOnce(rusqlite::Error) -> AuditError + 'a {
    let what = what.to_owned();
    move |e| AuditError::Journal(JournalError::sql(path, &what, e))
}

// ---------------------------------------------------------------------------------------------
// Times and durations

/// Parse a duration like `7d`, `12h`, `30m`, `45s`, `2w` or `500ms` into milliseconds.
pub fn parse_duration(s: &str) -> Result<i64, AuditError> {
    let bad = || AuditError::BadDuration { input: s.to_owned() };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = t.split_at(split);
    let n: i64 = num.parse().map_err(|_| bad())?;
    let mult: i64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

/// Parse a point in time: RFC 3339, a UTC date (`2026-06-01`), or a duration meaning "that long
/// before `now_ms`". Returns milliseconds since the epoch.
pub fn parse_time(s: &str, now_ms: i64) -> Result<i64, AuditError> {
    let t = s.trim();
    if let Ok(d) = chrono::DateTime::parse_from_rfc3339(t) {
        return Ok(d.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        if let Some(dt) = d.and_hms_opt(0, 0, 0) {
            return Ok(dt.and_utc().timestamp_millis());
        }
    }
    match parse_duration(t) {
        Ok(ms) => Ok(now_ms - ms),
        Err(_) => Err(AuditError::BadTime { input: s.to_owned() }),
    }
}

/// A short human duration: `850ms`, `4.2s`, `3m12s`, `2h05m`, `3d04h`.
pub fn human_duration(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    } else if ms < 86_400_000 {
        format!("{}h{:02}m", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    } else {
        format!("{}d{:02}h", ms / 86_400_000, (ms % 86_400_000) / 3_600_000)
    }
}

/// `3h ago`, `just now`, or `in 5m` (clock skew) relative to `now_ms`.
pub fn relative_time(at_ms: i64, now_ms: i64) -> String {
    let d = now_ms - at_ms;
    if d.abs() < 1_000 {
        return "just now".to_owned();
    }
    let unit = |ms: i64| {
        if ms < 60_000 {
            format!("{}s", ms / 1000)
        } else if ms < 3_600_000 {
            format!("{}m", ms / 60_000)
        } else if ms < 86_400_000 {
            format!("{}h", ms / 3_600_000)
        } else {
            format!("{}d", ms / 86_400_000)
        }
    };
    if d > 0 {
        format!("{} ago", unit(d))
    } else {
        format!("in {}", unit(-d))
    }
}

// ---------------------------------------------------------------------------------------------
// list

/// Filters of `journal list`. Times are milliseconds since the epoch.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only runs of this sandbox.
    pub sandbox: Option<String>,
    /// Only runs in this state.
    pub state: Option<String>,
    /// Only runs created at or after this time.
    pub since: Option<i64>,
    /// Only runs created before this time.
    pub until: Option<i64>,
    /// At most this many runs.
    pub limit: Option<u32>,
}

impl RunFilter {
    /// Reject a state the schema does not know (a typo would otherwise just list nothing).
    pub fn validate(&self) -> Result<(), AuditError> {
        match &self.state {
            Some(s) if !RUN_STATES.contains(&s.as_str()) => {
                Err(AuditError::BadState { input: s.clone() })
            }
            _ => Ok(()),
        }
    }
}

/// The step a run touched last.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LastStep {
    /// Position in the plan.
    pub seq: i64,
    /// Step name.
    pub name: String,
    /// Step state.
    pub state: String,
}

/// One run as `journal list` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunSummary {
    /// Run id (UUID v7).
    pub id: String,
    /// Plan name (`rebuild`, ...).
    pub plan: String,
    /// Sandbox, when the plan is about one.
    pub sandbox: Option<String>,
    /// Gateway binding.
    pub gateway: Option<String>,
    /// Plan mode (`normal`, `stale`).
    pub mode: Option<String>,
    /// Run state.
    pub state: String,
    /// Creation time (ms).
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
    /// Finish time (ms), for succeeded / rolled back runs.
    pub finished_at: Option<i64>,
    /// `finished_at` (or, while unfinished, `updated_at`) minus `created_at`.
    pub duration_ms: i64,
    /// The step touched last, if any.
    pub last_step: Option<LastStep>,
    /// User who started the run.
    pub user: String,
    /// Host it ran on.
    pub host: String,
    /// Process id of the runner that created it.
    pub pid: i64,
    /// Command line.
    pub argv: Vec<String>,
    /// Error text of a failed run.
    pub error: Option<String>,
}

const SUMMARY_COLS: &str = "r.id, r.plan, r.sandbox, r.gateway, r.mode, r.state, r.created_at, \
     r.updated_at, r.finished_at, r.user, r.host, r.pid, r.argv, r.error, \
     (SELECT json_array(s.seq, s.name, s.state) FROM steps s WHERE s.run_id = r.id \
        AND s.state <> 'pending' \
      ORDER BY max(coalesce(s.started_at, 0), coalesce(s.finished_at, 0), \
                   coalesce(s.compensated_at, 0)) DESC, s.seq DESC LIMIT 1)";

fn summary_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunSummary> {
    let created_at: i64 = r.get(6)?;
    let updated_at: i64 = r.get(7)?;
    let finished_at: Option<i64> = r.get(8)?;
    let argv: String = r.get(12)?;
    let last: Option<String> = r.get(14)?;
    let last_step = last
        .and_then(|t| serde_json::from_str::<(i64, String, String)>(&t).ok())
        .map(|(seq, name, state)| LastStep { seq, name, state });
    Ok(RunSummary {
        id: r.get(0)?,
        plan: r.get(1)?,
        sandbox: r.get(2)?,
        gateway: r.get(3)?,
        mode: r.get(4)?,
        state: r.get(5)?,
        created_at,
        updated_at,
        finished_at,
        duration_ms: finished_at.unwrap_or(updated_at) - created_at,
        last_step,
        user: r.get(9)?,
        host: r.get(10)?,
        pid: r.get(11)?,
        argv: serde_json::from_str(&argv).unwrap_or_else(|_| vec![argv]),
        error: r.get(13)?,
    })
}

/// The SQL and parameters of a `journal list` query. Only the filters that are set become
/// conditions, so SQLite can pick the matching index (`runs_by_sandbox`, `runs_by_state`,
/// `runs_by_created`) and walk it newest-first without sorting.
fn list_sql(f: &RunFilter) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value as V;
    let mut conds = Vec::new();
    let mut params = Vec::new();
    if let Some(s) = &f.sandbox {
        params.push(V::Text(s.clone()));
        conds.push(format!("r.sandbox = ?{}", params.len()));
    }
    if let Some(s) = &f.state {
        params.push(V::Text(s.clone()));
        conds.push(format!("r.state = ?{}", params.len()));
    }
    if let Some(t) = f.since {
        params.push(V::Integer(t));
        conds.push(format!("r.created_at >= ?{}", params.len()));
    }
    if let Some(t) = f.until {
        params.push(V::Integer(t));
        conds.push(format!("r.created_at < ?{}", params.len()));
    }
    let mut q = format!("SELECT {SUMMARY_COLS} FROM runs r");
    if !conds.is_empty() {
        q.push_str(" WHERE ");
        q.push_str(&conds.join(" AND "));
    }
    // The id breaks ties between runs created in the same millisecond (UUID v7 sorts by time).
    q.push_str(" ORDER BY r.created_at DESC, r.id DESC");
    if let Some(l) = f.limit {
        params.push(V::Integer(i64::from(l)));
        q.push_str(&format!(" LIMIT ?{}", params.len()));
    }
    (q, params)
}

/// Stream the runs matching `f`, newest first, to `each`.
pub fn list_runs(
    j: &Journal,
    f: &RunFilter,
    mut each: impl FnMut(RunSummary) -> Result<(), AuditError>,
) -> Result<(), AuditError> {
    f.validate()?;
    let (q, params) = list_sql(f);
    let mut stmt = j.conn().prepare(&q).map_err(sql(j.path(), "cannot list runs"))?;
    let mut rows =
        stmt.query(params_from_iter(params)).map_err(sql(j.path(), "cannot list runs"))?;
    while let Some(row) = rows.next().map_err(sql(j.path(), "cannot list runs"))? {
        each(summary_from_row(row).map_err(sql(j.path(), "cannot read a run"))?)?;
    }
    Ok(())
}

/// `EXPLAIN QUERY PLAN` of the `journal list` query for `f`: `(parent node id, detail)` per
/// plan node; parent 0 is the outer query (used by tests to prove the query walks an index
/// instead of scanning and sorting the table).
pub fn list_query_plan(conn: &Connection, f: &RunFilter) -> rusqlite::Result<Vec<(i64, String)>> {
    let (q, params) = list_sql(f);
    let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {q}"))?;
    let rows = stmt.query_map(params_from_iter(params), |r| Ok((r.get(1)?, r.get(3)?)))?;
    rows.collect()
}

// ---------------------------------------------------------------------------------------------
// show

/// Resolve a run id or unique prefix to the full id.
pub fn resolve_run(j: &Journal, prefix: &str) -> Result<String, AuditError> {
    let p = prefix.trim().to_ascii_lowercase();
    let unknown = || AuditError::UnknownRun { prefix: prefix.to_owned(), path: j.path().into() };
    // Run ids are UUID text: hex digits and `-`. Anything else cannot match, and restricting the
    // alphabet lets a range on the primary key replace a LIKE scan (`g` sorts after `f`).
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(unknown());
    }
    let mut stmt = j
        .conn()
        .prepare("SELECT id FROM runs WHERE id >= ?1 AND id < ?1 || 'g' ORDER BY id LIMIT 11")
        .map_err(sql(j.path(), "cannot look up the run"))?;
    let ids: Vec<String> = stmt
        .query_map([&p], |r| r.get(0))
        .and_then(|it| it.collect())
        .map_err(sql(j.path(), "cannot look up the run"))?;
    match ids.len() {
        0 => Err(unknown()),
        1 => Ok(ids.into_iter().next().unwrap_or_default()),
        _ if ids.contains(&p) => Ok(p),
        _ => Err(AuditError::AmbiguousRun {
            prefix: prefix.to_owned(),
            candidates: ids.into_iter().take(10).collect(),
        }),
    }
}

/// A file or directory a step produced (today: a rebuild backup).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Artifact {
    /// Step that produced it.
    pub step: String,
    /// Absolute path.
    pub path: String,
    /// Digest of its manifest, when recorded.
    pub manifest_sha256: Option<String>,
}

/// One step of a run, as `journal show` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepView {
    /// Position in the plan.
    pub seq: i64,
    /// Step name.
    pub name: String,
    /// Step version.
    pub version: i64,
    /// Whether the step is destructive.
    pub destructive: bool,
    /// Step state.
    pub state: String,
    /// How many times apply was started.
    pub attempt: i64,
    /// Intent time (ms).
    pub started_at: Option<i64>,
    /// Outcome time (ms).
    pub finished_at: Option<i64>,
    /// `finished_at - started_at`.
    pub duration_ms: Option<i64>,
    /// Compensation time (ms).
    pub compensated_at: Option<i64>,
    /// Error text.
    pub error: Option<String>,
    /// Journaled output (redacted).
    pub output: Option<Value>,
    /// Artifacts named in the output.
    pub artifacts: Vec<Artifact>,
}

/// One event, as stored.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EventRecord {
    /// Event id (chain position).
    pub id: i64,
    /// Run, if any.
    pub run_id: Option<String>,
    /// Step, if any.
    pub step_seq: Option<i64>,
    /// Time (ms).
    pub at: i64,
    /// Kind.
    pub kind: String,
    /// JSON text exactly as hashed.
    pub data: String,
    /// Hash of the previous event.
    pub prev_hash: String,
    /// This event's hash.
    pub hash: String,
}

impl EventRecord {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(0)?,
            run_id: r.get(1)?,
            step_seq: r.get(2)?,
            at: r.get(3)?,
            kind: r.get(4)?,
            data: r.get(5)?,
            prev_hash: r.get(6)?,
            hash: r.get(7)?,
        })
    }

    /// The data parsed as JSON (`null` if the stored text is somehow not JSON).
    pub fn data_json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }

    /// Recompute this event's hash from `prev_hash` and its fields.
    pub fn recompute_hash(&self, prev_hash: &str) -> String {
        event_hash(
            prev_hash,
            &EventFields {
                id: self.id,
                run_id: self.run_id.as_deref(),
                step_seq: self.step_seq,
                at: self.at,
                kind: &self.kind,
                data: &self.data,
            },
        )
    }
}

const EVENT_COLS: &str = "id, run_id, step_seq, at, kind, data, prev_hash, hash";

/// Everything `journal show` prints about one run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunDetail {
    /// The summary.
    #[serde(flatten)]
    pub run: RunSummary,
    /// What the runner lock protects.
    pub lock_key: String,
    /// Plan fingerprint.
    pub plan_fingerprint: String,
    /// nemoclaw version that created the run.
    pub binary_version: String,
    /// Run parameters (redacted).
    pub params: Value,
    /// Steps in plan order.
    pub steps: Vec<StepView>,
    /// The run's events in order.
    pub events: Vec<EventRecord>,
}

impl RunDetail {
    /// Every artifact of every step.
    pub fn artifacts(&self) -> impl Iterator<Item = &Artifact> {
        self.steps.iter().flat_map(|s| s.artifacts.iter())
    }
}

/// Artifacts named in a step output: any object carrying `backup_path` (at any depth).
pub fn artifacts_in(step: &str, output: &Value) -> Vec<Artifact> {
    let mut out = Vec::new();
    fn walk(step: &str, v: &Value, out: &mut Vec<Artifact>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(p)) = m.get("backup_path") {
                    out.push(Artifact {
                        step: step.to_owned(),
                        path: p.clone(),
                        manifest_sha256: m
                            .get("manifest_sha256")
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                    });
                }
                for (k, x) in m {
                    if k != "backup_path" {
                        walk(step, x, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(step, x, out)),
            _ => {}
        }
    }
    walk(step, output, &mut out);
    out
}

/// Load one run (by full id) with its steps and events.
pub fn show_run(j: &Journal, id: &str) -> Result<RunDetail, AuditError> {
    let p = j.path();
    let head = j
        .conn()
        .query_row(
            &format!(
                "SELECT {SUMMARY_COLS}, r.lock_key, r.plan_fingerprint, r.binary_version, r.params \
                 FROM runs r WHERE r.id = ?1"
            ),
            [id],
            |r| {
                let params: String = r.get(18)?;
                Ok((
                    summary_from_row(r)?,
                    r.get::<_, String>(15)?,
                    r.get::<_, String>(16)?,
                    r.get::<_, String>(17)?,
                    serde_json::from_str(&params).unwrap_or(Value::Null),
                ))
            },
        )
        .optional()
        .map_err(sql(p, "cannot read the run"))?;
    let Some((run, lock_key, plan_fingerprint, binary_version, params)) = head else {
        return Err(AuditError::UnknownRun { prefix: id.to_owned(), path: p.into() });
    };
    let mut stmt = j
        .conn()
        .prepare(
            "SELECT seq, name, version, destructive, state, attempt, started_at, finished_at, \
             compensated_at, error, output FROM steps WHERE run_id = ?1 ORDER BY seq",
        )
        .map_err(sql(p, "cannot read the steps"))?;
    let steps: Vec<StepView> = stmt
        .query_map([id], |r| {
            let name: String = r.get(1)?;
            let started_at: Option<i64> = r.get(6)?;
            let finished_at: Option<i64> = r.get(7)?;
            let output: Option<String> = r.get(10)?;
            let output: Option<Value> = output.and_then(|t| serde_json::from_str(&t).ok());
            let artifacts = output.as_ref().map(|o| artifacts_in(&name, o)).unwrap_or_default();
            Ok(StepView {
                seq: r.get(0)?,
                version: r.get(2)?,
                destructive: r.get::<_, i64>(3)? != 0,
                state: r.get(4)?,
                attempt: r.get(5)?,
                started_at,
                finished_at,
                duration_ms: started_at.zip(finished_at).map(|(s, f)| f - s),
                compensated_at: r.get(8)?,
                error: r.get(9)?,
                output,
                artifacts,
                name,
            })
        })
        .and_then(|it| it.collect())
        .map_err(sql(p, "cannot read the steps"))?;
    let mut stmt = j
        .conn()
        .prepare(&format!("SELECT {EVENT_COLS} FROM events WHERE run_id = ?1 ORDER BY id"))
        .map_err(sql(p, "cannot read the events"))?;
    let events: Vec<EventRecord> = stmt
        .query_map([id], EventRecord::from_row)
        .and_then(|it| it.collect())
        .map_err(sql(p, "cannot read the events"))?;
    Ok(RunDetail { run, lock_key, plan_fingerprint, binary_version, params, steps, events })
}

// ---------------------------------------------------------------------------------------------
// export

/// Filters of `journal export`.
#[derive(Debug, Clone, Default)]
pub struct ExportFilter {
    /// Only events at or after this time (ms).
    pub since: Option<i64>,
    /// Only events of this sandbox's runs.
    pub sandbox: Option<String>,
}

/// One export line (without the trailing newline):
/// `{"schema_version":1,"type":"event","data":{...}}`. `data.data` is the event's JSON; its
/// compact serialisation is the exact text the hash covers.
pub fn export_line(e: &EventRecord, sandbox: Option<&str>) -> String {
    // Built by hand rather than through a `Value`: the stored data text is already compact JSON
    // (the schema CHECKs json_valid), so it is embedded as is, and the line costs no parse.
    // Field order and spelling are the format; `q` quotes and escapes a string.
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "null".to_owned());
    let opt = |s: Option<&str>| s.map(q).unwrap_or_else(|| "null".to_owned());
    let data = if e.data.is_empty() { "null" } else { e.data.as_str() };
    format!(
        "{{\"schema_version\":{AUDIT_SCHEMA_VERSION},\"type\":\"event\",\"data\":{{\"id\":{},\"at\":{},\
         \"at_iso\":\"{}\",\"run_id\":{},\"sandbox\":{},\"step_seq\":{},\"kind\":{},\"data\":{data},\
         \"prev_hash\":{},\"hash\":{}}}}}",
        e.id,
        e.at,
        crate::util::iso_ms(e.at),
        opt(e.run_id.as_deref()),
        opt(sandbox),
        e.step_seq.map(|s| s.to_string()).unwrap_or_else(|| "null".to_owned()),
        q(&e.kind),
        q(&e.prev_hash),
        q(&e.hash),
    )
}

/// Stream matching events in chain order to `out` as JSON Lines. Returns how many were written.
/// A closed pipe (`| head`) ends the export quietly.
pub fn export(j: &Journal, f: &ExportFilter, out: &mut impl Write) -> Result<u64, AuditError> {
    let p = j.path();
    // Events are walked in id order (the primary key); the sandbox filter is an IN-list that
    // SQLite materialises once from `runs_by_sandbox`, so memory does not grow with the journal.
    let q = format!(
        "SELECT e.id, e.run_id, e.step_seq, e.at, e.kind, e.data, e.prev_hash, e.hash, \
         (SELECT r.sandbox FROM runs r WHERE r.id = e.run_id) \
         FROM events e WHERE (?1 IS NULL OR e.at >= ?1) {} ORDER BY e.id",
        if f.sandbox.is_some() {
            "AND e.run_id IN (SELECT id FROM runs WHERE sandbox = ?2)"
        } else {
            "AND ?2 IS NULL"
        }
    );
    let mut stmt = j.conn().prepare(&q).map_err(sql(p, "cannot export events"))?;
    let mut rows = stmt
        .query(rusqlite::params![f.since, f.sandbox])
        .map_err(sql(p, "cannot export events"))?;
    let mut n = 0u64;
    while let Some(row) = rows.next().map_err(sql(p, "cannot export events"))? {
        let e = EventRecord::from_row(row).map_err(sql(p, "cannot read an event"))?;
        let sandbox: Option<String> = row.get(8).map_err(sql(p, "cannot read an event"))?;
        let line = export_line(&e, sandbox.as_deref());
        if let Err(err) = writeln!(out, "{line}") {
            if err.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(n);
            }
            return Err(AuditError::Output(err));
        }
        n += 1;
    }
    match out.flush() {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(AuditError::Output(err)),
        _ => Ok(n),
    }
}

// ---------------------------------------------------------------------------------------------
// verify

/// Which check found a problem.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// SQLite `PRAGMA integrity_check`.
    Integrity,
    /// The event hash chain.
    Chain,
    /// Runs, steps and events agree with each other.
    Consistency,
    /// Every stored column equals what the (hash-chained) events recorded for it.
    Rows,
    /// The chain contains the head an auditor recorded earlier (`--expect-head`).
    Anchor,
}

/// One problem found by [`verify`], naming the first bad row.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Problem {
    /// Which check.
    pub check: Check,
    /// The event concerned, if any.
    pub event_id: Option<i64>,
    /// The run concerned, if any.
    pub run_id: Option<String>,
    /// What is wrong.
    pub detail: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VerifyReport {
    /// Nothing wrong.
    pub ok: bool,
    /// Events walked.
    pub events_checked: u64,
    /// Runs checked.
    pub runs_checked: u64,
    /// Steps checked.
    pub steps_checked: u64,
    /// Id of the last pruned event (the chain's anchor), if any prune happened.
    pub pruned_head_id: Option<i64>,
    /// Runs created before events recorded whole rows (schema 1): only the columns their
    /// `run_created` recorded are compared (see docs/journal.md).
    pub legacy_runs: u64,
    /// The last verified event: record it outside the journal, pass it to `--expect-head`.
    pub head: Head,
    /// The `--expect-head` check, when asked for.
    pub expect_head: Option<ExpectHead>,
    /// Problems: at most the first of the chain, and the first few of the others.
    pub problems: Vec<Problem>,
}

/// The head of the verified chain.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Head {
    /// Event id (0 for an empty journal; the prune anchor's id when nothing is left after it).
    pub id: i64,
    /// Its hash (64 zeros for an empty journal).
    pub hash: String,
}

/// The outcome of `--expect-head`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ExpectHead {
    /// The hash given.
    pub hash: String,
    /// The event it is on the verified chain, if it is there.
    pub found_at: Option<i64>,
    /// Events appended after it.
    pub events_since: Option<i64>,
}

/// An `--expect-head` value that is not a SHA-256 in hex.
#[derive(Debug, thiserror::Error)]
#[error("invalid `--expect-head` value `{0}`: expected the 64 hex digits `journal verify` prints as the head")]
pub struct BadHead(pub String);

impl ExitCoded for BadHead {
    fn exit(&self) -> Exit {
        Exit::Usage
    }
}

/// Parse an `--expect-head` value (the head hash `journal verify` prints); returns it in
/// lowercase.
pub fn parse_head(s: &str) -> Result<String, BadHead> {
    let h = s.trim().to_ascii_lowercase();
    if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(h)
    } else {
        Err(BadHead(s.to_owned()))
    }
}

/// How many consistency problems are reported before stopping to collect them.
const MAX_PROBLEMS: usize = 20;

/// Check the journal: SQLite integrity, the hash chain from the prune anchor (or genesis) to
/// the last event, and consistency of runs, steps and events. Memory stays flat: every pass is
/// one streaming statement, and per-run state lives only while that run is being checked.
///
/// `expect_head` (a lowercase hash from [`parse_head`]) is an anchor kept outside the file: the
/// check fails unless that hash is on the verified chain, which a wholesale rewrite of the
/// journal cannot keep.
pub fn verify(j: &Journal, expect_head: Option<&str>) -> Result<VerifyReport, AuditError> {
    let mut report = VerifyReport {
        ok: true,
        events_checked: 0,
        runs_checked: 0,
        steps_checked: 0,
        pruned_head_id: None,
        legacy_runs: 0,
        head: Head { id: 0, hash: GENESIS.to_owned() },
        expect_head: None,
        problems: Vec::new(),
    };
    match j.integrity_check() {
        Ok(()) => {}
        Err(JournalError::Corrupt { detail, .. }) => {
            // A damaged file makes every other answer unreliable: stop here.
            report.problems.push(Problem {
                check: Check::Integrity,
                event_id: None,
                run_id: None,
                detail,
            });
            report.ok = false;
            return Ok(report);
        }
        Err(e) => return Err(e.into()),
    }
    // The chain walk is the one the engine's tests use (events::verify_chain): one definition
    // of "the chain is intact".
    let (anchor_id, _) = chain_anchor(j.conn()).map_err(sql(j.path(), "cannot read meta"))?;
    report.pruned_head_id = (anchor_id > 0).then_some(anchor_id);
    let (walk, broken) = events::walk_chain(j.conn(), expect_head);
    report.events_checked = walk.events;
    report.head = Head { id: walk.head_id, hash: walk.head_hash.clone() };
    if let Some(bad) = &broken {
        let run_id = j
            .conn()
            .query_row("SELECT run_id FROM events WHERE id = ?1", [bad.event_id], |r| {
                r.get::<_, Option<String>>(0)
            })
            .optional()
            .ok()
            .flatten()
            .flatten();
        report.problems.push(Problem {
            check: Check::Chain,
            event_id: Some(bad.event_id),
            run_id,
            detail: bad.reason.clone(),
        });
    }
    if let Some(h) = expect_head {
        let found_at = walk.found;
        report.expect_head = Some(ExpectHead {
            hash: h.to_owned(),
            found_at,
            events_since: found_at.map(|f| walk.head_id - f),
        });
        if found_at.is_none() {
            let detail = match &broken {
                Some(b) => format!(
                    "the expected head {h} is not on the chain before it breaks at event {}, so it \
                     cannot be confirmed",
                    b.event_id
                ),
                None => format!(
                    "the expected head {h} is not on the chain (whose head is event {} {}): the \
                     journal was rewritten or replaced{}",
                    walk.head_id,
                    walk.head_hash,
                    report
                        .pruned_head_id
                        .map(|k| format!(
                            ", or the anchored event was pruned (events up to {k} were), which \
                             leaves nothing to compare it with"
                        ))
                        .unwrap_or_default()
                ),
            };
            report.problems.push(Problem {
                check: Check::Anchor,
                event_id: None,
                run_id: None,
                detail,
            });
        }
    }
    consistency(j, &mut report).map_err(sql(j.path(), "cannot check consistency"))?;
    report.ok = report.problems.is_empty();
    Ok(report)
}

/// Whether a run may go from `from` to `to`: the engine's one transition function.
fn run_transition_ok(from: &str, to: &str) -> bool {
    match (RunState::parse(from), RunState::parse(to)) {
        (Some(f), Some(t)) => RunState::transition(f, t).is_ok(),
        _ => false,
    }
}

/// Whether a step may go from `from` to `to`: the engine's one transition function.
fn step_transition_ok(from: &str, to: &str) -> bool {
    match (StepState::parse(from), StepState::parse(to)) {
        (Some(f), Some(t)) => StepState::transition(f, t).is_ok(),
        _ => false,
    }
}

/// The only fields of a state-change event the consistency check needs (parsed without
/// building a full `Value`: this runs once per event).
#[derive(Debug, Default, serde::Deserialize)]
struct FromTo<'a> {
    #[serde(borrow)]
    from: Option<std::borrow::Cow<'a, str>>,
}

struct RunRow {
    id: String,
    state: String,
    /// The stored columns, [`RUN_IMAGE_COLUMNS`] order, as row-image JSON text.
    cols: Vec<String>,
}

struct StepRow {
    run_id: String,
    seq: i64,
    state: String,
    /// The stored columns, [`STEP_IMAGE_COLUMNS`] order, as row-image JSON text.
    cols: Vec<String>,
}

fn image_cols(r: &rusqlite::Row<'_>, from: usize, cols: &[&str]) -> rusqlite::Result<Vec<String>> {
    cols.iter().enumerate().map(|(i, c)| Ok(column_text(c, r.get_ref(from + i)?))).collect()
}

fn consistency(j: &Journal, report: &mut VerifyReport) -> rusqlite::Result<()> {
    let conn = j.conn();
    let problem =
        |report: &mut VerifyReport, check: Check, run: &str, ev: Option<i64>, d: String| {
            if report.problems.len() < MAX_PROBLEMS {
                report.problems.push(Problem {
                    check,
                    event_id: ev,
                    run_id: Some(run.to_owned()),
                    detail: d,
                });
            }
        };

    // Three streams in run-id order, merged: runs (primary key), steps (primary key
    // run_id, seq) and events (index events_by_run). One run's steps and events are in memory
    // at a time.
    let mut runs_stmt = conn.prepare(&format!(
        "SELECT id, state, {} FROM runs ORDER BY id",
        RUN_IMAGE_COLUMNS.join(", ")
    ))?;
    let mut runs = runs_stmt
        .query_map([], |r| {
            Ok(RunRow {
                id: r.get(0)?,
                state: r.get(1)?,
                cols: image_cols(r, 2, RUN_IMAGE_COLUMNS)?,
            })
        })?
        .peekable();
    let mut steps_stmt = conn.prepare(&format!(
        "SELECT run_id, seq, state, {} FROM steps ORDER BY run_id, seq",
        STEP_IMAGE_COLUMNS.join(", ")
    ))?;
    let mut steps = steps_stmt
        .query_map([], |r| {
            Ok(StepRow {
                run_id: r.get(0)?,
                seq: r.get(1)?,
                state: r.get(2)?,
                cols: image_cols(r, 3, STEP_IMAGE_COLUMNS)?,
            })
        })?
        .peekable();
    // The hashes were checked by the chain pass; not reading them again saves a copy per row.
    let mut ev_stmt = conn.prepare(
        "SELECT id, run_id, step_seq, at, kind, data, '', '' FROM events \
         WHERE run_id IS NOT NULL ORDER BY run_id, id",
    )?;
    let mut evs = ev_stmt.query_map([], EventRecord::from_row)?.peekable();

    loop {
        // The next run id present in any stream.
        let next = {
            let a = match runs.peek() {
                Some(Ok(r)) => Some(r.id.clone()),
                Some(Err(_)) => return runs.next().transpose().map(|_| ()),
                None => None,
            };
            let b = match steps.peek() {
                Some(Ok(s)) => Some(s.run_id.clone()),
                Some(Err(_)) => return steps.next().transpose().map(|_| ()),
                None => None,
            };
            let c = match evs.peek() {
                Some(Ok(e)) => e.run_id.clone(),
                Some(Err(_)) => return evs.next().transpose().map(|_| ()),
                None => None,
            };
            [a, b, c].into_iter().flatten().min()
        };
        let Some(id) = next else { break };
        let run = match runs.peek() {
            Some(Ok(r)) if r.id == id => runs.next().transpose()?,
            _ => None,
        };
        let mut run_steps: Vec<StepRow> = Vec::new();
        while let Some(Ok(s)) = steps.peek() {
            if s.run_id != id {
                break;
            }
            if let Some(s) = steps.next().transpose()? {
                run_steps.push(s);
            }
        }
        let mut run_events: Vec<EventRecord> = Vec::new();
        while let Some(Ok(e)) = evs.peek() {
            if e.run_id.as_deref() != Some(id.as_str()) {
                break;
            }
            if let Some(e) = evs.next().transpose()? {
                run_events.push(e);
            }
        }
        report.steps_checked += run_steps.len() as u64;
        let Some(run) = run else {
            let ev = run_events.first().map(|e| e.id);
            let d = if run_events.is_empty() {
                "steps exist for a run that does not exist".to_owned()
            } else {
                "events refer to a run that does not exist".to_owned()
            };
            problem(report, Check::Consistency, &id, ev, d);
            continue;
        };
        report.runs_checked += 1;
        let replayed = check_run(&run, &run_steps, &run_events);
        let created =
            replayed.is_empty() || run_events.first().is_some_and(|e| e.kind == "run_created");
        for (at, d) in replayed {
            problem(report, Check::Consistency, &run.id, at, d);
        }
        if created && !run_events.is_empty() {
            let (bad, legacy) = check_rows(&run, &run_steps, &run_events);
            report.legacy_runs += u64::from(legacy);
            for (at, d) in bad {
                problem(report, Check::Rows, &run.id, at, d);
            }
        }
        if report.problems.len() >= MAX_PROBLEMS {
            break;
        }
    }

    // A run marked running must have a holder: otherwise nobody is running it and nothing
    // will ever report it as interrupted.
    let mut stmt = conn.prepare(
        "SELECT id FROM runs WHERE state = 'running' \
         AND NOT EXISTS (SELECT 1 FROM holders h WHERE h.run_id = runs.id) ORDER BY id",
    )?;
    let orphans: Vec<String> = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    for id in orphans {
        problem(
            report,
            Check::Consistency,
            &id,
            None,
            "run is `running` but no holder row names it".to_owned(),
        );
    }
    Ok(())
}

/// Replay one run's events against its row and steps. Returns `(event id, problem)` pairs.
fn check_run(
    run: &RunRow,
    steps: &[StepRow],
    events: &[EventRecord],
) -> Vec<(Option<i64>, String)> {
    let mut out = Vec::new();
    let Some(first) = events.first() else {
        out.push((None, "run has no events (expected `run_created` first)".to_owned()));
        return out;
    };
    if first.kind != "run_created" {
        out.push((Some(first.id), format!("first event is `{}`, not `run_created`", first.kind)));
        return out;
    }
    let mut run_state = "running".to_owned();
    let mut state: Vec<String> = steps.iter().map(|_| "pending".to_owned()).collect();
    let index = |seq: i64| steps.iter().position(|s| s.seq == seq);
    for e in &events[1..] {
        // State changes are `run_<to>` / `step_<to>` events carrying `from`; any other kind
        // (takeover, notes, ...) changes no state and is not checked here.
        let (is_step, to) = if let Some(t) = e.kind.strip_prefix("step_") {
            (true, t)
        } else if let Some(t) = e.kind.strip_prefix("run_") {
            (false, t)
        } else {
            continue;
        };
        let known = if is_step { STEP_STATES.contains(&to) } else { RUN_STATES.contains(&to) };
        if !known {
            continue;
        }
        let d: FromTo<'_> = serde_json::from_str(&e.data).unwrap_or_default();
        let from: &str = d.from.as_deref().unwrap_or("");
        if !is_step {
            if from != run_state || !run_transition_ok(&run_state, to) {
                out.push((
                    Some(e.id),
                    format!("`{}` from `{from}`, but the run was `{run_state}`", e.kind),
                ));
                return out;
            }
            run_state = to.to_owned();
            continue;
        }
        let Some(i) = e.step_seq.and_then(index) else {
            out.push((Some(e.id), format!("`{}` names a step that does not exist", e.kind)));
            return out;
        };
        if from != state[i] || !step_transition_ok(&state[i], to) {
            out.push((
                Some(e.id),
                format!(
                    "step {} `{}` from `{from}`, but the step was `{}`",
                    steps[i].seq, e.kind, state[i]
                ),
            ));
            return out;
        }
        // Forward steps run in plan order: starting or finishing step k needs every earlier
        // step done.
        if matches!(to, "started" | "done") {
            if let Some(k) = state[..i].iter().position(|s| s != "done") {
                out.push((
                    Some(e.id),
                    format!(
                        "step {} `{}` while earlier step {} is `{}`",
                        steps[i].seq, e.kind, steps[k].seq, state[k]
                    ),
                ));
                return out;
            }
        }
        state[i] = to.to_owned();
    }
    let last = events.last().map(|e| e.id);
    if run_state != run.state {
        out.push((last, format!("run is `{}` but its events end in `{run_state}`", run.state)));
    }
    for (s, derived) in steps.iter().zip(&state) {
        if s.state != *derived {
            out.push((
                last,
                format!("step {} is `{}` but its events end in `{derived}`", s.seq, s.state),
            ));
        }
    }
    out
}

/// A row image as recorded: (column name, the JSON text of its value), borrowed from the
/// event's data — no value is built unless it has to be shown or compared loosely, and no map
/// is built at all (this runs for every event).
#[derive(Debug, Default)]
struct Image<'a>(Vec<(&'a str, &'a RawValue)>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Image<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Image<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a row image (an object)")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Image<'a>, M::Error> {
                let mut v = Vec::with_capacity(m.size_hint().unwrap_or(12));
                while let Some(e) = m.next_entry::<&'de str, &'de RawValue>()? {
                    v.push(e);
                }
                Ok(Image(v))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// What a `run_created` event recorded. From schema 2: the whole run (`row`) and its steps
/// (`step_rows`). Before: only the fields below `step_rows` (absent ones were null).
#[derive(Debug, Default, serde::Deserialize)]
struct Created<'a> {
    #[serde(borrow)]
    row: Option<Image<'a>>,
    #[serde(borrow)]
    step_rows: Option<Vec<Image<'a>>>,
    #[serde(borrow)]
    lock: Option<&'a RawValue>,
    #[serde(borrow)]
    plan: Option<&'a RawValue>,
    #[serde(borrow)]
    plan_fingerprint: Option<&'a RawValue>,
    #[serde(borrow)]
    sandbox: Option<&'a RawValue>,
    #[serde(borrow)]
    gateway: Option<&'a RawValue>,
    #[serde(borrow)]
    mode: Option<&'a RawValue>,
    #[serde(borrow)]
    pid: Option<&'a RawValue>,
    #[serde(borrow)]
    host: Option<&'a RawValue>,
    #[serde(borrow)]
    steps: Option<Vec<&'a RawValue>>,
}

/// The image a later event recorded of the row it changed.
#[derive(Debug, Default, serde::Deserialize)]
struct Changed<'a> {
    #[serde(borrow)]
    row: Option<Image<'a>>,
}

/// Per column: the JSON text the events say it holds, and the index of the event that said so
/// last.
type Wanted<'a> = Vec<Option<(Cow<'a, str>, usize)>>;

fn want<'a>(w: &mut Wanted<'a>, cols: &[&str], image: Image<'a>, event: usize) {
    for (k, v) in image.0 {
        if let Some(i) = cols.iter().position(|c| *c == k) {
            w[i] = Some((Cow::Borrowed(v.get()), event));
        }
    }
}

/// Whether a stored column (as image text) holds what the events recorded. Equal text is the
/// common case (both were written by the same serialiser); otherwise the two are compared as
/// JSON values, so a mere re-serialisation is not taken for an edit.
fn same(stored: &str, recorded: &str) -> bool {
    stored == recorded
        || matches!(
            (serde_json::from_str::<Value>(stored), serde_json::from_str::<Value>(recorded)),
            (Ok(a), Ok(b)) if a == b
        )
}

/// A value for a message: compact JSON, cut at 80 characters.
fn shown(text: &str) -> String {
    let t = serde_json::from_str::<Value>(text).map(|v| v.to_string()).unwrap_or(text.to_owned());
    if t.chars().count() > 80 {
        t.chars().take(77).collect::<String>() + "..."
    } else {
        t
    }
}

/// Replay the row images of one run's events and compare them with the stored run and step
/// rows, column by column. Returns the differences (naming the row, the column and the event
/// that recorded it) and whether the run predates row images (schema 1), in which case only the
/// columns its `run_created` recorded are compared.
fn check_rows(
    run: &RunRow,
    steps: &[StepRow],
    events: &[EventRecord],
) -> (Vec<(Option<i64>, String)>, bool) {
    let mut out = Vec::new();
    let created: Created<'_> = serde_json::from_str(&events[0].data).unwrap_or_default();
    let mut run_want: Wanted<'_> = vec![None; RUN_IMAGE_COLUMNS.len()];
    let mut step_want: Vec<Wanted<'_>> = vec![vec![None; STEP_IMAGE_COLUMNS.len()]; steps.len()];
    let position = |seq: i64| steps.iter().position(|s| s.seq == seq);
    let legacy = created.row.is_none();
    if let Some(row) = created.row {
        want(&mut run_want, RUN_IMAGE_COLUMNS, row, 0);
        let recorded = created.step_rows.unwrap_or_default();
        if recorded.len() != steps.len() {
            out.push((
                Some(events[0].id),
                format!(
                    "`run_created` recorded {} step(s), but the journal has {} step row(s)",
                    recorded.len(),
                    steps.len()
                ),
            ));
        }
        for (seq, image) in recorded.into_iter().enumerate() {
            if let Some(p) = position(seq as i64) {
                want(&mut step_want[p], STEP_IMAGE_COLUMNS, image, 0);
            }
        }
    } else {
        // Schema 1: the facts the old event recorded, under their old names.
        fn text(v: Option<&RawValue>) -> (Cow<'_, str>, usize) {
            (Cow::Borrowed(v.map(RawValue::get).unwrap_or("null")), 0)
        }
        for (col, v) in [
            ("lock_key", created.lock),
            ("plan", created.plan),
            ("plan_fingerprint", created.plan_fingerprint),
            ("sandbox", created.sandbox),
            ("gateway", created.gateway),
            ("mode", created.mode),
            ("pid", created.pid),
            ("host", created.host),
        ] {
            if let Some(i) = RUN_IMAGE_COLUMNS.iter().position(|c| *c == col) {
                run_want[i] = Some(text(v));
            }
        }
        if let Some(i) = RUN_IMAGE_COLUMNS.iter().position(|c| *c == "created_at") {
            run_want[i] = Some((Cow::Owned(events[0].at.to_string()), 0));
        }
        let name = STEP_IMAGE_COLUMNS.iter().position(|c| *c == "name");
        for (seq, n) in created.steps.unwrap_or_default().into_iter().enumerate() {
            if let (Some(p), Some(i)) = (position(seq as i64), name) {
                step_want[p][i] = Some(text(Some(n)));
            }
        }
    }
    for (i, e) in events.iter().enumerate().skip(1) {
        // Most events of a schema-1 run carry no image; skip them without parsing.
        if !e.data.contains("\"row\"") {
            continue;
        }
        let Ok(Changed { row: Some(image) }) = serde_json::from_str(&e.data) else { continue };
        match e.step_seq {
            None => want(&mut run_want, RUN_IMAGE_COLUMNS, image, i),
            Some(q) => {
                if let Some(p) = position(q) {
                    want(&mut step_want[p], STEP_IMAGE_COLUMNS, image, i);
                }
            }
        }
    }
    // `state` is left to the consistency check, which says which transition went wrong.
    for (c, col) in RUN_IMAGE_COLUMNS.iter().enumerate() {
        match &run_want[c] {
            Some((v, i)) if *col != "state" && !same(&run.cols[c], v) => out.push((
                Some(events[*i].id),
                format!(
                    "runs.{col} is {} but event {} (`{}`) recorded {} (the row was edited)",
                    shown(&run.cols[c]),
                    events[*i].id,
                    events[*i].kind,
                    shown(v)
                ),
            )),
            _ => {}
        }
    }
    for (s, w) in steps.iter().zip(&step_want) {
        for (c, col) in STEP_IMAGE_COLUMNS.iter().enumerate() {
            match &w[c] {
                Some((v, i)) if *col != "state" && !same(&s.cols[c], v) => out.push((
                    Some(events[*i].id),
                    format!(
                        "steps.{col} of step {} is {} but event {} (`{}`) recorded {} (the row \
                         was edited)",
                        s.seq,
                        shown(&s.cols[c]),
                        events[*i].id,
                        events[*i].kind,
                        shown(v)
                    ),
                )),
                _ => {}
            }
        }
    }
    (out, legacy)
}

// ---------------------------------------------------------------------------------------------
// prune

/// What `journal prune` is asked to do.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// NemoClaw home (backups are only removed under `<home>/rebuild-backups/`).
    pub home: PathBuf,
    /// Only runs finished before `now_ms - older_than_ms`.
    pub older_than_ms: i64,
    /// The clock.
    pub now_ms: i64,
    /// Report, change nothing.
    pub dry_run: bool,
    /// Leave backup directories in place.
    pub keep_backups: bool,
}

/// What `journal prune` did (or would do).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PruneReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Cut-off time (ms): runs finished before it are eligible.
    pub cutoff: i64,
    /// Runs removed (or that would be).
    pub runs_removed: Vec<String>,
    /// Events removed: ids `<= pruned_through`.
    pub events_removed: u64,
    /// Last removed event id (the new chain anchor), if any.
    pub pruned_through: Option<i64>,
    /// Backup directories removed (or that would be).
    pub backups_removed: Vec<String>,
    /// Backup paths kept because another run still references them, or outside the backups
    /// directory, or `--keep-backups`.
    pub backups_kept: Vec<String>,
    /// Eligible runs left for a later prune because an unfinished or recent run's events are
    /// interleaved with theirs (the chain can only lose a prefix).
    pub eligible_remaining: u64,
    /// The id of the `prune` checkpoint event.
    pub checkpoint_event: Option<i64>,
}

fn eligible_sql() -> String {
    format!(
        "state IN ({}) AND coalesce(finished_at, updated_at) < ?1 \
         AND NOT EXISTS (SELECT 1 FROM holders h WHERE h.run_id = runs.id)",
        FINISHED_STATES.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ")
    )
}

/// Find K: the largest event id such that every event `<= K` belongs to an eligible run (or to
/// no run), and every run with an event `<= K` has all its events `<= K` (a run is removed
/// whole or not at all). Streams the events in id order; stops at the first ineligible one.
fn find_prefix(tx: &Transaction<'_>, cutoff: i64) -> rusqlite::Result<Option<i64>> {
    let mut eligible =
        tx.prepare_cached(&format!("SELECT 1 FROM runs WHERE id = ?2 AND {}", eligible_sql()))?;
    let mut last_of_run = tx.prepare_cached("SELECT max(id) FROM events WHERE run_id = ?1")?;
    let mut stmt = tx.prepare("SELECT id, run_id FROM events ORDER BY id")?;
    let mut rows = stmt.query([])?;
    let mut k = None;
    // The largest event id of any run seen so far: the prefix may only end at or after it.
    let mut must_reach = i64::MIN;
    let mut current: Option<String> = None;
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        let run: Option<String> = r.get(1)?;
        if let Some(run) = run {
            if current.as_deref() != Some(run.as_str()) {
                if eligible
                    .query_row(rusqlite::params![cutoff, run], |_| Ok(()))
                    .optional()?
                    .is_none()
                {
                    break;
                }
                let last: i64 = last_of_run.query_row([&run], |r| r.get(0))?;
                must_reach = must_reach.max(last);
                current = Some(run);
            }
        }
        if id >= must_reach {
            k = Some(id);
        }
    }
    Ok(k)
}

fn is_under(base: &Path, p: &Path) -> bool {
    p.is_absolute()
        && p.starts_with(base)
        && p != base
        && !p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir))
}

/// Whether `p`'s parent, with symlinks resolved, is still under `base` resolved: a symlinked
/// directory on the way must not lead a removal outside the backups directory.
fn resolves_under(base: &Path, p: &Path) -> bool {
    match (p.parent().map(std::fs::canonicalize), std::fs::canonicalize(base)) {
        (Some(Ok(parent)), Ok(base)) => parent.starts_with(base),
        // Already gone: nothing to remove, nothing to escape through.
        (Some(Err(e)), Ok(_)) => e.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

/// Remove finished runs (succeeded, rolled back) that finished before `now - older_than`,
/// with their events and — unless `keep_backups` — their backup directories.
///
/// Only a prefix of the event chain can go: events `<= K` are removed where K is found by
/// [`find_prefix`]; meta `pruned_head_hash`/`pruned_head_id` anchor the rest of the chain, and a
/// `prune` checkpoint event records what was removed. All in one IMMEDIATE transaction; backup
/// directories are removed only after it commits (an orphaned directory is harmless, a journal
/// naming a missing backup of a run that still needs it is not — and such backups are never
/// candidates anyway).
pub fn prune(j: &mut Journal, o: &PruneOptions) -> Result<PruneReport, AuditError> {
    let cutoff = o.now_ms - o.older_than_ms;
    let backups_base = o.home.join(BACKUPS_DIR);
    let dry_run = o.dry_run;
    let keep_backups = o.keep_backups;
    let older_than_ms = o.older_than_ms;
    let now = o.now_ms;
    let report = j.write("cannot prune the journal", |tx| {
        let raw = JournalError::from_sqlite;
        let k = find_prefix(tx, cutoff).map_err(raw)?;
        let mut report = PruneReport {
            dry_run,
            cutoff,
            runs_removed: Vec::new(),
            events_removed: 0,
            pruned_through: k,
            backups_removed: Vec::new(),
            backups_kept: Vec::new(),
            eligible_remaining: 0,
            checkpoint_event: None,
        };
        let k_val = k.unwrap_or(i64::MIN);
        report.events_removed = tx
            .query_row("SELECT count(*) FROM events WHERE id <= ?1", [k_val], |r| r.get(0))
            .map_err(raw)?;
        let mut stmt = tx
            .prepare(
                "SELECT DISTINCT run_id FROM events WHERE id <= ?1 AND run_id IS NOT NULL \
                 ORDER BY run_id",
            )
            .map_err(raw)?;
        report.runs_removed =
            stmt.query_map([k_val], |r| r.get(0)).and_then(|it| it.collect()).map_err(raw)?;
        drop(stmt);
        report.eligible_remaining = tx
            .query_row(
                &format!(
                    "SELECT count(*) FROM runs WHERE {} AND NOT EXISTS \
                     (SELECT 1 FROM events e WHERE e.run_id = runs.id AND e.id <= ?2)",
                    eligible_sql()
                ),
                rusqlite::params![cutoff, k_val],
                |r| r.get(0),
            )
            .map_err(raw)?;

        // Backups: those named by removed runs, minus any named by a run that stays.
        let removed: BTreeSet<&str> = report.runs_removed.iter().map(String::as_str).collect();
        let mut stmt = tx
            .prepare("SELECT run_id, name, output FROM steps WHERE output IS NOT NULL")
            .map_err(raw)?;
        let mut rows = stmt.query([]).map_err(raw)?;
        let mut candidates = BTreeSet::new();
        let mut protected = BTreeSet::new();
        while let Some(r) = rows.next().map_err(raw)? {
            let run: String = r.get(0).map_err(raw)?;
            let name: String = r.get(1).map_err(raw)?;
            let out: String = r.get(2).map_err(raw)?;
            if !out.contains("backup_path") {
                continue;
            }
            let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
            for a in artifacts_in(&name, &v) {
                if removed.contains(run.as_str()) {
                    candidates.insert(a.path);
                } else {
                    protected.insert(a.path);
                }
            }
        }
        drop(rows);
        drop(stmt);
        for p in candidates {
            let pb = PathBuf::from(&p);
            if keep_backups
                || protected.contains(&p)
                || !is_under(&backups_base, &pb)
                || !resolves_under(&backups_base, &pb)
            {
                report.backups_kept.push(p);
            } else {
                report.backups_removed.push(p);
            }
        }
        if dry_run || k.is_none() {
            return Ok(report);
        }

        // Write order inside the transaction: open the delete guard, delete runs (steps
        // cascade) and the event prefix, move the chain anchor to event K, close the guard,
        // then append the checkpoint — which chains onto the last kept event, or onto the
        // anchor when nothing is left.
        let head: String = tx
            .query_row("SELECT hash FROM events WHERE id = ?1", [k_val], |r| r.get(0))
            .map_err(raw)?;
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
            [META_PRUNE_IN_PROGRESS, &now.to_string()],
        )
        .map_err(raw)?;
        tx.execute(
            "DELETE FROM runs WHERE id IN \
             (SELECT DISTINCT run_id FROM events WHERE id <= ?1 AND run_id IS NOT NULL)",
            [k_val],
        )
        .map_err(raw)?;
        tx.execute("DELETE FROM events WHERE id <= ?1", [k_val]).map_err(raw)?;
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2), (?3, ?4)",
            [META_PRUNED_HEAD, &head, META_PRUNED_ID, &k_val.to_string()],
        )
        .map_err(raw)?;
        tx.execute("DELETE FROM meta WHERE key = ?1", [META_PRUNE_IN_PROGRESS]).map_err(raw)?;
        let ev = events::append(
            tx,
            None,
            None,
            now,
            "prune",
            &json!({
                "older_than_ms": older_than_ms,
                "cutoff": cutoff,
                "pruned_through": k_val,
                "pruned_head_hash": head,
                "events_removed": report.events_removed,
                "runs_removed": report.runs_removed.len(),
                "runs": report.runs_removed,
                "backups_removed": report.backups_removed,
                "keep_backups": keep_backups,
            }),
        )?;
        report.checkpoint_event = Some(ev);
        Ok(report)
    })?;
    if !report.dry_run {
        for b in &report.backups_removed {
            let pb = PathBuf::from(b);
            match std::fs::symlink_metadata(&pb) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&pb)
                    .map_err(|source| AuditError::Backup { path: pb.clone(), source })?,
                Ok(_) => std::fs::remove_file(&pb)
                    .map_err(|source| AuditError::Backup { path: pb.clone(), source })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(AuditError::Backup { path: pb, source }),
            }
        }
        if !report.backups_removed.is_empty() {
            let _ = crate::util::fsync_dir(&backups_base);
        }
        // A pruned run's snapshot file (`<home>/rebuild-runs/<run>.json`, written by plans that
        // keep a private copy of what they must restore) goes with it. Run ids are UUIDs from
        // the journal's own rows, so the path cannot leave that directory.
        let runs_dir = o.home.join(RUN_FILES_DIR);
        for id in &report.runs_removed {
            if uuid::Uuid::parse_str(id).is_ok() {
                let _ = std::fs::remove_file(runs_dir.join(format!("{id}.json")));
            }
        }
    }
    Ok(report)
}

/// Directory of per-run snapshot files under the home (kept in step with the rebuild's).
pub const RUN_FILES_DIR: &str = "rebuild-runs";

/// The chain anchor left by the last prune: `(pruned_head_id, pruned_head_hash)`, or genesis.
pub fn chain_anchor(conn: &Connection) -> rusqlite::Result<(i64, String)> {
    let get = |k: &str| {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get::<_, String>(0))
            .optional()
    };
    let id = get(META_PRUNED_ID)?.and_then(|v| v.parse().ok()).unwrap_or(0);
    let hash = get(META_PRUNED_HEAD)?.unwrap_or_else(|| GENESIS.to_owned());
    Ok((id, hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case::days("7d", 7 * 86_400_000)]
    #[case::hours("12h", 12 * 3_600_000)]
    #[case::minutes("30m", 30 * 60_000)]
    #[case::seconds("45s", 45_000)]
    #[case::weeks("2w", 14 * 86_400_000)]
    #[case::millis("500ms", 500)]
    fn durations(#[case] s: &str, #[case] ms: i64) {
        assert_eq!(parse_duration(s).unwrap(), ms);
    }

    #[rstest]
    #[case::empty("")]
    #[case::no_unit("7")]
    #[case::bad_unit("7y")]
    #[case::negative("-7d")]
    #[case::overflow("99999999999999999d")]
    fn bad_durations(#[case] s: &str) {
        assert!(parse_duration(s).is_err(), "{s}");
    }

    #[test]
    fn times() {
        let now = 1_780_308_000_000;
        assert_eq!(parse_time("2026-06-01T10:00:00Z", now).unwrap(), now);
        assert_eq!(parse_time("2026-06-01T12:00:00+02:00", now).unwrap(), now);
        assert_eq!(parse_time("2026-06-01", now).unwrap(), now - 10 * 3_600_000);
        assert_eq!(parse_time("1h", now).unwrap(), now - 3_600_000);
        assert!(matches!(parse_time("yesterday", now), Err(AuditError::BadTime { .. })));
    }

    #[rstest]
    #[case(0, "just now")]
    #[case(5_000, "5s ago")]
    #[case(3 * 3_600_000 + 5, "3h ago")]
    #[case(-120_000, "in 2m")]
    #[case(2 * 86_400_000, "2d ago")]
    fn relative(#[case] age: i64, #[case] s: &str) {
        assert_eq!(relative_time(1_000_000_000 - age, 1_000_000_000), s);
    }

    #[rstest]
    #[case(850, "850ms")]
    #[case(4_200, "4.2s")]
    #[case(192_000, "3m12s")]
    #[case(7_500_000, "2h05m")]
    fn durations_human(#[case] ms: i64, #[case] s: &str) {
        assert_eq!(human_duration(ms), s);
    }

    #[test]
    fn artifacts_found_at_any_depth() {
        let v = json!({"backup_path": "/h/rebuild-backups/a/t", "manifest_sha256": "ab",
                       "nested": [{"backup_path": "/x"}]});
        let a = artifacts_in("backup", &v);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].manifest_sha256.as_deref(), Some("ab"));
        assert_eq!(a[1].path, "/x");
    }

    #[test]
    fn export_line_is_valid_json_with_the_documented_fields() {
        let e = EventRecord {
            id: 7,
            run_id: Some("r\"1".into()),
            step_seq: Some(2),
            at: 1_780_308_000_000,
            kind: "step_done".into(),
            data: r#"{"name":"x","s":"a\nb"}"#.into(),
            prev_hash: "p".into(),
            hash: "h".into(),
        };
        let v: Value = serde_json::from_str(&export_line(&e, None)).unwrap();
        assert_eq!(
            v,
            json!({"schema_version": 1, "type": "event", "data": {
                "id": 7, "at": 1_780_308_000_000_i64, "at_iso": "2026-06-01T10:00:00.000Z",
                "run_id": "r\"1", "sandbox": null, "step_seq": 2, "kind": "step_done",
                "data": {"name": "x", "s": "a\nb"}, "prev_hash": "p", "hash": "h"}})
        );
        assert_eq!(v["data"]["data"].to_string(), e.data);
    }

    #[test]
    fn under_backups_only() {
        let base = Path::new("/h/rebuild-backups");
        assert!(is_under(base, Path::new("/h/rebuild-backups/a/t")));
        assert!(!is_under(base, Path::new("/h/rebuild-backups")));
        assert!(!is_under(base, Path::new("/h/rebuild-backups/../x")));
        assert!(!is_under(base, Path::new("/etc")));
        assert!(!is_under(base, Path::new("rebuild-backups/a")));
    }
}
