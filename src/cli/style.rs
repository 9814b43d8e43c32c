//! The one styling module: the `anstyle` styles nemoclaw's human output uses, the colour
//! decision, and the column layout of its tables.
//!
//! Colour is decided once, by `anstream`, for our output and clap's alike: `--color always|never`
//! sets the process-wide choice; with `auto` (the default) `NO_COLOR` turns colour off,
//! `CLICOLOR_FORCE` turns it on, and otherwise a terminal gets colour. Text is always styled
//! and the stream strips the styling when colour is off, so output reads the same without it:
//! every style only repeats what the words already say.

use anstyle::{AnsiColor, Style};

use super::args::ColorChoice;

/// `error:` labels.
pub const ERROR: Style = AnsiColor::Red.on_default().bold();
/// `warning:` labels and NemoClaw's `⚠` lines.
pub const WARNING: Style = AnsiColor::Yellow.on_default().bold();
/// `hint:` labels.
pub const HINT: Style = AnsiColor::Cyan.on_default().bold();
/// `caused by:` labels.
pub const CAUSE: Style = AnsiColor::Red.on_default();
/// `✓` lines.
pub const SUCCESS: Style = AnsiColor::Green.on_default();
/// Table headings.
pub const HEADING: Style = Style::new().bold();
/// Detail (`-v`, progress lines).
pub const DIM: Style = Style::new().dimmed();
/// A state that ended well.
pub const GOOD: Style = AnsiColor::Green.on_default();
/// A failure.
pub const BAD: Style = AnsiColor::Red.on_default();
/// Something still running.
pub const ACTIVE: Style = AnsiColor::Cyan.on_default();
/// Something a person should look at.
pub const ATTENTION: Style = AnsiColor::Yellow.on_default();
/// No style.
pub const PLAIN: Style = Style::new();

const ALL: [Style; 11] =
    [ERROR, WARNING, HINT, CAUSE, SUCCESS, HEADING, DIM, GOOD, BAD, ACTIVE, ATTENTION];

/// Set the colour choice for this process (our streams and clap's).
pub fn init(choice: ColorChoice) {
    anstream::ColorChoice::write_global(match choice {
        ColorChoice::Auto => anstream::ColorChoice::Auto,
        ColorChoice::Always => anstream::ColorChoice::Always,
        ColorChoice::Never => anstream::ColorChoice::Never,
    });
}

/// `--color` as written on the command line, before clap has parsed it (so that clap's own
/// help and usage errors follow it too): the last `--color X` or `--color=X`.
pub fn choice_in_argv(argv: &[std::ffi::OsString]) -> Option<ColorChoice> {
    use clap::ValueEnum;
    let mut found = None;
    for (i, a) in argv.iter().enumerate() {
        let a = a.to_string_lossy();
        let value = match a.strip_prefix("--color") {
            Some("") => argv.get(i + 1).map(|v| v.to_string_lossy().into_owned()),
            Some(v) => v.strip_prefix('=').map(str::to_owned),
            None => None,
        };
        if let Some(c) = value.and_then(|v| ColorChoice::from_str(&v, false).ok()) {
            found = Some(c);
        }
    }
    found
}

/// `text` in `style` (the stream strips it when colour is off).
pub fn paint(style: Style, text: &str) -> String {
    if style == PLAIN {
        return text.to_owned();
    }
    format!("{style}{text}{style:#}")
}

/// The escape sequences [`paint`] writes: on stdout only these survive
/// [`super::Printer::data`]'s escaping of control characters.
pub fn sequences() -> Vec<String> {
    let mut out: Vec<String> = ALL.iter().map(|s| s.render().to_string()).collect();
    out.push(ERROR.render_reset().to_string());
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out
}

/// The colour of a run or step state.
pub fn state(state: &str) -> Style {
    match state {
        "succeeded" | "done" | "compensated" | "rolled_back" => GOOD,
        "failed" => BAD,
        "running" | "started" | "compensating" | "rolling_back" => ACTIVE,
        "interrupted" | "needs_operator" => ATTENTION,
        _ => PLAIN,
    }
}

