//! NemoClaw's sandbox registry, `<home>/sandboxes.json` (spec §2.1).
//!
//! The document is kept as a [`serde_json::Value`] with insertion order preserved, so a
//! read-modify-write changes only the row that was touched: unknown fields, key order and the
//! other rows come back out exactly as NemoClaw wrote them (`JSON.stringify(x, null, 2)`).
//!
//! Writers go through [`update`], which takes NemoClaw's own lock (a `sandboxes.json.lock/`
//! directory with an `owner` file holding the pid), re-reads the file under the lock, applies the
//! change and writes atomically and durably. Readers do not lock: a write is a rename, so a
//! reader sees the old or the new file, never half of one.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::{private_dir, read_optional, HostError};
use crate::names::SandboxName;

/// File name of the registry inside the NemoClaw home.
pub const REGISTRY_FILE: &str = "sandboxes.json";
/// NemoClaw's lock directory next to the registry.
pub const LOCK_DIR: &str = "sandboxes.json.lock";
/// How many times to try the lock, 100 ms apart (NemoClaw: 120, about 12 s).
const DEFAULT_LOCK_RETRIES: u32 = 120;
const LOCK_RETRY_INTERVAL: Duration = Duration::from_millis(100);
/// A lock without a readable owner is considered abandoned after this long.
const OWNERLESS_LOCK_AGE: Duration = Duration::from_secs(10);

/// The registry document as read from disk.
#[derive(Debug, Clone)]
pub struct Registry {
    path: PathBuf,
    doc: Value,
    trailing_newline: bool,
}

impl Registry {
    /// Read `<home>/sandboxes.json`. A missing file is an empty registry; a file that is not a
    /// registry document is [`HostError::Corrupt`] naming it (and nothing will overwrite it).
    pub fn load(home: &Path) -> Result<Registry, HostError> {
        let path = home.join(REGISTRY_FILE);
        match read_optional(&path)? {
            None => Ok(Registry { path, doc: empty_doc(), trailing_newline: false }),
            Some(bytes) => Self::parse(path, &bytes),
        }
    }

    fn parse(path: PathBuf, bytes: &[u8]) -> Result<Registry, HostError> {
        let doc: Value = serde_json::from_slice(bytes)
            .map_err(|e| HostError::corrupt(&path, format!("invalid JSON ({e})")))?;
        let Some(obj) = doc.as_object() else {
            return Err(HostError::corrupt(&path, "the document is not a JSON object"));
        };
        match obj.get("sandboxes") {
            None | Some(Value::Object(_)) => {}
            Some(_) => return Err(HostError::corrupt(&path, "`sandboxes` is not an object")),
        }
        if let Some(Value::Object(rows)) = obj.get("sandboxes") {
            if let Some((k, _)) = rows.iter().find(|(_, v)| !v.is_object()) {
                return Err(HostError::corrupt(&path, format!("entry `{k}` is not an object")));
            }
        }
        match obj.get("defaultSandbox") {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(_) => {
                return Err(HostError::corrupt(&path, "`defaultSandbox` is not a string or null"))
            }
        }
        let trailing_newline = bytes.ends_with(b"\n");
        Ok(Registry { path, doc, trailing_newline })
    }

    /// Path of the registry file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole document.
    pub fn document(&self) -> &Value {
        &self.doc
    }

    fn rows(&self) -> Option<&Map<String, Value>> {
        self.doc.get("sandboxes").and_then(Value::as_object)
    }

    fn rows_mut(&mut self) -> &mut Map<String, Value> {
        let obj =
            self.doc.as_object_mut().expect("registry document is an object (checked on load)");
        let rows = obj.entry("sandboxes").or_insert_with(|| Value::Object(Map::new()));
        if !rows.is_object() {
            *rows = Value::Object(Map::new());
        }
        rows.as_object_mut().expect("just made an object")
    }

    /// The entry of `name`, verbatim.
    pub fn entry(&self, name: &SandboxName) -> Option<&Value> {
        self.rows().and_then(|r| r.get(name.as_str()))
    }

