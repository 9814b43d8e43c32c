//! Rebuild benchmark (`cargo bench --bench rebuild`, release build).
//!
//! 1. A sandbox with a 256 MiB / 5,000-file state tree on the local gateway: time of
//!    `nemoclaw <name> rebuild --yes` side by side, in the same run, with `cp -a` of the same
//!    tree twice (what a backup plus a restore copy at the least), and with `cp -a` twice
//!    followed by `sync` (the same copies made durable, as the rebuild makes its copies).
//!    Alternating rounds; medians and ratios.
//! 2. Eight sandboxes rebuilt at once by eight separate processes sharing one journal: all must
//!    succeed, with no "database is locked".
//!
//! 3. (`sparse`) The same comparison for a sandbox holding one 1 GiB sparse file (2 MiB of
//!    data), with the disk space the backup and the restored file take.
//!
//! Each rebuild also reports the bytes its process read (`rchar` of `/proc/<pid>/io`, taken
//! after it exited and before it was reaped) per byte of state data.
//!
//! Knobs: `REBUILD_BENCH_MB` (256), `REBUILD_BENCH_FILES` (5000), `REBUILD_BENCH_ROUNDS` (3),
//! `REBUILD_BENCH_SPARSE_MB` (1024).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nemoclaw::gateway::local::LocalGateway;
use nemoclaw::gateway::{CreateSpec, Gateway};
use nemoclaw::host::registry;
use nemoclaw::names::SandboxName;
use serde_json::json;

fn env_num(k: &str, d: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn name(s: &str) -> SandboxName {
    SandboxName::parse(s).unwrap()
}

/// Register and create `n` on the local gateway of `home`; fill its state with `files` files
/// totalling `bytes`. Returns the state directory.
fn make_sandbox(home: &Path, n: &str, files: usize, bytes: usize) -> PathBuf {
    let gw = LocalGateway::open(home).unwrap();
    gw.create(&CreateSpec {
        name: name(n),
        image: "openshell/sandbox-from:1".into(),
        labels: Default::default(),
        agent: None,
        gpu: false,
        policy: None,
        providers: Vec::new(),
    })
    .unwrap();
    registry::update(home, |reg| {
        reg.set_entry(
            &name(n),
            json!({"name": n, "gatewayName": "local", "policies": [], "imageTag": "openshell/sandbox-from:1"}),
        );
        Ok(())
    })
    .unwrap();
    let state = gw.state_dir(&name(n));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let per = bytes / files.max(1);
    let mut buf = vec![0u8; per * 2];
    for i in 0..files {
        let dir = state.join(format!("workspace/d{:02}", i % 50));
        std::fs::create_dir_all(&dir).unwrap();
        // Sizes vary between 0.5× and 1.5× the mean; content is pseudo-random (incompressible).
        let len = per / 2 + (i * 7919) % per.max(1);
        for b in buf[..len].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = x.to_le_bytes();
            b.copy_from_slice(&bytes[..b.len()]);
        }
        std::fs::write(dir.join(format!("f{i:05}.bin")), &buf[..len]).unwrap();
    }
    state
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_nemoclaw")
}

fn nemoclaw(home: &Path) -> Command {
    let mut c = Command::new(bin());
    c.arg("--home").arg(home).env("NO_COLOR", "1").env_remove("NEMOCLAW_OPENSHELL");
    c
}

/// Max RSS (KiB) of a command, from /usr/bin/time when present.
fn max_rss_kib(home: &Path, args: &[&str]) -> Option<u64> {
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg(bin())
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stderr).lines().last()?.trim().parse().ok()
}

