//! Runs, steps and runner-lock holders: the read-write API over the `runs`, `steps` and
//! `holders` tables. Every state change goes through [`RunState::transition`] or
//! [`StepState::transition`] (the one place the allowed transitions live, mirrored by the SQL
//! `CHECK` constraints) and appends its audit event with [`events::append`] in the SAME
//! transaction the caller holds, so a state change and its event are never separated by a crash.

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};
use serde_json::{json, Value};

use super::events::{self, exec};
use super::JournalError;

// The states live in `journal::state`; runs and steps are where callers have always found them.
pub use super::state::{RunState, StepState, TransitionError};

/// One step of a run to be created.
#[derive(Debug, Clone)]
pub struct NewStep {
    /// Step name.
    pub name: String,
    /// Step version.
    pub version: u32,
    /// Whether the step is destructive.
    pub destructive: bool,
}

/// A run to be created (state `running`, every step `pending`).
#[derive(Debug, Clone)]
pub struct NewRun {
    /// UUID v7 text.
    pub id: String,
    /// Runner lock key.
    pub lock_key: String,
    /// Plan name.
    pub plan: String,
    /// Plan fingerprint.
    pub plan_fingerprint: String,
    /// Sandbox, when the plan is about one.
    pub sandbox: Option<String>,
    /// Gateway binding, when the plan is about one.
    pub gateway: Option<String>,
    /// Plan-specific mode.
    pub mode: Option<String>,
    /// Parameters fixed at creation (redacted before writing).
    pub params: Value,
    /// Command line of the process that created the run.
    pub argv: Vec<String>,
    /// The steps, in order.
    pub steps: Vec<NewStep>,
}

/// A run as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// UUID v7 text.
    pub id: String,
    /// Runner lock key.
    pub lock_key: String,
    /// Plan name.
    pub plan: String,
    /// Plan fingerprint.
    pub plan_fingerprint: String,
    /// Sandbox.
    pub sandbox: Option<String>,
    /// Gateway binding.
    pub gateway: Option<String>,
    /// Plan mode.
    pub mode: Option<String>,
    /// Current state.
    pub state: RunState,
    /// Parameters.
    pub params: Value,
    /// nemoclaw version that created the run.
    pub binary_version: String,
    /// Host that created the run.
    pub host: String,
    /// User that created the run.
    pub user: String,
    /// Pid of the process that created the run.
    pub pid: i64,
    /// Command line.
    pub argv: Vec<String>,
    /// Creation time (ms).
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
    /// When the run reached succeeded/rolled_back (ms).
    pub finished_at: Option<i64>,
    /// Last error text.
    pub error: Option<String>,
}

/// A step as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    /// Run id.
    pub run_id: String,
    /// 0-based position.
    pub seq: usize,
    /// Step name.
    pub name: String,
    /// Step version.
    pub version: u32,
    /// Destructive step.
    pub destructive: bool,
    /// Current state.
    pub state: StepState,
    /// How many times apply was started.
    pub attempt: u32,
    /// Intent input.
    pub input: Option<Value>,
    /// Output once done (kept while compensating so the compensation can use it).
    pub output: Option<Value>,
    /// Error text of the last failure.
    pub error: Option<String>,
    /// Last intent time (ms).
    pub started_at: Option<i64>,
    /// Outcome time (ms).
    pub finished_at: Option<i64>,
    /// Compensation time (ms).
    pub compensated_at: Option<i64>,
}

/// The recorded holder of a runner lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderRecord {
    /// Lock key.
    pub lock_key: String,
    /// Run the holder is working on, once known.
    pub run_id: Option<String>,
    /// Holder pid.
    pub pid: i64,
    /// Holder host.
    pub host: String,
    /// When the holder process started (ms).
    pub started_at: i64,
    /// When it took the lock (ms).
    pub acquired_at: i64,
}

/// Which unfinished runs to list.
#[derive(Debug, Clone, Default)]
pub struct UnfinishedFilter<'a> {
    /// Only runs with this lock key.
    pub lock_key: Option<&'a str>,
    /// Only runs about this sandbox.
    pub sandbox: Option<&'a str>,
}

fn raw(e: rusqlite::Error) -> JournalError {
    JournalError::from_sqlite(e)
}

