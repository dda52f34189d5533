//! The Llama forward pass with its activations and its KV pool resident where the kernels run:
//! every operation goes through [`KernelOps`], so a batch costs one upload (token ids,
//! positions, KV slots, block tables) and one download (the logits), with no host round trip
//! per projection. On a GPU that is `CudaOps` (the `cuda/` kernels and cuBLAS); on the host,
//! [`HostOps`](skillkv_kernels::ops::host::HostOps) runs the same orchestration through the
//! kernels' references, which is how the tests check it where no GPU is.
//!
//! Weights are loaded by [`Llama::load`] through [`OpsBackend`], the [`Backend`] adaptor over
//! any [`KernelOps`] (dense f32 matrices, dequantized once); norms, the embedding table and the
//! RoPE tables are uploaded beside them. The pool ([`ResidentPool`]) has the layout of the
//! host [`KvPool`](crate::engine::kv_pool::KvPool) — K `[block][kv_head][head_dim][slot]`, V
//! `[block][kv_head][slot][head_dim]` — so block tables and slots mean the same on both.
//!
//! The engine runs it through [`LlamaModel`](crate::engine::model::LlamaModel): the pool is a
//! [`KvPool`](crate::engine::kv_pool::KvPool) on the device ([`ResidentPool`] behind
//! [`DeviceKv`](crate::engine::kv_pool::DeviceKv)), so the scheduler, the prefix cache and the
//! skill store work unchanged.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use skillkv_kernels::ops::{ColumnRange, DeviceRope, HeadRange, KernelOpError, KernelOps, PoolOps};
use skillkv_kernels::reference::attention::{AttentionShape, ChunkRows};
use skillkv_kernels::reference::kv::{RowLayout, flat_slot};

use crate::engine::batch::{BLOCK_SIZE, ForwardBatch, ForwardOutput};
use crate::engine::gguf::{GgufFile, LoadModelError, ModelConfig};
use crate::engine::model::backend::{
    Backend, BackendOpError, PrepareWeightError, dequantize_stacked_rows,
};
use crate::engine::model::llama::{ForwardError, Llama};

/// [`Backend`] over a [`KernelOps`]: weights become its dense matrices; `linear` uploads the
/// rows, multiplies and downloads (the host-driven path, used only where a caller runs the
/// host forward pass on these weights).
#[derive(Debug)]
pub struct OpsBackend<K> {
    ops: Arc<K>,
}

impl<K> OpsBackend<K> {
    /// A backend on `ops`.
    pub fn new(ops: Arc<K>) -> Self {
        Self { ops }
    }
}

fn op_error(
    backend: &'static str,
    operation: &'static str,
    error: KernelOpError,
) -> BackendOpError {
    BackendOpError {
        backend,
        operation,
        source: Box::new(candle_core::Error::wrap(error)),
    }
}

impl<K: KernelOps> Backend for OpsBackend<K> {
    type Linear = K::Matrix;

    fn name(&self) -> &'static str {
        self.ops.name()
    }

    fn prepare_linear(
        &self,
        name: &str,
        parts: Vec<QTensor>,
    ) -> Result<K::Matrix, PrepareWeightError> {
        let error = PrepareWeightError::for_tensor(name, self.ops.name());
        let (weights, outputs, inputs) = dequantize_stacked_rows(&parts).map_err(error)?;
        self.ops
            .upload_matrix(&weights, outputs, inputs)
            .map_err(|source| error(candle_core::Error::wrap(source)))
    }

    fn linear(
        &self,
        weight: &K::Matrix,
        input: Vec<f32>,
        rows: usize,
    ) -> Result<Vec<f32>, BackendOpError> {
        let name = self.ops.name();
        let run = || -> Result<Vec<f32>, KernelOpError> {
            let (outputs, _) = self.ops.matrix_shape(weight);
            let x = self.ops.upload_f32(&input)?;
            let mut y = self.ops.zeros_f32(rows * outputs)?;
            self.ops.matmul(weight, &x, rows, &mut y)?;
            self.ops.download_f32(&y)
        };
        run().map_err(|error| op_error(name, "linear", error))
    }
}

