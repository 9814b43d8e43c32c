//! What the rebuild keeps outside the journal for its runs — backups under
//! `<home>/rebuild-backups/`, run snapshots under `<home>/rebuild-runs/`: the artifacts its step
//! outputs name (for `journal show`), and their removal when `journal prune` removes the runs
//! that name them.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::snapshot::RUNS_DIR;
use crate::exit::{Exit, ExitCoded};
use crate::host::backup::BACKUPS_DIR;
use crate::journal::audit::{self, Artifact, AuditError, PruneOptions, PruneReport, RunFiles};
use crate::journal::Journal;

/// Artifacts named in a step output: any object carrying `backup_path` (at any depth).
pub fn artifacts_in(step: &str, output: &Value) -> Vec<Artifact> {
    let mut out = Vec::new();
    fn walk(step: &str, v: &Value, out: &mut Vec<Artifact>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(p)) = m.get("backup_path") {
                    out.push(Artifact {
                        step: step.to_owned(),
                        path: p.clone(),
                        manifest_sha256: m
                            .get("manifest_sha256")
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                    });
                }
                for (k, x) in m {
                    if k != "backup_path" {
                        walk(step, x, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(step, x, out)),
            _ => {}
        }
    }
    walk(step, output, &mut out);
    out
}

/// What prune decided about the backups the pruned runs name.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PrunedBackups {
    /// Backup directories removed (or that would be).
    pub backups_removed: Vec<String>,
    /// Backup paths kept because another run still references them, or outside the backups
    /// directory, or `--keep-backups`.
    pub backups_kept: Vec<String>,
}

/// `journal prune` failures.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// The journal side failed.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Removing a backup directory failed.
    #[error("cannot remove backup {path}: {source}")]
    Backup {
        /// The directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

impl ExitCoded for PruneError {
    fn exit(&self) -> Exit {
        match self {
            PruneError::Audit(e) => e.exit(),
            PruneError::Backup { .. } => Exit::Io,
        }
    }
}

/// The backups named by step outputs: candidates (named by a pruned run) and protected ones
/// (named by a run that stays).
struct Backups {
    base: PathBuf,
    keep: bool,
    candidates: BTreeSet<String>,
    protected: BTreeSet<String>,
}

impl RunFiles for Backups {
    type Decision = PrunedBackups;

    fn step_output(&mut self, _run_id: &str, step: &str, output: &str, pruned: bool) {
        if !output.contains("backup_path") {
            return;
        }
        let v: Value = serde_json::from_str(output).unwrap_or(Value::Null);
        for a in artifacts_in(step, &v) {
            if pruned {
                self.candidates.insert(a.path);
            } else {
                self.protected.insert(a.path);
            }
        }
    }

    fn decide(&mut self) -> PrunedBackups {
        let mut d = PrunedBackups::default();
        for p in std::mem::take(&mut self.candidates) {
            let pb = PathBuf::from(&p);
            if self.keep
                || self.protected.contains(&p)
                || !is_under(&self.base, &pb)
                || !resolves_under(&self.base, &pb)
            {
                d.backups_kept.push(p);
            } else {
                d.backups_removed.push(p);
            }
        }
        d
    }

    fn checkpoint(&self, d: &PrunedBackups) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("backups_removed".into(), json!(d.backups_removed));
        m.insert("keep_backups".into(), json!(self.keep));
        m
    }
}

fn is_under(base: &Path, p: &Path) -> bool {
    p.is_absolute()
        && p.starts_with(base)
        && p != base
        && !p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir))
}

/// Whether `p`'s parent, with symlinks resolved, is still under `base` resolved: a symlinked
/// directory on the way must not lead a removal outside the backups directory.
fn resolves_under(base: &Path, p: &Path) -> bool {
    match (p.parent().map(std::fs::canonicalize), std::fs::canonicalize(base)) {
        (Some(Ok(parent)), Ok(base)) => parent.starts_with(base),
        // Already gone: nothing to remove, nothing to escape through.
        (Some(Err(e)), Ok(_)) => e.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

/// Prune the journal ([`audit::prune`]) and, unless `dry_run`, remove what the pruned runs kept
/// under `home`: their backup directories (unless `keep_backups`; never one a remaining run
/// names, nor anything outside `<home>/rebuild-backups/`) and their run snapshots. The files go
/// only after the journal's transaction has committed.
pub fn prune(
    j: &mut Journal,
    home: &Path,
    o: &PruneOptions,
    keep_backups: bool,
) -> Result<PruneReport<PrunedBackups>, PruneError> {
    let backups_base = home.join(BACKUPS_DIR);
    let mut files = Backups {
        base: backups_base.clone(),
        keep: keep_backups,
        candidates: BTreeSet::new(),
        protected: BTreeSet::new(),
    };
    let report = audit::prune(j, o, &mut files)?;
    if report.dry_run {
        return Ok(report);
    }
    for b in &report.files.backups_removed {
        let pb = PathBuf::from(b);
        match std::fs::symlink_metadata(&pb) {
            // Backups keep the sandbox's modes: a read-only directory in one must not stop a
            // non-root owner from removing it.
            Ok(m) if m.is_dir() => crate::host::fstree::remove_tree(&pb)
                .map_err(|source| PruneError::Backup { path: pb.clone(), source })?,
            Ok(_) => std::fs::remove_file(&pb)
                .map_err(|source| PruneError::Backup { path: pb.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(PruneError::Backup { path: pb, source }),
        }
    }
    if !report.files.backups_removed.is_empty() {
        let _ = crate::util::fsync_dir(&backups_base);
    }
    // A pruned run's snapshot file (`<home>/rebuild-runs/<run>.json`) goes with it. Run ids are
    // UUIDs from the journal's own rows, so the path cannot leave that directory.
    let runs_dir = home.join(RUNS_DIR);
    for id in &report.runs_removed {
        if uuid::Uuid::parse_str(id).is_ok() {
            let _ = std::fs::remove_file(runs_dir.join(format!("{id}.json")));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_found_at_any_depth() {
        let v = json!({"backup_path": "/h/rebuild-backups/a/t", "manifest_sha256": "ab",
                       "nested": [{"backup_path": "/x"}]});
        let a = artifacts_in("backup", &v);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].manifest_sha256.as_deref(), Some("ab"));
        assert_eq!(a[1].path, "/x");
    }

    #[test]
    fn under_backups_only() {
        let base = Path::new("/h/rebuild-backups");
        assert!(is_under(base, Path::new("/h/rebuild-backups/a/t")));
        assert!(!is_under(base, Path::new("/h/rebuild-backups")));
        assert!(!is_under(base, Path::new("/h/rebuild-backups/../x")));
        assert!(!is_under(base, Path::new("/etc")));
        assert!(!is_under(base, Path::new("rebuild-backups/a")));
    }
}
