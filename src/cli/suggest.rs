//! Words that are neither a command nor `<name> <action>`: a mistyped command (`lst`,
//! `jornal list`) gets clap's kind of "a similar command exists", and a NemoClaw action this
//! tool does not have (`connect`, `logs`, …) gets a message saying so, instead of being taken
//! for a sandbox name. Only consulted once `<name> <action>` failed to parse, so a sandbox
//! that really is named `lst` still works with an action after it.

/// Top-level commands.
const COMMANDS: &[&str] =
    &["onboard", "list", "recover", "journal", "demo", "completion", "man", "help"];

/// NemoClaw's own sandbox actions that nemoclaw does not implement.
const NEMOCLAW_ONLY: &[&str] = &[
    "connect",
    "logs",
    "exec",
    "start",
    "stop",
    "snapshot",
    "policy-add",
    "policy-list",
    "policy-remove",
    "credentials",
    "skill",
    "update",
    "upgrade",
];

const USAGE: &str = "Usage: nemoclaw [OPTIONS] <COMMAND>\n       nemoclaw [OPTIONS] <NAME> <status|rebuild|shields|destroy>\n\nFor more information, try '--help'.";

/// The closest command to `word`, if it is close enough to be a typo of it.
fn similar(word: &str) -> Option<&'static str> {
    COMMANDS
        .iter()
        .map(|c| (strsim::jaro_winkler(word, c), *c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// The message for `words` (the arguments from the first non-flag word on), or `None` to let
/// clap's own error stand (e.g. `nemoclaw alpha rebuld`, where clap suggests `rebuild`).
pub fn explain(words: &[String]) -> Option<String> {
    let first = words.first()?;
    let second = words.get(1).map(String::as_str);
    if let Some(a) = second.filter(|a| NEMOCLAW_ONLY.contains(a)) {
        return Some(format!(
            "error: `{a}` is a NemoClaw command that nemoclaw does not implement\n\n  \
             nemoclaw does status, rebuild, shields and destroy on a sandbox, and recover and \
             journal for runs; run `{a}` with NemoClaw's own CLI.\n\n{USAGE}"
        ));
    }
    if let Some(c) = similar(first) {
        return Some(format!(
            "error: unrecognized command '{first}'\n\n  tip: a similar command exists: '{c}'\n\n{USAGE}"
        ));
    }
    if second.is_none() {
        return Some(format!(
            "error: '{first}' is not a command\n\n  tip: for a sandbox named '{first}', give an action: `nemoclaw {first} status|rebuild|shields|destroy`\n\n{USAGE}"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    #[rstest::rstest]
    #[case::list("lst", Some("'list'"))]
    #[case::recover("recovr", Some("'recover'"))]
    #[case::journal("jornal list", Some("'journal'"))]
    #[case::onboard("onbaord x", Some("'onboard'"))]
    #[case::nemoclaw_only("alpha connect", Some("does not implement"))]
    #[case::logs("alpha logs", Some("does not implement"))]
    #[case::lone_name("alpha", Some("give an action"))]
    #[case::action_typo_is_clap_s("alpha rebuld", None)]
    fn explains(#[case] argv: &str, #[case] want: Option<&str>) {
        let got = explain(&words(argv));
        match want {
            Some(w) => assert!(got.as_deref().is_some_and(|g| g.contains(w)), "{argv}: {got:?}"),
            None => assert_eq!(got, None, "{argv}"),
        }
    }
}