/// Run `c` to completion; returns its output and the bytes it read (`rchar`), read from
/// `/proc/<pid>/io` after it exited and before it is reaped (`waitid(WNOWAIT)`).
fn run_counting_reads(mut c: Command) -> (std::process::Output, Option<u64>) {
    let child = c
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // SAFETY: an all-zero siginfo is a valid out-parameter; WNOWAIT leaves the child unreaped.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
    let rchar = (r == 0)
        .then(|| std::fs::read_to_string(format!("/proc/{pid}/io")).ok())
        .flatten()
        .and_then(|io| {
            io.lines().find_map(|l| l.strip_prefix("rchar: ")).and_then(|v| v.trim().parse().ok())
        });
    (child.wait_with_output().unwrap(), rchar)
}

/// Disk space a path takes (allocated blocks), in bytes.
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn single(mb: usize, files: usize, rounds: usize) {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let state = make_sandbox(&home, "big", files, mb << 20);
    compare(&home, &state, rounds, &format!("{mb} MiB / {files}-file"), (mb as u64) << 20);
}

fn sparse(sparse_mb: u64, rounds: usize) {
    use std::io::{Seek, SeekFrom, Write};
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let state = make_sandbox(&home, "big", 10, 64 << 10);
    let p = state.join("memory/vectors.bin");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let mut f = std::fs::File::create(&p).unwrap();
    let mb = vec![0x5Au8; 1 << 20];
    f.write_all(&mb).unwrap();
    f.seek(SeekFrom::Start((sparse_mb << 20) - (1 << 20))).unwrap();
    f.write_all(&mb).unwrap();
    drop(f);
    let data = (2u64 << 20) + (64 << 10);
    let source_alloc = allocated(&p);
    compare(&home, &state, rounds, &format!("{sparse_mb} MiB sparse file (2 MiB of data)"), data);
    let backups = home.join("rebuild-backups/big");
    let last = std::fs::read_dir(&backups).unwrap().map(|e| e.unwrap().path()).max().unwrap();
    println!(
        "Disk space of the sparse file: source {} KiB, backup {} KiB, restored {} KiB (apparent size {} MiB).",
        source_alloc / 1024,
        allocated(&last.join("memory/vectors.bin")) / 1024,
        allocated(&p) / 1024,
        sparse_mb
    );
    println!();
}

/// Rebuild `big` side by side with `cp -a` ×2 (and + `sync`) of its state, `rounds` times.
fn compare(home: &Path, state: &Path, rounds: usize, what: &str, data_bytes: u64) {
    let t = tempfile::tempdir_in(home.parent().unwrap()).unwrap();
    let scratch = t.path().join("scratch");
    let (mut ours, mut cp2, mut cp2sync, mut reads) = (vec![], vec![], vec![], vec![]);
    let cp = |from: &Path, to: &Path| {
        let st = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
        assert!(st.success());
    };
    for round in 0..rounds {
        // cp -a twice: state → backup, backup → restored.
        for with_sync in [false, true] {
            let _ = std::fs::remove_dir_all(&scratch);
            std::fs::create_dir_all(&scratch).unwrap();
            let t0 = Instant::now();
            cp(state, &scratch.join("backup"));
            cp(&scratch.join("backup"), &scratch.join("restored"));
            if with_sync {
                assert!(Command::new("sync").status().unwrap().success());
                cp2sync.push(t0.elapsed());
            } else {
                cp2.push(t0.elapsed());
            }
        }
        let _ = std::fs::remove_dir_all(&scratch);
        let _ = std::fs::remove_dir_all(home.join("rebuild-backups"));
        let mut c = nemoclaw(home);
        c.args(["big", "rebuild", "--yes"]);
        let t0 = Instant::now();
        let (o, rchar) = run_counting_reads(c);
        let el = t0.elapsed();
        assert!(o.status.success(), "rebuild failed: {}", String::from_utf8_lossy(&o.stderr));
        ours.push(el);
        if let Some(r) = rchar {
            reads.push(r as f64 / data_bytes as f64);
        }
        eprintln!(
            "round {round}: rebuild {:.2}s, cp -a ×2 {:.2}s, cp -a ×2 + sync {:.2}s, reads {:.2} per byte",
            el.as_secs_f64(),
            cp2.last().unwrap().as_secs_f64(),
            cp2sync.last().unwrap().as_secs_f64(),
            reads.last().copied().unwrap_or(f64::NAN)
        );
    }
    let rss = max_rss_kib(home, &["big", "rebuild", "--yes"]);
    let (o, c, cs) = (median(&mut ours), median(&mut cp2), median(&mut cp2sync));
    reads.sort_by(f64::total_cmp);
    println!("## Rebuild of a {what} sandbox (local gateway), {rounds} rounds");
    println!();
    println!("| what | median | ratio to rebuild |");
    println!("|---|---:|---:|");
    println!("| `nemoclaw big rebuild --yes` | {:.2} s | 1.00× |", o.as_secs_f64());
    println!(
        "| `cp -a` ×2 (no sync) | {:.2} s | rebuild is {:.2}× |",
        c.as_secs_f64(),
        o.as_secs_f64() / c.as_secs_f64()
    );
    println!(
        "| `cp -a` ×2 + `sync` | {:.2} s | rebuild is {:.2}× |",
        cs.as_secs_f64(),
        o.as_secs_f64() / cs.as_secs_f64()
    );
    if let Some(r) = reads.get(reads.len() / 2) {
        println!();
        println!("Bytes read by the rebuild process per byte of state data (median): {r:.2}.");
    }
    if let Some(k) = rss {
        println!();
        println!("Max RSS of one rebuild: {} MiB.", k / 1024);
    }
    println!();
}

