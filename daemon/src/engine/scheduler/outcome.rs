//! What happens after a forward pass: sampling, token events, finishing, pinning, failing and
//! cancelling sequences — every path that ends a sequence releases its blocks here.

use std::sync::Arc;

use crate::engine::batch::{BLOCK_SIZE, ForwardOutput};
use crate::engine::handle::{
    CachedPrefix, FinishReason, GenerateError, GenerationEvent, PinError, PinId, PinnedPrefix,
};
use crate::engine::radix::PrefixCache;

use super::sequence::{Purpose, Sequence};
use super::{ForwardModel, Planned, Scheduler, wants_logits};

/// How a sequence of this step ends.
enum Ending {
    Finished(FinishReason),
    /// A prefill-only sequence ([`Purpose::Pin`], [`Purpose::Cache`]) reached its end.
    Prefilled,
    Failed(GenerateError),
}

impl<M: ForwardModel> Scheduler<M> {
    /// Advances every planned sequence past its chunk, samples where logits came back, caches
    /// newly full blocks and retires finished sequences.
    pub(super) fn apply_output(&mut self, plan: &[Planned], output: ForwardOutput) {
        let context_length = self.model.config().context_length;
        let mut rows = output.logits.into_iter();
        let mut endings = Vec::new();
        for planned in plan {
            let seq = &mut self.running[planned.index];
            let end = seq.computed + planned.len;
            let wants = wants_logits(seq, end);
            seq.computed = end;
            seq.skip_copied();
            if wants {
                let ending = match rows.next() {
                    Some(row) => {
                        sample_next(seq, &row, self.eos, context_length).map(Ending::Finished)
                    }
                    None => Some(Ending::Failed(GenerateError::MissingLogits)),
                };
                endings.extend(ending.map(|ending| (planned.index, ending)));
            } else if end == seq.tokens.len()
                && matches!(seq.purpose, Purpose::Pin(_) | Purpose::Cache(_))
            {
                endings.push((planned.index, Ending::Prefilled));
            }
            register_full_blocks(&mut self.cache, seq);
        }
        // Highest index first so that removals keep the other indices valid.
        endings.sort_by_key(|(index, _)| std::cmp::Reverse(*index));
        for (index, ending) in endings {
            let seq = self.running.remove(index);
            match ending {
                Ending::Finished(reason) => self.finish(seq, reason),
                Ending::Prefilled if matches!(seq.purpose, Purpose::Cache(_)) => {
                    self.finish_cache(seq);
                }
                Ending::Prefilled => self.finish_pin(seq),
                Ending::Failed(error) => self.fail(seq, error),
            }
        }
    }

    /// Fails every sequence of a batch whose forward pass failed.
    pub(super) fn fail_planned(&mut self, plan: &[Planned], error: M::Error) {
        tracing::error!(error = %error, sequences = plan.len(), "forward pass failed");
        let shared: Arc<dyn std::error::Error + Send + Sync> = Arc::new(error);
        let mut indices: Vec<usize> = plan.iter().map(|planned| planned.index).collect();
        indices.sort_unstable_by(|a, b| b.cmp(a));
        for index in indices {
            let seq = self.running.remove(index);
            self.fail(seq, GenerateError::Forward(shared.clone()));
        }
    }

    /// Ends a generating sequence normally.
    pub(super) fn finish(&mut self, mut seq: Sequence, mut reason: FinishReason) {
        self.release(&mut seq);
        let completion_tokens = seq.completion_len();
        let Purpose::Generate(generation) = &mut seq.purpose else {
            return;
        };
        let tail = generation
            .text
            .as_mut()
            .map(|text| text.finish())
            .unwrap_or_default();
        if tail.stopped {
            reason = FinishReason::Stop;
        }
        tracing::debug!(
            seq = seq.id,
            request_id = %seq.request_id,
            ?reason,
            completion_tokens,
            "finished"
        );
        let _ = generation.events.try_send(GenerationEvent::Finished {
            reason,
            prompt_tokens: seq.prompt_len,
            completion_tokens,
            cached_tokens: seq.cached_tokens,
            text: tail.text,
        });
    }

    /// Pins a prefilled prefix and answers the caller.
    fn finish_pin(&mut self, mut seq: Sequence) {
        let full = seq.registered.min(seq.tokens.len() / BLOCK_SIZE);
        let pinned = self.cache.pin(&seq.hashes[..full]);
        let hashes = seq.hashes[..pinned].to_vec();
        self.release(&mut seq);
        let id = self.next_pin;
        self.next_pin += 1;
        let prefix = PinnedPrefix {
            id: PinId(id),
            pinned_tokens: pinned * BLOCK_SIZE,
            cached_tokens: seq.cached_tokens,
            hashes: hashes.clone(),
        };
        self.pins.insert(id, hashes);
        let delivered = match &mut seq.purpose {
            Purpose::Pin(reply) => reply
                .take()
                .is_some_and(|reply| reply.send(Ok(prefix)).is_ok()),
            Purpose::Generate(_) | Purpose::Cache(_) => false,
        };
        if !delivered {
            // Nobody holds the pin id: drop the pin rather than leak it.
            self.unpin(id);
        }
        tracing::info!(seq = seq.id, pinned_blocks = pinned, "prefix pinned");
    }