    /// All entries in file order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.rows().into_iter().flat_map(|r| r.iter().map(|(k, v)| (k.as_str(), v)))
    }

    /// Registered names in file order.
    pub fn names(&self) -> Vec<String> {
        self.entries().map(|(k, _)| k.to_owned()).collect()
    }

    /// The default sandbox, if set.
    pub fn default_sandbox(&self) -> Option<&str> {
        self.doc.get("defaultSandbox").and_then(Value::as_str)
    }

    /// Insert or replace `name`'s entry. A replaced entry keeps its position in the file.
    pub fn set_entry(&mut self, name: &SandboxName, entry: Value) {
        // IndexMap::insert keeps the position of an existing key.
        self.rows_mut().insert(name.as_str().to_owned(), entry);
    }

    /// The 0-based position of `name`'s entry in the file, if registered.
    pub fn position(&self, name: &SandboxName) -> Option<usize> {
        self.rows().and_then(|r| r.keys().position(|k| k == name.as_str()))
    }

    /// Insert `name`'s entry at `index` (clamped to the end) when it is absent, so a row that was
    /// removed goes back where it was and the file is byte-identical; a present entry is replaced
    /// in place.
    pub fn insert_entry_at(&mut self, name: &SandboxName, entry: Value, index: usize) {
        let rows = self.rows_mut();
        if rows.contains_key(name.as_str()) {
            rows.insert(name.as_str().to_owned(), entry);
        } else {
            let at = index.min(rows.len());
            rows.shift_insert(at, name.as_str().to_owned(), entry);
        }
    }

    /// Remove `name`'s entry. If it was the default, the default moves to the first remaining
    /// name, or null (what NemoClaw's `removeSandbox` does). Returns the removed entry.
    pub fn remove_entry(&mut self, name: &SandboxName) -> Option<Value> {
        // shift_remove, not remove: serde_json's remove swaps the last row into the hole, which
        // would reorder rows NemoClaw wrote.
        let removed = self.rows_mut().shift_remove(name.as_str());
        if removed.is_some() && self.default_sandbox() == Some(name.as_str()) {
            let next = self.rows().and_then(|r| r.keys().next().cloned());
            self.put_default(next.map(Value::String).unwrap_or(Value::Null));
        }
        removed
    }

    /// Set or clear the default sandbox.
    pub fn set_default(&mut self, name: Option<&SandboxName>) {
        self.put_default(name.map(|n| Value::String(n.as_str().to_owned())).unwrap_or(Value::Null));
    }

    fn put_default(&mut self, v: Value) {
        let obj =
            self.doc.as_object_mut().expect("registry document is an object (checked on load)");
        obj.insert("defaultSandbox".to_owned(), v);
    }

    /// The file bytes this registry serialises to: 2-space indentation like
    /// `JSON.stringify(x, null, 2)`, with a trailing newline only if the file read had one.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(&self.doc).expect("a Value always serialises");
        if self.trailing_newline {
            out.push(b'\n');
        }
        out
    }

    fn write(&self) -> Result<(), HostError> {
        crate::util::atomic_write(&self.path, &self.to_bytes())
            .map_err(|e| HostError::io("cannot write", &self.path, e))
    }
}

fn empty_doc() -> Value {
    serde_json::json!({ "sandboxes": {}, "defaultSandbox": null })
}

/// Read-modify-write the registry under NemoClaw's lock: take the lock, re-read the file, apply
/// `f`, write atomically and durably, release. If `f` fails nothing is written.
pub fn update<T>(
    home: &Path,
    f: impl FnOnce(&mut Registry) -> Result<T, HostError>,
) -> Result<T, HostError> {
    private_dir(home)?;
    let _lock = RegistryLock::acquire(home)?;
    // Re-read under the lock: another writer may have changed the file since any earlier read.
    let mut reg = Registry::load(home)?;
    let out = f(&mut reg)?;
    reg.write()?;
    Ok(out)
}

/// NemoClaw's model for a sandbox onboarded without `--model`.
pub const DEFAULT_MODEL: &str = "nvidia/nemotron-3-super-120b-a12b";
/// NemoClaw's inference provider for a sandbox onboarded without `--provider`.
pub const DEFAULT_PROVIDER: &str = "nvidia-prod";

/// What a freshly onboarded sandbox's registry entry is made of.
#[derive(Debug, Clone)]
pub struct NewEntry<'a> {
    /// The sandbox.
    pub name: &'a SandboxName,
    /// Where it lives.
    pub binding: &'a Binding,
    /// Model (default [`DEFAULT_MODEL`]).
    pub model: Option<&'a str>,
    /// Inference provider (default [`DEFAULT_PROVIDER`]).
    pub provider: Option<&'a str>,
    /// Agent kind; `None` is NemoClaw's `null` (openclaw).
    pub agent: Option<&'a str>,
    /// Policy presets applied at onboard.
    pub policies: &'a [String],
    /// The image it was created from.
    pub image: &'a str,
}

