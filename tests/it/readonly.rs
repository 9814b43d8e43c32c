//! Reading a journal that cannot, or must not, be written: a copy on read-only storage (a
//! forensic copy, a read-only mount) and a journal a killed process left mid-write (a hot
//! rollback journal beside it).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use nemoclaw::engine::{self, LockDir, RunSpec};
use nemoclaw::journal::Journal;

use crate::audit::{fail, json_out, plan, rebuild};
use crate::common::{killed, need_sqlite3, sqlite, sqlite3_cmd, stderr, stdout, Home};

/// Every file in `dir` with its size and digest: "untouched" means this is equal before and
/// after.
fn snapshot(dir: &Path) -> Vec<(String, u64, String)> {
    let mut v: Vec<(String, u64, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, bytes.len() as u64, nemoclaw::util::sha256_hex(&bytes))
        })
        .collect();
    v.sort();
    v
}

fn names(s: &[(String, u64, String)]) -> Vec<&str> {
    s.iter().map(|(n, _, _)| n.as_str()).collect()
}

/// `dir` made read-only for this process, undone on drop. Root ignores permission bits, so as
/// root the directory is bind-mounted read-only (EROFS, like read-only media), or, where
/// mounting is not allowed, made immutable (`chattr +i`); otherwise the modes are removed.
struct ReadOnly {
    view: PathBuf,
    undo: Vec<Vec<String>>,
    _mnt: Option<tempfile::TempDir>,
}

impl ReadOnly {
    fn new(dir: &Path) -> Self {
        // SAFETY: getuid has no arguments.
        let root = unsafe { libc::getuid() } == 0;
        let run = |args: &[&str]| {
            Command::new(args[0])
                .args(&args[1..])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        let d = dir.to_str().unwrap().to_owned();
        if root {
            let mnt = tempfile::Builder::new().prefix("nemoclaw-ro-").tempdir().unwrap();
            let m = mnt.path().to_str().unwrap().to_owned();
            if run(&["mount", "--bind", "-o", "ro", &d, &m]) {
                let ro = Self {
                    view: mnt.path().into(),
                    undo: vec![vec!["umount".into(), m]],
                    _mnt: Some(mnt),
                };
                assert!(
                    std::fs::write(ro.view.join("probe"), b"").is_err(),
                    "the mount is writable"
                );
                return ro;
            }
            let mut files: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path().to_str().unwrap().to_owned())
                .collect();
            files.push(d.clone());
            let mut args = vec!["chattr", "+i"];
            args.extend(files.iter().map(String::as_str));
            assert!(run(&args), "as root, neither `mount --bind -o ro` nor `chattr +i` works here");
            let mut undo = vec!["chattr".to_owned(), "-i".to_owned()];
            undo.extend(files);
            let ro = Self { view: dir.into(), undo: vec![undo], _mnt: None };
            assert!(std::fs::write(ro.view.join("probe"), b"").is_err(), "chattr +i did not hold");
            return ro;
        }
        let mut undo = vec![vec!["chmod".into(), "0700".into(), d.clone()]];
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path().to_str().unwrap().to_owned();
            assert!(run(&["chmod", "0444", &p]));
            undo.push(vec!["chmod".into(), "0600".into(), p]);
        }
        assert!(run(&["chmod", "0555", &d]));
        Self { view: dir.into(), undo, _mnt: None }
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        for u in &self.undo {
            let _ = Command::new(&u[0]).args(&u[1..]).status();
        }
    }
}

/// A home whose only content is a copy of `src`'s journal file, as a forensic copy would be.
fn copy_journal(src: &Path) -> Home {
    let h = Home::new();
    std::fs::copy(src.join("journal.sqlite3"), h.path().join("journal.sqlite3")).unwrap();
    h
}

fn home_at(p: &Path) -> Home {
    // A Home whose directory is `p` (not removed: the TempDir is leaked into a path we own).
    let h = Home::new();
    let _ = std::fs::remove_dir(h.path());
    std::os::unix::fs::symlink(p, h.path()).unwrap();
    h
}

