//! The daemon admin protocol (port 8081), shared by the daemon that serves it and the operator
//! and router that use it: `PUT /admin/v1/desired` (the full desired set of skills and adapters),
//! the `GET /admin/v1/state` snapshot and the `GET /admin/v1/events` SSE events.

use serde::{Deserialize, Serialize};

use crate::block_hash::BlockHash;
use crate::v1alpha1::{Assembly, PlacementState};

/// Path of the desired state (`PUT`).
pub const DESIRED_PATH: &str = "/admin/v1/desired";
/// Path of the state snapshot.
pub const STATE_PATH: &str = "/admin/v1/state";
/// Path of the event stream.
pub const EVENTS_PATH: &str = "/admin/v1/events";

/// `PUT /admin/v1/desired`: everything the controller wants on this daemon. The set is complete:
/// a skill or adapter that was desired before and is absent now is removed (its KV unpinned).
/// Skills from the daemon's `--skills` folder are not affected. Idempotent: the same document
/// twice changes nothing; a document with a generation lower than the last one applied is
/// rejected with 409 so that a stale controller cannot roll state back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredState {
    /// Monotonic generation chosen by the writer.
    pub generation: u64,
    /// Every skill requests may name on this daemon; those with `pin` are kept prefilled and
    /// pinned.
    #[serde(default)]
    pub skills: Vec<DesiredSkill>,
    /// LoRA adapters to load.
    #[serde(default)]
    pub adapters: Vec<DesiredAdapter>,
}

/// One desired skill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredSkill {
    /// The skill's name (the Skill object's name); requests name it in `skills`.
    pub name: String,
    /// The full SKILL.md text (front matter and body).
    pub content: String,
    /// Higher priority skills are pinned first when the pinned budget is short.
    #[serde(default)]
    pub priority: i32,
    /// How the skill is assembled into requests.
    #[serde(default)]
    pub assembly: Assembly,
    /// Keep its KV prefilled and pinned here (the operator's placement chose this pod). False:
    /// the daemon only knows the skill, so requests may name it; the first request that uses it
    /// prefills it into the prefix cache, where later ones find it until it is evicted; never
    /// pinned. Absent means true.
    #[serde(default = "pin_by_default")]
    pub pin: bool,
}

fn pin_by_default() -> bool {
    true
}

/// One desired LoRA adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredAdapter {
    /// The model id clients send to use the adapter.
    pub name: String,
    /// Where the PEFT adapter files are (`file://` directory on the node).
    pub uri: String,
    /// Scale applied to the low-rank update.
    #[serde(default = "default_adapter_scale")]
    pub scale: f32,
}

fn default_adapter_scale() -> f32 {
    1.0
}

/// The answer to `PUT /admin/v1/desired`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredStateApplied {
    /// The generation now applied.
    pub generation: u64,
    /// Whether the document changed anything (false for a repeat).
    pub changed: bool,
}

/// Where a skill on the daemon came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SkillOrigin {
    /// The `--skills` folder.
    Directory,
    /// The admin API's desired state.
    Desired,
}

/// One skill's state on the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SkillState {
    /// The skill's name.
    pub name: String,
    /// The skill's version from its front matter, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// When to use the skill (front matter `description`); the router detects skills from it.
    #[serde(default)]
    pub description: String,
    /// The front matter's `keywords`; the router detects skills from them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keywords: Vec<String>,
    /// BLAKE3 (hex) of the newest SKILL.md text given for the skill; `state` describes it.
    pub content_hash: String,
    /// BLAKE3 (hex) of the version whose KV serves requests now; during a hot update it is the
    /// old version until the new one is Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_content_hash: Option<String>,
    /// Where it came from.
    pub origin: SkillOrigin,
    /// How it is assembled.
    pub assembly: Assembly,
    /// Pending, Prefilling, Ready or Failed.
    pub state: PlacementState,
    /// Why it failed, or what it is doing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Tokens of the skill's prompt segment.
    pub tokens: usize,
    /// Hash of the last full KV block of that segment prefilled on its own (chained from the
    /// base model's namespace root, see [`crate::block_hash`]): a daemon whose cached prefix
    /// blocks include it holds the skill's KV, pinned or not — the router counts such a skill
    /// as warm there. `None` for a segment shorter than one block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_block: Option<BlockHash>,
    /// Bytes of KV pinned for it.
    pub kv_bytes: u64,
    /// Milliseconds the prefill took (0 when loaded from the node's store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_millis: Option<u64>,
    /// Requests that used the skill.
    pub hits: u64,
    /// Prompt tokens of those requests served from the skill's cached KV.
    pub cached_tokens: u64,
    /// Estimated prefill seconds saved by serving from cache.
    pub prefill_seconds_saved: f64,
}

/// A LoRA adapter's lifecycle on the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdapterPhase {
    /// Loaded and serving.
    Ready,
    /// Could not be loaded; the message says why.
    Failed,
}

/// One adapter's state on the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdapterState {
    /// The adapter's model id.
    pub name: String,
    /// Ready or Failed.
    pub state: AdapterPhase,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `GET /admin/v1/state`: what the daemon serves and how loaded it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DaemonState {
    /// The daemon's version.
    pub daemon_version: String,
    /// The base model.
    pub model: ModelInfo,
    /// The KV cache budget.
    pub kv_budget: KvBudget,
    /// Current load.
    pub load: LoadFigures,
    /// The generation of the last desired state applied (`None` before the first `PUT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_generation: Option<u64>,
    /// Every skill the daemon knows, sorted by name.
    #[serde(default)]
    pub skills: Vec<SkillState>,
    /// Every adapter the daemon was asked to load, sorted by name.
    #[serde(default)]
    pub adapters: Vec<AdapterState>,
    /// Where the engine runs and why (absent from daemons that predate `--device`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceInfo>,
}

