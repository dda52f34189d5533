//! The engine's public request, event and error types, and its configuration.

use std::sync::Arc;
use std::time::Duration;

use skillkv_api::block_hash::{BlockHash, HashNamespace};

use crate::engine::kv_pool::KvPoolOpError;
use crate::engine::sampling::{SamplingParams, ValidateSamplingParamsError};

/// How big the KV pool is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCacheSize {
    /// Exactly this many blocks of 16 tokens.
    Blocks(usize),
    /// As many blocks as fit in this many bytes.
    Bytes(usize),
}

/// The engine's limits and identity.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Size of the KV pool.
    pub kv_cache: KvCacheSize,
    /// Most tokens in one forward batch (prefill chunks plus decode tokens).
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_seqs: usize,
    /// Most new requests waiting for admission; beyond it `submit` answers
    /// [`SubmitError::Overloaded`].
    pub max_waiting: usize,
    /// The prefix-cache namespace of the base model (model and tokenizer digests, KV dtype and
    /// format); a request's adapter id is filled in per request.
    pub cache_namespace: HashNamespace,
    /// Cache events buffered for slow subscribers before they start missing some.
    pub cache_event_capacity: usize,
    /// Reuse cached prefixes at admission. Off only for baselines (`skillkv bench skills`
    /// measures the same engine without prefix reuse).
    pub reuse_prefixes: bool,
}

/// Version of the engine's KV layout (f32, `[kv_head][slot][head_dim]` per block and layer).
pub const KV_FORMAT_VERSION: u32 = 1;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kv_cache: KvCacheSize::Bytes(512 * 1024 * 1024),
            max_batch_tokens: 512,
            max_seqs: 16,
            max_waiting: 64,
            cache_namespace: HashNamespace {
                kv_dtype: "f32".to_string(),
                kv_format_version: KV_FORMAT_VERSION,
                ..HashNamespace::default()
            },
            cache_event_capacity: 1024,
            reuse_prefixes: true,
        }
    }
}

/// One generation request, already tokenized.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The caller's id, for logs.
    pub request_id: String,
    /// The prompt's token ids (non-empty).
    pub prompt_tokens: Vec<u32>,
    /// Sampling and stopping.
    pub sampling: SamplingParams,
    /// LoRA adapter id, `None` for the base model; part of the prefix-cache namespace.
    pub adapter: Option<String>,
}

