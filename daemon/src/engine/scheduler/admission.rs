//! Admission of waiting sequences: prefix lookup, the block check, block allocation (with the
//! copy-on-write of a fully cached last block), modular copies and the `Started` event; a
//! cache-only prefill that is all cached already is answered without running.

use std::sync::Arc;

use crate::engine::batch::BLOCK_SIZE;
use crate::engine::blocks::blocks_for_tokens;
use crate::engine::handle::{CachedPrefix, GenerateError, GenerationEvent};
use crate::engine::kv_pool::KvPoolOpError;

use super::sequence::{Purpose, Sequence};
use super::{ForwardModel, Scheduler};

/// Why the head of the queue was not admitted.
enum Refusal {
    /// Not enough blocks now; running sequences will free some.
    NoRoomYet,
    /// Not enough blocks even with nothing running.
    NeverFits { needed: usize, available: usize },
    /// Copying KV inside the pool failed on the device.
    CopyFailed(KvPoolOpError),
}

impl<M: ForwardModel> Scheduler<M> {
    /// Admits the head of the waiting queue if its blocks are available; fails sequences that
    /// can never fit. `None` when the queue is empty or its head must wait.
    pub(super) fn admit_next(&mut self) -> Option<Sequence> {
        loop {
            let seq = self.waiting.pop_front()?;
            let Some(mut seq) = self.answer_cached_hit(seq) else {
                continue;
            };
            match self.try_admit(&mut seq) {
                Ok(()) => {
                    self.on_admitted(&mut seq);
                    seq.skip_copied();
                    return Some(seq);
                }
                Err(Refusal::NoRoomYet) => {
                    self.waiting.push_front(seq);
                    return None;
                }
                Err(Refusal::NeverFits { needed, available }) => {
                    tracing::warn!(
                        seq = seq.id,
                        request_id = %seq.request_id,
                        needed,
                        available,
                        "sequence can never fit in the KV pool"
                    );
                    self.fail(seq, GenerateError::KvCacheExhausted { needed, available });
                }
                Err(Refusal::CopyFailed(error)) => {
                    tracing::error!(
                        seq = seq.id,
                        request_id = %seq.request_id,
                        error = %error,
                        cause = %error.source,
                        "copying KV at admission failed"
                    );
                    self.fail(seq, GenerateError::KvCopy(Arc::new(error)));
                }
            }
        }
    }

    /// Answers a [`Purpose::Cache`] sequence whose every block is cached already at once (the
    /// blocks become the most recently used) instead of recomputing its last token; returns any
    /// other sequence, which still has to be admitted.
    fn answer_cached_hit(&mut self, mut seq: Sequence) -> Option<Sequence> {
        if !matches!(seq.purpose, Purpose::Cache(_)) || !self.limits.reuse_prefixes {
            return Some(seq);
        }
        seq.extend_hashes();
        let len = seq.tokens.len();
        // Looking the blocks up marks them used; a partial hit is looked up again at admission.
        let found = self.cache.acquire_prefix(&seq.hashes);
        let all_cached = found.len() * BLOCK_SIZE >= len;
        self.cache.release_all(found);
        if !all_cached {
            return Some(seq);
        }
        if let Purpose::Cache(reply) = &mut seq.purpose
            && let Some(reply) = reply.take()
        {
            let _ = reply.send(Ok(CachedPrefix {
                full_tokens: len,
                cached_tokens: len,
            }));
        }
        None
    }