fn bad_row(what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("unexpected value in the journal: {what}").into(),
    )
}

fn json_col(s: Option<String>) -> rusqlite::Result<Option<Value>> {
    s.map(|t| serde_json::from_str(&t).map_err(|_| bad_row("invalid JSON"))).transpose()
}

// ---------------------------------------------------------------------------------------------
// Row images: what the events record about the rows, so that the hash chain covers them

/// Every column of `runs` except `id` (the event's `run_id`), in schema order. `run_created`
/// records all of them under `row`.
pub const RUN_IMAGE_COLUMNS: &[&str] = &[
    "lock_key",
    "plan",
    "plan_fingerprint",
    "sandbox",
    "gateway",
    "mode",
    "state",
    "params",
    "binary_version",
    "host",
    "user",
    "pid",
    "argv",
    "created_at",
    "updated_at",
    "finished_at",
    "error",
];

/// The `runs` columns that change after creation: every later run-level event that changes
/// the row records them under `row`.
pub const RUN_MUTABLE_COLUMNS: &[&str] = &["state", "updated_at", "finished_at", "error"];

/// Every column of `steps` except `run_id` and `seq` (the event's `run_id` and `step_seq`).
/// `run_created` records all of them for each step under `step_rows`.
pub const STEP_IMAGE_COLUMNS: &[&str] = &[
    "name",
    "version",
    "destructive",
    "state",
    "attempt",
    "input",
    "output",
    "error",
    "started_at",
    "finished_at",
    "compensated_at",
];

/// The `steps` columns that change after creation: every `step_*` event records them under
/// `row`.
pub const STEP_MUTABLE_COLUMNS: &[&str] = &[
    "state",
    "attempt",
    "input",
    "output",
    "error",
    "started_at",
    "finished_at",
    "compensated_at",
];

/// Columns holding JSON text. Their image is the JSON value itself (not a string of it), so
/// an auditor reads it as it is and a re-serialisation cannot pass for an edit.
pub const JSON_COLUMNS: &[&str] = &["params", "argv", "input", "output"];

/// A stored column value as it appears in a row image: NULL → `null`, integers → numbers,
/// text → string, and JSON columns → their parsed JSON (text that is not JSON stays a string,
/// so it can never equal the image of valid JSON).
pub fn column_json(column: &str, v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef as V;
    match v {
        V::Null => Value::Null,
        V::Integer(i) => Value::from(i),
        V::Real(f) => Value::from(f),
        V::Text(t) => {
            let t = String::from_utf8_lossy(t);
            if JSON_COLUMNS.contains(&column) {
                serde_json::from_str(&t).unwrap_or(Value::String(t.into_owned()))
            } else {
                Value::String(t.into_owned())
            }
        }
        V::Blob(b) => Value::String(hex::encode(b)),
    }
}

/// [`column_json`] as JSON text, without building a value: what `journal verify` compares with
/// the recorded text. JSON columns are their stored text (written compact by the same
/// serialiser that writes the events).
pub fn column_text(column: &str, v: rusqlite::types::ValueRef<'_>) -> String {
    use rusqlite::types::ValueRef as V;
    match v {
        V::Text(t) if JSON_COLUMNS.contains(&column) => String::from_utf8_lossy(t).into_owned(),
        V::Null => "null".to_owned(),
        V::Integer(i) => i.to_string(),
        other => column_json(column, other).to_string(),
    }
}

/// The image of `columns` of one row, read back from the row itself inside the writer's
/// transaction: the event then records exactly what was written, whatever SQL wrote it.
fn image(
    tx: &Transaction<'_>,
    sql: &str,
    columns: &[&str],
    params: impl rusqlite::Params,
) -> Result<Value, JournalError> {
    let mut st = tx.prepare_cached(sql).map_err(raw)?;
    st.query_row(params, |r| {
        let mut m = serde_json::Map::new();
        for (i, c) in columns.iter().enumerate() {
            m.insert((*c).to_owned(), column_json(c, r.get_ref(i)?));
        }
        Ok(Value::Object(m))
    })
    .map_err(raw)
}

fn run_image(tx: &Transaction<'_>, run_id: &str, columns: &[&str]) -> Result<Value, JournalError> {
    image(tx, &format!("SELECT {} FROM runs WHERE id = ?1", columns.join(", ")), columns, [run_id])
}

