//! `nemoclaw journal list|show|export|verify|prune`: the audit review of past runs.
//!
//! Read commands open the journal read-only and treat a missing journal as "no runs yet".
//! Human output is aligned columns with absolute and relative times; `--json` prints one
//! schema-versioned document (`export` prints JSON Lines instead).

use std::io::{IsTerminal, Write};

use serde_json::{json, Value};

use super::args::{JournalCmd, JournalListArgs};
use super::style::{self, Cell};
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
    let dash = || "-".to_owned();
    let rows = runs
        .iter()
        .map(|r| {
            vec![
                r.id.as_str().into(),
                r.sandbox.clone().unwrap_or_else(dash).into(),
                r.gateway.clone().unwrap_or_else(dash).into(),
                r.mode.clone().unwrap_or_else(dash).into(),
                Cell::styled(&r.state, style::state(&r.state)),
                when(r.created_at, now).into(),
                human_duration(r.duration_ms).into(),
                r.last_step
                    .as_ref()
                    .map(|s| format!("{} {}", s.name, s.state))
                    .unwrap_or_else(dash)
                    .into(),
                who(r).into(),
            ]
        })
        .collect();
    ctx.printer.table(
        "",
        &["RUN", "SANDBOX", "GATEWAY", "MODE", "STATE", "STARTED", "DURATION", "LAST STEP", "BY"],
        rows,
    );
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

/// `journal show`: the run's header, its steps, warnings, artifacts and timeline.
fn print_show(ctx: &Ctx, d: &RunDetail, now: i64) {
    let p = &ctx.printer;
    p.table("", &[], show_header(d, now));
    section(p, "Steps");
    p.table(
        "  ",
        &[
            "#",
            "STEP",
            "STATE",
            "ATTEMPT",
            "STARTED",
            "FINISHED",
            "DURATION",
            "COMPENSATED",
            "ERROR",
        ],
        show_steps(d),
    );
    let warnings: Vec<String> = d
        .steps
        .iter()
        .flat_map(|s| {
            // Numbered from 1, as the progress lines and the dry run number them.
            crate::rebuild::saga::step_warnings(s.output.as_ref()).map(move |w| {
                format!("  [{}] {}: {}", s.seq + 1, s.name, w.replace('\n', "\n      "))
            })
        })
        .collect();
    if !warnings.is_empty() {
        section(p, "Warnings");
        warnings.iter().for_each(|w| p.data(w));
    }
    let arts: Vec<Vec<Cell>> = d
        .artifacts()
        .map(|a| {
            let sha = a.manifest_sha256.clone().unwrap_or_else(|| "-".to_owned());
            vec![a.step.as_str().into(), a.path.as_str().into(), sha.into()]
        })
        .collect();
    if !arts.is_empty() {
        section(p, "Artifacts");
        p.table("  ", &["STEP", "PATH", "MANIFEST SHA256"], arts);
    }
    section(p, "Timeline");
    p.table("  ", &["#", "AT", "+ELAPSED", "EVENT", "STEP", "DETAIL"], show_timeline(d));
}

/// A blank line and a section title.
fn section(p: &super::Printer, title: &str) {
    p.data("");
    p.data(p.bold(title));
}

/// The key/value header of `journal show`.
fn show_header(d: &RunDetail, now: i64) -> Vec<Vec<Cell>> {
    let r = &d.run;
    let mut plan = r.plan.clone();
    for (fmt, v) in
        [(" ({})", &r.mode), (" of sandbox {}", &r.sandbox), (" on gateway {}", &r.gateway)]
    {
        if let Some(v) = v {
            plan.push_str(&fmt.replace("{}", v));
        }
    }
    let time = match r.finished_at {
        Some(f) => {
            ("Finished", format!("{} after {}", when(f, now), human_duration(r.duration_ms)))
        }
        None => (
            "Updated",
            format!("{}, {} so far", when(r.updated_at, now), human_duration(r.duration_ms)),
        ),
    };
    let binary = format!("nemoclaw {}, plan {}", d.binary_version, short(&d.plan_fingerprint));
    let mut rows: Vec<Vec<Cell>> = vec![
        vec!["Run".into(), r.id.as_str().into()],
        vec!["Plan".into(), plan.into()],
        vec!["State".into(), Cell::styled(&r.state, style::state(&r.state))],
        vec!["Started".into(), when(r.created_at, now).into()],
        vec![time.0.into(), time.1.into()],
        vec!["By".into(), who(r).into()],
        vec!["Binary".into(), binary.into()],
    ];
    if let Some(e) = &r.error {
        rows.push(vec!["Error".into(), Cell::styled(e, style::BAD)]);
    }
    rows
}