/// A segment of a prompt that modular skill assembly serves from the segment's own KV: the
/// prompt tokens `start .. start + len` are a prefix (a skill's `[system: skill]`) that was
/// prefilled on its own from position 0 and cached (pinned) under the same namespace. At
/// admission the engine looks the segment's full blocks up by their hashes (chained from the
/// namespace root, so a match guarantees the same tokens), copies their K and V rows into the
/// sequence's own blocks with K turned by `start` positions (RoPE), and computes only the rest.
/// Whatever is not cached is computed normally; the prompt's last token is always computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModularSpan {
    /// Position of the segment's first token in the prompt.
    pub start: usize,
    /// Tokens in the segment.
    pub len: usize,
    /// Leading tokens of the segment that are computed in context instead of copied.
    pub recompute: usize,
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_tokens` (or the context length) reached.
    Length,
    /// A stop string matched.
    Stop,
    /// The model produced its end-of-sequence token.
    Eos,
    /// The caller cancelled.
    Cancelled,
}

/// What a [`super::GenerationStream`] yields, in order: `Started`, `Token`s, then `Finished` or
/// `Failed`.
#[derive(Debug, Clone)]
pub enum GenerationEvent {
    /// The request was admitted.
    Started {
        /// Prompt tokens whose KV came from the prefix cache (exact reuse only).
        cached_tokens: usize,
        /// Prompt tokens whose KV was copied from independently prefilled skill KV (modular
        /// assembly, see [`ModularSpan`]); not counted in `cached_tokens`.
        modular_tokens: usize,
        /// Time from submission to admission.
        queue_time: Duration,
    },
    /// One generated token.
    Token {
        /// Token id.
        id: u32,
        /// Its log-probability.
        logprob: f32,
        /// The most likely alternatives (as many as the request asked for).
        top_logprobs: Vec<(u32, f32)>,
        /// Text this token completes (empty while a character or a possible stop string is
        /// held back, and always empty when the engine has no tokenizer).
        text: String,
    },
    /// The sequence ended.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Prompt length.
        prompt_tokens: usize,
        /// Tokens generated (the end-of-sequence token is not counted).
        completion_tokens: usize,
        /// Prompt tokens served from the prefix cache.
        cached_tokens: usize,
        /// Text released at the end (what was held back); append it to the tokens' text.
        text: String,
    },
    /// The sequence failed.
    Failed(GenerateError),
}

/// Why a generation failed after it was accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GenerateError {
    /// The sequence needs more KV blocks than the pool can ever give it.
    #[error("the sequence needs {needed} KV blocks but at most {available} can be freed")]
    KvCacheExhausted {
        /// Blocks it needed.
        needed: usize,
        /// Blocks available with nothing else running.
        available: usize,
    },
    /// The forward pass failed.
    #[error("forward pass failed")]
    Forward(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// Copying KV inside the pool (a shared block, a modular segment) failed on the device.
    #[error("copying KV inside the pool failed")]
    KvCopy(#[source] Arc<KvPoolOpError>),
    /// The model returned fewer logits than asked for.
    #[error("the forward pass returned no logits for the sequence")]
    MissingLogits,
    /// The caller cancelled it.
    #[error("cancelled")]
    Cancelled,
    /// The engine shut down first.
    #[error("the engine shut down")]
    EngineShutDown,
}

/// Why a request is not acceptable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ValidateRequestError {
    /// No prompt tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A token id outside the vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfVocabulary {
        /// The id.
        token: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// Prompt plus `max_tokens` exceed the context.
    #[error(
        "prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceed the context length {context_length}"
    )]
    ContextTooLong {
        /// Prompt length.
        prompt: usize,
        /// Requested `max_tokens`.
        max_tokens: usize,
        /// The model's context length.
        context_length: usize,
    },
    /// A sampling parameter is out of range.
    #[error(transparent)]
    Sampling(#[from] ValidateSamplingParamsError),
}

/// Why `submit` refused a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    /// The waiting queue is full; try later or elsewhere.
    #[error("overloaded: {max_waiting} requests are already waiting")]
    Overloaded {
        /// The queue bound.
        max_waiting: usize,
    },
    /// The request is invalid.
    #[error("invalid request")]
    Invalid(#[from] ValidateRequestError),
    /// The engine thread is gone.
    #[error("the engine is not running")]
    EngineStopped,
}

/// A prefix to prefill and pin (skills).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinRequest {
    /// The prefix's tokens; only its full blocks are pinned.
    pub tokens: Vec<u32>,
    /// LoRA adapter id, `None` for the base model.
    pub adapter: Option<String>,
}

/// Identifies a pin, for [`super::EngineHandle::unpin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PinId(pub u64);

/// A pinned prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedPrefix {
    /// The pin's id.
    pub id: PinId,
    /// Tokens covered by pinned blocks (a multiple of 16).
    pub pinned_tokens: usize,
    /// Tokens that were already cached before the prefill.
    pub cached_tokens: usize,
    /// The pinned blocks' hashes, in order.
    pub hashes: Vec<BlockHash>,
}

/// A prefix prefilled into the prefix cache without a pin
/// ([`super::EngineHandle::cache_prefix`]): evictable like any cached prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedPrefix {
    /// Tokens of the prefix's full blocks (a multiple of 16): what the cache holds of it now.
    pub full_tokens: usize,
    /// Of those, tokens whose KV was already cached before.
    pub cached_tokens: usize,
}

impl CachedPrefix {
    /// Whether every full block was cached already (nothing was computed).
    pub fn was_cached(&self) -> bool {
        self.full_tokens > 0 && self.cached_tokens >= self.full_tokens
    }
}

/// Why pinning (or caching) a prefix failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PinError {
    /// The prefix is invalid.
    #[error("invalid prefix")]
    Invalid(#[from] ValidateRequestError),
    /// Prefilling the prefix failed.
    #[error("prefilling the prefix failed")]
    Prefill(#[source] GenerateError),
    /// The engine thread is gone.
    #[error("the engine is not running")]
    EngineStopped,
}

/// Why unpinning failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UnpinError {
    /// No such pin (already unpinned?).
    #[error("no pin with id {0:?}")]
    UnknownPin(PinId),
    /// The engine thread is gone.
    #[error("the engine is not running")]
    EngineStopped,
}

/// Why the engine did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartEngineError {
    /// A configuration value is unusable.
    #[error("invalid engine config: {field} {problem}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The KV pool could not be allocated where the model runs.
    #[error("allocating the KV pool of {num_blocks} blocks failed")]
    AllocateKvPool {
        /// Blocks asked for.
        num_blocks: usize,
        /// The device's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The engine thread could not be spawned.
    #[error("spawning the engine thread failed")]
    SpawnThread(#[source] std::io::Error),
}
