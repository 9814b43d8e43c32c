//! `nemoclaw journal list|show|export|verify|prune`: the audit review of past runs.
//!
//! Read commands open the journal read-only and treat a missing journal as "no runs yet".
//! Human output is aligned columns with absolute and relative times; `--json` prints one
//! schema-versioned document (`export` prints JSON Lines instead).

use std::io::{IsTerminal, Write};

use serde_json::{json, Value};

use super::args::{JournalCmd, JournalListArgs};
use super::{CliError, CmdResult, Ctx, Refusal};
use crate::exit::Exit;
use crate::journal::audit::{
    self, human_duration, relative_time, AuditError, Check, ExportFilter, PruneOptions,
    PruneReport, RunDetail, RunFilter, RunSummary,
};
use crate::journal::store::FILE_NAME;
use crate::journal::Journal;
use crate::rebuild;
use crate::rebuild::files::PrunedBackups;
use crate::util::{iso_ms, now_ms};

/// `nemoclaw journal ...`.
pub fn dispatch(ctx: &Ctx, j: JournalCmd) -> CmdResult {
    match j {
        JournalCmd::List(a) => list(ctx, a),
        JournalCmd::Show { run } => show(ctx, &run),
        JournalCmd::Export { since, sandbox } => export(ctx, since, sandbox),
        JournalCmd::Verify { expect_head } => verify(ctx, expect_head.as_deref()),
        JournalCmd::Prune { older_than, dry_run, keep_backups, yes } => {
            prune(ctx, &older_than, dry_run, keep_backups, yes)
        }
    }
}

fn open(ctx: &Ctx) -> Result<Option<Journal>, CliError> {
    Ok(Journal::open_readonly(&ctx.home.join(FILE_NAME))?)
}

/// Colour a cell by meaning, only when stdout gets colour (TTY and no NO_COLOR, or --color).
fn paint(ctx: &Ctx, s: &str, code: &str) -> String {
    if ctx.printer.color_stdout && !code.is_empty() {
        format!("\x1b[{code}m{s}\x1b[0m")
    } else {
        s.to_owned()
    }
}

fn state_color(state: &str) -> &'static str {
    match state {
        "succeeded" | "done" | "compensated" | "rolled_back" => "32",
        "failed" => "31",
        "running" | "started" | "compensating" | "rolling_back" => "36",
        "interrupted" | "needs_operator" => "33",
        _ => "",
    }
}

/// Print rows as aligned columns. Each cell is `(text, colour code)`; padding is computed on
/// the plain text so colour never shifts the columns. The last column is not padded.
fn table(ctx: &Ctx, indent: &str, rows: &[Vec<(String, &str)>]) {
    let ncols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; ncols];
    for r in rows {
        for (i, (t, _)) in r.iter().enumerate() {
            widths[i] = widths[i].max(t.chars().count());
        }
    }
    for (ri, r) in rows.iter().enumerate() {
        let mut line = String::from(indent);
        for (i, (t, c)) in r.iter().enumerate() {
            let cell = if ri == 0 { ctx.printer.bold(t) } else { paint(ctx, t, c) };
            line.push_str(&cell);
            if i + 1 < r.len() {
                let pad = widths[i] - t.chars().count() + 2;
                line.push_str(&" ".repeat(pad));
            }
        }
        ctx.printer.data(line.trim_end());
    }
}

fn when(at: i64, now: i64) -> String {
    format!("{} ({})", iso_ms(at), relative_time(at, now))
}

fn who(r: &RunSummary) -> String {
    format!("{}@{} pid {}: {}", r.user, r.host, r.pid, r.argv.join(" "))
}

fn parse_time(s: &Option<String>, now: i64) -> Result<Option<i64>, AuditError> {
    s.as_deref().map(|t| audit::parse_time(t, now)).transpose()
}

// ---------------------------------------------------------------------------------------------

