//! Audit at scale: `journal list`, `journal show` and `journal verify` as whole processes on a
//! generated journal of 100,000 runs / 1,000,000 events, side by side with the same queries in
//! the `sqlite3` shell, plus verify throughput and max RSS at 100k vs 1M events.
//!
//! `cargo bench --bench audit` (release build). Knobs: `AUDIT_BENCH_RUNS` (default 100000; each
//! run has 10 events), `AUDIT_BENCH_REPS` (default 25), `AUDIT_BENCH_DIR` (where generated
//! journals are cached, default `target/audit-bench`). Prints a Markdown report on stdout.
//!
//! The generator is a bulk path (one transaction, `synchronous=OFF`) but writes exactly the
//! rows and events the engine writes — `run_created`, `step_started`/`step_done` with
//! `{name, from, attempt}`, `run_<to>` with `{from, to}` — with a valid hash chain, so
//! `journal verify` must pass on it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nemoclaw::journal::chain::{event_hash, EventFields, GENESIS};
use nemoclaw::journal::Journal;
use rusqlite::params;
use serde_json::json;

/// Bump when the generated shape changes, so cached journals are rebuilt.
const GEN_VERSION: u32 = 2;
const EVENTS_PER_RUN: usize = 10;
const T0: i64 = 1_780_308_000_000; // 2026-06-01T10:00:00Z
const STEPS: [&str; 4] = ["snapshot", "backup", "remove", "onboard"];