/// The norms of one layer, uploaded.
#[derive(Debug)]
struct LayerNorms<F> {
    attn: F,
    ffn: F,
}

/// A Llama model whose forward pass runs on `K`'s buffers.
#[derive(Debug)]
pub struct ResidentLlama<K: PoolOps> {
    ops: Arc<K>,
    llama: Llama<OpsBackend<K>>,
    embedding: K::F32,
    norms: Vec<LayerNorms<K::F32>>,
    output_norm: K::F32,
    rope: DeviceRope<K::F32>,
}

/// The sizes of one forward pass's activations.
#[derive(Debug, Clone, Copy)]
struct Widths {
    q: usize,
    kv: usize,
    qkv: usize,
}

impl<K: PoolOps> ResidentLlama<K> {
    /// Reads every weight of `file` (checked for architecture and types) onto `ops`.
    pub fn load(
        ops: Arc<K>,
        config: ModelConfig,
        file: &mut GgufFile,
    ) -> Result<Self, LoadModelError> {
        let llama = Llama::load(OpsBackend::new(ops.clone()), config, file)?;
        let upload = |what: &str, values: &[f32]| {
            ops.upload_f32(values)
                .map_err(|source| LoadModelError::Tensor {
                    tensor: what.to_string(),
                    source: Box::new(candle_core::Error::wrap(source)),
                })
        };
        let norms = llama
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| {
                Ok(LayerNorms {
                    attn: upload(&format!("blk.{i}.attn_norm.weight"), &layer.attn_norm)?,
                    ffn: upload(&format!("blk.{i}.ffn_norm.weight"), &layer.ffn_norm)?,
                })
            })
            .collect::<Result<Vec<_>, LoadModelError>>()?;
        let embedding = upload("token_embd.weight", &llama.embedding)?;
        let output_norm = upload("output_norm.weight", &llama.output_norm)?;
        let rope = ops
            .upload_rope(&llama.rope)
            .map_err(|source| LoadModelError::Tensor {
                tensor: "rope tables".to_string(),
                source: Box::new(candle_core::Error::wrap(source)),
            })?;
        Ok(Self {
            ops,
            llama,
            embedding,
            norms,
            output_norm,
            rope,
        })
    }

    /// The model's hyperparameters.
    pub fn config(&self) -> &ModelConfig {
        self.llama.config()
    }

    /// A zeroed pool of `num_blocks` blocks for this model.
    pub fn new_pool(&self, num_blocks: usize) -> Result<ResidentPool<K>, KernelOpError> {
        ResidentPool::new(self.ops.clone(), self.config(), num_blocks)
    }

    fn widths(&self) -> Widths {
        let c = self.config();
        let q = c.n_heads * c.head_dim;
        let kv = c.n_kv_heads * c.head_dim;
        Widths {
            q,
            kv,
            qkv: q + 2 * kv,
        }
    }

    /// Runs one batch: writes the new tokens' K/V into `pool` and returns the logits of the
    /// last token of every chunk that wants them (the same contract as the host forward pass).
    pub fn forward(
        &self,
        batch: &ForwardBatch<'_>,
        pool: &mut ResidentPool<K>,
    ) -> Result<ForwardOutput, ForwardError> {
        self.llama
            .validate(batch, pool.num_layers(), pool.num_blocks)?;
        let c = self.config();
        let ops = &*self.ops;
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut chunks = Vec::with_capacity(batch.chunks.len());
        let mut last_rows = Vec::new();
        for chunk in &batch.chunks {
            chunks.push(ChunkRows {
                first_row: tokens.len(),
                len: chunk.tokens.len(),
                start_pos: chunk.start_pos,
                block_table: chunk.block_table,
            });
            for (offset, &token) in chunk.tokens.iter().enumerate() {
                let position = chunk.start_pos + offset;
                tokens.push(token);
                // Positions are below the context length (validated), which fits u32.
                positions.push(position as u32);
                slots.push(flat_slot(chunk.block_table, position));
            }
            if chunk.want_logits {
                last_rows.push(tokens.len() as u32 - 1);
            }
        }
        let rows = tokens.len();
        if rows == 0 {
            return Ok(ForwardOutput::default());
        }
        let tokens = ops.upload_indices(&tokens, c.vocab)?;
        let positions = ops.upload_indices(&positions, self.rope.positions())?;
        let slots = ops.upload_indices(&slots, pool.num_blocks * BLOCK_SIZE)?;
        let chunks = ops.upload_chunks(&chunks, rows, pool.num_blocks)?;

        let w = self.widths();
        let zeros = |n: usize| ops.zeros_f32(rows * n);
        let mut hidden = zeros(c.hidden)?;
        let mut normed = zeros(c.hidden)?;
        let mut qkv = zeros(w.qkv)?;
        let mut queries = zeros(w.q)?;
        let mut attended = zeros(w.q)?;
        let mut projected = zeros(c.hidden)?;
        let mut gate_up = zeros(2 * c.ffn)?;
        let mut activated = zeros(c.ffn)?;
        let shape = AttentionShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let rope_heads = |col_offset, n_heads| HeadRange {
            row_stride: w.qkv,
            col_offset,
            n_heads,
        };
        ops.embedding_gather(&self.embedding, &tokens, c.hidden, &mut hidden)?;
        for ((layer, norms), kv) in self
            .llama
            .layers
            .iter()
            .zip(&self.norms)
            .zip(&mut pool.layers)
        {
            ops.rms_norm(&hidden, &norms.attn, rows, c.rms_eps, &mut normed)?;
            ops.matmul(&layer.qkv, &normed, rows, &mut qkv)?;
            ops.rope_apply(&mut qkv, &positions, &self.rope, rope_heads(0, c.n_heads))?;
            ops.rope_apply(
                &mut qkv,
                &positions,
                &self.rope,
                rope_heads(w.q, c.n_kv_heads),
            )?;
            let layout = RowLayout {
                stride: w.qkv,
                k_offset: w.q,
                v_offset: w.q + w.kv,
            };
            ops.kv_write(
                (&mut kv.k, &mut kv.v),
                &qkv,
                &slots,
                layout,
                self.config().kv_shape(),
            )?;
            let q_columns = ColumnRange {
                rows,
                stride: w.qkv,
                col_offset: 0,
                width: w.q,
            };
            ops.gather_columns(&qkv, q_columns, &mut queries)?;
            ops.paged_attention(&queries, (&kv.k, &kv.v), &chunks, shape, &mut attended)?;
            ops.matmul(&layer.attn_output, &attended, rows, &mut projected)?;
            ops.add_in_place(&mut hidden, &projected)?;
            ops.rms_norm(&hidden, &norms.ffn, rows, c.rms_eps, &mut normed)?;
            ops.matmul(&layer.gate_up, &normed, rows, &mut gate_up)?;
            ops.silu_mul(&gate_up, rows, c.ffn, &mut activated)?;
            ops.matmul(&layer.down, &activated, rows, &mut projected)?;
            ops.add_in_place(&mut hidden, &projected)?;
        }
        let wanted = last_rows.len();
        if wanted == 0 {
            return Ok(ForwardOutput::default());
        }
        // The last row of each chunk that wants logits: a gather of `hidden`'s rows.
        let last_rows = ops.upload_indices(&last_rows, rows)?;
        let mut last = ops.zeros_f32(wanted * c.hidden)?;
        ops.embedding_gather(&hidden, &last_rows, c.hidden, &mut last)?;
        let mut last_normed = ops.zeros_f32(wanted * c.hidden)?;
        ops.rms_norm(
            &last,
            &self.output_norm,
            wanted,
            c.rms_eps,
            &mut last_normed,
        )?;
        let mut logits = ops.zeros_f32(wanted * c.vocab)?;
        ops.matmul(&self.llama.output, &last_normed, wanted, &mut logits)?;
        let logits = ops.download_f32(&logits)?;
        Ok(ForwardOutput {
            logits: logits.chunks_exact(c.vocab).map(<[f32]>::to_vec).collect(),
        })
    }
}

mod pool;
#[cfg(test)]
mod tests;

pub use pool::ResidentPool;