/// The step rows of `journal show`, numbered from 1.
fn show_steps(d: &RunDetail) -> Vec<Vec<Cell>> {
    let t = |v: Option<i64>| v.map(iso_ms).unwrap_or_else(|| "-".to_owned());
    d.steps
        .iter()
        .map(|s| {
            vec![
                (s.seq + 1).to_string().into(),
                s.name.as_str().into(),
                Cell::styled(&s.state, style::state(&s.state)),
                s.attempt.to_string().into(),
                t(s.started_at).into(),
                t(s.finished_at).into(),
                s.duration_ms.map(human_duration).unwrap_or_else(|| "-".to_owned()).into(),
                t(s.compensated_at).into(),
                Cell::styled(s.error.as_deref().unwrap_or_default(), style::BAD),
            ]
        })
        .collect()
}

/// The event rows of `journal show`.
fn show_timeline(d: &RunDetail) -> Vec<Vec<Cell>> {
    d.events
        .iter()
        .map(|e| {
            let step = e
                .step_seq
                .and_then(|q| d.steps.iter().find(|s| s.seq == q))
                .map(|s| s.name.clone())
                .unwrap_or_default();
            vec![
                e.id.to_string().into(),
                iso_ms(e.at).into(),
                format!("+{}", human_duration(e.at - d.run.created_at)).into(),
                Cell::styled(&e.kind, style::event(&e.kind)),
                step.into(),
                event_detail(&e.kind, &e.data_json()).into(),
            ]
        })
        .collect()
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
    let mut out = ctx.printer.stream();
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
        ctx.printer.table("", &[], verify_rows(&rep));
    }
    if rep.ok {
        ctx.printer.success("✓ Journal verified");
        return Ok(Exit::Ok);
    }
    let p = &rep.problems[0];
    Err(Refusal::VerifyFailed {
        path: j.path().to_owned(),
        event: p.event_id,
        detail: p.detail.clone(),
    }
    .into())
}

/// Where a problem is: " at event 12 (run 019e…)".
fn place(p: &audit::Problem) -> String {
    format!(
        "{}{}",
        p.event_id.map(|e| format!(" at event {e}")).unwrap_or_default(),
        p.run_id.as_ref().map(|r| format!(" (run {r})")).unwrap_or_default()
    )
}

/// One line per check (`ok (...)` or `FAILED at ...`), further problems under them, the head
/// last: it is what an auditor copies and keeps outside the journal.
fn verify_rows(rep: &audit::VerifyReport) -> Vec<Vec<Cell>> {
    let first = |c: Check| rep.problems.iter().find(|p| p.check == c);
    let line = |name: &str, c: Check, ok: String| -> Vec<Cell> {
        let result = match first(c) {
            None => Cell::styled(ok, style::GOOD),
            Some(p) => Cell::styled(format!("FAILED{}: {}", place(p), p.detail), style::BAD),
        };
        vec![name.into(), result]
    };
    let anchor = rep.pruned_head_id.map(|k| format!(", anchored after pruned event {k}"));
    let legacy = match rep.legacy_runs {
        0 => String::new(),
        n => format!("; {n} run(s) from before schema 2: only their creation facts are covered"),
    };
    let mut rows = vec![
        line("integrity", Check::Integrity, "ok".into()),
        line(
            "chain",
            Check::Chain,
            format!("ok ({} events{})", rep.events_checked, anchor.unwrap_or_default()),
        ),
        line(
            "consistency",
            Check::Consistency,
            format!("ok ({} runs, {} steps)", rep.runs_checked, rep.steps_checked),
        ),
        line("rows", Check::Rows, format!("ok (every column matches its events{legacy})")),
    ];
    // Further consistency and row problems, under the first ones.
    let firsts: Vec<&audit::Problem> =
        [Check::Consistency, Check::Rows].into_iter().filter_map(first).collect();
    rows.extend(
        rep.problems
            .iter()
            .filter(|p| matches!(p.check, Check::Consistency | Check::Rows))
            .filter(|p| !firsts.iter().any(|f| std::ptr::eq(*f, *p)))
            .map(|p| vec!["".into(), format!("also{}: {}", place(p), p.detail).into()]),
    );
    if let Some(x) = &rep.expect_head {
        let ok = match (x.found_at, x.events_since) {
            (Some(at), Some(n)) => {
                format!("ok (the expected head is event {at}; {n} event(s) appended since)")
            }
            _ => "ok".to_owned(),
        };
        rows.push(line("anchor", Check::Anchor, ok));
    }
    rows.push(vec!["head".into(), format!("event {} {}", rep.head.id, rep.head.hash).into()]);
    rows
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
