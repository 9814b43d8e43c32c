//! `nemoclaw demo`: the whole story on the embedded local gateway, in a scratch home, with
//! real processes: onboard a sandbox with sample files, start a rebuild and kill it with
//! SIGKILL right after the old sandbox was deleted, show what `recover` sees, resume, check
//! that every file came back, and print the journal.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::args::DemoArgs;
use super::{CliError, CmdResult, Ctx};
use crate::exit::Exit;

struct Demo {
    printer: super::Printer,
    exe: PathBuf,
    home: PathBuf,
}

impl Demo {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg("--home").arg(&self.home).args(args);
        // The demo always runs on the embedded gateway, whatever this host has installed.
        c.env_remove("NEMOCLAW_OPENSHELL").env_remove("NEMOCLAW_CRASHPOINT");
        // Quiet or JSON: the steps are quiet too, and with --json stdout carries only the
        // demo's own document, so their data goes to stderr.
        if self.printer.quiet || self.printer.json {
            c.arg("-q");
        }
        if self.printer.json {
            use std::os::fd::AsFd;
            if let Ok(err) = std::io::stderr().as_fd().try_clone_to_owned() {
                c.stdout(err);
            }
        }
        c
    }

    /// Run a step of the story, echoing the command line; returns its exit code.
    fn run(&self, args: &[&str], crash: Option<&str>) -> Result<i32, CliError> {
        self.printer.info(format!("\n$ nemoclaw {}", args.join(" ")));
        let mut c = self.cmd(args);
        if let Some(point) = crash {
            c.env(crate::engine::crash::ENV, point);
        }
        let status = c.status().map_err(|e| {
            CliError::new(Exit::Io, format!("cannot run {}: {e}", self.exe.display()))
        })?;
        Ok(status.code().unwrap_or(128 + 9))
    }

    fn expect(&self, args: &[&str], want: i32) -> Result<(), CliError> {
        let code = self.run(args, None)?;
        if code != want {
            return Err(CliError::new(
                Exit::Failed,
                format!("demo step `nemoclaw {}` exited {code}, expected {want}", args.join(" ")),
            ));
        }
        Ok(())
    }
}

fn workspace(home: &Path) -> PathBuf {
    home.join("local-gateway/sandboxes/demo/state")
}

fn seed_files(state: &Path) -> Result<(), CliError> {
    let io = |e: std::io::Error| CliError::new(Exit::Io, format!("cannot write demo files: {e}"));
    std::fs::create_dir_all(state.join("workspace/notes")).map_err(io)?;
    std::fs::create_dir_all(state.join("memory")).map_err(io)?;
    for i in 0..20 {
        std::fs::write(
            state.join(format!("workspace/notes/note-{i:02}.md")),
            format!("# Note {i}\n\nThe agent wrote this before the rebuild.\n"),
        )
        .map_err(io)?;
    }
    std::fs::write(state.join("memory/MEMORY.md"), "The operator prefers short answers.\n")
        .map_err(io)?;
    Ok(())
}

/// The demo's NemoClaw home: `--dir` (which must not hold one already) or a new temporary
/// directory.
fn scratch_home(dir: Option<PathBuf>) -> Result<PathBuf, CliError> {
    let home = match dir {
        Some(d) if d.join("sandboxes.json").exists() => {
            return Err(CliError::new(
                Exit::Refused,
                format!(
                    "{} already holds a NemoClaw home; the demo needs an empty directory",
                    d.display()
                ),
            ))
        }
        Some(d) => d,
        None => std::env::temp_dir().join(format!("nemoclaw-demo-{}", uuid::Uuid::now_v7())),
    };
    crate::util::create_private_dir(&home)
        .map_err(|e| CliError::new(Exit::Io, format!("cannot create {}: {e}", home.display())))?;
    Ok(home)
}

/// The newest run in the demo's journal.
fn last_run_id(home: &Path) -> Option<String> {
    let j = crate::journal::Journal::open_readonly(&home.join(crate::journal::store::FILE_NAME))
        .ok()
        .flatten()?;
    let mut runs = Vec::new();
    let filter = crate::journal::audit::RunFilter { limit: Some(1), ..Default::default() };
    crate::journal::audit::list_runs(&j, &filter, |r| {
        runs.push(r.id);
        Ok(())
    })
    .ok()?;
    runs.pop()
}

/// `nemoclaw demo`.
pub fn run(ctx: &Ctx, a: DemoArgs) -> CmdResult {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::new(Exit::Io, format!("cannot find the nemoclaw binary: {e}")))?;
    let home = scratch_home(a.dir)?;
    let d = Demo { printer: ctx.printer.clone(), exe, home: home.clone() };
    let p = &ctx.printer;
    p.info(format!("nemoclaw demo — scratch NemoClaw home: {}", home.display()));

    p.info("\n1. Onboard a sandbox on the embedded local gateway and give it some files.");
    d.expect(&["onboard", "demo", "--gateway", "local", "--policy", "npm"], 0)?;
    seed_files(&workspace(&home))?;
    let before = crate::host::backup::tree_digest(&workspace(&home))?;
    p.info(format!("   workspace digest before: {before}"));
    d.expect(&["demo", "shields", "up"], 0)?;

    p.info("\n2. Rebuild it, and pull the plug right after the old sandbox is deleted");
    p.info("   (the process kills itself with SIGKILL: nothing after that point runs).");
    // snapshot, shields_down, backup, remove: the 4th step's effect is the delete.
    let code = d.run(&["demo", "rebuild", "--yes"], Some("after_effect:4"))?;
    p.info(format!(
        "   the rebuild died (exit {code}); the old sandbox is gone, its backup is on disk."
    ));

    p.info(
        "\n3. Any command on the sandbox now says a rebuild was interrupted; `recover` lists it.",
    );
    d.run(&["demo", "status"], None)?;
    d.expect(&["recover"], 0)?;

    p.info("\n4. Resume: the journal, not liveness, decides what is left to do.");
    d.expect(&["recover", "--resume", "--sandbox", "demo"], 0)?;
    let after = crate::host::backup::tree_digest(&workspace(&home))?;
    p.info(format!("   workspace digest after:  {after}"));
    if after != before {
        return Err(CliError::new(Exit::Failed, "demo: the workspace differs after the resume"));
    }
    p.success("   ✓ every file came back, byte for byte");

    p.info("\n5. The audit trail.");
    d.expect(&["journal", "list"], 0)?;
    let _ = d.run(&["journal", "verify"], None)?;
    let run = last_run_id(&home).unwrap_or_else(|| "<run>".to_owned());
    if p.json {
        p.json_doc(
            "demo",
            serde_json::json!({"home": home, "run_id": run, "workspace_digest": after, "restored": true}),
        );
    }
    p.info(format!(
        "\nDone. See the run's timeline: `nemoclaw --home {} journal show {run}`",
        home.display()
    ));
    Ok(Exit::Ok)
}