fn step_image(
    tx: &Transaction<'_>,
    run_id: &str,
    seq: usize,
    columns: &[&str],
) -> Result<Value, JournalError> {
    image(
        tx,
        &format!("SELECT {} FROM steps WHERE run_id = ?1 AND seq = ?2", columns.join(", ")),
        columns,
        params![run_id, seq as i64],
    )
}

const RUN_COLS: &str = "id, lock_key, plan, plan_fingerprint, sandbox, gateway, mode, state, \
     params, binary_version, host, user, pid, argv, created_at, updated_at, finished_at, error";

fn run_from_row(r: &Row<'_>) -> rusqlite::Result<RunRecord> {
    let state: String = r.get(7)?;
    let argv: Value = json_col(Some(r.get(13)?))?.unwrap_or(Value::Null);
    Ok(RunRecord {
        id: r.get(0)?,
        lock_key: r.get(1)?,
        plan: r.get(2)?,
        plan_fingerprint: r.get(3)?,
        sandbox: r.get(4)?,
        gateway: r.get(5)?,
        mode: r.get(6)?,
        state: RunState::parse(&state).ok_or_else(|| bad_row("run state"))?,
        params: json_col(Some(r.get(8)?))?.unwrap_or(Value::Null),
        binary_version: r.get(9)?,
        host: r.get(10)?,
        user: r.get(11)?,
        pid: r.get(12)?,
        argv: argv
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap_or_default().to_owned()).collect())
            .unwrap_or_default(),
        created_at: r.get(14)?,
        updated_at: r.get(15)?,
        finished_at: r.get(16)?,
        error: r.get(17)?,
    })
}

const STEP_COLS: &str = "run_id, seq, name, version, destructive, state, attempt, input, output, \
     error, started_at, finished_at, compensated_at";

fn step_from_row(r: &Row<'_>) -> rusqlite::Result<StepRecord> {
    let state: String = r.get(5)?;
    Ok(StepRecord {
        run_id: r.get(0)?,
        seq: r.get::<_, i64>(1)? as usize,
        name: r.get(2)?,
        version: r.get::<_, i64>(3)? as u32,
        destructive: r.get::<_, i64>(4)? != 0,
        state: StepState::parse(&state).ok_or_else(|| bad_row("step state"))?,
        attempt: r.get::<_, i64>(6)? as u32,
        input: json_col(r.get(7)?)?,
        output: json_col(r.get(8)?)?,
        error: r.get(9)?,
        started_at: r.get(10)?,
        finished_at: r.get(11)?,
        compensated_at: r.get(12)?,
    })
}

/// Insert a run (state `running`) with all its steps (`pending`) and a `run_created` event.
pub fn create_run(tx: &Transaction<'_>, run: &NewRun, at: i64) -> Result<(), JournalError> {
    let params_json = super::redact::redact(&run.params).to_string();
    let argv = Value::from(run.argv.clone()).to_string();
    exec(
        tx,
        "INSERT INTO runs (id, lock_key, plan, plan_fingerprint, sandbox, gateway, mode, state,
             params, binary_version, host, user, pid, argv, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'running', ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?14)",
        params![
            run.id,
            run.lock_key,
            run.plan,
            run.plan_fingerprint,
            run.sandbox,
            run.gateway,
            run.mode,
            params_json,
            env!("CARGO_PKG_VERSION"),
            crate::util::hostname(),
            crate::util::username(),
            std::process::id() as i64,
            argv,
            at,
        ],
    )
    .map_err(raw)?;
    for (seq, s) in run.steps.iter().enumerate() {
        exec(
            tx,
            "INSERT INTO steps (run_id, seq, name, version, destructive, state)
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending')",
            params![run.id, seq as i64, s.name, s.version as i64, s.destructive as i64],
        )
        .map_err(raw)?;
    }
    let steps: Vec<&str> = run.steps.iter().map(|s| s.name.as_str()).collect();
    let row = run_image(tx, &run.id, RUN_IMAGE_COLUMNS)?;
    let step_rows = (0..run.steps.len())
        .map(|seq| step_image(tx, &run.id, seq, STEP_IMAGE_COLUMNS))
        .collect::<Result<Vec<_>, _>>()?;
    events::append_recording(
        tx,
        Some(&run.id),
        None,
        at,
        "run_created",
        &json!({
            "lock": run.lock_key, "plan": run.plan, "plan_fingerprint": run.plan_fingerprint,
            "sandbox": run.sandbox, "gateway": run.gateway, "mode": run.mode,
            "steps": steps, "pid": std::process::id(), "host": crate::util::hostname(),
        }),
        vec![("row", row), ("step_rows", Value::Array(step_rows))],
    )?;
    Ok(())
}

