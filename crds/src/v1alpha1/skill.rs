//! `Skill`: a prompt module (SKILL.md) whose KV cache the daemons keep hot.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ModelRef;

/// A skill: a long, reusable prompt module (a `SKILL.md` file: YAML front matter plus a
/// Markdown body) whose KV cache is prefilled on the model's daemons before traffic arrives,
/// kept pinned, persisted on the node and assembled into requests.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "skillkv.io",
    version = "v1alpha1",
    kind = "Skill",
    namespaced,
    status = "SkillStatus",
    shortname = "sk",
    category = "skillkv",
    doc = "A prompt module (SKILL.md) whose KV cache skillkv prefills, pins and persists on the daemons of a ModelDeployment.",
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".spec.modelRef.name",
        description = "The ModelDeployment serving this skill"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.ready",
        description = "Pods with the skill's KV ready / pods that should hold it"
    ),
    printcolumn(
        name = "Tokens",
        type_ = "integer",
        json_path = ".status.tokens",
        description = "Tokens in the skill's prompt"
    ),
    printcolumn(
        name = "Assembly",
        type_ = "string",
        json_path = ".spec.assembly",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SkillSpec {
    /// The ModelDeployment whose pods keep this skill's KV hot.
    pub model_ref: ModelRef,

    /// When to use the skill, in a sentence or two. Skill detection matches requests that name
    /// no skills against the description, the keywords and the name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,

    /// Words and phrases a request about this skill would contain; used by skill detection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 64)))]
    pub keywords: Vec<String>,

    /// Free-form version label of the skill's content (e.g. "1.2.0"). A change of content is
    /// detected from its hash whatever this says; the version is for people and for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub version: Option<String>,

    /// Where the SKILL.md text comes from: exactly one of `inline` or `configMapRef`.
    pub source: SkillSource,

    /// How many pods keep this skill hot. Omitted: every pod of the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,

    /// Placement priority from 0 to 1000: when pinned KV capacity is short, skills with a higher
    /// priority are placed first. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: Option<i32>,

    /// How the skill's KV is assembled into requests: `exact` (default) reuses the cached
    /// prefix token for token; `modular` concatenates independently prefilled skill KVs and
    /// re-rotates positions, trading a little accuracy for combinations that were never seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assembly: Option<Assembly>,
}

/// Where a skill's SKILL.md comes from.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("has(self.inline) != has(self.configMapRef)").message("exactly one of source.inline or source.configMapRef must be set"))]
#[serde(rename_all = "camelCase")]
pub struct SkillSource {
    /// The SKILL.md text itself (front matter and body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 262144))]
    pub inline: Option<String>,

    /// A key of a ConfigMap in the same namespace that holds the SKILL.md text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapKeyRef>,
}

/// A key in a ConfigMap of the same namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    /// Name of the ConfigMap.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key whose value is the SKILL.md text.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// How a skill's KV is assembled into a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Assembly {
    /// Reuse through the radix prefix cache: bit-exact, combinations cached lazily.
    #[default]
    Exact,
    /// Concatenate independently prefilled skill KVs, re-rotating positions (RoPE).
    Modular,
}

/// Observed state of a Skill, written by the controller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkillStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// BLAKE3 hash (hex) of the SKILL.md content being served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,

    /// Tokens in the skill's prompt, as tokenized by the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<i64>,

    /// Bytes of KV cache one copy of the skill occupies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_bytes: Option<i64>,

    /// Pods whose copy of the skill's KV is Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,

    /// `readyReplicas/desired`, for `kubectl get skills`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,

    /// One entry per pod chosen to hold the skill.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<SkillPlacement>,

    /// Ready, Progressing and Degraded, with reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The skill's state on one pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkillPlacement {
    /// The daemon pod.
    pub pod: String,
    /// The node the pod runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Where the skill's KV is on that pod.
    pub state: PlacementState,
    /// How long the prefill took, in milliseconds (0 when loaded from the node's store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_millis: Option<i64>,
    /// The daemon's message, e.g. why the prefill failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The lifecycle of a skill or adapter on one pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum PlacementState {
    /// Chosen for the pod; the daemon has not started on it.
    #[default]
    Pending,
    /// The daemon is computing (or loading) the KV.
    Prefilling,
    /// The KV is pinned and serving.
    Ready,
    /// The daemon could not do it; `message` says why.
    Failed,
    /// Known to the pod but not pinned there (placement chose other pods): requests naming it
    /// are served, and the first one prefills it into the pod's prefix cache (evictable).
    Unpinned,
}

impl PlacementState {
    /// Whether the daemon is done with it for now: Ready, Failed or Unpinned (nothing is
    /// pending or prefilling).
    pub fn is_settled(self) -> bool {
        matches!(self, Self::Ready | Self::Failed | Self::Unpinned)
    }
}
