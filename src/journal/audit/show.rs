//! `journal show`: one run with its steps, the artifacts their outputs name, and its events;
//! and the resolution of a run id prefix to the run.

use rusqlite::OptionalExtension;
use serde::Serialize;
use serde_json::Value;

use super::list::{summary_from_row, RunSummary, SUMMARY_COLS};
use super::{sql, AuditError};
use crate::journal::chain::{event_hash, EventFields};
use crate::journal::Journal;

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

/// A file or directory a step produced, as the plan that knows its outputs names it.
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
    pub(super) fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
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

/// Load one run (by full id) with its steps and events; `artifacts` names what each step's
/// output refers to outside the journal (the plan knows its outputs, the journal does not).
pub fn show_run(
    j: &Journal,
    id: &str,
    artifacts: &dyn Fn(&str, &Value) -> Vec<Artifact>,
) -> Result<RunDetail, AuditError> {
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
            let artifacts = output.as_ref().map(|o| artifacts(&name, o)).unwrap_or_default();
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
