//! The Llama forward pass over the paged KV pool, generic over the [`Backend`]: token embedding,
//! per layer RMSNorm → fused QKV → RoPE → KV write → grouped-query attention → output
//! projection → residual, RMSNorm → fused gate|up → SwiGLU → down → residual; final RMSNorm and
//! the (possibly tied) output head for the rows that want logits.

use candle_core::Device;
use skillkv_kernels::ops::KernelOpError;

use crate::engine::batch::{BLOCK_SIZE, ForwardBatch, ForwardOutput};
use crate::engine::gguf::{GgufFile, LoadModelError, ModelConfig};
use crate::engine::kv_pool::KvPool;
use crate::engine::model::attention::{AttentionShape, ChunkRows, LayerKv};
use crate::engine::model::backend::{Backend, BackendOpError, PrepareWeightError};
use crate::engine::model::ops::{RopeTable, add_in_place, rms_norm, silu_mul};

/// Why a forward pass was rejected or failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// A chunk has no tokens.
    #[error("chunk {chunk} has no tokens")]
    EmptyChunk {
        /// Index of the chunk in the batch.
        chunk: usize,
    },
    /// A token id is outside the vocabulary.
    #[error("chunk {chunk}: token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// Index of the chunk in the batch.
        chunk: usize,
        /// The token id.
        token: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A chunk reaches past the model's context length.
    #[error("chunk {chunk} ends at position {end}, past the context length {context_length}")]
    ContextOverflow {
        /// Index of the chunk in the batch.
        chunk: usize,
        /// One past the chunk's last position.
        end: usize,
        /// The model's context length.
        context_length: usize,
    },
    /// A block table does not cover every position of its chunk.
    #[error("chunk {chunk} needs {needed} KV blocks but its block table has {available}")]
    BlockTableTooShort {
        /// Index of the chunk in the batch.
        chunk: usize,
        /// Blocks needed to hold positions up to the chunk's end.
        needed: usize,
        /// Blocks in the table.
        available: usize,
    },
    /// A block id is outside the pool.
    #[error("chunk {chunk}: block {block} is outside the pool of {num_blocks} blocks")]
    BlockOutOfRange {
        /// Index of the chunk in the batch.
        chunk: usize,
        /// The block id.
        block: u32,
        /// Blocks in the pool.
        num_blocks: usize,
    },
    /// The pool was built for a different model shape.
    #[error("the KV pool has {pool_layers} layers, the model {model_layers}")]
    PoolMismatch {
        /// Layers in the pool.
        pool_layers: usize,
        /// Layers in the model.
        model_layers: usize,
    },
    /// The pool is not where this forward pass reads and writes KV (a host pool given to the
    /// resident forward pass, or the other way round).
    #[error("the KV pool is not the {expected} pool this forward pass runs on")]
    PoolElsewhere {
        /// The pool the forward pass needs (`host`, or the kernels' name).
        expected: &'static str,
    },
    /// A backend operation failed.
    #[error(transparent)]
    Backend(#[from] BackendOpError),
    /// A kernel operation of the resident forward pass failed.
    #[error(transparent)]
    Kernel(#[from] KernelOpError),
}

/// What the host forward pass answers for a pool kept on a device.
const HOST_POOL_NEEDED: ForwardError = ForwardError::PoolElsewhere { expected: "host" };

/// Weights of one transformer block.
#[derive(Debug)]
pub(super) struct LayerWeights<L> {
    pub(super) attn_norm: Vec<f32>,
    pub(super) qkv: L,
    pub(super) attn_output: L,
    pub(super) ffn_norm: Vec<f32>,
    pub(super) gate_up: L,
    pub(super) down: L,
}

/// A loaded Llama model on backend `B`.
#[derive(Debug)]
pub struct Llama<B: Backend> {
    backend: B,
    config: ModelConfig,
    pub(super) embedding: Vec<f32>,
    pub(super) layers: Vec<LayerWeights<B::Linear>>,
    pub(super) output_norm: Vec<f32>,
    pub(super) output: B::Linear,
    pub(super) rope: RopeTable,
}

fn prepare_error(error: PrepareWeightError) -> LoadModelError {
    LoadModelError::Tensor {
        tensor: error.tensor,
        source: error.source,
    }
}

fn dense(file: &mut GgufFile, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadModelError> {
    let tensor = file.tensor(name, shape)?;
    tensor
        .dequantize(&Device::Cpu)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(|source| LoadModelError::Tensor {
            tensor: name.to_string(),
            source: Box::new(source),
        })
}

impl<B: Backend> Llama<B> {
    /// Reads every weight of `file` (already checked for architecture and types) onto `backend`.
    pub fn load(
        backend: B,
        config: ModelConfig,
        file: &mut GgufFile,
    ) -> Result<Self, LoadModelError> {
        let c = &config;
        let kv_width = c.n_kv_heads * c.head_dim;
        let embedding = dense(file, "token_embd.weight", &[c.vocab, c.hidden])?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let name = |suffix: &str| format!("blk.{i}.{suffix}.weight");
            let qkv = vec![
                file.tensor(&name("attn_q"), &[c.hidden, c.hidden])?,
                file.tensor(&name("attn_k"), &[kv_width, c.hidden])?,
                file.tensor(&name("attn_v"), &[kv_width, c.hidden])?,
            ];
            let gate_up = vec![
                file.tensor(&name("ffn_gate"), &[c.ffn, c.hidden])?,
                file.tensor(&name("ffn_up"), &[c.ffn, c.hidden])?,
            ];
            let attn_output = vec![file.tensor(&name("attn_output"), &[c.hidden, c.hidden])?];
            let down = vec![file.tensor(&name("ffn_down"), &[c.hidden, c.ffn])?];
            layers.push(LayerWeights {
                attn_norm: dense(file, &name("attn_norm"), &[c.hidden])?,
                qkv: backend
                    .prepare_linear(&name("attn_qkv"), qkv)
                    .map_err(prepare_error)?,
                attn_output: backend
                    .prepare_linear(&name("attn_output"), attn_output)
                    .map_err(prepare_error)?,
                ffn_norm: dense(file, &name("ffn_norm"), &[c.hidden])?,
                gate_up: backend
                    .prepare_linear(&name("ffn_gate_up"), gate_up)
                    .map_err(prepare_error)?,
                down: backend
                    .prepare_linear(&name("ffn_down"), down)
                    .map_err(prepare_error)?,
            });
        }
        let output_norm = dense(file, "output_norm.weight", &[c.hidden])?;
        let output_name = if file.has_tensor("output.weight") {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let output_weight = file.tensor(output_name, &[c.vocab, c.hidden])?;
        let output = backend
            .prepare_linear(output_name, vec![output_weight])
            .map_err(prepare_error)?;
        let rope = RopeTable::new(c.head_dim, c.rope_theta, c.context_length);
        Ok(Self {
            backend,
            config,
            embedding,
            layers,
            output_norm,
            output,
            rope,
        })
    }

    /// The model's hyperparameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Checks `batch` against the model and a pool of `pool_layers` layers of `num_blocks`
    /// blocks: non-empty chunks, tokens in the vocabulary, positions in the context, block
    /// tables that cover every position with blocks of the pool.
    pub(super) fn validate(
        &self,
        batch: &ForwardBatch<'_>,
        pool_layers: usize,
        num_blocks: usize,
    ) -> Result<(), ForwardError> {
        if pool_layers != self.config.n_layers {
            return Err(ForwardError::PoolMismatch {
                pool_layers,
                model_layers: self.config.n_layers,
            });
        }
        for (index, chunk) in batch.chunks.iter().enumerate() {
            if chunk.tokens.is_empty() {
                return Err(ForwardError::EmptyChunk { chunk: index });
            }
            if let Some(&token) = chunk
                .tokens
                .iter()
                .find(|&&token| token as usize >= self.config.vocab)
            {
                return Err(ForwardError::TokenOutOfRange {
                    chunk: index,
                    token,
                    vocab: self.config.vocab,
                });
            }
            let end = chunk.start_pos + chunk.tokens.len();
            if end > self.config.context_length {
                return Err(ForwardError::ContextOverflow {
                    chunk: index,
                    end,
                    context_length: self.config.context_length,
                });
            }
            let needed = end.div_ceil(BLOCK_SIZE);
            if chunk.block_table.len() < needed {
                return Err(ForwardError::BlockTableTooShort {
                    chunk: index,
                    needed,
                    available: chunk.block_table.len(),
                });
            }
            if let Some(&block) = chunk.block_table[..needed]
                .iter()
                .find(|&&block| block as usize >= num_blocks)
            {
                return Err(ForwardError::BlockOutOfRange {
                    chunk: index,
                    block,
                    num_blocks,
                });
            }
        }
        Ok(())
    }

    /// Runs one batch: writes the new tokens' K/V into `kv` and returns the requested logits.
    pub fn forward(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &mut KvPool,
    ) -> Result<ForwardOutput, ForwardError> {
        self.validate(batch, kv.num_layers(), kv.num_blocks())?;
        let c = &self.config;
        let mut chunks = Vec::with_capacity(batch.chunks.len());
        let mut positions = Vec::new();
        let mut hidden = Vec::new();
        for chunk in &batch.chunks {
            chunks.push(ChunkRows {
                first_row: positions.len(),
                len: chunk.tokens.len(),
                start_pos: chunk.start_pos,
                block_table: chunk.block_table,
            });
            for (offset, &token) in chunk.tokens.iter().enumerate() {
                positions.push((chunk.start_pos + offset, chunk.block_table));
                let row = token as usize * c.hidden;
                hidden.extend_from_slice(&self.embedding[row..row + c.hidden]);
            }
        }
        let rows = positions.len();
        if rows == 0 {
            return Ok(ForwardOutput::default());
        }
        let shape = AttentionShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let q_width = c.n_heads * c.head_dim;
        let kv_width = c.n_kv_heads * c.head_dim;
        let qkv_width = q_width + 2 * kv_width;
        let mut queries = vec![0.0; rows * q_width];
        for (index, layer) in self.layers.iter().enumerate() {
            let normed = rms_norm(&hidden, &layer.attn_norm, c.rms_eps);
            let mut qkv = self.backend.linear(&layer.qkv, normed, rows)?;
            {
                let (k_pool, v_pool) = kv.layer_mut(index).ok_or(HOST_POOL_NEEDED)?;
                for ((row, &(position, table)), q_out) in qkv
                    .chunks_exact_mut(qkv_width)
                    .zip(&positions)
                    .zip(queries.chunks_exact_mut(q_width))
                {
                    let (q, kv_row) = row.split_at_mut(q_width);
                    let (k, v) = kv_row.split_at_mut(kv_width);
                    self.rope.rotate(q, position);
                    self.rope.rotate(k, position);
                    q_out.copy_from_slice(q);
                    write_kv(k_pool, v_pool, table, position, k, v, c);
                }
            }
            let (k_pool, v_pool) = kv.layer(index).ok_or(HOST_POOL_NEEDED)?;
            let attended = self.backend.attention(
                shape,
                &queries,
                &chunks,
                LayerKv {
                    k: k_pool,
                    v: v_pool,
                },
            );
            let projected = self.backend.linear(&layer.attn_output, attended, rows)?;
            add_in_place(&mut hidden, &projected);
            let normed = rms_norm(&hidden, &layer.ffn_norm, c.rms_eps);
            let gate_up = self.backend.linear(&layer.gate_up, normed, rows)?;
            let activated = silu_mul(&gate_up, c.ffn);
            let down = self.backend.linear(&layer.down, activated, rows)?;
            add_in_place(&mut hidden, &down);
        }
        let mut last_rows = Vec::new();
        for (chunk, rows) in batch.chunks.iter().zip(&chunks) {
            if chunk.want_logits {
                let last = rows.first_row + rows.len - 1;
                last_rows.extend_from_slice(&hidden[last * c.hidden..(last + 1) * c.hidden]);
            }
        }
        let wanted = last_rows.len() / c.hidden;
        if wanted == 0 {
            return Ok(ForwardOutput::default());
        }
        let normed = rms_norm(&last_rows, &self.output_norm, c.rms_eps);
        let logits = self.backend.linear(&self.output, normed, wanted)?;
        Ok(ForwardOutput {
            logits: logits.chunks_exact(c.vocab).map(<[f32]>::to_vec).collect(),
        })
    }
}

/// Stores one token's K (transposed per block) and V at its position's block slot.
fn write_kv(
    k_pool: &mut [f32],
    v_pool: &mut [f32],
    block_table: &[u32],
    position: usize,
    k: &[f32],
    v: &[f32],
    config: &ModelConfig,
) {
    let hd = config.head_dim;
    let block = block_table[position / BLOCK_SIZE] as usize;
    let slot = position % BLOCK_SIZE;
    let block_base = block * config.n_kv_heads * hd * BLOCK_SIZE;
    for head in 0..config.n_kv_heads {
        let head_base = block_base + head * hd * BLOCK_SIZE;
        for d in 0..hd {
            k_pool[head_base + d * BLOCK_SIZE + slot] = k[head * hd + d];
        }
        v_pool[head_base + slot * hd..head_base + (slot + 1) * hd]
            .copy_from_slice(&v[head * hd..(head + 1) * hd]);
    }
}
