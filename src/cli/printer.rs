//! The one place output happens. Data goes to stdout, messages to stderr. `--json` puts one
//! schema-versioned JSON document on stdout and keeps stderr for errors only.

use std::io::{IsTerminal, Write};

use super::args::{ColorChoice, Global};

/// Version of every `--json` document's envelope and payloads.
pub const JSON_SCHEMA_VERSION: u32 = 1;

/// Owns quiet / verbose / JSON / colour decisions.
#[derive(Debug, Clone)]
pub struct Printer {
    /// `--json` given.
    pub json: bool,
    /// `-q` given.
    pub quiet: bool,
    /// `-v` count.
    pub verbose: u8,
    /// Colour on stderr.
    pub color: bool,
    /// Colour on stdout.
    pub color_stdout: bool,
    /// stderr is a terminal (progress lines are shown only then).
    pub tty: bool,
}

impl Printer {
    /// Decide from the global flags and the environment.
    pub fn from_global(g: &Global) -> Self {
        let tty = std::io::stderr().is_terminal();
        let out_tty = std::io::stdout().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let decide = |is_tty: bool| match g.color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => is_tty && !no_color,
        };
        Self {
            json: g.json,
            quiet: g.quiet,
            verbose: g.verbose,
            color: decide(tty),
            color_stdout: decide(out_tty),
            tty,
        }
    }

    /// A plain printer (no colour, not quiet) for tests.
    pub fn plain() -> Self {
        Self {
            json: false,
            quiet: false,
            verbose: 0,
            color: false,
            color_stdout: false,
            tty: false,
        }
    }

    fn paint(&self, on: bool, code: &str, s: &str) -> String {
        if on {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }

    /// A progress or status message on stderr (suppressed by `-q` and `--json`).
    pub fn info(&self, msg: impl AsRef<str>) {
        if !self.quiet && !self.json {
            eprintln!("{}", msg.as_ref());
        }
    }

    /// A success line (`✓ ...`) on stderr.
    pub fn success(&self, msg: impl AsRef<str>) {
        if !self.quiet && !self.json {
            eprintln!("{}", self.paint(self.color, "32", msg.as_ref()));
        }
    }

    /// A warning on stderr (shown unless `-q`; shown with `--json` too, it is not data).
    pub fn warn(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{}", self.paint(self.color, "33", msg.as_ref()));
        }
    }

    /// A notice on stderr that is always shown, even with `-q` and `--json` (the answer to a
    /// Ctrl-C: the operator must know at once what the program is doing).
    pub fn notice(&self, msg: impl AsRef<str>) {
        eprintln!("{}", self.paint(self.color, "33", msg.as_ref()));
    }

    /// An error line on stderr (always shown).
    pub fn error(&self, msg: impl AsRef<str>) {
        eprintln!("{} {}", self.paint(self.color, "31;1", "error:"), msg.as_ref());
    }

    /// A `hint: ...` line on stderr (always shown: it names the next command).
    pub fn hint(&self, msg: impl AsRef<str>) {
        eprintln!("{} {}", self.paint(self.color, "36", "hint:"), msg.as_ref());
    }

    /// Detail shown with `-v`.
    pub fn debug(&self, msg: impl AsRef<str>) {
        if self.verbose > 0 && !self.json {
            eprintln!("{}", self.paint(self.color, "2", msg.as_ref()));
        }
    }

    /// One line of data on stdout.
    pub fn data(&self, line: impl AsRef<str>) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", line.as_ref());
    }

    /// Bold text for stdout tables, when colour is on.
    pub fn bold(&self, s: &str) -> String {
        self.paint(self.color_stdout, "1", s)
    }

    /// Dim text for stdout tables, when colour is on.
    pub fn dim(&self, s: &str) -> String {
        self.paint(self.color_stdout, "2", s)
    }

    /// The JSON document of a command: `{"schema_version":1,"type":kind,"data":data}` on stdout.
    pub fn json_doc(&self, kind: &str, data: serde_json::Value) {
        let doc = serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION,
            "type": kind,
            "data": data,
        });
        self.data(doc.to_string());
    }
}
