//! What the rebuild journals: its run's params and each step's output, as serde types.
//!
//! Field names are the journaled keys and fields are declared in the order they were always
//! written, so a new run journals the same JSON as before these types existed, and every
//! journal written since the first rebuild still reads: fields added later (`prior_policy`,
//! `policy_sha256`) default when absent, and unknown fields are ignored. A value that does not
//! decode is corrupt input (exit 65, through [`crate::engine::DataError`]), never a default.

use serde::{Deserialize, Serialize};

use super::Mode;
use crate::names::SandboxName;

/// A rebuild run's params: enough to rebuild the same plan in another process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebuildParams {
    /// The sandbox.
    pub sandbox: SandboxName,
    /// Its gateway binding.
    pub gateway: String,
    /// Normal or stale.
    pub mode: Mode,
    /// Image for the recreate.
    pub image: String,
    /// Backup directory name (fixed at run creation so a retried backup lands in the same place).
    pub backup_ts: String,
    /// Whether shields were up when the run started (decides whether `shields_down` is planned).
    pub shields_locked: bool,
    /// What preflight's classification saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
    /// Stale mode: the earlier run whose snapshot holds the sandbox's last policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior_policy: Option<PriorPolicy>,
}

/// Preflight's classification of the sandbox, journaled with the run (and copied into the
/// snapshot's output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// The gateway asked.
    pub gateway: String,
    /// `present` or `missing`.
    pub status: String,
    /// The live sandbox's id (present only): `remove` deletes only this sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Its phase (present only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

/// The run whose snapshot holds the policy a stale recovery recreates with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriorPolicy {
    /// That run's id.
    pub run: String,
    /// Its journaled snapshot digest, checked before the policy is used.
    pub snapshot_sha256: String,
}

/// `snapshot`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotOutput {
    /// The snapshot file.
    pub snapshot_path: String,
    /// Its sha256: every later read of the file is checked against it.
    pub snapshot_sha256: String,
    /// Whether the sandbox was `defaultSandbox`.
    pub was_default: bool,
    /// Whether shields were up.
    pub shields_locked: bool,
    /// The run's [`Evidence`] (`null` when it had none).
    #[serde(default)]
    pub evidence: Option<Evidence>,
    /// sha256 of the captured live policy, `null` when none was captured.
    #[serde(default)]
    pub policy_sha256: Option<String>,
}

/// `shields_down`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShieldsDownOutput {
    /// Always true once done.
    pub unlocked: bool,
}

/// `backup`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupOutput {
    /// The backup directory.
    pub backup_path: String,
    /// sha256 of its manifest: restore refuses a backup whose manifest differs.
    pub manifest_sha256: String,
    /// Files in the manifest.
    pub files: usize,
    /// Their total size.
    pub bytes: u64,
}

/// `remove`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoveOutput {
    /// Always true once done.
    pub deleted: bool,
}

/// `onboard`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnboardOutput {
    /// The new sandbox's id.
    pub id: String,
    /// The image recorded for it.
    pub image: String,
}

/// `restore`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreOutput {
    /// Files verified in the new sandbox.
    pub verified_files: usize,
}

/// `policies`' output: the captured policy handed over, or the presets re-applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PoliciesOutput {
    /// The replacement enforces the policy captured before the delete.
    Handoff {
        /// Always true.
        handoff: bool,
        /// sha256 of the captured policy.
        policy_sha256: String,
        /// Always true: the live policy was read back and compared.
        verified: bool,
    },
    /// Presets and custom policies re-applied from the registry row.
    Applied {
        /// Names applied.
        applied: Vec<String>,
        /// NemoClaw's non-fatal warnings for the ones that could not be.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        warnings: Vec<String>,
    },
}

/// `shields`' output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShieldsOutput {
    /// Shields are up again (normal mode, when they were).
    pub locked: bool,
    /// The stale seal was removed (stale mode, when there was one).
    pub stale_seal_cleared: bool,
    /// Whether shields were up when the run started.
    pub was_locked: bool,
}