/// The document without what depends on the clock (`now`, ages).
fn without_now(mut v: Value) -> Value {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("now");
                m.remove("age_ms");
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

#[test]
fn read_commands_work_on_a_read_only_copy_and_leave_it_untouched() {
    let h = Home::new();
    let ok = rebuild(h.path(), "alpha", false, json!({}));
    fail(h.path(), "onboard", true);
    let failed = rebuild(h.path(), "beta", true, json!({}));
    // What the writable journal answers, to compare with the read-only copy.
    let want: Vec<Value> =
        [&["journal", "list"][..], &["journal", "show", &ok], &["journal", "verify"], &["recover"]]
            .iter()
            .map(|a| without_now(json_out(&h, a)))
            .collect();
    let want_export = stdout(&h.run(&["journal", "export"]));
    let copy = copy_journal(h.path());
    let before = snapshot(copy.path());
    assert_eq!(names(&before), ["journal.sqlite3"], "a cleanly closed journal has no side files");

    let ro = ReadOnly::new(copy.path());
    let view = home_at(&ro.view);
    for (args, want) in
        [&["journal", "list"][..], &["journal", "show", &ok], &["journal", "verify"], &["recover"]]
            .iter()
            .zip(&want)
    {
        let o = view.cmd().arg("--json").args(*args).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        let got = without_now(serde_json::from_slice(&o.stdout).unwrap());
        assert_eq!(&got, want, "{args:?} answers differently on the read-only copy");
    }
    let o = view.run(&["journal", "export"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), want_export);
    let o = view.run(&["recover"]);
    assert!(stderr(&o).contains(&failed), "the unfinished run is listed: {}", stderr(&o));
    // It really is read-only: a command that writes the journal gets the I/O error.
    let o = view.run(&["internal", "synthetic", "run", "--steps", "1"]);
    assert_eq!(o.status.code(), Some(74), "{}", stderr(&o));
    assert!(stderr(&o).contains("read-only"), "{}", stderr(&o));
    drop(view);
    drop(ro);
    assert_eq!(snapshot(copy.path()), before, "the read-only copy was changed");
}

/// Leave `<home>/journal.sqlite3` as a process killed while creating the journal does: the
/// schema half-written into the main file and the original (empty) pages in a hot
/// `-journal`. The `sqlite3` shell runs the migration and is killed with SIGKILL before it
/// commits; a small page cache makes it spill the transaction into the file first.
fn killed_while_creating(home: &Path) {
    let db = home.join("journal.sqlite3");
    std::fs::write(&db, b"").unwrap();
    let script = format!(
        "PRAGMA cache_size=1;\nBEGIN IMMEDIATE;\n{}\nPRAGMA user_version=1;\n\
         CREATE TABLE spill(x);\nINSERT INTO spill SELECT randomblob(2000) FROM generate_series(1, 300);\n\
         .system kill -9 $PPID\n",
        include_str!("../../journal-schema/0001_init.sql")
    );
    let mut c = sqlite3_cmd()
        .arg(&db)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("sqlite3 shell");
    use std::io::Write;
    c.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let st = c.wait().unwrap();
    assert!(killed(&st), "the shell was to be killed mid-transaction");
    let side = home.join("journal.sqlite3-journal");
    assert!(std::fs::metadata(&side).map(|m| m.len() > 0).unwrap_or(false), "no hot journal");
}

#[test]
fn a_hot_journal_is_reported_as_such_and_recover_rolls_it_back() {
    need_sqlite3!();
    let h = Home::new();
    killed_while_creating(h.path());
    let before = snapshot(h.path());
    for args in [&["journal", "list"][..], &["journal", "verify"], &["journal", "export"]] {
        let o = h.run(args);
        assert_eq!(o.status.code(), Some(74), "{args:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains("left mid-write by a process that stopped"), "{args:?}: {e}");
        assert!(e.contains("journal.sqlite3-journal"), "{args:?}: {e}");
        assert!(!e.contains("read-only ("), "{args:?} blames permissions: {e}");
        assert!(e.contains("hint: `nemoclaw recover` rolls the unfinished write back"), "{e}");
        assert_eq!(snapshot(h.path()), before, "{args:?} changed the files");
    }
    // On read-only storage the same journal cannot be rolled back: said so, nothing changed.
    {
        let ro = ReadOnly::new(h.path());
        let view = home_at(&ro.view);
        for args in [&["journal", "list"][..], &["recover"]] {
            let o = view.run(args);
            assert_eq!(o.status.code(), Some(74), "{args:?}: {}", stderr(&o));
            let e = stderr(&o);
            assert!(
                e.contains("left mid-write") && e.contains("its directory is read-only"),
                "{e}"
            );
            assert!(e.contains("to writable storage"), "{e}");
        }
    }
    assert_eq!(snapshot(h.path()), before);
    // `recover` rolls it back: the creation never committed, so there is no journal content.
    let o = h.run(&["recover"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("No unfinished runs"), "{}", stderr(&o));
    assert!(!h.path().join("journal.sqlite3-journal").exists());
    assert_eq!(std::fs::metadata(h.path().join("journal.sqlite3")).unwrap().len(), 0);
    let o = h.run(&["journal", "list"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("No runs"), "{}", stderr(&o));
}

#[test]
fn a_write_command_recovers_a_journal_killed_while_being_created() {
    need_sqlite3!();
    let h = Home::new();
    killed_while_creating(h.path());
    let o = h.run(&["internal", "synthetic", "run", "--steps", "2"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!h.path().join("journal.sqlite3-journal").exists());
    let v = json_out(&h, &["journal", "verify"]);
    assert_eq!(v["data"]["ok"], true, "{v}");
    assert_eq!(v["data"]["runs_checked"], 1);
    let spill = sqlite(h.path(), "SELECT count(*) FROM sqlite_master WHERE name = 'spill'");
    assert_eq!(spill, "0", "the torn write was kept");
}

/// A copy taken while a writer had commits only in the `-wal` (not yet checkpointed into the
/// main file), without the `-shm`: on writable storage SQLite rebuilds the index and reads them;
/// on read-only storage an immutable read would silently miss them, so it is refused.
#[test]
fn a_copy_with_commits_only_in_its_wal_is_read_where_writable_and_refused_where_not() {
    let h = Home::new();
    rebuild(h.path(), "alpha", false, json!({}));
    let copy = Home::new();
    {
        let mut j = Journal::open_home(h.path()).unwrap();
        j.conn().pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        let spec = RunSpec {
            lock_key: "local/beta".into(),
            sandbox: Some("beta".into()),
            gateway: Some("local".into()),
            mode: Some("stale".into()),
            params: json!({}),
            argv: vec!["nemoclaw".into()],
        };
        let p = plan(h.path(), true);
        engine::start(&mut j, &LockDir::new(h.path()), &p, spec, &engine::Quiet).unwrap();
        // Copied while the writer is still open: the new run is only in the `-wal`.
        for f in ["journal.sqlite3", "journal.sqlite3-wal"] {
            std::fs::copy(h.path().join(f), copy.path().join(f)).unwrap();
        }
    }
    assert!(std::fs::metadata(copy.path().join("journal.sqlite3-wal")).unwrap().len() > 0);
    let before = snapshot(copy.path());
    {
        let ro = ReadOnly::new(copy.path());
        let view = home_at(&ro.view);
        let o = view.run(&["journal", "list"]);
        assert_eq!(o.status.code(), Some(74), "{}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains("journal.sqlite3-wal") && e.contains("cannot be read there"), "{e}");
        assert!(e.contains("hint: copy the whole directory"), "{e}");
    }
    assert_eq!(snapshot(copy.path()), before);
    let v = json_out(&copy, &["journal", "list"]);
    assert_eq!(v["data"]["runs"].as_array().unwrap().len(), 2, "the -wal's run is read: {v}");
}
