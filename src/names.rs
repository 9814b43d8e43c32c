//! Validated sandbox names. A `SandboxName` can only be built from a DNS-1123 label, so an
//! invalid name can never reach a path or a command line (spec §7).

use std::fmt;

/// A sandbox name that is a valid DNS-1123 label: lowercase ASCII alphanumerics and `-`,
/// 1–63 characters, no leading or trailing `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct SandboxName(String);

/// Why a string is not a valid sandbox name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid sandbox name `{name}`: {why} (a name is 1-63 lowercase letters, digits and `-`, not starting or ending with `-`)")]
pub struct InvalidName {
    /// The rejected input, escaped for display.
    pub name: String,
    /// What rule it broke.
    pub why: &'static str,
}

impl SandboxName {
    /// Validate `s` as a DNS-1123 label.
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        let bad = |why| InvalidName { name: s.escape_default().to_string(), why };
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        if s.len() > 63 {
            return Err(bad("it is longer than 63 characters"));
        }
        if !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Err(bad("it contains a character other than a-z, 0-9 and `-`"));
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(bad("it starts or ends with `-`"));
        }
        Ok(Self(s.to_owned()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for SandboxName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for SandboxName {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for SandboxName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case::simple("demo")]
    #[case::dashes("my-assistant-2")]
    #[case::one("a")]
    #[case::max(&"a".repeat(63))]
    fn accepts(#[case] s: &str) {
        assert_eq!(SandboxName::parse(s).unwrap().as_str(), s);
    }

    #[rstest]
    #[case::traversal("../x")]
    #[case::upper("A")]
    #[case::leading_dash("-a")]
    #[case::trailing_dash("a-")]
    #[case::too_long(&"a".repeat(64))]
    #[case::shell("a;rm")]
    #[case::empty("")]
    #[case::slash("a/b")]
    #[case::space("a b")]
    #[case::nul("a\0b")]
    fn rejects(#[case] s: &str) {
        assert!(SandboxName::parse(s).is_err(), "{s:?} must be rejected");
    }
}