fn current_run_state(tx: &Transaction<'_>, run_id: &str) -> Result<RunState, JournalError> {
    let s: Option<String> = tx
        .query_row("SELECT state FROM runs WHERE id = ?1", [run_id], |r| r.get(0))
        .optional()
        .map_err(raw)?;
    let s = s.ok_or_else(|| JournalError::NotFound(format!("no run `{run_id}` in the journal")))?;
    RunState::parse(&s).ok_or_else(|| raw(bad_row("run state")))
}

fn transition_err(e: TransitionError) -> JournalError {
    JournalError::Transition(e)
}

/// Move a run to `to` (checked against the stored state), record `error` (kept when `None`),
/// and append the `run_<to>` event with `data`.
pub fn set_run_state(
    tx: &Transaction<'_>,
    run_id: &str,
    to: RunState,
    error: Option<&str>,
    at: i64,
    data: Value,
) -> Result<RunState, JournalError> {
    let from = current_run_state(tx, run_id)?;
    RunState::transition(from, to).map_err(transition_err)?;
    let finished = if to.is_final() { Some(at) } else { None };
    exec(
        tx,
        "UPDATE runs SET state = ?2, updated_at = ?3, finished_at = ?4,
             error = CASE WHEN ?2 IN ('succeeded', 'running') THEN NULL ELSE coalesce(?5, error) END
         WHERE id = ?1",
        params![run_id, to.as_str(), at, finished, error],
    )
    .map_err(raw)?;
    let mut d = json!({ "from": from.as_str(), "to": to.as_str() });
    if let Some(e) = error {
        d["error"] = Value::String(e.to_owned());
    }
    merge(&mut d, data);
    let row = run_image(tx, run_id, RUN_MUTABLE_COLUMNS)?;
    events::append_recording(
        tx,
        Some(run_id),
        None,
        at,
        &format!("run_{}", to.as_str()),
        &d,
        vec![("row", row)],
    )?;
    Ok(from)
}

/// Append a run-level event that changes no state (`takeover`, `rollback_interrupted`, ...)
/// and touch `updated_at`. The event records the run's changeable columns as they are after
/// the change, including any the caller changed earlier in the same transaction (an `error`).
pub fn run_event(
    tx: &Transaction<'_>,
    run_id: &str,
    kind: &str,
    at: i64,
    data: Value,
) -> Result<(), JournalError> {
    exec(tx, "UPDATE runs SET updated_at = ?2 WHERE id = ?1", params![run_id, at]).map_err(raw)?;
    let row = run_image(tx, run_id, RUN_MUTABLE_COLUMNS)?;
    events::append_recording(tx, Some(run_id), None, at, kind, &data, vec![("row", row)])?;
    Ok(())
}

/// Record `error` on a run without changing its state (a compensation failed: the run stays
/// `rolling_back`). The caller appends the run's event in the same transaction
/// ([`run_event`]); its row image records the new text.
pub fn set_run_error(tx: &Transaction<'_>, run_id: &str, error: &str) -> Result<(), JournalError> {
    tx.execute("UPDATE runs SET error = ?2 WHERE id = ?1", params![run_id, error]).map_err(raw)?;
    Ok(())
}

fn merge(into: &mut Value, extra: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), extra) {
        for (k, v) in b {
            a.insert(k, v);
        }
    }
}

/// What a step change writes besides the state.
#[derive(Debug, Clone, Default)]
pub struct StepChange<'a> {
    /// Intent input (on `started`).
    pub input: Option<&'a Value>,
    /// Output (on `done`).
    pub output: Option<&'a Value>,
    /// Error text (on `failed`, or a compensation error).
    pub error: Option<&'a str>,
}

