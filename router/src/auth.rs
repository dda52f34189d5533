//! API keys: who a request comes from. Keys are read from a YAML file locally (a list of
//! `{key, name, tenant, labels}`, the fields of the `skillkv.io/api-key` Secrets in a cluster),
//! kept only as BLAKE3 digests, and compared with `blake3::Hash`'s constant-time equality
//! against every known key, so neither which key matched nor how much of it matched leaks
//! through timing — the daemon's approach (daemon/src/server/auth.rs), extended with identities.
//! In a cluster the key set is replaced whole while the router runs ([`ApiKeys::replace`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;

/// One entry of the API-key file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiKeyEntry {
    /// The secret bearer token.
    pub key: String,
    /// The key's name (the Secret's name in a cluster); used in logs, metrics and as the
    /// rate-limit subject. Default: `key-` and the first 12 hex digits of the key's digest.
    #[serde(default)]
    pub name: Option<String>,
    /// The tenant the key belongs to.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Labels, matched by RateLimitPolicy `selector.apiKeys`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Who sent a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The key's name; `None` for an anonymous request (allowed when keys are optional).
    pub key_name: Option<String>,
    /// The key's tenant.
    pub tenant: Option<String>,
    /// The key's labels.
    pub labels: BTreeMap<String, String>,
}

/// Why the API-key file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadApiKeysError {
    /// The file could not be read.
    #[error("cannot read the API-key file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a YAML list of keys.
    #[error("the API-key file {path} is not a YAML list of {{key, name, tenant, labels}}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_yaml::Error,
    },
    /// An entry has an empty key.
    #[error("the API-key file {path} has an empty key (entry {index})")]
    EmptyKey {
        /// The file.
        path: PathBuf,
        /// 0-based entry.
        index: usize,
    },
}

#[derive(Debug, PartialEq)]
struct KnownKey {
    digest: blake3::Hash,
    caller: Caller,
}

/// The accepted keys and whether one is required. Clones share the key set, so a clone kept by
/// discovery replaces the keys the server checks.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Arc<RwLock<Arc<Vec<KnownKey>>>>,
    required: bool,
}

fn known_keys(entries: Vec<ApiKeyEntry>) -> Vec<KnownKey> {
    entries
        .into_iter()
        .map(|entry| {
            let digest = blake3::hash(entry.key.trim().as_bytes());
            let name = entry
                .name
                .unwrap_or_else(|| format!("key-{}", &digest.to_hex()[..12]));
            KnownKey {
                digest,
                caller: Caller {
                    key_name: Some(name),
                    tenant: entry.tenant,
                    labels: entry.labels,
                },
            }
        })
        .collect()
}

/// The outcome of checking a request's `Authorization` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    /// A known key, or no key where none is required.
    Allowed(Caller),
    /// A wrong key, or no key where one is required.
    Denied,
}

impl ApiKeys {
    /// Keys from entries; `required` rejects requests that carry no key.
    pub fn new(entries: Vec<ApiKeyEntry>, required: bool) -> Self {
        Self {
            keys: Arc::new(RwLock::new(Arc::new(known_keys(entries)))),
            required,
        }
    }

    /// Accepts exactly `entries` from now on (every clone sees the new set at once); returns
    /// whether the set changed.
    pub fn replace(&self, entries: Vec<ApiKeyEntry>) -> bool {
        let keys = known_keys(entries);
        let mut current = self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if **current == keys {
            return false;
        }
        *current = Arc::new(keys);
        true
    }

    fn keys(&self) -> Arc<Vec<KnownKey>> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether requests without a key are rejected.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Reads the YAML key file.
    pub fn load(path: &Path, required: bool) -> Result<Self, LoadApiKeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadApiKeysError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let entries: Vec<ApiKeyEntry> =
            serde_yaml::from_str(&text).map_err(|source| LoadApiKeysError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        if let Some(index) = entries.iter().position(|e| e.key.trim().is_empty()) {
            return Err(LoadApiKeysError::EmptyKey {
                path: path.to_path_buf(),
                index,
            });
        }
        Ok(Self::new(entries, required))
    }

    /// Number of known keys.
    pub fn len(&self) -> usize {
        self.keys().len()
    }

    /// Whether no key is known.
    pub fn is_empty(&self) -> bool {
        self.keys().is_empty()
    }