fn concurrent(n: usize, files: usize) {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    for i in 0..n {
        make_sandbox(&home, &format!("sb{i}"), files, (files * 8) << 10);
    }
    let t0 = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|i| {
            nemoclaw(&home)
                .args([&format!("sb{i}"), "rebuild", "--yes"])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ok = 0;
    let mut locked = 0;
    for c in children {
        let o = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        if err.contains("database is locked") || err.contains("busy") {
            locked += 1;
        }
        if o.status.success() {
            ok += 1;
        } else {
            eprintln!("a concurrent rebuild failed: {err}");
        }
    }
    let el = t0.elapsed();
    let j = nemoclaw::journal::Journal::open_home(&home).unwrap();
    let succeeded: i64 = j
        .conn()
        .query_row("SELECT count(*) FROM runs WHERE state='succeeded'", [], |r| r.get(0))
        .unwrap();
    let chain = nemoclaw::journal::events::verify_chain(j.conn()).map_err(|b| format!("{b:?}"));
    println!("## {n} sandboxes rebuilt concurrently by {n} processes ({files} files each)");
    println!();
    println!(
        "{ok}/{n} exited 0, {succeeded} runs `succeeded` in the journal, {locked} \"database is locked\"/busy messages, hash chain {}, wall time {:.2} s.",
        match &chain {
            Ok(e) => format!("valid over {e} events"),
            Err(b) => format!("BROKEN: {b}"),
        },
        el.as_secs_f64()
    );
    println!();
    assert_eq!(ok, n, "every concurrent rebuild must succeed");
    assert_eq!(locked, 0);
    assert!(chain.is_ok());
}

fn main() {
    // `cargo bench` passes `--bench`; a filter word picks one part.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let want = |part: &str| args.is_empty() || args.iter().any(|a| part.contains(a.as_str()));
    if want("single") {
        single(
            env_num("REBUILD_BENCH_MB", 256),
            env_num("REBUILD_BENCH_FILES", 5000),
            env_num("REBUILD_BENCH_ROUNDS", 3),
        );
    }
    if want("sparse") {
        sparse(env_num("REBUILD_BENCH_SPARSE_MB", 1024) as u64, env_num("REBUILD_BENCH_ROUNDS", 3));
    }
    if want("concurrent") {
        concurrent(8, 200);
    }
}