/// Which hardware a daemon's engine runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DeviceKind {
    /// The CPU backend.
    Cpu,
    /// The CUDA backend.
    Cuda,
}

/// The engine's device, as `--device` chose it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInfo {
    /// CPU or CUDA.
    pub kind: DeviceKind,
    /// The CUDA device ordinal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordinal: Option<usize>,
    /// The device's name as the driver reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Device memory, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_total_bytes: Option<u64>,
    /// Device memory free when the device was opened (before the weights), bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_free_bytes: Option<u64>,
    /// Device memory free once the weights were loaded, bytes (what `kvCacheFraction` takes
    /// its share of).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_free_after_weights_bytes: Option<u64>,
    /// Why this device: the request, or what `auto` found missing.
    pub reason: String,
}

/// The served base model's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelInfo {
    /// The model id clients send as `model`.
    pub id: String,
    /// SHA-256 (hex) of the model file.
    pub model_digest: String,
    /// Digest of the tokenizer (vocabulary and merges).
    pub tokenizer_digest: String,
    /// Digest of the chat template.
    pub chat_template_digest: String,
    /// Context length in tokens.
    pub context_length: usize,
    /// Hash of the prefix-cache namespace root of the base model (the router chains block
    /// hashes from it).
    pub namespace_root: BlockHash,
}

/// The KV pool's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KvBudget {
    /// Tokens per block.
    pub block_tokens: usize,
    /// Blocks in the pool.
    pub total_blocks: usize,
    /// Most blocks skills may pin; a skill that would exceed it is Failed, never evicted.
    pub pinned_budget_blocks: usize,
    /// Bytes of KV one token occupies (all layers, K and V).
    pub kv_bytes_per_token: usize,
    /// What set the pool's size.
    #[serde(default)]
    pub sized_from: KvPoolSizing,
    /// The memory `kvCacheFraction` was taken of, bytes: free device memory after the weights
    /// on a GPU, available host memory (bounded by the cgroup) on the CPU; absent when the size
    /// was configured directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_available_bytes: Option<u64>,
}

/// What set a daemon's KV pool size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum KvPoolSizing {
    /// A size in bytes or blocks given to the daemon.
    #[default]
    Configured,
    /// `kvCacheFraction` of the host memory available after the weights.
    HostMemory,
    /// `kvCacheFraction` of the GPU's free memory after the weights.
    DeviceMemory,
}

/// Load figures: queue lengths and where the KV blocks are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadFigures {
    /// Sequences running.
    pub running: usize,
    /// Sequences waiting for admission.
    pub waiting: usize,
    /// Blocks on the free list.
    pub free_blocks: usize,
    /// Evictable prefix-cache blocks.
    pub cached_blocks: usize,
    /// Pinned prefix-cache blocks.
    pub pinned_blocks: usize,
    /// Blocks used by running sequences.
    pub used_blocks: usize,
}

/// One `GET /admin/v1/events` event; the SSE `event:` field is the variant's `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum AdminEvent {
    /// A prefix block was added to the cache.
    #[serde(rename_all = "camelCase")]
    BlockStored {
        /// The block's chained hash.
        hash: BlockHash,
        /// The previous block's hash, `None` for a prompt's first block.
        parent: Option<BlockHash>,
    },
    /// A prefix block was evicted.
    #[serde(rename_all = "camelCase")]
    BlockEvicted {
        /// The block's chained hash.
        hash: BlockHash,
    },
    /// Periodic load figures.
    Load(LoadFigures),
    /// A skill changed state (including its first appearance).
    SkillState(SkillState),
    /// A skill was removed from the daemon.
    #[serde(rename_all = "camelCase")]
    SkillRemoved {
        /// The skill's name.
        name: String,
    },
    /// An adapter was loaded, failed, or changed.
    AdapterState(AdapterState),
    /// The subscriber fell behind and missed this many cache events: rebuild from scratch.
    #[serde(rename_all = "camelCase")]
    EventsMissed {
        /// How many.
        count: u64,
    },
}

impl AdminEvent {
    /// The SSE `event:` name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::BlockStored { .. } => "blockStored",
            Self::BlockEvicted { .. } => "blockEvicted",
            Self::Load(_) => "load",
            Self::SkillState(_) => "skillState",
            Self::SkillRemoved { .. } => "skillRemoved",
            Self::AdapterState(_) => "adapterState",
            Self::EventsMissed { .. } => "eventsMissed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_desired_skill_is_pinned_unless_it_says_otherwise() {
        let older: DesiredSkill =
            serde_json::from_value(serde_json::json!({"name": "a", "content": "x"}))
                .expect("a document from before `pin` parses");
        assert!(older.pin);
        let unpinned: DesiredSkill =
            serde_json::from_value(serde_json::json!({"name": "a", "content": "x", "pin": false}))
                .expect("parses");
        assert!(!unpinned.pin);
        assert_eq!(
            serde_json::to_value(&unpinned).expect("serializes")["pin"],
            false
        );
    }

    #[test]
    fn load_event_round_trips_with_its_type_tag() {
        let event = AdminEvent::Load(LoadFigures {
            running: 2,
            waiting: 1,
            free_blocks: 10,
            cached_blocks: 3,
            pinned_blocks: 0,
            used_blocks: 4,
        });
        let json = serde_json::to_value(&event).expect("serializes");
        assert_eq!(json["type"], "load");
        assert_eq!(json["usedBlocks"], 4);
        let back: AdminEvent = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, event);
        assert_eq!(back.name(), "load");
    }
}