/// The colour of a journal event kind.
pub fn event(kind: &str) -> Style {
    match kind {
        k if k.contains("failed") => BAD,
        k if k.contains("takeover") || k.contains("interrupted") || k.contains("operator") => {
            ATTENTION
        }
        "step_done" | "run_succeeded" | "run_rolled_back" | "step_compensated" => GOOD,
        _ => PLAIN,
    }
}

/// One cell of a [`table`]: its text (escaped for the terminal) and its style.
#[derive(Debug, Clone)]
pub struct Cell {
    text: String,
    style: Style,
}

impl Cell {
    /// A cell in a style.
    pub fn styled(text: impl AsRef<str>, style: Style) -> Self {
        Self { text: super::printer::clean(text.as_ref()).into_owned(), style }
    }
}

impl From<String> for Cell {
    fn from(s: String) -> Self {
        Cell::styled(s, PLAIN)
    }
}

impl From<&str> for Cell {
    fn from(s: &str) -> Self {
        Cell::styled(s, PLAIN)
    }
}

/// Lay rows out in columns two spaces apart, each line starting with `indent`. A non-empty
/// `heading` is the first line, in [`HEADING`]; with an empty one, the first column is the
/// heading (a key/value table). Widths count characters of the plain text, so styling never
/// shifts a column; the last column is not padded.
pub fn table(indent: &str, heading: &[&str], rows: Vec<Vec<Cell>>) -> Vec<String> {
    let mut all: Vec<Vec<Cell>> = Vec::with_capacity(rows.len() + 1);
    if !heading.is_empty() {
        all.push(heading.iter().map(|h| Cell::styled(h, HEADING)).collect());
    }
    let key_value = heading.is_empty();
    all.extend(rows.into_iter().map(|mut r| {
        if let (true, Some(first)) = (key_value, r.first_mut()) {
            first.style = HEADING;
        }
        r
    }));
    let ncols = all.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; ncols];
    for r in &all {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.text.chars().count());
        }
    }
    all.iter()
        .map(|r| {
            let mut line = String::from(indent);
            for (i, c) in r.iter().enumerate() {
                line.push_str(&paint(c.style, &c.text));
                if i + 1 < r.len() {
                    line.push_str(&" ".repeat(widths[i] - c.text.chars().count() + 2));
                }
            }
            line.trim_end().to_owned()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_on_the_plain_text_and_styles_are_ansi() {
        let lines = table(
            "  ",
            &["NAME", "STATE", "NOTE"],
            vec![
                vec!["alpha".into(), Cell::styled("succeeded", state("succeeded")), "".into()],
                vec!["b\x1b[8m".into(), Cell::styled("failed", state("failed")), "x".into()],
            ],
        );
        let plain: Vec<String> = lines
            .iter()
            .map(|l| sequences().iter().fold(l.clone(), |l, s| l.replace(s.as_str(), "")))
            .collect();
        assert_eq!(plain[0], "  NAME      STATE      NOTE");
        assert_eq!(plain[1], "  alpha     succeeded");
        assert_eq!(plain[2], "  b\\x1b[8m  failed     x");
        assert!(lines[1].contains("\x1b[32msucceeded\x1b[0m"), "{:?}", lines[1]);
        assert!(lines[0].starts_with("  \x1b[1mNAME\x1b[0m"), "{:?}", lines[0]);
    }

    #[test]
    fn key_value_tables_bold_the_keys() {
        let lines = table("", &[], vec![vec!["Run".into(), "r1".into()]]);
        assert_eq!(lines, ["\x1b[1mRun\x1b[0m  r1"]);
    }

    #[test]
    fn color_is_read_from_argv_before_parsing() {
        let argv = |s: &str| s.split(' ').map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(choice_in_argv(&argv("nemoclaw --color never list")), Some(ColorChoice::Never));
        assert_eq!(
            choice_in_argv(&argv("nemoclaw list --color=always")),
            Some(ColorChoice::Always)
        );
        assert_eq!(choice_in_argv(&argv("nemoclaw list")), None);
    }
}