/// Encode a step's output for the journal. The types above hold only strings, numbers and
/// booleans, so encoding cannot fail; a failure would be a bug, reported as a step failure.
pub fn encode<T: Serialize>(v: &T) -> Result<serde_json::Value, crate::engine::StepError> {
    serde_json::to_value(v)
        .map_err(|e| crate::engine::StepError::new(format!("cannot encode a step output: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::decode;
    use serde_json::{json, Value};

    /// The exact JSON the steps journaled before these types existed (from the `json!`
    /// literals they replaced), byte for byte.
    #[test]
    fn new_runs_journal_the_same_bytes_as_before() {
        let params = RebuildParams {
            sandbox: SandboxName::parse("alpha").unwrap(),
            gateway: "nemoclaw".into(),
            mode: Mode::Normal,
            image: "img".into(),
            backup_ts: "2026-12-06T19-00-00-000Z".into(),
            shields_locked: true,
            evidence: Some(Evidence {
                gateway: "nemoclaw".into(),
                status: "present".into(),
                id: Some("sb-1".into()),
                phase: Some("Ready".into()),
            }),
            prior_policy: None,
        };
        let old = json!({
            "sandbox": "alpha", "gateway": "nemoclaw", "mode": "normal", "image": "img",
            "backup_ts": "2026-12-06T19-00-00-000Z", "shields_locked": true,
            "evidence": {"gateway": "nemoclaw", "status": "present", "id": "sb-1", "phase": "Ready"},
        });
        assert_eq!(serde_json::to_string(&params).unwrap(), old.to_string());
        let stale = RebuildParams {
            mode: Mode::Stale,
            evidence: Some(Evidence {
                gateway: "nemoclaw".into(),
                status: "missing".into(),
                id: None,
                phase: None,
            }),
            prior_policy: Some(PriorPolicy { run: "r1".into(), snapshot_sha256: "d".into() }),
            ..params
        };
        let mut old = json!({
            "sandbox": "alpha", "gateway": "nemoclaw", "mode": "stale", "image": "img",
            "backup_ts": "2026-12-06T19-00-00-000Z", "shields_locked": true,
            "evidence": {"gateway": "nemoclaw", "status": "missing"},
        });
        old["prior_policy"] = json!({"run": "r1", "snapshot_sha256": "d"});
        assert_eq!(serde_json::to_string(&stale).unwrap(), old.to_string());

        let snap = SnapshotOutput {
            snapshot_path: "/h/rebuild-runs/r.json".into(),
            snapshot_sha256: "s".into(),
            was_default: false,
            shields_locked: true,
            evidence: None,
            policy_sha256: None,
        };
        let old = json!({"snapshot_path": "/h/rebuild-runs/r.json", "snapshot_sha256": "s",
            "was_default": false, "shields_locked": true, "evidence": Value::Null,
            "policy_sha256": Value::Null});
        assert_eq!(serde_json::to_string(&snap).unwrap(), old.to_string());

        let cases: Vec<(Value, Value)> = vec![
            (json!(ShieldsDownOutput { unlocked: true }), json!({"unlocked": true})),
            (
                json!(BackupOutput {
                    backup_path: "/b".into(),
                    manifest_sha256: "m".into(),
                    files: 3,
                    bytes: 9
                }),
                json!({"backup_path": "/b", "manifest_sha256": "m", "files": 3, "bytes": 9}),
            ),
            (json!(RemoveOutput { deleted: true }), json!({"deleted": true})),
            (
                json!(OnboardOutput { id: "i".into(), image: "img".into() }),
                json!({"id": "i", "image": "img"}),
            ),
            (json!(RestoreOutput { verified_files: 3 }), json!({"verified_files": 3})),
            (
                json!(PoliciesOutput::Handoff {
                    handoff: true,
                    policy_sha256: "p".into(),
                    verified: true
                }),
                json!({"handoff": true, "policy_sha256": "p", "verified": true}),
            ),
            (
                json!(PoliciesOutput::Applied { applied: vec!["pypi".into()], warnings: vec![] }),
                json!({"applied": ["pypi"]}),
            ),
            (
                json!(PoliciesOutput::Applied { applied: vec![], warnings: vec!["w".into()] }),
                json!({"applied": [], "warnings": ["w"]}),
            ),
            (
                json!(ShieldsOutput { locked: true, stale_seal_cleared: false, was_locked: true }),
                json!({"locked": true, "stale_seal_cleared": false, "was_locked": true}),
            ),
        ];
        for (new, old) in cases {
            assert_eq!(new.to_string(), old.to_string());
        }
    }

    /// What journals written before `prior_policy` and `policy_sha256` existed hold still
    /// decodes; extra fields are ignored; a wrong type is an error, not a default.
    #[test]
    fn old_and_extended_journals_decode_and_wrong_types_do_not() {
        let p: RebuildParams = decode(
            "params",
            &json!({"sandbox": "alpha", "gateway": "local", "mode": "stale", "image": "i",
                "backup_ts": "t", "shields_locked": false,
                "evidence": {"gateway": "local", "status": "missing"}, "later": 1}),
        )
        .unwrap();
        assert_eq!((p.mode, p.prior_policy), (Mode::Stale, None));
        let s: SnapshotOutput = decode(
            "snapshot",
            &json!({"snapshot_path": "p", "snapshot_sha256": "s", "was_default": true,
                "shields_locked": false, "evidence": {"gateway": "local", "status": "missing"}}),
        )
        .unwrap();
        assert_eq!(s.policy_sha256, None);
        let bad = json!({"sandbox": "alpha", "gateway": "local", "mode": "stale", "image": "i",
            "backup_ts": "t", "shields_locked": "yes"});
        let e = decode::<RebuildParams>("params", &bad).unwrap_err();
        assert!(e.to_string().contains("shields_locked") || e.detail.contains("boolean"), "{e}");
        let bad_mode = json!({"sandbox": "alpha", "gateway": "local", "mode": "fast",
            "image": "i", "backup_ts": "t", "shields_locked": false});
        assert!(decode::<RebuildParams>("params", &bad_mode).is_err());
        assert!(decode::<BackupOutput>("backup", &json!({"backup_path": 7})).is_err());
    }
}
