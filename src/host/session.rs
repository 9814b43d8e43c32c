//! NemoClaw's onboard session, `<home>/onboard-session.json` (spec §2.2). One per host, and it
//! may belong to another sandbox: the rebuild takes `fromDockerfile` / `credentialEnv` from it only
//! when `sandboxName` matches. Read-only here.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{read_optional, HostError};

/// File name of the session inside the NemoClaw home.
pub const SESSION_FILE: &str = "onboard-session.json";

/// A parsed onboard session (version 1), kept verbatim.
#[derive(Debug, Clone, PartialEq)]
pub struct OnboardSession {
    /// Where it was read from.
    pub path: PathBuf,
    /// The document, verbatim.
    pub doc: Value,
}

impl OnboardSession {
    /// Read the session. `Ok(None)` when there is none; a file that is not JSON, not an object
    /// or not `version: 1` is [`HostError::Corrupt`] naming it.
    pub fn load(home: &Path) -> Result<Option<OnboardSession>, HostError> {
        let path = home.join(SESSION_FILE);
        let Some(bytes) = read_optional(&path)? else { return Ok(None) };
        let doc: Value = serde_json::from_slice(&bytes)
            .map_err(|e| HostError::corrupt(&path, format!("invalid JSON ({e})")))?;
        if !doc.is_object() {
            return Err(HostError::corrupt(&path, "the document is not a JSON object"));
        }
        match doc.get("version").and_then(Value::as_u64) {
            Some(1) => Ok(Some(OnboardSession { path, doc })),
            _ => Err(HostError::corrupt(
                &path,
                format!(
                    "unsupported session version {} (expected 1)",
                    doc.get("version").unwrap_or(&Value::Null)
                ),
            )),
        }
    }

    fn str_field(&self, key: &str) -> Option<&str> {
        self.doc.get(key).and_then(Value::as_str)
    }

    /// The sandbox this session belongs to.
    pub fn sandbox_name(&self) -> Option<&str> {
        self.str_field("sandboxName")
    }

    /// Whether the session belongs to `name`.
    pub fn belongs_to(&self, name: &str) -> bool {
        self.sandbox_name() == Some(name)
    }

    /// Provider.
    pub fn provider(&self) -> Option<&str> {
        self.str_field("provider")
    }

    /// Model.
    pub fn model(&self) -> Option<&str> {
        self.str_field("model")
    }

    /// Name of the environment variable holding the credential (never its value).
    pub fn credential_env(&self) -> Option<&str> {
        self.str_field("credentialEnv")
    }

    /// Agent kind.
    pub fn agent(&self) -> Option<&str> {
        self.str_field("agent")
    }

    /// Session status (`complete`, `in_progress`, ...).
    pub fn status(&self) -> Option<&str> {
        self.str_field("status")
    }

    /// `metadata.gatewayName`.
    pub fn gateway_name(&self) -> Option<&str> {
        self.doc.pointer("/metadata/gatewayName").and_then(Value::as_str)
    }

    /// `metadata.fromDockerfile`.
    pub fn from_dockerfile(&self) -> Option<&str> {
        self.doc.pointer("/metadata/fromDockerfile").and_then(Value::as_str)
    }
}
