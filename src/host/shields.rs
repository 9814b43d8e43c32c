//! Shields (lockdown) state, `<home>/state/shields-<name>.json` (spec §2.3).
//!
//! Locked ⇔ the file exists and `shieldsDown == false`. No file = mutable. A corrupt file counts
//! as locked (the safe reading) but is reported, and commands that would rewrite it refuse
//! instead. The rebuild snapshots the file's bytes and restores them byte-exactly.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{read_optional, HostError};
use crate::names::SandboxName;

/// Directory of per-sandbox state files inside the NemoClaw home.
pub const STATE_DIR: &str = "state";

/// Path of `name`'s shields file.
pub fn shields_path(home: &Path, name: &SandboxName) -> PathBuf {
    home.join(STATE_DIR).join(format!("shields-{name}.json"))
}

/// Path of `name`'s auto-relock timer file.
pub fn timer_path(home: &Path, name: &SandboxName) -> PathBuf {
    home.join(STATE_DIR).join(format!("shields-timer-{name}.json"))
}

/// What the shields file says, with its raw bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct ShieldsState {
    /// The shields file.
    pub path: PathBuf,
    /// The file bytes, verbatim (`None` = no file).
    pub raw: Option<Vec<u8>>,
    /// The parsed document, when it parses as a JSON object.
    pub doc: Option<Value>,
    /// Why the file is corrupt, when it is.
    pub corrupt: Option<String>,
}

impl ShieldsState {
    /// Read `name`'s shields state. Only an I/O failure is an error: a corrupt file is returned
    /// with [`ShieldsState::corrupt`] set (and counts as locked).
    pub fn load(home: &Path, name: &SandboxName) -> Result<ShieldsState, HostError> {
        let path = shields_path(home, name);
        let raw = read_optional(&path)?;
        let (doc, corrupt) = match &raw {
            None => (None, None),
            Some(b) => match serde_json::from_slice::<Value>(b) {
                Ok(v) if v.get("shieldsDown").is_some_and(Value::is_boolean) => (Some(v), None),
                Ok(v) if v.is_object() && v.get("shieldsDown").is_none() => {
                    (Some(v), Some("`shieldsDown` is missing".to_owned()))
                }
                Ok(_) => (None, Some("not a shields object".to_owned())),
                Err(e) => (None, Some(format!("invalid JSON ({e})"))),
            },
        };
        Ok(ShieldsState { path, raw, doc, corrupt })
    }

    /// Like [`ShieldsState::load`], but a corrupt file is [`HostError::Corrupt`].
    pub fn load_strict(home: &Path, name: &SandboxName) -> Result<ShieldsState, HostError> {
        let s = Self::load(home, name)?;
        match &s.corrupt {
            Some(why) => Err(HostError::corrupt(&s.path, why.clone())),
            None => Ok(s),
        }
    }

    /// Whether a file exists at all.
    pub fn exists(&self) -> bool {
        self.raw.is_some()
    }

    /// Locked ⇔ file exists and `shieldsDown == false`; a corrupt file counts as locked.
    pub fn locked(&self) -> bool {
        if self.raw.is_none() {
            return false;
        }
        if self.corrupt.is_some() {
            return true;
        }
        self.doc.as_ref().and_then(|d| d.get("shieldsDown")).and_then(Value::as_bool) == Some(false)
    }

    /// `shieldsDownReason`, when down.
    pub fn reason(&self) -> Option<&str> {
        self.doc.as_ref()?.get("shieldsDownReason")?.as_str()
    }

    /// `updatedAt`.
    pub fn updated_at(&self) -> Option<&str> {
        self.doc.as_ref()?.get("updatedAt")?.as_str()
    }
}

fn write_doc(home: &Path, name: &SandboxName, doc: &Value) -> Result<(), HostError> {
    let path = shields_path(home, name);
    super::private_dir_durable(&home.join(STATE_DIR))?;
    let bytes = serde_json::to_vec_pretty(doc).expect("a Value always serialises");
    crate::util::atomic_write(&path, &bytes).map_err(|e| HostError::io("cannot write", &path, e))
}