/// Move step `seq` of `run_id` to `to`, checked against the stored state, and append the
/// `step_<to>` event. `started` increments `attempt`; `done` records the output; `failed`
/// records the error. Returns the state the step was in.
pub fn set_step_state(
    tx: &Transaction<'_>,
    run_id: &str,
    seq: usize,
    to: StepState,
    change: StepChange<'_>,
    at: i64,
) -> Result<StepState, JournalError> {
    let row: Option<(String, i64, String)> = tx
        .prepare_cached("SELECT state, attempt, name FROM steps WHERE run_id = ?1 AND seq = ?2")
        .and_then(|mut st| {
            st.query_row(params![run_id, seq as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
        })
        .map_err(raw)?;
    let (from, attempt, name) = row.ok_or_else(|| {
        JournalError::NotFound(format!("run `{run_id}` has no step {seq} in the journal"))
    })?;
    let from = StepState::parse(&from).ok_or_else(|| raw(bad_row("step state")))?;
    StepState::transition(from, to).map_err(transition_err)?;
    let redacted = |v: Option<&Value>| v.map(|v| super::redact::redact(v).to_string());
    let mut data = json!({ "name": name, "from": from.as_str() });
    let n = match to {
        StepState::Started => {
            data["attempt"] = json!(attempt + 1);
            exec(
                tx,
                "UPDATE steps SET state = 'started', attempt = attempt + 1, input = ?3,
                     error = NULL, started_at = ?4, finished_at = NULL
                 WHERE run_id = ?1 AND seq = ?2",
                params![run_id, seq as i64, redacted(change.input), at],
            )
        }
        StepState::Done => exec(
            tx,
            "UPDATE steps SET state = 'done', output = ?3, error = NULL, finished_at = ?4
             WHERE run_id = ?1 AND seq = ?2",
            params![run_id, seq as i64, redacted(change.output), at],
        ),
        StepState::Failed => exec(
            tx,
            "UPDATE steps SET state = 'failed', error = ?3, finished_at = ?4
             WHERE run_id = ?1 AND seq = ?2",
            params![run_id, seq as i64, change.error, at],
        ),
        StepState::Compensating => exec(
            tx,
            "UPDATE steps SET state = 'compensating' WHERE run_id = ?1 AND seq = ?2",
            params![run_id, seq as i64],
        ),
        StepState::Compensated => exec(
            tx,
            "UPDATE steps SET state = 'compensated', compensated_at = ?3
             WHERE run_id = ?1 AND seq = ?2",
            params![run_id, seq as i64, at],
        ),
        StepState::Pending => unreachable!("no transition leads to pending"),
    }
    .map_err(raw)?;
    debug_assert_eq!(n, 1);
    if let Some(e) = change.error {
        data["error"] = Value::String(e.to_owned());
    }
    let row = step_image(tx, run_id, seq, STEP_MUTABLE_COLUMNS)?;
    events::append_recording(
        tx,
        Some(run_id),
        Some(seq as i64),
        at,
        &format!("step_{}", to.as_str()),
        &data,
        vec![("row", row)],
    )?;
    // `runs.updated_at` is left alone: it tracks run-level changes, and not touching the runs
    // row keeps a step transition to the pages it must write (steps, events).
    Ok(from)
}

/// A run by its full id, or `None`.
pub fn get_run(conn: &Connection, id: &str) -> Result<Option<RunRecord>, JournalError> {
    conn.query_row(&format!("SELECT {RUN_COLS} FROM runs WHERE id = ?1"), [id], run_from_row)
        .optional()
        .map_err(raw)
}

/// A run by id or unique id prefix. Not found or ambiguous is [`JournalError::NotFound`].
pub fn find_run(conn: &Connection, id_or_prefix: &str) -> Result<RunRecord, JournalError> {
    if let Some(r) = get_run(conn, id_or_prefix)? {
        return Ok(r);
    }
    // Escape LIKE wildcards: a prefix is matched literally.
    let esc: String = id_or_prefix
        .chars()
        .flat_map(|c| if matches!(c, '%' | '_' | '\\') { vec!['\\', c] } else { vec![c] })
        .collect();
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {RUN_COLS} FROM runs WHERE id LIKE ?1 || '%' ESCAPE '\\' ORDER BY id LIMIT 3"
        ))
        .map_err(raw)?;
    let found: Vec<RunRecord> =
        stmt.query_map([esc], run_from_row).and_then(|it| it.collect()).map_err(raw)?;
    match found.len() {
        1 => Ok(found.into_iter().next().expect("one element")),
        0 => Err(JournalError::NotFound(format!("no run matches `{id_or_prefix}` in the journal"))),
        _ => Err(JournalError::NotFound(format!(
            "run prefix `{id_or_prefix}` is ambiguous ({}, {}, ...); give more characters",
            found[0].id, found[1].id
        ))),
    }
}

