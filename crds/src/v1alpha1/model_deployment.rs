//! `ModelDeployment`: a pool of daemon pods serving one base model.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A pool of skillkv daemon pods serving one base model, with its engine settings and
/// placement. Scale it with `kubectl scale` or an HPA through the `scale` subresource.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "skillkv.io",
    version = "v1alpha1",
    kind = "ModelDeployment",
    namespaced,
    status = "ModelDeploymentStatus",
    shortname = "md",
    category = "skillkv",
    doc = "A pool of skillkv daemon pods serving one base model.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Served",
        type_ = "string",
        json_path = ".spec.servedName",
        description = "Model id in /v1/models"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Desired daemon pods"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Daemon pods ready to serve"
    ),
    printcolumn(
        name = "Available",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Available\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// The model file the daemons load.
    pub model: ModelSource,

    /// The model id clients send in `model` and see in `/v1/models`. Default: the object's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub served_name: Option<String>,

    /// Desired number of daemon pods. Default 1. Managed by the autoscaler when
    /// `autoscaling` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,

    /// Bounds and target for autoscaling on in-flight requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,

    /// Compute resources of each daemon pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<DaemonResources>,

    /// Where the daemon pods may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,

    /// Inference engine settings of each daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineSettings>,

    /// Daemon container image. Default: the operator's own version of the skillkv image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Where skill KV caches persist on the node, so that a restarted daemon loads them
    /// instead of recomputing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistence: Option<Persistence>,
}

/// Where the model file comes from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// `file:///path` on the node (or a mounted volume), `pvc://claim/path/in/claim`, or
    /// `hf://org/repo/file.gguf` (downloaded by an init step into the node's model cache).
    /// The file is a GGUF of a Llama-family model.
    #[schemars(regex(
        pattern = r"^(file:///.+|pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?/.+|hf://[^/]+/[^/]+/.+)$"
    ))]
    pub uri: String,

    /// Expected SHA-256 of the model file (64 lowercase hex digits). The `hf://` download step
    /// refuses a file that does not match; for `file://` and `pvc://` models it is not checked
    /// yet (the daemon reports the file's digest in `/admin/v1/state`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
}

/// Autoscaling bounds, for an HPA or KEDA targeting the `scale` subresource.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not exceed autoscaling.maxReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct Autoscaling {
    /// Fewest daemon pods.
    #[schemars(range(min = 0))]
    pub min_replicas: i32,
    /// Most daemon pods.
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    /// In-flight requests per pod the autoscaler aims for. Default 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_inflight_per_replica: Option<i32>,
}

/// Compute resources of one daemon pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DaemonResources {
    /// GPUs per pod (`nvidia.com/gpu`). 0 or omitted: the daemon runs on CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 16))]
    pub gpus: Option<i32>,
    /// CPU request and limit, e.g. `4` or `3500m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory request and limit, e.g. `16Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

/// Scheduling constraints of the daemon pods.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Node labels the pods require.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the pods tolerate (e.g. `nvidia.com/gpu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Node and pod affinity rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
}

/// Engine settings of each daemon.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("!(has(self.kvCacheBytes) && has(self.kvCacheFraction))").message("set at most one of engine.kvCacheBytes and engine.kvCacheFraction"))]
#[serde(rename_all = "camelCase")]
pub struct EngineSettings {
    /// KV cache size in bytes. Exclusive with `kvCacheFraction`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1048576))]
    pub kv_cache_bytes: Option<i64>,

    /// KV cache size as a fraction of the memory left after the weights, in (0, 1]. Default
    /// 0.9 on GPU. Exclusive with `kvCacheBytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("engine.kvCacheFraction must be in (0, 1]"))]
    pub kv_cache_fraction: Option<f64>,

    /// Share of the KV cache that pinned skills may hold, in (0, 1]. Default 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("engine.pinnedFraction must be in (0, 1]"))]
    pub pinned_fraction: Option<f64>,

    /// Tokens per KV block. Only 16 is supported by this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 16))]
    pub block_size: Option<i32>,

    /// Most tokens processed in one engine step (prefill chunks plus decode tokens).
    /// Default 512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 65536))]
    pub max_batch_tokens: Option<i32>,

    /// Most sequences running at once. Default 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_seqs: Option<i32>,

    /// Longest sequence (prompt plus completion), in tokens. Default: the model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 1048576))]
    pub context_length: Option<i32>,

    /// Element type of the KV cache. Default `f32` on CPU, `f16` on GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_dtype: Option<KvDtype>,
}

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    Bf16,
}

/// Node-local persistence of skill KV caches.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Persistence {
    /// Absolute directory on the node for the skill KV store.
    #[schemars(regex(pattern = r"^/.*"), length(max = 4096))]
    pub host_path: String,
}

/// Observed state of a ModelDeployment, written by the controller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Daemon pods that exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Daemon pods that are ready (model loaded, pinned skills warm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Label selector of the daemon pods, for the `scale` subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Available, Progressing and Degraded, with reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
