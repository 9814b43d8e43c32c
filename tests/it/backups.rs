//! What a backup keeps and what it lets through: metadata fidelity on the local gateway and
//! through the real `openshell` CLI, silent corruption on the way in and out, and the journaled
//! way out of a backup that no longer verifies.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use crate::common::stderr;
use crate::rebuild::{check_journal, runs, Opts, World};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let t = [
        libc::timespec { tv_sec: sec, tv_nsec: nsec },
        libc::timespec { tv_sec: sec, tv_nsec: nsec },
    ];
    // SAFETY: c is NUL-terminated, t has two entries.
    let r = unsafe {
        libc::utimensat(libc::AT_FDCWD, c.as_ptr(), t.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
    };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

const SPARSE_SIZE: u64 = 64 * 1024 * 1024;

/// A state tree with every kind of metadata a backup must keep: modes 0755/0644/0600/0000 and a
/// setgid directory, old mtimes with nanoseconds, empty nested directories, a sparse file,
/// in-tree symlinks (to a file, to a directory, dangling), hard links, a 255-byte name and
/// names that are not UTF-8.
fn fidelity_tree(root: &Path) {
    let w = |rel: &[u8], bytes: &[u8], mode: u32| {
        let p = root.join(OsStr::from_bytes(rel));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    w(b"workspace/run.sh", b"#!/bin/sh\necho hi\n", 0o755);
    w(b"workspace/notes.md", b"public notes\n", 0o644);
    w(b"workspace/secret.env", b"TOKEN=not-really\n", 0o600);
    w(b"workspace/locked", b"no access\n", 0o000);
    w(b"workspace/caf\xe9.md", b"latin-1 name\n", 0o644);
    w(b"workspace/\xff\xfe/inner.txt", b"in a directory named with invalid UTF-8\n", 0o640);
    let long = vec![b'L'; 255];
    let mut long_rel = b"workspace/".to_vec();
    long_rel.extend_from_slice(&long);
    w(&long_rel, b"a 255-byte name\n", 0o644);
    w(b"memory/MEMORY.md", b"remember\n", 0o644);
    std::fs::create_dir_all(root.join("workspace/empty/nested/deeper")).unwrap();
    std::fs::create_dir_all(root.join("workspace/shared")).unwrap();
    // A sparse file: data at the start and at the end, a hole in between.
    let sparse = root.join("memory/vectors.bin");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(&sparse).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(SPARSE_SIZE - 4)).unwrap();
        f.write_all(b"tail").unwrap();
    }
    std::fs::hard_link(root.join("workspace/notes.md"), root.join("workspace/notes-link.md"))
        .unwrap();
    std::fs::hard_link(root.join("workspace/notes.md"), root.join("memory/notes-again.md"))
        .unwrap();
    std::os::unix::fs::symlink("notes.md", root.join("workspace/latest")).unwrap();
    std::os::unix::fs::symlink("../memory", root.join("workspace/mem")).unwrap();
    std::os::unix::fs::symlink("not-there-yet", root.join("workspace/dangling")).unwrap();
    std::fs::set_permissions(
        root.join("workspace/shared"),
        std::fs::Permissions::from_mode(0o2775),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("workspace/empty/nested"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    // Old mtimes with nanoseconds, on everything, directories last and deepest first.
    let mut all: Vec<std::path::PathBuf> = walk(root);
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in all.iter().enumerate() {
        set_mtime(p, 1_600_000_000 + i as i64 * 7919, 123_456_789 + i as i64);
    }
}

fn walk(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

/// `find -printf '%P %m %T@ %s %y %l\n'` of everything under `root`, sorted (raw bytes; no
/// name in these trees has a newline).
fn listing(root: &Path) -> Vec<Vec<u8>> {
    let o = Command::new("find")
        .arg(root)
        .args(["-mindepth", "1", "-printf", "%P %m %T@ %s %y %l\\n"])
        .output()
        .unwrap();
    assert!(o.status.success(), "find: {}", String::from_utf8_lossy(&o.stderr));
    let mut v: Vec<Vec<u8>> =
        o.stdout.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect();
    v.sort();
    v
}

fn show(l: &[Vec<u8>]) -> String {
    l.iter().map(|x| String::from_utf8_lossy(x).into_owned()).collect::<Vec<_>>().join("\n")
}

/// Bytes of every regular file, by relative path.
fn contents(root: &Path) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
    walk(root)
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(p).unwrap().is_file())
        .map(|p| {
            let rel = p.strip_prefix(root).unwrap().as_os_str().as_bytes().to_vec();
            (rel, std::fs::read(&p).unwrap())
        })
        .collect()
}

fn inode(p: &Path) -> (u64, u64) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.dev(), m.ino())
}

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

