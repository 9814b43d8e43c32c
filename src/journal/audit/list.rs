//! `journal list`: one summary per run, newest first, streamed through an index-backed query.

use rusqlite::{params_from_iter, Connection};
use serde::Serialize;

use super::{sql, AuditError, RUN_STATES};
use crate::journal::Journal;

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

pub(super) const SUMMARY_COLS: &str =
    "r.id, r.plan, r.sandbox, r.gateway, r.mode, r.state, r.created_at, \
     r.updated_at, r.finished_at, r.user, r.host, r.pid, r.argv, r.error, \
     (SELECT json_array(s.seq, s.name, s.state) FROM steps s WHERE s.run_id = r.id \
        AND s.state <> 'pending' \
      ORDER BY max(coalesce(s.started_at, 0), coalesce(s.finished_at, 0), \
                   coalesce(s.compensated_at, 0)) DESC, s.seq DESC LIMIT 1)";

pub(super) fn summary_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunSummary> {
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
