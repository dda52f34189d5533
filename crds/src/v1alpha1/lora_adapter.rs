//! `LoRAAdapter`: a low-rank adapter on a base model, served under its own model id.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ModelRef;

/// A LoRA adapter applied at run time beside a ModelDeployment's base model and served
/// under its own model id.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "skillkv.io",
    version = "v1alpha1",
    kind = "LoRAAdapter",
    plural = "loraadapters",
    namespaced,
    status = "LoRAAdapterStatus",
    shortname = "lora",
    category = "skillkv",
    doc = "A LoRA adapter served on the pods of a ModelDeployment under its own model id.",
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.modelRef.name"),
    printcolumn(name = "Served", type_ = "string", json_path = ".spec.servedName"),
    printcolumn(
        name = "Loaded",
        type_ = "integer",
        json_path = ".status.loadedReplicas"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct LoRAAdapterSpec {
    /// The ModelDeployment whose base model the adapter applies to.
    pub model_ref: ModelRef,

    /// Where the adapter comes from.
    pub source: AdapterSource,

    /// The model id clients send in `model` to use this adapter.
    #[schemars(length(min = 1, max = 256))]
    pub served_name: String,

    /// Multiplier of the adapter's update (`x·Wᵀ + scale·(x·Aᵀ)·Bᵀ`), in (0, 16]. Default: the
    /// adapter config's `lora_alpha / r`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 16.0").message("scale must be in (0, 16]"))]
    pub scale: Option<f64>,

    /// How many pods load the adapter. Omitted: every pod of the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
}

/// Where a LoRA adapter comes from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterSource {
    /// A folder holding PEFT's `adapter_model.safetensors` and `adapter_config.json`:
    /// `file:///path`, `pvc://claim/path` or `hf://org/repo`.
    #[schemars(regex(
        pattern = r"^(file:///.+|pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?/.+|hf://[^/]+/[^/]+.*)$"
    ))]
    pub uri: String,
}

/// Observed state of a LoRAAdapter, written by the controller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoRAAdapterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods on which the adapter is loaded and serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_replicas: Option<i32>,
    /// One entry per pod asked to load the adapter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<AdapterPlacement>,
    /// Ready and Degraded, with reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The adapter's state on one pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterPlacement {
    /// The daemon pod.
    pub pod: String,
    /// The node the pod runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Where the adapter is on that pod.
    pub state: AdapterState,
    /// The daemon's message, e.g. why the load failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The lifecycle of an adapter on one pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum AdapterState {
    /// Chosen for the pod; the daemon has not started loading it.
    #[default]
    Pending,
    /// The daemon is loading the adapter.
    Loading,
    /// Loaded and serving.
    Ready,
    /// The load failed; `message` carries the daemon's reason.
    Failed,
}
