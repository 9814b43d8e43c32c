//! Secrets never enter the journal: values under keys that look like secrets are replaced
//! before anything is written.

use serde_json::Value;

/// Replacement text for a redacted value.
pub const REDACTED: &str = "[redacted]";

/// Whether a JSON object key names a secret (`*key*`, `*token*`, `*secret*`, `*password*`,
/// `*credential*`, case-insensitive).
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["key", "token", "secret", "password", "passwd", "credential"].iter().any(|w| k.contains(w))
}

/// A copy of `v` with every secret-looking key's value replaced by [`REDACTED`], at any depth.
/// Strings, numbers and arrays under such a key are all replaced; `null` is kept (nothing to hide).
pub fn redact(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, val)| {
                    let val = if is_secret_key(k) && !val.is_null() {
                        Value::String(REDACTED.to_owned())
                    } else {
                        redact(val)
                    };
                    (k.clone(), val)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redact).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn redacts_nested_secret_keys_only() {
        let v = json!({"apiKey": "sk-1", "model": "m", "nested": [{"NVIDIA_API_TOKEN": "t"}],
                       "credentialEnv": "NVIDIA_API_KEY", "providerCredentialHashes": {"a": "h"},
                       "none_key": null});
        let r = redact(&v);
        assert_eq!(r["apiKey"], REDACTED);
        assert_eq!(r["model"], "m");
        assert_eq!(r["nested"][0]["NVIDIA_API_TOKEN"], REDACTED);
        assert_eq!(r["credentialEnv"], REDACTED);
        assert_eq!(r["providerCredentialHashes"], REDACTED);
        assert!(r["none_key"].is_null());
    }
}