fn list(ctx: &Ctx, a: JournalListArgs) -> CmdResult {
    let now = now_ms();
    if let Some(s) = &a.sandbox {
        super::parse_name(s)?;
    }
    let f = RunFilter {
        sandbox: a.sandbox,
        state: a.state,
        since: parse_time(&a.since, now)?,
        until: parse_time(&a.until, now)?,
        limit: Some(a.limit),
    };
    f.validate()?;
    let mut runs = Vec::new();
    if let Some(j) = open(ctx)? {
        // Bounded by --limit: the statement streams rows, we keep at most `limit` of them to
        // size the columns.
        audit::list_runs(&j, &f, |r| {
            runs.push(r);
            Ok(())
        })?;
    }
    if ctx.printer.json {
        ctx.printer.json_doc("journal.list", json!({ "now": now, "runs": runs }));
        return Ok(Exit::Ok);
    }
    if runs.is_empty() {
        ctx.printer.info("No runs match.");
        return Ok(Exit::Ok);
    }
    let mut rows: Vec<Vec<(String, &str)>> = vec![[
        "RUN",
        "SANDBOX",
        "GATEWAY",
        "MODE",
        "STATE",
        "STARTED",
        "DURATION",
        "LAST STEP",
        "BY",
    ]
    .iter()
    .map(|h| (h.to_string(), ""))
    .collect()];
    for r in &runs {
        let dash = || "-".to_owned();
        rows.push(vec![
            (r.id.clone(), ""),
            (r.sandbox.clone().unwrap_or_else(dash), ""),
            (r.gateway.clone().unwrap_or_else(dash), ""),
            (r.mode.clone().unwrap_or_else(dash), ""),
            (r.state.clone(), state_color(&r.state)),
            (when(r.created_at, now), ""),
            (human_duration(r.duration_ms), ""),
            (
                r.last_step
                    .as_ref()
                    .map(|s| format!("{} {}", s.name, s.state))
                    .unwrap_or_else(dash),
                "",
            ),
            (who(r), ""),
        ]);
    }
    table(ctx, "", &rows);
    Ok(Exit::Ok)
}

// ---------------------------------------------------------------------------------------------

fn show(ctx: &Ctx, prefix: &str) -> CmdResult {
    let now = now_ms();
    let Some(j) = open(ctx)? else {
        return Err(Refusal::NoJournal { prefix: prefix.to_owned() }.into());
    };
    let id = audit::resolve_run(&j, prefix)?;
    let d = audit::show_run(&j, &id, &rebuild::files::artifacts_in)?;
    if ctx.printer.json {
        ctx.printer.json_doc("journal.show", show_json(&d, now));
        return Ok(Exit::Ok);
    }
    print_show(ctx, &d, now);
    Ok(Exit::Ok)
}

fn show_json(d: &RunDetail, now: i64) -> Value {
    let mut v = serde_json::to_value(d).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.insert("now".into(), json!(now));
        o.insert("artifacts".into(), json!(d.artifacts().collect::<Vec<_>>()));
        // Events carry their data as JSON, not as the hashed text.
        o.insert(
            "events".into(),
            d.events
                .iter()
                .map(|e| {
                    json!({"id": e.id, "at": e.at, "step_seq": e.step_seq, "kind": e.kind,
                           "data": e.data_json(), "hash": e.hash})
                })
                .collect(),
        );
    }
    v
}

fn event_detail(kind: &str, data: &Value) -> String {
    let s = |k: &str| data.get(k).and_then(Value::as_str);
    let mut parts = Vec::new();
    if kind.starts_with("run_") && kind != "run_created" {
        if let (Some(f), Some(t)) = (s("from"), s("to")) {
            parts.push(format!("{f} -> {t}"));
        }
    } else if kind.starts_with("step_") {
        if let Some(f) = s("from") {
            parts.push(format!("from {f}"));
        }
        if let Some(a) = data.get("attempt").and_then(Value::as_i64) {
            parts.push(format!("attempt {a}"));
        }
    } else if kind != "run_created" {
        // Unknown kinds are shown generically: their data, compact and bounded, without the
        // row image (the step table above shows the rows).
        let mut shown = data.clone();
        if let Some(m) = shown.as_object_mut() {
            m.remove("row");
        }
        let mut t = shown.to_string();
        if t.len() > 120 {
            let mut cut = 117;
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            t.truncate(cut);
            t.push_str("...");
        }
        if t != "{}" {
            parts.push(t);
        }
    }
    if let Some(e) = s("error") {
        parts.push(format!("error: {e}"));
    }
    parts.join(", ")
}

fn event_color(kind: &str) -> &'static str {
    match kind {
        k if k.contains("failed") => "31",
        k if k.contains("takeover")
            || k.contains("interrupted")
            || k.contains("needs_operator")
            || k.contains("operator") =>
        {
            "33"
        }
        "step_done" | "run_succeeded" | "run_rolled_back" | "step_compensated" => "32",
        _ => "",
    }
}