/// Raise shields: `shieldsDown: false`, keeping the file's other fields. Refuses a corrupt file.
pub fn raise(home: &Path, name: &SandboxName) -> Result<(), HostError> {
    let cur = ShieldsState::load_strict(home, name)?;
    let mut doc = cur.doc.unwrap_or_else(|| json!({}));
    let now = crate::util::iso_ms(crate::util::now_ms());
    let obj = doc.as_object_mut().expect("checked object");
    obj.insert("shieldsDown".into(), Value::Bool(false));
    obj.insert("shieldsDownAt".into(), Value::Null);
    obj.insert("shieldsDownTimeout".into(), Value::Null);
    obj.insert("shieldsDownReason".into(), Value::Null);
    obj.insert("updatedAt".into(), Value::String(now));
    write_doc(home, name, &doc)?;
    remove_if_present(&timer_path(home, name))
}

/// Lower shields: `shieldsDown: true` with the time and reason. Refuses a corrupt file.
pub fn lower(home: &Path, name: &SandboxName, reason: Option<&str>) -> Result<(), HostError> {
    let cur = ShieldsState::load_strict(home, name)?;
    let mut doc = cur.doc.unwrap_or_else(|| json!({}));
    let now = crate::util::iso_ms(crate::util::now_ms());
    let obj = doc.as_object_mut().expect("checked object");
    obj.insert("shieldsDown".into(), Value::Bool(true));
    obj.insert("shieldsDownAt".into(), Value::String(now.clone()));
    obj.insert("shieldsDownReason".into(), reason.map(Value::from).unwrap_or(Value::Null));
    obj.insert("updatedAt".into(), Value::String(now));
    write_doc(home, name, &doc)
}

/// Clear shields: remove the shields file and the timer file (missing files are fine).
pub fn clear(home: &Path, name: &SandboxName) -> Result<(), HostError> {
    remove_if_present(&shields_path(home, name))?;
    remove_if_present(&timer_path(home, name))
}

/// Put the shields file back exactly as snapshotted: `Some(bytes)` writes them atomically,
/// `None` removes the file. The timer file is not touched.
pub fn restore_raw(
    home: &Path,
    name: &SandboxName,
    bytes: Option<Vec<u8>>,
) -> Result<(), HostError> {
    let path = shields_path(home, name);
    match bytes {
        Some(b) => {
            super::private_dir_durable(&home.join(STATE_DIR))?;
            crate::util::atomic_write(&path, &b)
                .map_err(|e| HostError::io("cannot write", &path, e))
        }
        None => remove_if_present(&path),
    }
}

fn remove_if_present(path: &Path) -> Result<(), HostError> {
    match fs::remove_file(path) {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                crate::util::fsync_dir(dir).map_err(|e| HostError::io("cannot sync", dir, e))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HostError::io("cannot remove", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case::absent(None, false, false)]
    #[case::up(Some(r#"{"shieldsDown":false}"#), true, false)]
    #[case::down(Some(r#"{"shieldsDown":true}"#), false, false)]
    #[case::garbage(Some("{not json"), true, true)]
    #[case::no_field(Some(r#"{"updatedAt":"x"}"#), true, true)]
    #[case::array(Some("[]"), true, true)]
    fn lock_state(#[case] content: Option<&str>, #[case] locked: bool, #[case] corrupt: bool) {
        let home = tempfile::tempdir().unwrap();
        let n = SandboxName::parse("demo").unwrap();
        if let Some(c) = content {
            fs::create_dir_all(home.path().join(STATE_DIR)).unwrap();
            fs::write(shields_path(home.path(), &n), c).unwrap();
        }
        let s = ShieldsState::load(home.path(), &n).unwrap();
        assert_eq!(s.locked(), locked);
        assert_eq!(s.corrupt.is_some(), corrupt);
        assert_eq!(ShieldsState::load_strict(home.path(), &n).is_err(), corrupt);
    }

    #[test]
    fn raise_lower_clear_restore() {
        let home = tempfile::tempdir().unwrap();
        let n = SandboxName::parse("demo").unwrap();
        raise(home.path(), &n).unwrap();
        let up = ShieldsState::load(home.path(), &n).unwrap();
        assert!(up.locked());
        lower(home.path(), &n, Some("backup")).unwrap();
        let down = ShieldsState::load(home.path(), &n).unwrap();
        assert!(!down.locked());
        assert_eq!(down.reason(), Some("backup"));
        fs::write(timer_path(home.path(), &n), "{}").unwrap();
        clear(home.path(), &n).unwrap();
        assert!(!shields_path(home.path(), &n).exists() && !timer_path(home.path(), &n).exists());
        restore_raw(home.path(), &n, up.raw.clone()).unwrap();
        assert_eq!(fs::read(shields_path(home.path(), &n)).unwrap(), up.raw.unwrap());
        restore_raw(home.path(), &n, None).unwrap();
        assert!(!shields_path(home.path(), &n).exists());
    }
}
