//! The continuous-batching scheduler: owns the KV pool and the prefix cache, admits waiting
//! sequences by free blocks, packs prefill chunks and decode steps of different sequences into
//! one forward batch under `max_batch_tokens`, samples, and preempts by recompute when blocks
//! run out.
//!
//! Every step:
//! 1. sequences whose caller went away are dropped and their blocks released;
//! 2. running sequences, oldest first, get their next chunk (one token once decoding, a slice of
//!    the prompt while prefilling); a sequence that needs a new block and finds none preempts the
//!    newest running sequence (its blocks are released — full ones stay cached — and it goes back
//!    to the front of the waiting queue, to be recomputed);
//! 3. if nothing was preempted, waiting sequences are admitted in order while blocks for their
//!    whole uncached prompt are available, the token budget lasts and `max_seqs` allows;
//! 4. one forward pass runs the batch; sequences whose chunk reached their last token sample
//!    the next one; newly full blocks go into the prefix cache; finished sequences leave.
//!
//! Modular skill assembly ([`crate::engine::ModularSpan`]) copies a segment's independently
//! prefilled KV into the sequence's own blocks at admission (see `modular`); the chunks then
//! skip the copied positions, and blocks from the first copied one on never enter the cache.
//!
//! The last prompt token is always recomputed: a prompt of exactly `k` cached full blocks
//! reuses all `k`, but its last block is copied (copy-on-write) so that the recomputed last token
//! writes into a private block, never into a shared one.

mod admission;
mod modular;
mod outcome;
pub mod sequence;
pub mod text;
pub mod transfer;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use skillkv_api::block_hash::BlockHash;
use tokio::sync::broadcast;

use crate::engine::batch::{ForwardBatch, ForwardOutput, SeqChunk};
use crate::engine::gguf::ModelConfig;
use crate::engine::kv_pool::KvPool;
use crate::engine::model::ops::RopeTable;
use crate::engine::radix::{CacheEvent, PrefixCache};
use crate::engine::stats::EngineStats;

use self::sequence::{Purpose, SeqId, Sequence};

/// The model as the scheduler sees it: a batched forward pass over an external KV pool.
/// Implemented by the real Llama model and by the fake models of the tests.
pub trait ForwardModel: Send + Sync + 'static {
    /// The forward pass's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The model's hyperparameters (sizes the KV pool).
    fn config(&self) -> &ModelConfig;

    /// A zeroed pool of `num_blocks` blocks where the forward pass keeps KV (host memory, or
    /// the device it runs on).
    fn new_pool(&self, num_blocks: usize) -> Result<KvPool, Self::Error>;

    /// Runs one batch, reading and writing `kv` as [`ForwardBatch`] describes.
    fn forward(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &mut KvPool,
    ) -> Result<ForwardOutput, Self::Error>;
}

/// The scheduler's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerLimits {
    /// Most tokens in one forward batch.
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_seqs: usize,
    /// Whether admission reuses cached prefixes.
    pub reuse_prefixes: bool,
}

/// One sequence's share of a step: `len` tokens of `running[index]`.
#[derive(Debug, Clone, Copy)]
struct Planned {
    index: usize,
    len: usize,
}

/// The scheduler state, owned by the engine thread.
#[derive(Debug)]
pub struct Scheduler<M: ForwardModel> {
    model: Arc<M>,
    limits: SchedulerLimits,
    kv: KvPool,
    cache: PrefixCache,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    pins: HashMap<u64, Vec<BlockHash>>,
    next_pin: u64,
    /// New submissions waiting for their first admission (shared with the handles).
    waiting_new: Arc<AtomicUsize>,
    eos: Option<u32>,
    preemptions: u64,
    cache_events: broadcast::Sender<CacheEvent>,
    /// The model's rotary frequencies, for turning copied K by a position delta.
    rope: RopeTable,
}

impl<M: ForwardModel> Scheduler<M> {
    /// A scheduler over `kv`, a fresh pool from [`ForwardModel::new_pool`].
    pub fn new(
        model: Arc<M>,
        limits: SchedulerLimits,
        kv: KvPool,
        eos: Option<u32>,
        waiting_new: Arc<AtomicUsize>,
        cache_events: broadcast::Sender<CacheEvent>,
    ) -> Self {
        let num_blocks = kv.num_blocks();
        let config = model.config();
        let rope = RopeTable::new(config.head_dim, config.rope_theta, 1);
        Self {
            model,
            limits,
            kv,
            cache: PrefixCache::new(num_blocks),
            waiting: VecDeque::new(),
            running: Vec::new(),
            pins: HashMap::new(),
            next_pin: 0,
            waiting_new,
            eos,
            preemptions: 0,
            cache_events,
            rope,
        }
    }