fn generate(home: &Path, runs: usize) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(home)?;
    let path = home.join("journal.sqlite3");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(home.join("journal.sqlite3-wal"));
    let _ = std::fs::remove_file(home.join("journal.sqlite3-shm"));
    // Create and migrate through the real store, then bulk-load on a raw connection.
    drop(Journal::open(&path)?);
    let mut conn = rusqlite::Connection::open(&path)?;
    conn.execute_batch("PRAGMA synchronous=OFF; PRAGMA cache_size=-200000;")?;
    let tx = conn.transaction()?;
    {
        let mut ins_run = tx.prepare(
            "INSERT INTO runs (id, lock_key, plan, plan_fingerprint, sandbox, gateway, mode, state,
                 params, binary_version, host, user, pid, argv, created_at, updated_at,
                 finished_at, error)
             VALUES (?1, ?2, 'rebuild', ?3, ?4, 'local', ?5, ?6, '{}', '0.1.0', 'bench-host',
                     'bench', ?7, ?8, ?9, ?10, ?11, ?12)",
        )?;
        let mut ins_step = tx.prepare(
            "INSERT INTO steps (run_id, seq, name, version, destructive, state, attempt, input,
                 output, error, started_at, finished_at)
             VALUES (?1, ?2, ?3, 1, ?4, ?5, ?6, NULL, ?7, ?8, ?9, ?10)",
        )?;
        let mut ins_ev = tx.prepare(
            "INSERT INTO events (id, run_id, step_seq, at, kind, data, prev_hash, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        let fp = "f".repeat(64);
        let mut prev = GENESIS.to_owned();
        let mut id = 0i64;
        let mut ev = |run: &str, seq: Option<i64>, at: i64, kind: &str, data: String| {
            id += 1;
            let hash = event_hash(
                &prev,
                &EventFields { id, run_id: Some(run), step_seq: seq, at, kind, data: &data },
            );
            let r = ins_ev.execute(params![id, run, seq, at, kind, data, prev, hash]);
            prev = hash;
            r.map(|_| ())
        };
        for i in 0..runs {
            let created = T0 + i as i64 * 60_000;
            // UUID v7 layout: 48-bit ms timestamp first, so ids sort by creation time.
            let run_id = format!(
                "{:08x}-{:04x}-7{:03x}-8{:03x}-{:012x}",
                (created >> 16) as u32,
                (created & 0xffff) as u16,
                (i >> 12) & 0xfff,
                i & 0xfff,
                i
            );
            let sandbox = format!("sb-{}", i % 500);
            let mode = if i % 10 == 0 { "stale" } else { "normal" };
            // Mostly succeeded; a few failed (a later resume would continue them).
            let failed = i % 97 == 0;
            let state = if failed { "failed" } else { "succeeded" };
            let end = created + 8 * 1_000 + 500;
            ins_run.execute(params![
                run_id,
                format!("local/{sandbox}"),
                fp,
                sandbox,
                mode,
                state,
                1000 + (i % 30000) as i64,
                json!(["nemoclaw", sandbox, "rebuild", "--yes"]).to_string(),
                created,
                end,
                (!failed).then_some(end),
                failed.then_some("boom"),
            ])?;
            // Row images as the engine records them (schema 2): the whole run and its pending
            // steps at creation, then each change's changeable columns.
            let pid = 1000 + (i % 30000) as i64;
            let step_rows: Vec<_> = STEPS
                .iter()
                .map(|name| {
                    json!({"name": name, "version": 1, "destructive": (*name == "remove") as i64,
                           "state": "pending", "attempt": 0, "input": null, "output": null,
                           "error": null, "started_at": null, "finished_at": null,
                           "compensated_at": null})
                })
                .collect();
            ev(
                &run_id,
                None,
                created,
                "run_created",
                json!({"lock": format!("local/{sandbox}"), "plan": "rebuild",
                       "plan_fingerprint": fp, "sandbox": sandbox, "gateway": "local",
                       "mode": mode, "steps": STEPS, "pid": pid, "host": "bench-host",
                       "row": {"lock_key": format!("local/{sandbox}"), "plan": "rebuild",
                               "plan_fingerprint": fp, "sandbox": sandbox, "gateway": "local",
                               "mode": mode, "state": "running", "params": {},
                               "binary_version": "0.1.0", "host": "bench-host", "user": "bench",
                               "pid": pid, "argv": ["nemoclaw", sandbox, "rebuild", "--yes"],
                               "created_at": created, "updated_at": created,
                               "finished_at": null, "error": null},
                       "step_rows": step_rows})
                .to_string(),
            )?;
            for (seq, name) in STEPS.iter().enumerate() {
                let t = created + 10 + seq as i64 * 2_000;
                let last_failed = failed && seq == STEPS.len() - 1;
                let output = (*name == "backup" && !last_failed).then(|| {
                    json!({"backup_path": format!("/bench/rebuild-backups/{sandbox}/{i}"),
                           "manifest_sha256": "ab".repeat(32)})
                    .to_string()
                });
                ins_step.execute(params![
                    run_id,
                    seq as i64,
                    name,
                    (*name == "remove") as i64,
                    if last_failed { "failed" } else { "done" },
                    1,
                    output.clone().or_else(|| (!last_failed).then(|| "{}".to_owned())),
                    last_failed.then_some("boom"),
                    t,
                    t + 1_500,
                ])?;
                let image = |state: &str, output: Option<&str>, error: Option<&str>, fin| {
                    let output: serde_json::Value =
                        output.map(|o| serde_json::from_str(o).unwrap()).unwrap_or_default();
                    json!({"state": state, "attempt": 1, "input": null, "output": output,
                           "error": error, "started_at": t, "finished_at": fin,
                           "compensated_at": null})
                };
                ev(
                    &run_id,
                    Some(seq as i64),
                    t,
                    "step_started",
                    json!({"name": name, "from": "pending", "attempt": 1,
                           "row": image("started", None, None, None)})
                    .to_string(),
                )?;
                if last_failed {
                    ev(
                        &run_id,
                        Some(seq as i64),
                        t + 1_500,
                        "step_failed",
                        json!({"name": name, "from": "started", "error": "boom",
                               "row": image("failed", None, Some("boom"), Some(t + 1_500))})
                        .to_string(),
                    )?;
                } else {
                    let out = output.clone().unwrap_or_else(|| "{}".to_owned());
                    ev(
                        &run_id,
                        Some(seq as i64),
                        t + 1_500,
                        "step_done",
                        json!({"name": name, "from": "started",
                               "row": image("done", Some(&out), None, Some(t + 1_500))})
                        .to_string(),
                    )?;
                }
            }
            let mut d = json!({"from": "running", "to": state});
            if failed {
                d["error"] = json!("boom");
            }
            d["row"] = json!({"state": state, "updated_at": end,
                              "finished_at": (!failed).then_some(end),
                              "error": failed.then_some("boom")});
            ev(&run_id, None, end, &format!("run_{state}"), d.to_string())?;
        }
        assert_eq!(id as usize, runs * EVENTS_PER_RUN);
    }
    tx.commit()?;
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); ANALYZE;")?;
    Ok(())
}