impl NewEntry<'_> {
    /// The entry in NemoClaw's shape and key order, created at `now_ms`. An OpenShell binding
    /// is written both as `gatewayName` and as `gatewayPort` (8080 for `nemoclaw`), so
    /// [`binding_of`] reads back the same binding.
    pub fn to_value(&self, now_ms: i64) -> Value {
        let mut entry = serde_json::json!({
            "name": self.name.as_str(),
            "createdAt": crate::util::iso_ms(now_ms),
            "model": self.model.unwrap_or(DEFAULT_MODEL),
            "provider": self.provider.unwrap_or(DEFAULT_PROVIDER),
            "gpuEnabled": false,
            "policies": self.policies,
            "customPolicies": [],
            "agent": self.agent,
            "imageTag": self.image,
            "gatewayName": self.binding.name(),
        });
        if let Binding::OpenShell(g) = self.binding {
            let port =
                g.strip_prefix("nemoclaw-").and_then(|p| p.parse::<u16>().ok()).unwrap_or(8080);
            entry["gatewayPort"] = serde_json::json!(port);
        }
        entry
    }
}

/// Register a new sandbox under the lock: refused when the name was registered meanwhile
/// (nothing written); it becomes the default when there is none.
pub fn register_new(home: &Path, name: &SandboxName, entry: Value) -> Result<(), HostError> {
    update(home, |reg| {
        if reg.entry(name).is_some() {
            return Err(HostError::Invalid(format!(
                "sandbox '{name}' was registered by someone else meanwhile"
            )));
        }
        reg.set_entry(name, entry);
        if reg.default_sandbox().is_none() {
            reg.set_default(Some(name));
        }
        Ok(())
    })
}

/// NemoClaw's registry lock, held until dropped.
#[derive(Debug)]
pub struct RegistryLock {
    dir: PathBuf,
}

impl RegistryLock {
    /// Take the lock, waiting up to 120 × 100 ms (`NEMOCLAW_REGISTRY_LOCK_RETRIES` overrides the
    /// count; it exists for tests). Stale locks are broken (dead or recycled owner pid; no
    /// readable owner and older than 10 s).
    pub fn acquire(home: &Path) -> Result<RegistryLock, HostError> {
        let dir = home.join(LOCK_DIR);
        let retries = std::env::var("NEMOCLAW_REGISTRY_LOCK_RETRIES")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(DEFAULT_LOCK_RETRIES)
            .max(1);
        let started = std::time::Instant::now();
        for attempt in 0..retries {
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    let owner = dir.join("owner");
                    if let Err(e) =
                        crate::util::atomic_write(&owner, std::process::id().to_string().as_bytes())
                    {
                        let _ = fs::remove_dir_all(&dir);
                        return Err(HostError::io("cannot write lock owner", &owner, e));
                    }
                    return Ok(RegistryLock { dir });
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    if let Some(why) = stale_reason(&dir) {
                        tracing::info!("breaking stale registry lock {}: {why}", dir.display());
                        break_lock(&dir);
                        continue;
                    }
                }
                Err(e) => return Err(HostError::io("cannot create lock", &dir, e)),
            }
            if attempt + 1 < retries {
                std::thread::sleep(LOCK_RETRY_INTERVAL);
            }
        }
        let holder = fs::read_to_string(dir.join("owner")).ok().map(|s| s.trim().to_owned());
        Err(HostError::LockTimeout {
            path: dir,
            holder,
            waited_ms: started.elapsed().as_millis() as u64,
        })
    }
}

impl Drop for RegistryLock {
    fn drop(&mut self) {
        // Release only a lock that is still ours: if it was (wrongly) broken and retaken by
        // someone else, removing it would hand the registry to two writers.
        let owner = fs::read_to_string(self.dir.join("owner")).unwrap_or_default();
        if owner.trim() == std::process::id().to_string() {
            let _ = fs::remove_file(self.dir.join("owner"));
            let _ = fs::remove_dir(&self.dir);
        }
    }
}

