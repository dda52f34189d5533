//! RateLimitPolicy objects as the router enforces them: loading them from a YAML file (one or
//! more `---`-separated documents), matching a request against a policy's selector, naming the
//! subject whose budget it spends, and splitting the limits across router replicas.

use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::Deserialize;
use skillkv_api::v1alpha1::{RateLimitPolicy, RateLimitSelector, RateLimitSubject};

use crate::auth::Caller;

/// Why the rate-limit file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadRateLimitsError {
    /// The file could not be read.
    #[error("cannot read the rate-limit file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A document is not a RateLimitPolicy.
    #[error("{path}: document {index} is not a RateLimitPolicy")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 0-based document.
        index: usize,
        /// The cause.
        #[source]
        source: serde_yaml::Error,
    },
    /// A policy sets no limit or a limit below 1.
    #[error("{path}: policy `{name}`: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The policy.
        name: String,
        /// What is wrong.
        problem: &'static str,
    },
}

/// One policy's limits for this router replica.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaLimits {
    /// Requests per minute.
    pub requests_per_minute: Option<f64>,
    /// Requests that may arrive at once.
    pub burst: f64,
    /// Tokens per minute.
    pub tokens_per_minute: Option<f64>,
    /// Requests in flight at once.
    pub max_concurrent: Option<u32>,
}

/// A policy ready to enforce.
#[derive(Debug, Clone, PartialEq)]
pub struct EnforcedPolicy {
    /// The policy's name (unique among the enforced policies; `namespace/name` in a cluster).
    pub name: String,
    selector: RateLimitSelector,
    subject: RateLimitSubject,
    /// Its limits on this replica.
    pub limits: ReplicaLimits,
}

/// Reads every RateLimitPolicy in a YAML file.
pub fn load_policies(path: &Path) -> Result<Vec<RateLimitPolicy>, LoadRateLimitsError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadRateLimitsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut policies = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value = serde_yaml::Value::deserialize(document).map_err(|source| {
            LoadRateLimitsError::Parse {
                path: path.to_path_buf(),
                index,
                source,
            }
        })?;
        if value.is_null() {
            continue;
        }
        let policy: RateLimitPolicy =
            serde_yaml::from_value(value).map_err(|source| LoadRateLimitsError::Parse {
                path: path.to_path_buf(),
                index,
                source,
            })?;
        policies.push(policy);
    }
    Ok(policies)
}

impl EnforcedPolicy {
    /// The policy's limits divided among `replicas` router replicas: rates and concurrency are
    /// split evenly (concurrency and burst rounded up, never below 1), so the fleet of routers
    /// together enforces the policy's figures.
    pub fn new(
        policy: &RateLimitPolicy,
        replicas: u32,
        path: &Path,
    ) -> Result<Self, LoadRateLimitsError> {
        let name = policy.metadata.name.clone().unwrap_or_default();
        Self::named(name.clone(), policy, replicas).map_err(|problem| {
            LoadRateLimitsError::Invalid {
                path: path.to_path_buf(),
                name,
                problem,
            }
        })
    }

    /// [`EnforcedPolicy::new`] under `name`, or what is wrong with the policy.
    pub fn named(
        name: String,
        policy: &RateLimitPolicy,
        replicas: u32,
    ) -> Result<Self, &'static str> {
        let limits = &policy.spec.limits;
        if limits.requests_per_minute.is_none()
            && limits.tokens_per_minute.is_none()
            && limits.max_concurrent.is_none()
        {
            return Err(
                "limits must set at least one of requestsPerMinute, tokensPerMinute or maxConcurrent",
            );
        }
        let positive = [
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.max_concurrent.map(i64::from),
            limits.burst.map(i64::from),
        ];
        if positive.iter().flatten().any(|v| *v < 1) {
            return Err("every limit must be at least 1");
        }
        let replicas = f64::from(replicas.max(1));
        let requests_per_minute = limits.requests_per_minute.map(|v| v as f64 / replicas);
        let default_burst = limits
            .requests_per_minute
            .map_or(1.0, |rpm| (rpm as f64 / 60.0).ceil());
        let burst = limits.burst.map_or(default_burst, f64::from);
        Ok(Self {
            name,
            selector: policy.spec.selector.clone(),
            subject: policy.spec.subject,
            limits: ReplicaLimits {
                requests_per_minute,
                burst: (burst / replicas).ceil().max(1.0),
                tokens_per_minute: limits.tokens_per_minute.map(|v| v as f64 / replicas),
                max_concurrent: limits
                    .max_concurrent
                    .map(|v| (f64::from(v) / replicas).ceil().max(1.0) as u32),
            },
        })
    }

    /// Whether the policy applies to `caller` asking for `model`.
    pub fn matches(&self, caller: &Caller, model: &str) -> bool {
        let model_ok =
            self.selector.models.is_empty() || self.selector.models.iter().any(|m| m == model);
        let tenant_ok = self.selector.tenants.is_empty()
            || caller
                .tenant
                .as_ref()
                .is_some_and(|t| self.selector.tenants.contains(t));
        let key_ok = match &self.selector.api_keys {
            None => true,
            Some(selector) => caller.key_name.is_some() && selector_matches(selector, caller),
        };
        model_ok && tenant_ok && key_ok
    }

    /// Whose budget a matching request spends.
    pub fn subject_of(&self, caller: &Caller) -> String {
        match self.subject {
            RateLimitSubject::ApiKey => caller
                .key_name
                .clone()
                .unwrap_or_else(|| "anonymous".to_string()),
            RateLimitSubject::Tenant => caller
                .tenant
                .clone()
                .unwrap_or_else(|| "no-tenant".to_string()),
            RateLimitSubject::Global => String::new(),
        }
    }
}