fn print_show(ctx: &Ctx, d: &RunDetail, now: i64) {
    let r = &d.run;
    let dash = || "-".to_owned();
    let mut head: Vec<Vec<(String, &str)>> = Vec::new();
    let mut kv = |k: &str, v: String, c: &'static str| head.push(vec![(k.to_owned(), ""), (v, c)]);
    kv("Run", r.id.clone(), "");
    let mut plan = r.plan.clone();
    if let Some(m) = &r.mode {
        plan.push_str(&format!(" ({m})"));
    }
    if let Some(sb) = &r.sandbox {
        plan.push_str(&format!(" of sandbox {sb}"));
    }
    if let Some(gw) = &r.gateway {
        plan.push_str(&format!(" on gateway {gw}"));
    }
    kv("Plan", plan, "");
    kv("State", r.state.clone(), state_color(&r.state));
    kv("Started", when(r.created_at, now), "");
    match r.finished_at {
        Some(f) => {
            kv("Finished", format!("{} after {}", when(f, now), human_duration(r.duration_ms)), "")
        }
        None => kv(
            "Updated",
            format!("{}, {} so far", when(r.updated_at, now), human_duration(r.duration_ms)),
            "",
        ),
    }
    kv("By", who(r), "");
    kv("Binary", format!("nemoclaw {}, plan {}", d.binary_version, short(&d.plan_fingerprint)), "");
    if let Some(e) = &r.error {
        kv("Error", e.clone(), "31");
    }
    // The header is a key/value table without a heading row: give it an empty first row.
    let mut rows = vec![vec![(String::new(), ""), (String::new(), "")]];
    rows.extend(head);
    table_no_header(ctx, &rows[1..]);

    ctx.printer.data("");
    ctx.printer.data(ctx.printer.bold("Steps"));
    let mut rows: Vec<Vec<(String, &str)>> = vec![[
        "#",
        "STEP",
        "STATE",
        "ATTEMPT",
        "STARTED",
        "FINISHED",
        "DURATION",
        "COMPENSATED",
        "ERROR",
    ]
    .iter()
    .map(|h| (h.to_string(), ""))
    .collect()];
    for s in &d.steps {
        let t = |v: Option<i64>| v.map(iso_ms).unwrap_or_else(dash);
        rows.push(vec![
            // Numbered from 1, as the progress lines and the dry run number them.
            ((s.seq + 1).to_string(), ""),
            (s.name.clone(), ""),
            (s.state.clone(), state_color(&s.state)),
            (s.attempt.to_string(), ""),
            (t(s.started_at), ""),
            (t(s.finished_at), ""),
            (s.duration_ms.map(human_duration).unwrap_or_else(dash), ""),
            (t(s.compensated_at), ""),
            (s.error.clone().unwrap_or_default(), "31"),
        ]);
    }
    table(ctx, "  ", &rows);

    let warnings: Vec<(usize, &str, &str)> = d
        .steps
        .iter()
        .flat_map(|s| {
            crate::rebuild::saga::step_warnings(s.output.as_ref())
                .map(move |w| (s.seq as usize + 1, s.name.as_str(), w))
        })
        .collect();
    if !warnings.is_empty() {
        ctx.printer.data("");
        ctx.printer.data(ctx.printer.bold("Warnings"));
        for (seq, name, w) in warnings {
            ctx.printer.data(format!("  [{seq}] {name}: {}", w.replace('\n', "\n      ")));
        }
    }

    let arts: Vec<_> = d.artifacts().collect();
    if !arts.is_empty() {
        ctx.printer.data("");
        ctx.printer.data(ctx.printer.bold("Artifacts"));
        let mut rows: Vec<Vec<(String, &str)>> =
            vec![["STEP", "PATH", "MANIFEST SHA256"].iter().map(|h| (h.to_string(), "")).collect()];
        for a in arts {
            rows.push(vec![
                (a.step.clone(), ""),
                (a.path.clone(), ""),
                (a.manifest_sha256.clone().unwrap_or_else(dash), ""),
            ]);
        }
        table(ctx, "  ", &rows);
    }

    ctx.printer.data("");
    ctx.printer.data(ctx.printer.bold("Timeline"));
    let mut rows: Vec<Vec<(String, &str)>> =
        vec![["#", "AT", "+ELAPSED", "EVENT", "STEP", "DETAIL"]
            .iter()
            .map(|h| (h.to_string(), ""))
            .collect()];
    for e in &d.events {
        let data = e.data_json();
        let step = e
            .step_seq
            .and_then(|q| d.steps.iter().find(|s| s.seq == q))
            .map(|s| s.name.clone())
            .unwrap_or_default();
        rows.push(vec![
            (e.id.to_string(), ""),
            (iso_ms(e.at), ""),
            (format!("+{}", human_duration(e.at - r.created_at)), ""),
            (e.kind.clone(), event_color(&e.kind)),
            (step, ""),
            (event_detail(&e.kind, &data), ""),
        ]);
    }
    table(ctx, "  ", &rows);
}

