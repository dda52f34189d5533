//! The RateLimitPolicy reconciler: validates each policy, detects conflicts (two policies that
//! claim the same subject over the same selector with different limits), counts the API-key
//! Secrets it matches, and writes Accepted / Conflicted. The router reads accepted policies.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::ListParams;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use skillkv_api::v1alpha1::{RateLimitPolicy, RateLimitPolicyStatus, condition_types as types};

use crate::conditions::{ConditionUpdate, merge_conditions};
use crate::context::Context;
use crate::fleet::write::apply_status;

/// The `controller` label of this reconciler's metrics.
pub const CONTROLLER: &str = "ratelimitpolicy";

/// Why a RateLimitPolicy reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileRateLimitError {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
}

/// Checks what the schema cannot: label-selector operators and their values.
pub fn validate_policy(policy: &RateLimitPolicy) -> Result<(), String> {
    let limits = &policy.spec.limits;
    if limits.requests_per_minute.is_none()
        && limits.tokens_per_minute.is_none()
        && limits.max_concurrent.is_none()
    {
        return Err(
            "limits must set requestsPerMinute, tokensPerMinute or maxConcurrent".to_owned(),
        );
    }
    if let Some(selector) = &policy.spec.selector.api_keys {
        selector_string(selector)?;
    }
    Ok(())
}

/// A label selector in the `labelSelector` query syntax.
pub fn selector_string(selector: &LabelSelector) -> Result<String, String> {
    let mut terms: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    for expression in selector.match_expressions.iter().flatten() {
        let values = expression.values.clone().unwrap_or_default();
        let term = match (expression.operator.as_str(), values.is_empty()) {
            ("In", false) => format!("{} in ({})", expression.key, values.join(",")),
            ("NotIn", false) => format!("{} notin ({})", expression.key, values.join(",")),
            ("Exists", true) => expression.key.clone(),
            ("DoesNotExist", true) => format!("!{}", expression.key),
            (operator, _) => {
                return Err(format!(
                    "apiKeys expression on {:?}: operator {operator:?} with {} value(s) is not valid",
                    expression.key,
                    values.len()
                ));
            }
        };
        terms.push(term);
    }
    Ok(terms.join(","))
}

/// What a policy claims: its subject over its selector (normalised).
fn claim(policy: &RateLimitPolicy) -> String {
    let selector = &policy.spec.selector;
    let mut models = selector.models.clone();
    models.sort();
    let mut tenants = selector.tenants.clone();
    tenants.sort();
    let keys = selector
        .api_keys
        .as_ref()
        .and_then(|s| selector_string(s).ok())
        .unwrap_or_default();
    format!(
        "{:?}|{}|{}|{keys}",
        policy.spec.subject,
        models.join(","),
        tenants.join(",")
    )
}

/// Other policies (by `namespace/name`) that claim what `policy` claims with different limits.
pub fn conflicting_policies(policy: &RateLimitPolicy, all: &[RateLimitPolicy]) -> Vec<String> {
    let mine = claim(policy);
    let mut others: Vec<String> = all
        .iter()
        .filter(|other| {
            !(other.name_any() == policy.name_any() && other.namespace() == policy.namespace())
        })
        .filter(|other| claim(other) == mine && other.spec.limits != policy.spec.limits)
        .map(|other| {
            format!(
                "{}/{}",
                other.namespace().unwrap_or_default(),
                other.name_any()
            )
        })
        .collect();
    others.sort();
    others
}

/// The policy's status from its validation, conflicts and matched keys.
pub fn policy_status(
    policy: &RateLimitPolicy,
    validation: Result<(), String>,
    conflicts: &[String],
    matched_keys: Option<i32>,
    now: k8s_openapi::jiff::Timestamp,
) -> RateLimitPolicyStatus {
    let old = policy.status.clone().unwrap_or_default();
    let generation = policy.metadata.generation;
    let conflicted = if conflicts.is_empty() {
        ConditionUpdate::unmet(types::CONFLICTED, "NoConflict", "")
    } else {
        ConditionUpdate::met(
            types::CONFLICTED,
            "SubjectClaimedTwice",
            format!(
                "the same subject and selector have different limits in {}",
                conflicts.join(", ")
            ),
        )
    };
    let accepted = match (&validation, conflicts.is_empty()) {
        (Err(message), _) => {
            ConditionUpdate::unmet(types::ACCEPTED, "InvalidPolicy", message.clone())
        }
        (Ok(()), false) => {
            ConditionUpdate::unmet(types::ACCEPTED, "Conflicted", conflicted.message.clone())
        }
        (Ok(()), true) => {
            ConditionUpdate::met(types::ACCEPTED, "Accepted", "published to the router")
        }
    };
    RateLimitPolicyStatus {
        observed_generation: generation,
        matched_keys,
        conditions: merge_conditions(&old.conditions, &[accepted, conflicted], generation, now),
    }
}

