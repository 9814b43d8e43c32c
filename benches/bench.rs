//! nemoclaw benchmarks (`cargo bench --bench bench [-- SECTION...]`). Not timed tests: they print
//! numbers for docs/benchmarks.md. Sections: `engine` (journal commits and time per step
//! transition against a bare SQLite insert+commit under the same settings).

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nemoclaw::engine::{self, LockDir, Observer, Plan, Probe, RunSpec, Step, StepCtx, StepError};
use nemoclaw::journal::{commit_count, Journal};
use serde_json::{json, Value};

fn main() {
    // `cargo bench` passes `--bench`; anything else not starting with `-` is a section filter.
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wanted =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    if wanted("engine") {
        engine_bench();
    }
}

/// A step whose effect is nothing: what is measured is the journal's write-ahead protocol.
struct Noop(&'static str);

impl Step for Noop {
    fn name(&self) -> &'static str {
        self.0
    }
    fn probe(&self, _: &StepCtx<'_>) -> Result<Probe, StepError> {
        Ok(Probe::NotDone)
    }
    fn apply(&self, ctx: &StepCtx<'_>) -> Result<Value, StepError> {
        Ok(json!({ "seq": ctx.seq }))
    }
    fn compensate(&self, _: &StepCtx<'_>, _: Option<&Value>) -> Result<(), StepError> {
        Ok(())
    }
}

/// Records (time, process commit count) each time a step starts, i.e. right after its intent
/// commit. Between two consecutive starts lie exactly one effect and one commit (the outcome of
/// one step with the intent of the next).
#[derive(Default)]
struct Clock(Mutex<Vec<(Instant, u64)>>);

impl Observer for Clock {
    fn step_started(&self, _: usize, _: &str, _: bool) {
        self.0.lock().expect("clock").push((Instant::now(), commit_count()));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn engine_round(dir: &Path, steps: usize, round: usize) -> (Vec<Duration>, Vec<u64>) {
    let home = dir.join(format!("engine-{round}"));
    let mut journal = Journal::open_home(&home).expect("open journal");
    let locks = LockDir::new(&home);
    let names: &'static [&'static str] = Box::leak(
        (0..steps)
            .map(|i| &*Box::leak(format!("s{i}").into_boxed_str()))
            .collect::<Vec<&'static str>>()
            .into_boxed_slice(),
    );
    let plan = Plan {
        name: "bench".into(),
        steps: names.iter().map(|n| Box::new(Noop(n)) as Box<dyn Step>).collect(),
    };
    let clock = Clock::default();
    let spec = RunSpec { lock_key: "bench".into(), params: json!({}), ..RunSpec::default() };
    let r = engine::start(&mut journal, &locks, &plan, spec, &clock).expect("run");
    assert_eq!(r.state.as_str(), "succeeded");
    let marks = clock.0.into_inner().expect("clock");
    let times = marks.windows(2).map(|w| w[1].0 - w[0].0).collect();
    let commits = marks.windows(2).map(|w| w[1].1 - w[0].1).collect();
    (times, commits)
}

fn bare_round(dir: &Path, n: usize, round: usize) -> Vec<Duration> {
    let c = rusqlite::Connection::open(dir.join(format!("bare-{round}.sqlite3"))).expect("open");
    let _: String = c.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).expect("wal");
    c.execute_batch(
        "PRAGMA synchronous=FULL;
         CREATE TABLE t (id INTEGER PRIMARY KEY, at INTEGER NOT NULL, data TEXT NOT NULL);",
    )
    .expect("setup");
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        c.execute_batch("BEGIN IMMEDIATE").expect("begin");
        c.prepare_cached("INSERT INTO t (at, data) VALUES (?1, ?2)")
            .and_then(|mut st| st.execute(rusqlite::params![i as i64, "{}"]))
            .expect("insert");
        c.execute_batch("COMMIT").expect("commit");
        out.push(t.elapsed());
    }
    out
}

fn engine_bench() {
    let base = std::env::var_os("NEMOCLAW_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir =
        tempfile::Builder::new().prefix("nemoclaw-bench-").tempdir_in(&base).expect("tempdir");
    let (rounds, steps) = (8, 100);
    let (mut eng, mut bare, mut commits) = (Vec::new(), Vec::new(), Vec::new());
    // Interleave the two so that both see the same disk conditions.
    for round in 0..rounds {
        bare.extend(bare_round(dir.path(), steps, round));
        let (t, c) = engine_round(dir.path(), steps, round);
        eng.extend(t);
        commits.extend(c);
    }
    eng.sort();
    bare.sort();
    let (min_c, max_c) = (commits.iter().min().copied(), commits.iter().max().copied());
    let (em, ep) = (percentile(&eng, 0.5), percentile(&eng, 0.95));
    let (bm, bp) = (percentile(&bare, 0.5), percentile(&bare, 0.95));
    println!(
        "engine: {} step transitions, {} bare commits, dir {}",
        eng.len(),
        bare.len(),
        base.display()
    );
    println!("commits per step transition: min {min_c:?} max {max_c:?}");
    println!("| measure | median | p95 |");
    println!("|---|---|---|");
    println!("| engine step transition (outcome + next intent) | {em:.2?} | {ep:.2?} |");
    println!("| bare SQLite insert + commit | {bm:.2?} | {bp:.2?} |");
    println!(
        "| ratio | {:.2}x | {:.2}x |",
        em.as_secs_f64() / bm.as_secs_f64(),
        ep.as_secs_f64() / bp.as_secs_f64()
    );
}
