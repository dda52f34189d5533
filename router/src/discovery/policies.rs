//! Pure functions from RateLimitPolicies to the policies this router replica enforces, and from
//! the router's own EndpointSlices to the number of replicas the limits are split across.
//!
//! The controller (the only writer of status) marks each policy Accepted, or not Accepted with
//! reason `Conflicted` or `InvalidPolicy`. A policy it has refused for its current generation is
//! skipped. A policy it has not yet judged (no `Accepted` condition for the current generation)
//! is enforced when it passes the router's own validation, so a new limit applies at once; if
//! the controller later finds a conflict, the policy drops out.

use std::collections::BTreeSet;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use skillkv_api::v1alpha1::{RateLimitPolicy, condition_types};

use crate::ratelimit::policy::EnforcedPolicy;

/// A RateLimitPolicy that is not enforced, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedPolicy {
    /// `namespace/name`.
    pub policy: String,
    /// Why.
    pub problem: String,
}

/// The controller's refusal of the policy's current generation: the reason and message of an
/// `Accepted=False` condition observed at the current generation.
fn refusal(policy: &RateLimitPolicy) -> Option<String> {
    let status = policy.status.as_ref()?;
    let accepted = status
        .conditions
        .iter()
        .find(|c| c.type_ == condition_types::ACCEPTED)?;
    let observed = accepted.observed_generation.or(status.observed_generation);
    let current = observed.is_some() && observed == policy.metadata.generation;
    (current && accepted.status == "False").then(|| {
        format!(
            "not accepted by the controller ({}): {}",
            accepted.reason, accepted.message
        )
    })
}

/// The policies to enforce on one of `replicas` router replicas, sorted by name (named
/// `namespace/name`), and those skipped.
pub fn enforced_policies(
    policies: &[RateLimitPolicy],
    replicas: u32,
) -> (Vec<EnforcedPolicy>, Vec<SkippedPolicy>) {
    let mut enforced = Vec::new();
    let mut skipped = Vec::new();
    for policy in policies {
        let name = format!(
            "{}/{}",
            policy.namespace().unwrap_or_default(),
            policy.name_any()
        );
        let result = match refusal(policy) {
            Some(problem) => Err(problem),
            None => EnforcedPolicy::named(name.clone(), policy, replicas)
                .map_err(|problem| problem.to_string()),
        };
        match result {
            Ok(policy) => enforced.push(policy),
            Err(problem) => skipped.push(SkippedPolicy {
                policy: name,
                problem,
            }),
        }
    }
    enforced.sort_by(|a, b| a.name.cmp(&b.name));
    skipped.sort_by(|a, b| a.policy.cmp(&b.policy));
    (enforced, skipped)
}

/// Router replicas that take traffic: the distinct ready, non-terminating endpoints of the
/// router Service's slices; at least 1 (this replica counts before it is ready).
pub fn ready_replicas(slices: &[EndpointSlice]) -> u32 {
    let ready: BTreeSet<String> = slices
        .iter()
        .flat_map(|slice| slice.endpoints.iter())
        .filter(|endpoint| {
            let conditions = endpoint.conditions.as_ref();
            conditions.and_then(|c| c.ready).unwrap_or(true)
                && !conditions.and_then(|c| c.terminating).unwrap_or(false)
        })
        .filter_map(|endpoint| {
            endpoint
                .target_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .or_else(|| endpoint.addresses.first().cloned())
        })
        .collect();
    u32::try_from(ready.len()).unwrap_or(u32::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn policy(
        name: &str,
        generation: i64,
        limits: Value,
        accepted: Option<(&str, &str, i64)>,
    ) -> RateLimitPolicy {
        let mut object = json!({
            "apiVersion": "skillkv.io/v1alpha1", "kind": "RateLimitPolicy",
            "metadata": {"name": name, "namespace": "team", "generation": generation},
            "spec": {"subject": "global", "limits": limits}
        });
        if let Some((status, reason, observed)) = accepted {
            object["status"] = json!({"observedGeneration": observed, "conditions": [{
                "type": "Accepted", "status": status, "reason": reason, "message": "m",
                "observedGeneration": observed, "lastTransitionTime": "2026-01-01T00:00:00Z"
            }]});
        }
        serde_json::from_value(object).expect("a RateLimitPolicy")
    }

    #[test]
    fn refused_and_invalid_policies_are_skipped_and_limits_are_split() {
        let policies = [
            policy(
                "ok",
                1,
                json!({"requestsPerMinute": 120}),
                Some(("True", "Accepted", 1)),
            ),
            policy("fresh", 2, json!({"maxConcurrent": 4}), None),
            policy(
                "conflicted",
                3,
                json!({"requestsPerMinute": 10}),
                Some(("False", "Conflicted", 3)),
            ),
            // Refused for an older generation: judged again by the router.
            policy(
                "fixed",
                5,
                json!({"tokensPerMinute": 600}),
                Some(("False", "InvalidPolicy", 4)),
            ),
            policy("empty", 1, json!({}), None),
        ];
        let (enforced, skipped) = enforced_policies(&policies, 2);
        let names: Vec<&str> = enforced.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["team/fixed", "team/fresh", "team/ok"]);
        assert_eq!(enforced[2].limits.requests_per_minute, Some(60.0));
        assert_eq!(enforced[1].limits.max_concurrent, Some(2));
        let skipped: Vec<&str> = skipped.iter().map(|s| s.policy.as_str()).collect();
        assert_eq!(skipped, ["team/conflicted", "team/empty"]);
    }

    #[test]
    fn replicas_are_the_distinct_ready_router_endpoints() {
        let slice = |endpoints: Value| -> EndpointSlice {
            serde_json::from_value(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "r", "namespace": "sys"}, "addressType": "IPv4",
                "endpoints": endpoints
            }))
            .expect("an EndpointSlice")
        };
        let ep = |pod: &str, ready: bool, terminating: bool| {
            json!({"addresses": ["10.0.0.1"], "conditions": {"ready": ready, "terminating": terminating},
                   "targetRef": {"kind": "Pod", "name": pod}})
        };
        let slices = [
            slice(json!([
                ep("a", true, false),
                ep("b", true, false),
                ep("c", false, false)
            ])),
            slice(json!([ep("a", true, false), ep("d", true, true)])),
        ];
        assert_eq!(ready_replicas(&slices), 2);
        assert_eq!(ready_replicas(&[]), 1);
    }
}