    /// Whether there is nothing to run.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Queue figures and KV accounting.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            kv: self.cache.stats(),
            running: self.running.len(),
            waiting: self.waiting.len(),
            preemptions: self.preemptions,
        }
    }

    /// Queues a new sequence behind the waiting ones.
    pub fn enqueue(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    /// Cancels a sequence wherever it is; its blocks are released at once.
    pub fn cancel(&mut self, id: SeqId) {
        if let Some(index) = self.running.iter().position(|seq| seq.id == id) {
            let seq = self.running.remove(index);
            self.finish_cancelled(seq);
        } else if let Some(index) = self.waiting.iter().position(|seq| seq.id == id)
            && let Some(seq) = self.waiting.remove(index)
        {
            self.finish_cancelled(seq);
        }
    }

    /// Removes one pin; false when `pin_id` is unknown.
    pub fn unpin(&mut self, pin_id: u64) -> bool {
        match self.pins.remove(&pin_id) {
            Some(hashes) => {
                self.cache.unpin(&hashes);
                true
            }
            None => false,
        }
    }

    /// Runs one scheduling step (see the module docs). Does nothing when idle.
    pub fn step(&mut self) {
        self.drop_abandoned();
        let plan = self.plan();
        if !plan.is_empty() {
            match self.run_batch(&plan) {
                Ok(output) => self.apply_output(&plan, output),
                Err(error) => self.fail_planned(&plan, error),
            }
        }
        self.publish_cache_events();
    }

    /// Fails every sequence (the engine is stopping) and releases all their blocks.
    pub fn shut_down(&mut self) {
        let sequences: Vec<Sequence> = self
            .running
            .drain(..)
            .chain(self.waiting.drain(..))
            .collect();
        for seq in sequences {
            self.fail(seq, crate::engine::handle::GenerateError::EngineShutDown);
        }
        self.publish_cache_events();
    }

    /// Checks the prefix cache's bookkeeping (tests and debug builds).
    pub fn check_invariants(&self) -> Result<(), crate::engine::radix::CheckCacheInvariantsError> {
        self.cache.check_invariants()
    }

    fn drop_abandoned(&mut self) {
        let mut index = 0;
        while index < self.running.len() {
            if self.running[index].caller_gone() {
                let seq = self.running.remove(index);
                self.finish_cancelled(seq);
            } else {
                index += 1;
            }
        }
        let (gone, kept): (Vec<Sequence>, Vec<Sequence>) =
            self.waiting.drain(..).partition(Sequence::caller_gone);
        self.waiting = kept.into();
        for seq in gone {
            self.finish_cancelled(seq);
        }
    }

    /// Chooses this step's chunks: running sequences first (preempting when blocks run out),
    /// then admissions.
    fn plan(&mut self) -> Vec<Planned> {
        let mut budget = self.limits.max_batch_tokens;
        let mut plan = Vec::new();
        let mut preempted = false;
        let mut index = 0;
        while index < self.running.len() && budget > 0 {
            let len = self.running[index].next_chunk_len(budget);
            let end = self.running[index].computed + len;
            if !self.grow_table(index, end, &mut preempted) {
                break;
            }
            plan.push(Planned { index, len });
            budget -= len;
            index += 1;
        }
        if preempted {
            return plan;
        }
        while budget > 0 && self.running.len() < self.limits.max_seqs {
            let Some(seq) = self.admit_next() else {
                break;
            };
            let len = seq.next_chunk_len(budget);
            self.running.push(seq);
            plan.push(Planned {
                index: self.running.len() - 1,
                len,
            });
            budget -= len;
        }
        plan
    }

    /// Makes `running[index]`'s table cover `end` positions, preempting the newest running
    /// sequences for blocks. False when `running[index]` itself had to be preempted.
    fn grow_table(&mut self, index: usize, end: usize, preempted: &mut bool) -> bool {
        while self.running[index].table.capacity_tokens() < end {
            match self.cache.allocate() {
                Some(block) => self.running[index].table.push(block),
                None => {
                    let victim = self.running.len() - 1;
                    self.preempt(victim);
                    *preempted = true;
                    if victim == index {
                        return false;
                    }
                }
            }
        }
        true
    }

    fn preempt(&mut self, index: usize) {
        let mut seq = self.running.remove(index);
        outcome::register_full_blocks(&mut self.cache, &mut seq);
        self.cache.release_all(seq.table.take_all());
        seq.computed = 0;
        seq.registered = 0;
        self.preemptions += 1;
        tracing::info!(
            seq = seq.id,
            request_id = %seq.request_id,
            tokens = seq.tokens.len(),
            "preempted for KV blocks; will recompute"
        );
        self.waiting.push_front(seq);
    }

    fn run_batch(&mut self, plan: &[Planned]) -> Result<ForwardOutput, M::Error> {
        let chunks = plan
            .iter()
            .map(|planned| {
                let seq = &self.running[planned.index];
                let end = seq.computed + planned.len;
                SeqChunk {
                    tokens: &seq.tokens[seq.computed..end],
                    start_pos: seq.computed,
                    block_table: seq.table.blocks(),
                    want_logits: wants_logits(seq, end),
                }
            })
            .collect();
        self.model.forward(&ForwardBatch { chunks }, &mut self.kv)
    }

    fn publish_cache_events(&mut self) {
        for event in self.cache.drain_events() {
            // No subscriber is fine: the events are advisory.
            let _ = self.cache_events.send(event);
        }
    }
}

/// Whether a chunk ending at `end` needs logits: it reaches the sequence's last token and the
/// sequence samples (a pinning prefill does not).
fn wants_logits(seq: &Sequence, end: usize) -> bool {
    end == seq.tokens.len() && matches!(seq.purpose, Purpose::Generate(_))
}

impl ForwardModel for crate::engine::model::LlamaModel {
    type Error = crate::engine::model::ForwardError;

    fn config(&self) -> &ModelConfig {
        crate::engine::model::LlamaModel::config(self)
    }

    fn new_pool(&self, num_blocks: usize) -> Result<KvPool, Self::Error> {
        crate::engine::model::LlamaModel::new_pool(self, num_blocks)
    }

    fn forward(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &mut KvPool,
    ) -> Result<ForwardOutput, Self::Error> {
        crate::engine::model::LlamaModel::forward(self, batch, kv)
    }
}