fn backup_dir(w: &World) -> std::path::PathBuf {
    let d = w.path().join("rebuild-backups/alpha");
    let mut v: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v.pop().expect("a backup")
}

#[test]
fn local_rebuild_keeps_modes_mtimes_empty_dirs_holes_links_and_names() {
    if !is_root() {
        eprintln!("skipping: the fidelity tree has a 0000 file, which needs root to read");
        return;
    }
    let w = World::new(Opts { locked: false, files: 0 });
    let state = w.state_dir();
    fidelity_tree(&state);
    let before = listing(&state);
    assert!(before.len() == 21, "the tree is all there:\n{}", show(&before));
    let bytes = contents(&state);
    assert!(allocated(&state.join("memory/vectors.bin")) < 1024 * 1024, "the source is sparse");
    let o = w.rebuild();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(runs(w.path()).last().unwrap().1, "succeeded");
    check_journal(w.path());
    let after = listing(&state);
    assert_eq!(show(&after), show(&before), "find listing (mode, mtime, size, type, target)");
    assert_eq!(contents(&state), bytes, "every file byte for byte");
    // Hard links stay one inode; the sparse file stays sparse, in the sandbox and the backup.
    let ino = inode(&state.join("workspace/notes.md"));
    assert_eq!(inode(&state.join("workspace/notes-link.md")), ino);
    assert_eq!(inode(&state.join("memory/notes-again.md")), ino);
    assert_eq!(std::fs::metadata(state.join("workspace/notes.md")).unwrap().nlink(), 3);
    assert!(allocated(&state.join("memory/vectors.bin")) < 1024 * 1024, "restored sparse");
    let bk = backup_dir(&w);
    assert!(allocated(&bk.join("memory/vectors.bin")) < 1024 * 1024, "backup sparse");
    assert_eq!(std::fs::metadata(&bk).unwrap().mode() & 0o777, 0o700, "backup dir private");
    assert_eq!(
        std::fs::metadata(bk.parent().unwrap()).unwrap().mode() & 0o777,
        0o700,
        "backups of the sandbox private"
    );
    // The manifest records what is kept, so its journaled digest covers the metadata.
    let m: Value =
        serde_json::from_slice(&std::fs::read(bk.join("rebuild-manifest.json")).unwrap()).unwrap();
    let files = m["files"].as_array().unwrap();
    let run = files.iter().find(|f| f["path"] == "workspace/run.sh").unwrap();
    assert_eq!(run["mode"], 0o755);
    let src_mtime = std::fs::symlink_metadata(state.join("workspace/run.sh")).unwrap();
    assert_eq!(
        run["mtime_ns"].as_i64().unwrap(),
        src_mtime.mtime() * 1_000_000_000 + src_mtime.mtime_nsec(),
        "the manifest holds the nanosecond mtime"
    );
    assert!(files.iter().any(|f| f["path"] == json!({"hex": hex_of(b"workspace/caf\xe9.md")})));
    assert!(m["dirs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["path"] == "workspace/empty/nested/deeper"));
    let link = files.iter().find(|f| f["path"] == "workspace/notes-link.md").unwrap();
    assert_eq!(link["hardlink"], "memory/notes-again.md");
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Through the real `openshell` CLI the tree comes back exactly too: what its `tar` pipeline
/// drops (sub-second and directory mtimes and the setgid bit on download, hard links and
/// sub-second mtimes on upload, holes) is put back from the listing taken inside the sandbox —
/// in an image with `python3` and in one without (mtimes by `touch`).
#[rstest::rstest]
#[case::python3(json!({}))]
#[case::touch_without_python3(json!({"exec_without": ["python3"]}))]
fn real_cli_rebuild_keeps_modes_mtimes_empty_dirs_holes_links_and_names(#[case] image: Value) {
    if !is_root() {
        eprintln!("skipping: the fidelity tree has a 0000 file, which needs root to read");
        return;
    }
    let Some(r) = crate::fakegw::Real::new() else { return };
    r.gw.faults(image);
    let tree = r.tree();
    std::fs::remove_dir_all(&tree).unwrap();
    std::fs::create_dir_all(&tree).unwrap();
    fidelity_tree(&tree);
    let before = listing(&tree);
    assert!(before.len() == 21, "the tree is all there:\n{}", show(&before));
    let bytes = contents(&tree);
    let o = r.run(&["alpha", "rebuild", "--yes"]);
    assert!(o.status.success(), "{}", stderr(&o));
    crate::rebuild::check_journal(r.home.path());
    let tree = r.tree();
    let after = listing(&tree);
    assert_eq!(show(&after), show(&before), "find listing (mode, mtime, size, type, target)");
    assert_eq!(contents(&tree), bytes, "every file byte for byte");
    let ino = inode(&tree.join("workspace/notes.md"));
    assert_eq!(inode(&tree.join("workspace/notes-link.md")), ino, "hard links stay one inode");
    assert_eq!(inode(&tree.join("memory/notes-again.md")), ino);
    assert_eq!(std::fs::metadata(tree.join("workspace/notes.md")).unwrap().nlink(), 3);
    let bk = r.home.path().join("rebuild-backups/alpha");
    let bk = std::fs::read_dir(&bk).unwrap().map(|e| e.unwrap().path()).max().unwrap();
    assert_eq!(show(&listing_without_manifest(&bk)), show(&before), "the backup is exact too");
    assert!(allocated(&bk.join("memory/vectors.bin")) < 1024 * 1024, "backup sparse");
    assert!(allocated(&tree.join("memory/vectors.bin")) < 1024 * 1024, "restored sparse");
    // The manifest describes the sandbox's files: nanosecond mtimes of files and directories
    // and the setgid bit, which the download alone does not carry.
    let m: Value =
        serde_json::from_slice(&std::fs::read(bk.join("rebuild-manifest.json")).unwrap()).unwrap();
    let shared = m["dirs"].as_array().unwrap().iter().find(|d| d["path"] == "workspace/shared");
    let st = std::fs::symlink_metadata(tree.join("workspace/shared")).unwrap();
    assert_eq!(shared.unwrap()["mode"], 0o2775);
    assert_eq!(
        shared.unwrap()["mtime_ns"].as_i64().unwrap(),
        st.mtime() * 1_000_000_000 + st.mtime_nsec()
    );
}

/// The one step that recorded an error, and its run's state.
fn failed_step(home: &Path) -> (String, String) {
    let j = nemoclaw::journal::Journal::open_home(home).unwrap();
    j.conn()
        .query_row(
            "SELECT s.name, r.state FROM steps s JOIN runs r ON r.id = s.run_id WHERE s.error IS NOT NULL",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
}

/// [`listing`] of a backup directory, without its manifest.
fn listing_without_manifest(dir: &Path) -> Vec<Vec<u8>> {
    listing(dir).into_iter().filter(|l| !l.starts_with(b"rebuild-manifest.json ")).collect()
}

// --- silent corruption on the way ----------------------------------------------------------

/// A download that silently damages one file is caught by the backup's check of its copy,
/// before anything is deleted: the run fails at `backup`, the old sandbox and its row stay.
#[test]
fn a_download_that_corrupts_silently_fails_the_backup_before_anything_is_deleted() {
    for how in ["flip", "truncate", "drop"] {
        let w = World::new(Opts::default());
        let b = w.snapshot();
        w.fault(json!({"corrupt": {"download": {"path": "memory/MEMORY.md", "how": how}}}));
        let o = w.rebuild();
        assert_eq!(o.status.code(), Some(1), "{how}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains("memory/MEMORY.md"), "{how}: the message names the file:\n{err}");
        assert!(err.contains("does not match what was read"), "{how}:\n{err}");
        assert_eq!(w.live_id(), b.id, "{how}: the old sandbox was not deleted");
        assert_eq!(w.registry_bytes(), b.registry, "{how}: registry untouched");
        assert_eq!(w.digest(), b.digest, "{how}: live state untouched");
        // It failed before the delete, so the same command rolled it back at once.
        assert_eq!(failed_step(w.path()), ("backup".into(), "rolled_back".into()), "{how}");
        assert!(!w.path().join("rebuild-backups/alpha").read_dir().unwrap().any(|e| e
            .unwrap()
            .path()
            .join("rebuild-manifest.json")
            .exists()));
    }
}

/// An upload that silently damages one file is caught by restore verification: the run
/// stops at `restore` naming the file, and the backup (with its journaled digest) stays.
#[test]
fn an_upload_that_corrupts_silently_fails_restore_verification() {
    for how in ["flip", "truncate", "drop"] {
        let w = World::new(Opts::default());
        w.fault(json!({"corrupt": {"upload": {"path": "memory/MEMORY.md", "how": how}}}));
        let o = w.rebuild();
        assert_eq!(o.status.code(), Some(1), "{how}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains("step `restore` failed"), "{how}:\n{err}");
        assert!(err.contains("memory/MEMORY.md"), "{how}: the message names the file:\n{err}");
        assert!(!err.contains("rebuilt successfully"), "{how}");
        assert_eq!(runs(w.path()).last().unwrap().1, "failed", "{how}");
        // Fixed transport: resume puts the right bytes in.
        w.clear_fault();
        let r = w.home.run(&["recover", "--resume", "--sandbox", "alpha"]);
        assert!(r.status.success(), "{how}: {}", stderr(&r));
        assert_eq!(
            std::fs::read(w.state_dir().join("memory/MEMORY.md")).unwrap(),
            b"remember this\n"
        );
    }
}

/// A restored file whose mode or mtime came out wrong fails verification too: the digest of
/// the manifest covers the metadata.
#[test]
fn restore_verification_checks_metadata_not_only_bytes() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("w/empty")).unwrap();
    std::fs::write(src.join("w/run.sh"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(src.join("w/run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let meta = demo_meta();
    let b =
        nemoclaw::host::Backup::create(t.path(), &meta, "2026-06-09T10-02-11-399Z", &src).unwrap();
    let out = t.path().join("out");
    b.copy_out(&out).unwrap();
    let all = nemoclaw::host::backup::Keeps::ALL;
    b.verify_tree(&out, all).unwrap();
    std::fs::set_permissions(out.join("w/run.sh"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let e = b.verify_tree(&out, all).unwrap_err().to_string();
    assert!(e.contains("w/run.sh: mode 0700, expected 0755"), "{e}");
    std::fs::set_permissions(out.join("w/run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    set_mtime(&out.join("w/run.sh"), 1_000_000_000, 0);
    let e = b.verify_tree(&out, all).unwrap_err().to_string();
    assert!(e.contains("w/run.sh: mtime"), "{e}");
    std::fs::remove_dir(out.join("w/empty")).unwrap();
    let e = b.verify_tree(&out, all).unwrap_err().to_string();
    assert!(e.contains("w/empty: missing"), "{e}");
}

// --- a backup that no longer verifies ------------------------------------------------------

/// Kill the rebuild right after `remove` is durable (old sandbox and its row gone, backup
/// committed), then damage the backup: one file flipped, one deleted.
/// A rebuild killed right after its `remove` step's outcome (the old sandbox and its row gone).
fn kill_after_remove(w: &World) {
    let o = w
        .home
        .cmd()
        .env("NEMOCLAW_CRASHPOINT", "after_outcome:3")
        .args(["alpha", "rebuild", "--yes"])
        .output()
        .unwrap();
    assert!(crate::common::killed(&o), "killed after remove: {}", stderr(&o));
}

fn crash_after_remove_then_damage(w: &World) -> std::path::PathBuf {
    kill_after_remove(w);
    assert_eq!(w.row(), None, "the row went with the sandbox");
    assert_eq!(w.live_id(), None);
    let bk = backup_dir(w);
    std::fs::write(bk.join("workspace/d0/f0.txt"), b"bit rot").unwrap();
    std::fs::remove_file(bk.join("memory/MEMORY.md")).unwrap();
    bk
}

fn events_of(w: &World, kind: &str) -> Vec<Value> {
    let j = nemoclaw::journal::Journal::open_home(w.path()).unwrap();
    let mut st = j.conn().prepare("SELECT data FROM events WHERE kind = ?1 ORDER BY id").unwrap();
    st.query_map([kind], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|d| serde_json::from_str(&d.unwrap()).unwrap())
        .collect()
}

#[test]
fn a_damaged_backup_stops_rollback_naming_the_files_then_accepting_it_finishes_the_rollback() {
    let w = World::new(Opts { locked: false, ..Opts::default() });
    let b = w.snapshot();
    let bk = crash_after_remove_then_damage(&w);
    let damaged_bytes = std::fs::read(bk.join("workspace/d0/f0.txt")).unwrap();
    // A plain rollback refuses to restore from it, every time, and leaves nothing half-made.
    for _ in 0..2 {
        let o = w.home.run(&["recover", "--rollback", "--sandbox", "alpha"]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let err = stderr(&o);
        for needle in [
            "workspace/d0/f0.txt",
            "memory/MEMORY.md: missing",
            bk.to_str().unwrap(),
            "nothing was restored",
        ] {
            assert!(err.contains(needle), "`{needle}` missing in:\n{err}");
        }
        let last = err.lines().last().unwrap();
        assert!(
            last.contains("nemoclaw recover --rollback")
                && last.contains("--accept-damaged-backup"),
            "last line: {last}"
        );
        assert_eq!(w.row(), None);
        assert_eq!(w.gateway_listing().0, vec!["bystander"], "no empty replacement left");
        assert_eq!(runs(w.path()).last().unwrap().1, "rolling_back");
    }
    // The explicit way out.
    let o = w.home.run(&["recover", "--rollback", "--sandbox", "alpha", "--accept-damaged-backup"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("workspace/d0/f0.txt") && err.contains("memory/MEMORY.md"), "{err}");
    assert!(err.contains(bk.to_str().unwrap()), "names where the backup is:\n{err}");
    assert!(err.lines().last().unwrap().contains("nemoclaw alpha rebuild"), "{err}");
    check_journal(w.path());
    assert_eq!(runs(w.path()).last().unwrap().1, "rolled_back");
    assert_eq!(w.registry_bytes(), b.registry, "registry byte-equal to before the run");
    assert_eq!(
        w.gateway_listing(),
        (vec!["bystander".to_owned()], vec![]),
        "no sandbox restored from it"
    );
    // The backup is kept as it was found, and the decision is in the journal.
    assert_eq!(std::fs::read(bk.join("workspace/d0/f0.txt")).unwrap(), damaged_bytes);
    let ev = events_of(&w, "damaged_backup_accepted");
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["backup_path"], bk.to_str().unwrap());
    let why = ev[0]["error"].as_str().unwrap();
    assert!(
        why.contains("workspace/d0/f0.txt") && why.contains("memory/MEMORY.md: missing"),
        "{why}"
    );
    // The sandbox now reads as stale: the next rebuild recreates it from the registry entry.
    let o = w.rebuild();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("Recovered from a stale registry entry"));
}

#[test]
fn resume_with_a_damaged_backup_points_at_the_way_out_and_the_way_out_removes_the_replacement() {
    let w = World::new(Opts { locked: false, ..Opts::default() });
    let b = w.snapshot();
    let bk = crash_after_remove_then_damage(&w);
    let o = w.home.run(&["recover", "--resume", "--sandbox", "alpha"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("step `restore` failed") && err.contains("workspace/d0/f0.txt"), "{err}");
    assert!(err.lines().last().unwrap().contains("--accept-damaged-backup"), "{err}");
    // Nothing of the damaged backup went into the replacement.
    let state = w.state_dir();
    assert!(!state.join("workspace/d0/f0.txt").exists(), "nothing restored from a failing backup");
    let o = w.home.run(&["recover", "--rollback", "--sandbox", "alpha", "--accept-damaged-backup"]);
    assert!(o.status.success(), "{}", stderr(&o));
    check_journal(w.path());
    assert_eq!(w.registry_bytes(), b.registry);
    assert_eq!(w.gateway_listing(), (vec!["bystander".to_owned()], vec![]), "replacement removed");
    assert!(bk.join("rebuild-manifest.json").is_file(), "backup kept");
}

/// The restore reads the backup once, and that read is its check: a backup file whose bytes
/// changed without its size or mtime changing (only the digest can tell) stops the restore,
/// and the replacement's state tree stays exactly as it was created — empty — with no staged
/// copy left beside it.
#[test]
fn a_same_size_flip_in_the_backup_stops_the_restore_before_the_replacement_holds_a_byte() {
    let w = World::new(Opts { locked: false, ..Opts::default() });
    kill_after_remove(&w);
    let bk = backup_dir(&w);
    let f = bk.join("workspace/d0/f0.txt");
    let m = std::fs::metadata(&f).unwrap();
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&f, &bytes).unwrap();
    set_mtime(&f, m.mtime(), m.mtime_nsec());
    assert_eq!(std::fs::metadata(&f).unwrap().len(), m.len());

    let o = w.home.run(&["recover", "--resume", "--sandbox", "alpha"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("step `restore` failed"), "{err}");
    assert!(err.contains("workspace/d0/f0.txt: sha256"), "names the file and why:\n{err}");
    assert!(err.contains("nothing was restored"), "{err}");
    assert!(err.lines().last().unwrap().contains("--accept-damaged-backup"), "{err}");
    // Read without opening the gateway (opening cleans leftovers): nothing staged is left.
    let root = w.path().join("local-gateway");
    let staged: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp") || n.starts_with(".trash"))
        .collect();
    assert_eq!(staged, Vec::<String>::new(), "no staged copy left");
    assert_eq!(listing(&w.state_dir()), Vec::<Vec<u8>>::new(), "the replacement's state is empty");
    assert_eq!(std::fs::read(&f).unwrap(), bytes, "the backup is left as it was found");
    assert_eq!(runs(w.path()).last().unwrap().1, "failed");
}

/// A restore cut short while its copy was being staged leaves a temp directory of a dead
/// process beside the sandboxes and the replacement's state as created: resume removes the
/// staged remains, restores the backup exactly, and the sandbox never holds the partial copy.
#[test]
fn a_restore_staged_by_a_dead_process_is_cleaned_up_and_resume_restores_exactly() {
    let w = World::new(Opts { locked: false, ..Opts::default() });
    let b = w.snapshot();
    kill_after_remove(&w);
    // What a restore killed mid-copy leaves: a partial staged tree named for a dead pid.
    let root = w.path().join("local-gateway");
    let staged = root.join(".tmp.alpha.999999999.0190b0b0-0000-7000-8000-000000000001");
    std::fs::create_dir_all(staged.join("workspace/d0")).unwrap();
    std::fs::write(staged.join("workspace/d0/f0.txt"), b"half a fi").unwrap();

    let o = w.home.run(&["recover", "--resume", "--sandbox", "alpha"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!staged.exists(), "the dead process's staged copy is removed");
    let left: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "nothing staged or trashed is left");
    assert_eq!(w.digest(), b.digest, "the state is the backed-up state, byte for byte");
    assert_eq!(runs(w.path()).last().unwrap().1, "succeeded");
    check_journal(w.path());
}

#[test]
fn accepting_a_damaged_backup_never_skips_a_good_one() {
    let w = World::new(Opts { locked: false, ..Opts::default() });
    let b = w.snapshot();
    kill_after_remove(&w);
    let o = w.home.run(&["recover", "--rollback", "--sandbox", "alpha", "--accept-damaged-backup"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("verifies: it will be restored"), "{}", stderr(&o));
    assert_eq!(w.digest(), b.digest, "the good backup was restored");
    assert_eq!(w.registry_bytes(), b.registry);
    assert!(events_of(&w, "damaged_backup_accepted").is_empty());
    let o = w.home.run(&["recover", "--resume", "--accept-damaged-backup"]);
    assert_eq!(o.status.code(), Some(2), "the flag only goes with --rollback");
}

// --- the registry row goes only after absence is confirmed ---------------------------------

#[test]
fn a_delete_that_reports_success_without_deleting_keeps_the_registry_row() {
    let w = World::new(Opts::default());
    let b = w.snapshot();
    w.fault(json!({"silent": ["delete"]}));
    let o = w.rebuild();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("still on gateway 'local' after its delete reported success"),
        "{}",
        stderr(&o)
    );
    assert_eq!(w.registry_bytes(), b.registry, "the row is still there");
    assert_eq!(w.live_id(), b.id, "the old sandbox is still there");
    assert_eq!(w.digest(), b.digest);
    w.clear_fault();
    let o = w.home.run(&["recover", "--rollback", "--sandbox", "alpha"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(w.registry_bytes(), b.registry);
}

#[test]
fn a_delete_that_fails_keeps_the_registry_row() {
    let w = World::new(Opts::default());
    let b = w.snapshot();
    w.fault(json!({"fail": {"delete": "sandbox is busy"}}));
    let o = w.rebuild();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("sandbox is busy"));
    assert_eq!(w.registry_bytes(), b.registry, "the row is still there");
    assert_eq!(w.live_id(), b.id);
}

// --- silent corruption through the real CLI ------------------------------------------------

/// What a backup through `openshell` that failed must leave: the old sandbox (same id), its
/// registry row byte for byte, its files, no committed backup, and the run rolled back with
/// `backup` the failed step.
fn nothing_removed(r: &crate::fakegw::Real, id: &Value, registry: &[u8], digest: &str, ctx: &str) {
    assert_eq!(&r.gw.sandboxes()["alpha"]["id"], id, "{ctx}: the old sandbox was not deleted");
    assert_eq!(r.registry_bytes(), registry, "{ctx}: registry untouched");
    assert_eq!(r.digest(), digest, "{ctx}: live state untouched");
    let dir = r.home.path().join("rebuild-backups/alpha");
    let committed = std::fs::read_dir(&dir)
        .map(|d| d.filter(|e| e.as_ref().unwrap().path().join("rebuild-manifest.json").exists()))
        .map(Iterator::count)
        .unwrap_or(0);
    assert_eq!(committed, 0, "{ctx}: no backup was committed");
    assert_eq!(failed_step(r.home.path()), ("backup".into(), "rolled_back".into()), "{ctx}");
    crate::rebuild::check_journal(r.home.path());
}

/// Through `openshell`, a download that damages one file in transit (fake `ssh`) is caught by
/// the backup's check of its copy against the digests computed inside the sandbox, before
/// anything is deleted.
#[test]
fn real_cli_a_download_that_corrupts_silently_fails_the_backup_before_anything_is_deleted() {
    for how in ["flip", "truncate", "drop"] {
        let Some(r) = crate::fakegw::Real::new() else { return };
        let (id, registry, digest) =
            (r.gw.sandboxes()["alpha"]["id"].clone(), r.registry_bytes(), r.digest());
        r.gw.faults(json!({"ssh_corrupt": {"on": "download", "path": "MEMORY.md", "how": how}}));
        let o = r.run(&["alpha", "rebuild", "--yes"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{how}: {err}");
        assert!(err.contains("MEMORY.md"), "{how}: the message names the file:\n{err}");
        assert!(err.contains("does not match what was read"), "{how}:\n{err}");
        nothing_removed(&r, &id, &registry, &digest, how);
    }
}

/// Through `openshell`, an upload that damages one file in transit (fake `ssh`) is caught by
/// restore verification (a listing with digests taken inside the sandbox): the run stops at
/// `restore` naming the file, never reports success, and a resume with a sound transport
/// puts every byte back.
#[test]
fn real_cli_an_upload_that_corrupts_silently_fails_restore_verification() {
    for how in ["flip", "truncate", "drop"] {
        let Some(r) = crate::fakegw::Real::new() else { return };
        let digest = r.digest();
        r.gw.faults(json!({"ssh_corrupt": {"on": "upload", "path": "MEMORY.md", "how": how}}));
        let o = r.run(&["alpha", "rebuild", "--yes"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{how}: {err}");
        assert!(
            err.contains("step `restore` failed") && err.contains("MEMORY.md"),
            "{how}:\n{err}"
        );
        assert!(!err.contains("rebuilt successfully"), "{how}");
        assert_ne!(r.digest(), digest, "{how}: the damage really reached the sandbox");
        assert_eq!(runs(r.home.path()).last().unwrap().1, "failed", "{how}");
        r.gw.faults(json!({}));
        let o = r.run(&["recover", "--resume", "--sandbox", "alpha"]);
        assert!(o.status.success(), "{how}: {}", stderr(&o));
        assert_eq!(r.digest(), digest, "{how}: every byte back after the resume");
        crate::rebuild::check_journal(r.home.path());
    }
}

/// The CLI exits 0 when the exec stream ends without an exit status: a listing that arrives
/// whole but without the script's end marker (the stream was cut after the work) is not
/// trusted, and neither is one cut in the middle, nor one with a byte flipped (the record
/// separator before the marker, a digest); the backup stops before anything is deleted.
#[test]
fn real_cli_a_listing_cut_short_or_damaged_is_never_trusted() {
    for (fault, says) in [
        (json!({"exec_cut": 13}), "end marker"),
        (json!({"exec_cut": 200}), "end marker"),
        (json!({"exec_flip": 14}), "complete record"),
        (json!({"exec_flip": 100}), "listed inside the sandbox"),
    ] {
        let Some(r) = crate::fakegw::Real::new() else { return };
        let (id, registry, digest) =
            (r.gw.sandboxes()["alpha"]["id"].clone(), r.registry_bytes(), r.digest());
        r.gw.faults(fault.clone());
        let o = r.run(&["alpha", "rebuild", "--yes"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{fault}: {err}");
        assert!(err.contains(says), "{fault}:\n{err}");
        nothing_removed(&r, &id, &registry, &digest, &fault.to_string());
    }
}

/// A manifest written before modes, mtimes and directories were recorded still opens, restores
/// and verifies: what it does not record is not checked.
#[test]
fn a_manifest_without_metadata_still_restores_and_verifies() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("w/sub")).unwrap();
    std::fs::write(src.join("w/sub/a.md"), b"a\n").unwrap();
    std::os::unix::fs::symlink("sub/a.md", src.join("w/link")).unwrap();
    let meta = demo_meta();
    let b =
        nemoclaw::host::Backup::create(t.path(), &meta, "2026-06-09T10-02-11-399Z", &src).unwrap();
    let mpath = b.path.join("rebuild-manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("dirs");
    for f in m["files"].as_array_mut().unwrap() {
        let f = f.as_object_mut().unwrap();
        f.remove("mode");
        f.remove("mtime_ns");
    }
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    // Metadata the old manifest does not know about differs in the copy: not held against it.
    set_mtime(&b.path.join("w/sub/a.md"), 1_000_000_000, 0);
    let old = nemoclaw::host::Backup::open(&b.path).unwrap();
    assert!(old.manifest.dirs.is_empty() && old.manifest.files.iter().all(|f| f.mode.is_none()));
    old.verify().unwrap();
    let out = t.path().join("out");
    old.copy_out(&out).unwrap();
    assert_eq!(std::fs::read(out.join("w/sub/a.md")).unwrap(), b"a\n");
    let view = t.path().join("view");
    old.link_out(&view).unwrap();
    assert_eq!(std::fs::read_link(view.join("w/link")).unwrap(), Path::new("sub/a.md"));
    // Bytes are still checked.
    std::fs::write(b.path.join("w/sub/a.md"), b"b\n").unwrap();
    assert!(old.verify().unwrap_err().to_string().contains("w/sub/a.md: sha256"));
}

/// A backup's NemoClaw fields for sandbox `demo`, nothing else set.
fn demo_meta() -> nemoclaw::host::backup::BackupMeta {
    nemoclaw::host::backup::BackupMeta {
        sandbox: nemoclaw::names::SandboxName::parse("demo").unwrap(),
        agent_type: None,
        agent_version: None,
        policy_presets: vec![],
        custom_policies: json!([]),
    }
}
