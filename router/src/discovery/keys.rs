//! Pure functions from API-key Secrets (labelled `skillkv.io/api-key: "true"`, DESIGN §3) to the
//! router's key entries: data `key` is the bearer token, optional data `tenant` the tenant, the
//! Secret's labels are what RateLimitPolicy `selector.apiKeys` matches, and the key is named
//! `namespace/name` in logs, metrics and rate-limit budgets. A Secret that cannot be used is
//! skipped with the reason, never fatal.

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;

use super::names;
use crate::auth::ApiKeyEntry;

/// An API-key Secret that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedSecret {
    /// `namespace/name`.
    pub secret: String,
    /// What is wrong with it.
    pub problem: &'static str,
}

fn text(secret: &Secret, key: &str) -> Result<Option<String>, &'static str> {
    let Some(bytes) = secret.data.as_ref().and_then(|data| data.get(key)) else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&bytes.0).map_err(|_| "a data value is not UTF-8")?;
    let text = text.trim();
    Ok((!text.is_empty()).then(|| text.to_string()))
}

/// The key entry of one Secret, or why it cannot be used.
pub fn key_entry(secret: &Secret) -> Result<ApiKeyEntry, &'static str> {
    let key = text(secret, names::API_KEY_KEY)?.ok_or("it has no non-empty data `key`")?;
    let tenant = text(secret, names::API_KEY_TENANT)?;
    Ok(ApiKeyEntry {
        key,
        name: Some(secret_name(secret)),
        tenant,
        labels: secret.labels().clone(),
    })
}

fn secret_name(secret: &Secret) -> String {
    format!(
        "{}/{}",
        secret.namespace().unwrap_or_default(),
        secret.name_any()
    )
}

/// The entries of every usable Secret, sorted by name, and the Secrets skipped.
pub fn key_entries(secrets: &[Secret]) -> (Vec<ApiKeyEntry>, Vec<SkippedSecret>) {
    let mut sorted: Vec<&Secret> = secrets.iter().collect();
    sorted.sort_by_key(|s| secret_name(s));
    let mut entries = Vec::new();
    let mut skipped = Vec::new();
    for secret in sorted {
        match key_entry(secret) {
            Ok(entry) => entries.push(entry),
            Err(problem) => skipped.push(SkippedSecret {
                secret: secret_name(secret),
                problem,
            }),
        }
    }
    (entries, skipped)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn secret(name: &str, data: serde_json::Value) -> Secret {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": "team",
                         "labels": {"skillkv.io/api-key": "true", "tier": "pro"}},
            "data": data
        }))
        .expect("a Secret")
    }

    fn b64(bytes: &[u8]) -> serde_json::Value {
        serde_json::to_value(k8s_openapi::ByteString(bytes.to_vec())).expect("encodes")
    }

    #[test]
    fn secrets_become_named_entries_and_bad_ones_are_skipped_with_the_reason() {
        let secrets = [
            secret("b", json!({"key": b64(b"sk-b\n"), "tenant": b64(b"acme")})),
            secret("a", json!({"key": b64(b"sk-a"), "tenant": b64(b" ")})),
            secret("no-key", json!({"tenant": b64(b"acme")})),
            secret("blank", json!({"key": b64(b"   ")})),
            secret("binary", json!({"key": b64(&[0xff, 0x00])})),
        ];
        let (entries, skipped) = key_entries(&secrets);
        let summary: Vec<(Option<&str>, &str, Option<&str>)> = entries
            .iter()
            .map(|e| (e.name.as_deref(), e.key.as_str(), e.tenant.as_deref()))
            .collect();
        assert_eq!(
            summary,
            [
                (Some("team/a"), "sk-a", None),
                (Some("team/b"), "sk-b", Some("acme")),
            ]
        );
        assert_eq!(entries[0].labels["tier"], "pro");
        let skipped: Vec<(&str, &str)> = skipped
            .iter()
            .map(|s| (s.secret.as_str(), s.problem))
            .collect();
        assert_eq!(
            skipped,
            [
                ("team/binary", "a data value is not UTF-8"),
                ("team/blank", "it has no non-empty data `key`"),
                ("team/no-key", "it has no non-empty data `key`"),
            ]
        );
    }

    #[test]
    fn a_secret_without_data_is_skipped() {
        let mut empty = secret("empty", json!({}));
        empty.data = None;
        assert_eq!(
            key_entry(&empty).err(),
            Some("it has no non-empty data `key`")
        );
    }
}
