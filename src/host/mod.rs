//! NemoClaw host files: the registry, the onboard session, shields state and backups.
//! Everything here reads and writes files NemoClaw itself understands, so NemoClaw keeps working
//! on a host after `nemoclaw` touched it: unknown fields survive, writes are atomic and durable,
//! files are 0600 and directories 0700, and a corrupt file is reported, never overwritten.

pub mod backup;
pub mod fstree;
pub mod registry;
pub mod session;
pub mod shields;

use std::path::{Path, PathBuf};

use crate::exit::{Exit, ExitCoded};

pub use backup::{tree_digest, Backup, Manifest, ManifestFile};
pub use registry::{binding_of, Binding, Registry};
pub use session::OnboardSession;
pub use shields::ShieldsState;

/// A host file could not be read, written or trusted.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A file exists but is not what NemoClaw writes. It is left untouched.
    #[error("{} is corrupt: {detail}; it was left untouched", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// Reading or writing a host file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// Cause.
        source: std::io::Error,
    },
    /// NemoClaw's registry lock stayed held for the whole retry window.
    #[error("the registry lock {} is held{}; gave up after {waited_ms} ms", path.display(), holder.as_ref().map(|h| format!(" by pid {h}")).unwrap_or_default())]
    LockTimeout {
        /// The lock directory.
        path: PathBuf,
        /// The holder's pid, when readable.
        holder: Option<String>,
        /// How long we waited.
        waited_ms: u64,
    },
    /// The input is well-formed but not acceptable (an invalid gateway binding, an unsafe path
    /// in a backup). Refused before anything changes.
    #[error("{0}")]
    Invalid(String),
}

impl HostError {
    /// An I/O error with the path it concerns.
    pub fn io(what: &str, path: &Path, source: std::io::Error) -> Self {
        HostError::Io { context: format!("{what} {}", path.display()), source }
    }

    /// A corrupt-file error.
    pub fn corrupt(path: &Path, detail: impl Into<String>) -> Self {
        HostError::Corrupt { path: path.to_owned(), detail: detail.into() }
    }
}

impl ExitCoded for HostError {
    fn exit(&self) -> Exit {
        match self {
            HostError::Corrupt { .. } => Exit::Corrupt,
            HostError::Io { .. } => Exit::Io,
            HostError::LockTimeout { .. } => Exit::Busy,
            HostError::Invalid(_) => Exit::Refused,
        }
    }
}

/// Create a host directory (and parents) with mode 0700.
pub(crate) fn private_dir(dir: &Path) -> Result<(), HostError> {
    mkdir_private(dir).map_err(|e| HostError::io("cannot create directory", dir, e))
}

/// Create a host directory (and parents) with mode 0700, durably: a file the journal or the
/// operator is told exists must not vanish with its directory after a power cut.
pub(crate) fn private_dir_durable(dir: &Path) -> Result<(), HostError> {
    crate::util::create_dir_durable(dir)
        .map_err(|e| HostError::io("cannot create directory", dir, e))
}

/// Create `dir` and every missing parent with mode 0700 (not only the leaf, as
/// `create_dir_all` + chmod would), and make the leaf 0700.
pub fn mkdir_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    crate::util::create_private_dir(dir)
}

/// Read a file; `Ok(None)` when it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, HostError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(HostError::io("cannot read", path, e)),
    }
}
