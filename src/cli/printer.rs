//! The one place output happens. Data goes to stdout, messages to stderr. `--json` puts one
//! schema-versioned JSON document on stdout and keeps stderr for errors only.

use std::io::{IsTerminal, Write};

use super::args::Global;
use super::style;

/// Version of every `--json` document's envelope and payloads.
pub const JSON_SCHEMA_VERSION: u32 = 1;

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

/// Owns quiet / verbose / JSON decisions; colour is `anstream`'s (see [`super::style`]).
#[derive(Debug, Clone)]
pub struct Printer {
    /// `--json` given.
    pub json: bool,
    /// `-q` given.
    pub quiet: bool,
    /// `-v` count.
    pub verbose: u8,
    /// stderr is a terminal (progress lines are shown only then).
    pub tty: bool,
}

/// A line on stderr, through the colour-aware stream.
fn err_line(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(anstream::stderr(), "{line}");
}

impl Printer {
    /// Decide from the global flags and the environment; sets the process's colour choice.
    pub fn from_global(g: &Global) -> Self {
        style::init(g.color);
        Self {
            json: g.json,
            quiet: g.quiet,
            verbose: g.verbose,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// A plain printer (not quiet, no JSON).
    pub fn plain() -> Self {
        Self { json: false, quiet: false, verbose: 0, tty: false }
    }

    /// A progress or status message on stderr (suppressed by `-q` and `--json`).
    pub fn info(&self, msg: impl AsRef<str>) {
        if !self.quiet && !self.json {
            err_line(format_args!("{}", clean(msg.as_ref())));
        }
    }

    /// A success line (`✓ ...`) on stderr.
    pub fn success(&self, msg: impl AsRef<str>) {
        if !self.quiet && !self.json {
            err_line(format_args!("{}", style::paint(style::SUCCESS, &clean(msg.as_ref()))));
        }
    }

    /// A warning on stderr (shown unless `-q`; shown with `--json` too, it is not data):
    /// `warning: ...`, or one of NemoClaw's own `⚠ ...` lines as it is (the `⚠` is its label).
    pub fn warn(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            self.warning_line(msg.as_ref());
        }
    }

    /// A notice on stderr that is always shown, even with `-q` and `--json` (the answer to a
    /// Ctrl-C: the operator must know at once what the program is doing).
    pub fn notice(&self, msg: impl AsRef<str>) {
        err_line(format_args!("{}", style::paint(style::WARNING, &clean(msg.as_ref()))));
    }

    fn warning_line(&self, msg: &str) {
        let msg = clean(msg);
        if msg.starts_with('⚠') {
            err_line(format_args!("{}", style::paint(style::WARNING, &msg)));
        } else {
            err_line(format_args!("{} {msg}", style::paint(style::WARNING, "warning:")));
        }
    }

    /// A plain line on stderr that is always shown: the rest of an error or refusal.
    pub fn say(&self, msg: impl AsRef<str>) {
        err_line(format_args!("{}", clean(msg.as_ref())));
    }

    /// An error line on stderr (always shown).
    pub fn error(&self, msg: impl AsRef<str>) {
        err_line(format_args!("{} {}", style::paint(style::ERROR, "error:"), clean(msg.as_ref())));
    }

    /// A `caused by: ...` line on stderr, under an error (always shown).
    pub fn cause(&self, msg: impl AsRef<str>) {
        err_line(format_args!(
            "  {} {}",
            style::paint(style::CAUSE, "caused by:"),
            clean(msg.as_ref())
        ));
    }

    /// A `hint: ...` line on stderr (always shown: it names the next command).
    pub fn hint(&self, msg: impl AsRef<str>) {
        err_line(format_args!("{} {}", style::paint(style::HINT, "hint:"), clean(msg.as_ref())));
    }

    /// Detail shown with `-v`.
    pub fn debug(&self, msg: impl AsRef<str>) {
        if self.verbose > 0 && !self.json {
            err_line(format_args!("{}", style::paint(style::DIM, &clean(msg.as_ref()))));
        }
    }

    /// A dimmed progress line on stderr (suppressed by `-q` and `--json`).
    pub fn progress(&self, msg: impl AsRef<str>) {
        if !self.quiet && !self.json {
            err_line(format_args!("{}", style::paint(style::DIM, &clean(msg.as_ref()))));
        }
    }

    /// One line of data on stdout, control characters escaped. Our own styling (from
    /// [`style::paint`] and [`style::table`], around already-escaped text) survives; any
    /// other escape sequence is written out as text.
    pub fn data(&self, line: impl AsRef<str>) {
        let ours = style::sequences();
        let keep: Vec<&str> = ours.iter().map(String::as_str).collect();
        let _ = writeln!(anstream::stdout(), "{}", clean_keeping(line.as_ref(), &keep));
    }

    /// A table on stdout (see [`style::table`]).
    pub fn table(&self, indent: &str, heading: &[&str], rows: Vec<Vec<style::Cell>>) {
        for line in style::table(indent, heading, rows) {
            self.data(line);
        }
    }

    /// Bold text for stdout (the text itself is escaped).
    pub fn bold(&self, s: &str) -> String {
        style::paint(style::HEADING, &clean(s))
    }

    /// Ask a yes/no question on stderr and read the answer from stdin: `y` or `yes` in any
    /// case is yes, anything else (an empty line, end of input) is no, answered with
    /// `Aborted: nothing was changed.`. Callers refuse first when stdin is not a terminal.
    pub fn confirm(&self, question: &str) -> bool {
        use std::io::BufRead;
        let mut err = anstream::stderr();
        let _ = write!(err, "{} [y/N] ", clean(question));
        let _ = err.flush();
        let mut line = String::new();
        let read = std::io::stdin().lock().read_line(&mut line).is_ok();
        let yes = read && is_yes(&line);
        if !yes {
            self.say("Aborted: nothing was changed.");
        }
        yes
    }

    /// A buffered stream on stdout for records written as they are read (`journal export`'s
    /// JSON Lines: exact JSON, escaped by the serialiser, never styled).
    pub fn stream(&self) -> impl Write {
        std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock())
    }

    /// Bytes on stdout as they are (a generated script or man page, not foreign text).
    pub fn raw(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        out.write_all(bytes)?;
        out.flush()
    }

    /// The JSON document of a command: `{"schema_version":1,"type":kind,"data":data}` on stdout
    /// (never styled: JSON carries the exact text).
    pub fn json_doc(&self, kind: &str, data: serde_json::Value) {
        DOC_PRINTED.store(true, std::sync::atomic::Ordering::Relaxed);
        let doc = serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION,
            "type": kind,
            "data": data,
        });
        let _ = writeln!(std::io::stdout().lock(), "{doc}");
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
        let styled = format!("{} \x1b[8mhidden", style::paint(style::HEADING, "name"));
        let ours = style::sequences();
        let keep: Vec<&str> = ours.iter().map(String::as_str).collect();
        assert_eq!(clean_keeping(&styled, &keep), "\x1b[1mname\x1b[0m \\x1b[8mhidden");
    }
}