/// Why the lock at `dir` may be broken, or `None` if it must be respected.
fn stale_reason(dir: &Path) -> Option<String> {
    let lock_time = fs::metadata(dir.join("owner"))
        .or_else(|_| fs::metadata(dir))
        .and_then(|m| m.modified())
        .ok()?;
    let owner = fs::read_to_string(dir.join("owner")).ok();
    match owner.as_deref().map(str::trim).and_then(|s| s.parse::<i32>().ok()).filter(|p| *p > 0) {
        Some(pid) => {
            if !pid_alive(pid) {
                return Some(format!("owner pid {pid} is not running"));
            }
            match process_start(pid) {
                // The start time has 1 s resolution (boot time is whole seconds): allow it.
                Some(start) if start > lock_time + Duration::from_secs(1) => {
                    Some(format!("owner pid {pid} was recycled by a newer process"))
                }
                _ => None,
            }
        }
        None => {
            let age = SystemTime::now().duration_since(lock_time).unwrap_or_default();
            (age > OWNERLESS_LOCK_AGE)
                .then(|| format!("no readable owner and {}s old", age.as_secs()))
        }
    }
}

fn break_lock(dir: &Path) {
    // Rename first so two breakers cannot both remove and then both create: only one rename of
    // the same directory succeeds.
    let grave = dir.with_file_name(format!(
        ".{LOCK_DIR}.stale-{}-{}",
        std::process::id(),
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()
    ));
    if fs::rename(dir, &grave).is_ok() {
        let _ = fs::remove_dir_all(&grave);
    }
}

/// Whether a process with this pid exists (EPERM means it exists but is not ours).
pub(crate) fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 performs only the permission and existence check.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Start time of a process (see [`crate::util::process_start_ms`]).
fn process_start(pid: i32) -> Option<SystemTime> {
    let ms = crate::util::process_start_ms(Some(pid))?;
    Some(UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).ok()?))
}

/// Which gateway an entry is bound to (spec §2.1).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(into = "String")]
pub enum Binding {
    /// The embedded local gateway.
    Local,
    /// An OpenShell gateway: `nemoclaw` or `nemoclaw-<port>`.
    OpenShell(String),
}

impl Binding {
    /// The binding's gateway name (`local`, `nemoclaw`, `nemoclaw-<port>`).
    pub fn name(&self) -> &str {
        match self {
            Binding::Local => "local",
            Binding::OpenShell(n) => n,
        }
    }

    /// Parse a gateway name: `local`, `nemoclaw`, or `nemoclaw-<port>` (never `nemoclaw-8080`,
    /// which is spelled `nemoclaw`).
    pub fn parse(name: &str) -> Option<Binding> {
        match name {
            "local" => Some(Binding::Local),
            "nemoclaw" => Some(Binding::OpenShell("nemoclaw".to_owned())),
            _ => {
                let port = name.strip_prefix("nemoclaw-")?;
                let valid = !port.is_empty()
                    && !port.starts_with('0')
                    && port.bytes().all(|b| b.is_ascii_digit())
                    && port.parse::<u16>().is_ok_and(|p| p != 0 && p != 8080);
                valid.then(|| Binding::OpenShell(name.to_owned()))
            }
        }
    }

    /// The binding of a gateway port: 8080 → `nemoclaw`, else `nemoclaw-<port>`.
    pub fn from_port(port: u16) -> Binding {
        if port == 8080 {
            Binding::OpenShell("nemoclaw".to_owned())
        } else {
            Binding::OpenShell(format!("nemoclaw-{port}"))
        }
    }
}

impl From<Binding> for String {
    fn from(b: Binding) -> String {
        b.name().to_owned()
    }
}