/// Runs not yet `succeeded` or `rolled_back`, oldest first.
pub fn unfinished_runs(
    conn: &Connection,
    filter: &UnfinishedFilter<'_>,
) -> Result<Vec<RunRecord>, JournalError> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {RUN_COLS} FROM runs
             WHERE state NOT IN ('succeeded', 'rolled_back')
               AND (?1 IS NULL OR lock_key = ?1) AND (?2 IS NULL OR sandbox = ?2)
             ORDER BY created_at, id"
        ))
        .map_err(raw)?;
    stmt.query_map(params![filter.lock_key, filter.sandbox], run_from_row)
        .and_then(|it| it.collect())
        .map_err(raw)
}

/// The steps of a run, in order.
pub fn steps(conn: &Connection, run_id: &str) -> Result<Vec<StepRecord>, JournalError> {
    let mut stmt = conn
        .prepare(&format!("SELECT {STEP_COLS} FROM steps WHERE run_id = ?1 ORDER BY seq"))
        .map_err(raw)?;
    stmt.query_map([run_id], step_from_row).and_then(|it| it.collect()).map_err(raw)
}

/// The stored state of step `seq` of a run.
pub fn step_state(conn: &Connection, run_id: &str, seq: usize) -> Result<StepState, JournalError> {
    let s: String = conn
        .query_row(
            "SELECT state FROM steps WHERE run_id = ?1 AND seq = ?2",
            params![run_id, seq as i64],
            |r| r.get(0),
        )
        .map_err(raw)?;
    StepState::parse(&s).ok_or_else(|| raw(bad_row("step state")))
}

/// The recorded holder of `lock_key`, if any.
pub fn holder(conn: &Connection, lock_key: &str) -> Result<Option<HolderRecord>, JournalError> {
    conn.query_row(
        "SELECT lock_key, run_id, pid, host, started_at, acquired_at FROM holders WHERE lock_key = ?1",
        [lock_key],
        |r| {
            Ok(HolderRecord {
                lock_key: r.get(0)?,
                run_id: r.get(1)?,
                pid: r.get(2)?,
                host: r.get(3)?,
                started_at: r.get(4)?,
                acquired_at: r.get(5)?,
            })
        },
    )
    .optional()
    .map_err(raw)
}

/// Record `h` as the holder of its key (replacing any previous row).
pub fn set_holder(tx: &Transaction<'_>, h: &HolderRecord) -> Result<(), JournalError> {
    exec(
        tx,
        "INSERT OR REPLACE INTO holders (lock_key, run_id, pid, host, started_at, acquired_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![h.lock_key, h.run_id, h.pid, h.host, h.started_at, h.acquired_at],
    )
    .map_err(raw)?;
    Ok(())
}

/// Record which run the holder of `lock_key` works on.
pub fn set_holder_run(
    tx: &Transaction<'_>,
    lock_key: &str,
    run_id: &str,
) -> Result<(), JournalError> {
    exec(tx, "UPDATE holders SET run_id = ?2 WHERE lock_key = ?1", params![lock_key, run_id])
        .map_err(raw)?;
    Ok(())
}

