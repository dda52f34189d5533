//! One sequence inside the scheduler: its tokens, how many of them have KV in the pool, its
//! block table, its block hashes, and where its results go.

use std::ops::Range;
use std::time::Instant;

use skillkv_api::block_hash::{BLOCK_TOKENS, BlockHash, chain};
use tokio::sync::{mpsc, oneshot};

use crate::engine::blocks::BlockTable;
use crate::engine::handle::{CachedPrefix, GenerationEvent, ModularSpan, PinError, PinnedPrefix};
use crate::engine::sampling::{Sampler, SamplingParams};
use crate::engine::scheduler::text::TextState;

/// Identifies a sequence inside one engine.
pub type SeqId = u64;

/// What a sequence is for.
#[derive(Debug)]
pub enum Purpose {
    /// Generate tokens for a caller.
    Generate(Box<Generation>),
    /// Prefill a prefix and pin its full blocks (skills).
    Pin(Option<oneshot::Sender<Result<PinnedPrefix, PinError>>>),
    /// Prefill a prefix into the prefix cache, unpinned (skills this daemon does not pin).
    Cache(Option<oneshot::Sender<Result<CachedPrefix, PinError>>>),
}

/// The generation side of a sequence: sampling, text and the caller's channel.
#[derive(Debug)]
pub struct Generation {
    /// The request's sampling parameters.
    pub params: SamplingParams,
    /// The sequence's own sampler (its RNG survives preemption).
    pub sampler: Sampler,
    /// Detokenization and stop strings, when the engine has a tokenizer.
    pub text: Option<TextState>,
    /// Where events go; capacity covers every event the request can produce.
    pub events: mpsc::Sender<GenerationEvent>,
}

/// A sequence's full state.
#[derive(Debug)]
pub struct Sequence {
    /// Engine-wide id.
    pub id: SeqId,
    /// The caller's request id, for logs.
    pub request_id: String,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    /// Length of the prompt inside `tokens`.
    pub prompt_len: usize,
    /// Hash the first block chains from (the namespace root).
    pub root: BlockHash,
    /// Hashes of the full blocks of `tokens` computed so far.
    pub hashes: Vec<BlockHash>,
    /// The sequence's blocks (empty while waiting).
    pub table: BlockTable,
    /// Tokens whose KV is in the pool (`tokens[..computed]`).
    pub computed: usize,
    /// Leading blocks already inserted into the prefix cache.
    pub registered: usize,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_tokens: usize,
    /// Segments modular assembly may copy from their own cached KV (sorted, disjoint).
    pub modular: Vec<ModularSpan>,
    /// Prompt positions whose KV this admission copied (sorted, disjoint); the chunks skip them.
    pub copied: Vec<Range<usize>>,
    /// Leading blocks that may enter the prefix cache: blocks holding or following copied KV
    /// are not the exact KV of their tokens, so they are never cached.
    pub register_limit: usize,
    /// When the request was submitted.
    pub arrival: Instant,
    /// Whether the sequence has been admitted at least once.
    pub admitted_once: bool,
    /// Whether it counts against the waiting-queue bound (new submissions until admitted).
    pub holds_waiting_slot: bool,
    /// Generation or pinning.
    pub purpose: Purpose,
}

impl Sequence {
    /// A sequence not yet admitted: nothing computed, cached or copied.
    pub fn new(
        id: SeqId,
        request_id: String,
        tokens: Vec<u32>,
        root: BlockHash,
        purpose: Purpose,
        holds_waiting_slot: bool,
    ) -> Self {
        Self {
            id,
            request_id,
            prompt_len: tokens.len(),
            tokens,
            root,
            hashes: Vec::new(),
            table: BlockTable::default(),
            computed: 0,
            registered: 0,
            cached_tokens: 0,
            modular: Vec::new(),
            copied: Vec::new(),
            register_limit: usize::MAX,
            arrival: Instant::now(),
            admitted_once: false,
            holds_waiting_slot,
            purpose,
        }
    }

    /// Extends `hashes` over every full block of `tokens`.
    pub fn extend_hashes(&mut self) {
        let full = self.tokens.len() / BLOCK_TOKENS;
        while self.hashes.len() < full {
            let index = self.hashes.len();
            let parent = self.hashes.last().copied().unwrap_or(self.root);
            let block = &self.tokens[index * BLOCK_TOKENS..(index + 1) * BLOCK_TOKENS];
            self.hashes.push(chain(&parent, block));
        }
    }

    /// Tokens generated so far.
    pub fn completion_len(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens still to run through the model before the next logits.
    pub fn pending_tokens(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Tokens of the next chunk under a budget: up to the next copied range, if any.
    pub fn next_chunk_len(&self, budget: usize) -> usize {
        let until_copy = self
            .copied
            .iter()
            .find(|range| range.start >= self.computed)
            .map_or(usize::MAX, |range| range.start - self.computed);
        self.pending_tokens().min(budget).min(until_copy)
    }

    /// Moves `computed` past a copied range that starts where it stands.
    pub fn skip_copied(&mut self) {
        while let Some(range) = self
            .copied
            .iter()
            .find(|range| range.start == self.computed && !range.is_empty())
        {
            self.computed = range.end;
        }
    }

    /// Prompt tokens whose KV this admission copied.
    pub fn copied_tokens(&self) -> usize {
        self.copied.iter().map(ExactSizeIterator::len).sum()
    }

    /// Whether the caller is gone (its receiver dropped).
    pub fn caller_gone(&self) -> bool {
        match &self.purpose {
            Purpose::Generate(generation) => generation.events.is_closed(),
            Purpose::Pin(reply) => reply.as_ref().is_none_or(|reply| reply.is_closed()),
            Purpose::Cache(reply) => reply.as_ref().is_none_or(|reply| reply.is_closed()),
        }
    }
}
