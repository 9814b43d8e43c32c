//! Shared helpers: a scratch NemoClaw home and a way to run the binary in it, the one seeded
//! PRNG, the one "was it killed" check, and the `sqlite3` shell (found on PATH; tests that need
//! it skip, saying so, when it is absent).

#![allow(dead_code)]

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};

/// Path of the built `nemoclaw` binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nemoclaw"))
}

/// A scratch NemoClaw home, removed on drop.
pub struct Home {
    pub dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Self {
        Self { dir: tempfile::Builder::new().prefix("nemoclaw-it-").tempdir().unwrap() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A command for the binary with this home, colour off, and no inherited NemoClaw or
    /// OpenShell environment.
    pub fn cmd(&self) -> Command {
        cmd_in(self.path())
    }

    /// Run with arguments and capture everything.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("spawn nemoclaw")
    }
}

/// A command for the binary with NemoClaw home `home`, colour off, and no inherited NemoClaw or
/// OpenShell environment.
pub fn cmd_in(home: &Path) -> Command {
    let mut c = Command::new(bin());
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("NEMOCLAW_HOME", home)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null());
    c
}

/// Wait for a child with a timeout (killing it, and failing, on timeout), capturing its output.
pub fn wait_output(mut child: std::process::Child, timeout: std::time::Duration) -> Output {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait().expect("wait for nemoclaw") {
            Some(_) => return child.wait_with_output().expect("collect output"),
            None if std::time::Instant::now() > deadline => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("collect output");
                panic!("nemoclaw timed out; stderr: {}", stderr(&out));
            }
            // Deliberate: polling a child for exit.
            None => std::thread::sleep(std::time::Duration::from_millis(2)),
        }
    }
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Nanoseconds since the epoch: a default seed that differs between runs.
pub fn nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// A tiny deterministic PRNG: a seeded test must replay from its seed alone.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi] (inclusive).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What [`killed`] accepts: an exit status, or a command's whole output.
pub trait HasStatus {
    /// The exit status.
    fn exit_status(&self) -> ExitStatus;
}

impl HasStatus for ExitStatus {
    fn exit_status(&self) -> ExitStatus {
        *self
    }
}

impl HasStatus for Output {
    fn exit_status(&self) -> ExitStatus {
        self.status
    }
}

/// Whether the process died of SIGKILL (an armed crash point, or `kill -9`).
pub fn killed(s: &impl HasStatus) -> bool {
    s.exit_status().signal() == Some(libc::SIGKILL)
}

/// The `sqlite3` shell on PATH, if there is one.
pub fn sqlite3_path() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join("sqlite3")).find(|p| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// The full name of the function this is expanded in (for skip messages).
macro_rules! function_name {
    () => {{
        fn f() {}
        let name = std::any::type_name_of_val(&f);
        name.strip_suffix("::f").unwrap_or(name)
    }};
}
pub(crate) use function_name;

/// Return from the calling test, saying so on stderr, when the `sqlite3` shell is not on PATH.
/// Every test that uses [`sqlite`], [`sqlite3_cmd`] starts with it.
macro_rules! need_sqlite3 {
    () => {
        if $crate::common::sqlite3_path().is_none() {
            eprintln!(
                "{}: SKIPPED: needs the `sqlite3` shell on PATH (e.g. `apt-get install sqlite3`)",
                $crate::common::function_name!()
            );
            return;
        }
    };
}
pub(crate) use need_sqlite3;

/// A command for the `sqlite3` shell on PATH. The calling test must have begun with
/// [`need_sqlite3!`]; without the shell this panics saying so.
pub fn sqlite3_cmd() -> Command {
    let bin = sqlite3_path()
        .expect("the `sqlite3` shell is not on PATH: start the test with `need_sqlite3!()`");
    Command::new(bin)
}

/// Run `sql` with the `sqlite3` shell on the journal of `home`; its stdout, trimmed. Fails the
/// test when the shell does.
pub fn sqlite(home: &Path, sql: &str) -> String {
    let o = sqlite3_cmd().arg(home.join("journal.sqlite3")).arg(sql).output().expect("sqlite3");
    assert!(o.status.success(), "sqlite3: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Write an executable shell script (a wrapper or shim in front of a program).
pub fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}
