//! The one place output happens. Data goes to stdout, messages to stderr. `--json` puts one
//! schema-versioned JSON document on stdout and keeps stderr for errors only.

use std::io::{IsTerminal, Write};

use super::args::{ColorChoice, Global};

/// Version of every `--json` document's envelope and payloads.
pub const JSON_SCHEMA_VERSION: u32 = 1;

/// The styling sequences nemoclaw itself writes (bold, dim, reset, and the state colours of
/// the tables); on stdout with colour on, only these survive [`Printer::data`]. Foreign text
/// may still carry one of them: that changes a colour, never the cursor or the title.
const OURS: &[&str] = &[
    "\x1b[0m",
    "\x1b[1m",
    "\x1b[2m",
    "\x1b[31m",
    "\x1b[32m",
    "\x1b[33m",
    "\x1b[36m",
    "\x1b[31;1m",
];
#[cfg(test)]
const BOLD: &str = "\x1b[1m";
#[cfg(test)]
const RESET: &str = "\x1b[0m";

/// Text for a terminal, with every control character but newline and tab written out as an
/// escape (`\x1b`, `\r`, `\x07`, …), and C1 controls and DEL too: the text may come from
/// `openshell` output, registry keys or journal rows, and none of them may move the cursor,
/// retitle the window (OSC) or hide what came before (`\r`).
pub fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    clean_keeping(s, &[])
}

fn clean_keeping<'a>(s: &'a str, keep: &[&str]) -> std::borrow::Cow<'a, str> {
    let bad = |c: char| (c.is_control() && c != '\n' && c != '\t') || c == '\u{7f}';
    if !s.chars().any(bad) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    let mut rest = s;
    'outer: while let Some(c) = rest.chars().next() {
        for k in keep {
            if let Some(r) = rest.strip_prefix(k) {
                out.push_str(k);
                rest = r;
                continue 'outer;
            }
        }
        match c {
            '\r' => out.push_str("\\r"),
            c if bad(c) => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
        rest = &rest[c.len_utf8()..];
    }
    std::borrow::Cow::Owned(out)
}