    /// Checks an `Authorization` header value. A request without one is anonymous unless keys
    /// are required; a request with one must carry a known key.
    pub fn authenticate(&self, authorization: Option<&str>) -> Authentication {
        let Some(value) = authorization else {
            return if self.required {
                Authentication::Denied
            } else {
                Authentication::Allowed(Caller::default())
            };
        };
        let Some(token) = value.strip_prefix("Bearer ") else {
            return Authentication::Denied;
        };
        let digest = blake3::hash(token.trim().as_bytes());
        let keys = self.keys();
        // Every key is compared, with constant-time equality, so the time taken does not
        // depend on which key matches.
        let matched = keys.iter().fold(None, |found, known| {
            if known.digest == digest {
                Some(known)
            } else {
                found
            }
        });
        match matched {
            Some(known) => Authentication::Allowed(known.caller.clone()),
            None if keys.is_empty() && !self.required => Authentication::Allowed(Caller::default()),
            None => Authentication::Denied,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, name: Option<&str>, tenant: Option<&str>) -> ApiKeyEntry {
        ApiKeyEntry {
            key: key.to_string(),
            name: name.map(str::to_string),
            tenant: tenant.map(str::to_string),
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn known_keys_identify_their_caller_and_wrong_keys_are_denied() {
        let keys = ApiKeys::new(
            vec![
                entry("sk-a", Some("alice"), Some("acme")),
                entry("sk-b", None, None),
            ],
            true,
        );
        let Authentication::Allowed(alice) = keys.authenticate(Some("Bearer sk-a")) else {
            panic!("sk-a is known");
        };
        assert_eq!(alice.key_name.as_deref(), Some("alice"));
        assert_eq!(alice.tenant.as_deref(), Some("acme"));
        let Authentication::Allowed(b) = keys.authenticate(Some("Bearer sk-b")) else {
            panic!("sk-b is known");
        };
        assert!(
            b.key_name
                .is_some_and(|n| n.starts_with("key-") && n.len() == 16)
        );
        assert_eq!(
            keys.authenticate(Some("Bearer sk-c")),
            Authentication::Denied
        );
        assert_eq!(keys.authenticate(Some("sk-a")), Authentication::Denied);
        assert_eq!(keys.authenticate(None), Authentication::Denied);
    }

    #[test]
    fn optional_keys_admit_anonymous_requests_but_not_wrong_keys() {
        let keys = ApiKeys::new(vec![entry("sk-a", None, None)], false);
        assert_eq!(
            keys.authenticate(None),
            Authentication::Allowed(Caller::default())
        );
        assert_eq!(
            keys.authenticate(Some("Bearer nope")),
            Authentication::Denied
        );
        let open = ApiKeys::new(Vec::new(), false);
        assert!(matches!(
            open.authenticate(Some("Bearer anything")),
            Authentication::Allowed(_)
        ));
    }

    #[test]
    fn replacing_the_keys_reaches_every_clone_at_once() {
        let keys = ApiKeys::new(vec![entry("sk-old", Some("old"), None)], true);
        let server_side = keys.clone();
        assert!(!keys.replace(vec![entry("sk-old", Some("old"), None)]));
        assert!(keys.replace(vec![entry("sk-new", Some("new"), Some("t"))]));
        assert_eq!(
            server_side.authenticate(Some("Bearer sk-old")),
            Authentication::Denied
        );
        let Authentication::Allowed(caller) = server_side.authenticate(Some("Bearer sk-new"))
        else {
            panic!("the new key is known to the clone");
        };
        assert_eq!(caller.key_name.as_deref(), Some("new"));
        assert_eq!(caller.tenant.as_deref(), Some("t"));
    }

    #[test]
    fn loads_the_yaml_file_and_rejects_empty_keys() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("keys.yaml");
        std::fs::write(
            &path,
            "- key: sk-1\n  name: one\n  tenant: t\n  labels: {tier: free}\n",
        )
        .expect("write");
        let keys = ApiKeys::load(&path, true).expect("loads");
        assert_eq!(keys.len(), 1);
        let Authentication::Allowed(caller) = keys.authenticate(Some("Bearer sk-1")) else {
            panic!("sk-1 is known");
        };
        assert_eq!(caller.labels["tier"], "free");
        std::fs::write(&path, "- key: '  '\n").expect("write");
        assert!(matches!(
            ApiKeys::load(&path, true),
            Err(LoadApiKeysError::EmptyKey { index: 0, .. })
        ));
    }
}