fn table_no_header(ctx: &Ctx, rows: &[Vec<(String, &str)>]) {
    let w = rows.iter().map(|r| r[0].0.chars().count()).max().unwrap_or(0);
    for r in rows {
        let pad = " ".repeat(w - r[0].0.chars().count() + 2);
        ctx.printer.data(format!(
            "{}{pad}{}",
            ctx.printer.bold(&r[0].0),
            paint(ctx, &r[1].0, r[1].1)
        ));
    }
}

fn short(s: &str) -> &str {
    s.get(..12).unwrap_or(s)
}

// ---------------------------------------------------------------------------------------------

fn export(ctx: &Ctx, since: Option<String>, sandbox: Option<String>) -> CmdResult {
    let now = now_ms();
    if let Some(s) = &sandbox {
        super::parse_name(s)?;
    }
    let f = ExportFilter { since: parse_time(&since, now)?, sandbox };
    let Some(j) = open(ctx)? else {
        return Ok(Exit::Ok);
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let n = audit::export(&j, &f, &mut out)?;
    match out.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(AuditError::Output(e).into())
        }
        _ => {}
    }
    ctx.printer.debug(format!("exported {n} events"));
    Ok(Exit::Ok)
}

// ---------------------------------------------------------------------------------------------

fn verify(ctx: &Ctx, expect_head: Option<&str>) -> CmdResult {
    let expect = expect_head.map(audit::parse_head).transpose()?;
    let Some(j) = open(ctx)? else {
        if let Some(h) = &expect {
            // An anchor names a chain that existed; a missing journal cannot contain it.
            return Err(Refusal::NoJournalForHead {
                path: ctx.home.join(FILE_NAME),
                head: h.clone(),
            }
            .into());
        }
        if ctx.printer.json {
            ctx.printer.json_doc(
                "journal.verify",
                json!({"ok": true, "events_checked": 0, "runs_checked": 0, "steps_checked": 0,
                       "pruned_head_id": null, "legacy_runs": 0,
                       "head": {"id": 0, "hash": crate::journal::chain::GENESIS},
                       "expect_head": null, "problems": []}),
            );
        } else {
            ctx.printer.info("No journal yet: nothing to verify.");
        }
        return Ok(Exit::Ok);
    };
    let rep = audit::verify(&j, expect.as_deref())?;
    if ctx.printer.json {
        ctx.printer.json_doc("journal.verify", serde_json::to_value(&rep).unwrap_or(Value::Null));
    } else {
        let first = |c: Check| rep.problems.iter().find(|p| p.check == c);
        let mut rows: Vec<Vec<(String, &str)>> = Vec::new();
        let line = |c: Check, okmsg: String| match first(c) {
            None => (okmsg, "32"),
            Some(p) => (
                format!(
                    "FAILED{}{}: {}",
                    p.event_id.map(|e| format!(" at event {e}")).unwrap_or_default(),
                    p.run_id.as_ref().map(|r| format!(" (run {r})")).unwrap_or_default(),
                    p.detail
                ),
                "31",
            ),
        };
        rows.push(vec![("integrity".into(), ""), line(Check::Integrity, "ok".into())]);
        let anchor = rep
            .pruned_head_id
            .map(|k| format!(", anchored after pruned event {k}"))
            .unwrap_or_default();
        rows.push(vec![
            ("chain".into(), ""),
            line(Check::Chain, format!("ok ({} events{anchor})", rep.events_checked)),
        ]);
        rows.push(vec![
            ("consistency".into(), ""),
            line(
                Check::Consistency,
                format!("ok ({} runs, {} steps)", rep.runs_checked, rep.steps_checked),
            ),
        ]);
        let legacy = match rep.legacy_runs {
            0 => String::new(),
            n => {
                format!("; {n} run(s) from before schema 2: only their creation facts are covered")
            }
        };
        rows.push(vec![
            ("rows".into(), ""),
            line(Check::Rows, format!("ok (every column matches its events{legacy})")),
        ]);
        // Further consistency and row problems, under the first ones.
        let firsts: Vec<&audit::Problem> =
            [Check::Consistency, Check::Rows].into_iter().filter_map(first).collect();
        for p in rep.problems.iter().filter(|p| {
            matches!(p.check, Check::Consistency | Check::Rows)
                && !firsts.iter().any(|f| std::ptr::eq(*f, *p))
        }) {
            rows.push(vec![
                (String::new(), ""),
                (
                    format!(
                        "also{}{}: {}",
                        p.event_id.map(|e| format!(" at event {e}")).unwrap_or_default(),
                        p.run_id.as_ref().map(|r| format!(" (run {r})")).unwrap_or_default(),
                        p.detail
                    ),
                    "",
                ),
            ]);
        }
        if let Some(x) = &rep.expect_head {
            let okmsg = match (x.found_at, x.events_since) {
                (Some(at), Some(n)) => {
                    format!("ok (the expected head is event {at}; {n} event(s) appended since)")
                }
                _ => "ok".to_owned(),
            };
            rows.push(vec![("anchor".into(), ""), line(Check::Anchor, okmsg)]);
        }
        // The head goes last: it is what an auditor copies and keeps outside the journal.
        rows.push(vec![
            ("head".into(), ""),
            (format!("event {} {}", rep.head.id, rep.head.hash), ""),
        ]);
        table_no_header(ctx, &rows);
    }
    if rep.ok {
        ctx.printer.success("✓ Journal verified");
        Ok(Exit::Ok)
    } else {
        let p = &rep.problems[0];
        Err(Refusal::VerifyFailed {
            path: j.path().to_owned(),
            event: p.event_id,
            detail: p.detail.clone(),
        }
        .into())
    }
}

