//! The `rows` check of `journal verify`: replay the row images the (hash-chained) events
//! recorded and compare every stored column of a run and its steps with them, so an edit of any
//! column is found and named, with the event that recorded the value it should hold.

use std::borrow::Cow;

use serde_json::value::RawValue;
use serde_json::Value;

use super::show::EventRecord;
use super::verify::{RunRow, StepRow};
use crate::journal::runs::{RUN_IMAGE_COLUMNS, STEP_IMAGE_COLUMNS};

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
pub(super) fn check_rows(
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