/// Kubernetes label-selector semantics over the key's labels.
fn selector_matches(selector: &LabelSelector, caller: &Caller) -> bool {
    let labels = &caller.labels;
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|req| {
        let values = req.values.as_deref().unwrap_or_default();
        let value = labels.get(&req.key);
        match req.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => {
                tracing::warn!(
                    operator = other,
                    "unknown label-selector operator; no match"
                );
                false
            }
        }
    });
    labels_ok && expressions_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICIES: &str = r#"
apiVersion: skillkv.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: free-tier}
spec:
  selector:
    models: [m1]
    apiKeys: {matchLabels: {tier: free}, matchExpressions: [{key: banned, operator: DoesNotExist}]}
  subject: apiKey
  limits: {requestsPerMinute: 120, tokensPerMinute: 1000, maxConcurrent: 3}
---
apiVersion: skillkv.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: acme}
spec:
  selector: {tenants: [acme]}
  subject: tenant
  limits: {maxConcurrent: 10, burst: 4}
"#;

    fn caller(name: &str, tenant: Option<&str>, labels: &[(&str, &str)]) -> Caller {
        Caller {
            key_name: Some(name.to_string()),
            tenant: tenant.map(str::to_string),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn enforced(replicas: u32) -> Vec<EnforcedPolicy> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("limits.yaml");
        std::fs::write(&path, POLICIES).expect("write");
        load_policies(&path)
            .expect("loads")
            .iter()
            .map(|p| EnforcedPolicy::new(p, replicas, &path).expect("valid"))
            .collect()
    }

    #[test]
    fn selectors_match_models_key_labels_and_tenants() {
        let [free, acme] = <[EnforcedPolicy; 2]>::try_from(enforced(1)).expect("two policies");
        let free_key = caller("k1", None, &[("tier", "free")]);
        assert!(free.matches(&free_key, "m1"));
        assert!(!free.matches(&free_key, "m2"));
        assert!(!free.matches(&caller("k2", None, &[("tier", "pro")]), "m1"));
        assert!(!free.matches(
            &caller("k3", None, &[("tier", "free"), ("banned", "y")]),
            "m1"
        ));
        assert!(!free.matches(&Caller::default(), "m1"));
        assert!(acme.matches(&caller("k4", Some("acme"), &[]), "anything"));
        assert!(!acme.matches(&caller("k5", Some("other"), &[]), "anything"));
        assert_eq!(free.subject_of(&free_key), "k1");
        assert_eq!(acme.subject_of(&caller("k4", Some("acme"), &[])), "acme");
    }

    #[test]
    fn limits_are_split_across_replicas_with_a_default_burst_of_one_second() {
        let one = enforced(1);
        assert_eq!(one[0].limits.requests_per_minute, Some(120.0));
        assert_eq!(one[0].limits.burst, 2.0);
        let three = enforced(3);
        assert_eq!(three[0].limits.requests_per_minute, Some(40.0));
        assert_eq!(three[0].limits.burst, 1.0);
        assert_eq!(three[0].limits.max_concurrent, Some(1));
        assert_eq!(three[1].limits.max_concurrent, Some(4));
        assert_eq!(three[1].limits.burst, 2.0);
    }

    #[test]
    fn a_policy_without_limits_is_rejected() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("limits.yaml");
        std::fs::write(
            &path,
            "apiVersion: skillkv.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: x}\nspec: {limits: {}}\n",
        )
        .expect("write");
        let policies = load_policies(&path).expect("parses");
        assert!(matches!(
            EnforcedPolicy::new(&policies[0], 1, &path),
            Err(LoadRateLimitsError::Invalid { .. })
        ));
    }
}
