//! The forward-batch types exchanged between the scheduler and the model: which tokens of which
//! sequences to run in one forward pass, where their KV lives in the pool, and the logits that
//! come back.
//!
//! Test support (engineer D1, for scheduler tests too): `crate::engine::testing` provides
//! `pub fn write_tiny_gguf(path: &std::path::Path, spec: &TinyModelSpec) -> Result<(), WriteTinyGgufError>`
//! with `TinyModelSpec: Default` (2 layers, hidden 64, vocab ~300, random small weights from a seed),
//! writing a synthetic Llama GGUF that `LlamaModel::load` accepts and runs in milliseconds.

/// Index of a KV block in the pool (same index in every layer).
pub type BlockId = u32;

/// Tokens per block (re-export of `skillkv_api::block_hash::BLOCK_TOKENS` = 16).
pub const BLOCK_SIZE: usize = skillkv_api::block_hash::BLOCK_TOKENS;

/// One sequence's slice of a forward batch: `tokens` occupy positions
/// `start_pos .. start_pos + tokens.len()`. The KV of positions `0 .. start_pos` is already in
/// the pool at `block_table[p / BLOCK_SIZE]`, slot `p % BLOCK_SIZE`; the forward pass writes the
/// new tokens' K and V to the same addressing (block_table must already cover every new position)
/// and attends causally over positions `0 ..= p`.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// Token ids to run, at consecutive positions starting at `start_pos`.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]` in its sequence.
    pub start_pos: usize,
    /// The sequence's KV blocks, in position order.
    pub block_table: &'a [BlockId],
    /// Whether to return the logits of this chunk's last token.
    pub want_logits: bool,
}

/// A batch mixing prefill chunks and single-token decode steps of different sequences.
#[derive(Debug, Clone, Default)]
pub struct ForwardBatch<'a> {
    /// The chunks, each of a different sequence.
    pub chunks: Vec<SeqChunk<'a>>,
}

/// Logits (vocab-sized) of the LAST token of each chunk with `want_logits`, in chunk order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForwardOutput {
    /// One vocab-sized row per chunk that asked for logits.
    pub logits: Vec<Vec<f32>>,
}