    /// Leaves a prefilled prefix in the cache, unpinned, and answers the caller.
    fn finish_cache(&mut self, mut seq: Sequence) {
        let full_tokens = seq.registered.min(seq.tokens.len() / BLOCK_SIZE) * BLOCK_SIZE;
        self.release(&mut seq);
        if let Purpose::Cache(reply) = &mut seq.purpose
            && let Some(reply) = reply.take()
        {
            let _ = reply.send(Ok(CachedPrefix {
                full_tokens,
                cached_tokens: seq.cached_tokens,
            }));
        }
        tracing::debug!(seq = seq.id, full_tokens, "prefix cached");
    }

    /// Ends a sequence with an error.
    pub(super) fn fail(&mut self, mut seq: Sequence, error: GenerateError) {
        self.release(&mut seq);
        match &mut seq.purpose {
            Purpose::Generate(generation) => {
                let _ = generation.events.try_send(GenerationEvent::Failed(error));
            }
            Purpose::Pin(reply) => {
                if let Some(reply) = reply.take() {
                    let _ = reply.send(Err(PinError::Prefill(error)));
                }
            }
            Purpose::Cache(reply) => {
                if let Some(reply) = reply.take() {
                    let _ = reply.send(Err(PinError::Prefill(error)));
                }
            }
        }
    }

    /// Ends a sequence its caller cancelled (or abandoned).
    pub(super) fn finish_cancelled(&mut self, seq: Sequence) {
        tracing::debug!(seq = seq.id, request_id = %seq.request_id, "cancelled");
        match seq.purpose {
            Purpose::Generate(_) => self.finish(seq, FinishReason::Cancelled),
            Purpose::Pin(_) | Purpose::Cache(_) => self.fail(seq, GenerateError::Cancelled),
        }
    }

    /// Caches the sequence's full blocks and releases all of its blocks and its waiting slot.
    fn release(&mut self, seq: &mut Sequence) {
        register_full_blocks(&mut self.cache, seq);
        self.cache.release_all(seq.table.take_all());
        self.free_waiting_slot(seq);
    }
}

/// Samples the next token of a generating sequence from its logits, emits it, and says whether
/// the sequence is finished.
fn sample_next(
    seq: &mut Sequence,
    logits: &[f32],
    eos: Option<u32>,
    context_length: usize,
) -> Option<FinishReason> {
    let Purpose::Generate(generation) = &mut seq.purpose else {
        return None;
    };
    let sampled = generation.sampler.sample(logits, &seq.tokens);
    if !generation.params.ignore_eos && Some(sampled.token) == eos {
        return Some(FinishReason::Eos);
    }
    seq.tokens.push(sampled.token);
    let delta = generation
        .text
        .as_mut()
        .map(|text| text.push(sampled.token))
        .unwrap_or_default();
    let event = GenerationEvent::Token {
        id: sampled.token,
        logprob: sampled.logprob,
        top_logprobs: sampled.top_logprobs,
        text: delta.text,
    };
    // A closed channel is noticed (and the sequence dropped) at the next step; the channel's
    // capacity covers every event of the request, so it is never full.
    let _ = generation.events.try_send(event);
    if delta.stopped {
        Some(FinishReason::Stop)
    } else if seq.tokens.len() - seq.prompt_len >= generation.params.max_tokens
        || seq.tokens.len() >= context_length
    {
        Some(FinishReason::Length)
    } else {
        None
    }
}

/// Inserts the sequence's newly full, computed blocks into the prefix cache (never those from
/// its first modular-copied position on); where the same content is already cached in another
/// block, the sequence switches to that block.
pub(super) fn register_full_blocks(cache: &mut PrefixCache, seq: &mut Sequence) {
    seq.extend_hashes();
    let full = (seq.computed / BLOCK_SIZE)
        .min(seq.hashes.len())
        .min(seq.register_limit);
    while seq.registered < full {
        let index = seq.registered;
        let parent = index.checked_sub(1).map(|p| seq.hashes[p]);
        let Some(&block) = seq.table.blocks().get(index) else {
            break;
        };
        let kept = cache.insert(parent, seq.hashes[index], block);
        if kept != block {
            seq.table.replace(index, kept);
        }
        seq.registered += 1;
    }
}
