//! Modular skill assembly at admission: finding the independently prefilled KV of a sequence's
//! modular segments ([`ModularSpan`]) in the prefix cache and copying it into the sequence's
//! own blocks, K turned by the segment's position (RoPE).
//!
//! A segment's KV was prefilled from position 0 (the skill alone), so its blocks are cached
//! under the hashes of the segment's tokens chained from the namespace root: looking those up
//! both finds the blocks and proves they hold these very tokens. The source blocks are only read
//! (a reference is held while they are copied, so nothing evicts them); the destination rows are
//! in the sequence's fresh, private blocks, which its block table releases like any other. Only
//! full source blocks are cached, so a segment's partial last block, the first `recompute`
//! tokens and the prompt's last token are computed in context.

use std::ops::Range;

use skillkv_api::block_hash::block_hashes_from;

use crate::engine::batch::{BLOCK_SIZE, BlockId};
use crate::engine::handle::ModularSpan;
use crate::engine::kv_pool::KvPoolOpError;

use super::sequence::Sequence;
use super::{ForwardModel, Scheduler};

/// One segment's cached source blocks (one reference held on each) and the prompt positions
/// they will fill.
#[derive(Debug)]
pub(super) struct CopySource {
    /// The segment's first prompt position: the RoPE delta of its copied K.
    span_start: usize,
    /// Prompt positions to copy into.
    target: Range<usize>,
    /// The segment's cached blocks, from its first token.
    blocks: Vec<BlockId>,
}

impl CopySource {
    /// The first prompt position this source fills.
    pub(super) fn first_position(&self) -> usize {
        self.target.start
    }
}

/// The prompt positions a span can fill when `cached_blocks` of it are cached, never reaching
/// the prompt's last token; empty when nothing is left to copy.
fn copy_target(span: &ModularSpan, cached_blocks: usize, prompt_len: usize) -> Range<usize> {
    let end = (span.start + (cached_blocks * BLOCK_SIZE).min(span.len)).min(prompt_len - 1);
    let start = (span.start + span.recompute).min(end);
    start..end
}

impl<M: ForwardModel> Scheduler<M> {
    /// Takes a reference on the cached blocks of each of `seq`'s modular segments that has
    /// anything to copy. A segment at position 0 is the radix prefix itself and is skipped.
    pub(super) fn acquire_copy_sources(&mut self, seq: &Sequence) -> Vec<CopySource> {
        let mut sources = Vec::new();
        for span in seq.modular.iter().filter(|span| span.start > 0) {
            let tokens = &seq.tokens[span.start..span.start + span.len];
            let blocks = self
                .cache
                .acquire_prefix(&block_hashes_from(seq.root, tokens));
            let target = copy_target(span, blocks.len(), seq.prompt_len);
            if target.is_empty() {
                self.cache.release_all(blocks);
                continue;
            }
            sources.push(CopySource {
                span_start: span.start,
                target,
                blocks,
            });
        }
        sources
    }

    /// Drops the references [`Self::acquire_copy_sources`] took (admission did not happen).
    pub(super) fn release_copy_sources(&mut self, sources: Vec<CopySource>) {
        for source in sources {
            self.cache.release_all(source.blocks);
        }
    }

    /// Copies each source's rows into `seq`'s blocks (which must cover them), turning K by the
    /// segment's position, records the copied ranges, stops prefix-cache registration at the
    /// first one and releases the sources. On a device failure every source is still released
    /// and the first error returned.
    pub(super) fn copy_sources(
        &mut self,
        seq: &mut Sequence,
        sources: Vec<CopySource>,
    ) -> Result<(), KvPoolOpError> {
        if let Some(first) = sources.first() {
            seq.register_limit = first.first_position() / BLOCK_SIZE;
        }
        let mut failure = None;
        for source in sources {
            if failure.is_some() {
                self.cache.release_all(source.blocks);
                continue;
            }
            let rotation = self.rope.delta(source.span_start as i64);
            let count = source.target.len();
            let copied = self.kv.copy_rows(
                (&source.blocks, source.target.start - source.span_start),
                (seq.table.blocks(), source.target.start),
                count,
                Some(&rotation),
            );
            self.cache.release_all(source.blocks);
            if let Err(error) = copied {
                failure = Some(error);
                continue;
            }
            tracing::debug!(
                seq = seq.id,
                span_start = source.span_start,
                from = source.target.start,
                tokens = count,
                "copied modular skill KV"
            );
            seq.copied.push(source.target);
        }
        failure.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
#[path = "modular_tests.rs"]
mod tests;