/// A generated journal for `runs` runs, cached between bench runs.
fn journal_home(base: &Path, runs: usize) -> PathBuf {
    let home = base.join(format!("home-{runs}-v{GEN_VERSION}"));
    let done = home.join(".complete");
    if !done.exists() {
        let t = Instant::now();
        eprintln!(
            "generating {runs} runs / {} events in {}",
            runs * EVENTS_PER_RUN,
            home.display()
        );
        generate(&home, runs).expect("generate journal");
        std::fs::write(&done, b"").expect("marker");
        eprintln!("generated in {:.1}s", t.elapsed().as_secs_f64());
    }
    home
}

struct Sample {
    wall: Duration,
    max_rss_kb: i64,
    ok: bool,
}

/// Spawn `cmd`, wait for it with wait4 to get its own rusage (max RSS of that child alone).
fn measure(cmd: &mut Command) -> Sample {
    let t = Instant::now();
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, not yet reaped; status and ru are valid out-pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = t.elapsed();
    assert_eq!(r, pid, "wait4");
    std::mem::forget(child); // already reaped
    Sample {
        wall,
        max_rss_kb: ru.ru_maxrss,
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
    }
}

fn median(cmd: impl Fn() -> Command, reps: usize) -> (Duration, i64) {
    let _ = measure(&mut cmd()); // warm the page cache
    let mut v: Vec<Sample> = (0..reps).map(|_| measure(&mut cmd())).collect();
    assert!(v.iter().all(|s| s.ok), "a measured command failed");
    v.sort_by_key(|s| s.wall);
    let rss = v.iter().map(|s| s.max_rss_kb).max().unwrap_or(0);
    (v[v.len() / 2].wall, rss)
}