    /// Takes the cached prefix, allocates blocks for every other token of `seq` and copies its
    /// modular segments' KV into them. The prefix is reused only up to the block of the first
    /// copied position, so that a modular request's KV never depends on which combinations
    /// other requests happened to cache.
    fn try_admit(&mut self, seq: &mut Sequence) -> Result<(), Refusal> {
        seq.extend_hashes();
        seq.copied.clear();
        seq.register_limit = usize::MAX;
        let len = seq.tokens.len();
        let sources = if self.limits.reuse_prefixes {
            self.acquire_copy_sources(seq)
        } else {
            Vec::new()
        };
        let reusable = sources
            .first()
            .map_or(seq.hashes.len(), |source| {
                source.first_position() / BLOCK_SIZE
            })
            .min(seq.hashes.len());
        let mut shared = if self.limits.reuse_prefixes {
            self.cache.acquire_prefix(&seq.hashes[..reusable])
        } else {
            Vec::new()
        };
        let matched = shared.len();
        // A full hit: the last token is recomputed into a private copy of the last block.
        let copy_last = matched * BLOCK_SIZE == len;
        let needed = blocks_for_tokens(len) - matched + usize::from(copy_last);
        if needed > self.cache.available() {
            let available = self.cache.available();
            self.cache.release_all(shared);
            let copying = !sources.is_empty();
            self.release_copy_sources(sources);
            if copying && self.running.is_empty() {
                // The copy sources themselves hold blocks (an unpinned skill's cached KV is
                // read while its copy is written): computed in context instead, the prompt
                // may fit, since those blocks can then be evicted.
                tracing::debug!(
                    seq = seq.id,
                    needed,
                    available,
                    "no room to copy modular segments; computing them in context"
                );
                seq.modular.clear();
                return self.try_admit(seq);
            }
            return Err(if self.running.is_empty() {
                Refusal::NeverFits { needed, available }
            } else {
                Refusal::NoRoomYet
            });
        }
        let mut fresh = Vec::with_capacity(needed);
        for _ in 0..needed {
            match self.cache.allocate() {
                Some(block) => fresh.push(block),
                None => {
                    // `available` said otherwise; be safe rather than stuck.
                    tracing::error!(seq = seq.id, "allocation failed despite available blocks");
                    self.cache.release_all(fresh);
                    self.cache.release_all(shared);
                    self.release_copy_sources(sources);
                    return Err(Refusal::NoRoomYet);
                }
            }
        }
        let mut fresh = fresh.into_iter();
        let mut copied = Ok(());
        if copy_last && let (Some(last), Some(copy)) = (shared.pop(), fresh.next()) {
            copied = self.kv.copy_block(last, copy);
            self.cache.release(last);
            shared.push(copy);
        }
        // The blocks are the sequence's from here on: failing it releases them.
        for block in shared.into_iter().chain(fresh) {
            seq.table.push(block);
        }
        if let Err(error) = copied {
            self.release_copy_sources(sources);
            return Err(Refusal::CopyFailed(error));
        }
        self.copy_sources(seq, sources)
            .map_err(Refusal::CopyFailed)?;
        if copy_last {
            seq.computed = len - 1;
            seq.registered = matched - 1;
        } else {
            seq.computed = matched * BLOCK_SIZE;
            seq.registered = matched;
        }
        Ok(())
    }

    /// Gives back the sequence's place under the waiting-queue bound, once.
    pub(super) fn free_waiting_slot(&self, seq: &mut Sequence) {
        if std::mem::take(&mut seq.holds_waiting_slot) {
            self.waiting_new
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }

    /// First-admission bookkeeping: the waiting-slot count and the `Started` event.
    fn on_admitted(&mut self, seq: &mut Sequence) {
        if seq.admitted_once {
            return;
        }
        seq.admitted_once = true;
        seq.cached_tokens = seq.computed.min(seq.prompt_len);
        self.free_waiting_slot(seq);
        if let Purpose::Generate(generation) = &seq.purpose {
            let started = GenerationEvent::Started {
                cached_tokens: seq.cached_tokens,
                modular_tokens: seq.copied_tokens(),
                queue_time: seq.arrival.elapsed(),
            };
            // A closed channel is noticed (and the sequence dropped) at the next step.
            let _ = generation.events.try_send(started);
        }
        tracing::debug!(
            seq = seq.id,
            request_id = %seq.request_id,
            prompt_tokens = seq.prompt_len,
            cached_tokens = seq.cached_tokens,
            modular_tokens = seq.copied_tokens(),
            "admitted"
        );
    }
}
