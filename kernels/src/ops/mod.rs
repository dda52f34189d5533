//! The forward pass's device operations behind one trait, [`KernelOps`], so that one
//! orchestration of a Llama layer runs on a GPU ([`cuda::CudaOps`]: the kernels of `cuda/`
//! and cuBLAS, behind the `cuda` feature) and on the host ([`host::HostOps`]: the Rust
//! references that define each kernel). Buffers stay wherever the implementation keeps them:
//! a caller uploads a batch's inputs once, chains operations on buffers and downloads only
//! what it needs (the logits).
//!
//! Every operation checks its arguments before the implementation runs: buffer lengths,
//! shapes the kernels support, and index bounds. On a GPU an index past a buffer is a memory
//! fault, not a panic, so index arrays are checked once, on the host, when they are uploaded
//! ([`Indices`], [`DeviceChunks`]) and carry the bound they were checked against; an
//! operation then only compares bounds. The implementations' `exec_*` methods run an
//! operation whose arguments the provided method of the same name has checked; callers use
//! the provided methods. Maintenance of the KV pool beside the forward pass (block and row
//! copies, re-rotation, ranged transfers) is the companion trait [`PoolOps`].

mod args;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod host;
pub mod pool;

pub use args::{ColumnRange, DeviceChunks, DeviceRope, HeadRange, Indices, PackedChunks};
pub use pool::{DeviceRotation, PoolOps};

use crate::reference::attention::{AttentionShape, ChunkRows};
use crate::reference::kv::{KvShape, RowLayout};
use crate::reference::rope::RopeTable;
use crate::registry::{self, BLOCK_SIZE};

/// A buffer of values an implementation keeps (host memory or device memory).
pub trait Buffer {
    /// Values held.
    fn len(&self) -> usize;

    /// Whether no value is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Buffer for Vec<T> {
    fn len(&self) -> usize {
        <[T]>::len(self)
    }
}

/// Why a kernel operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelOpError {
    /// A buffer does not hold the values the shape given needs.
    #[error("{op}: {what} holds {actual} values where {expected} are needed")]
    Length {
        /// The operation.
        op: &'static str,
        /// Which argument.
        what: &'static str,
        /// Values the shape needs.
        expected: usize,
        /// Values the buffer holds.
        actual: usize,
    },
    /// An index or a size is outside what the operation can address.
    #[error("{op}: {what} is {value}, beyond the limit {limit}")]
    OutOfRange {
        /// The operation.
        op: &'static str,
        /// Which value.
        what: &'static str,
        /// The value (for an index array, its checked bound).
        value: usize,
        /// The largest value allowed, plus one for indices.
        limit: usize,
    },
    /// The device refused or failed the operation.
    #[error("{op} failed on the {backend} device")]
    Device {
        /// The operation.
        op: &'static str,
        /// The implementation's name.
        backend: &'static str,
        /// The device's (driver's, cuBLAS's) error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn expect_len(
    op: &'static str,
    what: &'static str,
    actual: usize,
    expected: usize,
) -> Result<(), KernelOpError> {
    if actual == expected {
        Ok(())
    } else {
        Err(KernelOpError::Length {
            op,
            what,
            expected,
            actual,
        })
    }
}

fn expect_within(
    op: &'static str,
    what: &'static str,
    value: usize,
    limit: usize,
) -> Result<(), KernelOpError> {
    if value <= limit {
        Ok(())
    } else {
        Err(KernelOpError::OutOfRange {
            op,
            what,
            value,
            limit,
        })
    }
}

/// `rows * width`, or an error naming `op` when it overflows.
fn product(op: &'static str, rows: usize, width: usize) -> Result<usize, KernelOpError> {
    let n = rows.saturating_mul(width);
    expect_within(op, "rows × width", n, i32::MAX as usize)?;
    Ok(n)
}

/// The operations of a Llama forward pass on buffers an implementation keeps. The provided
/// methods check their arguments and call the implementation's `exec_*` method, which may
/// assume them checked.
pub trait KernelOps: Send + Sync + std::fmt::Debug {
    /// A buffer of f32 values.
    type F32: Buffer + Send + Sync + std::fmt::Debug;
    /// A buffer of u32 values.
    type U32: Buffer + Send + Sync + std::fmt::Debug;
    /// A dense `[outputs][inputs]` weight matrix.
    type Matrix: Send + Sync + std::fmt::Debug;

