//! NemoClaw's preset merge, for gateways that keep one whole policy per sandbox (OpenShell).
//!
//! A NemoClaw preset (`preset:` + `network_policies:`) or a custom policy (the same format, from
//! the registry's `customPolicies[].content`) is not an OpenShell policy: OpenShell refuses its
//! `preset:` key. NemoClaw applies one by reading the live policy, merging the preset's
//! `network_policies` map into it **by key** (the preset's entry replaces an existing entry of
//! the same key; every other top-level key of the live policy is kept), forcing `version: 1`,
//! and writing the whole result back. A preset counts as applied when all its
//! `network_policies` keys are present in the live policy.

use serde_yaml_ng::{Mapping, Value};

const NETWORK: &str = "network_policies";

fn parse(what: &str, text: &str) -> Result<Value, String> {
    serde_yaml_ng::from_str(text).map_err(|e| format!("{what} is not valid YAML: {e}"))
}

/// The `network_policies` entries of a preset (in its order). A preset without that map is an
/// error: applying it would change nothing, and saying it was applied would be a lie.
pub fn preset_entries(preset: &str) -> Result<Mapping, String> {
    match parse("the preset", preset)?.get(NETWORK) {
        Some(Value::Mapping(m)) if !m.is_empty() => Ok(m.clone()),
        Some(Value::Mapping(_)) => Err(format!("the preset's `{NETWORK}` is empty")),
        Some(_) => Err(format!("the preset's `{NETWORK}` is not a map")),
        None => Err(format!("the preset has no `{NETWORK}`")),
    }
}

/// The live policy with every preset's entries merged in by key and `version: 1`, serialised.
pub fn merge(live: &str, presets: &[Mapping]) -> Result<String, String> {
    let mut policy = match parse("the live policy", live)? {
        Value::Mapping(m) => m,
        Value::Null => Mapping::new(),
        _ => return Err("the live policy is not a map".to_owned()),
    };
    let mut net = match policy.remove(NETWORK) {
        Some(Value::Mapping(m)) => m,
        Some(Value::Null) | None => Mapping::new(),
        Some(_) => return Err(format!("the live policy's `{NETWORK}` is not a map")),
    };
    for p in presets {
        for (k, v) in p {
            net.insert(k.clone(), v.clone());
        }
    }
    policy.insert(Value::from("version"), Value::from(1));
    policy.insert(Value::from(NETWORK), Value::Mapping(net));
    serde_yaml_ng::to_string(&Value::Mapping(policy)).map_err(|e| e.to_string())
}

/// Whether every key of `preset` is in the live policy's `network_policies`.
pub fn is_applied(live: &str, preset: &Mapping) -> Result<bool, String> {
    let live = parse("the live policy", live)?;
    let net = live.get(NETWORK).and_then(Value::as_mapping);
    Ok(preset.keys().all(|k| net.is_some_and(|n| n.contains_key(k))))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = "version: 3\nfilesystem_policy:\n  read_only: [/usr]\nlandlock:\n  compatibility: best_effort\nnetwork_policies:\n  npm:\n    name: old-npm\n  corp:\n    name: corp\n";
    const NPM: &str = "preset:\n  name: npm\n  description: npm registry\nnetwork_policies:\n  npm:\n    name: npm\n    endpoints: [{host: registry.example, port: 443}]\n  npm_yarn:\n    name: yarn\n";

    #[test]
    fn merge_replaces_by_key_keeps_the_rest_and_forces_version_1() {
        let npm = preset_entries(NPM).unwrap();
        let merged = merge(LIVE, std::slice::from_ref(&npm)).unwrap();
        let v: Value = serde_yaml_ng::from_str(&merged).unwrap();
        assert_eq!(v["version"], Value::from(1));
        assert_eq!(v["landlock"]["compatibility"], Value::from("best_effort"));
        assert_eq!(v["filesystem_policy"]["read_only"][0], Value::from("/usr"));
        assert_eq!(v["network_policies"]["npm"]["name"], Value::from("npm"), "replaced by key");
        assert_eq!(v["network_policies"]["corp"]["name"], Value::from("corp"), "kept");
        assert_eq!(v["network_policies"]["npm_yarn"]["name"], Value::from("yarn"), "added");
        assert!(v.get("preset").is_none(), "the preset header never reaches the policy");
        assert!(!is_applied(LIVE, &npm).unwrap());
        assert!(is_applied(&merged, &npm).unwrap());
        // Idempotent: merging again changes nothing.
        assert_eq!(merge(&merged, &[npm]).unwrap(), merged);
    }

    #[test]
    fn presets_without_entries_and_broken_yaml_are_errors() {
        assert!(preset_entries("preset: {name: x}\n")
            .unwrap_err()
            .contains("no `network_policies`"));
        assert!(preset_entries("network_policies: {}\n").unwrap_err().contains("empty"));
        assert!(preset_entries("network_policies: [a]\n").unwrap_err().contains("not a map"));
        assert!(preset_entries("a: [\n").unwrap_err().contains("not valid YAML"));
        assert!(merge("- a\n", &[]).unwrap_err().contains("not a map"));
        // An empty live policy still gets a version and the entries.
        let m = merge("", &[preset_entries(NPM).unwrap()]).unwrap();
        assert!(m.contains("version: 1") && m.contains("npm_yarn"), "{m}");
    }
}