/// Remove the holder row of `lock_key` if it is ours (`pid`, `host`).
pub fn clear_holder(
    tx: &Transaction<'_>,
    lock_key: &str,
    pid: i64,
    host: &str,
) -> Result<(), JournalError> {
    exec(
        tx,
        "DELETE FROM holders WHERE lock_key = ?1 AND pid = ?2 AND host = ?3",
        params![lock_key, pid, host],
    )
    .map_err(raw)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunState as R;
    use StepState as S;

    /// The images cover every column: a column added to `runs` or `steps` without being added
    /// to the image lists would escape `journal verify`.
    #[test]
    fn row_images_cover_every_column() {
        let dir = tempfile::tempdir().unwrap();
        let j = crate::journal::Journal::open_home(dir.path()).unwrap();
        let cols = |t: &str| -> Vec<String> {
            j.conn()
                .prepare(&format!("SELECT name FROM pragma_table_info('{t}') ORDER BY cid"))
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        let mut want = vec!["id".to_owned()];
        want.extend(RUN_IMAGE_COLUMNS.iter().map(|c| c.to_string()));
        assert_eq!(cols("runs"), want);
        let mut want = vec!["run_id".to_owned(), "seq".to_owned()];
        want.extend(STEP_IMAGE_COLUMNS.iter().map(|c| c.to_string()));
        assert_eq!(cols("steps"), want);
        for c in RUN_MUTABLE_COLUMNS {
            assert!(RUN_IMAGE_COLUMNS.contains(c), "{c}");
        }
        for c in STEP_MUTABLE_COLUMNS {
            assert!(STEP_IMAGE_COLUMNS.contains(c), "{c}");
        }
    }

    /// Every write records what it wrote: after each kind of change, the latest image of each
    /// column equals the stored row (the engine's raw `UPDATE runs SET error` before a note
    /// included).
    #[test]
    fn every_change_records_the_row_it_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = crate::journal::Journal::open_home(dir.path()).unwrap();
        let id = "0190-cccc";
        j.write("create", |tx| create_run(tx, &new_run(id), 1)).unwrap();
        j.write("s", |tx| {
            let out = json!({"backup_path": "/b", "apiKey": "sk"});
            set_step_state(
                tx,
                id,
                0,
                S::Started,
                StepChange { input: Some(&json!({"pid": 1})), ..Default::default() },
                2,
            )?;
            set_step_state(
                tx,
                id,
                0,
                S::Done,
                StepChange { output: Some(&out), ..Default::default() },
                3,
            )?;
            set_step_state(tx, id, 1, S::Started, StepChange::default(), 4)?;
            set_step_state(
                tx,
                id,
                1,
                S::Failed,
                StepChange { error: Some("boom"), ..Default::default() },
                5,
            )?;
            set_run_state(tx, id, R::Failed, Some("boom"), 6, json!({}))?;
            set_run_state(tx, id, R::RollingBack, None, 7, json!({}))?;
            tx.execute("UPDATE runs SET error = 'comp failed' WHERE id = ?1", [id])
                .map_err(JournalError::from_sqlite)?;
            run_event(tx, id, "compensation_failed", 8, json!({}))
        })
        .unwrap();
        let conn = j.conn();
        let stored = |sql: &str, cols: &[&str]| -> Value {
            conn.query_row(sql, [id], |r| {
                let mut m = serde_json::Map::new();
                for (i, c) in cols.iter().enumerate() {
                    m.insert(c.to_string(), column_json(c, r.get_ref(i)?));
                }
                Ok(Value::Object(m))
            })
            .unwrap()
        };
        let mut run = serde_json::Map::new();
        let mut steps = vec![serde_json::Map::new(), serde_json::Map::new()];
        let mut st = conn.prepare("SELECT step_seq, kind, data FROM events ORDER BY id").unwrap();
        let mut rows = st.query([]).unwrap();
        while let Some(r) = rows.next().unwrap() {
            let seq: Option<i64> = r.get(0).unwrap();
            let kind: String = r.get(1).unwrap();
            let d: Value = serde_json::from_str(&r.get::<_, String>(2).unwrap()).unwrap();
            let row = d["row"].as_object().unwrap_or_else(|| panic!("{kind} has no row")).clone();
            let into = match seq {
                Some(q) => &mut steps[q as usize],
                None => &mut run,
            };
            into.extend(row);
            if kind == "run_created" {
                for (q, s) in d["step_rows"].as_array().unwrap().iter().enumerate() {
                    steps[q].extend(s.as_object().unwrap().clone());
                }
            }
        }
        let cols = RUN_IMAGE_COLUMNS.join(", ");
        assert_eq!(
            Value::Object(run),
            stored(&format!("SELECT {cols} FROM runs WHERE id = ?1"), RUN_IMAGE_COLUMNS)
        );
        let cols = STEP_IMAGE_COLUMNS.join(", ");
        for (q, s) in steps.into_iter().enumerate() {
            let got = stored(
                &format!("SELECT {cols} FROM steps WHERE run_id = ?1 AND seq = {q}"),
                STEP_IMAGE_COLUMNS,
            );
            assert_eq!(Value::Object(s), got, "step {q}");
        }
        let out: String = conn
            .query_row("SELECT data FROM events WHERE kind = 'step_done'", [], |r| r.get(0))
            .unwrap();
        assert!(out.contains(r#""apiKey":"[redacted]""#) && !out.contains("sk"), "{out}");
        // Image columns are not mistaken for secrets by their names.
        let created: String = conn
            .query_row("SELECT data FROM events WHERE kind = 'run_created'", [], |r| r.get(0))
            .unwrap();
        assert!(created.contains(r#""lock_key":"k""#), "{created}");
    }

    fn new_run(id: &str) -> NewRun {
        NewRun {
            id: id.into(),
            lock_key: "k".into(),
            plan: "p".into(),
            plan_fingerprint: "f".into(),
            sandbox: Some("demo".into()),
            gateway: None,
            mode: None,
            params: json!({"apiKey": "sk", "n": 1}),
            argv: vec!["nemoclaw".into()],
            steps: vec![
                NewStep { name: "a".into(), version: 1, destructive: false },
                NewStep { name: "b".into(), version: 2, destructive: true },
            ],
        }
    }

    #[test]
    fn run_lifecycle_writes_state_and_event_together() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = crate::journal::Journal::open_home(dir.path()).unwrap();
        j.write("create", |tx| create_run(tx, &new_run("0190-aaaa"), 1)).unwrap();
        j.write("create", |tx| create_run(tx, &new_run("0190-aaab"), 1)).unwrap();
        let r = find_run(j.conn(), "0190-aaaa").unwrap();
        assert_eq!(r.state, R::Running);
        assert_eq!(r.params["apiKey"], "[redacted]");
        assert!(find_run(j.conn(), "0190-aa").unwrap_err().to_string().contains("ambiguous"));
        assert!(find_run(j.conn(), "0190-%").is_err(), "LIKE wildcards are literal");
        j.write("s", |tx| {
            set_step_state(tx, "0190-aaaa", 0, S::Started, StepChange::default(), 2)?;
            set_step_state(
                tx,
                "0190-aaaa",
                0,
                S::Done,
                StepChange { output: Some(&json!({"x": 1})), ..Default::default() },
                3,
            )
        })
        .unwrap();
        // A forbidden transition fails and the transaction is rolled back with it.
        let e = j
            .write("bad", |tx| {
                set_step_state(tx, "0190-aaaa", 1, S::Compensating, StepChange::default(), 4)
            })
            .unwrap_err();
        assert!(e.to_string().contains("pending -> compensating"), "{e}");
        let st = steps(j.conn(), "0190-aaaa").unwrap();
        assert_eq!((st[0].state, st[0].attempt), (S::Done, 1));
        assert_eq!(st[0].output, Some(json!({"x": 1})));
        assert_eq!(st[1].state, S::Pending);
        j.write("f", |tx| set_run_state(tx, "0190-aaaa", R::Failed, Some("boom"), 5, json!({})))
            .unwrap();
        let un =
            unfinished_runs(j.conn(), &UnfinishedFilter { lock_key: Some("k"), sandbox: None })
                .unwrap();
        assert_eq!(un.len(), 2);
        j.write("rb", |tx| {
            set_run_state(tx, "0190-aaaa", R::RollingBack, None, 6, json!({}))?;
            set_run_state(tx, "0190-aaaa", R::RolledBack, None, 7, json!({}))
        })
        .unwrap();
        let r = get_run(j.conn(), "0190-aaaa").unwrap().unwrap();
        assert_eq!(
            (r.state, r.finished_at, r.error.as_deref()),
            (R::RolledBack, Some(7), Some("boom"))
        );
        let kinds: Vec<String> = j
            .conn()
            .prepare("SELECT kind FROM events WHERE run_id = '0190-aaaa' ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            kinds,
            [
                "run_created",
                "step_started",
                "step_done",
                "run_failed",
                "run_rolling_back",
                "run_rolled_back"
            ]
        );
    }
}