    /// Short name for errors and logs (`host`, `cuda`).
    fn name(&self) -> &'static str;

    /// Copies `host` into a new buffer.
    fn upload_f32(&self, host: &[f32]) -> Result<Self::F32, KernelOpError>;

    /// Copies `host` into a new buffer.
    fn upload_u32(&self, host: &[u32]) -> Result<Self::U32, KernelOpError>;

    /// A buffer of `len` zeros.
    fn zeros_f32(&self, len: usize) -> Result<Self::F32, KernelOpError>;

    /// Copies a buffer back to the host.
    fn download_f32(&self, buffer: &Self::F32) -> Result<Vec<f32>, KernelOpError>;

    /// Uploads a row-major `[outputs][inputs]` weight matrix.
    fn upload_matrix(
        &self,
        weights: &[f32],
        outputs: usize,
        inputs: usize,
    ) -> Result<Self::Matrix, KernelOpError>;

    /// `(outputs, inputs)` of a matrix.
    fn matrix_shape(&self, matrix: &Self::Matrix) -> (usize, usize);

    /// Runs a checked [`matmul`](Self::matmul).
    fn exec_matmul(
        &self,
        weight: &Self::Matrix,
        input: &Self::F32,
        rows: usize,
        out: &mut Self::F32,
    ) -> Result<(), KernelOpError>;

    /// Runs a checked [`embedding_gather`](Self::embedding_gather).
    fn exec_embedding_gather(
        &self,
        table: &Self::F32,
        tokens: &Indices<Self::U32>,
        hidden: usize,
        out: &mut Self::F32,
    ) -> Result<(), KernelOpError>;

    /// Runs a checked [`rms_norm`](Self::rms_norm).
    fn exec_rms_norm(
        &self,
        input: &Self::F32,
        weight: &Self::F32,
        rows: usize,
        eps: f32,
        out: &mut Self::F32,
    ) -> Result<(), KernelOpError>;

    /// Runs a checked [`silu_mul`](Self::silu_mul).
    fn exec_silu_mul(
        &self,
        gate_up: &Self::F32,
        rows: usize,
        width: usize,
        out: &mut Self::F32,
    ) -> Result<(), KernelOpError>;

    /// Runs a checked [`add_in_place`](Self::add_in_place).
    fn exec_add_in_place(
        &self,
        residual: &mut Self::F32,
        delta: &Self::F32,
    ) -> Result<(), KernelOpError>;

    /// Runs a checked [`gather_columns`](Self::gather_columns).
    fn exec_gather_columns(
        &self,
        src: &Self::F32,
        columns: ColumnRange,
        out: &mut Self::F32,
    ) -> Result<(), KernelOpError>;

    /// Runs a checked [`rope_apply`](Self::rope_apply).
    fn exec_rope_apply(
        &self,
        x: &mut Self::F32,
        positions: &Indices<Self::U32>,
        rope: &DeviceRope<Self::F32>,
        heads: HeadRange,
    ) -> Result<(), KernelOpError>;

    /// Runs a checked [`kv_write`](Self::kv_write).
    fn exec_kv_write(
        &self,
        pool: (&mut Self::F32, &mut Self::F32),
        src: &Self::F32,
        slots: &Indices<Self::U32>,
        layout: RowLayout,
        shape: KvShape,
    ) -> Result<(), KernelOpError>;

    /// Runs a checked [`paged_attention`](Self::paged_attention).
    fn exec_paged_attention(
        &self,
        queries: &Self::F32,
        pool: (&Self::F32, &Self::F32),
        chunks: &DeviceChunks<Self::U32>,
        shape: AttentionShape,
        out: &mut Self::F32,
    ) -> Result<(), KernelOpError>;

    /// Uploads index values after checking each is below `bound`.
    fn upload_indices(
        &self,
        host: &[u32],
        bound: usize,
    ) -> Result<Indices<Self::U32>, KernelOpError> {
        if let Some(&value) = host.iter().find(|&&v| v as usize >= bound) {
            return Err(KernelOpError::OutOfRange {
                op: "upload indices",
                what: "an index",
                value: value as usize,
                limit: bound,
            });
        }
        Ok(Indices {
            buffer: self.upload_u32(host)?,
            bound,
        })
    }

