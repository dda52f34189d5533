//! `RateLimitPolicy`: request and token limits the router enforces.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Limits the router enforces on requests that match the selector, counted per subject.
/// Requests over a limit get HTTP 429 with `Retry-After` and `x-ratelimit-*` headers.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "skillkv.io",
    version = "v1alpha1",
    kind = "RateLimitPolicy",
    namespaced,
    status = "RateLimitPolicyStatus",
    shortname = "rlp",
    category = "skillkv",
    doc = "Request and token limits that the skillkv router enforces.",
    printcolumn(name = "Subject", type_ = "string", json_path = ".spec.subject"),
    printcolumn(
        name = "RPM",
        type_ = "integer",
        json_path = ".spec.limits.requestsPerMinute"
    ),
    printcolumn(
        name = "TPM",
        type_ = "integer",
        json_path = ".spec.limits.tokensPerMinute"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicySpec {
    /// Which requests the policy applies to. Empty: every request.
    #[serde(default)]
    pub selector: RateLimitSelector,

    /// What one budget is counted for: each API key, each tenant, or all matching traffic.
    /// Default `apiKey`.
    #[serde(default)]
    pub subject: RateLimitSubject,

    /// The limits. At least one of requestsPerMinute, tokensPerMinute or maxConcurrent.
    pub limits: Limits,
}

/// Which requests a policy applies to; every given criterion must match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSelector {
    /// Model ids (base models or adapters). Empty: every model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1)))]
    pub models: Vec<String>,

    /// Label selector over the API-key Secrets (labelled `skillkv.io/api-key: "true"`).
    /// Omitted: every key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<LabelSelector>,

    /// Tenants (the `tenant` of the key's Secret). Empty: every tenant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1)))]
    pub tenants: Vec<String>,
}

/// What one rate-limit budget is counted for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RateLimitSubject {
    /// Each API key has its own budget.
    #[default]
    ApiKey,
    /// Each tenant has its own budget, shared by its keys.
    Tenant,
    /// One budget for all matching requests.
    Global,
}

/// Rate limits; each is enforced independently.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("has(self.requestsPerMinute) || has(self.tokensPerMinute) || has(self.maxConcurrent)").message("limits must set at least one of requestsPerMinute, tokensPerMinute or maxConcurrent"))]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<i64>,
    /// Prompt plus completion tokens per minute, charged as each response completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<i64>,
    /// Requests in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent: Option<i32>,
    /// Requests that may arrive at once above the steady rate. Default: one second's worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<i32>,
}

/// Observed state of a RateLimitPolicy, written by the controller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// API-key Secrets the selector matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_keys: Option<i32>,
    /// Accepted and Conflicted, with reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