// ---------------------------------------------------------------------------------------------

fn prune(ctx: &Ctx, older_than: &str, dry_run: bool, keep_backups: bool, yes: bool) -> CmdResult {
    let p = &ctx.printer;
    let now = now_ms();
    let o =
        PruneOptions { older_than_ms: audit::parse_duration(older_than)?, now_ms: now, dry_run };
    if !ctx.home.join(FILE_NAME).exists() {
        // No journal: nothing is old enough, and the answer has the usual shape.
        let rep = PruneReport {
            dry_run,
            cutoff: now - o.older_than_ms,
            runs_removed: Vec::new(),
            events_removed: 0,
            pruned_through: None,
            files: PrunedBackups::default(),
            eligible_remaining: 0,
            checkpoint_event: None,
        };
        p.info("No journal yet: nothing to prune.");
        return print_prune(ctx, &rep, now);
    }
    let mut j = Journal::open_home(&ctx.home)?;
    // Backups are the one thing prune deletes that the journal does not hold: on a terminal,
    // show which would go and ask first.
    if !dry_run && !yes && !keep_backups && std::io::stdin().is_terminal() {
        let preview = PruneOptions { dry_run: true, ..o.clone() };
        let rep = rebuild::files::prune(&mut j, &ctx.home, &preview, keep_backups)?;
        let n = rep.files.backups_removed.len();
        if n > 0 {
            print_prune_lines(ctx, &rep, now);
            let question = match n {
                1 => "Delete this backup directory?".to_owned(),
                n => format!("Delete these {n} backup directories?"),
            };
            if !p.confirm(&question) {
                return Ok(Exit::Refused);
            }
        }
    }
    let rep = rebuild::files::prune(&mut j, &ctx.home, &o, keep_backups)?;
    print_prune(ctx, &rep, now)
}

fn print_prune(ctx: &Ctx, rep: &PruneReport<PrunedBackups>, now: i64) -> CmdResult {
    if ctx.printer.json {
        ctx.printer.json_doc("journal.prune", serde_json::to_value(rep).unwrap_or(Value::Null));
        return Ok(Exit::Ok);
    }
    print_prune_lines(ctx, rep, now);
    if let Some(ev) = rep.checkpoint_event {
        ctx.printer.success(format!("✓ Pruned; checkpoint event {ev} records what was removed"));
    }
    Ok(Exit::Ok)
}

/// What was (or would be) removed: a sentence, then one line per run and backup.
fn print_prune_lines(ctx: &Ctx, rep: &PruneReport<PrunedBackups>, now: i64) {
    let verb = if rep.dry_run { "Would remove" } else { "Removed" };
    ctx.printer.data(format!(
        "{verb} {} run(s) finished before {} and {} event(s){}.",
        rep.runs_removed.len(),
        when(rep.cutoff, now),
        rep.events_removed,
        rep.pruned_through.map(|k| format!(" (ids up to {k})")).unwrap_or_default()
    ));
    for (what, list) in [
        ("run", &rep.runs_removed),
        ("backup", &rep.files.backups_removed),
        ("kept", &rep.files.backups_kept),
    ] {
        for x in list {
            ctx.printer.data(format!("  {what:<7} {x}"));
        }
    }
    if rep.eligible_remaining > 0 {
        ctx.printer.data(format!(
            "{} finished run(s) old enough were kept: their events come after an unfinished or \
             recent run's, and the hash chain can only lose a prefix. A later prune removes them.",
            rep.eligible_remaining
        ));
    }
}
