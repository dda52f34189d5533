//! The daemon admin protocol (port 8081), shared by the daemon that serves it and the operator
//! that reads it: the `GET /admin/v1/state` snapshot and the `GET /admin/v1/events` SSE events.

use serde::{Deserialize, Serialize};

use crate::block_hash::BlockHash;

/// Path of the state snapshot.
pub const STATE_PATH: &str = "/admin/v1/state";
/// Path of the event stream.
pub const EVENTS_PATH: &str = "/admin/v1/events";

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
            Self::EventsMissed { .. } => "eventsMissed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