impl std::fmt::Display for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The gateway binding of a registry entry: a valid `gatewayPort` wins; else a valid
/// `gatewayName`; neither → `nemoclaw`. A field that is present (not null) but invalid is an
/// error: guessing a gateway could classify the sandbox against the wrong one.
pub fn binding_of(entry: &Value) -> Result<Binding, HostError> {
    let name = entry.get("name").and_then(Value::as_str).unwrap_or("?");
    match entry.get("gatewayPort") {
        None | Some(Value::Null) => {}
        Some(v) => {
            return match v.as_u64().filter(|p| (1..=65535).contains(p)) {
                Some(p) => Ok(Binding::from_port(p as u16)),
                None => Err(HostError::Invalid(format!(
                    "sandbox '{name}' has an invalid gatewayPort {v} in the registry; refusing to guess its gateway"
                ))),
            }
        }
    }
    match entry.get("gatewayName") {
        None | Some(Value::Null) => Ok(Binding::OpenShell("nemoclaw".to_owned())),
        Some(v) => v.as_str().and_then(Binding::parse).ok_or_else(|| {
            HostError::Invalid(format!(
                "sandbox '{name}' has an invalid gatewayName {v} in the registry; refusing to guess its gateway"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;
    use serde_json::json;

    /// A new entry's binding reads back as the binding it was made for, and its key order is
    /// NemoClaw's.
    #[rstest]
    #[case::local("local", None)]
    #[case::default_port("nemoclaw", Some(8080))]
    #[case::other_port("nemoclaw-9001", Some(9001))]
    fn new_entries_read_back_their_binding(#[case] gw: &str, #[case] port: Option<u16>) {
        let name = SandboxName::parse("alpha").unwrap();
        let binding = Binding::parse(gw).unwrap();
        let policies = vec!["npm".to_owned()];
        let e = NewEntry {
            name: &name,
            binding: &binding,
            model: None,
            provider: Some("p"),
            agent: None,
            policies: &policies,
            image: "img",
        }
        .to_value(0);
        assert_eq!(binding_of(&e).unwrap(), binding);
        assert_eq!(e["gatewayPort"].as_u64().map(|p| p as u16), port);
        assert_eq!((e["model"].as_str(), e["provider"].as_str()), (Some(DEFAULT_MODEL), Some("p")));
        let keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(&keys[..4], ["name", "createdAt", "model", "provider"]);
        assert_eq!(e["createdAt"], "1970-01-01T00:00:00.000Z");
    }

    #[rstest]
    #[case::port_default(json!({"gatewayPort": 8080}), Some("nemoclaw"))]
    #[case::port_other(json!({"gatewayPort": 9000, "gatewayName": "local"}), Some("nemoclaw-9000"))]
    #[case::port_zero(json!({"gatewayPort": 0}), None)]
    #[case::port_big(json!({"gatewayPort": 70000}), None)]
    #[case::port_string(json!({"gatewayPort": "9000"}), None)]
    #[case::port_null_name(json!({"gatewayPort": null, "gatewayName": "nemoclaw-9001"}), Some("nemoclaw-9001"))]
    #[case::name_plain(json!({"gatewayName": "nemoclaw"}), Some("nemoclaw"))]
    #[case::name_local(json!({"gatewayName": "local"}), Some("local"))]
    #[case::name_8080(json!({"gatewayName": "nemoclaw-8080"}), None)]
    #[case::name_leading_zero(json!({"gatewayName": "nemoclaw-090"}), None)]
    #[case::name_other(json!({"gatewayName": "prod"}), None)]
    #[case::name_number(json!({"gatewayName": 3}), None)]
    #[case::neither(json!({}), Some("nemoclaw"))]
    fn binding(#[case] entry: Value, #[case] want: Option<&str>) {
        let got = binding_of(&entry);
        match want {
            Some(w) => assert_eq!(got.unwrap().name(), w),
            None => assert!(matches!(got, Err(HostError::Invalid(_))), "{got:?}"),
        }
    }

    #[test]
    fn remove_default_moves_to_first_remaining_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(REGISTRY_FILE),
            r#"{"defaultSandbox":"b","sandboxes":{"a":{"name":"a"},"b":{"name":"b"},"c":{"name":"c"}}}"#,
        )
        .unwrap();
        let mut reg = Registry::load(dir.path()).unwrap();
        reg.remove_entry(&SandboxName::parse("b").unwrap());
        assert_eq!(reg.default_sandbox(), Some("a"));
        assert_eq!(reg.names(), ["a", "c"]);
        reg.remove_entry(&SandboxName::parse("a").unwrap());
        reg.remove_entry(&SandboxName::parse("c").unwrap());
        assert_eq!(reg.default_sandbox(), None);
        assert_eq!(reg.document()["defaultSandbox"], Value::Null);
    }

    #[test]
    fn ownerless_fresh_lock_is_respected_old_one_broken() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join(LOCK_DIR);
        fs::create_dir(&lock).unwrap();
        assert_eq!(stale_reason(&lock), None);
        let old = SystemTime::now() - Duration::from_secs(60);
        fs::File::open(&lock).unwrap().set_modified(old).unwrap();
        assert!(stale_reason(&lock).is_some());
    }

    #[test]
    fn recycled_pid_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join(LOCK_DIR);
        fs::create_dir(&lock).unwrap();
        // Our own pid is alive; a lock older than our process start was written by someone else.
        fs::write(lock.join("owner"), std::process::id().to_string()).unwrap();
        assert_eq!(stale_reason(&lock), None);
        let f = fs::File::options().write(true).open(lock.join("owner")).unwrap();
        f.set_modified(UNIX_EPOCH + Duration::from_secs(1_000_000)).unwrap();
        assert!(stale_reason(&lock).unwrap().contains("recycled"));
    }
}