/// Reconciles one RateLimitPolicy.
pub async fn reconcile(
    guarded: Arc<DeserializeGuard<RateLimitPolicy>>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileRateLimitError> {
    let _timer = ctx.metrics.start_reconcile(CONTROLLER);
    let policy = match &guarded.0 {
        Ok(policy) => policy,
        Err(invalid) => {
            tracing::warn!(name = ?invalid.metadata.name, error = %invalid.error, "ignoring a RateLimitPolicy that does not deserialize");
            ctx.metrics.reconcile_failed(CONTROLLER, "InvalidObject");
            return Ok(Action::await_change());
        }
    };
    let result = sync_policy(policy, &ctx).await;
    if let Err(error) = &result {
        ctx.metrics
            .reconcile_failed(CONTROLLER, "KubernetesApiError");
        tracing::warn!(policy = %policy.name_any(), %error, "rate-limit policy reconcile failed");
    }
    result
}

async fn sync_policy(
    policy: &RateLimitPolicy,
    ctx: &Context,
) -> Result<Action, ReconcileRateLimitError> {
    let policies: Api<RateLimitPolicy> = Api::all(ctx.client.clone());
    let all = policies.list(&ListParams::default()).await?.items;
    let validation = validate_policy(policy);
    let conflicts = conflicting_policies(policy, &all);
    let matched_keys = match &validation {
        Ok(()) => Some(count_matched_keys(policy, ctx).await?),
        Err(_) => None,
    };
    let status = policy_status(
        policy,
        validation,
        &conflicts,
        matched_keys,
        k8s_openapi::jiff::Timestamp::now(),
    );
    if Some(&status) != policy.status.as_ref() {
        apply_status(policy, &status, ctx).await?;
    }
    Ok(Action::requeue(ctx.settings.resync()))
}

async fn count_matched_keys(policy: &RateLimitPolicy, ctx: &Context) -> Result<i32, kube::Error> {
    let mut selector = ctx.settings.api_key_selector.clone();
    if let Some(extra) = policy
        .spec
        .selector
        .api_keys
        .as_ref()
        .and_then(|s| selector_string(s).ok())
        && !extra.is_empty()
    {
        selector = format!("{selector},{extra}");
    }
    let secrets: Api<Secret> = Api::all(ctx.client.clone());
    let keys = secrets
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    let tenants = &policy.spec.selector.tenants;
    let matched = keys
        .iter()
        .filter(|secret| {
            tenants.is_empty()
                || secret
                    .data
                    .as_ref()
                    .and_then(|data| data.get("tenant"))
                    .and_then(|tenant| std::str::from_utf8(&tenant.0).ok())
                    .is_some_and(|tenant| tenants.iter().any(|t| t == tenant.trim()))
        })
        .count();
    Ok(i32::try_from(matched).unwrap_or(i32::MAX))
}

/// Backoff after a failed RateLimitPolicy reconcile.
pub fn error_policy(
    _policy: Arc<DeserializeGuard<RateLimitPolicy>>,
    _error: &ReconcileRateLimitError,
    ctx: Arc<Context>,
) -> Action {
    Action::requeue(ctx.settings.progress() * 3)
}

#[cfg(test)]
mod reconcile_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use skillkv_api::v1alpha1::{Limits, RateLimitPolicySpec};

    fn policy(name: &str, rpm: i64) -> RateLimitPolicy {
        let mut policy = RateLimitPolicy::new(
            name,
            RateLimitPolicySpec {
                limits: Limits {
                    requests_per_minute: Some(rpm),
                    ..Limits::default()
                },
                ..RateLimitPolicySpec::default()
            },
        );
        policy.metadata.namespace = Some("ns".to_owned());
        policy
    }

    #[test]
    fn same_subject_with_different_limits_conflicts_both_ways() {
        let (a, b) = (policy("a", 10), policy("b", 20));
        let all = [a.clone(), b.clone()];
        assert_eq!(conflicting_policies(&a, &all), vec!["ns/b".to_owned()]);
        assert_eq!(conflicting_policies(&b, &all), vec!["ns/a".to_owned()]);
        let status = policy_status(
            &a,
            Ok(()),
            &conflicting_policies(&a, &all),
            Some(0),
            k8s_openapi::jiff::Timestamp::now(),
        );
        let accepted = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Accepted")
            .map(|c| c.status.clone());
        assert_eq!(accepted.as_deref(), Some("False"));
    }

    #[test]
    fn same_limits_or_other_models_do_not_conflict() {
        let a = policy("a", 10);
        let same = policy("b", 10);
        let mut other_model = policy("c", 20);
        other_model.spec.selector.models = vec!["m".to_owned()];
        assert!(conflicting_policies(&a, &[a.clone(), same, other_model]).is_empty());
    }

    #[test]
    fn invalid_selector_operators_are_rejected() {
        let mut p = policy("a", 10);
        p.spec.selector.api_keys = Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "team".to_owned(),
                operator: "In".to_owned(),
                values: None,
            }]),
            match_labels: None,
        });
        assert!(validate_policy(&p).is_err());
        let status = policy_status(
            &p,
            validate_policy(&p),
            &[],
            None,
            k8s_openapi::jiff::Timestamp::now(),
        );
        let accepted = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Accepted")
            .map(|c| c.reason.clone());
        assert_eq!(accepted.as_deref(), Some("InvalidPolicy"));
    }
}