/// Whether this process has printed its JSON document: a command that reports a failure in its
/// own document (`journal verify` finding tampering) gets no second, `error`, document.
static DOC_PRINTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a JSON document went to stdout already.
pub fn doc_printed() -> bool {
    DOC_PRINTED.load(std::sync::atomic::Ordering::Relaxed)
}

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
            eprintln!("{}", clean(msg.as_ref()));
        }
    }

    /// A success line (`✓ ...`) on stderr.
    pub fn success(&self, msg: impl AsRef<str>) {
        if !self.quiet && !self.json {
            eprintln!("{}", self.paint(self.color, "32", &clean(msg.as_ref())));
        }
    }

    /// A warning on stderr (shown unless `-q`; shown with `--json` too, it is not data).
    pub fn warn(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{}", self.paint(self.color, "33", &clean(msg.as_ref())));
        }
    }

    /// A notice on stderr that is always shown, even with `-q` and `--json` (the answer to a
    /// Ctrl-C: the operator must know at once what the program is doing).
    pub fn notice(&self, msg: impl AsRef<str>) {
        eprintln!("{}", self.paint(self.color, "33", &clean(msg.as_ref())));
    }

    /// A plain line on stderr that is always shown: the rest of an error or refusal.
    pub fn say(&self, msg: impl AsRef<str>) {
        eprintln!("{}", clean(msg.as_ref()));
    }

    /// An error line on stderr (always shown).
    pub fn error(&self, msg: impl AsRef<str>) {
        eprintln!("{} {}", self.paint(self.color, "31;1", "error:"), clean(msg.as_ref()));
    }

    /// A `caused by: ...` line on stderr, under an error (always shown).
    pub fn cause(&self, msg: impl AsRef<str>) {
        eprintln!("  {} {}", self.paint(self.color, "31", "caused by:"), clean(msg.as_ref()));
    }

    /// A `hint: ...` line on stderr (always shown: it names the next command).
    pub fn hint(&self, msg: impl AsRef<str>) {
        eprintln!("{} {}", self.paint(self.color, "36", "hint:"), clean(msg.as_ref()));
    }

    /// Detail shown with `-v`.
    pub fn debug(&self, msg: impl AsRef<str>) {
        if self.verbose > 0 && !self.json {
            eprintln!("{}", self.paint(self.color, "2", &clean(msg.as_ref())));
        }
    }

    /// One line of data on stdout (control characters escaped; see [`Printer::bold`]).
    pub fn data(&self, line: impl AsRef<str>) {
        let line = line.as_ref();
        let mut out = std::io::stdout().lock();
        // Our own styling was added around already-escaped text (`bold`, `dim`, the tables'
        // state colours); only those exact sequences survive.
        let _ = if self.color_stdout {
            writeln!(out, "{}", clean_keeping(line, OURS))
        } else {
            writeln!(out, "{}", clean(line))
        };
    }

    /// Bold text for stdout tables, when colour is on (the text itself is escaped).
    pub fn bold(&self, s: &str) -> String {
        self.paint(self.color_stdout, "1", &clean(s))
    }

    /// Dim text for stdout tables, when colour is on (the text itself is escaped).
    pub fn dim(&self, s: &str) -> String {
        self.paint(self.color_stdout, "2", &clean(s))
    }

    /// Ask a yes/no question on stderr and read the answer from stdin: `y` or `yes` in any
    /// case is yes, anything else (an empty line, end of input) is no, answered with
    /// `Aborted: nothing was changed.`. Callers refuse first when stdin is not a terminal.
    pub fn confirm(&self, question: &str) -> bool {
        use std::io::BufRead;
        eprint!("{} [y/N] ", clean(question));
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        let read = std::io::stdin().lock().read_line(&mut line).is_ok();
        let yes = read && is_yes(&line);
        if !yes {
            self.say("Aborted: nothing was changed.");
        }
        yes
    }

    /// Bytes on stdout as they are (a generated script or man page, not foreign text).
    pub fn raw(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        out.write_all(bytes)?;
        out.flush()
    }

    /// The JSON document of a command: `{"schema_version":1,"type":kind,"data":data}` on stdout.
    pub fn json_doc(&self, kind: &str, data: serde_json::Value) {
        DOC_PRINTED.store(true, std::sync::atomic::Ordering::Relaxed);
        let doc = serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION,
            "type": kind,
            "data": data,
        });
        self.data(doc.to_string());
    }
}

/// The answers [`Printer::confirm`] takes as yes.
fn is_yes(answer: &str) -> bool {
    let a = answer.trim();
    a.eq_ignore_ascii_case("y") || a.eq_ignore_ascii_case("yes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yes_is_y_or_yes_in_any_case_and_nothing_else() {
        for a in ["y", "Y", "yes", "YES", "Yes\n", " yEs "] {
            assert!(is_yes(a), "{a:?}");
        }
        for a in ["", "\n", "n", "no", "yess", "ye", "sure", "y y"] {
            assert!(!is_yes(a), "{a:?}");
        }
    }

    #[test]
    fn control_characters_are_escaped_and_only_our_styling_survives() {
        assert_eq!(clean("plain\ttext\nnext"), "plain\ttext\nnext");
        assert_eq!(
            clean("a\x1b]0;pwned\x07b\rc\0d\u{9b}e\u{7f}"),
            "a\\x1b]0;pwned\\x07b\\rc\\x00d\\x9be\\x7f"
        );
        let styled = format!("{BOLD}name{RESET} \x1b[8mhidden");
        assert_eq!(clean_keeping(&styled, OURS), format!("{BOLD}name{RESET} \\x1b[8mhidden"));
    }
}