/// Max RSS (KiB) of one run of `program args`, measured by `/usr/bin/time -f %M`. Not wait4 on
/// our own child: Linux carries a parent's RSS high-water mark into a forked child across exec,
/// and this bench process is large after generating the journal.
fn max_rss_kb(program: &Path, args: &[&std::ffi::OsStr]) -> i64 {
    let out = std::env::temp_dir().join(format!("audit-bench-rss-{}", std::process::id()));
    let st = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&out)
        .arg(program)
        .args(args)
        .env_clear()
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("/usr/bin/time");
    assert!(st.success(), "measured command failed");
    let kb = std::fs::read_to_string(&out).unwrap_or_default().trim().parse().unwrap_or(-1);
    let _ = std::fs::remove_file(&out);
    kb
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let runs: usize =
        std::env::var("AUDIT_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let reps: usize =
        std::env::var("AUDIT_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(25);
    let base = std::env::var_os("AUDIT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/audit-bench"));
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_nemoclaw"));
    let sqlite3 = PathBuf::from("/usr/bin/sqlite3");
    let small_runs = (runs / 10).max(1);
    let home = journal_home(&base, runs);
    let small = journal_home(&base, small_runs);
    let db = home.join("journal.sqlite3");

    let nc = |home: &Path, args: &[&str]| {
        let mut c = Command::new(&bin);
        c.env_clear().env("NO_COLOR", "1").arg("--home").arg(home).args(args);
        c
    };
    let sq = |sql: &str| {
        let mut c = Command::new(&sqlite3);
        c.arg("-readonly").arg(&db).arg(sql);
        c
    };
    // The run to show: one in the middle of the journal.
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open");
    let mid: String = conn
        .query_row("SELECT id FROM runs ORDER BY created_at LIMIT 1 OFFSET ?1", [runs / 2], |r| {
            r.get(0)
        })
        .expect("mid run");
    let events: i64 =
        conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0)).expect("count");
    drop(conn);

    let list_sql = "SELECT r.id, r.sandbox, r.gateway, r.mode, r.state, r.created_at, r.updated_at, \
        r.finished_at, r.user, r.host, r.pid, r.argv, (SELECT s.name FROM steps s WHERE s.run_id = r.id \
        AND s.state <> 'pending' ORDER BY coalesce(s.finished_at, s.started_at) DESC LIMIT 1) \
        FROM runs r ORDER BY r.created_at DESC, r.id DESC LIMIT 50;";
    let show_sql = format!(
        "SELECT * FROM runs WHERE id = '{mid}'; SELECT * FROM steps WHERE run_id = '{mid}' ORDER BY seq; \
         SELECT * FROM events WHERE run_id = '{mid}' ORDER BY id;"
    );

    let (list_nc, _) = median(|| nc(&home, &["journal", "list", "--limit", "50"]), reps);
    let (list_sq, _) = median(|| sq(list_sql), reps);
    let (list_json, _) =
        median(|| nc(&home, &["--json", "journal", "list", "--limit", "50"]), reps);
    let (show_nc, _) = median(|| nc(&home, &["journal", "show", &mid]), reps);
    let (show_pfx, _) = median(|| nc(&home, &["journal", "show", &mid[..13]]), reps);
    let (show_sq, _) = median(|| sq(&show_sql), reps);
    let (sb_nc, _) =
        median(|| nc(&home, &["journal", "list", "--sandbox", "sb-7", "--limit", "50"]), reps);

    let vreps = 3;
    let (verify_big, _) = median(|| nc(&home, &["journal", "verify"]), vreps);
    let (verify_small, _) = median(|| nc(&small, &["journal", "verify"]), vreps);
    let (export_big, _) = median(|| nc(&home, &["journal", "export"]), vreps);
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    let rss = |h: &Path, cmd: &'static str| {
        max_rss_kb(&bin, &[os("--home"), h.as_os_str(), os("journal"), os(cmd)])
    };
    let (rss_big, rss_small, rss_export) =
        (rss(&home, "verify"), rss(&small, "verify"), rss(&home, "export"));
    let rss_list = rss(&home, "list");

    let r = |a: Duration, b: Duration| ms(a) / ms(b);
    println!("## audit benchmark\n");
    println!("Journal: {runs} runs / {events} events ({:.0} MiB); {reps} repetitions, median wall time of the whole process.\n",
        std::fs::metadata(&db).map(|m| m.len() as f64 / 1048576.0).unwrap_or(0.0));
    println!("| command | nemoclaw | sqlite3 shell | ratio |");
    println!("|---|---:|---:|---:|");
    println!(
        "| `journal list --limit 50` | {:.1} ms | {:.1} ms | {:.2}× |",
        ms(list_nc),
        ms(list_sq),
        r(list_nc, list_sq)
    );
    println!(
        "| `journal list --limit 50 --json` | {:.1} ms | {:.1} ms | {:.2}× |",
        ms(list_json),
        ms(list_sq),
        r(list_json, list_sq)
    );
    println!("| `journal list --sandbox sb-7 --limit 50` | {:.1} ms | | |", ms(sb_nc));
    println!(
        "| `journal show <full id>` | {:.1} ms | {:.1} ms | {:.2}× |",
        ms(show_nc),
        ms(show_sq),
        r(show_nc, show_sq)
    );
    println!(
        "| `journal show <13-char prefix>` | {:.1} ms | {:.1} ms | {:.2}× |",
        ms(show_pfx),
        ms(show_sq),
        r(show_pfx, show_sq)
    );
    println!();
    println!("| command | events | wall | events/s | max RSS |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| `journal verify` | {} | {:.2} s | {:.0} | {} KiB |",
        small_runs * EVENTS_PER_RUN,
        verify_small.as_secs_f64(),
        (small_runs * EVENTS_PER_RUN) as f64 / verify_small.as_secs_f64(),
        rss_small
    );
    println!(
        "| `journal verify` | {} | {:.2} s | {:.0} | {} KiB |",
        events,
        verify_big.as_secs_f64(),
        events as f64 / verify_big.as_secs_f64(),
        rss_big
    );
    println!(
        "| `journal export` | {} | {:.2} s | {:.0} | {} KiB |",
        events,
        export_big.as_secs_f64(),
        events as f64 / export_big.as_secs_f64(),
        rss_export
    );
    println!(
        "\nmax RSS (KiB, /usr/bin/time): verify {} events {rss_small}, verify {events} events {rss_big} \
         (ratio {:.2}); export {rss_export}; list {rss_list}",
        small_runs * EVENTS_PER_RUN,
        rss_big as f64 / rss_small.max(1) as f64
    );
}