    /// Uploads a RoPE table's cosines and sines.
    fn upload_rope(&self, table: &RopeTable) -> Result<DeviceRope<Self::F32>, KernelOpError> {
        Ok(DeviceRope {
            cos: self.upload_f32(table.cos_table())?,
            sin: self.upload_f32(table.sin_table())?,
            pairs: table.pairs(),
            positions: table.max_positions(),
        })
    }

    /// Packs ([`PackedChunks::pack`]) and uploads a batch's chunks.
    fn upload_chunks(
        &self,
        chunks: &[ChunkRows<'_>],
        rows: usize,
        num_blocks: usize,
    ) -> Result<DeviceChunks<Self::U32>, KernelOpError> {
        let packed = PackedChunks::pack(chunks, rows, num_blocks)?;
        Ok(DeviceChunks {
            tables: self.upload_u32(&packed.tables)?,
            first_row: self.upload_u32(&packed.first_row)?,
            len: self.upload_u32(&packed.len)?,
            start_pos: self.upload_u32(&packed.start_pos)?,
            n_chunks: chunks.len(),
            max_blocks: packed.max_blocks,
            max_len: chunks.iter().map(|c| c.len).max().unwrap_or(0),
            rows,
            num_blocks,
        })
    }

    /// `out [rows][outputs] = input [rows][inputs] · weightᵀ`.
    fn matmul(
        &self,
        weight: &Self::Matrix,
        input: &Self::F32,
        rows: usize,
        out: &mut Self::F32,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "matmul";
        let (outputs, inputs) = self.matrix_shape(weight);
        expect_len(OP, "input", input.len(), product(OP, rows, inputs)?)?;
        expect_len(OP, "output", out.len(), product(OP, rows, outputs)?)?;
        if rows == 0 {
            return Ok(());
        }
        self.exec_matmul(weight, input, rows, out)
    }

    /// `out` row `r` = row `tokens[r]` of the `[_][hidden]` `table`.
    fn embedding_gather(
        &self,
        table: &Self::F32,
        tokens: &Indices<Self::U32>,
        hidden: usize,
        out: &mut Self::F32,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "embedding gather";
        if hidden == 0 || table.len() % hidden != 0 {
            return Err(KernelOpError::Length {
                op: OP,
                what: "table",
                expected: table.len().next_multiple_of(hidden.max(1)),
                actual: table.len(),
            });
        }
        expect_within(OP, "token bound", tokens.bound(), table.len() / hidden)?;
        expect_len(OP, "output", out.len(), product(OP, tokens.len(), hidden)?)?;
        if tokens.is_empty() {
            return Ok(());
        }
        self.exec_embedding_gather(table, tokens, hidden, out)
    }

    /// RMSNorm of each of `rows` rows, `weight.len()` wide.
    fn rms_norm(
        &self,
        input: &Self::F32,
        weight: &Self::F32,
        rows: usize,
        eps: f32,
        out: &mut Self::F32,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "rms norm";
        let n = product(OP, rows, weight.len())?;
        expect_len(OP, "input", input.len(), n)?;
        expect_len(OP, "output", out.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        self.exec_rms_norm(input, weight, rows, eps, out)
    }

    /// SwiGLU: rows `[gate | up]` of `2 * width` → rows `silu(gate) * up` of `width`.
    fn silu_mul(
        &self,
        gate_up: &Self::F32,
        rows: usize,
        width: usize,
        out: &mut Self::F32,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "silu mul";
        let n = product(OP, rows, width)?;
        expect_len(OP, "gate|up", gate_up.len(), product(OP, n, 2)?)?;
        expect_len(OP, "output", out.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        self.exec_silu_mul(gate_up, rows, width, out)
    }

    /// `residual += delta`.
    fn add_in_place(
        &self,
        residual: &mut Self::F32,
        delta: &Self::F32,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "add in place";
        expect_len(OP, "delta", delta.len(), residual.len())?;
        expect_within(OP, "values", residual.len(), i32::MAX as usize)?;
        if residual.is_empty() {
            return Ok(());
        }
        self.exec_add_in_place(residual, delta)
    }

    /// A column range of each row of `src` as contiguous rows.
    fn gather_columns(
        &self,
        src: &Self::F32,
        columns: ColumnRange,
        out: &mut Self::F32,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "gather columns";
        expect_within(
            OP,
            "last column + 1",
            columns.col_offset.saturating_add(columns.width),
            columns.stride,
        )?;
        expect_len(
            OP,
            "source",
            src.len(),
            product(OP, columns.rows, columns.stride)?,
        )?;
        expect_len(
            OP,
            "output",
            out.len(),
            product(OP, columns.rows, columns.width)?,
        )?;
        if out.is_empty() {
            return Ok(());
        }
        self.exec_gather_columns(src, columns, out)
    }

    /// RoPE of `heads.n_heads` heads from `heads.col_offset` of each row of `x`, row `r` at
    /// position `positions[r]`.
    fn rope_apply(
        &self,
        x: &mut Self::F32,
        positions: &Indices<Self::U32>,
        rope: &DeviceRope<Self::F32>,
        heads: HeadRange,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "rope apply";
        expect_within(OP, "position bound", positions.bound(), rope.positions)?;
        let width = product(OP, heads.n_heads, 2 * rope.pairs)?;
        expect_within(
            OP,
            "last rotated column + 1",
            heads.col_offset.saturating_add(width),
            heads.row_stride,
        )?;
        expect_len(
            OP,
            "rows",
            x.len(),
            product(OP, positions.len(), heads.row_stride)?,
        )?;
        if positions.is_empty() || width == 0 {
            return Ok(());
        }
        self.exec_rope_apply(x, positions, rope, heads)
    }

    /// Stores row `r`'s K and V (at `layout`'s offsets of `src`) at flat slot `slots[r]`
    /// (`block * 16 + slot`) of one layer's pool.
    fn kv_write(
        &self,
        pool: (&mut Self::F32, &mut Self::F32),
        src: &Self::F32,
        slots: &Indices<Self::U32>,
        layout: RowLayout,
        shape: KvShape,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "kv write";
        let (k_pool, v_pool) = pool;
        let blocks = pool::pool_blocks(OP, k_pool.len(), v_pool.len(), shape.block_floats())?;
        expect_within(OP, "slot bound", slots.bound(), blocks * BLOCK_SIZE)?;
        let width = shape.width();
        for (what, offset) in [("K", layout.k_offset), ("V", layout.v_offset)] {
            expect_within(OP, what, offset.saturating_add(width), layout.stride)?;
        }
        expect_len(
            OP,
            "source",
            src.len(),
            product(OP, slots.len(), layout.stride)?,
        )?;
        if slots.is_empty() || width == 0 {
            return Ok(());
        }
        self.exec_kv_write((k_pool, v_pool), src, slots, layout, shape)
    }

    /// Causal attention of the chunks' query rows (`[rows][n_heads * head_dim]`) over one
    /// layer's pool; `out` rows outside every chunk are left as they are.
    fn paged_attention(
        &self,
        queries: &Self::F32,
        pool: (&Self::F32, &Self::F32),
        chunks: &DeviceChunks<Self::U32>,
        shape: AttentionShape,
        out: &mut Self::F32,
    ) -> Result<(), KernelOpError> {
        const OP: &str = "paged attention";
        let (k_pool, v_pool) = pool;
        if registry::attention_threads(shape.head_dim).is_none() {
            return Err(KernelOpError::OutOfRange {
                op: OP,
                what: "head_dim",
                value: shape.head_dim,
                limit: registry::MAX_HEAD_DIM,
            });
        }
        if shape.n_kv_heads == 0 || !shape.n_heads.is_multiple_of(shape.n_kv_heads) {
            return Err(KernelOpError::OutOfRange {
                op: OP,
                what: "query heads (a multiple of the KV heads)",
                value: shape.n_heads,
                limit: shape.n_kv_heads,
            });
        }
        let rows = product(OP, chunks.rows, shape.row_width())?;
        expect_len(OP, "queries", queries.len(), rows)?;
        expect_len(OP, "output", out.len(), rows)?;
        let blocks = pool::pool_blocks(OP, k_pool.len(), v_pool.len(), shape.kv().block_floats())?;
        expect_len(OP, "pool blocks", blocks, chunks.num_blocks)?;
        if chunks.n_chunks == 0 || chunks.max_len == 0 {
            return Ok(());
        }
        self.exec_paged_attention(queries, (k_pool, v_pool), chunks, shape, out)
    }
}

#[cfg(test)]
mod tests;
